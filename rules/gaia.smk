# Stage 2: Gaia crossmatch. Sources propagated by proper motion to the cube's mid-time, in pixels.
# Runs on fields and, in survey mode, once per CCD (the CCD cube: one Gaia query per CCD); a tile's
# catalog is the CCD catalog's subset (rule split_catalog, rules/survey.smk).


rule gaia_crossmatch:
    input:
        unpack(catalog_input),
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
    output:
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
    log:
        rule_log("gaia_crossmatch"),
    benchmark:
        rule_benchmark("gaia_crossmatch")
    wildcard_constraints:
        field=_names_regex(FIELDS_AND_CCDS),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(20),
    params:
        gaia=lambda w: json_arg(field_params(w.field, "gaia")),
        local_catalog=lambda w, input: (
            f"--local-catalog {shlex.quote(input.catalog)}"
            if "catalog" in input.keys()
            else ""
        ),
    shell:
        "python -m workflow_lib.steps gaia-crossmatch --cube {input.cube:q}"
        " --out {output.catalog:q} {params.local_catalog} --params {params.gaia}"
        " --log {log:q}"
