"""Storage Commitment Push Model (PS3.4 Annex J): ask a PACS to take responsibility for results.

A C-STORE success says the peer received an object; a storage commitment says it keeps it. For a
destination with ``storage_commitment: true`` the outbox sends, once its objects are stored, an
N-ACTION request (Action Type 1) listing them under a new Transaction UID. The PACS answers the
N-ACTION at once and later sends an N-EVENT-REPORT (Event Type 1: every object committed; 2:
some failed, each with a Failure Reason), usually on an association it opens to the node's
receiver (as Orthanc does), which is why the receiver accepts the Storage Commitment SOP class
with the peer in the SCP role; a PACS that reports at once does so on the request's own
association, which waits :data:`SAME_ASSOCIATION_WAIT_S` for it.

This module speaks the protocol (request, report parsing, statuses); the bookkeeping (which
objects wait for which transaction, what a failure does to them) is the outbox's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import Association, build_role, evt
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import build_context

from dicom_node.errors import SendError
from dicom_node.scu import ContextsRejected, Destination, associate, release

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.1)
PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION Action Type ID: request storage commitment
REQUEST_ACTION = 1
#: N-EVENT-REPORT Event Type IDs: every object committed / failures exist
ALL_COMMITTED, FAILURES_EXIST = 1, 2

# N-EVENT-REPORT response statuses (PS3.7 Annex C)
log = logging.getLogger(__name__)

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Failure Reason of an object the PACS says it does not hold: after a C-STORE it acknowledged,
#: a PACS that changes SOP Instance UIDs on arrival (transcoding, re-identification) answers
#: this for every object, however often it is sent again
NO_SUCH_OBJECT_INSTANCE = 0x0112
#: Failure Reason (0008,1197) values of the Failed SOP Sequence (PS3.4 J.3.3.1.1)
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
#: reasons that sending the object again cannot change (the PACS's configuration can)
PERMANENT_REASONS = frozenset({0x0119, 0x0122})

# N-ACTION response statuses that a later request cannot change
_REFUSED_ACTION = {
    0x0112: "no such SOP instance (the Storage Commitment SOP instance is not known)",
    0x0118: "no such SOP class",
    0x0119: "class / instance conflict",
    0x0122: "SOP class not supported",
    0x0123: "no such action",
    0x0124: "not authorised",
}


class CommitmentRefused(SendError):
    """The destination does not take storage commitment requests from us (a configuration
    mismatch: asking again cannot help)."""


class CommitmentAborted(SendError):
    """The destination aborted the association (A-ABORT) right after the N-ACTION, with no
    response: what a PACS that does not take storage commitment requests from our AE title
    may do (Orthanc with ``AllowStorageCommitment`` false, or a calling AE it does not know)
    instead of answering with a status. Once might be anything, so the outbox asks again; the
    same on consecutive tries is a :class:`CommitmentRefused`."""


def refusal(destination: Destination, found: str) -> CommitmentRefused:
    """The error of a destination that does not do storage commitment for us, ``found`` saying
    how it showed it."""
    return CommitmentRefused(
        f"expected {destination} to take storage commitment requests from this node "
        f"(storage_commitment: true), found {found}: enable storage commitment for our AE "
        "title on the PACS, or set storage_commitment: false"
    )


def describe_reason(reason: int | None) -> str:
    if reason is None:
        return "no failure reason given"
    return f"0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown reason')})"


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT: which objects of a transaction the peer committed, which it did not
    (SOP Instance UID and Failure Reason)."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int | None], ...]
    caller: str = ""


class BadReport(ValueError):
    """An N-EVENT-REPORT that is not a storage commitment result; ``status`` answers it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_report(event_type: int | None, info: Dataset | None, caller: str) -> CommitmentReport:
    """The report carried by an N-EVENT-REPORT request, or :class:`BadReport`."""
    if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
        raise BadReport(
            NO_SUCH_EVENT_TYPE,
            f"storage commitment report: expected Event Type ID 1 or 2, found {event_type}",
        )
    transaction = str(getattr(info, "TransactionUID", "") or "").strip() if info else ""
    if not transaction:
        raise BadReport(
            INVALID_ARGUMENT_VALUE,
            "storage commitment report: expected a Transaction UID (0008,1195), found none",
        )
    assert info is not None
    committed = tuple(_uid(item) for item in info.get("ReferencedSOPSequence", []) or [])
    failed = tuple((_uid(item), _reason(item)) for item in info.get("FailedSOPSequence", []) or [])
    if event_type == ALL_COMMITTED and failed:
        raise BadReport(
            INVALID_ARGUMENT_VALUE,
            f"storage commitment report {transaction}: Event Type 1 (all committed) with "
            f"{len(failed)} failed objects",
        )
    return CommitmentReport(transaction, tuple(u for u in committed if u), failed, caller)


