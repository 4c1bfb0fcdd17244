"""Patient covariates, volumetric response category and overall survival of the phantom.

Covariates (newly diagnosed glioblastoma treated with the Stupp protocol):

- age: normal, mean 60 years, sd 10, clipped to 25-85 (median age at diagnosis in trials
  ~56-60, e.g. Stupp et al. 2005: median 56; population registries ~64, Ostrom et al. CBTRUS);
- sex: 60 % male (male:female about 1.6, CBTRUS);
- KPS 60-100 in steps of 10 (trial populations: mostly 80-100);
- MGMT promoter methylated in 45 % (Hegi et al. 2005);
- extent of resection: gross-total 40 %, sub-total 35 %, biopsy 25 %.

Overall survival (months) is log-normal: log OS = mu + effects + noise (sd 0.45). Effects are
chosen to follow published hazard directions and rough sizes: MGMT methylation (median 21.7 vs
12.7 months with temozolomide, Hegi et al. 2005), age (worse per decade), KPS (better per 10
points), resection (gross-total better than biopsy, Stummer et al. 2006; Lacroix et al. 2001), and
the post-treatment tumour burden (integral of the cell density at follow-up, in ml). ``mu`` is
calibrated so that the cohort's median is about 15 months (Stupp et al. 2005: 14.6 months).

Response (volumetric, on the follow-up T1-Gd as a reader would see it, pseudo-progression
included): complete response when no enhancement is left (below ``complete_ml``), partial
response for a change of enhancing volume <= -65 %, progressive disease for >= +40 %, stable
otherwise (the design's thresholds; RANO volumetric equivalents of the 2D criteria).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dicom_node.types import RESPONSE_CATEGORIES

SURVIVAL_CLASSES = ("short", "intermediate", "long")
DEFAULT_SURVIVAL_CUTOFFS_MONTHS = (12.0, 24.0)

LOG_OS_MU = math.log(15.5)
LOG_OS_SD = 0.45
EFFECT_MGMT = 0.45
EFFECT_AGE_PER_DECADE = -0.15
EFFECT_KPS_PER_10 = 0.10
EFFECT_EOR = {"GTR": 0.12, "STR": 0.0, "biopsy": -0.18}
EFFECT_BURDEN_PER_LOG_ML = -0.22
# about the cohort's median post-treatment burden, so that the burden term is centred
REFERENCE_BURDEN_ML = 25.0


@dataclass(frozen=True)
class Covariates:
    age: int
    sex: str
    kps: int
    mgmt_methylated: bool
    extent_of_resection: str

    @staticmethod
    def random(rng: np.random.Generator) -> Covariates:
        age = int(np.clip(round(rng.normal(60.0, 10.0)), 25, 85))
        sex = "M" if rng.random() < 0.6 else "F"
        kps = int(rng.choice([60, 70, 80, 90, 100], p=[0.05, 0.15, 0.30, 0.35, 0.15]))
        mgmt = bool(rng.random() < 0.45)
        eor = str(rng.choice(["GTR", "STR", "biopsy"], p=[0.40, 0.35, 0.25]))
        return Covariates(age, sex, kps, mgmt, eor)


def survival_months(cov: Covariates, burden_ml: float, noise: float) -> float:
    """Overall survival from the covariates and the post-treatment burden; ``noise`` ~ N(0,1)."""
    log_os = (
        LOG_OS_MU
        + EFFECT_MGMT * (1.0 if cov.mgmt_methylated else 0.0)
        - EFFECT_MGMT * 0.45  # centre the MGMT effect on the cohort's methylation rate
        + EFFECT_AGE_PER_DECADE * (cov.age - 60) / 10.0
        + EFFECT_KPS_PER_10 * (cov.kps - 85) / 10.0
        + EFFECT_EOR[cov.extent_of_resection]
        + EFFECT_BURDEN_PER_LOG_ML * math.log((burden_ml + 0.5) / REFERENCE_BURDEN_ML)
        + LOG_OS_SD * noise
    )
    return float(min(120.0, max(1.0, math.exp(log_os))))


def survival_class(
    months: float, cutoffs: tuple[float, float] = DEFAULT_SURVIVAL_CUTOFFS_MONTHS
) -> str:
    """``short`` below the first cut-off, ``long`` from the second, ``intermediate`` between."""
    lo, hi = cutoffs
    if not 0 < lo < hi:
        raise ValueError(f"survival cut-offs must satisfy 0 < low < high, found {cutoffs}")
    if months < lo:
        return SURVIVAL_CLASSES[0]
    if months < hi:
        return SURVIVAL_CLASSES[1]
    return SURVIVAL_CLASSES[2]


def response_category(
    pre_enhancing_ml: float,
    post_enhancing_ml: float,
    complete_ml: float = 0.1,
    partial: float = -0.65,
    progressive: float = 0.40,
) -> str:
    """Volumetric response category (one of :data:`RESPONSE_CATEGORIES`)."""
    if post_enhancing_ml < complete_ml:
        return RESPONSE_CATEGORIES[0]
    change = (post_enhancing_ml - pre_enhancing_ml) / max(pre_enhancing_ml, 1e-6)
    if change <= partial:
        return RESPONSE_CATEGORIES[1]
    if change >= progressive:
        return RESPONSE_CATEGORIES[3]
    return RESPONSE_CATEGORIES[2]
