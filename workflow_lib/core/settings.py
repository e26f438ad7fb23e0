"""Step settings: a config section merged over a module's defaults, unknown keys refused by name."""

from __future__ import annotations

from pathlib import Path

#: the one config schema (package data): the Snakefile validates against it, every default is read from it
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schema.yaml"


def merge_settings(defaults: dict, given: dict | None, section: str, error: type[Exception] = ValueError) -> dict:
    """``defaults`` updated with ``given``; a key ``defaults`` does not know raises ``error`` naming it.

    Snakemake has already validated the config against config/schema.yaml; this guards direct calls
    of the ``workflow_lib`` step functions (notebooks, tests, benchmarks) against typos.
    """
    merged = dict(defaults)
    if given:
        unknown = set(given) - set(defaults)
        if unknown:
            raise error(f"unknown {section} parameter(s): {sorted(unknown)}")
        merged.update(given)
    return merged
