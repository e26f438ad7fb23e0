# Stage: Causal Pixel Model de-trending of every pixel (Hattori et al. 2022), aperture light curves,
# a lambda_L regularisation sweep compared by CDPP, and multi-sector stitching.
#
#   results/<run>/<field>/cpm/<paramset>/{detrended.zarr, lightcurves.zarr, raw_lightcurves.zarr, fits/}
#   results/<run>/<field>/cpm/sweep_summary.ecsv
#   results/<run>/stitched/<group>/cpm/<paramset>/{lightcurves.zarr, fits/}
#
# <paramset> is `default` (the `cpm:` config) or `lambda_L_<value>` (one per cpm.sweep_lambda_L entry).
from workflow_lib.steps.cpm import run_cpm_detrend
from workflow_lib.steps.cpm import run_cpm_stitch
from workflow_lib.steps.cpm import sweep_summary
from workflow_lib.cpm.model import paramset_names

CPM_PARAMSETS = paramset_names(config["cpm"])
CPM_STITCH = dict(config["cpm"].get("stitch", {}))


rule cpm_detrend:
    """De-trend every pixel with the CPM (train-and-test ridge regression on distant pixels) and
    sum catalog/user apertures into CPM and RAW light curves (zarr + lightkurve-readable FITS).
    """
    input:
        cube=f"{RESULTS}/{{field}}/cube.zarr",
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    output:
        detrended=directory(f"{RESULTS}/{{field}}/cpm/{{paramset}}/detrended.zarr"),
        lightcurves=directory(f"{RESULTS}/{{field}}/cpm/{{paramset}}/lightcurves.zarr"),
        raw_lightcurves=directory(
            f"{RESULTS}/{{field}}/cpm/{{paramset}}/raw_lightcurves.zarr"
        ),
        fits=directory(f"{RESULTS}/{{field}}/cpm/{{paramset}}/fits"),
    log:
        f"{RESULTS}/logs/cpm_detrend/{{field}}_{{paramset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cpm_detrend/{{field}}_{{paramset}}.tsv"
    wildcard_constraints:
        paramset=r"default|lambda_L_[0-9.eE+-]+",
    threads: 2
    resources:
        mem_mb=mem_mb(8000, 12),
        runtime=runtime_min(30, 180),
    params:
        cpm=config["cpm"],
        target_aperture=lambda w: config["fields"][w.field].get("target_aperture") or {},
    run:
        run_step(
            log,
            run_cpm_detrend,
            input.cube,
            input.catalog,
            detrended_path=output.detrended,
            lightcurves_path=output.lightcurves,
            raw_lightcurves_path=output.raw_lightcurves,
            fits_dir=output.fits,
            config=params.cpm,
            paramset=wildcards.paramset,
            target_aperture=params.target_aperture,
            threads=threads,
            field=wildcards.field,
        )


rule cpm_sweep_summary:
    """Median 1-h / 6-h CDPP of every parameter set, RAW and (when the LFD stage is on) LFD."""
    input:
        unpack(lfd_lightcurves_input),
        cpm=expand(
            f"{RESULTS}/{{{{field}}}}/cpm/{{paramset}}/lightcurves.zarr",
            paramset=CPM_PARAMSETS,
        ),
        raw=f"{RESULTS}/{{field}}/cpm/default/raw_lightcurves.zarr",
    output:
        summary=f"{RESULTS}/{{field}}/cpm/sweep_summary.ecsv",
    log:
        rule_log("cpm_sweep_summary"),
    benchmark:
        rule_benchmark("cpm_sweep_summary")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        paramsets=CPM_PARAMSETS,
        lfd=lambda w, input: input.get("lfd"),
        mag_range=config["cpm"]["summary_mag_range"],
    run:
        run_step(
            log,
            sweep_summary,
            dict(zip(params.paramsets, input.cpm)),
            input.raw,
            output.summary,
            lfd_path=params.lfd,
            mag_range=tuple(params.mag_range),
        )


rule cpm_stitch:
    """Stitch the CPM light curves of one sky region observed in several sectors (fields) (§4.1)."""
    input:
        lambda w: expand(
            f"{RESULTS}/{{field}}/cpm/{w.paramset}/lightcurves.zarr",
            field=CPM_STITCH[w.group],
        ),
    output:
        lightcurves=directory(
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
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        n_points=config["cpm"]["stitch_points"],
    run:
        run_step(
            log,
            run_cpm_stitch,
            list(input),
            output.lightcurves,
            output.fits,
            n_points=params.n_points,
            group=wildcards.group,
        )
