"""§4.2 edge model: design matrix, fit on a synthetic mean frame with known truth, edge radius, contamination."""

import numpy as np
import pytest

from workflow_lib.lfd.edge import (
    edge_design_matrix,
    edge_model_flux,
    edge_params,
    edge_radius,
    fit_edge_model,
    uncontaminated_pixels,
)
from workflow_lib.lfd.geometry import source_pixel_pairs


def test_design_matrix_columns():
    r = np.array([0.0, 1.0, 2.0])
    L = np.array([3.0, 2.0, 1.0])
    A = edge_design_matrix(r, L)
    assert A.shape == (3, 9)
    assert np.allclose(A[1], [1, 1, 1, 2, 2, 2, 4, 4, 4])
    assert np.allclose(A[2], [1, 2, 4, 1, 2, 4, 1, 2, 4])
    with pytest.raises(ValueError):
        edge_design_matrix(r, L[:2])


def test_fit_recovers_known_polynomial_and_radius():
    # truth: log10 f = log10 F - 0.8 - 0.45 r^2 (a Gaussian PRF in log10) -> exactly representable
    rng = np.random.default_rng(0)
    w_true = np.zeros(9)
    w_true[[0, 2, 3]] = [-0.8, -0.45, 1.0]
    F = 10 ** rng.uniform(1.5, 4.5, 3000)
    r = rng.uniform(0, 5, 3000)
    f = 10 ** (edge_design_matrix(r, np.log10(F)) @ w_true) * (1 + 0.01 * rng.normal(size=3000))
    E = edge_params(None)
    w = fit_edge_model(r, F, f, n_iter=E["n_iter"], sigma_clip=E["sigma_clip"], dominance=E["dominance"])
    assert np.allclose(w, w_true, atol=0.02)
    # radius where the model meets the threshold: log10 F - 0.8 - 0.45 r^2 = log10 thr
    flux = np.array([30.0, 1e3, 1e4, 1e14])
    rad = edge_radius(flux, w_true, threshold=5.0, min_radius=1.0, max_radius=5.0)
    exact = np.sqrt(np.clip((np.log10(flux) - 0.8 - np.log10(5.0)) / 0.45, 0, None))
    assert np.allclose(rad, np.clip(exact, 1.0, 5.0), atol=0.01)
    assert rad[-1] == 5.0 and rad[0] == 1.0
    assert np.allclose(edge_model_flux(w_true, exact[2], 1e4), 5.0, rtol=1e-6)


def test_pairs_and_uncontaminated_pixels():
    rows, cols = np.mgrid[0:20, 0:20]
    pc, pr = cols.ravel().astype(float), rows.ravel().astype(float)
    sc = np.array([5.0, 7.0, 15.0])
    sr = np.array([5.0, 5.0, 15.0])
    src, pix, dx, dy = source_pixel_pairs(sc, sr, pc, pr, [2.0, 2.0, 3.0])
    # brute force reference
    d = np.hypot(pc[None] - sc[:, None], pr[None] - sr[:, None])
    ref = np.argwhere(d <= np.array([2.0, 2.0, 3.0])[:, None])
    assert set(zip(src.tolist(), pix.tolist())) == set(map(tuple, ref.tolist()))
    assert np.allclose(dx, pc[pix] - sc[src]) and np.allclose(dy, pr[pix] - sr[src])
    mask, owner = uncontaminated_pixels(sc, sr, pc, pr, [2.0, 2.0, 3.0])
    count = (d <= np.array([2.0, 2.0, 3.0])[:, None]).sum(0)
    assert np.array_equal(mask, count == 1)
    p = 5 * 20 + 6  # (row 5, col 6) is 1 px from both sources 0 and 1
    assert not mask[p] and owner[p] == -1
    p = 15 * 20 + 15
    assert mask[p] and owner[p] == 2


def test_edge_profile_never_rises_with_radius():
    """eq. 7 is quadratic in r; where the fit turns it upwards (the recorded edge model of a randomized
    scene with a 172 e-/s/px scattered-light sky: a 10 e-/s star rising from 1.35 to 3.1 e-/s between 3
    and 5 px, which broke that scene's PRF fit) the profile is held at its minimum; elsewhere it is eq. 7."""
    w = np.array([-0.2264569016488154, -0.32365949017451473, 0.08248004869006105, 0.9199638376606342,
                  -0.08413257892950288, -0.0033319386221764124, 0.029388072614043925, -0.012574248210698268,
                  -0.004408201718243494])  # fmt: skip
    r = np.linspace(0.0, 5.0, 101)
    raw = lambda F: 10.0 ** (edge_design_matrix(r, np.full(r.size, np.log10(F))) @ w)  # noqa: E731
    for F in (3.0, 10.0, 30.0, 100.0, 1e3, 1.5e4):
        f = edge_model_flux(w, r, np.full(r.size, F))
        assert np.all(np.diff(f) <= 1e-12 * f[:-1]), F
        turn = np.argmin(raw(F))  # up to the minimum of the quadratic: eq. 7 itself
        assert np.allclose(f[:turn], raw(F)[:turn], rtol=1e-12)
        assert np.allclose(f[turn:], raw(F)[turn], rtol=1e-2)  # beyond: its minimum (to the grid step)
    assert raw(10.0)[-1] > 2 * raw(10.0).min()  # the recorded model does turn upwards
