"""LFD motion model (Hedges & Martinez-Palomera 2021, §4.5, eqs. 17-25).

The scene drifts slowly (velocity aberration); the model of frame ``t`` is the mean-frame PRF
model multiplied, pair by pair, by a smooth factor (eq. 25). The factor is fitted to the data:

1. *Bin* the pixel time series in time (eqs. 17-18): consecutive groups of ``bin_size`` good
   cadences are averaged. The paper uses 200 Kepler long cadences (~4 d). TESS default: the
   number of cadences spanning 1 day (48 at 30-min FFI cadence -> ~26 bins per 27-d sector):
   velocity-aberration drift evolves over the whole sector (smooth, cubic in time, eq. 23), so a
   1-d resolution loses nothing, while 26 bins keep the cubic well constrained even with the
   mid-sector gap and each bin averages ~48 frames (noise / ~7).
2. *Normalise* each binned pixel by its mean over bins, after removing the per-bin background
   (TESS has a sky and scattered light; the paper's Kepler assumes ~0): ``y = (F_bin - B_bin) /
   mean_b(F_bin - B_bin)``. ``B_bin`` is the background part (``background_order``: default a
   plane, because TESS scattered light has a gradient) of a mean-scene LFD solve of each binned
   frame. Only pixels where the source is at least ``min_source_fraction`` of the pixel's mean
   flux are used, so that background errors cannot masquerade as motion.
3. On *uncontaminated* pixels (§4.2; inside the edge radius of exactly one source), model ``y``
   as a Cartesian B-spline in the pixel offset from that source (``dx``, ``dy``; tensor product of
   the two spline design matrices, eqs. 19-22) times a cubic polynomial in time (eq. 23), fitted
   with the linear least squares of App. B. Weights of the time-constant term have prior mean 1
   (B-splines are a partition of unity, so "no motion" = factor 1), the others 0; the prior width
   (``prior_sigma`` = 0.05) keeps spline components with few data points near "no motion"
   (with sigma = 1 the sparsely sampled components of a crowded TESS cutout over-fit and made
   the photometry worse than without motion).
   ``time_model: centroid`` (default) replaces the cubic in time by a quadratic in the measured
   common scene offset of every cadence (flux-weighted centroid of the uncontaminated pixels,
   :func:`scene_centroid`) -- the paper's §5 suggestion for motion that is not smooth in time.
   On the synthetic TESS sector (drift + 0.02 px jitter + momentum-dump excursions) it brings
   the constant-star residuals from 3.5 to 1.6 x their errors (40x40x480 test field, 11 knots);
   ``polynomial`` is eq. 23 as published. The response to an offset is learnt from the binned
   data (the slow drift gives the lever arm) and applied at every cadence.
4. Iterate (``n_iter``), masking sources whose residuals are significantly worse than typical
   (sigma clipping on the per-source chi^2 - astrophysically variable sources, §4.5).

``time_model: shift`` (default; :func:`fit_shift_model`). The synthetic and real TESS scene moves
rigidly: frame t is the mean scene shifted by a common offset c_t. c_t is measured at *every*
cadence (no binning) by Gauss-Newton fits of the mean-frame model's spatial derivatives to each
frame (:func:`measure_scene_offsets`; 2-3 mpx rms vs truth on the default field, whose jitter is
20 mpx). The factor of pair k is ``P(d_k - c_t) / P(d_k)`` written as a polynomial in c_t
(:func:`shift_coefficients`: the PRF-gradient x offset Taylor term plus curvature and third order,
least-squares on Chebyshev nodes over the measured range; the mean-frame PRF is de-blurred by the
offsets' covariance first), i.e. still a linear model multiplying the mean PRF with the offset
monomials as time basis. The paper's data-driven §4.5 spline in (dx, dy) - here times the offset
monomials up to ``correction_degree``, fitted to the residuals of uncontaminated pixels at every
cadence, per-pixel constants profiled out (:func:`fit_shift_correction`) - can be added to the
analytic basis to absorb errors of the fitted PRF's gradient. It is off by default
(``correction_degree`` 0): with the PRF's core terms and regular centre the 30 randomized scenes
came out as quiet without it and a pair member's eclipse leaked less into its neighbour.

:func:`motion_model` then yields, for each cadence, the factor at every (source, pixel) pair of
the scene matrix (eq. 24); :func:`motion_factors` gives the same as the low-rank product
``basis @ time_basis[t]`` used by :mod:`workflow_lib.lfd.solve`.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from workflow_lib.core.linalg import clip_mask, wls
from workflow_lib.core.logs import get_logger
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.lfd.bspline import spline_design_matrix, tensor_product
from workflow_lib.lfd.geometry import (
    background_design,
    dominant_source,
    monomial_exponents,
    n_terms,
    scene_pairs,
    shift_monomials,
)
from workflow_lib.lfd.linsys import build_system, solve_direct, solve_pcg

log = get_logger("lfd.motion")


class MotionError(ValueError):
    """The motion model cannot be fitted or read; the message names the file / problem."""


def motion_params(params: dict | None) -> dict:
    """The lfd.motion settings: defaults overridden by ``params``."""
    return merge_settings(schema_defaults("lfd.motion"), params, "lfd.motion", MotionError)


def default_bin_size(mission: str, time) -> int:
    """Cadences per time bin (§4.5): 200 for Kepler/K2 (the paper), 1 day of cadences for TESS."""
    if mission in ("Kepler", "K2"):
        return 200
    t = np.asarray(time, float)
    dt = np.nanmedian(np.diff(t)) if t.size > 1 else 1.0
    return max(1, int(round(1.0 / dt)))


# --------------------------------------------------------------------------- binning (eqs. 17-18)


def bin_frames(time, flux, flux_err, good, bin_size: int):
    """Average consecutive groups of ``bin_size`` good cadences (eq. 17-18).

    ``flux``/``flux_err``: (ntime, npixel); ``good``: (ntime,) bool. A last partial bin shorter
    than half a bin is merged into the previous one. NaNs are ignored. Returns
    ``(bin_time, bin_flux, bin_err, bin_index)`` with bin_index (ntime,) = bin of each cadence or -1.
    """
    time = np.asarray(time, float)
    idx = np.flatnonzero(np.asarray(good, bool))
    if idx.size == 0:
        raise MotionError("no good cadences to bin")
    nb = max(1, idx.size // bin_size)
    if idx.size - nb * bin_size >= bin_size / 2:
        nb += 1
    labels = np.minimum(np.arange(idx.size) // bin_size, nb - 1)
    bin_index = np.full(time.size, -1)
    bin_index[idx] = labels
    f = np.asarray(flux, float)[idx]
    e = np.asarray(flux_err, float)[idx]
    ok = np.isfinite(f) & np.isfinite(e)
    fz = np.where(ok, f, 0.0)
    ez = np.where(ok, e**2, 0.0)
    npx = f.shape[1]
    n = np.zeros((nb, npx))
    sf = np.zeros((nb, npx))
    se = np.zeros((nb, npx))
    np.add.at(n, labels, ok)
    np.add.at(sf, labels, fz)
    np.add.at(se, labels, ez)
    with np.errstate(invalid="ignore", divide="ignore"):
        bf = sf / n
        be = np.sqrt(se) / n
    bt = np.bincount(labels, weights=time[idx]) / np.bincount(labels)
    return bt, bf, be, bin_index


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass
class MotionModel:
    """Fitted weights of eq. 23 and everything needed to evaluate eq. 24."""

    weights: np.ndarray  # (n_components, time_degree + 1)
    knots: np.ndarray  # break points used for both dx and dy [px]
    degree: int
    time_degree: int
    t0: float  # time normalisation: tau = (t - t0) / tscale
    tscale: float
    time_model: str = "polynomial"  # or "centroid" (regressors = measured scene offset, §5)
    reg_time: np.ndarray | None = None  # centroid mode: cadence times and the normalised
    reg_x: np.ndarray | None = None  # scene offsets (column, row) at those cadences
    reg_y: np.ndarray | None = None
    shift_cov: np.ndarray | None = None  # shift mode: 2x2 covariance of the offsets over the mean frame's cadences
    shift_range: float = 0.0  # shift mode: half-width [px] of the offset stencil

    def spatial_basis(self, dx, dy) -> sp.csr_matrix:
        """Tensor-product spline of (dx, dy) (eqs. 19-22); offsets beyond the knots are clamped."""
        Ax = spline_design_matrix(dx, self.knots, self.degree, clip=True)
        Ay = spline_design_matrix(dy, self.knots, self.degree, clip=True)
        return tensor_product(Ax, Ay)

    def time_basis(self, time) -> np.ndarray:
        """Cubic (``time_degree``) polynomial in normalised time, (ntime, time_degree+1) (eq. 23);
        in ``centroid`` mode the quadratic in the measured scene offset instead (:func:`centroid_basis`)."""
        if self.time_model == "centroid":
            t = np.asarray(time, float)
            return centroid_basis(np.interp(t, self.reg_time, self.reg_x), np.interp(t, self.reg_time, self.reg_y))
        if self.time_model == "shift":
            cx, cy = self.offsets(time)
            return shift_monomials(cx, cy, self.time_degree)
        tau = (np.asarray(time, float) - self.t0) / self.tscale
        return np.vander(tau, self.time_degree + 1, increasing=True)

    def offsets(self, time):
        """Shift mode: the measured common scene offset (column, row) [px] at ``time`` (exact at the
        fitted cadences, linear interpolation between them)."""
        t = np.asarray(time, float)
        return np.interp(t, self.reg_time, self.reg_x), np.interp(t, self.reg_time, self.reg_y)


def centroid_basis(cx, cy) -> np.ndarray:
    """``[1, cx, cy, cx^2, cx cy, cy^2]``: the §4.5 time dependence written as a function of the
    measured common scene offset (the paper's §5 suggestion for motion that is not smooth in time,
    e.g. K2 roll or TESS jitter) instead of a cubic in time."""
    cx = np.asarray(cx, float)
    cy = np.asarray(cy, float)
    return np.column_stack([np.ones_like(cx), cx, cy, cx**2, cx * cy, cy**2])


def scene_centroid(flux, background, pix, pix_dx, pix_dy, pix_source_flux):
    """Per cadence, the common offset of the scene [px]: flux-weighted mean of (dx, dy) over the
    uncontaminated pixels ``pix`` (background removed), minus nothing (the caller subtracts the
    mean). ``flux`` (ntime, npixel), ``background`` (ntime, npixel) or None."""
    f = np.asarray(flux, float)[:, pix]
    if background is not None:
        f = f - background[:, pix]
    ok = np.isfinite(f)
    f = np.where(ok, f, 0.0)
    # pixels missing at a cadence are replaced by their mean-frame value so the weights stay fixed
    f = np.where(ok, f, pix_source_flux[None, :])
    tot = f.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (f @ pix_dx) / tot, (f @ pix_dy) / tot


# --------------------------------------------------------------------------- shift model


def _monomial_derivative(degree: int, ax: int, ay: int) -> np.ndarray:
    """Matrix D with ``d^(ax+ay)/dcx^ax dcy^ay (sum_k a_k m_k) = sum_k (a @ D)_k m_k``."""
    e = monomial_exponents(degree)
    pos = {tuple(v): k for k, v in enumerate(e)}
    D = np.zeros((len(e), len(e)))
    for k, (i, j) in enumerate(e):
        if i >= ax and j >= ay:
            c = np.prod(np.arange(i - ax + 1, i + 1)) * np.prod(np.arange(j - ay + 1, j + 1))
            D[k, pos[(i - ax, j - ay)]] = c
    return D


def shift_coefficients(prf, dx, dy, degree: int, half_width: float, cov=None) -> np.ndarray:
    """Per (source, pixel) pair, the PRF value of the scene shifted by (cx, cy) as a polynomial in
    the shift: ``P(dx - cx, dy - cy) ~= shift_monomials(cx, cy) @ a`` (returns ``a``, (npair, n_terms)).

    The source moves by (cx, cy), so the pixel's offset from it becomes (dx - cx, dy - cy) (times
    ``L(phase) / L(phase + c)`` for a lattice-normalised model, :meth:`PRFModel.lattice_factor`). The
    polynomial is fitted by least squares to the PRF model (``prf.evaluate(dx, dy)``, e.g. a
    :class:`workflow_lib.lfd.prf.PRFModel`) on a (degree + 3)^2 grid of Chebyshev nodes over
    [-half_width, half_width]^2: it is the Taylor expansion ("PRF gradient x offset", plus
    curvature and third-order terms) made uniformly accurate over the range of measured offsets.

    ``cov`` (2x2, optional): covariance of the offsets over the cadences of the mean frame. The
    PRF fitted to the mean frame is the instantaneous PRF smeared by the motion, ``P = <Q(x - c)>
    ~= Q + cov:H/2`` (H the Hessian); the instantaneous PRF is then ``Q ~= P - cov:H/2``, applied
    here to the polynomial (second derivatives in the shift equal those in the offset).
    """
    dx = np.asarray(dx, float)
    dy = np.asarray(dy, float)
    h = max(float(half_width), 1e-3)
    n = int(degree) + 3
    nodes = h * np.cos((2 * np.arange(n) + 1) * np.pi / (2 * n))
    gx, gy = [g.ravel() for g in np.meshgrid(nodes, nodes, indexing="ij")]
    M = shift_monomials(gx, gy, degree)  # (n_nodes, n_terms)
    pinv = np.linalg.pinv(M)  # (n_terms, n_nodes)
    a = np.zeros((dx.size, M.shape[1]))
    # a lattice-normalised scene (lfd.prf.lattice_norm) divides each source by its lattice sum at its
    # sub-pixel phase (PRFModel.lattice_factor; the source's phase on the pixel lattice is that of -dx):
    # shifted, the phase moves with it, so the shifted PRF carries L(phase) / L(phase + shift)
    lattice = bool(getattr(prf, "lattice_norm", False))
    if lattice:
        L0 = prf.lattice_factor(-dx.ravel(), -dy.ravel())
    for j in range(gx.size):
        vals = np.asarray(prf.evaluate(dx - gx[j], dy - gy[j]), float).ravel()
        if lattice:
            vals = vals * L0 / prf.lattice_factor(gx[j] - dx.ravel(), gy[j] - dy.ravel())
        a += np.outer(vals, pinv[:, j])
    if cov is not None:
        C = np.asarray(cov, float)
        corr = (
            C[0, 0] * (a @ _monomial_derivative(degree, 2, 0))
            + 2 * C[0, 1] * (a @ _monomial_derivative(degree, 1, 1))
            + C[1, 1] * (a @ _monomial_derivative(degree, 0, 2))
        )
        a = a - 0.5 * corr
    return a


def measure_scene_offsets(
    flux,
    flux_err,
    scene_terms,
    background,
    degree: int,
    *,
    n_iter: int = 4,
    clip: float = 5.0,
    good=None,
    chunk: int = 128,
    init=None,
    errors: bool = False,
):
    """Common scene offset (cx, cy) [px] of every cadence by Gauss-Newton on the whole scene.

    The model of cadence t is ``scene_terms @ shift_monomials(cx_t, cy_t) + background @ b_t``
    (``scene_terms`` (npixel, n_terms) = the sum over sources of mean flux x the shift
    polynomial of :func:`shift_coefficients`): a linearised fit of the scene's spatial derivatives to
    each frame, iterated ``n_iter`` times (converges to the non-linear least-squares offset). Pixels
    whose chi^2 per cadence exceeds the median by ``clip`` robust sigma (variable stars, the
    transient, bad pixels) are left out after the first pass. Returns ``(cx, cy, ok, pixel_used,
    background_coefficients (ntime, nbk))``.

    ``init``: starting offsets ``(cx, cy)`` (default 0); with ``n_iter=0`` they are kept and only the
    background coefficients and the pixel clipping are computed at them. ``errors``: also return the
    1-sigma errors ``(ex, ey)`` of the offsets from the last pass's normal matrix N_t (the Gauss-Newton
    covariance ``inv(N_t)`` of (cx, cy, b) scaled by that cadence's reduced chi^2,
    ``sigma^2 = [inv(N_t)]_jj chi^2_t / (n_t - 2 - n_bk)``), appended to the tuple.
    """
    flux = np.asarray(flux)
    ferr = np.asarray(flux_err)
    nt, npix = flux.shape
    T = np.asarray(scene_terms, float)
    B = np.asarray(background, float).reshape(npix, -1)
    nb = B.shape[1]
    Dx = _monomial_derivative(degree, 1, 0)
    Dy = _monomial_derivative(degree, 0, 1)
    TDx, TDy = T @ Dx, T @ Dy  # d/dcx, d/dcy of the model image, per monomial
    BB = (B[:, :, None] * B[:, None, :]).reshape(npix, nb * nb)  # per pixel, the products of background terms
    cx = np.zeros(nt) if init is None else np.where(np.isfinite(init[0]), init[0], 0.0).astype(float)
    cy = np.zeros(nt) if init is None else np.where(np.isfinite(init[1]), init[1], 0.0).astype(float)
    bk = np.zeros((nt, nb))
    ex = np.full(nt, np.nan)
    ey = np.full(nt, np.nan)
    ok = np.isfinite(flux).any(axis=1)
    use_pix = np.ones(npix, bool)
    good = ok if good is None else (np.asarray(good, bool) & ok)
    for it in range(int(n_iter) + 1):
        chi_pix = np.zeros(npix)
        n_pix = np.zeros(npix)
        for i0 in range(0, nt, chunk):
            i1 = min(nt, i0 + chunk)
            f = np.asarray(flux[i0:i1], float)
            s = np.asarray(ferr[i0:i1], float)
            fin = np.isfinite(f) & np.isfinite(s) & (s > 0) & use_pix[None, :]
            w = np.where(fin, 1.0 / np.where(fin, s, 1.0) ** 2, 0.0)
            f = np.where(fin, f, 0.0)
            m = shift_monomials(cx[i0:i1], cy[i0:i1], degree)  # (k, nterm)
            model = m @ T.T  # (k, npix)
            jx = m @ TDx.T
            jy = m @ TDy.T
            r = f - model
            # per cadence: [jx, jy, B] least squares for (dcx, dcy, b); the normal matrix block by block
            # (weighted sums over pixels, BLAS for the background columns) without forming the Jacobian
            sol, N = _offset_step(jx, jy, B, BB, w, r)
            step = np.where(ok[i0:i1, None], sol[:, :2], 0.0)
            if it < int(n_iter):
                cx[i0:i1] += np.clip(step[:, 0], -0.5, 0.5)
                cy[i0:i1] += np.clip(step[:, 1], -0.5, 0.5)
            bk[i0:i1] = sol[:, 2:]
            res = r - sol[:, :1] * jx - sol[:, 1:2] * jy - sol[:, 2:] @ B.T
            if errors and it == int(n_iter):
                dof = np.maximum(fin.sum(axis=1) - 2 - nb, 1)
                chi_t = (res**2 * w).sum(axis=1) / dof
                var = np.linalg.inv(N)[:, [0, 1], [0, 1]] * chi_t[:, None]
                ex[i0:i1], ey[i0:i1] = np.sqrt(var[:, 0]), np.sqrt(var[:, 1])
            g = good[i0:i1, None] & fin
            chi_pix += np.where(g, res**2 * w, 0.0).sum(axis=0)
            n_pix += g.sum(axis=0)
        if it == 0:
            with np.errstate(invalid="ignore", divide="ignore"):
                chi = chi_pix / n_pix
            have = n_pix > 0
            below, med, _ = clip_mask(chi, have, clip, floor=1e-12, side="upper")
            use_pix = have & below
            log.info("scene offsets: median chi2/pt %.2f, %d of %d pixels kept", med, use_pix.sum(), have.sum())
    if errors:
        return cx, cy, ok, use_pix, bk, np.where(ok, ex, np.nan), np.where(ok, ey, np.nan)
    return cx, cy, ok, use_pix, bk


def _offset_step(jx, jy, B, BB, w, r):
    """One Gauss-Newton step of :func:`measure_scene_offsets` for a block of cadences: per cadence t the
    weighted least squares ``r_t ~ dcx jx_t + dcy jy_t + B b_t`` (``jx``, ``jy``, ``w``, ``r`` (k, npix),
    ``B`` (npix, nb), ``BB`` its per-pixel products (npix, nb^2)). Normal matrix ``N_t = J_t^T W_t J_t`` of
    ``J_t = [jx_t, jy_t, B]`` by blocks: the offset block as weighted sums over pixels, the mixed and
    background blocks as matrix products with B. Returns ``(solution (k, 2 + nb), N (k, 2 + nb, 2 + nb))``."""
    k, nb = jx.shape[0], B.shape[1]
    wx, wy, wr = w * jx, w * jy, w * r
    N = np.empty((k, 2 + nb, 2 + nb))
    N[:, 0, 0] = (wx * jx).sum(axis=1)
    N[:, 0, 1] = N[:, 1, 0] = (wx * jy).sum(axis=1)
    N[:, 1, 1] = (wy * jy).sum(axis=1)
    N[:, 0, 2:] = N[:, 2:, 0] = wx @ B
    N[:, 1, 2:] = N[:, 2:, 1] = wy @ B
    N[:, 2:, 2:] = (w @ BB).reshape(k, nb, nb)
    rhs = np.concatenate([(wx * r).sum(axis=1)[:, None], (wy * r).sum(axis=1)[:, None], wr @ B], axis=1)
    N[:, np.arange(2 + nb), np.arange(2 + nb)] += 1e-12
    return np.linalg.solve(N, rhs[:, :, None])[:, :, 0], N


def clip_sources(chi2, count, owner, used_src, have, sigma_clip: float, what: str) -> np.ndarray:
    """One §4.5 source-masking step of the motion fits: per source, chi^2 per point (``chi2`` and
    ``count`` per pixel, summed over the pixels it owns, ``owner``); sources whose chi^2 per point
    exceeds the median of the kept ones by ``sigma_clip`` robust sigma leave the fit. Sources
    without pixels (``~have``) stay flagged as used (they have nothing to clip). Returns the new
    ``used_src`` mask; ``what`` names the step in the log line."""
    n = used_src.size
    chi = np.bincount(owner, weights=chi2, minlength=n) / np.maximum(np.bincount(owner, weights=count, minlength=n), 1)
    below, med, _ = clip_mask(chi, have & used_src, sigma_clip, floor=1e-12, side="upper")
    new = ~have | below
    log.info("%s: median chi2/pt %.2f, %d of %d sources kept", what, med, (new & have).sum(), have.sum())
    return new


def _kron_ridge(G, H, rhs, lam: float) -> np.ndarray:
    """W solving ``G W H + lam W = rhs`` (the normal equations ``(G (x) H + lam I) vec W = vec rhs`` of a
    separable ridge fit; G (n, n) sparse or dense and H (K, K) symmetric positive semi-definite, lam > 0).

    In the eigenbasis of the small H = V diag(h) V^T the system splits into K independent n x n systems,
    ``(h_j G + lam I) w'_j = (rhs V)_j``, each solved by a sparse LU factorisation (G of tensor-product
    B-splines is banded); W = W' V^T. H's eigenvalues are clipped at 0 (round-off)."""
    h, V = np.linalg.eigh(H)
    R = rhs @ V
    G = sp.csc_matrix(G)
    eye = sp.identity(G.shape[0], format="csc") * lam
    Wp = np.column_stack([spla.splu((hj * G + eye).tocsc()).solve(R[:, j]) for j, hj in enumerate(np.clip(h, 0, None))])
    return Wp @ V.T


def fit_shift_correction(
    resid, weight, owner, dx, dy, mono, *, knots, degree: int, prior_sigma: float, n_iter: int, sigma_clip: float
):
    """Data-driven correction of the shift model (§4.5, the paper's spline in (dx, dy) times a time
    basis, here the offset monomials ``mono`` (ntime, K) without the constant).

    ``resid`` (ntime, npix): data minus the shift-model scene divided by the pixel's own source
    flux (F_s P(d)) for uncontaminated pixels of offsets (dx, dy) from their source ``owner``;
    ``weight`` (npix,) its inverse variance. Model: ``resid_pt = sum_k db_k(dx_p, dy_p) (mono_tk -
    mean_t mono_tk) + const_p`` (the per-pixel constant - the time-constant PRF mismatch - is
    profiled out by centring in time). ``db_k`` are tensor-product B-splines with a Gaussian prior
    N(0, (prior_sigma / R^order_k)^2), R = the offset range folded into ``mono`` scaling by the
    caller. With time-constant weights the normal matrix is the Kronecker product G (x) H of the
    spatial and temporal Gram matrices, solved in the eigenbasis of the small temporal one (:func:`_kron_ridge`).
    Sources whose chi^2 per point exceeds the median by ``sigma_clip`` robust sigma (variable
    stars) are left out and the fit repeated (``n_iter``). Returns ``(W (ncomp, K), mean_mono (K,), used)``.
    """
    R = np.asarray(resid, float)
    fin = np.isfinite(R)
    R = np.where(fin, R, 0.0)
    Mc = mono - mono.mean(axis=0)
    A = tensor_product(
        spline_design_matrix(dx, knots, degree, clip=True), spline_design_matrix(dy, knots, degree, clip=True)
    )
    H = Mc.T @ Mc
    owner = np.asarray(owner)
    used_src = np.ones(owner.max() + 1, bool)
    Rc = R - (R.sum(axis=0) / np.maximum(fin.sum(axis=0), 1))[None, :] * fin
    for it in range(int(n_iter) + 1):
        w = np.where(used_src[owner], weight, 0.0)
        G = (A.T @ sp.diags(w) @ A).tocsc()
        rhs = np.asarray(A.T @ (w[:, None] * (Rc.T @ Mc)))  # (ncomp, K)
        Wc = _kron_ridge(G, H, rhs, 1.0 / prior_sigma**2)
        if it == int(n_iter):
            break
        model = (A @ Wc) @ Mc.T  # (npix, ntime)
        chi = ((Rc.T - model) ** 2 * fin.T).sum(axis=1) * weight
        cnt = fin.sum(axis=0)
        have = np.bincount(owner, minlength=used_src.size) > 0
        new = clip_sources(chi, cnt, owner, used_src, have, sigma_clip, f"shift correction iteration {it}")
        if np.array_equal(new, used_src):
            break
        used_src = new
    return Wc, mono.mean(axis=0), used_src[owner]


def _scene_shift_terms(prf, rows, cols, dx, dy, F, npix: int, degree: int, half: float, cov):
    """Per pixel, the scene as a polynomial in the common shift: the sum over its pairs of source
    flux x :func:`shift_coefficients` (npixel, n_terms)."""
    a = shift_coefficients(prf, dx, dy, degree, half, cov)
    return np.stack([np.bincount(rows, weights=a[:, k] * F[cols], minlength=npix) for k in range(a.shape[1])], axis=1)


def _recentred(cx, cy, g, have, p: dict):
    """Offsets relative to their mean over the cadences ``g`` (the mean-frame PRF sits at the mean offset),
    the stencil range ``half`` of the shift polynomial (5 % beyond the largest offset of the cadences
    ``have``, at least 0.021 px) and, with ``deconvolve``, the offsets' covariance over ``g``."""
    cx = cx - cx[g].mean()
    cy = cy - cy[g].mean()
    half = float(max(np.abs(cx[have]).max(), np.abs(cy[have]).max(), 0.02)) * 1.05
    cov = np.cov(np.vstack([cx[g], cy[g]])) if p["deconvolve"] else None
    return cx, cy, half, cov


