"""What the node's listening servers share (the DICOM receiver, the STOW-RS receiver, the
health endpoint): IPv4 and IPv6, the TLS handshake in each connection's thread, and a cap on
the connections held open at once.
"""

from __future__ import annotations

import collections
import errno
import io
import ipaddress
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from dicom_node.ports import host_port
from dicom_node.refusals import Refusals


class HandshakeInThread:
    """A mixin for a threaded ``socketserver`` server whose TLS handshake runs in each
    connection's thread (the DICOM receiver, the STOW-RS receiver).

    Wrapping an accepted socket in the accept loop, handshake included, lets one client that
    connects and says nothing hold up every other TLS client for the network timeout (a port
    scanner, a load balancer's TCP check). Here the accept loop only accepts; the handshake
    runs in the connection's thread, within :attr:`handshake_timeout_s`, and a failure goes to
    :attr:`refusals` (the log and the audit trail) with its reason: the
    :class:`ConnectionLimit` it is mixed with sets it.
    """

    ssl_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    listener: str  # these two: the ConnectionLimit's
    refusals: Refusals

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listening: socket.socket = self.socket  # type: ignore[attr-defined]
        client, address = listening.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            host = str(client_address[0])
            timeout = request.gettimeout()
            request.settimeout(self.handshake_timeout_s)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                reason = tls_failure_reason(exc)
                self.refusals.report(
                    ("tls", self.listener, host, reason),
                    f"{self.listener}: TLS handshake from {host} failed: {reason}",
                    f"TLS handshake failed: {reason}", host,
                )  # fmt: skip
                self.shutdown_request(request)  # type: ignore[attr-defined]
                return
            request.settimeout(timeout)
        super().finish_request(request, client_address)  # type: ignore[misc]


class EitherFamily:
    """A mixin for a ``socketserver`` server (the HTTP ones: ``socketserver`` makes IPv4
    sockets only; pynetdicom's DICOM server does this itself) that listens on an IPv6 address
    with an IPv6 socket."""

    address_family: int = socket.AF_INET

    def __init__(self, server_address: tuple[str, int], *args: Any, **kwargs: Any) -> None:
        self.address_family = address_family(server_address[0])
        super().__init__(server_address, *args, **kwargs)  # type: ignore[call-arg]


class ConnectionLimit:
    """A mixin for a threaded ``socketserver`` server (the DICOM receiver, the STOW-RS receiver,
    the health endpoint) that holds at most ``limits()[0]`` connections open at once, and at
    most ``limits()[1]`` from one address (``node.max_connections``,
    ``node.max_connections_per_host``).

    Every connection costs a file descriptor and a thread (two for a DICOM one: the
    association's and its DUL's) from the moment it is accepted, whether or not it ever sends a
    byte, until a timeout closes it. Without a cap, a port scanner or a router that opens
    connections faster than the timeouts close them would use up the node's threads (systemd's
    ``TasksMax``) or descriptors, and with them the workers and the spool's writes. A connection
    over either limit is closed at once, before a thread starts for it: the sender sees the
    connection closed and retries, as after any network error. Refusals go to :attr:`refusals`
    (the log and the audit trail, once a minute per address with the number refused in
    between); :attr:`refused` counts them by the setting they were over. An ``accept`` that
    fails for want of descriptors is counted (``accept_failed``) and logged the same way, and
    the loop pauses instead of spinning on the listening socket, which stays readable.
    """

    listener = "receiver"
    #: connections the kernel queues until the loop accepts them (``socketserver`` has 5: a
    #: burst of six, a router opening its associations at once, lost one connection request,
    #: and that sender waited a second for TCP to send it again)
    request_queue_size = 128
    limits: Callable[[], tuple[int, int]] = staticmethod(lambda: (100, 20))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: list[tuple[weakref.ref[socket.socket], str]] = []
        self._open_lock = threading.Lock()
        #: where refusals are reported: the node gives its own (logged and audited); this one
        #: only logs
        self.refusals = Refusals()
        self.refused: collections.Counter[str] = collections.Counter()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        listening: socket.socket = self.socket  # type: ignore[attr-defined]
        if listening.family == socket.AF_INET6:
            # "::" takes IPv4 clients too, whatever net.ipv6.bindv6only says
            listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()  # type: ignore[misc]

    def _still_open(self) -> list[tuple[weakref.ref[socket.socket], str]]:
        """The connections not closed yet (under ``_open_lock``)."""
        alive = []
        for ref, host in self._open:
            sock = ref()
            if sock is not None and sock.fileno() != -1:
                alive.append((ref, host))
        self._open = alive
        return alive

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._still_open())

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        try:
            request, address = super().get_request()  # type: ignore[misc]
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._refuse("", "accept_failed", f"cannot accept a connection: {exc}")
                time.sleep(0.1)
            raise
        # an IPv4 client of a dual-stack listener is named by its IPv4 address (the log, the
        # audit trail, node.allowed_callers and the limits per address see one name for it)
        return request, (peer_host(address[0]), address[1])

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        most, most_from_host = self.limits()
        with self._open_lock:
            open_now = self._still_open()
            from_host = sum(1 for _, h in open_now if h == host)
            if len(open_now) >= most:
                kind = "max_connections"
                reason = f"{len(open_now)} connections open, node.max_connections is {most}"
            elif from_host >= most_from_host:
                kind = "max_connections_per_host"
                reason = (f"{from_host} connections open from {host}, "
                          f"node.max_connections_per_host is {most_from_host}")  # fmt: skip
            else:
                self._open.append((weakref.ref(request), host))
                return bool(super().verify_request(request, client_address))  # type: ignore[misc]
        self._refuse(host, kind, reason)
        return False

    def _refuse(self, host: str, kind: str, reason: str) -> None:
        self.refused[kind] += 1
        if not host:  # no connection: the node is short of descriptors, not under a caller
            self.refusals.report((self.listener, kind), f"{self.listener}: {reason}")
            return
        self.refusals.report(
            (self.listener, host),
            f"{self.listener}: connection from {host} closed at once: {reason}",
            f"{self.listener}: connection closed at once: {reason}", host,
        )  # fmt: skip


