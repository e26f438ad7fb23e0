"""Gaia crossmatch: the sources of a cube's field, propagated to the observation epoch, in pixels.

Pipeline stage 2 (rule ``gaia_crossmatch``). The entry point is :func:`crossmatch_field`; the
pieces are pure functions:

* :func:`query_gaia` -- ADQL cone query(ies) on the Gaia archive with ``astroquery.gaia``,
  cached on disk keyed by the query text;
* :func:`read_catalog` -- a local catalog (ECSV/CSV/FITS/VOTable) in Gaia DR3 column names;
* :func:`propagate_to_epoch` -- proper-motion propagation (``SkyCoord.apply_space_motion``);
* :func:`sky_to_pixel` -- CCD column/row through the cube WCS (per stamp for pixel tables);
* :func:`crossmatch` -- all of the above for one cube: the ``catalog.ecsv`` table of
  ``docs/DATA_MODEL.md``.

Pixel conventions: the cube WCS maps 0-based array indices (x = column index, y = row index) to the
sky, so ``column = column[0] + x`` and ``row = row[0] + y``; an integer value is a pixel centre and a
source is *on the cutout* when its centre falls on a pixel, i.e. ``-0.5 <= x < ncol - 0.5`` (same
for y). Its distance to the cutout is the distance from its centre to the nearest pixel's square.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import Distance, SkyCoord
from astropy.table import MaskedColumn, Table
from astropy.time import Time

from workflow_lib.core.atomic import atomic_path
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance
from workflow_lib.data.cube import CubeError, cube_wcs, open_cube

log = get_logger("gaia")

#: Gaia DR3 columns every catalog carries (the input-catalog format of docs/DATA_MODEL.md)
GAIA_COLUMNS = (
    "source_id",
    "ra",
    "dec",
    "pmra",
    "pmdec",
    "parallax",
    "phot_g_mean_flux",
    "phot_g_mean_mag",
    "bp_rp",
    "ref_epoch",
)
GAIA_UNITS = {
    "ra": u.deg,
    "dec": u.deg,
    "pmra": u.mas / u.yr,
    "pmdec": u.mas / u.yr,
    "parallax": u.mas,
    "phot_g_mean_flux": u.electron / u.s,
    "phot_g_mean_mag": u.mag,
    "bp_rp": u.mag,
    "ref_epoch": u.yr,
}
#: columns of the output ``catalog.ecsv``, in order
OUTPUT_COLUMNS = (
    "source_id",
    "ra",
    "dec",
    "ra_ref",
    "dec_ref",
    "pmra",
    "pmdec",
    "parallax",
    "phot_g_mean_flux",
    "phot_g_mean_mag",
    "bp_rp",
    "column",
    "row",
    "expected_flux",
    "on_cutout",
    "stamp",
)
#: G limit used when ``gaia.mag_limit`` is null
DEFAULT_MAG_LIMIT = {"TESS": 19.0, "Kepler": 18.0, "K2": 18.0}
#: instrument-band flux zero points: (reference magnitude, e-/s at that magnitude)
FLUX_ZERO_POINTS = {"TESS": (10.0, 15000.0), "Kepler": (12.0, 1.74e5), "K2": (12.0, 1.74e5)}
#: BP-RP range of the Stassun et al. (2019) eq. 1 T(G, BP-RP) relation [mag]; colours outside are clipped to it
TESS_COLOUR_RANGE = (-0.2, 3.0)
#: T - G for stars without a BP-RP (Stassun et al. 2019, TIC-8: T = G - 0.430)
TESS_G_OFFSET_NO_COLOUR = -0.430
#: Gaia DR3 G-band photometric zero point (Riello et al. 2021): G = -2.5 log10(flux) + ZP
GAIA_G_ZERO_POINT = 25.6874
DEFAULT_REF_EPOCH = 2016.0
DEFAULT_TABLE = "gaiadr3.gaia_source"
#: extra cone radius so that stars that moved into the footprint since ref_epoch are queried
PM_PADDING = 30.0 * u.arcsec
#: most circles OR-ed in one ADQL query (stamps of a Kepler channel are queried in batches)
MAX_CIRCLES_PER_QUERY = 40

OFFLINE_HINT = "give a local catalog with fields.{field}.gaia.catalog"


class GaiaError(RuntimeError):
    """The Gaia archive could not be queried, or a catalog cannot be used."""


class GaiaArchiveUnreachable(GaiaError):
    """The Gaia archive could not be reached (offline, DNS, timeout, HTTP error)."""


# ------------------------------------------------------------------------- catalogs


def mag_to_flux(mag, mission: str):
    """Instrument-band flux [e-/s] of a star of instrument-band magnitude ``mag`` (T for TESS, Kp for Kepler/K2)."""
    m0, f0 = FLUX_ZERO_POINTS[_mission_key(mission)]
    return f0 * 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - m0))


def tess_mag_from_gaia(g, bp_rp):
    """TESS magnitude from Gaia G and BP-RP: Stassun et al. (2019, AJ 158, 138), eq. 1 (TIC-8), the polynomial
    as published (no range check)."""
    c = np.asarray(bp_rp, float)
    return np.asarray(g, float) + 0.0324473 - 0.633923 * c + 0.0891337 * c**2 - 0.00522555 * c**3


def band_mag(g, bp_rp, mission: str):
    """A-priori instrument-band magnitude of catalog stars (the ``expected_flux`` of :func:`crossmatch`).

    TESS: T from G and BP-RP by Stassun et al. (2019) eq. 1, the colour clipped to the relation's range
    (:data:`TESS_COLOUR_RANGE`); stars without a BP-RP get T = G + :data:`TESS_G_OFFSET_NO_COLOUR` (TIC-8's
    relation for G only). Typical stars (BP-RP ~ 1) are ~0.55 mag brighter in T than in G, so taking T = G
    puts the a-priori fluxes ~40 % low and scatters them by the stars' colours. Kepler / K2: Kp = G (the two
    bands are close; no colour term)."""
    g = np.asarray(g, float)
    if _mission_key(mission) != "TESS":
        return g.copy()
    c = np.asarray(bp_rp, float) * np.ones_like(g)
    with np.errstate(invalid="ignore"):
        t = tess_mag_from_gaia(g, np.clip(c, *TESS_COLOUR_RANGE))
    return np.where(np.isfinite(c), t, g + TESS_G_OFFSET_NO_COLOUR)


def g_flux_to_mag(flux):
    """Gaia G magnitude from ``phot_g_mean_flux`` [e-/s] (DR3 zero point)."""
    flux = np.asarray(flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, -2.5 * np.log10(flux) + GAIA_G_ZERO_POINT, np.nan)


def g_mag_to_flux(mag):
    """``phot_g_mean_flux`` [e-/s] from the Gaia G magnitude (DR3 zero point)."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - GAIA_G_ZERO_POINT))


