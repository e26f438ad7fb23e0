"""A tiny light-curve set (2x2 pixels, 5 cadences, constant flux) for tests of light-curve file writers."""

import numpy as np

from workflow_lib.data.cube import make_cube
from workflow_lib.data.lightcurves import lightcurve_set


def tiny_lightcurve_set(ids, method: str):
    """One light curve per entry of ``ids`` (duplicates kept as given), flux and errors all 1."""
    nt = 5
    cube = make_cube(
        np.ones((nt, 2, 2)),
        np.ones((nt, 2, 2)),
        np.zeros(nt, dtype=np.int32),
        1325.0 + np.arange(nt) / 48,
        np.arange(nt),
        np.arange(2),
        np.arange(2),
        mission="TESS",
    )
    n = len(ids)
    return lightcurve_set(
        np.ones((n, nt)), np.ones((n, nt)), cube, {"source_id": np.array(ids, dtype=np.int64)}, method=method
    )
