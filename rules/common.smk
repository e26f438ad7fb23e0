# Helpers shared by every stage: config validation, field bookkeeping, output paths, the step command line.
#
# Every rule runs one step with `python -m workflow_lib.steps <step> ...` (workflow_lib/steps/__main__.py,
# docs/CLI.md) in the conda env envs/pipeline.yaml; settings are passed as JSON (json_arg).
import json
import os
import shlex
import sys

from snakemake.utils import validate

from workflow_lib.core.paths import results_path
from workflow_lib.core.settings import SCHEMA_PATH, ConfigError, check_config


configfile: "config/config.yaml"


# one-line errors for unknown keys (with the nearest valid spelling), a config without fields or ccds,
# unknown CPM parameter sets or stitch fields; then types and defaults from the schema
# (one line on stderr and exit status 1, no traceback: the message names the key and the fix)
try:
    check_config(config)
except ConfigError as exc:
    sys.stderr.write(f"error: {exc}\n")
    sys.exit(1)
validate(config, schema=str(SCHEMA_PATH))

# every output lies under results/<run>/: run and field names that would resolve elsewhere are refused
RESULTS = results_path(config["run"])
for _name in [*(config.get("fields") or {}), *(config.get("ccds") or {})]:
    results_path(config["run"], _name)
FIELDS = list(config.get("fields") or {})
CCDS = list(config.get("ccds") or {})
FIELDS_AND_CCDS = [*FIELDS, *CCDS]
_both = sorted(set(FIELDS) & set(CCDS))
if _both:
    raise ValueError(
        f"config: {_both} named both in `fields` and in `ccds`; names must differ"
    )

# Survey mode (rules/survey.smk): a tile of a CCD is processed like a field whose name is
# "<ccd>/tiles/<tile id>" (results/<run>/<ccd>/tiles/<tile>/...), so the LFD, CPM and field-page rules
# run on tiles unchanged. The `field` wildcard is limited to fields, CCDs and their tiles.
TILE_ID_REGEX = r"r[0-9]+c[0-9]+"


def _names_regex(names):
    return "|".join(names) if names else "^$"


wildcard_constraints:
    field=rf"(?:{_names_regex(FIELDS_AND_CCDS)})(?:/tiles/{TILE_ID_REGEX})?",
    ccd=_names_regex(CCDS),
    tile=TILE_ID_REGEX,


def tile_ccd(field):
    """The CCD of a tile "field" ("<ccd>/tiles/<tile>"), None for an ordinary field or a CCD."""
    parts = field.split("/")
    return parts[0] if len(parts) == 3 and parts[1] == "tiles" else None


def field_group(group=None, after_ccd_motion=False):
    """`group:` of the per-field rules (cluster runs only, docs/CLUSTER.md): "tile" for a survey tile (its
    cut, catalog, LFD, CPM and page form one component; the profile's group-components puts many tiles
    in one job), `group` (prep / lfd / report: the cutout grouping) for an ordinary field. With
    survey.motion ccd the rules after the CCD's ccd_motion job (`after_ccd_motion`) form a second
    component per tile, "tile_solve" (one group cannot run both before and after the CCD job).
    """

    def name(wildcards):
        if not tile_ccd(wildcards.field):
            return group
        return "tile_solve" if after_ccd_motion and ccd_motion_on() else "tile"

    return name


def ccd_motion_on():
    """survey.motion ccd: tiles take their scene offsets from the CCD-level fit (rules/survey.smk)."""
    return config["survey"]["motion"] == "ccd"


def field_spec(field):
    """The config entry of a field, a CCD, or (for a tile) its CCD."""
    name = tile_ccd(field) or field
    if name in (config.get("ccds") or {}):
        return config["ccds"][name]
    return config["fields"][name]


def _cpm_paramsets():
    """CPM parameter sets (workflow_lib.cpm.model.paramset_names: 'default' and one per sweep_lambda_L)."""
    from workflow_lib.cpm.model import paramset_names

    return list(paramset_names(config["cpm"]))


CPM_PARAMSETS = _cpm_paramsets()
CPM_STITCH = dict(config["cpm"].get("stitch", {}))


def fields_from(source):
    """Names of the fields whose download `source` is synthetic / mast / local."""
    return [
        f
        for f, spec in (config.get("fields") or {}).items()
        if spec["source"] == source
    ]


def field_regex(source):
    """A wildcard constraint matching exactly the fields of one source ('^$' matches none)."""
    names = fields_from(source)
    return "|".join(names) if names else "^$"


def field_params(field, section):
    """The `section` settings of one field: run-wide defaults overridden by the field's own (a CCD's
    for the CCD and its tiles)."""
    merged = dict(config.get(section, {}))
    merged.update(field_spec(field).get(section, {}) or {})
    return merged


