"""Render config/schema.yaml as a Markdown reference (docs/CONFIG.md): every key, type, default, meaning.

    python -m workflow_lib.core.configdoc > docs/CONFIG.md

tests/test_config.py checks that docs/CONFIG.md is up to date with the schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from workflow_lib.core.settings import SCHEMA_PATH, _resolve

SCHEMA = SCHEMA_PATH

SECTIONS = [
    ("run", "Run name"),
    ("fields", "Fields"),
    ("ccds", "CCDs (`ccds`): survey mode, whole CCDs from FFIs"),
    ("synthetic", "Synthetic sector (`synthetic`, or per field `fields.<name>.synthetic`)"),
    ("mast_client", "MAST client (`mast_client`; what to download: per field `fields.<name>.mast`)"),
    ("gaia", "Gaia crossmatch (`gaia`, per field `fields.<name>.gaia`)"),
    ("lfd", "Linearized Field Deblending (`lfd`): Hedges & Martínez-Palomera 2021"),
    ("cpm", "Causal Pixel Model (`cpm`): Hattori et al. 2022"),
    ("deblend", "Deblended, de-trended light curves (`deblend`): LFD neighbour subtraction + CPM"),
    ("report", "Reports (`report`)"),
    ("resources", "Resources (`resources`)"),
    ("survey", "Survey mode (`survey`): whole CCDs from FFIs, tiled and merged"),
]


def _type(node: dict) -> str:
    t = node.get("type", "")
    if isinstance(t, list):
        t = " or ".join(t)
    if "enum" in node:
        t = " \\| ".join(f"`{e}`" for e in node["enum"])
    return t


def _rows(node: dict, schema: dict, prefix: str):
    node = _resolve(node, schema)
    props = node.get("properties")
    if not props:
        return
    for key, sub in props.items():
        sub = _resolve(sub, schema)
        name = f"{prefix}.{key}" if prefix else key
        if sub.get("properties"):
            desc = " ".join(str(sub.get("description", "")).split())
            if desc:
                yield f"| `{name}` | object | | {desc} |"
            yield from _rows(sub, schema, name)
            continue
        default = sub.get("default", "")
        default = f"`{default}`" if default != "" else ""
        desc = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
        yield f"| `{name}` | {_type(sub)} | {default} | {desc} |"


def render(schema_path: Path = SCHEMA) -> str:
    schema = yaml.safe_load(Path(schema_path).read_text())
    out = [
        "# Configuration reference",
        "",
        "Generated from `config/schema.yaml` by `python -m workflow_lib.configdoc`; every key is validated at",
        "start-up (unknown keys and wrong types stop the run with a message naming them).",
        "",
    ]
    for key, title in SECTIONS:
        node = schema["properties"].get(key)
        if node is None:
            continue
        out += [f"## {title}", ""]
        desc = " ".join(str(_resolve(node, schema).get("description", "")).split())
        if desc:
            out += [desc, ""]
        rows = list(_rows(node, schema, key))
        if rows:
            out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
