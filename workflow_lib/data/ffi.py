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

1. **frame store** (``<cube>.frames/``, next to the cube): blocks of ``frames_per_block`` frames
   (default ~256 MB of flux + flux_err: 7 whole-CCD frames, at most 64), one uncompressed file per
   block in strip-major order with a per-frame *done* mask in its header, written to a temporary
   name and renamed; slots in the order frames were first ingested, listed (file, size, time,
   quality) in ``manifest.json``, written before any block.  One task reads one block of FITS files
   (only its science rows) and writes its file.  A rerun -- after an exception, a kill, or with more
   files -- reads only the frames that are not done.
2. **cube**: one dask task per strip of (all times, 64 rows, ``tiles_per_task`` x 64 columns) reads
   that strip from every block file (one contiguous read each), puts the slots in time order, and
   xarray writes the cube with chunks (time, 64, 64) (blosc lz4 + byte shuffle) atomically
   (temporary sibling + rename).  Strips never overlap, so memory is a few strips per thread,
   whatever the size of the CCD.

Why not ``rechunker`` (the usual library for this): 0.5.4 requires ``zarr<3`` and fails on zarr 3
(``AttributeError: module 'zarr' has no attribute 'hierarchy'``).  Why not a zarr frame store:
zarr-python 3 costs ~1 ms of CPU per chunk operation, and a (block, 64, 64)-chunked store written and
read again ran the whole ingest at ~20 MB of FITS per CPU-second; raw strip-major block files and
one zarr write of large chunks run at 110-140.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits

from workflow_lib.core.atomic import atomic_path, write_text_atomic
from workflow_lib.core.logs import get_logger
from workflow_lib.core.parallel import dask_map
from workflow_lib.core.provenance import file_sha256, provenance_json
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
        if tuple(shape) == SPOC_SHAPE:  # a whole FFI: the known layout, whatever its physical WCS says
            return cls(0, LEFT_COLLATERAL, SCIENCE_SIZE, SCIENCE_SIZE, 1, LEFT_COLLATERAL + 1)
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
    layout: FFILayout  # science area
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
    """The ``*_ffic.fits`` files of a directory (sorted), or the given list (one path once)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(list(Path(source).glob("*_ffic.fits")) + list(Path(source).glob("*_ffic.fits.gz")))
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


_BLOCK = 2880


def _card_value(text: str):
    """Value of a FITS card's value field (string, bool, int or float; None when blank)."""
    t = text.strip()
    if t.startswith("'"):
        out, i = [], 1
        while i < len(t):
            if t[i] == "'":
                if i + 1 < len(t) and t[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(t[i])
            i += 1
        return "".join(out).rstrip()
    t = t.split("/", 1)[0].strip()
    if t == "":
        return None
    if t in ("T", "F"):
        return t == "T"
    try:
        return int(t)
    except ValueError:
        return float(t.replace("D", "E"))


def _fast_headers(path: Path, n_hdus: int = 3):
    """Headers (dicts of the keywords) and data byte offsets of the first ``n_hdus`` HDUs, read
    without astropy (a SPOC FFI's headers parse in well under a millisecond)."""
    out = []
    with open(path, "rb") as fh:
        offset = 0
        for _ in range(n_hdus):
            header, end = {}, False
            while not end:
                block = fh.read(_BLOCK)
                if len(block) < _BLOCK:
                    raise ValueError("file ends inside a header")
                offset += _BLOCK
                text = block.decode("ascii")
                for i in range(0, _BLOCK, 80):
                    card = text[i : i + 80]
                    key = card[:8].strip()
                    if key == "END":
                        end = True
                        break
                    if card[8:10] == "= " and key not in header:
                        header[key] = _card_value(card[10:])
            naxis = int(header.get("NAXIS", 0))
            nbytes = abs(int(header["BITPIX"])) // 8 if naxis else 0
            for k in range(1, naxis + 1):
                nbytes *= int(header[f"NAXIS{k}"])
            nbytes = (nbytes + int(header.get("PCOUNT", 0) or 0) * (naxis > 0)) * int(header.get("GCOUNT", 1) or 1)
            out.append((header, offset, nbytes))
            offset += -(-nbytes // _BLOCK) * _BLOCK
            fh.seek(offset)
    return out


def _astropy_headers(path: Path, n_hdus: int = 3):
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        out = []
        for i in range(min(n_hdus, len(hdul))):
            h = hdul[i].header  # for a tile-compressed HDU: the image header astropy reconstructs
            out.append(({k: h[k] for k in h if k}, -1, 0))
        return out


def read_ffi_header(path) -> FFIFrame:
    """Header facts of one SPOC FFI; :class:`CubeError` naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CubeError(f"{path}: no such file")
    fast = not path.name.endswith(".gz")
    try:
        hdus = _fast_headers(path) if fast else _astropy_headers(path)
    except Exception:
        fast = False
        try:
            hdus = _astropy_headers(path)
        except Exception as exc:
            raise CubeError(f"{path}: not a readable FITS file ({exc})") from exc
    names = ["primary", "calibrated (cal)", "uncertainty (uncert)"]
    if len(hdus) < 3:
        raise CubeError(
            f"{path}: has {len(hdus)} HDU(s); a SPOC FFI needs the {names[len(hdus)]} image in HDU {len(hdus)}"
        )
    (primary, _, _), (h, cal_off, cal_n), (e, err_off, err_n) = hdus[:3]
    for i, hh in ((1, h), (2, e)):
        if int(hh.get("NAXIS", 0) or 0) != 2 and int(hh.get("ZNAXIS", 0) or 0) != 2:
            raise CubeError(
                f"{path}: HDU {i} ({hh.get('EXTNAME', '?')}) is not a 2-D image; expected the {names[i]} image"
            )
    ename = str(e.get("EXTNAME", "")).upper()
    if "UNCERT" not in ename and "ERR" not in ename:
        raise CubeError(f"{path}: HDU 2 is {e.get('EXTNAME')!r}, not the uncertainty image of the FFI")
    telescop = str(_kw([primary, h], "TELESCOP", "")).upper()
    if telescop != "TESS":
        raise CubeError(f"{path}: TELESCOP={telescop!r}; SPOC FFIs are TESS")
    _check_time_system([h, primary], "TESS", path)
    ids = [_int_or_none(_kw([primary, h], k)) for k in ("SECTOR", "CAMERA", "CCD")]
    m = _FFI_NAME.search(path.name.removesuffix(".gz"))
    for i in range(3):
        if ids[i] is None and m:
            ids[i] = int(m.group(i + 1))
    if None in ids:
        raise CubeError(f"{path}: no SECTOR/CAMERA/CCD keywords and no 'sNNNN-C-D' in its name")
    tstart = _float_or_none(_kw([h, primary], "TSTART"))
    tstop = _float_or_none(_kw([h, primary], "TSTOP"))
    if tstart is None or tstop is None:
        raise CubeError(f"{path}: no finite TSTART/TSTOP; cannot time the frame")

    def shape_of(hh):
        if "ZNAXIS1" in hh:
            return (int(hh["ZNAXIS2"]), int(hh["ZNAXIS1"]))
        return (int(hh["NAXIS2"]), int(hh["NAXIS1"]))

    shape = shape_of(h)
    if shape_of(e) != shape:
        raise CubeError(f"{path}: uncertainty image shape {shape_of(e)} differs from the calibrated image {shape}")
    fast = fast and all(
        hh.get("XTENSION") == "IMAGE"
        and hh.get("BITPIX") == -32
        and hh.get("BSCALE", 1) == 1
        and hh.get("BZERO", 0) == 0
        for hh in (h, e)
    )
    if fast and path.stat().st_size < err_off + err_n:
        raise CubeError(f"{path}: truncated (the uncertainty image ends beyond the file)")
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
        layout=FFILayout.for_shape(shape, h, path),
        cal_offset=cal_off if fast else -1,
        err_offset=err_off if fast else -1,
        fast=fast,
        has_wcs=str(h.get("CTYPE1", "")).upper().startswith("RA"),
        timedel=_float_or_none(_kw([h], "TIMEDEL")),
    )


def scan_ffis(source, *, threads: int = 1) -> list[FFIFrame]:
    """Headers of all FFIs of ``source`` (directory or files), checked to be one sector/camera/CCD of
    one shape with distinct times; sorted by time."""
    files = ffi_files(source)
    frames = [read_ffi_header(f) for f in files]
    first = frames[0]
    for fr in frames[1:]:
        if (fr.sector, fr.camera, fr.ccd) != (first.sector, first.camera, first.ccd):
            raise CubeError(
                f"{fr.path}: is sector {fr.sector} camera {fr.camera} CCD {fr.ccd}, but {first.path} is "
                f"sector {first.sector} camera {first.camera} CCD {first.ccd}; one cube holds one CCD of one sector"
            )
        if fr.shape != first.shape or fr.layout != first.layout:
            raise CubeError(
                f"{fr.path}: image shape {fr.shape} / science area {asdict(fr.layout)} differs from "
                f"{first.path} ({first.shape} / {asdict(first.layout)})"
            )
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


def read_ffi(frame: FFIFrame | str | Path, layout: FFILayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Science pixels ``(flux, flux_err)`` (float32, native byte order) of one FFI."""
    if not isinstance(frame, FFIFrame):
        frame = read_ffi_header(frame)
    lay = layout or frame.layout
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
    lay = layout or best.layout
    h = fits.getheader(best.path, 1).copy()
    # array index i of the crop = array index i + start in the file: shift the reference pixel
    # (SIP polynomials are in offsets from CRPIX, so they stay valid)
    h["CRPIX1"] = float(h["CRPIX1"]) - lay.col_start
    h["CRPIX2"] = float(h["CRPIX2"]) - lay.row_start
    h["NAXIS1"], h["NAXIS2"] = lay.n_cols, lay.n_rows
    return _celestial_wcs_string(h, best.path), best.path


def read_ffi_cube(source, *, layout: FFILayout | None = None) -> xr.Dataset:
    """All FFIs of ``source`` as an in-memory cube (small sets, tests, cutouts); whole CCDs go
    through :func:`ingest_ffis`."""
    frames = scan_ffis(source)
    lay = layout or frames[0].layout
    flux = np.empty((len(frames), lay.n_rows, lay.n_cols), np.float32)
    err = np.empty_like(flux)
    for k, fr in enumerate(frames):
        flux[k], err[k] = read_ffi(fr, lay)
    ds = _template(frames, lay)
    ds["flux"] = ds["flux"].copy(data=flux)
    ds["flux_err"] = ds["flux_err"].copy(data=err)
    return ds


def _cadenceno(frames: list[FFIFrame]) -> np.ndarray:
    idx = [f.ffiindex for f in frames]
    if all(i is not None for i in idx) and len(set(idx)) == len(idx):
        return np.asarray(idx, np.int64)
    log.info("FFIINDEX missing or repeated: numbering the %d frames by time", len(frames))
    return np.arange(len(frames), dtype=np.int64)


def _template(frames: list[FFIFrame], lay: FFILayout) -> xr.Dataset:
    """The cube (coords, quality, attrs) with zero-cost placeholders for flux/flux_err."""
    nt = len(frames)
    wcs, wcs_file = ffi_wcs(frames, lay)
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
#
# A directory: manifest.json (geometry + one entry per slot: file name, size, time, quality) and
# block_KKKKKK.bin, one per block of ``frames_per_block`` slots: a 4096-byte JSON header (number of
# slots in the file, per-slot done mask), then float32 pixels in *strip-major* order
# (strip row, strip column, flux|flux_err, slot, row in strip, column in strip), the science area
# padded with NaN to whole strips, so that stage 2 reads each strip of a block with one contiguous
# read.  Each block file is written to a temporary name and renamed: it is the old or the new version.

_HEADER_BYTES = 4096


def frame_store_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".zarr") + ".frames")


