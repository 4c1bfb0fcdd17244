"""Failure notices through the running node to real storage SCPs (dcmtk storescp)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pydicom
import pytest

from dicom_node.jobs import DONE, FAILED
from dicom_node.notices import NOTICE_EVENT, WINDOW_S, FailureNotices, explain
from dicom_node.settings import Destination, RetrieveSettings
from inference.synthetic.cohort import generate_patient
from sr_writer.labels import is_labelled_description
from sr_writer.notice import NOTICE_DESCRIPTION, read_notice
from sr_writer.rejection import REJECTION_DESCRIPTION, rejected_uids
from tests import factories
from tests.conftest import wait_for
from tests.dicom_node.conftest import finished_job, make_settings, storescp_destination
from tests.dicom_node.test_scp import storescu

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def scps(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A PACS that takes failure notices (and rejection notes) and a planning system that does
    not."""
    pacs_proc, pacs = storescp_destination(
        tmp_path / "pacs", "pacs", "PACS", failure_notice=True, reject_replaced=True
    )
    tps_proc, tps = storescp_destination(
        tmp_path / "tps", "tps", "TPS", objects=("seg", "rtstruct")
    )
    yield (pacs, tmp_path / "pacs"), (tps, tmp_path / "tps")
    for proc in (pacs_proc, tps_proc):
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def patient(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A synthetic patient's pre-treatment study: (images and dose, structure set)."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_patient(0, 7, out, spacing_mm=4.0, formats=("dicom",))
    files = sorted(out.glob("*/dicom/pre/**/*.dcm"))
    modality = {p: pydicom.dcmread(p, stop_before_pixels=True).Modality for p in files}
    return [p for p in files if modality[p] != "RTSTRUCT"], [
        p for p in files if modality[p] == "RTSTRUCT"
    ]


def test_a_study_without_its_structure_set_gets_a_notice_then_its_prediction(  # type: ignore[no-untyped-def]
    run_node, scps, patient, tmp_path: Path
) -> None:
    (pacs, at_pacs), (tps, _) = scps
    settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(pacs, tps))
    node = run_node(settings)
    images, structure_set = patient
    assert structure_set and images
    assert storescu(node.scp.port, *images).returncode == 0
    source = pydicom.dcmread(images[0])
    job = wait_for(
        lambda: finished_job(node, source.StudyInstanceUID, 1), what="the job without an RTSTRUCT"
    )
    assert job.state == FAILED and "missing required role rtstruct" in job.reason

    wait_for(lambda: node.outbox.counts().get("pacs") == {"sent": 2}, what="the notice at the PACS")
    received = [pydicom.dcmread(p) for p in sorted(at_pacs.iterdir())]
    assert sorted(str(ds.SOPClassUID) for ds in received) == [SECONDARY_CAPTURE, COMPREHENSIVE_SR]
    for ds in received:  # in the patient's study, labelled like every output
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert ds.SeriesDescription == NOTICE_DESCRIPTION
        assert is_labelled_description(ds.SeriesDescription)
        assert ds.ContentQualification == "RESEARCH"
    (sr,) = [ds for ds in received if ds.Modality == "SR"]
    text = read_notice(sr)
    assert text["Finding"].startswith("No RT structure set with the tumour outline (GTV)")
    assert text["Reason no prediction was made"] == job.reason
    assert "GLIOFORECAST" in text["Recommendation"]
    assert f"glioforecast jobs show {job.id}" in text["Node job"]
    assert sr.VerificationFlag == "UNVERIFIED"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in images]
    assert evidence == {ds.SOPInstanceUID for ds in headers if ds.Modality == "MR"}
    (sc,) = [ds for ds in received if ds.Modality != "SR"]
    assert sc.ConversionType == "WSD" and sc.pixel_array.shape[2] == 3
    assert "tps" not in node.outbox.counts()  # no notices there
    assert any(e.kind == NOTICE_EVENT for e in node.store.events(job.id))

    # the structure set arrives: the study is run again, the prediction follows, no new
    # notice; the PACS is told the notice no longer applies (an IOCM rejection note)
    assert storescu(node.scp.port, *structure_set).returncode == 0
    done = wait_for(
        lambda: finished_job(node, source.StudyInstanceUID, 2), timeout=120, what="the second job"
    )
    assert done.state == DONE, done.reason
    counts = wait_for(
        lambda: (
            (c := node.outbox.counts().get("pacs", {})) and set(c) == {"sent", "rejected"} and c
        ),
        timeout=60,
        what="the prediction and the rejection note at the PACS",
    )
    assert counts["rejected"] == 2
    at_the_pacs = [pydicom.dcmread(p) for p in at_pacs.iterdir()]
    descriptions = [ds.SeriesDescription for ds in at_the_pacs]
    assert descriptions.count(NOTICE_DESCRIPTION) == 2
    assert descriptions.count(REJECTION_DESCRIPTION) == 1
    (note,) = [ds for ds in at_the_pacs if ds.SeriesDescription == REJECTION_DESCRIPTION]
    assert rejected_uids(note) == {ds.SOPInstanceUID for ds in received}
    assert note.StudyInstanceUID == source.StudyInstanceUID
    assert len(at_the_pacs) > 3
    (event,) = [e for e in node.store.events(done.id) if e.kind == "replaced"]
    assert f"earlier ones at pacs (of jobs {job.id}, {done.id}): 0 not yet" in event.message
    assert "2 delivered rejected by note" in event.message
    assert node.notices.run_once() == 0


