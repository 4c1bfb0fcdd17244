"""Conditioning tensor layout, missing inputs and condition dropout."""

from __future__ import annotations

import pytest
import torch

from dicom_node.errors import InferenceError
from inference.conditioning import (
    ConditioningLayout,
    build_conditioning,
    drop_class_labels,
    drop_inputs,
    to_latent_grid,
)
from inference.model_config import tiny_config

from .model_helpers import tiny_model  # noqa: F401  (sets one thread)

CFG = tiny_config()
LAYOUT = ConditioningLayout.from_config(CFG)
L = CFG.autoencoder.latent_channels
LAT = CFG.latent_shape


def _inputs(batch: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents: dict[str, torch.Tensor] = {
        "t1c": torch.randn(batch, L, *LAT, generator=g),
        "flair": torch.randn(batch, L, *LAT, generator=g),
    }
    mask = torch.zeros(batch, 1, 16, 16, 16)
    mask[:, :, :8, :8, :8] = 1.0  # exactly the first latent octant... of 2x2x2 latent voxels
    dose = torch.full((batch, 1, 16, 16, 16), 0.5)
    return latents, mask, dose


def test_layout_names_every_channel() -> None:
    names = LAYOUT.channel_names
    assert LAYOUT.num_channels == 2 * L + 4
    assert names[: 2 * L] == tuple(f"{c}_latent_{n}" for c in ("t1c", "flair") for n in range(L))
    assert names[2 * L :] == ("mask", "dose", "flair_available", "dose_available")
    assert LAYOUT.latent_slice("flair") == slice(L, 2 * L)
    no_extras = ConditioningLayout.from_config(tiny_config(contrasts=("t1c",), use_dose=False))
    assert no_extras.channel_names[-1] == "mask" and no_extras.num_channels == L + 1
    with pytest.raises(InferenceError, match="no conditioning channel 'dose'"):
        no_extras.channel("dose")


def test_full_inputs() -> None:
    latents, mask, dose = _inputs()
    cond = build_conditioning(LAYOUT, latents, mask, dose)
    assert cond.shape == (2, LAYOUT.num_channels, *LAT)
    assert torch.equal(cond[:, :L], latents["t1c"])
    assert torch.equal(cond[:, L : 2 * L], latents["flair"])
    m = cond[:, LAYOUT.channel("mask")]
    assert torch.allclose(m[:, :2, :2, :2], torch.ones(2, 2, 2, 2))
    assert float(m.sum()) == pytest.approx(2 * 8)  # 8 latent voxels fully inside per sample
    assert torch.allclose(cond[:, LAYOUT.channel("dose")], torch.full((2, *LAT), 0.5))
    assert torch.all(cond[:, LAYOUT.channel("flair_available")] == 1)
    assert torch.all(cond[:, LAYOUT.channel("dose_available")] == 1)


def test_missing_flair_and_dose_set_flags_and_zero_channels() -> None:
    latents, mask, _ = _inputs()
    given: dict[str, torch.Tensor | None] = {**latents, "flair": None}
    cond = build_conditioning(LAYOUT, given, mask, None)
    assert torch.all(cond[:, L : 2 * L] == 0)
    assert torch.all(cond[:, LAYOUT.channel("dose")] == 0)
    assert torch.all(cond[:, LAYOUT.channel("flair_available")] == 0)
    assert torch.all(cond[:, LAYOUT.channel("dose_available")] == 0)
    assert torch.equal(cond[:, :L], latents["t1c"])


def test_per_sample_availability_zeroes_the_input() -> None:
    latents, mask, dose = _inputs()
    avail = {"flair": torch.tensor([True, False]), "dose": torch.tensor([False, True])}
    cond = build_conditioning(LAYOUT, latents, mask, dose, available=avail)
    assert torch.equal(cond[0, L : 2 * L], latents["flair"][0])
    assert torch.all(cond[1, L : 2 * L] == 0)
    assert torch.all(cond[0, LAYOUT.channel("dose")] == 0)
    assert torch.all(cond[1, LAYOUT.channel("dose")] == 0.5)
    assert cond[0, LAYOUT.channel("flair_available")].unique().tolist() == [1.0]
    assert cond[1, LAYOUT.channel("flair_available")].unique().tolist() == [0.0]
    assert cond[0, LAYOUT.channel("dose_available")].unique().tolist() == [0.0]


def test_required_and_shapes_checked() -> None:
    latents, mask, dose = _inputs()
    with pytest.raises(InferenceError, match="t1c latent is required"):
        build_conditioning(LAYOUT, {"flair": latents["flair"]}, mask, dose)
    with pytest.raises(InferenceError, match="flair latent: expected shape"):
        build_conditioning(LAYOUT, {**latents, "flair": torch.zeros(2, L, 2, 2, 2)}, mask, dose)
    with pytest.raises(InferenceError, match="tumour mask: expected shape"):
        build_conditioning(LAYOUT, latents, mask[:, 0], dose)
    with pytest.raises(InferenceError, match="availability given for 't2'"):
        build_conditioning(LAYOUT, latents, mask, dose, available={"t2": torch.ones(2)})


def test_unused_inputs_are_ignored() -> None:
    layout = ConditioningLayout.from_config(tiny_config(contrasts=("t1c",), use_dose=False))
    latents, mask, dose = _inputs()
    cond = build_conditioning(layout, latents, mask, dose)
    assert cond.shape[1] == L + 1


def test_to_latent_grid_averages() -> None:
    x = torch.zeros(1, 1, 16, 16, 16)
    x[..., :2, :2, :2] = 1.0  # one eighth of a 4^3 block
    y = to_latent_grid(x, (4, 4, 4))
    assert float(y[0, 0, 0, 0, 0]) == pytest.approx(8 / 64)
    assert to_latent_grid(y, (4, 4, 4)) is y


def test_input_dropout_probabilities() -> None:
    n = 4000
    avail = {"flair": torch.ones(n, dtype=torch.bool), "dose": torch.ones(n, dtype=torch.bool)}
    g = torch.Generator().manual_seed(1)
    out = drop_inputs(LAYOUT, avail, 0.3, 0.0, g)
    assert out["dose"].all()
    assert 0.26 < 1 - out["flair"].float().mean() < 0.34
    never = drop_inputs(LAYOUT, {**avail, "flair": torch.zeros(n, dtype=torch.bool)}, 0.0, 1.0, g)
    assert not never["flair"].any() and not never["dose"].any()
    # same seed, same draws
    a = drop_inputs(LAYOUT, avail, 0.5, 0.5, torch.Generator().manual_seed(7))
    b = drop_inputs(LAYOUT, avail, 0.5, 0.5, torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_class_label_dropout() -> None:
    labels = torch.tensor([0, 1, 2, 3] * 500)
    g = torch.Generator().manual_seed(0)
    out = drop_class_labels(labels, 3, 0.25, g)
    kept = out == labels
    assert torch.all(out[~kept] == 3)
    dropped = float((out[labels != 3] == 3).float().mean())
    assert 0.2 < dropped < 0.3
    assert torch.all(drop_class_labels(labels, 3, 1.0, g) == 3)
    assert torch.equal(drop_class_labels(labels, 3, 0.0, g), labels)