def json_arg(value):
    """`value` as one shell word of JSON: `--params {params.x}` in a shell command gets it back intact."""
    return shlex.quote(json.dumps(value))


# Snakemake sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS & co. to a shell job's `threads`. Under the former
# `run:` blocks the steps saw the environment snakemake was started in (BLAS: one thread per core), and
# some results depend on the BLAS thread count (the LFD motion model's least squares: with 1 thread its
# weights differ in the last bits). The step command line restores these variables from
# WORKFLOW_LIB_THREAD_ENV (inherited by every job) before numpy loads, so products stay bitwise identical.
_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
os.environ.update(
    WORKFLOW_LIB_THREAD_ENV=json.dumps({v: os.environ.get(v) for v in _THREAD_VARS})
)


def zarr_store(path):
    """The file that stands for the zarr store `path` in inputs/outputs: its root `zarr.json`.

    Declaring the store as `directory()` would make Snakemake put a `.snakemake_timestamp` file inside
    it, which zarr reports as a foreign object; the root metadata is written last (the store is renamed
    into place whole, workflow_lib.data.cube.write_zarr_atomic) so it marks a complete store. The step
    command line accepts either form (`--cube cube.zarr` or `--cube cube.zarr/zarr.json`).
    """
    return f"{path}/zarr.json"


def field_dir(field):
    return f"{RESULTS}/{field}"


def rule_log(name):
    return f"{RESULTS}/logs/{name}/{{field}}.log"


def rule_benchmark(name):
    return f"{RESULTS}/benchmarks/{name}/{{field}}.tsv"


def catalog_input(wildcards):
    """The synthetic sector hands the crossmatch its own Gaia-like catalog; others use a local
    catalog file when configured, else the Gaia archive."""
    spec = field_spec(wildcards.field)
    if spec["source"] in ("synthetic", "synthetic_ffi"):
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

    store = Path(str(input.cube))
    if store.name == "zarr.json":
        store = store.parent
    meta = store / "flux" / "zarr.json"
    return (
        math.prod(json.loads(meta.read_text())["shape"]) * 4 / 1e9
        if meta.exists()
        else 0.0
    )


def mem_mb(base, per_gb=0):
    """mem_mb resource: `base` MB (at least config resources.default_mem_mb) plus `per_gb` GB of memory
    per GB of cube, times the attempt number."""
    base = max(base, config["resources"]["default_mem_mb"])
    if not per_gb:
        return lambda wildcards, attempt: int(base * attempt)
    return lambda wildcards, input, attempt: int(
        (base + per_gb * 1000 * cube_gb(input)) * attempt
    )


def runtime_min(base, per_gb=0):
    """runtime resource [min]: `base` (at least config resources.default_runtime) plus `per_gb` minutes
    per GB of cube, times the attempt number."""
    base = max(base, config["resources"]["default_runtime"])
    if not per_gb:
        return lambda wildcards, attempt: int(base * attempt)
    return lambda wildcards, input, attempt: int(
        (base + per_gb * cube_gb(input)) * attempt
    )


# ---- helpers of the LFD (rules/lfd.smk) stage


def tile_without_fits(field):
    """A survey tile writes no per-source FITS unless survey.tile_fits (the merge writes them)."""
    return bool(tile_ccd(field)) and not config["survey"]["tile_fits"]


def lfd_params(field, part):
    """The `lfd.<part>` settings of one field (run-wide defaults, field overrides if any)."""
    params = dict(field_params(field, "lfd").get(part) or {})
    if part == "solve" and tile_without_fits(field):
        params["write_fits"] = False
    return params


def cpm_params(field):
    """The `cpm` settings of one field's cpm_detrend job (a tile's FITS switch: survey.tile_fits)."""
    params = dict(config["cpm"])
    if tile_without_fits(field):
        params["write_fits"] = False
    return params


def lfd_motion_input(wildcards):
    """flux_solve needs the motion model only when lfd.solve.use_motion is on."""
    if lfd_params(wildcards.field, "solve").get("use_motion", True):
        return {"motion": f"{RESULTS}/{wildcards.field}/lfd/motion_model.npz"}
    return {}


def ccd_motion_input(wildcards):
    """A tile's motion_model takes its CCD's motion model when survey.motion is ccd."""
    ccd = tile_ccd(wildcards.field)
    if ccd and ccd_motion_on():
        return {"ccd_motion": f"{RESULTS}/{ccd}/motion/ccd_motion.npz"}
    return {}


# ---- helpers of the CPM (rules/cpm.smk) stage


def lfd_lightcurves_input(wildcards):
    """The LFD light curves of a field, as a declared input (so summaries never race the LFD stage)."""
    if not report_stage_enabled("lfd"):
        return {}
    return {"lfd": zarr_store(f"{RESULTS}/{wildcards.field}/lfd/lightcurves.zarr")}


