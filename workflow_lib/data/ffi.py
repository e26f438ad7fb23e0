"""TESS SPOC full-frame images (FFIs) of one sector/camera/CCD -> one chunked pixel cube.

Input: a directory (or list) of SPOC calibrated FFIs ``tess<stamp>-sNNNN-C-D-<scid>-s_ffic.fits``:
PRIMARY (SECTOR, CAMERA, CCD, FFIINDEX), HDU 1 the calibrated image ``CAMERA.CCD C.D cal``
(e-/s; TSTART/TSTOP, TIMESYS/TIMEREF, DQUALITY, the celestial WCS), HDU 2 its 1-sigma uncertainty
``CAMERA.CCD C.D uncert``.

Layout: a full SPOC FFI is 2136 x 2078 (columns x rows); science pixels are rows 0-2047 and
columns 44-2091 (0-based array indices); the 44 + 44 columns left/right and the 30 rows on top are
collateral (prescan/overscan, buffer, smear, virtual) and are dropped.  CCD coordinates follow
TESScut/TPF products: ``column`` = 0-based FFI array column + 1 (science columns 45-2092), ``row`` =
array row + 1 (science rows 1-2048), the frame of the SPOC PRF files.  A file carrying a physical
WCS (``CRVAL1P``/``CRVAL2P``, ``CRPIX1P``/``CRPIX2P``) that places it elsewhere (a crop) is mapped
through it and cut to the science area; any other shape is read as a "small CCD" with the same
collateral margins (44 | science | 44 columns, science + 30 rows: the synthetic FFIs of
:mod:`workflow_lib.data.synthetic_ffi`).  ``layout=FFILayout(...)`` overrides all of this.

Time: mid-exposure ``(TSTART + TSTOP) / 2`` in BTJD (TDB), checked and recorded as
:mod:`workflow_lib.data.fits_reader` does (TIMESYS, BJDREFI/F; TIMEREF and TASSIGN kept in attrs).
QUALITY: each frame's DQUALITY.  ``cadenceno``: FFIINDEX (or the frame's rank in time when absent).
WCS: the celestial WCS (with its SIP distortion) of a good frame (DQUALITY == 0, nearest mid-sector),
shifted to the cropped array (0-based x = column index, y = row index).

Ingestion (:func:`ingest_ffis`) is a two-stage transposition in bounded memory:

1. **frame store** (``<cube>.frames.zarr``, zarr v3): ``flux``/``flux_err`` over (slot, row,
   column), slots in the order frames were first ingested, one *shard* per block of
   ``frames_per_block`` slots holding inner chunks (block, 64, 64).  A task reads one block of FITS
   files (``frames_per_block`` frames in RAM), writes its shard, then marks its slots in the per-slot
   ``done`` mask.  The manifest (file, size, time, quality of each slot) is in the store's attrs.  A
   rerun -- after a crash, a kill, or with more files -- reads only the frames not yet ``done``.
2. **cube**: dask concatenates the (block, 64, 64) chunks of each 64 x 64 tile along time into
   (time, 64, 64) chunks (tiles never mix, so memory is a few output chunks), sorts the slots by time
   and xarray writes the cube store atomically (temporary sibling + rename).

``rechunker`` (the usual library for this) pins ``zarr<3`` and fails on zarr 3 (``zarr.hierarchy``
is gone); since stage 1 already chunks space like the output, stage 2 needs no all-to-all shuffle.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits

from workflow_lib.core.atomic import atomic_path
from workflow_lib.core.logs import get_logger
from workflow_lib.core.parallel import dask_map
from workflow_lib.core.provenance import provenance_json
from workflow_lib.data.cube import CubeError, make_cube
from workflow_lib.data.fits_reader import (
    _celestial_wcs_string,
    _check_time_system,
    _float_or_none,
    _int_or_none,
    _kw,
)

log = get_logger("ffi")

#: full SPOC FFI array (rows, columns) and its science area (0-based array slices)
SPOC_SHAPE = (2078, 2136)
LEFT_COLLATERAL = 44
RIGHT_COLLATERAL = 44
TOP_COLLATERAL = 30
SCIENCE_SIZE = 2048

#: two frames closer than this in mid-time [d] (0.09 s) are the same cadence
DUPLICATE_TIME_TOL = 1e-6

FRAME_STORE_VERSION = 1

_FFI_NAME = re.compile(r"tess\d{13}-s(\d{4})-(\d)-(\d)-\d{4}-.?_ffic\.fits$")


@dataclass(frozen=True)
class FFILayout:
    """Science area of an FFI array: 0-based array index of its first row/column, its size, and the
    CCD (row, column) of that first science pixel."""

    row_start: int
    col_start: int
    n_rows: int
    n_cols: int
    ccd_row0: int
    ccd_col0: int

    @classmethod
    def for_shape(cls, shape, header=None, path="?") -> FFILayout:
        nrow, ncol = shape
        # physical WCS: FITS pixel p -> raw CCD coordinate CRVAL?P + (p - CRPIX?P); 1-based array = CCD
        cv1 = _float_or_none(_kw([header], "CRVAL1P")) if header is not None else None
        cv2 = _float_or_none(_kw([header], "CRVAL2P")) if header is not None else None
        cp1 = _float_or_none(_kw([header], "CRPIX1P")) if header is not None else None
        cp2 = _float_or_none(_kw([header], "CRPIX2P")) if header is not None else None
        col1 = int(round(cv1 - (cp1 or 1.0) + 1)) if cv1 is not None else 1  # CCD column of array index 0
        row1 = int(round(cv2 - (cp2 or 1.0) + 1)) if cv2 is not None else 1
        if (row1, col1) != (1, 1):  # a crop of a full FFI: intersect with the science area
            c_lo, c_hi = LEFT_COLLATERAL + 1, LEFT_COLLATERAL + SCIENCE_SIZE
            r_lo, r_hi = 1, SCIENCE_SIZE
            c0, c1 = max(col1, c_lo), min(col1 + ncol - 1, c_hi)
            r0, r1 = max(row1, r_lo), min(row1 + nrow - 1, r_hi)
            if c1 < c0 or r1 < r0:
                raise CubeError(f"{path}: the image (CCD rows {row1}.., columns {col1}..) holds no science pixels")
            return cls(r0 - row1, c0 - col1, r1 - r0 + 1, c1 - c0 + 1, r0, c0)
        if tuple(shape) == SPOC_SHAPE:
            return cls(0, LEFT_COLLATERAL, SCIENCE_SIZE, SCIENCE_SIZE, 1, LEFT_COLLATERAL + 1)
        n_rows, n_cols = nrow - TOP_COLLATERAL, ncol - LEFT_COLLATERAL - RIGHT_COLLATERAL
        if n_rows < 1 or n_cols < 1:
            raise CubeError(
                f"{path}: image of {nrow} x {ncol} pixels is smaller than the SPOC collateral margins "
                f"({TOP_COLLATERAL} rows, {LEFT_COLLATERAL}+{RIGHT_COLLATERAL} columns); a full FFI is "
                f"{SPOC_SHAPE[0]} x {SPOC_SHAPE[1]}"
            )
        return cls(0, LEFT_COLLATERAL, n_rows, n_cols, 1, LEFT_COLLATERAL + 1)


@dataclass(frozen=True)
class FFIFrame:
    """Header facts of one FFI file (no pixels)."""

    path: str
    size: int
    sector: int
    camera: int
    ccd: int
    tstart: float
    tstop: float
    quality: int
    ffiindex: int | None
    shape: tuple
    cal_offset: int  # byte offset of the calibrated image data
    err_offset: int  # byte offset of the uncertainty image data
    fast: bool  # plain big-endian float32 without scaling: read with numpy directly
    has_wcs: bool
    timedel: float | None

    @property
    def time(self) -> float:
        return 0.5 * (self.tstart + self.tstop)

    @property
    def name(self) -> str:
        return Path(self.path).name


# ------------------------------------------------------------------ header scan


def ffi_files(source) -> list[Path]:
    """The ``*_ffic.fits`` files of a directory (sorted), or the given list (duplicates of one path once)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(Path(source).glob("*_ffic.fits"))
        if not files:
            raise CubeError(f"{source}: no *_ffic.fits files")
    else:
        files = [Path(f) for f in ([source] if isinstance(source, (str, Path)) else source)]
    if not files:
        raise CubeError("no FFI files given")
    seen, out = set(), []
    for f in files:
        if not f.is_file():
            raise CubeError(f"{f}: no such file")
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def _image_hdu(hdul, index, what, path):
    if len(hdul) <= index:
        raise CubeError(f"{path}: has {len(hdul)} HDU(s); a SPOC FFI needs the {what} image in HDU {index}")
    hdu = hdul[index]
    if not isinstance(hdu, (fits.ImageHDU, fits.CompImageHDU)) or hdu.header.get("NAXIS", 0) != 2:
        raise CubeError(f"{path}: HDU {index} ({hdu.name}) is not a 2-D image; expected the {what} image")
    return hdu


