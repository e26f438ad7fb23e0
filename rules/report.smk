# Stage 5: static HTML inspection reports (workflow_lib/report.py), registered with Snakemake's
# report() so that `snakemake --report report.html` includes them.
#
# Input paths of the later stages: adjust here if LFD / CPM change their layout.
REPORT_LFD_LIGHTCURVES = "{results}/{field}/lfd/lightcurves.zarr"
REPORT_CPM_LIGHTCURVES = "{results}/{field}/cpm/{paramset}/lightcurves.zarr"


def report_stage_enabled(stage):
    """`lfd.enabled` / `cpm.enabled`; a missing key counts as enabled."""
    return bool((config.get(stage) or {}).get("enabled", True))


def report_cpm_paramsets():
    """CPM parameter-set names (workflow_lib.cpm.paramset_names: 'default' plus one per
    cpm.sweep_lambda_L entry); 'default' if that helper is unavailable."""
    try:
        from workflow_lib.cpm import paramset_names

        return list(paramset_names(config.get("cpm") or {}))
    except ImportError:
        return ["default"]


def report_cpm_shown():
    """The CPM parameter set a field page shows: report.cpm_paramset, else 'default' (else the first)."""
    names = report_cpm_paramsets()
    return config["report"].get("cpm_paramset") or ("default" if "default" in names else names[0])


def report_field_inputs(wildcards):
    """Cube + catalog always; LFD / CPM light curves only when those stages are enabled."""
    inputs = {
        "cube": f"{RESULTS}/{wildcards.field}/cube.zarr",
        "catalog": f"{RESULTS}/{wildcards.field}/catalog.ecsv",
    }
    if report_stage_enabled("lfd"):
        inputs["lfd"] = REPORT_LFD_LIGHTCURVES.format(results=RESULTS, field=wildcards.field)
    if report_stage_enabled("cpm"):
        inputs["cpm"] = REPORT_CPM_LIGHTCURVES.format(results=RESULTS, field=wildcards.field, paramset=report_cpm_shown())
    return inputs


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
    params:
        field_dir=lambda w: f"{RESULTS}/{w.field}",
        report=lambda w: dict(config["report"], cpm_paramset=report_cpm_shown() if report_stage_enabled("cpm") else config["report"].get("cpm_paramset")),
    log:
        rule_log("report_field"),
    benchmark:
        rule_benchmark("report_field")
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    run:
        from workflow_lib.report import write_field_report

        with logged(log[0], f"report_field {wildcards.field}"):
            write_field_report(params.field_dir, output.html, output.summary, params.report, field=wildcards.field)


rule report_index:
    """Run index: every field (thumbnail, counts, median CDPP), config, versions, rule benchmarks."""
    input:
        summaries=expand(f"{RESULTS}/report/{{field}}.json", field=FIELDS),
        pages=expand(f"{RESULTS}/report/{{field}}.html", field=FIELDS),
    output:
        html=report(f"{RESULTS}/report/index.html", category="Run index", labels={"page": "index"}),
    params:
        config=config,
        run=config["run"],
        bench_dir=f"{RESULTS}/benchmarks",
    log:
        f"{RESULTS}/logs/report_index/index.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_index/index.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    run:
        from workflow_lib.report import write_index_report

        with logged(log[0], "report_index"):
            write_index_report(input.summaries, output.html, config=params.config, bench_dir=params.bench_dir, run=params.run)
