"""The Bokeh figures of a field page, one builder per panel: the pixel image, the aperture and
per-source light curves, the quality-flag timeline, the LFD motion model and mean-frame residual
(read from the LFD diagnostics product), the source table, and the PRF and thumbnail pictures.

Bokeh and matplotlib are imported inside the builders (and :func:`workflow_lib.report.page.deterministic_ids`):
the ``report-index`` step (``python -m workflow_lib.steps report-index``) imports
:mod:`workflow_lib.report.page` but draws no figure, and bokeh is most of that import (measured on the
shared 2-core machine: ``import workflow_lib.report.page`` 15-17 s, with bokeh 25 s; bokeh alone ~3 s
in ``python -X importtime`` on a quiet machine).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from workflow_lib.report.display import DisplayCube

#: the BokehJS bundles the pages use: no MathJax (1.8 MB) and no WebGL bundle, half the inline JavaScript
#: a browser parses before a page is interactive
BOKEH_COMPONENTS = ["bokeh", "bokeh-widgets", "bokeh-tables"]


def bokeh_inline() -> tuple[str, str]:
    """``(css, js)`` of the BokehJS bundles a page embeds (:data:`BOKEH_COMPONENTS`), inline: pages work offline."""
    from bokeh.resources import Resources

    res = Resources(mode="inline", components=BOKEH_COMPONENTS)
    return res.render_css(), res.render_js()


#: light-curve sets of a field page, in display order
LC_SETS = ("raw", "lfd", "cpm", "dbl")
#: the pixel image's longer side [screen px]
IMAGE_FRAME_PX = 480
#: marker colour of each set's light-curve panel (dbl: the deblended, de-trended light curves)
SET_COLORS = {"raw": "black", "lfd": "#1f77b4", "cpm": "#d62728", "dbl": "#2ca02c"}


def image_figure(field: str, disp: DisplayCube, pix, stretch: dict, mode: str):
    """The pixel image (rect per displayed pixel, coloured by ``pix.flux``) with box selection and
    hover; returns ``(figure, pixel renderer, log mapper, linear mapper)``."""
    from bokeh.models import BoxSelectTool, ColorBar, HoverTool, LinearColorMapper, LogColorMapper
    from bokeh.palettes import Viridis256
    from bokeh.plotting import figure

    lo_pos = max(stretch["lo"], stretch["pos"])
    mlog = LogColorMapper(
        palette=Viridis256,
        low=lo_pos,
        high=max(stretch["hi"], lo_pos * 1.0001),
        nan_color="#444444",
        name="mapper_log",
    )
    mlin = LinearColorMapper(
        palette=Viridis256, low=stretch["lo"], high=stretch["hi"], nan_color="#444444", name="mapper_lin"
    )
    mapper = mlog if mode == "log" else mlin
    pad = 0.5
    # square pixels: the frame's sides in proportion to the grid's (the ranges are fixed, so match_aspect cannot)
    nr, nc = np.unique(disp.rows).size, np.unique(disp.cols).size
    side = IMAGE_FRAME_PX / max(nr, nc)
    img = figure(
        frame_width=max(int(round(side * nc)), 120),
        frame_height=max(int(round(side * nr)), 120),
        title=f"{field}: pixels [e-/s]",
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
        line_color=fc,  # an outline in the fill's colour, and dilate: no seams between neighbouring pixels
        line_width=0.6,
        dilate=True,
        name="pixel_renderer",
        selection_fill_color=fc,
        selection_line_color="white",
        selection_line_width=2,
        selection_fill_alpha=1.0,
        nonselection_fill_color=fc,
        nonselection_fill_alpha=1.0,
        nonselection_line_color=fc,
        nonselection_line_alpha=1.0,
        nonselection_line_width=0.6,
    )
    box = BoxSelectTool(renderers=[pr])
    img.add_tools(box)
    img.toolbar.active_drag = box
    img.add_tools(
        HoverTool(renderers=[pr], tooltips=[("row", "@row"), ("column", "@column"), ("flux", "@flux{0.00} e-/s")])
    )
    img.add_layout(ColorBar(color_mapper=mapper, width=10, title="flux [e-/s]", name="colorbar"), "right")
    return img, pr, mlog, mlin


def source_overlay(img, src) -> None:
    """Gaia sources (circles sized by G) over the image, with hover."""
    from bokeh.models import HoverTool

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


def lightcurve_figure(lc, qtable: dict, tsys: str, t_now: float):
    """The aperture light curve (``lc`` source) with decoded QUALITY in the hover and the red
    current-cadence bar; returns ``(figure, span)``."""
    from bokeh.models import CustomJSHover, HoverTool, Span
    from bokeh.plotting import figure

    qcode = (
        "const t = " + json.dumps({str(k): v for k, v in qtable.items()}) + ";"
        "const q = value|0; if (!q) return 'none'; const out = [];"
        "for (let b = 1; b > 0 && b <= q; b *= 2) { if (q & b) out.push(t[b] || ('bit' + Math.log2(b))); }"
        "return out.join(', ');"
    )
    lcf = figure(
        height=IMAGE_FRAME_PX,
        min_width=560,
        sizing_mode="stretch_width",
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
    span = Span(location=float(t_now), dimension="height", line_color="red", line_width=2, name="span_main")
    lcf.add_layout(span)
    return lcf, span


def source_lightcurve_figures(srclc, labels: dict, shown: set, x_range, t_now: float, tsys: str = "BTJD"):
    """One figure per light-curve set (raw, LFD, CPM, deblended + de-trended) of the selected source, sharing ``x_range``;
    returns ``(figures, spans)``."""
    from bokeh.models import CustomJS, Span
    from bokeh.plotting import figure

    spans, sfigs = [], []
    for k in LC_SETS:
        f = figure(
            height=190,
            min_width=500,
            sizing_mode="stretch_width",
            title=labels[k],
            tools="pan,wheel_zoom,box_zoom,reset",
            x_range=x_range,
            x_axis_label=f"time [{tsys}]",
            y_axis_label="flux [e-/s]",
            name=f"srcfig_{k}",
            visible=(k == "raw" or k in shown),
        )
        f.xaxis.axis_label_text_font_size = f.yaxis.axis_label_text_font_size = "9pt"
        f.scatter("time", k, source=srclc, size=2, color=SET_COLORS[k])
        s = Span(location=float(t_now), dimension="height", line_color="red", line_width=1, name=f"span_{k}")
        f.add_layout(s)
        f.js_on_event("tap", CustomJS(code="window.RPT && RPT.seek(cb_obj.x);"))
        spans.append(s)
        sfigs.append(f)
    return sfigs, spans


#: what the source table's contamination column means (its cells' tooltip, and the note under the table)
CONTAMINATION_HELP = (
    "contamination: the fraction of the light in the source's LFD pixels that the LFD model gives to other "
    "sources (0: alone; 1: as much light from neighbours as from the source); above 10 the neighbours outshine it "
    "and the table shows > 10"
)


def source_table(src, hours: float):
    """Sortable table of the sources: Gaia id (link), G, position (pixels and RA/Dec), whether the source is on
    the pixels, contamination (capped at display, defined in a tooltip), LFD flag (why the data do not constrain the
    source's flux: core.quality.LfdSourceFlag; such a source has no LFD CDPP), CDPPs. The rows come in the
    page's source order: on the pixels and unflagged first (page.field_view)."""
    from bokeh.models import DataTable, HTMLTemplateFormatter, NumberFormatter, TableColumn

    cdppf = NumberFormatter(format="0", nan_format="—")
    link = HTMLTemplateFormatter(template='<a href="#source=<%= value %>"><%= value %></a>')
    contamination = HTMLTemplateFormatter(
        template='<span title="'
        + CONTAMINATION_HELP
        + "\"><%= value === value && value !== null ? (value > 10 ? '&gt; 10' : value.toFixed(3)) : '—' %></span>"
    )
    deg = NumberFormatter(format="0.00000", nan_format="—")
    cols = [
        TableColumn(field="source_id", title="Gaia DR3 source_id", formatter=link, width=170),
        TableColumn(field="gmag", title="G", formatter=NumberFormatter(format="0.00", nan_format="—"), width=55),
        TableColumn(field="ra", title="RA [deg]", formatter=deg, width=85),
        TableColumn(field="dec", title="Dec [deg]", formatter=deg, width=85),
        TableColumn(field="column", title="column", formatter=NumberFormatter(format="0.00"), width=65),
        TableColumn(field="row", title="row", formatter=NumberFormatter(format="0.00"), width=65),
        TableColumn(
            field="on_cutout",
            title="on pixels",
            width=65,
            formatter=HTMLTemplateFormatter(template="<%= value ? '✓' : 'off' %>"),
        ),
        TableColumn(field="contamination", title="contamination ⓘ", formatter=contamination, width=100),
        TableColumn(
            field="lfd_flag",
            title="LFD flag",
            width=120,
            formatter=HTMLTemplateFormatter(
                template="<%= (value & 1 ? 'not in model ' : '') + (value & 2 ? 'off pixels ' : '') + "
                "(value & 4 ? 'flux <= 0' : '') %>"
            ),
        ),
        TableColumn(field="cdpp_raw", title=f"CDPP{hours:g}h raw [ppm]", formatter=cdppf, width=110),
        TableColumn(field="cdpp_lfd", title=f"CDPP{hours:g}h LFD [ppm]", formatter=cdppf, width=110),
        TableColumn(field="cdpp_cpm", title=f"CDPP{hours:g}h CPM [ppm]", formatter=cdppf, width=110),
        TableColumn(field="cdpp_dbl", title=f"CDPP{hours:g}h LFD+CPM [ppm]", formatter=cdppf, width=130),
        TableColumn(
            field="cdpp_common",
            title="in median",
            width=70,
            formatter=HTMLTemplateFormatter(template="<%= value ? '✓' : '' %>"),
        ),
    ]
    return DataTable(
        source=src,
        columns=cols,
        min_width=900,
        sizing_mode="stretch_width",
        height=320,
        sortable=True,
        selectable=True,
        index_position=None,
        reorderable=False,
        name="source_table",
    )


def quality_figure(disp: DisplayCube, qtable: dict, tsys: str, x_range):
    """Which QUALITY flags are set when (one row per flag, time shared with the light curve); None without flags."""
    from bokeh.plotting import figure

    bits = sorted(
        {b for b in qtable if (disp.quality & b).any()} | {1 << k for k in range(32) if (disp.quality & (1 << k)).any()}
    )
    if not bits:
        return None
    names = [qtable.get(b, f"Bit{b.bit_length()}") for b in bits]
    f = figure(
        min_width=400,
        sizing_mode="stretch_width",
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


def motion_figures(mp: dict | None, tsys: str, x_range):
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
        height=260,
        min_width=500,
        sizing_mode="stretch_width",
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
            height=260,
            min_width=500,
            sizing_mode="stretch_width",
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
    for f in figs:  # the legend below the plot, off the curves
        leg = f.legend[0]
        leg.click_policy = "hide"
        leg.label_text_font_size = "8pt"
        leg.orientation = "horizontal"
        leg.padding = 2
        leg.spacing = 4
        f.add_layout(leg, "below")
    return figs


def residual_figures(res: dict | None, disp: DisplayCube, palette=None):
    """Data, LFD model and residual mean frames side by side (shared log stretch; diverging residual)."""
    from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper, LogColorMapper
    from bokeh.palettes import RdBu11, Viridis256
    from bokeh.plotting import figure

    if res is None:
        return []
    palette = RdBu11 if palette is None else palette
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
    nr, nc = np.unique(disp.rows).size, np.unique(disp.cols).size
    side = 300 / max(nr, nc)  # square pixels
    figs = []
    titles = {"data": "mean frame: data", "model": "mean frame: LFD model", "residual": "residual: data − LFD model"}
    for k in ("data", "model", "residual"):
        kw = {} if not figs else {"x_range": figs[0].x_range, "y_range": figs[0].y_range}
        f = figure(
            frame_width=max(int(round(side * nc)), 80),
            frame_height=max(int(round(side * nr)), 80),
            title=titles[k],
            x_axis_label="CCD column",
            y_axis_label="CCD row",
            tools="pan,wheel_zoom,reset",
            name=f"residual_{k}_fig" if k != "residual" else "residual_fig",
            **({"x_range": xr_, "y_range": yr_} if not figs else kw),
        )
        m = mdiv if k == "residual" else mlog
        rr = f.rect("x", "y", 1, 1, source=src, fill_color={"field": k, "transform": m}, line_color=None, dilate=True)
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
        f.add_layout(ColorBar(color_mapper=m, width=8, title="e-/s"), "right")
        figs.append(f)
    return figs


def overview_figure(ov: dict, disp: DisplayCube):
    """The whole field, coarse (:func:`workflow_lib.report.display.field_overview`), with a box around the pixels
    the page shows at full resolution."""
    from bokeh.models import ColorBar, LogColorMapper
    from bokeh.palettes import Viridis256
    from bokeh.plotting import figure

    img, k = ov["image"], ov["k"]
    fin = img[np.isfinite(img) & (img > 0)]
    lo, hi = np.percentile(fin, [1, 99]) if fin.size else (1.0, 10.0)
    nr, nc = img.shape
    side = 360 / max(nr, nc)
    x0, y0 = ov["col0"] - 0.5, ov["row0"] - 0.5
    f = figure(
        frame_width=max(int(side * nc), 80),
        frame_height=max(int(side * nr), 80),
        title=f"whole field: median of {ov['n_frames']} good frames, {k}x{k}-pixel blocks [e-/s]",
        x_range=(x0, x0 + nc * k),
        y_range=(y0, y0 + nr * k),
        x_axis_label="CCD column",
        y_axis_label="CCD row",
        tools="pan,wheel_zoom,reset",
        name="overview_fig",
    )
    mapper = LogColorMapper(palette=Viridis256, low=float(lo), high=float(max(hi, lo * 1.001)), nan_color="#444444")
    f.image(image=[img.astype(np.float32)], x=x0, y=y0, dw=nc * k, dh=nr * k, color_mapper=mapper)
    f.quad(
        left=float(disp.cols.min()) - 0.5,
        right=float(disp.cols.max()) + 0.5,
        bottom=float(disp.rows.min()) - 0.5,
        top=float(disp.rows.max()) + 0.5,
        fill_alpha=0,
        line_color="red",
        line_width=2,
        legend_label="shown above",
    )
    f.legend.location = "top_left"
    f.legend.background_fill_alpha = 0.6
    f.add_layout(ColorBar(color_mapper=mapper, width=8, title="e-/s"), "right")
    return f


def prf_picture(png: bytes | None) -> str | None:
    """The PRF step's picture (``prf_model.png``) as base64 for the page, None without one."""
    return base64.b64encode(png).decode() if png else None


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
