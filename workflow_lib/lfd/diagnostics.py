"""LFD diagnostics: what the fitted scene model means, as plain arrays the LFD step writes
(``lfd/diagnostics.npz``) and the report only reads.

* :func:`mean_frame_residual`: mean frame of the data, of the LFD model and their difference;
* :func:`motion_summary`: the motion model's scene offsets and PRF factor change per cadence;
* :func:`lfd_diagnostics`: both, with the notes of what could not be computed, and
  :func:`pack_diagnostics` / :func:`unpack_diagnostics` between those dicts and flat arrays.

Functions of arrays, xarray data sets, astropy tables and the LFD models only.
"""

import warnings

import numpy as np
import scipy.sparse as sp
import xarray as xr

from workflow_lib.data.cube import as_pixel_table, pixel_coordinates
from workflow_lib.lfd.geometry import background_design, source_pixel_pairs
from workflow_lib.lfd.motion import motion_factors
from workflow_lib.lfd.prf import scene_matrix, wing_image

#: per-pixel arrays of the mean-frame residual
RESIDUAL_ARRAYS = ("data", "model", "residual")


def good_cadences(flux: np.ndarray, quality: np.ndarray | None) -> np.ndarray:
    """Cadences of the mean frame: QUALITY == 0 with at least one finite pixel (all finite
    cadences when no cadence is flagged good), as LFD's mean frame (:func:`workflow_lib.lfd.edge.mean_frame`).
    ``flux`` is (time, pixel)."""
    fin = np.isfinite(flux).any(axis=1)
    q = np.asarray(quality) if quality is not None else np.zeros(fin.size, int)
    good = fin & (q == 0)
    return good if good.any() else fin


def _good_cadences(cube: xr.Dataset, flux: np.ndarray) -> np.ndarray:
    """:func:`good_cadences` of a cube (its ``quality`` variable when present)."""
    return good_cadences(flux, cube["quality"].values if "quality" in cube else None)


