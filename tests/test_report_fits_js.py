"""The report pages' JavaScript FITS writer (templates/fits.js) in headless Chromium, read back by astropy and
lightkurve: header values, image orientation, table columns, WCS, light curves and aperture masks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from helpers.chromium import ARGS, CHROMIUM, PlaywrightError, skip_without_chromium, sync_playwright

import workflow_lib.report as report_pkg

FITS_JS = Path(report_pkg.__file__).parent / "templates" / "fits.js"
SHARED_DATA = Path("/work/shared/data")
TABBY = SHARED_DATA / "kepler" / "test-tpf-kplr-tabby-100-cadences.fits"


pytestmark = pytest.mark.browser


GAIA_ID = "5284186916701857536"  # > 2**53: must survive as an exact integer


def js_series(time, cadenceno, flux, err, quality) -> dict:
    """The light-curve arrays as page.evaluate arguments (JSON: NaN as a float)."""
    return {
        "sid": GAIA_ID,
        "time": time.tolist(),
        "cad": cadenceno.tolist(),
        "flux": [float(v) for v in flux],
        "err": [float(v) for v in err],
        "q": quality.tolist(),
    }


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    skip_without_chromium()
    html = tmp_path_factory.mktemp("fitsjs") / "fits.html"
    html.write_text(f"<!doctype html><html><head><script>\n{FITS_JS.read_text()}\n</script></head><body></body></html>")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(html.as_uri())
        assert pg.evaluate("typeof window.RPTFITS.file") == "function"
        yield pg
        browser.close()
    assert not errors, errors


def write(page, path, expr, arg=None):
    """Evaluate a JS expression giving a Uint8Array (``a`` is the argument) and write its bytes to ``path``."""
    data = bytes(page.evaluate(f"(a) => Array.from({expr})", arg))
    path.write_bytes(data)
    return data


def open_strict(path):
    """Open a FITS file turning any astropy warning into an error, and verify it against the standard."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hdul = fits.open(path, checksum=False)
        hdul.verify("exception")
        for h in hdul:
            h.header.tostring()  # parses every card
    return hdul


def test_cards_are_80_chars_in_fixed_format(page):
    cards = page.evaluate(
        """() => [RPTFITS.card('flag', true, 'a logical'), RPTFITS.card('N', 42), RPTFITS.card('S', 'ab'),
                  RPTFITS.card('X', RPTFITS.real(2457000)), RPTFITS.card('Q', "it's", 'quoted')]"""
    )
    assert all(len(c) == 80 for c in cards)
    assert (
        cards[0][:8] == "FLAG    " and cards[0][8:10] == "= " and cards[0][29] == "T" and cards[0][10:29].strip() == ""
    )
    assert cards[0][30:].rstrip() == " / a logical"
    assert cards[1][10:30] == " " * 18 + "42"
    assert cards[2].rstrip() == "S       = 'ab      '"
    assert cards[3][10:30] == "2457000.0".rjust(20)
    assert cards[4].rstrip() == "Q       = 'it''s   '           / quoted"
    head = page.evaluate("() => Array.from(RPTFITS.header([['A', 1, ''], ['B', 'x', '']]))")
    assert len(head) == 2880
    text = bytes(head).decode("ascii")
    assert text[160:240] == "END" + " " * 77 and text[240:].strip() == ""


