"""The one pixel-cube format shared by every mission and every stage.

A *cube* is an :class:`xarray.Dataset` stored as a zarr (format 3) store.

Image layout (a TESS cutout, a single Kepler/K2 stamp)::

    dims      (time, row, column)
    flux      float32  [e-/s]   calibrated pixel flux
    flux_err  float32  [e-/s]   1-sigma uncertainty
    background float32 [e-/s]   (optional) background that was removed / is known
    quality   int32             mission QUALITY bit flags (0 = good)
    coords    time [d]          BTJD (TESS, offset 2457000) or BKJD (Kepler, offset 2454833), TDB
              cadenceno int64   (time,)
              row, column int   CCD coordinates of the pixel centres

Pixel-table layout (many stamps of one Kepler channel, which LFD needs together)::

    dims      (time, pixel)
    same variables over (time, pixel); coords row(pixel), column(pixel), stamp(pixel)

``as_pixel_table`` turns either layout into the pixel-table view; LFD works on that view,
CPM and the report work on either.

Attributes (``ds.attrs``): ``mission`` (TESS/Kepler/K2), ``sector`` / ``quarter`` / ``campaign``,
``camera``/``ccd`` or ``channel``, ``wcs`` (a FITS header string; for pixel tables one per stamp in
``stamp_wcs``, a JSON list), ``time_system`` ('BTJD'|'BKJD'), ``time_offset`` (JD offset),
``time_scale`` ('tdb'), ``flux_unit`` ('electron / s'), ``provenance`` (JSON string, see
:mod:`workflow_lib.core.provenance`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from workflow_lib.core.atomic import atomic_path
from workflow_lib.core.logs import get_logger
from workflow_lib.core.parallel import dask_map

log = get_logger("cube")

#: chunk sizes used when writing cubes: a compromise that lets per-frame work (LFD solve,
#: whole time chunk) and per-pixel work (CPM, whole time series of a spatial block) both read
#: few chunks.
DEFAULT_CHUNKS = {"time": 256, "row": 32, "column": 32, "pixel": 1024}

TIME_SYSTEMS = {
    "TESS": ("BTJD", 2457000.0),
    "Kepler": ("BKJD", 2454833.0),
    "K2": ("BKJD", 2454833.0),
}

REQUIRED_VARS = ("flux", "flux_err", "quality")


class CubeError(ValueError):
    """A cube (or the file it came from) cannot be used; the message names the file."""


def make_cube(
    flux,
    flux_err,
    quality,
    time,
    cadenceno,
    row,
    column,
    *,
    mission: str,
    wcs_header: str | None = None,
    background=None,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Build an image-layout cube from numpy arrays.

    ``flux``/``flux_err``/``background`` have shape (ntime, nrow, ncol); ``row``/``column`` are
    1-D CCD coordinates of the pixel centres (lengths nrow, ncol).
    """
    if mission not in TIME_SYSTEMS:
        raise CubeError(f"unknown mission {mission!r}; expected one of {sorted(TIME_SYSTEMS)}")
    flux = np.asarray(flux, dtype=np.float32)
    if flux.ndim != 3:
        raise CubeError(f"flux must be 3-D (time, row, column), got shape {flux.shape}")
    dims = ("time", "row", "column")
    data_vars = {
        "flux": (dims, flux, {"units": "electron / s", "long_name": "pixel flux"}),
        "flux_err": (dims, np.asarray(flux_err, dtype=np.float32), {"units": "electron / s"}),
        "quality": (("time",), np.asarray(quality, dtype=np.int32), {"long_name": "QUALITY bit flags"}),
    }
    if background is not None:
        data_vars["background"] = (dims, np.asarray(background, dtype=np.float32), {"units": "electron / s"})
    tsys, toff = TIME_SYSTEMS[mission]
    coords = {
        "time": (
            "time",
            np.asarray(time, dtype=np.float64),
            {"units": "d", "time_system": tsys, "time_offset": toff, "scale": "tdb"},
        ),
        "cadenceno": ("time", np.asarray(cadenceno, dtype=np.int64)),
        "row": ("row", np.asarray(row, dtype=np.int32), {"long_name": "CCD row of pixel centre"}),
        "column": ("column", np.asarray(column, dtype=np.int32), {"long_name": "CCD column of pixel centre"}),
    }
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update(
        mission=mission,
        time_system=tsys,
        time_offset=toff,
        time_scale="tdb",
        flux_unit="electron / s",
        wcs=wcs_header or "",
    )
    if attrs:
        ds.attrs.update(attrs)
    return ds


