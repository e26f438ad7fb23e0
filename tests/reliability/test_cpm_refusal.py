"""CPM refuses cubes it cannot model (one CubeError naming the cube and what to change; the steps skip such
cubes instead unless cpm.on_unmodellable is 'error', tests/test_cpm.py)."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from workflow_lib.cpm import model as cpm
from workflow_lib.data.cube import CubeError, make_cube

DATA = Path("/work/shared/data")
PIMEN = DATA / "tesscut" / "tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"
ONE_PIXEL = DATA / "tesscut" / "test-tpf-tesscut_1x1.fits"
K2 = DATA / "kepler" / "ktwo210994964-c04_lpd-targ.fits"


def _cube(flux, dt_min=30.0):
    nt, nr, nc = flux.shape
    time = 1325.0 + np.arange(nt) * dt_min / 1440.0
    return make_cube(
        flux,
        np.ones_like(flux),
        np.zeros(nt, dtype=np.int32),
        time,
        np.arange(nt),
        100 + np.arange(nr),
        200 + np.arange(nc),
        mission="TESS",
    )


def _noisy(nt=200, nr=20, nc=20, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(50, 500, size=(nr, nc))
    trend = 1 + 0.01 * np.sin(np.linspace(0, 6, nt))
    return base[None] * trend[:, None, None] + rng.normal(0, 1, size=(nt, nr, nc))


def _read(path):
    if not path.exists():
        pytest.skip(f"{path} not available")
    from workflow_lib.data.fits_reader import read_fits_cube

    return read_fits_cube(path)


def _detrend(ds, params, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cpm.CPMWarning)
        return cpm.cpm_detrend_cube(ds, params, name=name)


def test_min_predictors_rule():
    assert cpm.min_predictors(256) == 64
    assert cpm.min_predictors(40) == 10
    assert cpm.min_predictors(20) == 8
    assert cpm.min_predictors(5) == 5  # never more than L
    assert cpm.min_predictors(0) == 0


def test_real_pimen_6x6_refused_with_both_reasons():
    ds = _read(PIMEN)
    with pytest.raises(CubeError) as exc:
        _detrend(ds, cpm.cpm_params(), "pimen")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("pimen: the CPM cannot model this cube")
    assert "only 50 good cadences for k=150" in msg and "set cpm.k <= 50" in msg
    assert "36 of 36 pixels have fewer than 64 candidate predictor pixels (min 0)" in msg
    assert "exclusion_size" in msg


def test_real_pimen_refused_even_with_small_k():
    """The old behaviour: k capped, 0 predictors, light curves = raw data. Now refused for predictors."""
    ds = _read(PIMEN)
    with pytest.raises(CubeError, match="fewer than 64 candidate predictor pixels") as exc:
        _detrend(ds, cpm.cpm_params(k=10), "pimen")
    assert "good cadences" not in str(exc.value)


def test_real_k2_tpf_refused():
    ds = _read(K2)
    with pytest.raises(CubeError, match=r"ktwo: the CPM cannot model this cube: 98 of 108 pixels have fewer than 64"):
        _detrend(ds, cpm.cpm_params(), "ktwo")


def test_real_one_pixel_cube_refused():
    ds = _read(ONE_PIXEL)
    with pytest.raises(CubeError, match="1 of 1 pixels have fewer than 64"):
        _detrend(ds, cpm.cpm_params(), "onepix")


def test_all_zero_and_constant_cubes_refused():
    with pytest.raises(CubeError, match="zero: the flux is zero over the 60 kept cadences at every pixel"):
        _detrend(_cube(np.zeros((60, 12, 12))), cpm.cpm_params(n_predictors=16, exclusion_size=3, k=6), "zero")
    with pytest.raises(CubeError, match="flux is constant"):
        _detrend(_cube(np.full((60, 12, 12), 7.0)), cpm.cpm_params(n_predictors=16, exclusion_size=3, k=6), "flat")


def test_too_few_cadences_for_k_refused_not_capped():
    flux = _noisy(nt=40, nr=12, nc=12)
    with pytest.raises(CubeError, match=r"only 40 good cadences for k=50 .*set cpm.k <= 40"):
        _detrend(_cube(flux), cpm.cpm_params(n_predictors=16, exclusion_size=3, k=50), "short")
    # 10-min cadence: k=20 is scaled to 60 sections
    with pytest.raises(CubeError, match=r"k=60 .*scaled to the cadence.*set cpm.k <= 13"):
        _detrend(_cube(flux, dt_min=10.0), cpm.cpm_params(n_predictors=16, exclusion_size=3, k=20), "short")


def test_modelable_cube_still_runs():
    flux = _noisy(nt=120, nr=16, nc=16)
    out = _detrend(_cube(flux), cpm.cpm_params(n_predictors=64, exclusion_size=5, k=12), "ok")
    assert np.isfinite(out["flux"].values).all()
    assert out["cpm_n_predictors"].values.min() == 64
