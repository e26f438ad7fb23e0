"""A synthetic TESS CCD written as SPOC-format full-frame images, for :mod:`workflow_lib.data.ffi`.

:func:`write_synthetic_ffis` writes ``n_cadences`` files ``tess<stamp>-sNNNN-C-D-0120-s_ffic.fits``
laid out like SPOC calibrated FFIs: PRIMARY (SECTOR, CAMERA, CCD, FFIINDEX, ...), HDU 1
``CAMERA.CCD C.D cal`` (e-/s, TSTART/TSTOP in BTJD, TIMESYS/TIMEREF, DQUALITY, a TAN-SIP WCS in
FITS coordinates of the whole array) and HDU 2 ``CAMERA.CCD C.D uncert``.  The array is
``n_rows`` x ``n_cols`` science pixels plus the SPOC collateral margins (44 columns left and right,
30 rows on top; filled with a bias-like level that must never reach a cube).

The scene reuses :mod:`workflow_lib.data.synthetic`: magnitudes from its star-count law, TESS fluxes
from Gaia G and BP-RP, and its :class:`~workflow_lib.data.synthetic.SceneRenderer`: every star is
rendered through the real SPOC PRF (:mod:`workflow_lib.data.tess_prf`) interpolated at its CCD
position.  With ``prf_across_ccd`` (default) a small synthetic CCD samples the PRF of the whole
2048 x 2048 CCD (the PRF at the position scaled to the full CCD), so the PRF changes across it as
it does across a real one.  Every frame is the scene shifted by a smooth drift plus jitter (common to
the CCD), plus a background, with photon + read noise and an honest uncertainty image; a few
cadences carry DQUALITY flags (momentum dump, coarse point; the coarse-point frames have no WCS).

Also written: ``input_catalog.ecsv`` (Gaia DR3 column names, as :mod:`workflow_lib.data.synthetic`
writes) and ``truth.zarr`` (``flux`` (source, time) = the true TESS-band flux of each star, per-time
``drift_row``/``drift_column``/``background``/``quality``, per-source ``row``/``column`` (CCD)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from workflow_lib.core.atomic import atomic_path
from workflow_lib.core.logs import get_logger
from workflow_lib.data import tess_prf
from workflow_lib.data.cube import write_zarr_atomic
from workflow_lib.data.ffi import LEFT_COLLATERAL, RIGHT_COLLATERAL, SCIENCE_SIZE, TOP_COLLATERAL
from workflow_lib.data.synthetic import (
    PIXEL_SCALE,
    REF_EPOCH,
    SOURCE_ID_BASE,
    T_START,
    SceneRenderer,
    gaia_flux,
    sample_magnitudes,
    tess_flux,
    tess_mag_from_gaia,
)

log = get_logger("synthetic_ffi")

#: DQUALITY bits used for the flagged cadences
Q_COARSE_POINT = 4
Q_DESAT = 32
BIAS_LEVEL = 1.0e4  # value of the collateral pixels
READ_NOISE = 10.0  # e- per 2-s read
FRAME_SECONDS = 2.0
EXPOSURE_FRACTION = 0.8


@dataclass
class SyntheticFFIs:
    files: list
    catalog: Path
    truth: Path
    flux: np.ndarray  # (time, row, column) science pixels as written
    flux_err: np.ndarray
    time: np.ndarray
    quality: np.ndarray


def _wcs(n_rows, n_cols, ra, dec, rng):
    """TAN-SIP WCS in FITS pixel coordinates of the whole array (collateral included)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [LEFT_COLLATERAL + (n_cols - 1) / 2 + 1, (n_rows - 1) / 2 + 1]
    rot = np.deg2rad(rng.uniform(0, 360))
    scale = PIXEL_SCALE / 3600.0
    w.wcs.cd = scale * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    h = w.to_header()
    h["A_ORDER"], h["B_ORDER"] = 2, 2
    h["A_2_0"], h["A_0_2"], h["A_1_1"] = 2e-6, -1e-6, 5e-7  # a barrel-like distortion
    h["B_2_0"], h["B_0_2"], h["B_1_1"] = -1e-6, 2e-6, 3e-7
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    return WCS(h), h


def _file_name(tstart, sector, camera, ccd):
    stamp = Time(tstart + 2457000.0, format="jd", scale="tdb").utc.strftime("%Y%j%H%M%S")
    return f"tess{stamp}-s{sector:04d}-{camera}-{ccd}-0120-s_ffic.fits"


