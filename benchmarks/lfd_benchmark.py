"""LFD part 2 benchmark: motion model + per-cadence flux solve on the synthetic sector and at Kepler-FFI scale.

    python benchmarks/lfd_benchmark.py                 # full: 64x64x1300 synthetic sector + FFI-channel scale test
    python benchmarks/lfd_benchmark.py --quick         # 40x40x480 synthetic only
    python benchmarks/lfd_benchmark.py --ffi-only      # scale test alone (peak memory of that test only)
    python benchmarks/lfd_benchmark.py --seeds 1 2     # both fields of the default run (synth_a, synth_b) + summary

Accuracy targets are checked against ``truth`` (docs/DATA_MODEL.md). The scene is built from
the true TESS PRF (``workflow_lib.data.tess_prf``, at the field centre) at the crossmatched catalog
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

from workflow_lib.lfd import (
    geometry,  # noqa: E402
    linsys,  # noqa: E402
    motion,  # noqa: E402
    solve,  # noqa: E402
)
from workflow_lib.steps import lfd  # noqa: E402


class TruePRF:
    """The SPOC PRF at one CCD position as an object with ``evaluate(dx, dy)`` (like PRFModel),
    normalised to unit full-lattice sum at zero phase."""

    def __init__(self, ccd_row, ccd_col):
        from workflow_lib.data import tess_prf

        self._tp = tess_prf
        self.coeffs = tess_prf.prf_coefficients_at(float(ccd_row), float(ccd_col))
        k = np.arange(-8, 9).astype(float)
        self.norm = float(tess_prf.evaluate_prf(self.coeffs, k[:, None], k[None, :]).sum())

    def evaluate(self, dx, dy):
        return self._tp.evaluate_prf(self.coeffs, np.asarray(dy, float), np.asarray(dx, float)) / self.norm


def true_prf_scene(catalog, pixel_col, pixel_row, radius=5.0):
    """Scene matrix from the SPOC PRF at the field centre, columns normalised to the full-lattice
    sum (weights = total flux); a stand-in for part 1's fitted PRF with no fitting error."""
    from workflow_lib.data import tess_prf

    sc = np.asarray(catalog["column"], float)
    sr = np.asarray(catalog["row"], float)
    coeffs = tess_prf.prf_coefficients_at(float(np.median(pixel_row)), float(np.median(pixel_col)))
    from workflow_lib.lfd.geometry import source_pixel_pairs

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
        sysm = linsys.build_system(Sa, B, mu, sig, me)
        w, _ = linsys.solve_direct(sysm, mf, me, errors=False)
        neg = w[: idx.size] <= 0
        if not neg.any():
            break
        active[idx[neg]] = False
    out = np.full(prior.size, np.nan)
    out[idx] = w[: idx.size]
    return out, active


