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
    """``node`` with its ``$ref`` (a ``#/...`` pointer into ``schema``) replaced by the target, the node's own
    keys (``description``, ``default``) taking precedence over the target's; a node without ``$ref`` as is."""
    ref = node.get("$ref")
    if ref:
        target = schema
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        merged = dict(target)
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return node


def section_schema(section: str) -> dict:
    """The schema node of one section by dotted path (``"cpm"``, ``"lfd.prf"``, ``"$defs.synthetic"``), resolved."""
    schema = load_schema()
    node = schema
    parts = section.split(".")
    if parts[0] == "$defs":
        node, parts = schema["$defs"][parts[1]], parts[2:]
    for part in parts:
        node = _resolve(node, schema)
        node = node["properties"][part]
    return _resolve(node, schema)


def schema_defaults(section: str) -> dict:
    """The defaults of one object of the schema, by dotted path: ``"lfd.edge"``, ``"cpm"``, ``"report"``,
    or a nested object as ``"cpm.aperture"``, or a ``$defs`` entry as ``"$defs.synthetic"``. Nested objects are not expanded (a key whose schema is an
    object without a default is left out). The schema is the only place a default is written down."""
    schema = load_schema()
    node = section_schema(section)
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


# ------------------------------------------------------------------------- config errors in one line


class ConfigError(ValueError):
    """A config the pipeline cannot run, explained in one line (the key path and what to write instead)."""


#: top-level sections known even if the schema in use does not list them yet
KNOWN_TOP_LEVEL = ("ccds",)


def _closest(word: str, choices, prefix: str = "") -> str:
    import difflib

    choices = sorted(str(c) for c in choices)
    near = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if near:
        return f"did you mean {prefix + near[0]!r}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"valid: {shown}" if choices else "no keys are allowed here"


def _check_keys(value, node: dict, path: str, schema: dict, extra_known=(), what: str = "config") -> None:
    """Unknown keys of ``value`` (a config mapping) against schema ``node``, recursively; the
    :class:`ConfigError` starts with ``what`` (where the settings came from)."""
    node = _resolve(node, schema)
    if not isinstance(value, dict):
        return  # a wrong type: snakemake's validate names it
    props = node.get("properties") or {}
    extra = node.get("additionalProperties", True)
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key in props:
            _check_keys(sub, props[key], where, schema, what=what)
        elif isinstance(extra, dict):
            _check_keys(sub, extra, where, schema, what=what)
        elif extra is False and key not in extra_known:
            known = list(props) + list(extra_known)
            raise ConfigError(f"{what}: unknown key {where!r}; {_closest(key, known, f'{path}.' if path else '')}")


def _check_channel_field(name: str, spec: dict) -> None:
    """One-line errors for a Kepler/K2 channel field (``fields.<name>.mast.channel`` or ``.local.channel``)."""
    source = spec.get("source")
    section = spec.get(source) if source in ("mast", "local") else None
    if not isinstance(section, dict) or section.get("channel") is None:
        return
    where = f"config: fields.{name}.{source}"
    ch = section["channel"]
    if isinstance(ch, bool) or not isinstance(ch, int) or not 1 <= ch <= 84:
        raise ConfigError(f"{where}.channel={ch!r}: a Kepler/K2 CCD channel is an integer from 1 to 84")
    quarter, campaign = section.get("quarter"), section.get("campaign")
    if quarter is not None and campaign is not None:
        raise ConfigError(f"{where}: give quarter (Kepler) or campaign (K2) with channel, not both")
    if source == "local":
        if not (section.get("files") or section.get("directory") or section.get("glob")):
            raise ConfigError(f"{where}: a channel field needs local.directory, local.glob or local.files")
        return
    mission = section.get("mission", "TESS")
    if mission not in ("Kepler", "K2"):
        raise ConfigError(f"{where}.channel is for Kepler and K2 fields: set mast.mission to Kepler or K2")
    if section.get("target"):
        raise ConfigError(
            f"{where}: give target (the TPFs around a star) or channel (every TPF of the channel), not both"
        )
    if mission == "Kepler" and quarter is None:
        raise ConfigError(f"{where}: a Kepler channel field needs mast.quarter (one field = one quarter's channel)")
    if mission == "K2" and campaign is None:
        raise ConfigError(f"{where}: a K2 channel field needs mast.campaign (one field = one campaign's channel)")