def validate_cube(ds: xr.Dataset, name: str = "cube", *, min_pixels: int = 1, min_cadences: int = 1) -> None:
    """Raise :class:`CubeError` naming ``name`` if ``ds`` is not a usable cube."""
    missing = [v for v in REQUIRED_VARS if v not in ds]
    if missing:
        raise CubeError(f"{name}: missing variables {missing}")
    if "time" not in ds.dims:
        raise CubeError(f"{name}: no time dimension")
    npix = n_pixels(ds)
    if ds.sizes["time"] < min_cadences:
        raise CubeError(f"{name}: has {ds.sizes['time']} cadence(s); this step needs at least {min_cadences}")
    if npix < min_pixels:
        raise CubeError(f"{name}: has {npix} pixel(s); this step needs at least {min_pixels}")


def n_pixels(ds: xr.Dataset) -> int:
    if "pixel" in ds.dims:
        return int(ds.sizes["pixel"])
    return int(ds.sizes["row"] * ds.sizes["column"])


#: minimum sizes a cube needs before a scene model (LFD) or CPM can be fit to it
MIN_PIXELS = 4
MIN_CADENCES = 2


def validate_for_modelling(
    ds: xr.Dataset, name: str = "cube", *, min_pixels: int = MIN_PIXELS, min_cadences: int = MIN_CADENCES
) -> None:
    """Raise :class:`CubeError` naming ``name`` if ``ds`` is too small for a scene model (LFD) or CPM."""
    npix = n_pixels(ds)
    nt = int(ds.sizes["time"])
    if npix < min_pixels:
        plural = "pixel" if npix == 1 else "pixels"
        raise CubeError(
            f"{name}: {npix} {plural}: too small for a scene model or CPM (needs at least {min_pixels} pixels)"
        )
    if nt < min_cadences:
        plural = "cadence" if nt == 1 else "cadences"
        raise CubeError(
            f"{name}: {nt} {plural}: a single image has no time series to model or de-trend "
            f"(needs at least {min_cadences} cadences)"
        )
    flux = np.asarray(ds["flux"].values)
    if not np.isfinite(flux).any():
        raise CubeError(f"{name}: every flux value is NaN")


def as_pixel_table(ds: xr.Dataset, drop_nan: bool = True) -> xr.Dataset:
    """(time, pixel) view of a cube; image cubes are stacked row-major.

    Pixels whose flux is NaN at every cadence are dropped when ``drop_nan``.
    """
    if "pixel" in ds.dims:
        out = ds
    else:
        out = ds.stack(pixel=("row", "column"))
        rows = out["row"].values
        cols = out["column"].values
        out = out.drop_vars(["pixel", "row", "column"]).assign_coords(
            row=("pixel", rows.astype(np.int32)),
            column=("pixel", cols.astype(np.int32)),
            stamp=("pixel", np.zeros(rows.size, dtype=np.int32)),
        )
        out = out.transpose("time", "pixel", ...)
    if drop_nan:
        good = np.isfinite(out["flux"].values).any(axis=0)
        if not good.all():
            out = out.isel(pixel=np.flatnonzero(good))
    return out


