"""Per-cadence LFD flux solve (workflow_lib.solve) against a slow dense reference and known truth."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import erf

from workflow_lib.lfd import (
    geometry,  # noqa: E402
    linsys,  # noqa: E402
    solve,
)


def gaussian_scene(source_col, source_row, pixel_col, pixel_row, sigma=0.8, radius=3.5, dx=0.0, dy=0.0):
    """Stand-in scene matrix: pixel-integrated circular Gaussian PRF, unit total flux, truncated at
    ``radius``; ``dx, dy`` shift every source (for simulating motion)."""
    sc = np.asarray(source_col, float) + dx
    sr = np.asarray(source_row, float) + dy
    pc = np.asarray(pixel_col, float)
    pr = np.asarray(pixel_row, float)
    d2 = (pc[:, None] - sc[None, :]) ** 2 + (pr[:, None] - sr[None, :]) ** 2
    near = d2 <= radius**2
    p, s = np.nonzero(near)
    s2 = np.sqrt(2) * sigma

    def frac(c, x):  # fraction of a unit Gaussian centred at c inside pixel [x-0.5, x+0.5]
        return 0.5 * (erf((x + 0.5 - c) / s2) - erf((x - 0.5 - c) / s2))

    vals = frac(sc[s], pc[p]) * frac(sr[s], pr[p])
    return sp.csr_matrix((vals, (p, s)), shape=(pc.size, sc.size))


def small_field(seed=0, n=20, nsrc=40, ntime=12, noise=5.0, bkg_plane=(30.0, 3.0, -2.0)):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:n, 0:n]
    pc, pr = cols.ravel().astype(float), rows.ravel().astype(float)
    sc = rng.uniform(-1, n, nsrc)
    sr = rng.uniform(-1, n, nsrc)
    f0 = 10 ** rng.uniform(2.5, 4.5, nsrc)
    S = gaussian_scene(sc, sr, pc, pr)
    B = geometry.background_design(pc, pr, 1)
    truth = f0[:, None] * (1 + 0.01 * rng.standard_normal((nsrc, ntime)))
    bk = np.asarray(bkg_plane)[:, None] * np.ones((1, ntime))
    model = (S @ truth + B @ bk).T
    err = np.sqrt(noise**2 + np.abs(model))
    data = model + err * rng.standard_normal(model.shape)
    return dict(S=S, B=B, pc=pc, pr=pr, sc=sc, sr=sr, f0=f0, truth=truth, bk=bk, data=data, err=err)


def dense_reference(X, y, e, mu, sig):
    """App. B eqs. B3-B4 with dense numpy: w = (X^T C^-1 X + P)^-1 (X^T C^-1 y + P mu)."""
    ok = np.isfinite(y)
    Xd = X[ok]
    w = 1 / e[ok] ** 2
    N = Xd.T @ (w[:, None] * Xd) + np.diag(1 / sig**2)
    cov = np.linalg.inv(N)
    return cov @ (Xd.T @ (w * y[ok]) + mu / sig**2), np.sqrt(np.diag(cov))


def priors(f):
    nsrc = f["S"].shape[1]
    mu = np.concatenate([f["f0"], np.zeros(f["B"].shape[1])])
    sig = np.concatenate([10 * f["f0"], np.full(f["B"].shape[1], 1e6)])
    return mu, sig, nsrc


@pytest.mark.parametrize("method", ["direct", "pcg"])
def test_matches_dense_reference_with_motion_and_nan(method):
    f = small_field()
    data = f["data"].copy()
    data[3, 5:40] = np.nan  # masked pixels in one cadence
    rng = np.random.default_rng(1)
    S = f["S"]
    basis = np.column_stack([np.ones(S.nnz), 0.05 * rng.standard_normal(S.nnz)])
    tpoly = np.column_stack([np.ones(12), np.linspace(-1, 1, 12)])
    mu, sig, nsrc = priors(f)
    res = solve.source_flux(
        data,
        f["err"],
        S,
        f["B"],
        mu,
        sig,
        motion_basis=basis,
        motion_time=tpoly,
        method=method,
        time_chunk=5,
        threads=2,
        exact_errors=True,
    )
    assert res["method"] == method
    Sc = S.tocsr()
    Sc.sort_indices()
    for t in (0, 3, 11):
        St = Sc.copy()
        St.data = St.data * (basis @ tpoly[t])
        X = np.hstack([St.toarray(), f["B"]])
        ref, ref_err = dense_reference(X, data[t], f["err"][t], mu, sig)
        np.testing.assert_allclose(res["flux"][:, t], ref[:nsrc], rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        np.testing.assert_allclose(res["background"][:, t], ref[nsrc:], rtol=1e-5, atol=1e-4)
        if method == "direct":
            np.testing.assert_allclose(res["flux_err"][:, t], ref_err[:nsrc], rtol=1e-8)
        else:  # mean-frame crowding approximation; this test's 5 % random per-entry motion
            # factors and 35 NaN pixels are much harsher than a smooth motion model
            np.testing.assert_allclose(res["flux_err"][:, t], ref_err[:nsrc], rtol=0.1 if t != 3 else 0.2)
            assert np.median(np.abs(res["flux_err"][:, t] / ref_err[:nsrc] - 1)) < 0.02


def test_direct_chunk_crowding_errors_close_to_exact():
    """Default direct errors: exact at each chunk's first cadence, its crowding x the cadence's Fisher
    information elsewhere; with a smooth motion model (+-1 % over the sector) within 0.5 % of exact,
    and exact where the usable pixels differ (NaN) from the chunk's reference cadence."""
    f = small_field()
    data = f["data"].copy()
    data[3, 5:40] = np.nan
    S = f["S"].tocsr()
    S.sort_indices()
    dx, dy = geometry.scene_offsets(S, f["pc"], f["pr"], f["sc"], f["sr"])
    basis = np.column_stack([np.ones(S.nnz), 0.01 * dx / 3, 0.01 * dy / 3])
    tb = np.column_stack([np.ones(12), np.linspace(-1, 1, 12), np.linspace(1, -1, 12) ** 2])
    mu, sig, nsrc = priors(f)
    kw = dict(motion_basis=basis, motion_time=tb, method="direct", time_chunk=6)
    approx = solve.source_flux(data, f["err"], S, f["B"], mu, sig, **kw)
    exact = solve.source_flux(data, f["err"], S, f["B"], mu, sig, exact_errors=True, **kw)
    np.testing.assert_array_equal(approx["flux"], exact["flux"])
    np.testing.assert_allclose(approx["flux_err"], exact["flux_err"], rtol=5e-3)
    np.testing.assert_allclose(approx["flux_err"][:, [0, 3, 6]], exact["flux_err"][:, [0, 3, 6]], rtol=1e-10)