class _Reader(io.RawIOBase):
    """A connection's reads, under a deadline for the whole of what is read while one is set
    (armed: from the first byte that comes)."""

    def __init__(self, connection: socket.socket, on_late: Callable[[], None]) -> None:
        super().__init__()
        self._connection = connection
        self._on_late = on_late
        self._per_read: float | None = None
        self._limit_s: float | None = None
        self._deadline: float | None = None

    def readable(self) -> bool:
        return True

    def arm(self, limit_s: float) -> None:
        self._limit_s, self._deadline = limit_s, None

    def disarm(self) -> None:
        if self._limit_s is not None and self._deadline is not None:
            self._connection.settimeout(self._per_read)
        self._limit_s = self._deadline = None

    def readinto(self, buffer: Any) -> int:
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._on_late()
                raise TimeoutError("the request line and headers did not come whole in time")
            self._connection.settimeout(left if self._per_read is None
                                        else min(left, self._per_read))  # fmt: skip
        try:
            n = self._connection.recv_into(buffer)
        except TimeoutError:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._on_late()
            raise
        if n and self._limit_s is not None and self._deadline is None:
            self._per_read = self._connection.gettimeout()
            self._deadline = time.monotonic() + self._limit_s
        return n


class HeadersInTime:
    """A mixin for a ``BaseHTTPRequestHandler`` of a :class:`ConnectionLimit` server: a
    request's line and headers must come whole within :attr:`headers_timeout_s` of their first
    byte. The connection's timeout holds for each read, so a client that sent its headers a
    byte at a time, each within it, held the connection and its thread as long as it went on.
    The body is read under the connection's timeout alone (a large one may take long)."""

    headers_timeout_s: float = 30.0
    rfile: io.BufferedIOBase
    #: what the connection's reads go through
    _reader: _Reader

    def setup(self) -> None:
        super().setup()  # type: ignore[misc]
        self._reader = _Reader(self.connection, self._late)  # type: ignore[attr-defined]
        self.rfile.close()  # the socket's own file: unused
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.arm(self.headers_timeout_s)
        super().handle_one_request()  # type: ignore[misc]

    def parse_request(self) -> bool:
        parsed = bool(super().parse_request())  # type: ignore[misc]
        self._reader.disarm()
        return parsed

    def _late(self) -> None:
        server = self.server  # type: ignore[attr-defined]
        host = str(self.client_address[0])  # type: ignore[attr-defined]
        server.refusals.report(
            (server.listener, host, "late headers"),
            f"{server.listener}: connection from {host} closed: its request line and headers "
            f"did not come whole within {self.headers_timeout_s:.0f} s",
        )  # fmt: skip


#: OpenSSL's reasons for a failed server-side handshake, in words
_TLS_REASONS = {
    "UNEXPECTED_EOF_WHILE_READING": "the client closed the connection during the handshake",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "the client presented no certificate (node.tls.require_client_certificate is on)"
    ),
    "CERTIFICATE_VERIFY_FAILED": (
        "the client's certificate is not trusted (not signed by node.tls.ca_certificates, or "
        "expired)"
    ),
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the node's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused the node's certificate",
    "WRONG_VERSION_NUMBER": "not TLS: a client without TLS on the node's TLS port?",
    "HTTP_REQUEST": "not TLS: an HTTP request on the node's TLS port",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions older than 1.2",
    "NO_SHARED_CIPHER": "no cipher suite in common with the client",
}


def tls_failure_reason(exc: BaseException) -> str:
    """Why a client's TLS handshake failed, in words (OpenSSL's own text after them)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no TLS handshake within node.acse_timeout_s"
    reason = str(getattr(exc, "reason", None) or "")
    text = str(getattr(exc, "strerror", None) or exc) or type(exc).__name__
    said = _TLS_REASONS.get(reason)
    return f"{said} ({text})" if said else text


def address_family(host: str) -> socket.AddressFamily:
    """The socket family for listening on ``host`` (an IP address)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def peer_host(host: str) -> str:
    """A peer's address as the node names it: an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return host


def cannot_listen(
    what: str, host: str, port: int, exc: OSError, section: str, optional: bool = False
) -> str:
    """Why ``what`` could not listen on ``host``:``port``, and what to change (the settings of
    ``section``; ``optional``: it can be turned off with ``enabled: false``)."""
    if exc.errno == errno.EADDRINUSE:
        expected = f"a free port: stop the other listener, or set {section}.port" + (
            f", or {section}.enabled: false" if optional else "")  # fmt: skip
    elif exc.errno == errno.EADDRNOTAVAIL:
        expected = (f"an address of this machine in {section}.bind_address (`ip -brief address` "
                    "lists them; 0.0.0.0 or :: for all of them)")  # fmt: skip
    elif exc.errno == errno.EACCES:
        expected = (f"a port the node may open: set {section}.port to 1024 or above, or grant "
                    "CAP_NET_BIND_SERVICE (the systemd unit says how)")  # fmt: skip
    else:
        expected = f"an address and port to listen on in {section}.bind_address and .port"
    return f"{what}: cannot listen on {host_port(host, port)} ({exc}); expected {expected}"
