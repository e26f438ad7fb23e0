"""The embedded synthetic TESS sector: a crowded 30-min FFI cutout rendered through the real PRF.

:func:`simulate_sector` builds, from a seed and the ``$defs/synthetic`` settings of
``config/schema.yaml``:

* a **scene** of stars down to G = ``mag_max`` with log N(<G) rising 0.35 dex/mag (the slope of
  Galactic star counts at G ~ 12-19), colours ``bp_rp``, proper motions and parallaxes, on a TAN
  WCS of 21"/px; stars up to ``MARGIN_PX`` outside the cutout are included because their PRF
  wings reach it;
* TESS-band fluxes: T from G with the Stassun et al. (2019, AJ 158, 138, eq. 1) colour relation
  plus 0.01 mag scatter; 15000 e-/s at T = 10;
* every star rendered through the **real SPOC PRF** (:mod:`workflow_lib.data.tess_prf`), interpolated
  at its CCD position;
* **systematics**: velocity-aberration drift (quadratic in time, ``drift_px`` in total), pointing
  jitter, pointing excursions at momentum dumps, a scattered-light background that ramps up at
  both ends of each of the two orbits (with a spatial gradient), the mid-sector downlink gap
  (cadences absent), QUALITY flags, photon + read noise with an honest ``flux_err``, dead pixels;
* **signals with known truth**: transiting planets (trapezoids), a KOI-608-like blended eclipsing
  binary (Hedges & Martinez-Palomera 2021, §6.2: an EB on a faint star ~1 px from a star 2 mag
  brighter), a supernova-like transient (Bazin et al. 2009 rise/decline) on a faint source,
  rotators (spot sinusoids) and pulsators (multi-mode sinusoids);
* a **Gaia-like catalog** that differs from the truth as Gaia differs from reality: G-band
  (not TESS-band) fluxes, measurement noise on G and BP-RP, mas-level astrometric errors at
  ref_epoch 2016.0, and a few faint stars missing.

Rendering (fast and exact to spline precision): with a pointing offset ``d(t)`` common to the
whole cutout, the image is ``G(p - d(t))`` where ``G(x) = sum_s F_s P_s(x - x_s)`` is the scene
on the PRF's 9x supersampled grid. ``G`` is built once (each star's PRF shifted to its sub-sample
position by cubic-spline interpolation) and evaluated at the pixel centres shifted by ``d(t)``
with the cubic B-spline (:func:`sample_shifted`); since every pixel shares the same fractional
sub-sample offset this is 16 strided slices per cadence. Cubic-spline interpolation reproduces
constants, so each star's pixel sum equals its flux at every sub-pixel offset. Variable stars
get their own small supersampled patch, weighted by their flux at each cadence.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp
import xarray as xr
from astropy.table import Table

from workflow_lib.core.atomic import atomic_path
from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance_json
from workflow_lib.core.quality import TessQuality
from workflow_lib.core.settings import schema_defaults
from workflow_lib.data import tess_prf
from workflow_lib.data.cube import make_cube, wcs_to_header_string, write_zarr_atomic
from workflow_lib.data.gaia import GAIA_UNITS, tess_mag_from_gaia

log = get_logger("synthetic")

#: TESS zero point: 15000 e-/s at T = 10 (TESS Instrument Handbook; Sullivan et al. 2015)
TESS_ZP_FLUX = 15000.0
TESS_ZP_MAG = 10.0
#: Gaia DR3 G-band zero point: G = GAIA_G_ZP - 2.5 log10(phot_g_mean_flux [e-/s]) (Riello et al. 2021)
GAIA_G_ZP = 25.6874
#: TESS pixel scale [arcsec/px]
PIXEL_SCALE = 21.0
#: stars this far outside the cutout [px] are simulated (PRF half-size 6.5 px + drift)
MARGIN_PX = 7.0
#: slope of log10 N(<G) [dex/mag]
COUNT_SLOPE = 0.35
#: BTJD of the first cadence (TESS Sector 1 started at BTJD 1325.29)
T_START = 1325.3
#: effective exposure fraction of a TESS FFI cadence (0.99 duty cycle x 0.8 cosmic-ray mitigation)
EXPOSURE_FRACTION = 0.792
#: TESS frames are 2-s exposures; 80 % survive cosmic-ray mitigation and are co-added
FRAME_SECONDS = 2.0
#: TESS QUALITY bits used here (named in :mod:`workflow_lib.core.quality`)
Q_EARTH_POINT = int(TessQuality.EARTH_POINT)
Q_DESAT = int(TessQuality.DESAT)
Q_COLLATERAL_COSMIC = int(TessQuality.COLLATERAL_COSMIC)
REF_EPOCH = 2016.0
#: constant stars brighter than this TESS magnitude go on the finest scene grid
BRIGHT_T = 13.0
#: Gaia DR3 source_id base for the simulated fields (HEALPix-like prefix of the pi Men region)
SOURCE_ID_BASE = 4_623_000_000_000_000_000


# ------------------------------------------------------------------ parameters


def default_params() -> dict:
    """The defaults of ``$defs/synthetic`` in the config schema (:func:`workflow_lib.core.settings.schema_defaults`)."""
    return schema_defaults("$defs.synthetic")


def fill_params(params: dict | None) -> dict:
    """``params`` with missing keys taken from :func:`default_params`; unknown keys are an error."""
    out = default_params()
    params = dict(params or {})
    unknown = sorted(set(params) - set(out))
    if unknown:
        raise ValueError(f"unknown synthetic parameter(s) {unknown}; known: {sorted(out)}")
    out.update(params)
    if out["n_rows"] < 8 or out["n_cols"] < 8:
        raise ValueError(f"synthetic cutout must be at least 8x8 px, got {out['n_rows']}x{out['n_cols']}")
    if out["n_cadences"] < 2:
        raise ValueError(f"synthetic n_cadences must be >= 2, got {out['n_cadences']}")
    if out["mag_max"] <= out["mag_min"]:
        raise ValueError(f"synthetic mag_max ({out['mag_max']}) must exceed mag_min ({out['mag_min']})")
    return out


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent random streams (scene, signals, pointing, noise) so each is stable on its own."""
    return np.random.default_rng([int(seed), stream])


