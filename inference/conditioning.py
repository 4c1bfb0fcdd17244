"""The conditioning tensor of the diffusion UNet, and condition dropout for training.

Channel layout (all on the latent grid, concatenated after the noisy latent), for a model with
``L`` latent channels, contrasts ``(t1c, flair)`` and the dose::

    [0, L)        pre-treatment T1-Gd latent (scaled)            always present
    [L, 2L)       pre-treatment FLAIR latent (zeros when missing) one block per optional contrast
    2L            tumour mask (fraction of each latent voxel inside the mask)
    2L + 1        RT dose / dose_scale_gy (mean over each latent voxel; zeros when missing)
    2L + 2        FLAIR available (constant 1 or 0)               one flag per optional contrast
    2L + 3        dose available (constant 1 or 0)

A model without FLAIR drops the second block and its flag, one without dose drops the dose
channel and its flag. Missing inputs are therefore explicit (a zero map with its flag at 0 is not
confused with a real zero dose), and the network learns them through :func:`drop_inputs` in
training. The survival class is not part of this tensor: it goes through the class embedding,
and :func:`drop_class_labels` replaces it by the null class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dicom_node.errors import InferenceError
from inference.model_config import REQUIRED_CONTRAST, ModelConfig

log = logging.getLogger(__name__)

DOSE = "dose"


@dataclass(frozen=True)
class ConditioningLayout:
    """Which conditioning channel holds what (see the module docstring)."""

    latent_channels: int
    contrasts: tuple[str, ...]
    use_dose: bool
    latent_shape: tuple[int, int, int]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ConditioningLayout:
        return cls(
            latent_channels=cfg.autoencoder.latent_channels,
            contrasts=cfg.contrasts,
            use_dose=cfg.use_dose,
            latent_shape=cfg.latent_shape,
        )

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        """Inputs that may be missing, each with an availability flag channel."""
        return self.contrasts[1:] + ((DOSE,) if self.use_dose else ())

    @property
    def channel_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for c in self.contrasts:
            names += [f"{c}_latent_{n}" for n in range(self.latent_channels)]
        names.append("mask")
        if self.use_dose:
            names.append(DOSE)
        names += [f"{name}_available" for name in self.optional_inputs]
        return tuple(names)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def latent_slice(self, contrast: str) -> slice:
        i = self.contrasts.index(contrast) * self.latent_channels
        return slice(i, i + self.latent_channels)

    def channel(self, name: str) -> int:
        """Index of a single channel (``mask``, ``dose``, ``flair_available``...)."""
        try:
            return self.channel_names.index(name)
        except ValueError:
            raise InferenceError(
                f"no conditioning channel {name!r}: this model has {list(self.channel_names)}"
            ) from None


def to_latent_grid(x: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """A ``(B, C, k, j, i)`` map averaged onto the latent grid (area interpolation).

    For a mask this is the fraction of each latent voxel inside the mask; for the dose, its mean.
    """
    if x.ndim != 5:
        raise InferenceError(f"expected a (B, C, k, j, i) tensor, found shape {tuple(x.shape)}")
    if tuple(x.shape[2:]) == tuple(latent_shape):
        return x
    return F.interpolate(x.float(), size=latent_shape, mode="area")


def build_conditioning(
    layout: ConditioningLayout,
    latents: Mapping[str, torch.Tensor | None],
    mask: torch.Tensor,
    dose: torch.Tensor | None = None,
    available: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``(B, layout.num_channels, *latent_shape)`` conditioning tensor.

    ``latents`` maps contrast names to scaled pre-treatment latents ``(B, L, *latent_shape)``
    (``None`` or absent: missing); ``mask`` is the tumour mask ``(B, 1, ...)`` on any grid (image or
    latent); ``dose`` likewise, already divided by ``dose_scale_gy``. ``available`` optionally
    gives, per optional input, a boolean ``(B,)`` tensor (training dropout: some samples of a
    batch lose their FLAIR); an unavailable input is zeroed whatever its tensor holds. Inputs the
    model does not use (another contrast, a dose for a dose-free model) are ignored.
    """
    t1c = latents.get(REQUIRED_CONTRAST)
    if t1c is None:
        raise InferenceError(
            f"the {REQUIRED_CONTRAST} latent is required for conditioning, found none "
            f"(given: {sorted(k for k, v in latents.items() if v is not None)})"
        )
    expected = (layout.latent_channels, *layout.latent_shape)
    batch = t1c.shape[0]
    device = t1c.device
    for name, lat in latents.items():
        if lat is None:
            continue
        if name not in layout.contrasts:
            log.debug("conditioning: contrast %s is not used by this model, ignored", name)
            continue
        if tuple(lat.shape[1:]) != expected or lat.shape[0] != batch:
            raise InferenceError(
                f"{name} latent: expected shape {(batch, *expected)}, found {tuple(lat.shape)}"
            )
    if mask.ndim != 5 or mask.shape[0] != batch or mask.shape[1] != 1:
        raise InferenceError(
            f"tumour mask: expected shape ({batch}, 1, k, j, i), found {tuple(mask.shape)}"
        )
    if dose is not None and (dose.ndim != 5 or dose.shape[0] != batch or dose.shape[1] != 1):
        raise InferenceError(
            f"dose: expected shape ({batch}, 1, k, j, i), found {tuple(dose.shape)}"
        )
    if dose is not None and not layout.use_dose:
        log.debug("conditioning: this model does not use the dose, ignored")

    avail = availability(layout, latents, dose, batch, device)
    if available is not None:
        for name, flags in available.items():
            if name not in avail:
                raise InferenceError(
                    f"availability given for {name!r}, which is not an optional input of this "
                    f"model ({list(layout.optional_inputs)})"
                )
            avail[name] = avail[name] & flags.to(device=device, dtype=torch.bool).reshape(batch)

    dtype = t1c.dtype
    parts: list[torch.Tensor] = []
    for c in layout.contrasts:
        lat = latents.get(c)
        if lat is None:
            parts.append(torch.zeros((batch, *expected), device=device, dtype=dtype))
        elif c == REQUIRED_CONTRAST:
            parts.append(lat)
        else:
            parts.append(lat * _bcast(avail[c], dtype))
    parts.append(to_latent_grid(mask.to(device), layout.latent_shape).to(dtype))
    if layout.use_dose:
        if dose is None:
            parts.append(torch.zeros((batch, 1, *layout.latent_shape), device=device, dtype=dtype))
        else:
            d = to_latent_grid(dose.to(device), layout.latent_shape).to(dtype)
            parts.append(d * _bcast(avail[DOSE], dtype))
    for name in layout.optional_inputs:
        flag = _bcast(avail[name], dtype).expand(batch, 1, *layout.latent_shape)
        parts.append(flag)
    return torch.cat(parts, dim=1)


