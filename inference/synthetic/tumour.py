"""Glioblastoma growth: the Fisher-Kolmogorov (proliferation-invasion) reaction-diffusion model.

    du/dt = div(D(x) grad u) + rho u (1 - u) - k(t) u

``u`` is the tumour cell density normalised to the carrying capacity; ``D`` is larger in white
than in grey matter (D_w = 5 D_g, Swanson et al. 2000) and zero in cerebrospinal fluid, bone and
outside the head. Fluxes between neighbouring voxels use the harmonic mean of their
diffusivities, so nothing flows into a voxel whose diffusivity is zero (no-flux boundary at the
CSF and at the brain surface). ``k(t)`` is an extra kill rate (temozolomide, :mod:`treatment`).

Imaging follows the usual thresholds of the proliferation-invasion literature (Swanson et al.
2008; Rockne et al. 2010): the enhancing tumour core is ``u >= 0.6`` here (0.8 in those papers,
lower here because of partial volume on a 2 mm grid), oedema / infiltration visible on T2-FLAIR
reaches down to a patient-specific threshold (0.02-0.10). The centre of a large core is necrotic
(a rim of viable enhancing tumour 3-6 mm thick surrounds it).

Explicit Euler on a box around the tumour, on a grid of about 2 mm (finer simulation grids are
block-averaged for the solver), with the stable time step dt <= h^2 / (6 D_max).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.errors import InputError
from inference.synthetic.anatomy import Anatomy

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

CORE_THRESHOLD = 0.6
BOX_HALF_MM = 72.0
SOLVER_SPACING_MM = 2.0


@dataclass(frozen=True)
class GrowthParams:
    """Patient-specific growth parameters (units: mm^2/day and 1/day)."""

    d_white: float
    d_grey: float
    rho: float
    oedema_threshold: float
    rim_mm: float
    rho_heterogeneity: float = 0.35

    @staticmethod
    def random(rng: np.random.Generator) -> GrowthParams:
        d_white = float(np.exp(rng.normal(math.log(0.15), 0.35)))
        return GrowthParams(
            d_white=d_white,
            d_grey=d_white / 5.0,
            rho=float(np.exp(rng.normal(math.log(0.025), 0.3))),
            oedema_threshold=float(rng.uniform(0.02, 0.10)),
            rim_mm=float(rng.uniform(3.0, 6.0)),
        )


@dataclass
class Solver:
    """Fisher-Kolmogorov solver on a box of the simulation grid (block-averaged by ``factor``)."""

    box: tuple[slice, slice, slice]
    factor: int
    h: float
    diffusivity: FloatArray  # on the solver grid
    faces: tuple[FloatArray, FloatArray, FloatArray]
    d_max: float
    rho_map: FloatArray | None = None  # relative proliferation (mean 1) on the solver grid

    @staticmethod
    def build(
        anatomy: Anatomy,
        params: GrowthParams,
        centre: tuple[int, int, int],
        barrier: BoolArray,
        rng: np.random.Generator,
    ) -> Solver:
        spacing = anatomy.grid.spacing[0]
        factor = max(1, round(SOLVER_SPACING_MM / spacing))
        half = math.ceil(BOX_HALF_MM / spacing / factor) * factor
        box_l = []
        for c, n in zip(centre, anatomy.grid.shape, strict=True):
            lo = max(0, c - half)
            hi = min(n, c + half)
            hi = lo + ((hi - lo) // factor) * factor
            box_l.append(slice(lo, hi))
        box = (box_l[0], box_l[1], box_l[2])
        d = params.d_white * anatomy.wm[box] + params.d_grey * anatomy.gm[box]
        d = np.where(barrier[box], 0.0, d).astype(np.float32)
        if factor > 1:
            d = _block_mean(d, factor)
        solver = Solver._from_d(box, factor, spacing * factor, d)
        # heterogeneous proliferation (smooth log-normal field, ~10 mm correlation length) so
        # that tumours grow lobulated rather than as spheres
        noise = rng.normal(0.0, 1.0, d.shape).astype(np.float32)
        noise = ndimage.gaussian_filter(noise, 10.0 / solver.h)
        noise *= params.rho_heterogeneity / max(float(noise.std()), 1e-6)
        solver.rho_map = np.exp(noise - noise.mean()).astype(np.float32)
        return solver

    @staticmethod
    def _from_d(box: tuple[slice, slice, slice], factor: int, h: float, d: FloatArray) -> Solver:
        faces = tuple(_harmonic_faces(d, axis) for axis in range(3))
        return Solver(box, factor, h, d, faces, float(d.max()))  # type: ignore[arg-type]

    def with_barrier(self, barrier_full: BoolArray) -> Solver:
        """The same solver with extra zero-diffusivity voxels (necrosis, resection cavity)."""
        b = barrier_full[self.box]
        if self.factor > 1:
            b = _block_mean(b.astype(np.float32), self.factor) > 0.5
        d = np.where(b, 0.0, self.diffusivity).astype(np.float32)
        solver = Solver._from_d(self.box, self.factor, self.h, d)
        solver.rho_map = self.rho_map
        return solver

    def to_solver(self, u_full: FloatArray) -> FloatArray:
        u = u_full[self.box]
        return _block_mean(u, self.factor) if self.factor > 1 else u.astype(np.float32).copy()

    def to_full(self, u: FloatArray, shape: tuple[int, int, int]) -> FloatArray:
        out = np.zeros(shape, dtype=np.float32)
        if self.factor > 1:
            u = ndimage.zoom(u, self.factor, order=1, mode="nearest", grid_mode=True)
        out[self.box] = u
        return out

    def dt(self) -> float:
        return min(1.0, 0.9 * self.h**2 / (6.0 * max(self.d_max, 1e-6)))

    def run(
        self,
        u: FloatArray,
        days: float,
        rho: float,
        kill_rate: float = 0.0,
        stop: float | None = None,
        stop_check_days: float = 10.0,
    ) -> tuple[FloatArray, float]:
        """Integrate for ``days`` (or until the core reaches ``stop`` ml); returns (u, days)."""
        dt = self.dt()
        inv_h2 = 1.0 / self.h**2
        alive = self.diffusivity > 0
        u = np.where(alive, u, 0.0).astype(np.float32)
        acc = np.empty_like(u)
        rho_x = rho * (self.rho_map if self.rho_map is not None else np.ones_like(u))
        t, next_check = 0.0, stop_check_days
        voxel_ml = self.h**3 / 1000.0
        while t < days - 1e-9:
            step = min(dt, days - t)
            acc.fill(0.0)
            for axis in range(3):
                flux = self.faces[axis] * np.diff(u, axis=axis)
                lo = [slice(None)] * 3
                hi = [slice(None)] * 3
                lo[axis] = slice(0, -1)
                hi[axis] = slice(1, None)
                acc[tuple(lo)] += flux
                acc[tuple(hi)] -= flux
            acc *= inv_h2
            acc += (rho_x * (1.0 - u) - kill_rate) * u
            u += step * acc
            np.clip(u, 0.0, 1.0, out=u)
            t += step
            if stop is not None and t >= next_check:
                next_check += stop_check_days
                if np.count_nonzero(u >= CORE_THRESHOLD) * voxel_ml >= stop:
                    break
        return u, t


def _harmonic_faces(d: FloatArray, axis: int) -> FloatArray:
    a = np.take(d, range(d.shape[axis] - 1), axis=axis)
    b = np.take(d, range(1, d.shape[axis]), axis=axis)
    s = a + b
    return np.where(s > 0, 2.0 * a * b / np.where(s > 0, s, 1.0), 0.0).astype(np.float32)


def _block_mean(a: npt.NDArray[np.floating], f: int) -> FloatArray:
    k, j, i = (n // f for n in a.shape)
    a = a[: k * f, : j * f, : i * f]
    return a.reshape(k, f, j, f, i, f).mean(axis=(1, 3, 5)).astype(np.float32)


def _box(mask: BoolArray, pad: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def edt_inside(mask: BoolArray, spacing: float) -> npt.NDArray[np.float64]:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it, 0 outside.

    Computed on the mask's bounding box plus one voxel, which gives the full-grid result (the
    padding ring is outside the mask) at a fraction of the cost.
    """
    out = np.zeros(mask.shape, dtype=np.float64)
    if mask.any():
        box = _box(mask, 1)
        out[box] = ndimage.distance_transform_edt(mask[box], sampling=spacing)
    return out


