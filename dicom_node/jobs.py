"""Job state in SQLite (WAL): received instances, studies, jobs and their audit events.

The spool files are the truth about what was accepted; this database records what the node
knows about them and what it has done. :meth:`JobStore.reconcile` brings the two back in line
after a crash. Job creation is one transaction, so a crash never leaves half a job.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.uid import UID

from dicom_node.instance import InstanceInfo
from dicom_node.sqlite import Database
from sr_writer.labels import is_labelled_description

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_number INTEGER,
    series_description TEXT NOT NULL,
    protocol_name TEXT NOT NULL,
    sequence_name TEXT NOT NULL,
    contrast_agent INTEGER NOT NULL,
    frame_of_reference_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    assembled INTEGER NOT NULL DEFAULT 0,
    removed_at REAL,
    image_type TEXT NOT NULL DEFAULT '',
    patient_key TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid, assembled);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    removed_at REAL
);
CREATE INDEX IF NOT EXISTS studies_due ON studies(pending, last_received_at);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_key);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_instance_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS job_instances (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS job_series (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    series_instance_uid TEXT NOT NULL,
    role TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, series_instance_uid)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS rejected_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    note_uid TEXT NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rejected_note ON rejected_instances(note_uid);
CREATE INDEX IF NOT EXISTS job_instances_sop ON job_instances(sop_instance_uid);
-- what retention forgot, as totals: the job duration summary counts forgotten jobs too
CREATE TABLE IF NOT EXISTS forgotten (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retrievals (
    study_instance_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    first_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    finished_at REAL,
    came INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL DEFAULT ''
);
"""
# an instance a job may use: in the spool, and not rejected by an IOCM rejection note
_USABLE = (
    "removed_at IS NULL AND sop_instance_uid NOT IN (SELECT sop_instance_uid FROM "
    "rejected_instances)"
)

# a job's row with its instance count and patient key, as _job reads it
_JOB_QUERY = (
    "SELECT j.*, (SELECT count(*) FROM job_instances ji WHERE ji.job_id = j.id), "
    "s.patient_key FROM jobs j JOIN studies s USING (study_instance_uid)"
)

# Job states. ``queued`` jobs wait for the pipeline; ``superseded`` jobs were replaced by a newer
# version of the same study (a late instance arrived); ``retrieving`` jobs wait for the PACS to
# send the RT objects their study lacks (dicom_node.retrieve).
QUEUED, RUNNING, DONE, FAILED, SUPERSEDED = "queued", "running", "done", "failed", "superseded"
RETRIEVING = "retrieving"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED, SUPERSEDED, RETRIEVING)


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    series_number: int | None
    series_description: str
    protocol_name: str
    sequence_name: str
    contrast_agent: bool
    frame_of_reference_uid: str
    instance_count: int
    last_received_at: float
    # the distinct ImageType values of its instances, "," between them ("" when absent)
    image_type: str = ""
    # the study it is in: another than the job's for a structure set, dose or registration
    # linked from the planning study ("" where not read)
    study_instance_uid: str = ""

    @property
    def text(self) -> str:
        """The text role rules match against."""
        return " | ".join(
            t for t in (self.series_description, self.protocol_name, self.sequence_name) if t
        )

    @property
    def image_type_values(self) -> set[str]:
        """Every value of every distinct ImageType of the series."""
        return {v.strip() for t in self.image_type.split(",") for v in t.split("\\") if v.strip()}

    @property
    def derived(self) -> bool:
        """True when an instance's ImageType says DERIVED (a reformat, a map, a projection)."""
        return any(t.startswith("DERIVED") for t in self.image_type.split(","))


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    version: int
    state: str
    reason: str
    created_at: float
    updated_at: float
    attempts: int
    instance_count: int
    patient_key: str


@dataclass(frozen=True)
class JobSeries:
    series: SeriesSummary
    role: str
    note: str


@dataclass(frozen=True)
class Event:
    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class RoleDecision:
    """What the assembler decided for one series of a new job."""

    series_instance_uid: str
    role: str  # a role name, or "" when the series has none
    note: str = ""


@dataclass(frozen=True)
class RetentionCandidate:
    """A study whose spool files retention may remove, with its latest job."""

    study_instance_uid: str
    job_id: int
    state: str
    last_received_at: float


@dataclass(frozen=True)
class ForgetCandidate:
    """A study whose files retention removed, whose records retention may forget."""

    study_instance_uid: str
    removed_at: float
    job_ids: tuple[int, ...]
    instance_rows: int


#: what a new copy of an instance replaces of the row of the copy it replaces
_REPLACED_COLUMNS = (
    "sop_class_uid", "study_instance_uid", "series_instance_uid", "modality", "series_number",
    "series_description", "protocol_name", "sequence_name", "contrast_agent",
    "frame_of_reference_uid", "transfer_syntax_uid", "path", "calling_ae", "received_at",
    "image_type", "patient_key",
)  # fmt: skip

#: columns added after the first release: (table, column, declaration)
MIGRATIONS = (
    ("instances", "removed_at", "REAL"),
    ("studies", "removed_at", "REAL"),
    ("instances", "image_type", "TEXT NOT NULL DEFAULT ''"),
    # '' for instances recorded before: they are left out of the check of one patient a study
    ("instances", "patient_key", "TEXT NOT NULL DEFAULT ''"),
)


def _add_columns(conn: sqlite3.Connection, columns: Sequence[tuple[str, str, str]]) -> None:
    """Add the missing ``columns`` to a database made by an earlier version."""
    for table, column, declaration in columns:
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise


class JobStore:
    """Thread-safe access to the job database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # NORMAL in WAL mode survives a process crash; after a power loss the last commits may
        # be lost, and reconcile() rebuilds them from the fsynced spool files.
        self._db = Database(path, SCHEMA, "job", synchronous="NORMAL")
        self._conn = self._db.conn
        _add_columns(self._conn, MIGRATIONS)
        self._lock = self._db.lock
        self.transaction = self._db.transaction
        self.close = self._db.close

    # ---------------------------------------------------------------- instances

    def record_instance(
        self,
        info: InstanceInfo,
        relative_path: str,
        calling_ae: str,
        received_at: float,
        *,
        reopens: bool = True,
        corrects: bool = False,
    ) -> bool:
        """Record a stored instance; False when it was already known (a duplicate). A copy of
        a known instance under another patient identity (Patient ID, Issuer of Patient ID) is
        not a duplicate: it is the correction of a misfiled instance, and takes its place
        (``corrects``: the caller found it so with :meth:`stored_instance`). Without
        ``reopens`` (what readers add to a study: presentation states, key images...) it makes
        a new study due for assembly (its job, failed for want of images, is then removed by
        retention in time), not a known one, which it cannot change."""
        with self.transaction() as db:
            if corrects:  # moved to another study: the one it leaves is assembled again
                db.execute(
                    "UPDATE studies SET pending = 1, last_received_at = max(last_received_at, ?) "
                    "WHERE study_instance_uid != ? AND study_instance_uid = (SELECT "
                    "study_instance_uid FROM instances WHERE sop_instance_uid = ? "
                    "AND removed_at IS NULL AND patient_key NOT IN ('', ?))",
                    (received_at, info.study_instance_uid, info.sop_instance_uid,
                     info.patient_key),
                )  # fmt: skip
            cur = db.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, "
                "study_instance_uid, series_instance_uid, modality, series_number, "
                "series_description, protocol_name, sequence_name, contrast_agent, "
                "frame_of_reference_uid, transfer_syntax_uid, path, calling_ae, received_at, "
                "image_type, patient_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                # an instance whose file retention removed is stored anew when sent again, and
                # a corrected copy under another patient replaces the one held (in its study,
                # or in the study it was moved to)
                "ON CONFLICT(sop_instance_uid) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in _REPLACED_COLUMNS)
                + ", assembled = 0, removed_at = NULL WHERE instances.removed_at IS NOT NULL "
                "OR (instances.patient_key != '' "
                "AND instances.patient_key != excluded.patient_key)",
                (
                    info.sop_instance_uid,
                    info.sop_class_uid,
                    info.study_instance_uid,
                    info.series_instance_uid,
                    info.modality,
                    info.series_number,
                    info.series_description,
                    info.protocol_name,
                    info.sequence_name,
                    int(info.contrast_agent),
                    info.frame_of_reference_uid,
                    info.transfer_syntax_uid,
                    relative_path,
                    calling_ae,
                    received_at,
                    info.image_type,
                    info.patient_key,
                ),
            )
            if cur.rowcount == 0:
                # a duplicate: its sender is still sending (an aborted transfer sent again
                # from the start), so a study still waiting for its quiet period waits on; a
                # study assembled already is not reopened
                db.execute(
                    "UPDATE studies SET last_received_at = max(last_received_at, ?) "
                    "WHERE study_instance_uid = ? AND pending = 1",
                    (received_at, info.study_instance_uid),
                )
                return False
            if is_labelled_description(info.series_description):
                # the node's own output routed back: stored, but it does not (re)open the
                # study, or every result sent to a forwarding PACS would start a new job
                db.execute(
                    "INSERT INTO studies (study_instance_uid, patient_key, first_received_at, "
                    "last_received_at, pending) VALUES (?,?,?,?,0) "
                    "ON CONFLICT(study_instance_uid) DO NOTHING",
                    (info.study_instance_uid, info.patient_key, received_at, received_at),
                )
                return True
            db.execute(
                "INSERT INTO studies (study_instance_uid, patient_key, first_received_at, "
                "last_received_at, pending) VALUES (?,?,?,?,1) ON CONFLICT(study_instance_uid) "
                + (
                    "DO UPDATE SET last_received_at = max(last_received_at, "
                    "excluded.last_received_at), pending = 1"
                    if reopens
                    else "DO NOTHING"
                ),
                (info.study_instance_uid, info.patient_key, received_at, received_at),
            )
            if corrects:  # the study's patient is the corrected one
                db.execute(
                    "UPDATE studies SET patient_key = ? WHERE study_instance_uid = ?",
                    (info.patient_key, info.study_instance_uid),
                )
            return True

    def known_paths(self) -> set[str]:
        with self._lock:
            return {
                r[0]
                for r in self._conn.execute("SELECT path FROM instances WHERE removed_at IS NULL")
            }

    def removed_paths(self) -> set[str]:
        """Spool paths of the instances retention removed (their rows kept, marked)."""
        with self._lock:
            return {
                r[0]
                for r in self._conn.execute(
                    "SELECT path FROM instances WHERE removed_at IS NOT NULL"
                )
            }

    def forget_instances(self, relative_paths: Sequence[str]) -> None:
        """Drop rows whose file disappeared from the spool (logged as an event)."""
        with self.transaction() as db:
            for rel in relative_paths:
                gone = db.execute("DELETE FROM instances WHERE path = ?", (rel,))
                _count_forgotten_instances(db, int(gone.rowcount))
                db.execute(
                    "INSERT INTO events (job_id, at, kind, message) VALUES (NULL, ?, ?, ?)",
                    (time.time(), "missing-file", f"spool file {rel} is gone; row removed"),
                )

    def job_instances(self, job_id: int) -> dict[str, list[tuple[str, str]]]:
        """A job's instances as (SOP Instance UID, spool-relative path), by series UID."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT i.series_instance_uid, i.sop_instance_uid, i.path FROM job_instances ji "
                "JOIN instances i USING (sop_instance_uid) WHERE ji.job_id = ? "
                "AND i.removed_at IS NULL ORDER BY i.path",
                (job_id,),
            ).fetchall()
        out: dict[str, list[tuple[str, str]]] = {}
        for series_uid, sop_uid, path in rows:
            out.setdefault(series_uid, []).append((sop_uid, path))
        return out

    def stored_instance(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """The patient key ('' when recorded before the node kept it) and the spool-relative
        path of an instance the spool holds, or None when it holds none."""
        with self._lock:
            row = self._conn.execute(
                "SELECT patient_key, path FROM instances WHERE sop_instance_uid = ? "
                "AND removed_at IS NULL",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def job_patients(self, job_id: int) -> dict[str, set[str]]:
        """The patients a job's instances name (keys of Patient ID and Issuer of Patient ID,
        :func:`dicom_node.instance.patient_key`), each with the series UIDs that name it.
        The node's own results routed back are no input, and name no patient here: a result
        an earlier version of the node sent without the issuer must not make the study two
        patients'."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT i.patient_key, i.series_instance_uid, i.series_description "
                "FROM job_instances ji JOIN instances i USING (sop_instance_uid) "
                "WHERE ji.job_id = ? AND i.patient_key != ''",
                (job_id,),
            ).fetchall()
        out: dict[str, set[str]] = {}
        for key, series_uid, description in rows:
            if not is_labelled_description(description or ""):
                out.setdefault(str(key), set()).add(str(series_uid))
        return out

    # ---------------------------------------------------------------- retention

    def retention_candidates(self) -> list[RetentionCandidate]:
        """Studies with instances in the spool whose latest job is done or failed, none of
        them waiting for assembly or the worker (:mod:`dicom_node.retention` decides)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT s.study_instance_uid, j.id, j.state, s.last_received_at FROM studies s "
                "JOIN jobs j ON j.study_instance_uid = s.study_instance_uid AND j.version = "
                "(SELECT max(version) FROM jobs WHERE study_instance_uid = s.study_instance_uid) "
                "WHERE s.pending = 0 AND j.state IN (?, ?) AND EXISTS (SELECT 1 FROM instances i "
                "WHERE i.study_instance_uid = s.study_instance_uid AND i.removed_at IS NULL) "
                "ORDER BY s.last_received_at",
                (DONE, FAILED),
            ).fetchall()
        return [RetentionCandidate(r[0], int(r[1]), r[2], float(r[3])) for r in rows]

    def remove_study_instances(
        self, candidate: RetentionCandidate, now: float, message: str
    ) -> list[str]:
        """Mark the study's instances removed (one transaction) and return their spool paths,
        unless the study changed since ``candidate`` was read (a new instance, a new job):
        then nothing, and the caller deletes nothing."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT pending, last_received_at, (SELECT max(id) FROM jobs WHERE "
                "study_instance_uid = ?) FROM studies WHERE study_instance_uid = ?",
                (candidate.study_instance_uid, candidate.study_instance_uid),
            ).fetchone()
            state = db.execute(
                "SELECT state FROM jobs WHERE id = ?", (candidate.job_id,)
            ).fetchone()
            if (
                row is None
                or row[0]
                or row[1] != candidate.last_received_at
                or row[2] != candidate.job_id
                or state is None
                or state[0] != candidate.state  # an operator's retry queued it meanwhile
            ):
                return []
            paths = [
                r[0]
                for r in db.execute(
                    "SELECT path FROM instances WHERE study_instance_uid = ? "
                    "AND removed_at IS NULL",
                    (candidate.study_instance_uid,),
                )
            ]
            db.execute(
                "UPDATE instances SET removed_at = ? WHERE study_instance_uid = ? "
                "AND removed_at IS NULL",
                (now, candidate.study_instance_uid),
            )
            db.execute(
                "UPDATE studies SET removed_at = ? WHERE study_instance_uid = ?",
                (now, candidate.study_instance_uid),
            )
            _event(db, candidate.job_id, "retention", message)
        return paths

    def study_paths_in_spool(self, study_uid: str) -> list[str]:
        """Spool paths of the study's instances whose files retention has not removed: what
        :meth:`remove_study_instances` would remove."""
        with self._lock:
            return [
                r[0]
                for r in self._conn.execute(
                    "SELECT path FROM instances WHERE study_instance_uid = ? "
                    "AND removed_at IS NULL",
                    (study_uid,),
                )
            ]

    def keep_instances(self, study_uid: str, relative_paths: Sequence[str], message: str) -> None:
        """Retention could not delete these files of the study: their rows are no longer
        marked removed (the next pass tries again), with an event saying so."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE instances SET removed_at = NULL WHERE path = ?",
                [(rel,) for rel in relative_paths],
            )
            db.execute(  # none of its files went: the study was not removed either
                "UPDATE studies SET removed_at = NULL WHERE study_instance_uid = ? AND NOT "
                "EXISTS (SELECT 1 FROM instances WHERE study_instance_uid = ? AND removed_at IS "
                "NOT NULL)",
                (study_uid, study_uid),
            )
            job = db.execute(
                "SELECT max(id) FROM jobs WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
            _event(db, job[0] if job else None, "retention", message)

    def study_sop_classes(self, study_uid: str) -> dict[str, int]:
        """The study's instances in the spool, counted by SOP class."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sop_class_uid, count(*) FROM instances WHERE study_instance_uid = ? "
                f"AND {_USABLE} GROUP BY sop_class_uid",
                (study_uid,),
            ).fetchall()
        return {str(uid): int(n) for uid, n in rows}

    def study_removed_at(self, study_uid: str) -> float | None:
        """When retention last removed instances of the study (None: never)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT removed_at FROM studies WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def no_such_job(self, job_id: int) -> str:
        """Why ``job_id`` names no job, in words: never made, or forgotten by retention (job ids
        are never reused, and only retention deletes jobs)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'jobs'"
            ).fetchone()
        if row is not None and 0 < job_id <= int(row[0]):
            return (
                f"no job {job_id}: its records were forgotten by retention "
                "(retention.forget_days after its study's files were removed)"
            )
        return f"no job {job_id}: expected the id of a job (jobs list)"

    def forget_candidates(self, removed_before: float) -> list[ForgetCandidate]:
        """Studies whose files retention removed at ``removed_before`` or earlier, with no
        instance in the spool since, none pending assembly and every job ended (done, failed
        or superseded), oldest removal first."""
        with self._lock:
            rows = self._conn.execute(
                f"{_FORGETTABLE} AND s.removed_at <= ? ORDER BY s.removed_at",
                (*_ENDED, removed_before),
            ).fetchall()
        return [ForgetCandidate(str(r[0]), float(r[1]), _ids(r[2]), int(r[3])) for r in rows]

    def forget_study(
        self, candidate: ForgetCandidate, release: Callable[[Sequence[int]], bool]
    ) -> int | None:
        """Delete the records of ``candidate``'s study: its instances, jobs, their series,
        instance lists and events, and its retrieval; the instance rows deleted. ``release``
        (called with the job ids inside the transaction) forgets what other stores hold of the
        jobs and says whether they may go. Nothing is deleted (None) when it says no or the study
        changed since ``candidate`` was read (an instance came, a job started)."""
        with self.transaction() as db:
            row = db.execute(
                f"{_FORGETTABLE} AND s.study_instance_uid = ?",
                (*_ENDED, candidate.study_instance_uid),
            ).fetchone()
            if row is None or row[1] != candidate.removed_at:
                return None
            jobs = _ids(row[2])
            if jobs != candidate.job_ids or not release(jobs):
                return None
            study = (candidate.study_instance_uid,)
            count, seconds = _durations(db, "AND j.study_instance_uid = ?", study)
            db.executemany(
                "INSERT INTO forgotten (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                [(_FORGOTTEN_DONE, count), (_FORGOTTEN_SECONDS, seconds), (_FORGOTTEN_STUDIES, 1)],
            )
            for table in ("events", "job_series", "job_instances"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(j,) for j in jobs])
            db.execute("DELETE FROM jobs WHERE study_instance_uid = ?", study)
            db.execute("DELETE FROM retrievals WHERE study_instance_uid = ?", study)
            deleted = db.execute("DELETE FROM instances WHERE study_instance_uid = ?", study)
            _count_forgotten_instances(db, int(deleted.rowcount))
            db.execute("DELETE FROM studies WHERE study_instance_uid = ?", study)
        return int(deleted.rowcount)

    # ---------------------------------------------------------------- studies and series

    def due_studies(self, now: float, quiet_period_s: float) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT study_instance_uid FROM studies WHERE pending = 1 "
                "AND last_received_at <= ? ORDER BY last_received_at",
                (now - quiet_period_s,),
            ).fetchall()
        return [r[0] for r in rows]

    def patient_studies(
        self, study_uid: str, since: float, sop_classes: Sequence[str]
    ) -> list[str]:
        """The patient's other studies (same patient key), last received at ``since`` or later,
        with an instance of one of ``sop_classes`` still in the spool; newest first."""
        marks = ",".join("?" * len(sop_classes))
        with self._lock:
            rows = self._conn.execute(
                "SELECT s2.study_instance_uid FROM studies s1 JOIN studies s2 "
                "ON s2.patient_key = s1.patient_key "
                "AND s2.study_instance_uid != s1.study_instance_uid "
                "WHERE s1.study_instance_uid = ? AND s2.last_received_at >= ? "
                "AND EXISTS (SELECT 1 FROM instances i "
                "WHERE i.study_instance_uid = s2.study_instance_uid AND i.removed_at IS NULL "
                "AND i.sop_instance_uid NOT IN (SELECT sop_instance_uid FROM rejected_instances) "
                f"AND i.sop_class_uid IN ({marks})) ORDER BY s2.last_received_at DESC",
                (study_uid, since, *sop_classes),
            ).fetchall()
        return [r[0] for r in rows]

    def series_paths(self, series_uid: str) -> list[str]:
        """Spool-relative paths of a series' instances still in the spool."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT path FROM instances WHERE series_instance_uid = ? AND {_USABLE} "
                "ORDER BY path",
                (series_uid,),
            ).fetchall()
        return [r[0] for r in rows]

    def latest_job_id(self, study_uid: str) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT max(id) FROM jobs WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def replaced_jobs(self, job_id: int) -> list[str]:
        """The ids (as the outbox writes them) of the jobs of ``job_id``'s study up to it, itself
        included: what its results replace (a notice of its own earlier failure too)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM jobs WHERE id <= ? AND study_instance_uid = "
                "(SELECT study_instance_uid FROM jobs WHERE id = ?) ORDER BY id",
                (job_id, job_id),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def record_rejection(
        self, note_uid: str, reason: str, sop_instance_uids: Sequence[str], at: float
    ) -> list[str]:
        """Record that an IOCM rejection note rejected these instances: no later job uses them,
        whether they are in the spool already or come later. Returns the studies assembled again
        (at the next pass after the quiet period): those holding one of the instances, and those
        whose latest job used one (a structure set linked from the planning CT's study)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO rejected_instances (sop_instance_uid, note_uid, reason, "
                "rejected_at) VALUES (?, ?, ?, ?)",
                [(uid, note_uid, reason, at) for uid in sorted(set(sop_instance_uids))],
            )
            # joins on the rows just written, not lists of UIDs: a note may reject a study of
            # more instances than SQLite takes parameters. The node's own results routed back (a
            # reader rejected a prediction in an IOCM PACS that forwards its notes) are no
            # input: they reopen nothing
            held = {
                study
                for study, description in db.execute(
                    "SELECT i.study_instance_uid, i.series_description FROM instances i "
                    "JOIN rejected_instances r USING (sop_instance_uid) WHERE r.note_uid = ?",
                    (note_uid,),
                )
                if not is_labelled_description(description)
            }
            used = {
                study
                for study, description in db.execute(
                    "SELECT j.study_instance_uid, i.series_description FROM rejected_instances r "
                    "JOIN job_instances ji USING (sop_instance_uid) JOIN jobs j ON j.id = "
                    "ji.job_id JOIN instances i USING (sop_instance_uid) WHERE r.note_uid = ? "
                    "AND j.id = (SELECT max(id) FROM jobs WHERE study_instance_uid = "
                    "j.study_instance_uid)",
                    (note_uid,),
                )
                if not is_labelled_description(description)
            }
            studies = sorted(held | used)
            for study_uid in studies:
                db.execute(
                    "UPDATE studies SET pending = 1, last_received_at = max(last_received_at, ?) "
                    "WHERE study_instance_uid = ?",
                    (at, study_uid),
                )
                row = db.execute(
                    "SELECT max(id) FROM jobs WHERE study_instance_uid = ?", (study_uid,)
                ).fetchone()
                _event(
                    db, row[0] if row else None, "reopened",
                    f"rejection note {note_uid} ({reason}) rejects instances this study used or "
                    "holds: it is run again without them",
                )  # fmt: skip
        return studies

    def rejection_reasons(self, study_uid: str) -> list[str]:
        """Why instances of the study were rejected (the titles of the rejection notes)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT r.reason FROM rejected_instances r JOIN instances i "
                "USING (sop_instance_uid) WHERE i.study_instance_uid = ? ORDER BY r.reason",
                (study_uid,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def reopen(self, study_uid: str, message: str) -> None:
        """Assemble a study again at the next pass (its instances unchanged), with an event on
        its latest job."""
        with self.transaction() as db:
            db.execute("UPDATE studies SET pending = 1 WHERE study_instance_uid = ?", (study_uid,))
            row = db.execute(
                "SELECT max(id) FROM jobs WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
            _event(db, row[0] if row else None, "reopened", message)

    def series_of_study(self, study_uid: str) -> list[SeriesSummary]:
        """The study's series, one per Series Instance UID: a series that holds instances of
        more than one SOP class (against the standard, one modality per series) is its
        :func:`principal` class; the job leaves the others out (:meth:`create_job`)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT series_instance_uid, sop_class_uid, modality, series_number, "
                "series_description, protocol_name, sequence_name, max(contrast_agent), "
                "frame_of_reference_uid, count(*), max(received_at), group_concat(DISTINCT "
                f"image_type) FROM instances WHERE study_instance_uid = ? AND {_USABLE} "
                "GROUP BY series_instance_uid, sop_class_uid "
                "ORDER BY series_number, series_instance_uid",
                (study_uid,),
            ).fetchall()
        groups = [_series(r) for r in rows]
        by_series: dict[str, list[tuple[str, int]]] = {}
        for g in groups:
            by_series.setdefault(g.series_instance_uid, []).append(
                (g.sop_class_uid, g.instance_count)
            )
        return [g for g in groups if g.sop_class_uid == principal(by_series[g.series_instance_uid])]

    # ---------------------------------------------------------------- retrievals

    def due_retrievals(self, now: float) -> list[Job]:
        """Jobs waiting for a retrieval (:mod:`dicom_node.retrieve`) whose next try is due."""
        with self._lock:
            rows = self._conn.execute(
                f"{_JOB_QUERY} WHERE j.state = ? AND NOT EXISTS (SELECT 1 FROM retrievals r "
                "WHERE r.study_instance_uid = j.study_instance_uid AND r.job_id = j.id "
                "AND (r.finished_at IS NOT NULL OR r.next_at > ?)) ORDER BY j.id",
                (RETRIEVING, now),
            ).fetchall()
        return [_job(r) for r in rows]

    def retrieval_outcome(self, study_uid: str) -> str | None:
        """What the study's last finished retrieval found, or None when none was made."""
        with self._lock:
            row = self._conn.execute(
                "SELECT outcome FROM retrievals WHERE study_instance_uid = ? "
                "AND finished_at IS NOT NULL",
                (study_uid,),
            ).fetchone()
        return None if row is None else str(row[0])

    def retrieval_failed_attempt(
        self, job_id: int, study_uid: str, next_at: float, why: str
    ) -> int:
        """Record a try that could not reach the PACS; returns the number of tries so far."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO retrievals (study_instance_uid, job_id, first_at, attempts, next_at) "
                "VALUES (?,?,?,1,?) ON CONFLICT(study_instance_uid) DO UPDATE SET "
                "attempts = CASE WHEN job_id = excluded.job_id AND finished_at IS NULL "
                "THEN attempts + 1 ELSE 1 END, "
                "job_id = excluded.job_id, next_at = excluded.next_at, finished_at = NULL",
                (study_uid, job_id, time.time(), next_at),
            )
            attempts = int(
                db.execute(
                    "SELECT attempts FROM retrievals WHERE study_instance_uid = ?", (study_uid,)
                ).fetchone()[0]
            )
            _event(db, job_id, "retrieve", f"attempt {attempts}: {why}")
        return attempts

    def finish_retrieval(
        self, job_id: int, study_uid: str, outcome: str, *, failed_reason: str | None = None
    ) -> None:
        """Record the study's retrieval as made, saying ``outcome``. With ``failed_reason``
        nothing came, and a job waiting for it fails with that reason (one that failed already
        stays as it is: :meth:`retrievals_to_repeat`); without, the study is assembled again
        after the quiet period, with what the PACS sent (the next version supersedes the
        job)."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO retrievals (study_instance_uid, job_id, first_at, next_at, "
                "finished_at, came, outcome) VALUES (?,?,?,0,?,?,?) "
                "ON CONFLICT(study_instance_uid) DO UPDATE SET job_id = excluded.job_id, "
                "finished_at = excluded.finished_at, came = excluded.came, "
                "outcome = excluded.outcome",
                (study_uid, job_id, now, now, int(failed_reason is None), outcome),
            )
            _event(db, job_id, "retrieved", outcome)
            if failed_reason is not None:
                cur = db.execute(
                    "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ? "
                    "AND state = ?",
                    (FAILED, failed_reason, now, job_id, RETRIEVING),
                )
                if cur.rowcount:
                    _event(db, job_id, FAILED, failed_reason)
            else:
                db.execute(
                    "UPDATE studies SET pending = 1, last_received_at = max(last_received_at, ?) "
                    "WHERE study_instance_uid = ?",
                    (now, study_uid),
                )

    def retrievals_to_repeat(
        self, asked_marker: str, every_s: float, within_s: float, now: float
    ) -> list[Job]:
        """Failed latest jobs (their reason holding ``asked_marker``: they failed for want of
        RT objects the PACS was asked for) of studies whose last retrieval, ``every_s`` ago or
        more, brought nothing, and whose first was less than ``within_s`` ago."""
        with self._lock:
            rows = self._conn.execute(
                f"{_JOB_QUERY} JOIN retrievals r ON r.study_instance_uid = j.study_instance_uid "
                "WHERE j.state = ? AND s.pending = 0 AND instr(j.reason, ?) > 0 "
                "AND j.id = (SELECT max(id) FROM jobs j2 "
                "WHERE j2.study_instance_uid = j.study_instance_uid) "
                "AND r.finished_at IS NOT NULL AND r.came = 0 AND r.finished_at <= ? "
                "AND r.first_at >= ? ORDER BY r.finished_at",
                (FAILED, asked_marker, now - every_s, now - within_s),
            ).fetchall()
        return [_job(r) for r in rows]

    def end_retrievals(self, reason: Callable[[str], str]) -> int:
        """Fail the jobs waiting for a retrieval (the node no longer asks a PACS), each with
        ``reason(its reason)``; returns how many."""
        now = time.time()
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, reason FROM jobs WHERE state = ?", (RETRIEVING,)
            ).fetchall()
            for job_id, waiting in rows:
                failed = reason(waiting)
                db.execute(
                    "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                    (FAILED, failed, now, job_id),
                )
                _event(db, job_id, FAILED, failed)
        return len(rows)

    def request_retrieval(self, job_id: int, reason: Callable[[str], str]) -> None:
        """Ask the PACS again for a failed job's RT objects (``jobs retrieve N``): the job waits
        for the node's next retrieval pass, its reason ``reason(the failed reason)``.
        ValueError when it is not the study's latest job, or not failed."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT study_instance_uid, state, id = (SELECT max(id) FROM jobs j2 WHERE "
                "j2.study_instance_uid = jobs.study_instance_uid), reason FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                raise KeyError(job_id)
            study_uid, state, latest, failed_reason = row
            if state != FAILED or not latest:
                raise ValueError(
                    f"job {job_id}: expected the failed latest job of its study, found "
                    f"{state}{'' if latest else ' (a newer version of the study exists)'}"
                )
            db.execute("DELETE FROM retrievals WHERE study_instance_uid = ?", (study_uid,))
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (RETRIEVING, reason(failed_reason), time.time(), job_id),
            )
            _event(db, job_id, RETRIEVING, "an operator asked for the RT objects again")

    # ---------------------------------------------------------------- jobs

    def create_job(
        self,
        study_uid: str,
        decisions: Sequence[RoleDecision],
        state: str,
        reason: str,
        linked_series: Sequence[str] = (),
    ) -> int:
        """Create the next job version of a study with all of its instances and those of
        ``linked_series`` (series of another study of the patient, :mod:`dicom_node.linking`),
        in one transaction. Every earlier version of the study becomes ``superseded``.
        """
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT coalesce(max(version), 0) FROM jobs WHERE study_instance_uid = ?",
                (study_uid,),
            ).fetchone()
            version = int(row[0]) + 1
            old = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE study_instance_uid = ? AND state != ?",
                    (study_uid, SUPERSEDED),
                )
            ]
            cur = db.execute(
                "INSERT INTO jobs (study_instance_uid, version, state, reason, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?)",
                (study_uid, version, state, reason, now, now),
            )
            job_id = int(cur.lastrowid or 0)
            for old_id in old:
                db.execute(
                    "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                    (SUPERSEDED, now, old_id),
                )
                _event(db, old_id, "superseded", f"superseded by job {job_id} (version {version})")
            db.execute(
                "INSERT INTO job_instances (job_id, sop_instance_uid) "
                "SELECT ?, sop_instance_uid FROM instances WHERE study_instance_uid = ? "
                f"AND {_USABLE}",
                (job_id, study_uid),
            )
            for series_uid in linked_series:
                db.execute(
                    "INSERT OR IGNORE INTO job_instances (job_id, sop_instance_uid) "
                    "SELECT ?, sop_instance_uid FROM instances WHERE series_instance_uid = ? "
                    f"AND {_USABLE}",
                    (job_id, series_uid),
                )
            set_aside = _set_aside_other_classes(db, job_id)
            db.execute(
                "UPDATE instances SET assembled = 1 WHERE study_instance_uid = ? AND assembled = 0",
                (study_uid,),
            )
            db.execute("UPDATE studies SET pending = 0 WHERE study_instance_uid = ?", (study_uid,))
            for d in decisions:
                db.execute(
                    "INSERT INTO job_series (job_id, series_instance_uid, role, note) "
                    "VALUES (?,?,?,?)",
                    (job_id, d.series_instance_uid, d.role, d.note),
                )
            count = db.execute(
                "SELECT count(*) FROM job_instances WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            _event(db, job_id, "created", f"version {version} with {count} instances; {state}")
            for note in set_aside:
                _event(db, job_id, "not used", note)
            for series_uid, description, n, note_uid, why in db.execute(
                "SELECT i.series_instance_uid, i.series_description, count(*), r.note_uid, "
                "r.reason FROM instances i JOIN rejected_instances r USING (sop_instance_uid) "
                "WHERE i.study_instance_uid = ? AND i.removed_at IS NULL "
                "GROUP BY i.series_instance_uid, r.note_uid ORDER BY i.series_instance_uid",
                (study_uid,),
            ).fetchall():
                _event(
                    db, job_id, "rejected",
                    f"{n} instance(s) of series {series_uid} ({description!r}) left out: rejected "
                    f"by the rejection note {note_uid} ({why})",
                )  # fmt: skip
            if reason:
                _event(db, job_id, state, reason)
        return job_id

    def set_roles(
        self, job_id: int, decisions: Sequence[RoleDecision], state: str, reason: str
    ) -> None:
        """Replace a job's series roles and state (used by retry, after the rules changed).
        Raises ValueError, changing nothing, unless the job is still failed, its study's latest
        job, with files in the spool: the running node (another process) may have made a newer
        version of the study, or retention removed its files, since the caller looked."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT j.state, (SELECT max(id) FROM jobs WHERE study_instance_uid = "
                "j.study_instance_uid), (SELECT count(*) FROM instances i WHERE "
                "i.study_instance_uid = j.study_instance_uid AND i.removed_at IS NULL) "
                "FROM jobs j WHERE j.id = ?",
                (job_id,),
            ).fetchone()
            if row is None or row[0] != FAILED or row[1] != job_id or not row[2]:
                why = (
                    "no such job" if row is None
                    else f"it is {row[0]} now" if row[0] != FAILED
                    else f"job {row[1]} is a newer version of its study" if row[1] != job_id
                    else "its instances were removed from the spool meanwhile (retention)"
                )  # fmt: skip
                raise ValueError(f"job {job_id}: not re-queued: {why}")
            db.execute("DELETE FROM job_series WHERE job_id = ?", (job_id,))
            for d in decisions:
                db.execute(
                    "INSERT INTO job_series (job_id, series_instance_uid, role, note) "
                    "VALUES (?,?,?,?)",
                    (job_id, d.series_instance_uid, d.role, d.note),
                )
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, attempts = 0 WHERE id = ?",
                (state, reason, time.time(), job_id),
            )
            _event(db, job_id, "retry", f"re-queued by an operator; now {state} {reason}".strip())

    def update_series(
        self, job_id: int, changes: Sequence[tuple[str, str, str]], kind: str, message: str
    ) -> None:
        """Set the role and note of some of a job's series (``(series UID, role, note)``), with
        an event of ``kind`` saying ``message`` (none when ``kind`` is empty, nor when the job
        has it already: a job run again after its process died finds the same): the pipeline
        found another series than the one chosen at assembly to be the one to use, or none."""
        with self.transaction() as db:
            for uid, role, note in changes:
                db.execute(
                    "UPDATE job_series SET role = ?, note = ? WHERE job_id = ? "
                    "AND series_instance_uid = ?",
                    (role, note, job_id, uid),
                )
            if kind:
                _event(db, job_id, kind, message, once=True)

    def set_state(self, job_id: int, state: str, reason: str = "") -> bool:
        """Move a job to ``state``; False (and an event) when it was superseded meanwhile.

        ``superseded`` is final: the outcome of a run that ended after a newer version of the
        study was created is recorded as an event but does not bring the job back.
        """
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state != ?",
                (state, reason, time.time(), job_id, SUPERSEDED),
            )
            if cur.rowcount == 0:
                _event(db, job_id, "ignored", f"superseded; outcome not applied: {state} {reason}")
                return False
            _event(db, job_id, state, reason or state)
            return True

    def claim_next(self) -> int | None:
        """Mark the oldest queued job running and return its id (None when none is queued)."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
                (RUNNING, time.time(), row[0]),
            )
            _event(db, row[0], RUNNING, "started")
            return int(row[0])

    def requeue_waiting(self, job_id: int, reason: str, event: str = "waiting") -> bool:
        """Queue a running job again without counting its attempt (it could not store its
        results, or the node stopped under it: the node's doing, not the study's), with an
        ``event``; False when it was superseded meanwhile."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, reason = ?, attempts = max(attempts - 1, 0), "
                "updated_at = ? WHERE id = ? AND state = ?",
                (QUEUED, reason, time.time(), job_id, RUNNING),
            )
            if cur.rowcount == 0:
                return False
            _event(db, job_id, event, reason)
            return True

    def requeue_running(self, why: str = "a stop or crash", *, count_attempt: bool = True) -> int:
        """Queue again the jobs ``why`` interrupted; returns how many. Without
        ``count_attempt`` their attempt is not counted (the node failed, not the study)."""
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,))]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = ?, updated_at = ?, attempts = max(attempts - ?, 0) "
                    "WHERE id = ?",
                    (QUEUED, time.time(), 0 if count_attempt else 1, job_id),
                )
                _event(db, job_id, QUEUED, f"interrupted by {why}; queued again")
        return len(ids)

    def add_event(self, job_id: int | None, kind: str, message: str, *, once: bool = False) -> None:
        """Record an event; with ``once``, not when the job has the same one already (what a
        job's run finds again when the job is run again)."""
        with self.transaction() as db:
            _event(db, job_id, kind, message, once=once)

    def list_jobs(self, state: str | None = None, limit: int = 50) -> list[Job]:
        query = _JOB_QUERY
        params: tuple[object, ...] = ()
        if state:
            query += " WHERE j.state = ?"
            params = (state,)
        query += " ORDER BY j.id DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(query, (*params, limit)).fetchall()
        return [_job(r) for r in rows]

    def failures_to_notify(self, since: float, limit: int) -> list[Job]:
        """Failed jobs (each its study's latest version) that failed at ``since`` or later,
        whose study waits for no instance and has MR images, and that have no ``notice`` event
        since they failed (:mod:`dicom_node.notices`); oldest first, at most ``limit``."""
        return self._recent_failures(
            "EXISTS (SELECT 1 FROM job_instances ji JOIN instances i USING (sop_instance_uid) "
            "WHERE ji.job_id = j.id AND i.modality = 'MR')",
            "notice", since, limit,
        )  # fmt: skip

    def failures_to_take_back(self, since: float, limit: int) -> list[Job]:
        """Failed jobs that failed at ``since`` or later, of a study that had earlier versions
        and waits for no instance, without a ``taken-back`` event since they failed
        (:mod:`dicom_node.notices`); oldest first, at most ``limit``."""
        return self._recent_failures("j.version > 1", "taken-back", since, limit)

    def _recent_failures(self, condition: str, event: str, since: float, limit: int) -> list[Job]:
        """Failed jobs that failed at ``since`` or later and meet ``condition``, of a study that
        waits for no instance, without an ``event`` event since they failed."""
        with self._lock:
            rows = self._conn.execute(
                f"{_JOB_QUERY} WHERE j.state = ? AND j.updated_at >= ? AND s.pending = 0 "
                f"AND {condition} "
                "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id "
                "AND e.kind = ? AND e.at >= j.updated_at) ORDER BY j.id LIMIT ?",
                (FAILED, since, event, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def get_job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._conn.execute(
                f"{_JOB_QUERY} WHERE j.id = ?",
                (job_id,),
            ).fetchone()
        return _job(row) if row else None

    def job_series(self, job_id: int) -> list[JobSeries]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT i.series_instance_uid, i.sop_class_uid, i.modality, i.series_number, "
                "i.series_description, i.protocol_name, i.sequence_name, max(i.contrast_agent), "
                "i.frame_of_reference_uid, count(*), max(i.received_at), "
                "group_concat(DISTINCT i.image_type), coalesce(js.role, ''), "
                "coalesce(js.note, ''), max(i.study_instance_uid) "
                "FROM job_instances ji JOIN instances i USING (sop_instance_uid) "
                "LEFT JOIN job_series js ON js.job_id = ji.job_id "
                "AND js.series_instance_uid = i.series_instance_uid "
                "WHERE ji.job_id = ? GROUP BY i.series_instance_uid, i.sop_class_uid "
                "ORDER BY i.series_number, i.series_instance_uid",
                (job_id,),
            ).fetchall()
        return [
            JobSeries(replace(_series(r[:12]), study_instance_uid=str(r[14])), r[12], r[13])
            for r in rows
        ]

    def events(self, job_id: int) -> list[Event]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT at, kind, message FROM events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [Event(r[0], r[1], r[2]) for r in rows]

    def durations(self) -> tuple[int, float]:
        """How many jobs are done and their seconds from start to end (last run of each), in
        total, forgotten ones included (the totals of a Prometheus summary never go down)."""
        with self._lock:
            count, total = _durations(self._conn, "")
            for name, value in self._conn.execute("SELECT name, value FROM forgotten"):
                if name == _FORGOTTEN_DONE:
                    count += int(value)
                elif name == _FORGOTTEN_SECONDS:
                    total += float(value)
        return count, total

    def count_in_state(self, state: str) -> int:
        """Number of jobs in ``state`` (the receiver's queue bound; unlike :meth:`counts`, it does
        not count the instances)."""
        with self._lock:
            row = self._conn.execute("SELECT count(*) FROM jobs WHERE state = ?", (state,))
            return int(row.fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            out = {state: 0 for state in JOB_STATES}
            out.update({r[0]: r[1] for r in rows})
            present, removed = self._conn.execute(
                "SELECT count(*) - count(removed_at), count(removed_at) FROM instances"
            ).fetchone()
            out["instances"] = int(present or 0)  # in the spool
            out["instances_removed"] = int(removed or 0)  # their files removed by retention
            # taken out of use by IOCM rejection notes (dicom_node.rejections)
            out["instances_rejected"] = int(
                self._conn.execute("SELECT count(*) FROM rejected_instances").fetchone()[0]
            )
            forgotten = self._conn.execute(
                "SELECT value FROM forgotten WHERE name = ?", (_FORGOTTEN_STUDIES,)
            ).fetchone()
            out["studies_forgotten"] = int(forgotten[0]) if forgotten else 0  # by retention
            # instance rows deleted (retention forgot their study, their file was gone): the
            # instances received is a total that never goes down
            forgotten = self._conn.execute(
                "SELECT value FROM forgotten WHERE name = ?", (_FORGOTTEN_INSTANCES,)
            ).fetchone()
            out["instances_forgotten"] = int(forgotten[0]) if forgotten else 0
        return out


#: the job states after which a study's records may be forgotten
_ENDED = (DONE, FAILED, SUPERSEDED)
#: studies whose records retention may forget (files removed, no instance in the spool since,
#: not pending, every job ended), each with its removal time, job ids and instance rows;
#: parameters: the three states of _ENDED
_FORGETTABLE = (
    "SELECT s.study_instance_uid, s.removed_at, (SELECT group_concat(id) FROM jobs WHERE "
    "study_instance_uid = s.study_instance_uid), (SELECT count(*) FROM instances WHERE "
    "study_instance_uid = s.study_instance_uid) FROM studies s WHERE s.removed_at IS NOT NULL "
    "AND s.pending = 0 AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_instance_uid = "
    "s.study_instance_uid AND i.removed_at IS NULL) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
    "j.study_instance_uid = s.study_instance_uid AND j.state NOT IN (?, ?, ?))"
)

#: the ``forgotten`` table's totals
_FORGOTTEN_DONE, _FORGOTTEN_SECONDS, _FORGOTTEN_STUDIES, _FORGOTTEN_INSTANCES = (
    "done_jobs", "done_job_seconds", "studies", "instances"
)  # fmt: skip


def _count_forgotten_instances(db: sqlite3.Connection, rows: int) -> None:
    """Add ``rows`` deleted instance rows to the ``forgotten`` table's total."""
    if rows > 0:
        db.execute(
            "INSERT INTO forgotten (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (_FORGOTTEN_INSTANCES, rows),
        )


def _durations(
    conn: sqlite3.Connection, where: str, args: Sequence[object] = ()
) -> tuple[int, float]:
    """Count and total seconds from start to end of the done jobs (``where``: more
    conditions on ``j``, the jobs)."""
    row = conn.execute(
        "SELECT count(*), total(d) FROM (SELECT j.updated_at - max(e.at) AS d FROM jobs j "
        f"JOIN events e ON e.job_id = j.id AND e.kind = ? WHERE j.state = ? {where} "
        "GROUP BY j.id)",
        (RUNNING, DONE, *args),
    ).fetchone()
    return int(row[0]), float(row[1])


def _ids(concatenated: str | None) -> tuple[int, ...]:
    """Job ids as ``group_concat`` joins them, sorted."""
    return tuple(sorted(int(j) for j in (concatenated or "").split(",") if j))


def _event(
    db: sqlite3.Connection, job_id: int | None, kind: str, message: str, *, once: bool = False
) -> None:
    if (
        once
        and db.execute(
            "SELECT 1 FROM events WHERE job_id IS ? AND kind = ? AND message = ?",
            (job_id, kind, message),
        ).fetchone()
    ):
        return
    db.execute(
        "INSERT INTO events (job_id, at, kind, message) VALUES (?, ?, ?, ?)",
        (job_id, time.time(), kind, message),
    )


def _series(r: Sequence[object]) -> SeriesSummary:
    return SeriesSummary(
        series_instance_uid=str(r[0]),
        sop_class_uid=str(r[1]),
        modality=str(r[2]),
        series_number=None if r[3] is None else int(str(r[3])),
        series_description=str(r[4]),
        protocol_name=str(r[5]),
        sequence_name=str(r[6]),
        contrast_agent=bool(r[7]),
        frame_of_reference_uid=str(r[8]),
        instance_count=int(str(r[9])),
        last_received_at=float(str(r[10])),
        image_type=_image_types(r[11]),
    )


def principal(classes: Sequence[tuple[str, int]]) -> str:
    """The SOP class a series is taken as, from its (SOP class, instance count) pairs: the one
    with the most instances (ties: the lowest UID, so that every reader chooses alike)."""
    return min(classes, key=lambda c: (-c[1], c[0]))[0]


def _set_aside_other_classes(db: sqlite3.Connection, job_id: int) -> list[str]:
    """Take out of a job the instances of a series that are not of its :func:`principal` SOP
    class (a Secondary Capture among the MR images, an RT Structure Set in the MR series):
    the series is converted as one class. What was left out, in words, for the job's events."""
    rows = db.execute(
        "SELECT i.series_instance_uid, i.sop_class_uid, count(*), max(i.series_number) "
        "FROM job_instances ji JOIN instances i USING (sop_instance_uid) WHERE ji.job_id = ? "
        "GROUP BY i.series_instance_uid, i.sop_class_uid",
        (job_id,),
    ).fetchall()
    by_series: dict[str, list[tuple[str, int]]] = {}
    numbers: dict[str, object] = {}
    for series_uid, sop_class, count, number in rows:
        by_series.setdefault(series_uid, []).append((sop_class, int(count)))
        numbers[series_uid] = number
    notes = []
    for series_uid, classes in sorted(by_series.items()):
        if len(classes) < 2:
            continue
        kept = principal(classes)
        db.execute(
            "DELETE FROM job_instances WHERE job_id = ? AND sop_instance_uid IN (SELECT "
            "sop_instance_uid FROM instances WHERE series_instance_uid = ? AND sop_class_uid != ?)",
            (job_id, series_uid, kept),
        )
        others = ", ".join(f"{n} {UID(c).name}" for c, n in classes if c != kept)
        number = "?" if numbers[series_uid] is None else numbers[series_uid]
        notes.append(
            f"series {number} ({series_uid}) holds instances of more than one SOP class: its "
            f"{dict(classes)[kept]} {UID(kept).name} are used, not its {others} (a series holds "
            "one kind of object; send those in a series of their own)"
        )
    return notes


def _image_types(value: object) -> str:
    """The distinct ImageType values of a series, sorted, "," between them (blank ones left out)."""
    return ",".join(sorted({t for t in str(value or "").split(",") if t}))


def _job(r: sqlite3.Row) -> Job:
    return Job(
        id=r["id"],
        study_instance_uid=r["study_instance_uid"],
        version=r["version"],
        state=r["state"],
        reason=r["reason"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        attempts=r["attempts"],
        instance_count=int(r[8]),
        patient_key=str(r[9]),
    )
