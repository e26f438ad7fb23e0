"""LFD per-cadence flux solve (Hedges & Martinez-Palomera 2021, §4.4, §4.5 eq. 25, §4.6, App. B).

For every cadence ``t`` the pixel data ``f_t`` (length npixel) are modelled as (eq. 16, 25)

    f_t = X_t w_t + B b_t ,     X_t = S ∘ M_t

where ``S`` (npixel x nsource, sparse) is the mean-frame PRF scene matrix (eq. 15, columns
normalised so the weights ``w_t`` are total source fluxes in e-/s), ``M_t`` is the motion model of
§4.5 (eq. 24: one multiplicative factor per nonzero of ``S``; all ones without motion) and ``B``
a small per-cadence background design (the PRF step's polynomial in column/row). With the data
covariance ``C_t = diag(sigma_t^2)`` and Gaussian priors ``w ~ N(mu, sigma_w^2)`` (App. B), the
best-fitting weights and their covariance are (eqs. B3-B6)

    (X^T C^-1 X + diag(1/sigma_w^2)) w = X^T C^-1 f + mu / sigma_w^2,
    cov(w) = (X^T C^-1 X + diag(1/sigma_w^2))^-1 .

NaN pixels get zero weight; quality-flagged cadences are solved like the others (and flagged by
the caller). Work shared by all cadences (§4.6 sparsity) is done once in :func:`build_system`:
the sparsity pattern of ``X`` and of the normal matrix ``N = X^T C^-1 X``, the map from products
of design-matrix entries to entries of ``N`` (so ``N_t`` is refilled on the fixed pattern with a
single ``bincount``), the fill-reducing ordering (reused for every cadence), and the
factorisation of the mean-frame normal matrix. Two per-cadence solvers:

``direct``  refill ``N_t`` on the fixed pattern, sparse LU (SuperLU, ordering reused, no
            pivoting: ``N_t`` is SPD), exact flux errors = diag(N_t^-1) from blocked solves
            against identity columns (never forming the dense inverse).
``pcg``     conjugate gradients on ``N_t w = r_t`` using only sparse mat-vecs with ``X_t``,
            preconditioned with the mean-frame LU and warm-started from the previous cadence.
            Flux errors: ``var_i = [diag(Nbar^-1) diag(Nbar)]_i / N_t,ii`` — the exact crowding
            inflation of the mean frame times the cadence's own Fisher information (exact up to
            the small frame-to-frame change of the crowding term).

Time is split in fixed chunks (``time_chunk``; independent of the number of threads, so results
do not depend on it) that are solved in parallel with dask.

Two additions in :func:`flux_solve_step`, both on by default and both switchable off (then the
solve is the paper's):

* *Blends* (App. B, "place narrow priors on these targets"): a source within ``blend_radius``
  (0.5 px) of a brighter one has nearly the same scene column; its prior width is
  ``blend_prior_fraction`` of its mean flux, so the blend's variability goes to the brighter
  member instead of being traded cadence by cadence (:func:`blended_sources`).
* *Offset decorrelation*: with the shift motion model, a per-source polynomial in the measured
  scene offset, fitted on the high-passed light curve, is removed (:func:`decorrelate_offsets`).
  It absorbs what the mean-frame PRF's small core errors leave in the fluxes as the scene moves
  (on the default synthetic fields the isolated bright stars' point-to-point scatter goes from
  1.1-1.5x to 1.05-1.07x the injected noise).
"""

from __future__ import annotations

import time as _time
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.ndimage import median_filter
from scipy.spatial import cKDTree

from workflow_lib.core.linalg import robust_sigma
from workflow_lib.core.logs import get_logger
from workflow_lib.core.parallel import dask_map
from workflow_lib.core.quality import LfdSourceFlag
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.lfd.geometry import n_terms, shift_monomials
from workflow_lib.lfd.linsys import SolveError, build_system, solve_direct, solve_pcg

log = get_logger("solve")


# --------------------------------------------------------------------------- designs


# --------------------------------------------------------------------------- shared work


# --------------------------------------------------------------------------- one cadence


# --------------------------------------------------------------------------- all cadences


