"""Survey mode: tiles with halos of a whole (synthetic) CCD, catalog split, per-tile light curves merged.

Known truth: a synthetic 128 x 128 CCD written as SPOC FFIs (data/synthetic_ffi), ingested, crossmatched
once, cut into 4 tiles of 64 px + 8 px halo.  The merge is tested with light-curve sets built from the
truth plus independent noise per tile, where the overlap figure must be ~1.
"""

import json

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table

from workflow_lib.data.cube import CubeError, cube_wcs, open_cube
from workflow_lib.data.gaia import crossmatch, crossmatch_field
from workflow_lib.data.lightcurves import lightcurve_set
from workflow_lib.data.tiles import cut_tile, split_catalog, tile_grid
from workflow_lib.steps.survey import (
    cut_tile_step,
    ingest_ccd,
    merge_tiles_step,
    split_catalog_step,
    survey_table_step,
    write_fits_step,
    write_synthetic_ccd,
    write_tile_grid,
)
from workflow_lib.survey.merge import FLAG_NOT_CORE_TILE, FLAG_OVERLAP, MergeError, merge_tile_sets

N = 128
TILE, MARGIN = 64, 8
IDS = ["r0000c0000", "r0000c0064", "r0064c0000", "r0064c0064"]


@pytest.fixture(scope="module")
def ccd(tmp_path_factory):
    d = tmp_path_factory.mktemp("survey")
    write_synthetic_ccd(
        d / "ffi", d / "input_catalog.ecsv", d / "truth.zarr", {"n_rows": N, "n_cols": N, "n_cadences": 60, "seed": 5}
    )
    ingest_ccd(d / "ffi", d / "cube.zarr")
    crossmatch_field(d / "cube.zarr", d / "catalog.ecsv", {}, local_catalog=str(d / "input_catalog.ecsv"))
    grid = write_tile_grid(d / "cube.zarr", d / "tiles.json", TILE, MARGIN)
    for tid in grid["tile_ids"]:
        cut_tile_step(d / "cube.zarr", d / "tiles.json", tid, d / "tiles" / tid / "cube.zarr")
        split_catalog_step(d / "catalog.ecsv", d / "tiles.json", tid, d / "tiles" / tid / "catalog.ecsv")
    return d


def test_grid_ids_bounds_and_margin_check(ccd):
    grid = json.loads((ccd / "tiles.json").read_text())
    assert grid["tile_ids"] == IDS
    assert (grid["row0"], grid["col0"], grid["n_rows"], grid["n_cols"]) == (1, 45, N, N)
    t = {x["id"]: x for x in grid["tiles"]}
    # CCD coords: rows 1..128, columns 45..172
    assert t["r0000c0064"]["core_row"] == [1, 65] and t["r0000c0064"]["core_column"] == [109, 173]
    assert t["r0000c0064"]["halo_row"] == [1, 73] and t["r0000c0064"]["halo_column"] == [101, 173]
    assert t["r0064c0000"]["halo_row"] == [57, 129] and t["r0064c0000"]["halo_column"] == [45, 117]
    # uneven CCD: the last tile is narrower, cores cover every pixel once
    tl = tile_grid(100, 70, 1, 45, 32, 6)
    cover = np.zeros((100, 70), int)
    for x in tl:
        cover[x["core_row"][0] - 1 : x["core_row"][1] - 1, x["core_column"][0] - 45 : x["core_column"][1] - 45] += 1
    assert (cover == 1).all() and len(tl) == 4 * 3
    with pytest.raises(CubeError, match="PRF reach"):
        tile_grid(128, 128, 1, 45, 64, 3)


