"""The diagnostics behind docs/VALIDATION.md's core-term and bright-star sections, against known answers:
benchmarks/prf_flexibility.py (noise-free stars through the SPOC PRF) and benchmarks/residual_sources.py."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import prf_flexibility  # noqa: E402
import residual_sources  # noqa: E402

from workflow_lib.data import tess_prf  # noqa: E402


def test_explained_fraction_finds_a_linear_dependence_and_not_noise():
    rng = np.random.default_rng(0)
    n = 600
    x = rng.normal(size=n)
    noise = rng.normal(size=n)
    assert residual_sources.explained_fraction(2.0 * x + 0.1 * noise, [x], 51) > 0.99
    assert residual_sources.explained_fraction(noise, [x], 51) < 0.02
    # a slow trend (period 20 windows) is removed by the high-pass before the fit: no spurious R^2
    t = np.arange(n)
    slow = 50.0 * np.sin(2 * np.pi * t / (20 * 51))
    assert residual_sources.explained_fraction(noise + slow, [slow], 51) < 0.05


def test_drifting_slope_finds_a_response_whose_slope_changes_and_a_quadratic_does_not():
    """A flux error = slope(t) x jitter with a slope that changes sign along the run (the bright stars of
    docs/VALIDATION.md): the drifting-slope predictors explain it, the offsets' quadratic hardly does."""
    rng = np.random.default_rng(1)
    n = 600
    t = np.linspace(-1, 1, n)
    cx, cy = 0.2 * t + 0.02 * rng.normal(size=n), -0.1 * t + 0.02 * rng.normal(size=n)
    z = (3 * t * t - 1) * 50.0 * (cx - 0.2 * t) + 0.3 * rng.normal(size=n)
    assert residual_sources.explained_fraction(z, residual_sources.drifting_slope(cx, cy), 51) > 0.8
    assert residual_sources.explained_fraction(z, residual_sources.quadratic(cx, cy), 51) < 0.3


def test_core_terms_cut_the_noise_free_flux_scatter():
    """Noise-free stars rendered through the packaged SPOC PRF grid (in every checkout) at its corner: the
    least-squares fluxes of the fitted model scatter by ~1.1 % without core terms and ~0.65 % with
    core_degree 2 (``benchmarks/prf_flexibility.py --grid packaged``, 150 stars); no common bias there."""
    grid = tess_prf.load_prf_grid()
    stars = prf_flexibility.render_stars(np.random.default_rng(0), grid, 40, 513.0, 557.0, 0.0)
    r0 = prf_flexibility.flux_ratios(stars, {"core_degree": 0}, np.random.default_rng(1))
    r2 = prf_flexibility.flux_ratios(stars, {"core_degree": 2}, np.random.default_rng(1))
    assert abs(np.median(r0) - 1) < 0.005 and abs(np.median(r2) - 1) < 0.005
    assert 0.006 < np.std(r0) < 0.02
    assert np.std(r2) < 0.8 * np.std(r0)  # measured 0.97 % -> 0.69 % on these 40 stars
