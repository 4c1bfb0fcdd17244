"""Persistent outbox: idempotent enqueue, back-off, dead letters, restarts, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from dicom_node.errors import SendError
from dicom_node.outbox import Outbox, OutboxSender, RetryPolicy, deliver_due
from dicom_node.outbox_cli import outbox_path, register
from dicom_node.ports import free_port
from dicom_node.scu import Destination
from dicom_node.settings import load_settings
from tests.conftest import wait_for
from tests.dicom_node.test_scu import StoreSCP
from tests.sr_writer.synthetic_job import default_outputs


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _objects() -> list[Dataset]:
    out = default_outputs()
    return [*out.sc[:4], out.seg, out.rtstruct, out.sr]


def _outbox(tmp_path: Path, clock: Clock, **policy: float) -> Outbox:
    p = RetryPolicy(
        retry_initial_s=policy.get("initial", 10.0),
        retry_max_s=policy.get("max", 60.0),
        dead_after_attempts=int(policy.get("dead", 5)),
    )
    return Outbox(tmp_path / "outbox.sqlite3", policy=p, clock=clock)


def test_enqueue_is_idempotent(tmp_path: Path) -> None:
    objs = _objects()
    with _outbox(tmp_path, Clock()) as ob:
        assert ob.enqueue(objs, ["pacs", "tps"], job="job-1") == 2 * len(objs)
        assert ob.enqueue(objs, ["pacs", "tps"], job="job-1") == 0
        assert ob.enqueue(objs[:2], ["pacs", "archive"], job="job-1") == 2
        assert len(ob.items()) == 2 * len(objs) + 2
        assert ob.counts()["pacs"] == {"pending": len(objs)}
        files = sorted(p.name for p in ob.objects_dir.iterdir())
        assert files == sorted(f"{d.SOPInstanceUID}.dcm" for d in objs)
        with pytest.raises(SendError, match="no destination"):
            ob.enqueue(objs, [], job="job-1")


def test_backoff_dead_letter_and_retry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    down = Destination("pacs", "PACS", "127.0.0.1", free_port())
    caplog.set_level(logging.WARNING, logger="dicom_node.outbox")
    with _outbox(tmp_path, clock, initial=10, max=25, dead=4) as ob:
        ob.enqueue(_objects()[:2], ["pacs"], job="job-7")
        delays = []
        for attempt in range(1, 5):
            report = deliver_due(ob, [down])
            items = ob.items()
            assert {i.attempts for i in items} == {attempt}
            if attempt < 4:
                assert report.failed == 2 and report.dead == 0
                assert {i.state for i in items} == {"pending"}
                delay = items[0].next_attempt_at - clock.t
                delays.append(delay)
                # not due yet: nothing is tried
                clock.t += delay - 1
                assert deliver_due(ob, [down]).failed == 0
                clock.t += 1
            else:
                assert report.dead == 2
                assert {i.state for i in items} == {"dead"}
        assert delays == [10.0, 20.0, 25.0]
        assert all(
            "cannot connect" in (i.last_error or "") or "no association" in (i.last_error or "")
            for i in ob.items()
        )
        # every failed attempt is logged, one line for the batch (not one per object: a
        # destination down for a day made thousands), with the job id and no patient data
        retries = [r.getMessage() for r in caplog.records if "failed (attempt" in r.getMessage()]
        assert [m.split(":")[1] for m in retries] == [
            f" 2 deliveries to pacs failed (attempt {n}), retry in {d} s" for n, d in
            ((1, "10.0"), (2, "20.0"), (3, "25.0"))
        ], retries  # fmt: skip
        ours = [r for r in caplog.records if r.name == "dicom_node.outbox"]
        assert ours and all(getattr(r, "job", None) == "job-7" for r in ours)
        deaths = [r.getMessage() for r in caplog.records if "dead after" in r.getMessage()]
        assert len(deaths) == 1, deaths
        assert deaths[0].startswith("outbox: 2 deliveries to pacs are dead after 4 attempts: ")
        assert not any(
            "Lef" in r.getMessage() or "GF-0001" in r.getMessage() for r in caplog.records
        )
        # re-queue the dead letters: they go out now that the PACS is up
        scp = StoreSCP(ae_title="PACS").start(port=down.port)
        try:
            assert ob.retry(destination="pacs") == 2
            assert {(i.state, i.attempts) for i in ob.items()} == {("pending", 0)}
            report = deliver_due(ob, [down])
        finally:
            scp.stop()
        assert report.sent == 2
        assert sorted(scp.received) == sorted(i.sop_instance_uid for i in ob.items())
        assert not list(ob.objects_dir.glob("*.dcm")), "delivered objects are deleted"


def test_survives_a_restart_and_resends_once(tmp_path: Path) -> None:
    objs = _objects()
    clock = Clock()
    scp = StoreSCP().start()
    try:
        dest = scp.destination()
        ob = _outbox(tmp_path, clock)
        ob.enqueue(objs, ["pacs"], job="job-2")
        claimed = ob.claim("pacs", limit=3)  # a sender took 3 rows, then the process died
        assert len(claimed) == 3
        ob.close()

        ob = _outbox(tmp_path, clock)
        assert ob.counts()["pacs"] == {"sending": 3, "pending": len(objs) - 3}
        assert ob.recover() == 3
        assert deliver_due(ob, [dest]).sent == len(objs)
        # the job is re-run after the crash: same UIDs, nothing new to send
        assert ob.enqueue(objs, ["pacs"], job="job-2") == 0
        assert deliver_due(ob, [dest]).sent == 0
        ob.close()
    finally:
        scp.stop()
    assert sorted(scp.received) == sorted(str(d.SOPInstanceUID) for d in objs)


def test_two_destinations_one_down(tmp_path: Path) -> None:
    objs = _objects()[:3]
    scp = StoreSCP().start()
    down = Destination("tps", "TPS", "127.0.0.1", free_port())
    try:
        with _outbox(tmp_path, Clock()) as ob:
            ob.enqueue(objs, ["pacs", "tps"], job="job-3")
            report = deliver_due(ob, [scp.destination("pacs"), down])
            assert report.sent == 3 and report.failed == 3
            assert ob.counts() == {"pacs": {"sent": 3}, "tps": {"pending": 3}}
            # files stay until the planning system has them too
            assert len(list(ob.objects_dir.glob("*.dcm"))) == 3
    finally:
        scp.stop()
    assert scp.associations == 1


def test_permanent_failure_goes_dead_at_once(tmp_path: Path) -> None:
    out = default_outputs()
    scp = StoreSCP(fail_with={str(out.sr.SOPInstanceUID): 0x0122}).start()
    try:
        with _outbox(tmp_path, Clock(), dead=50) as ob:
            ob.enqueue([out.sc[0], out.sr], ["pacs"], job="job-4")
            report = deliver_due(ob, [scp.destination()])
            assert report.sent == 1 and report.dead == 1
            [dead] = ob.items(state="dead")
            assert dead.sop_instance_uid == str(out.sr.SOPInstanceUID)
            assert dead.last_status == 0x0122 and dead.attempts == 1
    finally:
        scp.stop()


def _cli(data_dir: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["--data-dir", str(data_dir), *argv])
    return int(args.func(args))


def test_cli_list_and_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    with Outbox(
        outbox_path(tmp_path), policy=RetryPolicy(1, 1, dead_after_attempts=1), clock=clock
    ) as ob:
        ob.enqueue(_objects()[:2], ["pacs"], job="job-5")
        deliver_due(ob, [Destination("pacs", "PACS", "127.0.0.1", free_port())])
    assert _cli(tmp_path, "outbox", "list", "--state", "dead", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and {r["state"] for r in rows} == {"dead"}
    assert all(r["job"] == "job-5" and r["last_error"] for r in rows)
    assert _cli(tmp_path, "outbox", "list") == 0
    text = capsys.readouterr().out
    assert "pacs: dead=2" in text
    assert _cli(tmp_path, "outbox", "retry", "--id", str(rows[0]["id"])) == 0
    assert "1 deliveries re-queued" in capsys.readouterr().out
    with Outbox(outbox_path(tmp_path)) as ob:
        assert ob.counts() == {"pacs": {"dead": 1, "pending": 1}}
    assert _cli(tmp_path / "elsewhere", "outbox", "list") == 2
    # a dead delivery given up for good: withdrawn, its object gone, the reason kept
    with pytest.raises(SystemExit):
        _cli(tmp_path, "outbox", "abandon", "--destination", "pacs")
    assert "the following arguments are required: --reason" in capsys.readouterr().err
    assert _cli(tmp_path, "outbox", "abandon", "--reason", "x") == 2
    assert "expected --destination or --id" in caplog.text
    reason = "the archive takes no Secondary Captures (ticket 4711)"
    assert _cli(tmp_path, "outbox", "abandon", "--destination", "pacs", "--reason", reason) == 0
    assert "1 dead deliveries abandoned" in capsys.readouterr().out
    with Outbox(outbox_path(tmp_path)) as ob:
        assert ob.counts() == {"pacs": {"withdrawn": 1, "pending": 1}}
        (gone,) = ob.items(state="withdrawn")
        assert gone.last_error == f"abandoned by an operator: {reason}"
        assert not ob.object_file(gone).exists() and ob.undelivered("job-5") == 1
    assert _cli(tmp_path, "outbox", "abandon", "--id", str(gone.id), "--reason", "again") == 1


def test_cli_is_wired_into_glioforecast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    with Outbox(outbox_path(tmp_path), clock=Clock()) as ob:
        ob.enqueue(_objects()[:1], ["pacs"], job="job-6")
    assert main(["outbox", "list", "--data-dir", str(tmp_path), "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["state"] == "pending" and row["job"] == "job-6"


def test_policy_and_destinations_from_the_settings() -> None:
    from dicom_node import settings as settings_mod

    s = settings_mod.Settings(
        destinations=(settings_mod.Destination(name="pacs", ae_title="PACS", host="h", port=104),),
        sending=settings_mod.SendingSettings(
            retry_initial_s=2.0, retry_max_s=30.0, dead_after_attempts=7
        ),
    )
    assert RetryPolicy.from_settings(s.sending) == RetryPolicy(2.0, 30.0, 7)
    assert [Destination.from_settings(d) for d in s.destinations] == [
        Destination("pacs", "PACS", "h", 104)
    ]
    assert [RetryPolicy(2.0, 30.0, 7).delay(n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 16, 30]


def test_a_destination_that_accepts_none_of_the_classes_is_dead_at_once(tmp_path: Path) -> None:
    """A PACS that takes MR images only refuses every context of a batch of results: no
    attempt will do better until it is configured, so the deliveries go dead at the first (they
    were retried 50 times over about 7 hours), as an object whose class alone it refuses."""
    out = default_outputs()
    scp = StoreSCP(sop_classes=(MRImageStorage,)).start()
    try:
        with _outbox(tmp_path, Clock(), dead=50) as ob:
            ob.enqueue([out.seg, out.rtstruct, out.sr], ["pacs"], job="job-5")
            report = deliver_due(ob, [scp.destination()])
            assert (report.sent, report.failed, report.dead) == (0, 0, 3)
            dead = ob.items(state="dead")
            assert [d.attempts for d in dead] == [1, 1, 1]
            assert "accepted none of the presentation contexts proposed" in dead[0].last_error
    finally:
        scp.stop()


class TickingClock(Clock):
    """A clock that moves on a millisecond at every reading, as the real one does."""

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def test_a_batch_that_failed_is_due_again_as_one(tmp_path: Path) -> None:
    """Each row of a failed batch was stamped with its own time, so the first was due again
    alone and went in an association of its own before the others, at every retry."""
    clock = TickingClock()
    down = Destination("pacs", "PACS", "127.0.0.1", free_port())
    with _outbox(tmp_path, clock) as ob:
        ob.enqueue(_objects(), ["pacs"], job="job-6")
        assert deliver_due(ob, [down]).failed == len(_objects())
        due = {item.next_attempt_at for item in ob.items()}
        assert len(due) == 1
        clock.t = due.pop()
        assert len(ob.claim("pacs")) == len(_objects())


def test_a_delivery_pass_sees_a_jobs_results_all_at_once(tmp_path: Path) -> None:
    """The results of a job become deliverable together, with the replacement of the earlier
    ones: a pass running while they were queued took them a few at a time (a study in a dozen
    associations), before the replacement was recorded."""
    seen: list[int] = []

    class Watched(Outbox):
        def _write_object(self, ds: Dataset) -> Path:
            other = sqlite3.connect(tmp_path / "outbox.sqlite3")  # the delivery pass's view
            try:
                rows = other.execute("SELECT count(*) FROM outbox").fetchone()[0]
                rows += other.execute("SELECT count(*) FROM replacements").fetchone()[0]
            finally:
                other.close()
            seen.append(rows)
            return super()._write_object(ds)

    with Watched(tmp_path / "outbox.sqlite3") as ob:
        ob.enqueue(_objects()[:2], ["pacs"], job="job-7")
        seen.clear()
        ob.enqueue(_objects()[2:], ["pacs"], job="job-8", replaces=["job-7"])
        assert seen == [2] * len(_objects()[2:])  # only job-7's rows, the whole time
        assert len(ob.items()) == len(_objects())


def test_a_stop_during_a_slow_delivery_keeps_what_was_delivered(tmp_path: Path) -> None:
    """A stop while a slow PACS takes a batch: the loop ends after the object it is sending,
    what the PACS acknowledged is recorded as sent, the rest is pending again with no attempt
    counted, and the next start sends only the rest (the stop closed the database under the
    loop, which went on sending; every object was sent again after the start)."""
    objs = default_outputs().all()[:12]
    scp = StoreSCP(delay_s=0.2).start()
    try:
        with Outbox(tmp_path / "outbox.sqlite3") as ob:
            ob.enqueue(objs, ["pacs"], job="job-9")
            sender = OutboxSender(ob, [scp.destination()], poll_s=0.1)
            sender.start()
            wait_for(lambda: len(scp.received) >= 3, timeout=30, what="three objects stored")
            assert sender.stop(timeout=10) == []
            counts = ob.counts()["pacs"]
            assert counts.get("sent", 0) == len(scp.received) < len(objs)
            assert counts["pending"] == len(objs) - len(scp.received)
            assert all(i.attempts == 0 for i in ob.items(state="pending"))
            again = OutboxSender(ob, [scp.destination()], poll_s=0.1)
            again.start()
            wait_for(lambda: ob.counts()["pacs"] == {"sent": len(objs)}, timeout=30)
            again.stop()
        assert sorted(scp.received) == sorted(str(d.SOPInstanceUID) for d in objs)
    finally:
        scp.stop()


def test_a_pacs_slower_than_the_response_timeout_can_be_waited_for(tmp_path: Path) -> None:
    """The C-STORE response timeout was fixed at 60 s: a PACS that took longer (it compresses
    or forwards before answering) stored every object while the node counted each attempt
    failed, and sent it again. ``sending.response_timeout_s`` sets it."""
    objs = default_outputs().all()[:1]
    scp = StoreSCP(delay_s=1.5).start()
    try:
        with _outbox(tmp_path, Clock()) as ob:
            ob.enqueue(objs, ["pacs"], job="job-10")
            report = deliver_due(ob, [scp.destination()], timeout_s=1.0)
            assert report.failed == 1 and "no C-STORE response" in report.errors[0]
            ob.retry(states=("pending",))
            assert deliver_due(ob, [scp.destination()], timeout_s=5.0).sent == 1
    finally:
        scp.stop()
    s = load_settings(None)
    assert s.sending.response_timeout_s == 60.0


def test_each_object_is_recorded_as_the_pacs_acknowledges_it(tmp_path: Path) -> None:
    """Rows were marked once the whole batch (up to 500 objects) had gone: a node killed in
    the middle sent every object of the batch again at its next start. Each is recorded as
    its response comes: what the database says at any moment is what the PACS has."""
    objs = default_outputs().all()[:8]
    scp = StoreSCP(delay_s=0.3).start()
    try:
        with Outbox(tmp_path / "outbox.sqlite3") as ob:
            ob.enqueue(objs, ["pacs"], job="job-11")
            passes = threading.Thread(target=deliver_due, args=(ob, [scp.destination()]))
            passes.start()
            query = "SELECT sop_instance_uid FROM outbox WHERE state = 'sent'"

            def sent_now() -> set[str]:  # what a restart would read
                other = sqlite3.connect(tmp_path / "outbox.sqlite3")
                try:
                    return {r[0] for r in other.execute(query)}
                finally:
                    other.close()

            sent = wait_for(lambda: len(sent_now()) >= 3 and sent_now(), timeout=30)
            assert passes.is_alive(), "the batch was still being sent"
            passes.join(30)
            assert len(sent) < len(objs) and sent <= set(scp.received)
            assert ob.counts()["pacs"] == {"sent": len(objs)}
    finally:
        scp.stop()
