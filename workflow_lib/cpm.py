"""Causal Pixel Model (CPM) de-trending of every pixel of a cutout (Hattori et al. 2022, "unpopular").

The paper de-trends the pixels of a small aperture; this module de-trends *every* pixel of the
cube (the paper's "future work") and then sums apertures of de-trended pixels.

Model (paper §2)
----------------
For a target pixel with normalised flux ``y* = f / median - 1`` (§2.2, §3.2) the design matrix
is ``X* = [X_L | X_P | 1]``: the normalised light curves of ``L`` predictor pixels chosen outside an
``exclusion x exclusion`` square around the target (§3.3.2), an optional polynomial in time of
degree ``P`` (default cubic, time scaled to [-1, 1] over the kept cadences) and an intercept.
Ridge coefficients (eq. 7) ``w = (X*^T X* + Λ)^-1 X*^T y*`` with ``Λ = diag(λ_L I_L, λ_P I_P, 0)``
(eq. 8).  Train-and-test (§2.3): the kept cadences are split into ``k`` contiguous sections and
section ``j`` is predicted with coefficients fitted on the other ``k-1`` sections.  The
systematics component ``m_sys = X_L w_L`` is subtracted, the polynomial ``m_poly = X_P w_P`` is
kept unless ``remove_poly``.

Fast path (exact, not an approximation)
---------------------------------------
* Gram products are shared across pixels: ``Y*^T Y*`` over all pixels is computed once (one
  BLAS syrk), each target's ``X*^T X*`` and ``X*^T y*`` are gathered from it.
* Held-out sections share one Cholesky factor per pixel.  With ``A = X*^T X* + Λ = C C^T``,
  full-data coefficients ``w`` and residual ``r = y* - X* w``, the Woodbury identity gives the
  coefficients trained without section ``j`` (rows ``X_j``)::

      w_(-j) = w - A^-1 X_j^T (I - H_jj)^-1 r_j ,   H_jj = X_j A^-1 X_j^T = Q_j Q_j^T,  Q = X* C^-T

  so the k held-out systematics predictions cost one triangular solve ``Q`` plus k tiny
  ``n_j x n_j`` solves per pixel (batched over the sections) instead of k Gram downdates and k
  factorisations.  ``tests/test_cpm.py`` checks this against a plain loop over the k sections.
* Pixels are processed in chunks in parallel with dask (threaded scheduler, ``threads`` workers,
  BLAS limited to one thread per worker), or on a dask.distributed scheduler if configured.

Flux convention of the de-trended cube
--------------------------------------
With ``s`` the normalisation scale of a pixel (its median flux; ``max(median, 1.4826 MAD)`` so that
faint / background-subtracted pixels with median <= 0 stay finite) and ``b(t)`` the optional
initial background (median of the 100 faintest pixels, §3.2)::

    F_cpm = ((y* - m_sys) * s + median)  [- s * m_poly if remove_poly]
          = f - b - s * m_sys            [e-/s]

i.e. ``(residual + polynomial + offset) * s + median``.  Cadences dropped by the QUALITY bitmask,
and cadences at which a pixel was NaN, are NaN in the output; pixels that are NaN at every cadence
(or finite at fewer than ``min_finite_fraction`` of the kept cadences) are NaN everywhere.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg as sla
from scipy.linalg.blas import dtrsm
import xarray as xr

from .cube import CubeError, as_pixel_table, atomic_path, open_cube, validate_cube, write_zarr_atomic
from .logs import get_logger
from .provenance import provenance_json

log = get_logger("cpm")

#: lightkurve's "hard" QUALITY bitmasks (incl. the TESS momentum-dump / desaturation bit 32)
HARD_BITMASK = {"TESS": 24319, "Kepler": 1664431, "K2": 1664431}

PREDICTOR_METHODS = ("similar_brightness", "cosine_similarity", "random")


class CPMWarning(UserWarning):
    """A recoverable problem with the input of a CPM step (fewer predictors, NaN pixels)."""


@dataclass(frozen=True)
class CPMParams:
    """CPM tuning parameters; defaults are the paper's (§3.3, §3.4, §4)."""

    n_predictors: int = 256  #: L
    exclusion_size: int = 11  #: side of the exclusion square (2h+1 with h = size // 2)
    predictor_method: str = "similar_brightness"
    lambda_L: float = 0.01
    lambda_P: float = 0.01
    poly_degree: int = 3  #: 0 = no polynomial component
    k: int = 150  #: number of train-and-test sections for `k_reference_cadence_minutes` data
    k_reference_cadence_minutes: float = 30.0
    scale_k_with_cadence: bool = True
    remove_poly: bool = False
    background_subtract: bool = False
    n_background_pixels: int = 100
    quality_bitmask: int | None = None  #: None = HARD_BITMASK of the mission
    min_finite_fraction: float = 0.5
    seed: int = 0
    chunk_pixels: int = 128
    gram_max_pixels: int = 12000
    dask_scheduler: str | None = None

    def __post_init__(self):
        if self.predictor_method not in PREDICTOR_METHODS:
            raise ValueError(f"cpm.predictor_method must be one of {PREDICTOR_METHODS}, got {self.predictor_method!r}")
        if self.n_predictors < 0 or self.exclusion_size < 1 or self.poly_degree < 0:
            raise ValueError("cpm: n_predictors >= 0, exclusion_size >= 1, poly_degree >= 0 required")
        if self.k < 2:
            raise ValueError(f"cpm.k must be >= 2 (train-and-test needs a training set), got {self.k}")
        if self.lambda_L < 0 or self.lambda_P < 0:
            raise ValueError("cpm: regularisation parameters must be >= 0")


_PARAM_KEYS = {f for f in CPMParams.__dataclass_fields__}


