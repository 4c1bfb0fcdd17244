"""Labelling rules and deterministic UIDs shared by every output object."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset

from dicom_node.errors import ExportError
from dicom_node.types import FrameMapping
from sr_writer.labels import (
    BANNER_TEXT,
    SERIES_NUMBERS,
    JobIdentity,
    LossyHistory,
    is_labelled_description,
    lossy_history,
    series_description,
)
from sr_writer.notice import build_failure_notice
from sr_writer.outputs import OutputOptions, build_outputs
from sr_writer.rejection import Rejected, build_rejection_note
from tests.sr_writer.synthetic_job import (
    PATIENT_NAME,
    default_case,
    default_notice,
    default_outputs,
    job_inputs,
    make_case,
)


def _job(**kw: object) -> JobIdentity:
    base: dict[str, object] = {
        "study_instance_uid": "1.2.3",
        "input_instance_uids": ("1.2.3.4", "1.2.3.5"),
        "model_name": "m",
        "model_version": "1.0",
    }
    base.update(kw)
    return JobIdentity(**base)  # type: ignore[arg-type]


def test_uids_are_deterministic_and_order_free() -> None:
    a = _job()
    b = _job(input_instance_uids=("1.2.3.5", "1.2.3.4"))
    assert a.series_uid("sc") == b.series_uid("sc")
    assert a.instance_uid("sc", 3) == b.instance_uid("sc", 3)
    assert a.instance_uid("sc", 3) != a.instance_uid("sc", 4)
    assert a.series_uid("sc") != a.series_uid("seg")
    for uid in (a.series_uid("sr"), a.instance_uid("derived-mr", 179)):
        assert uid.startswith("2.25.") and len(uid) <= 64


def test_uids_change_with_model_version_and_inputs() -> None:
    a = _job()
    assert a.series_uid("sc") != _job(model_version="1.1").series_uid("sc")
    assert a.series_uid("sc") != _job(input_instance_uids=("1.2.3.4",)).series_uid("sc")
    assert a.series_uid("sc") != _job(study_instance_uid="1.2.4").series_uid("sc")
    # a study sent again under a corrected patient (same instance UIDs)
    assert a.series_uid("sc") != _job(patient_id="GF-2").series_uid("sc")
    assert _job(patient_id="GF-2").series_uid("sc") != _job(
        patient_id="GF-2", issuer_of_patient_id="HOSP_A"
    ).series_uid("sc")


def test_job_identity_refuses_bad_input() -> None:
    with pytest.raises(ExportError, match="expected a DICOM UID"):
        _job(study_instance_uid="1.2.x")
    with pytest.raises(ExportError, match="at least one input"):
        _job(input_instance_uids=())
    with pytest.raises(ExportError, match="unknown output kind"):
        _job().series_uid("pdf")


def test_series_description_rule_and_limit() -> None:
    d = series_description("T1-Gd SC")
    assert d.startswith("SYNTHETIC PREDICTION") and "RESEARCH USE ONLY" in d
    assert is_labelled_description(d)
    assert not is_labelled_description("T1 post contrast")
    with pytest.raises(ExportError, match="at most 64 characters"):
        series_description("x" * 30)


def test_rebuilding_a_job_gives_the_same_uids() -> None:
    case = default_case()
    first = default_outputs()
    again = build_outputs(case.prediction, job_inputs(case))
    assert [d.SOPInstanceUID for d in again.all() if d.Modality != "MR"] == [
        d.SOPInstanceUID for d in first.all() if d.Modality != "MR"
    ]
    other = make_case(model_version="0.2.0")
    changed = build_outputs(other.prediction, job_inputs(other))
    assert not {d.SOPInstanceUID for d in changed.all()} & {d.SOPInstanceUID for d in first.all()}


def test_every_object_is_labelled_in_the_source_study() -> None:
    case = default_case()
    # every kind of object: the derived MR, and the RTSTRUCT on a planning frame (a GTV drawn
    # on the planning CT's frame)
    shifted = np.eye(4)
    shifted[:3, 3] = (12.0, -3.0, 40.0)
    inputs = dataclasses.replace(
        job_inputs(case), planning_frame=FrameMapping("1.2.826.0.1.3680043.8.498.7", shifted)
    )
    out = build_outputs(
        case.prediction, inputs, OutputOptions(node_version="0.1.0", derived_mr=True)
    )
    assert out.rtstruct_planning is not None
    assert out.rtstruct_planning.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == (
        "1.2.826.0.1.3680043.8.498.7"
    )
    # every frame UID it carries is the planning one (a reader may trust any of them)
    assert out.rtstruct_planning.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.7"
    assert out.rtstruct.FrameOfReferenceUID == case.t1c.frame_of_reference_uid
    series_numbers = set()
    for ds in out.all():
        assert ds.StudyInstanceUID == case.patient.study_instance_uid
        assert ds.PatientID == case.patient.patient_id
        assert is_labelled_description(ds.SeriesDescription), ds.SeriesDescription
        assert ds.ContentQualification == "RESEARCH", ds.Modality
        eq = ds.ContributingEquipmentSequence[0]
        assert eq.Manufacturer == "glioforecast"
        assert eq.ManufacturerModelName == case.prediction.model_name
        assert any(case.prediction.model_version in v for v in eq.SoftwareVersions)
        assert eq.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert ds.SeriesInstanceUID not in (case.t1c_series.series_instance_uid,)
        series_numbers.add(int(ds.SeriesNumber))
    assert series_numbers == set(SERIES_NUMBERS.values())
    assert all(ds.ConversionType == "SYN" for ds in (*out.sc, *out.uncertainty_sc))
    assert out.sr.VerificationFlag == "UNVERIFIED"
    assert BANNER_TEXT in out.derived_mr[0].ImageComments
    assert list(out.derived_mr[0].ImageType[:2]) == ["DERIVED", "SECONDARY"]


def test_patient_name_round_trips_in_utf8() -> None:
    """`Lefèvre^Zoë` written as ISO_IR 192 reads back identical from every object type."""
    out = default_outputs()
    kinds = {ds.SOPClassUID for ds in out.all()}
    assert len(kinds) == 5  # SC, SEG, RTSTRUCT, SR, MR
    for ds in out.all():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        raw = buf.getvalue()
        assert "Lefèvre^Zoë".encode() in raw, ds.Modality
        back = dcmread(io.BytesIO(raw))
        assert back.SpecificCharacterSet == "ISO_IR 192", ds.Modality
        assert str(back.PatientName) == PATIENT_NAME, ds.Modality
        assert back.PatientName.family_name == "Lefèvre"
        assert back.PatientName.given_name == "Zoë"


def test_patient_and_study_are_copied_as_received() -> None:
    """Real studies carry values the standard refuses (PatientSex U, a birth date with day 00,
    an ACR-NEMA study time with colons) and an Issuer of Patient ID, half of the patient's
    identity to an IHE PACS: every object carries them as the source has them, and dates its
    series (two versions of a study's results are told apart by their series date and time)."""
    case = default_case()
    patient = dataclasses.replace(
        case.patient,
        patient_sex="U",
        patient_birth_date="19610800",
        study_time="12:51:00",
        issuer_of_patient_id="HOSP_A",
        study_description="MR BRAIN TUMOUR PRE-RT",
    )
    inputs = dataclasses.replace(job_inputs(case), patient=patient)
    out = build_outputs(
        case.prediction, inputs, OutputOptions(node_version="0.1.0", derived_mr=True)
    )
    notice_sc, notice_sr = build_failure_notice(default_notice(), patient, "0.1.0")
    note = build_rejection_note(
        patient,
        [Rejected(str(out.sr.SOPClassUID), str(out.sr.SOPInstanceUID), out.sr.SeriesInstanceUID)],
        job="2",
        node_ae_title="GLIOFORECAST",
        node_version="0.1.0",
    )
    objects = [*out.all(), notice_sc, notice_sr, note]
    assert {ds.Modality for ds in objects} == {"OT", "SEG", "RTSTRUCT", "SR", "MR", "KO"}
    for ds in objects:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        back = dcmread(io.BytesIO(buf.getvalue()))
        got = tuple(
            str(back.get(k, "<absent>"))
            for k in (
                "PatientSex",
                "PatientBirthDate",
                "StudyTime",
                "IssuerOfPatientID",
                "StudyDescription",
                "PatientID",
                "AccessionNumber",
            )
        )
        assert got == (
            "U",
            "19610800",
            "12:51:00",
            "HOSP_A",
            "MR BRAIN TUMOUR PRE-RT",
            "GF-0001",
            "ACC0001",
        ), back.Modality
        assert len(str(back.get("SeriesDate", ""))) == 8, back.Modality
        assert len(str(back.get("SeriesTime", ""))) >= 4, back.Modality
    # a source without an issuer: none on the outputs (not an empty one)
    assert "IssuerOfPatientID" not in default_outputs().sr


def _source(syntax: str = "1.2.840.10008.1.2.1", **attributes: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_the_lossy_compression_of_the_sources_is_found() -> None:
    """An image once lossy compressed stays so (PS3.3 C.7.6.1.1.5), whether it says so or
    was received in a lossy transfer syntax; JPEG 2000 counts unless the image says 00."""
    assert lossy_history([_source(), _source(LossyImageCompression="00")]) is None
    assert lossy_history([_source("1.2.840.10008.1.2.4.91", LossyImageCompression="00")]) is None
    said = _source(
        LossyImageCompression="01",
        LossyImageCompressionMethod="ISO_14495_1",
        LossyImageCompressionRatio="2.5",
    )
    assert lossy_history([_source(), said, said]) == LossyHistory(("ISO_14495_1",), ("2.5",))
    assert lossy_history([_source("1.2.840.10008.1.2.4.50")]) == LossyHistory(("ISO_10918_1",))
    assert lossy_history([_source("1.2.840.10008.1.2.4.91")]) == LossyHistory(("ISO_15444_1",))
    # sources that went through different compressions: lossy, steps not told
    assert lossy_history([said, _source("1.2.840.10008.1.2.4.50")]) == LossyHistory()


def test_images_derived_from_lossy_sources_say_so() -> None:
    """Every image output (SC, uncertainty SC, derived MR, SEG) said LossyImageCompression 00
    though its source had been lossy compressed (a PACS that transcoded it to JPEG)."""
    case = default_case()
    history = LossyHistory(("ISO_10918_1",), ("12.5",))
    inputs = dataclasses.replace(job_inputs(case), lossy=history)
    outputs = build_outputs(case.prediction, inputs, OutputOptions(derived_mr=True))
    images = [*outputs.sc, *outputs.uncertainty_sc, *outputs.derived_mr, outputs.seg]
    for ds in images:
        assert ds.LossyImageCompression == "01", ds.SeriesDescription
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(ds.LossyImageCompressionRatio) == 12.5
    for ds in default_outputs().all():  # lossless sources
        assert ds.get("LossyImageCompression", "00") == "00"
        assert "LossyImageCompressionMethod" not in ds
