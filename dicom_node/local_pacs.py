"""A local PACS for the demo and the integration tests, on free localhost ports.

Two kinds answer the same small query API (:class:`LocalPacs`: which studies, series and
instances arrived, read an instance back):

- :class:`OrthancServer`: Orthanc (Debian's package) with its own storage folder and a generated
  JSON configuration, no authentication, no plugins; :meth:`OrthancServer.start` waits until the
  REST API answers rather than sleeping for a fixed time. ``$GLIOFORECAST_ORTHANC`` names the
  binary when it is not in a standard place.
- :class:`EmbeddedPacs`: a pynetdicom Verification + Storage SCP in this process, for machines
  without Orthanc. It writes each instance with the node's :class:`~dicom_node.spool.Spool`
  (temp file, fsync, rename) and answers success only then.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom import uid as sop
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import commitment
from dicom_node.errors import GlioforecastError, InputError, OutOfSpaceError
from dicom_node.instance import InstanceInfo, check_pixel_data
from dicom_node.ports import free_port
from dicom_node.scp import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    STORAGE_CLASSES,
    SUCCESS,
    TRANSFER_SYNTAXES,
    _status,
)
from dicom_node.scu import VERIFICATION, Destination
from dicom_node.spool import Spool

log = logging.getLogger(__name__)

CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
ENV_ORTHANC = "GLIOFORECAST_ORTHANC"


def orthanc_candidates() -> list[str]:
    """Where :func:`find_orthanc` looks, in order (for error messages)."""
    named = os.environ.get(ENV_ORTHANC)
    if named:
        return [named]
    return [*CANDIDATES, "Orthanc on $PATH"]


def find_orthanc() -> str | None:
    """Path of the Orthanc binary, or None when it is not installed.

    ``$GLIOFORECAST_ORTHANC``, when set, is the only place looked at.
    """
    named = os.environ.get(ENV_ORTHANC)
    for c in [named] if named else [*CANDIDATES, shutil.which("Orthanc")]:
        if c and Path(c).is_file():
            return c
    return None


#: Orthanc's DICOMweb plugin as Debian installs it (package orthanc-dicomweb)
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass(frozen=True)
class StoredSeries:
    """One series held by a local PACS; ``instances`` are ids for :meth:`LocalPacs.read`."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: tuple[str, ...]


class LocalPacs(Protocol):
    """What the demo asks of a local PACS, whichever kind it is."""

    kind: str
    ae_title: str

    @property
    def dicom_port(self) -> int: ...
    def describe(self) -> str: ...
    def destination(self, name: str = ...) -> Destination: ...
    def add_modality(self, name: str, peer: Destination) -> None: ...
    def stop(self) -> None: ...
    def studies(self) -> list[str]: ...
    def study_series(self, study_instance_uid: str) -> list[StoredSeries]: ...
    def read(self, instance: str) -> Dataset: ...
    def count_instances(self) -> int: ...


@dataclass(frozen=True)
class OrthancTLS:
    """DICOM TLS of the local Orthanc (``DicomTls*`` options): its certificate and key, the
    certificates it trusts (to verify its peers), and whether callers need a certificate."""

    certificate: Path
    private_key: Path
    trusted: Path
    client_certificate_required: bool = False