# ------------------------------------------------------------------ photometry relations


def tess_flux(tmag):
    """TESS-band flux [e-/s] of a star of magnitude T (15000 e-/s at T = 10)."""
    return TESS_ZP_FLUX * 10 ** (-0.4 * (np.asarray(tmag, float) - TESS_ZP_MAG))


def gaia_flux(gmag):
    """Gaia G-band flux [e-/s]: G = 25.6874 - 2.5 log10(flux)."""
    return 10 ** (-0.4 * (np.asarray(gmag, float) - GAIA_G_ZP))


def sample_magnitudes(rng, n, mag_min, mag_max, slope=COUNT_SLOPE):
    """Magnitudes with dN/dG proportional to 10**(slope G) on [mag_min, mag_max] (inverse CDF)."""
    lo, hi = 10 ** (slope * mag_min), 10 ** (slope * mag_max)
    return np.log10(lo + rng.uniform(size=n) * (hi - lo)) / slope


# ------------------------------------------------------------------ time line, pointing, background


def time_grid(p: dict):
    """Cadence times [BTJD, mid-exposure], cadence numbers and the kept mask (the gap removed).

    ``n_cadences`` cadences are delivered; the gap of ``gap_days`` at mid-sector is extra time.
    """
    dt = p["cadence_minutes"] / 1440.0
    n_gap = int(round(p["gap_days"] / dt))
    n_tot = p["n_cadences"] + n_gap
    k = np.arange(n_tot)
    t = T_START + (k + 0.5) * dt
    keep = np.ones(n_tot, bool)
    g0 = (n_tot - n_gap) // 2
    keep[g0 : g0 + n_gap] = False
    return t, k + 1, keep, (g0, g0 + n_gap)


def velocity_aberration(u):
    """Shape of the smooth drift vs. fractional sector time ``u`` in [0, 1]: zero at mid-sector,
    quadratic, f(1) - f(0) = 1."""
    v = u - 0.5
    return v + 0.8 * v**2


def pointing(p: dict, t_all, keep, dumps_idx, rng):
    """Pointing offsets (row, column) [px] at every cadence of the full time line."""
    u = (t_all - t_all[0]) / (t_all[-1] - t_all[0])
    theta = rng.uniform(0, 2 * np.pi)
    f = velocity_aberration(u) * p["drift_px"]
    drow, dcol = f * np.sin(theta), f * np.cos(theta)
    # jitter: AR(1) (correlation 0.5 between cadences) with rms jitter_px per axis
    jit = np.empty((2, t_all.size))
    e = rng.normal(size=(2, t_all.size))
    jit[:, 0] = e[:, 0]
    a = 0.5
    for i in range(1, t_all.size):
        jit[:, i] = a * jit[:, i - 1] + np.sqrt(1 - a * a) * e[:, i]
    drow = drow + p["jitter_px"] * jit[0]
    dcol = dcol + p["jitter_px"] * jit[1]
    # momentum dumps: the pointing excursion while the wheels are desaturated
    for i in dumps_idx:
        ang = rng.uniform(0, 2 * np.pi)
        amp = 4 * p["jitter_px"] + 0.02
        drow[i] += amp * np.sin(ang)
        dcol[i] += amp * np.cos(ang)
    return drow, dcol, float(theta)


def scattered_light(p: dict, t_all, orbit_edges, rng):
    """Scattered-light ramps (time series) near the start and end of each orbit, peak = amplitude."""
    ramp = np.zeros_like(t_all)
    edges = []
    for ts, te in orbit_edges:
        a_s, a_e = rng.uniform(0.2, 0.6), rng.uniform(0.5, 1.0)
        tau_s, tau_e = rng.uniform(0.3, 0.8), rng.uniform(0.6, 1.5)
        ramp += a_s * np.exp(-(t_all - ts) / tau_s) * (t_all >= ts) + a_e * np.exp(-(te - t_all) / tau_e) * (
            t_all <= te
        )
        edges.append(dict(start=ts, end=te, amp_start=a_s, amp_end=a_e, tau_start=tau_s, tau_end=tau_e))
    peak = ramp.max()
    if peak > 0:
        ramp = ramp / peak
    return p["scattered_light_amplitude"] * ramp, edges


# ------------------------------------------------------------------ signals


def trapezoid(t, t0, period, duration, depth, ingress):
    """Fractional flux loss of a trapezoidal transit/eclipse (total ``duration``, ``ingress`` time)."""
    ph = (t - t0 + 0.5 * period) % period - 0.5 * period
    x = np.abs(ph)
    half = 0.5 * duration
    loss = np.where(x <= half - ingress, 1.0, np.clip((half - x) / ingress, 0, 1))
    return depth * loss


def bazin(t, t0, amplitude, tau_rise, tau_fall):
    """Supernova light curve of Bazin et al. (2009, A&A 499, 653): A e^{-(t-t0)/tf} / (1+e^{-(t-t0)/tr}),
    scaled so the peak equals ``amplitude``."""

    def f(x):
        return np.exp(-x / tau_fall) / (1 + np.exp(-x / tau_rise))

    x = np.asarray(t, float) - t0
    tpk = tau_rise * np.log(tau_fall / tau_rise - 1) if tau_fall > tau_rise else 0.0
    with np.errstate(over="ignore"):
        return amplitude * f(x) / f(tpk)


def _supersampled(fn, t, dt, n_sub=5):
    """Average of ``fn`` over each cadence's exposure (n_sub sub-samples)."""
    off = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    return np.mean([fn(t + o * dt) for o in off], axis=0)


def signal_model(sig: dict, t, dt):
    """Relative flux (multiplicative) or additive flux of one injected signal at times ``t``."""
    kind = sig["kind"]
    if kind in ("planet", "eclipsing_binary"):

        def fn(tt):
            loss = trapezoid(tt, sig["t0"], sig["period"], sig["duration"], sig["depth"], sig["ingress"])
            if kind == "eclipsing_binary":
                loss = loss + trapezoid(
                    tt,
                    sig["t0"] + 0.5 * sig["period"],
                    sig["period"],
                    sig["duration"],
                    sig["secondary_depth"],
                    sig["ingress"],
                )
            return 1 - loss

        return _supersampled(fn, t, dt)
    if kind in ("rotator", "pulsator"):

        def fn(tt):
            out = np.ones_like(tt)
            for per, amp, ph in zip(sig["periods"], sig["amplitudes"], sig["phases"]):
                out = out + amp * np.sin(2 * np.pi * tt / per + ph)
            return out

        return _supersampled(fn, t, dt)
    if kind == "transient":  # additive, e-/s
        return _supersampled(lambda tt: bazin(tt, sig["t0"], sig["amplitude"], sig["tau_rise"], sig["tau_fall"]), t, dt)
    raise ValueError(f"unknown signal kind {kind!r}")


