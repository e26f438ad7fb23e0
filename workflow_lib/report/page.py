"""Static HTML inspection reports with embedded Bokeh (offline, no server).

One page per field (``results/<run>/report/<field>.html``) reproduces lightkurve's
``tpf.interact()`` in a plain HTML file -- cadence slider, play/pause, arrow keys, red bar on the
light curve, click-to-seek, screen-stretch slider (log, 1%/95% percentiles), hover tooltips with
decoded QUALITY flags, tap / shift-tap / box selection of pixels with the light curve re-summed in
JavaScript, mask (JSON) and light-curve (CSV) export -- and adds the pipeline's products when they
exist: Gaia sources over the image, LFD / CPM light curves of a tapped source, raw / CPM de-trended
image switch, PRF model picture, motion model (scene offsets [px] and the PRF factor change over
time) and mean-frame data / LFD model / residual as the LFD step wrote them (``lfd/diagnostics.npz``,
:mod:`workflow_lib.lfd.diagnostics`), quality-flag timeline and a sortable source table. The page
only reads products (:mod:`~workflow_lib.report.products`): CDPPs are the ``cdpp_<h>h`` coordinates
the science steps store on each light-curve set (:func:`workflow_lib.metrics.add_cdpp`). The initial
screen stretch is ``report.percentiles`` of the frame shown first; median CDPPs are over one common
source set (:func:`~workflow_lib.report.products.cdpp_common_set`).

Modules: :mod:`~workflow_lib.report.products` (reading), :mod:`~workflow_lib.report.display`
(crop, binning, alignment, stretch), :mod:`~workflow_lib.report.figures` (one builder per panel),
this module (assembling the field and index pages).

The page's HTML holds the figures, the first frame, the initial light curve and the source table; the
pixel cubes (raw, flux_err, CPM de-trended) and the light-curve sets are loaded on demand from the data
folder beside the page (``<page stem>_data/``, :mod:`workflow_lib.report.datafiles`), block by block:
a frame loads its time chunk, a pixel's light curve its pixel group, a source its light-curve file.

Data size budget
----------------
A 64x64 pixel x 1300 cadence cube is 21.3 MB of float32; base64 adds 4/3. The data folder is kept within
``report.max_data_mb`` (6,000 MB: 128x128 pixels x 20,000 cadences with flux_err and a CPM cube fit).
When the cubes and light-curve sets do not fit, the display is reduced (``report.reduce``):

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
import gzip
import itertools
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import yaml

from workflow_lib import __version__
from workflow_lib.core import provenance
from workflow_lib.core.atomic import write_text_atomic
from workflow_lib.core.linalg import finite_median
from workflow_lib.core.logs import get_logger
from workflow_lib.core.quality import TESS_QUALITY_FLAGS, quality_flags
from workflow_lib.core.settings import schema_defaults
from workflow_lib.report import figures
from workflow_lib.report.datafiles import (
    BlockLayout,
    block_layout,
    data_dir_for,
    read_page_data_folder,
    write_page_data,
)
from workflow_lib.report.display import (
    DisplayCube,
    align_cube,
    align_lcset,
    choose_target,
    default_aperture,
    display_cube,
    field_overview,
    initial_cadence,
    mean_image,
    plan_display,
    screen_stretch,
)
from workflow_lib.report.products import (
    FieldProducts,
    cdpp_common_set,
    cdpp_values,
    load_field_products,
    read_benchmarks,
    source_values,
    tile_job_totals,
)

log = get_logger("report")


TEMPLATE_DIR = Path(__file__).parent / "templates"

# ------------------------------------------------------------------ QUALITY bit tables


# ------------------------------------------------------------------ configuration

#: the ``report`` defaults, read from the schema (kept as a name for callers; the schema is the source)
DEFAULTS = schema_defaults("report")


def report_params(cfg: dict | None = None) -> dict:
    """The ``report`` config block with defaults filled in; unknown keys are errors."""
    cfg = dict(cfg or {})
    defaults = schema_defaults("report")
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown report option(s) {unknown}; known: {sorted(defaults)}")
    out = defaults
    out.update({k: v for k, v in cfg.items()})
    if out["reduce"] not in ("crop", "bin"):
        raise ValueError(f"report.reduce must be 'crop' or 'bin', got {out['reduce']!r}")
    if out["stretch"] not in ("log", "linear"):
        raise ValueError(f"report.stretch must be 'log' or 'linear', got {out['stretch']!r}")
    lo, hi = out["percentiles"]
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"report.percentiles must satisfy 0 <= low < high <= 100, got {out['percentiles']}")
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


# ------------------------------------------------------------------ what a field page shows


def _js(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def _jinja_env():
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        keep_trailing_newline=True,
    )


@dataclass
class FieldView:
    """What one field page embeds: the displayed pixels and cadences, the sources and their
    light-curve sets and metrics, and the initial state (aperture, cadence, stretch)."""

    mission: str
    qtable: dict  # QUALITY bit -> flag name
    tsys: str  # time system
    target: int | None  # catalog row of the target
    stamp: int | None  # pixel-table stamp shown
    plan: dict  # plan_display
    catalog: object | None  # the catalog in the page's source order (source_order)
    disp: DisplayCube
    err: np.ndarray  # the pixels' flux_err on the display grid
    det: np.ndarray | None  # CPM de-trended pixels on the display grid
    sources: dict  # source_id, row, column, gmag, ra, dec, on_cutout (catalog order)
    sets: dict  # available light-curve sets {"raw" | "lfd" | "cpm": Dataset}
    metrics: dict  # per-source columns of the source table
    set_arrays: dict  # {set: (nsource, ntime_display) float32}
    set_errs: dict  # {set: (nsource, ntime_display) float32 flux_err}
    layout: BlockLayout  # how the data folder cuts the cubes and sets into files
    sel0: np.ndarray  # initial aperture (bool per displayed pixel)
    t0: int  # initial display cadence
    lc0: np.ndarray  # initial aperture light curve
    stretch: dict  # {"raw" | "cpm": screen_stretch}


def _display_grid(fp: FieldProducts, p: dict) -> tuple:
    """The target, the stamp shown (pixel tables), the crop centre and the display plan."""
    cube, cat = fp.cube, fp.catalog
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
    if "pixel" in cube.dims:
        st = cube["stamp"].values if "stamp" in cube.coords else np.zeros(cube.sizes["pixel"], int)
        m = st == (stamp or 0)
        nr, nc = np.unique(cube["row"].values[m]).size, np.unique(cube["column"].values[m]).size
    else:
        nr, nc = cube.sizes["row"], cube.sizes["column"]
    return tgt, stamp, centre, nr, nc


def _catalog_sources(cat) -> dict:
    """source_id, row, column, G, RA, Dec [deg] and on-the-pixels flag of the catalog (empty arrays without one)."""
    if cat is None or not len(cat):
        z = np.zeros(0)
        return {"source_id": np.zeros(0, np.int64), "row": z, "column": z, "gmag": z, "ra": z, "dec": z, "on_cutout": z}

    def col(name):
        return np.asarray(cat[name], float) if name in cat.colnames else np.full(len(cat), np.nan)

    return {
        "source_id": np.asarray(cat["source_id"], dtype=np.int64),
        "row": np.asarray(cat["row"], float),
        "column": np.asarray(cat["column"], float),
        "gmag": (
            np.asarray(cat["phot_g_mean_mag"], float)
            if "phot_g_mean_mag" in cat.colnames
            else np.full(len(cat), np.nan)
        ),
        "ra": col("ra"),
        "dec": col("dec"),
        "on_cutout": (
            np.asarray(cat["on_cutout"], bool).astype(float) if "on_cutout" in cat.colnames else np.ones(len(cat))
        ),
    }


def source_order(fp: FieldProducts) -> np.ndarray:
    """The page's order of the catalog's sources: on the pixels with an LFD light curve the data constrain first,
    then flagged ones (``lfd_flag`` > 0), then those off the pixels; by G within each group (catalog order for
    ties). The source table starts with them, and a sort by CDPP never puts a frozen off-cutout flux on top."""
    cat = fp.catalog
    if cat is None or not len(cat):
        return np.zeros(0, np.int64)
    srcs = _catalog_sources(cat)
    flag = np.nan_to_num(source_values(fp.lfd, srcs["source_id"], "lfd_flag"), nan=0.0)
    group = np.where(srcs["on_cutout"] > 0, np.where(flag > 0, 1, 0), 2)
    g = np.nan_to_num(srcs["gmag"], nan=99.0)
    return np.lexsort((np.arange(len(cat)), g, group))


def source_metrics(fp: FieldProducts, sids: np.ndarray, hours: float) -> dict:
    """Per-source columns of the source table, as the light-curve sets carry them: LFD
    contamination and pixel count, the ``hours`` CDPP of the RAW, LFD, CPM and deblended (LFD+CPM) sets."""
    labels = {"raw": "RAW", "lfd": "LFD", "cpm": "CPM", "dbl": "LFD+CPM"}
    out = {
        "contamination": source_values(fp.lfd, sids, "contamination"),
        "n_pixels": source_values(fp.lfd, sids, "n_pixels"),
        "lfd_flag": source_values(fp.lfd, sids, "lfd_flag"),
        **{
            f"cdpp_{k}": cdpp_values(lc, sids, hours, labels[k], fp.notes)
            for k, lc in (("raw", fp.cpm_raw), ("lfd", fp.lfd), ("cpm", fp.cpm), ("dbl", fp.deblended))
        },
    }
    # a source whose flux the data do not constrain (lfd_flag: core.quality.LfdSourceFlag) has no LFD CDPP to
    # show or to sort by (a frozen off-cutout flux would top the sort with a few ppm)
    out["cdpp_lfd"] = np.where(out["lfd_flag"] > 0, np.nan, out["cdpp_lfd"])
    return out


def field_view(fp: FieldProducts, p: dict) -> FieldView:
    """Plan what the field page of ``fp`` embeds (``p``: the whole ``report`` block)."""
    cube = fp.cube
    mission = str(cube.attrs.get("mission", "TESS"))
    qtable = quality_flags(mission) if mission in ("TESS", "Kepler", "K2") else TESS_QUALITY_FLAGS
    tgt, stamp, centre, nr, nc = _display_grid(fp, p)
    order = source_order(fp)
    catalog = fp.catalog[order] if order.size else fp.catalog
    if tgt is not None:
        tgt = int(np.flatnonzero(order == tgt)[0])
    srcs = _catalog_sources(catalog)
    sids = srcs["source_id"]
    sets = {
        k: v for k, v in {"raw": fp.cpm_raw, "lfd": fp.lfd, "cpm": fp.cpm, "dbl": fp.deblended}.items() if v is not None
    }
    n_cubes = 2 + (fp.detrended is not None)  # raw, flux_err, CPM de-trended
    plan = plan_display(
        cube.sizes["time"], nr, nc, n_cubes=n_cubes, extra_bytes_per_cadence=8 * sids.size * len(sets), params=p
    )
    disp = display_cube(cube, plan, centre=centre, stamp=stamp)
    err = display_cube(cube, plan, centre=centre, stamp=stamp, variable="flux_err").flux
    det = align_cube(fp.detrended, disp, cube) if fp.detrended is not None else None
    metrics = source_metrics(fp, sids, float(p["cdpp_hours"]))
    set_arrays = {k: align_lcset(v, sids, cube, disp.bin_factor) for k, v in sets.items()}
    set_errs = {k: align_lcset(v, sids, cube, disp.bin_factor, "flux_err") for k, v in sets.items()}
    for k in figures.LC_SETS:  # which sources have a light curve in each set (the page says why not)
        has = np.isfinite(set_arrays[k]).any(axis=1) if k in set_arrays else np.zeros(sids.size, bool)
        metrics[f"has_{k}"] = has.astype(np.float64)
    common = cdpp_common_set(
        metrics, catalog, srcs["gmag"], [k for k in figures.LC_SETS if k in sets], p["cdpp_mag_limit"]
    )
    metrics["cdpp_common"] = common.astype(np.float64)
    # initial state
    sel0 = default_aperture(disp, cube, centre, float(p["aperture_radius"]))
    t0 = initial_cadence(disp)  # a quality-0 frame at the typical background: the stretch is taken from it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lc0 = np.where(
            np.isfinite(disp.flux[sel0]).any(axis=0), np.nansum(disp.flux[sel0].astype(np.float64), axis=0), np.nan
        )
    stretch = {"raw": screen_stretch(disp.flux, p["percentiles"], disp.flux[:, t0])}
    if det is not None:
        stretch["cpm"] = screen_stretch(det, p["percentiles"], det[:, t0])
    return FieldView(
        mission=mission,
        qtable=qtable,
        tsys=str(cube.attrs.get("time_system", "BTJD")),
        target=tgt,
        stamp=stamp,
        plan=plan,
        catalog=catalog,
        disp=disp,
        err=err,
        det=det,
        sources=srcs,
        sets=sets,
        metrics=metrics,
        set_arrays=set_arrays,
        set_errs=set_errs,
        layout=block_layout(disp.rows, disp.cols, disp.flux.shape[1], tile=int(p["tile"]), frame_mb=p["frame_mb"]),
        sel0=sel0,
        t0=t0,
        lc0=lc0,
        stretch=stretch,
    )


# ------------------------------------------------------------------ the field page's Bokeh document


def _data_sources(v: FieldView) -> dict:
    """The page's named ColumnDataSources (binary typed arrays): the pixels (first frame; each pixel's
    group and slot in the data folder), the light curves shown first, the sources. The cubes and light-curve
    sets are in the data folder (:mod:`~workflow_lib.report.datafiles`)."""
    from bokeh.models import ColumnDataSource

    disp, nt, s = v.disp, v.disp.flux.shape[1], v.sources
    ds = {}
    pix = ColumnDataSource(
        {
            "x": disp.cols.astype(np.float64),
            "y": disp.rows.astype(np.float64),
            "flux": disp.flux[:, v.t0].copy(),
            "row": disp.rows.astype(np.int32),
            "column": disp.cols.astype(np.int32),
            "group": v.layout.group,
            "slot": v.layout.slot,
        },
        name="pixels",
    )
    pix.selected.indices = [int(i) for i in np.flatnonzero(v.sel0)]
    ds["pixels"] = pix
    ds["lc"] = ColumnDataSource(
        {
            "time": disp.time,
            "cadenceno": disp.cadenceno.astype(np.int64),
            "index": np.arange(nt, dtype=np.int32),
            "flux": v.lc0,
            "quality": disp.quality.astype(np.int32),
        },
        name="lc",
    )
    sids = s["source_id"]
    size = np.clip(16.0 - 0.9 * (np.nan_to_num(s["gmag"], nan=19.0) - 8.0), 3.0, 16.0)
    src = ColumnDataSource(
        {
            "x": s["column"],
            "y": s["row"],
            "size": size,
            "source_id": [str(i) for i in sids],
            "gmag": s["gmag"],
            "column": s["column"],
            "row": s["row"],
            "ra": s["ra"],
            "dec": s["dec"],
            "on_cutout": s["on_cutout"],
            **v.metrics,
        },
        name="sources",
    )
    if v.target is not None:
        src.selected.indices = [v.target]
    ds["sources"] = src
    init = {
        k: (v.set_arrays[k][v.target] if k in v.set_arrays and v.target is not None else np.full(nt, np.nan))
        for k in figures.LC_SETS
    }
    if "raw" not in v.set_arrays:
        init["raw"] = v.lc0
    ds["srclc"] = ColumnDataSource({"time": disp.time, **init}, name="srclc")
    return ds


def _controls(fp: FieldProducts, v: FieldView, ds: dict, mappers: tuple, p: dict) -> dict:
    """Cadence slider, play/step buttons, stretch and mode switches, exports; JavaScript callbacks (report.js)."""
    from bokeh.models import Button, CustomJS, CustomJSTickFormatter, Div, RadioButtonGroup, RangeSlider, Slider, Toggle

    nt, st = v.disp.flux.shape[1], v.stretch["raw"]
    w = {}
    w["slider"] = Slider(
        start=0,
        end=max(nt - 1, 1),
        value=v.t0,
        step=1,
        title="cadence index",
        min_width=200,
        sizing_mode="stretch_width",
        name="cadence_slider",
        disabled=nt < 2,
    )
    # models only JavaScript uses are passed as args so that they are part of the document
    held = {"mapper_log": mappers[0], "mapper_lin": mappers[1]}
    w["slider"].js_on_change("value", CustomJS(args=held, code="window.RPT && RPT.onCadence();"))
    w["prev"] = Button(label="◀", width=40, name="prev_button")
    w["prev"].js_on_event("button_click", CustomJS(code="RPT.step(-1);"))
    w["next"] = Button(label="▶", width=40, name="next_button")
    w["next"].js_on_event("button_click", CustomJS(code="RPT.step(1);"))
    w["play"] = Toggle(label="► Play", width=90, name="play_toggle")
    w["play"].js_on_change("active", CustomJS(code="RPT.play(cb_obj.active);"))
    # log stretch: the slider moves in log10(flux) over the cube's useful range (0.2-99.8 %), its labels in e-/s
    log = p["stretch"] == "log"
    lo_pos = max(st["lo"], st["pos"])

    def on_scale(v):
        return float(np.log10(max(v, st["pos"]))) if log else float(v)

    w["srange"] = RangeSlider(
        start=on_scale(st["vlo"]),
        end=max(on_scale(st["vhi"]), on_scale(st["vlo"]) + 1e-6),
        value=(on_scale(lo_pos if log else st["lo"]), on_scale(st["hi"])),
        step=(on_scale(st["vhi"]) - on_scale(st["vlo"])) / 500.0 or 1e-6,
        title="screen stretch [e-/s], log scale" if log else "screen stretch [e-/s]",
        width=480,
        name="stretch_slider",
        format=CustomJSTickFormatter(
            code="const v = window.RPT && RPT.isLog && RPT.m && RPT.m.stretch_mode ? (RPT.isLog() ? 10 ** tick : tick) : "
            + ("10 ** tick" if log else "tick")
            + "; return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);"
        ),
    )
    w["srange"].js_on_change("value", CustomJS(code="RPT.onStretch();"))
    w["autost"] = Toggle(label="auto stretch per frame", active=False, width=170, name="auto_stretch")
    w["autost"].js_on_change("active", CustomJS(code="RPT.onAutoStretch();"))
    w["smode"] = RadioButtonGroup(
        labels=["log", "linear"], active=0 if p["stretch"] == "log" else 1, name="stretch_mode"
    )
    w["smode"].js_on_change("active", CustomJS(code="RPT.onStretchMode();"))
    w["imode"] = RadioButtonGroup(
        labels=["raw image", "CPM de-trended"], active=0, name="image_mode", disabled=v.det is None
    )
    w["imode"].js_on_change("active", CustomJS(code="RPT.onImageMode();"))
    w["tmode"] = RadioButtonGroup(
        labels=["tap selects pixels", "tap selects a source"],
        active=0,
        name="tap_mode",
        disabled=v.sources["source_id"].size == 0,
    )
    w["lmode"] = RadioButtonGroup(
        labels=["pixels (sum)", "LFD", "CPM"], active=0, name="lc_mode", disabled=fp.lfd is None and fp.cpm is None
    )
    w["lmode"].js_on_change("active", CustomJS(code="RPT.onLcMode();"))
    w["mask"] = Button(label="⬇ mask (JSON)", width=120, name="export_mask")
    w["mask"].js_on_event("button_click", CustomJS(code="RPT.exportMask();"))
    w["maskfits"] = Button(label="⬇ mask (FITS)", width=120, name="export_mask_fits")
    w["maskfits"].js_on_event("button_click", CustomJS(code="RPT.exportMaskFits();"))
    w["csv"] = Button(label="⬇ light curve (CSV)", width=150, name="export_lc")
    w["csv"].js_on_event("button_click", CustomJS(code="RPT.exportLc();"))
    w["lcfits"] = Button(label="⬇ light curve (FITS)", width=150, name="export_lc_fits")
    w["lcfits"].js_on_event("button_click", CustomJS(code="RPT.exportLcFits();"))
    w["status"] = Div(text="", min_width=400, sizing_mode="stretch_width", name="status")
    ds["pixels"].selected.js_on_change("indices", CustomJS(code="window.RPT && RPT.onMask();"))
    ds["sources"].selected.js_on_change("indices", CustomJS(code="window.RPT && RPT.onSource();"))
    return w


def _lfd_panels(fp: FieldProducts, v: FieldView, x_range) -> tuple[list, list]:
    """Quality timeline and LFD motion figures (beside the source light curves), mean-frame residual figures."""
    extras = []
    qf = figures.quality_figure(v.disp, v.qtable, v.tsys, x_range)
    if qf is not None:
        extras.append(qf)
    fp.notes.extend(fp.motion_notes)
    extras.extend(figures.motion_figures(fp.motion_summary, v.tsys, x_range))
    res_figs = figures.residual_figures(fp.mean_residual, v.disp)
    if fp.mean_residual is not None and not res_figs:
        fp.notes.append("mean-frame residual panel skipped: its pixels do not match the cube's")
    return extras, res_figs


def _field_document(fp: FieldProducts, v: FieldView, p: dict) -> tuple[str, dict, str, dict]:
    """The Bokeh ``components`` of a field page (call inside :func:`deterministic_ids`): ``(script, divs)`` of
    the main document (``top``: image and light curve with their controls; ``source``: the selected source's
    panels; ``table``) and of the diagnostics document (``side``: quality flags and motion model; ``overview``;
    ``residual``), which report.js renders once the page is interactive (a browser spends about a second on
    those seven figures; their time axis follows the light curve's, RPT.syncTime)."""
    from bokeh.embed import components
    from bokeh.layouts import column, row
    from bokeh.models import CustomJS, Div, Range1d

    ds = _data_sources(v)
    wide = {"sizing_mode": "stretch_width"}
    t_now = float(v.disp.time[v.t0])
    img, _, mlog, mlin = figures.image_figure(fp.field, v.disp, ds["pixels"], v.stretch["raw"], p["stretch"])
    if v.sources["source_id"].size:
        figures.source_overlay(img, ds["sources"])
    lcf, _ = figures.lightcurve_figure(ds["lc"], v.qtable, v.tsys, t_now)
    lcf.js_on_event("tap", CustomJS(code="window.RPT && RPT.seek(cb_obj.x);"))
    img.js_on_event("tap", CustomJS(code="window.RPT && RPT.tapImage(cb_obj);"))
    # Bokeh reports the second of two quick clicks as a double tap, not a tap: a person clicking pixels fast
    img.js_on_event("doubletap", CustomJS(code="window.RPT && RPT.tapImage(cb_obj);"))
    w = _controls(fp, v, ds, (mlog, mlin), p)
    # every panel in e-/s; the levels differ because of what each set includes (docs/DATA_MODEL.md)
    labels = {
        "raw": (
            "RAW aperture sum (CPM stage's aperture; sky and neighbours included)"
            if fp.cpm_raw is not None
            else "aperture sum of the selected pixels (sky included)"
        ),
        "lfd": "LFD: the source's PRF-fit flux (sky and neighbours modelled out)",
        "cpm": f"CPM{f' ({fp.cpm_paramset})' if fp.cpm_paramset else ''}: de-trended aperture flux (sky subtracted)",
        "dbl": "LFD+CPM: neighbours' LFD model and sky subtracted, CPM de-trended, PRF-weighted to the star's total flux",
    }
    sfigs, _ = figures.source_lightcurve_figures(ds["srclc"], labels, set(v.sets), lcf.x_range, t_now, v.tsys)
    src_title = Div(
        text="<b>Selected source</b>: tap a source (switch the tap mode) or a row of the table",
        width=560,
        name="source_title",
    )
    t = v.disp.time[np.isfinite(v.disp.time)]
    pad = 0.02 * float(np.ptp(t)) if t.size else 1.0
    diag_range = Range1d(
        start=float(t.min()) - pad if t.size else 0.0, end=float(t.max()) + pad if t.size else 1.0, name="diag_x_range"
    )
    for end in ("start", "end"):
        lcf.x_range.js_on_change(end, CustomJS(code="window.RPT && RPT.syncTime();"))
    extras, res_figs = _lfd_panels(fp, v, diag_range)
    table = None
    if v.sources["source_id"].size:
        table = column(
            Div(
                text="<b>Sources</b>: on the pixels with a constrained LFD flux first, then flagged ones, then those "
                "off the pixels (by G within each); click a header to sort, a row or an id to show the source. "
                f"ⓘ {figures.CONTAMINATION_HELP}.",
                sizing_mode="stretch_width",
                name="table_title",
            ),
            figures.source_table(ds["sources"], float(p["cdpp_hours"])),
            **wide,
        )
    controls_img = column(row(w["srange"]), row(w["smode"], w["autost"]), row(w["imode"], w["tmode"]))
    controls_lc = column(
        row(w["prev"], w["play"], w["next"], w["slider"], sizing_mode="stretch_width"),
        w["lmode"],
        row(w["maskfits"], w["mask"], w["lcfits"], w["csv"]),
        w["status"],
    )
    # the image keeps its size; the light curves take the rest of the screen's width
    top = row(column(img, controls_img), column(lcf, controls_lc, **wide), **wide)
    main = {"top": top, "source": column(src_title, *sfigs, **wide)}
    if table is not None:
        main["table"] = table
    diag = {}
    if extras:
        diag["side"] = column(*extras, **wide)
    if v.disp.cropped:  # the whole field, coarse, with the part shown above outlined
        ov = field_overview(fp.cube, max_side=int(p["max_side"]))
        if ov is not None:
            diag["overview"] = figures.overview_figure(ov, v.disp)
    if res_figs:
        res = fp.mean_residual
        rtitle = Div(
            text=(
                f"<b>Mean frame over {res['n_cadences']} good cadences</b>: data, LFD model "
                f"({res['n_sources']} sources, {res['label']}) and residual "
                "(diverging colours: red = data above the model, blue = below)"
            ),
            width=1000,
            name="residual_title",
        )
        diag["residual"] = column(rtitle, row(*res_figs))
    script, divs = components(main)
    dscript, ddivs = components(diag) if diag else ("", {})
    return script, divs, dscript, ddivs


# ------------------------------------------------------------------ the field page


def _page_cubes(v: FieldView) -> tuple[dict, dict]:
    """The cubes and light-curve sets of the page's data folder."""
    cubes = {"raw": v.disp.flux, "err": v.err}
    if v.det is not None:
        cubes["cpm"] = v.det
    return cubes, {k: (v.set_arrays[k], v.set_errs[k]) for k in v.set_arrays}


def mask_wcs_cards(cube, v: FieldView) -> list:
    """FITS cards of the WCS of the page's pixel grid (``grid_rows`` x ``grid_columns``), for the exported
    aperture mask: the cube's (or the stamp's) celestial WCS shifted to the grid's first pixel, plus the
    physical CCD-pixel WCS ``P`` of TESS / Kepler APERTURE images (RAWX = column, RAWY = row). Floats are
    ``{"real": v}`` for fits.js. No celestial cards without a WCS."""
    from workflow_lib.data.cube import cube_wcs

    rows, cols = np.unique(v.disp.rows), np.unique(v.disp.cols)
    cards = []
    w = cube_wcs(cube, stamp=v.stamp) if "pixel" in cube.dims else cube_wcs(cube)
    if w is not None and w.naxis == 2:
        if "pixel" in cube.dims:
            st = cube["stamp"].values if "stamp" in cube.coords else np.zeros(cube.sizes["pixel"], int)
            m = st == (v.stamp or 0)
            r_first, c_first = int(cube["row"].values[m].min()), int(cube["column"].values[m].min())
        else:
            r_first, c_first = int(cube["row"].values[0]), int(cube["column"].values[0])
        w = w.deepcopy()
        w.wcs.crpix = [w.wcs.crpix[0] - (cols[0] - c_first), w.wcs.crpix[1] - (rows[0] - r_first)]
        for card in w.to_header(relax=True).cards:
            if card.keyword in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF"):
                continue
            val = card.value
            cards.append([card.keyword, {"real": float(val)} if isinstance(val, float) else val, card.comment])
    for axis, name, first in ((1, "RAWX", int(cols[0])), (2, "RAWY", int(rows[0]))):
        cards += [
            [f"CTYPE{axis}P", name, "physical CCD pixel axis"],
            [f"CUNIT{axis}P", "PIXEL", ""],
            [f"CRPIX{axis}P", {"real": 1.0}, "reference pixel of the mask"],
            [f"CRVAL{axis}P", {"real": float(first)}, "its CCD " + ("column" if axis == 1 else "row")],
            [f"CDELT{axis}P", {"real": 1.0}, ""],
        ]
    return [["WCSNAMEP", "PHYSICAL", ""]] + cards


def _page_meta(fp: FieldProducts, v: FieldView, p: dict, data_name: str) -> dict:
    """The page's ``rpt-meta`` JSON block (sizes, grid, stretch, flags, data folder) report.js reads."""
    disp = v.disp
    npix, nt = disp.flux.shape
    return {
        "field": fp.field,
        "mission": v.mission,
        "time_system": v.tsys,
        "n_time": nt,
        "n_pix": npix,
        "n_time_full": disp.n_time_full,
        "bin_factor": disp.bin_factor,
        "cropped": disp.cropped,
        "grid_rows": sorted(int(r) for r in np.unique(disp.rows)),
        "grid_cols": sorted(int(c) for c in np.unique(disp.cols)),
        "stretch": v.stretch,
        "play_interval_ms": int(p["play_interval_ms"]),
        "sets": sorted(v.sets),
        "n_sources": int(v.sources["source_id"].size),
        "target": v.target,
        "quality_flags": {str(k): name for k, name in v.qtable.items()},
        "initial_cadence": v.t0,
        "stamp": v.stamp,
        "percentiles": [float(x) for x in p["percentiles"]],
        "time_offset": float(
            fp.cube.attrs.get("time_offset", 2454833.0 if v.mission in ("Kepler", "K2") else 2457000.0)
        ),
        "wcs_cards": mask_wcs_cards(fp.cube, v),
        "data": {
            "dir": data_name,
            "cubes": sorted(_page_cubes(v)[0]),
            "sets": sorted(v.set_arrays),
            "cache_mb": float(p["cache_mb"]),
            **v.layout.meta(),
        },
    }


def build_field_page(
    fp: FieldProducts, params: dict | None = None, data_dir=None, links: list | None = None
) -> tuple[str, dict]:
    """The HTML of one field page and its summary (for the index page); with ``data_dir``, the page's data
    folder is written there (atomically; its name must be ``<page stem>_data``, beside the page). ``links``:
    ``(label, relative href)`` of the pages above it (the run index, a survey CCD's overview)."""

    p = report_params(params)
    v = field_view(fp, p)
    data_name = Path(data_dir).name if data_dir is not None else f"{fp.field}_data"
    written = None
    if data_dir is not None:
        written = write_page_data(data_dir, *_page_cubes(v), v.layout)
    with deterministic_ids(f"rpt-{fp.field}"):
        script, divs, dscript, ddivs = _field_document(fp, v, p)
    # the diagnostics document is rendered by report.js once the page is interactive
    if dscript:
        if not dscript.startswith("<script>"):
            raise RuntimeError(f"unexpected Bokeh components() script: {dscript[:40]!r}")
        dscript = '<script type="text/x-rpt-deferred" id="rpt-diag">' + dscript[len("<script>") :]
    bokeh_css, bokeh_js = figures.bokeh_inline()
    meta = _page_meta(fp, v, p, data_name)
    summary = field_summary(fp, v, p)
    if written is not None:
        summary["display"]["data_mb"] = round(written["bytes"] / 1e6, 2)
        summary["display"]["data_files"] = written["files"]
    html = (
        _jinja_env()
        .get_template("field.html.j2")
        .render(
            title=f"{fp.field} — inspection report",
            field=fp.field,
            summary=summary,
            meta_json=json.dumps(meta, sort_keys=True).replace("</", "<\\/"),
            bokeh_css=bokeh_css,
            bokeh_js=bokeh_js,
            script=script,
            divs=divs,
            diag_script=dscript,
            diag_divs=ddivs,
            report_js=_js("report.js"),
            fits_js=_js("fits.js"),
            report_css=_js("report.css"),
            prf_png=figures.prf_picture(fp.prf_png),
            edge_json=json.dumps(fp.edge, indent=1, sort_keys=True, default=str)[:20000]
            if fp.edge is not None
            else None,
            notes=fp.notes,
            data_dir=data_name,
            links=links or [],
            meta_percentiles=[float(x) for x in p["percentiles"]],
        )
    )
    return html, summary


# ------------------------------------------------------------------ summaries, index


def field_summary(fp: FieldProducts, v: FieldView, p: dict) -> dict:
    """The numbers the index page shows for one field (JSON-serialisable)."""
    cat, disp, metrics, target, plan = v.catalog, v.disp, v.metrics, v.target, v.plan
    n_src = int(len(cat)) if cat is not None else 0
    on = int(np.sum(np.asarray(cat["on_cutout"], bool))) if cat is not None and "on_cutout" in cat.colnames else n_src

    cube = fp.cube
    common = np.asarray(metrics.get("cdpp_common", np.zeros(0)), float) > 0
    # medians over one common source set (cdpp_common_set), so the three numbers are comparable
    median_cdpp = {
        k: finite_median(np.asarray(metrics[f"cdpp_{k}"], float)[common], empty=None) for k in figures.LC_SETS
    }
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
        "median_cdpp": median_cdpp,
        "cdpp_set": {
            "n_sources": int(common.sum()),
            "mag_limit": float(p["cdpp_mag_limit"]),
            "sets": [k for k in figures.LC_SETS if median_cdpp[k] is not None],
        },
        "target_source_id": str(int(cat["source_id"][target])) if target is not None else None,
        "display": {
            "n_pix": int(disp.rows.size),
            "n_time": int(disp.time.size),
            "bin_factor": int(disp.bin_factor),
            "cropped": bool(disp.cropped),
            "data_raw_mb": round(plan["bytes"] / 1e6, 2),
            "budget_mb": round(plan["budget"] / 1e6, 2),
        },
        "thumbnail_png": base64.b64encode(figures.thumbnail_png(mean_image(disp), int(p["thumbnail_px"]))).decode(),
        "notes": list(fp.notes),
    }


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def index_links(field: str) -> list:
    """``(label, href)`` from a field page up to the run index (``report/index.html``) and, for a survey tile
    (``<ccd>/tiles/<tile>``, its page in ``report/<ccd>/tiles/``), to its CCD's overview page."""
    depth = field.count("/")
    links = [("run index", "../" * depth + "index.html")]
    if depth == 2 and field.split("/")[1] == "tiles":
        links.append((f"{field.split('/')[0]} overview", "../index.html"))
    return links


