"""The per-cadence LFD model of the pixels, source by source (Hedges & Martinez-Palomera 2021, §4.5 eq. 25).

LFD models the pixels of cadence t as (eq. 25, :mod:`workflow_lib.lfd.solve`)

    f_t = (S ∘ M_t) w_t + B b_t ,

``S`` the mean-frame scene matrix (eq. 15, columns normalised so the weights are total fluxes),
``M_t`` the motion factors (eq. 24: the factor of the (pixel p, source s) entry at cadence t is
``motion_basis[e] @ motion_time[t]`` for the e-th stored entry of the canonical csr ``S``) and
``w_t`` the source fluxes. The contribution of source s to pixel p at cadence t is therefore

    m_ps(t) = S_ps M_ps(t) w_s(t) ,

and the sources' part of the model of pixel p is ``sum_s m_ps(t)`` (the background ``B b_t`` is not
a source and is left out; :func:`sky_pixel_model` evaluates it). :func:`source_pixel_model` evaluates both: the total over sources at
every pixel and the single contributions at requested (pixel, source) pairs, from which the model
of *every other* source at a pixel follows as ``total_p - m_ps`` (the neighbour model that the
deblended, de-trended light curves subtract, :mod:`workflow_lib.deblend`).

Functions of arrays only; no file is read here.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from workflow_lib.lfd.geometry import background_design


def pair_entries(S: sp.csr_matrix, pixel, source) -> np.ndarray:
    """Position in ``S.data`` (canonical csr: sorted indices, no duplicates) of the entry of every
    (pixel, source) pair, -1 where S has no entry (the source's PRF is not modelled at that pixel)."""
    pixel = np.asarray(pixel, dtype=np.int64)
    source = np.asarray(source, dtype=np.int64)
    if not S.has_canonical_format:
        raise ValueError("scene matrix must be canonical (sum_duplicates / sort_indices)")
    nsrc = S.shape[1]
    rows = np.repeat(np.arange(S.shape[0], dtype=np.int64), np.diff(S.indptr))
    keys = rows * nsrc + S.indices.astype(np.int64)  # sorted: rows ascending, indices sorted in a row
    want = pixel * nsrc + source
    pos = np.searchsorted(keys, want)
    found = (pos < keys.size) & (source >= 0)
    found[found] = keys[pos[found]] == want[found]
    return np.where(found, pos, -1)


def source_pixel_model(
    S,
    flux,
    *,
    motion_basis=None,
    motion_time=None,
    pair_pixel=None,
    pair_source=None,
    time_chunk: int = 128,
):
    """The sources' LFD model of the pixels at every cadence (eq. 25 without the background).

    Parameters
    ----------
    S : scene matrix (npixel, nsource), made canonical here (a copy).
    flux : (nsource, ntime) source fluxes w_t [e-/s] (NaN counts as 0: no model).
    motion_basis, motion_time : the eq. 24 factors as in :func:`workflow_lib.lfd.solve.source_flux`
        (factor of the e-th entry of the canonical S at cadence t = ``motion_basis[e] @ motion_time[t]``),
        or None for the static scene (all factors 1).
    pair_pixel, pair_source : optional (npair,) pixel / source-column indices: the single
        contributions ``m_ps(t)`` to return (0 where S has no entry or the source index is -1).
    time_chunk : cadences evaluated at once (memory ~ nnz(S) x time_chunk doubles).

    Returns
    -------
    ``(total, pairs)``: ``total`` (ntime, npixel) = sum_s S_ps M_ps(t) w_s(t); ``pairs`` (ntime,
    npair) = S_ps M_ps(t) w_s(t) of the requested pairs (None when no pairs were asked for).
    """
    S = sp.csr_matrix(S, dtype=float, copy=True)
    S.sum_duplicates()
    S.sort_indices()
    flux = np.nan_to_num(np.asarray(flux, dtype=np.float64))
    npix, nsrc = S.shape
    if flux.shape[0] != nsrc:
        raise ValueError(f"flux has {flux.shape[0]} sources, the scene matrix {nsrc}")
    ntime = flux.shape[1]
    if (motion_basis is None) != (motion_time is None):
        raise ValueError("motion_basis and motion_time go together")
    if motion_basis is not None and (motion_basis.shape[0] != S.nnz or motion_time.shape[0] != ntime):
        raise ValueError(
            f"motion model shapes {motion_basis.shape}, {motion_time.shape} do not match scene nnz {S.nnz} / "
            f"{ntime} cadences"
        )
    rows = np.repeat(np.arange(npix), np.diff(S.indptr))
    by_pixel = sp.csr_matrix((np.ones(S.nnz), (rows, np.arange(S.nnz))), shape=(npix, S.nnz))  # sums a pixel's entries
    total = np.zeros((ntime, npix))
    want_pairs = pair_pixel is not None
    if want_pairs:
        ent = pair_entries(S, pair_pixel, pair_source)
        has = ent >= 0
        pairs = np.zeros((ntime, ent.size))
    for t0 in range(0, ntime, max(1, int(time_chunk))):
        t1 = min(ntime, t0 + max(1, int(time_chunk)))
        vals = S.data[:, None] * flux[S.indices, t0:t1]  # (nnz, nt): S_ps w_s(t)
        if motion_basis is not None:
            vals *= motion_basis @ motion_time[t0:t1].T  # eq. 24 factors M_ps(t)
        total[t0:t1] = (by_pixel @ vals).T  # sum over the sources of each pixel
        if want_pairs:
            pairs[t0:t1, has] = vals[ent[has]].T
    return total, (pairs if want_pairs else None)


def background_order_of(n_terms: int) -> int:
    """The polynomial order of a background design with ``n_terms`` columns ((o+1)(o+2)/2; 0 terms: -1)."""
    for order in range(-1, 8):
        if (order + 1) * (order + 2) // 2 == int(n_terms):
            return order
    raise ValueError(f"a background of {n_terms} terms is not a polynomial of any order")


def sky_pixel_model(pixel_col, pixel_row, coefficients, wing=None, wing_scale=None) -> np.ndarray:
    """The LFD sky of every pixel at every cadence, ``B b_t`` of eq. 25 (ntime, npixel) [e-/s].

    ``coefficients`` (nterm, ntime) are the per-cadence background weights of the flux solve (the
    ``background`` variable of the LFD light-curve set), ``B`` the polynomial design in (column, row) of
    :func:`workflow_lib.lfd.geometry.background_design` whose order follows from the number of terms.
    Cadences without a solution (NaN) get no sky (0). With ``wing`` (npixel,), the wing image of
    :func:`workflow_lib.lfd.prf.wing_image`, and its per-cadence scale ``wing_scale`` (ntime,) (the LFD
    set's ``wing_scale``), the PRF wings' light beyond ``r_max`` is added: the flux solve's sky column."""
    coef = np.nan_to_num(np.asarray(coefficients, dtype=np.float64))
    B = background_design(
        np.asarray(pixel_col, float), np.asarray(pixel_row, float), background_order_of(coef.shape[0])
    )
    sky = (B @ coef).T
    if wing is not None and wing_scale is not None:
        sky = sky + np.outer(np.nan_to_num(np.asarray(wing_scale, np.float64)), np.asarray(wing, np.float64))
    return sky
