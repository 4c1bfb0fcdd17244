"""C-STORE SCU: send a batch of datasets to one destination over one association.

Presentation contexts are proposed from the objects themselves (each SOP class with the
transfer syntax the object is encoded in, plus the uncompressed ones). Every response status is
checked: success and the warning statuses count as delivered; failures are reported per object
with the status, and tell whether retrying can help (an out-of-resources status can, an
unsupported SOP class cannot). An association that cannot be opened raises :class:`SendError`
naming the destination and the reason; one lost in the middle of a batch fails the objects not
yet acknowledged.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association
from pynetdicom.presentation import PresentationContext, build_context

from dicom_node.errors import GlioforecastError, SendError
from dicom_node.ports import host_port
from dicom_node.tls_profile import new_context

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
# Warning statuses of C-STORE (PS3.4 B.2.3): the instance is stored.
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


class DestinationTLSLike(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def ca_certificates(self) -> Path | None: ...
    @property
    def certificate(self) -> Path | None: ...
    @property
    def private_key(self) -> Path | None: ...
    @property
    def server_name(self) -> str | None: ...


class DicomWebLike(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def token_file(self) -> Path | None: ...
    @property
    def username(self) -> str: ...
    @property
    def password_file(self) -> Path | None: ...
    @property
    def timeout_s(self) -> float: ...


class DestinationLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def storage_commitment(self) -> bool: ...
    @property
    def reject_replaced(self) -> bool: ...
    @property
    def tls(self) -> DestinationTLSLike: ...
    @property
    def dicomweb(self) -> DicomWebLike: ...


@dataclass(frozen=True)
class Destination:
    """A peer that receives the results (a PACS, a planning system); with
    ``storage_commitment`` a delivery counts only once the peer committed to keeping it
    (:mod:`dicom_node.commitment`); with ``reject_replaced`` it receives a rejection note for
    the results it holds that newer ones replaced (:mod:`sr_writer.rejection`); with ``tls`` (a
    client context, :func:`client_ssl_context`) associations go over TLS, the peer's
    certificate checked for ``server_name`` (default: the host)."""

    name: str
    ae_title: str
    host: str
    port: int
    storage_commitment: bool = False
    reject_replaced: bool = False
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    server_name: str = ""
    # a DICOMweb destination (dicom_node.dicomweb): its base URL, the Authorization header
    # and the HTTP timeout; host and port are the URL's
    url: str = ""
    authorization: str = field(default="", compare=False, repr=False)
    timeout_s: float = 120.0

    def __str__(self) -> str:
        if self.url:
            return f"{self.name} ({self.url})"
        over = ", TLS" if self.tls is not None else ""
        return f"{self.name} ({self.ae_title}@{host_port(self.host, self.port)}{over})"

    @classmethod
    def from_settings(cls, d: DestinationLike) -> Destination:
        """From one entry of the settings' ``destinations`` (its TLS files are read here)."""
        tls = d.tls
        context = None
        if tls.enabled:
            try:
                context = client_ssl_context(tls.ca_certificates, tls.certificate, tls.private_key)
            except (ssl.SSLError, OSError) as exc:
                raise GlioforecastError(
                    f"destination {d.name}: cannot load its TLS files (ca_certificates "
                    f"{tls.ca_certificates}, certificate {tls.certificate}, private_key "
                    f"{tls.private_key}): {exc}; expected PEM files, the key matching the "
                    "certificate"
                ) from exc
        dest = cls(
            name=d.name,
            ae_title=d.ae_title,
            host=d.host,
            port=int(d.port),
            storage_commitment=bool(d.storage_commitment),
            reject_replaced=bool(d.reject_replaced),
            tls=context,
            server_name=(tls.server_name or "") if tls.enabled else "",
        )
        web = d.dicomweb
        if not web.url:
            return dest
        url = urllib.parse.urlsplit(web.url)
        return dataclasses.replace(
            dest, ae_title="", host=url.hostname or "",
            port=url.port or (443 if url.scheme == "https" else 80),
            url=web.url.rstrip("/"), authorization=_authorization(d.name, web),
            timeout_s=float(web.timeout_s),
        )  # fmt: skip