def _mission_key(mission: str) -> str:
    if mission not in FLUX_ZERO_POINTS:
        raise GaiaError(f"unknown mission {mission!r}; expected one of {sorted(FLUX_ZERO_POINTS)}")
    return mission


def _float_values(col) -> np.ndarray:
    """Column values as float64 with masked entries as NaN (units dropped)."""
    if isinstance(col, MaskedColumn) or getattr(col, "mask", None) is not None:
        mask = np.ma.getmaskarray(col)
        return np.where(mask, np.nan, np.asarray(np.ma.getdata(col), dtype=float))
    return np.array(col, dtype=float)


def check_unique_ids(source_id, name: str = "catalog", *, what: str = "catalog") -> None:
    """:class:`GaiaError` naming ``name`` and the first duplicated ids if ``source_id`` repeats a value.

    Every product is keyed by source_id (light-curve sets, one FITS per source): a repeated id would
    silently overwrite or mix the light curves of different stars."""
    ids = np.asarray(source_id, dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    dup = counts > 1
    if dup.any():
        first = ", ".join(f"{int(i)} (x{int(c)})" for i, c in zip(uniq[dup][:5], counts[dup][:5]))
        more = f" and {int(dup.sum()) - 5} more" if dup.sum() > 5 else ""
        raise GaiaError(
            f"{name}: {what} has duplicate source_id values, {int(dup.sum())} id(s) repeated: {first}{more}; "
            "every source needs its own id (remove or renumber the duplicate rows)"
        )


def normalize_catalog(table: Table, name: str = "catalog") -> Table:
    """A catalog in the standard Gaia column set (``GAIA_COLUMNS``), float64 with NaN for missing.

    Column names are matched case-insensitively. ``source_id``, ``ra``, ``dec`` and one of
    ``phot_g_mean_mag`` / ``phot_g_mean_flux`` are required (the other is derived); missing proper
    motions become 0, missing ``parallax``/``bp_rp`` NaN, missing ``ref_epoch`` 2016.0 (with a
    warning). NaN proper motions are set to 0. ``name`` (a file name) is used in errors. Duplicate
    ``source_id`` values are refused (:func:`check_unique_ids`).
    """
    lower = {}
    for c in table.colnames:
        lower.setdefault(c.lower(), c)
    missing = [c for c in ("source_id", "ra", "dec") if c not in lower]
    if "phot_g_mean_mag" not in lower and "phot_g_mean_flux" not in lower:
        missing.append("phot_g_mean_mag (or phot_g_mean_flux)")
    if missing:
        raise GaiaError(
            f"{name}: catalog lacks required column(s) {missing}; "
            f"expected Gaia DR3 names {list(GAIA_COLUMNS)} (has {table.colnames})"
        )
    n = len(table)
    sid_col = table[lower["source_id"]]
    if getattr(sid_col, "mask", None) is not None and np.any(sid_col.mask):
        raise GaiaError(f"{name}: source_id has missing values")
    try:
        source_id = np.asarray(sid_col).astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise GaiaError(f"{name}: source_id is not an integer column ({exc})") from exc
    check_unique_ids(source_id, name)
    out = Table()
    out["source_id"] = source_id
    for c in ("ra", "dec"):
        out[c] = _float_values(table[lower[c]])
        if not np.all(np.isfinite(out[c])):
            raise GaiaError(f"{name}: column {c} has missing/non-finite values")
    for c in ("pmra", "pmdec"):
        if c in lower:
            v = _float_values(table[lower[c]])
            out[c] = np.where(np.isfinite(v), v, 0.0)
        else:
            log.warning("%s: no %s column; proper motions taken as 0", name, c)
            out[c] = np.zeros(n)
    out["parallax"] = _float_values(table[lower["parallax"]]) if "parallax" in lower else np.full(n, np.nan)
    gmag = _float_values(table[lower["phot_g_mean_mag"]]) if "phot_g_mean_mag" in lower else np.full(n, np.nan)
    gflux = _float_values(table[lower["phot_g_mean_flux"]]) if "phot_g_mean_flux" in lower else np.full(n, np.nan)
    gmag = np.where(np.isfinite(gmag), gmag, g_flux_to_mag(gflux))
    gflux = np.where(np.isfinite(gflux), gflux, g_mag_to_flux(gmag))
    out["phot_g_mean_flux"] = gflux
    out["phot_g_mean_mag"] = gmag
    out["bp_rp"] = _float_values(table[lower["bp_rp"]]) if "bp_rp" in lower else np.full(n, np.nan)
    if "ref_epoch" in lower:
        ep = _float_values(table[lower["ref_epoch"]])
        if not np.all(np.isfinite(ep)):
            warnings.warn(f"{name}: missing ref_epoch values taken as {DEFAULT_REF_EPOCH}", stacklevel=2)
            log.warning("%s: missing ref_epoch values taken as %s", name, DEFAULT_REF_EPOCH)
            ep = np.where(np.isfinite(ep), ep, DEFAULT_REF_EPOCH)
        out["ref_epoch"] = ep
    else:
        warnings.warn(f"{name}: no ref_epoch column; positions taken to be at J{DEFAULT_REF_EPOCH}", stacklevel=2)
        log.warning("%s: no ref_epoch column; positions taken to be at J%s", name, DEFAULT_REF_EPOCH)
        out["ref_epoch"] = np.full(n, DEFAULT_REF_EPOCH)
    for c, unit in GAIA_UNITS.items():
        out[c].unit = unit
    out.meta = dict(table.meta)
    return out


_FORMATS = {
    ".ecsv": "ascii.ecsv",
    ".csv": "ascii.csv",
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".vot": "votable",
    ".votable": "votable",
    ".xml": "votable",
}


def read_field_catalog(path, required=("source_id", "column", "row")) -> Table:
    """A field's crossmatched ``catalog.ecsv`` (written by :func:`crossmatch_field`, docs/DATA_MODEL.md), or a
    :class:`GaiaError` naming the file: not found, not ECSV, or lacking a ``required`` column."""
    path = Path(path)
    if not path.is_file():
        raise GaiaError(f"{path}: catalog file not found")
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # astropy raises many kinds
        raise GaiaError(
            f"{path}: not a readable ECSV catalog ({type(exc).__name__}: {exc}); expected the catalog.ecsv "
            "written by the gaia-crossmatch step"
        ) from exc
    missing = [c for c in required if c not in table.colnames]
    if missing:
        raise GaiaError(f"{path}: catalog lacks column(s) {missing}; expected the gaia-crossmatch step's catalog.ecsv")
    return table


def read_catalog(path) -> Table:
    """Read a local catalog (ECSV, CSV, FITS or VOTable, Gaia DR3 column names) and normalise it.

    See :func:`normalize_catalog` for required columns and defaults. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise GaiaError(f"{path}: catalog file not found")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=u.UnitsWarning)
            if fmt == "votable":
                table = Table.read(path, format="votable", use_names_over_ids=True)
            elif fmt is not None:
                table = Table.read(path, format=fmt)
            else:
                table = Table.read(path)
    except Exception as exc:  # astropy raises many kinds
        raise GaiaError(
            f"{path}: cannot read catalog ({type(exc).__name__}: {exc}); expected ECSV, CSV, FITS or VOTable"
        ) from exc
    log.info("read %d sources from %s", len(table), path)
    return normalize_catalog(table, str(path))


# ------------------------------------------------------------------------- Gaia archive


@contextlib.contextmanager
def _socket_timeout(seconds):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def build_adql(centers: SkyCoord, radii, mag_limit: float, table: str = DEFAULT_TABLE) -> str:
    """ADQL selecting the Gaia columns within one or more cones, down to ``mag_limit`` in G."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*", table):
        raise GaiaError(f"gaia.table {table!r} is not a schema.table name")
    centers = centers.icrs.reshape(-1) if not centers.isscalar else centers.icrs.reshape((1,))
    radii = np.broadcast_to(u.Quantity(radii, u.deg).to_value(u.deg), centers.shape)
    circles = [
        f"1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {c.ra.deg:.8f}, {c.dec.deg:.8f}, {r:.8f}))"
        for c, r in zip(centers, radii)
    ]
    where = circles[0] if len(circles) == 1 else "(" + "\n    OR ".join(circles) + ")"
    return (
        f"SELECT {', '.join(GAIA_COLUMNS)}\nFROM {table}\nWHERE {where}\n"
        f"AND phot_g_mean_mag <= {float(mag_limit):.3f}\nORDER BY source_id"
    )


