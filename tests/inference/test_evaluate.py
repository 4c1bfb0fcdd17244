"""Evaluation: an oracle scores perfectly, "no change" does not, every method runs through the
same code, the report files hold what the summary says."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicom_node.convert.preprocess import foreground_mask_array, normalise_intensity
from dicom_node.types import RESPONSE_CATEGORIES, Prediction, StudyInputs
from inference.baseline import NoChangeBaseline
from inference.data import PatientTruth
from inference.evaluate import (
    EvaluationPatient,
    evaluate_predictor,
    load_patients,
    markdown_report,
    run_evaluation,
    summarise,
    training_overlap,
    tumour_region,
    write_report,
)
from inference.metrics import volume_ml
from inference.synthetic.cohort import PatientRecord

Cohort = tuple[Path, list[PatientRecord]]


class Oracle:
    """Predicts the truth: the post-treatment scan in the pre-treatment T1-Gd's units, the true
    enhancing mask and volume, and the true response category."""

    name = "oracle"
    version = "1"

    def __init__(self, patients: list[EvaluationPatient]) -> None:
        self.by_shape = {id(p.inputs.t1c.array): p for p in patients}

    def predict(self, inputs: StudyInputs, samples: int = 4) -> Prediction:
        ep = self.by_shape[id(inputs.t1c.array)]
        pre = np.asarray(inputs.t1c.array, np.float32)
        _, pre_scaling = normalise_intensity(pre, foreground_mask_array(pre))
        post = np.asarray(ep.truth.post_t1c.array, np.float32)
        truth_n, _ = normalise_intensity(post, foreground_mask_array(post))
        mask = ep.truth.post_enhancing
        vol = volume_ml(mask.array, mask.spacing)
        category = ep.patient.response_category
        return Prediction(
            mean=inputs.t1c.with_array(pre_scaling.invert(truth_n)),
            std=inputs.t1c.with_array(np.zeros_like(pre)),
            tumour_mask=inputs.t1c.with_array(np.asarray(mask.array, bool)),
            sample_volumes_ml=(vol,) * samples,
            current_volume_ml=1.0,
            response_probabilities={c: float(c == category) for c in RESPONSE_CATEGORIES},
            survival_class=inputs.survival_class,
            model_name=self.name,
            model_version=self.version,
        )


@pytest.fixture(scope="module")
def patients(tiny_cohort: Cohort) -> list[EvaluationPatient]:
    from inference.data import read_cohort

    return load_patients(read_cohort(tiny_cohort[0]))


def test_the_oracle_scores_perfectly_and_no_change_does_not(
    patients: list[EvaluationPatient],
) -> None:
    oracle = evaluate_predictor(Oracle(patients), patients, samples=2)
    for r in oracle:
        m = r.metrics
        assert m["ssim_global"] == pytest.approx(1.0, abs=1e-4)
        assert m["ssim_tumour"] == pytest.approx(1.0, abs=1e-4)
        assert m["mae_global"] == pytest.approx(0.0, abs=1e-4)
        assert m["psnr_tumour"] > 60
        assert m["dice"] == 1.0
        assert m["volume_error_ml"] == pytest.approx(0.0, abs=1e-9)
        assert r.predicted_category == r.truth_category
    summary = summarise(oracle, n_resamples=50)
    assert summary["response_balanced_accuracy"]["value"] == 1.0
    assert summary["response_accuracy"]["value"] == 1.0
    assert summary["dice"]["value"] == 1.0
    assert "survival_auc_short_vs_long" in summary
    assert math.isnan(summary["spread_error_spearman"]["value"] or math.nan)  # no spread

    same = evaluate_predictor(NoChangeBaseline(), patients, samples=2)
    for r in same:
        assert r.metrics["ssim_tumour"] < 0.99
        assert r.metrics["mae_tumour"] > 0.05
        assert r.predicted_category in ("stable_disease", "complete_response")
        assert r.current_volume_ml == pytest.approx(r.predicted_volume_ml)
    # the tumour region is harder for "no change" than the whole head
    ssim_t = np.mean([r.metrics["ssim_tumour"] for r in same])
    ssim_g = np.mean([r.metrics["ssim_global"] for r in same])
    assert ssim_t < ssim_g


def test_guided_and_truth_classes(patients: list[EvaluationPatient]) -> None:
    seen: list[str | None] = []

    class Recorder(NoChangeBaseline):
        def predict(self, inputs: StudyInputs, samples: int = 4) -> Prediction:
            seen.append(inputs.survival_class)
            return super().predict(inputs, samples)

    evaluate_predictor(Recorder(), patients[:2], survival_class="truth")
    assert seen == [p.patient.survival_class for p in patients[:2]]
    seen.clear()
    evaluate_predictor(Recorder(), patients[:2])
    assert seen == [None, None]


def test_run_evaluation_writes_json_and_markdown(
    tiny_cohort: Cohort, tiny_ldm_dir: Path, tiny_baseline_dir: Path, tmp_path: Path
) -> None:
    report = run_evaluation(
        [tiny_ldm_dir, tiny_baseline_dir],
        [tiny_cohort[0]],
        samples=1,
        guidance=True,
        n_resamples=30,
        patients_limit=2,
    )
    methods = report["methods"]
    assert len(methods) == 3
    kinds = [m["kind"] for m in methods.values()]
    assert kinds == ["no-change", "latent-diffusion", "unet-baseline"]
    for m in methods.values():
        s = m["summary"]
        assert s["patients"] == 2
        assert len(m["per_patient"]) == 2
        for key in ("psnr_global", "ssim_tumour", "dice", "response_balanced_accuracy"):
            assert key in s
    ldm = next(m for m in methods.values() if m["kind"] == "latent-diffusion")
    g = ldm["guidance"]
    assert g["classes"] == ["short", "long"] and len(g["volumes_ml"]["short"]) == 2
    # the fixtures trained on the same cohort: the overlap is reported
    assert ldm["overlap_with_training"] >= 1
    js, md = write_report(report, tmp_path / "ev")
    data = json.loads(js.read_text())
    nc = data["methods"]["no-change"]["summary"]["ssim_global"]
    assert nc["ci_low"] <= nc["value"] <= nc["ci_high"]
    text = md.read_text()
    assert "| Tumour Dice |" in text and "no-change" in text and "Guidance" in text
    assert "WARNING" in text  # evaluated on training patients
    assert text == markdown_report(data)


def test_stage1_bounds_bracket_each_latent_model(
    tiny_cohort: Cohort, tiny_ldm_dir: Path, tiny_baseline_dir: Path
) -> None:
    report = run_evaluation(
        [tiny_ldm_dir, tiny_baseline_dir],
        [tiny_cohort[0]],
        samples=1,
        n_resamples=10,
        patients_limit=2,
        stage1_bounds=True,
        guidance=True,
    )
    methods = report["methods"]
    kinds = [m["kind"] for m in methods.values()]
    assert kinds == [
        "no-change",
        "latent-diffusion",
        "stage-1 bound (truth)",
        "stage-1 bound (pre)",
        "unet-baseline",  # no bounds: it has no autoencoder
    ]
    truth, pre = (m for m in methods.values() if m["kind"].startswith("stage-1"))
    assert "autoencoder on the true post-treatment scan" in next(
        k for k, m in methods.items() if m is truth
    )
    assert "guidance" not in truth and "guidance" not in pre
    for m in (truth, pre):
        assert all(p["metrics"] and p["predicted_volume_ml"] >= 0 for p in m["per_patient"])
    # the pre-treatment row keeps each patient's decoded volume: stable (or complete) response
    assert {p["predicted_category"] for p in pre["per_patient"]} <= {
        "stable_disease",
        "complete_response",
    }
    # the truth row decodes the post-treatment scan, another image than the pre-treatment one
    assert truth["summary"]["mae_global"]["value"] != pre["summary"]["mae_global"]["value"]


def test_models_of_one_name_and_version_keep_a_row_each(
    tiny_cohort: Cohort, tiny_baseline_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "retrained"
    shutil.copytree(tiny_baseline_dir, copy)
    report = run_evaluation(
        [tiny_baseline_dir, copy], [tiny_cohort[0]], samples=1, n_resamples=10, patients_limit=1
    )
    labels = list(report["methods"])[1:]
    assert len(labels) == 2 and labels[0] != labels[1]
    assert labels[0].endswith(f"[{tiny_baseline_dir}]") and labels[1].endswith(f"[{copy}]")


def test_training_overlap_without_checkpoints(tmp_path: Path) -> None:
    assert training_overlap(tmp_path, ["a"]) is None


def test_site_filter(tiny_cohort: Cohort) -> None:
    from dicom_node.errors import InferenceError

    site = tiny_cohort[1][1].values["site"]
    report = run_evaluation([], [tiny_cohort[0]], sites=[site], n_resamples=10, samples=1)
    assert report["sites"] == [site]
    assert report["patients"] == sum(r.values["site"] == site for r in tiny_cohort[1])
    with pytest.raises(InferenceError, match="evaluation sites"):
        run_evaluation([], [tiny_cohort[0]], sites=["SITE-NOWHERE"])


def test_survival_discrimination_from_predicted_volumes() -> None:
    from inference.evaluate import PatientResult

    def result(cls: str, volume: float) -> PatientResult:
        return PatientResult(
            patient_id=cls + str(volume), site="S", truth_category="stable_disease",
            survival_class=cls, predicted_category="stable_disease",
            probabilities={c: float(c == "stable_disease") for c in RESPONSE_CATEGORIES},
            truth_volume_ml=1.0, predicted_volume_ml=volume, current_volume_ml=1.0,
            metrics=dict.fromkeys(("psnr_global", "ssim_global", "mae_global", "psnr_tumour",
                                   "ssim_tumour", "mae_tumour", "dice", "volume_error_ml",
                                   "abs_volume_error_ml"), 0.0),
            spread=0.0, seconds=0.0,
        )  # fmt: skip

    # short survival with larger tumours, except one pair out of order: (3*3 - 1) / 9
    results = [result("short", v) for v in (10.0, 20.0, 5.0)]
    results += [result("long", v) for v in (1.0, 2.0, 6.0)]
    results.append(result("intermediate", 100.0))  # left out
    auc = summarise(results, n_resamples=20)["survival_auc_short_vs_long"]["value"]
    assert auc == pytest.approx(8 / 9)


def test_volume_uncertainty_is_the_sample_volume_spread_against_the_volume_error() -> None:
    from inference.evaluate import METRIC_KEYS, PatientResult

    def result(samples: tuple[float, ...], truth_ml: float) -> PatientResult:
        mean = float(np.mean(samples)) if samples else 0.0
        metrics = dict.fromkeys(METRIC_KEYS, 0.0)
        metrics["volume_error_ml"] = mean - truth_ml
        metrics["abs_volume_error_ml"] = abs(mean - truth_ml)
        return PatientResult(
            patient_id=f"P{truth_ml}", site="S", truth_category="stable_disease",
            survival_class="short", predicted_category="stable_disease",
            probabilities={c: float(c == "stable_disease") for c in RESPONSE_CATEGORIES},
            truth_volume_ml=truth_ml, predicted_volume_ml=mean, current_volume_ml=1.0,
            metrics=metrics, spread=0.0, seconds=0.0, sample_volumes_ml=samples,
        )  # fmt: skip

    # sample SDs 1, 2, 3, 4 ml (means 10 ml); volume errors 0.5, 1, 7, 20 ml: same order
    tracked = [
        result((9.0, 11.0), 9.5), result((8.0, 12.0), 11.0),
        result((7.0, 13.0), 3.0), result((6.0, 14.0), 30.0),
    ]  # fmt: skip
    value = summarise(tracked, n_resamples=20)["volume_spread_error_spearman"]["value"]
    assert value == pytest.approx(1.0)
    # the largest spread on the smallest error: the order reversed
    reversed_ = [
        result((9.0, 11.0), 30.0), result((8.0, 12.0), 3.0),
        result((7.0, 13.0), 11.0), result((6.0, 14.0), 9.5),
    ]  # fmt: skip
    value = summarise(reversed_, n_resamples=20)["volume_spread_error_spearman"]["value"]
    assert value == pytest.approx(-1.0)
    # one sample per patient: no spread, so no correlation
    single = [result((10.0,), t) for t in (1.0, 2.0, 3.0)]
    value = summarise(single, n_resamples=20)["volume_spread_error_spearman"]["value"]
    assert value is None or math.isnan(value)


def test_within_site_spearman_is_not_fooled_by_a_difference_between_sites() -> None:
    """Pooled, spread and error rise together because site B has both the larger spreads and
    the larger errors; within each site the larger spread goes with the smaller error."""
    from inference.evaluate import METRIC_KEYS, PatientResult

    def result(site: str, spread: float, mae: float) -> PatientResult:
        metrics = dict.fromkeys(METRIC_KEYS, 0.0)
        metrics["mae_tumour"] = mae
        return PatientResult(
            patient_id=f"{site}{spread}", site=site, truth_category="stable_disease",
            survival_class="short", predicted_category="stable_disease",
            probabilities={c: float(c == "stable_disease") for c in RESPONSE_CATEGORIES},
            truth_volume_ml=1.0, predicted_volume_ml=1.0, current_volume_ml=1.0,
            metrics=metrics, spread=spread, seconds=0.0,
        )  # fmt: skip

    results = [result("A", s, e) for s, e in ((0.1, 1.3), (0.2, 1.2), (0.3, 1.1))]
    results += [result("B", s, e) for s, e in ((0.7, 2.3), (0.8, 2.2), (0.9, 2.1))]
    summary = summarise(results, n_resamples=20)
    assert summary["spread_error_spearman"]["value"] > 0.3
    assert summary["spread_error_spearman_within_sites"]["value"] == pytest.approx(-1.0)
    assert summary["spread_mean"]["value"] == pytest.approx(0.5)
    one_site = summarise(results[:3], n_resamples=20)
    assert "spread_error_spearman_within_sites" not in one_site


def test_a_site_name_in_two_cohorts_is_two_sites() -> None:
    """Cohorts draw their own scanner profile per site name: SITE-A of seed 2 and SITE-A of
    seed 9 are grouped apart."""
    from inference.evaluate import METRIC_KEYS, PatientResult

    def result(pid: str, spread: float, mae: float) -> PatientResult:
        metrics = dict.fromkeys(METRIC_KEYS, 0.0)
        metrics["mae_tumour"] = mae
        return PatientResult(
            patient_id=pid, site="SITE-A", truth_category="stable_disease",
            survival_class="short", predicted_category="stable_disease",
            probabilities={c: float(c == "stable_disease") for c in RESPONSE_CATEGORIES},
            truth_volume_ml=1.0, predicted_volume_ml=1.0, current_volume_ml=1.0,
            metrics=metrics, spread=spread, seconds=0.0,
        )  # fmt: skip

    # within each cohort the larger spread goes with the smaller error; pooled by name, with
    # the second cohort's larger spreads and errors, the order is mostly the other way
    results = [result(f"GF00002-000{i}", s, e) for i, (s, e) in enumerate(
        ((0.1, 1.3), (0.2, 1.2), (0.3, 1.1)), start=1)]  # fmt: skip
    results += [result(f"GF00009-000{i}", s, e) for i, (s, e) in enumerate(
        ((0.7, 2.3), (0.8, 2.2), (0.9, 2.1)), start=1)]  # fmt: skip
    summary = summarise(results, n_resamples=20)
    assert summary["spread_error_spearman_within_sites"]["value"] == pytest.approx(-1.0)


def test_uncertainty_by_site_says_what_the_spread_follows() -> None:
    """A model whose spread follows the tumour it draws, not the one that is there: within the
    site the spread rises with the predicted volume and falls with the true one, and the
    report's per-site table says so, with the share of responding tumours."""
    from inference.evaluate import METRIC_KEYS, PatientResult

    def result(i: int, category: str, truth: float, predicted: float) -> PatientResult:
        metrics = dict.fromkeys(METRIC_KEYS, 0.0)
        metrics["mae_tumour"] = abs(truth - predicted)
        return PatientResult(
            patient_id=f"GF00011-000{i}", site="SITE-LAK", truth_category=category,
            survival_class="short", predicted_category="partial_response",
            probabilities={c: float(c == "partial_response") for c in RESPONSE_CATEGORIES},
            truth_volume_ml=truth, predicted_volume_ml=predicted, current_volume_ml=10.0,
            metrics=metrics, spread=predicted / 10, seconds=0.0,
        )  # fmt: skip

    results = [
        result(1, "complete_response", 0.0, 4.0),
        result(2, "partial_response", 2.0, 3.0),
        result(3, "stable_disease", 12.0, 2.0),
        result(4, "progressive_disease", 30.0, 1.0),
    ]
    summary = summarise(results, n_resamples=20)
    (row,) = summary["uncertainty_by_site"]
    assert row["site"] == "SITE-LAK/11" and row["patients"] == 4
    assert row["responding_share"] == 0.5
    assert row["mean_truth_volume_ml"] == pytest.approx(11.0)
    assert row["mean_predicted_volume_ml"] == pytest.approx(2.5)
    assert row["spread_predicted_volume_spearman"] == pytest.approx(1.0)
    assert row["spread_truth_volume_spearman"] == pytest.approx(-1.0)
    assert row["spread_error_spearman"] == pytest.approx(-0.8)
    report = {
        "data": ["d"], "patients": 4, "sites": ["SITE-LAK"], "samples": 4,
        "survival_class": "none", "tumour_region_margin_mm": 4.0, "bootstrap_resamples": 20,
        "generated_at": "now", "methods": {"m": {"summary": summary}},
    }  # fmt: skip
    text = markdown_report(report)
    assert "- 3 of 4 patients have a tumour left at follow-up" in text
    assert "Uncertainty by site (m)" in text
    assert "| SITE-LAK/11 | 4 | 50% | 11.0 / 2.5 | -0.80 | +1.00 | -1.00 |" in text


