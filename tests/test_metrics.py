"""Tests of workflow_lib.metrics: the CDPP proxy against lightkurve's estimate_cdpp and theory."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from workflow_lib import metrics


def _lc(seed, n=1300, gap=(600, 650), trend=True, outliers=True):
    rng = np.random.default_rng(seed)
    t = 1325.0 + np.arange(n) * 30 / 1440
    keep = np.ones(n, bool)
    keep[gap[0] : gap[1]] = False
    t = t[keep]
    f = 5000 + rng.normal(0, 3.0, t.size)
    if trend:
        f += 40 * np.sin((t - t[0]) / 2.7) + 3 * (t - t[0])
    if outliers:
        idx = rng.choice(t.size, 6, replace=False)
        f[idx] += rng.choice([-1, 1], 6) * rng.uniform(60, 200, 6)
    return t, f


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("duration", [2, 12, 13])
def test_cdpp_matches_lightkurve(seed, duration):
    lk = pytest.importorskip("lightkurve")
    t, f = _lc(seed, trend=seed != 2, outliers=seed != 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lk.LightCurve(time=t, flux=f).estimate_cdpp(transit_duration=duration, savgol_window=97).value
    ours = metrics.cdpp(t, f, duration, savgol_window=97)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_cdpp_default_window_matches_lightkurve_default():
    lk = pytest.importorskip("lightkurve")
    t, f = _lc(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lk.LightCurve(time=t, flux=f).estimate_cdpp().value  # transit_duration=13, savgol_window=101
    assert metrics.cdpp(t, f, 13) == pytest.approx(ref, rel=1e-9)


def test_white_noise_cdpp_theory():
    """For white noise of relative sigma s the CDPP is s * ||b_w * (delta - g)||_2 (ppm), with b_w
    the w-cadence boxcar and g the 97-point quadratic Savitzky-Golay kernel (linear filters)."""
    from scipy.signal import savgol_coeffs

    rng = np.random.default_rng(3)
    t = np.arange(20000) * 30 / 1440
    s = 1e-3
    f = 1.0 + s * rng.standard_normal(t.size)
    for hours, w in ((1.0, 2), (6.0, 12)):
        assert metrics.cadences_for(t, hours) == w
        got = metrics.cdpp_hours(t, f, hours)
        h = -savgol_coeffs(97, 2)
        h[48] += 1.0
        kern = np.convolve(h, np.ones(w) / w)
        expected = s * np.sqrt((kern**2).sum()) * 1e6
        assert expected < s / np.sqrt(w) * 1e6  # the filter removes some power
        assert got == pytest.approx(expected, rel=0.03)
    assert metrics.savgol_window_for(t) == 97


def test_add_cdpp_coords_and_quality_mask():
    rng = np.random.default_rng(0)
    t = np.arange(1000) * 30 / 1440
    flux = 1000 + rng.normal(0, 1.0, (3, t.size)) * np.array([[1.0], [2.0], [4.0]])
    q = np.zeros(t.size, np.int32)
    q[100:110] = 32
    flux[:, 100:110] += 500  # flagged garbage must not count
    lc = xr.Dataset(
        {"flux": (("source", "time"), flux), "quality": ("time", q)},
        coords={"time": t, "source_id": ("source", [1, 2, 3])},
    )
    out = metrics.add_cdpp(lc)
    c1 = out["cdpp_1h"].values
    assert c1.shape == (3,) and np.all(np.isfinite(c1))
    np.testing.assert_allclose(c1 / c1[0], [1, 2, 4], rtol=0.15)
    np.testing.assert_allclose(c1[0], 1e3 / np.sqrt(2), rtol=0.1)
    assert (out["cdpp_6h"].values < c1).all()
    assert "cdpp_1h" not in lc.coords  # input unchanged


def test_template_amplitude_recovers_scaled_signal():
    rng = np.random.default_rng(1)
    t = np.arange(1300) * 30 / 1440
    template = -np.where((t % 3.0) < 0.12, 50.0, 0.0)
    f = 2000 + 5 * t + 0.7 * template + rng.normal(0, 1, t.size)
    windows = [(c - 0.4, c + 0.5) for c in np.arange(0, t[-1], 3.0)]
    assert metrics.template_amplitude(t, f, template, windows) == pytest.approx(0.7, abs=0.02)


def test_cdpp_durations_equal_one_cdpp_call_per_duration():
    """add_cdpp flattens a light curve once for all its durations: each value must equal cdpp()'s,
    including a duration too long for the light curve (NaN) beside valid ones."""
    from workflow_lib.metrics import cdpp, cdpp_durations

    rng = np.random.default_rng(5)
    t = np.arange(400) * 0.02
    f = 1000 + 3 * np.sin(t) + rng.normal(0, 1, t.size)
    f[[10, 200]] = np.nan
    durations = [2, 12, 500]
    got = cdpp_durations(t, f, durations, savgol_window=51)
    want = [cdpp(t, f, d, savgol_window=51) for d in durations]
    assert got[:2] == want[:2] and np.isfinite(got[:2]).all()
    assert np.isnan(got[2]) and np.isnan(want[2])


@pytest.mark.parametrize(("n", "window", "order"), [(1300, 101, 2), (600, 49, 2), (101, 101, 2), (50, 7, 1), (9, 3, 2)])
def test_savgol_equals_scipy(n, window, order):
    """The CDPP's Savitzky-Golay trend (fixed edge operators) against scipy.signal.savgol_filter (mode interp)."""
    from scipy.signal import savgol_filter

    from workflow_lib.metrics import _savgol

    x = np.random.default_rng(n).normal(size=n).cumsum() + 1e4
    np.testing.assert_allclose(_savgol(x, window, order), savgol_filter(x, window, order), rtol=1e-11, atol=0)


def test_savgol_weights_are_scipys_savgol_coeffs():
    """The CDPP's own Savitzky-Golay weights (no scipy.signal import in step processes) are
    scipy.signal.savgol_coeffs(use="dot") bitwise, at every position of a range of windows and orders."""
    from scipy.signal import savgol_coeffs

    for window in (3, 5, 11, 49, 97, 101, 301):
        for polyorder in range(min(4, window)):
            for pos in range(window // 2 + 1):
                np.testing.assert_array_equal(
                    metrics.savgol_weights(window, polyorder, pos),
                    savgol_coeffs(window, polyorder, pos=pos, use="dot"),
                )
