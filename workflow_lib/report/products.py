"""What a field page shows, read from the pipeline's products (nothing is computed here).

:func:`load_field_products` reads a field directory tolerantly (absent or unreadable stages are
notes): the cube and catalog, the LFD light curves, PRF picture, edge model and diagnostics
(``lfd/diagnostics.npz``: mean-frame residual and motion summary, written by the LFD step), and
the CPM light curves and de-trended cube, and the deblended, de-trended light curves
(``cpm/<paramset>/deblended.zarr``, LFD neighbours subtracted before the CPM). Per-source values (contamination, CDPP) are read from
the coordinates the science steps store on each light-curve set (:func:`source_values`,
:func:`cdpp_values`).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.table import Table

from workflow_lib.core.logs import get_logger, read_step_usage
from workflow_lib.core.provenance import stale_inputs
from workflow_lib.data.cube import CubeError, open_cube
from workflow_lib.data.tiles import TILE_ID_RE
from workflow_lib.lfd.diagnostics import unpack_diagnostics

log = get_logger("report")

#: the LFD step's diagnostics product, in ``<field>/lfd/``
LFD_DIAGNOSTICS = "diagnostics.npz"
#: the deblended, de-trended light curves (rules/deblend.smk), in ``<field>/cpm/<paramset>/``
DEBLENDED = "deblended.zarr"


@dataclass
class FieldProducts:
    """Everything the field page can show; absent stages are ``None``."""

    field: str
    cube: xr.Dataset
    catalog: object | None = None  # astropy Table
    lfd: xr.Dataset | None = None
    cpm: xr.Dataset | None = None
    cpm_raw: xr.Dataset | None = None
    deblended: xr.Dataset | None = None  # deblended, de-trended light curves (cpm/<paramset>/deblended.zarr)
    detrended: xr.Dataset | None = None
    cpm_paramset: str | None = None
    prf_png: bytes | None = None
    edge: object | None = None
    mean_residual: dict | None = None  # {"data", "model", "residual"} per pixel-table pixel, "label", ...
    motion_summary: dict | None = None  # per-cadence motion-model arrays (workflow_lib.lfd.diagnostics.motion_summary)
    motion_notes: list = dc_field(default_factory=list)  # why the motion panel is not shown
    notes: list = dc_field(default_factory=list)
    inputs: list = dc_field(default_factory=list)  # the products read (paths): the page's provenance


def is_stale(path: Path, ds, notes: list) -> bool:
    """True when the product ``ds`` at ``path`` was made from inputs that have changed since (its provenance's
    input digests, :func:`workflow_lib.core.provenance.stale_inputs`): it is left out of the page, with a
    note naming the inputs, so products of different inputs are never shown side by side as one run."""
    stale = stale_inputs(ds.attrs.get("provenance"))
    if stale:
        notes.append(f"{path}: stale, made from an earlier {', '.join(stale)}; left out (rerun its rule)")
        log.warning("%s: stale (inputs changed since: %s); left out", path, ", ".join(stale))
    return bool(stale)


def _open_lcset(path: Path, fp: FieldProducts) -> xr.Dataset | None:
    if not path.exists():
        return None
    fp.inputs.append(path)
    notes = fp.notes
    try:
        ds = xr.open_zarr(path, consolidated=False).load()
        for v in ("flux", "source_id"):
            if v not in ds:
                raise ValueError(f"missing {v!r}")
    except Exception as exc:  # a half-finished stage must not break the report
        notes.append(f"{path}: unreadable light-curve set ({exc}); section skipped")
        log.warning("%s: unreadable light-curve set (%s); skipped", path, exc)
        return None
    return None if is_stale(path, ds, notes) else ds


def find_cpm_dir(field_dir: Path, paramset: str | None = None) -> Path | None:
    """``<field>/cpm/<paramset>``; without ``paramset`` the first (sorted) one holding outputs."""
    base = Path(field_dir) / "cpm"
    if paramset:
        return base / paramset if (base / paramset).is_dir() else None
    if not base.is_dir():
        return None
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any((d / n).exists() for n in ("lightcurves.zarr", "detrended.zarr", "raw_lightcurves.zarr")):
            return d
    return None


def read_lfd_diagnostics(path: Path) -> dict:
    """The LFD step's diagnostics (:func:`workflow_lib.lfd.diagnostics.unpack_diagnostics`)."""
    with np.load(path, allow_pickle=False) as z:
        return unpack_diagnostics({k: z[k] for k in z.files})