def test_cut_tile_values_and_wcs(ccd):
    cube = open_cube(ccd / "cube.zarr")
    grid = json.loads((ccd / "tiles.json").read_text())
    cat = Table.read(ccd / "catalog.ecsv")
    for tile in grid["tiles"]:
        t = open_cube(ccd / "tiles" / tile["id"] / "cube.zarr")  # validates
        (r0, r1), (c0, c1) = tile["halo_row"], tile["halo_column"]
        ref = cube.sel(row=slice(r0, r1 - 1), column=slice(c0, c1 - 1))
        for v in ("flux", "flux_err"):
            np.testing.assert_array_equal(t[v].values, ref[v].values)
            # stored as whole-tile chunks in space (every tile step reads the whole tile)
            assert t[v].encoding["chunks"] == (min(256, t.sizes["time"]), r1 - r0, c1 - c0)
        np.testing.assert_array_equal(t["quality"].values, cube["quality"].values)
        np.testing.assert_array_equal(t["row"].values, np.arange(r0, r1))
        assert t.attrs["tile_id"] == tile["id"]
        assert json.loads(t.attrs["tile_core"]) == {"row": tile["core_row"], "column": tile["core_column"]}
        # WCS shifted: tile index (0, 0) is CCD index (c0 - 45, r0 - 1)
        a = cube_wcs(t).pixel_to_world(3.0, 5.0)
        b = cube_wcs(cube).pixel_to_world(3.0 + c0 - 45, 5.0 + r0 - 1)
        assert a.separation(b).arcsec < 1e-6
        # the crossmatch of the tile cube places sources where the CCD catalog has them
        x = crossmatch(t, Table.read(ccd / "input_catalog.ecsv"), 0.0)
        m = {int(s): i for i, s in enumerate(cat["source_id"])}
        k = np.array([m[int(s)] for s in x["source_id"]])
        np.testing.assert_allclose(np.asarray(x["column"]), np.asarray(cat["column"])[k], atol=1e-6)
        np.testing.assert_allclose(np.asarray(x["row"]), np.asarray(cat["row"])[k], atol=1e-6)


def test_every_source_in_exactly_one_core(ccd):
    cat = Table.read(ccd / "catalog.ecsv")
    assert len(cat) > 500
    count = {int(s): 0 for s in cat["source_id"]}
    for tid in IDS:
        tc = Table.read(ccd / "tiles" / tid / "catalog.ecsv")
        assert tc.meta["tile_id"] == tid
        for s in tc["source_id"][tc["in_core"]]:
            count[int(s)] += 1
        # every source on the halo is in the tile catalog; on_cutout = on the tile
        t = open_cube(ccd / "tiles" / tid / "cube.zarr")
        r, c = np.asarray(cat["row"]), np.asarray(cat["column"])
        on = (
            (r >= t["row"].values[0] - 0.5)
            & (r < t["row"].values[-1] + 0.5)
            & (c >= t["column"].values[0] - 0.5)
            & (c < t["column"].values[-1] + 0.5)
        )
        assert set(cat["source_id"][on]) <= set(tc["source_id"])
        assert set(cat["source_id"][on]) == set(tc["source_id"][tc["on_cutout"]])
    assert set(count.values()) == {1}


def _expected_tile(col, row, grid):
    """Independent of the library: the tile whose halo sides inside the CCD are farthest from the source."""
    best, bd = None, -np.inf
    lo_r, hi_r = grid["row0"] - 0.5, grid["row0"] + grid["n_rows"] - 0.5
    lo_c, hi_c = grid["col0"] - 0.5, grid["col0"] + grid["n_cols"] - 0.5
    for t in grid["tiles"]:
        sides = [
            (t["halo_row"][0] - 0.5, row - (t["halo_row"][0] - 0.5), lo_r),
            (t["halo_row"][1] - 0.5, (t["halo_row"][1] - 0.5) - row, hi_r),
            (t["halo_column"][0] - 0.5, col - (t["halo_column"][0] - 0.5), lo_c),
            (t["halo_column"][1] - 0.5, (t["halo_column"][1] - 0.5) - col, hi_c),
        ]
        d = min([dist for edge, dist, ccd_edge in sides if edge != ccd_edge] or [np.inf])
        if d > bd:
            best, bd = t["id"], d
    return best


