# Stage 1: download. One pixel cube (zarr) per field, from one of three sources.


from workflow_lib.data.fits_reader import write_local_field
from workflow_lib.data.mast import download_field
from workflow_lib.data.synthetic import write_synthetic_field


rule download_synthetic:
    """Simulate a TESS sector through the real TESS PRF; write the cube, the truth and the
    Gaia-like catalog handed to the crossmatch."""
    output:
        cube=directory(f"{RESULTS}/{{field}}/cube.zarr"),
        truth=directory(f"{RESULTS}/{{field}}/truth.zarr"),
        catalog=f"{RESULTS}/{{field}}/input_catalog.ecsv",
    log:
        rule_log("download_synthetic"),
    benchmark:
        rule_benchmark("download_synthetic")
    wildcard_constraints:
        field=field_regex("synthetic"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        synthetic=lambda w: field_params(w.field, "synthetic"),
    run:
        run_step(
            log,
            write_synthetic_field,
            output.cube,
            output.truth,
            output.catalog,
            params.synthetic,
            field=wildcards.field,
        )


rule download_local:
    """Read local TESScut / TPF FITS files into the cube format."""
    output:
        cube=directory(f"{RESULTS}/{{field}}/cube.zarr"),
    log:
        rule_log("download_local"),
    benchmark:
        rule_benchmark("download_local")
    wildcard_constraints:
        field=field_regex("local"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        local=lambda w: field_params(w.field, "local"),
    run:
        run_step(
            log, write_local_field, params.local, output.cube, field=wildcards.field
        )


rule download_mast:
    """Fetch TESScut cubes / Kepler-K2 TPFs from MAST with astroquery (cached, retried)."""
    output:
        cube=directory(f"{RESULTS}/{{field}}/cube.zarr"),
    log:
        rule_log("download_mast"),
    benchmark:
        rule_benchmark("download_mast")
    wildcard_constraints:
        field=field_regex("mast"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        mast=lambda w: field_params(w.field, "mast"),
        options=config["mast"],
    run:
        run_step(
            log,
            download_field,
            params.mast,
            output.cube,
            field=wildcards.field,
            **params.options,
        )
