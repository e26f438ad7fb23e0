"""Read real mission FITS files into the cube format (:mod:`workflow_lib.data.cube`).

Supported inputs
----------------
* TESScut (astrocut) cubes: PRIMARY, ``PIXELS`` bintable, ``APERTURE`` image with the stamp WCS
  (old and new astrocut versions; an empty ``SECTOR`` keyword is taken from the file name
  ``tess-sSSSS-C-D_...``).
* TESS SPOC target pixel files (``PIXELS`` + ``APERTURE``).
* Kepler and K2 target pixel files (``TARGETTABLES`` + ``APERTURE`` with the pipeline mask bits).
* A Kepler FFI (crop) image (one channel, one epoch): read as a 1-cadence cube.

Conventions (see ``docs/DATA_MODEL.md``): flux in e-/s, time in BTJD/BKJD (TDB), ``row``/``column``
are CCD coordinates of pixel centres (``2CRV5P``/``1CRV5P`` of the pixel table, or
``CRVAL2P``/``CRVAL1P`` of the APERTURE HDU, plus the 0-based index), and ``attrs['wcs']`` is the
celestial WCS header string that maps 0-based (column index, row index) to the sky.

Public API: :func:`read_fits_cube`, :func:`read_field`, :func:`validate_for_modelling`,
:func:`local_files`, :func:`select_channel_files`, :func:`write_local_field`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import file_sha256, provenance_json
from workflow_lib.data.cube import (  # noqa: F401  (validate_for_modelling and the minimum sizes: public here too)
    MIN_CADENCES,
    MIN_PIXELS,
    TIME_SYSTEMS,
    CubeError,
    concat_stamps,
    make_cube,
    n_pixels,
    validate_for_modelling,
    wcs_to_header_string,
    write_zarr_atomic,
)

log = get_logger("fitsio")

#: log reading progress every this many files (a Kepler channel field has ~1000-2000 TPFs)
PROGRESS_EVERY = 100
#: how many skipped file names one log line spells out
NAMES_SHOWN = 20

#: per-target attributes of a single stamp; in a joined pixel table they live in attrs['stamps']
TARGET_ATTRS = ("target_id", "object", "ra_obj", "dec_obj", "target_mag", "aperture_npix", "source_file", "product")

_TESS_NAME = re.compile(r"tess-s(\d{4})-(\d)-(\d)")
_TESS_SPOC_NAME = re.compile(r"tess\d{13}-s(\d{4})-")


# ------------------------------------------------------------------ header helpers


def _kw(headers, key, default=None):
    """First non-empty value of ``key`` in a sequence of headers (astropy gives '' / Undefined for blanks)."""
    for h in headers:
        if h is None or key not in h:
            continue
        v = h[key]
        if v is None or isinstance(v, fits.card.Undefined):
            continue
        if isinstance(v, str):
            v = v.strip()
            if v == "":
                continue
        return v
    return default


def _int_or_none(v):
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _float_or_none(v):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _mission(primary: fits.Header, path) -> str:
    telescop = str(_kw([primary], "TELESCOP", "")).upper()
    mission = str(_kw([primary], "MISSION", "")).upper()
    if telescop == "TESS" or mission == "TESS":
        return "TESS"
    if telescop == "KEPLER" or mission in ("KEPLER", "K2"):
        if mission == "K2" or _kw([primary], "CAMPAIGN") is not None:
            return "K2"
        return "Kepler"
    raise CubeError(
        f"{path}: unknown mission (TELESCOP={telescop!r}, MISSION={mission!r}); expected TESS, Kepler or K2"
    )


def _check_time_system(headers, mission: str, path) -> None:
    """Refuse files whose TIME column is not in the mission's BTJD/BKJD TDB system."""
    _, offset = TIME_SYSTEMS[mission]
    bjdrefi = _kw(headers, "BJDREFI")
    bjdreff = _kw(headers, "BJDREFF", 0.0)
    if bjdrefi is not None and abs(float(bjdrefi) + float(bjdreff) - offset) > 1e-6:
        raise CubeError(
            f"{path}: time reference BJDREFI+BJDREFF={float(bjdrefi) + float(bjdreff)} "
            f"differs from the {mission} convention {offset}"
        )
    timesys = _kw(headers, "TIMESYS")
    if timesys is not None and str(timesys).upper() != "TDB":
        raise CubeError(f"{path}: TIMESYS={timesys!r}; expected TDB")


