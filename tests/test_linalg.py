"""core.linalg: the one prior-regularised weighted least-squares solver (Hedges & Martinez-Palomera 2021,
App. B) against an independent slow reference, and the robust clipping."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from workflow_lib.core.linalg import MAD_TO_SIGMA, clip_mask, clipped_fit, nanmedian_columns, robust_sigma, wls


def reference(A, y, sigma, prior_mu, prior_sigma, penalty=None):
    """App. B as one ordinary least-squares problem: rows [A/sigma | y/sigma], [I/sigma_p | mu/sigma_p], [D | 0]."""
    A = A.toarray() if sp.issparse(A) else np.asarray(A, float)
    m = A.shape[1]
    rows = [A / sigma[:, None], np.eye(m) / prior_sigma[:, None]]
    rhs = [y / sigma, prior_mu / prior_sigma]
    if penalty is not None:
        D = penalty.toarray() if sp.issparse(penalty) else penalty
        rows.append(D)
        rhs.append(np.zeros(D.shape[0]))
    return np.linalg.lstsq(np.vstack(rows), np.concatenate(rhs), rcond=None)[0]


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    n, m = 200, 7
    A = rng.normal(size=(n, m))
    A[rng.random((n, m)) < 0.5] = 0.0  # sparse-ish, like a B-spline design
    truth = rng.normal(size=m)
    sigma = rng.uniform(0.5, 2.0, n)
    y = A @ truth + sigma * rng.normal(size=n)
    prior_mu = rng.normal(size=m)
    prior_sigma = rng.uniform(0.3, 3.0, m)
    D = sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(m - 2, m), format="csr") / 0.5
    return dict(A=A, y=y, sigma=sigma, mu=prior_mu, ps=prior_sigma, D=D, truth=truth)


@pytest.mark.parametrize("method", ["dense", "sparse", "lstsq"])
@pytest.mark.parametrize("sparse_input", [False, True])
@pytest.mark.parametrize("with_penalty", [False, True])
def test_matches_augmented_reference(problem, method, sparse_input, with_penalty):
    p = problem
    A = sp.csr_matrix(p["A"]) if sparse_input else p["A"]
    D = p["D"] if with_penalty else None
    got = wls(A, p["y"], sigma=p["sigma"], prior_mu=p["mu"], prior_sigma=p["ps"], penalty=D, method=method)
    want = reference(p["A"], p["y"], p["sigma"], p["mu"], p["ps"], D)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


def test_weights_equal_sigma_and_zero_weight_drops_point(problem):
    p = problem
    w = 1.0 / p["sigma"] ** 2
    a = wls(p["A"], p["y"], sigma=p["sigma"], prior_mu=p["mu"], prior_sigma=p["ps"])
    b = wls(p["A"], p["y"], weights=w, prior_mu=p["mu"], prior_sigma=p["ps"])
    np.testing.assert_array_equal(a, b)
    w0 = w.copy()
    w0[:50] = 0.0
    c = wls(sp.csr_matrix(p["A"]), p["y"], weights=w0, prior_mu=p["mu"], prior_sigma=p["ps"])
    want = reference(p["A"][50:], p["y"][50:], p["sigma"][50:], p["mu"], p["ps"])
    np.testing.assert_allclose(c, want, rtol=1e-9)
    with pytest.raises(ValueError, match="sigma or weights"):
        wls(p["A"], p["y"], sigma=p["sigma"], weights=w)


def test_recovers_known_truth_and_prior_limits(problem):
    p = problem
    rng = np.random.default_rng(1)
    A = rng.normal(size=(5000, p["A"].shape[1]))
    y = A @ p["truth"] + 1e-3 * rng.normal(size=5000)
    # broad prior: the data decide
    w = wls(A, y, sigma=np.full(5000, 1e-3), prior_sigma=1e3)
    np.testing.assert_allclose(w, p["truth"], atol=1e-4)
    # no data weight: the prior mean comes back
    w = wls(A, y, sigma=np.full(5000, 1e12), prior_mu=p["mu"], prior_sigma=p["ps"])
    np.testing.assert_allclose(w, p["mu"], atol=1e-10)
    # no prior at all: ordinary weighted least squares
    np.testing.assert_allclose(wls(A, y), np.linalg.lstsq(A, y, rcond=None)[0], rtol=1e-10)


def test_normal_matrix_is_inverse_covariance(problem):
    p = problem
    for method in ("dense", "sparse"):
        _, N = wls(
            p["A"], p["y"], sigma=p["sigma"], prior_mu=p["mu"], prior_sigma=p["ps"], method=method, return_normal=True
        )
        N = N.toarray() if sp.issparse(N) else N
        want = p["A"].T @ np.diag(1 / p["sigma"] ** 2) @ p["A"] + np.diag(1 / p["ps"] ** 2)
        np.testing.assert_allclose(N, want, rtol=1e-12)
    with pytest.raises(ValueError, match="method"):
        wls(p["A"], p["y"], method="qr")


def test_robust_sigma():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, 200000)
    assert robust_sigma(x) == pytest.approx(2.0, rel=0.01)
    x[:1000] = 1e6  # outliers barely move it
    assert robust_sigma(x) == pytest.approx(2.0, rel=0.02)
    X = rng.normal(0, [[1.0], [5.0]], (2, 50000))
    np.testing.assert_allclose(robust_sigma(X, axis=1), [1.0, 5.0], rtol=0.03)
    assert robust_sigma(X, axis=1, keepdims=True).shape == (2, 1)
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert robust_sigma(v) == MAD_TO_SIGMA * 1.0


def test_clip_mask_sides():
    v = np.array([-10.0, -1.0, 0.0, 1.0, 2.0, 10.0])
    ref = np.ones(v.size, bool)
    both, med, scale = clip_mask(v, ref, 2.0, floor=1e-9)
    assert med == 0.5 and scale == MAD_TO_SIGMA * 1.5
    np.testing.assert_array_equal(both, [False, True, True, True, True, False])
    upper, _, _ = clip_mask(v, ref, 2.0, floor=1e-9, side="upper")
    np.testing.assert_array_equal(upper, [True, True, True, True, True, False])
    zero, _, _ = clip_mask(v, ref, 2.0, floor=1e-9, side="zero")
    np.testing.assert_array_equal(zero, [False, True, True, True, True, False])
    # the floor limits how small the scale may get; strict / inclusive inequality at the limit
    flat = np.array([0.0, 0.0, 0.0, 1.0])
    assert clip_mask(flat, np.ones(4, bool), 1.0, floor=1.0)[0].all()
    assert not clip_mask(flat, np.ones(4, bool), 1.0, floor=1.0, inclusive=False)[0][3]
    with pytest.raises(ValueError):
        clip_mask(v, ref, 2.0, floor=0.0, side="lower")


def test_clipped_fit_removes_outliers():
    rng = np.random.default_rng(3)
    x = np.linspace(0, 1, 400)
    A = np.column_stack([np.ones_like(x), x])
    y = 2.0 + 3.0 * x + 0.01 * rng.normal(size=x.size)
    bad = rng.choice(x.size, 20, replace=False)
    y[bad] += 5.0

    def fit(keep):
        w = wls(A[keep], y[keep])
        return w, y - A @ w

    w, keep, _ = clipped_fit(fit, np.ones(x.size, bool), n_sigma=5.0, n_pass=5, min_keep=10, floor=1e-9)
    assert not keep[bad].any() and keep.sum() == x.size - 20
    np.testing.assert_allclose(w, [2.0, 3.0], atol=0.01)
    # too few would remain: the loop stops and keeps what it had
    _, keep, _ = clipped_fit(fit, np.ones(x.size, bool), n_sigma=5.0, n_pass=5, min_keep=x.size, floor=1e-9)
    assert keep.all()


@pytest.mark.parametrize("shape", [(1298, 300), (5, 7), (1, 3), (0, 4), (6, 0)])
def test_nanmedian_columns_equals_numpy(shape):
    """The fast path gives numpy.nanmedian's numbers bit for bit, NaN columns and all-NaN ones included."""
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(size=shape)
    if a.size:
        a[rng.random(shape) < 0.01] = np.nan
        a[:, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(a, axis=0)
    got = nanmedian_columns(a)
    assert got.shape == (shape[1],)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", ["dense", "sparse", "lstsq"])
def test_infinite_prior_width_is_no_prior_on_that_weight(problem, method):
    """prior_sigma inf on some weights: those have no prior (the others keep theirs), in every route."""
    p = problem
    ps = p["ps"].copy()
    free = [0, 3, 5]
    ps[free] = np.inf
    got = wls(p["A"], p["y"], sigma=p["sigma"], prior_mu=p["mu"], prior_sigma=ps, penalty=p["D"], method=method)
    # reference: the prior rows of the free weights left out of the augmented system
    m = p["A"].shape[1]
    keep = np.setdiff1d(np.arange(m), free)
    rows = [p["A"] / p["sigma"][:, None], np.eye(m)[keep] / p["ps"][keep, None], p["D"].toarray()]
    rhs = [p["y"] / p["sigma"], p["mu"][keep] / p["ps"][keep], np.zeros(m - 2)]
    want = np.linalg.lstsq(np.vstack(rows), np.concatenate(rhs), rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