def _shift_offsets(flux, flux_err, background, good, terms, p: dict, degree: int, name: str, errors: bool = False):
    """Two rounds of :func:`measure_scene_offsets`, the second with the stencil range and (``deconvolve``)
    offset covariance of the first. Returns ``(cx, cy, ok, pixel_used, background coefficients, half, cov)``
    with the offsets relative to their mean over good cadences (the mean-frame PRF sits there); with
    ``errors`` also the offsets' 1-sigma errors ``(ex, ey)`` of the last round."""
    half = 0.5
    cov = None
    for rnd in range(2):
        T = terms(half, cov)
        out = measure_scene_offsets(
            flux,
            flux_err,
            T,
            background,
            degree,
            n_iter=int(p["shift_iter"]),
            clip=float(p["shift_clip"]),
            good=good,
            errors=errors,
        )
        cx, cy, ok, use_pix, bk = out[:5]
        g = good & ok
        cx, cy, half, cov = _recentred(cx, cy, g, ok, p)
        log.info(
            "%s: scene offsets round %d: rms %.4f / %.4f px, range +-%.3f px", name, rnd, cx[g].std(), cy[g].std(), half
        )
    if errors:
        return cx, cy, ok, use_pix, bk, half, cov, out[5], out[6]
    return cx, cy, ok, use_pix, bk, half, cov


