"""Survey mode end to end under Snakemake: `.test/config-survey/config.yaml` (a synthetic 128 x 128 CCD of
SPOC FFIs, 4 tiles of 64 px + 8 px halos) from FFI files to the merged per-CCD sets and the overview page.

The run (`survey_ci_run`, tests/conftest.py and tests/helpers/survey_run.py) happens once per session in a
copy of the config dir (like tests/test_pipeline_e2e.py), with single-threaded BLAS; tests/test_slurm.py
compares a SLURM run of the same config with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from helpers.survey_run import CCD, RUN, SETS, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def survey_run(survey_ci_run):
    return survey_ci_run


def out_dir(workdir):
    return workdir / "results" / RUN


def test_products_of_every_stage(survey_run):
    out = out_dir(survey_run)
    ccd = out / CCD
    grid = json.loads((ccd / "tiles.json").read_text())
    assert len(grid["tile_ids"]) >= 4
    assert len(list((ccd / "ffi").glob("*_ffic.fits"))) == 100
    for tile in grid["tile_ids"]:
        tdir = ccd / "tiles" / tile
        for rel in ("cube.zarr", "catalog.ecsv", "lfd/lightcurves.zarr", "cpm/default/lightcurves.zarr"):
            assert (tdir / rel).exists(), (tile, rel)
        # survey.tile_fits false (the default): the tiles' FITS directories exist (declared outputs) and are empty
        for rel in ("lfd/fits", "cpm/default/fits"):
            assert (tdir / rel).is_dir() and not any((tdir / rel).glob("*.fits")), (tile, rel)
        assert (out / "report" / CCD / "tiles" / f"{tile}.html").is_file()
    for s in SETS:
        assert (ccd / "merged" / f"{s}.zarr" / "zarr.json").is_file()
        assert (ccd / "merged" / f"{s}.ecsv").is_file()
    assert (ccd / "merged" / "sources.ecsv").is_file()
    assert (out / "report" / CCD / "index.html").is_file()
    # survey.motion ccd (the default): the overview page shows the CCD motion fit's tile selection
    qa = json.loads((ccd / "motion" / "ccd_motion.json").read_text())
    n_in = sum(t["in_fit"] for t in qa["tiles"])
    html = (out / "report" / CCD / "index.html").read_text()
    assert f'<p id="survey-motion">CCD motion: {n_in} of {qa["n_tiles"]} tiles in the fit; flagged: ' in html
    assert html.count('class="l mo-flagged"') == qa["n_flagged"]


def test_every_on_ccd_source_exactly_once(survey_run):
    import xarray as xr
    from astropy.table import Table

    ccd = out_dir(survey_run) / CCD
    catalog = Table.read(ccd / "catalog.ecsv")
    on_ccd = np.asarray(catalog["on_cutout"], bool)
    want = np.asarray(catalog["source_id"], np.int64)[on_ccd]
    assert want.size > 20
    for s in SETS:
        merged = xr.open_zarr(ccd / "merged" / f"{s}.zarr")
        ids = np.asarray(merged["source_id"].values, np.int64)
        assert ids.size == np.unique(ids).size, f"{s}: a source appears twice"
        for sid in want:
            assert np.count_nonzero(ids == sid) == 1, f"{s}: source {sid} not exactly once"
        # every on-CCD source was measured by some tile and carries the tile it came from
        tiles = np.asarray(merged["tile"].values).astype(str)[np.isin(ids, want)]
        if s == "lfd":
            assert (tiles != "").all(), f"{s}: {np.count_nonzero(tiles == '')} on-CCD sources not measured"
    table = Table.read(ccd / "merged" / "sources.ecsv")
    ids = np.asarray(table["source_id"], np.int64)
    assert ids.size == np.unique(ids).size and np.isin(want, ids).all()


def test_overlap_consistency_is_finite_and_within_errors(survey_run):
    """survey/merge.py: the figure is the median over overlap sources of rms((f1 - f2)/sqrt(e1^2 + e2^2));
    independent measurements with honest errors give ~1, and tiles share their overlap pixels (the photon
    noise cancels), so agreement "within errors" is a figure <= 1 (with 50 % slack for the small sample)."""
    from astropy.table import Table

    table = Table.read(out_dir(survey_run) / CCD / "merged" / "sources.ecsv")
    for s in SETS:
        figure = table.meta["overlap_consistency"][s]
        n = table.meta["n_overlap"][s]
        assert n >= 5, f"{s}: only {n} sources in tile overlaps"
        assert np.isfinite(figure), f"{s}: overlap figure {figure}"
        assert 0 <= figure <= 1.5, f"{s}: overlap figure {figure:.3f} is not within errors"


def test_dry_run_shows_the_tile_jobs(survey_run):
    # nothing left to do after the run; forcing the tile cut shows every per-tile job of the DAG
    res = snakemake(survey_run, "-n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr
    res = snakemake(survey_run, "-n", "--forcerun", "cut_tile")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    grid = json.loads((out_dir(survey_run) / CCD / "tiles.json").read_text())
    for tile in grid["tile_ids"]:
        assert f"tile={tile}" in text, tile
    for rule in ("cut_tile", "edge_model", "flux_solve", "cpm_detrend", "merge_tiles", "report_survey"):
        assert rule in text, rule


def _copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a run directory with its file times and snakemake metadata (a dry run there sees the
    same state)."""
    dest = tmp_path / "run"
    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_dry_run_merges_without_a_failed_tile(survey_run, tmp_path):
    """A tile whose LFD light curves are missing (its flux solve failed) while its directory exists: by
    default the run retries that tile before the merge; with config/allow_missing_tiles.yaml the merge of
    the LFD set goes ahead without it (the CPM merge keeps all tiles) and the tile's jobs are not requested."""
    survey_run = _copy_of(survey_run, tmp_path)  # the shared run stays as it is (tests/conftest.py)
    ccd = out_dir(survey_run) / CCD
    tile = json.loads((ccd / "tiles.json").read_text())["tile_ids"][-1]
    lc = ccd / "tiles" / tile / "lfd" / "lightcurves.zarr"
    aside = [(lc, lc.with_name("aside.zarr")), (ccd / "merged", ccd / "merged-aside")]
    for a, b in aside:
        a.rename(b)
    try:
        default = snakemake(survey_run, "-n")
        cfg = [str(survey_run / "config" / "config.yaml"), str(REPO / "config" / "allow_missing_tiles.yaml")]
        allow = snakemake(survey_run, "-n", "--configfile", *cfg)
    finally:
        for a, b in aside:
            b.rename(a)
    text = default.stdout + default.stderr
    assert default.returncode == 0, text[-3000:]
    assert "rule flux_solve:" in text and f"field={CCD}/tiles/{tile}" in text
    text = allow.stdout + allow.stderr
    assert allow.returncode == 0, text[-3000:]
    assert "rule flux_solve:" not in text and "rule merge_tiles:" in text
    lfd_merge = text[text.index("set=lfd") - 3000 : text.index("set=lfd")]
    assert f"tiles/{tile}/lfd/lightcurves.zarr" not in lfd_merge.split("rule merge_tiles:")[-1]