def _wcs_from_table_keywords(theader: fits.Header, ncol: int) -> fits.Header | None:
    """Image WCS of a bintable image column (``1CTYP5``, ``1CRVL5``, ``11PC5``...) as a plain header."""
    n = ncol
    mapping = {
        f"1CTYP{n}": "CTYPE1",
        f"2CTYP{n}": "CTYPE2",
        f"1CRVL{n}": "CRVAL1",
        f"2CRVL{n}": "CRVAL2",
        f"1CRPX{n}": "CRPIX1",
        f"2CRPX{n}": "CRPIX2",
        f"1CDLT{n}": "CDELT1",
        f"2CDLT{n}": "CDELT2",
        f"1CUNI{n}": "CUNIT1",
        f"2CUNI{n}": "CUNIT2",
        f"11PC{n}": "PC1_1",
        f"12PC{n}": "PC1_2",
        f"21PC{n}": "PC2_1",
        f"22PC{n}": "PC2_2",
        f"11CD{n}": "CD1_1",
        f"12CD{n}": "CD1_2",
        f"21CD{n}": "CD2_1",
        f"22CD{n}": "CD2_2",
    }
    if f"1CTYP{n}" not in theader:
        return None
    h = fits.Header()
    h["WCSAXES"] = 2
    for src, dst in mapping.items():
        if src in theader and not isinstance(theader[src], fits.card.Undefined):
            h[dst] = theader[src]
    for key in ("RADESYS", "EQUINOX"):
        if key in theader:
            h[key] = theader[key]
    return h


def _celestial_wcs_string(header: fits.Header | None, path) -> str:
    """Celestial WCS header string of an image header ('' when it has none)."""
    if header is None or "CTYPE1" not in header:
        return ""
    ctype1 = str(header["CTYPE1"]).upper()
    if not ctype1.startswith("RA"):
        return ""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = WCS(header, naxis=2, relax=True).celestial
    except Exception as exc:  # astropy raises several kinds
        raise CubeError(f"{path}: cannot build the WCS of the stamp ({exc})") from exc
    if not w.has_celestial:
        return ""
    return wcs_to_header_string(w)


def _find_pixel_table(hdul):
    for hdu in hdul[1:]:
        if isinstance(hdu, fits.BinTableHDU) and hdu.name in ("PIXELS", "TARGETTABLES"):
            return hdu
    for hdu in hdul[1:]:
        if isinstance(hdu, fits.BinTableHDU) and "FLUX" in hdu.columns.names and "TIME" in hdu.columns.names:
            return hdu
    return None


def _find_hdu(hdul, name):
    for hdu in hdul:
        if hdu.name == name:
            return hdu
    return None


def _sector_from_name(path):
    m = _TESS_NAME.search(Path(path).name)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = _TESS_SPOC_NAME.search(Path(path).name)
    if m:
        return int(m.group(1)), None, None
    return None, None, None


def _target_attrs(primary, mission: str) -> dict:
    out = {}
    idkey = "TICID" if mission == "TESS" else "KEPLERID"
    tid = _int_or_none(_kw([primary], idkey))
    if tid is not None and tid > 0:
        out["target_id"] = tid
    obj = _kw([primary], "OBJECT")
    if obj is not None:
        out["object"] = str(obj)
    ra = _float_or_none(_kw([primary], "RA_OBJ"))
    dec = _float_or_none(_kw([primary], "DEC_OBJ"))
    if ra is not None and dec is not None:
        out["ra_obj"], out["dec_obj"] = ra, dec
    mag = _float_or_none(_kw([primary], "TESSMAG" if mission == "TESS" else "KEPMAG"))
    if mag is not None and mag != 0.0:  # astrocut writes TESSMAG = 0.0 for "unknown"
        out["target_mag"] = mag
    return out


