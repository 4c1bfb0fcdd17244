"""A synthetic study through the running node to a real storage SCP (dcmtk storescp).

The predictor is the no-change baseline (the model is not bundled yet); everything else is the
production chain: storescu -> SCP -> spool -> assembly -> conversion -> prediction -> output
objects -> outbox -> C-STORE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.jobs import DONE, FAILED, QUEUED, RUNNING, SUPERSEDED, JobStore
from dicom_node.pipeline import not_the_head
from dicom_node.settings import Destination
from inference.synthetic.cohort import generate_patient
from inference.synthetic.planning_frame import planning_frame, to_planning_frame
from sr_writer.labels import series_description
from tests.conftest import tool, wait_for
from tests.dicom_node.conftest import (
    all_sent,
    finished_job,
    make_settings,
    settled_job,
    storescp_destination,
)
from tests.dicom_node.test_scp import storescu
from tests.factories import copy_series


@pytest.fixture(scope="module")
def patient(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("synthetic")
    record = generate_patient(0, 5, out, spacing_mm=4.0, formats=("dicom",))
    (pre,) = out.glob("*/dicom/pre")
    return pre, record.values


@pytest.fixture
def pacs(tmp_path):  # type: ignore[no-untyped-def]
    proc, destination = storescp_destination(tmp_path / "pacs", "pacs", "PACS")
    yield destination, tmp_path / "pacs"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def planning_system(tmp_path):  # type: ignore[no-untyped-def]
    """A destination that takes only the predicted tumour's SEG and RTSTRUCT."""
    proc, destination = storescp_destination(
        tmp_path / "tps", "tps", "TPS", objects=("seg", "rtstruct", "rtstruct_planning")
    )
    yield destination, tmp_path / "tps"
    proc.terminate()
    proc.wait(timeout=30)


def test_synthetic_study_round_trip(run_node, patient, pacs, planning_system, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pre, truth = patient
    destination, received = pacs
    tps, at_tps = planning_system
    settings = dataclasses.replace(
        make_settings(tmp_path / "data"), destinations=(destination, tps)
    )
    node = run_node(settings)
    files = sorted(p for p in pre.rglob("*.dcm"))
    sent = storescu(node.scp.port, *files)
    assert sent.stderr.count("Received Store Response (Success)") == len(files)
    job = wait_for(
        lambda: settled_job(node),
        timeout=120,
        what="the job to finish",
    )
    assert job.state == DONE, job.reason

    def delivered() -> int | None:
        states = node.outbox.counts().get("pacs", {})
        total, sent = sum(states.values()), states.get("sent", 0)
        on_disk = len(list(received.iterdir()))
        return total if total and sent == total == on_disk else None

    objects = wait_for(delivered, timeout=120, what="every result at the PACS")
    datasets = [pydicom.dcmread(p) for p in received.iterdir()]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    roles = {js.series.series_instance_uid: js.role for js in node.store.job_series(job.id)}
    t1c = [ds for ds in headers if roles.get(ds.SeriesInstanceUID) == "t1c"]
    study = {ds.StudyInstanceUID for ds in datasets}
    assert study == {t1c[0].StudyInstanceUID}  # same study as the source
    assert all(ds.PatientName == t1c[0].PatientName for ds in datasets)
    # the study's first version: descriptions without a version, as sites already hold them
    assert job.version == 1
    assert {str(ds.SeriesDescription) for ds in datasets} == {
        series_description(what) for what in ("T1-Gd SC", "UNCERTAINTY SC", "SR", "SEG", "RTSTRUCT")
    }
    by_modality: dict[str, int] = {}
    for ds in datasets:
        by_modality[ds.Modality] = by_modality.get(ds.Modality, 0) + 1
    sc = [ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(sc) == 2 * len(t1c)  # prediction and uncertainty, one image per source slice
    assert by_modality["SEG"] == 1 and by_modality["RTSTRUCT"] == 1 and by_modality["SR"] == 1
    assert objects == len(datasets)
    # the SR's current tumour volume is the GTV of the synthetic truth (rasterised on the
    # T1-Gd grid, so within a few voxels of it)
    (sr,) = [ds for ds in datasets if ds.Modality == "SR"]
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _walk(sr)
        if "MeasuredValueSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning
        in ("Volume", "Tumor volume", "Current tumour volume")
    ]
    assert volumes, "no volume in the SR"
    assert any(abs(v - truth["gtv_ml"]) / truth["gtv_ml"] < 0.2 for v in volumes), volumes

    # the planning system gets only what it takes: the SEG and the RTSTRUCT (no planning-frame
    # RTSTRUCT here: the GTV came on the MR's frame)
    wait_for(lambda: node.outbox.counts().get("tps") == {"sent": 2}, timeout=60, what="the TPS")
    at_planning = sorted(pydicom.dcmread(p).Modality for p in at_tps.iterdir())
    assert at_planning == ["RTSTRUCT", "SEG"]
    reason = node.store.get_job(job.id).reason
    assert "93 deliveries queued to pacs, tps (seg, rtstruct, rtstruct_planning)" in reason
    # where the job's results are, as the operator sees them
    shown = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "jobs", "show", str(job.id), "--data-dir",
         str(tmp_path / "data")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "  deliveries (glioforecast outbox list):" in shown
    assert re.search(r"^    pacs +sent=91$", shown, re.M), shown
    assert re.search(r"^    tps +sent=2$", shown, re.M), shown

    # a PACS that forwards the whole study back sends the results too: every one is accepted
    # (the sender's transfer stays green) and stored, and none starts a job or a new send
    results = sorted(received.iterdir())
    back = storescu(node.scp.port, *results, extra=("-R",))
    assert back.stderr.count("Received Store Response (Success)") == len(results), back.stderr
    assert node.store.counts()["instances"] == len(files) + len(results)
    time.sleep(1.0)  # more than three quiet periods (0.3 s) of the test settings
    assert [j.id for j in node.store.list_jobs()] == [job.id]
    assert len(list(received.iterdir())) == len(results)


def _walk(ds):  # type: ignore[no-untyped-def]
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _results_at_pacs(  # type: ignore[no-untyped-def]
    run_node, settings, destination, received: Path, study: Path
) -> list[pydicom.Dataset]:
    """The headers of what a node on ``settings`` sent to ``destination`` (its folder
    ``received``) for ``study``, once its job is done and every result delivered."""
    node = run_node(dataclasses.replace(settings, destinations=(destination,)))
    storescu(node.scp.port, *sorted(study.rglob("*.dcm")))
    job = wait_for(lambda: settled_job(node), timeout=120, what="the job to finish")
    assert job.state == DONE, job.reason
    all_sent(node, "pacs", timeout=120)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in received.iterdir()]


