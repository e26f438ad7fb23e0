"""Survey mode: is the per-tile LFD motion model as good as a CCD-level one? (issue 11, item 2)

Velocity aberration and pointing jitter move the whole CCD almost rigidly, so one motion fit per CCD
from all tiles could replace the per-tile fits. The synthetic CCD (workflow_lib/data/synthetic_ffi.py)
moves rigidly by a known drift + jitter (``truth.zarr``: ``drift_column``/``drift_row``). The run uses
``survey.motion: ccd`` (each tile's ``scene_offsets``, the CCD's ``ccd_motion`` fit, every tile's motion
model and flux solve with the CCD model at its centre). For every tile this prints:

* the rms error [px] of its own measured scene offset per cadence (``lfd/scene_offsets.npz``: the same
  Gauss-Newton c_t a per-tile motion model measures) against the injected drift, both re-centred on the
  same cadences, its gain and its rms difference from the mean of the other tiles;
* the same for the CCD consensus (the plain mean of all tiles' offsets) and for the CCD-level fit at the
  tile centre (``motion/ccd_motion.npz``: robust, error-weighted, flagged tiles out; also refitted here
  with the differential term forced on three or more tiles, "diff3"), with the fit's per-tile gains and flags;
* the flux consequence on the tile's core stars (G < --gmax, no neighbour within 2 px brighter than 10 %
  of it): median over stars of rms((F - a T) / err) (T the true flux, a a per-star scale) for the
  per-tile motion model (refitted here with the tile's own offsets: ``survey.motion: tile``), the CCD mean
  and the true drift put into that per-tile model, and the pipeline's CCD-fit light curves; and the rms of
  (F_tile - F_other) / err between the per-tile and the other solutions (in units of the noise).

    python benchmarks/survey_motion.py --seed 3              # runs the CI survey config (~10 min on 2 cores)
    python benchmarks/survey_motion.py --read results/ci-survey/s0001-4-2   # a finished ccd-mode run's CCD directory
    python benchmarks/survey_motion.py --read ... --no-solve # offsets only (no flux re-solves)

Numbers and the conclusion: docs/SURVEY.md, "Motion: per tile or per CCD".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CI_CONFIG = REPO / ".test" / "config-survey"


#: the CCD measured in docs/SURVEY.md: the CI survey config (128 x 128 px in 4 tiles of 64 px)
CCD_SIZE = {"n_rows": 128, "n_cols": 128}
TILE_SIZE = 64


def tile_ids() -> list[str]:
    n = CCD_SIZE["n_rows"] // TILE_SIZE
    return [f"r{TILE_SIZE * i:04d}c{TILE_SIZE * j:04d}" for i in range(n) for j in range(n)]


def run_ci_survey(workdir: Path, seed: int) -> Path:
    """The CI survey config at ``CCD_SIZE`` with ``survey.motion: ccd`` under snakemake in ``workdir``, up to
    the tiles' LFD light curves (no CPM, merge or pages); returns its CCD directory."""
    import yaml

    shutil.copytree(CI_CONFIG, workdir / "config")
    path = workdir / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for ccd in cfg["ccds"].values():
        ccd["synthetic"].update(CCD_SIZE, seed=seed)
    cfg["survey"].update(tile_size=TILE_SIZE, motion="ccd")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ccd = Path("results") / cfg["run"] / next(iter(cfg["ccds"]))
    targets = [str(ccd / "tiles" / t / "lfd" / "lightcurves.zarr" / "zarr.json") for t in tile_ids()]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    subprocess.run(
        [*cmd, "--configfile", str(path), "--cores", "2", "--quiet", "all", "--", *targets], check=True, env=env
    )
    return workdir / ccd


def tile_offsets(ccd: Path, tile: str):
    """The tile's own measured scene offsets (the scene_offsets step: what its per-tile motion model measures)."""
    with np.load(ccd / "tiles" / tile / "lfd" / "scene_offsets.npz") as z:
        return np.asarray(z["column"], float), np.asarray(z["row"], float)


def ccd_fit_offsets(ccd: Path, tiles: list[str]):
    """The CCD-level fit at each tile centre: the pipeline's (motion/ccd_motion.npz) and a refit of the same
    tile offsets with the differential term fitted from 3 tiles on; plus the pipeline fit's gains and flags."""
    from workflow_lib.survey.motion import fit_ccd_motion, load_ccd_motion, load_tile_offsets

    m = load_ccd_motion(ccd / "motion" / "ccd_motion.npz")
    ids = [str(t) for t in m["tile_ids"]]
    fit = {t: (m["model_column"][ids.index(t)], m["model_row"][ids.index(t)]) for t in tiles}
    rig = fit_ccd_motion(
        {t: load_tile_offsets(ccd / "tiles" / t / "lfd" / "scene_offsets.npz") for t in tiles},
        min_tiles_differential=3,
    )
    rigid = {t: (rig["model_column"][k], rig["model_row"][k]) for k, t in enumerate(tiles)}
    qa = {t: dict(gain=m["gain"][ids.index(t)].tolist(), flagged=bool(m["flagged"][ids.index(t)])) for t in tiles}
    return fit, rigid, qa, bool(m["differential"])