def _mission_attrs(primary, headers, mission: str, path) -> dict:
    out = {}
    if mission == "TESS":
        sector = _int_or_none(_kw([primary, *headers], "SECTOR"))
        camera = _int_or_none(_kw([primary, *headers], "CAMERA"))
        ccd = _int_or_none(_kw([primary, *headers], "CCD"))
        fs, fc, fd = _sector_from_name(path)
        sector = sector if sector is not None else fs
        camera = camera if camera is not None else fc
        ccd = ccd if ccd is not None else fd
        if sector is None:
            raise CubeError(f"{path}: TESS file without a SECTOR keyword and no 'tess-sNNNN-' in its name")
        out["sector"] = sector
        if camera is not None:
            out["camera"] = camera
        if ccd is not None:
            out["ccd"] = ccd
    else:
        key = "CAMPAIGN" if mission == "K2" else "QUARTER"
        val = _int_or_none(_kw([primary, *headers], key))
        if val is None:
            raise CubeError(f"{path}: {mission} file without a {key} keyword")
        out[key.lower()] = val
        channel = _int_or_none(_kw([primary, *headers], "CHANNEL"))
        if channel is None:
            raise CubeError(f"{path}: {mission} file without a CHANNEL keyword")
        out["channel"] = channel
        for key in ("MODULE", "OUTPUT"):
            v = _int_or_none(_kw([primary, *headers], key))
            if v is not None:
                out[key.lower()] = v
    return out


# ------------------------------------------------------------------ readers


def read_fits_cube(path) -> xr.Dataset:
    """Read one TESScut cube, TESS SPOC TPF, Kepler/K2 TPF or Kepler FFI crop as an image cube.

    Cadences with a NaN time stamp are dropped (logged). Raises :class:`CubeError` naming the file
    when it cannot be read or is not one of the supported products.
    """
    path = Path(path)
    if not path.is_file():
        raise CubeError(f"{path}: no such file")
    try:
        hdul = fits.open(path, memmap=False)
    except Exception as exc:  # OSError, TypeError, ... for non-FITS / truncated files
        raise CubeError(f"{path}: not a readable FITS file ({exc})") from exc
    try:
        try:
            table = _find_pixel_table(hdul)
            if table is None:
                image = _find_ffi_image(hdul)
                if image is not None:
                    return _read_kepler_ffi(hdul, image, path)
                raise CubeError(
                    f"{path}: not a target pixel file or TESScut cube "
                    f"(no PIXELS/TARGETTABLES table with TIME and FLUX columns, no FFI image)"
                )
            return _read_tpf(hdul, table, path)
        except CubeError:
            raise
        except Exception as exc:  # corrupt data inside a valid-looking file
            raise CubeError(f"{path}: cannot read pixel data ({type(exc).__name__}: {exc})") from exc
    finally:
        hdul.close()


def _tpf_arrays(data, names: list[str], ap_hdu, primary, theader, path: Path) -> dict:
    """TIME, FLUX, FLUX_ERR, FLUX_BKG (or None), QUALITY and cadence numbers of a pixel table, the images
    shaped (time, row, column) (with the APERTURE image's shape when the table has no TDIM)."""
    time = np.asarray(data["TIME"], dtype=np.float64)
    flux = np.asarray(data["FLUX"], dtype=np.float32)
    flux_err = np.asarray(data["FLUX_ERR"], dtype=np.float32)
    if flux.ndim == 2:  # no TDIM: (time, npix); reshape with the APERTURE image
        if ap_hdu is None or ap_hdu.data is None or ap_hdu.data.size != flux.shape[1]:
            raise CubeError(f"{path}: FLUX column has no image shape (TDIM) and no matching APERTURE image")
        shape = ap_hdu.data.shape
        flux = flux.reshape(-1, *shape)
        flux_err = flux_err.reshape(-1, *shape)
    if flux.ndim != 3 or flux.shape[0] != time.size:
        raise CubeError(f"{path}: FLUX column has shape {flux.shape}; expected (time, row, column)")
    nt = flux.shape[0]
    flux_err = flux_err.reshape(flux.shape)
    background = None
    if "FLUX_BKG" in names:
        background = np.asarray(data["FLUX_BKG"], dtype=np.float32).reshape(flux.shape)
    quality = np.asarray(data["QUALITY"], dtype=np.int64).astype(np.int32)
    cadenceno = np.asarray(data["CADENCENO"], dtype=np.int64) if "CADENCENO" in names else None
    if cadenceno is None or (nt > 1 and not np.all(np.diff(cadenceno) > 0)):
        # astrocut writes CADENCENO = 0 for every frame: number the frames (consecutive FFIs)
        # from FFIINDEX, the FFI index of the cube's first frame, when the header has it
        base = _int_or_none(_kw([primary, theader], "FFIINDEX")) or 0
        log.info("%s: CADENCENO missing or not increasing; numbering the %d frames from %d", path, nt, base)
        cadenceno = base + np.arange(nt, dtype=np.int64)
    return dict(time=time, flux=flux, flux_err=flux_err, background=background, quality=quality, cadenceno=cadenceno)


