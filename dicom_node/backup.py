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
keeps its UIDs). The copy holds patient data: it is created readable by its owner only (the
folder 0700, the databases and the manifest 0600, the folders in it 0750 at most), whatever
the umask. A backup that fails removes what it created, so that no partial copy fills the
backup disk night after night.

Restoring checks the copy first (its manifest, each database: SQLite's quick check, the node's
tables, no fewer pages than the backup wrote) and refuses a backup made by a later version. It
keeps the audit trail of the folder it replaces (the audit queue, and the audit file with its
rotated copies when they lie in the data folder): that is the node's security record, not
data to roll back. The folders are swapped in one step where the system can (Linux
``renameat2`` with ``RENAME_EXCHANGE``), so that the data folder's path always names a folder
whose lock a starting node finds.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import os
import re
import shutil
import sqlite3
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from dicom_node import __version__
from dicom_node.audit import QUEUE_FILE, StudyRecord, TransferTally
from dicom_node.errors import GlioforecastError, StorageError
from dicom_node.outbox import SETTLED
from dicom_node.outbox_cli import OUTBOX_FILE
from dicom_node.service import LOCK_FILE, lock_data_dir
from dicom_node.spool import fsync_path

JOBS_FILE = "jobs.sqlite3"
#: the databases, in the order they are copied (see the module docstring)
DATABASES = (JOBS_FILE, OUTBOX_FILE, QUEUE_FILE)
OBJECTS_DIR = Path(OUTBOX_FILE).stem + "-objects"
MANIFEST = "glioforecast-backup.json"
SECRET_FILE = "secret.key"
#: the tables a restored database must have: a 0-byte file is an empty database to SQLite
REQUIRED_TABLES = {
    JOBS_FILE: ("jobs", "instances"),
    OUTBOX_FILE: ("outbox",),
    QUEUE_FILE: ("queue",),
}
#: the mode of the folders of a copy and of a restored data folder (the node's own)
FOLDER_MODE = 0o750


@dataclass
class BackupReport:
    destination: Path
    databases: dict[str, int] = field(default_factory=dict)  # name -> pages of the copy
    files: int = 0  # besides the databases
    bytes: int = 0  # databases and files
    spool_files: int = 0
    studies: int = 0  # studies with instances in the copy of the spool
    outbox_rows_updated: int = 0
    vanished: int = 0  # files removed by the node (retention, delivery) during the copy
    #: the studies and patients whose instances the copy holds (received, and results waiting
    #: to be delivered), each with its instances by SOP class: what the Export audit names
    exported: list[StudyRecord] = field(default_factory=list)
    unreadable: int = 0  # instances of the copy whose study and patient could not be read

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