def test_dice_over_the_tumours_left_leaves_out_the_empty_masks() -> None:
    """A model that predicts no tumour scores Dice 1 on every complete response (both masks
    empty): the summary also reports Dice over the patients with a tumour left."""
    from inference.evaluate import METRIC_KEYS, PatientResult

    def result(i: int, truth_ml: float, dice: float) -> PatientResult:
        metrics = dict.fromkeys(METRIC_KEYS, 0.0)
        metrics["dice"] = dice
        return PatientResult(
            patient_id=f"GF00011-000{i}", site="SITE-LAK", truth_category="partial_response",
            survival_class="short", predicted_category="complete_response",
            probabilities={c: float(c == "complete_response") for c in RESPONSE_CATEGORIES},
            truth_volume_ml=truth_ml, predicted_volume_ml=0.0, current_volume_ml=10.0,
            metrics=metrics, spread=0.1 * i, seconds=0.0,
        )  # fmt: skip

    results = [result(1, 0.0, 1.0), result(2, 0.0, 1.0), result(3, 4.0, 0.0), result(4, 9.0, 0.2)]
    summary = summarise(results, n_resamples=20)
    assert summary["dice"]["value"] == pytest.approx(0.55)
    assert summary["patients_tumour_left"] == 2
    assert summary["dice_tumour_left"]["value"] == pytest.approx(0.1)
    none_left = summarise(results[:2], n_resamples=20)
    assert none_left["patients_tumour_left"] == 0
    assert none_left["dice_tumour_left"]["value"] is None  # undefined, reported as n/a


