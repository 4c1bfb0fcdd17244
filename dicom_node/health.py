"""Health and Prometheus metrics over HTTP, on localhost by default.

``GET /health`` answers 200 with a JSON summary while the receiver, the worker and the sender
run, 503 (with the same summary) when one of them has stopped. ``GET /metrics`` answers the
Prometheus text format. Neither carries patient data: only counts, states and durations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dicom_node.listener import ConnectionLimit, EitherFamily, HeadersInTime
from dicom_node.refusals import Refusals

log = logging.getLogger(__name__)


#: seconds the health endpoint waits for a request on a connection
REQUEST_TIMEOUT_S = 10.0


class _HttpServer(ConnectionLimit, EitherFamily, ThreadingHTTPServer):
    daemon_threads = True
    listener = "health endpoint"


class HealthServer:
    def __init__(
        self,
        bind_address: str,
        port: int,
        summary: Callable[[], dict[str, Any]],
        metrics: Callable[[], str],
        limits: Callable[[], tuple[int, int]],
        refusals: Refusals,
    ) -> None:
        """``limits``: the connections held open at once, in all and from one address, and
        ``refusals`` what hears of a connection closed over them
        (:class:`~dicom_node.listener.ConnectionLimit`; the node passes its settings' and its
        own, which logs and audits)."""
        self.summary = summary
        self.metrics = metrics
        owner = self

        class Handler(HeadersInTime, BaseHTTPRequestHandler):
            # a probe sends its request at once: a connection that says nothing is closed
            # after this many seconds (without it, it held its thread for ever), and one that
            # sends its request a byte at a time too
            timeout = headers_timeout_s = REQUEST_TIMEOUT_S

            def do_GET(self) -> None:
                # the path alone: a scrape job's ``params:`` add a query string
                path = urllib.parse.urlsplit(self.path).path
                try:
                    if path == "/health":
                        data = owner.summary()
                        code = 200 if data.get("status") == "ok" else 503
                        self._answer(code, "application/json", json.dumps(data, indent=1))
                    elif path == "/metrics":
                        self._answer(200, "text/plain; version=0.0.4", owner.metrics())
                    else:
                        self._answer(404, "text/plain", "try /health or /metrics\n")
                except Exception as exc:  # a broken probe must not take the node down
                    log.exception("health endpoint failed")
                    self._answer(500, "text/plain", f"{type(exc).__name__}\n")

            def do_HEAD(self) -> None:
                """As GET without the body (a load balancer's or a monitor's check)."""
                self._head_only = True
                try:
                    self.do_GET()
                finally:
                    self._head_only = False

            def _answer(self, code: int, content_type: str, body: str) -> None:
                data = body.encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not getattr(self, "_head_only", False):
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health: " + format, *args)

        self.server = _HttpServer((bind_address, port), Handler)
        self.server.limits = limits
        self.server.refusals = refusals
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="health-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which must be running
            stop_serving(self.server)
        self.server.server_close()


def stop_serving(server: socketserver.BaseServer) -> None:
    """Stop a running ``serve_forever`` of ``server`` now, rather than at its next poll (half
    a second, for each of the node's listening servers): the listening socket is shut down
    once the stop is asked, which wakes the loop; no connection is made to it."""
    stopper = threading.Thread(target=server.shutdown, name="stop-serving", daemon=True)
    stopper.start()
    listening = getattr(server, "socket", None)
    if listening is not None:
        with contextlib.suppress(OSError):
            listening.shutdown(socket.SHUT_RDWR)
    stopper.join()


def prometheus(
    samples: list[tuple[str, str, dict[str, str], float]], summaries: frozenset[str] = frozenset()
) -> str:
    """Prometheus text format from (name, help, labels, value) samples, grouped by name; the
    ``NAME_sum`` and ``NAME_count`` samples of a NAME in ``summaries`` are one summary."""
    lines: list[str] = []
    seen: set[str] = set()
    for name, help_text, labels, value in samples:
        family, kind = name, "counter" if name.endswith("_total") else "gauge"
        for suffix in ("_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in summaries:
                family, kind = name[: -len(suffix)], "summary"
        if family not in seen:
            seen.add(family)
            lines += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}"]
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        number = _number(value)
        lines.append(f"{name}{{{label_text}}} {number}" if labels else f"{name} {number}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A sample value, exact: counters past a million and timestamps keep every digit."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
