"""Sweep a CPM or deblend setting on the kept scenes of a randomized-scene run (issues 11 and 12).

    python benchmarks/cpm_scene_sweep.py --from /tmp/rs_full/wA --scenes 0-9 \
        --set n_predictors=64 --workdir /tmp/rs_L64
    python benchmarks/cpm_scene_sweep.py --stage deblend --from /tmp/rs_full/wB --scenes 10-19 \
        --set faint_neighbour_snr=20 --workdir /tmp/rs_snr20
    python benchmarks/randomized_scenes.py --workdir /tmp/rs_L64 --scenes 10 --seed 0 --json L64.json

``benchmarks/randomized_scenes.py --workdir`` keeps each scene's files (cube, catalog, LFD products, CPM
products, ``run.json``). This script makes a new work directory whose scenes link the kept scene's inputs
and products (nothing is copied or changed) and reruns one stage there (``--stage``: ``cpm``, or ``deblend``
on the kept CPM), with the scene's config plus ``--set <section>.<key>=<value>`` overrides (section = the
stage's: ``cpm`` / ``deblend``); ``run.json`` gets the stage's new CPU time. The CPM stage drops the kept
deblended product (it depends on the CPM settings), so scoring reruns it with the new CPM. Scoring the new
work directory with ``randomized_scenes.py --workdir`` then compares the changed setting with the same LFD
and 3x3 baselines, scene by scene (LFD figures are identical by construction: a check that the two runs
scored the same stars).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import scaling  # noqa: E402  (run_stage: the step functions on files)

#: files each stage rewrites (the rest of a scene directory is linked); run.json / config.json always
STAGE_OUTPUTS = {
    "cpm": ("cpm.zarr", "cpm_lc.zarr", "raw_lc.zarr", "cpm_fits", "deb_lc.zarr"),
    "deblend": ("deb_lc.zarr",),
}
#: the config section each stage's --set keys go to
STAGE_SECTION = {"cpm": "cpm", "deblend": "deblend"}


def _value(text: str):
    """A --set value: JSON if it parses (numbers, true/false, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _scene_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def sweep_scene(src: Path, dst: Path, overrides: dict, threads: int = 1, stage: str = "cpm") -> float:
    """Link ``src``'s inputs into ``dst``, rerun ``stage`` with ``overrides``; return its CPU seconds."""
    run = json.loads((src / "run.json").read_text())
    needs = ("gaia", "cpm") + (("flux_solve", "deblend") if stage == "deblend" else ())
    if any(s in run["errors"] for s in needs) or (stage == "deblend" and "deblend" not in run["cpu_s"]):
        raise RuntimeError(f"{src}: the kept run has no {stage} result to compare ({run['errors']})")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        keep = p.name not in (*STAGE_OUTPUTS[stage], "run.json", "config.json") and p.suffix != ".traceback"
        if keep and not (dst / p.name).exists():
            (dst / p.name).symlink_to(p.resolve())
    cfg = json.loads((src / "config.json").read_text())
    section = STAGE_SECTION[stage]
    cfg[section] = {**cfg.get(section, {}), **overrides}
    (dst / "config.json").write_text(json.dumps(cfg, default=str))
    if stage == "cpm":  # the kept deblended product used the old CPM: scoring reruns it (a late stage)
        run["cpu_s"].pop("deblend", None)
        run["errors"].pop("deblend", None)
    c0 = time.process_time()
    scaling.run_stage(stage, dst, 0, 0, int(run["seed"]), threads)  # side / cadences: the download's only
    run["cpu_s"][stage] = time.process_time() - c0
    run[f"{stage}_overrides"] = overrides
    (dst / "run.json").write_text(json.dumps(run))
    return run["cpu_s"][stage]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="work directory of a randomized_scenes.py run")
    ap.add_argument("--scenes", required=True, help="seeds, e.g. 0-9")
    ap.add_argument("--stage", choices=sorted(STAGE_OUTPUTS), default="cpm", help="the stage to rerun")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the stage (repeatable)"
    )
    ap.add_argument("--workdir", required=True, help="new work directory (scored by randomized_scenes.py)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, sep, val = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.removeprefix(STAGE_SECTION[a.stage] + ".")] = _value(val)
    for seed in _scene_range(a.scenes):
        name = f"scene_{seed:04d}"
        if (Path(a.workdir) / name / "run.json").exists():
            print(f"{name}: done before", flush=True)
            continue
        cpu = sweep_scene(Path(a.src) / name, Path(a.workdir) / name, overrides, a.threads, a.stage)
        print(f"{name}: {a.stage} {overrides} {cpu:.1f} CPU-s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
