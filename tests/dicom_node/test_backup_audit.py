"""`backup`, `restore` and `jobs take-back` in the audit trail: each is audited, and a restore
keeps the audit trail written after the backup (it is the node's security record, not data to
roll back)."""

from __future__ import annotations

import dataclasses
import getpass
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.audit import QUEUE_FILE
from dicom_node.cli import EXIT_OK, main
from dicom_node.jobs import JobStore
from dicom_node.ports import free_port
from dicom_node.settings import load_settings
from dicom_node.spool import Spool
from tests.audit_repository import event_id
from tests.conftest import wait_for
from tests.dicom_node.test_audit import check_schema
from tests.dicom_node.test_backup import _running
from tests.dicom_node.test_scp import storescu
from tests.factories import small_study

MR = "1.2.840.10008.5.1.4.1.1.4"


def _lines(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines() if path.exists() else []


def _frames(data: Path) -> list[str]:
    """The audit messages waiting in the queue file for the repository, oldest first."""
    with sqlite3.connect(data / QUEUE_FILE) as db:
        frames = [bytes(r[0]) for r in db.execute("SELECT frame FROM queue ORDER BY id")]
    return [f.decode("utf-8").split("\ufeff", 1)[1] for f in frames]  # after the syslog header


@pytest.fixture(scope="module")
def site(tmp_path_factory, pki: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A node whose audit trail goes to a file in its data folder and to a repository that is
    down (its messages wait in the queue file): it received a study (a failed job whose notice
    waits for the PACS, down too); then `backup`, the audit file rotated (audit.log.1),
    `jobs take-back`, and `restore` of that backup, each as the CLI runs them."""
    root = tmp_path_factory.mktemp("site")
    data, backup = root / "data", root / "backup"
    data.mkdir(mode=0o750)
    config = root / "site.yaml"
    config.write_text(
        f"node: {{port: {free_port()}}}\n"
        f"health: {{port: {free_port()}}}\n"
        f"storage: {{data_dir: {data}}}\n"
        "destinations:\n"
        f"  - {{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {free_port()}, "
        "failure_notice: true}\n"
        "sending: {retry_initial_s: 3600, retry_max_s: 3600}\n"
        f"audit: {{enabled: true, file: {data / 'audit.log'}, host: 127.0.0.1, "
        f"port: {free_port()}, ca_certificates: {pki / 'ca.pem'}}}\n"
    )
    settings = load_settings(config)
    settings = dataclasses.replace(
        settings,
        node=dataclasses.replace(settings.node, port=0),
        health=dataclasses.replace(settings.health, port=0),
        assembly=dataclasses.replace(settings.assembly, quiet_period_s=0.3, poll_interval_s=0.05),
    )
    study = small_study(root / "in")
    with _running(settings) as node:
        assert storescu(node.scp.port, *study["t1c"]).returncode == 0
        wait_for(lambda: node.outbox.counts().get("pacs", {}).get("pending") == 2, timeout=60,
                 what="the failure notice to wait for the PACS")  # fmt: skip
        (job,) = node.store.list_jobs()
    cli = ["--config", str(config)]
    backed_up = _lines(data / "audit.log")
    assert main([*cli, "backup", str(backup)]) == EXIT_OK
    (data / "audit.log").rename(data / "audit.log.1")  # logrotate
    assert main([*cli, "jobs", "take-back", str(job.id), "--reason", "consent withdrawn"]) == 0
    before = {
        "audit.log.1": _lines(data / "audit.log.1"),
        "audit.log": _lines(data / "audit.log"),
        "queue": _frames(data),
    }
    assert main([*cli, "restore", str(backup)]) == EXIT_OK
    (aside,) = root.glob("data.before-restore-*")
    return {
        "data": data, "backup": backup, "aside": aside, "job": job, "before": before,
        "backed_up": backed_up, "source": pydicom.dcmread(study["t1c"][0]),
    }  # fmt: skip


def test_a_restore_keeps_the_audit_trail_written_after_the_backup(site) -> None:  # type: ignore[no-untyped-def]
    """Restore swapped in the backup's older audit file and queue: the messages written after
    the backup (here the backup's own Export and a take-back) survived only in the folder kept
    aside, which the documentation says to delete; those queued and not yet delivered were
    lost, and those delivered meanwhile would be sent twice."""
    data, before = site["data"], site["before"]
    assert len(before["audit.log.1"]) == len(site["backed_up"]) + 1  # + the Export
    assert len(before["audit.log"]) == 1  # the take-back
    assert _lines(data / "audit.log.1") == before["audit.log.1"]
    restored = _lines(data / "audit.log")
    assert restored[:-1] == before["audit.log"]  # then the restore's own message
    assert event_id(ET.fromstring(restored[-1])) == "110113"
    queue = _frames(data)
    assert queue[:-1] == before["queue"] and queue[-1] == restored[-1]
    # the backup's copies are not lost either: the backup is left as it was
    assert _lines(site["backup"] / "audit.log") == site["backed_up"]


def _message(site: dict[str, Any], code: str) -> ET.Element:
    lines = _lines(site["data"] / "audit.log.1") + _lines(site["data"] / "audit.log")
    (message,) = [m for m in map(ET.fromstring, lines) if event_id(m) == code]
    check_schema(message)
    return message


def _participants(message: ET.Element) -> list[dict[str, str]]:
    out = []
    for p in message.findall("ActiveParticipant"):
        role = p.find("RoleIDCode")
        out.append({**p.attrib, "role": role.get("csd-code", "") if role is not None else ""})
    return out


def _objects(message: ET.Element) -> list[dict[str, str]]:
    return [
        {
            **o.attrib,
            "type": o[0].get("originalText", ""),
            "name": o.findtext("ParticipantObjectName") or "",
        }
        for o in message.findall("ParticipantObjectIdentification")
    ]


def test_backup_restore_and_take_back_are_audited(site) -> None:  # type: ignore[no-untyped-def]
    """Configuration reloads and prunes were audited, but a backup (an export of every patient's
    data), a restore (the node's data replaced) and a take-back (a patient's results withdrawn)
    left no trace in the audit trail."""
    data, backup, user = site["data"], site["backup"], getpass.getuser()

    export = _message(site, "110106")
    event = export.find("EventIdentification")
    assert event is not None
    assert (event.get("EventActionCode"), event.get("EventOutcomeIndicator")) == ("R", "0")
    description = event.findtext("EventOutcomeDescription") or ""
    assert f"backup of the data folder {data} into {backup}: 4 spool instance(s) of 1 study" in (
        description
    )
    operator, source, media = _participants(export)
    assert (operator["UserID"], operator["UserIsRequestor"]) == (user, "true")
    assert (source["UserID"], source["role"]) == ("GLIOFORECAST", "110153")
    assert (media["UserID"], media["role"]) == (backup.as_uri(), "110154")  # Destination Media
    assert media["UserIsRequestor"] == "false"
    media_type = export.find("ActiveParticipant/MediaIdentifier/MediaType")
    assert media_type is not None and media_type.get("csd-code") == "110037"  # URI
    # the study the backup holds (received instances and the notice waiting for the PACS), and
    # its patient (PS3.15 A.5.3.6)
    study, patient = _objects(export)
    assert (study["ParticipantObjectID"], study["type"]) == (
        site["source"].StudyInstanceUID, "Study Instance UID"
    )  # fmt: skip
    held = {s.get("UID"): s.get("NumberOfInstances") for s in export.iter("SOPClass")}
    assert held.pop(MR) == "4" and sum(map(int, held.values())) == 2, held  # + the notice
    assert (patient["ParticipantObjectID"], patient["name"]) == (
        site["source"].PatientID, str(site["source"].PatientName)
    )  # fmt: skip

    taken = _message(site, "110103")
    event = taken.find("EventIdentification")
    assert event is not None and event.get("EventActionCode") == "D"
    description = event.findtext("EventOutcomeDescription") or ""
    assert f"job {site['job'].id}'s results taken back at pacs by the site: consent withdrawn" in (
        description
    )
    assert [p["UserID"] for p in _participants(taken)] == [user, "GLIOFORECAST"]
    study, patient = _objects(taken)
    assert study["ParticipantObjectID"] == site["source"].StudyInstanceUID
    assert patient["ParticipantObjectID"] == site["source"].PatientID
    assert patient["name"] == str(site["source"].PatientName)

    alert = _message(site, "110113")
    event = alert.find("EventIdentification")
    assert event is not None and event.get("EventActionCode") == "E"
    kind = event.find("EventTypeCode")
    assert kind is not None and kind.get("csd-code") == "110131"  # Software Configuration
    description = event.findtext("EventOutcomeDescription") or ""
    made = (backup / "glioforecast-backup.json").read_text().split('"started": "')[1][:25]
    assert f"restore of the backup {backup} (made {made} by glioforecast " in description
    assert f"the folder that was there is kept at {site['aside']}" in description
    assert _participants(alert)[0]["UserID"] == user
    assert [o["ParticipantObjectID"] for o in _objects(alert)] == [data.as_uri(), backup.as_uri()]


def test_a_backup_names_each_study_and_patient_it_holds(tmp_path: Path) -> None:
    """The Export of a backup named only the data folder: a privacy officer could not tell
    which patients' images left on it (PS3.15 A.5.3.6 lists the studies and patients). Each
    study gets its message, with its patient; a file that cannot be read is counted."""
    data = tmp_path / "data"
    data.mkdir()
    spool = Spool(data / "spool")
    JobStore(data / "jobs.sqlite3").close()
    config = tmp_path / "site.yaml"
    log = tmp_path / "audit.log"
    config.write_text(
        f"storage: {{data_dir: {data}}}\naudit: {{enabled: true, file: {log}}}\n", "utf-8"
    )
    assert main(["--config", str(config), "backup", str(tmp_path / "empty")]) == EXIT_OK
    (empty,) = [ET.fromstring(line) for line in _lines(log)]
    check_schema(empty)
    assert [(o["ParticipantObjectID"], o["type"]) for o in _objects(empty)] == [
        (data.resolve().as_uri(), "URI")  # no study: the data folder, as a Data Repository
    ]
    log.unlink()
    patients = {}
    for n, (patient_id, name) in enumerate([("GF-A", "Alpha^Ann"), ("GF-B", "Beta^Bob")]):
        for path in small_study(tmp_path / f"in{n}")["t1c"][:2]:
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName = patient_id, name
            ds.save_as(path)
            spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                        path.read_bytes())  # fmt: skip
        patients[str(ds.StudyInstanceUID)] = (patient_id, name)
    spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"not DICOM")
    assert main(["--config", str(config), "backup", str(tmp_path / "full")]) == EXIT_OK
    exports = [ET.fromstring(line) for line in _lines(log)]
    found = {}
    for export in exports:
        check_schema(export)
        assert event_id(export) == "110106"
        description = export.findtext("EventIdentification/EventOutcomeDescription") or ""
        assert "5 spool instance(s) of 3 study(ies)" in description
        assert "1 instance(s) of it whose study and patient could not be read" in description
        study, patient = _objects(export)
        assert [s.get("NumberOfInstances") for s in export.iter("SOPClass")] == ["2"]
        found[study["ParticipantObjectID"]] = (patient["ParticipantObjectID"], patient["name"])
    assert found == patients
