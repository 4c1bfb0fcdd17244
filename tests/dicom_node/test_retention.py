"""Spool retention: a study's files go once nothing more is to be done with them, never
before, and the study can always be sent again."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicom_node.assembler import Assembler
from dicom_node.cli import main
from dicom_node.jobs import DONE, FAILED, QUEUED, RUNNING, JobStore
from dicom_node.outbox import Outbox
from dicom_node.retention import DAY_S, forget, prune
from dicom_node.settings import RetentionSettings
from dicom_node.spool import Spool
from tests import factories
from tests.conftest import wait_for
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_health import get
from tests.dicom_node.test_jobs import _info, _receive
from tests.dicom_node.test_scp import storescu

KEEP = RetentionSettings(done_days=7, failed_days=30)


@dataclass
class Site:
    """A spool, job store, outbox and assembler (30 s quiet period) in one folder."""

    spool: Spool
    store: JobStore
    outbox: Outbox
    assembler: Assembler


@pytest.fixture
def site(tmp_path: Path) -> Site:
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 30})
    store = JobStore(tmp_path / "jobs.sqlite3")
    return Site(
        Spool(tmp_path / "spool"), store, Outbox(tmp_path / "outbox.sqlite3"),
        Assembler(store, settings),
    )  # fmt: skip


def _files(spool: Spool) -> list[Path]:
    """The spool's instance files. os.walk, unlike Path.rglob, skips a folder that a running
    node's retention removes while it is being listed."""
    return sorted(
        Path(folder) / name
        for folder, _, names in os.walk(spool.root)
        for name in names
        if name.endswith(".dcm")
    )


def test_a_failed_study_waits_for_its_structure_set_then_goes(site: Site, tmp_path: Path) -> None:
    spool, store, outbox, assembler = site.spool, site.store, site.outbox, site.assembler
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    images = study["t1c"] + study["flair"]
    _receive(spool, store, images, t0)  # the MR, no structure set yet
    (job1,) = assembler.run_once(now=t0 + 60)
    assert store.get_job(job1).state == FAILED  # type: ignore[union-attr]

    # within failed_days nothing goes; a dry run names the study and removes nothing
    assert prune(store, spool.root, outbox, KEEP, now=t0 + 29 * DAY_S) == []
    (would,) = prune(store, spool.root, outbox, KEEP, now=t0 + 31 * DAY_S, dry_run=True)
    assert (would.job_id, would.state, would.files) == (job1, FAILED, len(images))
    assert len(_files(spool)) == len(images)

    (removed,) = prune(store, spool.root, outbox, KEEP, now=t0 + 31 * DAY_S)
    assert removed.files == len(images) and removed.bytes > 0
    assert _files(spool) == [] and list(spool.root.iterdir()) == []  # folders too
    counts = store.counts()
    assert (counts["instances"], counts["instances_removed"]) == (0, len(images))
    # the job's history stays: its series and roles, and an event saying what happened
    assert len(store.job_series(job1)) == 2
    assert any(e.kind == "retention" for e in store.events(job1))
    assert prune(store, spool.root, outbox, KEEP, now=t0 + 90 * DAY_S) == []  # once only
    with pytest.raises(ValueError, match="no longer in the spool"):
        assembler.retry(job1)

    # the structure set alone, after the images went: the reason says what to do
    _receive(spool, store, study["rtstruct"], t0 + 40 * DAY_S)
    (job2,) = assembler.run_once(now=t0 + 40 * DAY_S + 60)
    second = store.get_job(job2)
    assert second is not None and second.state == FAILED
    assert "removed from the spool by retention on" in second.reason
    assert "send the whole study again" in second.reason

    # the whole study sent again: stored anew, one job with every instance
    _receive(spool, store, images + study["rtstruct"], t0 + 41 * DAY_S)
    (job3,) = assembler.run_once(now=t0 + 41 * DAY_S + 60)
    third = store.get_job(job3)
    assert third is not None and third.state == QUEUED
    assert third.instance_count == len(images) + 1
    assert len(_files(spool)) == len(images) + 1
    assert sum(len(v) for v in store.job_instances(job3).values()) == len(images) + 1


