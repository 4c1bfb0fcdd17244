"""Persistent outbox: every output object waits here until each destination acknowledged it.

One SQLite file (WAL, synchronous FULL) holds one row per (object, destination) with its state:

- ``pending``: waiting for its next attempt (``next_attempt_at``);
- ``sending``: claimed by a sender (a crash leaves it there: :meth:`Outbox.recover` at start-up
  puts it back to pending; the peer then receives the same SOP Instance UID again, which a PACS
  stores once);
- ``committing`` (destinations with ``storage_commitment``): acknowledged, and waiting for the
  peer's storage commitment report (:mod:`dicom_node.commitment`). The request goes out on the
  next pass; an object the report says is not kept goes back to ``pending`` (sent again), and a
  request left unanswered for ``commitment_timeout_s`` is made again, up to
  ``commitment_max_requests`` times before the row goes dead. Two outcomes are no chance
  failure and end sooner: an object the peer stored and then reported it does not hold
  (0x0112) is sent once more, and dead the second time (:data:`NOT_HELD_LIMIT`: a PACS that
  changes SOP Instance UIDs on arrival says so of every object, however often it is sent); a
  request the peer aborts (A-ABORT) :data:`ABORTS_REFUSE` times in a row is a refusal, as a
  refusing status is. The object's file stays until the peer committed;
- ``sent``: acknowledged with a success or warning status (and, with storage commitment,
  committed by the peer);
- ``dead``: gave up after ``dead_after_attempts`` attempts, or at once on a failure that a retry
  cannot fix (SOP class not supported...). Dead rows keep their object and can be re-queued with
  :meth:`Outbox.retry` (``glioforecast outbox retry``);
- ``withdrawn``: never delivered, and no longer to be: the results of a newer version of the
  study replaced it, or it was taken back (see below);
- ``rejected``: delivered, then listed in a rejection note sent to the same destination because
  newer results replaced it, or it was taken back (see below).

Replacing earlier results: :meth:`Outbox.enqueue` with ``replaces`` (the study's job ids) records
that the objects queued replace, at those destinations, every earlier object of those jobs;
:meth:`Outbox.take_back` records that some jobs' objects no longer stand, with nothing in their
place (a newer version of the study failed; an administrator took them back). The next delivery
pass, before it sends anything to a destination, withdraws the rows of those objects not yet
delivered there and, for a destination with ``reject_replaced``, queues an IHE IOCM rejection
note (:mod:`sr_writer.rejection`) listing those the destination acknowledged. It runs in the
delivery pass, the only place rows are sent, so no row is in flight meanwhile.

Objects are written once as DICOM files next to the database (temp file, fsync, rename). Enqueue
is idempotent on (SOP Instance UID, destination): a job re-run after a crash enqueues the same
UIDs (they are derived from the job) and nothing is sent twice. An object's file is deleted once
every destination has it; its rows stay until retention forgets its job (:meth:`forget_jobs`,
``retention.forget_days`` after the study's files went).

Failed attempts back off exponentially: ``retry_initial_s * 2**(attempts - 1)``, at most
``retry_max_s``. Every failure is logged with the destination, the attempt number, the next
delay and the reason, one line per batch, request or report (the count and the first UIDs)
where a whole batch fails; logs name the job id, never the patient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_node import commitment
from dicom_node.audit import (
    ROLE_DESTINATION,
    ROLE_SOURCE,
    AuditTrail,
    NoAuditTrail,
    Participant,
    TransferTally,
)
from dicom_node.commitment import (
    NO_SUCH_OBJECT_INSTANCE,
    PERMANENT_REASONS,
    CommitmentReport,
    describe_reason,
)
from dicom_node.dicomweb import stow_batch
from dicom_node.errors import SendError, StorageError
from dicom_node.loop import BackgroundLoop
from dicom_node.scu import ContextsRejected, Destination, StoreResult, store_batch
from dicom_node.sqlite import Database

logger = logging.getLogger(__name__)

STATES = ("pending", "sending", "committing", "sent", "dead", "withdrawn", "rejected")
#: states a row does not leave (its object file is no longer needed)
SETTLED = ("sent", "withdrawn", "rejected")

_OUTBOX_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    job TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'sending', 'committing', 'sent', 'dead', 'withdrawn',
                         'rejected')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    last_status INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    commit_requested_at REAL,
    commit_requests INTEGER NOT NULL DEFAULT 0,
    committed_at REAL,
    not_held INTEGER NOT NULL DEFAULT 0,
    commit_aborts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (sop_instance_uid, destination)
);
"""
# columns added since the table was last rebuilt (see _migrate): an outbox made before has them
# added, as they are declared here (an earlier version run on it afterwards ignores them)
_ADDED_COLUMNS = {
    # how often the peer reported, after acknowledging the object's C-STORE, that it does not
    # hold it (Failure Reason 0x0112); the operator's retry resets it
    "not_held": "INTEGER NOT NULL DEFAULT 0",
    # storage commitment requests the peer aborted in a row (A-ABORT instead of a response)
    "commit_aborts": "INTEGER NOT NULL DEFAULT 0",
}
#: a row the peer acknowledged and then reported it does not hold (0x0112) this many times goes
#: dead: once can be a file lost; twice is a PACS that stores under other SOP Instance UIDs
NOT_HELD_LIMIT = 2
#: storage commitment requests aborted in a row after which the peer counts as refusing them
ABORTS_REFUSE = 3
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, destination, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS outbox_sop ON outbox (sop_instance_uid)",
    # a job's rows: jobs show, retention's "all delivered?", replacements
    "CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job, destination)",
)
# every storage commitment request: which rows it listed (a late report of an earlier request
# still counts)
_COMMITMENTS_TABLE = """
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT NOT NULL,
    outbox_id INTEGER NOT NULL,
    requested_at REAL NOT NULL,
    PRIMARY KEY (transaction_uid, outbox_id)
);
"""
# objects queued that replace, at one destination, the earlier objects of other jobs (or of the
# same job, a notice replaced by a prediction), or jobs whose objects are taken back (keep empty,
# a reason); applied, then deleted, by the next delivery pass (what it did is logged, and an
# event of the job: OutboxSender.on_replaced)
_REPLACEMENTS_TABLE = """
CREATE TABLE IF NOT EXISTS replacements (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    destination TEXT NOT NULL,
    earlier_jobs TEXT NOT NULL,
    keep TEXT NOT NULL,
    study TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
"""
# each job's patient and study attributes (DICOM JSON), from the first objects it queued: what a
# rejection note copies when results are taken back after their files and the spool's are gone
_JOB_STUDIES_TABLE = """
CREATE TABLE IF NOT EXISTS job_studies (
    job TEXT PRIMARY KEY,
    study TEXT NOT NULL
);
"""
_SCHEMA = (
    _OUTBOX_TABLE + ";\n".join(_INDEXES) + ";\n" + _COMMITMENTS_TABLE + _REPLACEMENTS_TABLE
    + _JOB_STUDIES_TABLE
)  # fmt: skip
# how the error of a row that went dead waiting for its storage commitment report begins
_NO_REPORT = "no storage commitment report from"
# the requests of rows settled for good are of no more use; those of a row that went dead
# waiting for a report are kept: a report that comes after the node stopped waiting still
# says the PACS keeps the object
_FORGET_SETTLED = (
    "DELETE FROM commitments WHERE outbox_id IN (SELECT id FROM outbox WHERE state NOT IN "
    f"('pending', 'sending', 'committing') AND NOT (state = 'dead' AND last_error LIKE "
    f"'{_NO_REPORT}%'))"
)
# the patient and study attributes a rejection note copies
_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName",
)  # fmt: skip


