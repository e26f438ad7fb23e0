"""The step of the deblended, de-trended light curves (``rules/deblend.smk``): read the cube, the catalog,
the LFD models and light curves and the CPM sets of a field, run :mod:`workflow_lib.deblend.lightcurves`,
write the set (zarr) and one FITS per source, atomically. Only this module touches files."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import xarray as xr

from workflow_lib.core.atomic import remove_stale_tmp
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance_json
from workflow_lib.core.quality import HARD_BITMASK
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.cpm.apertures import aperture_params
from workflow_lib.cpm.model import paramset_params
from workflow_lib.data.cube import write_zarr_atomic
from workflow_lib.deblend.lightcurves import (
    deblended_lightcurves,
    denoised_neighbour_flux,
    sky_level,
    with_reference_sets,
)
from workflow_lib.lfd.geometry import scene_offsets
from workflow_lib.lfd.io import load_motion_model
from workflow_lib.lfd.motion import motion_factors
from workflow_lib.lfd.scene import sky_pixel_model
from workflow_lib.lfd.solve import SolveError
from workflow_lib.metrics import add_cdpp
from workflow_lib.steps.cpm import write_fits_dir
from workflow_lib.steps.lfd import load_field_scene

log = get_logger("deblend")

#: FITS file prefix of the product (``deblended_<source_id>.fits``)
FITS_PREFIX = "deblended"


def deblend_params(params: dict | None) -> dict:
    """The ``deblend`` settings: schema defaults overridden by ``params`` (unknown keys are errors)."""
    return merge_settings(schema_defaults("deblend"), params, "deblend", ValueError)


def _open_set(path):
    return None if path is None or not Path(path).exists() else xr.open_zarr(path, consolidated=False).load()


def deblend_detrend_step(
    cube_path,
    catalog_path,
    prf_npz,
    motion_file,
    lfd_path,
    out_zarr,
    fits_dir,
    config: dict,
    *,
    cpm_path=None,
    raw_path=None,
    paramset: str = "default",
    target_aperture: dict | None = None,
    threads: int = 1,
    field: str = "",
    cdpp_hours=(1.0, 6.0),
) -> xr.Dataset:
    """Snakemake step ``deblend_detrend``: the deblended, de-trended light curves of a field.

    ``config``: ``{"cpm": <cpm settings>, "deblend": <deblend settings>}``. The LFD scene is the
    flux solve's (:func:`workflow_lib.steps.lfd.load_field_scene`: the PRF model at the catalog
    positions, the motion model's eq. 24 factors when the LFD light curves were solved with it),
    the neighbour fluxes are the LFD light curves ``lfd_path`` (faint ones as their running median), the
    sky level the median of that set's LFD background terms per pixel (``deblend.subtract_background``); the apertures and CPM settings
    those of the CPM parameter set ``paramset``. ``cpm_path`` / ``raw_path``: that set's CPM and
    RAW aperture light curves, carried as extra columns with the LFD ones (``deblend.reference_sets``).
    The set carries the CDPP proxy ``cdpp_<h>h`` of every ``cdpp_hours``."""
    cpm_cfg = dict(config.get("cpm") or {})
    p = deblend_params(config.get("deblend"))
    params = paramset_params(cpm_cfg, paramset)
    ap = aperture_params(cpm_cfg.get("aperture"))
    remove_stale_tmp(*(x for x in (out_zarr, fits_dir) if x is not None))
    f = load_field_scene(cube_path, catalog_path, prf_npz)
    cube = f["cube"].load()
    S, idx = f["S"], f["idx"]
    lfd = xr.open_zarr(lfd_path, consolidated=False).load()
    lpos = {int(s): i for i, s in enumerate(np.asarray(lfd["source_id"].values, np.int64))}
    sid = np.asarray(f["catalog"]["source_id"], np.int64)[idx]
    missing = [int(s) for s in sid if int(s) not in lpos]
    if missing:
        raise SolveError(f"{lfd_path}: no LFD light curve of modelled source(s) {missing[:5]}; rerun the flux solve")
    rows_ = [lpos[int(s)] for s in sid]
    lflux = np.asarray(lfd["flux"].transpose("source", "time").values, float)[rows_]
    if lflux.shape[1] != cube.sizes["time"]:
        raise SolveError(f"{lfd_path}: {lflux.shape[1]} cadences, the cube {cube.sizes['time']}; rerun the flux solve")
    time = np.asarray(cube["time"].values, float)
    lflux, faint = denoised_neighbour_flux(
        time,
        lflux,
        np.asarray(lfd["flux_err"].transpose("source", "time").values, float)[rows_],
        min_snr=float(p["faint_neighbour_snr"]),
        window_days=float(p["faint_neighbour_window_days"]),
        variability_sigma=float(p["constant_neighbour_sigma"]),
        blended=np.asarray(lfd["blended"].values, bool)[rows_] if "blended" in lfd.coords else None,
    )
    log.info("%d of %d LFD sources enter the neighbour model with their running median (blends, S/N below %g%s)",
             int(faint.sum()), faint.size, p["faint_neighbour_snr"],
             f" or no short-timescale variability above {p['constant_neighbour_sigma']:g} sigma"
             if p["constant_neighbour_sigma"] > 0 else "")  # fmt: skip
    sky = None
    if p["subtract_background"] and "background" in lfd and lfd["background"].ndim == 2:
        bdim = [x for x in lfd["background"].dims if x != "time"][0]
        ws = lfd["wing_scale"].values if "wing_scale" in lfd and f["wing"] is not None else None
        sky_t = sky_pixel_model(f["pc"], f["pr"], lfd["background"].transpose(bdim, "time").values, f["wing"], ws)
        sky = sky_level(sky_t, np.asarray(cube["quality"].values) == 0)
    basis = tb = None
    use_motion = bool(int(lfd.attrs.get("use_motion", 0)))
    if use_motion:
        if motion_file is None:
            raise SolveError(f"{lfd_path} was solved with the motion model: give its motion-model file")
        mm = load_motion_model(motion_file)
        dx, dy = scene_offsets(S, f["pc"], f["pr"], f["sc"][idx], f["sr"][idx])
        basis, tb = motion_factors(mm, dx, dy, time, prf=f["model"])
    inputs = [cube_path, catalog_path, prf_npz, lfd_path] + ([motion_file] if use_motion else [])
    prov_cfg = {"cpm": asdict(params), "aperture": asdict(ap), "deblend": p, "paramset": paramset, "field": field}
    prov = provenance_json("deblend_detrend", inputs=inputs, config=prov_cfg)
    lc = deblended_lightcurves(
        cube,
        f["catalog"],
        S,
        lflux,
        {int(s): j for j, s in enumerate(sid)},
        params,
        ap,
        motion_basis=basis,
        motion_time=tb,
        sky=sky,
        user_apertures=target_aperture,
        threads=threads,
        name=str(cube_path),
        flux_fraction_correction=bool(p["flux_fraction_correction"]),
        weighting=str(p["weighting"]),
        on_unmodellable=cpm_cfg.get("on_unmodellable"),
        attrs={
            "provenance": prov,
            "paramset": paramset,
            "use_motion": int(use_motion),
            "sky_subtracted": int(sky is not None),
            "n_faint_neighbours_smoothed": int(faint.sum()),
        },
    )
    if p["reference_sets"]:
        lc = with_reference_sets(lc, {"lfd": lfd, "cpm": _open_set(cpm_path), "raw": _open_set(raw_path)})
    bitmask = (
        params.quality_bitmask
        if params.quality_bitmask is not None
        else HARD_BITMASK.get(cube.attrs.get("mission", "TESS"), HARD_BITMASK["TESS"])
    )
    lc = add_cdpp(lc, hours=tuple(sorted({1.0, 6.0, *map(float, cdpp_hours)})), bitmask=bitmask)
    write_zarr_atomic(lc, out_zarr)
    log.info("wrote %s (%d sources)", out_zarr, lc.sizes["source"])
    if fits_dir is not None:  # the rule's declared output: empty with write_fits false
        write_fits_dir([(lc, FITS_PREFIX)], fits_dir, enabled=p["write_fits"])
        log.info("wrote %d FITS light curves to %s", lc.sizes["source"] if p["write_fits"] else 0, fits_dir)
    return lc
