"""`python -m workflow_lib.steps`: the command line every rule's shell: command calls (docs/CLI.md)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

STEP = [sys.executable, "-m", "workflow_lib.steps"]


def cli(*args, cwd=None):
    return subprocess.run([*STEP, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_step():
    from workflow_lib.steps.__main__ import STEPS

    res = cli("--help")
    assert res.returncode == 0, res.stderr
    for step in STEPS:
        assert step in res.stdout, step


def test_every_step_names_an_existing_function():
    """The table of steps points at real functions (imported here, not by the CLI's --help)."""
    from importlib import import_module

    from workflow_lib.steps.__main__ import STEPS

    for step, (module, func, _) in STEPS.items():
        assert callable(getattr(import_module(module), func)), step


def test_missing_input_is_one_line_on_stderr_and_traceback_in_log(tmp_path):
    log = tmp_path / "logs" / "edge.log"
    missing = tmp_path / "nowhere" / "cube.zarr"
    res = cli(
        "edge-model",
        "--cube",
        missing,
        "--catalog",
        tmp_path / "catalog.ecsv",
        "--out",
        tmp_path / "edge.json",
        "--log",
        log,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: edge-model: ") and str(missing) in lines[0], lines[0]
    assert "--cube" in lines[0] and str(log) in lines[0]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "FileNotFoundError" in text
    assert not (tmp_path / "edge.json").exists()


def test_bad_json_params_name_the_option(tmp_path):
    log = tmp_path / "x.log"
    res = cli(
        "download-synthetic",
        "--cube",
        tmp_path / "c.zarr",
        "--truth",
        tmp_path / "t.zarr",
        "--catalog",
        tmp_path / "c.ecsv",
        "--params",
        "{n_rows: 8",
        "--log",
        log,
    )
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "--params: not valid JSON" in res.stderr, res.stderr
    assert "Traceback" in log.read_text()


def test_unknown_key_of_a_step_is_named(tmp_path):
    """A settings key the step does not know ends as one line naming the key."""
    res = cli(
        "download-synthetic",
        "--cube",
        tmp_path / "c.zarr",
        "--truth",
        tmp_path / "t.zarr",
        "--catalog",
        tmp_path / "c.ecsv",
        "--params",
        '{"n_rowz": 8}',
        "--log",
        tmp_path / "x.log",
    )
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "n_rowz" in res.stderr, res.stderr


def test_without_log_the_traceback_goes_to_stderr_then_one_error_line(tmp_path):
    res = cli("gaia-crossmatch", "--cube", tmp_path / "no.zarr", "--out", tmp_path / "cat.ecsv")
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: gaia-crossmatch: ")


def test_short_steps_import_only_their_module():
    """download-synthetic must not import bokeh, dask.distributed or astroquery (python -X importtime)."""
    code = (
        "import sys, runpy; sys.argv = ['x', '--help'];\n"
        "from workflow_lib.steps.__main__ import STEPS; import importlib;\n"
        "importlib.import_module(STEPS['download-synthetic'][0]);\n"
        "print(' '.join(m for m in ('bokeh', 'distributed', 'astroquery', 'matplotlib') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"download-synthetic imports {res.stdout.strip()}"
    res = subprocess.run(
        [sys.executable, "-c", "import sys, workflow_lib.steps.__main__; print('bokeh' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip() == "False"


@pytest.mark.slow
def test_step_run_by_hand_equals_the_rules_product(tmp_path):
    """The tiny field up to the edge model with Snakemake; then edge-model and gaia-crossmatch by hand
    (schema defaults: `--params '{}'`): same products."""
    import numpy as np
    from astropy.table import Table

    shutil.copytree(REPO / ".test" / "config", tmp_path / "config")
    out = tmp_path / "results" / "ci-tiny" / "tiny"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--cores",
            "2",
            "results/ci-tiny/tiny/lfd/edge_model.json",  # targets are relative to --directory
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    hand = tmp_path / "by_hand"
    res = cli(
        "gaia-crossmatch",
        "--cube",
        out / "cube.zarr",
        "--local-catalog",
        out / "input_catalog.ecsv",
        "--out",
        hand / "catalog.ecsv",
        "--params",
        "{}",
        "--log",
        hand / "gaia.log",
    )
    assert res.returncode == 0, res.stderr
    a, b = Table.read(out / "catalog.ecsv"), Table.read(hand / "catalog.ecsv")
    assert a.colnames == b.colnames and len(a) == len(b)
    for c in a.colnames:
        assert np.array_equal(np.asarray(a[c]), np.asarray(b[c])), c
    res = cli(
        "edge-model",
        "--cube",
        out / "cube.zarr" / "zarr.json",  # the rules' form of a store
        "--catalog",
        out / "catalog.ecsv",
        "--out",
        hand / "edge_model.json",
        "--log",
        hand / "edge.log",
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # progress goes to the log only

    def science(path):
        d = json.loads(path.read_text())
        return {k: v for k, v in d.items() if k != "provenance"}

    assert science(out / "lfd" / "edge_model.json") == science(hand / "edge_model.json")


def test_steps_compute_without_looking_for_a_distributed_client():
    """A step process configures dask's threaded scheduler (prefer_threaded_scheduler), so a compute does
    not import dask.distributed to look for a client (~0.5 CPU-s per job), nor does a rechunk (the reshape of
    a cube into its pixel table) to choose its method; the values are the same."""
    code = (
        "import os, sys\n"
        "from workflow_lib.core.parallel import prefer_threaded_scheduler\n"
        "if sys.argv[1] == 'step': prefer_threaded_scheduler()\n"
        "import dask.array as da\n"
        "x = float(da.arange(1000, chunks=100).sum().compute())\n"
        "x += float(da.arange(1000, chunks=(100,)).reshape(10, 100).rechunk((5, 50))[2:4, 10].sum().compute())\n"
        "print(x, 'distributed' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER"}
    step = subprocess.run([sys.executable, "-c", code, "step"], capture_output=True, text=True, env=env)
    assert step.returncode == 0, step.stderr
    assert step.stdout.split() == ["500020.0", "False"]  # 499500 + 210 + 310
    plain = subprocess.run([sys.executable, "-c", code, "plain"], capture_output=True, text=True, env=env)
    assert plain.stdout.split()[0] == "500020.0"  # without it dask looks for a client (imports distributed)


def test_step_log_ends_with_the_process_cpu_and_peak_memory(tmp_path):
    """The `done` line holds getrusage's CPU (threads and imports included) and peak memory; the benchmark
    reader takes them instead of Snakemake's sampled `cpu_time`, which misses a long job's last stretch."""
    import resource
    import time

    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from run_overhead import read_benchmarks

    from workflow_lib.core.logs import main_step, read_step_usage

    def busy():
        t0 = time.process_time()
        a = np.ones(2_000_000)  # 16 MB
        while time.process_time() - t0 < 0.3:
            a = a * 1.0000001

    log = tmp_path / "results" / "r" / "logs" / "cpm_detrend" / "f.log"

    def used():  # getrusage's CPU of this process and its waited-for children (earlier tests' subprocesses)
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    before = used()
    assert main_step(str(log), "busy", busy) == 0
    cpu, rss = read_step_usage(log)
    assert before + 0.3 - 0.01 <= cpu <= used() + 0.01  # the log rounds to 0.01 s
    assert rss > 16
    assert read_step_usage(tmp_path / "missing.log") is None
    failed = tmp_path / "failed.log"
    assert main_step(str(failed), "bad", lambda: 1 / 0) == 1
    assert read_step_usage(failed) is None
    bench = tmp_path / "results" / "r" / "benchmarks" / "cpm_detrend"
    bench.mkdir(parents=True)
    for name in ("f", "g"):  # f has a log, g has none
        (bench / f"{name}.tsv").write_text(
            "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
            "45.0\t0:00:45\t574.0\t1339\t538\t553\t6\t0\t34.3\t15.8\n"
        )
    rows = {r["job"]: r for r in read_benchmarks(tmp_path)}
    assert rows["f"]["cpu"] == cpu and rows["f"]["max_rss"] == rss and rows["f"]["cpu_source"] == "log"
    assert rows["f"]["cpu_snakemake"] == 15.8
    assert rows["g"]["cpu"] == 15.8 and rows["g"]["max_rss"] == 574.0 and rows["g"]["cpu_source"] == "benchmark"
