"""Survey mode at scale (issue 11, item 6): one synthetic CCD end to end, per-stage cost per tile, the sector cost.

    python benchmarks/survey_scale.py --size 512 --cadences 1300 --cores 2 --out /tmp/survey_scale_512
    python benchmarks/survey_scale.py --read /tmp/survey_scale_512                  # summarise (also a partial run)
    python benchmarks/survey_scale.py --read /tmp/survey_scale_512 --compare /tmp/survey_scale_256 \\
        --cadence-run /tmp/survey_scale_128x300 --json scale.json

A run writes a survey config into the scratch directory ``--out`` (``config/config.yaml``): one
``synthetic_ffi`` CCD of ``--size`` x ``--size`` pixels x ``--cadences`` frames (30 min) with the settings of
the shipped whole-sector config, config/sector.yaml (its survey tiling and its cpm / lfd overrides of the
schema defaults; ``--set cpm.n_predictors=256`` overrides any key); then runs, with BLAS single-threaded and
this checkout on PYTHONPATH,

    snakemake --cores N --directory <out> --snakefile <repo>/Snakefile --configfile <out>/config/config.yaml \\
        <merged/sources.ecsv> <report/<ccd>/index.html>

and reads per job the wall seconds of the rules' benchmark TSVs and the CPU seconds and peak memory of the
job's own log (``run_overhead.read_benchmarks``: the ``done`` line's getrusage figures; Snakemake's TSV
``cpu_time`` samples every 30 s after the first 30 s and misses a long job's last stretch, e.g. 16 of a
flux solve's 45 CPU-s; runs made before the logs carried them fall back to the TSV, and say so).
Printed: per stage the number of jobs, CPU seconds per tile (median, max), peak RSS per job (max); ingest
MB of FITS per CPU-second; the merge cost; and the extrapolated CPU-hours of a sector (16 CCDs of 2048 x 2048):

* tile stages: CPU per *halo* pixel (sum over the measured tiles / their halo pixels, so edge tiles and
  partial runs count correctly) x the halo pixels of a 2048 x 2048 tiling (``data.tiles.tile_grid``) x 16,
  scaled from the measured cadences to 1,300 (30-min sector) and 12,000 (200-s sector) with a per-stage
  cadence exponent b (cost ~ cadences^b): measured from ``--cadence-run`` (another run, same settings, other
  cadence count; per-halo-pixel costs compared) or else the exponents of benchmarks/scaling.py
  (docs/CLUSTER.md); both the exponent estimate and the linear upper bound (b = 1) are printed;
* ingest: measured CPU per MB of FITS x the FITS bytes of a sector (the synthetic files' bytes per pixel-frame);
* per-CCD stages (crossmatch, grid, merge, table, overview page): x (2048^2 / CCD pixels) x cadence ratio
  (linear, an upper bound) x 16. The CCD simulation (`synthetic_ccd`) is not part of a real run: left out.

``--compare DIR`` puts a second run's per-job peak RSS beside this one (another CCD size, same tile size:
memory per job must not grow with the CCD). ``--json`` saves every figure. A run that is still going (or was
stopped) is summarised from the jobs that finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_overhead import read_benchmarks, run  # noqa: E402

RUN = "survey-scale"
CCD = "s0001-4-2"
META = "survey_scale.json"
SECTOR_CCDS = 16
SECTOR_SIDE = 2048
CADENCES_30MIN = 1300
CADENCES_200S = 12000

# rules that run once per tile, in pipeline order; per-CCD rules after them
TILE_STAGES = (
    "cut_tile",
    "split_catalog",
    "edge_model",
    "prf_model",
    "scene_offsets",  # survey.motion ccd: the tile's offsets for the CCD fit
    "motion_model",
    "flux_solve",
    "cpm_detrend",
    "report_field",
)
CCD_STAGES = (
    "synthetic_ccd",
    "ingest_ccd",
    "gaia_crossmatch",
    "tile_grid",
    "ccd_motion",
    "merge_tiles",
    "survey_table",
    "report_survey",
)
NOT_IN_A_REAL_RUN = ("synthetic_ccd",)

# growth with cadences (time ~ cadences^b at 32^2 px, 300-1200 cadences), benchmarks/scaling.py as
# recorded in docs/CLUSTER.md ("Growth exponents"); negative values clipped to 0; rules without a
# measured exponent are taken as linear (I/O and page size grow with the cadences)
SCALING_PY_B = {
    "cut_tile": 1.0,
    "split_catalog": 0.0,
    "edge_model": 0.03,
    "prf_model": 0.0,
    "motion_model": 0.25,
    "flux_solve": 0.29,
    "cpm_detrend": 0.34,
    "report_field": 1.0,
}

# per-CCD stages: growth with cadences of their work (the crossmatch, grid and table do not read light curves)
CCD_CADENCE_B = {"ingest_ccd": 1.0, "gaia_crossmatch": 0.0, "tile_grid": 0.0, "merge_tiles": 1.0, "ccd_motion": 1.0}
CCD_CADENCE_B.update(survey_table=0.0, report_survey=1.0)

TILE_RE = re.compile(r"(?:tiles/|_)(r\d{4,}c\d{4,})")  # <ccd>/tiles/<tile>[_<set>] or <ccd>_<tile>


# ---------------------------------------------------------------------------------------------- run


#: the shipped whole-sector config: the benchmark measures its tiling and its science settings
SECTOR_CONFIG = REPO / "config" / "sector.yaml"


def sector_settings() -> dict:
    """What config/sector.yaml sets besides its CCDs: the survey tiling (tile size, margin, motion) and any
    cpm / lfd / deblend / report overrides of the schema defaults, so that the extrapolated sector cost is
    the cost of the shipped sector configuration."""
    cfg = yaml.safe_load(SECTOR_CONFIG.read_text())
    keep = {k: v for k, v in cfg.items() if k in ("cpm", "lfd", "deblend", "report")}
    keep["survey"] = {k: v for k, v in cfg["survey"].items() if k not in ("write_fits",)}
    return keep


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for k in path:
        node = node.setdefault(k, {})
    node[last] = value


def make_config(size: int, cadences: int, seed: int, overrides: list[str]) -> dict:
    cfg = {
        "run": RUN,
        "ccds": {
            CCD: {
                "source": "synthetic_ffi",
                "synthetic": {"n_rows": size, "n_cols": size, "n_cadences": cadences, "seed": seed},
            }
        },
        **sector_settings(),
    }
    for item in overrides:
        key, _, value = item.partition("=")
        set_key(cfg, key.strip(), yaml.safe_load(value))
    return cfg


def run_survey(out: Path, cfg: dict, cores: int, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "config", ignore_errors=True)  # run_overhead.run copies a config dir there
    stage = Path(tempfile.mkdtemp(prefix="survey_scale_cfg."))
    (stage / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    targets = [f"results/{RUN}/{CCD}/merged/sources.ecsv", f"results/{RUN}/report/{CCD}/index.html"]
    # BLAS single-threaded (CPM's small per-pixel solves, docs/SURVEY.md); jobs import this checkout
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    meta = {
        "command": (
            f"snakemake --cores {cores} --directory {out} --snakefile {REPO / 'Snakefile'}"
            f" {' '.join(targets)} {' '.join(extra)} --configfile {out / 'config' / 'config.yaml'}"
        ),
        "config": cfg,
        "cores": cores,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_before": os.getloadavg(),
        "status": "running",
    }
    (out / META).write_text(json.dumps(meta, indent=1))
    try:
        wall, total_cpu = run(
            stage,
            cores,
            out,
            [*targets, *extra, "--configfile", str(out / "config" / "config.yaml")],  # nargs=+: last
            REPO / "Snakefile",
        )
        meta.update(status="done", wall_s=wall, total_cpu_s=total_cpu)
    except SystemExit as exc:
        meta.update(status="failed", error=str(exc)[-2000:])
        raise
    finally:
        meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), load_after=os.getloadavg())
        (out / META).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(stage, ignore_errors=True)
    return meta


# ------------------------------------------------------------------------------------------- figures


def load_run(out: Path) -> dict:
    """Everything measured in a run directory (also of a partial run)."""
    meta = json.loads((out / META).read_text()) if (out / META).exists() else {}
    syn = (meta.get("config") or {}).get("ccds", {}).get(CCD, {}).get("synthetic", {})
    ccd_dir = out / "results" / RUN / CCD
    grid = json.loads((ccd_dir / "tiles.json").read_text()) if (ccd_dir / "tiles.json").exists() else None
    halo = {}
    if grid:
        for t in grid["tiles"]:
            halo[t["id"]] = (t["halo_row"][1] - t["halo_row"][0]) * (t["halo_column"][1] - t["halo_column"][0])
    fits = list((ccd_dir / "ffi").glob("*_ffic.fits"))
    rows = read_benchmarks(out)
    for r in rows:
        m = TILE_RE.search(r["job"])
        r["tile"] = m.group(1) if m else None
    n_rows, n_cols = int(syn.get("n_rows", 0)), int(syn.get("n_cols", 0))
    n_sources = None
    if (ccd_dir / "catalog.ecsv").exists():
        n_sources = (
            sum(1 for line in (ccd_dir / "catalog.ecsv").open() if line.strip() and not line.startswith("#")) - 1
        )
    return {
        "dir": str(out),
        "meta": meta,
        "n_rows": n_rows,
        "n_cols": n_cols,
        "cadences": int(syn.get("n_cadences", 0)),
        "n_tiles": len(halo) or None,
        "halo_pixels": halo,
        "fits_mb": sum(f.stat().st_size for f in fits) / 1e6,
        "n_fits": len(fits),
        "n_sources": n_sources,
        "rows": rows,
    }


def stage_table(run_: dict) -> dict:
    """Per rule: jobs, CPU s per job (median, max, sum), peak RSS per job (max, MB), CPU per halo pixel."""
    out = {}
    for rule in (
        TILE_STAGES + CCD_STAGES + tuple(sorted({r["rule"] for r in run_["rows"]} - set(TILE_STAGES + CCD_STAGES)))
    ):
        rs = [r for r in run_["rows"] if r["rule"] == rule and r["cpu"] == r["cpu"]]
        if not rs:
            continue
        cpu = [r["cpu"] for r in rs]
        rss = [r["max_rss"] for r in rs if r["max_rss"] == r["max_rss"]]
        d = {
            "jobs": len(rs),
            "cpu_median": statistics.median(cpu),
            "cpu_max": max(cpu),
            "cpu_sum": sum(cpu),
            "wall_sum": sum(r["s"] for r in rs),
            "rss_max_mb": max(rss) if rss else float("nan"),
            "rss_median_mb": statistics.median(rss) if rss else float("nan"),
        }
        tiles = [r for r in rs if r["tile"] in run_["halo_pixels"]]
        if tiles and rule not in CCD_STAGES:  # TILE_STAGES, or any other per-tile rule (e.g. a new stage)
            # the work above a job's start-up, per pixel of the tile cubes (halo included)
            s0 = startup_cpu(run_)
            d["cpu_per_halo_px"] = sum(max(r["cpu"] - s0, 0.0) for r in tiles) / sum(
                run_["halo_pixels"][r["tile"]] for r in tiles
            )
        out[rule] = d
    return out


def sector_tiles(tile_size: int, margin: int) -> tuple[int, int]:
    """(tiles, halo pixels) of a sector: 16 CCDs of 2048 x 2048 cut as the survey rules cut them."""
    from workflow_lib.data.tiles import tile_grid

    tiles = tile_grid(SECTOR_SIDE, SECTOR_SIDE, 1, 45, tile_size, margin)
    halo = sum((t["halo_row"][1] - t["halo_row"][0]) * (t["halo_column"][1] - t["halo_column"][0]) for t in tiles)
    return SECTOR_CCDS * len(tiles), SECTOR_CCDS * halo


def startup_cpu(run_: dict) -> float:
    """CPU of a job that does almost nothing: `tile_grid` (interpreter, imports, config, log; reads the
    cube's metadata, writes a JSON), else the cheapest job."""
    grid = [r["cpu"] for r in run_["rows"] if r["rule"] == "tile_grid" and r["cpu"] == r["cpu"]]
    cpu = grid or [r["cpu"] for r in run_["rows"] if r["cpu"] == r["cpu"] and r["cpu"] > 0]
    return statistics.median(cpu) if cpu else 0.0


def cadence_exponents(run_: dict, table: dict, other: dict | None) -> tuple[dict, str]:
    if other is None:
        return dict(SCALING_PY_B), "benchmarks/scaling.py (docs/CLUSTER.md, 32^2 px, 300-1200 cadences)"
    t2 = stage_table(other)
    n1, n2 = run_["cadences"], other["cadences"]
    b = {}
    for rule in dict.fromkeys(TILE_STAGES + tuple(table)):
        if rule not in TILE_STAGES and "cpu_per_halo_px" not in table[rule]:
            continue
        if rule in ("cut_tile", "split_catalog"):  # I/O: a copy of the tile (~cadences), a catalog (not)
            b[rule] = SCALING_PY_B[rule]
            continue
        c1 = table.get(rule, {}).get("cpu_per_halo_px")
        c2 = t2.get(rule, {}).get("cpu_per_halo_px")
        b[rule] = math.log(c1 / c2) / math.log(n1 / n2) if c1 and c2 and n1 != n2 else SCALING_PY_B.get(rule, 1.0)
    return b, (
        f"measured: this run ({n1} cadences) vs {other['dir']} ({n2} cadences), per halo pixel above the"
        " start-up (cut_tile 1, split_catalog 0; stages missing in either run: benchmarks/scaling.py)"
    )


def extrapolate(run_: dict, table: dict, b: dict) -> dict:
    """CPU-hours of a sector per stage: every job's start-up as measured, the work above it scaled."""
    survey = {"margin": 8, **(run_["meta"].get("config", {}).get("survey") or sector_settings()["survey"])}
    n_tiles, halo = sector_tiles(survey["tile_size"], survey["margin"])
    s0 = startup_cpu(run_)
    ccd_px = run_["n_rows"] * run_["n_cols"]
    n = run_["cadences"]
    res = {"sector_tiles": n_tiles, "sector_halo_pixels": halo, "startup_cpu_s": s0, "stages": {}}
    for target, ncad in (("30min", CADENCES_30MIN), ("200s", CADENCES_200S)):
        tot = tot_lin = 0.0
        for rule, d in table.items():
            if rule in NOT_IN_A_REAL_RUN:
                continue
            if "cpu_per_halo_px" in d:
                work = d["cpu_per_halo_px"] * halo
                est = n_tiles * s0 + work * (ncad / n) ** b.get(rule, 1.0)
                lin = n_tiles * s0 + work * (ncad / n)
            elif rule == "ingest_ccd" and run_["fits_mb"]:
                sector_mb = run_["fits_mb"] / (ccd_px * n) * SECTOR_CCDS * SECTOR_SIDE**2 * ncad
                est = lin = SECTOR_CCDS * s0 + sector_mb * max(d["cpu_sum"] - s0, 0.0) / run_["fits_mb"]
            elif rule in CCD_STAGES and ccd_px:
                work = (
                    max(d["cpu_sum"] - d["jobs"] * s0, 0.0)
                    * SECTOR_SIDE**2
                    / ccd_px
                    * (ncad / n) ** CCD_CADENCE_B[rule]
                )
                est = lin = SECTOR_CCDS * (d["jobs"] * s0 + work)
            else:
                continue
            res["stages"].setdefault(rule, {})[target] = est / 3600
            res["stages"][rule][target + "_linear"] = lin / 3600
            tot += est
            tot_lin += lin
        res[target] = tot / 3600
        res[target + "_linear"] = tot_lin / 3600
    return res


def summarise(run_: dict, compare: dict | None = None, cadence_run: dict | None = None) -> tuple[str, dict]:
    table = stage_table(run_)
    meta = run_["meta"]
    o = []
    o.append(f"run directory   {run_['dir']}   status: {meta.get('status', '?')}")
    if meta.get("command"):
        o.append(f"command         {meta['command']}")
    o.append(
        f"CCD             {run_['n_rows']} x {run_['n_cols']} px x {run_['cadences']} cadences, "
        f"{run_['n_tiles']} tiles, {run_['n_sources']} catalog sources, {run_['n_fits']} FFIs ({run_['fits_mb']:.0f} MB)"
    )
    if "wall_s" in meta:
        o.append(
            f"wall            {meta['wall_s']:.0f} s on --cores {meta['cores']}; CPU of the whole run "
            f"{meta['total_cpu_s']:.0f} s; load average before/after "
            f"{' '.join(f'{x:.1f}' for x in meta['load_before'])} / {' '.join(f'{x:.1f}' for x in meta['load_after'])}"
        )
    src = [r.get("cpu_source", "benchmark") for r in run_["rows"]]
    o.append(
        f"CPU, memory     from the jobs' logs (getrusage) for {src.count('log')} of {len(src)} jobs"
        + (
            f"; Snakemake's sampled benchmark figures for {src.count('benchmark')} (an underestimate for jobs > 30 s)"
            if src.count("benchmark")
            else ""
        )
    )
    o.append("")
    hdr = f"{'stage':<16} {'jobs':>5} {'CPU-s/job med':>13} {'max':>8} {'CPU-s sum':>10} {'peak RSS max':>13}"
    hdr += f" {'CPU-us/halo px':>15}"
    if compare:
        hdr += f" {'RSS max, ' + str(compare['n_rows']) + ' px CCD':>20}"
    o.append(hdr)
    ctab = stage_table(compare) if compare else {}
    for rule, d in table.items():
        line = (
            f"{rule:<16} {d['jobs']:>5} {d['cpu_median']:>13.1f} {d['cpu_max']:>8.1f} {d['cpu_sum']:>10.0f}"
            f" {d['rss_max_mb']:>10.0f} MB"
        )
        line += f" {d['cpu_per_halo_px'] * 1e6:>15.0f}" if "cpu_per_halo_px" in d else f" {'':>15}"
        if compare:
            c = ctab.get(rule)
            line += f" {c['rss_max_mb']:>17.0f} MB" if c else f" {'-':>20}"
        o.append(line)
    tile_rules = [r for r in TILE_STAGES if r in table]
    per_tile = sum(table[r]["cpu_median"] for r in tile_rules)
    o.append(f"{'tile total':<16} {'':>5} {per_tile:>13.1f}   (sum of the per-stage medians: one tile's chain)")
    o.append("")
    ing = table.get("ingest_ccd")
    figures = {"run": {k: v for k, v in run_.items() if k not in ("rows", "halo_pixels")}, "stages": table}
    if ing and run_["fits_mb"]:
        s0 = startup_cpu(run_)
        rate = run_["fits_mb"] / ing["cpu_sum"]
        net = run_["fits_mb"] / max(ing["cpu_sum"] - s0, 1e-9)
        figures.update(ingest_mb_per_cpu_s=rate, ingest_mb_per_cpu_s_net=net)
        o.append(
            f"ingest          {run_['fits_mb']:.0f} MB of FITS in {ing['cpu_sum']:.1f} CPU-s: {rate:.0f} MB per "
            f"CPU-second for the job, {net:.0f} above its start-up; peak RSS {ing['rss_max_mb']:.0f} MB"
        )
    mer = table.get("merge_tiles")
    if mer:
        o.append(
            f"merge           {mer['jobs']} sets, {mer['cpu_sum']:.1f} CPU-s ({mer['cpu_max']:.1f} max per set), "
            f"peak RSS {mer['rss_max_mb']:.0f} MB; + survey_table "
            f"{table.get('survey_table', {}).get('cpu_sum', float('nan')):.1f} s, report_survey "
            f"{table.get('report_survey', {}).get('cpu_sum', float('nan')):.1f} s"
        )
    b, b_src = cadence_exponents(run_, table, cadence_run)
    ext = extrapolate(run_, table, b)
    figures.update(cadence_exponents=b, cadence_exponent_source=b_src, extrapolation=ext)
    o.append("")
    o.append(
        f"extrapolation   sector = {SECTOR_CCDS} CCDs x {SECTOR_SIDE}^2 px, "
        f"{ext['sector_tiles']} tiles, {ext['sector_halo_pixels'] / 1e6:.1f} M tile-cube pixels; job start-up "
        f"{ext['startup_cpu_s']:.1f} CPU-s (median tile_grid job) kept per job, the rest scaled;"
    )
    o.append(f"                cadence exponents b: {b_src}")
    o.append(f"{'stage':<16} {'b':>5} {'30-min (1,300)':>15} {'200-s (12,000)':>15} {'200-s, b=1':>11}   [CPU-hours]")
    for rule, d in sorted(ext["stages"].items(), key=lambda kv: -kv[1]["30min"]):
        bb = f"{b[rule] if rule in b else CCD_CADENCE_B.get(rule, 1.0):.2f}"
        o.append(f"{rule:<16} {bb:>5} {d['30min']:>15.1f} {d['200s']:>15.1f} {d['200s_linear']:>11.1f}")
    o.append(
        f"{'sector':<16} {'':>5} {ext['30min']:>15.0f} {ext['200s']:>15.0f} {ext['200s_linear']:>11.0f}"
        f"   (goal <= 150 for 30 min; {ext['30min'] / 150:.1f}x the goal)"
    )
    if compare:
        figures["compare"] = {
            "run": {k: v for k, v in compare.items() if k not in ("rows", "halo_pixels")},
            "stages": ctab,
        }
    return "\n".join(o), figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="CCD side in pixels (square; default 512)")
    ap.add_argument("--cadences", type=int, default=1300, help="frames (30-min cadence; default 1300)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, help="scratch directory of the run (default: a new temporary directory)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. cpm.k=25")
    ap.add_argument("--read", type=Path, metavar="DIR", help="only summarise an existing (or running) run directory")
    ap.add_argument("--compare", type=Path, metavar="DIR", help="a run of another CCD size: its peak RSS per job")
    ap.add_argument("--cadence-run", type=Path, metavar="DIR", help="a run with another cadence count: measure b")
    ap.add_argument("--json", type=Path, help="save the figures")
    ap.add_argument("snakemake_args", nargs="*", help="extra snakemake arguments (after --)")
    a = ap.parse_args(argv)
    if a.read:
        out = a.read
    else:
        out = a.out or Path(tempfile.mkdtemp(prefix="survey_scale."))
        cfg = make_config(a.size, a.cadences, a.seed, a.set)
        print(f"run directory: {out}", flush=True)
        run_survey(out, cfg, a.cores, a.snakemake_args)
    text, figures = summarise(
        load_run(out),
        load_run(a.compare) if a.compare else None,
        load_run(a.cadence_run) if a.cadence_run else None,
    )
    print(text)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