@pytest.mark.browser
def test_overview_page_in_chromium(survey_run):
    from helpers.chromium import ARGS, CHROMIUM, skip_without_chromium, sync_playwright

    skip_without_chromium()
    from astropy.table import Table

    out = out_dir(survey_run)
    table = Table.read(out / CCD / "merged" / "sources.ecsv")
    bright = int(np.nanargmin(np.asarray(table["phot_g_mean_mag"], float)))
    sid = str(int(table["source_id"][bright]))
    html = out / "report" / CCD / "index.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1200})
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(html.as_uri())
        page.wait_for_selector("body[data-survey-ready='1']", timeout=30_000)
        page.wait_for_timeout(300)
        # the CDPP plot is rendered with every merged source
        assert page.evaluate("Bokeh.documents[0].get_model_by_name('cdpp_vs_g') !== null")
        assert page.evaluate("SURVEY.src.data.sid.length") == len(table)
        n_finite = page.evaluate("SURVEY.src.data.cdpp_lfd.filter(v => v !== null).length")
        assert n_finite > 10
        assert page.locator(".bk-Canvas, canvas").count() >= 2
        # the search box finds a Gaia id, selects it and links its tile's field page
        page.fill("#survey-search", sid)
        page.press("#survey-search", "Enter")
        page.wait_for_function("SURVEY.src.selected.indices.length === 1", timeout=5000)
        assert page.evaluate("SURVEY.src.data.sid[SURVEY.src.selected.indices[0]]") == sid
        href = page.get_attribute("#survey-search-link", "href")
        assert href.startswith("tiles/") and href.endswith(f"#source={sid}")
        assert (html.parent / href.split("#")[0]).is_file()
        # ... and by RA/Dec
        page.fill("#survey-search", f"{float(table['ra'][bright]):.6f} {float(table['dec'][bright]):.6f}")
        page.click("#survey-search-go")
        page.wait_for_timeout(200)
        assert page.evaluate("SURVEY.src.data.sid[SURVEY.src.selected.indices[0]]") == sid
        # a click on a source opens its tile's field page with the source selected
        opened = page.evaluate(
            """(() => { const urls = []; window.open = (u) => urls.push(u);
                 SURVEY.openSource(SURVEY.src.selected.indices[0]); return urls; })()"""
        )
        assert len(opened) == 1 and opened[0].endswith(f".html#source={sid}"), opened
        # every tile is done and linked
        assert page.locator("#survey-tiles .st-done").count() == len(
            json.loads((out / CCD / "tiles.json").read_text())["tile_ids"]
        )
        assert page.locator("a.tile-page").count() >= 4
        assert not errors, errors
        assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in requests), requests
        browser.close()
