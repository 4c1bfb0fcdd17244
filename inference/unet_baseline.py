"""The deterministic 3D UNet regression baseline, and its model directory.

The design asks for two baselines beside the latent diffusion model: "no change"
(``inference.baseline``) and a deterministic 3D UNet trained on the same data with the same
commands. This is the second: MONAI's ``BasicUNet`` on the model grid.

Input channels (same information as the diffusion model's conditioning, on the image grid)::

    0  pre-treatment T1-Gd (normalised)
    1  pre-treatment FLAIR (zeros when missing)        when the model reads FLAIR
    .  GTV mask
    .  RT dose / dose_scale_gy (zeros when missing)    when the model reads the dose
    .  one availability flag per optional input (constant 1 or 0)

Output channels: 0 the post-treatment T1-Gd (L1 regression, normalised units), 1 the logit of
the post-treatment enhancing mask, 2 the logit of the pre-treatment enhancing mask (the same
"reader" measures the current volume, as the diffusion model's joint mask channel does).
Missing optional inputs are learnt by dropping them at random in training.

Model directory: ``model.yaml`` with ``format: glioforecast-model``, ``kind: unet-baseline``,
the :class:`UNetBaselineConfig` fields and ``weights: {unet: {file, sha256}}``; weights in
safetensors, validated like the diffusion model's (``inference.model_dir``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from monai.networks.nets import BasicUNet
from safetensors.torch import save_file

from dicom_node.errors import InferenceError
from inference.model_config import (
    REQUIRED_CONTRAST,
    PreprocessingConfig,
    ResponseConfig,
    config_to_dict,
    parse_dataclass_fields,
)
from inference.model_dir import (
    FORMAT,
    FORMAT_VERSION,
    KIND_UNET_BASELINE,
    MODEL_CARD,
    MODEL_YAML,
    WEIGHTS_MODE,
    WeightsEntry,
    component_state,
    load_state_checked,
    read_yaml_mapping,
    sha256_file,
)
from inference.train.steps import StepResult, soft_dice_loss

log = logging.getLogger(__name__)

WEIGHTS_FILE = "unet.safetensors"
IMAGE_OUT, POST_MASK_OUT, PRE_MASK_OUT = 0, 1, 2
OUT_CHANNELS = 3
_TOP_KEYS = ("format", "format_version", "kind", "weights")
#: contrasts the baseline reads (T1-Gd required, FLAIR optional)
SUPPORTED_CONTRASTS = ("t1c", "flair")


@dataclass(frozen=True)
class UNetBaselineConfig:
    """Everything that defines one UNet baseline (written to ``model.yaml``).

    ``features`` are BasicUNet's six feature sizes (four down-samplings: the crop must be a
    multiple of 16), normalised by group norm (``norm_num_groups``; instance norm fails on the
    1-voxel bottleneck of small crops). ``p_drop_contrast`` / ``p_drop_dose``: training dropout
    of the optional inputs. ``mask_threshold`` turns the mask logits into masks. ``residual``:
    the image channel is the change from the pre-treatment T1-Gd (added back to it), so that an
    untrained network starts at "no change" and learns only what treatment changes.
    """

    name: str = "glioforecast-unet-baseline"
    version: str = "0.0.0"
    contrasts: tuple[str, ...] = ("t1c", "flair")
    use_dose: bool = True
    survival_classes: tuple[str, ...] = ("short", "intermediate", "long")
    features: tuple[int, int, int, int, int, int] = (16, 16, 32, 64, 128, 16)
    norm_num_groups: int = 4
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)
    mask_threshold: float = 0.5
    mask_loss_weight: float = 1.0
    p_drop_contrast: float = 0.3
    p_drop_dose: float = 0.3
    residual: bool = False

    def __post_init__(self) -> None:
        p: list[str] = []
        if not self.contrasts or self.contrasts[0] != REQUIRED_CONTRAST:
            p.append(f"contrasts: expected {REQUIRED_CONTRAST!r} first, found {self.contrasts}")
        bad = [c for c in self.contrasts if c not in SUPPORTED_CONTRASTS]
        if bad:
            p.append(f"contrasts: unsupported {bad}, expected among {list(SUPPORTED_CONTRASTS)}")
        if len(self.features) != 6 or min(self.features) < 1:
            p.append(f"features: expected 6 positive sizes, found {list(self.features)}")
        elif self.norm_num_groups < 1 or any(f % self.norm_num_groups for f in self.features):
            p.append(
                f"features: expected multiples of norm_num_groups={self.norm_num_groups}, "
                f"found {list(self.features)}"
            )
        if any(s % 16 or s <= 0 for s in self.preprocessing.crop_shape):
            p.append(
                "preprocessing.crop_shape: expected multiples of 16 (four down-samplings), "
                f"found {list(self.preprocessing.crop_shape)}"
            )
        if not 0.0 < self.mask_threshold < 1.0:
            p.append(f"mask_threshold: expected in (0, 1), found {self.mask_threshold}")
        for key in ("p_drop_contrast", "p_drop_dose"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                p.append(f"{key}: expected a probability in [0, 1], found {v}")
        if p:
            raise InferenceError(
                "invalid UNet baseline configuration:\n" + "\n".join(f"  - {x}" for x in p)
            )

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        return self.contrasts[1:] + (("dose",) if self.use_dose else ())

    @property
    def in_channels(self) -> int:
        return len(self.contrasts) + 1 + int(self.use_dose) + len(self.optional_inputs)

    def replace(self, **changes: Any) -> UNetBaselineConfig:
        return dataclasses.replace(self, **changes)


def tiny_baseline_config(**changes: Any) -> UNetBaselineConfig:
    """16^3 at 8 mm, a few thousand weights: for tests."""
    cfg = UNetBaselineConfig(
        name="glioforecast-unet-tiny",
        version="0.0.0-test",
        features=(4, 4, 8, 8, 8, 4),
        preprocessing=PreprocessingConfig(spacing_mm=(8.0, 8.0, 8.0), crop_shape=(16, 16, 16)),
    )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def demo_baseline_config(**changes: Any) -> UNetBaselineConfig:
    """The demo grid (4 mm), same preprocessing as the demo diffusion model except the crop:
    48x48x48 (192 mm), the multiple of 16 that covers the diffusion model's 40x48x40."""
    cfg = UNetBaselineConfig(
        name="glioforecast-unet-demo",
        version="0.2.0",
        features=(16, 16, 32, 64, 128, 16),
        preprocessing=PreprocessingConfig(spacing_mm=(4.0, 4.0, 4.0), crop_shape=(48, 48, 48)),
    )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def fine_baseline_config(**changes: Any) -> UNetBaselineConfig:
    """The fine grid (2 mm, 80x96x80), same preprocessing as the fine diffusion model; the
    network is the demo baseline's."""
    fine = {
        "name": "glioforecast-unet-fine",
        "version": "0.1.0",
        "preprocessing": PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0), crop_shape=(80, 96, 80)),
    }
    return demo_baseline_config(**{**fine, **changes})


