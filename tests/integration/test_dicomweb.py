"""Results to a DICOMweb service by STOW-RS: Orthanc with its DICOMweb plugin (Debian package
orthanc-dicomweb), with and without HTTP Basic authentication."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path
from xml.etree import ElementTree as ET

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.cli import main
from dicom_node.dicomweb import stow_batch
from dicom_node.errors import ConfigError, SendError
from dicom_node.jobs import DONE
from dicom_node.outbox import Outbox, deliver_due
from dicom_node.ports import free_port
from dicom_node.scu import Destination
from dicom_node.settings import Destination as DestinationSettings
from dicom_node.settings import DicomWebSettings, WebClient, load_settings
from inference.synthetic.cohort import generate_patient
from tests.audit_repository import event_id
from tests.conftest import wait_for
from tests.dicom_node.conftest import all_sent, finished_job, make_settings
from tests.dicom_node.test_audit import _participants, check_schema
from tests.dicom_node.test_scp import storescu
from tests.integration.orthanc import OrthancServer, dicomweb_plugin
from tests.sr_writer.synthetic_job import default_outputs

pytestmark = pytest.mark.slow

USERS = {"glioforecast": "s3cret-pass"}


def _orthanc(tmp_path: Path, **options: object) -> OrthancServer:
    dicomweb_plugin()
    return OrthancServer(tmp_path / "orthanc", dicomweb=True, **options).start()  # type: ignore[arg-type]


def _destination(url: str, tmp_path: Path, password: str | None = None) -> Destination:
    web = DicomWebSettings(url=url)
    if password is not None:
        secret = tmp_path / "password"
        secret.write_text(password + "\n")
        web = dataclasses.replace(web, username="glioforecast", password_file=secret)
    return Destination.from_settings(DestinationSettings(name="web", dicomweb=web))


def test_the_results_go_by_stow_rs_and_each_object_is_accounted_for(tmp_path: Path) -> None:
    """Every object of a prediction, through the outbox as the node sends them, in chunks."""
    orthanc = _orthanc(tmp_path)
    objects = default_outputs().all()
    dest = _destination(orthanc.dicomweb_url, tmp_path)
    try:
        with Outbox(tmp_path / "outbox.sqlite3") as ob:
            ob.enqueue(objects, ["web"], job="job-web")
            report = deliver_due(ob, [dest], batch_size=len(objects))
            assert (report.sent, report.failed, report.dead) == (len(objects), 0, 0), report
            assert ob.counts() == {"web": {"sent": len(objects)}}
        assert orthanc.count_instances() == len(objects)
        # sent again (a retry after a crash): the same objects, stored once
        results = stow_batch(objects[:3], dest, chunk=2)
        assert [r.delivered for r in results] == [True, True, True]
        assert orthanc.count_instances() == len(objects)
    finally:
        orthanc.stop()


def test_an_object_the_service_refuses_beside_one_it_stores(tmp_path: Path) -> None:
    """Orthanc's plugin refuses an object without Study and Series UIDs and stores the other
    one of the same request (it answers 400 with a STOW-RS response): each gets its own
    result, from the response's sequences."""
    orthanc = _orthanc(tmp_path)
    good = default_outputs().all()[0]
    bad = Dataset()
    bad.file_meta = FileMetaDataset()
    bad.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bad.SOPClassUID = bad.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    try:
        stored, refused = stow_batch([good, bad], _destination(orthanc.dicomweb_url, tmp_path))
        assert stored.delivered and stored.sop_instance_uid == good.SOPInstanceUID
        assert not refused.delivered and refused.status == 0xC000 and refused.permanent
        assert refused.error is not None
        assert refused.error.endswith(
            "answered HTTP 400 Bad Request: 0xC000 (error: cannot understand)"
        )
        assert orthanc.count_instances() == 1
    finally:
        orthanc.stop()