def _truth_sets(ccd, *, err_scale=1.0, seed=0, drop=()):
    truth = xr.open_zarr(ccd / "truth.zarr").load()
    tflux = {int(s): truth["flux"].values[i] for i, s in enumerate(truth["source_id"].values)}
    rng = np.random.default_rng(seed)
    sets = {}
    for k, tid in enumerate(IDS):
        if tid in drop:
            continue
        cube = open_cube(ccd / "tiles" / tid / "cube.zarr")
        tc = Table.read(ccd / "tiles" / tid / "catalog.ecsv")
        f0 = np.array([tflux[int(s)] for s in tc["source_id"]])
        sig = 0.01 * np.sqrt(np.abs(f0)) + 1.0
        flux = f0 + sig * rng.normal(size=f0.shape)
        cols = {"source_id": np.asarray(tc["source_id"]), "column": tc["column"], "row": tc["row"]}
        cols["tile_number"] = np.full(len(tc), k)
        cols["cdpp_1h"] = 10000.0 * k + np.arange(len(tc))  # stands for the tile's own CDPP (merge copies it)
        sets[tid] = lightcurve_set(flux, err_scale * sig, cube, cols, method="TRUTH")
    return sets


def test_merge_takes_each_source_once_from_the_deepest_tile(ccd):
    grid = json.loads((ccd / "tiles.json").read_text())
    cat = Table.read(ccd / "catalog.ecsv")
    sets = _truth_sets(ccd)
    merged, table, qa = merge_tile_sets(sets, grid["tiles"], cat, set_name="truth")
    np.testing.assert_array_equal(merged["source_id"].values, np.asarray(cat["source_id"]))
    assert qa["n_measured"] == len(cat) == qa["n_sources"]
    for i in range(len(cat)):
        exp = _expected_tile(float(cat["column"][i]), float(cat["row"][i]), grid)
        assert merged["tile"].values[i] == exp == merged["core_tile"].values[i]
        assert merged["tile_number"].values[i] == IDS.index(exp)
        s = sets[exp]
        j = int(np.flatnonzero(s["source_id"].values == cat["source_id"][i])[0])
        np.testing.assert_array_equal(merged["flux"].values[i], s["flux"].values[j])
    # independent noise, honest errors: the overlap figure is ~1; errors twice too large: ~0.5
    assert qa["n_overlap"] > 100
    assert abs(qa["overlap_consistency"] - 1.0) < 0.08
    assert ((table["truth_flags"] & FLAG_OVERLAP) > 0).sum() == qa["n_overlap"]
    _, _, qa2 = merge_tile_sets(_truth_sets(ccd, err_scale=2.0), grid["tiles"], cat, set_name="truth")
    assert abs(qa2["overlap_consistency"] - 0.5) < 0.05
    assert table.meta["overlap_consistency"]["truth"] == pytest.approx(qa["overlap_consistency"])
    assert "truth_cdpp_1h" in table.colnames


def test_merge_missing_tile_and_mismatched_cadences(ccd):
    grid = json.loads((ccd / "tiles.json").read_text())
    cat = Table.read(ccd / "catalog.ecsv")
    sets = _truth_sets(ccd, drop=("r0000c0000",))
    merged, table, qa = merge_tile_sets(sets, grid["tiles"], cat, set_name="x")
    lost = merged["core_tile"].values == "r0000c0000"
    taken = lost & (merged["tile"].values != "")
    # the halo sources of the missing tile come from a neighbour, flagged; the rest are NaN rows
    assert taken.any() and (~taken & lost).any()
    assert ((merged["flags"].values[taken] & FLAG_NOT_CORE_TILE) > 0).all()
    assert np.isnan(merged["flux"].values[lost & ~taken]).all()
    assert qa["n_measured"] == int((merged["tile"].values != "").sum()) < len(cat)
    bad = _truth_sets(ccd)
    bad["r0064c0064"] = bad["r0064c0064"].isel(time=slice(0, 50))
    with pytest.raises(MergeError, match="cadences"):
        merge_tile_sets(bad, grid["tiles"], cat)


