"""Where does the excess noise of bright LFD light curves come from? (issue 12, target T2)

    python benchmarks/residual_sources.py /tmp/rs/scene_*          # scene directories of a --workdir
    python benchmarks/residual_sources.py /tmp/rs/scene_* --gmax 13 --window 101

Reads the scene directories that ``benchmarks/randomized_scenes.py --workdir`` leaves (truth.zarr,
cube.zarr, lfd.zarr, motion.npz) and, for every isolated constant star brighter than ``--gmax`` (the
benchmark's own selection: constant, not in a pair, >= 1.5 px inside, < 5 % foreign light in its 3 x 3
aperture), takes the normalised residual z = (F - T) / flux_err on the cadences CDPP uses, high-passed by a
``--window``-cadence running mean (as CDPP's Savitzky-Golay filter removes slow trends; 101 = 2.1 d at 30 min).
Printed per star and as medians: std(z) (1 = the white noise flux_err predicts), its lag-1 autocorrelation,
and the fraction of its variance explained (R^2, same high-pass on the predictors) by

* ``offsets``: the measured scene offset (the motion model's ``scene_offset_column/row``) and its squares and
  product (what the offset decorrelation should already remove);
* ``drift``: the same of the true pointing offset (truth ``drift_column/row``);
* ``missed``: true minus measured offset (pointing the motion model did not see);
* ``sky``: the true sky level (scattered light);
* ``wing``: the flux solve's per-cadence wing-term scale;
* ``slope(t)``: a linear response to the measured offset whose slope changes slowly along the run (offsets
  times 1, t, t^2): the signature of a flux error that is a smooth but not quadratic function of where the
  star sits on the pixel grid (docs/VALIDATION.md, "The bright stars' excess noise").

Low R^2 everywhere with std(z) > 1 and lag-1 > 0 means a correlated error none of these carries.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter1d

sys.path.insert(0, str(Path(__file__).resolve().parent))

from randomized_scenes import inside_cutout, isolated_constant  # noqa: E402

from workflow_lib.core.quality import DEFAULT_CDPP_BITMASK  # noqa: E402


def high_pass(x: np.ndarray, window: int) -> np.ndarray:
    """``x`` minus its ``window``-sample running mean (along axis 0)."""
    return x - uniform_filter1d(x, window, axis=0, mode="nearest")


def explained_fraction(residual, predictors, window: int) -> float:
    """R^2 of the least-squares fit of the high-passed ``residual`` by the high-passed ``predictors`` (+ a constant)."""
    r = high_pass(np.asarray(residual, float), window)
    X = high_pass(np.column_stack([np.asarray(p, float) for p in predictors]), window)
    X = np.column_stack([np.ones(r.size), X])
    b = np.linalg.lstsq(X, r, rcond=None)[0]
    return float(1.0 - np.var(r - X @ b) / np.var(r))


def quadratic(x, y) -> list[np.ndarray]:
    return [x, y, x * x, y * y, x * y]


def drifting_slope(x, y) -> list[np.ndarray]:
    """The offsets times 1, t and t^2 (t from -1 to 1 over the series): a slowly changing linear response."""
    t = np.linspace(-1.0, 1.0, len(x))
    return [x, y, x * t, y * t, x * t * t, y * t * t]


def scene_rows(d: Path, gmax: float, window: int) -> list[tuple]:
    """(scene, G, std z, lag-1, R^2 offsets, drift, missed, sky, wing, slope(t)) per isolated constant star of ``d``."""
    import xarray as xr

    truth = xr.open_zarr(d / "truth.zarr").load()
    cube = xr.open_zarr(d / "cube.zarr")
    lfd = xr.open_zarr(d / "lfd.zarr").load()
    good = (np.asarray(cube["quality"].values).astype(np.int64) & DEFAULT_CDPP_BITMASK) == 0
    r0, c0 = float(cube["row"].values[0]), float(cube["column"].values[0])
    nr, nc = cube.sizes["row"], cube.sizes["column"]
    trow = np.asarray(truth["row"].values, float) - r0
    tcol = np.asarray(truth["column"].values, float) - c0
    kind = np.array([str(k) for k in truth["kind"].values])
    gmag = np.asarray(truth["phot_g_mean_mag"].values, float)
    inside = inside_cutout(trow, tcol, nr, nc)
    flux0 = np.asarray(truth["flux0"].values, float)
    iso = isolated_constant(kind, np.asarray(truth["pair"].values), inside, trow, tcol, flux0) & (gmag < gmax)
    with np.load(d / "motion.npz") as z:
        cx, cy = np.asarray(z["scene_offset_column"], float), np.asarray(z["scene_offset_row"], float)
    tx, ty = np.asarray(truth["drift_column"].values, float), np.asarray(truth["drift_row"].values, float)
    sky = np.asarray(truth["background"].values, float)
    wing = np.asarray(lfd["wing_scale"].values, float) if "wing_scale" in lfd else np.ones(sky.size)
    pos = {int(s): i for i, s in enumerate(np.asarray(lfd["source_id"].values))}
    rows = []
    for k in np.flatnonzero(iso):
        i = pos.get(int(truth["source_id"].values[k]))
        if i is None:
            continue
        F = np.asarray(lfd["flux"].values[i], float)
        E = np.asarray(lfd["flux_err"].values[i], float)
        ok = good & np.isfinite(F) & np.isfinite(E) & np.isfinite(cx) & np.isfinite(cy) & np.isfinite(wing)
        if ok.sum() <= window:
            continue
        z = (F - np.asarray(truth["flux"].values[k], float))[ok] / E[ok]
        zh = high_pass(z, window)
        r2 = [
            explained_fraction(z, quadratic(cx[ok], cy[ok]), window),
            explained_fraction(z, quadratic(tx[ok], ty[ok]), window),
            explained_fraction(z, [tx[ok] - cx[ok], ty[ok] - cy[ok]], window),
            explained_fraction(z, [sky[ok]], window),
            explained_fraction(z, [wing[ok]], window),
            explained_fraction(z, drifting_slope(cx[ok], cy[ok]), window),
        ]
        rows.append((d.name, gmag[k], float(np.std(zh)), float(np.corrcoef(zh[1:], zh[:-1])[0, 1]), *r2))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenes", nargs="+", type=Path, help="scene directories of a randomized_scenes.py --workdir")
    ap.add_argument("--gmax", type=float, default=13.0, help="stars brighter than this true G (default 13)")
    ap.add_argument("--window", type=int, default=101, help="high-pass window [cadences] (default 101)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    rows = [r for d in args.scenes for r in scene_rows(d, args.gmax, args.window)]
    head = ("scene", "G", "std z", "lag-1", "R2 offsets", "R2 drift", "R2 missed", "R2 sky", "R2 wing", "R2 slope(t)")
    print(" ".join(f"{h:>10}" for h in head))
    for r in rows:
        print(f"{r[0]:>10} " + " ".join(f"{x:10.3f}" for x in r[1:]))
    if rows:
        a = np.array([r[1:] for r in rows], float)
        for name, f in (("median", np.median), ("16 %", lambda x, axis: np.percentile(x, 16, axis=axis)),
                        ("84 %", lambda x, axis: np.percentile(x, 84, axis=axis))):  # fmt: skip
            print(f"{name:>10} " + " ".join(f"{x:10.3f}" for x in f(a, axis=0)))
        print(f"{len(rows)} stars from {len(args.scenes)} scenes")


if __name__ == "__main__":
    main()
