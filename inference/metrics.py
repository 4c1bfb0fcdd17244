"""Evaluation metrics (numpy / scipy / scikit-image), each on plain arrays.

Image similarity, globally or inside a region (boolean mask):

- :func:`mae`: mean absolute error;
- :func:`psnr`: ``10 log10(data_range^2 / MSE)`` (MSE inside the region);
- :func:`ssim`: the structural similarity of Wang et al. (2004) with an isotropic Gaussian window
  (sigma 1.5 voxels), computed over the whole volume by ``skimage.metrics.structural_similarity``
  and averaged inside the region.

Tumour: :func:`dice` (two empty masks agree: 1.0), :func:`volume_ml`.

Response categories (one-vs-rest for each category): :func:`category_metrics` gives sensitivity,
specificity and AUC per category (AUC from the predicted probability of that category, by the
Mann-Whitney statistic with ties counted half), the balanced accuracy (mean sensitivity over the
categories present in the truth) and the macro AUC. A value that is undefined (no positive or
no negative case) is ``nan``. A constant score (the same probability for every patient) has an
AUC of 0.5, not ``nan``: it is defined, and with ties counted half it is exactly the chance
level of a score that tells the category from the rest no better than a coin; left out as
``nan`` it would drop such a category from the macro AUC and flatter the predictor.

:func:`spearman`: rank correlation (``nan`` when either side is constant).
:func:`bootstrap_ci`: percentile confidence interval of any statistic of the patients, by
resampling patients with replacement (seeded); none (``nan`` bounds) for fewer than two
patients. :func:`mean_ci`: the mean of the finite values;
a value that is not finite (``nan``: undefined, e.g. no tumour region; ``inf``: the PSNR of a
prediction equal to the truth, whose error is 0) is left out of the mean and its interval, and
counted in ``excluded`` (``n`` stays the number of patients), which the reports print.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import stats

from dicom_node.errors import InferenceError

Array = npt.NDArray[np.generic]
SSIM_SIGMA = 1.5


def _region(shape: tuple[int, ...], mask: Array | None) -> npt.NDArray[np.bool_]:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape:
        raise InferenceError(f"region mask: expected shape {shape}, found {m.shape}")
    return m


def _pair(pred: Array, truth: Array) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape:
        raise InferenceError(f"metrics: prediction shape {p.shape} differs from truth {t.shape}")
    return p, t


def mae(pred: Array, truth: Array, mask: Array | None = None) -> float:
    p, t = _pair(pred, truth)
    r = _region(p.shape, mask)
    return float(np.abs(p[r] - t[r]).mean()) if r.any() else math.nan


def psnr(pred: Array, truth: Array, data_range: float, mask: Array | None = None) -> float:
    """PSNR in dB; ``inf`` for identical images, ``nan`` for an empty region."""
    if not data_range > 0:
        raise InferenceError(f"psnr: expected a positive data range, found {data_range}")
    p, t = _pair(pred, truth)
    r = _region(p.shape, mask)
    if not r.any():
        return math.nan
    mse = float(((p[r] - t[r]) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_map(pred: Array, truth: Array, data_range: float) -> npt.NDArray[np.float64]:
    """The voxel-wise SSIM map (Gaussian window, sigma 1.5 voxels; every side >= 11 voxels)."""
    from skimage.metrics import structural_similarity

    p, t = _pair(pred, truth)
    if min(p.shape) < 11:
        raise InferenceError(f"ssim: expected every side >= 11 voxels, found shape {p.shape}")
    _, full = structural_similarity(
        t,
        p,
        data_range=data_range,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    return np.asarray(full, dtype=np.float64)


def ssim(pred: Array, truth: Array, data_range: float, mask: Array | None = None) -> float:
    """Mean SSIM inside the region (the map is computed on the whole volume)."""
    s = ssim_map(pred, truth, data_range)
    r = _region(s.shape, mask)
    return float(s[r].mean()) if r.any() else math.nan


def dice(a: Array, b: Array) -> float:
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise InferenceError(f"dice: shapes differ, {x.shape} and {y.shape}")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Millilitres of one voxel of ``spacing`` (mm)."""
    return float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0


def volume_ml(mask: Array, spacing: Sequence[float]) -> float:
    """Millilitres of the non-zero voxels of ``mask``."""
    return float(np.asarray(mask, dtype=bool).sum()) * voxel_volume_ml(spacing)