def cpm_params(config: dict | None = None, **override) -> CPMParams:
    """CPMParams from the ``cpm:`` config section (unknown / non-model keys are ignored)."""
    cfg = {k: v for k, v in (config or {}).items() if k in _PARAM_KEYS}
    cfg.update(override)
    return CPMParams(**cfg)


# ------------------------------------------------------------------------- pre-processing

def effective_k(params: CPMParams, time: np.ndarray, n_cadences: int) -> int:
    """Number of sections: ``k`` for 30-min data, scaled so sections keep their duration (§3.5)."""
    k = params.k
    if params.scale_k_with_cadence and time.size > 1:
        dt_min = float(np.nanmedian(np.diff(time))) * 1440.0
        if dt_min > 0:
            k = int(round(params.k * params.k_reference_cadence_minutes / dt_min))
    return int(max(2, min(k, n_cadences)))


def section_index(n: int, k: int) -> np.ndarray:
    """``(k, n_max)`` indices of k contiguous sections of ``range(n)``, padded with ``n``."""
    if k > n:
        raise ValueError(f"cannot split {n} cadences into {k} sections")
    parts = np.array_split(np.arange(n), k)
    n_max = max(len(p) for p in parts)
    out = np.full((k, n_max), n, dtype=np.int64)
    for j, p in enumerate(parts):
        out[j, : len(p)] = p
    return out


def poly_basis(time: np.ndarray, degree: int) -> np.ndarray:
    """``[t, t^2, .., t^P, 1]`` with t scaled to [-1, 1]: the polynomial + intercept columns."""
    t = np.asarray(time, dtype=np.float64)
    span = t.max() - t.min()
    ts = 2.0 * (t - t.min()) / span - 1.0 if span > 0 else np.zeros_like(t)
    cols = [ts**p for p in range(1, degree + 1)] + [np.ones_like(ts)]
    return np.stack(cols, axis=1)


def _fill_nans(y: np.ndarray) -> np.ndarray:
    """Linear interpolation in cadence index over NaNs of each column (edges: nearest value)."""
    y = y.copy()
    idx = np.arange(y.shape[0])
    for p in np.flatnonzero(~np.isfinite(y).all(axis=0)):
        col = y[:, p]
        ok = np.isfinite(col)
        if ok.any():
            y[~ok, p] = np.interp(idx[~ok], idx[ok], col[ok])
    return y


@dataclass
class Prepared:
    """Normalised pixel light curves on the kept cadences (paper §3.2)."""

    keep: np.ndarray  #: (ntime,) bool, cadences used
    ystar: np.ndarray  #: (nkeep, npix) float64 normalised flux, NaNs filled
    finite: np.ndarray  #: (nkeep, npix) bool, original finite samples
    valid: np.ndarray  #: (npix,) bool, pixels modelled / usable as predictors
    median: np.ndarray  #: (npix,) median of (background-subtracted) flux
    scale: np.ndarray  #: (npix,) normalisation scale s
    background: np.ndarray  #: (nkeep,) subtracted background series (zeros if none)
    time: np.ndarray  #: (nkeep,)
    warnings: list = field(default_factory=list)


