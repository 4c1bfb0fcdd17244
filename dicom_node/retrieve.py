"""Asking a PACS for the RT objects a study lacks (Query/Retrieve SCU: C-FIND, C-MOVE).

Routing rules often send the node the scanner's MR study and nothing else: the structure set
is made later, in the planning system, and goes to the PACS. When a study has its T1-Gd but
no structure set (neither of its own nor in another study of the patient the node holds,
:mod:`dicom_node.linking`), and ``retrieve.source`` names a PACS, the assembler makes its job
``retrieving`` instead of failed, and :class:`Retriever` asks that PACS for:

1. the patient's studies (Study Root C-FIND on the PatientID of the T1-Gd, exact match,
   StudyDate within ``retrieve.window_days`` of the study's; the study itself only when
   ``assembly.link_rt_days`` is 0, as the node would not link another study's objects);
2. their RT series (RTSTRUCT, RTDOSE, REG) that the node does not hold, other than the node's
   own results (a predicted RTSTRUCT the PACS keeps);
3. a C-MOVE of each to the node's own AE title, each on its own and the structure sets
   first (a series the PACS cannot send keeps none of the others away): the PACS sends them
   to the node's receiver like any other sender, where they are stored and recorded. What
   came is what the receiver holds of each series, not what the PACS reported: one that moves
   asynchronously (Orthanc with SynchronousCMove false) answers before it sends, so the
   retriever waits for what it reported, up to ``retrieve.move_timeout_s``.

The study is then assembled again after the quiet period with what came (a structure set in
the study itself, or linked from the planning study by frame of reference as when it is
routed), and the new job version supersedes the waiting one. When nothing came (the PACS holds
no RT object of the patient, or only some the node has), the waiting job fails, its reason
saying what the PACS was asked and what it answered, and later versions of the study fail the
same way without asking. The PACS is asked again every ``retrieve.ask_again_h`` hours for
``retrieve.ask_again_days`` days from the first time (a plan drawn days after the MR), the
failed job left as it is until something comes; ``jobs retrieve N`` asks at once. A PACS that
cannot be reached, or that aborts the association (one that does not allow the request from
the node's calling AE title), is asked again ``retry_interval_s`` later, up to ``attempts``
times; one that does not know the node as a move destination fails the job at once, saying
what to set up. Series that could not be retrieved are named, with why, in the ``retrieved``
event of what did come.

A PatientID that is empty or holds a wildcard is never sent: it would match other patients.

A DICOMweb source (a destination with ``dicomweb.url``) is asked the same questions over HTTP:
QIDO-RS searches for the C-FINDs and a WADO-RS retrieval per series for the C-MOVEs, whose
instances the receiver stores as if a C-GET had brought them (:class:`WebQueryRetrieve`).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import Association, build_role, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import build_context

from dicom_node import dicomweb
from dicom_node.audit import AuditTrail, NoAuditTrail
from dicom_node.convert.spatial_registration import SPATIAL_REGISTRATION_SOP_CLASS
from dicom_node.errors import InputError, SendError
from dicom_node.jobs import FAILED, Job, JobStore
from dicom_node.linking import RT_CLASSES, RTDOSE_SOP_CLASS, RTSTRUCT_SOP_CLASS
from dicom_node.loop import BackgroundLoop
from dicom_node.scp import LOSSY_TRANSFER_SYNTAXES, TRANSFER_SYNTAXES, Origin
from dicom_node.scu import Destination, associate, hold_reactor, release
from dicom_node.settings import Settings
from sr_writer.labels import is_labelled_description

if TYPE_CHECKING:
    from dicom_node.scp import StorageSCP

log = logging.getLogger(__name__)

FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve Information Model - MOVE
GET = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
RT_MODALITIES = ("RTSTRUCT", "RTDOSE", "REG")  # in the order they are asked for
# the SOP class of the series of each modality
MODALITY_CLASSES = {
    "RTSTRUCT": RTSTRUCT_SOP_CLASS, "RTDOSE": RTDOSE_SOP_CLASS,
    "REG": SPATIAL_REGISTRATION_SOP_CLASS,
}  # fmt: skip
#: what a C-GET proposes for its C-STORE sub-operations, one presentation context each: the
#: transfer syntaxes the receiver takes, lossless first. The PACS sends on a context it
#: accepted, and one holding a series compressed (or deflated) that cannot convert it
#: answers 0xC000 when only the uncompressed syntaxes are offered; with a context per syntax
#: it accepts every one it can send, and sends the series as it holds it
GET_TRANSFER_SYNTAXES = (
    *[ts for ts in TRANSFER_SYNTAXES if ts not in LOSSY_TRANSFER_SYNTAXES],
    *[ts for ts in TRANSFER_SYNTAXES if ts in LOSSY_TRANSFER_SYNTAXES],
)
#: how often the retriever looks whether the instances a PACS reported sent have come, s
ARRIVAL_POLL_S = 0.2
#: some of what the PACS reported sent came, then nothing more for this long (s): the rest is
#: not coming (part of an asynchronous sending failed; an instance it counted is one the node
#: holds under another series), and the retriever, which serves every study, stops waiting
ARRIVAL_SETTLE_S = 60.0
PENDING = (0xFF00, 0xFF01)
POLL_S = 2.0  # how often the retriever looks for jobs waiting for it
REPEAT_POLL_S = 60.0  # how often, at most, it looks for studies to ask about again


class RetrieveError(SendError):
    """The PACS could not be asked, or refused; ``permanent`` when asking again cannot help
    (its configuration must change). ``destination_hint``: that the PACS may not know the node
    as a move destination, said only while no move to the node succeeded (:attr:`plain` is the
    message without it); ``ended``: the association is over (aborted, timed out, lost), so the
    other series cannot be asked on it."""

    def __init__(
        self, message: str, *, permanent: bool = False, destination_hint: str = "",
        ended: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(message + destination_hint)
        self.permanent = permanent
        self.plain = message
        self.destination_hint = destination_hint
        self.ended = ended


@dataclass(frozen=True)
class RemoteSeries:
    """An RT series the PACS holds."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    description: str
    instances: int | None

    def __str__(self) -> str:
        described = f" {self.description!r}" if self.description else ""
        counted = "" if self.instances is None else f" ({self.instances} instance(s))"
        return f"{self.modality}{described}{counted}"


