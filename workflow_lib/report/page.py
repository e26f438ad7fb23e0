"""Static HTML inspection reports with embedded Bokeh (offline, no server).

One page per field (``results/<run>/report/<field>.html``) reproduces lightkurve's
``tpf.interact()`` in a plain HTML file -- cadence slider, play/pause, arrow keys, red bar on the
light curve, click-to-seek, screen-stretch slider (log, 1%/95% percentiles), hover tooltips with
decoded QUALITY flags, tap / shift-tap / box selection of pixels with the light curve re-summed in
JavaScript, mask (JSON) and light-curve (CSV) export -- and adds the pipeline's products when they
exist: Gaia sources over the image, LFD / CPM light curves of a tapped source, raw / CPM de-trended
image switch, PRF model picture, motion model (scene offsets [px] and the PRF factor change over
time, :func:`motion_panel`), mean-frame data / LFD model / residual computed from the LFD outputs
(:func:`lfd_mean_residual`), quality-flag timeline and a sortable source table. The initial
screen stretch is ``report.percentiles`` of the frame shown first; median CDPPs are over one common
source set (:func:`cdpp_common_set`).

Data are embedded as Bokeh ``ColumnDataSource`` columns of numpy ``float32`` arrays, which Bokeh
serialises as (gzip-compressed, base64) binary buffers and BokehJS decodes into ``Float32Array``.
The pixel cube is stored pixel-major, ``flux[p * n_time + t]``.

Page size budget
----------------
A 64x64 pixel x 1300 cadence cube is 21.3 MB of float32. Embedded arrays are counted at their raw
size; base64 adds 4/3 in the worst case (Bokeh also gzips, which helps little on noisy floats), and
the inline BokehJS adds ~4 MB. The embedded budget is therefore
``(report.max_page_mb - 6) * 3/4`` MB (33 MB for the default 50 MB page). When the cubes (raw +
CPM de-trended) and light-curve sets do not fit, the display is reduced (``report.reduce``):

* ``crop`` (default): the image is cropped to a square around the target until it fits, then
  cadences are binned if even the smallest crop (``report.min_side``) does not fit;
* ``bin``: consecutive cadences are averaged (nanmean; QUALITY bits OR-ed; the first cadence
  number of each bin is shown).

Independently of the budget, images larger than ``report.max_side`` are cropped, and series longer
than ``report.max_display_cadences`` are binned for display, so that > 30,000 cadence series stay
responsive. The page states what was done.

Determinism: Bokeh model ids and the embed ids are made deterministic (:func:`deterministic_ids`),
the page carries no timestamp, and PNG thumbnails carry no software/time metadata, so the same
inputs give byte-identical pages (the index page shows the benchmark timings, which differ
between runs by nature).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import gzip
import io
import itertools
import json
import re
import warnings
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import xarray as xr

from workflow_lib import __version__
from workflow_lib.core.atomic import write_text_atomic
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import config_hash, software_versions
from workflow_lib.core.quality import TESS_QUALITY_FLAGS, quality_flags
from workflow_lib.data.cube import CubeError, as_pixel_table, open_cube
from workflow_lib.lfd.diagnostics import lfd_mean_residual, motion_panel
from workflow_lib.lfd.io import load_motion_model
from workflow_lib.lfd.prf import PRFModel

log = get_logger("report")

TEMPLATE_DIR = Path(__file__).parent / "templates"

# ------------------------------------------------------------------ QUALITY bit tables


# ------------------------------------------------------------------ configuration

#: defaults of the ``report:`` config block (mirrors config/schema.yaml)
DEFAULTS = {
    "max_page_mb": 50.0,
    "reduce": "crop",
    "max_side": 64,
    "min_side": 9,
    "max_display_cadences": 20000,
    "aperture_radius": 1.6,
    "target_max_offset": 0.25,
    "percentiles": [1.0, 95.0],
    "stretch": "log",
    "play_interval_ms": 150,
    "cdpp_hours": 1.0,
    "cdpp_mag_limit": 15.0,
    "cpm_paramset": None,
    "thumbnail_px": 160,
}


def report_params(cfg: dict | None = None) -> dict:
    """The ``report`` config block with defaults filled in; unknown keys are errors."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown report option(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = dict(DEFAULTS)
    out.update({k: v for k, v in cfg.items()})
    if out["reduce"] not in ("crop", "bin"):
        raise ValueError(f"report.reduce must be 'crop' or 'bin', got {out['reduce']!r}")
    if out["stretch"] not in ("log", "linear"):
        raise ValueError(f"report.stretch must be 'log' or 'linear', got {out['stretch']!r}")
    lo, hi = out["percentiles"]
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"report.percentiles must satisfy 0 <= low < high <= 100, got {out['percentiles']}")
    return out


def embed_budget_bytes(max_page_mb: float) -> int:
    """Raw bytes of embedded arrays allowed for a page of ``max_page_mb`` (see module doc)."""
    return int(max(1.0, (float(max_page_mb) - 6.0)) * 0.75 * 1e6)


# ------------------------------------------------------------------ loading (tolerant)


@dataclass
class FieldProducts:
    """Everything the field page can show; absent stages are ``None``."""

    field: str
    cube: xr.Dataset
    catalog: object | None = None  # astropy Table
    lfd: xr.Dataset | None = None
    cpm: xr.Dataset | None = None
    cpm_raw: xr.Dataset | None = None
    detrended: xr.Dataset | None = None
    cpm_paramset: str | None = None
    prf_png: bytes | None = None
    motion: dict | None = None  # raw arrays of motion_model.npz (any layout)
    motion_model: object | None = None  # workflow_lib.motion.MotionModel (None when unreadable)
    prf: object | None = None  # workflow_lib.prf.PRFModel
    edge: object | None = None
    mean_residual: dict | None = None  # {"data", "model", "residual"} per pixel-table pixel, "label"
    notes: list = dc_field(default_factory=list)


def _open_lcset(path: Path, notes: list) -> xr.Dataset | None:
    if not path.exists():
        return None
    try:
        ds = xr.open_zarr(path, consolidated=False).load()
        for v in ("flux", "source_id"):
            if v not in ds:
                raise ValueError(f"missing {v!r}")
        return ds
    except Exception as exc:  # a half-finished stage must not break the report
        notes.append(f"{path}: unreadable light-curve set ({exc}); section skipped")
        log.warning("%s: unreadable light-curve set (%s); skipped", path, exc)
        return None


def find_cpm_dir(field_dir: Path, paramset: str | None = None) -> Path | None:
    """``<field>/cpm/<paramset>``; without ``paramset`` the first (sorted) one holding outputs."""
    base = Path(field_dir) / "cpm"
    if paramset:
        return base / paramset if (base / paramset).is_dir() else None
    if not base.is_dir():
        return None
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any((d / n).exists() for n in ("lightcurves.zarr", "detrended.zarr", "raw_lightcurves.zarr")):
            return d
    return None


