"""Benchmark the synthetic TESS sector: generation time at the default size and rendering accuracy.

Run:  python benchmarks/synthetic_generation.py [--seed 1]
Prints the wall time of simulate_sector (64x64 px x 1300 cadences) and, for the brightest star,
the largest difference between the fast scene renderer and the slow per-star reference
(tess_prf.render_prf) in units of the pixel noise.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_lib.data import synthetic as syn  # noqa: E402
from workflow_lib.data import tess_prf as tp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cube, truth, cat, model = syn.simulate_sector({"seed": args.seed}, return_model=True)
    dt = time.perf_counter() - t0
    print(f"simulate_sector 64x64x1300: {dt:.1f} s; {truth.sizes['source']} sources, {len(cat)} in catalog")
    rows, cols = cube["row"].values, cube["column"].values
    err = cube["flux_err"].values
    worst = 0.0
    for k in np.linspace(0, cube.sizes["time"] - 1, 6).astype(int):
        ref = np.zeros(model.shape[1:])
        dr, dc = truth["drift_row"].values[k], truth["drift_column"].values[k]
        for i in range(truth.sizes["source"]):
            r, c = truth["row"].values[i], truth["column"].values[i]
            ref += tp.render_prf(r + dr, c + dc, rows, cols, truth["flux"].values[i, k], prf_image=tp.prf_at(r, c))
        nr, nc = ref.shape
        yy = (np.arange(nr) - (nr - 1) / 2)[:, None]
        xx = (np.arange(nc) - (nc - 1) / 2)[None, :]
        bkg = (
            truth["background"].values[k]
            + truth["background_grad_row"].values[k] * yy
            + truth["background_grad_column"].values[k] * xx
        )
        z = np.abs(model[k] - bkg - ref) / err[k]
        worst = max(worst, float(np.nanmax(z)))
    print(f"max |fast - reference| / flux_err over 6 cadences: {worst:.4f}")
    z = (cube["flux"].values - model) / cube["flux_err"].values
    print(f"std((data - model)/flux_err) = {np.nanstd(z):.4f}")


if __name__ == "__main__":
    main()