def concat_stamps(stamps: list[xr.Dataset]) -> xr.Dataset:
    """Join image cubes of one channel (same cadences) into one pixel-table cube.

    The stamp WCS headers are kept in ``attrs['stamp_wcs']`` (JSON list), each stamp's CCD
    (column, row) origin in ``attrs['stamp_origin']`` (JSON list), and the per-stamp
    attrs (target ids etc.) in ``attrs['stamps']`` (JSON list).
    """
    if not stamps:
        raise CubeError("no stamps to join")
    ref = stamps[0]
    tables = []
    for k, st in enumerate(stamps):
        if st.sizes["time"] != ref.sizes["time"] or not np.array_equal(st["cadenceno"].values, ref["cadenceno"].values):
            raise CubeError(f"stamp {k} ({st.attrs.get('source_file', '?')}) has different cadences from stamp 0")
        t = as_pixel_table(st, drop_nan=True)
        t = t.assign_coords(stamp=("pixel", np.full(t.sizes["pixel"], k, dtype=np.int32)))
        t = t.drop_vars([v for v in ("time", "cadenceno") if v in t.coords and k > 0])
        tables.append(t)
    out = xr.concat(
        tables,
        dim="pixel",
        data_vars="minimal",
        combine_attrs="drop_conflicts",
        coords="minimal",
        compat="override",
        join="outer",
    )
    out = out.assign_coords(time=ref["time"], cadenceno=ref["cadenceno"])
    # overlapping stamps (neighbouring targets) read the same CCD pixel: keep it once (first stamp),
    # so that no pixel counts twice as an independent measurement in the scene fits
    rc = np.column_stack([out["row"].values, out["column"].values])
    _, first = np.unique(rc, axis=0, return_index=True)
    n_dup = out.sizes["pixel"] - first.size
    if n_dup:
        out = out.isel(pixel=np.sort(first))
        log.info("joined stamps: %d pixels read by more than one stamp kept once (first stamp)", n_dup)
    # a cadence is flagged for the field if any stamp flags it
    out["quality"] = (
        "time",
        np.bitwise_or.reduce([st["quality"].values for st in stamps], axis=0),
        ref["quality"].attrs,
    )
    # field-level attrs: what all stamps share (mission, quarter, channel...), not one target's
    out.attrs = {
        k: v
        for k, v in ref.attrs.items()
        if k not in ("wcs", "source_file") and all(_same(st.attrs.get(k), v) for st in stamps)
    }
    out.attrs["stamp_wcs"] = json.dumps([st.attrs.get("wcs", "") for st in stamps])
    # CCD (column, row) of each stamp's first pixel: the origin of the 0-based indices its WCS maps
    out.attrs["stamp_origin"] = json.dumps([[int(st["column"].values[0]), int(st["row"].values[0])] for st in stamps])
    out.attrs["stamps"] = json.dumps(
        [{k: python_scalar(v) for k, v in st.attrs.items() if k != "wcs"} for st in stamps]
    )
    out.attrs["layout"] = "pixel_table"
    out.attrs["duplicate_pixels_dropped"] = int(n_dup)
    return out


def _same(a, b) -> bool:
    try:
        return bool(np.all(a == b))
    except Exception:
        return False


def python_scalar(v):
    """``v`` with numpy integer / floating / bool scalars as Python int / float / bool (JSON, FITS headers)."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def cube_wcs(ds: xr.Dataset, stamp: int | None = None):
    """astropy WCS of the cube (or of one stamp of a pixel table); None if unknown.

    The WCS maps 0-based array indices (x = column index, y = row index) to the sky.
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    if stamp is not None and "stamp_wcs" in ds.attrs:
        hdr = json.loads(ds.attrs["stamp_wcs"])[stamp]
    else:
        hdr = ds.attrs.get("wcs", "")
    if not hdr:
        return None
    return WCS(fits.Header.fromstring(hdr, sep="\n"))


def wcs_to_header_string(wcs) -> str:
    return wcs.to_header(relax=True).tostring(sep="\n")


# ---------------------------------------------------------------- zarr I/O (atomic)


