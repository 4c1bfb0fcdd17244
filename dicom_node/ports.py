"""Port numbers for servers this machine starts as separate processes: the local PACS of the
demo, the test suite's Orthanc, storescp and dcmqrscp, the federated loopback's SuperLink.

The usual trick, binding a socket to port 0 and closing it, returns a port from the kernel's
ephemeral range, and that is where the kernel also picks the port of every later bind to port 0
(a node started with ``port: 0``) and the local end of every outgoing connection. One of those
can take the number before the process it was meant for binds it; CI once saw Orthanc refuse
to start because the node's STOW-RS receiver, started after the number was chosen, had been
given the same port. :func:`free_port` therefore chooses below the ephemeral range, where the
kernel never picks on its own, checks that nothing listens there, and never gives one process
the same number twice. :func:`host_port` writes an address and a port as the log and the
messages show them.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

#: where the kernel's ephemeral ports are configured (Linux)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: the lowest port handed out: clear of the registered services most machines run
LOWEST = 10000

_given: set[int] = set()
_lock = threading.Lock()


def ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The kernel's ephemeral port range; Linux's default where it cannot be read."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _candidates(low: int, high: int) -> list[int]:
    """Ports outside ``[low, high]`` and at or above :data:`LOWEST`, below the range first."""
    below = list(range(LOWEST, low))
    above = list(range(high + 1, 65536))
    return below if len(below) >= 1000 else below + above


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that nothing on this machine listens on now, outside the ephemeral range, not
    given before by this process. Falls back to the kernel's choice only if the ports outside
    that range are all taken."""
    pool = _candidates(*ephemeral_range())
    with _lock:
        for port in random.sample(pool, min(len(pool), 200)):
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        _given.add(port)
        return port


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:11112``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
