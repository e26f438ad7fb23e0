"""CPM memory and speed against cutout size (issue 14): the real `cpm-detrend` step, one process per size.

    OPENBLAS_NUM_THREADS=1 python benchmarks/cpm_memory.py                      # 32, 64, 128 px x 1,300 cadences
    OPENBLAS_NUM_THREADS=1 python benchmarks/cpm_memory.py --sizes 16 32 --cadences 300   # quick

For each size a synthetic field (the default sector's generator, `write_synthetic_field`) is written to a
work directory, crossmatched with its own catalog, and de-trended by ``python -m workflow_lib.steps
cpm-detrend`` with the schema's defaults (the paper's: L = 256 predictors, 11 x 11 exclusion, k = 150
sections) -- the command line the `cpm_detrend` rule runs. The step's peak resident memory comes from the
kernel's accounting of that child process (``os.wait4``), its CPU time likewise, so the figures are the
rule's own, not this driver's.

Prints per size: pixels, peak RSS, CPU ms per pixel, wall time, and whether the pixel Gram matrix is shared
(npix^2 doubles, up to ``cpm.gram_max_pixels``) or formed per pixel; then the goals: 128 x 128 <= 3 GB and
RSS growth from 64 x 64 to 128 x 128 <= 4x (4x the pixels).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_lib.core.settings import schema_defaults  # noqa: E402
from workflow_lib.data.gaia import crossmatch_field  # noqa: E402
from workflow_lib.data.synthetic import write_synthetic_field  # noqa: E402


def run_step(field: Path, threads: int) -> dict:
    """The cpm-detrend step on ``field`` as a child process: its wall time, CPU time and peak RSS."""
    out = field / "cpm" / "default"
    cmd = [
        sys.executable,
        "-m",
        "workflow_lib.steps",
        "cpm-detrend",
        "--field",
        field.name,
        "--paramset",
        "default",
        "--cube",
        str(field / "cube.zarr"),
        "--catalog",
        str(field / "catalog.ecsv"),
        "--detrended",
        str(out / "detrended.zarr"),
        "--lightcurves",
        str(out / "lightcurves.zarr"),
        "--raw-lightcurves",
        str(out / "raw_lightcurves.zarr"),
        "--fits-dir",
        str(out / "fits"),
        "--threads",
        str(threads),
        "--log",
        str(field / "cpm_detrend.log"),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"cpm-detrend failed on {field}: {err[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="cutout sides [px]")
    ap.add_argument("--cadences", type=int, default=1300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="threads of the step (--threads)")
    ap.add_argument("--workdir", help="keep the fields here (default: a temporary directory)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    base = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="cpm-memory-"))
    gram_max = int(schema_defaults("cpm")["gram_max_pixels"])
    rows = []
    for n in a.sizes:
        field = base / f"f{n}"
        field.mkdir(parents=True, exist_ok=True)
        if not (field / "catalog.ecsv").exists():
            t0 = time.perf_counter()
            params = {"seed": a.seed, "n_rows": n, "n_cols": n, "n_cadences": a.cadences}
            write_synthetic_field(field / "cube.zarr", field / "truth.zarr", field / "input.ecsv", params, field.name)
            crossmatch_field(field / "cube.zarr", field / "catalog.ecsv", {}, local_catalog=str(field / "input.ecsv"))
            print(f"{n} x {n} x {a.cadences}: field written in {time.perf_counter() - t0:.0f} s", flush=True)
        r = run_step(field, a.threads)
        npix = n * n
        r.update(
            size=n,
            pixels=npix,
            ms_per_pixel=1e3 * r["cpu_s"] / npix,
            gram="shared" if npix <= gram_max else "per pixel",
        )
        rows.append(r)
        print(
            f"{n} x {n}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['ms_per_pixel']:.1f} CPU-ms/pixel, "
            f"{r['wall_s']:.0f} s wall ({r['gram']} Gram)",
            flush=True,
        )
    print(f"\nCPM step (`cpm-detrend`, schema defaults), {a.cadences} cadences, {a.threads} thread(s):")
    print("| size | pixels | peak RSS [MB] | CPU ms / pixel | wall [s] | pixel Gram |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} x {r['size']} | {r['pixels']} | {r['peak_rss_mb']:.0f} | {r['ms_per_pixel']:.1f} | "
            f"{r['wall_s']:.0f} | {r['gram']} |"
        )
    by = {r["size"]: r for r in rows}
    if 128 in by:
        ok = by[128]["peak_rss_mb"] <= 3 * 1024
        print(f"{'PASS' if ok else 'FAIL'}  128 x 128 peak RSS {by[128]['peak_rss_mb']:.0f} MB <= 3072 MB")
    if 64 in by and 128 in by:
        g = by[128]["peak_rss_mb"] / by[64]["peak_rss_mb"]
        print(f"{'PASS' if g <= 4 else 'FAIL'}  RSS growth 64 -> 128 px: {g:.2f}x <= 4x (pixels: 4x)")
        s = by[128]["ms_per_pixel"] / by[64]["ms_per_pixel"]
        print(f"      CPU per pixel 64 -> 128 px: {s:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
