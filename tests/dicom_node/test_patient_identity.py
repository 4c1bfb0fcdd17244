"""A study whose instances name more than one patient gets no prediction, and a corrected copy
of an instance (the same SOP Instance UID under the right patient, as a PACS re-sends after a
patient information reconciliation) replaces the one the node holds and the study is predicted
again. A real node on a localhost port, dcmtk storescu as the sender, a synthetic patient."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pydicom
import pytest

from dicom_node.jobs import DONE, FAILED
from inference.synthetic.cohort import generate_patient
from sr_writer.labels import series_description
from tests.conftest import wait_for
from tests.dicom_node.conftest import (
    all_sent,
    finished_job,
    make_settings,
    storescp_destination,
)
from tests.dicom_node.test_scp import storescu

WRONG = "GF-OTHER-4711"  # the patient a series was wrongly filed under


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, list[Path]]:  # type: ignore[no-untyped-def]
    """A synthetic patient's study (4 mm): its files by series folder (003_t1c, RTSTRUCT...)."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_patient(0, 5, out, spacing_mm=4.0, formats=("dicom",))
    (pre,) = out.glob("*/dicom/pre")
    return {d.name: sorted(d.glob("*.dcm")) for d in sorted(pre.iterdir())}


def _refile(files: list[Path], out: Path, patient_id: str, issuer: str | None = None) -> list[Path]:
    """Copies of ``files`` under another Patient ID (the same UIDs)."""
    out.mkdir(parents=True)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID = patient_id
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
        ds.save_as(out / f.name)
    return [out / f.name for f in files]


def _uids(files: list[Path]) -> tuple[str, str]:
    """(Study Instance UID, Patient ID) of the first file."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.PatientID)


def test_two_patients_fail_and_a_corrected_copy_is_predicted(  # type: ignore[no-untyped-def]
    run_node, study, tmp_path, caplog
) -> None:
    study_uid, right = _uids(study["003_t1c"])
    others = [f for name, files in study.items() if name != "005_flair" for f in files]
    misfiled = _refile(study["005_flair"], tmp_path / "misfiled", WRONG)
    node = run_node()
    assert storescu(node.scp.port, *others, *misfiled).returncode == 0
    job = wait_for(lambda: finished_job(node, study_uid, 1), timeout=60, what="the job")
    assert job.state == FAILED
    assert job.reason.startswith(
        "the study's instances name 2 different patients (their Patient ID or Issuer of Patient "
        "ID differ): series 5 't2_tirm_tra_dark-fluid | t2_tirm_tra_dark-fluid | *tir2d1_16' "
        "(MR Image Storage, 44 instances) names another patient than the other 5 series; no "
        "prediction is made from the images of more than one patient. Correct the patient of "
        "the misfiled series"
    ), job.reason
    # the series are named, the patients never (the reason reaches the logs)
    assert WRONG not in job.reason and right not in job.reason

    # the PACS re-sends the series under the right patient: same UIDs, corrected header
    corrected = _refile(study["005_flair"], tmp_path / "corrected", right)
    assert storescu(node.scp.port, *corrected).returncode == 0
    job = wait_for(lambda: finished_job(node, study_uid, 2), timeout=120, what="version 2")
    assert job.state == DONE, job.reason
    stored = [pydicom.dcmread(p, stop_before_pixels=True) for p in node.spool.root.rglob("*.dcm")]
    assert len(stored) == sum(len(files) for files in study.values())
    assert {str(ds.PatientID) for ds in stored} == {right}
    logged = " ".join(r.getMessage() for r in caplog.records)
    # said once for the association, then counted (one line per instance before)
    assert logged.count("re-sent by SCANNER1 under another patient identity (a corrected") == 1
    n = len(corrected)
    assert f"{n} instance(s) of study {study_uid} re-sent by SCANNER1 under another" in logged
    assert WRONG not in logged
    # the same copy once more, and the rest of the study, are duplicates: no new version
    assert storescu(node.scp.port, *corrected, *study["003_t1c"]).returncode == 0
    assert [j.version for j in node.store.list_jobs()] == [2, 1]


def test_a_series_moved_to_the_patients_own_study(run_node, study, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A corrected copy filed under another study: it leaves the study it was in (its file
    too), which is assembled again without it."""
    study_uid, _ = _uids(study["003_t1c"])
    others = [f for name, files in study.items() if name != "004_t2" for f in files]
    misfiled = _refile(study["004_t2"], tmp_path / "misfiled", WRONG)
    node = run_node()
    assert storescu(node.scp.port, *others, *misfiled).returncode == 0
    assert wait_for(lambda: finished_job(node, study_uid, 1), timeout=60).state == FAILED
    # the PACS files the T2 in the other patient's own study, the UIDs of its instances kept
    own_study = pydicom.uid.generate_uid()
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in misfiled:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = own_study
        ds.save_as(moved / f.name)
    wrong_key = node.store.stored_instance(str(pydicom.dcmread(misfiled[0]).SOPInstanceUID))
    assert wrong_key is not None
    refiled = _refile(sorted(moved.glob("*.dcm")), tmp_path / "refiled", WRONG + "-B")
    assert storescu(node.scp.port, *refiled).returncode == 0
    job = wait_for(lambda: finished_job(node, study_uid, 2), timeout=120, what="version 2")
    assert job.state == DONE, job.reason
    series = {js.series.series_description for js in node.store.job_series(job.id)}
    assert "t2_tse_tra_p2" not in series and "t2_tirm_tra_dark-fluid" in series
    # one file per instance: the moved ones in their new study's folder only
    files = list(node.spool.root.rglob("*.dcm"))
    assert len(files) == sum(len(f) for f in study.values())
    assert sum(own_study in str(p) for p in files) == len(refiled)


