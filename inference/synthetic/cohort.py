"""Synthetic cohort: one patient at a time (anatomy -> tumour -> treatment -> images -> files).

Every random draw of patient ``i`` comes from ``numpy.random.SeedSequence([seed, i])`` (and the
site profiles from ``[seed, SITE_STREAM]``), so a patient's files do not depend on how many
patients are generated, in which order, or on how many processes share the work.

Layout of ``out_dir``::

    cohort.csv                       one row per patient (covariates, volumes, dose, outcome)
    sites.csv                        the site profiles
    <patient_id>/nifti/              pre_{t1,t1c,t2,flair}.nii.gz, post_*.nii.gz,
                                     pre_labels.nii.gz, post_labels.nii.gz, gtv/ctv/ptv.nii.gz,
                                     dose.nii.gz, density_pre.nii.gz, density_post.nii.gz
    <patient_id>/dicom/pre/          one folder per MR series, RTSTRUCT/, RTDOSE/ (what routing
                                     sends the node for a prediction)
    <patient_id>/dicom/post/         one folder per follow-up MR series
    <patient_id>/dicom/reader/       pre/seg.dcm, post/seg.dcm: a reader's Segmentation in each
                                     study (enhancing tumour or lesion, necrotic core), the truth
                                     a DICOM site trains on (inference.dicom_cohort)

Label maps (BraTS-like): 0 background, 1 necrotic core, 2 oedema, 3 enhancing tumour,
4 resection cavity, 5 treatment-related enhancement (pseudo-progression).
"""

from __future__ import annotations

import csv
import datetime
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.convert.geometry import grid_centre, sitk_image
from dicom_node.convert.spatial_registration import rotation_deg
from dicom_node.errors import InputError
from dicom_node.types import PatientStudy, Volume
from inference.registration import RigidTransform
from inference.synthetic import anatomy as anatomy_mod
from inference.synthetic import dicom_export as dx
from inference.synthetic import outcome, scanner, treatment, tumour
from inference.synthetic.planning_frame import (
    PLANNING_CHOICES,
    random_rotation,
    to_planning_frame,
)

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom")
SITE_STREAM = 1_000_003
OUTCOME_STREAM = 1_000_005
MOTION_STREAM = 1_000_007
_TWIN_SUFFIX = re.compile(r"-D\d+$")
LABELS = {"necrotic": 1, "oedema": 2, "enhancing": 3, "cavity": 4, "psp": 5}
TARGET_CORE_MEDIAN_ML = 28.0
TARGET_CORE_SIGMA = 0.6

FAMILY_NAMES = (
    "Lefèvre", "Müller", "Nørgaard", "García", "Dvořák", "Çelik", "Kowalczyk", "Ó Súilleabháin",
    "Østergaard", "Håkansson", "Papadopoulou", "Jäger", "Brontë", "Łukasiewicz", "Núñez",
    "Smith", "Rossi", "Van den Berg", "Dubois", "Fernández", "Schäfer", "Söderström", "Öztürk",
    "Moreau", "Horváth", "Nováková", "Ibáñez", "Kühn", "Ødegård", "Duarte",
)  # fmt: skip
GIVEN_F = ("Zoë", "Anaïs", "Sofía", "Åse", "Chloé", "Łucja", "Siobhán", "Maria", "Inès", "Jana",
           "Björk", "Renée", "Élodie", "Hanna", "Noémie")  # fmt: skip
GIVEN_M = ("José", "Jürgen", "Søren", "Antonín", "Mehmet", "François", "Björn", "Paweł", "Seán",
           "Luca", "Ömer", "Jérôme", "Tomáš", "Mikkel", "Andrés")  # fmt: skip


@dataclass(frozen=True)
class PatientRecord:
    """One row of cohort.csv."""

    values: dict[str, Any]

    @property
    def patient_id(self) -> str:
        return str(self.values["patient_id"])


def patient_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def cohort_sites(seed: int, n_sites: int) -> list[scanner.SiteProfile]:
    return scanner.site_profiles(n_sites, np.random.default_rng([seed, SITE_STREAM]))


def patient_id(seed: int, index: int) -> str:
    return f"GF{seed % 100000:05d}-{index + 1:04d}"