# ------------------------------------------------------------------ rendering


def bspline3_weights(u):
    """Cubic B-spline weights of the 4 coefficients c[i-1..i+2] for fractional offset ``u`` in [0, 1)."""
    u = np.asarray(u, float)
    return np.stack(
        [(1 - u) ** 3 / 6, (3 * u**3 - 6 * u**2 + 4) / 6, (-3 * u**3 + 3 * u**2 + 3 * u + 1) / 6, u**3 / 6], axis=-1
    )


def sample_shifted(coef, n_i, n_j, a0, b0, step=tess_prf.NSAMP):
    """Evaluate the cubic spline with coefficients ``coef`` at coefficient-grid coordinates
    ``(a0 + step*i, b0 + step*j)`` for i < n_i, j < n_j (a0, b0 real; the same fraction for every
    point, so the four B-spline weights per axis are shared).

    Equivalent to ``ndimage.map_coordinates(coef, ..., order=3, prefilter=False)`` away from the
    array edges; coefficients outside the array count as zero.
    """
    fa, fb = np.floor(a0), np.floor(b0)
    wa, wb = bspline3_weights(a0 - fa), bspline3_weights(b0 - fb)
    ri = (int(fa) - 1 + step * np.arange(n_i)[:, None] + np.arange(4)[None, :]).ravel()
    ci = (int(fb) - 1 + step * np.arange(n_j)[:, None] + np.arange(4)[None, :]).ravel()
    na, nb = coef.shape
    if ri[0] < 0 or ci[0] < 0 or ri[-1] >= na or ci[-1] >= nb:
        sub = np.zeros((ri.size, ci.size))
        okr, okc = (ri >= 0) & (ri < na), (ci >= 0) & (ci < nb)
        sub[np.ix_(okr, okc)] = coef[np.ix_(ri[okr], ci[okc])]
    else:
        sub = coef[np.ix_(ri, ci)]
    sub = sub.reshape(n_i, 4, n_j, 4)
    return np.tensordot(np.tensordot(sub, wb, axes=(3, 0)), wa, axes=(1, 0))


def bspline3_matrix(x, n_coef):
    """Sparse (len(x), n_coef) matrix evaluating a cubic spline with ``n_coef`` coefficients at
    coefficient-grid coordinates ``x`` (points whose support leaves the grid are dropped)."""
    x = np.asarray(x, float)
    f = np.floor(x)
    w = bspline3_weights(x - f)
    cols = f.astype(int)[:, None] - 1 + np.arange(4)[None, :]
    rows = np.repeat(np.arange(x.size), 4).reshape(-1, 4)
    ok = (cols >= 0) & (cols < n_coef)
    return sp.csr_matrix((w[ok], (rows[ok], cols[ok])), shape=(x.size, n_coef))


class SceneRenderer:
    """Supersampled scene G of a set of stars (see the module docstring) on pixel-index coordinates.

    Pixel-index coordinates: pixel (i, j) of the cutout has centre (i, j). ``G`` is tabulated on a
    grid covering [-pad, n + pad) px in steps of 1/(9 ``fine``) px: each star's PRF spline is
    evaluated exactly at those points, and the per-cadence images interpolate ``G`` with a cubic
    spline. Re-interpolating the 1/9-px PRF samples directly would change the PRF shape by up to
    0.3 % of its peak depending on the shift (the SPOC PRF is barely sampled at 1/9 px); on the
    ``fine = 4`` grid that error is ~1e-5 of the peak, below the photon noise of a T = 8 star.
    Stars are clipped to the grid, so ``pad`` must exceed the largest pointing offset by 2 px.
    """

    def __init__(self, n_rows, n_cols, pad=3, fine=4):
        self.n_rows, self.n_cols, self.pad, self.fine = n_rows, n_cols, pad, fine
        self.step = tess_prf.NSAMP * fine  # grid points per pixel
        self.grid = np.zeros(((n_rows + 2 * pad) * self.step, (n_cols + 2 * pad) * self.step))
        self._coef = None

    def _axis(self, pos, n_grid):
        """Grid-index window and PRF-coefficient coordinates of a star at ``pos`` along one axis."""
        s, f = tess_prf.NSAMP, self.fine
        # grid point A is at pixel-index position -pad + A/step; PRF coefficient coordinate there:
        # PRF_CENTER + COEF_PAD + 9 (position - pos)
        q = tess_prf.PRF_CENTER + tess_prf.COEF_PAD - s * (pos + self.pad)
        n_coef = tess_prf.PRF_SIZE + 2 * tess_prf.COEF_PAD
        lo = max(int(np.ceil((1 - q) * f)), 0)
        hi = min(int(np.floor((n_coef - 2 - q) * f)) + 1, n_grid)
        return lo, hi, q + np.arange(lo, hi) / f

    def add_star(self, prf_image, row, col, flux, prf_coef=None):
        """Add a star of ``flux`` at pixel-index position (row, col) with supersampled PRF
        ``prf_image`` (or its :func:`tess_prf.prf_coefficients` ``prf_coef``)."""
        if prf_coef is None:
            prf_coef = tess_prf.prf_coefficients(prf_image)
        r0, r1, xr = self._axis(row, self.grid.shape[0])
        c0, c1, xc = self._axis(col, self.grid.shape[1])
        if r1 <= r0 or c1 <= c0:
            return
        n_coef = prf_coef.shape[0]
        wr, wc = bspline3_matrix(xr, n_coef), bspline3_matrix(xc, n_coef)
        patch = wc @ (wr @ prf_coef).T  # (cols, rows)
        self.grid[r0:r1, c0:c1] += flux * patch.T
        self._coef = None

    @property
    def coef(self):
        if self._coef is None:
            self._coef = tess_prf.spline_coefficients(self.grid, tess_prf.COEF_PAD)
        return self._coef

    def image(self, drow=0.0, dcol=0.0):
        """The cutout image with every star displaced by (drow, dcol) px."""
        s, o = self.step, tess_prf.COEF_PAD
        return sample_shifted(
            self.coef, self.n_rows, self.n_cols, o + s * (self.pad - drow), o + s * (self.pad - dcol), step=s
        )


