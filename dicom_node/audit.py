"""The audit trail (IHE ATNA): who sent the node which patient's study, where results went,
what was refused and what was deleted, as DICOM audit messages (PS3.15 A.5) for the
hospital's audit record repository.

Events (DCM codes of PS3.16 CID 400-403; PS3.15 A.5.3):

- Application Activity (110100): Application Start (110120) and Stop (110121) of the node;
- DICOM Instances Transferred (110104), action C: each study an association delivered to the
  node (the sender as Source, the node as Destination), and each study's results delivered to
  a destination (the node as Source); the instances stored and those refused go in separate
  messages (success 0, minor failure 4), as PS3.15 A.5.2 asks;
- Security Alert (110113), type Node Authentication (110126), minor failure: an association
  refused (a called AE title that is not the node's, a caller not in ``node.allowed_callers``)
  or a client's TLS handshake that failed;
- DICOM Study Deleted (110105), action D: retention removed a study's files from the spool;
- Query (110112), action E: each C-FIND the node sent a PACS for the RT objects a study lacks
  (:mod:`dicom_node.retrieve`; the node as Source, the PACS as Destination, the query itself
  base64-encoded as PS3.15 A.5.3.12 asks); a query the PACS could not answer is a minor
  failure with the reason;
- Security Alert (110113), type Security Configuration (110129) when ``node.allowed_callers``,
  ``node.refuse_unknown_callers`` or ``node.tls`` changed, else Software Configuration
  (110131): each
  configuration reload (SIGHUP, :mod:`dicom_node.reload`), the changed keys in the
  description, a minor failure with the reason when nothing was applied.

Unlike the logs, audit messages name the patient (ID and name) and the study: that is what an
audit trail is for. They go only where ``audit:`` says: an audit record repository over syslog
(RFC 5424 messages over TLS, RFC 5425, or UDP, RFC 5426), and/or a file (one message per
line, appended; readable by the node's user only).

Sending never blocks or fails the node: messages wait in a queue file (``audit-queue.sqlite3``
in the data folder) for a background thread, which reconnects with back-off while the
repository is down; what is not delivered at a stop, or a crash, is delivered after the next
start. Beyond :data:`MAX_QUEUED` waiting messages the oldest are dropped (counted in the
metrics, logged). Commands beside the node (``spool prune``) add their messages to the queue
file, and the running node delivers them. The file, when set, is written at once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicom_node.errors import GlioforecastError
from dicom_node.ports import host_port
from dicom_node.settings import AuditSettings
from dicom_node.sqlite import Database
from dicom_node.tls_profile import new_context

log = logging.getLogger(__name__)

#: messages waiting for the repository at most (in the queue file); older ones are dropped
MAX_QUEUED = 100000
#: seconds between looks at the queue file when it is empty (another process may add to it)
POLL_S = 2.0
QUEUE_FILE = "audit-queue.sqlite3"

_QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    frame BLOB NOT NULL,
    at REAL NOT NULL
);
"""
#: seconds a stopping node waits for the queue to drain
DRAIN_S = 5.0
#: seconds a new TLS connection is watched for the repository refusing the node's certificate
PROBE_S = 0.5
#: syslog PRI: facility 10 (security/authorization), severity 5 (notice), as IHE ATNA uses
PRI = 10 * 8 + 5
APP_NAME = "glioforecast"
MSG_ID = "IHE+RFC-3881"
BOM = "\ufeff"

