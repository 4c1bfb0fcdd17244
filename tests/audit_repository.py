"""A real audit record repository for the tests: rsyslogd (Debian ``rsyslog`` with
``rsyslog-gnutls``) taking syslog over TLS (RFC 5425) and UDP (RFC 5426) on free localhost ports
and writing each message's content, one per line, to a file the tests read."""

from __future__ import annotations

import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import IO

from dicom_node.ports import free_port
from tests.conftest import listening, tool

CONFIG = """\
global(workDirectory="{work}" maxMessageSize="64k"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{ca}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.Authmode="{authmode}")
input(type="imtcp" port="{tls_port}")
module(load="imudp")
input(type="imudp" port="{udp_port}" address="127.0.0.1")
template(name="content" type="string" string="%APP-NAME% %MSGID% %PRI% %msg%\\n")
action(type="omfile" file="{out}" template="content")
"""


class AuditRepository:
    """rsyslogd as an audit record repository; ``client_certificates``: the TLS port asks
    for a client certificate signed by the ``pki`` CA (``x509/certvalid``)."""

    def __init__(self, workdir: Path, pki: Path, *, client_certificates: bool = False) -> None:
        self.workdir = workdir
        self.out = workdir / "received.log"
        self.tls_port = free_port()
        self.udp_port = free_port()
        (workdir / "work").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "rsyslog.conf"
        self.config.write_text(
            CONFIG.format(
                work=workdir / "work",
                ca=pki / "ca.pem",
                cert=pki / "server.pem",
                key=pki / "server.key",
                authmode="x509/certvalid" if client_certificates else "anon",
                tls_port=self.tls_port,
                udp_port=self.udp_port,
                out=self.out,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._err: IO[bytes] | None = None

    def start(self) -> AuditRepository:
        self._err = open(self.workdir / "rsyslogd.err", "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [tool("rsyslogd"), "-n", "-f", str(self.config), "-i", str(self.workdir / "pid")],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )
        deadline = time.monotonic() + 30
        while not listening(self.tls_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "rsyslogd did not start: " + (self.workdir / "rsyslogd.err").read_text()
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None
        if self._err is not None:
            self._err.close()
            self._err = None

    def lines(self) -> list[str]:
        return self.out.read_text("utf-8").splitlines() if self.out.exists() else []

    def messages(self) -> list[ET.Element]:
        """Every audit message received, parsed; the syslog header is checked on the way."""
        out = []
        for line in self.lines():
            app, msgid, pri, content = line.split(" ", 3)
            assert (app, msgid, pri) == ("glioforecast", "IHE+RFC-3881", "85"), line[:80]
            assert content.startswith("\ufeff"), "RFC 5424: UTF-8 content starts with a BOM"
            out.append(ET.fromstring(content[1:]))
        return out


def event_id(message: ET.Element) -> str:
    ident = message.find("EventIdentification/EventID")
    assert ident is not None
    return ident.get("csd-code", "")


def security_alerts(audit_file: Path) -> list[str]:
    """The outcome descriptions of the Security Alert messages (110113) in a node's audit log
    file (``audit.file``), oldest first; none while the file does not exist."""
    lines = audit_file.read_text("utf-8").splitlines() if audit_file.exists() else []
    messages = [ET.fromstring(line) for line in lines]
    return [
        m.findtext("EventIdentification/EventOutcomeDescription") or ""
        for m in messages
        if event_id(m) == "110113"
    ]
