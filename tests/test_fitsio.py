"""Reading real TESScut / TESS SPOC / Kepler / K2 FITS files into cubes (workflow_lib.fitsio)."""

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from workflow_lib.data.cube import CubeError, cube_wcs, open_cube, validate_cube
from workflow_lib.data.fits_reader import read_field, read_fits_cube, validate_for_modelling, write_local_field

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MISSION_FILES = (
    sorted(str(p.relative_to(SHARED)) for d in ("tesscut", "tess_spoc", "kepler") for p in (SHARED / d).glob("*.fits"))
    if SHARED.is_dir()
    else []
)
TPF_TEST = [f"kepler/tpf_test_{k:02d}.fits" for k in range(10)]
TESSCUT = "tesscut/tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"
SPOC = "tess_spoc/tess-s0015-2-3_tic273589987_tpf_100cad.fits"
K2 = "kepler/ktwo210994964-c04_lpd-targ.fits"
TABBY = "kepler/test-tpf-kplr-tabby-100-cadences.fits"

#: files that load but cannot be modelled, and why
NOT_MODELLABLE = {
    "tesscut/test-tpf-tesscut_1x1.fits": "1 pixel: too small for a scene model or CPM",
    "tesscut/tess-s0018-2-4_asteroid_11x10_1cadence_astrocut.fits": "1 cadence: ",
    "kepler/kplr-ffi_ch01_test.fits": "1 cadence: ",
}


@pytest.mark.parametrize("name", MISSION_FILES)
def test_every_file_loads(shared_data, name):
    path = shared_data / name
    ds = read_fits_cube(path)
    validate_cube(ds, name)
    assert ds.attrs["source_file"] == str(path)
    assert ds["aperture"].dims == ("row", "column") and ds["aperture"].dtype == np.int32
    assert np.all(np.isfinite(ds["time"].values))
    assert np.all(np.diff(ds["cadenceno"].values) > 0)
    if ds.attrs["mission"] == "TESS":
        assert ds.attrs["time_system"] == "BTJD" and {"sector", "camera", "ccd"} <= set(ds.attrs)
    else:
        assert ds.attrs["time_system"] == "BKJD" and "channel" in ds.attrs
        assert ("quarter" in ds.attrs) != ("campaign" in ds.attrs)
    if name in NOT_MODELLABLE:
        with pytest.raises(CubeError, match=NOT_MODELLABLE[name]):
            validate_for_modelling(ds, name)
    else:
        validate_for_modelling(ds, name)


@pytest.mark.parametrize("name", [TESSCUT, SPOC, K2, TABBY, TPF_TEST[3]])
def test_values_round_trip(shared_data, name):
    path = shared_data / name
    ds = read_fits_cube(path)
    with fits.open(path) as h:
        tab, hdr, prim = h[1].data, h[1].header, h[0].header
        good = np.isfinite(tab["TIME"])
        raw = tab["FLUX"][good]
        assert ds.sizes["time"] == good.sum()
        rng = np.random.default_rng(1)
        for _ in range(5):
            t, r, c = (int(rng.integers(n)) for n in raw.shape)
            v = ds["flux"].isel(time=t, row=r, column=c).item()
            assert v == raw[t, r, c] or (np.isnan(v) and np.isnan(raw[t, r, c]))
        np.testing.assert_array_equal(ds["flux_err"].values, tab["FLUX_ERR"][good])
        np.testing.assert_array_equal(ds["background"].values, tab["FLUX_BKG"][good])
        np.testing.assert_array_equal(ds["quality"].values, tab["QUALITY"][good])
        if ds.attrs["product"] != "tesscut":
            np.testing.assert_array_equal(ds["cadenceno"].values, tab["CADENCENO"][good])
        np.testing.assert_array_equal(ds["time"].values, tab["TIME"][good])
        assert ds["column"].values[0] == hdr["1CRV5P"] and ds["row"].values[0] == hdr["2CRV5P"]
        assert np.all(np.diff(ds["row"].values) == 1) and np.all(np.diff(ds["column"].values) == 1)
        np.testing.assert_array_equal(ds["aperture"].values, h["APERTURE"].data)
        assert ds.attrs["time_offset"] == hdr["BJDREFI"] + hdr["BJDREFF"]
        if "KEPLERID" in prim:
            assert ds.attrs["target_id"] == prim["KEPLERID"] and ds.attrs["target_mag"] == prim["KEPMAG"]
        if ds.attrs["mission"] == "K2":
            assert ds.attrs["campaign"] == prim["CAMPAIGN"] == 4 and ds.attrs["channel"] == 49