# (code, meaning) of the DCM coding scheme
APPLICATION_ACTIVITY = ("110100", "Application Activity")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
SECURITY_ALERT = ("110113", "Security Alert")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
SECURITY_CONFIGURATION = ("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = ("110131", "Software Configuration")
URI = ("12", "URI")  # RFC-3881 participant object ID type
ROLE_APPLICATION = ("110150", "Application")
ROLE_SOURCE = ("110153", "Source Role ID")
ROLE_DESTINATION = ("110152", "Destination Role ID")
ROLE_DESTINATION_MEDIA = ("110154", "Destination Media")
MEDIA_URI = ("110037", "URI")  # DCM CID 405 Media Type
STUDY_INSTANCE_UID = ("110180", "Study Instance UID")
NODE_ID = ("110182", "Node ID")

QUERY = ("110112", "Query")
SOP_CLASS_UID = ("110181", "SOP Class UID")

SUCCESS, MINOR_FAILURE = "0", "4"


@dataclass(frozen=True)
class Participant:
    """An active participant: an application entity at a network address; ``user_name``: the
    names of the TLS client certificate it proved itself with ("" without one)."""

    ae_title: str
    host: str
    requestor: bool
    role: tuple[str, str] | None = None
    process_id: str = ""
    user_name: str = ""
    media_type: tuple[str, str] | None = None  # a media participant's type (DCM CID 405)


@dataclass
class StudyRecord:
    """One study of one patient in an event, with its instances by SOP class."""

    study_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)

    def add(self, sop_class_uid: str, count: int = 1) -> None:
        self.sop_classes[sop_class_uid] = self.sop_classes.get(sop_class_uid, 0) + count

    @property
    def instances(self) -> int:
        return sum(self.sop_classes.values())

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyRecord:
        """The study and patient of ``ds`` (no instance counted yet)."""
        return cls(
            str(ds.get("StudyInstanceUID", "") or ""),
            str(ds.get("PatientID", "") or ""),
            str(ds.get("PatientName", "") or ""),
            str(ds.get("AccessionNumber", "") or ""),
        )


class TransferTally:
    """The instances of one transfer by study and patient: those that went, and those that did
    not with the first reason (one audit message per study, patient and outcome: a series
    filed under another patient is audited under that patient, PS3.15 A.5.3.10)."""

    def __init__(self, active: bool = True) -> None:
        self.active = active  # False: counts nothing (no audit trail to tell)
        self.done: dict[str, StudyRecord] = {}
        self.failed: dict[str, tuple[StudyRecord, str]] = {}

    def __bool__(self) -> bool:
        return bool(self.done or self.failed)

    def add(self, ds: Dataset, sop_class_uid: str, error: str = "") -> None:
        if not self.active:
            return
        study = "\0".join(
            str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "PatientID", "IssuerOfPatientID")
        )
        if error:
            record, reason = self.failed.get(study) or (StudyRecord.from_dataset(ds), error)
            self.failed[study] = (record, reason)
        else:
            record = self.done.setdefault(study, StudyRecord.from_dataset(ds))
        record.add(sop_class_uid)


# ---------------------------------------------------------------------------------- messages


def _coded(parent: ET.Element, tag: str, code: tuple[str, str], scheme: str = "DCM") -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": scheme, "originalText": code[1]}
    )


def _now() -> str:
    """EventDateTime: UTC, to the millisecond (PS3.15 A.5.2.5)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class AuditSource:
    source_id: str
    enterprise_site_id: str = ""


def _message(
    event: tuple[str, str],
    action: str,
    outcome: str,
    participants: Sequence[Participant],
    source: AuditSource,
    *,
    event_type: tuple[str, str] | None = None,
    description: str = "",
) -> ET.Element:
    """The parts every message has, in the schema's order (PS3.15 A.5.1)."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": _now(), "EventOutcomeIndicator": outcome},
    )
    _coded(ident, "EventID", event)
    if event_type is not None:
        _coded(ident, "EventTypeCode", event_type)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = description
    for p in participants:
        # UserID is required: a peer refused before it named an AE title (a TLS handshake, a
        # STOW-RS client without credentials) is named by its address
        user = p.ae_title or p.host or "unknown"
        attrs = {"UserID": user, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.process_id:
            attrs["AlternativeUserID"] = p.process_id
        if p.user_name:
            attrs["UserName"] = p.user_name
        if p.host:
            attrs["NetworkAccessPointID"] = p.host
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.host) else "1"
        element = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _coded(element, "RoleIDCode", p.role)
        if p.media_type is not None:
            _coded(ET.SubElement(element, "MediaIdentifier"), "MediaType", p.media_type)
    attrs = {"AuditSourceID": source.source_id}
    if source.enterprise_site_id:
        attrs["AuditEnterpriseSiteID"] = source.enterprise_site_id
    audit_source = ET.SubElement(root, "AuditSourceIdentification", attrs)
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server
    return root


