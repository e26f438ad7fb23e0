"""The one prior-regularised weighted least-squares solver and the one robust sigma-clipping loop.

Weighted least squares with a Gaussian prior (Hedges & Martinez-Palomera 2021, App. B, eqs. B3-B6)::

    w = (A^T C^-1 A + diag(1/sigma_prior^2) [+ D^T D])^-1 (A^T C^-1 y + mu / sigma_prior^2)

with ``C = diag(sigma^2)`` the data covariance, ``mu`` / ``sigma_prior`` the prior mean and width of
every weight and ``D`` an optional penalty matrix (a zero-mean Gaussian prior ``D w ~ N(0, 1)``, e.g.
scaled second differences as a smoothness prior). :func:`wls` solves it by one of three numerical
routes (``method``), each kept exactly as the LFD steps have always computed it so their products do
not change:

* ``"dense"`` - dense normal matrix, ``numpy.linalg.solve`` (``lstsq`` if it is singular);
* ``"sparse"`` - sparse normal matrix, ``scipy.sparse.linalg.spsolve``;
* ``"lstsq"`` - ``numpy.linalg.lstsq`` on the augmented system ``[A / sigma; I / sigma_prior; D]`` (the
  same minimum, by SVD: slow, the reference of the tests; without weights and prior it is plain
  ``lstsq(A, y)``).

Outliers are rejected with the robust standard deviation (1.4826 x the median absolute deviation,
:func:`robust_sigma`, :func:`clip_mask`), refitting until the kept set stops changing
(:func:`clipped_fit`).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = [
    "MAD_TO_SIGMA",
    "WLS_METHODS",
    "wls",
    "robust_sigma",
    "finite_median",
    "nanmedian_columns",
    "clip_mask",
    "clipped_fit",
]

#: standard deviation of a normal distribution per median absolute deviation
MAD_TO_SIGMA = 1.4826

#: the numerical routes of :func:`wls`
WLS_METHODS = ("dense", "sparse", "lstsq")


def _weights(y, sigma, weights) -> np.ndarray:
    if weights is not None:
        if sigma is not None:
            raise ValueError("wls: give sigma or weights, not both")
        return np.asarray(weights, float)
    if sigma is None:
        return np.ones_like(np.asarray(y, float))
    return 1.0 / np.asarray(sigma, float) ** 2


def wls(
    A,
    y,
    *,
    sigma=None,
    weights=None,
    prior_mu=None,
    prior_sigma=None,
    penalty=None,
    method: str = "dense",
    return_normal: bool = False,
):
    """Weighted linear least squares with a diagonal Gaussian prior (Hedges & Martinez-Palomera 2021, App. B).

    Solves ``w = (A^T C^-1 A + diag(1/sigma_prior^2) + D^T D)^-1 (A^T C^-1 y + mu/sigma_prior^2)``
    (eqs. B3-B6) for ``A`` (n, m) dense or sparse, ``y`` (n,).

    sigma : (n,) data errors (``C = diag(sigma^2)``); or ``weights`` (n,) = the inverse variances
        directly (zero = point left out; ``y`` must then be finite there); neither = unit weights.
    prior_mu, prior_sigma : scalar or (m,) Gaussian prior of the weights; no prior when
        ``prior_sigma`` is None; ``prior_mu`` None = zero mean. An infinite width (``numpy.inf``) is
        no prior on that weight (it adds 0 to the normal matrix and right-hand side; its mean must be
        finite), so a prior can be put on some weights only.
    penalty : optional (k, m) matrix D adding the zero-mean prior ``D @ w ~ N(0, 1)``.
    method : ``"dense"``, ``"sparse"`` or ``"lstsq"`` (see the module doc); the routes agree to
        rounding, each reproduces one historical implementation bit for bit.
    return_normal : also return the normal matrix incl. the prior (its inverse is the covariance of
        the weights, eq. B4): dense for ``"dense"``, sparse CSC for ``"sparse"``, None for ``"lstsq"``.
    """
    if method not in WLS_METHODS:
        raise ValueError(f"wls: method must be one of {WLS_METHODS}, got {method!r}")
    w = _weights(y, sigma, weights)
    ncol = A.shape[1]
    if prior_sigma is not None:
        ps = np.broadcast_to(np.asarray(prior_sigma, float), (ncol,))
        pm = np.zeros(ncol) if prior_mu is None else np.broadcast_to(np.asarray(prior_mu, float), (ncol,))
    if method == "lstsq":
        x = _wls_lstsq(
            A, y, w, ps if prior_sigma is not None else None, pm if prior_sigma is not None else None, penalty
        )
        return (x, None) if return_normal else x
    if method == "sparse":
        A = sp.csr_matrix(A)
        AtW = (A.T @ sp.diags(w)).tocsr()
        N = (AtW @ A).tocsc()
        b = AtW @ y
        if prior_sigma is not None:
            N = N + sp.diags(1.0 / ps**2, format="csc")
        if penalty is not None:
            N = N + (penalty.T @ penalty).tocsc()
        if prior_sigma is not None:
            b = b + pm / ps**2
        x = np.asarray(spla.spsolve(N, b)).ravel()
        return (x, N) if return_normal else x
    # dense normal matrix
    if sp.issparse(A):
        N = (A.T @ sp.diags(w) @ A).toarray()
        b = A.T @ (w * y)
    else:
        AtW = A.T * w
        N = AtW @ A
        b = AtW @ y
    if prior_sigma is not None:
        N = N + np.diag(1.0 / ps**2)
    if penalty is not None:
        DtD = penalty.T @ penalty
        N = N + (DtD.toarray() if sp.issparse(DtD) else DtD)
    if prior_sigma is not None:
        b = b + pm / ps**2
    try:
        x = np.linalg.solve(N, b)
    except np.linalg.LinAlgError:
        x = np.linalg.lstsq(N, b, rcond=None)[0]
    return (x, N) if return_normal else x


def _wls_lstsq(A, y, w, ps, pm, penalty):
    """``numpy.linalg.lstsq`` on the augmented system: rows ``sqrt(w) A | sqrt(w) y``, ``I/ps | pm/ps``, ``D | 0``."""
    A = A.toarray() if sp.issparse(A) else np.asarray(A, float)
    y = np.asarray(y, float)
    if ps is None and penalty is None and np.all(w == 1.0):
        return np.linalg.lstsq(A, y, rcond=None)[0]
    sw = np.sqrt(w)
    use = w > 0
    rows = [A[use] * sw[use, None]]
    rhs = [y[use] * sw[use]]
    if ps is not None:
        rows.append(np.diag(1.0 / ps))
        rhs.append(pm / ps)
    if penalty is not None:
        D = penalty.toarray() if sp.issparse(penalty) else np.asarray(penalty, float)
        rows.append(D)
        rhs.append(np.zeros(D.shape[0]))
    return np.linalg.lstsq(np.vstack(rows), np.concatenate(rhs), rcond=None)[0]


def robust_sigma(x, axis=None, keepdims: bool = False):
    """Robust standard deviation: ``1.4826 * median(|x - median(x)|)`` (along ``axis``)."""
    x = np.asarray(x)
    return MAD_TO_SIGMA * np.median(np.abs(x - np.median(x, axis=axis, keepdims=True)), axis=axis, keepdims=keepdims)


def finite_median(values, empty=float("nan")):
    """Median of the finite entries of ``values`` (a float), or ``empty`` when there are none (no all-NaN warning)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else empty