def _chunks_for(ds: xr.Dataset) -> dict:
    return {d: min(DEFAULT_CHUNKS.get(d, ds.sizes[d]), ds.sizes[d]) for d in ds.dims}


def write_zarr_atomic(ds: xr.Dataset, path: str | os.PathLike, *, chunks: dict | None = None) -> Path:
    """Write ``ds`` as a zarr v3 store at ``path`` atomically.

    The store is written to a hidden temporary sibling and renamed into place, so a failed or
    interrupted write never leaves a half-written result at ``path``. An existing store (or the empty
    directory Snakemake creates for an output ``<store>/zarr.json``) is replaced.

    The metadata is consolidated into the root ``zarr.json``, so ``xarray.open_zarr(path)`` opens the
    store without a warning (zarr's note that consolidated metadata is not part of the v3
    specification is silenced: zarr-python and xarray read it).
    """
    import warnings

    ch = chunks or _chunks_for(ds)
    ds = ds.copy()
    for v in list(ds.data_vars) + list(ds.coords):
        ds[v].encoding = {}
    ds = ds.chunk({d: c for d, c in ch.items() if d in ds.dims})
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True)
    return Path(path)


def open_cube(path: str | os.PathLike, *, chunks="auto", validate: bool = True) -> xr.Dataset:
    """Open a cube store lazily (dask-backed); raise :class:`CubeError` naming the path."""
    path = Path(path)
    if not path.exists():
        raise CubeError(f"{path}: no such cube store")
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks={} if chunks == "auto" else chunks)
    except Exception as exc:  # zarr raises many kinds
        raise CubeError(f"{path}: not a readable zarr cube ({exc})") from exc
    if validate:
        validate_cube(ds, str(path))
    return ds


# ---------------------------------------------------------------- zarr I/O (many writers, chunk-aligned regions)


def _region_grid(sizes: dict, step: dict, split) -> list[dict]:
    """All regions (dicts of slices) that tile ``split`` dims in blocks of ``step``."""
    import itertools

    axes = [[slice(i, min(i + step[d], sizes[d])) for i in range(0, sizes[d], step[d])] for d in split]
    return [dict(zip(split, combo)) for combo in itertools.product(*axes)]


def init_zarr_regions(
    ds_template: xr.Dataset,
    path: str | os.PathLike,
    *,
    chunks: dict | None = None,
    shards: dict | None = None,
    split=None,
) -> tuple[Path, list[dict]]:
    """Create a zarr v3 store for ``ds_template`` without writing its big variables; return the store
    path and the list of write regions (dicts of slices, aligned with the chunks, or with the shards
    when ``shards`` is given).

    ``ds_template``: the Dataset to be written, with its final shapes, dtypes, coords and attrs.  Its
    lazy (dask-backed, e.g. ``dask.array.empty``) data variables that span a ``split`` dim are the
    ones filled region by region: only their metadata is written here.  Coords and in-memory (numpy)
    variables are written now with their values (small things: quality flags, time); lazy variables
    that span no ``split`` dim are computed and written now.  ``split``: the dims regions are cut
    along (default: every dim cut into more than one chunk/shard).

    ``shards`` (zarr v3 sharding): dim -> shard size, a multiple of the chunk size of that dim.  Each
    shard is ONE file holding many chunks, so a 2048x2048x4000 cube has ~10^3 files instead of 10^5
    (HPC file-count quotas).  Regions are then whole shards: two workers never write one file.
    """
    import dask.array as da

    path = Path(path)
    ch = dict(chunks or _chunks_for(ds_template))
    ch = {d: min(int(ch.get(d, ds_template.sizes[d])), ds_template.sizes[d]) for d in ds_template.dims}
    unit = dict(ch)
    if shards:
        for d, s in shards.items():
            if d not in ch:
                raise CubeError(f"shards: {d!r} is not a dimension of the dataset ({list(ch)})")
            s = min(int(s), ds_template.sizes[d])
            if s % ch[d] and s != ds_template.sizes[d]:
                raise CubeError(f"shards: {d}={s} is not a multiple of the chunk size {ch[d]}")
            unit[d] = s
    if split is None:
        split = [d for d in ds_template.dims if unit[d] < ds_template.sizes[d]]
    split = [d for d in split if d in ds_template.dims]
    ds = ds_template.copy()
    for v in list(ds.data_vars) + list(ds.coords):
        ds[v].encoding = {}
    for name, var in ds.data_vars.items():
        enc = {"chunks": tuple(ch[d] for d in var.dims)}
        if shards:
            enc["shards"] = tuple(unit[d] for d in var.dims)
        ds[name].encoding = enc
        if not isinstance(var.data, da.Array):
            continue  # in memory: written now, with its values
        if any(d in split for d in var.dims):  # lazy: only metadata now, values region by region
            ds[name] = var.copy(data=var.data.rechunk(tuple(unit[d] for d in var.dims)))
        else:
            ds[name] = var.compute()
        ds[name].encoding = enc
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, compute=False)
    return path, _region_grid(dict(ds.sizes), unit, split)


