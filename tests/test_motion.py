"""LFD motion model (§4.5) against a known drifting scene."""

import numpy as np
import pytest
from test_solve import gaussian_scene

from workflow_lib.lfd import (
    geometry,  # noqa: E402
    motion,
)
from workflow_lib.lfd import io as io_mod  # noqa: E402
from workflow_lib.lfd.geometry import scene_offsets


def drifting_grid(nsrc_side=7, spacing=9, radius=3.5, nbin=20, amp=0.3, seed=0):
    """Isolated stars (no overlaps) with random sub-pixel positions, drifting by a smooth curve."""
    rng = np.random.default_rng(seed)
    n = nsrc_side * spacing
    rows, cols = np.mgrid[0:n, 0:n]
    pc, pr = cols.ravel().astype(float), rows.ravel().astype(float)
    g = (np.arange(nsrc_side) + 0.5) * spacing
    sc = (g[None, :] + rng.uniform(-0.5, 0.5, (nsrc_side, nsrc_side))).ravel()
    sr = (g[:, None] + rng.uniform(-0.5, 0.5, (nsrc_side, nsrc_side))).ravel()
    tb = np.linspace(0, 27, nbin)
    tau = (tb - 13.5) / 13.5
    drift_x = amp * (0.6 * tau + 0.4 * tau**3)
    drift_y = amp * (-0.5 * tau + 0.3 * tau**2)
    S_t = [gaussian_scene(sc, sr, pc, pr, radius=radius, dx=drift_x[b], dy=drift_y[b]) for b in range(nbin)]
    return dict(pc=pc, pr=pr, sc=sc, sr=sr, tb=tb, S_t=S_t, radius=radius)


def test_bin_frames_means_and_errors():
    rng = np.random.default_rng(1)
    t = np.arange(105) * 0.02
    f = rng.normal(size=(105, 3))
    e = np.full((105, 3), 2.0)
    good = np.ones(105, bool)
    good[7] = False
    f[10, 1] = np.nan
    bt, bf, be, idx = motion.bin_frames(t, f, e, good, 25)
    assert bf.shape == (4, 3) and idx[7] == -1  # 104 good cadences -> 4 bins (last one 29)
    sel = np.flatnonzero(good)[:25]
    np.testing.assert_allclose(bf[0, 0], f[sel, 0].mean())
    np.testing.assert_allclose(bt[0], t[sel].mean())
    np.testing.assert_allclose(be[0, 1], 2.0 / np.sqrt(24))  # one NaN left out
    assert motion.default_bin_size("TESS", t * 0 + np.arange(105) / 48) == 48
    assert motion.default_bin_size("Kepler", t) == 200


