"""Provenance recorded in every output: input files, software versions, config hash."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata

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


def provenance(step: str, inputs=(), config: dict | None = None, **extra) -> dict:
    """A provenance record for one pipeline step.

    Deliberately contains no wall-clock time, so the same config and inputs give identical outputs.
    """
    rec = {
        "step": step,
        "inputs": [str(p) for p in inputs],
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
