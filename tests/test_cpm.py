"""Tests of workflow_lib.cpm: the fast CPM against a plain reference written from the paper,
bad inputs, apertures, stitching, and de-trending quality on synthetic truth."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from workflow_lib.cpm import (
    apertures,  # noqa: E402
    stitch,  # noqa: E402
)
from workflow_lib.cpm import model as cpm
from workflow_lib.data.cube import CubeError, make_cube
from workflow_lib.steps import cpm as cpm_steps

# ----------------------------------------------------------------------------- reference


def reference_cpm(
    flux, time, rows, cols, *, L, exclusion, lambda_L, lambda_P, degree, k, method="similar_brightness", targets=None
):
    """Slow, plain CPM written from the paper (Hattori et al. 2022), for exactness tests.

    ``flux`` (ntime, npix), every pixel finite and bright (median > scatter).  For every target
    pixel: normalise y* = f/median - 1 (§3.2); choose L predictors outside the exclusion square by
    closest median (or highest cosine similarity) (§3.3.2); X = [predictors, t..t^P, 1]; for each
    of the k contiguous sections solve the ridge system eq. (7) with Λ of eq. (8) on the other
    k-1 sections from scratch and predict the section (§2.3).  Returns (m_sys, m_poly, detrended)
    with detrended = (y* - m_sys) * median + median; only the ``targets`` columns (default all) are filled.
    """
    n, npix = flux.shape
    med = np.median(flux, axis=0)
    ystar = flux / med - 1.0
    t = (time - time.min()) / (time.max() - time.min()) * 2.0 - 1.0
    poly = np.column_stack([t**p for p in range(1, degree + 1)] + [np.ones(n)])
    sections = np.array_split(np.arange(n), k)
    h = exclusion // 2
    m_sys = np.zeros((n, npix))
    m_poly = np.zeros((n, npix))
    for p in range(npix) if targets is None else targets:
        cand = []
        for q in range(npix):
            if abs(rows[q] - rows[p]) > h or abs(cols[q] - cols[p]) > h:
                if method == "similar_brightness":
                    key = abs(med[q] - med[p])
                else:
                    key = -np.dot(ystar[:, q], ystar[:, p]) / np.sqrt(
                        np.dot(ystar[:, q], ystar[:, q]) * np.dot(ystar[:, p], ystar[:, p])
                    )
                cand.append((key, q))
        cand.sort()
        preds = [q for _, q in cand[:L]]
        X = np.column_stack([ystar[:, preds], poly])
        Lp = len(preds)
        lam = np.diag([lambda_L] * Lp + [lambda_P] * degree + [0.0])
        for sec in sections:
            train = np.setdiff1d(np.arange(n), sec)
            Xt = X[train]
            w = np.linalg.solve(Xt.T @ Xt + lam, Xt.T @ ystar[train, p])
            m_sys[sec, p] = X[sec][:, :Lp] @ w[:Lp]
            m_poly[sec, p] = X[sec][:, Lp : Lp + degree] @ w[Lp : Lp + degree]
    detrended = (ystar - m_sys) * med + med
    return m_sys, m_poly, detrended


# ----------------------------------------------------------------------------- synthetic cubes


def systematics_cube(nrow=10, ncol=10, ntime=200, seed=0, noise=1.0, star_flux=None):
    """Image cube: shared smooth systematics (2 modes, pixel-dependent loadings) on bright
    pixels plus white noise; returns (flux (ntime, nrow, ncol), time, truth dict)."""
    rng = np.random.default_rng(seed)
    time = 1325.0 + np.arange(ntime) * (30.0 / 1440.0)
    tt = np.linspace(0, 1, ntime)
    modes = np.stack(
        [np.sin(2 * np.pi * 3 * tt) + 0.5 * tt, np.exp(-(((tt - 0.3) / 0.05) ** 2)) + 0.2 * np.cos(9 * tt)]
    )
    base = rng.uniform(200, 2000, size=(nrow, ncol)) if star_flux is None else star_flux
    load = rng.normal(0.05, 0.02, size=(2, nrow, ncol))
    sys = np.einsum("mt,mrc->trc", modes, load) * base
    flux = base + sys + rng.normal(0, noise, size=(ntime, nrow, ncol)) * np.sqrt(base / 200.0)
    return flux, time, {"base": base, "sys": sys}


def as_cube(flux, time, quality=None, row0=100, col0=200):
    ntime, nrow, ncol = flux.shape
    q = np.zeros(ntime, dtype=np.int32) if quality is None else quality
    return make_cube(
        flux,
        np.ones_like(flux),
        q,
        time,
        np.arange(ntime),
        row0 + np.arange(nrow),
        col0 + np.arange(ncol),
        mission="TESS",
    )


def _relerr(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ["similar_brightness", "cosine_similarity"])
def test_fast_matches_reference_random_cube(method):
    flux, time, _ = systematics_cube(8, 8, 120, seed=3)
    nt = flux.shape[0]
    rows, cols = np.meshgrid(100 + np.arange(8), 200 + np.arange(8), indexing="ij")
    params = cpm.cpm_params(
        n_predictors=20,
        exclusion_size=3,
        lambda_L=0.05,
        lambda_P=0.02,
        k=15,
        scale_k_with_cadence=False,
        predictor_method=method,
    )
    f2 = flux.reshape(nt, -1)
    res = cpm.cpm_detrend_pixels(f2, np.zeros(nt), time, rows.ravel(), cols.ravel(), params, threads=2)
    ms, mp, det = reference_cpm(
        f2,
        time,
        rows.ravel(),
        cols.ravel(),
        L=20,
        exclusion=3,
        lambda_L=0.05,
        lambda_P=0.02,
        degree=3,
        k=15,
        method=method,
    )
    assert _relerr(res["systematics"] / res["scale"], ms) < 1e-8
    assert _relerr(res["polynomial"] / res["scale"], mp) < 1e-8
    assert np.max(np.abs(res["flux"] - det) / det) < 1e-8


def test_fast_matches_reference_pure_noise_no_poly_k_equals_n():
    """Random (structureless) cube, no polynomial, uneven sections and the k = n (leave-one-out) limit."""
    rng = np.random.default_rng(11)
    nt, npix = 61, 30
    flux = 100 + rng.normal(0, 3, size=(nt, npix))
    time = np.arange(nt) * 0.02
    rows = np.arange(npix) // 6
    cols = np.arange(npix) % 6
    for k in (7, nt):
        params = cpm.cpm_params(
            n_predictors=12,
            exclusion_size=1,
            lambda_L=0.5,
            lambda_P=0.0,
            poly_degree=0,
            k=k,
            scale_k_with_cadence=False,
        )
        res = cpm.cpm_detrend_pixels(flux, np.zeros(nt), time, rows, cols, params)
        ms, _, det = reference_cpm(flux, time, rows, cols, L=12, exclusion=1, lambda_L=0.5, lambda_P=0.0, degree=0, k=k)
        assert _relerr(res["systematics"] / res["scale"], ms) < 1e-8
        assert np.allclose(res["flux"], det, rtol=1e-10, atol=0)


def test_heldout_pixel_against_direct_solves():
    """cpm_heldout_pixel (Woodbury) against solving each held-out ridge system directly."""
    rng = np.random.default_rng(5)
    n, L, P = 90, 25, 2
    Xl = rng.normal(size=(n, L))
    T = cpm.poly_basis(np.linspace(0, 3, n), P)
    y = Xl @ rng.normal(size=L) * 0.1 + rng.normal(size=n)
    sec = cpm.section_index(n, 11)
    lam = cpm.regularisation_diag(L, P, 0.3, 0.1)
    m_sys, m_poly, m_off = cpm.cpm_heldout_pixel(Xl, T, y, sec, lam)
    X = np.hstack([Xl, T])
    for j in range(sec.shape[0]):
        s = sec[j][sec[j] < n]
        tr = np.setdiff1d(np.arange(n), s)
        w = np.linalg.solve(X[tr].T @ X[tr] + np.diag(lam), X[tr].T @ y[tr])
        np.testing.assert_allclose(m_sys[s], Xl[s] @ w[:L], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m_poly[s], T[s, :P] @ w[L : L + P], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m_off[s], w[-1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_similar_brightness_window_equals_a_full_sort(ties):
    """The windowed search returns, per target, exactly the first L of a stable argsort of
    |median - median[p]| over all candidates (the paper's rule, §3.3.2), ties included."""
    rng = np.random.default_rng(3)
    rows, cols = np.meshgrid(np.arange(30), np.arange(24), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    med = rng.lognormal(5, 1.5, rows.size)
    if ties:  # runs of ~120 equal medians; a target at +0.5 takes its L from the run below it,
        # where the lowest indices (the winners of a tie) lie farthest from it in the sorted order
        med = rng.integers(0, 6, rows.size) * 100.0 + 0.5 * (rng.random(rows.size) < 0.2)
    valid = rng.random(rows.size) > 0.1
    targets = np.flatnonzero(valid)
    params = cpm.cpm_params(n_predictors=40, exclusion_size=7)
    got, counts = cpm.select_predictors(rows, cols, med, valid, targets, params)
    for i, p in enumerate(targets):
        cidx = np.flatnonzero(valid & ((np.abs(rows - rows[p]) > 3) | (np.abs(cols - cols[p]) > 3)))
        want = cidx[np.argsort(np.abs(med[cidx] - med[p]), kind="stable")[:40]]
        assert counts[i] == want.size
        np.testing.assert_array_equal(got[i, : counts[i]], want)


def test_random_predictors_seeded_and_outside_exclusion():
    rows, cols = np.meshgrid(np.arange(15), np.arange(15), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    med = np.arange(rows.size, dtype=float)
    valid = np.ones(rows.size, bool)
    params = cpm.cpm_params(n_predictors=30, exclusion_size=5, predictor_method="random", seed=7)
    a, ca = cpm.select_predictors(rows, cols, med, valid, np.arange(rows.size), params)
    b, _ = cpm.select_predictors(rows, cols, med, valid, np.arange(rows.size)[::-1], params)
    assert np.array_equal(a, b[::-1])  # per-pixel seeding: independent of chunking / order
    c, _ = cpm.select_predictors(
        rows,
        cols,
        med,
        valid,
        np.arange(rows.size),
        cpm.cpm_params(n_predictors=30, exclusion_size=5, predictor_method="random", seed=8),
    )
    assert not np.array_equal(a, c)
    for p in range(rows.size):
        sel = a[p, : ca[p]]
        assert np.all((np.abs(rows[sel] - rows[p]) > 2) | (np.abs(cols[sel] - cols[p]) > 2))
        assert len(set(sel)) == sel.size


# ----------------------------------------------------------------------------- bad inputs


def test_small_cutout_fewer_predictors_warns():
    flux, time, _ = systematics_cube(9, 9, 60, seed=1)
    params = cpm.cpm_params(k=6, scale_k_with_cadence=False)  # L=256, 11x11 exclusion > 9x9 cube
    with pytest.raises(CubeError, match="fewer than 64 candidate predictor pixels"):
        cpm.cpm_detrend_cube(as_cube(flux, time), params)  # centre pixel: whole cube excluded, no model
    params = cpm.cpm_params(k=6, scale_k_with_cadence=False, exclusion_size=5, n_predictors=64)
    with pytest.warns(cpm.CPMWarning, match="fewer than L=64"):
        out = cpm.cpm_detrend_cube(as_cube(flux, time), params)
    npred = out["cpm_n_predictors"].values
    assert npred.max() == 64 and npred.min() == 81 - 25  # corner: L; centre pixel: all 56 candidates
    assert np.isfinite(out["flux"].values).all()


def test_all_nan_pixel_gives_nan_with_warning():
    flux, time, _ = systematics_cube(8, 8, 80, seed=2)
    flux[:, 2, 3] = np.nan
    params = cpm.cpm_params(n_predictors=10, exclusion_size=3, k=8, scale_k_with_cadence=False)
    with pytest.warns(cpm.CPMWarning, match="all-NaN"):
        out = cpm.cpm_detrend_cube(as_cube(flux, time), params)
    f = out["flux"].values
    assert np.isnan(f[:, 2, 3]).all()
    f[:, 2, 3] = 0
    assert np.isfinite(f).all()


def test_single_cadence_is_a_clear_error():
    flux, time, _ = systematics_cube(6, 6, 1, seed=2)
    with pytest.raises(CubeError, match="1 cadence"):
        cpm.cpm_detrend_cube(as_cube(flux, time), cpm.cpm_params())
    flux, time, _ = systematics_cube(6, 6, 20, seed=2)
    q = np.full(20, 32, dtype=np.int32)
    q[3] = 0
    with pytest.raises(CubeError, match="usable cadence"):
        cpm.cpm_detrend_cube(as_cube(flux, time, q), cpm.cpm_params())


def test_quality_cadences_dropped_and_k_scaled():
    flux, time, _ = systematics_cube(8, 8, 100, seed=4)
    q = np.zeros(100, dtype=np.int32)
    q[[10, 50]] = 32  # momentum dumps (in the default hard bitmask)
    q[70] = 4096  # straylight bit 4096 is in the hard mask too
    q[80] = 1 << 20  # not in the hard mask
    flux[10] += 500
    params = cpm.cpm_params(n_predictors=10, exclusion_size=3, k=10, scale_k_with_cadence=False)
    out = cpm.cpm_detrend_cube(as_cube(flux, time, q), params)
    f = out["flux"].values
    assert np.isnan(f[[10, 50, 70]]).all() and np.isfinite(f[80]).all()
    assert cpm.effective_k(cpm.CPMParams(), np.arange(0, 10, 10 / 1440), 10000) == 450  # 10-min data: 3x sections
    assert cpm.effective_k(cpm.CPMParams(), np.arange(0, 10, 30 / 1440), 100) == 100  # capped at n


def test_pixel_table_matches_image_layout():
    from workflow_lib.data.cube import as_pixel_table

    flux, time, _ = systematics_cube(8, 8, 90, seed=6)
    cube = as_cube(flux, time)
    params = cpm.cpm_params(n_predictors=15, exclusion_size=3, k=9, scale_k_with_cadence=False)
    img = cpm.cpm_detrend_cube(cube, params)
    tab = cpm.cpm_detrend_cube(as_pixel_table(cube).isel(pixel=slice(None, None, -1)), params)
    a = img["flux"].values.reshape(90, -1)[:, ::-1]
    np.testing.assert_allclose(tab["flux"].values, a, rtol=1e-5)


# ----------------------------------------------------------------------------- stitching, apertures


def test_stitch_recovers_offset():
    rng = np.random.default_rng(0)
    t1 = np.linspace(0, 27, 1200)
    t2 = np.linspace(28, 55, 1200)

    def f(t):  # a linear astrophysical trend across both sectors
        return 1000 + 2.0 * t

    f1 = f(t1) + rng.normal(0, 0.5, t1.size)
    f2 = f(t2) - 137.0 + rng.normal(0, 0.5, t2.size)
    t, s, off = stitch.stitch_sectors([t1, t2], [f1, f2])
    assert abs(off[1] - 137.0) < 0.5
    np.testing.assert_allclose(s[1200:], f2 + off[1])


def test_source_apertures_radius_by_brightness():
    from astropy.table import Table

    rows, cols = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    cat = Table(
        {
            "source_id": [1, 2, 3],
            "row": [5.0, 12.2, 30.0],
            "column": [5.0, 11.9, 3.0],
            "phot_g_mean_mag": [9.0, 15.0, 10.0],
            "on_cutout": [True, True, False],
        }
    )
    aps, meta = apertures.source_apertures(
        cat, rows.ravel(), cols.ravel(), apertures.ApertureParams(), user_apertures={"mine": [[1, 1], [1, 2]]}
    )
    assert list(meta["source_id"]) == [1, 2, -1]
    assert meta["aperture_npix"][0] == 29  # r = 3 px around a pixel centre: 29 pixel centres
    assert meta["aperture_npix"][1] == 3  # faint: r = 1 px around (12.2, 11.9): (12,12), (12,11), (13,12)
    assert meta["aperture_npix"][2] == 2
    with pytest.raises(CubeError, match="not on the cube"):
        apertures.source_apertures(
            None, rows.ravel(), cols.ravel(), apertures.ApertureParams(), user_apertures={"x": [[50, 50]]}
        )


# ----------------------------------------------------------------------------- quality on synthetic truth


def evaluate_truth(cube, truth, cpm_lc, raw_lc, *, tmag_range=(9.0, 14.5), max_contamination=0.1):
    """De-trending quality of CPM aperture light curves against the synthetic sector's truth.

    Returns a dict: per-star 1-h CDPP of isolated constant stars (raw, CPM, white-noise floor),
    transit-depth ratios CPM/RAW per planet, and the supernova peak ratio observed/expected
    (expected = injected additive flux x the PRF fraction inside the aperture at peak time).
    """
    from workflow_lib.core.quality import HARD_BITMASK
    from workflow_lib.data.tess_prf import render_prf
    from workflow_lib.metrics import template_amplitude, white_noise_cdpp

    time = cpm_lc["time"].values
    good = (cpm_lc["quality"].values.astype(np.int64) & HARD_BITMASK["TESS"]) == 0
    tsid = truth["source_id"].values
    tindex = {int(s): i for i, s in enumerate(tsid)}
    trow, tcol = truth["row"].values, truth["column"].values
    tflux0 = np.median(truth["flux"].values, axis=1)
    kinds = np.array([str(x) for x in truth["kind"].values])
    tmag = truth["tmag"].values
    out = {"constant": [], "transits": [], "transient": None}
    sids = cpm_lc["source_id"].values
    for s, sid in enumerate(sids):
        i = tindex.get(int(sid))
        if i is None or kinds[i] != "constant" or not (tmag_range[0] <= tmag[i] <= tmag_range[1]):
            continue
        rad = float(cpm_lc["aperture_radius"].values[s]) + 2.0
        near = np.hypot(trow - trow[i], tcol - tcol[i]) < rad
        near[i] = False
        if tflux0[near].sum() > max_contamination * tflux0[i]:
            continue
        rf, re_ = raw_lc["flux"].values[s], raw_lc["flux_err"].values[s]
        out["constant"].append(
            {
                "source_id": int(sid),
                "tmag": float(tmag[i]),
                "cdpp_raw": float(raw_lc["cdpp_1h"].values[s]),
                "cdpp_cpm": float(cpm_lc["cdpp_1h"].values[s]),
                "floor": white_noise_cdpp(time[good], rf[good], re_[good], 1.0, seed=int(sid) % 2**32),
            }
        )
    rows, cols = cube["row"].values, cube["column"].values
    rr, cc = np.meshgrid(rows, cols, indexing="ij")

    def aperture_fraction(i, s, k):
        """PRF fraction of truth source i inside the aperture of light curve s at cadence k."""
        r0, c0 = float(cpm_lc["row"].values[s]), float(cpm_lc["column"].values[s])
        d = np.hypot(rr - r0, cc - c0)
        ap = d <= float(cpm_lc["aperture_radius"].values[s])
        if not ap.any():
            ap = d == d.min()
        img = render_prf(trow[i] + truth["drift_row"].values[k], tcol[i] + truth["drift_column"].values[k], rows, cols)
        return float(img[ap].sum())

    signals = json.loads(truth.attrs["signals"])
    pos = {int(x): k for k, x in enumerate(sids)}
    for sig in signals:
        s = pos.get(int(sig["source_id"]))
        if s is None:
            continue
        i = tindex[int(sig["source_id"])]
        if sig["kind"] == "planet":
            template = truth["flux"].values[i] - np.max(truth["flux"].values[i])
            n0 = np.floor((time[0] - sig["t0"]) / sig["period"])
            tcs = sig["t0"] + sig["period"] * np.arange(n0, n0 + 60)
            tcs = tcs[(tcs > time[0]) & (tcs < time[-1])]
            half = sig["duration"] / 2 + 0.5
            windows = [
                (tc - half, tc + half) for tc in tcs if (good & (np.abs(time - tc) < sig["duration"] / 2)).sum() >= 2
            ]
            if not windows:
                continue
            eps = aperture_fraction(i, s, len(time) // 2)
            c_cpm = template_amplitude(time, cpm_lc["flux"].values[s], template, windows, good=good)
            c_raw = template_amplitude(time, raw_lc["flux"].values[s], template, windows, good=good)
            out["transits"].append(
                {
                    "source_id": int(sig["source_id"]),
                    "depth": sig["depth"],
                    "tmag": float(tmag[i]),
                    "n_transits": len(windows),
                    "depth_ratio": c_cpm / eps,
                    "raw_depth_ratio": c_raw / eps,
                }
            )
        elif sig["kind"] == "transient":
            f_true = truth["flux"].values[i]
            sn = (
                f_true - np.median(f_true[time < sig["t0"] - 0.5])
                if (time < sig["t0"] - 0.5).any()
                else f_true - f_true.min()
            )
            kpk = int(np.argmax(np.where(good, sn, -np.inf)))
            eps = aperture_fraction(i, s, kpk)
            f = cpm_lc["flux"].values[s]
            pre = good & (time < sig["t0"] - 0.5) & np.isfinite(f)
            base = np.median(f[pre]) if pre.sum() > 10 else np.nan
            near = good & np.isfinite(f) & (np.abs(time - time[kpk]) < 0.25)
            obs = float(np.median(f[near]) - base)
            exp = float(eps * np.median(sn[near]))
            out["transient"] = {
                "source_id": int(sig["source_id"]),
                "eps": eps,
                "observed_peak": obs,
                "expected_peak": exp,
                "peak_ratio": obs / exp,
            }
    return out


def summarize_quality(q):
    c = q["constant"]
    s = {
        "n_constant": len(c),
        "median_raw_over_cpm_1h": float(np.median([x["cdpp_raw"] / x["cdpp_cpm"] for x in c])) if c else np.nan,
        "median_cpm_over_floor_1h": float(np.median([x["cdpp_cpm"] / x["floor"] for x in c])) if c else np.nan,
        "transit_depth_ratios": [round(x["depth_ratio"], 3) for x in q["transits"]],
        "transient_peak_ratio": q["transient"]["peak_ratio"] if q["transient"] else np.nan,
    }
    return s


def scene_cube(seed=0, size=24, ntime=700):
    """A small crowded cutout with pixel-level systematics of known truth (cheap stand-in for the
    synthetic sector): Gaussian-PSF stars moved by a smooth drift + jitter, a scattered-light ramp,
    photon noise; a transiting planet on the central star (index 0), a Bazin supernova (index 1)
    and constant stars.  Returns (cube, info) with the exact expected aperture signals."""
    rng = np.random.default_rng(seed)
    t = 1325.0 + np.arange(ntime) * 30 / 1440
    u = (t - t[0]) / (t[-1] - t[0])
    drow = 0.25 * (u - 0.5) ** 2 * 4 - 0.1 + 0.02 * rng.standard_normal(ntime)
    dcol = 0.3 * np.sin(2 * np.pi * u) + 0.02 * rng.standard_normal(ntime)
    nstar = 70
    pos = rng.uniform(0, size - 1, size=(nstar, 2))
    pos[0] = (size / 2, size / 2)
    pos[1] = (size / 2 - 5.3, size / 2 + 6.2)
    pos[2] = (5.2, 4.6)
    f0 = 10 ** rng.uniform(2.3, 4.0, nstar)
    f0[0], f0[1], f0[2] = 8000.0, 300.0, 6000.0
    # keep the two signal hosts and the constant star 2 isolated from neighbours
    far = np.hypot(*(pos[3:, None, :] - pos[None, :3, :]).transpose(2, 0, 1)).min(axis=1) > 4.0
    pos = np.concatenate([pos[:3], pos[3:][far]])
    f0 = np.concatenate([f0[:3], f0[3:][far]])
    F = np.repeat(f0[:, None], ntime, axis=1)
    period, t0, dur, depth = 2.3, t[0] + 0.7, 0.15, 0.01
    ph = (t - t0 + period / 2) % period - period / 2
    transit = np.where(np.abs(ph) < dur / 2, depth, 0.0)
    F[0] *= 1 - transit
    tsn = t[0] + 4.0
    x = t - tsn
    sn = 900.0 * np.exp(-np.clip(x, 0, None) / 6.0) / (1 + np.exp(-x / 1.0))
    F[1] += sn
    rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    sig = 0.9

    def psf(r, c):
        return np.exp(-0.5 * (((rr[None] - r[:, None, None]) ** 2 + (cc[None] - c[:, None, None]) ** 2) / sig**2)) / (
            2 * np.pi * sig**2
        )

    img = np.zeros((ntime, size, size))
    for s in range(len(f0)):
        img += F[s][:, None, None] * psf(pos[s, 0] + drow, pos[s, 1] + dcol)
    bkg = 20 + 120 * np.exp(-(((u - 0.05) / 0.08) ** 2))
    img += bkg[:, None, None] * (1 + 0.3 * (rr - size / 2) / size)[None]
    err = np.sqrt(img / 1000.0 + 0.05)
    flux = img + err * rng.standard_normal(img.shape)
    cube = make_cube(
        flux,
        err,
        np.zeros(ntime, np.int32),
        t,
        np.arange(ntime),
        500 + np.arange(size),
        700 + np.arange(size),
        mission="TESS",
    )
    weights = {s: psf(pos[s, 0] + drow, pos[s, 1] + dcol) for s in (0, 1)}
    return cube, dict(
        pos=pos,
        f0=f0,
        F=F,
        transit=transit,
        sn=sn,
        weights=weights,
        period=period,
        t0=t0,
        dur=dur,
        err=err,
        rr=rr,
        cc=cc,
    )


@pytest.fixture(scope="module")
def scene_result():
    cube, info = scene_cube()
    params = cpm.cpm_params(n_predictors=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cpm.CPMWarning)
        det = cpm.cpm_detrend_cube(cube, params, threads=2)
    return cube, info, det


def _ap(info, s, radius=2.0):
    r0, c0 = info["pos"][s]
    return np.hypot(info["rr"] - r0, info["cc"] - c0) <= radius


def test_transit_depth_kept(scene_result):
    from workflow_lib.metrics import template_amplitude

    cube, info, det = scene_result
    ap = _ap(info, 0)
    t = cube["time"].values
    f = det["flux"].values[:, ap].sum(axis=1)
    eps = info["weights"][0][:, ap].sum(axis=1)  # PSF fraction in the aperture, per cadence
    template = -info["F"][0].max() * info["transit"] * eps
    tcs = info["t0"] + info["period"] * np.arange(0, 7)
    windows = [(tc - 0.5, tc + 0.5) for tc in tcs if tc < t[-1] - 0.1]
    c = template_amplitude(t, f, template, windows)
    assert 0.9 <= c <= 1.1, c


def test_transient_peak_kept_with_polynomial(scene_result):
    cube, info, det = scene_result
    ap = _ap(info, 1)
    f = det["flux"].values[:, ap].sum(axis=1)
    expected = (info["sn"][:, None] * info["weights"][1][:, ap]).sum(axis=1)
    t = cube["time"].values
    kpk = int(np.argmax(expected))
    near = np.abs(t - t[kpk]) < 0.25
    pre = t < t[0] + 2.0
    ratio = (np.median(f[near]) - np.median(f[pre])) / (np.median(expected[near]) - np.median(expected[pre]))
    assert abs(ratio - 1) < 0.1, ratio


def test_constant_star_cdpp_vs_raw_and_floor(scene_result):
    from workflow_lib.metrics import cdpp_hours, white_noise_cdpp

    cube, info, det = scene_result
    t = cube["time"].values
    for s in (2,):  # the isolated bright constant star
        ap = _ap(info, s, 1.5)
        raw = cube["flux"].values[:, ap].sum(axis=1)
        cpmf = det["flux"].values[:, ap].sum(axis=1)
        err = np.sqrt((info["err"][:, ap] ** 2).sum(axis=1))
        c_raw, c_cpm = cdpp_hours(t, raw, 1.0), cdpp_hours(t, cpmf, 1.0)
        floor = white_noise_cdpp(t, raw, err, 1.0)
        assert c_raw / c_cpm >= 2.0, (s, c_raw, c_cpm)
        assert c_cpm / floor <= 1.5, (s, c_cpm, floor)


# ----------------------------------------------------------------------------- synthetic sector, pipeline step


@pytest.fixture(scope="module")
def small_sector(tmp_path_factory):
    synthetic = pytest.importorskip("workflow_lib.data.synthetic")
    from workflow_lib.core.atomic import atomic_path
    from workflow_lib.data.cube import write_zarr_atomic
    from workflow_lib.data.gaia import crossmatch

    cube, truth, catalog = synthetic.simulate_sector(
        {"seed": 3, "n_rows": 16, "n_cols": 16, "n_cadences": 300, "n_bad_pixels": 1}, "small"
    )
    d = tmp_path_factory.mktemp("sector")
    write_zarr_atomic(cube, d / "cube.zarr")
    cat = crossmatch(cube, catalog)
    with atomic_path(d / "catalog.ecsv") as tmp:
        cat.write(tmp, format="ascii.ecsv")
    return d, cube, cat


SMALL_CFG = {"n_predictors": 40, "exclusion_size": 5, "k": 30, "scale_k_with_cadence": False}


def test_fast_matches_reference_on_synthetic_sector(small_sector):
    d, cube, _ = small_sector
    from workflow_lib.data.cube import as_pixel_table

    params = cpm.cpm_params(SMALL_CFG)
    tab = as_pixel_table(cube, drop_nan=False)
    flux = tab["flux"].values.astype(np.float64)
    with pytest.warns(cpm.CPMWarning, match="all-NaN"):
        res = cpm.cpm_detrend_pixels(
            flux, tab["quality"].values, tab["time"].values, tab["row"].values, tab["column"].values, params, threads=2
        )
    keep, valid = res["keep"], res["valid"]
    assert (~valid).sum() == 1 and (~keep).sum() > 0  # the dead pixel; flagged cadences dropped
    fk = flux[keep][:, valid]
    tg = np.arange(0, fk.shape[1], 9)  # a spread of target pixels (corners, edges, centre)
    ms, mp, det = reference_cpm(
        fk,
        tab["time"].values[keep],
        tab["row"].values[valid],
        tab["column"].values[valid],
        L=40,
        exclusion=5,
        lambda_L=0.01,
        lambda_P=0.01,
        degree=3,
        k=30,
        targets=tg,
    )
    vidx = np.flatnonzero(valid)[tg]
    fast = res["systematics"][keep][:, vidx] / res["scale"][vidx]
    assert _relerr(fast, ms[:, tg]) < 1e-8
    assert _relerr(res["polynomial"][keep][:, vidx] / res["scale"][vidx], mp[:, tg]) < 1e-8
    assert np.max(np.abs(res["flux"][keep][:, vidx] - det[:, tg]) / np.abs(det[:, tg])) < 1e-8


def _run_cpm_step(d, out, config, **kw):
    """The cpm_detrend step on ``d``/cube.zarr and ``d``/catalog.ecsv, its products in ``out``."""
    return cpm_steps.run_cpm_detrend(
        d / "cube.zarr",
        d / "catalog.ecsv",
        detrended_path=out / "detrended.zarr",
        lightcurves_path=out / "lightcurves.zarr",
        raw_lightcurves_path=out / "raw_lightcurves.zarr",
        fits_dir=out / "fits",
        config=config,
        **kw,
    )


def test_run_cpm_detrend_outputs(small_sector, tmp_path):
    lk = pytest.importorskip("lightkurve")
    import xarray as xr

    from workflow_lib.data.cube import open_cube

    d, cube, cat = small_sector
    out = tmp_path / "cpm" / "default"
    user = {"corner": [[int(cube.row[0]), int(cube.column[0])], [int(cube.row[1]), int(cube.column[0])]]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cpm.CPMWarning)
        summary = _run_cpm_step(d, out, SMALL_CFG, target_aperture=user, threads=1, field="small")
    det = open_cube(out / "detrended.zarr")
    assert det["flux"].dims == ("time", "row", "column") and det.sizes == cube.sizes
    assert json.loads(det.attrs["provenance"])["step"] == "cpm_detrend"
    lc = xr.open_zarr(out / "lightcurves.zarr", consolidated=False)
    raw = xr.open_zarr(out / "raw_lightcurves.zarr", consolidated=False)
    assert lc.attrs["method"] == "CPM" and raw.attrs["method"] == "RAW"
    assert "cdpp_1h" in lc.coords and "cdpp_6h" in raw.coords
    assert summary["n_sources"] == lc.sizes["source"] >= 2
    sid = lc["source_id"].values
    assert sid[-1] == -1 and str(lc["aperture_name"].values[-1]) == "corner"
    # the user aperture's RAW flux is the plain sum of its two pixels
    np.testing.assert_allclose(
        raw["flux"].values[-1], cube["flux"].values[:, :2, 0].astype(np.float64).sum(axis=1), rtol=1e-6
    )
    f = sorted((out / "fits").glob("cpm_*.fits"))
    assert len(f) == lc.sizes["source"] and len(list((out / "fits").glob("raw_*.fits"))) == lc.sizes["source"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lcf = lk.read(f[0])
    assert len(lcf.time) == cube.sizes["time"]
    # sweep summary over the one parameter set
    table = cpm_steps.sweep_summary(
        {"default": out / "lightcurves.zarr"},
        out / "raw_lightcurves.zarr",
        tmp_path / "summary.ecsv",
        mag_range=(0, 30),
    )
    assert list(table["method"]) == ["RAW", "CPM"] and np.isfinite(table["median_cdpp_1h"]).all()


def test_run_cpm_stitch(tmp_path):
    import xarray as xr

    from workflow_lib.data.cube import write_zarr_atomic
    from workflow_lib.data.lightcurves import lightcurve_set

    rng = np.random.default_rng(2)

    def sector(t0, offset, name):
        n = 500
        t = t0 + np.arange(n) * 30 / 1440
        c = make_cube(
            np.zeros((n, 1, 1)), np.zeros((n, 1, 1)), np.zeros(n, np.int32), t, np.arange(n), [0], [0], mission="TESS"
        )
        flux = np.vstack([1000 + 3 * t + offset + rng.normal(0, 0.3, n), 50 + rng.normal(0, 0.3, n)])
        lc = lightcurve_set(
            flux, np.ones_like(flux), c, {"source_id": np.array([7, 8 if name == "a" else 9])}, method="CPM"
        )
        write_zarr_atomic(lc, tmp_path / f"{name}.zarr")
        return tmp_path / f"{name}.zarr"

    pa, pb = sector(1325.0, 0.0, "a"), sector(1353.0, -80.0, "b")
    out = cpm_steps.run_cpm_stitch([pb, pa], tmp_path / "st.zarr", tmp_path / "fits", group="g")  # order by time
    assert list(out["source_id"].values) == [7]  # only the source present in both
    assert out["stitch_offset"].values[0, 1] == pytest.approx(80.0, abs=0.3)
    f = out["flux"].values[0]
    np.testing.assert_allclose(f[500:] - (1000 + 3 * out["time"].values[500:]), 0, atol=1.5)
    assert len(list((tmp_path / "fits").glob("*.fits"))) == 1
    assert xr.open_zarr(tmp_path / "st.zarr", consolidated=False).sizes["time"] == 1000


def test_write_fits_dir_switched_off_leaves_an_empty_directory(tmp_path):
    """cpm.write_fits / survey.tile_fits false: the rule's declared FITS directory exists and is empty (files
    of an earlier run with FITS on are gone: the directory is replaced atomically)."""
    from workflow_lib.steps.cpm import write_fits_dir

    out = tmp_path / "fits"
    out.mkdir()
    (out / "cpm_1.fits").write_bytes(b"stale")
    assert write_fits_dir([(None, "cpm")], out, enabled=False) == out
    assert out.is_dir() and not any(out.iterdir())


def _run_small(small_sector, out, config):
    return _run_cpm_step(small_sector[0], out, config, threads=1, field="small")


def test_cube_the_cpm_cannot_model_is_skipped_or_refused(small_sector, tmp_path):
    """A 16x16 cube with a 31x31 exclusion square has no predictor pixels (a TPF stamp at the default 11x11):
    ``on_unmodellable: skip`` (the default) writes NaN CPM light curves carrying the reason, the RAW set as
    usual and no CPM FITS files; ``error`` refuses with that reason and writes nothing."""
    import xarray as xr

    from workflow_lib.core.settings import schema_defaults
    from workflow_lib.data.cube import CubeError

    d, cube, _ = small_sector
    assert schema_defaults("cpm")["on_unmodellable"] == "skip"
    assert issubclass(cpm.CPMNotApplicable, CubeError)
    cfg = dict(SMALL_CFG, exclusion_size=31)
    with pytest.raises(cpm.CPMNotApplicable, match=r"fewer than 10 candidate .*31x31 exclusion.*on_unmodellable: skip"):
        _run_small(small_sector, tmp_path / "refused", dict(cfg, on_unmodellable="error"))
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    out = tmp_path / "skipped"
    summary = _run_small(small_sector, out, dict(cfg, on_unmodellable="skip"))
    det = xr.open_zarr(out / "detrended.zarr", consolidated=False)
    lc = xr.open_zarr(out / "lightcurves.zarr", consolidated=False).load()
    raw = xr.open_zarr(out / "raw_lightcurves.zarr", consolidated=False).load()
    assert "31x31 exclusion" in det.attrs["cpm_not_applied"] == lc.attrs["cpm_not_applied"]
    assert det.attrs["cpm_k"] == 0 and np.isnan(det["flux"].values).all()
    assert np.isnan(lc["flux"].values).all() and np.isnan(summary["median_cdpp_1h_cpm"])
    # the RAW set is the one a modellable cube gets: finite sums of the raw pixels
    assert "cpm_not_applied" not in raw.attrs and np.isfinite(raw["flux"].values).any(axis=1).all()
    ok = _run_small(small_sector, tmp_path / "ok", SMALL_CFG)
    ref = xr.open_zarr(tmp_path / "ok" / "raw_lightcurves.zarr", consolidated=False).load()
    np.testing.assert_array_equal(raw["flux"].values, ref["flux"].values)
    assert ok["n_sources"] == summary["n_sources"]
    assert (
        not list((out / "fits").glob("cpm_*.fits"))
        and len(list((out / "fits").glob("raw_*.fits"))) == lc.sizes["source"]
    )


@pytest.mark.parametrize(
    "name",
    [
        "kepler/test-tpf-kplr-tabby-100-cadences.fits",
        "kepler/ktwo210994964-c04_lpd-targ.fits",
        "tess_spoc/tess-s0015-2-3_tic273589987_tpf_100cad.fits",
    ],
)
def test_real_tpf_stamps_run_with_default_settings(shared_data, tmp_path, name):
    """Real Kepler / K2 / SPOC target pixel files (stamps of ~110 px, smaller than the 11x11 exclusion
    square) at the schema's CPM defaults: the step no longer stops the run; it writes the RAW light curve of
    the header target from the raw pixels, and NaN CPM fluxes that say why."""
    import xarray as xr

    from workflow_lib.core.settings import schema_defaults
    from workflow_lib.data.cube import write_zarr_atomic
    from workflow_lib.data.fits_reader import read_field
    from workflow_lib.data.gaia import crossmatch_field

    cube = read_field([shared_data / name])
    write_zarr_atomic(cube, tmp_path / "cube.zarr")
    crossmatch_field(tmp_path / "cube.zarr", tmp_path / "catalog.ecsv", {}, None)  # offline: header target
    out = tmp_path / "cpm"
    _run_cpm_step(tmp_path, out, schema_defaults("cpm"))
    lc = xr.open_zarr(out / "lightcurves.zarr", consolidated=False).load()
    raw = xr.open_zarr(out / "raw_lightcurves.zarr", consolidated=False).load()
    assert "exclusion square" in lc.attrs["cpm_not_applied"] and np.isnan(lc["flux"].values).all()
    good = cube["quality"].values == 0
    assert raw.sizes["source"] >= 1 and np.isfinite(raw["flux"].values[0][good]).mean() > 0.9
    assert np.nanmedian(raw["flux"].values[0]) > 0
