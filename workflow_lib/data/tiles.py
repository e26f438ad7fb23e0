"""Survey mode: a whole-CCD cube cut into tiles with halos, and the CCD catalog split to them.

A CCD (2048 x 2048 science pixels) is too large for one LFD / CPM job, so it is cut into square
**tiles** of ``tile_size`` x ``tile_size`` *core* pixels, each processed with a **halo** of ``margin``
pixels on every side (clipped to the CCD): the tile cube is the halo region.

Why a halo, and how large (``margin``).  LFD models every star with all its neighbours (LFD §4.1-4.4):
the pixels of a star reach ``r_max`` (the PRF model's outer radius, ``lfd.prf.r_max``, and the edge
radius ``lfd.edge.max_radius``; 5 px by default) from its centre.  A core star at the core edge
therefore needs the pixels up to ``r_max`` beyond the core: ``margin >= PRF reach``.  The neighbours
whose wings fall on those pixels lie up to another ``r_max`` further out; the ones whose centres fall
outside the halo are still in the tile catalog (``split_catalog``'s ``reach``, like the crossmatch's
``gaia.margin_pixels`` for a cutout) and are modelled from their catalog position.  A star's light
curve is taken (:mod:`workflow_lib.survey.merge`) from the tile whose core holds it, i.e. where it lies
at least ``margin`` from every halo edge inside the CCD, so it is always modelled with complete
pixels and all its neighbours.  :func:`tile_grid` refuses ``margin < min_margin`` (default: the PRF
reach from the schema's LFD defaults, :func:`prf_reach`).  CPM (Hattori et al.) picks predictor pixels
outside an exclusion square from the tile cube: the halo also keeps that square and the apertures of
core stars whole.

Coordinates.  Every bound is in CCD pixel coordinates (``row``/``column`` coords of the cube, integer
= pixel centre), as half-open ranges of pixel centres: ``core_row = [r0, r1)`` holds the pixels
``r0 .. r1-1``.  Tiles are laid out from the cube's first pixel (``row0``, ``col0``); the last tile of
a row/column of tiles is narrower when ``tile_size`` does not divide the CCD.  Tile ids
``r{i:04d}c{j:04d}`` are the 0-based pixel offsets of the core's first pixel from the cube's first
pixel (``r0000c0064``: rows 0.., columns 64..); for a whole TESS CCD cube (first pixel row 1,
column 45) they are the same for every sector/camera/CCD.

Which tile a source belongs to (``in_core``): its position ``(column, row)`` falls in the core
square, ``[r0 - 0.5, r1 - 0.5)`` in row, likewise in column; on a side where the core touches the CCD
edge the core extends to infinity, so a catalog source off the CCD (within the crossmatch margin)
still belongs to exactly one core.  Its **tile-edge distance** in a tile is the distance from its
position to the nearest halo side that lies inside the CCD (the CCD edge is the same in every tile);
a core source lies deeper in its own tile than in any other (``>= margin`` there, ``< margin`` in the
halo of a neighbour), ties broken by the core rule.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import xarray as xr

from workflow_lib.core.settings import schema_defaults
from workflow_lib.data.cube import CubeError, validate_cube

#: tile id format: 0-based (row, column) offset of the core's first pixel from the cube's first pixel
TILE_ID = "r{row:04d}c{col:04d}"
TILE_ID_RE = re.compile(r"^r(\d{4,})c(\d{4,})$")


def prf_reach() -> float:
    """Farthest reach [px] of a star's modelled pixels from its centre, from the schema's LFD defaults:
    max(``lfd.prf.r_max``, ``lfd.edge.max_radius``).  The smallest halo :func:`tile_grid` accepts."""
    prf = schema_defaults("lfd.prf")
    edge = schema_defaults("lfd.edge")
    return float(max(prf.get("r_max", 5.0), edge.get("max_radius", 5.0)))


def tile_id(row_offset: int, col_offset: int) -> str:
    return TILE_ID.format(row=int(row_offset), col=int(col_offset))


def tile_grid(
    n_rows: int,
    n_cols: int,
    row0: int,
    col0: int,
    tile_size: int,
    margin: int,
    *,
    min_margin: float | None = None,
) -> list[dict]:
    """The tiles of an ``n_rows`` x ``n_cols`` CCD whose first pixel is (``row0``, ``col0``) (CCD coords).

    Each tile is a dict (JSON-ready)::

        id              'r0000c0064'
        index           [i, j]             tile row / column number
        core_row        [r0, r1)           CCD rows of the core pixels (half-open)
        core_column     [c0, c1)
        halo_row        [r0 - margin, r1 + margin) clipped to the CCD
        halo_column
        ccd_edge        {'top','bottom','left','right'}: True where the core touches the CCD edge
                        ('bottom' = first rows, 'left' = first columns)

    ``margin`` must be at least ``min_margin`` (default :func:`prf_reach`, see the module docstring).
    """
    n_rows, n_cols, tile_size, margin = int(n_rows), int(n_cols), int(tile_size), int(margin)
    if n_rows < 1 or n_cols < 1:
        raise CubeError(f"tile_grid: the CCD has no pixels ({n_rows} x {n_cols})")
    if tile_size < 1:
        raise CubeError(f"tile_grid: tile_size must be >= 1, got {tile_size}")
    need = prf_reach() if min_margin is None else float(min_margin)
    if margin < need:
        raise CubeError(
            f"tile_grid: margin {margin} px is smaller than the PRF reach {need:g} px: stars at a core edge would "
            "lose pixels and neighbours (raise survey.margin, or lower lfd.prf.r_max / lfd.edge.max_radius)"
        )
    tiles = []
    for i, ro in enumerate(range(0, n_rows, tile_size)):
        for j, co in enumerate(range(0, n_cols, tile_size)):
            r0, r1 = row0 + ro, row0 + min(ro + tile_size, n_rows)
            c0, c1 = col0 + co, col0 + min(co + tile_size, n_cols)
            tiles.append(
                {
                    "id": tile_id(ro, co),
                    "index": [i, j],
                    "core_row": [r0, r1],
                    "core_column": [c0, c1],
                    "halo_row": [max(r0 - margin, row0), min(r1 + margin, row0 + n_rows)],
                    "halo_column": [max(c0 - margin, col0), min(c1 + margin, col0 + n_cols)],
                    "ccd_edge": {
                        "bottom": ro == 0,
                        "top": ro + tile_size >= n_rows,
                        "left": co == 0,
                        "right": co + tile_size >= n_cols,
                    },
                }
            )
    return tiles


def grid_for_cube(cube: xr.Dataset, tile_size: int, margin: int, *, min_margin: float | None = None) -> dict:
    """The tile grid of an image-layout cube, with its geometry: ``{n_rows, n_cols, row0, col0,
    tile_size, margin, tiles}`` (the content of ``tiles.json``)."""
    if "pixel" in cube.dims:
        raise CubeError("tile_grid: pixel-table cubes (Kepler stamps) are not tiled; survey mode needs a CCD image")
    rows = np.asarray(cube["row"].values, int)
    cols = np.asarray(cube["column"].values, int)
    for name, v in (("row", rows), ("column", cols)):
        if v.size > 1 and not np.all(np.diff(v) == 1):
            raise CubeError(f"tile_grid: the cube's {name} coordinate is not contiguous")
    tiles = tile_grid(rows.size, cols.size, int(rows[0]), int(cols[0]), tile_size, margin, min_margin=min_margin)
    return {
        "n_rows": int(rows.size),
        "n_cols": int(cols.size),
        "row0": int(rows[0]),
        "col0": int(cols[0]),
        "tile_size": int(tile_size),
        "margin": int(margin),
        "tiles": tiles,
    }


def find_tile(tiles, tid: str) -> dict:
    """The tile ``tid`` of a grid (a list of tiles or a ``grid_for_cube`` dict); CubeError if absent."""
    tl = tiles["tiles"] if isinstance(tiles, dict) else tiles
    for t in tl:
        if t["id"] == tid:
            return t
    raise CubeError(f"no tile {tid!r} in the grid ({len(tl)} tiles, e.g. {[t['id'] for t in tl[:3]]})")


def _shift_wcs(header: str, d_col: int, d_row: int) -> str:
    """The WCS header string with its reference pixel moved by (-d_col, -d_row): array index 0 of the
    tile is array index (d_col, d_row) of the CCD cube.  SIP polynomials are in offsets from CRPIX, so
    they stay valid; alternate WCSs (CRPIX1a) are shifted too."""
    from astropy.io import fits

    if not header:
        return header
    h = fits.Header.fromstring(header, sep="\n")
    for key in list(h.keys()):
        m = re.fullmatch(r"CRPIX([12])([A-Z]?)", key)
        if m:
            h[key] = float(h[key]) - (d_col if m.group(1) == "1" else d_row)
    for axis, d in (("1", d_col), ("2", d_row)):
        if f"LTV{axis}" in h:  # IRAF physical offset: physical = image - LTV
            h[f"LTV{axis}"] = float(h[f"LTV{axis}"]) - d
    return h.tostring(sep="\n")


def cut_tile(cube: xr.Dataset, tile: dict) -> xr.Dataset:
    """The halo region of ``tile`` of a CCD cube (lazy when the cube is): a cube of the same format.

    ``row``/``column`` keep their CCD values, the WCS (``attrs['wcs']``, 0-based array indices) is
    shifted to the tile's first pixel, and attrs record ``tile_id``, ``tile`` (JSON of the tile dict)
    and ``tile_core`` (JSON ``{'row': [r0, r1], 'column': [c0, c1]}``, half-open CCD bounds).
    """
    if "pixel" in cube.dims:
        raise CubeError("cut_tile: pixel-table cubes are not tiled")
    rows = np.asarray(cube["row"].values, int)
    cols = np.asarray(cube["column"].values, int)
    (hr0, hr1), (hc0, hc1) = tile["halo_row"], tile["halo_column"]
    i0, i1 = hr0 - int(rows[0]), hr1 - int(rows[0])
    j0, j1 = hc0 - int(cols[0]), hc1 - int(cols[0])
    if i0 < 0 or j0 < 0 or i1 > rows.size or j1 > cols.size or i1 <= i0 or j1 <= j0:
        raise CubeError(
            f"tile {tile['id']}: halo rows [{hr0}, {hr1}) x columns [{hc0}, {hc1}) is not inside the cube "
            f"(rows {rows[0]}..{rows[-1]}, columns {cols[0]}..{cols[-1]})"
        )
    if not (np.array_equal(rows[i0:i1], np.arange(hr0, hr1)) and np.array_equal(cols[j0:j1], np.arange(hc0, hc1))):
        raise CubeError(f"tile {tile['id']}: the cube's row/column coordinates are not contiguous")
    out = cube.isel(row=slice(i0, i1), column=slice(j0, j1))
    out.attrs = dict(cube.attrs)
    out.attrs["wcs"] = _shift_wcs(cube.attrs.get("wcs", ""), j0, i0)
    out.attrs["tile_id"] = tile["id"]
    out.attrs["tile"] = json.dumps(tile)
    out.attrs["tile_core"] = json.dumps({"row": list(tile["core_row"]), "column": list(tile["core_column"])})
    validate_cube(out, f"tile {tile['id']}")
    return out


# ---------------------------------------------------------------- sources and tiles


def _interval_distance(x, lo, hi):
    """Distance from x to the interval [lo, hi] (0 inside)."""
    return np.maximum(np.maximum(lo - x, x - hi), 0.0)


def in_core(column, row, tile: dict) -> np.ndarray:
    """True where a source position lies in the tile's core square (extended to infinity on the sides where
    the core touches the CCD edge): every position belongs to exactly one core of a grid."""
    column, row = np.asarray(column, float), np.asarray(row, float)
    e = tile["ccd_edge"]
    (r0, r1), (c0, c1) = tile["core_row"], tile["core_column"]
    lo_r = -np.inf if e["bottom"] else r0 - 0.5
    hi_r = np.inf if e["top"] else r1 - 0.5
    lo_c = -np.inf if e["left"] else c0 - 0.5
    hi_c = np.inf if e["right"] else c1 - 0.5
    return (row >= lo_r) & (row < hi_r) & (column >= lo_c) & (column < hi_c)


def tile_edge_distance(column, row, tile: dict) -> np.ndarray:
    """Distance [px] from each position to the nearest side of the tile's halo that lies inside the CCD
    (sides on the CCD edge do not count: every tile shares them); negative outside the halo.  ``inf`` for a
    tile that is the whole CCD."""
    column, row = np.asarray(column, float), np.asarray(row, float)
    e = tile["ccd_edge"]
    (r0, r1), (c0, c1) = tile["halo_row"], tile["halo_column"]
    d = np.full(np.broadcast(column, row).shape, np.inf)
    if not e["bottom"]:
        d = np.minimum(d, row - (r0 - 0.5))
    if not e["top"]:
        d = np.minimum(d, (r1 - 0.5) - row)
    if not e["left"]:
        d = np.minimum(d, column - (c0 - 0.5))
    if not e["right"]:
        d = np.minimum(d, (c1 - 0.5) - column)
    return d


def halo_distance(column, row, tile: dict) -> np.ndarray:
    """Distance [px] from each position to the halo's pixel area (0 on it)."""
    column, row = np.asarray(column, float), np.asarray(row, float)
    (r0, r1), (c0, c1) = tile["halo_row"], tile["halo_column"]
    dy = _interval_distance(row, r0 - 0.5, r1 - 0.5)
    dx = _interval_distance(column, c0 - 0.5, c1 - 0.5)
    return np.hypot(dx, dy)


