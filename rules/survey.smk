# Survey mode (docs/SURVEY.md): whole CCDs from full-frame images, tiled, processed per tile, merged.
#
#   FFIs (synthetic_ffi | ffi) -> ingest_ccd -> gaia_crossmatch (rules/gaia.smk, the CCD cube: one query
#   per CCD) -> tile_grid (checkpoint: tiles.json) -> per tile: cut_tile + split_catalog -> the ordinary
#   LFD / CPM / field-page rules -> merge_tiles (one set per CCD and method) -> survey_table -> report_survey
#
#   results/<run>/<ccd>/{ffi/, input_catalog.ecsv, truth.zarr, cube.zarr, catalog.ecsv, tiles.json}
#   results/<run>/<ccd>/tiles/<tile>/{cube.zarr, catalog.ecsv, lfd/..., cpm/<paramset>/...}
#   results/<run>/<ccd>/merged/{lfd,cpm_default}.{zarr,ecsv}, merged/sources.ecsv
#   results/<run>/report/<ccd>/index.html (overview), report/<ccd>/tiles/<tile>.html (field pages)
#
# A tile is a field named "<ccd>/tiles/<tile>" (rules/common.smk: field_spec, TILE_ID_REGEX), so
# rules/lfd.smk, rules/cpm.smk and rules/report.smk run on it unchanged; field_params() gives a tile its
# CCD's settings over the run-wide ones. Per-tile jobs share the group "tile" (docs/CLUSTER.md).
# survey.motion ccd: per tile scene_offsets -> per CCD ccd_motion -> each tile's motion_model uses the CCD
# model at its centre; the tile's steps after ccd_motion form the group "tile_solve"; report_survey shows the
# tiles the fit flagged (motion/ccd_motion.json).
# Helpers (input functions, tile ids from the checkpoint): rules/common.smk, survey section.


rule synthetic_ccd:
    """A synthetic CCD written as SPOC FFIs, with its Gaia-like catalog and truth."""
    output:
        ffi=directory(f"{RESULTS}/{{ccd}}/ffi"),
        catalog=f"{RESULTS}/{{ccd}}/input_catalog.ecsv",
        truth=zarr_store(f"{RESULTS}/{{ccd}}/truth.zarr"),
    log:
        survey_log("synthetic_ccd"),
    benchmark:
        survey_benchmark("synthetic_ccd")
    wildcard_constraints:
        ccd=_names_regex(ccds_from("synthetic_ffi")),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(30),
    params:
        synthetic=lambda w: json_arg(survey_synthetic_params(w.ccd)),
    shell:
        "python -m workflow_lib.steps survey-synthetic --ffi-dir {output.ffi:q}"
        " --catalog {output.catalog:q} --truth {output.truth:q}"
        " --params {params.synthetic} --log {log:q}"


rule ingest_ccd:
    """FFIs of one sector/camera/CCD -> one chunked cube (resumable: a killed job just reruns)."""
    input:
        unpack(ingest_input),
    output:
        cube=zarr_store(f"{RESULTS}/{{ccd}}/cube.zarr"),
    log:
        survey_log("ingest_ccd"),
    benchmark:
        survey_benchmark("ingest_ccd")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1500),
        runtime=runtime_min(60),
    params:
        ffi=lambda w: ffi_location(w.ccd),
        ingest=json_arg(config["survey"]["ingest"]),
    shell:
        "python -m workflow_lib.steps survey-ingest --ffi {params.ffi:q}"
        " --out {output.cube:q} --params {params.ingest} --log {log:q}"


checkpoint tile_grid:
    """The tile grid (cores + halos) of a CCD: tiles.json, whose `tile_ids` the later rules expand."""
    input:
        cube=zarr_store(f"{RESULTS}/{{ccd}}/cube.zarr"),
    output:
        grid=f"{RESULTS}/{{ccd}}/tiles.json",
    log:
        survey_log("tile_grid"),
    benchmark:
        survey_benchmark("tile_grid")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        grid=json_arg({k: config["survey"][k] for k in ("tile_size", "margin")}),
    shell:
        "python -m workflow_lib.steps survey-tiles --cube {input.cube:q}"
        " --out {output.grid:q} --params {params.grid} --log {log:q}"


