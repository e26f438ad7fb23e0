"""The randomized scene sampler (workflow_lib.data.random_scenes) and the metric code of
benchmarks/randomized_scenes.py, against known answers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from workflow_lib.data import random_scenes as rs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import randomized_scenes as bench  # noqa: E402

SEEDS = range(300)


@pytest.fixture(scope="module")
def specs():
    return [rs.sample_scene(s) for s in SEEDS]


def test_sampler_is_deterministic_per_seed():
    assert json.dumps(rs.sample_scene(5)) == json.dumps(rs.sample_scene(5))
    assert json.dumps(rs.sample_scene(5)) != json.dumps(rs.sample_scene(6))


def _span(vals, lo, hi, frac=0.1):
    """All values in [lo, hi] and both ends of the range reached to within ``frac`` of its width."""
    v = np.asarray(vals, float)
    w = hi - lo
    return v.min() >= lo and v.max() <= hi and v.min() <= lo + frac * w and v.max() >= hi - frac * w


def test_sampler_covers_the_ranges(specs):
    syn = [s["synthetic"] for s in specs]
    R = rs.RANGES
    for key in ("drift_px", "jitter_px", "stars_per_sq_pixel", "background_level", "scattered_light_amplitude"):
        assert _span([x[key] for x in syn], *R[key][:2]), key
    assert _span([x["n_rows"] for x in syn] + [x["n_cols"] for x in syn], *R["side"])
    for key in ("pos_err_mas", "missing_fraction", "colour_scatter"):
        assert _span([s["catalog"][key] for s in specs], *R[key][:2]), key
    pairs = [p for s in specs for p in s["pairs"]]
    for key, rk in (("sep_px", "pair_sep_px"), ("dmag", "pair_dmag"), ("depth", "pair_depth")):
        assert _span([p[key] for p in pairs], *R[rk]), key
    assert {p["eclipsing"] for p in pairs} == {"faint", "bright"}
    assert {len(s["pairs"]) for s in specs} == {1, 2, 3, 4}
    assert {x["n_planets"] for x in syn} == {1, 2, 3, 4}
    assert {x["transient"] for x in syn} == {True, False}
    # the cutout's CCD position (hence its PRF) ranges over the whole 5x5 SPOC grid
    rows = np.array([x["corner_row"] for x in syn])
    cols = np.array([x["corner_col"] for x in syn])
    assert rows.min() < 200 and rows.max() > 1850 and cols.min() < 250 and cols.max() > 1900
    assert (rows + np.array([x["n_rows"] for x in syn]) - 1 <= 2048).all() and (cols >= 45).all()
    # pairs lie inside the cutout
    for s in specs:
        for p in s["pairs"]:
            assert 0 <= p["row"] <= s["synthetic"]["n_rows"] - 1 and 0 <= p["col"] <= s["synthetic"]["n_cols"] - 1


@pytest.fixture(scope="module")
def tiny_scene():
    spec = rs.sample_scene(3)
    spec["synthetic"].update(n_rows=32, n_cols=32, stars_per_sq_pixel=0.05)
    spec["catalog"].update(missing_fraction=0.5, missing_gmin=17.0, pos_err_mas=30.0)
    return spec, rs.simulate_scene(spec, n_cadences=60, field="tiny")


def test_tiny_scene_records_its_truth(tiny_scene):
    spec, (cube, truth, cat) = tiny_scene
    assert cube["flux"].shape == (60, 32, 32)
    assert truth["flux"].shape == (truth.sizes["source"], 60)
    assert json.loads(truth.attrs["scene"])["seed"] == 3
    # the catalog holds exactly the sources flagged in_catalog; ~half the faint constant stars are missing
    sid = set(np.asarray(cat["source_id"]).tolist())
    inc = np.asarray(truth["in_catalog"].values)
    assert sid == set(np.asarray(truth["source_id"].values)[inc].tolist())
    g = np.asarray(truth["phot_g_mean_mag"].values)
    kind = np.array([str(k) for k in truth["kind"].values])
    faint = (g > 17.0) & (kind == "constant") & (np.asarray(truth["pair"].values) < 0)
    assert 0.3 < 1 - inc[faint].mean() < 0.7
    # pairs: both members present, separation and magnitude difference as specified, one eclipses
    pairs = json.loads(truth.attrs["pairs"])
    assert len(pairs) == len(spec["pairs"])
    pos = {int(s): i for i, s in enumerate(truth["source_id"].values)}
    for pm, ps in zip(pairs, spec["pairs"]):
        ib, ifn, ie = pos[pm["bright"]], pos[pm["faint"]], pos[pm["eclipsing"]]
        sep = np.hypot(
            *(
                truth["row"].values[ib] - truth["row"].values[ifn],
                truth["column"].values[ib] - truth["column"].values[ifn],
            )
        )
        assert sep == pytest.approx(ps["sep_px"], abs=1e-9)
        assert g[ifn] - g[ib] == pytest.approx(ps["dmag"])
        assert kind[ie] == "eclipsing_binary"
        f = truth["flux"].values[ie]
        assert f.min() <= f.max() * (1 - 0.5 * ps["depth"]) or f.min() == f.max()  # an eclipse, if one falls in
    # cutout fraction: 1 well inside, 0 far outside, in between at the edge
    frac = np.asarray(truth["cutout_fraction"].values)
    r, c = truth["row"].values - cube["row"].values[0], truth["column"].values - cube["column"].values[0]
    inside = (r > 6) & (r < 25) & (c > 6) & (c < 25)
    np.testing.assert_allclose(frac[inside], 1, atol=2e-3)
    assert (frac[(r < -6.6) | (c < -6.6)] < 0.01).all()
    assert frac.min() > -1e-3 and frac.max() < 1 + 1e-3


def test_tiny_scene_uses_the_full_prf_grid(shared_data, tiny_scene):
    *_, (cube, truth, cat) = tiny_scene
    assert truth.attrs["prf_grid"].endswith("5x5 positions")


# ----------------------------------------------------------------------------- metric code


def _time(n=1200):
    return 1325.3 + np.arange(n) / 48.0


@pytest.mark.parametrize("which", ["lightkurve", "workflow_lib"])
def test_cdpp_of_white_noise(which):
    """1-h (2-cadence) CDPP of white noise of relative rms s: s / sqrt(2) (the 2-d filter removes ~1 %)."""
    est = bench.cdpp_estimator()[0] if which == "lightkurve" else (lambda t, f: bench.wl_cdpp(t, f, 2))
    rng = np.random.default_rng(1)
    t = _time()
    f = 1000.0 * (1 + 1e-3 * rng.standard_normal(t.size))
    assert est(t, f) == pytest.approx(1e3 / np.sqrt(2), rel=0.05)


def test_cdpp_normalisations_of_a_scaled_curve():
    """A curve on 0.65x the true scale: the own-median CDPP is the white-noise value, the true-flux one 0.65x it."""
    est = bench.cdpp_estimator()[0]
    rng = np.random.default_rng(2)
    t = _time()
    true = 5000.0
    f = 0.65 * (true + 5.0 * rng.standard_normal(t.size))
    own, tru = bench.cdpp_pair(est, t, f, true)
    assert own == pytest.approx(1e6 * 1e-3 / np.sqrt(2), rel=0.06)
    assert tru / own == pytest.approx(0.65 * np.median(f / 0.65) / true, rel=1e-9)
    assert np.isnan(bench.cdpp_pair(est, t, -f, true)[0])  # negative median: no CDPP
    white = bench.white_cdpp(est, t, np.full(t.size, 5.0), true, rng)
    assert white == pytest.approx(own, rel=0.08)


def test_flux_error_and_p2p():
    rng = np.random.default_rng(3)
    true = np.full(2000, 1000.0)
    assert bench.abs_flux_error(1.02 * true, true) == pytest.approx(0.02)
    assert bench.abs_flux_error(0.97 * true, true) == pytest.approx(0.03)
    err = np.full(true.size, 4.0)
    f = true + err * rng.standard_normal(true.size)
    assert bench.p2p_over_err(f, true, err) == pytest.approx(1.0, abs=0.05)
    assert bench.p2p_over_err(f, true, err / 2) == pytest.approx(2.0, abs=0.1)


def test_template_snr_recovers_a_box_dip():
    rng = np.random.default_rng(4)
    t = _time(1000)
    tmpl = np.where((t % 3.0) < 0.1, -0.01, 0.0)
    noise = 1e-3
    y = 0.8 * tmpl + noise * rng.standard_normal(t.size)
    wins = bench.signal_windows(t, tmpl, 0.25)
    c, s = bench.template_snr(t, y, tmpl, wins)
    n_in = (tmpl != 0).sum()
    assert s == pytest.approx(noise / (0.01 * np.sqrt(n_in)), rel=0.3)
    assert abs(c - 0.8) < 4 * s
    c0, s0 = bench.template_snr(t, noise * rng.standard_normal(t.size), tmpl, wins)
    assert abs(c0 / s0) < 4


def test_aperture3x3_and_contamination():
    nt, n = 5, 20
    cube = np.full((nt, n, n), 10.0)
    star = np.zeros((n, n))
    star[7:10, 11:14] = [[1, 2, 1], [2, 8, 2], [1, 2, 1]]
    cube += star * np.arange(1, nt + 1)[:, None, None]
    f, e = bench.aperture3x3(cube, np.ones_like(cube), [8.2, 0.0], [11.8, 5.0])
    np.testing.assert_allclose(f[0], 20.0 * np.arange(1, nt + 1))  # sky 10/px removed exactly
    np.testing.assert_allclose(e[0], 3.0)
    assert np.isnan(f[1]).all()  # too close to the edge
    cont = bench.aperture_contamination(
        np.array([5.0, 5.0, 30.0]), np.array([5.0, 5.0, 30.0]), np.array([1.0, 2.0, 1.0])
    )
    np.testing.assert_allclose(cont, [2.0, 0.5, 0.0])


def test_summary_and_targets_on_constructed_scenes():
    """Two constructed scenes: per-scene medians, their median over scenes, ratios and a PASS/FAIL."""
    scenes = []
    for k, (lfd, ap3) in enumerate(((100.0, 150.0), (200.0, 220.0))):
        stars = [
            {
                "G": 14.0,
                "lfd_cdpp_own": lfd,
                "lfd_cdpp_true": lfd,
                "lfd_white_cdpp": lfd,
                "lfd_p2p": 1.0,
                "lfd_abs_err": 0.005,
                "lfd_flux_ratio": 0.97 + 0.02 * k,
                "ap3_cdpp_own": ap3,
                "ap3_cdpp_true": ap3,
                "ap3_p2p": 1.0,
            }
        ]
        scenes.append({"seed": k, "stars": stars, "errors": {}, "counts": {"n_lc": 10}, "n_cadences": 100})
    s = bench.summarize(scenes)
    b = s["bins"]["13-15"]
    assert b["n_stars"] == 2 and b["lfd_cdpp_true"][0] == pytest.approx(150.0)
    assert b["ap3_over_lfd_true"][0] == pytest.approx(0.5 * (1.5 + 1.1))
    assert b["lfd_flux_ratio"][0] == pytest.approx(0.98)  # signed: 0.97 and 0.99 do not cancel to 1
    f = np.array([0.9, 1.1, np.nan, 0.95])
    assert bench.median_flux_ratio(f, np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(0.95)
    res = {name[:3].strip(): ok for name, ok, _ in bench.targets(s)}
    assert res["T1"] == "PASS" and res["T3"] == "PASS" and res["T7"] == "PASS"


# ----------------------------------------------------------------------------- targets pinned on a subset
# The issue-12 targets on two cheap scenes of the 20-scene benchmark (seeds 1 and 2: 58x88 px at density 0.03,
# 33x79 px at density 0.16; 300 cadences; ~75 s together), through the same step functions with the shipped
# defaults. Measured (docs/VALIDATION.md, "The flux scale from the data"): T1, T2, T3, T5, T7, T8, D1 and D3 pass,
# and T4 at G < 15 (0.35 / 0.36 %; 0.91 / 1.79 % before the lattice normalisation, aperture correction and
# unmodelled-light mask); T4 at 15-17 (12.5 % on these scenes' few stars; 1.70 % on the 30) and T6 do not. For those the tests hold the measured level, so a change that makes them
# worse fails here; with the wing term off (lfd.prf.wing_radius 0) the sky excess was 0.48 and 1.11 e-/s/px
# and the G 17-19 abs. flux error 24 %, both caught below.
PINNED_SEEDS = (1, 2)
PINNED_CADENCES = 300


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    base = tmp_path_factory.mktemp("pinned_scenes")
    cfg = bench.scaling.full_config()
    scenes = [bench.run_scene(s, base, cfg, PINNED_CADENCES, 1, log=print) for s in PINNED_SEEDS]
    for sc in scenes:
        assert not sc["errors"], sc["errors"]
    s = bench.summarize(scenes)
    return scenes, s, {name.split()[0]: (ok, measured) for name, ok, measured in bench.targets(s)}


@pytest.mark.parametrize("target", ["T1", "T2", "T3", "T5", "T7", "T8", "D1", "D3"])
def test_pinned_targets_pass(pinned, target):
    ok, measured = pinned[2][target]
    assert ok == "PASS", f"{target}: {measured}"


def test_pinned_absolute_flux_error_and_sky(pinned):
    """T4's 1 % at G < 15 is met; the fainter bins hold the measured level with ~25 % room."""
    scenes, s, _ = pinned
    b = s["bins"]
    err = {n: b[n]["lfd_abs_err"][0] for n in ("G<13", "13-15", "15-17", "17-19")}
    # measured 0.35 / 0.36 / 12.5 / 7.9 % with the lattice normalisation, the aperture correction and the
    # unmodelled-light mask (lfd.prf.lattice_norm, aperture_box, unmodelled_sigma); 0.34 / 0.48 / 12.4 / 11.0
    # % without the mask; before all three 0.91 / 1.79 / 11.3 / 14.4 %; without core terms 0.99 / 2.55 / 10.6
    # / 12.2 %, and without the wing term as well 1.00 / 2.86 / 12.5 / 24.1 %
    assert err["G<13"] < 0.01 and err["13-15"] < 0.01, err  # the target
    assert err["15-17"] < 0.155 and err["17-19"] < 0.10, err
    # the wing term and the unmodelled-light mask keep the flux solve's sky near the truth (0.05 and 0.38
    # e-/s/px; without the mask 0.13, 0.60; without the wing term as well 0.48, 1.11)
    sky = [sc["sky_excess"] for sc in scenes]
    assert max(sky) < 0.5 and np.median(sky) < 0.3, sky
    ratio = b["17-19"]["lfd_flux_ratio"][0]
    assert 0.9 < ratio < 1.1, ratio  # 0.95 (without the mask 0.90, before the aperture correction 0.87)


def test_pinned_pairs_hold_their_measured_false_dips(pinned):
    """T6 (the other member's |false dip| < 1 sigma, median) is met narrowly on the 30 scenes since the fourth
    session of 2026-12-03 (0.97 sigma, 37 of 69 pairs under 1; 1.15 before the third). Here: every eclipse detected, and the median of the five pairs' |false dip| at its
    measured 1.32 sigma with room (0.55 before the lattice normalisation: the 0.93-px pair at eclipse S/N 230
    went from -0.55 to -2.3 sigma, 0.8 % of its depth; docs/VALIDATION.md)."""
    ok, measured = pinned[2]["T6"]
    print(measured)
    detected, total = (int(x) for x in measured.split()[0].split("/"))
    assert detected == total == 5
    dip = float(measured.split("median ")[1].split()[0])
    assert dip < 1.5, measured


def test_pinned_deblended_product_is_on_the_star_flux(pinned):
    """The deblended FLUX (optimal weights, deblend.weighting) is the star's total flux: measured abs. error
    0.25 / 0.41 % and median F / true F 1.002 / 0.997 at G < 13 / 13-15 (the aperture sum it replaced held
    0.9 / 0.6 of the star); D1 passes above (0.92 / 0.94 / 0.96 / 0.99)."""
    b = pinned[1]["bins"]
    for n in ("G<13", "13-15"):
        assert b[n]["deb_abs_err"][0] < 0.01, (n, b[n]["deb_abs_err"])
        assert abs(b[n]["deb_flux_ratio"][0] - 1) < 0.02, (n, b[n]["deb_flux_ratio"])


def test_config_sweep_refuses_a_section_the_scenes_do_not_read(tmp_path):
    """A --config sweep of a section no scene step reads would silently measure the defaults."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("deblend: {faint_neighbour_snr: 60}\nreport: {enabled: false}\n")
    with pytest.raises(SystemExit, match=r"\['report'\] are not used"):
        bench.main(["--scenes", "1", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()  # refused before any scene ran
    assert "deblend" in bench.SWEEP_SECTIONS
