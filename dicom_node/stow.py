"""The DICOMweb receiver: STOW-RS (PS3.18 10.5), for routers, archives and cloud PACS that
push studies over HTTP rather than by C-STORE.

``POST {stow.path}/studies`` and ``POST {stow.path}/studies/{StudyInstanceUID}`` take a
``multipart/related; type="application/dicom"`` body, one DICOM Part 10 file per part. Each
instance is stored exactly as the DICOM receiver stores one (:meth:`StorageSCP.store_read`:
on disk and recorded before it counts as stored, the same checks, the same job queue bound),
and the answer is a STOW-RS response data set (``application/dicom+json``) that lists each
instance stored (Referenced SOP Sequence) or not (Failed SOP Sequence, with the C-STORE status
the receiver would have answered as its Failure Reason).

How a request is read, so that bad input loses nothing and holds nothing up:

- who calls is checked before the body is read (``stow.clients``: a bearer token, HTTP Basic,
  or an address); a refusal is logged and audited, and answered 401 or 403;
- the body goes to an unnamed temporary file in the data folder (never whole in memory; gone
  with the request, or with the process), bounded by ``stow.max_request_mb`` (413) and by
  the free space the spool must keep (503);
- a body that does not arrive whole, or whose multipart structure is broken, stores nothing
  (400); a part that is not ``application/dicom`` refuses the request (415);
- at most ``stow.max_requests`` requests are stored at once (503 with Retry-After beyond); a
  client that stops sending is dropped after ``node.network_timeout_s``, and one whose request
  line and headers have not all come within ``node.acse_timeout_s`` of their first byte.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import http
import io
import json
import logging
import mmap
import re
import socket
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset

from dicom_node.errors import GlioforecastError, OutOfSpaceError
from dicom_node.health import stop_serving
from dicom_node.listener import (
    ConnectionLimit,
    EitherFamily,
    HandshakeInThread,
    HeadersInTime,
    cannot_listen,
)
from dicom_node.scp import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    STORAGE_CLASSES,
    SUCCESS,
    TRANSFER_SYNTAXES,
    Origin,
    Part10,
    StorageSCP,
    certificate_allowed,
    certificate_mismatch,
    certificate_names,
    host_allowed,
)
from dicom_node.settings import StowSettings, WebClient

log = logging.getLogger(__name__)

#: Failure Reasons the DICOM receiver has no C-STORE status for: it refuses such an instance
#: at association negotiation (no presentation context), which HTTP does not have
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: an instance of another study than the one the request's URL names
STUDY_MISMATCH = 0xC409

#: what a client is told to wait before it sends again (503)
RETRY_AFTER_S = 30
_PIECE = 1 << 20  # bytes read from the socket at a time
_SPACE_CHECK = 64 << 20  # a chunked body's free-space check, every this many bytes
_MAX_BOUNDARY = 200
_LINGER_S, _LINGER_BYTES = 2.0, 16 << 20  # what a refused request's body may still send


class Refusal(Exception):
    """A request answered with an HTTP error and this message (text/plain), nothing stored."""

    def __init__(self, code: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code = code
        self.headers = headers
        self.logged = False  # already logged (a refused client: once a minute, with the audit)


def _busy(message: str) -> Refusal:
    return Refusal(503, message, (("Retry-After", str(RETRY_AFTER_S)),))


# ------------------------------------------------------------------------------ who calls


@dataclass(frozen=True)
class Client:
    """A :class:`WebClient` with its secret read: ``token`` (bearer), or ``basic``
    (``username:password``), or neither (identified by ``hosts`` or ``certificate_names``)."""

    name: str
    hosts: tuple[str, ...]
    token: bytes | None = None
    basic: bytes | None = None
    certificate_names: tuple[str, ...] = ()


def _secret(path: Path, where: str) -> bytes:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise GlioforecastError(f"{where}: cannot read {path} ({exc})") from exc
    if not value:
        raise GlioforecastError(f"{where}: expected a secret in {path}, found an empty file")
    return value.encode()


def load_clients(clients: tuple[WebClient, ...]) -> tuple[Client, ...]:
    """The clients with their secrets read now (a reload reads them again)."""
    loaded = []
    for n, c in enumerate(clients):
        where = f"stow.clients[{n}]"
        token = _secret(c.token_file, f"{where}.token_file") if c.token_file else None
        basic = None
        if c.password_file is not None:
            password = _secret(c.password_file, f"{where}.password_file")
            basic = c.username.encode() + b":" + password
        loaded.append(Client(c.name, c.hosts, token, basic, c.certificate_names))
    return tuple(loaded)


def authenticate(
    clients: tuple[Client, ...],
    authorization: str,
    host: str,
    certificate: frozenset[str] | None = None,
) -> Client | Refusal:
    """The client a request from ``host`` with this Authorization header and this TLS client
    certificate (its names, :func:`certificate_names`) comes from, or the refusal to answer:
    403 when no client may call from ``host`` with this certificate, 401 otherwise."""
    near = [c for c in clients if host_allowed(c.hosts, host)]
    if not near:
        return Refusal(403, f"{host} is not among the hosts of any stow.clients entry")
    reachable = [c for c in near if certificate_allowed(c.certificate_names, certificate)]
    if not reachable:
        wanted = {n for c in near for n in c.certificate_names}
        return Refusal(403, f"a request from {host}: stow.clients expects "
                       + certificate_mismatch(wanted, certificate))  # fmt: skip
    scheme, _, value = authorization.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    given = b""
    if scheme == "basic":
        with contextlib.suppress(binascii.Error, ValueError):
            given = base64.b64decode(value, validate=True)
    for c in reachable:
        if c.token is not None and scheme == "bearer":
            if hmac.compare_digest(value.encode(), c.token):
                return c
        elif c.basic is not None and given and hmac.compare_digest(given, c.basic):
            return c
    # a client known by its address or its certificate alone, whatever the request carries
    # (one bound to the certificate first: it says more about who calls)
    anonymous = [c for c in reachable if c.token is None and c.basic is None]
    if anonymous:
        return max(anonymous, key=lambda c: bool(c.certificate_names))
    challenge = (("WWW-Authenticate", 'Basic realm="glioforecast"'),
                 ("WWW-Authenticate", 'Bearer realm="glioforecast"'))  # fmt: skip
    if not authorization:
        return Refusal(401, "expected credentials (Authorization: Bearer or Basic), found none",
                       challenge)  # fmt: skip
    return Refusal(401, f"the {scheme or 'given'} credentials are not those of a stow.clients "
                   f"entry that may call from {host}", challenge)  # fmt: skip


# ------------------------------------------------------------------------------ the body


#: the media ranges that take the answer, application/dicom+json (RFC 9110, 12.5.1: a type/*
#: range takes every subtype; application/json, which PS3.18 lets servers answer for it)
_TAKES_JSON = {"*/*", "application/*", "application/dicom+json", "application/json"}


def takes_dicom_json(accept: str) -> bool:
    """Whether an Accept header takes application/dicom+json: one of its media ranges does,
    with a quality above 0 (``;q=0`` refuses it)."""
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() not in _TAKES_JSON:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` Content-Type, or
    the refusal (415 for another media type, 400 without a boundary)."""
    media, _, params = content_type.partition(";")
    values = dict(
        (m.group(1).lower(), m.group(2) if m.group(2) is not None else m.group(3))
        for m in re.finditer(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"([^"]*)"|([^\s;]+))', params)
    )
    if media.strip().lower() != "multipart/related":
        raise Refusal(415, "expected Content-Type multipart/related; type=\"application/dicom\", "
                      f"found {content_type or 'none'!r}")  # fmt: skip
    kind = values.get("type", "application/dicom").strip().lower()
    if kind != "application/dicom":
        raise Refusal(415, f"expected multipart/related parts of type application/dicom (DICOM "
                      f"files), found type={kind!r}: the node takes no metadata and bulk data "
                      "requests")  # fmt: skip
    boundary = values.get("boundary", "")
    # RFC 2046 allows 70 characters; Orthanc's DICOMweb client sends 73, so more are taken
    if not 1 <= len(boundary) <= _MAX_BOUNDARY:
        raise Refusal(400, f"expected a boundary of 1 to {_MAX_BOUNDARY} characters in the "
                      f"Content-Type, found {boundary!r}")  # fmt: skip
    return boundary.encode("latin-1")