rule cut_tile:
    """One tile's cube: its halo region of the CCD cube (the cube.zarr of the tile "field")."""
    input:
        cube=zarr_store(f"{RESULTS}/{{ccd}}/cube.zarr"),
        grid=f"{RESULTS}/{{ccd}}/tiles.json",
    output:
        cube=zarr_store(f"{RESULTS}/{{ccd}}/tiles/{{tile}}/cube.zarr"),
    log:
        f"{RESULTS}/logs/cut_tile/{{ccd}}_{{tile}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cut_tile/{{ccd}}_{{tile}}.tsv"
    group:
        "tile"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(10),
    shell:
        "python -m workflow_lib.steps survey-cut-tile --cube {input.cube:q}"
        " --grid {input.grid:q} --tile {wildcards.tile} --out {output.cube:q}"
        " --log {log:q}"


rule split_catalog:
    """One tile's catalog: the CCD catalog's sources on the tile (+ catalog_reach), with in_core."""
    input:
        catalog=f"{RESULTS}/{{ccd}}/catalog.ecsv",
        grid=f"{RESULTS}/{{ccd}}/tiles.json",
    output:
        catalog=f"{RESULTS}/{{ccd}}/tiles/{{tile}}/catalog.ecsv",
    log:
        f"{RESULTS}/logs/split_catalog/{{ccd}}_{{tile}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/split_catalog/{{ccd}}_{{tile}}.tsv"
    group:
        "tile"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        split=json_arg({"catalog_reach": config["survey"]["catalog_reach"]}),
    shell:
        "python -m workflow_lib.steps survey-split-catalog --catalog {input.catalog:q}"
        " --grid {input.grid:q} --tile {wildcards.tile} --out {output.catalog:q}"
        " --params {params.split} --log {log:q}"


rule scene_offsets:
    """survey.motion ccd: a tile's per-cadence scene offsets with errors and its centre, for ccd_motion."""
    input:
        cube=zarr_store(f"{RESULTS}/{{field}}/cube.zarr"),
        catalog=f"{RESULTS}/{{field}}/catalog.ecsv",
        prf=f"{RESULTS}/{{field}}/lfd/prf_model.npz",
    output:
        offsets=f"{RESULTS}/{{field}}/lfd/scene_offsets.npz",
    log:
        rule_log("scene_offsets"),
    benchmark:
        rule_benchmark("scene_offsets")
    wildcard_constraints:
        field=rf"(?:{_names_regex(CCDS)})/tiles/{TILE_ID_REGEX}",
    group:
        "tile"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000, 8),
        runtime=runtime_min(20, 60),
    params:
        motion=lambda w: json_arg(lfd_params(w.field, "motion")),
    shell:
        "python -m workflow_lib.steps scene-offsets --cube {input.cube:q}"
        " --catalog {input.catalog:q} --prf {input.prf:q} --out {output.offsets:q}"
        " --params {params.motion} --log {log:q}"


rule ccd_motion:
    """survey.motion ccd: one motion model per CCD fitted to every tile's scene offsets; per-tile gains."""
    input:
        unpack(scene_offsets_input),
    output:
        model=f"{RESULTS}/{{ccd}}/motion/ccd_motion.npz",
        qa=f"{RESULTS}/{{ccd}}/motion/ccd_motion.json",
    log:
        survey_log("ccd_motion"),
    benchmark:
        survey_benchmark("ccd_motion")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(20),
    params:
        offsets=lambda w, input: " ".join(
            shlex.quote(f"{t}={p}")
            for t, p in zip(scene_offsets_tile_ids(w.ccd), input.offsets)
        ),
        ccd_motion=json_arg(config["survey"]["ccd_motion"]),
    shell:
        "python -m workflow_lib.steps survey-ccd-motion --offsets {params.offsets}"
        " --out {output.model:q} --qa {output.qa:q} --params {params.ccd_motion}"
        " --log {log:q}"