def _dicom_age(birth: datetime.date, when: datetime.datetime) -> str:
    """PatientAge (AS) on ``when`` of a patient born on ``birth``: whole years, ``nnnY``."""
    day = when.date()
    years = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _smooth(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Partial-volume edge of a label (Gaussian of half a voxel)."""
    return ndimage.gaussian_filter(mask.astype(np.float32), 0.5)


def _fractions(
    anat: anatomy_mod.Anatomy, tissue: dict[str, npt.NDArray[np.float32]], masks: dict[str, Any]
) -> dict[str, npt.NDArray[np.float32]]:
    """Compartment fractions: tumour compartments replace brain tissue, skull/scalp untouched."""
    brain_frac = np.clip(tissue["wm"] + tissue["gm"] + tissue["csf"], 0.0, 1.0)
    weights = {name: _smooth(m) for name, m in masks.items() if m is not None and m.any()}
    total = np.zeros_like(brain_frac)
    for w in weights.values():
        total += w
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    out: dict[str, npt.NDArray[np.float32]] = {}
    keep = 1.0 - np.minimum(total, 1.0)
    for name in ("wm", "gm", "csf"):
        out[name] = (tissue[name] * keep).astype(np.float32)
    for name, w in weights.items():
        out[name] = (w * scale * brain_frac).astype(np.float32)
    out["fat"] = anat.fat
    out["bone"] = anat.bone
    return out


def _label_map(masks: Mapping[str, npt.NDArray[np.bool_]], shape: tuple[int, ...]) -> Any:
    lab = np.zeros(shape, dtype=np.uint8)
    for name in ("oedema", "cavity", "psp", "necrotic", "enhancing"):  # later wins
        m = masks.get(name)
        if m is not None:
            lab[m] = LABELS[name]
    return lab


def _write_nifti(path: Path, array: npt.NDArray[Any], grid: Volume) -> None:
    import SimpleITK as sitk

    img = sitk_image(grid, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True, 1)  # gzip level 1: 3x faster, ~10 % larger


def _person(rng: np.random.Generator, sex: str) -> str:
    family = FAMILY_NAMES[int(rng.integers(len(FAMILY_NAMES)))]
    given = GIVEN_F if sex == "F" else GIVEN_M
    return f"{family}^{given[int(rng.integers(len(given)))]}"


@dataclass(frozen=True)
class PreTreatment:
    """A patient up to the radiotherapy plan: the covariates, the anatomy, the grown tumour and
    its growth parameters, the tissue maps (after mass effect) and the plan with its dose."""

    covariates: outcome.Covariates
    anatomy: anatomy_mod.Anatomy
    growth: tumour.GrowthParams
    pre: tumour.TumourState
    solver: tumour.Solver
    growth_days: int
    tissue: dict[str, npt.NDArray[np.float32]]
    plan: treatment.Plan


def simulate_pre_treatment(
    rng: np.random.Generator, spacing_mm: float, mass_effect: bool = True
) -> PreTreatment:
    """The draws of a patient before treatment, in the order :func:`generate_patient` makes them
    (``rng`` is the patient's own, :func:`patient_rng`)."""
    cov = outcome.Covariates.random(rng)
    anat = anatomy_mod.make_anatomy(rng, spacing_mm)
    growth = tumour.GrowthParams.random(rng)
    log_target = rng.normal(math.log(TARGET_CORE_MEDIAN_ML), TARGET_CORE_SIGMA)
    target = float(np.clip(np.exp(log_target), 3.0, 130.0))
    pre, solver, growth_days = tumour.grow(anat, rng, growth, target)
    tissue = {"wm": anat.wm, "gm": anat.gm, "csf": anat.csf}
    if mass_effect:
        tissue = tumour.mass_effect(tissue, pre.core, anat.brain, spacing_mm, strength=0.3)
    rt_plan = treatment.plan(pre.core, anat, rng)
    return PreTreatment(cov, anat, growth, pre, solver, growth_days, tissue, rt_plan)


def seen_enhancing_ml(post: treatment.PostState, spacing_mm: float) -> float:
    """Enhancing volume on the follow-up T1-Gd as a reader outlines it (tumour and
    treatment-related enhancement), in ml: the volume behind the response category."""
    voxels = (post.tumour.enhancing | post.pseudo_progression).sum()
    return float(voxels * spacing_mm**3 / 1000.0)


def outcome_twin_id(patient_id: str, draw: int) -> str:
    """The patient ID of a patient's outcome draw ``draw`` (draw 0 is the patient itself)."""
    return patient_id if draw == 0 else f"{patient_id}-D{draw}"


def outcome_base_id(patient_id: str) -> str:
    """The patient an outcome twin was drawn from (the ID itself for a cohort patient)."""
    return _TWIN_SUFFIX.sub("", patient_id)


def generate_patient(
    index: int,
    seed: int,
    out_dir: Path | None,
    n_sites: int = 1,
    spacing_mm: float = 2.0,
    formats: Sequence[str] = FORMATS,
    survival_cutoffs: tuple[float, float] = outcome.DEFAULT_SURVIVAL_CUTOFFS_MONTHS,
    mass_effect: bool = True,
    follow_up_moved: bool = False,
    rt_planning_frame: str = "",
) -> PatientRecord:
    """Simulate patient ``index`` of the cohort ``seed`` and write its files under ``out_dir``.

    ``formats`` is any subset of ``("nifti", "dicom")`` (empty: the table row only).
    ``follow_up_moved``, ``rt_planning_frame``: see :func:`generate_patient_draws`.
    """
    return generate_patient_draws(
        index, seed, out_dir, n_sites, spacing_mm, formats, survival_cutoffs, mass_effect,
        follow_up_moved=follow_up_moved, rt_planning_frame=rt_planning_frame,
    )[0]  # fmt: skip


def generate_patient_draws(
    index: int,
    seed: int,
    out_dir: Path | None,
    n_sites: int = 1,
    spacing_mm: float = 2.0,
    formats: Sequence[str] = FORMATS,
    survival_cutoffs: tuple[float, float] = outcome.DEFAULT_SURVIVAL_CUTOFFS_MONTHS,
    mass_effect: bool = True,
    outcome_draws: int = 1,
    follow_up_moved: bool = False,
    rt_planning_frame: str = "",
) -> list[PatientRecord]:
    """Patient ``index`` of the cohort ``seed`` and, with ``outcome_draws`` > 1, its outcome
    twins: the same patient up to the radiotherapy plan (the same pre-treatment images, byte
    for byte, GTV and dose) with the MGMT status, the extent of resection and the treatment
    drawn again from their own random streams, as :func:`outcome_twin_id` ``-D1``, ``-D2``...
    Draw 0 is the cohort's patient exactly as without twins. Twins are written as NIfTI only
    (a twin's pre-treatment study would be the patient's own DICOM study under another
    PatientID).

    ``follow_up_moved``: the DICOM follow-up study is written as a real one is acquired, on a
    frame of reference of its own with the head moved by :func:`follow_up_motion` (the same
    voxels on a rotated and shifted grid); the table gets ``follow_up_rotation_deg`` and
    ``follow_up_shift_mm``. The NIfTI files stay on the pre-treatment grid (registered).

    ``rt_planning_frame`` (``""``, ``"mr-study"`` or ``"planning-study"``): the DICOM RTSTRUCT
    and RTDOSE are on a planning frame of reference of their own, as a planning system exports
    them from the planning CT, with the Spatial Registration relating the MR to it
    (:mod:`inference.synthetic.planning_frame`), in the MR study or in a planning study of
    their own (``dicom/planning``); the table gets ``planning_rotation_deg``."""
    if rt_planning_frame not in PLANNING_CHOICES:
        raise InputError(
            f"rt_planning_frame: expected one of {list(PLANNING_CHOICES)}, found "
            f"{rt_planning_frame!r}"
        )
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise InputError(f"formats must be among {FORMATS}, found {sorted(unknown)}")
    if formats and out_dir is None:
        raise InputError("an output folder is needed to write files")
    _check_draws(outcome_draws, formats)
    rng = patient_rng(seed, index)
    site = cohort_sites(seed, n_sites)[index % n_sites]
    pid = patient_id(seed, index)

    # --- biology --------------------------------------------------------------------------
    bio = simulate_pre_treatment(rng, spacing_mm, mass_effect)
    cov = bio.covariates
    tparams = treatment.TreatmentParams.random(rng, cov.mgmt_methylated, cov.extent_of_resection)
    post = treatment.treat(bio.anatomy, bio.pre, bio.solver, bio.growth, tparams, bio.plan.dose,
                           spacing_mm, rng)  # fmt: skip
    os_noise = float(rng.normal())

    # --- identity and dates ----------------------------------------------------------------
    study_day = datetime.date(2019, 1, 7) + datetime.timedelta(days=int(rng.integers(0, 5 * 365)))
    pre_time = datetime.datetime.combine(study_day, datetime.time(8, 0)) + datetime.timedelta(
        minutes=int(rng.integers(0, 9 * 60))
    )
    post_minutes = int(rng.integers(-120, 120))
    birth = study_day - datetime.timedelta(days=int(cov.age * 365.25 + rng.integers(0, 365)))
    name = _person(rng, cov.sex)
    referring = _person(rng, "F" if rng.random() < 0.5 else "M")
    acq = scanner.acquisition_grid(bio.anatomy.grid, site)

    draws = [_Draw(0, cov, tparams, post, os_noise, post_minutes)]
    for k in range(1, outcome_draws):
        r = np.random.default_rng(np.random.SeedSequence([seed, index, OUTCOME_STREAM, k]))
        fresh = outcome.Covariates.random(r)
        cov_k = replace(cov, mgmt_methylated=fresh.mgmt_methylated,
                        extent_of_resection=fresh.extent_of_resection)  # fmt: skip
        tp_k = treatment.TreatmentParams.random(r, cov_k.mgmt_methylated,
                                                cov_k.extent_of_resection)  # fmt: skip
        post_k = treatment.treat(bio.anatomy, bio.pre, bio.solver, bio.growth, tp_k,
                                 bio.plan.dose, spacing_mm, r)  # fmt: skip
        draws.append(_Draw(k, cov_k, tp_k, post_k, float(r.normal()), int(r.integers(-120, 120))))

    records = []
    post_times = []
    for d in draws:
        post_time = pre_time + datetime.timedelta(days=d.post.days_after_pre, minutes=d.minutes)
        post_times.append(post_time)
        record = _table_row(outcome_twin_id(pid, d.index), site, bio, d, spacing_mm,
                            survival_cutoffs, acq, pre_time, post_time)  # fmt: skip
        if outcome_draws > 1:
            record.update(outcome_draw=d.index, outcome_of=pid)
        records.append(record)
    if not formats:
        return [PatientRecord(r) for r in records]

    # --- images ------------------------------------------------------------------------------
    assert out_dir is not None
    anat, pre, rt_plan = bio.anatomy, bio.pre, bio.plan
    sim = anat.grid
    brain_acq = scanner.to_acquisition(anat.brain.astype(np.float32), sim, acq) > 0.5
    pre_masks = {"enhancing": pre.enhancing, "necrotic": pre.necrotic, "oedema": pre.oedema}

    def render(masks: dict[str, Any], prefix: str, r: np.random.Generator) -> dict[str, Any]:
        fractions = _fractions(anat, bio.tissue, masks)
        out = {}
        for contrast in scanner.CONTRASTS:
            clean = scanner.synthesise(site, contrast, fractions)
            clean = scanner.inplane_resolution(clean, spacing_mm, site)
            clean = scanner.to_acquisition(clean, sim, acq)
            wm_signal = scanner.compartment_signal(site, contrast, "wm")
            out[f"{prefix}_{contrast}"] = scanner.acquire(clean, site, wm_signal, brain_acq, r)
        return out

    def nearest(mask: npt.NDArray[Any]) -> npt.NDArray[Any]:
        resampled = scanner.to_acquisition(mask.astype(np.float32), sim, acq, blur=False, order=0)
        return np.rint(resampled).astype(mask.dtype)

    # draw 0's post-treatment noise follows its pre-treatment noise in one stream, as the
    # cohort has always been made; each twin's comes from a stream of its own
    img_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
    pre_images = render(pre_masks, "pre", img_rng)
    pre_labels = nearest(_label_map(pre_masks, sim.shape))
    rois = {
        name: nearest(getattr(rt_plan, name).astype(np.uint8)).astype(bool)
        for name in ("gtv", "ctv", "ptv")
    }
    dose_acq = scanner.to_acquisition(rt_plan.dose, sim, acq, blur=False)
    density_pre = scanner.to_acquisition(pre.density, sim, acq, blur=False)
    for d, record, post_time in zip(draws, records, post_times, strict=True):
        p = d.post
        post_masks = {
            "enhancing": p.tumour.enhancing,
            "necrotic": p.tumour.necrotic,
            "oedema": p.tumour.oedema | p.psp_oedema,
            "cavity": p.cavity,
            "psp": p.pseudo_progression,
        }
        r = (
            img_rng
            if d.index == 0
            else np.random.default_rng(np.random.SeedSequence([seed, index, 7, d.index]))
        )
        images = {**pre_images, **render(post_masks, "post", r)}
        labels = {
            "pre_labels": pre_labels,
            "post_labels": nearest(_label_map(post_masks, sim.shape)),
        }
        density = {
            "density_pre": density_pre,
            "density_post": scanner.to_acquisition(p.tumour.density, sim, acq, blur=False),
        }
        pdir = out_dir / record["patient_id"]
        if "nifti" in formats:
            ndir = pdir / "nifti"
            for key, arr in {**images, **labels}.items():
                _write_nifti(ndir / f"{key}.nii.gz", arr, acq)
            for key, m in rois.items():
                _write_nifti(ndir / f"{key}.nii.gz", m.astype(np.uint8), acq)
            _write_nifti(ndir / "dose.nii.gz", dose_acq.astype(np.float32), acq)
            for key, arr in density.items():
                _write_nifti(ndir / f"{key}.nii.gz", arr.astype(np.float32), acq)
        if "dicom" in formats:
            motion = follow_up_motion(seed, index, acq) if follow_up_moved else None
            _write_dicom(pdir / "dicom", seed, index, pid, site, cov, name, referring, birth,
                         pre_time, post_time, acq, images, labels,
                         rois, dose_acq, motion)  # fmt: skip
            if motion is not None:
                record["follow_up_rotation_deg"] = round(motion.rotation_deg, 3)
                record["follow_up_shift_mm"] = round(motion.shift_mm(grid_centre(acq)), 3)
            if rt_planning_frame:
                own = pdir / "dicom" / "planning" if rt_planning_frame == "planning-study" else None
                frame = to_planning_frame(pdir / "dicom" / "pre", seed, index, own)
                record["planning_rotation_deg"] = round(rotation_deg(frame.matrix), 3)
        record["folder"] = record["patient_id"]
    return [PatientRecord(r) for r in records]


def _check_draws(outcome_draws: int, formats: Sequence[str]) -> None:
    if outcome_draws < 1:
        raise InputError(f"outcome draws must be >= 1, found {outcome_draws}")
    if outcome_draws > 1 and "dicom" in formats:
        raise InputError(
            f"outcome draws: expected formats nifti or none with {outcome_draws} draws per "
            f"patient, found {','.join(formats)} (a twin's pre-treatment DICOM study would be "
            "the patient's own study under another PatientID)"
        )


@dataclass(frozen=True)
class _Draw:
    """One outcome of a patient: covariates as drawn for it, treatment, follow-up state."""

    index: int
    covariates: outcome.Covariates
    params: treatment.TreatmentParams
    post: treatment.PostState
    os_noise: float
    minutes: int


def _table_row(
    pid: str,
    site: scanner.SiteProfile,
    bio: PreTreatment,
    draw: _Draw,
    spacing_mm: float,
    survival_cutoffs: tuple[float, float],
    acq: Volume,
    pre_time: datetime.datetime,
    post_time: datetime.datetime,
) -> dict[str, Any]:
    cov, pre, post, tparams, rt_plan = draw.covariates, bio.pre, draw.post, draw.params, bio.plan
    voxel_ml = spacing_mm**3 / 1000.0
    pre_enh = float(pre.enhancing.sum() * voxel_ml)
    post_enh_tumour = float(post.tumour.enhancing.sum() * voxel_ml)
    post_enh_seen = seen_enhancing_ml(post, spacing_mm)
    burden_post = float(post.tumour.density.sum() * voxel_ml)
    os_months = outcome.survival_months(cov, burden_post, draw.os_noise)
    dose_m = treatment.dose_metrics(rt_plan.dose, rt_plan.ptv)
    return {
        "patient_id": pid,
        "site": site.site,
        "institution": site.institution,
        "manufacturer": site.manufacturer,
        "field_strength_t": site.field_t,
        "sex": cov.sex,
        "age": cov.age,
        "kps": cov.kps,
        "mgmt": "methylated" if cov.mgmt_methylated else "unmethylated",
        "extent_of_resection": cov.extent_of_resection,
        "pre_enhancing_ml": round(pre_enh, 3),
        "pre_necrotic_ml": round(float(pre.necrotic.sum() * voxel_ml), 3),
        "pre_core_ml": round(float(pre.core.sum() * voxel_ml), 3),
        "pre_oedema_ml": round(float(pre.oedema.sum() * voxel_ml), 3),
        "post_enhancing_ml": round(post_enh_seen, 3),
        "post_enhancing_tumour_ml": round(post_enh_tumour, 3),
        "post_necrotic_ml": round(float(post.tumour.necrotic.sum() * voxel_ml), 3),
        "post_oedema_ml": round(float((post.tumour.oedema | post.psp_oedema).sum() * voxel_ml), 3),
        "post_cavity_ml": round(float(post.cavity.sum() * voxel_ml), 3),
        "pseudo_progression_ml": round(float(post.pseudo_progression.sum() * voxel_ml), 3),
        "pseudo_progression": int(tparams.pseudo_progression),
        "burden_pre_ml": round(float(pre.density.sum() * voxel_ml), 3),
        "burden_post_ml": round(burden_post, 3),
        "gtv_ml": round(float(rt_plan.gtv.sum() * voxel_ml), 3),
        "ctv_ml": round(float(rt_plan.ctv.sum() * voxel_ml), 3),
        "ptv_ml": round(float(rt_plan.ptv.sum() * voxel_ml), 3),
        "ptv_d95_gy": round(dose_m["ptv_d95_gy"], 2),
        "ptv_d50_gy": round(dose_m["ptv_d50_gy"], 2),
        "dose_max_gy": round(dose_m["dose_max_gy"], 2),
        "d_white_mm2_per_day": round(bio.growth.d_white, 4),
        "rho_per_day": round(bio.growth.rho, 4),
        "alpha_per_gy": round(tparams.alpha, 4),
        "tmz_kill_per_day": round(tparams.tmz_kill, 4),
        "growth_days": bio.growth_days,
        "follow_up_days_after_rt": tparams.follow_up_days,
        "days_pre_to_post": post.days_after_pre,
        "response_category": outcome.response_category(pre_enh, post_enh_seen),
        "response_category_tumour_only": outcome.response_category(pre_enh, post_enh_tumour),
        "survival_months": round(os_months, 2),
        "survival_class": outcome.survival_class(os_months, survival_cutoffs),
        "spacing_mm": spacing_mm,
        "grid_spacing_mm": "x".join(f"{s:g}" for s in acq.spacing),
        "grid_shape": "x".join(str(n) for n in acq.shape[::-1]),
        "study_date_pre": pre_time.strftime("%Y-%m-%d"),
        "study_date_post": post_time.strftime("%Y-%m-%d"),
    }


def follow_up_motion(seed: int, index: int, grid: Volume) -> RigidTransform:
    """How patient ``index``'s head lies at the follow-up session, in the follow-up study's own
    frame: a point at ``p`` in the pre-treatment frame is at ``rotation @ p + translation``.
    A rotation of 3 to 10 degrees about a random axis through the centre of ``grid`` and a shift
    of up to 10 mm along each axis, drawn from the patient's own stream ``[seed, index,
    MOTION_STREAM]`` (the rest of the patient does not change)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, MOTION_STREAM]))
    rotation = random_rotation(rng, 3.0, 10.0)
    shift = rng.uniform(-10.0, 10.0, size=3)
    centre = grid_centre(grid)
    return RigidTransform(
        rotation=rotation,
        translation=centre - rotation @ centre + shift,
        frame_of_reference_uid=dx.derived_uid(seed, index, "frame-of-reference", "follow-up"),
    )


def _write_dicom(
    folder: Path,
    seed: int,
    index: int,
    pid: str,
    site: scanner.SiteProfile,
    cov: outcome.Covariates,
    name: str,
    referring: str,
    birth: datetime.date,
    pre_time: datetime.datetime,
    post_time: datetime.datetime,
    acq: Volume,
    images: dict[str, npt.NDArray[np.uint16]],
    labels: dict[str, npt.NDArray[Any]],
    rois: dict[str, npt.NDArray[np.bool_]],
    dose: npt.NDArray[np.float32],
    motion: RigidTransform | None = None,
) -> None:
    """The patient's DICOM studies; with ``motion``, the follow-up study is on a frame of
    reference of its own, its grid placed by ``motion`` (the pre-treatment grid moved)."""
    from sr_writer.rtstruct import RoiMask, build_rtstruct

    for_uid = dx.derived_uid(seed, index, "frame-of-reference")
    phase_for = {"pre": for_uid, "post": for_uid}
    phase_grid = {"pre": acq, "post": acq}
    if motion is not None:
        phase_for["post"] = dx.derived_uid(seed, index, "frame-of-reference", "follow-up")
        phase_grid["post"] = motion.place(acq)
    # PatientAge at each study, from the dates (the follow-up's used to be the pre-treatment
    # age, which disagreed with its birth and study dates about half the time)
    ages = {"pre": _dicom_age(birth, pre_time), "post": _dicom_age(birth, post_time)}
    studies = {}
    for phase, when in (("pre", pre_time), ("post", post_time)):
        studies[phase] = PatientStudy(
            study_instance_uid=dx.derived_uid(seed, index, phase, "study"),
            patient_name=name,
            patient_id=pid,
            patient_birth_date=birth.strftime("%Y%m%d"),
            patient_sex=cov.sex,
            study_date=when.strftime("%Y%m%d"),
            study_time=when.strftime("%H%M%S"),
            study_id="1" if phase == "pre" else "2",
            # the whole seed (as in the patient ID): with its last three digits only, cohorts
            # whose seeds differ by 1000 gave different studies the same accession number
            accession_number=f"A{seed % 100000:05d}{index:05d}{1 if phase == 'pre' else 2}",
            referring_physician_name=referring,
            extra={"StudyDescription": site.study_description},
        )
    refs = {}
    for phase in ("pre", "post"):
        for n, contrast in enumerate(scanner.CONTRASTS):
            when = (pre_time if phase == "pre" else post_time) + datetime.timedelta(minutes=4 * n)
            info = dx.SeriesInfo(
                contrast=contrast,
                description=site.descriptions[contrast],
                number=n + 2,
                series_uid=dx.derived_uid(seed, index, phase, contrast, "series"),
                acquisition_time=when,
            )
            refs[(phase, contrast)] = dx.write_mr_series(
                folder / phase / f"{info.number:03d}_{contrast}",
                images[f"{phase}_{contrast}"],
                phase_grid[phase],
                studies[phase],
                site,
                info,
                phase_for[phase],
                ages[phase],
            )
    ref = refs[("pre", "t1c")]
    grid = Volume(
        array=np.zeros(acq.shape, dtype=bool),
        spacing=acq.spacing,
        origin=acq.origin,
        direction=acq.direction,
        frame_of_reference_uid=for_uid,
        source_instance_uids=ref.sop_instance_uids,
        series_instance_uid=ref.series_instance_uid,
    )
    for n, (phase, when) in enumerate((("pre", pre_time), ("post", post_time))):
        t1c_ref = refs[(phase, "t1c")]
        dx.write_reader_segmentation(
            folder / "reader" / phase / "seg.dcm",
            labels[f"{phase}_labels"],
            dx.READER_SEGMENTS[phase],
            replace(
                grid,
                origin=phase_grid[phase].origin,
                direction=phase_grid[phase].direction,
                frame_of_reference_uid=phase_for[phase],
                source_instance_uids=t1c_ref.sop_instance_uids,
            ),
            t1c_ref,
            studies[phase],
            series_uid=dx.derived_uid(seed, index, phase, "seg", "series"),
            sop_uid=dx.derived_uid(seed, index, phase, "seg", "instance"),
            series_number=160 + n,
            description=f"SEG reader outline {'pre-treatment' if phase == 'pre' else 'follow-up'}",
            when=when + datetime.timedelta(hours=2),
        )
    colours = {"gtv": (255, 0, 0), "ctv": (255, 165, 0), "ptv": (0, 128, 255)}
    roi_masks = [
        RoiMask(key.upper(), grid.with_array(rois[key]), colours[key], key.upper())
        for key in ("gtv", "ctv", "ptv")
    ]
    plan_time = pre_time + datetime.timedelta(days=14)
    rs = build_rtstruct(
        rois=roi_masks,
        reference_grid=grid,
        reference_series=ref,
        patient=studies["pre"],
        series_instance_uid=dx.derived_uid(seed, index, "rtstruct", "series"),
        sop_instance_uid=dx.derived_uid(seed, index, "rtstruct", "instance"),
        series_description="RTSTRUCT GTV CTV PTV",
        series_number=150,
        structure_set_label="GBM_60Gy",
        manufacturer="glioforecast",
        software_versions="glioforecast synth",
        content_datetime=plan_time,
        manufacturer_model_name="synthetic contouring",
        roi_generation_algorithm="MANUAL",
    )
    rs_dir = folder / "pre" / "RTSTRUCT"
    rs_dir.mkdir(parents=True, exist_ok=True)
    rs.save_as(rs_dir / "rtstruct.dcm", enforce_file_format=True)
    dx.write_rtdose(
        folder / "pre" / "RTDOSE" / "rtdose.dcm",
        dose,
        acq,
        studies["pre"],
        site,
        series_uid=dx.derived_uid(seed, index, "rtdose", "series"),
        sop_uid=dx.derived_uid(seed, index, "rtdose", "instance"),
        plan_uid=dx.derived_uid(seed, index, "rtplan", "instance"),
        frame_of_reference_uid=for_uid,
        when=plan_time,
    )


def _worker(
    args: tuple[
        int,
        int,
        str | None,
        int,
        float,
        tuple[str, ...],
        tuple[float, float],
        bool,
        int,
        bool,
        str,
    ],
) -> list[PatientRecord]:
    index, seed, out, n_sites, spacing, formats, cutoffs, mass, draws, moved, planning = args
    return generate_patient_draws(
        index, seed, Path(out) if out else None, n_sites, spacing, formats, cutoffs, mass, draws,
        follow_up_moved=moved, rt_planning_frame=planning,
    )  # fmt: skip


def generate_cohort(
    out_dir: Path,
    patients: int,
    sites: int,
    seed: int,
    spacing_mm: float = 2.0,
    formats: Sequence[str] = FORMATS,
    jobs: int = 1,
    survival_cutoffs: tuple[float, float] = outcome.DEFAULT_SURVIVAL_CUTOFFS_MONTHS,
    progress: Callable[[Iterable[list[PatientRecord]], int], Iterable[list[PatientRecord]]]
    | None = None,
    mass_effect: bool = True,
    outcome_draws: int = 1,
    follow_up_moved: bool = False,
    rt_planning_frame: str = "",
) -> list[PatientRecord]:
    """Generate ``patients`` patients over ``sites`` sites; writes cohort.csv and sites.csv.

    ``jobs`` > 1 spreads patients over that many processes (results are identical).
    ``progress`` wraps the iterator of finished patients (e.g. a tqdm bar).
    ``outcome_draws`` > 1 adds each patient's outcome twins (:func:`generate_patient_draws`)
    after it in the table, with the columns ``outcome_draw`` and ``outcome_of``.
    ``follow_up_moved``: DICOM follow-ups on their own frame of reference, the head moved;
    ``rt_planning_frame``: DICOM RTSTRUCT and RTDOSE on a planning frame with a Spatial
    Registration (both: :func:`generate_patient_draws`).
    """
    if patients < 1:
        raise InputError(f"the number of patients must be >= 1, found {patients}")
    if sites < 1:
        raise InputError(f"the number of sites must be >= 1, found {sites}")
    if jobs < 1:
        raise InputError(f"jobs must be >= 1, found {jobs}")
    _check_draws(outcome_draws, formats)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = [
        (
            i,
            seed,
            str(out_dir),
            sites,
            spacing_mm,
            tuple(formats),
            survival_cutoffs,
            mass_effect,
            outcome_draws,
            follow_up_moved,
            rt_planning_frame,
        )
        for i in range(patients)
    ]
    wrap = progress or (lambda it, total: it)
    per_patient: list[list[PatientRecord]]
    if jobs == 1:
        per_patient = list(wrap((_worker(w) for w in work), patients))
    else:
        workers = min(jobs, patients, os.cpu_count() or 1) if jobs > 0 else 1
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            per_patient = list(wrap(pool.map(_worker, work), patients))
    records = [r for group in per_patient for r in group]
    write_table(out_dir / "cohort.csv", records)
    write_sites(out_dir / "sites.csv", cohort_sites(seed, sites))
    logger.info("generated %d patients in %s", len(records), out_dir)
    return records


def dicom_study_dir(out_dir: Path, patient_id: str, phase: str = "pre") -> Path:
    """Folder of a patient's pre-treatment (or ``post``) DICOM study, as the node receives it."""
    if phase not in ("pre", "post"):
        raise InputError(f"phase must be 'pre' or 'post', found {phase!r}")
    return out_dir / patient_id / "dicom" / phase


def write_table(path: Path, records: Sequence[PatientRecord]) -> None:
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r.values if k not in keys)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow(r.values)


def write_sites(path: Path, profiles: Sequence[scanner.SiteProfile]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["site", "institution", "manufacturer", "model", "field_t", "slice_mm",
                         "snr", "bias", "t1c_description"])  # fmt: skip
        for p in profiles:
            writer.writerow([p.site, p.institution, p.manufacturer, p.model, p.field_t,
                             p.slice_mm, round(p.snr, 2), round(p.bias, 3),
                             p.descriptions["t1c"]])  # fmt: skip


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
