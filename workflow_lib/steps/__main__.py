"""Run one pipeline step without Snakemake: ``python -m workflow_lib.steps <step> [options]``.

Every rule's ``shell:`` command is one of these calls (see docs/CLI.md for the commands of a run)::

    python -m workflow_lib.steps edge-model --cube results/ci-tiny/tiny/cube.zarr \\
        --catalog results/ci-tiny/tiny/catalog.ecsv --out edge_model.json --params '{"threshold": 5}' \\
        --log edge_model.log

* settings: ``--params '<json object>'`` or ``--params-file FILE`` (JSON); omitted keys take the
  schema defaults, like in the workflow;
* paths: named options; a zarr store may be given as its directory or as its ``zarr.json``
  (what the rules declare as the store's output file);
* ``--log FILE``: progress, warnings and, on failure, the full traceback go there; stderr then
  gets one line ``error: <step>: <message>`` and the exit status is 1.

Each subcommand imports only the module its step lives in (``python -X importtime`` to check), so
a short step does not pay for bokeh / dask / astroquery it does not use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: steps that never compute with dask: they need not import it to configure its scheduler (~0.3 CPU-s)
DASK_FREE_STEPS = {"survey-split-catalog", "survey-ccd-motion", "survey-table", "stale"}

# step name -> (module, function, help)
STEPS = {
    "download-synthetic": ("workflow_lib.data.synthetic", "write_synthetic_field", "simulate a synthetic TESS sector"),
    "download-local": ("workflow_lib.data.fits_reader", "write_local_field", "local TESScut / TPF FITS -> cube"),
    "download-mast": ("workflow_lib.data.mast", "download_field", "TESScut / Kepler-K2 TPFs from MAST -> cube"),
    "gaia-crossmatch": ("workflow_lib.data.gaia", "crossmatch_field", "Gaia sources in pixel coordinates"),
    "edge-model": ("workflow_lib.steps.lfd", "edge_model_step", "LFD §4.2 PRF edge model"),
    "prf-model": ("workflow_lib.steps.lfd", "prf_model_step", "LFD §4.3-4.4 PRF shape + mean-frame fluxes"),
    "motion-model": ("workflow_lib.steps.lfd", "motion_model_step", "LFD §4.5 scene motion model"),
    "scene-offsets": ("workflow_lib.steps.lfd", "scene_offsets_step", "per-cadence scene offsets of a tile + errors"),
    "flux-solve": ("workflow_lib.steps.lfd", "flux_solve_step", "LFD §4.4-4.5 per-cadence fluxes"),
    "cpm-detrend": ("workflow_lib.steps.cpm", "run_cpm_detrend", "CPM de-trending + aperture light curves"),
    "cpm-sweep-summary": ("workflow_lib.steps.cpm", "sweep_summary", "median CDPP of every CPM parameter set"),
    "cpm-stitch": ("workflow_lib.steps.cpm", "run_cpm_stitch", "stitch CPM light curves of several sectors"),
    "deblend-detrend": (
        "workflow_lib.steps.deblend",
        "deblend_detrend_step",
        "deblended, de-trended light curves (LFD neighbours subtracted, CPM)",
    ),
    "report-field": ("workflow_lib.report.page", "write_field_report", "HTML inspection page of one field"),
    "report-index": ("workflow_lib.report.page", "write_index_report", "HTML index page of a run"),
    "survey-synthetic": ("workflow_lib.steps.survey", "write_synthetic_ccd", "synthetic CCD written as SPOC FFIs"),
    "survey-ingest": ("workflow_lib.steps.survey", "ingest_ccd", "FFIs of one CCD -> one cube"),
    "survey-tiles": ("workflow_lib.steps.survey", "write_tile_grid", "tile grid (cores + halos) of a CCD cube"),
    "survey-cut-tile": ("workflow_lib.steps.survey", "cut_tile_step", "one tile's cube from the CCD cube"),
    "survey-split-catalog": ("workflow_lib.steps.survey", "split_catalog_step", "one tile's catalog"),
    "survey-ccd-motion": ("workflow_lib.steps.survey", "ccd_motion_step", "CCD-level scene motion from all tiles"),
    "survey-merge": ("workflow_lib.steps.survey", "merge_tiles_step", "merge per-tile light curves of a CCD"),
    "survey-table": ("workflow_lib.steps.survey", "survey_table_step", "per-CCD source table of every set"),
    "report-survey": ("workflow_lib.report.survey", "write_survey_report", "HTML overview page of a CCD"),
    "stale": (
        "workflow_lib.core.provenance",
        "report_stale",
        "list products made from inputs that changed since (exit 1 if any)",
    ),
}


#: commands for people, which no rule runs
TOOLS = ("stale",)


#: the schema section a step's ``--params`` are checked against (unknown keys, types, ranges), and keys
#: it accepts besides that section's own: a field's keys merged over the run-wide ones (rules/common.smk
#: field_params). Steps not listed take small ad-hoc settings checked by the step itself.
PARAM_SECTIONS = {
    "download-synthetic": ("$defs.synthetic", ()),
    "download-local": ("$defs.local", ()),
    "download-mast": ("$defs.mast", ()),
    "gaia-crossmatch": ("gaia", ("catalog",)),
    "edge-model": ("lfd.edge", ()),
    "prf-model": ("lfd.prf", ()),
    "motion-model": ("lfd.motion", ()),
    "scene-offsets": ("lfd.motion", ()),
    "survey-ccd-motion": ("survey.ccd_motion", ()),
    "flux-solve": ("lfd.solve", ()),
    "cpm-detrend": ("cpm", ()),
    "report-field": ("report", ()),
    "survey-synthetic": ("survey.synthetic", ()),
    "survey-ingest": ("survey.ingest", ()),
    "survey-tiles": ("survey", ()),
    "survey-split-catalog": ("survey", ()),
}


def store(path: str | None) -> str | None:
    """A zarr store given as its directory or as its ``zarr.json`` -> the directory."""
    if path is None:
        return None
    p = Path(path)
    return str(p.parent) if p.name == "zarr.json" else str(path)


def json_arg(text: str, option: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option}: not valid JSON ({exc})") from None


def load_params(args) -> dict:
    """The step's settings: --params-file (JSON) updated by --params (JSON); {} when neither is given."""
    params = {}
    if args.params_file:
        path = Path(args.params_file)
        if not path.is_file():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        params.update(json_arg(path.read_text(), f"--params-file {path}"))
    if args.params:
        params.update(json_arg(args.params, "--params"))
    if not isinstance(params, dict):
        raise ValueError("--params: a JSON object is expected")
    if args.step in PARAM_SECTIONS:
        from workflow_lib.core.settings import check_section

        section, extra = PARAM_SECTIONS[args.step]
        check_section(params, section, "--params-file/--params" if args.params_file else "--params", extra)
    return params