def load_field_products(field_dir, *, field: str | None = None, cpm_paramset: str | None = None) -> FieldProducts:
    """Read a field's outputs: cube and catalog, plus whatever LFD / CPM products exist."""
    from astropy.table import Table

    field_dir = Path(field_dir)
    field = field or field_dir.name
    cube = open_cube(field_dir / "cube.zarr")
    fp = FieldProducts(field=field, cube=cube)
    cat = field_dir / "catalog.ecsv"
    if cat.exists():
        fp.catalog = Table.read(cat, format="ascii.ecsv")
    else:
        fp.notes.append("catalog.ecsv absent: no Gaia sources shown")
    lfd = field_dir / "lfd"
    if lfd.is_dir():
        fp.lfd = _open_lcset(lfd / "lightcurves.zarr", fp.notes)
        png = lfd / "prf_model.png"
        if png.exists():
            fp.prf_png = png.read_bytes()
        pnpz = lfd / "prf_model.npz"
        if pnpz.exists():
            try:
                fp.prf = PRFModel.load(pnpz)
            except Exception as exc:
                fp.notes.append(f"{pnpz}: unreadable PRF model ({exc})")
        npz = lfd / "motion_model.npz"
        if npz.exists():
            try:
                with np.load(npz, allow_pickle=False) as z:
                    fp.motion = {k: np.asarray(z[k]) for k in z.files}
            except Exception as exc:
                fp.notes.append(f"{npz}: unreadable ({exc})")
            if fp.motion is not None:
                try:
                    fp.motion_model = load_motion_model(npz)
                except Exception as exc:
                    fp.notes.append(f"{npz}: not a motion model this report can evaluate ({exc})")
        edge = lfd / "edge_model.json"
        if edge.exists():
            try:
                fp.edge = json.loads(edge.read_text())
            except ValueError as exc:
                fp.notes.append(f"{edge}: unreadable ({exc})")
        if fp.prf is None or fp.lfd is None or fp.catalog is None:
            miss = [
                n
                for n, v in (("prf_model.npz", fp.prf), ("lightcurves.zarr", fp.lfd), ("catalog.ecsv", fp.catalog))
                if v is None
            ]
            fp.notes.append(f"mean-frame residual panel skipped: LFD output missing ({', '.join(miss)})")
        else:
            try:
                fp.mean_residual = lfd_mean_residual(cube, fp.catalog, fp.prf, fp.lfd, fp.motion_model)
                fp.notes.extend(fp.mean_residual.pop("notes", []))
            except Exception as exc:  # a report must not fail on a half-compatible LFD output
                fp.notes.append(f"mean-frame residual panel skipped: {type(exc).__name__}: {exc}")
                log.warning("%s: mean-frame residual not computed (%s)", field, exc)
    cdir = find_cpm_dir(field_dir, cpm_paramset)
    if cdir is not None:
        fp.cpm_paramset = cdir.name
        fp.cpm = _open_lcset(cdir / "lightcurves.zarr", fp.notes)
        fp.cpm_raw = _open_lcset(cdir / "raw_lightcurves.zarr", fp.notes)
        det = cdir / "detrended.zarr"
        if det.exists():
            try:
                fp.detrended = open_cube(det, validate=False)
                if "flux" not in fp.detrended:
                    raise CubeError("no flux variable")
            except Exception as exc:
                fp.detrended = None
                fp.notes.append(f"{det}: unreadable de-trended cube ({exc})")
    elif cpm_paramset:
        fp.notes.append(f"CPM parameter set {cpm_paramset!r} has no outputs yet")
    return fp


# ------------------------------------------------------------------ display reduction


@dataclass
class DisplayCube:
    """The pixels and cadences embedded in a page."""

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
    params: dict | None = None,
) -> dict:
    """Choose the crop side and the time-binning factor that keep a page within budget.

    Returns ``{"side_rows", "side_cols", "bin", "bytes", "budget"}``; ``extra_bytes_per_cadence``
    accounts for the light-curve sets (4 bytes x sources x sets).
    """
    p = report_params(params)
    budget = embed_budget_bytes(p["max_page_mb"])
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
    flux = np.ascontiguousarray(bin_series(flux, b, axis=1).astype(np.float32) if b > 1 else flux)
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


def align_lcset(lc: xr.Dataset, source_ids: np.ndarray, cube: xr.Dataset, bin_factor: int) -> np.ndarray:
    """(nsource, ntime_display) float32 flux of a light-curve set in the order of ``source_ids``
    and on the cube's (binned) cadences; sources or cadences missing from the set are NaN."""
    ref_cad = np.asarray(cube["cadenceno"].values, dtype=np.int64)
    lc_cad = np.asarray(lc["cadenceno"].values, dtype=np.int64) if "cadenceno" in lc.coords else ref_cad
    pos = {int(c): i for i, c in enumerate(lc_cad)}
    tidx = np.array([pos.get(int(c), -1) for c in ref_cad])
    spos = {int(s): i for i, s in enumerate(np.asarray(lc["source_id"].values, dtype=np.int64))}
    sidx = np.array([spos.get(int(s), -1) for s in source_ids], dtype=np.int64)
    flux = np.asarray(lc["flux"].transpose("source", "time").values, dtype=np.float64)
    out = np.full((source_ids.size, ref_cad.size), np.nan)
    oks, okt = sidx >= 0, tidx >= 0
    out[np.ix_(oks, okt)] = flux[np.ix_(sidx[oks], tidx[okt])]
    if bin_factor > 1:
        out = bin_series(out, bin_factor, axis=1)
    return np.ascontiguousarray(out.astype(np.float32))


# ------------------------------------------------------------------ targets, apertures, metrics


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


def cdpp_ppm(flux, time, hours: float = 1.0) -> float:
    """Combined differential photometric precision [ppm] over ``hours``: robust scatter
    (1.4826 MAD) of the running mean of the normalised, de-trended (running-median, 1 d) series."""
    from scipy.ndimage import median_filter, uniform_filter1d

    flux = np.asarray(flux, float)
    time = np.asarray(time, float)
    ok = np.isfinite(flux) & np.isfinite(time)
    if ok.sum() < 10:
        return float("nan")
    f, t = flux[ok], time[ok]
    med = np.median(f)
    if not np.isfinite(med) or med == 0:
        return float("nan")
    dt = float(np.median(np.diff(t))) if t.size > 1 else 0.0
    if dt <= 0:
        return float("nan")
    n = max(1, int(round(hours / 24.0 / dt)))
    y = f / abs(med) - np.sign(med)
    w = max(3, int(round(1.0 / dt)) | 1)
    y = y - median_filter(y, size=min(w, y.size), mode="nearest")
    if n > 1:
        y = uniform_filter1d(y, n, mode="nearest")
    return float(1.4826 * np.median(np.abs(y - np.median(y))) * 1e6)