def write_field_report(
    field_dir,
    out_html,
    out_summary,
    params: dict | None = None,
    *,
    field: str | None = None,
    link_index: bool = False,
) -> dict:
    """Snakemake entry point: render ``<field>.html``, its data folder and its summary JSON (all atomic).
    ``link_index``: link the run index (and a tile's CCD overview), which the workflow builds beside the pages;
    off for a page built on its own, whose link would lead nowhere."""
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
    # the data folder first: a page never points at data that are not there yet
    links = index_links(field or fp.field) if link_index else []
    html, summary = build_field_page(fp, p, data_dir=data_dir_for(out_html), links=links)
    # what the page was built from, with digests: the index says when one of them has changed since
    summary["provenance"] = provenance.provenance("report_field", inputs=fp.inputs, config=p)
    write_text_atomic(html, out_html)
    write_text_atomic(json.dumps(summary, indent=1, sort_keys=True), out_summary)
    d = summary["display"]
    log.info(
        "wrote %s (%.1f MB; data %.1f MB in %d files; %d pixels x %d cadences shown, bin %d, cropped %s)",
        out_html,
        len(html) / 1e6,
        d.get("data_mb", 0.0),
        d.get("data_files", 0),
        d["n_pix"],
        d["n_time"],
        d["bin_factor"],
        d["cropped"],
    )
    return summary