def query_gaia(
    center: SkyCoord, radius, mag_limit: float, table: str = DEFAULT_TABLE, cache_dir=None, *, timeout_s: float = 300.0
) -> Table:
    """Gaia sources within ``radius`` of ``center`` (each, when arrays) down to G = ``mag_limit``.

    Runs an asynchronous ADQL job on the Gaia archive (``astroquery.gaia``); the result is cached
    as ECSV in ``cache_dir`` under the SHA-256 of the query text, so the same query is asked once.
    Many cones (the stamps of a Kepler channel) are OR-ed into queries of at most
    ``MAX_CIRCLES_PER_QUERY`` circles. Returns a normalised catalog (:func:`normalize_catalog`).
    Raises :class:`GaiaArchiveUnreachable` when the archive cannot be reached.
    """
    if mag_limit is None or not np.isfinite(mag_limit):
        raise GaiaError("query_gaia needs a finite mag_limit")
    centers = center.reshape((1,)) if center.isscalar else center.reshape(-1)
    radii = np.broadcast_to(u.Quantity(radius, u.deg).to_value(u.deg), centers.shape)
    parts = []
    for start in range(0, len(centers), MAX_CIRCLES_PER_QUERY):
        sl = slice(start, start + MAX_CIRCLES_PER_QUERY)
        query = build_adql(centers[sl], radii[sl] * u.deg, mag_limit, table)
        parts.append(_run_cached(query, cache_dir, timeout_s))
    if len(parts) == 1:
        result = parts[0]
    else:
        from astropy.table import unique, vstack

        result = unique(vstack(parts, metadata_conflicts="silent"), keys="source_id")
    result = normalize_catalog(result, "Gaia archive result")
    result.sort("source_id")
    return result


