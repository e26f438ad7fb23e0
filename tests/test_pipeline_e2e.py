"""Tiny end-to-end run of the whole Snakemake workflow on `.test/config/config.yaml`.

The run happens in a copy of `.test/` (the snakemake-workflows convention: `--directory .test` finds
`config/config.yaml` there), so the repository stays clean.
"""
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    shutil.copytree(REPO / ".test" / "config", workdir / "config")
    res = snakemake(workdir)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    return workdir


def test_tiny_run_produces_every_stage(tiny_run):
    out = tiny_run / "results" / "ci-tiny"
    assert (out / "tiny" / "cube.zarr").is_dir()
    assert (out / "tiny" / "truth.zarr").is_dir()
    assert (out / "tiny" / "catalog.ecsv").is_file()
    for rule_dir in (out / "benchmarks").iterdir():
        assert any(rule_dir.iterdir()), f"no benchmark for {rule_dir.name}"
    assert (out / "logs").is_dir()


def test_rerun_has_nothing_to_do(tiny_run):
    res = snakemake(tiny_run, "-n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr
