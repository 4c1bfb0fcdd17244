"""``glioforecast synth``: argument parsing, the registered callable, and the module entry."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.synthetic import cli
from inference.synthetic.cohort import read_table

REPO = Path(__file__).resolve().parents[3]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glioforecast")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    return parser


def test_register_adds_synth_with_defaults(tmp_path: Path) -> None:
    args = _parser().parse_args(["synth", "--patients", "3", "--out", str(tmp_path)])
    assert args.func is cli.run
    assert (args.patients, args.sites, args.seed, args.spacing, args.jobs) == (3, 1, 0, 2.0, 1)
    assert args.formats == ("nifti", "dicom")
    assert args.survival_cutoffs == (12.0, 24.0)
    assert args.no_mass_effect is False
    assert args.follow_up_moved is False
    assert args.rt_planning_frame == ""


@pytest.mark.parametrize(
    "bad",
    [
        ["--format", "png"],
        ["--jobs", "0"],
        ["--patients", "-1"],
        ["--survival-cutoffs", "24,12"],
        ["--survival-cutoffs", "x"],
        ["--outcome-draws", "0"],
        ["--seed", "-1"],
    ],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["synth", "--patients", "1", "--out", str(tmp_path), *bad]
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_a_seed_past_the_five_digits_of_the_patient_ids_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """synth --seed 100077 used to write other patients under the IDs of --seed 77
    (GF00077-0001...): a false training-overlap warning, "appears twice" in train."""
    base = ["synth", "--patients", "1", "--out", str(tmp_path)]
    assert _parser().parse_args([*base, "--seed", "99999"]).seed == 99999
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args([*base, "--seed", "100077"])
    assert exc.value.code == 2
    assert (
        "expected a cohort seed from 0 to 99999 (the patient IDs GFsssss-nnnn hold five digits "
        "of it: 100077 would reuse the IDs of seed 77), found '100077'"
    ) in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_writes_the_table(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["synth", "--patients", "2", "--sites", "2", "--out", str(tmp_path / "c"), "--seed", "4",
         "--spacing", "6", "--format", "none", "--no-progress", "--survival-cutoffs", "6,18"]
    )  # fmt: skip
    assert args.func(args) == 0
    rows = read_table(tmp_path / "c" / "cohort.csv")
    assert len(rows) == 2 and rows[0]["site"] != rows[1]["site"]
    for row in rows:
        months = float(row["survival_months"])
        expected = "short" if months < 6 else "intermediate" if months < 18 else "long"
        assert row["survival_class"] == expected
    assert (tmp_path / "c" / "sites.csv").is_file()
    assert not any((tmp_path / "c").rglob("*.dcm"))


def test_run_moves_the_dicom_follow_up(tmp_path: Path) -> None:
    import pydicom

    args = _parser().parse_args(
        ["synth", "--patients", "1", "--out", str(tmp_path / "c"), "--seed", "4", "--spacing",
         "6", "--format", "dicom", "--no-progress", "--follow-up-moved"]
    )  # fmt: skip
    assert args.func(args) == 0
    (row,) = read_table(tmp_path / "c" / "cohort.csv")
    assert 3.0 <= float(row["follow_up_rotation_deg"]) <= 10.0
    study = tmp_path / "c" / row["patient_id"] / "dicom"
    frames = {
        phase: pydicom.dcmread(next((study / phase / "003_t1c").glob("*.dcm"))).FrameOfReferenceUID
        for phase in ("pre", "post")
    }
    assert frames["pre"] != frames["post"]


def test_run_puts_the_rt_objects_on_a_planning_frame(tmp_path: Path) -> None:
    import pydicom

    def run(out: Path, *extra: str) -> Path:
        args = _parser().parse_args(
            ["synth", "--patients", "1", "--out", str(out), "--seed", "4", "--spacing", "6",
             "--format", "dicom", "--no-progress", *extra]
        )  # fmt: skip
        assert args.func(args) == 0
        return out

    plain, planned = run(tmp_path / "a"), run(tmp_path / "b", "--rt-planning-frame")
    (row,) = read_table(planned / "cohort.csv")
    assert 2.0 <= float(row["planning_rotation_deg"]) <= 10.0
    pre = Path("GF00004-0001") / "dicom" / "pre"
    rs = pydicom.dcmread(planned / pre / "RTSTRUCT" / "rtstruct.dcm")
    reg = pydicom.dcmread(planned / pre / "REG" / "reg.dcm")
    t1c = pydicom.dcmread(next((planned / pre / "003_t1c").glob("*.dcm")))
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == reg.FrameOfReferenceUID
    assert rs.FrameOfReferenceUID == reg.FrameOfReferenceUID  # its top-level one too
    assert reg.FrameOfReferenceUID != t1c.FrameOfReferenceUID
    assert {str(i.FrameOfReferenceUID) for i in reg.RegistrationSequence} == {
        reg.FrameOfReferenceUID, t1c.FrameOfReferenceUID,
    }  # fmt: skip
    # the MR series are those written without the option, byte for byte
    mr = sorted(p.relative_to(planned) for p in (planned / pre).glob("0*/*.dcm"))
    assert mr and all((planned / p).read_bytes() == (plain / p).read_bytes() for p in mr)
    assert not (plain / pre / "REG").exists()
    # in a planning study of their own, as a planning system keeps them
    own = run(tmp_path / "c", "--rt-planning-frame", "planning-study")
    planning = Path("GF00004-0001") / "dicom" / "planning"
    moved = {f.name for f in (own / planning).iterdir()}
    assert moved == {"RTSTRUCT", "RTDOSE", "REG"}
    assert not (own / pre / "RTSTRUCT").exists() and not (own / pre / "REG").exists()
    studies = {
        pydicom.dcmread(next((own / planning / f).glob("*.dcm"))).StudyInstanceUID for f in moved
    }
    assert len(studies) == 1 and studies != {t1c.StudyInstanceUID}


def test_a_folder_holding_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cohort written over another left the other's files: a series took the other cohort's
    slices of the same UIDs at another spacing, and patients the new table does not list."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cohort.csv").write_text("patient_id\n")
    args = _parser().parse_args(
        ["synth", "--patients", "1", "--out", str(tmp_path / "c"), "--format", "none"]
    )
    assert args.func(args) == 2
    assert "expected a new or empty folder, found one holding files" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["cohort.csv"]


def test_run_reports_library_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(
        ["synth", "--patients", "1", "--out", str(tmp_path), "--spacing", "20", "--format", "none"]
    )
    assert args.func(args) == 2
    assert "spacing must be between" in capsys.readouterr().err


def test_module_runs_with_a_progress_bar(tmp_path: Path) -> None:
    out = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "inference.synthetic.cli", "--patients", "1", "--out", str(out),
         "--spacing", "6", "--format", "nifti"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "synth" in run.stderr and "1/1" in run.stderr  # tqdm's bar
    assert len(read_table(out / "cohort.csv")) == 1
    assert len(list(out.rglob("*.nii.gz"))) == 8 + 2 + 3 + 1 + 2


def test_options_that_would_do_nothing_are_refused_and_coarse_grids_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--follow-up-moved and --rt-planning-frame shape the DICOM studies: without DICOM they
    were ignored without a word. A grid above 6 mm loses the tumour's enhancing rim; more sites
    than patients leaves sites empty."""
    base = ["synth", "--patients", "1", "--sites", "2", "--out", str(tmp_path / "c"),
            "--no-progress"]  # fmt: skip
    args = _parser().parse_args(
        [*base, "--format", "nifti", "--follow-up-moved", "--rt-planning-frame"]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert (
        "--follow-up-moved and --rt-planning-frame: expected --format with dicom (they shape the "
        "DICOM studies), found --format nifti"
    ) in err
    assert not (tmp_path / "c").exists()
    args = _parser().parse_args([*base, "--format", "none", "--spacing", "8"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "warning: --spacing 8 mm is coarser than the tumour's structure" in err
    assert "warning: --sites 2 with --patients 1: 1 site(s) will have no patient" in err


def test_an_interrupted_run_says_its_folder_is_incomplete(tmp_path: Path) -> None:
    """Ctrl-C used to exit 130 without a word, leaving patients and no cohort.csv."""
    import signal
    import time

    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "synth", "--patients", "40", "--out", str(out),
         "--spacing", "6", "--format", "nifti", "--jobs", "1", "--no-progress"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out.is_dir() and any(out.glob("GF*"))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"interrupted: {out} holds an incomplete cohort" in err
    assert not (out / "cohort.csv").exists()
