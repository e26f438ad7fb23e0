"""Randomized synthetic TESS scenes: the scene sampler of the randomized benchmark (issue 12, item 1).

:func:`sample_scene` draws, from one seed, a scene specification that randomizes what real TESS data
varies (ranges in :data:`RANGES`):

* **the PRF**: the cutout's CCD position is drawn uniformly over the whole CCD, and every star is
  rendered through the SPOC PRF of camera 4 / CCD 2 interpolated bilinearly between the 25 grid
  positions of ``../shared/data/tess_prf/cam4_ccd2`` (:func:`full_prf_grid`; the packaged 3x3 grid
  when the shared data are absent), evaluated as a cubic spline, so smooth in sub-pixel position;
* **pointing**: velocity-aberration drift of 0.05-0.5 px over the sector in a random direction,
  jitter of 0.005-0.03 px rms;
* **crowding**: 0.03-0.3 stars per pixel down to G = 19 (log-uniform: sparse to very crowded),
  plus a few extra bright stars (G 9.5-13, about one per 700 px) so the bright bins fill up;
* **cutout size**: 32-96 px on each side;
* **sky**: level 10-150 e-/s/px (log-uniform), scattered-light ramps of 0-400 e-/s/px peak, 0-4 dead
  pixels;
* **catalog errors**: extra position errors of 0-30 mas rms, 0-20 % of the constant stars fainter than
  G = 17-18.5 missing (on top of the generator's 3 % of G > 18), 0.01-0.10 mag rms scatter of the
  true T about the G, BP-RP colour relation (the pipeline's a-priori fluxes come from G);
* **variables**: 1-4 transiting planets, 2-8 rotators/pulsators, a transient half of the time,
  and 1-4 **pairs**: two stars 0.5-2 px apart, 0-3 mag apart (brighter member G 11-16), one member
  (either) eclipsing with a 2-30 % deep eclipse.

:func:`simulate_scene` renders it with the machinery of :mod:`workflow_lib.data.synthetic` (same
timeline, noise model, signals and Gaia-like catalog) and records the truth: per source the true flux
series, ``in_catalog``, ``pair`` (pair index or -1), ``cutout_fraction`` (fraction of the star's flux
that falls on the cutout at mid-sector) and ``boosted`` (one of the extra bright stars); attrs
``scene`` (the specification, JSON) and ``pairs`` (JSON list: both members' source ids, separation,
magnitude difference, which member eclipses).

The embedded default sector (:func:`workflow_lib.data.synthetic.simulate_sector`) is not changed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from workflow_lib.core.logs import get_logger
from workflow_lib.core.provenance import provenance_json
from workflow_lib.data import synthetic as syn
from workflow_lib.data import tess_prf

log = get_logger("random_scenes")

REPO = Path(__file__).resolve().parents[2]
#: the 25 SPOC PRF files of camera 4 / CCD 2 (override the data root with PIPELINE_SHARED_DATA)
SHARED_PRF_DIR = (
    Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data")) / "tess_prf" / "cam4_ccd2"
)
#: CCD extent covered by the SPOC PRF grid (rows 1-2048, columns 45-2092)
CCD_ROWS = (1, 2048)
CCD_COLS = (45, 2092)

#: the sampled ranges (lo, hi); "log" marks log-uniform draws
RANGES = {
    "side": (32, 96),
    "drift_px": (0.05, 0.5),
    "jitter_px": (0.005, 0.03, "log"),
    "stars_per_sq_pixel": (0.03, 0.3, "log"),
    "background_level": (10.0, 150.0, "log"),
    "scattered_light_amplitude": (0.0, 400.0),
    "n_bad_pixels": (0, 4),
    "pos_err_mas": (0.0, 30.0),
    "missing_fraction": (0.0, 0.2),
    "missing_gmin": (17.0, 18.5),
    "colour_scatter": (0.01, 0.10),
    "n_planets": (1, 4),
    "n_variables": (2, 8),
    "n_pairs": (1, 4),
    "pair_sep_px": (0.5, 2.0),
    "pair_dmag": (0.0, 3.0),
    "pair_gmag": (11.0, 16.0),
    "pair_depth": (0.02, 0.3),
    "bright_gmag": (9.5, 13.0),
}
#: extra bright stars per pixel of cutout (Poisson mean)
BRIGHT_PER_PIXEL = 1.0 / 700.0
#: random stream of the scene specification (the generator's own streams are 0-4)
SPEC_STREAM = 100
EXTRA_STREAM = 11


def _uniform(rng, key):
    r = RANGES[key]
    if len(r) == 3:
        return float(np.exp(rng.uniform(np.log(r[0]), np.log(r[1]))))
    if isinstance(r[0], int):
        return int(rng.integers(r[0], r[1] + 1))
    return float(rng.uniform(r[0], r[1]))


def sample_scene(seed: int) -> dict:
    """The scene specification for ``seed`` (deterministic): ``synthetic`` (the ``$defs/synthetic``
    parameters of :func:`workflow_lib.data.synthetic.fill_params`), ``catalog`` (its error model),
    ``pairs`` and ``n_bright``."""
    rng = np.random.default_rng([int(seed), SPEC_STREAM])
    nr, nc = _uniform(rng, "side"), _uniform(rng, "side")
    synth = {
        "seed": int(seed),
        "n_rows": nr,
        "n_cols": nc,
        "corner_row": int(rng.integers(CCD_ROWS[0], CCD_ROWS[1] - nr + 2)),
        "corner_col": int(rng.integers(CCD_COLS[0], CCD_COLS[1] - nc + 2)),
        "drift_px": _uniform(rng, "drift_px"),
        "jitter_px": _uniform(rng, "jitter_px"),
        "stars_per_sq_pixel": _uniform(rng, "stars_per_sq_pixel"),
        "background_level": _uniform(rng, "background_level"),
        "scattered_light_amplitude": _uniform(rng, "scattered_light_amplitude"),
        "n_bad_pixels": _uniform(rng, "n_bad_pixels"),
        "n_planets": _uniform(rng, "n_planets"),
        "n_variables": _uniform(rng, "n_variables"),
        "transient": bool(rng.uniform() < 0.5),
        "koi608": False,  # the pairs below generalize it
    }
    catalog = {k: _uniform(rng, k) for k in ("pos_err_mas", "missing_fraction", "missing_gmin", "colour_scatter")}
    edge = min(6.0, (min(nr, nc) - 1) / 4)
    pairs = []
    for _ in range(_uniform(rng, "n_pairs")):
        pairs.append(
            {
                "row": float(rng.uniform(edge, nr - 1 - edge)),
                "col": float(rng.uniform(edge, nc - 1 - edge)),
                "gmag": _uniform(rng, "pair_gmag"),
                "sep_px": _uniform(rng, "pair_sep_px"),
                "angle": float(rng.uniform(0, 2 * np.pi)),
                "dmag": _uniform(rng, "pair_dmag"),
                "eclipsing": "faint" if rng.uniform() < 0.5 else "bright",
                "depth": _uniform(rng, "pair_depth"),
                "period": float(rng.uniform(1.5, 5.0)),
                "phase": float(rng.uniform()),
                "duration_h": float(rng.uniform(2.0, 4.0)),
            }
        )
    n_bright = int(rng.poisson(BRIGHT_PER_PIXEL * nr * nc))
    return {"seed": int(seed), "synthetic": synth, "catalog": catalog, "pairs": pairs, "n_bright": n_bright}


@functools.lru_cache(maxsize=1)
def full_prf_grid():
    """The 5x5 SPOC PRF grid of camera 4 / CCD 2 (shared data), or the packaged 3x3 grid without it."""
    if SHARED_PRF_DIR.is_dir() and any(SHARED_PRF_DIR.glob("*.fits")):
        return tess_prf.load_prf_grid(SHARED_PRF_DIR)
    log.warning("%s not found: random scenes use the packaged 3x3 PRF grid (clamped at its edges)", SHARED_PRF_DIR)
    return tess_prf.load_prf_grid()


def _add_bright(stars, p: dict, n: int, rng):
    lo, hi = RANGES["bright_gmag"]
    first = stars["row"].size
    for _ in range(n):
        syn._append(
            stars,
            row=rng.uniform(1.0, p["n_rows"] - 2.0),
            col=rng.uniform(1.0, p["n_cols"] - 2.0),
            gmag=rng.uniform(lo, hi),
        )
    return np.arange(first, stars["row"].size)


def _add_pairs(stars, pairs: list) -> list[tuple[int, int]]:
    """Append both members of every pair; returns [(bright index, faint index), ...]."""
    out = []
    for pr in pairs:
        ib = syn._append(stars, row=pr["row"], col=pr["col"], gmag=pr["gmag"])
        ifnt = syn._append(
            stars,
            row=pr["row"] + pr["sep_px"] * np.sin(pr["angle"]),
            col=pr["col"] + pr["sep_px"] * np.cos(pr["angle"]),
            gmag=pr["gmag"] + pr["dmag"],
        )
        out.append((ib, ifnt))
    return out


def cutout_fraction(stars, src, p: dict, grid) -> np.ndarray:
    """Fraction of each star's flux on the cutout at mid-sector (no pointing offset)."""
    nr, nc = p["n_rows"], p["n_cols"]
    half = 8
    out = np.empty(src.n)
    for i in range(src.n):
        coef = tess_prf.prf_coefficients_at(src.row_ccd[i], src.col_ccd[i], grid)
        i0, j0 = int(np.round(stars["row"][i])) - half, int(np.round(stars["col"][i])) - half
        stamp = syn.star_image(coef, stars["row"][i], stars["col"][i], i0, j0, 2 * half + 1, 2 * half + 1)
        img = np.zeros((nr, nc))
        syn._add_clipped(img, stamp, i0, j0)
        out[i] = img.sum() / stamp.sum()
    return out


