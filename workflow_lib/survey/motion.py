"""Survey mode: the scene motion of a whole CCD fitted from the scene offsets of all its tiles.

Each tile measures its own per-cadence scene offset c_kt (the shift motion model's Gauss-Newton offsets,
:func:`workflow_lib.lfd.motion.measure_field_offsets`, relative to the tile's mean frame) with errors
sigma_kt. The scale of a tile's offsets is set by the gradient of its own fitted PRF, which can be biased
(one CI tile in four came out 15 % too small, docs/SURVEY.md "Motion: per tile or per CCD"). This module
fits one model for the CCD, per axis (column, row) separately:

    y_kt = a_k + c_t + D_t (x_k - x0, y_k - y0)^T,     D_t = D_0 + tau_t E,   tau_t = (t - t_mid) / t_half   (1)

y_kt the tile's offset on that axis, (x_k, y_k) the tile centre in CCD pixels, (x0, y0) the mean of the
tile centres, a_k a per-tile constant (each tile's offsets are relative to its own mean frame), c_t the
common offset per cadence and D_t the 2 x 2 differential term (differential velocity aberration: a
slow stretch / rotation of the scene across the CCD), linear in time. D_0 (x_k - x0) is constant per
tile, i.e. indistinguishable from a_k, and tiles re-centre their offsets anyway: only E (2 x 2, the
change of D over the half-span t_half) is fitted. E is fitted only when at least ``min_tiles_differential``
(default 8) tiles are in the fit and their centres span two dimensions; else, or when switched off
(``differential``), D_t = 0: a rigid model, c_t per axis. Why a minimum: the plane (x, y) -> E (x, y)
tau_t has 3 parameters per axis with the common drift, so three tiles fit it exactly and a tile's
own scale error (gain) becomes "differential motion" that moves the model at every other tile (measured on
the 4-tile CI CCD, docs/SURVEY.md); with many tiles per CCD (a whole TESS CCD: 1024 tiles of 64 px) the
gains average out and a real differential drift is measured. Weighted least squares of eq. 1 with weights w_kt = 1 / (s_k sigma_kt)^2 on the good cadences
(one :func:`workflow_lib.core.linalg.wls` solve, sparse normal equations; gauge sum_k a_k = 0).

Robustness (iterated until the tile selection and the clipped points no longer change):

* per-tile gain, per axis: the least-squares factor between the tile's offsets and the CCD model at its
  centre, both re-centred on the tile's good cadences, g_k = sum_t w_kt y_kt m_kt / sum_t w_kt m_kt^2   (2)
  A tile with |g_k - 1| > ``gain_tolerance`` on either axis is flagged. Starting from all tiles, the
  worst flagged tile in the fit leaves it, one per iteration (backward elimination; at least half of the
  tiles stay); flagged tiles out of the fit re-enter once the model finds their gain within tolerance;
* per-tile error scale s_k = max(1, rms of its normalised residuals): the Gauss-Newton errors carry only
  the photon noise, not the PRF-model errors;
* single cadences with |residual| > ``clip`` s_k sigma_kt are left out.

Every tile, flagged or not, then takes the CCD model at its centre, c_t + tau_t E (x_k - x0, y_k - y0)^T
(:func:`model_at`), as its scene offsets (the consumer re-centres them). The errors of c_t reported are
1 / sqrt(sum_k w_kt) (the uncertainty of a_k and E neglected).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from workflow_lib.core.linalg import wls
from workflow_lib.core.logs import get_logger

log = get_logger("survey.motion")

AXES = ("column", "row")


class CCDMotionError(ValueError):
    """The CCD-level motion cannot be fitted or read; the message names the tile / problem."""


def check_tiles(tiles: dict) -> np.ndarray:
    """The common time axis of the tiles' offsets; refuses tiles with other cadences (a clear error)."""
    if not tiles:
        raise CCDMotionError("no tile offsets given")
    names = list(tiles)
    ref = np.asarray(tiles[names[0]]["time"], float)
    for name in names:
        d = tiles[name]
        t = np.asarray(d["time"], float)
        if t.shape != ref.shape:
            raise CCDMotionError(
                f"tile {name}: {t.size} cadences, tile {names[0]} has {ref.size}: tiles of one CCD must share its cadences"
            )
        bad = ~np.isclose(t, ref, rtol=0, atol=1e-6)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CCDMotionError(
                f"tile {name}: cadence {i} at t = {t[i]!r}, tile {names[0]} at {ref[i]!r}: tiles of one CCD must"
                " share its cadences"
            )
        for key in AXES:
            for k in (key, f"{key}_err"):
                if np.shape(d[k]) != ref.shape:
                    raise CCDMotionError(f"tile {name}: `{k}` has shape {np.shape(d[k])}, time {ref.shape}")
    return ref