def test_recovers_truth_within_errors():
    f = small_field(seed=3, n=24, nsrc=50, ntime=40)
    mu, sig, nsrc = priors(f)
    res = solve.source_flux(f["data"], f["err"], f["S"], f["B"], mu, sig, method="direct")
    on = (f["sc"] > 1) & (f["sc"] < 22) & (f["sr"] > 1) & (f["sr"] < 22)
    z = (res["flux"] - f["truth"])[on] / res["flux_err"][on]
    assert 0.85 < z.std() < 1.15
    assert abs(z.mean()) < 0.1
    zb = (res["background"] - f["bk"]) / res["background_err"]
    assert np.abs(zb).max() < 4.5 and 0.6 < zb.std() < 1.4


def test_deterministic_and_thread_independent():
    f = small_field(seed=5)
    mu, sig, _ = priors(f)
    a = solve.source_flux(f["data"], f["err"], f["S"], f["B"], mu, sig, method="pcg", threads=1, time_chunk=4)
    b = solve.source_flux(f["data"], f["err"], f["S"], f["B"], mu, sig, method="pcg", threads=2, time_chunk=4)
    assert np.array_equal(a["flux"], b["flux"]) and np.array_equal(a["flux_err"], b["flux_err"])
    c = solve.source_flux(
        f["data"],
        f["err"],
        f["S"],
        f["B"],
        mu,
        sig,
        method="direct",
        threads=2,
        time_chunk=4,
        dask_scheduler="processes",
    )
    d = solve.source_flux(f["data"], f["err"], f["S"], f["B"], mu, sig, method="direct", threads=1, time_chunk=4)
    assert np.array_equal(c["flux"], d["flux"]) and np.array_equal(c["flux_err"], d["flux_err"])


