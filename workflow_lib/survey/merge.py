"""Per-tile light-curve sets (LFD, CPM, RAW, ...) of one CCD -> one per-CCD ``(source, time)`` set.

Every tile of a CCD (:mod:`workflow_lib.data.tiles`) is processed with a halo, so a source near a tile
border is measured in two (or, at a corner, four) tiles.  :func:`merge_tile_sets`:

* **one light curve per catalog source**: every source of the CCD catalog appears exactly once, in
  catalog order, taken from the tile (among those whose set holds it) where it lies **farthest from
  the tile edge** (:func:`workflow_lib.data.tiles.tile_edge_distance`: the nearest halo side inside the
  CCD); ties go to the tile whose core holds it, then to the smaller tile id.  A core source is at
  least ``margin`` px from its own tile's edges and less from any other, so this is the tile whose core
  holds it whenever that tile measured it.  Sources no tile measured get a NaN row (``FLAG_NOT_MEASURED``).
* **a source table** (:func:`source_table`): Gaia id, ra/dec, CCD column/row, G, the core tile and the
  tile the light curve came from, flags, the CDPP and overlap figure of the set.
  :func:`combine_source_tables` joins the tables of several sets (the CDPP of every set side by side).
* **missing tiles**: grid tiles without a set (a failed tile, merged anyway with
  ``survey.allow_missing_tiles``) are listed in ``merged.attrs["missing_tiles"]`` and the table's meta;
  their core sources come from a neighbour's halo when it holds them (``FLAG_NOT_CORE_TILE``), else they
  are NaN rows (``FLAG_NOT_MEASURED``).
* **overlap QA**: for each source measured in two or more tiles, the two tiles it lies deepest in
  give ``z = (f1 - f2) / sqrt(e1^2 + e2^2)`` over the cadences both have (finite, positive errors, no
  ``bitmask`` QUALITY flags); the per-source figure is ``rms(z)``, the set's figure its median over
  sources (``overlap_consistency``).  For independent measurements with honest errors it is ~1.  The
  tiles of one CCD share the overlap pixels, so their photon noise cancels in ``f1 - f2``: for LFD/CPM
  a figure well below 1 means the tiles agree to within a fraction of the noise; ~1 or more means that
  tile-edge effects (truncated pixels, missing neighbours, a different background model) are as
  large as the noise.

Memory: the merged set is built in RAM: (sources x cadences) x 2 float64 arrays, plus the same again
for the overlap sources (a whole CCD: ~10^5 sources x 1300 cadences ~ 2 GB per array pair).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from astropy.table import Table

from workflow_lib.core.logs import get_logger
from workflow_lib.data.tiles import in_core, tile_edge_distance
from workflow_lib.metrics import DEFAULT_CDPP_BITMASK, add_cdpp

log = get_logger("survey.merge")

#: ``flags`` bits of the merged source table
FLAG_OFF_CCD = 1  # the source centre is not on a science pixel of the CCD (catalog on_cutout False)
FLAG_NOT_MEASURED = 2  # no tile's light-curve set holds the source
FLAG_NO_FLUX = 4  # the chosen light curve has no finite flux
FLAG_OVERLAP = 8  # measured in two or more tiles (it has an overlap figure)
FLAG_NOT_CORE_TILE = 16  # taken from a tile whose core does not hold it (its core tile did not measure it)
FLAG_BITS = {
    "off_ccd": FLAG_OFF_CCD,
    "not_measured": FLAG_NOT_MEASURED,
    "no_flux": FLAG_NO_FLUX,
    "overlap": FLAG_OVERLAP,
    "not_core_tile": FLAG_NOT_CORE_TILE,
}

#: per-source coords taken from the CCD catalog, not from the tile sets
CATALOG_COORDS = ("ra", "dec", "column", "row", "phot_g_mean_mag")


class MergeError(ValueError):
    """Tile light-curve sets that cannot be merged (different cadences, unknown tiles)."""


def _fill_value(dtype):
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind in "iu":
        return -1
    return ""


def _check_cadences(sets: dict[str, xr.Dataset]) -> xr.Dataset:
    ids = sorted(sets)
    ref = sets[ids[0]]
    for tid in ids[1:]:
        s = sets[tid]
        if s.sizes["time"] != ref.sizes["time"] or not np.array_equal(s["cadenceno"].values, ref["cadenceno"].values):
            raise MergeError(f"tile {tid}: cadences differ from tile {ids[0]}; tiles of one CCD share its cadences")
    return ref


def assign_tiles(catalog: Table, tiles: list[dict], measured: dict[str, np.ndarray]) -> dict:
    """For every catalog source: the best and second-best tile among those that measured it.

    ``measured``: tile id -> boolean mask over the catalog (the tile's set holds the source).  Returns
    arrays over the catalog: ``best``/``second`` (tile ids, '' if none), ``best_distance``,
    ``second_distance``, ``n_tiles``, ``core_tile`` (the tile whose core holds the source, geometric),
    ``core_distance`` (its tile-edge distance there).
    """
    col = np.asarray(catalog["column"], float)
    row = np.asarray(catalog["row"], float)
    n = col.size
    by_id = {t["id"]: t for t in tiles}
    unknown = sorted(set(measured) - set(by_id))
    if unknown:
        raise MergeError(f"light curves of tiles not in the grid: {unknown[:5]}")
    best = np.full(n, "", dtype=object)
    second = np.full(n, "", dtype=object)
    bd = np.full(n, -np.inf)
    bc = np.zeros(n, bool)
    sd = np.full(n, -np.inf)
    sc = np.zeros(n, bool)
    count = np.zeros(n, np.int32)
    core_tile = np.full(n, "", dtype=object)
    core_d = np.full(n, np.nan)
    for tid in sorted(by_id):  # sorted ids: on a full tie the first (smallest) id stays best
        t = by_id[tid]
        core = in_core(col, row, t)
        d = tile_edge_distance(col, row, t)
        core_tile[core] = tid
        core_d[core] = d[core]
        m = measured.get(tid)
        if m is None:
            continue
        m = np.asarray(m, bool)
        count += m
        beats_best = m & ((d > bd) | ((d == bd) & core & ~bc))
        beats_second = m & ~beats_best & ((d > sd) | ((d == sd) & core & ~sc))
        # the old best becomes second where beaten
        second[beats_best], sd[beats_best], sc[beats_best] = best[beats_best], bd[beats_best], bc[beats_best]
        best[beats_best], bd[beats_best], bc[beats_best] = tid, d[beats_best], core[beats_best]
        second[beats_second], sd[beats_second], sc[beats_second] = tid, d[beats_second], core[beats_second]
    bd[best == ""] = np.nan
    sd[second == ""] = np.nan
    return dict(
        best=best.astype(str),
        second=second.astype(str),
        best_distance=bd,
        second_distance=sd,
        n_tiles=count,
        core_tile=core_tile.astype(str),
        core_distance=core_d,
    )


def overlap_figure(f1, e1, f2, e2, good=None) -> np.ndarray:
    """Per row: rms over the cadences both have of ``(f1 - f2) / sqrt(e1^2 + e2^2)`` (NaN if < 2 cadences)."""
    f1, e1, f2, e2 = (np.atleast_2d(np.asarray(a, float)) for a in (f1, e1, f2, e2))
    s = np.sqrt(e1**2 + e2**2)
    ok = np.isfinite(f1) & np.isfinite(f2) & np.isfinite(s) & (s > 0)
    if good is not None:
        ok &= np.asarray(good, bool)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(ok, (f1 - f2) / np.where(ok, s, 1.0), 0.0)
        nk = ok.sum(axis=1)
        out = np.sqrt((z**2).sum(axis=1) / np.maximum(nk, 1))
    return np.where(nk >= 2, out, np.nan)


def _catalog_rows_of_tiles(sets: dict[str, xr.Dataset], sid: np.ndarray) -> tuple[dict, dict]:
    """Where each tile set's sources sit in the CCD catalog (``sid``: its source ids).

    Returns ``(rows_of, measured)``: tile -> (catalog index, row in the tile set) for the sources in the
    catalog, and tile -> boolean mask over the catalog of the sources that tile measured."""
    if np.unique(sid).size != sid.size:
        raise MergeError("the CCD catalog lists a source_id twice")
    pos = {int(s): i for i, s in enumerate(sid)}
    rows_of = {}  # tile -> (catalog index, row in the tile set)
    measured = {}
    for tid, s in sets.items():
        ts = np.asarray(s["source_id"].values, np.int64)
        ci = np.array([pos.get(int(x), -1) for x in ts], dtype=np.int64)
        known = ci >= 0
        if (~known & (ts >= 0)).any():
            log.warning("tile %s: %d source(s) not in the CCD catalog left out", tid, int((~known & (ts >= 0)).sum()))
        rows_of[tid] = (ci[known], np.flatnonzero(known))
        mk = np.zeros(sid.size, bool)
        mk[ci[known]] = True
        measured[tid] = mk
    return rows_of, measured


def _gather_tile_light_curves(sets: dict[str, xr.Dataset], rows_of: dict, a: dict, n: int, nt: int) -> dict:
    """Copy each source's light curve from its chosen tile (``a["best"]``) and, for sources seen by two
    tiles, from the second tile (``a["second"]``), in sorted tile order.

    Returns a dict: ``flux``/``err`` (n, nt) of the chosen tile; ``f2``/``e2`` of the second tile (one
    row per source with a second tile, row ``k2[source]``); ``has2``; ``quality`` (OR over tiles); and
    ``extra``/``extra_attrs``: the per-source coords of the tile sets taken from the chosen tile."""
    flux = np.full((n, nt), np.nan)
    err = np.full((n, nt), np.nan)
    has2 = a["second"] != ""
    f2 = np.full((int(has2.sum()), nt), np.nan)
    e2 = np.full_like(f2, np.nan)
    k2 = np.full(n, -1)
    k2[has2] = np.arange(int(has2.sum()))
    quality = np.zeros(nt, np.int64)
    # per-source coords of the tile sets (LFD: contamination, n_pixels, in_model, mean_flux, cdpp_*; CPM: ...)
    extra: dict[str, np.ndarray] = {}
    extra_attrs: dict[str, dict] = {}
    for tid in sorted(sets):
        s = sets[tid]
        quality |= np.asarray(s["quality"].values, np.int64)
        ci, ri = rows_of[tid]
        sel = a["best"][ci] == tid
        sec = a["second"][ci] == tid
        if not (sel.any() or sec.any()):
            continue
        fv = np.asarray(s["flux"].values, float)
        ev = np.asarray(s["flux_err"].values, float)
        flux[ci[sel]], err[ci[sel]] = fv[ri[sel]], ev[ri[sel]]
        f2[k2[ci[sec]]], e2[k2[ci[sec]]] = fv[ri[sec]], ev[ri[sec]]
        for name, c in s.coords.items():
            if c.dims != ("source",) or name in ("source_id", *CATALOG_COORDS):
                continue
            v = np.asarray(c.values)
            if name not in extra:
                kind = v.dtype if v.dtype.kind in "fbiu" else np.dtype(object)
                extra[name] = np.full(n, _fill_value(kind), dtype=kind)
                extra_attrs[name] = dict(c.attrs)
            try:
                extra[name][ci[sel]] = v[ri[sel]]
            except (TypeError, ValueError):  # a dtype clash between tiles: keep it as text
                extra[name] = extra[name].astype(object)
                extra[name][ci[sel]] = v[ri[sel]]
    return dict(
        flux=flux, err=err, f2=f2, e2=e2, k2=k2, has2=has2, quality=quality, extra=extra, extra_attrs=extra_attrs
    )


def _source_flags(catalog: Table, a: dict, flux: np.ndarray, has2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-source :data:`FLAG_BITS` of a merged set and the ``on_ccd`` mask they were derived from."""
    n = flux.shape[0]
    flags = np.zeros(n, np.int32)
    on_ccd = np.asarray(catalog["on_cutout"], bool) if "on_cutout" in catalog.colnames else np.ones(n, bool)
    flags[~on_ccd] |= FLAG_OFF_CCD
    flags[a["best"] == ""] |= FLAG_NOT_MEASURED
    flags[(a["best"] != "") & ~np.isfinite(flux).any(axis=1)] |= FLAG_NO_FLUX
    flags[has2] |= FLAG_OVERLAP
    flags[(a["best"] != "") & (a["best"] != a["core_tile"])] |= FLAG_NOT_CORE_TILE
    return flags, on_ccd


def _merged_coords(ref: xr.Dataset, catalog: Table, sid: np.ndarray, g: dict, a: dict, on_ccd, flags, fig) -> dict:
    """The coords of the merged set: time axis of ``ref``, catalog columns, the tile sets' per-source
    coords (``g["extra"]``), and the tile assignment, flags and overlap consistency of every source."""
    cols = {
        "source_id": sid,
        "ra": np.asarray(catalog["ra"], float),
        "dec": np.asarray(catalog["dec"], float),
        "column": np.asarray(catalog["column"], float),
        "row": np.asarray(catalog["row"], float),
        "phot_g_mean_mag": np.asarray(catalog["phot_g_mean_mag"], float),
    }
    coords = {
        "time": ("time", np.asarray(ref["time"].values, float), dict(ref["time"].attrs)),
        "cadenceno": ("time", np.asarray(ref["cadenceno"].values)),
    }
    for k, v in cols.items():
        coords[k] = ("source", v)
    for k, v in g["extra"].items():
        coords[k] = ("source", v.astype(str) if v.dtype == object else v, g["extra_attrs"][k])
    coords.update(
        on_ccd=("source", on_ccd),
        tile=("source", a["best"]),
        core_tile=("source", a["core_tile"]),
        second_tile=("source", a["second"]),
        tile_edge_distance=("source", a["best_distance"], {"units": "pix"}),
        n_tiles=("source", a["n_tiles"]),
        flags=("source", flags, {"flag_bits": str(FLAG_BITS)}),
        overlap_consistency=("source", fig, {"long_name": "rms of (f1 - f2)/sqrt(e1^2 + e2^2) between two tiles"}),
    )
    return coords


def merge_tile_sets(
    sets: dict[str, xr.Dataset],
    tiles: list[dict],
    catalog: Table,
    *,
    set_name: str = "",
    bitmask: int = DEFAULT_CDPP_BITMASK,
    cdpp_hours=(1.0, 6.0),
) -> tuple[xr.Dataset, Table, dict]:
    """Merge per-tile light-curve sets of one CCD (``sets``: tile id -> ``(source, time)`` Dataset).

    ``tiles``: the grid's tiles; ``catalog``: the CCD catalog (``catalog.ecsv`` of the CCD cube: one
    row per source, ``source_id``, ``ra``, ``dec``, ``column``, ``row``, ``phot_g_mean_mag``).  Returns
    ``(merged, table, qa)``: the merged set (catalog order; per-source coords of the tile sets taken from
    the chosen tile, plus ``tile``, ``core_tile``, ``tile_edge_distance``, ``n_tiles``, ``flags``,
    ``overlap_consistency``), its :func:`source_table`, and the QA dict (``overlap_consistency``: the
    median, ``n_overlap``, ``n_sources``, ``n_measured``, ``missing_tiles``: grid tiles without a set),
    also in ``merged.attrs`` and the table's meta.
    Sources of the tile sets that are not in the catalog (user apertures, negative ids) are left out.
    """
    if not sets:
        raise MergeError("no tile light-curve sets to merge")
    ref = _check_cadences(sets)
    sid = np.asarray(catalog["source_id"], np.int64)
    rows_of, measured = _catalog_rows_of_tiles(sets, sid)
    a = assign_tiles(catalog, tiles, measured)
    n, nt = sid.size, ref.sizes["time"]
    g = _gather_tile_light_curves(sets, rows_of, a, n, nt)
    flux, err, f2, e2, k2, has2 = g["flux"], g["err"], g["f2"], g["e2"], g["k2"], g["has2"]
    good = (g["quality"] & int(bitmask)) == 0
    fig = np.full(n, np.nan)
    if has2.any():
        idx = np.flatnonzero(has2)
        fig[idx] = overlap_figure(flux[idx], err[idx], f2[k2[idx]], e2[k2[idx]], good)
    flags, on_ccd = _source_flags(catalog, a, flux, has2)
    ok_fig = np.isfinite(fig)
    qa = {
        "set": set_name,
        "overlap_consistency": float(np.median(fig[ok_fig])) if ok_fig.any() else float("nan"),
        "n_overlap": int(ok_fig.sum()),
        "n_sources": int(n),
        "n_measured": int((a["best"] != "").sum()),
        "n_tiles": len(sets),
        "missing_tiles": missing_tiles(sets, tiles),
    }
    merged = xr.Dataset(
        {
            "flux": (("source", "time"), flux, {"units": "electron / s"}),
            "flux_err": (("source", "time"), err, {"units": "electron / s"}),
            "quality": (("time",), g["quality"].astype(np.int32)),
        },
        coords=_merged_coords(ref, catalog, sid, g, a, on_ccd, flags, fig),
    )
    merged.attrs = {k: v for k, v in ref.attrs.items() if k not in ("provenance", "tile_id", "tile", "tile_core")}
    merged.attrs.update(
        survey_set=set_name,
        merged_tiles=len(sets),
        overlap_consistency=qa["overlap_consistency"],
        n_overlap=qa["n_overlap"],
        missing_tiles=qa["missing_tiles"],
    )
    if not any(k.startswith("cdpp_") for k in merged.coords):
        merged = add_cdpp(merged, hours=tuple(cdpp_hours), bitmask=bitmask)
    table = source_table(merged, set_name)
    log.info(
        "merged %d tiles (%s): %d sources, %d measured, overlap consistency %.3g over %d sources",
        len(sets),
        set_name or "?",
        n,
        qa["n_measured"],
        qa["overlap_consistency"],
        qa["n_overlap"],
    )
    if qa["missing_tiles"]:
        log.warning("%s: %d tiles missing: %s", set_name or "merge", len(qa["missing_tiles"]), qa["missing_tiles"])
    return merged, table, qa


def missing_tiles(sets: dict, tiles: list[dict]) -> list[str]:
    """Ids of the grid's tiles that have no light-curve set in ``sets`` (sorted)."""
    return sorted({t["id"] for t in tiles} - set(sets))


#: source-table columns that describe the source and its place in the grid, not one light-curve set
BASE_COLUMNS = ("source_id", "ra", "dec", "column", "row", "phot_g_mean_mag", "on_ccd", "core_tile")


def source_table(merged: xr.Dataset, set_name: str) -> Table:
    """The source table of a merged set: base columns (:data:`BASE_COLUMNS`) and, prefixed with
    ``<set_name>_``, ``tile``, ``tile_edge_distance``, ``n_tiles``, ``flags``, ``overlap_consistency`` and
    every ``cdpp_*`` coord.  Meta: ``overlap_consistency`` / ``n_overlap`` / ``missing_tiles`` per set, ``flag_bits``."""
    p = f"{set_name}_" if set_name else ""
    t = Table()
    for c in BASE_COLUMNS:
        t[c] = np.asarray(merged[c].values)
    for c in ("tile", "tile_edge_distance", "n_tiles", "flags", "overlap_consistency"):
        t[p + c] = np.asarray(merged[c].values)
    for c in sorted(k for k in merged.coords if k.startswith("cdpp_")):
        t[p + c] = np.asarray(merged[c].values, float)
        t[p + c].unit = "ppm"
    for c, unit in (("ra", "deg"), ("dec", "deg"), ("column", "pix"), ("row", "pix"), ("phot_g_mean_mag", "mag")):
        t[c].unit = unit
    t.meta = {
        "flag_bits": dict(FLAG_BITS),
        "overlap_consistency": {set_name: float(merged.attrs.get("overlap_consistency", np.nan))},
        "n_overlap": {set_name: int(merged.attrs.get("n_overlap", 0))},
        "missing_tiles": {set_name: [str(x) for x in merged.attrs.get("missing_tiles", [])]},
        "overlap_definition": "median over sources of rms over shared cadences of (f1 - f2)/sqrt(e1^2 + e2^2)",
    }
    return t


def combine_source_tables(tables: dict[str, Table]) -> Table:
    """One table of several sets' source tables (same catalog): the base columns once, every set's columns
    side by side (CDPP of every set); meta ``overlap_consistency`` / ``n_overlap`` / ``missing_tiles``:
    set -> value."""
    if not tables:
        raise MergeError("no source tables to combine")
    names = list(tables)
    out = tables[names[0]].copy()
    for name in names[1:]:
        t = tables[name]
        if not np.array_equal(np.asarray(t["source_id"]), np.asarray(out["source_id"])):
            raise MergeError(f"set {name}: its sources differ from set {names[0]} (not the same CCD catalog)")
        for c in t.colnames:
            if c not in BASE_COLUMNS:
                out[c] = t[c]
        for key in ("overlap_consistency", "n_overlap", "missing_tiles"):
            out.meta.setdefault(key, {}).update(t.meta.get(key, {}))
    return out