def _given_offsets(flux, flux_err, background, good, terms, p: dict, degree: int, offsets):
    """:func:`_shift_offsets` for offsets given from outside (survey mode's CCD-level model): re-centred on
    the good cadences, stencil range and covariance from them, background and pixel clipping at them."""
    cx, cy = (np.asarray(a, float) for a in offsets)
    nt = np.shape(flux)[0]
    if cx.shape != (nt,) or cy.shape != (nt,):
        raise MotionError(f"given scene offsets have {cx.shape[0]} cadences, the field {nt}")
    have = np.isfinite(cx) & np.isfinite(cy)
    g = good & have
    if g.sum() < 2:
        raise MotionError("given scene offsets: fewer than 2 good cadences")
    cx, cy, half, cov = _recentred(cx, cy, g, have, p)
    _, _, ok, use_pix, bk = measure_scene_offsets(
        flux, flux_err, terms(half, cov), background, degree, n_iter=0, clip=float(p["shift_clip"]), good=good,
        init=(cx, cy),
    )  # fmt: skip
    return cx, cy, ok & have, use_pix, bk, half, cov


def _shift_scene(S, source_flux, pixel_col, pixel_row, source_col, source_row, prf, flux, quality, degree: int):
    """What both shift-model fits build first: the (pixel, source) pairs of ``S``, the sources' fluxes
    (clipped at 0), the good cadences (QUALITY 0 with data) and ``terms(half, cov)``, the scene's shift
    polynomial terms (:func:`_scene_shift_terms`). Returns ``(S, F, good, terms)``."""
    S, rows, cols, dx, dy = scene_pairs(S, pixel_col, pixel_row, source_col, source_row)
    F = np.clip(np.asarray(source_flux, float), 0.0, None)
    npix = S.shape[0]
    good = (np.asarray(quality) == 0) & np.isfinite(np.asarray(flux)).any(axis=1)

    last = {}

    def terms(half, cov):  # the last result kept: given offsets ask twice for the same (half, cov)
        key = (float(half), None if cov is None else np.asarray(cov, float).tobytes())
        if key not in last:
            last.clear()
            last[key] = _scene_shift_terms(prf, rows, cols, dx, dy, F, npix, degree, half, cov)
        return last[key]

    return S, F, good, terms


