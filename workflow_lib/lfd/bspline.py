"""Basis-spline design matrices for Linearized Field Deblending (LFD).

Hedges & Martinez-Palomera (2021), "Linearized Field Deblending", §3.2 and Appendices C-D:
a B-spline turns a vector ``x`` (length n) into a design matrix (n, n_components) whose columns
are the spline components; dotting it with a weight vector gives a smooth piece-wise polynomial
model that is linear in the weights. Every design matrix here is a ``scipy.sparse.csr_matrix``
(a degree-k spline has k+1 non-zero components per row).

* :func:`spline_design_matrix` - clamped B-spline in one variable (App. C, eqs. C1-C5; built
  with ``scipy.interpolate.BSpline.design_matrix``).
* :func:`wrapped_spline_design_matrix` - periodic ("wrapped") B-spline in the azimuth
  ``phi`` (App. D): the value at -pi equals the value at +pi, as are all derivatives up to
  degree-1.
* :func:`tensor_product` - the row-wise Kronecker product of two design matrices (the "cross
  terms" of §4.3 eq. 13 for (r, phi) and of §4.5 eq. 22 for (dx, dy)).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.interpolate import BSpline

__all__ = [
    "clamped_knot_vector",
    "spline_design_matrix",
    "wrapped_spline_design_matrix",
    "tensor_product",
    "n_spline_components",
]


def clamped_knot_vector(knots, degree: int = 3) -> np.ndarray:
    """The full knot vector of a clamped spline: ``knots`` with both ends repeated ``degree`` times.

    ``knots`` are the break points (strictly increasing), including both ends of the domain.
    """
    knots = np.asarray(knots, dtype=float)
    if knots.ndim != 1 or knots.size < 2:
        raise ValueError(f"knots must be a 1-D array of at least 2 break points, got shape {knots.shape}")
    if not np.all(np.diff(knots) > 0):
        raise ValueError("knots must be strictly increasing")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    return np.concatenate([np.full(degree, knots[0]), knots, np.full(degree, knots[-1])])


def n_spline_components(n_knots: int, degree: int = 3) -> int:
    """Number of columns of :func:`spline_design_matrix` for ``n_knots`` break points."""
    return n_knots + degree - 1


def spline_design_matrix(x, knots, degree: int = 3, *, clip: bool = False) -> sp.csr_matrix:
    """Clamped B-spline design matrix of ``x`` (App. C), shape (len(x), len(knots) + degree - 1).

    Parameters
    ----------
    x : array (n,)
        The variable (e.g. radius r of each source-pixel pair, or dx / dy of the motion model).
    knots : array (m,)
        Strictly increasing break points; the first and last are the ends of the domain.
    degree : int
        Polynomial degree (the paper uses 3 throughout, App. C).
    clip : bool
        Values outside [knots[0], knots[-1]] are an error unless ``clip``, which moves them to the
        nearest end (constant extrapolation of the end value).

    Each row sums to one (partition of unity) inside the domain.
    """
    x = np.asarray(x, dtype=float).ravel()
    t = clamped_knot_vector(knots, degree)
    lo, hi = t[0], t[-1]
    if not np.all(np.isfinite(x)):
        raise ValueError("spline_design_matrix: x contains NaN or inf")
    if clip:
        x = np.clip(x, lo, hi)
    elif x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(
            f"spline_design_matrix: x spans [{x.min():.4g}, {x.max():.4g}], outside the knot range [{lo:.4g}, {hi:.4g}]; pass clip=True to clamp"
        )
    if x.size == 0:
        return sp.csr_matrix((0, t.size - degree - 1))
    # x lies in [t[0], t[-1]] (checked or clipped above): ``extrapolate=True`` only skips scipy's own range
    # check, which runs Python's min() and max() over the array (~20 % of a PRF evaluation); same matrix
    return sp.csr_matrix(BSpline.design_matrix(x, t, degree, extrapolate=True))


def wrapped_spline_design_matrix(phi, n_knots: int, degree: int = 3) -> sp.csr_matrix:
    """Periodic B-spline design matrix in the angle ``phi`` [rad] (§3.2, App. D), shape (len(phi), n_knots).

    ``n_knots`` knots are spaced evenly over one period, at ``-pi + 2*pi*j/n_knots``; the basis
    has one component per knot. It is built as an ordinary uniform B-spline on a knot vector
    extended by ``degree`` knots beyond each end of [-pi, pi], whose components that stick out
    past +pi are folded back onto the first ``degree`` components (components j and j + n_knots
    are the same function shifted by 2*pi). The result is smooth (C^(degree-1)) everywhere on
    the circle, and the value at -pi equals the value at +pi. ``phi`` may take any real value;
    it is reduced modulo 2*pi first.
    """
    phi = np.asarray(phi, dtype=float).ravel()
    if n_knots < degree + 1:
        raise ValueError(f"wrapped spline needs n_knots >= degree + 1 = {degree + 1}, got {n_knots}")
    if not np.all(np.isfinite(phi)):
        raise ValueError("wrapped_spline_design_matrix: phi contains NaN or inf")
    h = 2 * np.pi / n_knots
    # reduce to [-pi, pi): the basis is periodic, so pi maps to -pi with identical values
    x = np.mod(phi + np.pi, 2 * np.pi) - np.pi
    x = np.clip(x, -np.pi, np.pi - 1e-12 * h)
    t = -np.pi + h * np.arange(-degree, n_knots + degree + 1)
    if x.size == 0:
        return sp.csr_matrix((0, n_knots))
    # (n, n_knots + degree) on [t[k], t[-k-1]] = [-pi, pi]; x is in range: extrapolate=True skips the range check
    full = BSpline.design_matrix(x, t, degree, extrapolate=True).tocoo()
    cols = np.mod(full.col, n_knots)
    out = sp.csr_matrix((full.data, (full.row, cols)), shape=(x.size, n_knots))
    out.sum_duplicates()
    return out


def tensor_product(A, B) -> sp.csr_matrix:
    """Row-wise Kronecker product of two design matrices (§4.3 eq. 13, §4.5 eq. 22).

    ``A`` (n, p) and ``B`` (n, q) -> (n, p*q) with ``out[i, a*q + b] = A[i, a] * B[i, b]``: every
    column of ``A`` multiplied element-wise by every column of ``B``. Sparse in, sparse out; only
    products of stored entries are formed.
    """
    A = sp.csr_matrix(A)
    B = sp.csr_matrix(B)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"tensor_product: row counts differ ({A.shape[0]} vs {B.shape[0]})")
    A.sort_indices()
    B.sort_indices()
    n = A.shape[0]
    q = B.shape[1]
    na = np.diff(A.indptr)
    nb = np.diff(B.indptr)
    a_rows = np.repeat(np.arange(n), na)
    if n and (nb == nb[0]).all():  # every row of B has the same count (a B-spline design): no index arithmetic
        m = int(nb[0])
        data = (A.data[:, None] * B.data.reshape(n, m)[a_rows]).ravel()
        cols = (A.indices.astype(np.int64)[:, None] * q + B.indices.reshape(n, m)[a_rows]).ravel()
        return sp.csr_matrix((data, cols, np.concatenate([[0], np.cumsum(na * m)])), shape=(n, A.shape[1] * q))
    reps = nb[a_rows]  # each stored entry of A pairs with every stored entry of B in its row
    a_idx = np.repeat(np.arange(A.nnz), reps)
    group_start = np.repeat(np.cumsum(reps) - reps, reps)
    pos = np.arange(a_idx.size) - group_start
    b_idx = B.indptr[a_rows[a_idx]] + pos
    data = A.data[a_idx] * B.data[b_idx]
    cols = A.indices[a_idx].astype(np.int64) * q + B.indices[b_idx]
    indptr = np.concatenate([[0], np.cumsum(na * nb)])
    return sp.csr_matrix((data, cols, indptr), shape=(n, A.shape[1] * q))