def _solve_chunk(sys, method, flux, flux_err, i0, i1, motion_basis, motion_time, rtol, exact_errors=False):
    f = np.asarray(flux[i0:i1], dtype=float)
    e = np.asarray(flux_err[i0:i1], dtype=float)
    nt = i1 - i0
    out = np.full((nt, sys.nvar), np.nan)
    err = np.full((nt, sys.nvar), np.nan)
    iters = 0
    x_prev = None
    crowd = crowd_mask = None
    for k in range(nt):
        if not np.any(np.isfinite(f[k])):
            continue
        factor = None if motion_basis is None else motion_basis @ motion_time[i0 + k]
        if method == "direct":
            usable = np.isfinite(f[k]) & np.isfinite(e[k]) & (e[k] > 0)
            if exact_errors:
                out[k], err[k] = solve_direct(sys, f[k], e[k], factor)
            elif crowd is None or not np.array_equal(usable, crowd_mask):
                # exact errors at the chunk's first cadence (and at any cadence whose set of usable
                # pixels differs from it), that cadence's crowding for the others
                out[k], err[k], c = solve_direct(sys, f[k], e[k], factor, return_crowding=True)
                if crowd is None:
                    crowd, crowd_mask = c, usable
            else:
                out[k], err[k] = solve_direct(sys, f[k], e[k], factor, crowding=crowd)
        else:
            out[k], err[k], it = solve_pcg(sys, f[k], e[k], factor, x0=x_prev, rtol=rtol)
            iters += it
            x_prev = out[k]
    return out, err, iters