def test_header_values_round_trip(page, tmp_path):
    path = tmp_path / "hdr.fits"
    write(
        page,
        path,
        """RPTFITS.file([RPTFITS.imageHDU({primary: true, bitpix: 8, cards: [
            ['INTV', 42, 'an int'], ['NEGV', -7, ''], ['ZERO', 0, ''], ['INTLIKE', 2457000, ''],
            ['BJDREF', RPTFITS.real(2457000.0), 'a real that is integral'], ['SMALL', 1e-7, ''],
            ['THIRD', 1 / 3, ''], ['PI', Math.PI, ''], ['HUGE', 1.7976931348623157e308, ''], ['TINY', 5e-324, ''],
            ['NEGF', -0.000123456789, ''], ['BIGINT', BigInt(a), 'Gaia id'],
            ['YES', true, ''], ['NO', false, ''], ['STR', "O'Brien's star", 'quotes'], ['SHORT', 'ab', ''],
            ['EMPTY', '', ''], ['UNICODE', 'caf\u00e9', ''], ['lower', 3, 'upper-cased key'],
            ['COMMENT', 'free text', '']]})])""",
        GAIA_ID,
    )
    h = open_strict(path)[0].header
    assert h["SIMPLE"] is True and h["BITPIX"] == 8 and h["NAXIS"] == 0 and h["EXTEND"] is True
    for key, want in [("INTV", 42), ("NEGV", -7), ("ZERO", 0), ("INTLIKE", 2457000), ("BIGINT", int(GAIA_ID))]:
        assert type(h[key]) is int and h[key] == want, key
    for key, want in [
        ("BJDREF", 2457000.0),
        ("SMALL", 1e-7),
        ("THIRD", 1 / 3),
        ("PI", np.pi),
        ("HUGE", 1.7976931348623157e308),
        ("TINY", 5e-324),
        ("NEGF", -0.000123456789),
    ]:
        assert type(h[key]) is float and h[key] == want, key  # exact: shortest round-trip repr
    assert h["YES"] is True and h["NO"] is False
    assert h["STR"] == "O'Brien's star" and h["SHORT"] == "ab" and h["EMPTY"] == "" and h["UNICODE"] == "caf?"
    assert h["LOWER"] == 3 and h.comments["LOWER"] == "upper-cased key" and h.comments["INTV"] == "an int"
    assert str(h["COMMENT"]) == "free text"


def test_invalid_keys_raise(page):
    for key in ("NINECHARS", "A B", "É"):
        with pytest.raises(PlaywrightError, match="invalid FITS keyword"):
            page.evaluate("(k) => RPTFITS.card(k, 1)", key)
    with pytest.raises(PlaywrightError, match="finite"):
        page.evaluate("() => RPTFITS.card('X', NaN)")
    with pytest.raises(PlaywrightError, match="first HDU must be primary"):
        page.evaluate("() => RPTFITS.file([RPTFITS.binTableHDU({columns: []})])")


def test_empty_file_is_a_bare_primary(page, tmp_path):
    path = tmp_path / "empty.fits"
    data = write(page, path, "RPTFITS.file([])")
    assert len(data) == 2880
    hdul = open_strict(path)
    assert len(hdul) == 1 and hdul[0].data is None
    assert list(hdul[0].header.keys()) == ["SIMPLE", "BITPIX", "NAXIS", "EXTEND"]


def test_images_keep_shape_orientation_and_type(page, tmp_path):
    nrows, ncols = 3, 5
    mask = np.zeros((nrows, ncols), dtype=np.uint8)
    mask[0, 1] = mask[0, 2] = mask[1, 4] = mask[2, 0] = 1  # asymmetric: a flip or transpose would show
    f64 = np.array([[1.5, -2.25, 1e-300, 2457000.123456789, np.pi]] * nrows) * np.arange(1, nrows + 1)[:, None]
    f32 = np.arange(nrows * ncols, dtype=np.float32).reshape(nrows, ncols) / 7
    f32[1, 3] = np.nan
    i32 = (np.arange(nrows * ncols, dtype=np.int32).reshape(nrows, ncols) - 7) * 123457
    i16 = (np.arange(nrows * ncols, dtype=np.int16).reshape(nrows, ncols) - 7) * 1001
    path = tmp_path / "img.fits"
    write(
        page,
        path,
        """RPTFITS.file([RPTFITS.imageHDU({primary: true, bitpix: 8, data: a.u8, shape: a.shape}),
            RPTFITS.imageHDU({bitpix: -64, data: a.f64, shape: a.shape, extname: 'F64', cards: [['BUNIT', 'e-/s', '']]}),
            RPTFITS.imageHDU({bitpix: -32, data: a.f32, shape: a.shape, extname: 'F32'}),
            RPTFITS.imageHDU({bitpix: 32, data: a.i32, shape: a.shape, extname: 'I32'}),
            RPTFITS.imageHDU({bitpix: 16, data: a.i16, shape: a.shape, extname: 'I16'})])""",
        {
            "shape": [nrows, ncols],
            "u8": mask.ravel().tolist(),
            "f64": f64.ravel().tolist(),
            "f32": [float(v) for v in f32.ravel()],
            "i32": i32.ravel().tolist(),
            "i16": i16.ravel().tolist(),
        },
    )
    hdul = open_strict(path)
    assert [h.name for h in hdul] == ["PRIMARY", "F64", "F32", "I32", "I16"]
    assert hdul[0].header["NAXIS1"] == ncols and hdul[0].header["NAXIS2"] == nrows
    np.testing.assert_array_equal(hdul[0].data, mask)
    assert hdul[0].data.dtype == np.uint8
    for name, want in (("F64", f64), ("F32", f32), ("I32", i32), ("I16", i16)):
        got = hdul[name].data
        assert got.shape == (nrows, ncols) and got.dtype.newbyteorder("=") == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # exact; NaN equals NaN
        assert hdul[name].header["PCOUNT"] == 0 and hdul[name].header["GCOUNT"] == 1
    assert hdul["F64"].header["BUNIT"] == "e-/s"


