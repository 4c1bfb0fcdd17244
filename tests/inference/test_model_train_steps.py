"""One optimisation step of each stage: repeated on a fixed batch, the loss goes down."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from dicom_node.errors import InferenceError
from inference.model_config import PREDICTION_TYPES
from inference.networks import LatentDiffusionModel, build_scheduler
from inference.sampler import make_generator
from inference.train.steps import (
    AutoencoderBatch,
    DiffusionBatch,
    WeightAverage,
    autoencoder_losses,
    autoencoder_step,
    diffusion_loss,
    diffusion_step,
    kl_divergence,
    latent_scale_from,
    tumour_weight,
)

from .model_helpers import ExactDenoiser, study, tiny_model


def _ae_batch(model: LatentDiffusionModel) -> AutoencoderBatch:
    cfg = model.config
    a, b = study(cfg, seed=0), study(cfg, seed=1)
    assert b.flair is not None
    image = torch.stack([torch.from_numpy(a.t1c), torch.from_numpy(b.flair)])[:, None]
    mask = torch.stack([torch.from_numpy(a.mask), torch.from_numpy(b.mask)])[:, None].float()
    return AutoencoderBatch(image=image, mask=mask, mask_weight=torch.tensor([1.0, 0.0]))


def _diffusion_batch(model: LatentDiffusionModel) -> DiffusionBatch:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lat = (4, cfg.autoencoder.latent_channels, *cfg.latent_shape)
    t1c = torch.randn(lat, generator=g)
    target = 0.8 * t1c + 0.2 * torch.randn(lat, generator=g)
    mask = (torch.rand(4, 1, *cfg.preprocessing.crop_shape, generator=g) > 0.7).float()
    return DiffusionBatch(
        target=target,
        latents={"t1c": t1c, "flair": torch.randn(lat, generator=g)},
        mask=mask,
        dose=torch.rand(4, 1, *cfg.preprocessing.crop_shape, generator=g),
        class_labels=torch.tensor([0, 1, 2, cfg.null_class]),
        available={"flair": torch.tensor([True, True, False, True])},
    )


def test_autoencoder_step_decreases_the_loss() -> None:
    model = tiny_model(seed=0)
    ae = model.autoencoder
    batch = _ae_batch(model)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)

    def evaluate() -> float:
        ae.eval()
        with torch.no_grad():
            loss, _ = autoencoder_losses(ae, batch, make_generator(123))
        return float(loss)

    before = evaluate()
    started = time.perf_counter()
    results = [autoencoder_step(ae, opt, batch, make_generator(i)) for i in range(8)]
    per_step = (time.perf_counter() - started) / len(results)
    after = evaluate()
    assert after < 0.8 * before, (before, after)
    assert set(results[0].parts) == {"l1", "kl", "mask"}
    assert per_step < 1.0  # tiny preset: well under a second per step on a CPU


def test_autoencoder_step_without_mask_target() -> None:
    model = tiny_model(seed=0)
    batch = _ae_batch(model)
    result = autoencoder_step(
        model.autoencoder,
        torch.optim.SGD(model.autoencoder.parameters(), lr=1e-3),
        AutoencoderBatch(image=batch.image),
        make_generator(0),
    )
    assert "mask" not in result.parts
    assert batch.mask is not None
    with pytest.raises(InferenceError, match="mask shape"):
        autoencoder_losses(
            model.autoencoder, AutoencoderBatch(image=batch.image, mask=batch.mask[:1]), None
        )


def _with(model: LatentDiffusionModel, prediction_type: str, tumour_weight: float = 0.0) -> None:
    cfg = model.config.with_training(tumour_loss_weight=tumour_weight)
    model.config = cfg.replace(
        scheduler=dataclasses.replace(cfg.scheduler, prediction_type=prediction_type)
    )


@pytest.mark.parametrize(
    ("prediction_type", "tumour_weight"),
    [("epsilon", 0.0), ("v_prediction", 0.0), ("v_prediction", 4.0)],
)
def test_diffusion_step_decreases_the_loss(prediction_type: str, tumour_weight: float) -> None:
    model = tiny_model(seed=0)
    _with(model, prediction_type, tumour_weight)
    batch = _diffusion_batch(model)
    scheduler = build_scheduler(model.config)
    ae_before = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    opt = torch.optim.Adam(model.unet.parameters(), lr=3e-3)

    def evaluate() -> float:
        model.unet.eval()
        with torch.no_grad():
            loss, _ = diffusion_loss(model, batch, make_generator(99), scheduler=scheduler)
        return float(loss)

    before = evaluate()
    started = time.perf_counter()
    results = [
        # the same draws (timesteps, noise, dropout) at every step: a truly fixed batch
        diffusion_step(model, opt, batch, make_generator(99), scheduler=scheduler)
        for _ in range(10)
    ]
    per_step = (time.perf_counter() - started) / len(results)
    after = evaluate()
    assert after < 0.7 * before, (before, after)
    assert results[-1].loss < results[0].loss
    assert per_step < 1.0
    assert "mse" in results[0].parts
    # stage 2 leaves the autoencoder alone
    assert all(torch.equal(v, ae_before[k]) for k, v in model.autoencoder.state_dict().items())


def test_diffusion_loss_applies_condition_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(seed=0)
    batch = _diffusion_batch(model)
    _, none = diffusion_loss(model, batch, make_generator(0), p_drop_class=0.0)
    assert none["null_class_fraction"] == 0.25  # the one sample already null
    _, all_ = diffusion_loss(model, batch, make_generator(0), p_drop_class=1.0)
    assert all_["null_class_fraction"] == 1.0
    seen: list[torch.Tensor] = []
    original = model.unet.forward

    def spy(x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return original(x, timesteps=timesteps, class_labels=class_labels)

    monkeypatch.setattr(model.unet, "forward", spy)
    diffusion_loss(model, batch, make_generator(0), p_drop_contrast=1.0, p_drop_dose=1.0)
    x = seen[-1]
    layout = model.layout
    off = model.config.autoencoder.latent_channels  # the noisy latent comes first
    assert torch.all(x[:, off + layout.channel("flair_available")] == 0)
    assert torch.all(x[:, off + layout.channel("dose_available")] == 0)
    assert torch.all(x[:, off + layout.channel("dose")] == 0)
    diffusion_loss(model, batch, make_generator(0), p_drop_contrast=0.0, p_drop_dose=0.0)
    flags = seen[-1][:, off + layout.channel("flair_available")].flatten(1)[:, 0]
    assert flags.tolist() == [1.0, 1.0, 0.0, 1.0]  # the batch's own missing FLAIR stays missing


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_training_target_is_what_the_sampler_reads(prediction_type: str) -> None:
    """A denoiser that returns the exact noise (velocity) of the batch's target has zero loss
    under its own prediction type and a large one under the other: training teaches what
    :func:`sample_latents` interprets (the same denoiser lands on its target there)."""
    model = tiny_model(seed=0)
    batch = _diffusion_batch(model)
    abar = build_scheduler(model.config).alphas_cumprod
    model.unet = ExactDenoiser(batch.target, abar, prediction_type)  # type: ignore[assignment]
    for kind in PREDICTION_TYPES:
        _with(model, kind)
        loss, _ = diffusion_loss(model, batch, make_generator(3))
        if kind == prediction_type:
            assert float(loss) < 1e-8
        else:
            assert float(loss) > 0.1


def test_tumour_weight_counts_the_tumour_voxels_more() -> None:
    """An error only on the latent voxels that touch the mask: the weighted loss is the
    share of (1 + w)-weighted error, and ``parts["mse"]`` stays the plain mean."""
    model = tiny_model(seed=0)
    batch = _diffusion_batch(model)
    cfg = model.config
    shape = cfg.preprocessing.crop_shape
    mask = torch.zeros(4, 1, *shape)
    mask[:, :, : shape[0] // 2] = 1.0  # the first half of each volume, along k
    batch = dataclasses.replace(batch, mask=mask)
    w = 4.0
    weight = tumour_weight(batch.mask, cfg.latent_shape, w)
    half = cfg.latent_shape[0] // 2
    assert torch.all(weight[:, :, :half] == 1 + w) and torch.all(weight[:, :, half:] == 1.0)
    abar = build_scheduler(cfg).alphas_cumprod
    exact = ExactDenoiser(batch.target, abar)

    class OffInTumour(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.exact = exact

        def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kw: object) -> torch.Tensor:
            return self.exact(x, timesteps) + (weight > 1).float()

    model.unet = OffInTumour()  # type: ignore[assignment]
    inside = float((weight > 1).float().mean())  # 0.5
    _with(model, "epsilon", 0.0)
    plain, parts = diffusion_loss(model, batch, make_generator(3))
    assert float(plain) == pytest.approx(inside, rel=1e-5)
    _with(model, "epsilon", w)
    weighted, parts = diffusion_loss(model, batch, make_generator(3))
    assert float(weighted) == pytest.approx((1 + w) * inside / ((1 + w) * inside + 1 - inside))
    assert parts["mse"] == pytest.approx(inside, rel=1e-5)


def test_kl_divergence_of_the_prior_is_zero() -> None:
    mu, sigma = torch.zeros(2, 3, 4, 4, 4), torch.ones(2, 3, 4, 4, 4)
    assert float(kl_divergence(mu, sigma)) == pytest.approx(0.0)
    assert float(kl_divergence(mu + 1, sigma)) == pytest.approx(0.5 * 3 * 64)


def test_latent_scale_gives_unit_variance() -> None:
    model = tiny_model(seed=0)
    batch = _ae_batch(model)
    with torch.no_grad():
        mu, _ = model.autoencoder.encode(batch.image)
    scale = latent_scale_from([mu[:1], mu[1:]])
    assert float((mu * scale).std()) == pytest.approx(1.0, rel=1e-4)
    scaled = dataclasses.replace(model.config, latent_scale=scale)
    model.config = scaled
    assert float(model.encode(batch.image).std()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(InferenceError, match="positive spread"):
        latent_scale_from(torch.zeros(10))


def test_step_input_checks() -> None:
    model = tiny_model(seed=0)
    batch = _diffusion_batch(model)
    bad = dataclasses.replace(batch, class_labels=torch.tensor([0, 1, 2, 9]))
    with pytest.raises(InferenceError, match=r"class labels expected \(4,\) in 0\.\.3"):
        diffusion_loss(model, bad, make_generator(0))
    opt = torch.optim.SGD(model.unet.parameters(), lr=1e-3)
    with pytest.raises(InferenceError, match="training autocast"):
        diffusion_step(model, opt, batch, make_generator(0), autocast="fp16")


def test_weight_average_follows_the_weights_with_its_decay() -> None:
    live = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(live, decay=0.5)
    start = {k: v.clone() for k, v in live.state_dict().items()}
    assert not any(p.requires_grad for p in average.module.parameters())
    decays, expected = [], start["0.weight"].clone()
    for step in range(4):
        with torch.no_grad():
            live[0].weight.add_(1.0)
        live.train()(torch.randn(4, 2))  # moves the batch-norm statistics and its counter
        decays.append(average.current_decay())
        average.update(live)
        expected = decays[-1] * expected + (1 - decays[-1]) * live[0].weight
        assert average.updates == step + 1
    # the ramp (1 + n) / (10 + n) until it reaches the decay
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13, 5 / 14])
    torch.testing.assert_close(average.module[0].weight, expected)
    assert not torch.equal(average.module[0].weight, live[0].weight)  # it lags behind
    assert torch.equal(average.module[1].num_batches_tracked, live[1].num_batches_tracked)
    torch.testing.assert_close(live[0].weight, start["0.weight"] + 4.0)  # averaging left it be
    more = WeightAverage(live, decay=0.5, updates=100)
    assert more.current_decay() == 0.5
    with pytest.raises(InferenceError, match="decay"):
        WeightAverage(live, decay=1.0)