def _fixed(rfile: io.BufferedIOBase, length: int) -> Iterator[bytes]:
    left = length
    while left:
        piece = rfile.read(min(left, _PIECE))
        if not piece:
            raise Refusal(400, f"the body ended after {length - left} of the {length} bytes its "
                          "Content-Length announced; nothing was stored")  # fmt: skip
        left -= len(piece)
        yield piece


def _chunked(rfile: io.BufferedIOBase) -> Iterator[bytes]:
    """The data of a chunked body (RFC 9112 7.1), its trailers read and dropped."""
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            what = "the body ended" if not line else f"found {line[:40]!r}"
            raise Refusal(400, f"expected a chunk size line, {what}; nothing was stored") from None
        if size == 0:
            while rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                pass
            return
        yield from _fixed(rfile, size)
        if rfile.readline(8) not in (b"\r\n", b"\n"):
            raise Refusal(400, "expected CRLF after a chunk's data; nothing was stored")


@dataclass(frozen=True)
class Part:
    """Where one body part lies in the body, and its Content-Type (or '')."""

    content_type: str
    start: int
    end: int


def split_multipart(body: bytes | mmap.mmap, boundary: bytes) -> list[Part]:
    """The parts of a multipart body (RFC 2046 5.1), or a 400 :class:`Refusal` when the body
    does not have the structure (the close delimiter included: a body cut short is refused)."""
    delimiter = b"--" + boundary
    if body[: len(delimiter)] == delimiter:
        pos = 0
    else:
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise Refusal(400, "expected the multipart boundary of the Content-Type in the body, "
                          "found none")  # fmt: skip
        pos += 2
    parts: list[Part] = []
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", pos)
        head_end = body.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0:
            lf_only = body.find(b"\n\n", pos) >= 0
            raise Refusal(400, f"expected the headers of part {len(parts) + 1} to end with a "
                          "blank line, found the end of the body" + (
                              " (its lines end in LF alone: multipart lines end in CRLF, RFC "
                              "2046)" if lf_only else ""))  # fmt: skip
        content_type = ""
        for header in bytes(body[line_end + 2 : head_end]).split(b"\r\n"):
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-type":
                content_type = value.strip().decode("latin-1")
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise Refusal(400, f"expected part {len(parts) + 1} to end with a boundary, found "
                          "the end of the body (the close delimiter is missing)")  # fmt: skip
        parts.append(Part(content_type, start, end))
        pos = end + 2