def _set_metric(lc: xr.Dataset | None, ids: np.ndarray, name: str, hours: float | None = None) -> np.ndarray:
    """Per-source value of coordinate ``name`` of a light-curve set (CDPP computed when
    ``hours`` is given and the coordinate is absent), NaN for sources not in the set."""
    out = np.full(ids.size, np.nan)
    if lc is None:
        return out
    spos = {int(s): i for i, s in enumerate(np.asarray(lc["source_id"].values, dtype=np.int64))}
    have = name in lc.coords or name in lc
    vals = np.asarray(lc[name].values, float) if have else None
    for k, s in enumerate(ids):
        i = spos.get(int(s))
        if i is None:
            continue
        if vals is not None:
            out[k] = vals[i]
        elif hours is not None:
            out[k] = cdpp_ppm(lc["flux"].values[i], lc["time"].values, hours)
    return out


# ------------------------------------------------------------------ deterministic Bokeh ids


@contextlib.contextmanager
def deterministic_ids(prefix: str = "rpt"):
    """Make Bokeh model ids and embed ids reproducible while building one page.

    Bokeh numbers models from a process-wide counter and gives embeds uuid4 ids; here the counter
    is reset and the uuid generators replaced by a counter for the duration of the block
    (touches private Bokeh module state; restored afterwards).
    """
    from bokeh.embed import elements as be_elements
    from bokeh.embed import util as be_util
    from bokeh.util import serialization as bser

    counter = itertools.count(1)

    def gid():
        return f"{prefix}-{next(counter):04d}"

    saved = (
        bser._simple_id,
        be_util.make_globally_unique_id,
        be_util.make_globally_unique_css_safe_id,
        be_elements.make_globally_unique_css_safe_id,
    )
    bser._simple_id = 999
    be_util.make_globally_unique_id = gid
    be_util.make_globally_unique_css_safe_id = gid
    be_elements.make_globally_unique_css_safe_id = gid
    try:
        yield
    finally:
        (
            bser._simple_id,
            be_util.make_globally_unique_id,
            be_util.make_globally_unique_css_safe_id,
            be_elements.make_globally_unique_css_safe_id,
        ) = saved


# ------------------------------------------------------------------ page building


def _stretch(values: np.ndarray, percentiles, frame: np.ndarray | None = None) -> dict:
    """Screen-stretch limits: slider range (0.2/99.8 % of the whole cube, widened to contain the
    initial limits), initial limits ``lo``/``hi`` (``percentiles`` of ``frame``, the frame shown
    first -- a whole-cube percentile would saturate frames in scattered-light ramps -- or of
    ``values`` without a frame) and the smallest positive value (the floor of the log mapper)."""
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


def cdpp_common_set(metrics: dict, catalog, gmag: np.ndarray, sets: list[str], mag_limit: float) -> np.ndarray:
    """Sources over which the per-set median CDPPs are comparable (bool per catalog row):
    G < ``mag_limit``, on the pixels (catalog ``on_cutout`` when present), and a finite CDPP in
    every available light-curve set of ``sets``."""
    n = gmag.size
    keep = np.isfinite(gmag) & (gmag < float(mag_limit))
    if catalog is not None and "on_cutout" in catalog.colnames:
        keep &= np.asarray(catalog["on_cutout"], bool)
    for k in sets:
        keep &= np.isfinite(np.asarray(metrics[f"cdpp_{k}"], float))
    return keep if sets else np.zeros(n, bool)


def _js(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def _jinja_env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        keep_trailing_newline=True,
    )


def _finite_or_none(x):
    return float(x) if x is not None and np.isfinite(x) else None


