"""Shared fixtures: real data from ../shared (skipped when absent) and external tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

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
    for candidate in (f"/usr/bin/{name}", f"/usr/sbin/{name}", shutil.which(name)):
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


def listening(port: int) -> bool:
    """Whether something listens for TCP connections on ``port`` (read from ``/proc/net/tcp``,
    so the check itself opens no connection the listener would log or answer)."""
    import os

    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[1].endswith(hex_port) and fields[3] == "0A":  # LISTEN
                    return True
    return False


def start_listener(command: list[str], port: int, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a server process and return once it listens on ``port`` (fail if it exits first).

    A test that started a peer and went on at once raced it: a node that tried the port before
    the peer listened put its delivery off until the next retry.
    """
    proc = subprocess.Popen(command, **popen)

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{command[0]} exited with {proc.returncode} before listening on {port}")
        return listening(port)

    try:
        wait_for(up, timeout=30, what=f"{Path(command[0]).name} to listen on {port}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


@pytest.fixture(scope="session")
def pki(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Throw-away certificates (openssl): a CA; a server certificate for 127.0.0.1 and
    localhost and three client certificates, all signed by it: ``client`` (common name
    client, alternative name glioforecast), ``scanner`` (scanner, mr1.radiology.example) and
    ``legacy`` (common name ct2.radiology.example, no alternative name); another CA that signed
    nothing."""
    openssl = tool("openssl")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
            f"{ca}.pem", "-days", "2", "-subj", f"/CN=glioforecast test {ca}")  # fmt: skip
    for name, san in (
        ("server", "IP:127.0.0.1,DNS:localhost"),
        ("client", "DNS:glioforecast"),
        ("scanner", "DNS:mr1.radiology.example"),
        ("legacy", None),
    ):
        subject = "/CN=ct2.radiology.example" if san is None else f"/CN={name}"
        extension = () if san is None else ("-addext", f"subjectAltName={san}")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", subject, *extension)  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-copy_extensions", "copy")  # fmt: skip
    return d


def receiver_tls(pki: Path):  # type: ignore[no-untyped-def]
    """``node.tls`` for a receiver that takes TLS only, from callers with a certificate of the
    ``pki`` fixture's CA."""
    from dicom_node.settings import TLSSettings

    return TLSSettings(
        enabled=True,
        certificate=pki / "server.pem",
        private_key=pki / "server.key",
        ca_certificates=pki / "ca.pem",
        require_client_certificate=True,
    )
