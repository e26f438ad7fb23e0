"""Survey mode against the truth: the merged light curves of a synthetic CCD run scored source by source.

A ``benchmarks/survey_scale.py`` run directory holds the synthetic CCD's injected fluxes (``truth.zarr``:
every star's noiseless flux per cadence, before the CCD's PRF, drift and noise) and the merged per-CCD sets
(``merged/lfd.zarr``, ``merged/cpm_default.zarr``). For every catalog source measured in a set, on the
cadences with QUALITY 0 and a finite flux:

* LFD absolute flux error: median over cadences of F / T - 1 (T the true flux; no rescaling);
* LFD residual CDPP [ppm]: the 1-h CDPP proxy (``workflow_lib.metrics``) of 1 + (F - T) / mean(T), i.e. the
  noise and systematics the light curve adds to the truth, normalised by the true mean flux;
* CPM 1-h CDPP [ppm] of the de-trended set (``cpm_default_cdpp_1h`` of ``merged/sources.ecsv``: its own
  median normalisation, as the pipeline reports it);
* counts of sources with no finite flux.

Printed per G bin (< 13, 13-15, 15-17, 17-19): the number of sources and the median and 16-84 % range of each
figure. ``--compare DIR``: another run of the same CCD (e.g. another tile size) scored on the same sources, and
the per-source ratios (DIR / this) as median and 16-84 %.

    python benchmarks/survey_accuracy.py /tmp/ss512c
    python benchmarks/survey_accuracy.py /tmp/ss512c --compare /tmp/ss512t256 --json acc.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from survey_scale import CCD, RUN  # noqa: E402  (the run directory's layout)

from workflow_lib.metrics import cdpp_hours  # noqa: E402

BINS = [(-np.inf, 13.0, "G<13"), (13.0, 15.0, "13-15"), (15.0, 17.0, "15-17"), (17.0, 19.0, "17-19")]


def score(run_dir: Path, max_per_bin: int | None = None, seed: int = 0) -> dict:
    """Per source (Gaia id -> dict): G, LFD flux error, LFD residual CDPP, CPM CDPP."""
    ccd = Path(run_dir) / "results" / RUN / CCD
    truth = xr.open_zarr(ccd / "truth.zarr", consolidated=False)
    lfd = xr.open_zarr(ccd / "merged" / "lfd.zarr", consolidated=False)
    table = Table.read(ccd / "merged" / "sources.ecsv")
    t_ids = np.asarray(truth["source_id"].values, np.int64)
    l_ids = np.asarray(lfd["source_id"].values, np.int64)
    t_pos = {int(s): i for i, s in enumerate(t_ids)}
    g = np.asarray(truth["phot_g_mean_mag"].values, float)
    # the sources scored: measured by LFD, in the truth, in a G bin (optionally a fixed random subset per bin)
    rng = np.random.default_rng(seed)
    keep = []
    for lo, hi, _ in BINS:
        idx = [i for i, s in enumerate(l_ids) if int(s) in t_pos and lo <= g[t_pos[int(s)]] < hi]
        if max_per_bin and len(idx) > max_per_bin:
            idx = sorted(rng.choice(idx, max_per_bin, replace=False).tolist())
        keep += idx
    keep = np.array(sorted(keep), int)
    time = np.asarray(lfd["time"].values, float)
    good_t = np.asarray(lfd["quality"].values) == 0
    F = np.asarray(lfd["flux"].isel(source=keep).values, float)
    T = np.asarray(truth["flux"].values, float)[[t_pos[int(s)] for s in l_ids[keep]]]
    cpm = {int(s): float(c) for s, c in zip(table["source_id"], table["cpm_default_cdpp_1h"])}
    out = {}
    for j, i in enumerate(keep):
        sid = int(l_ids[i])
        ok = good_t & np.isfinite(F[j]) & np.isfinite(T[j])
        rec = {"g": float(g[t_pos[sid]]), "all_nan": bool(not ok.any())}
        if ok.sum() > 20:
            tm = float(np.mean(T[j, ok]))
            rec["flux_error"] = float(np.median(F[j, ok] / T[j, ok]) - 1.0)
            rec["residual_cdpp"] = float(cdpp_hours(time[ok], 1.0 + (F[j, ok] - T[j, ok]) / tm, 1.0))
        rec["cpm_cdpp"] = cpm.get(sid, float("nan"))
        out[sid] = rec
    return out


def _q(values) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if not v.size:
        return "-"
    lo, med, hi = np.percentile(v, [16, 50, 84])
    return f"{med:.4g} ({lo:.3g}..{hi:.3g})"


def summarise(a: dict, b: dict | None = None, names=("this", "other")) -> tuple[str, dict]:
    lines, figs = [], {}
    head = "| G | n | LFD flux error, median (16-84 %) | LFD residual 1-h CDPP [ppm] | CPM 1-h CDPP [ppm] | all-NaN |"
    if b:
        head = head[:-1] + f" ratio {names[1]}/{names[0]}: |abs flux error| | residual CDPP | CPM CDPP |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for lo, hi, name in BINS:
        ids = [s for s, r in a.items() if lo <= r["g"] < hi]
        ra = [a[s] for s in ids]
        f = {
            "n": len(ids),
            "flux_error": [r.get("flux_error", np.nan) for r in ra],
            "residual_cdpp": [r.get("residual_cdpp", np.nan) for r in ra],
            "cpm_cdpp": [r["cpm_cdpp"] for r in ra],
            "all_nan": sum(r["all_nan"] for r in ra),
        }
        row = (
            f"| {name} | {f['n']} | {_q(f['flux_error'])} | {_q(f['residual_cdpp'])} | {_q(f['cpm_cdpp'])} "
            f"| {f['all_nan']} |"
        )
        if b:
            both = [s for s in ids if s in b]

            def ratio(key, absolute=False, both=both):
                out = []
                for s in both:
                    x, y = a[s].get(key, np.nan), b[s].get(key, np.nan)
                    if absolute:
                        x, y = abs(x), abs(y)
                    out.append(y / x if x else np.nan)
                return out

            f["ratios"] = {
                "abs_flux_error": ratio("flux_error", True),
                "residual_cdpp": ratio("residual_cdpp"),
                "cpm_cdpp": ratio("cpm_cdpp"),
            }
            row += " " + " | ".join(_q(v) for v in f["ratios"].values()) + " |"
        lines.append(row)
        figs[name] = {
            k: (v if k in ("n", "all_nan") else {kk: _q(vv) for kk, vv in v.items()} if k == "ratios" else _q(v))
            for k, v in f.items()
        }
    return "\n".join(lines), figs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a survey_scale.py run directory (synthetic CCD)")
    ap.add_argument("--compare", type=Path, help="another run of the same CCD, scored on the same sources")
    ap.add_argument("--max-per-bin", type=int, default=400, help="random sources per G bin (0: all)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args(argv)
    sa = score(a.run, a.max_per_bin or None)
    sb = score(a.compare, a.max_per_bin or None) if a.compare else None
    text, figs = summarise(sa, sb, (a.run.name, a.compare.name if a.compare else ""))
    print(f"{a.run}" + (f" vs {a.compare}" if a.compare else ""))
    print(text)
    if a.json:
        a.json.write_text(json.dumps(figs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
