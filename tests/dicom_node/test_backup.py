"""`glioforecast backup`: a consistent copy of a running node's data folder, and a restore
that loses nothing the node had accepted."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node import __version__
from dicom_node.backup import MANIFEST, _settle_outbox
from dicom_node.cli import EXIT_FAILED, EXIT_OK, main
from dicom_node.errors import GlioforecastError
from dicom_node.jobs import FAILED
from dicom_node.outbox import Outbox
from dicom_node.ports import free_port
from dicom_node.service import Node
from dicom_node.settings import Destination, Settings
from tests.conftest import start_listener, tool, wait_for
from tests.dicom_node.conftest import all_sent, make_settings
from tests.dicom_node.test_scp import storescu
from tests.factories import small_study


def _settings(data: Path, pacs_port: int) -> Settings:
    """A node whose PACS takes failure notices; it is down until the test starts it."""
    pacs = Destination(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port, failure_notice=True
    )
    s = dataclasses.replace(make_settings(data), destinations=(pacs,))
    return dataclasses.replace(
        s, sending=dataclasses.replace(s.sending, retry_initial_s=3600, retry_max_s=3600)
    )


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


@contextlib.contextmanager
def _running(settings: Settings) -> Iterator[Node]:
    node = Node(settings)
    node.start()
    thread = threading.Thread(target=node.run_forever, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        node.request_stop()
        thread.join(timeout=10)
        node.stop()


def _instances(folder: Path) -> set[str]:
    return {p.name for p in (folder / "spool").rglob("*.dcm")}


def test_a_backup_of_a_running_node_restores_every_instance_job_and_waiting_result(
    tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    data, copy = tmp_path / "data", tmp_path / "backup"
    pacs_port = free_port()
    settings = _settings(data, pacs_port)
    first = small_study(tmp_path / "first")
    second = small_study(tmp_path / "second", slices=24)
    with _running(settings) as node:
        assert storescu(node.scp.port, *first["t1c"], *first["flair"]).returncode == 0
        # no structure set: the job fails, and its notice waits for the PACS, which is down
        wait_for(lambda: node.outbox.counts().get("pacs", {}).get("pending") == 2, timeout=60,
                 what="the failure notice to wait for the PACS")  # fmt: skip
        acknowledged = _instances(data)
        (failed,) = node.store.list_jobs()
        secret = (data / "secret.key").read_bytes()
        # a scanner goes on sending while the backup runs
        results = []
        sending = threading.Thread(target=lambda: results.append(
            storescu(node.scp.port, *second["t1c"], *second["flair"])
        ))  # fmt: skip
        sending.start()
        assert main(["backup", "--data-dir", str(data), str(copy)]) == EXIT_OK
        sending.join(timeout=120)
        assert results[0].returncode == 0, results[0].stderr
        assert capsys.readouterr().out.startswith(f"backup in {copy}: 2 database(s)")
        # a restore under the running node is refused, and changes nothing
        assert main(["restore", "--data-dir", str(data), str(copy)]) == EXIT_FAILED
        refused = capsys.readouterr().err
        assert "restore: stop the node first" in refused and f"(pid {os.getpid()})" in refused
        assert not list(tmp_path.glob("*restor*"))

    assert stat.S_IMODE(copy.stat().st_mode) == 0o700  # it holds patient data
    assert (copy / "secret.key").read_bytes() == secret
    assert stat.S_IMODE((copy / "secret.key").stat().st_mode) == 0o600
    for db in ("jobs.sqlite3", "outbox.sqlite3"):
        assert _integrity(copy / db) == "ok"
    assert not list(copy.glob("*-wal")) and not list(copy.glob("*-shm"))
    assert not (copy / "serve.lock").exists()  # the running node's, not the restored one's
    assert json.loads((copy / MANIFEST).read_text())["spool"] is True
    assert acknowledged <= _instances(copy)  # nothing acknowledged before it is missing

    # the disaster (a corrupted database, say): the copy is put back; what was there is kept
    assert main(["restore", "--data-dir", str(data), str(copy)]) == EXIT_OK
    assert "restored the backup made" in capsys.readouterr().out
    (aside,) = tmp_path.glob("data.before-restore-*")
    assert (aside / "jobs.sqlite3").is_file() and _instances(aside) >= acknowledged
    (tmp_path / "pacs").mkdir()
    pacs = start_listener(
        [tool("storescp"), "-aet", "PACS", "-od", str(tmp_path / "pacs"), str(pacs_port)],
        pacs_port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with _running(settings) as restored:
            # every instance of the copy is known again, those that came after the job
            # database's snapshot included (recorded as after a crash)
            assert restored.store.counts()["instances"] == len(_instances(copy))
            job = restored.store.get_job(failed.id)
            assert (job.study_instance_uid, job.state) == (failed.study_instance_uid, FAILED)
            assert job.patient_key == failed.patient_key  # the same installation key
            # the notice that waited for the PACS reaches it (at once with outbox retry)
            assert main(["outbox", "retry", "--pending", "--data-dir", str(data)]) == EXIT_OK
            restored.sender.wake()
            assert all_sent(restored, "pacs") >= 2
    finally:
        pacs.terminate()
        pacs.wait(timeout=30)


def test_a_backup_refuses_what_would_lose_or_mix_data(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    assert main(["backup", "--data-dir", str(data), str(tmp_path / "b1")]) == EXIT_FAILED
    assert f"expected a node's data folder with jobs.sqlite3 at {data}" in capsys.readouterr().err
    with _running(make_settings(data)):
        pass
    full = tmp_path / "full"
    full.mkdir()
    (full / "last-week.tar").write_text("a site's earlier backup")
    assert main(["backup", "--data-dir", str(data), str(full)]) == EXIT_FAILED
    assert "expected a new or empty folder" in capsys.readouterr().err
    assert main(["backup", "--data-dir", str(data), str(data / "inside")]) == EXIT_FAILED
    assert "expected a destination outside the data folder" in capsys.readouterr().err
    assert main(["backup", "--data-dir", str(data), "--without-spool", str(tmp_path / "b2")]) == 0
    assert not (tmp_path / "b2" / "spool").exists()


def _backed_up_with_a_notice_waiting(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder whose failure notice (2 objects) waits for a PACS that is down, and its
    backup: (data folder, backup)."""
    data, copy = tmp_path / "data", tmp_path / "backup"
    with _running(_settings(data, free_port())) as node:
        study = small_study(tmp_path / "in")
        assert storescu(node.scp.port, *study["t1c"]).returncode == 0
        wait_for(lambda: node.outbox.counts().get("pacs", {}).get("pending") == 2, timeout=60,
                 what="the failure notice to wait for the PACS")  # fmt: skip
    assert main(["backup", "--data-dir", str(data), str(copy)]) == EXIT_OK
    return data, copy


