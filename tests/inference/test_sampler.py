"""Our DDIM loop: shapes, seeds, classifier-free guidance that keeps the image conditioning."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicom_node.errors import InferenceError
from inference.model_config import PREDICTION_TYPES
from inference.networks import IMAGE_CHANNEL, LatentDiffusionModel, build_model, build_scheduler
from inference.predict import predict_arrays
from inference.sampler import (
    SamplingOptions,
    autocast_context,
    ddim_timesteps,
    decode_latents,
    guided_noise,
    make_generator,
    sample_latents,
)

from .model_helpers import ExactDenoiser, study, tiny_model, wake_up


@pytest.fixture(scope="module")
def model() -> LatentDiffusionModel:
    return wake_up(tiny_model(seed=3))


def _cond(model: LatentDiffusionModel, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(batch, model.layout.num_channels, *model.layout.latent_shape, generator=g)


def _reference(
    model: LatentDiffusionModel, cond: torch.Tensor, labels: torch.Tensor, w: float, seed: int
) -> torch.Tensor:
    """Straightforward loop: separate conditional and null passes, guidance by the formula."""
    cfg = model.config
    scheduler = build_scheduler(cfg)
    scheduler.set_timesteps(cfg.scheduler.num_inference_steps)
    scheduler.timesteps = ddim_timesteps(
        cfg.scheduler.num_train_timesteps, len(scheduler.timesteps)
    )
    g = make_generator(seed)
    x = torch.randn(cond.shape[0], cfg.autoencoder.latent_channels, *cfg.latent_shape, generator=g)
    null = torch.full_like(labels, cfg.null_class)
    with torch.no_grad():
        for t in scheduler.timesteps.tolist():
            ts = torch.full((cond.shape[0],), t, dtype=torch.long)
            inp = torch.cat([x, cond], dim=1)
            eps_c = model.unet(inp, timesteps=ts, class_labels=labels)
            eps_n = model.unet(inp, timesteps=ts, class_labels=null)  # image conditioning kept
            eps = eps_n + w * (eps_c - eps_n)
            x, _ = scheduler.step(eps, t, x)
    return x


def _sample(
    model: LatentDiffusionModel, cond: torch.Tensor, labels: torch.Tensor, w: float, seed: int = 0
) -> torch.Tensor:
    opts = SamplingOptions.from_config(model.config, guidance_scale=w)
    return sample_latents(model, cond, labels, make_generator(seed), opts)


def test_shapes_and_determinism(model: LatentDiffusionModel) -> None:
    cond = _cond(model, 3)
    labels = torch.tensor([0, 1, 3])
    a = _sample(model, cond, labels, 3.0, seed=5)
    assert a.shape == (3, model.config.autoencoder.latent_channels, *model.config.latent_shape)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, _sample(model, cond, labels, 3.0, seed=5))
    assert not torch.allclose(a, _sample(model, cond, labels, 3.0, seed=6))
    # the image conditioning matters
    assert (a - _sample(model, cond.flip(0), labels, 3.0, seed=5)).abs().max() > 1e-3
    decoded = decode_latents(model, a, batch_size=2)
    assert decoded.shape == (3, 2, *model.config.preprocessing.crop_shape)


def test_guidance_one_is_conditional_sampling(model: LatentDiffusionModel) -> None:
    cond, labels = _cond(model), torch.tensor([0, 2])
    got = _sample(model, cond, labels, 1.0)
    assert torch.allclose(got, _reference(model, cond, labels, 1.0, seed=0), atol=1e-5)


def test_guided_matches_the_formula_and_differs(model: LatentDiffusionModel) -> None:
    cond, labels = _cond(model), torch.tensor([0, 2])
    guided = _sample(model, cond, labels, 4.0)
    assert torch.allclose(guided, _reference(model, cond, labels, 4.0, seed=0), atol=1e-4)
    conditional = _sample(model, cond, labels, 1.0)
    unguided = _sample(model, cond, torch.full_like(labels, model.config.null_class), 4.0)
    assert (guided - conditional).abs().max() > 1e-3
    assert (guided - unguided).abs().max() > 1e-3
    # w = 0 is the null class with the image conditioning
    assert torch.allclose(_sample(model, cond, labels, 0.0), unguided, atol=1e-6)


def test_null_pass_keeps_the_image_conditioning(model: LatentDiffusionModel) -> None:
    calls: list[dict[str, Any]] = []

    def spy(x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        calls.append({"x": x.clone(), "labels": class_labels.clone(), "t": timesteps.clone()})
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    cond = _cond(model)
    x_t = torch.randn(2, 2, *model.config.latent_shape)
    labels = torch.tensor([1, 0])
    eps = guided_noise(spy, x_t, cond, torch.tensor([7]), labels, 3, 2.5)
    assert eps.shape == x_t.shape
    assert len(calls) == 1  # one batched forward for both passes
    x = calls[0]["x"]
    assert x.shape[0] == 4
    assert torch.equal(x[:2], x[2:])  # identical images, mask, dose and flags in both halves
    assert torch.equal(x[2:, 2:], cond)
    assert calls[0]["labels"].tolist() == [1, 0, 3, 3]
    assert calls[0]["t"].tolist() == [7, 7, 7, 7]


def test_input_checks(model: LatentDiffusionModel) -> None:
    cond = _cond(model)
    opts = SamplingOptions.from_config(model.config)
    with pytest.raises(InferenceError, match="conditioning: expected"):
        sample_latents(model, cond[:, :3], torch.tensor([0, 0]), make_generator(0), opts)
    with pytest.raises(InferenceError, match=r"class labels: expected 0\.\.3"):
        sample_latents(model, cond, torch.tensor([0, 4]), make_generator(0), opts)
    with pytest.raises(InferenceError, match="class labels: expected shape"):
        sample_latents(model, cond, torch.tensor([0]), make_generator(0), opts)


def test_eta_uses_the_generator(model: LatentDiffusionModel) -> None:
    cond, labels = _cond(model), torch.tensor([0, 1])
    opts = SamplingOptions.from_config(model.config, eta=1.0)
    a = sample_latents(model, cond, labels, make_generator(1), opts)
    b = sample_latents(model, cond, labels, make_generator(1), opts)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _sample(model, cond, labels, 3.0, seed=1))


def test_channels_last_gives_the_same_samples() -> None:
    """Memory order changes the layout of the weights and inputs, not what is computed; the
    model's weights keep the order afterwards and still give the same samples."""
    m = wake_up(tiny_model(seed=3))
    cond, labels = _cond(m), torch.tensor([0, 1])
    plain = _sample(m, cond, labels, 3.0)
    opts = SamplingOptions.from_config(m.config, guidance_scale=3.0, channels_last=True)
    fast = sample_latents(m, cond, labels, make_generator(0), opts)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    conv = next(p for p in m.unet.parameters() if p.ndim == 5 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(_sample(m, cond, labels, 3.0), plain, rtol=1e-4, atol=1e-5)


def _can_compile_on_cpu() -> bool:
    """torch.compile's CPU backend builds C++: it needs a compiler and the Python headers."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which("c++") is not None and headers.is_file()


@pytest.mark.skipif(not _can_compile_on_cpu(), reason="needs a C++ compiler and Python.h")
def test_a_compiled_unet_is_compiled_once_and_gives_the_same_samples() -> None:
    m = wake_up(tiny_model(seed=3))
    cond, labels = _cond(m), torch.tensor([0, 1])
    plain = _sample(m, cond, labels, 3.0)
    opts = SamplingOptions.from_config(m.config, guidance_scale=3.0, compile="default")
    a = sample_latents(m, cond, labels, make_generator(0), opts)
    b = sample_latents(m, cond, labels, make_generator(0), opts)
    torch.testing.assert_close(a, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(a, b)
    assert list(m.unet.__dict__["_compiled"]) == [("default", False)]  # one compiled copy
    assert set(m.unet.state_dict()) == set(build_model(m.config).unet.state_dict())


def test_an_unknown_compile_mode_is_refused(model: LatentDiffusionModel) -> None:
    opts = SamplingOptions.from_config(model.config, compile="fastest")
    with pytest.raises(InferenceError, match="compile: expected one of none, default"):
        sample_latents(model, _cond(model), torch.tensor([0, 1]), make_generator(0), opts)


def test_autocast_modes() -> None:
    cpu = torch.device("cpu")
    with autocast_context(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(InferenceError, match="autocast: expected"):
        autocast_context(cpu, "fp8")


def test_timesteps_match_the_scheduler_step(model: LatentDiffusionModel) -> None:
    ts = ddim_timesteps(1000, 20)
    assert ts.tolist() == list(range(950, -1, -50))
    scheduler = build_scheduler(model.config)
    scheduler.set_timesteps(20)
    # step() goes from t to t - T // N: exactly the next timestep of ours
    assert all(int(a) - 1000 // 20 == int(b) for a, b in itertools.pairwise(ts.tolist()))
    assert ddim_timesteps(100, 100).tolist() == list(range(99, -1, -1))
    with pytest.raises(InferenceError, match="num_inference_steps"):
        ddim_timesteps(100, 101)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_sampling_is_seeded() -> None:  # pragma: no cover - GPU machines only
    m = wake_up(tiny_model(seed=3)).to("cuda")
    cond = _cond(m).cuda()
    labels = torch.tensor([0, 1], device="cuda")
    opts = SamplingOptions.from_config(m.config, autocast="auto")
    a = sample_latents(m, cond, labels, make_generator(0, "cuda"), opts)
    b = sample_latents(m, cond, labels, make_generator(0, "cuda"), opts)
    assert a.dtype == torch.float32 and a.device.type == "cuda"
    assert torch.equal(a, b)
    fp32 = sample_latents(
        m,
        cond,
        labels,
        make_generator(0, "cuda"),
        SamplingOptions.from_config(m.config, autocast="none"),
    )
    assert (a - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_sampler_matches_the_plain_loop() -> None:  # pragma: no cover - GPU only
    """bf16 on channels-last weights, compiled to CUDA graphs: seeded, and within bf16 error
    of the float32 loop from the same noise."""
    m = wake_up(tiny_model(seed=3)).to("cuda")
    cond = _cond(m).cuda()
    labels = torch.tensor([0, 1], device="cuda")
    fp32 = sample_latents(
        m,
        cond,
        labels,
        make_generator(0, "cuda"),
        SamplingOptions.from_config(m.config, autocast="none"),
    )
    opts = SamplingOptions.from_config(
        m.config, autocast="bf16", channels_last=True, compile="reduce-overhead"
    )
    a = sample_latents(m, cond, labels, make_generator(0, "cuda"), opts)
    b = sample_latents(m, cond, labels, make_generator(0, "cuda"), opts)
    assert torch.equal(a, b)
    assert float((a - fp32).norm() / fp32.norm()) < 0.05


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [3, 20])
def test_an_exact_denoiser_lands_on_its_target(steps: int, prediction_type: str) -> None:
    """DDIM of our loop, driven by the exact noise (or velocity), returns the target latent
    from any start: the schedule, the timesteps and the update agree with the training noise."""
    model = tiny_model(seed=5)
    cfg = model.config.replace(
        scheduler=dataclasses.replace(model.config.scheduler, prediction_type=prediction_type)
    )
    model.config = cfg
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2, cfg.autoencoder.latent_channels, *cfg.latent_shape, generator=g)
    model.unet = ExactDenoiser(target, build_scheduler(cfg).alphas_cumprod, prediction_type)  # type: ignore[assignment]
    opts = SamplingOptions.from_config(cfg, guidance_scale=3.0, num_inference_steps=steps)
    labels = torch.tensor([0, cfg.null_class])
    z = sample_latents(model, _cond(model), labels, make_generator(9), opts)
    torch.testing.assert_close(z, target, rtol=0, atol=1e-5)


def test_a_residual_model_predicts_the_t1c_latent_plus_the_scaled_change() -> None:
    """With ``diffusion.target: residual``, the sampler generates the scaled change from the
    pre-treatment latent: an exact denoiser aiming at a change ``d`` makes the prediction decode
    ``z_t1c + d / residual_scale``, and a zero change decodes the pre-treatment latent itself."""
    model = wake_up(tiny_model(seed=5))
    cfg = model.config.replace(
        diffusion=dataclasses.replace(model.config.diffusion, target="residual", residual_scale=4.0)
    )
    model.config = cfg
    inputs = study(cfg)
    z_t1c = model.encode(torch.from_numpy(inputs.t1c)[None, None])
    g = torch.Generator().manual_seed(3)
    change = torch.randn(z_t1c.shape, generator=g)
    abar = build_scheduler(cfg).alphas_cumprod
    for d in (torch.zeros_like(change), change):
        model.unet = ExactDenoiser(d, abar)  # type: ignore[assignment]
        p = predict_arrays(model, inputs, None, num_samples=2, seed=1, num_inference_steps=5)
        expected = decode_latents(model, z_t1c + d / 4.0)[0, IMAGE_CHANNEL].numpy()
        np.testing.assert_allclose(p.mean, expected, rtol=0, atol=1e-4)
    # the training target is the scaled change, and the two maps are inverse
    post = z_t1c + change
    torch.testing.assert_close(model.to_diffusion_space(post, z_t1c), 4.0 * change)
    torch.testing.assert_close(
        model.from_diffusion_space(model.to_diffusion_space(post, z_t1c), z_t1c), post
    )
