"""The schema is the one source of defaults, and it ships inside the package: every step's settings
function returns exactly the schema defaults, and a non-editable install (wheel into a fresh venv)
reads them and simulates a small field from outside the repository."""

import dataclasses
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workflow_lib.core.settings import schema_defaults
from workflow_lib.cpm.apertures import ApertureParams, aperture_params
from workflow_lib.cpm.model import CPMParams, cpm_params
from workflow_lib.data.synthetic import default_params
from workflow_lib.lfd.edge import edge_params
from workflow_lib.lfd.motion import motion_params
from workflow_lib.lfd.prf import prf_params
from workflow_lib.lfd.solve import solve_params
from workflow_lib.report.page import report_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "section, settings",
    [
        ("lfd.edge", edge_params),
        ("lfd.prf", prf_params),
        ("lfd.motion", motion_params),
        ("lfd.solve", solve_params),
        ("report", report_params),
        ("$defs.synthetic", lambda _: default_params()),
    ],
)
def test_settings_are_the_schema_defaults(section, settings):
    assert settings(None) == schema_defaults(section)
    assert settings({}) == schema_defaults(section)


def test_cpm_dataclasses_default_to_the_schema():
    cpm = schema_defaults("cpm")
    got = dataclasses.asdict(cpm_params())
    assert got == {k: cpm[k] for k in got}
    assert dataclasses.asdict(CPMParams()) == got
    ap = schema_defaults("cpm.aperture")
    assert dataclasses.asdict(aperture_params()) == ap == dataclasses.asdict(ApertureParams())
    with pytest.raises(ValueError, match="radius_mix"):
        aperture_params({"radius_mix": 2.0})


def test_schema_defaults_are_copies():
    d = schema_defaults("report")
    d["percentiles"].append(99.0)
    assert schema_defaults("report")["percentiles"] == [1.0, 95.0]


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    import workflow_lib
    from workflow_lib.core.settings import SCHEMA_PATH, schema_defaults
    from workflow_lib.data.synthetic import write_synthetic_field
    assert Path(workflow_lib.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), workflow_lib.__file__
    assert SCHEMA_PATH.is_file(), SCHEMA_PATH
    assert schema_defaults("lfd.edge")["threshold"] == 5.0
    assert schema_defaults("$defs.synthetic")["n_rows"] == 64
    out = Path("out")
    cube, truth, cat = write_synthetic_field(
        out / "cube.zarr", out / "truth.zarr", out / "catalog.ecsv",
        {"n_rows": 12, "n_cols": 12, "n_cadences": 50}, field="pkg",
    )
    assert cube["flux"].shape[1:] == (12, 12) and np.isfinite(cube["flux"].values).any()
    assert (out / "catalog.ecsv").is_file()
    print("PACKAGED OK", workflow_lib.__file__)
    """
)


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    """Build a wheel, install it (no deps) into a fresh venv that sees the system site-packages, and
    run a 12x12x50 synthetic field from a directory outside the repository."""
    # build from a copy of the project files: an in-tree build would leave build/ in the (shared) checkout,
    # and a stale build/lib could slip removed modules into the wheel
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "workflow_lib", src / "workflow_lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = subprocess.run([str(py), "-c", SCRIPT], cwd=work, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PACKAGED OK" in res.stdout