def read_ffi_header(path) -> FFIFrame:
    """Header facts of one SPOC FFI; :class:`CubeError` naming the file when it is not one."""
    path = Path(path)
    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
    except Exception as exc:
        raise CubeError(f"{path}: not a readable FITS file ({exc})") from exc
    with hdul:
        try:
            primary = hdul[0].header
            cal = _image_hdu(hdul, 1, "calibrated (cal)", path)
            err = _image_hdu(hdul, 2, "uncertainty (uncert)", path)
            if "UNCERT" not in str(err.name).upper() and "ERR" not in str(err.name).upper():
                raise CubeError(f"{path}: HDU 2 is {err.name!r}, not the uncertainty image of the FFI")
            h = cal.header
            telescop = str(_kw([primary, h], "TELESCOP", "")).upper()
            if telescop != "TESS":
                raise CubeError(f"{path}: TELESCOP={telescop!r}; SPOC FFIs are TESS")
            _check_time_system([h, primary], "TESS", path)
            ids = [_int_or_none(_kw([primary, h], k)) for k in ("SECTOR", "CAMERA", "CCD")]
            m = _FFI_NAME.search(path.name)
            for i in range(3):
                if ids[i] is None and m:
                    ids[i] = int(m.group(i + 1))
            if None in ids:
                raise CubeError(f"{path}: no SECTOR/CAMERA/CCD keywords and no 'sNNNN-C-D' in its name")
            tstart = _float_or_none(_kw([h, primary], "TSTART"))
            tstop = _float_or_none(_kw([h, primary], "TSTOP"))
            if tstart is None or tstop is None:
                raise CubeError(f"{path}: no finite TSTART/TSTOP; cannot time the frame")
            shape = (int(h["NAXIS2"]), int(h["NAXIS1"]))
            if (int(err.header["NAXIS2"]), int(err.header["NAXIS1"])) != shape:
                raise CubeError(f"{path}: uncertainty image shape differs from the calibrated image {shape}")
            fast = not path.name.endswith(".gz") and all(
                x.header.get("BITPIX") == -32
                and x.header.get("BSCALE", 1) == 1
                and x.header.get("BZERO", 0) == 0
                and isinstance(x, fits.ImageHDU)
                for x in (cal, err)
            )
            info1, info2 = hdul.fileinfo(1), hdul.fileinfo(2)
            ctype1 = str(h.get("CTYPE1", "")).upper()
            return FFIFrame(
                path=str(path),
                size=path.stat().st_size,
                sector=ids[0],
                camera=ids[1],
                ccd=ids[2],
                tstart=tstart,
                tstop=tstop,
                quality=int(_int_or_none(_kw([h], "DQUALITY")) or 0),
                ffiindex=_int_or_none(_kw([primary, h], "FFIINDEX")),
                shape=shape,
                cal_offset=int(info1["datLoc"]),
                err_offset=int(info2["datLoc"]),
                fast=fast,
                has_wcs=ctype1.startswith("RA"),
                timedel=_float_or_none(_kw([h], "TIMEDEL")),
            )
        except CubeError:
            raise
        except Exception as exc:
            raise CubeError(f"{path}: cannot read the FFI headers ({type(exc).__name__}: {exc})") from exc