class OrthancServer:
    kind = "Orthanc"

    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int | None = None,
        http_port: int | None = None,
        ae_title: str = "ORTHANC",
        modalities: dict[str, Destination] | None = None,
        tls: OrthancTLS | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
        dicomweb_servers: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """``modalities``: the peers Orthanc knows by name (``DicomModalities``), which it
        sends storage commitment reports to (over TLS for those with a ``tls`` context);
        ``tls``: Orthanc's DICOM port takes TLS only; ``dicomweb``: its DICOMweb plugin
        serves :attr:`dicomweb_url`; ``users``: HTTP Basic users and passwords the REST API
        and DICOMweb require (this object uses the first); ``dicomweb_servers``: the DICOMweb
        services its plugin's client knows by name (``DicomWeb.Servers``: ``Url``, and
        ``Username`` and ``Password`` or ``HttpHeaders``), which it can send studies to."""
        self.dicomweb = dicomweb or bool(dicomweb_servers)
        self.dicomweb_servers = dict(dicomweb_servers or {})
        self.users = dict(users or {})
        self.workdir = Path(workdir)
        self.modalities = dict(modalities or {})
        self.tls = tls
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

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
            "DicomModalities": {name: _modality(peer) for name, peer in self.modalities.items()},
        }
        if self.dicomweb:
            config |= {
                "Plugins": [DICOMWEB_PLUGIN],
                "DicomWeb": {
                    "Enable": True,
                    "Root": "/dicom-web/",
                    "Servers": self.dicomweb_servers,
                },
            }
        if self.users:
            config |= {"AuthenticationEnabled": True, "RegisteredUsers": self.users}
        if self.tls is not None:
            config |= {
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.certificate),
                "DicomTlsPrivateKey": str(self.tls.private_key),
                "DicomTlsTrustedCertificates": str(self.tls.trusted),
                "DicomTlsRemoteCertificateRequired": self.tls.client_certificate_required,
            }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = self.log_path.open("ab")
        binary = find_orthanc()
        if binary is None:
            raise GlioforecastError(
                f"Orthanc is not installed: expected its binary at one of "
                f"{', '.join(orthanc_candidates())}, found none (apt-get install orthanc)"
            )
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
        self._authorize(req)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            body: bytes = rsp.read()
            return body

    def _authorize(self, req: urllib.request.Request) -> None:
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")

    def add_modality(self, name: str, peer: Destination) -> None:
        """Make ``peer`` known to Orthanc as a DICOM modality (it sends storage commitment
        reports only to those): in the configuration before :meth:`start`, through the REST
        API after."""
        self.modalities[name] = peer
        if self.proc is not None:
            req = urllib.request.Request(
                f"{self.url}/modalities/{name}",
                data=json.dumps(_modality(peer)).encode(),
                method="PUT",
            )
            self._authorize(req)
            with urllib.request.urlopen(req, timeout=30):
                pass

    def delete(self, path: str) -> None:
        req = urllib.request.Request(self.url + path, method="DELETE")
        self._authorize(req)
        with urllib.request.urlopen(req, timeout=30):
            pass

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

    def describe(self) -> str:
        return f"{self.ae_title} on 127.0.0.1:{self.dicom_port}, REST API {self.url}"

    def studies(self) -> list[str]:
        """StudyInstanceUIDs of every study held."""
        return [
            str(self.get(f"/studies/{i}")["MainDicomTags"]["StudyInstanceUID"])
            for i in self.get("/studies")
        ]

    def study_series(self, study_instance_uid: str) -> list[StoredSeries]:
        out = []
        for uid, s in self.series_of_study(study_instance_uid).items():
            tags = s["MainDicomTags"]
            number = str(tags.get("SeriesNumber", "")).strip()
            out.append(
                StoredSeries(
                    series_instance_uid=uid,
                    modality=str(tags.get("Modality", "")),
                    series_number=int(number) if number.lstrip("-").isdigit() else None,
                    description=str(tags.get("SeriesDescription", "")),
                    instances=tuple(s["Instances"]),
                )
            )
        return out

    def read(self, instance: str) -> Dataset:
        """An instance by its Orthanc id."""
        return dcmread(io.BytesIO(self.raw(f"/instances/{instance}/file")))


def _modality(peer: Destination) -> dict[str, Any]:
    """A ``DicomModalities`` entry of Orthanc for ``peer``."""
    entry: dict[str, Any] = {"AET": peer.ae_title, "Host": peer.host, "Port": peer.port}
    if peer.tls is not None:
        entry["UseDicomTls"] = True
    return entry


# Output objects of sr_writer plus the SR classes a PACS commonly stores.
OUTPUT_CLASSES = (
    sop.SecondaryCaptureImageStorage,
    sop.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sop.ComprehensiveSRStorage,
    sop.Comprehensive3DSRStorage,
    sop.EnhancedSRStorage,
    sop.BasicTextSRStorage,
    sop.SegmentationStorage,
)


