"""Per-job overhead of a pipeline run: wall time of `snakemake` vs the time its rules report.

Runs a config (default: the repository's config/, two synthetic 64x64x1300 fields) end to end in a
scratch directory (`--directory`, the config copied there), then reads the benchmark TSVs Snakemake
writes (results/<run>/benchmarks/<rule>/<name>.tsv, columns `s` and `cpu_time`) and prints

    wall time of the whole run, sum of rule seconds (s), sum of rule CPU seconds (cpu_time),
    their ratios, and the per-rule table.

    python benchmarks/run_overhead.py                       # default config, --cores 2
    python benchmarks/run_overhead.py --config .test/config --cores 2 --keep
    python benchmarks/run_overhead.py --read /tmp/ovh.XXXX  # only summarise an existing run dir

Wall / (sum of rule CPU / cores) is the overhead factor: 1.0 would be perfectly packed rule work.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_benchmarks(run_dir: Path) -> list[dict]:
    """One row per benchmark TSV under <run_dir>/results/*/benchmarks/<rule>/<name>.tsv."""
    rows = []
    for tsv in sorted(run_dir.glob("results/*/benchmarks/*/*.tsv")):
        with tsv.open() as fh:
            for rec in csv.DictReader(fh, delimiter="\t"):

                def num(key, rec=rec):
                    try:
                        return float(rec.get(key) or "nan")
                    except ValueError:
                        return float("nan")

                rows.append({"rule": tsv.parent.name, "job": tsv.stem, "s": num("s"), "cpu": num("cpu_time")})
    return rows


def summarise(rows: list[dict], wall: float | None, cores: int) -> str:
    out = [f"{'rule':<20} {'job':<22} {'s':>8} {'cpu_s':>8}"]
    for r in sorted(rows, key=lambda r: -r["s"]):
        out.append(f"{r['rule']:<20} {r['job']:<22} {r['s']:8.1f} {r['cpu']:8.1f}")
    s = sum(r["s"] for r in rows)
    cpu = sum(r["cpu"] for r in rows if r["cpu"] == r["cpu"])
    out.append("")
    out.append(f"jobs with benchmarks      {len(rows)}")
    if wall is not None:
        out.append(f"wall time                 {wall:8.1f} s   (--cores {cores})")
    out.append(f"sum of rule seconds (s)   {s:8.1f} s")
    out.append(f"sum of rule CPU seconds   {cpu:8.1f} s")
    if s:
        out.append(f"rule CPU / rule seconds   {cpu / s:8.2f}")
    if wall:
        out.append(f"wall / rule seconds       {wall / s:8.2f}" if s else "")
        out.append(f"wall / rule CPU           {wall / cpu:8.2f}" if cpu else "")
        out.append(f"wall x cores / rule CPU   {wall * cores / cpu:8.2f}   (1.0 = rule work perfectly packed)")
    return "\n".join(x for x in out if x is not None)


def run(config_dir: Path, cores: int, workdir: Path, extra: list[str]) -> float:
    shutil.copytree(config_dir, workdir / "config")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        str(cores),
        *extra,
    ]
    t0 = time.perf_counter()
    with (workdir / "snakemake.log").open("w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if res.returncode:
        tail = (workdir / "snakemake.log").read_text().splitlines()[-30:]
        raise SystemExit(f"snakemake failed ({res.returncode}) in {workdir}:\n" + "\n".join(tail))
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config", help="config directory to copy (default: config/)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--read", type=Path, metavar="DIR", help="only summarise the benchmarks of an existing run dir")
    ap.add_argument("snakemake_args", nargs="*", help="extra snakemake arguments (after --)")
    a = ap.parse_args(argv)
    if a.read:
        print(summarise(read_benchmarks(a.read), None, a.cores))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="run_overhead."))
    try:
        wall = run(a.config, a.cores, workdir, a.snakemake_args)
        print(f"run directory: {workdir}{'' if a.keep else ' (removed)'}")
        print(summarise(read_benchmarks(workdir), wall, a.cores))
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
