"""Config schema, env files and workflow structure."""

import re
import subprocess
import sys

import pytest
import tomllib
import yaml
from conftest import REPO
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCHEMA = str(REPO / "workflow_lib" / "schema.yaml")


def load_default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_validates_and_fills_defaults():
    cfg = load_default_config()
    validate(cfg, schema=SCHEMA)
    assert cfg["synthetic"]["n_rows"] == 64
    assert cfg["synthetic"]["n_cadences"] >= 1300
    assert cfg["gaia"]["margin_pixels"] > 0
    assert len(cfg["fields"]) >= 2


def test_unknown_key_is_named_in_the_error():
    cfg = load_default_config()
    cfg["fields"]["synth_a"]["synthetic"]["n_rowz"] = 3
    with pytest.raises(WorkflowError, match="n_rowz"):
        validate(cfg, schema=SCHEMA)


def test_wrong_type_is_named_in_the_error():
    cfg = load_default_config()
    cfg["synthetic"] = {"n_cadences": "many"}
    with pytest.raises(WorkflowError, match="many"):
        validate(cfg, schema=SCHEMA)


def test_unknown_source_rejected():
    cfg = {"fields": {"x": {"source": "ftp"}}}
    with pytest.raises(WorkflowError, match="ftp"):
        validate(cfg, schema=SCHEMA)


def _requirement_names(reqs):
    out = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(>=\s*([0-9.]+))?", r)
        out[m.group(1).lower()] = m.group(4)
    return out


def test_conda_env_matches_pyproject():
    """envs/*.yaml cannot be built here (no conda channels): check they pin what pyproject pins."""
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = _requirement_names(py["project"]["dependencies"])
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for path in envs:
        env = yaml.safe_load(path.read_text())
        conda = _requirement_names([d for d in env["dependencies"] if isinstance(d, str) and d != "pip"])
        for name, lower in deps.items():
            assert name in conda, f"{name} is in pyproject.toml but not in envs/{path.name}"
            assert conda[name] == lower, f"{name}: pyproject >= {lower}, envs/{path.name} >= {conda[name]}"


def _rule_blocks():
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=(?:rule|checkpoint) )", smk.read_text())[1:]:
            yield smk, block.split(":")[0].split()[1], block


def test_every_rule_runs_the_step_cli_in_a_conda_env():
    """Rules are `shell:` calls of `python -m workflow_lib.steps` with a conda env that exists; no
    `run:` blocks, and step functions are imported only by the CLI (rules/common.smk may import the
    DAG-building helpers it needs)."""
    from workflow_lib.steps.__main__ import STEPS, TOOLS

    used = set()
    for smk, name, block in _rule_blocks():
        assert "\n    run:" not in block, f"{smk.name}: {name} has a run: block"
        m = re.search(r"python -m workflow_lib\.steps ([a-z-]+)", block)
        assert m and "\n    shell:" in block, f"{smk.name}: {name} does not call the step CLI"
        assert m.group(1) in STEPS, f"{smk.name}: {name} calls unknown step {m.group(1)}"
        used.add(m.group(1))
        env = re.search(r'\n    conda:\n        "([^"]+)"', block)
        assert env, f"{smk.name}: {name} has no conda: env"
        assert (smk.parent / env.group(1)).resolve().is_file(), f"{smk.name}: {name}: no {env.group(1)}"
    assert used == set(STEPS) - set(TOOLS), set(STEPS) - set(TOOLS) - used
    for smk in sorted((REPO / "rules").glob("*.smk")):
        if smk.name != "common.smk":
            assert "workflow_lib" not in re.sub(r"(?m)#.*$", "", smk.read_text()).replace(
                "python -m workflow_lib.steps", ""
            ), f"{smk.name} imports workflow_lib"


def test_resource_floors_from_the_config(tmp_path):
    """resources.default_mem_mb / default_runtime are the floors of every rule's mem_mb / runtime."""
    cfg = tmp_path / "floors.yaml"
    cfg.write_text("run: floors_test\nresources: {default_mem_mb: 3000, default_runtime: 45}\n")
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(REPO / "config" / "config.yaml"), str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout + res.stderr
    mems = [int(x) for x in re.findall(r"mem_mb=(\d+)", text)]
    runtimes = [int(x) for x in re.findall(r"runtime=(\d+)", text)]
    assert mems and min(mems) == 3000, sorted(set(mems))
    assert runtimes and min(runtimes) == 45, sorted(set(runtimes))


def test_snakemake_lint_passes():
    res = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr, res.stdout


def test_every_rule_declares_log_benchmark_threads_resources():
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.split(r"\n(?=(?:rule|checkpoint) )", text)[1:]:
            name = block.split(":")[0]
            if "\n    run:" not in block and "\n    script:" not in block and "\n    shell:" not in block:
                continue  # aggregation-only rule
            for key in ("log:", "benchmark:", "threads:", "resources:", "mem_mb", "runtime"):
                assert f"{key}" in block, f"{smk.name}: {name} has no {key}"


