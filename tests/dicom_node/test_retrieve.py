"""Which studies wait for the PACS, and what the node does when the PACS cannot answer, or
answers as the PACS the node met did (a pynetdicom PACS in this process: one that cannot send
a series, moves asynchronously, aborts, or does not transcode); the exchanges with Orthanc and
dcmqrscp are in tests/integration/test_retrieve.py."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTStructureSetStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.service_class import QueryRetrieveServiceClass

from dicom_node import retrieve
from dicom_node.assembler import Assembler
from dicom_node.cli import main
from dicom_node.errors import ConfigError
from dicom_node.jobs import FAILED, RETRIEVING, JobStore
from dicom_node.ports import free_port
from dicom_node.retrieve import FIND, GET, MOVE, Patient, Retriever, date_range, rt_studies
from dicom_node.service import Node
from dicom_node.settings import Destination, Settings, load_settings, warnings_of
from dicom_node.spool import Spool
from tests import factories
from tests.conftest import wait_for
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_jobs import _receive
from tests.dicom_node.test_scp import storescu
from tests.integration.fake_qr import matches


def _settings(tmp_path: Path, **retrieve: object) -> Settings:
    s = make_settings(
        tmp_path / "data", assembly={"quiet_period_s": 0}, retrieve={"source": "pacs", **retrieve}
    )
    pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    return dataclasses.replace(s, destinations=(pacs,))


def _study(tmp_path: Path, store: JobStore, spool: Spool, roles: tuple[str, ...]) -> str:
    study = factories.small_study(tmp_path / "in" / "-".join(roles))
    _receive(spool, store, [p for r in roles for p in study[r]], time.time())
    return str(pydicom.dcmread(study[roles[0]][0]).StudyInstanceUID)


def _stores(settings: Settings) -> tuple[JobStore, Spool]:
    return JobStore(settings.storage.database), Spool(settings.storage.spool_dir)


def test_only_a_study_with_its_t1gd_and_no_rt_objects_waits_for_the_pacs(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store, spool = _stores(settings)
    lacking_rt = _study(tmp_path, store, spool, ("t1c", "flair"))
    lacking_t1c = _study(tmp_path, store, spool, ("flair", "rtstruct"))
    Assembler(store, settings).run_once()
    jobs = {j.study_instance_uid: j for j in store.list_jobs()}
    assert jobs[lacking_rt].state == RETRIEVING
    assert jobs[lacking_rt].reason.startswith("missing required role rtstruct: no series")
    assert jobs[lacking_rt].reason.endswith("; asking pacs for the patient's RT objects")
    assert jobs[lacking_t1c].state == FAILED  # the PACS is asked for RT objects only
    assert "asking" not in jobs[lacking_t1c].reason
    assert [j.id for j in store.due_retrievals(time.time())] == [jobs[lacking_rt].id]

    # without a source, the same study fails as before
    plain = make_settings(tmp_path / "plain", assembly={"quiet_period_s": 0})
    store2, spool2 = _stores(plain)
    study = _study(tmp_path / "2", store2, spool2, ("t1c", "flair"))
    Assembler(store2, plain).run_once()
    (job,) = store2.list_jobs()
    assert job.study_instance_uid == study and job.state == FAILED


def test_an_unreachable_pacs_is_asked_again_then_the_job_fails_and_not_asked_twice(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, attempts=2, retry_interval_s=60)
    store, spool = _stores(settings)
    study = _study(tmp_path, store, spool, ("t1c", "flair"))
    assembler = Assembler(store, settings)
    (job_id,) = assembler.run_once()
    retriever = Retriever(settings, store)
    assert retriever.run_once() == 1
    job = store.get_job(job_id)
    assert job is not None and job.state == RETRIEVING  # asked again later
    (attempt,) = [e.message for e in store.events(job_id) if e.kind == "retrieve"]
    assert attempt.startswith("attempt 1: no association with pacs (PACS@127.0.0.1:")
    assert retriever.run_once() == 0  # not before retry_interval_s
    assert retriever.run_once(time.time() + 61) == 1
    job = store.get_job(job_id)
    assert job is not None and job.state == FAILED
    assert job.reason.startswith("missing required role rtstruct")
    assert "; pacs was asked for them: no association with pacs (PACS@" in job.reason
    assert job.reason.endswith("(after 2 attempt(s))")
    assert "asking pacs" not in job.reason

    # a late series makes version 2: it fails at once, saying what the PACS answered
    _receive(spool, store, factories.small_study(tmp_path / "late")["flair"][:1], time.time())
    late = factories.small_study(tmp_path / "late2")["t1c"][0]
    ds = pydicom.dcmread(late)
    ds.StudyInstanceUID = study
    ds.save_as(late)
    _receive(spool, store, [late], time.time())
    created = assembler.run_once()
    (second,) = [store.get_job(j) for j in created if store.get_job(j).study_instance_uid == study]  # type: ignore[union-attr]
    assert second is not None and second.state == FAILED and second.version == 2
    assert "; pacs was asked for them: no association" in second.reason
    assert store.due_retrievals(time.time() + 3600) == []


def test_a_study_the_pacs_had_nothing_for_is_asked_about_again_for_a_while(
    tmp_path: Path,
) -> None:
    """Every ask_again_h hours for ask_again_days days, the failed job left as it is (its
    state, reason and notice) while the PACS still has nothing."""
    settings = _settings(tmp_path, attempts=1, ask_again_h=1, ask_again_days=2)
    store, spool = _stores(settings)
    _study(tmp_path, store, spool, ("t1c", "flair"))
    (job_id,) = Assembler(store, settings).run_once()
    retriever = Retriever(settings, store)
    t0 = time.time()
    assert retriever.run_once(t0) == 1  # unreachable, one attempt: the job fails
    failed = store.get_job(job_id)
    assert failed is not None and failed.state == FAILED
    assert retriever.run_once(t0 + 1800) == 0  # not within the hour
    assert retriever.run_once(t0 + 3700) == 1  # asked again
    again = store.get_job(job_id)
    assert again is not None
    assert (again.state, again.reason, again.updated_at) == (
        FAILED, failed.reason, failed.updated_at
    )  # fmt: skip
    kinds = [e.kind for e in store.events(job_id)]
    assert kinds.count("retrieved") == 2 and kinds.count(FAILED) == 1
    marker = "; pacs was asked for them: "
    assert store.retrievals_to_repeat(marker, 3600, 2 * 86400, time.time() + 3700)
    # no more after ask_again_days from the first time
    assert store.retrievals_to_repeat(marker, 3600, 2 * 86400, t0 + 3 * 86400) == []
    # nor when it is off
    off = dataclasses.replace(
        settings, retrieve=dataclasses.replace(settings.retrieve, ask_again_h=0)
    )
    assert Retriever(off, store).run_once(time.time() + 7200) == 0


def test_jobs_left_waiting_fail_when_the_node_no_longer_asks_a_pacs(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store, spool = _stores(settings)
    _study(tmp_path, store, spool, ("t1c", "flair"))
    (job_id,) = Assembler(store, settings).run_once()
    store.close()
    off = dataclasses.replace(settings, retrieve=dataclasses.replace(settings.retrieve, source=""))
    node = Node(off)
    try:
        node.start()
        job = node.store.get_job(job_id)
        assert job is not None and job.state == FAILED
        assert job.reason.startswith("missing required role rtstruct: no series matched")
        assert job.reason.endswith(
            " instances); no PACS was asked: retrieve.source is no longer set"
        ), job.reason
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("patient_id", "why"),
    [
        ("", "the study has no PatientID to ask the PACS with"),
        ("GF*", "the study's PatientID holds a wildcard or backslash: a query with it would "
                "match other patients"),
    ],
    ids=["empty", "wildcard"],
)  # fmt: skip
def test_a_patient_id_that_would_match_other_patients_is_never_sent(
    tmp_path: Path, patient_id: str, why: str
) -> None:
    settings = _settings(tmp_path)
    store, spool = _stores(settings)
    study = factories.small_study(tmp_path / "in")
    for path in study["t1c"]:
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        ds.save_as(path)
    _receive(spool, store, study["t1c"], time.time())
    (job_id,) = Assembler(store, settings).run_once()
    Retriever(settings, store).run_once()
    job = store.get_job(job_id)
    assert job is not None and job.state == FAILED
    assert job.reason.endswith(f"; pacs was asked for them: not asked: {why}"), job.reason
    assert not [e for e in store.events(job_id) if e.kind == "retrieve"]  # no network attempt


def test_jobs_retrieve_needs_a_source_and_the_failed_latest_job(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(tmp_path)
    store, spool = _stores(settings)
    _study(tmp_path, store, spool, ("t1c", "flair"))
    (job_id,) = Assembler(store, settings).run_once()
    with pytest.raises(ValueError, match=f"job {job_id}: expected the failed latest job of its "
                                         "study, found retrieving"):  # fmt: skip
        store.request_retrieval(job_id, str)
    store.close()
    data = ["--data-dir", str(settings.storage.data_dir)]
    assert main(["jobs", "retrieve", str(job_id), *data]) == 1  # the embedded default: no source
    assert "expected retrieve.source in the configuration" in capsys.readouterr().err


def test_the_source_must_be_a_destination_and_the_receiver_must_let_it_in(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "retrieve: {source: archive}\n"
        "destinations: [{name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(site)
    assert "retrieve.source: expected the name of a destination (pacs), found 'archive'" in str(
        err.value
    )
    site.write_text(
        "retrieve: {source: pacs}\n"
        "node: {allowed_callers: [{ae_title: SCANNER1}]}\n"
        "destinations: [{name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}]\n"
    )
    (warning,) = [w for w in warnings_of(load_settings(site)) if w.startswith("retrieve")]
    assert "node.allowed_callers does not let its AE title PACS in" in warning
    site.write_text(
        "retrieve: {source: pacs}\n"
        "node: {allowed_callers: [{ae_title: PACS, hosts: [10.0.0.5]}]}\n"
        "destinations: [{name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}]\n"
    )
    assert not [w for w in warnings_of(load_settings(site)) if w.startswith("retrieve")]
    # with C-GET the PACS sends back on the node's association: nothing to let in
    site.write_text(
        "retrieve: {source: pacs, method: get}\n"
        "node: {allowed_callers: [{ae_title: SCANNER1}]}\n"
        "destinations: [{name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}]\n"
    )
    assert not [w for w in warnings_of(load_settings(site)) if w.startswith("retrieve")]


def test_the_date_window_of_the_query() -> None:
    assert date_range("20261101", 30) == "20261002-20261201"
    assert date_range("", 30) == ""
    assert date_range("2026", 30) == ""


def _match(uid: str, date: str, modalities: object = None, **keys: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.StudyDate, ds.PatientID = uid, date, keys.pop("PatientID", "P1")
    if modalities is not None:
        ds.ModalitiesInStudy = modalities
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_which_studies_of_the_matches_are_looked_into() -> None:
    found = [
        _match("1.1", "20261101", ["MR"]),  # no RT object in it
        _match("1.2", "20261105", ["CT", "RTSTRUCT", "RTDOSE"]),
        _match("1.3", "20261110", "RTSTRUCT"),  # one value: a string, not a list
        _match("1.4", "20261103"),  # no ModalitiesInStudy returned: looked into
        _match("1.5", "20261120", ["RTSTRUCT"], PatientID="P11"),  # matched loosely
        _match("1.6", "20261121", ["RTSTRUCT"], IssuerOfPatientID="OTHER HOSPITAL"),
        _match("1.7", "20261102", ["REG"], IssuerOfPatientID="OUR HOSPITAL"),
    ]
    ours = Patient("P1", "20261101", "OUR HOSPITAL")
    assert rt_studies(found, ours) == ["1.3", "1.2", "1.4", "1.7"]
    # without an issuer of its own, the node cannot tell the issuers apart
    assert rt_studies(found, Patient("P1", "20261101")) == ["1.6", "1.3", "1.2", "1.4", "1.7"]


def test_a_c_find_identifier_becomes_the_qido_rs_search_that_asks_the_same() -> None:
    from dicom_node.retrieve import _identifier, qido_query

    study = _identifier(
        "STUDY", PatientID="GF-7", StudyInstanceUID="", StudyDate="20260101-20260301",
        ModalitiesInStudy="",
    )  # fmt: skip
    assert qido_query(study) == (
        "/studies",
        [("StudyDate", "20260101-20260301"), ("includefield", "ModalitiesInStudy"),
         ("PatientID", "GF-7"), ("includefield", "StudyInstanceUID")],
    )  # fmt: skip
    series = _identifier("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID="", Modality="")
    assert qido_query(series) == (
        "/studies/1.2.3/series",
        [("includefield", "Modality"), ("includefield", "SeriesInstanceUID")],
    )


def test_a_wado_rs_answer_is_split_into_its_parts_whatever_bytes_they_hold() -> None:
    from dicom_node.dicomweb import multipart_parts

    first, second = b"\r\n--not-the-boundary\r\n\x00\xff", b"DICM" * 3
    body = (
        b"preamble\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + first
        + b"\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + second
        + b"\r\n--b0undary--\r\nepilogue"
    )  # fmt: skip
    content_type = 'multipart/related; type="application/dicom"; boundary="b0undary"'
    assert multipart_parts(body, content_type) == [first, second]
    with pytest.raises(ValueError, match="expected multipart/related with a boundary"):
        multipart_parts(body, "application/dicom")


def test_a_retrieved_file_that_is_not_dicom_is_refused_and_nothing_is_stored(run_node) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.scp import Origin

    node = run_node()
    status = node.scp.store_part10(b"<html>login page</html>", Origin("https://pacs", "pacs"))
    assert not isinstance(status, int) and status.Status == 0xC210
    assert status.ErrorComment == "not a DICOM Part 10 file: no DICM prefix at byte 128"
    assert node.store.counts()["instances"] == 0


# ---------------------------------------------------------------- a PACS as the node met them


def _rtdose(folder: Path, study_uid: str, frame_uid: str) -> Path:
    """A small RT Dose (one 2x2 frame) of the study."""
    ds = factories._base(RTDoseStorage, study_uid, generate_uid(), "RTDOSE")
    ds.SeriesDescription, ds.SeriesNumber = "PLAN DOSE", 98
    ds.FrameOfReferenceUID = frame_uid
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.GridFrameOffsetVector, ds.DoseGridScaling = [4, 4], [0], 0.001
    ds.NumberOfFrames, ds.FrameIncrementPointer = 1, 0x3004000C
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(8)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "rtdose.dcm", enforce_file_format=True)
    return folder / "rtdose.dcm"


class _Pacs:
    """A Query/Retrieve SCP on localhost (pynetdicom, in this process) holding ``held``, that
    answers as the PACS the node met did:

    - ``cannot_send``: series whose C-MOVE or C-GET it answers 0xC000 without sub-operation
      counts (Orthanc, a file it cannot read);
    - ``asynchronous``: C-MOVEs answered "Completed" at once (Orthanc's SynchronousCMove
      false), the instances sent ``late`` (a second after), ``never`` (its send failed) or
      one of them only (``part``);
    - ``aborts``: the requests ("C-FIND", "C-MOVE") it answers with an A-ABORT (Orthanc whose
      modality entry does not allow them); ``silent``: those it never answers;
    - ``syntaxes``: the transfer syntaxes it takes for the C-GET's storage contexts; it sends
      an instance only in the one it holds it in (no transcoding), else answers 0xC000.

    ``asked``: the series UIDs of the C-MOVEs and C-GETs, in order."""

    ae_title = "FAKEPACS"

    def __init__(
        self, held: list[Path], monkeypatch: pytest.MonkeyPatch,
        syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
    ) -> None:  # fmt: skip
        self.held = [pydicom.dcmread(p) for p in held]
        self.node_port = 0
        self.cannot_send: set[str] = set()
        self.asynchronous = ""
        self.aborts: set[str] = set()
        self.silent: set[str] = set()
        self.asked: list[str] = []
        self.ae = AE(ae_title=self.ae_title)
        for model in (FIND, MOVE, GET):
            self.ae.add_supported_context(model)
        for sop_class in (RTStructureSetStorage, RTDoseStorage):
            self.ae.add_supported_context(sop_class, list(syntaxes), scu_role=False, scp_role=True)
            self.ae.add_requested_context(sop_class)  # the C-MOVE's sub-operations
        original = QueryRetrieveServiceClass.SCP

        def scp(service: QueryRetrieveServiceClass, req: Any, context: Any) -> None:
            if service.assoc.ae is not self.ae:
                return original(service, req, context)
            return self._serve(service, req, context, original)

        monkeypatch.setattr(QueryRetrieveServiceClass, "SCP", scp)
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self._find)]
        )

    def stop(self) -> None:
        self.server.shutdown()

    def destination(self) -> Destination:
        return Destination(name="pacs", ae_title=self.ae_title, host="127.0.0.1", port=self.port)

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for match in matches(event.identifier, self.held):
            yield 0xFF00, match
        yield 0x0000, None

    def _serve(self, service: Any, req: Any, context: Any, original: Any) -> None:
        what = {C_FIND: "C-FIND", C_MOVE: "C-MOVE", C_GET: "C-GET"}[type(req)]
        if what in self.aborts:
            service.assoc.abort()
            return
        if what in self.silent:
            time.sleep(3)
            return
        if what == "C-FIND":
            return original(service, req, context)
        ts = context.transfer_syntax[0]
        identifier = decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        series = str(identifier.SeriesInstanceUID)
        self.asked.append(series)
        wanted = [ds for ds in self.held if ds.SeriesInstanceUID == series]
        rsp = C_MOVE() if what == "C-MOVE" else C_GET()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        if series in self.cannot_send:
            rsp.Status, rsp.ErrorComment = 0xC000, "cannot read the stored file"
            service.dimse.send_msg(rsp, context.context_id)
            return
        if what == "C-GET":
            sent = self._get(service.assoc, wanted)
            if sent is None:
                rsp.Status, rsp.ErrorComment = 0xC000, "cannot transcode"
                service.dimse.send_msg(rsp, context.context_id)
                return
        elif self.asynchronous:
            sent = len(wanted)
            if self.asynchronous in ("late", "part"):
                some = wanted if self.asynchronous == "late" else wanted[:1]
                threading.Timer(1.0, self._send, (req.MoveDestination, some)).start()
        else:
            sent = self._send(req.MoveDestination, wanted)
        rsp.Status = 0x0000
        rsp.NumberOfCompletedSuboperations = sent
        rsp.NumberOfFailedSuboperations = len(wanted) - sent
        rsp.NumberOfWarningSuboperations = 0
        service.dimse.send_msg(rsp, context.context_id)

    def _send(self, destination: str, wanted: list[Dataset]) -> int:
        """C-STORE ``wanted`` to the node, as a C-MOVE's sub-operations; how many it took."""
        assoc = self.ae.associate("127.0.0.1", self.node_port, ae_title=destination)
        sent = sum(int(assoc.send_c_store(ds).Status) == 0 for ds in wanted)
        assoc.release()
        return sent

    def _get(self, assoc: Any, wanted: list[Dataset]) -> int | None:
        """C-STORE ``wanted`` on the C-GET's association, each in the transfer syntax it is
        held in: None when the node took none such (it does not transcode)."""
        for ds in wanted:
            held = str(ds.file_meta.TransferSyntaxUID)
            if not any(
                cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax[0] == held
                for cx in assoc.accepted_contexts
            ):
                return None
        return sum(int(assoc.send_c_store(ds).Status) == 0 for ds in wanted)