def _region_truth(region: np.ndarray, spacing: tuple[float, float, float]) -> PatientTruth:
    from dicom_node.types import Volume

    vol = Volume(array=region, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    return PatientTruth(post_t1c=vol, post_enhancing=vol, pre_enhancing=vol, tumour_region=vol)


def _former_region(truth: PatientTruth, head: np.ndarray, margin_mm: float) -> np.ndarray:
    """The rule before the margin was counted per axis: round(margin / smallest spacing)
    6-connected dilations on every axis."""
    from scipy import ndimage

    region = np.asarray(truth.tumour_region.array, dtype=bool)
    steps = round(margin_mm / min(truth.tumour_region.spacing))
    return ndimage.binary_dilation(region, iterations=steps) & head if steps else region & head


def test_the_tumour_region_margin_is_counted_in_millimetres_on_each_axis() -> None:
    """A 4 mm margin on a 1 x 1 x 5 mm grid used to take 4 dilation steps on every axis: 4 mm
    in-plane, 20 mm through the slices. Isotropic grids, and the 4 x 4 x 5 mm grids of the
    model card's 4 mm synthetic cohorts, keep exactly the region of the former rule."""
    shape = (21, 31, 31)  # k j i
    head = np.ones(shape, dtype=bool)
    head[:, :, :2] = False
    seed = np.zeros(shape, dtype=bool)
    seed[10, 15, 15] = True
    seed[10:12, 14:17, 3:5] = True  # a block touching the head's edge
    for spacing in ((4.0, 4.0, 4.0), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), (4.0, 4.0, 5.0)):
        truth = _region_truth(seed, spacing)
        np.testing.assert_array_equal(
            tumour_region(truth, head, 4.0), _former_region(truth, head, 4.0), err_msg=str(spacing)
        )
    thick = tumour_region(_region_truth(seed, (1.0, 1.0, 5.0)), head, 4.0)
    ks, js, _ = np.nonzero(thick[:, :, 10:])  # around the single voxel only
    assert (ks.min(), ks.max()) == (9, 11)  # one 5 mm slice either side (round(4 / 5) = 1)
    assert (js.min(), js.max()) == (11, 19)  # 4 voxels of 1 mm either side in-plane
    assert thick[10, 15, 11] and not thick[10, 15, 10] and not thick[9, 15, 12]
    assert np.array_equal(
        tumour_region(_region_truth(seed, (1.0, 1.0, 5.0)), head, 0.0), seed & head
    )


