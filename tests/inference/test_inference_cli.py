"""``train``, ``evaluate`` and ``predict`` registered on our own argparse parser."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference import cli
from inference.bundled import demo_model_dir
from inference.data import read_volume
from inference.model_dir import read_model_yaml
from inference.synthetic.cohort import PatientRecord, dicom_study_dir
from inference.train.loops import read_train_state

Cohort = tuple[Path, list[PatientRecord]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glioforecast")
    p.add_argument("--config", type=Path, default=None)
    sub = p.add_subparsers(dest="command", required=True)
    cli.register(sub)
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


def test_register_adds_the_three_commands_with_their_defaults() -> None:
    p = parser()
    a = p.parse_args(["train", "autoencoder", "--data", "d1", "--data", "d2", "--out", "m"])
    assert a.stage == "autoencoder" and a.data == [Path("d1"), Path("d2")]
    assert (a.preset, a.epochs, a.seed, a.resume, a.device) == ("demo", 10, 0, False, "cpu")
    assert a.func is cli.cmd_train
    assert a.held_out_sites is None and a.held_out_seeds == ()
    b = p.parse_args(["train", "baseline", "--data", "d", "--out", "m", "--held-out-sites",
                      "SITE-A,SITE-B", "--held-out-seeds", "7,9"])  # fmt: skip
    assert b.held_out_sites == ("SITE-A", "SITE-B") and b.held_out_seeds == (7, 9)
    assert (b.init_from, b.autoencoder_patch) == (None, None)  # the preset's patches
    f = p.parse_args(["train", "autoencoder", "--data", "d", "--out", "m", "--init-from", "old",
                      "--autoencoder-patch", "none"])  # fmt: skip
    assert (f.init_from, f.autoencoder_patch) == (Path("old"), ())
    g = p.parse_args(["train", "autoencoder", "--data", "d", "--out", "m",
                      "--autoencoder-patch", "8,12,8"])  # fmt: skip
    assert g.autoencoder_patch == (8, 12, 8) and g.ema_decay is None  # the model's
    h = p.parse_args(["train", "diffusion", "--data", "d", "--out", "m", "--ema-decay", "0.995"])
    assert h.ema_decay == 0.995
    assert (h.prediction_type, h.tumour_loss_weight, h.p_drop_class) == (None, None, None)
    assert h.balance_response is False
    r = p.parse_args(["train", "diffusion", "--data", "d", "--out", "m", "--balance-response"])
    assert r.balance_response is True
    e = p.parse_args(["evaluate", "--model", "m", "--data", "d"])
    assert (e.samples, e.out, e.model) == (4, Path("evaluation"), [Path("m")])
    q = p.parse_args(["predict", "in", "--model", "m", "--out", "o"])
    assert (q.input, q.samples, q.func) == (Path("in"), 4, cli.cmd_predict)
    for bad in (
        ["train", "decoder", "--data", "d", "--out", "m"],
        ["train", "baseline", "--data", "d", "--out", "m", "--preset", "huge"],
        ["train", "baseline", "--data", "d", "--out", "m", "--epochs", "0"],
        ["predict", "in", "--out", "o", "--samples", "0"],
        ["evaluate", "--model", "m"],
        ["train", "autoencoder", "--data", "d", "--out", "m", "--autoencoder-patch", "8,8"],
        ["train", "autoencoder", "--data", "d", "--out", "m", "--autoencoder-patch", "0,8,8"],
        ["train", "diffusion", "--data", "d", "--out", "m", "--prediction-type", "x0"],
    ):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_train_evaluate_predict_end_to_end(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tiny_cohort[0])
    model = tmp_path / "ldm"
    common = ["--preset", "tiny", "--epochs", "1", "--no-progress", "--lr", "1e-3"]
    assert run(["train", "autoencoder", "--data", data, "--out", str(model), *common]) == 0
    assert "autoencoder: 1 epoch(s)" in capsys.readouterr().out
    tuned = tmp_path / "ldm-whole"
    assert run(["train", "autoencoder", "--data", data, "--out", str(tuned), *common,
                "--init-from", str(model), "--autoencoder-patch", "8,8,8"]) == 0  # fmt: skip
    assert read_model_yaml(tuned)[0].training.autoencoder_patch == (8, 8, 8)
    assert read_train_state(tuned)["stages"]["autoencoder"]["init_from"] == str(model)
    assert run(["train", "diffusion", "--data", data, "--out", str(model), *common,
                "--ema-decay", "0.9", "--prediction-type", "v_prediction",
                "--tumour-loss-weight", "2", "--p-drop-class", "0.5",
                "--balance-response"]) == 0  # fmt: skip
    written = read_model_yaml(model)[0]
    assert written.training.ema_decay == 0.9 and written.training.tumour_loss_weight == 2.0
    assert written.training.p_drop_class == 0.5
    assert written.scheduler.prediction_type == "v_prediction"  # evaluate/predict below use it
    assert read_train_state(model)["stages"]["diffusion"]["sampling"] == (
        "balanced by response category"
    )
    # a second run into the same directory without --resume is refused with a reason
    assert run(["train", "diffusion", "--data", data, "--out", str(model), *common]) == 2
    assert "--resume" in capsys.readouterr().err
    baseline = tmp_path / "unet"
    assert run(["train", "baseline", "--data", data, "--out", str(baseline), *common,
                "--ema-decay", "0.9"]) == 2  # fmt: skip
    assert "--ema-decay applies to the diffusion stage only" in capsys.readouterr().err
    assert run(["train", "autoencoder", "--data", data, "--out", str(tmp_path / "ae"), *common,
                "--prediction-type", "v_prediction"]) == 2  # fmt: skip
    assert "--prediction-type applies to the diffusion stage only" in capsys.readouterr().err
    assert run(["train", "baseline", "--data", data, "--out", str(baseline), *common,
                "--p-drop-class", "0.5"]) == 2  # fmt: skip
    assert "--p-drop-class applies to the diffusion stage only" in capsys.readouterr().err
    # patients prepared by two processes before the first step
    assert run(["train", "baseline", "--data", data, "--out", str(baseline), *common,
                "--jobs", "2", "--max-minutes", "30"]) == 0  # fmt: skip
    assert (baseline / "model.yaml").is_file()

    report = tmp_path / "report"
    argv = ["evaluate", "--data", data, "--model", str(model), "--model", str(baseline)]
    argv += ["--samples", "1", "--out", str(report), "--bootstrap", "20", "--limit", "1"]
    argv += ["--steps", "2", "--guidance-scale", "1.5", "--unknown-class", "marginal"]
    assert run([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| Tumour Dice |" in out
    metrics = json.loads((report / "metrics.json").read_text())
    assert len(metrics["methods"]) == 3 and metrics["patients"] == 1
    assert (metrics["num_inference_steps"], metrics["guidance_scale"]) == (2, 1.5)
    assert metrics["unknown_class"] == "marginal"
    assert metrics["compile"] == "none"  # the UNets ran as they are
    # the next evaluation into the same folder replaced this one's report without a word
    before = (report / "metrics.json").read_bytes()
    assert run([*argv[:3], "--out", str(report), "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        f"report folder {report}: expected a folder without a report, found metrics.json and "
        "metrics.md (of no-change, "
    ) in err
    assert "on 1 patient(s)); give another --out, or --overwrite to replace it" in err
    assert (report / "metrics.json").read_bytes() == before
    again = [*argv[:5], "--skip-no-change", "--samples", "1", "--steps", "2", "--overwrite"]
    assert run([*again, "--out", str(report), "--limit", "1", "--no-progress"]) == 0
    assert len(json.loads((report / "metrics.json").read_text())["methods"]) == 1
    assert sorted(f.name for f in report.iterdir()) == ["metrics.json", "metrics.md"]

    patient = tiny_cohort[1][0].patient_id
    nifti_out = tmp_path / "pred-nifti"
    nifti_in = tiny_cohort[0] / patient / "nifti"
    assert run(["predict", str(nifti_in), "--model", str(model), "--out", str(nifti_out),
                "--samples", "2"]) == 0  # fmt: skip
    summary = json.loads((nifti_out / "summary.json").read_text())
    assert summary["input_format"] == "nifti"
    assert summary["samples"] == 2 and "research use only" in summary["notice"]
    assert (summary["survival_scenario"], summary["sample_classes"]) == (
        "unconditional",
        [None, None],
    )
    marginal_out = tmp_path / "pred-marginal"
    assert run(["predict", str(nifti_in), "--model", str(model), "--out", str(marginal_out),
                "--samples", "2", "--unknown-class", "marginal"]) == 0  # fmt: skip
    summary = json.loads((marginal_out / "summary.json").read_text())
    assert summary["survival_scenario"] == "marginal"
    assert len(summary["sample_classes"]) == 2 and None not in summary["sample_classes"]
    source = read_volume(nifti_in / "pre_t1c.nii.gz")
    for name in ("mean", "std", "tumour_mask"):
        vol = read_volume(nifti_out / f"{name}.nii.gz")
        assert vol.shape == source.shape
        np.testing.assert_allclose(vol.affine, source.affine, atol=1e-4)
    # the volume the mask file outlines, beside the samples' mean volume
    outlined = read_volume(nifti_out / "tumour_mask.nii.gz")
    voxel_ml = float(np.prod(outlined.spacing)) / 1000.0
    summary = json.loads((nifti_out / "summary.json").read_text())
    assert summary["outlined_volume_ml"] == pytest.approx(
        float(np.asarray(outlined.array).sum()) * voxel_ml, rel=1e-6
    )

    dicom_out = tmp_path / "pred-dicom"
    study = dicom_study_dir(tiny_cohort[0], patient)
    assert run(["predict", str(study), "--model", str(baseline), "--out", str(dicom_out)]) == 0
    summary = json.loads((dicom_out / "summary.json").read_text())
    assert summary["input_format"] == "dicom"
    assert {"t1c", "flair", "rtstruct", "rtdose"} <= set(summary["roles"])
    assert "POST" in summary["roles"]["t1c"].upper() or "GD" in summary["roles"]["t1c"].upper()
    assert summary["grid"]["frame_of_reference_uid"]
    mean = read_volume(dicom_out / "mean.nii.gz")
    assert mean.shape == tuple(summary["grid"]["shape_kji"])


def test_predict_refusals(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["predict", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "expected a folder" in capsys.readouterr().err
    # a DICOM study without its RT structure set: the role rules report the missing role
    patient = tiny_cohort[1][0].patient_id
    study = dicom_study_dir(tiny_cohort[0], patient)
    partial = tmp_path / "partial"
    for series in study.iterdir():
        if series.name != "RTSTRUCT":
            (partial / series.name).mkdir(parents=True)
            for f in series.iterdir():
                (partial / series.name / f.name).write_bytes(f.read_bytes())
    assert run(["predict", str(partial), "--out", str(tmp_path / "o")]) == 2
    assert "missing required role rtstruct" in capsys.readouterr().err
    # without --model, or with --model none: the "no change" baseline, named as such
    out = tmp_path / "nochange"
    assert run(["predict", str(study), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["model_name"] == "no-change-baseline"
    out = tmp_path / "none"
    assert run(["predict", str(study), "--model", "none", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["model_dir"] is None
    # a survival class means nothing to the baseline: it was taken and ignored
    assert run(["predict", str(study), "--model", "none", "--survival-class", "anything",
                "--out", str(tmp_path / "classed")]) == 2  # fmt: skip
    assert "the 'no change' baseline takes no survival class" in capsys.readouterr().err
    assert not (tmp_path / "classed").exists()
    # --model bundled: the demo model shipped in the package, as the demo names it
    out = tmp_path / "bundled"
    assert run(["predict", str(study), "--model", "bundled", "--out", str(out),
                "--samples", "1"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    bundled = read_model_yaml(demo_model_dir())[0]
    assert (summary["model_name"], summary["model_version"]) == (bundled.name, bundled.version)
    assert summary["model_dir"] == str(demo_model_dir())
    # a directory without a model.yaml is refused, with what was expected
    assert run(["predict", str(study), "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "expected bundled, none or a model directory with a model.yaml" in (
        capsys.readouterr().err
    )


def test_predict_refuses_a_folder_of_several_studies_and_other_body_parts(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The series of every patient and study in the folder were pooled: a follow-up beside the
    pre-treatment study gave a prediction from the follow-up's T1-Gd and the pre-treatment
    GTV, and two patients one prediction from either. The node's refusals hold offline too."""
    import pydicom

    first, second = (p.patient_id for p in tiny_cohort[1][:2])
    pre = dicom_study_dir(tiny_cohort[0], first)
    both = tmp_path / "both"
    shutil.copytree(pre, both / "a")
    shutil.copytree(dicom_study_dir(tiny_cohort[0], second), both / "b")
    assert run(["predict", str(both), "--out", str(tmp_path / "o")]) == 2
    assert "expected the study of one patient, found 2 patients" in capsys.readouterr().err
    with_follow_up = tmp_path / "follow-up"
    shutil.copytree(pre, with_follow_up / "pre")
    shutil.copytree(dicom_study_dir(tiny_cohort[0], first, "post"), with_follow_up / "post")
    assert run(["predict", str(with_follow_up), "--out", str(tmp_path / "o")]) == 2
    assert "expected the MR images of one study" in capsys.readouterr().err
    knee = tmp_path / "knee"
    shutil.copytree(pre, knee)
    for path in knee.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality == "MR":
            ds.BodyPartExamined = "KNEE"
            ds.save_as(path)
    assert run(["predict", str(knee), "--out", str(tmp_path / "o")]) == 2
    assert "(BodyPartExamined KNEE): expected a brain MRI" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert run(["predict", str(pre), "--out", str(tmp_path / "a-file")]) == 2
    assert "expected a folder, found a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_the_bundled_model_by_name(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    argv = ["evaluate", "--data", str(tiny_cohort[0]), "--model", "bundled", "--samples", "1"]
    argv += ["--limit", "1", "--skip-no-change", "--bootstrap", "5", "--no-progress"]
    assert run([*argv, "--out", str(report)]) == 0
    capsys.readouterr()
    (entry,) = json.loads((report / "metrics.json").read_text())["methods"].values()
    bundled = read_model_yaml(demo_model_dir())[0]
    assert (entry["name"], entry["version"]) == (bundled.name, bundled.version)
    assert entry["model_dir"] == str(demo_model_dir())