def run_synthetic(sim_params: dict, *, threads: int = 2, motion_params: dict | None = None, log=print):
    """Simulate a sector, fit the motion model, solve with and without motion; return metrics."""
    from workflow_lib.data.cube import as_pixel_table
    from workflow_lib.data.gaia import crossmatch
    from workflow_lib.data.synthetic import simulate_sector

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
    log(
        f"simulated {flux.shape[1]} px x {flux.shape[0]} cadences, {len(cat)} catalog sources in {_time.perf_counter() - t0:.1f} s"
    )
    S_all = true_prf_scene(cat, pc, pr)
    B = geometry.background_design(pc, pr, 1)
    mean_flux, active = mean_frame_flux(flux, err, quality, S_all, B, np.asarray(cat["expected_flux"], float))
    idx = np.flatnonzero(active)
    S = S_all[:, idx].tocsr()
    S.sort_indices()
    sc = np.asarray(cat["column"], float)[idx]
    sr = np.asarray(cat["row"], float)[idx]
    t1 = _time.perf_counter()
    prf = TruePRF(float(np.median(pr)), float(np.median(pc)))
    if motion_params is None:
        # the true PRF needs no data-driven correction of its shift response (that absorbs errors of a
        # fitted PRF and, ~6000 weights, over-fits 480 cadences: z-std 2.6 on the 40x40x480 test field)
        motion_params = {"correction_degree": 0}
    mm, summ = motion.fit_field_motion(
        tt, flux, err, quality, S, mean_flux[idx], pc, pr, sc, sr, motion_params, prf=prf
    )
    t_motion = _time.perf_counter() - t1
    dx, dy = geometry.scene_offsets(S, pc, pr, sc, sr)
    basis, tb = motion.motion_factors(mm, dx, dy, tt, prf=prf)
    mu = np.concatenate([mean_flux[idx], np.zeros(B.shape[1])])
    sig = np.concatenate([10 * mean_flux[idx], np.full(B.shape[1], 1e6)])
    res = {}
    timing = {}
    for name, kw in (("motion", dict(motion_basis=basis, motion_time=tb)), ("static", {})):
        t2 = _time.perf_counter()
        res[name] = solve.source_flux(flux, err, S, B, mu, sig, threads=threads, **kw)
        timing[name] = (_time.perf_counter() - t2) / tt.size
    # ---- compare with truth
    out = {
        "n_sources_model": int(idx.size),
        "s_per_cadence_motion": timing["motion"],
        "s_per_cadence_static": timing["static"],
        "motion_fit_s": t_motion,
        "solver": res["motion"]["method"],
        "motion_rms_residual": float(summ.get("rms_residual", np.nan)),
    }
    out.update(truth_metrics(truth, cat, idx, quality, pc, pr, res, tt))
    return out


def target_sample(truth, cat, idx, pc, pr) -> dict:
    """The sources ``idx`` of ``cat`` matched to ``truth``: true flux (len(idx), ntime), kind, G,
    position, and the samples of the targets: ``sel`` = isolated constant stars brighter than G = 15
    more than 1 px inside the pixels (target a; isolated: the other catalog sources within 2.5 px add
    up to < 5 % of its a-priori flux), ``const`` = constant stars brighter than G = 16 (c, d)."""
    pos = {int(s): i for i, s in enumerate(np.asarray(truth["source_id"].values))}
    ti = np.array([pos[int(s)] for s in np.asarray(cat["source_id"], np.int64)[idx]])
    kind = np.array([str(k) for k in truth["kind"].values])[ti]
    gmag = np.asarray(cat["phot_g_mean_mag"], float)[idx]
    sc = np.asarray(cat["column"], float)[idx]
    sr = np.asarray(cat["row"], float)[idx]
    allc = np.column_stack([np.asarray(cat["column"], float), np.asarray(cat["row"], float)])
    allf = np.asarray(cat["expected_flux"], float)
    isolated = np.array([allf[(np.hypot(*(allc - allc[j]).T) < 2.5)].sum() < 1.05 * allf[j] for j in idx])
    on = (sc > pc.min() + 1) & (sc < pc.max() - 1) & (sr > pr.min() + 1) & (sr < pr.max() - 1)
    return {
        "tflux": np.asarray(truth["flux"].values, float)[ti],
        "kind": kind,
        "gmag": gmag,
        "sc": sc,
        "sr": sr,
        "sel": isolated & on & (gmag < 15) & (kind == "constant"),
        "const": on & (kind == "constant") & (gmag < 16),
    }