def _load_lfd(fp: FieldProducts, lfd: Path) -> None:
    """The LFD products of ``fp``: light curves, PRF picture, edge model, diagnostics."""
    fp.lfd = _open_lcset(lfd / "lightcurves.zarr", fp)
    png = lfd / "prf_model.png"
    if png.exists():
        fp.prf_png = png.read_bytes()
    edge = lfd / "edge_model.json"
    if edge.exists():
        try:
            fp.edge = json.loads(edge.read_text())
        except ValueError as exc:
            fp.notes.append(f"{edge}: unreadable ({exc})")
    diag = lfd / LFD_DIAGNOSTICS
    if not diag.exists():
        fp.notes.append(f"mean-frame residual and motion panels skipped: LFD output missing ({LFD_DIAGNOSTICS})")
        return
    fp.inputs.append(diag)
    try:
        d = read_lfd_diagnostics(diag)
    except Exception as exc:  # a report must not fail on a half-compatible LFD output
        fp.notes.append(f"{diag}: unreadable LFD diagnostics ({type(exc).__name__}: {exc})")
        log.warning("%s: unreadable LFD diagnostics (%s)", fp.field, exc)
        return
    fp.mean_residual = d["mean_residual"]
    fp.notes.extend(d["residual_notes"])
    fp.motion_summary = d["motion"]
    fp.motion_notes = d["motion_notes"]


def _load_cpm(fp: FieldProducts, field_dir: Path, cpm_paramset: str | None) -> None:
    cdir = find_cpm_dir(field_dir, cpm_paramset)
    if cdir is None:
        if cpm_paramset:
            fp.notes.append(f"CPM parameter set {cpm_paramset!r} has no outputs yet")
        return
    fp.cpm_paramset = cdir.name
    fp.cpm = _open_lcset(cdir / "lightcurves.zarr", fp)
    fp.cpm_raw = _open_lcset(cdir / "raw_lightcurves.zarr", fp)
    fp.deblended = _open_lcset(cdir / DEBLENDED, fp)
    det = cdir / "detrended.zarr"
    if det.exists():
        fp.inputs.append(det)
        try:
            fp.detrended = open_cube(det, validate=False)
            if "flux" not in fp.detrended:
                raise CubeError("no flux variable")
            if is_stale(det, fp.detrended, fp.notes):
                fp.detrended = None
        except Exception as exc:
            fp.detrended = None
            fp.notes.append(f"{det}: unreadable de-trended cube ({exc})")
    _cpm_not_applied(fp)


def _cpm_not_applied(fp: FieldProducts) -> None:
    """A cube the CPM could not model (``cpm.on_unmodellable: skip``): no CPM panels (their values are
    NaN), a note with the reason, and a note that the deblended set is not de-trended."""
    reason = next(
        (
            ds.attrs["cpm_not_applied"]
            for ds in (fp.detrended, fp.cpm)
            if ds is not None and "cpm_not_applied" in ds.attrs
        ),
        None,
    )
    if reason is None:
        return
    fp.detrended = None
    fp.cpm = None
    fp.notes.append(f"CPM not applied, so no CPM light curves or de-trended pixels: {reason}")
    if fp.deblended is not None and not int(fp.deblended.attrs.get("detrended", 1)):
        fp.notes.append("the deblended light curves are neighbour- and sky-subtracted but not de-trended (no CPM)")


def load_field_products(field_dir, *, field: str | None = None, cpm_paramset: str | None = None) -> FieldProducts:
    """Read a field's outputs: cube and catalog, plus whatever LFD / CPM products exist."""
    field_dir = Path(field_dir)
    field = field or field_dir.name
    cube = open_cube(field_dir / "cube.zarr")
    fp = FieldProducts(field=field, cube=cube, inputs=[field_dir / "cube.zarr"])
    cat = field_dir / "catalog.ecsv"
    if cat.exists():
        fp.inputs.append(cat)
        fp.catalog = Table.read(cat, format="ascii.ecsv")
    else:
        fp.notes.append("catalog.ecsv absent: no Gaia sources shown")
    if (field_dir / "lfd").is_dir():
        _load_lfd(fp, field_dir / "lfd")
    _load_cpm(fp, field_dir, cpm_paramset)
    return fp


# ------------------------------------------------------------------ per-source values of the light-curve sets


def source_values(lc: xr.Dataset | None, ids: np.ndarray, name: str) -> np.ndarray:
    """Per-source value of coordinate (or variable) ``name`` of a light-curve set in the order of
    ``ids``; NaN for sources not in the set, everywhere when the set lacks ``name``."""
    out = np.full(ids.size, np.nan)
    if lc is None or not (name in lc.coords or name in lc):
        return out
    spos = {int(s): i for i, s in enumerate(np.asarray(lc["source_id"].values, dtype=np.int64))}
    vals = np.asarray(lc[name].values, float)
    for k, s in enumerate(ids):
        i = spos.get(int(s))
        if i is not None:
            out[k] = vals[i]
    return out


def cdpp_name(hours: float) -> str:
    """The coordinate :func:`workflow_lib.metrics.add_cdpp` stores the ``hours`` CDPP proxy in."""
    return f"cdpp_{float(hours):g}h"


