"""Evaluation of predictors on held-out synthetic patients, with the same code for every method.

Every method is a predictor of the node's protocol (``predict(StudyInputs) -> Prediction`` on the
source grid): the "no change" baseline (``inference.baseline``), a UNet baseline or a latent
diffusion model directory (``inference.model_predictor.ModelPredictor``). For each patient of the
cohort folder(s) the inputs are read from NIfTI, the prediction is compared on the source grid
with the truth:

- images: the truth (post-treatment T1-Gd) is z-scored inside its own head mask; the predicted
  mean is z-scored with the pre-treatment T1-Gd's scaling (the only one a predictor can know;
  each synthetic scan has its own gain, as a real one would). PSNR (data range: the truth's
  range in the head), SSIM (Gaussian window) and MAE, globally (the head mask of the pre-treatment
  T1-Gd) and in the tumour region (GTV and post-treatment necrosis / enhancement, dilated by
  ``margin_mm`` along each axis, counted in that axis's voxels: ``round(margin_mm / spacing)``,
  inside the head);
- tumour: Dice of the predicted mask against the post-treatment enhancing truth (labels 3 and 5,
  as a reader outlines it), predicted volume (mean over samples) minus the true volume (ml);
- response category: the truth is the cohort table's ``response_category``; sensitivity,
  specificity, AUC (one-vs-rest, from the predicted probabilities), balanced accuracy;
- uncertainty: Spearman correlation between each patient's spread (mean voxel-wise standard
  deviation in the tumour region, in the normalised units) and error (tumour-region MAE); and
  in volumes: the standard deviation of the samples' tumour volumes against the absolute
  volume error;
- survival-class discrimination: AUC of the predicted tumour volume for telling short-survival
  from long-survival patients (intermediate left out; a larger tumour should mean shorter
  survival);
- 95 % bootstrap intervals (patients resampled with replacement, seeded).

``guidance_check`` predicts every patient under two survival classes with the same seed and
reports the paired difference of predicted volumes (mean with interval, Wilcoxon signed-rank).

``stage1_bounds`` adds, for each latent diffusion model, two rows that bracket its stage 2
(:class:`Stage1Bound`): the true post-treatment scan through the model's autoencoder (the best
a stage-2 sample can decode to: what the latent keeps) and the pre-treatment scan through it
("no change" as the decoder renders it). A model near the second row has learnt little of the
change; the first row caps what more stage-2 training can give without a better stage 1.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage, stats
from tqdm import tqdm

from dicom_node.convert.preprocess import foreground_mask_array, normalise_intensity
from dicom_node.errors import InferenceError, InputError
from dicom_node.types import RESPONSE_CATEGORIES, Prediction, StudyInputs
from inference import metrics as M
from inference.data import (
    CohortPatient,
    PatientTruth,
    cohort_seed_of,
    load_truth,
    patient_inputs,
    read_cohort,
)

if TYPE_CHECKING:
    from inference.model_predictor import ModelPredictor

log = logging.getLogger(__name__)

IMAGE_METRICS = (
    "psnr_global",
    "ssim_global",
    "mae_global",
    "psnr_tumour",
    "ssim_tumour",
    "mae_tumour",
)
TUMOUR_METRICS = ("dice", "volume_error_ml", "abs_volume_error_ml")
METRIC_KEYS = IMAGE_METRICS + TUMOUR_METRICS
NO_CHANGE = "no-change"
#: survival classes compared by the survival discrimination (cohort table names)
SHORT, LONG = "short", "long"


class Predictor(Protocol):
    name: str
    version: str

    def predict(self, inputs: StudyInputs, samples: int = 4) -> Prediction: ...


class Stage1Bound:
    """A latent diffusion model's autoencoder alone, scored like a method (see the module
    docstring): ``source`` ``truth`` reconstructs each patient's true post-treatment scan,
    ``pre`` the pre-treatment T1-Gd."""

    SOURCES = ("truth", "pre")

    def __init__(self, predictor: ModelPredictor, source: str) -> None:
        if source not in self.SOURCES:
            raise InferenceError(f"stage-1 bound: expected truth or pre, found {source!r}")
        self.predictor, self.source = predictor, source
        self.name, self.version = predictor.name, predictor.version

    @property
    def label(self) -> str:
        scan = "true post-treatment" if self.source == "truth" else "pre-treatment"
        return f"{self.name} {self.version} autoencoder on the {scan} scan"

    def predict_patient(self, patient: EvaluationPatient) -> Prediction:
        image = patient.truth.post_t1c if self.source == "truth" else None
        return self.predictor.reconstruct(patient.inputs, image)


@dataclass(frozen=True)
class PatientResult:
    patient_id: str
    site: str
    truth_category: str
    survival_class: str
    predicted_category: str
    probabilities: dict[str, float]
    truth_volume_ml: float
    predicted_volume_ml: float
    current_volume_ml: float
    metrics: dict[str, float]
    spread: float
    seconds: float
    sample_volumes_ml: tuple[float, ...] = ()


@dataclass(frozen=True)
class EvaluationPatient:
    patient: CohortPatient
    inputs: StudyInputs
    truth: PatientTruth


def load_patients(patients: Sequence[CohortPatient]) -> list[EvaluationPatient]:
    out = []
    for p in patients:
        inputs = patient_inputs(p)
        out.append(EvaluationPatient(p, inputs, load_truth(p, inputs)))
    return out


def margin_structure(spacing: Sequence[float], margin_mm: float) -> npt.NDArray[np.bool_]:
    """The dilation element of a margin of ``margin_mm`` on a grid of ``spacing`` (mm, i j k
    order; the array is k j i): ``round(margin_mm / spacing)`` voxels along each axis, and the
    offsets ``d`` with ``sum(|d_axis| / steps_axis) <= 1`` between them (an octahedron, the
    shape of repeated 6-connected dilations). On an isotropic grid it is exactly ``steps``
    6-connected dilations, the former rule; on an anisotropic one each axis gets its own
    count in millimetres (a 5 mm slice axis is no longer dilated in steps of the in-plane
    spacing). An axis of no step is not dilated."""
    steps = [round(margin_mm / s) if margin_mm > 0 else 0 for s in reversed(tuple(spacing))]
    grids = np.indices([2 * n + 1 for n in steps]).astype(np.float64)
    total = np.zeros(grids.shape[1:])
    for axis, n in enumerate(steps):
        offset = np.abs(grids[axis] - n)
        total += offset / n if n > 0 else np.where(offset > 0, np.inf, 0.0)
    return np.asarray(total <= 1.0 + 1e-9)


def tumour_region(
    truth: PatientTruth, head: npt.NDArray[np.bool_], margin_mm: float
) -> npt.NDArray[np.bool_]:
    """The evaluation's tumour region: the truth's region dilated by ``margin_mm`` along each
    axis in that axis's spacing (:func:`margin_structure`), inside the head."""
    region = np.asarray(truth.tumour_region.array, dtype=bool)
    element = margin_structure(truth.tumour_region.spacing, margin_mm)
    if element.size > 1 and region.any():
        region = ndimage.binary_dilation(region, structure=element)
    return region & head


