# Stage: deblended, de-trended light curves (issue 12 item 3): per source, the LFD model (eq. 25) of every
# other source is subtracted from the pixels of its CPM aperture, those pixels are CPM-de-trended with
# predictors from the raw cube (Hattori et al. 2022 §2-3) and summed (workflow_lib/deblend).
#
#   results/<run>/<field>/cpm/<paramset>/{deblended.zarr, deblended_fits/}
#
# Made for the CPM parameter set the field page shows, when `deblend.enabled` and both the LFD and the CPM
# stage are on (deblend_outputs, report_field_inputs in rules/common.smk); not for survey tiles.
# The rule runs `python -m workflow_lib.steps deblend-detrend` (docs/CLI.md).


rule deblend_detrend:
    """Deblended, de-trended light curves of every CPM aperture: zarr + one lightkurve-readable FITS per
    source (FLUX/FLUX_ERR/QUALITY, and LFD_FLUX, CPM_FLUX, RAW_FLUX with their errors).
    """
    input:
        unpack(lfd_motion_input),
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
        lfd=zarr_store(f"{RESULTS}/{{field}}/lfd/lightcurves.zarr"),
        cpm=zarr_store(f"{RESULTS}/{{field}}/cpm/{{paramset}}/lightcurves.zarr"),
        raw=zarr_store(f"{RESULTS}/{{field}}/cpm/{{paramset}}/raw_lightcurves.zarr"),
    output:
        lightcurves=zarr_store(f"{RESULTS}/{{field}}/cpm/{{paramset}}/deblended.zarr"),
        fits=directory(f"{RESULTS}/{{field}}/cpm/{{paramset}}/deblended_fits"),
    log:
        f"{RESULTS}/logs/deblend_detrend/{{field}}_{{paramset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/deblend_detrend/{{field}}_{{paramset}}.tsv"
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
        config=json_arg({"cpm": config["cpm"], "deblend": config["deblend"]}),
        cdpp_hours=json_arg(cdpp_hours()),
        target_aperture=lambda w: json_arg(
            field_spec(w.field).get("target_aperture") or {}
        ),
        motion=lambda w, input: (
            f"--motion {shlex.quote(input.motion)}" if "motion" in input.keys() else ""
        ),
    shell:
        "python -m workflow_lib.steps deblend-detrend --field {wildcards.field}"
        " --paramset {wildcards.paramset} --cube {input.cube:q}"
        " --catalog {input.catalog:q} --prf {input.prf:q} {params.motion}"
        " --lfd {input.lfd:q} --cpm {input.cpm:q} --raw {input.raw:q}"
        " --out {output.lightcurves:q} --fits-dir {output.fits:q}"
        " --params {params.config} --target-aperture {params.target_aperture}"
        " --cdpp-hours {params.cdpp_hours} --threads {threads} --log {log:q}"
