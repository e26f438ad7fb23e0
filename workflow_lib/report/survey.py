"""Survey overview page of one CCD (survey mode, docs/SURVEY.md): a static, offline HTML file with Bokeh.

What it shows:

* the CCD's mean image (binned to at most ``MAX_IMAGE_SIDE`` px per side) with the tile grid: each tile
  core outlined and coloured by status (done: its field page exists; failed: it does not; missing: left
  out of a merged set, ``survey.allow_missing_tiles``), hover
  gives the tile id, status and number of sources taken from it; with ``survey.motion: ccd`` also each
  tile's status in the CCD motion fit (in the fit / flagged, its gain +- error per axis, from
  ``motion/ccd_motion.json``, :mod:`workflow_lib.survey.motion`), the flagged tiles outlined dashed in
  magenta, and a summary line ("CCD motion: N of M tiles in the fit; flagged: ...");
* every merged source on the image and in a CDPP vs G plot (one series per merged light-curve set);
  hover shows Gaia id, G, tile and CDPP; a click opens the tile's field page with the source selected
  (``tiles/<tile>.html#source=<gaia id>``, which the field page understands);
* a search box: a Gaia DR3 id, or ``RA Dec`` in degrees (the nearest source within
  ``SEARCH_RADIUS_ARCSEC``), selects and highlights the source in both plots and links its tile page;
* a table of the tiles with links to their field pages, and the overlap-consistency figure of every set.

Inputs: the CCD cube, ``tiles.json``, the per-CCD source table (``merged/sources.ecsv``,
:func:`workflow_lib.survey.merge.combine_source_tables`), the merged sets (for their attrs), the tile
pages' summaries and, with ``survey.motion: ccd``, the CCD motion QA (``ccd_motion.json``,
:func:`workflow_lib.survey.motion.load_ccd_motion_qa`).  Gaia ids are carried as strings (int64 ids do not
fit a JavaScript number).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workflow_lib.core.atomic import write_text_atomic
from workflow_lib.core.logs import get_logger
from workflow_lib.data.cube import open_cube
from workflow_lib.report import figures
from workflow_lib.report.page import _jinja_env, _js, deterministic_ids, report_params

log = get_logger("report.survey")

#: the mean image is block-averaged to at most this many pixels per side
MAX_IMAGE_SIDE = 512
#: an RA/Dec search matches the nearest source within this distance (~1 TESS pixel)
SEARCH_RADIUS_ARCSEC = 21.0


def mean_image(cube_path) -> tuple[np.ndarray, dict]:
    """Mean flux over time of a CCD cube (NaN-aware), block-averaged to <= MAX_IMAGE_SIDE px per side.

    Returns ``(image, extent)`` with ``extent`` = ``{x, y, dw, dh}`` in CCD column/row (pixel edges)."""
    cube = open_cube(cube_path)
    flux = cube["flux"]
    img = np.asarray(flux.mean("time", skipna=True).values, dtype=np.float64)
    rows = np.asarray(cube["row"].values)
    cols = np.asarray(cube["column"].values)
    f = max(1, int(np.ceil(max(img.shape) / MAX_IMAGE_SIDE)))
    if f > 1:
        nr, nc = (img.shape[0] // f) * f, (img.shape[1] // f) * f
        img = np.nanmean(img[:nr, :nc].reshape(nr // f, f, nc // f, f), axis=(1, 3))
    extent = {
        "x": float(cols[0]) - 0.5,
        "y": float(rows[0]) - 0.5,
        "dw": float(img.shape[1] * f),
        "dh": float(img.shape[0] * f),
    }
    return img.astype(np.float32), extent


def _cdpp_column(table, set_name: str, hours: float):
    """The table column with the set's CDPP at ``hours`` (else the first CDPP column of the set)."""
    want = f"{set_name}_cdpp_{hours:g}h"
    if want in table.colnames:
        return want
    cands = [c for c in table.colnames if c.startswith(f"{set_name}_cdpp_")]
    return cands[0] if cands else None


def _set_names(table) -> list[str]:
    return [c[: -len("_tile")] for c in table.colnames if c.endswith("_tile") and c != "core_tile"]


def _finite_or_none(values) -> list:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