def rms2(dc, dr) -> float:
    """rms of the 2-d offset error sqrt(dc^2 + dr^2) [px]."""
    return float(np.sqrt(np.mean(dc**2 + dr**2)))


def offsets_table(ccd: Path, tiles: list[str], truth, quality):
    """Per tile and for the consensus: rms vs truth and vs the other tiles [px]; the re-centred series."""
    off = {t: tile_offsets(ccd, t) for t in tiles}
    good = quality == 0
    for cx, cy in off.values():
        good &= np.isfinite(cx) & np.isfinite(cy)
    tc = np.asarray(truth["drift_column"].values, float)
    tr = np.asarray(truth["drift_row"].values, float)

    def centred(a):
        return a - a[good].mean()

    tc, tr = centred(tc), centred(tr)
    cen = {t: (centred(cx), centred(cy)) for t, (cx, cy) in off.items()}
    cons = (np.mean([c[0] for c in cen.values()], axis=0), np.mean([c[1] for c in cen.values()], axis=0))
    med = (np.median([c[0] for c in cen.values()], axis=0), np.median([c[1] for c in cen.values()], axis=0))

    def row(name, cx, cy, ox=None, oy=None):
        gx = float(np.sum(cx[good] * tc[good]) / np.sum(tc[good] ** 2))  # gain: c = g x truth + noise
        gy = float(np.sum(cy[good] * tr[good]) / np.sum(tr[good] ** 2))
        return dict(
            tile=name,
            rms_truth=rms2((cx - tc)[good], (cy - tr)[good]),
            rms_truth_col=float(np.sqrt(np.mean((cx - tc)[good] ** 2))),
            rms_truth_row=float(np.sqrt(np.mean((cy - tr)[good] ** 2))),
            gain_col=gx,
            gain_row=gy,
            rms_after_gain=rms2((cx - gx * tc)[good], (cy - gy * tr)[good]),
            rms_others=float("nan") if ox is None else rms2((cx - ox)[good], (cy - oy)[good]),
        )

    rows = []
    for t in tiles:
        others = [u for u in tiles if u != t]
        ox = np.mean([cen[u][0] for u in others], axis=0)
        oy = np.mean([cen[u][1] for u in others], axis=0)
        rows.append(row(t, *cen[t], ox, oy))
    rows.append(row("CCD mean", *cons))
    rows.append(row("CCD median", *med))
    fit, rigid, qa, differential = ccd_fit_offsets(ccd, tiles)
    for name, offs in (("fit", fit), ("diff3", rigid)):
        for t in tiles:
            rows.append(row(f"{name}@{t}", *(centred(np.nan_to_num(v)) for v in offs[t])))
    ctx = dict(
        n_good=int(good.sum()),
        drift_range=float(np.hypot(np.ptp(tc[good]), np.ptp(tr[good]))),
        jitter_rms=float(np.sqrt(np.mean(np.diff(tc[good]) ** 2 + np.diff(tr[good]) ** 2) / 2)),
        ccd_fit_qa=qa,
        differential=differential,
    )
    return rows, ctx, cen, cons, (tc, tr), good


def motion_with_offsets(src: Path, dst: Path, cx, cy) -> Path:
    """A copy of a shift motion-model file whose per-cadence offsets are (cx, cy) (re-centred like the
    tile's own: the mean over the fitted cadences is kept), everything else unchanged."""
    with np.load(src) as z:
        d = {k: z[k] for k in z.files}
    ok = np.isfinite(d["scene_offset_column"])
    own_x, own_y = d["scene_offset_column"][ok], d["scene_offset_row"][ok]
    nx = cx[ok] - cx[ok].mean() + own_x.mean()
    ny = cy[ok] - cy[ok].mean() + own_y.mean()
    d["reg_x"], d["reg_y"] = nx, ny
    for key, v in (("scene_offset_column", nx), ("scene_offset_row", ny)):
        d[key] = np.full(ok.size, np.nan)
        d[key][ok] = v
    np.savez(dst, **d)
    return dst


def solve_params(lc_zarr: Path) -> dict:
    """The run's lfd.solve settings, from the provenance of its light curves; FITS files off."""
    import xarray as xr

    prov = json.loads(xr.open_zarr(lc_zarr).attrs["provenance"])
    p = dict(prov.get("config") or {})
    p["write_fits"] = False
    return p