def availability(
    layout: ConditioningLayout,
    latents: Mapping[str, torch.Tensor | None],
    dose: torch.Tensor | None,
    batch: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``(B,)`` boolean availability of each optional input, from what is given."""
    out: dict[str, torch.Tensor] = {}
    for name in layout.optional_inputs:
        present = dose is not None if name == DOSE else latents.get(name) is not None
        out[name] = torch.full((batch,), present, dtype=torch.bool, device=device)
    return out


def _bcast(flags: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return flags.to(dtype).reshape(-1, 1, 1, 1, 1)


def _bernoulli(
    n: int, p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(n, generator=generator, device=gen_device)
    return (draws < p).to(device)


def drop_inputs(
    layout: ConditioningLayout,
    available: Mapping[str, torch.Tensor],
    p_drop_contrast: float,
    p_drop_dose: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Training dropout of the optional inputs: a new availability map.

    Each optional contrast of each sample is hidden with probability ``p_drop_contrast``, the dose
    with probability ``p_drop_dose`` (inputs already missing stay missing). Pass the result to
    :func:`build_conditioning` as ``available``.
    """
    out: dict[str, torch.Tensor] = {}
    for name in layout.optional_inputs:
        flags = available[name]
        p = p_drop_dose if name == DOSE else p_drop_contrast
        dropped = _bernoulli(flags.shape[0], p, generator, flags.device)
        out[name] = flags & ~dropped
    return out


def drop_class_labels(
    labels: torch.Tensor, null_class: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each class label by ``null_class`` with probability ``p`` (classifier-free
    guidance training); labels already null stay null."""
    dropped = _bernoulli(labels.shape[0], p, generator, labels.device)
    return torch.where(dropped, torch.full_like(labels, null_class), labels)