def test_motion_model_reproduces_shifted_scene():
    d = drifting_grid()
    S_t = d["S_t"]
    # common pattern: evaluate on the union pattern of the mean scene (truncation radius equal)
    Sbar = sum(S_t) / len(S_t)
    Sbar.sort_indices()
    nb = len(S_t)
    # uncontaminated pixels: each pixel belongs to one source here; y = S_t / Sbar summed over sources
    owner = np.asarray(Sbar.argmax(axis=1)).ravel()
    has = np.asarray((Sbar > 0).sum(axis=1)).ravel() == 1
    pix = np.flatnonzero(has)
    own = owner[pix]
    mean_px = np.asarray(Sbar[pix, own]).ravel() * 1e4
    bright = mean_px > 50
    pix, own, mean_px = pix[bright], own[bright], mean_px[bright]
    y = np.array([np.asarray(S[pix, own]).ravel() * 1e4 for S in S_t]) / mean_px
    rng = np.random.default_rng(2)
    y_err = np.sqrt(mean_px) / mean_px * np.ones((nb, 1)) * 0.2
    y = y + y_err * rng.standard_normal(y.shape)
    dx = d["pc"][pix] - d["sc"][own]
    dy = d["pr"][pix] - d["sr"][own]
    R = d["radius"]
    mm, model_y, used = motion.fit_motion_model(
        dx, dy, d["tb"], y, y_err, own, knots=np.linspace(-R, R, 7), params={"n_iter": 1}, t0=13.5, tscale=13.5
    )
    assert used.all()
    # eq. 24/25: factor x mean scene ~ true shifted scene at every pair
    pdx, pdy = scene_offsets(Sbar, d["pc"], d["pr"], d["sc"], d["sr"])
    factors = list(motion.motion_model(mm, pdx, pdy, d["tb"]))
    w = Sbar.data > 1e-3
    for b in (0, nb // 2, nb - 1):
        true = np.asarray(S_t[b][Sbar.nonzero()]).ravel()
        change = np.abs(true - Sbar.data)[w]
        resid = np.abs(Sbar.data * factors[b] - true)[w]
        print("ratio", b, resid.sum() / change.sum())
        assert resid.sum() < 0.15 * change.sum(), (b, resid.sum(), change.sum())
    # without motion the error would be the full change; with motion the modelled flux moves right
    basis, tb = motion.motion_factors(mm, pdx, pdy, d["tb"])
    np.testing.assert_allclose(basis @ tb[3], factors[3])


def test_clipping_masks_variable_source():
    d = drifting_grid(nbin=12, amp=0.1, seed=4)
    nb = 12
    npix_per = 20
    rng = np.random.default_rng(5)
    nsrc = 30
    own = np.repeat(np.arange(nsrc), npix_per)
    dx = rng.uniform(-3, 3, own.size)
    dy = rng.uniform(-3, 3, own.size)
    y_err = np.full((nb, own.size), 0.01)
    y = 1 + y_err * rng.standard_normal(y_err.shape)
    y[:, own == 7] *= (1 + 0.2 * np.sin(np.arange(nb)))[:, None]  # a strongly variable star
    mm, _, used = motion.fit_motion_model(
        dx, dy, d["tb"][:nb], y, y_err, own, knots=np.linspace(-3, 3, 5), t0=13.5, tscale=13.5
    )
    assert not used[own == 7].any()
    assert used[own != 7].all()


def test_unknown_parameter_is_named():
    with pytest.raises(motion.MotionError, match="n_knotz"):
        motion.motion_params({"n_knotz": 3})


def test_centroid_time_model_roundtrip(tmp_path):
    """scene_centroid follows a known common shift; a centroid-mode model survives save/load."""
    d = drifting_grid(nbin=5, amp=0.3, seed=6)
    S0 = d["S_t"][2]
    pix = np.flatnonzero(np.asarray(S0.sum(axis=1)).ravel() > 0.05)
    own = np.asarray(S0[pix].argmax(axis=1)).ravel()
    dx = d["pc"][pix] - d["sc"][own]
    dy = d["pr"][pix] - d["sr"][own]
    frames = np.array([np.asarray(S.sum(axis=1)).ravel() * 1e4 for S in d["S_t"]])
    cx, cy = motion.scene_centroid(frames, None, pix, dx, dy, frames[2, pix])
    tau = (d["tb"] - 13.5) / 13.5
    true_x = 0.3 * (0.6 * tau + 0.4 * tau**3)
    true_y = 0.3 * (-0.5 * tau + 0.3 * tau**2)
    # centroid of a truncated aperture moves by a fixed fraction of the true shift
    kx = np.polyfit(true_x - true_x[2], cx - cx[2], 1)[0]
    ky = np.polyfit(true_y - true_y[2], cy - cy[2], 1)[0]
    assert 0.5 < kx < 1.05 and 0.5 < ky < 1.05
    np.testing.assert_allclose(cx - cx[2], kx * (true_x - true_x[2]), atol=0.01)
    mm = motion.MotionModel(
        np.arange(36.0 * 6).reshape(36, 6) / 100,
        np.linspace(-3, 3, 5),
        3,
        2,
        0.0,
        1.0,
        time_model="centroid",
        reg_time=d["tb"],
        reg_x=cx,
        reg_y=cy,
    )
    io_mod.save_motion_model(tmp_path / "m.npz", mm, {"bin_time": d["tb"]})
    back = io_mod.load_motion_model(tmp_path / "m.npz")
    np.testing.assert_allclose(back.time_basis(d["tb"]), motion.centroid_basis(cx, cy))
    np.testing.assert_array_equal(back.weights, mm.weights)
    assert (tmp_path / "m.npz").read_bytes() == (
        io_mod.save_motion_model(tmp_path / "n.npz", mm, {"bin_time": d["tb"]}) or (tmp_path / "n.npz").read_bytes()
    )


class GaussPRF:
    """Pixel-integrated circular Gaussian PRF with ``evaluate(dx, dy)`` (the PRFModel interface)."""

    def __init__(self, sigma=0.8):
        self.s2 = np.sqrt(2) * sigma

    def evaluate(self, dx, dy):
        from scipy.special import erf

        def frac(x):
            return 0.5 * (erf((np.asarray(x, float) + 0.5) / self.s2) - erf((np.asarray(x, float) - 0.5) / self.s2))

        return frac(dx) * frac(dy)


def shifted_field(ntime=60, seed=2, noise=2.0):
    """Isolated and blended stars, common shift = drift (0.2 px) + jitter (0.03 px rms), plane sky."""
    from workflow_lib.lfd.geometry import background_design

    rng = np.random.default_rng(seed)
    n = 40
    rows, cols = np.mgrid[0:n, 0:n]
    pc, pr = cols.ravel().astype(float), rows.ravel().astype(float)
    ns = 60
    sc, sr = rng.uniform(2, n - 3, ns), rng.uniform(2, n - 3, ns)
    F = 10 ** rng.uniform(3, 4.5, ns)
    tt = np.linspace(0, 27, ntime)
    u = tt / 27 - 0.5
    cx_true = 0.2 * u + 0.03 * rng.standard_normal(ntime)
    cy_true = -0.1 * u + 0.1 * u**2 + 0.03 * rng.standard_normal(ntime)
    B = background_design(pc, pr, 1)
    frames = np.array(
        [
            gaussian_scene(sc + cx_true[t], sr + cy_true[t], pc, pr, radius=4.0) @ F + B @ [20, 1, -1]
            for t in range(ntime)
        ]
    )
    err = np.sqrt(frames + noise**2)
    data = frames + err * rng.standard_normal(frames.shape)
    return dict(pc=pc, pr=pr, sc=sc, sr=sr, F=F, tt=tt, cx=cx_true, cy=cy_true, data=data, err=err, model=frames)


@pytest.mark.parametrize("corr", [0, 2])
def test_shift_model_measures_offsets_and_reproduces_frames(corr, tmp_path):
    """The shift model measures the common offset of every cadence to its noise limit and its factors
    (P(d - c_t) / P(d) as a polynomial in c_t) reproduce the shifted scene of every frame."""
    # the data-driven correction has ~6000 weights: it needs a sector's worth of cadences
    d = shifted_field(ntime=60 if corr == 0 else 400)
    prf = GaussPRF(0.8)
    # the mean frame's scene matrix (unshifted positions = the mean offset removed below)
    mx, my = d["cx"].mean(), d["cy"].mean()
    S = gaussian_scene(d["sc"] + mx, d["sr"] + my, d["pc"], d["pr"], radius=4.0).tocsr()
    S.sort_indices()
    q = np.zeros(d["tt"].size, int)
    mm, summ = motion.fit_field_motion(
        d["tt"],
        d["data"],
        d["err"],
        q,
        S,
        d["F"],
        d["pc"],
        d["pr"],
        d["sc"] + mx,
        d["sr"] + my,
        {"correction_degree": corr, "deconvolve": False},
        prf=prf,
    )
    assert mm.time_model == "shift"
    ex = summ["scene_offset_column"] - (d["cx"] - mx)
    ey = summ["scene_offset_row"] - (d["cy"] - my)
    assert np.std(d["cx"]) > 0.05
    # photon-noise limit here ~ 0.8 px / sqrt(total counts ~ 3e5) ~ 2 mpx per cadence
    assert np.sqrt(np.mean(ex**2 + ey**2)) < 4e-3
    dx, dy = scene_offsets(S, d["pc"], d["pr"], d["sc"] + mx, d["sr"] + my)
    basis, tb = motion.motion_factors(mm, dx, dy, d["tt"], prf=prf)
    src = d["model"] - (
        d["model"]
        - np.array(
            [
                gaussian_scene(d["sc"] + d["cx"][t], d["sr"] + d["cy"][t], d["pc"], d["pr"], radius=4.0) @ d["F"]
                for t in range(d["tt"].size)
            ]
        )
    )
    worst_static = worst = 0.0
    for t in (0, 17, d["tt"].size - 1):
        St = S.copy()
        St.data = St.data * (basis @ tb[t])
        true_src = gaussian_scene(d["sc"] + d["cx"][t], d["sr"] + d["cy"][t], d["pc"], d["pr"], radius=4.0) @ d["F"]
        worst = max(worst, np.abs(St @ d["F"] - true_src).max() / true_src.max())
        worst_static = max(worst_static, np.abs(S @ d["F"] - true_src).max() / true_src.max())
    assert src.shape == d["model"].shape
    assert worst_static > 0.03  # the scene does move
    # and the model follows it: exactly (polynomial only), or up to the data-driven correction's own
    # noise (here the PRF is perfect, so the correction can only add noise: ~0.7 % of the peak at
    # the worst pixel with 400 cadences; on the synthetic sector it lowers z-std 1.48 -> 1.16)
    assert worst < (2e-3 if corr == 0 else 1e-2)
    io_mod.save_motion_model(tmp_path / "m.npz", mm, summ)
    back = io_mod.load_motion_model(tmp_path / "m.npz")
    b2, t2 = motion.motion_factors(back, dx, dy, d["tt"], prf=prf)
    np.testing.assert_allclose(b2 @ t2[5], basis @ tb[5])
    with pytest.raises(motion.MotionError, match="PRF"):
        motion.motion_factors(back, dx, dy, d["tt"])


def test_shift_monomial_derivatives():
    e = geometry.monomial_exponents(3)
    assert e.shape == (10, 2) and tuple(e[4]) == (1, 1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 10))
    x, y, h = 0.13, -0.07, 1e-5
    f = lambda x, y: (geometry.shift_monomials(x, y, 3) @ a.T)[0, 0]  # noqa: E731
    dfx = (a @ motion._monomial_derivative(3, 1, 0) @ geometry.shift_monomials(x, y, 3).T)[0, 0]
    dxy = (a @ motion._monomial_derivative(3, 1, 1) @ geometry.shift_monomials(x, y, 3).T)[0, 0]
    assert abs(dfx - (f(x + h, y) - f(x - h, y)) / (2 * h)) < 1e-6
    num = (f(x + h, y + h) - f(x + h, y - h) - f(x - h, y + h) + f(x - h, y - h)) / (4 * h * h)
    assert abs(dxy - num) < 1e-4