def test_the_optional_objects_follow_the_outputs_settings(  # type: ignore[no-untyped-def]
    run_node, patient, pacs, tmp_path
) -> None:
    """The derived MR series (which a destination's objects could name) could not be turned
    on in the node, nor the uncertainty series off: the ``outputs`` section sets them.

    The source T1-Gd here is numbered head to foot: the images derived from it slice by slice
    were numbered in the node's own order, so that the viewer that pairs them with the source
    by Instance Number (the SC carries no position) scrolled them the other way."""
    pre, _ = patient
    destination, received = pacs
    study = tmp_path / "study"
    shutil.copytree(pre, study)
    t1c = sorted((study / "003_t1c").glob("*.dcm"))
    source_numbers = {}
    for path in t1c:
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = len(t1c) + 1 - int(ds.InstanceNumber)
        ds.save_as(path)
        source_numbers[str(ds.SOPInstanceUID)] = int(ds.InstanceNumber)
    settings = make_settings(
        tmp_path / "data",
        outputs={"derived_mr": True, "uncertainty_sc": False, "institution_name": "CHU Test"},
    )
    datasets = _results_at_pacs(run_node, settings, destination, received, study)
    series = {str(ds.SeriesDescription) for ds in datasets}
    assert any("derived MR" in d for d in series), series
    assert not any("UNCERTAINTY" in d for d in series), series
    (sr,) = [ds for ds in datasets if ds.Modality == "SR"]
    assert sr.InstitutionName == "CHU Test"
    per_slice = [ds for ds in datasets if ds.Modality in ("OT", "MR")]
    assert len(per_slice) == 2 * len(t1c)
    for ds in per_slice:  # each image is numbered as the source slice it shows
        shown = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert int(ds.InstanceNumber) == source_numbers[shown], ds.SeriesDescription


