"""Chunk-aligned region writes of one zarr cube by many tasks (workflow_lib.cube.write_zarr_regions)."""

import functools
import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from workflow_lib.data.cube import (
    CubeError,
    init_zarr_regions,
    make_cube,
    open_cube,
    write_zarr_atomic,
    write_zarr_regions,
)

NT, NR, NC = 50, 20, 12


def full_cube():
    t, r, c = np.meshgrid(np.arange(NT), np.arange(NR), np.arange(NC), indexing="ij")
    flux = (1000.0 * np.sin(0.1 * t + 0.3 * r) + 7.0 * c + 0.001 * t * r * c).astype(np.float32)
    quality = np.zeros(NT, np.int32)
    quality[[3, 40]] = 32
    return make_cube(
        flux,
        np.sqrt(np.abs(flux)) + 1,
        quality,
        1325.0 + np.arange(NT) / 48.0,
        np.arange(NT) + 100,
        500 + np.arange(NR),
        900 + np.arange(NC),
        mission="TESS",
        attrs={"sector": 1},
    )


def template(ds):
    """Same shapes/dtypes/coords/attrs; the big variables lazy and empty (values come per region)."""
    tpl = ds.copy()
    for v in ("flux", "flux_err"):
        tpl[v] = (ds[v].dims, da.empty(ds[v].shape, dtype=ds[v].dtype), ds[v].attrs)
    return tpl


def region_of(ds, calls, region):
    """compute_region: the values of the full cube over ``region`` (records the call)."""
    if calls is not None:
        calls.append({d: (s.start, s.stop) for d, s in region.items()})
    return ds[["flux", "flux_err"]].isel(region)


def chunk_files(store: Path, var="flux") -> list:
    return [p for p in (store / var).rglob("*") if p.is_file() and p.name != "zarr.json"]


def test_regions_tile_the_cube_and_match_plain_write(tmp_path):
    ds = full_cube()
    calls = []
    chunks = {"time": 16, "row": 8, "column": 12}
    out = write_zarr_regions(
        template(ds), tmp_path / "cube.zarr", functools.partial(region_of, ds, calls), chunks=chunks, threads=2
    )
    # regions are the chunk grid: 4 time x 3 row blocks (column is one chunk), each written once
    assert len(calls) == 4 * 3
    key = lambda c: (c["time"], c["row"])  # noqa: E731
    assert sorted(calls, key=key) == [
        {"time": (t, min(t + 16, NT)), "row": (r, min(r + 8, NR))} for t in range(0, NT, 16) for r in range(0, NR, 8)
    ]
    for reg in calls:
        assert reg["time"][0] % 16 == 0 and reg["row"][0] % 8 == 0
    got = open_cube(out).load()
    ref = open_cube(write_zarr_atomic(ds, tmp_path / "ref.zarr", chunks=chunks)).load()
    xr.testing.assert_identical(got, ref)
    assert got.attrs["sector"] == 1 and got["quality"].values[3] == 32
    assert got["flux"].encoding["chunks"] == (16, 8, 12)
    assert not list(tmp_path.glob(".cube.zarr.tmp-*"))


def test_split_along_time_only(tmp_path):
    ds = full_cube()
    calls = []
    write_zarr_regions(
        template(ds),
        tmp_path / "c.zarr",
        functools.partial(region_of, ds, calls),
        chunks={"time": 10, "row": 4, "column": 4},
        split=("time",),
    )
    assert [c["time"] for c in sorted(calls, key=lambda c: c["time"])] == [(i, i + 10) for i in range(0, NT, 10)]
    assert all(set(c) == {"time"} for c in calls)
    np.testing.assert_array_equal(open_cube(tmp_path / "c.zarr")["flux"].values, ds["flux"].values)


def test_sharded_store_has_few_files(tmp_path):
    ds = full_cube()
    chunks = {"time": 5, "row": 4, "column": 4}
    calls = []
    write_zarr_regions(template(ds), tmp_path / "plain.zarr", functools.partial(region_of, ds, None), chunks=chunks)
    write_zarr_regions(
        template(ds),
        tmp_path / "shard.zarr",
        functools.partial(region_of, ds, calls),
        chunks=chunks,
        shards={"time": 25, "row": 20, "column": 12},
        threads=2,
    )
    assert len(calls) == 2  # one region per shard: 2 shards along time, 1 in row and column
    n_plain, n_shard = len(chunk_files(tmp_path / "plain.zarr")), len(chunk_files(tmp_path / "shard.zarr"))
    assert n_plain == 10 * 5 * 3 and n_shard == 2
    meta = json.loads((tmp_path / "shard.zarr" / "flux" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [5, 4, 4]
    got = open_cube(tmp_path / "shard.zarr").load()
    np.testing.assert_array_equal(got["flux"].values, ds["flux"].values)
    np.testing.assert_array_equal(got["flux_err"].values, ds["flux_err"].values)


def test_distributed_workers_write_one_cube(tmp_path):
    pytest.importorskip("distributed")
    ds = full_cube()
    out = write_zarr_regions(
        template(ds),
        tmp_path / "d.zarr",
        functools.partial(region_of, ds, None),
        chunks={"time": 16, "row": 8, "column": 6},
        scheduler="local:2",
    )
    np.testing.assert_array_equal(open_cube(out)["flux"].values, ds["flux"].values)


def test_errors(tmp_path):
    ds = full_cube()
    with pytest.raises(CubeError, match="multiple of the chunk"):
        init_zarr_regions(template(ds), tmp_path / "x.zarr", chunks={"time": 16}, shards={"time": 20})
    with pytest.raises(CubeError, match="not a dimension"):
        init_zarr_regions(template(ds), tmp_path / "x.zarr", shards={"pixel": 20})

    def short(region):  # one cadence too few in every region
        return ds[["flux", "flux_err"]].isel(region).isel(time=slice(1, None))

    with pytest.raises(CubeError, match=r"region time=\d+:\d+ needs \d+ values, got"):
        write_zarr_regions(template(ds), tmp_path / "bad.zarr", short, chunks={"time": 16, "row": 20, "column": 12})
    assert not (tmp_path / "bad.zarr").exists() and not list(tmp_path.glob(".bad.zarr.tmp-*"))


def test_overlapping_stamps_keep_each_ccd_pixel_once(shared_data):
    """tpf_test_00/01/02 (Kepler Q12 channel 4) overlap: a CCD pixel read by two stamps is kept once."""
    from workflow_lib.data.cube import concat_stamps
    from workflow_lib.data.fits_reader import read_fits_cube

    files = sorted((shared_data / "kepler").glob("tpf_test_0*.fits"))
    stamps = [read_fits_cube(f) for f in files]
    joined = concat_stamps(stamps)
    rc = np.column_stack([joined["row"].values, joined["column"].values])
    assert np.unique(rc, axis=0).shape[0] == joined.sizes["pixel"]
    n_all = sum(int(np.isfinite(s["flux"].values).any(axis=0).sum()) for s in stamps)
    assert joined.attrs["duplicate_pixels_dropped"] == n_all - joined.sizes["pixel"]
