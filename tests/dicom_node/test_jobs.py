"""Job store, study assembly (quiet period, late instances, versions) and reconciliation."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pydicom

from dicom_node.assembler import Assembler
from dicom_node.instance import InstanceInfo
from dicom_node.jobs import FAILED, QUEUED, SUPERSEDED, JobStore
from dicom_node.service import reconcile
from dicom_node.spool import Spool
from sr_writer.labels import series_description
from tests import factories
from tests.dicom_node.conftest import make_settings

SECRET = b"k" * 32


def _info(path: Path) -> InstanceInfo:
    ds = pydicom.dcmread(path)
    return InstanceInfo.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID), SECRET)


def _receive(spool: Spool, store: JobStore, paths: list[Path], at: float) -> None:
    for path in paths:
        info = _info(path)
        stored = spool.store(
            info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid,
            path.read_bytes(),
        )  # fmt: skip
        store.record_instance(info, stored.relative, "TEST", at)


def test_quiet_period_then_job_then_late_instance_makes_version_2(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 30})
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    assembler = Assembler(store, settings)
    t0 = 1_000_000.0
    _receive(spool, store, study["t1c"][:-1] + study["flair"] + study["rtstruct"], t0)
    assert assembler.run_once(now=t0 + 29) == []  # still inside the quiet period
    (job1,) = assembler.run_once(now=t0 + 31)
    assert store.get_job(job1).state == QUEUED  # type: ignore[union-attr]
    assert assembler.run_once(now=t0 + 100) == []  # nothing new: no second job
    # a late instance reopens the study
    _receive(spool, store, study["t1c"][-1:], t0 + 200)
    assert assembler.run_once(now=t0 + 210) == []
    (job2,) = assembler.run_once(now=t0 + 231)
    first, second = store.get_job(job1), store.get_job(job2)
    assert first is not None and second is not None
    assert first.state == SUPERSEDED and second.version == 2
    assert second.instance_count == first.instance_count + 1
    assert any("superseded by job" in e.message for e in store.events(job1))
    # a re-sent duplicate does not reopen the study
    _receive(spool, store, study["flair"], t0 + 300)
    assert assembler.run_once(now=t0 + 1000) == []
    # nor does the node's own result forwarded back by the PACS (it is stored all the same)
    ours = study["flair"][0]
    ds = pydicom.dcmread(ours)
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SeriesDescription = series_description("derived MR")
    ds.save_as(tmp_path / "ours.dcm")
    _receive(spool, store, [tmp_path / "ours.dcm"], t0 + 1100)
    assert store.counts()["instances"] == second.instance_count + 1
    assert assembler.run_once(now=t0 + 2000) == []


def test_missing_required_role_fails_the_job_and_retry_uses_new_rules(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 0})
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    _receive(spool, store, study["flair"] + study["rtstruct"], time.time())
    (job_id,) = Assembler(store, settings).run_once()
    job = store.get_job(job_id)
    assert job is not None and job.state == FAILED
    assert job.reason.startswith("missing required role t1c")
    # the site relaxes its rules and retries
    relaxed = dataclasses.replace(
        settings, roles=dataclasses.replace(settings.roles, required=("flair", "rtstruct"))
    )
    assert Assembler(store, relaxed).retry(job_id) == QUEUED
    assert [e.kind for e in store.events(job_id)][-1] == "retry"


def test_reconcile_after_crash(tmp_path: Path) -> None:
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    _receive(spool, store, study["t1c"][:2], time.time())
    # killed after the rename but before the database insert:
    info = _info(study["t1c"][2])
    spool.store(
        info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid,
        study["t1c"][2].read_bytes(),
    )  # fmt: skip
    # killed while writing (never acknowledged):
    stored = spool.relative_path(
        info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid
    )
    series_dir = (spool.root / stored).parent
    (series_dir / ".dead.part").write_bytes(b"partial")
    # a file removed by hand behind the node's back:
    gone = _info(study["t1c"][0])
    rel = spool.relative_path(
        gone.study_instance_uid, gone.series_instance_uid, gone.sop_instance_uid
    )
    (spool.root / rel).unlink()
    summary = reconcile(spool, store, SECRET)
    assert summary == {"removed_partial": 1, "recovered": 1, "missing": 1}
    assert store.counts()["instances"] == 2
    assert reconcile(spool, store, SECRET) == {"removed_partial": 0, "recovered": 0, "missing": 0}


def test_a_job_run_again_does_not_repeat_what_it_found(tmp_path: Path) -> None:
    """The pipeline's choices and warnings are recorded once per job, however many times its
    process is run (a job whose process died is run again); other events are not merged."""
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 30})
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    _receive(spool, store, study["t1c"] + study["rtstruct"], 1_000_000.0)
    (job,) = Assembler(store, settings).run_once(now=1_000_100.0)
    (t1c,) = [js for js in store.job_series(job) if js.role == "t1c"]
    uid = t1c.series.series_instance_uid
    for _attempt in range(2):
        store.update_series(job, [(uid, "t1c", "used")], "rtstruct", "RT structure set: a is used")
        store.add_event(job, "warning", "flair: cannot be used (...)", once=True)
        store.add_event(job, "running", "started")
    kinds = [e.kind for e in store.events(job)]
    assert kinds.count("rtstruct") == 1 and kinds.count("warning") == 1
    assert kinds.count("running") == 2