def _response(stored: list[tuple[str, str]], failed: list[tuple[str, str, int]]) -> bytes:
    """The STOW-RS response data set, as DICOM JSON."""
    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for sop_class, sop_instance, reason in failed:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if sop_instance:
                item.ReferencedSOPInstanceUID = sop_instance
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return json.dumps(ds.to_json_dict()).encode()


def _linger(connection: socket.socket) -> None:
    """Close after an answer sent before the body was read: what the client still sends is
    read and dropped for a while (a bounded amount), so that closing with unread data does not
    reset the connection before the client has read the answer (a lingering close)."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(_LINGER_S)
        left = _LINGER_BYTES
        while left > 0:
            data = connection.recv(min(left, 1 << 16))
            if not data:
                return
            left -= len(data)


# ------------------------------------------------------------------------------ the server


@dataclass(frozen=True)
class Admitted:
    """A request that may send its body: the study its URL names ('' for none), the client,
    the multipart boundary, the body's announced length (None: chunked)."""

    study: str
    client: Client
    boundary: bytes
    length: int | None
    certificate: frozenset[str] | None = None  # the names of the client's TLS certificate


class _HttpServer(ConnectionLimit, HandshakeInThread, EitherFamily, ThreadingHTTPServer):
    daemon_threads = True
    listener = "STOW-RS receiver"