def build_field_page(fp: FieldProducts, params: dict | None = None) -> tuple[str, dict]:
    """The HTML of one field page and its summary (for the index page)."""
    from bokeh.embed import components
    from bokeh.layouts import column, row
    from bokeh.models import (
        BoxSelectTool,
        Button,
        ColorBar,
        ColumnDataSource,
        CustomJS,
        CustomJSHover,
        DataTable,
        Div,
        HoverTool,
        HTMLTemplateFormatter,
        LinearColorMapper,
        LogColorMapper,
        NumberFormatter,
        RadioButtonGroup,
        RangeSlider,
        Slider,
        Span,
        TableColumn,
        Toggle,
    )
    from bokeh.palettes import RdBu11, Viridis256
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    p = report_params(params)
    cube = fp.cube
    mission = str(cube.attrs.get("mission", "TESS"))
    qtable = quality_flags(mission) if mission in ("TESS", "Kepler", "K2") else TESS_QUALITY_FLAGS
    tsys = str(cube.attrs.get("time_system", "BTJD"))
    cat = fp.catalog
    # ---- which pixels: target stamp (pixel tables) and the crop centre
    if "pixel" in cube.dims:
        rows_all, cols_all = cube["row"].values, cube["column"].values
    else:
        rows_all = np.repeat(cube["row"].values, cube.sizes["column"])
        cols_all = np.tile(cube["column"].values, cube.sizes["row"])
    tgt = choose_target(cat, np.asarray(rows_all), np.asarray(cols_all), p["target_max_offset"])
    stamp = None
    if "pixel" in cube.dims:
        stamp = 0
        if tgt is not None and cat is not None and "stamp" in cat.colnames and int(cat["stamp"][tgt]) >= 0:
            stamp = int(cat["stamp"][tgt])
    centre = (float(cat["row"][tgt]), float(cat["column"][tgt])) if tgt is not None else None

    # ---- sources (catalog order), their metrics and light-curve sets
    if cat is not None and len(cat):
        sids = np.asarray(cat["source_id"], dtype=np.int64)
        s_row = np.asarray(cat["row"], float)
        s_col = np.asarray(cat["column"], float)
        s_g = (
            np.asarray(cat["phot_g_mean_mag"], float)
            if "phot_g_mean_mag" in cat.colnames
            else np.full(len(cat), np.nan)
        )
    else:
        sids, s_row, s_col, s_g = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0))
    sets = {"raw": fp.cpm_raw, "lfd": fp.lfd, "cpm": fp.cpm}
    sets = {k: v for k, v in sets.items() if v is not None}
    n_cubes = 1 + (fp.detrended is not None)
    if "pixel" in cube.dims:
        st = cube["stamp"].values if "stamp" in cube.coords else np.zeros(cube.sizes["pixel"], int)
        m = st == (stamp or 0)
        nr, nc = np.unique(cube["row"].values[m]).size, np.unique(cube["column"].values[m]).size
    else:
        nr, nc = cube.sizes["row"], cube.sizes["column"]
    plan = plan_display(
        cube.sizes["time"], nr, nc, n_cubes=n_cubes, extra_bytes_per_cadence=4 * sids.size * len(sets), params=p
    )
    disp = display_cube(cube, plan, centre=centre, stamp=stamp)
    npix, nt = disp.flux.shape
    det = align_cube(fp.detrended, disp, cube) if fp.detrended is not None else None
    hours = float(p["cdpp_hours"])
    cname = f"cdpp_{hours:g}h"
    metrics = {
        "contamination": _set_metric(fp.lfd, sids, "contamination"),
        "n_pixels": _set_metric(fp.lfd, sids, "n_pixels"),
        "cdpp_raw": _set_metric(fp.cpm_raw, sids, cname, hours),
        "cdpp_lfd": _set_metric(fp.lfd, sids, cname, hours),
        "cdpp_cpm": _set_metric(fp.cpm, sids, cname, hours),
    }
    set_arrays = {k: align_lcset(v, sids, cube, disp.bin_factor).ravel() for k, v in sets.items()}
    common = cdpp_common_set(metrics, cat, s_g, [k for k in ("raw", "lfd", "cpm") if k in sets], p["cdpp_mag_limit"])
    metrics["cdpp_common"] = common.astype(np.float64)

    # ---- initial state
    sel0 = default_aperture(disp, cube, centre, float(p["aperture_radius"]))
    t0 = nt // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lc0 = np.where(
            np.isfinite(disp.flux[sel0]).any(axis=0), np.nansum(disp.flux[sel0].astype(np.float64), axis=0), np.nan
        )
    stretch = {"raw": _stretch(disp.flux, p["percentiles"], disp.flux[:, t0])}
    if det is not None:
        stretch["cpm"] = _stretch(det, p["percentiles"], det[:, t0])

    with deterministic_ids(f"rpt-{fp.field}"):
        # data sources (binary typed arrays)
        cube_src = ColumnDataSource({"flux": disp.flux.ravel()}, name="cube_raw")
        cubes = [cube_src]
        if det is not None:
            cubes.append(ColumnDataSource({"flux": det.ravel()}, name="cube_cpm"))
        pix = ColumnDataSource(
            {
                "x": disp.cols.astype(np.float64),
                "y": disp.rows.astype(np.float64),
                "flux": disp.flux[:, t0].copy(),
                "row": disp.rows.astype(np.int32),
                "column": disp.cols.astype(np.int32),
            },
            name="pixels",
        )
        pix.selected.indices = [int(i) for i in np.flatnonzero(sel0)]
        lc = ColumnDataSource(
            {
                "time": disp.time,
                "cadenceno": disp.cadenceno.astype(np.int64),
                "index": np.arange(nt, dtype=np.int32),
                "flux": lc0,
                "quality": disp.quality.astype(np.int32),
            },
            name="lc",
        )
        lcsets = ColumnDataSource(
            {k: v for k, v in set_arrays.items()} or {"none": np.zeros(0, np.float32)}, name="lcsets"
        )
        size = np.clip(16.0 - 0.9 * (np.nan_to_num(s_g, nan=19.0) - 8.0), 3.0, 16.0)
        src = ColumnDataSource(
            {
                "x": s_col,
                "y": s_row,
                "size": size,
                "source_id": [str(s) for s in sids],
                "gmag": s_g,
                "column": s_col,
                "row": s_row,
                **metrics,
            },
            name="sources",
        )
        if tgt is not None:
            src.selected.indices = [tgt]
        init = {
            k: (
                set_arrays[k].reshape(sids.size, nt)[tgt]
                if k in set_arrays and tgt is not None
                else np.full(nt, np.nan)
            )
            for k in ("raw", "lfd", "cpm")
        }
        if "raw" not in set_arrays:
            init["raw"] = lc0
        srclc = ColumnDataSource({"time": disp.time, **init}, name="srclc")

        # ---- image
        lo_pos = max(stretch["raw"]["lo"], stretch["raw"]["pos"])
        mlog = LogColorMapper(
            palette=Viridis256,
            low=lo_pos,
            high=max(stretch["raw"]["hi"], lo_pos * 1.0001),
            nan_color="#444444",
            name="mapper_log",
        )
        mlin = LinearColorMapper(
            palette=Viridis256,
            low=stretch["raw"]["lo"],
            high=stretch["raw"]["hi"],
            nan_color="#444444",
            name="mapper_lin",
        )
        mapper = mlog if p["stretch"] == "log" else mlin
        pad = 0.5
        img = figure(
            width=520,
            height=480,
            title=f"{fp.field}: pixels",
            match_aspect=True,
            x_range=(disp.cols.min() - pad, disp.cols.max() + pad),
            y_range=(disp.rows.min() - pad, disp.rows.max() + pad),
            tools="pan,wheel_zoom,reset,save",
            x_axis_label="CCD column",
            y_axis_label="CCD row",
            name="image_fig",
        )
        fc = {"field": "flux", "transform": mapper}
        pr = img.rect(
            "x",
            "y",
            1,
            1,
            source=pix,
            fill_color=fc,
            line_color=None,
            name="pixel_renderer",
            selection_fill_color=fc,
            selection_line_color="white",
            selection_line_width=2,
            selection_fill_alpha=1.0,
            nonselection_fill_color=fc,
            nonselection_fill_alpha=1.0,
            nonselection_line_color=None,
        )
        box = BoxSelectTool(renderers=[pr])
        img.add_tools(box)
        img.toolbar.active_drag = box
        img.add_tools(
            HoverTool(renderers=[pr], tooltips=[("row", "@row"), ("column", "@column"), ("flux", "@flux{0.00} e-/s")])
        )
        img.add_layout(ColorBar(color_mapper=mapper, width=10, name="colorbar"), "right")
        if sids.size:
            sr = img.scatter(
                "x",
                "y",
                size="size",
                source=src,
                marker="circle",
                fill_color=None,
                line_color="#ff4fd8",
                line_width=1.2,
                selection_line_color="#ff0000",
                selection_line_width=3,
                selection_fill_color=None,
                nonselection_line_alpha=0.8,
                nonselection_fill_color=None,
                name="source_renderer",
            )
            img.add_tools(
                HoverTool(
                    renderers=[sr],
                    tooltips=[
                        ("Gaia DR3", "@source_id"),
                        ("G", "@gmag{0.00}"),
                        ("column, row", "@column{0.00}, @row{0.00}"),
                        ("contamination", "@contamination{0.000}"),
                    ],
                )
            )

        # ---- main light curve
        qcode = (
            "const t = " + json.dumps({str(k): v for k, v in qtable.items()}) + ";"
            "const q = value|0; if (!q) return 'none'; const out = [];"
            "for (let b = 1; b > 0 && b <= q; b *= 2) { if (q & b) out.push(t[b] || ('bit' + Math.log2(b))); }"
            "return out.join(', ');"
        )
        lcf = figure(
            width=620,
            height=480,
            title="light curve: aperture sum of the selected pixels",
            tools="pan,wheel_zoom,box_zoom,reset,save",
            x_axis_label=f"time [{tsys}]",
            y_axis_label="flux [e-/s]",
            name="lc_fig",
        )
        lr = lcf.scatter("time", "flux", source=lc, size=3, color="black", name="lc_renderer")
        lcf.line("time", "flux", source=lc, color="#888888", line_width=0.7)
        lcf.add_tools(
            HoverTool(
                renderers=[lr],
                tooltips=[
                    ("cadence", "@cadenceno"),
                    ("time", "@time{0.00000}"),
                    ("flux", "@flux{0.000}"),
                    ("quality", "@quality{custom}"),
                ],
                formatters={"@quality": CustomJSHover(code=qcode)},
            )
        )
        span = Span(location=float(disp.time[t0]), dimension="height", line_color="red", line_width=2, name="span_main")
        lcf.add_layout(span)
        lcf.js_on_event("tap", CustomJS(code="window.RPT && RPT.seek(cb_obj.x);"))
        img.js_on_event("tap", CustomJS(code="window.RPT && RPT.tapImage(cb_obj);"))

        # ---- widgets
        slider = Slider(
            start=0,
            end=max(nt - 1, 1),
            value=t0,
            step=1,
            title="cadence index",
            width=520,
            name="cadence_slider",
            disabled=nt < 2,
        )
        # models only JavaScript uses are passed as args so that they are part of the document
        held = {"cube_raw": cube_src, "lcsets": lcsets, "mapper_log": mlog, "mapper_lin": mlin}
        if det is not None:
            held["cube_cpm"] = cubes[1]
        slider.js_on_change("value", CustomJS(args=held, code="window.RPT && RPT.onCadence();"))
        b_prev = Button(label="◀", width=40, name="prev_button")
        b_prev.js_on_event("button_click", CustomJS(code="RPT.step(-1);"))
        b_next = Button(label="▶", width=40, name="next_button")
        b_next.js_on_event("button_click", CustomJS(code="RPT.step(1);"))
        play = Toggle(label="► Play", width=90, name="play_toggle")
        play.js_on_change("active", CustomJS(code="RPT.play(cb_obj.active);"))
        srange = RangeSlider(
            start=stretch["raw"]["vlo"],
            end=stretch["raw"]["vhi"],
            value=(stretch["raw"]["lo"], stretch["raw"]["hi"]),
            step=(stretch["raw"]["vhi"] - stretch["raw"]["vlo"]) / 500.0,
            title="screen stretch [e-/s]",
            width=480,
            name="stretch_slider",
            format="0.0",
        )
        srange.js_on_change("value", CustomJS(code="RPT.onStretch();"))
        autost = Toggle(label="auto stretch per frame", active=False, width=170, name="auto_stretch")
        autost.js_on_change("active", CustomJS(code="RPT.onAutoStretch();"))
        smode = RadioButtonGroup(
            labels=["log", "linear"], active=0 if p["stretch"] == "log" else 1, name="stretch_mode"
        )
        smode.js_on_change("active", CustomJS(code="RPT.onStretchMode();"))
        imode = RadioButtonGroup(
            labels=["raw image", "CPM de-trended"], active=0, name="image_mode", disabled=det is None
        )
        imode.js_on_change("active", CustomJS(code="RPT.onImageMode();"))
        tmode = RadioButtonGroup(
            labels=["tap selects pixels", "tap selects a source"], active=0, name="tap_mode", disabled=sids.size == 0
        )
        lmode = RadioButtonGroup(
            labels=["pixels (sum)", "LFD", "CPM"], active=0, name="lc_mode", disabled=fp.lfd is None and fp.cpm is None
        )
        lmode.js_on_change("active", CustomJS(code="RPT.onLcMode();"))
        b_mask = Button(label="⬇ mask (JSON)", width=130, name="export_mask")
        b_mask.js_on_event("button_click", CustomJS(code="RPT.exportMask();"))
        b_csv = Button(label="⬇ light curve (CSV)", width=150, name="export_lc")
        b_csv.js_on_event("button_click", CustomJS(code="RPT.exportLc();"))
        status = Div(text="", width=620, name="status")
        pix.selected.js_on_change("indices", CustomJS(code="window.RPT && RPT.onMask();"))
        src.selected.js_on_change("indices", CustomJS(code="window.RPT && RPT.onSource();"))

        # ---- source light curves
        spans = []
        sfigs = []
        labels = {
            "raw": "raw aperture (CPM stage)" if fp.cpm_raw is not None else "aperture sum of the selected pixels",
            "lfd": "LFD",
            "cpm": f"CPM ({fp.cpm_paramset})" if fp.cpm_paramset else "CPM",
        }
        for k in ("raw", "lfd", "cpm"):
            f = figure(
                width=560,
                height=170,
                title=labels[k],
                tools="pan,wheel_zoom,box_zoom,reset",
                x_range=lcf.x_range,
                name=f"srcfig_{k}",
                visible=(k == "raw" or k in sets),
            )
            f.scatter("time", k, source=srclc, size=2, color={"raw": "black", "lfd": "#1f77b4", "cpm": "#d62728"}[k])
            s = Span(
                location=float(disp.time[t0]), dimension="height", line_color="red", line_width=1, name=f"span_{k}"
            )
            f.add_layout(s)
            f.js_on_event("tap", CustomJS(code="window.RPT && RPT.seek(cb_obj.x);"))
            spans.append(s)
            sfigs.append(f)
        src_title = Div(
            text="<b>Selected source</b>: tap a source (switch the tap mode) or a row of the table",
            width=560,
            name="source_title",
        )

        # ---- extra panels
        extras = []
        qf = _quality_figure(disp, qtable, tsys, lcf.x_range)
        if qf is not None:
            extras.append(qf)
        mp = None
        if fp.motion is not None:
            try:
                mp = motion_panel(fp)
            except Exception as exc:  # another LFD layout must not break the page
                fp.notes.append(f"LFD motion panel skipped: {type(exc).__name__}: {exc}")
                log.warning("%s: motion panel skipped (%s)", fp.field, exc)
            if mp is None and not any("motion panel" in n for n in fp.notes):
                fp.notes.append(
                    "LFD motion panel skipped: the motion model needs the PRF model and the catalog to be evaluated"
                )
        extras.extend(_motion_figures(mp, tsys, lcf.x_range))
        res_figs = _residual_figures(fp.mean_residual, disp, RdBu11)
        if fp.mean_residual is not None and not res_figs:
            fp.notes.append("mean-frame residual panel skipped: its pixels do not match the cube's")

        table = None
        if sids.size:
            num = NumberFormatter(format="0.000", nan_format="—")
            cdppf = NumberFormatter(format="0", nan_format="—")
            link = HTMLTemplateFormatter(template='<a href="#source=<%= value %>"><%= value %></a>')
            cols = [
                TableColumn(field="source_id", title="Gaia DR3 source_id", formatter=link, width=170),
                TableColumn(
                    field="gmag", title="G", formatter=NumberFormatter(format="0.00", nan_format="—"), width=60
                ),
                TableColumn(field="column", title="column", formatter=NumberFormatter(format="0.00"), width=70),
                TableColumn(field="row", title="row", formatter=NumberFormatter(format="0.00"), width=70),
                TableColumn(field="contamination", title="contamination", formatter=num, width=90),
                TableColumn(field="cdpp_raw", title=f"CDPP{hours:g}h raw [ppm]", formatter=cdppf, width=110),
                TableColumn(field="cdpp_lfd", title=f"CDPP{hours:g}h LFD [ppm]", formatter=cdppf, width=110),
                TableColumn(field="cdpp_cpm", title=f"CDPP{hours:g}h CPM [ppm]", formatter=cdppf, width=110),
                TableColumn(
                    field="cdpp_common",
                    title="in median",
                    width=70,
                    formatter=HTMLTemplateFormatter(template="<%= value ? '✓' : '' %>"),
                ),
            ]
            table = DataTable(
                source=src,
                columns=cols,
                width=900,
                height=300,
                sortable=True,
                selectable=True,
                index_position=None,
                reorderable=False,
                name="source_table",
            )

        controls_img = column(row(srange), row(smode, autost), row(imode, tmode))
        controls_lc = column(row(b_prev, play, b_next, slider), row(lmode, b_mask, b_csv), status)
        top = row(column(img, controls_img), column(lcf, controls_lc))
        mid = row(column(src_title, *sfigs), column(*extras)) if extras else column(src_title, *sfigs)
        parts = [top, mid]
        if res_figs:
            rtitle = Div(
                text=(
                    f"<b>Mean frame over {fp.mean_residual['n_cadences']} good cadences</b>: data, LFD model "
                    f"({fp.mean_residual['n_sources']} sources, {fp.mean_residual['label']}) and residual "
                    "(diverging colours: red = data above the model, blue = below)"
                ),
                width=1000,
                name="residual_title",
            )
            parts += [rtitle, row(*res_figs)]
        parts += [table] if table is not None else []
        layout = column(*parts)
        script, div = components(layout)

    ntf = disp.n_time_full
    meta = {
        "field": fp.field,
        "mission": mission,
        "time_system": tsys,
        "n_time": nt,
        "n_pix": npix,
        "n_time_full": ntf,
        "bin_factor": disp.bin_factor,
        "cropped": disp.cropped,
        "grid_rows": sorted(int(r) for r in np.unique(disp.rows)),
        "grid_cols": sorted(int(c) for c in np.unique(disp.cols)),
        "stretch": stretch,
        "play_interval_ms": int(p["play_interval_ms"]),
        "sets": sorted(sets),
        "n_sources": int(sids.size),
        "target": tgt,
        "quality_flags": {str(k): v for k, v in qtable.items()},
        "initial_cadence": t0,
        "stamp": stamp,
        "percentiles": [float(x) for x in p["percentiles"]],
    }
    summary = field_summary(fp, disp, metrics, tgt, plan, p)
    html = (
        _jinja_env()
        .get_template("field.html.j2")
        .render(
            title=f"{fp.field} — inspection report",
            field=fp.field,
            summary=summary,
            meta_json=json.dumps(meta, sort_keys=True).replace("</", "<\\/"),
            bokeh_css=INLINE.render_css(),
            bokeh_js=INLINE.render_js(),
            script=script,
            div=div,
            report_js=_js("report.js"),
            report_css=_js("report.css"),
            prf_png=base64.b64encode(fp.prf_png).decode() if fp.prf_png else None,
            edge_json=json.dumps(fp.edge, indent=1, sort_keys=True, default=str)[:20000]
            if fp.edge is not None
            else None,
            notes=fp.notes,
            meta_percentiles=[float(x) for x in p["percentiles"]],
        )
    )
    return html, summary