def test_an_outbox_row_delivered_during_the_copy_takes_its_delivered_state(tmp_path) -> None:
    """The outbox is snapshot before its objects are copied: an object delivered (and so
    removed) in between leaves the copy with a waiting row and no object, which must not be
    restored as a delivery that can never be made."""
    data, copy = _backed_up_with_a_notice_waiting(tmp_path)
    # replay the race: at the source one notice object is delivered after the snapshot ...
    outbox = Outbox(data / "outbox.sqlite3")
    outbox.retry(states=("pending",))  # due now
    item = outbox.claim("pacs", limit=1)[0]
    outbox.mark_sent(item)
    delivered = outbox.object_file(item)
    outbox.close()
    assert not delivered.exists()
    # ... so the copy of the objects lacks it
    (copy / "outbox-objects" / delivered.name).unlink()
    assert _settle_outbox(data, copy) == 1
    restored = Outbox(copy / "outbox.sqlite3")
    try:
        assert restored.counts()["pacs"] == {"sent": 1, "pending": 1}
    finally:
        restored.close()


def test_a_copy_elsewhere_sends_its_own_objects_and_leaves_the_originals(tmp_path) -> None:
    """Outbox rows held the whole path of their object: a data folder restored elsewhere (or
    moved, storage.data_dir changed) read and deleted the original folder's objects, or found
    none and went dead. A row holds the name now; one an earlier version wrote, with a whole
    path, is read by its name in its own folder."""
    data, copy = _backed_up_with_a_notice_waiting(tmp_path)
    originals = sorted((data / "outbox-objects").glob("*.dcm"))
    assert len(originals) == 2
    with sqlite3.connect(copy / "outbox.sqlite3") as db:  # as an earlier version wrote it
        db.execute("UPDATE outbox SET path = ? WHERE sop_instance_uid = ?",
                   (str(originals[0]), originals[0].stem))  # fmt: skip
    restored = Outbox(copy / "outbox.sqlite3")
    try:
        restored.retry(states=("pending",))
        items = restored.claim("pacs")
        assert sorted(restored.object_file(i) for i in items) == sorted(
            copy / "outbox-objects" / p.name for p in originals
        )
        assert {str(restored.load(i).SOPInstanceUID) for i in items} == {p.stem for p in originals}
        for item in items:
            restored.mark_sent(item)
    finally:
        restored.close()
    assert list((copy / "outbox-objects").glob("*.dcm")) == []
    assert sorted((data / "outbox-objects").glob("*.dcm")) == originals  # left alone