def test_the_issuer_of_patient_id_tells_patients_apart(run_node, study, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same Patient ID from two issuers (two hospitals of a group) is two patients."""
    study_uid, right = _uids(study["003_t1c"])
    flair = _refile(study["005_flair"], tmp_path / "b", right, issuer="HOSPITAL-B")
    others = [f for name, files in study.items() if name != "005_flair" for f in files]
    node = run_node()
    assert storescu(node.scp.port, *others, *flair).returncode == 0
    job = wait_for(lambda: finished_job(node, study_uid, 1), timeout=60, what="the job")
    assert job.state == FAILED and "name 2 different patients" in job.reason, job.reason


def test_the_nodes_own_results_routed_back_name_no_other_patient(  # type: ignore[no-untyped-def]
    run_node, study, tmp_path
) -> None:
    """A PACS forwards the whole study, the node's results with it. Results that an earlier
    version of the node sent without the Issuer of Patient ID (or with any other identity) are
    no input: the study assembled again with a late series is predicted, not failed as two
    patients' (which also took back the good results)."""
    study_uid, right = _uids(study["003_t1c"])
    issued = {
        name: _refile(files, tmp_path / name, right, issuer="HOSP_A")
        for name, files in study.items()
    }
    first = [f for name, files in issued.items() if name != "004_t2" for f in files]
    node = run_node()
    assert storescu(node.scp.port, *first).returncode == 0
    assert wait_for(lambda: finished_job(node, study_uid, 1), timeout=60).state == DONE
    # a result as an earlier version of the node sent it: labelled, no issuer
    routed_back = tmp_path / "routed"
    routed_back.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for n, f in enumerate(study["005_flair"][:3]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.SeriesDescription, ds.SeriesNumber = series_description("SEG"), 9004
        ds.save_as(routed_back / f"{n}.dcm")
    late = [*sorted(routed_back.glob("*.dcm")), *issued["004_t2"]]
    assert storescu(node.scp.port, *late).returncode == 0
    job = wait_for(lambda: finished_job(node, study_uid, 2), timeout=120, what="version 2")
    assert job.state == DONE, job.reason


def test_a_study_sent_again_under_a_corrected_patient_gets_its_results_again(  # type: ignore[no-untyped-def]
    run_node, study, tmp_path
) -> None:
    """A patient information reconciliation upstream of the node (an emergency patient's
    temporary ID replaced, the instance UIDs kept): the node predicted the study again under
    the right patient, but its results had the UIDs of those already delivered, and the
    outbox sent nothing: the PACS had results only under the temporary ID."""
    study_uid, right = _uids(study["003_t1c"])
    temporary = {
        name: _refile(files, tmp_path / name, "EMERG-0001") for name, files in study.items()
    }
    proc, destination = storescp_destination(tmp_path / "pacs", "pacs", "PACS")
    try:
        settings = make_settings(tmp_path / "data")
        node = run_node(dataclasses.replace(settings, destinations=(destination,)))
        assert (
            storescu(node.scp.port, *[f for files in temporary.values() for f in files]).returncode
            == 0
        )
        assert wait_for(lambda: finished_job(node, study_uid, 1), timeout=120).state == DONE
        first = all_sent(node, "pacs", timeout=120)
        assert (
            storescu(node.scp.port, *[f for files in study.values() for f in files]).returncode == 0
        )
        job = wait_for(lambda: finished_job(node, study_uid, 2), timeout=120, what="version 2")
        assert job.state == DONE, job.reason
        assert all_sent(node, "pacs", timeout=120) == 2 * first
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "pacs").iterdir()]
    by_patient = collections.Counter(str(ds.PatientID) for ds in received)
    assert by_patient == {"EMERG-0001": first, right: first}
