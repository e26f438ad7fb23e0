# Stage 2: Gaia crossmatch. Sources propagated by proper motion to the cube's mid-time, in pixels.


from workflow_lib.data.gaia import crossmatch_field


rule gaia_crossmatch:
    input:
        unpack(catalog_input),
        cube=f"{RESULTS}/{{field}}/cube.zarr",
    output:
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    log:
        rule_log("gaia_crossmatch"),
    benchmark:
        rule_benchmark("gaia_crossmatch")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        gaia=lambda w: field_params(w.field, "gaia"),
        local_catalog=lambda w: catalog_input(w).get("catalog"),
    run:
        run_step(
            log,
            crossmatch_field,
            input.cube,
            output.catalog,
            params.gaia,
            params.local_catalog,
        )