def source_flux(
    flux,
    flux_err,
    scene,
    background,
    prior_mu,
    prior_sigma,
    *,
    motion_basis=None,
    motion_time=None,
    method: str = "auto",
    direct_max_sources: int = 3000,
    time_chunk: int = 64,
    threads: int = 1,
    dask_scheduler: str | None = None,
    rtol: float = 1e-10,
    exact_errors: bool = False,
):
    """Least-squares flux of every source at every cadence (§4.4-4.5, App. B).

    Parameters
    ----------
    flux, flux_err : (ntime, npixel) arrays (numpy or dask; read one time chunk at a time).
    scene : S, sparse (npixel x nsource), mean-frame PRF scene matrix (eq. 15).
    background : B, (npixel x nbk) per-cadence background design (:func:`background_design`).
    prior_mu, prior_sigma : (nsource+nbk,) Gaussian prior (App. B eqs. B5-B6).
    motion_basis, motion_time : motion model as a low-rank product (eq. 24): the factor on the
        S entries (order of canonical csr ``S.data``) at cadence t is
        ``motion_basis @ motion_time[t]``; None = no motion (§4.4 model).
    method : 'direct', 'pcg' or 'auto' (direct when nsource <= direct_max_sources).
    exact_errors : direct only: diag(N_t^-1) at every cadence (slow: ~0.25 s per cadence for 550
        sources); default exact at the first cadence of each time chunk and the crowding factor of
        that cadence for the others (see :func:`solve_direct`).

    Returns
    -------
    dict with ``flux``, ``flux_err`` (nsource, ntime), ``background``, ``background_err``
    (nbk, ntime), ``method``, ``pcg_iterations``.
    """

    t_start = _time.perf_counter()
    ntime, npix = flux.shape
    S = sp.csr_matrix(scene)
    method = _solve_method(S, ntime, npix, method, direct_max_sources, motion_basis, motion_time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (dead) pixels: NaN, masked by the solve
        mean_err = np.sqrt(np.nanmean(np.asarray(flux_err[: min(ntime, 256)], dtype=float) ** 2, axis=0))
    sys = build_system(
        S, background, prior_mu, prior_sigma, mean_err, direct=(method == "direct"), pcg=(method == "pcg")
    )
    log.info(
        "flux solve: %d cadences, %d pixels, %d sources, %d background terms, method %s, X nnz %d, %d threads",
        ntime,
        npix,
        sys.nsource,
        sys.nbk,
        method,
        sys.x_indices.size,
        threads,
    )
    t_setup = _time.perf_counter() - t_start
    bounds = [(i, min(ntime, i + time_chunk)) for i in range(0, ntime, time_chunk)]
    results = dask_map(
        _solve_chunk,
        [dict(i0=i0, i1=i1) for i0, i1 in bounds],
        threads=threads,
        scheduler=dask_scheduler,
        shared=dict(
            sys=sys,
            method=method,
            flux=flux,
            flux_err=flux_err,
            motion_basis=motion_basis,
            motion_time=motion_time,
            rtol=rtol,
            exact_errors=exact_errors,
        ),
    )
    return _gather_chunks(results, sys, method, t_start, t_setup)


def _solve_method(S, ntime: int, npix: int, method: str, direct_max_sources: int, motion_basis, motion_time) -> str:
    """Check the scene ``S`` and the motion model (eq. 24: one factor per canonical S entry, one time row
    per cadence) against the data shape and resolve ``method`` ('auto': direct up to ``direct_max_sources``).
    With a motion model ``S`` is made canonical in place (duplicates summed)."""
    if S.shape[0] != npix:
        raise SolveError(f"scene matrix has {S.shape[0]} pixels but the data have {npix}")
    if method == "auto":
        method = "direct" if S.shape[1] <= direct_max_sources else "pcg"
    if method not in ("direct", "pcg"):
        raise SolveError(f"unknown solve method {method!r}; expected direct, pcg or auto")
    if (motion_basis is None) != (motion_time is None):
        raise SolveError("motion_basis and motion_time go together")
    if motion_basis is not None:
        S.sum_duplicates()
        if motion_basis.shape[0] != S.nnz or motion_time.shape[0] != ntime:
            raise SolveError(
                f"motion model shapes {motion_basis.shape}, {motion_time.shape} do not match "
                f"scene nnz {S.nnz} / {ntime} cadences"
            )
    return method


def _gather_chunks(results, sys, method: str, t_start: float, t_setup: float) -> dict:
    """The per-chunk solutions of :func:`_solve_chunk` joined in time and split into source fluxes and
    background terms (the result dict of :func:`source_flux`)."""
    sol = np.concatenate([r[0] for r in results], axis=0).T
    err = np.concatenate([r[1] for r in results], axis=0).T
    iters = int(sum(r[2] for r in results))
    return {
        "flux": sol[: sys.nsource],
        "flux_err": err[: sys.nsource],
        "background": sol[sys.nsource :],
        "background_err": err[sys.nsource :],
        "method": method,
        "pcg_iterations": iters,
        "setup_seconds": t_setup,  # timing only, never written
        "solve_seconds": _time.perf_counter() - t_start - t_setup,
    }


# --------------------------------------------------------------------------- pipeline step


def solve_params(params: dict | None) -> dict:
    """The lfd.solve settings: defaults overridden by ``params``."""
    return merge_settings(schema_defaults("lfd.solve"), params, "lfd.solve", SolveError)


def blended_sources(column, row, flux, radius: float):
    """Sources that the data cannot separate from a brighter neighbour (App. B).

    A source is *blended* when a brighter source (larger mean-frame flux) lies within ``radius``
    pixels: at a fraction of a pixel the two PRFs are nearly the same column of the scene matrix,
    so the per-cadence split of their summed flux is set by noise and motion-model errors, and
    their flux errors are strongly anti-correlated. The paper (App. B, on sources the scene
    model cannot constrain) suggests narrow priors that hold such fluxes near their a-priori
    values; :func:`flux_solve_step` does that, so the variability of a blend is assigned to
    its brightest member. Returns a boolean array (nsource,).
    """
    xy = np.column_stack([np.asarray(column, float), np.asarray(row, float)])
    flux = np.asarray(flux, float)
    out = np.zeros(len(xy), bool)
    if radius <= 0 or len(xy) < 2:
        return out
    i, j = cKDTree(xy).query_pairs(float(radius), output_type="ndarray").T
    out[np.where(flux[i] >= flux[j], j, i)] = True  # the fainter of each close pair
    return out


def decorrelate_offsets(
    time,
    flux,
    cx,
    cy,
    good,
    *,
    degree: int,
    window_days: float,
    n_iter: int = 3,
    clip: float = 4.0,
    select: str = "fixed",
):
    """Remove from every light curve the part that follows the measured scene offset.

    A mean-frame PRF model that is slightly wrong in the core gives fluxes that depend on where
    the star sits on the pixel grid: ``F_t = F (1 + g(c_t))`` with ``c_t`` the common scene
    offset of cadence t (measured by the shift motion model, §4.5). Per source, ``g`` is fitted
    as a polynomial of total degree ``degree`` in (cx, cy) (:func:`workflow_lib.lfd.geometry.shift_monomials`
    without the constant) -- the same decorrelation against the pointing that K2 and TESS
    pipelines apply to aperture photometry. The coefficients are estimated from the
    *high-passed* series only (flux and monomials minus their running median over
    ``window_days``), so slow astrophysical variability, which may be correlated with the slow
    drift, cannot bias them; eclipses, flares and transients are removed by iterative
    ``clip``-sigma clipping (MAD) of each source's high-passed residuals. The fitted ``g`` is then
    subtracted with the *full* offsets (the error depends on the offset, not on its time scale),
    keeping each light curve's mean over ``good`` cadences.

    ``select``: ``fixed`` fits every monomial up to ``degree`` to every source; ``bic`` gives each source
    the total degree 0..``degree`` with the lowest Bayesian information criterion ``n ln(RSS / n) + k ln n``
    on its clipped high-passed series (``k`` monomials, ``n`` cadences kept): a bright star whose error is
    not quadratic in the offset gets the cubic terms, a faint one, whose series is photon noise, gets
    none rather than terms that only fit noise (and the same fraction of any signal).

    ``flux`` (nsource, ntime); ``cx``, ``cy`` (ntime,) [px], NaN where not measured; ``good``
    (ntime,) bool. Returns ``(corrected flux, coefficients (nsource, nterm))``; cadences without
    an offset are returned unchanged.
    """
    flux = np.asarray(flux, float)
    time = np.asarray(time, float)
    cx = np.asarray(cx, float)
    cy = np.asarray(cy, float)
    have = np.isfinite(cx) & np.isfinite(cy)
    use = np.asarray(good, bool) & have
    nterm = n_terms(degree) - 1  # the offset monomials without the constant
    coef = np.zeros((flux.shape[0], max(nterm, 0)))
    if degree < 1 or use.sum() < 10 * max(nterm, 1):
        return flux.copy(), coef
    M = np.zeros((time.size, nterm))
    M[have] = shift_monomials(cx[have], cy[have], degree)[:, 1:]
    dt = np.nanmedian(np.diff(time[use])) if use.sum() > 1 else 1.0
    win = max(3, int(round(window_days / dt)) | 1)
    iu = np.flatnonzero(use)
    X = M[iu] - median_filter(M[iu], size=(win, 1), mode="nearest")
    Y = flux[:, iu]
    fin = np.isfinite(Y)
    Yf = np.where(fin, Y, np.nanmedian(np.where(fin, Y, np.nan), axis=1, keepdims=True) if fin.any() else 0.0)
    Yf = np.where(np.isfinite(Yf), Yf, 0.0)
    Yh = Yf - median_filter(Yf, size=(1, win), mode="nearest")
    w = fin.astype(float)
    ridge = 1e-9 * np.trace(X.T @ X) / nterm
    for it in range(int(n_iter) + 1):
        N = np.einsum("tk,st,tl->skl", X, w, X) + ridge * np.eye(nterm)
        rhs = np.einsum("tk,st->sk", X, w * Yh)
        coef = np.linalg.solve(N, rhs[:, :, None])[:, :, 0]
        if it == int(n_iter):
            break
        r = Yh - coef @ X.T
        mad = robust_sigma(r, axis=1, keepdims=True)
        w = (fin & (np.abs(r) <= clip * np.maximum(mad, 1e-30))).astype(float)
    if select == "bic":
        coef = _bic_degree(X, Yh, w, N, rhs, degree)
    elif select != "fixed":
        raise ValueError(f"offset decorrelation: select must be 'fixed' or 'bic', not {select!r}")
    Mc = np.where(have[:, None], M - M[iu].mean(axis=0), 0.0)
    out = flux - coef @ Mc.T
    return out, coef


def _bic_degree(X, Yh, w, N, rhs, degree: int) -> np.ndarray:
    """Per source, the coefficients of the total degree (0..``degree``; the first ``n_terms(d) - 1``
    columns of ``X``, ordered by degree) with the lowest BIC ``n ln(RSS / n) + k ln n`` on the weighted
    high-passed series ``Yh`` (normal matrices ``N`` and right-hand sides ``rhs`` of the full degree)."""
    n = np.maximum(w.sum(axis=1), 1.0)
    best = n * np.log(np.maximum(np.einsum("st,st->s", w, Yh * Yh), 1e-300) / n)
    out = np.zeros(rhs.shape)
    for d in range(1, int(degree) + 1):
        k = n_terms(d) - 1
        c = np.linalg.solve(N[:, :k, :k], rhs[:, :k, None])[:, :, 0]
        r = Yh - c @ X[:, :k].T
        bic = n * np.log(np.maximum(np.einsum("st,st->s", w, r * r), 1e-300) / n) + k * np.log(n)
        better = bic < best
        best = np.where(better, bic, best)
        out[better] = 0.0
        out[better, :k] = c[better]
    return out


def source_flags(
    in_model, flux_fraction, flux, good, min_flux_fraction: float, flux_err=None, min_median_snr: float = 0.0
) -> np.ndarray:
    """Per source, why the data do not constrain its flux (:class:`workflow_lib.core.quality.LfdSourceFlag`).

    ``in_model`` (nsource,) bool: False where the PRF step removed the source (its mean-frame flux was
    significantly negative, §4.4); ``flux_fraction`` (nsource,): fraction of its PRF on the pixels
    (:func:`workflow_lib.lfd.prf.fraction_on_pixels`); ``flux`` (nsource, ntime) its light curve,
    ``flux_err`` its errors and ``good`` (ntime,) the cadences to judge it on. NONPOSITIVE: the median
    flux is <= ``min_median_snr`` x its error, ``sqrt(pi / 2) x median(flux_err) / sqrt(N)`` over the N
    finite good cadences (the error of the median of N Gaussian values); 0 or no ``flux_err``: a median
    <= 0. Returns the ``lfd_flag`` bitmask (nsource,) int32.
    """
    in_model = np.asarray(in_model, bool)
    flux = np.asarray(flux, float)
    good = np.asarray(good, bool)
    flag = np.zeros(in_model.size, np.int32)
    flag[~in_model] |= int(LfdSourceFlag.NOT_IN_MODEL)
    flag[~(np.asarray(flux_fraction, float) >= float(min_flux_fraction))] |= int(LfdSourceFlag.OFF_PIXELS)
    on = good if good.any() else slice(None)
    sub = flux[:, on]
    fin = np.isfinite(sub).any(axis=1)
    med = np.full(in_model.size, np.nan)
    limit = np.zeros(in_model.size)
    if fin.any():
        med[fin] = np.nanmedian(sub[fin], axis=1)
        if flux_err is not None and min_median_snr > 0:
            # the errors of the cadences with a flux; N of them; NaN limit (no error) -> 0
            esub = np.where(np.isfinite(sub[fin]), np.asarray(flux_err, float)[:, on][fin], np.nan)
            n = np.isfinite(esub).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                limit[fin] = min_median_snr * np.sqrt(np.pi / 2) * np.nanmedian(esub, axis=1) / np.sqrt(n)
    flag[fin & ~(med > np.nan_to_num(limit))] |= int(LfdSourceFlag.NONPOSITIVE)
    return flag


def contamination_ratio(S, flux):
    """Per source: flux from other sources / own flux, summed over the source's aperture (the
    pixels where its PRF is modelled, i.e. its column of S); and the number of those pixels."""
    S = sp.csr_matrix(S)
    S.sum_duplicates()
    flux = np.asarray(flux, float)
    total = S @ flux
    rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
    own = S.data * flux[S.indices]
    other = total[rows] - own
    n = S.shape[1]
    own_sum = np.bincount(S.indices, weights=own, minlength=n)
    other_sum = np.bincount(S.indices, weights=other, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = other_sum / own_sum
    return ratio, np.bincount(S.indices, minlength=n)