@contextmanager
def _node_and_pacs(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: list[Path],
    syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES, **retrieve,
) -> Iterator[tuple[Any, _Pacs]]:  # fmt: skip
    """A running node whose ``retrieve.source`` is a :class:`_Pacs` holding ``held``."""
    pacs = _Pacs(held, monkeypatch, syntaxes)
    try:
        settings = make_settings(
            tmp_path / "data",
            retrieve={"source": "pacs", "attempts": 1, "retry_interval_s": 0.2, **retrieve},
        )
        node = run_node(dataclasses.replace(settings, destinations=(pacs.destination(),)))
        pacs.node_port = node.scp.port
        yield node, pacs
    finally:
        pacs.stop()


def _events(node, job_id: int, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.message for e in node.store.events(job_id) if e.kind == kind]


def _first_job(node, study: str):  # type: ignore[no-untyped-def]
    """Version 1 of ``study``'s job, once the retriever is done with it (failed, or its
    ``retrieved`` event written)."""

    def done():  # type: ignore[no-untyped-def]
        job = next((j for j in node.store.list_jobs() if j.study_instance_uid == study
                    and j.version == 1), None)  # fmt: skip
        if job is not None and (job.state == FAILED or _events(node, job.id, "retrieved")):
            # read again: the event and the job's failure are written together, possibly
            # after the job above was read (a job read as still retrieving was returned)
            return node.store.get_job(job.id)
        return None

    return wait_for(done, timeout=60, what="the retrieval")


@pytest.mark.parametrize("broken", ["dose-listed-first", "dose-after", "both"])
def test_a_series_the_pacs_cannot_send_keeps_none_of_the_others_away(  # type: ignore[no-untyped-def]
    run_node, tmp_path, monkeypatch, caplog, broken
) -> None:
    """The PACS cannot send the plan's dose (Orthanc: 0xC000, a file it cannot read). Listed
    before the structure set, it failed the job at once and the structure set was never asked
    for; after it, the job failed all the same, saying the PACS did not know the node as a
    move destination. Each series is asked for on its own, the structure set first; what came
    is used, and the event and the log name the dose and why it did not come. Only when
    nothing came may the PACS not know the node: then the job fails at once, saying so."""
    study = factories.small_study(tmp_path / "in")
    rt = study["rtstruct"][0]
    ds = pydicom.dcmread(rt)
    frame = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    dose = _rtdose(tmp_path / "dose", ds.StudyInstanceUID, frame)
    dose_series = str(pydicom.dcmread(dose).SeriesInstanceUID)
    held = [dose, rt] if broken == "dose-listed-first" else [rt, dose]
    with _node_and_pacs(run_node, tmp_path, monkeypatch, held) as (node, pacs):
        pacs.cannot_send = {dose_series}
        if broken == "both":
            pacs.cannot_send.add(str(ds.SeriesInstanceUID))
        assert storescu(node.scp.port, *study["t1c"], *study["flair"]).returncode == 0
        first = _first_job(node, str(ds.StudyInstanceUID))
    assert pacs.asked == [str(ds.SeriesInstanceUID), dose_series]  # the structure set first
    dose_said = (
        f"pacs (FAKEPACS@127.0.0.1:{pacs.port}) answered the C-MOVE of RTDOSE 'PLAN DOSE' with "
        "0xC000 (failed: unable to process): cannot read the stored file"
    )
    if broken == "both":
        assert first.state == FAILED
        assert first.reason.endswith(
            f"; pacs was asked for them: pacs (FAKEPACS@127.0.0.1:{pacs.port}) answered the "
            "C-MOVE of RTSTRUCT 'RT structures' with 0xC000 (failed: unable to process): "
            f"cannot read the stored file; {dose_said}; nothing was sent: check that it knows "
            "GLIOFORECAST as a move destination (this node's AE title, address and port) "
            "(after 1 attempt(s))"
        ), first.reason
        return
    (retrieved,) = _events(node, first.id, "retrieved")
    assert retrieved == (
        f"1 instance(s) came (RTSTRUCT 'RT structures' of study {ds.StudyInstanceUID}: 1 came); "
        f"1 series not retrieved: {dose_said}"
    )  # one series came: the PACS knows the node as a move destination
    assert node.store.series_paths(str(ds.SeriesInstanceUID))
    assert first.state != FAILED
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.name == "dicom_node.retrieve" and "RTDOSE" in r.getMessage()]  # fmt: skip
    assert warning == f"retrieval for job {first.id}: {dose_said}"


def _came(node: Node, job_id: int, what: str) -> list[str]:
    """The job's "retrieved" events that say what came, once there is one (60 s at most)."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: [m for m in _events(node, job_id, "retrieved") if " came (" in m],
        timeout=60, what=what,
    )  # fmt: skip


def test_a_move_answered_before_the_pacs_sends_counts_what_came(  # type: ignore[no-untyped-def]
    run_node, tmp_path, monkeypatch
) -> None:
    """Orthanc with SynchronousCMove false answers "Completed 1" at once, before it sends.
    When its send then failed, the node trusted the count: "1 instance(s) came", the next
    version failed for want of the structure set, and the PACS was never asked again. What
    came is what the receiver stored, waited for up to retrieve.move_timeout_s: nothing came,
    so the job fails saying so, and is asked about again (retrieve.ask_again_h); when the
    PACS sends a second after it answered, what came is counted."""
    study = factories.small_study(tmp_path / "in")
    rt = study["rtstruct"][0]
    ds = pydicom.dcmread(rt)
    with _node_and_pacs(
        run_node, tmp_path, monkeypatch, [rt], move_timeout_s=2, ask_again_h=0.001
    ) as (node, pacs):
        pacs.asynchronous = "never"
        assert storescu(node.scp.port, *study["t1c"], *study["flair"]).returncode == 0
        first = _first_job(node, str(ds.StudyInstanceUID))
        assert first.state == FAILED, first.reason
        assert (
            f"; pacs was asked for them: pacs (FAKEPACS@127.0.0.1:{pacs.port}) reported 1 "
            "instance(s) sent, but none came within 2 s (retrieve.move_timeout_s) (RTSTRUCT "
            f"'RT structures' of study {ds.StudyInstanceUID}: 0 came of 1 reported sent): a "
            "PACS that moves asynchronously (Orthanc with SynchronousCMove false) answers "
            "before it sends"
        ) in first.reason, first.reason
        assert "instance(s) came (" not in first.reason
        pacs.asynchronous = "late"  # its sending works now
        came = _came(node, first.id, "the retrieval asked again")
    assert came[0].startswith(
        f"1 instance(s) came (RTSTRUCT 'RT structures' of study {ds.StudyInstanceUID}: 1 came)"
    ), came
    assert pacs.asked == [str(ds.SeriesInstanceUID)] * 2


def test_a_move_of_which_part_never_comes_is_not_waited_for_to_its_timeout(  # type: ignore[no-untyped-def]
    run_node, tmp_path, monkeypatch
) -> None:
    """An asynchronous PACS reported two instances sent and one came: the retriever, which
    serves every study, waited the whole retrieve.move_timeout_s (600 s by default) for the
    other. It stops once nothing more came for a while, and uses what came."""
    monkeypatch.setattr(retrieve, "ARRIVAL_SETTLE_S", 1.0)
    study = factories.small_study(tmp_path / "in")
    rt = study["rtstruct"][0]
    ds = pydicom.dcmread(rt)
    other = pydicom.dcmread(rt)  # a second structure set of the series, which never comes
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    other.save_as(tmp_path / "other.dcm")
    with _node_and_pacs(
        run_node, tmp_path, monkeypatch, [rt, tmp_path / "other.dcm"], move_timeout_s=300
    ) as (node, pacs):
        pacs.asynchronous = "part"
        assert storescu(node.scp.port, *study["t1c"], *study["flair"]).returncode == 0
        first = _first_job(node, str(ds.StudyInstanceUID))
        came = _came(node, first.id, "the retrieval, well before move_timeout_s")
    assert came[0].startswith(
        f"1 instance(s) came (RTSTRUCT 'RT structures' of study {ds.StudyInstanceUID}: 1 came "
        "of 2 reported sent)"
    ), came


@pytest.mark.parametrize(
    ("refused", "why"),
    [
        ("C-MOVE", "pacs (FAKEPACS@127.0.0.1:{port}) aborted the C-MOVE of RTSTRUCT 'RT "
                   "structures' (A-ABORT "),
        ("C-FIND", "pacs (FAKEPACS@127.0.0.1:{port}) aborted the C-FIND at STUDY level (A-ABORT "),
        ("silent", "no response from pacs (FAKEPACS@127.0.0.1:{port}) to the C-MOVE of RTSTRUCT "
                   "'RT structures' within 1 s (retrieve.move_timeout_s): timed out, the "
                   "association aborted"),
    ],
    ids=["aborts-c-move", "aborts-c-find", "does-not-answer"],
)  # fmt: skip
def test_a_pacs_that_aborts_the_request_is_told_from_one_that_does_not_answer(  # type: ignore[no-untyped-def]
    run_node, tmp_path, monkeypatch, refused, why
) -> None:
    """A PACS that does not allow the node's C-MOVE or C-FIND (Orthanc: AllowMove false, or
    the calling AE title unknown) aborts the association at once: the node said "no response
    (timeout or lost)". It says the PACS aborted, and what to check; a PACS that does not
    answer at all is a timeout. The series after are not asked on the ended association."""
    study = factories.small_study(tmp_path / "in")
    rt = study["rtstruct"][0]
    ds = pydicom.dcmread(rt)
    frame = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    dose = _rtdose(tmp_path / "dose", ds.StudyInstanceUID, frame)
    with _node_and_pacs(run_node, tmp_path, monkeypatch, [rt, dose], move_timeout_s=1) as (
        node, pacs,
    ):  # fmt: skip
        if refused == "silent":
            pacs.silent = {"C-MOVE"}
        else:
            pacs.aborts = {refused}
        assert storescu(node.scp.port, *study["t1c"], *study["flair"]).returncode == 0
        first = _first_job(node, str(ds.StudyInstanceUID))
    assert first.state == FAILED
    assert f"; pacs was asked for them: {why.format(port=pacs.port)}" in first.reason, first.reason
    if refused != "silent":
        assert (
            f"expected a response): it may not allow {refused} from AE GLIOFORECAST; check its "
            "configuration"
        ) in first.reason, first.reason
    else:
        assert "aborted the" not in first.reason
    if refused != "C-FIND":
        assert first.reason.endswith(
            f"; not asked, the association having ended: RTDOSE 'PLAN DOSE' of study "
            f"{ds.StudyInstanceUID} (after 1 attempt(s))"
        ), first.reason


@pytest.mark.parametrize(
    ("syntaxes", "came"),
    [(ALL_TRANSFER_SYNTAXES, True), ([ExplicitVRLittleEndian], False)],
    ids=["pacs-takes-all", "pacs-takes-explicit-only"],
)
def test_a_c_get_offers_the_transfer_syntaxes_the_receiver_takes(  # type: ignore[no-untyped-def]
    run_node, tmp_path, monkeypatch, syntaxes, came
) -> None:
    """The PACS holds the structure set deflated and does not transcode. The node's C-GET
    offered Explicit and Implicit VR Little Endian only: the PACS answered 0xC000 and the job
    failed, with nothing said of transfer syntaxes. It offers what its receiver takes, each
    syntax in its own context, so the PACS sends the series as it holds it; a PACS that takes
    none of the one it holds is named with what it accepted."""
    study = factories.small_study(tmp_path / "in")
    rt = study["rtstruct"][0]
    ds = pydicom.dcmread(rt)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(rt, enforce_file_format=True)
    with _node_and_pacs(run_node, tmp_path, monkeypatch, [rt], syntaxes, method="get") as (
        node, _,
    ):  # fmt: skip
        assert storescu(node.scp.port, *study["t1c"], *study["flair"]).returncode == 0
        first = _first_job(node, str(ds.StudyInstanceUID))
    if came:
        (retrieved,) = _events(node, first.id, "retrieved")
        assert retrieved == (
            f"1 instance(s) came (RTSTRUCT 'RT structures' of study {ds.StudyInstanceUID}: 1 came)"
        )
        (path,) = node.store.series_paths(str(ds.SeriesInstanceUID))
        stored = pydicom.dcmread(node.settings.storage.spool_dir / path)
        assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        return
    assert first.state == FAILED
    assert (
        "answered the C-GET of RTSTRUCT 'RT structures' with 0xC000 (failed: unable to "
        "process): cannot transcode; check that it can send the series in a transfer syntax "
        "the node takes: for RT Structure Set Storage it proposed the 16 its receiver takes "
        "(docs/CONFORMANCE.md) and the PACS accepted Explicit VR Little Endian; a PACS holding "
        "the series in another that it does not convert (transcode) cannot send it"
    ) in first.reason, first.reason
