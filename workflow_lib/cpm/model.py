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

Cubes the CPM cannot model are refused (:class:`CubeError` naming the cube and what to change)
-----------------------------------------------------------------------------------------------
* fewer than 2 usable cadences after the QUALITY bitmask;
* a flux that is constant over the kept cadences at every pixel (an all-zero or blank cube): there is
  nothing to model and the "de-trended" light curves would just be the raw data;
* fewer good cadences than train-and-test sections: every one of the ``k`` sections (after the
  cadence scaling of §3.5) needs at least one cadence, so ``k`` is never silently reduced;
* a modelled pixel with fewer candidate predictors outside the exclusion square than
  :func:`min_predictors` ``(L) = min(L, max(8, ceil(L / 4)))`` (64 for the default L = 256): below that
  the systematics model degenerates (with none it is the polynomial alone, i.e. the raw data).  Between
  that minimum and L the available candidates are used with a :class:`CPMWarning`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.linalg as sla
import xarray as xr
from scipy.linalg.blas import dtrsm

from workflow_lib.core.linalg import MAD_TO_SIGMA, nanmedian_columns
from workflow_lib.core.logs import get_logger
from workflow_lib.core.parallel import dask_map, describe
from workflow_lib.core.provenance import provenance_json
from workflow_lib.core.quality import HARD_BITMASK
from workflow_lib.core.settings import schema_defaults
from workflow_lib.data.cube import CubeError, as_pixel_table, validate_cube

log = get_logger("cpm")


PREDICTOR_METHODS = ("similar_brightness", "cosine_similarity", "random")


class CPMWarning(UserWarning):
    """A recoverable problem with the input of a CPM step (fewer predictors, NaN pixels)."""


class CPMNotApplicable(CubeError):
    """The cube is valid but the CPM cannot model it: too few cadences for the train-and-test sections,
    or pixels without enough distant predictor pixels (a target-pixel-file stamp is smaller than the
    exclusion square). The steps skip the CPM for such a cube when ``cpm.on_unmodellable`` is ``skip``."""


def skip_unmodellable(exc: CPMNotApplicable, setting: str | None, instead: str) -> str:
    """The ``cpm.on_unmodellable`` policy for a cube the CPM cannot model: ``setting`` 'skip' (None: the
    schema default) logs a warning saying what is done ``instead`` and returns the reason (the refusal's
    message); anything else raises the refusal, naming the setting that would go on without the CPM."""
    if (setting or _DEFAULTS["on_unmodellable"]) != "skip":
        raise CPMNotApplicable(f"{exc} (or cpm.on_unmodellable: skip, to go on without the CPM)") from exc
    log.warning("%s; cpm.on_unmodellable is 'skip': %s", exc, instead)
    return str(exc)


#: the fewest candidate predictor pixels any modelled pixel may have is min(L, max(this, ceil(L / 4)))
MIN_PREDICTORS_FLOOR = 8


