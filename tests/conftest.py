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
    (tests/test_survey_e2e.py checks it, tests/test_slurm.py compares a SLURM run with it)."""
    import time

    from helpers.survey_run import snakemake, survey_workdir

    work = survey_workdir(tmp_path_factory, "survey_e2e")
    t0 = time.monotonic()
    res = snakemake(work)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    print(f"survey e2e run: {time.monotonic() - t0:.0f} s wall")
    return work


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