#: tile colours on the CCD image, by status
STATUS_COLORS = {"done": "#2ca02c", "missing": "#ff7f0e", "failed": "#d62728"}
#: dashed outline of the tiles the CCD motion fit flagged (gain outside 1 +- gain_tolerance)
FLAGGED_COLOR = "#e377c2"
#: the summary line names at most this many flagged tiles (all of them are in the tile table)
MAX_FLAGGED_NAMED = 20


def _gain_text(gain, err) -> str:
    """``0.850 ± 0.004`` (a NaN gain: ``—``; a NaN error: the gain alone)."""
    if gain is None or not np.isfinite(gain):
        return "—"
    return f"{gain:.3f} ± {err:.3f}" if err is not None and np.isfinite(err) else f"{gain:.3f}"


def tile_motion(qa: dict | None) -> dict:
    """Per tile id in the CCD motion QA (``ccd_motion.json``, :func:`workflow_lib.survey.motion.qa_summary`):
    ``status`` (``in fit``; ``flagged``: gain outside 1 +- gain_tolerance, left out of the fit; ``flagged, in
    fit``: kept because at least half the tiles stay; ``out of fit``), ``flagged``, ``in_fit``, ``gain`` and
    ``gain_err`` (column, row) and ``text`` (status with gain +- error per axis, for hover and table)."""
    out = {}
    for t in (qa or {}).get("tiles", []):
        flagged, in_fit = bool(t["flagged"]), bool(t["in_fit"])
        status = ("flagged, in fit" if in_fit else "flagged") if flagged else ("in fit" if in_fit else "out of fit")
        gain = [float(t["gain_column"]), float(t["gain_row"])]
        err = [float(v) for v in t["gain_err"]]
        text = f"{status}; gain {_gain_text(gain[0], err[0])} / {_gain_text(gain[1], err[1])} (column / row)"
        out[str(t["tile"])] = {
            "status": status,
            "flagged": flagged,
            "in_fit": in_fit,
            "gain": gain,
            "gain_err": err,
            "text": text,
        }
    return out


def motion_summary(qa: dict | None, tiles: list[dict]) -> dict | None:
    """The page's CCD motion summary (None without a CCD motion QA): ``n_tiles`` (tiles in the fit's input),
    ``n_in_fit``, ``flagged`` (tile ids), ``no_offsets`` (grid tiles the fit did not get, e.g. failed ones),
    ``gain_tolerance``, ``differential`` and ``line``: "CCD motion: N of M tiles in the fit; flagged:
    r0000c0128 (gain 0.85 / 0.86)" (at most :data:`MAX_FLAGGED_NAMED` named)."""
    if qa is None:
        return None
    rec = tile_motion(qa)
    flagged = [tid for tid, r in rec.items() if r["flagged"]]
    named = [
        f"{tid} (gain {rec[tid]['gain'][0]:.2f} / {rec[tid]['gain'][1]:.2f})" for tid in flagged[:MAX_FLAGGED_NAMED]
    ]
    if len(flagged) > MAX_FLAGGED_NAMED:
        named.append(f"and {len(flagged) - MAX_FLAGGED_NAMED} more")
    n_in = sum(r["in_fit"] for r in rec.values())
    line = f"CCD motion: {n_in} of {len(rec)} tiles in the fit; flagged: {', '.join(named) or 'none'}"
    no_offsets = [t["id"] for t in tiles if t["id"] not in rec]
    if no_offsets:
        line += f"; no offsets: {', '.join(no_offsets[:MAX_FLAGGED_NAMED])}"
    return {
        "n_tiles": len(rec),
        "n_in_fit": int(n_in),
        "flagged": flagged,
        "no_offsets": no_offsets,
        "gain_tolerance": float(qa["gain_tolerance"]),
        "differential": bool(qa.get("differential", False)),
        "line": line,
    }


