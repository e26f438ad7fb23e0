"""Light-curve sets: one xarray Dataset ``(source, time)`` per method, plus lightkurve-readable FITS.

A light-curve set (LFD, CPM aperture, raw aperture) is stored as zarr with::

    dims      (source, time)
    flux      float64 [e-/s]
    flux_err  float64 [e-/s]
    quality   int32 (time,)   the cube's QUALITY flags (cadences are kept, flagged)
    coords    time, cadenceno (from the cube), source_id (int64), and per-source metadata
              (phot_g_mean_mag, column, row, ...) as (source,) coords
    attrs     method, mission, sector/quarter, camera/ccd/channel, time_system, provenance

``write_lightcurve_fits`` writes one FITS file per source that ``lightkurve.read`` opens
(TIME/FLUX/FLUX_ERR/QUALITY columns with units, TELESCOP/MISSION/OBJECT keywords; any further
``(source, time)`` variable of the set as one more column, e.g. LFD_FLUX of the deblended product).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits

from workflow_lib.core.atomic import atomic_path
from workflow_lib.data.cube import python_scalar

#: the TELESCOP value lightkurve expects for each mission
TELESCOP = {"TESS": "TESS", "Kepler": "Kepler", "K2": "Kepler"}


def lightcurve_set(
    flux, flux_err, cube: xr.Dataset, catalog_columns: dict, *, method: str, attrs: dict | None = None
) -> xr.Dataset:
    """Assemble a ``(source, time)`` light-curve Dataset.

    ``catalog_columns`` maps a column name to a 1-D array of length nsource; it must hold
    ``source_id``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    if "source_id" not in catalog_columns:
        raise ValueError("catalog_columns must include 'source_id'")
    coords = {
        "time": ("time", np.asarray(cube["time"].values, dtype=np.float64), dict(cube["time"].attrs)),
        "cadenceno": ("time", np.asarray(cube["cadenceno"].values)),
    }
    for name, values in catalog_columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "OU":
            values = values.astype(str)
        coords[name] = ("source", values)
    ds = xr.Dataset(
        {
            "flux": (("source", "time"), flux, {"units": "electron / s"}),
            "flux_err": (("source", "time"), np.asarray(flux_err, dtype=np.float64), {"units": "electron / s"}),
            "quality": (("time",), np.asarray(cube["quality"].values, dtype=np.int32)),
        },
        coords=coords,
    )
    keep = (
        "mission",
        "sector",
        "quarter",
        "campaign",
        "camera",
        "ccd",
        "channel",
        "time_system",
        "time_offset",
        "time_scale",
        "field",
    )
    ds.attrs.update({k: v for k, v in cube.attrs.items() if k in keep})
    ds.attrs["method"] = method
    if attrs:
        ds.attrs.update(attrs)
    return ds


#: per-source coords written under a mission keyword instead of their name's first 8 letters
FITS_KEYWORDS = {"aperture_flux_fraction": "FLFRCSAP"}