def _study_objects(root: ET.Element, study: StudyRecord) -> None:
    """The study (with its SOP classes) and the patient as participant objects."""
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": study.study_instance_uid,
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report
        },
    )
    _coded(obj, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    description = ET.SubElement(obj, "ParticipantObjectDescription")
    if study.accession_number:
        ET.SubElement(description, "Accession", {"Number": study.accession_number})
    for uid, count in sorted(study.sop_classes.items()):
        ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    patient = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": study.patient_id,
            "ParticipantObjectTypeCode": "1",  # person
            "ParticipantObjectTypeCodeRole": "1",  # patient
        },
    )
    _coded(patient, "ParticipantObjectIDTypeCode", ("2", "Patient Number"), scheme="RFC-3881")
    ET.SubElement(patient, "ParticipantObjectName").text = study.patient_name


def application_activity(node: Participant, source: AuditSource, *, start: bool) -> ET.Element:
    return _message(
        APPLICATION_ACTIVITY,
        "E",
        SUCCESS,
        [node],
        source,
        event_type=APPLICATION_START if start else APPLICATION_STOP,
    )


def instances_transferred(
    sender: Participant,
    receiver: Participant,
    study: StudyRecord,
    source: AuditSource,
    *,
    failure: str = "",
) -> ET.Element:
    """One study moved from ``sender`` to ``receiver``; ``failure`` (the reason) makes it the
    message of the instances that were not."""
    root = _message(
        INSTANCES_TRANSFERRED,
        "C",
        MINOR_FAILURE if failure else SUCCESS,
        [sender, receiver],
        source,
        description=failure,
    )
    _study_objects(root, study)
    return root


def security_alert(
    node: Participant, peer: Participant, source: AuditSource, reason: str
) -> ET.Element:
    """An association refused: the peer failed to authenticate as a node the node accepts."""
    root = _message(
        SECURITY_ALERT,
        "E",
        MINOR_FAILURE,
        [peer, node],
        source,
        event_type=NODE_AUTHENTICATION,
        description=reason,
    )
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": peer.host, "ParticipantObjectTypeCode": "2"},
    )
    _coded(obj, "ParticipantObjectIDTypeCode", NODE_ID)
    ET.SubElement(obj, "ParticipantObjectName").text = peer.ae_title or peer.host
    return root


def configuration_changed(
    node: Participant,
    source: AuditSource,
    uri: str,
    *,
    security: bool,
    applied: bool,
    description: str,
) -> ET.Element:
    """The node was asked to reload its configuration file (at ``uri``): a Security Alert of
    type Security Configuration when who may call the node, or its TLS, changed, else
    Software Configuration; a minor failure when nothing was applied (``description`` says
    why)."""
    root = _message(
        SECURITY_ALERT, "E", SUCCESS if applied else MINOR_FAILURE, [node], source,
        event_type=SECURITY_CONFIGURATION if security else SOFTWARE_CONFIGURATION,
        description=description,
    )  # fmt: skip
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": uri, "ParticipantObjectTypeCode": "2"},  # system object
    )
    _coded(obj, "ParticipantObjectIDTypeCode", URI, scheme="RFC-3881")
    return root


def instances_rejected(
    requestor: Participant, node: Participant, study: StudyRecord, source: AuditSource, why: str
) -> ET.Element:
    """A rejection note from ``requestor`` made the node stop using instances of ``study``
    (IHE IOCM; the instances stay in the spool): an update of what the node holds."""
    root = _message(INSTANCES_ACCESSED, "U", SUCCESS, [requestor, node], source, description=why)
    _study_objects(root, study)
    return root


