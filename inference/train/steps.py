"""One optimisation step of each stage, as plain functions.

The training commands loop over these; everything random (latent sampling of the autoencoder,
diffusion timesteps and noise, condition dropout) is drawn from the ``torch.Generator`` passed in,
so a step is reproducible given the model, the optimiser state, the batch and the generator.

Stage 1 (:func:`autoencoder_step`): L1 reconstruction of the image channel + ``kl_weight`` x KL
divergence of the latent + ``mask_loss_weight`` x (BCE + soft Dice) of the tumour-mask channel
against the enhancing-tumour mask, on the samples where it applies (T1-Gd images; other contrasts
have ``mask_weight`` 0). No perceptual or adversarial loss here.

Stage 2 (:func:`diffusion_step`): MSE of the UNet's noise (or velocity, ``scheduler.
prediction_type``) estimate on the noisy post-treatment latent concatenated with the
conditioning, after dropping optional inputs and class labels with the configured
probabilities; optionally weighted towards the tumour (``training.tumour_loss_weight``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import Scheduler

from dicom_node.errors import InferenceError
from inference.conditioning import (
    availability,
    build_conditioning,
    drop_class_labels,
    drop_inputs,
    to_latent_grid,
)
from inference.networks import IMAGE_CHANNEL, MASK_CHANNEL, LatentDiffusionModel, build_scheduler
from inference.sampler import autocast_context

log = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True)
class StepResult:
    """Loss of one step (before the update) and its parts."""

    loss: float
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AutoencoderBatch:
    """``image`` ``(B, 1, k, j, i)`` normalised; ``mask`` the enhancing-tumour target of the same
    shape (``None``: no mask loss); ``mask_weight`` ``(B,)``: 1 where the mask target applies
    (T1-Gd images), 0 elsewhere (default: all 1 when a mask is given)."""

    image: torch.Tensor
    mask: torch.Tensor | None = None
    mask_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class DiffusionBatch:
    """Stage-2 training batch, latents already encoded and scaled.

    ``target``: post-treatment T1-Gd latent ``(B, L, *latent_shape)``; ``latents``: pre-treatment
    latents by contrast; ``mask`` and ``dose`` ``(B, 1, ...)`` on the image or latent grid (dose
    divided by ``dose_scale_gy``); ``class_labels`` ``(B,)`` survival class indices (the null class
    where unknown); ``available``: per-sample availability of optional inputs when some samples
    of the batch lack one (zeros in their tensor).
    """

    target: torch.Tensor
    latents: Mapping[str, torch.Tensor | None]
    mask: torch.Tensor
    class_labels: torch.Tensor
    dose: torch.Tensor | None = None
    available: Mapping[str, torch.Tensor] | None = None


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent voxels, averaged over the batch."""
    var = z_sigma.float().pow(2)
    kl = 0.5 * (z_mu.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(dim=1).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample ``1 - Dice`` of sigmoid(logits) against a binary target, shape ``(B,)``."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return 1.0 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


def autoencoder_losses(
    autoencoder: AutoencoderKL,
    batch: AutoencoderBatch,
    generator: torch.Generator | None,
    *,
    kl_weight: float = 1e-6,
    mask_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-1 loss (with graph) and its parts; the latent is sampled with ``generator``."""
    image = batch.image
    if image.ndim != 5 or image.shape[1] != 1:
        raise InferenceError(
            f"autoencoder batch: expected (B, 1, k, j, i), found {tuple(image.shape)}"
        )
    z_mu, z_sigma = autoencoder.encode(image)
    gen_device = generator.device if generator is not None else z_mu.device
    eps = torch.randn(z_mu.shape, generator=generator, device=gen_device).to(z_mu)
    out = autoencoder.decode(z_mu + eps * z_sigma)
    recon = out[:, IMAGE_CHANNEL : IMAGE_CHANNEL + 1].float()
    l1 = F.l1_loss(recon, image.float())
    kl = kl_divergence(z_mu, z_sigma)
    loss = l1 + kl_weight * kl
    parts = {"l1": float(l1.detach()), "kl": float(kl.detach())}
    if batch.mask is not None:
        if batch.mask.shape != image.shape:
            raise InferenceError(
                f"autoencoder batch: mask shape {tuple(batch.mask.shape)} differs from the "
                f"image's {tuple(image.shape)}"
            )
        logits = out[:, MASK_CHANNEL : MASK_CHANNEL + 1].float()
        target = batch.mask.float()
        weight = (
            torch.ones(image.shape[0], device=image.device)
            if batch.mask_weight is None
            else batch.mask_weight.to(image.device, torch.float32).reshape(-1)
        )
        bce = (
            F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
        )
        dice = soft_dice_loss(logits, target)
        denom = weight.sum().clamp_min(1.0)
        mask_loss = ((bce + dice) * weight).sum() / denom
        loss = loss + mask_loss_weight * mask_loss
        parts["mask"] = float(mask_loss.detach())
    return loss, parts


def autoencoder_step(
    autoencoder: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    batch: AutoencoderBatch,
    generator: torch.Generator | None = None,
    *,
    kl_weight: float = 1e-6,
    mask_loss_weight: float = 1.0,
    autocast: str = "none",
    grad_clip: float | None = 1.0,
) -> StepResult:
    """One stage-1 update; returns the loss before the update. ``autocast``: ``none``, ``auto``
    or ``bf16`` (bf16 on CUDA only; fp16 is refused: it would need a gradient scaler)."""
    autoencoder.train()
    optimizer.zero_grad(set_to_none=True)
    with _training_autocast(batch.image.device, autocast):
        loss, parts = autoencoder_losses(
            autoencoder, batch, generator, kl_weight=kl_weight, mask_loss_weight=mask_loss_weight
        )
    _check_finite(loss, "autoencoder")
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), grad_clip)
    optimizer.step()
    return StepResult(loss=float(loss.detach()), parts=parts)


def diffusion_loss(
    model: LatentDiffusionModel,
    batch: DiffusionBatch,
    generator: torch.Generator | None,
    *,
    scheduler: Scheduler | None = None,
    p_drop_contrast: float | None = None,
    p_drop_dose: float | None = None,
    p_drop_class: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-2 loss (with graph): MSE of the noise or velocity estimate, tumour-weighted when
    configured; ``parts["mse"]`` is the unweighted MSE. Dropout probabilities default to the model's
    training configuration; pass 0 to disable."""
    cfg = model.config
    tr = cfg.training
    p_contrast = tr.p_drop_contrast if p_drop_contrast is None else p_drop_contrast
    p_dose = tr.p_drop_dose if p_drop_dose is None else p_drop_dose
    p_class = tr.p_drop_class if p_drop_class is None else p_drop_class
    scheduler = scheduler if scheduler is not None else build_scheduler(cfg)
    layout = model.layout
    target = batch.target
    b = target.shape[0]
    expected = (cfg.autoencoder.latent_channels, *layout.latent_shape)
    if tuple(target.shape[1:]) != expected:
        raise InferenceError(
            f"diffusion batch: target latent expected (B, {expected}), found {tuple(target.shape)}"
        )
    device = target.device
    avail = availability(layout, batch.latents, batch.dose, b, device)
    if batch.available is not None:
        for name, flags in batch.available.items():
            if name in avail:
                avail[name] = avail[name] & flags.to(device=device, dtype=torch.bool)
    avail = drop_inputs(layout, avail, p_contrast, p_dose, generator)
    cond = build_conditioning(layout, batch.latents, batch.mask, batch.dose, available=avail)
    labels = batch.class_labels.to(device=device, dtype=torch.long)
    if labels.shape != (b,) or int(labels.min()) < 0 or int(labels.max()) > cfg.null_class:
        raise InferenceError(
            f"diffusion batch: class labels expected ({b},) in 0..{cfg.null_class}, "
            f"found {labels.tolist()}"
        )
    labels = drop_class_labels(labels, cfg.null_class, p_class, generator)

    gen_device = generator.device if generator is not None else device
    t = torch.randint(
        0, cfg.scheduler.num_train_timesteps, (b,), generator=generator, device=gen_device
    ).to(device)
    noise = torch.randn(target.shape, generator=generator, device=gen_device).to(target)
    noisy = scheduler.add_noise(original_samples=target, noise=noise, timesteps=t)
    pred = model.unet(torch.cat([noisy, cond], dim=1), timesteps=t, class_labels=labels)
    v = cfg.scheduler.prediction_type == "v_prediction"
    aim = scheduler.get_velocity(target, noise, t) if v else noise
    squared = (pred.float() - aim.float()) ** 2
    if tr.tumour_loss_weight > 0:
        # the conditioning already holds the mask on the latent grid: no second interpolation
        mask_channel = layout.channel("mask")
        on_latent = cond[:, mask_channel : mask_channel + 1]
        weight = tumour_weight(on_latent, layout.latent_shape, tr.tumour_loss_weight)
        loss = (squared * weight).sum() / (weight.sum() * squared.shape[1])
    else:
        loss = squared.mean()
    parts = {
        "mse": float(squared.detach().mean()),
        "null_class_fraction": float((labels == cfg.null_class).float().mean()),
    }
    return loss, parts


def tumour_weight(mask: torch.Tensor, latent_shape: tuple[int, int, int], w: float) -> torch.Tensor:
    """Per-voxel weight ``(B, 1, *latent_shape)`` of the stage-2 loss: ``1 + w`` on the latent
    voxels that hold any of the tumour mask (given on the image or the latent grid), 1
    elsewhere."""
    touched = to_latent_grid(mask.float(), latent_shape) > 0
    return 1.0 + w * touched.float()


def diffusion_step(
    model: LatentDiffusionModel,
    optimizer: torch.optim.Optimizer,
    batch: DiffusionBatch,
    generator: torch.Generator | None = None,
    *,
    scheduler: Scheduler | None = None,
    autocast: str = "none",
    grad_clip: float | None = 1.0,
) -> StepResult:
    """One stage-2 update of ``model.unet`` (the autoencoder is not touched)."""
    model.unet.train()
    optimizer.zero_grad(set_to_none=True)
    with _training_autocast(batch.target.device, autocast):
        loss, parts = diffusion_loss(model, batch, generator, scheduler=scheduler)
    _check_finite(loss, "diffusion")
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), grad_clip)
    optimizer.step()
    return StepResult(loss=float(loss.detach()), parts=parts)