def offsets_field():
    """A 60-cadence shifted field for the offset measurements: (field dict, PRF, mean offsets mx / my, QUALITY,
    the positional arguments of measure_field_offsets / fit_field_motion up to the PRF)."""
    d = shifted_field(ntime=60)
    prf = GaussPRF(0.8)
    mx, my = d["cx"].mean(), d["cy"].mean()
    S = gaussian_scene(d["sc"] + mx, d["sr"] + my, d["pc"], d["pr"], radius=4.0).tocsr()
    S.sort_indices()
    q = np.zeros(d["tt"].size, int)
    args = (d["tt"], d["data"], d["err"], q, S, d["F"], d["pc"], d["pr"], d["sc"] + mx, d["sr"] + my)
    return d, prf, mx, my, q, args


def test_field_offsets_errors_and_given_offsets():
    """Survey mode's scene_offsets: the offsets' errors match their scatter about the truth; a shift model
    fitted with given offsets (survey.motion ccd) keeps exactly those offsets (re-centred)."""
    d, prf, mx, my, q, args = offsets_field()
    p = {"deconvolve": False, "correction_degree": 0, "offset_info_fraction": 1.0}
    off = motion.measure_field_offsets(*args, prf, p)
    assert off["good"].all()
    for ax, true in (("column", d["cx"] - mx), ("row", d["cy"] - my)):
        z = (off[ax] - true) / off[f"{ax}_err"]
        assert 0.6 < np.sqrt(np.mean(z**2)) < 1.6, ax  # honest errors (~2 mpx here)
        assert 1e-3 < np.median(off[f"{ax}_err"]) < 4e-3
    # the same offsets as the shift model's own measurement
    mm, summ = motion.fit_field_motion(*args, p, prf=prf)
    np.testing.assert_allclose(off["column"], summ["scene_offset_column"], atol=1e-12)
    # given (true) offsets: kept, re-centred on the good cadences
    given = (d["cx"] + 0.1, d["cy"] - 0.2)
    mm2, summ2 = motion.fit_field_motion(*args, p, prf=prf, offsets=given)
    np.testing.assert_allclose(summ2["scene_offset_column"], d["cx"] - d["cx"].mean(), atol=1e-12)
    np.testing.assert_allclose(mm2.reg_y, d["cy"] - d["cy"].mean(), atol=1e-12)
    with pytest.raises(motion.MotionError, match="59 cadences, the field 60"):
        motion.fit_field_motion(*args, p, prf=prf, offsets=(d["cx"][1:], d["cy"][1:]))