def write_ffi_file(
    path, flux, flux_err, *, sector, camera, ccd, tstart, tstop, quality=0, ffiindex=None, wcs_header=None, extra=None
):
    """Write one SPOC-format FFI: ``flux``/``flux_err`` are the whole arrays (collateral included)."""
    p = fits.Header()
    for k, v in [
        ("TSTART", tstart),
        ("TSTOP", tstop),
        ("CREATOR", "workflow_lib.synthetic_ffi"),
        ("PROCVER", "synthetic"),
        ("TELESCOP", "TESS"),
        ("INSTRUME", "TESS Photometer"),
        ("SIMDATA", True),
        ("SECTOR", sector),
        ("CAMERA", camera),
        ("CCD", ccd),
        ("RADESYS", "ICRS"),
        ("EQUINOX", 2000.0),
        ("CRMITEN", True),
        ("CRBLKSZ", 10),
    ]:
        p[k] = v
    if ffiindex is not None:
        p["FFIINDEX"] = int(ffiindex)
    h = fits.Header()
    for k, v in [
        ("TIMEREF", "SOLARSYSTEM"),
        ("TASSIGN", "SPACECRAFT"),
        ("TIMESYS", "TDB"),
        ("BJDREFI", 2457000),
        ("BJDREFF", 0.0),
        ("TIMEUNIT", "d"),
        ("TELAPSE", tstop - tstart),
        ("TSTART", tstart),
        ("TSTOP", tstop),
        ("TIMEPIXR", 0.5),
        ("TIMEDEL", tstop - tstart),
        ("INT_TIME", FRAME_SECONDS * EXPOSURE_FRACTION),
        ("NUM_FRM", int(round((tstop - tstart) * 86400 / FRAME_SECONDS))),
        ("NREADOUT", int(round((tstop - tstart) * 86400 / FRAME_SECONDS))),
        ("READNOIA", READ_NOISE),
        ("BUNIT", "electrons/s"),
        ("CAMERA", camera),
        ("CCD", ccd),
        ("DQUALITY", int(quality)),
        ("IMAGTYPE", "cal"),
    ]:
        h[k] = v
    if wcs_header is not None:
        h.extend(wcs_header, update=True)
    for k, v in [
        ("WCSNAMEP", "PHYSICAL"),
        ("WCSAXESP", 2),
        ("CTYPE1P", "RAW_COLS"),
        ("CTYPE2P", "RAW_ROWS"),
        ("CRPIX1P", 1),
        ("CRVAL1P", 1),
        ("CDELT1P", 1.0),
        ("CRPIX2P", 1),
        ("CRVAL2P", 1),
        ("CDELT2P", 1.0),
    ]:
        h[k] = v
    if extra:
        h.update(extra)
    e = fits.Header()
    e["BUNIT"] = "electrons/s"
    e["IMAGTYPE"] = "uncert"
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(header=p),
            fits.ImageHDU(np.asarray(flux, np.float32), header=h, name=f"CAMERA.CCD {camera}.{ccd} cal"),
            fits.ImageHDU(np.asarray(flux_err, np.float32), header=e, name=f"CAMERA.CCD {camera}.{ccd} uncert"),
        ]
    )
    hdul.writeto(path, overwrite=True)
    return Path(path)


def _star_scene(srow, scol, tflux, n_rows, n_cols, prf_across_ccd, drift_px, jitter_px, fine) -> SceneRenderer:
    """The star scene of a synthetic CCD: every star rendered with the TESS PRF of its CCD position
    (with ``prf_across_ccd`` the position scaled to a full CCD), padded for the pointing drift."""
    ccd_row = srow + 1.0
    ccd_col = scol + LEFT_COLLATERAL + 1.0
    if prf_across_ccd:  # PRF of the position scaled to a full CCD
        prf_row = 1.0 + (srow + 0.5) * SCIENCE_SIZE / n_rows
        prf_col = LEFT_COLLATERAL + 1.0 + (scol + 0.5) * SCIENCE_SIZE / n_cols
    else:
        prf_row, prf_col = ccd_row, ccd_col
    pad = int(np.ceil(drift_px + 10 * jitter_px)) + 3
    scene = SceneRenderer(n_rows, n_cols, pad=pad, fine=fine)
    for k in range(srow.size):
        coef = tess_prf.prf_coefficients_at(float(np.clip(prf_row[k], 1, 2048)), float(np.clip(prf_col[k], 45, 2092)))
        scene.add_star(None, srow[k], scol[k], tflux[k], prf_coef=coef)
    return scene


