import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.table import Table

from workflow_lib.core.atomic import atomic_dir, atomic_path, remove_stale_tmp
from workflow_lib.core.linalg import finite_median
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance_json
from workflow_lib.core.quality import HARD_BITMASK
from workflow_lib.cpm.apertures import ApertureParams, aperture_lightcurves
from workflow_lib.cpm.model import (
    CPMNotApplicable,
    CPMWarning,
    cpm_detrend_cube,
    cpm_not_applied,
    paramset_params,
    skip_unmodellable,
)
from workflow_lib.cpm.stitch import stitch_sectors
from workflow_lib.data.cube import open_cube, write_zarr_atomic
from workflow_lib.data.lightcurves import lightcurve_set, write_lightcurve_fits
from workflow_lib.metrics import add_cdpp

log = get_logger("cpm")


def _read_catalog(path):
    from workflow_lib.data.gaia import read_field_catalog

    return None if path is None else read_field_catalog(path)


def write_fits_dir(sets, fits_dir, enabled: bool = True) -> Path:
    """Write one FITS per source of each ``(light-curve set, prefix)`` into ``fits_dir``, atomically
    (:func:`workflow_lib.core.atomic.atomic_dir`: a temporary sibling directory renamed into place).
    With ``enabled`` false the directory is made empty (the rule's declared output, FITS switched off)."""
    fits_dir = Path(fits_dir)
    with atomic_dir(fits_dir) as tmp:
        for lc, prefix in sets if enabled else ():
            write_lightcurve_fits(lc, tmp, prefix)
    return fits_dir


def run_cpm_detrend(
    cube_path,
    catalog_path,
    *,
    detrended_path,
    lightcurves_path,
    raw_lightcurves_path,
    fits_dir,
    config: dict,
    paramset: str = "default",
    target_aperture: dict | None = None,
    threads: int = 1,
    field: str = "",
    cdpp_hours=(1.0, 6.0),
) -> dict:
    """Snakemake step ``cpm_detrend``: de-trend every pixel, write the cube, the CPM and RAW
    aperture light curves (zarr + one FITS per source).  Returns a small summary dict.

    The light-curve sets carry the CDPP proxy ``cdpp_<h>h`` of every ``cdpp_hours`` (1 h and 6 h always)."""

    params = paramset_params(config, paramset)
    remove_stale_tmp(detrended_path, lightcurves_path, raw_lightcurves_path, fits_dir)  # debris of a killed run
    ap = ApertureParams(**(config.get("aperture") or {}))
    cube = open_cube(cube_path).load()
    catalog = _read_catalog(catalog_path)
    name = str(cube_path)
    prov_cfg = {
        "cpm": asdict(params),
        "aperture": asdict(ap),
        "paramset": paramset,
        "field": field,
        "target_aperture": target_aperture or {},
    }
    inputs = [cube_path, catalog_path]
    try:
        det = cpm_detrend_cube(cube, params, threads=threads, name=name, config=prov_cfg, inputs=inputs)
    except CPMNotApplicable as exc:
        reason = skip_unmodellable(exc, config.get("on_unmodellable"), "the CPM light curves of this cube are NaN")
        det = cpm_not_applied(cube, reason, params, config=prov_cfg, inputs=inputs)
    write_zarr_atomic(det, detrended_path)
    log.info("wrote %s", detrended_path)
    prov = provenance_json("cpm_lightcurves", inputs=[cube_path, catalog_path], config=prov_cfg)
    bitmask = (
        params.quality_bitmask
        if params.quality_bitmask is not None
        else HARD_BITMASK.get(cube.attrs.get("mission", "TESS"), 24319)
    )
    cpm_lc, raw_lc = aperture_lightcurves(
        cube, det, catalog, ap, user_apertures=target_aperture, provenance=prov, name=name, bitmask=bitmask
    )
    cpm_lc = _with_cdpp(cpm_lc, cdpp_hours, bitmask)
    raw_lc = _with_cdpp(raw_lc, cdpp_hours, bitmask)
    cpm_lc.attrs["paramset"] = paramset
    raw_lc.attrs["paramset"] = paramset
    if "cpm_not_applied" in det.attrs:
        cpm_lc.attrs["cpm_not_applied"] = det.attrs["cpm_not_applied"]
    write_zarr_atomic(cpm_lc, lightcurves_path)
    write_zarr_atomic(raw_lc, raw_lightcurves_path)
    # no CPM FITS files of NaN fluxes when the CPM could not model the cube
    fits_sets = [(raw_lc, "raw")] if "cpm_not_applied" in det.attrs else [(cpm_lc, "cpm"), (raw_lc, "raw")]
    write_fits_dir(fits_sets, fits_dir, enabled=config.get("write_fits", True))
    summary = {
        "n_sources": int(cpm_lc.sizes["source"]),
        "median_cdpp_1h_cpm": finite_median(cpm_lc["cdpp_1h"].values),
        "median_cdpp_1h_raw": finite_median(raw_lc["cdpp_1h"].values),
    }
    log.info(
        "CPM %s: %d light curves, median 1-h CDPP %.0f ppm (raw %.0f ppm)",
        paramset,
        summary["n_sources"],
        summary["median_cdpp_1h_cpm"],
        summary["median_cdpp_1h_raw"],
    )
    return summary


