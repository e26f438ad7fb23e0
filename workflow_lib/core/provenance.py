"""Provenance recorded in every output: input files and their digests, software versions, config hash.

Every product's provenance lists its inputs with a digest of each (:func:`input_digest`); a zarr store's
digest is that of its root metadata, which holds the store's own provenance, so a change anywhere upstream
changes the digests of everything made from it (a store rewritten by the same code from the same inputs
and config is, rightly, not seen as changed: it holds the same values). :func:`stale_inputs` compares a product's recorded digests
with its inputs as they are now: a product made from an input that has since changed is *stale* (the report
leaves it out and says so; ``python -m workflow_lib.steps stale <results dir>`` lists them).
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from workflow_lib import __version__

#: packages whose versions are recorded in outputs
PACKAGES = ("workflow_lib", "numpy", "scipy", "astropy", "astroquery", "xarray", "zarr", "dask", "bokeh", "snakemake")


def software_versions() -> dict:
    """Versions of the packages that produce the results (missing ones as None)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        if name == "workflow_lib":  # this package: its own version, installed or run from a checkout
            out[name] = __version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def config_hash(config: dict) -> str:
    """Stable short hash of a (JSON-serialisable) config mapping."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: files larger than this are fingerprinted by their size and first and last MiB (raw FFIs: tens of MB each)
_WHOLE_FILE_BYTES = 64 * 2**20
_EDGE_BYTES = 2**20


_SHA256: dict = {}


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1-MiB blocks. Remembered per (path, size, mtime) for the
    life of the process, so a step that records a file's checksum and its digest reads the file once."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def input_digest(path) -> str | None:
    """Digest of one input as it is now (None when it does not exist).

    A zarr store (its directory or its ``zarr.json``): SHA-256 of the root ``zarr.json`` (array layout and
    attrs, among them the store's provenance, so its inputs' digests). A directory of files: of its file
    names and their digests. A file: SHA-256 of its bytes; above 64 MiB of its size and first and last MiB.
    """
    p = Path(path)
    if p.name == "zarr.json":
        p = p.parent
    h = hashlib.sha256()
    if (p / "zarr.json").is_file():
        h.update((p / "zarr.json").read_bytes())
    elif p.is_dir():
        for f in sorted(q for q in p.iterdir() if q.is_file() and ".tmp-" not in q.name):
            h.update(f.name.encode() + b"\0" + (input_digest(f) or "").encode())
    elif p.is_file():
        size = p.stat().st_size
        if size <= _WHOLE_FILE_BYTES:
            return file_sha256(p)[:16]
        with open(p, "rb") as fh:
            h.update(str(size).encode() + fh.read(_EDGE_BYTES))
            fh.seek(size - _EDGE_BYTES)
            h.update(fh.read())
    else:
        return None
    return h.hexdigest()[:16]


def stale_inputs(prov) -> list[str]:
    """The inputs of a product (its provenance record, dict or JSON string) that are missing or differ from
    the digests recorded when it was made; empty for a product that is up to date or recorded no digests.
    Paths are taken as recorded (relative ones from the current directory, as the rules run)."""
    rec = json.loads(prov) if isinstance(prov, str) else dict(prov or {})
    digests = rec.get("input_digests") or {}
    return [path for path, want in digests.items() if want is not None and input_digest(path) != want]


def _recorded_provenance(path: Path):
    """The provenance a product records (zarr attrs, npz key, JSON key, ECSV meta), or None."""
    try:
        if path.name == "zarr.json":
            return (json.loads(path.read_text()).get("attributes") or {}).get("provenance")
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as z:
                return str(z["provenance"]) if "provenance" in z.files else None
        if path.suffix == ".json":
            rec = json.loads(path.read_text())
            return rec.get("provenance") if isinstance(rec, dict) else None
        if path.suffix == ".ecsv":
            from astropy.table import Table

            return Table.read(path, format="ascii.ecsv").meta.get("provenance")
    except Exception:  # noqa: BLE001 - an unreadable product is not this check's business
        return None
    return None


def stale_products(root) -> list[tuple[str, list[str]]]:
    """Every product under ``root`` (zarr stores, npz, JSON and ECSV files with a provenance record) made
    from inputs that are missing or have changed since, with those inputs: ``[(product, [inputs])]``.
    Paths recorded relative are resolved from the current directory (run it where snakemake ran)."""
    root = Path(root)
    out = []
    for path in sorted(root.rglob("*")):
        if ".tmp-" in str(path) or not path.is_file():
            continue
        if path.name == "zarr.json" and any(q.suffix == ".zarr" for q in path.parents if q != path.parent):
            continue  # an array of a store, not the store
        if path.name != "zarr.json" and path.suffix not in (".npz", ".json", ".ecsv"):
            continue
        rec = _recorded_provenance(path)
        stale = stale_inputs(rec) if rec else []
        if stale:
            out.append((str(path.parent if path.name == "zarr.json" else path), stale))
    return out


def report_stale(root) -> list[tuple[str, list[str]]]:
    """Command ``stale``: print every stale product under ``root`` (:func:`stale_products`) with the inputs
    that changed, and a one-line summary on stderr when there is one; returns them."""
    import sys

    found = stale_products(root)
    for product, inputs in found:
        print(f"stale: {product} (made from an earlier {', '.join(inputs)})")
    if found:
        sys.stderr.write(f"{len(found)} stale product(s) under {root}: rerun snakemake there to remake them\n")
    else:
        print(f"no stale products under {root}")
    return found


def provenance(step: str, inputs=(), config: dict | None = None, **extra) -> dict:
    """A provenance record for one pipeline step.

    Deliberately contains no wall-clock time, so the same config and inputs give identical outputs.
    """
    rec = {
        "step": step,
        "inputs": [str(p) for p in inputs],
        "input_digests": {str(p): input_digest(p) for p in inputs},
        "software": software_versions(),
        "config_hash": config_hash(config or {}),
        "config": config or {},
    }
    rec.update(extra)
    return rec


def provenance_json(*args, **kwargs) -> str:
    return json.dumps(provenance(*args, **kwargs), sort_keys=True, default=str)


def utc_now() -> str:
    """Wall-clock time, for logs only (never written into results)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
