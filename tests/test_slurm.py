"""The pipeline on a real SLURM cluster, through `profiles/slurm` and snakemake-executor-plugin-slurm.

CI starts a single-node cluster with `.ci/slurm_setup.sh` (slurmctld + slurmd + slurmdbd/MariaDB
accounting, partition "ci", account "tess") and sets PIPELINE_REQUIRE_SLURM=1, so these tests run there
instead of skipping. Elsewhere they skip, naming what is missing. On another cluster point them at your
own account/partition with SLURM_TEST_ACCOUNT / SLURM_TEST_PARTITION.

* `test_slurm_smoke`: a throwaway two-rule workflow (written here) with the repository's profile: jobs
  go through sbatch, show up in sacct, and a job that fails on its first attempt is retried by SLURM
  with more memory (`attempt` scaling) and then succeeds.
* `test_pipeline_on_slurm_*` (opt-in, PIPELINE_SLURM_TINY=1): the tiny config (`.test/config`) through the real Snakefile with the
  profile (`-j 4`); every job is a SLURM job (sacct), and every result equals a `--cores 2` run's.
* `test_survey_on_slurm_*`: the CI survey config (`.test/config-survey`: a 128 x 128 CCD, 4 tiles) through
  the profile: the tiles' steps share one SLURM job (group `tile`, `group-components: tile: 16`), and the
  merged per-CCD products (and every other result) equal the local run's, which is the session's survey
  e2e run (`survey_ci_run`, tests/conftest.py): CI pays for one extra survey run, on SLURM.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

PROFILE = REPO / "profiles" / "slurm"
ACCOUNT = os.environ.get("SLURM_TEST_ACCOUNT", "tess")  # what .ci/slurm_setup.sh creates
PARTITION = os.environ.get("SLURM_TEST_PARTITION", "ci")
REQUIRE = os.environ.get("PIPELINE_REQUIRE_SLURM") == "1"  # CI: a missing cluster is a failure, not a skip
TIMEOUT_S = 1500
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here (None if they can)."""
    if os.geteuid() != 0 and "SLURM_TEST_ACCOUNT" not in os.environ:
        return "not root (the CI cluster's account is root's); set SLURM_TEST_ACCOUNT/PARTITION for your cluster"
    for tool in ("sbatch", "sinfo", "sacct", "sacctmgr"):
        if shutil.which(tool) is None:
            return f"SLURM client '{tool}' not installed (run .ci/slurm_setup.sh as root)"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm not installed (pip install -e '.[test]')"
    try:
        res = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering (run .ci/slurm_setup.sh)"
    states = res.stdout.split()
    if res.returncode != 0 or not states:
        return f"no SLURM partition '{PARTITION}' answering sinfo ({res.stderr.strip()}); run .ci/slurm_setup.sh"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"partition '{PARTITION}' has no usable node (states: {states})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"PIPELINE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%c %m"], capture_output=True, text=True, check=True
    )
    cpus, mem = (int(x) for x in out.stdout.split()[:2])
    return {"cpus": cpus, "mem_mb": mem}


def test_profile(cluster, dest: Path) -> Path:
    """The repository's profile with the test cluster filled in: account/partition set, threads and memory
    capped at what the (single) node has, quick first status check."""
    cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())
    res = cfg.setdefault("default-resources", {})
    res["slurm_account"] = ACCOUNT
    res["slurm_partition"] = PARTITION

    def cap(expr):
        return f"min({expr}, {cluster['mem_mb']})"

    if "mem_mb" in res:
        res["mem_mb"] = cap(res["mem_mb"])
    for rule_res in (cfg.get("set-resources") or {}).values():
        if "mem_mb" in rule_res:
            rule_res["mem_mb"] = cap(rule_res["mem_mb"])
    cfg["set-threads"] = {r: min(int(t), cluster["cpus"]) for r, t in (cfg.get("set-threads") or {}).items()}
    cfg["cores"] = min(int(cfg.get("cores") or cluster["cpus"]), cluster["cpus"])  # widest group job: one node
    cfg["slurm-init-seconds-before-status-checks"] = 2
    cfg["slurm-keep-successful-logs"] = True  # the plugin deletes them by default; the tests look at them
    cfg["latency-wait"] = 10
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