def edt_outside(mask: BoolArray, spacing: float, max_mm: float) -> npt.NDArray[np.float64]:
    """Distance (mm) to ``mask``, exact up to ``max_mm`` and ``inf`` beyond (0 inside)."""
    out = np.full(mask.shape, np.inf, dtype=np.float64)
    if mask.any():
        box = _box(mask, math.ceil(max_mm / spacing) + 1)
        out[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
    return out


def pick_seed(anatomy: Anatomy, rng: np.random.Generator) -> tuple[int, int, int]:
    """A white-matter voxel of the cerebral hemispheres, away from the brain surface."""
    spacing = anatomy.grid.spacing[0]
    deep = ndimage.distance_transform_edt(anatomy.brain, sampling=spacing) > 25.0
    nz = anatomy.grid.shape[0]
    k = np.arange(nz)[:, None, None]
    # supratentorial: upper two thirds of the brain's extent (GBM is mostly supratentorial)
    ks = np.flatnonzero(anatomy.brain.any(axis=(1, 2)))
    k_lo = ks[0] + 0.4 * (ks[-1] - ks[0])
    candidates = np.argwhere((anatomy.wm > 0.9) & deep & (k >= k_lo))
    if len(candidates) == 0:
        raise InputError("no deep white-matter voxel to seed a tumour in this anatomy")
    c = candidates[rng.integers(len(candidates))]
    return (int(c[0]), int(c[1]), int(c[2]))


@dataclass(frozen=True)
class TumourState:
    """Cell density and imaging compartments on the simulation grid."""

    density: FloatArray
    necrotic: BoolArray
    enhancing: BoolArray
    oedema: BoolArray

    @property
    def core(self) -> BoolArray:
        return self.necrotic | self.enhancing


def compartments(
    u: FloatArray,
    params: GrowthParams,
    spacing: float,
    necrotic: BoolArray | None = None,
    excluded: BoolArray | None = None,
    white: FloatArray | None = None,
) -> TumourState:
    """Split a density map into necrotic core, enhancing rim and oedema.

    Without ``necrotic`` given, the necrotic core is the part of the dense core deeper than the
    rim thickness; ``excluded`` voxels (e.g. a resection cavity) belong to no compartment.
    """
    core = u >= CORE_THRESHOLD
    if excluded is not None:
        core &= ~excluded
    if necrotic is None:
        # depth below the core's surface (which lies half a voxel outside the edge voxels)
        depth = edt_inside(core, spacing) - spacing / 2
        necrotic = depth > params.rim_mm
    necrotic = necrotic.copy()
    if excluded is not None:
        necrotic &= ~excluded
    enhancing = core & ~necrotic
    oedema = (u >= params.oedema_threshold) & ~core & ~necrotic
    if white is not None:
        # vasogenic oedema spreads along white matter and spares the cortex: away from the
        # dense tumour, only white-matter-rich voxels are oedematous
        oedema &= (white >= 0.4) | (u >= 0.3)
    if excluded is not None:
        oedema &= ~excluded
    return TumourState(u, necrotic, enhancing, oedema)


def grow(
    anatomy: Anatomy, rng: np.random.Generator, params: GrowthParams, target_core_ml: float
) -> tuple[TumourState, Solver, int]:
    """Grow a tumour from a white-matter seed until its core reaches ``target_core_ml``.

    Returns the pre-treatment state, the solver (its box is reused for treatment) and the number
    of days of growth.
    """
    spacing = anatomy.grid.spacing[0]
    seed = pick_seed(anatomy, rng)
    barrier = (anatomy.wm + anatomy.gm) < 0.3
    solver = Solver.build(anatomy, params, seed, barrier, rng)
    k, j, i = np.indices(anatomy.grid.shape, dtype=np.float32)
    r2 = ((k - seed[0]) ** 2 + (j - seed[1]) ** 2 + (i - seed[2]) ** 2) * spacing**2
    u0 = (0.9 * np.exp(-r2 / (2 * 4.0**2))).astype(np.float32)
    u, days = solver.run(solver.to_solver(u0), days=4000.0, rho=params.rho, stop=target_core_ml)
    full = solver.to_full(u, anatomy.grid.shape)
    full = np.where(barrier, 0.0, full).astype(np.float32)
    state = compartments(full, params, spacing, white=anatomy.wm)
    logger.debug(
        "grew tumour for %.0f days: core %.1f ml", days, state.core.sum() * spacing**3 / 1000
    )
    return state, solver, round(days)


def mass_effect(
    fields: dict[str, FloatArray],
    core: BoolArray,
    brain: BoolArray,
    spacing: float,
    strength: float,
) -> dict[str, FloatArray]:
    """Push tissue radially away from the tumour centre (a smooth displacement ~ core radius).

    The displacement at distance r from the centre is ``strength * R * exp(-(r/(2R))^2)`` with R
    the core's equivalent-sphere radius, damped to zero outside the brain; every field is
    resampled by the same backward map so that tissue and tumour stay consistent.
    """
    if not core.any() or strength <= 0:
        return fields
    centre = np.array(ndimage.center_of_mass(core))
    radius = (3 * core.sum() * spacing**3 / (4 * math.pi)) ** (1 / 3)
    shape = core.shape
    idx = np.indices(shape, dtype=np.float32)
    vec = (idx - centre[:, None, None, None]) * spacing
    r = np.sqrt((vec**2).sum(axis=0)) + 1e-3
    amp = strength * radius * np.exp(-((r / (2.0 * radius)) ** 2))
    amp *= ndimage.gaussian_filter(brain.astype(np.float32), 4.0 / spacing)
    # backward map: the value at x comes from x - s(x) * e_r (shrinks near the centre)
    src = idx - (amp / r)[None] * vec / spacing
    return {
        name: ndimage.map_coordinates(f, src, order=1, mode="nearest").astype(np.float32)
        for name, f in fields.items()
    }