def _tpf_ccd_position(theader, fcol: int, ap_header, table_name: str, nrow: int, ncol: int, path: Path):
    """CCD (row, column) of every stamp pixel: physical WCS of the FLUX image column, or of APERTURE."""
    col0 = _int_or_none(_kw([theader], f"1CRV{fcol}P"))
    row0 = _int_or_none(_kw([theader], f"2CRV{fcol}P"))
    if (col0 is None or row0 is None) and ap_header is not None:
        col0 = _int_or_none(_kw([ap_header], "CRVAL1P"))
        row0 = _int_or_none(_kw([ap_header], "CRVAL2P"))
    if col0 is None or row0 is None:
        raise CubeError(
            f"{path}: no CCD position of the stamp (neither 1CRV{fcol}P/2CRV{fcol}P "
            f"in {table_name} nor CRVAL1P/CRVAL2P in APERTURE)"
        )
    # the physical WCS reference pixel is 1 (FITS) = index 0 in every product we know of
    crpix_c = _float_or_none(_kw([theader], f"1CRP{fcol}P")) or 1.0
    crpix_r = _float_or_none(_kw([theader], f"2CRP{fcol}P")) or 1.0
    column = col0 + np.arange(ncol) - (int(round(crpix_c)) - 1)
    row = row0 + np.arange(nrow) - (int(round(crpix_r)) - 1)
    return row, column


#: a header target this many pixels outside its own stamp means the WCS or the target keywords are wrong
MAX_TARGET_OFFSET_PX = 10.0


def _check_stamp_position(row, column, wcs: str, attrs: dict, keys: str, path: Path) -> None:
    """Refuse a stamp whose position keywords contradict themselves: CCD rows or columns below 0 (no detector
    pixel; ``keys`` name the keywords), or a header target (RA_OBJ/DEC_OBJ) that the stamp's own WCS puts
    more than ``MAX_TARGET_OFFSET_PX`` pixels outside the stamp (a cutout is centred on its target)."""
    if row.min() < 0 or column.min() < 0:
        raise CubeError(
            f"{path}: the stamp's first CCD row / column is {int(row.min())} / {int(column.min())} ({keys}): "
            "no detector has negative pixel coordinates; the file's position keywords are wrong"
        )
    if not wcs or "ra_obj" not in attrs or min(row.size, column.size) < 2:
        return  # (astrocut fits a 1-pixel stamp's WCS from that pixel alone: degenerate, not checkable)
    import warnings

    from astropy.coordinates import SkyCoord

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = WCS(fits.Header.fromstring(wcs, sep="\n"))
        target = SkyCoord(attrs["ra_obj"], attrs["dec_obj"], unit="deg")
        x, y = (float(v) for v in w.world_to_pixel(target))
        centre = w.pixel_to_world((column.size - 1) / 2, (row.size - 1) / 2)
    if not (np.isfinite(x) and np.isfinite(y)):
        return
    dx = max(0.0, -0.5 - x, x - (column.size - 0.5))
    dy = max(0.0, -0.5 - y, y - (row.size - 0.5))
    off = float(np.hypot(dx, dy))
    if off > MAX_TARGET_OFFSET_PX:
        raise CubeError(
            f"{path}: its WCS puts the header target (RA_OBJ, DEC_OBJ = {attrs['ra_obj']:.5f}, {attrs['dec_obj']:.5f}) "
            f"{off:.0f} px outside the {row.size} x {column.size} stamp, {centre.separation(target).deg:.2f} deg from "
            "its centre: the WCS or the target keywords are wrong"
        )


def _tpf_aperture(ap_hdu, nrow: int, ncol: int, path: Path):
    """The pipeline aperture bits (zeros when the file has no APERTURE image)."""
    if ap_hdu is not None and ap_hdu.data is not None:
        aperture = np.asarray(ap_hdu.data, dtype=np.int32)
        if aperture.shape != (nrow, ncol):
            raise CubeError(f"{path}: APERTURE image has shape {aperture.shape}, pixels are {(nrow, ncol)}")
        return aperture
    return np.zeros((nrow, ncol), dtype=np.int32)