@dataclass(frozen=True)
class _Entry:
    study: str
    series: str
    modality: str
    series_number: int | None
    description: str
    path: Path


class EmbeddedPacs:
    """A Verification + Storage SCP on a free localhost port that stores to ``workdir/storage``.

    The node's spool writes each instance (``<study>/<series>/<sop>.dcm``, fsynced before the
    success status); an index kept in memory answers the queries. Instances already in the
    folder (an earlier run) are indexed at :meth:`start`. Only associations that call
    ``ae_title`` are accepted. Instance ids of the query API are SOP Instance UIDs, in order of
    arrival (after a restart, of file modification time).

    It is also a storage commitment SCP for the peers named with :meth:`add_modality`: it
    answers a request at once and reports, on an association of its own as Orthanc does,
    each listed instance it holds as committed and any other as failed (0x0112).
    """

    kind = "embedded storage SCP"

    def __init__(self, workdir: Path, *, ae_title: str = "LOCALPACS", dicom_port: int = 0) -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self._requested_port = dicom_port
        self.spool = Spool(self.workdir / "storage")
        self.server: ThreadedAssociationServer | None = None
        self._index: dict[str, _Entry] = {}  # SOP Instance UID -> entry, in arrival order
        self._lock = threading.Lock()
        self._secret = os.urandom(16)  # InstanceInfo hashes the patient identity; unused here
        self._modalities: dict[str, Destination] = {}  # by AE title

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EmbeddedPacs:
        self.spool.clean_tmp()
        paths = [self.spool.root / relative for relative in self.spool.iter_files()]
        for path in sorted(paths, key=lambda p: p.stat().st_mtime_ns):  # about arrival order
            ds = dcmread(path, stop_before_pixels=True)
            tsyntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
            self._add(InstanceInfo.from_dataset(ds, tsyntax, self._secret), path)
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION)
        for cls in dict.fromkeys((*STORAGE_CLASSES, *OUTPUT_CLASSES)):
            ae.add_supported_context(cls, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(commitment.PUSH_MODEL)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _no_delay),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_commitment_request),
        ]
        address = ("127.0.0.1", self._requested_port)
        try:
            server = ae.start_server(address, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise GlioforecastError(
                f"embedded PACS: cannot listen on {address[0]}:{address[1]} ({exc}); expected a "
                "free port"
            ) from exc
        assert server is not None
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def dicom_port(self) -> int:
        if self.server is None:
            raise GlioforecastError("embedded PACS: not started, so it has no port yet")
        return int(self.server.server_address[1])

    def describe(self) -> str:
        return f"{self.ae_title} on 127.0.0.1:{self.dicom_port}, files in {self.spool.root}"

    def destination(self, name: str = "pacs") -> Destination:
        return Destination(name, self.ae_title, "127.0.0.1", self.dicom_port)

    def add_modality(self, name: str, peer: Destination) -> None:
        """Take storage commitment requests from ``peer`` (by its AE title) and report to it."""
        self._modalities[peer.ae_title.strip()] = peer

    # ------------------------------------------------------------------ storage commitment

    def _on_commitment_request(self, event: Any) -> tuple[int, None]:
        caller = event.assoc.requestor.ae_title.strip()
        peer = self._modalities.get(caller)
        if peer is None:
            log.warning("embedded PACS: storage commitment request from unknown %s refused", caller)
            return 0x0124, None  # not authorised
        try:
            info = event.action_information
            transaction = str(info.TransactionUID)
            refs = [
                (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in info.ReferencedSOPSequence
            ]
        except Exception as exc:  # pydicom raises many types on malformed data
            log.warning("embedded PACS: storage commitment request unreadable: %s", exc)
            return 0x0110, None
        threading.Thread(
            target=self._report, args=(peer, transaction, refs), name="local-pacs-commitment",
            daemon=True,
        ).start()  # fmt: skip
        return SUCCESS, None

    def _report(self, peer: Destination, transaction: str, refs: list[tuple[str, str]]) -> None:
        with self._lock:
            held = {uid for _, uid in refs if uid in self._index}
        try:
            commitment.send_report(
                peer,
                transaction,
                [r for r in refs if r[1] in held],
                [(c, i, 0x0112) for c, i in refs if i not in held],
                calling_ae=self.ae_title,
            )
        except GlioforecastError as exc:
            log.warning("embedded PACS: storage commitment report to %s not sent: %s", peer, exc)

    # ------------------------------------------------------------------ storage

    def _add(self, info: InstanceInfo, path: Path) -> None:
        entry = _Entry(
            study=info.study_instance_uid,
            series=info.series_instance_uid,
            modality=info.modality,
            series_number=info.series_number,
            description=info.series_description,
            path=path,
        )
        with self._lock:
            self._index[info.sop_instance_uid] = entry

    def _on_store(self, event: Any) -> Dataset | int:
        tsyntax = str(event.context.transfer_syntax)
        try:
            ds = event.dataset
            info = InstanceInfo.from_dataset(ds, tsyntax, self._secret)
            check_pixel_data(ds, tsyntax)
        except InputError as exc:
            log.warning("embedded PACS: instance refused (0xC210): %s", exc)
            return _status(CANNOT_UNDERSTAND, str(exc))
        except Exception as exc:  # pydicom raises many types on malformed data
            log.warning("embedded PACS: instance undecodable (0xC210): %s", exc)
            return _status(CANNOT_UNDERSTAND, f"undecodable dataset: {type(exc).__name__}")
        try:
            stored = self.spool.store(
                info.study_instance_uid,
                info.series_instance_uid,
                info.sop_instance_uid,
                event.encoded_dataset(),
            )
        except OutOfSpaceError as exc:
            log.error("embedded PACS: instance deferred (0xA700): %s", exc)
            return _status(OUT_OF_RESOURCES, "local PACS out of disk space; retry later")
        except Exception as exc:
            log.exception("embedded PACS: instance not stored (0x0110): %s", exc)
            return _status(PROCESSING_FAILURE, "local PACS could not store the instance")
        self._add(info, stored.path)
        return SUCCESS

    # ------------------------------------------------------------------ queries

    def _entries(self) -> list[tuple[str, _Entry]]:
        with self._lock:
            return list(self._index.items())

    def studies(self) -> list[str]:
        """StudyInstanceUIDs of every study held, in order of arrival."""
        return list(dict.fromkeys(e.study for _, e in self._entries()))

    def study_series(self, study_instance_uid: str) -> list[StoredSeries]:
        """The series of one study; raises when the PACS holds no such study."""
        series: dict[str, list[tuple[str, _Entry]]] = {}
        for uid, e in self._entries():
            if e.study == study_instance_uid:
                series.setdefault(e.series, []).append((uid, e))
        if not series:
            raise GlioforecastError(
                f"embedded PACS: expected study {study_instance_uid}, found only "
                f"{self.studies() or 'no study'}"
            )
        return [
            StoredSeries(
                series_instance_uid=s,
                modality=items[0][1].modality,
                series_number=items[0][1].series_number,
                description=items[0][1].description,
                instances=tuple(uid for uid, _ in items),
            )
            for s, items in series.items()
        ]

    def path(self, instance: str) -> Path:
        """The file of an instance (by SOP Instance UID)."""
        with self._lock:
            entry = self._index.get(instance)
        if entry is None:
            raise GlioforecastError(f"embedded PACS: no instance {instance}")
        return entry.path

    def read(self, instance: str) -> Dataset:
        return dcmread(self.path(instance))

    def count_instances(self) -> int:
        with self._lock:
            return len(self._index)


def _no_delay(event: Any) -> None:
    # as the node's SCP does: without TCP_NODELAY, Nagle's algorithm and delayed ACKs cost
    # about 40 ms per C-STORE
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
