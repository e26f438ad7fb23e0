# Helpers shared by every stage: config validation, field bookkeeping, output paths.
import json
from snakemake.utils import validate

from workflow_lib.core.logs import logged, run_step
from workflow_lib.core.settings import SCHEMA_PATH


configfile: "config/config.yaml"


validate(config, schema=str(SCHEMA_PATH))

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
    local = (spec.get("gaia") or {}).get("catalog") or (spec.get("local") or {}).get(
        "catalog"
    )
    return {"catalog": local} if local else {}


# ---- resources that scale with the cube and grow on retries (HPC profiles: docs/CLUSTER.md)


def cube_gb(input):
    """Flux cube size in GB from its zarr metadata (0 before the cube exists)."""
    import math
    from pathlib import Path

    meta = Path(str(input.cube)) / "flux" / "zarr.json"
    return (
        math.prod(json.loads(meta.read_text())["shape"]) * 4 / 1e9
        if meta.exists()
        else 0.0
    )


def mem_mb(base, per_gb):
    """mem_mb resource: `base` MB plus `per_gb` GB of memory per GB of cube, times the attempt number."""
    return lambda wildcards, input, attempt: int(
        (base + per_gb * 1000 * cube_gb(input)) * attempt
    )


def runtime_min(base, per_gb):
    """runtime resource [min]: `base` plus `per_gb` minutes per GB of cube, times the attempt number."""
    return lambda wildcards, input, attempt: int(
        (base + per_gb * cube_gb(input)) * attempt
    )


# ---- helpers of the LFD (rules/lfd.smk) stage


def lfd_params(field, part):
    """The `lfd.<part>` settings of one field (run-wide defaults, field overrides if any)."""
    return dict(field_params(field, "lfd").get(part) or {})


def lfd_motion_input(wildcards):
    """flux_solve needs the motion model only when lfd.solve.use_motion is on."""
    if lfd_params(wildcards.field, "solve").get("use_motion", True):
        return {"motion": f"{RESULTS}/{wildcards.field}/lfd/motion_model.npz"}
    return {}


# ---- helpers of the CPM (rules/cpm.smk) stage


def lfd_lightcurves_input(wildcards):
    """The LFD light curves of a field, as a declared input (so summaries never race the LFD stage)."""
    if not report_stage_enabled("lfd"):
        return {}
    return {"lfd": f"{RESULTS}/{wildcards.field}/lfd/lightcurves.zarr"}


def lfd_outputs():
    """Everything the LFD stage produces for `rule all` (nothing when `lfd.enabled` is false)."""
    if not report_stage_enabled("lfd"):
        return []
    return expand(f"{RESULTS}/{{field}}/lfd/lightcurves.zarr", field=FIELDS) + expand(
        f"{RESULTS}/{{field}}/lfd/prf_model.png", field=FIELDS
    )


def cpm_outputs():
    """Everything the CPM stage produces for `rule all` (nothing when `cpm.enabled` is false)."""
    if not report_stage_enabled("cpm"):
        return []
    out = expand(f"{RESULTS}/{{field}}/cpm/sweep_summary.ecsv", field=FIELDS)
    out += expand(
        f"{RESULTS}/{{field}}/cpm/{{paramset}}/lightcurves.zarr",
        field=FIELDS,
        paramset=CPM_PARAMSETS,
    )
    out += expand(
        f"{RESULTS}/stitched/{{group}}/cpm/default/lightcurves.zarr",
        group=list(CPM_STITCH),
    )
    return out


# ---- helpers of the reports (rules/report.smk) stage


def report_stage_enabled(stage):
    """`lfd.enabled` / `cpm.enabled`; a missing key counts as enabled."""
    return bool((config.get(stage) or {}).get("enabled", True))


def report_cpm_paramsets():
    """CPM parameter-set names (workflow_lib.cpm.paramset_names: 'default' plus one per
    cpm.sweep_lambda_L entry); 'default' if that helper is unavailable."""
    try:
        from workflow_lib.cpm.model import paramset_names

        return list(paramset_names(config.get("cpm") or {}))
    except ImportError:
        return ["default"]


def report_cpm_shown():
    """The CPM parameter set a field page shows: report.cpm_paramset, else 'default' (else the first)."""
    names = report_cpm_paramsets()
    return config["report"].get("cpm_paramset") or (
        "default" if "default" in names else names[0]
    )


def report_field_inputs(wildcards):
    """Cube + catalog always; LFD / CPM light curves only when those stages are enabled."""
    inputs = {
        "cube": f"{RESULTS}/{wildcards.field}/cube.zarr",
        "catalog": f"{RESULTS}/{wildcards.field}/catalog.ecsv",
    }
    if report_stage_enabled("lfd"):
        inputs["lfd"] = REPORT_LFD_LIGHTCURVES.format(
            results=RESULTS, field=wildcards.field
        )
    if report_stage_enabled("cpm"):
        inputs["cpm"] = REPORT_CPM_LIGHTCURVES.format(
            results=RESULTS, field=wildcards.field, paramset=report_cpm_shown()
        )
    return inputs
