"""Field / index report pages: embedded data round-trip, defaults, budgets, tolerance to missing stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table
from astropy.wcs import WCS

from workflow_lib.core import quality  # noqa: E402
from workflow_lib.data.cube import as_pixel_table, concat_stamps, make_cube, open_cube, write_zarr_atomic
from workflow_lib.data.lightcurves import lightcurve_set
from workflow_lib.metrics import add_cdpp
from workflow_lib.report import datafiles as DF
from workflow_lib.report import display as D
from workflow_lib.report import figures as F
from workflow_lib.report import page as R
from workflow_lib.report import products as P
from workflow_lib.steps.lfd import write_lfd_diagnostics

REPO = Path(__file__).resolve().parents[1]

NT, NR, NC = 200, 16, 16
ROW0, COL0 = 100, 200
#: (source_id, row, column, G); ids above 2**53 so JavaScript numbers could not hold them
STARS = [
    (4660000000000000001, 107.3, 207.8, 10.0),  # target: brightest near the centre
    (4660000000000000002, 103.0, 212.0, 12.0),
    (4660000000000000003, 112.0, 202.0, 15.0),
    (4660000000000000004, 98.0, 199.0, 11.0),  # off the pixels (margin)
]


def _quality():
    q = np.zeros(NT, np.int32)
    q[::50] |= 32  # momentum dumps
    q[77] |= 128 | 1  # manual exclude + attitude tweak
    return q


#: LFD background polynomial (order 1: constant, column, row terms) and motion factor slope in tau
LFD_BKG = np.array([20.0, 0.5, -0.3])
MOTION_SLOPE = 0.02


def make_prf():
    """A normalised Gaussian-like (sigma = 1 px) LFD PRF model, fitted to ln PRF = -r^2/2."""
    from workflow_lib.lfd.prf import PRFModel, polar_coordinates, prf_design_matrix, radial_knots

    rk = radial_knots(0.25, 4.0, 8, spacing="sqrt", inner_radius=0.25)
    g = np.linspace(-4, 4, 81)
    X, Y = [a.ravel() for a in np.meshgrid(g, g)]
    keep = np.hypot(X, Y) <= 4
    r, phi = polar_coordinates(X[keep], Y[keep])
    A = prf_design_matrix(r, phi, r_knots=rk, n_phi_knots=8, inner_radius=0.25, degree=3).toarray()
    w = np.linalg.lstsq(A, -(r**2) / 2, rcond=None)[0]
    return PRFModel(w, rk, 8, 0.25, 3, 4.0).normalise()


def write_motion(path: Path, kind: str, time: np.ndarray) -> None:
    """``polynomial``: factor 1 + MOTION_SLOPE * tau for every pair (B-splines sum to one);
    ``shift``: measured scene offsets (scene_offset_column/row); ``junk``: an unknown layout."""
    from workflow_lib.lfd.io import save_motion_model
    from workflow_lib.lfd.motion import MotionModel

    path.parent.mkdir(parents=True, exist_ok=True)
    t0, ts = 0.5 * (time.min() + time.max()), 0.5 * (time.max() - time.min())
    if kind == "junk":
        np.savez(path, drift_row=0.01 * np.arange(time.size), drift_column=-0.02 * np.arange(time.size))
        return
    if kind == "polynomial":
        mm = MotionModel(np.zeros(1), np.linspace(-4, 4, 9), 3, 1, t0, ts)
        nc = mm.spatial_basis(np.zeros(1), np.zeros(1)).shape[1]
        mm.weights = np.column_stack([np.ones(nc), np.full(nc, MOTION_SLOPE)])
        save_motion_model(path, mm, {})
        return
    cx = 0.08 * np.sin(2 * np.pi * (time - t0) / 3.0)
    cy = -0.05 * (time - t0) / ts
    mm = MotionModel(
        np.zeros((1, 1)),
        np.zeros(2),
        3,
        3,
        0.0,
        1.0,
        time_model="shift",
        reg_time=time,
        reg_x=cx,
        reg_y=cy,
        shift_cov=np.zeros((2, 2)),
        shift_range=0.1,
    )
    save_motion_model(path, mm, {"scene_offset_column": cx, "scene_offset_row": cy})


def make_field(
    tmp: Path, *, lfd=True, cpm=True, aperture=None, pixel_table=False, name="fieldA", motion="polynomial"
) -> Path:
    """A small synthetic field directory with every product the report reads."""
    rng = np.random.default_rng(5)
    rows = np.arange(ROW0, ROW0 + NR)
    cols = np.arange(COL0, COL0 + NC)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    time = 1325.0 + 0.02 * np.arange(NT)
    flux = np.full((NT, NR, NC), 20.0)
    for k, (sid, r, c, g) in enumerate(STARS):
        amp = 15000 * 10 ** (-0.4 * (g - 10.0))
        var = 1 + 0.01 * k * np.sin(2 * np.pi * time / (0.7 + k))
        flux += amp * var[:, None, None] * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / 2.0)[None] / (2 * np.pi)
    flux += rng.normal(0, 3.0, flux.shape)
    flux[5, 3, 4] = np.nan
    w = WCS(naxis=2)  # a TESS-like tangent plane, 21 arcsec pixels, rotated
    w.wcs.ctype, w.wcs.crval, w.wcs.crpix = ["RA---TAN", "DEC--TAN"], [30.0, -60.0], [12.5, 11.0]
    w.wcs.cd = np.array([[-0.0058, 0.0006], [0.0006, 0.0058]])
    cube = make_cube(
        flux,
        3.0 + 0.1 * (np.arange(NT) % 7)[:, None, None] + np.zeros_like(flux),  # flux_err varies with time
        _quality(),
        time,
        1000 + np.arange(NT),
        rows,
        cols,
        mission="TESS",
        wcs_header=w.to_header().tostring(sep="\n"),
        attrs={"sector": 1, "camera": 4, "ccd": 2},
    )
    if aperture is not None:
        cube["aperture"] = (("row", "column"), aperture)
    fdir = tmp / name
    if pixel_table:
        other = cube.assign_coords(row=cube["row"] + 300, column=cube["column"] + 300)
        cube = concat_stamps([other, cube])  # the target is on stamp 1
    write_zarr_atomic(cube, fdir / "cube.zarr")
    cat = Table(
        {
            "source_id": np.array([s[0] for s in STARS], np.int64),
            "row": [s[1] for s in STARS],
            "column": [s[2] for s in STARS],
            "phot_g_mean_mag": [s[3] for s in STARS],
            "ra": [30.0 + 0.001 * k for k in range(len(STARS))],
            "dec": [-60.0 - 0.001 * k for k in range(len(STARS))],
            "on_cutout": [True, True, True, False],
        }
    )
    if pixel_table:
        cat["stamp"] = [1, 1, 1, -1]
    cat.write(fdir / "catalog.ecsv", format="ascii.ecsv", overwrite=True)
    ids = cat["source_id"].data
    if lfd:
        f = np.array([1000.0 * (k + 1) + rng.normal(0, 1 + k, NT) for k in range(3)])
        bad = _quality() != 0
        f[:, bad] += 50.0  # flagged cadences must not enter the mean-frame model
        lc = lightcurve_set(
            f,
            np.ones_like(f),
            cube,
            {"source_id": ids[:3], "contamination": [0.01, 0.2, 0.5], "n_pixels": [9, 5, 3]},
            method="LFD",
            attrs={"use_motion": int(motion in ("polynomial", "shift"))},
        )
        bk = LFD_BKG[:, None] + 0.1 * rng.normal(size=(3, NT))
        bk[:, bad] += 100.0
        lc["background"] = (("background_term", "time"), bk)
        write_zarr_atomic(add_cdpp(lc), fdir / "lfd" / "lightcurves.zarr")
        (fdir / "lfd" / "prf_model.png").write_bytes(F.thumbnail_png(np.arange(64.0).reshape(8, 8) + 1, 40))
        make_prf().save(fdir / "lfd" / "prf_model.npz")
        if motion:
            write_motion(fdir / "lfd" / "motion_model.npz", motion, time)
        (fdir / "lfd" / "edge_model.json").write_text(json.dumps({"rows": [1, 2]}))
        write_diagnostics(fdir)
    if cpm:
        d = fdir / "cpm" / "default"
        f = np.array([5.0 * (k + 1) * np.sin(time * (k + 1)) for k in range(4)])
        lc = lightcurve_set(
            f, np.ones_like(f), cube, {"source_id": ids, "cdpp_1h": [100.0, 200.0, 300.0, 400.0]}, method="CPM"
        )
        write_zarr_atomic(lc, d / "lightcurves.zarr")
        raw = lightcurve_set(
            f + 5000, np.ones_like(f), cube, {"source_id": ids, "cdpp_1h": [11.0, 22.0, 33.0, 44.0]}, method="RAW"
        )
        write_zarr_atomic(raw, d / "raw_lightcurves.zarr")
        det = cube.copy()
        det["flux"] = cube["flux"] - cube["flux"].median("time")
        write_zarr_atomic(det, d / "detrended.zarr")
    return fdir


def write_diagnostics(fdir: Path) -> dict:
    """``lfd/diagnostics.npz`` of a field as the LFD step writes it (from its LFD products)."""
    from workflow_lib.lfd.prf import PRFModel

    lfd = fdir / "lfd"
    motion = lfd / "motion_model.npz"
    return write_lfd_diagnostics(
        lfd / "diagnostics.npz",
        open_cube(fdir / "cube.zarr"),
        Table.read(fdir / "catalog.ecsv", format="ascii.ecsv"),
        PRFModel.load(lfd / "prf_model.npz"),
        xr.open_zarr(lfd / "lightcurves.zarr", consolidated=False).load(),
        motion if motion.exists() else None,
    )


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return make_field(tmp_path_factory.mktemp("rpt"))


@pytest.fixture(scope="module")
def page(field, tmp_path_factory):
    fp = P.load_field_products(field)
    out = tmp_path_factory.mktemp("rptpage") / "fieldA.html"
    html, summary = R.build_field_page(fp, data_dir=out.parent / "fieldA_data")
    out.write_text(html)
    return html, summary, fp, R.read_page_data(out)


def page_data(tmp_path, fp, params=None):
    """(html, summary, arrays of the data folder) of a page built in ``tmp_path``."""
    out = tmp_path / f"{fp.field}.html"
    html, summary = R.build_field_page(fp, params, data_dir=out.parent / f"{fp.field}_data")
    out.write_text(html)
    return html, summary, R.read_page_data(out)


def test_quality_decoding():
    assert quality.decode_quality(0, "TESS") == []
    assert quality.decode_quality(32 | 128 | 1, "TESS") == ["AttitudeTweak", "Desat", "ManualExclude"]
    assert quality.decode_quality(16, "Kepler") == ["ZeroCrossing"]
    assert quality.decode_quality(1048576 | 2, "K2") == ["SafeMode", "ThrusterFiring"]
    assert quality.decode_quality(1 << 20, "TESS") == ["Bit21"]
    assert len(quality.TESS_QUALITY_FLAGS) == 16 and len(quality.KEPLER_QUALITY_FLAGS) == 21
    with pytest.raises(ValueError, match="mission"):
        quality.quality_flags("Hubble")


def test_cube_round_trips_exactly_through_the_data_folder(page):
    html, summary, fp, data = page
    src = R.embedded_sources(html)
    meta = R.embedded_meta(html)
    assert meta["n_time"] == NT and meta["n_pix"] == NR * NC and meta["bin_factor"] == 1
    assert "cube_raw" not in src and "lcsets" not in src  # the arrays are in the data folder, not the HTML
    flux = data["cubes"]["raw"]
    assert flux.dtype == np.float32 and flux.size == NR * NC * NT
    cube = fp.cube["flux"].values  # (time, row, column)
    pix = src["pixels"]
    r = np.asarray(pix["row"]) - ROW0
    c = np.asarray(pix["column"]) - COL0
    expect = cube[:, r, c].T
    np.testing.assert_array_equal(flux.reshape(NR * NC, NT), expect)  # NaN positions equal too
    assert np.isnan(flux.reshape(NR * NC, NT)[3 * NC + 4, 5])
    np.testing.assert_array_equal(src["lc"]["time"], fp.cube["time"].values)
    np.testing.assert_array_equal(src["lc"]["cadenceno"], 1000 + np.arange(NT))
    np.testing.assert_array_equal(src["lc"]["quality"], _quality())
    # the image shown first is the middle cadence
    np.testing.assert_array_equal(pix["flux"], cube[meta["initial_cadence"], r, c])  # the frame shown first
    np.testing.assert_array_equal(data["cubes"]["err"], fp.cube["flux_err"].values[:, r, c].T)


def test_data_folder_blocks_split_pixels_and_time(tmp_path):
    """Several pixel groups and time chunks reassemble exactly; every file is one RPT.chunk line."""
    fdir = make_field(tmp_path, lfd=True, cpm=True)
    fp = P.load_field_products(fdir)
    html, _, data = page_data(tmp_path, fp, {"tile": 4, "frame_mb": 0.01})
    d = R.embedded_meta(html)["data"]
    assert len(d["group_size"]) > 4 and d["n_chunks"] > 4 and d["chunk"] * (d["n_chunks"] - 1) < NT
    pix = R.embedded_sources(html)["pixels"]
    r, c = np.asarray(pix["row"]) - ROW0, np.asarray(pix["column"]) - COL0
    np.testing.assert_array_equal(data["cubes"]["raw"], fp.cube["flux"].values[:, r, c].T)
    np.testing.assert_array_equal(data["cubes"]["cpm"], fp.detrended["flux"].values[:, r, c].T.astype(np.float32))
    assert np.all(np.asarray(pix["group"]) < len(d["group_size"]))
    files = sorted((tmp_path / "fieldA_data").iterdir())
    assert all(f.suffix == ".js" for f in files) and not list(tmp_path.glob(".*tmp*"))
    key, vals = DF.read_chunk_file(files[0])
    assert files[0].stem == key and vals.dtype == np.float32
    (tmp_path / "bad.js").write_text("alert(1)")
    with pytest.raises(ValueError, match="bad.js: not a report data file"):
        DF.read_chunk_file(tmp_path / "bad.js")


def test_detrended_cube_and_lightcurve_sets_in_the_data_folder(page):
    html, _, fp, data = page
    src = R.embedded_sources(html)
    pix = src["pixels"]
    r, c = np.asarray(pix["row"]) - ROW0, np.asarray(pix["column"]) - COL0
    det = fp.detrended["flux"].values
    np.testing.assert_array_equal(data["cubes"]["cpm"], det[:, r, c].T.astype(np.float32))
    sets = data["sets"]
    assert set(sets) == {"raw", "lfd", "cpm"}
    lfd, lfd_err = sets["lfd"]
    np.testing.assert_array_equal(lfd[:3], fp.lfd["flux"].values.astype(np.float32))
    np.testing.assert_array_equal(lfd_err[:3], fp.lfd["flux_err"].values.astype(np.float32))
    assert np.isnan(lfd[3]).all()  # the off-cutout source has no LFD light curve
    np.testing.assert_array_equal(sets["cpm"][0], fp.cpm["flux"].values.astype(np.float32))
    s = src["sources"]
    assert s["source_id"] == [str(x[0]) for x in STARS]  # strings: exact beyond 2**53
    np.testing.assert_array_equal(s["contamination"][:3], [0.01, 0.2, 0.5])
    np.testing.assert_array_equal(s["cdpp_cpm"], [100.0, 200.0, 300.0, 400.0])
    np.testing.assert_array_equal(s["cdpp_raw"], [11.0, 22.0, 33.0, 44.0])
    # the LFD set's cdpp_1h as the step stored it (metrics.add_cdpp); each source has 1e-3 relative
    # white noise and 1 h = 2 cadences of 28.8 min, so CDPP ~ 1e6 * 1e-3 / sqrt(2) = 707 ppm
    np.testing.assert_array_equal(s["cdpp_lfd"][:3], fp.lfd["cdpp_1h"].values)
    np.testing.assert_allclose(s["cdpp_lfd"][:3], 1e3 / np.sqrt(2), rtol=0.15)
    assert np.isnan(s["cdpp_lfd"][3])
    # what the page says about a missing light curve: source 3 is off the pixels, in no LFD set
    np.testing.assert_array_equal(s["has_lfd"], [1, 1, 1, 0])
    np.testing.assert_array_equal(s["on_cutout"], [1, 1, 1, 0])
    np.testing.assert_array_equal(s["ra"], 30.0 + 0.001 * np.arange(len(STARS)))
    np.testing.assert_array_equal(s["dec"], -60.0 - 0.001 * np.arange(len(STARS)))


def test_default_aperture_around_target_and_initial_lightcurve(page):
    html, summary, fp, data = page
    src = R.embedded_sources(html)
    meta = R.embedded_meta(html)
    assert meta["target"] == 0 and summary["target_source_id"] == str(STARS[0][0])
    docs = json.dumps(R.embedded_documents(html))
    pix = src["pixels"]
    rows, cols = np.asarray(pix["row"]), np.asarray(pix["column"])
    expect = np.flatnonzero(np.hypot(rows - 107.3, cols - 207.8) <= R.DEFAULTS["aperture_radius"])
    assert expect.size >= 5
    sel = _selected_indices(R.embedded_documents(html), "pixels")
    assert sel == expect.tolist()
    cube = data["cubes"]["raw"].astype(np.float64)
    np.testing.assert_allclose(src["lc"]["flux"], np.nansum(cube[expect], axis=0), rtol=1e-12)
    assert "rpt-fieldA-" in docs


def _selected_indices(docs, name):
    found = []

    def walk(n):
        if isinstance(n, dict):
            if n.get("name") == "ColumnDataSource" and n.get("attributes", {}).get("name") == name:
                found.append(n["attributes"]["selected"]["attributes"]["indices"])
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(docs)
    return found[0]


def test_pipeline_aperture_variable_is_the_default_selection(tmp_path):
    ap = np.zeros((NR, NC), bool)
    ap[2:4, 10:13] = True
    fdir = make_field(tmp_path, lfd=False, cpm=False, aperture=ap)
    html, _ = R.build_field_page(P.load_field_products(fdir))
    src = R.embedded_sources(html)
    sel = _selected_indices(R.embedded_documents(html), "pixels")
    rows = np.asarray(src["pixels"]["row"])[sel] - ROW0
    cols = np.asarray(src["pixels"]["column"])[sel] - COL0
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(zip(*np.nonzero(ap)))


def test_missing_stages_are_skipped(tmp_path):
    fdir = make_field(tmp_path, lfd=False, cpm=False)
    fp = P.load_field_products(fdir)
    assert fp.lfd is None and fp.cpm is None and fp.detrended is None and fp.prf_png is None
    html, summary, data = page_data(tmp_path, fp)
    assert set(data["cubes"]) == {"raw", "err"} and data["sets"] == {}
    assert summary["median_cdpp"] == {"raw": None, "lfd": None, "cpm": None, "dbl": None}
    assert "LFD PRF model" not in html
    # a half-written LFD set is reported, not fatal
    (fdir / "lfd" / "lightcurves.zarr").mkdir(parents=True)
    fp = P.load_field_products(fdir)
    assert fp.lfd is None and any("unreadable" in n for n in fp.notes)
    html, _ = R.build_field_page(fp)
    assert "unreadable light-curve set" in html


def test_pages_are_deterministic(field, tmp_path):
    fp = P.load_field_products(field)
    html, _, _ = page_data(tmp_path / "a", fp)
    html2, _, _ = page_data(tmp_path / "b", fp)
    assert html2 == html
    files = sorted(p.name for p in (tmp_path / "a" / "fieldA_data").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b" / "fieldA_data").iterdir())
    for name in files:
        assert (tmp_path / "a" / "fieldA_data" / name).read_bytes() == (
            tmp_path / "b" / "fieldA_data" / name
        ).read_bytes()
    assert "PRF model" in html2 and "data:image/png;base64," in html2 and "edge_model.json" in html2


def test_pixel_table_shows_the_target_stamp(tmp_path):
    fdir = make_field(tmp_path, lfd=False, cpm=False, pixel_table=True)
    fp = P.load_field_products(fdir)
    assert "pixel" in fp.cube.dims
    html, summary, data = page_data(tmp_path, fp)
    src = R.embedded_sources(html)
    rows = np.asarray(src["pixels"]["row"])
    assert rows.size == NR * NC and rows.min() == ROW0 and rows.max() == ROW0 + NR - 1
    table = as_pixel_table(fp.cube, drop_nan=False)
    idx = np.flatnonzero((table["stamp"].values == 1))
    np.testing.assert_array_equal(data["cubes"]["raw"], table["flux"].values[:, idx].T)


def test_plan_display_budget():
    p = R.report_params({})
    assert D.data_budget_bytes(6000) == 4_500_000_000
    # the goal: 128 x 128 pixels x 20,000 cadences with raw, flux_err and CPM cubes at full resolution
    full = D.plan_display(20000, 128, 128, n_cubes=3, extra_bytes_per_cadence=8 * 600 * 4, params=p)
    assert (full["side_rows"], full["side_cols"], full["bin"]) == (128, 128, 1)
    p = R.report_params({"max_data_mb": 44})  # 33 MB of raw float32
    one = D.plan_display(1300, 64, 64, n_cubes=1, params=p)
    assert (one["side_rows"], one["side_cols"], one["bin"]) == (64, 64, 1) and one["bytes"] == 64 * 64 * 1300 * 4
    two = D.plan_display(1300, 64, 64, n_cubes=2, params=p)
    assert two["bin"] == 1 and two["side_rows"] < 64 and two["bytes"] <= two["budget"]
    assert 1300 * (two["side_rows"] + 1) ** 2 * 8 > two["budget"]  # largest square that fits
    binned = D.plan_display(1300, 64, 64, n_cubes=2, params=R.report_params({"reduce": "bin", "max_data_mb": 44}))
    assert binned["side_rows"] == 64 and binned["bin"] == 2
    long = D.plan_display(40000, 20, 20, params=p)
    assert long["bin"] == 2 and long["side_rows"] == 20
    big = D.plan_display(1300, 200, 300, params=R.report_params({}))
    assert (big["side_rows"], big["side_cols"]) == (128, 128)


def test_binning_numbers():
    a = np.array([[1.0, 3.0, np.nan, 5.0, 7.0]])
    np.testing.assert_array_equal(D.bin_series(a, 2, axis=1), [[2.0, 5.0, 7.0]])
    np.testing.assert_array_equal(D.bin_quality(np.array([1, 4, 0, 0, 8]), 2), [5, 0, 8])


def test_cdpp_is_read_from_the_light_curve_sets(field):
    """The report computes no CDPP: report.cdpp_hours picks the cdpp_<h>h coordinate the science
    step stored (metrics.add_cdpp); a set without it shows none, with a note."""
    fp = P.load_field_products(field)
    html, summary = R.build_field_page(fp, {"cdpp_hours": 6.0})
    s = R.embedded_sources(html)["sources"]
    np.testing.assert_array_equal(s["cdpp_lfd"][:3], fp.lfd["cdpp_6h"].values)
    assert np.isnan(s["cdpp_raw"]).all() and np.isnan(s["cdpp_cpm"]).all()  # the fixture's CPM sets carry cdpp_1h only
    assert "RAW light curves carry no cdpp_6h" in html and "CPM light curves carry no cdpp_6h" in html
    assert summary["cdpp_set"]["sets"] == [] and "CDPP6h LFD [ppm]" in json.dumps(R.embedded_documents(html))


def test_binned_display_of_a_long_series(tmp_path):
    fdir = make_field(tmp_path, lfd=False, cpm=True)
    fp = P.load_field_products(fdir)
    html, summary, data = page_data(tmp_path, fp, {"max_display_cadences": 60})
    src = R.embedded_sources(html)
    meta = R.embedded_meta(html)
    assert meta["bin_factor"] == 4 and meta["n_time"] == 50 and summary["display"]["bin_factor"] == 4
    flux = data["cubes"]["raw"]
    full = fp.cube["flux"].values[:, 0, 0].astype(np.float64)
    np.testing.assert_allclose(flux[0], full.reshape(50, 4).mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(src["lc"]["cadenceno"], 1000 + 4 * np.arange(50))
    q = _quality().reshape(50, 4)
    np.testing.assert_array_equal(src["lc"]["quality"], np.bitwise_or.reduce(q, axis=1))
    cpm, cpm_err = data["sets"]["cpm"]
    np.testing.assert_allclose(cpm, fp.cpm["flux"].values.reshape(len(STARS), 50, 4).mean(axis=2), rtol=1e-5, atol=1e-5)
    # the error of a mean of 4 cadences: sqrt(sum err**2) / 4
    e4 = fp.cpm["flux_err"].values.reshape(len(STARS), 50, 4)
    np.testing.assert_allclose(cpm_err, np.sqrt((e4**2).sum(axis=2)) / 4, rtol=1e-5)
    ecube = fp.cube["flux_err"].values[:, 0, 0].astype(np.float64).reshape(50, 4)
    np.testing.assert_allclose(data["cubes"]["err"][0], np.sqrt((ecube**2).sum(axis=1)) / 4, rtol=1e-5)


def test_cropped_display_is_centred_on_the_target(tmp_path):
    fdir = make_field(tmp_path, lfd=False, cpm=False)
    html, summary = R.build_field_page(P.load_field_products(fdir), {"max_side": 10})
    pix = R.embedded_sources(html)["pixels"]
    rows, cols = np.unique(pix["row"]), np.unique(pix["column"])
    assert rows.size == 10 and cols.size == 10 and summary["display"]["cropped"]
    assert rows.min() <= 107 <= rows.max() and cols.min() <= 208 <= cols.max()
    assert abs(rows.mean() - 107.3) <= 1 and abs(cols.mean() - 207.8) <= 1
    # the whole field, coarse, beside the crop: 16 x 16 px in 2 x 2 blocks (max_side 10), median of good frames
    assert "overview_fig" in json.dumps(R.embedded_documents(html))
    fp = P.load_field_products(fdir)
    ov = D.field_overview(fp.cube, max_side=10)
    assert ov["k"] == 2 and ov["image"].shape == (8, 8) and (ov["row0"], ov["col0"]) == (ROW0, COL0)
    good = np.flatnonzero(_quality() == 0)
    assert good.size > 100  # 100 evenly spaced good frames
    idx = good[np.linspace(0, good.size - 1, 100).round().astype(int)]
    med = np.nanmedian(fp.cube["flux"].values[idx].astype(np.float64), axis=0)
    np.testing.assert_allclose(ov["image"][3, 4], med[6:8, 8:10].mean(), rtol=1e-12)
    assert ov["n_frames"] == 100


def test_write_field_and_index(field, tmp_path):
    out = tmp_path / "report"
    summary = R.write_field_report(field, out / "fieldA.html", out / "fieldA.json", {}, field="fieldA")
    assert (out / "fieldA.html").stat().st_size > 1_000_000  # inline BokehJS
    assert summary["n_sources"] == 4 and summary["n_on_cutout"] == 3 and summary["n_lfd"] == 3
    # medians over one common set: G < 15, on the pixels, in every set -> sources 0 and 1 only
    assert summary["cdpp_set"] == {"n_sources": 2, "mag_limit": 15.0, "sets": ["raw", "lfd", "cpm"]}
    assert summary["median_cdpp"]["cpm"] == 150.0 and summary["median_cdpp"]["raw"] == 16.5
    bench = tmp_path / "benchmarks" / "cpm_detrend"
    bench.mkdir(parents=True)
    (bench / "fieldA.tsv").write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        "12.5\t0:00:12\t321.0\t400\t300\t310\t1\t2\t95.0\t11.0\n"
    )
    rows = P.read_benchmarks(tmp_path / "benchmarks")
    assert rows == [
        {"rule": "cpm_detrend", "target": "fieldA", "s": 12.5, "max_rss": 321.0, "mean_load": 95.0, "cpu_time": 11.0}
    ]
    logs = tmp_path / "logs" / "cpm_detrend"
    logs.mkdir(parents=True)
    (logs / "fieldA.log").write_text(
        "x INFO workflow_lib: done cpm-detrend in 12.4 s, CPU 13.25 s, peak memory 400 MB\n"
    )
    (row,) = P.read_benchmarks(tmp_path / "benchmarks")  # the job's own getrusage figures win
    assert (row["cpu_time"], row["max_rss"], row["s"]) == (13.25, 400.0, 12.5)
    (logs / "fieldA.log").unlink()
    tsv = (bench / "fieldA.tsv").read_text()
    for tile in ("r0000c0000", "r0000c0096"):  # a survey CCD's tile jobs: one row per rule and CCD on the index
        (bench / "ccd1" / "tiles").mkdir(parents=True, exist_ok=True)
        (bench / "ccd1" / "tiles" / f"{tile}_default.tsv").write_text(tsv)
        (tmp_path / "benchmarks" / "cut_tile").mkdir(exist_ok=True)
        (tmp_path / "benchmarks" / "cut_tile" / f"ccd1_{tile}.tsv").write_text(tsv)
    rows = P.read_benchmarks(tmp_path / "benchmarks")
    assert [(r["rule"], r["target"]) for r in rows] == [
        ("cpm_detrend", "ccd1/tiles/r0000c0000_default"),
        ("cpm_detrend", "ccd1/tiles/r0000c0096_default"),
        ("cpm_detrend", "fieldA"),
        ("cut_tile", "ccd1_r0000c0000"),
        ("cut_tile", "ccd1_r0000c0096"),
    ]
    folded = P.tile_job_totals(rows)
    assert [(r["rule"], r["target"]) for r in folded] == [
        ("cpm_detrend", "ccd1: 2 tiles (default)"),
        ("cpm_detrend", "fieldA"),
        ("cut_tile", "ccd1: 2 tiles"),
    ]
    assert (folded[0]["s"], folded[0]["cpu_time"], folded[0]["max_rss"]) == (25.0, 22.0, 321.0)
    R.write_index_report(
        [out / "fieldA.json"],
        out / "index.html",
        config={"run": "t", "report": {"max_side": 64}},
        bench_dir=tmp_path / "benchmarks",
        run="t",
    )
    idx = (out / "index.html").read_text()
    assert 'href="fieldA.html"' in idx and '<span class="n-sources">4</span>' in idx
    assert "<td>12.50</td><td>321.0</td>" in idx and "cpm_detrend" in idx
    assert "ccd1: 2 tiles (default)</td>\n<td>25.00</td><td>321.0</td>\n<td>22.00</td>" in idx
    assert "max_side: 64" in idx and "numpy" in idx and "cpm 150" in idx and "over the same 2 sources" in idx


def test_report_params_and_schema_defaults():
    with pytest.raises(ValueError, match="unknown report option"):
        R.report_params({"colour": "red"})
    with pytest.raises(ValueError, match="reduce"):
        R.report_params({"reduce": "zip"})
    from snakemake.utils import validate

    cfg = {"run": "x", "fields": {"a": {"source": "synthetic"}}}
    validate(cfg, str(REPO / "workflow_lib" / "schema.yaml"))
    assert cfg["report"] == R.DEFAULTS
    with pytest.raises(Exception):
        validate(
            {"run": "x", "fields": {"a": {"source": "synthetic"}}, "report": {"colour": 1}},
            str(REPO / "workflow_lib" / "schema.yaml"),
        )


# ------------------------------------------------------------------ computed panels


def _mean_model_expected(fp, use_motion: bool):
    """Independent dense computation of the mean-frame LFD model (good cadences only)."""
    from workflow_lib.lfd.geometry import background_design

    cube = fp.cube
    flux = cube["flux"].values.reshape(NT, -1).astype(np.float64)
    good = _quality() == 0
    data = np.nanmean(flux[good], axis=0)
    rr, cc = np.meshgrid(cube["row"].values, cube["column"].values, indexing="ij")
    pc, pr = cc.ravel().astype(float), rr.ravel().astype(float)
    t = cube["time"].values
    tau = (t - 0.5 * (t.min() + t.max())) / (0.5 * (t.max() - t.min()))
    fac = 1 + MOTION_SLOPE * tau if use_motion else np.ones(NT)
    model = np.zeros(pc.size)
    for k in range(3):
        sid, r, c, g = STARS[k]
        f = fp.lfd["flux"].values[k]
        model += make_prf().evaluate(pc - c, pr - r) * np.mean((fac * f)[good])
    model += background_design(pc, pr, 1) @ fp.lfd["background"].values[:, good].mean(axis=1)
    return data, model


def test_mean_frame_residual_is_data_minus_model(page):
    html, _, fp, _ = page
    res = fp.mean_residual
    assert res is not None and res["label"] == "with the motion model" and res["n_sources"] == 3
    assert res["n_cadences"] == int((_quality() == 0).sum())
    data, model = _mean_model_expected(fp, use_motion=True)
    assert fp.mean_residual is not None
    np.testing.assert_allclose(res["data"], data, rtol=1e-12)
    np.testing.assert_allclose(res["model"], model, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(res["residual"], res["data"] - res["model"])
    # the model explains the stars to ~ the data's systematic level (the PRF is sigma=1 like the cube's stars)
    emb = R.embedded_sources(html)["residual"]
    pix = R.embedded_sources(html)["pixels"]
    idx = (np.asarray(pix["row"]) - ROW0) * NC + (np.asarray(pix["column"]) - COL0)
    np.testing.assert_array_equal(emb["residual"], res["residual"][idx].astype(np.float32))
    np.testing.assert_array_equal(emb["model"], res["model"][idx].astype(np.float32))
    docs = json.dumps(R.embedded_documents(html), ensure_ascii=False)
    assert "mean frame: LFD model" in docs and "residual: data − LFD model" in docs


def test_mean_frame_residual_static_scene_and_missing_prf(tmp_path):
    fdir = make_field(tmp_path, cpm=False, motion=None)
    fp = P.load_field_products(fdir)
    assert fp.mean_residual["label"] == "static mean scene"
    data, model = _mean_model_expected(fp, use_motion=False)
    np.testing.assert_allclose(fp.mean_residual["model"], model, rtol=1e-9, atol=1e-9)
    (fdir / "lfd" / "diagnostics.npz").unlink()
    fp = P.load_field_products(fdir)
    assert fp.mean_residual is None and any("residual and motion panels skipped" in n for n in fp.notes)
    html, _ = R.build_field_page(fp)
    assert "LFD output missing (diagnostics.npz)" in html and "residual" not in R.embedded_sources(html)


def test_motion_panel_polynomial_model(page):
    html, _, fp, _ = page
    mp = fp.motion_summary  # as the LFD step wrote it
    t = fp.cube["time"].values
    tau = (t - 0.5 * (t.min() + t.max())) / (0.5 * (t.max() - t.min()))
    # every pair has the factor 1 + a tau: mean |change| = 100 a |tau| %, no centroid shift
    np.testing.assert_allclose(mp["change_mean"], 100 * MOTION_SLOPE * np.abs(tau), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mp["pix_a"], 100 * MOTION_SLOPE * tau, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mp["dx"], 0, atol=1e-12)
    np.testing.assert_allclose(mp["dy"], 0, atol=1e-12)
    assert mp["offset_label"].startswith("model centroid shift")
    emb = R.embedded_sources(html)["motion"]
    np.testing.assert_array_equal(emb["time"], t)  # time axis in BTJD, never plotted as an offset
    np.testing.assert_allclose(emb["change_mean"], mp["change_mean"])
    assert "reg_time" not in emb and "weights" not in emb


def test_motion_panel_shift_model_offsets(tmp_path):
    fdir = make_field(tmp_path, cpm=False, motion="shift")
    fp = P.load_field_products(fdir)
    mp = fp.motion_summary
    z = np.load(fdir / "lfd" / "motion_model.npz")
    np.testing.assert_array_equal(mp["dx"], z["scene_offset_column"])
    np.testing.assert_array_equal(mp["dy"], z["scene_offset_row"])
    assert mp["offset_label"] == "measured scene offset"
    # the model's own centroid follows the measured offset (source moves by +c: centroid moves by ~+c)
    for m, c in (("model_dx", z["scene_offset_column"]), ("model_dy", z["scene_offset_row"])):
        slope = np.polyfit(c, mp[m], 1)[0]
        assert 0.6 < slope < 1.2, (m, slope)
    assert np.nanmax(mp["change_mean"]) > 1.0  # a 0.08 px shift changes a sigma=1 PRF by percents


def test_motion_npz_of_unknown_layout_is_a_note(tmp_path):
    fdir = make_field(tmp_path, cpm=False, motion="junk")
    fp = P.load_field_products(fdir)
    assert fp.motion_summary is None and fp.mean_residual["label"] == "static mean scene"
    html, _ = R.build_field_page(fp)
    assert "motion" not in R.embedded_sources(html)
    assert "not a motion model LFD can evaluate" in html and "LFD motion panel skipped" in html


def test_initial_stretch_from_the_frame_shown(tmp_path):
    fdir = make_field(tmp_path, lfd=False, cpm=False)
    fp = P.load_field_products(fdir)
    # a scattered-light ramp: the second half of the sector is 10x brighter
    fp.cube["flux"][NT // 2 :] = fp.cube["flux"][NT // 2 :] * 10
    html, _ = R.build_field_page(fp)
    meta = R.embedded_meta(html)
    frame = fp.cube["flux"].values[meta["initial_cadence"]].ravel()
    lo, hi = np.percentile(frame[np.isfinite(frame)], [1, 95])
    st = meta["stretch"]["raw"]
    assert st["lo"] == pytest.approx(lo, rel=1e-5) and st["hi"] == pytest.approx(hi, rel=1e-5)
    assert st["vlo"] <= st["lo"] < st["hi"] <= st["vhi"]
    assert meta["percentiles"] == [1.0, 95.0]


def test_cdpp_common_set():
    cat = Table({"on_cutout": [True, True, False, True, True]})
    g = np.array([10.0, 14.9, 11.0, 15.0, 12.0])
    m = {"cdpp_raw": np.array([1, 2, 3, 4, np.nan]), "cdpp_lfd": np.ones(5), "cdpp_cpm": np.ones(5)}
    np.testing.assert_array_equal(P.cdpp_common_set(m, cat, g, ["raw", "lfd", "cpm"], 15), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(P.cdpp_common_set(m, cat, g, ["lfd"], 15), [1, 1, 0, 0, 1])


def test_index_versions_fall_back_to_the_package_version(monkeypatch):
    import workflow_lib
    from workflow_lib.core import provenance

    monkeypatch.setattr(provenance, "software_versions", lambda: {"workflow_lib": None, "numpy": "9.9"})
    html = R.build_index_page([], {"run": "x"}, [], "x")
    assert f'<td class="l">workflow_lib</td><td class="l">{workflow_lib.__version__} (source checkout)</td>' in html
    assert "not installed" not in html


def test_initial_cadence_is_a_typical_quality_zero_frame():
    """The page opens on a QUALITY == 0 frame at the typical background, not on a flagged scattered-light
    peak in the middle of the series (issue: a nearly black first image)."""
    nt, npix = 41, 9
    rng = np.random.default_rng(3)
    level = 100.0 + np.linspace(0, 4, nt)  # slow background drift
    level[15:26] += 5000.0  # a scattered-light peak around the middle ...
    quality = np.zeros(nt, np.int64)
    quality[15:26] = 4096  # ... flagged (straylight)
    quality[7] = 1  # a flagged cadence at the typical level is not chosen either
    flux = (level[None, :] + rng.normal(0, 0.01, (npix, nt))).astype(np.float32)
    flux[:, 3] = np.nan  # an empty frame
    disp = D.DisplayCube(
        flux=flux, rows=np.arange(npix), cols=np.zeros(npix), time=np.arange(nt, dtype=float),
        cadenceno=np.arange(nt), quality=quality, bin_factor=1, source_index=np.arange(npix), cropped=False,
        n_time_full=nt,
    )  # fmt: skip
    t0 = D.initial_cadence(disp)
    assert quality[t0] == 0 and np.isfinite(flux[:, t0]).all()
    good = np.flatnonzero((quality == 0) & np.isfinite(flux).all(axis=0))
    assert abs(np.median(flux[:, t0]) - np.median(np.median(flux[:, good], axis=0))) < 0.1  # the typical level
    # every cadence flagged: the middle one
    disp.quality = np.ones(nt, np.int64)
    assert D.initial_cadence(disp) == nt // 2


def test_flagged_sources_are_marked_and_have_no_lfd_cdpp(field):
    """A source the data do not constrain (the LFD set's lfd_flag, core.quality.LfdSourceFlag) is marked in
    the source table and shows no LFD CDPP (an off-cutout source's frozen flux would top the CDPP sort)."""
    from workflow_lib.core.quality import LfdSourceFlag

    fp = P.load_field_products(field)
    flag = np.array([0, int(LfdSourceFlag.OFF_PIXELS | LfdSourceFlag.NONPOSITIVE), 0], np.int32)
    fp.lfd = fp.lfd.assign_coords(lfd_flag=("source", flag))
    html, _ = R.build_field_page(fp)
    s = R.embedded_sources(html)["sources"]
    # the page's order: on the pixels and unflagged (0, 2: by G), flagged (1), off the pixels (3)
    assert s["source_id"] == [str(STARS[k][0]) for k in (0, 2, 1, 3)]
    np.testing.assert_array_equal(np.asarray(s["lfd_flag"], float)[:3], flag[[0, 2, 1]])
    assert np.isnan(s["lfd_flag"][3])  # not in the LFD set
    assert np.isnan(s["cdpp_lfd"][2]) and np.isfinite(s["cdpp_lfd"][[0, 1]]).all()
    np.testing.assert_array_equal(s["on_cutout"], [1, 1, 1, 0])
    assert "LFD flag" in json.dumps(R.embedded_documents(html))


def test_index_links_lead_somewhere(field, tmp_path):
    """A page built on its own has no run-index link (it would lead nowhere); the workflow's pages link the run
    index, and a survey tile's page (report/<ccd>/tiles/<tile>.html) also its CCD's overview, by relative paths
    that resolve to report/index.html and report/<ccd>/index.html."""
    assert R.index_links("fieldA") == [("run index", "index.html")]
    tile = R.index_links("ccd1/tiles/t0_0")
    assert tile == [("run index", "../../index.html"), ("ccd1 overview", "../index.html")]
    page_dir = tmp_path / "report" / "ccd1" / "tiles"
    assert (page_dir / tile[0][1]).resolve() == (tmp_path / "report" / "index.html").resolve()
    alone = R.write_field_report(field, tmp_path / "a" / "fieldA.html", tmp_path / "a" / "fieldA.json", field="fieldA")
    assert alone["field"] == "fieldA" and 'href="index.html"' not in (tmp_path / "a" / "fieldA.html").read_text()
    R.write_field_report(
        field, tmp_path / "b" / "fieldA.html", tmp_path / "b" / "fieldA.json", field="fieldA", link_index=True
    )
    assert '<a href="index.html">&larr; run index</a>' in (tmp_path / "b" / "fieldA.html").read_text()


def test_contamination_is_capped_and_defined(page):
    """The contamination column shows '> 10' above 10 (values reach thousands and Infinity for faint sources
    next to bright ones) and defines itself in the cells' tooltip and above the table."""
    import html as htmllib

    texts = []  # every string in the documents, unescaped (Bokeh escapes their HTML)

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            texts.append(htmllib.unescape(node))

    walk(R.embedded_documents(page[0]))
    template = next(t for t in texts if "value > 10" in t)
    assert template.startswith(f'<span title="{F.CONTAMINATION_HELP}">')  # the tooltip
    assert "(value > 10 ? '&gt; 10' : value.toFixed(3))" in template  # the cap
    assert any(F.CONTAMINATION_HELP in t and "<b>Sources</b>" in t for t in texts)  # the note above the table
