"""Training loops: model directories, latent scale, checkpoints, resume, seeds, refusals."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dicom_node.errors import InferenceError
from inference.data import CohortPatient, read_cohort, split_cohort
from inference.model_config import tiny_config
from inference.model_dir import load_model_dir, model_kind, read_model_yaml
from inference.synthetic.cohort import PatientRecord
from inference.train.loops import (
    TrainOptions,
    _release_free_memory,
    epoch_order,
    read_train_state,
    response_weights,
    train_autoencoder,
    train_baseline,
    train_diffusion,
)
from inference.train.steps import latent_scale_from
from inference.unet_baseline import load_baseline_dir, tiny_baseline_config

Cohort = tuple[Path, list[PatientRecord]]
FAST = {"batch_size": 2, "learning_rate": 1e-3, "progress": False}


def test_the_ldm_directory_holds_both_stages(tiny_ldm_dir: Path, tiny_cohort: Cohort) -> None:
    state = read_train_state(tiny_ldm_dir)
    assert set(state["stages"]) == {"autoencoder", "diffusion"}
    ae = state["stages"]["autoencoder"]
    assert ae["epochs"] == 1 and len(ae["train_losses"]) == 1
    assert ae["held_out_sites"] and ae["held_out_patients"] >= 1
    loaded = load_model_dir(tiny_ldm_dir)
    cfg = loaded.config
    assert cfg.latent_scale == pytest.approx(ae["latent_scale"])
    assert cfg.latent_scale != 1.0
    assert model_kind(tiny_ldm_dir) == "latent-diffusion"
    for f in ("autoencoder.safetensors", "diffusion.safetensors"):
        assert (tiny_ldm_dir / f).stat().st_mode & 0o044 == 0o044  # readable by a service user
    # the survival-class shares of the stage-2 training patients (the held-out site left out)
    dif = state["stages"]["diffusion"]
    patients = [p for p in read_cohort([tiny_cohort[0]]) if p.site not in dif["held_out_sites"]]
    assert len(patients) == dif["train_patients"]
    expected = [
        sum(p.survival_class == c for p in patients) / len(patients) for c in cfg.survival_classes
    ]
    assert list(cfg.survival_class_prior) == pytest.approx(expected, abs=1e-4)
    # the checkpoint of each stage: safetensors weights, trainer state readable weights_only
    for stage in ("autoencoder", "diffusion"):
        ckpt = tiny_ldm_dir / "checkpoints" / stage
        assert load_file(str(ckpt / "weights.safetensors"))
        trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
        assert {"optimizer", "generator"} <= set(trainer)
        assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1


def test_latent_scale_is_that_of_the_training_latents(tmp_path: Path, tiny_cohort: Cohort) -> None:
    from inference.data import CohortDataset

    options = TrainOptions(epochs=1, **FAST)  # type: ignore[arg-type]
    report = train_autoencoder([tiny_cohort[0]], tmp_path / "m", tiny_config(), options)
    model = load_model_dir(tmp_path / "m").model
    cfg = model.config
    split = split_cohort(read_cohort(tiny_cohort[0]), n_held_out_sites=1, seed=0)
    ds = CohortDataset(split.train, cfg.preprocessing, cfg.contrasts, True)
    images = []
    for s in (ds[i] for i in range(len(ds))):
        images += [s.study.t1c, s.post_t1c] + ([s.study.flair] if s.study.flair is not None else [])
    with torch.no_grad():
        mus = [model.autoencoder.encode(torch.from_numpy(x)[None, None])[0] for x in images]
    assert report.extra["latent_scale"] == pytest.approx(latent_scale_from(mus), rel=1e-4)
    assert report.train_patients == [p.patient_id for p in split.train]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path, tiny_cohort: Cohort) -> None:
    data = [tiny_cohort[0]]
    straight = train_autoencoder(
        data,
        tmp_path / "a",
        tiny_config(),
        TrainOptions(epochs=2, **FAST),  # type: ignore[arg-type]
    )
    first = train_autoencoder(
        data,
        tmp_path / "b",
        tiny_config(),
        TrainOptions(epochs=1, **FAST),  # type: ignore[arg-type]
    )
    assert first.epochs == 1
    resumed = train_autoencoder(
        data,
        tmp_path / "b",
        tiny_config(),
        TrainOptions(epochs=2, resume=True, **FAST),  # type: ignore[arg-type]
    )
    assert resumed.start_epoch == 1
    assert resumed.train_losses == pytest.approx(straight.train_losses, rel=1e-6)
    a = load_file(str(tmp_path / "a" / "autoencoder.safetensors"))
    b = load_file(str(tmp_path / "b" / "autoencoder.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # a checkpoint is not overwritten silently, and resuming with other settings is refused
    with pytest.raises(InferenceError, match="--resume"):
        train_autoencoder(data, tmp_path / "b", tiny_config(), TrainOptions(epochs=3, **FAST))  # type: ignore[arg-type]
    with pytest.raises(InferenceError, match="seed"):
        train_autoencoder(
            data,
            tmp_path / "b",
            tiny_config(),
            TrainOptions(epochs=3, resume=True, seed=5, **FAST),  # type: ignore[arg-type]
        )


def test_a_checkpoint_of_two_saves_is_not_resumed(tmp_path: Path, tiny_cohort: Cohort) -> None:
    """A save replaces the weights, then the trainer state, then state.json: a training
    stopped in between left the weights of one epoch with the state of another, which a resume
    took as they were. Every file now carries the save's token, and two saves are refused."""
    from safetensors.torch import save_file

    from inference.train.loops import SAVE_TOKEN

    data, out = [tiny_cohort[0]], tmp_path / "ae"
    train_autoencoder(data, out, tiny_config(), TrainOptions(epochs=1, **FAST))  # type: ignore[arg-type]
    ckpt = out / "checkpoints" / "autoencoder"
    # the weights of a later save, stopped before its state.json
    weights = load_file(str(ckpt / "weights.safetensors"))
    save_file(weights, str(ckpt / "weights.safetensors"), metadata={SAVE_TOKEN: "later"})
    with pytest.raises(InferenceError, match=r"weights\.safetensors and state\.json are from two"):
        train_autoencoder(
            data,
            out,
            tiny_config(),
            TrainOptions(epochs=2, resume=True, **FAST),  # type: ignore[arg-type]
        )


