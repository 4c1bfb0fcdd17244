"""The demo model shipped in the package: present, valid, trained, within the size budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import InferenceError
from inference.bundled import DEMO_MODEL, demo_model_dir, model_option
from inference.model_dir import load_model_dir
from inference.train.loops import read_train_state


def test_the_bundled_model_loads_and_is_trained() -> None:
    directory = demo_model_dir()
    loaded = load_model_dir(directory)  # checks format, keys, SHA-256 and tensor shapes
    assert loaded.config.name == "glioforecast-demo"
    assert loaded.config.preprocessing.spacing_mm == (4.0, 4.0, 4.0)
    stages = read_train_state(directory)["stages"]
    assert set(stages) == {"autoencoder", "diffusion"}
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024
    assert not (directory / "checkpoints").exists()  # training state is not shipped
    assert (directory / "MODEL_CARD.md").read_text().count("synthetic") >= 1


def test_model_option() -> None:
    assert model_option("none") is None
    assert model_option("bundled") == DEMO_MODEL
    assert model_option(str(DEMO_MODEL)) == DEMO_MODEL.resolve()
    with pytest.raises(InferenceError, match=r"expected bundled, none or a model directory"):
        model_option("/nonexistent/model")


def test_a_missing_bundle_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import inference.bundled as bundled

    monkeypatch.setattr(bundled, "DEMO_MODEL", tmp_path / "gone")
    with pytest.raises(InferenceError, match=r"the bundled demo model is missing: expected .*gone"):
        bundled.demo_model_dir()