def _written_truth_sets(ccd, seed, tmp_path):
    """:func:`_truth_sets` written as one light-curve zarr per tile under ``tmp_path``; returns (sets, paths)."""
    sets = _truth_sets(ccd, seed=seed)
    paths = {}
    for tid, s in sets.items():
        paths[tid] = tmp_path / tid / "lightcurves.zarr"
        s.to_zarr(paths[tid], zarr_format=3, consolidated=False)
    return sets, paths


def test_merge_tiles_step_files(ccd, tmp_path):
    sets, paths = _written_truth_sets(ccd, 1, tmp_path)
    sub = tmp_path / "merged"
    qa = merge_tiles_step(paths, ccd / "tiles.json", ccd / "catalog.ecsv", sub / "lc.zarr", sub / "lfd.ecsv", "lfd")
    m = xr.open_zarr(sub / "lc.zarr").load()
    t = Table.read(sub / "lfd.ecsv")
    assert m.sizes["source"] == len(t) == len(Table.read(ccd / "catalog.ecsv"))
    assert t.meta["overlap_consistency"]["lfd"] == pytest.approx(qa["overlap_consistency"])
    assert abs(qa["overlap_consistency"] - 1.0) < 0.08
    # the chosen tile's CDPP is copied
    k = np.array([IDS.index(x) for x in t["lfd_tile"]])
    assert (np.floor(np.asarray(t["lfd_cdpp_1h"]) / 10000.0) == k).all()
    sids = [int(x) for x in t["source_id"][:3]]
    files = write_fits_step(sub / "lc.zarr", sub / "fits", "lfd", source_ids=sids)
    assert sorted(p.name for p in files) == sorted(f"lfd_{s}.fits" for s in sids)
    import lightkurve as lk

    lc = lk.read(files[0])
    assert len(lc) == 60 and np.allclose(lc.flux.value, m["flux"].values[0], rtol=1e-6, equal_nan=True)
    both = survey_table_step({"lfd": sub / "lfd.ecsv", "cpm": sub / "lfd.ecsv"}, sub / "sources.ecsv")
    assert "lfd_cdpp_1h" in both.colnames and set(both.meta["overlap_consistency"]) == {"lfd"}


def test_split_catalog_reach_and_off_ccd_sources():
    tiles = tile_grid(128, 128, 1, 45, 64, 8)
    cat = Table()
    cat["source_id"] = np.arange(5)
    cat["column"] = [41.0, 112.0, 120.5, 120.8, 60.0]  # off-CCD (core), halo, at reach, beyond reach, core
    cat["row"] = [10.0, 10.0, 10.0, 10.0, 200.0]  # the last one far above the CCD: the top-left tile's core
    cat["on_cutout"] = [False, True, True, True, False]
    a = split_catalog(cat, tiles[0], reach=4.0)
    assert list(a["source_id"]) == [0, 1, 2]
    assert list(a["in_core"]) == [True, False, False]
    assert list(a["on_cutout"]) == [False, True, False] and list(a["on_ccd"]) == [False, True, True]
    top_left = split_catalog(cat, tiles[2], reach=4.0)
    assert 4 in list(top_left["source_id"][top_left["in_core"]])
    cores = sum(int(4 in list(split_catalog(cat, t)["source_id"][split_catalog(cat, t)["in_core"]])) for t in tiles)
    assert cores == 1
    with pytest.raises(CubeError, match="PRF reach"):
        tile_grid(10, 10, 1, 1, 4, 2)
    with pytest.raises(CubeError):
        cut_tile(xr.Dataset(coords={"pixel": [0]}), tiles[0])