def _database_problem(database: Path, pages: int) -> str:
    """Why ``database`` of a backup cannot be restored ('' when it can): missing, damaged
    (SQLite's quick check), without the node's tables (a 0-byte file is an empty database to
    SQLite, and passes the check), or with fewer pages than the backup wrote (cut short)."""
    if not database.is_file():
        return f"{database} is missing (the backup's {MANIFEST} lists it)"
    problem = _integrity_problem(database)
    if problem:
        return f"{database} is damaged ({problem})"
    try:
        db = sqlite3.connect(_read_only(database), uri=True)
        try:
            tables = {
                str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            found = int(db.execute("PRAGMA page_count").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"{database} is damaged ({exc})"
    missing = [t for t in REQUIRED_TABLES.get(database.name, ()) if t not in tables]
    if missing:
        return (
            f"{database} is damaged: expected the table(s) {', '.join(missing)} of the node's "
            f"{database.name}, found "
            + (", ".join(sorted(tables)) if tables else f"no table ({database.stat().st_size} "
               "bytes: an empty or emptied file)")
        )  # fmt: skip
    if found < pages:
        return (
            f"{database} is damaged: expected the {pages} page(s) the backup wrote, found "
            f"{found} (the file was cut short)"
        )
    return ""


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


def _page_count(database: Path) -> int:
    db = sqlite3.connect(_read_only(database), uri=True)
    try:
        return int(db.execute("PRAGMA page_count").fetchone()[0])
    finally:
        db.close()


def _copy_database(source: Path, target: Path) -> int:
    """Copy ``source`` into the new file ``target`` (created readable by its owner only, whatever
    the umask; SQLite gives its journal the same mode); returns the pages copied."""
    src = sqlite3.connect(_read_only(source), uri=True, timeout=30)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
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


def _copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` with its times; its mode, but never more than 0640 (patient data)."""
    shutil.copy2(source, target)
    os.chmod(target, stat.S_IMODE(os.stat(target).st_mode) & 0o640)


def _copy_tree(source: Path, target: Path, report: BackupReport) -> int:
    """Copy every file under ``source``; returns how many."""
    copied = 0
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out = target / Path(folder).relative_to(source)
        out.mkdir(mode=FOLDER_MODE, exist_ok=True)  # the umask can only make it stricter
        for name in sorted(files):
            if _skipped(name):
                continue
            try:
                _copy_file(Path(folder) / name, out / name)
            except FileNotFoundError:  # retention or a delivery removed it meanwhile
                report.vanished += 1
                continue
            report.files += 1
            report.bytes += (out / name).stat().st_size
            copied += 1
    return copied


#: what :func:`_exported` reads of each instance of a copy
_EXPORT_TAGS = ["SOPClassUID", "StudyInstanceUID", "PatientID", "IssuerOfPatientID",
                "PatientName", "AccessionNumber"]  # fmt: skip


def _exported(copy: Path) -> tuple[list[StudyRecord], int]:
    """The studies and patients of the DICOM instances in ``copy`` (its spool and the results
    waiting), and how many instances could not be read."""
    tally, unreadable = TransferTally(), 0
    for folder in (copy / "spool", copy / OBJECTS_DIR):
        for path in sorted(folder.rglob("*.dcm")) if folder.is_dir() else []:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_EXPORT_TAGS)
                tally.add(ds, str(ds.SOPClassUID))
            except Exception:  # pydicom raises many types on damaged files; counted, not fatal
                unreadable += 1
    return list(tally.done.values()), unreadable


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


def _created_by(destination: Path) -> Path | None:
    """The topmost folder of ``destination``'s path that does not exist yet: what a backup
    into ``destination`` creates (None: ``destination`` exists)."""
    created = None
    for folder in (destination, *destination.parents):
        if folder.exists():
            break
        created = folder
    return created


def _remove_incomplete(destination: Path, created: Path | None) -> str:
    """Remove what a failed backup created (``created``: the topmost folder it made, None when
    ``destination`` was there, empty, before); returns what was done, in words."""
    try:
        if created is not None:
            shutil.rmtree(created)
            return f"the incomplete copy was removed ({created})"
        for entry in destination.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return f"the incomplete copy was removed ({destination} is left empty, as it was)"
    except OSError as exc:
        return f"the incomplete copy could not all be removed ({exc}): remove {destination}"


def backup(data_dir: Path, destination: Path, *, spool: bool = True) -> BackupReport:
    """Copy ``data_dir`` into ``destination`` (a new or empty folder), the node running or
    not; ``spool`` false leaves the received instances out (the PACS has them too). A backup
    that fails removes what it created."""
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
    created = _created_by(destination)
    report = BackupReport(destination)
    started = datetime.datetime.now(datetime.UTC)
    try:
        destination.mkdir(mode=0o700, parents=True, exist_ok=True)
        destination.chmod(0o700)
        for name in DATABASES:
            if (data_dir / name).is_file():
                report.databases[name] = _copy_database(data_dir / name, destination / name)
        if spool and (data_dir / "spool").is_dir():
            report.spool_files = _copy_tree(data_dir / "spool", destination / "spool", report)
            report.studies = len(
                {p.relative_to(destination / "spool").parts[0]
                 for p in (destination / "spool").rglob("*.dcm")}
            )  # fmt: skip
        if (data_dir / OBJECTS_DIR).is_dir():
            _copy_tree(data_dir / OBJECTS_DIR, destination / OBJECTS_DIR, report)
        if OUTBOX_FILE in report.databases:
            report.outbox_rows_updated = _settle_outbox(data_dir, destination)
        report.exported, report.unreadable = _exported(destination)
        for name in report.databases:  # as restore will find them (settling can add pages)
            report.databases[name] = _page_count(destination / name)
            report.bytes += (destination / name).stat().st_size
        for entry in sorted(data_dir.iterdir()):
            if (
                entry.is_file()
                and entry.name not in (*DATABASES, MANIFEST)  # a restored folder has one
                and not _skipped(entry.name)
            ):
                _copy_file(entry, destination / entry.name)
                report.files += 1
                report.bytes += entry.stat().st_size
        manifest = json.dumps(
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
        fd = os.open(destination / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(manifest + "\n")
        with contextlib.suppress(FileNotFoundError):
            (destination / SECRET_FILE).chmod(0o600)
        _fsync_tree(destination)
    except BaseException as exc:  # a full disk, or Ctrl-C: no partial copy left behind
        removed = _remove_incomplete(destination, created)
        if isinstance(exc, (OSError, sqlite3.Error)):
            raise StorageError(
                f"backup of {data_dir} into {destination} failed: {exc}; {removed}; nothing "
                "was changed in the data folder: make room (or fix the cause) and back up again"
            ) from exc
        raise
    return report


# --------------------------------------------------------------------------------- restore


@dataclass
class Restored:
    """What :func:`restore` did."""

    backup: Path
    data_dir: Path
    made: str  # when the backup started (ISO 8601), as its manifest says
    version: str  # the version that made it ('' when its manifest does not say)
    aside: Path | None = None  # where the folder that was there is kept (None: there was none)
    carried: list[str] = field(default_factory=list)  # audit trail files kept from it
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kept = f"; the folder that was there is kept at {self.aside}" if self.aside else ""
        if self.carried:
            kept += (
                f"; the audit trail of that folder ({', '.join(self.carried)}) was kept in place "
                "of the backup's older copies"
            )
        return (
            f"restored the backup made {self.made} into {self.data_dir}{kept}"
            + "".join(f"; {note}" for note in self.notes)
            + "; start the node: it reconciles the spool with the database and sends what was "
            "not yet delivered"
        )


def _release(version: str) -> tuple[int, ...] | None:
    """The release numbers of ``version`` ("0.10.2rc1": (0, 10, 2)); None when it has none."""
    found = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(n) for n in found.group(0).split(".")) if found else None


def _newer(version: str, than: str) -> bool:
    mine, theirs = _release(than) or (), _release(version) or ()
    width = max(len(mine), len(theirs))
    return theirs + (0,) * (width - len(theirs)) > mine + (0,) * (width - len(mine))


def _manifest(copy: Path, data_dir: Path) -> dict[str, object]:
    """The backup's manifest, checked: an object with the databases and their page counts (and
    the job database among them), a version this version can compare with its own."""
    path = copy / MANIFEST
    damaged = f"restore: {path} is damaged: expected"
    other = f"; nothing was changed at {data_dir}; restore another backup"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSON, and text that is not UTF-8
        raise StorageError(
            f"{damaged} the JSON object glioforecast backup writes, found text that does not "
            f"read as JSON ({exc}){other}"
        ) from exc
    if not isinstance(manifest, dict):
        raise StorageError(
            f"{damaged} a JSON object, found a JSON {type(manifest).__name__}{other}"
        )
    databases = manifest.get("databases")
    if (
        not isinstance(databases, dict)
        or JOBS_FILE not in databases
        or not set(databases) <= set(DATABASES)
        or not all(type(n) is int and n >= 0 for n in databases.values())
    ):
        raise StorageError(
            f'{damaged} "databases": an object giving the page count of {JOBS_FILE} and of '
            f"{' and '.join(DATABASES[1:])} where copied, found {json.dumps(databases)}{other}"
        )
    version = manifest.get("version", "")
    if not isinstance(version, str) or (version and _release(version) is None):
        raise StorageError(
            f'{damaged} "version": the version of glioforecast that made it, such as '
            f"{__version__}, found {json.dumps(version)}{other}"
        )
    return manifest


def _audit_trail_files(folder: Path, audit_files: list[Path]) -> list[Path]:
    """The audit trail's files in the data folder ``folder``, relative to it: the audit queue,
    each audit file of ``audit_files`` that lies in the folder and its rotated copies
    (``audit.log.1``, ``audit.log-20260101.gz``: the same name, then ``.`` or ``-``)."""
    found = [Path(QUEUE_FILE)] if (folder / QUEUE_FILE).is_file() else []
    for audit_file in audit_files:
        if folder not in audit_file.parents or not audit_file.parent.is_dir():
            continue
        for entry in sorted(audit_file.parent.iterdir()):
            name = entry.name
            rotated = name.startswith((audit_file.name + ".", audit_file.name + "-"))
            if (
                entry.is_file()
                and (name == audit_file.name or rotated)
                and not name.startswith(DATABASES)  # an audit file named "audit": not its queue
                and name not in (LOCK_FILE, MANIFEST, SECRET_FILE)
            ):
                found.append(entry.relative_to(folder))
    return found


def _carry_audit_trail(
    data_dir: Path, staging: Path, audit_files: list[Path], notes: list[str]
) -> list[str]:
    """Put the audit trail of ``data_dir`` (the folder a restore replaces) in ``staging`` (the
    backup's copy) in place of the backup's older one; returns what was carried."""
    current = _audit_trail_files(data_dir, audit_files)
    carried = []
    if Path(QUEUE_FILE) in current:
        current.remove(Path(QUEUE_FILE))
        carrying = staging / (QUEUE_FILE + ".tmp")
        try:  # a copy of one transaction: what its -wal holds included
            _copy_database(data_dir / QUEUE_FILE, carrying)
        except sqlite3.Error as exc:
            carrying.unlink(missing_ok=True)
            notes.append(
                f"the audit queue {data_dir / QUEUE_FILE} could not be read ({exc}): the "
                "backup's was restored; the messages the folder's queue held that were not yet "
                "delivered stay in the folder kept aside"
            )
        else:
            for suffix in ("-wal", "-shm", "-journal"):
                (staging / (QUEUE_FILE + suffix)).unlink(missing_ok=True)
            carrying.rename(staging / QUEUE_FILE)
            carried.append(QUEUE_FILE)
    if current:  # the folder's audit file (and its rotated copies) replace the backup's
        inside = [staging / f.relative_to(data_dir) for f in audit_files if data_dir in f.parents]
        for stale in _audit_trail_files(staging, inside):
            if stale != Path(QUEUE_FILE):
                (staging / stale).unlink()
        for relative in current:
            (staging / relative).parent.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            shutil.copy2(data_dir / relative, staging / relative)
            carried.append(str(relative))
    return carried


def _make_private(root: Path) -> None:
    """The modes the node gives its own data folder, whatever a copy of it was given: folders
    0750, databases and the key 0600, other files 0640 at most."""
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, FOLDER_MODE)
        for name in files:
            path = Path(folder) / name
            if name in DATABASES or name == SECRET_FILE:
                os.chmod(path, 0o600)
            else:
                os.chmod(path, stat.S_IMODE(path.stat().st_mode) & 0o640)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap the folders at ``first`` and ``second`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``): neither path is ever without a folder. False when this system or
    file system cannot (nothing was done then)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return False
    renameat2.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
    ]  # fmt: skip
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                 _RENAME_EXCHANGE) == 0:  # fmt: skip
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def restore(copy: Path, data_dir: Path, *, audit_files: Sequence[Path] = ()) -> Restored:
    """Put the backup ``copy`` in place of ``data_dir``, the node stopped (its lock is taken
    here, so a running node makes this refuse, and held until the swap, so that no node starts
    meanwhile). The folder there is moved aside, not removed; its audit trail (the queue, and
    ``audit_files``, the audit file, with their rotated copies, where they lie in it) is kept
    in place of the backup's. Nothing is changed unless every check passes."""
    copy, data_dir = Path(copy).resolve(), Path(data_dir).resolve()
    kept_files = [Path(f).resolve() for f in audit_files]
    if not (copy / MANIFEST).is_file() or not (copy / JOBS_FILE).is_file():
        raise StorageError(
            f"restore: expected a folder made by glioforecast backup ({MANIFEST} and "
            f"{JOBS_FILE}) at {copy}, found none"
        )
    manifest = _manifest(copy, data_dir)
    version = str(manifest.get("version", ""))
    unchanged = f"nothing was changed at {data_dir}"
    if version and _newer(version, __version__):
        raise StorageError(
            f"restore: expected a backup made by glioforecast {__version__} or an earlier "
            f"version, found one made by {version} at {copy}: this version would misread its "
            f"databases (docs/OPERATIONS.md, Upgrades); {unchanged}; restore it with "
            f"glioforecast {version} or later, or restore a backup made by this version"
        )
    databases = manifest["databases"]
    assert isinstance(databases, dict)
    for name, pages in databases.items():
        problem = _database_problem(copy / name, pages)
        if problem:
            raise StorageError(f"restore: {problem}: {unchanged}; restore another backup")
    if data_dir.exists() and data_dir.stat().st_uid != os.geteuid():
        raise StorageError(
            f"restore: expected to run as the owner of {data_dir} (uid "
            f"{data_dir.stat().st_uid}), found uid {os.geteuid()}: the node could not use "
            "files another user owns; run it as the node's user"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    staging = data_dir.with_name(f".{data_dir.name}.restoring-{stamp}")
    aside = data_dir.with_name(f"{data_dir.name}.before-restore-{stamp}")
    existed = data_dir.exists()
    try:
        # where there is no data folder, an empty one holds the lock meanwhile
        data_dir.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        lock = lock_data_dir(data_dir)
    except GlioforecastError as exc:  # a node runs there
        raise StorageError(
            f"restore: stop the node first (systemctl stop glioforecast): {exc}"
        ) from exc
    except OSError as exc:
        raise StorageError(f"restore: cannot use the data folder {data_dir}: {exc}") from exc
    done = Restored(copy, data_dir, str(manifest.get("started", "at an unknown time")), version)
    moved_to: Path | None = None  # where the folder that was there went
    try:
        shutil.copytree(copy, staging, copy_function=shutil.copy2)
        if existed:
            done.carried = _carry_audit_trail(data_dir, staging, kept_files, done.notes)
        _make_private(staging)
        _fsync_tree(staging)
        if _exchange(staging, data_dir):  # staging now holds the folder that was there
            moved_to = staging
            try:
                staging.rename(aside)
                moved_to = aside
            except OSError as exc:
                done.notes.append(f"it could not be moved to {aside} ({exc}): it is at {staging}")
        else:  # in two steps: a node started in between would find no folder, and no lock
            data_dir.rename(aside)
            moved_to = aside
            staging.rename(data_dir)
    except OSError as exc:  # the lock is held until this is cleaned up
        shutil.rmtree(staging, ignore_errors=True)
        if moved_to is None:
            if not existed:
                shutil.rmtree(data_dir, ignore_errors=True)
            raise StorageError(
                f"restore of {copy} into {data_dir} failed: {exc}; {unchanged}"
            ) from exc
        raise StorageError(
            f"restore of {copy} into {data_dir} failed after the folder there was moved to "
            f"{aside}: {exc}; "
            + (f"a folder was made at {data_dir} meanwhile (by a node started in between?): "
               "stop the node, move that folder away and restore again" if data_dir.exists()
               else f"move it back (mv {aside} {data_dir}) or restore again")
        ) from exc  # fmt: skip
    finally:
        os.close(lock)
    with contextlib.suppress(OSError):
        fsync_path(data_dir.parent)
    if existed:
        done.aside = moved_to
    else:  # only the lock was there
        shutil.rmtree(moved_to, ignore_errors=True)
    if version != __version__:
        done.notes.append(
            f"it was made by glioforecast {version or 'before 0.1.0'}, this is {__version__}: "
            "the node brings its databases up to date when it starts"
        )
    return done