def _run_cached(query: str, cache_dir, timeout_s: float) -> Table:
    key = hashlib.sha256(query.encode()).hexdigest()[:24]
    cache_file = Path(cache_dir) / f"gaia-{key}.ecsv" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        log.info("Gaia query cache hit: %s", cache_file)
        return Table.read(cache_file, format="ascii.ecsv")
    log.info("querying the Gaia archive:\n%s", query)
    result = _launch(query, timeout_s)
    keep = [c for c in GAIA_COLUMNS if c in result.colnames]
    result = result[keep]
    result.meta = {"query": query}
    log.info("Gaia archive returned %d sources", len(result))
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            result.write(tmp, format="ascii.ecsv")
    return result


def _launch(query: str, timeout_s: float) -> Table:
    import http.client

    import requests

    with _socket_timeout(timeout_s):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # astroquery prints status to stdout
                from astroquery.gaia import GaiaClass

                gaia = GaiaClass(show_server_messages=False)
                job = gaia.launch_job_async(query, output_format="votable_gzip")
                result = job.get_results()
        except (OSError, http.client.HTTPException, requests.exceptions.RequestException) as exc:
            raise GaiaArchiveUnreachable(
                f"cannot reach the Gaia archive ({type(exc).__name__}: {exc}); {OFFLINE_HINT.format(field='<name>')}"
            ) from exc
        except SystemError as exc:  # astroquery: the job ended in phase ERROR
            raise GaiaError(f"the Gaia archive rejected the query ({exc}):\n{query}") from exc
    if result is None:
        raise GaiaError(f"the Gaia archive returned no result table for:\n{query}")
    return result


# ------------------------------------------------------------------------- astrometry


