"""Newer results of a study replace the earlier ones: withdrawn before delivery, rejected (IHE
IOCM rejection note) after, at real storage SCPs (dcmtk storescp)."""

from __future__ import annotations

import copy
import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_node.outbox import _OUTBOX_TABLE, Outbox, deliver_due
from dicom_node.ports import free_port
from dicom_node.scu import VERIFICATION, Destination
from dicom_node.sender import check_destination
from sr_writer.labels import is_labelled_description, name_uid
from sr_writer.rejection import REJECTED_FOR_QUALITY_REASONS, rejected_uids
from tests.dicom_node.conftest import storescp_destination
from tests.dicom_node.test_scu import ALL_CLASSES, StoreSCP
from tests.sr_writer.synthetic_job import default_outputs


def _version(objects: list[Dataset], version: int) -> list[Dataset]:
    """The same objects as a newer job makes them: new series and instance UIDs."""
    out = []
    for ds in objects:
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID = name_uid("test-version", version, ds.SeriesInstanceUID)
        ds.SOPInstanceUID = name_uid("test-version", version, ds.SOPInstanceUID)
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def results() -> list[Dataset]:
    out = default_outputs()
    return [*out.sc[:3], out.seg, out.rtstruct, out.sr]


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Destination, Path, Destination, Path]]:
    """A PACS that takes rejection notes and an archive that does not (both dcmtk storescp)."""
    pacs_proc, pacs = storescp_destination(tmp_path / "pacs", "pacs", "PACS", reject_replaced=True)
    archive_proc, archive = storescp_destination(tmp_path / "archive", "archive", "ARCHIVE")
    yield (
        Destination.from_settings(pacs),
        tmp_path / "pacs",
        Destination.from_settings(archive),
        tmp_path / "archive",
    )
    for proc in (pacs_proc, archive_proc):
        proc.terminate()
        proc.wait(timeout=30)


