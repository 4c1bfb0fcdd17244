"""Which studies wait for the PACS, and what the node does when the PACS cannot answer (the
exchanges with real PACS are in tests/integration/test_retrieve.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.assembler import Assembler
from dicom_node.cli import main
from dicom_node.errors import ConfigError
from dicom_node.jobs import FAILED, RETRIEVING, JobStore
from dicom_node.ports import free_port
from dicom_node.retrieve import Patient, Retriever, date_range, rt_studies
from dicom_node.service import Node
from dicom_node.settings import Destination, Settings, load_settings, warnings_of
from dicom_node.spool import Spool
from tests import factories
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_jobs import _receive


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