def lfd_outputs():
    """Everything the LFD stage produces for `rule all` (nothing when `lfd.enabled` is false)."""
    if not report_stage_enabled("lfd"):
        return []
    return expand(
        zarr_store(f"{RESULTS}/{{field}}/lfd/lightcurves.zarr"), field=FIELDS
    ) + expand(f"{RESULTS}/{{field}}/lfd/prf_model.png", field=FIELDS)


def cpm_outputs():
    """Everything the CPM stage produces for `rule all` (nothing when `cpm.enabled` is false)."""
    if not report_stage_enabled("cpm"):
        return []
    out = expand(f"{RESULTS}/{{field}}/cpm/sweep_summary.ecsv", field=FIELDS)
    out += expand(
        zarr_store(f"{RESULTS}/{{field}}/cpm/{{paramset}}/lightcurves.zarr"),
        field=FIELDS,
        paramset=CPM_PARAMSETS,
    )
    out += expand(
        zarr_store(f"{RESULTS}/stitched/{{group}}/cpm/default/lightcurves.zarr"),
        group=list(CPM_STITCH),
    )
    return out


# ---- helpers of the deblended, de-trended light curves (rules/deblend.smk)


def deblend_enabled():
    """`deblend.enabled`, and both the LFD and the CPM stage on (the product needs both)."""
    return (
        bool((config.get("deblend") or {}).get("enabled", True))
        and report_stage_enabled("lfd")
        and report_stage_enabled("cpm")
    )


def deblend_store(field):
    """The deblended, de-trended light-curve set of a field (for the CPM set the field page shows)."""
    return zarr_store(f"{RESULTS}/{field}/cpm/{report_cpm_shown()}/deblended.zarr")


def deblend_outputs():
    """Everything the deblend stage produces for `rule all` (nothing when it is off)."""
    return [deblend_store(f) for f in FIELDS] if deblend_enabled() else []


# ---- helpers of the reports (rules/report.smk) stage


def report_stage_enabled(stage):
    """`lfd.enabled` / `cpm.enabled`; a missing key counts as enabled."""
    return bool((config.get(stage) or {}).get("enabled", True))


def report_cpm_paramsets():
    """CPM parameter-set names: 'default' plus one per cpm.sweep_lambda_L entry."""
    return list(CPM_PARAMSETS)


def report_cpm_shown():
    """The CPM parameter set a field page shows: report.cpm_paramset, else 'default' (else the first)."""
    names = report_cpm_paramsets()
    return config["report"].get("cpm_paramset") or (
        "default" if "default" in names else names[0]
    )


def cdpp_hours():
    """CDPP durations [h] the science steps store on every light-curve set: 1 h, 6 h and the one the
    report shows (report.cdpp_hours), so the report never computes a CDPP of its own."""
    return sorted({1.0, 6.0, float(config["report"]["cdpp_hours"])})


def report_field_inputs(wildcards):
    """Cube + catalog always; LFD / CPM light curves only when those stages are enabled."""
    inputs = {
        "cube": zarr_store(f"{RESULTS}/{wildcards.field}/cube.zarr"),
        "catalog": f"{RESULTS}/{wildcards.field}/catalog.ecsv",
    }
    if report_stage_enabled("lfd"):
        inputs["lfd_diagnostics"] = f"{RESULTS}/{wildcards.field}/lfd/diagnostics.npz"
        inputs["lfd"] = zarr_store(
            REPORT_LFD_LIGHTCURVES.format(results=RESULTS, field=wildcards.field)
        )
    if report_stage_enabled("cpm"):
        inputs["cpm"] = zarr_store(
            REPORT_CPM_LIGHTCURVES.format(
                results=RESULTS, field=wildcards.field, paramset=report_cpm_shown()
            )
        )
    if deblend_enabled() and not tile_ccd(wildcards.field):
        inputs["deblended"] = deblend_store(wildcards.field)
    return inputs


# ---- helpers of survey mode (rules/survey.smk)


def survey_synthetic_params(ccd):
    """`survey.synthetic` overridden by the CCD's own `synthetic`."""
    return dict(
        config["survey"].get("synthetic") or {},
        **(config["ccds"][ccd].get("synthetic") or {}),
    )


def ccds_from(source):
    return [
        c for c, spec in (config.get("ccds") or {}).items() if spec["source"] == source
    ]


