import warnings

import numpy as np
import xarray as xr

from workflow_lib.data.cube import as_pixel_table, pixel_coordinates
from workflow_lib.lfd.geometry import background_design, source_pixel_pairs
from workflow_lib.lfd.motion import motion_factors
from workflow_lib.lfd.prf import scene_matrix


def _good_cadences(cube: xr.Dataset, flux: np.ndarray) -> np.ndarray:
    """Cadences of the mean frame: QUALITY == 0 with at least one finite pixel (all finite
    cadences when no cadence is flagged good), as LFD's mean frame (:func:`workflow_lib.edge.mean_frame`)."""
    fin = np.isfinite(flux).any(axis=1)
    q = np.asarray(cube["quality"].values) if "quality" in cube else np.zeros(fin.size, int)
    good = fin & (q == 0)
    return good if good.any() else fin


def lfd_mean_residual(cube: xr.Dataset, catalog, prf, lfd: xr.Dataset, motion=None) -> dict:
    """Mean frame of the data, of the LFD model, and their difference, from what LFD writes.

    Over the good cadences G (:func:`_good_cadences`, and present in the LFD set):

    * data  = mean_G of each pixel's flux (NaN-skipping);
    * model = sum over sources s of PRF(pixel - position_s) x mean_G(LFD flux_s), with the
      catalog positions and :func:`workflow_lib.prf.scene_matrix` (the LFD scene), plus the
      background polynomial (:func:`workflow_lib.prf.background_design`) with the mean of LFD's
      per-cadence ``background`` coefficients (else the PRF step's mean-frame background);
    * with a motion model that LFD used (``use_motion``), the scene of cadence t is the PRF times
      the eq. 24 factor ``basis[k] @ time_basis[t]``, so the mean model of pair k is exactly
      ``PRF_k basis[k] @ mean_G(time_basis[t] flux_s(t))``;
    * residual = data - model.

    Arrays are per pixel of ``as_pixel_table(cube, drop_nan=False)`` (the display's
    ``source_index`` order). Returns ``{"data", "model", "residual", "label", "n_sources",
    "n_cadences", "notes"}``.
    """
    import scipy.sparse as sp

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
            rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
            cols = S.indices
            basis, tb = motion_factors(
                motion, pc[rows] - sc[cols], pr[rows] - sr[cols], np.asarray(cube["time"].values)[gi], prf
            )
            f_use = fs[use]  # (nsrc, ngood)
            ok = np.isfinite(f_use)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                M = np.einsum("st,tk->sk", np.where(ok, f_use, 0.0), tb) / ok.sum(axis=1)[:, None]  # mean_G(tb * f_s)
            model = np.bincount(rows, weights=S.data * np.einsum("pk,pk->p", basis, M[cols]), minlength=S.shape[0])
            label = "with the motion model"
        except Exception as exc:
            notes.append(
                f"mean-frame residual: motion model not applied ({type(exc).__name__}: {exc}); static scene shown"
            )
    if model is None:
        model = S @ mean_f[use]
    # background
    if "background" in lfd and lfd["background"].ndim == 2:
        b = lfd["background"]
        bdim = [d for d in b.dims if d != "time"][0]
        coef = np.asarray(b.transpose(bdim, "time").values, float)[:, tidx[gi]]
        nb = coef.shape[0]
        order = next((o for o in range(-1, 8) if (o + 1) * (o + 2) // 2 == nb), None)
        if order is None:
            raise ValueError(f"LFD background has {nb} terms: not a polynomial of any order")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mb = np.nanmean(coef, axis=1)
        if nb:
            model = model + background_design(pc, pr, order) @ np.nan_to_num(mb)
    elif prf.background is not None and len(prf.background):
        model = model + background_design(pc, pr, int(prf.background_order)) @ np.asarray(prf.background, float)
        notes.append(
            "mean-frame residual: LFD light curves carry no background; the PRF step's mean-frame background is used"
        )
    else:
        notes.append("mean-frame residual: no LFD background saved; the model has no sky")
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


def motion_panel(fp, n_sources: int = 5, radius: float = 2.5) -> dict | None:
    """What the LFD motion model means, per cadence of the cube (time in the cube's system).

    * ``dx``, ``dy`` [px]: the scene offset (column, row). Shift models store the measured offset
      per cadence (``scene_offset_column/row``, else :meth:`MotionModel.offsets`): shown as
      measured. Other models (polynomial in time, centroid regressors in normalised units) are
      shown through their effect: the shift of the flux-weighted centroid of the modelled PRF
      (PRF x factor, eq. 25) over the pixels within ``radius`` of the ``n_sources`` brightest
      on-cutout sources, median over those sources.
    * ``change_mean`` [%]: mean |factor - 1| over those (source, pixel) pairs;
      ``pix_a``/``pix_b`` [%]: factor - 1 of two pixels of the brightest source (its peak pixel and
      the pixel whose factor varies most).

    ``None`` when there is no evaluable motion model; arrays at cadences with non-finite time are NaN.
    """
    mm, prf, cat, cube = fp.motion_model, fp.prf, fp.catalog, fp.cube
    time = np.asarray(cube["time"].values, float)
    raw = fp.motion or {}
    out = {"time": time}
    meas = None
    if "scene_offset_column" in raw and "scene_offset_row" in raw and np.size(raw["scene_offset_column"]) == time.size:
        meas = (np.asarray(raw["scene_offset_column"], float), np.asarray(raw["scene_offset_row"], float))
    elif mm is not None and mm.time_model == "shift" and mm.reg_time is not None:
        meas = mm.offsets(time)
    if mm is None or prf is None or cat is None or len(cat) == 0:
        if meas is None:
            return None
        out.update(dx=meas[0], dy=meas[1], offset_label="measured scene offset", pixel_labels=[])
        return out

    pt = pixel_coordinates(cube)
    pc, pr = pt
    sc, sr = np.asarray(cat["column"], float), np.asarray(cat["row"], float)
    g = np.asarray(cat["phot_g_mean_mag"], float) if "phot_g_mean_mag" in cat.colnames else np.zeros(len(cat))
    # sources whose whole radius lies on the pixels (an edge cut would bias the centroid)
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
    srcs = cand[np.argsort(g[cand], kind="stable")][:n_sources]
    src, pix, dx, dy = source_pixel_pairs(sc[srcs], sr[srcs], pc, pr, radius)
    basis, tb = motion_factors(mm, dx, dy, time, prf)
    fac = np.asarray(tb @ basis.T, float)  # (ntime, npair)
    p0 = np.asarray(prf.evaluate(dx, dy), float)
    cx = np.full((time.size, srcs.size), np.nan)
    cy = np.full((time.size, srcs.size), np.nan)
    for j in range(srcs.size):
        k = src == j
        if not k.any():
            continue
        w0, wt = p0[k], p0[k][None, :] * fac[:, k]
        with np.errstate(invalid="ignore", divide="ignore"):
            cx[:, j] = (wt @ dx[k]) / wt.sum(axis=1) - (w0 @ dx[k]) / w0.sum()
            cy[:, j] = (wt @ dy[k]) / wt.sum(axis=1) - (w0 @ dy[k]) / w0.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model_dx, model_dy = np.nanmedian(cx, axis=1), np.nanmedian(cy, axis=1)
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
