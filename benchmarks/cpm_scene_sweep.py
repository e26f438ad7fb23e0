"""Sweep one CPM setting on the kept scenes of a randomized-scene run (issue 12 item 1, issue 11 item 6).

    python benchmarks/cpm_scene_sweep.py --from /tmp/rs_full/wA --scenes 0-9 \
        --set n_predictors=64 --set k=... --workdir /tmp/rs_L64
    python benchmarks/randomized_scenes.py --workdir /tmp/rs_L64 --scenes 10 --seed 0 --json L64.json

``benchmarks/randomized_scenes.py --workdir`` keeps each scene's files (cube, catalog, LFD products, CPM
products, ``run.json``). This script makes a new work directory whose scenes link the kept scene's inputs
and LFD products (nothing is copied or changed) and reruns only the ``cpm`` stage there, with the scene's
config plus ``--set cpm.<key>=<value>`` overrides; ``run.json`` gets the new CPM CPU time. Scoring the new
work directory with ``randomized_scenes.py --workdir`` then compares the CPM aperture light curves of the
changed setting with the same LFD and 3x3 baselines, scene by scene (LFD figures are identical by
construction: a check that the two runs scored the same stars).
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

#: files of the CPM stage (rewritten); everything else in a scene directory is linked
CPM_OUTPUTS = ("cpm.zarr", "cpm_lc.zarr", "raw_lc.zarr", "cpm_fits", "run.json", "config.json")


def _value(text: str):
    """A --set value: JSON if it parses (numbers, true/false, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _scene_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def sweep_scene(src: Path, dst: Path, overrides: dict, threads: int = 1) -> float:
    """Link ``src``'s inputs into ``dst``, rerun the CPM stage with ``overrides``; return its CPU seconds."""
    run = json.loads((src / "run.json").read_text())
    if "cpm" in run["errors"] or "gaia" in run["errors"]:
        raise RuntimeError(f"{src}: the kept run has no CPM result to compare ({run['errors']})")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in CPM_OUTPUTS and p.suffix != ".traceback" and not (dst / p.name).exists():
            (dst / p.name).symlink_to(p.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg["cpm"] = {**cfg.get("cpm", {}), **overrides}
    (dst / "config.json").write_text(json.dumps(cfg, default=str))
    c0 = time.process_time()
    scaling.run_stage("cpm", dst, 0, 0, int(run["seed"]), threads)  # side / cadences: the download's only
    run["cpu_s"]["cpm"] = time.process_time() - c0
    run["cpm_overrides"] = overrides
    (dst / "run.json").write_text(json.dumps(run))
    return run["cpu_s"]["cpm"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="work directory of a randomized_scenes.py run")
    ap.add_argument("--scenes", required=True, help="seeds, e.g. 0-9")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a cpm setting (repeatable)")
    ap.add_argument("--workdir", required=True, help="new work directory (scored by randomized_scenes.py)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, sep, val = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.removeprefix("cpm.")] = _value(val)
    for seed in _scene_range(a.scenes):
        name = f"scene_{seed:04d}"
        if (Path(a.workdir) / name / "run.json").exists():
            print(f"{name}: done before", flush=True)
            continue
        cpu = sweep_scene(Path(a.src) / name, Path(a.workdir) / name, overrides, a.threads)
        print(f"{name}: cpm {overrides} {cpu:.1f} CPU-s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
