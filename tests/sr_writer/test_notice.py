"""The failure notice objects: labelling, text, UIDs, and a page that holds any reason."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dicom_node.errors import ExportError
from sr_writer.labels import check_uid, is_labelled_description
from sr_writer.notice import (
    BACKGROUND_RGB,
    HEADLINE_RGB,
    HEIGHT,
    MARGIN,
    NOTICE_SERIES_NUMBERS,
    TEXT_RGB,
    WIDTH,
    build_failure_notice,
    read_notice,
    render_notice,
)
from sr_writer.secondary_capture import BANNER_BG_RGB, banner_height
from tests.sr_writer.synthetic_job import PATIENT_NAME, default_case, default_notice


def _uids(notice):  # type: ignore[no-untyped-def]
    objects = build_failure_notice(notice, default_case().patient, "0.1.0")
    return [(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in objects]


def test_the_notice_is_in_the_source_study_and_labelled() -> None:
    case = default_case()
    sc, sr = build_failure_notice(default_notice(), case.patient, "0.1.0")
    for ds in (sc, sr):
        assert ds.StudyInstanceUID == case.patient.study_instance_uid
        assert ds.PatientName == PATIENT_NAME and ds.SpecificCharacterSet == "ISO_IR 192"
        assert is_labelled_description(ds.SeriesDescription)
        assert ds.SeriesDescription.endswith("NO PREDICTION")
        assert ds.ContentQualification == "RESEARCH"
        assert ds.ContributingEquipmentSequence[0].Manufacturer == "glioforecast"
    assert (sc.SeriesNumber, sr.SeriesNumber) == (
        NOTICE_SERIES_NUMBERS["sc"],
        NOTICE_SERIES_NUMBERS["sr"],
    )
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    text = read_notice(sr)
    assert text["Reason no prediction was made"] == default_notice().reason
    assert text["Finding"] == default_notice().headline
    assert text["Node job"].startswith("Job 7 of the glioforecast node GLIOFORECAST, 2026-12-06")
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == case.t1c_series.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == list(
        case.t1c_series.sop_instance_uids
    )


def test_the_same_failure_gives_the_same_objects_another_reason_new_ones() -> None:
    first = _uids(default_notice())
    assert first == _uids(default_notice())  # built again (a restart, a retry)
    assert all(check_uid(u) for pair in first for u in pair)
    other_reason = _uids(default_notice("ambiguous role t1c: expected one matching series"))
    other_job = _uids(dataclasses.replace(default_notice(), job_id=8))
    for other in (other_reason, other_job):
        assert not {u for pair in first for u in pair} & {u for pair in other for u in pair}


def test_the_page_holds_a_reason_of_any_length() -> None:
    long_reason = "; ".join(
        f"series {n} 'AX T1 POST GD {n}' (MR Image Storage, 176 instances) "
        "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
        for n in range(60)
    )
    page = render_notice(default_notice(long_reason))
    assert page.shape == (HEIGHT, WIDTH, 3)
    assert (page[0, 0] == BANNER_BG_RGB).all()
    body = page[banner_height(WIDTH) :]

    def drawn(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.asarray((body == rgb).all(axis=2))

    assert drawn(HEADLINE_RGB).any() and drawn(TEXT_RGB).any()
    # nothing runs off the page: the bottom margin and the side margins stay background
    text = drawn(TEXT_RGB) | drawn(HEADLINE_RGB)
    assert not text[-MARGIN // 2 :].any()
    assert not text[:, : MARGIN // 2].any() and not text[:, -MARGIN // 2 :].any()
    assert (body[-1] == BACKGROUND_RGB).all()
    # the SR keeps the reason whole
    _, sr = build_failure_notice(default_notice(long_reason), default_case().patient, "0.1.0")
    assert read_notice(sr)["Reason no prediction was made"] == long_reason


def test_a_notice_without_a_reason_is_refused() -> None:
    with pytest.raises(ExportError, match="needs the job's reason"):
        build_failure_notice(default_notice("  "), default_case().patient, "0.1.0")