def _migrate(database: Database) -> None:
    """Rebuild an outbox table made by an earlier version (its CHECK lacks the states added
    since: ``committing``, ``withdrawn``, ``rejected``; before storage commitment it also lacks
    the commitment columns); rows are copied as they are. Columns added since the last rebuild
    (:data:`_ADDED_COLUMNS`) are added to a table that lacks them."""
    query = "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"

    def current(row: sqlite3.Row | None) -> bool:
        return row is None or "'rejected'" in row[0]

    def missing(db: sqlite3.Connection) -> list[str]:
        have = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
        return [c for c in _ADDED_COLUMNS if c not in have]

    with database.lock:  # read first: no write lock for a database that is up to date
        if current(database.conn.execute(query).fetchone()) and not missing(database.conn):
            return
    rebuilt = False
    with database.transaction() as db:  # another process may have upgraded it meanwhile
        if not current(db.execute(query).fetchone()):
            columns = ", ".join(r[1] for r in db.execute("PRAGMA table_info(outbox)"))
            db.execute(_OUTBOX_TABLE.replace("IF NOT EXISTS outbox (", "outbox_rebuilt ("))
            db.execute(f"INSERT INTO outbox_rebuilt ({columns}) SELECT {columns} FROM outbox")
            db.execute("DROP TABLE outbox")
            db.execute("ALTER TABLE outbox_rebuilt RENAME TO outbox")
            for index in _INDEXES:
                db.execute(index)
            rebuilt = True
        added = missing(db)
        for column in added:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {_ADDED_COLUMNS[column]}")
    if rebuilt:
        logger.info("outbox: database %s upgraded to this version's states", database.path)
    if added:
        logger.info(
            "outbox: database %s upgraded: columns %s added", database.path, ", ".join(added)
        )


