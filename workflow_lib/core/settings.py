"""Step settings: defaults read from the one config schema, a config section merged over them, unknown keys
refused by name."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

#: the one config schema (package data): the Snakefile validates against it, every default is read from it
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schema.yaml"


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The config schema (``workflow_lib/schema.yaml``, shipped as package data), parsed once."""
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _resolve(node: dict, schema: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        target = schema
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        return target
    return node


def schema_defaults(section: str) -> dict:
    """The defaults of one object of the schema, by dotted path: ``"lfd.edge"``, ``"cpm"``, ``"report"``,
    or a nested object as ``"cpm.aperture"``, or a ``$defs`` entry as ``"$defs.synthetic"``. Nested objects are not expanded (a key whose schema is an
    object without a default is left out). The schema is the only place a default is written down."""
    schema = load_schema()
    node = schema
    parts = section.split(".")
    if parts[0] == "$defs":
        node, parts = schema["$defs"], parts[1:]
        node = node[parts[0]]
        parts = parts[1:]
    for part in parts:
        node = _resolve(node, schema)
        node = node["properties"][part]
    node = _resolve(node, schema)
    props = node.get("properties", {})
    resolved = {k: _resolve(v, schema) for k, v in props.items()}
    # a deep copy: callers may change a list default without touching the cached schema
    return {k: copy.deepcopy(v["default"]) for k, v in resolved.items() if "default" in v}


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