def propagate_to_epoch(table: Table, obstime: Time) -> Table:
    """Propagate catalog positions from ``ref_epoch`` (Julian year, TCB) to ``obstime``.

    Uses ``SkyCoord.apply_space_motion`` (straight-line space motion, radial velocity 0). Returns a
    copy with ``ra``/``dec`` at ``obstime`` and the catalog positions in ``ra_ref``/``dec_ref``.
    NaN proper motions count as 0. The distance only matters at second order with zero radial
    velocity; missing, zero or negative parallaxes get a distance at which the tangential speed is
    100 km/s (far from the relativistic limits of ERFA's ``starpm``).
    """
    out = table.copy()
    n = len(out)
    ra0 = _float_values(out["ra"])
    dec0 = _float_values(out["dec"])
    pmra = np.nan_to_num(_float_values(out["pmra"]), nan=0.0)
    pmdec = np.nan_to_num(_float_values(out["pmdec"]), nan=0.0)
    plx = _float_values(out["parallax"]) if "parallax" in out.colnames else np.full(n, np.nan)
    epochs = _float_values(out["ref_epoch"]) if "ref_epoch" in out.colnames else np.full(n, DEFAULT_REF_EPOCH)
    pm_tot = np.hypot(pmra, pmdec)  # mas/yr
    # distance [pc] where v_tan = 100 km/s: d = v / (4.74047 km/s per (AU/yr)) / pm["/yr]
    d_fallback = np.where(pm_tot > 0, 100.0 / 4.740470446 / np.maximum(pm_tot, 1e-12) * 1e3, 1000.0)
    dist_pc = np.where(np.isfinite(plx) & (plx > 0), 1e3 / np.where(plx > 0, plx, 1.0), d_fallback)
    ra_new = ra0.copy()
    dec_new = dec0.copy()
    moving = pm_tot > 0
    for ep in np.unique(epochs[moving]):
        sel = moving & (epochs == ep)
        c = SkyCoord(
            ra=ra0[sel] * u.deg,
            dec=dec0[sel] * u.deg,
            distance=Distance(dist_pc[sel] * u.pc),
            pm_ra_cosdec=pmra[sel] * u.mas / u.yr,
            pm_dec=pmdec[sel] * u.mas / u.yr,
            radial_velocity=np.zeros(sel.sum()) * u.km / u.s,
            frame="icrs",
            obstime=Time(ep, format="jyear", scale="tcb"),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=Warning)  # ERFA 'distance overridden' etc.
            moved = c.apply_space_motion(new_obstime=obstime)
        ra_new[sel] = moved.ra.deg
        dec_new[sel] = moved.dec.deg
    out["ra_ref"] = ra0 * u.deg
    out["dec_ref"] = dec0 * u.deg
    out["ra"] = ra_new * u.deg
    out["dec"] = dec_new * u.deg
    return out


def cube_mid_time(cube) -> Time:
    """Mid-time of a cube: mean of its time coordinate + ``time_offset``, as JD TDB."""
    t = np.asarray(cube["time"].values, dtype=float)
    t = t[np.isfinite(t)]
    if t.size == 0:
        raise CubeError("cube has no finite time stamps")
    offset = float(cube.attrs.get("time_offset", cube["time"].attrs.get("time_offset", 0.0)))
    return Time(offset + t.mean(), format="jd", scale="tdb")


def _is_pixel_table(cube) -> bool:
    return "pixel" in cube.dims


def _stamp_origin(cube, k: int, header: str) -> tuple[float, float]:
    """CCD (column, row) of array index (0, 0) of stamp ``k`` of a pixel table.

    From ``attrs['stamp_origin']`` (JSON list of [column0, row0]) or per-stamp attrs
    ``column0``/``row0`` when the cube records them, else the physical WCS ('P') keywords of the
    stamp header (Kepler/TESS APERTURE headers: CRVAL1P/CRVAL2P), else the stamp's smallest
    column/row in the table (wrong only if a whole first row/column of the stamp was NaN).
    """
    from astropy.io import fits

    if cube.attrs.get("stamp_origin"):  # [[column0, row0], ...] when the cube records it
        col0, row0 = json.loads(cube.attrs["stamp_origin"])[k]
        return float(col0), float(row0)
    metas = json.loads(cube.attrs.get("stamps", "[]") or "[]")
    meta = metas[k] if k < len(metas) else {}
    for kc, kr in (("column0", "row0"), ("corner_column", "corner_row")):
        if kc in meta and kr in meta:
            return float(meta[kc]), float(meta[kr])
    hdr = fits.Header.fromstring(header, sep="\n")
    if "CRVAL1P" in hdr and "CRVAL2P" in hdr:
        col0 = hdr["CRVAL1P"] - (hdr.get("CRPIX1P", 1.0) - 1.0) * hdr.get("CDELT1P", 1.0)
        row0 = hdr["CRVAL2P"] - (hdr.get("CRPIX2P", 1.0) - 1.0) * hdr.get("CDELT2P", 1.0)
        return float(col0), float(row0)
    sel = np.asarray(cube["stamp"].values) == k
    return float(np.min(cube["column"].values[sel])), float(np.min(cube["row"].values[sel]))


def _distance_to_pixels(col, row, pix_col, pix_row) -> np.ndarray:
    """Distance [px] from each (col, row) to the nearest pixel square of a set (0 if on one)."""
    col = np.asarray(col, float)[:, None]
    row = np.asarray(row, float)[:, None]
    dx = np.maximum(np.abs(col - pix_col[None, :]) - 0.5, 0.0)
    dy = np.maximum(np.abs(row - pix_row[None, :]) - 0.5, 0.0)
    return np.hypot(dx, dy).min(axis=1) if pix_col.size else np.full(col.shape[0], np.inf)


