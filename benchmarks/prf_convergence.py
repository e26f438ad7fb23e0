"""The PRF step's §4.4 passes: a fixed ``n_iter`` against iterating to convergence, on randomized scenes.

For each seed: render the scene (``random_scenes``, 200 cadences), build the PRF step's inputs from its mean
frame (the same helper as ``tests/test_prf.py``), and fit the PRF model twice in the same run, once with
``max_iter = n_iter`` (the paper's fixed passes) and once with the defaults (at least ``n_iter`` passes, then
until the fluxes change by less than ``lfd.prf.tolerance``). Prints, per seed that the test changes, the sky
error at the cutout centre and the median absolute flux error of bright (true flux > 1000 e-/s) and mid
(100-1000 e-/s) stars, then the medians, 84th percentiles and maxima over all seeds.

    OPENBLAS_NUM_THREADS=1 python benchmarks/prf_convergence.py --seeds 37 80 [--json out.json]

(seeds 37-79: 43 scenes no default was chosen on; ~15 min on one core.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_prf import _mean_frame_field  # noqa: E402
from workflow_lib.data.random_scenes import sample_scene, simulate_scene  # noqa: E402
from workflow_lib.lfd.prf import fit_prf_model, prf_params  # noqa: E402

BRIGHT, MID = 1000.0, 100.0  # true mean flux bounds [e-/s]


def measure(seed: int, n_cadences: int) -> dict:
    """Both fits of one scene: per variant the sky error, bright/mid median abs. errors, passes, CPU."""
    cube, truth, incat = simulate_scene(sample_scene(seed), n_cadences=n_cadences)
    mf, me, pc, pr, sc, sr, F0, edge, cat = _mean_frame_field(cube, incat)
    good = np.asarray(cube["quality"].values) == 0
    true_sky = float(np.asarray(truth["background"].values)[good].mean())
    pos = {int(s): i for i, s in enumerate(np.asarray(truth["source_id"].values))}
    tflux = np.asarray(truth["flux"].values)[:, good].mean(axis=1)
    T = np.array([tflux[pos[int(s)]] if int(s) in pos else np.nan for s in np.asarray(cat["source_id"], np.int64)])
    row = {"seed": seed}
    n_iter = int(prf_params(None)["n_iter"])
    for name, params in (("fixed", {"max_iter": n_iter}), ("converged", {})):
        t0 = time.process_time()
        m, _ = fit_prf_model(mf, me, pc, pr, sc, sr, F0, edge, prf_params(params))
        F = m.source_flux
        err = np.abs(F / T - 1)
        bright = np.isfinite(err) & (T > BRIGHT)
        mid = np.isfinite(err) & (T > MID) & (T <= BRIGHT)
        row[name] = {
            "sky": float(m.background[0] - true_sky),
            "bright": float(np.median(err[bright])) if bright.any() else None,
            "mid": float(np.median(err[mid])) if mid.any() else None,
            "passes": int(m.meta["n_passes"]),
            "used_pass": int(m.meta["used_pass"]),
            "converged": bool(m.meta["converged"]),
            "cpu_s": time.process_time() - t0,
        }
    return row


def summary(rows: list[dict]) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f} %"

    print("seed  passes (used)  sky - true [e-/s/px]  bright abs. error   mid abs. error")
    for r in rows:
        a, b = r["fixed"], r["converged"]
        if (a["sky"], a["bright"], a["mid"]) != (b["sky"], b["bright"], b["mid"]):
            print(
                f"{r['seed']:4d}  {b['passes']:2d} ({b['used_pass']})  {a['sky']:+.2f} -> {b['sky']:+.2f}  "
                f"{pct(a['bright'])} -> {pct(b['bright'])}  {pct(a['mid'])} -> {pct(b['mid'])}"
            )
    n_more = sum(r["converged"]["passes"] > r["fixed"]["passes"] for r in rows)
    n_back = sum(not r["converged"]["converged"] for r in rows)
    print(f"{len(rows)} scenes; {n_more} ran more passes; {n_back} did not settle (pass n_iter's fit kept)")
    for key in ("sky", "bright", "mid"):
        for name in ("fixed", "converged"):
            v = np.abs([r[name][key] for r in rows if r[name][key] is not None])
            print(f"|{key}| {name:9s} median {np.median(v):.4f}  84 % {np.percentile(v, 84):.4f}  max {v.max():.4f}")
    cpu = [r["converged"]["cpu_s"] / r["fixed"]["cpu_s"] for r in rows]
    print(f"CPU converged / fixed: median {np.median(cpu):.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=(37, 80), metavar=("FIRST", "STOP"))
    ap.add_argument("--cadences", type=int, default=200)
    ap.add_argument("--json", type=Path, help="write the per-seed rows here")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    rows = []
    for seed in range(*args.seeds):
        rows.append(measure(seed, args.cadences))
        print(f"seed {seed}: {rows[-1]['converged']['passes']} passes", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    summary(rows)


if __name__ == "__main__":
    main()