def _raw_aperture_set(cube_path, catalog_path):
    """RAW aperture light curves (cpm.apertures, no de-trending) of a cube: cheap per-tile photometry."""
    from workflow_lib.cpm.apertures import aperture_params, aperture_sums, source_apertures
    from workflow_lib.data.cube import as_pixel_table

    cube = open_cube(cube_path).load()
    table = as_pixel_table(cube, drop_nan=False)
    cat = Table.read(catalog_path)
    aps, meta = source_apertures(cat, table["row"].values, table["column"].values, aperture_params())
    f, e = aperture_sums(table["flux"].values, table["flux_err"].values, aps)
    return lightcurve_set(f, e, cube, meta, method="RAW")


def test_end_to_end_tiles_reproduce_the_whole_ccd(ccd, tmp_path):
    """FFIs -> cube -> catalog -> tiles (files) -> per-tile aperture photometry -> merge_tiles_step equals the
    same photometry of the whole CCD cube for every source on the CCD: positions, WCS, cuts and the merge agree."""
    paths = {}
    for tid in IDS:
        paths[tid] = tmp_path / tid / "raw.zarr"
        _raw_aperture_set(ccd / "tiles" / tid / "cube.zarr", ccd / "tiles" / tid / "catalog.ecsv").to_zarr(
            paths[tid], zarr_format=3, consolidated=False
        )
    qa = merge_tiles_step(
        paths, ccd / "tiles.json", ccd / "catalog.ecsv", tmp_path / "m.zarr", tmp_path / "t.ecsv", "raw"
    )
    m = xr.open_zarr(tmp_path / "m.zarr").load()
    whole = _raw_aperture_set(ccd / "cube.zarr", ccd / "catalog.ecsv")
    pos = {int(s): i for i, s in enumerate(m["source_id"].values)}
    k = np.array([pos[int(s)] for s in whole["source_id"].values])
    assert m["on_ccd"].values[k].all() and whole.sizes["source"] == int(m["on_ccd"].values.sum())
    np.testing.assert_allclose(m["flux"].values[k], whole["flux"].values, rtol=1e-12)
    np.testing.assert_allclose(m["flux_err"].values[k], whole["flux_err"].values, rtol=1e-12)
    np.testing.assert_array_equal(m["aperture_npix"].values[k], whole["aperture_npix"].values)
    # the same pixels in both tiles: sources whose apertures are whole in both agree exactly
    assert qa["n_overlap"] > 50 and qa["overlap_consistency"] == 0.0


def test_merge_without_a_failed_tile(ccd, tmp_path):
    """A failed tile (its light-curve set absent): refused by default; with survey.allow_missing_tiles the
    other tiles are merged, the missing tile is listed in the merged attrs and the table meta, its core
    sources come from neighbours' halos or are NaN rows, and the overview page shows it as missing."""
    from workflow_lib.report.survey import tile_status, write_survey_report

    sets = _truth_sets(ccd, seed=2)
    paths = {}
    for tid, s in sets.items():
        paths[tid] = tmp_path / tid / "lightcurves.zarr"
        s.to_zarr(paths[tid], zarr_format=3, consolidated=False)
    failed = "r0064c0000"
    del paths[failed]
    out = tmp_path / "merged"
    args = (paths, ccd / "tiles.json", ccd / "catalog.ecsv", out / "lfd.zarr", out / "lfd.ecsv", "lfd")
    with pytest.raises(MergeError, match=f"{failed}.*allow_missing_tiles"):
        merge_tiles_step(*args)
    assert not (out / "lfd.zarr").exists()
    qa = merge_tiles_step(*args, params={"allow_missing_tiles": True})
    assert qa["missing_tiles"] == [failed] and qa["n_tiles"] == 3
    m = xr.open_zarr(out / "lfd.zarr")
    assert list(m.attrs["missing_tiles"]) == [failed]
    lost = m["core_tile"].values == failed
    assert lost.any() and not (m["tile"].values == failed).any()
    taken = lost & (m["tile"].values != "")
    assert ((m["flags"].values[taken] & FLAG_NOT_CORE_TILE) > 0).all()
    assert np.isnan(m["flux"].values[lost & ~taken]).all()
    assert qa["n_measured"] == int((m["tile"].values != "").sum()) < m.sizes["source"]
    # the per-CCD table keeps the list per set
    table = survey_table_step({"lfd": out / "lfd.ecsv"}, out / "sources.ecsv")
    assert Table.read(out / "sources.ecsv").meta["missing_tiles"] == {"lfd": [failed]}
    # overview page: the tile's status is "missing" (its field page may exist or not)
    pages = tmp_path / "pages"
    pages.mkdir()
    for tid in IDS:
        (pages / f"{tid}.html").write_text("<html></html>")
    grid = json.loads((ccd / "tiles.json").read_text())
    status = {t["id"]: t for t in tile_status(grid, table, pages, [], {"lfd": [failed]})}
    assert status[failed]["status"] == "missing" and status[failed]["missing_from"] == ["lfd"]
    assert {status[t]["status"] for t in IDS if t != failed} == {"done"}
    (pages / "r0000c0000.html").unlink()
    assert tile_status(grid, table, pages, [], {"lfd": [failed]})[0]["status"] == "failed"
    html = write_survey_report(
        ccd / "cube.zarr",
        ccd / "tiles.json",
        out / "sources.ecsv",
        {"lfd": out / "lfd.zarr"},
        tmp_path / "index.html",
        ccd="ccd",
        tile_pages=pages,
    ).read_text()
    assert '<td class="l st-missing">missing (lfd)</td>' in html


