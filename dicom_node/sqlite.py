"""The node's SQLite databases (jobs, outbox): one connection each, WAL, serialised by a lock."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from dicom_node.errors import StorageError


class Database:
    """A WAL-mode SQLite file shared by the node's threads; errors become StorageError.

    ``synchronous`` is SQLite's setting: FULL makes each commit durable on its own; NORMAL
    survives a crash of the process but may lose the last commits on a power loss.
    """

    def __init__(
        self, path: Path, schema: str, what: str, synchronous: Literal["FULL", "NORMAL"]
    ) -> None:
        self.path = Path(path)
        self.what = what
        self.lock = threading.RLock()
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # private to the node's user whatever its umask: the databases name patients
            # (SQLite gives the -wal and -shm files the database's permissions)
            # (never open and close an existing database file here: closing any descriptor of
            # it drops the POSIX locks of every SQLite connection of this process to it)
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                if os.stat(self.path).st_mode & 0o077:  # made by an earlier version
                    os.chmod(self.path, 0o600)
            self.conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(f"PRAGMA synchronous={synchronous}")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the {what} database {self.path}: {exc}") from exc

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"{self.what} database {self.path}: {exc}") from exc
