# Stage 2: Gaia crossmatch. Sources propagated by proper motion to the cube's mid-time, in pixels.


def catalog_input(wildcards):
    """The synthetic sector hands the crossmatch its own Gaia-like catalog; others use a local
    catalog file when configured, else the Gaia archive."""
    spec = config["fields"][wildcards.field]
    if spec["source"] == "synthetic":
        return {"catalog": f"{RESULTS}/{wildcards.field}/input_catalog.ecsv"}
    local = (spec.get("gaia") or {}).get("catalog") or (spec.get("local") or {}).get("catalog")
    return {"catalog": local} if local else {}


rule gaia_crossmatch:
    input:
        unpack(catalog_input),
        cube=f"{RESULTS}/{{field}}/cube.zarr",
    output:
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    params:
        gaia=lambda w: field_params(w.field, "gaia"),
    log:
        rule_log("gaia_crossmatch"),
    benchmark:
        rule_benchmark("gaia_crossmatch")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    run:
        from workflow_lib.gaia import crossmatch_field

        with logged(log[0], f"gaia_crossmatch {wildcards.field}"):
            crossmatch_field(input.cube, output.catalog, params.gaia, local_catalog=input.get("catalog"))
