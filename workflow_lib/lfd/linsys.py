import dataclasses

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla


@dataclasses.dataclass
class FluxSystem:
    """Everything about the linear system that does not change from cadence to cadence."""

    nsource: int
    nbk: int
    npixel: int
    x_indptr: np.ndarray  # csr pattern of X = [S | B]  (npixel x (nsource+nbk))
    x_indices: np.ndarray
    x_data0: np.ndarray  # values of X in the mean frame (motion factor = 1)
    s_pos: np.ndarray  # positions in x_data of the S entries (order of S.data)
    x_rows: np.ndarray  # pixel of every entry of X
    pair_a: np.ndarray | None  # entry pairs (a, b) in one pixel row -> N entry pair_n
    pair_b: np.ndarray | None
    pair_n: np.ndarray | None  # -> entry of the upper triangle of the permuted normal matrix
    n_indptr: np.ndarray | None  # csc pattern of the permuted normal matrix
    n_indices: np.ndarray | None
    n_diag_pos: np.ndarray | None  # the diagonal's entries of the upper triangle
    perm: np.ndarray  # fill-reducing ordering: permuted N' = N[perm][:, perm]
    inv_perm: np.ndarray  # position of variable j in the permuted order
    prior_mu: np.ndarray  # (nsource+nbk,)
    prior_ivar: np.ndarray  # 1 / sigma_w^2
    mean_ivar: np.ndarray  # per-pixel 1/sigma^2 of one cadence, averaged (mean frame)
    mean_lu: object = None  # SuperLU of the mean-frame normal matrix (original order)
    crowding: np.ndarray | None = None  # diag(Nbar^-1) * diag(Nbar) per variable
    mean_n: object = None  # mean-frame normal matrix (csc): mean_lu is refactorised from it after unpickling
    n_full: np.ndarray | None = None  # csc entry of the permuted normal matrix -> its upper-triangle entry
    n_upper: int = 0  # stored entries of that upper triangle

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


def _design_pattern(S: sp.csr_matrix, B: np.ndarray):
    """The csr arrays of the design X = [S | B] (eq. 25 in the mean frame): row p holds the S entries of
    pixel p then its nbk background entries. Returns ``(indptr, indices, data, s_pos, rows, m)``:
    ``s_pos`` the positions of the S entries (order of ``S.data``), ``rows`` the pixel of every entry,
    ``m`` the number of entries per row."""
    npix, nsrc = S.shape
    nbk = B.shape[1]
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
    return indptr, indices, data, s_pos, rows, m


def _add_normal_pair_map(sys: FluxSystem, m: np.ndarray) -> None:
    """Set the pair map of ``sys`` for the direct solve: every product x_pa * x_pb of two entries in the
    same pixel row of X that lands on or above the diagonal of the permuted normal matrix
    N' = N[perm][:, perm], N = X^T C^-1 X + prior (App. B), mapped to its entry of N's upper triangle
    (``pair_a``/``pair_b``/``pair_n``; N is symmetric, so the products below the diagonal are the same
    numbers and are not formed); ``n_full`` maps every stored entry of the csc pattern of N'
    (``n_indices``/``n_indptr``) to its upper-triangle entry, ``n_diag_pos`` the diagonal's upper-triangle
    entries. ``m``: the number of X entries per pixel row."""
    indptr, indices, rows, inv_perm, nvar = sys.x_indptr, sys.x_indices, sys.x_rows, sys.inv_perm, sys.nvar
    nnz = int(indptr[-1])
    # all products x_pa * x_pb of two entries in the same pixel row, mapped to N entries
    reps = m[rows]
    pair_a = np.repeat(np.arange(nnz), reps)
    first = np.repeat(indptr[rows], reps)
    start_of_group = np.repeat(np.cumsum(reps) - reps, reps)
    pair_b = first + (np.arange(pair_a.size) - start_of_group)
    ca = inv_perm[indices[pair_a]].astype(np.int64)
    cb = inv_perm[indices[pair_b]].astype(np.int64)
    upper = ca <= cb  # (row ca, column cb) of N' on or above its diagonal
    pair_a, pair_b, ca, cb = pair_a[upper], pair_b[upper], ca[upper], cb[upper]
    diag = np.arange(nvar, dtype=np.int64)
    ukeys, inv = np.unique(np.concatenate([cb * nvar + ca, diag * (nvar + 1)]), return_inverse=True)
    sys.pair_a, sys.pair_b = pair_a, pair_b
    sys.pair_n = inv[: pair_a.size]
    sys.n_diag_pos = inv[pair_a.size :]
    sys.n_upper = int(ukeys.size)
    # the full symmetric pattern (column-major keys), each entry read from its upper-triangle twin
    ucol, urow = ukeys // nvar, ukeys % nvar
    fkeys = np.unique(np.concatenate([ukeys, urow * nvar + ucol]))
    fcol, frow = fkeys // nvar, fkeys % nvar
    sys.n_full = np.searchsorted(ukeys, np.minimum(frow, fcol) + np.maximum(frow, fcol) * nvar)
    sys.n_indices = frow.astype(np.int32)
    sys.n_indptr = np.searchsorted(fcol, np.arange(nvar + 1)).astype(np.int32)


