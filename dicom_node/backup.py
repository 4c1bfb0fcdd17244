"""``glioforecast backup DEST``: a consistent copy of a running node's data folder.

Copying the data folder while the node writes (a nightly file-level backup) can catch a SQLite
database between its file and its write-ahead log, and a copy that does not open. This command
copies each database with SQLite's online backup API (a snapshot of one transaction, taken
while the node goes on receiving), then the files, in the order in which the node writes them:

1. the job database (instances, jobs), then the outbox database (results to deliver), then the
   audit queue: a result is queued before its job is marked done, so a snapshot of the jobs
   taken first never has a done job whose results the outbox snapshot lacks;
2. the spool and the outbox's objects: an instance received after the job snapshot is a file
   the database does not know, which a start records (as after a crash between the rename and
   the database); an outbox row whose object was delivered, and so removed, between the outbox
   snapshot and the copy takes the row's state at the source again;
3. the installation key (``secret.key``) and any other file of the folder (an audit log kept
   there), the databases' ``-wal`` and ``-shm`` files, temporary files and the running node's
   lock left out.

Restoring it (the node stopped, the folder put back at the same path) is a start after a power
loss at the time of the snapshot: the node reconciles the spool with the database, queues the
jobs that were running again and sends the results not yet delivered (a result sent twice
keeps its UIDs). The copy holds patient data: it is created readable by its owner only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node import __version__
from dicom_node.audit import QUEUE_FILE
from dicom_node.errors import GlioforecastError, StorageError
from dicom_node.outbox import SETTLED
from dicom_node.outbox_cli import OUTBOX_FILE
from dicom_node.service import LOCK_FILE, lock_data_dir

JOBS_FILE = "jobs.sqlite3"
#: the databases, in the order they are copied (see the module docstring)
DATABASES = (JOBS_FILE, OUTBOX_FILE, QUEUE_FILE)
OBJECTS_DIR = Path(OUTBOX_FILE).stem + "-objects"
MANIFEST = "glioforecast-backup.json"


@dataclass
class BackupReport:
    destination: Path
    databases: dict[str, int] = field(default_factory=dict)  # name -> pages copied
    files: int = 0  # besides the databases
    bytes: int = 0  # databases and files
    spool_files: int = 0
    outbox_rows_updated: int = 0
    vanished: int = 0  # files removed by the node (retention, delivery) during the copy

    def describe(self) -> str:
        return (
            f"backup in {self.destination}: {len(self.databases)} database(s) "
            f"({', '.join(self.databases)}), {self.files} file(s), {self.bytes / 2**20:.1f} MiB "
            f"({self.spool_files} spool instance(s)); {self.vanished} file(s) removed by the "
            f"node while copying, {self.outbox_rows_updated} outbox row(s) delivered meanwhile"
        )


def _integrity_problem(database: Path) -> str:
    """What SQLite's quick check finds wrong with ``database`` ('' when nothing)."""
    try:
        db = sqlite3.connect(_read_only(database), uri=True)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return str(exc)
    found = "; ".join(str(r[0]) for r in rows)
    return "" if found == "ok" else found


def _read_only(path: Path) -> str:
    """The SQLite URI that opens ``path`` read-only; the path is quoted (a folder named with a
    ``#``, ``?`` or ``%`` opened another file, or none)."""
    return f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"


def _skipped(name: str) -> bool:
    """Files a backup leaves out: SQLite's journals, the node's temporary files and its lock."""
    return (
        name.startswith(".")
        or name.endswith(("-wal", "-shm", "-journal", ".tmp"))
        or name == LOCK_FILE
    )


