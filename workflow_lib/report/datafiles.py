"""The field page's data files: the pixel cubes and light-curve sets a page loads on demand.

A page keeps its HTML small and reads its arrays from ``<page stem>_data/`` beside it. Browsers refuse
``fetch`` of local files on a ``file://`` page, but they do run ``<script src>`` tags, so every data file is
a one-line script ::

    RPT.chunk("raw_g3_c7", "<base64 of little-endian float32>");

that hands one block of numbers to the page (``report.js``). The report folder stays self-contained and
relocatable: zip it, open it elsewhere.

Layout (:func:`block_layout`)
-----------------------------
* **Cubes** (``raw``: the pixels; ``cpm``: the CPM de-trended pixels; ``err``: the pixels' flux_err) are cut
  into blocks of one *pixel group* x one *time chunk*. A pixel group is a ``tile`` x ``tile`` square of the
  CCD (pixels in display order within it); a time chunk is ``chunk`` consecutive display cadences. A block
  holds its pixels' series pixel-major (``block[slot * n + k]``, ``n`` the chunk's length). One frame needs
  the blocks of every group in one chunk (``n_pix x chunk x 4`` bytes, ``frame_mb``); one pixel's series
  needs its group's blocks in every chunk (``tile**2 x n_time x 4`` bytes). File ``<cube>_g<g>_c<c>.js``.
* **Light-curve sets** (``raw``, ``lfd``, ``cpm``, ``dbl``): groups of ``per_file`` sources, all cadences;
  the file holds the group's flux (source-major) followed by its flux_err. File ``lc_<set>_s<k>.js``.

:func:`read_page_data_folder` (through :func:`workflow_lib.report.page.read_page_data`, which reads the
layout from the page) reassembles every array from the files (for tests, and for anyone who wants the numbers
a page shows).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow_lib.core.atomic import atomic_dir

#: the suffix of a page's data folder: ``<page stem>_data``
DATA_SUFFIX = "_data"
_CHUNK_RE = re.compile(r'^RPT\.chunk\("([A-Za-z0-9_]+)", "([A-Za-z0-9+/=]*)"\);\s*$')


def data_dir_for(html_path) -> Path:
    """The data folder of the page ``html_path`` (``<stem>_data`` beside it)."""
    p = Path(html_path)
    return p.parent / f"{p.stem}{DATA_SUFFIX}"


@dataclass
class BlockLayout:
    """How a page's cubes and light-curve sets are cut into files (see module doc)."""

    tile: int
    chunk: int  # display cadences per time chunk
    group: np.ndarray  # (npix,) pixel group of each displayed pixel
    slot: np.ndarray  # (npix,) position of the pixel within its group
    group_size: np.ndarray  # (ngroup,)
    n_time: int
    per_file: int  # sources per light-curve file

    @property
    def n_chunks(self) -> int:
        return -(-self.n_time // self.chunk) if self.n_time else 0

    def meta(self) -> dict:
        """What report.js needs to find a number (the pixel groups and slots travel as pixel columns)."""
        return {
            "tile": self.tile,
            "chunk": self.chunk,
            "n_chunks": self.n_chunks,
            "group_size": [int(n) for n in self.group_size],
            "per_file": self.per_file,
        }


def block_layout(
    rows: np.ndarray, cols: np.ndarray, n_time: int, *, tile: int = 16, frame_mb: float = 16.0, lc_file_mb: float = 2.0
) -> BlockLayout:
    """Pixel groups (``tile`` x ``tile`` CCD squares) and the time-chunk length that keeps one frame's
    blocks within ``frame_mb``; light-curve files of about ``lc_file_mb``."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    key = ((rows - rows.min()) // tile) * (1 << 20) + (cols - cols.min()) // tile if rows.size else rows
    uniq, group = np.unique(key, return_inverse=True)
    group = group.astype(np.int32)
    slot = np.zeros(rows.size, np.int32)
    size = np.zeros(uniq.size, np.int64)
    for p, g in enumerate(group):  # display order within a group
        slot[p] = size[g]
        size[g] += 1
    npix = max(int(rows.size), 1)
    chunk = int(np.clip(frame_mb * 1e6 // (4 * npix), 16, max(n_time, 16)))
    per_file = int(max(1, lc_file_mb * 1e6 // (8 * max(n_time, 1))))
    return BlockLayout(tile, chunk, group, slot, size, int(n_time), per_file)


def _script(key: str, values: np.ndarray) -> str:
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return f'RPT.chunk("{key}", "{base64.b64encode(data).decode()}");\n'


def cube_key(name: str, g: int, c: int) -> str:
    """The key (and file stem) of block (pixel group ``g``, time chunk ``c``) of cube ``name``."""
    return f"{name}_g{g}_c{c}"


def set_key(name: str, k: int) -> str:
    """The key (and file stem) of file ``k`` of light-curve set ``name``."""
    return f"lc_{name}_s{k}"


def cube_block_index(layout: BlockLayout):
    """``(g, c, pixels, t0, t1)`` of every cube block: the displayed pixels of group ``g`` (in display order,
    which is slot order) and the cadences ``t0:t1`` of chunk ``c``."""
    for g in range(len(layout.group_size)):
        pix = np.flatnonzero(layout.group == g)
        for c in range(layout.n_chunks):
            yield g, c, pix, c * layout.chunk, min((c + 1) * layout.chunk, layout.n_time)


def set_file_index(layout: BlockLayout, n_sources: int):
    """``(k, s0, s1)`` of every light-curve file: sources ``s0:s1``."""
    for k in range(-(-n_sources // layout.per_file)):
        yield k, k * layout.per_file, min((k + 1) * layout.per_file, n_sources)


def cube_blocks(name: str, cube: np.ndarray, layout: BlockLayout):
    """``(key, values)`` of every block of a ``(npix, n_time)`` cube."""
    for g, c, pix, t0, t1 in cube_block_index(layout):
        yield cube_key(name, g, c), cube[pix, t0:t1]


def set_blocks(name: str, flux: np.ndarray, err: np.ndarray, layout: BlockLayout):
    """``(key, values)`` of every file of a light-curve set: a group's flux then its flux_err."""
    for k, s0, s1 in set_file_index(layout, flux.shape[0]):
        yield set_key(name, k), np.concatenate([flux[s0:s1].ravel(), err[s0:s1].ravel()])


def write_page_data(data_dir, cubes: dict, sets: dict, layout: BlockLayout) -> dict:
    """Write the data folder atomically (:func:`workflow_lib.core.atomic.atomic_dir`): ``cubes`` maps a
    name to an ``(npix, n_time)`` array, ``sets`` a name to ``(flux, flux_err)`` ``(nsource, n_time)`` arrays.
    Returns ``{"files": n, "bytes": total}``."""
    n, total = 0, 0
    with atomic_dir(data_dir) as tmp:
        blocks = [cube_blocks(k, np.asarray(v), layout) for k, v in cubes.items()]
        blocks += [set_blocks(k, np.asarray(f), np.asarray(e), layout) for k, (f, e) in sets.items()]
        for gen in blocks:
            for key, values in gen:
                text = _script(key, values)
                (tmp / f"{key}.js").write_text(text)
                n, total = n + 1, total + len(text)
    return {"files": n, "bytes": total}


def read_chunk_file(path) -> tuple[str, np.ndarray]:
    """The key and float32 values of one data file; a ValueError names a file that is not one."""
    text = Path(path).read_text()
    m = _CHUNK_RE.match(text)
    if not m:
        raise ValueError(f"{path}: not a report data file (expected one RPT.chunk(key, base64) line)")
    return m.group(1), np.frombuffer(base64.b64decode(m.group(2)), dtype="<f4")


def read_page_data_folder(data_dir, layout: BlockLayout, cubes, sets, n_sources: int) -> dict:
    """The arrays of a data folder written by :func:`write_page_data` with ``layout``: ``{"cubes": {name:
    (npix, n_time) float32}, "sets": {name: (flux, flux_err)}}`` for the cube and set names given."""
    ddir, nt = Path(data_dir), layout.n_time
    out = {"cubes": {}, "sets": {}}
    for name in cubes:
        arr = np.full((layout.group.size, nt), np.nan, np.float32)
        for g, c, pix, t0, t1 in cube_block_index(layout):
            _, vals = read_chunk_file(ddir / f"{cube_key(name, g, c)}.js")
            arr[pix, t0:t1] = vals.reshape(pix.size, t1 - t0)
        out["cubes"][name] = arr
    for name in sets:
        flux, err = np.full((n_sources, nt), np.nan, np.float32), np.full((n_sources, nt), np.nan, np.float32)
        for k, s0, s1 in set_file_index(layout, n_sources):
            _, vals = read_chunk_file(ddir / f"{set_key(name, k)}.js")
            half = vals.size // 2
            flux[s0:s1], err[s0:s1] = vals[:half].reshape(s1 - s0, nt), vals[half:].reshape(s1 - s0, nt)
        out["sets"][name] = (flux, err)
    return out
