"""Deblended, de-trended light curves: LFD neighbour subtraction + CPM de-trending of the target's aperture.

Neither method alone gives both: LFD (Hedges & Martinez-Palomera 2021) deblends every source but is
not de-trended, and the CPM aperture light curves (Hattori et al. 2022) are de-trended but sum the
light of every star in the aperture. This product combines them per target source k (the idea of
TGLC's calibrated aperture flux, Han & Brandt 2023, with the CPM as the de-trending):

1. **Neighbour model** (LFD eq. 25, :func:`workflow_lib.lfd.scene.source_pixel_model`): at every pixel
   p of k's aperture and every cadence, the LFD model of every *other* source,

       n_pk(t) = sum_{s != k} S_ps M_ps(t) w_s(t) = total_p(t) - m_pk(t) ,

   with the LFD light curves w_s(t) as written by the flux solve; the LFD sky terms are not
   subtracted (the CPM models the background, §3.2).
2. **CPM of the neighbour-subtracted pixels** (Hattori et al. §2-3, eqs. 7-8, train-and-test §2.3):
   every pixel ``f_p - n_pk`` is de-trended with the CPM whose predictors, QUALITY mask,
   background, median and scale come from the raw cube (:func:`workflow_lib.cpm.model.cpm_detrend_subtracted`).
   The held-out prediction is linear in the target series, so
   ``CPM(f_p - n_pk) = CPM(f_p) - n_pk + s_p m_sys(n_pk / s_p)``: all the series of a pixel (one per
   target whose aperture holds it) share one factorisation of ``X^T X + Λ`` and the Woodbury blocks.
3. **Aperture sum** over k's aperture (the CPM set's apertures, :func:`workflow_lib.cpm.apertures.source_apertures`):

       F_k(t) = sum_{p in A_k} CPM(f_p - n_pk)(t) ,    sigma_k(t) = sqrt(sum_{p in A_k} sigma_p(t)^2) .

   The error is the pixels' (as for the CPM aperture); the noise of the subtracted LFD fluxes is
   not propagated.

4. **The star's total flux** (the ``weighting`` setting):

   * ``sum`` with ``flux_fraction_correction`` (the analogue of SPOC's FLFRCSAP): the sum holds only the part
     of the target's light in its aperture, ``phi_k = sum_{p in A_k} S_pk`` of its LFD model (mean-frame scene
     matrix, the same pixels as the sum), so ``F_k`` and ``sigma_k`` are divided by ``phi_k``. A constant:
     relative signals and relative CDPP are unchanged;
   * ``optimal``: the de-trended pixels are combined with Naylor's (1998) optimal weights instead of summed,
     ``F_k = sum_p W_p CPM(f_p - n_pk)``, ``W_p = (S_pk / V_p) / sum_q (S_qk^2 / V_q)`` with ``V_p`` the
     pixel's variance (:func:`optimal_weights`), ``sigma_k^2 = sum_p W_p^2 sigma_p^2``: unbiased for the
     star's total flux and of minimum variance, as PSF photometry weights its pixels.

   Apertures without an LFD model of their own, or with ``phi_k`` below ``MIN_FLUX_FRACTION``, stay plain
   aperture sums (coord ``total_flux`` False); ``aperture_flux_fraction`` records ``phi_k``.

Two choices beyond that, both switchable (``deblend`` config section):

* **sky level** (``subtract_background``): the per-pixel median over the good cadences of the LFD sky
  ``B b_t`` (eq. 25's background terms, :func:`workflow_lib.lfd.scene.sky_pixel_model`;
  :func:`sky_level`) is subtracted with the neighbours, so that the aperture holds the target's light
  only and relative signals (transit depths, amplitudes) are not diluted by the sky level, which the
  CPM aperture keeps (the CPM removes the sky's *variations*, not its level). A constant per pixel
  adds no noise: with the unregularised intercept ``CPM(f - c) = CPM(f) - c``; the sky's variations
  (scattered light) stay with the CPM's predictors, whereas the per-cadence LFD sky would add the
  noise of its plane fit (x the aperture's pixels: +0.6 % CDPP on a 40x40 synthetic sector);
* **faint neighbours** (``faint_neighbour_snr``, ``faint_neighbour_window_days``): subtracting a
  neighbour's per-cadence LFD flux adds that flux's estimation noise to the target (a faint star half
  inside the target's aperture makes the split of their summed light noisy). A neighbour whose median
  per-cadence S/N ``median |w_s| / median sigma_s`` is below the threshold enters with its running
  median over the window instead (:func:`denoised_neighbour_flux`): its slow variability is still
  removed, its white noise (reduced by the square root of the window's cadences) is not added.

Apertures that are not catalog sources (user ``target_aperture``, source_id < 0) have no own LFD
model: every source's model is subtracted from them.

Cubes the CPM cannot model (:class:`workflow_lib.cpm.model.CPMNotApplicable`: a target-pixel-file stamp
smaller than the CPM's exclusion square has no distant predictor pixels; a file shorter than the k
train-and-test sections). With ``on_unmodellable='skip'`` (the step passes ``cpm.on_unmodellable``) step 2
is left out: the set holds the deblended, *not* de-trended light curves (``F_j = f_p - n_pk - b``,
:func:`workflow_lib.cpm.model.subtracted_without_cpm`), attribute ``detrended`` 0 and ``cpm_not_applied``
the reason; steps 1, 3 and 4 are unchanged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict

import numpy as np
import scipy.sparse as sp
import xarray as xr

from workflow_lib.core.linalg import MAD_TO_SIGMA
from workflow_lib.core.logs import get_logger
from workflow_lib.cpm.apertures import ApertureParams, source_apertures
from workflow_lib.cpm.model import (
    CPMNotApplicable,
    CPMParams,
    cpm_detrend_subtracted,
    skip_unmodellable,
    subtracted_without_cpm,
)
from workflow_lib.data.cube import as_pixel_table
from workflow_lib.data.lightcurves import lightcurve_set
from workflow_lib.lfd.scene import pair_entries, source_pixel_model

log = get_logger("deblend")

#: the ``method`` attribute (and FITS METHOD keyword) of the product
METHOD = "LFD+CPM"
#: smallest fraction of a target's modelled light in its aperture that the flux-fraction correction divides by
MIN_FLUX_FRACTION = 0.05
#: light-curve sets carried along as extra (source, time) variables ``<name>_flux``, ``<name>_flux_err``
REFERENCE_SETS = ("lfd", "cpm", "raw")


def aperture_pairs(apertures, target_column):
    """Flatten the apertures into (pixel, target) pairs: ``pixel``, ``aperture`` (index of the
    aperture) and ``source`` (the target's column of the LFD scene matrix, -1 without one)."""
    sizes = np.array([a.size for a in apertures], dtype=np.int64)
    pixel = np.concatenate(apertures).astype(np.int64) if apertures else np.zeros(0, np.int64)
    aperture = np.repeat(np.arange(len(apertures)), sizes)
    source = np.asarray(target_column, np.int64)[aperture] if apertures else np.zeros(0, np.int64)
    return pixel, aperture, source


def _cadences(time, days: float) -> int:
    """Number of cadences (>= 1) spanning ``days`` at the median cadence of ``time`` [d]."""
    dt = np.nanmedian(np.diff(time)) if time.size > 1 else 1.0
    return max(1, int(round(days / dt))) if np.isfinite(dt) and dt > 0 else 1


def _running_median(time, flux, window_days: float) -> np.ndarray:
    """Running median of each row of ``flux`` (nsource, ntime) over ``window_days`` (in cadence order,
    NaN-aware: gaps filled with the row's median for the filter, NaN kept where the input is NaN)."""
    from scipy.ndimage import median_filter

    win = _cadences(time, window_days) | 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(flux, axis=1, keepdims=True)
    filled = np.where(np.isfinite(flux), flux, np.nan_to_num(med))
    return np.where(np.isfinite(flux), median_filter(filled, size=(1, win), mode="nearest"), np.nan)


def short_variability(time, flux, *, window_days: float, box_hours=(1.0, 3.0, 9.0)) -> np.ndarray:
    """Per source, the significance of its largest short-timescale excursion: the residual from the
    running median over ``window_days`` averaged in boxes of each duration in ``box_hours`` (eclipses,
    transits, flares and short-period variability last hours), in units of its white-noise error
    ``s / sqrt(w)`` (``s`` the residual's robust scatter, 1.4826 MAD; ``w`` cadences per box). Pure
    white noise gives ~4 over a sector (the largest of ~10^3 boxes); a 6-sigma eclipse gives ~6. Returns
    (nsource,); NaN for a source without finite fluxes."""
    from scipy.ndimage import uniform_filter1d

    flux = np.asarray(flux, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    fin = np.isfinite(flux)
    resid = np.where(fin, flux - _running_median(time, flux, window_days), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = np.where(fin, resid, np.nan)
        scatter = MAD_TO_SIGMA * np.nanmedian(np.abs(r - np.nanmedian(r, axis=1, keepdims=True)), axis=1)
    best = np.zeros(flux.shape[0])
    for hours in box_hours:
        w = _cadences(time, hours / 24.0)
        m = uniform_filter1d(resid, w, axis=1, mode="constant")
        n = uniform_filter1d(fin.astype(float), w, axis=1, mode="constant")  # the box's finite fraction
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.abs(m) * np.sqrt(w) / scatter[:, None] / np.sqrt(np.maximum(n, 1.0 / w))
        best = np.fmax(best, np.nanmax(np.where(n > 0.5, z, np.nan), axis=1, initial=0.0))
    best[~fin.any(axis=1) | ~(scatter > 0)] = np.nan
    return best


def denoised_neighbour_flux(
    time, flux, flux_err, *, min_snr: float, window_days: float, variability_sigma: float = 0.0, blended=None
):
    """LFD fluxes (nsource, ntime) as the neighbour model uses them: a source enters with its running
    median over ``window_days`` instead of its per-cadence flux when

    * its median per-cadence S/N ``median |w| / median sigma`` is below ``min_snr`` (its per-cadence noise
      would be added to the target), or
    * ``variability_sigma`` > 0 and it shows no short-timescale variability (:func:`short_variability`
      below ``variability_sigma``): the running median already holds all the light there is to subtract,
      and its per-cadence noise is not added either. Variable neighbours (eclipses, flares) stay per
      cadence, so their variability is still removed from the target;
    * it is one of the LFD solve's blends (``blended``, the LFD set's coordinate: within
      ``lfd.solve.blend_radius`` of a brighter source, App. B): its per-cadence flux was held at its
      mean-frame value within a narrow prior and moves only with the brighter member's model errors,
      which subtracting it would add to the target.

    Returns ``(flux, replaced)``."""
    flux = np.array(flux, dtype=np.float64)
    err = np.asarray(flux_err, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        snr = np.nanmedian(np.abs(flux), axis=1) / np.nanmedian(err, axis=1)
    replaced = ~(snr >= min_snr) if min_snr > 0 else np.zeros(len(flux), bool)
    if variability_sigma > 0:
        replaced |= ~(short_variability(time, flux, window_days=window_days) >= variability_sigma)
    if blended is not None:
        replaced |= np.asarray(blended, bool)
    replaced &= np.isfinite(flux).any(axis=1)
    if replaced.any():
        flux[replaced] = _running_median(time, flux[replaced], window_days)
    return flux, replaced


def sky_level(sky, good=None) -> np.ndarray:
    """The sky level of every pixel: the median over the ``good`` cadences (default all) of a per-cadence
    sky model ``sky`` (ntime, npixel), NaN-skipping; 0 where it has none. Returns (npixel,)."""
    sky = np.asarray(sky, dtype=np.float64)
    if good is not None and np.any(good):
        sky = sky[np.asarray(good, bool)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(np.nanmedian(sky, axis=0)) if sky.shape[0] else np.zeros(sky.shape[1])


def neighbour_models(S, lfd_flux, pixel, source, *, motion_basis=None, motion_time=None):
    """``n_pk(t)`` (ntime, npair): the LFD model of every source but ``source[j]`` at ``pixel[j]``
    (step 1 of the module doc); ``source[j] = -1`` subtracts every source."""
    total, own = source_pixel_model(
        S, lfd_flux, motion_basis=motion_basis, motion_time=motion_time, pair_pixel=pixel, pair_source=source
    )
    return total[:, pixel] - own


def pixel_variance(flux_err, keep) -> np.ndarray:
    """Each pixel's variance for the optimal weights: the median over the kept cadences of ``flux_err**2``
    (``flux_err`` (ntime, npixel); all cadences when none is kept)."""
    e2 = np.asarray(flux_err, dtype=np.float64) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: NaN variance, weight 0
        return np.nanmedian(e2[keep] if np.any(keep) else e2, axis=0)


def optimal_weights(profile, variance) -> np.ndarray | None:
    """Optimal photometry weights (Naylor 1998, eq. 10): ``W_p = (P_p / V_p) / sum_q (P_q^2 / V_q)`` for a star
    of profile ``P`` (its modelled light fraction per pixel) on pixels of variance ``V``: ``sum_p W_p D_p`` is
    the unbiased, minimum-variance estimate of the star's total flux from the pixels ``D_p = F P_p + noise``.
    Pixels with a non-positive or non-finite variance, or a negative profile, get weight 0; None when no
    pixel is left."""
    P = np.clip(np.asarray(profile, dtype=np.float64), 0.0, None)
    V = np.asarray(variance, dtype=np.float64)
    ok = np.isfinite(V) & (V > 0) & np.isfinite(P)
    w = np.zeros(P.size)
    w[ok] = P[ok] / V[ok]
    norm = float(np.sum(w * P))
    return w / norm if norm > 0 else None


def aperture_model_fraction(S, pixel, source) -> np.ndarray:
    """``S[pixel[j], source[j]]`` for every (pixel, target) pair (0 where ``source[j]`` is -1): summed over an
    aperture's pixels, the fraction ``phi_k`` of the target's modelled light inside it (step 4 of the module doc)."""
    S = sp.csr_matrix(S, dtype=np.float64, copy=True)
    S.sum_duplicates()
    S.sort_indices()
    e = pair_entries(S, pixel, source)
    return np.where(e >= 0, S.data[np.maximum(e, 0)], 0.0)


def deblended_lightcurves(
    cube: xr.Dataset,
    catalog,
    S,
    lfd_flux,
    lfd_column_of_source: dict,
    params: CPMParams,
    ap: ApertureParams,
    *,
    motion_basis=None,
    motion_time=None,
    sky=None,
    user_apertures=None,
    threads: int = 1,
    name: str = "cube",
    attrs: dict | None = None,
    flux_fraction_correction: bool = True,
    weighting: str = "optimal",
    on_unmodellable: str = "error",
) -> xr.Dataset:
    """The deblended, de-trended light-curve set (module doc) of every aperture of the CPM set.

    ``S`` (npixel of ``as_pixel_table(cube, drop_nan=False)``, nsource) is the LFD scene matrix,
    ``lfd_flux`` (nsource, ntime) the LFD fluxes of its columns, ``lfd_column_of_source`` maps a
    Gaia source_id to its column of ``S``; ``motion_basis``/``motion_time`` the eq. 24 factors of
    the LFD solve; ``sky`` an optional sky model subtracted too, (ntime, npixel) or a level per pixel
    (npixel,) (module doc: the step passes :func:`sky_level`). Per-source
    extra coords: ``neighbour_flux`` (median over the kept cadences of the subtracted neighbour light in
    the aperture [e-/s]), ``neighbour_fraction`` (that over the median of the aperture sum),
    ``aperture_flux_fraction`` (``phi_k``, step 4 of the module doc; NaN without an own model or below
    ``MIN_FLUX_FRACTION``) and ``total_flux`` (True where ``flux`` is the star's total flux: ``weighting``
    ``optimal``, or ``sum`` divided by ``phi_k`` when ``flux_fraction_correction``)."""
    tab = as_pixel_table(cube, drop_nan=False)
    flux = np.asarray(tab["flux"].transpose("time", "pixel").values, dtype=np.float64)
    ferr = np.asarray(tab["flux_err"].transpose("time", "pixel").values, dtype=np.float64)
    rows, cols = tab["row"].values, tab["column"].values
    apertures, meta = source_apertures(catalog, rows, cols, ap, user_apertures=user_apertures, name=name)
    target_col = [lfd_column_of_source.get(int(s), -1) if s >= 0 else -1 for s in meta["source_id"]]
    pixel, aperture, source = aperture_pairs(apertures, target_col)
    nb = neighbour_models(S, lfd_flux, pixel, source, motion_basis=motion_basis, motion_time=motion_time)
    subtract = nb if sky is None else nb + np.asarray(sky, dtype=np.float64)[..., pixel]
    series_args = (flux, tab["quality"].values, tab["time"].values, rows, cols, params, subtract, pixel)
    mission = cube.attrs.get("mission", "TESS")
    not_applied = ""
    try:
        res = cpm_detrend_subtracted(*series_args, mission=mission, threads=threads, name=name)
    except CPMNotApplicable as exc:
        not_applied = skip_unmodellable(exc, on_unmodellable, "deblended light curves without de-trending")
        res = subtracted_without_cpm(*series_args, mission=mission, name=name)
    if weighting not in ("sum", "optimal"):
        raise ValueError(f"{name}: deblend weighting must be 'sum' or 'optimal', not {weighting!r}")
    ntime = flux.shape[0]
    nap = len(apertures)
    out = np.full((nap, ntime), np.nan)
    err = np.full((nap, ntime), np.nan)
    nbf = np.full(nap, np.nan)
    phi = np.full(nap, np.nan)
    asum = np.full(nap, np.nan)
    total = np.zeros(nap, bool)  # flux is the star's total (weighted or divided by phi), not the aperture sum
    valid = res["valid"][pixel]
    keep = res["keep"]
    own = aperture_model_fraction(S, pixel, source)
    var = pixel_variance(ferr, keep) if weighting == "optimal" else None
    for i in range(nap):
        j = np.flatnonzero((aperture == i) & valid)
        if j.size == 0:
            continue
        series = res["flux"][:, j]
        plain = series.sum(axis=1)
        asum[i] = float(np.median(plain[keep])) if keep.any() else np.nan
        nbf[i] = float(np.median(nb[keep][:, j].sum(axis=1))) if keep.any() else np.nan
        phi_i = float(own[j].sum())
        if source[j[0]] >= 0 and phi_i >= MIN_FLUX_FRACTION:
            phi[i] = phi_i
        w = None
        if var is not None and np.isfinite(phi[i]):
            w = optimal_weights(own[j], var[pixel[j]])
        if w is None and flux_fraction_correction and np.isfinite(phi[i]):
            w = np.full(j.size, 1.0 / phi[i])
        if w is None:
            out[i] = plain
            err[i] = np.sqrt((ferr[:, pixel[j]] ** 2).sum(axis=1))
        else:
            out[i] = series @ w
            err[i] = np.sqrt((ferr[:, pixel[j]] ** 2) @ (w**2))
            total[i] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = nbf / asum
    if total.any():
        log.info(
            "%d of %d apertures on their star's total flux (%s; modelled light fraction in the aperture "
            "median %.3f [%.3f, %.3f])",
            int(total.sum()),
            nap,
            "optimal weights" if weighting == "optimal" else "flux-fraction correction (FLFRCSAP)",
            *np.percentile(phi[total], [50, 16, 84]),
        )
    meta = dict(meta)
    meta["neighbour_flux"] = nbf
    meta["neighbour_fraction"] = frac
    meta["aperture_flux_fraction"] = phi
    meta["total_flux"] = total
    a = {"aperture": json.dumps(asdict(ap)), "cpm_params": json.dumps(asdict(params), sort_keys=True)}
    a["detrended"] = int(not not_applied)
    if not_applied:
        a["cpm_not_applied"] = not_applied
    a.update(attrs or {})
    log.info(
        "deblended, de-trended light curves: %d apertures, %d (pixel, target) series, median neighbour fraction %.3f",
        nap,
        pixel.size,
        float(np.nanmedian(frac)) if np.isfinite(frac).any() else np.nan,
    )
    return lightcurve_set(out, err, cube, meta, method=METHOD, attrs=a)


def with_reference_sets(lc: xr.Dataset, sets: dict) -> xr.Dataset:
    """``lc`` with the light curves of the same sources in other sets as extra variables
    ``<name>_flux`` / ``<name>_flux_err`` (source, time), matched by source_id (user apertures by
    name); NaN where a set lacks the source or a cadence. ``sets``: name -> light-curve set or None."""
    out = lc.copy()
    sids = np.asarray(lc["source_id"].values, np.int64)
    names = lc["aperture_name"].values if "aperture_name" in lc.coords else sids.astype(str)
    keys = [str(n) if s < 0 else str(s) for s, n in zip(sids, names)]
    cad = np.asarray(lc["cadenceno"].values, np.int64)
    for name, ref in sets.items():
        if ref is None:
            continue
        rs = np.asarray(ref["source_id"].values, np.int64)
        rn = ref["aperture_name"].values if "aperture_name" in ref.coords else rs.astype(str)
        rpos = {(str(n) if s < 0 else str(s)): i for i, (s, n) in enumerate(zip(rs, rn))}
        rcad = {int(c): i for i, c in enumerate(np.asarray(ref["cadenceno"].values, np.int64))}
        ti = np.array([rcad.get(int(c), -1) for c in cad])
        for var in ("flux", "flux_err"):
            vals = np.asarray(ref[var].transpose("source", "time").values, np.float64)
            arr = np.full((sids.size, cad.size), np.nan)
            for i, k in enumerate(keys):
                r = rpos.get(k)
                if r is not None:
                    arr[i, ti >= 0] = vals[r, ti[ti >= 0]]
            out[f"{name}_{var}"] = (
                ("source", "time"),
                arr,
                {"units": "electron / s", "long_name": f"{ref.attrs.get('method', name)} {var.replace('_', ' ')}"},
            )
    return out
