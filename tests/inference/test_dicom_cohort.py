"""Training patients from DICOM as the node stores it: the same samples as from NIfTI, through
the node's own spool, and a clear error for every patient that cannot be used."""

from __future__ import annotations

import csv
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.errors import InputError
from inference.data import CohortPatient, load_truth, read_cohort, training_sample
from inference.dicom_cohort import index_dicom
from inference.model_config import tiny_config
from inference.synthetic.cohort import PatientRecord
from tests.conftest import tool, wait_for
from tests.factories import copy_series

Cohort = tuple[Path, list[PatientRecord]]
CLASSES = ("short", "intermediate", "long")


def assert_same_samples(dicom: list[CohortPatient], nifti: list[CohortPatient]) -> None:
    """Each DICOM patient gives the training sample and truth its NIfTI twin gives."""
    pre = tiny_config().preprocessing
    assert [p.patient_id for p in dicom] == [p.patient_id for p in nifti]
    for d, n in zip(dicom, nifti, strict=True):
        assert d.dicom is not None and n.dicom is None
        a = training_sample(d, pre, ("t1c", "flair"), True, CLASSES)
        b = training_sample(n, pre, ("t1c", "flair"), True, CLASSES)
        for key in ("post_t1c", "post_mask", "pre_mask"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
        for key in ("t1c", "flair", "mask"):
            np.testing.assert_array_equal(getattr(a.study, key), getattr(b.study, key), key)
        # RT Dose stores 16-bit counts of about 1 mGy
        assert a.study.dose is not None and b.study.dose is not None
        np.testing.assert_allclose(a.study.dose, b.study.dose, atol=2e-3)
        assert (a.class_index, a.site) == (b.class_index, b.site)
        region_d, region_n = load_truth(d).tumour_region, load_truth(n).tumour_region
        np.testing.assert_array_equal(region_d.array, region_n.array)


def write_table(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def dicom_site(tiny: Cohort, dest: Path, patients: list[str] | None = None) -> Path:
    """A DICOM-only copy of (some patients of) the tiny cohort: table rows and DICOM trees."""
    src, records = tiny
    dest.mkdir(parents=True)
    with (src / "cohort.csv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if patients is None or r["patient_id"] in patients]
    write_table(dest / "cohort.csv", rows)
    for r in records:
        if patients is None or r.patient_id in patients:
            shutil.copytree(src / r.patient_id / "dicom", dest / "studies" / r.patient_id)
    return dest


def test_dicom_patients_give_the_samples_of_their_nifti_twins(tiny_cohort: Cohort) -> None:
    folder, records = tiny_cohort
    dicom = read_cohort(folder, source="dicom")
    assert [p.patient_id for p in dicom] == [r.patient_id for r in records]
    nifti = read_cohort(folder, source="nifti")
    assert_same_samples(dicom, nifti)
    # the comparison covers a follow-up with enhancing tumour, not only complete responses
    assert any(np.asarray(load_truth(n).post_enhancing.array).any() for n in nifti)


def test_a_dynamic_series_named_like_the_t1c_is_passed_over(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """The training reader chooses series as the node does: a 4D series matching t1c, with the
    highest series number, cannot be converted, so the 3D T1-Gd gives the sample."""
    from inference.dicom_cohort import study_inputs_from_dicom

    src, records = tiny_cohort
    pre = src / records[0].patient_id / "dicom" / "pre"
    study = tmp_path / "study"
    shutil.copytree(pre, study)
    copy_series(sorted((pre / "003_t1c").glob("*.dcm")), study / "dyn", "t1_vibe_dyn_post_Gd",
                40, ["ORIGINAL", "PRIMARY", "M", "ND"], repeats=2)  # fmt: skip
    inputs, roles = study_inputs_from_dicom(study)
    plain, plain_roles = study_inputs_from_dicom(pre)
    assert roles.described["t1c"] == plain_roles.described["t1c"]
    assert roles.described["t1c"].startswith("t1_mprage_tra_p2_iso_post_Gd")
    np.testing.assert_array_equal(inputs.t1c.array, plain.t1c.array)
    # the series used is named by number and UID, and the notes say why the other was not
    assert roles.as_json()["t1c"] == plain_roles.as_json()["t1c"]
    assert plain_roles.notes == ()
    assert any(n.startswith("series 3 't1_mprage") and "also matches t1c; series 40" in n
               for n in roles.notes)  # fmt: skip
    assert any(n.startswith("t1c: series 40 't1_vibe_dyn_post_Gd") and "cannot be used" in n
               and f"UID {roles.series['t1c'][0].series_instance_uid}, is used" in n
               for n in roles.notes)  # fmt: skip


def test_a_follow_up_outlined_in_an_rt_structure_set(tiny_cohort: Cohort, tmp_path: Path) -> None:
    """A radiotherapy department outlines the follow-up's enhancing lesion and necrosis as ROIs
    of an RT structure set, not as a Segmentation: the truth is the same voxels (the ROIs are
    the Segmentation's masks traced to contours; an empty lesion is an ROI without contours)."""
    from dicom_node.convert.series import load_series
    from dicom_node.pipeline import patient_study
    from dicom_node.types import SeriesRef
    from inference.dicom_cohort import segment_masks
    from sr_writer.rtstruct import RoiMask, build_rtstruct

    src, records = tiny_cohort
    site = dicom_site(tiny_cohort, tmp_path / "site")
    nifti = {p.patient_id: p for p in read_cohort(src, source="nifti")}
    for record in records:
        studies = site / "studies" / record.patient_id
        seg = studies / "reader" / "post" / "seg.dcm"
        t1c_files = sorted((studies / "post" / "003_t1c").glob("*.dcm"))
        post = load_series(t1c_files)
        header = pydicom.dcmread(t1c_files[0], stop_before_pixels=True)
        rois = [
            RoiMask(label, mask, (255, 0, 0), "GTV")
            for label, mask in segment_masks(seg, post, "test").items()
        ]
        outline = build_rtstruct(
            rois=rois,
            reference_grid=post,
            reference_series=SeriesRef(
                str(header.SeriesInstanceUID), str(header.SOPClassUID), post.source_instance_uids
            ),
            patient=patient_study(header),
            series_instance_uid=pydicom.uid.generate_uid(),
            sop_instance_uid=pydicom.uid.generate_uid(),
            series_description="Recurrence contours",
            series_number=77,
            structure_set_label="FOLLOW-UP",
            roi_generation_algorithm="MANUAL",
        )
        seg.unlink()
        outline.save_as(studies / "reader" / "post" / "outline.dcm", enforce_file_format=True)
        # a second structure set of the same series, read first, that outlines no lesion
        oar = pydicom.dcmread(studies / "reader" / "post" / "outline.dcm")
        oar.SOPInstanceUID = oar.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        for n, roi in enumerate(oar.StructureSetROISequence):
            roi.ROIName = f"OAR {n + 1}"
        oar.save_as(studies / "reader" / "post" / "a-oar.dcm", enforce_file_format=True)
    dicom = read_cohort(site, source="dicom")
    assert [p.patient_id for p in dicom] == [r.patient_id for r in records]
    lesions = 0
    for patient in dicom:
        got, want = load_truth(patient), load_truth(nifti[patient.patient_id])
        # the tumour region holds the GTV and the follow-up necrosis
        for key in ("post_enhancing", "pre_enhancing", "tumour_region"):
            np.testing.assert_array_equal(
                getattr(got, key).array, getattr(want, key).array, err_msg=key
            )
        lesions += int(np.asarray(want.post_enhancing.array).any())
    assert lesions >= 1  # the comparison covers a lesion that is there


def test_node_spool_is_a_training_site(tiny_cohort: Cohort, tmp_path: Path) -> None:
    """The studies sent to a running node with dcmtk's storescu (pre-treatment MR, RTSTRUCT,
    RTDOSE, readers' Segmentations, follow-up MR) train from its spool, linked into a site
    folder beside the outcome table."""
    from dicom_node.service import Node
    from tests.dicom_node.conftest import make_settings

    folder, records = tiny_cohort
    files = sorted(p for r in records for p in (folder / r.patient_id / "dicom").rglob("*.dcm"))
    # no job is assembled while the test runs: prediction is not what is tested here
    node = Node(make_settings(tmp_path / "node", assembly={"quiet_period_s": 3600.0}))
    node.start()
    thread = threading.Thread(target=node.run_forever, daemon=True)
    thread.start()
    try:
        for start in range(0, len(files), 400):
            sent = subprocess.run(
                [tool("storescu"), "-R", "-aet", "SCANNER1", "-aec", "GLIOFORECAST", "127.0.0.1",
                 str(node.scp.port), *map(str, files[start : start + 400])],
                capture_output=True, text=True, timeout=300, check=False,
                env={"TCP_NODELAY": "1"},  # dcmtk's own switch: 40 ms per instance without
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr[-2000:]
        wait_for(
            lambda: len(list(node.spool.root.rglob("*.dcm"))) == len(files),
            what="every instance in the spool",
        )
    finally:
        node.request_stop()
        thread.join(timeout=10)
        node.stop()
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(folder / "cohort.csv", site / "cohort.csv")
    (site / "spool").symlink_to(node.spool.root, target_is_directory=True)
    patients = read_cohort(site)  # auto: no NIfTI here, so DICOM
    assert all(str(p.folder).startswith(str(site / "spool")) for p in patients)
    assert_same_samples(patients, read_cohort(folder, source="nifti"))


def test_rt_objects_in_a_planning_study_of_their_own(tiny_cohort: Cohort, tmp_path: Path) -> None:
    """The structure set, dose and registration on the planning CT's frame and in its study (as
    a planning system keeps them): joined to the MR study they relate to, the samples are those
    of the NIfTI twins."""
    from inference.synthetic.planning_frame import to_planning_frame
    from tests.inference.conftest import COHORT_SEED

    folder, records = tiny_cohort
    site = dicom_site(tiny_cohort, tmp_path / "site")
    for n, r in enumerate(records):
        study = site / "studies" / r.patient_id
        to_planning_frame(study / "pre", COHORT_SEED, n, study / "planning")
        assert not (study / "pre" / "RTSTRUCT").exists()
    planning = pydicom.dcmread(next((site / "studies").glob("*/planning/RTSTRUCT/*.dcm")))
    mr = pydicom.dcmread(next((site / "studies").glob("*/pre/003_t1c/*.dcm")))
    assert planning.StudyInstanceUID != mr.StudyInstanceUID
    assert_same_samples(read_cohort(site, source="dicom"), read_cohort(folder, source="nifti"))


def _edit(files: list[Path], **values: object) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(path)


def test_every_unusable_patient_is_named_with_its_reason(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    ids = [r.patient_id for r in tiny_cohort[1]]
    site = dicom_site(tiny_cohort, tmp_path / "site")
    shutil.rmtree(site / "studies" / ids[2])
    (site / "studies" / ids[0] / "reader" / "post" / "seg.dcm").unlink()
    with pytest.raises(InputError) as err:
        read_cohort(site, source="dicom")
    text = str(err.value)
    assert "2 patient(s) of the table cannot be read" in text
    assert f"patient {ids[0]}: follow-up: expected a study with a Segmentation" in text
    assert f"patient {ids[2]}: expected DICOM studies with this PatientID, found none" in text
    assert ids[1] not in text
    # auto names both formats for a patient that has neither
    with pytest.raises(InputError, match=f"{ids[2]}: expected NIfTI files .* or DICOM studies"):
        read_cohort(site)


def test_follow_up_segmentation_on_another_frame_than_its_images_is_refused(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """A follow-up T1-Gd on a frame of reference of its own is registered (see
    test_registration.py), but the reader's outline must be on that T1-Gd's frame."""
    pid = tiny_cohort[1][0].patient_id
    site = dicom_site(tiny_cohort, tmp_path / "site", patients=[pid])
    _edit(sorted((site / "studies" / pid / "post" / "003_t1c").glob("*.dcm")),
          FrameOfReferenceUID="1.2.3.4.5.6")  # fmt: skip
    (patient,) = read_cohort(site)
    with pytest.raises(InputError, match=r"follow-up: Segmentation .* the T1-Gd's 1\.2\.3"):
        load_truth(patient)

    # a reader's outline without an enhancing segment names the labels it has
    site2 = dicom_site(tiny_cohort, tmp_path / "site2", patients=[pid])
    seg_path = site2 / "studies" / pid / "reader" / "post" / "seg.dcm"
    seg = pydicom.dcmread(seg_path)
    seg.SegmentSequence[0].SegmentLabel = "Oedema"
    seg.save_as(seg_path)
    (patient,) = read_cohort(site2)
    with pytest.raises(InputError, match=r"follow-up Segmentation: expected a segment .*Oedema"):
        load_truth(patient)


def test_two_follow_ups_need_the_table_to_choose(tiny_cohort: Cohort, tmp_path: Path) -> None:
    pid = tiny_cohort[1][0].patient_id
    site = dicom_site(tiny_cohort, tmp_path / "site", patients=[pid])
    post = site / "studies" / pid / "post"
    second = site / "studies" / pid / "post-2"
    shutil.copytree(post, second)
    shutil.copy(site / "studies" / pid / "reader" / "post" / "seg.dcm", second / "seg.dcm")
    later = pydicom.uid.generate_uid()
    _edit(sorted(second.rglob("*.dcm")), StudyInstanceUID=later, StudyDate="20300101")
    with (site / "cohort.csv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["patient_id"] == pid]
    with pytest.raises(InputError, match=r"found 2 .*post_study_uid"):
        read_cohort(site)
    studies = index_dicom(site)[pid]
    assert [s.when[:8] for s in studies][-1] == "20300101"
    rows[0]["post_study_uid"] = later
    write_table(site / "cohort.csv", rows)
    (patient,) = read_cohort(site)
    assert patient.dicom is not None and patient.dicom.post.study_instance_uid == later
    assert (
        load_truth(patient).post_t1c.shape
        == load_truth(read_cohort(tiny_cohort[0], source="nifti")[0]).post_t1c.shape
    )


def test_check_data_names_each_unusable_patient(
    tiny_cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a site runs before joining a federation; the SuperNode wrapper refuses to start on
    a folder whose table cannot be matched to files."""
    pytest.importorskip("flwr")
    from dicom_node.cli import main

    ids = [r.patient_id for r in tiny_cohort[1]]
    site = dicom_site(tiny_cohort, tmp_path / "site")
    assert main(["federate", "check-data", "--data", str(site)]) == 0
    assert "3 patients (3 dicom)" in capsys.readouterr().out
    _edit(sorted((site / "studies" / ids[1] / "post" / "003_t1c").glob("*.dcm")),
          FrameOfReferenceUID="1.2.3.4.5.6")  # fmt: skip
    assert main(["federate", "check-data", "--data", str(site)]) == 1
    out = capsys.readouterr().out
    assert f"unreadable: patient {ids[1]}, follow-up: Segmentation" in out
    assert "expected the T1-Gd's 1.2.3.4.5.6" in out
    assert "1 of 3 patients cannot be used" in out
    shutil.rmtree(site / "studies" / ids[2])
    for command in ("check-data", "supernode"):
        extra = (
            ["--superlink", "127.0.0.1:1", "--insecure", "--print"]
            if command == "supernode"
            else []
        )
        assert main(["federate", command, "--data", str(site), *extra]) == 2
        assert f"patient {ids[2]}: expected NIfTI files" in capsys.readouterr().err


def test_a_real_planning_study_without_outlines_is_named(real_data: Path, tmp_path: Path) -> None:
    """A real TCIA MR study with its RT structure sets (and no reader Segmentation or follow-up)
    is found by PatientID and refused with both missing pieces named."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "cohort.csv").write_text(
        "patient_id,site,survival_class,response_category\nSTS_001,TCIA,short,stable_disease\n",
        encoding="utf-8",
    )
    (site / "studies").symlink_to(real_data / "tcia_sts001_mr_rtstruct")
    (study,) = index_dicom(site)["STS_001"]
    assert sorted(s.summary.modality for s in study.series) == ["MR", "MR", "RTSTRUCT", "RTSTRUCT"]
    with pytest.raises(InputError) as err:
        read_cohort(site)
    text = str(err.value)
    assert "patient STS_001: pre-treatment study 1.3.6.1.4.1.14519" in text
    assert "expected a reader's Segmentation (enhancing tumour), found none" in text
    assert (
        "patient STS_001: follow-up: expected a study with a Segmentation (or an RT structure "
        "set with an enhancing ROI), later than"
    ) in text


def test_the_nodes_predictions_in_a_study_are_not_read_as_truth(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """A PACS export of the pre-treatment study also holds the node's predicted SEG and RTSTRUCT
    (labelled series, higher series numbers); the reader's SEG and the planning RTSTRUCT are
    still the ones read."""
    from sr_writer.labels import SERIES_NUMBERS, series_description

    pid = tiny_cohort[1][0].patient_id
    site = dicom_site(tiny_cohort, tmp_path / "site", patients=[pid])
    studies = site / "studies" / pid
    for what, source, number in (
        ("SEG", studies / "reader" / "pre" / "seg.dcm", SERIES_NUMBERS["seg"]),
        ("RTSTRUCT", studies / "pre" / "RTSTRUCT" / "rtstruct.dcm", SERIES_NUMBERS["rtstruct"]),
    ):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesNumber = number
        ds.SeriesDescription = series_description(what)
        if what == "SEG":
            ds.SegmentSequence[0].SegmentLabel = "Predicted tumour"
        else:
            ds.StructureSetROISequence[0].ROIName = "Predicted tumour"
        ds.save_as(studies / f"prediction-{what}.dcm")
    nifti = [p for p in read_cohort(tiny_cohort[0], source="nifti") if p.patient_id == pid]
    assert_same_samples(read_cohort(site, source="dicom"), nifti)
