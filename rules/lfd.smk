# Stage 3: Linearized Field Deblending (Hedges & Martinez-Palomera 2021, §4).
#   edge_model (§4.2) -> prf_model (§4.3-4.4, mean frame) -> motion_model (§4.5) -> flux_solve (§4.4-4.5, every cadence)
#   survey.motion ccd: a tile's motion_model takes the scene offsets of its CCD's ccd_motion (rules/survey.smk)
# Settings: config["lfd"] sub-objects edge / prf / motion / solve (workflow_lib/schema.yaml).
# Each rule runs `python -m workflow_lib.steps <step>` (docs/CLI.md).


rule edge_model:
    """§4.2: circular PRF edge radius as a function of flux; uncontaminated pixels."""
    input:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    output:
        edge=f"{RESULTS}/{{field}}/lfd/edge_model.json",
    log:
        rule_log("edge_model"),
    benchmark:
        rule_benchmark("edge_model")
    group:
        field_group("prep")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000, 4),
        runtime=runtime_min(10, 20),
    params:
        edge=lambda w: json_arg(lfd_params(w.field, "edge")),
    shell:
        "python -m workflow_lib.steps edge-model --cube {input.cube:q}"
        " --catalog {input.catalog:q} --out {output.edge:q} --params {params.edge}"
        " --log {log:q}"


rule prf_model:
    """§4.3-4.4: PRF shape (polar B-splines) and mean-frame source fluxes."""
    input:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        edge=f"{RESULTS}/{{field}}/lfd/edge_model.json",
    output:
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
        png=f"{RESULTS}/{{field}}/lfd/prf_model.png",
    log:
        rule_log("prf_model"),
    benchmark:
        rule_benchmark("prf_model")
    group:
        field_group("lfd")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000, 8),
        runtime=runtime_min(20, 60),
    params:
        prf=lambda w: json_arg(lfd_params(w.field, "prf")),
    shell:
        "python -m workflow_lib.steps prf-model --cube {input.cube:q}"
        " --catalog {input.catalog:q} --edge {input.edge:q} --out {output.prf:q}"
        " --png {output.png:q} --params {params.prf} --log {log:q}"


rule motion_model:
    """§4.5: per-cadence motion of the scene as a multiplicative change of the mean PRF."""
    input:
        unpack(ccd_motion_input),
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
    output:
        motion=f"{RESULTS}/{{field}}/lfd/motion_model.npz",
    log:
        rule_log("motion_model"),
    benchmark:
        rule_benchmark("motion_model")
    group:
        field_group("lfd", after_ccd_motion=True)
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000, 8),
        runtime=runtime_min(20, 60),
    params:
        motion=lambda w: json_arg(lfd_params(w.field, "motion")),
        ccd_motion=lambda w, input: (
            f"--ccd-motion {shlex.quote(input.ccd_motion)}"
            if "ccd_motion" in input.keys()
            else ""
        ),
    shell:
        "python -m workflow_lib.steps motion-model --cube {input.cube:q}"
        " --catalog {input.catalog:q} --prf {input.prf:q} {params.ccd_motion}"
        " --out {output.motion:q} --params {params.motion} --log {log:q}"


rule flux_solve:
    """§4.4-4.5: flux of every source at every cadence (sparse least squares with priors);
    light-curve set (zarr) and one lightkurve-readable FITS per source."""
    input:
        unpack(lfd_motion_input),
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
    output:
        lightcurves=zarr_store(f"{RESULTS}/{{field}}/lfd/lightcurves.zarr"),
        fits=directory(f"{RESULTS}/{{field}}/lfd/fits"),
        diagnostics=f"{RESULTS}/{{field}}/lfd/diagnostics.npz",
    log:
        rule_log("flux_solve"),
    benchmark:
        rule_benchmark("flux_solve")
    group:
        field_group("lfd", after_ccd_motion=True)
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(8000, 12),
        runtime=runtime_min(30, 120),
    params:
        solve=lambda w: json_arg(lfd_params(w.field, "solve")),
        cdpp_hours=json_arg(cdpp_hours()),
        motion=lambda w, input: (
            f"--motion {shlex.quote(input.motion)}" if "motion" in input.keys() else ""
        ),
    shell:
        "python -m workflow_lib.steps flux-solve --cube {input.cube:q}"
        " --catalog {input.catalog:q} --prf {input.prf:q} {params.motion}"
        " --out {output.lightcurves:q} --fits-dir {output.fits:q}"
        " --diagnostics {output.diagnostics:q} --cdpp-hours {params.cdpp_hours}"
        " --params {params.solve} --threads {threads} --log {log:q}"
