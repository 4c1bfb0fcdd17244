"""One prediction on the model grid: N samples -> mean, uncertainty, tumour mask, volumes, response.

Inputs are arrays already on the model grid (``crop_shape`` at ``spacing_mm``, see
``dicom_node.convert.preprocess``): the normalised pre-treatment T1-Gd, optionally the FLAIR, the
pre-treatment tumour mask and optionally the RT dose in Gy. The outputs are numpy arrays on the
same grid, in the same normalised intensity units (the node maps them back to the source grid and
inverts the T1-Gd's intensity scaling, then builds ``dicom_node.types.Prediction``).

How the predicted tumour is produced: the autoencoder decodes every latent to two channels, the
image and a tumour-mask logit (``inference.networks``), trained against the enhancing tumour. For
each sample the mask probability is ``sigmoid(logit)``; a sample's tumour is where its probability
is >= ``mask_threshold`` (0.5 by default), and its volume is that voxel count times the voxel
volume. The reported tumour mask is where the mean probability over the samples is >= the
threshold (a soft majority vote); ``tumour_probability`` keeps the mean probability itself.

Response categories follow the design's volumetric rule on each sample's volume against the
current volume: complete response below ``complete_ml``, else partial response for a change
<= -65 %, progressive disease for >= +40 %, stable disease otherwise. The probability of a
category is the fraction of samples that fall in it (so the probabilities sum to 1). The
predicted category is the most frequent one; a tie goes to the category of the mean volume
(``mean_volume_category``; :func:`dicom_node.types.most_frequent_category`).

When no survival class is given, ``inference.unknown_class`` decides the samples' classes: all
the null class (``null_class``), or, with ``marginal``, the classes of stratified draws from the
training cohort's class shares (:func:`stratified_classes`: with shares 0.33 / 0.44 / 0.23 and 4
samples, one short, two intermediate, one long), each sample guided by its own class. Survival
is unknown when the node predicts; a model whose null-class samples all agree (they come from one
mode of the training outcomes) then still shows, in its spread and its category probabilities,
how differently the tumour behaves across the classes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from dicom_node.errors import InferenceError
from dicom_node.types import RESPONSE_CATEGORIES, most_frequent_category
from inference.conditioning import build_conditioning
from inference.metrics import voxel_volume_ml
from inference.model_config import UNKNOWN_CLASS_MODES, ModelConfig, ResponseConfig
from inference.networks import IMAGE_CHANNEL, MASK_CHANNEL, LatentDiffusionModel
from inference.sampler import SamplingOptions, decode_latents, make_generator, sample_latents

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class PredictionInputs:
    """Pre-treatment inputs on the model grid, all ``[k, j, i]`` of the same shape.

    ``t1c`` and ``flair`` are intensity-normalised; ``mask`` is the pre-treatment tumour (boolean
    or a fraction in [0, 1]); ``dose`` is in Gy. ``flair`` and ``dose`` may be missing.
    """

    t1c: npt.NDArray[np.floating]
    mask: npt.NDArray[np.generic]
    flair: npt.NDArray[np.floating] | None = None
    dose: npt.NDArray[np.floating] | None = None

    def __post_init__(self) -> None:
        shape = np.shape(self.t1c)
        if len(shape) != 3:
            raise InferenceError(f"t1c: expected a 3D array, found shape {shape}")
        for name in ("mask", "flair", "dose"):
            arr = getattr(self, name)
            if arr is not None and np.shape(arr) != shape:
                raise InferenceError(
                    f"{name}: expected the t1c shape {shape}, found {np.shape(arr)}"
                )
        for name in ("t1c", "flair", "dose"):
            arr = getattr(self, name)
            if arr is not None and not np.all(np.isfinite(arr)):
                raise InferenceError(f"{name}: expected finite values, found NaN or infinity")

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = np.shape(self.t1c)
        return (int(k), int(j), int(i))


@dataclass(frozen=True)
class ModelPrediction:
    """The outcome of one prediction, on the model grid (see the module docstring)."""

    samples: FloatArray  # (N, k, j, i) predicted post-treatment T1-Gd, normalised units
    sample_mask_probabilities: FloatArray  # (N, k, j, i) sigmoid of the mask channel
    mean: FloatArray  # (k, j, i)
    std: FloatArray  # (k, j, i) voxel-wise standard deviation over the samples
    tumour_probability: FloatArray  # (k, j, i) mean mask probability
    tumour_mask: BoolArray  # (k, j, i)
    sample_volumes_ml: tuple[float, ...]
    current_volume_ml: float
    response_probabilities: dict[str, float]
    survival_class: str | None
    guidance_scale: float
    seed: int
    model_name: str
    model_version: str
    mean_volume_category: str | None = None  # breaks ties: most_frequent_category
    # the survival class of each sample (None: the null class)
    sample_classes: tuple[str | None, ...] = ()

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def predicted_volume_ml(self) -> float:
        return float(np.mean(self.sample_volumes_ml))

    @property
    def response_category(self) -> str:
        return most_frequent_category(self.response_probabilities, self.mean_volume_category)


def tumour_volume_ml(mask: npt.NDArray[np.generic], spacing_mm: Sequence[float]) -> float:
    """Volume of a boolean (or fractional: each voxel counts by its value) mask in millilitres."""
    return float(np.asarray(mask, dtype=np.float64).sum()) * voxel_volume_ml(spacing_mm)


def response_category(
    current_ml: float, predicted_ml: float, rule: ResponseConfig | None = None
) -> str:
    """Volumetric response category of a change from ``current_ml`` to ``predicted_ml``."""
    r = rule or ResponseConfig()
    if predicted_ml < r.complete_ml:
        return "complete_response"
    change = (predicted_ml - current_ml) / max(current_ml, 1e-6)
    if change <= r.partial:
        return "partial_response"
    if change >= r.progressive:
        return "progressive_disease"
    return "stable_disease"


def response_probabilities(
    current_ml: float, sample_volumes_ml: Sequence[float], rule: ResponseConfig | None = None
) -> dict[str, float]:
    """Fraction of samples in each response category (keys: ``RESPONSE_CATEGORIES``)."""
    if not sample_volumes_ml:
        raise InferenceError("response probabilities: expected at least one sample, found none")
    counts = dict.fromkeys(RESPONSE_CATEGORIES, 0)
    for v in sample_volumes_ml:
        counts[response_category(current_ml, v, rule)] += 1
    n = len(sample_volumes_ml)
    return {c: counts[c] / n for c in RESPONSE_CATEGORIES}


def _tensor(array: npt.NDArray[np.generic], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def stratified_classes(prior: Sequence[float], n: int) -> list[int]:
    """The class index of each of ``n`` samples: sample ``i`` takes the class in which the
    cumulative share reaches ``(i + 0.5) / n`` (stratified draws from ``prior``: each class gets
    its share of the samples, rounded, and the order is the classes' order)."""
    if n < 1:
        raise InferenceError(f"samples: expected >= 1, found {n}")
    cumulative = np.cumsum(np.asarray(prior, dtype=np.float64))
    if cumulative.size == 0 or not cumulative[-1] > 0:
        raise InferenceError(f"survival class prior: expected positive shares, found {prior}")
    cumulative /= cumulative[-1]
    points = (np.arange(n) + 0.5) / n
    return [
        int(min(np.searchsorted(cumulative, q, side="left"), cumulative.size - 1)) for q in points
    ]


def sample_class_labels(
    cfg: ModelConfig, survival_class: str | None, n: int, unknown_class: str | None = None
) -> list[int]:
    """The class label of each of ``n`` samples (see the module docstring); ``unknown_class``
    overrides ``cfg.inference.unknown_class``."""
    mode = cfg.inference.unknown_class if unknown_class is None else unknown_class
    if mode not in UNKNOWN_CLASS_MODES:
        raise InferenceError(
            f"unknown_class: expected one of {', '.join(UNKNOWN_CLASS_MODES)}, found {mode!r}"
        )
    if survival_class is not None or mode == "null_class":
        return [cfg.class_index(survival_class)] * n
    return stratified_classes(cfg.class_prior(), n)


@torch.no_grad()
def predict_arrays(
    model: LatentDiffusionModel,
    inputs: PredictionInputs,
    survival_class: str | None = None,
    *,
    num_samples: int | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    seed: int = 0,
    autocast: str = "auto",
    channels_last: bool = False,
    compile_mode: str = "none",
    current_volume_ml: float | None = None,
    current_from: Literal["mask", "model"] = "mask",
    unknown_class: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModelPrediction:
    """Sample ``num_samples`` post-treatment scans (defaults from the model's configuration).

    ``survival_class`` names the guidance class; ``None``: no class is known, and the samples'
    classes follow ``unknown_class`` (default: the model's ``inference.unknown_class``; see the
    module docstring).
    The current tumour volume of the response rule is, with ``current_from="mask"`` (default),
    the input mask's volume on the model grid; with ``"model"``, the volume that the joint mask
    channel finds on the decoded pre-treatment T1-Gd (the same "reader" as the predicted volumes:
    use it when the input mask is a GTV larger than the enhancing tumour);
    ``current_volume_ml`` overrides both. The same ``seed`` on the same device gives the same
    samples. ``autocast``, ``channels_last`` and ``compile_mode``: how the UNet runs
    (:class:`inference.sampler.SamplingOptions`).
    """
    cfg = model.config
    if inputs.shape != cfg.preprocessing.crop_shape:
        raise InferenceError(
            f"inputs: expected the model grid shape {cfg.preprocessing.crop_shape} "
            f"(crop_shape in model.yaml), found {inputs.shape}"
        )
    n = cfg.inference.num_samples if num_samples is None else int(num_samples)
    if n < 1:
        raise InferenceError(f"num_samples: expected >= 1, found {n}")
    w = cfg.inference.guidance_scale if guidance_scale is None else float(guidance_scale)
    options = SamplingOptions.from_config(
        cfg,
        guidance_scale=w,
        autocast=autocast,
        channels_last=channels_last,
        compile=compile_mode,
    )
    if num_inference_steps is not None:
        options = dataclasses.replace(options, num_inference_steps=int(num_inference_steps))
    if current_from not in ("mask", "model"):
        raise InferenceError(f"current_from: expected 'mask' or 'model', found {current_from!r}")
    label_list = sample_class_labels(cfg, survival_class, n, unknown_class)
    device = model.device
    model.eval()

    t1c_latent = model.encode(_tensor(inputs.t1c, device))
    latents: dict[str, torch.Tensor | None] = {"t1c": t1c_latent}
    if inputs.flair is not None:
        if "flair" in cfg.contrasts:
            latents["flair"] = model.encode(_tensor(inputs.flair, device))
        else:
            log.info("the model does not use FLAIR: the FLAIR given is ignored")
    mask_t = _tensor(inputs.mask, device)
    dose_t = (
        None
        if inputs.dose is None
        else _tensor(inputs.dose, device) / cfg.preprocessing.dose_scale_gy
    )
    cond = build_conditioning(model.layout, latents, mask_t, dose_t)
    cond_n = cond.expand(n, *cond.shape[1:]).contiguous()
    labels = torch.tensor(label_list, dtype=torch.long, device=device)
    generator = make_generator(seed, device)
    x = sample_latents(model, cond_n, labels, generator, options, progress=progress)
    z = model.from_diffusion_space(x, t1c_latent)
    decoded = decode_latents(model, z, autocast=autocast).cpu()

    samples = decoded[:, IMAGE_CHANNEL].numpy().astype(np.float32)
    probs = torch.sigmoid(decoded[:, MASK_CHANNEL]).numpy().astype(np.float32)
    thr = cfg.inference.mask_threshold
    spacing = cfg.preprocessing.spacing_mm
    volumes = tuple(tumour_volume_ml(p >= thr, spacing) for p in probs)
    if current_volume_ml is not None:
        current = float(current_volume_ml)
    elif current_from == "model":
        pre = decode_latents(model, t1c_latent, autocast=autocast).cpu()
        current = tumour_volume_ml(torch.sigmoid(pre[0, MASK_CHANNEL]).numpy() >= thr, spacing)
    else:
        current = tumour_volume_ml(inputs.mask, spacing)
    tumour_probability = probs.mean(axis=0).astype(np.float32)
    result = ModelPrediction(
        samples=samples,
        sample_mask_probabilities=probs,
        mean=samples.mean(axis=0).astype(np.float32),
        std=samples.std(axis=0).astype(np.float32),
        tumour_probability=tumour_probability,
        tumour_mask=tumour_probability >= thr,
        sample_volumes_ml=volumes,
        current_volume_ml=current,
        response_probabilities=response_probabilities(current, volumes, cfg.response),
        survival_class=survival_class,
        guidance_scale=w,
        seed=seed,
        model_name=cfg.name,
        model_version=cfg.version,
        mean_volume_category=response_category(current, float(np.mean(volumes)), cfg.response),
        sample_classes=tuple(
            None if i == cfg.null_class else cfg.survival_classes[i] for i in label_list
        ),
    )
    log.info(
        "predicted %d samples (classes %s, w=%.2f): volume %.2f ml (now %.2f ml), %s",
        n,
        ",".join(str(c) for c in result.sample_classes),
        w,
        result.predicted_volume_ml,
        current,
        result.response_category,
    )
    return result


def predict_per_class(
    model: LatentDiffusionModel,
    inputs: PredictionInputs,
    *,
    include_unguided: bool = False,
    **kwargs: object,
) -> dict[str | None, ModelPrediction]:
    """One prediction under each survival class (same seed: paired samples), plus the unguided
    one with ``include_unguided``. Keyword arguments go to :func:`predict_arrays`."""
    classes: list[str | None] = list(model.config.survival_classes)
    if include_unguided:
        classes.append(None)
    return {c: predict_arrays(model, inputs, c, **kwargs) for c in classes}  # type: ignore[arg-type]