def test_a_training_killed_while_it_saves_resumes(tmp_path: Path, tiny_cohort: Cohort) -> None:
    """A save is written beside the checkpoint (``<stage>.saving``), then the checkpoint is
    moved aside (``<stage>.previous``) and the new save put in its place. Each state a kill
    can leave resumes, from the new save when it was complete, else from the one before, and
    ends with the weights of an uninterrupted run. (A kill used to leave files of two saves,
    which could not be resumed at all.)"""
    import shutil

    data = [tiny_cohort[0]]
    runs = {
        n: train_autoencoder(
            data,
            tmp_path / f"e{n}",
            tiny_config(),
            TrainOptions(epochs=n, batch_size=2, learning_rate=1e-3, progress=False),
        )
        for n in (1, 2, 3)
    }
    saves = {n: tmp_path / f"e{n}" / "checkpoints" / "autoencoder" for n in (1, 2)}
    expected = load_file(str(tmp_path / "e3" / "autoencoder.safetensors"))
    for killed, start in (("between the renames", 2), ("while writing the new save", 1)):
        out = tmp_path / killed.replace(" ", "-")
        shutil.copytree(tmp_path / "e2", out)
        ckpt = out / "checkpoints" / "autoencoder"
        shutil.rmtree(ckpt)
        shutil.copytree(saves[2], ckpt.with_name("autoencoder.saving"))
        if start == 2:  # epoch 1's checkpoint moved aside, epoch 2's save complete beside it
            shutil.copytree(saves[1], ckpt.with_name("autoencoder.previous"))
        else:  # epoch 1's checkpoint in place, epoch 2's save without its state.json
            shutil.copytree(saves[1], ckpt)
            (ckpt.with_name("autoencoder.saving") / "state.json").unlink()
        resumed = train_autoencoder(
            data,
            out,
            tiny_config(),
            TrainOptions(epochs=3, resume=True, **FAST),  # type: ignore[arg-type]
        )
        assert resumed.start_epoch == start, killed
        assert resumed.train_losses == pytest.approx(runs[3].train_losses, rel=1e-6), killed
        got = load_file(str(out / "autoencoder.safetensors"))
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
        # one checkpoint is left, of epoch 3, and nothing beside it
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["autoencoder"]
        assert json.loads((ckpt / "state.json").read_text())["epoch"] == 3


