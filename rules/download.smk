# Stage 1: download. One pixel cube (zarr) per field, from one of three sources.
# Each rule runs `python -m workflow_lib.steps <step>` (docs/CLI.md); a zarr store is declared by its
# root zarr.json (zarr_store(), rules/common.smk).


rule download_synthetic:
    """Simulate a TESS sector through the real TESS PRF; write the cube, the truth and the
    Gaia-like catalog handed to the crossmatch."""
    output:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        truth=zarr_store(f"{RESULTS}/{{field}}/truth.zarr"),
        catalog=f"{RESULTS}/{{field}}/input_catalog.ecsv",
    log:
        rule_log("download_synthetic"),
    benchmark:
        rule_benchmark("download_synthetic")
    wildcard_constraints:
        field=field_regex("synthetic"),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(20),
    params:
        synthetic=lambda w: json_arg(field_params(w.field, "synthetic")),
    shell:
        "python -m workflow_lib.steps download-synthetic --field {wildcards.field}"
        " --cube {output.cube:q} --truth {output.truth:q} --catalog {output.catalog:q}"
        " --params {params.synthetic} --log {log:q}"


rule download_local:
    """Read local TESScut / TPF FITS files into the cube format."""
    output:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
    log:
        rule_log("download_local"),
    benchmark:
        rule_benchmark("download_local")
    wildcard_constraints:
        field=field_regex("local"),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(20),
    params:
        local=lambda w: json_arg(field_params(w.field, "local")),
    shell:
        "python -m workflow_lib.steps download-local --field {wildcards.field}"
        " --cube {output.cube:q} --params {params.local} --log {log:q}"


rule download_mast:
    """Fetch TESScut cubes / Kepler-K2 TPFs from MAST with astroquery (cached, retried)."""
    output:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
    log:
        rule_log("download_mast"),
    benchmark:
        rule_benchmark("download_mast")
    wildcard_constraints:
        field=field_regex("mast"),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(60),
    params:
        mast=lambda w: json_arg(field_params(w.field, "mast")),
        client=json_arg(config["mast_client"]),
    shell:
        "python -m workflow_lib.steps download-mast --field {wildcards.field}"
        " --cube {output.cube:q} --params {params.mast} --client {params.client}"
        " --log {log:q}"