def offset_information_pixels(
    S, source_flux, pixel_col, pixel_row, source_col, source_row, prf, flux_err, quality, fraction: float, step=0.05
) -> np.ndarray:
    """The pixels that carry ``fraction`` of the scene's information on a common shift: taken most
    informative first until their sum reaches ``fraction`` of the total; returned as sorted pixel indices.

    The Fisher information of pixel p on the offset (c_x, c_y) is ``(|dM_p/dc_x|^2 + |dM_p/dc_y|^2) /
    sigma_p^2``, with ``M_p = sum_s F_s P(d_ps - c)`` the mean-frame scene (its derivatives by central
    differences of ``step`` px of the PRF model) and ``sigma_p`` the pixel's rms error over the good
    cadences. Sky pixels far from every star carry almost none: a tile's offsets can be measured on the
    pixels of its stars' cores and wings only (the background terms are fitted on those pixels too).
    """
    S, rows, cols, dx, dy = scene_pairs(S, pixel_col, pixel_row, source_col, source_row)
    F = np.clip(np.asarray(source_flux, float), 0.0, None)[cols]
    npix = S.shape[0]
    h = float(step)
    grad = [
        np.bincount(rows, weights=F * (prf.evaluate(dx - h * ex, dy - h * ey) - prf.evaluate(dx + h * ex, dy + h * ey)), minlength=npix)
        / (2 * h)
        for ex, ey in ((1.0, 0.0), (0.0, 1.0))
    ]  # fmt: skip
    ferr = np.asarray(flux_err, float)
    good = np.asarray(quality) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nanmean(ferr[good] ** 2, axis=0) if good.any() else np.nanmean(ferr**2, axis=0)
    info = np.where(np.isfinite(var) & (var > 0), (grad[0] ** 2 + grad[1] ** 2) / np.where(var > 0, var, 1.0), 0.0)
    order = np.argsort(-info, kind="stable")
    cum = np.cumsum(info[order])
    n = int(np.searchsorted(cum, fraction * cum[-1], side="left")) + 1 if cum[-1] > 0 else npix
    return np.sort(order[: min(max(n, 1), npix)])