class SendingLike(Protocol):
    """What :meth:`RetryPolicy.from_settings` reads (the settings' ``sending`` section)."""

    @property
    def retry_initial_s(self) -> float: ...
    @property
    def retry_max_s(self) -> float: ...
    @property
    def dead_after_attempts(self) -> int: ...
    @property
    def commitment_timeout_s(self) -> float: ...
    @property
    def commitment_max_requests(self) -> int: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off of failed sends. ``dead_after_attempts`` <= 0 means never give up."""

    retry_initial_s: float = 10.0
    retry_max_s: float = 600.0
    dead_after_attempts: int = 20
    commitment_timeout_s: float = 3600.0
    commitment_max_requests: int = 3

    @classmethod
    def from_settings(cls, sending: SendingLike) -> RetryPolicy:
        """From the ``sending`` section of the settings."""
        return cls(
            retry_initial_s=float(sending.retry_initial_s),
            retry_max_s=float(sending.retry_max_s),
            dead_after_attempts=int(sending.dead_after_attempts),
            commitment_timeout_s=float(sending.commitment_timeout_s),
            commitment_max_requests=int(sending.commitment_max_requests),
        )

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        if attempts < 1:
            return 0.0
        return float(min(self.retry_max_s, self.retry_initial_s * 2 ** (attempts - 1)))


@dataclass(frozen=True)
class OutboxItem:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    destination: str
    job: str
    path: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    last_status: int | None
    created_at: float
    updated_at: float
    sent_at: float | None
    commit_requested_at: float | None = None
    commit_requests: int = 0
    committed_at: float | None = None
    not_held: int = 0
    commit_aborts: int = 0


@dataclass(frozen=True)
class Replaced:
    """What one replacement did at one destination."""

    job: str
    destination: str
    earlier_jobs: list[str]
    withdrawn: int
    rejected: int
    note: str = ""  # the rejection note's SOP Instance UID, when one was queued
    remark: str = ""  # why delivered objects were left as they are
    reason: str = ""  # why results are taken back with none in their place; "": replaced

    def __str__(self) -> str:
        jobs = ", ".join(self.earlier_jobs)
        text = (
            f"{self.reason}: results at {self.destination} (of jobs "
            if self.reason
            else f"results of job {self.job} replace the study's earlier ones at "
            f"{self.destination} (of jobs "
        ) + f"{jobs}): {self.withdrawn} not yet delivered withdrawn"
        if self.note:
            text += f", {self.rejected} delivered rejected by note {self.note}"
        return text + (f"; {self.remark}" if self.remark else "")


#: builds the rejection note of a replacement: (the study's patient and study attributes, the
#: job whose results replace, the rows delivered, why they are taken back with nothing in their
#: place, "" when results replace them) -> the note
NoteBuilder = Callable[[Dataset, str, Sequence[OutboxItem], str], Dataset]


@dataclass
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    dead: int = 0
    commitment_requests: int = 0
    errors: list[str] = field(default_factory=list)
    replaced: list[Replaced] = field(default_factory=list)


class Outbox:
    """The outbox database at ``path``; objects are stored in ``objects_dir``.

    ``objects_dir`` defaults to ``<path without suffix>-objects`` next to the database.
    ``clock`` returns seconds since the epoch (tests pass their own).
    """

    def __init__(
        self,
        path: Path,
        *,
        objects_dir: Path | None = None,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.objects_dir = (
            Path(objects_dir) if objects_dir else self.path.with_name(self.path.stem + "-objects")
        )
        self.policy = policy or RetryPolicy()
        self.clock = clock
        try:
            self.objects_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the outbox folder {self.objects_dir}: {exc}"
            ) from exc
        self._database = Database(self.path, _SCHEMA, "outbox", synchronous="FULL")
        _migrate(self._database)
        self._db = self._database.conn
        self._lock = self._database.lock
        self._tx = self._database.transaction

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._database.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _object_path(self, sop_instance_uid: str) -> Path:
        return self.objects_dir / f"{sop_instance_uid}.dcm"

    def _write_object(self, ds: Dataset) -> Path:
        target = self._object_path(str(ds.SOPInstanceUID))
        fd, tmp = tempfile.mkstemp(dir=self.objects_dir, prefix=".tmp-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.objects_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target

    # -- queue ------------------------------------------------------------------------------

    def enqueue(
        self,
        datasets: Sequence[Dataset],
        destinations: Sequence[str],
        job: str,
        *,
        replaces: Sequence[str] = (),
    ) -> int:
        """Queue every dataset for every destination; returns the number of new rows.

        Rows that exist already (same SOP Instance UID and destination) are left as they are,
        whatever their state: a re-run job does not send twice what was delivered.

        With ``replaces`` (job ids, this one included when it sent something before), the
        datasets replace at these destinations every other object queued there for those jobs:
        the next delivery pass withdraws or rejects them (:meth:`apply_replacements`).
        """
        if not destinations:
            raise SendError("no destination to send the results to (expected at least one)")
        now = self.clock()
        added = 0
        rows: list[tuple[Dataset, list[str], Path]] = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            with self._lock:
                existing = {
                    r["destination"]: r["state"]
                    for r in self._db.execute(
                        "SELECT destination, state FROM outbox WHERE sop_instance_uid = ?", (uid,)
                    )
                }
            missing = [d for d in destinations if d not in existing]
            needs_file = bool(missing) or any(s not in SETTLED for s in existing.values())
            if not needs_file:
                continue
            try:
                rows.append((ds, missing, self._write_object(ds)))
            except OSError as exc:
                raise StorageError(f"cannot store outbox object {uid}: {exc}") from exc
        # the objects written, their rows, study and replacement appear in one transaction: a
        # delivery pass running meanwhile sees all of the job's results or none (it sent a
        # study's results in a dozen associations as they were queued, the first ones before
        # the replacement that withdraws the earlier results was recorded)
        with self._tx() as db:
            for ds, missing, path in rows:
                for dest in missing:
                    added += _insert(db, ds, dest, job, path, now)
            if datasets:
                study = _study_json(datasets[0])
                db.execute(
                    "INSERT OR IGNORE INTO job_studies (job, study) VALUES (?, ?)", (job, study)
                )
                if replaces:
                    keep = {str(ds.SOPInstanceUID) for ds in datasets}
                    self._record_replacement(db, destinations, job, replaces, study, keep)
        logger.info(
            "outbox: job %s queued %d new deliveries (%d objects, %d destinations)",
            job,
            added,
            len(datasets),
            len(destinations),
            extra={"job": job},
        )
        return added

    def take_back(
        self,
        destinations: Sequence[str],
        job: str,
        jobs: Sequence[str],
        reason: str,
        study: Dataset | None = None,
    ) -> None:
        """Record that the results of ``jobs`` no longer stand at ``destinations``, for
        ``reason`` (the study's newer job ``job`` failed; an administrator took them back): the
        next delivery pass withdraws or rejects them as if replaced by nothing. ``study``: an
        instance of the study, whose patient and study attributes a rejection note copies; by
        default those ``jobs`` recorded when they queued their results."""
        if not reason:
            raise ValueError("taking results back needs a reason, found none")
        if not jobs or not destinations:
            return
        if study is not None:
            attributes = _study_json(study)
        else:
            with self._lock:
                row = self._db.execute(
                    "SELECT study FROM job_studies WHERE job IN "
                    f"({','.join('?' * len(jobs))}) ORDER BY rowid DESC LIMIT 1",
                    list(jobs),
                ).fetchone()
            if row is None:
                raise StorageError(
                    f"no results of job(s) {', '.join(jobs)} in the outbox: nothing to take back"
                )
            attributes = str(row["study"])
        with self._tx() as db:
            self._record_replacement(db, destinations, job, jobs, attributes, set(), reason)

    def _record_replacement(
        self,
        db: sqlite3.Connection,
        destinations: Sequence[str],
        job: str,
        replaces: Sequence[str],
        study: str,
        keep: set[str],
        reason: str = "",
    ) -> None:
        """Record a replacement in the transaction ``db``."""
        db.executemany(
            "INSERT INTO replacements (job, destination, earlier_jobs, keep, study, reason, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(job, dest, json.dumps(sorted(set(replaces))), json.dumps(sorted(keep)),
              study, reason, self.clock()) for dest in destinations],
        )  # fmt: skip

    def apply_replacements(
        self, destination: str, note: NoteBuilder | None = None
    ) -> list[Replaced]:
        """Apply the replacements recorded for ``destination`` (:meth:`enqueue` with
        ``replaces``): the earlier objects not yet delivered there are withdrawn; with ``note``
        (the destination takes rejection notes) those it acknowledged are listed in a rejection
        note that ``note`` builds and that is queued at once. Called by the delivery pass before
        it sends anything to ``destination``; a replacement is applied once."""
        with self._lock:
            due = self._db.execute(
                "SELECT * FROM replacements WHERE destination = ? ORDER BY id",
                (destination,),
            ).fetchall()
        return [self._apply_replacement(r, note) for r in due]

    def _apply_replacement(self, rep: sqlite3.Row, note: NoteBuilder | None) -> Replaced:
        job, destination, reason = str(rep["job"]), str(rep["destination"]), str(rep["reason"])
        earlier = [str(j) for j in json.loads(rep["earlier_jobs"])]
        keep = set(json.loads(rep["keep"]))
        with self._lock:  # a rejection note is never itself replaced: its SOP class is left out
            rows = [
                _item(r)
                for r in self._db.execute(
                    "SELECT * FROM outbox WHERE destination = ? AND sop_class_uid != ? AND "
                    "state IN ('pending', 'dead', 'sent', 'committing') AND job IN "
                    f"({','.join('?' * len(earlier))}) ORDER BY id",
                    (destination, KeyObjectSelectionDocumentStorage, *earlier),
                )
            ]
        rows = [r for r in rows if r.sop_instance_uid not in keep]
        withdraw = [r for r in rows if r.state in ("pending", "dead")]
        delivered = [r for r in rows if r.state in ("sent", "committing")]
        built: tuple[Dataset, Path] | None = None
        remark = ""
        if note is not None and delivered:
            try:
                ds = note(Dataset.from_json(rep["study"]), job, delivered, reason)
                built = (ds, self._write_object(ds))
            except Exception as exc:  # the earlier objects stay as they are, the log says why
                remark = f"no rejection note: {type(exc).__name__}: {exc}"
                logger.exception(
                    "outbox: rejection note for %s not built", destination, extra={"job": job}
                )
        now = self.clock()
        why = reason or f"replaced by the results of job {job}"
        with self._tx() as db:
            withdrawn = sum(
                db.execute(
                    "UPDATE outbox SET state = 'withdrawn', last_error = ?, updated_at = ? "
                    "WHERE id = ? AND state IN ('pending', 'dead')",
                    (why, now, r.id),
                ).rowcount
                for r in withdraw
            )
            rejected = 0
            if built is not None:
                ds, path = built
                rejected = sum(
                    db.execute(
                        "UPDATE outbox SET state = 'rejected', last_error = ?, updated_at = ? "
                        "WHERE id = ? AND state IN ('sent', 'committing')",
                        (f"{why}; rejected by note {ds.SOPInstanceUID}", now, r.id),
                    ).rowcount
                    for r in delivered
                )
                _insert(db, ds, destination, job, path, now)
            outcome = Replaced(
                job, destination, earlier, withdrawn, rejected,
                str(built[0].SOPInstanceUID) if built else "",
                remark or ("" if note is not None or not delivered
                           else f"{len(delivered)} delivered left as they are: no reject_replaced"),
                reason=reason,
            )  # fmt: skip
            db.execute("DELETE FROM replacements WHERE id = ?", (rep["id"],))
            db.execute(_FORGET_SETTLED)
        for r in rows:
            self._drop_object_if_done(r.sop_instance_uid)
        if withdrawn or rejected or remark:
            logger.info("outbox: %s", outcome, extra={"job": job})
        return outcome

    def release(self, items: Sequence[OutboxItem]) -> None:
        """Put rows claimed but not sent back to ``pending``, their attempt not counted (the
        node stopped before their turn)."""
        now = self.clock()
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET state = 'pending', updated_at = ? WHERE id = ? "
                "AND state = 'sending'",
                [(now, item.id) for item in items],
            )
        logger.info("outbox: %d deliveries left for the next start (the node stops)", len(items))

    def recover(self) -> int:
        """Put rows left in ``sending`` by a crash back to ``pending`` (call at start-up)."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE outbox SET state = 'pending', updated_at = ? WHERE state = 'sending'",
                (self.clock(),),
            ).rowcount
        if n:
            logger.warning("outbox: %d deliveries interrupted by a stop are pending again", n)
        return n

    def claim(self, destination: str, limit: int = 500) -> list[OutboxItem]:
        """Mark up to ``limit`` due pending rows of ``destination`` as sending and return them."""
        now = self.clock()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND destination = ? "
                "AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (destination, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET state = 'sending', updated_at = ? WHERE id = ?",
                [(now, r["id"]) for r in rows],
            )
        return [_item(r, state="sending") for r in rows]

    def mark_sent(self, item: OutboxItem, status: int | None = 0, *, commit: bool = False) -> None:
        """The peer acknowledged the object; with ``commit`` it still has to commit to keeping
        it (the row waits in ``committing``, due for its commitment request now)."""
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, sent_at = ?, "
                "updated_at = ?, last_status = ?, last_error = NULL, next_attempt_at = ?, "
                "commit_requested_at = NULL, commit_aborts = 0 WHERE id = ?",
                ("committing" if commit else "sent", now, now, status, now, item.id),
            )
        if not commit:
            self._drop_object_if_done(item.sop_instance_uid)

    def mark_failed(
        self,
        item: OutboxItem,
        error: str,
        *,
        status: int | None = None,
        permanent: bool = False,
        retry_state: str = "pending",
        quiet: bool = False,
        at: float | None = None,
    ) -> OutboxItem:
        """Record a failed attempt: back off in ``retry_state`` (``pending``: send again;
        ``committing``: ask for the commitment again), or go dead. Returns the updated row.
        ``quiet``: the caller logs it (a batch that failed as a whole, in one line). ``at``:
        when the attempt was made (one time for a batch, so that its rows are due again
        together, not the first alone in an association of its own)."""
        now = self.clock() if at is None else at
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM outbox WHERE id = ?", (item.id,)).fetchone()
            if row is None:
                raise StorageError(f"outbox row {item.id} vanished")
            attempts = int(row["attempts"]) + 1
            limit = self.policy.dead_after_attempts
            dead = permanent or (limit > 0 and attempts >= limit)
            delay = 0.0 if dead else self.policy.delay(attempts)
            db.execute(
                "UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                "last_status = ?, updated_at = ?, commit_requested_at = NULL WHERE id = ?",
                ("dead" if dead else retry_state, attempts, now + delay, error, status, now,
                 item.id),
            )  # fmt: skip
            updated = db.execute("SELECT * FROM outbox WHERE id = ?", (item.id,)).fetchone()
        if quiet:
            return _item(updated)
        extra = {"job": item.job}
        if dead:
            logger.error(
                "outbox: delivery of %s to %s is dead after %d attempts%s: %s",
                item.sop_instance_uid,
                item.destination,
                attempts,
                " (not retryable)" if permanent else "",
                error,
                extra=extra,
            )
        else:
            logger.warning(
                "outbox: delivery of %s to %s failed (attempt %d), retry in %.1f s: %s",
                item.sop_instance_uid,
                item.destination,
                attempts,
                delay,
                error,
                extra=extra,
            )
        return _item(updated)

    def abandon(
        self, reason: str, *, destination: str | None = None, ids: Sequence[int] | None = None
    ) -> int:
        """Give up dead deliveries for good (a destination that will never take a class, one
        retired): they become ``withdrawn`` with ``reason``, their objects are removed once no
        destination waits for them, and their study's files may go at retention (a dead row
        kept them for ever). Returns how many."""
        if not reason.strip():
            raise ValueError("abandoning deliveries needs a reason, found none")
        where, args = "", list[object]()
        if destination is not None:
            where += " AND destination = ?"
            args.append(destination)
        if ids is not None:
            where += f" AND id IN ({','.join('?' * len(ids))})"
            args.extend(ids)
        now = self.clock()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id, sop_instance_uid, job FROM outbox WHERE state = 'dead'{where}", args
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET state = 'withdrawn', last_error = ?, updated_at = ? "
                "WHERE id = ?",
                [(f"abandoned by an operator: {reason.strip()}", now, r["id"]) for r in rows],
            )
            db.execute(_FORGET_SETTLED)
        for r in rows:
            self._drop_object_if_done(r["sop_instance_uid"])
        for job in sorted({str(r["job"]) for r in rows}):
            logger.warning(
                "outbox: %d dead deliveries of job %s abandoned by an operator: %s",
                sum(str(r["job"]) == job for r in rows), job, reason.strip(), extra={"job": job},
            )  # fmt: skip
        return len(rows)

    def retry(
        self,
        *,
        destination: str | None = None,
        ids: Sequence[int] | None = None,
        states: Sequence[str] = ("dead",),
    ) -> int:
        """Re-queue rows (dead ones by default) for an attempt now, attempts reset to 0 (and
        the counts of objects reported not held and of requests aborted, which made rows dead
        sooner: the operator changed something); rows
        in ``committing`` (with ``states`` naming it) have their storage commitment asked for
        again now instead (the PACS's report was lost, say while the node was down).

        Delivered rows cannot be re-queued: their object files are gone once delivered.
        """
        bad = [s for s in states if s not in ("dead", "pending", "committing")]
        if bad:
            raise ValueError(
                f"cannot re-queue rows in state {bad}; expected dead, pending or committing"
            )
        where = ""
        args: list[object] = []
        if destination is not None:
            where += " AND destination = ?"
            args.append(destination)
        if ids is not None:
            if not ids:
                return 0
            where += f" AND id IN ({','.join('?' * len(ids))})"
            args.extend(ids)
        resend = [s for s in states if s != "committing"]
        now = self.clock()
        n = 0
        with self._tx() as db:
            if resend:
                n += db.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, commit_requests = 0, "
                    "not_held = 0, commit_aborts = 0, "
                    f"next_attempt_at = ?, updated_at = ? WHERE state IN "
                    f"({','.join('?' * len(resend))}){where}",
                    [now, now, *resend, *args],
                ).rowcount
            if "committing" in states:
                n += db.execute(
                    "UPDATE outbox SET commit_requested_at = NULL, commit_requests = 0, "
                    "commit_aborts = 0, "
                    f"next_attempt_at = ?, updated_at = ? WHERE state = 'committing'{where}",
                    [now, now, *args],
                ).rowcount
        logger.info("outbox: %d deliveries re-queued", n)
        return n

    # -- storage commitment ---------------------------------------------------------------

    def commitment_due(self, destination: str, limit: int = 500) -> list[OutboxItem]:
        """Rows of ``destination`` whose storage commitment must be requested now: stored and
        never asked about, or asked ``commitment_timeout_s`` ago without a report. A row whose
        ``commitment_max_requests`` requests all went unanswered goes dead instead."""
        now = self.clock()
        policy = self.policy
        with self._tx() as db:
            expired = db.execute(
                "SELECT * FROM outbox WHERE state = 'committing' AND destination = ? "
                "AND commit_requested_at IS NOT NULL AND commit_requested_at <= ?",
                (destination, now - policy.commitment_timeout_s),
            ).fetchall()
            dead = {
                r["id"]: r for r in expired
                if r["commit_requests"] >= policy.commitment_max_requests
            }  # fmt: skip
            error = (
                f"{_NO_REPORT} {destination} for "
                f"{policy.commitment_max_requests} requests ({policy.commitment_timeout_s:g} s "
                "each): the PACS may not have kept the object"
            )
            db.executemany(
                "UPDATE outbox SET state = 'dead', last_error = ?, updated_at = ? WHERE id = ?",
                [(error, now, row_id) for row_id in dead],
            )
            db.executemany(
                "UPDATE outbox SET commit_requested_at = NULL, next_attempt_at = ?, "
                "updated_at = ? WHERE id = ?",
                [(now, now, r["id"]) for r in expired if r["id"] not in dead],
            )
            db.execute(_FORGET_SETTLED)
            rows = db.execute(
                "SELECT * FROM outbox WHERE state = 'committing' AND destination = ? "
                "AND commit_requested_at IS NULL AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (destination, now, limit),
            ).fetchall()
        if dead:  # one line for them all: a request lists up to a thousand objects
            logger.error(
                "outbox: %d deliveries to %s are dead (%s): %s", len(dead), destination,
                _some([str(r["sop_instance_uid"]) for r in dead.values()]), error,
                extra=_job_extra(str(r["job"]) for r in dead.values()),
            )  # fmt: skip
        if len(expired) > len(dead):
            logger.warning(
                "outbox: %d objects at %s had no storage commitment report after %g s: asking "
                "again", len(expired) - len(dead), destination, policy.commitment_timeout_s,
            )  # fmt: skip
        return [_item(r) for r in rows]

    def begin_commitment(self, items: Sequence[OutboxItem], transaction_uid: str) -> None:
        """Record that ``transaction_uid`` asks for ``items`` (before the request goes out: the
        report may come back before the request's response)."""
        now = self.clock()
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET commit_requested_at = ?, commit_requests = "
                "commit_requests + 1, updated_at = ? WHERE id = ?",
                [(now, now, item.id) for item in items],
            )
            db.executemany(
                "INSERT OR IGNORE INTO commitments (transaction_uid, outbox_id, requested_at) "
                "VALUES (?, ?, ?)",
                [(transaction_uid, item.id, now) for item in items],
            )

    def commitment_not_requested(
        self,
        items: Sequence[OutboxItem],
        error: str,
        *,
        permanent: bool = False,
        aborted: bool = False,
        refused: str = "",
    ) -> list[OutboxItem]:
        """The request did not reach the peer (or was refused): the rows ask again after the
        back-off, a failed attempt each, or go dead when ``permanent``. ``aborted``: the peer
        aborted the request (:class:`~dicom_node.commitment.CommitmentAborted`); a row whose
        last :data:`ABORTS_REFUSE` requests were all aborted goes dead with ``refused`` (the
        error of a refusal), as if the peer had refused it with a status. One log line for
        them all."""
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET commit_requests = max(commit_requests - 1, 0), "
                "commit_aborts = CASE WHEN ? THEN commit_aborts + 1 ELSE 0 END WHERE id = ?",
                [(aborted, item.id) for item in items],
            )
            aborts = {
                int(r["id"]): int(r["commit_aborts"])
                for r in db.execute(
                    f"SELECT id, commit_aborts FROM outbox WHERE id IN "
                    f"({','.join('?' * len(items))})",
                    [item.id for item in items],
                )
            } if items else {}  # fmt: skip
        at = self.clock()  # the rows are due again together
        updated = []
        for item in items:
            refuse = aborted and bool(refused) and aborts.get(item.id, 0) >= ABORTS_REFUSE
            updated.append(
                self.mark_failed(
                    item,
                    refused if refuse else error,
                    permanent=permanent or refuse,
                    retry_state="committing",
                    quiet=True,
                    at=at,
                )
            )
        _log_commitment_failure(updated, at)
        return updated

    def commitment_accepted(self, items: Sequence[OutboxItem]) -> None:
        """The peer accepted a request for ``items``: the requests it aborted before are no
        longer "in a row"."""
        again = [item.id for item in items if item.commit_aborts]
        if again:
            with self._tx() as db:
                db.executemany(
                    "UPDATE outbox SET commit_aborts = 0 WHERE id = ?", [(i,) for i in again]
                )

    def settle_without_commitment(self, destination: str) -> int:
        """``destination`` no longer does storage commitment (the setting was turned off): what
        it acknowledged and still waits for a report counts as delivered. Returns how many."""
        now = self.clock()
        with self._tx() as db:
            rows = db.execute(
                "SELECT sop_instance_uid FROM outbox WHERE state = 'committing' "
                "AND destination = ?",
                (destination,),
            ).fetchall()
            db.execute(
                "UPDATE outbox SET state = 'sent', updated_at = ? WHERE state = 'committing' "
                "AND destination = ?",
                (now, destination),
            )
        for r in rows:
            self._drop_object_if_done(r["sop_instance_uid"])
        if rows:
            logger.warning(
                "outbox: %s has storage_commitment: false now; %d objects it acknowledged count "
                "as delivered without waiting for its commitment", destination, len(rows),
            )  # fmt: skip
        return len(rows)

    def apply_report(self, report: CommitmentReport) -> dict[str, int]:
        """Apply a storage commitment report: committed rows are delivered, failed ones are
        sent again (or dead, for a reason a resend cannot change, or the second time the peer
        says it does not hold what it had stored: :data:`NOT_HELD_LIMIT`). Rows no longer
        waiting for a commitment are left as they are. Returns the counts (committed, failed,
        unknown: UIDs the transaction did not list, waiting: rows of the transaction still
        waiting). What was not kept is logged in one line per Failure Reason (one for the
        whole transaction when the peer holds none of its objects), not per object."""
        with self._lock:
            rows = self._db.execute(
                "SELECT o.* FROM outbox o JOIN commitments c ON c.outbox_id = o.id "
                "WHERE c.transaction_uid = ?",
                (report.transaction_uid,),
            ).fetchall()
        counts = {"committed": 0, "failed": 0, "unknown": 0, "waiting": 0}
        if not rows:
            logger.warning(
                "outbox: storage commitment report from %s for transaction %s, which this node "
                "did not request (or no longer has): ignored", report.caller or "?",
                report.transaction_uid,
            )  # fmt: skip
            counts["unknown"] = len(report.committed) + len(report.failed)
            return counts
        by_uid = {r["sop_instance_uid"]: _item(r) for r in rows}
        destination = rows[0]["destination"]
        now = self.clock()
        # a row that went dead waiting for this report (the PACS answered late) is committed
        # all the same: what the PACS says it keeps is delivered
        committed = [
            by_uid[uid] for uid in report.committed
            if uid in by_uid and by_uid[uid].state in ("committing", "dead")
        ]  # fmt: skip
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET state = 'sent', committed_at = ?, updated_at = ?, "
                "last_error = NULL WHERE id = ? AND state IN ('committing', 'dead')",
                [(now, now, item.id) for item in committed],
            )
        for item in committed:
            self._drop_object_if_done(item.sop_instance_uid)
        revived = sum(item.state == "dead" for item in committed)
        if revived:
            logger.warning(
                "outbox: %d objects at %s that had gone dead for want of a storage commitment "
                "report are committed by a late report (transaction %s): delivered", revived,
                destination, report.transaction_uid, extra={"job": rows[0]["job"]},
            )  # fmt: skip
        counts["committed"] = len(committed)
        failed = [
            (by_uid[uid], reason) for uid, reason in report.failed
            if uid in by_uid and by_uid[uid].state == "committing"
        ]  # fmt: skip
        # the peer acknowledged these by C-STORE (they wait in committing) and now says it does
        # not hold them: counted, so that a PACS that keeps them under other UIDs is not sent
        # the same objects for ever
        not_held = [item for item, reason in failed if reason == NO_SUCH_OBJECT_INSTANCE]
        if not_held:
            with self._tx() as db:
                db.executemany(
                    "UPDATE outbox SET not_held = not_held + 1 WHERE id = ?",
                    [(item.id,) for item in not_held],
                )
        outcomes: dict[int | None, list[OutboxItem]] = {}
        for item, reason in failed:
            error = (
                f"{destination} did not commit to keeping it: failure reason "
                f"{describe_reason(reason)}"
            )
            permanent = reason in PERMANENT_REASONS
            if reason == NO_SUCH_OBJECT_INSTANCE and item.not_held + 1 >= NOT_HELD_LIMIT:
                error = _not_held_error(destination, item.last_status)
                permanent = True
            elif reason == NO_SUCH_OBJECT_INSTANCE:
                error += " after storing it: sent once more (a file lost can happen once)"
            updated = self.mark_failed(
                item, error, status=reason, permanent=permanent, quiet=True, at=now
            )
            outcomes.setdefault(reason, []).append(updated)
            counts["failed"] += 1
        with self._tx() as db:
            db.execute(_FORGET_SETTLED)
        whole = len(outcomes.get(NO_SUCH_OBJECT_INSTANCE, [])) == len(rows)
        for reason, updated_items in outcomes.items():
            _log_not_kept(destination, report.transaction_uid, reason, updated_items, whole)
        listed = set(report.committed) | {uid for uid, _ in report.failed}
        counts["unknown"] = len(listed - set(by_uid))
        counts["waiting"] = sum(
            1 for uid, item in by_uid.items() if uid not in listed and item.state == "committing"
        )
        logger.info(
            "outbox: storage commitment report from %s for %s (transaction %s): %d committed, "
            "%d not kept, %d not listed and still waiting%s", report.caller or "?", destination,
            report.transaction_uid, counts["committed"], counts["failed"], counts["waiting"],
            f", {counts['unknown']} objects the request did not list" if counts["unknown"] else "",
            extra={"job": rows[0]["job"]},
        )  # fmt: skip
        return counts

    # -- queries ----------------------------------------------------------------------------

    def items(
        self, *, state: str | None = None, destination: str | None = None
    ) -> list[OutboxItem]:
        sql = "SELECT * FROM outbox WHERE 1 = 1"
        args: list[object] = []
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        if destination is not None:
            sql += " AND destination = ?"
            args.append(destination)
        with self._lock:
            return [_item(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def undelivered(self, job: str) -> int:
        """How many of ``job``'s objects are not (yet) delivered to a destination: pending,
        being sent, waiting for a commitment or dead (0 when everything was sent, withdrawn or
        rejected, or nothing was queued)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE job = ? AND state NOT IN "
                "('sent', 'withdrawn', 'rejected')",
                (job,),
            ).fetchone()
        return int(row[0])

    def forget_jobs(self, jobs: Sequence[str], *, dry_run: bool = False) -> int | None:
        """Delete every row of ``jobs`` (their results delivered, withdrawn or rejected), their
        recorded patient and study attributes, and any object file no row needs any more; the
        rows deleted (in a dry run: that would be). None, deleting nothing, when one of those
        results still waits (pending, being sent, waiting for a commitment, dead) or a
        replacement not yet applied names one of the jobs: the outbox still has work with
        them."""
        if not jobs:
            return 0
        wanted = {str(j) for j in jobs}
        marks = ",".join("?" * len(wanted))
        args = sorted(wanted)
        with self._tx() as db:
            waiting = db.execute(
                f"SELECT COUNT(*) FROM outbox WHERE job IN ({marks}) AND state NOT IN "
                f"({','.join('?' * len(SETTLED))})",
                [*args, *SETTLED],
            ).fetchone()[0]
            if waiting:
                return None
            for rep in db.execute("SELECT job, earlier_jobs FROM replacements"):
                if str(rep["job"]) in wanted or wanted & {str(j) for j in json.loads(rep[1])}:
                    return None
            if dry_run:
                row = db.execute(f"SELECT COUNT(*) FROM outbox WHERE job IN ({marks})", args)
                return int(row.fetchone()[0])
            names = {  # by file name: a row made by an earlier version holds a whole path
                Path(str(r["path"])).name
                for r in db.execute(f"SELECT path FROM outbox WHERE job IN ({marks})", args)
            }
            shared = {  # an object another job queued too is left to that job's rows
                Path(str(r["path"])).name
                for r in db.execute(f"SELECT path FROM outbox WHERE job NOT IN ({marks})", args)
            }
            deleted = db.execute(f"DELETE FROM outbox WHERE job IN ({marks})", args).rowcount
            db.execute(f"DELETE FROM job_studies WHERE job IN ({marks})", args)
            db.execute(_FORGET_SETTLED)
        for name in names - shared:  # settled objects were mostly removed already
            with contextlib.suppress(FileNotFoundError):
                (self.objects_dir / name).unlink()
        return int(deleted)

    def counts(self, job: str | None = None) -> dict[str, dict[str, int]]:
        """``{destination: {state: count}}``, of one ``job``'s objects when given."""
        out: dict[str, dict[str, int]] = {}
        where, args = ("WHERE job = ? ", (job,)) if job is not None else ("", ())
        with self._lock:
            for r in self._db.execute(
                f"SELECT destination, state, COUNT(*) AS n FROM outbox {where}"
                "GROUP BY destination, state",
                args,
            ):
                out.setdefault(r["destination"], {})[r["state"]] = int(r["n"])
        return out

    def oldest_waiting(self) -> dict[str, float]:
        """``{destination: seconds}`` since the oldest object still on its way there (pending,
        being sent or waiting for a storage commitment) was queued; destinations with nothing
        on the way are left out. What an alert on stuck deliveries watches."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, MIN(created_at) AS t FROM outbox "
                "WHERE state IN ('pending', 'sending', 'committing') GROUP BY destination"
            ).fetchall()
        now = self.clock()
        return {r["destination"]: max(0.0, now - float(r["t"])) for r in rows}

    def next_due(self, destination: str | None = None) -> float | None:
        """Time of the earliest pending attempt or commitment request (a new one, or one whose
        report is overdue), of one ``destination`` when given, or None when nothing waits."""
        where, args = (
            ("AND destination = ? ", (destination,)) if destination is not None else ("", ())
        )
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(CASE WHEN state = 'committing' AND commit_requested_at IS NOT NULL "
                "THEN commit_requested_at + ? ELSE next_attempt_at END) AS t FROM outbox "
                f"WHERE state IN ('pending', 'committing') {where}",
                (self.policy.commitment_timeout_s, *args),
            ).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    def object_file(self, item: OutboxItem) -> Path:
        """Where ``item``'s object is: in this outbox's folder, by its file name. A row holds
        the name alone (one an earlier version made holds a whole path, of which the name is
        used): a data folder restored or moved elsewhere sends its own copies, and never
        reads or deletes those of the folder it was copied from."""
        return self.objects_dir / Path(item.path).name

    def load(self, item: OutboxItem) -> Dataset:
        path = self.object_file(item)
        try:
            return dcmread(path)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read outbox object {path}: {exc}") from exc

    def _drop_object_if_done(self, sop_instance_uid: str) -> None:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, path FROM outbox WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchall()
        if rows and all(r["state"] in SETTLED for r in rows):
            with contextlib.suppress(FileNotFoundError):
                (self.objects_dir / Path(rows[0]["path"]).name).unlink()


def _study_json(ds: Dataset) -> str:
    """``ds``'s patient and study attributes as DICOM JSON (what a rejection note copies)."""
    attributes = Dataset()
    for keyword in _STUDY_KEYWORDS:
        if keyword in ds:  # as text: highdicom's DA and TM values are objects
            elem = ds[keyword]
            text = [str(v) for v in elem.value] if elem.VM > 1 else str(elem.value or "")
            attributes.add_new(elem.tag, elem.VR, text)
    return str(attributes.to_json())


def _insert(
    db: sqlite3.Connection, ds: Dataset, destination: str, job: str, path: Path, now: float
) -> int:
    """Queue ``ds`` (written at ``path``, in the outbox's folder: the row holds its name) for
    ``destination``; 0 when it was queued already."""
    return db.execute(
        "INSERT OR IGNORE INTO outbox (sop_instance_uid, sop_class_uid, series_instance_uid, "
        "destination, job, path, state, attempts, next_attempt_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
        (str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID), destination,
         job, path.name, now, now, now),
    ).rowcount  # fmt: skip


def _item(row: sqlite3.Row, state: str | None = None) -> OutboxItem:
    return OutboxItem(
        id=int(row["id"]),
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        series_instance_uid=row["series_instance_uid"],
        destination=row["destination"],
        job=row["job"],
        path=row["path"],
        state=state or row["state"],
        attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"]),
        last_error=row["last_error"],
        last_status=row["last_status"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        sent_at=_time(row["sent_at"]),
        commit_requested_at=_time(row["commit_requested_at"]),
        commit_requests=int(row["commit_requests"]),
        committed_at=_time(row["committed_at"]),
        not_held=int(row["not_held"]),
        commit_aborts=int(row["commit_aborts"]),
    )


def _time(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


#: sends a batch to a destination, one result per object; ``on_result`` (keyword) is told of
#: each result as it comes, when the store can
StoreFn = Callable[..., list[StoreResult]]
#: how many objects one storage commitment request lists at most
COMMITMENT_BATCH = 1000


def deliver_due(
    outbox: Outbox,
    destinations: Sequence[Destination],
    *,
    calling_ae: str = "GLIOFORECAST",
    batch_size: int = 500,
    store: StoreFn | None = None,
    audit: AuditTrail | NoAuditTrail | None = None,
    stopping: Callable[[], bool] = lambda: False,
    timeout_s: float = 60.0,
) -> DeliveryReport:
    """One pass: for each destination, send its due rows over one association per batch;
    what each batch delivered, and what it did not, goes to ``audit``. When ``stopping`` says
    so (the node stops), the pass ends after the object being sent: the rows not sent are
    pending again, their attempt not counted. ``timeout_s``: how long a DICOM destination may
    take to answer each request (``sending.response_timeout_s``)."""
    report = DeliveryReport()

    def default_store(
        datasets: Sequence[Dataset],
        dest: Destination,
        on_result: Callable[[StoreResult], None] | None = None,
    ) -> list[StoreResult]:
        if dest.url:  # a DICOMweb service
            return stow_batch(datasets, dest, stopping=stopping)
        return store_batch(
            datasets, dest, calling_ae=calling_ae, stopping=stopping,
            dimse_timeout_s=timeout_s, network_timeout_s=timeout_s, on_result=on_result,
        )  # fmt: skip

    send = store or default_store
    for dest in destinations:
        note = rejection_note(calling_ae) if dest.reject_replaced else None
        report.replaced.extend(outbox.apply_replacements(dest.name, note))
        while not stopping():
            items = outbox.claim(dest.name, limit=batch_size)
            if not items:
                break
            _deliver_batch(
                outbox, dest, items, send, report, audit or NoAuditTrail(), calling_ae, stopping
            )
            if len(items) < batch_size:
                break
        if dest.storage_commitment:
            request_commitments(outbox, dest, report, calling_ae=calling_ae, timeout_s=timeout_s)
        else:
            outbox.settle_without_commitment(dest.name)
    return report


def rejection_note(node_ae_title: str) -> NoteBuilder:
    """The :data:`NoteBuilder` of a node: IHE IOCM rejection notes (:mod:`sr_writer.rejection`)."""

    def build(study: Dataset, job: str, delivered: Sequence[OutboxItem], reason: str) -> Dataset:
        from dicom_node import __version__
        from dicom_node.pipeline import patient_study
        from sr_writer.rejection import Rejected, build_rejection_note

        return build_rejection_note(
            patient_study(study),
            [Rejected(i.sop_class_uid, i.sop_instance_uid, i.series_instance_uid)
             for i in delivered],
            job=job, node_ae_title=node_ae_title, node_version=__version__, reason=reason,
        )  # fmt: skip

    return build


def request_commitments(
    outbox: Outbox,
    dest: Destination,
    report: DeliveryReport,
    *,
    calling_ae: str,
    timeout_s: float = 60.0,
) -> None:
    """Ask ``dest`` to commit to keeping what it acknowledged and has not been asked about (one
    request per :data:`COMMITMENT_BATCH` objects, each under a new Transaction UID)."""
    while True:
        items = outbox.commitment_due(dest.name, limit=COMMITMENT_BATCH)
        if not items:
            return
        transaction = f"2.25.{uuid.uuid4().int}"  # a random UUID as a UID (PS3.5 B.2)
        outbox.begin_commitment(items, transaction)
        try:
            commitment.request(
                dest,
                transaction,
                [(i.sop_class_uid, i.sop_instance_uid) for i in items],
                calling_ae=calling_ae,
                timeout_s=timeout_s,
                on_report=outbox.apply_report,  # a PACS that reports on this association
            )
        except SendError as exc:
            aborted = isinstance(exc, commitment.CommitmentAborted)
            # a peer that aborts every request does not take them from us: after a few in a
            # row, a refusal (dead at once) rather than a failure retried for hours
            refused = commitment.refusal(
                dest,
                f"that it aborted the request {ABORTS_REFUSE} times in a row (A-ABORT right "
                "after the N-ACTION, no response): it may not allow storage commitment from AE "
                f"{calling_ae}",
            )
            for updated in outbox.commitment_not_requested(
                items,
                str(exc),
                permanent=isinstance(exc, commitment.CommitmentRefused),
                aborted=aborted,
                refused=str(refused) if aborted else "",
            ):
                _count_failure(report, updated, updated.last_error or str(exc))
            return
        outbox.commitment_accepted(items)
        report.commitment_requests += 1
        logger.info(
            "outbox: asked %s to commit to keeping %d objects (transaction %s)",
            dest.name, len(items), transaction,
        )  # fmt: skip
        if len(items) < COMMITMENT_BATCH:
            return


def _deliver_batch(
    outbox: Outbox,
    dest: Destination,
    items: list[OutboxItem],
    send: StoreFn,
    report: DeliveryReport,
    audit: AuditTrail | NoAuditTrail,
    calling_ae: str,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    loaded: list[tuple[OutboxItem, Dataset]] = []
    for item in items:
        try:
            loaded.append((item, outbox.load(item)))
        except StorageError as exc:
            outbox.mark_failed(item, str(exc), permanent=True)
            report.dead += 1
            report.errors.append(str(exc))
    if not loaded:
        return
    at = outbox.clock()  # the batch's rows fail together, and are due again together
    tally = TransferTally(active=audit.enabled)
    by_uid_item = {item.sop_instance_uid: (item, ds) for item, ds in loaded}
    settled: set[str] = set()

    def settle(result: StoreResult) -> None:
        """Record one object's outcome as soon as it is known: a node killed in the middle of
        a batch sends again only what was not acknowledged."""
        found = by_uid_item.get(result.sop_instance_uid)
        if found is None or result.sop_instance_uid in settled:
            return
        item, ds = found
        settled.add(result.sop_instance_uid)
        if result.delivered:
            outbox.mark_sent(item, result.status, commit=dest.storage_commitment)
            report.sent += 1
            tally.add(ds, item.sop_class_uid)
            return
        msg = result.error or "unknown failure"
        updated = outbox.mark_failed(
            item, msg, status=result.status, permanent=result.permanent, at=at
        )
        _count_failure(report, updated, msg)
        tally.add(ds, item.sop_class_uid, msg)

    try:
        results = send([ds for _, ds in loaded], dest, on_result=settle)
    except Exception as exc:  # a claimed row must never stay "sending"
        msg = str(exc) if isinstance(exc, SendError) else f"unexpected {type(exc).__name__}: {exc}"
        if not isinstance(exc, SendError):
            logger.exception("outbox: sending a batch to %s failed unexpectedly", dest.name)
        # a destination that accepts none of the classes will not accept them later either:
        # dead at once, as an object whose class alone it refuses (not 50 attempts, 7 hours)
        refused = isinstance(exc, ContextsRejected)
        updated_items = [
            outbox.mark_failed(item, msg, quiet=True, permanent=refused, at=at)
            for item, _ in loaded
            if item.sop_instance_uid not in settled
        ]
        for updated in updated_items:
            _count_failure(report, updated, msg)
            settled.add(updated.sop_instance_uid)
        _log_batch_failure(dest.name, updated_items, msg, outbox.clock())
        results = []
    for result in results:  # those the store did not report as it went
        settle(result)
    not_sent = [item for item, _ in loaded if item.sop_instance_uid not in settled]
    if not_sent and stopping():  # the node stops: sent another time, no attempt counted
        outbox.release(not_sent)
    elif not_sent:
        for item in not_sent:
            msg = f"{dest} gave no result for {item.sop_instance_uid}"
            _count_failure(report, outbox.mark_failed(item, msg, at=at), msg)
            tally.add(by_uid_item[item.sop_instance_uid][1], item.sop_class_uid, msg)
    if tally:
        node = Participant(calling_ae, audit.node.host, True, ROLE_SOURCE)
        peer = Participant(dest.ae_title or dest.url, dest.host, False, ROLE_DESTINATION)
        audit.transferred(node, peer, tally)


def _log_batch_failure(destination: str, items: list[OutboxItem], msg: str, now: float) -> None:
    """One line for a batch that failed as a whole (the destination down, the association
    refused), rather than one per object and attempt: thousands of lines for one study when
    a destination stayed down."""
    jobs = sorted({i.job for i in items if i.job})
    extra = {"job": jobs[0] if len(jobs) == 1 else "-"}
    waiting = [i for i in items if i.state != "dead"]
    dead = [i for i in items if i.state == "dead"]
    if waiting:
        attempts = sorted({i.attempts for i in waiting})
        delay = min(i.next_attempt_at for i in waiting) - now
        logger.warning(
            "outbox: %d deliver%s to %s failed (attempt %s), retry in %.1f s: %s",
            len(waiting), "y" if len(waiting) == 1 else "ies", destination,
            str(attempts[0]) if len(attempts) == 1 else f"{attempts[0]}-{attempts[-1]}",
            max(delay, 0.0), msg, extra=extra,
        )  # fmt: skip
    if dead:
        logger.error(
            "outbox: %d deliver%s to %s %s dead after %d attempts: %s",
            len(dead), "y" if len(dead) == 1 else "ies", destination,
            "is" if len(dead) == 1 else "are", max(i.attempts for i in dead), msg, extra=extra,
        )  # fmt: skip


def _some(uids: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` of ``uids``, and how many more: what a line on many objects names."""
    head = ", ".join(uids[:shown])
    return head + (f" and {len(uids) - shown} more" if len(uids) > shown else "")


def _job_extra(jobs: Iterable[str]) -> dict[str, str]:
    """The log record's ``job``: the one job of the objects a line is about, or "-"."""
    found = sorted({j for j in jobs if j})
    return {"job": found[0] if len(found) == 1 else "-"}


def _log_commitment_failure(items: Sequence[OutboxItem], now: float) -> None:
    """One line for a storage commitment request that failed (up to a thousand objects), and
    one for the rows it made dead, rather than one per object and attempt: a PACS that aborts
    every request made hundreds of lines a minute."""
    if not items:
        return
    destination = items[0].destination
    extra = _job_extra(i.job for i in items)
    waiting = [i for i in items if i.state != "dead"]
    dead = [i for i in items if i.state == "dead"]
    if waiting:
        attempts = sorted({i.attempts for i in waiting})
        logger.warning(
            "outbox: storage commitment request for %d objects at %s failed (attempt %s), "
            "asking again in %.1f s (%s): %s", len(waiting), destination,
            str(attempts[0]) if len(attempts) == 1 else f"{attempts[0]}-{attempts[-1]}",
            max(min(i.next_attempt_at for i in waiting) - now, 0.0),
            _some([i.sop_instance_uid for i in waiting]), waiting[0].last_error, extra=extra,
        )  # fmt: skip
    if dead:
        logger.error(
            "outbox: %d deliver%s to %s %s dead after %d attempts (%s): %s", len(dead),
            "y" if len(dead) == 1 else "ies", destination, "is" if len(dead) == 1 else "are",
            max(i.attempts for i in dead), _some([i.sop_instance_uid for i in dead]),
            dead[0].last_error, extra=extra,
        )  # fmt: skip


def _not_held_error(destination: str, store_status: int | None) -> str:
    """The error of a row the peer stored, then reported not held, :data:`NOT_HELD_LIMIT`
    times."""
    status = "success" if store_status is None else f"status 0x{store_status:04X}"
    return (
        f"expected {destination} to hold the object it stored (C-STORE {status}) under the SOP "
        f"Instance UID it was sent, found that {destination} stored it and then reported it "
        "does not hold it (0x0112) twice: it may change SOP Instance UIDs on arrival (e.g. "
        "transcoding), which storage commitment cannot follow; turn storage_commitment off "
        "for it or stop the rewriting"
    )


def _log_not_kept(
    destination: str,
    transaction: str,
    reason: int | None,
    items: Sequence[OutboxItem],
    whole: bool,
) -> None:
    """One line for the objects of a report that ``destination`` did not commit to keeping
    for ``reason``; ``whole``: it holds none of the transaction's objects (0x0112 for each)."""
    dead = [i for i in items if i.state == "dead"]
    again = len(items) - len(dead)
    if whole:
        what = (
            f"{destination} holds none of the {len(items)} objects of transaction "
            f"{transaction}, which it had stored: failure reason {describe_reason(reason)} "
            "for each"
        )
    else:
        what = (
            f"{destination} did not commit to keeping {len(items)} objects of transaction "
            f"{transaction}: failure reason {describe_reason(reason)}"
        )
    if reason == NO_SUCH_OBJECT_INSTANCE:
        # one file lost is something else; several at once (Orthanc transcodes the images of
        # a transaction, and commits its SEG and SR) or twice the same are likely this
        if whole or dead or len(items) > 1:
            what += (
                "; it may change SOP Instance UIDs on arrival (e.g. transcoding), which "
                "storage commitment cannot follow"
            )
        outcome = f"{again} sent once more, {len(dead)} dead (reported not held twice)"
    else:
        outcome = f"{again} sent again, {len(dead)} dead"
    (logger.error if dead else logger.warning)(
        "outbox: %s; %s (%s)", what, outcome, _some([i.sop_instance_uid for i in items]),
        extra=_job_extra(i.job for i in items),
    )  # fmt: skip


def _count_failure(report: DeliveryReport, updated: OutboxItem, msg: str) -> None:
    if updated.state == "dead":
        report.dead += 1
    else:
        report.failed += 1
    report.errors.append(msg)


class OutboxSender:
    """Background delivery: one loop per destination, each sending that destination's due rows,
    then sleeping until its next is due. A destination that is slow or hangs (a PACS that takes
    the connection and never answers, one that answers each C-STORE after seconds) delays only
    its own deliveries: the others' results, the planning system's among them, keep going.

    ``wake()`` (e.g. after an enqueue) makes every loop look again at once; ``stop()`` ends
    them. Setting ``destinations`` (a configuration reload) starts a loop for each new
    destination and ends those of the destinations removed, after their pass under way.
    """

    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Destination],
        *,
        calling_ae: str = "GLIOFORECAST",
        poll_s: float = 5.0,
        audit: AuditTrail | NoAuditTrail | None = None,
        on_replaced: Callable[[Replaced], None] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.outbox = outbox
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s  # sending.response_timeout_s
        self.poll_s = poll_s
        self.audit = audit or NoAuditTrail()
        self.on_replaced = on_replaced  # told of each replacement that changed something
        self._loops: dict[str, _DestinationLoop] = {}
        self._loops_lock = threading.Lock()
        self._started = self._stopped = False
        self._destinations: dict[str, Destination] = {}
        self.destinations = destinations

    @property
    def destinations(self) -> list[Destination]:
        return list(self._destinations.values())

    @destinations.setter
    def destinations(self, destinations: Sequence[Destination]) -> None:
        self._destinations = {d.name: d for d in destinations}
        if self._started and not self._stopped:
            self._reconcile()

    def destination(self, name: str) -> Destination | None:
        """The current settings of destination ``name`` (None once removed)."""
        return self._destinations.get(name)

    def _reconcile(self) -> None:
        with self._loops_lock:
            for name in list(self._loops):
                if name not in self._destinations:
                    self._loops.pop(name).request_stop()  # its pass under way finishes
            for name in self._destinations:
                if name not in self._loops:
                    loop = _DestinationLoop(self, name)
                    self._loops[name] = loop
                    loop.start()

    def start(self) -> None:
        self.outbox.recover()
        self._started = True
        self._reconcile()

    def wake(self) -> None:
        with self._loops_lock:
            loops = list(self._loops.values())
        for loop in loops:
            loop.wake()

    def stop(self, timeout: float | None = 30) -> list[str]:
        """Stop every destination's loop: each ends after the object it is sending. Returns
        the destinations whose loop is still sending after ``timeout`` (a PACS slow to
        answer)."""
        self._stopped = True
        with self._loops_lock:
            loops = list(self._loops.values())
        for loop in loops:  # all at once: each ends after its pass under way
            loop.request_stop()
        for loop in loops:
            loop.stop(timeout)
        return [loop.name for loop in loops if loop.alive]

    @property
    def alive(self) -> bool:
        """True while every destination's loop runs (and with no destination, once started)."""
        with self._loops_lock:
            loops = list(self._loops.values())
        return self._started and not self._stopped and all(loop.alive for loop in loops)


class _DestinationLoop(BackgroundLoop):
    """The delivery loop of one destination of an :class:`OutboxSender`."""

    def __init__(self, sender: OutboxSender, name: str) -> None:
        super().__init__()
        self.sender = sender
        self.name = name
        self.thread_name = f"outbox-sender:{name}"

    def step(self) -> float:
        sender = self.sender
        dest = sender.destination(self.name)
        if dest is None:  # removed by a reload: the sender stops this loop
            return sender.poll_s
        try:
            report = deliver_due(
                sender.outbox, [dest], calling_ae=sender.calling_ae, audit=sender.audit,
                stopping=self.stopping, timeout_s=sender.timeout_s,
            )  # fmt: skip
            for replaced in report.replaced:
                if sender.on_replaced and (replaced.withdrawn or replaced.note or replaced.remark):
                    sender.on_replaced(replaced)
        except Exception:  # the loop must survive: the next pass retries
            logger.exception("outbox: delivery pass to %s failed", self.name)
        due = sender.outbox.next_due(self.name)
        if due is None:
            return sender.poll_s
        return max(0.0, min(sender.poll_s, due - sender.outbox.clock()))
