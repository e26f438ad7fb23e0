# Stage: Causal Pixel Model de-trending of every pixel (Hattori et al. 2022), aperture light curves,
# a lambda_L regularisation sweep compared by CDPP, and multi-sector stitching.
#
#   results/<run>/<field>/cpm/<paramset>/{detrended.zarr, lightcurves.zarr, raw_lightcurves.zarr, fits/}
#   results/<run>/<field>/cpm/sweep_summary.ecsv
#   results/<run>/stitched/<group>/cpm/<paramset>/{lightcurves.zarr, fits/}
#
# <paramset> is `default` (the `cpm:` config) or `lambda_L_<value>` (one per cpm.sweep_lambda_L entry);
# CPM_PARAMSETS and CPM_STITCH are set in rules/common.smk. Each rule runs
# `python -m workflow_lib.steps <step>` (docs/CLI.md).


rule cpm_detrend:
    """De-trend every pixel with the CPM (train-and-test ridge regression on distant pixels) and
    sum catalog/user apertures into CPM and RAW light curves (zarr + lightkurve-readable FITS).
    """
    input:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    output:
        detrended=zarr_store(f"{RESULTS}/{{field}}/cpm/{{paramset}}/detrended.zarr"),
        lightcurves=zarr_store(f"{RESULTS}/{{field}}/cpm/{{paramset}}/lightcurves.zarr"),
        raw_lightcurves=zarr_store(
            f"{RESULTS}/{{field}}/cpm/{{paramset}}/raw_lightcurves.zarr"
        ),
        fits=directory(f"{RESULTS}/{{field}}/cpm/{{paramset}}/fits"),
    log:
        f"{RESULTS}/logs/cpm_detrend/{{field}}_{{paramset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cpm_detrend/{{field}}_{{paramset}}.tsv"
    wildcard_constraints:
        paramset=r"default|lambda_L_[0-9.eE+-]+",
    group:
        field_group()
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(8000, 12),
        runtime=runtime_min(30, 180),
    params:
        cpm=lambda w: json_arg(cpm_params(w.field)),
        cdpp_hours=json_arg(cdpp_hours()),
        target_aperture=lambda w: json_arg(
            field_spec(w.field).get("target_aperture") or {}
        ),
    shell:
        "python -m workflow_lib.steps cpm-detrend --field {wildcards.field}"
        " --paramset {wildcards.paramset} --cube {input.cube:q}"
        " --catalog {input.catalog:q} --detrended {output.detrended:q}"
        " --lightcurves {output.lightcurves:q}"
        " --raw-lightcurves {output.raw_lightcurves:q} --fits-dir {output.fits:q}"
        " --params {params.cpm} --target-aperture {params.target_aperture}"
        " --cdpp-hours {params.cdpp_hours} --threads {threads} --log {log:q}"


rule cpm_sweep_summary:
    """Median 1-h / 6-h CDPP of every parameter set, RAW and (when the LFD stage is on) LFD."""
    input:
        unpack(lfd_lightcurves_input),
        cpm=expand(
            zarr_store(f"{RESULTS}/{{{{field}}}}/cpm/{{paramset}}/lightcurves.zarr"),
            paramset=CPM_PARAMSETS,
        ),
        raw=zarr_store(f"{RESULTS}/{{field}}/cpm/default/raw_lightcurves.zarr"),
    output:
        summary=f"{RESULTS}/{{field}}/cpm/sweep_summary.ecsv",
    log:
        rule_log("cpm_sweep_summary"),
    benchmark:
        rule_benchmark("cpm_sweep_summary")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        cpm=lambda w, input: " ".join(
            shlex.quote(f"{name}={path}")
            for name, path in zip(CPM_PARAMSETS, input.cpm)
        ),
        lfd=lambda w, input: (
            f"--lfd {shlex.quote(input.lfd)}" if "lfd" in input.keys() else ""
        ),
        summary=json_arg({"mag_range": config["cpm"]["summary_mag_range"]}),
    shell:
        "python -m workflow_lib.steps cpm-sweep-summary --cpm {params.cpm}"
        " --raw {input.raw:q} {params.lfd} --out {output.summary:q}"
        " --params {params.summary} --log {log:q}"


rule cpm_stitch:
    """Stitch the CPM light curves of one sky region observed in several sectors (fields) (§4.1)."""
    input:
        lambda w: expand(
            zarr_store(f"{RESULTS}/{{field}}/cpm/{w.paramset}/lightcurves.zarr"),
            field=CPM_STITCH[w.group],
        ),
    output:
        lightcurves=zarr_store(
            f"{RESULTS}/stitched/{{group}}/cpm/{{paramset}}/lightcurves.zarr"
        ),
        fits=directory(f"{RESULTS}/stitched/{{group}}/cpm/{{paramset}}/fits"),
    log:
        f"{RESULTS}/logs/cpm_stitch/{{group}}_{{paramset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cpm_stitch/{{group}}_{{paramset}}.tsv"
    wildcard_constraints:
        group="|".join(CPM_STITCH) if CPM_STITCH else "^$",
        paramset=r"default|lambda_L_[0-9.eE+-]+",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        stitch=json_arg({"n_points": config["cpm"]["stitch_points"]}),
        cdpp_hours=json_arg(cdpp_hours()),
    shell:
        "python -m workflow_lib.steps cpm-stitch --group {wildcards.group}"
        " --lightcurves {input:q} --out {output.lightcurves:q}"
        " --fits-dir {output.fits:q} --params {params.stitch}"
        " --cdpp-hours {params.cdpp_hours} --log {log:q}"
