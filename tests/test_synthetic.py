"""The embedded synthetic TESS sector: checked against its own truth and slow reference renders."""

import json

import numpy as np
import pytest
from astropy.table import Table

from workflow_lib.data import synthetic as syn
from workflow_lib.data import tess_prf as tp
from workflow_lib.data.cube import cube_wcs, open_cube

SMALL = {"n_rows": 24, "n_cols": 24, "n_cadences": 100, "seed": 7, "gap_days": 0.5, "momentum_dump_days": 0.6}


@pytest.fixture(scope="module")
def small():
    return syn.simulate_sector(SMALL, field="small", return_model=True)


def test_default_params_come_from_schema():
    p = syn.default_params()
    assert p["n_rows"] == 64 and p["n_cadences"] == 1300 and p["koi608"] is True
    with pytest.raises(ValueError, match="n_rowz"):
        syn.fill_params({"n_rowz": 3})


def test_shapes_time_line_and_gap(small):
    cube, truth, cat, model = small
    assert cube["flux"].shape == (100, 24, 24)
    assert cube.attrs["mission"] == "TESS" and cube.attrs["sector"] == 1 and cube.attrs["field"] == "small"
    assert cube.attrs["camera"] == 4 and cube.attrs["ccd"] == 2
    np.testing.assert_array_equal(cube["row"].values, 1000 + np.arange(24))
    t = cube["time"].values
    dt = 30 / 1440
    assert t[0] == pytest.approx(syn.T_START + dt / 2)
    steps = np.diff(t)
    n_gap = round(0.5 / dt)
    big = np.flatnonzero(steps > 1.5 * dt)
    assert big.size == 1  # one downlink gap, at mid-sector
    assert steps[big[0]] == pytest.approx((n_gap + 1) * dt)
    assert abs(big[0] - 50) <= 1
    np.testing.assert_allclose(np.delete(steps, big), dt)
    cad = cube["cadenceno"].values
    assert np.diff(cad)[big[0]] == n_gap + 1 and (np.delete(np.diff(cad), big) == 1).all()
    np.testing.assert_array_equal(truth["time"].values, t)
    assert truth["flux"].shape == (truth.sizes["source"], 100)


def test_quality_flags_at_momentum_dumps(small):
    cube, truth, *_ = small
    t, q = cube["time"].values, cube["quality"].values
    dt = 30 / 1440
    dumps = t[(q & 32) > 0]
    expect = syn.T_START + 0.6 * np.arange(1, 10)
    expect = expect[(expect < t[-1]) & ~((expect > t[49]) & (expect < t[50]))]  # not in the gap
    assert dumps.size == expect.size >= 2
    np.testing.assert_allclose(dumps, expect, atol=dt)
    # the cadence after each dump carries 1024; the gap edges and sector ends carry 8 (Earth point)
    for i in np.flatnonzero(q & 32):
        if i + 1 < q.size and t[i + 1] - t[i] < 1.5 * dt:
            assert q[i + 1] & 1024
    assert q[0] & 8 and q[-1] & 8
    gap = np.flatnonzero(np.diff(t) > 1.5 * dt)[0]
    assert q[gap] & 8 and q[gap + 1] & 8
    # pointing excursion at the dumps: the jump is larger than typical jitter steps
    jit = np.hypot(np.diff(truth["drift_row"].values), np.diff(truth["drift_column"].values))
    assert jit[np.flatnonzero(q & 32)[0]] > np.median(jit)


def test_drift_is_where_params_put_it():
    p = dict(SMALL, jitter_px=0.0, drift_px=0.5, n_cadences=60)
    cube, truth, _ = syn.simulate_sector(p)
    t = truth["time"].values
    dr, dc = truth["drift_row"].values, truth["drift_column"].values
    dumps = (cube["quality"].values & 32) > 0
    ok = ~dumps
    total = np.hypot(dr[ok][-1] - dr[ok][0], dc[ok][-1] - dc[ok][0])
    # the kept cadences span (1 - 1/(2 N)) of the fractional time line at each end
    assert total == pytest.approx(0.5, rel=0.05)
    # smooth quadratic drift: second differences constant, zero at mid-sector
    u = (t - t[0]) / (t[-1] - t[0])
    for d in (dr, dc):
        coef = np.polyfit(u[ok], d[ok], 2)
        np.testing.assert_allclose(np.polyval(coef, u[ok]), d[ok], atol=1e-9)
        assert abs(np.polyval(coef, 0.5)) < 1e-9  # the WCS/catalog epoch is mid-sector: zero offset there


def test_rendering_matches_slow_reference(small):
    """The fast scene renderer against render_prf star by star (independent spline evaluation)."""
    cube, truth, cat, model = small
    rows, cols = cube["row"].values, cube["column"].values
    nr, nc = rows.size, cols.size
    err = cube["flux_err"].values
    for k in (0, 37, 99):
        ref = np.zeros((nr, nc))
        dr, dc = truth["drift_row"].values[k], truth["drift_column"].values[k]
        for i in range(truth.sizes["source"]):
            r, c = truth["row"].values[i], truth["column"].values[i]
            ref += tp.render_prf(r + dr, c + dc, rows, cols, truth["flux"].values[i, k], prf_image=tp.prf_at(r, c))
        yy = (np.arange(nr) - (nr - 1) / 2)[:, None]
        xx = (np.arange(nc) - (nc - 1) / 2)[None, :]
        bkg = (
            truth["background"].values[k]
            + truth["background_grad_row"].values[k] * yy
            + truth["background_grad_column"].values[k] * xx
        )
        diff = model[k] - bkg - ref
        good = np.isfinite(err[k])
        # accurate to a small fraction of the noise in every pixel, including the brightest
        assert np.abs(diff[good] / err[k][good]).max() < 0.05
        assert np.abs(diff).max() < 1e-3 * ref.max()


def test_isolated_star_total_flux():
    """A lone star in an empty, background-free field: pixel sum = its flux at every offset."""
    p = dict(
        SMALL,
        n_rows=40,
        n_cols=40,
        stars_per_sq_pixel=1e-9,
        n_planets=0,
        n_variables=1,
        transient=False,
        koi608=False,
        background_level=0.0,
        scattered_light_amplitude=0.0,
        drift_px=0.4,
        jitter_px=0.05,
    )
    cube, truth, cat, model = syn.simulate_sector(p, return_model=True)
    assert truth.sizes["source"] == 1
    r, c = truth["row"].values[0] - 1000, truth["column"].values[0] - 1000
    inside = min(r, c, 39 - r, 39 - c) > 7  # the whole PRF on the cutout
    tot = model.sum(axis=(1, 2))
    if inside:
        np.testing.assert_allclose(tot, truth["flux"].values[0], rtol=1e-4)
    else:
        np.testing.assert_array_less(tot, truth["flux"].values[0] * 1.0001)
    # same through a scene renderer directly, star in the middle, many offsets
    coef = tp.prf_coefficients_at(1020.3, 1019.6)
    scene = syn.SceneRenderer(40, 40, pad=3, fine=2)
    scene.add_star(None, 20.3, 19.6, 5000.0, prf_coef=coef)
    for d in np.random.default_rng(1).uniform(-0.8, 0.8, (5, 2)):
        assert scene.image(*d).sum() == pytest.approx(5000.0, rel=0.01)
        assert scene.image(*d).sum() == pytest.approx(5000.0, rel=1e-5)


def test_noise_matches_flux_err(small):
    cube, truth, cat, model = small
    f, e = cube["flux"].values, cube["flux_err"].values
    z = (f - model) / e
    good = np.isfinite(z)
    assert np.nanstd(z[good]) == pytest.approx(1.0, abs=0.02)
    assert abs(np.nanmean(z[good])) < 0.02
    # honest: flux_err is photon + read noise of the model
    texp = cube.attrs["exposure_s"]
    n_reads = 0.8 * 1800 / 2
    np.testing.assert_allclose(e[good], np.sqrt(model[good] * texp + n_reads * 10.0**2)[...] / texp, rtol=1e-5)
    # bad pixels are NaN at every cadence
    bad = json.loads(cube.attrs["bad_pixels"])
    assert len(bad) == 3
    for r, c in bad:
        assert np.isnan(cube["flux"].sel(row=r, column=c).values).all()
    assert (~np.isfinite(f)).sum() == 3 * f.shape[0]