def test_errors_are_clear():
    f = small_field()
    mu, sig, _ = priors(f)
    with pytest.raises(linsys.SolveError, match="pixels"):
        solve.source_flux(f["data"][:, :-1], f["err"][:, :-1], f["S"], f["B"], mu, sig)
    with pytest.raises(linsys.SolveError, match="method"):
        solve.source_flux(f["data"], f["err"], f["S"], f["B"], mu, sig, method="qr")
    with pytest.raises(linsys.SolveError, match="positive"):
        solve.source_flux(f["data"], f["err"], f["S"], f["B"], mu, 0 * sig)


def test_blended_sources_flags_the_fainter_of_close_pairs():
    col = np.array([10.0, 10.2, 20.0, 21.0, 30.0, 30.3, 30.1])
    row = np.array([5.0, 5.1, 5.0, 5.0, 9.0, 9.0, 9.2])
    flux = np.array([100.0, 10.0, 50.0, 5.0, 1.0, 2.0, 3.0])
    got = solve.blended_sources(col, row, flux, 0.5)
    # pair 0/1 (0.22 px): 1 is fainter; 2/3 are 1 px apart (resolved, like KOI-608); 4, 5, 6 within
    # 0.5 px of each other: all but the brightest (6) are blended
    assert got.tolist() == [False, True, False, False, True, True, False]
    assert not solve.blended_sources(col, row, flux, 0.0).any()


