"""Spool retention: remove a study's DICOM files once nothing more is to be done with them.

Without it the spool grows with every study routed to the node until the free-space floor
(``storage.min_free_mb``) makes the receiver answer 0xA700 to every sender. A study's files go
(:func:`prune`) when its latest job is

- ``done``, every result it queued has been delivered (none pending, being sent or dead), and
  its last instance arrived ``retention.done_days`` ago or more;
- ``failed`` (missing series, unreadable input, a model error) and its last instance arrived
  ``retention.failed_days`` ago or more. Until then, an instance that completes the study (a
  structure set made days after the MR) reopens it with every instance.

A study still pending assembly, or with a job queued or running, is never touched. Only the
files go: the job list, series, roles and events stay, and the job gets a ``retention`` event.

The database is updated first (one transaction that re-checks the study), then exactly the
files it named are deleted, so an instance arriving meanwhile is kept. An instance sent again
after its file went is stored anew and reopens the study (:meth:`JobStore.record_instance`).

The records that stay go later (:func:`forget`), ``retention.forget_days`` after the files, so
that the databases stop growing with every study the node ever saw: the study's instance rows,
its jobs with their series, instance lists and events, and the outbox rows of its jobs' results
with the patient and study attributes kept for rejection notes. Not while the study holds an
instance again, waits for assembly or has a job not ended, nor while one of those results is not
delivered (pending, being sent, awaiting a commitment, dead) or a replacement of them is not yet
applied. Afterwards the node no longer knows the study: sent again, it is a new study (job
version 1), its results are delivered again (a PACS keeps one copy of each SOP Instance UID),
and a newer version can no longer reject the results of the forgotten jobs at a PACS. Records
of IOCM rejections (per instance) stay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.audit import AuditTrail, NoAuditTrail, StudyRecord
from dicom_node.jobs import DONE, JobStore, RetentionCandidate
from dicom_node.outbox import Outbox
from dicom_node.settings import RetentionSettings

log = logging.getLogger(__name__)

DAY_S = 86400.0


@dataclass(frozen=True)
class Removal:
    """One study whose files retention removed (or, in a dry run, would remove)."""

    job_id: int
    state: str
    age_days: float
    files: int
    bytes: int
    #: files that could not be deleted (a read-only or foreign-owned spool): kept, and tried
    #: again at the next pass
    failed: int = 0


def _due(candidate: RetentionCandidate, settings: RetentionSettings, now: float) -> bool:
    days = settings.done_days if candidate.state == DONE else settings.failed_days
    return days > 0 and now - candidate.last_received_at >= days * DAY_S


def _size(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def _remove_files(root: Path, relative: Sequence[str]) -> tuple[int, dict[str, OSError]]:
    """Delete the spool files ``relative`` and the folders they leave empty; the bytes freed,
    and the files that could not be deleted with why (a file already gone counts as removed)."""
    freed = 0
    failed: dict[str, OSError] = {}
    folders: set[Path] = set()
    for rel in relative:
        path = root / rel
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed[rel] = exc
        folders.add(path.parent)
        folders.add(path.parent.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder != root and root in folder.parents:
            with contextlib.suppress(OSError):  # only when empty: a new file keeps it
                folder.rmdir()
    return freed, failed


def _name_patient(study: StudyRecord, paths: Sequence[Path]) -> None:
    """Fill in the patient and accession number of ``study`` from the first file that reads."""
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            continue
        found = StudyRecord.from_dataset(ds)
        study.patient_id, study.patient_name = found.patient_id, found.patient_name
        study.accession_number = found.accession_number
        return


def prune(
    store: JobStore,
    spool_root: Path,
    outbox: Outbox,
    settings: RetentionSettings,
    *,
    now: float | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    audit: AuditTrail | NoAuditTrail | None = None,
) -> list[Removal]:
    """Remove the spool files of every study that retention allows (see the module), or of
    the first ``limit`` of them; in a dry run, only say which. Returns one :class:`Removal`
    per study; each study removed is a DICOM Study Deleted message of ``audit``."""
    audit = audit or NoAuditTrail()
    now = time.time() if now is None else now
    removals: list[Removal] = []
    for candidate in store.retention_candidates():
        if limit is not None and len(removals) >= limit:
            break
        if not _due(candidate, settings, now):
            continue
        if candidate.state == DONE and outbox.undelivered(str(candidate.job_id)):
            continue  # a result still waits for (or is dead at) a destination
        age = (now - candidate.last_received_at) / DAY_S
        if dry_run:  # what a prune removes: the study's instances in the spool, all of them
            paths = [
                spool_root / rel for rel in store.study_paths_in_spool(candidate.study_instance_uid)
            ]
            removals.append(Removal(candidate.job_id, candidate.state, age, len(paths),
                                    _size(paths)))  # fmt: skip
            continue
        message = (
            f"retention: the study's files were removed from the spool, {age:.1f} days after "
            f"its last instance (latest job {candidate.state}); send the study again to rerun it"
        )
        study = StudyRecord(candidate.study_instance_uid)
        if audit.enabled:
            study.sop_classes = store.study_sop_classes(candidate.study_instance_uid)
        relative = store.remove_study_instances(candidate, now, message)
        if not relative:
            continue  # the study changed since it was read: left for the next pass
        if audit.enabled:
            _name_patient(study, [spool_root / rel for rel in relative])
        freed, failed = _remove_files(spool_root, relative)
        removed = len(relative) - len(failed)
        if failed:
            first, error = next(iter(failed.items()))
            why = (
                f"retention: {len(failed)} of the study's {len(relative)} files could not be "
                f"removed ({first}: {error.strerror or error}); they are kept and tried again at "
                "the next pass"
            )
            store.keep_instances(candidate.study_instance_uid, list(failed), why)
            log.error("job %d: %s", candidate.job_id, why, extra={"job": candidate.job_id})
        if audit.enabled and removed:
            partly = f"; {len(failed)} files could not be removed yet" if failed else ""
            audit.deleted(
                study, f"retention: {age:.1f} days after the study's last instance, latest job "
                f"{candidate.state}{partly}",
            )  # fmt: skip
        removals.append(
            Removal(candidate.job_id, candidate.state, age, removed, freed, len(failed))
        )
        log.info(
            "retention: job %d (%s, last instance %.1f days ago): %d files, %.1f MB removed",
            candidate.job_id,
            candidate.state,
            age,
            removed,
            freed / 2**20,
            extra={"job": candidate.job_id},
        )
    return removals


@dataclass(frozen=True)
class Forgotten:
    """One study whose records retention forgot (or, in a dry run, would forget)."""

    job_ids: tuple[int, ...]
    days_since_removal: float
    instance_rows: int
    result_rows: int


def forget(
    store: JobStore,
    outbox: Outbox,
    settings: RetentionSettings,
    *,
    now: float | None = None,
    dry_run: bool = False,
    limit: int | None = None,
) -> list[Forgotten]:
    """Forget the records of every study whose files went ``settings.forget_days`` ago or more
    (see the module), or of the first ``limit`` of them; in a dry run, only say which."""
    if settings.forget_days <= 0:
        return []
    now = time.time() if now is None else now
    forgotten: list[Forgotten] = []
    for candidate in store.forget_candidates(now - settings.forget_days * DAY_S):
        if limit is not None and len(forgotten) >= limit:
            break
        days = (now - candidate.removed_at) / DAY_S
        if dry_run:
            results = outbox.forget_jobs([str(j) for j in candidate.job_ids], dry_run=True)
            if results is not None:
                forgotten.append(
                    Forgotten(candidate.job_ids, days, candidate.instance_rows, results)
                )
            continue
        released: list[int] = []
        release = functools.partial(_release, outbox, released)
        rows = store.forget_study(candidate, release)
        if rows is None:
            continue  # results still waiting, or the study changed since it was read
        forgotten.append(Forgotten(candidate.job_ids, days, rows, sum(released)))
        log.info(
            "retention: the records of job(s) %s forgotten, %.1f days after their files were "
            "removed: %d instance rows, %d result rows",
            ", ".join(map(str, candidate.job_ids)), days, rows, sum(released),
            extra={"job": candidate.job_ids[-1] if candidate.job_ids else None},
        )  # fmt: skip
    return forgotten


def _release(outbox: Outbox, released: list[int], jobs: Sequence[int]) -> bool:
    """Forget the outbox rows of ``jobs`` (their count joins ``released``); False when the
    outbox still has work with them."""
    deleted = outbox.forget_jobs([str(j) for j in jobs])
    if deleted is None:
        return False
    released.append(deleted)
    return True


def _forgotten_lines(forgotten: Sequence[Forgotten], dry_run: bool) -> list[str]:
    verb = "would forget" if dry_run else "forgot"
    lines = [
        f"job(s) {', '.join(map(str, f.job_ids))}: files removed {f.days_since_removal:.1f} days "
        f"ago: {verb} {f.instance_rows} instance rows, {f.result_rows} result rows"
        for f in forgotten
    ]
    lines.append(f"{len(forgotten)} studies' records {verb}")
    return lines


def describe(
    removals: Sequence[Removal], dry_run: bool, forgotten: Sequence[Forgotten] = ()
) -> str:
    """One line per study and a total, then the same for the records forgotten, for the
    command line."""
    verb = "would remove" if dry_run else "removed"
    lines = [
        f"job {r.job_id}: {r.state}, last instance {r.age_days:.1f} days ago: {verb} "
        f"{r.files} files ({r.bytes / 2**20:.1f} MB)"
        + (
            f"; {r.failed} files could not be removed (kept: jobs show {r.job_id})"
            if r.failed
            else ""
        )
        for r in removals
    ]
    total = sum(r.bytes for r in removals)
    failed = sum(r.failed for r in removals)
    lines.append(
        f"{len(removals)} studies, {sum(r.files for r in removals)} files, "
        f"{total / 2**20:.1f} MB {verb}"
        + (f"; {failed} files could not be removed and are tried again" if failed else "")
    )
    return "\n".join(lines + _forgotten_lines(forgotten, dry_run))