def truth_metrics(truth, cat, idx, quality, pc, pr, res, tt):
    """The issue's accuracy figures against ``truth`` for the sources ``idx`` of ``cat``.

    ``res[name]`` (name = motion / static) hold ``flux`` and ``flux_err`` (len(idx), ntime) and
    optionally ``noise_err``: the error from the pixel noise alone (the injected noise propagated
    through the solve); the p2p figure (a) compares with it when present, else with ``flux_err``.
    """
    ts = target_sample(truth, cat, idx, pc, pr)
    tflux, sel, const = ts["tflux"], ts["sel"], ts["const"]
    sid = np.asarray(cat["source_id"], np.int64)[idx]
    good = (quality == 0) & np.isfinite(res["motion"]["flux"]).all(axis=0)
    out = {"n_isolated_bright": int(sel.sum()), "n_constant": int(const.sum())}
    for name in res:
        F, E = res[name]["flux"][:, good], res[name]["flux_err"][:, good]
        En = res[name].get("noise_err", res[name]["flux_err"])[:, good]
        T = tflux[:, good]
        rel = np.median(np.abs(F[sel] / T[sel] - 1), axis=1)
        out[f"{name}_median_rel_err_isolated"] = float(np.median(rel))
        out[f"{name}_median_mean_flux_err_isolated"] = float(np.median(np.abs(F[sel].mean(1) / T[sel].mean(1) - 1)))
        p2p = np.std(np.diff(F[sel] - T[sel], axis=1), axis=1) / np.sqrt(2)
        out[f"{name}_p2p_over_err_isolated"] = float(np.median(p2p / np.median(En[sel], axis=1)))
        relrms = np.std(F[const] / np.mean(F[const], axis=1, keepdims=True), axis=1)
        out[f"{name}_median_relrms_constant"] = float(np.median(relrms))
        z = (F[const] - T[const]) / E[const]
        out[f"{name}_z_std_constant"] = float(np.median(np.std(z, axis=1)))
        out[f"{name}_z_std_constant_detrended"] = float(np.median(np.std(z - z.mean(axis=1, keepdims=True), axis=1)))
    out["relrms_ratio_static_over_motion"] = out["static_median_relrms_constant"] / out["motion_median_relrms_constant"]
    if "paper" in res:
        out["relrms_ratio_static_over_paper"] = (
            out["static_median_relrms_constant"] / out["paper_median_relrms_constant"]
        )
    # ---- KOI-608 pair
    out.update(koi608_metrics(truth, sid, res["motion"], good, tt))
    return out


def run_chain(
    sim_params: dict, workdir, *, threads: int = 2, params: dict | None = None, log=print, per_star: bool = False
):
    """The REAL pipeline chain on a synthetic sector: write the field, crossmatch, then the four LFD
    steps of rules/lfd.smk (edge -> fitted PRF -> motion -> solve), plus the solve without motion;
    the figures of :func:`truth_metrics` from the written light curves."""
    import xarray as xr

    from workflow_lib.data.gaia import crossmatch_field
    from workflow_lib.data.synthetic import write_synthetic_field
    from workflow_lib.steps.lfd import edge_model_step, prf_model_step

    params = params or {}
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    t0 = _time.perf_counter()
    write_synthetic_field(d / "cube.zarr", d / "truth.zarr", d / "input.ecsv", sim_params, field="bench")
    crossmatch_field(d / "cube.zarr", d / "catalog.ecsv", {}, local_catalog=str(d / "input.ecsv"))
    timing = {"simulate_s": _time.perf_counter() - t0}
    t = _time.perf_counter()
    edge_model_step(d / "cube.zarr", d / "catalog.ecsv", d / "edge.json", params.get("edge"))
    timing["edge_s"] = _time.perf_counter() - t
    t = _time.perf_counter()
    prf_model_step(
        d / "cube.zarr", d / "catalog.ecsv", d / "edge.json", d / "prf.npz", d / "prf.png", params.get("prf")
    )
    timing["prf_s"] = _time.perf_counter() - t
    t = _time.perf_counter()
    lfd.motion_model_step(d / "cube.zarr", d / "catalog.ecsv", d / "prf.npz", d / "motion.npz", params.get("motion"))
    timing["motion_s"] = _time.perf_counter() - t
    res = {}
    # motion: the default solve (shift motion model + per-source offset decorrelation); paper: the
    # shared §4.5 motion model alone (no decorrelation, no blend priors); static: no motion model
    variants = (
        ("motion", True, {}),
        ("paper", True, {"offset_decorrelation_degree": 0, "blend_radius": 0.0}),
        ("static", False, {}),
    )
    for name, use, extra in variants:
        sp_ = dict(params.get("solve") or {}, use_motion=use, write_fits=False, **extra)
        t = _time.perf_counter()
        lc = lfd.flux_solve_step(
            d / "cube.zarr",
            d / "catalog.ecsv",
            d / "prf.npz",
            d / "motion.npz" if use else None,
            d / f"lc_{name}.zarr",
            None,
            sp_,
            threads=threads,
        )
        timing[f"solve_{name}_s"] = _time.perf_counter() - t
        res[name] = lc
    truth = xr.open_zarr(d / "truth.zarr").load()
    cat = res["motion"]
    idx = np.flatnonzero(np.asarray(cat["in_model"].values, bool))
    from astropy.table import Table

    catalog = Table.read(str(d / "catalog.ecsv"), format="ascii.ecsv")
    cube = xr.open_zarr(d / "cube.zarr")
    quality = np.asarray(cube["quality"].values)
    from workflow_lib.data.cube import as_pixel_table

    table = as_pixel_table(cube, drop_nan=False)
    pc = np.asarray(table["column"].values, float)
    pr = np.asarray(table["row"].values, float)
    rr = {}
    for name, lc in res.items():
        rr[name] = {"flux": np.asarray(lc["flux"].values)[idx], "flux_err": np.asarray(lc["flux_err"].values)[idx]}
        if "flux_err_noise" in lc:
            rr[name]["noise_err"] = np.asarray(lc["flux_err_noise"].values)[idx]
    out = {
        "n_sources_model": int(idx.size),
        "n_sources_catalog": int(len(catalog)),
        **timing,
        "lfd_total_s": timing["edge_s"] + timing["prf_s"] + timing["motion_s"] + timing["solve_motion_s"],
    }
    out.update(prf_truth_metrics(d, catalog, truth))
    out.update(truth_metrics(truth, catalog, idx, quality, pc, pr, rr, np.asarray(cube["time"].values, float)))
    if per_star:
        out["per_star"] = per_star_diagnostics(
            d, truth, catalog, idx, quality, pc, pr, rr["motion"]["flux"], rr["motion"]["flux_err"]
        )
    return out


