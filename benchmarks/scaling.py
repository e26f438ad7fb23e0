"""How the cost of every pipeline stage grows with pixels and cadences (issue "HPC scale-out").

    python benchmarks/scaling.py                    # default grid (~4 min on 1 core), table + fitted exponents
    python benchmarks/scaling.py --quick            # 3 tiny sizes, a smoke test (~1 min)
    python benchmarks/scaling.py --pixels 32 64 128 --cadences 500 1300 4000 --json out.json

For each size a synthetic TESS cutout (``workflow_lib.data.synthetic``: n_rows = n_cols = side, n_cadences,
30-min cadence, fixed star density, so the number of sources grows with the pixels) goes through the
pipeline's step functions, called directly on files in a temporary directory, one stage per child
process so that each stage's peak memory (``ru_maxrss`` of that process, from ``os.wait4``) is its own:

    download (simulate + write the cube) -> gaia crossmatch -> edge -> prf -> motion -> flux solve -> cpm

Config: ``config/config.yaml`` with the schema defaults filled in (snakemake's ``validate``), one
thread per stage (``--threads``), so the times are CPU cost: a run of many fields on N cores costs
sum / N.  Wall time is measured around the step function inside the child (imports excluded); peak
memory is reported as measured (it includes ~the interpreter + imports, the "import" row) and net
of that baseline.

The grid is two lines through a centre: pixels vary at fixed cadences, cadences vary at fixed pixels.
Growth exponents come from log-log least squares along each line: time ~ pixels^a (fixed
cadences) and time ~ cadences^b (fixed pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("import", "download", "gaia", "edge", "prf", "motion", "flux_solve", "cpm")


def full_config() -> dict:
    """config/config.yaml with every schema default filled in (what the rules get)."""
    import yaml
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(cfg, str(REPO / "workflow_lib" / "schema.yaml"), set_default=True)
    return cfg


def run_stage(stage: str, d: Path, side: int, ncad: int, seed: int, threads: int) -> float:
    """Run one stage in this process on the files of directory ``d``; return its wall time."""
    cfg = json.loads((d / "config.json").read_text())
    lfd = cfg.get("lfd", {})
    t0 = time.perf_counter()
    if stage == "import":
        from workflow_lib.cpm import model as cpm  # noqa: F401
        from workflow_lib.data import (
            gaia,  # noqa: F401
            synthetic,  # noqa: F401
        )
        from workflow_lib.lfd import (
            edge,  # noqa: F401
            motion,  # noqa: F401
            prf,  # noqa: F401
            solve,  # noqa: F401
        )
    elif stage == "download":
        from workflow_lib.data.synthetic import write_synthetic_field

        write_synthetic_field(
            d / "cube.zarr",
            d / "truth.zarr",
            d / "input_catalog.ecsv",
            {"seed": seed, "n_rows": side, "n_cols": side, "n_cadences": ncad},
            field="scale",
        )
    elif stage == "gaia":
        from workflow_lib.data.gaia import crossmatch_field

        crossmatch_field(d / "cube.zarr", d / "catalog.ecsv", cfg.get("gaia", {}), str(d / "input_catalog.ecsv"))
    elif stage == "edge":
        from workflow_lib.steps.lfd import edge_model_step

        edge_model_step(d / "cube.zarr", d / "catalog.ecsv", d / "edge.json", lfd.get("edge", {}))
    elif stage == "prf":
        from workflow_lib.steps.lfd import prf_model_step

        prf_model_step(
            d / "cube.zarr", d / "catalog.ecsv", d / "edge.json", d / "prf.npz", d / "prf.png", lfd.get("prf", {})
        )
    elif stage == "motion":
        from workflow_lib.steps.lfd import motion_model_step

        motion_model_step(d / "cube.zarr", d / "catalog.ecsv", d / "prf.npz", d / "motion.npz", lfd.get("motion", {}))
    elif stage == "flux_solve":
        from workflow_lib.steps.lfd import flux_solve_step

        p = dict(lfd.get("solve", {}), write_fits=False)
        flux_solve_step(
            d / "cube.zarr",
            d / "catalog.ecsv",
            d / "prf.npz",
            d / "motion.npz" if p.get("use_motion", True) else None,
            d / "lfd.zarr",
            None,
            p,
            threads=threads,
        )
    elif stage == "cpm":
        from workflow_lib.steps.cpm import run_cpm_detrend

        run_cpm_detrend(
            d / "cube.zarr",
            d / "catalog.ecsv",
            detrended_path=d / "cpm.zarr",
            lightcurves_path=d / "cpm_lc.zarr",
            raw_lightcurves_path=d / "raw_lc.zarr",
            fits_dir=d / "cpm_fits",
            config=cfg.get("cpm", {}),
            threads=threads,
        )
    elif stage == "deblend":
        from workflow_lib.steps.deblend import deblend_detrend_step

        use_motion = lfd.get("solve", {}).get("use_motion", True)
        deblend_detrend_step(
            d / "cube.zarr",
            d / "catalog.ecsv",
            d / "prf.npz",
            d / "motion.npz" if use_motion else None,
            d / "lfd.zarr",
            d / "deb_lc.zarr",
            None,
            {"cpm": cfg.get("cpm", {}), "deblend": dict(cfg.get("deblend", {}), reference_sets=False)},
            threads=threads,
        )
    else:
        raise ValueError(stage)
    return time.perf_counter() - t0


def measure(stage: str, d: Path, side: int, ncad: int, seed: int, threads: int) -> dict:
    """Run a stage in a child process; wall time (inside the child) and peak RSS (os.wait4)."""
    out = d / f"{stage}.time"
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )
    cmd = [
        sys.executable,
        __file__,
        "--stage",
        stage,
        "--dir",
        str(d),
        "--side",
        str(side),
        "--ncad",
        str(ncad),
        "--seed",
        str(seed),
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(d / f"{stage}.log", "w"))
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = (d / f"{stage}.log").read_text()[-2000:]
        raise RuntimeError(f"stage {stage} ({side}x{side}x{ncad}) failed:\n{tail}")
    return {"seconds": float(out.read_text()), "max_rss_mb": ru.ru_maxrss / 1024.0}


def fit_exponent(x, y) -> float:
    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=int, nargs="+", default=[32, 48, 64], help="cutout sides (pixel line)")
    ap.add_argument("--cadences", type=int, nargs="+", default=[300, 600, 1200], help="cadence counts (cadence line)")
    ap.add_argument("--centre-side", type=int, default=32, help="side of the cadence line")
    ap.add_argument("--centre-cadences", type=int, default=600, help="cadences of the pixel line")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="pixels 32 40 48, cadences 150 300 600 at 32^2 / 300")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--keep", help="keep the work directories under this path")
    # child mode
    ap.add_argument("--stage")
    ap.add_argument("--dir")
    ap.add_argument("--side", type=int)
    ap.add_argument("--ncad", type=int)
    a = ap.parse_args(argv)

    if a.stage:
        dt = run_stage(a.stage, Path(a.dir), a.side, a.ncad, a.seed, a.threads)
        (Path(a.dir) / f"{a.stage}.time").write_text(repr(dt))
        return 0

    if a.quick:
        a.pixels, a.cadences, a.centre_side, a.centre_cadences = [32, 40, 48], [150, 300, 600], 32, 300
    sizes = sorted({(s, a.centre_cadences) for s in a.pixels} | {(a.centre_side, c) for c in a.cadences})
    cfg = full_config()
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="scaling-"))
    rows = []
    t_all = time.perf_counter()
    for side, ncad in sizes:
        d = base / f"s{side}_t{ncad}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, default=str))
        row = {"side": side, "pixels": side * side, "cadences": ncad}
        try:
            for stage in STAGES:
                row[stage] = measure(stage, d, side, ncad, a.seed, a.threads)
        except RuntimeError as exc:  # e.g. a cutout too small for the PRF fit: report, leave the size out
            print(f"  {side}x{side} px x {ncad} cadences: skipped, {str(exc).splitlines()[-1]}", flush=True)
            continue
        from astropy.table import Table

        row["n_sources"] = int(len(Table.read(d / "catalog.ecsv", format="ascii.ecsv")))
        rows.append(row)
        print(
            f"  {side}x{side} px x {ncad} cadences: " + ", ".join(f"{s} {row[s]['seconds']:.1f}s" for s in STAGES[1:]),
            flush=True,
        )
    if not a.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)

    base_rss = {(r["side"], r["cadences"]): r["import"]["max_rss_mb"] for r in rows}
    print(f"\nwall time [s] (1 stage = 1 process, {a.threads} thread(s)) / peak RSS net of imports [MB]")
    head = f"{'pixels':>7} {'cad':>5} {'src':>5} " + " ".join(f"{s:>15}" for s in STAGES[1:])
    print(head)
    for r in rows:
        b = base_rss[(r["side"], r["cadences"])]
        print(
            f"{r['pixels']:>7} {r['cadences']:>5} {r['n_sources']:>5} "
            + " ".join(f"{r[s]['seconds']:>7.2f}/{r[s]['max_rss_mb'] - b:>6.0f}" for s in STAGES[1:])
        )
    print(f"import baseline: {np.median(list(base_rss.values())):.0f} MB RSS")

    pix_line = sorted((r for r in rows if r["cadences"] == a.centre_cadences), key=lambda r: r["pixels"])
    cad_line = sorted((r for r in rows if r["side"] == a.centre_side), key=lambda r: r["cadences"])
    fits = {}
    print(
        f"\ngrowth exponents (log-log least squares): time ~ pixels^a at {a.centre_cadences} cadences, "
        f"~ cadences^b at {a.centre_side}^2 px; memory likewise"
    )
    print(f"{'stage':>11} {'a(time)':>8} {'b(time)':>8} {'a(mem)':>8} {'b(mem)':>8}")
    for s in STAGES[1:]:
        e = {}
        for key, line, xk in (("a", pix_line, "pixels"), ("b", cad_line, "cadences")):
            if len(line) >= 2:
                e[f"{key}_time"] = fit_exponent([r[xk] for r in line], [max(r[s]["seconds"], 1e-3) for r in line])
                net = [max(r[s]["max_rss_mb"] - base_rss[(r["side"], r["cadences"])], 1.0) for r in line]
                e[f"{key}_mem"] = fit_exponent([r[xk] for r in line], net)
        fits[s] = e
        print(f"{s:>11} " + " ".join(f"{e.get(k, np.nan):>8.2f}" for k in ("a_time", "b_time", "a_mem", "b_mem")))
    total = sum(r[s]["seconds"] for r in rows for s in STAGES[1:])
    print(f"\nsum of stage times {total:.0f} s; benchmark wall time {time.perf_counter() - t_all:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "exponents": fits, "threads": a.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
