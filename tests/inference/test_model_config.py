"""Model configuration: presets, plain-data round trip, validation messages."""

from __future__ import annotations

import pytest

from dicom_node.errors import InferenceError
from inference.model_config import (
    ModelConfig,
    config_from_dict,
    config_to_dict,
    demo_config,
    preset,
    tiny_config,
)
from inference.networks import build_model


def test_presets_are_valid_and_consistent() -> None:
    tiny = tiny_config()
    assert tiny.preprocessing.crop_shape == (16, 16, 16)
    assert tiny.compression == 4
    assert tiny.latent_shape == (4, 4, 4)
    assert tiny.null_class == tiny.num_classes == 3
    demo = demo_config()
    assert demo.compression == 4
    assert min(demo.preprocessing.spacing_mm) >= 2.0
    assert preset("demo") == demo
    with pytest.raises(InferenceError, match="unknown model preset 'huge'"):
        preset("huge")


def test_demo_weights_fit_the_budget() -> None:
    model = build_model(demo_config())
    assert model.parameter_bytes() <= 25 * 1024 * 1024
    # noisy latent + T1-Gd and FLAIR latents, mask, dose, 2 availability flags
    assert model.unet.in_channels == 4 + 2 * 4 + 1 + 1 + 2
    assert model.autoencoder.decoder is not None


def test_dict_round_trip() -> None:
    cfg = tiny_config(survival_classes=("a", "b"), contrasts=("t1c",), use_dose=False)
    data = config_to_dict(cfg)
    assert data["contrasts"] == ["t1c"]
    assert isinstance(data["autoencoder"]["channels"], list)
    assert config_from_dict(data) == cfg
    # a model.yaml written before residual targets existed reads as a latent-target model
    del data["diffusion"]["target"], data["diffusion"]["residual_scale"]
    assert config_from_dict(data).diffusion.target == "latent"
    # ... and one written before velocity prediction and the tumour weight as what it was
    del data["scheduler"]["prediction_type"], data["training"]["tumour_loss_weight"]
    old = config_from_dict(data)
    assert (old.scheduler.prediction_type, old.training.tumour_loss_weight) == ("epsilon", 0.0)
    # ... and one written before the class shares and the unknown-class mode as unguided
    del data["survival_class_prior"], data["inference"]["unknown_class"]
    old = config_from_dict(data)
    assert (old.survival_class_prior, old.inference.unknown_class) == ((), "null_class")
    assert old.class_prior() == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"autoencoder": {"chanels": [8, 8, 8]}}, "autoencoder.chanels: unknown key"),
        ({"colour": "red"}, "colour: unknown key"),
        (
            {"autoencoder": {"channels": "eight"}},
            "autoencoder.channels: expected a list of an integer",
        ),
        (
            {"preprocessing": {"spacing_mm": [1.0, 1.0]}},
            "preprocessing.spacing_mm: expected a list of 3",
        ),
        ({"use_dose": "yes"}, "use_dose: expected true or false"),
        (
            {"scheduler": {"num_inference_steps": 1.5}},
            "scheduler.num_inference_steps: expected an integer",
        ),
        (
            {"preprocessing": {"crop_shape": [16, 16, 12]}},
            "preprocessing.crop_shape: expected multiples of 8",
        ),
        ({"contrasts": ["flair", "t1c"]}, "contrasts: expected 't1c' first"),
        ({"training": {"p_drop_class": 1.5}}, "training.p_drop_class: expected a probability"),
        ({"training": {"ema_decay": 1.0}}, "training.ema_decay: expected 0 (off) or a decay"),
        (
            {"training": {"tumour_loss_weight": -1.0}},
            "training.tumour_loss_weight: expected >= 0 (0: off), found -1.0",
        ),
        (
            {"scheduler": {"prediction_type": "sample"}},
            "scheduler.prediction_type: expected one of epsilon, v_prediction, found 'sample'",
        ),
        ({"inference": {"mask_threshold": 0}}, "inference.mask_threshold: expected in (0, 1)"),
        (
            {"autoencoder": {"channels": [8, 10, 8]}},
            "autoencoder.channels: expected multiples of norm_num_groups",
        ),
        (
            {"training": {"autoencoder_patch": [8, 8, 6]}},
            "training.autoencoder_patch: expected empty or 3 sizes, multiples of 4",
        ),
        (
            {"training": {"autoencoder_patch": [8, 8, 32]}},
            "within the crop [16, 16, 16], found [8, 8, 32]",
        ),
        (
            {"diffusion": {"target": "delta"}},
            "diffusion.target: expected one of ['latent', 'residual'], found 'delta'",
        ),
        (
            {"diffusion": {"residual_scale": 0.0}},
            "diffusion.residual_scale: expected a number > 0, found 0.0",
        ),
        (
            {"survival_class_prior": [0.5, 0.5]},
            "survival_class_prior: expected empty or 3 shares >= 0 summing to 1 (one per "
            "survival class), found [0.5, 0.5]",
        ),
        ({"survival_class_prior": [0.5, 0.6, -0.1]}, "survival_class_prior: expected empty"),
        ({"survival_class_prior": [0.2, 0.2, 0.2]}, "summing to 1"),
        (
            {"inference": {"unknown_class": "null"}},
            "inference.unknown_class: expected one of null_class, marginal, found 'null'",
        ),
    ],
)
def test_validation_names_the_key(change: dict[str, object], key: str) -> None:
    data = config_to_dict(tiny_config())
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    with pytest.raises(InferenceError) as err:
        config_from_dict(data, source="model.yaml")
    assert key in str(err.value)
    assert "model.yaml" in str(err.value)


def test_all_problems_reported_at_once() -> None:
    data = config_to_dict(tiny_config())
    data["colour"] = 1
    data["diffusion"] = {**data["diffusion"], "channels": "x"}
    with pytest.raises(InferenceError) as err:
        config_from_dict(data)
    assert "colour" in str(err.value) and "diffusion.channels" in str(err.value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InferenceError, match="survival_classes: duplicates"):
        ModelConfig(survival_classes=("a", "a"))


def test_class_prior() -> None:
    assert tiny_config().class_prior() == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    cfg = tiny_config(survival_class_prior=(0.33, 0.44, 0.23))
    assert cfg.class_prior() == (0.33, 0.44, 0.23)


def test_class_index() -> None:
    cfg = tiny_config()
    assert cfg.class_index("short") == 0
    assert cfg.class_index(None) == cfg.null_class
    with pytest.raises(InferenceError, match="unknown survival class 'medium'"):
        cfg.class_index("medium")