def check_inputs(**paths) -> None:
    """Name a missing input file before the step starts (the step's own error may be less clear)."""
    for option, path in paths.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(2, f"No such file or directory (--{option.replace('_', '-')})", str(path))


# ---------------------------------------------------------------- calls: args -> func(*a, **kw)


def call_download_synthetic(f, a, p):
    f(store(a.cube), store(a.truth), a.catalog, p, field=a.field)


def call_download_local(f, a, p):
    f(p, store(a.cube), field=a.field)


def call_download_mast(f, a, p):
    client = json_arg(a.client, "--client") if a.client else {}
    f(p, store(a.cube), field=a.field, **client)


def call_gaia_crossmatch(f, a, p):
    check_inputs(cube=store(a.cube), local_catalog=a.local_catalog)
    f(store(a.cube), a.out, p, a.local_catalog)


def call_edge_model(f, a, p):
    check_inputs(cube=store(a.cube), catalog=a.catalog)
    f(store(a.cube), a.catalog, a.out, p)


def call_prf_model(f, a, p):
    check_inputs(cube=store(a.cube), catalog=a.catalog, edge=a.edge)
    f(store(a.cube), a.catalog, a.edge, a.out, a.png, p)


def call_motion_model(f, a, p):
    check_inputs(cube=store(a.cube), catalog=a.catalog, prf=a.prf, ccd_motion=a.ccd_motion)
    f(store(a.cube), a.catalog, a.prf, a.out, p, ccd_motion=a.ccd_motion)


