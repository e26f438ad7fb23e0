"""LFD part 2 benchmark: motion model + per-cadence flux solve on the synthetic sector and at Kepler-FFI scale.

    python benchmarks/lfd_benchmark.py                 # full: 64x64x1300 synthetic sector + FFI-channel scale test
    python benchmarks/lfd_benchmark.py --quick         # 40x40x480 synthetic only
    python benchmarks/lfd_benchmark.py --ffi-only      # scale test alone (peak memory of that test only)

Accuracy targets are checked against ``truth`` (docs/DATA_MODEL.md). The scene is built from
the true TESS PRF (``workflow_lib.tess_prf``, at the field centre) at the crossmatched catalog
positions, so the numbers measure the motion model and the solve of this part, not the PRF fit of
part 1 (the pipeline's own light curves are in results/<run>/<field>/lfd/lightcurves.zarr). The
FFI scale test times the solve only (data without motion, solved with a +-2 % motion model so the
scene changes every frame); it does not measure accuracy.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time as _time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_lib import motion, solve  # noqa: E402


def true_prf_scene(catalog, pixel_col, pixel_row, radius=5.0):
    """Scene matrix from the SPOC PRF at the field centre, columns normalised to the full-lattice
    sum (weights = total flux); a stand-in for part 1's fitted PRF with no fitting error."""
    from workflow_lib import tess_prf

    sc = np.asarray(catalog["column"], float)
    sr = np.asarray(catalog["row"], float)
    coeffs = tess_prf.prf_coefficients_at(float(np.median(pixel_row)), float(np.median(pixel_col)))
    from workflow_lib.edge import source_pixel_pairs

    src, pix, dx, dy = source_pixel_pairs(sc, sr, pixel_col, pixel_row, radius)
    vals = tess_prf.evaluate_prf(coeffs, dy, dx)
    k = np.arange(-8, 9)
    norm = np.empty(sc.size)
    for i in range(sc.size):  # full-lattice sum at each source's sub-pixel phase
        fr, fc = sr[i] - np.round(sr[i]), sc[i] - np.round(sc[i])
        norm[i] = tess_prf.evaluate_prf(coeffs, (k - fr)[:, None], (k - fc)[None, :]).sum()
    return sp.csr_matrix((vals / norm[src], (pix, src)), shape=(np.size(pixel_col), sc.size))


def mean_frame_flux(flux, err, quality, S, B, prior, n_iter=5):
    """§4.4 on the mean frame: flux of every source; sources going negative are removed and refitted."""
    good = quality == 0
    mf = np.nanmean(flux[good], axis=0)
    me = np.sqrt(np.nanmean(err[good] ** 2, axis=0) / good.sum())
    active = np.isfinite(prior) & (prior > 0)
    for _ in range(n_iter):
        idx = np.flatnonzero(active)
        Sa = S[:, idx]
        mu = np.concatenate([prior[idx], np.zeros(B.shape[1])])
        sig = np.concatenate([10 * prior[idx], np.full(B.shape[1], 1e6)])
        sysm = solve.build_system(Sa, B, mu, sig, me)
        w, _ = solve.solve_direct(sysm, mf, me, errors=False)
        neg = w[: idx.size] <= 0
        if not neg.any():
            break
        active[idx[neg]] = False
    out = np.full(prior.size, np.nan)
    out[idx] = w[: idx.size]
    return out, active


