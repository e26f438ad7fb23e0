"""Report pages in a browser: time to interactive, JS heap and size on disk of the static field pages.

    python benchmarks/report_browser.py --report-dir results/default/report     # the pages of a run
    python benchmarks/report_browser.py                                          # synthetic 24x24x240, 64x64x1300
    python benchmarks/report_browser.py --synthetic 64x64x1300,64x64x20000 --repeat 5 --json /tmp/rb.json

Each page (every ``*.html`` of ``--report-dir`` except ``index.html``; ``--recursive`` for survey
sub-folders) is opened ``--repeat`` times from file:// in headless Chromium (Debian ``chromium`` through
playwright, as ``tests/test_report_browser.py`` does), each time in a fresh browser context, and measured:

* TTI: the page's own ``performance.now()`` (milliseconds since navigation started) when
  ``body[data-rpt-ready='1']`` appeared (report.js sets it when the Bokeh models are wired up; a
  MutationObserver installed before any page script records it) -- the usual definition, from navigation
  start to interactive; beside it the harness's wall time from the start of ``page.goto`` (which adds the
  fresh browser context's start-up, about a second here);
* JS heap used (CDP ``Performance.getMetrics`` -> ``JSHeapUsedSize``, after a forced garbage collection)
  after load, and again after stepping 50 cadences (``RPT.step``, each awaited until the blocks it needs from
  ``<stem>_data/`` have loaded (``RPT.whenIdle``) and one animation frame has passed; mean wall ms per step
  and mean ms of the synchronous JavaScript of a step) and selecting a source (the
  first one not already selected: the page opens on its target). Beside it the ArrayBuffer backing stores
  (CDP ``Runtime.getHeapUsage``), where the pixel cube's typed arrays live outside the JS heap;
* size on disk: the .html plus, if present, its sibling ``<stem>_data/`` directory (all files).

Median and [min-max] over the repeats are printed. Without ``--report-dir`` the default run's report folder
(results/<run>/report, ``run`` of config/config.yaml, written by ``snakemake --cores 2``) is used when it has
pages. ``--synthetic RxCxT,...`` builds field pages from synthetic fields in a temporary directory -- a
cube zarr and a catalog only; the report skips the missing LFD / CPM stages -- and times the page build
(``write_field_report``); they are measured when asked for, or when no report pages are found.

Goals (printed beside the figures; "GOAL MISSED" lines when missed, the exit code is 0 all the same):
TTI < 3 s for the default field page (the pages of the default run; 64x64x1300 is its synthetic stand-in)
on 2 cores, and JS heap < 300 MB for every page. Others' work on the machine slows TTI: the load average is
printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.chromium import ARGS as BASE_ARGS  # noqa: E402
from tests.helpers.chromium import CHROMIUM  # noqa: E402

ARGS = BASE_ARGS + ["--enable-precise-memory-info"]
READY = "body[data-rpt-ready='1']"
#: records performance.now() when report.js marks the page ready (installed before any page script runs)
READY_OBSERVER = """(() => {
  new MutationObserver((_, obs) => {
    if (document.body && document.body.getAttribute('data-rpt-ready') === '1') {
      window.__rptReadyAt = performance.now(); obs.disconnect();
    }
  }).observe(document, {subtree: true, attributes: true, attributeFilter: ['data-rpt-ready']});
})();"""
#: one cadence step: the synchronous JavaScript of RPT.step, then wait until the data it needs has loaded
#: (RPT.whenIdle, pages that load their cube from <page>_data/) and for one animation frame (the redraw)
STEP_JS = """(k) => new Promise((resolve) => {
  const t0 = performance.now(); RPT.step(k); const ms = performance.now() - t0;
  const idle = RPT.whenIdle ? RPT.whenIdle : (fn) => fn();
  idle(() => requestAnimationFrame(() => resolve(ms)));
})"""
#: what a page that never became interactive got to
STATE_JS = """() => { const R = window.RPT; if (!R) return 'no RPT';
  return JSON.stringify({init: !!R.doc, ready: R.ready, pending: R.pending, errors: R.errors}); }"""
SELECT_JS = """() => new Promise((resolve) => {
  const s = RPT.m && RPT.m.sources;
  const n = s && s.data.source_id ? s.data.source_id.length : 0;
  if (!n) { resolve(null); return; }
  const cur = Array.from(s.selected.indices);
  let i = 0; while (i < n && cur.includes(i)) i++;
  if (i >= n) i = 0;
  s.selected.indices = [i];
  requestAnimationFrame(() => resolve(i));
})"""

GOAL_TTI_S = 3.0
GOAL_HEAP_MB = 300.0
DEFAULT_SPECS = "24x24x240,64x64x1300"
DEFAULT_STAND_IN = (64, 64, 1300)  # the default config's cutouts (README)
ROW0, COL0 = 100, 200
MB = 1e6


# ------------------------------------------------------------------ inputs


def default_run() -> tuple[str, list[str]]:
    """The run name and field names of config/config.yaml (the pages ``snakemake --cores 2`` writes)."""
    try:
        cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text()) or {}
    except OSError:
        cfg = {}
    return str(cfg.get("run", "default")), sorted((cfg.get("fields") or {}).keys())


def report_pages(report_dir: Path, recursive: bool) -> list[Path]:
    pattern = "**/*.html" if recursive else "*.html"
    return sorted(p for p in report_dir.glob(pattern) if p.name != "index.html" and p.is_file())


def parse_spec(spec: str) -> tuple[int, int, int]:
    try:
        r, c, t = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--synthetic: {spec!r} is not RxCxT (e.g. 64x64x1300)") from None
    if min(r, c, t) < 2:
        raise SystemExit(f"--synthetic: {spec!r}: every dimension must be >= 2")
    return r, c, t


def disk_size(html: Path) -> dict:
    """Bytes of the page and of its ``<stem>_data/`` directory (recursively), if present."""
    data = html.with_name(html.stem + "_data")
    data_bytes = sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) if data.is_dir() else 0
    html_bytes = html.stat().st_size
    return {"html_mb": html_bytes / MB, "data_mb": data_bytes / MB, "total_mb": (html_bytes + data_bytes) / MB}


def build_synthetic_field(root: Path, nr: int, nc: int, nt: int, seed: int = 5) -> Path:
    """A synthetic field directory: ``cube.zarr`` (nt x nr x nc, one 27.4-day sector) and ``catalog.ecsv``.

    The pattern of ``tests/test_report.py::make_field`` (whose sizes are module constants) without the LFD /
    CPM products: Gaussian stars with a slow sinusoidal variability, a sky level, noise, quality flags.
    """
    from astropy.table import Table

    from workflow_lib.data.cube import make_cube, write_zarr_atomic

    rng = np.random.default_rng(seed)
    rows = np.arange(ROW0, ROW0 + nr)
    cols = np.arange(COL0, COL0 + nc)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    time_ = 1325.0 + (27.4 / nt) * np.arange(nt)
    ns = max(4, nr * nc // 64)
    srow = np.concatenate([[ROW0 + 0.45 * nr], rng.uniform(ROW0 - 2, ROW0 + nr + 1, ns - 1)])
    scol = np.concatenate([[COL0 + 0.55 * nc], rng.uniform(COL0 - 2, COL0 + nc + 1, ns - 1)])
    gmag = np.concatenate([[10.0], rng.uniform(11.0, 17.0, ns - 1)])  # the target: brightest, near the centre
    amp = 15000 * 10 ** (-0.4 * (gmag - 10.0))
    imgs = np.exp(-((rr[None] - srow[:, None, None]) ** 2 + (cc[None] - scol[:, None, None]) ** 2) / 2.0)
    imgs = (amp[:, None, None] * imgs / (2 * np.pi)).reshape(ns, -1).astype(np.float32)
    period = rng.uniform(0.5, 10.0, ns)
    var = 1 + 0.01 * np.sin(2 * np.pi * time_[:, None] / period[None]).astype(np.float32)
    flux = (var.astype(np.float32) @ imgs).reshape(nt, nr, nc)
    flux += 20.0 + 3.0 * rng.standard_normal(flux.shape, dtype=np.float32)
    flux[min(5, nt - 1), min(3, nr - 1), min(4, nc - 1)] = np.nan
    quality = np.zeros(nt, np.int32)
    quality[:: max(1, nt // 10)] |= 32  # momentum dumps
    cube = make_cube(
        flux,
        np.full(flux.shape, 3.0, np.float32),
        quality,
        time_,
        1000 + np.arange(nt),
        rows,
        cols,
        mission="TESS",
        attrs={"sector": 1, "camera": 4, "ccd": 2},
    )
    del flux
    fdir = root / f"synth_{nr}x{nc}x{nt}"
    write_zarr_atomic(cube, fdir / "cube.zarr")
    on = (srow >= ROW0 - 0.5) & (srow <= ROW0 + nr - 0.5) & (scol >= COL0 - 0.5) & (scol <= COL0 + nc - 0.5)
    Table(
        {
            "source_id": 4660000000000000001 + np.arange(ns, dtype=np.int64),
            "row": srow,
            "column": scol,
            "phot_g_mean_mag": gmag,
            "on_cutout": on,
        }
    ).write(fdir / "catalog.ecsv", format="ascii.ecsv", overwrite=True)
    return fdir


def synthetic_pages(specs: list[tuple[int, int, int]], workdir: Path) -> list[dict]:
    """Field pages of synthetic fields under ``workdir``, with the field and page build times."""
    from workflow_lib.report.page import write_field_report

    out = []
    for nr, nc, nt in specs:
        name = f"synth_{nr}x{nc}x{nt}"
        t0 = time.perf_counter()
        fdir = build_synthetic_field(workdir, nr, nc, nt)
        t1 = time.perf_counter()
        html = workdir / "report" / f"{name}.html"
        summary = write_field_report(fdir, html, html.with_suffix(".json"), {}, field=name)
        t2 = time.perf_counter()
        d = summary.get("display", {})
        print(
            f"{name}: field written in {t1 - t0:.1f} s, page built in {t2 - t1:.1f} s "
            f"({d.get('n_pix')} pixels x {d.get('n_time')} cadences shown, bin {d.get('bin_factor')})",
            flush=True,
        )
        out.append(
            {
                "page": html,
                "name": name,
                "kind": "synthetic",
                "default": (nr, nc, nt) == DEFAULT_STAND_IN,
                "field_build_s": t1 - t0,
                "page_build_s": t2 - t1,
            }
        )
    return out


# ------------------------------------------------------------------ browser


def heap(cdp) -> dict:
    """JS heap used [MB] after a forced garbage collection, and the ArrayBuffer backing stores [MB]."""
    cdp.send("HeapProfiler.collectGarbage")
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    out = {"heap_mb": metrics.get("JSHeapUsedSize", float("nan")) / MB, "buffers_mb": None}
    try:
        usage = cdp.send("Runtime.getHeapUsage")
        if "backingStorageSize" in usage:
            out["buffers_mb"] = usage["backingStorageSize"] / MB
    except Exception:  # noqa: BLE001 - an older Chromium without the field
        pass
    return out


def measure_once(browser, html: Path, steps: int, timeout_s: float) -> dict:
    """Open ``html`` in a fresh context; TTI, heap after load, step timing, heap after the interaction."""
    ctx = browser.new_context(viewport={"width": 1300, "height": 1400})
    try:
        ctx.add_init_script(READY_OBSERVER)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        cdp = ctx.new_cdp_session(page)
        cdp.send("Performance.enable")
        r: dict = {"errors": errors}
        t0 = time.perf_counter()
        try:
            page.goto(html.resolve().as_uri(), wait_until="commit", timeout=timeout_s * 1e3)
            page.wait_for_selector(READY, state="attached", timeout=timeout_s * 1e3)
        except Exception as exc:  # noqa: BLE001 - a page that never becomes interactive is a result
            try:
                state = page.evaluate(STATE_JS)
            except Exception:  # noqa: BLE001
                state = "?"
            r["failed"] = f"not interactive within {timeout_s:g} s ({type(exc).__name__}; RPT {state})"
            return r
        r["tti_s"] = time.perf_counter() - t0
        r["perf_now_s"] = page.evaluate("performance.now()") / 1e3
        ready_at = page.evaluate("window.__rptReadyAt ?? null")
        r["ready_perf_now_s"] = None if ready_at is None else ready_at / 1e3
        r.update({f"load_{k}": v for k, v in heap(cdp).items()})
        try:
            n_left = page.evaluate("(() => { const s = RPT.m.cadence_slider; return s.end - (s.value | 0); })()")
            k = 1 if n_left >= steps else -1
            js_ms = []
            t1 = time.perf_counter()
            for _ in range(steps):
                js_ms.append(page.evaluate(STEP_JS, k))
            r["step_wall_ms"] = 1e3 * (time.perf_counter() - t1) / steps
            r["step_js_ms"] = statistics.fmean(js_ms)
        except Exception as exc:  # noqa: BLE001
            r["step_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        try:
            r["selected_source"] = page.evaluate(SELECT_JS)
        except Exception as exc:  # noqa: BLE001
            r["select_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        r.update({f"after_{k}": v for k, v in heap(cdp).items()})
        try:
            errors.extend(f"RPT.errors: {e}" for e in page.evaluate("(window.RPT && RPT.errors) || []"))
        except Exception:  # noqa: BLE001
            pass
        return r
    finally:
        ctx.close()


def summarise(runs: list[dict], key: str) -> dict | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def measure_pages(pages: list[dict], repeat: int, steps: int, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    keys = (
        "tti_s",
        "perf_now_s",
        "ready_perf_now_s",
        "load_heap_mb",
        "load_buffers_mb",
        "step_wall_ms",
        "step_js_ms",
        "after_heap_mb",
        "after_buffers_mb",
    )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for pg in pages:
                runs = []
                for _ in range(repeat):
                    runs.append(measure_once(browser, pg["page"], steps, timeout_s))
                    if "failed" in runs[-1]:
                        break  # it will not become interactive the next time either
                pg["runs"] = runs
                for k in keys:
                    pg[k] = summarise(runs, k)
                pg["failed"] = sorted({r["failed"] for r in runs if "failed" in r})
                pg["errors"] = sorted({e for r in runs for e in r["errors"]})
                pg["selected_source"] = next((r.get("selected_source") for r in runs if "tti_s" in r), None)
                tti = pg["ready_perf_now_s"]
                print(
                    f"{pg['name']}: TTI {fmt(tti, '{:.2f}')} s"
                    + (f", FAILED {pg['failed']}" if pg["failed"] else "")
                    + (f", {len(pg['errors'])} page error(s)" if pg["errors"] else ""),
                    flush=True,
                )
        finally:
            browser.close()


# ------------------------------------------------------------------ output


def fmt(s: dict | None, f: str, spread: bool = False) -> str:
    if s is None:
        return "-"
    out = f.format(s["median"])
    if spread:
        out += f" [{f.format(s['min'])}-{f.format(s['max'])}]"
    return out


def med(s: dict | None) -> float | None:
    return None if s is None else s["median"]


def print_table(pages: list[dict], repeat: int, steps: int) -> None:
    head = [
        "page",
        "disk MB (html+data)",
        "build s",
        f"TTI s median [min-max] of {repeat}",
        "goto->ready wall s",
        f"step ms wall/js ({steps})",
        "heap MB load",
        "heap MB after",
        "buffers MB load/after",
    ]
    rows = []
    for p in pages:
        sz = p["size"]
        bl, ba = med(p.get("load_buffers_mb")), med(p.get("after_buffers_mb"))
        rows.append(
            [
                p["name"] + (" *" if p["default"] else ""),
                f"{sz['total_mb']:.1f} ({sz['html_mb']:.1f}+{sz['data_mb']:.1f})",
                "-" if p.get("page_build_s") is None else f"{p['page_build_s']:.1f}",
                fmt(p.get("ready_perf_now_s"), "{:.2f}", spread=True),
                fmt(p.get("tti_s"), "{:.2f}"),
                f"{fmt(p.get('step_wall_ms'), '{:.1f}')}/{fmt(p.get('step_js_ms'), '{:.2f}')}",
                fmt(p.get("load_heap_mb"), "{:.0f}"),
                fmt(p.get("after_heap_mb"), "{:.0f}"),
                "-" if bl is None else f"{bl:.0f}/{ba:.0f}" if ba is not None else f"{bl:.0f}/-",
            ]
        )
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join
    print(line(h.ljust(n) for h, n in zip(head, w)))
    print(line("-" * n for n in w))
    for r in rows:
        print(line(str(x).ljust(n) for x, n in zip(r, w)))
    print("* the default field page (or its synthetic stand-in, 64x64x1300), held to the TTI goal")


def check_goals(pages: list[dict]) -> list[str]:
    """Goal lines: 'goal met' / 'GOAL MISSED' per page and figure."""
    out = []
    for p in pages:
        if p["failed"]:
            out.append(f"GOAL MISSED  {p['name']}: never interactive ({'; '.join(p['failed'])})")
            continue
        tti = med(p.get("ready_perf_now_s"))
        if p["default"] and tti is not None:
            ok = tti < GOAL_TTI_S
            verdict = "goal met   " if ok else "GOAL MISSED"
            out.append(f"{verdict}  {p['name']}: TTI {tti:.2f} s (median) < {GOAL_TTI_S:g} s")
        peak = max(
            (v for v in (med(p.get("load_heap_mb")), med(p.get("after_heap_mb"))) if v is not None), default=None
        )
        if peak is not None:
            verdict = "goal met   " if peak < GOAL_HEAP_MB else "GOAL MISSED"
            out.append(f"{verdict}  {p['name']}: JS heap {peak:.0f} MB (larger of load / after) < {GOAL_HEAP_MB:g} MB")
    return out


def machine() -> dict:
    try:
        chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError, TypeError):
        chromium = None
    return {
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "chromium": chromium,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-dir", help="a run's report folder (default: results/<run>/report if it has pages)")
    ap.add_argument("--recursive", action="store_true", help="also the pages of sub-folders (survey CCDs)")
    ap.add_argument(
        "--synthetic",
        help=f"comma-separated RxCxT synthetic field pages to build and measure (default when no report "
        f"pages are found: {DEFAULT_SPECS}; 'none' for none)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="openings per page, each in a fresh context")
    ap.add_argument("--steps", type=int, default=50, help="cadence steps of the interaction")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a page to be interactive")
    ap.add_argument("--workdir", help="build the synthetic fields here and keep them (default: a temporary dir)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    if a.repeat < 1 or a.steps < 1:
        raise SystemExit("--repeat and --steps must be >= 1")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SystemExit("python playwright is not installed (pip install playwright; never `playwright install`)")
    if CHROMIUM is None:
        raise SystemExit("Debian chromium not found (apt-get install chromium)")

    run, fields = default_run()
    default_dir = REPO / "results" / run / "report"
    pages: list[dict] = []
    report_dir = Path(a.report_dir) if a.report_dir else default_dir
    found = report_pages(report_dir, a.recursive) if report_dir.is_dir() else []
    if not found:
        how = "--report-dir" if a.report_dir else f"no --report-dir; the default run's folder ({run!r})"
        print(f"{how} {report_dir}: no report pages (`snakemake --cores 2` writes them); measuring synthetic pages")
    is_default_dir = report_dir.resolve() == default_dir.resolve()
    for html in found:
        pages.append(
            {
                "page": html,
                "name": str(html.relative_to(report_dir).with_suffix("")),
                "kind": "report",
                "default": is_default_dir and html.parent.resolve() == default_dir.resolve() and html.stem in fields,
            }
        )
    specs_arg = a.synthetic if a.synthetic is not None else ("none" if found else DEFAULT_SPECS)
    specs = [] if specs_arg.strip().lower() in ("", "none") else [parse_spec(s) for s in specs_arg.split(",")]
    tmp = None
    if specs:
        if a.workdir:
            work = Path(a.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="report-browser-")
            work = Path(tmp.name)
        pages.extend(synthetic_pages(specs, work))
    if not pages:
        print("nothing to measure")
        return 0
    try:
        for p in pages:
            p["size"] = disk_size(p["page"])
        mach = machine()
        print(
            f"\n{len(pages)} page(s), {a.repeat} opening(s) each, {a.steps} cadence steps; {mach['cpus']} CPUs, "
            f"load average {mach['loadavg'][0]:.2f}; {mach['chromium']}",
            flush=True,
        )
        measure_pages(pages, a.repeat, a.steps, a.timeout)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    print_table(pages, a.repeat, a.steps)
    print()
    for line in check_goals(pages):
        print(line)
    for p in pages:
        for e in p["errors"][:5]:
            print(f"page error  {p['name']}: {e}")
    if a.json:
        out = {
            "machine": machine(),
            "goals": {"tti_s": GOAL_TTI_S, "heap_mb": GOAL_HEAP_MB},
            "repeat": a.repeat,
            "steps": a.steps,
            "pages": [{**p, "page": str(p["page"])} for p in pages],
        }
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