def per_star_diagnostics(d, truth, catalog, idx, quality, pc, pr, flux, flux_err):
    """Per isolated bright constant star (the sample of target a): where the error comes from.

    Columns: mean flux bias (mean F / mean T - 1), median |F/T - 1|, p2p / error, std(z), lag-1
    autocorrelation of z = (F - T) / err (white noise: 0), the fraction of z's variance explained by a
    quadratic in the measured scene offset (motion model residual / jitter not followed) and by the
    background level, the fraction in a 1-day running mean (slow), and the expected LS flux gain of
    the fitted PRF against the motion-blurred SPOC PRF of that star (PRF shape error: predicts the
    mean bias); and, per in-model neighbour within 1.5 px, the correlation of its flux error with the
    star's (flux traded between near-degenerate sources)."""
    from workflow_lib.data import tess_prf

    d = Path(d)
    ts = target_sample(truth, catalog, idx, pc, pr)
    T, gmag, sc, sr = ts["tflux"], ts["gmag"], ts["sc"], ts["sr"]
    sel = np.flatnonzero(ts["sel"])
    good = (quality == 0) & np.isfinite(flux).all(axis=0)
    with np.load(d / "motion.npz") as z:
        cx, cy = np.asarray(z["scene_offset_column"], float), np.asarray(z["scene_offset_row"], float)
    good &= np.isfinite(cx) & np.isfinite(cy)
    bkg = np.asarray(truth["background"].values, float)
    dcol = np.asarray(truth["drift_column"].values, float)[good][::10]
    drow = np.asarray(truth["drift_row"].values, float)[good][::10]
    from workflow_lib.lfd.prf import PRFModel

    prf = PRFModel.load(d / "prf.npz")
    k = np.arange(-8, 9).astype(float)
    rows = []
    for j in sel:
        r = (flux[j] - T[j])[good]
        e = flux_err[j][good]
        z = r / e
        zc = z - z.mean()

        def r2(X):
            return float(1 - np.sum((zc - X @ np.linalg.lstsq(X, zc, rcond=None)[0]) ** 2) / np.sum(zc**2))

        one = np.ones(good.sum())
        c1, c2 = cx[good], cy[good]
        sm = np.convolve(zc, np.ones(49) / 49, mode="same")
        # the fitted PRF against the SPOC PRF of this star blurred by the true pointing (the mean frame)
        ii, jj = np.meshgrid(np.arange(-4, 5), np.arange(-4, 5), indexing="ij")
        prow, pcol = np.round(sr[j]) + ii.ravel(), np.round(sc[j]) + jj.ravel()
        coeffs = tess_prf.prf_coefficients_at(sr[j], sc[j])
        pb = np.zeros(prow.size)
        for a, b in zip(dcol, drow):
            rr, cc = sr[j] + b, sc[j] + a
            tot = tess_prf.evaluate_prf(
                coeffs, (k - (rr - np.round(rr)))[:, None], (k - (cc - np.round(cc)))[None, :]
            ).sum()
            pb += tess_prf.evaluate_prf(coeffs, prow - rr, pcol - cc) / tot
        pb /= dcol.size
        fit = prf.evaluate(pcol - sc[j], prow - sr[j])
        nb = []
        for m in np.flatnonzero((np.hypot(sc - sc[j], sr - sr[j]) < 1.5) & (np.arange(sc.size) != j)):
            rm = (flux[m] - T[m])[good]
            nb.append(f"G{gmag[m]:.1f}@{np.hypot(sc[m] - sc[j], sr[m] - sr[j]):.2f}px:{np.corrcoef(r, rm)[0, 1]:+.2f}")
        rows.append(
            dict(
                G=float(gmag[j]),
                column=float(sc[j]),
                row=float(sr[j]),
                flux=float(T[j][good].mean()),
                phase=(float(sc[j] - np.round(sc[j])), float(sr[j] - np.round(sr[j]))),
                mean_bias=float(flux[j][good].mean() / T[j][good].mean() - 1),
                median_abs_rel=float(np.median(np.abs(flux[j][good] / T[j][good] - 1))),
                p2p_over_err=float(np.std(np.diff(r)) / np.sqrt(2) / np.median(e)),
                z_std=float(np.std(z)),
                lag1=float(np.corrcoef(zc[:-1], zc[1:])[0, 1]),
                r2_offsets=r2(np.column_stack([one, c1, c2, c1**2, c1 * c2, c2**2])),
                r2_background=r2(np.column_stack([one, bkg[good]])),
                r2_slow=float(1 - np.sum((zc - sm) ** 2) / np.sum(zc**2)),
                prf_ls_gain=float(np.sum(fit * pb) / np.sum(fit * fit)),
                neighbours=" ".join(nb),
            )
        )
    return rows


