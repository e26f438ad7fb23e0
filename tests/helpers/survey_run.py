"""The CI survey run (`.test/config-survey`: a synthetic 128 x 128 CCD, 4 tiles) under Snakemake, shared by
tests/test_survey_e2e.py and tests/test_slurm.py (the local reference of the SLURM run) through the
session fixture `survey_ci_run` (tests/conftest.py), so one pytest session makes it once.

BLAS runs single-threaded (OPENBLAS_NUM_THREADS=1, passed on to every step): the per-pixel CPM solves are
small matrices, on which a multi-threaded OpenBLAS is ~30x slower on a loaded 2-core machine (docs/SURVEY.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / ".test" / "config-survey"
RUN = "ci-survey"
CCD = "s0001-4-2"
SETS = ("lfd", "cpm_default")
#: single-threaded BLAS for every step (inherited through snakemake, also by SLURM jobs)
BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: a local run gives every rule one thread: at 64 x 64 px x 100 cadences the two-thread rules (flux solve,
#: CPM) use one core anyway and would keep the other idle (the CI CCD's run: 200 s -> ~155 s wall); their products
#: do not depend on the thread count (the SLURM run, 2 threads each, is compared with this one bitwise)
ONE_THREAD = ["--set-threads", "flux_solve=1", "cpm_detrend=1", "deblend_detrend=1"]


def snakemake(workdir: Path, *args, cores: int | None = 2, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m snakemake` on the repository's Snakefile in `workdir` (`--cores 2` unless `cores` is None)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if cores is not None:
        cmd += ["--cores", str(cores), *ONE_THREAD]
    cmd += list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **BLAS_ENV), timeout=timeout)
    (Path(workdir) / "snakemake.out").write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    return res


def survey_workdir(tmp_path_factory, name: str) -> Path:
    """A fresh directory holding a copy of the CI survey config as `config/`."""
    work = tmp_path_factory.mktemp(name)
    shutil.copytree(CONFIG_DIR, work / "config")
    return work