def test_a_done_study_goes_only_once_its_results_are_delivered(site: Site, tmp_path: Path) -> None:
    spool, store, outbox, assembler = site.spool, site.store, site.outbox, site.assembler
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    paths = study["t1c"] + study["flair"] + study["rtstruct"]
    _receive(spool, store, paths, t0)
    (job,) = assembler.run_once(now=t0 + 60)
    # a queued (or running) job is never touched, however old
    assert prune(store, spool.root, outbox, KEEP, now=t0 + 365 * DAY_S) == []
    store.set_state(job, DONE)
    result = pydicom.dcmread(study["t1c"][0])
    result.SOPInstanceUID = pydicom.uid.generate_uid()
    outbox.enqueue([result], ["pacs"], job=str(job))
    # a result still pending, then dead at its destination, keeps the study
    assert prune(store, spool.root, outbox, KEEP, now=t0 + 8 * DAY_S) == []
    (item,) = outbox.claim("pacs")
    outbox.mark_failed(item, "refused", permanent=True)
    assert prune(store, spool.root, outbox, KEEP, now=t0 + 8 * DAY_S) == []
    outbox.retry(destination="pacs")
    (item,) = outbox.claim("pacs")
    outbox.mark_sent(item)
    assert prune(store, spool.root, outbox, KEEP, now=t0 + 6 * DAY_S) == []  # within done_days
    (removed,) = prune(store, spool.root, outbox, KEEP, now=t0 + 8 * DAY_S)
    assert (removed.job_id, removed.state, removed.files) == (job, DONE, len(paths))
    assert _files(spool) == []
    # 0 keeps for ever
    never = RetentionSettings(done_days=0, failed_days=0)
    study2 = factories.small_study(tmp_path / "in2")
    _receive(spool, store, study2["t1c"], t0)
    assembler.run_once(now=t0 + 60)
    assert prune(store, spool.root, outbox, never, now=t0 + 3650 * DAY_S) == []


def test_a_study_that_changed_since_it_was_read_is_left(site: Site, tmp_path: Path) -> None:
    """A new instance between the listing and the removal keeps the study (and its file)."""
    spool, store = site.spool, site.store
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    _receive(spool, store, study["t1c"], t0)
    site.assembler.run_once(now=t0 + 60)
    (candidate,) = store.retention_candidates()
    _receive(spool, store, study["rtstruct"], t0 + 31 * DAY_S)  # arrives meanwhile
    assert store.remove_study_instances(candidate, t0 + 31 * DAY_S, "test") == []
    assert len(_files(spool)) == len(study["t1c"]) + 1


def _deliver(outbox: Outbox, study: list[Path], job: int, state: str = "sent") -> None:
    """One result of ``job`` (a copy of the study's first image) queued for "pacs" and sent,
    or left ``pending`` or ``dead``."""
    result = pydicom.dcmread(study[0])
    result.SOPInstanceUID = pydicom.uid.generate_uid()
    outbox.enqueue([result], ["pacs"], job=str(job))
    if state == "pending":
        return
    (item,) = outbox.claim("pacs")
    if state == "dead":
        outbox.mark_failed(item, "refused", permanent=True)
    else:
        outbox.mark_sent(item)


