"""The spool: received instances as files, written durably before they are acknowledged.

Layout under ``<data_dir>/spool``::

    <study>/<series>/<sop>.dcm     one Part 10 file per accepted instance
    <study>/<series>/.<random>.part a file being written (never acknowledged; removed at start-up)
    .incoming/.<random>.part        a received file being written while it is still checked
                                    (never acknowledged; removed at start-up)

Folder and file names are the UIDs when they are valid UIDs, otherwise a hash of the value, so
nothing a sender writes can escape the spool or collide with another name.

A write is: create a unique temp file in the series folder, write, ``fdatasync``, rename it to
its final name, ``fsync`` the folder. Only then is the instance answered with success. An
instance already on disk is not written again (a duplicate SOP Instance UID is stored once),
unless the receiver asks for it to be replaced (a corrected copy under another patient).

The receiver uses the same steps split in two (:meth:`Spool.stage`, :meth:`Spool.commit`) so
that the ``fdatasync`` of a received file runs while the receiver decodes and checks it: the
temp file is written in ``.incoming/`` and synced by a worker thread; once the instance is
known to be good, the sync is awaited, the file renamed into its series folder and that folder
fsynced. Nothing is answered before the rename and the folder are durable.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import OutOfSpaceError, StorageError
from dicom_node.instance import is_valid_uid

log = logging.getLogger(__name__)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID-like value."""
    if is_valid_uid(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:32]


def _other_content(new: Path, held: Path, head: int, chunk: int = 1 << 20) -> bool:
    """Whether ``new`` holds other bytes than ``held`` after the same first ``head`` bytes
    (its File Meta Information: a copy in another transfer syntax is not compared)."""
    with new.open("rb") as fa, held.open("rb") as fb:
        if fa.read(head) != fb.read(head):
            return False
        if new.stat().st_size != held.stat().st_size:
            return True
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return True
            if not x:
                return False


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreResult:
    path: Path
    relative: str
    duplicate: bool
    #: a duplicate whose bytes differ from the copy kept (another content under the same SOP
    #: Instance UID); known from :meth:`Spool.commit` only
    differs: bool = False


@dataclass(frozen=True)
class Staged:
    """A received file written to ``.incoming/``, its ``fdatasync`` running in the background."""

    tmp: Path
    size: int
    synced: Future[None]
    #: the length of the first part written (the File Meta Information the receiver builds)
    head: int = 0


Buffer = bytes | bytearray | memoryview

INCOMING = ".incoming"
_SYNC_WORKERS = 8  # concurrent fdatasyncs; more associations than this wait in turn