def star_image(prf_coef, row, col, i0, j0, n_i, n_j):
    """Exact unit-flux image of one star at pixel-index (row, col) on pixels i0.. i0+n_i-1,
    j0.. j0+n_j-1 (the PRF spline evaluated at pixel centre - star)."""
    s, o = tess_prf.NSAMP, tess_prf.PRF_CENTER + tess_prf.COEF_PAD
    return sample_shifted(prf_coef, n_i, n_j, o + s * (i0 - row), o + s * (j0 - col), step=s)


def _add_clipped(img, patch, i0, j0):
    n_i, n_j = img.shape
    a0, b0 = max(i0, 0), max(j0, 0)
    a1, b1 = min(i0 + patch.shape[0], n_i), min(j0 + patch.shape[1], n_j)
    if a1 > a0 and b1 > b0:
        img[a0:a1, b0:b1] += patch[a0 - i0 : a1 - i0, b0 - j0 : b1 - j0]


# ------------------------------------------------------------------ WCS


def make_wcs(p: dict, rng=None):
    """TAN WCS at 21"/px centred on (ra, dec) at the cutout centre; 0-based (column, row) index input."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [p["ra"], p["dec"]]
    w.wcs.crpix = [(p["n_cols"] - 1) / 2 + 1, (p["n_rows"] - 1) / 2 + 1]
    rot = np.deg2rad(rng.uniform(0, 360) if rng is not None else 0.0)
    scale = PIXEL_SCALE / 3600.0
    w.wcs.cd = scale * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


# ------------------------------------------------------------------ the scene


def _make_scene(p, rng):
    """Star list (dict of arrays) in pixel-index coordinates at mid-sector."""
    nr, nc = p["n_rows"], p["n_cols"]
    area = (nr + 2 * MARGIN_PX) * (nc + 2 * MARGIN_PX)
    n = rng.poisson(p["stars_per_sq_pixel"] * area)
    stars = {
        "row": rng.uniform(-MARGIN_PX - 0.5, nr - 0.5 + MARGIN_PX, n),
        "col": rng.uniform(-MARGIN_PX - 0.5, nc - 0.5 + MARGIN_PX, n),
        "gmag": sample_magnitudes(rng, n, p["mag_min"], p["mag_max"]),
    }
    return stars


def _append(stars, **vals):
    for k in stars:
        stars[k] = np.append(stars[k], vals[k])
    return len(stars["row"]) - 1


def _inside(stars, idx, p, edge):
    r, c = stars["row"][idx], stars["col"][idx]
    return (r >= edge) & (r <= p["n_rows"] - 1 - edge) & (c >= edge) & (c <= p["n_cols"] - 1 - edge)


def _momentum_dumps(p: dict, t_all, keep, dt) -> list[int]:
    """Indices (full time line) of the kept cadences at the momentum dumps, every ``momentum_dump_days``."""
    n_all = t_all.size
    dump_times = np.arange(T_START + p["momentum_dump_days"], t_all[-1] + 0.5 * dt, p["momentum_dump_days"])
    return sorted({int(i) for i in np.round((dump_times - t_all[0]) / dt) if 0 <= i < n_all and keep[int(i)]})


def _quality_flags(n_all: int, keep, dumps_idx, g0: int, g1: int):
    """QUALITY of the full time line: desaturation at each dump (collateral cosmic on the next cadence),
    Earth point on the cadences bordering the downlink gap and the sector ends."""
    quality_all = np.zeros(n_all, np.int32)
    for i in dumps_idx:
        quality_all[i] |= Q_DESAT
        if i + 1 < n_all:
            quality_all[i + 1] |= Q_COLLATERAL_COSMIC
    for i in (0, g0 - 1, g1, n_all - 1):
        if 0 <= i < n_all and keep[i]:
            quality_all[i] |= Q_EARTH_POINT
    return quality_all


def _timeline(p: dict, rng) -> SimpleNamespace:
    """The sector's time line and systematics (every draw from the pointing stream ``rng``).

    ``t``, ``cadno``, ``quality``, ``drow``, ``dcol``, ``sl`` are at the delivered cadences; ``t_all``,
    ``dumps_idx``, ``g0``/``g1`` (the gap) describe the full time line; ``grad`` is the fractional change
    of the scattered light across the cutout (row, column).
    """
    t_all, cadno_all, keep, (g0, g1) = time_grid(p)
    dt = p["cadence_minutes"] / 1440.0
    n_all = t_all.size
    if g1 > g0:
        orbit_edges = [(t_all[0] - 0.5 * dt, t_all[g0] - 0.5 * dt), (t_all[g1 - 1] + 0.5 * dt, t_all[-1] + 0.5 * dt)]
    else:
        orbit_edges = [(t_all[0] - 0.5 * dt, t_all[-1] + 0.5 * dt)]
    dumps_idx = _momentum_dumps(p, t_all, keep, dt)
    quality_all = _quality_flags(n_all, keep, dumps_idx, g0, g1)
    drow_all, dcol_all, drift_angle = pointing(p, t_all, keep, dumps_idx, rng)
    sl_all, sl_edges = scattered_light(p, t_all, orbit_edges, rng)
    grad = rng.uniform(-0.3, 0.3, 2)
    return SimpleNamespace(
        dt=dt,
        t=t_all[keep],
        cadno=cadno_all[keep],
        quality=quality_all[keep],
        drow=drow_all[keep],
        dcol=dcol_all[keep],
        sl=sl_all[keep],
        grad=grad,
        t_all=t_all,
        dumps_idx=dumps_idx,
        g0=g0,
        g1=g1,
        drift_angle=drift_angle,
        sl_edges=sl_edges,
    )


def _pick(stars, used: set, p: dict, rng, lo, hi, edge, prefer_new=False) -> int:
    """An unused star with ``lo <= G <= hi`` at least ``edge`` px inside the cutout (a new one when none is)."""
    nr, nc = p["n_rows"], p["n_cols"]
    idx = np.flatnonzero(
        (stars["gmag"] >= lo) & (stars["gmag"] <= hi) & _inside(stars, np.arange(stars["row"].size), p, edge)
    )
    idx = [i for i in idx if i not in used]
    if idx and not prefer_new:
        i = int(rng.choice(idx))
    else:  # no suitable star: add one
        i = _append(
            stars,
            row=rng.uniform(edge, nr - 1 - edge),
            col=rng.uniform(edge, nc - 1 - edge),
            gmag=rng.uniform(lo, hi),
        )
    used.add(i)
    return i


def _add_koi608(stars, p: dict, rng) -> tuple[int, int]:
    """Add the KOI-608-like pair: a G ~ 14.5 star and, ~1 px away, a star 2 mag fainter (the EB).
    Returns ``(faint, bright)`` star indices."""
    nr, nc = p["n_rows"], p["n_cols"]
    e2 = min(8.0, (min(nr, nc) - 1) / 3)
    ib = _append(
        stars,
        row=rng.uniform(e2, nr - 1 - e2),
        col=rng.uniform(e2, nc - 1 - e2),
        gmag=rng.uniform(14.3, 14.7),
    )
    ang = rng.uniform(0, 2 * np.pi)
    sep = rng.uniform(0.9, 1.1)
    ifnt = _append(
        stars,
        row=stars["row"][ib] + sep * np.sin(ang),
        col=stars["col"][ib] + sep * np.cos(ang),
        gmag=stars["gmag"][ib] + 2.0,
    )
    return ifnt, ib


def _choose_targets(stars, p: dict, rng) -> SimpleNamespace:
    """The stars that get a signal (added to ``stars`` where needed): ``koi`` (faint, bright) or None,
    planet ``hosts``, variables ``var_idx``, the transient's ``sn_host`` or None."""
    used = set()
    koi = None
    nr, nc = p["n_rows"], p["n_cols"]
    edge = min(4.0, (min(nr, nc) - 1) / 4)
    if p["koi608"]:
        koi = _add_koi608(stars, p, rng)
        used.update(koi)
    hosts = []
    for _ in range(p["n_planets"]):
        hosts.append(_pick(stars, used, p, rng, 9.0, 13.5, edge))
    var_idx = [_pick(stars, used, p, rng, 9.5, 16.0, edge) for _ in range(p["n_variables"])]
    sn_host = _pick(stars, used, p, rng, 17.5, 18.8, edge) if p["transient"] else None
    return SimpleNamespace(koi=koi, hosts=hosts, var_idx=var_idx, sn_host=sn_host)


