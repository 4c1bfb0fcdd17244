"""Job store, study assembly (quiet period, late instances, versions) and reconciliation."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

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


def test_duplicates_of_a_study_still_arriving_hold_its_quiet_period(tmp_path: Path) -> None:
    """A sender whose transfer was cut off sends the study again from the start: the instances
    the node holds come first, as duplicates. They did not count as activity, so a study of
    more instances than a quiet period's worth was assembled half-sent (a failed job, a
    failure notice to the PACS) while its sender was still sending."""
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 30})
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    assembler = Assembler(store, settings)
    t0 = 1_000_000.0
    _receive(spool, store, study["t1c"], t0)  # then the transfer is cut off
    _receive(spool, store, study["t1c"], t0 + 25)  # sent again from the start
    assert assembler.run_once(now=t0 + 40) == []  # 15 s after the last duplicate
    _receive(spool, store, study["flair"] + study["rtstruct"], t0 + 50)
    (job,) = assembler.run_once(now=t0 + 81)
    assert store.get_job(job).instance_count == sum(map(len, study.values()))  # type: ignore[union-attr]


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
    # retention committed the removal of an instance, and was killed before deleting its file
    # (recorded again, it brought the study back and ran it again)
    pruned = _info(study["t1c"][1])
    pruned_rel = spool.relative_path(
        pruned.study_instance_uid, pruned.series_instance_uid, pruned.sop_instance_uid
    )
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("UPDATE instances SET removed_at = 1 WHERE path = ?", (pruned_rel,))
    # a second copy of an instance held, under another study (an orphan an earlier version
    # left: recorded as "recovered" at every start, and never recorded)
    other_study = spool.store("1.2.826.0.1.3680043.8.498.7", info.series_instance_uid,
                              info.sop_instance_uid, study["t1c"][2].read_bytes())  # fmt: skip
    held_at = (spool.root / stored).stat().st_mtime
    os.utime(spool.root / other_study.relative, (held_at + 10, held_at + 10))  # came later
    summary = reconcile(spool, store, SECRET)
    assert summary == {
        "removed_partial": 1, "recovered": 1, "missing": 1, "removed_by_retention": 1,
        "duplicates_removed": 1,
    }  # fmt: skip
    assert not (spool.root / pruned_rel).exists()
    assert not (spool.root / other_study.relative).exists()
    assert store.counts()["instances"] == 1
    assert reconcile(spool, store, SECRET) == {
        "removed_partial": 0, "recovered": 0, "missing": 0, "removed_by_retention": 0,
        "duplicates_removed": 0,
    }  # fmt: skip

    assert (spool.root / stored).exists()


@pytest.mark.parametrize("first", ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.9"])
def test_of_two_unrecorded_copies_of_an_instance_the_first_received_is_kept(
    tmp_path: Path, first: str
) -> None:
    """Which copy survives depends on when each arrived, not on how the study UIDs sort."""
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    info = _info(study["t1c"][0])
    data = study["t1c"][0].read_bytes()
    later = next(u for u in ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.9")
                 if u != first)  # fmt: skip
    kept = spool.store(first, info.series_instance_uid, info.sop_instance_uid, data).relative
    dropped = spool.store(later, info.series_instance_uid, info.sop_instance_uid, data).relative
    os.utime(spool.root / kept, (1_000_000, 1_000_000))
    os.utime(spool.root / dropped, (1_000_060, 1_000_060))
    summary = reconcile(spool, store, SECRET)
    assert (summary["recovered"], summary["duplicates_removed"]) == (1, 1)
    assert (spool.root / kept).exists() and not (spool.root / dropped).exists()
    assert store.stored_instance(info.sop_instance_uid)[1] == kept  # type: ignore[index]


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


def _secondary_capture_in(series_file: Path, out: Path) -> Path:
    """A Secondary Capture in the same series as ``series_file`` (a screen save a console put
    among the MR images)."""
    ds = pydicom.dcmread(series_file)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(out)
    return out


def test_a_series_with_two_sop_classes_becomes_a_job_without_the_odd_ones(tmp_path: Path) -> None:
    """A series holding MR images and a Secondary Capture made two role decisions for one
    series: the job could not be written, and the assembly pass failed on it every time, for
    every study after it too. The series is taken as its most frequent class; the job says
    what it left out."""
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 0})
    mixed = factories.small_study(tmp_path / "mixed")
    other = factories.small_study(tmp_path / "other")
    screen = _secondary_capture_in(mixed["t1c"][0], tmp_path / "sc.dcm")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    _receive(spool, store, [*mixed["t1c"], screen, *mixed["flair"], *mixed["rtstruct"]], 1.0)
    _receive(spool, store, [*other["t1c"], *other["flair"], *other["rtstruct"]], 1.0)
    jobs = Assembler(store, settings).run_once(now=100.0)
    assert len(jobs) == 2
    by_study = {j.study_instance_uid: j for j in (store.get_job(i) for i in jobs) if j}
    study_uid = _info(screen).study_instance_uid
    job = by_study[study_uid]
    assert job.state == QUEUED, job.reason
    assert job.instance_count == len(mixed["t1c"]) + len(mixed["flair"]) + 1
    roles = {js.role: js.series for js in store.job_series(job.id) if js.role}
    assert roles["t1c"].sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    assert roles["t1c"].instance_count == len(mixed["t1c"])
    used = {uid for members in store.job_instances(job.id).values() for uid, _ in members}
    assert _info(screen).sop_instance_uid not in used
    (note,) = [e.message for e in store.events(job.id) if e.kind == "not used"]
    assert f"its {len(mixed['t1c'])} MR Image Storage are used, not its 1 Secondary Capture " \
        "Image Storage" in note, note  # fmt: skip


def test_a_study_the_database_refuses_does_not_hold_up_the_others(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The job database refuses one study's job (a trigger: a real refusal of SQLite's): the
    other studies still become jobs, the refused one is logged once however many passes fail,
    counted, and made a job once the database takes it."""
    import logging
    import sqlite3

    caplog.set_level(logging.INFO, logger="dicom_node.assembler")
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 0})
    first, second = (factories.small_study(tmp_path / n) for n in ("first", "second"))
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    _receive(spool, store, [p for paths in first.values() for p in paths], 1.0)
    refused = _info(first["t1c"][0]).study_instance_uid
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "CREATE TRIGGER no_job BEFORE INSERT ON jobs WHEN NEW.study_instance_uid = "
            f"'{refused}' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    assembler = Assembler(store, settings)
    assert assembler.run_once(now=100.0) == []
    _receive(spool, store, [p for paths in second.values() for p in paths], 101.0)
    for now in (200.0, 300.0, 400.0):
        made = assembler.run_once(now=now)
        if now == 200.0:
            assert len(made) == 1  # the second study, after the refused one
    assert assembler.failing == {refused: 4}
    said = [r.getMessage() for r in caplog.records if "could not be made a job" in r.getMessage()]
    assert len(said) == 1 and refused in said[0] and "refused by the test" in said[0], said
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("DROP TRIGGER no_job")
    (job_id,) = assembler.run_once(now=500.0)
    assert store.get_job(job_id).study_instance_uid == refused  # type: ignore[union-attr]
    assert assembler.failing == {}
    assert f"study {refused} made a job after 4 failed passes" in caplog.text


def test_a_step_of_the_main_loop_that_fails_is_logged_once_and_spares_the_others(  # type: ignore[no-untyped-def]
    run_node, caplog
) -> None:
    """Each step of the main loop (assembly, notices, the refusals' report) runs on its own:
    one that fails is logged with its traceback once while it fails the same way, and the
    others run at each pass all the same."""
    import logging

    caplog.set_level(logging.INFO, logger="dicom_node.service")
    node = run_node()
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise OSError(5, "Input/output error")

    for _ in range(3):
        assert node._guarded("a step", broken) is None
        assert node._guarded("another step", lambda: calls.append("other") or 7) == 7
    assert calls == ["broken", "other"] * 3
    failed = [
        r for r in caplog.records if r.getMessage() == "a step failed; tried again at each pass"
    ]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert node._guarded("a step", lambda: None) is None
    assert "a step works again" in caplog.text
