# Stage 3: Linearized Field Deblending (Hedges & Martinez-Palomera 2021, §4).
#   edge_model (§4.2) -> prf_model (§4.3-4.4, mean frame) -> motion_model (§4.5) -> flux_solve (§4.4-4.5, every cadence)
# Settings: config["lfd"] sub-objects edge / prf / motion / solve (config/schema.yaml).


from workflow_lib.steps.lfd import edge_model_step
from workflow_lib.steps.lfd import motion_model_step
from workflow_lib.steps.lfd import prf_model_step
from workflow_lib.steps.lfd import flux_solve_step


rule edge_model:
    """§4.2: circular PRF edge radius as a function of flux; uncontaminated pixels."""
    input:
        cube=f"{RESULTS}/{{field}}/cube.zarr",
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    output:
        edge=f"{RESULTS}/{{field}}/lfd/edge_model.json",
    log:
        rule_log("edge_model"),
    benchmark:
        rule_benchmark("edge_model")
    threads: 1
    resources:
        mem_mb=mem_mb(2000, 4),
        runtime=runtime_min(10, 20),
    params:
        edge=lambda w: lfd_params(w.field, "edge"),
    run:
        run_step(
            log, edge_model_step, input.cube, input.catalog, output.edge, params.edge
        )


rule prf_model:
    """§4.3-4.4: PRF shape (polar B-splines) and mean-frame source fluxes."""
    input:
        cube=f"{RESULTS}/{{field}}/cube.zarr",
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        edge=f"{RESULTS}/{{field}}/lfd/edge_model.json",
    output:
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
        png=f"{RESULTS}/{{field}}/lfd/prf_model.png",
    log:
        rule_log("prf_model"),
    benchmark:
        rule_benchmark("prf_model")
    threads: 1
    resources:
        mem_mb=mem_mb(4000, 8),
        runtime=runtime_min(20, 60),
    params:
        prf=lambda w: lfd_params(w.field, "prf"),
    run:
        run_step(
            log,
            prf_model_step,
            input.cube,
            input.catalog,
            input.edge,
            output.prf,
            output.png,
            params.prf,
        )


rule motion_model:
    """§4.5: per-cadence motion of the scene as a multiplicative change of the mean PRF."""
    input:
        cube=f"{RESULTS}/{{field}}/cube.zarr",
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
    output:
        motion=f"{RESULTS}/{{field}}/lfd/motion_model.npz",
    log:
        rule_log("motion_model"),
    benchmark:
        rule_benchmark("motion_model")
    threads: 1
    resources:
        mem_mb=mem_mb(4000, 8),
        runtime=runtime_min(20, 60),
    params:
        motion=lambda w: lfd_params(w.field, "motion"),
    run:
        run_step(
            log,
            motion_model_step,
            input.cube,
            input.catalog,
            input.prf,
            output.motion,
            params.motion,
        )


rule flux_solve:
    """§4.4-4.5: flux of every source at every cadence (sparse least squares with priors);
    light-curve set (zarr) and one lightkurve-readable FITS per source."""
    input:
        unpack(lfd_motion_input),
        cube=f"{RESULTS}/{{field}}/cube.zarr",
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
    output:
        lightcurves=directory(f"{RESULTS}/{{field}}/lfd/lightcurves.zarr"),
        fits=directory(f"{RESULTS}/{{field}}/lfd/fits"),
    log:
        rule_log("flux_solve"),
    benchmark:
        rule_benchmark("flux_solve")
    threads: 2
    resources:
        mem_mb=mem_mb(8000, 12),
        runtime=runtime_min(30, 120),
    params:
        solve=lambda w: lfd_params(w.field, "solve"),
    run:
        run_step(
            log,
            flux_solve_step,
            input.cube,
            input.catalog,
            input.prf,
            input.get("motion"),
            output.lightcurves,
            output.fits,
            params.solve,
            threads=threads,
        )
