"""The DICOM receiver: Verification and Storage SCP (pynetdicom).

Handlers are thin: they decide who may associate, check a received dataset is usable, store it
durably and record it, and translate the outcome into a DIMSE status. An instance is answered
0x0000 only after :meth:`Spool.commit` has made it durable (temp file fdatasynced, renamed, its
folder fsynced) and the job store has recorded it; the fdatasync runs while the handler decodes
and checks the data set.

The associations themselves run on :mod:`dicom_node.fastpath` (event-driven reactors instead of
pynetdicom's 1 ms polling loops, direct C-STORE response encoding) when the installed pynetdicom
is a verified version, on pynetdicom's own classes otherwise.

Statuses: 0x0000 success (also for a duplicate, stored once; a copy under another patient is a
correction and replaces the one held), 0xA700 out of resources (low disk:
the sender retries), 0xC210 cannot understand (undecodable or unusable dataset), 0xA900 data
set does not match SOP class (its SOP Class UID is not the request's), 0x0122 SOP class not
supported (the request's SOP class is not the one its presentation context was accepted for),
0x0110 processing failure (the spool or database failed otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import io
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom import uid as sc
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import commitment, fastpath
from dicom_node.audit import (
    ROLE_DESTINATION,
    ROLE_SOURCE,
    AuditTrail,
    NoAuditTrail,
    Participant,
    TransferTally,
)
from dicom_node.commitment import CommitmentReport
from dicom_node.errors import GlioforecastError, InputError, OutOfSpaceError, StorageError
from dicom_node.health import stop_serving
from dicom_node.instance import InstanceInfo, check_pixel_data
from dicom_node.jobs import QUEUED, JobStore
from dicom_node.listener import ConnectionLimit, HandshakeInThread, cannot_listen, peer_host
from dicom_node.refusals import Refusals
from dicom_node.rejections import apply_rejection
from dicom_node.scu import VERIFICATION
from dicom_node.settings import AllowedCaller, NodeSettings
from dicom_node.spool import Spool, Staged
from dicom_node.tls_profile import new_context

log = logging.getLogger(__name__)

# Patient identifiers must never reach the logs.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

STORAGE_CLASSES = (
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.EnhancedMRColorImageStorage,
    sc.RTStructureSetStorage,
    sc.RTDoseStorage,
    sc.RTPlanStorage,
    sc.RTIonPlanStorage,
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.KeyObjectSelectionDocumentStorage,
    # the planning system's registration of the MR to the planning CT: places a structure set
    # or dose drawn on the CT's frame on the MR's (dicom_node.convert.spatial_registration);
    # deformable ones are stored, not used
    sc.SpatialRegistrationStorage,
    sc.DeformableSpatialRegistrationStorage,
    # readers' outlines: stored for training (inference.dicom_cohort), no role in prediction
    sc.SegmentationStorage,
    # what the node itself sends (sr_writer), for a PACS that forwards a whole study back: stored,
    # no role, and the node's own labelled series do not reopen the study (dicom_node.jobs)
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.ComprehensiveSRStorage,
    sc.Comprehensive3DSRStorage,
    sc.EnhancedSRStorage,
)

# what readers and other systems add to a study once it was read (presentation states, key
# images, reports, outlines, screenshots): stored, but no reason to predict again, unless a role
# rule takes the class (dicom_node.service computes the set). An IOCM rejection note, a Key
# Object Selection too, reopens the studies it concerns itself (dicom_node.rejections).
ANNOTATION_CLASSES = frozenset(
    {
        sc.GrayscaleSoftcopyPresentationStateStorage,
        sc.KeyObjectSelectionDocumentStorage,
        sc.ComprehensiveSRStorage,
        sc.Comprehensive3DSRStorage,
        sc.EnhancedSRStorage,
        sc.SecondaryCaptureImageStorage,
        sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
        sc.SegmentationStorage,
    }
)

TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old scanners)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    # High-Throughput JPEG 2000 (PS3.5 A.4.11, 2023): decoded by pylibjpeg-openjpeg
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless Only
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options, Lossless Only
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)

#: the transfer syntaxes above that lose information: accepted only when the sender proposes
#: no lossless one in the same presentation context
LOSSY_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203",
})  # fmt: skip


def preferred_transfer_syntaxes(proposed: Sequence[Sequence[str]]) -> list[str]:
    """The node's transfer syntaxes in the order it accepts them for a SOP class whose
    presentation contexts propose ``proposed`` (one list per context): the first lossless
    syntax of each context (in the order of the contexts), then the other lossless ones in
    the sender's order, then its lossy ones, then those it did not propose (never chosen).
    pynetdicom takes, for each context, the first of these that it proposes: so each context
    gets its own first lossless syntax (dcmsend proposes one context per encoding of its files,
    each with the uncompressed syntaxes after it: with all of them merged in the sender's order,
    the second context got Explicit VR Little Endian before its JPEG Lossless, and dcmsend
    decompressed). Taken in the acceptor's own order (Explicit VR Little Endian first), a
    sender that proposed its JPEG Lossless images and an uncompressed syntax in one context had
    to decompress them, and one that cannot (dcmtk ``storescu +C`` without the codecs) failed
    to send them."""
    contexts = [[ts for ts in cx if ts in TRANSFER_SYNTAXES] for cx in proposed]
    firsts = [next(ts for ts in cx if ts not in LOSSY_TRANSFER_SYNTAXES) for cx in contexts
              if any(ts not in LOSSY_TRANSFER_SYNTAXES for ts in cx)]  # fmt: skip
    offered = [ts for cx in contexts for ts in cx]
    lossless = [ts for ts in [*firsts, *offered] if ts not in LOSSY_TRANSFER_SYNTAXES]
    lossy = [ts for ts in offered if ts in LOSSY_TRANSFER_SYNTAXES]
    return list(dict.fromkeys([*lossless, *lossy, *TRANSFER_SYNTAXES]))


SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
#: how often the receiver re-reads the number of queued jobs, s
QUEUE_RECHECK_S = 1.0
CANNOT_UNDERSTAND = 0xC210
DATASET_NOT_CLASS = 0xA900
CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ: result 1 = rejected-permanent; source 1 = service user;
# reason 3 = calling AE title not recognised, 7 = called AE title not recognised.
_REJECT_PERMANENT, _SOURCE_USER = 0x01, 0x01
_CALLING_NOT_RECOGNISED, _CALLED_NOT_RECOGNISED = 0x03, 0x07
# result 2 = rejected-transient; source 3 = service provider (presentation related);
# reason 2 = local limit exceeded
_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02

#: pynetdicom's own limit on associations, which also counts connections that have sent no
#: A-ASSOCIATE-RQ yet: set out of reach, the receiver counts requested associations itself
_UNBOUNDED_ASSOCIATIONS = 1 << 30


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(peer_host(host).split("%", 1)[0])
    except ValueError:
        return None


def host_allowed(hosts: tuple[str, ...], host: str) -> bool:
    """True when ``host`` is one of ``hosts`` (addresses or networks), or ``hosts`` is empty."""
    if not hosts:
        return True
    addr = _address(host)
    return addr is not None and any(addr in ipaddress.ip_network(h, strict=False) for h in hosts)


def _certificate_name(name: str) -> str:
    """``name`` as compared: an IP address in its canonical form, anything else in lower case."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name.strip()))
    return name.strip().lower()


def certificate_names(sock: Any) -> frozenset[str] | None:
    """The names of a connection's verified TLS client certificate, or None when the connection
    is not TLS or the client presented no certificate: its DNS and IP subject alternative names,
    or its subject's common name when it has none. As RFC 6125 (section 6.4.4) has it, a
    certificate with such names is not matched on its common name: a CA may vouch for
    alternative names and let the common name be any label."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())  # ((("commonName", "mr1"),), ...)
    alternative: Any = cert.get("subjectAltName", ())  # (("DNS", "mr1.example"), ...)
    names = [value for kind, value in alternative if kind in ("DNS", "IP Address")]
    if not names:
        names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return frozenset(map(_certificate_name, names))


def certificate_allowed(required: tuple[str, ...], presented: frozenset[str] | None) -> bool:
    """True when ``required`` is empty, or the client's certificate carries one of its names."""
    if not required:
        return True
    return presented is not None and not presented.isdisjoint(map(_certificate_name, required))


def certificate_mismatch(required: set[str], presented: frozenset[str] | None) -> str:
    """What was expected of a client's certificate and what was found, in words."""
    found = (
        "no client certificate"
        if not presented
        else "a certificate named " + ", ".join(sorted(presented))
    )
    return f"a client certificate named {' or '.join(sorted(required))}, found {found}"


def caller_refusal(
    callers: tuple[AllowedCaller, ...],
    ae_title: str,
    host: str,
    certificate: frozenset[str] | None,
    refuse_unknown: bool = True,
) -> str | None:
    """Why a caller with this AE title, at ``host``, with this client certificate may not
    associate (None when it may). A caller that no rule names is refused when
    ``refuse_unknown``; one that rules name must hold a certificate one of them asks for, even
    where unknown callers are let in (otherwise anyone could take its AE title)."""
    rules = [
        c
        for c in callers
        if (c.ae_title == "*" or c.ae_title.strip() == ae_title.strip())
        and host_allowed(c.hosts, host)
    ]
    if not rules:
        if not refuse_unknown:
            return None
        return f"calling AE title {ae_title!r} at {host} is not in node.allowed_callers"
    if any(certificate_allowed(c.certificate_names, certificate) for c in rules):
        return None
    if not refuse_unknown and all(c.ae_title == "*" for c in rules):
        return None  # a rule for everyone does not name this caller
    wanted = {n for c in rules for n in c.certificate_names}
    return (
        f"calling AE title {ae_title!r} at {host}: node.allowed_callers expects "
        + certificate_mismatch(wanted, certificate)
    )


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, element)
    if vr == b"OB":  # long form: two reserved bytes, 32-bit length
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information for a received data set.

    The same bytes as pynetdicom's ``Event.encoded_dataset()`` puts before the data set
    (``create_file_meta`` + ``encode_file_meta``), built directly: that path encodes seven
    elements through pydicom's writer and then copies the whole instance to join them.
    Like pydicom, refuses an empty SOP Class, SOP Instance or Transfer Syntax UID.
    """
    if not (sop_class_uid and sop_instance_uid and transfer_syntax_uid):
        raise ValueError(
            "File Meta Information needs the SOP Class, SOP Instance and Transfer Syntax UIDs; "
            f"found {sop_class_uid!r}, {sop_instance_uid!r}, {transfer_syntax_uid!r}"
        )
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0")),
            _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


class _NotTheClass(InputError):
    """The data set's SOP Class UID is not the one its C-STORE request names."""