test_profile.__test__ = False  # a helper, not a test


def run_snakemake(workdir: Path, *args, snakefile: Path = REPO / "Snakefile") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    (workdir / "snakemake.out").write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    return res


def sacct(job_ids) -> list[dict]:
    fields = [
        "JobID",
        "JobName",
        "Comment",
        "State",
        "ExitCode",
        "Account",
        "Partition",
        "ReqMem",
        "AllocCPUS",
        "NodeList",
    ]
    out = subprocess.run(
        [
            "sacct",
            "-X",
            "--parsable2",
            "--noheader",
            "-S",
            "now-1day",
            "-j",
            ",".join(job_ids),
            "-o",
            ",".join(f + "%200" for f in fields),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def slurm_jobs_of(res: subprocess.CompletedProcess) -> tuple[list[str], list[dict]]:
    ids = SUBMITTED.findall(res.stdout + res.stderr)
    assert ids, "the snakemake log names no SLURM job id:\n" + (res.stdout + res.stderr)[-5000:]
    rows = sacct(ids)
    print("\n".join(" | ".join(r.values()) for r in rows))  # evidence in the pytest log (-rA / on failure)
    assert sorted(r["JobID"] for r in rows) == sorted(ids), f"sacct does not know all submitted jobs {ids}: {rows}"
    return ids, rows


# ---------------------------------------------------------------------------------------------------------
# 1. smoke test: throwaway workflow, retries with attempt-scaled memory
# ---------------------------------------------------------------------------------------------------------
SMOKE_SNAKEFILE = textwrap.dedent(
    """
    SAMPLES = ["a", "b"]

    rule all:
        input: expand("out/{s}.sum", s=SAMPLES)

    rule numbers:
        output: "out/{s}.txt"
        threads: 1
        resources: mem_mb=lambda wc, attempt: 100 * attempt, runtime=5
        shell: "echo $SLURM_JOB_ID > {output}.jobid; seq 1 10 > {output}"

    rule total:
        # fails on purpose when given less than 200 MB: succeeds on the retry (attempt 2: 200 MB)
        input: "out/{s}.txt"
        output: "out/{s}.sum"
        resources: mem_mb=lambda wc, attempt: 100 * attempt, runtime=5
        shell: "test {resources.mem_mb} -ge 200 || {{ echo 'not enough memory: {resources.mem_mb}' >&2; exit 1; }}; "
               "echo $SLURM_JOB_ID > {output}.jobid; awk '{{s+=$1}} END {{print s}}' {input} > {output}"
    """
)


def test_slurm_smoke(cluster, tmp_path):
    work = tmp_path / "smoke"
    work.mkdir()
    (work / "Snakefile").write_text(SMOKE_SNAKEFILE)
    profile = test_profile(cluster, tmp_path / "profile")
    res = run_snakemake(work, "--executor", "slurm", "--profile", str(profile), "-j", "4", snakefile=work / "Snakefile")
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    for s in ("a", "b"):
        assert (work / "out" / f"{s}.sum").read_text().strip() == "55"
        # written inside a SLURM job (SLURM_JOB_ID set in the job's environment)
        assert (work / "out" / f"{s}.sum.jobid").read_text().strip().isdigit()
    ids, rows = slurm_jobs_of(res)
    by_rule = {}
    for r in rows:
        assert r["JobName"] == rows[0]["JobName"], "one run = one SLURM job name (the run's uuid)"
        assert r["Account"] == ACCOUNT and r["Partition"] == PARTITION, r
        by_rule.setdefault(r["Comment"].split("_wildcards_")[0], []).append(r)
    assert len(by_rule["rule_numbers"]) == 2 and all(r["State"] == "COMPLETED" for r in by_rule["rule_numbers"])
    total = by_rule["rule_total"]
    # each `total` job failed once with 100 MB, then was resubmitted and completed with 200 MB
    assert sorted(r["State"] for r in total) == ["COMPLETED", "COMPLETED", "FAILED", "FAILED"], total
    assert sorted(r["ReqMem"] for r in total if r["State"] == "COMPLETED") == ["200M", "200M"], total
    assert sorted(r["ReqMem"] for r in total if r["State"] == "FAILED") == ["100M", "100M"], total
    # the plugin keeps one SLURM log per job under .snakemake/slurm_logs
    assert list((work / ".snakemake" / "slurm_logs").rglob("*.log"))


# ---------------------------------------------------------------------------------------------------------
# 2. the real pipeline, tiny config: SLURM run == local run
# ---------------------------------------------------------------------------------------------------------
#: under results/<run>/: per-run bookkeeping that legitimately differs between two runs
VOLATILE_DIRS = {"logs", "benchmarks"}
#: results that record how the run went rather than what it computed: the index page lists every rule's
#: wall-clock benchmark timings
VOLATILE_FILES = {"report/index.html"}
#: random ids Bokeh (and others) put into HTML/JSON: masked before comparing
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


#: rules that run on the submit host (Snakefile `localrules:`), never as SLURM jobs
LOCAL_RULES = {"all", "download_mast", "report_index"}


def _job_stats(log: str) -> dict[str, int]:
    """The 'Job stats' table snakemake prints before running: rule -> number of jobs."""
    stats, inside = {}, False
    for line in log.splitlines():
        if re.match(r"^job\s+count\s*$", line.strip()):
            inside, stats = True, {}
            continue
        if inside:
            parts = line.split()
            if not parts or set(line.strip()) <= {"-", " "}:
                continue
            if parts[0] == "total":
                break
            stats[parts[0]] = int(parts[1])
    return stats


def _workdir(tmp_path_factory, name):
    work = tmp_path_factory.mktemp(name)
    shutil.copytree(REPO / ".test" / "config", work / "config")
    return work


@pytest.fixture(scope="module")
def local_run(cluster, tmp_path_factory):
    work = _workdir(tmp_path_factory, "local")
    res = run_snakemake(work, "--cores", "2")
    assert res.returncode == 0, "the local reference run failed:\n" + (res.stdout + res.stderr)[-6000:]
    return work


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    work = _workdir(tmp_path_factory, "slurm")
    profile = test_profile(cluster, tmp_path_factory.mktemp("profile"))
    res = run_snakemake(work, "--executor", "slurm", "--profile", str(profile), "-j", "4")
    assert res.returncode == 0, "the SLURM run failed:\n" + (res.stdout + res.stderr)[-6000:]
    return work, res


def _result_entries(root: Path) -> dict[str, Path]:
    """Relative path -> path of every result: files, and zarr stores as one entry each."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        rel = d.relative_to(root)
        if (rel.parts[1:2] and rel.parts[1] in VOLATILE_DIRS) or (rel.parts and rel.parts[0].startswith(".")):
            dirnames[:] = []  # results/<run>/logs, .../benchmarks, download caches results/.mast_cache ...
            continue
        for name in list(dirnames):
            if name.endswith(".zarr"):
                out[str(rel / name)] = d / name
                dirnames.remove(name)
        for name in filenames:
            if str(Path(*rel.parts[1:], name)) in VOLATILE_FILES:
                continue
            out[str(rel / name)] = d / name
    return out


def _compare_zarr(a: Path, b: Path) -> list[str]:
    with warnings.catch_warnings():
        # snakemake's .snakemake_timestamp inside directory outputs; stores without consolidated metadata
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        warnings.filterwarnings("ignore", message=".*consolidated metadata")
        return _compare_zarr_stores(a, b)


def _compare_zarr_stores(a: Path, b: Path) -> list[str]:
    import xarray as xr
    import zarr

    diffs = []
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    ma = {k: v for k, v in ga.members(max_depth=None)}
    mb = {k: v for k, v in gb.members(max_depth=None)}
    if sorted(ma) != sorted(mb):
        return [f"members differ: {sorted(set(ma) ^ set(mb))}"]
    if dict(ga.attrs) != dict(gb.attrs):
        diffs.append("group attributes differ")
    for name, arr in ma.items():
        other = mb[name]
        if dict(arr.attrs) != dict(other.attrs):
            diffs.append(f"{name}: attributes differ")
        if isinstance(arr, zarr.Array):
            x, y = arr[...], other[...]
            same = (
                x.shape == y.shape
                and x.dtype == y.dtype
                and (np.array_equal(x, y, equal_nan=True) if x.dtype.kind in "fc" else np.array_equal(x, y))
            )
            if not same:
                diffs.append(f"{name}: array values differ")
    if any(True for _ in ga.arrays()):  # a dataset at the root: xarray's view too
        try:
            xr.testing.assert_identical(xr.open_zarr(a), xr.open_zarr(b))
        except AssertionError as e:
            diffs.append(f"xarray: {str(e)[:500]}")
    return diffs


def _same_file(a: Path, b: Path) -> bool:
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix in (".html", ".json", ".js"):
        return UUID.sub(b"<uuid>", a.read_bytes()) == UUID.sub(b"<uuid>", b.read_bytes())
    return False


#: the tiny config's SLURM run (two more pipeline runs, ~5 min) is opt-in: the survey run below (CCD jobs and
#: grouped tile jobs) checks the same properties in CI; PIPELINE_SLURM_TINY=1 runs it as well
tiny_on_slurm = pytest.mark.skipif(
    not os.environ.get("PIPELINE_SLURM_TINY"), reason="set PIPELINE_SLURM_TINY=1 (CI runs the survey config on SLURM)"
)


@tiny_on_slurm
def test_pipeline_on_slurm_jobs_went_through_slurm(slurm_run):
    work, res = slurm_run
    ids, rows = slurm_jobs_of(res)
    assert all(r["State"] == "COMPLETED" for r in rows), rows
    assert all(r["Account"] == ACCOUNT and r["Partition"] == PARTITION for r in rows), rows
    assert len({r["JobName"] for r in rows}) == 1, "one run = one SLURM job name (the run's uuid)"
    comments = " ".join(r["Comment"] for r in rows)
    # every rule snakemake ran, except the target `all` and the local rules, ran inside a SLURM job
    # (a group job's comment lists its rules: rule_<group>_<rule>_<rule>...)
    ran = _job_stats(res.stdout + res.stderr)
    remote = sorted(set(ran) - LOCAL_RULES)
    assert remote, f"no remote rules in the job stats: {ran}"
    missing = [r for r in remote if r not in comments]
    assert not missing, f"rules not seen in any SLURM job comment: {missing}; sacct: {rows}"
    logs = list((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(logs) >= len(ids), f"expected a SLURM log per job under .snakemake/slurm_logs, found {logs}"
    print(f"{len(ids)} SLURM jobs {ids} ran the rules {remote}")


@tiny_on_slurm
def test_pipeline_on_slurm_equals_local_run(slurm_run, local_run):
    work, _ = slurm_run
    a, b = _result_entries(local_run / "results"), _result_entries(work / "results")
    assert a, "the local run produced no results"
    assert sorted(a) == sorted(b), (
        f"different outputs: only local {sorted(set(a) - set(b))}, only SLURM {sorted(set(b) - set(a))}"
    )
    diffs = {}
    for rel, pa in a.items():
        pb = b[rel]
        if rel.endswith(".zarr"):
            d = _compare_zarr(pa, pb)
            if d:
                diffs[rel] = d
        elif not _same_file(pa, pb):
            diffs[rel] = "content differs"
    assert not diffs, json.dumps(diffs, indent=1, default=str)
    print(f"compared {len(a)} results: {sorted(a)}")


# ---------------------------------------------------------------------------------------------------------
# 3. survey mode, the CI CCD: tiles grouped into SLURM jobs; SLURM run == local run
# ---------------------------------------------------------------------------------------------------------
#: the rules of one tile (rules/common.smk field_group, rules/survey.smk): one component of the group "tile"
#: and, with survey.motion ccd (the default), the rules after the CCD's ccd_motion job one of "tile_solve"
TILE_RULES = (
    "cut_tile",
    "split_catalog",
    "edge_model",
    "prf_model",
    "scene_offsets",
    "motion_model",
    "flux_solve",
    "cpm_detrend",
    "report_field",
)
TILE_GROUPS = ("tile", "tile_solve")


@pytest.fixture(scope="module")
def slurm_survey_run(cluster, tmp_path_factory):
    from helpers.survey_run import snakemake, survey_workdir

    work = survey_workdir(tmp_path_factory, "slurm_survey")
    profile = test_profile(cluster, tmp_path_factory.mktemp("profile_survey"))
    res = snakemake(work, "--executor", "slurm", "--profile", str(profile), "-j", "4", cores=None, timeout=TIMEOUT_S)
    assert res.returncode == 0, "the SLURM survey run failed:\n" + (res.stdout + res.stderr)[-6000:]
    return work, res


def _group_jobs(log: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The tile group jobs snakemake submitted: per 'Group job <tile|tile_solve> ...', the group's name and
    its (rule, wildcards) list."""
    jobs, cur, rule = [], None, None
    for line in log.splitlines():
        m = re.search(r"Group job (\w+)", line)
        if m and m.group(1) in TILE_GROUPS:
            cur = []
            jobs.append((m.group(1), cur))
        elif cur is not None and re.match(r"^\s+(local)?rule (\w+):", line):
            rule = re.match(r"^\s+(?:local)?rule (\w+):", line).group(1)
        elif cur is not None and rule and line.strip().startswith("wildcards:"):
            cur.append((rule, line.strip()[len("wildcards:") :].strip()))
            rule = None
        elif re.match(r"^(local)?(rule|checkpoint) \w+:", line):  # a job outside any group (column 0)
            cur = None
    return jobs


def test_survey_on_slurm_tiles_share_a_job(slurm_survey_run):
    """Every step of every tile ran inside SLURM group jobs of `group-components: tile` tiles each (the CI
    CCD's 4 tiles: one job), next to the CCD-level jobs."""
    from helpers.survey_run import CCD, RUN

    work, res = slurm_survey_run
    ids, rows = slurm_jobs_of(res)
    assert all(r["State"] == "COMPLETED" for r in rows), rows
    tiles = json.loads((work / "results" / RUN / CCD / "tiles.json").read_text())["tile_ids"]
    per_job = int(yaml.safe_load((PROFILE / "config.yaml").read_text())["group-components"]["tile"])
    groups = _group_jobs(res.stdout + res.stderr)
    names = {name for name, _ in groups}
    assert names == set(TILE_GROUPS), names  # survey.motion ccd: before and after the CCD's ccd_motion job
    for name in names:
        assert sum(n == name for n, _ in groups) == -(-len(tiles) // per_job), groups
    for rule in TILE_RULES:
        for tile in tiles:
            assert any(r == rule and tile in w for _, g in groups for r, w in g), (rule, tile)
    tile_jobs = [r for r in rows if r["Comment"].startswith("rule_tile_")]
    assert len(tile_jobs) == len(groups), rows
    ccd_rules = {"synthetic_ccd", "ingest_ccd", "gaia_crossmatch", "ccd_motion", "merge_tiles", "report_survey"}
    seen = " ".join(r["Comment"] for r in rows)
    assert all(f"rule_{r}" in seen or f"_{r}" in seen for r in ccd_rules), rows
    print(f"{len(ids)} SLURM jobs; {len(tile_jobs)} tile job(s) for {len(tiles)} tiles: {tile_jobs}")


def test_survey_on_slurm_equals_local_run(slurm_survey_run, survey_ci_run):
    """The merged per-CCD sets, the source table and every other result of the SLURM run equal the local run's."""
    from helpers.survey_run import CCD, RUN, SETS

    work, _ = slurm_survey_run
    a, b = _result_entries(survey_ci_run / "results"), _result_entries(work / "results")
    merged = [f"{RUN}/{CCD}/merged/{s}.zarr" for s in SETS] + [f"{RUN}/{CCD}/merged/sources.ecsv"]
    assert all(m in a and m in b for m in merged), (sorted(a), sorted(b))
    assert sorted(a) == sorted(b), f"only local {sorted(set(a) - set(b))}, only SLURM {sorted(set(b) - set(a))}"
    diffs = {}
    for rel, pa in a.items():
        pb = b[rel]
        d = _compare_zarr(pa, pb) if rel.endswith(".zarr") else ([] if _same_file(pa, pb) else "content differs")
        if d:
            diffs[rel] = d
    assert not diffs, json.dumps(diffs, indent=1, default=str)
    print(f"compared {len(a)} results, among them {merged}")