def _fit_axis(y, w, tau, delta, differential: bool):
    """Weighted least squares of eq. 1 on one axis. y, w (ntile, ntime) (w = 0: not used), tau (ntime,),
    delta (ntile, 2). Returns (c (ntime,), a (ntile,), e (2,), e_err (2,), c_err (ntime,)).

    One :func:`~workflow_lib.core.linalg.wls` solve (sparse normal equations): parameters (c_t, a_k, E)
    without a prior (infinite width), except those without data (cadences / tiles no point uses), which a
    zero-mean prior fixes at 0 (c_t reported NaN); the gauge sum_k a_k = 0 (a common constant moves between
    a_k and c_t) is a penalty row sqrt(s) sum_k a_k (s: the mean data diagonal of the normal matrix, so the
    matrix stays well scaled; the data do not see this direction, the minimum has sum_k a_k = 0 exactly).
    e_err from the inverse of the same normal matrix.
    """
    K, nt = y.shape
    ne = 2 if differential else 0
    k_idx, t_idx = np.nonzero(w > 0)
    n = k_idx.size
    rows = np.arange(n)
    cols = [t_idx, nt + k_idx]
    vals = [np.ones(n), np.ones(n)]
    for j in range(ne):
        cols.append(np.full(n, nt + K + j))
        vals.append(tau[t_idx] * delta[k_idx, j])
    npar = nt + K + ne
    A = sp.csr_matrix((np.concatenate(vals), (np.tile(rows, len(vals)), np.concatenate(cols))), shape=(n, npar))
    W = w[k_idx, t_idx]
    diag = np.asarray(A.multiply(A).T @ W).ravel()  # the data part of the normal matrix's diagonal
    scale = float(np.mean(diag[diag > 0])) if n else 1.0
    prior_sigma = np.where(diag == 0, 1.0 / np.sqrt(scale), np.inf)
    gauge = sp.csr_matrix((np.full(K, np.sqrt(scale)), (np.zeros(K, int), nt + np.arange(K))), shape=(1, npar))
    sol, N = wls(
        A, y[k_idx, t_idx], weights=W, prior_sigma=prior_sigma, penalty=gauge, method="sparse", return_normal=True
    )
    c, a, e = sol[:nt], sol[nt : nt + K], sol[nt + K :]
    e_err = np.zeros(2)
    if ne:
        unit = np.zeros((npar, ne))
        unit[nt + K + np.arange(ne), np.arange(ne)] = 1.0
        cov = np.asarray(spla.spsolve(N, unit)).reshape(npar, ne)  # the columns of N^-1 for E
        e_err = np.sqrt(np.abs(cov[nt + K + np.arange(ne), np.arange(ne)]))
    Wt = w.sum(axis=0)
    with np.errstate(divide="ignore"):
        c_err = np.where(Wt > 0, 1.0 / np.sqrt(Wt), np.nan)
    c = np.where(Wt > 0, c, np.nan)
    return c, a, (e if ne else np.zeros(2)), e_err, c_err


def _recentre(v, m):
    """v minus its mean over the mask m, per row (ntile, ntime)."""
    cnt = np.maximum(m.sum(axis=1, keepdims=True), 1)
    return v - np.where(m, v, 0.0).sum(axis=1, keepdims=True) / cnt