def split_catalog(catalog, tile: dict, reach: float | None = None):
    """The sources of a CCD catalog (``catalog.ecsv`` of the CCD cube, astropy Table) a tile models.

    Kept: sources whose position lies on the tile's halo or within ``reach`` px of it (default: the
    schema's ``survey.catalog_reach``, like ``gaia.margin_pixels`` for a cutout: off-tile neighbours whose wings reach the halo), and
    every source of the tile's core.  Added columns: ``in_core`` (bool, the source belongs to this tile),
    ``tile_edge_distance`` [px] (:func:`tile_edge_distance`); ``on_ccd`` keeps the CCD catalog's
    ``on_cutout``, and ``on_cutout`` / ``edge_distance`` now refer to the tile cube (CPM apertures are made
    for sources on it).  Order and meta of the CCD catalog are kept; meta gains ``tile_id`` / ``reach``.
    """
    if reach is None:
        reach = float(schema_defaults("survey")["catalog_reach"])
    col = np.asarray(catalog["column"], float)
    row = np.asarray(catalog["row"], float)
    core = in_core(col, row, tile)
    dist = halo_distance(col, row, tile)
    keep = (dist <= float(reach)) | core
    out = catalog[keep]
    if "on_cutout" in out.colnames:
        out["on_ccd"] = np.asarray(out["on_cutout"], bool)
    out["on_cutout"] = dist[keep] == 0.0
    if "edge_distance" in out.colnames:
        out["edge_distance"] = dist[keep]
    out["in_core"] = core[keep]
    out["tile_edge_distance"] = tile_edge_distance(col[keep], row[keep], tile)
    out.meta = dict(catalog.meta)
    out.meta.update(
        tile_id=tile["id"], reach=float(reach), n_in_core=int(core.sum()), n_on_cutout=int(np.sum(dist == 0))
    )
    return out


def parse_tile_id(tid: str) -> tuple[int, int]:
    """(row offset, column offset) of a tile id."""
    m = TILE_ID_RE.match(tid)
    if not m:
        raise CubeError(f"{tid!r} is not a tile id (r0000c0000)")
    return int(m.group(1)), int(m.group(2))


def n_tiles(n_rows: int, n_cols: int, tile_size: int) -> int:
    return math.ceil(n_rows / tile_size) * math.ceil(n_cols / tile_size)
