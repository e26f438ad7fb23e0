"""Tiny end-to-end run of the whole Snakemake workflow on `.test/config/config.yaml`.

The run happens in a copy of `.test/` (the snakemake-workflows convention: `--directory .test` finds
`config/config.yaml` there), so the repository stays clean.
"""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def snakemake(workdir, *args):
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=step_env())


#: BLAS/OpenMP thread variables. Some LFD results (the motion model's least squares) differ in the last bits
#: with the BLAS thread count; the manifest was made with them unset (OpenBLAS: one thread per core, 2 cores).
#: Earlier tests may leave them set in this process (dask.distributed's nanny sets OMP_NUM_THREADS=1 & co.).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def step_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in THREAD_VARS}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    shutil.copytree(REPO / ".test" / "config", workdir / "config")
    res = snakemake(workdir)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    return workdir


def test_tiny_run_produces_every_stage(tiny_run):
    out = tiny_run / "results" / "ci-tiny"
    assert (out / "tiny" / "cube.zarr").is_dir()
    assert (out / "tiny" / "truth.zarr").is_dir()
    assert (out / "tiny" / "catalog.ecsv").is_file()
    for path in (
        "lfd/edge_model.json",
        "lfd/prf_model.npz",
        "lfd/prf_model.png",
        "lfd/motion_model.npz",
        "lfd/lightcurves.zarr",
        "cpm/default/detrended.zarr",
        "cpm/default/lightcurves.zarr",
        "cpm/sweep_summary.ecsv",
    ):
        assert (out / "tiny" / path).exists(), path
    assert (out / "report" / "index.html").is_file()
    assert (out / "report" / "tiny.html").is_file()
    for rule_dir in (out / "benchmarks").iterdir():
        assert any(rule_dir.iterdir()), f"no benchmark for {rule_dir.name}"
    assert (out / "logs").is_dir()


def test_regularisation_sweep_side_by_side(tiny_run):
    from astropy.table import Table

    out = tiny_run / "results" / "ci-tiny" / "tiny" / "cpm"
    assert (out / "default" / "lightcurves.zarr").is_dir()
    assert (out / "lambda_L_1" / "lightcurves.zarr").is_dir()
    summary = Table.read(out / "sweep_summary.ecsv")
    names = [str(n) for n in summary.columns[0]]
    assert "default" in names and "lambda_L_1" in names, names
    assert any("cdpp" in c for c in summary.colnames), summary.colnames