def _class_name(uid: str) -> str:
    """A SOP class UID with its name where pydicom knows it: "1.2...4 (MR Image Storage)"."""
    name = sc.UID(uid).name
    return uid if not uid or name == uid else f"{uid} ({name})"


def _sender(assoc: Any) -> tuple[str, str]:
    """The AE title and address of the end that sends the instances: the requestor, or the
    acceptor on an association the node requested (a C-GET's sub-operations)."""
    side = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(side.ae_title).strip(), str(side.address)


@dataclass(frozen=True)
class _End:
    ae_title: str
    address: str


@dataclass(frozen=True)
class Part10:
    """A DICOM Part 10 file read: its data set, its transfer syntax, its SOP Class and
    Instance UIDs, and where the data set begins in ``data``.

    The UIDs are the data set's, as a C-STORE sender puts them in its request (dcmtk's
    dcmsend does), and the meta information's only where the data set has none: a tool that
    rewrote the data set's UIDs (an anonymiser) often leaves the old ones in the meta, and the
    file is stored with a meta made anew either way."""

    data: bytes
    dataset: Dataset
    transfer_syntax: str
    sop_class: str
    sop_instance: str
    offset: int

    @classmethod
    def read(cls, data: bytes) -> Part10:
        """Read ``data``; raises (:class:`InputError` or pydicom's errors) on what is not a
        Part 10 file."""
        if data[128:132] != b"DICM":
            raise InputError("no DICM prefix at byte 128")
        ds = dcmread(io.BytesIO(data))
        meta = ds.file_meta
        length = int(meta.get("FileMetaInformationGroupLength", -1))
        if length < 0:
            raise InputError("expected File Meta Information Group Length, found none")
        # the data set follows the preamble, DICM, the group length element (12 bytes) and
        # the rest of the meta group
        sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID", "")
        sop_instance = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID", "")
        return cls(
            data, ds, str(meta.TransferSyntaxUID), str(sop_class), str(sop_instance),
            132 + 12 + length,
        )  # fmt: skip


class Origin:
    """Where instances come from when no association brings them (a DICOMweb retrieval):
    :func:`_sender` and the audit trail read it as the sending end of one."""

    is_requestor = True

    def __init__(self, name: str, host: str) -> None:
        self.acceptor = _End(name, host)


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        # Error Comment is LO: at most 64 characters
        ds.ErrorComment = comment[:64]
    return ds