class StowReceiver:
    """The STOW-RS endpoint, storing through ``scp`` (whose settings, TLS context and audit
    trail it uses); temporary bodies go to ``tmp_dir``."""

    def __init__(self, settings: StowSettings, scp: StorageSCP, tmp_dir: Path) -> None:
        self.settings = settings
        self.clients = load_clients(settings.clients)
        self.scp = scp
        self.tmp_dir = tmp_dir
        self._answered: Counter[int] = Counter()  # requests by HTTP status
        self._lock = threading.Lock()
        self._busy = 0  # requests being stored
        self._stopping = False  # the node stops: no request starts storing
        self._storing = 0  # requests storing their parts now
        self.server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def configure(self, settings: StowSettings, clients: tuple[Client, ...]) -> None:
        """A reload's clients and limits (the address, port and path need a restart)."""
        self.settings, self.clients = settings, clients

    @property
    def in_progress(self) -> int:
        """Requests being read and stored now."""
        with self._lock:
            return self._busy

    def answered(self) -> dict[int, int]:
        """How many requests were answered, by HTTP status."""
        with self._lock:
            return dict(self._answered)

    # -------------------------------------------------------------- one request

    def admit(self, rq: BaseHTTPRequestHandler) -> Admitted:
        """What is checked before the body is read (and before a client that sent ``Expect:
        100-continue`` is told to send it): the URL, who calls, the media types, the framing
        and size of the body, the free space. Raises the :class:`Refusal`."""
        host = str(rq.client_address[0])
        study = self._target(rq.command, rq.path)
        certificate = certificate_names(rq.connection)
        client = authenticate(self.clients, rq.headers.get("Authorization", ""), host,
                              certificate)  # fmt: skip
        if isinstance(client, Refusal):
            self.scp.refusals.report(
                ("stow", host, str(client)),
                f"STOW-RS {rq.command} {rq.path} from {host} refused ({client.code}): {client}",
                f"STOW-RS request refused: {client}", host,
            )  # fmt: skip
            client.logged = True
            raise client
        if self.in_progress >= self.settings.max_requests:  # before the body is asked for
            raise _busy(f"{self.in_progress} requests are being stored (stow.max_requests); "
                        "retry later")  # fmt: skip
        boundary = boundary_of(rq.headers.get("Content-Type", ""))
        accept = rq.headers.get("Accept", "")
        if accept and not takes_dicom_json(accept):
            raise Refusal(406, f"expected an Accept header that takes application/dicom+json, "
                          f"found {accept!r}")  # fmt: skip
        return Admitted(study, client, boundary, self._length(rq), certificate)

    def handle(self, rq: BaseHTTPRequestHandler) -> None:
        host = str(rq.client_address[0])
        try:
            admitted = getattr(rq, "admitted", None) or self.admit(rq)
            with self._slot():
                code, body = self._post(rq, admitted, host)
            self._answer(rq, code, body, "application/dicom+json",
                         (("Retry-After", str(RETRY_AFTER_S)),) if code == 503 else ())  # fmt: skip
        except Refusal as r:
            self.refuse(rq, r)
        except OSError as exc:  # the client went away or stopped sending (timeout)
            log.warning("STOW-RS request from %s not read to its end: %s; nothing of it that "
                        "was not answered counts as stored", host, exc)  # fmt: skip
            rq.close_connection = True
        except Exception as exc:  # a bug: the receiver must answer, and keep serving
            log.exception("STOW-RS request from %s failed", host)
            self.refuse(rq, Refusal(500, f"the node failed on this request "
                                    f"({type(exc).__name__}); see its log"))  # fmt: skip

    def refuse(self, rq: BaseHTTPRequestHandler, refusal: Refusal) -> None:
        """Answer ``refusal`` and close the connection (the body may be unread)."""
        if not refusal.logged:
            log.warning("STOW-RS %s %s from %s refused (%d): %s", rq.command or "request",
                        getattr(rq, "path", "") or "", rq.client_address[0], refusal.code,
                        refusal)  # fmt: skip
        rq.close_connection = True
        with contextlib.suppress(OSError):  # a client already gone gets no answer
            self._answer(rq, refusal.code, (str(refusal) + "\n").encode(),
                         "text/plain; charset=utf-8", refusal.headers, close=True)  # fmt: skip
            _linger(rq.connection)

    def _target(self, method: str, raw_path: str) -> str:
        """The study the request's URL names ('' for ``{path}/studies``); refuses the rest."""
        path = urllib.parse.urlsplit(raw_path).path
        base = self.settings.path + "/studies"
        match = re.fullmatch(re.escape(base) + r"(?:/([0-9.]{1,64}))?/?", path)
        if match is None:
            raise Refusal(404, f"expected POST {base} or {base}/{{StudyInstanceUID}} (STOW-RS), "
                          f"found {method} {path}")  # fmt: skip
        if method != "POST":
            raise Refusal(405, f"expected POST (STOW-RS; the node answers no searches or "
                          f"retrievals), found {method}", (("Allow", "POST"),))  # fmt: skip
        return match.group(1) or ""

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            if self._busy >= self.settings.max_requests:
                raise _busy(f"{self._busy} requests are being stored (stow.max_requests); "
                            "retry later")  # fmt: skip
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    @contextlib.contextmanager
    def _storing_now(self) -> Iterator[None]:
        """A request whose body is in stores its parts: not once the node stops (its databases
        close), and a stop waits for those that began (:meth:`stop`)."""
        with self._lock:
            if self._stopping:
                raise _busy("the node is stopping; retry later")
            self._storing += 1
        try:
            yield
        finally:
            with self._lock:
                self._storing -= 1

    def _post(self, rq: BaseHTTPRequestHandler, admitted: Admitted, host: str) -> tuple[int, bytes]:
        with self._read_body(rq, admitted.length) as file:
            size = file.seek(0, 2)
            if size == 0:
                raise Refusal(400, "expected a multipart body, found an empty one")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as body:
                parts = split_multipart(body, admitted.boundary)
                if not parts:
                    raise Refusal(400, "expected at least one part in the body, found none")
                for n, part in enumerate(parts, 1):
                    media = part.content_type.split(";", 1)[0].strip().lower()
                    if media and media != "application/dicom":
                        raise Refusal(415, f"expected parts of type application/dicom, found "
                                      f"{part.content_type!r} in part {n}; nothing was "
                                      "stored")  # fmt: skip
                with self._storing_now():
                    return self._store_parts(body, parts, admitted, host)

    def _length(self, rq: BaseHTTPRequestHandler) -> int | None:
        """The announced length of the body (None: chunked), within the limits."""
        limit = self.settings.max_request_mb * 2**20
        encoding = rq.headers.get("Transfer-Encoding", "").strip().lower()
        lengths = rq.headers.get_all("Content-Length") or []
        length = lengths[0] if lengths else None
        # a body framed two ways is read one way here and another by a proxy in front: a
        # request hidden in a body (RFC 9112 6.3)
        if len({v.strip() for v in lengths}) > 1:
            raise Refusal(400, f"expected one Content-Length, found {', '.join(lengths)}")
        if encoding and encoding != "identity":
            if encoding != "chunked":
                raise Refusal(501, f"expected Transfer-Encoding chunked or none, found "
                              f"{encoding!r}")  # fmt: skip
            if length is not None:
                raise Refusal(400, "expected Content-Length or Transfer-Encoding chunked, found "
                              "both")  # fmt: skip
            return None
        if length is None:
            raise Refusal(411, "expected a Content-Length or chunked transfer encoding, found "
                          "neither")  # fmt: skip
        if not length.strip().isdigit():
            raise Refusal(400, f"expected a Content-Length in bytes, found {length!r}")
        size = int(length)
        if size > limit:
            raise Refusal(413, f"a body of {size} bytes; stow.max_request_mb allows {limit}")
        self._check_space(size)
        return size

    def _read_body(self, rq: BaseHTTPRequestHandler, length: int | None) -> IO[bytes]:
        """The request's body (``length`` bytes, or chunked) in an unnamed temporary file."""
        limit = self.settings.max_request_mb * 2**20
        known = length is not None
        pieces = _chunked(rq.rfile) if length is None else _fixed(rq.rfile, length)
        # closed by the caller (the with statement of _post), or below when reading fails
        file = tempfile.TemporaryFile(dir=self.tmp_dir)  # noqa: SIM115
        try:
            total = 0
            for piece in pieces:
                if not known and total // _SPACE_CHECK != (total + len(piece)) // _SPACE_CHECK:
                    self._check_space(_SPACE_CHECK)
                total += len(piece)
                if total > limit:
                    raise Refusal(413, f"a chunked body past {limit} bytes (stow.max_request_mb); "
                                  "nothing was stored")  # fmt: skip
                file.write(piece)
            file.flush()
            log.debug("STOW-RS body: %d bytes%s", total, "" if known else ", chunked")
        except BaseException:
            file.close()
            raise
        return file

    def _check_space(self, incoming: int) -> None:
        try:
            self.scp.spool.check_space(incoming)
        except OutOfSpaceError as exc:
            log.error("STOW-RS request deferred (503): %s", exc)
            raise _busy(f"the node is short of disk space ({exc}); retry later") from exc

    def _store_parts(
        self, body: mmap.mmap, parts: list[Part], admitted: Admitted, host: str
    ) -> tuple[int, bytes]:
        client, study = admitted.client, admitted.study
        origin = Origin(client.name, host)
        self.scp.sub_operations_from(origin, client.name, host, admitted.certificate)
        stored: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        try:
            for part in parts:
                outcome = self._store_one(body[part.start : part.end], origin, study)
                if outcome[2] == SUCCESS:
                    stored.append(outcome[:2])
                else:
                    failed.append(outcome)
        finally:
            self.scp.sub_operations_ended(origin)
        if not failed:
            code = 200
        elif stored:
            code = 202
        elif all(reason == OUT_OF_RESOURCES for *_, reason in failed):
            code = 503  # nothing stored for want of room: the whole request may come again
        else:
            code = 409
        log.info(
            "STOW-RS from %s at %s: %d of %d instance(s) stored (%d)%s", client.name, host,
            len(stored), len(parts), code,
            "; failures " + ", ".join(f"0x{r:04X}" for *_, r in failed) if failed else "",
        )  # fmt: skip
        return code, _response(stored, failed)

    def _store_one(self, data: bytes, origin: Origin, study: str) -> tuple[str, str, int]:
        """(SOP Class UID, SOP Instance UID, status) of one part, stored when it may be."""
        sender = origin.acceptor.ae_title
        try:
            part = Part10.read(data)
        except Exception as exc:  # pydicom raises many types on malformed data
            log.warning("STOW-RS part from %s undecodable (0xC210): %s", sender, exc)
            return "", "", CANNOT_UNDERSTAND
        uids = part.sop_class, part.sop_instance
        if part.sop_class not in STORAGE_CLASSES:
            log.warning("STOW-RS part from %s refused (0x0122): SOP class %s is not taken "
                        "(docs/CONFORMANCE.md)", sender, part.sop_class)  # fmt: skip
            return (*uids, SOP_CLASS_NOT_SUPPORTED)
        if part.transfer_syntax not in TRANSFER_SYNTAXES:
            log.warning("STOW-RS part from %s refused (0xC122): transfer syntax %s is not taken",
                        sender, part.transfer_syntax)  # fmt: skip
            return (*uids, TRANSFER_SYNTAX_NOT_SUPPORTED)
        found = str(part.dataset.get("StudyInstanceUID", ""))
        if study and found != study:
            log.warning("STOW-RS part from %s refused (0xC409): study %s in a request for "
                        "study %s", sender, found, study)  # fmt: skip
            return (*uids, STUDY_MISMATCH)
        status = self.scp.store_read(part, origin)
        return (*uids, status if isinstance(status, int) else int(status.Status))

    def _answer(
        self, rq: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str,
        headers: tuple[tuple[str, str], ...] = (), close: bool = False,
    ) -> None:  # fmt: skip
        with self._lock:
            self._answered[code] += 1
        rq.send_response(code)
        rq.send_header("Content-Type", content_type)
        rq.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            rq.send_header(name, value)
        if close:
            rq.send_header("Connection", "close")
            rq.close_connection = True
        rq.end_headers()
        rq.wfile.write(body)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        receiver = self

        class Handler(HeadersInTime, BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "glioforecast"
            headers_timeout_s = receiver.scp.settings.acse_timeout_s

            def setup(self) -> None:
                super().setup()
                # a client that stops sending is dropped (the setting may change by a reload)
                self.connection.settimeout(receiver.scp.settings.network_timeout_s)

            #: what admit() found of the request this handler reads now (one per request:
            #: the handler serves every request of a kept-alive connection)
            admitted: Admitted | None = None

            def handle_one_request(self) -> None:
                # a request checked at its Expect: 100-continue was used for the next ones on
                # the connection too: their credentials, study, length and boundary unchecked
                self.admitted = None
                super().handle_one_request()

            def handle_expect_100(self) -> bool:
                """``Expect: 100-continue``: the body is asked for only once the request
                passed what can be checked without it; otherwise the refusal is the answer,
                before the client sends a byte of a body that would be refused."""
                try:
                    self.admitted = receiver.admit(self)
                except Refusal as refusal:
                    receiver.refuse(self, refusal)
                    return False
                return super().handle_expect_100()

            def send_error(
                self, code: int, message: str | None = None, explain: str | None = None
            ) -> None:
                """What http.server refuses itself (a request line or header over its limits:
                414, 431; a malformed request line: 400) is answered, logged and counted as
                the receiver's own refusals are (it was HTML, unlogged and uncounted)."""
                said = message or http.HTTPStatus(code).phrase
                why = f"{said} (expected a request line and headers within http.server's limits)"
                receiver.refuse(self, Refusal(code, why))

            def do_POST(self) -> None:
                receiver.handle(self)

            do_GET = do_PUT = do_DELETE = do_HEAD = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("stow: " + format, *args)

        s = self.settings
        try:
            server = _HttpServer((s.bind_address, s.port), Handler)
        except OSError as exc:
            raise GlioforecastError(
                cannot_listen("STOW-RS receiver", s.bind_address, s.port, exc, "stow", True)
            ) from exc
        server.ssl_context = self.scp.ssl_context
        server.handshake_timeout_s = self.scp.settings.acse_timeout_s
        server.limits = self.scp.connection_limits
        server.refusals = self.scp.refusals
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"stow-rs:{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("STOW-RS receiver not started")
        return int(self.server.server_address[1])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop taking requests; let those storing their parts finish (at most ``wait_s``)
        before the node closes its databases. A request whose body is still arriving is
        answered 503 with Retry-After once it is in (it was answered 500)."""
        if self.server is not None:
            stop_serving(self.server)
            self.server.server_close()
            self.server = None
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._storing:
                    break
            time.sleep(0.05)