def measure_field_offsets(
    time,
    flux,
    flux_err,
    quality,
    S,
    source_flux,
    pixel_col,
    pixel_row,
    source_col,
    source_row,
    prf,
    params: dict | None = None,
    *,
    name: str = "field",
) -> dict:
    """The shift model's per-cadence scene offsets c_t of one field with their errors, nothing else.

    The same two rounds of Gauss-Newton as :func:`fit_shift_model` (:func:`measure_scene_offsets`: the
    mean-frame model's spatial derivatives fitted to each frame), offsets relative to their mean over the
    good cadences; errors from the last round's normal matrix scaled by the cadence's reduced chi^2.
    Returns ``{time, column, row, column_err, row_err, good}`` (NaN where a cadence has no offset).
    Survey mode's ``scene_offsets`` step; the CCD-level fit is :mod:`workflow_lib.survey.motion`.
    """
    p = motion_params(params)
    deg = int(p["shift_degree"])
    frac = float(p["offset_info_fraction"])
    B = background_design(pixel_col, pixel_row, p["background_order"])  # on the whole field's pixel box
    if frac < 1.0:
        pix = offset_information_pixels(
            S, source_flux, pixel_col, pixel_row, source_col, source_row, prf, flux_err, quality, frac
        )
        log.info(
            "%s: scene offsets on %d of %d pixels (%.3g of the shift information)", name, pix.size, B.shape[0], frac
        )
        S = sp.csr_matrix(S)[pix]
        flux, flux_err = np.asarray(flux)[:, pix], np.asarray(flux_err)[:, pix]
        pixel_col, pixel_row, B = np.asarray(pixel_col)[pix], np.asarray(pixel_row)[pix], B[pix]
    _, _, good, terms = _shift_scene(
        S, source_flux, pixel_col, pixel_row, source_col, source_row, prf, flux, quality, deg
    )
    cx, cy, ok, _, _, _, _, ex, ey = _shift_offsets(flux, flux_err, B, good, terms, p, deg, name, errors=True)

    def nan_out(a):
        return np.where(ok, a, np.nan)

    return dict(
        time=np.asarray(time, float),
        column=nan_out(cx),
        row=nan_out(cy),
        column_err=nan_out(ex),
        row_err=nan_out(ey),
        good=good & ok,
        n_pixels=np.int64(B.shape[0]),
    )


@dataclasses.dataclass(frozen=True)
class ShiftField:
    """The arrays of one field the shift model is fitted to: ``flux``/``flux_err`` (ntime, npixel), the
    scene ``S`` (npixel x nsource) with source fluxes ``F`` (clipped at 0), the background design
    ``background`` (npixel, nterm), the good cadences ``good``, and the pixel and source positions."""

    flux: np.ndarray
    flux_err: np.ndarray
    S: sp.spmatrix
    F: np.ndarray
    background: np.ndarray
    good: np.ndarray
    pixel_col: np.ndarray
    pixel_row: np.ndarray
    source_col: np.ndarray
    source_row: np.ndarray