def _pointing_background_flags(rng, n_cadences, cadence_minutes, drift_px, jitter_px, background, n_flagged):
    """Time line, pointing (linear drift + jitter, px), background (e-/s, decaying scattered light) and
    quality flags of a synthetic sector. Draws from ``rng`` in this order: drift angle, row jitter,
    column jitter, flagged cadences. Returns ``(tstart, tstop, tmid, drow, dcol, bkg, quality)``."""
    dt = cadence_minutes / 1440.0
    tstart = T_START + np.arange(n_cadences) * dt
    tstop = tstart + dt
    tmid = 0.5 * (tstart + tstop)
    u = np.linspace(-0.5, 0.5, n_cadences)
    theta = rng.uniform(0, 2 * np.pi)
    drow = drift_px * u * np.sin(theta) + jitter_px * rng.normal(size=n_cadences)
    dcol = drift_px * u * np.cos(theta) + jitter_px * rng.normal(size=n_cadences)
    bkg = background * (1 + 0.5 * np.exp(-(tmid - tmid[0]) / 0.5))
    quality = np.zeros(n_cadences, np.int32)
    flagged = rng.choice(np.arange(1, n_cadences - 1), min(n_flagged, max(n_cadences - 2, 0)), replace=False)
    for j, k in enumerate(sorted(flagged)):
        quality[k] = Q_DESAT if j % 2 == 0 else Q_COARSE_POINT
    return tstart, tstop, tmid, drow, dcol, bkg, quality


def _write_input_catalog(catalog: Path, source_id, ra_s, dec_s, gmag, bp_rp, seed) -> Path:
    """Write the Gaia-like ``input_catalog.ecsv`` of a synthetic CCD (atomically), brightest first;
    positions at the reference epoch (no proper motion)."""
    n = source_id.size
    order = np.argsort(gmag, kind="stable")
    cat = Table()
    cat["source_id"] = source_id[order]
    cat["ra"] = ra_s[order]
    cat["dec"] = dec_s[order]
    cat["pmra"] = np.zeros(n)
    cat["pmdec"] = np.zeros(n)
    cat["parallax"] = np.full(n, 0.5)
    cat["phot_g_mean_flux"] = gaia_flux(gmag[order])
    cat["phot_g_mean_mag"] = gmag[order]
    cat["bp_rp"] = bp_rp[order]
    cat["ref_epoch"] = np.full(n, REF_EPOCH)
    for col, unit in dict(
        ra="deg", dec="deg", pmra="mas/yr", pmdec="mas/yr", parallax="mas", phot_g_mean_flux="electron/s"
    ).items():
        cat[col].unit = unit
    cat.meta.update(description="Gaia-like catalog of a synthetic TESS CCD (FFIs)", seed=seed, ref_epoch=REF_EPOCH)
    with atomic_path(catalog) as tmp:
        cat.write(tmp, format="ascii.ecsv", overwrite=True)
    return catalog


def _write_ffi_frames(
    out_dir,
    scene,
    rng,
    n_rows,
    n_cols,
    cadence_minutes,
    tstart,
    tstop,
    drow,
    dcol,
    bkg,
    quality,
    wcs_header,
    *,
    sector,
    camera,
    ccd,
):
    """Render and write one FFI per cadence: the scene at that cadence's pointing offset plus the
    background (with a column gradient), Poisson + read noise drawn from ``rng`` cadence by cadence,
    inside the bias-level collateral frame. Returns ``(flux_all, err_all, files)`` of the science area."""
    n_cadences = tstart.size
    exptime = cadence_minutes * 60.0 * EXPOSURE_FRACTION
    nread = cadence_minutes * 60.0 / FRAME_SECONDS
    grad = 1 + 0.1 * np.linspace(-1, 1, n_cols)[None, :]
    full_shape = (n_rows + TOP_COLLATERAL, n_cols + LEFT_COLLATERAL + RIGHT_COLLATERAL)
    sci = (slice(0, n_rows), slice(LEFT_COLLATERAL, LEFT_COLLATERAL + n_cols))
    flux_all = np.empty((n_cadences, n_rows, n_cols), np.float32)
    err_all = np.empty_like(flux_all)
    files = []
    for k in range(n_cadences):
        model = scene.image(drow[k], dcol[k]) + bkg[k] * grad
        var = (np.clip(model, 0, None) * exptime + nread * READ_NOISE**2) / exptime**2
        err = np.sqrt(var)
        img = model + err * rng.normal(size=model.shape)
        full = np.full(full_shape, BIAS_LEVEL, np.float32)
        ferr = np.full(full_shape, 1.0, np.float32)
        full[sci], ferr[sci] = img, err
        flux_all[k], err_all[k] = full[sci], ferr[sci]
        path = out_dir / _file_name(tstart[k], sector, camera, ccd)
        write_ffi_file(
            path,
            full,
            ferr,
            sector=sector,
            camera=camera,
            ccd=ccd,
            tstart=float(tstart[k]),
            tstop=float(tstop[k]),
            quality=int(quality[k]),
            ffiindex=1000 + k,
            wcs_header=None if quality[k] & Q_COARSE_POINT else wcs_header,
        )
        files.append(path)
    return flux_all, err_all, files


