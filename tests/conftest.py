"""Shared test fixtures: where the real mission files live, a scratch dir for outputs."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ../shared/data beside the project (CI lays a copy there); override with PIPELINE_SHARED_DATA
SHARED_DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data"))
#: artefacts a person may want to look at after the tests (screenshots, plots)
TEST_OUTPUT = REPO / "tests" / "output"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real mission data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def test_output() -> Path:
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    return TEST_OUTPUT


@pytest.fixture(scope="session")
def survey_ci_run(tmp_path_factory) -> Path:
    """The CI survey config (`.test/config-survey`) run locally with `--cores 2`, once per session
    (tests/test_survey_e2e.py checks it, tests/test_slurm.py compares a SLURM run with it).

    Under pytest-xdist the run directory is shared by the session's workers: the first worker to ask
    makes it (holding a lock), a second one waits for it; tests must not change it (copy it first)."""
    import fcntl
    import shutil
    import time

    from helpers.survey_run import CONFIG_DIR, snakemake

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above the workers' own
    work, done = root / "survey_ci_run", root / "survey_ci_run.done"
    with open(root / "survey_ci_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            shutil.copytree(CONFIG_DIR, work / "config")
            t0 = time.monotonic()
            res = snakemake(work)
            assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
            done.write_text(f"{time.monotonic() - t0:.0f} s wall\n")
        print(f"survey e2e run: {done.read_text().strip()}")
    return work


#: test files that must share one pytest-xdist worker (`-n 2`, pyproject.toml): the single-node test
#: cluster runs one SLURM test at a time (a dask worker job would queue behind the survey's tile job)
SHARED_WORKER = {
    "tests/test_slurm.py": "slurm",
    "tests/test_dask_distributed.py": "slurm",
}


#: the longest test files (minutes each: pipeline runs), handed out first so that the two workers share
#: them instead of one worker finishing them alone at the end (`--no-loadscope-reorder`, pyproject.toml)
LONGEST_FIRST = (
    "tests/test_slurm.py",
    "tests/test_lfd_synthetic.py",
    "tests/test_survey_e2e.py",
    "tests/test_pipeline_e2e.py",
    "tests/reliability/test_fault_injection.py",
    "tests/test_deblend_detrend.py",
)


def pytest_collection_modifyitems(config, items):
    """Collection order: LONGEST_FIRST, then the rest as collected (a stable sort; the order within a file
    is kept)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that the files of SHARED_WORKER go to one worker together."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedWorkerScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_WORKER.get(path, path)

    return SharedWorkerScheduling(config, log)


def pytest_sessionfinish(session):
    """On an xdist worker: hand this worker's reliability tally to the controller."""
    from helpers.tally import TALLY

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["tally"] = dict(TALLY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the xdist controller: add up the workers' tallies."""
    from helpers.tally import TALLY

    TALLY.update(getattr(node, "workeroutput", {}).get("tally", {}))


def pytest_terminal_summary(terminalreporter):
    """The reliability tally (tests/reliability: bad inputs tried and refused, faults injected, data lost)."""
    from helpers.tally import TALLY

    if not TALLY:
        return
    tr = terminalreporter
    tr.section("reliability tally")
    for key in ("bad inputs tried", "bad inputs refused in one line", "faults injected", "reruns bitwise identical"):
        if key in TALLY:
            tr.write_line(f"{key:<34} {TALLY[key]}")
    tr.write_line(f"{'data lost':<34} {TALLY['data lost']}")
