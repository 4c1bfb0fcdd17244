"""Event-driven acceptor reactors for pynetdicom 3.0.x: same protocol, no fixed-delay polling.

Why this exists. pynetdicom 3.0.4 runs two polling loops per association:

- the DUL reactor (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms)
  whenever it finds nothing to do, so a C-STORE response waits up to 1 ms before it is sent;
- the acceptor reactor (``Association._run_reactor``) sleeps a fixed 1 ms before every check
  of the DIMSE message queue, so a received instance waits up to 1 ms (more on a busy machine,
  where a 1 ms sleep often lasts one scheduler tick) before its handler runs.

With a sender that waits for each response before sending the next instance (dcmtk
``storescu``), these waits are paid once per instance and per PDU, and made the receiver several
times slower than dcmtk ``storescp`` on loopback. Shortening the delays instead would make an
open but idle association spin (thousands of wake-ups a second), which a hospital server must
not do.

What it changes, and nothing else:

- :class:`EventDrivenDUL` waits in ``select()`` on the socket and on a wake-up pipe, written
  when the association hands it a primitive to send (``send_pdu``) or kills it (``kill_dul``).
  Outside data transfer (association set-up, release, abort, ARTIM timer) it keeps the stock
  1 ms cadence, so every state-machine path behaves as in the library.
- :class:`EventDrivenAssociation` (acceptor) waits on a :class:`threading.Event` set by the DUL
  after each state-machine action and by :meth:`kill`, and re-checks at least every
  :data:`IDLE_CHECK_S` for the network (idle) timeout.
- :class:`FastSocket` reads a PDU with ``recv_into`` into one buffer instead of 4096-byte
  ``recv`` calls, and closes the connection of a peer whose PDU header announces more than
  the node takes (the library would read whatever length it announces), of one whose
  A-ASSOCIATE-RQ has not come whole within the ACSE timeout, and of one whose first bytes are
  no PDU (an HTTP request, a TLS handshake), saying what came.
- :class:`FastDIMSE` encodes a plain C-STORE response (the fields a storage SCP sets) directly
  into its seven or eight command elements; pynetdicom builds a pydicom Dataset, encodes it
  once to compute the group length and once more to send it, which cost more CPU per instance
  than everything else in the response path. Any other message, a response with fields it
  does not cover, or an association with an ``EVT_DIMSE_SENT`` handler goes the library's way.

The two reactor loops are copies of pynetdicom 3.0.4's with only the waits replaced; they are
used only when the installed pynetdicom is one of :data:`VERIFIED_VERSIONS`. Any other version
gets the library's own classes (:func:`request_handler_class` returns pynetdicom's
``RequestHandler``), which are slower but correct.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

#: pynetdicom versions whose reactor loops were read and copied here.
VERIFIED_VERSIONS = frozenset({"3.0.4"})

#: How often an idle, established association wakes up to check its network timeout.
IDLE_CHECK_S = 0.1

#: The DUL's wait while the association is in data transfer (Sta6), or the connection awaits its
#: A-ASSOCIATE-RQ (Sta2), and nothing happens.
_DUL_IDLE_WAIT_S = 0.5

#: The stock DUL delay, kept for the other states (the few milliseconds of a negotiation or a
#: release).
_STOCK_DELAY_S = 0.001

_DATA_TRANSFER = "Sta6"
#: the acceptor's state between the connection and its A-ASSOCIATE-RQ, and the idle state
_AWAITING_REQUEST, _IDLE = "Sta2", "Sta1"


def supported(version: str | None = None) -> bool:
    """True when the event-driven reactors may replace pynetdicom's on this version."""
    return (version or pynetdicom.__version__) in VERIFIED_VERSIONS


#: The longest PDU other than P-DATA-TF the receiver reads. An A-ASSOCIATE-RQ proposing 128
#: presentation contexts with a user identity (each of its fields at most 64 KiB) is far less.
MAX_CONTROL_PDU = 1 << 20

