"""Survey-mode steps the rules call: a CCD of FFIs -> one cube -> tiles (cube + catalog each) -> per-tile
LFD / CPM (the ordinary field steps, on the tile's files) -> one merged light-curve set per CCD and method.

Every step writes its product atomically (temporary sibling + rename).  Defaults come from the ``survey``
section of ``workflow_lib/schema.yaml``.  The CCD catalog is made once per CCD by the ordinary crossmatch
(:func:`workflow_lib.data.gaia.crossmatch_field` on the CCD cube: one Gaia query per CCD);
:func:`split_catalog_step` gives each tile its subset.  See docs/SURVEY.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from astropy.table import Table

from workflow_lib.core.atomic import atomic_dir, atomic_path, save_npz_deterministic, write_text_atomic
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance, provenance_json
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.data.cube import CubeError, open_cube, write_zarr_atomic
from workflow_lib.data.gaia import read_field_catalog
from workflow_lib.data.lightcurves import write_lightcurve_fits
from workflow_lib.data.tiles import cut_tile, find_tile, grid_for_cube, split_catalog
from workflow_lib.survey.merge import MergeError, combine_source_tables, merge_tile_sets, missing_tiles

log = get_logger("survey")


def survey_params(params: dict | None = None) -> dict:
    """The ``survey`` settings: schema defaults updated with ``params`` (unknown keys refused)."""
    return merge_settings(schema_defaults("survey"), params, "survey")


def _write_table(table: Table, path) -> Path:
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.ecsv")
    return Path(path)


def read_grid(grid_json) -> dict:
    """The ``tiles.json`` written by :func:`write_tile_grid`."""
    try:
        grid = json.loads(Path(grid_json).read_text())
    except (OSError, ValueError) as exc:
        raise CubeError(f"{grid_json}: not a readable tile grid ({exc})") from exc
    if "tiles" not in grid:
        raise CubeError(f"{grid_json}: no 'tiles' in the tile grid")
    return grid


# ---------------------------------------------------------------- CCD: FFIs and cube


def write_synthetic_ccd(out_dir_of_ffis, out_catalog, out_truth, params: dict | None = None) -> dict:
    """A synthetic CCD as SPOC FFIs (:func:`workflow_lib.data.synthetic_ffi.write_synthetic_ffis`).

    Writes the ``*_ffic.fits`` files into the directory ``out_dir_of_ffis`` (built in a temporary sibling
    and renamed: Snakemake ``directory()`` output), the Gaia-like catalog to ``out_catalog`` (ECSV, the
    ``local_catalog`` of the CCD crossmatch) and the truth to ``out_truth`` (zarr, docs/DATA_MODEL.md).
    ``params``: ``survey.synthetic`` keys.  Returns ``{'ffi_dir', 'catalog', 'truth', 'n_files'}``.
    """
    p = merge_settings(schema_defaults("survey.synthetic"), params, "survey.synthetic")
    out_dir = Path(out_dir_of_ffis)
    with atomic_dir(out_dir) as work:  # the FFIs appear at out_dir all at once, or not at all
        from workflow_lib.data.synthetic_ffi import write_synthetic_ffis  # here: the tile steps never need it

        res = write_synthetic_ffis(work, **p)
        with atomic_path(out_catalog) as tmp:
            shutil.move(str(res.catalog), tmp)
        with atomic_path(out_truth) as tmp:
            shutil.move(str(res.truth), tmp)
    log.info("synthetic CCD: %d FFIs in %s, catalog %s, truth %s", len(res.files), out_dir, out_catalog, out_truth)
    return {"ffi_dir": out_dir, "catalog": Path(out_catalog), "truth": Path(out_truth), "n_files": len(res.files)}


def ingest_ccd(ffi_dir_or_glob, out_cube, params: dict | None = None) -> dict:
    """FFIs of one sector/camera/CCD -> one cube store ``out_cube`` (:func:`workflow_lib.data.ffi.ingest_ffis`,
    resumable, atomic).  ``ffi_dir_or_glob``: a directory, a glob pattern (``data/ffi/*-4-2-*_ffic.fits``)
    or a list of files.  ``params``: ``survey.ingest`` keys.  Returns ingest_ffis' dict."""
    p = merge_settings(schema_defaults("survey.ingest"), params, "survey.ingest")
    src = ffi_dir_or_glob
    if isinstance(src, (str, Path)) and not Path(src).exists() and any(ch in str(src) for ch in "*?["):
        import glob

        src = sorted(glob.glob(str(src)))
        if not src:
            raise CubeError(f"{ffi_dir_or_glob}: no FFI file matches")
    from workflow_lib.data.ffi import ingest_ffis  # here: its FITS reader is not needed by the tile steps

    return ingest_ffis(
        src,
        out_cube,
        frames_per_block=p["frames_per_block"],
        threads=int(p["threads"]),
        keep_frames=bool(p["keep_frames"]),
        checksums=bool(p["checksums"]),
        config=p,
    )


# ---------------------------------------------------------------- tiles


def write_tile_grid(cube_path, out_json, tile_size: int | None = None, margin: int | None = None) -> dict:
    """The tile grid of a CCD cube -> ``tiles.json`` (atomic): ``{cube, n_rows, n_cols, row0, col0, tile_size,
    margin, tile_ids, tiles, provenance}`` (tiles: :func:`workflow_lib.data.tiles.tile_grid`).  Defaults:
    ``survey.tile_size`` / ``survey.margin``.  ``tile_ids`` is what a checkpoint expands the tile wildcard to."""
    d = schema_defaults("survey")
    tile_size = int(d["tile_size"] if tile_size is None else tile_size)
    margin = int(d["margin"] if margin is None else margin)
    cube = open_cube(cube_path)
    grid = grid_for_cube(cube, tile_size, margin)
    out = {"cube": str(cube_path), **{k: v for k, v in grid.items() if k != "tiles"}}
    out["tile_ids"] = [t["id"] for t in grid["tiles"]]
    out["tiles"] = grid["tiles"]
    out["provenance"] = provenance("survey_tiles", [str(cube_path)], {"tile_size": tile_size, "margin": margin})
    write_text_atomic(json.dumps(out, indent=1, default=str) + "\n", out_json)
    log.info("%s: %d tiles of %d px + %d px halo -> %s", cube_path, len(grid["tiles"]), tile_size, margin, out_json)
    return out


def tile_chunks(tile_cube) -> dict:
    """Zarr chunks of a tile's cube: the whole tile in space, 256 cadences in time.

    Every tile step reads the whole tile, so small spatial chunks only add per-chunk overhead: on a
    144 x 144 x 1,300 tile, whole-tile chunks cost 2.4 instead of 4.2 CPU-s to write and ~0.6 CPU-s
    less per read (7 reads per tile; measured back to back in one process, docs/SURVEY.md, "CPU measured
    exactly"). Values are the same."""
    return {
        "time": min(256, tile_cube.sizes["time"]),
        "row": tile_cube.sizes["row"],
        "column": tile_cube.sizes["column"],
    }


def cut_tile_step(cube_path, grid_json, tile_id: str, out_cube) -> Path:
    """One tile's cube (its halo region of the CCD cube, WCS shifted, attrs ``tile_id``/``tile``/``tile_core``)
    -> ``out_cube`` (zarr, atomic): the ``cube.zarr`` of a field for the LFD / CPM steps."""
    grid = read_grid(grid_json)
    tile = find_tile(grid, tile_id)
    cube = open_cube(cube_path)
    t = cut_tile(cube, tile)
    t.attrs["provenance"] = provenance_json("survey_tile_cube", inputs=[cube_path, grid_json], config={"tile": tile_id})
    write_zarr_atomic(t, out_cube, chunks=tile_chunks(t))
    log.info("tile %s: %d x %d px -> %s", tile_id, t.sizes["row"], t.sizes["column"], out_cube)
    return Path(out_cube)


def split_catalog_step(catalog_path, grid_json, tile_id: str, out_catalog, reach: float | None = None) -> Table:
    """One tile's catalog from the CCD catalog (:func:`workflow_lib.data.tiles.split_catalog`: halo sources +
    ``reach`` px, columns ``in_core``, ``tile_edge_distance``, ``on_ccd``; ``on_cutout`` = on the tile)
    -> ``out_catalog`` (ECSV, atomic): the ``catalog.ecsv`` of a field.  ``reach``: ``survey.catalog_reach``."""
    grid = read_grid(grid_json)
    tile = find_tile(grid, tile_id)
    catalog = read_field_catalog(catalog_path)
    out = split_catalog(catalog, tile, reach)
    out.meta["provenance"] = provenance("survey_tile_catalog", [str(catalog_path), str(grid_json)], {"tile": tile_id})
    _write_table(out, out_catalog)
    log.info("tile %s: %d sources (%d in the core) -> %s", tile_id, len(out), int(out["in_core"].sum()), out_catalog)
    return out


# ---------------------------------------------------------------- merge


def merge_tiles_step(
    lightcurve_paths: dict,
    grid_json,
    catalog_path,
    out_zarr,
    out_table,
    set_name: str,
    *,
    fits_dir=None,
    params: dict | None = None,
) -> dict:
    """Merge the per-tile light-curve sets of one CCD and one method into one set (:mod:`workflow_lib.survey.merge`).

    ``lightcurve_paths``: tile id -> that tile's ``lightcurves.zarr`` (e.g. ``lfd/lightcurves.zarr`` or
    ``cpm/default/lightcurves.zarr``); ``catalog_path``: the CCD catalog; ``set_name``: a short name
    (``lfd``, ``cpm_default``) used as the prefix of the table's per-set columns.  Writes ``out_zarr`` (the
    merged ``(source, time)`` set, every catalog source once), ``out_table`` (ECSV source table; overlap QA
    in its meta) and, with ``fits_dir`` (or ``survey.write_fits``: then ``<out_zarr's dir>/fits``), one
    lightkurve-readable FITS per measured source named ``<set_name>_<source_id>.fits``.  Returns the QA dict
    (``overlap_consistency``, ``n_overlap``, ``n_sources``, ``n_measured``, ``n_tiles``, ``missing_tiles``,
    ``set``).  A grid tile without a path is refused unless ``survey.allow_missing_tiles`` (then it is
    listed in the merged attrs and table meta ``missing_tiles``; docs/SURVEY.md, "A failed tile").
    """
    p = survey_params(params)
    grid = read_grid(grid_json)
    missing = missing_tiles(lightcurve_paths, grid["tiles"])
    if missing and not p["allow_missing_tiles"]:
        raise MergeError(
            f"{len(missing)} tiles of {grid_json} have no light curves ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); set survey.allow_missing_tiles to merge without them"
        )
    catalog = read_field_catalog(catalog_path)
    sets = {}
    for tid, path in sorted(lightcurve_paths.items()):
        try:
            sets[tid] = open_cube(path, validate=False)  # lazy: each tile's arrays are read once, in turn
        except CubeError as exc:
            raise CubeError(f"tile {tid}: {exc}") from exc
    merged, table, qa = merge_tile_sets(
        sets, grid["tiles"], catalog, set_name=set_name, cdpp_hours=tuple(p["cdpp_hours"])
    )
    merged.attrs["provenance"] = provenance_json(
        "survey_merge",
        inputs=[catalog_path, grid_json, *[lightcurve_paths[t] for t in sorted(lightcurve_paths)]],
        config={"set": set_name, **{k: v for k, v in p.items() if k != "synthetic"}},
    )
    table.meta["provenance"] = merged.attrs["provenance"]
    write_zarr_atomic(merged, out_zarr)
    _write_table(table, out_table)
    if fits_dir is None and p["write_fits"]:
        fits_dir = Path(out_zarr).parent / "fits"
    if fits_dir is not None:
        _write_fits(merged, fits_dir, set_name)
    return qa


def _write_fits(merged, fits_dir, prefix: str, source_ids=None) -> list[Path]:
    keep = np.asarray(merged["tile"].values != "", bool)
    if source_ids is not None:
        keep &= np.isin(np.asarray(merged["source_id"].values, np.int64), np.asarray(list(source_ids), np.int64))
    paths = write_lightcurve_fits(merged.isel(source=np.flatnonzero(keep)), fits_dir, prefix)
    log.info("wrote %d FITS light curves to %s", len(paths), fits_dir)
    return paths


def write_fits_step(merged_zarr, fits_dir, set_name: str, source_ids=None) -> list[Path]:
    """On request: one lightkurve-readable FITS file per measured source of a merged set
    (:func:`workflow_lib.data.lightcurves.write_lightcurve_fits`), ``<fits_dir>/<set_name>_<source_id>.fits``,
    each written atomically; ``source_ids`` limits it to those sources.  Returns the paths."""
    merged = open_cube(merged_zarr, validate=False).load()
    return _write_fits(merged, fits_dir, set_name, source_ids)


def survey_table_step(tables: dict, out_table) -> Table:
    """One source table of a CCD with every set side by side (CDPP of every set, overlap QA of every set in
    the meta): ``tables``: set name -> the ``out_table`` of :func:`merge_tiles_step`.  ECSV, atomic."""
    loaded = {name: Table.read(str(path), format="ascii.ecsv") for name, path in tables.items()}
    out = combine_source_tables(loaded)
    out.meta.pop("provenance", None)
    out.meta["provenance"] = provenance("survey_table", [str(tables[k]) for k in tables], {"sets": list(tables)})
    _write_table(out, out_table)
    return out


def ccd_motion_step(offsets: dict, out_npz, out_json, params: dict | None = None) -> dict:
    """The CCD-level scene motion from every tile's scene offsets (survey mode, ``survey.motion: ccd``).

    ``offsets``: {tile id: its ``scene_offsets.npz``}. Fits eq. 1 of :mod:`workflow_lib.survey.motion`,
    y_kt = a_k + c_t + D_t (x_k - x0, y_k - y0), D_t = D_0 + tau_t E, robustly over the tiles (gains outside
    1 +- ``survey.ccd_motion.gain_tolerance`` flagged and left out); writes the model (``ccd_motion.npz``,
    which each tile's motion_model evaluates at its centre) and the per-tile QA (``ccd_motion.json``).
    Returns the QA dict.
    """
    from workflow_lib.survey.motion import fit_ccd_motion, load_tile_offsets, qa_summary

    p = merge_settings(schema_defaults("survey.ccd_motion"), params, "survey.ccd_motion")
    tiles = {str(t): load_tile_offsets(path) for t, path in sorted(offsets.items())}
    model = fit_ccd_motion(
        tiles,
        gain_tolerance=float(p["gain_tolerance"]),
        clip=float(p["clip"]),
        differential=bool(p["differential"]),
        min_tiles_differential=int(p["min_tiles_differential"]),
    )
    qa = qa_summary(model, float(p["gain_tolerance"]))
    prov = provenance_json("survey_ccd_motion", inputs=[offsets[t] for t in sorted(offsets)], config=p)
    model["provenance"] = np.str_(prov)
    with atomic_path(out_npz) as tmp:
        save_npz_deterministic(tmp, model)
    write_text_atomic(json.dumps(qa, indent=1) + "\n", out_json)
    log.info(
        "CCD motion from %d tiles: %d flagged (%s), differential term %s",
        qa["n_tiles"],
        qa["n_flagged"],
        ", ".join(qa["flagged"]) or "none",
        "fitted" if qa["differential"] else "off",
    )
    return qa