def _drop_nan_times(arrays: dict, path: Path) -> dict:
    """``arrays`` without the cadences whose time stamp is NaN (logged); an error when none is left."""
    good = np.isfinite(arrays["time"])
    nt = good.size
    if not good.any():
        raise CubeError(f"{path}: every cadence has a NaN time stamp; no usable data")
    if good.all():
        return arrays
    log.info("%s: dropping %d of %d cadences with NaN time", path, int((~good).sum()), nt)
    return {k: (v[good] if v is not None else None) for k, v in arrays.items()}


def _tpf_attrs(primary, theader, table, mission: str, aperture, path: Path) -> dict:
    """Cube attrs of a pixel-table product: source file, product kind, mission and target keywords."""
    product = {"TESS": "spoc_tpf", "Kepler": "kepler_tpf", "K2": "k2_tpf"}[mission]
    if (
        str(_kw([primary], "CREATOR", "")).lower().startswith("astrocut")
        or table.header.get("TTYPE12", "") == "FFI_FILE"
    ):
        product = "tesscut"
    attrs = {"source_file": str(path), "product": product, "pixel_table_hdu": table.name}
    attrs.update(_mission_attrs(primary, [theader], mission, path))
    attrs.update(_target_attrs(primary, mission))
    timedel = _float_or_none(_kw([theader], "TIMEDEL"))
    if timedel:
        attrs["cadence_minutes"] = round(timedel * 1440.0, 6)
    procver = _kw([primary], "PROCVER")
    if procver is not None:
        attrs["procver"] = str(procver)
    attrs["aperture_npix"] = int(((aperture & 2) > 0).sum())
    backapp = _kw([theader], "BACKAPP")
    if backapp is not None:  # the mission pipeline subtracted its background (FLUX_BKG) from FLUX
        attrs["background_subtracted"] = int(bool(backapp) and str(backapp).strip().upper() not in ("F", "0", "0.0"))
    return attrs


def _read_tpf(hdul, table: fits.BinTableHDU, path: Path) -> xr.Dataset:
    primary = hdul[0].header
    theader = table.header
    mission = _mission(primary, path)
    _check_time_system([theader, primary], mission, path)
    names = [n.upper() for n in table.columns.names]
    for need in ("TIME", "FLUX", "FLUX_ERR", "QUALITY"):
        if need not in names:
            raise CubeError(f"{path}: pixel table {table.name} has no {need} column")
    ap_hdu = _find_hdu(hdul, "APERTURE")
    ap_header = ap_hdu.header if ap_hdu is not None else None
    arrays = _tpf_arrays(table.data, names, ap_hdu, primary, theader, path)
    nrow, ncol = arrays["flux"].shape[1:]
    fcol = names.index("FLUX") + 1
    row, column = _tpf_ccd_position(theader, fcol, ap_header, table.name, nrow, ncol, path)

    # celestial WCS of the stamp: APERTURE image header, else the FLUX column keywords
    wcs = _celestial_wcs_string(ap_header, path)
    if not wcs:
        wcs = _celestial_wcs_string(_wcs_from_table_keywords(theader, fcol), path)
    if not wcs:
        log.warning("%s: no celestial WCS found; attrs['wcs'] is empty", path)

    aperture = _tpf_aperture(ap_hdu, nrow, ncol, path)
    arrays = _drop_nan_times(arrays, path)
    attrs = _tpf_attrs(primary, theader, table, mission, aperture, path)
    _check_stamp_position(row, column, wcs, attrs, f"2CRV{fcol}P/1CRV{fcol}P", path)
    ds = make_cube(
        arrays["flux"],
        arrays["flux_err"],
        arrays["quality"],
        arrays["time"],
        arrays["cadenceno"],
        row,
        column,
        mission=mission,
        wcs_header=wcs,
        background=arrays["background"],
        attrs=attrs,
    )
    ds["aperture"] = (
        ("row", "column"),
        aperture,
        {
            "long_name": "pipeline aperture bit flags",
            "flag_meanings": "1=collected 2=optimal_aperture 4=background 8=flux_weighted_centroid",
        },
    )
    product = attrs["product"]
    log.info("%s: %s %s, %d cadences x %d x %d pixels", path, mission, product, ds.sizes["time"], nrow, ncol)
    return ds