def test_binary_table_columns(page, tmp_path):
    n = 7
    d = 2457000.0 + np.linspace(0, 1, n) / 3
    e = (np.arange(n, dtype=np.float32) - 3) / np.float32(3)
    e[2] = np.nan
    j = (np.arange(n, dtype=np.int32) - 3) * 400_000_001
    i = (np.arange(n, dtype=np.int16) - 3) * 9999
    b = np.arange(n, dtype=np.uint8) * 40
    path = tmp_path / "tab.fits"
    write(
        page,
        path,
        """RPTFITS.file([RPTFITS.imageHDU({primary: true}), RPTFITS.binTableHDU({extname: 'TAB', columns: [
            {name: 'D', format: 'D', unit: 'BTJD', data: a.d}, {name: 'E', format: 'E', unit: 'e-/s', data: a.e},
            {name: 'J', format: 'J', data: a.j}, {name: 'K', format: 'K', data: a.k.map(BigInt)},
            {name: 'I', format: 'I', data: a.i}, {name: 'B', format: 'B', data: a.b}],
            cards: [['TIMESYS', 'TDB', '']]})])""",
        {
            "d": d.tolist(),
            "e": [float(v) for v in e],
            "j": j.tolist(),
            "k": [GAIA_ID, "-3", "0", "1", str(2**62), str(-(2**63)), "9"],
            "i": i.tolist(),
            "b": b.tolist(),
        },
    )
    hdul = open_strict(path)
    t = hdul["TAB"]
    assert t.header["NAXIS1"] == 8 + 4 + 4 + 8 + 2 + 1 and t.header["NAXIS2"] == n and t.header["TFIELDS"] == 6
    assert t.header["TIMESYS"] == "TDB" and t.columns.units[:3] == ["BTJD", "e-/s", ""]
    np.testing.assert_array_equal(t.data["D"], d)
    np.testing.assert_array_equal(t.data["E"], e)
    assert np.isnan(t.data["E"][2]) and t.data["E"].dtype.newbyteorder("=") == np.float32
    np.testing.assert_array_equal(t.data["J"], j)
    assert t.data["J"].dtype.newbyteorder("=") == np.int32
    np.testing.assert_array_equal(t.data["K"], [int(GAIA_ID), -3, 0, 1, 2**62, -(2**63), 9])
    np.testing.assert_array_equal(t.data["I"], i)
    np.testing.assert_array_equal(t.data["B"], b)


def synthetic_wcs_cards():
    return [
        ["WCSAXES", 2, "", "int"],
        ["CTYPE1", "RA---TAN", "", "str"],
        ["CTYPE2", "DEC--TAN", "", "str"],
        ["CUNIT1", "deg", "", "str"],
        ["CUNIT2", "deg", "", "str"],
        ["CRVAL1", 84.29119, "", "float"],
        ["CRVAL2", -80.46917, "", "float"],
        ["CRPIX1", 3.0, "", "float"],
        ["CRPIX2", 4.5, "", "float"],
        ["CD1_1", -0.00574, "", "float"],
        ["CD1_2", 0.00091, "", "float"],
        ["CD2_1", 0.00088, "", "float"],
        ["CD2_2", 0.00571, "", "float"],
        ["CRVAL1P", 1024, "CCD column of the first pixel", "int"],
        ["CRVAL2P", 512, "CCD row of the first pixel", "int"],
    ]