def _paramset_names(cpm: dict) -> list[str]:
    """``default`` + ``lambda_L_<v>`` per ``cpm.sweep_lambda_L`` (the rule of ``cpm.model.paramset_names``,
    repeated here because core imports nothing above it; tests/reliability checks they agree)."""
    sweep = cpm.get("sweep_lambda_L") if isinstance(cpm, dict) else None
    names = ["default"]
    for v in sweep or []:
        try:
            names.append(f"lambda_L_{float(v):g}")
        except (TypeError, ValueError):
            pass  # a wrong type: snakemake's validate names it
    return names


def check_config(config) -> None:
    """Refuse, with a one-line :class:`ConfigError`, what the schema check would report as a dump or not at
    all; run it before ``snakemake.utils.validate``:

    * an unknown key anywhere: its dotted path and the nearest valid spelling at that level;
    * no ``fields`` (and no ``ccds``) section;
    * ``report.cpm_paramset`` that is not ``default`` or one of ``lambda_L_<v>`` of ``cpm.sweep_lambda_L``;
    * a ``cpm.stitch`` group naming a field that is not configured;
    * a Kepler/K2 channel field (``mast.channel`` / ``local.channel``) that lacks what it needs;
    * a value of the wrong type, out of range or not matching its pattern (the dotted key and the value).
    """
    schema = load_schema()
    if not isinstance(config, dict):
        raise ConfigError(f"config: expected a mapping of sections (run, fields, ...), got {type(config).__name__}")
    _check_keys(config, schema, "", schema, extra_known=KNOWN_TOP_LEVEL)
    fields, ccds = config.get("fields"), config.get("ccds")
    if not fields and not ccds:
        what = "an empty 'fields' section" if "fields" in config else "no 'fields' section"
        raise ConfigError(
            f"config: {what} (and no 'ccds'): add at least one field, e.g. "
            "fields: {my_field: {source: synthetic}} (or a survey-mode 'ccds' section)"
        )
    report = config.get("report")
    shown = report.get("cpm_paramset") if isinstance(report, dict) else None
    cpm = config.get("cpm") if isinstance(config.get("cpm"), dict) else {}
    if shown is not None:
        valid = _paramset_names(cpm)
        if shown not in valid:
            raise ConfigError(
                f"config: report.cpm_paramset={shown!r} is not a CPM parameter set; valid: {', '.join(valid)} "
                "(add its lambda_L to cpm.sweep_lambda_L to sweep it)"
            )
    for name, spec in (fields if isinstance(fields, dict) else {}).items():
        if isinstance(spec, dict):
            _check_channel_field(name, spec)
    stitch = cpm.get("stitch")
    if isinstance(stitch, dict):
        names = set(fields if isinstance(fields, dict) else ()) | set(ccds if isinstance(ccds, dict) else ())
        for group, members in stitch.items():
            for m in members if isinstance(members, list) else ():
                if m not in names:
                    raise ConfigError(
                        f"config: cpm.stitch.{group} names {m!r}, which is not a configured field; {_closest(m, names)}"
                    )
    _check_values(config, schema, "config")  # types, ranges, patterns: the dotted key in one line


def _check_values(value, node: dict, what: str, section: str = "") -> None:
    """The schema's type / range / pattern error of ``value`` nearest the root, as one :class:`ConfigError`
    line naming the dotted key and the value (unknown keys are :func:`_check_keys`' job)."""
    import jsonschema

    schema = load_schema()
    node = {k: v for k, v in node.items() if k not in ("required", "additionalProperties", "default")}
    validator = jsonschema.Draft202012Validator({**node, "$defs": schema["$defs"]})
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        where = ".".join([p for p in (section, *(str(x) for x in error.absolute_path)) if p])
        raise ConfigError(f"{what}: {where or 'top level'}: {error.message}")


def check_section(params, section: str, what: str = "--params", extra_known=()) -> None:
    """Refuse, in one line, settings of one schema section (a step's ``--params``) that the schema
    rejects: an unknown key (with its nearest valid spelling) or a wrong type / out-of-range value
    (the dotted key, the value and the rule it breaks). ``extra_known`` are keys accepted besides the
    section's own (a field's keys merged over the run-wide ones)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{what}: the {section} settings must be a mapping, got {type(params).__name__}")
    schema = load_schema()
    node = section_schema(section)
    _check_keys(params, node, section, schema, extra_known=extra_known, what=what)
    _check_values(params, node, what, section)