def cdpp_values(lc: xr.Dataset | None, ids: np.ndarray, hours: float, label: str, notes: list) -> np.ndarray:
    """The pipeline's CDPP proxy [ppm] of each source over ``hours`` as the science step stored
    it (:func:`workflow_lib.metrics.add_cdpp`); NaN with a note when the set does not carry it."""
    name = cdpp_name(hours)
    if lc is not None and name not in lc.coords and name not in lc:
        notes.append(
            f"{label} light curves carry no {name}: their CDPP is not shown "
            f"(the step writes it with cdpp_hours including {float(hours):g})"
        )
    return source_values(lc, ids, name)


def cdpp_common_set(metrics: dict, catalog, gmag: np.ndarray, sets: list[str], mag_limit: float) -> np.ndarray:
    """Sources over which the per-set median CDPPs are comparable (bool per catalog row):
    G < ``mag_limit``, on the pixels (catalog ``on_cutout`` when present), and a finite CDPP in
    every available light-curve set of ``sets``."""
    n = gmag.size
    keep = np.isfinite(gmag) & (gmag < float(mag_limit))
    if catalog is not None and "on_cutout" in catalog.colnames:
        keep &= np.asarray(catalog["on_cutout"], bool)
    for k in sets:
        keep &= np.isfinite(np.asarray(metrics[f"cdpp_{k}"], float))
    return keep if sets else np.zeros(n, bool)


# ------------------------------------------------------------------ benchmarks


def read_benchmarks(bench_dir) -> list[dict]:
    """Every Snakemake benchmark TSV under ``bench_dir/<rule>/`` (at any depth: a survey tile's jobs write
    ``<rule>/<ccd>/tiles/<tile>.tsv``) as rows ``{rule, target, s, max_rss, mean_load, cpu_time}`` (mean over
    repeats; ``target`` the path below the rule's directory without ``.tsv``), sorted.

    ``cpu_time`` and ``max_rss`` are the job's own figures when its log (``<bench_dir>/../logs/<rule>/<target>.log``)
    ends with them (:func:`workflow_lib.core.logs.read_step_usage`: getrusage of the whole job); Snakemake
    samples every 30 s after the first 30 s and misses a long job's last stretch."""
    rows = []
    bench_dir = Path(bench_dir)
    for rule_dir in sorted(p for p in bench_dir.iterdir() if p.is_dir()) if bench_dir.is_dir() else ():
        for f in sorted(rule_dir.rglob("*.tsv")):
            try:
                with open(f, newline="") as fh:
                    recs = list(csv.DictReader(fh, delimiter="\t"))
            except OSError:
                continue
            if not recs:
                continue

            def mean(key):
                vals = []
                for r in recs:
                    try:
                        vals.append(float(r.get(key, "nan")))
                    except (TypeError, ValueError):
                        pass
                vals = [v for v in vals if np.isfinite(v)]
                return float(np.mean(vals)) if vals else None

            target = f.relative_to(rule_dir).with_suffix("").as_posix()
            usage = read_step_usage(bench_dir.parent / "logs" / rule_dir.name / f"{target}.log")
            rows.append(
                {
                    "rule": rule_dir.name,
                    "target": target,
                    "s": mean("s"),
                    "max_rss": usage[1] if usage else mean("max_rss"),
                    "mean_load": mean("mean_load"),
                    "cpu_time": usage[0] if usage else mean("cpu_time"),
                }
            )
    return rows


#: a survey tile's job: ``<ccd>/tiles/<tile>`` (the tile "field"; ``_<paramset>`` after it for the CPM) or
#: ``<ccd>_<tile>`` (cut_tile, split_catalog)
_TILE_JOB = re.compile(rf"^(?P<ccd>.+?)(?:/tiles/|_)(?:{TILE_ID_RE.pattern.strip('^$')})(?:_(?P<suffix>[^/]+))?$")


def tile_job_totals(rows: list[dict]) -> list[dict]:
    """:func:`read_benchmarks` rows with the survey tiles' jobs folded into one row per rule and CCD (a CCD
    has hundreds of tiles): target ``"<ccd>: <n> tiles"``, wall and CPU seconds summed, the largest peak
    memory, the mean load averaged (a suffix after the tile id, the CPM's parameter set, in brackets). Other rows are kept as they are; the order is (rule, target)."""
    out, groups = [], {}
    for r in rows:
        m = _TILE_JOB.match(r["target"])
        if m is None:
            out.append(r)
        else:
            groups.setdefault((r["rule"], m["ccd"], m["suffix"]), []).append(r)

    def total(rs, key, how):
        vals = [r[key] for r in rs if r[key] is not None]
        return how(vals) if vals else None

    for (rule, ccd, suffix), rs in groups.items():
        out.append(
            {
                "rule": rule,
                "target": f"{ccd}: {len(rs)} tiles" + (f" ({suffix})" if suffix else ""),
                "s": total(rs, "s", sum),
                "max_rss": total(rs, "max_rss", max),
                "mean_load": total(rs, "mean_load", lambda v: float(np.mean(v))),
                "cpu_time": total(rs, "cpu_time", sum),
            }
        )
    return sorted(out, key=lambda r: (r["rule"], r["target"]))