def write_zarr_region(part: xr.Dataset, path: str | os.PathLike, region: dict) -> None:
    """Write the values of one region (``part``: the split data variables over that region) into a
    store made by :func:`init_zarr_regions`.  Safe to run concurrently for different regions."""
    region = {d: s for d, s in region.items()}
    part = part.drop_vars([c for c in part.coords])
    keep = [v for v in part.data_vars if any(d in region for d in part[v].dims)]
    part = part[keep]
    for v in part.data_vars:
        part[v].encoding = {}
    for d, s in region.items():
        n = s.stop - s.start
        if d in part.dims and part.sizes[d] != n:
            raise CubeError(f"{path}: region {d}={s.start}:{s.stop} needs {n} values, got {part.sizes[d]}")
    part.to_zarr(path, region={d: s for d, s in region.items() if d in part.dims}, mode="r+", consolidated=False)


def _write_one_region(region, path, compute_region):
    write_zarr_region(compute_region(region), path, region)
    return {d: (s.start, s.stop) for d, s in region.items()}


def write_zarr_regions(
    ds_template: xr.Dataset,
    path: str | os.PathLike,
    compute_region,
    *,
    chunks: dict | None = None,
    shards: dict | None = None,
    split=None,
    threads: int = 1,
    scheduler: str | None = None,
) -> Path:
    """Write a store region by region, each region computed and written by one dask task.

    ``compute_region(region) -> xr.Dataset`` returns the split data variables over ``region`` (a dict
    dim -> slice, aligned with the chunks/shards, see :func:`init_zarr_regions`).  Tasks run with the
    compute context of :mod:`workflow_lib.core.parallel` (``threads`` / ``scheduler``: e.g. a
    dask.distributed scheduler whose workers share the file system), so many workers, on many nodes,
    fill one cube without locks: no two regions touch one chunk (or shard) file.  The store is built
    in a hidden temporary sibling and renamed to ``path`` when every region is written (atomic, like
    :func:`write_zarr_atomic`).  ``compute_region`` must be picklable for a distributed scheduler
    (a module-level function or a ``functools.partial`` of one).
    """

    path = Path(path)
    with atomic_path(path) as tmp:
        _, regions = init_zarr_regions(ds_template, tmp, chunks=chunks, shards=shards, split=split)
        dask_map(
            _write_one_region,
            [(r,) for r in regions],
            threads=threads,
            scheduler=scheduler,
            shared=dict(path=str(tmp), compute_region=compute_region),
        )
    return Path(path)


def pixel_coordinates(cube: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) of every pixel of ``as_pixel_table(cube, drop_nan=False)``."""
    if "pixel" in cube.dims:
        return np.asarray(cube["column"].values, float), np.asarray(cube["row"].values, float)
    return (
        np.tile(np.asarray(cube["column"].values, float), cube.sizes["row"]),
        np.repeat(np.asarray(cube["row"].values, float), cube.sizes["column"]),
    )
