"""Shared fixtures: real data from ../shared (skipped when absent) and external tools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of real public DICOM files; the test skips when ../shared is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent")
    return REAL_DATA


def tool(name: str) -> str:
    """Absolute path of a Debian tool (dcmtk, dicom3tools...), or skip the test.

    dcmtk tools are looked up in /usr/bin first: pynetdicom installs console scripts with the
    same names (storescu, storescp, echoscu) into the virtual environment.
    """
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip(f"{name} is not installed (scripts/bootstrap.sh installs it as root)")
    raise AssertionError  # unreachable


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    return tool("dciodvfy")


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port that is free on localhost right now (for subprocesses that need a number)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