def nanmedian_columns(a) -> np.ndarray:
    """``numpy.nanmedian(a, axis=0)`` of a 2-D array, the same numbers, fast when few columns hold NaN.

    numpy falls back to one Python call per column as soon as any column has a NaN (a dead pixel in
    a cube of 18,000 pixel light curves made the CPM's normalisation take seconds); here the
    all-finite columns go through ``numpy.median`` in one call and only the others through
    ``numpy.nanmedian``.  All-NaN columns give NaN without a warning.
    """
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"nanmedian_columns needs a 2-D array, got shape {a.shape}")
    bad = ~np.isfinite(a).all(axis=0) if a.shape[0] else np.zeros(a.shape[1], bool)
    out = np.empty(a.shape[1], dtype=np.result_type(a.dtype, np.float64))
    out[~bad] = np.median(a[:, ~bad], axis=0) if a.shape[0] else np.nan
    if bad.any():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[bad] = np.nanmedian(a[:, bad], axis=0)
    return out


def clip_mask(values, reference, n_sigma: float, *, floor: float, side: str = "both", inclusive: bool = True):
    """Points within ``n_sigma`` robust standard deviations of the median of ``values[reference]``.

    The scale is :func:`robust_sigma` of ``values[reference]``, at least ``floor``. ``side``:
    ``"both"`` keeps ``|v - median| <= n_sigma * scale`` (``<`` unless ``inclusive``),
    ``"upper"`` keeps ``v <= median + n_sigma * scale`` (clips the high tail only, e.g. chi^2),
    ``"zero"`` keeps ``|v| <= n_sigma * scale`` (residuals whose expected centre is zero).
    Returns ``(mask over all values, median, scale)`` (``scale`` before the floor).
    """
    v = np.asarray(values)
    ref = v[reference]
    med = np.median(ref)
    scale = MAD_TO_SIGMA * np.median(np.abs(ref - med))
    limit = n_sigma * max(scale, floor)
    if side == "upper":
        dev, limit = v, med + limit
    elif side == "both":
        dev = np.abs(v - med)
    elif side == "zero":
        dev = np.abs(v)
    else:
        raise ValueError(f"clip_mask: side must be 'both', 'upper' or 'zero', got {side!r}")
    return (dev <= limit if inclusive else dev < limit), med, scale


def clipped_fit(
    fit,
    use,
    *,
    n_sigma: float,
    n_pass: int,
    min_keep: int,
    floor: float,
    inclusive: bool = True,
    clip_last: bool = False,
):
    """Iterate a fit and sigma clipping of its residuals until the kept set stops changing.

    ``fit(keep)`` fits the points ``keep`` and returns ``(result, residuals over all points)``. At
    most ``n_pass`` fits; after each, the points of ``use`` within ``n_sigma`` robust standard
    deviations of the median residual of the kept points are kept (:func:`clip_mask`, ``side="both"``)
    unless fewer than ``min_keep`` would remain or nothing changes (then the loop stops). With
    ``clip_last`` the residuals of the last fit are clipped too (the returned mask is then the
    clipped one). Returns ``(result of the last fit, keep, robust scale of its kept residuals)``
    (the scale is NaN when the last fit was not followed by clipping).
    """
    keep = np.array(use, bool, copy=True)
    result = None
    scale = float("nan")
    for it in range(n_pass):
        result, res = fit(keep)
        if it == n_pass - 1 and not clip_last:
            scale = float("nan")
            break
        new, _, scale = clip_mask(res, keep, n_sigma, floor=floor, inclusive=inclusive)
        new = use & new
        if new.sum() < min_keep or np.array_equal(new, keep):
            break
        keep = new
    return result, keep, scale