def sky_to_pixel(table: Table, cube) -> Table:
    """CCD column/row of each catalog source through the cube's WCS.

    Adds ``column``, ``row`` (CCD pixel coordinates, integer = pixel centre), ``on_cutout`` (the
    centre falls on a pixel of the cube), ``stamp`` (image cubes: 0; pixel tables: the stamp whose
    pixels contain the source -- the one it is deepest inside when stamps overlap -- else the
    nearest stamp; -1 if no stamp has a WCS) and
    ``edge_distance`` [px] (distance to the nearest pixel of the cube / of that stamp; 0 on it).
    """
    out = table.copy()
    coords = SkyCoord(ra=_float_values(out["ra"]) * u.deg, dec=_float_values(out["dec"]) * u.deg, frame="icrs")
    n = len(out)
    if not _is_pixel_table(cube):
        wcs = cube_wcs(cube)
        if wcs is None:
            raise CubeError("cube has no WCS (attrs['wcs'] is empty); cannot place catalog sources on pixels")
        x, y = wcs.world_to_pixel(coords) if n else (np.zeros(0), np.zeros(0))
        x, y = np.atleast_1d(x).astype(float), np.atleast_1d(y).astype(float)
        ncol, nrow = cube.sizes["column"], cube.sizes["row"]
        col0, row0 = float(cube["column"].values[0]), float(cube["row"].values[0])
        dx = np.maximum(np.maximum(-0.5 - x, x - (ncol - 0.5)), 0.0)
        dy = np.maximum(np.maximum(-0.5 - y, y - (nrow - 0.5)), 0.0)
        on = (x >= -0.5) & (x < ncol - 0.5) & (y >= -0.5) & (y < nrow - 0.5)
        out["column"] = (col0 + x) * u.pix
        out["row"] = (row0 + y) * u.pix
        out["on_cutout"] = on
        out["stamp"] = np.zeros(n, dtype=np.int32)
        out["edge_distance"] = np.hypot(dx, dy) * u.pix
        return out

    headers = json.loads(cube.attrs.get("stamp_wcs", "[]"))
    stamp_of_pix = np.asarray(cube["stamp"].values)
    pcol = np.asarray(cube["column"].values, float)
    prow = np.asarray(cube["row"].values, float)
    best_d = np.full(n, np.inf)
    best_score = np.full(n, np.inf)
    col = np.full(n, np.nan)
    row = np.full(n, np.nan)
    stamp = np.full(n, -1, dtype=np.int32)
    for k, hdr in enumerate(headers):
        sel = stamp_of_pix == k
        if not hdr or not sel.any():
            continue
        wcs = cube_wcs(cube, stamp=k)
        col0, row0 = _stamp_origin(cube, k, hdr)
        x, y = wcs.world_to_pixel(coords)
        ck, rk = col0 + np.atleast_1d(x), row0 + np.atleast_1d(y)
        d = _distance_to_pixels(ck, rk, pcol[sel], prow[sel])
        # overlapping stamps (neighbouring Kepler targets): a source on several goes to the one it
        # is deepest inside (largest distance to the stamp's bounding-box edge)
        depth = np.minimum.reduce(
            [
                ck - (pcol[sel].min() - 0.5),
                pcol[sel].max() + 0.5 - ck,
                rk - (prow[sel].min() - 0.5),
                prow[sel].max() + 0.5 - rk,
            ]
        )
        score = np.where(d > 0, d, -depth)
        better = score < best_score
        best_score[better] = score[better]
        best_d[better], col[better], row[better], stamp[better] = d[better], ck[better], rk[better], k
    if not np.isfinite(best_d).any() and n and not any(headers):
        raise CubeError("pixel-table cube has no stamp WCS (attrs['stamp_wcs']); cannot place sources on pixels")
    # on a pixel of the table: centre inside a pixel square, i.e. distance 0
    out["column"] = col * u.pix
    out["row"] = row * u.pix
    out["on_cutout"] = best_d == 0.0
    out["stamp"] = stamp
    out["edge_distance"] = best_d * u.pix
    return out


