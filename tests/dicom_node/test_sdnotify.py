"""systemd notifications from a real `glioforecast serve` (Type=notify, watchdog)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dicom_node.ports import free_port
from tests.conftest import REPO


def test_serve_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    config = tmp_path / "node.yaml"
    config.write_text(f"health: {{port: {free_port()}}}\n")
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    log = (tmp_path / "node.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve",
         "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    messages: list[str] = []
    try:
        messages.append(listener.recv(4096).decode())
        assert messages[0].startswith("READY=1")
        deadline = time.monotonic() + 10
        while messages.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            messages.append(listener.recv(4096).decode())
        assert messages.count("WATCHDOG=1") >= 3  # petted at half the 0.2 s period
        # SIGUSR1: every thread's stack to stderr, and the node runs on
        server.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "Thread 0x" not in (tmp_path / "node.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "no thread stacks after SIGUSR1"
            time.sleep(0.1)
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGUSR1)  # the node writes its threads' stacks
            time.sleep(2)
            server.kill()
            server.wait(timeout=30)
            code = None
        log.close()
        text = (tmp_path / "node.log").read_text(errors="replace")
        assert code == 0, f"the node did not stop within 60 s of SIGTERM:\n{text[-6000:]}"
    while "STOPPING=1" not in messages:
        messages.append(listener.recv(4096).decode())
    listener.close()


def test_a_stop_signal_landing_inside_the_loops_wait_does_not_deadlock(tmp_path: Path) -> None:
    """SIGTERM's handler runs on the main thread, which may be inside the loop's
    ``Event.wait`` holding the event's lock at that instant: the handler must not take it (it
    did, and once in CI the node ignored SIGTERM). Reproduced deterministically: the handler is
    called by a thread that holds that lock (CPython's ``Event._cond``)."""
    import threading

    from dicom_node.service import Node
    from tests.dicom_node.conftest import make_settings

    node = Node(make_settings(tmp_path / "data"))

    def signal_inside_wait() -> None:
        with node._stop._cond:  # type: ignore[attr-defined]
            node.request_stop(signal.SIGTERM, None)

    handler = threading.Thread(target=signal_inside_wait, daemon=True)
    handler.start()
    handler.join(timeout=5)
    # (a blocked handler keeps the lock: node.stop() would block on it too, so it is not called)
    assert not handler.is_alive(), "the SIGTERM handler blocked on the event's lock"
    try:
        started = time.monotonic()
        node.run_forever()  # sees the request at once
        assert time.monotonic() - started < 5
    finally:
        node.stop()
