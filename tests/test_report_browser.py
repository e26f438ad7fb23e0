"""End-to-end: the field page in headless Chromium, offline from file:// (playwright + Debian chromium)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from helpers.chromium import ARGS, CHROMIUM, skip_without_chromium, sync_playwright
from test_report import COL0, NC, NR, NT, ROW0, STARS, make_field

from workflow_lib.data.cube import cube_wcs
from workflow_lib.report import page as R
from workflow_lib.report import products as P

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    skip_without_chromium()
    tmp = tmp_path_factory.mktemp("rptb")
    fdir = make_field(tmp)
    out = tmp / "report"
    R.write_field_report(fdir, out / "fieldA.html", out / "fieldA.json", {}, field="fieldA")
    fp = P.load_field_products(fdir)
    return {
        "html": out / "fieldA.html",
        "cube": fp.cube["flux"].values.astype(np.float64),
        "err": fp.cube["flux_err"].values.astype(np.float64),
        "det": fp.detrended["flux"].values.astype(np.float64),
        "lfd": fp.lfd["flux"].values,
        "time": fp.cube["time"].values,
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def browser():
    skip_without_chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(site, browser):
    ctx = browser.new_context(viewport={"width": 1300, "height": 1400}, accept_downloads=True)
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    pg.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    requests = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(site["html"].as_uri())
    pg.wait_for_selector("body[data-rpt-ready='1']", timeout=30_000)
    pg.wait_for_selector("body[data-rpt-loaded='1']", timeout=30_000)  # a small page loads all its data
    pg.wait_for_timeout(300)
    pg.errors, pg.requests = errors, requests
    yield pg
    ctx.close()


def js(page, code):
    return page.evaluate(code)


def data_to_page(page, fig_name, x, y):
    """Page coordinates of data point (x, y) of a Bokeh figure."""
    return js(
        page,
        f"""(() => {{
        const v = Bokeh.index.get_one(RPT.doc.get_model_by_name('{fig_name}'));
        const r = v.canvas_view.el.getBoundingClientRect();
        return [r.left + v.frame.x_scale.compute({x}), r.top + v.frame.y_scale.compute({y})];
    }})()""",
    )


def tap(page, x, y, n_selected, shift=False):
    """Click at page (x, y) (with shift) and wait until ``n_selected`` pixels are selected.

    Clicks are spaced like a person's (Bokeh folds two quick taps into a double tap)."""
    page.wait_for_timeout(400)
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if shift:
        page.keyboard.up("Shift")
    try:
        page.wait_for_function(f"RPT.m.pixels.selected.indices.length === {n_selected}", timeout=5000)
    except Exception as exc:
        state = js(page, "[Array.from(RPT.m.pixels.selected.indices), RPT.taps]")
        raise AssertionError(f"tap at {(x, y)} shift={shift}: selection/taps {state}") from exc


def frame_of(site, t, page):
    rows = np.asarray(js(page, "Array.from(RPT.m.pixels.data.row)")) - ROW0
    cols = np.asarray(js(page, "Array.from(RPT.m.pixels.data.column)")) - COL0
    return site["cube"][t, rows, cols], rows, cols


def shown_frame(page):
    return np.array(js(page, "Array.from(RPT.m.pixels.data.flux, v => v === v ? v : null)"), dtype=float)


def test_loads_offline_without_errors(page):
    assert page.errors == []
    assert js(page, "RPT.errors") == []
    assert all(u.startswith(("file:", "data:", "blob:")) for u in page.requests), page.requests
    assert js(page, "RPT.nt") == NT and js(page, "RPT.np") == NR * NC