def test_determinism_and_seed(small):
    cube, truth, cat, _ = small
    cube2, truth2, cat2 = syn.simulate_sector(SMALL, field="small")
    np.testing.assert_array_equal(cube["flux"].values, cube2["flux"].values)
    np.testing.assert_array_equal(truth["flux"].values, truth2["flux"].values)
    assert cube.attrs == cube2.attrs and truth.attrs == truth2.attrs
    assert all((cat[c] == cat2[c]).all() for c in cat.colnames)
    cube3, truth3, cat3 = syn.simulate_sector(dict(SMALL, seed=8), field="small")
    assert not np.array_equal(truth["row"].values[:5], truth3["row"].values[:5])
    assert not set(cat["source_id"]) & set(cat3["source_id"])


def test_catalog_differs_from_truth_like_gaia(small):
    cube, truth, cat, _ = small
    assert {
        "source_id",
        "ra",
        "dec",
        "pmra",
        "pmdec",
        "parallax",
        "phot_g_mean_flux",
        "phot_g_mean_mag",
        "bp_rp",
        "ref_epoch",
    } <= set(cat.colnames)
    assert (cat["ref_epoch"] == 2016.0).all()
    np.testing.assert_allclose(cat["phot_g_mean_mag"], 25.6874 - 2.5 * np.log10(cat["phot_g_mean_flux"]), atol=1e-9)
    tr = {int(s): i for i, s in enumerate(truth["source_id"].values)}
    idx = np.array([tr[int(s)] for s in cat["source_id"]])
    missing = ~truth["in_catalog"].values
    assert len(cat) == truth.sizes["source"] - missing.sum()
    assert missing.sum() >= 1 and (truth["phot_g_mean_mag"].values[missing] > 18).all()
    # G in the catalog is G-band: close to the true G, not to the TESS magnitude
    g_true = truth["phot_g_mean_mag"].values[idx]
    dg = np.asarray(cat["phot_g_mean_mag"]) - g_true
    assert 0 < np.std(dg) < 0.01
    tmag = truth["tmag"].values[idx]
    assert np.median(g_true - tmag) > 0.3  # T is brighter than G for typical colours
    # the T-G colour relation of Stassun et al. (2019) with ~0.01 mag scatter
    pred = syn.tess_mag_from_gaia(g_true, truth["bp_rp"].values[idx])
    assert np.std(tmag - pred) == pytest.approx(0.01, rel=0.3)
    # truth flux at T (15000 e-/s at T = 10) differs from Gaia's G flux
    np.testing.assert_allclose(truth["flux0"].values, 15000 * 10 ** (-0.4 * (truth["tmag"].values - 10)))
    # astrometric errors of a few mas, not zero
    cosd = np.cos(np.deg2rad(truth["dec"].values[idx]))
    dra = (np.asarray(cat["ra"]) - truth["ra"].values[idx]) * cosd * 3.6e6
    ddec = (np.asarray(cat["dec"]) - truth["dec"].values[idx]) * 3.6e6
    sep = np.hypot(dra, ddec)
    assert 0.1 < np.median(sep) < 5 and sep.max() < 20


def test_catalog_positions_map_to_true_pixels_through_wcs(small):
    """Propagating the catalog by proper motion to mid-sector and through attrs['wcs'] lands on the
    true CCD position (0-based column/row index + corner), to << 1 px."""
    cube, truth, cat, _ = small
    w = cube_wcs(cube)
    epoch = truth.attrs["obs_epoch"]
    dt = epoch - 2016.0
    dec = np.asarray(cat["dec"]) + np.asarray(cat["pmdec"]) * dt / 3.6e6
    ra = np.asarray(cat["ra"]) + np.asarray(cat["pmra"]) * dt / 3.6e6 / np.cos(np.deg2rad(dec))
    x, y = w.all_world2pix(ra, dec, 0)
    tr = {int(s): i for i, s in enumerate(truth["source_id"].values)}
    idx = np.array([tr[int(s)] for s in cat["source_id"]])
    np.testing.assert_allclose(x + 1000, truth["column"].values[idx], atol=0.01)
    np.testing.assert_allclose(y + 1000, truth["row"].values[idx], atol=0.01)
    # 21 arcsec pixels
    assert np.abs(np.linalg.det(w.pixel_scale_matrix)) ** 0.5 * 3600 == pytest.approx(21.0, rel=1e-6)