def _uid(item: Dataset) -> str:
    return str(getattr(item, "ReferencedSOPInstanceUID", "") or "").strip()


def _reason(item: Dataset) -> int | None:
    value = getattr(item, "FailureReason", None)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


#: how long the association of a storage commitment request stays open after the request was
#: accepted, for a PACS that reports on it at once (most report later, on their own)
SAME_ASSOCIATION_WAIT_S = 1.0


def request(
    destination: Destination,
    transaction_uid: str,
    references: Sequence[tuple[str, str]],
    *,
    calling_ae: str,
    timeout_s: float = 60,
    on_report: Callable[[CommitmentReport], object] | None = None,
    wait_s: float = SAME_ASSOCIATION_WAIT_S,
) -> None:
    """Send one storage commitment request (N-ACTION) for ``references`` (SOP Class UID, SOP
    Instance UID) under ``transaction_uid``.

    Returns when the peer accepted the request (the result comes later, as a report). A PACS
    may report at once, on this association (PS3.4 J.3.3 lets it): with ``on_report``, the
    association waits up to ``wait_s`` for that report and hands it over (pynetdicom dropped
    it while the association was being released). Raises :class:`CommitmentRefused` when the
    peer does not do storage commitment for us, :class:`CommitmentAborted` when it aborted the
    association instead of answering, and :class:`SendError` for anything a later request may
    get past (peer down, timeout, a processing failure).
    """
    reported = threading.Event()
    # how the association ended without a response: pynetdicom returns the same empty status
    # whether the peer aborted (A-ABORT), the connection dropped (A-P-ABORT), or the response
    # timed out (pynetdicom then aborts itself, so ``is_aborted`` is true in every case); only
    # the ACSE primitives received from the peer tell them apart
    ended_by: list[str] = []

    def on_acse(event: Any) -> None:
        if isinstance(event.primitive, A_ABORT):
            ended_by.append("a-abort")
        elif isinstance(event.primitive, A_P_ABORT):
            ended_by.append("a-p-abort")

    def on_event_report(event: Any) -> tuple[int, None]:
        try:
            report = parse_report(
                getattr(event.request, "EventTypeID", None),
                event.event_information,
                destination.ae_title,
            )
        except BadReport as exc:
            log.warning("N-EVENT-REPORT from %s refused (0x%04X): %s", destination, exc.status, exc)
            return exc.status, None
        except Exception as exc:  # pydicom raises many types on malformed data
            log.warning("N-EVENT-REPORT from %s undecodable: %s", destination, exc)
            return INVALID_ARGUMENT_VALUE, None
        try:
            if on_report is not None:
                on_report(report)
        except Exception:  # the PACS may send it again
            log.exception("storage commitment report from %s not recorded", destination)
            return PROCESSING_FAILURE, None
        if report.transaction_uid == transaction_uid:
            reported.set()
        return SUCCESS, None

    handlers: list[Any] = [(evt.EVT_ACSE_RECV, on_acse)]
    if on_report is not None:
        handlers.append((evt.EVT_N_EVENT_REPORT, on_event_report))
    try:
        assoc = _associate(destination, calling_ae, timeout_s, handlers=handlers)
    except ContextsRejected as exc:
        raise refusal(
            destination, "that it accepts no Storage Commitment Push Model context"
        ) from exc
    try:
        ds = Dataset()
        ds.TransactionUID = transaction_uid
        ds.ReferencedSOPSequence = [_reference(c, i) for c, i in references]
        status, _ = assoc.send_n_action(ds, REQUEST_ACTION, PUSH_MODEL, PUSH_MODEL_INSTANCE)
        if on_report is not None and int(getattr(status, "Status", -1)) == SUCCESS:
            reported.wait(wait_s)
    finally:
        release(assoc)
    code = getattr(status, "Status", None)
    if code is None:
        # the association's thread reads the peer's A-ABORT after the N-ACTION call returned:
        # wait for it to end (at once, the association being over) before asking how it ended
        assoc.join(SAME_ASSOCIATION_WAIT_S)
        if "a-abort" in ended_by:
            raise CommitmentAborted(
                f"expected an N-ACTION response from {destination}, found an A-ABORT right "
                "after the request: the PACS aborted the storage commitment request: it may "
                f"not allow storage commitment from AE {calling_ae}"
            )
        if "a-p-abort" in ended_by:
            raise SendError(
                f"expected an N-ACTION response from {destination}, found the connection "
                "closed before one came"
            )
        raise SendError(
            f"expected an N-ACTION response from {destination} within {timeout_s:g} s, found "
            "none (timeout)"
        )
    code = int(code)
    if code == SUCCESS:
        return
    comment = getattr(status, "ErrorComment", "")
    answer = f"N-ACTION status 0x{code:04X}" + (f" ({comment})" if comment else "")
    if code in _REFUSED_ACTION:
        raise refusal(destination, f"{answer}, {_REFUSED_ACTION[code]}")
    raise SendError(f"{destination} answered the storage commitment request with {answer}")