def _outbox_rows(outbox: Outbox) -> tuple[int, int]:
    """Rows of the outbox table, and of the patient and study attributes kept per job."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(outbox.path)) as conn:
        count = [
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("outbox", "job_studies")
        ]
    return count[0], count[1]


def test_a_delivered_study_is_forgotten_forget_days_after_its_files(
    site: Site, tmp_path: Path
) -> None:
    spool, store, outbox, assembler = site.spool, site.store, site.outbox, site.assembler
    study = factories.small_study(tmp_path / "in")
    paths = study["t1c"] + study["flair"] + study["rtstruct"]
    t0 = 1_000_000.0
    _receive(spool, store, paths, t0)
    (job,) = assembler.run_once(now=t0 + 60)
    store.set_state(job, RUNNING)
    store.set_state(job, DONE)
    _deliver(outbox, study["t1c"], job)
    done_before = store.durations()
    assert done_before[0] == 1
    keep = dataclasses.replace(KEEP, forget_days=90)
    assert len(prune(store, spool.root, outbox, keep, now=t0 + 8 * DAY_S)) == 1
    # the files went; the records stay until forget_days after that
    assert forget(store, outbox, keep, now=t0 + 8 * DAY_S + 89 * DAY_S) == []
    (would,) = forget(store, outbox, keep, now=t0 + 99 * DAY_S, dry_run=True)
    assert (would.job_ids, would.instance_rows, would.result_rows) == ((job,), len(paths), 1)
    assert store.get_job(job) is not None and _outbox_rows(outbox) == (1, 1)

    (gone,) = forget(store, outbox, keep, now=t0 + 99 * DAY_S)
    assert (gone.job_ids, gone.instance_rows, gone.result_rows) == ((job,), len(paths), 1)
    assert round(gone.days_since_removal) == 91
    assert store.get_job(job) is None and store.events(job) == [] and store.job_series(job) == []
    assert store.list_jobs() == [] and store.series_of_study(_study_uid(paths)) == []
    counts = store.counts()
    assert (counts["instances"], counts["instances_removed"], counts[DONE]) == (0, 0, 0)
    assert counts["studies_forgotten"] == 1
    assert counts["instances_forgotten"] == len(paths)
    # the patient's name and ID the outbox kept for rejection notes went with its rows
    assert _outbox_rows(outbox) == (0, 0)
    assert list(outbox.objects_dir.iterdir()) == []
    assert store.durations() == done_before  # the summary's totals never go down
    assert forget(store, outbox, keep, now=t0 + 400 * DAY_S) == []  # once only

    # sent again, the study is new to the node: a first version, a new job
    _receive(spool, store, paths, t0 + 100 * DAY_S)
    (again,) = assembler.run_once(now=t0 + 100 * DAY_S + 60)
    second = store.get_job(again)
    assert second is not None and again != job
    assert (second.version, second.state, second.instance_count) == (1, QUEUED, len(paths))


def _study_uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_records_stay_while_the_outbox_has_work_with_them(site: Site, tmp_path: Path) -> None:
    """A failed study's files go whatever its notice's delivery; its records wait for the
    notice to be delivered, and for a replacement naming its job to be applied."""
    spool, store, outbox, assembler = site.spool, site.store, site.outbox, site.assembler
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    _receive(spool, store, study["t1c"], t0)
    (job,) = assembler.run_once(now=t0 + 60)
    assert store.get_job(job).state == FAILED  # type: ignore[union-attr]
    _deliver(outbox, study["t1c"], job, state="dead")
    keep = dataclasses.replace(KEEP, forget_days=90)
    assert len(prune(store, spool.root, outbox, keep, now=t0 + 31 * DAY_S)) == 1
    late = t0 + 200 * DAY_S
    assert forget(store, outbox, keep, now=late, dry_run=True) == []
    assert forget(store, outbox, keep, now=late) == []
    assert store.get_job(job) is not None and _outbox_rows(outbox) == (1, 1)

    assert outbox.retry(destination="pacs") == 1
    (item,) = outbox.claim("pacs")
    outbox.mark_sent(item)
    outbox.take_back(["pacs"], job=str(job), jobs=[str(job)], reason="taken back")
    assert forget(store, outbox, keep, now=late) == []  # the take-back is not applied yet
    (replaced,) = outbox.apply_replacements("pacs")
    assert "delivered left as they are" in replaced.remark  # "pacs" takes no notes here
    (gone,) = forget(store, outbox, keep, now=late)
    assert gone.job_ids == (job,) and store.get_job(job) is None
    assert _outbox_rows(outbox) == (0, 0)


def test_a_study_that_holds_instances_again_is_not_forgotten(site: Site, tmp_path: Path) -> None:
    spool, store, outbox = site.spool, site.store, site.outbox
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    _receive(spool, store, study["t1c"], t0)
    (job,) = site.assembler.run_once(now=t0 + 60)
    keep = dataclasses.replace(KEEP, forget_days=90)
    prune(store, spool.root, outbox, keep, now=t0 + 31 * DAY_S)
    (candidate,) = store.forget_candidates(t0 + 200 * DAY_S)
    # the structure set arrives between the listing and the forgetting: nothing goes, and the
    # outbox is not asked
    _receive(spool, store, study["rtstruct"], t0 + 150 * DAY_S)
    asked: list[object] = []
    assert store.forget_study(candidate, lambda jobs: asked.append(jobs) or True) is None
    assert asked == [] and store.get_job(job) is not None
    assert store.forget_candidates(t0 + 200 * DAY_S) == []
    # forget_days 0 keeps the records for ever
    never = dataclasses.replace(KEEP, forget_days=0)
    assert forget(store, outbox, never, now=t0 + 9999 * DAY_S) == []


def test_an_old_database_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.instance import InstanceInfo
    from dicom_node.jobs import MIGRATIONS, SCHEMA

    path = tmp_path / "jobs.sqlite3"
    old = SCHEMA
    for _, column, declaration in reversed(MIGRATIONS):  # the last added is the last column
        old = old.replace(f",\n    {column} {declaration}\n", "\n")
    assert not any(f"{column} {declaration}" in old for _, column, declaration in MIGRATIONS)
    conn = sqlite3.connect(path)
    conn.executescript(old)
    conn.execute(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
        "series_instance_uid, modality, series_description, protocol_name, sequence_name, "
        "contrast_agent, frame_of_reference_uid, transfer_syntax_uid, path, calling_ae, "
        "received_at) VALUES ('1.1', '1.2.840.10008.5.1.4.1.1.4', '1.9', '1.8', 'MR', 'T1', "
        "'', '', 1, '1.7', '1.2.840.10008.1.2.1', 'a.dcm', 'SCANNER', 0)"
    )
    conn.commit()
    conn.close()
    store = JobStore(path)
    assert store.counts()["instances_removed"] == 0
    assert store.retention_candidates() == []
    # an instance recorded before ImageType was: counted as acquired; a new one keeps its own
    mip = InstanceInfo(
        "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.9", "1.6", "MR", 3, "T1 MIP", "", "", True,
        "1.7", "1.2.840.10008.1.2.1", "k", image_type="DERIVED\\PRIMARY\\MIP_TRA",
    )  # fmt: skip
    assert store.record_instance(mip, "b.dcm", "SCANNER", 1.0)
    types = {s.series_instance_uid: s.image_type for s in store.series_of_study("1.9")}
    assert types == {"1.8": "", "1.6": "DERIVED\\PRIMARY\\MIP_TRA"}
    # an instance recorded before its patient was: sent again, a duplicate (not a correction)
    again = dataclasses.replace(mip, sop_instance_uid="1.1", series_instance_uid="1.8")
    assert store.stored_instance("1.1") == ("", "a.dcm")
    assert not store.record_instance(again, "a.dcm", "SCANNER", 2.0)
    assert store.stored_instance("1.2") == ("k", "b.dcm")


def test_the_command_line_lists_then_removes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``glioforecast spool prune [--dry-run]`` on a node's data folder, with the embedded
    default retention (a failed study from long ago goes)."""
    data = tmp_path / "data"
    settings = make_settings(data)
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(settings.storage.spool_dir), JobStore(settings.storage.database)
    _receive(spool, store, study["t1c"], 1_000_000.0)
    (job,) = Assembler(store, settings).run_once(now=1_000_100.0)
    store.close()
    n = len(study["t1c"])
    assert main(["spool", "prune", "--data-dir", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"job {job}: failed, last instance" in out and f"would remove {n} files" in out
    assert len(_files(spool)) == n
    assert main(["spool", "prune", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"1 studies, {n} files" in out and "0 studies' records forgot" in out
    assert _files(spool) == []

    # 91 days later (the default forget_days is 90) the job's records go too
    import sqlite3

    with contextlib.closing(sqlite3.connect(settings.storage.database)) as conn, conn:
        conn.execute(f"UPDATE studies SET removed_at = removed_at - {91 * DAY_S}")
    assert main(["spool", "prune", "--data-dir", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"job(s) {job}: files removed 91.0 days ago: would forget {n} instance rows" in out
    assert main(["spool", "prune", "--data-dir", str(data)]) == 0
    assert "1 studies' records forgot" in capsys.readouterr().out
    assert main(["jobs", "show", str(job), "--data-dir", str(data)]) != 0
    assert f"no job {job}: its records were forgotten by retention" in capsys.readouterr().err
    assert main(["jobs", "show", str(job + 1), "--data-dir", str(data)]) != 0
    assert f"no job {job + 1}: expected the id of a job" in capsys.readouterr().err
    store = JobStore(settings.storage.database)
    assert store.list_jobs() == [] and store.counts()["instances_removed"] == 0
    store.close()


def test_the_running_node_removes_a_failed_study_and_takes_it_again(
    run_node, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A real node and dcmtk's storescu: an MR study without a structure set fails, its files
    go after failed_days (here 0.2 s), the metrics count them, its records go forget_days
    later (2 s), and the same study sent again with its structure set is stored anew and
    queued."""
    node = run_node(
        retention={"failed_days": 0.2 / DAY_S, "forget_days": 2.0 / DAY_S, "check_interval_s": 1.0}
    )
    study = factories.small_study(tmp_path / "in")
    images = study["t1c"] + study["flair"]
    assert storescu(node.scp.port, *images).returncode == 0
    wait_for(lambda: node.store.counts()[FAILED] == 1, what="the failed job")
    wait_for(lambda: not _files(node.spool), what="retention", timeout=10)
    assert node.health is not None
    _, text = get(node.health.server.server_address[1], "/metrics")
    assert f"glioforecast_retention_removed_instances {len(images)}" in text
    assert f"glioforecast_instances_received_total {len(images)}" in text
    assert "glioforecast_spool_instances 0" in text
    # 2 s later the failed job's records go too; the job duration summary keeps its totals
    wait_for(lambda: not node.store.list_jobs(), what="the records forgotten", timeout=10)
    _, text = get(node.health.server.server_address[1], "/metrics")
    assert "glioforecast_retention_removed_instances 0" in text
    assert "glioforecast_retention_forgotten_studies_total 1" in text
    assert 'glioforecast_jobs{state="failed"} 0' in text
    # a counter never goes down: it fell to 0 here, read by Prometheus as a reset
    assert f"glioforecast_instances_received_total {len(images)}" in text
    assert storescu(node.scp.port, *images, *study["rtstruct"]).returncode == 0
    wait_for(
        lambda: any(j.instance_count == len(images) + 1 for j in node.store.list_jobs()),
        what="a job with every instance sent again",
    )
    assert len(_files(node.spool)) >= len(images) + 1


def test_files_that_cannot_be_removed_are_kept_counted_and_tried_again(
    site: Site, tmp_path: Path
) -> None:
    """A file retention cannot delete (a read-only or foreign-owned spool; here a folder in
    its place) was counted removed, audited as deleted and never tried again: its row is now
    kept, the removal says so, and the next pass removes it."""
    spool, store, outbox, assembler = site.spool, site.store, site.outbox, site.assembler
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    images = study["t1c"] + study["flair"]
    _receive(spool, store, images, t0)
    (job,) = assembler.run_once(now=t0 + 60)  # no structure set: failed
    stuck = _files(spool)[0]
    content = stuck.read_bytes()
    stuck.unlink()
    stuck.mkdir()
    (stuck / "x").write_text("in the way")  # unlink fails (IsADirectoryError)
    (removed,) = prune(store, spool.root, outbox, KEEP, now=t0 + 31 * DAY_S)
    assert (removed.files, removed.failed) == (len(images) - 1, 1)
    rel = str(stuck.relative_to(spool.root))
    assert store.study_paths_in_spool(_study_uid(images)) == [rel]
    assert store.study_removed_at(_study_uid(images)) is not None  # the others went
    assert any("1 of the study's" in e.message and "could not be removed" in e.message
               for e in store.events(job))  # fmt: skip
    # the obstacle goes (the disk writable again): the next pass removes what was left
    (stuck / "x").unlink()
    stuck.rmdir()
    stuck.write_bytes(content)
    (again,) = prune(store, spool.root, outbox, KEEP, now=t0 + 32 * DAY_S)
    assert (again.files, again.failed) == (1, 0)
    assert _files(spool) == []


def test_a_dry_run_names_what_the_prune_removes(site: Site, tmp_path: Path) -> None:
    """The dry run counted the latest job's instances; a prune removes every instance of the
    study still in the spool (a presentation state added after the job, here), so the dry run
    said less than was then removed."""
    spool, store, outbox, assembler = site.spool, site.store, site.outbox, site.assembler
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    images = study["t1c"] + study["flair"]
    _receive(spool, store, images, t0)
    assembler.run_once(now=t0 + 60)
    extra = pydicom.dcmread(study["t1c"][0])
    extra.SOPInstanceUID = pydicom.uid.generate_uid()
    extra.SeriesInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "pr.dcm"
    extra.save_as(path)
    info = _info(path)
    stored = spool.store(info.study_instance_uid, info.series_instance_uid,
                         info.sop_instance_uid, path.read_bytes())  # fmt: skip
    store.record_instance(info, stored.relative, "WS", t0 + 90, reopens=False)
    (would,) = prune(store, spool.root, outbox, KEEP, now=t0 + 31 * DAY_S, dry_run=True)
    (did,) = prune(store, spool.root, outbox, KEEP, now=t0 + 31 * DAY_S)
    assert would.files == did.files == len(images) + 1
    assert would.bytes == did.bytes


def test_a_retry_that_comes_after_a_newer_version_or_a_prune_changes_nothing(
    site: Site, tmp_path: Path
) -> None:
    """`jobs retry` runs in its own process beside the node: a newer version of the study made
    since it looked, or retention removing its files, must not see the old job queued again
    (it ran with no files, or delivered superseded results); and a prune that read a failed
    job before an operator queued it again does not take its files."""
    spool, store, assembler = site.spool, site.store, site.assembler
    study = factories.small_study(tmp_path / "in")
    t0 = 1_000_000.0
    images = study["t1c"] + study["flair"]
    _receive(spool, store, images, t0)
    (job1,) = assembler.run_once(now=t0 + 60)
    candidates = store.retention_candidates()  # a retention pass read its candidates...
    store.set_roles(job1, [], QUEUED, "")  # ...an operator's retry queued the job...
    # ...then the pass goes on: the job it read as failed is queued, its files stay
    (candidate,) = [c for c in candidates if c.job_id == job1]
    assert store.remove_study_instances(candidate, t0 + 31 * DAY_S, "retention") == []
    assert len(_files(spool)) == len(images)
    store.set_state(job1, FAILED, "missing required role rtstruct")
    _receive(spool, store, study["rtstruct"], t0 + 100)  # a newer version comes
    assembler.run_once(now=t0 + 200)  # version 2: job 1 superseded
    with pytest.raises(ValueError, match=rf"job {job1}: not re-queued: it is superseded now"):
        store.set_roles(job1, [], QUEUED, "")
    assert store.get_job(job1).state != QUEUED  # type: ignore[union-attr]
