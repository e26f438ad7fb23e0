"""results_path never resolves outside results/."""

import os

import pytest

from workflow_lib.core.paths import results_path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    return tmp_path


def test_plain_names(in_tmp):
    assert results_path("my_run") == "results/my_run"
    assert results_path("my_run", "synth_a", "cube.zarr") == "results/my_run/synth_a/cube.zarr"
    assert results_path("my_run", "rules") == "results/my_run/rules"  # a field named like a pipeline folder
    assert results_path("my_run", "logs") == "results/my_run/logs"
    assert results_path("my_run", "{field}", "cube.zarr") == "results/my_run/{field}/cube.zarr"  # wildcards


@pytest.mark.parametrize(
    "args, key, why",
    [
        (("..",), "run", "contains '..'"),
        (("../outside",), "run", "contains '..'"),
        (("a/../../b",), "run", "contains '..'"),
        (("/etc",), "run", "absolute path"),
        (("",), "run", "empty"),
        ((".",), "run", "names the folder itself"),
        (("~user",), "run", "'~'"),
        (("ok", ".."), "field", "contains '..'"),
        (("ok", "../other_run"), "field", "contains '..'"),
        (("ok", "/tmp/x"), "field", "absolute path"),
        (("ok", "f", "../../.."), "path part 2", "contains '..'"),
        ((None,), "run", "not a name"),
    ],
)
def test_escapes_refused_one_line(in_tmp, args, key, why):
    with pytest.raises(ValueError) as exc:
        results_path(*args)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"config {key}=")
    assert why in msg
    assert repr(args[-1] if key != "run" else args[0]) in msg


def test_symlink_out_refused(in_tmp, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    os.symlink(outside, in_tmp / "results" / "evil")
    with pytest.raises(ValueError, match=r"config run='evil' escapes results/: .*symlink"):
        results_path("evil")
    (in_tmp / "results" / "run").mkdir()
    os.symlink(outside, in_tmp / "results" / "run" / "fieldlink")
    with pytest.raises(ValueError, match=r"config field='fieldlink' escapes"):
        results_path("run", "fieldlink")
    os.symlink(in_tmp / "results" / "other", in_tmp / "results" / "run" / "torun")
    with pytest.raises(ValueError, match="config field='torun'"):  # into another run: also refused
        results_path("run", "torun")


def test_results_root_itself_may_be_a_symlink(in_tmp, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("scratch")
    os.rmdir(in_tmp / "results")
    os.symlink(scratch, in_tmp / "results")
    assert results_path("run", "f") == "results/run/f"


def test_custom_key_names(in_tmp):
    with pytest.raises(ValueError, match=r"^config fields\.x/y='\.\.'"):
        results_path("run", "..", keys=("run", "fields.x/y"))