def core_stars(ccd: Path, tile: str, truth, gmax: float) -> np.ndarray:
    """Source ids of the tile's core stars with G < gmax and no neighbour within 2 px brighter than 10 %."""
    from astropy.table import Table

    cat = Table.read(ccd / "tiles" / tile / "catalog.ecsv")
    sid = np.asarray(cat["source_id"], np.int64)
    g = np.asarray(cat["phot_g_mean_mag"], float)
    c, r = np.asarray(cat["column"], float), np.asarray(cat["row"], float)
    keep = []
    for i in np.flatnonzero(np.asarray(cat["in_core"], bool) & (g < gmax)):
        d = np.hypot(c - c[i], r - r[i])
        near = (d < 2.0) & (d > 0) & (g < g[i] + 2.5)  # 10 % of the flux = 2.5 mag
        if not near.any():
            keep.append(sid[i])
    return np.asarray(keep, np.int64)


def flux_metrics(lc, truth, sids, good, ref=None) -> dict:
    """Median over ``sids`` of rms((F - aT)/err), rms(F/(aT) - 1) [ppm] and, with ``ref`` (another
    light-curve set of the same tile), rms((F - F_ref)/err)."""
    tid = {int(s): i for i, s in enumerate(np.asarray(truth["source_id"].values, np.int64))}
    lid = {int(s): i for i, s in enumerate(np.asarray(lc["source_id"].values, np.int64))}
    F, E = np.asarray(lc["flux"].values, float), np.asarray(lc["flux_err"].values, float)
    T = np.asarray(truth["flux"].values, float)
    R = None if ref is None else np.asarray(ref["flux"].values, float)
    z, rel, dz = [], [], []
    for s in sids:
        if int(s) not in lid or int(s) not in tid:
            continue
        f, e, t = F[lid[int(s)]], E[lid[int(s)]], T[tid[int(s)]]
        m = good & np.isfinite(f) & np.isfinite(e) & (e > 0)
        if m.sum() < 10:
            continue
        a = np.sum(f[m] * t[m]) / np.sum(t[m] ** 2)
        z.append(np.sqrt(np.mean(((f - a * t)[m] / e[m]) ** 2)))
        rel.append(1e6 * np.sqrt(np.mean((f[m] / (a * t[m]) - 1) ** 2)))
        if R is not None:
            dz.append(np.sqrt(np.mean(((f - R[lid[int(s)]])[m] / e[m]) ** 2)))
    out = dict(n=len(z), z_rms=float(np.median(z)) if z else np.nan, rel_ppm=float(np.median(rel)) if rel else np.nan)
    if R is not None:
        out["diff_rms"] = float(np.median(dz)) if dz else np.nan
    return out


def resolve(ccd: Path, tile: str, motion_file: Path, out: Path, params: dict):
    import xarray as xr

    from workflow_lib.steps.lfd import flux_solve_step

    tdir = ccd / "tiles" / tile
    flux_solve_step(
        tdir / "cube.zarr",
        tdir / "catalog.ecsv",
        tdir / "lfd" / "prf_model.npz",
        motion_file,
        out / "lightcurves.zarr",
        None,
        params,
        threads=1,
        diagnostics_npz=out / "diagnostics.npz",
    )
    return xr.open_zarr(out / "lightcurves.zarr").load()