def test_overview_page_shows_tiles_flagged_by_the_ccd_motion(ccd, tmp_path):
    """survey.motion ccd: the overview page takes the CCD's ccd_motion.json (the ccd_motion step's QA, here
    from the synthetic tile offsets of tests/test_ccd_motion.py, one tile with gain 0.85) and shows per tile
    its status in the fit with its gains (hover text of the tile grid, a column of the tile table), the
    flagged tile outlined on the image, and a summary line; without the QA (survey.motion tile) none of it."""
    from test_ccd_motion import make_tiles

    from workflow_lib.core.atomic import save_npz_deterministic
    from workflow_lib.report.page import embedded_sources
    from workflow_lib.report.survey import motion_summary, tile_status
    from workflow_lib.steps.__main__ import main
    from workflow_lib.steps.survey import ccd_motion_step
    from workflow_lib.survey.motion import load_ccd_motion_qa

    bad = "r0000c0064"
    offsets = {}
    tiles, _, _ = make_tiles({bad: 0.85}, E=np.zeros((2, 2)), grid=2, differential_centre=(68.0, 68.0))
    assert sorted(tiles) == IDS  # the synthetic tiles carry this CCD's tile ids
    for tid, d in tiles.items():
        offsets[tid] = tmp_path / "offsets" / f"{tid}.npz"
        offsets[tid].parent.mkdir(exist_ok=True)
        save_npz_deterministic(offsets[tid], d)
    motion_json = tmp_path / "motion" / "ccd_motion.json"
    q = ccd_motion_step(offsets, tmp_path / "motion" / "ccd_motion.npz", motion_json)
    assert q["flagged"] == [bad]
    rec = next(t for t in q["tiles"] if t["tile"] == bad)

    sets, paths = _written_truth_sets(ccd, 4, tmp_path)
    out = tmp_path / "merged"
    merge_tiles_step(paths, ccd / "tiles.json", ccd / "catalog.ecsv", out / "lfd.zarr", out / "lfd.ecsv", "lfd")
    table = survey_table_step({"lfd": out / "lfd.ecsv"}, out / "sources.ecsv")

    # the data the page builds: per tile its motion record, and the summary line
    grid = json.loads((ccd / "tiles.json").read_text())
    qa = load_ccd_motion_qa(motion_json)
    status = {t["id"]: t for t in tile_status(grid, table, None, [], None, qa)}
    m = status[bad]["motion"]
    assert m["status"] == "flagged" and m["flagged"] and not m["in_fit"]
    assert m["gain"] == [rec["gain_column"], rec["gain_row"]] and m["gain"][0] == pytest.approx(0.85, abs=0.02)
    gain_text = (
        f"gain {rec['gain_column']:.3f} ± {rec['gain_err'][0]:.3f} / {rec['gain_row']:.3f} ± {rec['gain_err'][1]:.3f}"
    )
    assert m["text"] == f"flagged; {gain_text} (column / row)"
    assert {status[t]["motion"]["status"] for t in IDS if t != bad} == {"in fit"}
    line = (
        f"CCD motion: 3 of 4 tiles in the fit; flagged: {bad} (gain {rec['gain_column']:.2f} / {rec['gain_row']:.2f})"
    )
    assert motion_summary(qa, list(status.values()))["line"] == line

    # the page, through the step's command line as the rule calls it
    html_path = tmp_path / "report" / "index.html"
    common = ["--cube", str(ccd / "cube.zarr"), "--grid", str(ccd / "tiles.json"), "--table", str(out / "sources.ecsv")]
    common += ["--merged", f"lfd={out / 'lfd.zarr'}", "--ccd", "ccd", "--tile-summaries", "--params", "{}"]
    assert main(["report-survey", *common, "--ccd-motion", str(motion_json), "--out", str(html_path)]) == 0
    html = html_path.read_text()
    assert f'<p id="survey-motion">{line} ' in html
    assert f'<td class="l mo-flagged">flagged; {gain_text} (column / row)</td>' in html
    assert html.count('class="l mo-flagged"') == 1 and "dashed magenta: tiles flagged by the CCD motion fit" in html
    assert '<th class="l">CCD motion</th>' in html
    src = embedded_sources(html)
    assert list(src["ccd_motion_flagged"]["id"]) == [bad]
    hover = dict(zip(src["survey_tiles"]["id"], src["survey_tiles"]["motion"]))
    assert hover[bad] == m["text"] and hover["r0000c0000"].startswith("in fit; gain ")
    assert json.loads(html.split('id="survey-meta">')[1].split("</script>")[0])["ccd_motion"]["flagged"] == [bad]

    # survey.motion tile: no --ccd-motion, the page as before
    assert main(["report-survey", *common, "--out", str(html_path)]) == 0
    html = html_path.read_text()
    assert 'id="survey-motion"' not in html and 'class="l mo-flagged"' not in html
    assert '<th class="l">CCD motion</th>' not in html and "flagged by the CCD motion fit" not in html
    src = embedded_sources(html)
    assert "ccd_motion_flagged" not in src and "motion" not in src["survey_tiles"]


