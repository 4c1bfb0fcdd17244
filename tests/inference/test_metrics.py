"""Metrics on hand-made arrays whose values are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.errors import InferenceError
from inference import metrics as M


def test_mae_globally_and_in_a_region() -> None:
    truth = np.zeros((4, 4, 4))
    pred = np.full((4, 4, 4), 0.5)
    pred[0] = 2.0
    region = np.zeros((4, 4, 4), bool)
    region[1:] = True
    assert M.mae(pred, truth, region) == pytest.approx(0.5)
    assert M.mae(pred, truth) == pytest.approx((16 * 2.0 + 48 * 0.5) / 64)
    assert math.isnan(M.mae(pred, truth, np.zeros((4, 4, 4), bool)))


def test_psnr_known_values() -> None:
    truth = np.zeros((5, 5, 5))
    assert M.psnr(truth + 0.1, truth, data_range=1.0) == pytest.approx(20.0)
    assert M.psnr(truth + 0.01, truth, data_range=1.0) == pytest.approx(40.0)
    assert M.psnr(truth + 0.1, truth, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    assert M.psnr(truth, truth, data_range=1.0) == math.inf
    with pytest.raises(InferenceError, match="positive data range"):
        M.psnr(truth, truth, data_range=0.0)


def test_ssim_identical_is_one_and_constants_follow_the_luminance_term() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 12, 12))
    assert M.ssim(x, x, data_range=1.0) == pytest.approx(1.0)
    # two constant images: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2
    a, b, c1 = 0.5, 0.25, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = M.ssim(np.full((12, 12, 12), b), np.full((12, 12, 12), a), data_range=1.0)
    assert value == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.80006, abs=1e-4)


def test_ssim_in_a_region_sees_only_the_region() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random((16, 16, 16))
    pred = truth.copy()
    pred[:, :, 12:] = rng.random((16, 16, 4))  # damage one side only
    left = np.zeros(truth.shape, bool)
    left[:, :, :4] = True
    right = np.zeros(truth.shape, bool)
    right[:, :, 12:] = True
    assert M.ssim(pred, truth, 1.0, left) > 0.99
    assert M.ssim(pred, truth, 1.0, right) < 0.5
    with pytest.raises(InferenceError, match=">= 11"):
        M.ssim(np.zeros((8, 12, 12)), np.zeros((8, 12, 12)), 1.0)


def test_dice_known_overlaps() -> None:
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[:, :, :4] = True  # 400 voxels
    b[:, :, 2:6] = True  # 400 voxels, 200 shared
    assert M.dice(a, b) == pytest.approx(0.5)
    assert M.dice(a, a) == 1.0
    assert M.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert M.dice(a, np.zeros_like(a)) == 0.0
    assert M.volume_ml(a, (2.0, 2.0, 2.5)) == pytest.approx(400 * 10 / 1000)


def test_auc_known_values_and_ties() -> None:
    assert M.auc([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1]) == pytest.approx(0.75)
    assert M.auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert M.auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_auc_agrees_with_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.random(40) < 0.4
    s = np.round(rng.random(40), 1)  # with ties
    assert M.auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s))


def test_category_metrics_by_hand() -> None:
    cats = ("a", "b", "c")
    truth = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    probs = [
        {"a": 0.9, "b": 0.1, "c": 0.0},
        {"a": 0.4, "b": 0.6, "c": 0.0},
        {"a": 0.2, "b": 0.8, "c": 0.0},
        {"a": 0.1, "b": 0.7, "c": 0.2},
        {"a": 0.6, "b": 0.1, "c": 0.3},
    ]
    m = M.category_metrics(truth, pred, probs, cats)
    assert m.sensitivity == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert m.specificity["a"] == pytest.approx(2 / 3)  # b, b correct; c called a
    assert m.specificity["b"] == pytest.approx(2 / 3)  # the second a called b
    assert m.specificity["c"] == 1.0
    assert m.balanced_accuracy == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m.accuracy == pytest.approx(3 / 5)
    # class c: the only positive has score 0.3, negatives 0, 0, 0, 0.2 -> AUC 1
    assert m.auc["c"] == 1.0
    # class a: positives 0.9, 0.4 ; negatives 0.2, 0.1, 0.6 -> (3 + 2) / 6
    assert m.auc["a"] == pytest.approx(5 / 6)


def test_category_metrics_absent_class_is_nan_and_left_out() -> None:
    m = M.category_metrics(["a", "a"], ["a", "b"], [{"a": 1.0}, {"a": 0.0}], ("a", "b"))
    assert math.isnan(m.sensitivity["b"])
    assert m.balanced_accuracy == 0.5
    with pytest.raises(InferenceError, match="as many predictions"):
        M.category_metrics(["a"], [], [], ("a",))


def test_spearman() -> None:
    assert M.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert M.spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_interval() -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(5.0, 1.0, size=200)
    est = M.mean_ci(values, n_resamples=500, seed=1)
    assert est.value == pytest.approx(values.mean())
    assert est.low < est.value < est.high
    # the interval of a mean of 200 N(5, 1) values is about +-0.14
    assert 0.2 < est.high - est.low < 0.4
    again = M.mean_ci(values, n_resamples=500, seed=1)
    assert (again.low, again.high) == (est.low, est.high)
    const = M.mean_ci([2.0, 2.0, 2.0], n_resamples=50)
    assert (const.value, const.low, const.high) == (2.0, 2.0, 2.0)
    assert M.mean_ci([], n_resamples=10).n == 0
    d = est.as_dict()
    assert set(d) == {"value", "ci_low", "ci_high", "n"}


def test_a_constant_score_has_the_chance_auc_as_documented() -> None:
    """The code's 0.5 is right (ties count half: a score that cannot tell the category from
    the rest); the module docstring used to say a constant score gives nan."""
    assert M.auc([True, False, True, False], [0.3] * 4) == 0.5
    cm = M.category_metrics(["A"] * 3 + ["B"] * 2, ["A"] * 5, [{"A": 1.0}] * 5, ["A", "B"])
    assert cm.auc == {"A": 0.5, "B": 0.5} and cm.macro_auc == 0.5
    doc = " ".join((M.__doc__ or "").split())
    assert "no positive or no negative case) is ``nan``. A constant score" in doc
    assert "has an AUC of 0.5, not ``nan``" in doc


def test_values_that_are_not_finite_are_left_out_and_counted() -> None:
    """A perfect prediction's PSNR (inf) used to vanish from the mean while n counted it."""
    from dicom_node.types import RESPONSE_CATEGORIES
    from inference.evaluate import markdown_report

    est = M.mean_ci([math.inf, 20.0, 30.0, math.nan], n_resamples=50)
    assert (est.value, est.n, est.excluded) == (25.0, 4, 2)
    assert est.as_dict()["excluded"] == 2
    assert "excluded" not in M.mean_ci([20.0, 30.0], n_resamples=50).as_dict()
    assert M.finite_mean([math.inf, 20.0, 30.0]) == 25.0 and math.isnan(M.finite_mean([math.nan]))
    empty = {k: {"value": None} for k in ("sensitivity", "specificity", "auc")}
    per_category = {c: {**empty, "truth_count": 0} for c in RESPONSE_CATEGORIES}
    summary = {"psnr_global": est.as_dict(), "response_per_category": per_category}
    report = {"data": ["d"], "patients": 4, "sites": ["S"], "samples": 1, "survival_class": "none",
              "tumour_region_margin_mm": 4.0, "bootstrap_resamples": 50, "generated_at": "now",
              "methods": {"m": {"summary": summary}}}  # fmt: skip
    text = markdown_report(report)
    assert "| PSNR global (dB) | 25.00 [" in text and "] (2 of 4 left out) |" in text
    assert "(k of n left out): k patients' values are not finite" in text


def test_one_value_has_no_interval() -> None:
    """One patient (or one finite value) gave a zero-width interval."""
    one = M.bootstrap_ci(lambda i: 3.0, 1, n_resamples=20)
    assert one.value == 3.0 and math.isnan(one.low) and math.isnan(one.high)
    assert one.as_dict() == {"value": 3.0, "ci_low": None, "ci_high": None, "n": 1}
    left = M.mean_ci([math.nan, 3.0], n_resamples=20)
    assert (left.value, left.excluded) == (3.0, 1) and math.isnan(left.low)
    two = M.mean_ci([1.0, 3.0], n_resamples=50)
    assert two.low < two.high