def scan_ffis(source, *, threads: int = 1) -> list[FFIFrame]:
    """Headers of all FFIs of ``source`` (directory or files), checked to be one sector/camera/CCD of
    one shape with distinct times; sorted by time."""
    files = ffi_files(source)
    frames = dask_map(read_ffi_header, [(f,) for f in files], threads=threads)
    first = frames[0]
    for fr in frames[1:]:
        if (fr.sector, fr.camera, fr.ccd) != (first.sector, first.camera, first.ccd):
            raise CubeError(
                f"{fr.path}: is sector {fr.sector} camera {fr.camera} CCD {fr.ccd}, but {first.path} is "
                f"sector {first.sector} camera {first.camera} CCD {first.ccd}; one cube holds one CCD of one sector"
            )
        if fr.shape != first.shape:
            raise CubeError(f"{fr.path}: image shape {fr.shape} differs from {first.path} ({first.shape})")
    frames.sort(key=lambda f: (f.time, f.path))
    t = np.array([f.time for f in frames])
    dup = np.flatnonzero(np.diff(t) < DUPLICATE_TIME_TOL)
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise CubeError(
            f"{b.path}: has the same mid-time (BTJD {b.time:.6f}) as {a.path}; duplicate frames are refused "
            f"(remove one of them)"
        )
    return frames