def _find_ffi_image(hdul):
    """The first 2-D image extension of a Kepler FFI (crop); None for other files."""
    primary = hdul[0].header
    is_ffi = (
        "FFI" in str(_kw([primary], "DCT_TYPE", "")).upper()
        or "FULL FRAME" in str(_kw([primary], "OBSMODE", "")).upper()
    )
    if not is_ffi:
        return None
    for hdu in hdul[1:]:
        if isinstance(hdu, fits.ImageHDU) and hdu.data is not None and hdu.data.ndim == 2:
            return hdu
    return None


def _read_kepler_ffi(hdul, image: fits.ImageHDU, path: Path) -> xr.Dataset:
    """One channel of a Kepler FFI (or a crop of it) as a 1-cadence cube.

    FFIs carry no uncertainties: ``flux_err`` is the shot-noise + read-noise estimate
    ``sqrt(max(f, 0) * t + NREADOUT * READNOIS**2) / t`` with ``t`` the exposure in seconds.
    """
    primary = hdul[0].header
    h = image.header
    mission = _mission(primary, path)
    if mission not in ("Kepler", "K2"):
        raise CubeError(f"{path}: full-frame images are only supported for Kepler/K2 (got {mission})")
    _check_time_system([h, primary], mission, path)
    img = np.asarray(image.data, dtype=np.float32)
    nrow, ncol = img.shape
    tstart, tstop = _float_or_none(_kw([h], "TSTART")), _float_or_none(_kw([h], "TSTOP"))
    if tstart is None or tstop is None:
        raise CubeError(f"{path}: FFI image {image.name} has no TSTART/TSTOP")
    col0 = _int_or_none(_kw([h], "CRVAL1P"))
    row0 = _int_or_none(_kw([h], "CRVAL2P"))
    if col0 is None or row0 is None:
        raise CubeError(f"{path}: FFI image {image.name} has no CRVAL1P/CRVAL2P (CCD position)")
    exposure_s = (_float_or_none(_kw([h], "EXPOSURE")) or (tstop - tstart)) * 86400.0
    readnoise = _float_or_none(_kw([h], "READNOIS")) or 0.0
    nread = _float_or_none(_kw([h], "NREADOUT")) or 1.0
    err = np.sqrt(np.clip(img, 0, None) * exposure_s + nread * readnoise**2) / exposure_s
    attrs = {"source_file": str(path), "product": "kepler_ffi", "image_hdu": image.name}
    attrs.update(_mission_attrs(primary, [h], mission, path))
    wcs = _celestial_wcs_string(h, path)
    ds = make_cube(
        img[None],
        err[None].astype(np.float32),
        np.zeros(1, np.int32),
        [0.5 * (tstart + tstop)],
        [0],
        row0 + np.arange(nrow),
        col0 + np.arange(ncol),
        mission=mission,
        wcs_header=wcs,
        attrs=attrs,
    )
    ds["aperture"] = (("row", "column"), np.zeros((nrow, ncol), np.int32), {"long_name": "pipeline aperture bit flags"})
    log.info("%s: %s FFI image %s, 1 epoch, %d x %d pixels", path, mission, image.name, nrow, ncol)
    return ds


# ------------------------------------------------------------------ checks and fields


def _group_key(ds: xr.Dataset) -> tuple:
    a = ds.attrs
    if a["mission"] == "TESS":
        return ("TESS", a.get("sector"), a.get("camera"), a.get("ccd"))
    return (a["mission"], a.get("quarter", a.get("campaign")), a.get("channel"))


def _describe_key(key: tuple) -> str:
    if key[0] == "TESS":
        return f"TESS sector {key[1]} camera {key[2]} CCD {key[3]}"
    return f"{key[0]} {'campaign' if key[0] == 'K2' else 'quarter'} {key[1]} channel {key[2]}"