def _source_properties(stars, koi, p: dict, rng, seed: int, tmid: float) -> SimpleNamespace:
    """True colours, TESS magnitudes and fluxes, astrometry at mid-sector and at REF_EPOCH, Gaia source_ids
    and the WCS (every draw from the scene stream ``rng``). Source index = truth source index."""
    from astropy.time import Time

    n = stars["row"].size
    bp_rp = np.clip(rng.normal(1.0, 0.45, n), -0.2, 3.5)
    if koi:
        bp_rp[koi[1]] = 0.8
        bp_rp[koi[0]] = 1.3
    tmag = tess_mag_from_gaia(stars["gmag"], bp_rp) + rng.normal(0, 0.01, n)
    pmra = rng.normal(0, 6.0, n)
    pmdec = rng.normal(0, 6.0, n)
    fast = rng.uniform(size=n) < 0.02
    pmra[fast] += rng.normal(0, 80, fast.sum())
    pmdec[fast] += rng.normal(0, 80, fast.sum())
    parallax = np.abs(rng.lognormal(np.log(0.5), 0.8, n))
    wcs = make_wcs(p, rng)
    ra_mid, dec_mid = wcs.all_pix2world(stars["col"], stars["row"], 0)
    epoch_mid = float(Time(tmid + 2457000.0, format="jd", scale="tdb").jyear)
    dyr = epoch_mid - REF_EPOCH
    dec_ref = dec_mid - pmdec * dyr / 3.6e6
    ra_ref = (ra_mid - pmra * dyr / 3.6e6 / np.cos(np.deg2rad(dec_mid))) % 360.0
    source_id = SOURCE_ID_BASE + (seed % 1000) * 1_000_000_000 + np.sort(rng.choice(10**9, n, replace=False))
    return SimpleNamespace(
        n=n,
        bp_rp=bp_rp,
        tmag=tmag,
        flux0=tess_flux(tmag),
        pmra=pmra,
        pmdec=pmdec,
        parallax=parallax,
        wcs=wcs,
        ra_mid=ra_mid,
        dec_mid=dec_mid,
        epoch_mid=epoch_mid,
        ra_ref=ra_ref,
        dec_ref=dec_ref,
        source_id=source_id.astype(np.int64),
        row_ccd=p["corner_row"] + stars["row"],
        col_ccd=p["corner_col"] + stars["col"],
    )


# ------------------------------------------------------------------ the signals


def _n_events(t, t0, period, dur) -> int:
    """Number of distinct transits of (t0, period, duration) with a cadence inside them."""
    ph = (t - t0 + 0.5 * period) % period - 0.5 * period
    return len(np.unique(np.round((t[np.abs(ph) < dur / 2] - t0) / period)))


def _planet_signal(t, rng) -> dict:
    """A transiting planet with at least two transits in ``t`` (up to 50 draws)."""
    span = t[-1] - t[0]
    for _ in range(50):
        period = rng.uniform(1.2, max(1.3, span / 2.5))
        dur = min(rng.uniform(1.5, 4.0) / 24, 0.1 * period)
        t0 = t[0] + rng.uniform(0, period)
        if _n_events(t, t0, period, dur) >= 2:
            break
    return dict(
        kind="planet", period=period, t0=t0, duration=dur, depth=float(rng.uniform(0.004, 0.02)), ingress=0.15 * dur
    )


