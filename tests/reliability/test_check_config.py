"""check_config: config errors as one line naming the key path and the fix."""

from pathlib import Path

import pytest
import yaml

from workflow_lib.core.settings import ConfigError, check_config

REPO = Path(__file__).resolve().parents[2]


def _base():
    return {
        "run": "r",
        "fields": {"sector_1": {"source": "synthetic"}, "sector_2": {"source": "synthetic"}},
        "cpm": {"sweep_lambda_L": [1.0, 0.1]},
    }


def _set(path, value):
    def mut(cfg):
        node = cfg
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value

    return mut


BAD = [
    (_set(["cpm", "n_predictor"], 3), r"unknown key 'cpm\.n_predictor'; did you mean 'cpm\.n_predictors'\?"),
    (_set(["lfdd"], {}), r"unknown key 'lfdd'; did you mean 'lfd'\?"),
    (
        _set(["fields", "sector_1", "sourse"], "x"),
        r"'fields\.sector_1\.sourse'; did you mean 'fields\.sector_1\.source'",
    ),
    (
        _set(["fields", "sector_1", "synthetic", "n_rowz"], 3),
        r"'fields\.sector_1\.synthetic\.n_rowz'; did you mean 'fields\.sector_1\.synthetic\.n_rows'",
    ),
    (_set(["lfd", "edge", "dominanse"], 0.9), r"'lfd\.edge\.dominanse'; did you mean 'lfd\.edge\.dominance'"),
    (_set(["cpm", "aperture", "zzz"], 1), r"unknown key 'cpm\.aperture\.zzz'; valid: mag_bright, mag_limit"),
    (_set(["report", "cpm_paramsett"], "default"), r"'report\.cpm_paramsett'; did you mean 'report\.cpm_paramset'"),
    (_set(["fields", "sector_1", "local", "file"], ["a.fits"]), r"did you mean 'fields\.sector_1\.local\.files'"),
    (_set(["gaia", "mag_limt"], 16), r"unknown key 'gaia\.mag_limt'; did you mean 'gaia\.mag_limit'"),
    (lambda c: c.pop("fields"), r"no 'fields' section \(and no 'ccds'\)"),
    (_set(["fields"], {}), r"an empty 'fields' section \(and no 'ccds'\)"),
    (
        _set(["report", "cpm_paramset"], "nope"),
        r"report\.cpm_paramset='nope' is not a CPM parameter set; valid: default, lambda_L_1, lambda_L_0\.1",
    ),
    (_set(["report", "cpm_paramset"], "lambda_L_5"), r"'lambda_L_5' is not a CPM parameter set"),
    (
        _set(["cpm", "stitch"], {"pimen": ["sector_1", "sector_3"]}),
        r"cpm\.stitch\.pimen names 'sector_3', which is not a configured field; did you mean 'sector_\d'\?",
    ),
    (lambda c: c.__setitem__("cpm", {"stitch": {"g": ["sector_1", "zzz"]}}), r"'zzz'.*valid: sector_1, sector_2"),
]


@pytest.mark.parametrize("mutate, message", BAD)
def test_bad_config_one_line(mutate, message):
    cfg = _base()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message) as exc:
        check_config(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("config: ") and len(msg) < 300
    assert isinstance(exc.value, ValueError)


def test_good_configs_pass():
    check_config(_base())
    check_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    check_config(yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text()))
    cfg = _base()
    cfg["report"] = {"cpm_paramset": "lambda_L_0.1"}
    cfg["cpm"]["stitch"] = {"both": ["sector_1", "sector_2"]}
    cfg["fields"]["sector_1"]["target_aperture"] = {"my_star": [[1, 2]]}  # user names: free
    check_config(cfg)


def test_ccds_is_a_known_section():
    check_config({"ccds": {"ccd1": {"source": "synthetic_ffi"}}})  # survey mode: no fields needed


@pytest.mark.parametrize(
    "config, line",
    [
        ({"fields": {"a": "not a mapping"}}, r"^config: fields\.a: 'not a mapping' is not of type 'object'$"),
        ({"fields": {"a": {"source": "synthetic"}}, "cpm": {"k": "many"}}, r"^config: cpm\.k: 'many' is not of type"),
        ({"fields": {"a": {"source": "synthetic"}}, "cpm": {"k": 1}}, r"^config: cpm\.k: 1 is less than the minimum"),
        ({"fields": {"a": {"source": "nowhere"}}}, r"^config: fields\.a\.source: 'nowhere' is not one of"),
        ({"fields": {"a": {}}}, r"^config: fields\.a: 'source' is a required property$"),
    ],
)
def test_wrong_types_name_the_key_in_one_line(config, line):
    with pytest.raises(ConfigError, match=line):
        check_config(config)


def test_paramset_names_agree_with_cpm():
    from workflow_lib.core.settings import _paramset_names
    from workflow_lib.cpm.model import paramset_names

    for cpm in ({}, {"sweep_lambda_L": [1.0, 0.1, 100, 1e-3]}):
        assert _paramset_names(cpm) == paramset_names(cpm)


@pytest.mark.parametrize(
    "override, line",
    [
        ("lfd: {solv: {}}", "error: config: unknown key 'lfd.solv'; did you mean 'lfd.solve'?"),
        ("cpm: {k: many}", "error: config: cpm.k: 'many' is not of type 'integer'"),
    ],
)
def test_snakemake_prints_one_line_for_a_bad_config(tmp_path, override, line):
    """Through Snakemake itself (not only check_config): exit status 1 and one line on stderr, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "bad.yaml").write_text(f"run: bad_config_test\n{override}\n")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path), "-n"]
    cmd += ["--configfile", str(repo / "config" / "config.yaml"), str(tmp_path / "bad.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [line], res.stderr
    assert not (tmp_path / "results").exists()
