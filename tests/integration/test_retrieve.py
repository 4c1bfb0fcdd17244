"""The RT objects a study lacks, asked of a real PACS: Orthanc (Debian package) answers the
node's C-FIND and C-MOVE and sends what it holds to the node's receiver."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from xml.etree import ElementTree as ET

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom.dsutils import decode

from dicom_node.audit import to_text
from dicom_node.cli import main
from dicom_node.jobs import DONE, FAILED, RETRIEVING, SUPERSEDED
from dicom_node.ports import free_port
from dicom_node.retrieve import FIND
from dicom_node.scu import Destination
from dicom_node.settings import AllowedCaller, DicomWebSettings
from dicom_node.settings import Destination as DestinationSettings
from inference.synthetic.cohort import generate_patient
from inference.synthetic.planning_frame import to_planning_frame
from sr_writer.labels import series_description
from tests.audit_repository import event_id
from tests.conftest import REPO, start_listener, tool, wait_for
from tests.dicom_node.conftest import all_sent, finished_job, make_settings
from tests.dicom_node.test_audit import _objects, _participants, check_schema
from tests.dicom_node.test_scp import storescu
from tests.integration.orthanc import OrthancServer, dicomweb_plugin, orthanc_binary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def patient(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A synthetic patient's MR series, and its RT objects (structure set, dose, registration)
    in the planning CT's study, as a planning system stores them in the PACS."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_patient(0, 5, out, spacing_mm=4.0, formats=("dicom",))
    (pre,) = out.glob("*/dicom/pre")
    study = out / "planned"
    shutil.copytree(pre, study / "pre")
    to_planning_frame(study / "pre", 5, 0, study / "planning")
    return sorted((study / "pre").rglob("*.dcm")), sorted((study / "planning").rglob("*.dcm"))


def _upload(orthanc: OrthancServer, files: list[Path]) -> None:
    for path in files:
        orthanc.raw("/instances", path.read_bytes())


def _node_and_pacs(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, *, node_ae: str = "GLIOFORECAST", node_port: int = 0,
    audit_file: Path | None = None, **retrieve,
):  # fmt: skip
    """A running node whose destination and ``retrieve.source`` is an Orthanc that knows the
    node (calling AE GLIOFORECAST) at the node's port (``node_port``, when given), under the AE
    title GLIOFORECAST."""
    orthanc_binary()
    orthanc = OrthancServer(tmp_path / "orthanc")
    pacs = DestinationSettings(
        name="pacs", ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port
    )
    settings = make_settings(
        tmp_path / "data",
        retrieve={"source": "pacs", "retry_interval_s": 0.2, **retrieve},
        audit={"enabled": audit_file is not None, "file": audit_file},
    )
    settings = dataclasses.replace(
        settings,
        destinations=(pacs,),
        node=dataclasses.replace(settings.node, ae_title=node_ae),
    )
    node = run_node(settings)
    known_port = node_port or node.scp.port
    orthanc.add_modality(
        "glioforecast", Destination("glioforecast", "GLIOFORECAST", "127.0.0.1", known_port)
    )
    orthanc.start()
    return node, orthanc


def _mr_study(mr: list[Path]) -> str:
    return str(pydicom.dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)


def _predicted_after_retrieval(node, study: str, rt: list[Path]):  # type: ignore[no-untyped-def]
    """Version 1 of ``study``, whose last ``retrieved`` event says every file of ``rt`` came,
    and version 2, done with them."""
    second = wait_for(
        lambda: finished_job(node, study, 2), timeout=180, what="the job with the RT objects"
    )
    assert second.state == DONE, second.reason
    (first,) = [j for j in node.store.list_jobs() if j.study_instance_uid == study
                and j.version == 1]  # fmt: skip
    retrieved = [e.message for e in node.store.events(first.id) if e.kind == "retrieved"]
    assert retrieved[-1].startswith(f"{len(rt)} instance(s) came"), retrieved
    return first, second


def test_the_structure_set_in_the_pacs_is_fetched_and_the_study_predicted(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """The scanner routes the MR study only; the plan (structure set, dose and registration,
    in the planning CT's study) is in the PACS. The node asks the PACS, which sends them; the
    study is predicted with them and the results go to the PACS."""
    mr, rt = patient
    node, orthanc = _node_and_pacs(run_node, tmp_path)
    try:
        study = _mr_study(mr)
        # the PACS also keeps a predicted RTSTRUCT of the node's in the MR study: never fetched
        ours = pydicom.dcmread(next(p for p in rt if "RTSTRUCT" in p.parts))
        ours.StudyInstanceUID, ours.SeriesInstanceUID = study, generate_uid()
        ours.SOPInstanceUID = ours.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ours.SeriesDescription = series_description("CONTOURS")
        ours.save_as(tmp_path / "ours.dcm")
        _upload(orthanc, [*mr, *rt, tmp_path / "ours.dcm"])
        assert node.summary()["components"] == {
            "receiver": True, "worker": True, "sender": True, "storage": True, "retriever": True
        }  # fmt: skip
        assert '\nglioforecast_jobs{state="retrieving"} 0\n' in node.metrics()
        assert storescu(node.scp.port, *mr).returncode == 0
        first, second = _predicted_after_retrieval(node, study, rt)
        assert first.state == SUPERSEDED
        events = node.store.events(first.id)
        assert any(e.kind == "created" and RETRIEVING in e.message for e in events)
        (retrieved,) = [e.message for e in events if e.kind == "retrieved"]
        for modality in ("RTSTRUCT", "RTDOSE", "REG"):
            assert modality in retrieved
        roles = {js.role for js in node.store.job_series(second.id)}
        assert {"t1c", "rtstruct", "rtdose"} <= roles
        planning_study = str(pydicom.dcmread(rt[0]).StudyInstanceUID)
        assert any(
            e.kind == "linked" and planning_study in e.message for e in node.store.events(second.id)
        )
        # the moved instances came over the receiver; the node's own RTSTRUCT was not asked for
        assert len(node.store.series_paths(str(pydicom.dcmread(rt[0]).SeriesInstanceUID))) == 1
        assert not node.store.series_paths(str(ours.SeriesInstanceUID))
        all_sent(node, "pacs")
        descriptions = {s.description for s in orthanc.study_series(study)}
        assert any(d.startswith("SYNTHETIC PREDICTION") for d in descriptions), descriptions
    finally:
        orthanc.stop()


def test_with_c_get_the_pacs_sends_back_on_the_nodes_own_association(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """``retrieve.method: get``, for a PACS that cannot reach the node: Orthanc knows the node
    at a port where nothing listens (a C-MOVE would fail), and sends the plan on the node's
    C-GET association; the receiver stores it as its own, and the audit trail says it came
    from Orthanc."""
    mr, rt = patient
    log_file = tmp_path / "audit.log"
    node, orthanc = _node_and_pacs(
        run_node, tmp_path, node_port=free_port(), audit_file=log_file, method="get"
    )
    try:
        _upload(orthanc, [*mr, *rt])
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        _predicted_after_retrieval(node, study, rt)
    finally:
        orthanc.stop()
    _audited_arrival(log_file, rt, "ORTHANC")


def _audited_arrival(log_file: Path, rt: list[Path], sender: str) -> list[ET.Element]:
    """The audit trail's messages, once the one saying that the plan came from ``sender`` (at
    127.0.0.1) to the node is checked."""
    planning_study = str(pydicom.dcmread(rt[0]).StudyInstanceUID)
    messages = [ET.fromstring(line) for line in log_file.read_text("utf-8").splitlines()]
    (came,) = [
        m for m in messages if event_id(m) == "110104"
        and _objects(m)["Study Instance UID"].get("ParticipantObjectID") == planning_study
    ]  # fmt: skip
    check_schema(came)
    source = _participants(came)["Source Role ID"]
    assert (source.get("UserID"), source.get("NetworkAccessPointID")) == (sender, "127.0.0.1")
    assert _participants(came)["Destination Role ID"].get("UserID") == "GLIOFORECAST"
    assert sum(int(c.get("NumberOfInstances", "0")) for c in came.iter("SOPClass")) == len(rt)
    return messages


def test_nothing_in_the_pacs_fails_the_job_then_jobs_retrieve_asks_again(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """The PACS holds no plan yet: the job fails, saying the PACS was asked and what it held.
    Once the plan is made, ``glioforecast jobs retrieve N`` has the node ask again."""
    mr, rt = patient
    node, orthanc = _node_and_pacs(run_node, tmp_path)
    try:
        _upload(orthanc, mr)  # the PACS has the MR study, no plan
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the job")
        assert first.state == FAILED
        assert first.reason.startswith("missing required role rtstruct"), first.reason
        assert first.reason.endswith(
            "; pacs was asked for them: it holds no RT structure set, dose or registration "
            "of the patient that the node lacks (1 study(ies) of the patient within 30 days of "
            "the study's date)"
        ), first.reason
        assert "asking pacs" not in first.reason

        _upload(orthanc, rt)  # the planner's plan reaches the PACS
        config = tmp_path / "site.yaml"
        config.write_text(
            "retrieve: {source: pacs}\n"
            f"destinations: [{{name: pacs, ae_title: ORTHANC, host: 127.0.0.1, "
            f"port: {orthanc.dicom_port}}}]\n"
        )
        data = ["--data-dir", str(node.settings.storage.data_dir)]
        assert main(["--config", str(config), "jobs", "retrieve", str(first.id), *data]) == 0
        _predicted_after_retrieval(node, study, rt)
        # asking again for a job that is no longer the study's latest is refused
        assert main(["--config", str(config), "jobs", "retrieve", str(first.id), *data]) == 1
    finally:
        orthanc.stop()


def test_a_pacs_that_does_not_know_the_node_as_move_destination_fails_the_job_at_once(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """The node's AE title (GLIONODE) is not among the PACS's modalities (it knows the calling
    AE title only): the C-MOVE is refused (Orthanc answers 0xC000 where the standard has
    0xA801, see the dcmqrscp test) and the reason says what to set up; asking again cannot
    help, so the node does not."""
    mr, rt = patient
    node, orthanc = _node_and_pacs(run_node, tmp_path, node_ae="GLIONODE")
    try:
        _upload(orthanc, [*mr, *rt])
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr, extra=("-aec", "GLIONODE")).returncode == 0
        first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the job")
        assert first.state == FAILED
        assert "answered the C-MOVE of " in first.reason
        assert (
            "with 0xC000 (failed: unable to process); nothing was sent: check that it knows "
            "GLIONODE as a move destination (this node's AE title, address and port)"
            in first.reason
        )
        assert "(after 1 attempt(s))" in first.reason  # not asked again: it cannot help
    finally:
        orthanc.stop()


@contextmanager
def dcmqrscp(folder: Path, hosts: dict[str, int]) -> Iterator[int]:
    """dcmtk's Query/Retrieve SCP (AE title DCMQR) over ``folder``, knowing the move
    destinations ``hosts`` (AE title -> port on localhost); yields its port."""
    port = free_port()
    (folder / "db").mkdir(parents=True)
    table = "\n".join(
        f"peer{n} = ({ae}, 127.0.0.1, {p})" for n, (ae, p) in enumerate(hosts.items())
    )
    config = folder / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\n{table}\nHostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nDCMQR {folder / 'db'} RW (200, 1024mb) ANY\nAETable END\n"
    )
    log = (folder / "dcmqrscp.log").open("wb")
    proc = start_listener([tool("dcmqrscp"), "-c", str(config)], port, stdout=log, stderr=log)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _node_and_dcmqrscp(run_node, tmp_path: Path, source_port: int, port: int = 0, **sections):  # type: ignore[no-untyped-def]
    """A running node (on ``port``, 0: any) whose destination and source is dcmqrscp."""
    pacs = DestinationSettings(name="pacs", ae_title="DCMQR", host="127.0.0.1", port=source_port)
    sections.setdefault("retrieve", {"source": "pacs"})
    sections.setdefault("node", {"port": port})
    settings = make_settings(tmp_path / "data", **sections)
    return run_node(dataclasses.replace(settings, destinations=(pacs,)))


def test_dcmtk_dcmqrscp_as_the_pacs(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another PACS implementation (dcmtk's dcmqrscp, which does not return
    ModalitiesInStudy): the plan is found in the planning study and moved to the node. Each
    C-FIND is in the audit trail (a Query message with the query itself)."""
    mr, rt = patient
    port = free_port()
    log_file = tmp_path / "audit.log"
    with dcmqrscp(tmp_path / "qr", {"GLIOFORECAST": port}) as qr_port:
        stored = storescu(qr_port, *mr, *rt, extra=("-aec", "DCMQR"))
        assert stored.returncode == 0, stored.stderr
        node = _node_and_dcmqrscp(
            run_node, tmp_path, qr_port, port, audit={"enabled": True, "file": log_file}
        )
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        _predicted_after_retrieval(node, study, rt)
    messages = [ET.fromstring(line) for line in log_file.read_text("utf-8").splitlines()]
    queries = [m for m in messages if event_id(m) == "110112"]
    # the patient's two studies (MR, planning), then the series of each
    assert len(queries) == 3, [to_text(m) for m in queries]
    identifiers = []
    for message in queries:
        check_schema(message)
        assert message[0].get("EventActionCode") == "E"
        assert message[0].get("EventOutcomeIndicator") == "0"
        requestor = _participants(message)["Source Role ID"]
        assert requestor.get("UserID") == "GLIOFORECAST"
        assert requestor.get("UserIsRequestor") == "true"
        assert _participants(message)["Destination Role ID"].get("UserID") == "DCMQR"
        obj = _objects(message)["SOP Class UID"]
        assert obj.get("ParticipantObjectID") == FIND
        assert [c.tag for c in obj] == [
            "ParticipantObjectIDTypeCode", "ParticipantObjectQuery", "ParticipantObjectDetail"
        ]  # fmt: skip
        encoded = base64.b64decode(obj.findtext("ParticipantObjectQuery") or "")
        identifiers.append(decode(BytesIO(encoded), False, True))
    first_query = identifiers[0]
    assert first_query.QueryRetrieveLevel == "STUDY"
    assert first_query.PatientID == pydicom.dcmread(mr[0]).PatientID
    assert {i.QueryRetrieveLevel for i in identifiers[1:]} == {"SERIES"}


def test_a_plan_drawn_after_the_mr_is_fetched_when_the_node_asks_again(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """The PACS has no plan when the MR arrives: the job fails. The plan reaches the PACS
    later; the node asks again by itself (``retrieve.ask_again_h``, here a few seconds) and
    the study is predicted."""
    mr, rt = patient
    port = free_port()
    with dcmqrscp(tmp_path / "qr", {"GLIOFORECAST": port}) as qr_port:
        assert storescu(qr_port, *mr, extra=("-aec", "DCMQR")).returncode == 0
        node = _node_and_dcmqrscp(
            run_node, tmp_path, qr_port, port, retrieve={"source": "pacs", "ask_again_h": 0.001}
        )
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the job")
        assert first.state == FAILED and "pacs was asked for them: it holds no RT" in first.reason
        assert storescu(qr_port, *rt, extra=("-aec", "DCMQR")).returncode == 0
        _predicted_after_retrieval(node, study, rt)


def test_a_move_destination_unknown_to_dcmqrscp_is_named_in_the_reason(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """dcmqrscp answers 0xA801 (Move Destination Unknown) for an AE title not in its host
    table: the job fails at once, saying what to add to the PACS."""
    mr, rt = patient
    with dcmqrscp(tmp_path / "qr", {"SOMEONE": free_port()}) as qr_port:
        assert storescu(qr_port, *mr, *rt, extra=("-aec", "DCMQR")).returncode == 0
        node = _node_and_dcmqrscp(run_node, tmp_path, qr_port)
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the job")
        assert first.state == FAILED
        assert (
            "pacs (DCMQR@127.0.0.1:" in first.reason
            and "does not know GLIOFORECAST as a move destination (0xA801): add this node to "
            "its DICOM modalities (AE title GLIOFORECAST, the node's address and port) "
            "(after 1 attempt(s))"
            in first.reason
        ), first.reason


def test_check_destinations_says_whether_the_source_answers_queries_and_moves(  # type: ignore[no-untyped-def]
    run_node, tmp_path, capsys
) -> None:
    """Orthanc takes Study Root C-FIND, C-MOVE and C-GET; a storage-only peer (another node)
    does not, and check-destinations says so for the one named as retrieve.source, with the
    retrieve.method configured."""
    orthanc_binary()
    store_only = run_node()
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.modalities["glioforecast"] = Destination(
        "glioforecast", "GLIOFORECAST", "127.0.0.1", store_only.scp.port
    )
    orthanc.start()
    config = tmp_path / "site.yaml"
    try:
        for source, method, port in (
            ("pacs", "move", orthanc.dicom_port),
            ("pacs", "get", orthanc.dicom_port),
            ("peer", "move", store_only.scp.port),
        ):
            config.write_text(
                f"retrieve: {{source: {source}, method: {method}}}\n"
                "destinations:\n"
                f"  - {{name: pacs, ae_title: ORTHANC, host: 127.0.0.1, "
                f"port: {orthanc.dicom_port}}}\n"
                f"  - {{name: peer, ae_title: GLIOFORECAST, host: 127.0.0.1, "
                f"port: {store_only.scp.port}}}\n"
            )
            code = main(["--config", str(config), "check-destinations", source])
            (line,) = capsys.readouterr().out.splitlines()
            assert f"@127.0.0.1:{port}" in line
            what = f"C-{method.upper()}"
            if source == "pacs":
                assert code == 0 and line.startswith("ok   pacs (ORTHANC@")
                assert line.endswith(
                    "C-ECHO success; Study Root C-FIND accepted; Study Root C-FIND answered (a "
                    f"query matching nothing); Study Root {what} accepted; the 4 result SOP "
                    "classes accepted"
                )
            else:
                assert code == 1 and line.startswith("FAIL peer (GLIOFORECAST@")
                assert (
                    "C-ECHO success; Study Root C-FIND not accepted (retrieve.source queries it); "
                    f"Study Root {what} not accepted (retrieve.source has it send the RT objects "
                    "a study lacks)"
                ) in line
        # Orthanc negotiates queries with a caller it does not know, then aborts the
        # association at its first C-FIND: found now, not when a study needs its RT objects
        config.write_text(
            "retrieve: {source: pacs, method: move}\n"
            "sending: {calling_ae_title: STRANGER}\n"
            f"destinations:\n  - {{name: pacs, ae_title: ORTHANC, host: 127.0.0.1, "
            f"port: {orthanc.dicom_port}}}\n"
        )
        assert main(["--config", str(config), "check-destinations", "pacs"]) == 1
        (line,) = capsys.readouterr().out.splitlines()
        assert line.startswith("FAIL pacs (ORTHANC@")
        assert (
            "Study Root C-FIND not answered: expected a response to a query matching nothing, "
            "found the association aborted by the PACS after "
        ) in line, line
        assert "(it may not allow queries from AE STRANGER: check that it knows" in line
    finally:
        orthanc.stop()


def test_instances_the_receiver_refuses_are_named_in_the_reason(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """dcmqrscp knows the node, but node.allowed_callers does not let it in: its C-STORE
    sub-operations are refused, and the job's reason says where to look."""
    mr, rt = patient
    port = free_port()
    with dcmqrscp(tmp_path / "qr", {"GLIOFORECAST": port}) as qr_port:
        assert storescu(qr_port, *mr, *rt, extra=("-aec", "DCMQR")).returncode == 0
        node = _node_and_dcmqrscp(
            run_node, tmp_path, qr_port, port,
            retrieve={"source": "pacs", "attempts": 1},
            node={"port": port, "allowed_callers": (AllowedCaller("SCANNER1"),)},
        )  # fmt: skip
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        first = wait_for(lambda: finished_job(node, study, 1), timeout=120, what="the job")
    assert first.state == FAILED
    assert "pacs (DCMQR@127.0.0.1:" in first.reason
    assert "check that node.allowed_callers lets DCMQR in and the node has disk space" in (
        first.reason
    ), first.reason


def test_a_dicomweb_source_is_searched_with_qido_rs_and_read_with_wado_rs(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """A PACS that speaks DICOMweb only, behind HTTP Basic (a cloud archive): Orthanc with its
    DICOMweb plugin, which does not know the node at all. The node searches it (QIDO-RS),
    reads the plan's series (WADO-RS) into its spool, predicts, and sends the results there
    (STOW-RS); the audit trail names the service by its URL."""
    dicomweb_plugin()
    mr, rt = patient
    users = {"glioforecast": "s3cret-pass"}
    orthanc = OrthancServer(tmp_path / "orthanc", dicomweb=True, users=users).start()  # type: ignore[arg-type]
    (tmp_path / "pw").write_text(users["glioforecast"])
    web = DicomWebSettings(
        url=orthanc.dicomweb_url, username="glioforecast", password_file=tmp_path / "pw"
    )
    log_file = tmp_path / "audit.log"
    settings = make_settings(
        tmp_path / "data", retrieve={"source": "archive", "retry_interval_s": 0.2},
        audit={"enabled": True, "file": log_file},
    )  # fmt: skip
    settings = dataclasses.replace(
        settings, destinations=(DestinationSettings(name="archive", dicomweb=web),)
    )
    try:
        _upload(orthanc, [*mr, *rt])
        node = run_node(settings)
        study = _mr_study(mr)
        assert storescu(node.scp.port, *mr).returncode == 0
        first, _ = _predicted_after_retrieval(node, study, rt)
        (retrieved,) = [e.message for e in node.store.events(first.id) if e.kind == "retrieved"]
        for modality in ("RTSTRUCT", "RTDOSE", "REG"):
            assert modality in retrieved
        all_sent(node, "archive")
        descriptions = {s.description for s in orthanc.study_series(study)}
        assert any(d.startswith("SYNTHETIC PREDICTION") for d in descriptions), descriptions
    finally:
        orthanc.stop()
    messages = _audited_arrival(log_file, rt, orthanc.dicomweb_url)
    queries = [m for m in messages if event_id(m) == "110112"]
    assert len(queries) >= 2  # the patient's studies, then each study's series
    for query in queries:
        check_schema(query)
        assert _participants(query)["Destination Role ID"].get("UserID") == orthanc.dicomweb_url


@contextmanager
def _fake_qr(tmp_path: Path, rt: list[Path], mode: str) -> Iterator[tuple[int, int]]:
    """tests/integration/fake_qr.py holding ``rt``, in ``mode``: (its port, the node's)."""
    port, node_port = free_port(), free_port()
    (tmp_path / "held").mkdir()
    for path in rt:
        shutil.copy(path, tmp_path / "held" / path.name)
    peer = start_listener(
        [sys.executable, str(REPO / "tests" / "integration" / "fake_qr.py"),
         str(port), str(node_port), str(tmp_path / "held"), mode],
        port,
    )  # fmt: skip
    try:
        yield port, node_port
    finally:
        peer.terminate()
        peer.wait(timeout=30)


def _node_and_fake_qr(run_node, tmp_path: Path, port: int, node_port: int):  # type: ignore[no-untyped-def]
    pacs = DestinationSettings(name="pacs", ae_title="FAKEQR", host="127.0.0.1", port=port)
    settings = make_settings(
        tmp_path / "data", node={"port": node_port}, retrieve={"source": "pacs", "attempts": 1}
    )
    settings = dataclasses.replace(
        settings,
        node=dataclasses.replace(
            settings.node,
            allowed_callers=(*settings.node.allowed_callers, AllowedCaller("FAKEQR")),
        ),
    )
    return run_node(dataclasses.replace(settings, destinations=(pacs,)))


def test_a_move_whose_final_answer_leaves_out_the_counts(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PS3.4 lets a C-MOVE's final success leave out the sub-operation counts: the node read
    "0 sent" and failed the retrieval of what had come. What came is what the receiver holds."""
    mr, rt = patient
    with _fake_qr(tmp_path, rt, "no-counts") as (port, node_port):
        node = _node_and_fake_qr(run_node, tmp_path, port, node_port)
        assert storescu(node.scp.port, *mr).returncode == 0
        _predicted_after_retrieval(node, _mr_study(mr), rt)


def test_a_pacs_error_comment_quoting_the_patient_id_is_not_kept(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path, caplog
) -> None:
    """A PACS answered the C-FIND 0xA900 "Unknown patient <the Patient ID>": the node logged
    the ID and kept it in the job's reason. The values the node sent are left out."""
    mr, rt = patient
    patient_id = str(pydicom.dcmread(mr[0], stop_before_pixels=True).PatientID)
    with _fake_qr(tmp_path, rt, "refuse-find") as (port, node_port):
        node = _node_and_fake_qr(run_node, tmp_path, port, node_port)
        assert storescu(node.scp.port, *mr).returncode == 0
        job = wait_for(
            lambda: next((j for j in node.store.list_jobs() if j.state == FAILED), None),
            timeout=60, what="the job to fail",
        )  # fmt: skip
    assert "0xA900" in job.reason and "Unknown patient (the patient)" in job.reason, job.reason
    assert patient_id not in job.reason
    assert patient_id not in caplog.text
