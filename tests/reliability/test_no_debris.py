"""Multi-file outputs: no partial directory and no .tmp-* debris after a failure; stale debris cleaned."""

import pytest
from helpers.lightcurves import tiny_lightcurve_set

from workflow_lib.core.atomic import atomic_dir, remove_stale_tmp
from workflow_lib.data.lightcurves import write_lightcurve_fits


def _lcs(ids):
    return tiny_lightcurve_set(ids, "CPM")


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_failure_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "fits"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(out) as tmp:
            write_lightcurve_fits(_lcs([1, 2, 3]), tmp, "cpm")
            raise RuntimeError("killed mid-write")
    assert _names(tmp_path) == []  # no partial fits/, no .tmp-*


def test_failure_keeps_previous_complete_output(tmp_path):
    out = tmp_path / "fits"
    with atomic_dir(out) as tmp:
        write_lightcurve_fits(_lcs([1, 2]), tmp, "cpm")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            write_lightcurve_fits(_lcs([5, 6, 7]), tmp, "cpm")
            raise RuntimeError("boom")
    assert _names(tmp_path) == ["fits"] and _names(out) == ["cpm_1.fits", "cpm_2.fits"]


def test_rewrite_replaces_whole_directory(tmp_path):
    out = tmp_path / "fits"
    with atomic_dir(out) as tmp:
        write_lightcurve_fits(_lcs([1, 2, 3]), tmp, "lfd")
    with atomic_dir(out) as tmp:
        write_lightcurve_fits(_lcs([4]), tmp, "lfd")
    assert _names(out) == ["lfd_4.fits"]  # no file of the earlier run left behind
    assert _names(tmp_path) == ["fits"]


def test_stale_tmp_of_a_killed_run_cleaned_by_next_write(tmp_path):
    out = tmp_path / "fits"
    stale_dir = tmp_path / ".fits.tmp-deadbeef"  # atomic_dir of a killed run
    stale_dir.mkdir()
    (stale_dir / "cpm_1.fits").write_bytes(b"partial")
    stale_file = tmp_path / ".tmp-0badf00d-fits"  # atomic_path of a killed run
    stale_file.write_bytes(b"x")
    other = tmp_path / ".other.tmp-deadbeef"  # another output's debris: not ours, kept
    other.mkdir()
    keep = tmp_path / "fits.tmp-notours"
    keep.write_text("user file")
    with atomic_dir(out) as tmp:
        write_lightcurve_fits(_lcs([1]), tmp, "cpm")
    assert _names(tmp_path) == [".other.tmp-deadbeef", "fits", "fits.tmp-notours"]
    assert _names(out) == ["cpm_1.fits"]


def test_remove_stale_tmp_only_matching_names(tmp_path):
    (tmp_path / ".lightcurves.zarr.tmp-12345678").mkdir()
    (tmp_path / ".tmp-12345678-cube.zarr").mkdir()
    (tmp_path / ".tmp-12345678-catalog.ecsv").write_text("x")
    (tmp_path / "cube.zarr").mkdir()
    removed = remove_stale_tmp(tmp_path / "lightcurves.zarr", tmp_path / "cube.zarr", tmp_path / "absent" / "x")
    assert sorted(p.name for p in removed) == [".lightcurves.zarr.tmp-12345678", ".tmp-12345678-cube.zarr"]
    assert _names(tmp_path) == [".tmp-12345678-catalog.ecsv", "cube.zarr"]


def test_cpm_write_fits_dir_is_atomic(tmp_path, monkeypatch):
    from workflow_lib.steps import cpm as step

    out = tmp_path / "cpm" / "fits"
    (tmp_path / "cpm").mkdir()
    (tmp_path / "cpm" / ".fits.tmp-0000dead").mkdir()  # debris of a killed run
    step.write_fits_dir([(_lcs([1, 2]), "cpm"), (_lcs([1, 2]), "raw")], out)
    assert _names(tmp_path / "cpm") == ["fits"]
    assert _names(out) == ["cpm_1.fits", "cpm_2.fits", "raw_1.fits", "raw_2.fits"]
    # the second set fails half-way (duplicate ids): the complete earlier directory stays, no debris
    with pytest.raises(ValueError, match="same FITS file"):
        step.write_fits_dir([(_lcs([3]), "cpm"), (_lcs([4, 4]), "raw")], out)
    assert _names(tmp_path / "cpm") == ["fits"]
    assert _names(out) == ["cpm_1.fits", "cpm_2.fits", "raw_1.fits", "raw_2.fits"]


def test_manifest_ignores_writes_in_progress(tmp_path):
    """A kill leaves a half-written FITS inside a ``.tmp-*`` directory; the product manifest skips it."""
    from helpers.manifest import manifest

    out = tmp_path / "fits"
    with atomic_dir(out) as tmp:
        write_lightcurve_fits(_lcs([1, 2]), tmp, "cpm")
    complete = manifest(tmp_path)
    partial = tmp_path / ".fits.tmp-dead0001"
    partial.mkdir()
    (partial / "lc_1.fits").write_bytes(b"")  # truncated by the kill: not a FITS file
    (tmp_path / ".tmp-dead0002-lc_2.fits").write_bytes(b"SIMPLE")
    assert manifest(tmp_path) == complete
    assert len(complete) >= 2