# ------------------------------------------------------------------ pixels


def frame_layout(frame: FFIFrame, layout: FFILayout | None = None) -> FFILayout:
    if layout is not None:
        return layout
    with fits.open(frame.path, memmap=False, lazy_load_hdus=True) as hdul:
        return FFILayout.for_shape(frame.shape, hdul[1].header, frame.path)


def read_ffi(frame: FFIFrame | str | Path, layout: FFILayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Science pixels ``(flux, flux_err)`` (float32, native byte order) of one FFI."""
    if not isinstance(frame, FFIFrame):
        frame = read_ffi_header(frame)
    lay = frame_layout(frame, layout)
    rows = slice(lay.row_start, lay.row_start + lay.n_rows)
    cols = slice(lay.col_start, lay.col_start + lay.n_cols)
    path = Path(frame.path)
    try:
        if frame.fast:
            if path.stat().st_size != frame.size:
                raise CubeError(f"{path}: file changed size since its header was read")
            ncol = frame.shape[1]
            out = []
            with open(path, "rb") as fh:
                for off in (frame.cal_offset, frame.err_offset):
                    fh.seek(off + 4 * ncol * rows.start)
                    raw = np.fromfile(fh, dtype=">f4", count=ncol * lay.n_rows)
                    if raw.size != ncol * lay.n_rows:
                        raise CubeError(f"{path}: truncated image data")
                    out.append(raw.reshape(lay.n_rows, ncol)[:, cols].astype(np.float32))
            return out[0], out[1]
        with fits.open(path, memmap=False) as hdul:
            return (
                np.asarray(hdul[1].data[rows, cols], dtype=np.float32),
                np.asarray(hdul[2].data[rows, cols], dtype=np.float32),
            )
    except CubeError:
        raise
    except Exception as exc:
        raise CubeError(f"{path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc


def ffi_wcs(frames: list[FFIFrame], layout: FFILayout | None = None) -> tuple[str, str]:
    """Celestial WCS header string (science-array indices) of a good frame and that frame's path.

    Good: DQUALITY == 0 and a celestial WCS; the one nearest mid-sector.  Falls back to any frame with
    a WCS; ``('', '')`` when none has one.
    """
    cands = [f for f in frames if f.has_wcs and f.quality == 0] or [f for f in frames if f.has_wcs]
    if not cands:
        log.warning("no FFI carries a celestial WCS; attrs['wcs'] is empty")
        return "", ""
    tmid = 0.5 * (frames[0].time + frames[-1].time)
    best = min(cands, key=lambda f: abs(f.time - tmid))
    lay = frame_layout(best, layout)
    h = fits.getheader(best.path, 1).copy()
    # array index i of the crop = array index i + start of the file: shift the reference pixel
    # (SIP polynomials are in offsets from CRPIX, so they stay valid)
    h["CRPIX1"] = float(h["CRPIX1"]) - lay.col_start
    h["CRPIX2"] = float(h["CRPIX2"]) - lay.row_start
    h["NAXIS1"], h["NAXIS2"] = lay.n_cols, lay.n_rows
    for k in ("WCSNAMEP", "WCSAXESP", "CTYPE1P", "CTYPE2P", "CUNIT1P", "CUNIT2P"):
        h.remove(k, ignore_missing=True)
    return _celestial_wcs_string(h, best.path), best.path


def read_ffi_cube(source, *, layout: FFILayout | None = None) -> xr.Dataset:
    """All FFIs of ``source`` as an in-memory cube (small sets, tests, cutouts); for whole CCDs use
    :func:`ingest_ffis`."""
    frames = scan_ffis(source)
    lay = frame_layout(frames[0], layout)
    flux = np.empty((len(frames), lay.n_rows, lay.n_cols), np.float32)
    err = np.empty_like(flux)
    for k, fr in enumerate(frames):
        flux[k], err[k] = read_ffi(fr, lay)
    ds = _template(frames, lay, layout)
    ds["flux"] = ds["flux"].copy(data=flux)
    ds["flux_err"] = ds["flux_err"].copy(data=err)
    return ds


def _cadenceno(frames: list[FFIFrame]) -> np.ndarray:
    idx = [f.ffiindex for f in frames]
    if all(i is not None for i in idx) and len(set(idx)) == len(idx):
        return np.asarray(idx, np.int64)
    log.info("FFIINDEX missing or repeated: numbering the %d frames by time", len(frames))
    return np.arange(len(frames), dtype=np.int64)


def _template(frames: list[FFIFrame], lay: FFILayout, layout: FFILayout | None) -> xr.Dataset:
    """The cube (coords, quality, attrs) with zero-cost placeholders for flux/flux_err."""
    nt = len(frames)
    wcs, wcs_file = ffi_wcs(frames, layout)
    with fits.open(frames[0].path, memmap=False, lazy_load_hdus=True) as hdul:
        h0, p0 = hdul[1].header, hdul[0].header
        timeref = _kw([h0, p0], "TIMEREF")
        tassign = _kw([h0, p0], "TASSIGN")
        procver = _kw([p0], "PROCVER")
    t = np.array([f.time for f in frames])
    timedel = frames[0].timedel or (float(np.median(np.diff(t))) if nt > 1 else None)
    attrs = {
        "product": "spoc_ffi",
        "sector": frames[0].sector,
        "camera": frames[0].camera,
        "ccd": frames[0].ccd,
        "time_reference": "mid-exposure (TSTART + TSTOP) / 2",
        "source_directory": str(Path(frames[0].path).parent),
        "source_files": json.dumps([f.name for f in frames]),
        "wcs_source_file": Path(wcs_file).name if wcs_file else "",
        "science_region": json.dumps(asdict(lay)),
    }
    if timeref is not None:
        attrs["timeref"] = str(timeref)
    if tassign is not None:
        attrs["tassign"] = str(tassign)
    if procver is not None:
        attrs["procver"] = str(procver)
    if timedel:
        attrs["cadence_minutes"] = round(timedel * 1440.0, 6)
    zero = np.broadcast_to(np.float32(0), (nt, lay.n_rows, lay.n_cols))
    return make_cube(
        zero,
        zero,
        np.array([f.quality for f in frames], np.int32),
        t,
        _cadenceno(frames),
        lay.ccd_row0 + np.arange(lay.n_rows),
        lay.ccd_col0 + np.arange(lay.n_cols),
        mission="TESS",
        wcs_header=wcs,
        attrs=attrs,
    )


# ------------------------------------------------------------------ stage 1: the frame store


def frame_store_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".zarr") + ".frames.zarr")


def _frame_key(fr: FFIFrame) -> list:
    return [fr.name, fr.size, round(fr.time, 9), fr.quality]


def _open_or_create_store(store: Path, frames, lay, tile, frames_per_block):
    import zarr

    geometry = {
        "version": FRAME_STORE_VERSION,
        "sector": frames[0].sector,
        "camera": frames[0].camera,
        "ccd": frames[0].ccd,
        "layout": asdict(lay),
        "tile": list(tile),
        "frames_per_block": frames_per_block,
    }
    if store.exists():
        try:
            g = zarr.open_group(store, mode="r+", zarr_format=3)
            if g.attrs.get("geometry") == geometry:
                return g
            log.warning("%s: frame store of another CCD or layout; starting it afresh", store)
        except Exception as exc:
            log.warning("%s: unreadable frame store (%s); starting it afresh", store, exc)
        shutil.rmtree(store)
    g = zarr.open_group(store, mode="w", zarr_format=3)
    shape = (0, lay.n_rows, lay.n_cols)
    for name in ("flux", "flux_err"):
        g.create_array(
            name,
            shape=shape,
            dtype="float32",
            # one shard file per block of slots: the whole (padded) frame area
            shards=(frames_per_block, -(-lay.n_rows // tile[0]) * tile[0], -(-lay.n_cols // tile[1]) * tile[1]),
            chunks=(frames_per_block, *tile),
            fill_value=np.nan,
        )
    g.create_array("done", shape=(0,), dtype="uint8", chunks=(frames_per_block,), fill_value=0)
    g.attrs.update(geometry=geometry, slots=[])
    return g


def _write_block(slot_frames, store, lay, frames_per_block, reader):
    """Read the frames of one shard's slots and write them, then mark them done."""
    import zarr

    g = zarr.open_group(store, mode="r+", zarr_format=3)
    slots = [s for s, _ in slot_frames]
    s0, s1 = min(slots), max(slots) + 1
    flux = np.full((s1 - s0, lay.n_rows, lay.n_cols), np.nan, np.float32)
    err = np.full_like(flux, np.nan)
    have = np.zeros(s1 - s0, bool)
    for s, fr in slot_frames:
        flux[s - s0], err[s - s0] = reader(fr, lay)
        have[s - s0] = True
    if not have.all():  # slots of this shard ingested earlier: keep their pixels
        old = ~have
        flux[old] = g["flux"][s0:s1][old]
        err[old] = g["flux_err"][s0:s1][old]
    g["flux"][s0:s1] = flux
    g["flux_err"][s0:s1] = err
    done = np.asarray(g["done"][s0:s1])
    done[have] = 1
    g["done"][s0:s1] = done  # after the pixels: a crash before this line leaves the slots to redo
    return len(slot_frames)


def stage_frames(
    frames: list[FFIFrame],
    store,
    *,
    layout: FFILayout | None = None,
    tile=(64, 64),
    frames_per_block: int = 16,
    threads: int = 1,
    reader=None,
) -> dict:
    """Stage 1: put every frame not yet ``done`` into the frame store; returns counts and the slot of
    each frame (``{'read', 'skipped', 'slots'}``)."""
    store = Path(store)
    lay = frame_layout(frames[0], layout)
    tile = (min(tile[0], lay.n_rows), min(tile[1], lay.n_cols))
    g = _open_or_create_store(store, frames, lay, tile, frames_per_block)
    manifest = [tuple(x) for x in g.attrs["slots"]]
    where = {m: i for i, m in enumerate(manifest)}
    done = np.asarray(g["done"][:], bool) if len(manifest) else np.zeros(0, bool)
    todo, slot_of = [], []
    for fr in frames:
        key = tuple(_frame_key(fr))
        s = where.get(key)
        if s is None:
            s = len(manifest)
            manifest.append(key)
            where[key] = s
        slot_of.append(s)
        if s >= done.size or not done[s]:
            todo.append((s, fr))
    n = len(manifest)
    if n != g["flux"].shape[0]:
        # the manifest first (a crash after it leaves slots that are simply not done)
        g.attrs["slots"] = [list(m) for m in manifest]
        for name in ("flux", "flux_err"):
            g[name].resize((n, lay.n_rows, lay.n_cols))
        g["done"].resize((n,))
    by_block: dict[int, list] = {}
    for s, fr in todo:
        by_block.setdefault(s // frames_per_block, []).append((s, fr))
    log.info(
        "%s: %d frame(s) to ingest in %d block(s), %d already there",
        store,
        len(todo),
        len(by_block),
        len(frames) - len(todo),
    )
    dask_map(
        _write_block,
        [(v,) for _, v in sorted(by_block.items())],
        threads=threads,
        shared=dict(store=str(store), lay=lay, frames_per_block=frames_per_block, reader=reader or read_ffi),
    )
    return {"read": len(todo), "skipped": len(frames) - len(todo), "slots": slot_of}


# ------------------------------------------------------------------ stage 2: the cube


def build_cube(
    frames: list[FFIFrame],
    store,
    out,
    *,
    slots=None,
    layout: FFILayout | None = None,
    time_chunk: int | None = None,
    threads: int = 1,
    provenance: str | None = None,
) -> Path:
    """Stage 2: the cube store ``out`` (atomic) from the frame store, frames in time order."""
    import dask
    import dask.array as da
    import zarr

    store, out = Path(store), Path(out)
    g = zarr.open_group(store, mode="r", zarr_format=3)
    geometry = g.attrs["geometry"]
    manifest = [tuple(x) for x in g.attrs["slots"]]
    if slots is None:
        where = {m: i for i, m in enumerate(manifest)}
        slots = [where[tuple(_frame_key(f))] for f in frames]
    slots = np.asarray(slots, int)
    done = np.asarray(g["done"][:], bool)
    if not done[slots].all():
        missing = [frames[k].path for k in np.flatnonzero(~done[slots])[:3]]
        raise CubeError(f"{store}: frames not ingested yet, e.g. {missing}")
    lay = frame_layout(frames[0], layout)
    tile = tuple(geometry["tile"])
    nt = len(frames)
    tc = min(int(time_chunk or nt), nt)
    ds = _template(frames, lay, layout)
    ds.attrs["provenance"] = provenance or ""
    contiguous = np.array_equal(slots, np.arange(slots[0], slots[0] + nt))
    for name in ("flux", "flux_err"):
        src = da.from_zarr(g[name])
        if contiguous:  # the usual case: slots in time order
            arr = src[slots[0] : slots[0] + nt]
        else:  # slots in ingest order: gather per tile after putting all time in one chunk
            arr = src.rechunk((src.shape[0], *tile))
            arr = arr.map_blocks(lambda b: b[slots], chunks=((nt,), *arr.chunks[1:]), dtype=arr.dtype)
        arr = arr.rechunk((tc, *tile))
        ds[name] = ds[name].copy(data=arr)
        ds[name].encoding = {"chunks": (tc, *tile)}
    for v in ("quality", "time", "cadenceno", "row", "column"):
        ds[v].encoding = {}
    with atomic_path(out) as tmp:
        with dask.config.set(scheduler="threads" if threads > 1 else "synchronous", num_workers=threads):
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)
    return out


# ------------------------------------------------------------------ both stages


def ingest_ffis(
    source,
    out,
    *,
    tile=(64, 64),
    frames_per_block: int = 16,
    time_chunk: int | None = None,
    threads: int = 1,
    keep_frames: bool = False,
    frame_store=None,
    layout: FFILayout | None = None,
    checksums: bool = False,
    config: dict | None = None,
    reader=None,
) -> dict:
    """FFIs of one sector/camera/CCD (directory or files) -> cube store ``out``.

    Resumable: the frame store (``frame_store``, default ``<out>.frames.zarr``) keeps every frame
    ingested so far; rerunning after an interruption, or with more files, reads only the missing
    frames.  It is removed after success unless ``keep_frames`` (keep it when more frames will come).
    Memory: about ``2 x frames_per_block`` science frames per thread in stage 1, and a few
    (time, tile) chunks per thread in stage 2.  ``checksums``: record each file's SHA-256 in the
    provenance (reads every file once more).  Returns counts (``read``, ``skipped``, ``frames``).
    """
    out = Path(out)
    frames = scan_ffis(source, threads=threads)
    store = Path(frame_store) if frame_store else frame_store_path(out)
    st = stage_frames(
        frames, store, layout=layout, tile=tile, frames_per_block=frames_per_block, threads=threads, reader=reader
    )
    inputs = [Path(f.path) for f in frames]
    extra = {"input_sizes": {f.name: f.size for f in frames}}
    if checksums:
        extra["input_sha256"] = {f.name: _sha256(Path(f.path)) for f in frames}
    prov = provenance_json(
        "ingest_ffi",
        inputs=inputs,
        config=dict(
            config or {},
            tile=list(tile),
            frames_per_block=frames_per_block,
            time_chunk=time_chunk,
        ),
        **extra,
    )
    build_cube(
        frames, store, out, slots=st["slots"], layout=layout, time_chunk=time_chunk, threads=threads, provenance=prov
    )
    if not keep_frames:
        shutil.rmtree(store, ignore_errors=True)
    log.info("%s: %d frames (%d read now, %d from the frame store)", out, len(frames), st["read"], st["skipped"])
    return {"path": out, "frames": len(frames), "read": st["read"], "skipped": st["skipped"]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