def _koi608_signal(t, blended_with: int, rng) -> dict:
    """The KOI-608-like eclipsing binary on the faint star (40 % primary, 15 % secondary eclipse)."""
    span = t[-1] - t[0]
    period = rng.uniform(2.0, max(2.1, min(5.0, span / 2.5)))
    dur = min(3.0 / 24, 0.1 * period)
    return dict(
        kind="eclipsing_binary",
        period=period,
        t0=float(t[0] + rng.uniform(0, period)),
        duration=dur,
        depth=0.4,
        secondary_depth=0.15,
        ingress=0.3 * dur,
        blended_with=blended_with,
    )


def _variable_signal(rotator: bool, rng) -> dict:
    """A spotted rotator (period and its first harmonic) or a multi-mode pulsator."""
    if rotator:
        per0 = rng.uniform(1.0, 12.0)
        sig = dict(
            kind="rotator",
            periods=[per0, per0 / 2],
            amplitudes=[float(rng.uniform(0.003, 0.03)), 0.0],
            phases=rng.uniform(0, 2 * np.pi, 2).tolist(),
        )
        sig["amplitudes"][1] = float(rng.uniform(0.1, 0.4) * sig["amplitudes"][0])
        return sig
    nm = int(rng.integers(1, 4))
    return dict(
        kind="pulsator",
        periods=rng.uniform(0.04, 0.4, nm).tolist(),
        amplitudes=rng.uniform(0.001, 0.01, nm).tolist(),
        phases=rng.uniform(0, 2 * np.pi, nm).tolist(),
    )


def _transient_signal(t, rng) -> dict:
    """A supernova-like transient (Bazin rise/decline) peaking at T ~ 13.5-14.5."""
    span = t[-1] - t[0]
    return dict(
        kind="transient",
        t0=float(t[0] + rng.uniform(0.1, 0.4) * span),
        amplitude=float(tess_flux(rng.uniform(13.5, 14.5))),
        tau_rise=float(rng.uniform(0.8, 2.0)),
        tau_fall=float(rng.uniform(5.0, 12.0)),
    )


def _inject_signals(t, dt, src: SimpleNamespace, targets: SimpleNamespace, rng):
    """True flux per source per cadence, the kind of each source and the list of signals (with their
    source_id), from the signal stream ``rng``: planets, the KOI-608 binary, variables, the transient."""
    flux_true = np.repeat(src.flux0[:, None], t.size, axis=1)
    kinds = np.array(["constant"] * src.n, dtype=object)
    signals = []

    def inject(i, sig, additive=False):
        if additive:
            flux_true[i] += signal_model(sig, t, dt)
        else:
            flux_true[i] *= signal_model(sig, t, dt)
        kinds[i] = sig["kind"]
        signals.append(dict(source_id=int(src.source_id[i]), **sig))

    for i in targets.hosts:
        inject(i, _planet_signal(t, rng))
    if targets.koi:
        ifnt, ib = targets.koi
        inject(ifnt, _koi608_signal(t, int(src.source_id[ib]), rng))
    n_rot = (len(targets.var_idx) + 1) // 2
    for k, i in enumerate(targets.var_idx):
        inject(i, _variable_signal(k < n_rot, rng))
    if targets.sn_host is not None:
        inject(targets.sn_host, _transient_signal(t, rng), additive=True)
    return flux_true, kinds, signals


# ------------------------------------------------------------------ rendering, noise


def _render(p: dict, stars, src: SimpleNamespace, kinds, flux_true, tl: SimpleNamespace, grid=None):
    """Noiseless model cube (time, row, column): every star through the SPOC PRF at its CCD position,
    shifted by the pointing offsets, plus sky and scattered light. Returns ``(model, prf_grid)``.
    ``grid``: the SPOC PRF grid (:class:`tess_prf.PRFGrid`; default the packaged 3x3 grid)."""
    nr, nc = p["n_rows"], p["n_cols"]
    drow, dcol = tl.drow, tl.dcol
    grid = tess_prf.load_prf_grid() if grid is None else grid
    pad = int(np.ceil(max(np.abs(drow).max(), np.abs(dcol).max()))) + 2
    # constant stars: bright ones on a 1/36-px scene grid, faint ones on a 1/18-px grid (the
    # re-interpolation error, ~1e-5 / 1.4e-4 of a star's peak, stays well below its photon noise)
    bright_scene = SceneRenderer(nr, nc, pad=pad, fine=4)
    faint_scene = SceneRenderer(nr, nc, pad=pad, fine=2)
    variable = np.flatnonzero(kinds != "constant")
    half = 8
    patches = []
    for i in range(src.n):
        coef = tess_prf.prf_coefficients_at(src.row_ccd[i], src.col_ccd[i], grid)
        if kinds[i] == "constant":
            target = bright_scene if src.tmag[i] < BRIGHT_T else faint_scene
            target.add_star(None, stars["row"][i], stars["col"][i], src.flux0[i], prf_coef=coef)
        else:
            patches.append((i, coef, int(np.round(stars["row"][i])) - half, int(np.round(stars["col"][i])) - half))
    nt = tl.t.size
    model = np.empty((nt, nr, nc))
    for k in range(nt):
        img = bright_scene.image(drow[k], dcol[k]) + faint_scene.image(drow[k], dcol[k])
        for i, coef, i0, j0 in patches:
            stamp = star_image(
                coef, stars["row"][i] + drow[k], stars["col"][i] + dcol[k], i0, j0, 2 * half + 1, 2 * half + 1
            )
            _add_clipped(img, flux_true[i, k] * stamp, i0, j0)
        model[k] = img
    # background: sky level + scattered light with a linear gradient across the cutout
    yy = (np.arange(nr) - (nr - 1) / 2) / nr
    xx = (np.arange(nc) - (nc - 1) / 2) / nc
    shape = 1 + tl.grad[0] * yy[:, None] + tl.grad[1] * xx[None, :]
    bkg = p["background_level"] + tl.sl[:, None, None] * shape[None]
    model += bkg
    log.info("rendered %d stars (%d variable) in %d cadences", src.n, variable.size, nt)
    return model, grid