def test_kron_ridge_equals_the_full_kronecker_solve():
    """The shift correction's separable ridge fit (G W H + lam W = rhs, one Cholesky solve per eigenvalue of
    the small temporal Gram H) against the dense (G (x) H + lam I) solve, with a singular spatial Gram."""
    from workflow_lib.lfd.motion import _kron_ridge

    rng = np.random.default_rng(1)
    A = rng.normal(size=(120, 60))
    G = A.T @ A
    G[:, 5] = G[5, :] = 0.0  # a spline component without data
    M = rng.normal(size=(40, 9))
    H = M.T @ M
    rhs = rng.normal(size=(60, 9))
    W = _kron_ridge(G, H, rhs, 0.3)
    ref = np.linalg.solve(np.kron(G, H) + 0.3 * np.eye(60 * 9), rhs.ravel()).reshape(60, 9)
    np.testing.assert_allclose(W, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.999, 0.99])
def test_field_offsets_on_the_informative_pixels(fraction):
    """lfd.motion.offset_info_fraction: the offsets measured on the pixels holding that fraction of the
    scene's shift information (far fewer pixels: the sky carries none) stay honest about the truth and
    agree with the all-pixel offsets within their errors."""
    d, prf, mx, my, q, args = offsets_field()
    pix = motion.offset_information_pixels(*args[4:10], prf, d["err"], q, fraction)
    assert 0 < pix.size < 0.8 * d["pc"].size and np.all(np.diff(pix) > 0)
    p = {"deconvolve": False, "correction_degree": 0}
    sub = motion.measure_field_offsets(*args, prf, {**p, "offset_info_fraction": fraction})
    full = motion.measure_field_offsets(*args, prf, {**p, "offset_info_fraction": 1.0})
    assert sub["n_pixels"] == pix.size and full["n_pixels"] == d["pc"].size
    for ax, true in (("column", d["cx"] - mx), ("row", d["cy"] - my)):
        z = (sub[ax] - true) / sub[f"{ax}_err"]
        assert 0.6 < np.sqrt(np.mean(z**2)) < 1.6, ax
        dz = (sub[ax] - full[ax]) / full[f"{ax}_err"]
        assert np.sqrt(np.mean(dz**2)) < 0.3, ax  # 0.09 / 0.12 here (0.35 at fraction 0.9, 1 at 0.5)


