"""The spool: received instances as files, written durably before they are acknowledged.

Layout under ``<data_dir>/spool``::

    <study>/<series>/<sop>.dcm     one Part 10 file per accepted instance
    <study>/<series>/.<random>.part a file being written (never acknowledged; removed at start-up)

Folder and file names are the UIDs when they are valid UIDs, otherwise a hash of the value, so
nothing a sender writes can escape the spool or collide with another name.

A write is: create a unique temp file in the series folder, write, ``fdatasync``, rename it to
its final name, ``fsync`` the folder. Only then is the instance answered with success. An
instance already on disk is not written again (a duplicate SOP Instance UID is stored once).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreResult:
    path: Path
    relative: str
    duplicate: bool


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

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
        folder.mkdir(parents=True, exist_ok=True)
        if created:
            # make the new folder entries durable too
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
        self._known_dirs.add(folder)

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoreResult:
        """Write ``data`` durably; raise :class:`OutOfSpaceError` or :class:`StorageError`."""
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / relative
        if final.exists():
            return StoreResult(final, relative, duplicate=True)
        self.check_space(len(data))
        tmp = final.parent / f".{secrets.token_hex(8)}.part"
        try:
            self._ensure_dir(final.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            # Two associations storing the same instance at once both end here with the same
            # content; the second rename replaces the first atomically.
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _NO_SPACE:
                raise OutOfSpaceError(f"spool {self.root}: disk full ({exc.strerror})") from exc
            raise StorageError(f"spool {self.root}: cannot write {relative}: {exc}") from exc
        return StoreResult(final, relative, duplicate=False)

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash (they were never acknowledged)."""
        removed = 0
        for path in self.root.glob("*/*/.*.part"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def partial_files(self) -> list[Path]:
        return list(self.root.glob("*/*/.*.part"))

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
