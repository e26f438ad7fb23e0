# Stage 5: static HTML inspection reports (workflow_lib/report/page.py), registered with Snakemake's
# report() so that `snakemake --report report.html` includes them.
# Each rule runs `python -m workflow_lib.steps <step>` (docs/CLI.md).
#
# Input paths of the later stages: adjust here if LFD / CPM change their layout.

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
        data=directory(f"{RESULTS}/report/{{field}}_data"),
    log:
        rule_log("report_field"),
    benchmark:
        rule_benchmark("report_field")
    group:
        field_group("report", after_ccd_motion=True)
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000, 4),
        runtime=runtime_min(10, 20),
    params:
        field_dir=lambda w: f"{RESULTS}/{w.field}",
        report=lambda w: json_arg(
            dict(
                config["report"],
                cpm_paramset=(
                    report_cpm_shown()
                    if report_stage_enabled("cpm")
                    else config["report"].get("cpm_paramset")
                ),
            )
        ),
    shell:
        "python -m workflow_lib.steps report-field --field {wildcards.field} --link-index"
        " --field-dir {params.field_dir:q} --out {output.html:q}"
        " --summary {output.summary:q} --params {params.report} --log {log:q}"


rule report_index:
    """Run index: every field (thumbnail, counts, median CDPP) and survey CCD (link to its overview page,
    counts, overlap figures, missing tiles), config, versions, rule benchmarks."""
    input:
        summaries=expand(f"{RESULTS}/report/{{field}}.json", field=FIELDS),
        pages=expand(f"{RESULTS}/report/{{field}}.html", field=FIELDS),
        ccd_tables=expand(f"{RESULTS}/{{ccd}}/merged/sources.ecsv", ccd=CCDS),
        ccd_pages=expand(f"{RESULTS}/report/{{ccd}}/index.html", ccd=CCDS),
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
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        config=json_arg(config),
        run=config["run"],
        bench_dir=f"{RESULTS}/benchmarks",
        ccds=lambda w, input: " ".join(
            shlex.quote(f"{c}={p}") for c, p in zip(CCDS, input.ccd_tables)
        ),
    shell:
        "python -m workflow_lib.steps report-index --run {params.run:q}"
        " --summaries {input.summaries:q} --ccds {params.ccds} --out {output.html:q}"
        " --bench-dir {params.bench_dir:q} --params {params.config} --log {log:q}"
