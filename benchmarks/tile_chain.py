"""One survey tile's chain, stage by stage, one job at a time: exact CPU per stage, and A/B between checkouts.

Snakemake's benchmark files undercount long jobs and several jobs sharing the cores raise each one's CPU
seconds (docs/SURVEY.md, "CPU measured exactly"), so this runs the ``python -m workflow_lib.steps`` commands
of one tile of a finished ``benchmarks/survey_scale.py`` run one after the other, and takes each job's
user + system CPU seconds and peak memory from ``os.wait4`` (getrusage of the child). The commands are those
the run's rules give (``snakemake -n -p`` with this checkout's Snakefile), from cutting the tile to its page;
the CCD-level inputs (cube, catalog, tile grid, CCD motion) are hard links into a scratch directory, the
tile's products are made afresh there.

With several ``--checkout NAME=DIR`` the chain runs once per checkout per pair (``--pairs``), the order
alternating from pair to pair (A B, B A, A B, ...) so that a drift of the machine's speed falls on both, and
prints every stage's CPU per run, the chain totals and the per-pair ratios of each checkout to the first.
``--compare`` also checks that the checkouts' products are the same (``tests/helpers/manifest.py``, the tiny
manifest's digests: every array of every zarr store, npz file and FITS file of the tile; provenance skipped).

    python benchmarks/tile_chain.py /tmp/ss512b --tile r0128c0128 --checkout old=/work/wt_old \\
        --checkout new=/work/main --pairs 3 --work /tmp/tile_chain --compare
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from survey_scale import CCD, RUN  # noqa: E402  (the run directory's layout)

from tests.helpers.manifest import compare, manifest  # noqa: E402  (the products' digests, provenance aside)

#: the tile's stages in dependency order (step names of ``python -m workflow_lib.steps``)
STAGES = (
    "survey-cut-tile",
    "survey-split-catalog",
    "edge-model",
    "prf-model",
    "scene-offsets",
    "motion-model",
    "flux-solve",
    "cpm-detrend",
    "report-field",
)
RULES = (
    "cut_tile split_catalog edge_model prf_model scene_offsets motion_model flux_solve cpm_detrend report_field"
).split()
#: a fixed CPU workload run before every chain (BLAS matrix products, as the CPM's solves, and interpreted
#: Python, as the steps' start-up): the VM's speed drifts by up to ~1.9x between sessions (docs/SURVEY.md),
#: and the chain's CPU over this one's is much steadier than the chain's CPU alone
CALIBRATION = (
    "import numpy as np\n"
    "a = np.random.default_rng(0).standard_normal((500, 500))\n"
    "for _ in range(200):\n"
    "    b = a @ a\n"
    "s = sum(i * i for i in range(8_000_000))\n"
)
#: 30-min sector: 16 CCDs of 2048 x 2048 px in 128-px tiles (interior tiles, as the one measured)
SECTOR_TILES = 16 * (2048 // 128) ** 2
#: the CCD-level jobs of a sector (ingest, Gaia, tile grid, CCD motion, merge, overview) [CPU-h], docs/SURVEY.md
SECTOR_CCD_LEVEL_CPU_H = 4.0
#: CCD-level inputs of a tile's chain (relative to the CCD directory), linked into the scratch run
CCD_INPUTS = ("cube.zarr", "catalog.ecsv", "tiles.json", "motion")


def tile_commands(run_dir: Path, tile: str) -> dict:
    """step -> shell command of ``tile`` as the rules of this checkout give it for ``run_dir``'s config."""
    target = f"results/{RUN}/report/{CCD}/tiles/{tile}.html"
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--directory", str(run_dir), "--snakefile",
         str(REPO / "Snakefile"), "--configfile", str(run_dir / "config" / "config.yaml"),
         "--forcerun", "cut_tile", "split_catalog", "--allowed-rules", *RULES, "--", target],
        capture_output=True, text=True,
    )  # fmt: skip
    cmds = {}
    for line in res.stdout.splitlines():
        line = line.strip().removeprefix("Shell command: ")
        parts = line.split()
        if len(parts) > 3 and parts[:3] == ["python", "-m", "workflow_lib.steps"] and parts[3] in STAGES:
            if tile in line and parts[3] not in cmds:
                cmds[parts[3]] = line
    missing = [s for s in STAGES if s not in cmds]
    if missing:
        raise SystemExit(f"{run_dir}: no command for {missing} of tile {tile} (snakemake said: {res.stderr[-1500:]})")
    return cmds


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link copy of ``src`` (a file or a directory tree) at ``dst``."""
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
        return
    for root, _, files in os.walk(src):
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(Path(root) / f, out / f)


def scratch_run(run_dir: Path, work: Path) -> Path:
    """A scratch run directory with the CCD-level inputs of the tile chain (hard links), no tile products."""
    if work.exists():
        shutil.rmtree(work)
    ccd = Path(run_dir) / "results" / RUN / CCD
    for name in CCD_INPUTS:
        if (ccd / name).exists():
            link_tree(ccd / name, work / "results" / RUN / CCD / name)
    return work


def run_chain(cmds: dict, work: Path, checkout: Path) -> dict:
    """Run the stages one after the other in ``work`` with ``checkout`` first on PYTHONPATH; per stage
    ``{cpu, rss_mb, wall}`` from wait4."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(checkout))
    out = {}
    for step in STAGES:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", cmds[step]], cwd=work, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{step} failed in {work} ({checkout}): exit {proc.returncode}; see its log")
        out[step] = {"cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "wall": time.perf_counter() - t0}
    return out


def calibration_cpu() -> float:
    """CPU seconds of :data:`CALIBRATION` in a fresh process (one BLAS thread), from wait4."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CALIBRATION], env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit("the calibration workload failed")
    return ru.ru_utime + ru.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished benchmarks/survey_scale.py run directory")
    ap.add_argument("--tile", default="r0128c0128", help="tile id (an interior tile of the 512 CCD by default)")
    ap.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR", help="repeatable; default: this")
    ap.add_argument("--pairs", type=int, default=1, help="runs per checkout (alternating order)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tile_chain"), help="scratch directory (replaced)")
    ap.add_argument("--compare", action="store_true", help="check that the checkouts' products are the same")
    a = ap.parse_args(argv)
    checkouts = [tuple(c.split("=", 1)) for c in a.checkout] or [("this", str(REPO))]
    cmds = tile_commands(a.run.resolve(), a.tile)
    runs = {name: [] for name, _ in checkouts}
    calib = {name: [] for name, _ in checkouts}
    for i in range(a.pairs):
        order = checkouts if i % 2 == 0 else checkouts[::-1]
        for name, path in order:
            work = scratch_run(a.run, a.work / name)
            calib[name].append(calibration_cpu())
            print(f"pair {i + 1}: {name} ({path}) in {work}; calibration {calib[name][-1]:.2f} CPU-s", flush=True)
            runs[name].append(run_chain(cmds, work, Path(path)))
    first = checkouts[0][0]
    print(f"\ntile {a.tile} of {a.run}: CPU-s per stage (user + system of the job), one job at a time")
    print(f"{'stage':<22}" + "".join(f" {name + ' ' + str(i + 1):>10}" for name in runs for i in range(a.pairs)))
    for step in STAGES:
        print(f"{step:<22}" + "".join(f" {r[step]['cpu']:>10.1f}" for name in runs for r in runs[name]))
    totals = {name: [sum(s["cpu"] for s in r.values()) for r in rs] for name, rs in runs.items()}
    print(f"{'chain':<22}" + "".join(f" {t:>10.1f}" for name in runs for t in totals[name]))
    print(f"{'peak memory max [MB]':<22}" + "".join(
        f" {max(s['rss_mb'] for s in r.values()):>10.0f}" for name in runs for r in runs[name]))  # fmt: skip
    print(f"{'calibration [CPU-s]':<22}" + "".join(f" {c:>10.2f}" for name in runs for c in calib[name]))
    print(f"{'chain / calibration':<22}" + "".join(
        f" {t / c:>10.1f}" for name in runs for t, c in zip(totals[name], calib[name])))  # fmt: skip
    print(f"{'sector [CPU-h]':<22}" + "".join(
        f" {sector_cpu_h(t):>10.0f}" for name in runs for t in totals[name]))  # fmt: skip
    print(
        f"(sector: {SECTOR_TILES:,} interior tiles x the chain + {SECTOR_CCD_LEVEL_CPU_H:g} CPU-h of CCD-level jobs,"
        " at this run's machine speed)"
    )
    for name in runs:
        if name != first:
            ratios = [b / a_ for a_, b in zip(totals[first], totals[name])]
            print(
                f"{name} / {first}: per pair {' '.join(f'{x:.3f}' for x in ratios)}, "
                f"median {statistics.median(ratios):.3f}"
            )
    if a.compare and len(checkouts) > 1:
        tile_dir = Path("results") / RUN / CCD / "tiles" / a.tile
        for name, _ in checkouts[1:]:
            diffs = compare(manifest(a.work / name / tile_dir), manifest(a.work / first / tile_dir))
            print(f"products {name} vs {first}: " + ("identical (provenance aside)" if not diffs else ", ".join(diffs)))
    return 0


def sector_cpu_h(chain_cpu_s: float) -> float:
    """A 30-min sector's CPU-hours from one interior tile's chain [CPU-s] (docs/SURVEY.md's extrapolation)."""
    return SECTOR_TILES * chain_cpu_s / 3600 + SECTOR_CCD_LEVEL_CPU_H


if __name__ == "__main__":
    sys.exit(main())