def test_koi608_pair_and_signals(small):
    cube, truth, cat, _ = small
    ids = list(truth["source_id"].values)
    f, b = ids.index(truth.attrs["koi608_faint"]), ids.index(truth.attrs["koi608_bright"])
    sep = np.hypot(
        truth["row"].values[f] - truth["row"].values[b], truth["column"].values[f] - truth["column"].values[b]
    )
    assert 0.85 < sep < 1.15
    g = truth["phot_g_mean_mag"].values
    assert g[f] - g[b] == pytest.approx(2.0, abs=1e-9) and 16 < g[f] < 17
    assert truth["kind"].values[f] == "eclipsing_binary" and truth["kind"].values[b] == "constant"
    signals = json.loads(truth.attrs["signals"])
    kinds = [s["kind"] for s in signals]
    assert kinds.count("planet") == 3 and kinds.count("eclipsing_binary") == 1 and kinds.count("transient") == 1
    assert kinds.count("rotator") + kinds.count("pulsator") == 8
    flux = truth["flux"].values
    for s in signals:
        i = ids.index(s["source_id"])
        rel = flux[i] / truth["flux0"].values[i]
        if s["kind"] == "planet":
            # the deepest cadence reaches (nearly) the full depth; the rest of the time it's flat
            assert 1 - rel.min() == pytest.approx(s["depth"], rel=0.35)
            assert np.median(rel) == 1.0
        if s["kind"] == "eclipsing_binary":  # primary 40 %, secondary 15 % deep
            assert 0.1 < 1 - rel.min() <= 0.4 + 1e-9 and rel.max() == 1.0
        if s["kind"] == "transient":
            assert g[i] > 17 and (flux[i] - truth["flux0"].values[i]).max() <= s["amplitude"] * 1.0001
    assert (truth["kind"].values == "constant").sum() > 0.8 * truth.sizes["source"]


def test_write_synthetic_field(tmp_path):
    p = dict(SMALL, n_cadences=40, n_rows=16, n_cols=16)
    syn.write_synthetic_field(tmp_path / "c.zarr", tmp_path / "t.zarr", tmp_path / "in.ecsv", p, field="w")
    cube = open_cube(tmp_path / "c.zarr")
    truth = open_cube(tmp_path / "t.zarr", validate=False)
    cat = Table.read(tmp_path / "in.ecsv")
    assert cube["flux"].shape == (40, 16, 16) and cube.attrs["field"] == "w"
    assert json.loads(cube.attrs["provenance"])["step"] == "download_synthetic"
    assert {str(k) for k in truth["kind"].values} >= {"constant", "planet"} and truth.sizes["time"] == 40
    assert cat["source_id"].dtype.kind == "i" and len(cat) > 10
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_default_size_is_crowded():
    """Speed is measured by benchmarks/synthetic_generation.py, not asserted here (shared CI machines)."""
    cube, truth, cat = syn.simulate_sector({"seed": 1})
    assert cube["flux"].shape == (1300, 64, 64)
    on = (
        (truth["row"].values >= 999.5)
        & (truth["row"].values < 1063.5)
        & (truth["column"].values >= 999.5)
        & (truth["column"].values < 1063.5)
    )
    assert 300 < on.sum() < 700  # hundreds of stars on the cutout
    assert (~on).sum() > 50  # and stars just off it
    g = truth["phot_g_mean_mag"].values
    # log N(<G) rises ~0.35 dex/mag
    slope = np.log10((g < 19).sum() / (g < 17).sum()) / 2
    assert 0.25 < slope < 0.45
