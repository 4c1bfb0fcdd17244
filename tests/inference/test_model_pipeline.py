"""The pieces together on the tiny preset: stage 1, latent scale, stage 2, save, load, predict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from inference.model_dir import load_model_dir, save_model_dir
from inference.networks import LatentDiffusionModel
from inference.predict import predict_arrays
from inference.sampler import make_generator
from inference.train.steps import (
    AutoencoderBatch,
    DiffusionBatch,
    autoencoder_step,
    diffusion_step,
    latent_scale_from,
)

from .model_helpers import study, tiny_model


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))[None, None]


def test_train_save_load_predict(tmp_path: Path) -> None:
    model: LatentDiffusionModel = tiny_model(seed=0)
    cfg = model.config
    pre, post = study(cfg, seed=0), study(cfg, seed=1)
    post_t1c = post.t1c * np.where(pre.mask, 0.5, 1.0).astype(np.float32)  # a shrunk enhancement

    # stage 1 on T1-Gd (mask target) and FLAIR (no mask target)
    assert pre.flair is not None
    images = torch.cat([_tensor(pre.t1c), _tensor(post_t1c), _tensor(pre.flair)])
    masks = torch.cat([_tensor(pre.mask), _tensor(post.mask), torch.zeros_like(_tensor(pre.mask))])
    ae_batch = AutoencoderBatch(image=images, mask=masks, mask_weight=torch.tensor([1.0, 1.0, 0.0]))
    ae_opt = torch.optim.Adam(model.autoencoder.parameters(), lr=2e-3)
    for i in range(3):
        autoencoder_step(model.autoencoder, ae_opt, ae_batch, make_generator(i))

    # latent scale, then stage 2 on encoded latents
    model.autoencoder.eval()
    with torch.no_grad():
        mu, _ = model.autoencoder.encode(images)
    model.config = dataclasses.replace(cfg, latent_scale=latent_scale_from(mu))
    lat = model.encode(images)
    batch = DiffusionBatch(
        target=lat[1:2],
        latents={"t1c": lat[0:1], "flair": lat[2:3]},
        mask=_tensor(pre.mask),
        dose=None if pre.dose is None else _tensor(pre.dose) / cfg.preprocessing.dose_scale_gy,
        class_labels=torch.tensor([2]),
    )
    unet_opt = torch.optim.Adam(model.unet.parameters(), lr=2e-3)
    for i in range(3):
        diffusion_step(model, unet_opt, batch, make_generator(i))

    out = save_model_dir(model, tmp_path / "m", card="tiny\n")
    loaded = load_model_dir(out)
    assert loaded.config.latent_scale == model.config.latent_scale != 1.0
    a = predict_arrays(model, pre, "long", seed=0)
    b = predict_arrays(loaded.model, pre, "long", seed=0)
    assert np.array_equal(a.samples, b.samples)
    assert a.samples.shape == (cfg.inference.num_samples, *cfg.preprocessing.crop_shape)
    assert np.isfinite(a.mean).all() and np.isfinite(a.std).all()