def call_scene_offsets(f, a, p):
    check_inputs(cube=store(a.cube), catalog=a.catalog, prf=a.prf)
    f(store(a.cube), a.catalog, a.prf, a.out, p)


def call_survey_ccd_motion(f, a, p):
    offsets = name_paths(a.offsets, "--offsets")
    check_inputs(**{f"offsets {k}": v for k, v in offsets.items()})
    f(offsets, a.out, a.qa, p)


def call_flux_solve(f, a, p):
    check_inputs(cube=store(a.cube), catalog=a.catalog, prf=a.prf, motion=a.motion)
    f(
        store(a.cube),
        a.catalog,
        a.prf,
        a.motion,
        store(a.out),
        a.fits_dir,
        p,
        threads=a.threads,
        diagnostics_npz=a.diagnostics,
        **cdpp_hours_kw(a),
    )


def cdpp_hours_kw(a) -> dict:
    """``cdpp_hours`` for the steps that store CDPP on their light-curve sets (default: the step's own)."""
    return {"cdpp_hours": tuple(json_arg(a.cdpp_hours, "--cdpp-hours"))} if a.cdpp_hours else {}


def call_cpm_detrend(f, a, p):
    check_inputs(cube=store(a.cube), catalog=a.catalog)
    f(
        store(a.cube),
        a.catalog,
        detrended_path=store(a.detrended),
        lightcurves_path=store(a.lightcurves),
        raw_lightcurves_path=store(a.raw_lightcurves),
        fits_dir=a.fits_dir,
        config=p,
        paramset=a.paramset,
        target_aperture=json_arg(a.target_aperture, "--target-aperture") if a.target_aperture else {},
        threads=a.threads,
        field=a.field,
        **cdpp_hours_kw(a),
    )


def call_cpm_sweep_summary(f, a, p):
    sets = {}
    for item in a.cpm:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--cpm {item}: expected NAME=PATH")
        sets[name] = store(path)
    check_inputs(raw=store(a.raw), lfd=store(a.lfd), **{f"cpm {k}": v for k, v in sets.items()})
    kw = {"lfd_path": store(a.lfd)}
    if "mag_range" in p:
        kw["mag_range"] = tuple(p["mag_range"])
    f(sets, store(a.raw), a.out, **kw)


def call_cpm_stitch(f, a, p):
    paths = [store(x) for x in a.lightcurves]
    check_inputs(**{f"lightcurves {i}": x for i, x in enumerate(paths)})
    kw = {"n_points": int(p["n_points"])} if "n_points" in p else {}
    f(paths, store(a.out), a.fits_dir, group=a.group, **kw, **cdpp_hours_kw(a))


def call_deblend_detrend(f, a, p):
    check_inputs(
        cube=store(a.cube), catalog=a.catalog, prf=a.prf, motion=a.motion, lfd=store(a.lfd), cpm=store(a.cpm),
        raw=store(a.raw),
    )  # fmt: skip
    f(
        store(a.cube),
        a.catalog,
        a.prf,
        a.motion,
        store(a.lfd),
        store(a.out),
        a.fits_dir,
        p,
        cpm_path=store(a.cpm),
        raw_path=store(a.raw),
        paramset=a.paramset,
        target_aperture=json_arg(a.target_aperture, "--target-aperture") if a.target_aperture else {},
        threads=a.threads,
        field=a.field,
        **cdpp_hours_kw(a),
    )


def call_report_field(f, a, p):
    check_inputs(field_dir=a.field_dir)
    f(a.field_dir, a.out, a.summary, p, field=a.field, link_index=a.link_index)


def call_report_index(f, a, p):
    ccds = name_paths(a.ccds, "--ccds")
    check_inputs(
        **{f"summaries {i}": x for i, x in enumerate(a.summaries)}, **{f"ccds {k}": v for k, v in ccds.items()}
    )
    f(a.summaries, a.out, config=p, bench_dir=a.bench_dir, run=a.run, ccds=ccds)