#: A PDU's buffer grows by at most this much ahead of the bytes that arrived: the length in a
#: PDU header is the peer's word, not memory to set aside.
_READ_CHUNK = 1 << 20

_P_DATA_TF = 0x04

#: set in a DUL thread once :class:`FastSocket` has logged why its connection ended
_explained = threading.local()


class _ExplainedFilter(logging.Filter):
    """Leaves out pynetdicom's DUL errors about a read that :class:`FastSocket` has already
    explained in the same thread (the thread ends with the connection)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and getattr(_explained, "active", False))


logging.getLogger("pynetdicom.dul").addFilter(_ExplainedFilter())
_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT",
}  # fmt: skip


class FastSocket(AssociationSocket):
    """An :class:`AssociationSocket` that reads a whole PDU with ``recv_into``, and refuses a
    PDU longer than the node takes.

    pynetdicom's DUL reads a PDU's 6-byte header, then asks for as many bytes as the header
    says (up to 4 GiB). This socket remembers each header it returns, and reads the body only
    if it is no longer than :meth:`longest` allows; otherwise it logs why and returns nothing,
    which the DUL treats as a connection closed before the whole PDU came (A-P-ABORT, the
    connection closed). Its buffer grows with the bytes that arrive, never ahead of them by
    more than :data:`_READ_CHUNK`.

    Until its A-ASSOCIATE-RQ has come (Sta1 or Sta2), a connection has ``acse_timeout`` from
    when it was ready, for the request as a whole (the network timeout holds for each read, so
    a peer that sent the request a byte at a time, each within it, held the connection and its
    two threads as long as it went on), and first bytes that are no PDU (an HTTP request, a TLS
    handshake) close it at once, named in the log.
    """

    _header: tuple[int, int] | None = None  # (type, length) of the PDU whose body comes next
    _ended = False  # the node closed the connection (:meth:`_refused`)
    _request_bytes = 0  # of the A-ASSOCIATE-RQ, read so far
    _between_pdus = False  # reading a PDU's header
    _past_request = False  # the A-ASSOCIATE-RQ came: no deadline for it, no check of it

    def __init__(self, assoc: Association, *args: Any, **kwargs: Any) -> None:
        super().__init__(assoc, *args, **kwargs)
        self._opened = time.monotonic()

    def longest(self, pdu_type: int) -> int:
        """The longest PDU body of ``pdu_type`` this association reads: the maximum length the
        node announced for P-DATA-TF (at least :data:`MAX_CONTROL_PDU`; no limit when it
        announced none), :data:`MAX_CONTROL_PDU` for every other PDU."""
        if pdu_type != _P_DATA_TF:
            return MAX_CONTROL_PDU
        announced = int(getattr(self.assoc.acceptor, "maximum_length", 0) or 0)
        return max(announced, MAX_CONTROL_PDU) if announced else 2**32 - 1

    def recv(self, nr_bytes: int) -> bytearray:
        if self._ended:  # what the peer sent after the node closed the connection
            return bytearray()
        header, self._header = self._header, None
        if header is None:  # the DUL reads a PDU header first
            self._between_pdus = True
            try:
                data = self._read(nr_bytes)
            finally:
                self._between_pdus = False
            if len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", data)
                if pdu_type not in _PDU_NAMES and self._awaiting_request():
                    self._not_dicom(bytes(data))
                    return bytearray()  # the DUL takes it as the connection closed
                self._header = (pdu_type, length)
            return data
        pdu_type, length = header
        limit = self.longest(pdu_type)
        if nr_bytes > limit:
            log.warning(
                "connection from %s closed: its %s PDU announces %d bytes, expected at most %d "
                "%s", getattr(self.assoc.requestor, "address", "?"),
                _PDU_NAMES.get(pdu_type, f"0x{pdu_type:02X}"), length, limit,
                "(node.max_pdu_bytes, at least 1 MiB)" if pdu_type == _P_DATA_TF
                else "for that PDU type",
            )  # fmt: skip
            return bytearray()
        return self._read(nr_bytes)

    def _read(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        deadline = self._request_deadline()
        buf = bytearray(min(nr_bytes, _READ_CHUNK))
        got = 0
        while got < nr_bytes:
            if got == len(buf):
                buf.extend(bytes(min(nr_bytes - got, _READ_CHUNK)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._too_slow(got)
                    break
                sock.settimeout(min(left, self.assoc.network_timeout or left))
            try:
                with memoryview(buf) as view:
                    n = sock.recv_into(view[got:], len(buf) - got)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    self._too_slow(got)
                    break
                if deadline is not None:
                    raise
                self._lost("nothing came for node.network_timeout_s", got, nr_bytes)
                break
            except OSError as exc:
                if deadline is not None:
                    raise
                self._lost(f"the connection failed ({exc.strerror or exc})", got, nr_bytes)
                break
            if not n:  # connection closed: return what was read, as the library does
                if got and deadline is None:
                    self._lost("the connection closed", got, nr_bytes)
                break
            got += n
            if deadline is not None:
                self._request_bytes += n
        if deadline is not None:  # the reads that follow wait the network timeout again
            sock.settimeout(self.assoc.network_timeout)
        if got < len(buf):
            del buf[got:]
        return buf

    def _request_deadline(self) -> float | None:
        """When the A-ASSOCIATE-RQ must have come whole (none once it has). The acceptor's
        DUL reads that first PDU before it acts on the connection's own event, in Sta1."""
        timeout = self.assoc.acse_timeout
        if not self._awaiting_request() or not timeout:
            return None
        return self._opened + float(timeout)

    def _awaiting_request(self) -> bool:
        """Whether the connection has not sent its A-ASSOCIATE-RQ yet (asked at every read:
        once it has, the answer is remembered)."""
        if self._past_request:
            return False
        machine = getattr(self.assoc.dul, "state_machine", None)
        if machine is None:
            return False
        if machine.current_state not in (_IDLE, _AWAITING_REQUEST):
            self._past_request = True
            return False
        return True

    def _too_slow(self, got: int) -> None:
        """Read no further: the A-ASSOCIATE-RQ did not come whole in time (the DUL takes the
        short read as the connection closed, and ends the association)."""
        timeout = self.assoc.acse_timeout
        self._refused("slow", f"no whole A-ASSOCIATE-RQ within node.acse_timeout_s "
                      f"({timeout:.0f} s; {self._request_bytes} bytes of it had come)")  # fmt: skip

    def silent(self) -> None:
        """The ARTIM timer (the ACSE timeout) expired before an A-ASSOCIATE-RQ came: say so
        when nothing came at all (a part of one is :meth:`_too_slow`'s)."""
        timeout = float(self.assoc.acse_timeout or 0)
        if self._ended or self._request_bytes:  # said already, or to be said by _too_slow
            return
        if time.monotonic() - self._opened < timeout - 0.5:  # the node stops
            return
        self._refused("silent", f"nothing came within node.acse_timeout_s ({timeout:.0f} s)")

    def _lost(self, what: str, got: int, wanted: int) -> None:
        """An established association lost in the middle of a PDU: one line that names the
        sender and what happened, for pynetdicom's errors and traceback (which named neither:
        "Connection closed before the entire PDU was received", "timed out")."""
        _explained.active = True  # the DUL's own error lines for it are left out
        if self.assoc.is_aborted or self._ended:  # the node ended it, and said why
            return
        requestor = self.assoc.requestor
        if self._between_pdus and not got:  # nothing was in transfer: the peer went away
            log.info(
                "association from %s at %s ended without A-RELEASE: %s",
                str(getattr(requestor, "ae_title", "") or "?").strip(),
                getattr(requestor, "address", "?"), what,
            )  # fmt: skip
            return
        log.warning(
            "association from %s at %s aborted: %s in the middle of a PDU (%d of %d bytes); "
            "what it was sending is not stored (a sender sends it again)",
            str(getattr(requestor, "ae_title", "") or "?").strip(),
            getattr(requestor, "address", "?"), what, got, wanted,
        )  # fmt: skip

    def _not_dicom(self, first: bytes) -> None:
        """The connection's first bytes are no DICOM PDU: say what they look like (pynetdicom
        logged an error per six bytes, without the peer's address)."""
        if first[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"OPTI", b"DELE", b"PRI "):
            kind, what = "http", "an HTTP request (a web browser, or a load balancer's HTTP check?)"
        elif first[0] == 0x16 and first[1] == 0x03:
            kind, what = (
                "tls",
                "a TLS handshake (the sender uses TLS, the port does not: node.tls)",
            )
        else:
            kind, what = "bytes", f"bytes that are no DICOM PDU ({first!r})"
        self._refused(kind, f"expected an A-ASSOCIATE-RQ, found {what}")

    def _refused(self, kind: str, why: str) -> None:
        """Log why the connection is closed, once a minute per address and kind (the server's
        :class:`~dicom_node.refusals.Refusals`, where it has one)."""
        host = str(getattr(self.assoc.requestor, "address", "?"))
        said = f"connection from {host} closed: {why}"
        refusals = getattr(getattr(self.assoc, "_server", None), "refusals", None)
        if refusals is None:
            log.warning("%s", said)
        else:
            refusals.report(("fastpath", kind, host), said)
        # the DUL would go on reading what the peer sent after: every read ends now, and the
        # peer sees the connection closed
        self._ended = True
        _explained.active = True
        with contextlib.suppress(OSError):
            assert self.socket is not None
            self.socket.shutdown(socket.SHUT_RDWR)


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _ui(value: str) -> bytes | None:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        return None
    return raw + b"\0" if len(raw) % 2 else raw


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE response (Implicit VR Little Endian), or None.

    None when the response carries something this encoder does not cover (Offending Element,
    a non-ASCII value, a data set): the caller then uses pynetdicom's encoder.
    """
    if (
        primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.OffendingElement is not None
        or primitive.DataSet is not None
    ):
        return None
    elements = []
    if primitive.AffectedSOPClassUID is not None:
        sop_class = _ui(str(primitive.AffectedSOPClassUID))
        if sop_class is None:
            return None
        elements.append(_implicit(0x0002, sop_class))
    elements.append(_implicit(0x0100, struct.pack("<H", 0x8001)))  # C-STORE-RSP
    elements.append(_implicit(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)))
    elements.append(_implicit(0x0800, struct.pack("<H", 0x0101)))  # no data set
    elements.append(_implicit(0x0900, struct.pack("<H", primitive.Status)))
    if primitive.ErrorComment is not None:
        try:
            comment = str(primitive.ErrorComment).encode("ascii")
        except UnicodeEncodeError:
            return None
        elements.append(_implicit(0x0902, comment + b" " if len(comment) % 2 else comment))
    if primitive.AffectedSOPInstanceUID is not None:
        sop_instance = _ui(str(primitive.AffectedSOPInstanceUID))
        if sop_instance is None:
            return None
        elements.append(_implicit(0x1000, sop_instance))
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


class FastDIMSE(DIMSEServiceProvider):
    """Sends plain C-STORE responses without pynetdicom's double pydicom encoding."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            encoded = encode_c_store_rsp(primitive)
            max_pdu = self.maximum_pdu_size
            if encoded is not None and (not max_pdu or len(encoded) <= max_pdu - 6):
                pdata = P_DATA()
                # one PDV: message control header 0x03 = command, last fragment
                pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class EventDrivenDUL(DULServiceProvider):
    """The DUL reactor of pynetdicom 3.0.4, waiting on its socket instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        # the wake-up pipe lives as long as the reactor thread (opened and closed by it)
        self._wake_r = self._wake_w = -1
        self._pipe_lock = threading.Lock()
        self._pipe_open = False

    def _open_pipe(self) -> None:
        with self._pipe_lock:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._pipe_open = True

    # -- waking the reactor from another thread

    def _wake(self) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                with contextlib.suppress(BlockingIOError):  # already awake: pipe not drained
                    os.write(self._wake_w, b"\0")

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wait_for_work(self) -> None:
        """Sleep until the socket is readable, the pipe is written, or a short timeout."""
        timeout = _STOCK_DELAY_S
        if self.state_machine.current_state in (_DATA_TRANSFER, _AWAITING_REQUEST):
            # what the reactor acts on in these states comes by the socket or the pipe; only
            # the timers (network, ARTIM: seconds) are polled. A connection that says nothing
            # cost 1.6 % of a core at the stock delay until node.acse_timeout_s closed it
            timeout = _DUL_IDLE_WAIT_S
        sock = getattr(self.socket, "socket", None)
        if sock is None or sock.fileno() < 0:
            time.sleep(_STOCK_DELAY_S)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data already buffered: select() cannot see it
        try:
            ready, _, _ = select.select([sock, self._wake_r], [], [], timeout)
        except (OSError, ValueError):
            time.sleep(_STOCK_DELAY_S)  # socket closed under us: the next check reports it
            return
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)

    # -- the reactor: pynetdicom 3.0.4's run_reactor with the sleep replaced

    def run_reactor(self) -> None:
        try:
            self._open_pipe()
        except OSError as exc:  # no descriptor left for the pipe (EMFILE): end the connection
            log.warning(
                "connection from %s closed: %s", getattr(self.assoc.requestor, "address", "?"), exc
            )
            # the association waits for its A-ASSOCIATE-RQ (None: none came) once the DUL is
            # ready; without these it waited for ever, holding its thread and its socket
            self.to_user_queue.put(None)
            self.assoc._dul_ready.set()
            return
        try:
            self._reactor()
        finally:
            self._close_pipe()
            wake = getattr(self.assoc, "_wake", None)
            if wake is not None:
                wake.set()  # the association sees the DUL gone without waiting

    def _reactor(self) -> None:
        self._idle_timer.start()
        sleep = False
        assoc_wake: threading.Event | None = getattr(self.assoc, "_wake", None)

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_for_work()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                sock = self.socket
                if self.state_machine.current_state == _AWAITING_REQUEST and isinstance(
                    sock, FastSocket
                ):  # the ACSE timeout, and no A-ASSOCIATE-RQ: say so before it closes
                    sock.silent()
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("Exception in DUL.run(), aborting association")
                log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                assert self.socket is not None
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            before = self.state_machine.current_state
            self.state_machine.do_action(event)
            if before == _AWAITING_REQUEST and self.state_machine.current_state == _IDLE:
                # the connection closed before its A-ASSOCIATE-RQ: the association waits for
                # that request up to acse_timeout; None is what it gets at that timeout, and it
                # ends now instead of holding its thread and this one for the rest of it
                self.to_user_queue.put(None)
            # wake the association when it has something to act on: a complete DIMSE message,
            # an A-RELEASE/A-ABORT primitive, or any state other than data transfer
            if assoc_wake is not None and (
                self.state_machine.current_state != _DATA_TRANSFER
                or self.assoc.dimse.msg_queue.qsize()
                or self.to_user_queue.qsize()
            ):
                assoc_wake.set()
            sleep = False


class EventDrivenAssociation(Association):
    """An acceptor whose reactor waits on an event instead of sleeping 1 ms per loop."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        self.dul = EventDrivenDUL(self)
        self.dimse = FastDIMSE(self)
        # the timeout setters configured the replaced DUL's timers (ARTIM, idle): set them again
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop; the fixed ``time.sleep(0.001)`` became a wait."""
        self._is_paused = False
        busy = False
        while not self._kill:
            if not busy:
                self._wake.wait(IDLE_CHECK_S)
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            busy = msg is not None
            if msg:
                assert context_id is not None
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("Association Released")  # the node logs its own line per association
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                log.debug(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning(
                    "association from %s at %s: nothing came for node.network_timeout_s "
                    "(%.0f s): %s (anything it was in the middle of sending is not stored)",
                    str(self.requestor.ae_title or "?").strip(), self.requestor.address,
                    self.network_timeout or 0,
                    "released" if self.network_timeout_response == "A-RELEASE" else "aborted",
                )  # fmt: skip
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


class EventDrivenRequestHandler(RequestHandler):
    """Creates :class:`EventDrivenAssociation` acceptors with a :class:`FastSocket`."""

    def _create_association(self) -> Association:
        # Same steps as pynetdicom 3.0.4's RequestHandler._create_association, with our classes.
        assoc = EventDrivenAssociation(self.ae, "acceptor")
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        sock = FastSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        return _configure(self, assoc)


def _configure(handler: RequestHandler, assoc: Association) -> Association:
    from copy import deepcopy

    ae = handler.ae
    server = handler.server
    assoc.acceptor.maximum_length = ae.maximum_pdu_size
    assoc.acceptor.ae_title = server.ae_title
    assoc.acceptor.address_info = handler.local
    assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
    assoc.acceptor.implementation_version_name = ae.implementation_version_name
    assoc.acceptor.supported_contexts = deepcopy(server.contexts)
    assoc.requestor.address_info = handler.remote
    for event in server._handlers:
        if event.is_intervention and server._handlers[event]:
            assoc.bind(event, *server._handlers[event])
        elif isinstance(event, evt.NotificationEvent):
            for handler_args in server._handlers[event]:
                assert isinstance(handler_args, tuple)
                assoc.bind(event, handler_args[0], handler_args[1])
    # the association binds the logging handlers itself: keep them only if the server does
    for event, log_handler in _protocol_logging_handlers():
        if not _bound(server, event, log_handler):
            assoc.unbind(event, log_handler)
    return assoc


def _protocol_logging_handlers() -> list[tuple[Any, Any]]:
    try:
        from pynetdicom import _handlers
    except ImportError:  # another layout: nothing known to drop
        return []
    pairs = []
    for event, name in (
        (evt.EVT_DIMSE_RECV, "standard_dimse_recv_handler"),
        (evt.EVT_DIMSE_SENT, "standard_dimse_sent_handler"),
        (evt.EVT_PDU_RECV, "standard_pdu_recv_handler"),
        (evt.EVT_PDU_SENT, "standard_pdu_sent_handler"),
    ):
        handler = getattr(_handlers, name, None)
        if handler is not None:
            pairs.append((event, handler))
    return pairs


def drop_protocol_logging(server: Any) -> None:
    """Unbind pynetdicom's per-message logging handlers from ``server``.

    pynetdicom binds them to every server and association and runs them whatever the log
    level; for each C-STORE request the receive handler copies the whole data set
    (``getvalue()``) under the AE-wide lock only to log that a data set is "Present". Call it
    only when the ``pynetdicom`` logger would discard their output (below INFO). Associations
    made by :class:`EventDrivenRequestHandler` then drop them too.
    """
    for event, handler in _protocol_logging_handlers():
        with contextlib.suppress(Exception):
            server.unbind(event, handler)


def _bound(server: Any, event: Any, handler: Any) -> bool:
    return any(h[0] is handler for h in server.get_handlers(event))


def request_handler_class(version: str | None = None) -> type[RequestHandler]:
    """The request handler for our SCP: event-driven on a verified version, else the stock one."""
    if supported(version):
        return EventDrivenRequestHandler
    log.info(
        "pynetdicom %s: using its own association reactors (event-driven ones are verified "
        "for %s only)",
        version or pynetdicom.__version__,
        ", ".join(sorted(VERIFIED_VERSIONS)),
    )
    return RequestHandler