def build_index_page(
    summaries: list[dict], config: dict | None, benchmarks: list[dict], run: str, ccds: list[dict] | None = None
) -> str:
    """HTML of the run's index page (``ccds``: :func:`ccd_summary` of every survey CCD)."""
    cfg_text = yaml.safe_dump(json.loads(json.dumps(config or {}, default=str)), sort_keys=True)
    total = sum(b["s"] or 0 for b in benchmarks)
    versions = dict(provenance.software_versions())
    if versions.get("workflow_lib") is None:  # run from a checkout (not pip-installed): the package's own version
        versions["workflow_lib"] = f"{__version__} (source checkout)"
    return (
        _jinja_env()
        .get_template("index.html.j2")
        .render(
            run=run,
            fields=sorted(summaries, key=lambda s: s["field"]),
            ccds=sorted(ccds or [], key=lambda c: c["ccd"]),
            config_text=cfg_text,
            config_hash=provenance.config_hash(config or {}),
            versions=versions,
            benchmarks=benchmarks,
            total_s=total,
            report_css=_js("report.css"),
        )
    )


def ccd_summary(ccd: str, table_path) -> dict:
    """One survey CCD on the index page: the link to its overview page (``<ccd>/index.html`` beside the
    index, rules/survey.smk) and, from its per-CCD source table (``merged/sources.ecsv``), the number of
    sources, per merged set the measured sources, overlap figure and missing tiles."""
    from astropy.table import Table

    t = Table.read(str(table_path), format="ascii.ecsv")
    sets = [c[: -len("_tile")] for c in t.colnames if c.endswith("_tile") and c != "core_tile"]
    meta = t.meta or {}
    return {
        "ccd": ccd,
        "page": f"{ccd}/index.html",
        "n_sources": len(t),
        "n_tiles": int(np.unique(np.asarray(t["core_tile"]).astype(str)).size) if "core_tile" in t.colnames else None,
        "sets": [
            {
                "name": s,
                "n_measured": int((np.asarray(t[f"{s}_tile"]).astype(str) != "").sum()),
                "overlap": (meta.get("overlap_consistency") or {}).get(s),
                "missing_tiles": list((meta.get("missing_tiles") or {}).get(s) or []),
            }
            for s in sets
        ],
    }