def _authorization(name: str, web: DicomWebLike) -> str:
    """The Authorization header of a DICOMweb destination ('' without authentication)."""
    path = web.token_file or web.password_file
    if path is None:
        return ""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise GlioforecastError(
            f"destination {name}: cannot read {path} ({exc.strerror or exc}); expected a file "
            "this user can read"
        ) from exc
    if web.token_file is not None:
        return f"Bearer {secret}"
    return "Basic " + base64.b64encode(f"{web.username}:{secret}".encode()).decode()


def client_ssl_context(
    ca_certificates: Path | None, certificate: Path | None, private_key: Path | None
) -> ssl.SSLContext:
    """TLS (:mod:`dicom_node.tls_profile`) to a peer whose certificate chains to
    ``ca_certificates`` (the system's CAs when None) and names the host; with the node's client
    certificate when given."""
    ctx = new_context(ssl.Purpose.SERVER_AUTH, str(ca_certificates) if ca_certificates else None)
    if certificate is not None and private_key is not None:
        ctx.load_cert_chain(str(certificate), str(private_key))
    return ctx


class ContextsRejected(SendError):
    """The peer answered the association request but accepted none of its presentation
    contexts (it does not take these SOP classes from us)."""


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one C-STORE. ``status`` is None when no response came back."""

    sop_instance_uid: str
    status: int | None
    error: str | None = None
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        return self.error is None


def describe_status(status: int) -> str:
    if status == 0x0000:
        return "success"
    if status in WARNING_STATUSES:
        return "warning"
    if 0xA700 <= status <= 0xA7FF:
        return "refused: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "error: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "error: cannot understand"
    if status == 0x0122:
        return "refused: SOP class not supported"
    if status == 0x0124:
        return "refused: not authorised"
    if status == 0x0117:
        return "error: invalid SOP instance"
    if status == 0x0110:
        return "failure: processing failure"
    if status == 0x0211:
        return "error: unrecognised operation"
    if status == 0x0212:
        return "error: mistyped argument"
    return "failure"


def is_permanent(status: int) -> bool:
    """Statuses that a retry of the same object cannot change (the peer's configuration can)."""
    return (
        status in (0x0117, 0x0122, 0x0124)
        or 0xA900 <= status <= 0xA9FF
        or (0xC000 <= status <= 0xCFFF)
    )


def presentation_contexts(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    """One context per SOP class, offering the objects' own transfer syntaxes and the
    uncompressed ones."""
    syntaxes: dict[str, list[str]] = {}
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        own = _transfer_syntax(ds)
        offered = syntaxes.setdefault(sop_class, [])
        for ts in (own, *UNCOMPRESSED):
            if ts not in offered:
                offered.append(ts)
    if len(syntaxes) > MAX_CONTEXTS:
        raise SendError(
            f"one association carries at most {MAX_CONTEXTS} presentation contexts, the batch "
            f"needs {len(syntaxes)} SOP classes"
        )
    return [build_context(sop, ts) for sop, ts in syntaxes.items()]


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return str(ts) if ts else str(ExplicitVRLittleEndian)


def store_batch(
    datasets: Sequence[Dataset],
    destination: Destination,
    *,
    calling_ae: str = "GLIOFORECAST",
    acse_timeout_s: float = 30,
    dimse_timeout_s: float = 60,
    network_timeout_s: float = 60,
    load: Callable[[Dataset], Dataset] | None = None,
    progress: Callable[[int], None] | None = None,
    stopping: Callable[[], bool] | None = None,
    on_result: Callable[[StoreResult], None] | None = None,
) -> list[StoreResult]:
    """Send ``datasets`` to ``destination`` over one association, one result per dataset.

    ``load`` turns each item into the dataset to send just before it is sent (e.g. headers read
    with ``stop_before_pixels`` into whole files), so a large batch is never all in memory.
    When ``stopping`` says so (the node stops), the objects not sent yet are left out of the
    results: the caller sends them another time. ``on_result`` is told of each result as it
    comes (the outbox records it at once).
    Raises :class:`SendError` when no association could be established (peer down, refused,
    no presentation context accepted); per-object failures are in the results.
    """
    if not datasets:
        return []
    assoc = associate(
        destination,
        presentation_contexts(datasets),
        calling_ae=calling_ae,
        acse_timeout_s=acse_timeout_s,
        dimse_timeout_s=dimse_timeout_s,
        network_timeout_s=network_timeout_s,
    )
    results: list[StoreResult] = []
    try:
        for ds in datasets:
            if stopping is not None and stopping():
                break
            results.append(_store_one(assoc, load(ds) if load else ds, destination))
            if on_result is not None:
                on_result(results[-1])
            if progress is not None:
                progress(1)
    finally:
        release(assoc)
    delivered = sum(r.delivered for r in results)
    logger.info(
        "C-STORE to %s: %d of %d delivered",
        destination.name,
        delivered,
        len(results),
    )
    return results


def associate(
    destination: Destination,
    contexts: Sequence[PresentationContext],
    *,
    calling_ae: str,
    acse_timeout_s: float = 30,
    dimse_timeout_s: float = 60,
    network_timeout_s: float = 60,
    roles: Sequence[Any] = (),
    evt_handlers: Sequence[Any] = (),
) -> Association:
    """An established association with ``destination`` proposing ``contexts`` (and the SCP/SCU
    Role Selection items ``roles``, its events bound to ``evt_handlers``; TCP_NODELAY set), or
    :class:`SendError` naming the destination and why there is none."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = acse_timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = network_timeout_s
    ae.requested_contexts = list(contexts)
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            ext_neg=list(roles) or None,
            evt_handlers=list(evt_handlers) or None,
            tls_args=(
                (destination.tls, destination.server_name or destination.host)
                if destination.tls is not None
                else None
            ),
        )
    except (OSError, ValueError) as exc:
        raise SendError(f"cannot connect to {destination}: {exc}") from exc
    if not assoc.is_established and destination.tls is not None and assoc.is_aborted:
        why = tls_handshake_error(destination)
        if why:
            raise SendError(f"no association with {destination}: TLS handshake failed: {why}")
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
            raise ContextsRejected(
                f"{destination} accepted none of the presentation contexts proposed: expected "
                f"it to accept SOP class {', '.join(_uid_name(c) for c in classes)}"
            )
        raise SendError(f"no association with {destination}: {_failure_reason(assoc)}")
    _no_delay(assoc)
    return assoc


def tls_handshake_error(
    destination: Destination, timeout_s: float = 10, settings_key: str = "the destination's tls"
) -> str:
    """Why TLS with ``destination`` fails ('' when it works, or when the peer cannot be reached
    at all). pynetdicom only says the connection was aborted, which misleads for a certificate
    the node does not trust, a name that does not match, or a client certificate the peer wants
    (TLS 1.3 refuses that after the handshake: a short read shows it). ``settings_key`` names
    where the node's TLS files are configured, in the advice."""
    assert destination.tls is not None
    name = destination.server_name or destination.host
    try:
        with (
            socket.create_connection((destination.host, destination.port), timeout_s) as raw,
            destination.tls.wrap_socket(raw, server_hostname=name) as tls,
        ):
            tls.settimeout(min(timeout_s, 2.0))
            try:
                if tls.recv(1) == b"":
                    return "the peer closed the connection after the handshake"
            except TimeoutError:
                return ""  # waiting for our association request: TLS itself works
    except ssl.SSLCertVerificationError as exc:
        return f"the peer's certificate is not trusted for {name!r}: {exc.verify_message}"
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if reason in _TLS_ALERTS:
            return f"{_TLS_ALERTS[reason].format(key=settings_key)} ({reason})"
        return reason
    except OSError:
        return ""
    return ""


# what the peer's TLS alerts mean for the destination's settings
_TLS_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate (set "
    "certificate and private_key in {key})",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused the node's client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer refused the handshake (a client certificate it "
    "requires, or no TLS version or cipher in common)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of the node's client certificate",
}


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def _store_one(assoc: Association, ds: Dataset, destination: Destination) -> StoreResult:
    uid = str(ds.SOPInstanceUID)
    if not assoc.is_established:
        return StoreResult(uid, None, f"association with {destination} was lost")
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == str(ds.SOPClassUID)]
    if not accepted:
        return StoreResult(
            uid,
            None,
            f"{destination} accepted no presentation context for SOP class {ds.SOPClassUID}",
            permanent=True,
        )
    try:
        hold_reactor(assoc)
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError) as exc:
        return StoreResult(uid, None, f"could not send to {destination}: {exc}", permanent=True)
    status = getattr(rsp, "Status", None)
    if status is None:
        return StoreResult(
            uid, None, f"no C-STORE response from {destination} (timeout or connection lost)"
        )
    status = int(status)
    if status == 0x0000:
        return StoreResult(uid, status)
    if status in WARNING_STATUSES:
        logger.warning(
            "C-STORE to %s: warning status 0x%04X for %s (stored)", destination.name, status, uid
        )
        return StoreResult(uid, status)
    comment = getattr(rsp, "ErrorComment", "")
    return StoreResult(
        uid,
        status,
        f"{destination} answered 0x{status:04X} ({describe_status(status)})"
        + (f": {comment}" if comment else ""),
        permanent=is_permanent(status),
    )