def _write_all(fd: int, parts: Sequence[Buffer]) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _sync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _os_error(root: Path, what: str, exc: OSError) -> Exception:
    if exc.errno in _NO_SPACE:
        return OutOfSpaceError(f"spool {root}: disk full ({exc.strerror})")
    return StorageError(f"spool {root}: cannot write {what}: {exc}")


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        root.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self.incoming = root / INCOMING
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return f"{safe_name(study_uid)}/{safe_name(series_uid)}/{safe_name(sop_uid)}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfSpaceError(
                f"spool {self.root}: expected at least {self.min_free_bytes // 2**20} MiB free "
                f"after writing {incoming} bytes, found {free // 2**20} MiB free"
            )

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        created = not folder.is_dir()
        # the study's folder, then the series' (parents=True makes parents with the umask's
        # mode): private to the node's user, whatever the umask
        folder.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        folder.mkdir(mode=0o750, exist_ok=True)
        if created:
            # make the new folder entries durable too
            fsync_path(folder.parent)
            fsync_path(folder.parent.parent)
        self._known_dirs.add(folder)

    def _rename_into(self, src: Path, final: Path) -> None:
        """``os.rename(src, final)``, making ``final``'s folder again when it was removed since
        this spool made it (retention removes the folders of the studies it empties)."""
        self._ensure_dir(final.parent)
        try:
            os.rename(src, final)
        except FileNotFoundError:
            if not src.exists():
                raise
            self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            os.rename(src, final)

    def store(
        self, study_uid: str, series_uid: str, sop_uid: str, data: Buffer | Sequence[Buffer]
    ) -> StoreResult:
        """Write ``data`` (bytes, or buffers written one after the other) durably.

        Raise :class:`OutOfSpaceError` or :class:`StorageError`.
        """
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / relative
        if final.exists():
            return StoreResult(final, relative, duplicate=True)
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        self.check_space(sum(len(p) for p in parts))
        tmp = final.parent / f".{secrets.token_hex(8)}.part"
        try:
            self._ensure_dir(final.parent)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileNotFoundError:  # the folder was removed since it was made
                self._known_dirs.discard(final.parent)
                self._ensure_dir(final.parent)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                _write_all(fd, parts)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            # Two associations storing the same instance at once both end here with the same
            # content; the second rename replaces the first atomically.
            self._rename_into(tmp, final)
            fsync_path(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _os_error(self.root, relative, exc) from exc
        return StoreResult(final, relative, duplicate=False)

    # -------------------------------------------------- staged writes (used by the receiver)

    def _sync_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                if not self.incoming.is_dir():
                    self.incoming.mkdir(mode=0o750, exist_ok=True)
                    fsync_path(self.root)
                self._pool = ThreadPoolExecutor(_SYNC_WORKERS, thread_name_prefix="spool-sync")
            return self._pool

    def stage(self, parts: Sequence[Buffer]) -> Staged:
        """Write ``parts`` to a temp file in ``.incoming/`` and start its ``fdatasync``.

        The caller must end it with :meth:`commit` or :meth:`discard`. Raise
        :class:`OutOfSpaceError` or :class:`StorageError`.
        """
        size = sum(len(p) for p in parts)
        self.check_space(size)
        tmp = self.incoming / f".{secrets.token_hex(8)}.part"
        try:
            pool = self._sync_pool()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileNotFoundError:  # .incoming removed under us: make it again
                self.incoming.mkdir(mode=0o750, exist_ok=True)
                fsync_path(self.root)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise _os_error(self.root, tmp.name, exc) from exc
        try:
            _write_all(fd, parts)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise _os_error(self.root, tmp.name, exc) from exc
        head = len(parts[0]) if len(parts) > 1 else 0
        return Staged(tmp, size, pool.submit(_sync_and_close, fd), head)

    def commit(
        self, staged: Staged, study_uid: str, series_uid: str, sop_uid: str, replace: bool = False
    ) -> StoreResult:
        """Wait for the staged file's sync, rename it into place and fsync its folder.

        Only when this returns is the instance durable. An instance already stored is kept
        and the staged copy removed (``duplicate=True``), unless ``replace``: then the staged
        copy takes its place (one atomic rename).
        """
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / relative
        try:
            staged.synced.result()
            if final.exists() and not replace:
                differs = _other_content(staged.tmp, final, staged.head)
                staged.tmp.unlink(missing_ok=True)
                return StoreResult(final, relative, duplicate=True, differs=differs)
            self._rename_into(staged.tmp, final)
            fsync_path(final.parent)
        except OSError as exc:
            staged.tmp.unlink(missing_ok=True)
            raise _os_error(self.root, relative, exc) from exc
        return StoreResult(final, relative, duplicate=False)

    def remove(self, relative: str) -> None:
        """Remove a stored file that a copy filed elsewhere replaced (gone already: nothing)."""
        path = self.root / relative
        try:
            path.unlink(missing_ok=True)
            fsync_path(path.parent)
        except OSError as exc:  # the copy that replaced it is stored: only space is lost
            log.warning("spool: %s not removed: %s", relative, exc)

    def discard(self, staged: Staged) -> None:
        """Drop a staged file (the instance was refused); its sync may still be running."""
        staged.tmp.unlink(missing_ok=True)

    def _partials(self) -> Iterator[Path]:
        yield from self.root.glob("*/*/.*.part")
        yield from self.incoming.glob(".*.part")

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash (they were never acknowledged)."""
        removed = 0
        for path in self._partials():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def partial_files(self) -> list[Path]:
        return list(self._partials())

    def iter_files(self) -> Iterator[str]:
        """Relative paths of every stored instance."""
        for study in os.scandir(self.root):
            if not study.is_dir() or study.name.startswith("."):
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(".dcm"):
                        yield f"{study.name}/{series.name}/{entry.name}"