def test_a_report_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    """A write that failed (a folder where metrics.json goes, a full disk) was a traceback."""
    from dicom_node.errors import GlioforecastError, InputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="expected a folder, found a file"):
        write_report({"methods": {}}, tmp_path / "file")
    (tmp_path / "ev" / "metrics.json").mkdir(parents=True)
    with pytest.raises(GlioforecastError, match=f"the report was not written to {tmp_path}/ev"):
        write_report({"methods": {}}, tmp_path / "ev")


def test_no_spread_where_the_samples_cannot_differ(patients: list[EvaluationPatient]) -> None:
    """ "no change" and a single sample showed a mean spread of 0.000 [0.000, 0.000]: a
    standard deviation of zero by construction, not a measured one."""
    from inference.evaluate import draws_samples

    class Sampler(Oracle):
        kind = "latent-diffusion"

    for predictor, samples in ((NoChangeBaseline(), 4), (Sampler(patients), 1)):
        results = evaluate_predictor(predictor, patients[:2], samples=samples)
        assert all(math.isnan(r.spread) for r in results)
        summary = summarise(results, n_resamples=20)
        assert summary["spread_mean"]["value"] is None
    assert draws_samples(Sampler(patients)) and not draws_samples(NoChangeBaseline())
    sampled = evaluate_predictor(Sampler(patients), patients[:2], samples=2)
    assert all(r.spread == 0.0 for r in sampled)  # measured: the oracle's samples agree