def kepler_wcs_cards():
    """The WCS (and physical 'P') cards of a real Kepler TPF's APERTURE extension, with their Python types."""
    if not TABBY.exists():
        pytest.skip(f"{TABBY} not found")
    h = fits.getheader(TABBY, "APERTURE")
    keep = ("WCSAXES", "CTYPE", "CRPIX", "CRVAL", "CUNIT", "CDELT", "PC", "WCSNAME", "RADESYS", "EQUINOX")
    return [[k, h[k], h.comments[k], type(h[k]).__name__] for k in h if k.startswith(keep) and k != "PCOUNT"]


def export_mask(page, path, mask, cards):
    nrows, ncols = mask.shape
    write(
        page,
        path,
        """RPTFITS.apertureMask({mask: Uint8Array.from(a.mask), nrows: a.nrows, ncols: a.ncols,
            wcsCards: a.cards.map(([k, v, c, t]) => [k, t === 'float' ? RPTFITS.real(v) : v, c]),
            extraCards: [['OBJECT', 'Gaia DR3 ' + a.sid, '']]})""",
        {
            "mask": mask.astype(np.uint8).ravel().tolist(),
            "nrows": nrows,
            "ncols": ncols,
            "cards": cards,
            "sid": GAIA_ID,
        },
    )
    return open_strict(path)


