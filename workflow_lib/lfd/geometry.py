import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree


def polynomial_background_design(pixel_col, pixel_row, order: int) -> np.ndarray:
    """Polynomial sky-background columns in (column, row), centred and scaled to [-1, 1]; (npix, 0) for order < 0.

    Columns ``u^i v^j`` for ``i + j <= order`` (first column the constant), with ``u``/``v`` the
    pixel column/row minus their mean over the given pixels, divided by half their range.
    (:func:`workflow_lib.lfd.geometry.background_design` is this function.)
    """
    c = np.asarray(pixel_col, float).ravel()
    r = np.asarray(pixel_row, float).ravel()
    if order < 0 or c.size == 0:
        return np.zeros((c.size, 0))
    u = (c - c.mean()) / max(np.ptp(c) / 2, 1.0)
    v = (r - r.mean()) / max(np.ptp(r) / 2, 1.0)
    cols = [u**i * v**j for i in range(order + 1) for j in range(order + 1 - i)]
    return np.column_stack(cols)


def source_pixel_pairs(source_col, source_row, pixel_col, pixel_row, radius):
    """All (source, pixel) pairs closer than ``radius`` (scalar or one per source), via a k-d tree.

    Returns ``(src, pix, dx, dy)``: source and pixel indices and the Cartesian separations
    ``dx = pixel_col - source_col``, ``dy = pixel_row - source_row`` [px] (§4.1, eqs. 3-4), sorted by
    source then pixel. This is the sparse form of the paper's (nsource, npixel) separation matrices.
    """
    sc = np.asarray(source_col, float).ravel()
    sr = np.asarray(source_row, float).ravel()
    pc = np.asarray(pixel_col, float).ravel()
    pr = np.asarray(pixel_row, float).ravel()
    rad = np.broadcast_to(np.asarray(radius, float), sc.shape).copy()
    if sc.size == 0 or pc.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0), np.zeros(0)
    tree = cKDTree(np.column_stack([pc, pr]))
    hits = tree.query_ball_point(np.column_stack([sc, sr]), r=rad, return_sorted=True)
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    src = np.repeat(np.arange(sc.size, dtype=np.int64), counts)
    pix = np.fromiter((p for h in hits for p in h), dtype=np.int64, count=int(counts.sum()))
    dx = pc[pix] - sc[src]
    dy = pr[pix] - sr[src]
    return src, pix, dx, dy


def background_design(pixel_col, pixel_row, order: int) -> np.ndarray:
    """Polynomial sky-background columns in (column, row), centred and scaled to [-1, 1]; (npix, 0) for order < 0.

    The same columns as the edge step's sky surface (:func:`polynomial_background_design`).
    """
    return polynomial_background_design(pixel_col, pixel_row, order)


def scene_pairs(scene: sp.csr_matrix, pixel_col, pixel_row, source_col, source_row):
    """The (source, pixel) pairs of §4.5 at every stored entry of the scene matrix: returns the
    canonical csr scene, the pixel (row) and source (column) index of each entry in the order of
    ``scene.data``, and the pixel-minus-source offsets (dx, dy) [px]."""
    scene = sp.csr_matrix(scene)
    scene.sum_duplicates()
    scene.sort_indices()
    rows = np.repeat(np.arange(scene.shape[0]), np.diff(scene.indptr))
    cols = scene.indices
    dx = np.asarray(pixel_col, float)[rows] - np.asarray(source_col, float)[cols]
    dy = np.asarray(pixel_row, float)[rows] - np.asarray(source_row, float)[cols]
    return scene, rows, cols, dx, dy


def scene_offsets(scene: sp.csr_matrix, pixel_col, pixel_row, source_col, source_row):
    """Pixel-minus-source offsets (dx, dy) [px] at every stored entry of the scene matrix, in
    the order of ``scene.data`` (csr, canonical). These are the (source, pixel) pairs of §4.5."""
    return scene_pairs(scene, pixel_col, pixel_row, source_col, source_row)[3:]


def monomial_exponents(degree: int) -> np.ndarray:
    """(i, j) exponents of the monomials cx^i cy^j with i + j <= degree, ordered by total degree:
    ``[1, x, y, x^2, xy, y^2, x^3, ...]``."""
    return np.array([(d - j, j) for d in range(int(degree) + 1) for j in range(d + 1)], dtype=int)


def n_terms(degree: int) -> int:
    """Number of monomials of total degree <= ``degree`` in two variables."""
    return (int(degree) + 1) * (int(degree) + 2) // 2


def shift_monomials(cx, cy, degree: int) -> np.ndarray:
    """(n, n_terms) monomials of the scene offset (:func:`monomial_exponents`); the time basis of
    the shift model (degree 2 is :func:`centroid_basis`)."""
    cx = np.atleast_1d(np.asarray(cx, float))
    cy = np.atleast_1d(np.asarray(cy, float))
    e = monomial_exponents(degree)
    return cx[:, None] ** e[None, :, 0] * cy[:, None] ** e[None, :, 1]


def dominant_source(S, flux):
    """Per pixel: index (column of S) of the source contributing most model flux, and its fraction
    of the total modelled source flux (1 = a single source; -1 / 0 for pixels without sources)."""
    S = sp.csr_matrix(S)
    contrib = S.multiply(np.asarray(flux, float)[None, :]).tocsr()
    total = np.asarray(contrib.sum(axis=1)).ravel()
    best = np.asarray(contrib.max(axis=1).todense()).ravel()
    owner = np.asarray(contrib.argmax(axis=1)).ravel()
    has = (np.diff(contrib.indptr) > 0) & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = np.where(has, best / np.where(has, total, 1.0), 0.0)
    return np.where(has, owner, -1), purity