def patient_metrics(
    prediction: Prediction, inputs: StudyInputs, truth: PatientTruth, margin_mm: float = 4.0
) -> tuple[dict[str, float], float]:
    """The metrics of one prediction (see the module docstring) and the patient's spread."""
    if prediction.mean.shape != inputs.t1c.shape:
        raise InferenceError(
            f"prediction: expected the source T1-Gd shape {inputs.t1c.shape}, "
            f"found {prediction.mean.shape}"
        )
    pre = np.asarray(inputs.t1c.array, dtype=np.float32)
    head = foreground_mask_array(pre)
    _, pre_scaling = normalise_intensity(pre, head)
    post = np.asarray(truth.post_t1c.array, dtype=np.float32)
    truth_n, _ = normalise_intensity(post, foreground_mask_array(post))
    pred_n = pre_scaling.apply(prediction.mean.array)
    region = tumour_region(truth, head, margin_mm)
    data_range = float(truth_n[head].max() - truth_n[head].min()) if head.any() else 1.0
    ssim_full = M.ssim_map(pred_n, truth_n, data_range)
    out = {
        "psnr_global": M.psnr(pred_n, truth_n, data_range, head),
        "ssim_global": float(ssim_full[head].mean()) if head.any() else math.nan,
        "mae_global": M.mae(pred_n, truth_n, head),
        "psnr_tumour": M.psnr(pred_n, truth_n, data_range, region),
        "ssim_tumour": float(ssim_full[region].mean()) if region.any() else math.nan,
        "mae_tumour": M.mae(pred_n, truth_n, region),
    }
    true_mask = np.asarray(truth.post_enhancing.array, dtype=bool)
    true_ml = M.volume_ml(true_mask, truth.post_enhancing.spacing)
    out["dice"] = M.dice(prediction.tumour_mask.array, true_mask)
    out["volume_error_ml"] = prediction.predicted_volume_ml - true_ml
    out["abs_volume_error_ml"] = abs(out["volume_error_ml"])
    std_n = np.asarray(prediction.std.array, dtype=np.float64) / pre_scaling.scale
    spread = float(std_n[region].mean()) if region.any() else math.nan
    return out, spread