def test_cadence_slider_keys_and_image(site, page):
    t0 = js(page, "RPT.m.cadence_slider.value")
    assert t0 == js(page, "RPT.meta.initial_cadence")  # a quality-0 frame at the typical background
    np.testing.assert_allclose(shown_frame(page), frame_of(site, t0, page)[0], equal_nan=True)
    page.mouse.click(5, 5)  # focus the page body
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    t2 = min(t0 + 2, NT - 1)
    assert js(page, "RPT.m.cadence_slider.value") == t2
    page.keyboard.press("ArrowLeft")
    assert js(page, "RPT.m.cadence_slider.value") == t2 - 1
    # drag along the slider track with the mouse: to 3/4 of its length
    box = js(
        page,
        """(() => { const v = Bokeh.index.get_one(RPT.m.cadence_slider);
        const el = v.shadow_el.querySelector('.noUi-target') || v.el; const r = el.getBoundingClientRect();
        const h = v.shadow_el.querySelector('.noUi-handle').getBoundingClientRect();
        return [r.left, r.top, r.width, r.height, h.left + h.width / 2, h.top + h.height / 2]; })()""",
    )
    page.mouse.move(box[4], box[5])
    page.mouse.down()
    page.mouse.move(box[0] + 0.75 * box[2], box[5], steps=8)
    page.mouse.up()
    t1 = js(page, "RPT.m.cadence_slider.value")
    assert abs(t1 - 0.75 * (NT - 1)) <= 3 and t1 != t0 + 1
    new = shown_frame(page)
    np.testing.assert_allclose(new, frame_of(site, t1, page)[0], equal_nan=True)
    assert not np.allclose(new, frame_of(site, t0, page)[0], equal_nan=True)
    assert js(page, "RPT.m.span_main.location") == pytest.approx(site["time"][t1])


def test_arrow_keys_step_one_cadence_whatever_has_focus(page):
    """One arrow press is one cadence with the page or the cadence slider focused; with the stretch slider
    focused the arrows move the stretch only."""

    def focus(model):
        js(page, f"Bokeh.index.get_one(RPT.m.{model}).shadow_el.querySelector('.noUi-handle').focus()")

    page.mouse.click(5, 5)
    js(page, "RPT.m.cadence_slider.value = 10")
    t = js(page, "RPT.m.cadence_slider.value")
    focus("cadence_slider")
    page.keyboard.press("ArrowRight")
    assert js(page, "RPT.m.cadence_slider.value") == t + 1
    page.keyboard.press("ArrowLeft")
    assert js(page, "RPT.m.cadence_slider.value") == t
    focus("stretch_slider")
    before = js(page, "JSON.stringify(RPT.m.stretch_slider.value)")
    page.keyboard.press("ArrowRight")
    assert js(page, "RPT.m.cadence_slider.value") == t
    assert js(page, "JSON.stringify(RPT.m.stretch_slider.value)") != before


def test_click_light_curve_seeks(site, page):
    t = 40
    x, y = data_to_page(page, "lc_fig", site["time"][t], js(page, f"RPT.m.lc.data.flux[{t}]"))
    page.mouse.click(x, y)
    page.wait_for_function(f"RPT.m.cadence_slider.value === {t}", timeout=5000)
    assert js(page, "RPT.m.span_main.location") == pytest.approx(site["time"][t])


