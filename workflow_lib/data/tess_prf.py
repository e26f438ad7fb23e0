"""The official TESS SPOC pixel response function (PRF) models: loading, interpolation, rendering.

The SPOC ships, per camera/CCD, the PRF at a 5x5 grid of CCD positions (files
``tess2018243163601-prf-<cam>-<ccd>-rowRRRR-colCCCC.fits``). Each is a 117x117 image sampled
``NSAMP = 9`` times finer than a TESS pixel (13x13 TESS pixels); header keywords ``CCD_RREF`` /
``CCD_CREF`` give the CCD row/column of the central sample (``CRPIX = 59``, 1-based). Every one of
the 81 interleaved sub-grids ``image[a::9, b::9]`` sums to exactly 1: the SPOC (like the Kepler
PRF of Bryson et al. 2010) tabulates the *pixel response* -- the fraction of a star's flux that
lands in a pixel whose centre lies at offset ``delta`` from the star is ``image[58 + 9*delta]``
(rows along axis 0, columns along axis 1). So rendering a star needs no integration over the
pixel: evaluate the (spline-interpolated) image at ``58 + 9*(pixel_centre - star)``.

Conventions used here:

* CCD coordinates: an integer value is a pixel centre (as in the cube's ``row``/``column``).
* The continuous PRF between the tabulated samples is the cubic B-spline interpolant of the
  samples continued by zeros (:func:`spline_coefficients`). Because cubic-spline interpolation reproduces a
  constant, and every stride-9 sub-grid sums to 1, the interpolated PRF summed over a pixel
  lattice is 1 at *any* sub-pixel phase; :func:`render_prf` additionally normalises explicitly.
  Where the SPOC table is cut off (6.5 px from the centre, samples ~3e-4) the spline overshoots
  by up to ~3e-5 of the flux (a slightly negative response in the pixel just beyond).
* Between grid positions the PRF image is interpolated bilinearly in (row, column) (the scheme
  the SPOC recommends and lightkurve's ``TessPRF`` uses); outside the grid it is clamped to the
  nearest grid edge.

Package data (``workflow_lib/data/tess_prf/``) holds the 3x3 grid points of camera 4 / CCD 2
(Sectors 1-3 models) that bracket the default synthetic cutout (row 1000, column 1000) as a
compressed float32 ``.npz`` plus ``sources.json`` naming the original files; rebuild it with
:func:`build_package_data`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from workflow_lib.core.atomic import atomic_path, write_text_atomic
from workflow_lib.core.logs import get_logger
from workflow_lib.data.cube import CubeError

log = get_logger("tess_prf")

#: TESS PRF models are sampled this many times finer than a TESS pixel
NSAMP = 9
#: size of a SPOC PRF image (13 TESS pixels x 9)
PRF_SIZE = 117
#: 0-based index of the central sample (FITS CRPIX = 59)
PRF_CENTER = 58

PACKAGE_DIR = Path(__file__).resolve().parent / "files" / "tess_prf"
PACKAGE_FILE = PACKAGE_DIR / "prf_cam4_ccd2.npz"


@dataclass(frozen=True)
class PRFGrid:
    """SPOC PRF images on a rectangular grid of CCD positions.

    ``images[i, j]`` is the 117x117 supersampled PRF at CCD row ``rows[i]``, column ``cols[j]``.
    """

    rows: np.ndarray  # (nr,) CCD rows of the grid positions, increasing
    cols: np.ndarray  # (nc,) CCD columns, increasing
    images: np.ndarray  # (nr, nc, 117, 117)
    camera: int = 4
    ccd: int = 2
    nsamp: int = NSAMP
    sources: tuple = ()


def _read_prf_fits(path: Path):
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            hdu = hdul[0]
            hdr = hdu.header
            data = np.asarray(hdu.data, dtype=np.float64)
            r, c = float(hdr["CCD_RREF"]), float(hdr["CCD_CREF"])
            nsamp = int(hdr.get("NSAMP", NSAMP))
            cam, ccd = int(hdr.get("CAM", 0)), int(hdr.get("CCD", 0))
    except (OSError, KeyError, TypeError) as exc:
        raise CubeError(f"{path}: not a TESS SPOC PRF file ({exc})") from exc
    if data.shape != (PRF_SIZE, PRF_SIZE) or nsamp != NSAMP:
        raise CubeError(
            f"{path}: expected a {PRF_SIZE}x{PRF_SIZE} PRF sampled {NSAMP}x per pixel, "
            f"got shape {data.shape}, NSAMP={nsamp}"
        )
    return r, c, cam, ccd, data


def _assemble(entries, where):
    rows = np.unique([e[0] for e in entries])
    cols = np.unique([e[1] for e in entries])
    images = np.full((rows.size, cols.size, PRF_SIZE, PRF_SIZE), np.nan)
    for r, c, img in entries:
        images[np.searchsorted(rows, r), np.searchsorted(cols, c)] = img
    if np.isnan(images).any():
        raise CubeError(
            f"{where}: PRF positions do not form a complete rectangular grid "
            f"(rows {rows.tolist()}, cols {cols.tolist()})"
        )
    return images, rows, cols


def load_prf_grid(directory: str | Path | None = None) -> PRFGrid:
    """Load SPOC PRF models.

    ``directory``: a folder of SPOC ``*prf*.fits`` files of one camera/CCD (e.g.
    ``shared/data/tess_prf/cam4_ccd2``) or ``None`` for the packaged 3x3 grid of camera 4 / CCD 2.
    """
    if directory is None:
        return _package_grid()
    directory = Path(directory)
    files = sorted(directory.glob("*.fits"))
    if not files:
        raise CubeError(f"{directory}: no PRF FITS files found")
    entries, cams = [], set()
    for f in files:
        r, c, cam, ccd, data = _read_prf_fits(f)
        entries.append((r, c, data))
        cams.add((cam, ccd))
    if len(cams) != 1:
        raise CubeError(f"{directory}: PRF files from several camera/CCDs {sorted(cams)}")
    images, rows, cols = _assemble(entries, directory)
    cam, ccd = cams.pop()
    return PRFGrid(rows, cols, images, camera=cam, ccd=ccd, sources=tuple(f.name for f in files))


@functools.lru_cache(maxsize=1)
def _package_grid() -> PRFGrid:
    if not PACKAGE_FILE.exists():
        raise CubeError(
            f"{PACKAGE_FILE}: packaged TESS PRF data missing; rebuild with workflow_lib.data.tess_prf.build_package_data"
        )
    with np.load(PACKAGE_FILE) as z:
        images = z["images"].astype(np.float64)
        rows, cols = z["rows"].astype(float), z["cols"].astype(float)
        camera, ccd = int(z["camera"]), int(z["ccd"])
        sources = tuple(str(s) for s in z["sources"])
    return PRFGrid(rows, cols, images, camera=camera, ccd=ccd, sources=sources)


def build_package_data(
    src_dir: str | Path, out_dir: str | Path = PACKAGE_DIR, rows=(513, 1025, 1536), cols=(557, 1069, 1580)
) -> Path:
    """Write the packaged PRF subset: the grid points ``rows x cols`` of ``src_dir`` as float32 npz.

    A ``sources.json`` beside it records the original file names and their CCD positions.
    """
    full = load_prf_grid(src_dir)
    ir = [int(np.flatnonzero(full.rows == r)[0]) for r in rows]
    ic = [int(np.flatnonzero(full.cols == c)[0]) for c in cols]
    images = full.images[np.ix_(ir, ic)].astype(np.float32)
    names = []
    for r in rows:
        for c in cols:
            hit = [s for s in full.sources if s.endswith(f"row{int(r):04d}-col{int(c):04d}.fits")]
            names.append(hit[0] if hit else f"row{r}-col{c}")
    out_dir = Path(out_dir)
    out = out_dir / PACKAGE_FILE.name
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                images=images,
                rows=np.asarray(rows, float),
                cols=np.asarray(cols, float),
                camera=full.camera,
                ccd=full.ccd,
                sources=np.array(names),
            )
    meta = {
        "description": "TESS SPOC PRF models, camera %d CCD %d (Sectors 1-3), subset of the 5x5 grid; "
        "images stored as float32 (row-major: axis 0 = CCD row)" % (full.camera, full.ccd),
        "origin": "MIT/SPOC tess2018243163601 PRF release (copied via CheerfulUser/TESSreduce test data)",
        "files": [
            {"file": n, "ccd_row": float(r), "ccd_col": float(c)}
            for n, (r, c) in zip(names, [(r, c) for r in rows for c in cols])
        ],
    }
    write_text_atomic(json.dumps(meta, indent=1) + "\n", out_dir / "sources.json")
    _package_grid.cache_clear()
    return out


def _bilinear_weights(grid: PRFGrid, ccd_row: float, ccd_col: float):
    """Indices and weights of the (up to) four grid points around (row, col), clamped to the grid."""

    def axis(nodes, x):
        if nodes.size == 1:
            return 0, 0, 0.0
        x = float(np.clip(x, nodes[0], nodes[-1]))
        i = int(np.clip(np.searchsorted(nodes, x, side="right") - 1, 0, nodes.size - 2))
        t = (x - nodes[i]) / (nodes[i + 1] - nodes[i])
        return i, i + 1, t

    r0, r1, tr = axis(grid.rows, ccd_row)
    c0, c1, tc = axis(grid.cols, ccd_col)
    return [(r0, c0, (1 - tr) * (1 - tc)), (r0, c1, (1 - tr) * tc), (r1, c0, tr * (1 - tc)), (r1, c1, tr * tc)]


def prf_at(ccd_row: float, ccd_col: float, grid: PRFGrid | None = None) -> np.ndarray:
    """The 117x117 supersampled PRF at a CCD position: bilinear interpolation between grid points.

    Positions outside the grid are clamped to its edge (a warning is logged).
    """
    grid = _package_grid() if grid is None else grid
    if not (grid.rows[0] <= ccd_row <= grid.rows[-1] and grid.cols[0] <= ccd_col <= grid.cols[-1]):
        log.warning(
            "PRF requested at CCD (row %.1f, col %.1f), outside the PRF grid rows %s cols %s: "
            "using the nearest grid edge",
            ccd_row,
            ccd_col,
            grid.rows.tolist(),
            grid.cols.tolist(),
        )
    out = np.zeros((PRF_SIZE, PRF_SIZE))
    for i, j, w in _bilinear_weights(grid, ccd_row, ccd_col):
        if w:
            out += w * grid.images[i, j]
    return out


#: zero samples added around a PRF image before spline filtering (the cubic-spline prefilter's
#: influence decays as 0.268**n, so 18 samples = 2 px make the zero padding exact to 1e-10)
COEF_PAD = 18


def spline_coefficients(image: np.ndarray, pad: int = COEF_PAD) -> np.ndarray:
    """Cubic B-spline coefficients of ``image`` continued by zeros: the image is zero-padded by
    ``pad`` samples and filtered (mode 'mirror' on the padded array, which makes the interpolant
    of the zero-continued signal exact; scipy's 'grid-constant' prefilter is only approximate).
    Coefficient index ``k + pad`` belongs to image sample ``k``.
    """
    padded = np.pad(np.asarray(image, dtype=np.float64), pad)
    return ndimage.spline_filter(padded, order=3, mode="mirror")


def prf_coefficients(prf_image: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients of a supersampled PRF image, zero outside its 13x13 px
    (index ``k + COEF_PAD`` is sample ``k``)."""
    return spline_coefficients(prf_image, COEF_PAD)


def prf_coefficients_at(ccd_row: float, ccd_col: float, grid: PRFGrid | None = None) -> np.ndarray:
    """Spline coefficients of :func:`prf_at` (row, col): the bilinear mix of the grid points'
    coefficients (the spline prefilter is linear, so this equals ``prf_coefficients(prf_at(...))``),
    with the per-grid-point coefficients cached."""
    grid = _package_grid() if grid is None else grid
    coefs = _grid_coefficients(grid)
    out = np.zeros_like(coefs[0][0])
    for i, j, w in _bilinear_weights(grid, ccd_row, ccd_col):
        if w:
            out += w * coefs[i][j]
    return out


_COEF_CACHE: dict = {}


def _grid_coefficients(grid: PRFGrid):
    key = id(grid)
    hit = _COEF_CACHE.get(key)
    if hit is None or hit[0] is not grid:
        hit = (
            grid,
            [[prf_coefficients(grid.images[i, j]) for j in range(grid.cols.size)] for i in range(grid.rows.size)],
        )
        _COEF_CACHE.clear()
        _COEF_CACHE[key] = hit
    return hit[1]


def evaluate_prf(coeffs: np.ndarray, drow, dcol) -> np.ndarray:
    """Pixel response at offsets (pixel centre - star) ``drow``, ``dcol`` [TESS px] (broadcast).

    ``coeffs`` from :func:`prf_coefficients`. Offsets beyond the tabulated 13x13 px (plus the
    spline's one-sample support) give 0.
    """
    drow, dcol = np.broadcast_arrays(np.asarray(drow, float), np.asarray(dcol, float))
    a = PRF_CENTER + COEF_PAD + NSAMP * drow.ravel()
    b = PRF_CENTER + COEF_PAD + NSAMP * dcol.ravel()
    n = coeffs.shape[0]
    ok = (a >= 2) & (a <= n - 3) & (b >= 2) & (b <= n - 3)
    vals = np.zeros(a.size)
    vals[ok] = ndimage.map_coordinates(coeffs, np.stack([a[ok], b[ok]]), order=3, mode="mirror", prefilter=False)
    return vals.reshape(drow.shape)


def render_prf(
    ccd_row: float,
    ccd_col: float,
    rows,
    cols,
    flux: float = 1.0,
    *,
    grid: PRFGrid | None = None,
    prf_image: np.ndarray | None = None,
) -> np.ndarray:
    """Image of a point source of total ``flux`` at CCD (``ccd_row``, ``ccd_col``) on a pixel grid.

    ``rows``/``cols`` are 1-D CCD coordinates of the pixel centres; returns ``(len(rows), len(cols))``.
    Each pixel gets the SPOC pixel response at (pixel centre - source position); the response is
    normalised so that its sum over an unbounded pixel lattice is exactly 1 (so the returned image
    sums to ``flux`` when the stamp contains the whole 13x13 px PRF). ``prf_image`` overrides the
    PRF interpolated from ``grid`` at the source position (:func:`prf_at`).
    """
    img = prf_at(ccd_row, ccd_col, grid) if prf_image is None else np.asarray(prf_image, float)
    coeffs = prf_coefficients(img)
    rows = np.asarray(rows, float)
    cols = np.asarray(cols, float)
    # normalisation over the full lattice at this sub-pixel phase (+-7 px covers the support)
    k = np.arange(-8, 9)
    fr = ccd_row - np.round(ccd_row)
    fc = ccd_col - np.round(ccd_col)
    total = evaluate_prf(coeffs, (k - fr)[:, None], (k - fc)[None, :]).sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"PRF at row {ccd_row}, col {ccd_col} has non-positive total {total}")
    stamp = evaluate_prf(coeffs, (rows - ccd_row)[:, None], (cols - ccd_col)[None, :])
    return flux * stamp / total


def prf_centroid(prf_image: np.ndarray) -> tuple[float, float]:
    """Flux-weighted centroid offset (row, col) [px] of a supersampled PRF relative to its centre sample."""
    img = np.asarray(prf_image, float)
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    s = img.sum()
    return float(((y * img).sum() / s - PRF_CENTER) / NSAMP), float(((x * img).sum() / s - PRF_CENTER) / NSAMP)
