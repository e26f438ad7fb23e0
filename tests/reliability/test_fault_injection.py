"""Fault injection: every step of a small field's chain is killed (SIGKILL, like an OOM kill or a lost node) at a
seeded random moment of its run, then rerun; the chain goes on. Afterwards

* every product is bitwise identical (array, FITS data and page digests, tests/helpers/manifest.py) to an
  uninterrupted run of the same chain;
* at each kill, every product at its final path is complete (it opens and equals the reference's): a
  killed write leaves no half-written output, only temporary siblings;
* after each rerun no ``.tmp-*`` debris is left anywhere (a step removes its outputs' stale siblings).

The steps are the command lines the rules run (docs/CLI.md). Counts go to the reliability tally.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.manifest import compare, manifest
from helpers.tally import TALLY

REPO = Path(__file__).resolve().parents[2]
# 20 x 20 px: on 16 x 16 px at this density the PRF fit's 20-pixel minimum is a coin flip (1 of 6 seeds passed
# before the colour-corrected a-priori fluxes of 2026-12-03, 3 of 6 after; seed 11 went from pass to fail)
FIELD = {"seed": 11, "n_rows": 20, "n_cols": 20, "n_cadences": 100, "stars_per_sq_pixel": 0.15}
CPM = {"k": 8, "n_predictors": 64, "sweep_lambda_L": []}
SEED = 20261130


def chain() -> list[tuple[str, list[str]]]:
    """(step, argv) of the field's chain, paths relative to the run directory as the rules give them (the
    field page shows its inputs' paths in its provenance)."""
    root = Path(".")
    f = root / "field"
    cube, cat = f / "cube.zarr", f / "catalog.ecsv"
    lfd = f / "lfd"
    cpm = f / "cpm" / "default"
    return [
        ("download-synthetic", ["--params", json.dumps(FIELD), "--field", "field", "--cube", str(cube)]
         + ["--truth", str(f / "truth.zarr"), "--catalog", str(f / "input_catalog.ecsv")]),
        ("gaia-crossmatch", ["--cube", str(cube), "--local-catalog", str(f / "input_catalog.ecsv"), "--out", str(cat)]),
        ("edge-model", ["--cube", str(cube), "--catalog", str(cat), "--out", str(lfd / "edge_model.json")]),
        ("prf-model", ["--cube", str(cube), "--catalog", str(cat), "--edge", str(lfd / "edge_model.json")]
         + ["--out", str(lfd / "prf_model.npz"), "--png", str(lfd / "prf_model.png")]),
        ("motion-model", ["--cube", str(cube), "--catalog", str(cat), "--prf", str(lfd / "prf_model.npz")]
         + ["--out", str(lfd / "motion_model.npz")]),
        ("flux-solve", ["--cube", str(cube), "--catalog", str(cat), "--prf", str(lfd / "prf_model.npz")]
         + ["--motion", str(lfd / "motion_model.npz"), "--out", str(lfd / "lightcurves.zarr")]
         + ["--fits-dir", str(lfd / "fits"), "--diagnostics", str(lfd / "diagnostics.npz"), "--threads", "1"]),
        ("cpm-detrend", ["--field", "field", "--paramset", "default", "--params", json.dumps(CPM)]
         + ["--cube", str(cube), "--catalog", str(cat), "--detrended", str(cpm / "detrended.zarr")]
         + ["--lightcurves", str(cpm / "lightcurves.zarr"), "--raw-lightcurves", str(cpm / "raw_lightcurves.zarr")]
         + ["--fits-dir", str(cpm / "fits"), "--threads", "1"]),
        ("report-field", ["--field", "field", "--field-dir", str(f), "--out", str(root / "report" / "field.html")]
         + ["--summary", str(root / "report" / "field.json")]),
    ]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"  # the same BLAS threading in both runs (LFD motion weights depend on it)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _start(step: str, argv: list[str], log: Path) -> subprocess.Popen:
    """The step's command line, run in the directory of ``log`` (the run directory)."""
    cmd = [sys.executable, "-m", "workflow_lib.steps", step, *argv, "--log", log.name]
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "start_new_session": True}
    return subprocess.Popen(cmd, env=_env(), cwd=log.parent, **kw)


def _run(step: str, argv: list[str], log: Path) -> float:
    t0 = time.monotonic()
    proc = _start(step, argv, log)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{step} failed: {err.decode()[-2000:]}\n{log.read_text()[-3000:]}"
    return time.monotonic() - t0


def _debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """The uninterrupted chain and each step's wall time."""
    root = tmp_path_factory.mktemp("reference")
    durations = {step: _run(step, argv, root / f"{step}.log") for step, argv in chain()}
    return root, durations


@pytest.mark.slow
def test_kill_every_step_rerun_is_bitwise_identical(reference, tmp_path):
    ref_root, durations = reference
    rng = random.Random(SEED)
    root = tmp_path / "faults"
    root.mkdir()
    expected = manifest(ref_root)
    killed = []
    for step, argv in chain():
        # a moment between the end of the imports (~1 s) and the end of the step
        delay = rng.uniform(0.6, max(0.7, 0.95 * durations[step]))
        proc = _start(step, argv, root / f"{step}.killed.log")
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(step)
        proc.wait()
        TALLY["faults injected"] += 1
        # what the kill left at the final paths is complete: every product there equals the reference's
        now = manifest(root)  # skips writes in progress (.tmp-* siblings): they are not products
        wrong = [k for k in now if now[k] != expected.get(k)]
        TALLY["data lost"] += len(wrong)
        assert not wrong, f"killing {step} left incomplete products at their final paths: {wrong[:10]}"
        _run(step, argv, root / f"{step}.log")  # the rerun (what snakemake does after a failed job)
        assert _debris(root) == [], f"debris after rerunning {step}: {_debris(root)}"
    diffs = compare(manifest(root), manifest(ref_root))
    TALLY["data lost"] += len(diffs)
    assert not diffs, "products differ after the killed runs:\n" + "\n".join(diffs[:40])
    TALLY["reruns bitwise identical"] += len(chain())
    assert len(killed) >= len(chain()) // 2, f"only {killed} were still running when killed: lengthen the steps"
    print(f"killed mid-run: {killed}; every product equals the uninterrupted run's")
