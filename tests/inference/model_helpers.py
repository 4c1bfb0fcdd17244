"""Helpers shared by the model tests: a tiny model and a fixed, hand-made study on its grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from inference.model_config import ModelConfig, tiny_config
from inference.networks import LatentDiffusionModel, build_model
from inference.predict import PredictionInputs

torch.set_num_threads(1)


def tiny_model(seed: int = 0, **changes: object) -> LatentDiffusionModel:
    cfg = tiny_config(**changes)
    return build_model(cfg, seed=seed).eval()


def ball(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float
) -> np.ndarray:
    k, j, i = np.indices(shape, dtype=float)
    d2 = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2
    return d2 <= radius**2


def study(
    cfg: ModelConfig, *, flair: bool = True, dose: bool = True, seed: int = 0
) -> PredictionInputs:
    """A head-like blob with an enhancing ball, its mask, a FLAIR and a dose around the ball."""
    shape = cfg.preprocessing.crop_shape
    rng = np.random.default_rng(seed)
    centre = (shape[0] / 2, shape[1] / 2, shape[2] / 2)
    head = ball(shape, centre, min(shape) * 0.45)
    tumour = ball(shape, (shape[0] * 0.4, shape[1] * 0.55, shape[2] * 0.5), min(shape) * 0.15)
    t1c = np.where(head, 0.5, -1.0) + np.where(tumour, 1.5, 0.0)
    t1c = (t1c + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    fl = (np.where(head, 0.2, -1.0) + np.where(tumour, 2.0, 0.0)).astype(np.float32)
    d = np.where(
        ball(shape, (shape[0] * 0.4, shape[1] * 0.55, shape[2] * 0.5), min(shape) * 0.3), 60.0, 5.0
    )
    return PredictionInputs(
        t1c=t1c,
        mask=tumour,
        flair=fl if flair else None,
        dose=d.astype(np.float32) if dose else None,
    )


def wake_up(model: LatentDiffusionModel, seed: int = 0, scale: float = 0.2) -> LatentDiffusionModel:
    """Give a fresh model a UNet that depends on its inputs and class.

    MONAI zero-initialises the UNet's output convolution (and the last convolution of each
    residual block), so an untrained UNet predicts zero noise whatever it is given: guidance and
    conditioning would have no visible effect. Fill those zero weights with noise, and make the
    class embedding large.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        emb = model.unet.class_embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 3.0)
    return model


class ExactDenoiser(torch.nn.Module):
    """A denoiser that knows the answer: from x_t it returns the exact noise (or, for
    ``v_prediction``, the exact velocity) towards ``target``."""

    def __init__(
        self, target: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"
    ) -> None:
        super().__init__()
        self.target, self.abar, self.prediction_type = target, alphas_cumprod, prediction_type
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the sampler reads the device from it

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **_: Any) -> torch.Tensor:
        x = x[:, : self.target.shape[1]]
        target = self.target.repeat(x.shape[0] // self.target.shape[0], 1, 1, 1, 1)  # CFG pairs
        a = self.abar[timesteps.long()].view(-1, 1, 1, 1, 1).to(x)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * target
        return eps