def lightcurve_hdulist(lc: xr.Dataset, index: int) -> fits.HDUList:
    """The FITS light curve of source ``index`` of a light-curve set (lightkurve-readable)."""
    mission = lc.attrs.get("mission", "TESS")
    sid = int(lc["source_id"].values[index])
    primary = fits.PrimaryHDU()
    h = primary.header
    h["TELESCOP"] = (TELESCOP.get(mission, mission), "telescope")
    h["MISSION"] = (mission, "mission")
    h["INSTRUME"] = ("TESS Photometer" if mission == "TESS" else "Kepler Photometer", "")
    h["OBJECT"] = (f"Gaia DR3 {sid}", "Gaia DR3 source_id of the target")
    h["GAIAID"] = (sid, "Gaia DR3 source_id")
    h["METHOD"] = (lc.attrs.get("method", ""), "photometry method (LFD, CPM, RAW)")
    if "detrended" in lc.attrs:  # the deblended set: False where the CPM could not model the cube
        h["DETREND"] = (bool(int(lc.attrs["detrended"])), "CPM de-trended (F: the CPM could not model the cube)")
    if "prf_converged" in lc.attrs:  # the LFD set: the PRF step's §4.4 iteration (lfd.prf.tolerance)
        h["PRFCONV"] = (bool(int(lc.attrs["prf_converged"])), "LFD PRF shape/flux passes converged")
        h["PRFPASS"] = (int(lc.attrs["prf_passes"]), "LFD PRF shape/flux pass whose fit is used")
    for key, fkey in (
        ("sector", "SECTOR"),
        ("camera", "CAMERA"),
        ("ccd", "CCD"),
        ("quarter", "QUARTER"),
        ("campaign", "CAMPAIGN"),
        ("channel", "CHANNEL"),
    ):
        if key in lc.attrs and lc.attrs[key] is not None:
            h[fkey] = python_scalar(lc.attrs[key])
    for name in lc.coords:
        c = lc.coords[name]
        if c.dims == ("source",) and name != "source_id":
            v = python_scalar(c.values[index])
            key = FITS_KEYWORDS.get(name, name.upper()[:8])
            if isinstance(v, (int, float, bool, str)) and (not isinstance(v, float) or np.isfinite(v)):
                h[key] = (v, name)
    prov = lc.attrs.get("provenance")
    if prov:
        rec = _provenance_record(prov)  # parsed once, not once per keyword
        if rec is not None:
            h["PIPEVER"] = (str(rec.get("software", {}).get("workflow_lib")), "pipeline version")
        h["CFGHASH"] = (str((rec or {}).get("config_hash", "")), "pipeline config hash")
        digests = (rec or {}).get("input_digests")
        if digests:
            inputs = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
            h["INPHASH"] = (inputs, "hash of the input digests (provenance)")
    tsys = lc.attrs.get("time_system", "BTJD")
    offset = float(lc.attrs.get("time_offset", 2457000.0))
    cols = [
        fits.Column(name="TIME", format="D", unit=tsys, array=lc["time"].values),
        fits.Column(name="CADENCENO", format="J", array=lc["cadenceno"].values.astype(np.int32)),
        fits.Column(name="FLUX", format="E", unit="e-/s", array=lc["flux"].values[index].astype(np.float32)),
        fits.Column(name="FLUX_ERR", format="E", unit="e-/s", array=lc["flux_err"].values[index].astype(np.float32)),
        fits.Column(name="QUALITY", format="J", array=lc["quality"].values.astype(np.int32)),
    ]
    cols += _extra_columns(lc, index)
    table = fits.BinTableHDU.from_columns(cols, name="LIGHTCURVE")
    th = table.header
    th["TIMEREF"] = ("SOLARSYSTEM", "barycentric correction applied to times")
    th["TIMESYS"] = ("TDB", "time system is Barycentric Dynamical Time")
    th["BJDREFI"] = (int(offset), "integer part of BJD reference date")
    th["BJDREFF"] = (offset - int(offset), "fraction of day in BJD reference date")
    th["TIMEUNIT"] = ("d", "time unit for TIME")
    th["TELAPSE"] = float(np.nanmax(lc["time"].values) - np.nanmin(lc["time"].values)) if lc.sizes["time"] else 0.0
    th["OBJECT"] = h["OBJECT"]
    return fits.HDUList([primary, table])


def _extra_columns(lc: xr.Dataset, index: int) -> list:
    """Further ``(source, time)`` variables of the set (e.g. the reference sets of the deblended product,
    ``lfd_flux``), one FITS column each, named in upper case (``LFD_FLUX``), units from their attrs."""
    out = []
    for name in lc.data_vars:
        v = lc[name]
        if name in ("flux", "flux_err") or set(v.dims) != {"source", "time"}:
            continue
        arr = np.asarray(v.transpose("source", "time").values[index], dtype=np.float32)
        unit = "e-/s" if v.attrs.get("units") == "electron / s" else v.attrs.get("units")
        out.append(fits.Column(name=str(name).upper(), format="E", unit=unit, array=arr))
    return out


def _provenance_record(prov: str) -> dict | None:
    """A product's provenance record (the JSON string of its attrs), or None when it is not a JSON object."""
    try:
        rec = json.loads(prov)
    except (TypeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write_lightcurve_fits(lc: xr.Dataset, outdir: str | Path, prefix: str) -> list[Path]:
    """One FITS file per source, ``<outdir>/<prefix>_<source_id>.fits``, each written atomically.

    Two sources that would write the same file (a repeated ``source_id``) are refused with a ValueError
    naming the directory and the first repeated ids, before anything is written."""
    outdir = Path(outdir)
    sids = np.asarray(lc["source_id"].values, dtype=np.int64)
    uniq, counts = np.unique(sids, return_counts=True)
    if (counts > 1).any():
        rep = uniq[counts > 1]
        raise ValueError(
            f"{outdir}: {int(rep.size)} source_id(s) of the {prefix!r} light curves would write the same FITS file "
            f"twice (first: {', '.join(f'{prefix}_{int(i)}.fits' for i in rep[:5])}); source ids must be unique"
        )
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(lc.sizes["source"]):
        sid = int(sids[i])
        path = outdir / f"{prefix}_{sid}.fits"
        with atomic_path(path) as tmp:
            lightcurve_hdulist(lc, i).writeto(tmp, overwrite=True)
        paths.append(path)
    return paths
