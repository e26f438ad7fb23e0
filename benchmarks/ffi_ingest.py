"""FFI ingestion throughput and memory: synthetic SPOC FFIs -> one chunked cube (workflow_lib.data.ffi).

    python benchmarks/ffi_ingest.py                       # 256x256 science px x 200 frames, 1 and 2 threads
    python benchmarks/ffi_ingest.py --size 512 --frames 1300
    python benchmarks/ffi_ingest.py --ingest-only DIR --threads 2    # (used internally) one ingest, JSON out

Writes the FFIs (not timed), then ingests them end to end (header scan, FITS read, stage-1 frame
store, rechunk to (time, 64, 64), compressed cube write) in a fresh Python process per run, and
prints MB of FITS per second per core (wall time x threads) and per CPU-second, and the peak RSS of
that process (VmHWM) above its RSS after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    """High-water RSS of this process image (VmHWM: unlike ru_maxrss it does not carry over the
    parent's peak through fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ingest_once(directory: str, threads: int, frames_per_block: int, tile: int) -> dict:
    # import everything the ingest uses first: imports are a fixed cost, not a per-MB one
    import dask.array  # noqa: F401
    import psutil
    import xarray.backends.zarr  # noqa: F401
    import zarr.codecs  # noqa: F401

    from workflow_lib.data.ffi import ingest_ffis

    base_rss = psutil.Process().memory_info().rss
    files = sorted(Path(directory).glob("*_ffic.fits"))
    nbytes = sum(f.stat().st_size for f in files)
    out = Path(directory).parent / f"cube_{threads}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ingest_ffis(directory, out, threads=threads, frames_per_block=frames_per_block, tile=(tile, tile))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    peak = peak_rss_bytes()
    return {
        "files": len(files),
        "fits_mb": nbytes / 1e6,
        "cube_mb": out_bytes / 1e6,
        "threads": threads,
        "wall_s": wall,
        "cpu_s": cpu,
        "mb_per_s_per_core": nbytes / 1e6 / wall / threads,
        "mb_per_cpu_s": nbytes / 1e6 / cpu,
        "peak_rss_mb": peak / 1e6,
        "base_rss_mb": base_rss / 1e6,
        "peak_above_base_mb": (peak - base_rss) / 1e6,
    }


def run_child(directory, threads, frames_per_block, tile) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--ingest-only",
        str(directory),
        "--threads",
        str(threads),
        "--frames-per-block",
        str(frames_per_block),
        "--tile",
        str(tile),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="science pixels per side (default 256)")
    ap.add_argument("--frames", type=int, default=200, help="number of FFIs (default 200)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    ap.add_argument("--frames-per-block", type=int, default=16)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="where to write the FFIs (default: a temporary directory)")
    ap.add_argument("--ingest-only", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.ingest_only:
        print(json.dumps(ingest_once(a.ingest_only, a.threads[0], a.frames_per_block, a.tile)))
        return 0

    from workflow_lib.data.synthetic_ffi import write_synthetic_ffis

    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="ffi_bench_"))
    try:
        t0 = time.perf_counter()
        d = tmp / "ffi"
        write_synthetic_ffis(d, n_rows=a.size, n_cols=a.size, n_cadences=a.frames, stars_per_sq_pixel=0.02)
        print(f"wrote {a.frames} FFIs of {a.size}x{a.size} science px in {time.perf_counter() - t0:.1f} s to {d}")
        for th in a.threads:
            r = run_child(d, th, a.frames_per_block, a.tile)
            print(
                f"threads={th}: {r['fits_mb']:.0f} MB FITS -> {r['cube_mb']:.0f} MB cube in {r['wall_s']:.1f} s "
                f"(cpu {r['cpu_s']:.1f} s): {r['mb_per_s_per_core']:.0f} MB/s per core (wall), "
                f"{r['mb_per_cpu_s']:.0f} MB per CPU-s; peak RSS {r['peak_rss_mb']:.0f} MB "
                f"({r['peak_above_base_mb']:.0f} MB above the {r['base_rss_mb']:.0f} MB after imports)"
            )
            print(json.dumps(r))
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