def test_rerun_has_nothing_to_do(tiny_run):
    res = snakemake(tiny_run, "-n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr


def test_light_curves_open_in_lightkurve_and_are_finite(tiny_run):
    import lightkurve as lk
    import numpy as np
    import xarray as xr

    out = tiny_run / "results" / "ci-tiny" / "tiny"
    lfd = xr.open_zarr(out / "lfd" / "lightcurves.zarr")
    cpm = xr.open_zarr(out / "cpm" / "default" / "lightcurves.zarr")
    assert lfd.sizes["source"] > 10 and cpm.sizes["source"] > 10
    # the CDPP proxy is stored with every light-curve set
    for lcset in (lfd, cpm):
        assert "cdpp_1h" in lcset.coords and "cdpp_6h" in lcset.coords
    assert np.isfinite(lfd["cdpp_1h"].values[np.argmin(lfd["phot_g_mean_mag"].values)])
    bright = int(np.argmin(lfd["phot_g_mean_mag"].values))
    assert np.isfinite(lfd["flux"].values[bright]).all()
    for sub in ("lfd/fits", "cpm/default/fits"):
        files = sorted((out / sub).glob("*.fits"))
        assert files, sub
        lc = lk.read(files[0])
        assert len(lc) == lfd.sizes["time"]
        assert str(lc.flux.unit) == "electron / s"
    # the PRF step's iteration is in the LFD headers: the tiny field's passes never settle, so pass 3 is used
    from astropy.io import fits

    h = fits.getheader(sorted((out / "lfd/fits").glob("*.fits"))[0])
    assert h["PRFCONV"] is False and h["PRFPASS"] == 3


def test_changing_a_cpm_parameter_reruns_only_cpm_and_reports(tiny_run):
    """Params are a rerun trigger: a new lambda_L must not redo the download, crossmatch or LFD."""
    (tiny_run / "config" / "override.yaml").write_text("cpm: {lambda_L: 0.05}\n")
    cfg = tiny_run / "config"
    res = snakemake(tiny_run, "-n", "--configfile", str(cfg / "config.yaml"), str(cfg / "override.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "cpm_detrend" in text
    for rule in ("download_synthetic", "gaia_crossmatch", "edge_model", "prf_model", "motion_model", "flux_solve"):
        assert f"rule {rule}:" not in text and f"\n{rule} " not in text, f"{rule} would rerun"


def test_products_match_the_committed_checksum_manifest(tiny_run):
    """Refactoring must not change results: every zarr/npz array, FITS data unit and field page of the
    tiny run agrees with tests/data/tiny_manifest.json - integers, text and NaN patterns exactly, floats to
    round-off, so another CPU's BLAS kernels pass and a change of method does not (tests/helpers/manifest.py;
    regenerate only on purpose:
    ``python -m tests.helpers.manifest <results/ci-tiny> > tests/data/tiny_manifest.json``)."""
    import json

    from helpers.manifest import compare, manifest

    expected = json.loads((REPO / "tests" / "data" / "tiny_manifest.json").read_text())
    found = manifest(tiny_run / "results" / "ci-tiny")
    diffs = compare(found, expected)
    assert not diffs, "\n".join(diffs[:40])


def test_every_zarr_product_opens_without_a_warning(tiny_run):
    """Zarr stores are declared by their root zarr.json, not as directory() outputs: no Snakemake
    `.snakemake_timestamp` inside a store, and consolidated metadata, so plain `xarray.open_zarr`
    is silent."""
    import warnings

    import xarray as xr

    stores = sorted((tiny_run / "results" / "ci-tiny").rglob("*.zarr"))
    assert len(stores) >= 8, stores
    for store in stores:
        assert not (store / ".snakemake_timestamp").exists(), store
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = xr.open_zarr(store)
            assert ds.sizes, store


def test_rules_run_the_step_command_line(tiny_run):
    """Every job ran `python -m workflow_lib.steps`: its log starts with the step's start line and
    nothing of the step went to Snakemake's own output."""
    logs = sorted((tiny_run / "results" / "ci-tiny" / "logs").rglob("*.log"))
    assert len(logs) >= 10, logs
    for log in logs:
        text = log.read_text()
        assert " INFO workflow_lib: start " in text and " INFO workflow_lib: done " in text, log


@pytest.mark.browser
@pytest.mark.parametrize("width, height", [(1366, 768), (1920, 1080)])
def test_field_page_screenshots(tiny_run, test_output, width, height):
    """The pipeline's own field page in headless Chromium at two common screen sizes, offline: it becomes
    interactive without errors and without requests beyond the folder; the screenshots are saved for
    docs/REPORTS.md (tests/output/report_tiny_<w>x<h>.png)."""
    from helpers.chromium import ARGS, CHROMIUM, skip_without_chromium, sync_playwright

    skip_without_chromium()
    html = tiny_run / "results" / "ci-tiny" / "report" / "tiny.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": width, "height": height}).new_page()
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(html.as_uri())
        page.wait_for_selector("body[data-rpt-ready='1']", timeout=60_000)
        page.wait_for_selector("body[data-rpt-loaded='1']", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(test_output / f"report_tiny_{width}x{height}.png"))
        assert page.evaluate("RPT.errors") == [] and errors == [], errors
        browser.close()
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in requests), requests
    assert (test_output / f"report_tiny_{width}x{height}.png").stat().st_size > 10_000