def sweep_summary(lightcurve_paths: dict, raw_path, out_path, *, lfd_path=None, mag_range=(8.0, 14.0)) -> "Table":
    """ECSV table comparing parameter sets by CDPP (median over catalog sources with G in ``mag_range``).

    ``lightcurve_paths``: paramset name -> CPM lightcurves.zarr.  A RAW row (and an LFD row when
    ``lfd_path`` exists; CDPP added with :func:`workflow_lib.metrics.add_cdpp` if missing) is included.
    """
    from astropy.table import Table

    rows = []

    def _row(label, method, path):
        lc = xr.open_zarr(path, consolidated=False).load()
        if "cdpp_1h" not in lc.coords:
            lc = add_cdpp(lc)
        g = lc["phot_g_mean_mag"].values if "phot_g_mean_mag" in lc.coords else np.full(lc.sizes["source"], np.nan)
        sel = (lc["source_id"].values >= 0) & (g >= mag_range[0]) & (g <= mag_range[1])
        lam = (
            json.loads(lc.attrs.get("provenance", "{}")).get("config", {}).get("cpm", {}).get("lambda_L", np.nan)
            if method == "CPM"
            else np.nan
        )
        rows.append(
            {
                "paramset": label,
                "method": method,
                "lambda_L": float(lam),
                "n_sources": int(sel.sum()),
                "median_cdpp_1h": finite_median(lc["cdpp_1h"].values[sel]),
                "median_cdpp_6h": finite_median(lc["cdpp_6h"].values[sel]),
            }
        )

    _row("raw", "RAW", raw_path)
    if lfd_path is not None and Path(lfd_path).exists():
        _row("lfd", "LFD", lfd_path)
    for label, path in lightcurve_paths.items():
        _row(label, "CPM", path)
    table = Table(rows=rows)
    table.meta["mag_range"] = list(mag_range)
    table.meta["provenance"] = provenance_json("cpm_sweep_summary", inputs=[raw_path, *lightcurve_paths.values()])
    with atomic_path(out_path) as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)
    return table


def _with_cdpp(lc: xr.Dataset, hours, bitmask: int) -> xr.Dataset:
    """``lc`` with the CDPP proxy of every ``hours`` it does not carry yet (:func:`workflow_lib.metrics.add_cdpp`)."""
    missing = tuple(h for h in hours if f"cdpp_{h:g}h" not in lc.coords)
    return add_cdpp(lc, hours=missing, bitmask=bitmask) if missing else lc


def run_cpm_stitch(
    lightcurve_paths: list, out_path, fits_dir, *, n_points: int = 100, group: str = "", cdpp_hours=(1.0, 6.0)
) -> xr.Dataset:
    """Snakemake step ``cpm_stitch``: stitch the light curves of sources present in every
    sector (same source_id, or same user-aperture name) in time order (paper §4.1); with the CDPP
    proxy ``cdpp_<h>h`` of every ``cdpp_hours``."""

    remove_stale_tmp(out_path, fits_dir)  # debris of a killed run
    sets = [xr.open_zarr(p, consolidated=False).load() for p in lightcurve_paths]
    if not sets:
        raise ValueError(f"cpm_stitch {group}: no light-curve sets")
    sets.sort(key=lambda s: float(np.nanmin(s["time"].values)))
    for a, b in zip(sets[:-1], sets[1:]):
        if np.nanmin(b["time"].values) <= np.nanmax(a["time"].values):
            msg = f"cpm_stitch {group}: sectors overlap in time; stitching assumes consecutive sectors"
            log.warning(msg)
            warnings.warn(msg, CPMWarning, stacklevel=2)

    def keys(s):
        names = s["aperture_name"].values if "aperture_name" in s.coords else s["source_id"].values.astype(str)
        return [str(x) if sid < 0 else str(sid) for x, sid in zip(names, s["source_id"].values)]

    common = set(keys(sets[0]))
    for s in sets[1:]:
        common &= set(keys(s))
    common = sorted(common)
    if not common:
        raise ValueError(f"cpm_stitch {group}: no source appears in all of {list(map(str, lightcurve_paths))}")
    fluxes, errs, offsets = [], [], []
    time = np.concatenate([s["time"].values for s in sets])
    for key in common:
        parts = [
            (s["time"].values, s["flux"].values[keys(s).index(key)], s["flux_err"].values[keys(s).index(key)])
            for s in sets
        ]
        t, f, off = stitch_sectors([p[0] for p in parts], [p[1] for p in parts], n_points)
        fluxes.append(f)
        errs.append(np.concatenate([p[2] for p in parts]))
        offsets.append(off)
    first = sets[0]
    idx0 = [keys(first).index(k) for k in common]
    meta = {c: first[c].values[idx0] for c in first.coords if first[c].dims == ("source",) and not c.startswith("cdpp")}
    pseudo = xr.Dataset(
        {"quality": ("time", np.concatenate([s["quality"].values for s in sets]))},
        coords={
            "time": ("time", time, dict(first["time"].attrs)),
            "cadenceno": ("time", np.concatenate([s["cadenceno"].values for s in sets])),
        },
        attrs={k: v for k, v in first.attrs.items() if k not in ("sector", "provenance")},
    )
    prov = provenance_json("cpm_stitch", inputs=lightcurve_paths, config={"n_points": n_points, "group": group})
    lc = lightcurve_set(
        np.array(fluxes),
        np.array(errs),
        pseudo,
        meta,
        method=first.attrs.get("method", "CPM"),
        attrs={"provenance": prov, "sectors": json.dumps([s.attrs.get("sector") for s in sets], default=str)},
    )
    lc = lc.assign_coords(stitch_offset=(("source", "segment"), np.array(offsets)))

    lc = add_cdpp(lc, hours=tuple(cdpp_hours))
    write_zarr_atomic(lc, out_path)
    write_fits_dir([(lc, "cpm_stitched")], fits_dir)
    return lc