def test_one_patient_has_no_interval(patients: list[EvaluationPatient]) -> None:
    """With one patient every row showed a zero-width "95 % bootstrap interval"."""
    results = evaluate_predictor(NoChangeBaseline(), patients[:1], samples=2)
    summary = summarise(results, n_resamples=20)
    for key in ("ssim_global", "dice", "response_accuracy", "spread_mean"):
        assert (summary[key]["ci_low"], summary[key]["ci_high"]) == (None, None)
    assert summary["ssim_global"]["value"] is not None
    report = {"data": ["d"], "patients": 1, "sites": ["S"], "samples": 2, "survival_class": "none",
              "tumour_region_margin_mm": 4.0, "bootstrap_resamples": 20, "generated_at": "now",
              "methods": {"no-change": {"summary": summary}}}  # fmt: skip
    text = markdown_report(report)
    row = next(line for line in text.splitlines() if line.startswith("| SSIM global |"))
    assert "[" not in row
    assert "| Mean spread, tumour region (z) | n/a |" in text
    assert "a mean without an interval: none is defined" in text
    data = json.loads(json.dumps(summary))
    assert data["spread_mean"] == {"value": None, "ci_low": None, "ci_high": None, "n": 1}


def test_options_for_latent_models_only(tiny_cohort: Cohort) -> None:
    """--guidance, --stage1-bounds and --survival-class truth gave nothing for a UNet baseline
    and said nothing."""
    from types import SimpleNamespace
    from typing import Any

    from dicom_node.errors import InputError
    from inference.evaluate import latent_only_options

    unet: Any = SimpleNamespace(kind="unet-baseline", name="u", version="1")
    ldm: Any = SimpleNamespace(kind="latent-diffusion", name="l", version="1")
    with pytest.raises(InputError, match=r"--guidance: for latent diffusion models only .*found u"):
        latent_only_options([unet], guidance=True)
    with pytest.raises(InputError, match=r"--survival-class truth: .*only 'no change'"):
        latent_only_options([], survival_class="truth")
    assert latent_only_options([unet]) == [] and latent_only_options([ldm], guidance=True) == []
    (warning,) = latent_only_options([ldm, unet], stage1_bounds=True)
    assert warning.startswith("--stage1-bounds applies to the latent diffusion models only")
    assert warning.endswith("not to u 1 (unet-baseline)")
    empty = {k: {"value": None} for k in ("sensitivity", "specificity", "auc")}
    summary = {"response_per_category": {c: {**empty, "truth_count": 0}
                                         for c in RESPONSE_CATEGORIES}}  # fmt: skip
    report = {"data": ["d"], "patients": 0, "sites": [], "samples": 1, "survival_class": "none",
              "tumour_region_margin_mm": 4.0, "bootstrap_resamples": 5, "generated_at": "now",
              "warnings": [warning], "methods": {"m": {"summary": summary}}}  # fmt: skip
    assert f"- WARNING: {warning}" in markdown_report(report)