def _jittered_lightcurves(seed=0, ntime=1300, nsrc=6, degree=2):
    """Light curves whose error is a polynomial of total ``degree`` (2 or 3) in a known scene offset
    (drift + jitter), on top of a transit, a slow astrophysical trend and white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(ntime) / 48.0  # 30-min cadences, days
    cx = 0.08 * (t / t[-1]) + 0.02 * rng.standard_normal(ntime)  # slow drift + jitter [px]
    cy = -0.05 * (t / t[-1]) ** 2 + 0.02 * rng.standard_normal(ntime)
    M = np.column_stack(
        [cx, cy, cx**2, cx * cy, cy**2] + ([cx**3, cx**2 * cy, cx * cy**2, cy**3] if degree == 3 else [])
    )
    g = rng.normal(0, 0.2, (nsrc, M.shape[1]))  # fractional change per px^k
    if degree == 3:
        g[:, 5:] = rng.normal(0, 16.0, (nsrc, 4))  # per px^3: what a quadratic cannot absorb
    noise = 1e-3
    astro = np.ones((nsrc, ntime))
    transit = (t % 7.3 > 3.0) & (t % 7.3 < 3.12)
    astro[0, transit] -= 0.01  # 1 % transit, 6 points every 7.3 d
    astro[1] *= 1 + 0.02 * np.sin(2 * np.pi * t / 20.0)  # slow variability, correlated with the drift
    white = noise * rng.standard_normal((nsrc, ntime))
    flux = 1000.0 * (astro * (1 + g @ M.T) + white)
    return t, cx, cy, flux, astro * 1000.0, transit, noise * 1000.0, 1000.0 * (astro + white)


def test_decorrelate_offsets_removes_the_offset_term_and_keeps_astrophysics():
    t, cx, cy, flux, astro, transit, noise, clean = _jittered_lightcurves()
    good = np.ones(t.size, bool)
    good[100:110] = False  # a flagged stretch is left out of the fit
    before = np.std(np.diff(flux - astro, axis=1), axis=1) / np.sqrt(2)
    out, coef = solve.decorrelate_offsets(t, flux, cx, cy, good, degree=2, window_days=1.0)
    assert coef.shape == (6, 5)
    resid = out - astro
    resid -= resid[:, good].mean(axis=1, keepdims=True)
    after = np.std(np.diff(resid, axis=1), axis=1) / np.sqrt(2)
    assert np.all(before > 1.5 * noise) and np.all(after < 1.1 * noise)
    # residuals are white noise: the slow drift part is gone too, not only the jitter
    assert np.all(np.std(resid, axis=1) < 1.15 * noise)

    # the transit depth and the slow variability are kept: as measured without the offset term
    def depth(f):
        return 1 - f[transit].mean() / np.median(f[~transit])

    def amp(f):
        return np.polyfit(np.sin(2 * np.pi * t / 20.0), f / f.mean(), 1)[0]

    print(depth(out[0]), depth(clean[0]), amp(out[1]), amp(clean[1]))
    assert abs(depth(out[0]) / depth(clean[0]) - 1) < 0.03
    assert abs(amp(out[1]) / amp(clean[1]) - 1) < 0.03
    # means over the good cadences are unchanged; cadences without an offset are untouched
    np.testing.assert_allclose(out[:, good].mean(axis=1), flux[:, good].mean(axis=1), rtol=1e-12)
    cx2 = cx.copy()
    cx2[200] = np.nan
    out2, _ = solve.decorrelate_offsets(t, flux, cx2, cy, good, degree=2, window_days=1.0)
    assert out2[0, 200] == flux[0, 200]


def test_decorrelate_offsets_degree_three_removes_a_cubic_term_that_degree_two_leaves():
    """A bright star's flux error is not quadratic in the offset over a drift of a few tenths of a pixel
    (docs/VALIDATION.md): a cubic term is removed at degree 3, left at degree 2; the signals stay."""
    t, cx, cy, flux, astro, transit, noise, clean = _jittered_lightcurves(seed=3, degree=3)
    good = np.ones(t.size, bool)

    def scatter(out):
        resid = out - astro
        return np.std(resid - resid.mean(axis=1, keepdims=True), axis=1)

    out2, _ = solve.decorrelate_offsets(t, flux, cx, cy, good, degree=2, window_days=1.0)
    out3, coef3 = solve.decorrelate_offsets(t, flux, cx, cy, good, degree=3, window_days=1.0)
    assert coef3.shape == (6, 9)
    s2, s3 = scatter(out2), scatter(out3)
    print(s2 / noise, s3 / noise)
    assert np.median(s2) > 1.3 * noise and np.all(s3 < 1.15 * noise)
    depth = 1 - out3[0, transit].mean() / np.median(out3[0, ~transit])
    clean_depth = 1 - clean[0, transit].mean() / np.median(clean[0, ~transit])
    amp = np.polyfit(np.sin(2 * np.pi * t / 20.0), out3[1] / out3[1].mean(), 1)[0]
    clean_amp = np.polyfit(np.sin(2 * np.pi * t / 20.0), clean[1] / clean[1].mean(), 1)[0]
    assert abs(depth / clean_depth - 1) < 0.03 and abs(amp / clean_amp - 1) < 0.03


def test_decorrelate_offsets_bic_gives_each_source_the_degree_it_needs():
    """select='bic': the sources with a cubic offset term get degree 3 and are whitened as with a fixed
    degree 3; pure photon-noise sources get no terms at all (fixed degree 3 fits nine terms to their noise)."""
    t, cx, cy, flux, astro, transit, noise, clean = _jittered_lightcurves(seed=3, degree=3)
    rng = np.random.default_rng(7)
    flat = 1000.0 + noise * rng.standard_normal((4, t.size))
    flux = np.vstack([flux, flat])
    good = np.ones(t.size, bool)
    out, coef = solve.decorrelate_offsets(t, flux, cx, cy, good, degree=3, window_days=1.0, select="bic")
    fixed, _ = solve.decorrelate_offsets(t, flux, cx, cy, good, degree=3, window_days=1.0)
    assert np.all((coef[:6, 5:] != 0).any(axis=1))  # cubic terms where the error has them
    assert not coef[6:].any() and np.array_equal(out[6:], flat)
    resid = out[:6] - astro
    resid -= resid.mean(axis=1, keepdims=True)
    assert np.all(np.std(resid, axis=1) < 1.15 * noise)
    np.testing.assert_allclose(np.std(out[:6] - fixed[:6], axis=1), 0, atol=0.1 * noise)
    with pytest.raises(ValueError, match="select"):
        solve.decorrelate_offsets(t, flux, cx, cy, good, degree=3, window_days=1.0, select="aic")


def test_decorrelate_offsets_degree_zero_is_identity():
    t, cx, cy, flux, *_ = _jittered_lightcurves(ntime=200)
    out, coef = solve.decorrelate_offsets(t, flux, cx, cy, np.ones(t.size, bool), degree=0, window_days=1.0)
    assert np.array_equal(out, flux) and coef.size == 0


def test_source_flags_name_what_the_data_do_not_constrain():
    """lfd_flag bits (core.quality.LfdSourceFlag): removed by the PRF step, mostly off the pixels, median
    flux <= 0 over good cadences; a dip on flagged-bad cadences only does not count."""
    from workflow_lib.core.quality import LfdSourceFlag as F

    ntime = 20
    good = np.ones(ntime, bool)
    good[:5] = False
    flux = np.full((5, ntime), 100.0)
    flux[1] = np.nan  # removed by the PRF step: no light curve
    flux[3, 5:] = -3.0  # no measurable flux
    flux[4, :5] = -1e4  # negative only on bad cadences: fine
    in_model = np.array([True, False, True, True, True])
    frac = np.array([0.97, 0.9, 0.05, 0.6, 0.2])
    flag = solve.source_flags(in_model, frac, flux, good, 0.2)
    assert flag.tolist() == [0, int(F.NOT_IN_MODEL), int(F.OFF_PIXELS), int(F.NONPOSITIVE), 0]
    assert solve.source_flags(in_model, frac, flux, good, 0.0).tolist()[2] == 0


def test_source_flags_leave_out_a_median_consistent_with_zero():
    """NONPOSITIVE with min_median_snr: a median not above that many times its error (sqrt(pi/2) x median
    error / sqrt(N)) is no measurable flux, e.g. a faint star in a bright one's wing fitted to ~0 e-/s."""
    from workflow_lib.core.quality import LfdSourceFlag as F

    rng = np.random.default_rng(2)
    ntime = 300
    good = np.ones(ntime, bool)
    flux = np.vstack([0.02 + 3.0 * rng.standard_normal(ntime), 1.5 + 3.0 * rng.standard_normal(ntime)])
    err = np.full_like(flux, 3.0)  # the median's error: 1.2533 x 3 / sqrt(300) = 0.22 e-/s
    ones = np.ones(2, bool)
    flag = solve.source_flags(ones, np.ones(2), flux, good, 0.2, flux_err=err, min_median_snr=1.0)
    assert flag.tolist() == [int(F.NONPOSITIVE), 0]  # 0.02 +- 0.22: none; 1.5 +- 0.22: measured
    # min_median_snr 0, or no errors given: only a median <= 0 counts
    assert solve.source_flags(ones, np.ones(2), flux, good, 0.2, flux_err=err, min_median_snr=0.0)[1] == 0
    assert solve.source_flags(ones, np.ones(2), flux, good, 0.2)[1] == 0
    # 7 sigma needed: the 1.5 e-/s star is out too
    assert solve.source_flags(ones, np.ones(2), flux, good, 0.2, flux_err=err, min_median_snr=7.0).tolist() == [4, 4]
