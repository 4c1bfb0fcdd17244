"""The spool: durable writes, safe names, duplicates, low disk, partial files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import OutOfSpaceError
from dicom_node.spool import Spool, safe_name


def test_store_writes_under_uid_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    result = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DATA")
    assert result.relative == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert result.path.read_bytes() == b"DATA"
    assert not result.duplicate
    assert list(spool.iter_files()) == [result.relative]
    assert not spool.partial_files()


def test_hostile_uids_cannot_escape_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    result = spool.store("../../etc", "/abs", "..", b"x")
    assert result.path.resolve().is_relative_to((tmp_path / "spool").resolve())
    assert safe_name("../../etc").startswith("x") and "/" not in safe_name("a/b")
    assert safe_name("1" * 65) != "1" * 65  # over 64 characters is not a UID


def test_duplicate_is_stored_once_and_first_copy_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store("1", "2", "3", b"first")
    again = spool.store("1", "2", "3", b"second")
    assert again.duplicate
    assert again.path.read_bytes() == b"first"
    assert len(list(spool.iter_files())) == 1


def test_low_disk_refuses_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(OutOfSpaceError, match=r"expected at least .* MiB free"):
        spool.store("1", "2", "3", b"x" * 1000)
    assert not list(spool.iter_files())
    assert not spool.partial_files()


def test_partial_files_from_a_crash_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store("1", "2", "3", b"whole")
    (tmp_path / "spool" / "1" / "2" / ".abc.part").write_bytes(b"half")
    assert spool.clean_tmp() == 1
    assert not spool.partial_files()