def preprocess(flux, quality, time, params: CPMParams, *, mission: str = "TESS", name: str = "cube") -> Prepared:
    """Drop flagged cadences, optionally subtract the faint-pixel background, normalise (§3.2).

    ``flux`` is ``(ntime, npix)``.  Raises :class:`CubeError` naming ``name`` for unusable input.
    """
    flux = np.asarray(flux, dtype=np.float64)
    quality = np.asarray(quality)
    time = np.asarray(time, dtype=np.float64)
    if flux.ndim != 2:
        raise CubeError(f"{name}: expected (time, pixel) flux, got shape {flux.shape}")
    bitmask = params.quality_bitmask if params.quality_bitmask is not None else HARD_BITMASK.get(mission, HARD_BITMASK["TESS"])
    keep = ((quality.astype(np.int64) & int(bitmask)) == 0) & np.isfinite(time)
    # cadences where (almost) no pixel is finite carry no information
    keep &= np.isfinite(flux).mean(axis=1) > 0.5 if flux.shape[1] else keep
    nkeep = int(keep.sum())
    if nkeep < 2:
        raise CubeError(
            f"{name}: only {nkeep} usable cadence(s) after the QUALITY bitmask {bitmask}; CPM needs at least 2 "
            "(train-and-test splits the time series into sections)"
        )
    f = flux[keep]
    finite = np.isfinite(f)
    frac = finite.mean(axis=0)
    valid = frac >= params.min_finite_fraction
    msgs = []
    n_bad = int((~valid).sum())
    if n_bad:
        n_allnan = int((frac == 0).sum())
        msgs.append(f"{name}: {n_bad} pixel(s) ({n_allnan} all-NaN) have too few finite cadences; their CPM output is NaN")
    if not valid.any():
        raise CubeError(f"{name}: no pixel has finite flux on at least {params.min_finite_fraction:.0%} of the kept cadences")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med0 = np.nanmedian(f, axis=0)
    bg = np.zeros(nkeep)
    if params.background_subtract:
        vidx = np.flatnonzero(valid)
        faint = vidx[np.argsort(med0[vidx], kind="stable")[: params.n_background_pixels]]
        bg = np.nanmedian(f[:, faint], axis=1)
        bg = np.where(np.isfinite(bg), bg, 0.0)
        f = f - bg[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(f, axis=0)
        mad = 1.4826 * np.nanmedian(np.abs(f - med), axis=0)
    scale = np.fmax(med, mad)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    ystar = (f - med) / scale
    ystar[:, ~valid] = 0.0
    ystar = _fill_nans(ystar)
    return Prepared(keep, ystar, finite, valid, med, scale, bg, time[keep], msgs)


# ------------------------------------------------------------------------- predictors

def select_predictors(rows, cols, median, valid, targets, params: CPMParams, *, ystar=None, gram=None):
    """Predictor pixel indices for each target (§3.3.2), ``(ntarget, L)`` padded with -1.

    Candidates are valid pixels outside the ``exclusion_size`` square centred on the target (CCD
    row/column, so pixel tables work too).  ``similar_brightness``: the L closest medians;
    ``cosine_similarity``: the L highest cosine similarities of the normalised light curves;
    ``random``: L drawn with a generator seeded by ``(seed, target index)``.  Fewer than L
    candidates: all of them are used (returned counts tell how many).
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    h = params.exclusion_size // 2
    L = params.n_predictors
    out = np.full((len(targets), L), -1, dtype=np.int64)
    counts = np.zeros(len(targets), dtype=np.int64)
    if params.predictor_method == "cosine_similarity":
        if gram is not None:
            norms = np.sqrt(np.maximum(np.diag(gram), 1e-300))
        else:
            norms = np.sqrt(np.maximum((ystar * ystar).sum(axis=0), 1e-300))
    for i, p in enumerate(targets):
        cand = valid & ((np.abs(rows - rows[p]) > h) | (np.abs(cols - cols[p]) > h))
        cidx = np.flatnonzero(cand)
        if params.predictor_method == "similar_brightness":
            order = np.argsort(np.abs(median[cidx] - median[p]), kind="stable")
            chosen = cidx[order[:L]]
        elif params.predictor_method == "cosine_similarity":
            dots = gram[cidx, p] if gram is not None else ystar[:, cidx].T @ ystar[:, p]
            cos = dots / (norms[cidx] * norms[p])
            chosen = cidx[np.argsort(-cos, kind="stable")[:L]]
        else:
            rng = np.random.default_rng([params.seed, int(p)])
            chosen = np.sort(rng.choice(cidx, size=min(L, cidx.size), replace=False)) if cidx.size else cidx
        out[i, : chosen.size] = chosen
        counts[i] = chosen.size
    return out, counts


# ------------------------------------------------------------------------- the fast solver

def regularisation_diag(n_pred: int, poly_degree: int, lambda_L: float, lambda_P: float) -> np.ndarray:
    """Diagonal of Λ (eq. 8): λ_L for predictors, λ_P for the polynomial, 0 for the intercept."""
    return np.concatenate([np.full(n_pred, lambda_L), np.full(poly_degree, lambda_P), [0.0]])


def cpm_heldout_pixel(Xl, T, y, sec, lam, *, G=None, b=None):
    """Held-out (train-and-test) CPM components of one pixel, exact, via Woodbury (module doc).

    ``Xl`` (n, L) predictors, ``T`` (n, P+1) polynomial + intercept, ``y`` (n,) target,
    ``sec`` (k, n_max) section indices padded with n, ``lam`` (L+P+1,) diagonal of Λ (eq. 8).
    ``G``/``b`` optionally the precomputed ``X^T X`` and ``X^T y`` (shared Gram products).
    Returns ``(m_sys, m_poly, m_offset)``, each (n,): every cadence predicted by the ridge
    coefficients (eq. 7) fitted on the other k-1 sections (§2.3).
    """
    n, L = Xl.shape
    k, n_max = sec.shape
    real = sec.ravel() < n
    Xt = np.zeros((L + T.shape[1], k * n_max))
    Xt[:L, real] = Xl[sec.ravel()[real]].T
    Xt[L:, real] = T[sec.ravel()[real]].T
    yp = np.zeros(k * n_max)
    yp[real] = y[sec.ravel()[real]]
    out = _heldout(Xt, L, yp, k, lam, G=G, b=b)
    res = []
    for a in out:
        full = np.empty(n)
        full[sec.ravel()[real]] = a[real]
        res.append(full)
    return tuple(res)


def _heldout(Xt, L, y, k, lam, *, G=None, b=None):
    """Core of :func:`cpm_heldout_pixel` in the *section-padded layout*: ``Xt`` (m, k*n_max) is
    the transposed design matrix whose columns are the cadences of section 0, 1, ... each padded
    to n_max with zero columns; ``y`` (k*n_max,) likewise (zeros at the pads).  Zero pad columns
    change no Gram product and give zero rows in H, so every section is an (n_max x n_max) block.
    Returns ``(m_sys, m_poly, m_offset)`` in the same layout (k*n_max,)."""
    m, N = Xt.shape
    n_max = N // k
    q = m - L
    if G is None:
        G = Xt @ Xt.T
        b = Xt @ y
    A = G + np.diag(lam)
    try:
        C = np.linalg.cholesky(A)
    except np.linalg.LinAlgError as exc:
        raise np.linalg.LinAlgError(
            "CPM normal matrix X^T X + Λ is not positive definite (collinear predictors with lambda_L = 0?); "
            "use lambda_L > 0"
        ) from exc
    w = sla.cho_solve((C, True), b, check_finite=False)
    r = y - Xt.T @ w  # full-data residual (0 at the pads)
    # Q = X C^-T (one BLAS trsm from the right, no copies); H_jj = Q_j Q_j^T = X_j A^-1 X_j^T
    Q = dtrsm(1.0, C, Xt.T, side=1, lower=1, trans_a=1)  # (N, m), Fortran order
    Qt3 = Q.T.reshape(m, k, n_max)
    H = np.matmul(Qt3.transpose(1, 2, 0), Qt3.transpose(1, 0, 2))  # (k, n_max, n_max)
    Et = np.zeros((m, q))
    Et[L:, :] = np.eye(q)
    D3 = (sla.cho_solve((C, True), Et, check_finite=False).T @ Xt).reshape(q, k, n_max)  # E_T^T A^-1 X^T
    M = np.eye(n_max)[None] - H
    z = np.linalg.solve(M, r.reshape(k, n_max, 1))  # (I - H_jj)^-1 r_j
    dwT = np.einsum("qki,ki->kq", D3, z[..., 0])  # w_T - w_T(-j) per section
    Tk = Xt[L:].reshape(q, k, n_max)
    # systematics: X_j^L w_(-j)^L = X_j^L w^L - (H_jj - T_j D_j) z_j
    sys_full = (Xt[:L].T @ w[:L]).reshape(k, n_max)
    m_sys = sys_full - (H @ z)[..., 0] + np.einsum("qki,kq->ki", Tk, dwT)
    poly_full = (Xt[L:-1].T @ w[L:-1]).reshape(k, n_max)
    m_poly = poly_full - np.einsum("qki,kq->ki", Tk[:-1], dwT[:, :-1])
    m_off = w[-1] - Tk[-1] * dwT[:, -1:]
    return m_sys.ravel(), m_poly.ravel(), m_off.ravel()


def _detrend_chunk(targets, preds, counts, ystarT, Tt, k, params, gram, gramT, TT):
    """CPM components for a chunk of target pixels, section-padded layout (see :func:`_heldout`).

    ``ystarT`` (npix, k*n_max) and ``Tt`` (P+1, k*n_max) are the transposed normalised fluxes and
    polynomial columns in that layout.  Returns (m_sys, m_poly), each (k*n_max, ntarget).
    """
    N = ystarT.shape[1]
    q = Tt.shape[0]
    out_sys = np.empty((N, len(targets)))
    out_poly = np.empty((N, len(targets)))
    for i, p in enumerate(targets):
        idx = preds[i, : counts[i]]
        L = idx.size
        lam = regularisation_diag(L, params.poly_degree, params.lambda_L, params.lambda_P)
        Xt = np.empty((L + q, N))
        np.take(ystarT, idx, axis=0, out=Xt[:L])
        Xt[L:] = Tt
        y = ystarT[p]
        G = b = None
        if gram is not None:
            G = np.empty((L + q, L + q))
            G[:L, :L] = gram[np.ix_(idx, idx)]
            G[:L, L:] = gramT[idx]
            G[L:, :L] = gramT[idx].T
            G[L:, L:] = TT
            b = np.concatenate([gram[idx, p], gramT[p]])
        m_sys, m_poly, _ = _heldout(Xt, L, y, k, lam, G=G, b=b)
        out_sys[:, i] = m_sys
        out_poly[:, i] = m_poly
    return out_sys, out_poly


def cpm_detrend_pixels(flux, quality, time, rows, cols, params: CPMParams, *, mission="TESS", threads: int = 1, name="cube"):
    """De-trend every pixel of a ``(time, pixel)`` flux array with the CPM (paper §2-3).

    Returns a dict with ``flux`` (de-trended, e-/s, NaN at dropped cadences / bad pixels),
    ``systematics`` and ``polynomial`` (``s * m_sys`` and ``s * m_poly`` in e-/s), ``keep``,
    ``background``, ``n_predictors`` (per pixel), ``k``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ntime, npix = flux.shape
    if ntime < 2:
        raise CubeError(f"{name}: has {ntime} cadence(s); CPM train-and-test needs at least 2")
    prep = preprocess(flux, quality, time, params, mission=mission, name=name)
    for m in prep.warnings:
        log.warning(m)
        warnings.warn(m, CPMWarning, stacklevel=2)
    n = prep.ystar.shape[0]
    k = effective_k(params, prep.time, n)
    sec = section_index(n, k)
    T = poly_basis(prep.time, params.poly_degree)
    targets = np.flatnonzero(prep.valid)
    # section-padded layout: sections one after the other, each padded to n_max with zeros
    real = sec.ravel() < n  # the real entries are 0..n-1 in order (contiguous sections)
    ystarT = np.zeros((npix, sec.size))
    ystarT[:, real] = prep.ystar.T
    Tt = np.zeros((T.shape[1], sec.size))
    Tt[:, real] = T.T
    use_gram = npix <= params.gram_max_pixels
    gram = gramT = None
    TT = T.T @ T
    if use_gram:
        gram = ystarT @ ystarT.T  # the zero pads change no product
        gramT = prep.ystar.T @ T
    preds, counts = select_predictors(rows, cols, prep.median, prep.valid, targets, params, ystar=prep.ystar, gram=gram)
    prep.ystar = None  # the padded transposed copy is all the solver needs
    short = counts < params.n_predictors
    if short.any():
        msg = (
            f"{name}: {int(short.sum())} of {targets.size} pixels have fewer than L={params.n_predictors} candidate "
            f"predictors outside the {params.exclusion_size}x{params.exclusion_size} exclusion square "
            f"(min {int(counts.min())}); using all available candidates for them"
        )
        log.warning(msg)
        warnings.warn(msg, CPMWarning, stacklevel=2)
    log.info("CPM: %d pixels, %d cadences kept of %d, k=%d sections, L=%d, lambda_L=%g, lambda_P=%g, poly=%d, %s",
             targets.size, n, ntime, k, params.n_predictors, params.lambda_L, params.lambda_P, params.poly_degree,
             "shared Gram" if use_gram else "per-pixel Gram")
    chunks = [np.arange(s, min(s + params.chunk_pixels, targets.size)) for s in range(0, targets.size, params.chunk_pixels)]
    results = _run_chunks(
        [(targets[c], preds[c], counts[c]) for c in chunks],
        (ystarT, Tt, k, params, gram, gramT, TT),
        threads=threads,
        scheduler=params.dask_scheduler,
    )
    m_sys = np.full((n, npix), np.nan)
    m_poly = np.full((n, npix), np.nan)
    for c, (s_, p_) in zip(chunks, results):
        m_sys[:, targets[c]] = s_[real]
        m_poly[:, targets[c]] = p_[real]
    del results
    sys_flux = np.multiply(m_sys, prep.scale, out=m_sys)
    poly_flux = np.multiply(m_poly, prep.scale, out=m_poly)
    fk = flux[prep.keep] - prep.background[:, None]
    det = fk - sys_flux
    if params.remove_poly:
        det = det - poly_flux
    det[~prep.finite] = np.nan
    det[:, ~prep.valid] = np.nan
    out = {}
    for key, arr in (("flux", det), ("systematics", sys_flux), ("polynomial", poly_flux)):
        full = np.full((ntime, npix), np.nan)
        full[prep.keep] = arr
        out[key] = full
    bg = np.full(ntime, np.nan)
    bg[prep.keep] = prep.background
    npred = np.zeros(npix, dtype=np.int64)
    npred[targets] = counts
    out.update(keep=prep.keep, background=bg, n_predictors=npred, k=k, valid=prep.valid, median=prep.median, scale=prep.scale)
    return out


def _run_chunks(chunk_args, shared, *, threads=1, scheduler=None):
    """Run ``_detrend_chunk`` over chunks of target pixels in the compute context of
    :mod:`workflow_lib.parallel`: the threaded scheduler with ``threads`` workers (one BLAS thread
    each), or the dask.distributed scheduler ``scheduler`` (``local:N``, an address, ...), to which
    the arrays every chunk shares are sent once."""
    from .parallel import dask_map, describe

    names = ("ystarT", "Tt", "k", "params", "gram", "gramT", "TT")
    log.info("CPM: %d chunks on %s", len(chunk_args), describe(threads, scheduler))
    return dask_map(_detrend_chunk, chunk_args, threads=threads, scheduler=scheduler, shared=dict(zip(names, shared)))


# ------------------------------------------------------------------------- cubes

def cpm_detrend_cube(ds: xr.Dataset, params: CPMParams, *, threads: int = 1, name: str = "cube", config: dict | None = None,
                     inputs=()) -> xr.Dataset:
    """De-trended cube in the input's layout (image or pixel table), flux convention in the module doc.

    Extra variables: ``cpm_systematics`` and ``cpm_polynomial`` (e-/s, ``s*m_sys``, ``s*m_poly``),
    ``cpm_background`` (time,), per-pixel ``cpm_n_predictors``, ``cpm_median``, ``cpm_scale``.
    """
    validate_cube(ds, name)
    if ds.sizes["time"] < 2:
        raise CubeError(f"{name}: has {ds.sizes['time']} cadence(s); CPM train-and-test needs at least 2")
    image = "pixel" not in ds.dims
    tab = as_pixel_table(ds, drop_nan=False)
    flux = np.asarray(tab["flux"].transpose("time", "pixel").values, dtype=np.float64)
    res = cpm_detrend_pixels(flux, tab["quality"].values, tab["time"].values, tab["row"].values, tab["column"].values, params,
                             mission=ds.attrs.get("mission", "TESS"), threads=threads, name=name)
    extra = {
        "flux": (res["flux"].astype(np.float32), {"units": "electron / s", "long_name": "CPM de-trended pixel flux",
                                                  "convention": "f - background - s*m_sys (see workflow_lib.cpm)"}),
        "cpm_systematics": (res["systematics"].astype(np.float32), {"units": "electron / s", "long_name": "s * m_sys"}),
        "cpm_polynomial": (res["polynomial"].astype(np.float32), {"units": "electron / s", "long_name": "s * m_poly"}),
    }
    per_pixel = {
        "cpm_n_predictors": (res["n_predictors"].astype(np.int32), {"long_name": "number of predictor pixels L"}),
        "cpm_median": (res["median"], {"units": "electron / s"}),
        "cpm_scale": (res["scale"], {"units": "electron / s", "long_name": "normalisation scale s"}),
    }
    out = ds[["flux_err", "quality"]].copy()
    if image:
        shape = (ds.sizes["row"], ds.sizes["column"])
        dims3 = ("time", "row", "column")
        out["flux_err"] = ds["flux_err"].transpose(*dims3)
        for key, (arr, attrs) in extra.items():
            out[key] = (dims3, arr.reshape((arr.shape[0],) + shape), attrs)
        for key, (arr, attrs) in per_pixel.items():
            out[key] = (("row", "column"), arr.reshape(shape), attrs)
    else:
        out["flux_err"] = ds["flux_err"].transpose("time", "pixel")
        for key, (arr, attrs) in extra.items():
            out[key] = (("time", "pixel"), arr, attrs)
        for key, (arr, attrs) in per_pixel.items():
            out[key] = (("pixel",), arr, attrs)
    out["cpm_background"] = (("time",), res["background"], {"units": "electron / s"})
    out.attrs = dict(ds.attrs)
    out.attrs.update(cpm_k=int(res["k"]), cpm_params=json.dumps(asdict(params), sort_keys=True),
                     provenance=provenance_json("cpm_detrend", inputs=inputs, config=config or asdict(params)))
    return out


# ------------------------------------------------------------------------- apertures

@dataclass(frozen=True)
class ApertureParams:
    """Circular apertures around catalog sources: radius r(G) = clip(r_max - slope (G - mag_bright), r_min, r_max)."""

    radius_min: float = 1.0
    radius_max: float = 3.0
    mag_bright: float = 10.0
    slope: float = 0.5
    mag_limit: float | None = None


def aperture_radius(gmag, ap: ApertureParams) -> np.ndarray:
    """Aperture radius [px] from the Gaia G magnitude (brighter -> larger; documented in the schema)."""
    g = np.asarray(gmag, dtype=np.float64)
    r = ap.radius_max - ap.slope * (np.where(np.isfinite(g), g, 99.0) - ap.mag_bright)
    return np.clip(r, ap.radius_min, ap.radius_max)


def source_apertures(catalog, rows, cols, ap: ApertureParams, *, user_apertures: dict | None = None, name="catalog"):
    """Aperture pixel index lists: catalog sources on the cutout, then the user apertures.

    A source's aperture holds the pixels whose centre is within r(G) of its (row, column); at least
    the nearest pixel.  User apertures (name -> [[row, column], ...]) get source_id -1, -2, ...
    Returns ``(apertures, columns)`` with columns a dict of per-aperture metadata.
    """
    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    apertures, meta = [], {"source_id": [], "row": [], "column": [], "phot_g_mean_mag": [], "aperture_radius": [], "aperture_name": []}
    if catalog is not None and len(catalog):
        sel = np.ones(len(catalog), dtype=bool)
        if "on_cutout" in catalog.colnames:
            sel &= np.asarray(catalog["on_cutout"], dtype=bool)
        g = np.asarray(catalog["phot_g_mean_mag"], dtype=np.float64)
        if ap.mag_limit is not None:
            sel &= g <= ap.mag_limit
        radius = aperture_radius(g, ap)
        for i in np.flatnonzero(sel):
            r0, c0 = float(catalog["row"][i]), float(catalog["column"][i])
            d2 = (rows - r0) ** 2 + (cols - c0) ** 2
            if d2.min() > 0.5:  # nearest pixel centre farther than ~0.7 px: not on this cube
                continue
            pix = np.flatnonzero(d2 <= radius[i] ** 2)
            if pix.size == 0:
                pix = np.array([int(np.argmin(d2))])
            apertures.append(pix)
            meta["source_id"].append(int(catalog["source_id"][i]))
            meta["row"].append(r0)
            meta["column"].append(c0)
            meta["phot_g_mean_mag"].append(g[i])
            meta["aperture_radius"].append(float(radius[i]))
            meta["aperture_name"].append(f"Gaia DR3 {int(catalog['source_id'][i])}")
    lookup = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    for j, (uname, pixels) in enumerate((user_apertures or {}).items()):
        idx = []
        for rc in pixels:
            key = (int(rc[0]), int(rc[1]))
            if key not in lookup:
                raise CubeError(f"{name}: target_aperture {uname!r} pixel [row, column]={list(key)} is not on the cube")
            idx.append(lookup[key])
        idx = np.array(sorted(set(idx)))
        apertures.append(idx)
        meta["source_id"].append(-(j + 1))
        meta["row"].append(float(rows[idx].mean()))
        meta["column"].append(float(cols[idx].mean()))
        meta["phot_g_mean_mag"].append(np.nan)
        meta["aperture_radius"].append(np.nan)
        meta["aperture_name"].append(str(uname))
    meta = {k: np.asarray(v) for k, v in meta.items()}
    meta["source_id"] = meta["source_id"].astype(np.int64)
    meta["aperture_npix"] = np.array([a.size for a in apertures], dtype=np.int32)
    return apertures, meta


def aperture_sums(flux, flux_err, apertures, valid=None):
    """Sum of pixel flux over each aperture, ``(nsource, ntime)``; errors added in quadrature.

    Pixels that are not ``valid`` (bad/all-NaN) are left out of every aperture.
    """
    flux = np.asarray(flux, dtype=np.float64)
    err = np.asarray(flux_err, dtype=np.float64)
    out = np.full((len(apertures), flux.shape[0]), np.nan)
    oerr = np.full_like(out, np.nan)
    for i, pix in enumerate(apertures):
        if valid is not None:
            pix = pix[valid[pix]]
        if pix.size:
            out[i] = flux[:, pix].sum(axis=1)
            oerr[i] = np.sqrt((err[:, pix] ** 2).sum(axis=1))
    return out, oerr


# ------------------------------------------------------------------------- multi-sector stitching

def stitch_offset(t1, f1, t2, f2, n_points: int = 100) -> float:
    """Offset to add to segment 2 (paper §4.1): fit the last ``n_points`` of 1 and the first of 2
    simultaneously with one common slope and two means; the offset is the difference of the means."""
    ok1 = np.isfinite(t1) & np.isfinite(f1)
    ok2 = np.isfinite(t2) & np.isfinite(f2)
    a_t, a_f = np.asarray(t1)[ok1][-n_points:], np.asarray(f1)[ok1][-n_points:]
    b_t, b_f = np.asarray(t2)[ok2][:n_points], np.asarray(f2)[ok2][:n_points]
    if a_t.size < 2 or b_t.size < 2:
        raise ValueError("stitching needs at least 2 finite points on each side")
    t = np.concatenate([a_t, b_t])
    t0 = t.mean()
    A = np.zeros((t.size, 3))
    A[: a_t.size, 0] = 1.0
    A[a_t.size :, 1] = 1.0
    A[:, 2] = t - t0
    coef, *_ = np.linalg.lstsq(A, np.concatenate([a_f, b_f]), rcond=None)
    return float(coef[0] - coef[1])


def stitch_sectors(times, fluxes, n_points: int = 100):
    """Stitch per-sector light curves in order (paper §4.1): each next sector is shifted onto the
    partially stitched light curve.  Returns (time, flux, offsets)."""
    if not times:
        raise ValueError("nothing to stitch")
    t = np.asarray(times[0], dtype=np.float64)
    f = np.asarray(fluxes[0], dtype=np.float64)
    offsets = [0.0]
    for tn, fn in zip(times[1:], fluxes[1:]):
        tn = np.asarray(tn, dtype=np.float64)
        fn = np.asarray(fn, dtype=np.float64)
        off = stitch_offset(t, f, tn, fn, n_points)
        offsets.append(off)
        t = np.concatenate([t, tn])
        f = np.concatenate([f, fn + off])
    return t, f, np.array(offsets)


# ------------------------------------------------------------------------- pipeline steps

def paramset_params(config: dict, paramset: str) -> CPMParams:
    """Parameters of a named parameter set: ``default`` or ``lambda_L_<value>`` (regularisation sweep)."""
    if paramset == "default":
        return cpm_params(config)
    if paramset.startswith("lambda_L_"):
        try:
            lam = float(paramset[len("lambda_L_"):])
        except ValueError as exc:
            raise ValueError(f"bad CPM parameter set name {paramset!r}") from exc
        return cpm_params(config, lambda_L=lam)
    raise ValueError(f"unknown CPM parameter set {paramset!r} (expected 'default' or 'lambda_L_<value>')")


def paramset_names(config: dict) -> list[str]:
    """``default`` plus one ``lambda_L_<value>`` per entry of ``cpm.sweep_lambda_L``."""
    return ["default"] + [f"lambda_L_{float(v):g}" for v in (config.get("sweep_lambda_L") or [])]


def _read_catalog(path):
    from astropy.table import Table

    if path is None:
        return None
    try:
        return Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # astropy raises many kinds
        raise CubeError(f"{path}: not a readable ECSV catalog ({exc})") from exc


def aperture_lightcurves(cube: xr.Dataset, detrended: xr.Dataset, catalog, ap: ApertureParams, *, user_apertures=None,
                         provenance: str = "", name: str = "cube", bitmask: int | None = None):
    """CPM and RAW aperture light-curve sets (``method`` "CPM" / "RAW") with CDPP coords.

    CPM: sum of de-trended pixels (already rescaled to e-/s); RAW: sum of the input pixels.
    Pixels that are not finite anywhere in the de-trended cube are left out of both.
    """
    from .lightcurve import lightcurve_set
    from .metrics import add_cdpp

    tab = as_pixel_table(cube, drop_nan=False)
    dtab = as_pixel_table(detrended, drop_nan=False)
    rows, cols = tab["row"].values, tab["column"].values
    apertures, meta = source_apertures(catalog, rows, cols, ap, user_apertures=user_apertures, name=name)
    valid = np.isfinite(dtab["flux"].values).any(axis=0)
    raw_f, raw_e = aperture_sums(tab["flux"].values, tab["flux_err"].values, apertures, valid)
    cpm_f, cpm_e = aperture_sums(dtab["flux"].values, dtab["flux_err"].values, apertures, valid)
    attrs = {"provenance": provenance, "aperture": json.dumps(asdict(ap))}
    if bitmask is None:
        bitmask = HARD_BITMASK.get(cube.attrs.get("mission", "TESS"), HARD_BITMASK["TESS"])
    cpm_lc = add_cdpp(lightcurve_set(cpm_f, cpm_e, cube, meta, method="CPM", attrs=attrs), bitmask=bitmask)
    raw_lc = add_cdpp(lightcurve_set(raw_f, raw_e, cube, meta, method="RAW", attrs=attrs), bitmask=bitmask)
    return cpm_lc, raw_lc


def write_fits_dir(sets, fits_dir) -> Path:
    """Write one FITS per source of each ``(light-curve set, prefix)`` into ``fits_dir``, atomically
    (a temporary sibling directory renamed into place)."""
    import shutil
    import uuid

    from .lightcurve import write_lightcurve_fits

    fits_dir = Path(fits_dir)
    tmp = fits_dir.parent / f".{fits_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for lc, prefix in sets:
            write_lightcurve_fits(lc, tmp, prefix)
        tmp.mkdir(parents=True, exist_ok=True)
        if fits_dir.exists():
            shutil.rmtree(fits_dir)
        tmp.rename(fits_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return fits_dir


def run_cpm_detrend(cube_path, catalog_path, *, detrended_path, lightcurves_path, raw_lightcurves_path, fits_dir,
                    config: dict, paramset: str = "default", target_aperture: dict | None = None, threads: int = 1,
                    field: str = "") -> dict:
    """Snakemake step ``cpm_detrend``: de-trend every pixel, write the cube, the CPM and RAW
    aperture light curves (zarr + one FITS per source).  Returns a small summary dict."""

    params = paramset_params(config, paramset)
    ap = ApertureParams(**(config.get("aperture") or {}))
    cube = open_cube(cube_path).load()
    catalog = _read_catalog(catalog_path)
    name = str(cube_path)
    prov_cfg = {"cpm": asdict(params), "aperture": asdict(ap), "paramset": paramset, "field": field,
                "target_aperture": target_aperture or {}}
    det = cpm_detrend_cube(cube, params, threads=threads, name=name, config=prov_cfg, inputs=[cube_path, catalog_path])
    write_zarr_atomic(det, detrended_path)
    log.info("wrote %s", detrended_path)
    prov = provenance_json("cpm_lightcurves", inputs=[cube_path, catalog_path], config=prov_cfg)
    bitmask = params.quality_bitmask if params.quality_bitmask is not None else HARD_BITMASK.get(cube.attrs.get("mission", "TESS"), 24319)
    cpm_lc, raw_lc = aperture_lightcurves(cube, det, catalog, ap, user_apertures=target_aperture, provenance=prov, name=name,
                                          bitmask=bitmask)
    cpm_lc.attrs["paramset"] = paramset
    raw_lc.attrs["paramset"] = paramset
    write_zarr_atomic(cpm_lc, lightcurves_path)
    write_zarr_atomic(raw_lc, raw_lightcurves_path)
    write_fits_dir([(cpm_lc, "cpm"), (raw_lc, "raw")], fits_dir)
    summary = {
        "n_sources": int(cpm_lc.sizes["source"]),
        "median_cdpp_1h_cpm": float(np.nanmedian(cpm_lc["cdpp_1h"].values)) if cpm_lc.sizes["source"] else float("nan"),
        "median_cdpp_1h_raw": float(np.nanmedian(raw_lc["cdpp_1h"].values)) if raw_lc.sizes["source"] else float("nan"),
    }
    log.info("CPM %s: %d light curves, median 1-h CDPP %.0f ppm (raw %.0f ppm)", paramset, summary["n_sources"],
             summary["median_cdpp_1h_cpm"], summary["median_cdpp_1h_raw"])
    return summary


def sweep_summary(lightcurve_paths: dict, raw_path, out_path, *, lfd_path=None, mag_range=(8.0, 14.0)) -> "Table":
    """ECSV table comparing parameter sets by CDPP (median over catalog sources with G in ``mag_range``).

    ``lightcurve_paths``: paramset name -> CPM lightcurves.zarr.  A RAW row (and an LFD row when
    ``lfd_path`` exists; CDPP added with :func:`workflow_lib.metrics.add_cdpp` if missing) is included.
    """
    from astropy.table import Table

    from .metrics import add_cdpp

    rows = []

    def _row(label, method, path):
        lc = xr.open_zarr(path, consolidated=False).load()
        if "cdpp_1h" not in lc.coords:
            lc = add_cdpp(lc)
        g = lc["phot_g_mean_mag"].values if "phot_g_mean_mag" in lc.coords else np.full(lc.sizes["source"], np.nan)
        sel = (lc["source_id"].values >= 0) & (g >= mag_range[0]) & (g <= mag_range[1])
        lam = json.loads(lc.attrs.get("provenance", "{}")).get("config", {}).get("cpm", {}).get("lambda_L", np.nan) if method == "CPM" else np.nan
        rows.append({"paramset": label, "method": method, "lambda_L": float(lam), "n_sources": int(sel.sum()),
                     "median_cdpp_1h": float(np.nanmedian(lc["cdpp_1h"].values[sel])) if sel.any() else np.nan,
                     "median_cdpp_6h": float(np.nanmedian(lc["cdpp_6h"].values[sel])) if sel.any() else np.nan})

    _row("raw", "RAW", raw_path)
    if lfd_path is not None and Path(lfd_path).exists():
        _row("lfd", "LFD", lfd_path)
    for label, path in lightcurve_paths.items():
        _row(label, "CPM", path)
    table = Table(rows=rows)
    table.meta["mag_range"] = list(mag_range)
    table.meta["provenance"] = provenance_json("cpm_sweep_summary", inputs=[raw_path, *lightcurve_paths.values()])
    with atomic_path(out_path) as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)
    return table


def run_cpm_stitch(lightcurve_paths: list, out_path, fits_dir, *, n_points: int = 100, group: str = "") -> xr.Dataset:
    """Snakemake step ``cpm_stitch``: stitch the light curves of sources present in every
    sector (same source_id, or same user-aperture name) in time order (paper §4.1)."""
    from .lightcurve import lightcurve_set

    sets = [xr.open_zarr(p, consolidated=False).load() for p in lightcurve_paths]
    if not sets:
        raise ValueError(f"cpm_stitch {group}: no light-curve sets")
    sets.sort(key=lambda s: float(np.nanmin(s["time"].values)))
    for a, b in zip(sets[:-1], sets[1:]):
        if np.nanmin(b["time"].values) <= np.nanmax(a["time"].values):
            msg = f"cpm_stitch {group}: sectors overlap in time; stitching assumes consecutive sectors"
            log.warning(msg)
            warnings.warn(msg, CPMWarning, stacklevel=2)

    def keys(s):
        names = s["aperture_name"].values if "aperture_name" in s.coords else s["source_id"].values.astype(str)
        return [str(x) if sid < 0 else str(sid) for x, sid in zip(names, s["source_id"].values)]

    common = set(keys(sets[0]))
    for s in sets[1:]:
        common &= set(keys(s))
    common = sorted(common)
    if not common:
        raise ValueError(f"cpm_stitch {group}: no source appears in all of {list(map(str, lightcurve_paths))}")
    fluxes, errs, offsets = [], [], []
    time = np.concatenate([s["time"].values for s in sets])
    for key in common:
        parts = [(s["time"].values, s["flux"].values[keys(s).index(key)], s["flux_err"].values[keys(s).index(key)]) for s in sets]
        t, f, off = stitch_sectors([p[0] for p in parts], [p[1] for p in parts], n_points)
        fluxes.append(f)
        errs.append(np.concatenate([p[2] for p in parts]))
        offsets.append(off)
    first = sets[0]
    idx0 = [keys(first).index(k) for k in common]
    meta = {c: first[c].values[idx0] for c in first.coords if first[c].dims == ("source",) and not c.startswith("cdpp")}
    pseudo = xr.Dataset(
        {"quality": ("time", np.concatenate([s["quality"].values for s in sets]))},
        coords={"time": ("time", time, dict(first["time"].attrs)),
                "cadenceno": ("time", np.concatenate([s["cadenceno"].values for s in sets]))},
        attrs={k: v for k, v in first.attrs.items() if k not in ("sector", "provenance")},
    )
    prov = provenance_json("cpm_stitch", inputs=lightcurve_paths, config={"n_points": n_points, "group": group})
    lc = lightcurve_set(np.array(fluxes), np.array(errs), pseudo, meta, method=first.attrs.get("method", "CPM"),
                        attrs={"provenance": prov, "sectors": json.dumps([s.attrs.get("sector") for s in sets], default=str)})
    lc = lc.assign_coords(stitch_offset=(("source", "segment"), np.array(offsets)))
    from .metrics import add_cdpp

    lc = add_cdpp(lc)
    write_zarr_atomic(lc, out_path)
    write_fits_dir([(lc, "cpm_stitched")], fits_dir)
    return lc