def test_authentication_a_wrong_password_and_a_service_that_is_down(tmp_path: Path) -> None:
    orthanc = _orthanc(tmp_path, users=USERS)
    objects = default_outputs().all()[:2]
    try:
        good = _destination(orthanc.dicomweb_url, tmp_path, USERS["glioforecast"])
        assert all(r.delivered for r in stow_batch(objects, good))
        bad = _destination(orthanc.dicomweb_url, tmp_path, "wrong")
        first, _ = stow_batch(objects, bad)
        assert not first.delivered and first.permanent  # a configuration to fix: dead at once
        assert first.error is not None
        assert first.error.startswith(f"web ({orthanc.dicomweb_url}) answered HTTP 401")
        with Outbox(tmp_path / "outbox.sqlite3") as ob:
            ob.enqueue(objects, ["web"], job="job-auth")
            report = deliver_due(ob, [bad])
            assert report.dead == 2 and ob.counts() == {"web": {"dead": 2}}
    finally:
        orthanc.stop()
    down = _destination(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path)
    with pytest.raises(SendError, match=r"cannot reach web \(http://127.0.0.1:\d+/dicom-web\)"):
        stow_batch(objects, down)
    with Outbox(tmp_path / "outbox2.sqlite3") as ob:  # kept, and tried again later
        ob.enqueue(objects, ["web"], job="job-down")
        report = deliver_due(ob, [down])
        assert report.failed == 2 and ob.counts() == {"web": {"pending": 2}}


def test_check_destinations_and_the_settings_of_a_dicomweb_destination(  # type: ignore[no-untyped-def]
    tmp_path: Path, capsys
) -> None:
    orthanc = _orthanc(tmp_path, users=USERS)
    (tmp_path / "pw").write_text(USERS["glioforecast"])
    (tmp_path / "bad").write_text("wrong")
    config = tmp_path / "site.yaml"
    try:
        config.write_text(
            "destinations:\n"
            f"  - {{name: vna, dicomweb: {{url: '{orthanc.dicomweb_url}', username: glioforecast,"
            f" password_file: {tmp_path / 'pw'}}}}}\n"
            f"  - {{name: cloud, dicomweb: {{url: '{orthanc.dicomweb_url}/', username: "
            f"glioforecast, password_file: {tmp_path / 'bad'}}}}}\n"
        )
        assert main(["--config", str(config), "check-destinations"]) == 1
        ok, failed = capsys.readouterr().out.splitlines()
        assert ok == f"ok   vna ({orthanc.dicomweb_url}): DICOMweb answers (QIDO-RS HTTP 200)"
        assert failed.startswith(f"FAIL cloud ({orthanc.dicomweb_url}): DICOMweb answered HTTP 401")
    finally:
        orthanc.stop()
    for yaml, expected in (
        ("destinations: [{name: web}]",
         "destinations[0]: expected ae_title, host and port (DICOM) or dicomweb.url (DICOMweb), "
         "found no ae_title, host, port"),
        ("destinations: [{name: web, ae_title: PACS, host: h, port: 104, "
         "dicomweb: {url: 'https://h/dicom-web'}}]",
         "destinations[0]: expected either ae_title, host and port (DICOM) or dicomweb.url "
         "(DICOMweb), found both"),
        ("destinations: [{name: web, storage_commitment: true, "
         "dicomweb: {url: 'https://h/dicom-web'}}]",
         "destinations[0].storage_commitment: expected false for a DICOMweb destination"),
        ("destinations: [{name: web, dicomweb: {url: 'ftp://h/x'}}]",
         "destinations[0].dicomweb.url: expected an http:// or https:// URL"),
        ("destinations: [{name: web, dicomweb: {url: 'https://h/dw', username: u}}]",
         "destinations[0].dicomweb: expected username and password_file together, found only "
         "username"),
    ):  # fmt: skip
        config.write_text(yaml + "\n")
        with pytest.raises(ConfigError) as err:
            load_settings(config)
        assert expected in str(err.value), str(err.value)