#: how long a release may take before the association is aborted instead: the peer's
#: A-RELEASE response normally comes within milliseconds
RELEASE_WAIT_S = 30.0


def release(assoc: Association, wait_s: float | None = None) -> None:
    """Release ``assoc`` (when still established), or abort it when the release does not end
    within ``wait_s`` (default :data:`RELEASE_WAIT_S`).

    pynetdicom's ``release()`` first waits, without a limit, for the association's reactor
    thread to pause; a reactor that ends instead (the peer aborted or the network timeout
    passed at that moment) never pauses, and the caller waited for ever: a delivery thread
    hung in it once, with the outbox's requests stopped behind it. The release runs in a
    thread of its own here; past ``wait_s`` the association is aborted, which also lets that
    thread go on (pynetdicom's abort marks the reactor paused) and end within the ACSE
    timeout."""
    if not assoc.is_established:
        return
    if not assoc.is_alive():  # the reactor has ended: no release can be negotiated
        logger.warning("association with %s: it ended without being released; aborted",
                       _peer_title(assoc))  # fmt: skip
        assoc.abort()
        return

    def negotiate() -> None:
        try:
            assoc.release()
        except Exception as exc:  # pynetdicom's state machine, after an abort: nothing to do
            logger.debug("release of an association already over: %s", exc)

    done = threading.Thread(target=negotiate, name="release", daemon=True)
    done.start()
    wait_s = RELEASE_WAIT_S if wait_s is None else wait_s
    done.join(wait_s)
    if done.is_alive():
        logger.warning(
            "association with %s: the release did not end within %.0f s; aborted instead",
            _peer_title(assoc), wait_s,
        )  # fmt: skip
        assoc.abort()


