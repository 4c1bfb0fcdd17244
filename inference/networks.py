"""The two networks of the latent diffusion model, built from MONAI.

Stage 1, :func:`build_autoencoder`: a ``monai.networks.nets.AutoencoderKL`` with one image channel
in and **two channels out**: channel :data:`IMAGE_CHANNEL` is the reconstructed image and channel
:data:`MASK_CHANNEL` the logit of the enhancing-tumour mask. The mask is therefore a *joint output
of the decoder*: whatever latent is decoded (an encoded scan or a sampled post-treatment latent)
comes back as an image plus its tumour segmentation. The mask head is trained on T1-Gd inputs
only (``inference.train.steps.autoencoder_step`` weights it per sample). One autoencoder serves
every contrast (intensities are normalised per image).

Stage 2, :func:`build_unet`: a ``monai.networks.nets.DiffusionModelUNet`` on the latent grid.
Its input is the noisy post-treatment latent followed by the conditioning channels of
:class:`inference.conditioning.ConditioningLayout` (concatenation); its output is the predicted
noise. Survival-class guidance goes through the UNet's class embedding, ``num_class_embeds`` =
number of classes + 1, the last index being the null class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from inference.conditioning import ConditioningLayout
from inference.model_config import ModelConfig

log = logging.getLogger(__name__)

IMAGE_CHANNEL = 0
MASK_CHANNEL = 1
AUTOENCODER_OUT_CHANNELS = 2


def build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    ae = cfg.autoencoder
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=AUTOENCODER_OUT_CHANNELS,
        num_res_blocks=ae.num_res_blocks,
        channels=ae.channels,
        attention_levels=ae.attention_levels,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        with_encoder_nonlocal_attn=ae.with_nonlocal_attn,
        with_decoder_nonlocal_attn=ae.with_nonlocal_attn,
    )


def build_unet(cfg: ModelConfig) -> DiffusionModelUNet:
    un = cfg.diffusion
    layout = ConditioningLayout.from_config(cfg)
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=cfg.autoencoder.latent_channels + layout.num_channels,
        out_channels=cfg.autoencoder.latent_channels,
        num_res_blocks=un.num_res_blocks,
        channels=un.channels,
        attention_levels=un.attention_levels,
        norm_num_groups=un.norm_num_groups,
        num_head_channels=un.num_head_channels,
        num_class_embeds=cfg.num_classes + 1,
    )


def build_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    """The DDIM scheduler of the model (also used to add noise in training: same schedule)."""
    s = cfg.scheduler
    return DDIMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        schedule=s.schedule,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        clip_sample=False,
        prediction_type=s.prediction_type,
    )


@dataclass
class LatentDiffusionModel:
    """The configuration and both networks of one model (mutable: networks move devices)."""

    config: ModelConfig
    autoencoder: AutoencoderKL
    unet: DiffusionModelUNet

    @property
    def layout(self) -> ConditioningLayout:
        return ConditioningLayout.from_config(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> LatentDiffusionModel:
        self.autoencoder.to(device)
        self.unet.to(device)
        return self

    def eval(self) -> LatentDiffusionModel:
        self.autoencoder.eval()
        self.unet.eval()
        return self

    def parameter_bytes(self) -> int:
        """Size of all weights in bytes (float32 as stored)."""
        return sum(
            p.numel() * p.element_size()
            for m in (self.autoencoder, self.unet)
            for p in m.state_dict().values()
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means of images ``(B, 1, k, j, i)`` -> ``(B, L, k/c, j/c, i/c)``."""
        mu, _ = self.autoencoder.encode(images)
        return mu * self.config.latent_scale

    def to_diffusion_space(self, post: torch.Tensor, t1c: torch.Tensor) -> torch.Tensor:
        """What stage 2 generates for a scaled post-treatment latent, given the scaled
        pre-treatment T1-Gd latent (``diffusion.target``: the latent, or the scaled change)."""
        dif = self.config.diffusion
        if dif.target == "residual":
            return (post - t1c) * dif.residual_scale
        return post

    def from_diffusion_space(self, x: torch.Tensor, t1c: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_diffusion_space`: the scaled post-treatment latent of a sample
        ``x`` (``t1c`` broadcasts over the samples of one study)."""
        dif = self.config.diffusion
        if dif.target == "residual":
            return t1c + x / dif.residual_scale
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``(B, 2, ...)``: image and tumour-mask logit."""
        out: torch.Tensor = self.autoencoder.decode(latents / self.config.latent_scale)
        return out


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> LatentDiffusionModel:
    """Both networks, freshly initialised (``seed`` makes the initial weights reproducible)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae, unet = build_autoencoder(cfg), build_unet(cfg)
    else:
        ae, unet = build_autoencoder(cfg), build_unet(cfg)
    model = LatentDiffusionModel(cfg, ae, unet)
    log.debug("built %s: %.2f MB of weights", cfg.name, model.parameter_bytes() / 1e6)
    return model
