"""The spool's staged writes: written first, synced while the receiver checks, then committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_node import spool as spool_module
from dicom_node.errors import OutOfSpaceError, StorageError
from dicom_node.spool import Spool


def test_staged_file_is_committed_under_its_uid_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    body = bytearray(b"B" * 70_000)
    staged = spool.stage((b"HEAD", memoryview(body)))
    assert staged.tmp.parent == spool.incoming and staged.size == 70_004
    result = spool.commit(staged, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert result.relative == "1.2.3/1.2.3.4/1.2.3.4.5.dcm" and not result.duplicate
    assert result.path.read_bytes() == b"HEAD" + bytes(body)
    assert list(spool.iter_files()) == [result.relative]  # .incoming is not a study
    assert not spool.partial_files()


def test_commit_waits_for_the_sync_and_syncs_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fdatasync, real_fsync_dir = os.fdatasync, spool_module.fsync_path
    monkeypatch.setattr(
        spool_module.os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd))
    )
    monkeypatch.setattr(
        spool_module, "fsync_path", lambda p: (calls.append(f"fsync {p.name}"), real_fsync_dir(p))
    )
    real_rename = os.rename
    monkeypatch.setattr(
        spool_module.os, "rename", lambda a, b: (calls.append("rename"), real_rename(a, b))
    )
    spool = Spool(tmp_path / "spool")
    staged = spool.stage((b"x",))
    spool.commit(staged, "1", "2", "3")
    # data synced before the rename, the series folder synced after it
    assert calls.index("fdatasync") < calls.index("rename") < calls.index("fsync 2")
    assert calls[-1] == "fsync 2"


def test_commit_of_a_duplicate_keeps_the_first_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store("1", "2", "3", b"first")
    again = spool.commit(spool.stage((b"second",)), "1", "2", "3")
    assert again.duplicate and again.path.read_bytes() == b"first"
    assert not spool.partial_files()


def test_discarded_stage_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.discard(spool.stage((b"refused",)))
    assert not spool.partial_files() and not list(spool.iter_files())


def test_stage_refuses_on_low_disk_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(OutOfSpaceError):
        spool.stage((b"x" * 1000,))
    assert not spool.partial_files()


def test_a_failed_sync_is_a_storage_error_and_the_temp_file_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fdatasync", broken)
    spool = Spool(tmp_path / "spool")
    staged = spool.stage((b"x",))
    with pytest.raises(StorageError, match="Input/output error"):
        spool.commit(staged, "1", "2", "3")
    assert not spool.partial_files() and not list(spool.iter_files())


def test_leftovers_of_staged_writes_are_removed_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.commit(spool.stage((b"whole",)), "1", "2", "3")
    (spool.incoming / ".dead.part").write_bytes(b"half")
    assert spool.partial_files() == [spool.incoming / ".dead.part"]
    assert spool.clean_tmp() == 1
    assert not spool.partial_files()


def test_incoming_folder_removed_under_the_spool_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.commit(spool.stage((b"a",)), "1", "2", "3")
    spool.incoming.rmdir()
    result = spool.commit(spool.stage((b"b",)), "1", "2", "4")
    assert result.path.read_bytes() == b"b"


def test_store_accepts_several_buffers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    result = spool.store("1", "2", "3", [b"ab", memoryview(b"cd"), bytearray(b"")])
    assert result.path.read_bytes() == b"abcd"


def test_study_folders_removed_under_the_spool_are_made_again(tmp_path: Path) -> None:
    """Retention (here, or `glioforecast spool prune` in another process) removes the folders
    of the studies it empties; the spool remembers having made them and must not trust that."""
    import shutil

    spool = Spool(tmp_path / "spool")
    spool.commit(spool.stage((b"a",)), "1.2", "1.2.3", "1")
    spool.store("1.2", "1.2.3", "2", b"b")
    shutil.rmtree(spool.root / "1.2")
    staged = spool.commit(spool.stage((b"c",)), "1.2", "1.2.3", "1")
    assert staged.path.read_bytes() == b"c" and not staged.duplicate
    shutil.rmtree(spool.root / "1.2")
    stored = spool.store("1.2", "1.2.3", "2", b"d")
    assert stored.path.read_bytes() == b"d" and not stored.duplicate
    assert list(spool.iter_files()) == ["1.2/1.2.3/2.dcm"]