def _gains(y, model, w):
    """Eq. 2 per tile: least-squares factor between the tile's offsets and the model (both re-centred)."""
    m = w > 0
    yc, mc = _recentre(y, m), _recentre(model, m)
    num = np.where(m, w * yc * mc, 0.0).sum(axis=1)
    den = np.where(m, w * mc**2, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den, 1.0 / np.sqrt(den)


def _spans_plane(delta) -> bool:
    """True when the tile centres are not all on one line (E is then constrained)."""
    if delta.shape[0] < 3:
        return False
    G = np.column_stack([np.ones(delta.shape[0]), delta])
    s = np.linalg.svd(G, compute_uv=False)
    return bool(s[-1] > 1e-6 * s[0])


def fit_ccd_motion(
    tiles: dict,
    *,
    gain_tolerance: float = 0.05,
    clip: float = 5.0,
    differential: bool = True,
    min_tiles_differential: int = 8,
    max_iter: int = 10,
) -> dict:
    """Fit eq. 1 (module docstring) to the scene offsets of a CCD's tiles.

    ``tiles``: {tile id: {time, column, row, column_err, row_err, good, center (x, y) [CCD px]}} (the
    ``scene_offsets`` step's arrays). Returns a dict of arrays: ``time``, ``column``/``row`` (c_t),
    ``column_err``/``row_err``, ``E`` (2 x 2: rows = axis column/row, columns = d/dx, d/dy [px per px per
    half-span]), ``E_err``, ``x0``/``y0``, ``t_mid``/``t_half``, ``differential``, and per tile (in
    ``tile_ids`` order): ``center``, ``gain`` (ntile, 2), ``gain_err``, ``flagged``, ``in_fit``,
    ``error_scale`` (s_k, 2), ``n_clipped``, ``rms_model`` [px] (tile minus model, re-centred) and
    ``model_column``/``model_row`` (ntile, ntime): the CCD model at the tile centre, re-centred on the
    tile's good cadences.
    """
    time = check_tiles(tiles)
    ids = list(tiles)
    K, nt = len(ids), time.size
    center = np.array([np.asarray(tiles[k]["center"], float) for k in ids]).reshape(K, 2)
    x0 = center.mean(axis=0)
    delta = center - x0
    fin_t = np.isfinite(time)
    t_mid = 0.5 * (np.nanmin(time) + np.nanmax(time))
    t_half = max(0.5 * (np.nanmax(time) - np.nanmin(time)), 1e-9)
    tau = np.where(fin_t, (time - t_mid) / t_half, 0.0)
    Y, S, M = [], [], []
    for ax in AXES:
        y = np.array([np.asarray(tiles[k][ax], float) for k in ids])
        s = np.array([np.asarray(tiles[k][f"{ax}_err"], float) for k in ids])
        Y.append(y)
        S.append(s)
    good = np.array([np.asarray(tiles[k].get("good", np.ones(nt, bool)), bool) for k in ids])
    M = good & fin_t[None, :]
    for y, s in zip(Y, S):
        M &= np.isfinite(y) & np.isfinite(s) & (s > 0)
    if M.sum(axis=1).max(initial=0) < 3:
        raise CCDMotionError("fewer than 3 good cadences with offsets in every tile")
    n_min = max(1, (K + 1) // 2)
    scale = np.ones((K, 2))
    clipped = np.zeros((K, nt), bool)
    in_fit = np.ones(K, bool)
    for it in range(int(max_iter) + 2 * K):
        use_diff = bool(differential) and in_fit.sum() >= int(min_tiles_differential) and _spans_plane(delta[in_fit])
        fits, model, gains, gerr = [], [], [], []
        for a in range(2):
            w = np.where(M & ~clipped & in_fit[:, None], 1.0 / (scale[:, [a]] * S[a]) ** 2, 0.0)
            c, aa, e, e_err, c_err = _fit_axis(Y[a], w, tau, delta, use_diff)
            fits.append((c, e, e_err, c_err))
            mod = c[None, :] + tau[None, :] * (delta @ e)[:, None]
            model.append(mod)
            g, ge = _gains(Y[a], mod, np.where(M & ~clipped, 1.0 / S[a] ** 2, 0.0))
            gains.append(g)
            gerr.append(ge)
        gain = np.column_stack(gains)
        dev = np.nan_to_num(np.nanmax(np.abs(gain - 1), axis=1), nan=np.inf)
        bad = ~(dev <= gain_tolerance)
        new_clip = np.zeros_like(clipped)
        new_scale = np.ones((K, 2))
        for a in range(2):
            m = M & ~clipped
            r = (_recentre(Y[a], m) - _recentre(model[a], m)) / S[a]
            for k in range(K):
                rk = r[k][m[k]]
                new_scale[k, a] = max(1.0, float(np.sqrt(np.mean(rk**2)))) if rk.size else 1.0
            new_clip |= M & (np.abs(r) > clip * new_scale[:, [a]])
        # backward elimination: the worst flagged tile in the fit leaves it (one at a time, at least n_min
        # stay); once none is left to drop, flagged tiles re-enter if the model now finds them fine
        new_in = in_fit.copy()
        drop = np.flatnonzero(in_fit & bad)
        if drop.size and in_fit.sum() > n_min:
            new_in[drop[np.argmax(dev[drop])]] = False
        else:
            new_in |= ~bad
        done = np.array_equal(new_in, in_fit) and np.array_equal(new_clip, clipped)
        in_fit, clipped, scale = new_in, new_clip, new_scale
        log.info(
            "CCD motion iteration %d: %d of %d tiles in the fit, %d flagged, %d cadences clipped",
            it,
            in_fit.sum(),
            K,
            bad.sum(),
            clipped.sum(),
        )
        if done:
            break
    m = M & ~clipped
    sq = sum(np.where(m, (_recentre(Y[a], m) - _recentre(model[a], m)) ** 2, np.nan) for a in range(2))
    with np.errstate(invalid="ignore"):
        rms = np.sqrt(np.nanmean(sq, axis=1))
    out = dict(
        time=time,
        t_mid=np.float64(t_mid),
        t_half=np.float64(t_half),
        x0=np.float64(x0[0]),
        y0=np.float64(x0[1]),
        differential=np.bool_(use_diff),
        E=np.vstack([fits[0][1], fits[1][1]]),
        E_err=np.vstack([fits[0][2], fits[1][2]]),
        tile_ids=np.array(ids),
        center=center,
        gain=gain,
        gain_err=np.column_stack(gerr),
        flagged=bad,
        in_fit=in_fit,
        error_scale=scale,
        n_clipped=clipped.sum(axis=1),
        rms_model=rms,
    )
    for a, ax in enumerate(AXES):
        out[ax] = fits[a][0]
        out[f"{ax}_err"] = fits[a][3]
        out[f"model_{ax}"] = np.where(fin_t[None, :], _recentre(model[a], M), np.nan)
    for k in np.flatnonzero(bad):
        log.warning(
            "CCD motion: tile %s gain %.3f / %.3f (column / row) outside 1 +- %.2f: flagged, left out of the fit",
            ids[k],
            gain[k, 0],
            gain[k, 1],
            gain_tolerance,
        )
    return out


def model_at(model: dict, x, y, time=None):
    """Eq. 1 without a_k at CCD pixel (x, y): c_t + tau_t E (x - x0, y - y0)^T per axis, ``(column, row)``
    [px] at the model's cadences; ``time`` given: checked against them (same cadences or a CCDMotionError)."""
    t = np.asarray(model["time"], float)
    if time is not None:
        tt = np.asarray(time, float)
        if tt.shape != t.shape or not np.allclose(tt, t, rtol=0, atol=1e-6, equal_nan=True):
            raise CCDMotionError(
                f"the CCD motion model has {t.size} cadences, the tile {tt.size} (or other times): rerun ccd_motion"
            )
    tau = (t - float(model["t_mid"])) / float(model["t_half"])
    d = np.array([float(x) - float(model["x0"]), float(y) - float(model["y0"])])
    E = np.asarray(model["E"], float)
    return tuple(np.asarray(model[ax], float) + tau * (E[a] @ d) for a, ax in enumerate(AXES))


def qa_summary(model: dict, gain_tolerance: float) -> dict:
    """The per-tile QA of a fitted model as JSON-ready values."""
    tiles = []
    for k, tid in enumerate(model["tile_ids"]):
        tiles.append(
            dict(
                tile=str(tid),
                center=[float(v) for v in model["center"][k]],
                gain_column=float(model["gain"][k, 0]),
                gain_row=float(model["gain"][k, 1]),
                gain_err=[float(v) for v in model["gain_err"][k]],
                flagged=bool(model["flagged"][k]),
                in_fit=bool(model["in_fit"][k]),
                error_scale=[float(v) for v in model["error_scale"][k]],
                n_clipped=int(model["n_clipped"][k]),
                rms_model_mpx=float(1000 * model["rms_model"][k]),
            )
        )
    return dict(
        equation="y_kt = a_k + c_t + tau_t E (x_k - x0, y_k - y0); gain g_k = sum w y m / sum w m^2",
        gain_tolerance=float(gain_tolerance),
        differential=bool(model["differential"]),
        E=[[float(v) for v in r] for r in model["E"]],
        E_err=[[float(v) for v in r] for r in model["E_err"]],
        x0=float(model["x0"]),
        y0=float(model["y0"]),
        n_tiles=len(tiles),
        n_flagged=int(np.sum(model["flagged"])),
        flagged=[t["tile"] for t in tiles if t["flagged"]],
        tiles=tiles,
    )


def load_tile_offsets(path) -> dict:
    """One tile's ``scene_offsets.npz`` (the ``scene_offsets`` step) as the dict :func:`fit_ccd_motion` takes."""
    keys = ("time", "column", "row", "column_err", "row_err", "good", "center")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise CCDMotionError(f"{path}: not a scene-offsets file (no {', '.join(missing)})")
            return {k: z[k] for k in keys}
    except (OSError, ValueError) as exc:
        if isinstance(exc, CCDMotionError):
            raise
        raise CCDMotionError(f"{path}: unreadable scene-offsets file ({exc})") from exc


def load_ccd_motion(path) -> dict:
    """A ``ccd_motion.npz`` written by the ``ccd_motion`` step (:func:`fit_ccd_motion`'s arrays)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise CCDMotionError(f"{path}: unreadable CCD motion model ({exc})") from exc
    missing = [k for k in ("time", "t_mid", "t_half", "x0", "y0", "E", "column", "row", "tile_ids") if k not in out]
    if missing:
        raise CCDMotionError(f"{path}: not a CCD motion model (no {', '.join(missing)})")
    return out


def load_ccd_motion_qa(path) -> dict:
    """A ``ccd_motion.json`` written by the ``ccd_motion`` step (:func:`qa_summary`: ``gain_tolerance``, ``tiles``
    with each tile's ``gain_column``/``gain_row``, ``gain_err``, ``flagged``, ``in_fit``, ...)."""
    try:
        qa = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CCDMotionError(f"{path}: unreadable CCD motion QA ({exc})") from exc
    if not isinstance(qa, dict) or not isinstance(qa.get("tiles"), list) or "gain_tolerance" not in qa:
        raise CCDMotionError(f"{path}: not a CCD motion QA file (no `tiles` list or `gain_tolerance`)")
    keys = ("tile", "gain_column", "gain_row", "gain_err", "flagged", "in_fit")
    for t in qa["tiles"]:
        missing = [k for k in keys if k not in t]
        if missing:
            raise CCDMotionError(f"{path}: a tile record has no {', '.join(missing)}")
    return qa