def _add_noise(model, p: dict, rng):
    """Photon (Gaussian approximation to Poisson) + read noise with an honest ``flux_err``, and dead pixels
    (NaN). Returns ``(flux, flux_err, bad_rc, t_exp)``."""
    nr, nc = p["n_rows"], p["n_cols"]
    cad_s = p["cadence_minutes"] * 60.0
    t_exp = EXPOSURE_FRACTION * cad_s
    n_reads = 0.8 * cad_s / FRAME_SECONDS
    var_e = np.clip(model, 0, None) * t_exp + n_reads * p["read_noise"] ** 2
    flux_err = np.sqrt(var_e) / t_exp
    flux = model + flux_err * rng.standard_normal(model.shape)
    bad = rng.choice(nr * nc, size=min(p["n_bad_pixels"], nr * nc), replace=False)
    bad_rc = np.unravel_index(bad, (nr, nc))
    flux[:, bad_rc[0], bad_rc[1]] = np.nan
    flux_err[:, bad_rc[0], bad_rc[1]] = np.nan
    return flux, flux_err, bad_rc, t_exp


# ------------------------------------------------------------------ the Gaia-like catalog and the truth


def _gaia_catalog(stars, src: SimpleNamespace, kinds, rng, field: str, seed: int):
    """The Gaia-like input catalog (G-band, noisy photometry and astrometry at REF_EPOCH, ~3 % of the
    faint constant stars missing), sorted by catalog G. Returns ``(catalog, in_catalog mask)``."""
    n = src.n
    gmag = stars["gmag"]
    sig_g = 0.0003 + 0.004 * 10 ** (0.4 * (gmag - 19.0))
    g_cat = gmag + rng.normal(0, 1, n) * sig_g
    bprp_cat = src.bp_rp + rng.normal(0, 1, n) * (0.003 + 0.03 * 10 ** (0.4 * (gmag - 19.0)))
    sig_pos = 0.3 + 2.0 * 10 ** (0.2 * (gmag - 19.0))  # mas
    cosd = np.cos(np.deg2rad(src.dec_ref))
    ra_cat = (src.ra_ref + rng.normal(0, 1, n) * sig_pos / 3.6e6 / cosd) % 360.0
    dec_cat = src.dec_ref + rng.normal(0, 1, n) * sig_pos / 3.6e6
    pm_err = 0.02 + 0.5 * 10 ** (0.2 * (gmag - 19.0))
    pmra_cat = src.pmra + rng.normal(0, 1, n) * pm_err
    pmdec_cat = src.pmdec + rng.normal(0, 1, n) * pm_err
    plx_cat = src.parallax + rng.normal(0, 1, n) * pm_err
    faint = np.flatnonzero((gmag > 18.0) & (kinds == "constant"))
    n_miss = min(faint.size, max(1, int(round(0.03 * faint.size)))) if faint.size else 0
    missing = rng.choice(faint, n_miss, replace=False) if n_miss else np.array([], int)
    in_cat = np.ones(n, bool)
    in_cat[missing] = False
    order = np.argsort(g_cat[in_cat], kind="stable")
    sel = np.flatnonzero(in_cat)[order]
    catalog = Table()
    catalog["source_id"] = src.source_id[sel]
    catalog["ra"] = ra_cat[sel]
    catalog["dec"] = dec_cat[sel]
    catalog["pmra"] = pmra_cat[sel]
    catalog["pmdec"] = pmdec_cat[sel]
    catalog["parallax"] = plx_cat[sel]
    catalog["phot_g_mean_flux"] = gaia_flux(g_cat[sel])
    catalog["phot_g_mean_mag"] = g_cat[sel]
    catalog["bp_rp"] = bprp_cat[sel]
    catalog["ref_epoch"] = np.full(sel.size, REF_EPOCH)
    for col, unit in GAIA_UNITS.items():
        catalog[col].unit = unit
    catalog.meta.update(
        description="Gaia-like input catalog of a synthetic TESS field (Gaia DR3 column names)",
        field=field,
        seed=seed,
        ref_epoch=REF_EPOCH,
    )
    return catalog, in_cat


def _truth_coords(stars, src: SimpleNamespace, kinds, in_cat, tl: SimpleNamespace, time_attrs: dict) -> dict:
    """Coordinates of the truth dataset: time, cadenceno and every per-source quantity."""
    ra_mid, dec_mid, epoch_mid = src.ra_mid, src.dec_mid, src.epoch_mid
    return {
        "time": ("time", tl.t, time_attrs),
        "cadenceno": ("time", tl.cadno.astype(np.int64)),
        "source_id": ("source", src.source_id),
        "ra": ("source", src.ra_ref, {"units": "deg", "epoch": REF_EPOCH}),
        "dec": ("source", src.dec_ref, {"units": "deg", "epoch": REF_EPOCH}),
        "ra_mid": ("source", np.asarray(ra_mid) % 360.0, {"units": "deg", "epoch": epoch_mid}),
        "dec_mid": ("source", np.asarray(dec_mid), {"units": "deg", "epoch": epoch_mid}),
        "pmra": ("source", src.pmra, {"units": "mas / yr"}),
        "pmdec": ("source", src.pmdec, {"units": "mas / yr"}),
        "parallax": ("source", src.parallax, {"units": "mas"}),
        "phot_g_mean_mag": ("source", stars["gmag"]),
        "bp_rp": ("source", src.bp_rp),
        "tmag": ("source", src.tmag),
        "flux0": ("source", src.flux0, {"units": "electron / s", "long_name": "TESS-band flux without variability"}),
        "column": ("source", src.col_ccd, {"long_name": "true CCD column at mid-sector (no pointing offset)"}),
        "row": ("source", src.row_ccd, {"long_name": "true CCD row at mid-sector (no pointing offset)"}),
        "kind": ("source", np.array([str(k) for k in kinds], dtype=np.dtypes.StringDType())),
        "in_catalog": ("source", in_cat),
    }


def _truth_dataset(p: dict, coords: dict, flux_true, tl: SimpleNamespace) -> xr.Dataset:
    """The truth's per-cadence variables: true fluxes, pointing offsets, background and its gradient, QUALITY."""
    nr, nc = p["n_rows"], p["n_cols"]
    sl, grad = tl.sl, tl.grad
    return xr.Dataset(
        {
            "flux": (("source", "time"), flux_true, {"units": "electron / s", "long_name": "true TESS-band flux"}),
            "drift_row": (
                "time",
                tl.drow,
                {"units": "pix", "long_name": "pointing offset added to every source's row"},
            ),
            "drift_column": (
                "time",
                tl.dcol,
                {"units": "pix", "long_name": "pointing offset added to every source's column"},
            ),
            "background": (
                "time",
                p["background_level"] + sl,
                {"units": "electron / s", "long_name": "sky background per pixel at the cutout centre"},
            ),
            "background_grad_row": ("time", sl * grad[0] / nr, {"units": "electron / s / pix"}),
            "background_grad_column": ("time", sl * grad[1] / nc, {"units": "electron / s / pix"}),
            "quality": ("time", tl.quality),
        },
        coords=coords,
    )


