"""LFD diagnostics product (lfd/diagnostics.npz): pure computations, the npz layout, the step that writes it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table
from test_report import MOTION_SLOPE, NT, _quality, make_field, make_prf

from workflow_lib.data.cube import open_cube
from workflow_lib.lfd import diagnostics as G
from workflow_lib.lfd.io import load_motion_model


def _inputs(fdir):
    lfd = fdir / "lfd"
    raw = dict(np.load(lfd / "motion_model.npz")) if (lfd / "motion_model.npz").exists() else None
    return (
        open_cube(fdir / "cube.zarr"),
        Table.read(fdir / "catalog.ecsv", format="ascii.ecsv"),
        make_prf(),
        xr.open_zarr(lfd / "lightcurves.zarr", consolidated=False).load(),
        raw,
    )


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return make_field(tmp_path_factory.mktemp("diag"), cpm=False)


def test_good_cadences():
    flux = np.ones((4, 3))
    flux[1] = np.nan
    np.testing.assert_array_equal(G.good_cadences(flux, np.array([0, 0, 4, 0])), [1, 0, 0, 1])
    np.testing.assert_array_equal(G.good_cadences(flux, np.array([1, 1, 1, 1])), [1, 0, 1, 1])  # none good: finite
    np.testing.assert_array_equal(G.good_cadences(flux, None), [1, 0, 1, 1])


def test_product_round_trips_what_was_computed(field):
    cube, cat, prf, lc, raw = _inputs(field)
    mm = load_motion_model(field / "lfd" / "motion_model.npz")
    res = G.mean_frame_residual(cube, cat, prf, lc, mm)
    mp = G.motion_summary(mm, prf, cat, cube, raw)
    assert res["label"] == "with the motion model" and res["n_cadences"] == int((_quality() == 0).sum())
    with np.load(field / "lfd" / "diagnostics.npz", allow_pickle=False) as z:
        d = G.unpack_diagnostics({k: z[k] for k in z.files})
    for k in G.RESIDUAL_ARRAYS:
        np.testing.assert_array_equal(d["mean_residual"][k], res[k])  # bitwise: the report shows the same numbers
    assert {k: d["mean_residual"][k] for k in ("label", "n_sources", "n_cadences")} == {
        k: res[k] for k in ("label", "n_sources", "n_cadences")
    }
    arrays = [k for k, v in mp.items() if isinstance(v, np.ndarray)]
    assert [k for k in d["motion"] if k in arrays] == arrays  # columns keep their order (the page's column order)
    assert set(d["motion"]) == set(mp)
    for k, v in mp.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(d["motion"][k], v)
        else:
            assert d["motion"][k] == v
    t = cube["time"].values
    tau = (t - 0.5 * (t.min() + t.max())) / (0.5 * (t.max() - t.min()))
    np.testing.assert_allclose(d["motion"]["change_mean"], 100 * MOTION_SLOPE * np.abs(tau), rtol=1e-9, atol=1e-12)
    assert d["residual_notes"] == [] and d["motion_notes"] == []


def test_without_motion_file_no_motion_summary_and_failures_are_notes(field):
    cube, cat, prf, lc, _ = _inputs(field)
    d = G.lfd_diagnostics(cube, cat, prf, lc, None, None)
    assert d["motion"] is None and d["motion_notes"] == []
    assert d["mean_residual"]["label"] == "static mean scene"
    # a motion file without an evaluable model and no measured offsets: a note, no summary
    d = G.lfd_diagnostics(cube, cat, prf, lc, None, {"drift_row": np.zeros(NT)})
    assert d["motion"] is None and "LFD motion panel skipped" in d["motion_notes"][0]
    # light curves of other cadences: the residual is skipped with a note
    other = lc.assign_coords(cadenceno=lc["cadenceno"] + 10**6)
    d = G.lfd_diagnostics(cube, cat, prf, other)
    assert d["mean_residual"] is None and "no good cadence common" in d["residual_notes"][0]
    packed = G.pack_diagnostics(d)
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in packed.values())
    assert G.unpack_diagnostics(packed) == {
        "residual_notes": d["residual_notes"],
        "motion_notes": [],
        "mean_residual": None,
        "motion": None,
    }


def test_flux_solve_default_diagnostics_path_is_next_to_the_light_curves():
    import inspect

    from workflow_lib.steps.lfd import flux_solve_step

    sig = inspect.signature(flux_solve_step)
    assert sig.parameters["diagnostics_npz"].default is None  # -> <out_zarr parent>/diagnostics.npz
    assert tuple(sig.parameters["cdpp_hours"].default) == (1.0, 6.0)


def test_mean_frame_residual_reuses_the_flux_solves_motion_factors(field, monkeypatch):
    """Given the flux solve's (S, basis, time_basis), the residual uses them when its scene is that same
    matrix (no second evaluation of the motion factors) and gives the same numbers bitwise; for another
    scene it evaluates its own."""
    import scipy.sparse as sp

    from workflow_lib.data.cube import as_pixel_table
    from workflow_lib.lfd.motion import motion_factors
    from workflow_lib.lfd.prf import scene_matrix

    cube, cat, prf, lc, _ = _inputs(field)
    mm = load_motion_model(field / "lfd" / "motion_model.npz")
    ref = G.mean_frame_residual(cube, cat, prf, lc, mm)
    t = as_pixel_table(cube, drop_nan=False)
    pc, pr = (np.asarray(t[c].values, float) for c in ("column", "row"))
    use = np.isin(np.asarray(cat["source_id"]), lc["source_id"].values)  # the sources with LFD fluxes
    sc, sr = (np.asarray(cat[c], float)[use] for c in ("column", "row"))
    S = sp.csr_matrix(scene_matrix(prf, sc, sr, pc, pr))
    S.sum_duplicates()
    S.sort_indices()
    rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
    basis, tb = motion_factors(mm, pc[rows] - sc[S.indices], pr[rows] - sr[S.indices], cube["time"].values, prf)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return motion_factors(*args, **kwargs)

    monkeypatch.setattr(G, "motion_factors", counted)
    got = G.mean_frame_residual(cube, cat, prf, lc, mm, factors=(S, basis, tb))
    assert calls == [] and got["label"] == "with the motion model"
    for k in G.RESIDUAL_ARRAYS:
        np.testing.assert_array_equal(got[k], ref[k])
    other = S.copy()
    other.data = other.data * 2.0  # not the residual's scene: its own factors are evaluated
    got = G.mean_frame_residual(cube, cat, prf, lc, mm, factors=(other, basis, tb))
    assert calls == [1]
    for k in G.RESIDUAL_ARRAYS:
        np.testing.assert_array_equal(got[k], ref[k])