def test_config_reference_is_up_to_date():
    """docs/CONFIG.md documents every schema key (regenerate: python -m workflow_lib.configdoc > docs/CONFIG.md)."""
    from workflow_lib.core.configdoc import render

    assert (REPO / "docs" / "CONFIG.md").read_text() == render(), "docs/CONFIG.md is stale"
    doc = render()
    for key in ("lfd.prf.n_r_knots", "lfd.motion.time_model", "lfd.solve.method", "cpm.lambda_L", "cpm.k"):
        assert f"`{key}`" in doc, key


@pytest.mark.parametrize(
    "stage, absent, present",
    [
        ("lfd", {"edge_model", "prf_model", "motion_model", "flux_solve"}, {"cpm_detrend", "report_field"}),
        ("cpm", {"cpm_detrend", "cpm_sweep_summary"}, {"flux_solve", "report_field"}),
    ],
)
def test_stage_switches_remove_the_stage_from_the_dag(tmp_path, stage, absent, present):
    """`lfd.enabled: false` / `cpm.enabled: false` (schema keys): the stage's rules leave the DAG and
    the reports go without it (dry run)."""
    cfg = tmp_path / "off.yaml"
    cfg.write_text(f"run: stage_switch_test\n{stage}: {{enabled: false}}\n")
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(REPO / "config" / "config.yaml"), str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    stats = res.stdout.split("Job stats:")[1]
    jobs = set(re.findall(r"^(\w+)\s+\d+\s*$", stats, flags=re.M))
    assert not (absent & jobs) and present <= jobs, jobs


# ---- survey mode: the `ccds` block


def test_survey_configs_validate_with_ccds_only():
    for path in (REPO / "config" / "survey.yaml", REPO / ".test" / "config-survey" / "config.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert "fields" not in cfg and cfg["ccds"], path
        validate(cfg, schema=SCHEMA)
        assert cfg["survey"]["tile_size"] in (48, 64) and cfg["survey"]["margin"] == 8
        assert cfg["survey"]["synthetic"]["n_rows"] >= 8  # defaults filled in
    # the whole-sector config: its 16 CCDs, the measured tiling and CPM setting (docs/SURVEY.md)
    cfg = yaml.safe_load((REPO / "config" / "sector.yaml").read_text())
    validate(cfg, schema=SCHEMA)
    assert len(cfg["ccds"]) == 16 and all(c["source"] == "ffi" for c in cfg["ccds"].values())
    assert (cfg["survey"]["tile_size"], cfg["survey"]["margin"], cfg["cpm"]["n_predictors"]) == (128, 8, 64)
    assert cfg["survey"]["motion"] == "ccd" and cfg["survey"]["tile_fits"] is False  # schema defaults


def test_ccds_entry_is_checked():
    ok = {"ccds": {"c1": {"source": "ffi", "ffi": {"directory": "data/ffi"}}}}
    validate(ok, schema=SCHEMA)
    with pytest.raises(WorkflowError, match="tape"):
        validate({"ccds": {"c1": {"source": "tape"}}}, schema=SCHEMA)
    with pytest.raises(WorkflowError, match="n_rowz"):
        validate({"ccds": {"c1": {"source": "synthetic_ffi", "synthetic": {"n_rowz": 8}}}}, schema=SCHEMA)
    with pytest.raises(WorkflowError, match="folder"):
        validate({"ccds": {"c1": {"source": "ffi", "ffi": {"folder": "x"}}}}, schema=SCHEMA)
    both = {"fields": {"f": {"source": "synthetic"}}, "ccds": {"c": {"source": "synthetic_ffi"}}}
    validate(both, schema=SCHEMA)


def test_config_needs_fields_or_ccds(tmp_path):
    with pytest.raises(WorkflowError):
        validate({"run": "x"}, schema=SCHEMA)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("run: empty\n")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0
    assert "config: no 'fields' section (and no 'ccds')" in res.stdout + res.stderr


def test_survey_dag_before_the_tile_grid(tmp_path):
    """Before the checkpoint has run, the dry run shows the CCD-level jobs (tiles follow the grid)."""
    import shutil

    shutil.copytree(REPO / ".test" / "config-survey", tmp_path / "config")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n"]
    res = subprocess.run(cmd + ["--cores", "2"], capture_output=True, text=True)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    for rule in ("synthetic_ccd", "ingest_ccd", "gaia_crossmatch", "tile_grid", "merge_tiles", "report_survey"):
        assert rule in text, rule


def test_real_ffi_ccd_dry_run(tmp_path):
    """`source: ffi` reads the CCD's FFIs from its directory (not tracked as an input); a missing
    ffi.directory/glob is named."""
    import shutil

    (tmp_path / "config").mkdir()
    cfg = "run: real\nccds:\n  s0001-1-1:\n    source: ffi\n    ffi: {directory: data/ffi/s0001-1-1}\n"
    (tmp_path / "config" / "config.yaml").write_text(cfg)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    res = subprocess.run(cmd + ["-n", "-p", "--cores", "1"], capture_output=True, text=True)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "survey-ingest --ffi data/ffi/s0001-1-1" in text
    assert "synthetic_ccd" not in text
    (tmp_path / "config" / "config.yaml").write_text(cfg.replace("    ffi: {directory: data/ffi/s0001-1-1}\n", ""))
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
    res = subprocess.run(cmd + ["-n", "-p", "--cores", "1"], capture_output=True, text=True)
    assert res.returncode != 0 and "needs ffi.directory or ffi.glob" in res.stdout + res.stderr
