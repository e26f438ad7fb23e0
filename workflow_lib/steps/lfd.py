"""The LFD steps the rules call: read the cube and catalog, run one stage of Hedges & Martinez-Palomera
(2021), write its product atomically. The science is in :mod:`workflow_lib.lfd`; only this module touches files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workflow_lib.core.atomic import atomic_dir, atomic_path, save_npz_deterministic, write_text_atomic
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance, provenance_json
from workflow_lib.core.quality import LFD_SOURCE_FLAGS
from workflow_lib.data.cube import as_pixel_table, open_cube, validate_for_modelling, write_zarr_atomic
from workflow_lib.data.gaia import read_field_catalog
from workflow_lib.data.lightcurves import lightcurve_set, write_lightcurve_fits
from workflow_lib.lfd.diagnostics import lfd_diagnostics, pack_diagnostics
from workflow_lib.lfd.edge import a_priori_flux, edge_params, fit_edge_to_frame, mean_frame
from workflow_lib.lfd.geometry import background_design, scene_offsets
from workflow_lib.lfd.io import load_edge_model, load_motion_model, save_motion_model
from workflow_lib.lfd.motion import MotionModel, fit_field_motion, motion_factors, motion_params
from workflow_lib.lfd.plots import plot_prf_model
from workflow_lib.lfd.prf import (
    PRFModel,
    fit_prf_model,
    fraction_on_pixels,
    prf_convergence,
    prf_params,
    scene_matrix,
    wing_image,
)
from workflow_lib.lfd.solve import (
    SolveError,
    blended_sources,
    contamination_ratio,
    decorrelate_offsets,
    solve_params,
    source_flags,
    source_flux,
)
from workflow_lib.metrics import add_cdpp

log = get_logger("lfd")


def sky_settings(p: dict, params: dict | None, cube, section: str) -> dict:
    """``p`` with ``background_order`` -1 (no sky terms) for pixels from which the mission pipeline already
    subtracted its sky (``cube.attrs['background_subtracted']``: a TPF pixel table with BACKAPP = T), unless
    ``params`` sets the order: the LFD paper's assumption 1 (§4.5, Kepler's background is zero). A free sky
    plane there has no far-from-star pixels to pin it on a small stamp and trades off against the PRF's
    wings (a real K2 stamp: sky -13.5 e-/s/px, the target's flux 12x its stamp's light)."""
    if int(cube.attrs.get("background_subtracted", 0)) and "background_order" not in (params or {}):
        if p.get("background_order", -1) != -1:
            log.info(
                "background-subtracted pixels (BACKAPP = T): no sky terms in lfd.%s (set its background_order to fit one)",
                section,
            )
        return dict(p, background_order=-1)
    return p


def edge_model_step(cube_path, catalog_path, out_json, params: dict | None = None) -> dict:
    """Snakemake step: fit the §4.2 edge model of a field and write it as JSON (atomically).

    The JSON holds ``coefficients`` (9, for eq. 7 in log10 e-/s), the settings, the background,
    a radius-vs-flux table (``radius_table``: flux [e-/s] and edge radius [px] on a log grid),
    the per-source ``source_id``/``edge_radius``, a ``summary`` (numbers of pixels, sources,
    uncontaminated pixels) and ``provenance``.
    """

    cube = open_cube(cube_path)
    p = sky_settings(edge_params(params), params, cube, "edge")
    validate_for_modelling(cube, str(cube_path))
    table = as_pixel_table(cube.load())
    catalog = read_field_catalog(catalog_path)
    if len(catalog) == 0:
        raise ValueError(f"{catalog_path}: catalog has no sources; LFD needs at least one")
    mean_flux, _ = mean_frame(table)
    pc = np.asarray(table["column"].values, float)
    pr = np.asarray(table["row"].values, float)
    F = a_priori_flux(catalog)
    try:
        model, radii, mask, owner = fit_edge_to_frame(
            mean_flux, pc, pr, np.asarray(catalog["column"], float), np.asarray(catalog["row"], float), F, p
        )
    except ValueError as exc:
        raise ValueError(
            f"{cube_path}: cannot fit the LFD edge model (§4.2) with {pc.size} pixels and "
            f"{len(catalog)} catalog source(s): {exc}. The scene model needs many unsaturated, "
            f"isolated stars; use CPM (cpm_detrend) for cubes this small."
        ) from exc
    grid = np.logspace(0, 7, 57)
    out = {
        "model": "lfd_edge",
        "equation": "log10 f = [1, r, r^2] x [1, L, L^2] . w0, L = log10(F_apriori) (Hedges & Martinez-Palomera 2021 eqs. 5-7)",
        "coefficients": [float(c) for c in model.coefficients],
        "threshold": model.threshold,
        "min_radius": model.min_radius,
        "max_radius": model.max_radius,
        "background": model.background,
        "background_order": model.background_order,
        "background_coefficients": [
            float(c) for c in (model.background_coefficients if model.background_coefficients is not None else [])
        ],
        "background_rms": model.background_rms,
        "log_flux_range": list(model.log_flux_range) if model.log_flux_range else None,
        "radius_table": {"flux": [float(g) for g in grid], "radius": [float(x) for x in model.radius(grid)]},
        "source_id": [int(s) for s in np.asarray(catalog["source_id"])],
        "edge_radius": [float(x) for x in radii],
        "summary": {
            "n_pixels": int(pc.size),
            "n_sources": int(len(catalog)),
            "n_uncontaminated_pixels": int(mask.sum()),
            "n_sources_with_uncontaminated_pixels": int(np.unique(owner[owner >= 0]).size),
            "background": model.background,
        },
        "provenance": provenance("lfd_edge_model", inputs=[cube_path, catalog_path], config=p),
    }
    log.info(
        "edge model: %d uncontaminated pixels of %d, %d sources, background %.2f e-/s",
        mask.sum(),
        pc.size,
        len(catalog),
        model.background,
    )
    write_text_atomic(json.dumps(out, indent=1, sort_keys=True, default=str), out_json)
    return out


def prf_model_step(cube_path, catalog_path, edge_json, out_npz, out_png, params: dict | None = None) -> PRFModel:
    """Snakemake step: fit the §4.3-4.4 PRF model of a field; write the model (.npz) and a picture (.png) atomically."""

    cube = open_cube(cube_path)
    p = sky_settings(prf_params(params), params, cube, "prf")
    table = as_pixel_table(cube.load())
    catalog = read_field_catalog(catalog_path)
    if len(catalog) == 0:
        raise ValueError(f"{catalog_path}: catalog has no sources; LFD needs at least one")
    edge = load_edge_model(edge_json)
    mean_flux, mean_err = mean_frame(table)
    model, diag = fit_prf_model(
        mean_flux,
        mean_err,
        table["column"].values,
        table["row"].values,
        np.asarray(catalog["column"], float),
        np.asarray(catalog["row"], float),
        a_priori_flux(catalog),
        edge,
        p,
        source_id=np.asarray(catalog["source_id"]),
    )
    model.provenance = provenance_json("lfd_prf_model", inputs=[cube_path, catalog_path, edge_json], config=p)
    model.save(out_npz)
    plot_prf_model(model, diag, out_png)
    return model


def motion_model_step(
    cube_path, catalog_path, prf_npz, out_npz, params: dict | None = None, ccd_motion=None
) -> MotionModel:
    """Snakemake step: fit the §4.5 motion model of a field and save it (``motion_model.npz``).

    ``ccd_motion`` (survey mode, ``survey.motion: ccd``): the CCD-level motion model of the tile's CCD
    (``ccd_motion`` step, :mod:`workflow_lib.survey.motion`); the shift model then takes its offsets at the
    tile centre, c_t + tau_t E (x_k - x0, y_k - y0) (eq. 1 there), instead of measuring its own, and fits
    only the correction spline to them. The tile is found by the cube's ``tile_id`` attribute.

    Uncontaminated pixels (§4.2: "contributions from a single source") are those where one source
    gives at least ``min_purity`` of the modelled source flux, with the fitted PRF and the
    mean-frame fluxes of the PRF step (the §4.2 circular edge model at TESS's noise threshold
    leaves only ~100 of 4096 pixels uncontaminated in the crowded synthetic field). The per-bin
    background is the background part of a mean-scene LFD solve of each binned frame.
    """

    p = motion_params(params)
    f = load_field_scene(cube_path, catalog_path, prf_npz)
    idx = f["idx"]
    offsets = None
    if ccd_motion is not None:
        offsets = ccd_offsets_of_tile(ccd_motion, f["cube"], f["table"]["time"].values)
    mm, summary = fit_field_motion(
        *scene_series(f),
        p,
        mission=f["cube"].attrs.get("mission", "TESS"),
        name=str(cube_path),
        prf=f["model"],
        offsets=offsets,
    )
    if "pixel_source" in summary:
        summary["pixel_source"] = idx[summary["pixel_source"]]
    inputs = [cube_path, catalog_path, prf_npz] + ([ccd_motion] if ccd_motion is not None else [])
    prov = provenance_json("lfd_motion_model", inputs=inputs, config=p)
    if ccd_motion is not None:
        summary["offsets_from"] = np.str_("ccd")
    save_motion_model(out_npz, mm, summary, prov)
    log.info("motion model saved to %s", out_npz)
    return mm


def ccd_offsets_of_tile(ccd_motion, cube, time):
    """The CCD-level motion model's scene offsets (column, row) [px] at the centre of the tile ``cube``
    (its ``tile_id`` attribute), at its cadences (:func:`workflow_lib.survey.motion.model_at`)."""
    from workflow_lib.survey.motion import CCDMotionError, load_ccd_motion, model_at

    tid = cube.attrs.get("tile_id")
    model = load_ccd_motion(ccd_motion)
    ids = [str(t) for t in model["tile_ids"]]
    if tid not in ids:
        raise CCDMotionError(f"{ccd_motion}: no tile {tid!r} (the cube is not one of its tiles: {', '.join(ids)})")
    x, y = model["center"][ids.index(tid)]
    return model_at(model, x, y, time)


def scene_offsets_step(cube_path, catalog_path, prf_npz, out_npz, params: dict | None = None) -> dict:
    """Snakemake step (survey mode, ``survey.motion: ccd``): the shift model's per-cadence scene offsets
    of a tile with their errors (:func:`workflow_lib.lfd.motion.measure_field_offsets`) and the tile centre
    (mean CCD column / row of its pixels), for the CCD-level fit (``ccd_motion``). Writes ``scene_offsets.npz``.
    """
    from workflow_lib.lfd.motion import measure_field_offsets

    p = motion_params(params)
    f = load_field_scene(cube_path, catalog_path, prf_npz)
    out = measure_field_offsets(
        *scene_series(f),
        f["model"],
        p,
        name=str(cube_path),
    )
    out["center"] = np.array([np.mean(np.unique(f["pc"])), np.mean(np.unique(f["pr"]))])
    out["tile_id"] = np.str_(f["cube"].attrs.get("tile_id", ""))
    out["provenance"] = np.str_(
        provenance_json("lfd_scene_offsets", inputs=[cube_path, catalog_path, prf_npz], config=p)
    )
    with atomic_path(out_npz) as tmp:
        save_npz_deterministic(tmp, out)
    log.info("scene offsets of %d cadences saved to %s", int(out["good"].sum()), out_npz)
    return out


def scene_series(f: dict) -> tuple:
    """The positional inputs of the motion fits from :func:`load_field_scene`'s dict: time, flux, flux_err,
    quality (per pixel and cadence), the scene matrix S, the modelled sources' mean fluxes, pixel column / row
    and those sources' column / row."""
    table, idx = f["table"], f["idx"]
    return (
        table["time"].values,
        table["flux"].values,
        table["flux_err"].values,
        table["quality"].values,
        f["S"],
        f["mean_flux"][idx],
        f["pc"],
        f["pr"],
        f["sc"][idx],
        f["sr"][idx],
    )