def _received(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def _uids(datasets: list[Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in datasets}


def test_newer_results_withdraw_the_undelivered_and_reject_the_delivered(
    tmp_path: Path, peers: tuple[Destination, Path, Destination, Path], results: list[Dataset]
) -> None:
    pacs, at_pacs, archive, at_archive = peers
    down = Destination("tps", "TPS", "127.0.0.1", free_port())  # nobody listens there
    first, second, third = results, _version(results, 2), _version(results, 3)
    everywhere = ["pacs", "archive", "tps"]
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        ob.enqueue(first, everywhere, job="1", replaces=["1"])
        report = deliver_due(ob, [pacs, archive, down])
        assert report.sent == 2 * len(first) and report.failed == len(first)
        assert ob.counts() == {
            "pacs": {"sent": len(first)},
            "archive": {"sent": len(first)},
            "tps": {"pending": len(first)},
        }

        # a late instance: job 2's results replace job 1's
        ob.enqueue(second, everywhere, job="2", replaces=["1", "2"])
        report = deliver_due(ob, [pacs, archive, down])
        by_destination = {r.destination: r for r in report.replaced}
        assert by_destination["pacs"].rejected == len(first) and by_destination["pacs"].note
        assert by_destination["archive"].rejected == 0 and not by_destination["archive"].note
        assert by_destination["tps"].withdrawn == len(first)
        assert ob.counts() == {
            "pacs": {"rejected": len(first), "sent": len(second) + 1},
            "archive": {"sent": len(first) + len(second)},
            "tps": {"withdrawn": len(first), "pending": len(second)},
        }
        # the PACS got the new results, then one note that lists exactly the earlier ones
        at_the_pacs = _received(at_pacs)
        notes = [ds for ds in at_the_pacs if ds.SOPClassUID == KeyObjectSelectionDocumentStorage]
        assert len(notes) == 1
        note = notes[0]
        assert rejected_uids(note) == _uids(first)
        assert _uids(at_the_pacs) == _uids(first) | _uids(second) | {note.SOPInstanceUID}
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == (
            REJECTED_FOR_QUALITY_REASONS.value,
            REJECTED_FOR_QUALITY_REASONS.scheme_designator,
        )
        assert note.StudyInstanceUID == first[0].StudyInstanceUID
        assert (note.PatientID, note.PatientName) == (first[0].PatientID, first[0].PatientName)
        assert is_labelled_description(note.SeriesDescription)
        assert "job 2" in str(note.ContentSequence[-len(first) - 1].TextValue)
        # the archive has both versions and no note; the earlier objects' files are gone
        assert _uids(_received(at_archive)) == _uids(first) | _uids(second)
        assert not any((ob.objects_dir / f"{uid}.dcm").exists() for uid in _uids(first))
        withdrawn = ob.items(state="withdrawn")
        assert {i.last_error for i in withdrawn} == {"replaced by the results of job 2"}
        assert ob.apply_replacements("pacs") == []  # applied once, then forgotten

        # job 2 run again (a retry) queues the same: nothing more is withdrawn or rejected
        ob.enqueue(second, everywhere, job="2", replaces=["1", "2"])
        report = deliver_due(ob, [pacs, archive, down])
        assert not any(r.withdrawn or r.rejected or r.note for r in report.replaced)
        assert len(list(at_pacs.iterdir())) == len(at_the_pacs)

        # a third version rejects the second, not the first again nor the note
        ob.enqueue(third, ["pacs"], job="3", replaces=["1", "2", "3"])
        deliver_due(ob, [pacs])
        notes = [
            ds for ds in _received(at_pacs) if ds.SOPClassUID == KeyObjectSelectionDocumentStorage
        ]
        assert len(notes) == 2
        (newest,) = [ds for ds in notes if ds.SOPInstanceUID != note.SOPInstanceUID]
        assert rejected_uids(newest) == _uids(second)
        assert ob.counts()["pacs"] == {
            "rejected": len(first) + len(second),
            "sent": len(third) + 2,
        }


def test_replacement_only_touches_its_destinations_and_jobs(
    tmp_path: Path, peers: tuple[Destination, Path, Destination, Path], results: list[Dataset]
) -> None:
    pacs, _, archive, _ = peers
    other_study = _version(results, 7)
    for ds in other_study:
        ds.StudyInstanceUID = name_uid("test-other-study", ds.StudyInstanceUID)
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        ob.enqueue(results, ["pacs", "archive"], job="1", replaces=["1"])
        ob.enqueue(other_study, ["pacs"], job="5", replaces=["5"])
        deliver_due(ob, [pacs, archive])
        # job 2 (the study of job 1) sends the PACS only its SEG: the archive keeps job 1's
        # results, the PACS's other study is untouched
        seg = [ds for ds in _version(results, 2) if ds.Modality == "SEG"]
        ob.enqueue(seg, ["pacs"], job="2", replaces=["1", "2"])
        deliver_due(ob, [pacs, archive])
        assert ob.counts(job="1") == {
            "pacs": {"rejected": len(results)},
            "archive": {"sent": len(results)},
        }
        assert ob.counts(job="5") == {"pacs": {"sent": len(other_study)}}
        assert ob.undelivered("1") == 0  # retention may remove the study's files


# the outbox table as the version before replacements made it: the same, with five states
OUTBOX_BEFORE_REPLACEMENT = _OUTBOX_TABLE.replace(
    "'dead', 'withdrawn',\n                         'rejected')", "'dead')"
)


def test_an_outbox_of_the_previous_version_is_upgraded_and_can_be_replaced(
    tmp_path: Path, results: list[Dataset]
) -> None:
    assert "'rejected'" not in OUTBOX_BEFORE_REPLACEMENT
    db = tmp_path / "outbox.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(OUTBOX_BEFORE_REPLACEMENT)
    old.executemany(
        "INSERT INTO outbox (sop_instance_uid, sop_class_uid, series_instance_uid, destination, "
        "job, path, state, next_attempt_at, created_at, updated_at) "
        "VALUES (?, ?, ?, 'tps', '1', 'gone.dcm', 'pending', 0, 0, 0)",
        [(str(d.SOPInstanceUID), str(d.SOPClassUID), str(d.SeriesInstanceUID)) for d in results],
    )
    old.commit()
    old.close()
    with Outbox(db) as ob:
        assert ob.counts() == {"tps": {"pending": len(results)}}
        ob.enqueue(_version(results, 2), ["tps"], job="2", replaces=["1", "2"])
        (replaced,) = ob.apply_replacements("tps")
        assert replaced.withdrawn == len(results)
        assert ob.counts() == {"tps": {"withdrawn": len(results), "pending": len(results)}}


def test_check_destinations_says_whether_a_peer_takes_rejection_notes() -> None:
    """A PACS that takes Key Object Selection Documents passes; a planning system that takes
    only contours fails, and says why."""
    pacs = StoreSCP(
        sop_classes=(VERIFICATION, *ALL_CLASSES, KeyObjectSelectionDocumentStorage)
    ).start()
    tps = StoreSCP(sop_classes=(VERIFICATION, *ALL_CLASSES)).start()
    try:
        ok, found = check_destination(
            dataclasses.replace(pacs.destination(), reject_replaced=True), "GLIOFORECAST"
        )
        assert ok, found
        assert "Key Object Selection Document Storage accepted (rejection notes)" in found
        ok, found = check_destination(
            dataclasses.replace(tps.destination("tps"), reject_replaced=True), "GLIOFORECAST"
        )
        assert not ok
        assert "Key Object Selection Document Storage not accepted (reject_replaced" in found
        ok, found = check_destination(tps.destination("tps"), "GLIOFORECAST")
        assert ok and "Key Object" not in found  # not asked for: not checked
    finally:
        pacs.stop()
        tps.stop()