def read_field(files) -> xr.Dataset:
    """Read one field: a single file -> image cube; several TPFs of one channel -> pixel-table cube.

    The stamps must share mission, quarter/campaign/sector, channel (camera/CCD) and cadences.
    """
    files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not files:
        raise CubeError("read_field: no input files")
    if len(files) == 1:
        return read_fits_cube(files[0])
    stamps = []
    for k, f in enumerate(files, 1):
        stamps.append(read_fits_cube(f))  # a file that cannot be read is an error naming it
        if len(files) >= PROGRESS_EVERY and (k % PROGRESS_EVERY == 0 or k == len(files)):
            log.info("read %d of %d files", k, len(files))
    for f, st in zip(files, stamps):
        if st.attrs.get("product") in ("kepler_ffi", "tesscut"):
            raise CubeError(
                f"{f}: a {st.attrs['product']} cannot be joined with other files; use it as a field of its own"
            )
    key0 = _group_key(stamps[0])
    for f, st in zip(files[1:], stamps[1:]):
        key = _group_key(st)
        if key != key0:
            raise CubeError(
                f"{f}: is {_describe_key(key)}, but {files[0]} is {_describe_key(key0)}; "
                f"one field holds the stamps of one channel and quarter only"
            )
    cad0 = stamps[0]["cadenceno"].values
    for f, st in zip(files[1:], stamps[1:]):
        cad = st["cadenceno"].values
        if cad.shape != cad0.shape or not np.array_equal(cad, cad0):
            raise CubeError(
                f"{f}: has {cad.size} cadences ({cad[:1]}..{cad[-1:]}), different from {files[0]} "
                f"({cad0.size} cadences, {cad0[:1]}..{cad0[-1:]})"
            )
        if not np.allclose(st["time"].values, stamps[0]["time"].values, atol=1e-4, equal_nan=True):
            raise CubeError(f"{f}: time stamps differ from those of {files[0]} at equal cadence numbers")
    # quality flags are per target; keep the union of the bits of all stamps
    quality = np.bitwise_or.reduce(np.stack([st["quality"].values for st in stamps]), axis=0)
    out = concat_stamps(stamps)
    out["quality"] = ("time", quality.astype(np.int32), dict(stamps[0]["quality"].attrs))
    for k in TARGET_ATTRS:  # stamp 0's target is not the field's target; all are in attrs['stamps']
        out.attrs.pop(k, None)
    out.attrs["source_files"] = json.dumps([str(f) for f in files])
    log.info(
        "joined %d stamps (%s) into a pixel table of %d pixels x %d cadences",
        len(stamps),
        _describe_key(key0),
        out.sizes["pixel"],
        out.sizes["time"],
    )
    return out


def tpf_channel_key(path) -> dict:
    """Mission, quarter (Kepler) or campaign (K2) and CHANNEL of a FITS file, from its primary header only
    (no pixel data is read: cheap for the ~2000 TPFs of a channel). Missing keywords are None."""
    path = Path(path)
    try:
        h = fits.getheader(path, 0)
    except Exception as exc:  # OSError, TypeError, ... for non-FITS / truncated files
        raise CubeError(f"{path}: not a readable FITS file ({exc})") from exc
    quarter, campaign = _int_or_none(h.get("QUARTER")), _int_or_none(h.get("CAMPAIGN"))
    mission = "K2" if campaign is not None else ("Kepler" if quarter is not None else h.get("TELESCOP"))
    return {"mission": mission, "quarter": quarter, "campaign": campaign, "channel": _int_or_none(h.get("CHANNEL"))}


def _describe_names(paths) -> str:
    names = [Path(p).name for p in paths]
    more = len(names) - NAMES_SHOWN
    return ", ".join(names[:NAMES_SHOWN]) + (f" ... and {more} more" if more > 0 else "")


