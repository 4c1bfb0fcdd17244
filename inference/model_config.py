"""Typed, frozen configuration of the latent diffusion model, and its ``model.yaml`` mapping.

A :class:`ModelConfig` says everything needed to rebuild the networks and to prepare their inputs:
which contrasts go in, the model grid (spacing and crop), the architecture of the KL autoencoder
(stage 1) and of the diffusion UNet (stage 2), the noise schedule, the survival classes used for
classifier-free guidance, the conditioning dropout used in training and the defaults of inference.

:func:`config_to_dict` and :func:`config_from_dict` map it to and from plain YAML-friendly data;
the reader is strict: an unknown key, a missing key or a value of the wrong type is reported with
its dotted key path (``autoencoder.channels``), what was expected and what was found.

Three presets: :func:`tiny_config` (16^3 volumes, tests: a training step takes milliseconds on a
CPU), :func:`demo_config` (4 mm, trainable on a CPU, the bundled model) and :func:`fine_config`
(2 mm, trained on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dicom_node.errors import InferenceError

#: contrast names, as assigned to series roles by the node
KNOWN_CONTRASTS: tuple[str, ...] = ("t1c", "flair", "t2", "t1")
#: the contrast that every model needs and predicts
REQUIRED_CONTRAST = "t1c"


@dataclass(frozen=True)
class PreprocessingConfig:
    """How a study is put on the model grid (see ``dicom_node.convert.preprocess``).

    ``spacing_mm`` is (di, dj, dk); ``crop_shape`` is [k, j, i] like the arrays. Intensities are
    normalised per image inside the head (``intensity``: ``zscore`` or ``percentile``); the dose
    is divided by ``dose_scale_gy`` so that the prescription is about 1.
    """

    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    crop_shape: tuple[int, int, int] = (80, 96, 80)
    orientation: str = "RAS"
    intensity: str = "zscore"
    dose_scale_gy: float = 60.0


@dataclass(frozen=True)
class AutoencoderConfig:
    """Stage 1: ``monai.networks.nets.AutoencoderKL``.

    One image channel in; two channels out: the reconstructed image and the logit of the
    enhancing-tumour mask (the joint mask channel, see ``inference.networks``). Each level after
    the first halves the grid, so ``len(channels) == 3`` gives the 4x compression.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    latent_channels: int = 3
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 16
    with_nonlocal_attn: bool = False


DIFFUSION_TARGETS = ("latent", "residual")


@dataclass(frozen=True)
class DiffusionConfig:
    """Stage 2: ``monai.networks.nets.DiffusionModelUNet`` on the latent grid.

    ``target`` is what the diffusion generates: ``latent``, the post-treatment latent itself, or
    ``residual``, its change from the pre-treatment T1-Gd latent times ``residual_scale`` (so
    that the change, small next to the latent, has about unit variance; "no change" is then the
    zero of the diffusion space, and a sampling error is divided by the scale before decoding).
    """

    channels: tuple[int, ...] = (64, 128, 128)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = 32
    num_head_channels: int = 32
    target: str = "latent"
    residual_scale: float = 1.0