def tile_status(grid: dict, table, tile_pages_dir, tile_summaries: list, missing=None, motion=None) -> list[dict]:
    """Per tile: id, core bounds, status (``missing``: listed in ``missing`` (set -> tile ids left out of
    that merged set, ``survey.allow_missing_tiles``), else ``done``: its field page exists, else ``failed``),
    the sets it is missing from, the number of catalog sources whose core tile it is, the number of
    merged sources taken from it per set and ``motion``: its record of :func:`tile_motion` from the CCD
    motion QA ``motion`` (None without one, or for a tile the fit did not get)."""
    missing = missing or {}
    motion_rec = tile_motion(motion)
    summaries = {}
    for path in tile_summaries:
        try:
            s = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        summaries[Path(path).stem] = s
    sets = _set_names(table)
    out = []
    for t in grid["tiles"]:
        tid = t["id"]
        page = Path(tile_pages_dir) / f"{tid}.html" if tile_pages_dir else None
        done = bool(page is not None and page.exists()) or tid in summaries
        missing_from = sorted(s for s, ids in missing.items() if tid in ids)
        core = np.asarray(table["core_tile"]).astype(str) == tid
        out.append(
            {
                "id": tid,
                "core_row": list(t["core_row"]),
                "core_column": list(t["core_column"]),
                "status": "missing" if missing_from else ("done" if done else "failed"),
                "missing_from": missing_from,
                "has_page": done,
                "page": f"tiles/{tid}.html",
                "n_core_sources": int(core.sum()),
                "n_tile_sources": (summaries.get(tid) or {}).get("n_sources"),
                "n_taken": {s: int((np.asarray(table[f"{s}_tile"]).astype(str) == tid).sum()) for s in sets},
                "motion": motion_rec.get(tid),
            }
        )
    return out


def _tile_quads(tiles: list[dict], inset: float = 0.0) -> dict:
    """Core bounds of ``tiles`` as quad columns (pixel edges), ``inset`` px inside each core."""
    return {
        "left": [t["core_column"][0] - 0.5 + inset for t in tiles],
        "right": [t["core_column"][1] - 0.5 - inset for t in tiles],
        "bottom": [t["core_row"][0] - 0.5 + inset for t in tiles],
        "top": [t["core_row"][1] - 0.5 - inset for t in tiles],
    }


def _document(img, extent, tiles, table, sets, cdpp_cols, p: dict, motion: dict | None = None) -> tuple[str, str]:
    from bokeh.embed import components
    from bokeh.layouts import column, row
    from bokeh.models import (
        ColorBar,
        ColumnDataSource,
        CustomJS,
        HoverTool,
        LinearColorMapper,
        LogColorMapper,
        TapTool,
        Title,
    )
    from bokeh.palettes import Category10_10, Greys256
    from bokeh.plotting import figure

    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, p["percentiles"]) if finite.size else (0.0, 1.0)
    lo = float(max(lo, 1e-3)) if p["stretch"] == "log" else float(lo)
    hi = float(max(hi, lo * 1.01 + 1e-6))
    Mapper = LogColorMapper if p["stretch"] == "log" else LinearColorMapper
    mapper = Mapper(palette=Greys256, low=lo, high=hi, nan_color="#ffe0e0")

    side = 560
    aspect = extent["dh"] / extent["dw"] if extent["dw"] else 1.0
    fimg = figure(
        name="ccd_image",
        title="mean image, tile grid (green: done, orange: missing from the merge, red: failed)",
        width=side,
        height=int(side * aspect) + 40,
        x_range=(extent["x"], extent["x"] + extent["dw"]),
        y_range=(extent["y"], extent["y"] + extent["dh"]),
        x_axis_label="CCD column",
        y_axis_label="CCD row",
        tools="pan,wheel_zoom,box_zoom,reset,save",
        match_aspect=True,
    )
    fimg.image(image=[img], color_mapper=mapper, **extent)
    fimg.add_layout(ColorBar(color_mapper=mapper, title="e-/s"), "right")

    tdata = {
        **_tile_quads(tiles),
        "id": [t["id"] for t in tiles],
        "status": [t["status"] for t in tiles],
        "n": [t["n_core_sources"] for t in tiles],
        "page": [t["page"] for t in tiles],
        "color": [STATUS_COLORS[t["status"]] for t in tiles],
    }
    if motion is not None:
        tdata["motion"] = [t["motion"]["text"] if t.get("motion") else "no offsets" for t in tiles]
    tsrc = ColumnDataSource(tdata, name="survey_tiles")
    quads = fimg.quad(
        source=tsrc,
        left="left",
        right="right",
        bottom="bottom",
        top="top",
        fill_color="color",
        fill_alpha=0.06,
        line_color="color",
        line_width=2,
    )
    tile_tips = [("tile", "@id"), ("status", "@status"), ("core sources", "@n")]
    if motion is not None:
        tile_tips.append(("CCD motion", "@motion"))
        # the tiles the CCD motion fit flagged: a dashed outline just inside the status outline
        flagged = [t for t in tiles if t.get("motion") and t["motion"]["flagged"]]
        inset = 0.04 * min((t["core_column"][1] - t["core_column"][0] for t in tiles), default=0)
        fsrc = ColumnDataSource(
            {**_tile_quads(flagged, inset), "id": [t["id"] for t in flagged]}, name="ccd_motion_flagged"
        )
        fimg.add_layout(
            Title(text="dashed magenta: tiles flagged by the CCD motion fit", text_color=FLAGGED_COLOR), "above"
        )
        fimg.quad(
            source=fsrc,
            left="left",
            right="right",
            bottom="bottom",
            top="top",
            fill_alpha=0.0,
            line_color=FLAGGED_COLOR,
            line_width=3,
            line_dash="dashed",
            name="ccd_motion_flagged",
        )
    fimg.add_tools(HoverTool(renderers=[quads], tooltips=tile_tips))

    data = {
        "sid": [str(int(s)) for s in np.asarray(table["source_id"], dtype=np.int64)],
        "ra": _finite_or_none(table["ra"]),
        "dec": _finite_or_none(table["dec"]),
        "column": _finite_or_none(table["column"]),
        "row": _finite_or_none(table["row"]),
        "gmag": _finite_or_none(table["phot_g_mean_mag"]),
        "tile": [str(t) for t in np.asarray(table["core_tile"]).astype(str)],
    }
    for s in sets:
        data[f"tile_{s}"] = [str(t) for t in np.asarray(table[f"{s}_tile"]).astype(str)]
        col = cdpp_cols.get(s)
        data[f"cdpp_{s}"] = _finite_or_none(table[col]) if col else [None] * len(table)
    src = ColumnDataSource(data, name="survey_sources")

    open_page = CustomJS(
        args={"src": src},
        code="""
        const i = src.selected.indices[0];
        if (i === undefined) return;
        window.SURVEY.openSource(i);
        """,
    )

    star = fimg.scatter(
        "column",
        "row",
        source=src,
        size=4,
        color="#1f77b4",
        alpha=0.6,
        selection_color="#ff7f0e",
        selection_alpha=1.0,
        nonselection_alpha=0.4,
    )
    star.selection_glyph.size = 12
    fimg.add_tools(
        HoverTool(renderers=[star], tooltips=[("Gaia", "@sid"), ("G", "@gmag{0.00}"), ("tile", "@tile")]),
        TapTool(renderers=[star], callback=open_page),
    )

    hours = float(p["cdpp_hours"])
    fcdpp = figure(
        name="cdpp_vs_g",
        title=f"CDPP ({hours:g} h) vs G of every merged source (click: the tile's field page)",
        width=600,
        height=440,
        y_axis_type="log",
        x_axis_label="Gaia G [mag]",
        y_axis_label=f"CDPP {hours:g} h [ppm]",
        tools="pan,wheel_zoom,box_zoom,reset,save",
    )
    renderers = []
    for k, s in enumerate(sets):
        r = fcdpp.scatter(
            "gmag",
            f"cdpp_{s}",
            source=src,
            size=5,
            color=Category10_10[k % 10],
            legend_label=s,
            selection_color="#ff7f0e",
            selection_alpha=1.0,
            nonselection_alpha=0.35,
            name=f"cdpp_{s}",
        )
        r.selection_glyph.size = 12
        renderers.append(r)
    tooltips = [("Gaia", "@sid"), ("G", "@gmag{0.00}"), ("tile", "@tile")]
    tooltips += [(f"CDPP {s} [ppm]", f"@cdpp_{s}{{0.0}}") for s in sets]
    fcdpp.add_tools(HoverTool(renderers=renderers, tooltips=tooltips), TapTool(renderers=renderers, callback=open_page))
    fcdpp.legend.location = "top_left"
    fcdpp.legend.click_policy = "hide"
    return components(row(fimg, column(fcdpp)))


