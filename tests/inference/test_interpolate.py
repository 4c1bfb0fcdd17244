"""Moving a diffusion model's weight average towards its run's last weights
(``python -m inference.train.interpolate``): the blend, its record, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dicom_node.errors import InferenceError
from inference.model_dir import load_model_dir, read_model_yaml
from inference.model_predictor import ModelPredictor
from inference.synthetic.cohort import PatientRecord
from inference.train.interpolate import interpolate_towards_last, main
from inference.train.loops import TrainOptions, train_diffusion

Cohort = tuple[Path, list[PatientRecord]]


@pytest.fixture(scope="module")
def averaged_dir(
    tiny_cohort: Cohort, tiny_ldm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny stage-2 run of two epochs that keeps a weight average (decay 0.9)."""
    out = tmp_path_factory.mktemp("averaged")
    options = TrainOptions(
        epochs=2, batch_size=2, learning_rate=1e-3, progress=False, ema_decay=0.9
    )
    train_diffusion([tiny_cohort[0]], out, options, stage1_dir=tiny_ldm_dir)
    return out


def test_the_blend_lies_between_the_average_and_the_last_weights(
    averaged_dir: Path, tmp_path: Path
) -> None:
    ckpt = averaged_dir / "checkpoints" / "diffusion"
    average = load_file(str(ckpt / "average.safetensors"))
    last = load_file(str(ckpt / "weights.safetensors"))
    moved = [k for k in average if not torch.equal(average[k], last[k])]
    assert moved  # two epochs moved the weights away from their average

    for alpha in (0.0, 0.25, 1.0):
        out = interpolate_towards_last(
            averaged_dir, alpha, tmp_path / f"a{alpha}", name="blend", version="1.2.3"
        )
        got = load_file(str(out / "diffusion.safetensors"))
        for k in average:
            want = (1 - alpha) * average[k] + alpha * last[k]
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)
        # stage 1 is the source's, tensor for tensor; the configuration too, but name and version
        src_yaml, _ = read_model_yaml(averaged_dir)
        new_yaml, _ = read_model_yaml(out)
        assert new_yaml == src_yaml.replace(name="blend", version="1.2.3")
        ae_new = load_file(str(out / "autoencoder.safetensors"))
        ae_src = load_file(str(averaged_dir / "autoencoder.safetensors"))
        assert ae_new.keys() == ae_src.keys()
        assert all(torch.equal(ae_new[k], ae_src[k]) for k in ae_src)
        record = json.loads((out / "train_state.json").read_text())["stages"]["diffusion"]
        assert record["interpolation"]["alpha"] == alpha
        assert record["interpolation"]["source"] == str(averaged_dir)
        assert record["epochs"] == 2  # the training record is carried over
    # a normal model directory: it loads (hashes checked) and the node's predictor takes it
    loaded = load_model_dir(tmp_path / "a0.25")
    assert (loaded.model.config.name, loaded.model.config.version) == ("blend", "1.2.3")
    assert ModelPredictor(tmp_path / "a0.25").version == "1.2.3"


def test_refusals_name_what_was_expected(
    averaged_dir: Path, tiny_ldm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InferenceError, match=r"alpha: expected a number in \[0, 1\], found 1.5"):
        interpolate_towards_last(averaged_dir, 1.5, tmp_path / "x", name="n", version="1")
    # trained without a weight average: nothing to move towards
    with pytest.raises(InferenceError, match="missing"):
        interpolate_towards_last(tiny_ldm_dir, 0.5, tmp_path / "y", name="n", version="1")
    # a checkpoint that does not belong to the directory (its average differs)
    copy = tmp_path / "copy"
    shutil.copytree(averaged_dir, copy)
    avg_file = copy / "checkpoints" / "diffusion" / "average.safetensors"
    tensors = load_file(str(avg_file))
    key = next(k for k in tensors if tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(avg_file))
    with pytest.raises(InferenceError, match="not the one this directory was written from"):
        interpolate_towards_last(copy, 0.5, tmp_path / "z", name="n", version="1")
    # the output must be new, and nothing is written when refused
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert (
        main(
            [
                str(averaged_dir),
                "--alpha",
                "0.5",
                "--out",
                str(tmp_path / "full"),
                "--name",
                "n",
                "--version",
                "1",
            ]
        )
        == 2
    )
    assert "expected a new or empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert not (tmp_path / "z").exists()
