"""psfmachine 1.1.4 on one randomized TESS scene: the third baseline of ``randomized_scenes.py`` (issue 12, T1b).

    /work/venv_psfm/bin/python benchmarks/psfmachine_runner.py scene_in.npz psfm_out.npz

Runs INSIDE psfmachine's own virtual environment (its pins -- numpy < 2, pandas < 2, astropy 5 -- conflict
with the pipeline's), so it imports neither ``workflow_lib`` nor anything of the repository: numpy, astropy,
pandas, photutils and psfmachine only. ``randomized_scenes.py --psfmachine-python PATH`` writes the input,
runs this script with that interpreter and scores the output like its other baselines. The environment::

    /root/.pyenv/versions/3.11.7/bin/python -m venv /work/venv_psfm
    /work/venv_psfm/bin/pip install psfmachine==1.1.4
    # got psfmachine 1.1.4, numpy 1.26.4, scipy 1.17.1, astropy 5.3.4, pandas 1.5.3, photutils 1.13.0,
    # lightkurve 2.6.0, kbackground 0.1.9, fbpca 1.0, patsy 0.5.6 (no conflicts to resolve)

Input (``.npz`` written by ``randomized_scenes.export_psfm_input``): ``time`` (nt) [BTJD], ``quality`` (nt),
``flux``, ``flux_err`` (nt, nrow, ncol) [e-/s, with sky and scattered light], ``row`` (nrow), ``column``
(ncol) [CCD pixel], ``pix_ra``, ``pix_dec`` (nrow, ncol) [deg, every pixel's centre through the scene's WCS],
the catalog ``source_id``, ``ra``, ``dec`` [deg], ``phot_g_mean_mag``, ``phot_g_mean_flux`` [Gaia e-/s],
``expected_flux`` [TESS e-/s: the catalog's estimate from G and BP-RP], ``src_row``, ``src_column`` [CCD
pixel], and ``scene`` (a name for messages).

Output (``.npz``): ``flux``, ``flux_err`` (time, source) [e-/s of the cube, on psfmachine's own flux scale,
NOT rescaled to the truth] = psfmachine's velocity-aberration-corrected PSF photometry (``ws_va``,
``werrs_va``) for every catalog source (the input's order), NaN where psfmachine has no light curve for the
source (fainter than ``--mag-limit``, no model pixels, or dropped as negative); ``flux_nva`` (``ws``, the
fit without the time model); ``source_id``; ``cpu_s`` = ``time.process_time()`` spent on the scene
(background subtraction + coordinates + the psfmachine calls; the imports and file reading are not
counted); ``wall_s``; and the adaptation's numbers (``pixel_scale_arcsec``, ``coord_scale``,
``count_scale``, ``mag_limit``, ``n_pixels``, ``n_sources`` given to psfmachine, ``n_nan_sources``,
``n_dropped_negative``, ``sky_mask_fraction``, ``time_resolution``, ``versions``).

How psfmachine (built for Kepler: 3.98 arcsec pixels, Kepler e-/s) is adapted to TESS:

1. **Angles.** psfmachine works in arcsec: ``limit_radius`` 24", ``rmin`` 1", ``rmax`` 16", ``cut_r`` 6",
   ``sparse_dist_lim`` 40", ``time_radius`` 8" are arguments, but more are fixed inside its methods (the
   source-mask radius 0.5 log10(F)^1.5 + 3", its 4.5-28" limits and the 2" added to it, the 14" cut in the
   PSF normalisation, the 1" and 4" centroid-offset thresholds, the /4 of the centroid position vectors).
   Rather than passing scaled arguments and leaving the fixed ones at Kepler's scale, the sky is shrunk:
   every pixel and source position is projected onto the tangent plane at the cutout's centre (astropy
   ``SkyOffsetFrame``; this also removes the cos(Dec) that psfmachine's plain RA differences omit -- the
   scenes sit near Dec -80, where 1 deg of RA is 0.17 deg on the sky) and multiplied by ``coord_scale`` =
   3.98 / (the cube's pixel scale, measured from ``pix_ra``/``pix_dec``, ~21 arcsec). The offsets are handed
   to psfmachine as "RA" and "Dec" [deg]. One TESS pixel is then 3.98 "arcsec" to psfmachine, so every
   angle of it, passed or built in, keeps its Kepler meaning in pixels (e.g. ``rmax`` 16" = 4 px); this is
   the same as multiplying all of them by 21/3.98 = 5.3. The arguments are left at the ``Machine`` defaults.
2. **Counts.** psfmachine's fixed count thresholds (sources brighter than 2e5 e-/s treated as saturated,
   100 e-/s as the edge of a source's mask, pixels kept for the time model between 100 and 1e5 e-/s,
   centroid pixels > 100 e-/s, re-estimated fluxes > 10 e-/s, the shape model cut at 1 e-/s) are for Kepler
   fluxes, which are close to Gaia G fluxes (Kepler's e-/s ~ 0.6 x Gaia's phot_g_mean_flux); TESS's e-/s
   are ~100x smaller. The cube's flux and flux_err are multiplied by ``count_scale`` = the median of
   ``phot_g_mean_flux / expected_flux`` over the catalog (~78: Gaia G e-/s per TESS e-/s) before
   psfmachine sees them, and its fluxes and errors are divided by it afterwards: a change of unit, the same
   as dividing all of those thresholds by ~78. psfmachine's flux scale is not touched (no rescaling to
   the truth or to the catalog; psfmachine's PSF normalisation gives its own scale).
3. **Flux prior.** ``Machine`` takes the source-flux estimate (prior mean, prior width 5 sqrt(F), source
   mask radius) from a catalog column, Gaia ``phot_g_mean_flux`` for Kepler; psfmachine's own TESS path
   (``TPFMachine.from_TPFs``) uses the band-matched ``phot_rp_mean_flux`` instead. The randomized catalog
   has no RP flux; its band-matched estimate is ``expected_flux`` (TESS e-/s from G and BP-RP), so the
   column given to psfmachine is ``count_scale x expected_flux`` (in the scaled unit of 2.; sources without
   it: ``phot_g_mean_flux``).
4. **Background.** psfmachine models no sky: its TPF path takes SPOC's background-subtracted pixels and its
   FFI path (``FFIMachine._remove_background``) subtracts a photutils ``Background2D`` (sigma-clipped
   median in (64, 50)-pixel boxes of 2048-pixel FFIs, zoom-interpolated), which accepts a mask of source
   pixels. The scenes' cube has sky and scattered light (a plane per cadence), so the same estimator is
   applied per cadence, with the boxes scaled to the cutout ((nrow // 4, ncol // 4), at least 8 px; 3x3
   median filter, 3-sigma clipping) and, as its ``mask``, the pixels where the catalog's stars put more
   than 1 e-/s (``expected_flux`` of every catalog source through a sigma = 0.9 px Gaussian PRF; boxes
   more than 90 % masked are interpolated). On 21" pixels the unmasked median sits on the stars of a
   crowded field (psfmachine's own recipe left 2.6-7 e-/s/px of star light in the sky of four scenes,
   against 0.3 e-/s/px of noise per cadence, pushing most faint sources negative); the mask brings that to
   0.8-1.6 e-/s/px. There is no sky term in psfmachine's fit to absorb what is left. If every box is
   masked, the sky is estimated without the mask.
5. **Pixels and cadences.** Pixels that are not finite (or have flux_err <= 0) at any cadence (the dead
   pixels) are left out; all cadences are fitted; ``time_mask`` = quality 0 (the cadences the mean image
   of the shape model uses).
6. **Workflow.** As ``TPFMachine.fit_lightcurves`` (its default path): ``build_shape_model()``,
   ``build_time_model()`` (defaults: cubic polynomial in time), ``fit_model(fit_va=True)``,
   then up to two refits without the sources that go negative (> 2 % of the cadences, then all of them),
   whose models are zeroed (NaN light curves). ``quiet`` progress bars. ``time_resolution`` (cadences per
   bin of the time model; default 200, i.e. ~22 bins in a 4,400-cadence Kepler quarter) is set to give the
   same ~22 bins over the scene's length (:func:`time_resolution`): with 200, a 300-cadence scene had 1-2
   bins for a cubic in time and psfmachine's light curves were broken (on one scene p2p / flux_err 104 at
   G 13-15 and no G < 13 curve left; with 14-cadence bins 2.8, and 16 curves at G < 13).
7. **Source list.** psfmachine's own TPF and FFI paths query Gaia to G = 18 (``magnitude_limit=18``), and
   that limit is kept (``--mag-limit``): the catalog's sources with G <= 18 are given to psfmachine, the
   fainter ones (the randomized catalogs go to G = 19) get NaN. Its shape model is an unweighted fit of
   log(pixel flux / source flux estimate) over every source's uncontaminated pixels; on 21" pixels the
   G 18-19 sources sit far below the sky of a pixel and their pixels (noise, sky residual, unmodelled
   neighbours) swamp it. On scene 0 (829 sources, fits without the time model), with the whole catalog the
   median F/T of its 9 isolated G < 13 stars was 0.13 (0.05 with the unmasked sky) and 255 sources had
   > 2 % negative cadences; with G <= 18 (409 sources), 0.48 and 100; with G <= 17, 0.56 and 30.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

#: Kepler's pixel scale [arcsec / px], the scale psfmachine's angular constants are written for
KEPLER_PIXEL_SCALE = 3.98


#: bins of psfmachine's time model in a Kepler quarter: ~4,400 long cadences / its default 200 per bin
KEPLER_TIME_BINS = 22


def time_resolution(n_cadences: int) -> int:
    """Cadences per bin of psfmachine's time model: as many bins as in a Kepler quarter (``KEPLER_TIME_BINS``),
    at least 5 cadences each. psfmachine's default, 200 cadences, leaves a 300-cadence scene 1-2 bins for its
    cubic in time, and its fits break (p2p / flux_err ~ 100-300 at G < 15)."""
    return max(5, int(round(n_cadences / KEPLER_TIME_BINS)))


def pixel_scale_arcsec(pix_ra, pix_dec):
    """Median angular distance between neighbouring pixel centres along rows and columns [arcsec]."""
    from astropy.coordinates import SkyCoord

    c = SkyCoord(pix_ra, pix_dec, unit="deg")
    d_col = c[:, 1:].separation(c[:, :-1]).arcsec
    d_row = c[1:, :].separation(c[:-1, :]).arcsec
    return float(np.median(np.concatenate([d_col.ravel(), d_row.ravel()])))


def tangent_offsets(ra, dec, ra0, dec0):
    """Offsets [deg] on the tangent plane at (ra0, dec0): (east, north), cos(Dec) included."""
    from astropy.coordinates import SkyCoord, SkyOffsetFrame

    frame = SkyOffsetFrame(origin=SkyCoord(ra0, dec0, unit="deg"))
    off = SkyCoord(np.ravel(ra), np.ravel(dec), unit="deg").transform_to(frame)
    return off.lon.wrap_at("180d").deg.reshape(np.shape(ra)), off.lat.deg.reshape(np.shape(ra))


def catalog_star_image(inp: dict, shape, sigma: float = 0.9):
    """Light of the catalog sources on the cutout [e-/s per pixel]: ``expected_flux`` through a Gaussian PRF of
    ``sigma`` px integrated over the pixels (only to mask star light out of the sky estimate)."""
    from scipy.special import erf

    nr, nc = shape
    r = np.asarray(inp["src_row"], float) - float(inp["row"][0])
    c = np.asarray(inp["src_column"], float) - float(inp["column"][0])
    f = np.asarray(inp["expected_flux"], float)
    ii, jj, s = np.arange(nr), np.arange(nc), np.sqrt(2) * sigma
    img = np.zeros((nr, nc))
    for rk, ck, fk in zip(r, c, f):
        if np.isfinite(fk) and fk > 0:
            br = 0.5 * (erf((ii - rk + 0.5) / s) - erf((ii - rk - 0.5) / s))
            bc = 0.5 * (erf((jj - ck + 0.5) / s) - erf((jj - ck - 0.5) / s))
            img += fk * br[:, None] * bc[None, :]
    return img


def subtract_background(flux, good2d, star_mask=None):
    """Per-cadence photutils ``Background2D`` (psfmachine's FFI recipe, boxes scaled to the cutout), with the
    pixels of ``star_mask`` left out of the sky estimate (boxes that are > 90 % masked are interpolated)."""
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, BkgZoomInterpolator, MedianBackground

    nt, nr, nc = flux.shape
    box = (max(8, nr // 4), max(8, nc // 4))
    mask = ~good2d if star_mask is None else (~good2d | star_mask)
    out = np.empty_like(flux)
    level = np.empty(nt)

    def sky(img, msk, exclude):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Background2D(
                img,
                box,
                mask=msk,
                filter_size=3,
                exclude_percentile=exclude,
                sigma_clip=SigmaClip(sigma=3.0, maxiters=5),
                bkg_estimator=MedianBackground(),
                interpolator=BkgZoomInterpolator(order=3),
            ).background

    for k in range(nt):
        try:
            b = sky(flux[k], mask, 90 if star_mask is not None else 20)
        except ValueError:  # every box masked
            b = sky(flux[k], ~good2d, 20)
        out[k] = flux[k] - b
        level[k] = float(np.median(b[good2d]))
    return out, level, box


def run(inp: dict, quiet: bool = True, mag_limit: float = 18.0) -> dict:
    """psfmachine on one scene's arrays (see the module docstring); returns the output arrays."""
    import pandas as pd
    import psfmachine

    c0, w0 = time.process_time(), time.perf_counter()
    flux = np.asarray(inp["flux"], float)
    flux_err = np.asarray(inp["flux_err"], float)
    nt, nr, nc = flux.shape
    good2d = (np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0)).all(axis=0)

    # 4. background, star light masked by the catalog
    star_mask = catalog_star_image(inp, (nr, nc)) > 1.0
    flux, bkg_level, box = subtract_background(flux, good2d, star_mask)

    # 1. angles: tangent-plane offsets shrunk so that one TESS pixel spans Kepler's 3.98"
    pix_ra, pix_dec = np.asarray(inp["pix_ra"], float), np.asarray(inp["pix_dec"], float)
    scale_as = pixel_scale_arcsec(pix_ra, pix_dec)
    coord_scale = KEPLER_PIXEL_SCALE / scale_as
    ra0, dec0 = float(pix_ra[nr // 2, nc // 2]), float(pix_dec[nr // 2, nc // 2])
    px, py = tangent_offsets(pix_ra, pix_dec, ra0, dec0)
    sx, sy = tangent_offsets(np.asarray(inp["ra"], float), np.asarray(inp["dec"], float), ra0, dec0)

    # 2./3. counts and the flux prior
    gflux = np.asarray(inp["phot_g_mean_flux"], float)
    tflux = np.asarray(inp["expected_flux"], float)
    ok = np.isfinite(gflux) & np.isfinite(tflux) & (gflux > 0) & (tflux > 0)
    count_scale = float(np.median(gflux[ok] / tflux[ok]))
    estimate = np.where(ok, count_scale * tflux, gflux)

    # 7. psfmachine's default Gaia depth
    keep = np.asarray(inp["phot_g_mean_mag"], float) <= mag_limit

    rows2d, cols2d = np.meshgrid(np.asarray(inp["row"], float), np.asarray(inp["column"], float), indexing="ij")
    sel = good2d.ravel()
    sources = pd.DataFrame(
        {
            "ra": sx[keep] * coord_scale,
            "dec": sy[keep] * coord_scale,
            "flux_estimate": estimate[keep],
            "phot_g_mean_mag": np.asarray(inp["phot_g_mean_mag"], float)[keep],
            "source_id": np.asarray(inp["source_id"], np.int64)[keep],
        }
    )
    quality = np.asarray(inp["quality"])
    m = psfmachine.Machine(
        time=np.asarray(inp["time"], float),
        flux=flux.reshape(nt, -1)[:, sel] * count_scale,
        flux_err=flux_err.reshape(nt, -1)[:, sel] * count_scale,
        ra=(px * coord_scale).ravel()[sel],
        dec=(py * coord_scale).ravel()[sel],
        sources=sources,
        column=cols2d.ravel()[sel],
        row=rows2d.ravel()[sel],
        time_mask=quality == 0,
        sources_flux_column="flux_estimate",
        time_resolution=time_resolution(nt),
    )
    m.quiet = quiet

    # 6. workflow
    m.build_shape_model()
    m.build_time_model()
    m.fit_model(fit_va=True)
    neg = (m.ws_va < 0).sum(axis=0) > 0.02 * nt
    dropped = np.zeros(m.nsources, bool)
    for _ in range(2):
        if not neg.any():
            break
        dropped |= neg
        # zero their model rows in place (the time model's perturbation is laid over mean_model.data,
        # so its sparsity structure is kept)
        mm = m.mean_model.tocsr()
        mm.data[np.repeat(dropped, np.diff(mm.indptr))] = 0.0
        m.mean_model = mm
        m.fit_model(fit_va=True)
        neg = (m.ws_va < 0).all(axis=0) & ~dropped

    ns = keep.size

    def full(w):  # (time, every catalog source), NaN for those not given to psfmachine
        out = np.full((nt, ns), np.nan)
        out[:, keep] = w / count_scale
        return out

    f = full(m.ws_va)
    return {
        "flux": f,
        "flux_err": full(m.werrs_va),
        "flux_nva": full(m.ws),
        "source_id": np.asarray(inp["source_id"], np.int64),
        "cpu_s": time.process_time() - c0,
        "wall_s": time.perf_counter() - w0,
        "pixel_scale_arcsec": scale_as,
        "coord_scale": coord_scale,
        "count_scale": count_scale,
        "background_box": np.asarray(box),
        "background_level": bkg_level,
        "mag_limit": mag_limit,
        "sky_mask_fraction": float(star_mask[good2d].mean()),
        "time_resolution": time_resolution(nt),
        "n_pixels": int(sel.sum()),
        "n_sources": int(m.nsources),
        "n_nan_sources": int((~np.isfinite(f[:, keep])).all(axis=0).sum()),
        "n_dropped_negative": int(dropped.sum()),
        "versions": np.asarray(
            [f"psfmachine {psfmachine.__version__}", f"numpy {np.__version__}", f"pandas {pd.__version__}"]
        ),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="scene .npz written by randomized_scenes.py")
    ap.add_argument("output", help="result .npz")
    ap.add_argument("--progress", action="store_true", help="show psfmachine's progress bars")
    ap.add_argument(
        "--mag-limit", type=float, default=18.0, help="catalog sources with G <= this go to psfmachine (its default)"
    )
    a = ap.parse_args(argv)
    with np.load(a.input) as z:
        inp = {k: z[k] for k in z.files}
    scene = str(inp.get("scene", a.input))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(inp, quiet=not a.progress, mag_limit=a.mag_limit)
    np.savez(a.output, **out)
    print(
        f"psfmachine {scene}: {out['n_sources']} sources with G <= {a.mag_limit:g} of {len(inp['ra'])} "
        f"({out['n_nan_sources']} without a light curve, "
        f"{out['n_dropped_negative']} dropped as negative), {out['n_pixels']} pixels, {len(inp['time'])} "
        f'cadences; pixel {out["pixel_scale_arcsec"]:.2f}", coord x{out["coord_scale"]:.4f}, counts '
        f"x{out['count_scale']:.1f}; {out['cpu_s']:.1f} CPU-s, {out['wall_s']:.1f} s wall"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
