"""Stupp-protocol treatment of the phantom: surgery, radiotherapy plan and dose, chemo-radiation
response, regrowth until the follow-up scan, pseudo-progression.

Timeline (days after the pre-treatment scan, day 0): surgery on day 7 (gross-total or sub-total
resection, or biopsy only), radiotherapy from day 28: 60 Gy in 30 fractions of 2 Gy, five a week
(Stupp et al. 2005), with concomitant temozolomide; four weeks without treatment, then adjuvant
temozolomide; first follow-up MRI 8 to 12 weeks after the end of radiotherapy.

- Target volumes (ESTRO-EANO guideline, Niyazi et al. 2016): GTV = enhancing tumour + necrotic
  core on the pre-treatment T1-Gd; CTV = GTV + 15 mm, cut at the brain surface; PTV = CTV + 3 mm.
- Dose: 60 Gy to the PTV (ICRU 83 style: median PTV dose = prescription), penumbra modelled as an
  error function of the signed distance to the PTV surface (sigma 3.5 mm, 97 % of the dose on the
  PTV surface), a low-dose bath decaying exponentially away from the PTV (45 % at its edge, 30 mm
  length) and a +/-1.5 % smooth inhomogeneity.
- Cell kill per fraction: linear-quadratic, S = exp(-alpha d - beta d^2) with alpha/beta = 10 Gy
  (Rockne et al. 2010), alpha patient-specific (log-normal).
- Temozolomide: an extra kill rate in the growth equation, larger when the MGMT promoter is
  methylated (Hegi et al. 2005: methylation predicts the benefit of temozolomide).
- Pseudo-progression (Brandsma et al. 2008: 20-30 % of patients after chemo-radiation, more often
  with a methylated MGMT promoter, Brandes et al. 2008): enhancement and oedema without tumour
  cells in the high-dose region around the former tumour.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage, special

from inference.synthetic.anatomy import Anatomy
from inference.synthetic.tumour import (
    GrowthParams,
    Solver,
    TumourState,
    compartments,
    edt_inside,
    edt_outside,
)

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

PRESCRIPTION_GY = 60.0
FRACTIONS = 30
ALPHA_BETA_GY = 10.0
CTV_MARGIN_MM = 15.0
PTV_MARGIN_MM = 3.0
PENUMBRA_SIGMA_MM = 3.5
SURGERY_DAY = 7
RT_START_DAY = 28
RT_WEEKS = 6
ADJUVANT_GAP_DAYS = 28
EXTENTS_OF_RESECTION = ("GTR", "STR", "biopsy")


@dataclass(frozen=True)
class TreatmentParams:
    alpha: float  # 1/Gy
    tmz_kill: float  # 1/day, concomitant phase
    follow_up_days: int  # after the end of radiotherapy
    extent_of_resection: str
    residual_rim_mm: float  # STR: thickness of tumour left at the cavity wall
    pseudo_progression: bool

    @property
    def beta(self) -> float:
        return self.alpha / ALPHA_BETA_GY

    @staticmethod
    def random(rng: np.random.Generator, mgmt_methylated: bool, eor: str) -> TreatmentParams:
        tmz = float(rng.uniform(0.010, 0.022)) * (1.0 if mgmt_methylated else 0.25)
        p_psp = 0.30 if mgmt_methylated else 0.10
        return TreatmentParams(
            alpha=float(np.exp(rng.normal(math.log(0.035), 0.35))),
            tmz_kill=tmz,
            follow_up_days=int(rng.integers(56, 85)),
            extent_of_resection=eor,
            residual_rim_mm=float(rng.uniform(2.0, 5.0)),
            pseudo_progression=bool(rng.random() < p_psp),
        )


@dataclass(frozen=True)
class Plan:
    gtv: BoolArray
    ctv: BoolArray
    ptv: BoolArray
    dose: FloatArray  # Gy, total over the course


@dataclass(frozen=True)
class PostState:
    """Follow-up state on the simulation grid."""

    tumour: TumourState
    cavity: BoolArray
    pseudo_progression: BoolArray  # treatment-related enhancement (no tumour cells)
    psp_oedema: BoolArray
    days_after_pre: int


def plan(gtv: BoolArray, anatomy: Anatomy, rng: np.random.Generator) -> Plan:
    """Target volumes and the planned dose (Gy) on the simulation grid."""
    spacing = anatomy.grid.spacing[0]
    dist_gtv = edt_outside(gtv, spacing, CTV_MARGIN_MM + spacing)
    intracranial = (anatomy.wm + anatomy.gm + anatomy.csf) > 0.5
    # margins are measured from the structure's surface, half a voxel beyond its voxel centres
    ctv = (dist_gtv <= CTV_MARGIN_MM + spacing / 2) & (intracranial | gtv)
    ptv = edt_outside(ctv, spacing, PTV_MARGIN_MM + spacing) <= PTV_MARGIN_MM + spacing / 2
    head = (anatomy.wm + anatomy.gm + anatomy.csf + anatomy.bone + anatomy.fat) > 0.3
    return Plan(gtv, ctv, ptv, planned_dose(ptv, head, spacing, rng))


def planned_dose(
    ptv: BoolArray, head: BoolArray, spacing: float, rng: np.random.Generator
) -> FloatArray:
    outside = ndimage.distance_transform_edt(~ptv, sampling=spacing)
    inside = edt_inside(ptv, spacing)
    signed = np.where(ptv, -inside + spacing / 2, outside - spacing / 2)
    # erfc profile: 97 % of the prescription on the PTV surface
    shift = -special.erfcinv(2 * 0.97) * math.sqrt(2) * PENUMBRA_SIGMA_MM
    core = 0.5 * special.erfc((signed - shift) / (math.sqrt(2) * PENUMBRA_SIGMA_MM))
    bath = 0.45 * np.exp(-np.clip(signed, 0, None) / 30.0)
    rel = np.maximum(core, bath)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, ptv.shape).astype(np.float32), 10 / spacing)
    rel *= 1.0 + 0.015 * noise / max(float(noise.std()), 1e-6)
    rel = np.where(head, rel, 0.0)
    median_ptv = float(np.median(rel[ptv])) if ptv.any() else 1.0
    return (PRESCRIPTION_GY * rel / median_ptv).astype(np.float32)


def dose_metrics(dose: FloatArray, ptv: BoolArray) -> dict[str, float]:
    values = dose[ptv]
    return {
        "ptv_d95_gy": float(np.percentile(values, 5)),
        "ptv_d50_gy": float(np.median(values)),
        "dose_max_gy": float(dose.max()),
    }


def resect(
    pre: TumourState, eor: str, rim_mm: float, spacing: float
) -> tuple[FloatArray, BoolArray]:
    """Cell density after surgery and the resection cavity."""
    u = pre.density.copy()
    if eor == "biopsy":
        return u, np.zeros_like(pre.core)
    depth = edt_inside(pre.core, spacing) - spacing / 2
    if eor == "GTR":
        cavity = pre.core.copy()
    elif eor == "STR":
        cavity = depth > rim_mm
    else:
        raise ValueError(f"extent of resection must be one of {EXTENTS_OF_RESECTION}, found {eor}")
    u[cavity] = 0.0
    if eor == "GTR":
        # a gross-total resection removes the enhancing tumour but leaves infiltrating cells
        u = np.minimum(u, 0.45).astype(np.float32)
    return u, cavity


def treat(
    anatomy: Anatomy,
    pre: TumourState,
    solver: Solver,
    growth: GrowthParams,
    params: TreatmentParams,
    dose: FloatArray,
    spacing: float,
    rng: np.random.Generator,
) -> PostState:
    """Simulate surgery, chemo-radiation and regrowth up to the follow-up scan."""
    shape = pre.density.shape
    u_full, cavity = resect(pre, params.extent_of_resection, params.residual_rim_mm, spacing)
    # necrotic tissue and the cavity hold no proliferating cells and let none through
    dead = pre.necrotic | cavity
    live = solver.with_barrier(dead)
    u = live.to_solver(u_full)
    d_box = live.to_solver(dose)
    per_fraction = d_box / FRACTIONS
    weekly_survival = np.exp(-5 * (params.alpha * per_fraction + params.beta * per_fraction**2))
    u, _ = live.run(u, RT_START_DAY - SURGERY_DAY, growth.rho)
    for _week in range(RT_WEEKS):
        u *= weekly_survival.astype(np.float32)
        u, _ = live.run(u, 7.0, growth.rho, kill_rate=params.tmz_kill)
    u, _ = live.run(u, ADJUVANT_GAP_DAYS, growth.rho)
    remaining = params.follow_up_days - ADJUVANT_GAP_DAYS
    if remaining > 0:
        # adjuvant cycles (5 days in 28) at a higher dose: about half the concomitant rate
        u, _ = live.run(u, remaining, growth.rho, kill_rate=0.5 * params.tmz_kill)
    density = live.to_full(u, shape)
    density[dead] = 0.0
    necrotic = pre.necrotic & ~cavity
    post = compartments(
        density, growth, spacing, necrotic=necrotic, excluded=cavity, white=anatomy.wm
    )

    psp = np.zeros(shape, dtype=bool)
    psp_oedema = np.zeros(shape, dtype=bool)
    if params.pseudo_progression:
        psp, psp_oedema = _pseudo_progression(pre, cavity, dose, spacing, rng)
        psp &= ~post.core
    days = RT_START_DAY + 7 * RT_WEEKS + params.follow_up_days
    return PostState(post, cavity, psp, psp_oedema & ~psp & ~post.core, days)


def _pseudo_progression(
    pre: TumourState, cavity: BoolArray, dose: FloatArray, spacing: float, rng: np.random.Generator
) -> tuple[BoolArray, BoolArray]:
    """Patchy enhancement within ~8 mm of the former core, where the dose is >= 50 Gy."""
    outside_core = edt_outside(pre.core, spacing, 8.0 + spacing)
    band = (outside_core > 0) & (outside_core <= 8.0) & (dose >= 50.0) & ~cavity
    noise = ndimage.gaussian_filter(rng.normal(0, 1, band.shape).astype(np.float32), 4 / spacing)
    patchy = noise > np.percentile(noise[band], 45) if band.any() else band
    psp = band & patchy
    psp = ndimage.binary_opening(psp, iterations=1)
    oedema = edt_outside(psp, spacing, 10.0 + spacing) <= 10.0
    return psp, oedema & (dose >= 30.0)
