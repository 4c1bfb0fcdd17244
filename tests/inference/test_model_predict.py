"""Prediction core: samples -> mean, std, tumour mask, volumes, response probabilities."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dicom_node.errors import InferenceError
from dicom_node.types import RESPONSE_CATEGORIES, most_frequent_category
from inference.metrics import voxel_volume_ml
from inference.model_config import ResponseConfig
from inference.networks import LatentDiffusionModel
from inference.predict import (
    PredictionInputs,
    predict_arrays,
    predict_per_class,
    response_category,
    response_probabilities,
    stratified_classes,
    tumour_volume_ml,
)
from inference.sampler import decode_latents

from .model_helpers import study, tiny_model, wake_up


@pytest.fixture(scope="module")
def model() -> LatentDiffusionModel:
    return wake_up(tiny_model(seed=1))


def test_prediction_outputs(model: LatentDiffusionModel) -> None:
    cfg = model.config
    inputs = study(cfg)
    p = predict_arrays(model, inputs, "short", num_samples=3, seed=4)
    shape = cfg.preprocessing.crop_shape
    assert p.samples.shape == (3, *shape) and p.samples.dtype == np.float32
    assert p.sample_mask_probabilities.shape == (3, *shape)
    assert p.mean.shape == p.std.shape == p.tumour_probability.shape == shape
    assert p.tumour_mask.dtype == np.bool_
    np.testing.assert_allclose(p.mean, p.samples.mean(0), rtol=1e-6)
    np.testing.assert_allclose(p.std, p.samples.std(0), rtol=1e-5, atol=1e-6)
    assert np.array_equal(p.tumour_mask, p.sample_mask_probabilities.mean(0) >= 0.5)
    voxel = voxel_volume_ml(cfg.preprocessing.spacing_mm)
    expected = [float((s >= 0.5).sum()) * voxel for s in p.sample_mask_probabilities]
    assert list(p.sample_volumes_ml) == pytest.approx(expected)
    assert p.current_volume_ml == pytest.approx(inputs.mask.sum() * voxel)
    assert set(p.response_probabilities) == set(RESPONSE_CATEGORIES)
    assert sum(p.response_probabilities.values()) == pytest.approx(1.0)
    assert p.response_category in RESPONSE_CATEGORIES
    mean_volume = float(np.mean(p.sample_volumes_ml))
    assert p.mean_volume_category == response_category(p.current_volume_ml, mean_volume)
    assert (p.survival_class, p.guidance_scale, p.seed) == (
        "short",
        cfg.inference.guidance_scale,
        4,
    )
    assert (p.model_name, p.model_version) == (cfg.name, cfg.version)
    assert p.num_samples == 3
    assert float(p.std.max()) > 0  # samples differ


def test_prediction_is_seeded(model: LatentDiffusionModel) -> None:
    inputs = study(model.config)
    a = predict_arrays(model, inputs, "long", seed=7)
    b = predict_arrays(model, inputs, "long", seed=7)
    c = predict_arrays(model, inputs, "long", seed=8)
    assert np.array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, c.samples)


@pytest.mark.parametrize(("flair", "dose"), [(False, True), (True, False), (False, False)])
def test_missing_optional_inputs(model: LatentDiffusionModel, flair: bool, dose: bool) -> None:
    full = predict_arrays(model, study(model.config), None, seed=2)
    part = predict_arrays(model, study(model.config, flair=flair, dose=dose), None, seed=2)
    assert part.samples.shape == full.samples.shape
    assert np.isfinite(part.samples).all()
    assert not np.array_equal(part.samples, full.samples)  # the flags and inputs changed


def test_per_class_predictions_are_paired(model: LatentDiffusionModel) -> None:
    out = predict_per_class(model, study(model.config), include_unguided=True, seed=3)
    assert list(out) == [*model.config.survival_classes, None]
    assert not np.array_equal(out["short"].samples, out["long"].samples)
    assert all(p.seed == 3 for p in out.values())


@pytest.mark.parametrize(
    ("prior", "n", "expected"),
    [
        ((0.33, 0.44, 0.23), 4, [0, 1, 1, 2]),
        ((0.33, 0.44, 0.23), 8, [0, 0, 0, 1, 1, 1, 2, 2]),
        ((1 / 3, 1 / 3, 1 / 3), 3, [0, 1, 2]),
        ((0.33, 0.44, 0.23), 1, [1]),  # one sample: the median class
        ((0.0, 1.0, 0.0), 4, [1, 1, 1, 1]),  # a class without patients gets no sample
        ((2.0, 2.0), 2, [0, 1]),  # counts work as well as shares
    ],
)
def test_stratified_classes(prior: tuple[float, ...], n: int, expected: list[int]) -> None:
    assert stratified_classes(prior, n) == expected


def test_stratified_classes_refuse_empty_shares() -> None:
    with pytest.raises(InferenceError, match="expected positive shares"):
        stratified_classes((0.0, 0.0), 2)
    with pytest.raises(InferenceError, match="samples: expected >= 1"):
        stratified_classes((0.5, 0.5), 0)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_marginal_samples_are_those_of_their_classes(
    model: LatentDiffusionModel, scale: float
) -> None:
    """Without a class, ``marginal`` gives each sample a class drawn by the prior; sample i is
    then the sample i that a prediction under that class gives with the same seed."""
    cfg = model.config.replace(survival_class_prior=(0.25, 0.5, 0.25))
    m = dataclasses.replace(model, config=cfg)
    inputs = study(cfg)
    kw = {"num_samples": 4, "seed": 5, "guidance_scale": scale}
    mixed = predict_arrays(m, inputs, None, unknown_class="marginal", **kw)
    assert mixed.sample_classes == ("short", "intermediate", "intermediate", "long")
    assert mixed.survival_class is None
    for i, c in enumerate(mixed.sample_classes):
        alone = predict_arrays(m, inputs, c, **kw)
        np.testing.assert_allclose(mixed.samples[i], alone.samples[i], atol=1e-5)
    null = predict_arrays(m, inputs, None, **kw)  # the model's default: the null class
    assert null.sample_classes == (None,) * 4
    assert not np.allclose(null.samples, mixed.samples)
    # a class given wins over the mode
    given = predict_arrays(m, inputs, "long", unknown_class="marginal", **kw)
    assert given.sample_classes == ("long",) * 4
    with pytest.raises(InferenceError, match="unknown_class: expected one of"):
        predict_arrays(m, inputs, None, unknown_class="mixture", **kw)


def test_input_validation(model: LatentDiffusionModel) -> None:
    cfg = model.config
    inputs = study(cfg)
    with pytest.raises(InferenceError, match="mask: expected the t1c shape"):
        PredictionInputs(t1c=inputs.t1c, mask=inputs.mask[:-1])
    with pytest.raises(InferenceError, match="dose: expected finite values"):
        PredictionInputs(t1c=inputs.t1c, mask=inputs.mask, dose=np.full(inputs.shape, np.nan))
    small = PredictionInputs(t1c=inputs.t1c[:8], mask=inputs.mask[:8])
    with pytest.raises(InferenceError, match=r"expected the model grid shape \(16, 16, 16\)"):
        predict_arrays(model, small)
    with pytest.raises(InferenceError, match="unknown survival class"):
        predict_arrays(model, inputs, "forever")
    with pytest.raises(InferenceError, match="num_samples: expected >= 1"):
        predict_arrays(model, inputs, num_samples=0)


def test_current_volume_override(model: LatentDiffusionModel) -> None:
    p = predict_arrays(model, study(model.config), None, current_volume_ml=1e6, num_samples=2)
    assert p.current_volume_ml == 1e6
    assert p.response_probabilities["partial_response"] + p.response_probabilities[
        "complete_response"
    ] == pytest.approx(1.0)


# response categories on hand-made volumes ---------------------------------------------------


@pytest.mark.parametrize(
    ("current", "predicted", "category"),
    [
        (10.0, 0.0, "complete_response"),
        (10.0, 0.05, "complete_response"),  # below 0.1 ml: no enhancing tumour left
        (10.0, 3.5, "partial_response"),  # -65 % exactly
        (10.0, 3.6, "stable_disease"),  # -64 %
        (10.0, 13.9, "stable_disease"),  # +39 %
        (10.0, 14.0, "progressive_disease"),  # +40 % exactly
        (10.0, 40.0, "progressive_disease"),
        (0.0, 2.0, "progressive_disease"),  # new enhancement where there was none
        (10.0, 10.0, "stable_disease"),
    ],
)
def test_response_category_thresholds(current: float, predicted: float, category: str) -> None:
    assert response_category(current, predicted) == category


def test_response_probabilities_sum_to_one() -> None:
    volumes = [0.0, 3.0, 9.0, 11.0, 20.0, 14.0, 12.0, 8.0]
    probs = response_probabilities(10.0, volumes)
    assert list(probs) == list(RESPONSE_CATEGORIES)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs == {
        "complete_response": 1 / 8,
        "partial_response": 1 / 8,
        "stable_disease": 4 / 8,
        "progressive_disease": 2 / 8,
    }
    with pytest.raises(InferenceError, match="at least one sample"):
        response_probabilities(10.0, [])


def test_equally_frequent_categories_go_to_the_mean_volume() -> None:
    """Four samples, two a partial response and two stable (the demo study of the README): the
    category reported is the one of the mean volume, like the relative change beside it."""
    volumes = [3.0, 2.0, 12.0, 11.0]  # from 10 ml: -70 %, -80 %, +20 %, +10 %; mean 7 ml, -30 %
    probs = response_probabilities(10.0, volumes)
    assert probs["partial_response"] == probs["stable_disease"] == 0.5
    tie = response_category(10.0, float(np.mean(volumes)))
    assert tie == "stable_disease"
    assert most_frequent_category(probs, tie) == "stable_disease"
    assert most_frequent_category(probs, None) == "partial_response"  # first in order
    assert most_frequent_category(probs, "complete_response") == "partial_response"  # not tied
    # no tie: the most frequent one, whatever the mean says
    three = response_probabilities(10.0, [3.0, 2.0, 1.0, 11.0])
    assert most_frequent_category(three, "stable_disease") == "partial_response"


def test_response_rule_is_configurable() -> None:
    strict = ResponseConfig(complete_ml=1.0, partial=-0.3, progressive=0.2)
    assert response_category(10.0, 0.5, strict) == "complete_response"
    assert response_category(10.0, 7.0, strict) == "partial_response"
    assert response_category(10.0, 12.0, strict) == "progressive_disease"
    assert dataclasses.asdict(ResponseConfig()) == {
        "complete_ml": 0.1,
        "partial": -0.65,
        "progressive": 0.40,
    }


def test_tumour_volume() -> None:
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[:2, :2, :2] = True
    assert tumour_volume_ml(mask, (2.0, 2.0, 2.0)) == pytest.approx(8 * 8 / 1000)
    assert tumour_volume_ml(mask.astype(np.float32) * 0.5, (1.0, 1.0, 1.0)) == pytest.approx(0.004)


def test_missing_inputs_reach_the_unet_as_flags(
    model: LatentDiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    original = model.unet.forward

    def spy(x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return original(x, timesteps=timesteps, class_labels=class_labels)

    layout = model.layout
    off = model.config.autoencoder.latent_channels
    monkeypatch.setattr(model.unet, "forward", spy)
    predict_arrays(model, study(model.config, flair=False, dose=False), "short", num_samples=1)
    x = seen[-1]
    for name in ("flair_available", "dose_available", "dose"):
        assert float(x[:, off + layout.channel(name)].abs().max()) == 0.0, name
    fl = layout.latent_slice("flair")
    assert float(x[:, off + fl.start : off + fl.stop].abs().max()) == 0.0
    predict_arrays(model, study(model.config), "short", num_samples=1)
    x = seen[-1]
    for name in ("flair_available", "dose_available"):
        assert float(x[:, off + layout.channel(name)].min()) == 1.0, name


def test_current_volume_measured_by_the_mask_channel(model: LatentDiffusionModel) -> None:
    inputs = study(model.config)
    p = predict_arrays(model, inputs, None, num_samples=1, current_from="model")
    pre = decode_latents(model, model.encode(torch.from_numpy(inputs.t1c)[None, None]))
    expected = tumour_volume_ml(
        torch.sigmoid(pre[0, 1]).numpy() >= 0.5, model.config.preprocessing.spacing_mm
    )
    assert p.current_volume_ml == pytest.approx(expected)
    with pytest.raises(InferenceError, match="current_from: expected 'mask' or 'model'"):
        predict_arrays(model, inputs, current_from="gtv")  # type: ignore[arg-type]
