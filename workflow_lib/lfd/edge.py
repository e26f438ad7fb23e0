"""LFD step 1: the edge of the PRF as a function of source flux (Hedges & Martinez-Palomera 2021, §4.2).

The time-averaged image (mean frame) is modelled as a circular PRF whose log pixel flux is a
quadratic polynomial in the radius r from a source and in the log of its a-priori flux (eqs. 5-6):
the 9-column design matrix ``[1, r, r^2] x [1, L, L^2]`` with ``L = log10(F_apriori)``, fitted by
linear least squares (App. B, eq. 7). The *edge* of a source's PRF is the radius at which this
model falls to a count threshold (the paper uses 50 counts for Kepler); pixels inside the edge
radius of exactly one source are *uncontaminated* and are what the PRF shape (§4.3) is fitted to.

Units: pixels for radii (CCD column/row), e-/s for fluxes. All source x pixel quantities are
kept as (source, pixel) pair lists found with a k-d tree, never as dense matrices.

TESS choices (documented in ``config/schema.yaml``):

* threshold = 5 e-/s. Kepler's 50 e-/s is 2.9e-4 of a Kp=12 star (1.74e5 e-/s); 5 e-/s is the
  same fraction (3.3e-4) of a T=10 star (15000 e-/s), and ~15-20x the per-cadence noise of a
  30-min TESS pixel (~0.3 e-/s for ~50 e-/s/px sky and 10 e- read noise per 2-s frame), a
  similar "well above the noise" level as Kepler's.
* sky background: the paper assumes Kepler's ~0. TESS frames keep a sky level (~30-200 e-/s/px
  with a gradient), so the edge model is fitted to the mean frame minus a sigma-clipped
  polynomial sky surface fitted to pixels the predicted scene says are sky
  (:func:`fit_edge_to_frame`, :func:`fit_background_surface`), only on pixels well above the sky
  noise and dominated by one source; the fit is centred in log flux with a prior that lets the
  profile's shape depend only weakly on flux (:func:`fit_edge_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workflow_lib.core.linalg import clip_mask, clipped_fit, robust_sigma, wls
from workflow_lib.core.logs import get_logger
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.lfd.geometry import polynomial_background_design, source_pixel_pairs

log = get_logger("lfd.edge")

__all__ = [
    "edge_params",
    "mean_frame",
    "robust_background",
    "source_pixel_pairs",
    "edge_design_matrix",
    "fit_edge_model",
    "edge_model_flux",
    "edge_radius",
    "uncontaminated_pixels",
    "EdgeModel",
    "a_priori_flux",
    "fit_edge_to_frame",
    "polynomial_background_design",
    "fit_background_surface",
    "gaussian_scene_flux",
]

#: default prior widths of the centred edge-model coefficients (:func:`fit_edge_model`), columns
#: ``1, r, r^2, dL, r dL, r^2 dL, dL^2, r dL^2, r^2 dL^2`` in log10 units: the radial profile is
#: free, its change with source flux (per dex) is allowed but damped
EDGE_PRIOR_SIGMA = np.array([10.0, 10.0, 10.0, 1.0, 0.5, 0.1, 0.3, 0.1, 0.03])


# ------------------------------------------------------------------------------ data helpers


def mean_frame(table, *, good_quality_only: bool = True):
    """Time-averaged flux and its error for every pixel of a pixel table (the paper's mean frame).

    ``table`` is ``cube.as_pixel_table(cube)``. Cadences with QUALITY != 0 are left out when
    ``good_quality_only`` (unless none is left); NaNs are ignored. Returns ``(flux, flux_err)``
    arrays of length npixel (NaN where a pixel has no finite value).
    """
    flux = np.asarray(table["flux"].values, dtype=float)
    err = np.asarray(table["flux_err"].values, dtype=float)
    if good_quality_only and "quality" in table:
        q = np.asarray(table["quality"].values)
        if (q == 0).any():
            flux, err = flux[q == 0], err[q == 0]
    ok = np.isfinite(flux) & np.isfinite(err)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, flux, 0.0).sum(axis=0) / n
        mean_err = np.sqrt(np.where(ok, err**2, 0.0).sum(axis=0)) / n
    mean[n == 0] = np.nan
    mean_err[n == 0] = np.nan
    return mean, mean_err


def robust_background(mean_flux, *, exclude=None, percentile: float = 20.0) -> float:
    """A robust constant sky level [e-/s/px] of the mean frame (the median of the faintest pixels).

    Uses the pixels not flagged in ``exclude`` when at least 20 remain, else all pixels; returns
    the median of the pixels at or below the ``percentile``-th percentile. Kept as a simple
    fallback; :func:`fit_background_surface` is what the edge step uses.
    """
    f = np.asarray(mean_flux, dtype=float)
    use = np.isfinite(f)
    if exclude is not None:
        cand = use & ~np.asarray(exclude, bool)
        if cand.sum() >= 20:
            use = cand
    v = f[use]
    if v.size == 0:
        return 0.0
    cut = np.percentile(v, percentile)
    return float(np.median(v[v <= cut]))


def fit_background_surface(
    mean_flux, design, *, sigma_clip: float, candidates=None, n_iter: int = 10, min_pixels: int = 20
):
    """Robust low-order sky surface of the mean frame: sigma-clipped linear least squares.

    ``design`` (npix, nb) from :func:`polynomial_background_design`; ``candidates`` marks the
    pixels that may be sky (e.g. those the a-priori scene predicts to be far below the edge
    threshold; all finite pixels when None or when fewer than ``min_pixels`` are flagged). The
    surface is refitted ``n_iter`` times, each time keeping the pixels within ``sigma_clip``
    robust standard deviations (1.4826 MAD) below and above it; unresolved faint stars only add
    flux, so the upward tail is clipped. Returns ``(coefficients, surface, rms, used)``: the
    coefficients, the surface at every pixel, the robust scatter of the kept residuals [e-/s]
    and the mask of pixels kept in the last pass.
    """
    f = np.asarray(mean_flux, float)
    X = np.asarray(design, float)
    fin = np.isfinite(f)
    nb = X.shape[1]
    if nb == 0:
        return np.zeros(0), np.zeros(f.size), float("nan"), np.zeros(f.size, bool)
    use = fin.copy()
    if candidates is not None:
        cand = fin & np.asarray(candidates, bool)
        if cand.sum() >= max(min_pixels, 3 * nb):
            use = cand

    def fit(keep):
        coef = wls(X[keep], f[keep], method="lstsq")
        return coef, f - X @ coef

    coef, keep, rms = clipped_fit(
        fit, use, n_sigma=sigma_clip, n_pass=max(int(n_iter), 1), min_keep=max(3 * nb, 5), floor=1e-9, clip_last=True
    )
    return coef, X @ coef, float(rms), keep


def gaussian_scene_flux(
    source_col, source_row, source_flux, pixel_col, pixel_row, *, sigma: float = 1.0, radius: float = 6.0
):
    """Predicted flux per pixel of an a-priori scene: each source a circular Gaussian (``sigma`` px) of its flux.

    Used before any PRF is known (first pass of :func:`fit_edge_to_frame`). Returns ``(image, src,
    pix, predicted)``: the summed image and the per-pair predictions for pairs within ``radius``.
    """
    src, pix, dx, dy = source_pixel_pairs(source_col, source_row, pixel_col, pixel_row, radius)
    F = np.asarray(source_flux, float)
    pred = F[src] * np.exp(-0.5 * (dx**2 + dy**2) / sigma**2) / (2 * np.pi * sigma**2)
    img = np.bincount(pix, weights=pred, minlength=np.asarray(pixel_col).size)
    return img, src, pix, pred


def a_priori_flux(catalog) -> np.ndarray:
    """The a-priori source flux [e-/s] of §4.2: ``expected_flux`` (instrument band) if the catalog has it, else Gaia G flux."""
    names = catalog.colnames if hasattr(catalog, "colnames") else list(catalog)
    col = "expected_flux" if "expected_flux" in names else "phot_g_mean_flux"
    if col not in names:
        raise ValueError("catalog has neither expected_flux nor phot_g_mean_flux")
    return np.asarray(catalog[col], dtype=float)


# ------------------------------------------------------------------------------ the edge model


def edge_design_matrix(r, log_flux) -> np.ndarray:
    """The 9-column design matrix of §4.2 (eqs. 5-6): ``[1, r, r^2] x [1, L, L^2]``.

    Columns, in order: ``1, r, r^2, L, r L, r^2 L, L^2, r L^2, r^2 L^2`` with ``L = log_flux``
    (log10 of the a-priori source flux). One row per (source, pixel) pair.
    """
    r = np.asarray(r, float).ravel()
    L = np.asarray(log_flux, float).ravel()
    if r.shape != L.shape:
        raise ValueError(f"edge_design_matrix: r and log_flux differ in length ({r.size} vs {L.size})")
    R = np.column_stack([np.ones_like(r), r, r**2])
    return np.column_stack([R * L[:, None] ** p for p in range(3)])


def _dominant(pixel_index, predicted, dominance):
    """Pairs whose source gives the largest predicted flux of its pixel, and at least ``dominance`` of the pixel total."""
    pix = np.asarray(pixel_index)
    total = np.bincount(pix, weights=predicted, minlength=pix.max() + 1)
    order = np.lexsort((-predicted, pix))  # per pixel, largest predicted contribution first
    ps = pix[order]
    first = np.zeros(pix.size, bool)
    first[order[np.r_[True, ps[1:] != ps[:-1]]]] = True
    return first & (predicted >= dominance * total[pix])


def fit_edge_model(
    r,
    source_flux,
    pixel_flux,
    *,
    n_iter: int,
    sigma_clip: float,
    dominance: float,
    pixel_index=None,
    prior_sigma=None,
    predicted=None,
    min_pixel_flux: float = 0.0,
    return_range: bool = False,
):
    """Fit the §4.2 circular PRF model to the mean frame; returns the 9 coefficients ``w0`` (eq. 7).

    Model: ``log10(pixel_flux) = A0(r, log10 F) @ w0`` over (source, pixel) pairs with
    (background-subtracted) pixel flux above ``min_pixel_flux`` (pixels near the noise level
    are left out: in log space their scatter is huge and only the upward fluctuations would
    survive), by linear least squares (App. B) with a broad zero-mean Gaussian prior
    (``prior_sigma``) that keeps the solve well conditioned, and ``sigma_clip`` rejection of
    outliers (robust scatter), ``n_iter`` passes.

    Contamination: a pixel near a bright star also pairs with its faint neighbours, which would
    bias the model up. When ``pixel_index`` (the pixel of each pair) is given, each pixel keeps
    only its pair with the largest predicted flux, and only if that source is predicted to give at
    least ``dominance`` of the pixel's predicted total; the prediction is ``predicted`` (per pair,
    e.g. from an earlier fit) or else a unit Gaussian PRF (sigma = 1 px) scaled by the a-priori
    flux at first, and the fitted model in later passes.

    Parametrisation and prior. The coefficients are returned for eq. 7's raw columns, but the fit
    is done in the equivalent centred form ``log10(f / F) = [1, r, r^2] x [1, dL, dL^2] . v`` with
    ``dL = L - L0`` (L0 = median L of the pairs), so that the zero-mean Gaussian prior
    (``prior_sigma``: scalar or 9 values for the columns ``1, r, r^2, dL, r dL, r^2 dL, dL^2, ...``;
    default :data:`EDGE_PRIOR_SIGMA`) says "the profile scales with the flux" and only the data
    can make its shape depend on flux. Without it a field with sources over two decades of flux
    extrapolates the L^2 terms wildly.
    """
    r = np.asarray(r, float)
    F = np.asarray(source_flux, float)
    f = np.asarray(pixel_flux, float)
    if prior_sigma is None:
        prior_sigma = EDGE_PRIOR_SIGMA
    use = np.isfinite(f) & (f > max(min_pixel_flux, 0.0)) & np.isfinite(r) & (F > 0)
    if use.sum() < 9:
        raise ValueError(f"fit_edge_model: only {use.sum()} usable (source, pixel) pairs with positive flux; need >= 9")
    L = np.log10(np.where(F > 0, F, 1.0))
    L0 = float(np.median(L[use]))
    y = np.log10(np.where(use, f, 1.0)) - L
    A = edge_design_matrix(r, L - L0)
    if predicted is None:
        pred = np.where(F > 0, F, 0.0) * np.exp(-0.5 * r**2) / (2 * np.pi)
    else:
        pred = np.asarray(predicted, float)
    keep = use.copy()
    dL = L - L0
    for it in range(max(int(n_iter), 1)):
        ok = use.copy()
        if it > 0:  # the fitted model says the source itself gives more than the floor here
            above = pred > min_pixel_flux
            if (ok & above).sum() >= 9:
                ok &= above
        if pixel_index is not None:
            dom = _dominant(pixel_index, pred, dominance)
            if (ok & dom).sum() >= 9:
                ok &= dom
        keep = ok & keep if it else ok
        if keep.sum() < 9:
            keep = ok
        w = wls(A[keep], y[keep], prior_sigma=prior_sigma)
        res = y - A @ w
        # residuals about zero (not their median), strict inequality: as this fit always did
        keep = ok & clip_mask(res, ok, sigma_clip, floor=1e-6, side="zero", inclusive=False)[0]
        lo, hi = dL[keep].min(), dL[keep].max()
        # prediction for dominance: the profile of the nearest fitted flux, scaled (no extrapolation in L)
        pred = F * 10.0 ** np.clip(edge_design_matrix(r, np.clip(dL, lo, hi)) @ w, -30, 30)
    if keep.sum() < 9:
        keep = use
    w = _uncentre(wls(A[keep], y[keep], prior_sigma=prior_sigma), L0)
    if return_range:
        return w, (float(L[keep].min()), float(L[keep].max()))
    return w


def _uncentre(v, L0: float) -> np.ndarray:
    """Coefficients of eq. 7's raw columns from the centred, flux-relative ones (see :func:`fit_edge_model`).

    Per power k of r: ``a0 + a1 (L - L0) + a2 (L - L0)^2 = (a0 - a1 L0 + a2 L0^2) + (a1 - 2 a2 L0) L + a2 L^2``;
    then ``+ L`` (log10 f = log10(f/F) + L) on the r^0 column.
    """
    v = np.asarray(v, float)
    a0, a1, a2 = v[0:3], v[3:6], v[6:9]
    w = np.concatenate([a0 - a1 * L0 + a2 * L0**2, a1 - 2 * a2 * L0, a2])
    w[3] += 1.0
    return w


def edge_model_flux(coefficients, r, source_flux, *, log_flux_range=None) -> np.ndarray:
    """Model pixel flux [e-/s] of the edge model (eq. 7) at radius ``r`` from a source of flux ``source_flux``.

    ``log_flux_range`` (lo, hi) in log10 e-/s: outside it the model is not extrapolated in flux;
    the profile of the nearest end is scaled by the flux instead. The profile never rises with r: beyond
    the minimum of the quadratic in r (where eq. 7 would turn upwards) it stays at that minimum.
    """
    r, F = np.broadcast_arrays(np.asarray(r, float), np.asarray(source_flux, float))
    L = np.log10(np.clip(F.ravel(), 1e-30, None))
    Lc = L if log_flux_range is None else np.clip(L, *log_flux_range)
    w = np.asarray(coefficients, float)
    # eq. 7 is quadratic in r at fixed L: log10 f = a + b r + c r^2. Where c > 0 it turns upwards at
    # r* = -b / 2c, outside the pixels that constrained it (a faint star's light rising to 3 e-/s at 5 px
    # on a bright sky); a PRF does not rise with r, so the profile is held at its minimum beyond r*
    # b and c at each L from the design's column order (1, r, r^2) x (1, L, L^2)
    _, b, c = (np.vander(Lc, 3, increasing=True) @ w.reshape(3, 3)).T
    with np.errstate(divide="ignore", invalid="ignore"):
        r_turn = np.where(c > 0, np.clip(-b / (2.0 * c), 0.0, None), np.inf)
    A = edge_design_matrix(np.minimum(r.ravel(), r_turn), Lc)
    return (10.0 ** np.clip(A @ w + (L - Lc), -30, 30)).reshape(r.shape)


def edge_radius(
    flux,
    coefficients,
    *,
    threshold: float,
    min_radius: float,
    max_radius: float,
    step: float = 0.01,
    log_flux_range=None,
) -> np.ndarray:
    """Radius [px] at which the edge model of a source of ``flux`` [e-/s] falls to ``threshold`` [e-/s] (§4.2).

    The model is scanned outwards from r = 0 in steps of ``step``; the radius is the first
    crossing below the threshold (linearly interpolated in log flux), clipped to
    [min_radius, max_radius]. Sources whose model never reaches the threshold get ``min_radius``;
    sources still above it at ``max_radius`` get ``max_radius``. ``log_flux_range``: see
    :func:`edge_model_flux`.
    """
    if not (0 < min_radius <= max_radius):
        raise ValueError(f"need 0 < min_radius <= max_radius, got {min_radius}, {max_radius}")
    flux = np.atleast_1d(np.asarray(flux, float))
    grid = np.arange(0.0, max_radius + step, step)
    lt = np.log10(threshold)
    L = np.log10(np.clip(flux, 1e-30, None))
    Lc = L if log_flux_range is None else np.clip(L, *log_flux_range)
    A = edge_design_matrix(np.tile(grid, flux.size), np.repeat(Lc, grid.size))
    m = (A @ np.asarray(coefficients, float)).reshape(flux.size, grid.size) + (L - Lc)[:, None] - lt
    below = m < 0
    out = np.full(flux.size, max_radius)
    for i in range(flux.size):
        idx = np.flatnonzero(below[i])
        if idx.size == 0:
            continue
        j = idx[0]
        if j == 0:
            out[i] = min_radius
            continue
        a, b = m[i, j - 1], m[i, j]
        out[i] = grid[j - 1] + step * a / (a - b)
    out[~np.isfinite(flux) | (flux <= 0)] = min_radius
    return np.clip(out, min_radius, max_radius)


def uncontaminated_pixels(source_col, source_row, pixel_col, pixel_row, radius):
    """Pixels inside the edge radius of exactly one source (§4.2).

    Returns ``(mask, owner)``: a boolean array over pixels (True = uncontaminated) and, per
    pixel, the index of the single source whose edge circle contains it (-1 if none or several).
    """
    npix = np.asarray(pixel_col).size
    src, pix, _, _ = source_pixel_pairs(source_col, source_row, pixel_col, pixel_row, radius)
    count = np.bincount(pix, minlength=npix)
    mask = count == 1
    owner = np.full(npix, -1, dtype=np.int64)
    single = mask[pix]
    owner[pix[single]] = src[single]
    return mask, owner


# ------------------------------------------------------------------------------ pipeline step


@dataclass
class EdgeModel:
    """The fitted §4.2 model: coefficients, the settings used to turn it into edge radii, and the sky.

    ``background`` is the mean sky level [e-/s/px] over the frame; ``background_coefficients``
    the coefficients of the sky surface over :func:`polynomial_background_design` of order
    ``background_order`` (the same columns as :func:`workflow_lib.lfd.geometry.background_design` for the
    same pixels); ``background_rms`` the robust scatter of the sky pixels about it [e-/s].
    """

    coefficients: np.ndarray
    threshold: float
    min_radius: float
    max_radius: float
    background: float = 0.0
    background_coefficients: np.ndarray | None = None
    background_order: int = 0
    background_rms: float = float("nan")
    log_flux_range: tuple | None = None

    def radius(self, flux) -> np.ndarray:
        return edge_radius(
            flux,
            self.coefficients,
            threshold=self.threshold,
            min_radius=self.min_radius,
            max_radius=self.max_radius,
            log_flux_range=self.log_flux_range,
        )

    def flux(self, r, source_flux) -> np.ndarray:
        """Model pixel flux [e-/s] at radius ``r`` from a source of flux ``source_flux`` (no extrapolation in flux)."""
        return edge_model_flux(self.coefficients, r, source_flux, log_flux_range=self.log_flux_range)


def edge_params(params: dict | None) -> dict:
    """The lfd.edge settings: defaults overridden by ``params``."""
    return merge_settings(schema_defaults("lfd.edge"), params, "lfd.edge", ValueError)


def fit_edge_to_frame(mean_flux, pixel_col, pixel_row, source_col, source_row, source_flux, params: dict | None = None):
    """Fit the edge model to a mean frame; returns ``(EdgeModel, radii, uncontaminated mask, owner)``.

    TESS frames carry a sky level (zodiacal light plus scattered light, ~30-200 e-/s/px, with a
    gradient across the cutout) that no constant removes to the 5 e-/s edge threshold. The fit
    therefore alternates ``n_outer`` times between

    1. the sky: a polynomial surface of order ``background_order`` in (column, row) fitted with
       sigma clipping (:func:`fit_background_surface`) to the pixels where the current scene
       prediction (a-priori Gaussian PRFs at first, then the fitted edge model) is below
       ``sky_fraction`` x threshold;
    2. the edge model (:func:`fit_edge_model`) on the pairs within ``search_radius`` of sources
       brighter than ``min_source_flux``, using the mean frame minus the sky, only where the
       predicted scene says one source dominates (``dominance``) and the pixel is more than
       ``noise_sigma`` x the sky scatter above zero.
    """
    p = edge_params(params)
    mean_flux = np.asarray(mean_flux, float)
    pc = np.asarray(pixel_col, float)
    pr = np.asarray(pixel_row, float)
    sc_all = np.asarray(source_col, float)
    sr_all = np.asarray(source_row, float)
    F = np.asarray(source_flux, float)
    bright = np.isfinite(F) & (F >= p["min_source_flux"])
    if not bright.any():
        raise ValueError("fit_edge_to_frame: no source brighter than min_source_flux")
    sc, sr, Fb = sc_all[bright], sr_all[bright], F[bright]
    Bd = polynomial_background_design(pc, pr, int(p["background_order"]))
    img, src, pix, pred = gaussian_scene_flux(sc, sr, Fb, pc, pr, sigma=p["initial_sigma"], radius=p["search_radius"])
    r = np.hypot(pc[pix] - sc[src], pr[pix] - sr[src])
    coeffs = None
    bcoef, bsurf, rms = np.zeros(Bd.shape[1]), np.zeros(pc.size), float("nan")
    for _ in range(max(int(p["n_outer"]), 1)):
        cand = img < p["sky_fraction"] * p["threshold"]
        if Bd.shape[1]:
            bcoef, bsurf, rms, _used = fit_background_surface(
                mean_flux, Bd, candidates=cand, sigma_clip=p["sigma_clip"]
            )
        else:  # no sky terms (background-subtracted pixels): the noise floor from the same sky candidates
            sky = mean_flux[cand][np.isfinite(mean_flux[cand])]
            rms = float(robust_sigma(sky)) if sky.size >= 3 else float("nan")
        fsub = mean_flux - bsurf
        floor = p["noise_sigma"] * rms if np.isfinite(rms) else 0.0
        coeffs, lrange = fit_edge_model(
            r,
            Fb[src],
            fsub[pix],
            n_iter=p["n_iter"],
            sigma_clip=p["sigma_clip"],
            dominance=p["dominance"],
            pixel_index=pix,
            predicted=pred,
            min_pixel_flux=floor,
            return_range=True,
        )
        pred = edge_model_flux(coeffs, r, Fb[src], log_flux_range=lrange)
        img = np.bincount(pix, weights=pred, minlength=pc.size)
    model = EdgeModel(
        coeffs,
        p["threshold"],
        p["min_radius"],
        p["max_radius"],
        float(np.mean(bsurf)),
        np.asarray(bcoef, float),
        int(p["background_order"]),
        float(rms),
        lrange,
    )
    radii = model.radius(np.where(bright, F, 0.0))
    mask, owner = uncontaminated_pixels(sc_all, sr_all, pc, pr, radii)
    log.info(
        "edge model: sky %.2f e-/s (rms %.2f, order %d), %d uncontaminated pixels",
        model.background,
        rms,
        model.background_order,
        mask.sum(),
    )
    return model, radii, mask, owner