#: what the stage-2 UNet may be trained to predict (``scheduler.prediction_type``)
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule (DDPM training, DDIM sampling) and what the UNet predicts.

    ``prediction_type``: ``epsilon`` (the noise) or ``v_prediction`` (the velocity
    ``v = sqrt(a) eps - sqrt(1 - a) x0`` of Salimans and Ho 2022, arXiv:2202.00512, with ``a``
    the cumulative alpha). At the noisiest steps an epsilon network's estimate of ``x0`` divides
    by ``sqrt(a)`` (0.07 at the last step of the default schedule) and amplifies its errors; a
    velocity network's does not.
    """

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    num_inference_steps: int = 25
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class TrainingConfig:
    """Condition dropout while training stage 2, and the stage-1 loss weights.

    ``p_drop_contrast`` is the probability of hiding each optional contrast (FLAIR...) from a
    training sample, ``p_drop_dose`` that of hiding the dose, ``p_drop_class`` that of replacing
    the survival class by the null class (classifier-free guidance). ``autoencoder_patch``
    ([k, j, i], empty: the whole crop) trains stage 1, which is fully convolutional, on random
    patches of that size, half of them centred on the tumour: a CPU-sized step.
    ``ema_decay`` (0: off) keeps an exponential moving average of the stage-2 UNet's weights
    while it trains, and the model directory gets the average: a denoiser with less of the
    last batches' noise in it. ``tumour_loss_weight`` (0: off) weights the stage-2 loss by
    ``1 + w`` on the latent voxels that touch the tumour mask, where the treatment changes the
    image, and 1 elsewhere.
    """

    p_drop_contrast: float = 0.3
    p_drop_dose: float = 0.3
    p_drop_class: float = 0.15
    kl_weight: float = 1e-6
    mask_loss_weight: float = 1.0
    autoencoder_patch: tuple[int, ...] = ()
    ema_decay: float = 0.0
    tumour_loss_weight: float = 0.0


@dataclass(frozen=True)
class InferenceConfig:
    """Defaults of one prediction.

    ``unknown_class`` says how a study is predicted when no survival class is given (the node's
    case: survival is what nobody knows yet): ``null_class``, every sample under the null class
    (unguided); ``marginal``, the samples spread over the survival classes by stratified draws
    from ``ModelConfig.survival_class_prior`` and each one guided by its class, so that the
    samples show the outcomes of every class in proportion (see ``inference.predict``).
    """

    num_samples: int = 4
    guidance_scale: float = 3.0
    mask_threshold: float = 0.5
    eta: float = 0.0
    unknown_class: str = "null_class"


#: the values of ``inference.unknown_class``
UNKNOWN_CLASS_MODES = ("null_class", "marginal")
# how the sampling loop may run the diffusion UNet: plain, or a torch.compile mode
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class ResponseConfig:
    """Volumetric response categories (on the enhancing tumour volume).

    Complete response below ``complete_ml``; otherwise partial response for a relative change
    <= ``partial``, progressive disease for >= ``progressive``, stable disease between.
    """

    complete_ml: float = 0.1
    partial: float = -0.65
    progressive: float = 0.40


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines one model (written to ``model.yaml``).

    ``contrasts`` lists the pre-treatment contrasts the model reads, ``t1c`` first (required);
    the others (e.g. ``flair``) are optional at inference and flagged when missing. ``use_dose``
    says whether the RT dose is a conditioning input (optional at inference, flagged).
    ``survival_classes`` are the guidance classes; the class embedding has one more entry, the
    null class. ``latent_scale`` multiplies the autoencoder latents before diffusion (set after
    stage-1 training so that latents have unit variance). ``survival_class_prior``: the share of
    each survival class among the stage-2 training patients (empty: equal shares), written by
    ``train diffusion``; the ``marginal`` mode of inference draws the classes from it.
    """

    name: str = "glioforecast-ldm"
    version: str = "0.0.0"
    contrasts: tuple[str, ...] = ("t1c", "flair")
    use_dose: bool = True
    survival_classes: tuple[str, ...] = ("short", "intermediate", "long")
    survival_class_prior: tuple[float, ...] = ()
    latent_scale: float = 1.0
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)

    def __post_init__(self) -> None:
        problems = validate_config(self)
        if problems:
            raise InferenceError(
                "invalid model configuration:\n" + "\n".join(f"  - {p}" for p in problems)
            )

    # derived quantities -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of survival classes (without the null class)."""
        return len(self.survival_classes)

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class in the class embedding."""
        return len(self.survival_classes)

    @property
    def optional_contrasts(self) -> tuple[str, ...]:
        return self.contrasts[1:]

    @property
    def compression(self) -> int:
        """Spatial down-sampling factor of the autoencoder."""
        return int(2 ** (len(self.autoencoder.channels) - 1))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.compression
        k, j, i = self.preprocessing.crop_shape
        return (k // c, j // c, i // c)

    @property
    def voxel_volume_ml(self) -> float:
        return float(math.prod(self.preprocessing.spacing_mm)) / 1000.0

    def class_index(self, survival_class: str | None) -> int:
        """Embedding index of a survival class name; ``None`` is the null class."""
        if survival_class is None:
            return self.null_class
        try:
            return self.survival_classes.index(survival_class)
        except ValueError:
            raise InferenceError(
                f"unknown survival class {survival_class!r}: expected one of "
                f"{list(self.survival_classes)} or None"
            ) from None

    def class_prior(self) -> tuple[float, ...]:
        """``survival_class_prior``, or equal shares when it is empty."""
        if self.survival_class_prior:
            return self.survival_class_prior
        return tuple(1.0 / self.num_classes for _ in self.survival_classes)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_training(self, **changes: Any) -> ModelConfig:
        """A copy with some fields of the ``training`` section changed (validated again)."""
        return self.replace(training=dataclasses.replace(self.training, **changes))


def validate_config(cfg: ModelConfig) -> list[str]:
    """Consistency problems of a configuration (empty when it is usable)."""
    p: list[str] = []
    if not cfg.name.strip():
        p.append("name: expected a non-empty string, found an empty one")
    if not cfg.version.strip():
        p.append("version: expected a non-empty string, found an empty one")
    if not cfg.contrasts or cfg.contrasts[0] != REQUIRED_CONTRAST:
        p.append(f"contrasts: expected {REQUIRED_CONTRAST!r} first, found {list(cfg.contrasts)}")
    for c in cfg.contrasts:
        if c not in KNOWN_CONTRASTS:
            p.append(f"contrasts: unknown contrast {c!r}, expected among {list(KNOWN_CONTRASTS)}")
    if len(set(cfg.contrasts)) != len(cfg.contrasts):
        p.append(f"contrasts: duplicates in {list(cfg.contrasts)}")
    if not cfg.survival_classes:
        p.append("survival_classes: expected at least one class, found none")
    if len(set(cfg.survival_classes)) != len(cfg.survival_classes):
        p.append(f"survival_classes: duplicates in {list(cfg.survival_classes)}")
    prior = cfg.survival_class_prior
    if prior and (
        len(prior) != len(cfg.survival_classes)
        or not all(math.isfinite(x) and x >= 0 for x in prior)
        or abs(sum(prior) - 1.0) > 1e-3
    ):
        p.append(
            f"survival_class_prior: expected empty or {len(cfg.survival_classes)} shares >= 0 "
            f"summing to 1 (one per survival class), found {list(prior)}"
        )
    if not cfg.latent_scale > 0:
        p.append(f"latent_scale: expected a positive number, found {cfg.latent_scale}")
    pre = cfg.preprocessing
    if len(pre.spacing_mm) != 3 or min(pre.spacing_mm) <= 0:
        p.append(f"preprocessing.spacing_mm: expected 3 positive numbers, found {pre.spacing_mm}")
    if pre.intensity not in ("zscore", "percentile"):
        p.append(f"preprocessing.intensity: expected zscore or percentile, found {pre.intensity!r}")
    if not pre.dose_scale_gy > 0:
        p.append(f"preprocessing.dose_scale_gy: expected > 0, found {pre.dose_scale_gy}")
    ae = cfg.autoencoder
    if len(ae.channels) < 2:
        p.append(f"autoencoder.channels: expected at least 2 levels, found {list(ae.channels)}")
    if len(ae.attention_levels) != len(ae.channels):
        p.append(
            f"autoencoder.attention_levels: expected {len(ae.channels)} values (one per level), "
            f"found {len(ae.attention_levels)}"
        )
    for ch in ae.channels:
        if ch <= 0 or ch % ae.norm_num_groups:
            p.append(
                f"autoencoder.channels: expected multiples of norm_num_groups="
                f"{ae.norm_num_groups}, found {list(ae.channels)}"
            )
            break
    if ae.latent_channels < 1:
        p.append(f"autoencoder.latent_channels: expected >= 1, found {ae.latent_channels}")
    if ae.num_res_blocks < 1:
        p.append(f"autoencoder.num_res_blocks: expected >= 1, found {ae.num_res_blocks}")
    un = cfg.diffusion
    if len(un.attention_levels) != len(un.channels):
        p.append(
            f"diffusion.attention_levels: expected {len(un.channels)} values (one per level), "
            f"found {len(un.attention_levels)}"
        )
    for ch in un.channels:
        if ch <= 0 or ch % un.norm_num_groups:
            p.append(
                f"diffusion.channels: expected multiples of norm_num_groups="
                f"{un.norm_num_groups}, found {list(un.channels)}"
            )
            break
    if un.num_res_blocks < 1:
        p.append(f"diffusion.num_res_blocks: expected >= 1, found {un.num_res_blocks}")
    if un.num_head_channels < 1:
        p.append(f"diffusion.num_head_channels: expected >= 1, found {un.num_head_channels}")
    if un.target not in DIFFUSION_TARGETS:
        p.append(
            f"diffusion.target: expected one of {list(DIFFUSION_TARGETS)}, found {un.target!r}"
        )
    if not (math.isfinite(un.residual_scale) and un.residual_scale > 0):
        p.append(f"diffusion.residual_scale: expected a number > 0, found {un.residual_scale}")
    # the crop must go through both networks without rounding
    if len(pre.crop_shape) == 3 and len(ae.channels) >= 1 and len(un.channels) >= 1:
        factor = 2 ** (len(ae.channels) - 1) * 2 ** (len(un.channels) - 1)
        if any(s <= 0 or s % factor for s in pre.crop_shape):
            p.append(
                f"preprocessing.crop_shape: expected multiples of {factor} (autoencoder and UNet "
                f"down-sampling), found {list(pre.crop_shape)}"
            )
    else:
        p.append(f"preprocessing.crop_shape: expected 3 sizes, found {pre.crop_shape}")
    patch = cfg.training.autoencoder_patch
    if patch and (
        len(patch) != 3
        or len(pre.crop_shape) != 3
        or any(
            s <= 0 or s % cfg.compression or s > c
            for s, c in zip(patch, pre.crop_shape, strict=True)
        )
    ):
        p.append(
            "training.autoencoder_patch: expected empty or 3 sizes, multiples of "
            f"{cfg.compression} and within the crop {list(pre.crop_shape)}, found {list(patch)}"
        )
    sch = cfg.scheduler
    if sch.num_train_timesteps < 2:
        p.append(f"scheduler.num_train_timesteps: expected >= 2, found {sch.num_train_timesteps}")
    if not 1 <= sch.num_inference_steps <= sch.num_train_timesteps:
        p.append(
            f"scheduler.num_inference_steps: expected 1..{sch.num_train_timesteps}, "
            f"found {sch.num_inference_steps}"
        )
    if sch.schedule not in ("linear_beta", "scaled_linear_beta"):
        p.append(
            "scheduler.schedule: expected linear_beta or scaled_linear_beta, "
            f"found {sch.schedule!r}"
        )
    if sch.prediction_type not in PREDICTION_TYPES:
        p.append(
            f"scheduler.prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, "
            f"found {sch.prediction_type!r}"
        )
    if not 0 < sch.beta_start < sch.beta_end < 1:
        p.append(
            f"scheduler.beta_start/beta_end: expected 0 < start < end < 1, "
            f"found {sch.beta_start}, {sch.beta_end}"
        )
    tr = cfg.training
    for key in ("p_drop_contrast", "p_drop_dose", "p_drop_class"):
        v = getattr(tr, key)
        if not 0.0 <= v <= 1.0:
            p.append(f"training.{key}: expected a probability in [0, 1], found {v}")
    if not 0.0 <= tr.ema_decay < 1.0:
        p.append(f"training.ema_decay: expected 0 (off) or a decay in (0, 1), found {tr.ema_decay}")
    if not tr.tumour_loss_weight >= 0.0:
        p.append(
            f"training.tumour_loss_weight: expected >= 0 (0: off), found {tr.tumour_loss_weight}"
        )
    inf = cfg.inference
    if inf.num_samples < 1:
        p.append(f"inference.num_samples: expected >= 1, found {inf.num_samples}")
    if not 0.0 < inf.mask_threshold < 1.0:
        p.append(f"inference.mask_threshold: expected in (0, 1), found {inf.mask_threshold}")
    if inf.eta < 0:
        p.append(f"inference.eta: expected >= 0, found {inf.eta}")
    if inf.unknown_class not in UNKNOWN_CLASS_MODES:
        p.append(
            f"inference.unknown_class: expected one of {', '.join(UNKNOWN_CLASS_MODES)}, "
            f"found {inf.unknown_class!r}"
        )
    rs = cfg.response
    if not rs.partial < 0 < rs.progressive:
        p.append(
            f"response: expected partial < 0 < progressive, found {rs.partial}, {rs.progressive}"
        )
    if rs.complete_ml < 0:
        p.append(f"response.complete_ml: expected >= 0, found {rs.complete_ml}")
    return p


# ------------------------------------------------------------------------------------------
# presets


def tiny_config(**changes: Any) -> ModelConfig:
    """A model small enough for unit tests: 16^3 volumes, 4^3 latents, a few thousand weights."""
    cfg = ModelConfig(
        name="glioforecast-tiny",
        version="0.0.0-test",
        preprocessing=PreprocessingConfig(spacing_mm=(8.0, 8.0, 8.0), crop_shape=(16, 16, 16)),
        autoencoder=AutoencoderConfig(
            channels=(8, 8, 8),
            num_res_blocks=1,
            latent_channels=2,
            attention_levels=(False, False, False),
            norm_num_groups=4,
            with_nonlocal_attn=False,
        ),
        diffusion=DiffusionConfig(
            channels=(8, 16),
            num_res_blocks=1,
            attention_levels=(False, True),
            norm_num_groups=4,
            num_head_channels=8,
        ),
        scheduler=SchedulerConfig(num_train_timesteps=100, num_inference_steps=5),
        inference=InferenceConfig(num_samples=2, guidance_scale=3.0),
    )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def demo_config(**changes: Any) -> ModelConfig:
    """The bundled demo model: 4 mm grid of 40x48x40 (160x192x160 mm), 4x latent compression.

    Sized so that both stages train on a 2-core CPU in a few hours on synthetic patients (200
    for stage 1, 1000 for stage 2 since 0.6.0) and 4 samples with guidance take seconds: a
    16-32-32 autoencoder to a 4-channel 10x12x10 latent (trained on 24^3 patches, then
    fine-tuned on whole crops: group norm sees other statistics on a patch), a 32-64 diffusion
    UNet with attention on its 5x6x5 level that generates the change from the pre-treatment
    latent; 2.1 M weights, 8.2 MB of float32.
    ``residual_scale`` 2.5: that change had a standard deviation of 0.41 (scaled latent units)
    on 40 training patients with the bundled autoencoder. Stage 2 predicts the velocity, with
    its loss weighted 5x on the tumour's latent voxels and a weight average (0.5.0 on).
    Without a survival class it samples from the mixture of the classes (by the training
    cohort's shares) at guidance scale 1, rather than under the null class at scale 3 (0.8.0
    on, picked on validation). From 0.9.0 stage 2 is fine-tuned on four outcomes of each training
    patient (``glioforecast synth --outcome-draws 4``); 0.11.0's UNet lies halfway between that
    run's weight average and its last weights (``python -m inference.train.interpolate``); see
    ``docs/MODEL_CARD.md``.
    """
    cfg = ModelConfig(
        name="glioforecast-demo",
        version="0.11.0",
        preprocessing=PreprocessingConfig(spacing_mm=(4.0, 4.0, 4.0), crop_shape=(40, 48, 40)),
        autoencoder=AutoencoderConfig(
            channels=(16, 32, 32),
            num_res_blocks=1,
            latent_channels=4,
            attention_levels=(False, False, False),
            norm_num_groups=16,
            with_nonlocal_attn=False,
        ),
        diffusion=DiffusionConfig(
            channels=(32, 64),
            num_res_blocks=1,
            attention_levels=(False, True),
            norm_num_groups=16,
            num_head_channels=32,
            target="residual",
            residual_scale=2.5,
        ),
        scheduler=SchedulerConfig(
            num_train_timesteps=1000, num_inference_steps=20, prediction_type="v_prediction"
        ),
        training=TrainingConfig(
            autoencoder_patch=(24, 24, 24),
            ema_decay=0.995,
            tumour_loss_weight=4.0,
        ),
        inference=InferenceConfig(guidance_scale=1.0, unknown_class="marginal"),
    )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def fine_config(**changes: Any) -> ModelConfig:
    """2 mm grid of 80x96x80, 4x latent compression: the finer model, for training on a GPU.

    Sampling fits the CPU target (4 samples with guidance in well under a minute on 2 cores),
    but training it on a CPU takes days; about 15 MB of float32 weights. It takes the settings
    the demo model's rounds chose on validation (velocity prediction, the loss weighted 5x on
    the tumour, a weight average, the class mixture at guidance scale 1 when no class is
    given), carried over, not chosen for this model; the autoencoder trains on 48^3 patches
    (the demo's 24^3 at twice the resolution) before a fine-tune on whole crops. Its residual
    target takes the demo model's ``residual_scale``; ``train diffusion`` logs the spread of
    the targets and the scale that would make it 1.
    """
    demo = demo_config()
    cfg = ModelConfig(
        name="glioforecast-fine",
        version="0.1.0",
        preprocessing=PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0), crop_shape=(80, 96, 80)),
        autoencoder=AutoencoderConfig(
            channels=(16, 32, 64),
            num_res_blocks=1,
            latent_channels=3,
            attention_levels=(False, False, False),
            norm_num_groups=16,
            with_nonlocal_attn=False,
        ),
        diffusion=DiffusionConfig(
            channels=(32, 64, 64),
            num_res_blocks=1,
            attention_levels=(False, False, True),
            norm_num_groups=16,
            num_head_channels=32,
            target="residual",
            residual_scale=2.5,
        ),
        # the demo's learned settings, the autoencoder patch at twice the resolution
        scheduler=demo.scheduler,
        training=dataclasses.replace(demo.training, autoencoder_patch=(48, 48, 48)),
        inference=demo.inference,
    )
    return dataclasses.replace(cfg, **changes) if changes else cfg


PRESETS = {"tiny": tiny_config, "demo": demo_config, "fine": fine_config}


def preset(name: str) -> ModelConfig:
    """A preset configuration by name (``tiny``, ``demo`` or ``fine``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise InferenceError(
            f"unknown model preset {name!r}: expected one of {sorted(PRESETS)}"
        ) from None


# ------------------------------------------------------------------------------------------
# plain-data mapping (model.yaml)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A configuration dataclass as plain data (tuples become lists), field order kept."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def config_from_dict(
    data: Mapping[str, Any],
    *,
    source: str = "model configuration",
    other_keys: tuple[str, ...] = (),
) -> ModelConfig:
    """Build a :class:`ModelConfig` from plain data, strictly.

    Missing keys take their defaults only in nested sections; unknown keys and wrong types are
    errors. Every problem is collected and reported in one :class:`InferenceError` naming the
    dotted key, what was expected and what was found. ``other_keys`` are top-level keys that
    the caller handles itself (named in the unknown-key message, e.g. ``weights``).
    """
    problems: list[str] = []
    kwargs = _parse_dataclass(ModelConfig, data, "", problems, other_keys)
    if problems:
        raise InferenceError(f"{source}:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        return ModelConfig(**kwargs)
    except InferenceError as exc:
        raise InferenceError(f"{source}: {exc}") from None


def _parse_dataclass(
    cls: type, data: Any, prefix: str, problems: list[str], other_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "top level"
        problems.append(f"{where}: expected a mapping, found {type(data).__name__}")
        return {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            allowed = ", ".join([*other_keys, *names])
            problems.append(f"{prefix}{key}: unknown key (expected one of {allowed})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            sub = _parse_dataclass(tp, value, key + ".", problems)
            try:
                kwargs[f.name] = tp(**sub)
            except TypeError as exc:  # pragma: no cover - all fields have defaults
                problems.append(f"{key}: {exc}")
        else:
            ok, converted = _convert(tp, value)
            if ok:
                kwargs[f.name] = converted
            else:
                problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}")
    return kwargs


def _convert(tp: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is bool:
        return (isinstance(value, bool), value)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool), value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (math.isfinite(float(value)), float(value))
        return (False, None)
    if tp is str:
        return (isinstance(value, str), value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return (False, None)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(args) != len(value):
                return (False, None)
            item_types = list(args)
        out = []
        for item_tp, item in zip(item_types, value, strict=True):
            ok, conv = _convert(item_tp, item)
            if not ok:
                return (False, None)
            out.append(conv)
        return (True, tuple(out))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return (True, None)
            ok, conv = _convert(arg, value)
            if ok:
                return (True, conv)
        return (False, None)
    return (False, None)  # pragma: no cover - no other field types exist


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return str(tp)


def parse_dataclass_fields(
    cls: type,
    data: Any,
    prefix: str,
    problems: list[str],
    other_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Strictly parse ``data`` into keyword arguments of the dataclass ``cls`` (nested
    dataclasses built), appending one line per problem (dotted key, expected, found) to
    ``problems``; shared by other model kinds' ``model.yaml`` readers."""
    return _parse_dataclass(cls, data, prefix, problems, other_keys)