def test_the_running_node_sends_a_prediction_to_a_dicomweb_service(  # type: ignore[no-untyped-def]
    run_node, tmp_path
) -> None:
    """A synthetic study through the node to Orthanc's DICOMweb, behind HTTP Basic; the audit
    trail names the service by its URL."""
    generate_patient(0, 5, tmp_path / "synthetic", spacing_mm=4.0, formats=("dicom",))
    files = sorted((tmp_path / "synthetic").glob("*/dicom/pre/**/*.dcm"))
    orthanc = _orthanc(tmp_path, users=USERS)
    (tmp_path / "pw").write_text(USERS["glioforecast"])
    web = DicomWebSettings(
        url=orthanc.dicomweb_url, username="glioforecast", password_file=tmp_path / "pw"
    )
    log_file = tmp_path / "audit.log"
    settings = make_settings(tmp_path / "data", audit={"enabled": True, "file": log_file})
    destination = DestinationSettings(name="vna", dicomweb=web)
    node = run_node(dataclasses.replace(settings, destinations=(destination,)))
    try:
        assert storescu(node.scp.port, *files).returncode == 0
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        job = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the prediction")
        assert job.state == DONE, job.reason
        sent = all_sent(node, "vna")
        assert orthanc.count_instances() == sent
    finally:
        orthanc.stop()
    messages = [ET.fromstring(line) for line in log_file.read_text("utf-8").splitlines()]
    delivered = [
        m for m in messages if event_id(m) == "110104"
        and _participants(m)["Destination Role ID"].get("UserID") == orthanc.dicomweb_url
    ]  # fmt: skip
    for message in delivered:  # one per batch the sender sent
        check_schema(message)
        assert message[0].get("EventOutcomeIndicator") == "0"
        peer = _participants(message)["Destination Role ID"]
        assert peer.get("NetworkAccessPointID") == "127.0.0.1"
    counted = [int(c.get("NumberOfInstances", "0")) for m in delivered for c in m.iter("SOPClass")]
    assert sum(counted) == sent


def test_a_study_pushed_by_orthancs_dicomweb_client_is_predicted(  # type: ignore[no-untyped-def]
    run_node, tmp_path
) -> None:
    """The other direction: a PACS that routes by STOW-RS. Orthanc's DICOMweb client sends a
    whole synthetic study (MR series, structure set, dose) to the node's STOW-RS receiver with
    HTTP Basic; the node predicts and sends the results back to Orthanc (C-STORE). The audit
    trail records the study as received from the client, by its name and address."""
    generate_patient(0, 5, tmp_path / "synthetic", spacing_mm=4.0, formats=("dicom",))
    files = sorted((tmp_path / "synthetic").glob("*/dicom/pre/**/*.dcm"))
    (tmp_path / "pw").write_text("router-pass\n")
    client = WebClient(name="PACSROUTER", username="orthanc", password_file=tmp_path / "pw")
    log_file = tmp_path / "audit.log"
    settings = make_settings(
        tmp_path / "data", audit={"enabled": True, "file": log_file},
        stow={"enabled": True, "port": 0, "clients": (client,)},
    )  # fmt: skip
    dicomweb_plugin()
    orthanc = OrthancServer(tmp_path / "orthanc")
    pacs = DestinationSettings(
        name="pacs", ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port
    )
    node = run_node(dataclasses.replace(settings, destinations=(pacs,)))
    assert node.stow is not None
    url = f"http://127.0.0.1:{node.stow.port}/dicom-web/"
    orthanc.dicomweb_servers = {
        "glioforecast": {"Url": url, "Username": "orthanc", "Password": "router-pass"},
        "stale": {"Url": url, "Username": "orthanc", "Password": "last-years-pass"},
    }
    orthanc.dicomweb = True
    orthanc.start()
    try:
        for path in files:
            orthanc.raw("/instances", path.read_bytes())
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        job = {"Resources": [orthanc.find_study(study)], "Synchronous": True}
        answer = orthanc.post("/dicom-web/servers/glioforecast/stow", job)
        assert isinstance(answer, dict), answer
        assert node.store.counts()["instances"] == len(files)
        # a stale password: refused before Orthanc sends the study (Expect: 100-continue), and
        # Orthanc's log says why
        with pytest.raises(urllib.error.HTTPError):
            orthanc.post("/dicom-web/servers/stale/stow", job)
        assert "401" in orthanc.log_path.read_text()
        job = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the prediction")
        assert job.state == DONE, job.reason
        sent = all_sent(node, "pacs")
        series = orthanc.study_series(study)
        predicted = [s for s in series if s.description.startswith("SYNTHETIC PREDICTION")]
        assert predicted and sum(len(s.instances) for s in series) == len(files) + sent
    finally:
        orthanc.stop()
    messages = [ET.fromstring(line) for line in log_file.read_text("utf-8").splitlines()]
    (received,) = [
        m for m in messages if event_id(m) == "110104"
        and _participants(m)["Source Role ID"].get("UserID") == "PACSROUTER"
    ]  # fmt: skip
    check_schema(received)
    assert _participants(received)["Source Role ID"].get("NetworkAccessPointID") == "127.0.0.1"
    counted = [int(c.get("NumberOfInstances", "0")) for c in received.iter("SOPClass")]
    assert sum(counted) == len(files)