def test_index_page_links_the_ccd_overview(ccd, tmp_path):
    """report-index: a survey CCD's row links its overview page (<ccd>/index.html beside the index) with
    its source count, measured sources per set and missing tiles (from merged/sources.ecsv)."""
    from workflow_lib.report.page import write_index_report

    sets = _truth_sets(ccd, seed=3, drop=("r0064c0064",))
    paths = {}
    for tid, s in sets.items():
        paths[tid] = tmp_path / tid / "lightcurves.zarr"
        s.to_zarr(paths[tid], zarr_format=3, consolidated=False)
    out = tmp_path / "s0001-4-2" / "merged"
    merge_tiles_step(
        paths,
        ccd / "tiles.json",
        ccd / "catalog.ecsv",
        out / "lfd.zarr",
        out / "lfd.ecsv",
        "lfd",
        params={"allow_missing_tiles": True},
    )
    table = survey_table_step({"lfd": out / "lfd.ecsv"}, out / "sources.ecsv")
    html = write_index_report(
        [], tmp_path / "report" / "index.html", run="x", ccds={"s0001-4-2": out / "sources.ecsv"}
    ).read_text()
    assert '<a class="ccd-page" href="s0001-4-2/index.html">s0001-4-2</a>' in html
    n_measured = int((np.asarray(table["lfd_tile"]).astype(str) != "").sum())
    assert f"<td>{len(table)}</td>" in html and f"lfd: {n_measured}" in html
    assert "missing r0064c0064" in html and "1 survey CCD(s)" in html