def write_index_report(
    summary_paths, out_html, *, config: dict | None = None, bench_dir=None, run: str = "", ccds: dict | None = None
) -> Path:
    """Snakemake entry point: the index page from the field summaries, the survey CCDs' source tables
    (``ccds``: CCD name -> ``merged/sources.ecsv``; each links its overview page) and the benchmarks."""
    summaries = [json.loads(Path(s).read_text()) for s in summary_paths]
    for summary in summaries:  # a page built from products that have changed since is marked stale
        stale = provenance.stale_inputs(summary.get("provenance"))
        if stale:
            summary.setdefault("notes", []).append(
                f"stale: this page was built from products that have changed since ({', '.join(stale)}); "
                "rerun snakemake to rebuild it"
            )
            log.warning("index: the page of %s is stale (%s changed)", summary.get("field"), ", ".join(stale))
    ccd_rows = [ccd_summary(name, path) for name, path in (ccds or {}).items()]
    bench = tile_job_totals(read_benchmarks(bench_dir)) if bench_dir and Path(bench_dir).is_dir() else []
    log.info("index: %d fields, %d CCDs, %d benchmark files", len(summaries), len(ccd_rows), len(bench))
    return write_text_atomic(build_index_page(summaries, config, bench, run, ccd_rows), out_html)