def build_system(
    scene, background, prior_mu, prior_sigma, mean_flux_err, *, direct: bool = True, pcg: bool = False
) -> FluxSystem:
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

    indptr, indices, data, s_pos, rows, m = _design_pattern(S, B)

    err = np.asarray(mean_flux_err, float)
    ivar = np.where(np.isfinite(err) & (err > 0), 1.0 / np.where(err > 0, err, 1.0) ** 2, 0.0)
    prior_ivar = 1.0 / prior_sigma**2

    # fill-reducing ordering of the mean-frame normal matrix, computed once
    X0 = sp.csr_matrix((data, indices, indptr), shape=(npix, nvar))
    N0 = (X0.T @ sp.diags(ivar) @ X0 + sp.diags(prior_ivar)).tocsc()
    lu0 = _mean_frame_lu(N0)
    inv_perm = np.asarray(lu0.perm_c)  # new position of variable j (SuperLU's Pc)
    perm = np.empty_like(inv_perm)  # variable at new position c: N' = N[perm][:, perm]
    perm[inv_perm] = np.arange(nvar)

    sys = FluxSystem(
        nsource=nsrc,
        nbk=nbk,
        npixel=npix,
        x_indptr=indptr,
        x_indices=indices,
        x_data0=data,
        s_pos=s_pos,
        x_rows=rows,
        pair_a=None,
        pair_b=None,
        pair_n=None,
        n_indptr=None,
        n_indices=None,
        n_diag_pos=None,
        perm=perm,
        inv_perm=inv_perm,
        prior_mu=prior_mu,
        prior_ivar=prior_ivar,
        mean_ivar=ivar,
    )

    if direct:
        _add_normal_pair_map(sys, m)
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


def _weights(flux_t, err_t):
    ok = np.isfinite(flux_t) & np.isfinite(err_t) & (err_t > 0)
    w = np.zeros(flux_t.shape)
    w[ok] = 1.0 / err_t[ok] ** 2
    y = np.where(ok, flux_t, 0.0)
    return w, y


def solve_direct(
    sys: FluxSystem, flux_t, err_t, factor=None, errors: bool = True, crowding=None, return_crowding: bool = False
):
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
    wx = w[sys.x_rows] * xd  # per entry of X (the same products as w[row of a] * x_a, gathered once per entry)
    vals = wx[sys.pair_a] * xd[sys.pair_b]
    nupper = np.bincount(sys.pair_n, weights=vals, minlength=sys.n_upper)  # upper triangle of N'
    nupper[sys.n_diag_pos] += sys.prior_ivar[sys.perm]
    N = sp.csc_matrix((nupper[sys.n_full], sys.n_indices, sys.n_indptr), shape=(sys.nvar, sys.nvar))
    X = sp.csr_matrix((xd, sys.x_indices, sys.x_indptr), shape=(sys.npixel, sys.nvar))
    rhs = X.T @ (w * y) + sys.prior_mu * sys.prior_ivar
    lu = spla.splu(N, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    sol = lu.solve(rhs[sys.perm])[sys.inv_perm]
    if not errors:
        return sol, None
    ndiag = nupper[sys.n_diag_pos][sys.inv_perm]
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


class SolveError(ValueError):
    """The flux solve cannot run on these inputs; the message says why."""