def study_deleted(
    node: Participant, study: StudyRecord, source: AuditSource, reason: str
) -> ET.Element:
    root = _message(STUDY_DELETED, "D", SUCCESS, [node], source, description=reason)
    _study_objects(root, study)
    return root


def query(
    node: Participant,
    peer: Participant,
    sop_class_uid: str,
    identifier: Dataset,
    source: AuditSource,
    *,
    failure: str = "",
) -> ET.Element:
    """A C-FIND of ``sop_class_uid`` the node sent ``peer`` (PS3.15 A.5.3.12)."""
    root = _message(
        QUERY, "E", MINOR_FAILURE if failure else SUCCESS, [node, peer], source,
        description=failure,
    )  # fmt: skip
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": sop_class_uid,
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report
        },
    )
    _coded(obj, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
    encoded = encode(identifier, False, True) or b""  # explicit VR little endian
    ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(encoded).decode()
    ET.SubElement(
        obj,
        "ParticipantObjectDetail",
        {"type": "TransferSyntax", "value": base64.b64encode(ExplicitVRLittleEndian.encode())
                                                 .decode()},
    )  # fmt: skip
    return root


#: characters XML 1.0 does not allow (control characters but tab, line feed and carriage
#: return; U+FFFE, U+FFFF; lone surrogates), which a sender can put in a name or an ID
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
#: line breaks other than CR and LF (one message per line, for readers that split on them too)
_OTHER_BREAKS = {"\x85": "&#133;", "\u2028": "&#8232;", "\u2029": "&#8233;"}


def to_text(message: ET.Element) -> str:
    """The message as one line of well-formed XML: a line break in a text (a multi-line
    reason) is written as a character reference, which an XML reader reads back as the line
    break; a character XML does not allow (a control character a sender put in a patient's
    name) is written as U+FFFD, so that no sender can make its own audit message unreadable."""
    text = _NOT_XML.sub("\ufffd", ET.tostring(message, encoding="unicode"))
    for char, reference in _OTHER_BREAKS.items():
        text = text.replace(char, reference)
    return text.replace("\r", "&#13;").replace("\n", "&#10;")


def syslog_frame(xml: str, hostname: str, when: datetime.datetime | None = None) -> bytes:
    """An RFC 5424 syslog message carrying ``xml`` (UTF-8, with the BOM RFC 5424 asks for)."""
    stamp = (when or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds")
    header = f"<{PRI}>1 {stamp} {hostname or '-'} {APP_NAME} {os.getpid()} {MSG_ID} - "
    return (header + BOM + xml).encode("utf-8")


# --------------------------------------------------------------------------------- transport


class AuditTrail:
    """Records audit messages: appends them to the file and queues them for the repository.

    :meth:`record` never raises and never waits on the network.
    """

    def __init__(
        self,
        settings: AuditSettings,
        node_ae_title: str,
        queue_path: Path | None = None,
        *,
        deliver: bool = True,
    ) -> None:
        self.settings = settings
        self.deliver = deliver
        self.source = AuditSource(settings.source_id or node_ae_title, settings.enterprise_site_id)
        self.node = Participant(
            node_ae_title, socket.gethostname(), False, ROLE_APPLICATION, str(os.getpid())
        )
        self.hostname = socket.gethostname()
        self.sent = 0
        self.dropped = 0
        self.max_queued = MAX_QUEUED
        self._left = 0
        self._queue: Database | None = None
        if settings.host:
            if queue_path is None:
                raise GlioforecastError("audit: a repository needs a queue file (queue_path)")
            self._queue = Database(queue_path, _QUEUE_SCHEMA, "audit queue", synchronous="FULL")
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._down_since: float | None = None
        self._file_lock = threading.Lock()
        self._file_failure = ""  # why the audit file could not be written last time
        self.activity = False
        self._ssl: ssl.SSLContext | None = None
        if settings.host and settings.transport == "tls":
            self._ssl = _client_context(settings)

    @property
    def enabled(self) -> bool:
        return True

    @property
    def queued(self) -> int:
        """Messages waiting for the repository (in the queue file)."""
        if self._queue is None:
            return self._left  # closed: what it left in the queue file
        with self._queue.lock:
            low, high = self._queue.conn.execute("SELECT min(id), max(id) FROM queue").fetchone()
        return 0 if low is None else int(high) - int(low) + 1

    def _oldest(self) -> tuple[int, bytes] | None:
        if self._queue is None:
            raise RuntimeError("the audit trail is closed")
        with self._queue.lock:
            row = self._queue.conn.execute(
                "SELECT id, frame FROM queue ORDER BY id LIMIT 1"
            ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    @property
    def reachable(self) -> bool:
        """False while the repository cannot be reached (the last attempt failed), or the
        audit file cannot be written."""
        return self._down_since is None and not self._file_failure

    def start(self, activity: bool = True) -> None:
        """Start sending; with ``activity``, record the Application Start (the node's, not a
        command's such as ``spool prune``)."""
        if self._queue is not None and self.deliver and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
            self._thread.start()
        self.activity = activity
        if activity:
            self.record(application_activity(self.node, self.source, start=True))

    def close(self) -> None:
        """Record the Application Stop (after a start with ``activity``), give the queue
        :data:`DRAIN_S` to drain, stop; what is left waits in the queue file for the next
        start. Closing again does nothing."""
        if self._stopping:
            return
        if self.activity:
            self.record(application_activity(self.node, self.source, start=False))
        with self._cond:
            deadline = time.monotonic() + DRAIN_S
            while self._thread is not None and self.queued and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(DRAIN_S)
            self._thread = None
        left = self.queued
        if left and self.deliver:
            log.warning(
                "audit: %d message(s) not yet delivered to %s: kept for the next start",
                left, self._where(),
            )  # fmt: skip
        self._disconnect()
        if self._queue is not None:
            self._queue.close()
            self._queue, self._left = None, left

    # -- what the node reports

    def record(self, message: ET.Element) -> None:
        """Write ``message`` to the file and queue it for the repository, each on its own: a
        file that cannot be written does not keep the message from the repository. A message
        lost to either is counted (:attr:`dropped`), and :attr:`reachable` is False until the
        file takes messages again."""
        try:
            xml = to_text(message)
        except Exception:  # the audit trail must never fail what it records
            log.exception("audit: a message could not be written out")
            self.dropped += 1
            return
        if self.settings.file is not None:
            try:
                self._append(xml)
                if self._file_failure:
                    log.warning("audit: %s is written again", self.settings.file)
                self._file_failure = ""
            except OSError as exc:
                self.dropped += 1
                if not self._file_failure:
                    log.error("audit: cannot write %s (%s): its messages are lost until it can "
                              "be written", self.settings.file, exc)  # fmt: skip
                self._file_failure = str(exc)
        if self.settings.host:
            try:
                self._enqueue(syslog_frame(xml, self.hostname))
            except Exception:
                self.dropped += 1
                log.exception("audit: a message could not be queued for the repository")

    def transferred(self, sender: Participant, receiver: Participant, tally: TransferTally) -> None:
        for study in tally.done.values():
            self.record(instances_transferred(sender, receiver, study, self.source))
        for study, reason in tally.failed.values():
            self.record(instances_transferred(sender, receiver, study, self.source, failure=reason))

    def refused(self, ae_title: str, host: str, reason: str) -> None:
        peer = Participant(ae_title, host, True)
        self.record(security_alert(self.node, peer, self.source, reason))

    def deleted(self, study: StudyRecord, reason: str) -> None:
        self.record(study_deleted(self.node, study, self.source, reason))

    def rejected(self, ae_title: str, host: str, study: StudyRecord, why: str) -> None:
        requestor = Participant(ae_title, host, True)
        self.record(instances_rejected(requestor, self.node, study, self.source, why))

    def configured(self, uri: str, *, security: bool, applied: bool, description: str) -> None:
        self.record(configuration_changed(
            self.node, self.source, uri, security=security, applied=applied,
            description=description,
        ))  # fmt: skip

    def queried(
        self, ae_title: str, host: str, sop_class_uid: str, identifier: Dataset, failure: str = ""
    ) -> None:
        node = dataclasses.replace(self.node, requestor=True, role=ROLE_SOURCE)
        peer = Participant(ae_title, host, False, ROLE_DESTINATION)
        self.record(query(node, peer, sop_class_uid, identifier, self.source, failure=failure))

    # -- delivery

    def _append(self, xml: str) -> None:
        path = self.settings.file
        assert path is not None
        with self._file_lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (xml + "\n").encode("utf-8"))
            finally:
                os.close(fd)

    def _enqueue(self, frame: bytes) -> None:
        assert self._queue is not None
        with self._queue.transaction() as db:
            db.execute("INSERT INTO queue (frame, at) VALUES (?, ?)", (frame, time.time()))
            low, high = db.execute("SELECT min(id), max(id) FROM queue").fetchone()
            over = int(high) - int(low) + 1 - self.max_queued
            if over > 0:
                db.execute("DELETE FROM queue WHERE id < ?", (int(low) + over,))
        if over > 0:
            self.dropped += over
            if self.dropped == over or self.dropped % 1000 == 0:
                log.error(
                    "audit: %s unreachable and %d messages waiting: oldest dropped (%d so far)",
                    self._where(), self.max_queued, self.dropped,
                )  # fmt: skip
        with self._cond:
            self._cond.notify_all()

    def _where(self) -> str:
        s = self.settings
        return f"audit record repository {host_port(s.host, s.port)} ({s.transport})"

    def _run(self) -> None:
        assert self._queue is not None
        backoff = 1.0
        while True:
            try:
                oldest = self._oldest()
            except Exception:  # the queue file closed by a stop that did not wait, or failing
                if self._stopping:
                    return
                log.exception("audit: cannot read the queue file; retrying")
                with self._cond:
                    self._cond.wait(POLL_S)
                continue
            if oldest is None:
                with self._cond:
                    if self._stopping:
                        return
                    # another process (spool prune) may add to the queue file: look again
                    self._cond.wait(POLL_S)
                continue
            row_id, frame = oldest
            try:
                self._send(frame)
            except Exception as exc:  # OSError and TLS errors mostly; the thread must go on
                self._disconnect()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.error("audit: cannot send to %s: %s; retrying", self._where(), exc)
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            if self._down_since is not None:
                log.info(
                    "audit: %s reachable again after %.0f s",
                    self._where(), time.monotonic() - self._down_since,
                )  # fmt: skip
                self._down_since = None
            try:
                with self._queue.transaction() as db:
                    db.execute("DELETE FROM queue WHERE id = ?", (row_id,))
            except Exception:  # sent: at worst it is sent again (a repository keeps both)
                if self._stopping:
                    return
                log.exception("audit: cannot update the queue file")
            with self._cond:
                self.sent += 1
                if self._stopping and not self.queued:
                    return
                self._cond.notify_all()

    def _send(self, frame: bytes) -> None:
        s = self.settings
        if s.transport == "udp":
            if self._sock is None:
                family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.sendto(frame, (s.host, s.port))
            return
        if self._sock is not None and _closed_by_peer(self._sock, 0.0):
            self._disconnect()  # the repository closed the connection: a new one
        if self._sock is None:
            raw = socket.create_connection((s.host, s.port), timeout=10)
            assert self._ssl is not None
            try:
                sock = self._ssl.wrap_socket(raw, server_hostname=s.server_name or s.host)
            except BaseException:
                raw.close()
                raise
            # with TLS 1.3 the client's handshake ends before the server has checked the
            # client's certificate: a repository refusing it says so just after, and what was
            # written meanwhile would be lost
            if _closed_by_peer(sock, PROBE_S):
                sock.close()
                raise ConnectionError("the repository closed the connection after the handshake")
            self._sock = sock
        self._sock.sendall(f"{len(frame)} ".encode("ascii") + frame)  # RFC 5425 framing

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # -- what the site's administrators do (commands beside the node)

    def administered(
        self,
        kind: Literal["backup", "restore", "take-back"],
        description: str,
        *,
        data_dir: Path,
        other: Path | None = None,
        studies: Sequence[StudyRecord] = (),
    ) -> None:
        """An administrator's command beside the node, by ``kind``:

        - ``"backup"``: Export (110106), action R (PS3.15 A.5.3.6), one message for each of
          ``studies`` (the studies and patients the backup holds) naming it and its patient,
          or one naming the data folder ``data_dir`` (a Data Repository) when it holds none:
          the node's process as Source, the backup folder ``other`` as the Destination Media
          (its ``file://`` URI, media type URI);
        - ``"restore"``: Security Alert (110113), type Software Configuration (110131): the
          data folder replaced, and the backup ``other`` it was replaced with, as objects;
        - ``"take-back"``: DICOM Instances Accessed (110103), action D: the results of
          ``studies`` (one) taken back from the destinations.

        The system user who ran the command is the requestor; ``description`` says what was
        done (and why, for a take-back)."""
        import pwd

        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a user without a passwd entry (a container)
            user = f"uid {os.geteuid()}"
        operator = Participant(user, "", True, process_id=str(os.getpid()))
        folders: list[tuple[Path, str, str]] = []
        if kind == "backup":
            assert other is not None
            source = dataclasses.replace(self.node, role=ROLE_SOURCE)
            media = Participant(
                other.as_uri(), "", False, ROLE_DESTINATION_MEDIA, media_type=MEDIA_URI
            )
            participants = [operator, source, media]
            event, action, event_type = ("110106", "Export"), "R", None
            if not studies:
                folders = [(data_dir, "17", "the node's data folder")]  # 17: Data Repository
        elif kind == "restore":
            assert other is not None
            participants = [operator, self.node]
            event, action, event_type = SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION
            folders = [
                (data_dir, "17", "the node's data folder, replaced by the backup"),
                (other, "17", "the backup restored"),
            ]
        elif kind == "take-back":
            assert len(studies) == 1
            participants = [operator, self.node]
            event, action, event_type = INSTANCES_ACCESSED, "D", None
        else:
            raise ValueError(f"expected backup, restore or take-back, found {kind!r}")
        objects: Sequence[StudyRecord | None] = studies or [None]
        for study in objects:
            root = _message(
                event, action, SUCCESS, participants, self.source, event_type=event_type,
                description=description,
            )  # fmt: skip
            if study is not None:
                _study_objects(root, study)
            for folder, role, name in folders:
                obj = ET.SubElement(
                    root,
                    "ParticipantObjectIdentification",
                    {
                        "ParticipantObjectID": folder.as_uri(),
                        "ParticipantObjectTypeCode": "2",  # system object
                        "ParticipantObjectTypeCodeRole": role,
                    },
                )
                _coded(obj, "ParticipantObjectIDTypeCode", URI, scheme="RFC-3881")
                ET.SubElement(obj, "ParticipantObjectName").text = name
            self.record(root)


def check_repository(settings: AuditSettings) -> tuple[bool, str]:
    """Whether the audit record repository takes the node's connection as configured (over
    TLS: the handshake, with the repository's certificate and name checked and the node's own
    certificate when it asks), and what was found. Nothing is sent."""
    from dicom_node.scu import Destination, tls_handshake_error

    where = (
        f"audit record repository {host_port(settings.host, settings.port)} ({settings.transport})"
    )
    if settings.transport == "udp":
        try:
            socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            return False, f"{where}: its host cannot be resolved ({exc})"
        return True, f"{where}: address resolved (over UDP nothing more can be checked)"
    try:
        socket.create_connection((settings.host, settings.port), timeout=10).close()
    except OSError as exc:
        return False, f"{where}: no connection ({exc})"
    peer = Destination(
        name="audit", ae_title="AUDIT", host=settings.host, port=settings.port,
        tls=_client_context(settings), server_name=settings.server_name,
    )  # fmt: skip
    error = tls_handshake_error(peer, settings_key="audit")
    if error.endswith("closed the connection after the handshake") and not settings.certificate:
        error += (
            ", as a repository that asks for the node's certificate does (set certificate and "
            "private_key in audit)"
        )
    return not error, f"{where}: {error or 'TLS handshake accepted'}"


def _closed_by_peer(sock: socket.socket, wait_s: float) -> bool:
    """Whether the repository closed ``sock`` or sent an alert (waiting up to ``wait_s``).
    A repository never writes to the node (RFC 5425), so anything readable means the end;
    a TLS alert is raised, with the repository's reason."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    if not readable:
        return False
    try:
        sock.settimeout(0.0)
        sock.recv(1)  # b"" at the end of the stream, else something no repository sends
    except (ssl.SSLWantReadError, BlockingIOError):
        return False  # only part of a TLS record: nothing for the application
    finally:
        sock.settimeout(10)
    return True


class NoAuditTrail:
    """What the node records to when ``audit.enabled`` is false: nothing."""

    enabled = False
    reachable = True
    sent = dropped = queued = 0
    node = Participant("", "", False)

    def start(self, activity: bool = True) -> None: ...
    def close(self) -> None: ...
    def record(self, message: ET.Element) -> None: ...
    def transferred(
        self, sender: Participant, receiver: Participant, tally: TransferTally
    ) -> None: ...
    def refused(self, ae_title: str, host: str, reason: str) -> None: ...
    def deleted(self, study: StudyRecord, reason: str) -> None: ...
    def rejected(self, ae_title: str, host: str, study: StudyRecord, why: str) -> None: ...
    def queried(
        self, ae_title: str, host: str, sop_class_uid: str, identifier: Dataset, failure: str = ""
    ) -> None: ...
    def configured(self, uri: str, *, security: bool, applied: bool, description: str) -> None: ...
    def administered(
        self,
        kind: Literal["backup", "restore", "take-back"],
        description: str,
        *,
        data_dir: Path,
        other: Path | None = None,
        studies: Sequence[StudyRecord] = (),
    ) -> None: ...


def audit_trail(
    settings: AuditSettings, node_ae_title: str, data_dir: Path, *, deliver: bool = True
) -> AuditTrail | NoAuditTrail:
    """The node's audit trail as configured (not started), its queue file in ``data_dir``;
    with ``deliver`` false (a command beside the node), messages only join the queue file,
    which the running node delivers."""
    if not settings.enabled:
        return NoAuditTrail()
    return AuditTrail(settings, node_ae_title, data_dir / QUEUE_FILE, deliver=deliver)


def _client_context(settings: AuditSettings) -> ssl.SSLContext:
    """TLS (:mod:`dicom_node.tls_profile`) to the repository: its certificate checked against
    ``ca_certificates`` (the system's CAs when unset), the node's own certificate when the
    repository asks."""
    try:
        cafile = str(settings.ca_certificates) if settings.ca_certificates else None
        context = new_context(ssl.Purpose.SERVER_AUTH, cafile)
        if settings.certificate is not None and settings.private_key is not None:
            context.load_cert_chain(str(settings.certificate), str(settings.private_key))
    except (ssl.SSLError, OSError) as exc:
        raise GlioforecastError(
            f"audit: cannot load its TLS files (ca_certificates {settings.ca_certificates}, "
            f"certificate {settings.certificate}, private_key {settings.private_key}): {exc}; "
            "expected PEM files"
        ) from exc
    return context