def print_per_star(rows):
    print(
        f"{'G':>6} {'phase':>13} {'F_true':>7} {'bias':>7} {'med|r|':>7} {'p2p/e':>6} {'std z':>6} {'lag1':>5} "
        f"{'R2off':>5} {'R2bkg':>5} {'R2slow':>6} {'PRFgain':>7}  neighbours<1.5px (G@sep: corr of flux errors)"
    )
    for r in rows:
        print(
            f"{r['G']:6.2f} ({r['phase'][0]:+.2f},{r['phase'][1]:+.2f}) {r['flux']:7.0f} {r['mean_bias']:+7.4f} "
            f"{r['median_abs_rel']:7.4f} {r['p2p_over_err']:6.2f} {r['z_std']:6.2f} {r['lag1']:5.2f} {r['r2_offsets']:5.2f} "
            f"{r['r2_background']:5.2f} {r['r2_slow']:6.2f} {r['prf_ls_gain']:7.4f}  {r['neighbours']}"
        )


def prf_truth_metrics(d, catalog, truth):
    """Part 1 figures: core rms error of the fitted PRF vs the SPOC PRF at the field centre
    (r < 1.5 px, relative to the peak), mean-frame flux error of isolated G < 15 stars, dropped sources."""
    from workflow_lib.data import tess_prf
    from workflow_lib.lfd.prf import PRFModel

    m = PRFModel.load(d / "prf.npz")
    sc = np.asarray(catalog["column"], float)
    sr = np.asarray(catalog["row"], float)
    coeffs = tess_prf.prf_coefficients_at(float(np.median(sr)), float(np.median(sc)))
    g = np.arange(-1.5, 1.5001, 0.1)
    X, Y = np.meshgrid(g, g)
    k = np.arange(-8, 9)
    norm = tess_prf.evaluate_prf(coeffs, k[:, None].astype(float), k[None, :].astype(float)).sum()
    true = tess_prf.evaluate_prf(coeffs, Y, X) / norm
    fit = m.evaluate(X, Y)
    core = np.hypot(X, Y) < 1.5
    gmag = np.asarray(catalog["phot_g_mean_mag"], float)
    neg = ~np.isfinite(np.asarray(m.source_flux, float))
    return {
        "prf_core_rms_rel_peak": float(np.sqrt(np.mean((fit - true)[core] ** 2)) / true.max()),
        "prf_dropped_sources": int(neg.sum()),
        "prf_dropped_brighter_G16": int((neg & (gmag < 16)).sum()),
    }


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
    return {
        "koi608_true_depth": float(true_depth),
        "koi608_depth": float(depth),
        "koi608_depth_ratio": float(depth / true_depth),
        "koi608_bright_dip_sigma": float(dip),
        "koi608_n_in_eclipse": int(ecl.sum()),
    }


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
    from workflow_lib.lfd.geometry import source_pixel_pairs

    t0 = _time.perf_counter()
    src, pix, dx, dy = source_pixel_pairs(sc, sr, pc, pr, 3.0)
    s2 = np.sqrt(2) * 0.9
    frac = lambda d: 0.5 * (erf((d + 0.5) / s2) - erf((d - 0.5) / s2))  # noqa: E731
    S = sp.csr_matrix((frac(dx) * frac(dy), (pix, src)), shape=(pc.size, nsrc))
    S.sort_indices()
    B = geometry.background_design(pc, pr, 0)
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
    ddx, ddy = geometry.scene_offsets(S, pc, pr, sc, sr)
    basis, tb = motion.motion_factors(mm, ddx, ddy, np.linspace(-1, 1, ntime))
    res = solve.source_flux(
        data,
        err,
        S,
        B,
        mu,
        sig,
        motion_basis=basis,
        motion_time=tb,
        method="pcg",
        threads=threads,
        time_chunk=max(1, ntime // threads),
    )
    return {
        "ffi_npix": int(pc.size),
        "ffi_nsrc": nsrc,
        "ffi_S_nnz": int(S.nnz),
        "ffi_setup_s": res["setup_seconds"],
        "ffi_s_per_frame": res["solve_seconds"] / ntime,
        "ffi_pcg_iter_per_frame": res["pcg_iterations"] / ntime,
        "ffi_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def targets_of(out: dict) -> dict:
    """The issue's LFD accuracy targets (a-d) as name -> bool."""
    t = {
        "a) isolated G<15 median rel. flux error < 1%": out["motion_median_rel_err_isolated"] < 0.01,
        "a) p2p scatter within 20% of injected noise": abs(out["motion_p2p_over_err_isolated"] - 1) < 0.2,
        "c) motion lowers constant-star rms >= 3x": out["relrms_ratio_static_over_motion"] >= 3,
        "d) z std in [0.8, 1.5]": 0.8 <= out["motion_z_std_constant"] <= 1.5,
    }
    if "koi608_depth_ratio" in out:
        t["b) KOI-608 faint depth within 10%"] = abs(out["koi608_depth_ratio"] - 1) < 0.1
        t["b) KOI-608 bright no dip > 3 sigma"] = abs(out["koi608_bright_dip_sigma"]) < 3
    return t


def _print(title, out, targets):
    print(f"==== {title}")
    print(json.dumps(out, indent=1, default=float))
    for k, v in targets.items():
        print(f"{'MET    ' if v else 'NOT MET'}  {k}")


def main(argv=None):
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40x40 px x 480 cadences instead of the default field")
    ap.add_argument("--seed", type=int, default=1, help="synthetic seed (the default run's synth_a is 1)")
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="several synthetic seeds in turn, with a summary table (e.g. --seeds 1 2: the default run's synth_a, synth_b)",
    )
    ap.add_argument("--per-star", action="store_true", help="also: per-star diagnostics of the target-a sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--true-prf", action="store_true", help="also: the scene from the true SPOC PRF (motion + solve only)"
    )
    ap.add_argument("--ffi", action="store_true", help="also: the Kepler-FFI-channel scale test")
    ap.add_argument("--ffi-only", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the chain's files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.ffi_only:
        out = ffi_scale_test(threads=args.threads)
        _print(
            "FFI scale",
            out,
            {
                "FFI < 1 s per frame": out["ffi_s_per_frame"] < 1,
                "FFI peak memory < 1 GB": out["ffi_peak_rss_mb"] < 1024,
            },
        )
        return
    seeds = args.seeds or [args.seed]
    summary = {}
    for seed in seeds:
        sim = {"seed": seed}
        if args.quick:
            sim.update(n_rows=40, n_cols=40, n_cadences=480)
        with tempfile.TemporaryDirectory() as tmp:
            wd = Path(args.workdir) / f"seed{seed}" if (args.workdir and len(seeds) > 1) else (args.workdir or tmp)
            out = run_chain(sim, wd, threads=args.threads, per_star=args.per_star)
        rows = out.pop("per_star", None)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tg = targets_of(out)
        tg["LFD chain < 90 s per field"] = out["lfd_total_s"] < 90
        _print(f"REAL chain (edge -> fitted PRF -> motion -> solve), synthetic {sim}", out, tg)
        if rows is not None:
            print(f"---- per isolated bright star (target a sample), seed {seed}")
            print_per_star(rows)
        summary[seed] = (out, tg)
    if len(seeds) > 1:
        keys = [
            ("n_isolated_bright", "%d"),
            ("motion_median_rel_err_isolated", "%.4f"),
            ("motion_p2p_over_err_isolated", "%.3f"),
            ("paper_p2p_over_err_isolated", "%.3f"),
            ("relrms_ratio_static_over_motion", "%.2f"),
            ("relrms_ratio_static_over_paper", "%.2f"),
            ("motion_z_std_constant", "%.3f"),
            ("koi608_depth_ratio", "%.3f"),
            ("koi608_bright_dip_sigma", "%.2f"),
        ]
        print("==== summary over seeds")
        print(f"{'':34s}" + "".join(f"{'seed ' + str(s_):>12s}" for s_ in seeds))
        for k, fmt in keys:
            print(
                f"{k:34s}"
                + "".join(f"{(fmt % summary[s_][0][k]) if k in summary[s_][0] else '-':>12s}" for s_ in seeds)
            )
        for t in summary[seeds[0]][1]:
            print(f"{t[:34]:34s}" + "".join(f"{('MET' if summary[s_][1].get(t) else 'NOT MET'):>12s}" for s_ in seeds))
    sim = {"seed": seeds[-1]}
    if args.quick:
        sim.update(n_rows=40, n_cols=40, n_cadences=480)
    if args.true_prf:
        out2 = run_synthetic(sim, threads=args.threads)
        _print(f"TRUE-PRF scene (motion + solve only), synthetic {sim}", out2, targets_of(out2))
    if args.ffi:
        out3 = ffi_scale_test(threads=args.threads)
        _print(
            "FFI scale",
            out3,
            {
                "FFI < 1 s per frame": out3["ffi_s_per_frame"] < 1,
                "FFI peak memory < 1 GB": out3["ffi_peak_rss_mb"] < 1024,
            },
        )


if __name__ == "__main__":
    main()