def tile_mode_motion(ccd: Path, tile: str, out: Path) -> Path:
    """The tile's per-tile motion model (``survey.motion: tile``: its own offsets), with the run's settings."""
    from workflow_lib.steps.lfd import motion_model_step

    tdir = ccd / "tiles" / tile
    with np.load(tdir / "lfd" / "motion_model.npz") as z:
        params = dict(json.loads(str(z["provenance"])).get("config") or {})
    motion_model_step(tdir / "cube.zarr", tdir / "catalog.ecsv", tdir / "lfd" / "prf_model.npz", out, params)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--read", type=Path, help="a finished survey.motion=ccd run's CCD directory (results/<run>/<ccd>)")
    ap.add_argument("--seed", type=int, default=3, help="seed of the synthetic CCD (without --read)")
    ap.add_argument("--no-solve", action="store_true", help="offsets only, no flux re-solves")
    ap.add_argument("--gmax", type=float, default=15.0, help="core stars brighter than this G for the flux metrics")
    ap.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    a = ap.parse_args(argv)

    import logging

    import xarray as xr

    logging.getLogger("workflow_lib").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="survey_motion_"))
    ccd = a.read if a.read else run_ci_survey(tmp / "run", a.seed)
    if not (ccd / "motion" / "ccd_motion.npz").is_file():
        raise SystemExit(f"{ccd}: no motion/ccd_motion.npz: run the survey with survey.motion: ccd")
    truth = xr.open_zarr(ccd / "truth.zarr").load()
    tiles = json.loads((ccd / "tiles.json").read_text())["tile_ids"]
    quality = np.asarray(truth["quality"].values)
    rows, ctx, cen, cons, tr, good = offsets_table(ccd, tiles, truth, quality)
    print(
        f"{ccd}: {len(tiles)} tiles, {ctx['n_good']} good cadences; injected drift spans {ctx['drift_range']:.3f} px,"
        f" cadence-to-cadence jitter {1000 * ctx['jitter_rms']:.1f} mpx rms per axis"
    )
    print("CCD fit: differential term " + ("fitted" if ctx["differential"] else "off"))
    for t, q in ctx["ccd_fit_qa"].items():
        print(f"  {t}: CCD-fit gain {q['gain'][0]:.3f} / {q['gain'][1]:.3f}" + ("  FLAGGED" if q["flagged"] else ""))
    print("\nscene offset per cadence vs the injected drift (both re-centred): rms [mpx] (2-d; column, row),")
    print("gain (offset = gain x drift, per axis), rms after the gain [mpx], rms vs the mean of the other tiles [mpx]")
    print("(fit@<tile>: the CCD-level fit at the tile centre; diff3@<tile>: with the differential term on 3+ tiles)")
    print(
        f"{'tile':>17} {'vs truth':>9} {'column':>7} {'row':>7} {'gain col':>8} {'gain row':>8}"
        f" {'after gain':>10} {'vs other tiles':>15}"
    )
    for r in rows:
        print(
            f"{r['tile']:>17} {1000 * r['rms_truth']:9.2f} {1000 * r['rms_truth_col']:7.2f}"
            f" {1000 * r['rms_truth_row']:7.2f} {r['gain_col']:8.3f} {r['gain_row']:8.3f}"
            f" {1000 * r['rms_after_gain']:10.2f} {1000 * r['rms_others']:15.2f}"
        )
    result = {"ccd": str(ccd), "context": ctx, "offsets": rows}
    if not a.no_solve:
        print(
            f"\nflux consequence (core stars G < {a.gmax:g} without bright neighbours within 2 px): median over stars"
        )
        print(
            f"{'tile':>12} {'n':>3} | {'rms z: per tile':>15} {'CCD mean':>8} {'CCD fit':>7} {'truth':>6} |"
            f" {'ppm: per tile':>13} {'CCD fit':>7} {'truth':>6} | {'tile-fit /err':>13} {'tile-truth /err':>15}"
            f" {'fit-truth /err':>14}"
        )
        result["flux"] = []
        for t in tiles:
            src = ccd / "tiles" / t / "lfd"
            params = solve_params(src / "lightcurves.zarr")
            sets = {"fit": xr.open_zarr(src / "lightcurves.zarr").load()}  # the pipeline's: survey.motion ccd
            d = tmp / t / "tile"
            d.mkdir(parents=True, exist_ok=True)
            own = tile_mode_motion(ccd, t, d / "motion_model.npz")
            sets["tile"] = resolve(ccd, t, own, d, params)
            for name, (cx, cy) in (("mean", cons), ("truth", tr)):
                d = tmp / t / name
                d.mkdir(parents=True, exist_ok=True)
                mf = motion_with_offsets(own, d / "motion_model.npz", cx, cy)
                sets[name] = resolve(ccd, t, mf, d, params)
            sids = core_stars(ccd, t, truth, a.gmax)
            m = {k: flux_metrics(v, truth, sids, good) for k, v in sets.items()}
            dc = flux_metrics(sets["tile"], truth, sids, good, ref=sets["fit"])["diff_rms"]
            dt = flux_metrics(sets["tile"], truth, sids, good, ref=sets["truth"])["diff_rms"]
            df = flux_metrics(sets["fit"], truth, sids, good, ref=sets["truth"])["diff_rms"]
            print(
                f"{t:>12} {m['tile']['n']:3d} | {m['tile']['z_rms']:15.3f} {m['mean']['z_rms']:8.3f}"
                f" {m['fit']['z_rms']:7.3f} {m['truth']['z_rms']:6.3f} | {m['tile']['rel_ppm']:13.0f}"
                f" {m['fit']['rel_ppm']:7.0f} {m['truth']['rel_ppm']:6.0f} | {dc:13.3f} {dt:15.3f} {df:14.3f}"
            )
            result["flux"].append({"tile_id": t, **m, "diff_fit": dc, "diff_truth": dt, "diff_fit_truth": df})
        med = {k: float(np.median([f[k]["z_rms"] for f in result["flux"]])) for k in ("tile", "mean", "fit", "truth")}
        result["median_z_rms"] = med
        print(f"{'median':>12}     | {med['tile']:15.3f} {med['mean']:8.3f} {med['fit']:7.3f} {med['truth']:6.3f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