def min_predictors(n_predictors: int) -> int:
    """Fewest candidate predictor pixels a target pixel may have: ``min(L, max(8, ceil(L / 4)))``."""
    n_predictors = int(n_predictors)
    return min(n_predictors, max(MIN_PREDICTORS_FLOOR, -(-n_predictors // 4)))


#: the ``cpm`` section defaults of the schema (the one place they are written down)
_DEFAULTS = schema_defaults("cpm")


@dataclass(frozen=True)
class CPMParams:
    """CPM tuning parameters; the defaults (the paper's, §3.3, §3.4, §4) are those of the ``cpm`` section of the schema."""

    n_predictors: int = _DEFAULTS["n_predictors"]  #: L
    exclusion_size: int = _DEFAULTS["exclusion_size"]  #: side of the exclusion square (2h+1 with h = size // 2)
    predictor_method: str = _DEFAULTS["predictor_method"]
    lambda_L: float = _DEFAULTS["lambda_L"]
    lambda_P: float = _DEFAULTS["lambda_P"]
    poly_degree: int = _DEFAULTS["poly_degree"]  #: 0 = no polynomial component
    k: int = _DEFAULTS["k"]  #: number of train-and-test sections for `k_reference_cadence_minutes` data
    k_reference_cadence_minutes: float = _DEFAULTS["k_reference_cadence_minutes"]
    scale_k_with_cadence: bool = _DEFAULTS["scale_k_with_cadence"]
    remove_poly: bool = _DEFAULTS["remove_poly"]
    background_subtract: bool = _DEFAULTS["background_subtract"]
    n_background_pixels: int = _DEFAULTS["n_background_pixels"]
    quality_bitmask: int | None = _DEFAULTS["quality_bitmask"]  #: None = HARD_BITMASK of the mission
    min_finite_fraction: float = _DEFAULTS["min_finite_fraction"]
    seed: int = _DEFAULTS["seed"]
    chunk_pixels: int = _DEFAULTS["chunk_pixels"]
    gram_max_pixels: int = _DEFAULTS["gram_max_pixels"]
    dask_scheduler: str | None = _DEFAULTS["dask_scheduler"]

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


def requested_k(params: CPMParams, time: np.ndarray) -> int:
    """Number of sections asked for: ``k`` for 30-min data, scaled so sections keep their duration (§3.5)."""
    k = params.k
    if params.scale_k_with_cadence and time.size > 1:
        dt_min = float(np.nanmedian(np.diff(time))) * 1440.0
        if dt_min > 0:
            k = int(round(params.k * params.k_reference_cadence_minutes / dt_min))
    return int(max(2, k))


def effective_k(params: CPMParams, time: np.ndarray, n_cadences: int) -> int:
    """Number of sections: :func:`requested_k` capped at ``n_cadences`` (the step refuses the cap,
    see :func:`section_problem`)."""
    return int(max(2, min(requested_k(params, time), n_cadences)))


def section_problem(params: CPMParams, time: np.ndarray, n_cadences: int) -> str | None:
    """Why ``n_cadences`` good cadences cannot be split into the :func:`requested_k` sections (some
    section would be empty: ``k`` is never silently reduced), or None."""
    k = requested_k(params, time)
    if n_cadences >= k:
        return None
    how = f"cpm.k={params.k} scaled to the cadence" if k != params.k else f"cpm.k={params.k}"
    kmax = max(2, int(n_cadences * params.k / k))
    return (
        f"only {n_cadences} good cadences for k={k} train-and-test sections ({how}), every section needs at least "
        f"1 cadence: set cpm.k <= {kmax} or use a longer cube"
    )


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
    bitmask = (
        params.quality_bitmask
        if params.quality_bitmask is not None
        else HARD_BITMASK.get(mission, HARD_BITMASK["TESS"])
    )
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
        msgs.append(
            f"{name}: {n_bad} pixel(s) ({n_allnan} all-NaN) have too few finite cadences; their CPM output is NaN"
        )
    if not valid.any():
        raise CubeError(
            f"{name}: no pixel has finite flux on at least {params.min_finite_fraction:.0%} of the kept cadences"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med0 = nanmedian_columns(f)
        spread = np.nanmax(f[:, valid], axis=0) - np.nanmin(f[:, valid], axis=0)
    if not (spread > 0).any():
        what = "zero" if np.all(med0[valid] == 0) else "constant"
        raise CubeError(
            f"{name}: the flux is {what} over the {nkeep} kept cadences at every pixel; there is nothing to de-trend "
            "(check the download / the cube's flux column)"
        )
    bg = np.zeros(nkeep)
    if params.background_subtract:
        vidx = np.flatnonzero(valid)
        faint = vidx[np.argsort(med0[vidx], kind="stable")[: params.n_background_pixels]]
        bg = np.nanmedian(f[:, faint], axis=1)
        bg = np.where(np.isfinite(bg), bg, 0.0)
        f = f - bg[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = nanmedian_columns(f)
        mad = MAD_TO_SIGMA * nanmedian_columns(np.abs(f - med))
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
    if params.predictor_method == "similar_brightness":
        return _similar_brightness(rows, cols, median, valid, targets, h, L)
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
        if params.predictor_method == "cosine_similarity":
            dots = gram[cidx, p] if gram is not None else ystar[:, cidx].T @ ystar[:, p]
            cos = dots / (norms[cidx] * norms[p])
            chosen = cidx[np.argsort(-cos, kind="stable")[:L]]
        else:
            rng = np.random.default_rng([params.seed, int(p)])
            chosen = np.sort(rng.choice(cidx, size=min(L, cidx.size), replace=False)) if cidx.size else cidx
        out[i, : chosen.size] = chosen
        counts[i] = chosen.size
    return out, counts


def _similar_brightness(rows, cols, median, valid, targets, h, L):
    """``similar_brightness`` predictors: per target, the L candidates with the closest medians,
    ties by pixel index (what a stable argsort of ``|median - median[p]|`` over all candidates in
    index order gives), found in a window of the brightness-sorted valid pixels instead of a sort of
    all of them per target (that sort was a third of a 136 x 136 tile's CPM).

    Why the window is exact: at most ``E = (2h+1)^2`` pixels are excluded around a target, so on
    either side of the target's place in the sorted medians the first ``L + E`` pixels hold at
    least L candidates, each at least as close as anything beyond them.  The window is then widened
    over runs of equal distance at its ends, because among equal distances the lower index wins and
    may lie farther out.
    """
    out = np.full((len(targets), L), -1, dtype=np.int64)
    counts = np.zeros(len(targets), dtype=np.int64)
    vidx = np.flatnonzero(valid)
    vidx = vidx[np.argsort(median[vidx], kind="stable")]  # by median, ties by index
    vmed = median[vidx]
    n = vidx.size
    reach = L + (2 * h + 1) ** 2
    for i, p in enumerate(targets):
        m = median[p]
        q = int(np.searchsorted(vmed, m, side="left"))
        lo, hi = max(0, q - reach), min(n, q + reach)
        while lo > 0 and abs(vmed[lo - 1] - m) == abs(vmed[lo] - m):
            lo -= 1
        while hi < n and abs(vmed[hi] - m) == abs(vmed[hi - 1] - m):
            hi += 1
        w = vidx[lo:hi]
        w = w[(np.abs(rows[w] - rows[p]) > h) | (np.abs(cols[w] - cols[p]) > h)]
        chosen = w[np.lexsort((w, np.abs(median[w] - m)))[:L]]
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


def _normal_cholesky(G: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor C of the regularised normal matrix ``A = X^T X + Λ = C C^T`` (eq. 7-8)."""
    try:
        return np.linalg.cholesky(G + np.diag(lam))
    except np.linalg.LinAlgError as exc:
        raise np.linalg.LinAlgError(
            "CPM normal matrix X^T X + Λ is not positive definite (collinear predictors with lambda_L = 0?); "
            "use lambda_L > 0"
        ) from exc


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
    C = _normal_cholesky(G, lam)
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


def _heldout_multi(Xt, L, Y, k, lam, *, G=None):
    """:func:`_heldout` for several target series of one pixel that share its design matrix: ``Y``
    (k*n_max, r) in the section-padded layout.  Returns ``(m_sys, m_poly)``, each (k*n_max, r).

    Everything that depends on the design only is computed once and shared by the r right-hand
    sides: the Cholesky factor ``A = X*^T X* + Λ = C C^T`` (eqs. 7-8), ``Q = X* C^-T``, the blocks
    ``H_jj = Q_j Q_j^T``, ``D = E_T^T A^-1 X*^T`` and one LU factorisation of each ``I - H_jj``.  Per
    right-hand side y the cost is that of a ridge solve: ``w = A^-1 X*^T y``, ``r = y - X* w`` and the
    Woodbury update of the module doc, column by column::

        m_sys,j  = X_j^L w^L - (H_jj - T_j D_j) (I - H_jj)^-1 r_j
        m_poly,j = T_j^P (w^P - D_j^P (I - H_jj)^-1 r_j)

    The held-out prediction is linear in y for fixed predictors, so this equals r separate runs of
    :func:`_heldout` (``tests/test_deblend_detrend.py``)."""
    m, N = Xt.shape
    n_max = N // k
    q = m - L
    Y = np.asarray(Y, dtype=np.float64).reshape(N, -1)
    r_ = Y.shape[1]
    if G is None:
        G = Xt @ Xt.T
    C = _normal_cholesky(G, lam)
    W = sla.cho_solve((C, True), Xt @ Y, check_finite=False)  # (m, r) full-data coefficients, eq. 7
    R = Y - Xt.T @ W  # full-data residuals (0 at the pads)
    Q = dtrsm(1.0, C, Xt.T, side=1, lower=1, trans_a=1)
    Qt3 = Q.T.reshape(m, k, n_max)
    H = np.matmul(Qt3.transpose(1, 2, 0), Qt3.transpose(1, 0, 2))  # (k, n_max, n_max)
    Et = np.zeros((m, q))
    Et[L:, :] = np.eye(q)
    D3 = (sla.cho_solve((C, True), Et, check_finite=False).T @ Xt).reshape(q, k, n_max)
    M = np.eye(n_max)[None] - H
    Z = np.linalg.solve(M, R.reshape(k, n_max, r_))  # (I - H_jj)^-1 r_j, one LU per section for all r
    dW = np.einsum("qki,kir->kqr", D3, Z)  # w_T - w_T(-j) per section and right-hand side
    Tk = Xt[L:].reshape(q, k, n_max)
    sys_full = (Xt[:L].T @ W[:L]).reshape(k, n_max, r_)
    m_sys = sys_full - H @ Z + np.einsum("qki,kqr->kir", Tk, dW)
    poly_full = (Xt[L:-1].T @ W[L:-1]).reshape(k, n_max, r_)
    m_poly = poly_full - np.einsum("qki,kqr->kir", Tk[:-1], dW[:, :-1])
    return m_sys.reshape(N, r_), m_poly.reshape(N, r_)


def _design(p, idx, ystarT, Tt, params, gram, gramT, TT):
    """Transposed design ``[X_L | T]^T`` of target pixel ``p`` with predictors ``idx`` in the padded
    layout, the diagonal of Λ and (with the shared Gram products) ``X^T X``, else None."""
    L = idx.size
    q = Tt.shape[0]
    lam = regularisation_diag(L, params.poly_degree, params.lambda_L, params.lambda_P)
    Xt = np.empty((L + q, ystarT.shape[1]))
    np.take(ystarT, idx, axis=0, out=Xt[:L])
    Xt[L:] = Tt
    G = None
    if gram is not None:
        G = np.empty((L + q, L + q))
        G[:L, :L] = gram[np.ix_(idx, idx)]
        G[:L, L:] = gramT[idx]
        G[L:, :L] = gramT[idx].T
        G[L:, L:] = TT
    return Xt, lam, G


def _subtracted_chunk(targets, preds, counts, groups, ystarT, subT, Tt, k, params, gram, gramT, TT):
    """Held-out CPM components of the model-subtracted series of a chunk of target pixels.

    ``groups[i]`` are the columns of ``subT`` (series, padded time: the subtracted models divided
    by the pixel's normalisation scale) that belong to pixel ``targets[i]``; each right-hand side
    is ``y*_p - subT[j]``.  Returns (m_sys, m_poly), each (k*n_max, n columns of the chunk) in the
    order of the concatenated groups."""
    ncol = sum(len(g) for g in groups)
    out_sys = np.empty((ystarT.shape[1], ncol))
    out_poly = np.empty((ystarT.shape[1], ncol))
    c0 = 0
    for i, p in enumerate(targets):
        cols = groups[i]
        Xt, lam, G = _design(p, preds[i, : counts[i]], ystarT, Tt, params, gram, gramT, TT)
        Y = ystarT[p][:, None] - subT[cols].T
        s_, p_ = _heldout_multi(Xt, counts[i], Y, k, lam, G=G)
        out_sys[:, c0 : c0 + len(cols)] = s_
        out_poly[:, c0 : c0 + len(cols)] = p_
        c0 += len(cols)
    return out_sys, out_poly


def cpm_detrend_subtracted(
    flux,
    quality,
    time,
    rows,
    cols,
    params: CPMParams,
    subtract,
    pixel,
    *,
    mission="TESS",
    threads: int = 1,
    name="cube",
):
    """CPM de-trending of pixels from which a model series was subtracted, several series per pixel.

    Column ``j`` of ``subtract`` (ntime, nseries) [e-/s] is subtracted from pixel ``pixel[j]`` of
    ``flux`` (ntime, npix) and the result is de-trended with the CPM of :func:`cpm_detrend_pixels`
    whose pre-processing (QUALITY mask, background, median, normalisation scale s) and predictor
    pixels (§3.3.2) come from the *unmodified* cube.  With ``y*_j = (f_p - b - median_p - g_j) / s_p``
    (``g_j`` = column j), every series of pixel p shares the design matrix ``X*`` of p (eq. 7), so
    its Cholesky factor and the Woodbury blocks are computed once per pixel (:func:`_heldout_multi`).
    The result follows the flux convention of the module doc for the subtracted pixel::

        F_j = f_p - g_j - b - s_p m_sys(y*_j)      [- s_p m_poly(y*_j) if remove_poly]

    Since the held-out prediction is linear in the target series, ``F_j = F_cpm,p - g_j +
    s_p m_sys(g_j / s_p)``: the CPM of the subtracted pixel is the CPM of the pixel minus the
    de-trended model.  The intercept is not regularised (Λ_00 = 0, eq. 8), so a constant in y* is
    fitted exactly by it and ``s_p`` / the median drop out of F_j: the normalisation of the
    unmodified pixel is exact, not an approximation.

    Returns a dict: ``flux``, ``systematics``, ``polynomial`` (ntime, nseries) [e-/s] (NaN at
    dropped cadences, at cadences where the pixel is NaN, and for pixels the CPM does not model),
    ``keep``, ``valid`` (per pixel), ``k``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    subtract = np.asarray(subtract, dtype=np.float64)
    pixel = np.asarray(pixel, dtype=np.int64)
    ntime, npix = flux.shape
    if subtract.shape != (ntime, pixel.size):
        raise ValueError(f"{name}: subtract must be (ntime, nseries) = ({ntime}, {pixel.size}), got {subtract.shape}")
    if pixel.size and (pixel.min() < 0 or pixel.max() >= npix):
        raise ValueError(f"{name}: series pixel indices must lie in [0, {npix})")
    if ntime < 2:
        raise CPMNotApplicable(f"{name}: has {ntime} cadence(s); CPM train-and-test needs at least 2")
    prep = preprocess(flux, quality, time, params, mission=mission, name=name)
    n = prep.ystar.shape[0]
    k = effective_k(params, prep.time, n)
    sec = section_index(n, k)
    T = poly_basis(prep.time, params.poly_degree)
    real, ystarT, Tt = _padded_layout(prep.ystar, T, sec)
    sub = np.nan_to_num(subtract[prep.keep]) / prep.scale[pixel][None, :]
    subT = np.zeros((pixel.size, sec.size))
    subT[:, real] = sub.T
    gram = gramT = None
    TT = T.T @ T
    if npix <= params.gram_max_pixels:
        gram = ystarT @ ystarT.T
        gramT = prep.ystar.T @ T
    # the pixels to model: those of the series that the CPM models (valid), in pixel order
    modelled = prep.valid[pixel]
    targets = np.unique(pixel[modelled])
    preds_all, counts_all = select_predictors(
        rows, cols, prep.median, prep.valid, targets, params, ystar=prep.ystar, gram=gram
    )
    prep.ystar = None
    if targets.size:
        _check_modelable(section_problem(params, prep.time, n), counts_all, targets.size, npix, params, name)
    order = np.argsort(pixel, kind="stable")
    order = order[modelled[order]]
    bounds = np.searchsorted(pixel[order], targets, side="left"), np.searchsorted(pixel[order], targets, "right")
    groups = [order[a:b] for a, b in zip(*bounds)]
    chunk = max(1, params.chunk_pixels)
    chunks = [np.arange(s, min(s + chunk, targets.size)) for s in range(0, targets.size, chunk)]
    log.info(
        "CPM of model-subtracted pixels: %d series on %d pixels, %d cadences kept of %d, k=%d",
        int(modelled.sum()),
        targets.size,
        n,
        ntime,
        k,
    )
    results = dask_map(
        _subtracted_chunk,
        [(targets[c], preds_all[c], counts_all[c], [groups[i] for i in c]) for c in chunks],
        threads=threads,
        scheduler=params.dask_scheduler,
        shared=dict(ystarT=ystarT, subT=subT, Tt=Tt, k=k, params=params, gram=gram, gramT=gramT, TT=TT),
    )
    m_sys = np.full((n, pixel.size), np.nan)
    m_poly = np.full((n, pixel.size), np.nan)
    for c, (s_, p_) in zip(chunks, results):
        colidx = np.concatenate([groups[i] for i in c])
        m_sys[:, colidx] = s_[real]
        m_poly[:, colidx] = p_[real]
    scale = prep.scale[pixel]
    sys_flux = m_sys * scale
    poly_flux = m_poly * scale
    det = flux[prep.keep][:, pixel] - np.nan_to_num(subtract[prep.keep]) - prep.background[:, None] - sys_flux
    if params.remove_poly:
        det = det - poly_flux
    det[~prep.finite[:, pixel]] = np.nan
    det[:, ~modelled] = np.nan
    out = {"keep": prep.keep, "valid": prep.valid, "k": k}
    for key, arr in (("flux", det), ("systematics", sys_flux), ("polynomial", poly_flux)):
        full = np.full((ntime, pixel.size), np.nan)
        full[prep.keep] = arr
        out[key] = full
    return out


def subtracted_without_cpm(
    flux, quality, time, rows, cols, params: CPMParams, subtract, pixel, *, mission="TESS", name="cube"
):
    """What :func:`cpm_detrend_subtracted` returns (same arguments; ``rows``/``cols`` are not needed), for a
    cube the CPM cannot model (:class:`CPMNotApplicable`): the model-subtracted pixels with the same
    pre-processing (QUALITY mask, faint-pixel background ``b``) and no systematics model,
    ``F_j = f_p - g_j - b``. ``systematics`` and ``polynomial`` are zero, ``k`` 0."""
    flux = np.asarray(flux, dtype=np.float64)
    subtract = np.asarray(subtract, dtype=np.float64)
    pixel = np.asarray(pixel, dtype=np.int64)
    ntime = flux.shape[0]
    prep = preprocess(flux, quality, time, params, mission=mission, name=name)
    det = flux[prep.keep][:, pixel] - np.nan_to_num(subtract[prep.keep]) - prep.background[:, None]
    det[:, ~prep.valid[pixel]] = np.nan
    out = {"keep": prep.keep, "valid": prep.valid, "k": 0}
    for key, arr in (("flux", det), ("systematics", 0.0 * det), ("polynomial", 0.0 * det)):
        full = np.full((ntime, pixel.size), np.nan)
        full[prep.keep] = arr
        out[key] = full
    return out


def _detrend_chunk(targets, preds, counts, ystarT, Tt, k, params, gram, gramT, TT):
    """CPM components for a chunk of target pixels, section-padded layout (see :func:`_heldout`).

    ``ystarT`` (npix, k*n_max) and ``Tt`` (P+1, k*n_max) are the transposed normalised fluxes and
    polynomial columns in that layout.  Returns (m_sys, m_poly), each (k*n_max, ntarget).
    """
    N = ystarT.shape[1]
    out_sys = np.empty((N, len(targets)))
    out_poly = np.empty((N, len(targets)))
    for i, p in enumerate(targets):
        idx = preds[i, : counts[i]]
        Xt, lam, G = _design(p, idx, ystarT, Tt, params, gram, gramT, TT)
        b = None if gram is None else np.concatenate([gram[idx, p], gramT[p]])
        m_sys, m_poly, _ = _heldout(Xt, idx.size, ystarT[p], k, lam, G=G, b=b)
        out_sys[:, i] = m_sys
        out_poly[:, i] = m_poly
    return out_sys, out_poly


def cpm_detrend_pixels(
    flux, quality, time, rows, cols, params: CPMParams, *, mission="TESS", threads: int = 1, name="cube"
):
    """De-trend every pixel of a ``(time, pixel)`` flux array with the CPM (paper §2-3).

    Returns a dict with ``flux`` (de-trended, e-/s, NaN at dropped cadences / bad pixels),
    ``systematics`` and ``polynomial`` (``s * m_sys`` and ``s * m_poly`` in e-/s), ``keep``,
    ``background``, ``n_predictors`` (per pixel), ``k``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ntime, npix = flux.shape
    if ntime < 2:
        raise CPMNotApplicable(f"{name}: has {ntime} cadence(s); CPM train-and-test needs at least 2")
    prep = preprocess(flux, quality, time, params, mission=mission, name=name)
    for m in prep.warnings:
        log.warning(m)
        warnings.warn(m, CPMWarning, stacklevel=2)
    n = prep.ystar.shape[0]
    k = effective_k(params, prep.time, n)
    sec = section_index(n, k)
    T = poly_basis(prep.time, params.poly_degree)
    targets = np.flatnonzero(prep.valid)
    real, ystarT, Tt = _padded_layout(prep.ystar, T, sec)
    use_gram = npix <= params.gram_max_pixels
    gram = gramT = None
    TT = T.T @ T
    if use_gram:
        gram = ystarT @ ystarT.T  # the zero pads change no product
        gramT = prep.ystar.T @ T
    preds, counts = select_predictors(rows, cols, prep.median, prep.valid, targets, params, ystar=prep.ystar, gram=gram)
    prep.ystar = None  # the padded transposed copy is all the solver needs
    _check_modelable(section_problem(params, prep.time, n), counts, targets.size, npix, params, name)
    log.info(
        "CPM: %d pixels, %d cadences kept of %d, k=%d sections, L=%d, lambda_L=%g, lambda_P=%g, poly=%d, %s",
        targets.size,
        n,
        ntime,
        k,
        params.n_predictors,
        params.lambda_L,
        params.lambda_P,
        params.poly_degree,
        "shared Gram" if use_gram else "per-pixel Gram",
    )
    chunks = [
        np.arange(s, min(s + params.chunk_pixels, targets.size)) for s in range(0, targets.size, params.chunk_pixels)
    ]
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
    out = _detrended_flux(flux, prep, m_sys, m_poly, params.remove_poly)
    bg = np.full(ntime, np.nan)
    bg[prep.keep] = prep.background
    npred = np.zeros(npix, dtype=np.int64)
    npred[targets] = counts
    out.update(
        keep=prep.keep, background=bg, n_predictors=npred, k=k, valid=prep.valid, median=prep.median, scale=prep.scale
    )
    return out


def _padded_layout(ystar, T, sec):
    """Section-padded layout: sections one after the other, each padded to the longest with zeros.

    Returns ``real`` (mask of the real entries, 0..n-1 in order: sections are contiguous), ``ystarT``
    (pixel, padded time) and ``Tt`` (polynomial term, padded time)."""
    n, npix = ystar.shape
    real = sec.ravel() < n
    ystarT = np.zeros((npix, sec.size))
    ystarT[:, real] = ystar.T
    Tt = np.zeros((T.shape[1], sec.size))
    Tt[:, real] = T.T
    return real, ystarT, Tt


def _check_modelable(k_problem, counts, n_targets: int, npix: int, params: CPMParams, name: str) -> None:
    """Refuse (:class:`CubeError`, one line naming every problem) too few cadences for the k sections
    and pixels with fewer than :func:`min_predictors` candidate predictors; warn (log and
    :class:`CPMWarning`) when pixels have fewer than L."""
    problems = [k_problem] if k_problem else []
    need = min_predictors(params.n_predictors)
    few = counts < need
    if few.any():
        problems.append(
            f"{int(few.sum())} of {n_targets} pixels have fewer than {need} candidate predictor pixels "
            f"(min {int(counts.min())}) outside the {params.exclusion_size}x{params.exclusion_size} exclusion square "
            f"in this {npix}-pixel cube, at least min(L, max({MIN_PREDICTORS_FLOOR}, L/4)) = {need} are needed for "
            f"L={params.n_predictors}: use a larger cutout or lower cpm.exclusion_size / cpm.n_predictors"
        )
    if problems:
        raise CPMNotApplicable(f"{name}: the CPM cannot model this cube: " + "; ".join(problems))
    short = counts < params.n_predictors
    if short.any():
        msg = (
            f"{name}: {int(short.sum())} of {n_targets} pixels have fewer than L={params.n_predictors} candidate "
            f"predictors outside the {params.exclusion_size}x{params.exclusion_size} exclusion square "
            f"(min {int(counts.min())}); using all available candidates for them"
        )
        log.warning(msg)
        warnings.warn(msg, CPMWarning, stacklevel=3)


def _detrended_flux(flux, prep: Prepared, m_sys, m_poly, remove_poly: bool) -> dict:
    """``flux``, ``systematics``, ``polynomial`` (e-/s, all cadences, NaN where dropped) from the
    normalised held-out predictions ``m_sys``, ``m_poly`` at the kept cadences (overwritten)."""
    ntime, npix = flux.shape
    sys_flux = np.multiply(m_sys, prep.scale, out=m_sys)
    poly_flux = np.multiply(m_poly, prep.scale, out=m_poly)
    fk = flux[prep.keep] - prep.background[:, None]
    det = fk - sys_flux
    if remove_poly:
        det = det - poly_flux
    det[~prep.finite] = np.nan
    det[:, ~prep.valid] = np.nan
    out = {}
    for key, arr in (("flux", det), ("systematics", sys_flux), ("polynomial", poly_flux)):
        full = np.full((ntime, npix), np.nan)
        full[prep.keep] = arr
        out[key] = full
    return out


def _run_chunks(chunk_args, shared, *, threads=1, scheduler=None):
    """Run ``_detrend_chunk`` over chunks of target pixels in the compute context of
    :mod:`workflow_lib.core.parallel`: the threaded scheduler with ``threads`` workers (one BLAS thread
    each), or the dask.distributed scheduler ``scheduler`` (``local:N``, an address, ...), to which
    the arrays every chunk shares are sent once."""

    names = ("ystarT", "Tt", "k", "params", "gram", "gramT", "TT")
    log.info("CPM: %d chunks on %s", len(chunk_args), describe(threads, scheduler))
    return dask_map(_detrend_chunk, chunk_args, threads=threads, scheduler=scheduler, shared=dict(zip(names, shared)))


# ------------------------------------------------------------------------- cubes


def cpm_detrend_cube(
    ds: xr.Dataset, params: CPMParams, *, threads: int = 1, name: str = "cube", config: dict | None = None, inputs=()
) -> xr.Dataset:
    """De-trended cube in the input's layout (image or pixel table), flux convention in the module doc.

    Extra variables: ``cpm_systematics`` and ``cpm_polynomial`` (e-/s, ``s*m_sys``, ``s*m_poly``),
    ``cpm_background`` (time,), per-pixel ``cpm_n_predictors``, ``cpm_median``, ``cpm_scale``.
    """
    validate_cube(ds, name)
    if ds.sizes["time"] < 2:
        raise CPMNotApplicable(f"{name}: has {ds.sizes['time']} cadence(s); CPM train-and-test needs at least 2")
    tab = as_pixel_table(ds, drop_nan=False)
    flux = np.asarray(tab["flux"].transpose("time", "pixel").values, dtype=np.float64)
    res = cpm_detrend_pixels(
        flux,
        tab["quality"].values,
        tab["time"].values,
        tab["row"].values,
        tab["column"].values,
        params,
        mission=ds.attrs.get("mission", "TESS"),
        threads=threads,
        name=name,
    )
    return _detrended_dataset(ds, res, params, config, inputs)


def cpm_not_applied(
    ds: xr.Dataset, reason: str, params: CPMParams, *, config: dict | None = None, inputs=()
) -> xr.Dataset:
    """The :func:`cpm_detrend_cube` layout for a cube the CPM cannot model (:class:`CPMNotApplicable`):
    every de-trended value NaN, ``cpm_k`` 0, and the attribute ``cpm_not_applied`` holding ``reason``
    (the refusal's message), so that every later step and the report can say why there is no CPM."""
    validate_cube(ds, "cube")
    tab = as_pixel_table(ds, drop_nan=False)
    ntime, npix = ds.sizes["time"], tab.sizes["pixel"]
    nan2 = np.full((ntime, npix), np.nan)
    res = {
        "flux": nan2,
        "systematics": nan2,
        "polynomial": nan2,
        "n_predictors": np.zeros(npix, np.int32),
        "median": np.full(npix, np.nan),
        "scale": np.full(npix, np.nan),
        "background": np.full(ntime, np.nan),
        "k": 0,
    }
    out = _detrended_dataset(ds, res, params, config, inputs)
    out.attrs["cpm_not_applied"] = str(reason)
    return out


def _detrended_dataset(ds: xr.Dataset, res: dict, params: CPMParams, config, inputs) -> xr.Dataset:
    """The de-trended cube of :func:`cpm_detrend_cube` from the per-pixel results ``res``."""
    image = "pixel" not in ds.dims
    extra = {
        "flux": (
            res["flux"].astype(np.float32),
            {
                "units": "electron / s",
                "long_name": "CPM de-trended pixel flux",
                "convention": "f - background - s*m_sys (see workflow_lib.cpm)",
            },
        ),
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
    out.attrs.update(
        cpm_k=int(res["k"]),
        cpm_params=json.dumps(asdict(params), sort_keys=True),
        provenance=provenance_json("cpm_detrend", inputs=inputs, config=config or asdict(params)),
    )
    return out


# ------------------------------------------------------------------------- parameter sets


def paramset_params(config: dict, paramset: str) -> CPMParams:
    """Parameters of a named parameter set: ``default`` or ``lambda_L_<value>`` (regularisation sweep)."""
    if paramset == "default":
        return cpm_params(config)
    if paramset.startswith("lambda_L_"):
        try:
            lam = float(paramset[len("lambda_L_") :])
        except ValueError as exc:
            raise ValueError(f"bad CPM parameter set name {paramset!r}") from exc
        return cpm_params(config, lambda_L=lam)
    raise ValueError(f"unknown CPM parameter set {paramset!r} (expected 'default' or 'lambda_L_<value>')")


def paramset_names(config: dict) -> list[str]:
    """``default`` plus one ``lambda_L_<value>`` per entry of ``cpm.sweep_lambda_L``."""
    return ["default"] + [f"lambda_L_{float(v):g}" for v in (config.get("sweep_lambda_L") or [])]