rule merge_tiles:
    """Every CCD catalog source exactly once, from the tile it lies deepest in; overlap QA."""
    input:
        unpack(merge_inputs),
        grid=f"{RESULTS}/{{ccd}}/tiles.json",
        catalog=f"{RESULTS}/{{ccd}}/catalog.ecsv",
    output:
        lightcurves=zarr_store(f"{RESULTS}/{{ccd}}/merged/{{set}}.zarr"),
        table=f"{RESULTS}/{{ccd}}/merged/{{set}}.ecsv",
    log:
        f"{RESULTS}/logs/merge_tiles/{{ccd}}_{{set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge_tiles/{{ccd}}_{{set}}.tsv"
    wildcard_constraints:
        set=_names_regex(list(survey_sets())),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(30),
    params:
        tiles=lambda w, input: " ".join(
            shlex.quote(f"{t}={p}")
            for t, p in zip(merged_tile_ids(w.ccd, w.set), input.tiles)
        ),
        survey=json_arg(
            {
                k: v
                for k, v in config["survey"].items()
                if k in ("cdpp_hours", "write_fits", "allow_missing_tiles")
            }
        ),
    shell:
        "python -m workflow_lib.steps survey-merge --tiles {params.tiles}"
        " --grid {input.grid:q} --catalog {input.catalog:q} --set {wildcards.set}"
        " --out {output.lightcurves:q} --table {output.table:q}"
        " --params {params.survey} --log {log:q}"


rule survey_table:
    """One source table per CCD: every merged set side by side (CDPP, tile, flags, overlap QA)."""
    input:
        tables=expand(
            f"{RESULTS}/{{{{ccd}}}}/merged/{{set}}.ecsv", set=list(survey_sets())
        ),
    output:
        table=f"{RESULTS}/{{ccd}}/merged/sources.ecsv",
    log:
        survey_log("survey_table"),
    benchmark:
        survey_benchmark("survey_table")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        tables=lambda w, input: " ".join(
            shlex.quote(f"{s}={p}") for s, p in zip(survey_sets(), input.tables)
        ),
    shell:
        "python -m workflow_lib.steps survey-table --tables {params.tables}"
        " --out {output.table:q} --log {log:q}"


rule report_survey:
    """Overview page of a CCD: mean image + tile grid and status, CDPP vs G of every merged source
    (hover, click -> the tile's field page), search by Gaia id or RA/Dec; links to the tile pages;
    survey.motion ccd: the tiles the CCD motion fit flagged (ccd_motion.json).
    """
    input:
        unpack(tile_pages_input),
        unpack(survey_motion_qa_input),
        cube=zarr_store(f"{RESULTS}/{{ccd}}/cube.zarr"),
        grid=f"{RESULTS}/{{ccd}}/tiles.json",
        table=f"{RESULTS}/{{ccd}}/merged/sources.ecsv",
        merged=expand(
            zarr_store(f"{RESULTS}/{{{{ccd}}}}/merged/{{set}}.zarr"),
            set=list(survey_sets()),
        ),
    output:
        html=report(
            f"{RESULTS}/report/{{ccd}}/index.html",
            category="Survey overview pages",
            labels={"ccd": "{ccd}", "page": "CCD overview"},
        ),
    log:
        survey_log("report_survey"),
    benchmark:
        survey_benchmark("report_survey")
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000, 4),
        runtime=runtime_min(10, 10),
    params:
        merged=lambda w, input: " ".join(
            shlex.quote(f"{s}={p}") for s, p in zip(survey_sets(), input.merged)
        ),
        tile_pages=lambda w: f"{RESULTS}/report/{w.ccd}/tiles",
        summaries=lambda w, input: " ".join(
            shlex.quote(p) for p in getattr(input, "summaries", [])
        ),
        report=json_arg(config["report"]),
        ccd_motion=lambda w, input: (
            f"--ccd-motion {shlex.quote(input.ccd_motion)}"
            if "ccd_motion" in input.keys()
            else ""
        ),
    shell:
        "python -m workflow_lib.steps report-survey --ccd {wildcards.ccd}"
        " --cube {input.cube:q} --grid {input.grid:q} --table {input.table:q}"
        " --merged {params.merged} --tile-pages {params.tile_pages:q}"
        " --tile-summaries {params.summaries} {params.ccd_motion} --out {output.html:q}"
        " --params {params.report} --log {log:q}"
