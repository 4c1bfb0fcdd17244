"""Our DDIM sampling loop with classifier-free guidance on the survival class.

At each step the UNet sees ``cat([x_t, conditioning])``. With a survival class and a guidance
scale ``w`` the noise estimate is

    eps = eps_null + w * (eps_cond - eps_null)

(the same combination of velocity estimates for a model trained with
``scheduler.prediction_type: v_prediction``; the scheduler's step converts either)

where ``eps_null`` is computed with the **class label replaced by the null class only**: the
concatenated image conditioning (pre-treatment latents, mask, dose, flags) is kept. MONAI's
``DiffusionInferer`` blanks the whole conditioning for its unconditional pass, which would drop
the patient's own images from the null estimate and make guidance pull away from them; hence
this loop. Both passes run as one batch.
``w == 1`` is plain conditional sampling (one pass), ``w == 0`` or ``survival_class=None`` plain
null-class sampling (one pass).

Timesteps are evenly spaced, ``(N-1)k, ..., k, 0`` with ``k = T // N`` (:func:`ddim_timesteps`),
the spacing that ``DDIMScheduler.step`` assumes when it looks up the previous timestep as
``t - T // N``. MONAI 1.6's ``set_timesteps`` spreads them over ``linspace(T-1, 0, N)`` instead,
so each step would land on a noise level slightly different from the one the next step reads.

Randomness comes only from the ``torch.Generator`` given (initial noise, and the DDIM noise when
``eta > 0``), so a seed reproduces the samples on the same device. On CUDA the UNet may run
under bf16 autocast, on channels-last (``channels_last_3d``) tensors and compiled with
``torch.compile`` (mode ``reduce-overhead`` replays CUDA graphs); the scheduler arithmetic stays
in float32. ``bench/gpu_sampling.py`` measures each against a plain float32 loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from dicom_node.errors import InferenceError
from inference.model_config import COMPILE_MODES, ModelConfig
from inference.networks import LatentDiffusionModel, build_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingOptions:
    """``guidance_scale`` w (1: conditional, 0: null class), DDIM ``num_inference_steps`` and
    ``eta``, ``autocast``: ``"auto"`` (bf16 on CUDA, none on CPU), ``"bf16"``, ``"fp16"`` or
    ``"none"``; ``channels_last``: the UNet's weights and inputs in ``channels_last_3d``
    memory order; ``compile``: ``"none"`` or a ``torch.compile`` mode (:data:`COMPILE_MODES`;
    the compiled UNet is kept for the next call with the same model and options)."""

    guidance_scale: float = 3.0
    num_inference_steps: int = 25
    eta: float = 0.0
    autocast: str = "auto"
    channels_last: bool = False
    compile: str = "none"

    @classmethod
    def from_config(cls, cfg: ModelConfig, **changes: Any) -> SamplingOptions:
        base = cls(
            guidance_scale=cfg.inference.guidance_scale,
            num_inference_steps=cfg.scheduler.num_inference_steps,
            eta=cfg.inference.eta,
        )
        return dataclasses.replace(base, **changes)


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """Descending timesteps ``(N-1)k ... k, 0`` with ``k = T // N`` (consistent with
    ``DDIMScheduler.step``, which goes from ``t`` to ``t - k``)."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise InferenceError(
            f"num_inference_steps: expected 1..{num_train_timesteps}, found {num_inference_steps}"
        )
    ratio = num_train_timesteps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * ratio


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded generator on ``device`` (the noise is drawn there)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def autocast_context(device: torch.device, mode: str) -> contextlib.AbstractContextManager[None]:
    """The autocast context of ``mode`` on ``device`` (CPU: always none)."""
    if mode not in ("auto", "bf16", "fp16", "none"):
        raise InferenceError(f"autocast: expected auto, bf16, fp16 or none, found {mode!r}")
    if device.type != "cuda" or mode == "none":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def sampling_unet(unet: torch.nn.Module, options: SamplingOptions) -> Callable[..., torch.Tensor]:
    """The UNet as the sampling loop calls it under ``options``: moved to channels-last memory
    order (in place: the weights keep that order) and/or compiled."""
    if options.compile not in COMPILE_MODES:
        raise InferenceError(
            f"compile: expected one of {', '.join(COMPILE_MODES)}, found {options.compile!r}"
        )
    net: Callable[..., torch.Tensor] = unet
    if options.channels_last:
        unet.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    if options.compile != "none":
        # kept on the network (a plain dict: not a submodule, so not in its state dict), so that
        # a predictor compiles once, and a dropped network takes its compiled copies with it
        cache: dict[tuple[str, bool], Callable[..., torch.Tensor]] = unet.__dict__.setdefault(
            "_compiled", {}
        )
        key = (options.compile, options.channels_last)
        if key not in cache:
            cache[key] = torch.compile(unet, mode=options.compile, dynamic=False)
        net = cache[key]
    if not options.channels_last:
        return net

    def channels_last(inp: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return net(inp.contiguous(memory_format=torch.channels_last_3d), **kwargs)

    return channels_last


def guided_noise(
    unet: DiffusionModelUNet | Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    conditioning: torch.Tensor,
    timestep: torch.Tensor,
    class_labels: torch.Tensor,
    null_class: int,
    guidance_scale: float,
) -> torch.Tensor:
    """The (guided) noise estimate at one step, in float32 (the velocity estimate for a
    ``v_prediction`` model).

    The conditional and null passes share one forward call of batch ``2B``; the null half differs
    from the conditional half by its class labels only.
    """
    b = x_t.shape[0]
    inp = torch.cat([x_t, conditioning], dim=1)
    all_null = bool((class_labels == null_class).all())
    if guidance_scale == 1.0 or all_null:
        labels = class_labels
        return unet(inp, timesteps=timestep.expand(b), class_labels=labels).float()
    null = torch.full_like(class_labels, null_class)
    if guidance_scale == 0.0:
        return unet(inp, timesteps=timestep.expand(b), class_labels=null).float()
    both = unet(
        torch.cat([inp, inp]),
        timesteps=timestep.expand(2 * b),
        class_labels=torch.cat([class_labels, null]),
    ).float()
    eps_cond, eps_null = both[:b], both[b:]
    return eps_null + guidance_scale * (eps_cond - eps_null)


@torch.no_grad()
def sample_latents(
    model: LatentDiffusionModel,
    conditioning: torch.Tensor,
    class_labels: torch.Tensor,
    generator: torch.Generator,
    options: SamplingOptions,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM samples of the post-treatment latent, one per row of ``conditioning``.

    ``conditioning`` is ``(B, C, *latent_shape)`` (repeat a study's row N times for N samples),
    ``class_labels`` ``(B,)`` long (the null class for unguided rows). Returns samples of the
    diffusion space ``(B, L, *latent_shape)`` in float32: scaled latents, or scaled changes
    from the T1-Gd latent (``LatentDiffusionModel.from_diffusion_space`` maps them back).
    """
    cfg = model.config
    layout = model.layout
    device = model.device
    if conditioning.ndim != 5 or conditioning.shape[1] != layout.num_channels:
        raise InferenceError(
            f"conditioning: expected (B, {layout.num_channels}, *{layout.latent_shape}), "
            f"found {tuple(conditioning.shape)}"
        )
    if tuple(conditioning.shape[2:]) != layout.latent_shape:
        raise InferenceError(
            f"conditioning: expected latent grid {layout.latent_shape}, "
            f"found {tuple(conditioning.shape[2:])}"
        )
    b = conditioning.shape[0]
    if class_labels.shape != (b,):
        raise InferenceError(
            f"class labels: expected shape ({b},), found {tuple(class_labels.shape)}"
        )
    if int(class_labels.min()) < 0 or int(class_labels.max()) > cfg.null_class:
        raise InferenceError(
            f"class labels: expected 0..{cfg.null_class} (null class {cfg.null_class}), "
            f"found {class_labels.tolist()}"
        )
    if options.num_inference_steps < 1 or options.num_inference_steps > (
        cfg.scheduler.num_train_timesteps
    ):
        raise InferenceError(
            f"num_inference_steps: expected 1..{cfg.scheduler.num_train_timesteps}, "
            f"found {options.num_inference_steps}"
        )
    scheduler = build_scheduler(cfg)
    scheduler.set_timesteps(options.num_inference_steps)  # sets num_inference_steps for step()
    scheduler.timesteps = ddim_timesteps(
        cfg.scheduler.num_train_timesteps, options.num_inference_steps
    )
    cond = conditioning.to(device=device, dtype=torch.float32)
    labels = class_labels.to(device=device, dtype=torch.long)
    shape = (b, cfg.autoencoder.latent_channels, *layout.latent_shape)
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    model.unet.eval()
    unet = sampling_unet(model.unet, options)
    steps = scheduler.timesteps.tolist()
    with autocast_context(device, options.autocast):
        for n, t in enumerate(steps):
            eps = guided_noise(
                unet,
                x,
                cond,
                torch.tensor([t], device=device, dtype=torch.long),
                labels,
                cfg.null_class,
                options.guidance_scale,
            )
            x, _ = _ddim_step(scheduler, eps, int(t), x, options.eta, generator)
            if progress is not None:
                progress(n + 1, len(steps))
    return x.float()


def _ddim_step(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    t: int,
    x: torch.Tensor,
    eta: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scheduler step in float32, outside autocast."""
    with _no_autocast(x.device):
        if eta > 0:
            # MONAI draws the noise on the model output's device with our generator
            prev, x0 = scheduler.step(eps.float(), t, x.float(), eta=eta, generator=generator)
        else:
            prev, x0 = scheduler.step(eps.float(), t, x.float())
    return prev, x0


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", enabled=False):
            yield
    else:
        yield


@torch.no_grad()
def decode_latents(
    model: LatentDiffusionModel,
    latents: torch.Tensor,
    batch_size: int = 4,
    autocast: str = "none",
) -> torch.Tensor:
    """Decode scaled latents to ``(B, 2, k, j, i)`` float32 (image, mask logit), in chunks of
    ``batch_size`` (the full-resolution decoder is the memory peak), optionally under autocast."""
    model.autoencoder.eval()
    device = model.device
    with autocast_context(device, autocast):
        chunks = [
            model.decode(latents[i : i + batch_size].to(device)).float()
            for i in range(0, latents.shape[0], batch_size)
        ]
    return torch.cat(chunks)