def _correction_pixels(field: ShiftField, use_pix, p: dict):
    """The bright, pure pixels the shift-model correction is fitted to: one source gives >=
    ``min_purity`` of the scene (§4.2), its per-cadence SNR is >= ``min_snr`` and the offset
    measurement used the pixel. Returns ``(pix, owner, own_val, perr)`` (owner/own_val/perr of every pixel)."""
    owner, purity = dominant_source(field.S, field.F)  # F clipped at 0
    own_val = np.asarray(field.S.multiply(field.F[None, :]).max(axis=1).todense()).ravel()
    ferr = np.asarray(field.flux_err, float)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (dead) pixels: NaN error, left out below
        perr = np.sqrt(np.nanmean(ferr[field.good] ** 2, axis=0))
    snr = own_val / perr
    pix = np.flatnonzero(
        (purity >= p["min_purity"]) & (owner >= 0) & (snr >= p["min_snr"]) & use_pix & np.isfinite(perr)
    )
    return pix, owner, own_val, perr


def _shift_model_correction(field: ShiftField, T, mono, bk, ok, use_pix, half, p, name):
    """The data-driven correction of the shift model (:func:`fit_shift_correction`) on the bright,
    pure pixels of the field (:func:`_correction_pixels`). Returns ``(weights (ncomp, n_terms), knots,
    summary entries)``; no correction (empty weights) when ``correction_degree`` < 1 or fewer than 10
    pixels qualify."""
    weights = np.zeros((0, mono.shape[1]))
    knots = np.zeros(2)
    summary = {}
    kdeg = int(p["correction_degree"])
    if kdeg < 1:
        return weights, knots, summary
    good = field.good
    pc = np.asarray(field.pixel_col, float)
    pr = np.asarray(field.pixel_row, float)
    pix, owner, own_val, perr = _correction_pixels(field, use_pix, p)
    nk = n_terms(kdeg)
    if pix.size < 10:
        return weights, knots, summary
    model = mono[:, :] @ T[pix].T + bk @ np.asarray(field.background, float)[pix].T
    fl = np.asarray(field.flux, float)[:, pix]
    resid = (fl - model) / own_val[pix][None, :]
    resid[~(good & ok)] = np.nan
    own = owner[pix]
    pdx = pc[pix] - np.asarray(field.source_col, float)[own]
    pdy = pr[pix] - np.asarray(field.source_row, float)[own]
    Rk = float(max(np.abs(pdx).max(), np.abs(pdy).max())) + 0.5
    spacing = float(p["correction_spacing"])
    nkn = max(2, int(np.ceil(2 * Rk / spacing)) + 1)
    knots = np.linspace(-Rk, Rk, nkn)
    # monomials scaled by the offset range so one prior width fits every order
    scale = np.array([half ** (i + j) for i, j in monomial_exponents(kdeg)[1:]])
    mono_k = mono[:, 1:nk] / scale
    gk = good & ok
    Wc, mbar, used = fit_shift_correction(
        resid[gk],
        (own_val[pix] / perr[pix]) ** 2,
        own,
        pdx,
        pdy,
        mono_k[gk],
        knots=knots,
        degree=int(p["degree"]),
        prior_sigma=float(p["correction_prior_sigma"]),
        n_iter=int(p["n_iter"]),
        sigma_clip=float(p["sigma_clip"]),
    )
    Wc = Wc / scale[None, :]
    weights = np.zeros((Wc.shape[0], mono.shape[1]))
    weights[:, 1:nk] = Wc
    weights[:, 0] = -Wc @ (mbar * scale)
    summary.update(pixel_index=pix, pixel_source=own, used=used, dx=pdx, dy=pdy)
    log.info(
        "%s: shift-model correction: %d pixels of %d sources, %d knots over +-%.1f px",
        name,
        pix.size,
        np.unique(own).size,
        nkn,
        Rk,
    )
    return weights, knots, summary


def fit_shift_model(
    time,
    flux,
    flux_err,
    quality,
    S,
    source_flux,
    pixel_col,
    pixel_row,
    source_col,
    source_row,
    prf,
    background,
    params: dict | None = None,
    *,
    name: str = "field",
    offsets=None,
):
    """The shift motion model: measure the common scene offset of every cadence
    (:func:`measure_scene_offsets`) and return a ``time_model='shift'`` :class:`MotionModel`
    (factor of pair k at cadence t = ``P(d_k - c_t) / P(d_k)`` as a polynomial in c_t) and a summary.

    ``offsets``: given per-cadence offsets ``(cx, cy)`` [px] (NaN: none at that cadence; survey mode's
    CCD-level model at the tile centre, :mod:`workflow_lib.survey.motion`) used instead of measuring them:
    re-centred on their mean over the good cadences like measured ones; the background coefficients and
    the pixel clipping are computed at them (:func:`measure_scene_offsets` with ``init`` and ``n_iter=0``),
    then the correction spline is fitted as usual."""
    p = motion_params(params)
    deg = int(p["shift_degree"])
    time = np.asarray(time, float)
    S, F, good, terms = _shift_scene(
        S, source_flux, pixel_col, pixel_row, source_col, source_row, prf, flux, quality, deg
    )
    if offsets is None:
        cx, cy, ok, use_pix, bk, half, cov = _shift_offsets(flux, flux_err, background, good, terms, p, deg, name)
    else:
        cx, cy, ok, use_pix, bk, half, cov = _given_offsets(flux, flux_err, background, good, terms, p, deg, offsets)
    # the final round's offsets (re-centred) with the final polynomial
    T = terms(half, cov)
    mono = shift_monomials(cx, cy, deg)
    field = ShiftField(flux, flux_err, S, F, background, good, pixel_col, pixel_row, source_col, source_row)
    weights, knots, summary = _shift_model_correction(field, T, mono, bk, ok, use_pix, half, p, name)
    mm = MotionModel(
        weights,
        knots,
        int(p["degree"]),
        deg,
        0.0,
        1.0,
        time_model="shift",
        reg_time=time[ok],
        reg_x=cx[ok],
        reg_y=cy[ok],
        shift_cov=np.zeros((2, 2)) if cov is None else cov,
        shift_range=half,
    )
    summary.update(
        {
            "scene_offset_column": np.where(ok, cx, np.nan),
            "scene_offset_row": np.where(ok, cy, np.nan),
            "offset_pixels_used": use_pix,
            "shift_degree": np.int64(deg),
        }
    )
    return mm, summary


def motion_design(model_like: MotionModel, dx, dy, time) -> sp.csr_matrix:
    """Design matrix of eq. 23 for pairs (dx, dy) observed at times ``time`` (all same length):
    every spline component times every power of normalised time (row-wise Kronecker)."""
    return tensor_product(model_like.spatial_basis(dx, dy), sp.csr_matrix(model_like.time_basis(time)))