class _Server(ConnectionLimit, HandshakeInThread, ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake in each connection's thread and a
    cap on the connections it holds."""

    listener = "DICOM receiver"


@dataclass
class _Received:
    """What one association delivered, for the audit trail."""

    calling: str
    host: str
    certificate: frozenset[str] | None = None  # the names of its TLS client certificate
    tally: TransferTally = field(default_factory=TransferTally)


@dataclass
class _Arrivals:
    """What one open association of a sender stored, for assembly and the log."""

    #: the studies it stored new instances of, with when it stored the last (monotonic)
    studies: dict[str, float] = field(default_factory=dict)
    #: the corrected copies (another patient identity) it stored, by study
    corrected: collections.Counter[str] = field(default_factory=collections.Counter)
    stored: int = 0  # instances stored (duplicates included)


class StorageSCP:
    """Receives instances into the spool and records them in the job store."""

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        store: JobStore,
        secret: bytes,
        ssl_context: ssl.SSLContext | None = None,
        max_queued_jobs: int | None = None,
        commitment_reports: Callable[[CommitmentReport], object] | None = None,
        audit: AuditTrail | NoAuditTrail | None = None,
        inert_sop_classes: frozenset[str] = ANNOTATION_CLASSES,
        sending_ae_title: str = "",
    ) -> None:
        self.settings = settings
        #: the AE title the node sends results as (sending.calling_ae_title), also taken as a
        #: called AE title: a PACS sends its storage commitment reports to the AE title that
        #: asked (PS3.4 J.3.3), which need not be the receiver's
        self.sending_ae_title = sending_ae_title
        self.audit = audit or NoAuditTrail()
        #: refusals of every listener of the node, logged and audited once a minute per sender
        #: and reason (the node's main loop flushes it)
        self.refusals = Refusals(self.audit.refused)
        #: associations refused, by why (every one: the log and audit trail sum them up)
        self.associations_refused: collections.Counter[str] = collections.Counter()
        #: why the last instance could not be written, while none is ('' when they are)
        self.spool_failure = ""
        #: the SOP classes refused at negotiation of each open association that has stored
        #: nothing yet (by id of the association): said when it ends with nothing stored
        self._refused_classes: dict[int, list[str]] = {}
        # instances of these classes do not reopen a study (they cannot change its prediction)
        self.inert_sop_classes = inert_sop_classes
        # what each open association delivered, for the audit trail (by id of the association)
        self._received: dict[int, _Received] = {}
        self._received_lock = threading.Lock()
        # what each open association of a sender stored (by id of the association): assembly
        # waits for the studies it is sending (studies_arriving)
        self._arrivals: dict[int, _Arrivals] = {}
        self._arriving_lock = threading.Lock()
        # where storage commitment reports go (the outbox); None: the SOP class is not offered
        self.commitment_reports = commitment_reports
        self.spool = spool
        self.store = store
        self.secret = secret
        self.ssl_context = ssl_context
        self.max_queued_jobs = max_queued_jobs
        self._queue_lock = threading.Lock()
        self._queue_seen: tuple[float, int] = (-1e9, 0)  # (monotonic time, queued jobs)
        self.server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        # node.max_associations is enforced in _on_requested, on associations only: counted by
        # pynetdicom, a few connections that say nothing (until node.acse_timeout_s) would
        # lock every sender out
        ae.maximum_associations = _UNBOUNDED_ASSOCIATIONS
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.dimse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        ae.add_supported_context(VERIFICATION)
        for cls in STORAGE_CLASSES:
            ae.add_supported_context(cls, list(TRANSFER_SYNTAXES))
        if self.commitment_reports is not None:
            # the PACS opens an association to report, in the SCP role of the SOP class
            ae.add_supported_context(commitment.PUSH_MODEL, scu_role=False, scp_role=True)
        return ae

    # ------------------------------------------------------------------ handlers

    def _on_open(self, event: Any) -> None:
        # Without TCP_NODELAY, Nagle's algorithm and delayed ACKs cost ~40 ms per C-STORE.
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        requested = str(assoc.requestor.primitive.called_ae_title).strip()
        host = assoc.requestor.address
        titles = [self.settings.ae_title.strip()]
        if self.sending_ae_title.strip() not in ("", titles[0]):
            titles.append(self.sending_ae_title.strip())
        if requested and requested not in titles:
            self.associations_refused["called_ae_title"] += 1
            expected = " or ".join(repr(t) for t in titles)
            why = f"called AE title {requested!r}, expected {expected}"
            self.refusals.report(
                ("called", host, calling, requested),
                f"association from {calling} ({host}) refused: {why}",
                f"association refused: {why}", host, calling,
            )  # fmt: skip
            self._reject(assoc, _CALLED_NOT_RECOGNISED)
            return
        certificate = certificate_names(getattr(assoc.dul.socket, "socket", None))
        refusal = caller_refusal(
            self.settings.allowed_callers, calling, host, certificate,
            self.settings.refuse_unknown_callers,
        )  # fmt: skip
        if refusal is not None:
            self.associations_refused["calling_ae_title"] += 1
            self.refusals.report(
                ("calling", host, calling, refusal), f"association refused: {refusal}",
                f"association refused: {refusal}", host, calling,
            )  # fmt: skip
            self._reject(assoc, _CALLING_NOT_RECOGNISED)
            return
        associations = self._requested_associations()
        if associations > self.settings.max_associations:
            self.associations_refused["max_associations"] += 1
            self.refusals.report(
                ("busy", host, calling),
                f"association from {calling} at {host} refused (rejected-transient, local limit "
                f"exceeded): {associations - 1} associations open, node.max_associations is "
                f"{self.settings.max_associations}",
            )  # fmt: skip
            self._reject(assoc, _LOCAL_LIMIT_EXCEEDED, _REJECT_TRANSIENT, _SOURCE_PRESENTATION)
            return
        self._prefer_senders_syntaxes(assoc)
        named = f" (client certificate {', '.join(sorted(certificate))})" if certificate else ""
        log.info("association from %s at %s accepted%s", calling, host, named)
        if self.audit.enabled:
            with self._received_lock:
                self._received[id(assoc)] = _Received(calling, host, certificate)

    @staticmethod
    def _prefer_senders_syntaxes(assoc: Any) -> None:
        """Order the association's transfer syntaxes for each storage SOP class the sender
        proposes as :func:`preferred_transfer_syntaxes` (before pynetdicom negotiates)."""
        proposed: dict[str, list[list[str]]] = {}
        for cx in assoc.requestor.primitive.presentation_context_definition_list or ():
            proposed.setdefault(str(cx.abstract_syntax), []).append(
                list(map(str, cx.transfer_syntax))
            )
        contexts = assoc.acceptor.supported_contexts
        for cx in contexts:
            offered = proposed.get(str(cx.abstract_syntax))
            if offered and set(map(str, cx.transfer_syntax)) == set(TRANSFER_SYNTAXES):
                cx.transfer_syntax = preferred_transfer_syntaxes(offered)
        assoc.acceptor.supported_contexts = contexts

    def connection_limits(self) -> tuple[int, int]:
        """The connections a listener of the node holds at most, in all and from one address
        (read at each connection: a reload changes them)."""
        return self.settings.max_connections, self.settings.max_connections_per_host

    def _on_accepted(self, event: Any) -> None:
        """Say which presentation contexts negotiation refused: at once those of a SOP class
        the node takes in no transfer syntax the sender proposed; those of a SOP class it does
        not take only if the association ends with nothing stored (a sender proposes many
        classes it will not send: dcmtk storescu 128)."""
        assoc = event.assoc
        calling, host = _sender(assoc)
        with self._arriving_lock:  # made here, so that a store ending after the close does
            self._arrivals[id(assoc)] = _Arrivals()  # not make it again (and hold its study)
        no_syntax: dict[str, set[str]] = {}
        not_taken: set[str] = set()
        for cx in assoc.rejected_contexts:
            name = sc.UID(str(cx.abstract_syntax)).name
            if cx.result == 0x04:  # transfer syntaxes not supported
                no_syntax.setdefault(name, set()).update(
                    sc.UID(str(ts)).name for ts in cx.transfer_syntax
                )
            else:
                not_taken.add(name)
        if no_syntax:
            said = "; ".join(
                f"{name} in {', '.join(sorted(ts))}" for name, ts in sorted(no_syntax.items())
            )
            self.refusals.report(
                ("syntaxes", host, calling, said),
                f"association from {calling} at {host}: presentation contexts refused, no "
                f"transfer syntax the node takes (docs/CONFORMANCE.md): {said}",
            )  # fmt: skip
        if not_taken:
            self._refused_classes[id(assoc)] = sorted(not_taken)

    def _on_close(self, event: Any) -> None:
        """The association's connection closed: its studies go to the audit trail; if it
        stored nothing, the SOP classes refused at its negotiation are said."""
        assoc = event.assoc
        with self._arriving_lock:
            arrivals = self._arrivals.pop(id(assoc), None)
        if arrivals is not None:
            calling, host = _sender(assoc)
            for study, count in sorted(arrivals.corrected.items()):
                if count > 1:  # the first was said as it came
                    log.warning(
                        "%d instance(s) of study %s re-sent by %s under another patient "
                        "identity (corrected copies) replaced those held", count, study, calling,
                    )  # fmt: skip
            if arrivals.stored:
                # an abort mid-study explains a job that then lacks slices or series
                log.info(
                    "association from %s (%s) %s: %d instance(s) stored, of %d study(ies) "
                    "with new instances", calling, host,
                    "aborted" if assoc.is_aborted else "ended", arrivals.stored,
                    len(arrivals.studies),
                )  # fmt: skip
        classes = self._refused_classes.pop(id(assoc), None)
        if classes and assoc.is_acceptor and assoc.requestor.primitive is not None:
            calling, host = _sender(assoc)
            more = f" and {len(classes) - 40} more" if len(classes) > 40 else ""
            self.refusals.report(
                ("classes", host, calling, tuple(classes)),
                f"association from {calling} at {host} stored nothing; of what it proposed, the "
                f"node refused {len(classes)} SOP class{'es' if len(classes) > 1 else ''} it "
                f"does not take: {', '.join(classes[:40])}{more}",
            )  # fmt: skip
        if self.audit.enabled:
            self.sub_operations_ended(assoc)

    def sub_operations_from(
        self, assoc: Any, ae_title: str, host: str, certificate: frozenset[str] | None = None
    ) -> None:
        """``assoc``, an association the node requested, brings instances from ``ae_title``
        at ``host`` (the C-STORE sub-operations of a C-GET, :mod:`dicom_node.retrieve`; a
        STOW-RS request, with the names of its client ``certificate``): they are received as
        the receiver's are, and audited once :meth:`sub_operations_ended`."""
        if self.audit.enabled:
            with self._received_lock:
                self._received[id(assoc)] = _Received(ae_title, host, certificate)

    def sub_operations_ended(self, assoc: Any) -> None:
        """What ``assoc`` delivered goes to the audit trail."""
        with self._received_lock:
            received = self._received.pop(id(assoc), None)
        if received is None:
            return
        names = ", ".join(sorted(received.certificate or ()))
        sender = Participant(received.calling, received.host, True, ROLE_SOURCE, user_name=names)
        node = Participant(self.settings.ae_title, self.audit.node.host, False, ROLE_DESTINATION)
        self.audit.transferred(sender, node, received.tally)

    def _audit_instance(self, assoc: Any, ds: Dataset, sop_class: str, error: str = "") -> None:
        """Count one instance for the audit trail: stored, or refused with ``error``."""
        if not self.audit.enabled:  # the C-STORE path: nothing to do without an audit trail
            return
        with self._received_lock:
            received = self._received.get(id(assoc))
        if received is None:
            return
        received.tally.add(ds, sop_class, error)

    @staticmethod
    def _reject(
        assoc: Any, diagnostic: int, result: int = _REJECT_PERMANENT, source: int = _SOURCE_USER
    ) -> None:
        assoc.acse.send_reject(result, source, diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # lets the DUL send the A-ASSOCIATE-RJ before the socket closes

    def _requested_associations(self) -> int:
        """Associations of this receiver that sent their A-ASSOCIATE-RQ (this one included)
        and are neither refused nor over: what node.max_associations limits."""
        return sum(
            1
            for a in self.ae.active_associations
            if a.is_acceptor
            and a.requestor.primitive is not None
            and not (a.is_rejected or a.is_aborted or a.is_released)
        )

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_commitment_report(self, event: Any) -> tuple[int, None]:
        """A PACS's storage commitment report (N-EVENT-REPORT) on results we sent it."""
        caller = event.assoc.requestor.ae_title.strip()
        assert self.commitment_reports is not None
        try:
            report = commitment.parse_report(
                getattr(event.request, "EventTypeID", None), event.event_information, caller
            )
        except commitment.BadReport as exc:
            log.warning("N-EVENT-REPORT from %s refused (0x%04X): %s", caller, exc.status, exc)
            return exc.status, None
        except Exception as exc:  # pydicom raises many types on malformed data
            log.warning("N-EVENT-REPORT from %s undecodable: %s", caller, exc)
            return commitment.INVALID_ARGUMENT_VALUE, None
        try:
            self.commitment_reports(report)
        except Exception:  # the PACS may send it again
            log.exception("storage commitment report from %s not recorded (0x0110)", caller)
            return commitment.PROCESSING_FAILURE, None
        return SUCCESS, None

    def _on_commitment_request(self, event: Any) -> tuple[int, None]:
        """A sender asking the node to commit to keeping what it sent (a scanner routing to the
        node with storage commitment on): refused, the node is no archive (retention removes
        what it received)."""
        caller = event.assoc.requestor.ae_title.strip()
        log.warning(
            "storage commitment request from %s refused (0x0122): the node does not keep what "
            "it receives; ask the PACS for storage commitment instead",
            caller,
        )
        return commitment.SOP_CLASS_NOT_SUPPORTED, None

    def _queue_full(self) -> str:
        """Why new instances must wait (the job queue is at its bound), or ''; the count of
        queued jobs is read from the store at most once a second."""
        if self.max_queued_jobs is None:
            return ""
        with self._queue_lock:
            when, queued = self._queue_seen
            now = time.monotonic()
            if now - when >= QUEUE_RECHECK_S:
                queued = self.store.count_in_state(QUEUED)
                self._queue_seen = (now, queued)
        if queued < self.max_queued_jobs:
            return ""
        return f"job queue full ({queued} >= {self.max_queued_jobs}); retry later"

    def on_store(self, event: Any) -> Dataset | int:
        """Store one instance of a C-STORE request (the receiver's, or a C-GET's
        sub-operation); answer only once it is durable and recorded."""
        request = event.request
        if self._refused_classes:  # it sends something after all
            self._refused_classes.pop(id(event.assoc), None)
        requested, accepted = str(request.AffectedSOPClassUID or ""), event.context.abstract_syntax
        if requested != accepted:
            # pynetdicom serves a request by its own SOP class, whatever the context it came
            # on: one the node did not accept (or accepted in another context) is refused
            calling = _sender(event.assoc)[0]
            reason = (
                f"C-STORE of SOP class {_class_name(requested)} on presentation context "
                f"{event.context.context_id}, accepted for {_class_name(accepted)}"
            )
            log.warning("instance from %s refused (0x0122): %s", calling, reason)
            return _status(CLASS_NOT_SUPPORTED, reason)
        return self._store(
            event.assoc, str(event.context.transfer_syntax),
            str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
            request.DataSet, lambda: event.dataset,
        )  # fmt: skip

    def store_part10(self, data: bytes, origin: Origin) -> Dataset | int:
        """Store one Part 10 file that came another way than C-STORE (a WADO-RS part), as
        the receiver stores an instance ``origin`` sent (:class:`Origin`, audited once
        :meth:`sub_operations_ended`); the status is the one a C-STORE would have had."""
        try:
            part = Part10.read(data)
        except Exception as exc:  # pydicom raises many types on malformed data
            log.warning("instance from %s undecodable (0xC210): %s", _sender(origin)[0], exc)
            return _status(CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {exc}")
        return self.store_read(part, origin)

    def store_read(self, part: Part10, origin: Origin) -> Dataset | int:
        """Store a Part 10 file already read (:meth:`Part10.read`), as :meth:`store_part10`."""
        body = io.BytesIO(part.data[part.offset :])
        return self._store(
            origin, part.transfer_syntax, part.sop_class, part.sop_instance, body,
            lambda: part.dataset,
        )  # fmt: skip

    def _store(
        self, assoc: Any, tsyntax: str, sop_class: str, sop_instance: str, data: io.BytesIO,
        decode: Callable[[], Dataset],
    ) -> Dataset | int:  # fmt: skip
        """Store one instance: ``data``, its encoded data set, and ``decode`` that gives it.

        The received bytes are written first and their ``fdatasync`` runs in the spool's
        worker thread while this thread decodes and checks the data set; the file is renamed
        into its series folder (and the folder fsynced) only when the instance is good.
        """
        calling, host = _sender(assoc)
        full = self._queue_full()
        if full:
            log.warning("instance from %s deferred (0xA700): %s", calling, full)
            return _status(OUT_OF_RESOURCES, full)
        staged: Staged | None = None
        stage_error: Exception | None = None
        ds: Dataset | None = None
        try:
            header = part10_header(sop_class, sop_instance, tsyntax)
            with data.getbuffer() as body:  # the received bytes, not copied
                staged = self.spool.stage((header, body))
        except Exception as exc:  # answered below, once the data set has been checked
            stage_error = exc
        try:
            ds = decode()
            info = InstanceInfo.from_dataset(ds, tsyntax, self.secret)
            check_pixel_data(ds, tsyntax)
            if sop_instance and sop_instance != info.sop_instance_uid:
                raise InputError(
                    f"SOPInstanceUID {info.sop_instance_uid} differs from the request's "
                    f"Affected (or the file's Media Storage) SOP Instance UID {sop_instance}"
                )
            if sop_class and sop_class != info.sop_class_uid:
                raise _NotTheClass(
                    f"SOPClassUID {_class_name(info.sop_class_uid)} differs from the "
                    f"request's Affected SOP Class UID {_class_name(sop_class)}"
                )
        except Exception as exc:
            if staged is not None:
                self.spool.discard(staged)
            if isinstance(exc, _NotTheClass):
                log.warning("instance from %s refused (0xA900): %s", calling, exc)
                assert ds is not None
                self._audit_instance(assoc, ds, sop_class, f"refused (0xA900): {exc}")
                return _status(DATASET_NOT_CLASS, str(exc))
            if isinstance(exc, InputError):
                log.warning("instance from %s refused (0xC210): %s", calling, exc)
                if ds is not None:  # decoded: its study can be audited
                    self._audit_instance(assoc, ds, sop_class, f"refused (0xC210): {exc}")
                return _status(CANNOT_UNDERSTAND, str(exc))
            # pydicom raises many types on malformed data
            log.warning("instance from %s undecodable (0xC210): %s", calling, exc)
            return _status(CANNOT_UNDERSTAND, f"undecodable dataset: {type(exc).__name__}")
        try:
            if stage_error is not None:
                raise stage_error
            assert staged is not None
            # a copy under another patient than the one held: a misfiled instance corrected
            known = self.store.stored_instance(info.sop_instance_uid)
            corrected = known is not None and known[0] not in ("", info.patient_key)
            stored = self.spool.commit(
                staged, info.study_instance_uid, info.series_instance_uid,
                info.sop_instance_uid, replace=corrected,
            )  # fmt: skip
            new = self.store.record_instance(
                info, stored.relative, calling, time.time(),
                reopens=info.sop_class_uid not in self.inert_sop_classes, corrects=corrected,
            )  # fmt: skip
        except OutOfSpaceError as exc:
            log.error("instance from %s deferred (0xA700): %s", calling, exc)
            self._audit_instance(assoc, ds, info.sop_class_uid, "node out of disk space")
            return _status(OUT_OF_RESOURCES, "node out of disk space; retry later")
        except StorageError as exc:
            # the spool or the job database refuses writes (permissions, a read-only or failing
            # file system): every instance would fail alike. 0xA700 is what senders retry
            # (0x0110 many do not), and /health says the storage is down until one is stored
            first = not self.spool_failure
            self.spool_failure = str(exc)
            if first:
                log.error("instance from %s deferred (0xA700): %s; every instance is deferred "
                          "until the node can write again", calling, exc)  # fmt: skip
            self._audit_instance(assoc, ds, info.sop_class_uid, "node cannot write")
            return _status(OUT_OF_RESOURCES, "node cannot store the instance; retry later")
        except Exception as exc:  # the sender may retry; the service must keep serving
            log.exception("instance from %s not stored (0x0110): %s", calling, exc)
            self._audit_instance(assoc, ds, info.sop_class_uid, "not stored: node error")
            return _status(PROCESSING_FAILURE, "node could not store the instance")
        if self.spool_failure:
            log.info("instances are stored again (the node could not write: %s)",
                     self.spool_failure)  # fmt: skip
            self.spool_failure = ""
        if stored.duplicate and stored.differs:
            log.warning(
                "instance %s of study %s re-sent by %s with other content under the same SOP "
                "Instance UID: the copy held is kept (a corrected object needs a new UID, or "
                "the first taken back with a rejection note)",
                info.sop_instance_uid, info.study_instance_uid, calling,
            )  # fmt: skip
        elif stored.duplicate or not new:
            if not new and known is not None and known[1] != stored.relative:
                # the same instance under another study or series UID (a study split or
                # merged at the PACS), same patient: the copy held is kept, and the file just
                # written, which no row names, goes (else it stayed for ever, out of reach of
                # assembly and retention)
                self.spool.remove(stored.relative)
                log.warning(
                    "instance %s re-sent by %s under study %s, series %s; the node holds it "
                    "under another study or series and keeps that copy (a corrected object "
                    "needs a new SOP Instance UID, or the first taken back with a rejection "
                    "note)", info.sop_instance_uid, calling, info.study_instance_uid,
                    info.series_instance_uid,
                )  # fmt: skip
            else:
                log.debug("duplicate instance from %s stored once", calling)
        elif corrected:
            assert known is not None
            if known[1] != stored.relative:  # filed under another study or series now
                self.spool.remove(known[1])
            with self._arriving_lock:  # said once per association and study, then counted
                arrivals = self._arrivals.get(id(assoc)) or _Arrivals()
                arrivals.corrected[info.study_instance_uid] += 1
                first = arrivals.corrected[info.study_instance_uid] == 1
            if first:
                log.warning(
                    "instance %s of study %s re-sent by %s under another patient identity (a "
                    "corrected copy): it replaces the one held, and the study is assembled "
                    "again (the other corrected copies of this association are counted when it "
                    "ends)", info.sop_instance_uid, info.study_instance_uid, calling,
                )  # fmt: skip
        elif info.sop_class_uid == sc.KeyObjectSelectionDocumentStorage:
            apply_rejection(
                self.store, ds, info.series_description, calling, host=host, audit=self.audit,
            )  # fmt: skip
        self._audit_instance(assoc, ds, info.sop_class_uid)
        with self._arriving_lock:
            open_one = self._arrivals.get(id(assoc))  # None: a C-GET's, or already closed
            if open_one is not None:
                open_one.stored += 1
                if new and info.sop_class_uid not in self.inert_sop_classes:
                    # what moves the study's quiet period moves its hold (a duplicate or a
                    # presentation state sent again and again on one association held it)
                    open_one.studies[info.study_instance_uid] = time.monotonic()
        return SUCCESS

    def studies_arriving(self, within_s: float) -> dict[str, float]:
        """The studies of which an association still open stored a new instance in the last
        ``within_s`` seconds, with how many seconds ago: their sender is still sending them,
        and assembly waits for it (the quiet period alone made a job of half a study whose
        sender paused longer)."""
        now = time.monotonic()
        arriving: dict[str, float] = {}
        with self._arriving_lock:
            for arrivals in self._arrivals.values():
                for study, at in arrivals.studies.items():
                    if now - at < within_s:
                        arriving[study] = min(arriving.get(study, within_s), now - at)
        return arriving

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ThreadedAssociationServer:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        if self.commitment_reports is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_commitment_report))
            handlers.append((evt.EVT_N_ACTION, self._on_commitment_request))
        address = (self.settings.bind_address, self.settings.port)
        try:
            # make_server + our own thread rather than start_server: the request handler is the
            # event-driven one of dicom_node.fastpath (pynetdicom's own on unverified versions)
            server = self.ae.make_server(
                address,
                evt_handlers=handlers,
                ssl_context=self.ssl_context,
                server_class=_Server,
                request_handler=fastpath.request_handler_class(),
            )
            assert isinstance(server, _Server)
            server.handshake_timeout_s = self.settings.acse_timeout_s
            server.limits = self.connection_limits
            server.refusals = self.refusals
        except OSError as exc:
            raise GlioforecastError(
                cannot_listen("DICOM receiver", address[0], address[1], exc, "node")
            ) from exc
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            fastpath.drop_protocol_logging(server)
        # as start_server does: the AE knows its servers (AE.shutdown, server.shutdown use it)
        self.ae._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever, name=f"dicom-scp:{server.server_address[1]}", daemon=True
        )
        thread.start()
        self.server = server
        return server

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("server not started")
        return int(self.server.server_address[1])

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop listening, and abort the associations in progress: a sender retries an aborted
        transfer, and what it had been answered stays stored. Their handlers finish (at most
        ``wait_s``) before the node closes its databases; before, an instance arriving then
        was answered 0x0110 (processing failure), which many senders do not retry."""
        if self.server is not None:
            stop_serving(self.server)  # pynetdicom's shutdown closes the socket too
            self.server = None
        open_now = [a for a in self.ae.active_associations if a.is_acceptor]
        established = [a for a in open_now if a.is_established]
        for assoc in established:  # an A-ABORT, which the DUL sends on its own
            with contextlib.suppress(Exception):
                assoc.acse.send_abort(0x00)
        if established:
            time.sleep(0.2)
        # then every connection closed, those still waiting for their A-ASSOCIATE-RQ too:
        # pynetdicom's own abort waited for the peer to close, or for the ARTIM timer (30 s)
        for assoc in open_now:
            connection = getattr(assoc.dul.socket, "socket", None)
            if connection is not None:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + wait_s
        for assoc in open_now:
            assoc.join(max(0.0, deadline - time.monotonic()))
        if established:
            log.info("%d association(s) in progress aborted: the node stops", len(established))


def server_ssl_context(
    certificate: str, private_key: str, ca_certificates: str | None, require_client: bool
) -> ssl.SSLContext:
    """TLS for the SCP (:mod:`dicom_node.tls_profile`); optionally require a client certificate."""
    ctx = new_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certificate, private_key)
    if ca_certificates:
        ctx.load_verify_locations(cafile=ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
    if ca_certificates and not require_client:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
