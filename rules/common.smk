# Helpers shared by every stage: config validation, field bookkeeping, output paths.
import json
from snakemake.utils import validate

from workflow_lib.logs import logged


configfile: "config/config.yaml"


validate(config, schema="../config/schema.yaml")

RESULTS = f"results/{config['run']}"
FIELDS = list(config["fields"])


def fields_from(source):
    """Names of the fields whose download `source` is synthetic / mast / local."""
    return [f for f, spec in config["fields"].items() if spec["source"] == source]


def field_regex(source):
    """A wildcard constraint matching exactly the fields of one source ('^$' matches none)."""
    names = fields_from(source)
    return "|".join(names) if names else "^$"


def field_params(field, section):
    """The `section` settings of one field: run-wide defaults overridden by the field's own."""
    merged = dict(config.get(section, {}))
    merged.update(config["fields"][field].get(section, {}) or {})
    return merged


def field_dir(field):
    return f"{RESULTS}/{field}"


def rule_log(name):
    return f"{RESULTS}/logs/{name}/{{field}}.log"


def rule_benchmark(name):
    return f"{RESULTS}/benchmarks/{name}/{{field}}.tsv"


def catalog_input(wildcards):
    """The synthetic sector hands the crossmatch its own Gaia-like catalog; others use a local
    catalog file when configured, else the Gaia archive."""
    spec = config["fields"][wildcards.field]
    if spec["source"] == "synthetic":
        return {"catalog": f"{RESULTS}/{wildcards.field}/input_catalog.ecsv"}
    local = (spec.get("gaia") or {}).get("catalog") or (spec.get("local") or {}).get("catalog")
    return {"catalog": local} if local else {}


# ---- resources that scale with the cube and grow on retries (HPC profiles: docs/CLUSTER.md)


def cube_gb(input):
    """Flux cube size in GB from its zarr metadata (0 before the cube exists)."""
    import math
    from pathlib import Path

    meta = Path(str(input.cube)) / "flux" / "zarr.json"
    return math.prod(json.loads(meta.read_text())["shape"]) * 4 / 1e9 if meta.exists() else 0.0


def mem_mb(base, per_gb):
    """mem_mb resource: `base` MB plus `per_gb` GB of memory per GB of cube, times the attempt number."""
    return lambda wildcards, input, attempt: int((base + per_gb * 1000 * cube_gb(input)) * attempt)


def runtime_min(base, per_gb):
    """runtime resource [min]: `base` plus `per_gb` minutes per GB of cube, times the attempt number."""
    return lambda wildcards, input, attempt: int((base + per_gb * cube_gb(input)) * attempt)
