"""A local PACS for the demo and the integration tests: Orthanc (Debian's package) on free ports.

Each server gets its own storage folder and a generated JSON configuration on free localhost
ports, no authentication, no plugins; :meth:`OrthancServer.start` waits until the REST API
answers rather than sleeping for a fixed time.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dicom_node.errors import GlioforecastError
from dicom_node.scu import Destination

CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def find_orthanc() -> str | None:
    """Path of the Orthanc binary, or None when it is not installed."""
    for c in (*CANDIDATES, shutil.which("Orthanc")):
        if c and Path(c).is_file():
            return c
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int | None = None,
        http_port: int | None = None,
        ae_title: str = "ORTHANC",
    ) -> None:
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def destination(self, name: str = "orthanc") -> Destination:
        return Destination(name, self.ae_title, "127.0.0.1", self.dicom_port)

    def start(self, timeout_s: float = 60.0) -> OrthancServer:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "glioforecast-local-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StableAge": 1,
            "DicomModalities": {},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = self.log_path.open("ab")
        binary = find_orthanc()
        if binary is None:
            raise GlioforecastError("Orthanc is not installed (apt-get install orthanc)")
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GlioforecastError(
                    f"Orthanc exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            try:
                system = self.get("/system")
                if system.get("DicomPort") == self.dicom_port:
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise GlioforecastError(f"Orthanc REST API not ready after {timeout_s} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def raw(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            body: bytes = rsp.read()
            return body

    def get(self, path: str) -> Any:
        return json.loads(self.raw(path))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self.raw(path, json.dumps(body).encode()))

    def find_study(self, study_instance_uid: str) -> str:
        ids = self.post(
            "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}}
        )
        if len(ids) != 1:
            raise AssertionError(f"expected 1 study {study_instance_uid} in Orthanc, found {ids}")
        return str(ids[0])

    def series_of_study(self, study_instance_uid: str) -> dict[str, dict[str, Any]]:
        """Series of the study by SeriesInstanceUID: main tags and instance ids."""
        study = self.get(f"/studies/{self.find_study(study_instance_uid)}")
        out: dict[str, dict[str, Any]] = {}
        for sid in study["Series"]:
            s = self.get(f"/series/{sid}")
            out[s["MainDicomTags"]["SeriesInstanceUID"]] = s
        return out

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