def load_field_scene(cube_path, catalog_path, prf_npz):
    """Open a field for LFD: the (lazy) pixel table, the catalog, the PRF model and the mean scene.

    Sources are those of the catalog; the ones the PRF step removed (negative mean flux, §4.4)
    are left out of the model (``active`` False). Returns a dict.
    """

    cube = open_cube(cube_path)
    table = as_pixel_table(cube, drop_nan=False)
    try:
        catalog = read_field_catalog(catalog_path)
    except Exception as exc:
        raise SolveError(f"{catalog_path}: cannot read the catalog ({exc})") from exc
    try:
        model = PRFModel.load(prf_npz)
    except Exception as exc:
        raise SolveError(f"{prf_npz}: not a readable PRF model ({exc})") from exc
    sid = np.asarray(catalog["source_id"], dtype=np.int64)
    if model.source_id is None or model.source_flux is None:
        raise SolveError(f"{prf_npz}: PRF model has no mean-frame source fluxes")
    if not np.array_equal(np.asarray(model.source_id, np.int64), sid):
        raise SolveError(f"{prf_npz}: source list differs from {catalog_path}; rerun the PRF step")
    mean_flux = np.asarray(model.source_flux, float)
    active = np.isfinite(mean_flux)  # sources the PRF step dropped (significantly negative flux) are NaN
    pc = np.asarray(table["column"].values, float)
    pr = np.asarray(table["row"].values, float)
    sc = np.asarray(catalog["column"], float)
    sr = np.asarray(catalog["row"], float)
    idx = np.flatnonzero(active)
    S = scene_matrix(model, sc[idx], sr[idx], pc, pr).tocsr()
    S.sum_duplicates()
    S.sort_indices()
    # the PRF wings' light beyond r_max (lfd.prf.wing_radius): one sky column, None without
    wing = wing_image(model, sc, sr, mean_flux, pc, pr)
    # pixels with light the model lacks (lfd.prf.unmodelled_sigma), by their coordinates
    unmodelled = np.zeros(pc.size, bool)
    if model.unmodelled is not None and len(model.unmodelled):
        bad = {(float(c), float(r)) for c, r in np.asarray(model.unmodelled, float)}
        unmodelled = np.array([(c, r) in bad for c, r in zip(pc.tolist(), pr.tolist())], bool)
    return dict(
        unmodelled=unmodelled,
        wing=wing if wing.any() else None,
        cube=cube,
        table=table,
        catalog=catalog,
        model=model,
        active=active,
        idx=idx,
        S=S,
        pc=pc,
        pr=pr,
        sc=sc,
        sr=sr,
        mean_flux=mean_flux,
    )