def crossmatch(
    cube, catalog_table: Table, margin_pixels: float = 4.0, mag_limit: float | None = None, *, name: str = "catalog"
) -> Table:
    """The ``catalog.ecsv`` table of a cube (docs/DATA_MODEL.md).

    Sources brighter than ``mag_limit`` in G (None: mission default) are propagated to the cube's
    mid-time, placed on pixels, and kept when on the cutout or within ``margin_pixels`` of it.
    ``expected_flux`` is the a-priori instrument-band flux from G and BP-RP (:func:`band_mag`); a table whose
    ``meta["magnitudes"]`` is ``"instrument"`` (:func:`header_catalog`: the stamp headers' TESSMAG / KEPMAG
    in ``phot_g_mean_mag``) has it from that magnitude as it is. Sorted by G (then source_id).
    For pixel tables, sources within the margin of a stamp are assigned to it (``stamp``). Duplicate
    ``source_id`` values are refused (:class:`GaiaError` naming ``name``).
    """
    mission = cube.attrs.get("mission", "TESS")
    _mission_key(mission)
    instrument_mags = catalog_table.meta.get("magnitudes") == "instrument"
    if mag_limit is None:
        mag_limit = DEFAULT_MAG_LIMIT[mission]
    if set(GAIA_COLUMNS) - set(catalog_table.colnames):
        cat = normalize_catalog(catalog_table, name)
    else:
        cat = catalog_table
        check_unique_ids(cat["source_id"], name)
    gmag = _float_values(cat["phot_g_mean_mag"])
    bad = ~np.isfinite(gmag)
    if bad.any():
        log.warning("%d catalog source(s) without a G magnitude dropped", int(bad.sum()))
    n_read = len(cat)
    cat = cat[~bad & (gmag <= mag_limit)]
    tmid = cube_mid_time(cube)
    cat = propagate_to_epoch(cat, tmid)
    cat = sky_to_pixel(cat, cube)
    if not np.any(np.asarray(cat["on_cutout"], dtype=bool)):
        raise GaiaError(
            f"{name}: none of its {n_read} sources ({len(cat)} with G <= {mag_limit:g}) falls on the cube's pixels: "
            "a catalog of another part of the sky, or a cube whose WCS is wrong (check RA/Dec against the cube's "
            "header)"
        )
    keep = _float_values(cat["edge_distance"]) <= margin_pixels
    cat = cat[keep]
    kept_g = _float_values(cat["phot_g_mean_mag"])
    band = kept_g if instrument_mags else band_mag(kept_g, _float_values(cat["bp_rp"]), mission)
    cat["expected_flux"] = mag_to_flux(band, mission) * u.electron / u.s
    order = np.lexsort((np.asarray(cat["source_id"]), kept_g))
    cat = cat[order]
    out = Table()
    for c in OUTPUT_COLUMNS:
        out[c] = cat[c]
    out["source_id"] = np.asarray(out["source_id"], dtype=np.int64)
    out["on_cutout"] = np.asarray(out["on_cutout"], dtype=bool)
    out["stamp"] = np.asarray(out["stamp"], dtype=np.int32)
    for c in ("ra_ref", "dec_ref"):
        out[c].unit = u.deg
    out.meta = {
        "mission": mission,
        "mid_time_jd_tdb": float(tmid.jd),
        "margin_pixels": float(margin_pixels),
        "mag_limit": float(mag_limit),
        "n_on_cutout": int(np.sum(out["on_cutout"])),
    }
    log.info(
        "crossmatch: %d sources kept (%d on the cutout), G <= %.1f, margin %.1f px, mid-time JD %.5f TDB",
        len(out),
        out.meta["n_on_cutout"],
        mag_limit,
        margin_pixels,
        tmid.jd,
    )
    return out


# ------------------------------------------------------------------------- footprint & fallback


def _footprints(cube) -> list[tuple[SkyCoord, float, float]]:
    """(centre, radius [deg] of the circle through the corners, pixel scale [deg]) per image/stamp."""
    out = []
    if not _is_pixel_table(cube):
        items = [(None, cube_wcs(cube), cube.sizes["column"], cube.sizes["row"], 0.0, 0.0)]
    else:
        items = []
        stamp_of_pix = np.asarray(cube["stamp"].values)
        for k, hdr in enumerate(json.loads(cube.attrs.get("stamp_wcs", "[]"))):
            sel = stamp_of_pix == k
            if not hdr or not sel.any():
                continue
            col0, row0 = _stamp_origin(cube, k, hdr)
            cols, rows = cube["column"].values[sel] - col0, cube["row"].values[sel] - row0
            items.append(
                (
                    k,
                    cube_wcs(cube, stamp=k),
                    cols.max() + 1 - cols.min(),
                    rows.max() + 1 - rows.min(),
                    float(cols.min()),
                    float(rows.min()),
                )
            )
    for _, wcs, ncol, nrow, x0, y0 in items:
        if wcs is None:
            continue
        xs = x0 + np.array([-0.5, ncol - 0.5, ncol - 0.5, -0.5])
        ys = y0 + np.array([-0.5, -0.5, nrow - 0.5, nrow - 0.5])
        centre = wcs.pixel_to_world(x0 + (ncol - 1) / 2.0, y0 + (nrow - 1) / 2.0)
        corners = wcs.pixel_to_world(xs, ys)
        from astropy.wcs.utils import proj_plane_pixel_scales

        scale = float(np.max(proj_plane_pixel_scales(wcs.celestial)))
        out.append((centre, float(centre.separation(corners).deg.max()), scale))
    return out