def write_synthetic_ffis(
    out_dir,
    *,
    n_rows: int = 128,
    n_cols: int = 128,
    n_cadences: int = 20,
    seed: int = 1,
    sector: int = 1,
    camera: int = 4,
    ccd: int = 2,
    cadence_minutes: float = 30.0,
    stars_per_sq_pixel: float = 0.05,
    mag_min: float = 9.0,
    mag_max: float = 18.0,
    drift_px: float = 0.3,
    jitter_px: float = 0.02,
    background: float = 20.0,
    n_flagged: int = 2,
    prf_across_ccd: bool = True,
    ra: float = 84.3,
    dec: float = -80.5,
    fine: int = 1,
) -> SyntheticFFIs:
    """Write the FFIs, ``input_catalog.ecsv`` and ``truth.zarr`` of one synthetic CCD into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 71])
    # scene: stars on the science area and a margin (their wings reach it)
    m = 5.0
    n = rng.poisson(stars_per_sq_pixel * (n_rows + 2 * m) * (n_cols + 2 * m))
    srow = rng.uniform(-m, n_rows - 1 + m, n)
    scol = rng.uniform(-m, n_cols - 1 + m, n)
    gmag = sample_magnitudes(rng, n, mag_min, mag_max)
    bp_rp = rng.uniform(0.5, 2.0, n)
    tflux = tess_flux(tess_mag_from_gaia(gmag, bp_rp))
    ccd_row = srow + 1.0
    ccd_col = scol + LEFT_COLLATERAL + 1.0
    scene = _star_scene(srow, scol, tflux, n_rows, n_cols, prf_across_ccd, drift_px, jitter_px, fine)
    wcs, wcs_header = _wcs(n_rows, n_cols, ra, dec, rng)
    tstart, tstop, tmid, drow, dcol, bkg, quality = _pointing_background_flags(
        rng, n_cadences, cadence_minutes, drift_px, jitter_px, background, n_flagged
    )
    flux_all, err_all, files = _write_ffi_frames(
        out_dir,
        scene,
        rng,
        n_rows,
        n_cols,
        cadence_minutes,
        tstart,
        tstop,
        drow,
        dcol,
        bkg,
        quality,
        wcs_header,
        sector=sector,
        camera=camera,
        ccd=ccd,
    )
    # catalog (positions at mid-sector = ref epoch: no proper motion) and truth
    ra_s, dec_s = wcs.all_pix2world(scol + LEFT_COLLATERAL, srow, 0)
    source_id = SOURCE_ID_BASE + seed * 100_000 + np.arange(n)
    catalog = _write_input_catalog(out_dir / "input_catalog.ecsv", source_id, ra_s, dec_s, gmag, bp_rp, seed)
    truth = xr.Dataset(
        {
            "flux": (("source", "time"), np.repeat(tflux[:, None], n_cadences, axis=1)),
            "drift_row": ("time", drow),
            "drift_column": ("time", dcol),
            "background": ("time", bkg),
            "quality": ("time", quality),
        },
        coords={
            "time": ("time", tmid),
            "source_id": ("source", source_id),
            "ra": ("source", ra_s),
            "dec": ("source", dec_s),
            "phot_g_mean_mag": ("source", gmag),
            "row": ("source", ccd_row),
            "column": ("source", ccd_col),
        },
        attrs={"sector": sector, "camera": camera, "ccd": ccd, "seed": seed, "n_stars": int(n)},
    )
    truth_path = write_zarr_atomic(truth, out_dir / "truth.zarr", chunks={"source": n or 1, "time": n_cadences})
    log.info("wrote %d synthetic FFIs (%d x %d science px, %d stars) to %s", n_cadences, n_rows, n_cols, n, out_dir)
    return SyntheticFFIs(files, catalog, truth_path, flux_all, err_all, tmid, quality)
