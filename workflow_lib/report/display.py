"""What a field page shows: the crop and time binning that keep a page's data within its size budget
(:func:`plan_display`, :func:`display_cube`), other cubes and light-curve sets on the displayed
pixels and cadences (:func:`align_cube`, :func:`align_lcset`), the target, the initial aperture
and the screen stretch. See :mod:`workflow_lib.report.page` for the page-size budget.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import xarray as xr

from workflow_lib.data.cube import as_pixel_table


def data_budget_bytes(max_data_mb: float) -> int:
    """Raw float32 bytes allowed in a page's data folder of ``max_data_mb`` (base64 adds 4/3:
    :mod:`workflow_lib.report.datafiles`)."""
    return int(float(max_data_mb) * 0.75 * 1e6)


@dataclass
class DisplayCube:
    """The pixels and cadences a page shows."""

    flux: np.ndarray  # (npix, ntime_display) float32, pixel-major
    rows: np.ndarray  # (npix,) CCD rows
    cols: np.ndarray  # (npix,) CCD columns
    time: np.ndarray  # (ntime_display,) float64
    cadenceno: np.ndarray  # (ntime_display,) int64, first cadence of each bin
    quality: np.ndarray  # (ntime_display,) int64, OR of the bin
    bin_factor: int
    source_index: np.ndarray  # (npix,) index into the cube's pixel table (as_pixel_table(drop_nan=False))
    cropped: bool
    n_time_full: int


def bin_series(a: np.ndarray, factor: int, axis: int = -1) -> np.ndarray:
    """nanmean of consecutive groups of ``factor`` samples along ``axis`` (last group may be short)."""
    a = np.asarray(a, dtype=np.float64)
    if factor <= 1:
        return a
    a = np.moveaxis(a, axis, -1)
    n = a.shape[-1]
    m = -(-n // factor)
    pad = m * factor - n
    if pad:
        a = np.concatenate([a, np.full(a.shape[:-1] + (pad,), np.nan)], axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmean(a.reshape(a.shape[:-1] + (m, factor)), axis=-1)
    return np.moveaxis(out, -1, axis)


def bin_errors(err: np.ndarray, factor: int, axis: int = -1) -> np.ndarray:
    """1-sigma error of the nanmean of ``factor`` samples (:func:`bin_series`) from the samples'
    errors: sqrt(sum err**2) / n over the finite ones."""
    if factor <= 1:
        return np.asarray(err, dtype=np.float64)
    e = np.asarray(err, dtype=np.float64)
    n = bin_series(np.isfinite(e).astype(float), factor, axis) * factor  # finite samples per bin (short last bin
    # counts its padding as missing)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(bin_series(e**2, factor, axis) * factor) / n


def bin_quality(q: np.ndarray, factor: int) -> np.ndarray:
    """Bitwise OR of QUALITY over consecutive groups of ``factor`` cadences."""
    q = np.asarray(q, dtype=np.int64)
    if factor <= 1:
        return q
    m = -(-q.size // factor)
    padded = np.zeros(m * factor, dtype=np.int64)
    padded[: q.size] = q
    return np.bitwise_or.reduce(padded.reshape(m, factor), axis=1)


def plan_display(
    n_time: int,
    n_rows: int,
    n_cols: int,
    *,
    n_cubes: int = 1,
    extra_bytes_per_cadence: int = 0,
    params: dict,
) -> dict:
    """Choose the crop side and the time-binning factor that keep a page within budget.

    Returns ``{"side_rows", "side_cols", "bin", "bytes", "budget"}``; ``extra_bytes_per_cadence``
    accounts for the light-curve sets (4 bytes x sources x sets). ``params`` is the whole
    ``report`` block (:func:`workflow_lib.report.page.report_params`); ``n_cubes`` counts the cubes in the
    page's data folder (raw, flux_err and CPM de-trended pixels).
    """
    p = params
    budget = data_budget_bytes(p["max_data_mb"])
    sr, sc = min(n_rows, p["max_side"]), min(n_cols, p["max_side"])
    b = max(1, -(-n_time // int(p["max_display_cadences"])))

    def size(sr, sc, b):
        nt = -(-n_time // b)
        return nt * (sr * sc * 4 * n_cubes + extra_bytes_per_cadence)

    if size(sr, sc, b) > budget and p["reduce"] == "crop":
        min_side = int(p["min_side"])
        while size(sr, sc, b) > budget and max(sr, sc) > min_side:
            sr, sc = max(min(sr, min_side), sr - 1), max(min(sc, min_side), sc - 1)
    while size(sr, sc, b) > budget and b < n_time:
        b += 1
    return {"side_rows": sr, "side_cols": sc, "bin": b, "bytes": size(sr, sc, b), "budget": budget}


def _window(coords: np.ndarray, centre: float, side: int) -> tuple[int, int]:
    """Index range [i0, i1) of ``side`` consecutive entries of a sorted coordinate around ``centre``."""
    n = coords.size
    if side >= n:
        return 0, n
    i = int(np.argmin(np.abs(coords - centre)))
    i0 = min(max(0, i - side // 2), n - side)
    return i0, i0 + side


def display_cube(
    ds: xr.Dataset,
    plan: dict,
    centre: tuple[float, float] | None = None,
    stamp: int | None = None,
    variable: str = "flux",
) -> DisplayCube:
    """Crop (around ``centre`` = (row, column) CCD) and time-bin a cube per ``plan``.

    Pixel tables are restricted to one ``stamp`` (default: stamp 0) and cropped the same way.
    """
    n_time = ds.sizes["time"]
    if "pixel" in ds.dims:
        rows_all = ds["row"].values.astype(np.int64)
        cols_all = ds["column"].values.astype(np.int64)
        stamps = ds["stamp"].values if "stamp" in ds.coords else np.zeros(rows_all.size, int)
        st = 0 if stamp is None else stamp
        sel = np.flatnonzero(stamps == st)
        if centre is None:
            centre = (float(np.median(rows_all[sel])), float(np.median(cols_all[sel])))
        ur, uc = np.unique(rows_all[sel]), np.unique(cols_all[sel])
        r0, r1 = _window(ur, centre[0], plan["side_rows"])
        c0, c1 = _window(uc, centre[1], plan["side_cols"])
        keep = sel[
            (rows_all[sel] >= ur[r0])
            & (rows_all[sel] <= ur[r1 - 1])
            & (cols_all[sel] >= uc[c0])
            & (cols_all[sel] <= uc[c1 - 1])
        ]
        flux = np.asarray(ds[variable].isel(pixel=keep).values, dtype=np.float32).T  # (npix, time)
        rows, cols, index = rows_all[keep], cols_all[keep], keep
        cropped = keep.size < rows_all.size
    else:
        rr = ds["row"].values.astype(np.int64)
        cc = ds["column"].values.astype(np.int64)
        if centre is None:
            centre = (float(rr.mean()), float(cc.mean()))
        r0, r1 = _window(rr, centre[0], plan["side_rows"])
        c0, c1 = _window(cc, centre[1], plan["side_cols"])
        sub = np.asarray(ds[variable].isel(row=slice(r0, r1), column=slice(c0, c1)).values, dtype=np.float32)
        nr, nc = r1 - r0, c1 - c0
        flux = sub.reshape(n_time, nr * nc).T
        rows = np.repeat(rr[r0:r1], nc)
        cols = np.tile(cc[c0:c1], nr)
        ir, ic = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        index = (ir * cc.size + ic).ravel()
        cropped = (nr, nc) != (rr.size, cc.size)
    b = int(plan["bin"])
    binned = bin_errors if variable == "flux_err" else bin_series
    flux = np.ascontiguousarray(binned(flux, b, axis=1).astype(np.float32) if b > 1 else flux)
    time = bin_series(ds["time"].values, b)
    cad = (
        np.asarray(ds["cadenceno"].values, dtype=np.int64)[::b] if "cadenceno" in ds.coords else np.arange(0, n_time, b)
    )
    qual = bin_quality(ds["quality"].values, b) if "quality" in ds else np.zeros(time.size, np.int64)
    return DisplayCube(
        flux=flux,
        rows=rows,
        cols=cols,
        time=np.asarray(time, np.float64),
        cadenceno=cad,
        quality=qual,
        bin_factor=b,
        source_index=np.asarray(index),
        cropped=bool(cropped),
        n_time_full=n_time,
    )


def align_cube(other: xr.Dataset, disp: DisplayCube, ref: xr.Dataset, variable: str = "flux") -> np.ndarray:
    """Pixels of ``other`` (e.g. the CPM de-trended cube) on the grid and cadences of ``disp``.

    Pixels are matched by CCD (row, column), cadences by ``cadenceno``; unmatched entries are NaN.
    """

    t = as_pixel_table(other, drop_nan=False)
    key = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(t["row"].values, t["column"].values))}
    pidx = np.array([key.get((int(r), int(c)), -1) for r, c in zip(disp.rows, disp.cols)])
    ref_cad = np.asarray(ref["cadenceno"].values, dtype=np.int64)
    oth_cad = np.asarray(t["cadenceno"].values, dtype=np.int64) if "cadenceno" in t.coords else ref_cad
    pos = {int(c): i for i, c in enumerate(oth_cad)}
    tidx = np.array([pos.get(int(c), -1) for c in ref_cad])
    vals = np.asarray(t[variable].transpose("pixel", "time").values, dtype=np.float32)
    full = np.full((disp.rows.size, ref_cad.size), np.nan, dtype=np.float32)
    okp, okt = pidx >= 0, tidx >= 0
    full[np.ix_(okp, okt)] = vals[np.ix_(pidx[okp], tidx[okt])]
    if disp.bin_factor > 1:
        full = bin_series(full, disp.bin_factor, axis=1).astype(np.float32)
    return np.ascontiguousarray(full)


def align_lcset(
    lc: xr.Dataset, source_ids: np.ndarray, cube: xr.Dataset, bin_factor: int, variable: str = "flux"
) -> np.ndarray:
    """(nsource, ntime_display) float32 ``variable`` (flux or flux_err) of a light-curve set in the order of
    ``source_ids`` and on the cube's (binned) cadences; sources or cadences missing from the set are NaN."""
    ref_cad = np.asarray(cube["cadenceno"].values, dtype=np.int64)
    lc_cad = np.asarray(lc["cadenceno"].values, dtype=np.int64) if "cadenceno" in lc.coords else ref_cad
    pos = {int(c): i for i, c in enumerate(lc_cad)}
    tidx = np.array([pos.get(int(c), -1) for c in ref_cad])
    spos = {int(s): i for i, s in enumerate(np.asarray(lc["source_id"].values, dtype=np.int64))}
    sidx = np.array([spos.get(int(s), -1) for s in source_ids], dtype=np.int64)
    if variable not in lc:
        return np.full((source_ids.size, -(-ref_cad.size // max(bin_factor, 1))), np.nan, np.float32)
    flux = np.asarray(lc[variable].transpose("source", "time").values, dtype=np.float64)
    out = np.full((source_ids.size, ref_cad.size), np.nan)
    oks, okt = sidx >= 0, tidx >= 0
    out[np.ix_(oks, okt)] = flux[np.ix_(sidx[oks], tidx[okt])]
    if bin_factor > 1:
        out = (bin_errors if variable == "flux_err" else bin_series)(out, bin_factor, axis=1)
    return np.ascontiguousarray(out.astype(np.float32))


# ------------------------------------------------------------------ target, aperture, stretch


def choose_target(catalog, rows: np.ndarray, cols: np.ndarray, max_offset: float = 0.25) -> int | None:
    """Row index in ``catalog`` of the brightest source within ``max_offset`` x (field size) of
    the centre of the pixels ``rows``/``cols``; ``None`` without a usable catalog."""
    if catalog is None or len(catalog) == 0 or "phot_g_mean_mag" not in catalog.colnames:
        return None
    cr, cc = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    size = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    r = np.asarray(catalog["row"], float)
    c = np.asarray(catalog["column"], float)
    g = np.asarray(catalog["phot_g_mean_mag"], float)
    near = np.hypot(r - cr, c - cc) <= max(max_offset * size, 1.5)
    on = (r >= rows.min() - 0.5) & (r <= rows.max() + 0.5) & (c >= cols.min() - 0.5) & (c <= cols.max() + 0.5)
    cand = np.flatnonzero(near & on & np.isfinite(g))
    if cand.size == 0:
        cand = np.flatnonzero(on & np.isfinite(g))
    if cand.size == 0:
        return None
    return int(cand[np.argmin(g[cand])])


def default_aperture(
    disp: DisplayCube, cube: xr.Dataset, target_rc: tuple[float, float] | None, radius: float
) -> np.ndarray:
    """Initial pixel selection (bool per displayed pixel): the cube's ``aperture`` variable when
    it has one, else pixels within ``radius`` of the target, else the brightest pixel."""
    if "aperture" in cube:
        ap = np.asarray(cube["aperture"].values).astype(bool)
        if ap.ndim == 2 or ap.ndim == 1:
            flat = ap.ravel()
            if flat.size > int(disp.source_index.max()):
                sel = flat[disp.source_index]
                if sel.any():
                    return sel
    if target_rc is not None:
        d = np.hypot(disp.rows - target_rc[0], disp.cols - target_rc[1])
        sel = d <= radius
        if sel.any():
            return sel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(disp.flux, axis=1)
    sel = np.zeros(disp.rows.size, bool)
    if np.isfinite(med).any():
        sel[int(np.nanargmax(med))] = True
    return sel


def initial_cadence(disp: DisplayCube) -> int:
    """The displayed cadence a page opens on: a typical frame, not a flagged scattered-light peak.

    Among cadences with QUALITY == 0 (every flag, not only the hard ones) and at least one finite pixel, the
    one whose median pixel flux (a background proxy) is closest to the median of those medians; ties go
    to the cadence nearest the middle. Without such a cadence: the middle one."""
    nt = disp.flux.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = np.nanmedian(disp.flux, axis=0) if disp.flux.size else np.full(nt, np.nan)
    good = (np.asarray(disp.quality) == 0) & np.isfinite(level)
    if not good.any():
        return nt // 2
    idx = np.flatnonzero(good)
    dist = np.abs(level[idx] - np.median(level[idx]))
    order = np.lexsort((np.abs(idx - nt // 2), dist))
    return int(idx[order[0]])


#: at most this many values of a cube enter the stretch slider's range (screen_stretch)
STRETCH_SAMPLE = 2_000_000


def screen_stretch(values: np.ndarray, percentiles, frame: np.ndarray | None = None) -> dict:
    """Screen-stretch limits: slider range (0.2/99.8 % of the whole cube -- of an evenly strided sample of
    :data:`STRETCH_SAMPLE` values for a larger one --, widened to contain the
    initial limits), initial limits ``lo``/``hi`` (``percentiles`` of ``frame``, the frame shown
    first -- a whole-cube percentile would saturate frames in scattered-light ramps -- or of
    ``values`` without a frame) and the smallest positive value (the floor of the log mapper)."""
    values = np.asarray(values).ravel()
    if values.size > STRETCH_SAMPLE:  # the slider's range from an evenly strided sample (a sector's cube: 10^8)
        values = values[:: -(-values.size // STRETCH_SAMPLE)]
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"vlo": 0.0, "lo": 0.0, "hi": 1.0, "vhi": 1.0, "pos": 1e-3}
    vlo, vhi = np.percentile(v, [0.2, 99.8])
    fv = v if frame is None else np.asarray(frame, float)[np.isfinite(frame)]
    if fv.size == 0:
        fv = v
    lo, hi = np.percentile(fv, [percentiles[0], percentiles[1]])
    pos = v[v > 0]
    pmin = float(np.percentile(pos, 0.2)) if pos.size else 1e-3
    vlo, vhi = min(vlo, lo), max(vhi, hi)
    if vhi <= vlo:
        vhi = vlo + 1.0
    hi = max(hi, lo + 1e-6 * (vhi - vlo))
    return {"vlo": float(vlo), "lo": float(lo), "hi": float(hi), "vhi": float(vhi), "pos": max(pmin, 1e-6)}


def mean_image(disp: DisplayCube) -> np.ndarray:
    """Image (rows x columns) of the displayed pixels' median flux."""
    rows, cols = np.unique(disp.rows), np.unique(disp.cols)
    img = np.full((rows.size, cols.size), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(disp.flux, axis=1)
    img[np.searchsorted(rows, disp.rows), np.searchsorted(cols, disp.cols)] = med
    return img


def field_overview(ds: xr.Dataset, max_side: int = 128, max_frames: int = 100) -> dict | None:
    """A coarse picture of a whole image-layout cube for a page that shows only part of it: the median of up to
    ``max_frames`` quality-0 frames (evenly spaced), averaged over k x k pixel blocks so that no side exceeds
    ``max_side``. Returns ``{"image" (rows, cols), "row0", "col0", "k", "n_frames"}`` (CCD row / column of the
    first block's corner pixel); None for a pixel table."""
    if "pixel" in ds.dims:
        return None
    q = np.asarray(ds["quality"].values) if "quality" in ds else np.zeros(ds.sizes["time"], int)
    good = np.flatnonzero(q == 0)
    if good.size == 0:
        good = np.arange(ds.sizes["time"])
    idx = good[np.linspace(0, good.size - 1, min(max_frames, good.size)).round().astype(int)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(np.asarray(ds["flux"].isel(time=np.unique(idx)).values, dtype=np.float64), axis=0)
    nr, nc = med.shape
    k = max(1, -(-max(nr, nc) // max_side))
    pr, pc = -(-nr // k) * k - nr, -(-nc // k) * k - nc
    padded = np.pad(med, ((0, pr), (0, pc)), constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        img = np.nanmean(padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k), axis=(1, 3))
    return {
        "image": img,
        "row0": int(ds["row"].values[0]),
        "col0": int(ds["column"].values[0]),
        "k": k,
        "n_frames": int(np.unique(idx).size),
    }
