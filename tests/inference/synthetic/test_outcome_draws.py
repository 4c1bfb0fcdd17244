"""Outcome twins (``glioforecast synth --outcome-draws K``): the same patient up to the
radiotherapy plan, the outcome drawn again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_node.errors import InputError
from inference.data import read_cohort
from inference.evaluate import training_overlap
from inference.synthetic.cohort import generate_cohort, outcome_base_id, read_table
from inference.synthetic.outcome import response_category
from tests.inference.synthetic.conftest import SEED, SPACING

PRE_FILES = ("pre_t1", "pre_t1c", "pre_t2", "pre_flair", "pre_labels", "gtv", "ctv", "ptv",
             "dose", "density_pre")  # fmt: skip


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("twins")
    generate_cohort(out, patients=2, sites=2, seed=SEED, spacing_mm=SPACING, formats=("nifti",),
                    outcome_draws=3)  # fmt: skip
    return out


def test_draw_zero_is_the_cohort_patient(twins: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    generate_cohort(plain, patients=2, sites=2, seed=SEED, spacing_mm=SPACING, formats=("nifti",))
    rows = {r["patient_id"]: r for r in read_table(twins / "cohort.csv")}
    for row in read_table(plain / "cohort.csv"):
        twin_row = rows[row["patient_id"]]
        assert twin_row["outcome_draw"] == "0" and twin_row["outcome_of"] == row["patient_id"]
        assert {k: twin_row[k] for k in row} == row
        for f in sorted((plain / row["patient_id"] / "nifti").glob("*.nii.gz")):
            assert np.array_equal(_array(f), _array(twins / row["patient_id"] / "nifti" / f.name))


def test_twins_share_the_pre_treatment_and_differ_after(twins: Path) -> None:
    rows = read_table(twins / "cohort.csv")
    assert [r["patient_id"] for r in rows] == [
        f"GF{SEED % 100000:05d}-000{i}{suffix}" for i in (1, 2) for suffix in ("", "-D1", "-D2")
    ]
    for base in ("0001", "0002"):
        group = [r for r in rows if r["outcome_of"].endswith(base)]
        assert [r["outcome_draw"] for r in group] == ["0", "1", "2"]
        same = ("site", "age", "sex", "kps", "pre_enhancing_ml", "gtv_ml", "ptv_d95_gy",
                "rho_per_day", "d_white_mm2_per_day", "study_date_pre")  # fmt: skip
        for key in same:
            assert len({r[key] for r in group}) == 1, key
        # the treatment was drawn again: its parameters differ for every twin
        assert len({r["alpha_per_gy"] for r in group}) == 3
        for r in group:
            assert outcome_base_id(r["patient_id"]) == r["outcome_of"]
            pre, post = float(r["pre_enhancing_ml"]), float(r["post_enhancing_ml"])
            assert r["response_category"] == response_category(pre, post)
        folders = [twins / r["patient_id"] / "nifti" for r in group]
        for name in PRE_FILES:
            first = _array(folders[0] / f"{name}.nii.gz")
            for other in folders[1:]:
                assert np.array_equal(first, _array(other / f"{name}.nii.gz")), name
        post = [_array(f / "post_t1c.nii.gz") for f in folders]
        assert not np.array_equal(post[0], post[1]) and not np.array_equal(post[1], post[2])
        # the follow-up labels hold each draw's own enhancing volume
        for r, f in zip(group, folders, strict=True):
            labels = _array(f / "post_labels.nii.gz")
            assert np.isin(labels, (3, 5)).sum() > 0 or float(r["post_enhancing_ml"]) < 0.1


def test_twins_are_read_as_training_patients_of_their_cohort(twins: Path) -> None:
    patients = read_cohort([twins])
    assert len(patients) == 6
    assert {p.cohort_seed for p in patients} == {SEED % 100000}


def test_a_twin_in_training_counts_its_patient_as_seen(twins: Path, tmp_path: Path) -> None:
    state = tmp_path / "model" / "checkpoints" / "last" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"train_patients": ["GF20521-0001-D2"]}', encoding="utf-8")
    assert training_overlap(tmp_path / "model", ["GF20521-0001", "GF20521-0002"]) == 1


def test_twins_are_refused_in_dicom(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected formats nifti or none with 2 draws"):
        generate_cohort(tmp_path, patients=1, sites=1, seed=SEED, spacing_mm=SPACING,
                        outcome_draws=2)  # fmt: skip
    assert not (tmp_path / "cohort.csv").exists()
