"""LFD per-cadence flux solve (Hedges & Martinez-Palomera 2021, §4.4, §4.5 eq. 25, §4.6, App. B).

For every cadence ``t`` the pixel data ``f_t`` (length npixel) are modelled as (eq. 16, 25)

    f_t = X_t w_t + B b_t ,     X_t = S ∘ M_t

where ``S`` (npixel x nsource, sparse) is the mean-frame PRF scene matrix (eq. 15, columns
normalised so the weights ``w_t`` are total source fluxes in e-/s), ``M_t`` is the motion model of
§4.5 (eq. 24: one multiplicative factor per nonzero of ``S``; all ones without motion) and ``B``
a small per-cadence background design (the PRF step's polynomial in column/row). With the data
covariance ``C_t = diag(sigma_t^2)`` and Gaussian priors ``w ~ N(mu, sigma_w^2)`` (App. B), the
best-fitting weights and their covariance are (eqs. B3-B6)

    (X^T C^-1 X + diag(1/sigma_w^2)) w = X^T C^-1 f + mu / sigma_w^2,
    cov(w) = (X^T C^-1 X + diag(1/sigma_w^2))^-1 .

NaN pixels get zero weight; quality-flagged cadences are solved like the others (and flagged by
the caller). Work shared by all cadences (§4.6 sparsity) is done once in :func:`build_system`:
the sparsity pattern of ``X`` and of the normal matrix ``N = X^T C^-1 X``, the map from products
of design-matrix entries to entries of ``N`` (so ``N_t`` is refilled on the fixed pattern with a
single ``bincount``), the fill-reducing ordering (reused for every cadence), and the
factorisation of the mean-frame normal matrix. Two per-cadence solvers:

``direct``  refill ``N_t`` on the fixed pattern, sparse LU (SuperLU, ordering reused, no
            pivoting: ``N_t`` is SPD), exact flux errors = diag(N_t^-1) from blocked solves
            against identity columns (never forming the dense inverse).
``pcg``     conjugate gradients on ``N_t w = r_t`` using only sparse mat-vecs with ``X_t``,
            preconditioned with the mean-frame LU and warm-started from the previous cadence.
            Flux errors: ``var_i = [diag(Nbar^-1) diag(Nbar)]_i / N_t,ii`` — the exact crowding
            inflation of the mean frame times the cadence's own Fisher information (exact up to
            the small frame-to-frame change of the crowding term).

Time is split in fixed chunks (``time_chunk``; independent of the number of threads, so results
do not depend on it) that are solved in parallel with dask.

Two additions in :func:`flux_solve_step`, both on by default and both switchable off (then the
solve is the paper's):

* *Blends* (App. B, "place narrow priors on these targets"): a source within ``blend_radius``
  (0.5 px) of a brighter one has nearly the same scene column; its prior width is
  ``blend_prior_fraction`` of its mean flux, so the blend's variability goes to the brighter
  member instead of being traded cadence by cadence (:func:`blended_sources`).
* *Offset decorrelation*: with the shift motion model, a per-source polynomial in the measured
  scene offset, fitted on the high-passed light curve, is removed (:func:`decorrelate_offsets`).
  It absorbs what the mean-frame PRF's small core errors leave in the fluxes as the scene moves
  (on the default synthetic fields the isolated bright stars' point-to-point scatter goes from
  1.1-1.5x to 1.05-1.07x the injected noise).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .logs import get_logger
from .settings import merge_settings

log = get_logger("solve")

class SolveError(ValueError):
    """The flux solve cannot run on these inputs; the message says why."""


# --------------------------------------------------------------------------- designs

def background_design(pixel_col, pixel_row, order: int) -> np.ndarray:
    """Per-cadence background design ``B`` (npixel x nbk): the same polynomial in (column, row) as
    the PRF step's mean-frame fit (:func:`workflow_lib.prf.background_design`; order 0 = constant,
    1 = plane, -1 = none), refitted at every cadence jointly with the source fluxes."""
    from .prf import background_design as _bd

    return _bd(pixel_col, pixel_row, int(order))


def scene_pairs(scene: sp.csr_matrix, pixel_col, pixel_row, source_col, source_row):
    """The (source, pixel) pairs of §4.5 at every stored entry of the scene matrix: returns the
    canonical csr scene, the pixel (row) and source (column) index of each entry in the order of
    ``scene.data``, and the pixel-minus-source offsets (dx, dy) [px]."""
    scene = sp.csr_matrix(scene)
    scene.sum_duplicates()
    scene.sort_indices()
    rows = np.repeat(np.arange(scene.shape[0]), np.diff(scene.indptr))
    cols = scene.indices
    dx = np.asarray(pixel_col, float)[rows] - np.asarray(source_col, float)[cols]
    dy = np.asarray(pixel_row, float)[rows] - np.asarray(source_row, float)[cols]
    return scene, rows, cols, dx, dy


def scene_offsets(scene: sp.csr_matrix, pixel_col, pixel_row, source_col, source_row):
    """Pixel-minus-source offsets (dx, dy) [px] at every stored entry of the scene matrix, in
    the order of ``scene.data`` (csr, canonical). These are the (source, pixel) pairs of §4.5."""
    return scene_pairs(scene, pixel_col, pixel_row, source_col, source_row)[3:]


# --------------------------------------------------------------------------- shared work

@dataclasses.dataclass
class FluxSystem:
    """Everything about the linear system that does not change from cadence to cadence."""

    nsource: int
    nbk: int
    npixel: int
    x_indptr: np.ndarray        # csr pattern of X = [S | B]  (npixel x (nsource+nbk))
    x_indices: np.ndarray
    x_data0: np.ndarray         # values of X in the mean frame (motion factor = 1)
    s_pos: np.ndarray           # positions in x_data of the S entries (order of S.data)
    x_rows: np.ndarray          # pixel of every entry of X
    pair_a: np.ndarray | None   # entry pairs (a, b) in one pixel row -> N entry pair_n
    pair_b: np.ndarray | None
    pair_n: np.ndarray | None
    n_indptr: np.ndarray | None  # csc pattern of the permuted normal matrix
    n_indices: np.ndarray | None
    n_diag_pos: np.ndarray | None
    perm: np.ndarray            # fill-reducing ordering: permuted N' = N[perm][:, perm]
    inv_perm: np.ndarray        # position of variable j in the permuted order
    prior_mu: np.ndarray        # (nsource+nbk,)
    prior_ivar: np.ndarray      # 1 / sigma_w^2
    mean_ivar: np.ndarray       # per-pixel 1/sigma^2 of one cadence, averaged (mean frame)
    mean_lu: object = None      # SuperLU of the mean-frame normal matrix (original order)
    crowding: np.ndarray | None = None  # diag(Nbar^-1) * diag(Nbar) per variable
    mean_n: object = None       # mean-frame normal matrix (csc): mean_lu is refactorised from it after unpickling

    def __getstate__(self):
        # SuperLU objects cannot be pickled (dask processes / distributed workers): ship N, refactorise there
        state = dict(self.__dict__)
        state["mean_lu"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.mean_lu is None and self.mean_n is not None:
            self.mean_lu = _mean_frame_lu(self.mean_n)

    @property
    def nvar(self) -> int:
        return self.nsource + self.nbk

    def design(self, factor=None) -> sp.csr_matrix:
        """X_t = [S ∘ M_t | B] as csr; ``factor`` multiplies the S entries (eq. 25)."""
        data = self.x_data0.copy()
        if factor is not None:
            data[self.s_pos] *= factor
        return sp.csr_matrix((data, self.x_indices, self.x_indptr), shape=(self.npixel, self.nvar))


def _mean_frame_lu(N0):
    """Sparse LU of the mean-frame normal matrix, with a fill-reducing symmetric ordering."""
    return spla.splu(N0, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})


def build_system(scene, background, prior_mu, prior_sigma, mean_flux_err, *, direct: bool = True,
                 pcg: bool = False) -> FluxSystem:
    """Precompute the fixed-pattern structures shared by every cadence (§4.6).

    ``scene`` is S (npixel x nsource), ``background`` B (npixel x nbk), ``prior_mu`` /
    ``prior_sigma`` the Gaussian prior of all nsource+nbk weights (App. B, eqs. B5-B6),
    ``mean_flux_err`` the typical per-cadence error of every pixel (NaN = unusable pixel).
    ``direct`` builds the normal-matrix pattern and pair map; ``pcg`` the mean-frame
    preconditioner and crowding factors.
    """
    S = sp.csr_matrix(scene, dtype=float)
    S.sum_duplicates()
    S.sort_indices()
    B = np.asarray(background, dtype=float)
    npix, nsrc = S.shape
    if B.shape[0] != npix:
        raise SolveError(f"background design has {B.shape[0]} rows, scene matrix {npix}")
    nbk = B.shape[1]
    nvar = nsrc + nbk
    prior_mu = np.asarray(prior_mu, float)
    prior_sigma = np.asarray(prior_sigma, float)
    if prior_mu.shape != (nvar,) or prior_sigma.shape != (nvar,):
        raise SolveError(f"priors must have length nsource+nbk = {nvar}")
    if not np.all(prior_sigma > 0):
        raise SolveError("prior sigmas must be positive")

    # X = [S | B] in csr, row p holds S entries then the nbk background entries
    m_s = np.diff(S.indptr)
    m = m_s + nbk
    indptr = np.concatenate([[0], np.cumsum(m)])
    nnz = int(indptr[-1])
    rows = np.repeat(np.arange(npix), m)
    within = np.arange(nnz) - indptr[rows]
    is_s = within < m_s[rows]
    indices = np.empty(nnz, dtype=np.int64)
    data = np.empty(nnz)
    s_pos = np.flatnonzero(is_s)
    indices[s_pos] = S.indices
    data[s_pos] = S.data
    b_pos = np.flatnonzero(~is_s)
    kb = within[b_pos] - m_s[rows[b_pos]]
    indices[b_pos] = nsrc + kb
    data[b_pos] = B[rows[b_pos], kb]

    err = np.asarray(mean_flux_err, float)
    ivar = np.where(np.isfinite(err) & (err > 0), 1.0 / np.where(err > 0, err, 1.0) ** 2, 0.0)
    prior_ivar = 1.0 / prior_sigma**2

    # fill-reducing ordering of the mean-frame normal matrix, computed once
    X0 = sp.csr_matrix((data, indices, indptr), shape=(npix, nvar))
    N0 = (X0.T @ sp.diags(ivar) @ X0 + sp.diags(prior_ivar)).tocsc()
    lu0 = _mean_frame_lu(N0)
    inv_perm = np.asarray(lu0.perm_c)      # new position of variable j (SuperLU's Pc)
    perm = np.empty_like(inv_perm)         # variable at new position c: N' = N[perm][:, perm]
    perm[inv_perm] = np.arange(nvar)

    sys = FluxSystem(nsource=nsrc, nbk=nbk, npixel=npix, x_indptr=indptr, x_indices=indices,
                     x_data0=data, s_pos=s_pos, x_rows=rows, pair_a=None, pair_b=None, pair_n=None,
                     n_indptr=None, n_indices=None, n_diag_pos=None, perm=perm, inv_perm=inv_perm,
                     prior_mu=prior_mu, prior_ivar=prior_ivar, mean_ivar=ivar)

    if direct:
        # all products x_pa * x_pb of two entries in the same pixel row, mapped to N entries
        reps = m[rows]
        pair_a = np.repeat(np.arange(nnz), reps)
        first = np.repeat(indptr[rows], reps)
        start_of_group = np.repeat(np.cumsum(reps) - reps, reps)
        pair_b = first + (np.arange(pair_a.size) - start_of_group)
        ca = inv_perm[indices[pair_a]]
        cb = inv_perm[indices[pair_b]]
        diag_keys = np.arange(nvar, dtype=np.int64) * (nvar + 1)
        keys = np.concatenate([cb.astype(np.int64) * nvar + ca, diag_keys])  # column-major (csc)
        ukeys, inv = np.unique(keys, return_inverse=True)
        sys.pair_a, sys.pair_b = pair_a, pair_b
        sys.pair_n = inv[: pair_a.size]
        sys.n_diag_pos = inv[pair_a.size:]
        ncol = ukeys // nvar
        sys.n_indices = (ukeys % nvar).astype(np.int32)
        sys.n_indptr = np.searchsorted(ncol, np.arange(nvar + 1)).astype(np.int32)
    if pcg:
        sys.mean_lu = lu0
        sys.mean_n = N0
        sys.crowding = _diag_of_inverse(lu0, nvar) * N0.diagonal()
    return sys


def _diag_of_inverse(lu, n: int, block: int = 256) -> np.ndarray:
    """diag(A^-1) from a factorisation by blocked solves against identity columns; memory
    O(n * block), the dense inverse is never formed."""
    out = np.empty(n)
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        E = np.zeros((n, j1 - j0))
        E[np.arange(j0, j1), np.arange(j1 - j0)] = 1.0
        Z = lu.solve(E)
        out[j0:j1] = Z[np.arange(j0, j1), np.arange(j1 - j0)]
    return out


# --------------------------------------------------------------------------- one cadence

def _weights(flux_t, err_t):
    ok = np.isfinite(flux_t) & np.isfinite(err_t) & (err_t > 0)
    w = np.zeros(flux_t.shape)
    w[ok] = 1.0 / err_t[ok] ** 2
    y = np.where(ok, flux_t, 0.0)
    return w, y


def solve_direct(sys: FluxSystem, flux_t, err_t, factor=None, errors: bool = True, crowding=None,
                 return_crowding: bool = False):
    """Exact solution of eqs. B3-B4 for one cadence on the fixed pattern. Returns (w, sigma_w).

    Errors: exact ``sqrt(diag(N_t^-1))`` (blocked solves against identity columns), or, when
    ``crowding`` (per variable ``diag(N_ref^-1) * diag(N_ref)`` of a reference cadence) is given,
    ``sqrt(crowding / diag(N_t))``: the crowding inflation of the reference times this cadence's own
    Fisher information, exact up to the change of the crowding term between the two cadences (the
    scene changes by the motion factor only, ~1e-3). ``return_crowding`` also returns the exact
    crowding of this cadence."""
    w, y = _weights(flux_t, err_t)
    xd = sys.x_data0.copy()
    if factor is not None:
        xd[sys.s_pos] *= factor
    vals = w[sys.x_rows[sys.pair_a]] * xd[sys.pair_a] * xd[sys.pair_b]
    ndata = np.bincount(sys.pair_n, weights=vals, minlength=sys.n_indices.size)
    ndata[sys.n_diag_pos] += sys.prior_ivar[sys.perm]
    N = sp.csc_matrix((ndata, sys.n_indices, sys.n_indptr), shape=(sys.nvar, sys.nvar))
    X = sp.csr_matrix((xd, sys.x_indices, sys.x_indptr), shape=(sys.npixel, sys.nvar))
    rhs = X.T @ (w * y) + sys.prior_mu * sys.prior_ivar
    lu = spla.splu(N, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    sol = lu.solve(rhs[sys.perm])[sys.inv_perm]
    if not errors:
        return sol, None
    ndiag = ndata[sys.n_diag_pos][sys.inv_perm]
    if crowding is not None and not return_crowding:
        return sol, np.sqrt(crowding / ndiag)
    var = _diag_of_inverse(lu, sys.nvar)[sys.inv_perm]
    if return_crowding:
        return sol, np.sqrt(var), var * ndiag
    return sol, np.sqrt(var)


def solve_pcg(sys: FluxSystem, flux_t, err_t, factor=None, x0=None, rtol: float = 1e-10, maxiter: int = 200):
    """Preconditioned CG for one cadence (mean-frame LU as preconditioner, warm start ``x0``).

    Returns (w, sigma_w, n_iterations)."""
    w, y = _weights(flux_t, err_t)
    X = sys.design(factor)
    XT = X.T.tocsr()
    rhs = XT @ (w * y) + sys.prior_mu * sys.prior_ivar

    def matvec(v):
        return XT @ (w * (X @ v)) + sys.prior_ivar * v

    lu = sys.mean_lu

    def precond(r):
        return lu.solve(r)

    x = np.array(sys.prior_mu if x0 is None else x0, dtype=float)
    r = rhs - matvec(x)
    bnorm = np.linalg.norm(rhs)
    z = precond(r)
    p = z.copy()
    rz = r @ z
    it = 0
    while np.linalg.norm(r) > rtol * bnorm and it < maxiter:
        Ap = matvec(p)
        alpha = rz / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        z = precond(r)
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
    # diagonal of N_t without forming it: sum_p w_p X_pi^2 + prior
    ndiag = np.bincount(X.indices, weights=X.data**2 * w[sys.x_rows], minlength=sys.nvar) + sys.prior_ivar
    sigma = np.sqrt(sys.crowding / ndiag)
    return x, sigma, it


# --------------------------------------------------------------------------- all cadences

def _solve_chunk(sys, method, flux, flux_err, i0, i1, motion_basis, motion_time, rtol, exact_errors=False):
    f = np.asarray(flux[i0:i1], dtype=float)
    e = np.asarray(flux_err[i0:i1], dtype=float)
    nt = i1 - i0
    out = np.full((nt, sys.nvar), np.nan)
    err = np.full((nt, sys.nvar), np.nan)
    iters = 0
    x_prev = None
    crowd = crowd_mask = None
    for k in range(nt):
        if not np.any(np.isfinite(f[k])):
            continue
        factor = None if motion_basis is None else motion_basis @ motion_time[i0 + k]
        if method == "direct":
            usable = np.isfinite(f[k]) & np.isfinite(e[k]) & (e[k] > 0)
            if exact_errors:
                out[k], err[k] = solve_direct(sys, f[k], e[k], factor)
            elif crowd is None or not np.array_equal(usable, crowd_mask):
                # exact errors at the chunk's first cadence (and at any cadence whose set of usable
                # pixels differs from it), that cadence's crowding for the others
                out[k], err[k], c = solve_direct(sys, f[k], e[k], factor, return_crowding=True)
                if crowd is None:
                    crowd, crowd_mask = c, usable
            else:
                out[k], err[k] = solve_direct(sys, f[k], e[k], factor, crowding=crowd)
        else:
            out[k], err[k], it = solve_pcg(sys, f[k], e[k], factor, x0=x_prev, rtol=rtol)
            iters += it
            x_prev = out[k]
    return out, err, iters


def source_flux(flux, flux_err, scene, background, prior_mu, prior_sigma, *, motion_basis=None,
                motion_time=None, method: str = "auto", direct_max_sources: int = 3000,
                time_chunk: int = 64, threads: int = 1, dask_scheduler: str | None = None,
                rtol: float = 1e-10, exact_errors: bool = False):
    """Least-squares flux of every source at every cadence (§4.4-4.5, App. B).

    Parameters
    ----------
    flux, flux_err : (ntime, npixel) arrays (numpy or dask; read one time chunk at a time).
    scene : S, sparse (npixel x nsource), mean-frame PRF scene matrix (eq. 15).
    background : B, (npixel x nbk) per-cadence background design (:func:`background_design`).
    prior_mu, prior_sigma : (nsource+nbk,) Gaussian prior (App. B eqs. B5-B6).
    motion_basis, motion_time : motion model as a low-rank product (eq. 24): the factor on the
        S entries (order of canonical csr ``S.data``) at cadence t is
        ``motion_basis @ motion_time[t]``; None = no motion (§4.4 model).
    method : 'direct', 'pcg' or 'auto' (direct when nsource <= direct_max_sources).
    exact_errors : direct only: diag(N_t^-1) at every cadence (slow: ~0.25 s per cadence for 550
        sources); default exact at the first cadence of each time chunk and the crowding factor of
        that cadence for the others (see :func:`solve_direct`).

    Returns
    -------
    dict with ``flux``, ``flux_err`` (nsource, ntime), ``background``, ``background_err``
    (nbk, ntime), ``method``, ``pcg_iterations``.
    """
    import time as _time

    from .parallel import dask_map

    t_start = _time.perf_counter()
    ntime, npix = flux.shape
    S = sp.csr_matrix(scene)
    if S.shape[0] != npix:
        raise SolveError(f"scene matrix has {S.shape[0]} pixels but the data have {npix}")
    if method == "auto":
        method = "direct" if S.shape[1] <= direct_max_sources else "pcg"
    if method not in ("direct", "pcg"):
        raise SolveError(f"unknown solve method {method!r}; expected direct, pcg or auto")
    if (motion_basis is None) != (motion_time is None):
        raise SolveError("motion_basis and motion_time go together")
    if motion_basis is not None:
        S.sum_duplicates()
        if motion_basis.shape[0] != S.nnz or motion_time.shape[0] != ntime:
            raise SolveError(f"motion model shapes {motion_basis.shape}, {motion_time.shape} do not match "
                             f"scene nnz {S.nnz} / {ntime} cadences")
    mean_err = np.sqrt(np.nanmean(np.asarray(flux_err[: min(ntime, 256)], dtype=float) ** 2, axis=0))
    sys = build_system(S, background, prior_mu, prior_sigma, mean_err,
                       direct=(method == "direct"), pcg=(method == "pcg"))
    log.info("flux solve: %d cadences, %d pixels, %d sources, %d background terms, method %s, "
             "X nnz %d, %d threads", ntime, npix, sys.nsource, sys.nbk, method, sys.x_indices.size, threads)
    t_setup = _time.perf_counter() - t_start
    bounds = [(i, min(ntime, i + time_chunk)) for i in range(0, ntime, time_chunk)]
    results = dask_map(_solve_chunk, [dict(i0=i0, i1=i1) for i0, i1 in bounds], threads=threads, scheduler=dask_scheduler,
                       shared=dict(sys=sys, method=method, flux=flux, flux_err=flux_err, motion_basis=motion_basis,
                                   motion_time=motion_time, rtol=rtol, exact_errors=exact_errors))
    sol = np.concatenate([r[0] for r in results], axis=0).T
    err = np.concatenate([r[1] for r in results], axis=0).T
    iters = int(sum(r[2] for r in results))
    return {
        "flux": sol[: sys.nsource],
        "flux_err": err[: sys.nsource],
        "background": sol[sys.nsource:],
        "background_err": err[sys.nsource:],
        "method": method,
        "pcg_iterations": iters,
        "setup_seconds": t_setup,                                   # timing only, never written
        "solve_seconds": _time.perf_counter() - t_start - t_setup,
    }


# --------------------------------------------------------------------------- pipeline step

#: defaults of ``lfd.solve`` (config/schema.yaml holds the same values)
SOLVE_DEFAULTS = {
    "use_motion": True,
    "method": "auto",
    "direct_max_sources": 3000,
    "time_chunk": 64,
    "prior_sigma_factor": 10.0,
    "rtol": 1e-10,
    "dask_scheduler": None,
    "write_fits": True,
    "background_order": None,
    "exact_errors": False,
    "blend_radius": 0.5,
    "blend_prior_fraction": 0.05,
    "offset_decorrelation_degree": 2,
    "offset_decorrelation_window": 1.0,
}


def solve_params(params: dict | None) -> dict:
    """The lfd.solve settings: defaults overridden by ``params``."""
    return merge_settings(SOLVE_DEFAULTS, params, "lfd.solve", SolveError)


def load_field_scene(cube_path, catalog_path, prf_npz):
    """Open a field for LFD: the (lazy) pixel table, the catalog, the PRF model and the mean scene.

    Sources are those of the catalog; the ones the PRF step removed (negative mean flux, §4.4)
    are left out of the model (``active`` False). Returns a dict.
    """
    from astropy.table import Table

    from .cube import as_pixel_table, open_cube
    from .prf import PRFModel, scene_matrix

    cube = open_cube(cube_path)
    table = as_pixel_table(cube, drop_nan=False)
    try:
        catalog = Table.read(str(catalog_path), format="ascii.ecsv")
    except Exception as exc:
        raise SolveError(f"{catalog_path}: cannot read the catalog ({exc})") from exc
    try:
        model = PRFModel.load(prf_npz)
    except Exception as exc:
        raise SolveError(f"{prf_npz}: not a readable PRF model ({exc})") from exc
    sid = np.asarray(catalog["source_id"], dtype=np.int64)
    if model.source_id is None or model.source_flux is None:
        raise SolveError(f"{prf_npz}: PRF model has no mean-frame source fluxes")
    if not np.array_equal(np.asarray(model.source_id, np.int64), sid):
        raise SolveError(f"{prf_npz}: source list differs from {catalog_path}; rerun the PRF step")
    mean_flux = np.asarray(model.source_flux, float)
    active = np.isfinite(mean_flux)   # sources the PRF step dropped (significantly negative flux) are NaN
    pc = np.asarray(table["column"].values, float)
    pr = np.asarray(table["row"].values, float)
    sc = np.asarray(catalog["column"], float)
    sr = np.asarray(catalog["row"], float)
    idx = np.flatnonzero(active)
    S = scene_matrix(model, sc[idx], sr[idx], pc, pr).tocsr()
    S.sum_duplicates()
    S.sort_indices()
    return dict(cube=cube, table=table, catalog=catalog, model=model, active=active, idx=idx, S=S,
                pc=pc, pr=pr, sc=sc, sr=sr, mean_flux=mean_flux)


def blended_sources(column, row, flux, radius: float):
    """Sources that the data cannot separate from a brighter neighbour (App. B).

    A source is *blended* when a brighter source (larger mean-frame flux) lies within ``radius``
    pixels: at a fraction of a pixel the two PRFs are nearly the same column of the scene matrix,
    so the per-cadence split of their summed flux is set by noise and motion-model errors, and
    their flux errors are strongly anti-correlated. The paper (App. B, on sources the scene
    model cannot constrain) suggests narrow priors that hold such fluxes near their a-priori
    values; :func:`flux_solve_step` does that, so the variability of a blend is assigned to
    its brightest member. Returns a boolean array (nsource,).
    """
    from scipy.spatial import cKDTree

    xy = np.column_stack([np.asarray(column, float), np.asarray(row, float)])
    flux = np.asarray(flux, float)
    out = np.zeros(len(xy), bool)
    if radius <= 0 or len(xy) < 2:
        return out
    i, j = cKDTree(xy).query_pairs(float(radius), output_type="ndarray").T
    out[np.where(flux[i] >= flux[j], j, i)] = True   # the fainter of each close pair
    return out


def decorrelate_offsets(time, flux, cx, cy, good, *, degree: int = 2, window_days: float = 1.0, n_iter: int = 3,
                        clip: float = 4.0):
    """Remove from every light curve the part that follows the measured scene offset.

    A mean-frame PRF model that is slightly wrong in the core gives fluxes that depend on where
    the star sits on the pixel grid: ``F_t = F (1 + g(c_t))`` with ``c_t`` the common scene
    offset of cadence t (measured by the shift motion model, §4.5). Per source, ``g`` is fitted
    as a polynomial of total degree ``degree`` in (cx, cy) (:func:`workflow_lib.motion.shift_monomials`
    without the constant) -- the same decorrelation against the pointing that K2 and TESS
    pipelines apply to aperture photometry. The coefficients are estimated from the
    *high-passed* series only (flux and monomials minus their running median over
    ``window_days``), so slow astrophysical variability, which may be correlated with the slow
    drift, cannot bias them; eclipses, flares and transients are removed by iterative
    ``clip``-sigma clipping (MAD) of each source's high-passed residuals. The fitted ``g`` is then
    subtracted with the *full* offsets (the error depends on the offset, not on its time scale),
    keeping each light curve's mean over ``good`` cadences.

    ``flux`` (nsource, ntime); ``cx``, ``cy`` (ntime,) [px], NaN where not measured; ``good``
    (ntime,) bool. Returns ``(corrected flux, coefficients (nsource, nterm))``; cadences without
    an offset are returned unchanged.
    """
    from scipy.ndimage import median_filter

    from .motion import n_terms, shift_monomials

    flux = np.asarray(flux, float)
    time = np.asarray(time, float)
    cx = np.asarray(cx, float)
    cy = np.asarray(cy, float)
    have = np.isfinite(cx) & np.isfinite(cy)
    use = np.asarray(good, bool) & have
    nterm = n_terms(degree) - 1      # the offset monomials without the constant
    coef = np.zeros((flux.shape[0], max(nterm, 0)))
    if degree < 1 or use.sum() < 10 * max(nterm, 1):
        return flux.copy(), coef
    M = np.zeros((time.size, nterm))
    M[have] = shift_monomials(cx[have], cy[have], degree)[:, 1:]
    dt = np.nanmedian(np.diff(time[use])) if use.sum() > 1 else 1.0
    win = max(3, int(round(window_days / dt)) | 1)
    iu = np.flatnonzero(use)
    X = M[iu] - median_filter(M[iu], size=(win, 1), mode="nearest")
    Y = flux[:, iu]
    fin = np.isfinite(Y)
    Yf = np.where(fin, Y, np.nanmedian(np.where(fin, Y, np.nan), axis=1, keepdims=True) if fin.any() else 0.0)
    Yf = np.where(np.isfinite(Yf), Yf, 0.0)
    Yh = Yf - median_filter(Yf, size=(1, win), mode="nearest")
    w = fin.astype(float)
    ridge = 1e-9 * np.trace(X.T @ X) / nterm
    for it in range(int(n_iter) + 1):
        N = np.einsum("tk,st,tl->skl", X, w, X) + ridge * np.eye(nterm)
        rhs = np.einsum("tk,st->sk", X, w * Yh)
        coef = np.linalg.solve(N, rhs[:, :, None])[:, :, 0]
        if it == int(n_iter):
            break
        r = Yh - coef @ X.T
        mad = 1.4826 * np.median(np.abs(r - np.median(r, axis=1, keepdims=True)), axis=1, keepdims=True)
        w = (fin & (np.abs(r) <= clip * np.maximum(mad, 1e-30))).astype(float)
    Mc = np.where(have[:, None], M - M[iu].mean(axis=0), 0.0)
    out = flux - coef @ Mc.T
    return out, coef


def contamination_ratio(S, flux):
    """Per source: flux from other sources / own flux, summed over the source's aperture (the
    pixels where its PRF is modelled, i.e. its column of S); and the number of those pixels."""
    S = sp.csr_matrix(S)
    S.sum_duplicates()
    flux = np.asarray(flux, float)
    total = S @ flux
    rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
    own = S.data * flux[S.indices]
    other = total[rows] - own
    n = S.shape[1]
    own_sum = np.bincount(S.indices, weights=own, minlength=n)
    other_sum = np.bincount(S.indices, weights=other, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = other_sum / own_sum
    return ratio, np.bincount(S.indices, minlength=n)


def flux_solve_step(cube_path, catalog_path, prf_npz, motion_file, out_zarr, out_fits_dir, params: dict | None = None,
                    *, threads: int = 1):
    """Snakemake step: LFD light curves of every source (§4.4-4.5), zarr (atomic) + one FITS per source.

    The prior of every source is its mean-frame LFD flux from the PRF step (sigma =
    ``prior_sigma_factor`` x |flux|); background terms get the PRF step's polynomial and a flat
    prior. With ``use_motion`` the motion model (§4.5) multiplies the scene at every cadence.
    """
    from .cube import write_zarr_atomic
    from .lightcurve import lightcurve_set, write_lightcurve_fits
    from .metrics import add_cdpp
    from .motion import load_motion_model, motion_factors
    from .provenance import provenance_json

    p = solve_params(params)
    f = load_field_scene(cube_path, catalog_path, prf_npz)
    table, S, idx = f["table"], f["S"], f["idx"]
    border = f["model"].background_order if p["background_order"] is None else p["background_order"]
    B = background_design(f["pc"], f["pr"], border)
    mu_src = f["mean_flux"][idx]
    bk0 = np.zeros(B.shape[1])
    if f["model"].background is not None and len(f["model"].background) == B.shape[1]:
        bk0 = np.asarray(f["model"].background, float)
    prior_mu = np.concatenate([mu_src, bk0])
    # width: factor x |mean flux|, at least factor x the single-cadence error of that flux (faint
    # sources whose mean-frame flux is near zero keep a usable prior)
    n_good = max(int((np.asarray(table["quality"].values) == 0).sum()), 1)
    merr = f["model"].source_flux_err
    e1 = np.sqrt(n_good) * np.asarray(merr, float)[idx] if merr is not None else np.zeros(idx.size)
    e1 = np.where(np.isfinite(e1), e1, 0.0)
    sigma_src = p["prior_sigma_factor"] * np.maximum(np.maximum(np.abs(mu_src), e1), 1e-3)
    # App. B: narrow priors on sources the data cannot separate from a brighter neighbour
    blend = blended_sources(f["sc"][idx], f["sr"][idx], mu_src, p["blend_radius"])
    sigma_src = np.where(blend, p["blend_prior_fraction"] * np.maximum(np.abs(mu_src), 1e-3), sigma_src)
    if blend.any():
        log.info("%d sources within %.2f px of a brighter one: prior sigma %.3g x their mean flux (App. B)",
                 blend.sum(), p["blend_radius"], p["blend_prior_fraction"])
    prior_sigma = np.concatenate([sigma_src, np.full(B.shape[1], 1e6)])
    time = np.asarray(table["time"].values, float)
    basis = tb = None
    if p["use_motion"]:
        if motion_file is None:
            raise SolveError("use_motion is on but no motion model file was given")
        mm = load_motion_model(motion_file)
        dx, dy = scene_offsets(S, f["pc"], f["pr"], f["sc"][idx], f["sr"][idx])
        basis, tb = motion_factors(mm, dx, dy, time, prf=f["model"])
    # float32 in memory (64x64x1300: 21 MB); chunks are converted to float64 inside the solve
    res = source_flux(np.asarray(table["flux"].values), np.asarray(table["flux_err"].values), S, B, prior_mu, prior_sigma,
                      motion_basis=basis, motion_time=tb, method=p["method"],
                      direct_max_sources=p["direct_max_sources"], time_chunk=p["time_chunk"], threads=threads,
                      dask_scheduler=p["dask_scheduler"], rtol=p["rtol"], exact_errors=p["exact_errors"])
    sflux = res["flux"]
    deg = int(p["offset_decorrelation_degree"])
    if p["use_motion"] and deg > 0 and mm.time_model == "shift":
        cx, cy = np.full(time.size, np.nan), np.full(time.size, np.nan)
        known = np.isin(time, mm.reg_time)
        cx[known], cy[known] = mm.offsets(time[known])
        good = np.asarray(table["quality"].values) == 0
        sflux, _ = decorrelate_offsets(time, sflux, cx, cy, good, degree=deg, window_days=p["offset_decorrelation_window"])
        log.info("light curves decorrelated against the measured scene offset (degree %d, %.2f-d high-pass)", deg,
                 p["offset_decorrelation_window"])
    nsrc = len(f["catalog"])
    flux = np.full((nsrc, time.size), np.nan)
    err = np.full((nsrc, time.size), np.nan)
    flux[idx] = sflux
    err[idx] = res["flux_err"]
    contam = np.full(nsrc, np.nan)
    npx = np.zeros(nsrc, dtype=np.int64)
    contam[idx], npx[idx] = contamination_ratio(S, np.clip(mu_src, 0, None))
    cat = f["catalog"]
    cols = {"source_id": np.asarray(cat["source_id"], np.int64),
            "phot_g_mean_mag": np.asarray(cat["phot_g_mean_mag"], float),
            "column": f["sc"], "row": f["sr"], "contamination": contam, "n_pixels": npx,
            "in_model": f["active"], "mean_flux": f["mean_flux"]}
    if "on_cutout" in cat.colnames:
        cols["on_cutout"] = np.asarray(cat["on_cutout"], bool)
    prov = provenance_json("lfd_flux_solve", inputs=[cube_path, catalog_path, prf_npz] + ([motion_file] if p["use_motion"] else []),
                           config=p, method=res["method"])
    lc = lightcurve_set(flux, err, f["cube"], cols, method="LFD",
                        attrs={"provenance": prov, "use_motion": int(bool(p["use_motion"])), "solver": res["method"]})
    lc["background"] = (("background_term", "time"), res["background"], {"units": "electron / s"})
    lc = add_cdpp(lc)  # 1-h / 6-h CDPP proxy, stored with the light curves (comparable with RAW and CPM)
    write_zarr_atomic(lc, out_zarr)
    log.info("wrote %s (%d sources x %d cadences, %d in the model)", out_zarr, nsrc, time.size, idx.size)
    if p["write_fits"] and out_fits_dir is not None:
        paths = write_lightcurve_fits(lc, out_fits_dir, "lfd")
        log.info("wrote %d FITS light curves to %s", len(paths), out_fits_dir)
    return lc
