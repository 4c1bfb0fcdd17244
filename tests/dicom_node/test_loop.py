"""A background loop whose step raises keeps running: it logs, waits longer each time, lets its
owner put right what the step left, and works again once the cause is gone. A job process
ends with its parent."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicom_node import loop
from dicom_node.loop import BackgroundLoop
from tests.conftest import REPO, wait_for


class Flaky(BackgroundLoop):
    thread_name = "flaky"

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.steps = 0
        self.recovered = 0
        self.worked = threading.Event()

    def step(self) -> float:
        self.steps += 1
        if self.steps <= self.failures:
            raise RuntimeError(f"database is locked ({self.steps})")
        self.worked.set()
        return 60.0

    def recover(self) -> None:
        self.recovered += 1


def test_a_step_that_raises_does_not_end_the_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    monkeypatch.setattr(loop, "ERROR_WAIT_S", 0.05)
    flaky = Flaky(failures=3)
    flaky.start()
    try:
        assert flaky.worked.wait(10)
        assert flaky.alive and flaky.steps == 4 and flaky.recovered == 3
    finally:
        flaky.stop(5)
    assert not flaky.alive
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage().split(";")[0] for r in failed] == [
        f"flaky: step failed ({n} in a row)" for n in (1, 2, 3)
    ]
    assert "flaky: works again after 3 failed step(s)" in caplog.text


def test_the_wait_after_a_failed_step_doubles_up_to_a_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    flaky = Flaky(failures=9)
    real_wait = flaky._wake.wait

    def wait(timeout: float | None = None) -> bool:
        waits.append(float(timeout or 0))
        return real_wait(0.001)

    monkeypatch.setattr(flaky._wake, "wait", wait)
    flaky.start()
    try:
        wait_for(lambda: flaky.worked.is_set(), timeout=10, what="the loop to work again")
    finally:
        flaky.stop(5)
    assert waits[:9] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_job_process_ends_with_its_parent() -> None:
    """A job process whose node was killed (run by hand, not by its service, which kills the
    whole group) went on writing results beside the next node. It asks the kernel to kill it
    when its parent (the fork server, which ends with the node) ends."""
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, time\n"
            "from dicom_node.worker import die_with_parent\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    die_with_parent()\n"
            "    time.sleep(120)\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            "time.sleep(120)\n"
        )],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)  # the child has asked the kernel by then
        assert not _gone(child)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: _gone(child), timeout=10, what="the job process to end with its parent")
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
