"""The LFD chain on real pixels: Kepler Q12 channel-4 stamps (runs, finite light curves) and the 6x6
TESScut cube around pi Men (too small and saturated to model: refuses, naming the cube)."""

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table

from workflow_lib.data import fits_reader as fitsio
from workflow_lib.data import gaia
from workflow_lib.data.cube import open_cube
from workflow_lib.steps.lfd import edge_model_step, flux_solve_step, motion_model_step, prf_model_step


def run_lfd_chain(d, cube_path, catalog_path):
    edge_model_step(cube_path, catalog_path, d / "edge.json", {})
    prf_model_step(cube_path, catalog_path, d / "edge.json", d / "prf.npz", d / "prf.png", {})
    motion_model_step(cube_path, catalog_path, d / "prf.npz", d / "motion.npz", {})
    flux_solve_step(cube_path, catalog_path, d / "prf.npz", d / "motion.npz", d / "lc.zarr", d / "fits", {})
    return xr.open_zarr(d / "lc.zarr", consolidated=False)


def test_kepler_channel_stamps_with_header_positions(shared_data, tmp_path):
    files = sorted((shared_data / "kepler").glob("tpf_test_*.fits"))
    assert len(files) == 10
    cube_path = tmp_path / "cube.zarr"
    fitsio.write_local_field({"files": [str(f) for f in files]}, cube_path, field="kepler_q12_ch4")
    cube = open_cube(cube_path)
    # offline: the ten targets named in the stamp headers (RA_OBJ/DEC_OBJ/KEPMAG)
    catalog = gaia.crossmatch(cube, gaia.header_catalog(cube), 4.0, 18.0)
    assert len(catalog) == 10
    catalog.write(tmp_path / "catalog.ecsv")
    lc = run_lfd_chain(tmp_path, cube_path, tmp_path / "catalog.ecsv")
    assert lc.sizes["source"] == 10 and lc.sizes["time"] == cube.sizes["time"]
    flux = lc["flux"].values
    assert np.isfinite(flux).all() and np.isfinite(lc["flux_err"].values).all()
    # The ten targets' LFD fluxes against the Kepler zero point's prediction (1.74e5 e-/s at Kp = 12): one
    # common ratio, as the stamps are background-subtracted (BACKAPP = T: no sky terms, the LFD paper's
    # assumption 1). Measured 1.98-2.29 for eight of ten (median 2.24, MAD 3 %); with a free sky plane
    # (-528 e-/s/px) they spread over 0.40-3.74 (MAD 21 %). The common ratio is above 1 because the header
    # catalog lacks 11 of the 21 Gaia sources on these stamps, whose light the PRF's wings take, and the
    # handbook's zero point is low for these files (Tabby's star's SAP is 1.3x its prediction).
    mags = np.asarray(catalog["phot_g_mean_mag"])
    ratio = np.median(flux, axis=1) / (1.74e5 * 10 ** (-0.4 * (mags - 12)))
    assert np.median(np.abs(ratio / np.median(ratio) - 1)) < 0.10, ratio
    assert 0.5 < ratio[int(np.argmin(mags))] < 2.5, ratio  # Kepler-16 (KIC 12644769, Kp 11.8), the brightest
    # each light curve is steady over 10 cadences
    rel_scatter = np.std(flux, axis=1) / np.abs(np.median(flux, axis=1))
    assert np.median(rel_scatter) < 0.01


def test_tiny_tesscut_cube_refuses_clearly(shared_data, tmp_path):
    fits_file = shared_data / "tesscut" / "tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"
    cube_path = tmp_path / "pimen.zarr"
    fitsio.write_local_field({"files": [str(fits_file)]}, cube_path, field="pimen")
    cube = open_cube(cube_path)
    # pi Men from Gaia DR3 (G = 5.49): a saturated star filling a 6x6 stamp
    local = Table(
        dict(
            source_id=[4623036865373793408],
            ra=[84.29120],
            dec=[-80.46912],
            pmra=[311.19],
            pmdec=[1048.85],
            parallax=[54.7],
            phot_g_mean_mag=[5.49],
            bp_rp=[0.77],
            ref_epoch=[2016.0],
        )
    )
    local.write(tmp_path / "local.ecsv")
    catalog = gaia.crossmatch(cube, gaia.read_catalog(tmp_path / "local.ecsv"), 4.0, 19.0)
    catalog.write(tmp_path / "catalog.ecsv")
    with pytest.raises(ValueError, match="pimen.zarr"):
        run_lfd_chain(tmp_path, cube_path, tmp_path / "catalog.ecsv")