def _copy_database(source: Path, target: Path) -> int:
    src = sqlite3.connect(_read_only(source), uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
            # the copy stands alone: no write-ahead log beside it
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    return pages


def _copy_tree(source: Path, target: Path, report: BackupReport) -> int:
    """Copy every file under ``source``; returns how many."""
    copied = 0
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out = target / Path(folder).relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if _skipped(name):
                continue
            try:
                shutil.copy2(Path(folder) / name, out / name)
            except FileNotFoundError:  # retention or a delivery removed it meanwhile
                report.vanished += 1
                continue
            report.files += 1
            report.bytes += (out / name).stat().st_size
            copied += 1
    return copied


def _settle_outbox(data_dir: Path, target: Path) -> int:
    """Rows of the copied outbox that still wait for an object the copy lacks were delivered
    (and their object removed) after the snapshot: they take the source's row again."""
    copy = sqlite3.connect(target / OUTBOX_FILE)
    source = sqlite3.connect(_read_only(data_dir / OUTBOX_FILE), uri=True, timeout=30)
    updated = 0
    try:
        copy.row_factory = source.row_factory = sqlite3.Row
        marks = ",".join("?" * len(SETTLED))
        rows = copy.execute(
            f"SELECT id, path FROM outbox WHERE state NOT IN ({marks})", SETTLED
        ).fetchall()
        for row in rows:
            if (target / OBJECTS_DIR / Path(row["path"]).name).exists():
                continue
            now = source.execute("SELECT * FROM outbox WHERE id = ?", (row["id"],)).fetchone()
            if now is None:
                continue
            columns = [k for k in now.keys() if k != "id"]  # noqa: SIM118 (a Row iterates values)
            copy.execute(
                f"UPDATE outbox SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                [now[c] for c in columns] + [row["id"]],
            )
            updated += 1
        copy.commit()
    finally:
        copy.close()
        source.close()
    return updated


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def backup(data_dir: Path, destination: Path, *, spool: bool = True) -> BackupReport:
    """Copy ``data_dir`` into ``destination`` (a new or empty folder), the node running or
    not; ``spool`` false leaves the received instances out (the PACS has them too)."""
    data_dir, destination = Path(data_dir).resolve(), Path(destination).resolve()
    if not (data_dir / JOBS_FILE).is_file():
        raise StorageError(
            f"backup: expected a node's data folder with {JOBS_FILE} at {data_dir}, found none"
        )
    owner = (data_dir / JOBS_FILE).stat().st_uid
    if owner != os.geteuid():
        # reading a stopped node's database creates its -wal and -shm files, which the node
        # could not open if they belonged to another user
        raise StorageError(
            f"backup: expected to run as the owner of {data_dir / JOBS_FILE} (uid {owner}), "
            f"found uid {os.geteuid()}: run it as the node's user, e.g. sudo -u glioforecast "
            "glioforecast backup ..."
        )
    if destination == data_dir or data_dir in destination.parents:
        raise StorageError(
            f"backup: expected a destination outside the data folder {data_dir}, found "
            f"{destination}"
        )
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise StorageError(
            f"backup: expected a new or empty folder at {destination}, found "
            + ("a file" if not destination.is_dir() else "one that is not empty")
        )
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    destination.chmod(0o700)
    report = BackupReport(destination)
    started = datetime.datetime.now(datetime.UTC)
    try:
        for name in DATABASES:
            if (data_dir / name).is_file():
                report.databases[name] = _copy_database(data_dir / name, destination / name)
                report.bytes += (destination / name).stat().st_size
        if spool and (data_dir / "spool").is_dir():
            report.spool_files = _copy_tree(data_dir / "spool", destination / "spool", report)
        if (data_dir / OBJECTS_DIR).is_dir():
            _copy_tree(data_dir / OBJECTS_DIR, destination / OBJECTS_DIR, report)
        if OUTBOX_FILE in report.databases:
            report.outbox_rows_updated = _settle_outbox(data_dir, destination)
        for entry in sorted(data_dir.iterdir()):
            if entry.is_file() and entry.name not in DATABASES and not _skipped(entry.name):
                shutil.copy2(entry, destination / entry.name)
                report.files += 1
                report.bytes += entry.stat().st_size
        (destination / MANIFEST).write_text(
            json.dumps(
                {
                    "data_dir": str(data_dir),
                    "version": __version__,
                    "started": started.isoformat(timespec="seconds"),
                    "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "spool": spool,
                    "databases": report.databases,
                    "files": report.files,
                    "bytes": report.bytes,
                },
                indent=2,
            )
            + "\n"
        )
        _fsync_tree(destination)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(
            f"backup of {data_dir} into {destination} failed: {exc}; the copy there is "
            "incomplete: remove it and try again"
        ) from exc
    with contextlib.suppress(OSError):
        (destination / "secret.key").chmod(0o600)
    return report


def restore(copy: Path, data_dir: Path) -> str:
    """Put the backup ``copy`` in place of ``data_dir``, the node stopped (its lock is taken
    here, so a running node makes this refuse). The folder there is moved aside, not removed.
    Returns what was done, in words."""
    copy, data_dir = Path(copy).resolve(), Path(data_dir).resolve()
    if not (copy / MANIFEST).is_file() or not (copy / JOBS_FILE).is_file():
        raise StorageError(
            f"restore: expected a folder made by glioforecast backup ({MANIFEST} and "
            f"{JOBS_FILE}) at {copy}, found none"
        )
    manifest = json.loads((copy / MANIFEST).read_text())
    made = manifest.get("started", "an unknown time")
    for name in manifest.get("databases", [JOBS_FILE]):
        problem = _integrity_problem(copy / name)
        if problem:
            raise StorageError(
                f"restore: {copy / name} is damaged ({problem}): nothing was changed at "
                f"{data_dir}; restore another backup"
            )
    if data_dir.exists() and data_dir.stat().st_uid != os.geteuid():
        raise StorageError(
            f"restore: expected to run as the owner of {data_dir} (uid "
            f"{data_dir.stat().st_uid}), found uid {os.geteuid()}: the node could not use "
            "files another user owns; run it as the node's user"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    staging = data_dir.with_name(f".{data_dir.name}.restoring-{stamp}")
    aside = data_dir.with_name(f"{data_dir.name}.before-restore-{stamp}")
    try:
        lock = lock_data_dir(data_dir) if data_dir.exists() else None
    except GlioforecastError as exc:  # a node runs there
        raise StorageError(
            f"restore: stop the node first (systemctl stop glioforecast): {exc}"
        ) from exc
    try:
        shutil.copytree(copy, staging, copy_function=shutil.copy2)
        _fsync_tree(staging)
        if data_dir.exists():
            data_dir.rename(aside)
        staging.rename(data_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageError(f"restore of {copy} into {data_dir} failed: {exc}") from exc
    finally:
        if lock is not None:
            os.close(lock)
    kept = f"; the folder that was there is kept at {aside}" if aside.exists() else ""
    version = manifest.get("version")
    if version != __version__:
        kept += (
            f"; it was made by glioforecast {version or 'before 0.1.0'}, this is {__version__}: "
            "the node brings its databases up to date when it starts"
        )
    return (
        f"restored the backup made {made} into {data_dir}{kept}; start the node: it "
        "reconciles the spool with the database and sends what was not yet delivered"
    )