def draws_samples(predictor: Predictor | Stage1Bound) -> bool:
    """Whether the samples of ``predictor`` can differ: not those of "no change", a UNet
    baseline or a stage-1 bound, which give one image however many samples are asked for (a
    standard deviation of zero by construction, not a measured spread)."""
    from inference.baseline import NoChangeBaseline
    from inference.model_dir import KIND_LDM

    if isinstance(predictor, NoChangeBaseline | Stage1Bound):
        return False
    return getattr(predictor, "kind", KIND_LDM) == KIND_LDM


def evaluate_predictor(
    predictor: Predictor | Stage1Bound,
    patients: Sequence[EvaluationPatient],
    *,
    samples: int = 4,
    survival_class: str = "none",
    margin_mm: float = 4.0,
    progress: bool = False,
) -> list[PatientResult]:
    """Run ``predictor`` on every patient and measure it. ``survival_class``: ``none`` (the
    node's default: unguided) or ``truth`` (the patient's own class from the table). The spread
    is ``nan`` (undefined) for one sample and for a predictor that does not draw samples
    (:func:`draws_samples`)."""
    if survival_class not in ("none", "truth"):
        raise InferenceError(f"survival_class: expected none or truth, found {survival_class!r}")
    draws = draws_samples(predictor)
    results = []
    for ep in tqdm(patients, desc=predictor.name, unit="patient", disable=not progress):
        cls = ep.patient.survival_class if survival_class == "truth" else None
        started = time.monotonic()
        if isinstance(predictor, Stage1Bound):
            pred = predictor.predict_patient(ep)
        else:
            pred = predictor.predict(replace(ep.inputs, survival_class=cls), samples=samples)
        seconds = time.monotonic() - started
        values, spread = patient_metrics(pred, ep.inputs, ep.truth, margin_mm)
        if not draws or len(pred.sample_volumes_ml) < 2:  # no spread to measure (not zero)
            spread = math.nan
        true_ml = M.volume_ml(ep.truth.post_enhancing.array, ep.truth.post_enhancing.spacing)
        results.append(
            PatientResult(
                patient_id=ep.patient.patient_id,
                site=ep.patient.site,
                truth_category=ep.patient.response_category,
                survival_class=ep.patient.survival_class,
                predicted_category=pred.response_category,
                probabilities={
                    c: float(pred.response_probabilities.get(c, 0.0)) for c in RESPONSE_CATEGORIES
                },
                truth_volume_ml=true_ml,
                predicted_volume_ml=pred.predicted_volume_ml,
                current_volume_ml=pred.current_volume_ml,
                metrics=values,
                spread=spread,
                seconds=seconds,
                sample_volumes_ml=tuple(float(v) for v in pred.sample_volumes_ml),
            )
        )
    return results


RESPONDING = ("complete_response", "partial_response")


def site_labels(results: Sequence[PatientResult]) -> npt.NDArray[np.str_]:
    """A site of one cohort per patient (``SITE/seed``): synthetic cohorts draw their own scanner
    profile for each site name."""
    return np.array([f"{r.site}/{cohort_seed_of(r.patient_id)}" for r in results])