class WeightAverage(Generic[M]):
    """An exponential moving average of a module's weights, updated after each optimiser step.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates ``n``, so
    the average follows the weights closely at first instead of remembering their starting
    point. Floating-point parameters and buffers are averaged; integer buffers are copied.
    ``module`` is the averaged copy (in eval mode, no gradients).
    """

    def __init__(self, module: M, decay: float, updates: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise InferenceError(f"weight average: expected a decay in (0, 1), found {decay}")
        self.decay = decay
        self.updates = updates
        self.module = copy.deepcopy(module).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, live: torch.nn.Module) -> None:
        decay = self.current_decay()
        averaged = self.module.state_dict()
        current = live.state_dict()
        if averaged.keys() != current.keys():
            raise InferenceError("weight average: the module's tensors changed names")
        for name, avg in averaged.items():
            value = current[name].detach().to(avg.device)
            if avg.dtype.is_floating_point:
                avg.lerp_(value.to(avg.dtype), 1.0 - decay)
            else:
                avg.copy_(value)
        self.updates += 1


@torch.no_grad()
def latent_scale_from(latents: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """``1 / std`` of unscaled stage-1 latent means (``autoencoder.encode(x)[0]``) of training
    images: the value to store as ``ModelConfig.latent_scale`` before training stage 2, so that
    the diffusion model sees latents of unit variance (as in the latent diffusion paper)."""
    tensors = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    if not tensors or sum(t.numel() for t in tensors) < 2:
        raise InferenceError("latent scale: expected at least two latent values, found fewer")
    flat = torch.cat([t.detach().float().flatten().cpu() for t in tensors])
    std = float(flat.std())
    if not std > 0 or not torch.isfinite(torch.tensor(std)):
        raise InferenceError(f"latent scale: expected latents with a positive spread, found {std}")
    return 1.0 / std


def _training_autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager[None]:
    """Autocast for a training step: bf16 only (fp16 would need a gradient scaler)."""
    if mode == "fp16":
        raise InferenceError("training autocast: expected auto, bf16 or none, found 'fp16'")
    return autocast_context(device, mode)


def _check_finite(loss: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(loss):
        raise InferenceError(f"{stage} training: expected a finite loss, found {float(loss)}")
