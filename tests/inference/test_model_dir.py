"""Model directories: save/load round trip, validation errors, unsafe weight files refused."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dicom_node.errors import InferenceError
from inference.model_dir import (
    MODEL_YAML,
    load_model_dir,
    load_weights_file,
    read_model_yaml,
    save_model_dir,
)
from inference.networks import LatentDiffusionModel
from inference.predict import predict_arrays

from .model_helpers import study, tiny_model, wake_up


@pytest.fixture(scope="module")
def model() -> LatentDiffusionModel:
    return wake_up(tiny_model(seed=2), seed=5)


@pytest.fixture
def saved(model: LatentDiffusionModel, tmp_path: Path) -> Path:
    return save_model_dir(model, tmp_path / "model", card="# Tiny test model\n")


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load((path / MODEL_YAML).read_text())
    assert isinstance(data, dict)
    return data


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    (path / MODEL_YAML).write_text(yaml.safe_dump(data, sort_keys=False))


def test_round_trip_gives_identical_outputs(model: LatentDiffusionModel, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [
        "MODEL_CARD.md",
        "autoencoder.safetensors",
        "diffusion.safetensors",
        "model.yaml",
    ]
    data = _yaml(saved)
    assert data["format"] == "glioforecast-model" and data["format_version"] == 1
    assert data["version"] == model.config.version
    assert data["survival_classes"] == list(model.config.survival_classes)
    assert data["preprocessing"]["spacing_mm"] == list(model.config.preprocessing.spacing_mm)
    assert len(data["weights"]["diffusion"]["sha256"]) == 64

    loaded = load_model_dir(saved, "cpu")
    assert loaded.config == model.config
    assert loaded.card == "# Tiny test model\n"
    assert not loaded.model.unet.training and not loaded.model.autoencoder.training
    for a, b in ((model.unet, loaded.model.unet), (model.autoencoder, loaded.model.autoencoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    inputs = study(model.config)
    before = predict_arrays(model, inputs, "short", seed=1)
    after = predict_arrays(loaded.model, inputs, "short", seed=1)
    assert np.array_equal(before.samples, after.samples)
    assert np.array_equal(before.tumour_mask, after.tumour_mask)
    assert before.sample_volumes_ml == after.sample_volumes_ml


def test_existing_directory_not_overwritten(model: LatentDiffusionModel, saved: Path) -> None:
    with pytest.raises(InferenceError, match="already exists"):
        save_model_dir(model, saved)
    save_model_dir(model, saved, overwrite=True)


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="expected a directory"):
        load_model_dir(tmp_path / "nowhere")
    (saved / "diffusion.safetensors").unlink()
    with pytest.raises(InferenceError) as err:
        load_model_dir(saved)
    msg = str(err.value)
    assert "weights.diffusion.file names diffusion.safetensors, which is missing" in msg
    assert "autoencoder.safetensors" in msg  # what the directory holds
    (saved / MODEL_YAML).unlink()
    with pytest.raises(InferenceError, match=r"expected model\.yaml, found only"):
        load_model_dir(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d["diffusion"].update(layers=3), "diffusion.layers: unknown key"),
        (lambda d: d["weights"].update(vae={"file": "x.safetensors"}), "weights.vae: unknown key"),
        (lambda d: d["weights"]["autoencoder"].update(url="http://x"), "weights.autoencoder.url"),
        (lambda d: d.update(format_version=2), "format_version: expected 1"),
        (lambda d: d.update(format="onnx"), "format: expected 'glioforecast-model'"),
        (lambda d: d.pop("version"), "version: required key is missing"),
        (lambda d: d.update(version=""), "version: expected a non-empty string"),
        (lambda d: d.pop("weights"), "weights: required key is missing"),
        (
            lambda d: d["weights"]["diffusion"].update(file="../diffusion.safetensors"),
            "weights.diffusion.file",
        ),
        (
            lambda d: d["autoencoder"].update(latent_channels="2"),
            "autoencoder.latent_channels: expected an integer",
        ),
        (lambda d: d["preprocessing"].update(crop_shape=[16, 16]), "preprocessing.crop_shape"),
    ],
)
def test_model_yaml_errors_name_the_key(saved: Path, edit: Any, message: str) -> None:
    data = _yaml(saved)
    edit(data)
    _write_yaml(saved, data)
    with pytest.raises(InferenceError) as err:
        load_model_dir(saved)
    assert message in str(err.value)
    assert str(saved / MODEL_YAML) in str(err.value)


def test_yaml_that_is_not_a_mapping(saved: Path) -> None:
    (saved / MODEL_YAML).write_text("- just\n- a list\n")
    with pytest.raises(InferenceError, match="expected a mapping at the top level"):
        read_model_yaml(saved)
    (saved / MODEL_YAML).write_text("name: [unclosed\n")
    with pytest.raises(InferenceError, match="not valid YAML"):
        read_model_yaml(saved)
    # a hand-edited model.yaml with a key twice: one edit would be lost in silence
    (saved / MODEL_YAML).write_text("name: x\nversion: 1.0.0\nversion: 2.0.0\n")
    with pytest.raises(InferenceError, match=r"not valid YAML .*duplicate key 'version'"):
        read_model_yaml(saved)


def test_checksum_mismatch(saved: Path) -> None:
    data = _yaml(saved)
    data["weights"]["autoencoder"]["sha256"] = "0" * 64
    _write_yaml(saved, data)
    with pytest.raises(InferenceError, match=r"SHA-256 \w+ differs from model\.yaml's 0000"):
        load_model_dir(saved)


def test_shape_mismatch_names_the_tensor(saved: Path) -> None:
    data = _yaml(saved)
    data["autoencoder"]["latent_channels"] = 3  # the stored weights have 2
    _write_yaml(saved, data)
    with pytest.raises(InferenceError) as err:
        load_model_dir(saved)
    msg = str(err.value)
    assert "autoencoder.safetensors (autoencoder)" in msg
    assert (
        "tensor 'quant_conv_mu.conv.weight': model.yaml's architecture expects shape "
        "(3, 3, 1, 1, 1)" in msg
    )
    assert "the file has (2, 2, 1, 1, 1)" in msg


def test_missing_and_unexpected_tensors(saved: Path) -> None:
    file = saved / "diffusion.safetensors"
    state = load_file(str(file))
    removed = next(iter(state))
    del state[removed]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(file))
    data = _yaml(saved)
    data["weights"]["diffusion"]["sha256"] = None
    _write_yaml(saved, data)
    with pytest.raises(InferenceError) as err:
        load_model_dir(saved)
    assert f"1 tensor(s) missing, e.g. ['{removed}']" in str(err.value)
    assert "1 unexpected tensor(s), e.g. ['extra.weight']" in str(err.value)


def test_non_finite_weights_are_refused_naming_the_tensors(saved: Path) -> None:
    """Weights of a diverged training (NaN, inf), re-signed so that the SHA-256 matches, used
    to load and predict a "complete response" with no spread."""
    from inference.model_dir import sha256_file

    file = saved / "diffusion.safetensors"
    state = load_file(str(file))
    floats = [k for k, v in state.items() if v.is_floating_point()]
    nan_key, inf_key = floats[0], floats[1]
    state[nan_key] = torch.full_like(state[nan_key], float("nan"))
    state[inf_key] = state[inf_key].clone()
    state[inf_key].view(-1)[0] = float("inf")
    save_file(state, str(file))
    data = _yaml(saved)
    data["weights"]["diffusion"]["sha256"] = sha256_file(file)
    _write_yaml(saved, data)
    with pytest.raises(InferenceError) as err:
        load_model_dir(saved)
    text = str(err.value)
    assert "expected finite weights, found NaN or infinite values in 2 tensor(s)" in text
    n = state[nan_key].numel()
    assert f"{nan_key!r} ({n} NaN, 0 inf of {n})" in text
    assert f"{inf_key!r} (0 NaN, 1 inf of {state[inf_key].numel()})" in text


def test_corrupt_safetensors(saved: Path) -> None:
    (saved / "diffusion.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InferenceError, match="not a readable safetensors file"):
        load_weights_file(saved / "diffusion.safetensors")


def _use_weights_file(saved: Path, component: str, name: str) -> None:
    data = _yaml(saved)
    data["weights"][component] = {"file": name, "sha256": None}
    _write_yaml(saved, data)


def test_plain_state_dict_pickle_is_accepted(model: LatentDiffusionModel, saved: Path) -> None:
    torch.save(model.unet.state_dict(), saved / "diffusion.pt")
    (saved / "diffusion.safetensors").unlink()
    _use_weights_file(saved, "diffusion", "diffusion.pt")
    loaded = load_model_dir(saved)
    sa, sb = model.unet.state_dict(), loaded.model.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


class _Payload:
    """Unpickling this object runs code (writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_malicious_pickle_is_refused_without_running(
    model: LatentDiffusionModel, saved: Path, tmp_path: Path, suffix: str
) -> None:
    marker = tmp_path / "pwned"
    evil: dict[str, Any] = dict(model.unet.state_dict())
    evil["__payload__"] = _Payload(marker)
    name = "diffusion" + suffix
    if suffix == ".ckpt":  # a bare pickle stream rather than torch's zip container
        (saved / name).write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save(evil, saved / name)
    _use_weights_file(saved, "diffusion", name)
    with pytest.raises(InferenceError) as err:
        load_model_dir(saved)
    assert "refused" in str(err.value) and "weights_only=True" in str(err.value)
    assert not marker.exists()

    # control: the payload is live, an unrestricted load would have run it
    control = tmp_path / "control"
    if suffix == ".ckpt":
        pickle.loads(pickle.dumps(_Payload(control)))
    else:
        torch.save({"x": _Payload(control)}, tmp_path / "control.pt")
        torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "code ran"


def test_pickle_of_something_else_is_refused(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InferenceError, match="expected a mapping of tensor names to tensors"):
        load_weights_file(tmp_path / "list.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(InferenceError, match=r"expected a \.safetensors file"):
        load_weights_file(tmp_path / "w.npz")
