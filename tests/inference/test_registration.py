"""Follow-up studies on a frame of reference of their own, as a real follow-up session gives
them: the synthetic cohort writes them with a known head motion (``--follow-up-moved``), and
training and evaluation register them back onto the pre-treatment study."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.convert.geometry import grid_corners
from dicom_node.errors import InputError
from dicom_node.types import Volume
from inference.data import load_truth, read_cohort, training_sample
from inference.model_config import demo_config
from inference.registration import RigidTransform, register_rigid
from inference.synthetic.cohort import PatientRecord, generate_cohort
from tests.inference.conftest import COHORT_SEED

Cohort = tuple[Path, list[PatientRecord]]
CLASSES = ("short", "intermediate", "long")


@pytest.fixture(scope="module")
def moved_cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The tiny cohort's patients with their DICOM follow-ups moved."""
    out = tmp_path_factory.mktemp("moved-cohort")
    records = generate_cohort(
        out, patients=3, sites=2, seed=COHORT_SEED, spacing_mm=4.0, follow_up_moved=True
    )
    return out, records


def test_moved_follow_ups_are_written_on_their_own_frame(
    moved_cohort: Cohort, tiny_cohort: Cohort
) -> None:
    moved, records = moved_cohort
    plain, _ = tiny_cohort
    with (moved / "cohort.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row, record in zip(rows, records, strict=True):
        assert 3.0 <= float(row["follow_up_rotation_deg"]) <= 10.0
        assert 0.0 < float(row["follow_up_shift_mm"]) <= 10.0 * np.sqrt(3)
        dicom = moved / record.patient_id / "dicom"
        pre = pydicom.dcmread(next((dicom / "pre" / "003_t1c").glob("*.dcm")))
        post_files = sorted((dicom / "post" / "003_t1c").glob("*.dcm"))
        post = pydicom.dcmread(post_files[0])
        seg = pydicom.dcmread(dicom / "reader" / "post" / "seg.dcm")
        assert post.FrameOfReferenceUID != pre.FrameOfReferenceUID
        assert seg.FrameOfReferenceUID == post.FrameOfReferenceUID
        assert post.ImageOrientationPatient != pre.ImageOrientationPatient
        # the motion is drawn from its own stream: everything else is the unmoved cohort's
        same = plain / record.patient_id / "dicom"
        for rel in ("pre/003_t1c/0001.dcm", "pre/RTSTRUCT/rtstruct.dcm", "pre/RTDOSE/rtdose.dcm"):
            assert (dicom / rel).read_bytes() == (same / rel).read_bytes(), rel
        assert post.PixelData == pydicom.dcmread(same / "post/003_t1c/0001.dcm").PixelData


def test_training_registers_a_moved_follow_up_back(
    moved_cohort: Cohort, tiny_cohort: Cohort
) -> None:
    """The moved DICOM follow-up gives the truth and training sample of the registered NIfTI
    one: its grid lands within a millimetre of where it was (4 mm voxels). Compared on the
    demo model's 4 mm grid, the cohort's own spacing."""
    moved, _ = moved_cohort
    pre = demo_config().preprocessing
    dicom = read_cohort(moved, source="dicom")
    nifti = read_cohort(tiny_cohort[0], source="nifti")
    enhancing = 0
    for d, n in zip(dicom, nifti, strict=True):
        truth_d, truth_n = load_truth(d), load_truth(n)
        placed = truth_d.post_t1c
        assert placed.frame_of_reference_uid == truth_d.pre_enhancing.frame_of_reference_uid
        error = np.linalg.norm(grid_corners(placed) - grid_corners(truth_n.post_t1c), axis=1)
        assert error.max() < 1.0, f"{d.patient_id}: grid corners off by {error.max():.2f} mm"
        a = training_sample(d, pre, ("t1c", "flair"), True, CLASSES)
        b = training_sample(n, pre, ("t1c", "flair"), True, CLASSES)
        assert np.corrcoef(a.post_t1c.ravel(), b.post_t1c.ravel())[0, 1] > 0.99
        mask_a, mask_b = a.post_mask > 0.5, b.post_mask > 0.5
        if mask_b.any():
            enhancing += 1
            dice = 2 * (mask_a & mask_b).sum() / (mask_a.sum() + mask_b.sum())
            assert dice > 0.9, f"{d.patient_id}: follow-up mask Dice {dice:.3f}"
        np.testing.assert_array_equal(a.study.t1c, b.study.t1c)
    assert enhancing >= 1  # a follow-up with tumour left was compared, not only empty masks


def test_registration_recovers_a_known_motion(moved_cohort: Cohort) -> None:
    from inference.data import read_volume
    from inference.synthetic.cohort import follow_up_motion

    moved, records = moved_cohort
    pre_t1c = read_volume(moved / records[0].patient_id / "nifti" / "pre_t1c.nii.gz")
    post_t1c = read_volume(moved / records[0].patient_id / "nifti" / "post_t1c.nii.gz")
    motion = follow_up_motion(COHORT_SEED, 0, pre_t1c)
    moving = motion.place(post_t1c)  # the follow-up as its session placed it
    found = register_rigid(pre_t1c, moving)
    assert found.correlation is not None and found.correlation > 0.8
    back = found.place(moving)
    error = np.linalg.norm(grid_corners(back) - grid_corners(post_t1c), axis=1)
    assert error.max() < 1.0
    assert abs(found.rotation_deg - motion.rotation_deg) < 0.5
    # the same transform again, to the bit: training data must not change between runs
    again = register_rigid(pre_t1c, moving)
    assert np.array_equal(again.rotation, found.rotation)
    assert np.array_equal(again.translation, found.translation)


def test_a_follow_up_that_cannot_be_aligned_is_refused_with_the_figures(
    moved_cohort: Cohort, tmp_path: Path
) -> None:
    moved, records = moved_cohort
    pid = records[1].patient_id
    site = tmp_path / "site"
    site.mkdir()
    with (moved / "cohort.csv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["patient_id"] == pid]
    with (site / "cohort.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shutil.copytree(moved / pid / "dicom", site / pid)
    # another image under the follow-up's headers: noise where the head was
    rng = np.random.default_rng(0)
    for path in sorted((site / pid / "post" / "003_t1c").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        noise = rng.integers(0, 4000, size=(ds.Rows, ds.Columns), dtype=np.uint16)
        ds.PixelData = noise.tobytes()
        ds.save_as(path)
    (patient,) = read_cohort(site, source="dicom")
    with pytest.raises(InputError) as err:
        load_truth(patient)
    text = str(err.value)
    assert f"patient {pid}: follow-up T1-Gd: on frame of reference" in text
    assert "expected at least 0.6" in text
    assert "register the follow-up to the pre-treatment study first" in text


def test_place_moves_the_grid_not_the_voxels() -> None:
    volume = Volume(
        array=np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        spacing=(1.0, 2.0, 3.0),
        origin=(10.0, 0.0, -5.0),
        direction=np.eye(3),
        frame_of_reference_uid="1.2.3",
    )
    quarter = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    transform = RigidTransform(quarter, np.array([1.0, 2.0, 3.0]), "4.5.6")
    placed = transform.place(volume)
    assert placed.frame_of_reference_uid == "4.5.6"
    np.testing.assert_array_equal(placed.array, volume.array)
    np.testing.assert_allclose(placed.origin, (1.0, 12.0, -2.0))
    np.testing.assert_allclose(placed.affine[:3, :3], quarter @ volume.affine[:3, :3])
    assert transform.rotation_deg == pytest.approx(90.0)
