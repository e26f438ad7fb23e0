"""Survey mode: the CCD-level scene motion fit (workflow_lib.survey.motion, eq. 1
y_kt = a_k + c_t + D_t (x_k - x0, y_k - y0), D_t = D_0 + tau_t E) on synthetic tile offsets with known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workflow_lib.survey.motion import CCDMotionError, fit_ccd_motion, load_ccd_motion, model_at

NT = 100
ERR = 0.003  # px per cadence and axis, the size of a tile's measured offset noise (docs/SURVEY.md)
E_TRUE = np.array([[1.0e-3, -5.0e-4], [2.0e-4, 8.0e-4]])  # px per px over the half-span


def truth(seed=0):
    rng = np.random.default_rng(seed)
    t = 1.0 + np.linspace(0.0, 2.0, NT)  # days; t_mid = 2, t_half = 1
    tau = t - 2.0
    c = np.vstack([0.3 * tau + 0.02 * rng.standard_normal(NT), -0.2 * tau + 0.02 * rng.standard_normal(NT)])
    return t, tau, c


def make_tiles(gains=None, *, E=E_TRUE, grid=3, seed=1, differential_centre=(100.0, 100.0)):
    """Tiles of 64 px on a grid x grid CCD: offsets g_k (c_t + tau_t E d_k) + noise, re-centred like a tile's."""
    t, tau, c = truth()
    rng = np.random.default_rng(seed)
    tiles, want = {}, {}
    for i in range(grid):
        for j in range(grid):
            tid = f"r{64 * i:04d}c{64 * j:04d}"
            ctr = np.array([64.0 * j + 36.0, 64.0 * i + 36.0])
            d = ctr - np.asarray(differential_centre)
            g = (gains or {}).get(tid, 1.0)
            local = [c[a] + tau * (E[a] @ d) for a in range(2)]
            off = [g * x + ERR * rng.standard_normal(NT) for x in local]
            tiles[tid] = dict(
                time=t,
                column=off[0] - off[0].mean(),
                row=off[1] - off[1].mean(),
                column_err=np.full(NT, ERR),
                row_err=np.full(NT, ERR),
                good=np.ones(NT, bool),
                center=ctr,
            )
            want[tid] = [x - x.mean() for x in local]
    return tiles, want, c


def test_recovers_common_offsets_and_differential_term():
    tiles, want, c = make_tiles()
    m = fit_ccd_motion(tiles)
    assert bool(m["differential"])
    # x0, y0 = mean of the tile centres = (100, 100), as in the truth
    assert m["x0"] == pytest.approx(100.0) and m["y0"] == pytest.approx(100.0)
    # E within 4 sigma of its error, and the error is honest (not huge)
    assert np.all(np.abs(m["E"] - E_TRUE) < 4 * m["E_err"])
    assert np.all(m["E_err"] < 2e-5)
    # c_t (re-centred) within its errors: rms of the normalised difference ~ 1
    for a, ax in enumerate(("column", "row")):
        d = (m[ax] - m[ax].mean()) - (c[a] - c[a].mean())
        z = d / m[f"{ax}_err"]
        assert 0.5 < np.sqrt(np.mean(z**2)) < 1.6
        assert m[f"{ax}_err"] == pytest.approx(ERR / 3.0, rel=1e-6)  # 9 tiles of equal weight
    # the model at every tile centre matches the tile's true local motion
    for k, tid in enumerate(m["tile_ids"]):
        for a, ax in enumerate(("column", "row")):
            assert np.sqrt(np.mean((m[f"model_{ax}"][k] - want[tid][a]) ** 2)) < 1.5 * ERR / 3 + 1e-4
    assert not m["flagged"].any() and m["in_fit"].all()
    np.testing.assert_allclose(m["gain"], 1.0, atol=0.01)


def test_model_at_reproduces_the_tile_model():
    tiles, _, _ = make_tiles()
    m = fit_ccd_motion(tiles)
    k = 5
    cx, cy = model_at(m, *m["center"][k], time=m["time"])
    np.testing.assert_allclose(cx - cx.mean(), m["model_column"][k], atol=1e-12)
    np.testing.assert_allclose(cy - cy.mean(), m["model_row"][k], atol=1e-12)