def run_synthetic(sim_params: dict, *, threads: int = 2, motion_params: dict | None = None, log=print):
    """Simulate a sector, fit the motion model, solve with and without motion; return metrics."""
    from workflow_lib.cube import as_pixel_table
    from workflow_lib.gaia import crossmatch
    from workflow_lib.synthetic import simulate_sector

    t0 = _time.perf_counter()
    cube, truth, incat = simulate_sector(sim_params, field="bench")
    cat = crossmatch(cube, incat, margin_pixels=4.0)
    table = as_pixel_table(cube, drop_nan=False)
    flux = np.asarray(table["flux"].values, float)
    err = np.asarray(table["flux_err"].values, float)
    quality = np.asarray(table["quality"].values)
    tt = np.asarray(table["time"].values, float)
    pc = np.asarray(table["column"].values, float)
    pr = np.asarray(table["row"].values, float)
    log(f"simulated {flux.shape[1]} px x {flux.shape[0]} cadences, {len(cat)} catalog sources in {_time.perf_counter() - t0:.1f} s")
    S_all = true_prf_scene(cat, pc, pr)
    B = solve.background_design(pc, pr, 1)
    mean_flux, active = mean_frame_flux(flux, err, quality, S_all, B, np.asarray(cat["expected_flux"], float))
    idx = np.flatnonzero(active)
    S = S_all[:, idx].tocsr()
    S.sort_indices()
    sc = np.asarray(cat["column"], float)[idx]
    sr = np.asarray(cat["row"], float)[idx]
    t1 = _time.perf_counter()
    mm, summ = motion.fit_field_motion(tt, flux, err, quality, S, mean_flux[idx], pc, pr, sc, sr, motion_params)
    t_motion = _time.perf_counter() - t1
    dx, dy = solve.scene_offsets(S, pc, pr, sc, sr)
    basis, tb = motion.motion_factors(mm, dx, dy, tt)
    mu = np.concatenate([mean_flux[idx], np.zeros(B.shape[1])])
    sig = np.concatenate([10 * mean_flux[idx], np.full(B.shape[1], 1e6)])
    res = {}
    timing = {}
    for name, kw in (("motion", dict(motion_basis=basis, motion_time=tb)), ("static", {})):
        t2 = _time.perf_counter()
        res[name] = solve.source_flux(flux, err, S, B, mu, sig, threads=threads, **kw)
        timing[name] = (_time.perf_counter() - t2) / tt.size
    # ---- compare with truth
    tsid = np.asarray(truth["source_id"].values)
    pos = {int(s): i for i, s in enumerate(tsid)}
    sid = np.asarray(cat["source_id"], np.int64)[idx]
    ti = np.array([pos[int(s)] for s in sid])
    tflux = np.asarray(truth["flux"].values, float)[ti]
    kind = np.array([str(k) for k in truth["kind"].values])[ti]
    gmag = np.asarray(cat["phot_g_mean_mag"], float)[idx]
    good = (quality == 0) & np.isfinite(res["motion"]["flux"]).all(axis=0)
    # isolation: no other catalog source brighter than 1% of it within 2.5 px
    allc = np.column_stack([np.asarray(cat["column"], float), np.asarray(cat["row"], float)])
    allf = np.asarray(cat["expected_flux"], float)
    isolated = np.array([np.sum((np.hypot(*(allc - allc[j]).T) < 2.5) & (allf > 0.01 * allf[j])) == 1 for j in idx])
    on = (sc > pc.min() + 1) & (sc < pc.max() - 1) & (sr > pr.min() + 1) & (sr < pr.max() - 1)
    sel = isolated & on & (gmag < 15) & (kind == "constant")
    const = on & (kind == "constant") & (gmag < 16)
    out = {"n_sources_model": int(idx.size), "n_isolated_bright": int(sel.sum()), "n_constant": int(const.sum()),
           "s_per_cadence_motion": timing["motion"], "s_per_cadence_static": timing["static"],
           "motion_fit_s": t_motion, "solver": res["motion"]["method"], "motion_rms_residual": float(summ["rms_residual"])}
    for name in ("motion", "static"):
        F, E = res[name]["flux"][:, good], res[name]["flux_err"][:, good]
        T = tflux[:, good]
        rel = np.median(np.abs(F[sel] / T[sel] - 1), axis=1)
        out[f"{name}_median_rel_err_isolated"] = float(np.median(rel))
        p2p = np.std(np.diff(F[sel] - T[sel], axis=1), axis=1) / np.sqrt(2)
        out[f"{name}_p2p_over_err_isolated"] = float(np.median(p2p / np.median(E[sel], axis=1)))
        relrms = np.std(F[const] / np.mean(F[const], axis=1, keepdims=True), axis=1)
        out[f"{name}_median_relrms_constant"] = float(np.median(relrms))
        z = (F[const] - T[const]) / E[const]
        out[f"{name}_z_std_constant"] = float(np.median(np.std(z, axis=1)))
        out[f"{name}_z_std_constant_detrended"] = float(np.median(np.std(z - z.mean(axis=1, keepdims=True), axis=1)))
    out["relrms_ratio_static_over_motion"] = out["static_median_relrms_constant"] / out["motion_median_relrms_constant"]
    # ---- KOI-608 pair
    out.update(koi608_metrics(truth, sid, res["motion"], good, tt))
    return out


def koi608_metrics(truth, sid, res, good, tt):
    """Transit depth on the faint star vs injected; largest in-eclipse dip (sigma) on the bright one."""
    a = truth.attrs
    if "koi608_faint" not in a:
        return {}
    faint, bright = int(a["koi608_faint"]), int(a["koi608_bright"])
    where = {int(s): i for i, s in enumerate(sid)}
    tpos = {int(s): i for i, s in enumerate(np.asarray(truth["source_id"].values))}
    if faint not in where or bright not in where:
        return {"koi608": "pair not in the model"}
    tf = np.asarray(truth["flux"].values, float)[tpos[faint]]
    ecl = (tf < np.median(tf) * (1 - 1e-4)) & good
    if ecl.sum() < 2:
        return {"koi608": "no eclipse in the simulated window"}
    oot = good & ~ecl
    true_depth = 1 - np.mean(tf[ecl]) / np.median(tf[oot])
    ff = res["flux"][where[faint]]
    depth = 1 - np.mean(ff[ecl]) / np.median(ff[oot])
    fb = res["flux"][where[bright]]
    eb = res["flux_err"][where[bright]]
    # bright star: mean in-eclipse minus out-of-eclipse, in units of its error
    dip = (np.median(fb[oot]) - np.mean(fb[ecl])) / (np.median(eb[ecl]) / np.sqrt(ecl.sum()))
    return {"koi608_true_depth": float(true_depth), "koi608_depth": float(depth),
            "koi608_depth_ratio": float(depth / true_depth), "koi608_bright_dip_sigma": float(dip),
            "koi608_n_in_eclipse": int(ecl.sum())}