@dataclass(frozen=True)
class MoveResult:
    completed: int
    failed: int
    warning: int
    # False when the final response left the counts out (the standard allows it): what came
    # is then what the receiver holds of the series
    counted: bool = True


def _base(reason: str, source: str) -> str:
    """``reason`` without what :func:`asking` or :func:`asked` added to it."""
    for added in (asking("", source), asked("", source, "")):
        reason = reason.split(added)[0]
    return reason


def asking(reason: str, source: str) -> str:
    """The reason of a job waiting for the PACS."""
    return (
        f"{_base(reason, source) if reason else ''}; asking {source} for the patient's RT objects"
    )


def asked(reason: str, source: str, outcome: str) -> str:
    """The reason of a job whose study the PACS was asked about."""
    return f"{_base(reason, source) if reason else ''}; {source} was asked for them: {outcome}"


def qr_status(code: int) -> str:
    """What a C-FIND or C-MOVE status means (PS3.4 C.4)."""
    if 0xA700 <= code <= 0xA7FF:
        return "refused: out of resources"
    if code == 0xA801:
        return "refused: move destination unknown"
    if 0xA900 <= code <= 0xA9FF:
        return "error: identifier does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "failed: unable to process"
    if code == 0xFE00:
        return "cancelled"
    if code == 0x0122:
        return "refused: SOP class not supported"
    return "failure"