def _truth_attrs(p: dict, tl: SimpleNamespace, src: SimpleNamespace, koi, signals, wcs_hdr: str, t_exp) -> dict:
    """The truth's attrs beyond those it shares with the cube: WCS, epochs, signals, systematics, KOI-608 ids."""
    t_all, g0, g1 = tl.t_all, tl.g0, tl.g1
    return dict(
        mission="TESS",
        wcs=wcs_hdr,
        ref_epoch=REF_EPOCH,
        obs_epoch=src.epoch_mid,
        time_system="BTJD",
        time_offset=2457000.0,
        signals=json.dumps(signals, default=float),
        drift_angle_rad=tl.drift_angle,
        drift_px=float(p["drift_px"]),
        momentum_dumps=json.dumps([float(t_all[i]) for i in tl.dumps_idx]),
        gap=json.dumps([float(t_all[g0]) if g1 > g0 else None, float(t_all[g1 - 1]) if g1 > g0 else None]),
        scattered_light=json.dumps(tl.sl_edges),
        exposure_s=t_exp,
        koi608_faint=int(src.source_id[koi[0]]) if koi else -1,
        koi608_bright=int(src.source_id[koi[1]]) if koi else -1,
    )


# ------------------------------------------------------------------ the sector


def _cube_of(p: dict, flux, flux_err, tl, src, bad_rc, t_exp: float, field: str, prov: str):
    """The rendered, noisy scene as a TESS cube (``make_cube``), with the attrs every synthetic cube carries.

    Returns ``(cube, common, wcs_header)``: ``common`` are the attrs the truth dataset shares."""
    common = dict(
        sector=int(p["sector"]), camera=int(p["camera"]), ccd=int(p["ccd"]), field=field, provenance=prov, synthetic=1
    )
    wcs_hdr = wcs_to_header_string(src.wcs)
    cube = make_cube(
        flux,
        flux_err,
        tl.quality,
        tl.t,
        tl.cadno,
        p["corner_row"] + np.arange(p["n_rows"]),
        p["corner_col"] + np.arange(p["n_cols"]),
        mission="TESS",
        wcs_header=wcs_hdr,
        attrs=dict(
            common,
            exposure_s=t_exp,
            bad_pixels=json.dumps([[int(p["corner_row"] + r), int(p["corner_col"] + c)] for r, c in zip(*bad_rc)]),
        ),
    )
    return cube, common, wcs_hdr


def simulate_sector(params: dict | None = None, field: str = "synth", *, return_model: bool = False):
    """Simulate one TESS FFI cutout sector.

    Returns ``(cube, truth, catalog)`` (and the noiseless model image cube as a 4th element when
    ``return_model``): the pixel cube (:mod:`workflow_lib.data.cube` format), the truth
    (``docs/DATA_MODEL.md``) and the Gaia-like input catalog (astropy Table, Gaia DR3 columns).
    ``params``: the ``$defs/synthetic`` keys; missing keys take the schema defaults.

    Each random stream (:func:`_rng`) feeds one part: scene -> :func:`_make_scene` and
    :func:`_source_properties`, signals -> :func:`_choose_targets` and :func:`_inject_signals`, pointing ->
    :func:`_timeline`, noise -> :func:`_add_noise`, catalog -> :func:`_gaia_catalog`.
    """
    p = fill_params(params)
    seed = int(p["seed"])
    r_scene, r_sig, r_point, r_noise, r_cat = (_rng(seed, k) for k in range(5))
    nr, nc = p["n_rows"], p["n_cols"]
    log.info("simulating field %s: %dx%d px, %d cadences, seed %d", field, nr, nc, p["n_cadences"], seed)

    tl = _timeline(p, r_point)
    t = tl.t
    stars = _make_scene(p, r_scene)
    targets = _choose_targets(stars, p, r_sig)
    src = _source_properties(stars, targets.koi, p, r_scene, seed, 0.5 * (t[0] + t[-1]))
    flux_true, kinds, signals = _inject_signals(t, tl.dt, src, targets, r_sig)
    model, grid = _render(p, stars, src, kinds, flux_true, tl)
    flux, flux_err, bad_rc, t_exp = _add_noise(model, p, r_noise)

    prov = provenance_json(
        "download_synthetic", inputs=[f"workflow_lib/data/tess_prf/{s}" for s in grid.sources], config=p, field=field
    )
    cube, common, wcs_hdr = _cube_of(p, flux, flux_err, tl, src, bad_rc, t_exp, field, prov)
    catalog, in_cat = _gaia_catalog(stars, src, kinds, r_cat, field, seed)
    coords = _truth_coords(stars, src, kinds, in_cat, tl, dict(cube["time"].attrs))
    truth = _truth_dataset(p, coords, flux_true, tl)
    truth.attrs.update(common)
    truth.attrs.update(_truth_attrs(p, tl, src, targets.koi, signals, wcs_hdr, t_exp))
    if return_model:
        return cube, truth, catalog, model
    return cube, truth, catalog


def write_synthetic_field(out_cube, out_truth, out_catalog, params: dict | None = None, field: str = "synth"):
    """Simulate a sector and write cube.zarr, truth.zarr and the Gaia-like input_catalog.ecsv (atomically)."""
    cube, truth, catalog = simulate_sector(params, field=field)
    write_zarr_atomic(cube, out_cube)
    write_zarr_atomic(truth, out_truth)
    with atomic_path(out_catalog) as tmp:
        catalog.write(tmp, format="ascii.ecsv", overwrite=True)
    log.info("wrote %s, %s, %s (%d catalog sources)", out_cube, out_truth, out_catalog, len(catalog))
    return cube, truth, catalog
