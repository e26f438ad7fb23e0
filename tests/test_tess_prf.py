"""The real TESS SPOC PRF: packaged data, the SPOC sampling convention, interpolation, rendering."""

import numpy as np
import pytest
from astropy.io import fits

from workflow_lib.data import tess_prf as tp
from workflow_lib.data.cube import CubeError


@pytest.fixture(scope="module")
def full_grid(shared_data):
    return tp.load_prf_grid(shared_data / "tess_prf" / "cam4_ccd2")


def test_packaged_grid_is_the_official_files(shared_data):
    grid = tp.load_prf_grid()
    assert grid.images.shape == (3, 3, 117, 117)
    assert (grid.camera, grid.ccd) == (4, 2)
    for i, r in enumerate(grid.rows):
        for j, c in enumerate(grid.cols):
            name = f"tess2018243163601-prf-4-2-row{int(r):04d}-col{int(c):04d}.fits"
            assert name in grid.sources
            with fits.open(shared_data / "tess_prf" / "cam4_ccd2" / name) as h:
                assert h[0].header["CCD_RREF"] == r and h[0].header["CCD_CREF"] == c
                np.testing.assert_allclose(grid.images[i, j], h[0].data, rtol=1e-6, atol=1e-9)
    # the default synthetic cutout (rows/cols 1000-1063) lies inside the packaged grid
    assert grid.rows[0] < 1000 and grid.rows[-1] > 1063 and grid.cols[0] < 1000 and grid.cols[-1] > 1063
    size = sum(p.stat().st_size for p in tp.PACKAGE_DIR.iterdir())
    assert size < 1.5e6


def test_full_grid_loads_5x5(full_grid):
    assert full_grid.images.shape == (5, 5, 117, 117)
    np.testing.assert_array_equal(full_grid.rows, [1, 513, 1025, 1536, 2048])
    np.testing.assert_array_equal(full_grid.cols, [45, 557, 1069, 1580, 2092])


def test_spoc_convention_each_subgrid_sums_to_one(full_grid):
    # every one of the 81 interleaved 13x13 sub-grids is a complete pixel response (sum 1)
    img = full_grid.images[2, 2]
    sums = np.array([[img[a::9, b::9].sum() for b in range(9)] for a in range(9)])
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)


def test_render_at_tabulated_offsets_returns_the_raw_samples():
    grid = tp.load_prf_grid()
    img = grid.images[1, 1]  # row 1025, col 1069
    rows = np.arange(1019, 1032)  # 13 px around 1025
    cols = np.arange(1063, 1076)
    for a, b in [(4, 4), (0, 8), (2, 6), (7, 1)]:
        # sample index 58 + 9 (pixel - star): sub-grid (a, b) is the source at offset -(a-4)/9, -(b-4)/9
        star_r, star_c = 1025 - (a - 4) / 9, 1069 - (b - 4) / 9
        out = tp.render_prf(star_r, star_c, rows, cols, 1.0, prf_image=img)
        np.testing.assert_allclose(out, img[a::9, b::9], atol=1e-7)


def test_render_sums_to_flux_and_centroid_follows_position():
    rng = np.random.default_rng(3)
    rows, cols = np.arange(1000, 1030), np.arange(1000, 1030)
    base = tp.render_prf(1015.0, 1014.0, rows, cols, 1.0)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    c0 = ((rr * base).sum(), (cc * base).sum())
    for _ in range(5):
        dr, dc = rng.uniform(-0.5, 0.5, 2)
        flux = 10 ** rng.uniform(2, 5)
        im = tp.render_prf(1015.0 + dr, 1014.0 + dc, rows, cols, flux)
        # the spline's overshoot where the tabulated PRF is cut off (6.5 px) stays < 1e-4 of the flux
        assert im.min() >= -1e-4 * flux
        assert im.sum() == pytest.approx(flux, rel=1e-6)
        # the pixel centroid moves with the source (to within the pixel-phase bias of an
        # undersampled PRF, a few hundredths of a pixel for TESS)
        cen = ((rr * im).sum() / flux, (cc * im).sum() / flux)
        assert cen[0] - c0[0] == pytest.approx(dr, abs=0.03)
        assert cen[1] - c0[1] == pytest.approx(dc, abs=0.03)
    # a stamp that cuts the PRF keeps only the part on it
    part = tp.render_prf(1015.0, 1014.0, rows[:16], cols, 1.0)
    np.testing.assert_allclose(part, base[:16], atol=1e-12)
    assert 0.4 < part.sum() < 0.8


def test_spline_lattice_sum_is_one_at_any_phase():
    coef = tp.prf_coefficients_at(1030.2, 1040.7)
    k = np.arange(-9, 10)
    for fr, fc in np.random.default_rng(0).uniform(0, 1, (6, 2)):
        s = tp.evaluate_prf(coef, (k - fr)[:, None], (k - fc)[None, :]).sum()
        assert s == pytest.approx(1.0, abs=1e-7)


def test_prf_at_is_bilinear_and_clamped(full_grid):
    g = full_grid
    np.testing.assert_allclose(tp.prf_at(1025, 1069, g), g.images[2, 2])
    mid = tp.prf_at(0.5 * (1025 + 1536), 0.25 * 1069 + 0.75 * 1580, g)
    expect = 0.5 * (0.25 * g.images[2, 2] + 0.75 * g.images[2, 3]) + 0.5 * (
        0.25 * g.images[3, 2] + 0.75 * g.images[3, 3]
    )
    np.testing.assert_allclose(mid, expect, rtol=1e-12)
    np.testing.assert_allclose(tp.prf_at(-50, 10, g), g.images[0, 0])
    # the PRF really changes across the CCD (otherwise interpolation would be untested)
    assert np.abs(g.images[0, 0] - g.images[4, 4]).max() > 0.01
    # cached coefficients equal the coefficients of the interpolated image
    np.testing.assert_allclose(
        tp.prf_coefficients_at(1200.0, 900.0, g), tp.prf_coefficients(tp.prf_at(1200.0, 900.0, g)), atol=1e-12
    )


def test_bad_directory_is_named(tmp_path):
    with pytest.raises(CubeError, match=str(tmp_path)):
        tp.load_prf_grid(tmp_path)
    bad = tmp_path / "x.fits"
    fits.PrimaryHDU(np.zeros((5, 5))).writeto(bad)
    with pytest.raises(CubeError, match="x.fits"):
        tp.load_prf_grid(tmp_path)