def call_stale(f, a, p):
    check_inputs(results=a.results)
    if f(a.results):
        raise SystemExit(1)  # stale products found (listed on stdout): exit status 1, no traceback


def name_paths(items, option: str) -> dict:
    """``NAME=PATH`` arguments -> {name: path} (zarr stores given by zarr.json -> the directory)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"{option} {item}: expected NAME=PATH")
        out[name] = store(path)
    return out


def call_survey_synthetic(f, a, p):
    f(a.ffi_dir, a.catalog, store(a.truth), p)


def call_survey_ingest(f, a, p):
    f(a.ffi, store(a.out), p)


def call_survey_tiles(f, a, p):
    check_inputs(cube=store(a.cube))
    f(store(a.cube), a.out, p.get("tile_size"), p.get("margin"))


def call_survey_cut_tile(f, a, p):
    check_inputs(cube=store(a.cube), grid=a.grid)
    f(store(a.cube), a.grid, a.tile, store(a.out))


def call_survey_split_catalog(f, a, p):
    check_inputs(catalog=a.catalog, grid=a.grid)
    f(a.catalog, a.grid, a.tile, a.out, p.get("catalog_reach"))


def call_survey_merge(f, a, p):
    tiles = name_paths(a.tiles, "--tiles")
    check_inputs(grid=a.grid, catalog=a.catalog, **{f"tiles {k}": v for k, v in tiles.items()})
    f(tiles, a.grid, a.catalog, store(a.out), a.table, a.set, fits_dir=a.fits_dir, params=p)


def call_survey_table(f, a, p):
    tables = name_paths(a.tables, "--tables")
    check_inputs(**{f"tables {k}": v for k, v in tables.items()})
    f(tables, a.out)


def call_report_survey(f, a, p):
    merged = name_paths(a.merged, "--merged")
    check_inputs(
        cube=store(a.cube),
        grid=a.grid,
        table=a.table,
        ccd_motion=a.ccd_motion,
        **{f"merged {k}": v for k, v in merged.items()},
    )
    f(
        store(a.cube),
        a.grid,
        a.table,
        merged,
        a.out,
        ccd=a.ccd,
        tile_pages=a.tile_pages,
        tile_summaries=a.tile_summaries or [],
        params=p,
        ccd_motion=a.ccd_motion,
    )


# ---------------------------------------------------------------- argument parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workflow_lib.steps",
        description="Run one step of the TESS/Kepler LFD + CPM pipeline without Snakemake (docs/CLI.md).",
    )
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")

    def step(name, params_help):
        sp = sub.add_parser(name, help=STEPS[name][2], description=STEPS[name][2])
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--params", metavar="JSON", help=f"settings as a JSON object: {params_help}")
        g.add_argument("--params-file", metavar="FILE", help="settings in a JSON file")
        sp.add_argument("--log", metavar="FILE", help="log file (progress, warnings, traceback on failure)")
        return sp

    def req(sp, *names, **kw):
        for n in names:
            sp.add_argument(n, required=True, metavar="PATH", **kw)

    sp = step("download-synthetic", "the `synthetic` settings of the field")
    req(sp, "--cube", "--truth", "--catalog")
    sp.add_argument("--field", default="synth")

    sp = step("download-local", "the `local` settings of the field (files / directory / catalog)")
    req(sp, "--cube")
    sp.add_argument("--field", required=True)

    sp = step("download-mast", "the field's `mast` settings (what to download)")
    req(sp, "--cube")
    sp.add_argument("--field", required=True)
    sp.add_argument("--client", metavar="JSON", help="`mast_client` options: cache_dir, retries, timeout_s, backoff_s")

    sp = step("gaia-crossmatch", "the `gaia` settings of the field")
    req(sp, "--cube", "--out")
    sp.add_argument("--local-catalog", metavar="PATH", help="catalog file used instead of the Gaia archive")

    sp = step("edge-model", "`lfd.edge`")
    req(sp, "--cube", "--catalog", "--out")

    sp = step("prf-model", "`lfd.prf`")
    req(sp, "--cube", "--catalog", "--edge", "--out", "--png")

    sp = step("motion-model", "`lfd.motion`")
    req(sp, "--cube", "--catalog", "--prf", "--out")
    sp.add_argument(
        "--ccd-motion", metavar="PATH", help="survey mode: the CCD-level motion model (offsets at the tile centre)"
    )

    sp = step("scene-offsets", "`lfd.motion`")
    req(sp, "--cube", "--catalog", "--prf", "--out")

    sp = step("flux-solve", "`lfd.solve`")
    req(sp, "--cube", "--catalog", "--prf", "--out", "--fits-dir")
    sp.add_argument("--motion", metavar="PATH", help="motion model (needed when use_motion is on)")
    sp.add_argument(
        "--diagnostics", metavar="PATH", help="mean-frame residual + motion summary (default: beside --out)"
    )
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--cdpp-hours", metavar="JSON", help="CDPP durations [h] stored on the light curves, e.g. [1, 6]")

    sp = step("cpm-detrend", "the `cpm` settings")
    req(sp, "--cube", "--catalog", "--detrended", "--lightcurves", "--raw-lightcurves", "--fits-dir")
    sp.add_argument("--paramset", default="default", help="default or lambda_L_<value>")
    sp.add_argument("--target-aperture", metavar="JSON", help="named apertures: {name: [[row, col], ...]}")
    sp.add_argument("--field", default="")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--cdpp-hours", metavar="JSON", help="CDPP durations [h] stored on the light curves, e.g. [1, 6]")

    sp = step("cpm-sweep-summary", '{"mag_range": [8, 14]} (cpm.summary_mag_range)')
    sp.add_argument("--cpm", nargs="+", required=True, metavar="NAME=PATH", help="CPM light curves per parameter set")
    req(sp, "--raw", "--out")
    sp.add_argument("--lfd", metavar="PATH", help="LFD light curves (optional)")

    sp = step("cpm-stitch", '{"n_points": 100} (cpm.stitch_points)')
    sp.add_argument("--lightcurves", nargs="+", required=True, metavar="PATH", help="one light-curve set per sector")
    req(sp, "--out", "--fits-dir")
    sp.add_argument("--group", default="")
    sp.add_argument("--cdpp-hours", metavar="JSON", help="CDPP durations [h] stored on the light curves, e.g. [1, 6]")

    sp = step("deblend-detrend", '{"cpm": <the `cpm` settings>, "deblend": <the `deblend` settings>}')
    req(sp, "--cube", "--catalog", "--prf", "--lfd", "--out", "--fits-dir")
    sp.add_argument("--motion", metavar="PATH", help="LFD motion model (needed when the LFD solve used it)")
    sp.add_argument("--cpm", metavar="PATH", help="CPM aperture light curves (extra columns CPM_FLUX)")
    sp.add_argument("--raw", metavar="PATH", help="RAW aperture light curves (extra columns RAW_FLUX)")
    sp.add_argument("--paramset", default="default", help="CPM parameter set: default or lambda_L_<value>")
    sp.add_argument("--target-aperture", metavar="JSON", help="named apertures: {name: [[row, col], ...]}")
    sp.add_argument("--field", default="")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--cdpp-hours", metavar="JSON", help="CDPP durations [h] stored on the light curves, e.g. [1, 6]")

    sp = step("report-field", "the `report` settings")
    req(sp, "--field-dir", "--out", "--summary")
    sp.add_argument("--field")
    sp.add_argument(
        "--link-index", action="store_true", help="link the run index (the workflow builds it beside the pages)"
    )

    sp = step("stale", "none")
    sp.add_argument("results", metavar="DIR", help="a results directory (run from where snakemake ran)")
    sp = step("report-index", "the run's config (shown on the page)")
    sp.add_argument("--summaries", nargs="*", default=[], metavar="PATH", help="field summary JSON files")
    sp.add_argument(
        "--ccds", nargs="*", default=[], metavar="CCD=TABLE", help="survey CCDs: each one's merged/sources.ecsv"
    )
    req(sp, "--out")
    sp.add_argument("--bench-dir", metavar="DIR", help="benchmarks directory of the run")
    sp.add_argument("--run", default="")

    sp = step("survey-synthetic", "`survey.synthetic` (with the CCD's own `synthetic`)")
    req(sp, "--ffi-dir", "--catalog", "--truth")

    sp = step("survey-ingest", "`survey.ingest`")
    sp.add_argument("--ffi", required=True, metavar="DIR|GLOB", help="directory of *_ffic.fits or a glob pattern")
    req(sp, "--out")

    sp = step("survey-tiles", '{"tile_size": 64, "margin": 8} (survey)')
    req(sp, "--cube", "--out")

    sp = step("survey-cut-tile", "none")
    req(sp, "--cube", "--grid", "--out")
    sp.add_argument("--tile", required=True, help="tile id, e.g. r0000c0064")

    sp = step("survey-split-catalog", '{"catalog_reach": 4} (survey)')
    req(sp, "--catalog", "--grid", "--out")
    sp.add_argument("--tile", required=True, help="tile id, e.g. r0000c0064")

    sp = step("survey-ccd-motion", "`survey.ccd_motion`")
    sp.add_argument("--offsets", nargs="+", required=True, metavar="TILE=PATH", help="each tile's scene_offsets.npz")
    req(sp, "--out", "--qa")

    sp = step("survey-merge", "the `survey` settings (cdpp_hours, write_fits, allow_missing_tiles)")
    sp.add_argument("--tiles", nargs="+", required=True, metavar="TILE=PATH", help="each tile's light-curve set")
    req(sp, "--grid", "--catalog", "--out", "--table")
    sp.add_argument("--set", required=True, help="set name, the prefix of the table's columns (lfd, cpm_default)")
    sp.add_argument("--fits-dir", metavar="DIR", help="also write one FITS file per measured source")

    sp = step("survey-table", "none")
    sp.add_argument("--tables", nargs="+", required=True, metavar="SET=PATH", help="each set's source table")
    req(sp, "--out")

    sp = step("report-survey", "the `report` settings")
    req(sp, "--cube", "--grid", "--table", "--out")
    sp.add_argument("--merged", nargs="*", default=[], metavar="SET=PATH", help="merged light-curve sets")
    sp.add_argument("--ccd", default="")
    sp.add_argument("--tile-pages", metavar="DIR", help="directory of the tiles' field pages <tile>.html")
    sp.add_argument("--tile-summaries", nargs="*", metavar="PATH", help="the tiles' field-page summary JSON files")
    sp.add_argument(
        "--ccd-motion", metavar="PATH", help="survey.motion ccd: the CCD's ccd_motion.json (tiles flagged by the fit)"
    )
    return parser


def restore_thread_env() -> None:
    """Give the step the BLAS/OpenMP thread settings of the environment snakemake was started in.

    Snakemake sets OMP_NUM_THREADS & co. to a shell job's ``threads``; rules/common.smk records the
    original values in ``WORKFLOW_LIB_THREAD_ENV`` (JSON, null = unset). Some results depend on the BLAS
    thread count, so this keeps them what they were when the steps ran inside Snakemake (``run:``).
    Must run before numpy is imported.
    """
    import os

    saved = os.environ.pop("WORKFLOW_LIB_THREAD_ENV", None)
    if not saved:
        return
    for var, value in json.loads(saved).items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def main(argv=None) -> int:
    restore_thread_env()
    args = build_parser().parse_args(argv)
    from importlib import import_module

    from workflow_lib.core.logs import main_step
    from workflow_lib.core.parallel import prefer_threaded_scheduler

    if args.step not in DASK_FREE_STEPS:
        prefer_threaded_scheduler()  # no dask.distributed import per compute (docs/CLI.md)

    module, func_name, _ = STEPS[args.step]
    caller = globals()["call_" + args.step.replace("-", "_")]

    def run():
        params = load_params(args)
        func = getattr(import_module(module), func_name)  # lazily: only this step's module
        caller(func, args, params)

    return main_step(args.log, args.step, run)


if __name__ == "__main__":
    sys.exit(main())