def auc(labels: Sequence[bool] | Array, scores: Sequence[float] | Array) -> float:
    """Area under the ROC curve (Mann-Whitney, ties half); ``nan`` without both classes, 0.5
    for a constant score (see the module docstring)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise InferenceError(f"auc: {y.shape[0]} labels but {s.shape[0]} scores")
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


@dataclass(frozen=True)
class CategoryMetrics:
    """One-vs-rest metrics of a multi-class prediction."""

    sensitivity: dict[str, float]
    specificity: dict[str, float]
    auc: dict[str, float]
    balanced_accuracy: float
    macro_auc: float
    accuracy: float


def category_metrics(
    truth: Sequence[str],
    predicted: Sequence[str],
    probabilities: Sequence[dict[str, float]],
    categories: Sequence[str],
) -> CategoryMetrics:
    if not len(truth) == len(predicted) == len(probabilities):
        raise InferenceError(
            f"category metrics: expected as many predictions as truths, found {len(truth)} "
            f"truths, {len(predicted)} predictions, {len(probabilities)} probability sets"
        )
    t = np.asarray(truth, dtype=object)
    p = np.asarray(predicted, dtype=object)
    sens: dict[str, float] = {}
    spec: dict[str, float] = {}
    aucs: dict[str, float] = {}
    for c in categories:
        pos, neg = t == c, t != c
        sens[c] = float((p[pos] == c).mean()) if pos.any() else math.nan
        spec[c] = float((p[neg] != c).mean()) if neg.any() else math.nan
        aucs[c] = auc(pos, [float(q.get(c, 0.0)) for q in probabilities])
    present = [sens[c] for c in categories if not math.isnan(sens[c])]
    defined_auc = [aucs[c] for c in categories if not math.isnan(aucs[c])]
    return CategoryMetrics(
        sensitivity=sens,
        specificity=spec,
        auc=aucs,
        balanced_accuracy=float(np.mean(present)) if present else math.nan,
        macro_auc=float(np.mean(defined_auc)) if defined_auc else math.nan,
        accuracy=float((t == p).mean()) if len(t) else math.nan,
    )


def spearman(x: Sequence[float] | Array, y: Sequence[float] | Array) -> float:
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise InferenceError(f"spearman: {a.size} values against {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap percentile interval (``nan`` bounds when undefined)."""

    value: float
    low: float
    high: float
    n: int
    excluded: int = 0  # values left out as not finite (mean_ci)

    def as_dict(self) -> dict[str, float | int | None]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        out: dict[str, float | int | None] = {
            "value": clean(self.value), "ci_low": clean(self.low), "ci_high": clean(self.high),
            "n": self.n,
        }  # fmt: skip
        if self.excluded:
            out["excluded"] = self.excluded
        return out


def bootstrap_ci(
    statistic: Callable[[npt.NDArray[np.intp]], float],
    n: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``statistic(indices)`` on all ``n`` patients, and its percentile interval over
    ``n_resamples`` resamples of the patients with replacement (resamples where the statistic is
    undefined are left out). One patient has no interval (``nan`` bounds): every resample is
    that patient, and a zero-width interval would claim a certainty that is not there."""
    if n < 1:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if not 0 < confidence < 1:
        raise InferenceError(f"confidence: expected in (0, 1), found {confidence}")
    value = float(statistic(np.arange(n)))
    if n < 2:
        return Estimate(value, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        v = float(statistic(rng.integers(0, n, size=n)))
        if math.isfinite(v):
            draws.append(v)
    if not draws:
        return Estimate(value, math.nan, math.nan, n)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(value, float(low), float(high), n)


def mean_ci(
    values: Sequence[float] | Array,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of the finite values and its bootstrap interval (none with fewer than two finite
    values); ``excluded`` counts the values left out (``nan``, ``inf``: see the module
    docstring), ``n`` every value."""
    v = np.asarray(values, dtype=np.float64)

    def stat(idx: npt.NDArray[np.intp]) -> float:
        x = v[idx]
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else math.nan

    est = bootstrap_ci(stat, len(v), n_resamples=n_resamples, confidence=confidence, seed=seed)
    finite = int(np.isfinite(v).sum())
    if finite < 2:  # the mean of one value: no interval, as for one patient
        est = replace(est, low=math.nan, high=math.nan)
    return replace(est, excluded=int(v.size - finite))


def finite_mean(values: Sequence[float] | Array) -> float:
    """The mean of the finite values (``nan`` when there is none), as :func:`mean_ci`."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan
