"""systemd notifications from a real `glioforecast serve` (Type=notify, watchdog)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_port


def test_serve_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    config = tmp_path / "node.yaml"
    config.write_text(f"health: {{port: {free_port()}}}\n")
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    server = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve",
         "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    messages: list[str] = []
    try:
        messages.append(listener.recv(4096).decode())
        assert messages[0].startswith("READY=1")
        deadline = time.monotonic() + 10
        while messages.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            messages.append(listener.recv(4096).decode())
        assert messages.count("WATCHDOG=1") >= 3  # petted at half the 0.2 s period
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    while "STOPPING=1" not in messages:
        messages.append(listener.recv(4096).decode())
    listener.close()