def _flux_priors(f: dict, table, B, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian priors (mean, sigma) of the LFD solve (§4.4): sources at their mean-frame PRF-step flux,
    background terms at the PRF step's polynomial with a flat (1e6) prior; sources blended with a brighter
    neighbour get a narrow prior (App. B). Returns ``(prior_mu, prior_sigma, blend)``, ``blend`` the
    modelled sources given that narrow prior (:func:`workflow_lib.lfd.solve.blended_sources`)."""
    idx = f["idx"]
    mu_src = f["mean_flux"][idx]
    nbp = B.shape[1] - (f["wing"] is not None)  # polynomial terms; the last column is the wing's
    bk0 = np.zeros(nbp)
    if f["model"].background is not None and len(f["model"].background) == nbp:
        bk0 = np.asarray(f["model"].background, float)
    if f["wing"] is not None:
        bk0 = np.append(bk0, f["model"].wing_scale)
    prior_mu = np.concatenate([mu_src, bk0])
    # width: factor x |mean flux|, at least factor x the single-cadence error of that flux (faint
    # sources whose mean-frame flux is near zero keep a usable prior)
    n_good = max(int((np.asarray(table["quality"].values) == 0).sum()), 1)
    merr = f["model"].source_flux_err
    e1 = np.sqrt(n_good) * np.asarray(merr, float)[idx] if merr is not None else np.zeros(idx.size)
    e1 = np.where(np.isfinite(e1), e1, 0.0)
    sigma_src = p["prior_sigma_factor"] * np.maximum(np.maximum(np.abs(mu_src), e1), 1e-3)
    # App. B: narrow priors on sources the data cannot separate from a brighter neighbour
    blend = blended_sources(f["sc"][idx], f["sr"][idx], mu_src, p["blend_radius"])
    sigma_src = np.where(blend, p["blend_prior_fraction"] * np.maximum(np.abs(mu_src), 1e-3), sigma_src)
    if blend.any():
        log.info(
            "%d sources within %.2f px of a brighter one: prior sigma %.3g x their mean flux (App. B)",
            blend.sum(),
            p["blend_radius"],
            p["blend_prior_fraction"],
        )
    prior_sigma = np.concatenate([sigma_src, np.full(B.shape[1], 1e6)])
    return prior_mu, prior_sigma, blend


def _decorrelate_scene_offset(time, sflux, table, mm: MotionModel, deg: int, p: dict) -> np.ndarray:
    """Light curves decorrelated against the motion model's measured scene offset (§4.5 shift model):
    a degree-``deg`` polynomial in the offsets, fitted to the high-passed good cadences."""
    cx, cy = np.full(time.size, np.nan), np.full(time.size, np.nan)
    known = np.isin(time, mm.reg_time)
    cx[known], cy[known] = mm.offsets(time[known])
    good = np.asarray(table["quality"].values) == 0
    sflux, coef = decorrelate_offsets(
        time,
        sflux,
        cx,
        cy,
        good,
        degree=deg,
        window_days=p["offset_decorrelation_window"],
        select=p["offset_decorrelation_select"],
    )
    used = (coef != 0).sum(axis=1)
    log.info(
        "light curves decorrelated against the measured scene offset (degree <= %d, %s; %.2f-d high-pass): "
        "%d sources with offset terms, median %d terms",
        deg,
        p["offset_decorrelation_select"],
        p["offset_decorrelation_window"],
        int((used > 0).sum()),
        int(np.median(used)) if used.size else 0,
    )
    return sflux


def _source_columns(f: dict, S, mu_src) -> dict:
    """Per-source columns of the LFD light-curve set: catalog values, contamination ratio and number of
    pixels of each modelled source (NaN / 0 for sources not in the model), ``in_model``, ``mean_flux``."""
    idx, cat = f["idx"], f["catalog"]
    nsrc = len(cat)
    contam = np.full(nsrc, np.nan)
    npx = np.zeros(nsrc, dtype=np.int64)
    contam[idx], npx[idx] = contamination_ratio(S, np.clip(mu_src, 0, None))
    cols = {
        "source_id": np.asarray(cat["source_id"], np.int64),
        "phot_g_mean_mag": np.asarray(cat["phot_g_mean_mag"], float),
        "column": f["sc"],
        "row": f["sr"],
        "contamination": contam,
        "n_pixels": npx,
        "in_model": f["active"],
        "mean_flux": f["mean_flux"],
    }
    if "on_cutout" in cat.colnames:
        cols["on_cutout"] = np.asarray(cat["on_cutout"], bool)
    return cols


def _lfd_lightcurve_set(f: dict, S, mu_src, blend, sflux, res: dict, time, prov: str, p: dict, cdpp_hours):
    """The LFD light-curve set of every catalog source (NaN for sources not in the model): the solved
    fluxes ``sflux`` and errors of :func:`workflow_lib.lfd.solve.source_flux`, the per-source columns
    (:func:`_source_columns`), the background terms and the CDPP proxy of every ``cdpp_hours``."""
    idx = f["idx"]
    nsrc = len(f["catalog"])
    flux = np.full((nsrc, time.size), np.nan)
    err = np.full((nsrc, time.size), np.nan)
    flux[idx] = sflux
    err[idx] = res["flux_err"]
    cols = _source_columns(f, S, mu_src)
    # which sources the data do not constrain (lfd_flag): left out of the default products (FITS files)
    frac = np.full(nsrc, np.nan)
    frac[idx] = np.asarray(S.sum(axis=0), float).ravel()
    out = ~f["active"]
    if out.any():
        frac[out] = fraction_on_pixels(f["model"], f["sc"][out], f["sr"][out], f["pc"], f["pr"])
    good = np.asarray(f["table"]["quality"].values) == 0
    cols["flux_fraction"] = frac
    # App. B blends: their per-cadence flux was held near the mean frame's, the variability given to the
    # brighter member; the deblended product subtracts them with their running median
    cols["blended"] = np.zeros(nsrc, bool)
    cols["blended"][idx] = blend
    cols["lfd_flag"] = source_flags(
        f["active"], frac, flux, good, p["min_flux_fraction"], flux_err=err, min_median_snr=p["min_median_snr"]
    )
    lc = lightcurve_set(
        flux,
        err,
        f["cube"],
        cols,
        method="LFD",
        attrs={
            "provenance": prov,
            "use_motion": int(bool(p["use_motion"])),
            "solver": res["method"],
            **prf_convergence(f["model"]),
        },
    )
    bkg = np.asarray(res["background"])
    if f["wing"] is not None:  # the last background column is the PRF wings' light (lfd.prf.wing_radius)
        lc["wing_scale"] = (
            ("time",),
            bkg[-1],
            {"units": "", "wing_radius": float(f["model"].wing_radius), "description": "scale of the wing column"},
        )
        bkg = bkg[:-1]
    lc["background"] = (("background_term", "time"), bkg, {"units": "electron / s"})
    # CDPP proxy (1 h / 6 h and the report's hours), stored with the light curves (comparable with RAW and CPM)
    return add_cdpp(lc, hours=tuple(cdpp_hours))


def flux_solve_step(
    cube_path,
    catalog_path,
    prf_npz,
    motion_file,
    out_zarr,
    out_fits_dir,
    params: dict | None = None,
    *,
    threads: int = 1,
    diagnostics_npz=None,
    cdpp_hours=(1.0, 6.0),
):
    """Snakemake step: LFD light curves of every source (§4.4-4.5), zarr (atomic) + one FITS per source,
    and the LFD diagnostics (:func:`write_lfd_diagnostics`; default ``diagnostics.npz`` next to ``out_zarr``).

    The prior of every source is its mean-frame LFD flux from the PRF step (sigma =
    ``prior_sigma_factor`` x |flux|); background terms get the PRF step's polynomial and a flat
    prior. With ``use_motion`` the motion model (§4.5) multiplies the scene at every cadence.
    The light curves carry the CDPP proxy ``cdpp_<h>h`` of every ``cdpp_hours``.
    """

    p = solve_params(params)
    f = load_field_scene(cube_path, catalog_path, prf_npz)
    table, S, idx = f["table"], f["S"], f["idx"]
    border = f["model"].background_order if p["background_order"] is None else p["background_order"]
    B = background_design(f["pc"], f["pr"], border)
    if f["wing"] is not None:
        B = np.column_stack([B, f["wing"]])
    mu_src = f["mean_flux"][idx]
    prior_mu, prior_sigma, blend = _flux_priors(f, table, B, p)
    time = np.asarray(table["time"].values, float)
    basis = tb = None
    if p["use_motion"]:
        if motion_file is None:
            raise SolveError("use_motion is on but no motion model file was given")
        mm = load_motion_model(motion_file)
        dx, dy = scene_offsets(S, f["pc"], f["pr"], f["sc"][idx], f["sr"][idx])
        basis, tb = motion_factors(mm, dx, dy, time, prf=f["model"])
    # float32 in memory (64x64x1300: 21 MB); chunks are converted to float64 inside the solve
    pix_flux = np.asarray(table["flux"].values)
    if f["unmodelled"].any():  # NaN = no weight: pixels with light no source of the model has
        pix_flux = pix_flux.copy()
        pix_flux[:, f["unmodelled"]] = np.nan
        log.info(
            "%d pixels with unmodelled light left out of the solve (lfd.prf.unmodelled_sigma)", f["unmodelled"].sum()
        )
    res = source_flux(
        pix_flux,
        np.asarray(table["flux_err"].values),
        S,
        B,
        prior_mu,
        prior_sigma,
        motion_basis=basis,
        motion_time=tb,
        method=p["method"],
        direct_max_sources=p["direct_max_sources"],
        time_chunk=p["time_chunk"],
        threads=threads,
        dask_scheduler=p["dask_scheduler"],
        rtol=p["rtol"],
        exact_errors=p["exact_errors"],
    )
    sflux = res["flux"]
    deg = int(p["offset_decorrelation_degree"])
    if p["use_motion"] and deg > 0 and mm.time_model == "shift":
        sflux = _decorrelate_scene_offset(time, sflux, table, mm, deg, p)
    nsrc = len(f["catalog"])
    cat = f["catalog"]
    prov = provenance_json(
        "lfd_flux_solve",
        inputs=[cube_path, catalog_path, prf_npz] + ([motion_file] if p["use_motion"] else []),
        config=p,
        method=res["method"],
    )
    lc = _lfd_lightcurve_set(f, S, mu_src, blend, sflux, res, time, prov, p, cdpp_hours)
    write_zarr_atomic(lc, out_zarr)
    log.info("wrote %s (%d sources x %d cadences, %d in the model)", out_zarr, nsrc, time.size, idx.size)
    if diagnostics_npz is None:
        diagnostics_npz = Path(out_zarr).parent / "diagnostics.npz"
    factors = (S, basis, tb) if basis is not None else None
    write_lfd_diagnostics(diagnostics_npz, f["cube"], cat, f["model"], lc, motion_file, factors)
    flagged = np.asarray(lc["lfd_flag"].values) != 0
    if flagged.any():
        log.info(
            "%d of %d sources flagged as not constrained by the data (lfd_flag: %s)%s",
            flagged.sum(),
            nsrc,
            ", ".join(
                f"{name} {int(((lc['lfd_flag'].values & bit) != 0).sum())}" for bit, name in LFD_SOURCE_FLAGS.items()
            ),
            "" if p["write_flagged_fits"] else "; no FITS files for them (lfd.solve.write_flagged_fits)",
        )
    if out_fits_dir is not None:  # the rule's declared output: empty with write_fits false
        keep = np.ones(nsrc, bool) if p["write_flagged_fits"] else ~flagged
        with atomic_dir(out_fits_dir) as tmp:  # no partial directory, no files of an earlier run
            paths = write_lightcurve_fits(lc.isel(source=np.flatnonzero(keep)), tmp, "lfd") if p["write_fits"] else []
        log.info("wrote %d FITS light curves to %s", len(paths), out_fits_dir)
    return lc


def write_lfd_diagnostics(out_npz, cube, catalog, prf, lc, motion_file=None, factors=None) -> dict:
    """Write what the LFD model means, for the report (``lfd/diagnostics.npz``, atomic, deterministic bytes).

    The mean frame of the data, of the LFD model of ``lc`` and their residual, and the motion
    model's scene offsets and PRF factor change per cadence (:func:`workflow_lib.lfd.diagnostics.lfd_diagnostics`;
    layout: :func:`workflow_lib.lfd.diagnostics.pack_diagnostics`). ``motion_file`` is the
    motion-model file (None: no motion panel); ``factors`` the flux solve's ``(S, basis, time_basis)``
    (reused by the mean-frame residual when its scene is the same). Returns the unpacked diagnostics.
    """
    motion = raw = None
    notes = []
    if motion_file is not None and Path(motion_file).exists():
        try:
            with np.load(motion_file, allow_pickle=False) as z:
                raw = {k: np.asarray(z[k]) for k in z.files}
        except Exception as exc:
            notes.append(f"{motion_file}: unreadable ({exc})")
        if raw is not None:
            try:
                motion = load_motion_model(motion_file)
            except Exception as exc:
                notes.append(f"{motion_file}: not a motion model LFD can evaluate ({exc})")
    diag = lfd_diagnostics(cube, catalog, prf, lc, motion, raw, factors)
    diag["motion_notes"] = notes + diag["motion_notes"]
    with atomic_path(out_npz) as tmp:
        save_npz_deterministic(tmp, pack_diagnostics(diag))
    log.info("wrote %s", out_npz)
    return diag