def build_survey_page(
    cube_path, grid: dict, table, merged_attrs: dict, *, ccd: str, tiles: list, params=None, motion_qa=None
) -> str:
    """HTML of the overview page (see the module doc); ``motion_qa``: the CCD motion QA (``ccd_motion.json``,
    ``survey.motion: ccd``), whose per-tile records ``tiles`` carry (:func:`tile_status`)."""
    p = report_params(params)
    motion = motion_summary(motion_qa, tiles)
    img, extent = mean_image(cube_path)
    sets = _set_names(table)
    hours = float(p["cdpp_hours"])
    cdpp_cols = {s: _cdpp_column(table, s, hours) for s in sets}
    qa = {}
    for s in sets:
        v = (table.meta.get("overlap_consistency") or {}).get(s)
        qa[s] = {
            "overlap_consistency": None if v is None or not np.isfinite(float(v)) else float(v),
            "n_overlap": (table.meta.get("n_overlap") or {}).get(s),
            "n_measured": int(np.isfinite(np.asarray(table[cdpp_cols[s]], float)).sum()) if cdpp_cols[s] else None,
        }
    with deterministic_ids("srv"):
        script, div = _document(img, extent, tiles, table, sets, cdpp_cols, p, motion)

    bokeh_css, bokeh_js = figures.bokeh_inline()
    meta = {
        "ccd": ccd,
        "n_sources": len(table),
        "sets": sets,
        "search_radius_arcsec": SEARCH_RADIUS_ARCSEC,
        "tiles": [t["id"] for t in tiles],
        "ccd_motion": None if motion is None else {k: v for k, v in motion.items() if k != "line"},
    }
    return (
        _jinja_env()
        .get_template("survey.html.j2")
        .render(
            ccd=ccd,
            grid=grid,
            tiles=tiles,
            sets=sets,
            qa=qa,
            motion=motion,
            n_sources=len(table),
            n_on_ccd=int(np.asarray(table["on_ccd"], bool).sum()) if "on_ccd" in table.colnames else None,
            bokeh_css=bokeh_css,
            bokeh_js=bokeh_js,
            plot_script=script,
            plot_div=div,
            meta_json=json.dumps(meta),
            report_css=_js("report.css"),
            survey_js=_js("survey.js.j2"),
        )
    )


def write_survey_report(
    cube_path,
    grid_json,
    table_path,
    merged: dict,
    out_html,
    *,
    ccd: str = "",
    tile_pages=None,
    tile_summaries=(),
    params: dict | None = None,
    ccd_motion=None,
) -> Path:
    """Snakemake entry point (``report-survey``): the overview page of one CCD -> ``out_html`` (atomic).

    ``merged``: set name -> merged light-curve zarr (their attrs give the QA counts); ``tile_pages``: the
    directory holding the tiles' field pages ``<tile>.html`` (linked relative to ``out_html``);
    ``ccd_motion``: the ``ccd_motion.json`` of the CCD (``survey.motion: ccd``; None: no motion QA shown)."""
    from astropy.table import Table

    from workflow_lib.survey.motion import load_ccd_motion_qa

    grid = json.loads(Path(grid_json).read_text())
    table = Table.read(str(table_path), format="ascii.ecsv")
    attrs, missing = {}, {}
    for name, path in (merged or {}).items():
        try:
            ds = open_cube(path, validate=False)
            attrs[name] = {"n_sources": int(ds.sizes.get("source", 0))}
            missing[name] = [str(x) for x in np.atleast_1d(ds.attrs.get("missing_tiles", []))]
        except Exception as exc:  # noqa: BLE001 - the page still shows what it has
            log.warning("merged set %s (%s) not readable: %s", name, path, exc)
    motion_qa = load_ccd_motion_qa(ccd_motion) if ccd_motion else None
    tiles = tile_status(grid, table, tile_pages, list(tile_summaries), missing, motion_qa)
    html = build_survey_page(cube_path, grid, table, attrs, ccd=ccd, tiles=tiles, params=params, motion_qa=motion_qa)
    log.info("survey page %s: %d sources, %d tiles -> %s", ccd, len(table), len(tiles), out_html)
    return write_text_atomic(html, out_html)