def test_results_of_a_lossy_compressed_t1gd_say_so(run_node, patient, pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A PACS that stored the T1-Gd near-lossless (JPEG-LS, LossyImageCompression 01) routed
    it on: the predicted images said 00 (never lossy compressed), which PS3.3 forbids once a
    source was."""
    pre, _ = patient
    destination, received = pacs
    study = tmp_path / "study"
    shutil.copytree(pre, study)
    for path in (study / "003_t1c").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_14495_1"
        ds.LossyImageCompressionRatio = "2.5"
        ds.save_as(path)
    settings = make_settings(tmp_path / "data", outputs={"derived_mr": True})
    datasets = _results_at_pacs(run_node, settings, destination, received, study)
    images = [ds for ds in datasets if ds.Modality not in ("SR", "RTSTRUCT")]
    assert {ds.Modality for ds in images} == {"OT", "MR", "SEG"}
    for ds in images:
        assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_14495_1")
        assert float(ds.LossyImageCompressionRatio) == 2.5


def test_interrupted_job_is_queued_again_and_superseded_results_are_dropped(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    with store.transaction() as db:
        db.execute(
            "INSERT INTO studies (study_instance_uid, patient_key, first_received_at, "
            "last_received_at) VALUES ('1.2', 'k', 0, 0)"
        )
    first = store.create_job("1.2", [], QUEUED, "")
    assert store.claim_next() == first
    assert store.get_job(first).state == RUNNING  # type: ignore[union-attr]
    # the process dies here; at the next start the job runs again
    assert store.requeue_running() == 1
    assert store.get_job(first).state == QUEUED  # type: ignore[union-attr]
    assert store.claim_next() == first
    second = store.create_job("1.2", [], QUEUED, "")  # a late instance arrived meanwhile
    assert store.get_job(first).state == SUPERSEDED  # type: ignore[union-attr]
    assert store.claim_next() == second
    assert store.claim_next() is None
    # the first run ends after it was superseded: its outcome does not bring it back
    assert store.set_state(first, FAILED, "late outcome") is False
    assert store.get_job(first).state == SUPERSEDED  # type: ignore[union-attr]
    assert "superseded; outcome not applied: failed late outcome" in [
        e.message for e in store.events(first)
    ]


def test_a_job_out_of_time_is_killed_retried_then_failed(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pre, _ = patient
    settings = make_settings(tmp_path / "data", worker={"job_timeout_s": 0.5, "max_attempts": 2})
    node = run_node(settings)
    storescu(node.scp.port, *sorted(pre.rglob("*.dcm")))
    job = wait_for(
        lambda: next((j for j in node.store.list_jobs() if j.state == FAILED), None),
        timeout=120,
        what="the job to fail",
    )
    assert job.attempts == 2
    assert job.reason == "timed out after 0.5 s (worker.job_timeout_s); gave up after 2 attempt(s)"
    events = [e.message for e in node.store.events(job.id)]
    assert "attempt 1: timed out after 0.5 s (worker.job_timeout_s)" in events
    assert node.worker.alive  # the service is unharmed


def test_a_t1gd_of_another_body_part_gets_no_prediction(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A thigh study whose series matched the roles was predicted and labelled a brain
    ("MR Brain" in the SR, Brain on the SEG). Its BodyPartExamined names another part: the
    job fails saying so. A value the node does not know (a scanner's own word) is no reason."""
    pre, _ = patient
    sent = tmp_path / "sent"
    for path in sorted(pre.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if path.parent.name == "003_t1c":
            ds.BodyPartExamined = "EXTREMITY"
        (sent / path.parent.name).mkdir(parents=True, exist_ok=True)
        ds.save_as(sent / path.parent.name / path.name)
    node = run_node(make_settings(tmp_path / "data"))
    storescu(node.scp.port, *sorted(sent.rglob("*.dcm")))
    job = wait_for(lambda: settled_job(node), timeout=120, what="the job")
    assert job.state == FAILED
    assert "is of the extremity (BodyPartExamined EXTREMITY): expected a brain MRI" in job.reason
    header = pydicom.dcmread(sorted((sent / "003_t1c").glob("*.dcm"))[0])
    for word in ("KOPF", "HEAD", ""):
        header.BodyPartExamined = word
        assert not_the_head(header, node.store.job_series(job.id)[0].series) == ""


def test_a_job_process_that_dies_is_retried(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pre, _ = patient
    node = run_node(make_settings(tmp_path / "data"))
    storescu(node.scp.port, *sorted(pre.rglob("*.dcm")))
    child = wait_for(lambda: node.worker.child, timeout=60, what="the job process")
    wait_for(lambda: child.pid, what="its pid")
    # job processes are forked by a fork server (dicom_node.worker.job_context)
    server = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert server not in (os.getpid(), 1)
    os.kill(child.pid, signal.SIGKILL)  # what the kernel's OOM killer does
    job = wait_for(
        lambda: settled_job(node),
        timeout=120,
        what="the job to finish",
    )
    assert job.state == DONE, job.reason
    assert job.attempts == 2
    events = [e.message for e in node.store.events(job.id)]
    assert "attempt 1: the job process died of SIGKILL (killed: out of memory?)" in events
    # the fork server killed too: the next job's process starts from a new one
    os.kill(server, signal.SIGKILL)
    late = pydicom.dcmread(sorted(pre.rglob("*.dcm"))[0])
    late.SeriesInstanceUID, late.SOPInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    late.SeriesNumber, late.SeriesDescription = 90, "localizer"
    late.save_as(tmp_path / "late.dcm")
    storescu(node.scp.port, tmp_path / "late.dcm")
    again = wait_for(lambda: finished_job(node, job.study_instance_uid, 2), timeout=120,
                     what="the reopened study's job")  # fmt: skip
    assert again.state == DONE and again.attempts == 1, again.reason


def test_a_stop_that_kills_the_job_process_does_not_count_its_attempt(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """systemd's default stop signals the job process with the node: the job died, counted a
    failed attempt and started again at once, during the stop. Now it waits for the next
    start, its attempt not counted."""
    pre, _ = patient
    node = run_node(make_settings(tmp_path / "data", worker={"max_attempts": 1}))
    storescu(node.scp.port, *sorted(pre.rglob("*.dcm")))
    child = wait_for(lambda: node.worker.child, timeout=60, what="the job process")
    wait_for(lambda: child.pid, what="its pid")
    node.worker.request_stop()  # what Node.stop does first
    os.kill(child.pid, signal.SIGTERM)
    wait_for(lambda: not node.worker.alive, timeout=30, what="the worker to end")
    (job,) = node.store.list_jobs()
    assert (job.state, job.attempts) == (QUEUED, 0), job.reason
    assert job.reason.startswith("interrupted by the node's stop (the job process died of ")


def test_a_worker_step_that_fails_does_not_stop_the_jobs(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The worker thread ended on the first error of a step (the job database locked by
    another process, the fork server killed as a job started): the node took studies and ran
    none. The job it had taken is queued again, its attempt not counted, and run."""
    pre, _ = patient
    node = run_node(make_settings(tmp_path / "data", worker={"max_attempts": 1}))
    real_attempt, failures = node.worker._attempt, []

    def attempt(job_id: int):  # type: ignore[no-untyped-def]
        if not failures:  # as multiprocessing raises when its fork server is gone
            failures.append(job_id)
            raise EOFError("unexpected EOF")
        return real_attempt(job_id)

    node.worker._attempt = attempt
    storescu(node.scp.port, *sorted(pre.rglob("*.dcm")))
    job = wait_for(lambda: settled_job(node), timeout=120, what="the job to finish")
    assert failures and job.state == DONE and job.attempts == 1, job.reason
    assert node.worker.alive
    events = [e.message for e in node.store.events(job.id)]
    assert "interrupted by an error of the node's worker; queued again" in events


def test_a_destination_that_hangs_does_not_hold_up_the_others(  # type: ignore[no-untyped-def]
    run_node, patient, planning_system, tmp_path
) -> None:
    """The PACS takes the connection and never answers (a hung service behind its port): each
    attempt to it waits node-side timeouts (30 s for the A-ASSOCIATE-AC). The planning system's
    results do not wait behind it: every destination has its own delivery loop."""
    import socket
    import threading

    pre, _ = patient
    tps, at_tps = planning_system
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    hung = Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                       port=listener.getsockname()[1])  # fmt: skip
    node = run_node(dataclasses.replace(make_settings(tmp_path / "data"), destinations=(hung, tps)))
    try:
        storescu(node.scp.port, *sorted(pre.rglob("*.dcm")))
        job = wait_for(lambda: settled_job(node), timeout=120, what="the job")
        assert job.state == DONE, job.reason
        sent = all_sent(node, "tps", timeout=120)
        assert sent == len(list(at_tps.iterdir())) > 0
        items = node.outbox.items()
        pacs = node.outbox.counts()["pacs"]  # nothing delivered there: its attempt hangs
        assert "sent" not in pacs and set(pacs) <= {"sending", "pending"}, pacs
        # the planning system got everything before the PACS's first attempt ended (timed out
        # after 30 s: a machine however slow tells by the times, not the wall clock)
        last_at_tps = max(i.sent_at or 0 for i in items if i.destination == "tps")
        failed_at_pacs = [i.updated_at for i in items if i.destination == "pacs" and i.attempts]
        assert all(last_at_tps < t for t in failed_at_pacs), (last_at_tps, failed_at_pacs)
    finally:
        listener.close()
        for conn in held:  # the PACS's pending association fails at once
            conn.close()


def test_storage_waits_double_up_to_an_hour() -> None:
    from dicom_node.worker import _storage_delay

    assert [_storage_delay(60, n) for n in (1, 2, 3, 6, 7, 20)] == [60, 120, 240, 1920, 3600, 3600]
    assert _storage_delay(5000, 3) == 5000  # a first wait set above an hour is kept


def _immutable(folder: Path, on: bool) -> bool:
    """``chattr +i`` (or ``-i``) on ``folder``: nothing can be written in it, even by root."""
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, str(folder)], capture_output=True).returncode == 0


def test_a_job_that_cannot_store_its_results_waits_for_the_storage(  # type: ignore[no-untyped-def]
    run_node, patient, pacs, tmp_path
) -> None:
    """The folder where results wait for delivery refuses writes (as a full disk would): the
    job is not failed (no failure notice, no earlier results taken back) but queued again
    without counting an attempt; /health says the storage is degraded; once the folder takes
    writes again the job runs and its results reach the PACS."""
    import json

    from tests.dicom_node.test_health import get

    pre, _ = patient
    destination, received = pacs
    settings = dataclasses.replace(
        make_settings(tmp_path / "data", worker={"storage_retry_s": 5.0}),
        destinations=(destination,),
    )
    node = run_node(settings)
    objects = tmp_path / "data" / "outbox-objects"
    if not _immutable(objects, True):
        pytest.skip("chattr +i is not permitted here (it needs CAP_LINUX_IMMUTABLE)")
    try:
        storescu(node.scp.port, *sorted(pre.rglob("*.dcm")))
        waiting = wait_for(
            lambda: next((j for j in node.store.list_jobs() if j.reason.startswith("waiting")),
                         None),
            timeout=120, what="the job waiting for the storage",
        )  # fmt: skip
        assert waiting.state == QUEUED and waiting.attempts == 0, waiting
        assert "cannot store outbox object" in waiting.reason, waiting.reason
        assert "Operation not permitted" in waiting.reason, waiting.reason
        assert node.health is not None
        code, body = get(node.health.server.server_address[1], "/health")
        assert code == 503 and json.loads(body)["components"]["storage"] is False
        _, text = get(node.health.server.server_address[1], "/metrics")
        wait_s = re.search(r"^glioforecast_worker_storage_wait_seconds (\S+)$", text, re.M)
        assert wait_s is not None and 0 < float(wait_s.group(1)) <= 5.0
    finally:
        _immutable(objects, False)
    job = wait_for(lambda: settled_job(node), timeout=120, what="the job run again")
    assert job.id == waiting.id and job.state == DONE and job.attempts == 1, job.reason
    kinds = [e.kind for e in node.store.events(job.id)]
    assert "waiting" in kinds and "notice" not in kinds and FAILED not in kinds
    assert all_sent(node, "pacs") == len(list(received.iterdir())) > 0
    code, body = get(node.health.server.server_address[1], "/health")
    assert code == 200 and json.loads(body)["components"]["storage"] is True


def test_round_trip_to_orthanc_with_the_sr_numbers_of_the_truth(
    run_node, patient, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """storescu -> node -> Orthanc; the results sit in the source study, the SR reads back."""
    import io

    from sr_writer.structured_report import read_summary
    from tests.integration.orthanc import OrthancServer, orthanc_binary

    orthanc_binary()
    pre, truth = patient
    pacs = OrthancServer(tmp_path / "orthanc").start()
    try:
        files = sorted(pre.rglob("*.dcm"))
        storescu(pacs.dicom_port, *files, extra=("-aec", pacs.ae_title))
        before = pacs.count_instances()
        assert before == len(files)
        settings = dataclasses.replace(
            make_settings(tmp_path / "data"),
            destinations=(
                Destination(
                    name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port
                ),
            ),
        )
        node = run_node(settings)
        storescu(node.scp.port, *files)
        job = wait_for(
            lambda: settled_job(node),
            timeout=120,
            what="the job",
        )
        assert job.state == DONE, job.reason

        def delivered() -> bool:
            states = node.outbox.counts().get("pacs", {})
            return bool(states) and set(states) == {"sent"}

        wait_for(delivered, timeout=120, what="the results to be acknowledged")
        sent = node.outbox.counts()["pacs"]["sent"]
        assert pacs.count_instances() == before + sent
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        series = pacs.series_of_study(study_uid)
        outputs = {
            s["MainDicomTags"]["SeriesDescription"]: s
            for s in series.values()
            if s["MainDicomTags"].get("SeriesDescription", "").startswith("SYNTHETIC PREDICTION")
        }
        assert {d.rsplit(" - ", 1)[1] for d in outputs} == {
            "T1-Gd SC", "UNCERTAINTY SC", "SEG", "RTSTRUCT", "SR"
        }  # fmt: skip
        roles = {js.series.series_instance_uid: js for js in node.store.job_series(job.id)}
        (t1c,) = [js for js in roles.values() if js.role == "t1c"]
        sc = next(s for d, s in outputs.items() if d.endswith("T1-Gd SC"))
        assert len(sc["Instances"]) == t1c.series.instance_count
        sr_id = next(s for d, s in outputs.items() if d.endswith(" SR"))["Instances"][0]
        numbers = read_summary(pydicom.dcmread(io.BytesIO(pacs.raw(f"/instances/{sr_id}/file"))))
        # the current volume is the synthetic GTV rasterised on the T1-Gd grid
        assert abs(numbers["current_ml"] - truth["gtv_ml"]) / truth["gtv_ml"] < 0.2  # type: ignore[operator]
        assert numbers["category"] == "Stable Disease"  # the no-change baseline
    finally:
        pacs.stop()


def test_planning_ct_frame_structure_set_waits_for_its_registration(  # type: ignore[no-untyped-def]
    run_node, patient, pacs, tmp_path
) -> None:
    """As a planning system routes them: the GTV and the dose on the planning CT's frame of
    reference, the registration of the MR to the CT sent later. Without it the job fails and
    says what to send; the registration arriving reopens the study, and the new job places the
    GTV on the MR by it."""
    pre, truth = patient
    destination, received = pacs
    planned = tmp_path / "planned"
    shutil.copytree(pre, planned)
    to_planning_frame(planned, 5, 0)
    settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(destination,))
    node = run_node(settings)
    reg = planned / "REG" / "reg.dcm"
    files = sorted(p for p in planned.rglob("*.dcm") if p != reg)
    sent = storescu(node.scp.port, *files)
    assert sent.stderr.count("Received Store Response (Success)") == len(files)
    first = wait_for(
        lambda: settled_job(node),
        timeout=120, what="the first job to finish",
    )  # fmt: skip
    assert first.state == FAILED
    assert "expected the same frame of reference or a Spatial Registration" in first.reason
    sent = storescu(node.scp.port, reg)
    assert "Received Store Response (Success)" in sent.stderr, sent.stderr
    second = wait_for(
        lambda: next(
            (j for j in node.store.list_jobs() if j.id != first.id and j.state in (DONE, FAILED)),
            None,
        ),
        timeout=120, what="the job of the reopened study",
    )  # fmt: skip
    assert second.state == DONE, second.reason
    instances = node.store.job_instances(second.id)
    assert sum(len(v) for v in instances.values()) == len(files) + 1
    # the study's second version: every series description says so, the numbers are the same
    assert second.version == 2
    all_sent(node, "pacs", timeout=120)
    results = [pydicom.dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
    assert {(int(ds.SeriesNumber), str(ds.SeriesDescription)) for ds in results} == {
        (9001, "SYNTHETIC PREDICTION - RESEARCH USE ONLY - T1-Gd SC v2"),
        (9002, "SYNTHETIC PREDICTION - RESEARCH USE ONLY - UNCERTAINTY SC v2"),
        (9003, "SYNTHETIC PREDICTION - RESEARCH USE ONLY - SR v2"),
        (9004, "SYNTHETIC PREDICTION - RESEARCH USE ONLY - SEG v2"),
        (9005, "SYNTHETIC PREDICTION - RESEARCH USE ONLY - RTSTRUCT v2"),
        (9007, "SYNTHETIC PREDICTION - RESEARCH USE ONLY - RTSTRUCT PLAN v2"),
    }
    # the tumour volume the SR reports is the synthetic truth's GTV, as on the MR's own frame
    # every result acknowledged above, so written whole by storescp (a file read while it was
    # being written made this test fail at random)
    sr = next(p for p in received.iterdir() if pydicom.dcmread(p).Modality == "SR")
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _walk(pydicom.dcmread(sr))
        if "MeasuredValueSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning
        in ("Volume", "Tumor volume", "Current tumour volume")
    ]
    assert any(abs(v - truth["gtv_ml"]) / truth["gtv_ml"] < 0.2 for v in volumes), volumes
    # the registration is among the SR's evidence, with the other inputs
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in pydicom.dcmread(sr).CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert pydicom.dcmread(reg).SOPInstanceUID in evidence
    # for the planner, the predicted tumour also comes on the planning frame, importable onto
    # the plan: contoured on the planes the structure set was drawn on (here the MR's slices
    # mapped by the registration, as the synthetic planning system draws them)
    structures = {
        str(ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID): ds
        for ds in (pydicom.dcmread(p) for p in received.iterdir())
        if ds.Modality == "RTSTRUCT"
    }
    planning = planning_frame(5, 0)
    mr_for = pydicom.dcmread(next(planned.glob("003_t1c/*.dcm"))).FrameOfReferenceUID
    assert set(structures) == {mr_for, planning.frame_of_reference_uid}
    on_mr, on_plan = structures[mr_for], structures[planning.frame_of_reference_uid]
    assert on_plan.SeriesInstanceUID != on_mr.SeriesInstanceUID
    assert on_plan.SeriesDescription == series_description("RTSTRUCT PLAN", 2)

    def contours(ds):  # type: ignore[no-untyped-def]
        return [
            np.asarray(c.ContourData, float).reshape(-1, 3)
            for roi in ds.ROIContourSequence for c in roi.ContourSequence
        ]  # fmt: skip

    mr_planes = {round(float(c[0, 2]), 2) for c in contours(on_mr)}
    assert contours(on_plan)
    for c in contours(on_plan):  # back on the MR's frame, each lies on one of its slices
        back = (c - planning.translation) @ planning.rotation
        assert np.ptp(back[:, 2]) < 0.01 and round(float(back[:, 2].mean()), 2) in mr_planes
    plan_file = next(
        p for p in received.iterdir() if pydicom.dcmread(p).SOPInstanceUID == on_plan.SOPInstanceUID
    )
    checked = subprocess.run(
        [tool("dciodvfy"), str(plan_file)], capture_output=True, text=True, timeout=60
    )
    assert not [line for line in checked.stderr.splitlines() if line.startswith("Error")], (
        checked.stderr
    )


def _planning_study(pre, tmp_path):  # type: ignore[no-untyped-def]
    """The patient's MR study and, as a planning system exports them, its RT objects in the
    planning CT's study: RTSTRUCT, RTDOSE and REG on the planning frame, another Study UID."""
    study = tmp_path / "planned"
    shutil.copytree(pre, study / "pre")
    to_planning_frame(study / "pre", 5, 0, study / "planning")
    return sorted((study / "pre").rglob("*.dcm")), sorted((study / "planning").rglob("*.dcm"))


def _finished(node, exclude=(), study=None):  # type: ignore[no-untyped-def]
    """The first finished job not in ``exclude`` (of ``study``, when given)."""
    return wait_for(
        lambda: next(
            (
                j
                for j in node.store.list_jobs()
                if j.id not in exclude
                and j.state in (DONE, FAILED)
                and study in (None, j.study_instance_uid)
            ),
            None,
        ),
        timeout=120, what="a job to finish",
    )  # fmt: skip


def test_rt_objects_in_the_planning_ct_study_join_the_mr_study(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """The MR study first (its job fails: no structure set), then the RT objects in the planning
    CT's study: that study cannot run alone, but it reopens the MR study, whose new job uses
    its structure set, dose and registration."""
    pre, _ = patient
    mr, rt = _planning_study(pre, tmp_path)
    node = run_node(make_settings(tmp_path / "data"))
    assert storescu(node.scp.port, *mr).stderr.count("(Success)") == len(mr)
    first = _finished(node)
    assert first.state == FAILED and "missing required role rtstruct" in first.reason
    assert storescu(node.scp.port, *rt).stderr.count("(Success)") == len(rt)
    ct_study = pydicom.dcmread(rt[0]).StudyInstanceUID
    rt_job = _finished(node, study=ct_study)
    assert rt_job.state == FAILED and "missing required role t1c" in rt_job.reason
    assert f"used by the patient's MR study {first.study_instance_uid}" in rt_job.reason
    second = _finished(node, {first.id}, study=first.study_instance_uid)
    assert second.version == 2
    assert second.state == DONE, second.reason
    roles = {js.role for js in node.store.job_series(second.id)}
    assert {"t1c", "rtstruct", "rtdose"} <= roles
    # each series knows its study (the SR lists the linked ones under the planning study)
    studies = {js.role: js.series.study_instance_uid for js in node.store.job_series(second.id)}
    assert studies["rtstruct"] == studies["rtdose"] == ct_study
    assert studies["t1c"] == first.study_instance_uid
    linked = [e.message for e in node.store.events(second.id) if e.kind == "linked"]
    assert linked == [f"RT objects linked from the patient's study {ct_study} (3 series: "
                      "structure set, dose and registrations)"]  # fmt: skip
    assert any(e.kind == "reopened" for e in node.store.events(first.id))


def test_rt_study_first_then_mr_study_and_an_unrelated_plan(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """The RT study first, then the MR study: linked at once. The same RT study without its
    registration (another plan's frame) is not linked: the MR study's job fails as before."""
    pre, _ = patient
    mr, rt = _planning_study(pre, tmp_path)
    node = run_node(make_settings(tmp_path / "data"))
    assert storescu(node.scp.port, *rt).stderr.count("(Success)") == len(rt)
    rt_job = _finished(node)
    assert rt_job.state == FAILED and "missing required role t1c" in rt_job.reason
    assert storescu(node.scp.port, *mr).stderr.count("(Success)") == len(mr)
    job = _finished(node, {rt_job.id})
    assert job.state == DONE, job.reason
    # the RT study's failed job says where its objects went
    told = [e.message for e in node.store.events(rt_job.id) if e.kind == "linked"]
    assert told == [f"its RT objects are used by job {job.id} of the patient's study "
                    f"{job.study_instance_uid}"]  # fmt: skip

    other = run_node(make_settings(tmp_path / "data2"))
    without_reg = [p for p in rt if p.parent.name != "REG"]
    assert storescu(other.scp.port, *without_reg).stderr.count("(Success)") == len(without_reg)
    alone = _finished(other)
    assert storescu(other.scp.port, *mr).stderr.count("(Success)") == len(mr)
    job = _finished(other, {alone.id})
    assert job.state == FAILED and "missing required role rtstruct" in job.reason


def test_the_t1c_of_a_whole_routed_study_skips_dynamic_mip_and_reformat(  # type: ignore[no-untyped-def]
    run_node, patient, pacs, tmp_path
) -> None:
    """A scanner routes the whole study: with the 3D T1-Gd (series 3) come two 4D dynamic
    series named like a T1-Gd (series 8 and 6, acquired, latest: tried first, cannot be
    converted), a MIP of the T1-Gd (series 9: no role for its ImageType) and an MPR reformat
    (series 10: derived, after the acquisitions); its FLAIR came as a 4D series only (series
    12). The job runs on series 3 without a FLAIR and says why; the outputs reference what was
    used and nothing else."""
    pre, _ = patient
    destination, received = pacs
    t1c = sorted((pre / "003_t1c").glob("*.dcm"))
    flair = sorted((pre / "005_flair").glob("*.dcm"))
    extra = [
        *copy_series(t1c, tmp_path / "dyn", "t1_vibe_dyn_tra_post_Gd", 8,
                      ["ORIGINAL", "PRIMARY", "M", "ND"], repeats=2),
        *copy_series(t1c, tmp_path / "dyn2", "t1_vibe_dyn_tra_post_Gd", 6,
                      ["ORIGINAL", "PRIMARY", "M", "ND"], repeats=2),
        *copy_series(flair, tmp_path / "flair", "t2_tirm_tra_dark-fluid", 12,
                      ["ORIGINAL", "PRIMARY", "M", "ND"], repeats=2),
        *copy_series(t1c, tmp_path / "mip", "t1_mprage_tra_p2_iso_post_Gd_MIP_TRA", 9,
                      ["DERIVED", "PRIMARY", "MIP_TRA"]),
        *copy_series(t1c, tmp_path / "mpr", "t1_mprage_post_Gd_MPR_cor", 10,
                      ["DERIVED", "PRIMARY", "MPR", "ND"]),
    ]  # fmt: skip
    settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(destination,))
    node = run_node(settings)
    files = [p for p in sorted(pre.rglob("*.dcm")) if p.parent.name != "005_flair"]
    sent = storescu(node.scp.port, *files, *extra)
    assert sent.stderr.count("Received Store Response (Success)") == len(files) + len(extra)
    job = wait_for(
        lambda: settled_job(node),
        timeout=120,
        what="the job to finish",
    )
    assert job.state == DONE, job.reason
    by_number = {js.series.series_number: js for js in node.store.job_series(job.id)}
    assert by_number[3].role == "t1c"
    assert by_number[6].role == "" and by_number[6].note.startswith("matches t1c, not used: ")
    assert by_number[12].role == "" and by_number[12].note == "matches flair, not used"
    events = [(e.kind, e.message) for e in node.store.events(job.id)]
    assert any(k == "warning" and m.startswith("flair not used: ") for k, m in events), events
    assert by_number[8].role == "" and by_number[8].note.startswith("matches t1c, not used: ")
    assert "duplicate slice position(s)" in by_number[8].note
    assert by_number[9].role == ""
    assert by_number[9].note == (
        "matches t1c but not used: ImageType MIP_TRA (roles.exclude_image_types)"
    )
    assert by_number[10].role == "" and "series 8 (the latest) is used" in by_number[10].note
    (fallback,) = [e.message for e in node.store.events(job.id) if e.kind == "fallback"]
    assert fallback.startswith("t1c: series 8 't1_vibe_dyn_tra_post_Gd")
    assert "; series 6 't1_vibe_dyn_tra_post_Gd" in fallback and "cannot be used either" in fallback
    assert "series 3 't1_mprage_tra_p2_iso_post_Gd" in fallback
    assert fallback.endswith("the next series that matches t1c, is used instead")

    def delivered() -> int | None:
        states = node.outbox.counts().get("pacs", {})
        total, sent = sum(states.values()), states.get("sent", 0)
        return total if total and sent == total == len(list(received.iterdir())) else None

    wait_for(delivered, timeout=120, what="every result at the PACS")
    sources = {
        str(item.ReferencedSOPInstanceUID)
        for p in received.iterdir()
        for ds in [pydicom.dcmread(p, stop_before_pixels=True)]
        if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        for item in ds.SourceImageSequence
    }
    assert sources == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in t1c}
    (sr,) = [ds for p in received.iterdir() for ds in [pydicom.dcmread(p)] if ds.Modality == "SR"]
    evidence = {
        str(series.SeriesInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert by_number[3].series.series_instance_uid in evidence
    assert not evidence & {by_number[n].series.series_instance_uid for n in (6, 8, 9, 10, 12)}


def test_a_t1c_that_no_matching_series_can_give_fails_naming_each(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """When every series matching t1c is a 4D series, the job fails with each one's reason."""
    pre, _ = patient
    t1c = sorted((pre / "003_t1c").glob("*.dcm"))
    dynamic = [
        *copy_series(t1c, tmp_path / "a", "t1_vibe_dyn_tra_post_Gd", 8,
                      ["ORIGINAL", "PRIMARY", "M", "ND"], repeats=2),
        *copy_series(t1c, tmp_path / "b", "t1_vibe_dyn_tra_post_Gd", 11,
                      ["ORIGINAL", "PRIMARY", "M", "ND"], repeats=3),
    ]  # fmt: skip
    others = [p for p in sorted(pre.rglob("*.dcm")) if p.parent.name != "003_t1c"]
    node = run_node(make_settings(tmp_path / "data"))
    storescu(node.scp.port, *others, *dynamic)
    job = wait_for(
        lambda: settled_job(node),
        timeout=120,
        what="the job to finish",
    )
    assert job.state == FAILED
    assert "duplicate slice position(s)" in job.reason
    assert "the other series matching t1c cannot be used either: series 8 " in job.reason
    assert [e for e in node.store.events(job.id) if e.kind == "fallback"] == []


def _beam_export(pre, out) -> tuple[list, object]:  # type: ignore[no-untyped-def]
    """The synthetic plan dose as a planning system exporting per beam would send it: two BEAM
    doses of half the plan's each (one series), the dose uncertainty (another series) and the
    RT Plan (beams 1 and 2, and a setup field that delivers nothing)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    (plan_dose,) = sorted((pre / "RTDOSE").glob("*.dcm"))
    out.mkdir()
    beam_series = pydicom.uid.generate_uid()
    written = []
    for name, beam, dose_type in (("beam1", 1, "PHYSICAL"), ("beam2", 2, "PHYSICAL"),
                                  ("error", None, "ERROR")):  # fmt: skip
        ds = pydicom.dcmread(plan_dose)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.DoseType = dose_type
        if beam is None:
            ds.SeriesInstanceUID, ds.SeriesNumber = pydicom.uid.generate_uid(), 202
        else:
            ds.SeriesInstanceUID, ds.SeriesNumber = beam_series, 201
            ds.DoseSummationType = "BEAM"
            ds.DoseGridScaling = float(ds.DoseGridScaling) / 2
            group, ref = Dataset(), Dataset()
            group.ReferencedFractionGroupNumber = 1
            ref.ReferencedBeamNumber = beam
            group.ReferencedBeamSequence = DicomSequence([ref])
            ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence = DicomSequence([group])
        written.append(out / f"{name}.dcm")
        ds.save_as(written[-1], enforce_file_format=True)
    plan_uid = str(ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID)
    plan = pydicom.dcmread(plan_dose, stop_before_pixels=True)
    for keyword in ("DoseUnits", "DoseType", "DoseSummationType", "DoseGridScaling",
                    "ReferencedRTPlanSequence", "GridFrameOffsetVector"):  # fmt: skip
        if keyword in plan:
            delattr(plan, keyword)
    plan.SOPClassUID = plan.file_meta.MediaStorageSOPClassUID = pydicom.uid.RTPlanStorage
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = plan_uid
    plan.SeriesInstanceUID, plan.SeriesNumber = pydicom.uid.generate_uid(), 203
    plan.Modality = "RTPLAN"
    plan.RTPlanLabel, plan.RTPlanGeometry = "GBM 60/30", "PATIENT"
    group = Dataset()
    group.FractionGroupNumber, group.NumberOfFractionsPlanned = 1, 30
    group.ReferencedBeamSequence = DicomSequence()
    plan.BeamSequence = DicomSequence()
    for number, delivery, meterset in ((1, "TREATMENT", 150.0), (2, "TREATMENT", 140.0),
                                       (3, "SETUP", 0.0)):  # fmt: skip
        beam, ref = Dataset(), Dataset()
        beam.BeamNumber, beam.TreatmentDeliveryType = number, delivery
        plan.BeamSequence.append(beam)
        ref.ReferencedBeamNumber, ref.BeamMeterset = number, meterset
        group.ReferencedBeamSequence.append(ref)
    plan.FractionGroupSequence = DicomSequence([group])
    written.append(out / "plan.dcm")
    plan.save_as(written[-1], enforce_file_format=True)
    return written, plan_dose


def test_beam_doses_are_summed_into_the_plans_dose(run_node, patient, pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A planning system that exports the dose per beam, with the dose uncertainty and the
    plan: the node sums the two beams (the plan's dose, to the storage's resolution), leaves the
    uncertainty out, says so in the job and lists the beam doses among the SR's evidence."""
    from dicom_node.pipeline import assemble_inputs

    pre, _ = patient
    destination, received = pacs
    export, plan_dose = _beam_export(pre, tmp_path / "export")
    rtstruct = sorted((pre / "RTSTRUCT").glob("*.dcm"))
    t1c = sorted((pre / "003_t1c").glob("*.dcm"))
    summed = assemble_inputs(
        {"t1c": t1c, "rtstruct": rtstruct, "rtdose": export[:2]}, "(?i)^gtv", pytest.fail
    )
    plain = assemble_inputs(
        {"t1c": t1c, "rtstruct": rtstruct, "rtdose": [plan_dose]}, "(?i)^gtv", pytest.fail
    )
    assert summed.dose is not None and plain.dose is not None
    np.testing.assert_allclose(summed.dose.array, plain.dose.array, atol=2e-3)
    assert float(plain.dose.array.max()) > 50.0

    settings = dataclasses.replace(make_settings(tmp_path / "data"), destinations=(destination,))
    node = run_node(settings)
    files = [p for p in sorted(pre.rglob("*.dcm")) if p.parent.name != "RTDOSE"]
    storescu(node.scp.port, *files, *export)
    job = wait_for(
        lambda: settled_job(node),
        timeout=120,
        what="the job to finish",
    )
    assert job.state == DONE, job.reason
    (event,) = [e.message for e in node.store.events(job.id) if e.kind == "dose"]
    assert event.startswith(
        "RT Dose: the doses of 2 beam(s) are summed (every beam of the RT Plan) ("
    ), event
    assert "(PLAN, ERROR): a dose uncertainty, not a dose" in event
    roles = {js.series.series_number: (js.role, js.note) for js in node.store.job_series(job.id)}
    assert roles[201][0] == "rtdose" and roles[202][0] == "" and roles[203][0] == "rtplan"

    def delivered() -> int | None:
        states = node.outbox.counts().get("pacs", {})
        total, sent = sum(states.values()), states.get("sent", 0)
        return total if total and sent == total == len(list(received.iterdir())) else None

    wait_for(delivered, timeout=120, what="every result at the PACS")
    (sr,) = [
        ds for p in received.iterdir()
        for ds in [pydicom.dcmread(p)] if ds.Modality == "SR"
    ]  # fmt: skip
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.stem for p in export}
    assert {name for uid, name in uids.items() if uid in evidence} == {"beam1", "beam2"}


def _with_another_structure_set(run_node, patient, tmp_path, number, edit):  # type: ignore[no-untyped-def]
    """The patient's study with a copy of its plan's structure set as series ``number``,
    changed by ``edit``, sent to a node; returns the node, the finished job and its series
    roles and notes by series number."""
    pre, _ = patient
    (plan_set,) = sorted((pre / "RTSTRUCT").glob("*.dcm"))
    ds = pydicom.dcmread(plan_set)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID, ds.SeriesNumber = pydicom.uid.generate_uid(), number
    edit(ds)
    other = tmp_path / f"structure-set-{number}.dcm"
    ds.save_as(other, enforce_file_format=True)
    node = run_node(make_settings(tmp_path / "data"))
    storescu(node.scp.port, *sorted(pre.rglob("*.dcm")), other)
    job = wait_for(
        lambda: settled_job(node),
        timeout=120,
        what="the job to finish",
    )
    roles = {js.series.series_number: (js.role, js.note) for js in node.store.job_series(job.id)}
    return node, job, roles


def test_a_structure_set_of_organs_at_risk_beside_the_plans(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A later structure set with organs at risk only (series 160) comes with the plan's (150):
    the GTV is read from the plan's, and the job says why the other was passed over."""

    def organs_at_risk(ds):  # type: ignore[no-untyped-def]
        for n, roi in enumerate(ds.StructureSetROISequence):
            roi.ROIName = f"OAR_{n + 1}"

    node, job, roles = _with_another_structure_set(run_node, patient, tmp_path, 160, organs_at_risk)
    assert job.state == DONE, job.reason
    assert roles[150][0] == "rtstruct"
    assert roles[160] == ("", "matches rtstruct, not used (see the rtstruct event)")
    (event,) = [e.message for e in node.store.events(job.id) if e.kind == "rtstruct"]
    assert event.startswith("RT structure set: ") and "no contoured ROI matches" in event


def test_a_later_structure_set_on_the_planning_ct_without_its_registration(  # type: ignore[no-untyped-def]
    run_node, patient, tmp_path
) -> None:
    """A later, approved structure set (series 151) is on the planning CT's frame and came
    without the registration: the GTV is read from the set on the MR (150), and the job says
    why the later one was passed over; before, the later one was read and the job failed."""
    ct_frame = pydicom.uid.generate_uid()

    def on_the_planning_ct(ds):  # type: ignore[no-untyped-def]
        ds.ApprovalStatus, ds.StructureSetDate = "APPROVED", "29991231"
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = ct_frame
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = ct_frame

    node, job, roles = _with_another_structure_set(
        run_node, patient, tmp_path, 151, on_the_planning_ct
    )
    assert job.state == DONE, job.reason
    assert roles[150][0] == "rtstruct" and roles[151][0] == ""
    (event,) = [e.message for e in node.store.events(job.id) if e.kind == "rtstruct"]
    assert f"its GTV is on frame of reference {ct_frame}, which is not the T1-Gd's" in event


def test_a_multifocal_tumour_with_roi_union(run_node, patient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The plan's structure set holds two GTVs, 'GTV_1' and 'GTV_2' (a second lesion 40 mm
    away), both typed GTV: refused by default with a reason that names the setting; with
    roles.roi_union the tumour is their union, twice the volume of one."""
    import copy

    pre, truth = patient
    (plan_set,) = sorted((pre / "RTSTRUCT").glob("*.dcm"))
    ds = pydicom.dcmread(plan_set)
    names = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    (gtv_number,) = [n for n, r in names.items() if r.ROIName == "GTV"]
    new_number = max(names) + 1
    names[gtv_number].ROIName = "GTV_1"
    second = copy.deepcopy(names[gtv_number])
    second.ROINumber, second.ROIName = new_number, "GTV_2"
    ds.StructureSetROISequence.append(second)
    (contours,) = [c for c in ds.ROIContourSequence if int(c.ReferencedROINumber) == gtv_number]
    moved = copy.deepcopy(contours)
    moved.ReferencedROINumber = new_number
    for c in moved.ContourSequence:
        points = np.asarray(c.ContourData, float).reshape(-1, 3)
        points[:, 1] += 40.0  # 40 mm posterior
        c.ContourData = [f"{v:.3f}" for v in points.ravel()]
    ds.ROIContourSequence.append(moved)
    for obs in ds.get("RTROIObservationsSequence", []):
        if int(obs.ReferencedROINumber) == gtv_number:
            extra = copy.deepcopy(obs)
            extra.ReferencedROINumber = new_number
            extra.ObservationNumber = new_number
            ds.RTROIObservationsSequence.append(extra)
    study = tmp_path / "study"
    shutil.copytree(pre, study)
    ds.save_as(study / plan_set.relative_to(pre), enforce_file_format=True)
    files = sorted(study.rglob("*.dcm"))

    def run(data: str, roi_union: bool):  # type: ignore[no-untyped-def]
        node = run_node(make_settings(tmp_path / data, roles={"roi_union": roi_union}))
        storescu(node.scp.port, *files)
        return wait_for(
            lambda: settled_job(node),
            timeout=120,
            what="the job to finish",
        )

    refused = run("data-default", False)
    assert refused.state == FAILED
    assert "'GTV_1' (GTV), 'GTV_2' (GTV)" in refused.reason
    assert "set roles.roi_union: true" in refused.reason
    union = run("data-union", True)
    assert union.state == DONE, union.reason
    now = float(union.reason.split("(now ")[1].split(" ml")[0])
    assert 1.6 * truth["gtv_ml"] < now < 2.2 * truth["gtv_ml"], (now, truth["gtv_ml"])


def _blank_copy(files: list[Path], out: Path, description: str, number: int) -> list[Path]:
    """``files`` as another series whose every pixel is 0 (a failed export, a placeholder)."""
    blank = copy_series(files, out, description, number, ["ORIGINAL", "PRIMARY", "M", "ND"])
    for path in blank:
        ds = pydicom.dcmread(path)
        ds.PixelData = bytes(len(ds.PixelData))
        ds.save_as(path, enforce_file_format=True)
    return blank


def test_a_blank_series_is_passed_over_like_one_that_cannot_be_converted(  # type: ignore[no-untyped-def]
    patient, tmp_path
) -> None:
    """A T1-Gd series of one value throughout used to be predicted from (the 'no change'
    baseline wrote it back as the prediction): it is refused as a series that cannot be
    converted is, so the next series of the role is used; a blank FLAIR is left out."""
    from dicom_node.errors import InputError
    from dicom_node.pipeline import SeriesFiles, assemble_inputs

    pre, _ = patient
    t1c = sorted((pre / "003_t1c").glob("*.dcm"))
    rtstruct = sorted((pre / "RTSTRUCT").glob("*.dcm"))
    blank = _blank_copy(t1c, tmp_path / "blank", "t1_mprage_post_Gd", 8)
    files = {"t1c": blank, "rtstruct": rtstruct}
    with pytest.raises(InputError, match=r"expected an image with contrast, found a blank t1c"):
        assemble_inputs(files, "(?i)^gtv", pytest.fail)
    told: list[tuple[str, str, str]] = []
    good = SeriesFiles("2.25.3", "series 3 'T1 MPRAGE +C'", tuple(t1c))
    inputs = assemble_inputs(
        files, "(?i)^gtv", pytest.fail, fallbacks={"t1c": [good]},
        on_fallback=lambda role, used, why, _: told.append((role, used.label, why)),
    )  # fmt: skip
    assert told == [("t1c", good.label, told[0][2])] and "found a blank t1c" in told[0][2]
    assert float(np.ptp(inputs.t1c.array)) > 0
    flair = _blank_copy(sorted((pre / "005_flair").glob("*.dcm")), tmp_path / "f", "FLAIR", 9)
    warned: list[str] = []
    inputs = assemble_inputs({**files, "t1c": t1c, "flair": flair}, "(?i)^gtv", warned.append)
    assert inputs.flair is None
    assert [w for w in warned if w.startswith("flair not used: ")], warned
    assert "found a blank flair" in warned[0]