def test_a_data_folder_named_with_uri_characters_and_a_damaged_backup(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A folder named with '#', '?' or '%' made backup open another file (a stray empty one
    outside the data folder) or none; restore put a damaged copy in place, and the node then
    refused to start on it. Now the backup copies that folder, and a damaged copy is refused
    before anything moves."""
    data = tmp_path / "odd dir#1?x=%41" / "data"
    with _running(make_settings(data)):
        pass
    backup = tmp_path / "b"
    assert main(["backup", "--data-dir", str(data), str(backup)]) == EXIT_OK, capsys.readouterr()
    assert _integrity(backup / "jobs.sqlite3") == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "odd dir#1?x=%41"]
    manifest = json.loads((backup / MANIFEST).read_text())
    assert manifest["version"] == __version__

    jobs = backup / "jobs.sqlite3"
    jobs.write_bytes(jobs.read_bytes()[: 4096 + 100])  # cut short
    target = tmp_path / "restored"
    target.mkdir()
    (target / "keep.txt").write_text("the folder there")
    assert main(["restore", "--data-dir", str(target), str(backup)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"{jobs} is damaged" in err and "nothing was changed" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_a_data_folder_the_node_makes_is_private_to_its_user(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Under umask 022 (a node started by hand, not by its unit) the databases were made 0644
    and the folders 0755: the job and outbox databases hold patients' names, IDs and birth
    dates. Whatever the umask, nobody but the node's user reads them."""
    data = tmp_path / "data"
    old = os.umask(0o022)
    try:
        with _running(_settings(data, free_port())) as node:
            study = small_study(tmp_path / "in")
            assert storescu(node.scp.port, *study["t1c"]).returncode == 0
            wait_for(lambda: node.outbox.counts().get("pacs", {}).get("pending") == 2,
                     timeout=60, what="the failure notice queued")  # fmt: skip
            readable = sorted(
                str(p.relative_to(data))
                for p in [data, *data.rglob("*")]
                if stat.S_IMODE(p.stat().st_mode) & 0o007
            )
    finally:
        os.umask(old)
    assert readable == []
    for name in ("jobs.sqlite3", "outbox.sqlite3"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600


def _stopped_node_with_a_notice(tmp_path: Path) -> Path:
    """A stopped node's data folder holding a failed job and its failure notice (2 objects
    waiting in the outbox for a PACS that is down)."""
    data = tmp_path / "data"
    with _running(_settings(data, free_port())) as node:
        study = small_study(tmp_path / "in")
        assert storescu(node.scp.port, *study["t1c"]).returncode == 0
        wait_for(lambda: node.outbox.counts().get("pacs", {}).get("pending") == 2, timeout=60,
                 what="the failure notice to wait for the PACS")  # fmt: skip
    return data


def _restore_refused(tmp_path: Path, backup: Path, capsys) -> str:  # type: ignore[no-untyped-def]
    """Restore ``backup`` onto a folder of its own; it must be refused with a message (no
    traceback) and change nothing there. Returns the message."""
    target = tmp_path / f"target-{backup.name}"
    target.mkdir()
    (target / "keep.txt").write_text("the folder there")
    assert main(["restore", "--data-dir", str(target), str(backup)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("glioforecast: restore") and "Traceback" not in err, err
    assert "nothing was changed" in err, err
    assert [p.name for p in tmp_path.glob(f"*{target.name}*")] == [target.name]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    return err


def _backup_copy(source: Path, name: str) -> Path:
    import shutil

    copy = source.with_name(name)
    shutil.copytree(source, copy)
    return copy


def test_restore_refuses_an_emptied_or_foreign_job_database(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A job database truncated to 0 bytes (a copy to a full disk, an interrupted rsync) is an
    empty database to SQLite, and its quick check says ok: restore put it in place, and the
    node started with no job history, giving the spool's studies new job ids beside the
    outbox rows of the old ones. Restore refuses a database without the node's tables, and one
    with fewer pages than the backup wrote."""
    data = _stopped_node_with_a_notice(tmp_path)
    backup = tmp_path / "backup"
    assert main(["backup", "--data-dir", str(data), str(backup)]) == EXIT_OK
    capsys.readouterr()

    emptied = _backup_copy(backup, "emptied")
    (emptied / "jobs.sqlite3").write_bytes(b"")
    err = _restore_refused(tmp_path, emptied, capsys)
    assert (
        f"{emptied / 'jobs.sqlite3'} is damaged: expected the table(s) jobs, instances of the "
        "node's jobs.sqlite3, found no table (0 bytes: an empty or emptied file)"
    ) in err

    outbox = _backup_copy(backup, "no-outbox-table")
    with sqlite3.connect(outbox / "outbox.sqlite3") as db:
        db.execute("DROP TABLE outbox")
    err = _restore_refused(tmp_path, outbox, capsys)
    assert "expected the table(s) outbox of the node's outbox.sqlite3, found " in err

    # a job database with the node's tables but fewer pages than the backup wrote: another,
    # smaller one (an older copy, another node's) put in its place
    smaller = _backup_copy(backup, "smaller")
    manifest = json.loads((backup / MANIFEST).read_text())
    pages = manifest["databases"]["jobs.sqlite3"]
    manifest["databases"]["jobs.sqlite3"] = pages + 3
    (smaller / MANIFEST).write_text(json.dumps(manifest))
    err = _restore_refused(tmp_path, smaller, capsys)
    assert (
        f"{smaller / 'jobs.sqlite3'} is damaged: expected the {pages + 3} page(s) the backup "
        f"wrote, found {pages} (the file was cut short)"
    ) in err

    # the backup itself restores
    assert main(["restore", "--data-dir", str(tmp_path / "restored"), str(backup)]) == EXIT_OK


def test_restore_explains_a_damaged_manifest_a_later_version_and_a_missing_database(  # type: ignore[no-untyped-def]
    tmp_path, capsys
) -> None:
    """A cut-short manifest gave a Python traceback; a backup made by a later version was
    restored with "the node brings its databases up to date" (an earlier version misreads a
    later one's databases); a missing outbox database was called damaged."""
    data = _stopped_node_with_a_notice(tmp_path)
    backup = tmp_path / "backup"
    assert main(["backup", "--data-dir", str(data), str(backup)]) == EXIT_OK
    capsys.readouterr()
    manifest = json.loads((backup / MANIFEST).read_text())

    cut = _backup_copy(backup, "cut")
    (cut / MANIFEST).write_text('{"version": "0.1.0", "databases": ')
    err = _restore_refused(tmp_path, cut, capsys)
    assert f"{cut / MANIFEST} is damaged: expected the JSON object glioforecast backup " in err
    assert "found text that does not read as JSON" in err

    listed = _backup_copy(backup, "listed")
    (listed / MANIFEST).write_text(json.dumps(list(manifest)))
    err = _restore_refused(tmp_path, listed, capsys)
    assert f"{listed / MANIFEST} is damaged: expected a JSON object, found a JSON list" in err

    later = _backup_copy(backup, "later")
    (later / MANIFEST).write_text(json.dumps({**manifest, "version": "9.9.0"}))
    err = _restore_refused(tmp_path, later, capsys)
    assert (
        f"expected a backup made by glioforecast {__version__} or an earlier version, found one "
        f"made by 9.9.0 at {later}"
    ) in err
    assert "restore it with glioforecast 9.9.0 or later" in err

    missing = _backup_copy(backup, "missing")
    (missing / "outbox.sqlite3").unlink()
    err = _restore_refused(tmp_path, missing, capsys)
    assert f"{missing / 'outbox.sqlite3'} is missing (the backup's {MANIFEST} lists it)" in err

    # an earlier version's backup is restored, saying so
    earlier = _backup_copy(backup, "earlier")
    (earlier / MANIFEST).write_text(json.dumps({**manifest, "version": "0.0.9"}))
    assert main(["restore", "--data-dir", str(tmp_path / "r"), str(earlier)]) == EXIT_OK
    assert f"made by glioforecast 0.0.9, this is {__version__}" in capsys.readouterr().out


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


def test_a_backup_by_hand_and_its_restore_are_private_whatever_the_umask(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Under umask 022 (the documented `sudo -u glioforecast glioforecast backup ...`) the
    copy's databases were 0644 and its folders 0755: only the top folder's 0700 kept the
    patients' names from other users, and a site backup that takes the contents away loses it.
    A restore kept those modes in the data folder."""
    data = _stopped_node_with_a_notice(tmp_path)
    backup = tmp_path / "backup"
    old = os.umask(0o022)
    try:
        assert main(["backup", "--data-dir", str(data), str(backup)]) == EXIT_OK
    finally:
        os.umask(old)
    modes = _modes(backup)
    assert modes["."] == 0o700
    for name in ("jobs.sqlite3", "outbox.sqlite3", MANIFEST, "secret.key"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    assert (backup / "spool").is_dir() and (backup / "outbox-objects").is_dir()
    assert {p: oct(m) for p, m in modes.items() if m & 0o027} == {}

    # an earlier version's copy, whose folders and files other users could read
    for path in [*backup.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    capsys.readouterr()
    assert main(["restore", "--data-dir", str(data), str(backup)]) == EXIT_OK
    modes = _modes(data)
    assert modes["."] == modes["spool"] == modes["outbox-objects"] == 0o750
    assert {
        p: oct(m) for p, m in modes.items() if p.startswith("spool/") and m not in (0o750, 0o640)
    } == {}
    for name in ("jobs.sqlite3", "outbox.sqlite3", "secret.key"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    assert {p: oct(m) for p, m in modes.items() if m & 0o027} == {}


def _backup_with_a_file_size_limit(data: Path, destination: Path, limit: int):  # type: ignore[no-untyped-def]
    """``glioforecast backup`` in a process that cannot write a file beyond ``limit`` bytes
    (EFBIG, as ENOSPC for a full disk)."""
    import resource
    import signal
    import sys

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "backup", "--data-dir", str(data),
         str(destination)],
        capture_output=True, text=True, preexec_fn=limited, timeout=120,
    )  # fmt: skip


def test_a_backup_that_fails_removes_the_copy_it_made(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A backup onto a disk that filled up left its partial copy (databases, spool), which the
    timer's clean-up (only folders with the manifest) never removes: each night added one, and
    the backup disk stayed full. It removes what it made, and only that."""
    data = _stopped_node_with_a_notice(tmp_path)
    largest = max(p.stat().st_size for p in data.rglob("*") if p.is_file())
    # copied last (another file of the folder): everything else is copied by then
    (data / "site-notes.txt").write_bytes(b"x" * (largest + 2**20))
    disk = tmp_path / "disk"
    disk.mkdir()
    made = disk / "2026" / "b1"  # its parent is made too
    failed = _backup_with_a_file_size_limit(data, made, largest + 2**16)
    assert failed.returncode == EXIT_FAILED, failed.stderr
    assert "Traceback" not in failed.stderr
    assert f"backup of {data} into {made} failed: [Errno 27] File too large" in failed.stderr
    assert f"the incomplete copy was removed ({disk / '2026'})" in failed.stderr
    assert list(disk.iterdir()) == []

    empty = disk / "given"  # an empty folder the site made: emptied, kept
    empty.mkdir()
    failed = _backup_with_a_file_size_limit(data, empty, largest + 2**16)
    assert failed.returncode == EXIT_FAILED, failed.stderr
    assert f"the incomplete copy was removed ({empty} is left empty, as it was)" in failed.stderr
    assert [p.name for p in disk.iterdir()] == ["given"] and list(empty.iterdir()) == []

    (data / "site-notes.txt").unlink()
    done = _backup_with_a_file_size_limit(data, empty, largest + 2**16)
    assert done.returncode == EXIT_OK, done.stderr
    assert (empty / MANIFEST).is_file()


def test_a_node_started_during_a_restore_never_runs_on_an_empty_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Restore moved the data folder aside, then renamed the copy into place: a node started
    in between (systemd's Restart=on-failure, an operator) found no folder and no lock, made a
    new empty one, and the second rename failed: the node ran on an empty data folder, the
    data aside. Each rename is slowed here (strace) to open that window wide; a node that
    starts meanwhile is refused by the lock, or starts on the restored folder."""
    import sys

    from dicom_node.backup import _exchange

    strace = tool("strace")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot swap two folders in one step (RENAME_EXCHANGE)")
    data = _stopped_node_with_a_notice(tmp_path)
    backup = tmp_path / "backup"
    assert main(["backup", "--data-dir", str(data), str(backup)]) == EXIT_OK
    (job,) = _read_jobs(backup)
    with _running(make_settings(data)) as node:  # the folder that is there: other jobs
        node.store.add_event(None, "mark", "the folder that was there")
    restoring = subprocess.Popen(
        [strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=rename,renameat,renameat2",
         "-e", "inject=rename,renameat,renameat2:delay_exit=1500000",
         sys.executable, "-m", "dicom_node.cli", "restore", "--data-dir", str(data),
         str(backup)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    try:
        # from when restore holds the folder (it makes its copy beside it), nodes start
        wait_for(lambda: restoring.poll() is not None or list(tmp_path.glob(".data.restoring-*")),
                 timeout=60, interval=0.01, what="restore to begin its copy")  # fmt: skip
        while restoring.poll() is None:
            try:
                with _running(make_settings(data)) as node:
                    seen.append([j.study_instance_uid for j in node.store.list_jobs()])
            except GlioforecastError:  # refused: restore holds the folder's lock
                pass
    finally:
        out, err = restoring.communicate(timeout=60)
    if "ptrace" in err.lower() and restoring.returncode != 0:
        pytest.skip(f"strace cannot trace here: {err.strip()}")
    assert restoring.returncode == EXIT_OK, err
    assert "restored the backup made" in out
    assert seen, "no node started after the swap"
    assert all(jobs == [job.study_instance_uid] for jobs in seen), seen
    assert [j.study_instance_uid for j in _read_jobs(data)] == [job.study_instance_uid]


def _read_jobs(folder: Path):  # type: ignore[no-untyped-def]
    from dicom_node.jobs import JobStore

    store = JobStore(folder / "jobs.sqlite3")
    try:
        return store.list_jobs()
    finally:
        store.close()
