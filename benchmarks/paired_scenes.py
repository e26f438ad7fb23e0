"""Two runs of ``benchmarks/randomized_scenes.py`` on the same scenes, compared star by star.

    python benchmarks/paired_scenes.py A.json B.json      # the --json files of the two runs (or --merge-d halves)

Isolated constant stars are paired by scene seed, G and true flux (both runs select them from the truth, so
the same stars). Per G bin: the median per-star absolute flux error of A and of B, how many stars B has the
smaller error for, the median F / true F, the median per-star ratios B / A of the LFD and deblended CDPP
(true-flux normalisation) and of LFD CDPP over its white noise; then the flux solve's sky excess per scene
(median [16 %, 84 %] over scenes), the flag counts and the CPU of the PRF, flux-solve and deblend stages.
Used for every default changed in docs/VALIDATION.md ("The wing term", "The edge profile that rose with r").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BINS = (("G<13", -np.inf, 13.0), ("13-15", 13.0, 15.0), ("15-17", 15.0, 17.0), ("17-19", 17.0, 19.0))


def _spread(x) -> str:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not x.size:
        return "n.a."
    return f"{np.median(x):.3g} [{np.percentile(x, 16):.3g}, {np.percentile(x, 84):.3g}]"


def paired_stars(a: dict, b: dict, lo: float, hi: float) -> list[tuple[dict, dict]]:
    """The (A, B) records of the isolated constant stars of one scene with lo <= G < hi."""
    key = {(round(s["G"], 6), round(s["true_flux"], 3)): s for s in a["stars"]}
    pairs = []
    for s in b["stars"]:
        t = key.get((round(s["G"], 6), round(s["true_flux"], 3)))
        if t is not None and lo <= s["G"] < hi:
            pairs.append((t, s))
    return pairs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="--json of run A (the reference)")
    ap.add_argument("b", type=Path, help="--json of run B (the change)")
    args = ap.parse_args(argv)
    A = {s["seed"]: s for s in json.loads(args.a.read_text())["scenes"]}
    B = {s["seed"]: s for s in json.loads(args.b.read_text())["scenes"]}
    seeds = sorted(set(A) & set(B))
    print(f"{len(seeds)} scenes in both runs")
    print(f"{'bin':6} {'N':>4} {'abs A %':>8} {'abs B %':>8} {'B better':>9} {'F/T A':>6} {'F/T B':>6} "
          f"{'LFD CDPP B/A':>12} {'deb CDPP B/A':>12} {'LFD/white A':>11} {'LFD/white B':>11}")  # fmt: skip
    for name, lo, hi in BINS:
        pairs = [p for s in seeds for p in paired_stars(A[s], B[s], lo, hi)]
        if not pairs:
            print(f"{name:6} {0:4d}")
            continue

        def col(key, which):
            return np.array([p[which][key] for p in pairs], float)

        ea, eb = col("lfd_abs_err", 0), col("lfd_abs_err", 1)
        ok = np.isfinite(ea) & np.isfinite(eb)
        white = [col("lfd_cdpp_true", k) / col("lfd_white_cdpp", k) for k in (0, 1)]
        print(
            f"{name:6} {len(pairs):4d} {100 * np.nanmedian(ea):8.2f} {100 * np.nanmedian(eb):8.2f} "
            f"{int((eb[ok] < ea[ok]).sum()):4d}/{int(ok.sum()):<4d} "
            f"{np.nanmedian(col('lfd_flux_ratio', 0)):6.3f} {np.nanmedian(col('lfd_flux_ratio', 1)):6.3f} "
            f"{np.nanmedian(col('lfd_cdpp_true', 1) / col('lfd_cdpp_true', 0)):12.4f} "
            f"{np.nanmedian(col('deb_cdpp_true', 1) / col('deb_cdpp_true', 0)):12.4f} "
            f"{np.nanmedian(white[0]):11.3f} {np.nanmedian(white[1]):11.3f}"
        )
    print("sky excess [e-/s/px] A", _spread([A[s]["sky_excess"] for s in seeds]),
          " B", _spread([B[s]["sky_excess"] for s in seeds]))  # fmt: skip
    for k in ("flag_NotInModel", "flagged_frac20", "flagged", "n_reported"):
        print(f"{k}: {sum(A[s]['counts'].get(k, 0) for s in seeds)} -> {sum(B[s]['counts'].get(k, 0) for s in seeds)}")
    for k in ("prf", "flux_solve", "deblend"):
        ca, cb = (sum(R[s]["cpu_s"][k] for s in seeds) for R in (A, B))
        print(f"CPU {k}: {ca:.1f} -> {cb:.1f} s ({cb / ca:.3f}x)")


if __name__ == "__main__":
    main()