def test_stage_two_resumes_in_its_own_directory_or_says_why_not_before_preparing(
    tiny_ldm_dir: Path, tiny_cohort: Cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from inference.train import loops

    out = tmp_path / "ldm"
    shutil.copytree(tiny_ldm_dir, out)
    options = TrainOptions(epochs=2, resume=True, **FAST)  # type: ignore[arg-type]
    # the finished run's model.yaml (its stage-1 configuration here) has the class shares,
    # which the checkpoint's configuration does not: the run resumes all the same
    report = train_diffusion([tiny_cohort[0]], out, options)
    assert (report.start_epoch, len(report.train_losses)) == (1, 2)
    assert read_model_yaml(out)[0].survival_class_prior
    # a checkpoint written before some configuration keys existed reads them as their defaults
    state_file = out / "checkpoints" / "diffusion" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["survival_class_prior"], state["config"]["inference"]["unknown_class"]
    state_file.write_text(json.dumps(state))
    report = train_diffusion([tiny_cohort[0]], out, dataclasses.replace(options, epochs=3))
    assert report.start_epoch == 2
    # another configuration is refused with the key that differs, before any patient is prepared
    text = (out / "model.yaml").read_text()
    (out / "model.yaml").write_text(text.replace("version: 0.0.0-test", "version: 9.9.9"))
    prepared: list[int] = []
    monkeypatch.setattr(loops, "_encode_all", lambda *a, **k: prepared.append(1) or [])
    with pytest.raises(InferenceError) as err:
        train_diffusion([tiny_cohort[0]], out, dataclasses.replace(options, epochs=4))
    assert 'config.version: checkpoint has "0.0.0-test", this run "9.9.9"' in str(err.value)
    assert prepared == []
    # a state file cut short (a disk that filled) is named, not a JSONDecodeError traceback
    state_file.write_text(state_file.read_text()[:40])
    with pytest.raises(InferenceError, match=r"state\.json: expected the training state as JSON"):
        train_diffusion([tiny_cohort[0]], out, dataclasses.replace(options, epochs=4))


def test_a_time_limit_stops_after_an_epoch_and_resume_goes_on(
    tmp_path: Path, tiny_cohort: Cohort
) -> None:
    data = [tiny_cohort[0]]
    limited = TrainOptions(epochs=3, max_minutes=1e-6, **FAST)  # type: ignore[arg-type]
    report = train_autoencoder(data, tmp_path, tiny_config(), limited)
    assert report.epochs == 1 and len(report.train_losses) == 1
    assert read_train_state(tmp_path)["stages"]["autoencoder"]["epochs"] == 1
    resumed = train_autoencoder(
        data,
        tmp_path,
        tiny_config(),
        TrainOptions(epochs=3, resume=True, **FAST),  # type: ignore[arg-type]
    )
    assert resumed.start_epoch == 1 and resumed.epochs == 3
    with pytest.raises(InferenceError, match="max_minutes: expected > 0, found 0"):
        TrainOptions(max_minutes=0)
    with pytest.raises(InferenceError, match="jobs: expected >= 1, found 0"):
        TrainOptions(jobs=0)


def test_seeds_change_the_run_and_fix_it(tmp_path: Path) -> None:
    assert epoch_order(10, 0, 0, "autoencoder") == epoch_order(10, 0, 0, "autoencoder")
    assert epoch_order(10, 0, 0, "autoencoder") != epoch_order(10, 0, 1, "autoencoder")
    assert epoch_order(10, 0, 0, "autoencoder") != epoch_order(10, 1, 0, "autoencoder")
    assert sorted(epoch_order(10, 3, 2, "diffusion")) == list(range(10))


def test_balanced_epochs_draw_every_response_category_equally_often() -> None:
    """``--balance-response``: a cohort of 50 % partial responses, 30 % stable, 15 % complete
    responses and 5 % progressions; each epoch's draws hold about a quarter of each."""
    shares = {"partial_response": 1000, "stable_disease": 600, "complete_response": 300,
              "progressive_disease": 100}  # fmt: skip
    patients = [
        CohortPatient(f"P{i}-{k}", "SITE", "short", category, Path("."))
        for category, k in shares.items()
        for i in range(k)
    ]
    weights = response_weights(patients)
    assert weights[0] == pytest.approx(1 / 1000) and weights[-1] == pytest.approx(1 / 100)
    drawn = [patients[i].response_category for e in range(3)
             for i in epoch_order(len(patients), 0, e, "diffusion", weights)]  # fmt: skip
    assert len(drawn) == 3 * len(patients)
    for category in shares:  # 6000 draws: a quarter is 1500, its binomial s.d. about 34
        assert abs(drawn.count(category) / len(drawn) - 0.25) < 0.02, category
    order = epoch_order(len(patients), 0, 0, "diffusion", weights)
    assert order == epoch_order(len(patients), 0, 0, "diffusion", weights)  # seeded
    assert len(set(order)) < len(patients)  # with replacement: the rare ones repeat


def test_balanced_diffusion_training_is_recorded_and_resumed_only_as_such(
    tmp_path: Path, tiny_cohort: Cohort, tiny_ldm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.train import loops

    data = [tiny_cohort[0]]
    given: list[object] = []
    real = loops.epoch_order
    monkeypatch.setattr(loops, "epoch_order", lambda *a: given.append(a[4]) or real(*a))
    options = TrainOptions(epochs=1, balance_response=True, **FAST)  # type: ignore[arg-type]
    report = train_diffusion(data, tmp_path / "b", options, stage1_dir=tiny_ldm_dir)
    train = [p for p in read_cohort(data) if p.patient_id in report.train_patients]
    assert given == [response_weights(train)]
    stage = read_train_state(tmp_path / "b")["stages"]["diffusion"]
    assert stage["sampling"] == "balanced by response category"
    # a checkpoint of a balanced run is not resumed by a uniform one (nor the reverse)
    uniform = dataclasses.replace(options, epochs=2, resume=True, balance_response=False)
    with pytest.raises(InferenceError, match='sampling: checkpoint has "balanced by response'):
        train_diffusion(data, tmp_path / "b", uniform, stage1_dir=tiny_ldm_dir)
    given.clear()
    train_diffusion(data, tmp_path / "u", dataclasses.replace(options, balance_response=False),
                    stage1_dir=tiny_ldm_dir)  # fmt: skip
    assert given == [None]
    assert read_train_state(tmp_path / "u")["stages"]["diffusion"]["sampling"] == "uniform"
    with pytest.raises(InferenceError, match="--balance-response applies to the diffusion stage"):
        train_baseline(data, tmp_path / "x", tiny_baseline_config(), options)


def test_the_baseline_directory(tiny_baseline_dir: Path, tmp_path: Path) -> None:
    assert model_kind(tiny_baseline_dir) == "unet-baseline"
    assert (tiny_baseline_dir / "unet.safetensors").stat().st_mode & 0o044 == 0o044
    loaded = load_baseline_dir(tiny_baseline_dir)
    assert loaded.config == tiny_baseline_config()
    assert "baseline" in read_train_state(tiny_baseline_dir)["stages"]
    # the latent diffusion loader refuses it, naming the kind
    with pytest.raises(InferenceError, match="unet-baseline"):
        read_model_yaml(tiny_baseline_dir)
    # validation: an unknown key, a tampered weight file
    bad = tmp_path / "bad"
    bad.mkdir()
    data = yaml.safe_load((tiny_baseline_dir / "model.yaml").read_text())
    data["colour"] = "red"
    (bad / "model.yaml").write_text(yaml.safe_dump(data))
    (bad / "unet.safetensors").write_bytes((tiny_baseline_dir / "unet.safetensors").read_bytes())
    with pytest.raises(InferenceError, match="colour: unknown key"):
        load_baseline_dir(bad)
    del data["colour"]
    (bad / "model.yaml").write_text(yaml.safe_dump(data))
    assert load_baseline_dir(bad).config.name == loaded.config.name
    blob = bytearray((bad / "unet.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "unet.safetensors").write_bytes(bytes(blob))
    with pytest.raises(InferenceError, match="SHA-256"):
        load_baseline_dir(bad)
    data["kind"] = "gan"
    (bad / "model.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InferenceError, match="kind"):
        model_kind(bad)


def test_baseline_training_lowers_its_loss(tmp_path: Path, tiny_cohort: Cohort) -> None:
    fast = {**FAST, "progress": True}  # tqdm bars on stderr (captured)
    options = TrainOptions(epochs=4, n_held_out_sites=0, **fast)  # type: ignore[arg-type]
    report = train_baseline([tiny_cohort[0]], tmp_path / "u", tiny_baseline_config(), options)
    assert report.held_out_patients == [] and report.val_losses == [None] * 4
    assert report.train_losses[-1] < report.train_losses[0]


def test_a_residual_baseline_starts_at_no_change_and_learns(
    tmp_path: Path, tiny_cohort: Cohort
) -> None:
    """``residual: true``: the image channel is added to the T1-Gd, so a network whose output
    is zero predicts exactly "no change"; the setting survives the model directory and trains."""
    from inference.unet_baseline import IMAGE_OUT, baseline_forward, build_baseline_unet

    cfg = tiny_baseline_config(residual=True)
    unet = build_baseline_unet(cfg, seed=0)
    for p in unet.parameters():
        torch.nn.init.zeros_(p)
    g = torch.Generator().manual_seed(0)
    shape = (2, 1, *cfg.preprocessing.crop_shape)
    t1c, mask = torch.randn(shape, generator=g), torch.rand(shape, generator=g) > 0.9
    out = baseline_forward(unet, cfg, t1c, mask)
    torch.testing.assert_close(out[:, IMAGE_OUT : IMAGE_OUT + 1], t1c)
    plain = baseline_forward(unet, cfg.replace(residual=False), t1c, mask)
    assert float(plain[:, IMAGE_OUT].abs().max()) == 0.0
    options = TrainOptions(epochs=3, n_held_out_sites=0, **FAST)  # type: ignore[arg-type]
    report = train_baseline([tiny_cohort[0]], tmp_path / "r", cfg, options)
    assert report.train_losses[-1] < report.train_losses[0]
    assert load_baseline_dir(tmp_path / "r").config.residual is True


def test_option_errors(tmp_path: Path, tiny_cohort: Cohort) -> None:
    with pytest.raises(InferenceError, match="epochs"):
        TrainOptions(epochs=0)
    with pytest.raises(InferenceError, match="autocast"):
        TrainOptions(autocast="fp16")
    with pytest.raises(InferenceError, match=r"p_drop_class: expected a probability in \[0, 1\]"):
        TrainOptions(p_drop_class=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(InferenceError, match="no CUDA device"):
            train_baseline(
                [tiny_cohort[0]],
                tmp_path / "x",
                tiny_baseline_config(),
                TrainOptions(device="cuda", **FAST),  # type: ignore[arg-type]
            )


def test_patch_boxes_stay_inside_and_favour_the_tumour() -> None:
    from inference.train.loops import _patch_box

    mask = np.zeros((16, 20, 16), bool)
    mask[1:3, 17:19, 13:15] = True  # a small tumour in a corner
    g = torch.Generator().manual_seed(3)
    boxes = [_patch_box(mask, (8, 8, 8), g) for _ in range(200)]
    for box in boxes:
        assert [s.stop - s.start for s in box] == [8, 8, 8]
        assert all(s.start >= 0 and s.stop <= n for s, n in zip(box, mask.shape, strict=True))
    with_tumour = sum(bool(mask[box].any()) for box in boxes)
    # about half are centred on the tumour, and a uniform box rarely reaches this corner
    assert 80 <= with_tumour <= 150
    # no tumour: uniform boxes only
    empty = [_patch_box(np.zeros((16, 16, 16), bool), (8, 8, 8), g) for _ in range(20)]
    assert len({b[0].start for b in empty}) > 1


def test_patch_training_resumes_to_the_same_weights(tmp_path: Path, tiny_cohort: Cohort) -> None:
    cfg = tiny_config()
    cfg = cfg.with_training(autoencoder_patch=(8, 8, 8))
    data = [tiny_cohort[0]]
    straight = train_autoencoder(data, tmp_path / "a", cfg, TrainOptions(epochs=2, **FAST))  # type: ignore[arg-type]
    train_autoencoder(data, tmp_path / "b", cfg, TrainOptions(epochs=1, **FAST))  # type: ignore[arg-type]
    resumed = train_autoencoder(
        data,
        tmp_path / "b",
        cfg,
        TrainOptions(epochs=2, resume=True, **FAST),  # type: ignore[arg-type]
    )
    assert resumed.train_losses == pytest.approx(straight.train_losses, rel=1e-6)
    a = load_file(str(tmp_path / "a" / "autoencoder.safetensors"))
    b = load_file(str(tmp_path / "b" / "autoencoder.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert read_model_yaml(tmp_path / "a")[0].training.autoencoder_patch == (8, 8, 8)


def test_init_from_fine_tunes_a_model_directory(
    tmp_path: Path, tiny_cohort: Cohort, tiny_ldm_dir: Path
) -> None:
    """``--init-from``: each stage starts from the given directory's weights (here with a
    vanishing learning rate, so the result must still be those weights); another architecture,
    or the baseline, is refused with the reason."""
    data = [tiny_cohort[0]]
    still = {**FAST, "learning_rate": 1e-12}
    options = TrainOptions(epochs=1, init_from=tiny_ldm_dir, **still)  # type: ignore[arg-type]
    cfg = tiny_config()
    whole = cfg.with_training(autoencoder_patch=())
    train_autoencoder(data, tmp_path / "ft", whole, options)
    train_diffusion(data, tmp_path / "ft", options)
    for name in ("autoencoder", "diffusion"):
        start = load_file(str(tiny_ldm_dir / f"{name}.safetensors"))
        tuned = load_file(str(tmp_path / "ft" / f"{name}.safetensors"))
        for k in start:
            torch.testing.assert_close(tuned[k], start[k], rtol=0, atol=1e-6)
    fresh = train_autoencoder(
        data,
        tmp_path / "fresh",
        whole,
        TrainOptions(epochs=1, **still),  # type: ignore[arg-type]
    )
    tuned_state = read_train_state(tmp_path / "ft")["stages"]["autoencoder"]
    assert tuned_state["train_losses"][0] < fresh.train_losses[0]  # it started trained

    other = cfg.replace(
        autoencoder=dataclasses.replace(
            cfg.autoencoder, latent_channels=2 * cfg.autoencoder.latent_channels
        )
    )
    with pytest.raises(InferenceError, match="--init-from"):
        train_autoencoder(data, tmp_path / "other", other, options)
    with pytest.raises(InferenceError, match="latent diffusion stages"):
        train_baseline(data, tmp_path / "b", tiny_baseline_config(), options)


def test_diffusion_keeps_a_weight_average_and_resumes_it(
    tmp_path: Path, tiny_cohort: Cohort, tiny_ldm_dir: Path
) -> None:
    """``ema_decay``: the model directory gets the weight average, not the last weights; the
    average is checkpointed, so a resumed run ends with the same one; other stages refuse it."""
    data = [tiny_cohort[0]]
    opts = {**FAST, "ema_decay": 0.9}

    def run(out: Path, epochs: int, resume: bool = False) -> None:
        options = TrainOptions(epochs=epochs, resume=resume, **opts)  # type: ignore[arg-type]
        train_diffusion(data, out, options, stage1_dir=tiny_ldm_dir)

    run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    run(tmp_path / "b", 2, resume=True)
    saved = load_file(str(tmp_path / "a" / "diffusion.safetensors"))
    ckpt = tmp_path / "a" / "checkpoints" / "diffusion"
    last = load_file(str(ckpt / "weights.safetensors"))
    average = load_file(str(ckpt / "average.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "diffusion.safetensors"))
    assert json.loads((ckpt / "state.json").read_text())["average_updates"] > 0
    floats = [k for k in saved if saved[k].is_floating_point()]
    assert any(not torch.equal(saved[k], last[k]) for k in floats)  # not the last weights
    for k in saved:
        torch.testing.assert_close(saved[k], average[k], rtol=0, atol=0)
        torch.testing.assert_close(resumed[k], saved[k], rtol=1e-5, atol=1e-6)
    assert read_model_yaml(tmp_path / "a")[0].training.ema_decay == 0.9  # model.yaml says so
    # keeping the average leaves the training itself alone: without it, the same weights
    plain = TrainOptions(epochs=2, **{**opts, "ema_decay": 0.0})  # type: ignore[arg-type]
    train_diffusion(data, tmp_path / "c", plain, stage1_dir=tiny_ldm_dir)
    without = load_file(str(tmp_path / "c" / "diffusion.safetensors"))
    for k in last:
        torch.testing.assert_close(without[k], last[k], rtol=0, atol=0)
    assert not (tmp_path / "c" / "checkpoints" / "diffusion" / "average.safetensors").exists()
    with pytest.raises(InferenceError, match="ema_decay"):
        TrainOptions(ema_decay=1.0)
    with pytest.raises(InferenceError, match="diffusion stage only"):
        train_autoencoder(
            data,
            tmp_path / "ae",
            tiny_config(),
            TrainOptions(epochs=1, **opts),  # type: ignore[arg-type]
        )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_stage_two_gives_back_the_memory_of_each_prepared_patient() -> None:
    """Stage 2 prepares each patient once and trims the heap between patients (without it a
    1000-patient cohort grew past 12 GB: see _release_free_memory); the call is real here."""
    assert _release_free_memory() is True


def _copy_model(source: Path, to: Path, checkpoints: bool = True) -> Path:
    """A copy of a model directory; without ``checkpoints`` as a model is shipped."""
    import shutil

    shutil.copytree(
        source, to, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints")
    )
    return to


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_a_finished_model_that_the_run_does_not_continue_is_not_overwritten(
    tmp_path: Path, tiny_cohort: Cohort, tiny_baseline_dir: Path, tiny_ldm_dir: Path
) -> None:
    """train autoencoder --out DIR used to replace a finished UNet baseline in DIR (model.yaml
    rewritten, its train_state.json record dropped). Each refusal names what DIR holds and
    leaves every file as it was; autoencoder then diffusion into one DIR (the tiny_ldm_dir
    fixture) and resuming a checkpoint still work."""
    data = [tiny_cohort[0]]
    options = TrainOptions(epochs=1, **FAST)  # type: ignore[arg-type]
    baseline = _copy_model(tiny_baseline_dir, tmp_path / "baseline")
    before = _files(baseline)
    with pytest.raises(InferenceError) as err:
        train_autoencoder(data, baseline, tiny_config(), options)
    assert "expected an empty directory or a latent-diffusion model directory" in str(err.value)
    assert (
        "found a unet-baseline model (model.yaml; train_state.json lists the stages "
        "['baseline'])" in str(err.value)
    )
    with pytest.raises(InferenceError, match="found a unet-baseline model"):
        train_diffusion(data, baseline, options, stage1_dir=tiny_ldm_dir)
    assert _files(baseline) == before and model_kind(baseline) == "unet-baseline"
    ldm = _copy_model(tiny_ldm_dir, tmp_path / "ldm")
    with pytest.raises(InferenceError, match="found a latent-diffusion model"):
        train_baseline(data, ldm, tiny_baseline_config(), options)
    # the same kind, shipped without checkpoints: nothing to continue, a finished model to lose
    shipped = _copy_model(tiny_ldm_dir, tmp_path / "shipped", checkpoints=False)
    before = _files(shipped)
    with pytest.raises(InferenceError, match="found a trained diffusion stage"):
        train_autoencoder(data, shipped, tiny_config(), options)
    with pytest.raises(InferenceError, match="no diffusion checkpoint to resume"):
        train_diffusion(data, shipped, options, stage1_dir=tiny_ldm_dir)
    assert _files(shipped) == before
    plain = _copy_model(tiny_baseline_dir, tmp_path / "plain", checkpoints=False)
    with pytest.raises(InferenceError, match="no baseline checkpoint to resume"):
        train_baseline(data, plain, tiny_baseline_config(), options)
    # the diffusion stage may (re)train on the directory's own stage 1
    report = train_diffusion(data, shipped, options)
    assert report.epochs == 1
    assert set(read_train_state(shipped)["stages"]) == {"autoencoder", "diffusion"}


def test_a_resume_with_another_learning_rate_uses_it_and_records_it(
    tmp_path: Path, tiny_cohort: Cohort
) -> None:
    """--lr used to be ignored on --resume (the checkpoint's optimizer state kept its rate)
    while train_state.json recorded the new one."""
    data, cfg = [tiny_cohort[0]], tiny_baseline_config()
    fast = {**FAST, "learning_rate": 1e-3}
    for name in ("same", "other"):
        train_baseline(data, tmp_path / name, cfg, TrainOptions(epochs=1, **fast))  # type: ignore[arg-type]
    train_baseline(data, tmp_path / "same", cfg, TrainOptions(epochs=2, resume=True, **fast))  # type: ignore[arg-type]
    faster = {**fast, "learning_rate": 0.5}
    train_baseline(data, tmp_path / "other", cfg, TrainOptions(epochs=2, resume=True, **faster))  # type: ignore[arg-type]
    same = load_file(str(tmp_path / "same" / "unet.safetensors"))
    other = load_file(str(tmp_path / "other" / "unet.safetensors"))
    assert any(not torch.equal(same[k], other[k]) for k in same)
    trainer = torch.load(
        tmp_path / "other" / "checkpoints" / "baseline" / "trainer.pt", weights_only=True
    )
    assert {g["lr"] for g in trainer["optimizer"]["param_groups"]} == {0.5}
    record = read_train_state(tmp_path / "other")["stages"]["baseline"]
    assert record["learning_rate"] == 0.5
    assert record["learning_rates"] == [
        {"from_epoch": 0, "learning_rate": 1e-3},
        {"from_epoch": 1, "learning_rate": 0.5},
    ]
    assert "learning_rates" not in read_train_state(tmp_path / "same")["stages"]["baseline"]
    # resumed again at the same rate: the history is kept from the checkpoint
    train_baseline(data, tmp_path / "other", cfg, TrainOptions(epochs=3, resume=True, **faster))  # type: ignore[arg-type]
    again = read_train_state(tmp_path / "other")["stages"]["baseline"]
    assert again["learning_rates"] == record["learning_rates"]


def test_a_resume_with_another_architecture_names_the_configuration(
    tmp_path: Path, tiny_cohort: Cohort
) -> None:
    """--resume with another --preset used to fail listing tensor shapes ("model.yaml's
    architecture expects shape ..."), never naming the configuration."""
    data, out = [tiny_cohort[0]], tmp_path / "m"
    train_baseline(data, out, tiny_baseline_config(), TrainOptions(epochs=1, **FAST))  # type: ignore[arg-type]
    wider = tiny_baseline_config(features=(8, 8, 16, 16, 16, 8))
    with pytest.raises(InferenceError) as err:
        train_baseline(data, out, wider, TrainOptions(epochs=2, resume=True, **FAST))  # type: ignore[arg-type]
    text = str(err.value)
    assert "expected the same config" in text
    assert (
        "config.features: checkpoint has [4, 4, 8, 8, 8, 4], this run [8, 8, 16, 16, 16, 8]" in text
    )
    assert "shape" not in text


def test_the_autoencoder_does_not_come_back_to_a_directory_with_a_diffusion_stage(
    tmp_path: Path, tiny_cohort: Cohort, tiny_ldm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train autoencoder --resume in a finished LDM directory used to write an untrained
    diffusion UNet over the trained one and drop its train_state.json record, leaving a
    directory that neither predict nor train diffusion (with or without --resume) accepted.
    It is refused before any patient is prepared, with or without --resume, naming what the
    directory holds and the way on (--init-from into another --out, which
    test_init_from_fine_tunes_a_model_directory runs)."""
    from inference.train import loops

    data = [tiny_cohort[0]]
    ldm = _copy_model(tiny_ldm_dir, tmp_path / "ldm")
    before = {**_files(ldm), **_files(ldm / "checkpoints" / "diffusion")}
    prepared: list[int] = []
    monkeypatch.setattr(loops, "_ae_items", lambda *a, **k: prepared.append(1) or [])
    for resume in (True, False):
        options = TrainOptions(epochs=2, resume=resume, **FAST)  # type: ignore[arg-type]
        with pytest.raises(InferenceError) as err:
            train_autoencoder(data, ldm, tiny_config(), options)
        text = str(err.value)
        assert "expected no diffusion stage in the directory of an autoencoder run" in text
        assert "found a trained diffusion stage (train_state.json records 1 epoch(s))" in text
        assert f"a diffusion checkpoint ({ldm / 'checkpoints' / 'diffusion'})" in text
        assert f"another --out, with --init-from {ldm}" in text
    assert prepared == []
    assert {**_files(ldm), **_files(ldm / "checkpoints" / "diffusion")} == before
    # a diffusion run still in progress (its checkpoint, no record yet) is refused as well
    state = read_train_state(ldm)
    del state["stages"]["diffusion"]
    (ldm / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(InferenceError, match=r"found a diffusion checkpoint \("):
        train_autoencoder(data, ldm, tiny_config(), TrainOptions(resume=True, **FAST))  # type: ignore[arg-type]


def test_an_interrupted_training_says_where_its_checkpoint_is(
    tmp_path: Path,
    tiny_cohort: Cohort,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C used to end a training with nothing said. One warning now names the last
    completed epoch's checkpoint and --resume, or says that there is nothing to resume."""
    from inference.train import loops

    data, out = [tiny_cohort[0]], tmp_path / "ae"
    ckpt = out / "checkpoints" / "autoencoder"
    real = loops.autoencoder_step
    at_first_step = [True]

    def step(*args: Any, **kwargs: Any) -> Any:
        if at_first_step[0] or (ckpt / "state.json").is_file():  # Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loops, "autoencoder_step", step)
    options = TrainOptions(epochs=3, **FAST)  # type: ignore[arg-type]

    def interrupted() -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger=loops.__name__), pytest.raises(KeyboardInterrupt):
            train_autoencoder(data, out, tiny_config(), options)
        return [r.getMessage() for r in caplog.records]

    assert interrupted() == [
        "autoencoder training interrupted before its first epoch was completed: there is no "
        "checkpoint, so nothing to resume; the same command starts it again"
    ]
    at_first_step[0] = False  # the same command again, interrupted in its second epoch
    assert interrupted() == [
        "autoencoder training interrupted: the checkpoint of the last completed epoch (epoch 1 "
        f"of 3) is in {ckpt}; the same command with --resume continues from it"
    ]


def test_a_resume_to_fewer_epochs_than_the_checkpoint_has_done_is_refused(
    tmp_path: Path,
    tiny_ldm_dir: Path,
    tiny_baseline_dir: Path,
    tiny_cohort: Cohort,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--resume --epochs 5 on a checkpoint of 12 epochs used to train nothing and report
    "12 epoch(s) in total, 0 this run". It is refused before any patient is prepared, naming
    both numbers, as the federated --resume refuses fewer --rounds than it has done."""
    from inference.data import CohortDataset
    from inference.unet_baseline import tiny_baseline_config

    data = [tiny_cohort[0]]
    prepared: list[int] = []
    monkeypatch.setattr(CohortDataset, "prepared", lambda *a: prepared.append(1) or iter(()))
    # jobs=2: the baseline prepares every patient before its first step too
    options = TrainOptions(epochs=5, resume=True, jobs=2, **FAST)  # type: ignore[arg-type]
    for stage, source in (("diffusion", tiny_ldm_dir), ("baseline", tiny_baseline_dir)):
        out = _copy_model(source, tmp_path / stage)
        state_file = out / "checkpoints" / stage / "state.json"
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "epoch": 12}))
        with pytest.raises(InferenceError) as err:
            if stage == "diffusion":
                train_diffusion(data, out, options)
            else:
                train_baseline(data, out, tiny_baseline_config(), options)
        assert (
            f"cannot resume from {state_file.parent}: expected --epochs of at least 12 (the "
            "epochs the checkpoint has done), found 5" in str(err.value)
        )
    assert prepared == []