def _quality_figure(disp: DisplayCube, qtable: dict, tsys: str, x_range):
    from bokeh.plotting import figure

    bits = sorted(
        {b for b in qtable if (disp.quality & b).any()} | {1 << k for k in range(32) if (disp.quality & (1 << k)).any()}
    )
    if not bits:
        return None
    names = [qtable.get(b, f"Bit{b.bit_length()}") for b in bits]
    f = figure(
        width=560,
        height=60 + 22 * len(names),
        y_range=names[::-1],
        x_range=x_range,
        title="quality-flag timeline",
        tools="xpan,xwheel_zoom,reset",
        x_axis_label=f"time [{tsys}]",
        name="quality_fig",
    )
    for b, n in zip(bits, names):
        t = disp.time[(disp.quality & b) != 0]
        f.scatter(t, [n] * t.size, marker="dash", size=10, angle=np.pi / 2, color="#d62728")
    return f


def _motion_figures(mp: dict | None, tsys: str, x_range):
    """Two figures sharing the light curve's time axis: scene offsets [px] and the factor change [%]."""
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure

    if mp is None:
        return []
    t = mp["time"]
    step = max(1, t.size // 5000)
    cols = {
        k: np.asarray(v, np.float64)[::step] for k, v in mp.items() if isinstance(v, np.ndarray) and v.shape == t.shape
    }
    src = ColumnDataSource(cols, name="motion")
    f1 = figure(
        width=560,
        height=200,
        title=f"LFD motion model: {mp['offset_label']}",
        tools="xpan,xwheel_zoom,box_zoom,reset",
        x_range=x_range,
        x_axis_label=f"time [{tsys}]",
        y_axis_label="scene offset [px]",
        name="motion_fig",
    )
    f1.line("time", "dx", source=src, color="#1f77b4", legend_label="dx (column)")
    f1.line("time", "dy", source=src, color="#d62728", legend_label="dy (row)")
    if "model_dx" in cols:
        f1.line("time", "model_dx", source=src, color="#1f77b4", line_dash="dotted", legend_label="model centroid dx")
        f1.line("time", "model_dy", source=src, color="#d62728", line_dash="dotted", legend_label="model centroid dy")
    figs = [f1]
    if "change_mean" in cols:
        f2 = figure(
            width=560,
            height=200,
            title="LFD motion model: PRF factor − 1 (eq. 24); pixels of the brightest source",
            tools="xpan,xwheel_zoom,box_zoom,reset",
            x_range=x_range,
            x_axis_label=f"time [{tsys}]",
            y_axis_label="factor − 1 [%]",
            name="motion_change_fig",
        )
        f2.line(
            "time",
            "change_mean",
            source=src,
            color="black",
            legend_label=f"mean |change|, {mp.get('n_sources', 0)} stars",
        )
        for k, lab, c in zip(("pix_a", "pix_b"), mp.get("pixel_labels", []), ("#2ca02c", "#9467bd")):
            if k in cols:
                f2.line("time", k, source=src, color=c, legend_label=lab)
        figs.append(f2)
    for f in figs:
        f.legend.click_policy = "hide"
        f.legend.label_text_font_size = "8pt"
        f.legend.background_fill_alpha = 0.6
        f.legend.location = "top_left"
        f.legend.orientation = "horizontal"
        f.legend.padding = 2
        f.legend.spacing = 4
    return figs


def _residual_figures(res: dict | None, disp: DisplayCube, palette, tsys: str = ""):
    """Data, LFD model and residual mean frames side by side (shared log stretch; diverging residual)."""
    from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper, LogColorMapper
    from bokeh.palettes import Viridis256
    from bokeh.plotting import figure

    if res is None:
        return []
    flat = {k: np.asarray(res[k], float).ravel() for k in ("data", "model", "residual")}
    if flat["data"].size <= int(disp.source_index.max()):
        return []
    vals = {k: v[disp.source_index] for k, v in flat.items()}
    d = vals["data"][np.isfinite(vals["data"])]
    pos = d[d > 0]
    lo = float(np.percentile(pos, 1)) if pos.size else 1e-3
    hi = max(float(np.percentile(pos, 99.5)) if pos.size else 1.0, lo * 1.001)
    r = vals["residual"]
    lim = float(np.nanpercentile(np.abs(r), 98)) if np.isfinite(r).any() else 1.0
    lim = lim if lim > 0 else 1.0
    src = ColumnDataSource(
        {
            "x": disp.cols.astype(float),
            "y": disp.rows.astype(float),
            **{k: v.astype(np.float32) for k, v in vals.items()},
        },
        name="residual",
    )
    mlog = LogColorMapper(palette=Viridis256, low=lo, high=hi, nan_color="#444444")
    mdiv = LinearColorMapper(palette=list(palette), low=-lim, high=lim, nan_color="#444444")  # RdBu: low blue, high red
    pad = 0.5
    xr_ = (float(disp.cols.min()) - pad, float(disp.cols.max()) + pad)
    yr_ = (float(disp.rows.min()) - pad, float(disp.rows.max()) + pad)
    figs = []
    titles = {"data": "mean frame: data", "model": "mean frame: LFD model", "residual": "residual: data − LFD model"}
    for k in ("data", "model", "residual"):
        kw = {} if not figs else {"x_range": figs[0].x_range, "y_range": figs[0].y_range}
        f = figure(
            width=330,
            height=310,
            title=titles[k],
            match_aspect=True,
            tools="pan,wheel_zoom,reset",
            name=f"residual_{k}_fig" if k != "residual" else "residual_fig",
            **({"x_range": xr_, "y_range": yr_} if not figs else kw),
        )
        m = mdiv if k == "residual" else mlog
        rr = f.rect("x", "y", 1, 1, source=src, fill_color={"field": k, "transform": m}, line_color=None)
        f.add_tools(
            HoverTool(
                renderers=[rr],
                tooltips=[
                    ("row", "@y"),
                    ("column", "@x"),
                    ("data", "@data{0.00}"),
                    ("model", "@model{0.00}"),
                    ("residual", "@residual{0.00}"),
                ],
            )
        )
        f.add_layout(ColorBar(color_mapper=m, width=8), "right")
        figs.append(f)
    return figs


# ------------------------------------------------------------------ summaries, thumbnails, index


def thumbnail_png(image: np.ndarray, size_px: int = 160) -> bytes:
    """A small log-stretched PNG of an image (no metadata, so byte-reproducible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image, float)
    fin = img[np.isfinite(img)]
    lo, hi = np.percentile(fin, [1, 99]) if fin.size else (0.0, 1.0)
    pos = fin[fin > 0]
    lo = max(lo, float(np.percentile(pos, 1)) if pos.size else 1e-3)
    hi = max(hi, lo * 1.001)
    norm = np.log10(np.clip(img, lo, hi) / lo) / np.log10(hi / lo)
    fig = plt.figure(figsize=(size_px / 100, size_px / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(np.nan_to_num(norm, nan=0.0), origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _mean_image(disp: DisplayCube) -> np.ndarray:
    rows, cols = np.unique(disp.rows), np.unique(disp.cols)
    img = np.full((rows.size, cols.size), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(disp.flux, axis=1)
    img[np.searchsorted(rows, disp.rows), np.searchsorted(cols, disp.cols)] = med
    return img


def field_summary(fp: FieldProducts, disp: DisplayCube, metrics: dict, target, plan: dict, p: dict) -> dict:
    """The numbers the index page shows for one field (JSON-serialisable)."""
    cat = fp.catalog
    n_src = int(len(cat)) if cat is not None else 0
    on = int(np.sum(np.asarray(cat["on_cutout"], bool))) if cat is not None and "on_cutout" in cat.colnames else n_src

    def med(a):
        a = np.asarray(a, float)
        a = a[np.isfinite(a)]
        return float(np.median(a)) if a.size else None

    cube = fp.cube
    common = np.asarray(metrics.get("cdpp_common", np.zeros(0)), float) > 0
    return {
        "field": fp.field,
        "page": f"{fp.field}.html",
        "mission": str(cube.attrs.get("mission", "")),
        "sector": _jsonable(cube.attrs.get("sector", cube.attrs.get("quarter", cube.attrs.get("campaign")))),
        "n_time": int(cube.sizes["time"]),
        "n_pixels": int(cube.sizes["pixel"]) if "pixel" in cube.dims else int(cube.sizes["row"] * cube.sizes["column"]),
        "n_sources": n_src,
        "n_on_cutout": on,
        "n_lfd": int(fp.lfd.sizes["source"]) if fp.lfd is not None else None,
        "n_cpm": int(fp.cpm.sizes["source"]) if fp.cpm is not None else None,
        "cpm_paramset": fp.cpm_paramset,
        "cdpp_hours": float(p["cdpp_hours"]),
        # medians over one common source set (cdpp_common_set), so the three numbers are comparable
        "median_cdpp": {k: med(np.asarray(metrics[f"cdpp_{k}"], float)[common]) for k in ("raw", "lfd", "cpm")},
        "cdpp_set": {
            "n_sources": int(common.sum()),
            "mag_limit": float(p["cdpp_mag_limit"]),
            "sets": [
                k for k in ("raw", "lfd", "cpm") if med(np.asarray(metrics[f"cdpp_{k}"], float)[common]) is not None
            ],
        },
        "target_source_id": str(int(cat["source_id"][target])) if target is not None else None,
        "display": {
            "n_pix": int(disp.rows.size),
            "n_time": int(disp.time.size),
            "bin_factor": int(disp.bin_factor),
            "cropped": bool(disp.cropped),
            "embedded_mb": round(plan["bytes"] / 1e6, 2),
            "budget_mb": round(plan["budget"] / 1e6, 2),
        },
        "thumbnail_png": base64.b64encode(thumbnail_png(_mean_image(disp), int(p["thumbnail_px"]))).decode(),
        "notes": list(fp.notes),
    }


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_field_report(
    field_dir, out_html, out_summary, params: dict | None = None, *, field: str | None = None
) -> dict:
    """Snakemake entry point: render ``<field>.html`` and its summary JSON (both atomic)."""
    p = report_params(params)
    fp = load_field_products(field_dir, field=field, cpm_paramset=p["cpm_paramset"])
    log.info(
        "field %s: cube %s, catalog %s, LFD %s, CPM %s (%s), de-trended cube %s",
        fp.field,
        dict(fp.cube.sizes),
        None if fp.catalog is None else len(fp.catalog),
        fp.lfd is not None,
        fp.cpm is not None,
        fp.cpm_paramset,
        fp.detrended is not None,
    )
    html, summary = build_field_page(fp, p)
    write_text_atomic(html, out_html)
    write_text_atomic(json.dumps(summary, indent=1, sort_keys=True), out_summary)
    d = summary["display"]
    log.info(
        "wrote %s (%.1f MB; %d pixels x %d cadences shown, bin %d, cropped %s)",
        out_html,
        len(html) / 1e6,
        d["n_pix"],
        d["n_time"],
        d["bin_factor"],
        d["cropped"],
    )
    return summary


def read_benchmarks(bench_dir) -> list[dict]:
    """Every Snakemake benchmark TSV under ``bench_dir/<rule>/<name>.tsv`` as rows
    ``{rule, target, s, max_rss, mean_load, cpu_time}`` (mean over repeats), sorted."""
    rows = []
    for f in sorted(Path(bench_dir).glob("*/*.tsv")):
        try:
            with open(f, newline="") as fh:
                recs = list(csv.DictReader(fh, delimiter="\t"))
        except OSError:
            continue
        if not recs:
            continue

        def mean(key):
            vals = []
            for r in recs:
                try:
                    vals.append(float(r.get(key, "nan")))
                except (TypeError, ValueError):
                    pass
            vals = [v for v in vals if np.isfinite(v)]
            return float(np.mean(vals)) if vals else None

        rows.append(
            {
                "rule": f.parent.name,
                "target": f.stem,
                "s": mean("s"),
                "max_rss": mean("max_rss"),
                "mean_load": mean("mean_load"),
                "cpu_time": mean("cpu_time"),
            }
        )
    return rows


def build_index_page(summaries: list[dict], config: dict | None, benchmarks: list[dict], run: str) -> str:
    """HTML of the run's index page."""
    import yaml

    cfg_text = yaml.safe_dump(json.loads(json.dumps(config or {}, default=str)), sort_keys=True)
    total = sum(b["s"] or 0 for b in benchmarks)
    versions = dict(software_versions())
    if versions.get("workflow_lib") is None:  # run from a checkout (not pip-installed): the package's own version
        versions["workflow_lib"] = f"{__version__} (source checkout)"
    return (
        _jinja_env()
        .get_template("index.html.j2")
        .render(
            run=run,
            fields=sorted(summaries, key=lambda s: s["field"]),
            config_text=cfg_text,
            config_hash=config_hash(config or {}),
            versions=versions,
            benchmarks=benchmarks,
            total_s=total,
            report_css=_js("report.css"),
        )
    )


def write_index_report(summary_paths, out_html, *, config: dict | None = None, bench_dir=None, run: str = "") -> Path:
    """Snakemake entry point: the index page from the field summaries and the benchmarks."""
    summaries = [json.loads(Path(s).read_text()) for s in summary_paths]
    bench = read_benchmarks(bench_dir) if bench_dir and Path(bench_dir).is_dir() else []
    log.info("index: %d fields, %d benchmark files", len(summaries), len(bench))
    return write_text_atomic(build_index_page(summaries, config, bench, run), out_html)


# ------------------------------------------------------------------ reading pages back

_DOCS_RE = re.compile(r"const docs_json = '(.*?)';\n", re.S)


def embedded_documents(html: str) -> dict:
    """The Bokeh documents JSON embedded in a page (as written by :func:`build_field_page`)."""
    m = _DOCS_RE.search(html)
    if not m:
        raise ValueError("no Bokeh document found in the page")
    text = m.group(1).encode().decode("unicode_escape") if "\\u" in m.group(1) or "\\'" in m.group(1) else m.group(1)
    return json.loads(text)


def _decode(value):
    """Decode a serialised Bokeh value: ndarrays (base64, maybe gzip) to numpy, lists recursively."""
    if isinstance(value, dict) and value.get("type") == "ndarray":
        arr = value["array"]
        if isinstance(arr, dict) and arr.get("type") == "bytes":
            raw = base64.b64decode(arr["data"])
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            dt = np.dtype(value["dtype"]).newbyteorder("<" if value.get("order", "little") == "little" else ">")
            return np.frombuffer(raw, dtype=dt).reshape(value.get("shape", [-1]))
        return np.asarray(arr)
    return value


def embedded_sources(html: str) -> dict[str, dict[str, object]]:
    """``{name: {column: numpy array or list}}`` of every named ColumnDataSource in a page."""
    docs = embedded_documents(html)
    out = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and node.get("name") == "ColumnDataSource":
                attrs = node.get("attributes", {})
                name = attrs.get("name")
                data = attrs.get("data", {})
                if name and isinstance(data, dict) and data.get("type") == "map":
                    out[name] = {k: _decode(v) for k, v in data["entries"]}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    return out


def embedded_meta(html: str) -> dict:
    """The page's ``rpt-meta`` JSON block (sizes, grid, stretch, flags)."""
    m = re.search(r'<script id="rpt-meta" type="application/json">(.*?)</script>', html, re.S)
    if not m:
        raise ValueError("no rpt-meta block in the page")
    return json.loads(m.group(1))