def _frame_key(fr: FFIFrame) -> tuple:
    return (fr.name, fr.size, round(fr.time, 9), fr.quality)


def _block_path(store: Path, k: int) -> Path:
    return store / f"block_{k:06d}.bin"


def _read_block_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read(_HEADER_BYTES).rstrip(b"\0 ").decode())
    except (OSError, ValueError):
        return None


def _grid(geometry: dict):
    """(strip rows, strip columns, number of strips down, across)."""
    lay = geometry["layout"]
    sr, sc = geometry["strip"]
    return sr, sc, -(-lay["n_rows"] // sr), -(-lay["n_cols"] // sc)


def _read_strip(path: Path, hdr: dict, geometry: dict, i: int, j: int, v: int) -> np.ndarray:
    """(n slots, strip rows, strip columns) of variable ``v`` (0 flux, 1 flux_err) of one block file."""
    sr, sc, _, nsc = _grid(geometry)
    n = hdr["n"]
    count = n * sr * sc
    with open(path, "rb") as fh:
        fh.seek(_HEADER_BYTES + 4 * count * ((i * nsc + j) * 2 + v))
        out = np.fromfile(fh, dtype="<f4", count=count)
    if out.size != count:
        raise CubeError(f"{path}: truncated frame-store block")
    return out.reshape(n, sr, sc)


def frame_store_done(store, n_slots: int | None = None) -> np.ndarray:
    """Per-slot done mask of a frame store (slots whose pixels are in a block file)."""
    store = Path(store)
    man = json.loads((store / "manifest.json").read_text())
    n = len(man["slots"]) if n_slots is None else n_slots
    tb = man["geometry"]["frames_per_block"]
    done = np.zeros(n, bool)
    for k in range(-(-n // tb)):
        hdr = _read_block_header(_block_path(store, k))
        if hdr:
            d = np.asarray(hdr["done"], bool)[: n - k * tb]
            done[k * tb : k * tb + d.size] = d
    return done


def _open_store(store: Path, geometry: dict) -> list:
    """The slots of the frame store (created, or emptied when it belongs to another CCD/layout)."""
    man_path = store / "manifest.json"
    if man_path.exists():
        try:
            man = json.loads(man_path.read_text())
            if man.get("geometry") == geometry:
                return [tuple(s) for s in man["slots"]]
            log.warning("%s: frame store of another CCD or layout; starting it afresh", store)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable frame store manifest (%s); starting it afresh", store, exc)
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    write_text_atomic(json.dumps({"geometry": geometry, "slots": []}), man_path)
    return []


def _write_block(k, entries, store, geometry, n_slots, reader):
    """Read the frames of block ``k`` that are not done and write the block file (atomically)."""
    store = Path(store)
    path = _block_path(store, k)
    lay = FFILayout(**geometry["layout"])
    tb = geometry["frames_per_block"]
    sr, sc, nsr, nsc = _grid(geometry)
    s0 = k * tb
    n = min(tb, n_slots - s0)
    buf = np.full((nsr, nsc, 2, n, sr, sc), np.nan, np.float32)
    done = np.zeros(n, bool)
    hdr = _read_block_header(path) if path.exists() else None
    if hdr:  # keep what an earlier run put there
        m = min(hdr["n"], n)
        for i in range(nsr):
            for j in range(nsc):
                for v in (0, 1):
                    buf[i, j, v, :m] = _read_strip(path, hdr, geometry, i, j, v)[:m]
        done[:m] = np.asarray(hdr["done"], bool)[:m]
    pad = np.full((nsr * sr, nsc * sc), np.nan, np.float32)
    for s, fr in entries:
        for v, img in enumerate(reader(fr, lay)):
            pad[: lay.n_rows, : lay.n_cols] = img
            buf[:, :, v, s - s0] = pad.reshape(nsr, sr, nsc, sc).transpose(0, 2, 1, 3)
        done[s - s0] = True
    header = json.dumps({"n": n, "done": done.astype(int).tolist(), "first_slot": s0}).encode()
    if len(header) > _HEADER_BYTES:
        raise CubeError(f"{store}: frames_per_block={tb} too large for the block header")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(header.ljust(_HEADER_BYTES, b" "))
            buf.tofile(fh)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(entries)


def _geometry(frames, lay: FFILayout, tile, tiles_per_task: int, frames_per_block: int | None) -> dict:
    tr, tc = min(int(tile[0]), lay.n_rows), min(int(tile[1]), lay.n_cols)
    return {
        "version": FRAME_STORE_VERSION,
        "sector": frames[0].sector,
        "camera": frames[0].camera,
        "ccd": frames[0].ccd,
        "layout": asdict(lay),
        "tile": [tr, tc],
        "strip": [tr, min(lay.n_cols, tc * int(tiles_per_task))],
        "frames_per_block": int(frames_per_block or default_frames_per_block(lay)),
    }


def stage_frames(
    frames: list[FFIFrame],
    store,
    *,
    layout: FFILayout | None = None,
    tile=(64, 64),
    tiles_per_task: int = 4,
    frames_per_block: int | None = None,
    threads: int = 1,
    reader=None,
) -> dict:
    """Stage 1: put every frame not yet done into the frame store ``store``.

    Returns ``{'read', 'skipped', 'slots'}``: frames read now, frames found done, and each frame's slot.
    """
    store = Path(store)
    lay = layout or frames[0].layout
    geometry = _geometry(frames, lay, tile, tiles_per_task, frames_per_block)
    tb = geometry["frames_per_block"]
    slots = _open_store(store, geometry)
    where = {m: i for i, m in enumerate(slots)}
    slot_of = []
    for fr in frames:
        key = _frame_key(fr)
        if key not in where:
            where[key] = len(slots)
            slots.append(key)
        slot_of.append(where[key])
    # the manifest before any block: a crash after it leaves slots that are simply not done
    write_text_atomic(json.dumps({"geometry": geometry, "slots": [list(s) for s in slots]}), store / "manifest.json")
    done = frame_store_done(store, len(slots))
    by_block: dict[int, list] = {}
    for s, fr in zip(slot_of, frames):
        if not done[s]:
            by_block.setdefault(s // tb, []).append((s, fr))
    n_todo = sum(len(v) for v in by_block.values())
    log.info(
        "%s: %d frame(s) to read in %d block(s), %d already there", store, n_todo, len(by_block), len(frames) - n_todo
    )
    dask_map(
        _write_block,
        [(k, v) for k, v in sorted(by_block.items())],
        threads=threads,
        shared=dict(store=str(store), geometry=geometry, n_slots=len(slots), reader=reader or read_ffi),
    )
    return {"read": n_todo, "skipped": len(frames) - n_todo, "slots": slot_of}


def default_frames_per_block(lay: FFILayout, target_bytes: float = 256e6) -> int:
    """Frames per stage-1 block: about ``target_bytes`` of flux + flux_err (7 for a whole CCD), <= 64."""
    return int(np.clip(target_bytes // (8 * lay.n_rows * lay.n_cols), 1, 64))


# ------------------------------------------------------------------ stage 2: the cube


def _strip_task(block, store, geometry, blocks, slots, nt):
    """One (time, strip rows, strip columns) block of the cube for ``map_blocks``: every frame-store
    block's piece of that strip, concatenated over slots and put in time order."""
    v, i, j = block
    sr, sc, _, _ = _grid(geometry)
    lay = geometry["layout"]
    n_slots = sum(n for _, _, n in blocks)
    buf = np.full((n_slots, sr, sc), np.nan, np.float32)
    s = 0
    for path, hdr, n in blocks:
        if hdr is not None:
            buf[s : s + n] = _read_strip(Path(path), hdr, geometry, i, j, v)
        s += n
    out = buf[slots] if not np.array_equal(slots, np.arange(n_slots)) else buf
    nr = min(sr, lay["n_rows"] - i * sr)
    nc = min(sc, lay["n_cols"] - j * sc)
    return out[:, :nr, :nc]


def build_cube(
    frames: list[FFIFrame],
    store,
    out,
    *,
    slots=None,
    time_chunk: int | None = None,
    threads: int = 1,
    provenance: str | None = None,
) -> Path:
    """Stage 2: the cube store ``out`` (atomic) from the frame store, frames in time order.

    Chunks: (``time_chunk`` or all cadences, the store's tile).  One dask task per strip and variable
    (every frame's pixels of a strip of tiles), so memory is a few strips per thread, whatever the CCD.
    """
    import dask
    import dask.array as da

    store, out = Path(store), Path(out)
    man = json.loads((store / "manifest.json").read_text())
    geometry = man["geometry"]
    tb = geometry["frames_per_block"]
    n_slots = len(man["slots"])
    if slots is None:
        where = {tuple(m): i for i, m in enumerate(man["slots"])}
        missing = [f.path for f in frames if _frame_key(f) not in where]
        if missing:
            raise CubeError(f"{store}: frames not ingested yet, e.g. {missing[:3]}")
        slots = [where[_frame_key(f)] for f in frames]
    slots = np.asarray(slots, int)
    done = frame_store_done(store, n_slots)
    if not done[slots].all():
        missing = [frames[k].path for k in np.flatnonzero(~done[slots])[:3]]
        raise CubeError(f"{store}: frames not ingested yet, e.g. {missing}")
    lay = FFILayout(**geometry["layout"])
    nt = len(frames)
    tr, tc_ = geometry["tile"]
    sr, sc, nsr, nsc = _grid(geometry)
    tchunk = min(int(time_chunk or nt), nt)
    blocks = []
    for k in range(-(-n_slots // tb)):
        path = _block_path(store, k)
        hdr = _read_block_header(path) if path.exists() else None
        blocks.append((str(path), hdr, min(tb, n_slots - k * tb)))
    ds = _template(frames, lay)
    ds.attrs["provenance"] = provenance or ""
    row_chunks = tuple(min(sr, lay.n_rows - i * sr) for i in range(nsr))
    col_chunks = tuple(min(sc, lay.n_cols - j * sc) for j in range(nsc))
    encoding = {}
    for v, name in enumerate(("flux", "flux_err")):

        def task(block_info=None, v=v):
            i, j = block_info[None]["chunk-location"][1:]
            return _strip_task((v, i, j), store, geometry, blocks, slots, nt)

        arr = da.map_blocks(task, chunks=((nt,), row_chunks, col_chunks), dtype=np.float32, name=f"ffi-{name}")
        ds[name] = ds[name].copy(data=arr)
        encoding[name] = {"chunks": (tchunk, tr, tc_), "compressors": [_compressor()]}
    for v in ("quality", "time", "cadenceno", "row", "column"):
        ds[v].encoding = {}
    with atomic_path(out) as tmp:
        with dask.config.set(scheduler="threads" if threads > 1 else "synchronous", num_workers=threads):
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    return out


def _compressor():
    from zarr.codecs import BloscCodec

    # byte shuffle + lz4: ~10 % smaller than zarr's default zstd on noisy float32 pixels, ~10x faster
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


# ------------------------------------------------------------------ both stages


def ingest_ffis(
    source,
    out,
    *,
    tile=(64, 64),
    frames_per_block: int | None = None,
    time_chunk: int | None = None,
    tiles_per_task: int = 4,
    threads: int = 1,
    keep_frames: bool = False,
    frame_store=None,
    layout: FFILayout | None = None,
    checksums: bool = False,
    config: dict | None = None,
    reader=None,
) -> dict:
    """FFIs of one sector/camera/CCD (directory or files) -> cube store ``out`` (zarr v3, atomic).

    Resumable: the frame store (``frame_store``, default ``<out>.frames`` next to the cube) keeps every
    frame ingested so far; rerunning after an interruption, or with more files, reads only the frames
    not in it.  It is removed after success unless ``keep_frames`` (keep it when more frames will come).
    Memory: ``frames_per_block`` frames (flux + flux_err; default ~256 MB worth) per thread in stage 1,
    a few (time, tile rows, ``tiles_per_task`` tiles) buffers per thread in stage 2.  ``checksums``:
    record each file's SHA-256 in the provenance (reads every file once more).  ``reader``: replaces
    :func:`read_ffi` (tests).  Returns ``{'path', 'frames', 'read', 'skipped'}``.
    """
    out = Path(out)
    frames = scan_ffis(source, threads=threads)
    lay = layout or frames[0].layout
    store = Path(frame_store) if frame_store else frame_store_path(out)
    tb = frames_per_block or default_frames_per_block(lay)
    st = stage_frames(
        frames,
        store,
        layout=lay,
        tile=tile,
        tiles_per_task=tiles_per_task,
        frames_per_block=tb,
        threads=threads,
        reader=reader,
    )
    extra = {"input_sizes": {f.name: f.size for f in frames}}
    if checksums:
        extra["input_sha256"] = {f.name: file_sha256(f.path) for f in frames}
    prov = provenance_json(
        "ingest_ffi",
        inputs=[Path(f.path) for f in frames],
        config=dict(config or {}, tile=list(tile), frames_per_block=tb, time_chunk=time_chunk),
        **extra,
    )
    build_cube(
        frames,
        store,
        out,
        slots=st["slots"],
        time_chunk=time_chunk,
        threads=threads,
        provenance=prov,
    )
    if not keep_frames:
        shutil.rmtree(store, ignore_errors=True)
    log.info("%s: %d frames (%d read now, %d from the frame store)", out, len(frames), st["read"], st["skipped"])
    return {"path": out, "frames": len(frames), "read": st["read"], "skipped": st["skipped"]}