def test_tap_and_shift_tap_pixels_resum_light_curve(site, page, test_output):
    cube = site["cube"]
    (r1, c1), (r2, c2) = (110, 205), (104, 211)
    x, y = data_to_page(page, "image_fig", c1, r1)
    tap(page, x, y, 1)
    assert js(page, "Array.from(RPT.m.pixels.selected.indices)") == [(r1 - ROW0) * NC + (c1 - COL0)]
    assert "<span id='rpt-npix'>1</span> pixel(s) selected" in js(page, "RPT.m.status.text")
    lc = np.array(js(page, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_array_equal(lc, cube[:, r1 - ROW0, c1 - COL0])  # one pixel: exactly its series
    x2, y2 = data_to_page(page, "image_fig", c2, r2)
    tap(page, x2, y2, 2, shift=True)
    lc = np.array(js(page, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_allclose(lc, cube[:, r1 - ROW0, c1 - COL0] + cube[:, r2 - ROW0, c2 - COL0], rtol=1e-12)
    # export the mask (JSON download) and the light curve (CSV download)
    with page.expect_download() as dl:
        page.get_by_role("button", name="mask (JSON)").click()
    path = dl.value.path()
    assert dl.value.suggested_filename == "fieldA_mask.json"
    m = json.loads(Path(path).read_text())
    assert m["rows"] == list(range(ROW0, ROW0 + NR)) and m["columns"] == list(range(COL0, COL0 + NC))
    mask = np.array(m["mask"], dtype=bool)
    expect = np.zeros((NR, NC), bool)
    expect[r1 - ROW0, c1 - COL0] = expect[r2 - ROW0, c2 - COL0] = True
    np.testing.assert_array_equal(mask, expect)
    shutil.copy(path, test_output / "report_mask.json")
    with page.expect_download() as dl:
        page.get_by_role("button", name="light curve (CSV)").click()
    rows = [r for r in csv.reader(io.StringIO(Path(dl.value.path()).read_text())) if r and not r[0].startswith("#")]
    assert rows[0] == ["time", "flux", "flux_err", "quality", "cadenceno"] and len(rows) == NT + 1
    flux = np.array([float(r[1]) for r in rows[1:]])
    np.testing.assert_allclose(flux, cube[:, r1 - ROW0, c1 - COL0] + cube[:, r2 - ROW0, c2 - COL0], rtol=1e-12)
    err = site["err"]  # the root sum of squares of the two pixels' flux_err
    expect_err = np.hypot(err[:, r1 - ROW0, c1 - COL0], err[:, r2 - ROW0, c2 - COL0])
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], expect_err, rtol=1e-6)
    assert [int(r[3]) for r in rows[1:]][77] == 129
    np.testing.assert_allclose([float(r[0]) for r in rows[1:]], site["time"], rtol=0, atol=1e-12)
    # the mask as a FITS image (APERTURE extension with the cutout's WCS) and the light curve as FITS
    with page.expect_download() as dl:
        page.get_by_role("button", name="mask (FITS)").click()
    assert dl.value.suggested_filename == "fieldA_mask.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(dl.value.path()) as hdul:
            hdul.verify("exception")
            ap = hdul["APERTURE"]
            np.testing.assert_array_equal(ap.data.astype(bool), expect)
            assert ap.header["CRVAL1P"] == COL0 and ap.header["CRVAL2P"] == ROW0 and hdul[0].header["NPIXSEL"] == 2
            mask_wcs = WCS(ap.header)
    cube_w = cube_wcs(P.load_field_products(site["html"].parent.parent / "fieldA").cube)
    sky = mask_wcs.pixel_to_world(c1 - COL0, r1 - ROW0)
    assert sky.separation(cube_w.pixel_to_world(c1 - COL0, r1 - ROW0)).arcsec < 1e-6
    shutil.copy(dl.value.path(), test_output / "report_mask.fits")
    lk = pytest.importorskip("lightkurve")
    with page.expect_download() as dl:
        page.get_by_role("button", name="light curve (FITS)").click()
    lcf = lk.read(dl.value.path())
    np.testing.assert_allclose(lcf.flux.value, cube[:, r1 - ROW0, c1 - COL0] + cube[:, r2 - ROW0, c2 - COL0], rtol=1e-6)
    np.testing.assert_allclose(lcf.flux_err.value, expect_err, rtol=1e-6)
    np.testing.assert_allclose(lcf.time.value, site["time"], rtol=0, atol=1e-9)
    assert lcf.quality.value[77] == 129
    # a person clicking fast: shift-clicks 120 ms apart each count (Bokeh reports every second one as a double tap)
    pts = [data_to_page(page, "image_fig", 202 + k, 112) for k in range(5)]
    page.keyboard.down("Shift")
    for x_, y_ in pts:
        page.mouse.click(x_, y_)
        page.wait_for_timeout(120)
    page.keyboard.up("Shift")
    page.wait_for_function("RPT.m.pixels.selected.indices.length === 7", timeout=5000)
    for x_, y_ in pts:  # and off again
        page.keyboard.down("Shift")
        page.mouse.click(x_, y_)
        page.keyboard.up("Shift")
        page.wait_for_timeout(120)
    page.wait_for_function("RPT.m.pixels.selected.indices.length === 2", timeout=5000)
    # shift-tap the first pixel again: removed
    x, y = data_to_page(page, "image_fig", c1, r1)
    tap(page, x, y, 1, shift=True)
    lc = np.array(js(page, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_array_equal(lc, cube[:, r2 - ROW0, c2 - COL0])


def test_box_select(site, page):
    x0, y0 = data_to_page(page, "image_fig", 201.6, 101.6)  # columns 202..203, rows 102..104
    x1, y1 = data_to_page(page, "image_fig", 203.4, 104.4)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=6)
    page.mouse.up()
    page.wait_for_function("RPT.m.pixels.selected.indices.length === 6", timeout=5000)
    lc = np.array(js(page, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_allclose(lc, site["cube"][:, 2:5, 2:4].sum(axis=(1, 2)), rtol=1e-9)


def test_sources_lightcurve_modes_and_cpm_image(site, page, test_output):
    sid = STARS[1][0]
    page.evaluate(f"window.location.hash = '#source={sid}'")
    page.wait_for_function("RPT.src === 1")
    lfd = np.array(js(page, "Array.from(RPT.m.srclc.data.lfd)"), dtype=float)
    np.testing.assert_allclose(lfd, site["lfd"][1], rtol=1e-6)  # float32 embedding
    assert "Gaia DR3 " + str(sid) in js(page, "RPT.m.source_title.text")
    page.get_by_role("button", name="LFD", exact=True).click()
    lc = np.array(js(page, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_allclose(lc, site["lfd"][1], rtol=1e-6)
    page.get_by_role("button", name="pixels (sum)").click()
    page.get_by_role("button", name="CPM de-trended").click()
    t = js(page, "RPT.m.cadence_slider.value")
    rows = np.asarray(js(page, "Array.from(RPT.m.pixels.data.row)")) - ROW0
    cols = np.asarray(js(page, "Array.from(RPT.m.pixels.data.column)")) - COL0
    np.testing.assert_allclose(shown_frame(page), site["det"][t, rows, cols], rtol=1e-6, equal_nan=True)
    assert js(page, "RPT.m.stretch_mode.active") == 1  # linear stretch for the de-trended cube
    page.get_by_role("button", name="raw image").click()
    page.get_by_role("button", name="log", exact=True).click()
    # select the target from the table link, back to a sensible view for the screenshot; the page scrolls to its panels
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.get_by_role("link", name=str(STARS[0][0])).click()
    page.wait_for_function("RPT.src === 0")
    top = js(page, "Bokeh.index.get_one(RPT.m.source_title).el.getBoundingClientRect().top")
    assert 0 <= top < 100, top  # the source's panels at the top of the window
    page.evaluate("window.scrollTo(0, 0)")  # the table sits below the mean-frame panels
    page.wait_for_timeout(200)
    x, y = data_to_page(page, "image_fig", 208, 107)
    tap(page, x, y, 1)
    page.screenshot(path=str(test_output / "report_field.png"), full_page=True)
    assert page.errors == [] and js(page, "RPT.errors") == []


def test_motion_and_residual_panels_render(site, page):
    """The motion (offsets, factor change) and mean-frame (data, model, residual) figures are laid out
    with a drawn canvas, the embedded numbers reach BokehJS, and nothing raised; they are rendered after the
    page is interactive, and their time axis follows the light curve's."""
    page.wait_for_selector("body[data-rpt-diag='1']", timeout=30_000)
    for name in ("motion_fig", "motion_change_fig", "residual_data_fig", "residual_model_fig", "residual_fig"):
        size = js(
            page,
            f"""(() => {{ const m = RPT.model('{name}'); if (!m) return null;
            const r = Bokeh.index.get_one(m).canvas_view.el.getBoundingClientRect(); return [r.width, r.height]; }})()""",
        )
        assert size is not None and size[0] > 200 and size[1] > 150, (name, size)
    fp = P.load_field_products(site["html"].parent.parent / "fieldA")
    res = np.array(
        js(
            page,
            """(() => { const d = RPT.model('residual_fig').renderers[0].data_source.data;
        return Array.from(d.residual, v => v === v ? v : null); })()""",
        ),
        dtype=float,
    )
    rows = np.asarray(js(page, "Array.from(RPT.m.pixels.data.row)")) - ROW0
    cols = np.asarray(js(page, "Array.from(RPT.m.pixels.data.column)")) - COL0
    np.testing.assert_allclose(res, fp.mean_residual["residual"][rows * NC + cols], rtol=1e-6, atol=1e-4)
    tmin, tmax = js(
        page,
        """(() => { const t = RPT.model('motion_fig').renderers[0].data_source.data.time;
        return [Math.min(...t), Math.max(...t)]; })()""",
    )
    assert tmin == pytest.approx(site["time"][0]) and tmax == pytest.approx(site["time"][-1])
    js(page, "RPT.m.lc_fig.x_range.start = 1326.0; RPT.m.lc_fig.x_range.end = 1327.5")
    assert js(page, "[RPT.model('motion_fig').x_range.start, RPT.model('motion_fig').x_range.end]") == [1326.0, 1327.5]
    js(page, "RPT.m.lc_fig.x_range.start = 1325.0; RPT.m.lc_fig.x_range.end = 1329.0")
    assert page.errors == [] and js(page, "RPT.errors") == []


def test_auto_stretch_per_frame(site, page):
    page.get_by_role("button", name="auto stretch per frame").click()
    page.wait_for_function("RPT.m.auto_stretch.active === true")
    for t in (10, 150):
        js(page, f"RPT.m.cadence_slider.value = {t}")
        frame = shown_frame(page)
        lo, hi = np.percentile(frame[np.isfinite(frame)], [1, 95])
        v = js(page, "RPT.stretchLimits()")
        assert v[0] == pytest.approx(lo, rel=1e-5) and v[1] == pytest.approx(hi, rel=1e-5)
        assert js(page, "RPT.m.mapper_lin.high") == pytest.approx(hi, rel=1e-5)
        assert js(page, "RPT.m.mapper_log.high") == pytest.approx(hi, rel=1e-5)
    page.get_by_role("button", name="auto stretch per frame").click()
    page.wait_for_function("RPT.m.auto_stretch.active === false")
    v = js(page, "RPT.m.stretch_slider.value")
    js(page, "RPT.m.cadence_slider.value = 20")
    assert js(page, "RPT.m.stretch_slider.value") == v  # manual again: the stretch stays
    assert page.errors == [] and js(page, "RPT.errors") == []


def test_log_stretch_slider(site, page):
    """With the log stretch the slider moves in log10(flux) over the cube's 0.2-99.8 % range (labels in e-/s);
    switching to linear keeps the limits; the initial limits are the frame's 1-95 % percentiles."""
    js(page, "RPT.m.image_mode.active = 0; RPT.m.stretch_mode.active = 0; RPT.m.auto_stretch.active = false")
    st = js(page, "RPT.meta.stretch.raw")
    js(page, f"RPT.setStretch({st['lo']}, {st['hi']})")
    s = js(page, "[RPT.m.stretch_slider.start, RPT.m.stretch_slider.end, RPT.m.stretch_slider.value]")
    assert s[0] == pytest.approx(np.log10(max(st["vlo"], st["pos"])), rel=1e-6)
    assert s[1] == pytest.approx(np.log10(st["vhi"]), rel=1e-6)
    assert s[2][1] == pytest.approx(np.log10(st["hi"]), rel=1e-6)
    assert (s[2][1] - s[2][0]) / (s[1] - s[0]) > 0.3  # the limits span a usable part of the track
    assert "log scale" in js(page, "RPT.m.stretch_slider.title")
    js(page, "RPT.m.stretch_mode.active = 1")  # linear: same limits, on a linear track
    lim = js(page, "RPT.stretchLimits()")
    assert lim[0] == pytest.approx(max(st["lo"], st["pos"]), rel=1e-6) and lim[1] == pytest.approx(st["hi"], rel=1e-6)
    assert js(page, "RPT.m.stretch_slider.value")[1] == pytest.approx(st["hi"], rel=1e-6)
    assert js(page, "RPT.m.colorbar.color_mapper.type || RPT.m.colorbar.color_mapper.constructor.name").startswith(
        "Linear"
    )
    js(page, "RPT.m.stretch_mode.active = 0")
    assert page.errors == [] and js(page, "RPT.errors") == []


# ------------------------------------------------------------------ a whole sector: 64 x 64 pixels x 20,000 cadences

LONG_NT, LONG_SIDE = 20_000, 64


def make_long_field(tmp: Path) -> Path:
    """A cube-only field of a sector's length: 64 x 64 pixels x 20,000 cadences (float32), a scattered-light
    ramp flagged at the start and the middle, one star; values derived from (t, row, column) so that a test
    can recompute any number."""
    from workflow_lib.data.cube import make_cube, write_zarr_atomic

    t = np.arange(LONG_NT)
    rr, cc = np.meshgrid(np.arange(LONG_SIDE), np.arange(LONG_SIDE), indexing="ij")
    star = 5000.0 * np.exp(-((rr - 30.2) ** 2 + (cc - 33.7) ** 2) / 3.0)
    ramp = np.where((t < 300) | ((t > 9_000) & (t < 10_500)), 400.0, 0.0)  # flagged scattered light
    flux = (50.0 + ramp[:, None, None] + 0.001 * t[:, None, None] + star[None] + 0.01 * (rr + cc)[None]).astype(
        np.float32
    )
    quality = np.where(ramp > 0, 4096, 0)
    cube = make_cube(
        flux,
        np.sqrt(flux) / 10,
        quality,
        1400.0 + t / 720.0,
        t,
        500 + np.arange(LONG_SIDE),
        700 + np.arange(LONG_SIDE),
        mission="TESS",
        attrs={"sector": 70},
    )
    fdir = tmp / "long"
    write_zarr_atomic(cube, fdir / "cube.zarr")
    return fdir


def test_whole_sector_page_without_crop_loads_on_demand(tmp_path, browser):
    """64 x 64 x 20,000 cadences at full resolution (no crop, no binning); the page opens on a quality-0
    frame, loads far frames and whole-sector pixel light curves on demand, exactly; no console errors."""
    fdir = make_long_field(tmp_path)
    out = tmp_path / "report"
    summary = R.write_field_report(fdir, out / "long.html", out / "long.json", {}, field="long")
    d = summary["display"]
    assert (d["n_pix"], d["n_time"], d["bin_factor"], d["cropped"]) == (LONG_SIDE**2, LONG_NT, 1, False)
    assert (out / "long.html").stat().st_size < 8e6  # the cube is not in the HTML
    assert d["data_mb"] > 2 * LONG_SIDE**2 * LONG_NT * 4 / 1e6  # raw + flux_err, base64
    cube = np.asarray(P.load_field_products(fdir).cube["flux"].values)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto((out / "long.html").as_uri())
    pg.wait_for_selector("body[data-rpt-ready='1']", timeout=60_000)
    meta = js(pg, "RPT.meta")
    assert meta["n_time"] == LONG_NT and meta["data"]["n_chunks"] > 10
    t0 = meta["initial_cadence"]
    assert meta["n_time"] > t0 >= 300 and not (9_000 < t0 < 10_500)  # a quality-0 frame, not the ramp
    rows = np.asarray(js(pg, "Array.from(RPT.m.pixels.data.row)")) - 500
    cols = np.asarray(js(pg, "Array.from(RPT.m.pixels.data.column)")) - 700
    np.testing.assert_array_equal(shown_frame(pg), cube[t0, rows, cols])
    for t in (19_990, 9_500, 0):  # frames of other time chunks, loaded when asked for
        js(pg, f"RPT.m.cadence_slider.value = {t}")
        pg.wait_for_function("RPT.pending === 0", timeout=60_000)
        np.testing.assert_array_equal(shown_frame(pg), cube[t, rows, cols])
    # one pixel, then a 2 x 2 box: their light curves over the whole sector
    p = int(np.flatnonzero((rows == 30) & (cols == 33))[0])
    js(pg, f"RPT.m.pixels.selected.indices = [{p}]")
    pg.wait_for_function("RPT.pending === 0", timeout=60_000)
    lc = np.array(js(pg, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_array_equal(lc, cube[:, 30, 33])
    box = [int(np.flatnonzero((rows == r) & (cols == c))[0]) for r in (15, 16) for c in (15, 16)]  # two groups
    js(pg, f"RPT.m.pixels.selected.indices = {box}")
    pg.wait_for_function("RPT.pending === 0", timeout=60_000)
    lc = np.array(js(pg, "Array.from(RPT.m.lc.data.flux)"), dtype=float)
    np.testing.assert_allclose(lc, cube[:, 15:17, 15:17].astype(np.float64).sum(axis=(1, 2)), rtol=1e-12)
    cdp = ctx.new_cdp_session(pg)
    cdp.send("HeapProfiler.collectGarbage")
    heap_mb = cdp.send("Runtime.getHeapUsage")["usedSize"] / 1e6
    cached_mb = js(pg, "RPT.cacheBytes / 1e6")
    assert cached_mb <= js(pg, "RPT.D.cache_mb") + 1  # the cache keeps report.cache_mb, not the 650 MB of data
    assert heap_mb < 300, heap_mb  # the goal for the JS heap
    assert errors == [] and js(pg, "RPT.errors") == []
    ctx.close()


def test_report_folder_is_relocatable_and_a_missing_data_folder_is_named(site, browser, tmp_path):
    """The report folder zipped and unzipped elsewhere works (relative data paths); without its data folder a
    page still opens on its first frame and its status line names the folder it could not load."""
    archive = shutil.make_archive(str(tmp_path / "report"), "zip", site["html"].parent)
    moved = tmp_path / "elsewhere"
    shutil.unpack_archive(archive, moved)
    ctx = browser.new_context(viewport={"width": 1300, "height": 1000})
    pg = ctx.new_page()
    pg.goto((moved / "fieldA.html").as_uri())
    pg.wait_for_selector("body[data-rpt-loaded='1']", timeout=30_000)
    js(pg, "RPT.m.cadence_slider.value = 33")
    np.testing.assert_allclose(shown_frame(pg), frame_of(site, 33, pg)[0], equal_nan=True)
    assert js(pg, "RPT.errors") == []
    shutil.rmtree(moved / "fieldA_data")
    pg.goto((moved / "fieldA.html").as_uri() + "?again")
    pg.wait_for_selector("body[data-rpt-ready='1']", timeout=30_000)
    pg.wait_for_function("RPT.pending === 0", timeout=30_000)
    t0 = js(pg, "RPT.meta.initial_cadence")
    np.testing.assert_allclose(shown_frame(pg), frame_of(site, t0, pg)[0], equal_nan=True)  # in the HTML itself
    status = js(pg, "RPT.m.status.text")
    assert "could not load fieldA_data/" in status and "keep the folder fieldA_data/ beside the page" in status
    ctx.close()


def test_layout_units_and_empty_states(site, page):
    """Square pixels; units on the colour bar and on every flux axis; the light curves use the window's width;
    the motion legends sit below the curves; the PRF picture is shown at its own size; a panel without a
    light curve, and an empty pixel selection, say why."""
    page.wait_for_selector("body[data-rpt-diag='1']", timeout=30_000)
    x0, y0 = data_to_page(page, "image_fig", 204, 104)
    x1, y1 = data_to_page(page, "image_fig", 214, 114)
    assert abs(abs(x1 - x0) - abs(y1 - y0)) <= 1.0  # 10 columns as wide as 10 rows are tall
    assert js(page, "RPT.m.colorbar.title") == "flux [e-/s]"
    for k in ("raw", "lfd", "cpm"):
        assert js(page, f"RPT.m.srcfig_{k}.left[0].axis_label") == "flux [e-/s]"
    assert js(page, "RPT.m.lc_fig.left[0].axis_label") == "flux [e-/s]"
    right = js(page, "Bokeh.index.get_one(RPT.m.lc_fig).el.getBoundingClientRect().right")
    assert right > 0.9 * js(page, "document.documentElement.clientWidth")  # the screen's width is used
    below = js(page, "RPT.model('motion_fig').below.map(m => m.type || m.constructor.name)")
    assert any("Legend" in str(b) for b in below)  # the legend is below the plot, not over the curves
    natural, shown = js(
        page, "(() => { const i = document.querySelector('.prf img'); return [i.naturalWidth, i.clientWidth]; })()"
    )
    assert shown >= min(natural, 0.9 * js(page, "document.documentElement.clientWidth")) - 2
    # source 3 is off the pixels: its LFD panel says so; no pixel selected: the light curve says so
    js(page, "RPT.m.sources.selected.indices = [3]")
    page.wait_for_function("RPT.pending === 0")
    assert "off the pixels" in js(page, "RPT.m.srcfig_lfd.title.text")
    assert "off the pixels" in js(page, "RPT.m.source_title.text")
    sel = js(page, "Array.from(RPT.m.pixels.selected.indices)")
    js(page, "RPT.m.pixels.selected.indices = []")
    page.wait_for_function("RPT.pending === 0")
    assert "no pixel selected" in js(page, "RPT.m.lc_fig.title.text")
    assert "— (none)" in js(page, "RPT.m.status.text")
    js(page, f"RPT.m.pixels.selected.indices = {sel}; RPT.m.sources.selected.indices = [0]")
    page.wait_for_function("RPT.pending === 0")
    assert "no pixel selected" not in js(page, "RPT.m.lc_fig.title.text")
    assert page.errors == [] and js(page, "RPT.errors") == []