def not_asked(reason: str) -> str:
    """The reason of a job that waited for a PACS the node no longer asks (``retrieve.source``
    emptied)."""
    waiting = re.sub(r"; asking .+ for the patient's RT objects$", "", reason)
    return f"{waiting}; no PACS was asked: retrieve.source is no longer set"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _count(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else 0
    except (TypeError, ValueError):
        return 0


def date_range(study_date: str, days: float) -> str:
    """A C-FIND StudyDate range of ``days`` around ``study_date`` ('' when it has no date)."""
    try:
        day = dt.datetime.strptime(study_date[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    span = dt.timedelta(days=days)
    return f"{(day - span):%Y%m%d}-{(day + span):%Y%m%d}"


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    if not all(v.isascii() for v in keys.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


class PeerAborts:
    """Whether the peer sent an A-ABORT on an association (bound to its ``EVT_PDU_RECV``
    before it is requested). pynetdicom answers a request with an empty status both when the
    peer aborted and when the DIMSE timeout passed (it then aborts the association itself):
    only the PDU tells them apart, and it is seen before the DIMSE layer hears of the end."""

    def __init__(self) -> None:
        self.aborted = False

    def on_pdu(self, event: Any) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            self.aborted = True


class QueryRetrieve:
    """One association with the PACS for its C-FIND and C-MOVE requests; each C-FIND is
    audited (a Query message, :mod:`dicom_node.audit`)."""

    def __init__(
        self, assoc: Association, peer: Destination, audit: AuditTrail | NoAuditTrail,
        aborts: PeerAborts | None = None,
    ) -> None:  # fmt: skip
        self.assoc = assoc
        self.peer = peer
        self.audit = audit
        self.aborts = aborts or PeerAborts()
        #: the association is over (the PACS aborted it, or no response came): nothing more
        #: can be asked on it
        self.ended = False
        # the patient's values the node sent: a PACS's error comment may quote them, and what
        # the node logs and keeps in a job's reason must not (DESIGN: no patient ID in logs)
        self._patient: set[str] = set()

    def _said(self, status: Dataset) -> str:
        """The peer's Error Comment, the patient's values it quotes left out."""
        comment = _text(status, "ErrorComment")
        for value in sorted(self._patient, key=len, reverse=True):
            comment = comment.replace(value, "(the patient)")
        return comment

    def _lost(self, what: str, about: str, started: float) -> RetrieveError:
        """Why the ``what`` request (C-FIND, C-MOVE, C-GET; ``about``: of what) got no
        response: the PACS aborted the association (a PACS that refuses the request does so
        at once: Orthanc whose modality entry does not allow the operation, or that does not
        know the calling AE title), the DIMSE timeout passed (pynetdicom aborts it then), or
        the connection was lost."""
        self.ended = True
        waited = time.monotonic() - started
        timeout = self.assoc.dimse_timeout
        calling = str(self.assoc.requestor.ae_title).strip()
        if self.aborts.aborted:
            why = (
                f"{self.peer} aborted the {what}{about} (A-ABORT {waited:.1f} s after the "
                f"request, expected a response): it may not allow {what} from AE {calling}; "
                "check its configuration"
            )
        elif timeout is not None and waited >= 0.95 * timeout:
            why = (
                f"no response from {self.peer} to the {what}{about} within {timeout:g} s "
                "(retrieve.move_timeout_s): timed out, the association aborted"
            )
        else:
            why = (
                f"no response from {self.peer} to the {what}{about}: the connection ended "
                f"after {waited:.1f} s without an A-ABORT (lost, or an invalid response)"
            )
        return RetrieveError(why, ended=True)

    def _established(self, what: str, about: str) -> None:
        if self.ended or not self.assoc.is_established:
            self.ended = True
            raise RetrieveError(
                f"{what}{about} not asked: the association with {self.peer} had ended "
                "(expected it open after the requests before)",
                ended=True,
            )

    def _accepted(self, model: str, what: str) -> None:
        if not any(cx.abstract_syntax == model for cx in self.assoc.accepted_contexts):
            raise RetrieveError(
                f"{self.peer} does not accept {what} (Study Root Query/Retrieve, {model}): "
                "expected a PACS that answers queries and moves",
                permanent=True,
            )

    def find(self, identifier: Dataset) -> list[Dataset]:
        """The matches of a Study Root C-FIND."""
        peer = (self.peer.ae_title, self.peer.host, FIND, identifier)
        try:
            matches = self._find(identifier)
        except RetrieveError as exc:
            self.audit.queried(*peer, failure=str(exc))
            raise
        self.audit.queried(*peer)
        return matches

    def _find(self, identifier: Dataset) -> list[Dataset]:
        self._accepted(FIND, "C-FIND")
        for keyword in ("PatientID", "PatientName"):
            value = str(identifier.get(keyword, "") or "").strip()
            if len(value) > 1:
                self._patient.add(value)
        matches = []
        level = f" at {identifier.QueryRetrieveLevel} level"
        self._established("C-FIND", level)
        hold_reactor(self.assoc)
        started = time.monotonic()
        for status, found in self.assoc.send_c_find(identifier, FIND):
            if not status or "Status" not in status:
                raise self._lost("C-FIND", level, started)
            code = int(status.Status)
            if code in PENDING:
                if found is not None:
                    matches.append(found)
                continue
            if code != 0x0000:
                comment = self._said(status)
                raise RetrieveError(
                    f"{self.peer} answered the {identifier.QueryRetrieveLevel}-level C-FIND "
                    f"with 0x{code:04X} ({qr_status(code)})" + (f": {comment}" if comment else ""),
                    permanent=0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF,
                )
        return matches

    def move(self, series: RemoteSeries, destination_ae: str) -> MoveResult:
        """C-MOVE one series to ``destination_ae``."""
        self._accepted(MOVE, "C-MOVE")
        self._established("C-MOVE", f" of {series}")
        hold_reactor(self.assoc)
        return self._result(
            self.assoc.send_c_move(_series_identifier(series), destination_ae, MOVE),
            "C-MOVE", series, destination_ae,
        )  # fmt: skip

    def get(self, series: RemoteSeries) -> MoveResult:
        """C-GET one series: the PACS sends it on this association (its C-STORE
        sub-operations go to the receiver's handler)."""
        self._accepted(GET, "C-GET")
        self._established("C-GET", f" of {series}")
        hold_reactor(self.assoc)
        return self._result(
            self.assoc.send_c_get(_series_identifier(series), GET), "C-GET", series, ""
        )

    def _result(
        self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str,
        series: RemoteSeries, destination_ae: str,
    ) -> MoveResult:  # fmt: skip
        """The outcome of a C-MOVE or C-GET from its responses."""
        last: Dataset | None = None
        started = time.monotonic()
        for status, _ in responses:
            if not status or "Status" not in status:
                raise self._lost(what, f" of {series}", started)
            last = status
            if int(status.Status) not in PENDING:
                break
        assert last is not None
        code = int(last.Status)
        result = MoveResult(
            _count(last, "NumberOfCompletedSuboperations"),
            _count(last, "NumberOfFailedSuboperations"),
            _count(last, "NumberOfWarningSuboperations"),
            counted=any(
                k in last
                for k in (
                    "NumberOfCompletedSuboperations",
                    "NumberOfFailedSuboperations",
                    "NumberOfWarningSuboperations",
                )
            ),
        )
        if code == 0xA801:
            raise RetrieveError(
                f"{self.peer} does not know {destination_ae} as a move destination (0xA801): "
                f"add this node to its DICOM modalities (AE title {destination_ae}, the node's "
                "address and port)",
                permanent=True,
            )
        # sub-operations the node's receiver refused (0xA702: the PACS could not store
        # there) are for the caller to explain, with what completed
        refused = 0xA700 <= code <= 0xA7FF and result.failed
        if code in (0x0000, 0xB000) or result.completed or refused:
            return result
        comment = self._said(last)
        failure = 0xC000 <= code <= 0xCFFF
        # some PACS (Orthanc) answer a move destination they do not know with 0xC000; but so
        # do they a series they cannot send (a file they cannot read): the retriever says it
        # only while no move to the node succeeded
        hint = (
            f"; nothing was sent: check that it knows {destination_ae} as a move destination "
            "(this node's AE title, address and port)"
            if destination_ae and not result.failed and not result.warning
            else ""
        )
        # a PACS that holds the series in a transfer syntax none of the accepted contexts has,
        # and does not convert it, cannot send it on the C-GET association
        syntaxes = self._syntaxes_hint(series) if failure and not destination_ae else ""
        raise RetrieveError(
            f"{self.peer} answered the {what} of {series} with 0x{code:04X} "
            f"({qr_status(code)})" + (f": {comment}" if comment else "") + syntaxes,
            permanent=0xA900 <= code <= 0xA9FF or failure,
            destination_hint=hint,
        )

    def _syntaxes_hint(self, series: RemoteSeries) -> str:
        """What a C-GET's failure may be for: the series held in a transfer syntax the PACS
        neither was offered for its SOP class nor converts; what it accepted of those the node
        proposed (the receiver's own)."""
        sop_class = MODALITY_CLASSES.get(series.modality, "")
        taken = [
            UID(str(cx.transfer_syntax[0])).name
            for cx in self.assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.transfer_syntax
        ]
        accepted = ", ".join(taken) if taken else "none"
        return (
            f"; check that it can send the series in a transfer syntax the node takes: for "
            f"{UID(sop_class).name if sop_class else series.modality} it proposed the "
            f"{len(GET_TRANSFER_SYNTAXES)} its receiver takes (docs/CONFORMANCE.md) and the PACS "
            f"accepted {accepted}; a PACS holding the series in another that it does not "
            "convert (transcode) cannot send it"
        )


class WebQueryRetrieve:
    """The same questions of a DICOMweb ``retrieve.source``: QIDO-RS searches for the C-FINDs
    (audited as they are) and WADO-RS retrievals of series for the C-GETs, whose instances
    ``receiver`` stores as if they came on a C-GET."""

    def __init__(
        self, peer: Destination, audit: AuditTrail | NoAuditTrail, receiver: StorageSCP,
        origin: Origin,
    ) -> None:  # fmt: skip
        self.peer = peer
        self.audit = audit
        self.receiver = receiver
        self.origin = origin

    def find(self, identifier: Dataset) -> list[Dataset]:
        path, params = qido_query(identifier)
        peer = (self.peer.url, self.peer.host, FIND, identifier)
        try:
            matches = dicomweb.qido(self.peer, path, params)
        except SendError as exc:
            self.audit.queried(*peer, failure=str(exc))
            raise _retrieve_error(exc) from exc
        self.audit.queried(*peer)
        return matches

    def get(self, series: RemoteSeries) -> MoveResult:
        try:
            parts = dicomweb.wado_series(
                self.peer, series.study_instance_uid, series.series_instance_uid
            )
        except SendError as exc:
            raise _retrieve_error(exc) from exc
        completed = failed = 0
        for data in parts:
            status = self.receiver.store_part10(data, self.origin)
            code = status if isinstance(status, int) else int(status.Status)
            completed += code == 0x0000
            failed += code != 0x0000
        return MoveResult(completed, failed, 0)

    def move(self, series: RemoteSeries, destination_ae: str) -> MoveResult:
        """Never asked (the retriever reads a DICOMweb source with :meth:`get`)."""
        raise RetrieveError(f"{self.peer} is a DICOMweb service: it is asked with WADO-RS")


def _retrieve_error(exc: SendError) -> RetrieveError:
    permanent = isinstance(exc, dicomweb.AnswerError) and exc.permanent
    return RetrieveError(str(exc), permanent=permanent)


def qido_query(identifier: Dataset) -> tuple[str, list[tuple[str, str]]]:
    """The QIDO-RS path and parameters that ask what a C-FIND ``identifier`` asks: its
    values are matching keys, its empty elements fields to return (``includefield``)."""
    study = _text(identifier, "StudyInstanceUID")
    level = _text(identifier, "QueryRetrieveLevel")
    path = f"/studies/{study}/series" if level == "SERIES" else "/studies"
    params = []
    for element in identifier:
        keyword = element.keyword
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or (
            level == "SERIES" and keyword == "StudyInstanceUID"
        ):
            continue
        value = "" if element.value is None else str(element.value)
        params.append((keyword, value) if value else ("includefield", keyword))
    return path, params


#: what asks the source: over DICOM, or over DICOMweb
Asker = QueryRetrieve | WebQueryRetrieve


def _series_identifier(series: RemoteSeries) -> Dataset:
    return _identifier(
        "SERIES",
        StudyInstanceUID=series.study_instance_uid,
        SeriesInstanceUID=series.series_instance_uid,
    )


@contextmanager
def query_retrieve(
    peer: Destination,
    calling_ae: str,
    move_timeout_s: float,
    audit: AuditTrail | NoAuditTrail | None = None,
    receiver: StorageSCP | None = None,
) -> Iterator[Asker]:
    """An association with ``peer`` proposing Study Root C-FIND and C-MOVE, or with
    ``receiver`` C-FIND and C-GET (the RT storage contexts in the SCP role, the instances
    stored by ``receiver`` as if they came to it); for a DICOMweb ``peer``, its QIDO-RS and
    WADO-RS services, what they bring stored by ``receiver``."""
    if peer.url:
        if receiver is None:
            raise ValueError("a DICOMweb source: expected the receiver that stores what comes")
        origin = Origin(peer.url, peer.host)
        receiver.sub_operations_from(origin, peer.url, peer.host)
        try:
            yield WebQueryRetrieve(peer, audit or NoAuditTrail(), receiver, origin)
        finally:
            receiver.sub_operations_ended(origin)
        return
    contexts = [build_context(FIND), build_context(MOVE)]
    roles: list[Any] = []
    aborts = PeerAborts()
    handlers: list[Any] = [(evt.EVT_PDU_RECV, aborts.on_pdu)]
    if receiver is not None:
        contexts = [build_context(FIND), build_context(GET)]
        # what the C-GET brings back on this association: the RT classes, the node as SCP, in
        # each transfer syntax the receiver takes (GET_TRANSFER_SYNTAXES)
        contexts += [build_context(c, ts) for c in RT_CLASSES for ts in GET_TRANSFER_SYNTAXES]
        roles = [build_role(c, scp_role=True) for c in RT_CLASSES]
        handlers.append((evt.EVT_C_STORE, receiver.on_store))
    try:
        assoc = associate(
            peer, contexts, calling_ae=calling_ae, roles=roles, evt_handlers=handlers,
            dimse_timeout_s=move_timeout_s,  # a C-MOVE answers once the PACS has sent
        )  # fmt: skip
    except SendError as exc:
        raise RetrieveError(str(exc)) from exc
    if receiver is not None:
        receiver.sub_operations_from(assoc, peer.ae_title, peer.host)
    qr = QueryRetrieve(assoc, peer, audit or NoAuditTrail(), aborts)
    try:
        yield qr
    finally:
        if not qr.ended:
            release(assoc)
        if receiver is not None:
            receiver.sub_operations_ended(assoc)


@dataclass(frozen=True)
class Patient:
    """What the query needs from the study: who, and when."""

    patient_id: str
    study_date: str
    issuer: str = ""  # IssuerOfPatientID, when the study has one


def patient_of(path: Path) -> Patient:
    """The PatientID and StudyDate of a stored instance; InputError when there is no PatientID
    that could be sent without matching other patients."""
    try:
        ds = dcmread(
            path, stop_before_pixels=True,
            specific_tags=["PatientID", "IssuerOfPatientID", "StudyDate"],
        )  # fmt: skip
    except (OSError, InvalidDicomError) as exc:
        raise InputError(f"cannot read the T1-Gd instance {path.name}: {exc}") from exc
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise InputError("the study has no PatientID to ask the PACS with")
    if any(c in patient_id for c in "*?\\"):
        raise InputError(
            "the study's PatientID holds a wildcard or backslash: a query with it would match "
            "other patients"
        )
    return Patient(patient_id, _text(ds, "StudyDate"), _text(ds, "IssuerOfPatientID"))


def rt_studies(found: list[Dataset], patient: Patient) -> list[str]:
    """The studies of the STUDY-level matches ``found`` that may hold RT objects of
    ``patient``, newest first: not those whose returned PatientID (or IssuerOfPatientID, when
    both sides have one) is another (a PACS matching loosely, or holding several hospitals'
    patients), nor those whose returned ModalitiesInStudy has no RT modality."""
    dated: dict[str, str] = {}
    for ds in found:
        uid = _text(ds, "StudyInstanceUID")
        returned, issuer = _text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")
        if not uid or (returned and returned != patient.patient_id):
            continue
        if issuer and patient.issuer and issuer != patient.issuer:
            continue
        value = ds.get("ModalitiesInStudy") or []
        modalities = {
            str(m).strip().upper() for m in ([value] if isinstance(value, str) else value)
        }
        if modalities and not modalities & set(RT_MODALITIES):
            continue
        dated[uid] = _text(ds, "StudyDate")
    return sorted(dated, key=lambda uid: dated[uid], reverse=True)


class Retriever(BackgroundLoop):
    """Asks ``retrieve.source`` for the RT objects of the studies waiting for them."""

    thread_name = "retriever"

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        audit: AuditTrail | NoAuditTrail | None = None,
        receiver: StorageSCP | None = None,
    ) -> None:
        """``receiver``: the node's receiver, which stores what a C-GET brings
        (``retrieve.method: get``)."""
        super().__init__()
        self.store = store
        self.audit = audit or NoAuditTrail()
        self._receiver = receiver
        entry = next(d for d in settings.destinations if d.name == settings.retrieve.source)
        self.configure(settings, Destination.from_settings(entry))
        self._next_repeat = 0.0  # when to look for studies to ask about again

    def configure(self, settings: Settings, peer: Destination) -> None:
        """Ask ``peer`` (``settings.retrieve.source``) with ``settings`` from the next pass on
        (a configuration reload; a pass under way finishes with what it started with)."""
        if (settings.retrieve.method == "get" or peer.url) and self._receiver is None:
            raise ValueError("expected the receiver that stores what a C-GET or WADO-RS brings")
        self.settings, self.peer = settings, peer

    @property
    def receiver(self) -> StorageSCP | None:
        """The receiver that stores what a C-GET or a WADO-RS retrieval brings; None when the
        PACS sends to it (C-MOVE)."""
        fetched = self.settings.retrieve.method == "get" or self.peer.url
        return self._receiver if fetched else None

    def step(self) -> float:
        self.run_once()
        return POLL_S

    def run_once(self, now: float | None = None) -> int:
        """Ask the PACS for every study whose turn it is: those waiting, then those it had
        nothing for, every ``retrieve.ask_again_h``; returns how many were asked."""
        now = time.time() if now is None else now
        r = self.settings.retrieve
        jobs = self.store.due_retrievals(now)
        if r.ask_again_h > 0 and r.ask_again_days > 0 and now >= self._next_repeat:
            self._next_repeat = now + min(REPEAT_POLL_S, r.ask_again_h * 360)  # a tenth
            jobs += self.store.retrievals_to_repeat(
                asked("", r.source, ""), r.ask_again_h * 3600, r.ask_again_days * 86400, now
            )
        for job in jobs:
            try:
                self.retrieve(job)
            except Exception:  # one study must not stop the others
                log.exception("retrieval for job %d failed unexpectedly", job.id,
                              extra={"job": job.id})  # fmt: skip
        return len(jobs)

    def _t1c_file(self, job: Job) -> Path:
        for js in self.store.job_series(job.id):
            if js.role == "t1c":
                paths = self.store.series_paths(js.series.series_instance_uid)
                if paths:
                    return self.settings.storage.spool_dir / paths[0]
        raise InputError("the T1-Gd's files are no longer in the spool")

    def retrieve(self, job: Job) -> None:
        r = self.settings.retrieve
        receiver = self.receiver  # one pass, one method (a reload may change it meanwhile)
        study = job.study_instance_uid
        extra = {"job": job.id}
        try:
            patient = patient_of(self._t1c_file(job))
        except InputError as exc:
            self._fail(job, f"not asked: {exc}")
            return
        try:
            with query_retrieve(
                self.peer, self.settings.sending.calling_ae_title, r.move_timeout_s, self.audit,
                receiver,
            ) as qr:  # fmt: skip
                searched, studies = self._studies(qr, study, patient)
                series = [s for uid in studies for s in self._rt_series(qr, uid)]
                wanted = [s for s in series if not self.store.series_paths(s.series_instance_uid)]
                if not wanted:
                    held = f"; the node has the {len(series)} it holds" if series else ""
                    self._fail(
                        job,
                        "it holds no RT structure set, dose or registration of the patient that "
                        f"the node lacks ({searched}{held})",
                    )
                    return
                results, failures, skipped = self._each(qr, wanted, receiver is not None)
        except RetrieveError as exc:  # a failed job asked about again waits for the next time
            self._attempt_failed(job, str(exc), permanent=exc.permanent or job.state == FAILED)
            return
        # what came is what the receiver stored of each series, not what the PACS reported
        came = self._came(results, wait=receiver is None)
        total = sum(came)
        moved = "; ".join(self._moved(s, m, n) for (s, m), n in zip(results, came, strict=True))
        # a series that came, or a C-MOVE that completed sub-operations, shows that the PACS
        # knows the node as a move destination: another series' 0xC000 is about that series;
        # else the hint is said once, after the series it concerns
        known = any(came) or any(m.completed for _, m in results)
        why = [exc.plain for _, exc in failures]
        hinted = [i for i, (_, exc) in enumerate(failures) if exc.destination_hint]
        if hinted and not known:
            why[hinted[-1]] += failures[hinted[-1]][1].destination_hint
        if skipped:
            why.append(
                "not asked, the association having ended: "
                + "; ".join(f"{s} of study {s.study_instance_uid}" for s in skipped)
            )
        for said in why:  # each series not retrieved, and why
            log.warning("retrieval for job %d: %s", job.id, said, extra=extra)
        if not total:
            reasons = [self._none_came(moved, results, receiver is not None)] if results else []
            self._attempt_failed(
                job, "; ".join(reasons + why),
                # only a refusal of every series that asking again cannot help is permanent
                permanent=job.state == FAILED
                or (not results and not skipped and all(e.permanent for _, e in failures)),
            )  # fmt: skip
            return
        outcome = f"{total} instance(s) came ({moved})"
        if why:
            outcome += f"; {len(failures) + len(skipped)} series not retrieved: " + "; ".join(why)
        log.info("retrieval for study of job %d: %s", job.id, outcome, extra=extra)
        self.store.finish_retrieval(job.id, study, outcome)

    def _each(
        self, qr: Asker, wanted: list[RemoteSeries], get: bool
    ) -> tuple[
        list[tuple[RemoteSeries, MoveResult]], list[tuple[RemoteSeries, RetrieveError]],
        list[RemoteSeries],
    ]:  # fmt: skip
        """Ask for each series on its own, the structure set first (the role a study cannot
        do without; a dose or registration the PACS cannot send must not keep it away): the
        results, the series refused with why, and those not asked once the association ended
        (the PACS aborted it, or did not answer)."""
        ordered = sorted(wanted, key=lambda s: RT_MODALITIES.index(s.modality))
        results: list[tuple[RemoteSeries, MoveResult]] = []
        failures: list[tuple[RemoteSeries, RetrieveError]] = []
        for i, series in enumerate(ordered):
            try:
                if get:
                    results.append((series, qr.get(series)))
                else:
                    results.append((series, qr.move(series, self.settings.node.ae_title)))
            except RetrieveError as exc:
                failures.append((series, exc))
                if exc.ended:
                    return results, failures, ordered[i + 1 :]
        return results, failures, []

    def _came(self, results: list[tuple[RemoteSeries, MoveResult]], *, wait: bool) -> list[int]:
        """How many instances of each series the receiver holds: what came, whatever the PACS
        reported. A PACS that moves asynchronously (Orthanc with SynchronousCMove false)
        answers a C-MOVE "Completed" before it sends, or though it never does: with ``wait``
        (C-MOVE; a C-GET or WADO-RS brings them before it answers) the retriever waits for
        what it reported, up to ``retrieve.move_timeout_s``, or :data:`ARRIVAL_SETTLE_S` after
        the last instance that came when some did."""
        deadline = time.monotonic() + self.settings.retrieve.move_timeout_s
        last: list[int] = []
        changed = time.monotonic()
        while True:
            came = [len(self.store.series_paths(s.series_instance_uid)) for s, _ in results]
            short = any(
                n < m.completed + m.warning for (_, m), n in zip(results, came, strict=True)
            )
            now = time.monotonic()
            if came != last:
                last, changed = came, now
            settled = sum(came) > 0 and now - changed >= ARRIVAL_SETTLE_S
            if not (wait and short) or now >= deadline or settled or self.stopping():
                return came
            self._stop.wait(ARRIVAL_POLL_S)

    def _moved(self, series: RemoteSeries, m: MoveResult, came: int) -> str:
        """What came of ``series``, and what the PACS reported when it differs."""
        reported = m.completed + m.warning
        return (
            f"{series} of study {series.study_instance_uid}: {came} came"
            + (f" of {reported} reported sent" if m.counted and reported != came else "")
            + (f", {m.failed} failed" if m.failed else "")
        )

    def _none_came(
        self, moved: str, results: list[tuple[RemoteSeries, MoveResult]], get: bool
    ) -> str:
        """Why none of the series the PACS answered for came."""
        reported = sum(m.completed + m.warning for _, m in results)
        failed = sum(m.failed for _, m in results)
        refused = "" if get else f"node.allowed_callers lets {self.peer.ae_title} in and "
        said = (
            f"{self.peer} reported {reported} instance(s) sent, but none came within "
            f"{self.settings.retrieve.move_timeout_s:g} s (retrieve.move_timeout_s) ({moved}): "
            "a PACS that moves asynchronously (Orthanc with SynchronousCMove false) answers "
            "before it sends, and the PACS's log says whether it could"
            if reported
            else f"{self.peer} sent none of the {failed} instance(s) of {moved}"
        )
        return (
            f"{said}: check that {refused}the node has disk space (its log says why it refused "
            "them)"
        )

    def _studies(self, qr: Asker, study: str, patient: Patient) -> tuple[str, list[str]]:
        """Which studies were searched, in words, and the patient's studies that may hold RT
        objects, newest first, at most ``retrieve.max_studies``."""
        r = self.settings.retrieve
        if self.settings.assembly.link_rt_days <= 0:  # another study's objects are not linked
            return "the study itself: assembly.link_rt_days is 0", [study]
        keys = {"IssuerOfPatientID": ""} if patient.issuer else {}
        found = qr.find(
            _identifier(
                "STUDY",
                PatientID=patient.patient_id,
                StudyInstanceUID="",
                StudyDate=date_range(patient.study_date, r.window_days),
                ModalitiesInStudy="",
                **keys,
            )
        )
        ordered = rt_studies(found, patient)[: r.max_studies]
        window = f" within {r.window_days:g} days of the study's date" if patient.study_date else ""
        return f"{len(found)} study(ies) of the patient{window}", ordered

    def _rt_series(self, qr: Asker, study: str) -> list[RemoteSeries]:
        found = qr.find(
            _identifier(
                "SERIES",
                StudyInstanceUID=study,
                SeriesInstanceUID="",
                Modality="",
                SeriesDescription="",
                NumberOfSeriesRelatedInstances="",
            )
        )
        out = []
        for ds in found:
            modality = _text(ds, "Modality").upper()
            uid = _text(ds, "SeriesInstanceUID")
            # the node's own predicted RTSTRUCT, stored in the PACS, is never an input
            own = is_labelled_description(_text(ds, "SeriesDescription"))
            if modality in RT_MODALITIES and uid and not own:
                n = _count(ds, "NumberOfSeriesRelatedInstances")
                out.append(
                    RemoteSeries(study, uid, modality, _text(ds, "SeriesDescription"), n or None)
                )
        return out

    def _fail(self, job: Job, outcome: str) -> None:
        source = self.settings.retrieve.source
        level = logging.INFO if job.state == FAILED else logging.WARNING  # asked again
        log.log(level, "retrieval for job %d: %s", job.id, outcome, extra={"job": job.id})
        self.store.finish_retrieval(
            job.id, job.study_instance_uid, outcome,
            failed_reason=asked(job.reason, source, outcome),
        )  # fmt: skip

    def _attempt_failed(self, job: Job, why: str, *, permanent: bool) -> None:
        r = self.settings.retrieve
        attempts = self.store.retrieval_failed_attempt(
            job.id, job.study_instance_uid, time.time() + r.retry_interval_s, why
        )
        if permanent or attempts >= r.attempts:
            self._fail(job, f"{why} (after {attempts} attempt(s))")
            return
        log.warning(
            "retrieval for job %d, attempt %d of %d: %s; trying again in %g s",
            job.id, attempts, r.attempts, why, r.retry_interval_s, extra={"job": job.id},
        )  # fmt: skip