def _node_with_failed_studies(run_node, tmp_path: Path, *, notices: bool):  # type: ignore[no-untyped-def]
    """A node whose PACS (nothing listens there: rows stay pending) takes notices or not, and
    two failed studies: MR images without a structure set, and a structure set alone."""
    down = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9,
                       failure_notice=notices)  # fmt: skip
    settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(down,))
    settings = dataclasses.replace(
        settings, sending=dataclasses.replace(settings.sending, retry_initial_s=3600.0)
    )
    node = run_node(settings)
    mr = factories.small_study(tmp_path / "mr")
    rt_only = factories.small_study(tmp_path / "rt")
    assert storescu(node.scp.port, *mr["t1c"]).returncode == 0
    assert storescu(node.scp.port, *rt_only["rtstruct"]).returncode == 0
    mr_study = pydicom.dcmread(mr["t1c"][0]).StudyInstanceUID
    rt_study = pydicom.dcmread(rt_only["rtstruct"][0]).StudyInstanceUID
    wait_for(
        lambda: finished_job(node, mr_study, 1) and finished_job(node, rt_study, 1),
        what="both jobs to fail",
    )
    return node, finished_job(node, mr_study, 1), finished_job(node, rt_study, 1)


def _notices(node, job_id: int) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.message for e in node.store.events(job_id) if e.kind == NOTICE_EVENT]


