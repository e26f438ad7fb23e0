"""Checksum manifest of a run's products: zarr arrays, npz arrays, FITS data and field pages.

The re-layering contract (issue 10): moving code must not change results. The tiny config's outputs are
summarised here as SHA-256 digests of their *data* (array values with dtype and shape, FITS HDU data,
field-page HTML bytes) and compared with the committed
``tests/data/tiny_manifest.json``. Regenerate it only on purpose::

    python -m tests.helpers.manifest results/ci-tiny > tests/data/tiny_manifest.json
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

#: provenance that legitimately differs between runs (dates, versions, paths, config hashes)
VOLATILE = re.compile(
    r"(created|utc|date|version|versions|config_hash|provenance|host|python|platform|path)", re.IGNORECASE
)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    if a.dtype.kind in "OUSTt":
        return _digest(json.dumps([str(v) for v in a.ravel().tolist()] + [list(a.shape)]).encode())
    return _digest(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())


def zarr_digests(store: Path, root: Path) -> dict[str, str]:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    out = {}
    for name, arr in sorted(group.arrays()):
        out[f"{store.relative_to(root)}/{name}"] = array_digest(arr[...])
    return out


def fits_digests(path: Path, root: Path) -> dict[str, str]:
    from astropy.io import fits

    out = {}
    with fits.open(path) as hdul:
        for i, hdu in enumerate(hdul):
            if hdu.data is None:
                continue
            data = hdu.data
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                blob = b"".join(array_digest(np.asarray(data[c])).encode() for c in data.columns.names)
                out[f"{path.relative_to(root)}[{i}]"] = _digest(blob)
            else:
                out[f"{path.relative_to(root)}[{i}]"] = array_digest(np.asarray(data))
    return out


def page_digest(path: Path) -> str:
    """The page's bytes: a field page embeds no dates, paths or versions (two runs give identical bytes)."""
    return _digest(path.read_bytes())


def _temporary(path: Path, root: Path) -> bool:
    """A write in progress (``atomic_path``'s ``.tmp-*`` siblings and directories): never a product."""
    return any(".tmp-" in part for part in path.relative_to(root).parts)


def _products(results: Path, pattern: str) -> list[Path]:
    return [p for p in sorted(results.rglob(pattern)) if not _temporary(p, results)]


def manifest(results: Path) -> dict[str, str]:
    results = Path(results)
    out: dict[str, str] = {}
    for store in _products(results, "*.zarr"):
        if (store / "zarr.json").is_file() and not any(p.suffix == ".zarr" for p in store.parents):
            out.update(zarr_digests(store, results))
    for path in _products(results, "*.fits"):
        out.update(fits_digests(path, results))
    for path in _products(results, "*.npz"):
        with np.load(path, allow_pickle=False) as npz:
            for key in sorted(npz.files):
                if not VOLATILE.search(key):
                    out[f"{path.relative_to(results)}/{key}"] = array_digest(npz[key])
    for path in sorted((results / "report").glob("*.html")):
        if path.name != "index.html":
            out[str(path.relative_to(results))] = page_digest(path)
    for path in _products(results / "report", "*_data/*.js"):  # the pages' data folders (report.datafiles)
        out[str(path.relative_to(results))] = page_digest(path)
    return out


def compare(found: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Human-readable differences (missing, extra, changed), empty when identical."""
    diffs = [f"missing: {k}" for k in sorted(set(expected) - set(found))]
    diffs += [f"extra: {k}" for k in sorted(set(found) - set(expected))]
    diffs += [f"changed: {k}" for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    return diffs


if __name__ == "__main__":
    json.dump(manifest(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
