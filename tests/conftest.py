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