def send_report(
    destination: Destination,
    transaction_uid: str,
    committed: Sequence[tuple[str, str]],
    failed: Sequence[tuple[str, str, int]] = (),
    *,
    calling_ae: str,
    event_type: int | None = None,
    timeout_s: float = 30,
) -> int | None:
    """Report on a storage commitment request the way a PACS does (the SCP side, which the
    local PACS of the demo plays): an N-EVENT-REPORT on a new association to ``destination``,
    proposing the SCP role. ``committed`` lists (SOP Class UID, SOP Instance UID), ``failed``
    the same with a Failure Reason; ``event_type`` defaults to 1 or 2 as they say, and an empty
    ``transaction_uid`` is left out. Returns the response status, None when none came back;
    raises :class:`SendError` when no association could be opened."""
    assoc = _associate(destination, calling_ae, timeout_s, scp_role=True)
    ds = Dataset()
    if transaction_uid:
        ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = [_reference(c, i) for c, i in committed]
    if failed:
        ds.FailedSOPSequence = [_reference(c, i, reason) for c, i, reason in failed]
    kind = event_type if event_type is not None else (FAILURES_EXIST if failed else ALL_COMMITTED)
    try:
        status, _ = assoc.send_n_event_report(ds, kind, PUSH_MODEL, PUSH_MODEL_INSTANCE)
    finally:
        release(assoc)
    code = getattr(status, "Status", None)
    return None if code is None else int(code)


def _associate(
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    *,
    scp_role: bool = False,
    handlers: Sequence[Any] = (),
) -> Association:
    """An association with ``destination`` for the Storage Commitment SOP class, proposing
    this side as its SCP (the reporting side) when ``scp_role``, its events bound to
    ``handlers``."""
    return associate(
        destination,
        [build_context(PUSH_MODEL)],
        calling_ae=calling_ae,
        acse_timeout_s=timeout_s,
        dimse_timeout_s=timeout_s,
        network_timeout_s=timeout_s,
        roles=[build_role(PUSH_MODEL, scp_role=True)] if scp_role else (),
        evt_handlers=handlers,
    )


def _reference(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item
