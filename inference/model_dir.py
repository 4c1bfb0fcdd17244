"""Model directories: ``model.yaml`` + weights in safetensors (+ an optional model card).

Layout::

    MODEL_DIR/
      model.yaml                # format, config (architecture, preprocessing, classes...), weights
      autoencoder.safetensors   # stage 1 state dict
      diffusion.safetensors     # stage 2 state dict
      MODEL_CARD.md             # optional

``model.yaml`` holds ``format: glioforecast-model``, ``format_version``, the
:class:`~inference.model_config.ModelConfig` fields (``name``, ``version``, ``contrasts``,
``survival_classes``, ``preprocessing``, ``autoencoder``, ``diffusion``...) and a ``weights``
section naming each weight file with its SHA-256.

Loading validates everything and raises :class:`dicom_node.errors.InferenceError` saying what
was expected and what was found: missing files, unknown or ill-typed keys (dotted path), an
unsupported format version, a checksum mismatch, missing/unexpected tensors, shape mismatches
naming the tensor, NaN or infinite weights (a diverged training) naming the tensors. Weights
are read with ``safetensors`` (no code execution possible); a weight file in PyTorch's pickle
format (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) is accepted only if
``torch.load(weights_only=True)`` reads it, so a pickle that would run code is refused.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dicom_node.errors import InferenceError
from dicom_node.yamlload import load_yaml
from inference.model_config import ModelConfig, config_from_dict, config_to_dict
from inference.networks import LatentDiffusionModel, build_model

log = logging.getLogger(__name__)

MODEL_YAML = "model.yaml"
MODEL_CARD = "MODEL_CARD.md"
FORMAT = "glioforecast-model"
FORMAT_VERSION = 1
COMPONENTS = ("autoencoder", "diffusion")
DEFAULT_WEIGHT_FILES = {
    "autoencoder": "autoencoder.safetensors",
    "diffusion": "diffusion.safetensors",
}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
#: permissions of written weight files (readable by a service user, like model.yaml)
WEIGHTS_MODE = 0o644
_TOP_KEYS = ("format", "format_version", "kind", "weights")
#: ``kind`` of a latent diffusion model directory (the default when ``kind`` is absent)
KIND_LDM = "latent-diffusion"
#: ``kind`` of the deterministic UNet regression baseline (``inference.unet_baseline``)
KIND_UNET_BASELINE = "unet-baseline"
KINDS = (KIND_LDM, KIND_UNET_BASELINE)


@dataclass(frozen=True)
class WeightsEntry:
    file: str
    sha256: str | None


@dataclass
class LoadedModel:
    """A model read from a directory: the networks (on ``device``, in eval mode) and its card."""

    path: Path
    model: LatentDiffusionModel
    card: str | None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_yaml_dict(cfg: ModelConfig, weights: Mapping[str, WeightsEntry]) -> dict[str, Any]:
    """The content of ``model.yaml`` for a configuration and its weight files."""
    data: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    data.update(config_to_dict(cfg))
    data["weights"] = {
        name: {"file": entry.file, "sha256": entry.sha256} for name, entry in weights.items()
    }
    return data


def save_model_dir(
    model: LatentDiffusionModel,
    path: str | Path,
    *,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a model directory (weights as float32 safetensors).

    An existing ``model.yaml`` is replaced only with ``overwrite``. ``card`` (Markdown) becomes
    ``MODEL_CARD.md``. Returns the directory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MODEL_YAML).exists() and not overwrite:
        raise InferenceError(
            f"{out / MODEL_YAML} already exists (pass overwrite=True to replace it)"
        )
    entries: dict[str, WeightsEntry] = {}
    modules = {"autoencoder": model.autoencoder, "diffusion": model.unet}
    for name in COMPONENTS:
        file = DEFAULT_WEIGHT_FILES[name]
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in modules[name].state_dict().items()
        }
        tmp = out / (file + ".tmp")
        save_file(state, str(tmp), metadata={"component": name, "model": model.config.name})
        tmp.chmod(WEIGHTS_MODE)  # safetensors writes 0600; the node's service user must read it
        tmp.replace(out / file)
        entries[name] = WeightsEntry(file=file, sha256=sha256_file(out / file))
    text = yaml.safe_dump(model_yaml_dict(model.config, entries), sort_keys=False)
    tmp = out / (MODEL_YAML + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / MODEL_YAML)
    if card is not None:
        (out / MODEL_CARD).write_text(card, encoding="utf-8")
    log.info("saved model %s %s to %s", model.config.name, model.config.version, out)
    return out


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a model directory's ``model.yaml`` (not validated further)."""
    directory = Path(path)
    file = directory / MODEL_YAML
    if not directory.is_dir():
        raise InferenceError(f"model directory {directory}: expected a directory, found none")
    if not file.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise InferenceError(f"{directory}: expected {MODEL_YAML}, found only {found}")
    try:
        data = load_yaml(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{file}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InferenceError(
            f"{file}: expected a mapping at the top level, found {type(data).__name__}"
        )
    return data


def model_kind(path: str | Path) -> str:
    """The ``kind`` of a model directory: :data:`KIND_LDM` (also when absent) or
    :data:`KIND_UNET_BASELINE`; anything else is an error."""
    data = read_yaml_mapping(path)
    kind = data.get("kind", KIND_LDM)
    if kind not in KINDS:
        raise InferenceError(
            f"{Path(path) / MODEL_YAML}: kind: expected one of {list(KINDS)}, found {kind!r}"
        )
    return str(kind)


def read_model_yaml(path: str | Path) -> tuple[ModelConfig, dict[str, WeightsEntry]]:
    """Parse and validate ``model.yaml`` of a latent diffusion model directory (no weights are
    read)."""
    directory = Path(path)
    file = directory / MODEL_YAML
    data = read_yaml_mapping(directory)
    kind = data.get("kind", KIND_LDM)
    if kind != KIND_LDM:
        raise InferenceError(
            f"{file}: kind: expected {KIND_LDM!r} (a latent diffusion model), found {kind!r}"
            + (
                " (load it with inference.unet_baseline.load_baseline_dir)"
                if kind == KIND_UNET_BASELINE
                else ""
            )
        )
    problems: list[str] = []
    if data.get("format") != FORMAT:
        problems.append(f"format: expected {FORMAT!r}, found {data.get('format')!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        problems.append(
            f"format_version: expected {FORMAT_VERSION} (supported by this glioforecast), "
            f"found {version!r}"
        )
    weights = _parse_weights(data.get("weights"), problems)
    for key in ("name", "version"):
        if key not in data:
            problems.append(f"{key}: required key is missing")
    if problems:
        raise InferenceError(f"{file}:\n" + "\n".join(f"  - {p}" for p in problems))
    config_data = {k: v for k, v in data.items() if k not in _TOP_KEYS}
    cfg = config_from_dict(config_data, source=str(file), other_keys=_TOP_KEYS)
    return cfg, weights


def _parse_weights(section: Any, problems: list[str]) -> dict[str, WeightsEntry]:
    if section is None:
        problems.append(
            f"weights: required key is missing (expected entries for {list(COMPONENTS)})"
        )
        return {}
    if not isinstance(section, dict):
        problems.append(f"weights: expected a mapping, found {type(section).__name__}")
        return {}
    out: dict[str, WeightsEntry] = {}
    for key in section:
        if key not in COMPONENTS:
            problems.append(f"weights.{key}: unknown key (expected one of {', '.join(COMPONENTS)})")
    for name in COMPONENTS:
        entry = section.get(name)
        if entry is None:
            problems.append(f"weights.{name}: required key is missing")
            continue
        if not isinstance(entry, dict):
            problems.append(
                f"weights.{name}: expected a mapping with file and sha256, found {entry!r}"
            )
            continue
        for key in entry:
            if key not in ("file", "sha256"):
                problems.append(f"weights.{name}.{key}: unknown key (expected file, sha256)")
        file = entry.get("file")
        sha = entry.get("sha256")
        if (
            not isinstance(file, str)
            or not file
            or "/" in file
            or "\\" in file
            or file.startswith(".")
        ):
            problems.append(
                f"weights.{name}.file: expected a file name in the directory, found {file!r}"
            )
            continue
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            problems.append(f"weights.{name}.sha256: expected 64 hex digits or null, found {sha!r}")
            continue
        out[name] = WeightsEntry(file=file, sha256=sha)
    return out


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a PyTorch file readable with
    ``torch.load(weights_only=True)``; anything else is refused without being executed."""
    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"weights file {p}: expected a file, found none")
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InferenceError(
                f"weights file {p}: not a readable safetensors file ({exc})"
            ) from None
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            raise InferenceError(
                f"weights file {p}: refused, torch.load(weights_only=True) cannot read it "
                f"safely (it is not a plain tensor state dict; a pickle may run code): "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise InferenceError(
                f"weights file {p}: expected a mapping of tensor names to tensors, "
                f"found {type(obj).__name__}"
            )
        return obj
    raise InferenceError(
        f"weights file {p}: expected a .safetensors file (or {', '.join(PICKLE_SUFFIXES)} "
        f"loadable with weights_only=True), found suffix {suffix!r}"
    )


def non_finite_problems(state: Mapping[str, torch.Tensor], shown: int = 5) -> list[str]:
    """One line naming the floating-point tensors of ``state`` that hold NaN or infinite
    values (a diverged training, or corrupted weights), or none."""
    bad: list[str] = []
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        finite = torch.isfinite(v)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(v).sum())
        bad.append(f"{k!r} ({nan} NaN, {int((~finite).sum()) - nan} inf of {v.numel()})")
    if not bad:
        return []
    more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
    return [
        f"expected finite weights, found NaN or infinite values in {len(bad)} tensor(s) "
        f"(a diverged training or corrupted weights): {', '.join(bad[:shown])}{more}"
    ]


def load_state_checked(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load ``state`` into ``module`` after checking names, shapes and that every
    floating-point value is finite (all problems listed)."""
    expected = module.state_dict()
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(
                f"tensor {k!r}: model.yaml's architecture expects shape "
                f"{tuple(expected[k].shape)}, the file has {tuple(v.shape)}"
            )
        elif k in expected and not (v.is_floating_point() or v.dtype == expected[k].dtype):
            problems.append(f"tensor {k!r}: expected a floating-point tensor, found {v.dtype}")
    problems += non_finite_problems(state)
    if problems:
        raise InferenceError(f"{source}:\n" + "\n".join(f"  - {p}" for p in problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def component_state(
    directory: Path, weights: Mapping[str, WeightsEntry], name: str
) -> dict[str, torch.Tensor]:
    """The verified weights of one component (``autoencoder`` or ``diffusion``) of a model
    directory: the file model.yaml names must exist and match its SHA-256."""
    entry = weights[name]
    file = directory / entry.file
    if not file.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise InferenceError(
            f"{directory / MODEL_YAML}: weights.{name}.file names {entry.file}, which is "
            f"missing (the directory holds {found})"
        )
    if entry.sha256 is not None:
        digest = sha256_file(file)
        if digest != entry.sha256.lower():
            raise InferenceError(
                f"{file}: SHA-256 {digest} differs from model.yaml's {entry.sha256} "
                f"(corrupted or replaced weights)"
            )
    return load_weights_file(file)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Read, validate and load a model directory onto ``device`` (networks in eval mode)."""
    directory = Path(path)
    cfg, weights = read_model_yaml(directory)
    model = build_model(cfg)
    modules: dict[str, torch.nn.Module] = {
        "autoencoder": model.autoencoder,
        "diffusion": model.unet,
    }
    for name in COMPONENTS:
        load_state_checked(
            modules[name],
            component_state(directory, weights, name),
            f"{directory / weights[name].file} ({name})",
        )
    card_path = directory / MODEL_CARD
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    model.to(device).eval()
    log.info("loaded model %s %s from %s on %s", cfg.name, cfg.version, directory, device)
    return LoadedModel(path=directory, model=model, card=card)
