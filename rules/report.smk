# Stage 5: static HTML inspection reports (workflow_lib/report.py), registered with Snakemake's
# report() so that `snakemake --report report.html` includes them.
#
# Input paths of the later stages: adjust here if LFD / CPM change their layout.
from workflow_lib.report.page import write_field_report
from workflow_lib.report.page import write_index_report

REPORT_LFD_LIGHTCURVES = "{results}/{field}/lfd/lightcurves.zarr"
REPORT_CPM_LIGHTCURVES = "{results}/{field}/cpm/{paramset}/lightcurves.zarr"


rule report_field:
    """One self-contained HTML page per field: interactive pixels + light curves (offline)."""
    input:
        unpack(report_field_inputs),
    output:
        html=report(
            f"{RESULTS}/report/{{field}}.html",
            category="Field inspection pages",
            labels={"field": "{field}", "page": "interactive pixels and light curves"},
        ),
        summary=f"{RESULTS}/report/{{field}}.json",
    log:
        rule_log("report_field"),
    benchmark:
        rule_benchmark("report_field")
    threads: 1
    resources:
        mem_mb=mem_mb(2000, 4),
        runtime=runtime_min(10, 20),
    params:
        field_dir=lambda w: f"{RESULTS}/{w.field}",
        report=lambda w: dict(
            config["report"],
            cpm_paramset=(
                report_cpm_shown()
                if report_stage_enabled("cpm")
                else config["report"].get("cpm_paramset")
            ),
        ),
    run:
        run_step(
            log,
            write_field_report,
            params.field_dir,
            output.html,
            output.summary,
            params.report,
            field=wildcards.field,
        )


rule report_index:
    """Run index: every field (thumbnail, counts, median CDPP), config, versions, rule benchmarks."""
    input:
        summaries=expand(f"{RESULTS}/report/{{field}}.json", field=FIELDS),
        pages=expand(f"{RESULTS}/report/{{field}}.html", field=FIELDS),
    output:
        html=report(
            f"{RESULTS}/report/index.html",
            category="Run index",
            labels={"page": "index"},
        ),
    log:
        f"{RESULTS}/logs/report_index/index.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_index/index.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=config,
        run=config["run"],
        bench_dir=f"{RESULTS}/benchmarks",
    run:
        run_step(
            log,
            write_index_report,
            input.summaries,
            output.html,
            config=params.config,
            bench_dir=params.bench_dir,
            run=params.run,
        )