def select_channel_files(files, *, channel: int, quarter=None, campaign=None, what: str = "field") -> list[Path]:
    """The Kepler/K2 TPFs among ``files`` that lie on ``channel`` (and ``quarter`` / ``campaign`` when given).

    A channel field may point at a directory that also holds other files (a whole quarter's download,
    FFIs): TPFs of other channels or quarters/campaigns, and readable FITS files that are not Kepler/K2
    TPFs (no CHANNEL keyword in the primary header), are skipped, each kind with one warning naming
    the files. A file that is not readable FITS, and a selection that keeps no file, are errors naming them.
    """
    if quarter is not None and campaign is not None:
        raise CubeError(f"{what}: give quarter (Kepler) or campaign (K2), not both")
    want = f"channel {int(channel)}"
    if quarter is not None:
        want = f"Kepler quarter {int(quarter)} {want}"
    elif campaign is not None:
        want = f"K2 campaign {int(campaign)} {want}"
    keep, other, not_tpf, found = [], [], [], {}
    for f in files:
        key = tpf_channel_key(f)  # an unreadable file raises, naming it
        if key["channel"] is None or (key["quarter"] is None and key["campaign"] is None):
            not_tpf.append(Path(f))
            continue
        ok = key["channel"] == int(channel)
        if quarter is not None:
            ok = ok and key["quarter"] == int(quarter)
        if campaign is not None:
            ok = ok and key["campaign"] == int(campaign)
        period = f"Q{key['quarter']}" if key["campaign"] is None else f"C{key['campaign']}"
        found[f"{period} ch{key['channel']}"] = found.get(f"{period} ch{key['channel']}", 0) + 1
        (keep if ok else other).append(Path(f))
    n = len(keep) + len(other) + len(not_tpf)
    if other:
        log.warning(
            "%s is %s: skipping %d of %d files, TPFs of other channels or quarters/campaigns: %s",
            what,
            want,
            len(other),
            n,
            _describe_names(other),
        )
    if not_tpf:
        log.warning(
            "%s is %s: skipping %d of %d files, not Kepler/K2 target pixel files (no CHANNEL/QUARTER/CAMPAIGN): %s",
            what,
            want,
            len(not_tpf),
            n,
            _describe_names(not_tpf),
        )
    if not keep:
        summary = ", ".join(f"{k} x{c}" for k, c in sorted(found.items())) or "no Kepler/K2 TPF"
        raise CubeError(f"{what}: no target pixel file of {want} among {n} file(s) (found: {summary})")
    log.info("%s: %d TPFs of %s", what, len(keep), want)
    return keep


def local_files(local_params: dict) -> list[Path]:
    """The FITS files of a ``source: local`` field (``files``, all ``*.fits[.gz]`` of ``directory``, and/or
    the files matching ``glob``)."""
    import glob as _glob

    files = [Path(f) for f in (local_params.get("files") or [])]
    pattern = local_params.get("glob")
    if pattern:
        found = sorted(Path(p) for p in _glob.glob(str(pattern)) if Path(p).is_file())
        if not found:
            raise CubeError(f"{pattern}: local.glob matches no file")
        files.extend(found)
    directory = local_params.get("directory")
    if directory:
        d = Path(directory)
        if not d.is_dir():
            raise CubeError(f"{d}: local.directory is not a directory")
        found = sorted(list(d.glob("*.fits")) + list(d.glob("*.fits.gz")))
        if not found:
            raise CubeError(f"{d}: no *.fits files in local.directory")
        files.extend(found)
    if not files:
        raise CubeError("local field: give `files`, `directory` or `glob`")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CubeError(f"local field: no such file(s): {', '.join(missing)}")
    seen, unique = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique


def write_cube_with_provenance(ds: xr.Dataset, files, out_cube, *, field: str, step: str, config: dict) -> Path:
    """Add field name and provenance (inputs with checksums, versions, config) to attrs; write atomically."""
    files = [Path(f) for f in files]
    ds.attrs["field"] = field
    ds.attrs["provenance"] = provenance_json(
        step,
        inputs=files,
        config=config,
        field=field,
        input_sha256={str(f): file_sha256(f) for f in files},
    )
    try:
        validate_for_modelling(ds, field)
    except CubeError as exc:
        log.warning("field %s is written, but later steps will refuse it: %s", field, exc)
    out = write_zarr_atomic(ds, out_cube)
    log.info("wrote %s", out)
    return out


def write_local_field(local_params: dict, out_cube, field: str) -> Path:
    """``download_local``: read the field's FITS files and write the cube store ``out_cube``."""
    files = local_files(local_params)
    if local_params.get("channel") is not None:  # a Kepler/K2 channel field: only that channel's TPFs
        files = select_channel_files(
            files,
            channel=local_params["channel"],
            quarter=local_params.get("quarter"),
            campaign=local_params.get("campaign"),
            what=f"field {field}",
        )
    log.info("field %s: reading %d local file(s)", field, len(files))
    ds = read_field(files)
    return write_cube_with_provenance(
        ds, files, out_cube, field=field, step="download_local", config=dict(local_params)
    )