@pytest.mark.parametrize("which", ["synthetic", "kepler"])
def test_aperture_mask_and_wcs(page, tmp_path, which):
    cards = synthetic_wcs_cards() if which == "synthetic" else kepler_wcs_cards()
    if which == "kepler":
        mask = (fits.getdata(TABBY, "APERTURE") & 2) > 0  # the pipeline's optimal aperture, 10 x 11
    else:
        mask = np.zeros((4, 6), dtype=bool)
        mask[1:3, 2:5] = True
        mask[0, 0] = True
    assert mask.shape[0] != mask.shape[1] and not np.array_equal(mask, mask[::-1, ::-1])
    hdul = export_mask(page, tmp_path / "mask.fits", mask, cards)
    assert [h.name for h in hdul] == ["PRIMARY", "APERTURE"] and hdul[0].header["OBJECT"] == f"Gaia DR3 {GAIA_ID}"
    ap = hdul["APERTURE"]
    assert ap.header["BITPIX"] == 16 and ap.data.dtype.kind == "i" and ap.data.shape == mask.shape
    assert set(np.unique(ap.data)) <= {0, 1}
    np.testing.assert_array_equal(ap.data.astype(bool), mask)
    for k, v, _, t in cards:
        assert ap.header[k] == v and type(ap.header[k]).__name__ == t, k

    ref = fits.Header()
    for k, v, c, _ in cards:
        ref[k] = (v, c)
    pix = np.array([[0.0, 0.0], [mask.shape[1] - 1.0, 0.0], [2.5, mask.shape[0] - 1.0], [-3.0, 17.25]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. RADESYS/EQUINOX notes from wcslib, the same for both
        got_wcs, want_wcs = WCS(ap.header), WCS(ref)
    assert list(got_wcs.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
    np.testing.assert_array_equal(got_wcs.wcs_pix2world(pix, 0), want_wcs.wcs_pix2world(pix, 0))
    sky = got_wcs.pixel_to_world(1, 2)
    assert sky.separation(want_wcs.pixel_to_world(1, 2)).arcsec < 1e-9
    if which == "synthetic":  # and not the identity: the pixel really lands on the sky where the cards say
        np.testing.assert_allclose(got_wcs.wcs_pix2world([[2.0, 3.5]], 0)[0], [84.29119, -80.46917])
    else:  # the physical CCD offsets (alternate WCS 'P') carried too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # wcslib's 'PIXEL' -> 'pixel' unit fix, the same for both
            got_p, want_p = WCS(ap.header, key="P"), WCS(ref, key="P")
        np.testing.assert_array_equal(got_p.wcs_pix2world(pix, 0), want_p.wcs_pix2world(pix, 0))
        assert got_p.wcs_pix2world([[0.0, 0.0]], 0)[0].tolist() == [ref["CRVAL1P"], ref["CRVAL2P"]]


def test_aperture_mask_works_in_lightkurve(page, tmp_path):
    lk = pytest.importorskip("lightkurve")
    if not TABBY.exists():
        pytest.skip(f"{TABBY} not found")
    tpf = lk.read(str(TABBY), quality_bitmask="none")
    assert tpf.shape[1:] == (10, 11)
    sel = np.zeros(tpf.shape[1:], dtype=bool)
    sel[2:6, 3:8] = True
    sel[8, 1] = True  # asymmetric, non-square: a transposed export could not be used at all
    hdul = export_mask(page, tmp_path / "mask.fits", sel, kepler_wcs_cards())
    mask = hdul["APERTURE"].data.astype(bool)
    np.testing.assert_array_equal(mask, sel)
    lc = tpf.to_lightcurve(aperture_mask=mask)
    pix = tpf.flux.value[:, sel]
    want = np.where(np.isnan(pix).all(axis=1), np.nan, np.nansum(pix, axis=1))  # NaN where no pixel is finite
    np.testing.assert_allclose(lc.flux.value, want, rtol=1e-6)
    assert lc.meta["APERTURE_MASK"].sum() == sel.sum()
    # the pipeline's own aperture exported and read back selects the same pixels as lightkurve's pipeline_mask
    pm = export_mask(page, tmp_path / "pm.fits", tpf.pipeline_mask, kepler_wcs_cards())["APERTURE"].data.astype(bool)
    np.testing.assert_array_equal(
        tpf.to_lightcurve(aperture_mask=pm).flux.value, tpf.to_lightcurve(aperture_mask="pipeline").flux.value
    )


def lc_inputs(mission):
    n = 40
    rng = np.random.default_rng(3)
    t0 = 1325.2934 if mission == "TESS" else 1120.5121
    time = t0 + np.arange(n) * (2 / 1440 if mission == "TESS" else 29.4244 / 1440) + rng.normal(0, 1e-9, n)
    flux = (1000 + rng.normal(0, 5, n)).astype(np.float32)
    flux[5] = np.nan
    err = np.abs(rng.normal(2, 0.1, n)).astype(np.float32)
    err[6] = np.nan
    quality = np.zeros(n, dtype=np.int32)
    quality[[3, 17]] = [128, 4096 + 1]
    cadenceno = np.arange(n, dtype=np.int32) + 104_512
    return time, flux, err, quality, cadenceno


@pytest.mark.parametrize("mission", ["TESS", "Kepler", "K2"])
def test_lightcurve_read_by_astropy_and_lightkurve(page, tmp_path, mission):
    time, flux, err, quality, cadenceno = lc_inputs(mission)
    offset = 2457000.0 if mission == "TESS" else 2454833.0
    path = tmp_path / "lc.fits"
    write(
        page,
        path,
        """RPTFITS.lightcurve({mission: a.mission, sourceId: a.sid, method: 'LFD', time: a.time,
            cadenceno: a.cad, flux: a.flux, flux_err: a.err, quality: a.q, extraCards: [['SECTOR', 1, 'sector']]})""",
        {"mission": mission, **js_series(time, cadenceno, flux, err, quality)},
    )
    hdul = open_strict(path)
    h0, t = hdul[0].header, hdul["LIGHTCURVE"]
    assert h0["TELESCOP"] == ("TESS" if mission == "TESS" else "Kepler") and h0["MISSION"] == mission
    assert h0["INSTRUME"] == ("TESS Photometer" if mission == "TESS" else "Kepler Photometer")
    assert h0["OBJECT"] == f"Gaia DR3 {GAIA_ID}" and h0["GAIAID"] == int(GAIA_ID) and h0["METHOD"] == "LFD"
    assert h0["SECTOR"] == 1
    th = t.header
    assert th["TIMEREF"] == "SOLARSYSTEM" and th["TIMESYS"] == "TDB" and th["TIMEUNIT"] == "d"
    assert th["BJDREFI"] == int(offset) and type(th["BJDREFF"]) is float and th["BJDREFF"] == 0.0
    assert type(th["TELAPSE"]) is float and th["TELAPSE"] == time.max() - time.min()
    assert th["OBJECT"] == h0["OBJECT"]
    assert t.columns.names == ["TIME", "CADENCENO", "FLUX", "FLUX_ERR", "QUALITY"]
    assert t.columns.formats == ["D", "J", "E", "E", "J"]
    assert t.columns.units == [("BTJD" if mission == "TESS" else "BKJD"), "", "e-/s", "e-/s", ""]
    np.testing.assert_array_equal(t.data["TIME"], time)
    np.testing.assert_array_equal(t.data["FLUX"], flux)
    np.testing.assert_array_equal(t.data["QUALITY"], quality)
    np.testing.assert_array_equal(t.data["CADENCENO"], cadenceno)

    lk = pytest.importorskip("lightkurve")
    lc = lk.read(str(path))  # no CREATOR keyword: lightkurve's generic reader, as for the pipeline's files
    assert lc.time.format == ("btjd" if mission == "TESS" else "bkjd")
    np.testing.assert_array_equal(lc.time.value, time)
    np.testing.assert_array_equal(lc.flux.value, flux)  # NaN where NaN was passed
    np.testing.assert_array_equal(lc.flux_err.value, err)
    np.testing.assert_array_equal(lc.quality.value, quality)
    np.testing.assert_array_equal(lc.cadenceno.value, cadenceno)
    assert str(lc.flux.unit) == "electron / s"
    assert lc.meta["OBJECT"] == f"Gaia DR3 {GAIA_ID}" and lc.meta["TELESCOP"] == h0["TELESCOP"]


def test_lightcurve_matches_the_pipeline_layout(page, tmp_path):
    """Same HDUs, keywords, columns, units and values as workflow_lib.data.lightcurves.lightcurve_hdulist."""
    xr = pytest.importorskip("xarray")
    from workflow_lib.data.lightcurves import lightcurve_hdulist

    time, flux, err, quality, cadenceno = lc_inputs("TESS")
    ds = xr.Dataset(
        {
            "flux": (("source", "time"), flux[None].astype(np.float64)),
            "flux_err": (("source", "time"), err[None].astype(np.float64)),
            "quality": ("time", quality),
            "cadenceno": ("time", cadenceno),
        },
        coords={"time": time, "source_id": ("source", [int(GAIA_ID)])},
        attrs={"mission": "TESS", "method": "LFD", "time_system": "BTJD", "time_offset": 2457000.0},
    )
    want = lightcurve_hdulist(ds, 0)
    path = tmp_path / "lc.fits"
    write(
        page,
        path,
        """RPTFITS.lightcurve({mission: 'TESS', sourceId: a.sid, method: 'LFD', timeSystem: 'BTJD',
            timeOffset: 2457000, time: a.time, cadenceno: a.cad, flux: a.flux, flux_err: a.err, quality: a.q})""",
        js_series(time, cadenceno, flux, err, quality),
    )
    got = open_strict(path)
    assert [h.name for h in got] == [h.name for h in want]
    for g, w in zip(got, want):
        assert list(g.header.keys()) == list(w.header.keys())
        for k in w.header:
            if k != "COMMENT":
                assert g.header[k] == w.header[k] and type(g.header[k]) is type(w.header[k]), k
    assert got[1].columns.formats == want[1].columns.formats and got[1].columns.units == want[1].columns.units
    for name in want[1].columns.names:
        np.testing.assert_array_equal(got[1].data[name], want[1].data[name], err_msg=name)

    # no source id: the object label is used as given
    write(page, path, "RPTFITS.lightcurve({object: 'my target', time: [1, 2.5], flux: [3, NaN]})")
    h = open_strict(path)
    assert h[0].header["OBJECT"] == "my target" and "GAIAID" not in h[0].header
    assert h[1].header["TELAPSE"] == 1.5 and list(h[1].data["QUALITY"]) == [0, 0]
    assert list(h[1].data["CADENCENO"]) == [0, 1] and np.isnan(h[1].data["FLUX"][1])