def _uncertainty_arrays(
    results: Sequence[PatientResult],
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per patient: the site (of one cohort), the spread (nan when none) and the tumour MAE, the
    error the acceptance check ranks."""
    spread = np.array([math.nan if r.spread is None else r.spread for r in results], dtype=float)
    error = np.array([r.metrics["mae_tumour"] for r in results], dtype=float)
    return site_labels(results), spread, error


def uncertainty_by_site(results: Sequence[PatientResult]) -> list[dict[str, Any]]:
    """Per site (of one cohort): the uncertainty statistic and what it depends on. The spread
    can only rank the errors if it follows the tumour that is there; these rows say whether it
    follows the predicted or the true volume, and how many of the site's tumours respond."""
    site, spread, error = _uncertainty_arrays(results)
    truth = np.array([r.truth_volume_ml for r in results], dtype=float)
    predicted = np.array([r.predicted_volume_ml for r in results], dtype=float)
    responding = np.array([r.truth_category in RESPONDING for r in results])
    rows = []
    for s in sorted(set(site)):
        k = site == s
        rows.append(
            {
                "site": s,
                "patients": int(k.sum()),
                "responding_share": float(responding[k].mean()),
                "mean_truth_volume_ml": float(truth[k].mean()),
                "mean_predicted_volume_ml": float(predicted[k].mean()),
                "spread_error_spearman": M.spearman(spread[k], error[k]),
                "spread_predicted_volume_spearman": M.spearman(spread[k], predicted[k]),
                "spread_truth_volume_spearman": M.spearman(spread[k], truth[k]),
            }
        )
    return rows


def summarise(
    results: Sequence[PatientResult], *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Means with bootstrap intervals, response-category metrics, uncertainty correlation."""
    n = len(results)
    kw: dict[str, Any] = {"n_resamples": n_resamples, "seed": seed}
    summary: dict[str, Any] = {"patients": n}
    for key in METRIC_KEYS:
        summary[key] = M.mean_ci([r.metrics[key] for r in results], **kw).as_dict()
    # Dice is 1 when neither mask has a voxel: a model that predicts no tumour scores 1 on every
    # complete response. Over the patients with a tumour left, it is the overlap alone
    left = [r.metrics["dice"] for r in results if r.truth_volume_ml > 0]
    summary["patients_tumour_left"] = len(left)
    summary["dice_tumour_left"] = M.mean_ci(left, **kw).as_dict()
    truth = [r.truth_category for r in results]
    pred = [r.predicted_category for r in results]
    probs = [r.probabilities for r in results]

    def cat(idx: npt.NDArray[np.intp], get: Callable[[M.CategoryMetrics], float]) -> float:
        return get(
            M.category_metrics(
                [truth[i] for i in idx],
                [pred[i] for i in idx],
                [probs[i] for i in idx],
                RESPONSE_CATEGORIES,
            )
        )

    summary["response_balanced_accuracy"] = M.bootstrap_ci(
        lambda i: cat(i, lambda m: m.balanced_accuracy), n, **kw
    ).as_dict()
    summary["response_accuracy"] = M.bootstrap_ci(
        lambda i: cat(i, lambda m: m.accuracy), n, **kw
    ).as_dict()
    summary["response_macro_auc"] = M.bootstrap_ci(
        lambda i: cat(i, lambda m: m.macro_auc), n, **kw
    ).as_dict()
    per_category: dict[str, Any] = {}

    def per(c: str, key: str) -> dict[str, Any]:
        return M.bootstrap_ci(lambda i: cat(i, lambda m: getattr(m, key)[c]), n, **kw).as_dict()

    for c in RESPONSE_CATEGORIES:
        per_category[c] = {
            "truth_count": truth.count(c),
            "sensitivity": per(c, "sensitivity"),
            "specificity": per(c, "specificity"),
            "auc": per(c, "auc"),
        }
    summary["response_per_category"] = per_category
    site, spread, error = _uncertainty_arrays(results)
    summary["spread_error_spearman"] = M.bootstrap_ci(
        lambda i: M.spearman(spread[i], error[i]), n, **kw
    ).as_dict()

    # within sites: a pooled correlation can come from one site having both the larger errors
    # and the larger spreads (the model card's third and eighth rounds)
    def within_sites(idx: npt.NDArray[np.intp]) -> float:
        values = [M.spearman(spread[idx][site[idx] == s], error[idx][site[idx] == s])
                  for s in sorted(set(site[idx]))]  # fmt: skip
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    if len(set(site)) > 1:
        summary["spread_error_spearman_within_sites"] = M.bootstrap_ci(
            within_sites, n, **kw
        ).as_dict()
    summary["uncertainty_by_site"] = uncertainty_by_site(results)
    summary["spread_mean"] = M.bootstrap_ci(lambda i: float(np.mean(spread[i])), n, **kw).as_dict()
    # the same question in volumes: do patients whose samples disagree on the tumour volume have
    # the larger volume errors? (a stand-in that a simulation of the truth can also answer, see
    # bench.uncertainty_reference)
    volume_spread = np.array(
        [
            np.std(r.sample_volumes_ml) if len(r.sample_volumes_ml) > 1 else math.nan
            for r in results
        ],
        dtype=float,
    )
    volume_error = np.array([r.metrics["abs_volume_error_ml"] for r in results], dtype=float)
    summary["volume_spread_error_spearman"] = M.bootstrap_ci(
        lambda i: M.spearman(volume_spread[i], volume_error[i]), n, **kw
    ).as_dict()
    # survival-class discrimination: does a larger predicted tumour go with short survival?
    short = np.array([r.survival_class == SHORT for r in results])
    long_ = np.array([r.survival_class == LONG for r in results])
    volume = np.array([r.predicted_volume_ml for r in results], dtype=float)

    def survival_auc(idx: npt.NDArray[np.intp]) -> float:
        keep = idx[short[idx] | long_[idx]]
        return M.auc(short[keep], volume[keep])

    summary["survival_auc_short_vs_long"] = M.bootstrap_ci(survival_auc, n, **kw).as_dict()
    summary["seconds_per_patient"] = (
        float(np.mean([r.seconds for r in results])) if results else None
    )
    return summary


def guidance_check(
    predictor: Predictor,
    patients: Sequence[EvaluationPatient],
    classes: tuple[str, str] = ("short", "long"),
    *,
    samples: int = 4,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Paired predicted volumes under two survival classes (same seed); the expected direction
    is a larger tumour under the first (shorter survival) class."""
    a_ml, b_ml = [], []
    for ep in tqdm(patients, desc="guidance", unit="patient", disable=not progress):
        a = predictor.predict(replace(ep.inputs, survival_class=classes[0]), samples=samples)
        b = predictor.predict(replace(ep.inputs, survival_class=classes[1]), samples=samples)
        a_ml.append(a.predicted_volume_ml)
        b_ml.append(b.predicted_volume_ml)
    diff = np.asarray(a_ml) - np.asarray(b_ml)
    p_value: float | None = None
    if diff.size and np.any(diff != 0):
        p_value = float(stats.wilcoxon(diff).pvalue)
    return {
        "classes": list(classes),
        "expected": f"predicted volume under {classes[0]} > under {classes[1]}",
        "volumes_ml": {classes[0]: a_ml, classes[1]: b_ml},
        "mean_difference_ml": M.mean_ci(diff, n_resamples=n_resamples, seed=seed).as_dict(),
        "fraction_in_expected_direction": float(np.mean(diff > 0)) if diff.size else None,
        "wilcoxon_p": p_value,
    }


def training_overlap(model_dir: Path, patient_ids: Sequence[str]) -> int | None:
    """How many evaluated patients a model's checkpoints list as training patients (an outcome
    twin counts as the patient it was drawn from: it has the same pre-treatment scan)."""
    from inference.synthetic.cohort import outcome_base_id

    found: set[str] = set()
    seen = False
    for state in sorted((model_dir / "checkpoints").glob("*/state.json")):
        try:
            data = json.loads(state.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
        # (a federated run's checkpoint lists no patient: they never left their sites)
        if isinstance(data, dict) and "train_patients" in data:
            found |= set(data["train_patients"])
            seen = True
    trained = {outcome_base_id(p) for p in found}
    return len({outcome_base_id(p) for p in patient_ids} & trained) if seen else None


def federated_training_sites(model_dir: Path) -> list[str] | None:
    """The sites whose patients trained a federated model (``train_state.json``: each
    federated stage's ``sites``; a site that joined with several sites' folders is named
    ``A+B``), or None when no stage of the model was trained federated. A federation keeps no
    patient list: the patients never leave their sites."""
    from inference.train.loops import read_train_state

    stages = read_train_state(model_dir).get("stages", {})
    federated = [
        info for info in stages.values() if isinstance(info, dict) and info.get("federated")
    ]
    if not federated:
        return None
    return sorted({part for info in federated for site in info.get("sites", [])
                   for part in str(site).split("+")})  # fmt: skip


def overlap_with_training(model_dir: Path, patients: Sequence[CohortPatient]) -> dict[str, Any]:
    """How many evaluated patients trained the model: ``overlap_with_training`` (None when
    unknown) and ``overlap_basis``: ``patients`` (the checkpoints' training patients, see
    :func:`training_overlap`) or ``sites`` (a federated model: the evaluated patients of its
    training sites, which may all have trained it; ``training_sites`` names them)."""
    count = training_overlap(model_dir, [p.patient_id for p in patients])
    if count is not None:
        return {"overlap_with_training": count, "overlap_basis": "patients"}
    sites = federated_training_sites(model_dir)
    if sites is None:
        return {"overlap_with_training": None, "overlap_basis": None}
    return {
        "overlap_with_training": sum(p.site in sites for p in patients),
        "overlap_basis": "sites",
        "training_sites": sites,
    }


def _known_classes(model_dirs: Sequence[str | Path]) -> tuple[str, ...]:
    """The survival classes a cohort table may name: those of the presets and of each model
    evaluated (a model.yaml may define its own)."""
    from inference.data import DEFAULT_SURVIVAL_CLASSES
    from inference.model_dir import read_yaml_mapping

    classes = list(DEFAULT_SURVIVAL_CLASSES)
    for d in model_dirs:
        own = read_yaml_mapping(d).get("survival_classes")
        if isinstance(own, list):
            classes += [str(c) for c in own if str(c) not in classes]
    return tuple(classes)


def latent_only_options(
    models: Sequence[ModelPredictor],
    *,
    guidance: bool = False,
    stage1_bounds: bool = False,
    survival_class: str = "none",
) -> list[str]:
    """Refuse the options that only a latent diffusion model takes (survival guidance, an
    autoencoder to bound) when none of ``models`` is one: each would give no row and say
    nothing. With some, the warnings (logged, and in the report) name the models they skip
    ("no change" takes no survival class by its nature, and is not named)."""
    from inference.model_dir import KIND_LDM

    given = [
        (option, why)
        for option, why, on in (
            ("--guidance", "compares a model's predictions under two survival classes", guidance),
            ("--stage1-bounds", "scores a model's autoencoder", stage1_bounds),
            (
                "--survival-class truth",
                "guides a model's samples by each patient's class",
                survival_class == "truth",
            ),
        )
        if on
    ]
    others = [f"{m.name} {m.version} ({m.kind})" for m in models if m.kind != KIND_LDM]
    if not given:
        return []
    if len(others) == len(models):
        found = ", ".join(others) if others else "none (only 'no change')"
        raise InputError(
            f"{', '.join(o for o, _ in given)}: for latent diffusion models only "
            f"({'; '.join(f'{o} {w}' for o, w in given)}); expected one among the --model "
            f"options, found {found}"
        )
    warnings = [
        f"{option} applies to the latent diffusion models only ({why}); not to {', '.join(others)}"
        for option, why in given
        if others
    ]
    for w in warnings:
        log.warning("%s", w)
    return warnings


def run_evaluation(
    model_dirs: Sequence[str | Path],
    data: Sequence[str | Path],
    *,
    samples: int = 4,
    include_no_change: bool = True,
    survival_class: str = "none",
    guidance: bool = False,
    device: str = "cpu",
    seed: int = 0,
    n_resamples: int = 1000,
    margin_mm: float = 4.0,
    progress: bool = False,
    patients_limit: int | None = None,
    sites: Sequence[str] | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    stage1_bounds: bool = False,
    unknown_class: str | None = None,
    compile_mode: str = "none",
) -> dict[str, Any]:
    """Evaluate "no change" and each model directory on the cohort(s) ``data`` (only the
    patients of ``sites`` when given, then the first ``patients_limit``): the report as plain
    data (see :func:`write_report`). ``stage1_bounds``: see the module docstring.
    ``unknown_class`` overrides the models' ``inference.unknown_class`` (unguided predictions).
    ``compile_mode`` other than ``none``: the diffusion UNets run compiled on channels-last
    weights (:class:`inference.sampler.SamplingOptions`), compiled once for all patients."""
    from inference.baseline import NoChangeBaseline
    from inference.model_dir import KIND_LDM
    from inference.model_predictor import ModelPredictor

    cohort = read_cohort([Path(d) for d in data], survival_classes=_known_classes(model_dirs))
    if sites is not None:
        known = sorted({p.site for p in cohort})
        unknown = sorted(set(sites) - set(known))
        if unknown:
            raise InferenceError(f"evaluation sites: expected among {known}, found {unknown}")
        cohort = [p for p in cohort if p.site in set(sites)]
    if patients_limit is not None:
        cohort = cohort[:patients_limit]
    loaded = [
        ModelPredictor(
            d,
            device=device,
            seed=seed,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            unknown_class=unknown_class,
            channels_last=compile_mode != "none",
            compile_mode=compile_mode,
        )
        for d in model_dirs
    ]
    warnings = latent_only_options(
        loaded, guidance=guidance, stage1_bounds=stage1_bounds, survival_class=survival_class
    )
    patients = load_patients(cohort)
    methods: list[tuple[str, Predictor | Stage1Bound, dict[str, Any]]] = []
    if include_no_change:
        methods.append((NO_CHANGE, NoChangeBaseline(), {"kind": NO_CHANGE}))
    for d, mp in zip(model_dirs, loaded, strict=True):
        info = {
            "kind": mp.kind,
            "model_dir": str(d),
            **overlap_with_training(Path(d), [p.patient for p in patients]),
        }
        methods.append((f"{mp.name} {mp.version} ({mp.kind})", mp, info))
        if stage1_bounds and mp.kind == KIND_LDM:
            for source in Stage1Bound.SOURCES:
                bound = Stage1Bound(mp, source)
                kind = f"stage-1 bound ({source})"
                methods.append((bound.label, bound, {"kind": kind, "model_dir": str(d)}))
    if not methods:
        raise InferenceError("evaluation: expected at least one method, found none")
    # two directories of one name and version (a model and its retrained copy) keep one row each
    labels = [label for label, _, _ in methods]
    methods = [
        (f"{label} [{info['model_dir']}]" if labels.count(label) > 1 else label, mp, info)
        for label, mp, info in methods
    ]
    report: dict[str, Any] = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": [str(d) for d in data],
        "patients": len(patients),
        "sites": sorted({p.patient.site for p in patients}),
        "samples": samples,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "survival_class": survival_class,
        "unknown_class": unknown_class,
        "compile": compile_mode,
        "tumour_region_margin_mm": margin_mm,
        "bootstrap_resamples": n_resamples,
        "seed": seed,
        "warnings": warnings,
        "methods": {},
    }
    for label, predictor, info in methods:
        started = time.monotonic()
        results = evaluate_predictor(
            predictor,
            patients,
            samples=samples,
            survival_class=survival_class,
            margin_mm=margin_mm,
            progress=progress,
        )
        entry = {
            **info,
            "name": predictor.name,
            "version": predictor.version,
            "summary": summarise(results, n_resamples=n_resamples, seed=seed),
            "per_patient": [asdict(r) for r in results],
            "seconds": round(time.monotonic() - started, 2),
        }
        if guidance and info.get("kind") == KIND_LDM and not isinstance(predictor, Stage1Bound):
            entry["guidance"] = guidance_check(
                predictor, patients, samples=samples, n_resamples=n_resamples, seed=seed,
                progress=progress,
            )  # fmt: skip
        report["methods"][label] = entry
        log.info("evaluated %s on %d patients", label, len(patients))
    return report


# ------------------------------------------------------------------------------------------
# report files


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(est: dict[str, Any] | None, digits: int = 3) -> str:
    if not est or est.get("value") is None:
        return "n/a"
    v = f"{est['value']:.{digits}f}"
    left_out = f" ({est['excluded']} of {est['n']} left out)" if est.get("excluded") else ""
    if est.get("ci_low") is None or est.get("ci_high") is None:
        return v + left_out
    return f"{v} [{est['ci_low']:.{digits}f}, {est['ci_high']:.{digits}f}]{left_out}"


ROWS = (
    ("PSNR global (dB)", "psnr_global", 2),
    ("SSIM global", "ssim_global", 3),
    ("MAE global (z)", "mae_global", 3),
    ("PSNR tumour (dB)", "psnr_tumour", 2),
    ("SSIM tumour", "ssim_tumour", 3),
    ("MAE tumour (z)", "mae_tumour", 3),
    ("Tumour Dice", "dice", 3),
    ("Tumour Dice, patients with a tumour left", "dice_tumour_left", 3),
    ("Volume error (ml)", "volume_error_ml", 2),
    ("Absolute volume error (ml)", "abs_volume_error_ml", 2),
    ("Response balanced accuracy", "response_balanced_accuracy", 3),
    ("Response accuracy", "response_accuracy", 3),
    ("Response macro AUC (one-vs-rest)", "response_macro_auc", 3),
    ("Spearman spread vs tumour MAE", "spread_error_spearman", 3),
    ("Spearman spread vs tumour MAE, mean within sites", "spread_error_spearman_within_sites", 3),
    ("Mean spread, tumour region (z)", "spread_mean", 3),
    ("Spearman sample-volume SD vs absolute volume error", "volume_spread_error_spearman", 3),
    ("Survival AUC, short vs long, from predicted volume", "survival_auc_short_vs_long", 3),
)


def _or_model(value: object) -> str:
    return "the model's" if value is None else str(value)


def _uncertainty_by_site_lines(method: str, rows: list[dict[str, Any]] | None) -> list[str]:
    """The per-site uncertainty table of one method (none for a method without spread)."""
    if not rows or all(r["spread_error_spearman"] is None for r in rows):
        return []

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "",
        f"Uncertainty by site ({method}): Spearman correlation of the spread with the tumour "
        "MAE, with the predicted and with the true volume:",
        "",
        "| site/cohort | patients | responding | mean true / predicted volume (ml) | "
        "spread vs error | spread vs predicted volume | spread vs true volume |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['site']} | {r['patients']} | {r['responding_share']:.0%} | "
            f"{r['mean_truth_volume_ml']:.1f} / {r['mean_predicted_volume_ml']:.1f} | "
            f"{num(r['spread_error_spearman'], '+.2f')} | "
            f"{num(r['spread_predicted_volume_spearman'], '+.2f')} | "
            f"{num(r['spread_truth_volume_spearman'], '+.2f')} |"
        )
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    methods = report["methods"]
    names = list(methods)
    lines = [
        "# Evaluation (synthetic prediction, research use only)",
        "",
        f"- data: {', '.join(report['data'])}; {report['patients']} patients; "
        f"sites {', '.join(report['sites'])}",
        f"- samples per study: {report['samples']}; survival class: {report['survival_class']}; "
        f"tumour region margin: {report['tumour_region_margin_mm']} mm",
        f"- sampling: guidance scale: {_or_model(report.get('guidance_scale'))}; DDIM steps: "
        f"{_or_model(report.get('num_inference_steps'))}; with no survival class: "
        f"{_or_model(report.get('unknown_class'))}",
        f"- mean [95 % bootstrap interval, {report['bootstrap_resamples']} resamples of the "
        "patients]; n/a: undefined (e.g. no spread, one class only); a mean without an "
        "interval: none is defined (fewer than two patients or values)",
        f"- generated {report['generated_at']}",
    ]
    lines += [f"- WARNING: {w}" for w in report.get("warnings") or []]
    first: dict[str, Any] = next(iter(methods.values()), {})
    left = first.get("summary", {}).get("patients_tumour_left")
    if left is not None:
        lines.append(
            f"- {left} of {report['patients']} patients have a tumour left at follow-up (Dice is 1 "
            "for a patient with none left when the prediction has none either)"
        )
    lines += [
        "",
        "| metric | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    left_out = False
    for title, key, digits in ROWS:
        cells = [_fmt(methods[m]["summary"].get(key), digits) for m in names]
        left_out = left_out or any("left out)" in c for c in cells)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if left_out:
        lines += [
            "",
            "(k of n left out): k patients' values are not finite and are not in the mean: "
            "undefined (nan), or an infinite PSNR (a prediction equal to the truth there)",
        ]
    lines += ["", "Per response category (sensitivity / specificity / AUC, one-vs-rest):", ""]
    lines.append("| category | truth count | " + " | ".join(names) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for c in RESPONSE_CATEGORIES:
        first = methods[names[0]]["summary"]["response_per_category"][c]
        cells = []
        for m in names:
            pc = methods[m]["summary"]["response_per_category"][c]
            cells.append(
                " / ".join(_fmt({"value": pc[k]["value"]}, 2) for k in ("sensitivity",
                                                                         "specificity", "auc"))
            )  # fmt: skip
        lines.append(f"| {c} | {first['truth_count']} | " + " | ".join(cells) + " |")
    for m in names:
        lines += _uncertainty_by_site_lines(m, methods[m]["summary"].get("uncertainty_by_site"))
    for m in names:
        g = methods[m].get("guidance")
        if g:
            lines += [
                "",
                f"Guidance ({m}): predicted volume under {g['classes'][0]} minus under "
                f"{g['classes'][1]}: {_fmt(g['mean_difference_ml'], 2)} ml; in the expected "
                f"direction for {g['fraction_in_expected_direction']:.0%} of patients; "
                f"Wilcoxon p = {g['wilcoxon_p'] if g['wilcoxon_p'] is not None else 'n/a'}",
            ]
        overlap = methods[m].get("overlap_with_training")
        if overlap and methods[m].get("overlap_basis") == "sites":
            sites = ", ".join(methods[m].get("training_sites", []))
            lines += [
                "",
                f"WARNING: {overlap} evaluated patient(s) are from the sites that trained the "
                f"federated model {m} ({sites}): they may have been training patients (a "
                "federation records its sites, not its patients)",
            ]
        elif overlap:
            lines += ["", f"WARNING: {overlap} evaluated patient(s) were training patients of {m}"]
    return "\n".join(lines) + "\n"


#: the files of a report, as :func:`write_report` names them
REPORT_FILES = ("metrics.json", "metrics.md")


def report_folder(out_dir: str | Path, overwrite: bool = True) -> Path:
    """``out_dir`` made ready for :func:`write_report` (created when absent), or an
    :class:`InputError` that says why it cannot be: checked before any patient is evaluated, so
    that an evaluation is not lost at its end. Unless ``overwrite``, a folder holding a report
    is refused: an evaluation takes an hour, and its report would be replaced by the next."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"report folder {out}: expected a folder, found a file")
    held = [name for name in REPORT_FILES if (out / name).exists()]
    if held and not overwrite:
        raise InputError(
            f"report folder {out}: expected a folder without a report, found {' and '.join(held)}"
            f"{_report_said(out / REPORT_FILES[0])}; give another --out, or --overwrite to "
            "replace it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"report folder {out}: cannot be created ({exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(
            f"report folder {out}: expected a folder we may write to, found one we may not"
        )
    return out


def _write_whole(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary name: the file is the new text or the old."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _report_said(path: Path) -> str:
    """What the report at ``path`` evaluated, as an error names it ("" when it cannot tell)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        methods = ", ".join(str(m) for m in report["methods"])
        return f" (of {methods} on {int(report['patients'])} patient(s))"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` to ``out_dir``, each whole or not at all; an
    :class:`InputError` when the folder cannot take them (see :func:`report_folder`), an
    :class:`InferenceError` when a write fails."""
    out = report_folder(out_dir)
    clean = _clean(report)
    js, md = (out / name for name in REPORT_FILES)
    try:
        _write_whole(js, json.dumps(clean, indent=2))
        _write_whole(md, markdown_report(clean))
    except OSError as exc:
        raise InferenceError(f"the report was not written to {out}: {exc}") from None
    return js, md
