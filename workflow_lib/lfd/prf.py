"""LFD step 2: the PRF shape model and the mean-frame scene (Hedges & Martinez-Palomera 2021, §4.3-4.4).

Shape model (§3.1, §4.3). Every (source, pixel) pair has polar offsets (r, phi) from the source
(``r = hypot(dx, dy)``, ``phi = arctan2(dy, dx)``, dx/dy in CCD columns/rows). The log of the PRF
is a linear model: a degree-3 B-spline in r (``n_r_knots`` knots between ``r_min`` and ``r_max``,
evenly spaced in sqrt(r) by default - dense in the core, which fitted a known PRF best; evenly in
r^2 as in the paper's text with ``knot_spacing='square'`` - plus a boundary knot at r = 0) crossed with a wrapped (periodic) B-spline in phi
(eq. 13, :func:`prf_design_matrix`). Inside ``inner_radius`` there are few samples, so there the
model has radial terms only (no phi dependence). It is fitted to ``ln(f_pix / F_src)`` of the
mean frame over *uncontaminated* pixels (§4.2) by weighted least squares (eq. 14 / App. B: data
errors propagated to log space, ``sigma_ln = sigma_f / f``) with a weak Gaussian prior.

Scene (§4.4). :func:`scene_matrix` evaluates the normalised PRF of every source at the pixels
within its radius (sparse, npixel x nsource; eq. 15-16): dotted with the source fluxes [e-/s] it
gives the model image. The shape and the fluxes are iterated (at least ``n_iter`` passes, default 3 as
in the paper, then until the fluxes change by less than ``tolerance`` from one pass to the next, at most
``max_iter``, :func:`flux_change`; a fit that never settles keeps pass ``n_iter``'s result): fit the
shape, refit all source fluxes on the mean frame (all pixels, contaminated ones included) with Gaussian
priors around the a-priori flux (App. B), drop sources whose flux goes negative, drop pixels whose
predicted source flux is below the noise floor, recompute the uncontaminated set with the new fluxes,
sigma-clip outliers, refit the shape.

Sky background (TESS). The paper assumes Kepler's negligible background; TESS frames keep a sky
level with a gradient. We model it as a low-order polynomial in (column, row) (``background_order``:
0 = constant, 1 = plane (default), -1 = none) fitted *jointly and linearly* with the source fluxes
in every scene solve (extra columns of the design matrix, broad prior centred on the edge step's
sigma-clipped sky surface); the shape fit uses the mean frame minus the current sky and minus the
predicted light of the other sources, with the sky scatter added to the pixel errors.

Normalisation. ``PRFModel.evaluate`` returns ``exp(model) / I`` with ``I`` the integral of the
model over the plane: the spline inside the data radius plus a power-law wing beyond it (slope
fitted, clipped to r^-4..r^-8, integrated analytically to infinity), i.e. a PRF with unit total
(for a pixel-integrated PRF the sum over a pixel lattice equals its integral). So the weights of
:func:`scene_matrix` are total source fluxes in e-/s; the scene holds the PRF out to ``r_max`` and
the model's wing beyond it (``PRFModel.wing_fraction``, ~2 % for TESS at 5 px) is in no pixel.
Knots: ``sqrt`` spacing by default because the paper's r^2 spacing leaves the TESS core
(r < 1.5 px) with one knot; measured against the SPOC PRF, r^2 gives 7 % core rms, sqrt 3.4 %.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from workflow_lib.core.atomic import atomic_path
from workflow_lib.core.linalg import clipped_fit, wls
from workflow_lib.core.logs import get_logger
from workflow_lib.core.settings import merge_settings, schema_defaults
from workflow_lib.lfd.bspline import (
    clamped_knot_vector,
    spline_design_matrix,
    tensor_product,
    wrapped_spline_design_matrix,
)
from workflow_lib.lfd.edge import EdgeModel, uncontaminated_pixels
from workflow_lib.lfd.geometry import background_design, dominant_source, source_pixel_pairs

log = get_logger("lfd.prf")

__all__ = [
    "prf_params",
    "shape_settings",
    "PRFModel",
    "polar_coordinates",
    "radial_knots",
    "prf_design_matrix",
    "fit_prf_shape",
    "scene_matrix",
    "source_flux",
    "fit_prf_model",
    "flux_change",
    "prf_convergence",
]

#: phases per axis of the tabulated lattice sum (:meth:`PRFModel.lattice_factor`)
LATTICE_PHASES = 24

# ------------------------------------------------------------------------------ geometry & design


def polar_coordinates(dx, dy):
    """(r, phi) of Cartesian offsets (§3.1 eq. 2): ``r = sqrt(dx^2 + dy^2)``, ``phi = arctan2(dy, dx)`` in (-pi, pi]."""
    dx = np.asarray(dx, float)
    dy = np.asarray(dy, float)
    return np.hypot(dx, dy), np.arctan2(dy, dx)


def radial_knots(
    r_min: float, r_max: float, n_r_knots: int, *, spacing: str = "square", inner_radius: float | None = None
) -> np.ndarray:
    """Break points of the radial spline (§4.3): ``n_r_knots`` knots between ``r_min`` and ``r_max``.

    ``spacing='square'`` spaces them evenly in r^2 (the paper: "linearly spaced in radius
    squared"), ``'linear'`` evenly in r, ``'sqrt'`` evenly in sqrt(r) (dense in the core). A knot
    at r = 0 is prepended so the spline covers the PRF centre, and ``inner_radius`` is inserted as a
    knot (if not one already) so that the radial-only zone ends exactly there.
    """
    if not (0 <= r_min < r_max):
        raise ValueError(f"need 0 <= r_min < r_max, got {r_min}, {r_max}")
    if n_r_knots < 2:
        raise ValueError(f"n_r_knots must be >= 2, got {n_r_knots}")
    if spacing == "square":
        k = np.sqrt(np.linspace(r_min**2, r_max**2, n_r_knots))
    elif spacing == "linear":
        k = np.linspace(r_min, r_max, n_r_knots)
    elif spacing == "sqrt":
        k = np.linspace(np.sqrt(r_min), np.sqrt(r_max), n_r_knots) ** 2
    else:
        raise ValueError(f"knot_spacing must be 'square', 'linear' or 'sqrt', got {spacing!r}")
    pts = [0.0, *k.tolist()]
    if inner_radius is not None and 0 < inner_radius < r_max:
        pts.append(float(inner_radius))
    pts = np.unique(np.round(pts, 12))
    # drop knots closer than 1e-6 px (duplicates after rounding)
    return pts[np.r_[True, np.diff(pts) > 1e-6]]


def _radial_split(r_knots, degree: int, inner_radius: float):
    """Indices of radial components confined to r < inner_radius (radial-only) and the rest (crossed with phi)."""
    t = clamped_knot_vector(r_knots, degree)
    ncomp = len(r_knots) + degree - 1
    start = t[:ncomp]  # component m is non-zero on [t[m], t[m + degree + 1])
    azim = start >= inner_radius - 1e-12
    return np.flatnonzero(~azim), np.flatnonzero(azim)


def core_design_matrix(r, phi, core_degree: int, core_radius: float) -> sp.csr_matrix:
    """Regular azimuthal terms of the PRF core: ``r^m cos(m phi)``, ``r^m sin(m phi)`` for m = 1 ..
    ``core_degree`` (i.e. dx, dy, dx^2 - dy^2, 2 dx dy, ...) times the taper ``(1 - (r/core_radius)^2)^2``
    (zero beyond ``core_radius``).

    The polar spline's phi terms are singular at r = 0 (every phi meets there), which is why §4.3
    has none inside ``inner_radius``; but a real PRF's core is not symmetric about the catalog
    position (its peak is offset from its centroid, it is elliptical), and near the peak that
    shows as a term linear in r along one direction. These functions are smooth through the
    origin and have zero mean over phi (they do not change the radial profile). Returns (n, 2 x
    core_degree) sparse.
    """
    r = np.asarray(r, float).ravel()
    phi = np.asarray(phi, float).ravel()
    if core_degree <= 0:
        return sp.csr_matrix((r.size, 0))
    taper = np.where(r < core_radius, (1 - (r / core_radius) ** 2) ** 2, 0.0)
    cols = []
    for m in range(1, int(core_degree) + 1):
        cols += [r**m * np.cos(m * phi) * taper, r**m * np.sin(m * phi) * taper]
    return sp.csr_matrix(np.column_stack(cols))


def prf_design_matrix(
    r,
    phi,
    *,
    r_knots,
    n_phi_knots: int,
    inner_radius: float,
    degree: int,
    core_degree: int = 0,
    core_radius: float = 1.0,
) -> sp.csr_matrix:
    """The PRF shape design matrix of §4.3 (eq. 13), sparse, shape (n, n_radial_only + n_azim * n_phi_knots).

    Columns: first the radial B-spline components whose support starts inside ``inner_radius``
    (radial terms only: "we do not build the cross terms" there), then the row-wise tensor product
    of the remaining radial components with the wrapped phi spline. Because the phi basis sums to
    one, a pure radial profile is still representable beyond ``inner_radius`` (all phi weights of a
    radial component equal), and the model is smooth (C^2) across ``inner_radius`` while having no
    phi dependence at all for r < inner_radius (``inner_radius`` should be one of ``r_knots``; see
    :func:`radial_knots`). ``r`` is clamped to [0, r_knots[-1]]. With ``core_degree`` > 0 the
    regular core terms of :func:`core_design_matrix` are appended as the last columns.
    """
    r = np.asarray(r, float).ravel()
    phi = np.asarray(phi, float).ravel()
    r_knots = np.asarray(r_knots, float)
    Br = spline_design_matrix(np.clip(r, r_knots[0], r_knots[-1]), r_knots, degree)
    Bphi = wrapped_spline_design_matrix(phi, n_phi_knots, degree)
    radial_only, azim = _radial_split(r_knots, degree, inner_radius)
    parts = []
    if radial_only.size:
        parts.append(Br[:, radial_only])
    parts.append(tensor_product(Br[:, azim], Bphi))
    if core_degree > 0:
        parts.append(core_design_matrix(r, phi, core_degree, core_radius))
    return sp.csr_matrix(sp.hstack(parts, format="csr"))


# ------------------------------------------------------------------------------ the model


@dataclass
class PRFModel:
    """A fitted LFD PRF shape (§4.3): ``ln PRF(r, phi) = A(r, phi) @ weights - log_norm`` for r <= r_support,
    a power-law wing (``tail_alpha``) to r_max, 0 beyond (see :meth:`evaluate`).

    Optional per-source results of the §4.4 mean-frame fit are kept alongside (``source_id``,
    ``source_flux`` [e-/s], ``source_flux_err``, ``background`` coefficients, ``background_order``).
    """

    weights: np.ndarray
    r_knots: np.ndarray
    n_phi_knots: int
    inner_radius: float
    degree: int
    r_max: float
    log_norm: float = 0.0
    r_data: float | None = None
    source_id: np.ndarray | None = None
    source_flux: np.ndarray | None = None
    source_flux_err: np.ndarray | None = None
    background: np.ndarray | None = None
    background_order: int = 0
    tail_alpha: float | None = None
    wing_radius: float = 0.0  # the wing term's outer radius [px] (:func:`wing_image`); <= r_max: no wing term
    wing_scale: float = 1.0  # the mean-frame fit's scale of the wing term
    core_degree: int = 0  # regular azimuthal core terms (:func:`core_design_matrix`)
    core_radius: float = 1.0
    flux_box: float | None = None  # half-width [px] of the square over which the PRF integrates to one; None: the plane
    lattice_norm: bool = False  # scene columns divided by :meth:`lattice_factor` (:func:`scene_matrix`)
    unmodelled: np.ndarray | None = None  # (n, 2) column, row of the pixels left out (:func:`unmodelled_pixels`)
    provenance: str = ""
    meta: dict = field(default_factory=dict)
    _lattice: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)  # lattice_factor's table

    def design(self, dx, dy) -> sp.csr_matrix:
        r, phi = polar_coordinates(dx, dy)
        return prf_design_matrix(
            r,
            phi,
            r_knots=self.r_knots,
            n_phi_knots=self.n_phi_knots,
            inner_radius=self.inner_radius,
            degree=self.degree,
            core_degree=self.core_degree,
            core_radius=self.core_radius,
        )

    @property
    def r_support(self) -> float:
        """Radius up to which the fitted spline is used: ``min(r_data, r_max)`` (the largest radius with shape data)."""
        return self.r_max if self.r_data is None else min(self.r_data, self.r_max)

    def log_value(self, dx, dy) -> np.ndarray:
        """Un-normalised log model ``A @ weights`` at offsets (dx, dy) (shape of dx)."""
        dx = np.asarray(dx, float)
        return (self.design(dx.ravel(), np.asarray(dy, float).ravel()) @ self.weights).reshape(dx.shape)

    def evaluate(self, dx, dy) -> np.ndarray:
        """Linear PRF value (fraction of a source's total flux per pixel) at pixel-centre offsets (dx, dy) [px].

        ``exp(A @ weights - log_norm)`` for r <= ``r_support`` (the spline, where there are shape
        data). Beyond it, up to ``r_max``, the wing is a power law along each direction,
        ``PRF(r_support, phi) (r / r_support)^-tail_alpha`` (continuous with the spline; a straight
        line in log-log, which never turns up as an extrapolated log spline can and so cannot feed
        flux back into the background); zero beyond ``r_max`` (the scene support), or beyond
        ``r_support`` when ``tail_alpha`` is None. ``log_norm`` makes the integral over the whole
        plane - including the power-law tail beyond ``r_max``, analytically - equal to one, so
        scene weights are total source fluxes; or, with ``flux_box``, the integral over the square of
        that half-width centred on the source (:meth:`normalise`), so weights are fluxes on that scale.
        """
        dx = np.asarray(dx, float)
        dy = np.asarray(dy, float)
        dx, dy = np.broadcast_arrays(dx, dy)
        out = np.zeros(dx.shape)
        r = np.hypot(dx, dy)
        rs = self.r_support
        inside = r <= rs
        if inside.any():
            out[inside] = np.exp(self.log_value(dx[inside], dy[inside]) - self.log_norm)
        if self.tail_alpha is not None:
            wing = (r > rs) & (r <= self.r_max)
            if wing.any():
                k = rs / r[wing]
                out[wing] = np.exp(self.log_value(dx[wing] * k, dy[wing] * k) - self.log_norm) * k**self.tail_alpha
        return out

    def _core_integral(self, n_r: int = 400, n_phi: int = 256) -> float:
        """Integral of ``exp(A @ w)`` over r <= r_support (midpoint rule in polar coordinates)."""
        rs = self.r_support
        dr = rs / n_r
        rr = (np.arange(n_r) + 0.5) * dr
        pp = -np.pi + (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
        R, P = np.meshgrid(rr, pp, indexing="ij")
        vals = np.exp(self.log_value(R * np.cos(P), R * np.sin(P)))
        return float(np.sum(vals * R) * dr * 2 * np.pi / n_phi)

    def _edge_ring(self, n_phi: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """``exp(A @ w)`` along the circle r = r_support at ``n_phi`` midpoint angles: (angles, values)."""
        rs = self.r_support
        pp = -np.pi + (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
        return pp, np.exp(self.log_value(rs * np.cos(pp), rs * np.sin(pp)))

    def normalise(self, n_r: int = 400, n_phi: int = 256) -> "PRFModel":
        """Set ``log_norm`` so that the PRF integrates to one (midpoint rule in polar coordinates).

        With a power-law tail (``tail_alpha`` > 2) its integral beyond ``r_support`` is added
        analytically, along each direction phi ``P(r_support, phi) r_support^2 / (tail_alpha - 2) x
        (1 - (r_support / R(phi))^(tail_alpha - 2))``: to ``R = inf`` over the whole plane, or to the
        edge of the square ``|dx|, |dy| <= flux_box``, ``R(phi) = flux_box / max(|cos phi|, |sin phi|)``.

        ``flux_box`` is the flux scale's convention. The SPOC TESS PRF models are tabulated on 13 x 13
        pixels and sum to one there, so a star's TESS flux is the light inside that square (6.5 px): the
        synthetic sectors render through it, and a model that counts its fitted tail to infinity
        reads the extra (~1 % of the light) as flux (embedded field synth_b: every isolated bright
        star +1.0-1.2 %). The core disc ``r <= r_support`` is counted in full."""
        integral = self._core_integral(n_r, n_phi)
        if self.tail_alpha is not None:
            a, rs = self.tail_alpha, self.r_support
            if a <= 2:
                raise ValueError(f"tail_alpha must exceed 2 for a finite PRF integral, got {a}")
            pp, ring = self._edge_ring(n_phi)
            kept = np.ones(n_phi)
            if self.flux_box is not None:
                edge = self.flux_box / np.maximum(np.abs(np.cos(pp)), np.abs(np.sin(pp)))
                kept = np.clip(1 - (rs / edge) ** (a - 2), 0.0, 1.0)
            integral += float(np.sum(ring * kept)) * 2 * np.pi / n_phi * rs**2 / (a - 2)
        if not np.isfinite(integral) or integral <= 0:
            raise ValueError("PRF model does not integrate to a positive finite value")
        self.log_norm = float(np.log(integral))
        return self

    def fit_tail(self, r_inner_fraction: float = 0.7, alpha_range=(4.0, 8.0)) -> "PRFModel":
        """Set ``tail_alpha`` from the slope of the azimuthally averaged log profile between ``r_inner_fraction`` x r_support and r_support.

        ``alpha = -d ln P / d ln r``, clipped to ``alpha_range`` (> 2 keeps the integral finite;
        the TESS and Kepler PRF wings fall as r^-4 ... r^-5 at 3-5 px).
        """
        rs = self.r_support
        ra = r_inner_fraction * rs
        pp = np.linspace(-np.pi, np.pi, 64, endpoint=False)
        la = np.log(np.mean(np.exp(self.log_value(ra * np.cos(pp), ra * np.sin(pp)))))
        lb = np.log(np.mean(np.exp(self.log_value(rs * np.cos(pp), rs * np.sin(pp)))))
        alpha = -(lb - la) / np.log(rs / ra)
        self.tail_alpha = float(np.clip(alpha if np.isfinite(alpha) else alpha_range[1], *alpha_range))
        return self

    def tail_value(self, dx, dy, n_phi: int = 256) -> np.ndarray:
        """The power-law wing of :meth:`evaluate` at any radius beyond ``r_support`` (not cut at ``r_max``):
        ``PRF(r_support, phi) (r_support / r)^tail_alpha``, the ring ``PRF(r_support, phi)`` tabulated at
        ``n_phi`` angles and interpolated (periodic). Zero within ``r_support`` or without a tail."""
        dx = np.asarray(dx, float)
        dy = np.asarray(dy, float)
        out = np.zeros(np.broadcast(dx, dy).shape)
        if self.tail_alpha is None or out.size == 0:
            return out
        rs = self.r_support
        pp = np.linspace(-np.pi, np.pi, n_phi + 1)
        ring = np.exp(self.log_value(rs * np.cos(pp), rs * np.sin(pp)) - self.log_norm)
        r, phi = polar_coordinates(*np.broadcast_arrays(dx, dy))
        far = r > rs
        out[far] = np.interp(phi[far], pp, ring, period=2 * np.pi) * (rs / r[far]) ** self.tail_alpha
        return out

    @property
    def wing_fraction(self) -> float:
        """Fraction of the total flux the model puts beyond ``r_max`` (in no scene pixel): the tail integral past r_max."""
        if self.tail_alpha is None:
            return 0.0
        rs, a = self.r_support, self.tail_alpha
        n_phi = 64
        ring = float(np.sum(self._edge_ring(n_phi)[1])) * 2 * np.pi / n_phi
        return float(np.exp(-self.log_norm) * ring * rs**a * self.r_max ** (2 - a) / (a - 2))

    def lattice_factor(self, source_col, source_row, pixel_origin=(0.0, 0.0)) -> np.ndarray:
        """Per source, the model's sum over the pixel lattice within ``r_max`` at that source's sub-pixel
        phase, over the same sum averaged over phases: ``L(phase_s) / <L>`` (1 for a pixel-integrated PRF).

        A pixel-integrated PRF sampled at pixel centres sums to the same total at every sub-pixel
        position of its source (the pixels tile the plane); the fitted model (§4.3 eq. 13, a smooth
        function of the offset) does not quite: its lattice sum swings with the phase by ~0.3-0.5 %
        rms on noise-free SPOC PRFs (~1 % for the chain's fitted PRFs), and a least-squares flux inherits
        that as a per-star error (``benchmarks/prf_flexibility.py``). Dividing a source's scene column by
        this factor makes its lattice sum phase-independent. The average over phases of a lattice sum is
        the integral over the disc (exactly, for uniform phases), so the flux scale of :meth:`normalise`
        is kept. ``L`` is tabulated on a :data:`LATTICE_PHASES`-square midpoint grid of phases (periodic,
        bilinear between nodes; :meth:`_lattice_table`). ``pixel_origin`` (column, row): any pixel centre."""
        pc = np.asarray(source_col, float) - pixel_origin[0]
        pr = np.asarray(source_row, float) - pixel_origin[1]
        n = LATTICE_PHASES
        table = self._lattice_table()
        # node i sits at phase (i + 0.5) / n - 0.5; positions in node units, wrapped periodically
        u = np.mod((pc - np.floor(pc)) * n - 0.5 + n / 2, n)
        v = np.mod((pr - np.floor(pr)) * n - 0.5 + n / 2, n)
        i0, j0 = np.floor(v).astype(int), np.floor(u).astype(int)
        fv, fu = v - i0, u - j0
        i1, j1 = (i0 + 1) % n, (j0 + 1) % n
        i0, j0 = i0 % n, j0 % n
        return (
            table[i0, j0] * (1 - fv) * (1 - fu)
            + table[i0, j1] * (1 - fv) * fu
            + table[i1, j0] * fv * (1 - fu)
            + table[i1, j1] * fv * fu
        )

    def _lattice_table(self) -> np.ndarray:
        """``L(phase) / <L>`` on the phase grid of :meth:`lattice_factor`, (row phase, column phase); cached."""
        if self._lattice is not None:
            return self._lattice
        n = LATTICE_PHASES
        k = np.arange(-int(np.ceil(self.r_max)), int(np.ceil(self.r_max)) + 1, dtype=float)
        KC, KR = (a.ravel() for a in np.meshgrid(k, k))
        g = (np.arange(n) + 0.5) / n - 0.5
        GR, GC = (a.ravel() for a in np.meshgrid(g, g, indexing="ij"))
        dx = KC[None, :] - GC[:, None]
        dy = KR[None, :] - GR[:, None]
        near = np.hypot(dx, dy) <= self.r_max
        vals = np.zeros(dx.shape)
        vals[near] = self.evaluate(dx[near], dy[near])
        L = vals.sum(axis=1).reshape(n, n)
        self._lattice = L / L.mean()
        return self._lattice

    # ---------------------------------------------------------------- I/O
    def save(self, path) -> None:
        """Write the model as .npz (atomically), with provenance (JSON string) and meta (JSON)."""

        arrays = {
            "weights": self.weights,
            "r_knots": self.r_knots,
            "n_phi_knots": np.int64(self.n_phi_knots),
            "inner_radius": np.float64(self.inner_radius),
            "degree": np.int64(self.degree),
            "r_max": np.float64(self.r_max),
            "log_norm": np.float64(self.log_norm),
            "r_data": np.float64(self.r_support),
            "background_order": np.int64(self.background_order),
            "tail_alpha": np.float64(np.nan if self.tail_alpha is None else self.tail_alpha),
            "wing_radius": np.float64(self.wing_radius),
            "wing_scale": np.float64(self.wing_scale),
            "core_degree": np.int64(self.core_degree),
            "core_radius": np.float64(self.core_radius),
            "flux_box": np.float64(np.nan if self.flux_box is None else self.flux_box),
            "lattice_norm": np.bool_(self.lattice_norm),
            "provenance": np.array(self.provenance),
            "meta": np.array(json.dumps(self.meta, sort_keys=True, default=str)),
        }
        for name in ("source_id", "source_flux", "source_flux_err", "background", "unmodelled"):
            v = getattr(self, name)
            if v is not None:
                arrays[name] = np.asarray(v)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path) -> "PRFModel":
        with np.load(path, allow_pickle=False) as z:
            get = lambda k: np.asarray(z[k]) if k in z.files else None  # noqa: E731
            return cls(
                weights=np.asarray(z["weights"], float),
                r_knots=np.asarray(z["r_knots"], float),
                n_phi_knots=int(z["n_phi_knots"]),
                inner_radius=float(z["inner_radius"]),
                degree=int(z["degree"]),
                r_max=float(z["r_max"]),
                log_norm=float(z["log_norm"]),
                r_data=float(z["r_data"]) if "r_data" in z.files else None,
                source_id=get("source_id"),
                source_flux=get("source_flux"),
                source_flux_err=get("source_flux_err"),
                background=get("background"),
                unmodelled=get("unmodelled"),
                background_order=int(z["background_order"]) if "background_order" in z.files else 0,
                tail_alpha=(
                    float(z["tail_alpha"]) if "tail_alpha" in z.files and np.isfinite(z["tail_alpha"]) else None
                ),
                wing_radius=float(z["wing_radius"]) if "wing_radius" in z.files else 0.0,
                wing_scale=float(z["wing_scale"]) if "wing_scale" in z.files else 1.0,
                core_degree=int(z["core_degree"]) if "core_degree" in z.files else 0,
                core_radius=float(z["core_radius"]) if "core_radius" in z.files else 1.0,
                flux_box=(float(z["flux_box"]) if "flux_box" in z.files and np.isfinite(z["flux_box"]) else None),
                lattice_norm=bool(z["lattice_norm"]) if "lattice_norm" in z.files else False,
                provenance=str(z["provenance"]) if "provenance" in z.files else "",
                meta=json.loads(str(z["meta"])) if "meta" in z.files else {},
            )


def _prf_smoothness(r_knots, degree: int, inner_radius: float, n_phi_knots: int, sigma: float) -> sp.csr_matrix:
    """Second differences along r of the :func:`prf_design_matrix` weights, for every phi component, / sigma.

    A zero-mean Gaussian prior on them (App. B) makes the log PRF extrapolate linearly in r (i.e.
    keep falling) where the data stop, and damps wiggles of poorly sampled components.
    """
    radial_only, azim = _radial_split(r_knots, degree, inner_radius)
    n_r = len(r_knots) + degree - 1
    n_ro = radial_only.size
    col = np.empty((n_r, n_phi_knots), dtype=np.int64)
    col[radial_only, :] = np.arange(n_ro)[:, None]
    col[azim, :] = n_ro + np.arange(azim.size)[:, None] * n_phi_knots + np.arange(n_phi_knots)[None, :]
    rows, cols, vals = [], [], []
    k = 0
    for j in range(n_phi_knots):
        for i in range(n_r - 2):
            c = col[i : i + 3, j]
            if j > 0 and np.all(c < n_ro):
                continue  # purely radial triple: counted once
            rows += [k, k, k]
            cols += c.tolist()
            vals += [1.0, -2.0, 1.0]
            k += 1
    ncol = n_ro + azim.size * n_phi_knots
    return sp.csr_matrix((np.array(vals) / sigma, (rows, cols)), shape=(k, ncol))


def _second_difference(n: int, sigma: float) -> sp.csr_matrix:
    """(n-2, n) second-difference operator / sigma: a smoothness prior on spline coefficients."""
    if n < 3:
        return sp.csr_matrix((0, n))
    return sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n), format="csr") / sigma


def _with_source_offsets(source_index, Br, A, D2, Dfull):
    """Append one free ln-offset column per source (``source_index``: the source of each pixel) to the
    radial-only design ``Br`` and the full design ``A``, and zero columns to their penalties ``D2`` /
    ``Dfull`` (see :func:`fit_prf_shape`). Returns ``(Br', A', D2', Dfull', n_offsets)``."""
    if source_index is None:
        return Br, A, D2, Dfull, 0
    si = np.asarray(source_index)
    _, inv = np.unique(si, return_inverse=True)
    O = sp.csr_matrix((np.ones(si.size), (np.arange(si.size), inv)), shape=(si.size, inv.max() + 1))
    n_off = O.shape[1]
    Ar = sp.hstack([Br, O], format="csr")
    Af = sp.hstack([A, O], format="csr")
    D2 = sp.hstack([D2, sp.csr_matrix((D2.shape[0], n_off))], format="csr")
    Dfull = sp.hstack([Dfull, sp.csr_matrix((Dfull.shape[0], n_off))], format="csr")
    return Ar, Af, D2, Dfull, n_off


def _tie_first_two(n: int) -> sp.csr_matrix:
    """(n, n - 1) map from coefficients with the first two tied to the full vector: ``c_0 = c_1 = t_0``,
    ``c_k = t_{k-1}`` for k >= 2. On a clamped radial B-spline with its first knot at r = 0 the slope at
    r = 0 is proportional to ``c_1 - c_0``, so the tie makes the log PRF flat at the centre, as any PRF
    smooth through its centre is (no cusp or crater the few pixel centres at r < 0.1 px cannot pin down)."""
    rows = np.r_[0, np.arange(1, n)]
    cols = np.r_[0, np.arange(n - 1)]
    return sp.csr_matrix((np.ones(n), (rows, cols)), shape=(n, n - 1))


def _log_flux_ratio(dx, dy, pixel_flux, pixel_flux_err, source_flux, r_max: float, n_radial: int, log_error_floor):
    """The data of the §4.3 eq. 14 shape fit: ``y = ln(pixel_flux / source_flux)`` with error
    ``sqrt((err/flux)^2 + log_error_floor^2)`` at polar offsets (r, phi), and ``use``: pixels with
    positive finite flux within ``r_max``. Raises ValueError with fewer than ``n_radial + 5`` of them.
    Returns ``(r, phi, use, y, sig)``."""
    dx = np.asarray(dx, float)
    dy = np.asarray(dy, float)
    f = np.asarray(pixel_flux, float)
    e = np.asarray(pixel_flux_err, float)
    F = np.asarray(source_flux, float)
    r, phi = polar_coordinates(dx, dy)
    use = np.isfinite(f) & (f > 0) & (F > 0) & np.isfinite(e) & (r <= r_max)
    if use.sum() < n_radial + 5:
        raise ValueError(
            f"fit_prf_shape: only {use.sum()} usable uncontaminated pixels; need more than {n_radial + 5} "
            "(too few isolated sources, or edge radii too large for this field)"
        )
    y = np.log(np.where(use, f, 1.0) / np.where(use, F, 1.0))
    sig = np.sqrt((np.where(use, e, 1.0) / np.where(use, f, 1.0)) ** 2 + log_error_floor**2)
    return r, phi, use, y, sig


def _normalised_prf(
    w, r_knots, n_phi_knots, inner_radius, degree, r_max, r_data, core_degree, core_radius, tail, flux_box
) -> PRFModel:
    """The :class:`PRFModel` of fitted eq. 14 weights ``w``: with ``tail`` a power-law wing beyond
    ``r_data`` (:meth:`PRFModel.fit_tail`), then normalised to unit integral over the plane or the
    ``flux_box`` square (:meth:`PRFModel.normalise`)."""
    model = PRFModel(
        weights=w,
        r_knots=r_knots,
        n_phi_knots=int(n_phi_knots),
        inner_radius=float(inner_radius),
        degree=int(degree),
        r_max=r_max,
        r_data=r_data,
        core_degree=max(int(core_degree), 0),
        core_radius=float(core_radius),
        flux_box=None if flux_box is None else float(flux_box),
    )
    if tail:
        model.fit_tail()
    model.normalise()
    return model


def fit_prf_shape(
    dx,
    dy,
    pixel_flux,
    pixel_flux_err,
    source_flux,
    *,
    r_knots,
    n_phi_knots,
    inner_radius,
    degree,
    prior_sigma,
    log_error_floor,
    sigma_clip,
    smooth_sigma,
    offset_prior_sigma,
    tail,
    core_degree,
    core_radius,
    core_prior_sigma,
    flux_box,
    lattice_norm,
    regular_origin=True,
    r_max=None,
    n_clip=2,
    return_mask=False,
    source_index=None,
):
    """Fit the PRF shape (§4.3 eq. 14) to uncontaminated pixels; returns a normalised :class:`PRFModel`.

    ``dx, dy`` are the offsets of each used pixel from its (single) source, ``pixel_flux`` the
    background-subtracted mean-frame flux [e-/s], ``pixel_flux_err`` its error and ``source_flux``
    the current estimate of the source's flux (a-priori at first, §4.4 later). The data are
    ``ln(pixel_flux / source_flux)`` with errors ``sqrt((err/flux)^2 + log_error_floor^2)`` (error
    propagated to log space, plus a small floor for the model's own limitations). Pixels with
    non-positive flux or beyond ``r_max`` are ignored.

    Per-source offsets (``source_index`` given: the source of each pixel). The a-priori fluxes
    are Gaia G fluxes, off from the instrument band by colour terms of tens of per cent; in ln
    space such an error is a constant over all pixels of its source, which would otherwise be
    read as shape (stars of different brightness sample different radii). So each source gets a
    free additive ln offset (prior N(0, ``offset_prior_sigma``^2)), fitted jointly with the shape;
    the shape is then fixed to unit integral by :meth:`PRFModel.normalise`, so the offsets only
    carry the fluxes' errors, and a source's pixels constrain the shape relative to each other.
    This is the §4.4 flux/shape iteration solved jointly inside one linear fit.

    Prior (App. B): first a radial-only spline is fitted (broad prior, plus a smoothness prior
    ``second difference of the coefficients ~ N(0, smooth_sigma^2)`` so that radii without data
    are extrapolated smoothly); its coefficients are the prior means of the full model's weights
    (each phi weight of a radial component starts at the radial coefficient), with width
    ``prior_sigma`` [ln units], plus the same smoothness prior along r for every phi component.
    So the azimuthal structure is a regularised perturbation of the radial profile and parts of
    (r, phi) without data fall back to it. Outliers beyond ``sigma_clip`` robust standard
    deviations are rejected ``n_clip`` times.

    Wing (``tail``): beyond the data radius ``r_data`` (99th percentile of the fitted radii) the
    model continues as a power law fitted to the outer profile (:meth:`PRFModel.fit_tail`), and the
    normalisation includes the flux under it out to the ``flux_box`` square (None: to infinity), so
    fitted fluxes are fluxes on that scale.

    Regular origin (``regular_origin``): the first two radial coefficients are tied
    (:func:`_tie_first_two`), so the log PRF has zero radial slope at r = 0; the core terms still give the
    peak an offset. Without it the few pixel centres within ~0.1 px of a star let the fit leave a cusp or a
    crater at the centre, which biases the flux of stars centred on a pixel and leaks a pair member's
    variability into its neighbour.

    The keyword arguments that are ``lfd.prf`` settings have no defaults here: pass
    ``**shape_settings(prf_params(...))``.
    """
    r_knots = np.asarray(r_knots, float)
    r_max = float(r_knots[-1] if r_max is None else r_max)
    n_radial = len(r_knots) + degree - 1
    r, phi, use, y, sig = _log_flux_ratio(
        dx, dy, pixel_flux, pixel_flux_err, source_flux, r_max, n_radial, log_error_floor
    )
    A = prf_design_matrix(
        r,
        phi,
        r_knots=r_knots,
        n_phi_knots=n_phi_knots,
        inner_radius=inner_radius,
        degree=degree,
        core_degree=core_degree,
        core_radius=core_radius,
    )
    n_core = 2 * max(int(core_degree), 0)
    Br = spline_design_matrix(np.clip(r, r_knots[0], r_knots[-1]), r_knots, degree)
    radial_only, azim = _radial_split(r_knots, degree, inner_radius)
    D2 = _second_difference(Br.shape[1], smooth_sigma)
    Dfull = _prf_smoothness(r_knots, degree, inner_radius, n_phi_knots, smooth_sigma)
    Dfull = sp.hstack([Dfull, sp.csr_matrix((Dfull.shape[0], n_core))], format="csr")
    nA = A.shape[1]
    Ar, Af, D2, Dfull, n_off = _with_source_offsets(source_index, Br, A, D2, Dfull)
    sd_r = np.r_[np.full(Br.shape[1], 100.0), np.full(n_off, offset_prior_sigma)]
    sd = np.r_[np.full(nA - n_core, prior_sigma), np.full(n_core, core_prior_sigma), np.full(n_off, offset_prior_sigma)]
    # regular origin: the first two radial coefficients tied (zero radial slope at r = 0), as the maps
    # Tr (radial prefit) and Ta (full model) from the tied to the full coefficient vectors
    tie = bool(regular_origin) and {0, 1} <= set(radial_only.tolist())
    Tr = _tie_first_two(Br.shape[1] + n_off) if tie else None
    Ta = _tie_first_two(nA + n_off) if tie else None
    if tie:
        Ar, D2, Af, Dfull = Ar @ Tr, D2 @ Tr, Af @ Ta, Dfull @ Ta
        sd_r, sd = np.delete(sd_r, 1), np.delete(sd, 1)

    def fit(keep):
        # radial-only profile first; its coefficients are the prior means of the full model
        mu_r = np.r_[np.full(Ar.shape[1] - n_off, np.median(y[keep])), np.zeros(n_off)]
        a = wls(Ar[keep], y[keep], sigma=sig[keep], prior_mu=mu_r, prior_sigma=sd_r, penalty=D2, method="sparse")
        if tie:
            a = Tr @ a
        mu = np.concatenate([a[radial_only], np.repeat(a[azim], n_phi_knots), np.zeros(n_core), a[Br.shape[1] :]])
        if tie:
            mu = np.delete(mu, 1)
        w_all = wls(Af[keep], y[keep], sigma=sig[keep], prior_mu=mu, prior_sigma=sd, penalty=Dfull, method="sparse")
        return (Ta @ w_all if tie else w_all), (y - Af @ w_all) / sig

    w_all, keep, _ = clipped_fit(
        fit, use, n_sigma=sigma_clip, n_pass=n_clip + 1, min_keep=n_radial + 5, floor=1e-9, inclusive=False
    )
    w = w_all[:nA]
    r_data = float(min(r_max, np.percentile(r[keep], 99.0)))
    model = _normalised_prf(
        w, r_knots, n_phi_knots, inner_radius, degree, r_max, r_data, core_degree, core_radius, tail, flux_box
    )
    model.lattice_norm = bool(lattice_norm)
    model.meta.update(
        n_fit_pixels=int(keep.sum()),
        n_clipped=int(use.sum() - keep.sum()),
        n_sources=int(n_off),
        tail_alpha=model.tail_alpha,
    )
    return (model, keep) if return_mask else model


# ------------------------------------------------------------------------------ scene & fluxes


def scene_matrix(model: PRFModel, source_col, source_row, pixel_col, pixel_row, radius=None) -> sp.csr_matrix:
    """The sparse scene matrix (§4.4 eqs. 15-16), shape (npixel, nsource).

    Entry (p, s) is the normalised PRF of source s at pixel p for the pixels within ``radius``
    (scalar or one per source, capped at ``model.r_max``; default ``r_max``) of the source; ``S @
    flux`` is the model image for source fluxes ``flux`` [e-/s], so the weights are total source
    fluxes (a source partly off the pixels keeps its total flux as weight).
    """
    nsrc = np.asarray(source_col).size
    npix = np.asarray(pixel_col).size
    rad = model.r_max if radius is None else np.minimum(np.asarray(radius, float), model.r_max)
    src, pix, dx, dy = source_pixel_pairs(source_col, source_row, pixel_col, pixel_row, rad)
    vals = model.evaluate(dx, dy)
    if model.lattice_norm and npix and nsrc:
        origin = (float(np.ravel(pixel_col)[0]), float(np.ravel(pixel_row)[0]))
        vals = vals / model.lattice_factor(source_col, source_row, origin)[src]
    return sp.csr_matrix((vals, (pix, src)), shape=(npix, nsrc))


def wing_image(model: PRFModel, source_col, source_row, flux, pixel_col, pixel_row, radius=None) -> np.ndarray:
    """The sources' light beyond the scene radius: ``sum_s flux_s PRF_s(p)`` over the pixels p with
    ``r_max < |p - s| <= radius`` (default ``model.wing_radius``), PRF the power-law wing of
    :meth:`PRFModel.tail_value` (the part of eq. 15's normalised PRF that :func:`scene_matrix` leaves out).

    Light that no source column holds falls on real pixels and a sky polynomial absorbs it, raising
    the sky under faint stars (docs/VALIDATION.md, "Where the absolute-flux error (T4) comes from"). As
    one background column with a free scale (``lfd.prf.wing_radius``) it no longer does. Sources with
    non-positive ``flux`` contribute nothing. Returns the image [e-/s] over the pixels (npix,)."""
    pc = np.asarray(pixel_col, float).ravel()
    rad = float(model.wing_radius if radius is None else radius)
    out = np.zeros(pc.size)
    flux = np.asarray(flux, float).ravel()
    use = np.isfinite(flux) & (flux > 0)
    if model.tail_alpha is None or rad <= model.r_max or not use.any():
        return out
    src, pix, dx, dy = source_pixel_pairs(
        np.asarray(source_col, float).ravel()[use], np.asarray(source_row, float).ravel()[use], pc, pixel_row, rad
    )
    far = np.hypot(dx, dy) > model.r_max
    vals = model.tail_value(dx[far], dy[far]) * flux[use][src[far]]
    return np.bincount(pix[far], weights=vals, minlength=pc.size)


def fraction_on_pixels(model: PRFModel, source_col, source_row, pixel_col, pixel_row) -> np.ndarray:
    """Per source, the fraction of its PRF (normalised to a total of 1, eq. 15) that falls on the given
    pixels: the column sums of :func:`scene_matrix`. ~1 for a star well inside a cutout, ~0.5 for one
    centred on its edge, -> 0 beyond it."""
    S = scene_matrix(model, source_col, source_row, pixel_col, pixel_row)
    return np.asarray(S.sum(axis=0), float).ravel()


def source_flux(
    S,
    data,
    data_err,
    prior_flux,
    *,
    prior_width,
    background=None,
    background_prior=None,
    background_prior_sigma=1e4,
    pixel_mask=None,
    return_errors=False,
):
    """Fit source fluxes (and background terms) to one image with the sparse scene matrix (§4.4 eq. 16, App. B).

    ``S`` (npix, nsrc) sparse scene matrix, ``data``/``data_err`` the image [e-/s] (length npix).
    Gaussian priors: flux ~ N(prior_flux, (prior_width * |prior_flux|)^2) (App. B; a broad prior
    that only matters for sources the data cannot separate), background coefficients ~
    N(background_prior, background_prior_sigma^2). ``background`` is a dense (npix, nb) design of
    background columns (or None). ``pixel_mask`` selects the pixels used.

    Returns ``flux`` (nsrc,), ``bkg`` (nb,) and, with ``return_errors``, the 1-sigma errors of the
    fluxes (from the inverse normal matrix, B4; NaN when nsrc > 4000).
    """
    S = sp.csr_matrix(S)
    npix, nsrc = S.shape
    d = np.asarray(data, float)
    e = np.asarray(data_err, float)
    m = np.isfinite(d) & np.isfinite(e) & (e > 0)
    if pixel_mask is not None:
        m &= np.asarray(pixel_mask, bool)
    Bk = np.zeros((npix, 0)) if background is None else np.asarray(background, float)
    nb = Bk.shape[1]
    A = sp.hstack([S, sp.csr_matrix(Bk)], format="csr")[m]
    pf = np.asarray(prior_flux, float)
    psig = np.maximum(prior_width * np.abs(pf), 1e-3)
    bmu = np.zeros(nb) if background_prior is None else np.broadcast_to(np.asarray(background_prior, float), (nb,))
    mu = np.concatenate([pf, bmu])
    ps = np.concatenate([psig, np.full(nb, background_prior_sigma)])
    w, N = wls(A, d[m], sigma=e[m], prior_mu=mu, prior_sigma=ps, method="sparse", return_normal=True)
    flux, bkg = w[:nsrc], w[nsrc:]
    if not return_errors:
        return flux, bkg
    if nsrc + nb <= 4000:
        cov = np.linalg.inv(N.toarray())
        err = np.sqrt(np.clip(np.diag(cov)[:nsrc], 0, None))
    else:
        err = np.full(nsrc, np.nan)
    return flux, bkg, err


def prf_params(params: dict | None) -> dict:
    """The lfd.prf settings: defaults overridden by ``params``."""
    return merge_settings(schema_defaults("lfd.prf"), params, "lfd.prf", ValueError)


#: the ``lfd.prf`` settings that are keyword arguments of :func:`fit_prf_shape` (same names)
_SHAPE_KEYS = (
    "n_phi_knots",
    "inner_radius",
    "degree",
    "prior_sigma",
    "log_error_floor",
    "sigma_clip",
    "smooth_sigma",
    "offset_prior_sigma",
    "tail",
    "core_degree",
    "core_radius",
    "core_prior_sigma",
    "flux_box",
    "lattice_norm",
    "regular_origin",
)


def radial_knots_of(p: dict) -> np.ndarray:
    """The radial knots (:func:`radial_knots`) of ``lfd.prf`` settings ``p`` (see :func:`prf_params`)."""
    return radial_knots(
        p["r_min"], p["r_max"], p["n_r_knots"], spacing=p["knot_spacing"], inner_radius=p["inner_radius"]
    )


def shape_settings(p: dict) -> dict:
    """The keyword arguments of :func:`fit_prf_shape` taken from ``lfd.prf`` settings ``p`` (see :func:`prf_params`)."""
    return {k: p[k] for k in _SHAPE_KEYS}


def _contamination_radius(edge: EdgeModel, flux) -> np.ndarray:
    """Edge radius per source, zero for sources whose edge model never reaches the threshold (they put no pixel above the noise floor)."""
    flux = np.asarray(flux, float)
    rad = edge.radius(np.where(flux > 0, flux, 0.0))
    peak = edge.flux(np.zeros_like(flux), np.where(flux > 0, flux, 1e-30))
    return np.where((flux > 0) & (peak >= edge.threshold), rad, 0.0)


@dataclass
class _MeanScene:
    """The mean-frame scene of one §4.4 pass, read by the next pass: the PRF ``model``, its scene matrix
    ``S`` over the active sources ``idx``, their fitted fluxes ``flux`` and the model image ``image`` (= S @ flux)."""

    model: PRFModel
    S: sp.csr_matrix
    flux: np.ndarray
    idx: np.ndarray
    image: np.ndarray


def _initial_background(edge: EdgeModel, Bk, pc, pr) -> np.ndarray:
    """Starting sky coefficients over ``Bk``: the edge step's sky surface (common terms copied, or
    refitted when its design differs), else its constant level."""
    nb = Bk.shape[1]
    bkg = np.zeros(nb)
    if not nb:
        return bkg
    ec = edge.background_coefficients
    if ec is not None and len(ec) and edge.background_order >= 0:
        # the edge step's sky surface, on the same (column, row) scaling: copy the common terms
        m = min(nb, len(ec))
        same = background_design(pc, pr, int(edge.background_order))
        if same.shape[1] == len(ec):
            bkg = wls(Bk, same @ np.asarray(ec, float), method="lstsq")
        else:
            bkg[:m] = np.asarray(ec, float)[:m]
    else:
        bkg[0] = edge.background
    return bkg


def _shape_owners(edge: EdgeModel, F, active, sc, sr, pc, pr, prev: _MeanScene | None, shape_purity: float):
    """Pixels that serve the shape fit and the one source each belongs to: ``(mask, owner)``.

    The §4.2 criterion with the current fluxes (inside the edge radius of exactly one source); with a
    previous scene and ``shape_purity`` < 1 also the pixels where one source gives >= shape_purity of
    the modelled source light (the rest, the neighbours' light, is subtracted by :func:`_shape_data`).
    The §4.2 criterion alone keeps only ~500 of 4096 pixels of a crowded TESS cutout, too few to pin
    the core of a ~200-weight shape model.
    """
    crad = np.where(active, _contamination_radius(edge, F), 0.0)
    has = crad > 0
    mask, owner_sub = uncontaminated_pixels(sc[has], sr[has], pc, pr, crad[has])
    owner = np.where(owner_sub >= 0, np.flatnonzero(has)[np.clip(owner_sub, 0, None)], -1)
    if prev is not None and shape_purity < 1:
        own_sub, purity = dominant_source(prev.S, np.clip(prev.flux, 0, None))
        dom = (purity >= shape_purity) & (own_sub >= 0)
        owner = np.where(dom, prev.idx[np.clip(own_sub, 0, None)], owner)
        mask = mask | dom
    return mask, owner


def _shape_data(edge: EdgeModel, pixels, owner, F, active, sc, sr, pc, pr, mean_flux, bkg_pix, prev, p):
    """The shape-fit data of the selected ``pixels``: ``(pix, source, dx, dy, flux)`` with flux the mean
    frame minus the sky and (``subtract_neighbours``) minus the other sources' light; with a previous
    scene, pixels where the source's predicted flux is below ``noise_floor`` are dropped (§4.4)."""
    pix = pixels
    s = owner[pix]
    dx = pc[pix] - sc[s]
    dy = pr[pix] - sr[s]
    fsub = mean_flux[pix] - bkg_pix[pix]
    if p["subtract_neighbours"]:
        # light of the other sources (each below the threshold here, but they add up in crowded
        # fields): the current scene minus the owner's own part; the edge model before any PRF
        if prev is None:
            o_src, o_pix, o_dx, o_dy = source_pixel_pairs(sc[active], sr[active], pc, pr, edge.max_radius)
            o_src = np.flatnonzero(active)[o_src]
            o_val = edge.flux(np.hypot(o_dx, o_dy), F[o_src])
            scene_all = np.bincount(o_pix, weights=o_val, minlength=pc.size)
            own = edge.flux(np.hypot(dx, dy), F[s])
        else:
            scene_all = prev.image
            own = prev.model.evaluate(dx, dy) * F[s]
        fsub = fsub - np.clip(scene_all[pix] - own, 0.0, None)
    if prev is not None:  # §4.4: drop pixels where the source's predicted flux is below the noise floor
        ok = prev.model.evaluate(dx, dy) * F[s] >= p["noise_floor"]
        pix, s, dx, dy, fsub = pix[ok], s[ok], dx[ok], dy[ok], fsub[ok]
    return pix, s, dx, dy, fsub


def _refit_fluxes(model: PRFModel, active, F0, sc, sr, pc, pr, mean_flux, mean_err, Bk, bkg, fit_pix, p):
    """Refit the source fluxes on the mean frame (all pixels, contaminated included; §4.4), dropping
    significantly negative sources from ``active`` (in place) and refitting until none is left.
    Returns ``(idx, S, flux, background coefficients, flux errors)`` of the active sources ``idx``."""
    nb = Bk.shape[1]
    for _ in range(10):
        idx = np.flatnonzero(active)
        S = scene_matrix(model, sc[idx], sr[idx], pc, pr)
        flux, b, err = source_flux(
            S,
            mean_flux,
            mean_err,
            F0[idx],
            prior_width=p["flux_prior_width"],
            background=Bk,
            background_prior=bkg if nb else None,
            pixel_mask=fit_pix,
            return_errors=True,
        )
        # §4.4 drops sources whose flux goes negative; only a *significantly* negative flux
        # (below -drop_sigma x its error) says there is no such source - faint stars next to
        # bright ones scatter around zero and belong in the model
        neg = flux < -float(p["drop_sigma"]) * np.where(np.isfinite(err), err, 0.0)
        if not neg.any():
            break
        active[idx[neg]] = False  # §4.4: no source there (catalog or model wrong)
    return idx, S, flux, b, err


def _scatter(nsrc: int, idx, flux, err):
    """Per-source arrays (nsrc,) of the active sources' ``flux`` (0 elsewhere) and ``err`` (NaN elsewhere)."""
    F = np.zeros(nsrc)
    F[idx] = flux
    Ferr = np.full(nsrc, np.nan)
    Ferr[idx] = err
    return F, Ferr


def flux_change(before, after, after_err, *, max_rel_err: float = 0.01, min_sources: int = 3) -> float:
    """The convergence measure of the §4.4 iteration: the median of ``|after / before - 1|`` over the
    sources whose flux is measured to better than ``max_rel_err`` (``after_err / after``), the ones whose
    change is not noise; over every source with a positive flux in both if fewer than ``min_sources``
    are. ``inf`` when no source has a flux in both."""
    before, after, after_err = (np.asarray(a, float) for a in (before, after, after_err))
    both = np.isfinite(before) & np.isfinite(after) & (before > 0) & (after > 0)
    precise = both & (after_err < max_rel_err * after)
    use = precise if precise.sum() >= min_sources else both
    if not use.any():
        return float("inf")
    return float(np.median(np.abs(after[use] / before[use] - 1.0)))


def prf_convergence(model: PRFModel) -> dict:
    """The §4.4 iteration's outcome for a product's attrs: ``prf_passes`` (the pass whose fit is used) and
    ``prf_converged`` (1 when the fluxes settled within ``lfd.prf.tolerance``, 0 when the fit fell back on
    pass ``n_iter``). A model written before the convergence test has only ``history`` in its ``meta``: its
    fixed passes count as converged."""
    history = model.meta.get("history", [])
    return {
        "prf_passes": int(model.meta.get("used_pass", len(history))),
        "prf_converged": int(bool(model.meta.get("converged", True))),
    }


def _pass_summary(it: int, keep, active, n_signal: int, bkg, change: float) -> dict:
    """The counts of one §4.4 pass (kept in ``meta['history']``), logged."""
    log.info(
        "PRF iteration %d: %d shape pixels (%d clipped), %d sources, %d pixels above noise floor, background %s, "
        "fluxes changed by %.2g",
        it,
        keep.sum(),
        (~keep).sum(),
        active.sum(),
        n_signal,
        np.round(bkg, 3),
        change,
    )
    return {
        "iteration": it,
        "n_shape_pixels": int(keep.sum()),
        "n_clipped": int((~keep).sum()),
        "n_active_sources": int(active.sum()),
        "n_pixels_above_noise_floor": n_signal,
        "background": [float(x) for x in bkg],
        "flux_change": float(change),
    }


def _shape_pass(
    edge: EdgeModel, F, active, sc, sr, pc, pr, mean_flux, mean_err, bkg_pix, fit_pix, prev, sky_err, r_knots, p
):
    """The shape half of one :func:`fit_prf_model` pass: the uncontaminated pixels with the current
    fluxes ``F`` (§4.2, updated in §4.4) and the §4.3 eq. 14 fit of the PRF shape to them
    (:func:`fit_prf_shape`). Returns ``(model, keep, diag)``, ``diag`` the data of the shape fit."""
    # --- uncontaminated pixels with the current fluxes (§4.2, updated in §4.4)
    mask, owner = _shape_owners(edge, F, active, sc, sr, pc, pr, prev, p["shape_purity"])
    pixels = np.flatnonzero(mask & fit_pix & (owner >= 0))
    pix, s, dx, dy, fsub = _shape_data(edge, pixels, owner, F, active, sc, sr, pc, pr, mean_flux, bkg_pix, prev, p)
    # error of a shape pixel: its mean-frame noise plus the sky-model uncertainty (the edge step's
    # sky scatter: unresolved stars, sky structure), which dominates in the faint wings
    e_shape = np.sqrt(mean_err[pix] ** 2 + sky_err**2)
    model, keep = fit_prf_shape(
        dx,
        dy,
        fsub,
        e_shape,
        F[s],
        r_knots=r_knots,
        r_max=p["r_max"],
        return_mask=True,
        source_index=s if p["source_offsets"] else None,
        **shape_settings(p),
    )
    diag = {
        "dx": dx,
        "dy": dy,
        "log_ratio": np.log(np.clip(fsub, 1e-30, None) / F[s]),
        "keep": keep,
        "flux": fsub,
        "source_flux": F[s],
    }
    return model, keep, diag


def unmodelled_pixels(pc, pr, resid, source_image, *, n_sigma: float, model_error: float, grow: int = 1, protect=None):
    """Pixels that hold light the model lacks: mean-frame residual ``resid`` (data - sky - all sources)
    above ``n_sigma`` robust standard deviations of the residuals plus ``model_error`` x the modelled
    source light ``source_image`` there (the PRF's own errors near bright stars), grown by ``grow`` px;
    ``protect`` (boolean over the pixels): never (the pixels at catalogued sources, whose light is theirs).

    Stars the catalog lacks (and anything else bright the scene does not hold) lift a least-squares sky
    above the sky of most pixels; left out of the solves, they no longer do, and the sources next to
    them no longer take their light. Returns a boolean mask over the pixels."""
    from scipy.ndimage import binary_dilation

    resid = np.asarray(resid, float)
    ok = np.isfinite(resid)
    if not ok.any():
        return np.zeros(resid.size, bool)
    med = np.median(resid[ok])
    scale = 1.4826 * np.median(np.abs(resid[ok] - med))
    bad = ok & (resid - med > n_sigma * scale + model_error * np.abs(np.asarray(source_image, float)))
    if grow > 0 and bad.any():
        ic = np.round(pc - pc.min()).astype(int)
        ir = np.round(pr - pr.min()).astype(int)
        img = np.zeros((ir.max() + 1, ic.max() + 1), bool)
        img[ir[bad], ic[bad]] = True
        img = binary_dilation(img, np.ones((2 * grow + 1, 2 * grow + 1), bool))
        bad = img[ir, ic]
    if protect is not None:
        bad &= ~np.asarray(protect, bool)
    return bad


def aperture_correction(
    model: PRFModel,
    flux,
    sc,
    sr,
    pc,
    pr,
    mean_flux,
    sky,
    wing,
    *,
    half_width: float,
    max_contamination: float,
    n_stars: int,
) -> tuple[float, dict]:
    """The flux scale of the mean-frame fit tied to the light in a square aperture: DAOPHOT's aperture
    correction (Stetson 1987 §V, 1990), from the brightest isolated stars of the cutout.

    The §4.3 model is normalised by its integral over the plane (:meth:`PRFModel.normalise`), and most of
    that integral's uncertainty is in the faint outer profile (r ~ 3-5 px) and the power-law tail beyond
    ``r_max`` that no pixel pins: over 15 randomized scenes the fitted PRF's least-squares gain against
    the true PRF was off by -1.2 ... +1.4 % per scene, the same as the scene's common flux bias. Here the
    data set the scale instead. For each candidate ``s`` (positive ``flux``, every pixel of the
    ``(2 half_width)``-px square around it on the cutout and finite, the other sources' modelled light
    in the square < ``max_contamination`` x its own flux; the ``n_stars`` brightest of them) the
    light of the star in the square, measured as the data minus the sky polynomial ``sky`` and minus
    the model of every other source (scene + ``wing`` image, both per pixel), over its fitted flux,

        rho_s = [sum_box(mean_flux - sky - model_all) - n_box x delta_s + sum_box(own model)] / F_s ,

    with ``delta_s`` the median of ``mean_flux - sky - model_all`` over a 3-px frame around the square
    (at least 20 pixels; else 0): the local sky's error, taken as the median so the light of stars the
    catalog lacks, which lifts a least-squares sky ~0.2 e-/s/px above the sky of most pixels, does not
    bias the sum (0.5 % on 5 scenes).

    The correction is ``c = median(rho_s)`` (1 when fewer than 3 stars qualify, or when ``c`` is outside
    0.9-1.1, which says the sky or the neighbours are wrong rather than the PRF): fluxes on the scale
    of the light inside that square, as the SPOC TESS PRF models are normalised (13 x 13 px:
    ``half_width`` 6.5). Returns ``(c, summary)``; ``summary`` holds the stars' ratios.
    """
    flux = np.asarray(flux, float)
    use = np.flatnonzero(np.isfinite(flux) & (flux > 0))
    summary = {"half_width": float(half_width), "n_stars": 0, "correction": 1.0, "ratios": [], "sources": []}
    if use.size == 0 or pc.size == 0:
        return 1.0, summary
    S = scene_matrix(model, sc[use], sr[use], pc, pr).tocsc()
    total = S @ flux[use] + np.asarray(wing, float)
    resid = np.asarray(mean_flux, float) - np.asarray(sky, float) - total
    c0, r0 = float(pc[0]), float(pr[0])  # any pixel centre: the lattice

    def n_lattice(x, x0):  # lattice points within half_width of x
        f = x - x0
        return int(np.floor(f + half_width) - np.ceil(f - half_width) + 1)

    rows = []
    for k in np.argsort(-flux[use], kind="stable"):
        s = use[k]
        box = np.flatnonzero((np.abs(pc - sc[s]) <= half_width) & (np.abs(pr - sr[s]) <= half_width))
        if box.size != n_lattice(sc[s], c0) * n_lattice(sr[s], r0) or not np.all(np.isfinite(resid[box])):
            continue  # off the cutout's edge, or NaN pixels in the square
        own_wing = wing_image(model, sc[s : s + 1], sr[s : s + 1], [1.0], pc[box], pr[box])
        own = flux[s] * (S[box, k].sum() + model.wing_scale * own_wing.sum())
        if total[box].sum() - own > max_contamination * flux[s]:
            continue  # (the others' models are subtracted; their errors scale with their light)
        # the local sky's error: the median residual of a 3-px frame around the square (robust to the
        # light of stars the catalog lacks, which raises a least-squares sky above the sky of most pixels)
        dist = np.maximum(np.abs(pc - sc[s]), np.abs(pr - sr[s]))
        ring = resid[(dist > half_width) & (dist <= half_width + 3.0)]
        ring = ring[np.isfinite(ring)]
        local = float(np.median(ring)) if ring.size >= 20 else 0.0
        rows.append((int(s), float((resid[box].sum() - box.size * local + own) / flux[s])))
        if len(rows) >= n_stars:
            break
    summary.update(sources=[s for s, _ in rows], ratios=[r for _, r in rows], n_stars=len(rows))
    if len(rows) < 3:
        log.warning(
            "aperture correction: %d isolated stars with a complete %.1f-px square (3 needed); none applied",
            len(rows),
            2 * half_width,
        )
        return 1.0, summary
    c = float(np.median(summary["ratios"]))
    if not 0.9 <= c <= 1.1:  # the model's normalisation is good to ~2 %: a larger "correction" is a bad sky
        log.warning(
            "aperture correction %.3f from %d stars is outside [0.9, 1.1] (sky or neighbours wrong?); none applied",
            c,
            len(rows),
        )
        summary["rejected"] = c
        return 1.0, summary
    summary["correction"] = c
    log.info(
        "aperture correction from %d stars (%.1f-px square): fluxes x %.4f (stars %.4f-%.4f)",
        len(rows),
        2 * half_width,
        c,
        min(summary["ratios"]),
        max(summary["ratios"]),
    )
    return c, summary


def fit_prf_model(
    mean_flux,
    mean_err,
    pixel_col,
    pixel_row,
    source_col,
    source_row,
    prior_flux,
    edge: EdgeModel,
    params: dict | None = None,
    *,
    source_id=None,
):
    """The iterative §4.3-4.4 fit of the PRF shape and the mean-frame source fluxes.

    Each pass: the shape pixels with the current fluxes (:func:`_shape_owners`, :func:`_shape_data`),
    the shape fit (:func:`fit_prf_shape`), the source fluxes and sky on the mean frame
    (:func:`_refit_fluxes`); the pass's scene (:class:`_MeanScene`) feeds the next.

    Returns ``(model, diagnostics)``: ``model`` a :class:`PRFModel` carrying ``source_flux`` /
    ``source_flux_err`` (NaN for sources removed because their flux went negative) and the
    background coefficients; ``diagnostics`` holds the data used in the last shape fit (dx, dy,
    ln flux ratio, mask of kept points) and per-iteration counts, for plots and tests.
    """
    p = prf_params(params)
    mean_flux = np.asarray(mean_flux, float)
    mean_err = np.asarray(mean_err, float)
    pc = np.asarray(pixel_col, float)
    pr = np.asarray(pixel_row, float)
    sc = np.asarray(source_col, float)
    sr = np.asarray(source_row, float)
    F0 = np.asarray(prior_flux, float)
    nsrc = sc.size
    r_knots = radial_knots_of(p)
    Bk = background_design(pc, pr, int(p["background_order"]))
    nb = Bk.shape[1]
    bkg = _initial_background(edge, Bk, pc, pr)
    bkg_pix = Bk @ bkg if nb else np.zeros(pc.size)
    sky_err = p["sky_error"]
    if sky_err is None:
        sky_err = edge.background_rms if np.isfinite(edge.background_rms) else 0.0
    candidates = np.isfinite(F0) & (F0 > 0)  # the a-priori sources a pass may keep
    active = candidates.copy()
    F = np.where(active, F0, 0.0)
    fit_pix = np.isfinite(mean_flux)
    history = []
    prev = None  # the scene of the previous pass (none before the first PRF fit)
    n_min, n_max = int(p["n_iter"]), max(int(p["max_iter"]), int(p["n_iter"]))
    for it in range(n_max):
        model, keep, diag = _shape_pass(
            edge, F, active, sc, sr, pc, pr, mean_flux, mean_err, bkg_pix, fit_pix, prev, sky_err, r_knots, p
        )
        # --- refit the source fluxes on the mean frame (all pixels, contaminated included)
        idx, S, flux, bkg, err = _refit_fluxes(
            model, active, F0, sc, sr, pc, pr, mean_flux, mean_err, Bk, bkg, fit_pix, p
        )
        F_before = F
        F, Ferr = _scatter(nsrc, idx, flux, err)
        bkg_pix = Bk @ bkg if nb else np.zeros(pc.size)
        prev = _MeanScene(model, S, flux, idx, S @ flux)
        n_signal = int((np.isfinite(mean_flux) & (prev.image >= p["noise_floor"])).sum())
        change = flux_change(F_before, F, Ferr)
        history.append(_pass_summary(it, keep, active, n_signal, bkg, change))
        if it + 1 >= n_min and change <= float(p["tolerance"]):
            break
        if it + 1 == n_min:  # the paper's fixed passes: kept to fall back on if the passes never settle
            paper = (model, diag, F, Ferr, bkg, prev, active.copy())
    converged = bool(change <= float(p["tolerance"]))
    used = len(history)
    if not converged and n_max > n_min:
        model, diag, F, Ferr, bkg, prev, active_n = paper
        active[:] = active_n
        used = n_min
        log.warning(
            "PRF shape/flux fit not converged in %d passes: the fluxes still change by %.2g per pass "
            "(lfd.prf.tolerance %.2g); the fit after pass %d (lfd.prf.n_iter) is used",
            n_max,
            change,
            p["tolerance"],
            n_min,
        )
    # --- the light of the PRF wings beyond r_max (lfd.prf.wing_radius) as one more sky column with a
    # free scale, in a last refit of the fluxes and sky with the final shape. The shape passes above
    # keep the polynomial sky alone: a wing column there moves the fitted shape's normalisation with
    # the wing model's radial extent (+0.4-1 % on bright isolated stars of PRFs that end at 6-9 px).
    # Every source of the a-priori list is tried again: the polynomial sky, raised by the wings' light,
    # pushed faint stars near bright ones below zero in the passes (§4.4 drops)
    wing = wing_image(model, sc, sr, F, pc, pr, radius=p["wing_radius"])
    has_wing = bool(wing.any())
    sky_design = np.column_stack([Bk, wing]) if has_wing else Bk
    sky_coef = np.append(bkg, 1.0) if has_wing else bkg
    image = prev.image  # the active sources' light, S @ flux

    def refit(pixels):  # every a-priori source tried again; the final shape, the sky (and the wing column)
        active[:] = candidates
        idx, S, flux, coef, err = _refit_fluxes(
            model, active, F0, sc, sr, pc, pr, mean_flux, mean_err, sky_design, sky_coef, pixels, p
        )
        return coef, _scatter(nsrc, idx, flux, err), S @ flux

    if has_wing:
        sky_coef, (F, Ferr), image = refit(fit_pix)
    model.unmodelled = np.zeros((0, 2))
    if p["unmodelled_sigma"] is not None:  # leave out the pixels that hold light no source of the model has
        protect = cKDTree(np.column_stack([sc[candidates], sr[candidates]])).query(np.column_stack([pc, pr]))[0]
        bad = unmodelled_pixels(
            pc,
            pr,
            mean_flux - sky_design @ sky_coef - image,
            image,
            n_sigma=float(p["unmodelled_sigma"]),
            model_error=float(p["unmodelled_model_error"]),
            protect=protect <= float(p["unmodelled_protect_radius"]),
        )
        if bad.any():
            sky_coef, (F, Ferr), image = refit(fit_pix & ~bad)
        model.unmodelled = np.column_stack([pc[bad], pr[bad]])
        log.info(
            "%d pixels hold light the model lacks (> %s sigma): left out of the solves",
            bad.sum(),
            p["unmodelled_sigma"],
        )
    bkg = sky_coef[:nb]
    wing_scale = float(sky_coef[nb]) if has_wing else 1.0
    model.wing_radius = float(p["wing_radius"])
    model.wing_scale = wing_scale
    if p["aperture_box"] is not None:  # the flux scale from the light in a square (DAOPHOT aperture correction)
        c, ap = aperture_correction(
            model,
            np.where(active, F, np.nan),
            sc,
            sr,
            pc,
            pr,
            mean_flux,
            Bk @ bkg if nb else np.zeros(pc.size),
            wing_scale * wing,
            half_width=float(p["aperture_box"]),
            max_contamination=float(p["aperture_max_contamination"]),
            n_stars=int(p["aperture_stars"]),
        )
        model.log_norm += float(np.log(c))  # the PRF per unit flux / c: fluxes x c, the model image unchanged
        F, Ferr = F * c, Ferr * c
        model.meta["aperture_correction"] = ap
    model.source_flux = np.where(active, F, np.nan)
    model.source_flux_err = np.where(active, Ferr, np.nan)
    model.background = np.asarray(bkg, float)
    model.background_order = int(p["background_order"])
    if source_id is not None:
        model.source_id = np.asarray(source_id, dtype=np.int64)
    model.meta.update(
        history=history,
        n_removed_sources=int((candidates & ~active).sum()),
        n_passes=len(history),
        used_pass=used,
        converged=converged,
    )
    diag["history"] = history
    diag["active"] = active
    return model, diag


# ------------------------------------------------------------------------------ picture & step


__all__ += ["background_design"]
