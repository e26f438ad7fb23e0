"""Fingerprint manifest of a run's products: zarr arrays, npz arrays, FITS data and field pages.

The re-layering contract (issue 10): moving code must not change results. The tiny config's outputs are
summarised here and compared with the committed ``tests/data/tiny_manifest.json``:

* integer, boolean and text arrays by SHA-256 digests of their values (exact);
* floating-point arrays by a *numeric fingerprint* (:func:`float_fingerprint`: dtype, shape, the digest of
  the NaN mask, the largest magnitude and signed / absolute sums over 16 blocks), compared to round-off
  (:func:`fingerprints_agree`). Exact digests of floats broke on every new machine: OpenBLAS picks its
  kernels by CPU (AVX2 against AVX-512 moves the PRF fit and everything after it by ~1e-11 relative,
  the CPM systematics by ~2e-9 of their scale), while any change of method moves them by far more;
* field pages by the digest of their text with every embedded array and number taken out (the layout,
  labels and code: exact) plus the fingerprint of those arrays and numbers; their data files by key
  (exact) and the fingerprint of their float32 block.

Regenerate it only on purpose::

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


#: blocks of a float fingerprint; tolerances of :func:`fingerprints_agree` (in units of the array's largest magnitude)
N_BLOCKS = 16
RTOL_SCALE = 1e-7
RTOL_RANDOM = 1e-6  # x sqrt(block size): independent round-off of the elements
RTOL_COHERENT = 1e-9  # x block size: a common round-off shift of every element (e.g. a normalisation)

_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])-?\d+\.\d+(?:[eE][-+]?\d+)?|(?<![A-Za-z0-9_.])-?\d+[eE][-+]?\d+")
_BOKEH_ARRAY = re.compile(
    r'\{"type":"bytes","data":"([A-Za-z0-9+/=]+)"\},"shape":\[([0-9,]*)\],"dtype":"(\w+)","order":"(little|big)"'
)


def _round(x: float) -> float:
    """12 significant digits: far below every tolerance, and a compact JSON file."""
    return float(f"{x:.12g}")


def float_fingerprint(a: np.ndarray, n_blocks: int = N_BLOCKS) -> dict:
    """Numeric fingerprint of a float array: what :func:`fingerprints_agree` compares to round-off."""
    a = np.asarray(a)
    finite = np.isfinite(a)
    v = np.where(finite, a, 0.0).astype(np.float64).ravel()
    scale = float(np.max(np.abs(v))) if v.size else 0.0
    unit = scale or 1.0
    blocks = np.array_split(v / unit, min(n_blocks, max(v.size, 1)))
    return {
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "finite": _digest(np.packbits(finite.ravel()).tobytes() + np.packbits(np.isnan(a).ravel()).tobytes())[:16],
        "scale": _round(scale),
        "n": [int(b.size) for b in blocks],
        "sum": [_round(b.sum()) for b in blocks],
        "abs": [_round(np.abs(b).sum()) for b in blocks],
    }


def fingerprints_agree(x: dict, y: dict) -> bool:
    """Same dtype, shape and NaN/inf pattern; scale and block sums equal within round-off."""
    if any(x[k] != y[k] for k in ("dtype", "shape", "finite", "n")):
        return False
    if abs(x["scale"] - y["scale"]) > RTOL_SCALE * max(abs(x["scale"]), abs(y["scale"])):
        return False
    for n, *pairs in zip(x["n"], x["sum"], y["sum"], x["abs"], y["abs"]):
        tol = RTOL_RANDOM * np.sqrt(n) + RTOL_COHERENT * n
        if abs(pairs[0] - pairs[1]) > tol or abs(pairs[2] - pairs[3]) > tol:
            return False
    return True


def array_digest(a: np.ndarray, n_blocks: int = N_BLOCKS) -> str | dict:
    """Exact digest of an integer / boolean / text array; the :func:`float_fingerprint` of a float one."""
    a = np.ascontiguousarray(a)
    if a.dtype.kind in "fc":
        return float_fingerprint(a.real if a.dtype.kind == "f" else np.stack([a.real, a.imag]), n_blocks)
    if a.dtype.kind in "OUSTt":
        return text_digest(json.dumps([str(v) for v in a.ravel().tolist()] + [list(a.shape)]))
    return _digest(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())


def text_digest(text: str) -> str | dict:
    """Exact digest of a text without decimal numbers; else its skeleton (numbers -> ``#``) and their fingerprint.

    Numbers enter through ``asinh`` (relative precision for large ones) so that one fingerprint serves
    quantities of every scale."""
    numbers = [float(m) for m in _NUMBER.findall(text)]
    if not numbers:
        return _digest(text.encode())
    return {"text": _digest(_NUMBER.sub("#", text).encode()), "numbers": float_fingerprint(np.arcsinh(numbers))}


def table_digest(data) -> dict:
    """A FITS table (the light curves' copies of the zarr sets): column names, dtypes and non-float
    columns exactly, every float column through ``asinh`` into one single-block fingerprint."""
    exact, numbers = [], []
    for c in data.columns.names:
        a = np.asarray(data[c])
        exact.append(f"{c}:{a.dtype.str}{a.shape}")
        if a.dtype.kind == "f":
            numbers.append(np.arcsinh(a.astype(np.float64)).ravel())
        else:
            exact.append(str(array_digest(a)))
    values = np.concatenate(numbers) if numbers else np.zeros(0)
    return {"text": _digest("|".join(exact).encode()), "numbers": float_fingerprint(values, n_blocks=1)}


def _agree(x, y) -> bool:
    """Two manifest entries agree: digests equal, fingerprints within round-off, texts part by part."""
    if x is None or y is None or isinstance(x, str) or isinstance(y, str):
        return x == y
    if "text" in x or "text" in y:
        return set(x) == set(y) and all(x[k] == y[k] if k == "text" else _agree(x[k], y[k]) for k in x)
    return fingerprints_agree(x, y)


def zarr_digests(store: Path, root: Path) -> dict:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    out = {}
    for name, arr in sorted(group.arrays()):
        out[f"{store.relative_to(root)}/{name}"] = array_digest(arr[...])
    return out


def fits_digests(path: Path, root: Path) -> dict:
    from astropy.io import fits

    out = {}
    with fits.open(path) as hdul:
        for i, hdu in enumerate(hdul):
            if hdu.data is None:
                continue
            data = hdu.data
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                out[f"{path.relative_to(root)}[{i}]"] = table_digest(data)
            else:
                out[f"{path.relative_to(root)}[{i}]"] = array_digest(np.asarray(data))
    return out


def page_digest(path: Path) -> dict:
    """A field page: its text with the embedded Bokeh ndarrays (decoded by the report's own reader) and
    numbers taken out, and their fingerprints (a page embeds no dates, paths or versions)."""
    from workflow_lib.report.page import _decode

    arrays = []

    def bokeh(m):
        value = {"type": "ndarray", "array": {"type": "bytes", "data": m.group(1)}, "dtype": m.group(3)}
        arrays.append(np.ravel(_decode({**value, "order": m.group(4)})))
        return f'{{"type":"bytes","data":"@{len(arrays) - 1}"}},"shape":[{m.group(2)}],"dtype":"{m.group(3)}"'

    skeleton = _BOKEH_ARRAY.sub(bokeh, path.read_text())
    out = text_digest(skeleton)
    out = dict(out) if isinstance(out, dict) else {"text": out, "numbers": None}
    for i, a in enumerate(arrays):
        out[f"array{i}"] = array_digest(a)
    return out


def data_file_digest(path: Path) -> dict:
    """A page's data file (:mod:`workflow_lib.report.datafiles`): its key exactly, its float32 block by fingerprint."""
    from workflow_lib.report.datafiles import read_chunk_file

    key, values = read_chunk_file(path)
    return {"text": _digest(key.encode()), "numbers": None, "array0": array_digest(values)}


def _temporary(path: Path, root: Path) -> bool:
    """A write in progress (``atomic_path``'s ``.tmp-*`` siblings and directories): never a product."""
    return any(".tmp-" in part for part in path.relative_to(root).parts)


def _products(results: Path, pattern: str) -> list[Path]:
    return [p for p in sorted(results.rglob(pattern)) if not _temporary(p, results)]


def manifest(results: Path) -> dict[str, str | dict]:
    results = Path(results)
    out: dict[str, str | dict] = {}
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
        out[str(path.relative_to(results))] = data_file_digest(path)
    return out


def compare(found: dict, expected: dict) -> list[str]:
    """Human-readable differences (missing, extra, changed beyond round-off), empty when they agree."""
    diffs = [f"missing: {k}" for k in sorted(set(expected) - set(found))]
    diffs += [f"extra: {k}" for k in sorted(set(found) - set(expected))]
    diffs += [f"changed: {k}" for k in sorted(set(found) & set(expected)) if not _agree(found[k], expected[k])]
    return diffs


def dumps(found: dict) -> str:
    """The manifest as JSON, one product per line (reviewable diffs, a compact file)."""
    lines = [
        f" {json.dumps(k)}: {json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in sorted(found.items())
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    sys.stdout.write(dumps(manifest(Path(sys.argv[1]))))