def _catalog_errors(catalog, in_cat, src, stars, kinds, protect, cat_spec: dict, rng):
    """Degrade the Gaia-like catalog: extra position noise and extra missing faint constant stars."""
    gmag = stars["gmag"]
    cand = np.flatnonzero(in_cat & (gmag > cat_spec["missing_gmin"]) & (kinds == "constant") & ~protect)
    n_miss = int(round(cat_spec["missing_fraction"] * cand.size))
    drop = rng.choice(cand, n_miss, replace=False) if n_miss else np.array([], int)
    in_cat = in_cat.copy()
    in_cat[drop] = False
    keep = np.isin(np.asarray(catalog["source_id"]), src.source_id[in_cat])
    catalog = catalog[keep]
    sig = cat_spec["pos_err_mas"] / 3.6e6
    m = len(catalog)
    cosd = np.cos(np.deg2rad(np.asarray(catalog["dec"], float)))
    catalog["ra"] = (np.asarray(catalog["ra"], float) + rng.normal(0, 1, m) * sig / cosd) % 360.0
    catalog["dec"] = np.asarray(catalog["dec"], float) + rng.normal(0, 1, m) * sig
    return catalog, in_cat


def simulate_scene(spec: dict, *, n_cadences: int | None = None, field: str = "scene", prf_grid=None):
    """Render the scene ``spec`` (from :func:`sample_scene`); returns ``(cube, truth, catalog)`` as
    :func:`workflow_lib.data.synthetic.simulate_sector` does. ``n_cadences`` overrides the sector's 1,300."""
    params = dict(spec["synthetic"])
    if n_cadences is not None:
        params["n_cadences"] = int(n_cadences)
    p = syn.fill_params(params)
    seed = int(p["seed"])
    r_scene, r_sig, r_point, r_noise, r_cat = (syn._rng(seed, k) for k in range(5))
    r_extra = syn._rng(seed, EXTRA_STREAM)
    grid = full_prf_grid() if prf_grid is None else prf_grid
    nr, nc = p["n_rows"], p["n_cols"]
    log.info("random scene %s: %dx%d px, %d cadences, seed %d", field, nr, nc, p["n_cadences"], seed)

    tl = syn._timeline(p, r_point)
    t = tl.t
    stars = syn._make_scene(p, r_scene)
    bright = _add_bright(stars, p, int(spec.get("n_bright", 0)), r_extra)
    targets = syn._choose_targets(stars, p, r_sig)
    pair_idx = _add_pairs(stars, spec.get("pairs", []))
    src = syn._source_properties(stars, targets.koi, p, r_scene, seed, 0.5 * (t[0] + t[-1]))
    # G-vs-T colour scatter: the true T departs from the Stassun et al. relation by colour_scatter rms
    src.tmag = src.tmag + r_extra.normal(0, spec["catalog"]["colour_scatter"], src.n)
    src.flux0 = syn.tess_flux(src.tmag)
    flux_true, kinds, signals = syn._inject_signals(t, tl.dt, src, targets, r_sig)

    pair_of = np.full(src.n, -1, np.int64)
    pair_meta = []
    for k, ((ib, ifnt), pr) in enumerate(zip(pair_idx, spec.get("pairs", []))):
        pair_of[[ib, ifnt]] = k
        ie, io = (ifnt, ib) if pr["eclipsing"] == "faint" else (ib, ifnt)
        dur = pr["duration_h"] / 24.0
        sig = dict(
            kind="eclipsing_binary",
            period=pr["period"],
            t0=float(t[0] + pr["phase"] * pr["period"]),
            duration=dur,
            depth=pr["depth"],
            secondary_depth=0.0,
            ingress=0.3 * dur,
            blended_with=int(src.source_id[io]),
        )
        flux_true[ie] *= syn.signal_model(sig, t, tl.dt)
        kinds[ie] = "eclipsing_binary"
        signals.append(dict(source_id=int(src.source_id[ie]), pair=k, **sig))
        pair_meta.append(
            dict(
                pair=k,
                bright=int(src.source_id[ib]),
                faint=int(src.source_id[ifnt]),
                eclipsing=int(src.source_id[ie]),
                other=int(src.source_id[io]),
                sep_px=pr["sep_px"],
                dmag=pr["dmag"],
                depth=pr["depth"],
            )
        )

    model, grid = syn._render(p, stars, src, kinds, flux_true, tl, grid=grid)
    flux, flux_err, bad_rc, t_exp = syn._add_noise(model, p, r_noise)
    prov = provenance_json(
        "random_scene",
        inputs=[f"tess_prf/cam{grid.camera}_ccd{grid.ccd}/{s}" for s in grid.sources],
        config={"spec": spec, "params": p},
        field=field,
    )
    cube, common, wcs_hdr = syn._cube_of(p, flux, flux_err, tl, src, bad_rc, t_exp, field, prov)
    catalog, in_cat = syn._gaia_catalog(stars, src, kinds, r_cat, field, seed)
    catalog, in_cat = _catalog_errors(catalog, in_cat, src, stars, kinds, pair_of >= 0, spec["catalog"], r_extra)
    coords = syn._truth_coords(stars, src, kinds, in_cat, tl, dict(cube["time"].attrs))
    truth = syn._truth_dataset(p, coords, flux_true, tl)
    boosted = np.zeros(src.n, bool)
    boosted[bright] = True
    truth = truth.assign_coords(
        pair=("source", pair_of, {"long_name": "index of the pair (attrs['pairs']) the star belongs to, -1 none"}),
        cutout_fraction=(
            "source",
            cutout_fraction(stars, src, p, grid),
            {"long_name": "fraction of the star's flux on the cutout at mid-sector"},
        ),
        boosted=("source", boosted, {"long_name": "one of the extra bright stars (G 9.5-13)"}),
    )
    truth.attrs.update(common)
    truth.attrs.update(syn._truth_attrs(p, tl, src, targets.koi, signals, wcs_hdr, t_exp))
    truth.attrs.update(
        scene=json.dumps(spec, default=float),
        pairs=json.dumps(pair_meta, default=float),
        prf_grid=f"cam{grid.camera}_ccd{grid.ccd}: {grid.rows.size}x{grid.cols.size} positions",
    )
    return cube, truth, catalog


def write_scene(directory, spec: dict, *, n_cadences: int | None = None, field: str = "scene"):
    """Simulate ``spec`` and write ``cube.zarr``, ``truth.zarr`` and ``input_catalog.ecsv`` in ``directory``
    (the file names of the pipeline's synthetic download)."""
    from workflow_lib.core.atomic import atomic_path
    from workflow_lib.data.cube import write_zarr_atomic

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cube, truth, catalog = simulate_scene(spec, n_cadences=n_cadences, field=field)
    write_zarr_atomic(cube, d / "cube.zarr")
    write_zarr_atomic(truth, d / "truth.zarr")
    with atomic_path(d / "input_catalog.ecsv") as tmp:
        catalog.write(tmp, format="ascii.ecsv", overwrite=True)
    return cube, truth, catalog
