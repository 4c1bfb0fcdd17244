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

from dicom_node import __version__
from dicom_node.backup import MANIFEST, _settle_outbox
from dicom_node.cli import EXIT_FAILED, EXIT_OK, main
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