BASELINE_PRESETS = {
    "tiny": tiny_baseline_config,
    "demo": demo_baseline_config,
    "fine": fine_baseline_config,
}


def baseline_preset(name: str) -> UNetBaselineConfig:
    try:
        return BASELINE_PRESETS[name]()
    except KeyError:
        raise InferenceError(
            f"unknown baseline preset {name!r}: expected one of {sorted(BASELINE_PRESETS)}"
        ) from None


def build_baseline_unet(cfg: UNetBaselineConfig, *, seed: int | None = None) -> BasicUNet:
    def make() -> BasicUNet:
        return BasicUNet(
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=OUT_CHANNELS,
            features=cfg.features,
            norm=("group", {"num_groups": cfg.norm_num_groups}),
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def baseline_input(
    cfg: UNetBaselineConfig,
    t1c: torch.Tensor,
    mask: torch.Tensor,
    flair: torch.Tensor | None = None,
    dose: torch.Tensor | None = None,
    available: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``(B, in_channels, k, j, i)`` input (see the module docstring). Tensors are
    ``(B, 1, k, j, i)``; ``dose`` in Gy; ``available`` optionally hides optional inputs per sample
    (``(B,)`` booleans)."""
    b = t1c.shape[0]
    zeros = torch.zeros_like(t1c)
    avail = {
        "flair": torch.full((b,), flair is not None, dtype=torch.bool, device=t1c.device),
        "dose": torch.full((b,), dose is not None, dtype=torch.bool, device=t1c.device),
    }
    if available is not None:
        for name, flags in available.items():
            avail[name] = avail[name] & flags.to(t1c.device, torch.bool).reshape(b)
    parts = [t1c]
    for c in cfg.contrasts[1:]:
        img = flair if c == "flair" else None
        flag = avail.get(c, torch.zeros(b, dtype=torch.bool, device=t1c.device))
        parts.append(zeros if img is None else img * _b(flag))
    parts.append(mask.to(t1c.dtype))
    if cfg.use_dose:
        d = zeros if dose is None else dose / cfg.preprocessing.dose_scale_gy
        parts.append(d * _b(avail["dose"]))
    for name in cfg.optional_inputs:
        flag = avail.get(name, torch.zeros(b, dtype=torch.bool, device=t1c.device))
        parts.append(_b(flag).expand_as(t1c))
    return torch.cat(parts, dim=1)


def _b(flags: torch.Tensor) -> torch.Tensor:
    return flags.float().reshape(-1, 1, 1, 1, 1)


@dataclass(frozen=True)
class BaselineBatch:
    """Training batch on the model grid, all ``(B, 1, k, j, i)``; ``flair``/``dose`` may be
    ``None`` (missing for the whole batch) or hidden per sample through ``available``."""

    t1c: torch.Tensor
    mask: torch.Tensor
    post_t1c: torch.Tensor
    post_mask: torch.Tensor
    pre_mask: torch.Tensor
    flair: torch.Tensor | None = None
    dose: torch.Tensor | None = None
    available: Mapping[str, torch.Tensor] | None = None


def baseline_losses(
    unet: BasicUNet,
    cfg: UNetBaselineConfig,
    batch: BaselineBatch,
    generator: torch.Generator | None = None,
    *,
    dropout: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 on the image + ``mask_loss_weight`` x (BCE + soft Dice) on both mask channels."""
    b = batch.t1c.shape[0]
    avail: dict[str, torch.Tensor] = dict(batch.available or {})
    if dropout:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        for name in cfg.optional_inputs:
            p = cfg.p_drop_dose if name == "dose" else cfg.p_drop_contrast
            keep = (torch.rand(b, generator=generator, device=gen_device) >= p).to(batch.t1c.device)
            avail[name] = avail[name] & keep if name in avail else keep
    x = baseline_input(cfg, batch.t1c, batch.mask, batch.flair, batch.dose, avail)
    out = _outputs(cfg, unet(x), batch.t1c)
    l1 = F.l1_loss(out[:, IMAGE_OUT : IMAGE_OUT + 1].float(), batch.post_t1c.float())
    mask_terms = []
    for ch, target in ((POST_MASK_OUT, batch.post_mask), (PRE_MASK_OUT, batch.pre_mask)):
        logits = out[:, ch : ch + 1].float()
        t = target.float()
        bce = F.binary_cross_entropy_with_logits(logits, t)
        mask_terms.append(bce + soft_dice_loss(logits, t).mean())
    mask_loss = mask_terms[0] + mask_terms[1]
    loss = l1 + cfg.mask_loss_weight * mask_loss
    return loss, {"l1": float(l1.detach()), "mask": float(mask_loss.detach())}


def baseline_step(
    unet: BasicUNet,
    cfg: UNetBaselineConfig,
    optimizer: torch.optim.Optimizer,
    batch: BaselineBatch,
    generator: torch.Generator | None = None,
    *,
    autocast: str = "none",
    grad_clip: float | None = 1.0,
) -> StepResult:
    """One update of the baseline; returns the loss before the update."""
    from inference.sampler import autocast_context

    if autocast == "fp16":
        raise InferenceError("training autocast: expected auto, bf16 or none, found 'fp16'")
    unet.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(batch.t1c.device, autocast):
        loss, parts = baseline_losses(unet, cfg, batch, generator)
    if not torch.isfinite(loss):
        raise InferenceError(f"baseline training: expected a finite loss, found {float(loss)}")
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    optimizer.step()
    return StepResult(loss=float(loss.detach()), parts=parts)


@torch.no_grad()
def baseline_forward(
    unet: BasicUNet,
    cfg: UNetBaselineConfig,
    t1c: torch.Tensor,
    mask: torch.Tensor,
    flair: torch.Tensor | None = None,
    dose: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, 3, k, j, i)`` float32: post image, post mask logit, pre mask logit."""
    unet.eval()
    out = _outputs(cfg, unet(baseline_input(cfg, t1c, mask, flair, dose)), t1c)
    return out.float()


def _outputs(cfg: UNetBaselineConfig, out: torch.Tensor, t1c: torch.Tensor) -> torch.Tensor:
    """The network's channels as predictions: a residual model's image channel plus the T1-Gd."""
    if not cfg.residual:
        return out
    image = out[:, IMAGE_OUT : IMAGE_OUT + 1] + t1c.to(out.dtype)
    return torch.cat([out[:, :IMAGE_OUT], image, out[:, IMAGE_OUT + 1 :]], dim=1)


# ------------------------------------------------------------------------------------------
# model directory


@dataclass
class LoadedBaseline:
    path: Path
    config: UNetBaselineConfig
    unet: BasicUNet
    card: str | None


def save_baseline_dir(
    unet: BasicUNet,
    cfg: UNetBaselineConfig,
    path: str | Path,
    *,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a UNet baseline model directory (float32 safetensors + ``model.yaml``)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MODEL_YAML).exists() and not overwrite:
        raise InferenceError(
            f"{out / MODEL_YAML} already exists (pass overwrite=True to replace it)"
        )
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"component": "unet", "model": cfg.name})
    tmp.chmod(WEIGHTS_MODE)  # safetensors writes 0600; the node's service user must read it
    tmp.replace(out / WEIGHTS_FILE)
    entry = WeightsEntry(file=WEIGHTS_FILE, sha256=sha256_file(out / WEIGHTS_FILE))
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": KIND_UNET_BASELINE,
    }
    data.update(config_to_dict(cfg))
    data["weights"] = {"unet": {"file": entry.file, "sha256": entry.sha256}}
    tmp_yaml = out / (MODEL_YAML + ".tmp")
    tmp_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp_yaml.replace(out / MODEL_YAML)
    if card is not None:
        (out / MODEL_CARD).write_text(card, encoding="utf-8")
    log.info("saved UNet baseline %s %s to %s", cfg.name, cfg.version, out)
    return out


def read_baseline_yaml(path: str | Path) -> tuple[UNetBaselineConfig, WeightsEntry]:
    """Parse and validate a UNet baseline's ``model.yaml`` (all problems in one error)."""
    directory = Path(path)
    file = directory / MODEL_YAML
    data = read_yaml_mapping(directory)
    problems: list[str] = []
    if data.get("format") != FORMAT:
        problems.append(f"format: expected {FORMAT!r}, found {data.get('format')!r}")
    if data.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"format_version: expected {FORMAT_VERSION}, found {data.get('format_version')!r}"
        )
    if data.get("kind") != KIND_UNET_BASELINE:
        problems.append(f"kind: expected {KIND_UNET_BASELINE!r}, found {data.get('kind')!r}")
    weights = data.get("weights")
    entry: WeightsEntry | None = None
    if not isinstance(weights, dict) or set(weights) != {"unet"}:
        problems.append(f"weights: expected a mapping with one entry 'unet', found {weights!r}")
    else:
        w = weights["unet"]
        f = w.get("file") if isinstance(w, dict) else None
        sha = w.get("sha256") if isinstance(w, dict) else None
        if not isinstance(f, str) or not f or "/" in f or "\\" in f or f.startswith("."):
            problems.append(
                f"weights.unet.file: expected a file name in the directory, found {f!r}"
            )
        elif sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            problems.append(f"weights.unet.sha256: expected 64 hex digits or null, found {sha!r}")
        else:
            entry = WeightsEntry(file=f, sha256=sha)
    config_data = {k: v for k, v in data.items() if k not in _TOP_KEYS}
    kwargs = parse_dataclass_fields(UNetBaselineConfig, config_data, "", problems, _TOP_KEYS)
    for key in ("name", "version"):
        if key not in data:
            problems.append(f"{key}: required key is missing")
    if problems or entry is None:
        raise InferenceError(f"{file}:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        cfg = UNetBaselineConfig(**kwargs)
    except InferenceError as exc:
        raise InferenceError(f"{file}: {exc}") from None
    return cfg, entry


def load_baseline_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedBaseline:
    """Read, validate (checksum, tensor names and shapes) and load a UNet baseline directory."""
    directory = Path(path)
    cfg, entry = read_baseline_yaml(directory)
    unet = build_baseline_unet(cfg)
    state = component_state(directory, {"unet": entry}, "unet")
    load_state_checked(unet, state, f"{directory / entry.file} (unet)")
    unet.to(device).eval()
    card_path = directory / MODEL_CARD
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    log.info("loaded UNet baseline %s %s from %s on %s", cfg.name, cfg.version, directory, device)
    return LoadedBaseline(path=directory, config=cfg, unet=unet, card=card)