def test_offset_step_is_the_weighted_least_squares_of_the_jacobian():
    """The scene offsets' Gauss-Newton step, normal matrix by blocks, against a plain weighted least squares
    of the explicit Jacobian [jx, jy, B] per cadence (numpy lstsq of the sqrt(w)-scaled system)."""
    from workflow_lib.lfd.motion import _offset_step

    rng = np.random.default_rng(4)
    k, npix, nb = 7, 300, 3
    jx, jy = rng.normal(size=(2, k, npix))
    B = np.column_stack([np.ones(npix), rng.uniform(-1, 1, (npix, nb - 1))])
    w = rng.uniform(0.5, 2.0, (k, npix))
    w[:, :20] = 0.0  # masked pixels
    r = rng.normal(size=(k, npix))
    BB = (B[:, :, None] * B[:, None, :]).reshape(npix, nb * nb)
    sol, N = _offset_step(jx, jy, B, BB, w, r)
    for t in range(k):
        J = np.column_stack([jx[t], jy[t], B])
        sw = np.sqrt(w[t])[:, None]
        ref = np.linalg.lstsq(J * sw, r[t] * sw[:, 0], rcond=None)[0]
        np.testing.assert_allclose(sol[t], ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(N[t], (J * w[t][:, None]).T @ J + 1e-12 * np.eye(2 + nb), rtol=1e-12)