def fit_motion_model(
    dx,
    dy,
    bin_time,
    y,
    y_err,
    owner,
    *,
    knots,
    params: dict | None = None,
    t0: float,
    tscale: float,
    bin_time_design=None,
    template: MotionModel | None = None,
):
    """Fit eq. 23 to normalised binned data of uncontaminated pixels (App. B), clipping variable sources.

    Parameters
    ----------
    dx, dy : (npix,) offset of each uncontaminated pixel from its one source [px].
    bin_time : (nbin,) mean time of each bin.
    y, y_err : (nbin, npix) normalised binned flux and its error (NaN = missing).
    owner : (npix,) source index of each pixel (for the per-source clipping).

    bin_time_design : optional (nbin, k) time design of the bins (centroid mode: the mean of
        :func:`centroid_basis` over each bin's cadences); default the cubic in time at ``bin_time``.
    template : optional MotionModel whose time model (centroid regressors) is kept.

    Returns ``(MotionModel, model_y (nbin, npix), used (npix,) bool)``.
    """
    p = motion_params(params)
    dx = np.asarray(dx, float)
    dy = np.asarray(dy, float)
    owner = np.asarray(owner)
    nb, npix = y.shape
    if template is not None:
        mm = dataclasses.replace(template, knots=np.asarray(knots, float))
    else:
        mm = MotionModel(
            np.zeros(1), np.asarray(knots, float), int(p["degree"]), int(p["time_degree"]), float(t0), float(tscale)
        )
    A = mm.spatial_basis(dx, dy)
    T = mm.time_basis(bin_time) if bin_time_design is None else np.asarray(bin_time_design, float)
    ncomp, nt = A.shape[1], T.shape[1]
    # design for all (bin, pixel): row b*npix + j = A[j] (x) T[b]
    D = tensor_product(sp.vstack([A] * nb).tocsr(), sp.csr_matrix(np.repeat(T, npix, axis=0)))
    yv = y.ravel()
    ev = y_err.ravel()
    finite = np.isfinite(yv) & np.isfinite(ev) & (ev > 0)
    mu = np.zeros((ncomp, nt))
    mu[:, 0] = 1.0
    mu = mu.ravel()
    used_src = np.ones(owner.max() + 1 if owner.size else 0, bool)
    for it in range(int(p["n_iter"]) + 1):
        use = finite & np.tile(used_src[owner], nb)
        w = np.where(use, 1.0 / np.where(finite, ev, 1.0) ** 2, 0.0)
        coef = wls(D, np.where(use, yv, 0.0), weights=w, prior_mu=mu, prior_sigma=p["prior_sigma"])
        model = D @ coef
        if it == int(p["n_iter"]):
            break
        r2 = np.where(finite, ((yv - model) / np.where(finite, ev, 1.0)) ** 2, 0.0)
        r2 = r2.reshape(nb, npix).sum(axis=0)
        cnt = finite.reshape(nb, npix).sum(axis=0)
        have = np.bincount(owner, weights=cnt, minlength=used_src.size) > 0
        new = clip_sources(r2, cnt, owner, used_src, have, p["sigma_clip"], f"motion fit iteration {it}")
        if np.array_equal(new, used_src):
            break
        used_src = new
    mm.weights = coef.reshape(ncomp, nt)
    return mm, model.reshape(nb, npix), used_src[owner]


def motion_factors(model: MotionModel, dx, dy, time, prf=None):
    """Eq. 24 as a low-rank product: ``(basis (npair, ntime_terms), time_basis (ntime, ntime_terms))``;
    the factor of pair k at cadence t is ``basis[k] @ time_basis[t]``.

    Shift mode needs ``prf`` (the mean-frame PRF model, ``prf.evaluate(dx, dy)``): the basis is the
    shift polynomial of each pair divided by its mean-frame value (factor = P(d - c_t) / P(d))."""
    if model.time_model == "shift":
        if prf is None:
            raise MotionError("a shift motion model needs the PRF model to evaluate its factors")
        a = shift_coefficients(prf, dx, dy, model.time_degree, model.shift_range, model.shift_cov)
        p0 = np.asarray(prf.evaluate(np.asarray(dx, float), np.asarray(dy, float)), float).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            basis = np.where(p0[:, None] > 0, a / np.where(p0 > 0, p0, 1.0)[:, None], 0.0)
        basis[p0 <= 0, 0] = 1.0
        if model.weights.size and model.weights.shape[1] == basis.shape[1]:
            basis = basis + np.asarray(model.spatial_basis(dx, dy) @ model.weights)
        return basis, model.time_basis(time)
    basis = np.asarray(model.spatial_basis(dx, dy) @ model.weights)
    return basis, model.time_basis(time)


def motion_model(model: MotionModel, dx, dy, time, prf=None):
    """Yield, for each cadence, the multiplicative change of the PRF model at every (source, pixel)
    pair (eq. 24); the scene at cadence t is the mean scene with its nonzeros times this (eq. 25)."""
    basis, tb = motion_factors(model, dx, dy, time, prf)
    for row in tb:
        yield basis @ row


# --------------------------------------------------------------------------- I/O


# --------------------------------------------------------------------------- pipeline step


def _static_scene_solver(S, B, src_flux, bin_err):
    """A solver of the static mean-scene LFD model (sources + background ``B``) for one frame:
    ``solve(flux, flux_err) -> weights`` (direct up to 3000 sources, else PCG), with broad priors
    around the mean-frame fluxes."""
    nsrc = S.shape[1]
    mu = np.concatenate([src_flux, np.zeros(B.shape[1])])
    sig = np.concatenate([10 * np.abs(src_flux) + 1e-3, np.full(B.shape[1], 1e6)])
    with np.errstate(invalid="ignore"):
        ebin = np.sqrt(np.nanmean(bin_err**2, axis=0))
    direct = nsrc <= 3000
    sysm = build_system(S, B, mu, sig, ebin, direct=direct, pcg=not direct)

    def solve(f, e):
        return solve_direct(sysm, f, e, errors=False)[0] if direct else solve_pcg(sysm, f, e)[0]

    return solve


def _centroid_time_model(
    time, flux, flux_err, good, B, nsrc, solve_frame, pix, dx, dy, norm, bin_index, nb, t0, tscale, p
):
    """``time_model: centroid``: the measured common scene offset of every cadence (flux-weighted
    centroid after a static-scene background solve of every cadence) as the time regressors.
    Returns ``(template MotionModel, time design of the bins (nbin, 6))``."""
    # per-cadence background from a static-scene solve of every cadence, then the common offset
    bk = np.zeros((time.size, B.shape[1]))
    ferr = np.asarray(flux_err, float)
    for k in np.flatnonzero(np.isfinite(flux).any(axis=1)):
        bk[k] = solve_frame(flux[k], ferr[k])[nsrc:]
    cx, cy = scene_centroid(flux, bk @ B.T, pix, dx, dy, norm[pix])
    fin = np.isfinite(cx) & np.isfinite(cy)
    cx = cx - np.mean(cx[fin & good])
    cy = cy - np.mean(cy[fin & good])
    scale = max(np.std(cx[fin & good]), np.std(cy[fin & good]), 1e-6)
    tt = time[fin]
    template = MotionModel(
        np.zeros(1),
        np.zeros(2),
        int(p["degree"]),
        2,
        t0,
        tscale,
        time_model="centroid",
        reg_time=tt,
        reg_x=cx[fin] / scale,
        reg_y=cy[fin] / scale,
    )
    Tc = centroid_basis(template.reg_x, template.reg_y)
    bi = bin_index[fin]
    T_bin = np.array([Tc[bi == b].mean(axis=0) for b in range(nb)])
    log.info(
        "motion model: centroid regressors, scene offset rms %.4f / %.4f (flux-weighted, aperture units)",
        np.std(cx[fin & good]),
        np.std(cy[fin & good]),
    )
    return template, T_bin