def test_nan_time_cadences_dropped_with_log(shared_data, caplog):
    with caplog.at_level(logging.INFO, logger="workflow_lib"):
        ds = read_fits_cube(shared_data / K2)
    with fits.open(shared_data / K2) as h:
        n_nan = int((~np.isfinite(h[1].data["TIME"])).sum())
    assert n_nan > 0 and ds.sizes["time"] == 3470 - n_nan
    assert any("NaN time" in r.getMessage() and K2.split("/")[1] in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", [TPF_TEST[0], TPF_TEST[9], SPOC, TESSCUT, TABBY])
def test_wcs_puts_target_on_its_pixel(shared_data, name):
    """The target's sky position maps (via attrs['wcs'], 0-based indices) onto the stamp, within
    1.5 px of the brightest pixel of the median image (all these targets dominate their stamps)."""
    ds = read_fits_cube(shared_data / name)
    w = cube_wcs(ds)
    x, y = w.world_to_pixel_values(ds.attrs["ra_obj"], ds.attrs["dec_obj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # uncollected pixels are NaN at every cadence
        med = np.nanmedian(ds["flux"].values, axis=0)
    r, c = np.unravel_index(np.nanargmax(med), med.shape)
    assert abs(x - c) <= 1.5 and abs(y - r) <= 1.5, (x, y, c, r)
    # and back: the centre of that pixel is within 1.5 pixels (Kepler 4"/px, TESS 21"/px) of the target
    ra, dec = w.pixel_to_world_values(c, r)
    scale = 21.0 if ds.attrs["mission"] == "TESS" else 3.98
    sep = np.hypot((ra - ds.attrs["ra_obj"]) * np.cos(np.radians(dec)), dec - ds.attrs["dec_obj"]) * 3600
    assert sep < 1.5 * np.sqrt(2) * scale


@pytest.mark.parametrize("name", [SPOC, TESSCUT, K2, TPF_TEST[0]])
def test_matches_lightkurve(shared_data, name):
    lk = pytest.importorskip("lightkurve")
    path = shared_data / name
    ds = read_fits_cube(path)
    tpf = lk.read(str(path), quality_bitmask="none")
    if ds.attrs["product"] == "tesscut":  # astrocut CADENCENO is 0; rows are consecutive FFIs
        with fits.open(path) as h:
            assert np.all(h[1].data["CADENCENO"] == 0)
        # lightkurve numbers the frames 0..n-1; we number them from the first frame's FFIINDEX
        np.testing.assert_array_equal(ds["cadenceno"].values, tpf.hdu[0].header["FFIINDEX"] + np.asarray(tpf.cadenceno))
        keep = np.isfinite(tpf.time.value)
    else:
        keep = np.isin(np.asarray(tpf.cadenceno), ds["cadenceno"].values)
    assert keep.sum() == ds.sizes["time"]
    np.testing.assert_allclose(ds["time"].values, tpf.time.value[keep], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ds["flux"].values, np.asarray(tpf.flux.value)[keep])
    assert tpf.row == ds["row"].values[0] and tpf.column == ds["column"].values[0]
    np.testing.assert_array_equal(tpf.pipeline_mask, (ds["aperture"].values & 2) > 0)
    # same sky position for a pixel under both WCSs
    ours = cube_wcs(ds).pixel_to_world_values(2.0, 1.0)
    theirs = tpf.wcs.pixel_to_world_values(2.0, 1.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-7)


def test_kepler_stamps_join_into_pixel_table(shared_data):
    files = [shared_data / f for f in TPF_TEST]
    ds = read_field(files)
    assert ds.attrs["layout"] == "pixel_table" and ds.attrs["quarter"] == 12 and ds.attrs["channel"] == 4
    assert "target_id" not in ds.attrs  # per-target attrs live in attrs['stamps']
    stamps = json.loads(ds.attrs["stamps"])
    assert [s["target_id"] for s in stamps][:2] == [12644769, 12644774]
    assert len(json.loads(ds.attrs["stamp_wcs"])) == 10
    expected = 0
    for k, f in enumerate(files):
        with fits.open(f) as h:
            flux = h[1].data["FLUX"]
            collected = np.isfinite(flux).any(axis=0)
            expected += int(collected.sum())
            # every collected pixel of this stamp is in the table with its CCD row/column and values
            r0, c0 = h[1].header["2CRV5P"], h[1].header["1CRV5P"]
            # (a CCD pixel that two stamps read is in the table once, under the first stamp: same values)
            where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(ds["row"].values, ds["column"].values))}
            rr, cc = np.nonzero(collected)
            for r, c in list(zip(rr, cc))[:: max(1, rr.size // 6)]:
                p = where[(int(r + r0), int(c + c0))]
                np.testing.assert_array_equal(ds["flux"].values[:, p], flux[:, r, c])
                assert ds["stamp"].values[p] <= k
                if ds["stamp"].values[p] == k:
                    assert ds["aperture"].values[p] == h[2].data[r, c]
    # 308 collected pixels in the ten files, 21 of them read by two overlapping stamps (identical values)
    assert expected == 308 and ds.sizes["pixel"] == 287 and ds.attrs["duplicate_pixels_dropped"] == 21
    assert ds.sizes["time"] == 10


def test_read_field_refuses_mixed_channels_and_cadences(shared_data, tmp_path):
    with pytest.raises(CubeError, match=r"test-tpf-kplr-tabby.*quarter 8 channel 56.*quarter 12 channel 4"):
        read_field([shared_data / TPF_TEST[0], shared_data / TABBY])
    short = tmp_path / "tpf_short.fits"
    with fits.open(shared_data / TPF_TEST[1]) as h:
        h[1] = fits.BinTableHDU(h[1].data[:9], header=h[1].header)
        h.writeto(short)
    with pytest.raises(CubeError, match=r"tpf_short.fits: has 9 cadences"):
        read_field([shared_data / TPF_TEST[0], short])


def test_tesscut_sector_from_filename_and_wcs_from_table(shared_data, tmp_path):
    """Old astrocut: empty SECTOR keywords and no WCS in APERTURE; both are recovered."""
    ref = read_fits_cube(shared_data / TESSCUT)
    old = tmp_path / Path(TESSCUT).name
    with fits.open(shared_data / TESSCUT) as h:
        for hdu in h:
            for key in ("SECTOR", "CAMERA", "CCD"):
                if key in hdu.header:
                    hdu.header[key] = ""
        ap = h["APERTURE"].header
        for key in list(ap):
            if key[:5] in ("CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT") or re.fullmatch(r"PC\d_\d", key):
                del ap[key]
        h.writeto(old)
    ds = read_fits_cube(old)
    assert (ds.attrs["sector"], ds.attrs["camera"], ds.attrs["ccd"]) == (1, 4, 2)
    pix = np.array([[0.0, 0.0], [5.0, 5.0], [2.5, 3.0]])
    np.testing.assert_allclose(cube_wcs(ds).wcs_pix2world(pix, 0), cube_wcs(ref).wcs_pix2world(pix, 0), atol=1e-8)


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_bad_files_name_the_file(shared_data, tmp_path):
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not FITS")
    with pytest.raises(CubeError, match="junk.fits: not a readable FITS file"):
        read_fits_cube(junk)
    cut = tmp_path / "truncated.fits"
    cut.write_bytes((shared_data / TABBY).read_bytes()[:40000])
    with pytest.raises(CubeError, match="truncated.fits"):
        read_fits_cube(cut)
    prf = next((shared_data / "tess_prf" / "cam4_ccd2").glob("*.fits"))
    with pytest.raises(CubeError, match=f"{prf.name}: not a target pixel file"):
        read_fits_cube(prf)
    with pytest.raises(CubeError, match="nothing.fits: no such file"):
        read_fits_cube(tmp_path / "nothing.fits")


def test_kepler_ffi_crop(shared_data):
    ds = read_fits_cube(shared_data / "kepler/kplr-ffi_ch01_test.fits")
    with fits.open(shared_data / "kepler/kplr-ffi_ch01_test.fits") as h:
        img, hdr = h[1].data, h[1].header
    assert dict(ds.sizes) == {"time": 1, "row": 200, "column": 200}
    np.testing.assert_array_equal(ds["flux"].values[0], img)
    assert ds["time"].values[0] == pytest.approx(0.5 * (hdr["TSTART"] + hdr["TSTOP"]))
    assert ds.attrs["channel"] == 1 and ds.attrs["product"] == "kepler_ffi"
    assert np.all(ds["flux_err"].values > 0)
    # the SIP WCS of the channel is kept
    assert "A_ORDER" in ds.attrs["wcs"]


def test_validate_for_modelling_messages(shared_data):
    one_pix = read_fits_cube(shared_data / "tesscut/test-tpf-tesscut_1x1.fits")
    with pytest.raises(CubeError, match=r"^cut1x1: 1 pixel: too small for a scene model or CPM"):
        validate_for_modelling(one_pix, "cut1x1")
    two_cad = read_fits_cube(shared_data / TESSCUT).isel(time=slice(0, 1))
    with pytest.raises(CubeError, match=r"1 cadence: "):
        validate_for_modelling(two_cad, "x")
    nanflux = read_fits_cube(shared_data / TESSCUT)
    nanflux["flux"][:] = np.nan
    with pytest.raises(CubeError, match="every flux value is NaN"):
        validate_for_modelling(nanflux, "x")


def test_write_local_field(shared_data, tmp_path):
    d = tmp_path / "stamps"
    d.mkdir()
    for f in TPF_TEST[1:4]:
        shutil.copy(shared_data / f, d)
    out = write_local_field(
        {"files": [str(shared_data / TPF_TEST[0])], "directory": str(d)},
        tmp_path / "res" / "k16" / "cube.zarr",
        field="k16",
    )
    ds = open_cube(out)
    collected = sum(int(np.isfinite(fits.getdata(shared_data / f, 1)["FLUX"]).any(axis=0).sum()) for f in TPF_TEST[:4])
    assert ds.attrs["field"] == "k16" and ds.sizes["pixel"] == collected - ds.attrs["duplicate_pixels_dropped"]
    assert ds.attrs["duplicate_pixels_dropped"] > 0
    assert len(json.loads(ds.attrs["stamps"])) == 4
    ref = read_field([shared_data / TPF_TEST[0]] + sorted(d.glob("*.fits")))
    np.testing.assert_array_equal(ds["flux"].values, ref["flux"].values)
    np.testing.assert_array_equal(ds["row"].values, ref["row"].values)
    prov = json.loads(ds.attrs["provenance"])
    assert prov["step"] == "download_local" and len(prov["inputs"]) == 4
    assert len(prov["input_sha256"]) == 4 and prov["software"]["astropy"]
    assert not list(out.parent.glob(".*tmp*"))
    with pytest.raises(CubeError, match="no such file"):
        write_local_field({"files": [str(tmp_path / "missing.fits")]}, tmp_path / "x.zarr", field="x")
    with pytest.raises(CubeError, match="no \\*.fits files"):
        write_local_field({"directory": str(tmp_path / "res")}, tmp_path / "x.zarr", field="x")
