"""CPM benchmark: speed of the fast path vs the plain reference, whole-cutout wall time, peak
memory, and de-trending quality against the synthetic sector's truth.

    PYTHONPATH=. python benchmarks/cpm_benchmark.py                 # paper defaults, 64x64, 1300 cadences
    PYTHONPATH=. python benchmarks/cpm_benchmark.py --size 32 --ref-pixels 1 --no-quality   # quick

Prints one block of figures; the reference is the explicit loop over the k sections in
tests/test_cpm.py (``reference_cpm``), run on the same pre-processed pixels.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from threadpoolctl import threadpool_limits  # noqa: E402

from workflow_lib.cpm import apertures  # noqa: E402
from workflow_lib.cpm import model as cpm  # noqa: E402
from workflow_lib.data.cube import as_pixel_table  # noqa: E402
from workflow_lib.data.synthetic import simulate_sector  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cadences", type=int, default=1300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref-pixels", type=int, default=2, help="pixels de-trended by the slow reference")
    ap.add_argument("--no-quality", action="store_true", help="skip the truth comparison")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    t0 = time.perf_counter()
    cube, truth, catalog = simulate_sector(
        {"seed": args.seed, "n_rows": args.size, "n_cols": args.size, "n_cadences": args.cadences}, "bench"
    )
    t_sim = time.perf_counter() - t0
    rss_before = peak_rss_mb()
    params = cpm.cpm_params()  # paper defaults: L=256, 11x11, lambda_L=lambda_P=0.01, cubic, k=150
    tab = as_pixel_table(cube, drop_nan=False)
    flux = tab["flux"].values.astype(np.float64)
    rows, cols = tab["row"].values, tab["column"].values
    q, t = tab["quality"].values, tab["time"].values

    # ---- whole cutout, fast path, `threads` workers
    t0 = time.perf_counter()
    res = cpm.cpm_detrend_pixels(flux, q, t, rows, cols, params, threads=args.threads, name="bench")
    t_full = time.perf_counter() - t0
    rss_after = peak_rss_mb()
    npix_fit = int(res["valid"].sum())

    # ---- per-pixel cost, one thread, fast vs reference on the same pre-processed pixels
    from test_cpm import reference_cpm

    keep = res["keep"]
    valid = res["valid"]
    fk = flux[keep][:, valid]
    rk, ck = rows[valid], cols[valid]
    nkeep = fk.shape[0]
    k = res["k"]
    rng = np.random.default_rng(0)
    ref_targets = sorted(rng.choice(fk.shape[1], size=args.ref_pixels, replace=False).tolist())
    sub = cpm.cpm_params(chunk_pixels=64)
    with threadpool_limits(1):
        # the fast per-pixel cost measured inside the full problem (L=256 predictors among all pixels)
        prep = cpm.preprocess(fk, np.zeros(nkeep), t[keep], sub)
        sec = cpm.section_index(nkeep, k)
        real = sec.ravel() < nkeep
        yT = np.zeros((fk.shape[1], sec.size))
        yT[:, real] = prep.ystar.T
        T = cpm.poly_basis(prep.time, params.poly_degree)
        Tt = np.zeros((T.shape[1], sec.size))
        Tt[:, real] = T.T
        gram = prep.ystar.T @ prep.ystar
        gT = prep.ystar.T @ T
        targets = np.arange(min(64, fk.shape[1]))
        preds, counts = cpm.select_predictors(rk, ck, prep.median, prep.valid, targets, params, gram=gram)
        t0 = time.perf_counter()
        cpm._detrend_chunk(targets, preds, counts, yT, Tt, k, params, gram, gT, T.T @ T)
        fast_pp = (time.perf_counter() - t0) / targets.size
        t0 = time.perf_counter()
        ms, mp, det = reference_cpm(
            fk,
            t[keep],
            rk,
            ck,
            L=params.n_predictors,
            exclusion=params.exclusion_size,
            lambda_L=params.lambda_L,
            lambda_P=params.lambda_P,
            degree=params.poly_degree,
            k=k,
            targets=ref_targets,
        )
        ref_pp = (time.perf_counter() - t0) / len(ref_targets)
    vidx = np.flatnonzero(valid)[ref_targets]
    fast_sys = res["systematics"][keep][:, vidx] / res["scale"][vidx]
    relerr = float(np.max(np.abs(fast_sys - ms[:, ref_targets])) / np.max(np.abs(ms[:, ref_targets])))

    print(
        f"CPM benchmark: {args.size}x{args.size} px synthetic sector, {nkeep} kept cadences of {len(t)}, "
        f"L={params.n_predictors}, k={k}, lambda_L={params.lambda_L}, lambda_P={params.lambda_P}, cubic polynomial"
    )
    print(f"  simulation                         {t_sim:8.1f} s")
    print(
        f"  whole cutout, fast, {args.threads} threads       {t_full:8.1f} s  ({npix_fit} pixels, {t_full / npix_fit * 1e3:.2f} ms/pixel wall)"
    )
    print(f"  fast, 1 thread, per pixel          {fast_pp * 1e3:8.2f} ms")
    print(f"  reference loop, 1 thread, per pixel {ref_pp * 1e3:8.1f} ms  ({len(ref_targets)} pixels)")
    print(f"  speed-up (1 thread, per pixel)     {ref_pp / fast_pp:8.0f} x")
    print(f"  max |fast - reference| / max|ref|  {relerr:8.1e}  (m_sys of the reference pixels)")
    print(f"  peak RSS: {rss_before:.0f} MB after simulation, {rss_after:.0f} MB after de-trending")
    out = {
        "size": args.size,
        "cadences_kept": nkeep,
        "k": k,
        "t_full_s": t_full,
        "fast_ms_per_pixel": fast_pp * 1e3,
        "ref_ms_per_pixel": ref_pp * 1e3,
        "speedup": ref_pp / fast_pp,
        "relerr": relerr,
        "peak_rss_mb": rss_after,
    }

    if not args.no_quality:
        from test_cpm import evaluate_truth, summarize_quality

        from workflow_lib.data.gaia import crossmatch

        cat = crossmatch(cube, catalog)
        det_cube = cpm.cpm_detrend_cube(cube, params, threads=args.threads)
        cpm_lc, raw_lc = apertures.aperture_lightcurves(cube, det_cube, cat, apertures.aperture_params())
        qd = evaluate_truth(cube, truth, cpm_lc, raw_lc)
        s = summarize_quality(qd)
        print("  quality vs truth:")
        print(
            f"    isolated constant stars: {s['n_constant']}; median 1-h CDPP raw/CPM = {s['median_raw_over_cpm_1h']:.2f} "
            f"(target >= 2); CPM/white-noise floor = {s['median_cpm_over_floor_1h']:.2f} (target <= 1.5)"
        )
        for x in qd["constant"]:
            print(
                f"      T={x['tmag']:.1f}: raw {x['cdpp_raw']:.0f} ppm, CPM {x['cdpp_cpm']:.0f} ppm, floor {x['floor']:.0f} ppm"
            )
        for x in qd["transits"]:
            print(
                f"    planet T={x['tmag']:.1f} depth {x['depth']:.4f} x{x['n_transits']}: CPM keeps {x['depth_ratio']:.1%} "
                f"of the depth (target >= 90%), raw aperture {x['raw_depth_ratio']:.1%}"
            )
        if qd["transient"]:
            x = qd["transient"]
            print(
                f"    transient: peak {x['observed_peak']:.1f} e-/s observed vs {x['expected_peak']:.1f} expected "
                f"(ratio {x['peak_ratio']:.3f}, target within 10%)"
            )
        out["quality"] = s
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