def ffi_scale_test(npix_side=316, nsrc=13000, ntime=20, threads=2, seed=0, log=print):
    """Kepler-FFI-channel-sized problem (~100,000 px, ~13,000 sources), analytic Gaussian PRF:
    seconds per frame of the solve after the models are fitted, and peak memory."""
    from scipy.special import erf

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:npix_side, 0:npix_side]
    pc, pr = cols.ravel().astype(float), rows.ravel().astype(float)
    sc = rng.uniform(-1, npix_side, nsrc)
    sr = rng.uniform(-1, npix_side, nsrc)
    f0 = 10 ** rng.uniform(2.0, 5.0, nsrc)
    from workflow_lib.edge import source_pixel_pairs

    t0 = _time.perf_counter()
    src, pix, dx, dy = source_pixel_pairs(sc, sr, pc, pr, 3.0)
    s2 = np.sqrt(2) * 0.9
    frac = lambda d: 0.5 * (erf((d + 0.5) / s2) - erf((d - 0.5) / s2))  # noqa: E731
    S = sp.csr_matrix((frac(dx) * frac(dy), (pix, src)), shape=(pc.size, nsrc))
    S.sort_indices()
    B = solve.background_design(pc, pr, 0)
    truth = f0[:, None] * np.ones((1, ntime))
    model = (S @ truth).T + 20.0
    err = np.sqrt(model + 25.0)
    data = (model + err * rng.standard_normal(model.shape)).astype(np.float32)
    err = err.astype(np.float32)
    log(f"FFI scale: {pc.size} px, {nsrc} sources, S nnz {S.nnz}, built in {_time.perf_counter() - t0:.1f} s")
    mu = np.concatenate([f0, [20.0]])
    sig = np.concatenate([10 * f0, [1e6]])
    # a smooth synthetic motion model (factor 1 +- 2 %) so the per-frame scene changes
    mm = motion.MotionModel(np.zeros((9, 4)), np.linspace(-3, 3, 2 + 0), 2, 3, 0.0, 1.0)
    mm.weights = np.column_stack([np.ones(9), 0.02 * rng.standard_normal(9), np.zeros(9), np.zeros(9)])
    ddx, ddy = solve.scene_offsets(S, pc, pr, sc, sr)
    basis, tb = motion.motion_factors(mm, ddx, ddy, np.linspace(-1, 1, ntime))
    res = solve.source_flux(data, err, S, B, mu, sig, motion_basis=basis, motion_time=tb, method="pcg",
                            threads=threads, time_chunk=max(1, ntime // threads))
    return {"ffi_npix": int(pc.size), "ffi_nsrc": nsrc, "ffi_S_nnz": int(S.nnz), "ffi_setup_s": res["setup_seconds"],
            "ffi_s_per_frame": res["solve_seconds"] / ntime, "ffi_pcg_iter_per_frame": res["pcg_iterations"] / ntime,
            "ffi_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ffi", action="store_true")
    ap.add_argument("--ffi-only", action="store_true")
    args = ap.parse_args(argv)
    if args.ffi_only:
        out = ffi_scale_test(threads=args.threads)
        print(json.dumps(out, indent=1, default=float))
        print(f"{'MET    ' if out['ffi_s_per_frame'] < 1 else 'NOT MET'}  FFI < 1 s per frame")
        print(f"{'MET    ' if out['ffi_peak_rss_mb'] < 1024 else 'NOT MET'}  FFI peak memory < 1 GB")
        return
    sim = {"seed": 7, "n_rows": 40, "n_cols": 40, "n_cadences": 480} if args.quick else {"seed": 7}
    out = run_synthetic(sim, threads=args.threads)
    out["synthetic_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not (args.quick or args.no_ffi):
        out.update(ffi_scale_test(threads=args.threads))
    targets = {
        "isolated G<15 median rel. flux error < 1%": out["motion_median_rel_err_isolated"] < 0.01,
        "p2p scatter within 20% of injected noise": abs(out["motion_p2p_over_err_isolated"] - 1) < 0.2,
        "motion lowers constant-star rms >= 3x": out["relrms_ratio_static_over_motion"] >= 3,
        "z std in [0.8, 1.5]": 0.8 <= out["motion_z_std_constant"] <= 1.5,
    }
    if "koi608_depth_ratio" in out:
        targets["KOI-608 faint depth within 10%"] = abs(out["koi608_depth_ratio"] - 1) < 0.1
        targets["KOI-608 bright no dip > 3 sigma"] = out["koi608_bright_dip_sigma"] < 3
    if "ffi_s_per_frame" in out:
        targets["FFI < 1 s per frame"] = out["ffi_s_per_frame"] < 1.0
        targets["FFI peak memory < 1 GB"] = out["ffi_peak_rss_mb"] < 1024
    print(json.dumps(out, indent=1, default=float))
    for k, v in targets.items():
        print(f"{'MET    ' if v else 'NOT MET'}  {k}")


if __name__ == "__main__":
    main()