def ffi_location(ccd):
    """Directory or glob of a `source: ffi` CCD's files; the synthetic CCD's own directory."""
    spec = config["ccds"][ccd]
    if spec["source"] == "synthetic_ffi":
        return f"{RESULTS}/{ccd}/ffi"
    ffi = spec.get("ffi") or {}
    if not (ffi.get("directory") or ffi.get("glob")):
        raise ValueError(
            f"config: ccds.{ccd}: `source: ffi` needs ffi.directory or ffi.glob"
        )
    return ffi.get("directory") or ffi["glob"]


def ingest_input(wildcards):
    """The synthetic CCD's FFI directory is a product of this run; real FFIs are not tracked."""
    if config["ccds"][wildcards.ccd]["source"] == "synthetic_ffi":
        return {"ffi": f"{RESULTS}/{wildcards.ccd}/ffi"}
    return {}


def survey_tile_ids(ccd):
    """Tile ids of a CCD, from its checkpoint's tiles.json (evaluated once the grid exists)."""
    grid = checkpoints.tile_grid.get(ccd=ccd).output.grid
    with open(grid) as fh:
        return list(json.load(fh)["tile_ids"])


def tile_field(ccd, tile):
    """The field name of a tile: the LFD / CPM / report rules' `field` wildcard."""
    return f"{ccd}/tiles/{tile}"


#: merged light-curve sets: name -> the per-tile set it merges (relative to the tile directory)
def survey_sets():
    sets = {}
    if report_stage_enabled("lfd"):
        sets["lfd"] = "lfd/lightcurves.zarr"
    if report_stage_enabled("cpm"):
        sets[f"cpm_{report_cpm_shown()}"] = f"cpm/{report_cpm_shown()}/lightcurves.zarr"
    return sets


def survey_tiles_with(ccd, product):
    """The tiles of a CCD whose `product(tile)` the merge / overview page take: all of them; with
    survey.allow_missing_tiles, not those that were started (their directory exists) and lack it: failed
    tiles, left out and not rerun (docs/SURVEY.md, "A failed tile")."""
    tiles = survey_tile_ids(ccd)
    if not config["survey"]["allow_missing_tiles"]:
        return tiles
    return [
        t
        for t in tiles
        if os.path.exists(product(t))
        or not os.path.isdir(f"{RESULTS}/{tile_field(ccd, t)}")
    ]


def merged_tile_ids(ccd, set_name):
    """The tiles whose light-curve set `set_name` the CCD's merge takes."""
    rel = survey_sets()[set_name]
    return survey_tiles_with(
        ccd, lambda t: zarr_store(f"{RESULTS}/{tile_field(ccd, t)}/{rel}")
    )


def scene_offsets_path(ccd, tile):
    """A tile's scene_offsets.npz (rules/survey.smk, scene_offsets)."""
    return f"{RESULTS}/{tile_field(ccd, tile)}/lfd/scene_offsets.npz"


def scene_offsets_tile_ids(ccd):
    """The tiles whose scene offsets the CCD's motion fit takes (all; survey.allow_missing_tiles: not failed ones)."""
    return survey_tiles_with(ccd, lambda t: scene_offsets_path(ccd, t))


def scene_offsets_input(wildcards):
    return {
        "offsets": [
            scene_offsets_path(wildcards.ccd, t)
            for t in scene_offsets_tile_ids(wildcards.ccd)
        ]
    }


def merge_inputs(wildcards):
    rel = survey_sets()[wildcards.set]
    return {
        "tiles": [
            zarr_store(f"{RESULTS}/{tile_field(wildcards.ccd, t)}/{rel}")
            for t in merged_tile_ids(wildcards.ccd, wildcards.set)
        ]
    }


def tile_pages_input(wildcards):
    ccd = wildcards.ccd
    tiles = survey_tiles_with(
        ccd, lambda t: f"{RESULTS}/report/{tile_field(ccd, t)}.json"
    )
    return {
        "pages": [f"{RESULTS}/report/{tile_field(ccd, t)}.html" for t in tiles],
        "summaries": [f"{RESULTS}/report/{tile_field(ccd, t)}.json" for t in tiles],
    }


def survey_motion_qa_input(wildcards):
    """The overview page shows the CCD motion fit's per-tile QA (flagged tiles) when survey.motion is ccd."""
    if ccd_motion_on():
        return {"ccd_motion": f"{RESULTS}/{wildcards.ccd}/motion/ccd_motion.json"}
    return {}


def survey_outputs():
    """Everything survey mode produces for `rule all`."""
    if not CCDS:
        return []
    out = expand(f"{RESULTS}/{{ccd}}/merged/sources.ecsv", ccd=CCDS)
    out += expand(f"{RESULTS}/report/{{ccd}}/index.html", ccd=CCDS)
    return out


def survey_log(name):
    return f"{RESULTS}/logs/{name}/{{ccd}}.log"


def survey_benchmark(name):
    return f"{RESULTS}/benchmarks/{name}/{{ccd}}.tsv"