# ------------------------------------------------------------------ reading pages back

_DOCS_RE = re.compile(r"const docs_json = '(.*?)';\n", re.S)


def embedded_documents(html: str) -> dict:
    """The Bokeh documents JSON embedded in a page (as written by :func:`build_field_page`: its main and
    diagnostics documents), ``{document id: document}``."""
    out = {}
    for m in _DOCS_RE.finditer(html):
        text = m.group(1)
        if "\\u" in text or "\\'" in text:
            text = text.encode().decode("unicode_escape")
        out.update(json.loads(text))
    if not out:
        raise ValueError("no Bokeh document found in the page")
    return out


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


def read_page_data(html_path) -> dict:
    """Every array of a page's data folder, reassembled: ``{"cubes": {name: (npix, n_time)}, "sets":
    {name: (flux, flux_err) (nsource, n_time)}}`` in the page's display order (pixels as its ``pixels``
    source, sources as its source table); the inverse of :func:`~workflow_lib.report.datafiles.write_page_data`."""
    html = Path(html_path).read_text()
    meta = embedded_meta(html)
    pix = embedded_sources(html)["pixels"]
    d = meta["data"]
    layout = BlockLayout(
        tile=d["tile"],
        chunk=d["chunk"],
        group=np.asarray(pix["group"]),
        slot=np.asarray(pix["slot"]),
        group_size=np.asarray(d["group_size"]),
        n_time=meta["n_time"],
        per_file=d["per_file"],
    )
    folder = Path(html_path).parent / d["dir"]
    return read_page_data_folder(folder, layout, d["cubes"], d["sets"], meta["n_sources"])
