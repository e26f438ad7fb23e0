"""Per-job overhead of a pipeline run: wall time of `snakemake` vs the time its rules report.

Runs a config (default: the repository's config/, two synthetic 64x64x1300 fields) end to end in a
scratch directory (`--directory`, the config copied there), then reads the benchmark TSVs Snakemake
writes (results/<run>/benchmarks/<rule>/<name>.tsv, columns `s` and `cpu_time`) and prints

    wall time of the whole run, sum of rule seconds (s), sum of rule CPU seconds (cpu_time),
    their ratios, and the per-rule table.

    python benchmarks/run_overhead.py                       # default config, --cores 2
    python benchmarks/run_overhead.py --config .test/config --cores 2 --keep
    python benchmarks/run_overhead.py --read /tmp/ovh.XXXX  # only summarise an existing run dir

Wall / (sum of rule CPU / cores) is the overhead factor: 1.0 would be perfectly packed rule work. The CPU
of snakemake and every process it started (getrusage of the waited-for children) minus the rules' own CPU
is the per-job overhead in CPU seconds, which unlike wall time does not depend on how busy the machine is.
Snakemake is run with the Snakefile of this checkout (``REPO``; ``--snakefile`` to compare another).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from workflow_lib.core.logs import read_step_usage  # noqa: E402


def read_benchmarks(run_dir: Path) -> list[dict]:
    """One row per benchmark TSV under <run_dir>/results/*/benchmarks/<rule>/<name>.tsv.

    ``<name>`` may hold slashes (survey tiles are fields named ``<ccd>/tiles/<tile>``). ``cpu`` (s) and
    ``max_rss`` (MB) come from the job's own log (results/*/logs/<rule>/<name>.log, its ``done`` line:
    getrusage of the whole process) when it has one, else from Snakemake's TSV (``cpu_time``, ``max_rss``),
    which samples every 30 s after the first 30 s and so misses the last stretch of a long job
    (``cpu_source``: ``log`` or ``benchmark``; Snakemake's figures stay in ``cpu_snakemake``,
    ``max_rss_snakemake``).
    """
    rows = []
    for tsv in sorted(run_dir.glob("results/*/benchmarks/*/**/*.tsv")):
        bench_root = next(p for p in tsv.parents if p.name == "benchmarks")
        rel = tsv.relative_to(bench_root)
        usage = read_step_usage((bench_root.parent / "logs" / rel).with_suffix(".log"))
        with tsv.open() as fh:
            for rec in csv.DictReader(fh, delimiter="\t"):

                def num(key, rec=rec):
                    try:
                        return float(rec.get(key) or "nan")
                    except ValueError:
                        return float("nan")

                rows.append(
                    {
                        "rule": rel.parts[0],
                        "job": str(rel.relative_to(rel.parts[0]).with_suffix("")),
                        "s": num("s"),
                        "cpu": usage[0] if usage else num("cpu_time"),
                        "max_rss": usage[1] if usage else num("max_rss"),
                        "cpu_source": "log" if usage else "benchmark",
                        "cpu_snakemake": num("cpu_time"),
                        "max_rss_snakemake": num("max_rss"),
                    }
                )
    return rows


def summarise(rows: list[dict], wall: float | None, cores: int, total_cpu: float | None = None) -> str:
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
    if total_cpu is not None:
        out.append(f"total CPU of the run      {total_cpu:8.1f} s   (snakemake + every job process, user + sys)")
        out.append(f"CPU outside the rules     {total_cpu - cpu:8.1f} s   (snakemake itself, job start-up, imports)")
        out.append(f"  per job                 {(total_cpu - cpu) / max(len(rows), 1):8.1f} s")
    return "\n".join(x for x in out if x is not None)


def run(config_dir: Path, cores: int, workdir: Path, extra: list[str], snakefile: Path) -> tuple[float, float]:
    """Run snakemake; return (wall seconds, CPU seconds of snakemake and all its descendants)."""
    shutil.copytree(config_dir, workdir / "config")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(snakefile),
        "--directory",
        str(workdir),
        "--cores",
        str(cores),
        *extra,
    ]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with (workdir / "snakemake.log").open("w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    total_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if res.returncode:
        tail = (workdir / "snakemake.log").read_text().splitlines()[-30:]
        raise SystemExit(f"snakemake failed ({res.returncode}) in {workdir}:\n" + "\n".join(tail))
    return wall, total_cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config", help="config directory to copy (default: config/)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--read", type=Path, metavar="DIR", help="only summarise the benchmarks of an existing run dir")
    ap.add_argument("snakemake_args", nargs="*", help="extra snakemake arguments (after --)")
    ap.add_argument("--snakefile", type=Path, default=REPO / "Snakefile", help="Snakefile (default: this checkout's)")
    a = ap.parse_args(argv)
    if a.read:
        print(summarise(read_benchmarks(a.read), None, a.cores))
        return 0
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="run_overhead."))
    try:
        wall, total_cpu = run(a.config, a.cores, workdir, a.snakemake_args, a.snakefile)
        print(f"run directory: {workdir}{'' if a.keep else ' (removed)'}")
        print(f"load average before/after: {load0} / {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(summarise(read_benchmarks(workdir), wall, a.cores, total_cpu))
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