def _peer_title(assoc: Association) -> str:
    return str((assoc.acceptor if assoc.is_requestor else assoc.requestor).ae_title).strip()


def hold_reactor(assoc: Association, settle_s: float = 0.5) -> None:
    """Make sure the association's reactor thread is parked before a ``send_*`` call.

    pynetdicom (3.0) pauses the requestor's reactor inside ``send_c_store`` by clearing a
    checkpoint and waiting for the reactor's ``_is_paused`` flag; right after the previous send
    the flag is still True from before the reactor woke up, so the reactor can run one more pass
    and take the next C-STORE response off the queue ("Received unexpected C-STORE service
    message"), leaving the send waiting for the DIMSE timeout. Seen under CPU load with 179
    objects in one association. Here the reactor is parked for certain: clear the checkpoint,
    reset the flag, and wait for the reactor to set it again as it reaches the checkpoint (or,
    if it was already between setting the flag and waiting, for it to block there).
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return  # another pynetdicom version: rely on its own pause
    checkpoint.clear()
    assoc._is_paused = False
    deadline = time.monotonic() + settle_s
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    # Either the reactor set the flag at the checkpoint, or it is blocked in the checkpoint's
    # wait() with the flag we reset: parked in both cases.
    assoc._is_paused = True


def _failure_reason(assoc: Association) -> str:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result_str", "") if rsp is not None else ""
        reason = getattr(rsp, "reason_str", "") if rsp is not None else ""
        return f"association rejected ({result}: {reason})".strip()
    if assoc.is_aborted:
        return "connection refused or aborted (peer down or not listening on that port?)"
    return "connection failed (peer down or unreachable)"


def _no_delay(assoc: Association) -> None:
    """Disable Nagle's algorithm: without it each small PDU waits for a delayed ACK."""
    try:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # pragma: no cover - best effort only
        logger.debug("could not set TCP_NODELAY")