def test_a_tile_with_gain_085_is_flagged_and_left_out():
    bad = "r0000c0064"
    tiles, want, c = make_tiles({bad: 0.85})
    m = fit_ccd_motion(tiles)
    ids = list(m["tile_ids"])
    k = ids.index(bad)
    assert m["flagged"][k] and not m["in_fit"][k]
    assert m["flagged"].sum() == 1 and m["in_fit"].sum() == len(ids) - 1
    np.testing.assert_allclose(m["gain"][k], 0.85, atol=0.01)
    others = np.delete(m["gain"], k, axis=0)
    np.testing.assert_allclose(others, 1.0, atol=0.01)
    # its model offsets are the truth at its centre, not its own 15 % too small ones
    for a, ax in enumerate(("column", "row")):
        assert np.sqrt(np.mean((m[f"model_{ax}"][k] - want[bad][a]) ** 2)) < 2e-3
        assert np.sqrt(np.mean((tiles[bad][ax] - want[bad][a]) ** 2)) > 0.02
    assert np.all(np.abs(m["E"] - E_TRUE) < 4 * m["E_err"])


def test_a_bad_tile_of_four_rigid_ccd():
    """The CI layout: 4 tiles, a rigid scene; the 0.85 tile is flagged, the other three set the model."""
    tiles, want, _ = make_tiles({"r0000c0064": 0.85}, E=np.zeros((2, 2)), grid=2, differential_centre=(68.0, 68.0))
    m = fit_ccd_motion(tiles, differential=False)
    assert not bool(m["differential"])
    assert list(m["tile_ids"][m["flagged"]]) == ["r0000c0064"]
    for k, tid in enumerate(m["tile_ids"]):
        assert np.sqrt(np.mean((m["model_column"][k] - want[tid][0]) ** 2)) < 2.5e-3


def test_too_few_tiles_give_a_rigid_model():
    """3 tiles fit the plane exactly: below min_tiles_differential the model stays rigid (E = 0)."""
    tiles, _, c = make_tiles(E=np.zeros((2, 2)), grid=2, differential_centre=(68.0, 68.0))
    m = fit_ccd_motion(tiles)  # 4 tiles < 8
    assert not bool(m["differential"])
    np.testing.assert_array_equal(m["E"], 0.0)
    m4 = fit_ccd_motion(tiles, min_tiles_differential=4)
    assert bool(m4["differential"]) and np.all(np.abs(m4["E"]) < 4 * m4["E_err"])


def test_two_tiles_cannot_constrain_the_differential_term():
    tiles, _, _ = make_tiles(E=np.zeros((2, 2)), grid=1)
    tiles2, _, _ = make_tiles(E=np.zeros((2, 2)), grid=2)
    two = {k: tiles2[k] for k in list(tiles2)[:2]}
    m = fit_ccd_motion(two, min_tiles_differential=3)
    assert not bool(m["differential"])
    np.testing.assert_array_equal(m["E"], 0.0)
    m1 = fit_ccd_motion(tiles)  # one tile: the model is its own offsets
    np.testing.assert_allclose(m1["model_column"][0], tiles["r0000c0000"]["column"], atol=1e-9)


def test_mismatched_cadences_are_refused():
    tiles, _, _ = make_tiles(grid=2)
    short = dict(tiles["r0000c0064"])
    for k in ("time", "column", "row", "column_err", "row_err", "good"):
        short[k] = short[k][:-1]
    with pytest.raises(CCDMotionError, match=r"tile r0000c0064: 99 cadences, tile r0000c0000 has 100"):
        fit_ccd_motion({**tiles, "r0000c0064": short})
    shifted = dict(tiles["r0064c0000"], time=tiles["r0064c0000"]["time"] + 0.01)
    with pytest.raises(CCDMotionError, match=r"tile r0064c0000: cadence 0 .* must share its cadences"):
        fit_ccd_motion({**tiles, "r0064c0000": shifted})
    m = fit_ccd_motion(tiles)
    with pytest.raises(CCDMotionError, match="rerun ccd_motion"):
        model_at(m, 10.0, 10.0, time=m["time"][:-1])