def test_evaluate_checks_its_report_folder_before_any_patient(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """--out was checked when the report was written, after every patient, and a file there
    lost the evaluation with a traceback."""
    import inference.evaluate

    def evaluated(*args: object, **kwargs: object) -> None:
        raise AssertionError("patients evaluated before --out was checked")

    monkeypatch.setattr(inference.evaluate, "run_evaluation", evaluated)
    (tmp_path / "a-file").write_text("x")
    argv = ["evaluate", "--data", str(tiny_cohort[0]), "--samples", "1", "--limit", "1"]
    assert run([*argv, "--no-progress", "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert f"report folder {tmp_path / 'a-file'}: expected a folder, found a file" in err


def test_predict_on_a_nifti_folder_without_its_layout_says_what_it_expected(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NIfTI folder without pre_t1c.nii.gz was read as a DICOM study ("expected DICOM files,
    found none"), and so was an empty folder."""
    nifti = tiny_cohort[0] / tiny_cohort[1][0].patient_id / "nifti"
    gtv_only = tmp_path / "gtv-only"
    gtv_only.mkdir()
    shutil.copy(nifti / "gtv.nii.gz", gtv_only)
    assert run(["predict", str(gtv_only), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"NIfTI study {gtv_only}: expected pre_t1c.nii.gz and gtv.nii.gz (optional: " in err
    assert "found gtv.nii.gz" in err and "DICOM" not in err
    assert "each may be uncompressed, .nii" in err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert run(["predict", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"INPUT {empty}: the folder is empty" in err
    assert "pre_t1c.nii.gz and gtv.nii.gz" in err and "or a DICOM study" in err
    assert not (tmp_path / "o").exists()
    # the command's error is said once on stderr (a log line said it a second time)
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "predict", str(empty), "--out",
         str(tmp_path / "o")], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("the folder is empty") == 1, done.stderr


def test_predict_reads_uncompressed_nifti_and_refuses_a_role_given_twice(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Uncompressed .nii files (dcm2niix without -z y) were refused: the reader took the layout's
    .nii.gz names only. A role given both ways is refused, not guessed."""
    import gzip

    nifti = tiny_cohort[0] / tiny_cohort[1][0].patient_id / "nifti"
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("pre_t1c", "gtv"):
        (plain / f"{name}.nii").write_bytes(
            gzip.decompress((nifti / f"{name}.nii.gz").read_bytes())
        )
    shutil.copy(nifti / "pre_flair.nii.gz", plain)  # the two forms mixed in one folder
    assert run(["predict", str(plain), "--out", str(tmp_path / "p")]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["input_format"] == "nifti"
    assert summary["roles"] == {"t1c": "pre_t1c.nii", "flair": "pre_flair.nii.gz", "gtv": "gtv.nii"}
    assert run(["predict", str(nifti), "--out", str(tmp_path / "gz")]) == 0
    for name in ("mean", "tumour_mask"):  # the same images, compressed or not
        a = read_volume(tmp_path / "p" / f"{name}.nii.gz")
        b = read_volume(tmp_path / "gz" / f"{name}.nii.gz")
        assert np.array_equal(a.array, b.array) and a.spacing == b.spacing
    shutil.copy(nifti / "gtv.nii.gz", plain)
    assert run(["predict", str(plain), "--out", str(tmp_path / "twice")]) == 2
    err = capsys.readouterr().err
    assert f"NIfTI study {plain}: expected one file for gtv, found both gtv.nii.gz and gtv.nii" in (
        err
    )
    assert not (tmp_path / "twice").exists()


def test_predict_says_which_series_it_chose_when_two_match_a_role(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Of two T1-Gd series one was used silently; the summary named descriptions only."""
    from tests.factories import copy_series

    study = tmp_path / "study"
    shutil.copytree(dicom_study_dir(tiny_cohort[0], tiny_cohort[1][0].patient_id), study)
    t1c = next(d for d in sorted(study.iterdir()) if d.name.endswith("t1c"))
    copy_series(sorted(t1c.glob("*.dcm")), study / "repeat", "T1 POST GD repeat", 60,
                ["ORIGINAL", "PRIMARY", "M", "ND"])  # fmt: skip
    out = tmp_path / "o"
    assert run(["predict", str(study), "--model", "none", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "also matches t1c; series 60 (the latest) is used" in err
    summary = json.loads((out / "summary.json").read_text())
    (used,) = summary["role_series"]["t1c"]
    assert used["series_number"] == 60 and used["description"].startswith("T1 POST GD repeat")
    uid = pydicom_uid(next((study / "repeat").iterdir()))
    assert used["series_instance_uid"] == uid
    assert any("also matches t1c; series 60" in n for n in summary["role_notes"])
    assert {"t1c", "rtstruct"} <= set(summary["role_series"])


def pydicom_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_options_the_model_cannot_use_are_refused(
    tiny_cohort: Cohort, tiny_baseline_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The UNet baseline took --survival-class and ignored it; evaluate took --guidance,
    --stage1-bounds and --survival-class truth with no latent diffusion model and said
    nothing."""
    nifti = tiny_cohort[0] / tiny_cohort[1][0].patient_id / "nifti"
    out = tmp_path / "o"
    assert run(["predict", str(nifti), "--model", str(tiny_baseline_dir), "--survival-class",
                "short", "--out", str(out)]) == 2  # fmt: skip
    assert "--survival-class short: the unet-baseline model" in capsys.readouterr().err
    assert not out.exists()
    # the sampler's other options were taken by both baselines and ignored without a word
    for model in ([], ["--model", "none"], ["--model", str(tiny_baseline_dir)]):
        for option in (["--guidance-scale", "3"], ["--steps", "5"],
                       ["--unknown-class", "marginal"]):  # fmt: skip
            assert run(["predict", str(nifti), *model, *option, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert f"{option[0]} {option[1]}: the " in err, err
            assert "expected a latent diffusion model (--model bundled or its directory)" in err
        assert not out.exists()
    assert run(["predict", str(nifti), "--steps", "5", "--guidance-scale", "2", "--out",
                str(out)]) == 2  # fmt: skip
    assert (
        "--guidance-scale 2, --steps 5: the 'no change' baseline takes no guidance scale, no "
        "number of sampling steps; expected a latent diffusion model (--model bundled or its "
        "directory) with them"
    ) in capsys.readouterr().err
    argv = ["evaluate", "--data", str(tiny_cohort[0]), "--model", str(tiny_baseline_dir)]
    argv += ["--samples", "1", "--limit", "1", "--no-progress", "--out", str(tmp_path / "ev")]
    for option in (["--guidance"], ["--stage1-bounds"], ["--survival-class", "truth"]):
        assert run([*argv, *option]) == 2
        err = capsys.readouterr().err
        assert f"{' '.join(option)}: for latent diffusion models only" in err
        assert "found glioforecast-unet-tiny" in err or "(unet-baseline)" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_predict_does_not_write_over_a_folder_that_holds_files(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's mean.nii.gz in --out was replaced without a word."""
    nifti = tiny_cohort[0] / tiny_cohort[1][0].patient_id / "nifti"
    out = tmp_path / "mine"
    out.mkdir()
    (out / "mean.nii.gz").write_bytes(b"the user's")
    assert run(["predict", str(nifti), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: expected an empty or new folder, found mean.nii.gz" in err
    assert "--overwrite" in err
    assert (out / "mean.nii.gz").read_bytes() == b"the user's"
    assert run(["predict", str(nifti), "--out", str(out), "--overwrite"]) == 0
    assert (out / "summary.json").is_file() and read_volume(out / "mean.nii.gz").shape
    # a previous prediction's folder is replaced only when asked
    before = (out / "summary.json").read_text()
    assert run(["predict", str(nifti), "--out", str(out), "--samples", "2"]) == 2
    assert "found a previous prediction (summary.json); give --overwrite" in (
        capsys.readouterr().err
    )
    assert (out / "summary.json").read_text() == before
    assert run(["predict", str(nifti), "--out", str(out), "--samples", "2", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["samples"] == 2
    # an empty folder is a new one
    (tmp_path / "empty").mkdir()
    assert run(["predict", str(nifti), "--out", str(tmp_path / "empty")]) == 0
