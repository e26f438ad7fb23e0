"""B-spline design matrices (LFD §3.2, App. C-D) against scipy and a slow reference."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.interpolate import BSpline

from workflow_lib.lfd.bspline import spline_design_matrix, tensor_product, wrapped_spline_design_matrix


def test_spline_design_matrix_reproduces_a_spline():
    knots = np.array([0.0, 0.5, 1.3, 2.0, 3.5, 5.0])
    x = np.linspace(0, 5, 101)
    A = spline_design_matrix(x, knots, 3)
    assert sp.issparse(A) and A.shape == (101, len(knots) + 2)
    assert np.allclose(A.sum(axis=1), 1.0)
    assert A.nnz <= 4 * x.size
    c = np.random.default_rng(0).normal(size=A.shape[1])
    t = np.r_[[0.0] * 3, knots, [5.0] * 3]
    assert np.allclose(A @ c, BSpline(t, c, 3)(x))
    with pytest.raises(ValueError, match="outside the knot range"):
        spline_design_matrix([6.0], knots)
    assert np.allclose(
        spline_design_matrix([6.0], knots, clip=True).toarray(), spline_design_matrix([5.0], knots).toarray()
    )


def test_wrapped_spline_is_periodic_and_smooth():
    n = 15
    phi = np.linspace(-np.pi, np.pi, 721)
    W = wrapped_spline_design_matrix(phi, n)
    assert W.shape == (721, n) and sp.issparse(W)
    assert np.allclose(W.sum(axis=1), 1.0)
    assert W.getnnz(axis=1).max() <= 4
    Wd = W.toarray()
    assert np.allclose(Wd[0], Wd[-1])  # value at -pi == value at +pi
    c = np.random.default_rng(1).normal(size=n)
    f = Wd @ c
    # continuity across the wrap, and of the first derivative (finite differences)
    eps = 1e-6
    fm = wrapped_spline_design_matrix([np.pi - eps], n) @ c
    fp = wrapped_spline_design_matrix([-np.pi + eps], n) @ c
    assert abs(fm[0] - fp[0]) < 1e-4
    d_left = (f[-1] - f[-2]) / (phi[1] - phi[0])
    d_right = (f[1] - f[0]) / (phi[1] - phi[0])
    assert abs(d_left - d_right) < 0.05 * max(1.0, abs(d_left))
    # shifting phi by one knot spacing cycles the columns
    h = 2 * np.pi / n
    x = np.linspace(-3, 3, 50)
    assert np.allclose(
        wrapped_spline_design_matrix(x + h, n).toarray(),
        np.roll(wrapped_spline_design_matrix(x, n).toarray(), 1, axis=1),
    )
    # a periodic cubic B-spline is exact on a uniform knot grid: reproduce with an independent evaluation
    t = -np.pi + h * np.arange(-3, n + 4)
    coef = np.r_[c, c[:3]]
    assert np.allclose(f[:-1], BSpline(t, coef, 3)(phi[:-1]))


def test_tensor_product_matches_rowwise_kron():
    rng = np.random.default_rng(2)
    A = sp.random(30, 5, density=0.4, format="csr", random_state=3)
    B = sp.random(30, 7, density=0.3, format="csr", random_state=4)
    T = tensor_product(A, B)
    assert sp.isspmatrix_csr(T) and T.shape == (30, 35)
    ref = np.stack([np.kron(A.toarray()[i], B.toarray()[i]) for i in range(30)])
    assert np.allclose(T.toarray(), ref)
    assert T.nnz == int(np.sum(np.diff(A.indptr) * np.diff(B.indptr)))
    with pytest.raises(ValueError):
        tensor_product(A, B[:10])
    del rng


def test_design_matrices_equal_scipys_range_checked_ones():
    """spline_design_matrix / wrapped_spline_design_matrix call scipy with extrapolate=True (no Python-level
    range check) on abscissae already in range: the same matrices as scipy's default, knots and ends included."""
    from scipy.interpolate import BSpline

    from workflow_lib.lfd.bspline import clamped_knot_vector, spline_design_matrix, wrapped_spline_design_matrix

    rng = np.random.default_rng(0)
    for degree in (1, 3):
        knots = np.sqrt(np.linspace(0.0, 25.0, 13))
        t = clamped_knot_vector(knots, degree)
        x = np.concatenate([rng.uniform(0.0, 5.0, 2000), knots, [np.nextafter(5.0, 0.0)]])
        np.testing.assert_array_equal(
            spline_design_matrix(x, knots, degree).toarray(), BSpline.design_matrix(x, t, degree).toarray()
        )
        n = 15
        h = 2 * np.pi / n
        tw = -np.pi + h * np.arange(-degree, n + degree + 1)
        phi = np.concatenate([rng.uniform(-np.pi, np.pi - 1e-9, 2000), tw[degree : degree + n]])
        full = BSpline.design_matrix(phi, tw, degree).toarray()
        folded = full[:, :n].copy()
        folded[:, : full.shape[1] - n] += full[:, n:]
        np.testing.assert_array_equal(wrapped_spline_design_matrix(phi, n, degree).toarray(), folded)


def test_tensor_product_fast_path_equals_the_general_one():
    """With a constant count of entries per row of B (a B-spline design) the row-wise Kronecker product takes a
    shortcut; it gives the same matrix as the general path (B with one entry more in one row)."""
    rng = np.random.default_rng(2)
    A = sp.random(300, 12, density=0.3, format="csr", random_state=3)
    B = wrapped_spline_design_matrix(rng.uniform(-4, 4, 300), 15, 3)
    fast = tensor_product(A, B)
    lil = B.tolil()
    free = next(c for c in range(15) if c not in B[0].indices)
    lil[0, free] = 1e-300  # one extra stored entry in row 0, where its splines are zero: the general path
    general = tensor_product(A, lil.tocsr()).toarray()
    general[0] = (A[0].toarray().T * B[0].toarray()).ravel()  # row 0 without the extra entry
    np.testing.assert_array_equal(fast.toarray(), general)
    dense = np.einsum("ia,ib->iab", A.toarray(), B.toarray()).reshape(300, -1)
    np.testing.assert_array_equal(fast.toarray(), dense)
    # unequal counts per row whose total is still n x the first row's count (2, 0, 4): the general path
    Bu = sp.csr_matrix(np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 5.0, 6.0]]))
    Au = sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 3.0], [0.0, 4.0]]))
    ref = np.einsum("ia,ib->iab", Au.toarray(), Bu.toarray()).reshape(3, -1)
    np.testing.assert_array_equal(tensor_product(Au, Bu).toarray(), ref)
