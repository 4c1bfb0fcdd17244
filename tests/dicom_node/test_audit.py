"""The audit trail against a real audit record repository (rsyslogd over TLS and UDP)."""

from __future__ import annotations

import dataclasses
import datetime
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.audit import (
    ROLE_DESTINATION,
    ROLE_SOURCE,
    AuditTrail,
    Participant,
    StudyRecord,
    TransferTally,
)
from dicom_node.errors import ConfigError
from dicom_node.jobs import FAILED
from dicom_node.retention import prune
from dicom_node.settings import AuditSettings, RetentionSettings, load_settings
from tests import factories
from tests.audit_repository import AuditRepository, event_id
from tests.conftest import wait_for
from tests.dicom_node.conftest import make_settings, storescp_destination
from tests.dicom_node.test_scp import echoscu, storescu

MR = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

# --------------------------------------------------------------------------------------------
# the DICOM audit message schema (PS3.15 A.5.1), as the tests check it

_CODED = {"csd-code", "codeSystemName", "originalText"}
_ACTIONS = {"C", "R", "U", "D", "E"}
_OUTCOMES = {"0", "4", "8", "12"}


def check_schema(message: ET.Element) -> None:
    """Fail unless ``message`` follows the audit message schema: the element order, the
    mandatory attributes and the enumerated values."""
    assert message.tag == "AuditMessage"
    tags = [child.tag for child in message]
    assert tags[0] == "EventIdentification", tags
    n = 1
    while n < len(tags) and tags[n] == "ActiveParticipant":
        n += 1
    assert n > 1, "at least one ActiveParticipant"
    assert tags[n] == "AuditSourceIdentification", tags
    assert all(t == "ParticipantObjectIdentification" for t in tags[n + 1 :]), tags

    event = message[0]
    assert event.get("EventActionCode") in _ACTIONS
    assert event.get("EventOutcomeIndicator") in _OUTCOMES
    when = datetime.datetime.fromisoformat(event.get("EventDateTime", ""))
    assert when.utcoffset() == datetime.timedelta(0), "EventDateTime in UTC"
    assert event[0].tag == "EventID"
    for child in event:
        assert child.tag in ("EventID", "EventTypeCode", "EventOutcomeDescription"), child.tag
        if child.tag != "EventOutcomeDescription":
            assert set(child.attrib) == _CODED, child.attrib
    for participant in message.findall("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in ("true", "false")
        if participant.get("NetworkAccessPointID"):
            assert participant.get("NetworkAccessPointTypeCode") in ("1", "2")
        children = [c.tag for c in participant]
        assert children == sorted(children, key=("RoleIDCode", "MediaIdentifier").index)
        assert children.count("MediaIdentifier") <= 1, children
        for role in participant.findall("RoleIDCode"):
            assert set(role.attrib) == _CODED
        for media in participant.findall("MediaIdentifier"):
            assert [c.tag for c in media] == ["MediaType"] and set(media[0].attrib) == _CODED
    source = message.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    for obj in message.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID") is not None
        assert obj.get("ParticipantObjectTypeCode") in (None, "1", "2", "3", "4")
        children = [c.tag for c in obj]
        assert children[0] == "ParticipantObjectIDTypeCode", children
        assert set(obj[0].attrib) == _CODED


def _participants(message: ET.Element) -> dict[str, ET.Element]:
    """ActiveParticipants by the meaning of their role (``requestor`` when it has none)."""
    out = {}
    for p in message.findall("ActiveParticipant"):
        role = p.find("RoleIDCode")
        out[role.get("originalText", "") if role is not None else "none"] = p
    return out


def _objects(message: ET.Element) -> dict[str, ET.Element]:
    return {
        obj[0].get("originalText", ""): obj
        for obj in message.findall("ParticipantObjectIdentification")
    }


def _sop_classes(study: ET.Element) -> dict[str, int]:
    return {s.get("UID", ""): int(s.get("NumberOfInstances", "0")) for s in study.iter("SOPClass")}


# --------------------------------------------------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path, pki: Path) -> Iterator[AuditRepository]:
    arr = AuditRepository(tmp_path / "arr", pki).start()
    yield arr
    arr.stop()


def _tls(arr: AuditRepository, pki: Path, **more: object) -> AuditSettings:
    return AuditSettings(
        enabled=True, host="127.0.0.1", port=arr.tls_port, transport="tls",
        ca_certificates=pki / "ca.pem", **more,  # type: ignore[arg-type]
    )  # fmt: skip


def _received(arr: AuditRepository, code: str, count: int = 1) -> list[ET.Element]:
    return wait_for(
        lambda: (
            (found := [m for m in arr.messages() if event_id(m) == code])
            and len(found) >= count
            and found
        ),
        what=f"{count} audit message(s) {code} at the repository",
    )


def test_the_node_reports_what_it_received_refused_and_sent(  # type: ignore[no-untyped-def]
    run_node, repository: AuditRepository, pki: Path, tmp_path: Path
) -> None:
    proc, pacs = storescp_destination(tmp_path / "pacs", "pacs", "PACS", failure_notice=True)
    try:
        settings = dataclasses.replace(
            make_settings(tmp_path / "data", audit={**vars(_tls(repository, pki))}),
            destinations=(pacs,),
        )
        node = run_node(settings)
        (start,) = _received(repository, "110100")
        check_schema(start)
        assert start.find("EventIdentification/EventTypeCode").get("originalText") == (  # type: ignore[union-attr]
            "Application Start"
        )
        study = factories.small_study(tmp_path / "study")
        images = [*study["t1c"], *study["flair"]]
        truncated = tmp_path / "truncated.dcm"  # refused 0xC210: its pixel data is cut short
        bad = pydicom.dcmread(study["t1c"][0])
        bad.SOPInstanceUID = pydicom.uid.generate_uid()
        bad.PixelData = bad.PixelData[:100]
        bad.save_as(truncated)
        assert storescu(node.scp.port, *images, truncated, extra=("--no-halt",)).returncode == 0
        source = pydicom.dcmread(images[0])
        refused = echoscu(node.scp.port, aec="SOMEONE_ELSE")
        assert refused.returncode != 0

        # the study received: SCANNER1 -> the node, the patient and its instances
        received, refused_instance = _received(repository, "110104", count=2)
        check_schema(received)
        assert received[0].get("EventActionCode") == "C"
        assert received[0].get("EventOutcomeIndicator") == "0"
        who = _participants(received)
        assert who["Source Role ID"].get("UserID") == "SCANNER1"
        assert who["Source Role ID"].get("UserIsRequestor") == "true"
        assert who["Source Role ID"].get("NetworkAccessPointID") == "127.0.0.1"
        assert who["Destination Role ID"].get("UserID") == "GLIOFORECAST"
        objects = _objects(received)
        assert objects["Study Instance UID"].get("ParticipantObjectID") == source.StudyInstanceUID
        assert _sop_classes(objects["Study Instance UID"]) == {MR: len(images)}
        patient = objects["Patient Number"]
        assert patient.get("ParticipantObjectID") == source.PatientID
        assert patient.findtext("ParticipantObjectName") == str(source.PatientName)

        # the instance refused: a message of its own, with the reason
        check_schema(refused_instance)
        assert refused_instance[0].get("EventOutcomeIndicator") == "4"
        reason = refused_instance.findtext("EventIdentification/EventOutcomeDescription") or ""
        assert reason.startswith("refused (0xC210)")
        refused_study = _objects(refused_instance)["Study Instance UID"]
        assert refused_study.get("ParticipantObjectID") == source.StudyInstanceUID
        assert _sop_classes(refused_study) == {MR: 1}

        # the association called with another AE title: a security alert
        (alert,) = _received(repository, "110113")
        check_schema(alert)
        assert alert[0].get("EventOutcomeIndicator") == "4"
        said = alert.findtext("EventIdentification/EventOutcomeDescription") or ""
        assert "'SOMEONE_ELSE'" in said
        assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"  # type: ignore[union-attr]

        # the job fails (no structure set): its failure notice goes to the PACS, audited
        job = wait_for(lambda: next((j for j in node.store.list_jobs() if j.state == FAILED), None))
        assert "rtstruct" in job.reason
        sent = _received(repository, "110104", count=3)[2]
        check_schema(sent)
        who = _participants(sent)
        assert who["Source Role ID"].get("UserID") == "GLIOFORECAST"
        assert who["Destination Role ID"].get("UserID") == "PACS"
        assert who["Destination Role ID"].get("UserIsRequestor") == "false"
        objects = _objects(sent)
        assert _sop_classes(objects["Study Instance UID"]) == {
            SECONDARY_CAPTURE: 1, COMPREHENSIVE_SR: 1,
        }  # fmt: skip
        assert objects["Patient Number"].get("ParticipantObjectID") == source.PatientID
        assert node.audit.sent >= 4 and node.audit.dropped == 0
        assert "glioforecast_audit_messages_dropped_total 0" in node.metrics()

        node.stop()
        stop = _received(repository, "110100", count=2)[1]
        assert stop.find("EventIdentification/EventTypeCode").get("originalText") == (  # type: ignore[union-attr]
            "Application Stop"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _scanner_sent(trail: AuditTrail, record: StudyRecord) -> None:
    """Audit SCANNER1 sending ``record``'s study to the node."""
    tally = TransferTally()
    tally.done[record.study_instance_uid] = record
    trail.transferred(
        Participant("SCANNER1", "10.0.0.5", True, ROLE_SOURCE),
        Participant("GLIOFORECAST", "node", False, ROLE_DESTINATION),
        tally,
    )


def test_udp_and_a_file_and_a_repository_that_comes_late(tmp_path: Path, pki: Path) -> None:
    arr = AuditRepository(tmp_path / "arr", pki)  # not started yet
    log_file = tmp_path / "audit.log"
    trail = AuditTrail(
        AuditSettings(enabled=True, host="127.0.0.1", port=arr.tls_port, transport="tls",
                      ca_certificates=pki / "ca.pem", file=log_file),
        "GLIOFORECAST", tmp_path / "queue.sqlite3",
    )  # fmt: skip
    trail.start()
    try:
        _scanner_sent(trail, StudyRecord("1.2.3", "PAT-1", "Doe^Jane", "ACC-9", {MR: 3}))
        # the file has both at once, private to the node's user
        lines = log_file.read_text("utf-8").splitlines()
        assert [event_id(ET.fromstring(line)) for line in lines] == ["110100", "110104"]
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert trail.queued == 2 and trail.sent == 0  # the repository is down: they wait
        arr.start()
        wait_for(lambda: trail.sent == 2, timeout=60, what="the queue to drain")
        got = wait_for(lambda: len(m := arr.messages()) == 2 and m, what="both at the ARR")
        assert [event_id(m) for m in got] == ["110100", "110104"]
        assert _objects(got[1])["Patient Number"].get("ParticipantObjectID") == "PAT-1"
    finally:
        trail.close()
        arr.stop()

    udp = AuditRepository(tmp_path / "arr-udp", pki).start()
    try:
        trail = AuditTrail(
            AuditSettings(enabled=True, host="127.0.0.1", port=udp.udp_port, transport="udp"),
            "GLIOFORECAST",
            tmp_path / "udp-queue.sqlite3",
        )
        trail.start()
        trail.refused("INTRUDER", "10.9.9.9", "calling AE title 'INTRUDER' not allowed")
        trail.close()
        (alert,) = _received(udp, "110113")
        check_schema(alert)
        assert _participants(alert)["none"].get("UserID") == "INTRUDER"
        got = wait_for(lambda: len(m := udp.messages()) == 3 and m, what="three messages")
        assert [event_id(m) for m in got] == ["110100", "110113", "110100"]
    finally:
        udp.stop()


def test_an_audit_file_that_cannot_be_written_spares_the_repository(
    tmp_path: Path, pki: Path
) -> None:
    """The file was written first, in the same try as the repository's queue: a file that
    could not be written (a full or read-only disk) lost the message for the repository too,
    silently. Now the repository gets it, the loss is counted, and the trail says it is not
    well until the file takes messages again. A sender's control characters (in a name or
    an ID) leave every message well-formed XML."""
    udp = AuditRepository(tmp_path / "arr-udp", pki).start()
    log_file = tmp_path / "audit.log"
    log_file.mkdir()  # what cannot be written
    trail = AuditTrail(
        AuditSettings(enabled=True, host="127.0.0.1", port=udp.udp_port, transport="udp",
                      file=log_file),
        "GLIOFORECAST", tmp_path / "queue.sqlite3",
    )  # fmt: skip
    trail.start()
    try:
        trail.refused("INTRUDER", "10.9.9.9", "calling AE title 'INTRUDER' not allowed")
        assert len(_received(udp, "110113")) == 1  # the repository has it all the same
        assert trail.dropped == 2 and not trail.reachable  # Application Start, the alert
        log_file.rmdir()
        _scanner_sent(
            trail, StudyRecord("1.2.3", "CTRL\x0cID\u2028X", "Ctrl\x01Evil^Name\x1b", "", {MR: 1})
        )
        assert trail.reachable and trail.dropped == 2
        (line,) = log_file.read_text("utf-8").splitlines()
        message = ET.fromstring(line)
        check_schema(message)
        patient = _objects(message)["Patient Number"]
        assert patient.get("ParticipantObjectID") == "CTRL\ufffdID\u2028X"
        (received,) = _received(udp, "110104")
        assert _objects(received)["Patient Number"].get("ParticipantObjectID") == (
            "CTRL\ufffdID\u2028X"
        )
    finally:
        trail.close()
        udp.stop()


def test_a_node_that_cannot_reach_its_repository_says_so(run_node, tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    arr = AuditRepository(tmp_path / "arr", pki)  # not started: nothing listens there
    node = run_node(audit={**vars(_tls(arr, pki))})
    wait_for(lambda: not node.audit.reachable, what="the first failed attempt")
    summary = node.summary()
    assert summary["status"] == "degraded" and summary["components"]["audit"] is False  # type: ignore[index]
    assert "glioforecast_audit_messages_queued 1" in node.metrics()  # the Application Start
    arr.start()
    try:
        wait_for(lambda: node.audit.reachable, timeout=60, what="the repository, once it is up")
        assert node.summary()["status"] == "ok"
        assert [event_id(m) for m in _received(arr, "110100")] == ["110100"]
    finally:
        node.stop()
        arr.stop()


def test_a_repository_that_stays_down_keeps_all_but_the_oldest(tmp_path: Path, pki: Path) -> None:
    arr = AuditRepository(tmp_path / "arr", pki)  # not started yet
    queue = tmp_path / "queue.sqlite3"
    trail = AuditTrail(_tls(arr, pki), "GLIOFORECAST", queue)
    trail.max_queued = 3
    trail.start()  # Application Start
    for n in range(4):
        trail.refused(f"CALLER{n}", "10.0.0.1", "refused")
    assert trail.queued == 3 and trail.dropped == 2  # beyond the bound, the oldest go
    trail.close()  # the stop message pushes out one more; the 3 left stay in the queue file
    assert trail.sent == 0 and trail.dropped == 3
    # the next start (after a restart, a crash) delivers them, oldest first
    arr.start()
    try:
        again = AuditTrail(_tls(arr, pki), "GLIOFORECAST", queue)
        assert again.queued == 3
        again.start(activity=False)
        wait_for(lambda: again.sent == 3, timeout=60, what="the kept messages")
        again.close()
        got = wait_for(lambda: len(m := arr.messages()) == 3 and m, what="three messages")
        assert [event_id(m) for m in got] == ["110113", "110113", "110100"]
        callers = [_participants(m).get("none") for m in got[:2]]
        assert [c.get("UserID") for c in callers if c is not None] == ["CALLER2", "CALLER3"]
    finally:
        arr.stop()


def test_a_repository_asking_for_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    arr = AuditRepository(tmp_path / "arr", pki, client_certificates=True).start()
    try:
        with_certificate = AuditTrail(
            _tls(arr, pki, certificate=pki / "client.pem", private_key=pki / "client.key"),
            "GLIOFORECAST",
            tmp_path / "queue.sqlite3",
        )
        with_certificate.start()
        with_certificate.close()
        assert with_certificate.sent == 2  # start and stop
        without = AuditTrail(_tls(arr, pki), "NOCERT", tmp_path / "nocert-queue.sqlite3")
        without.start()
        without.close()  # refused by the repository: nothing delivered, both kept
        assert without.sent == 0 and without.queued == 2
        got = wait_for(lambda: len(m := arr.messages()) == 2 and m, what="two messages")
        assert [p.get("UserID") for m in got for p in m.iter("ActiveParticipant")] == [
            "GLIOFORECAST", "GLIOFORECAST",
        ]  # fmt: skip
    finally:
        arr.stop()


def test_check_destinations_checks_the_audit_repository_too(  # type: ignore[no-untyped-def]
    tmp_path: Path, pki: Path, capsys
) -> None:
    from dicom_node.cli import main

    arr = AuditRepository(tmp_path / "arr", pki, client_certificates=True).start()
    try:

        def check(extra: str) -> tuple[int, str]:
            config = tmp_path / "site.yaml"
            config.write_text(
                f"storage: {{data_dir: {tmp_path / 'data'}}}\n"
                f"audit: {{enabled: true, host: 127.0.0.1, port: {arr.tls_port}, "
                f"ca_certificates: {pki / 'ca.pem'}{extra}}}\n"
            )
            code = main(["--config", str(config), "check-destinations"])
            return code, capsys.readouterr().out

        code, out = check(f", certificate: {pki / 'client.pem'}, private_key: {pki / 'client.key'}")
        assert code == 0, out
        assert f"ok   audit record repository 127.0.0.1:{arr.tls_port} (tls): TLS handshake" in out
        code, out = check("")  # the repository asks for the node's certificate
        assert code == 1
        assert "FAIL audit record repository" in out
        assert "(set certificate and private_key in audit)" in out
        code, out = check(f", server_name: elsewhere.example, certificate: {pki / 'client.pem'},"
                          f" private_key: {pki / 'client.key'}")  # fmt: skip
        assert code == 1 and "not trusted for 'elsewhere.example'" in out
        assert arr.messages() == []  # nothing was sent
    finally:
        arr.stop()


def test_retention_reports_each_study_it_deletes(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = run_node()
    study = factories.small_study(tmp_path / "study")
    assert storescu(node.scp.port, *study["t1c"]).returncode == 0
    source = pydicom.dcmread(study["t1c"][0])
    wait_for(lambda: any(j.state == FAILED for j in node.store.list_jobs()), what="the job")
    log_file = tmp_path / "audit.log"
    trail = AuditTrail(AuditSettings(enabled=True, file=log_file), "GLIOFORECAST")
    trail.start(activity=False)
    removed = prune(
        node.store, node.spool.root, node.outbox, RetentionSettings(failed_days=1),
        now=source_time_plus_days(2), audit=trail,
    )  # fmt: skip
    trail.close()
    assert len(removed) == 1
    (line,) = log_file.read_text("utf-8").splitlines()
    deleted = ET.fromstring(line)
    check_schema(deleted)
    assert event_id(deleted) == "110105" and deleted[0].get("EventActionCode") == "D"
    assert "retention" in (deleted.findtext("EventIdentification/EventOutcomeDescription") or "")
    objects = _objects(deleted)
    assert objects["Study Instance UID"].get("ParticipantObjectID") == source.StudyInstanceUID
    assert _sop_classes(objects["Study Instance UID"]) == {MR: len(study["t1c"])}
    assert objects["Patient Number"].get("ParticipantObjectID") == source.PatientID


def test_a_rejection_note_received_is_reported(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Who made the node stop using which instances (IHE IOCM): DICOM Instances Accessed."""
    from tests.dicom_node.test_incoming_rejection import PATIENT_SAFETY, key_object_note

    log_file = tmp_path / "audit.log"
    node = run_node(audit={"enabled": True, "file": log_file})
    study = factories.small_study(tmp_path / "study")
    t1c = [pydicom.dcmread(p) for p in study["t1c"]]
    note = key_object_note(t1c, PATIENT_SAFETY, tmp_path)
    assert storescu(node.scp.port, note, aet="MODALITY7").returncode == 0

    def accessed() -> list[ET.Element]:
        if not log_file.exists():
            return []
        messages = [ET.fromstring(line) for line in log_file.read_text("utf-8").splitlines()]
        return [m for m in messages if event_id(m) == "110103"]

    (message,) = wait_for(accessed, what="the DICOM Instances Accessed message")
    check_schema(message)
    assert message[0].get("EventActionCode") == "U"
    assert message[0].get("EventOutcomeIndicator") == "0"
    description = message.findtext("EventIdentification/EventOutcomeDescription") or ""
    assert "Rejected for Patient Safety Reasons" in description
    assert f"{len(t1c)} instance(s) no longer used" in description
    requestor = _participants(message)["none"]
    assert requestor.get("UserID") == "MODALITY7" and requestor.get("UserIsRequestor") == "true"
    assert requestor.get("NetworkAccessPointID") == "127.0.0.1"
    objects = _objects(message)
    assert objects["Study Instance UID"].get("ParticipantObjectID") == t1c[0].StudyInstanceUID
    assert _sop_classes(objects["Study Instance UID"]) == {MR: len(t1c)}
    assert objects["Patient Number"].get("ParticipantObjectID") == t1c[0].PatientID


def test_spool_prune_beside_the_node_queues_its_messages_for_it(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, pki: Path, capsys
) -> None:
    import sqlite3

    from dicom_node.audit import QUEUE_FILE
    from dicom_node.cli import main

    node = run_node()
    study = factories.small_study(tmp_path / "study")
    assert storescu(node.scp.port, *study["t1c"]).returncode == 0
    wait_for(lambda: any(j.state == FAILED for j in node.store.list_jobs()), what="the job")
    data_dir = node.settings.storage.data_dir
    config = tmp_path / "site.yaml"
    config.write_text(
        f"storage: {{data_dir: {data_dir}}}\n"
        "retention: {failed_days: 0.0000001}\n"  # 9 ms: the failed study is due
        f"audit: {{enabled: true, host: 127.0.0.1, port: 9, ca_certificates: {pki / 'ca.pem'}}}\n"
    )
    assert main(["--config", str(config), "spool", "prune"]) == 0
    assert "1 studies, 4 files" in capsys.readouterr().out
    with sqlite3.connect(data_dir / QUEUE_FILE) as db:
        (frame,) = [bytes(row[0]) for row in db.execute("SELECT frame FROM queue")]
    xml = frame.decode("utf-8").split("\ufeff", 1)[1]  # after the syslog header
    deleted = ET.fromstring(xml)
    check_schema(deleted)
    assert event_id(deleted) == "110105"
    patient = _objects(deleted)["Patient Number"]
    assert patient.get("ParticipantObjectID") == pydicom.dcmread(study["t1c"][0]).PatientID


def source_time_plus_days(days: float) -> float:
    return datetime.datetime.now().timestamp() + days * 86400


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("audit: {enabled: true}", "audit: expected a repository (audit.host) or a file"),
        ("audit: {enabled: true, host: arr, certificate: /etc/hosts}",
         "audit: expected both certificate and private_key"),
        ("audit: {enabled: true, host: arr, ca_certificates: /nonexistent.pem}",
         "audit.ca_certificates: expected an existing file, found /nonexistent.pem"),
        ("audit: {enabled: true, host: arr, transport: tcp}", "audit.transport: expected one of"),
        ("audit: {enabled: true, file: /nonexistent/audit.log}",
         "audit.file: expected a file in an existing folder"),
    ],
)  # fmt: skip
def test_audit_settings_are_checked_at_start(yaml: str, expected: str, tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(yaml + "\n")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_settings(config)


def test_a_study_naming_two_patients_is_audited_under_each(tmp_path: Path) -> None:
    """A series filed under another patient came in the same association as its study: the
    transfer was audited under the first instance's patient alone, and an audit query for the
    other patient found nothing of the node, which holds that patient's images."""
    log_file = tmp_path / "audit.log"
    trail = AuditTrail(AuditSettings(enabled=True, file=log_file), "GLIOFORECAST")
    study = factories.small_study(tmp_path / "study")
    tally = TransferTally()
    for path in study["t1c"]:
        tally.add(pydicom.dcmread(path), MR)
    for path in study["flair"]:
        misfiled = pydicom.dcmread(path)
        misfiled.PatientID, misfiled.PatientName = "PID-9944-QQQ", "Yxorp^Bartholomew"
        tally.add(misfiled, MR)
    trail.transferred(
        Participant("SCANNER1", "10.0.0.5", True, ROLE_SOURCE),
        Participant("GLIOFORECAST", "node", False, ROLE_DESTINATION),
        tally,
    )
    messages = [ET.fromstring(line) for line in log_file.read_text("utf-8").splitlines()]
    patients = {
        _objects(m)["Patient Number"].get("ParticipantObjectID"): _sop_classes(
            _objects(m)["Study Instance UID"]
        )
        for m in messages
    }
    original = str(pydicom.dcmread(study["t1c"][0]).PatientID)
    assert patients == {
        original: {MR: len(study["t1c"])},
        "PID-9944-QQQ": {MR: len(study["flair"])},
    }
    for message in messages:
        check_schema(message)


def test_a_peer_refused_before_it_named_an_ae_title_is_named_by_its_address(
    tmp_path: Path,
) -> None:
    """A TLS handshake or a STOW-RS client refused has no AE title: its Security Alert had
    UserID "", which the audit schema refuses (PS3.15 A.5.1: UserID is required)."""
    log_file = tmp_path / "audit.log"
    trail = AuditTrail(AuditSettings(enabled=True, file=log_file), "GLIOFORECAST")
    trail.refused("", "10.9.9.9", "TLS handshake failed: certificate unknown")
    (line,) = log_file.read_text("utf-8").splitlines()
    alert = ET.fromstring(line)
    check_schema(alert)
    assert _participants(alert)["none"].get("UserID") == "10.9.9.9"