def header_catalog(cube) -> Table:
    """Catalog of the stamp targets only, from the cube attrs (``target_id, ra_obj, dec_obj,
    target_mag``; for pixel tables per stamp in ``attrs['stamps']``). The magnitudes (Kp / T) go in
    ``phot_g_mean_mag`` and ``meta["magnitudes"]`` says they are the instrument band's; positions have no proper motion (ref_epoch 2000.0)."""
    if _is_pixel_table(cube) and cube.attrs.get("stamps"):
        metas = json.loads(cube.attrs["stamps"])
    else:
        metas = [dict(cube.attrs)]
    rows = {}
    for m in metas:
        try:
            sid = int(m["target_id"])
            ra, dec, mag = float(m["ra_obj"]), float(m["dec_obj"]), float(m["target_mag"])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(ra) and np.isfinite(dec) and np.isfinite(mag):
            rows.setdefault(sid, (sid, ra, dec, mag))
    if not rows:
        raise GaiaError("the cube headers give no target position/magnitude (target_id, ra_obj, dec_obj, target_mag)")
    vals = [rows[k] for k in sorted(rows)]
    t = Table(rows=vals, names=("source_id", "ra", "dec", "phot_g_mean_mag"))
    t["pmra"] = 0.0
    t["pmdec"] = 0.0
    t["ref_epoch"] = 2000.0
    out = normalize_catalog(t, "cube header targets")
    out.meta["magnitudes"] = "instrument"  # TESSMAG / KEPMAG, not G: crossmatch takes them as they are
    return out


def _field_name(cube_path) -> str:
    return Path(cube_path).resolve().parent.name or "<name>"


def crossmatch_field(cube_path, out_catalog, gaia_params: dict, local_catalog: str | None = None) -> Table:
    """Rule ``gaia_crossmatch``: crossmatch one field's cube and write ``catalog.ecsv`` atomically.

    The catalog comes from ``local_catalog`` when given (the synthetic sector's
    ``input_catalog.ecsv``, or ``fields.<name>.gaia.catalog``), else from the Gaia archive around
    the cube's WCS footprint (+ margin). Offline with no catalog, Kepler/TESS stamps fall back to
    the targets named in their headers, with a warning. ``gaia_params`` are the merged
    ``gaia`` settings (``mag_limit``, ``margin_pixels``, ``table``, ``cache_dir``, ``timeout_s``).
    """
    params = dict(gaia_params or {})
    field = _field_name(cube_path)
    cube = open_cube(cube_path)
    mission = cube.attrs.get("mission", "TESS")
    _mission_key(mission)
    mag_limit = params.get("mag_limit")
    mag_limit = DEFAULT_MAG_LIMIT[mission] if mag_limit is None else float(mag_limit)
    margin = float(params.get("margin_pixels", 4.0))
    has_wcs = (
        any(json.loads(cube.attrs.get("stamp_wcs", "[]"))) if _is_pixel_table(cube) else bool(cube.attrs.get("wcs"))
    )
    if not has_wcs:
        raise CubeError(f"{cube_path}: cube has no WCS; cannot crossmatch it with a catalog")
    inputs = [str(cube_path)]
    if local_catalog:
        catalog = read_catalog(local_catalog)
        source = "local"
        inputs.append(str(local_catalog))
    else:
        fps = _footprints(cube)
        centres = SkyCoord([f[0] for f in fps])
        radii = np.array([f[1] + margin * f[2] for f in fps]) * u.deg + PM_PADDING
        try:
            catalog = query_gaia(
                centres,
                radii,
                mag_limit,
                params.get("table", DEFAULT_TABLE),
                params.get("cache_dir", "results/.gaia_cache"),
                timeout_s=float(params.get("timeout_s", 300.0)),
            )
            source = "gaia_archive"
        except GaiaArchiveUnreachable as exc:
            try:
                catalog = header_catalog(cube)
            except GaiaError as hdr:
                raise GaiaArchiveUnreachable(
                    f"{str(exc).replace('<name>', field)} (the stamp headers cannot stand in for it: {hdr})"
                ) from exc
            msg = (
                f"{cube_path}: {str(exc).replace('<name>', field)} -- falling back to the stamp headers: "
                f"only the {len(catalog)} target(s) are known, neighbours are missing"
            )
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            source = "header_targets"
    result = crossmatch(cube, catalog, margin, mag_limit, name=str(local_catalog) if local_catalog else source)
    result.meta["catalog_source"] = source
    result.meta["provenance"] = provenance("gaia_crossmatch", inputs, params, catalog_source=source)
    with atomic_path(out_catalog) as tmp:
        result.write(tmp, format="ascii.ecsv")
    log.info("wrote %s (%d sources, from %s)", out_catalog, len(result), source)
    return result
