"""Survey mode: can a tile's scene offsets be measured on its most informative pixels only? (issue 11, cost)

The ``scene_offsets`` step fits the mean-frame scene's spatial derivatives to every frame (Gauss-Newton,
``workflow_lib.lfd.motion.measure_field_offsets``); its cost grows with the pixels used. Sky pixels far
from every star carry almost no information on a common shift. ``lfd.motion.offset_info_fraction`` keeps
the most informative pixels that hold that fraction of the scene's Fisher information
(``offset_information_pixels``). This benchmark measures, on the tiles of finished synthetic survey runs
(``benchmarks/survey_scale.py`` output; the synthetic CCD moves by a known drift, ``truth.zarr``), for each
fraction and in one run:

* the pixels used and the CPU seconds of the offset measurement (process time; ratio to all pixels);
* the rms error [px] of the offsets against the injected drift (both re-centred on the same good
  cadences) and its ratio to the all-pixel measurement;
* the median reported 1-sigma error and the rms difference from the all-pixel offsets in units of it.

    OPENBLAS_NUM_THREADS=1 python benchmarks/survey_offset_pixels.py --ccd /tmp/ss256/results/survey-scale/s0001-4-2
    python benchmarks/survey_offset_pixels.py --ccd DIR1 --ccd DIR2 --fractions 1 0.99 0.95 --json out.json

Numbers and the choice of the default: docs/SURVEY.md, "Scene offsets on the informative pixels".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tile_rows(ccd: Path, tile: str, fractions, params: dict) -> list[dict]:
    """One tile's offsets for every fraction, scored against the CCD's injected drift."""
    import xarray as xr

    from workflow_lib.lfd.motion import measure_field_offsets, motion_params
    from workflow_lib.steps.lfd import load_field_scene, scene_series

    tdir = ccd / "tiles" / tile
    f = load_field_scene(tdir / "cube.zarr", tdir / "catalog.ecsv", tdir / "lfd" / "prf_model.npz")
    series = scene_series(f)
    series = tuple(np.asarray(a) if not hasattr(a, "tocsr") else a for a in series)  # load the cube once
    truth = xr.open_zarr(ccd / "truth.zarr")
    tc = np.asarray(truth["drift_column"].values, float)
    tr = np.asarray(truth["drift_row"].values, float)
    out, ref = [], None
    for frac in fractions:
        p = motion_params({**params, "offset_info_fraction": float(frac)})
        t0 = time.process_time()
        res = measure_field_offsets(*series, f["model"], p, name=f"{tile} f={frac}")
        cpu = time.process_time() - t0
        cx, cy = res["column"], res["row"]
        good = res["good"] & np.isfinite(cx) & np.isfinite(cy)
        if ref is not None:
            good &= ref["good"]
        else:
            ref = res

        def centred(a, g=good):
            return a - a[g].mean()

        err = np.sqrt(np.mean(((centred(cx) - centred(tc)) ** 2 + (centred(cy) - centred(tr)) ** 2)[good]))
        sig = float(np.nanmedian(np.hypot(res["column_err"], res["row_err"])[good]))
        dref = np.hypot(centred(cx) - centred(ref["column"]), centred(cy) - centred(ref["row"]))[good]
        out.append(
            dict(
                tile=tile,
                fraction=float(frac),
                cpu_s=cpu,
                n_pixels=int(res.get("n_pixels", -1)),
                rms_truth=float(err),
                median_err=sig,
                rms_vs_all_in_err=float(np.sqrt(np.mean(dref**2)) / sig) if sig > 0 else float("nan"),
            )
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def summary(rows: list[dict], fractions) -> str:
    tiles = sorted({r["tile"] for r in rows})
    by = {(r["tile"], r["fraction"]): r for r in rows}
    lines = [
        f"{len(tiles)} tiles; medians over tiles (16-84 % range), ratios to all pixels per tile",
        "| fraction | pixels / all | CPU / all | rms vs drift [px] | rms / all-pixel rms | median 1-sigma [px] "
        "| rms(subset - all) / 1-sigma |",
        "|---|---|---|---|---|---|---|",
    ]
    f0 = float(fractions[0])

    def q(vals):
        v = np.asarray(vals, float)
        return f"{np.median(v):.3g} ({np.percentile(v, 16):.3g}-{np.percentile(v, 84):.3g})"

    for frac in fractions:
        rs = [by[(t, float(frac))] for t in tiles]
        r0 = [by[(t, f0)] for t in tiles]
        lines.append(
            f"| {frac:g} | {q([a['n_pixels'] / b['n_pixels'] for a, b in zip(rs, r0)])} "
            f"| {q([a['cpu_s'] / b['cpu_s'] for a, b in zip(rs, r0)])} | {q([a['rms_truth'] for a in rs])} "
            f"| {q([a['rms_truth'] / b['rms_truth'] for a, b in zip(rs, r0)])} | {q([a['median_err'] for a in rs])} "
            f"| {q([a['rms_vs_all_in_err'] for a in rs])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ccd", type=Path, action="append", required=True, help="a finished survey run's CCD directory")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.99, 0.95, 0.9])
    ap.add_argument("--tiles", nargs="*", help="tile ids (default: every tile with a PRF model)")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args(argv)
    if args.fractions[0] != 1.0:
        args.fractions = [1.0, *args.fractions]
    rows = []
    for ccd in args.ccd:
        tiles = args.tiles or sorted(
            d.name for d in (ccd / "tiles").iterdir() if (d / "lfd" / "prf_model.npz").exists()
        )
        for tile in tiles:
            rows += tile_rows(ccd, tile, args.fractions, {})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(summary(rows, args.fractions))


if __name__ == "__main__":
    main()