def mean_frame_residual(cube: xr.Dataset, catalog, prf, lfd: xr.Dataset, motion=None, factors=None) -> dict:
    """Mean frame of the data, of the LFD model, and their difference, from what LFD writes.

    Over the good cadences G (:func:`good_cadences`, and present in the LFD set):

    * data  = mean_G of each pixel's flux (NaN-skipping);
    * model = sum over sources s of PRF(pixel - position_s) x mean_G(LFD flux_s), with the
      catalog positions and :func:`workflow_lib.lfd.prf.scene_matrix` (the LFD scene), plus the
      background polynomial (:func:`workflow_lib.lfd.geometry.background_design`) with the mean of LFD's
      per-cadence ``background`` coefficients (else the PRF step's mean-frame background);
    * with a motion model that LFD used (``use_motion``), the scene of cadence t is the PRF times
      the eq. 24 factor ``basis[k] @ time_basis[t]``, so the mean model of pair k is exactly
      ``PRF_k basis[k] @ mean_G(time_basis[t] flux_s(t))``;
    * residual = data - model.

    ``factors``: optionally ``(S, basis, time_basis)``, the motion factors the flux solve has just evaluated
    (:func:`workflow_lib.lfd.motion.motion_factors` of the pairs of its scene matrix ``S``, ``time_basis`` at
    every cadence of the cube); used as they are when the scene of the residual is that same matrix (every
    modelled source has LFD fluxes), instead of evaluating the PRF's shift polynomial at every pair again.

    Arrays are per pixel of ``as_pixel_table(cube, drop_nan=False)`` (the report's
    ``source_index`` order). Returns ``{"data", "model", "residual", "label", "n_sources",
    "n_cadences", "notes"}``.
    """
    notes = []
    t = as_pixel_table(cube, drop_nan=False)
    flux = np.asarray(t["flux"].transpose("time", "pixel").values, dtype=np.float64)
    pc = np.asarray(t["column"].values, float)
    pr = np.asarray(t["row"].values, float)
    good = _good_cadences(cube, flux)
    ref_cad = np.asarray(cube["cadenceno"].values, np.int64) if "cadenceno" in cube.coords else np.arange(flux.shape[0])
    lc_cad = np.asarray(lfd["cadenceno"].values, np.int64) if "cadenceno" in lfd.coords else ref_cad
    pos = {int(c): i for i, c in enumerate(lc_cad)}
    tidx = np.array([pos.get(int(c), -1) for c in ref_cad])
    good &= tidx >= 0
    if not good.any():
        raise ValueError("no good cadence common to the cube and the LFD light curves")
    gi = np.flatnonzero(good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        data = np.nanmean(flux[gi], axis=0)
    # sources: catalog positions, LFD fluxes at the good cadences
    sid = np.asarray(catalog["source_id"], np.int64)
    spos = {int(s): i for i, s in enumerate(np.asarray(lfd["source_id"].values, np.int64))}
    li = np.array([spos.get(int(s), -1) for s in sid])
    lflux = np.asarray(lfd["flux"].transpose("source", "time").values, dtype=np.float64)
    fs = np.full((sid.size, gi.size), np.nan)
    fs[li >= 0] = lflux[li[li >= 0]][:, tidx[gi]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_f = np.nanmean(fs, axis=1)
    use = np.flatnonzero(np.isfinite(mean_f))
    sc = np.asarray(catalog["column"], float)[use]
    sr = np.asarray(catalog["row"], float)[use]
    S = sp.csr_matrix(scene_matrix(prf, sc, sr, pc, pr))
    S.sum_duplicates()
    S.sort_indices()
    label = "static mean scene"
    model = None
    if motion is not None and int(lfd.attrs.get("use_motion", 0)):
        try:
            model = _mean_motion_scene(
                S, motion, prf, pc, pr, sc, sr, np.asarray(cube["time"].values)[gi], fs[use], _reusable(factors, S, gi)
            )
            label = "with the motion model"
        except Exception as exc:
            notes.append(
                f"mean-frame residual: motion model not applied ({type(exc).__name__}: {exc}); static scene shown"
            )
    if model is None:
        model = S @ mean_f[use]
    cat_pos = (np.asarray(catalog["column"], float), np.asarray(catalog["row"], float))
    sky = _mean_background(lfd, prf, pc, pr, tidx[gi], notes, cat_pos)
    if sky is not None:
        model = model + sky
    model = np.where(np.isfinite(data), model, np.nan)
    return {
        "data": data,
        "model": model,
        "residual": data - model,
        "label": label,
        "n_sources": int(use.size),
        "n_cadences": int(gi.size),
        "notes": notes,
    }


def _reusable(factors, S, gi):
    """``(basis, time_basis[gi])`` of the flux solve's ``factors = (S, basis, time_basis)`` when its scene
    matrix is ``S`` entry for entry (same pairs in the same order), else None."""
    if factors is None:
        return None
    S0, basis, tb = factors
    same = (
        S0.shape == S.shape
        and np.array_equal(S0.indptr, S.indptr)
        and np.array_equal(S0.indices, S.indices)
        and np.array_equal(S0.data, S.data)
    )
    return (basis, tb[gi]) if same else None


def _mean_motion_scene(S, motion, prf, pc, pr, sc, sr, time_good, f_use, factors=None) -> np.ndarray:
    """Mean over the good cadences of the motion-model scene: sum_k PRF_k basis[k] @ mean_G(time_basis f_s).
    ``factors``: ``(basis, time_basis)`` of these pairs and cadences already evaluated (else evaluated here)."""
    rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
    cols = S.indices
    if factors is None:
        factors = motion_factors(motion, pc[rows] - sc[cols], pr[rows] - sr[cols], time_good, prf)
    basis, tb = factors
    ok = np.isfinite(f_use)  # (nsrc, ngood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        M = np.einsum("st,tk->sk", np.where(ok, f_use, 0.0), tb) / ok.sum(axis=1)[:, None]  # mean_G(tb * f_s)
    return np.bincount(rows, weights=S.data * np.einsum("pk,pk->p", basis, M[cols]), minlength=S.shape[0])


def _mean_background(lfd: xr.Dataset, prf, pc, pr, tgood, notes: list, catalog_position=None):
    """Mean sky of the good cadences ``tgood`` (indices into the LFD set) per pixel, or None (with a note)."""
    if "background" in lfd and lfd["background"].ndim == 2:
        b = lfd["background"]
        bdim = [d for d in b.dims if d != "time"][0]
        coef = np.asarray(b.transpose(bdim, "time").values, float)[:, tgood]
        nb = coef.shape[0]
        order = next((o for o in range(-1, 8) if (o + 1) * (o + 2) // 2 == nb), None)
        if order is None:
            raise ValueError(f"LFD background has {nb} terms: not a polynomial of any order")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mb = np.nanmean(coef, axis=1)
        sky = background_design(pc, pr, order) @ np.nan_to_num(mb) if nb else None
        if (
            "wing_scale" in lfd and sky is not None and catalog_position is not None
        ):  # the PRF wings' light beyond r_max (lfd.prf.wing_radius)
            cat_sc, cat_sr = catalog_position
            ws = np.nanmean(np.asarray(lfd["wing_scale"].values, float)[tgood])
            sky = sky + np.nan_to_num(ws) * wing_image(prf, cat_sc, cat_sr, prf.source_flux, pc, pr)
        return sky
    if prf.background is not None and len(prf.background):
        notes.append(
            "mean-frame residual: LFD light curves carry no background; the PRF step's mean-frame background is used"
        )
        return background_design(pc, pr, int(prf.background_order)) @ np.asarray(prf.background, float)
    notes.append("mean-frame residual: no LFD background saved; the model has no sky")
    return None


def measured_offsets(raw: dict | None, mm, time: np.ndarray):
    """The measured scene offset (column, row) per cadence: ``scene_offset_column/row`` of the
    motion-model file ``raw`` when they cover ``time``, else a shift model's own offsets, else None."""
    raw = raw or {}
    if "scene_offset_column" in raw and "scene_offset_row" in raw and np.size(raw["scene_offset_column"]) == time.size:
        return np.asarray(raw["scene_offset_column"], float), np.asarray(raw["scene_offset_row"], float)
    if mm is not None and mm.time_model == "shift" and mm.reg_time is not None:
        return mm.offsets(time)
    return None


def motion_summary(mm, prf, catalog, cube: xr.Dataset, raw: dict | None = None, n_sources=5, radius=2.5) -> dict | None:
    """What the LFD motion model ``mm`` means, per cadence of the cube (time in the cube's system).

    * ``dx``, ``dy`` [px]: the scene offset (column, row). Shift models store the measured offset
      per cadence (``scene_offset_column/row`` of the motion-model file ``raw``, else
      :meth:`MotionModel.offsets`): shown as measured. Other models (polynomial in time, centroid
      regressors in normalised units) are shown through their effect: the shift of the
      flux-weighted centroid of the modelled PRF (PRF x factor, eq. 25) over the pixels within
      ``radius`` of the ``n_sources`` brightest on-cutout sources, median over those sources.
    * ``change_mean`` [%]: mean |factor - 1| over those (source, pixel) pairs;
      ``pix_a``/``pix_b`` [%]: factor - 1 of two pixels of the brightest source (its peak pixel and
      the pixel whose factor varies most).

    ``None`` when there is no evaluable motion model; arrays at cadences with non-finite time are NaN.
    """
    time = np.asarray(cube["time"].values, float)
    out = {"time": time}
    meas = measured_offsets(raw, mm, time)
    if mm is None or prf is None or catalog is None or len(catalog) == 0:
        if meas is None:
            return None
        out.update(dx=meas[0], dy=meas[1], offset_label="measured scene offset", pixel_labels=[])
        return out
    pc, pr = pixel_coordinates(cube)
    srcs = _brightest_inside(catalog, pc, pr, n_sources, radius)
    sc, sr = np.asarray(catalog["column"], float), np.asarray(catalog["row"], float)
    src, pix, dx, dy = source_pixel_pairs(sc[srcs], sr[srcs], pc, pr, radius)
    basis, tb = motion_factors(mm, dx, dy, time, prf)
    fac = np.asarray(tb @ basis.T, float)  # (ntime, npair)
    p0 = np.asarray(prf.evaluate(dx, dy), float)
    model_dx, model_dy = _centroid_shift(src, srcs.size, dx, dy, p0, fac)
    if meas is not None:
        out.update(dx=meas[0], dy=meas[1], offset_label="measured scene offset")
        out.update(model_dx=model_dx, model_dy=model_dy)
    else:
        out.update(dx=model_dx, dy=model_dy, offset_label=f"model centroid shift ({srcs.size} brightest sources)")
    out["change_mean"] = 100.0 * np.mean(np.abs(fac - 1.0), axis=1)
    k0 = np.flatnonzero(src == 0)
    labels = []
    if k0.size:
        peak = k0[np.argmax(p0[k0])]
        var = k0[np.argmax(np.nanstd(fac[:, k0], axis=0))]
        for name, k in (("pix_a", peak), ("pix_b", var)):
            out[name] = 100.0 * (fac[:, k] - 1.0)
            what = "peak px" if name == "pix_a" else "px"
            labels.append(f"{what} ({int(pc[pix[k]])}, {int(pr[pix[k]])})")
    out["pixel_labels"] = labels
    out["n_sources"] = int(srcs.size)
    out["time_model"] = mm.time_model
    return out


def _brightest_inside(catalog, pc, pr, n_sources: int, radius: float) -> np.ndarray:
    """Catalog rows of the ``n_sources`` brightest sources whose whole ``radius`` lies on the pixels
    (an edge cut would bias the centroid), else the brightest with a magnitude."""
    sc, sr = np.asarray(catalog["column"], float), np.asarray(catalog["row"], float)
    g = (
        np.asarray(catalog["phot_g_mean_mag"], float)
        if "phot_g_mean_mag" in catalog.colnames
        else np.zeros(len(catalog))
    )
    inside = (
        (sc - radius >= pc.min() - 0.5)
        & (sc + radius <= pc.max() + 0.5)
        & (sr - radius >= pr.min() - 0.5)
        & (sr + radius <= pr.max() + 0.5)
        & np.isfinite(g)
    )
    cand = np.flatnonzero(inside)
    if cand.size == 0:
        cand = np.flatnonzero(np.isfinite(g))
    return cand[np.argsort(g[cand], kind="stable")][:n_sources]


def _centroid_shift(src, n_src: int, dx, dy, p0, fac):
    """Median over sources of the shift of the flux-weighted centroid of PRF x factor, per cadence."""
    ntime = fac.shape[0]
    cx = np.full((ntime, n_src), np.nan)
    cy = np.full((ntime, n_src), np.nan)
    for j in range(n_src):
        k = src == j
        if not k.any():
            continue
        w0, wt = p0[k], p0[k][None, :] * fac[:, k]
        with np.errstate(invalid="ignore", divide="ignore"):
            cx[:, j] = (wt @ dx[k]) / wt.sum(axis=1) - (w0 @ dx[k]) / w0.sum()
            cy[:, j] = (wt @ dy[k]) / wt.sum(axis=1) - (w0 @ dy[k]) / w0.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(cx, axis=1), np.nanmedian(cy, axis=1)


# ------------------------------------------------------------------ the diagnostics product


def lfd_diagnostics(cube: xr.Dataset, catalog, prf, lc: xr.Dataset, motion=None, motion_raw=None, factors=None) -> dict:
    """Mean-frame residual and motion summary of one field, never raising.

    ``motion`` is the evaluable motion model (or None), ``motion_raw`` the arrays of its file
    (None when there is no motion-model file), ``factors`` the flux solve's motion factors
    (:func:`mean_frame_residual`). Returns ``{"mean_residual": dict | None,
    "motion": dict | None, "residual_notes": [...], "motion_notes": [...]}``.
    """
    out = {"mean_residual": None, "motion": None, "residual_notes": [], "motion_notes": []}
    try:
        res = mean_frame_residual(cube, catalog, prf, lc, motion, factors)
        out["residual_notes"] = res.pop("notes", [])
        out["mean_residual"] = res
    except Exception as exc:  # diagnostics must not fail the light curves
        out["residual_notes"].append(f"mean-frame residual panel skipped: {type(exc).__name__}: {exc}")
    if motion_raw is not None:
        try:
            out["motion"] = motion_summary(motion, prf, catalog, cube, motion_raw)
        except Exception as exc:  # another motion layout must not break the diagnostics
            out["motion_notes"].append(f"LFD motion panel skipped: {type(exc).__name__}: {exc}")
        if out["motion"] is None and not out["motion_notes"]:
            out["motion_notes"].append(
                "LFD motion panel skipped: the motion model needs the PRF model and the catalog to be evaluated"
            )
    return out


def _strings(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=str) if len(values) else np.zeros(0, dtype="<U1")


def pack_diagnostics(diag: dict) -> dict:
    """Flat ``{name: array}`` of :func:`lfd_diagnostics` (for ``np.savez``; no pickles).

    ``residual_<data|model|residual>`` per pixel of ``as_pixel_table(cube, drop_nan=False)``,
    ``residual_<label|n_sources|n_cadences>``; ``motion_<column>`` per cadence with their order in
    ``motion_columns``, ``motion_<offset_label|pixel_labels|n_sources|time_model>``;
    ``residual_notes``, ``motion_notes``, and ``has_motion_file``.
    """
    out = {
        "residual_notes": _strings(diag["residual_notes"]),
        "motion_notes": _strings(diag["motion_notes"]),
    }
    res = diag.get("mean_residual")
    if res is not None:
        for k in RESIDUAL_ARRAYS:
            out[f"residual_{k}"] = np.asarray(res[k])
        out["residual_label"] = np.array(res["label"])
        out["residual_n_sources"] = np.array(res["n_sources"], np.int64)
        out["residual_n_cadences"] = np.array(res["n_cadences"], np.int64)
    mp = diag.get("motion")
    if mp is not None:
        t = mp["time"]
        cols = [k for k, v in mp.items() if isinstance(v, np.ndarray) and v.shape == t.shape]
        out["motion_columns"] = _strings(cols)
        for k in cols:
            out[f"motion_{k}"] = mp[k]
        out["motion_offset_label"] = np.array(mp["offset_label"])
        out["motion_pixel_labels"] = _strings(mp.get("pixel_labels", []))
        if "n_sources" in mp:
            out["motion_n_sources"] = np.array(mp["n_sources"], np.int64)
        if "time_model" in mp:
            out["motion_time_model"] = np.array(mp["time_model"])
    return out


def unpack_diagnostics(arrays: dict) -> dict:
    """The inverse of :func:`pack_diagnostics` (the per-cadence motion arrays in their order)."""
    a = arrays
    out = {
        "residual_notes": [str(s) for s in a.get("residual_notes", [])],
        "motion_notes": [str(s) for s in a.get("motion_notes", [])],
        "mean_residual": None,
        "motion": None,
    }
    if "residual_data" in a:
        res = {k: np.asarray(a[f"residual_{k}"]) for k in RESIDUAL_ARRAYS}
        res.update(
            label=str(a["residual_label"]),
            n_sources=int(a["residual_n_sources"]),
            n_cadences=int(a["residual_n_cadences"]),
        )
        out["mean_residual"] = res
    if "motion_columns" in a:
        mp = {str(k): np.asarray(a[f"motion_{k}"]) for k in a["motion_columns"]}
        mp["offset_label"] = str(a["motion_offset_label"])
        mp["pixel_labels"] = [str(s) for s in a["motion_pixel_labels"]]
        if "motion_n_sources" in a:
            mp["n_sources"] = int(a["motion_n_sources"])
        if "motion_time_model" in a:
            mp["time_model"] = str(a["motion_time_model"])
        out["motion"] = mp
    return out