def test_only_studies_with_images_get_one_notice_per_failure(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node, mr_job, rt_job = _node_with_failed_studies(run_node, tmp_path, notices=True)
    wait_for(lambda: _notices(node, mr_job.id), what="the MR study's notice")
    rows = node.outbox.items()
    assert {r.job for r in rows} == {str(mr_job.id)} and len(rows) == 2
    # a study of RT objects only (a planning CT's study) fails by design: no notice
    assert _notices(node, rt_job.id) == []
    assert node.notices.run_once() == 0  # nothing is sent twice

    # failing again the same way (jobs retry): a notice again, the same objects
    assert node.assembler.retry(mr_job.id) == FAILED
    wait_for(lambda: len(_notices(node, mr_job.id)) == 2, what="the second notice")
    assert "(2 objects, 0 new deliveries)" in _notices(node, mr_job.id)[-1]
    assert len(node.outbox.items()) == 2


def test_failures_older_than_a_day_get_no_notice(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node, mr_job, _ = _node_with_failed_studies(run_node, tmp_path, notices=False)
    assert not node.notices.enabled and node.outbox.items() == []
    # notices turned on a day after the failure: too old to announce, nothing recorded
    on = dataclasses.replace(
        node.settings,
        destinations=tuple(
            dataclasses.replace(d, failure_notice=True) for d in node.settings.destinations
        ),
    )
    day_later = FailureNotices(
        on, node.store, node.outbox, clock=lambda: mr_job.updated_at + WINDOW_S + 1
    )
    assert day_later.run_once() == 0
    assert node.outbox.items() == [] and _notices(node, mr_job.id) == []
    # within the day it is announced
    assert FailureNotices(on, node.store, node.outbox).run_once() == 1
    assert len(node.outbox.items()) == 2


def test_a_job_the_worker_fails_gets_its_notice(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    down = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9,
                       failure_notice=True)  # fmt: skip
    node = run_node(dataclasses.replace(make_settings(tmp_path / "data"), destinations=(down,)))
    study = factories.small_study(tmp_path / "study")  # its structure set has no contour
    assert storescu(node.scp.port, *(p for paths in study.values() for p in paths)).returncode == 0
    study_uid = pydicom.dcmread(study["t1c"][0]).StudyInstanceUID
    job = wait_for(lambda: finished_job(node, study_uid, 1), timeout=120, what="the job")
    assert job.state == FAILED and "no CLOSED_PLANAR contour" in job.reason
    # named as site IT finds it in the PACS, not by the spool's file name
    assert re.match(r"RT structure set( '[^']*')? \(series \d+\): ROI 'GTV' has no ", job.reason)
    (said,) = wait_for(lambda: _notices(node, job.id), what="its notice")
    assert said.startswith("failure notice queued to pacs (2 objects, 2 new deliveries)")
    assert "no tumour outline (GTV) the node can use" in said


@pytest.mark.parametrize(
    ("reason", "headline"),
    [
        ("missing required role rtstruct: no series matched; received series 5", "No RT structure"),
        ("missing required role t1c: no series matched; received series 3", "No contrast-enhanced"),
        ("ambiguous role t1c: expected one matching series, found 2", "Several series"),
        ("no ROI name matches the pattern 'GTV'; ROIs available: 'CTV'", "The RT structure set"),
        ("rs.dcm: ROI 'GTV' has no CLOSED_PLANAR contour", "The RT structure set"),
        (
            "rs.dcm: ROI 'GTV' is on frame of reference 1.2.3 but the image is on 1.2.4; expected "
            "the same frame of reference or a Spatial Registration",
            "The tumour outline or the dose",
        ),
        (
            "RT Dose is on frame of reference 1.2.3 but the image is on 1.2.4",
            "The tumour outline or the dose",
        ),
        ("internal error: ValueError: boom", "The node failed"),
        ("the job process died of SIGKILL (killed: out of memory?)", "The node failed"),
        ("series 5: slice spacing varies from 1 to 3 mm", "The study's images could not"),
    ],
)
def test_the_headline_says_in_words_what_the_reason_says(reason: str, headline: str) -> None:
    said, advice = explain(reason, "GLIOFORECAST")
    assert said.startswith(headline)
    assert advice


def test_an_internal_error_says_how_long_the_study_is_kept_to_run_again() -> None:
    """The node keeps a failed job's study for retention.failed_days only: after that the
    study has to come again, and the notice says so."""
    _, advice = explain("internal error: ValueError: boom", "GLIOFORECAST", job_id=12, kept_days=30)
    assert advice == (
        "Ask the site's glioforecast administrators: they can run the job again (glioforecast "
        "jobs retry 12) from the study the node keeps for 30 days after the failure; after that "
        "it must be sent again."
    )
    _, advice = explain("the job process died of SIGKILL", "GLIOFORECAST", job_id=3, kept_days=0)
    assert advice.endswith("(glioforecast jobs retry 3) from the study the node keeps until "
                           "they remove it.")  # fmt: skip


def test_a_notice_says_the_pacs_was_asked_and_is_asked_again() -> None:
    reason = (
        "missing required role rtstruct: no series matched; received series 3 'T1 +C'; pacs was "
        "asked for them: it holds no RT structure set, dose or registration of the patient"
    )
    retrieve = RetrieveSettings(source="pacs", ask_again_h=6, ask_again_days=14)
    said, advice = explain(reason, "GLIOFORECAST", retrieve=retrieve)
    assert said.endswith("and the PACS had none for the patient when the node asked.")
    assert "the node asks the PACS again every 6 hours for 14 days from its first request" in (
        advice
    )
    never = dataclasses.replace(retrieve, ask_again_h=0)
    assert "asks the PACS again" not in explain(reason, "GLIOFORECAST", retrieve=never)[1]
    # a node that does not ask a PACS keeps the plain advice
    said, _ = explain(reason, "GLIOFORECAST")
    assert said == "No RT structure set with the tumour outline (GTV) was received for this study."


def test_a_notice_for_an_image_that_cannot_be_converted_names_its_series(  # type: ignore[no-untyped-def]
    run_node, scps, tmp_path: Path
) -> None:
    """A T1-Gd with two slices at one position cannot be made a volume: the job's reason and
    the notice say which series (number and description), so that the site knows what to fix
    (the reason was the converter's alone: "1 duplicate slice position(s) along ...")."""
    (pacs, at_pacs), _ = scps
    node = run_node(dataclasses.replace(make_settings(tmp_path / "data"), destinations=(pacs,)))
    study = factories.small_study(tmp_path / "study")
    second, third = (pydicom.dcmread(p) for p in study["t1c"][1:3])
    second.ImagePositionPatient = third.ImagePositionPatient
    second.save_as(study["t1c"][1])
    assert storescu(node.scp.port, *(p for paths in study.values() for p in paths)).returncode == 0
    study_uid = second.StudyInstanceUID
    job = wait_for(lambda: finished_job(node, study_uid, 1), timeout=120, what="the job")
    assert job.state == FAILED
    assert job.reason.startswith(
        "t1c series 5 'AX T1 POST GD' (MR Image Storage, 4 instances): 1 duplicate slice "
        "position(s) along the normal"
    ), job.reason
    wait_for(lambda: node.outbox.counts().get("pacs") == {"sent": 2}, what="the notice at the PACS")
    (sr,) = [ds for p in at_pacs.iterdir() for ds in [pydicom.dcmread(p)] if ds.Modality == "SR"]
    reason = read_notice(sr)["Reason no prediction was made"]
    assert reason == job.reason and "series 5 'AX T1 POST GD'" in reason
