"""How well can the LFD PRF model (§4.3) follow a real PRF? Noise-free isolated stars, least-squares fluxes.

    OPENBLAS_NUM_THREADS=1 python benchmarks/prf_flexibility.py                 # 150 stars per case
    python benchmarks/prf_flexibility.py --stars 60 --seed 3

The floor the shape model sets on absolute fluxes, separated from everything else the pipeline does (sky,
neighbours, motion, noise). For each case, ``--stars`` isolated stars are rendered through the SPOC PRF of
``random_scenes.full_prf_grid()`` (interpolated at each star's CCD position, smooth in sub-pixel position)
at random sub-pixel phases, with fluxes 10^3.5-10^5.5 e-/s, on 13 x 13 px stamps and no noise. The shape is
fitted to all stamps at once with :func:`workflow_lib.lfd.prf.fit_prf_shape` (the lfd.prf schema defaults,
per-source offsets on, a-priori fluxes off by 10 % rms as Gaia's are), then each star's flux is the weighted
least-squares scale of the fitted model to its own stamp. Printed per model variant: the median of
F_hat / F - 1 (a common normalisation error) and the per-star scatter (std and the 16-84 % width), which no
global normalisation can remove.

Cases: all stars at one CCD position (the centre of camera 4 / CCD 2, then a corner), and stars spread
over a 96-px box around the centre (the largest random-scene cutout: the PRF changes across it, the model
is one shape per cutout); ``--grid packaged``: the same inside the 3x3 grid packaged with workflow_lib (the
embedded synthetic sector's PRF). Variants: ``core_degree`` 0 (no core terms, the paper), 2 (the schema), 3, 4,
the flux normalised inside the SPOC PRF's 13 x 13 px (``flux_box`` 6.5), and a denser radial knot grid, more
phi knots and a smaller ``inner_radius`` without core terms.
"""

from __future__ import annotations

import argparse

import numpy as np

from workflow_lib.data import random_scenes, tess_prf
from workflow_lib.lfd import prf as P

HALF = 6  # stamp half-width [px]: the SPOC PRF's 13 x 13 px support

VARIANTS = (
    ("core_degree 0 (the paper)", {"core_degree": 0}),
    ("core_degree 2 (schema)", {"core_degree": 2}),
    ("core_degree 3", {"core_degree": 3}),
    ("core_degree 4", {"core_degree": 4}),
    ("core_degree 2, core_radius 1.5", {"core_degree": 2, "core_radius": 1.5}),
    ("core_degree 2, flux_box 6.5", {"core_degree": 2, "flux_box": 6.5}),
    ("n_r_knots 16, no core terms", {"n_r_knots": 16, "core_degree": 0}),
    ("n_phi_knots 21, no core terms", {"n_phi_knots": 21, "core_degree": 0}),
    ("inner_radius 0.1, no core terms", {"inner_radius": 0.1, "r_min": 0.1, "core_degree": 0}),
)

CASES = (
    ("CCD centre (1000, 1000)", (1000.0, 1000.0), 0.0),
    ("CCD corner (300, 1800)", (300.0, 1800.0), 0.0),
    ("96-px box at the centre", (1000.0, 1000.0), 48.0),
)

#: the same inside the packaged 3x3 grid (grid rows 513-1536, columns 557-1580)
PACKAGED_CASES = (
    ("packaged grid centre (1025, 1069)", (1025.0, 1069.0), 0.0),
    ("packaged grid corner (513, 557)", (513.0, 557.0), 0.0),
    ("96-px box at the packaged centre", (1025.0, 1069.0), 48.0),
)


def render_stars(rng, grid, n: int, ccd_row: float, ccd_col: float, spread: float) -> list[tuple]:
    """``n`` noise-free stamps: (dx, dy, pixel flux, true flux) per star, offsets pixel - star [px]."""
    out = []
    for _ in range(n):
        r0 = ccd_row + rng.uniform(-spread, spread) + rng.uniform(0, 1)
        c0 = ccd_col + rng.uniform(-spread, spread) + rng.uniform(0, 1)
        rows = np.arange(np.round(r0) - HALF, np.round(r0) + HALF + 1)
        cols = np.arange(np.round(c0) - HALF, np.round(c0) + HALF + 1)
        F = 10 ** rng.uniform(3.5, 5.5)
        img = tess_prf.render_prf(r0, c0, rows, cols, F, grid=grid)
        R, C = np.meshgrid(rows, cols, indexing="ij")
        out.append((C.ravel() - c0, R.ravel() - r0, img.ravel(), F))
    return out


def flux_ratios(stars: list[tuple], overrides: dict, rng) -> np.ndarray:
    """F_hat / F per star for the PRF shape fitted with the lfd.prf settings ``overrides``."""
    p = P.prf_params(overrides)
    knots = P.radial_knots_of(p)
    dx, dy, f = (np.concatenate([s[k] for s in stars]) for k in range(3))
    index = np.concatenate([np.full(s[0].size, k) for k, s in enumerate(stars)])
    prior = np.array([s[3] for s in stars]) * np.exp(rng.normal(0.0, 0.1, len(stars)))
    err = np.sqrt(np.abs(f) + 100.0)  # weights only: Poisson plus a 100 (e-/s)^2 sky
    model = P.fit_prf_shape(dx, dy, f, err, prior[index], r_knots=knots, source_index=index, **P.shape_settings(p))
    ratios = []
    for x, y, img, F in stars:
        m = model.evaluate(x, y)
        w = 1.0 / (np.abs(img) + 100.0)
        ratios.append(np.sum(w * m * img) / np.sum(w * m * m) / F)
    return np.array(ratios)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stars", type=int, default=150, help="stars per case (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--grid",
        choices=("shared", "packaged"),
        default="shared",
        help="shared: the 5x5 camera 4 / CCD 2 grid of the random scenes (default); packaged: the 3x3 grid "
        "inside workflow_lib, which the embedded synthetic sector uses (cases then at its centre and corner)",
    )
    args = ap.parse_args(argv)
    grid = random_scenes.full_prf_grid() if args.grid == "shared" else tess_prf.load_prf_grid()
    cases = CASES if args.grid == "shared" else PACKAGED_CASES
    print(f"PRF grid cam{grid.camera}/ccd{grid.ccd}, {args.stars} noise-free stars per case, seed {args.seed}")
    for label, (row, col), spread in cases:
        rng = np.random.default_rng(args.seed)
        stars = render_stars(rng, grid, args.stars, row, col, spread)
        print(f"\n{label}")
        print(f"  {'variant':34} {'median F_hat/F - 1':>18} {'std':>7} {'16-84 % width':>13}")
        for name, over in VARIANTS:
            r = flux_ratios(stars, over, np.random.default_rng(args.seed + 1))
            width = np.percentile(r, 84) - np.percentile(r, 16)
            print(f"  {name:34} {np.median(r) - 1:+18.4f} {np.std(r):7.4f} {width:13.4f}")


if __name__ == "__main__":
    main()
