import json
from dataclasses import asdict, dataclass

import numpy as np
import xarray as xr

from workflow_lib.core.quality import HARD_BITMASK
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.data.cube import CubeError, as_pixel_table
from workflow_lib.data.lightcurves import lightcurve_set
from workflow_lib.metrics import add_cdpp

#: the ``cpm.aperture`` defaults of the schema (the one place they are written down)
_DEFAULTS = schema_defaults("cpm.aperture")


@dataclass(frozen=True)
class ApertureParams:
    """Circular apertures around catalog sources: radius r(G) = clip(r_max - slope (G - mag_bright), r_min, r_max).

    Defaults: the ``cpm.aperture`` section of the schema."""

    radius_min: float = _DEFAULTS["radius_min"]
    radius_max: float = _DEFAULTS["radius_max"]
    mag_bright: float = _DEFAULTS["mag_bright"]
    slope: float = _DEFAULTS["slope"]
    mag_limit: float | None = _DEFAULTS["mag_limit"]


def aperture_params(config: dict | None = None) -> ApertureParams:
    """ApertureParams from the ``cpm.aperture`` config section over the schema defaults; unknown keys are errors."""
    return ApertureParams(**merge_settings(schema_defaults("cpm.aperture"), config, "cpm.aperture", ValueError))


def aperture_radius(gmag, ap: ApertureParams) -> np.ndarray:
    """Aperture radius [px] from the Gaia G magnitude (brighter -> larger; documented in the schema)."""
    g = np.asarray(gmag, dtype=np.float64)
    r = ap.radius_max - ap.slope * (np.where(np.isfinite(g), g, 99.0) - ap.mag_bright)
    return np.clip(r, ap.radius_min, ap.radius_max)


def source_apertures(catalog, rows, cols, ap: ApertureParams, *, user_apertures: dict | None = None, name="catalog"):
    """Aperture pixel index lists: catalog sources on the cutout, then the user apertures.

    A source's aperture holds the pixels whose centre is within r(G) of its (row, column); at least
    the nearest pixel.  User apertures (name -> [[row, column], ...]) get source_id -1, -2, ...
    Returns ``(apertures, columns)`` with columns a dict of per-aperture metadata.
    """
    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    apertures, meta = (
        [],
        {"source_id": [], "row": [], "column": [], "phot_g_mean_mag": [], "aperture_radius": [], "aperture_name": []},
    )
    if catalog is not None and len(catalog):
        sel = np.ones(len(catalog), dtype=bool)
        if "on_cutout" in catalog.colnames:
            sel &= np.asarray(catalog["on_cutout"], dtype=bool)
        g = np.asarray(catalog["phot_g_mean_mag"], dtype=np.float64)
        if ap.mag_limit is not None:
            sel &= g <= ap.mag_limit
        radius = aperture_radius(g, ap)
        for i in np.flatnonzero(sel):
            r0, c0 = float(catalog["row"][i]), float(catalog["column"][i])
            d2 = (rows - r0) ** 2 + (cols - c0) ** 2
            if d2.min() > 0.5:  # nearest pixel centre farther than ~0.7 px: not on this cube
                continue
            pix = np.flatnonzero(d2 <= radius[i] ** 2)
            if pix.size == 0:
                pix = np.array([int(np.argmin(d2))])
            apertures.append(pix)
            meta["source_id"].append(int(catalog["source_id"][i]))
            meta["row"].append(r0)
            meta["column"].append(c0)
            meta["phot_g_mean_mag"].append(g[i])
            meta["aperture_radius"].append(float(radius[i]))
            meta["aperture_name"].append(f"Gaia DR3 {int(catalog['source_id'][i])}")
    lookup = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    for j, (uname, pixels) in enumerate((user_apertures or {}).items()):
        idx = []
        for rc in pixels:
            key = (int(rc[0]), int(rc[1]))
            if key not in lookup:
                raise CubeError(f"{name}: target_aperture {uname!r} pixel [row, column]={list(key)} is not on the cube")
            idx.append(lookup[key])
        idx = np.array(sorted(set(idx)))
        apertures.append(idx)
        meta["source_id"].append(-(j + 1))
        meta["row"].append(float(rows[idx].mean()))
        meta["column"].append(float(cols[idx].mean()))
        meta["phot_g_mean_mag"].append(np.nan)
        meta["aperture_radius"].append(np.nan)
        meta["aperture_name"].append(str(uname))
    meta = {k: np.asarray(v) for k, v in meta.items()}
    meta["source_id"] = meta["source_id"].astype(np.int64)
    meta["aperture_npix"] = np.array([a.size for a in apertures], dtype=np.int32)
    return apertures, meta


def aperture_sums(flux, flux_err, apertures, valid=None):
    """Sum of pixel flux over each aperture, ``(nsource, ntime)``; errors added in quadrature.

    Pixels that are not ``valid`` (bad/all-NaN) are left out of every aperture.
    """
    flux = np.asarray(flux, dtype=np.float64)
    err = np.asarray(flux_err, dtype=np.float64)
    out = np.full((len(apertures), flux.shape[0]), np.nan)
    oerr = np.full_like(out, np.nan)
    for i, pix in enumerate(apertures):
        if valid is not None:
            pix = pix[valid[pix]]
        if pix.size:
            out[i] = flux[:, pix].sum(axis=1)
            oerr[i] = np.sqrt((err[:, pix] ** 2).sum(axis=1))
    return out, oerr


def aperture_lightcurves(
    cube: xr.Dataset,
    detrended: xr.Dataset,
    catalog,
    ap: ApertureParams,
    *,
    user_apertures=None,
    provenance: str = "",
    name: str = "cube",
    bitmask: int | None = None,
):
    """CPM and RAW aperture light-curve sets (``method`` "CPM" / "RAW") with CDPP coords.

    CPM: sum of de-trended pixels (already rescaled to e-/s); RAW: sum of the input pixels.
    Pixels that are not finite anywhere in the de-trended cube are left out of both; for a cube the CPM
    could not model (attribute ``cpm_not_applied``, every de-trended value NaN) the RAW sums use the pixels
    finite anywhere in the input cube.
    """

    tab = as_pixel_table(cube, drop_nan=False)
    dtab = as_pixel_table(detrended, drop_nan=False)
    rows, cols = tab["row"].values, tab["column"].values
    apertures, meta = source_apertures(catalog, rows, cols, ap, user_apertures=user_apertures, name=name)
    valid = np.isfinite((tab if "cpm_not_applied" in detrended.attrs else dtab)["flux"].values).any(axis=0)
    raw_f, raw_e = aperture_sums(tab["flux"].values, tab["flux_err"].values, apertures, valid)
    cpm_f, cpm_e = aperture_sums(dtab["flux"].values, dtab["flux_err"].values, apertures, valid)
    attrs = {"provenance": provenance, "aperture": json.dumps(asdict(ap))}
    if bitmask is None:
        bitmask = HARD_BITMASK.get(cube.attrs.get("mission", "TESS"), HARD_BITMASK["TESS"])
    cpm_lc = add_cdpp(lightcurve_set(cpm_f, cpm_e, cube, meta, method="CPM", attrs=attrs), bitmask=bitmask)
    raw_lc = add_cdpp(lightcurve_set(raw_f, raw_e, cube, meta, method="RAW", attrs=attrs), bitmask=bitmask)
    return cpm_lc, raw_lc
