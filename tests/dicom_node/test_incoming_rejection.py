"""IOCM rejection notes sent to the node: the rejected instances are no longer used, and the
prediction made from them is taken back at the PACS (running node, dcmtk storescu/storescp)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_node.errors import InputError
from dicom_node.jobs import DONE, FAILED, SUPERSEDED, JobStore
from dicom_node.rejections import rejection_note
from dicom_node.service import reconcile
from dicom_node.spool import Spool
from inference.synthetic.cohort import generate_patient
from sr_writer.labels import name_uid, series_description
from sr_writer.notice import read_notice
from sr_writer.rejection import REJECTION_DESCRIPTION, rejected_uids
from tests import factories
from tests.conftest import wait_for
from tests.dicom_node.conftest import (
    all_sent,
    finished_job,
    make_settings,
    storescp_destination,
)
from tests.dicom_node.test_jobs import SECRET, _info, _receive
from tests.dicom_node.test_scp import storescu

PATIENT_SAFETY = Code("113037", "DCM", "Rejected for Patient Safety Reasons")
RETENTION_EXPIRED = Code("113039", "DCM", "Data Retention Policy Expired")
KEY_IMAGES = Code("113000", "DCM", "Of Interest")


def key_object_note(rejected: list[Dataset], title: Code, folder: Path) -> Path:
    """A Key Object Selection Document as a modality or PACS makes one (highdicom), written to
    ``folder``: titled ``title``, listing ``rejected`` in their study."""
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=rejected,
        content=hd.ko.KeyObjectSelection(document_title=title, referenced_objects=rejected),
        series_instance_uid=name_uid("test-iocm", title.value, "series"),
        series_number=99,
        sop_instance_uid=name_uid("test-iocm", title.value, *(d.SOPInstanceUID for d in rejected)),
        instance_number=1,
        manufacturer="PACS VENDOR",
    )
    path = folder / f"note-{title.value}.dcm"
    note.save_as(path, enforce_file_format=True)
    return path


def _is_t1gd(description: str) -> bool:
    text = description.upper()
    return "T1" in text and ("GD" in text or "+C" in text)


@pytest.fixture(scope="module")
def patient(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A synthetic patient's pre-treatment study: its files and the T1-Gd's headers."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_patient(0, 11, out, spacing_mm=4.0, formats=("dicom",))
    files = sorted(out.glob("*/dicom/pre/**/*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    t1c = [ds for ds in headers if ds.Modality == "MR" and _is_t1gd(ds.SeriesDescription)]
    assert t1c and len({ds.SeriesInstanceUID for ds in t1c}) == 1, "one T1-Gd series expected"
    return files, t1c


@pytest.mark.parametrize("notices", [True, False], ids=["with notices", "without notices"])
def test_a_note_rejecting_the_t1gd_takes_the_prediction_back(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path: Path, notices: bool
) -> None:
    files, t1c = patient
    proc, pacs = storescp_destination(
        tmp_path / "pacs", "pacs", "PACS", failure_notice=notices, reject_replaced=True
    )
    try:
        settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(pacs,))
        node = run_node(settings)
        study = str(t1c[0].StudyInstanceUID)
        assert storescu(node.scp.port, *files).returncode == 0
        first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the prediction")
        assert first.state == DONE, first.reason
        delivered = all_sent(node, "pacs")
        at_pacs = [pydicom.dcmread(p) for p in (tmp_path / "pacs").iterdir()]
        prediction = {str(ds.SOPInstanceUID) for ds in at_pacs}
        assert len(prediction) == delivered

        # a reader's key images change nothing: the study is not run again for them
        key_images = key_object_note(t1c, KEY_IMAGES, tmp_path)
        assert storescu(node.scp.port, key_images).returncode == 0
        assert study not in node.store.due_studies(time.time() + 3600, 0)
        assert node.store.study_sop_classes(study)[KeyObjectSelectionDocumentStorage] == 1

        # the modality takes the T1-Gd back: the study is run again without it
        note = key_object_note(t1c, PATIENT_SAFETY, tmp_path)
        assert storescu(node.scp.port, note).returncode == 0
        second = wait_for(
            lambda: finished_job(node, study, 2), timeout=120, what="the second version"
        )
        assert second.state == FAILED and "missing required role t1c" in second.reason
        assert node.store.get_job(first.id).state == SUPERSEDED
        (event,) = [e for e in node.store.events(second.id) if e.kind == "rejected"]
        assert f"{len(t1c)} instance(s) of series {t1c[0].SeriesInstanceUID}" in event.message
        assert "Rejected for Patient Safety Reasons" in event.message
        assert f"\nglioforecast_rejected_instances {len(t1c)}\n" in node.metrics()
        assert not any(
            js.series.series_instance_uid == t1c[0].SeriesInstanceUID
            for js in node.store.job_series(second.id)
        )

        # the PACS gets a rejection note for the prediction it holds (and the notice, if on)
        wait_for(
            lambda: node.outbox.counts().get("pacs", {}).get("rejected") == len(prediction),
            timeout=60, what="the prediction rejected at the PACS",
        )  # fmt: skip
        wait_for(
            lambda: set(node.outbox.counts()["pacs"]) == {"sent", "rejected"},
            what="the rejection note delivered",
        )
        at_pacs = [pydicom.dcmread(p) for p in (tmp_path / "pacs").iterdir()]
        (ours,) = [ds for ds in at_pacs if ds.SeriesDescription == REJECTION_DESCRIPTION]
        assert rejected_uids(ours) == prediction
        (why,) = [i.TextValue for i in ours.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "113012"]  # fmt: skip
        assert "the node could make no prediction from it (glioforecast node" in why
        assert f"job {second.id}): these results no longer apply" in why
        # the failed job is the study's second version: its notice says so
        notice_description = series_description("NO PREDICTION", second.version)
        notice = [ds for ds in at_pacs if ds.SeriesDescription == notice_description]
        assert len(notice) == 2 * notices
        for sr in (ds for ds in notice if ds.Modality == "SR"):  # says why, not "no T1-Gd"
            finding = read_notice(sr)["Finding"]
            assert finding.startswith("Series the prediction needs were taken back"), finding
            assert "(IHE IOCM rejection: Rejected for Patient Safety Reasons)" in finding
        assert len(at_pacs) == len(prediction) + 1 + 2 * notices
        assert any(e.kind == "taken-back" for e in node.store.events(second.id))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_note_before_the_images_and_notes_that_reject_nothing(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path: Path
) -> None:
    """IOCM lets a rejection arrive before what it rejects; key images and a retention expiry
    reject nothing."""
    files, t1c = patient
    node = run_node(make_settings(tmp_path / "data"))
    study = str(t1c[0].StudyInstanceUID)
    notes = [key_object_note(t1c, title, tmp_path) for title in (KEY_IMAGES, RETENTION_EXPIRED)]
    assert storescu(node.scp.port, *notes, *files).returncode == 0
    first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the first version")
    assert first.state == DONE, first.reason  # neither note rejected the T1-Gd

    patient_safety = key_object_note(t1c, PATIENT_SAFETY, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    # the same rejection reaches a second node before the images do
    late = run_node(make_settings(other / "data"))
    assert storescu(late.scp.port, patient_safety).returncode == 0
    assert storescu(late.scp.port, *files).returncode == 0
    job = wait_for(
        lambda: finished_job(late, study, 1), timeout=120, what="the job on the second node"
    )
    assert job.state == FAILED and "missing required role t1c" in job.reason
    assert any(e.kind == "rejected" for e in late.store.events(job.id))


def test_a_rejection_note_that_lists_nothing_is_refused_by_name() -> None:
    ds = Dataset()
    ds.SOPClassUID = KeyObjectSelectionDocumentStorage
    ds.SOPInstanceUID = "1.2.3.4"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "113001", "DCM"
    ds.ConceptNameCodeSequence = [title]
    with pytest.raises(InputError, match=r"1\.2\.3\.4 \(Rejected for Quality Reasons\) lists no"):
        rejection_note(ds)
    title.CodingSchemeDesignator = "99LOCAL"  # a local code of the same value is no rejection
    assert rejection_note(ds) is None


def test_a_note_a_crash_left_unrecorded_is_applied_when_the_spool_is_reconciled(
    tmp_path: Path,
) -> None:
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    t1c = [pydicom.dcmread(p) for p in study["t1c"]]
    _receive(spool, store, study["t1c"], time.time())
    # the node was killed after the note's file was renamed into the spool, before its row
    note = pydicom.dcmread(key_object_note(t1c, PATIENT_SAFETY, tmp_path))
    spool.store(
        str(note.StudyInstanceUID), str(note.SeriesInstanceUID), str(note.SOPInstanceUID),
        (tmp_path / f"note-{PATIENT_SAFETY.value}.dcm").read_bytes(),
    )  # fmt: skip
    study_uid = str(t1c[0].StudyInstanceUID)
    assert any(s.modality == "MR" for s in store.series_of_study(study_uid))
    assert reconcile(spool, store, SECRET)["recovered"] == 1
    assert not any(s.modality == "MR" for s in store.series_of_study(study_uid))


def test_the_site_takes_a_prediction_back_by_hand(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jobs take-back` (consent withdrawn, a model version found faulty): the running node
    rejects what the PACS holds; a wrong job id or destination is refused by name."""
    from dicom_node.cli import main

    files, t1c = patient
    proc, pacs = storescp_destination(tmp_path / "pacs", "pacs", "PACS", reject_replaced=True)
    try:
        settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(pacs,))
        node = run_node(settings)
        assert storescu(node.scp.port, *files).returncode == 0
        job = wait_for(
            lambda: finished_job(node, str(t1c[0].StudyInstanceUID), 1), timeout=120,
            what="the prediction",
        )  # fmt: skip
        assert job.state == DONE, job.reason
        sent = all_sent(node, "pacs")
        # a reader rejects the prediction in an IOCM PACS that forwards the study and its notes
        # to the node: our own results are no input, nothing is run again
        ours = sorted((tmp_path / "pacs").iterdir())
        reader_note = key_object_note(
            [pydicom.dcmread(p, stop_before_pixels=True) for p in ours[:3]],
            Code("113001", "DCM", "Rejected for Quality Reasons"), tmp_path,
        )  # fmt: skip
        # (-R: only the contexts the files need; dcmtk's default list lacks Segmentation)
        assert storescu(node.scp.port, *ours, reader_note, extra=("-R",)).returncode == 0
        assert str(t1c[0].StudyInstanceUID) not in node.store.due_studies(time.time() + 3600, 0)
        assert node.store.rejection_reasons(str(t1c[0].StudyInstanceUID)) == [
            "Rejected for Quality Reasons"
        ]

        config = tmp_path / "site.yaml"
        config.write_text(
            f"storage: {{data_dir: {tmp_path / 'data'}}}\n"
            f"destinations: [{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs.port}, "
            "reject_replaced: true}]\n"
        )
        take_back = ["--config", str(config), "jobs", "take-back"]
        assert main([*take_back, "999", "--reason", "x"]) == 1
        assert "no job 999" in capsys.readouterr().err
        assert main([*take_back, str(job.id), "--reason", "x", "--destination", "tps"]) == 1
        assert "expected destination names of the configuration (pacs), found tps" in (
            capsys.readouterr().err
        )
        assert main([*take_back, str(job.id), "--reason", "consent withdrawn"]) == 0
        node.sender.wake()
        wait_for(
            lambda: node.outbox.counts()["pacs"] == {"rejected": sent, "sent": 1},
            timeout=60, what="the prediction rejected at the PACS",
        )  # fmt: skip
        at_pacs = [pydicom.dcmread(p) for p in (tmp_path / "pacs").iterdir()]
        (note,) = [ds for ds in at_pacs if ds.SeriesDescription == REJECTION_DESCRIPTION]
        assert len(rejected_uids(note)) == sent
        (why,) = [i.TextValue for i in note.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "113012"]  # fmt: skip
        assert why.startswith("Taken back by the site: consent withdrawn (glioforecast node")
        events = [e for e in node.store.events(job.id) if e.kind in ("taken-back", "replaced")]
        assert [e.kind for e in events] == ["taken-back", "replaced"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_note_may_reject_more_instances_than_sqlite_takes_parameters(tmp_path: Path) -> None:
    """A note listing more instances than one SQLite statement takes parameters (32766 by
    default, 250000 in Debian's build): recorded, and the study holding one is run again."""
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    _receive(spool, store, study["t1c"][:1], time.time())
    info = _info(study["t1c"][0])
    uids = [f"2.25.{n}" for n in range(250001)] + [info.sop_instance_uid]
    assert store.record_rejection("2.25.1", "Incorrect Modality Worklist Entry", uids, 1.0) == [
        info.study_instance_uid
    ]
    assert store.counts()["instances_rejected"] == 250002
    assert store.series_of_study(info.study_instance_uid) == []