def test_ccd_motion_step_writes_model_and_qa(tmp_path):
    from workflow_lib.core.atomic import save_npz_deterministic
    from workflow_lib.steps.__main__ import main

    tiles, _, _ = make_tiles({"r0064c0064": 0.85})
    args = []
    for tid, d in tiles.items():
        path = tmp_path / f"{tid}.npz"
        save_npz_deterministic(path, d)
        args.append(f"{tid}={path}")
    out, qa = tmp_path / "ccd_motion.npz", tmp_path / "ccd_motion.json"
    rc = main(["survey-ccd-motion", "--offsets", *args, "--out", str(out), "--qa", str(qa), "--params", "{}"])
    assert rc == 0
    q = json.loads(qa.read_text())
    assert q["flagged"] == ["r0064c0064"] and q["n_tiles"] == 9 and q["gain_tolerance"] == 0.05
    row = next(t for t in q["tiles"] if t["tile"] == "r0064c0064")
    assert row["gain_column"] == pytest.approx(0.85, abs=0.01) and not row["in_fit"]
    m = load_ccd_motion(out)
    assert m["model_column"].shape == (9, NT)
    rc = main(["survey-ccd-motion", "--offsets", *args, "--out", str(out), "--qa", str(qa), "--params", '{"clip": -1}'])
    assert rc == 1  # the schema refuses a negative clip


@pytest.mark.parametrize("differential", [True, False])
def test_fit_axis_matches_a_dense_constrained_solution(differential):
    """_fit_axis (one core.linalg.wls solve: gauge as a penalty row, empty parameters pinned by a prior)
    against an independent reference: the dense weighted least squares of eq. 1 with the constraint
    sum_k a_k = 0 as a Lagrange multiplier (KKT system), parameters without data removed; E's errors from
    the inverse of the KKT matrix (the covariance of the constrained solution). A random case with an
    empty cadence and a tile without data."""
    from workflow_lib.survey.motion import _fit_axis

    rng = np.random.default_rng(11)
    K, nt = 7, 15
    y = 0.1 * rng.standard_normal((K, nt))
    w = rng.uniform(0.2, 3.0, (K, nt)) * (rng.uniform(size=(K, nt)) > 0.15)
    w[:, 4] = 0.0  # an empty cadence
    w[2] = 0.0  # a tile left out of the fit
    tau = np.linspace(-1.0, 1.0, nt)
    delta = 40.0 * rng.standard_normal((K, 2))
    c, a, e, e_err, c_err = _fit_axis(y, w, tau, delta, differential)

    # reference: parameters [c_t (cadences with data), a_k (tiles with data), E (2)], row by row
    ts = [t for t in range(nt) if w[:, t].sum() > 0]
    ks = [k for k in range(K) if w[k].sum() > 0]
    ne = 2 if differential else 0
    m = len(ts) + len(ks) + ne
    rows, rhs, wts = [], [], []
    for k in ks:
        for t in ts:
            if w[k, t] > 0:
                r = np.zeros(m)
                r[ts.index(t)] = 1.0
                r[len(ts) + ks.index(k)] = 1.0
                for j in range(ne):
                    r[len(ts) + len(ks) + j] = tau[t] * delta[k, j]
                rows.append(r)
                rhs.append(y[k, t])
                wts.append(w[k, t])
    A, b, W = np.array(rows), np.array(rhs), np.array(wts)
    g = np.zeros(m)
    g[len(ts) : len(ts) + len(ks)] = 1.0  # sum_k a_k = 0
    kkt = np.block([[A.T @ (W[:, None] * A), g[:, None]], [g[None, :], np.zeros((1, 1))]])
    sol = np.linalg.solve(kkt, np.concatenate([A.T @ (W * b), [0.0]]))
    c_ref = np.full(nt, np.nan)
    c_ref[ts] = sol[: len(ts)]
    a_ref = np.zeros(K)
    a_ref[ks] = sol[len(ts) : len(ts) + len(ks)]

    np.testing.assert_array_equal(np.isnan(c), np.isnan(c_ref))
    assert np.isnan(c[4]) and np.isnan(c_err[4]) and a[2] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(c[ts], c_ref[ts], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-12)
    assert abs(a.sum()) < 1e-12
    np.testing.assert_allclose(c_err[ts], 1.0 / np.sqrt(w[:, ts].sum(axis=0)), rtol=1e-12)
    if differential:
        e_ref = sol[len(ts) + len(ks) : m]
        cov = np.linalg.inv(kkt)[len(ts) + len(ks) : m, len(ts) + len(ks) : m]
        np.testing.assert_allclose(e, e_ref, rtol=1e-9)
        np.testing.assert_allclose(e_err, np.sqrt(np.diag(cov)), rtol=1e-9)
        assert np.all(e_err > 0)
    else:
        np.testing.assert_array_equal(e, 0.0)
        np.testing.assert_array_equal(e_err, 0.0)