def _normalised_bins(bf, be, B, nsrc, solve_frame):
    """Eq. 17: each binned frame minus its background (from a mean-scene solve of the frame), divided
    by the mean source image. Returns ``(y, y_err, norm (mean source image), total (mean image), snr)``."""
    src_b = np.empty_like(bf)
    for b in range(bf.shape[0]):
        src_b[b] = bf[b] - B @ solve_frame(bf[b], be[b])[nsrc:]
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nanmean(src_b, axis=0)  # eq. 17: divide by the mean (source) image
        total = np.nanmean(bf, axis=0)
        y = src_b / norm
        y_err = be / norm
        snr = np.nanmedian(1.0 / y_err, axis=0)
    return y, y_err, norm, total, snr


def _motion_pixels(S, src_flux, norm, total, snr, p: dict, name: str):
    """The uncontaminated pixels the motion model is fitted to and their sources: one source gives
    >= ``min_purity`` of the modelled source flux (§4.2), the source is >= ``min_source_fraction`` of
    the pixel and its binned SNR >= ``min_snr``. Raises :class:`MotionError` below 10 pixels."""
    owner, purity = dominant_source(S, np.clip(src_flux, 0, None))
    pix = np.flatnonzero(
        (purity >= p["min_purity"])
        & (owner >= 0)
        & np.isfinite(norm)
        & (norm > 0)
        & (snr >= p["min_snr"])
        & (norm >= p["min_source_fraction"] * total)
    )
    if pix.size < 10:
        raise MotionError(
            f"{name}: only {pix.size} uncontaminated pixels with SNR >= {p['min_snr']} per bin; "
            "cannot fit the motion model (lower lfd.motion.min_snr / min_purity or disable it)"
        )
    return pix, owner[pix]


def _time_bins(time, flux, flux_err, good, bin_size: int, p: dict, name: str):
    """:func:`bin_frames` of the field (§4.5: the fit uses binned frames); raises :class:`MotionError`
    when there are fewer bins than the time polynomial has terms. Returns ``(bt, bf, be, bin_index)``."""
    bt, bf, be, bin_index = bin_frames(time, flux, flux_err, good, bin_size)
    nb = bt.size
    if nb < int(p["time_degree"]) + 1:
        raise MotionError(
            f"{name}: only {nb} time bins of {bin_size} cadences; the degree-{p['time_degree']} "
            "time polynomial needs more (lower lfd.motion.bin_size)"
        )
    return bt, bf, be, bin_index


def _pixel_source_offsets(pixel_col, pixel_row, source_col, source_row, pix, own, p: dict):
    """Offsets (dx, dy) [px] of the motion pixels ``pix`` from their sources ``own`` and the knots of
    the eq. 23 spline: ``n_knots`` evenly over +-R, R the largest offset (at least 1 px)."""
    pc = np.asarray(pixel_col, float)
    pr = np.asarray(pixel_row, float)
    dx = pc[pix] - np.asarray(source_col, float)[own]
    dy = pr[pix] - np.asarray(source_row, float)[own]
    R = float(max(np.abs(dx).max(), np.abs(dy).max(), 1.0)) + 1e-6
    knots = np.linspace(-R, R, int(p["n_knots"]))
    return dx, dy, R, knots


def _motion_summary(bt, bin_size, pix, own, dx, dy, y, y_err, model_y, used) -> dict:
    """The summary of a binned motion fit (saved with the model): bins, pixels, their sources and
    offsets, the normalised data (eq. 17), the eq. 23 model and the rms residual of the kept pixels."""
    resid = (y[:, pix] - model_y)[:, used]
    summary = {
        "bin_time": bt,
        "bin_size": np.int64(bin_size),
        "pixel_index": pix,
        "pixel_source": own,
        "dx": dx,
        "dy": dy,
        "data": y[:, pix],
        "data_err": y_err[:, pix],
        "model": model_y,
        "used": used,
        "rms_residual": np.float64(np.sqrt(np.nanmean(resid**2))),
    }
    log.info(
        "motion model: rms residual %.4g, %d of %d sources kept",
        summary["rms_residual"],
        np.unique(own[used]).size,
        np.unique(own).size,
    )
    return summary


def fit_field_motion(
    time,
    flux,
    flux_err,
    quality,
    S,
    source_flux,
    pixel_col,
    pixel_row,
    source_col,
    source_row,
    params: dict | None = None,
    *,
    mission: str = "TESS",
    name: str = "field",
    prf=None,
    offsets=None,
):
    """The whole §4.5 fit for one field, from arrays.

    ``flux``/``flux_err`` (ntime, npixel); ``S`` the mean scene (npixel x nsource) of the sources
    with mean-frame fluxes ``source_flux`` at ``source_col/row``. Returns ``(MotionModel, summary)``.
    ``time_model: shift`` needs ``prf`` (the PRF model S was built from); ``offsets`` (shift only): given
    per-cadence scene offsets instead of measured ones (:func:`fit_shift_model`).
    """

    p = motion_params(params)
    if p["time_model"] == "shift":
        if prf is None:
            raise MotionError(f"{name}: time_model 'shift' needs the PRF model")
        B = background_design(pixel_col, pixel_row, p["background_order"])
        return fit_shift_model(
            time,
            flux,
            flux_err,
            quality,
            S,
            source_flux,
            pixel_col,
            pixel_row,
            source_col,
            source_row,
            prf,
            B,
            p,
            name=name,
            offsets=offsets,
        )
    if offsets is not None:
        raise MotionError(f"{name}: given scene offsets need time_model 'shift', not {p['time_model']!r}")
    time = np.asarray(time, float)
    flux = np.asarray(flux)
    good = (np.asarray(quality) == 0) & np.isfinite(flux).any(axis=1)
    bin_size = int(p["bin_size"] or default_bin_size(mission, time))
    bt, bf, be, bin_index = _time_bins(time, flux, flux_err, good, bin_size, p, name)
    nb = bt.size
    nsrc = S.shape[1]
    src_flux = np.asarray(source_flux, float)
    B = background_design(pixel_col, pixel_row, p["background_order"])
    solve_frame = _static_scene_solver(S, B, src_flux, be)
    y, y_err, norm, total, snr = _normalised_bins(bf, be, B, nsrc, solve_frame)
    pix, own = _motion_pixels(S, src_flux, norm, total, snr, p, name)
    dx, dy, R, knots = _pixel_source_offsets(pixel_col, pixel_row, source_col, source_row, pix, own, p)
    t0 = 0.5 * (np.nanmin(time) + np.nanmax(time))
    tscale = max(0.5 * (np.nanmax(time) - np.nanmin(time)), 1e-6)
    template = T_bin = None
    if p["time_model"] == "centroid":
        template, T_bin = _centroid_time_model(
            time, flux, flux_err, good, B, nsrc, solve_frame, pix, dx, dy, norm, bin_index, nb, t0, tscale, p
        )
    log.info(
        "motion model: %d bins of %d cadences, %d uncontaminated pixels of %d sources, knots +-%.2f px",
        nb,
        bin_size,
        pix.size,
        np.unique(own).size,
        R,
    )
    mm, model_y, used = fit_motion_model(
        dx,
        dy,
        bt,
        y[:, pix],
        y_err[:, pix],
        own,
        knots=knots,
        params=p,
        t0=t0,
        tscale=tscale,
        bin_time_design=T_bin,
        template=template,
    )
    return mm, _motion_summary(bt, bin_size, pix, own, dx, dy, y, y_err, model_y, used)
