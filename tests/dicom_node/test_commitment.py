"""Storage commitment: the requests the outbox makes, the reports the receiver takes, and what
goes wrong (no report, a PACS without storage commitment, a refused request, bad reports).

The PACS here is a pynetdicom peer, so that it can answer what Orthanc never does (it cannot be
told to stay silent or refuse); the exchange with Orthanc is tested in
``tests/integration/test_storage_commitment.py``."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE, CommitmentReport, send_report
from dicom_node.errors import SendError
from dicom_node.outbox import Outbox, RetryPolicy, deliver_due
from dicom_node.outbox_cli import register
from dicom_node.scu import Destination
from dicom_node.service import Node
from dicom_node.settings import Destination as DestinationSettings
from tests.conftest import wait_for
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_outbox import Clock, _objects
from tests.dicom_node.test_scu import ALL_CLASSES, StoreSCP


@dataclass
class CommitmentPACS:
    """A storage SCP that takes storage commitment requests and records them; it reports
    nothing by itself (the test sends the reports it wants), unless ``report_at_once``: then it
    reports at once what it holds, and 0x0112 (no such object instance) for the rest."""

    action_status: int = 0x0000
    report_at_once: bool = False  # on the request's own association, as soon as it answered
    # how it takes an N-ACTION: "answer" (with action_status), "abort" (A-ABORT, no response:
    # Orthanc with AllowStorageCommitment false), "silent" (no response for silent_s)
    on_action: str = "answer"
    silent_s: float = 3.0
    # stores each object under a SOP Instance UID of its own (Orthanc with IngestTranscoding
    # to a lossy syntax, an archive that re-identifies)
    rewrites_uids: bool = False
    lose_once: set[str] = field(default_factory=set)  # loses the first copy of these
    ae_title: str = "COMMITPACS"
    stored: list[str] = field(default_factory=list)  # the SOP Instance UIDs received
    held: set[str] = field(default_factory=set)  # those it keeps objects under
    requests: list[tuple[str, list[str]]] = field(default_factory=list)
    server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> CommitmentPACS:
        ae = AE(ae_title=self.ae_title)
        for sop in ALL_CLASSES:
            ae.add_supported_context(sop)
        ae.add_supported_context(PUSH_MODEL)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)],
        )
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self.server is not None:
            self.server.shutdown()

    def destination(self) -> Destination:
        assert self.server is not None
        port = int(self.server.server_address[1])
        return Destination("pacs", self.ae_title, "127.0.0.1", port, storage_commitment=True)

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.stored.append(uid)
            if uid in self.lose_once:
                self.lose_once.discard(uid)
            else:
                self.held.add(f"2.25.{uuid.uuid4().int}" if self.rewrites_uids else uid)
        return 0x0000

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        assert event.request.ActionTypeID == 1
        assert str(event.request.RequestedSOPInstanceUID) == PUSH_MODEL_INSTANCE
        with self._lock:
            self.requests.append(
                (
                    str(info.TransactionUID),
                    [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence],
                )
            )
        if self.on_action == "abort":  # what Orthanc does when it takes none from us
            event.assoc.abort()
            return 0x0110, None  # never sent: the association is gone
        if self.on_action == "silent":
            self._stopping.wait(self.silent_s)
        if self.report_at_once:
            answer = Dataset()
            answer.TransactionUID = info.TransactionUID
            with self._lock:
                kept = [i for i in info.ReferencedSOPSequence
                        if i.ReferencedSOPInstanceUID in self.held]  # fmt: skip
                lost = [i for i in info.ReferencedSOPSequence
                        if i.ReferencedSOPInstanceUID not in self.held]  # fmt: skip
            answer.ReferencedSOPSequence = kept
            for item in lost:
                item.FailureReason = 0x0112  # no such object instance
            if lost:
                answer.FailedSOPSequence = lost
            assoc = event.assoc

            def report_now() -> None:
                time.sleep(0.2)  # once the N-ACTION response is out
                kind = 2 if lost else 1
                assoc.send_n_event_report(answer, kind, PUSH_MODEL, PUSH_MODEL_INSTANCE)

            threading.Thread(target=report_now, daemon=True).start()
        return self.action_status, None


SC = "1.2.840.10008.5.1.4.1.1.7"


def report(
    port: int,
    transaction: str,
    committed: Sequence[str] = (),
    failed: Sequence[tuple[str, int]] = (),
    *,
    event_type: int | None = None,
) -> int | None:
    """Send a storage commitment report to the node as a PACS does (its own association, the
    PACS in the SCP role). Returns the response status; None when the node refused it."""
    node = Destination("node", "GLIOFORECAST", "127.0.0.1", port)
    try:
        return send_report(
            node,
            transaction,
            [(SC, uid) for uid in committed],
            [(SC, uid, reason) for uid, reason in failed],
            calling_ae="COMMITPACS",
            event_type=event_type,
        )
    except SendError:
        return None


@pytest.fixture
def pacs() -> Iterator[CommitmentPACS]:
    peer = CommitmentPACS().start()
    yield peer
    peer.stop()


def _outbox(tmp_path: Path, clock: Clock, **policy: Any) -> Outbox:
    settings: dict[str, Any] = {
        "retry_initial_s": 10.0,
        "retry_max_s": 60.0,
        "dead_after_attempts": 5,
        "commitment_timeout_s": 600.0,
        "commitment_max_requests": 3,
    }
    p = RetryPolicy(**{**settings, **policy})
    return Outbox(tmp_path / "outbox.sqlite3", policy=p, clock=clock)


def _problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The outbox's WARNING and ERROR lines so far (and forgets them)."""
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "dicom_node.outbox" and r.levelno >= logging.WARNING
    ]
    caplog.clear()
    return lines


def test_unanswered_requests_are_made_again_then_the_delivery_is_dead(
    tmp_path: Path,
    pacs: CommitmentPACS,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    dest = pacs.destination()
    objs = _objects()
    with _outbox(tmp_path, clock) as ob:
        ob.enqueue(objs, [dest.name], job="job-1")
        first = deliver_due(ob, [dest])
        assert first.sent == len(objs) and first.commitment_requests == 1
        assert sorted(pacs.stored) == sorted(str(d.SOPInstanceUID) for d in objs)
        [(_transaction, listed)] = pacs.requests
        assert listed == [str(d.SOPInstanceUID) for d in objs]
        assert ob.counts() == {dest.name: {"committing": len(objs)}}
        assert ob.undelivered("job-1") == len(objs)
        assert len(list(ob.objects_dir.iterdir())) == len(objs), "objects kept until committed"
        assert ob.next_due() == clock.t + 600.0

        clock.t += 599
        assert deliver_due(ob, [dest]).commitment_requests == 0
        clock.t += 1
        assert deliver_due(ob, [dest]).commitment_requests == 1
        clock.t += 600
        assert deliver_due(ob, [dest]).commitment_requests == 1
        transactions = [t for t, _ in pacs.requests]
        assert len(set(transactions)) == 3, "each request has its own Transaction UID"
        assert all(t.startswith("2.25.") for t in transactions)
        assert pacs.stored == [str(d.SOPInstanceUID) for d in objs], "nothing sent twice"

        clock.t += 600
        caplog.clear()
        assert deliver_due(ob, [dest]).commitment_requests == 0
        items = ob.items()
        assert {i.state for i in items} == {"dead"}
        [dead] = _problems(caplog)  # one line for the request's objects, not one each
        assert dead.startswith(f"outbox: {len(objs)} deliveries to pacs are dead (")
        assert f"and {len(objs) - 3} more): no storage commitment report from pacs" in dead
        assert all("no storage commitment report from pacs for 3 requests" in (i.last_error or "")
                   for i in items)  # fmt: skip
        assert len(list(ob.objects_dir.iterdir())) == len(objs), "a dead row keeps its object"

        # the PACS answers the first request at last: what it keeps is delivered (the late
        # report was ignored as "not requested", and the rows stayed dead)
        late = CommitmentReport(transactions[0], tuple(listed[:2]), (), caller="COMMITPACS")
        assert ob.apply_report(late)["committed"] == 2
        assert ob.counts() == {dest.name: {"sent": 2, "dead": len(objs) - 2}}
        assert len(list(ob.objects_dir.iterdir())) == len(objs) - 2
        for uid in listed[:2]:
            ob.enqueue([d for d in objs if str(d.SOPInstanceUID) == uid], [dest.name], "job-1")
        assert ob.counts() == {dest.name: {"sent": 2, "dead": len(objs) - 2}}
        listed = listed[2:]
        objs = [d for d in objs if str(d.SOPInstanceUID) in listed]

        # the operator re-queues them: sent again, and asked about again
        assert ob.retry() == len(objs)
        assert deliver_due(ob, [dest]).sent == len(objs)
        assert ob.counts() == {dest.name: {"committing": len(objs), "sent": 2}}

    args = _cli(tmp_path, "list", "--state", "committing")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.count("awaiting report") == len(objs) and "pacs: committing=" in out


def _cli(data_dir: Path, *argv: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path)
    sub = parser.add_subparsers(dest="command")
    register(sub)
    return parser.parse_args(["--data-dir", str(data_dir), "outbox", *argv])


def test_a_report_on_the_requests_own_association_is_taken(tmp_path: Path) -> None:
    """A PACS may report at once, on the association of the request: pynetdicom dropped it
    ("N-EVENT-REPORT message received during association release, ignoring") and the rows
    waited for the timeout, then the requests again. The association waits for it now."""
    pacs = CommitmentPACS(report_at_once=True).start()
    try:
        objs = _objects()
        with _outbox(tmp_path, Clock()) as ob:
            ob.enqueue(objs, ["pacs"], job="job-2")
            report = deliver_due(ob, [pacs.destination()])
            assert report.sent == len(objs) and report.commitment_requests == 1
            assert ob.counts() == {"pacs": {"sent": len(objs)}}
            assert all(i.committed_at for i in ob.items())
    finally:
        pacs.stop()


def test_a_pacs_without_storage_commitment_makes_the_deliveries_dead(tmp_path: Path) -> None:
    plain = StoreSCP().start()
    try:
        dest = dataclasses.replace(plain.destination(), storage_commitment=True)
        with _outbox(tmp_path, Clock()) as ob:
            ob.enqueue(_objects(), [dest.name], job="job-1")
            result = deliver_due(ob, [dest])
            assert result.sent == len(_objects()) and result.dead == len(_objects())
            [error] = {i.last_error for i in ob.items()}
            assert error is not None
            assert "expected pacs (TESTPACS@" in error
            assert "found that it accepts no Storage Commitment Push Model context" in error
            assert "storage_commitment: false" in error
            assert len(plain.received) == len(_objects())
    finally:
        plain.stop()


def test_turning_storage_commitment_off_settles_what_waits_for_it(
    tmp_path: Path, pacs: CommitmentPACS, caplog: pytest.LogCaptureFixture
) -> None:
    dest = pacs.destination()
    with _outbox(tmp_path, Clock()) as ob:
        ob.enqueue(_objects(), [dest.name], job="job-1")
        deliver_due(ob, [dest])
        assert ob.counts() == {dest.name: {"committing": len(_objects())}}
        # the site sets storage_commitment: false for this PACS and restarts the node
        deliver_due(ob, [dataclasses.replace(dest, storage_commitment=False)])
        assert ob.counts() == {dest.name: {"sent": len(_objects())}}
        assert all(i.committed_at is None for i in ob.items())
        assert not any(ob.objects_dir.iterdir())
    assert "has storage_commitment: false now" in caplog.text


def test_a_refused_request_backs_off_and_is_made_again(
    tmp_path: Path, pacs: CommitmentPACS
) -> None:
    clock = Clock()
    dest = pacs.destination()
    pacs.action_status = 0x0110  # processing failure: the PACS may do better later
    with _outbox(tmp_path, clock) as ob:
        ob.enqueue(_objects(), [dest.name], job="job-1")
        result = deliver_due(ob, [dest])
        assert result.commitment_requests == 0 and result.failed == len(_objects())
        items = ob.items()
        assert {i.state for i in items} == {"committing"}
        assert all(i.attempts == 2 and i.commit_requests == 0 for i in items)
        assert all("N-ACTION status 0x0110" in (i.last_error or "") for i in items)
        assert ob.next_due() == clock.t + 20.0  # the back-off of a second failed attempt

        pacs.action_status = 0x0000
        clock.t += 19
        assert deliver_due(ob, [dest]).commitment_requests == 0
        clock.t += 1
        assert deliver_due(ob, [dest]).commitment_requests == 1
        assert len(pacs.requests) == 2
        assert all(i.commit_requests == 1 for i in ob.items())

        pacs.action_status = 0x0123  # no such action: this PACS will not do it
        clock.t += 600
        result = deliver_due(ob, [dest])
        assert result.dead == len(_objects())
        assert all("0x0123" in (i.last_error or "") for i in ob.items())


def _uids(objs: Sequence[Dataset]) -> list[str]:
    return [str(d.SOPInstanceUID) for d in objs]


def test_a_pacs_that_changes_uids_on_arrival_gets_each_object_twice_at_most(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc transcoding what it receives (IngestTranscoding to a lossy syntax) stores each
    object under a new SOP Instance UID, then reports that it holds none of those sent
    (0x0112): the outbox sent them again and again, the PACS's series grew from 44 to 468
    images in 90 s. The second such report makes the rows dead, with an error that says why."""
    pacs = CommitmentPACS(report_at_once=True, rewrites_uids=True).start()
    dest = pacs.destination()
    clock = Clock()
    objs = _objects()
    try:
        with _outbox(tmp_path, clock, dead_after_attempts=50) as ob:  # the settings' default
            ob.enqueue(objs, [dest.name], job="job-1")
            first = deliver_due(ob, [dest])
            assert first.sent == len(objs) and first.commitment_requests == 1
            items = ob.items()
            assert {i.state for i in items} == {"pending"}, "a file lost can happen once"
            assert all("0x0112 (no such object instance) after storing it: sent once more"
                       in (i.last_error or "") for i in items)  # fmt: skip
            [line] = _problems(caplog)  # one line for the transaction, not one per object
            assert f"pacs holds none of the {len(objs)} objects of transaction " in line
            assert "it may change SOP Instance UIDs on arrival (e.g. transcoding)" in line
            assert f"{len(objs)} sent once more, 0 dead" in line

            clock.t = min(i.next_attempt_at for i in items)
            assert deliver_due(ob, [dest]).sent == len(objs)
            items = ob.items()
            assert {i.state for i in items} == {"dead"}
            for item in items:
                assert (
                    "pacs stored it and then reported it does not hold it (0x0112) twice: it "
                    "may change SOP Instance UIDs on arrival (e.g. transcoding), which storage "
                    "commitment cannot follow; turn storage_commitment off for it or stop the "
                    "rewriting" in (item.last_error or "")
                )
                assert (item.last_error or "").startswith(
                    "expected pacs to hold the object it stored (C-STORE status 0x0000)"
                )
            [line] = _problems(caplog)
            assert f"0 sent once more, {len(objs)} dead (reported not held twice)" in line

            for _ in range(5):  # nothing more goes out, however long the node runs
                clock.t += 3600
                assert deliver_due(ob, [dest]).sent == 0
            assert sorted(pacs.stored) == sorted(_uids(objs) * 2)
            assert len(pacs.held) == 2 * len(objs)

            # the site turns storage commitment off for it and re-queues them: delivered
            plain = dataclasses.replace(dest, storage_commitment=False)
            assert ob.retry(destination="pacs") == len(objs)
            assert deliver_due(ob, [plain]).sent == len(objs)
            assert ob.counts() == {"pacs": {"sent": len(objs)}}
    finally:
        pacs.stop()


def test_an_object_the_pacs_lost_once_is_sent_again_and_committed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One object reported not held (a file lost on the PACS's side) is sent once more, and
    delivered when the PACS then keeps it; the line does not blame UID rewriting."""
    pacs = CommitmentPACS(report_at_once=True).start()
    dest = pacs.destination()
    clock = Clock()
    objs = _objects()
    lost = str(objs[2].SOPInstanceUID)
    pacs.lose_once.add(lost)
    try:
        with _outbox(tmp_path, clock) as ob:
            ob.enqueue(objs, [dest.name], job="job-1")
            deliver_due(ob, [dest])
            states = {i.sop_instance_uid: i.state for i in ob.items()}
            assert states.pop(lost) == "pending" and set(states.values()) == {"sent"}
            [line] = _problems(caplog)
            assert "pacs did not commit to keeping 1 objects of transaction " in line
            assert "0x0112 (no such object instance)" in line and lost in line
            assert "transcoding" not in line

            clock.t += 3600
            deliver_due(ob, [dest])
            assert ob.counts() == {"pacs": {"sent": len(objs)}}
            assert pacs.stored.count(lost) == 2
    finally:
        pacs.stop()


def test_a_pacs_that_aborts_the_request_refuses_it_after_three_in_a_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc with AllowStorageCommitment false (or not knowing our AE title) aborts the
    association on the N-ACTION, within milliseconds: that was retried up to 50 attempts with
    one WARNING per object each time (546 lines a minute for 91 objects). Three in a row are a
    refusal, and each try is one line."""
    pacs = CommitmentPACS(on_action="abort").start()
    dest = pacs.destination()
    clock = Clock()
    objs = _objects()
    try:
        with _outbox(tmp_path, clock, dead_after_attempts=50) as ob:
            ob.enqueue(objs, [dest.name], job="job-1")
            first = deliver_due(ob, [dest])
            assert first.sent == len(objs) and first.commitment_requests == 0
            assert first.failed == len(objs)
            items = ob.items()
            assert {i.state for i in items} == {"committing"}
            error = items[0].last_error or ""
            assert error.startswith(f"expected an N-ACTION response from {dest}, found an "
                                    "A-ABORT right after the request")  # fmt: skip
            assert error.endswith(
                "the PACS aborted the storage commitment request: it may not allow storage "
                "commitment from AE GLIOFORECAST"
            )
            [line] = _problems(caplog)
            assert line.startswith(
                f"outbox: storage commitment request for {len(objs)} objects at pacs failed "
                "(attempt 2), asking again in 20.0 s ("
            )
            assert "the PACS aborted the storage commitment request" in line

            clock.t = ob.next_due() or 0
            assert deliver_due(ob, [dest]).failed == len(objs)
            assert {i.state for i in ob.items()} == {"committing"}
            assert len(_problems(caplog)) == 1

            clock.t = ob.next_due() or 0
            third = deliver_due(ob, [dest])
            assert third.dead == len(objs)
            items = ob.items()
            assert {i.state for i in items} == {"dead"}
            assert {i.last_error for i in items} == {
                f"expected {dest} to take storage commitment requests from this node "
                "(storage_commitment: true), found that it aborted the request 3 times in a row "
                "(A-ABORT right after the N-ACTION, no response): it may not allow storage "
                "commitment from AE GLIOFORECAST: enable storage commitment for our AE title on "
                "the PACS, or set storage_commitment: false"
            }
            [line] = _problems(caplog)
            assert line.startswith(f"outbox: {len(objs)} deliveries to pacs are dead after 4 ")
            assert len(pacs.requests) == 3
            assert ob.next_due() is None, "nothing left to try"
            assert sorted(pacs.stored) == sorted(_uids(objs)), "stored once"
    finally:
        pacs.stop()


def test_a_request_left_unanswered_is_no_abort_by_the_pacs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No response within the timeout (the node aborts the association itself) is not the
    PACS refusing: it is named as a timeout, and it breaks a run of aborted requests."""
    pacs = CommitmentPACS(on_action="abort", silent_s=3.0).start()
    dest = pacs.destination()
    clock = Clock()
    try:
        with _outbox(tmp_path, clock, dead_after_attempts=50) as ob:
            ob.enqueue(_objects(), [dest.name], job="job-1")
            deliver_due(ob, [dest])
            clock.t = ob.next_due() or 0
            deliver_due(ob, [dest])
            assert {i.state for i in ob.items()} == {"committing"}  # two aborted in a row

            pacs.on_action = "silent"
            clock.t = ob.next_due() or 0
            caplog.clear()
            deliver_due(ob, [dest], timeout_s=1.0)
            items = ob.items()
            assert {i.state for i in items} == {"committing"}
            assert {i.last_error for i in items} == {
                f"expected an N-ACTION response from {dest} within 1 s, found none (timeout)"
            }
            assert "aborted" not in " ".join(_problems(caplog))

            pacs.on_action = "abort"  # the run starts again: two more are not yet three
            for _ in range(2):
                clock.t = ob.next_due() or 0
                deliver_due(ob, [dest])
            assert {i.state for i in ob.items()} == {"committing"}
            clock.t = ob.next_due() or 0
            assert deliver_due(ob, [dest]).dead == len(_objects())
            assert len(pacs.requests) == 6
    finally:
        pacs.stop()


@pytest.fixture
def node_and_pacs(
    tmp_path: Path, pacs: CommitmentPACS, run_node: Callable[..., Node]
) -> tuple[Node, CommitmentPACS]:
    dest = pacs.destination()
    settings = make_settings(tmp_path / "data", sending={"retry_initial_s": 0.0})
    entry = DestinationSettings(
        name=dest.name,
        ae_title=dest.ae_title,
        host=dest.host,
        port=dest.port,
        storage_commitment=True,
    )
    return run_node(dataclasses.replace(settings, destinations=(entry,))), pacs


def test_reports_received_by_the_node(
    node_and_pacs: tuple[Node, CommitmentPACS], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    node, pacs = node_and_pacs
    ob = node.outbox
    objs = _objects()
    uids = [str(d.SOPInstanceUID) for d in objs]
    ob.enqueue(objs, ["pacs"], job="job-7")
    node.sender.wake()
    wait_for(lambda: len(pacs.requests) == 1, what="the commitment request")
    [(transaction, listed)] = pacs.requests
    assert listed == uids
    port = node.scp.port
    # what monitoring sees while the PACS has not reported
    assert node.health is not None
    metrics = _metrics(node.health.port)
    assert (
        f'glioforecast_deliveries{{destination="pacs",state="committing"}} {len(objs)}' in metrics
    )
    assert _value(metrics, 'glioforecast_delivery_oldest_waiting_seconds{destination="pacs"}') > 0

    # not storage commitment reports: refused with the status that says why
    assert report(port, transaction, uids[:1], event_type=3) == 0x0113
    assert report(port, "", uids[:1]) == 0x0115
    assert report(port, transaction, uids[:1], [(uids[1], 0x0110)], event_type=1) == 0x0115
    assert ob.counts() == {"pacs": {"committing": len(objs)}}, "a refused report changes nothing"
    # a transaction this node never asked for: answered, and logged
    assert report(port, "2.25.12345", uids) == 0x0000
    assert "did not request" in caplog.text
    assert ob.counts() == {"pacs": {"committing": len(objs)}}

    # part of the objects committed, one refused for good, one the PACS ran out of room for
    status = report(
        port,
        transaction,
        [*uids[:-2], "2.25.999"],
        [(uids[-2], 0x0122), (uids[-1], 0x0213)],
    )
    assert status == 0x0000
    states = {i.sop_instance_uid: i for i in ob.items()}
    assert all(states[u].state == "sent" and states[u].committed_at for u in uids[:-2])
    assert states[uids[-2]].state == "dead"
    assert "0x0122 (referenced SOP class not supported)" in (states[uids[-2]].last_error or "")
    # resent by the sender (woken by the report), then asked about in a new transaction
    wait_for(lambda: len(pacs.requests) == 2, what="the request for the resent object")
    assert pacs.stored.count(uids[-1]) == 2
    assert pacs.requests[1][1] == [uids[-1]]
    assert "1 objects the request did not list" in caplog.text

    # a late report of the first request commits what still waits for a commitment
    assert report(port, transaction, [uids[-1]]) == 0x0000
    assert next(i for i in ob.items() if i.sop_instance_uid == uids[-1]).state == "sent"
    assert ob.undelivered("job-7") == 1  # the dead one
    metrics = _metrics(node.health.port)
    assert _value(metrics, 'glioforecast_delivery_oldest_waiting_seconds{destination="pacs"}') == 0
    assert [p.name for p in ob.objects_dir.iterdir()] == [f"{uids[-2]}.dcm"]
    # what is delivered or dead needs its requests no more
    kept = sqlite3.connect(ob.path).execute("SELECT COUNT(*) FROM commitments").fetchone()[0]
    assert kept == 0


def test_a_report_without_role_negotiation_is_taken(
    node_and_pacs: tuple[Node, CommitmentPACS],
) -> None:
    """A PACS that sends its report without proposing the SCP role (no SCP/SCU Role Selection
    item) is still heard."""
    node, pacs = node_and_pacs
    objs = _objects()
    node.outbox.enqueue(objs, ["pacs"], job="job-8")
    node.sender.wake()
    wait_for(lambda: len(pacs.requests) == 1, what="the commitment request")
    [(transaction, listed)] = pacs.requests
    ae = AE(ae_title="COMMITPACS")
    ae.add_requested_context(PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = transaction
    info.ReferencedSOPSequence = []
    for uid in listed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = SC, uid
        info.ReferencedSOPSequence.append(item)
    status, _ = assoc.send_n_event_report(info, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
    assoc.release()
    assert int(status.Status) == 0x0000
    assert node.outbox.counts() == {"pacs": {"sent": len(objs)}}


def test_a_scanner_asking_the_node_for_storage_commitment_is_refused(
    node_and_pacs: tuple[Node, CommitmentPACS], caplog: pytest.LogCaptureFixture
) -> None:
    """The node takes reports, not requests: it does not keep what it receives."""
    node, _ = node_and_pacs
    ae = AE(ae_title="MR_SCANNER")
    ae.add_requested_context(PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = "2.25.77"
    info.ReferencedSOPSequence = []
    status, _ = assoc.send_n_action(info, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
    assoc.release()
    assert int(status.Status) == 0x0122
    assert "storage commitment request from MR_SCANNER refused (0x0122)" in caplog.text


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        return str(rsp.read().decode())


def _value(metrics: str, series: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith(series + " ")]
    return float(line.split()[-1])


def test_a_node_without_storage_commitment_does_not_take_reports(
    run_node: Callable[..., Node],
) -> None:
    node = run_node()
    assert report(node.scp.port, "2.25.1", ["2.25.2"]) is None
    assert node.outbox.counts() == {}


def _earlier_outbox(
    db: Path, objs: Sequence[Dataset], schema: str
) -> tuple[sqlite3.Connection, list[tuple[Any, ...]]]:
    """An outbox database at ``db`` made with an earlier version's ``schema``, empty, and the
    rows of ``objs`` queued for "pacs" as this version writes them (their objects' files
    written the way every version writes them), for the caller to insert as that version did."""
    with Outbox(db) as ob:
        ob.enqueue(objs, ["pacs"], job="job-old")
    rows = (
        sqlite3.connect(db)
        .execute(
            "SELECT sop_instance_uid, sop_class_uid, series_instance_uid, destination, job, path, "
            "next_attempt_at, created_at, updated_at FROM outbox ORDER BY id"
        )
        .fetchall()
    )
    db.unlink()
    old = sqlite3.connect(db)
    old.executescript(schema)
    return old, rows


OLD_SCHEMA = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    job TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    last_status INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX outbox_due ON outbox (state, destination, next_attempt_at);
CREATE INDEX outbox_sop ON outbox (sop_instance_uid);
"""


def test_an_outbox_made_before_storage_commitment_is_upgraded(
    tmp_path: Path, pacs: CommitmentPACS
) -> None:
    db = tmp_path / "outbox.sqlite3"
    objs = _objects()
    old, rows = _earlier_outbox(db, objs, OLD_SCHEMA)
    old.executemany(
        "INSERT INTO outbox (sop_instance_uid, sop_class_uid, series_instance_uid, destination, "
        "job, path, state, next_attempt_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        rows,
    )
    old.execute("UPDATE outbox SET state = 'sent', sent_at = 5 WHERE id = 1")
    old.commit()
    old.close()

    dest = pacs.destination()
    with Outbox(db) as ob:
        assert ob.counts() == {"pacs": {"sent": 1, "pending": len(objs) - 1}}
        assert ob.items()[0].sent_at == 5 and ob.items()[0].committed_at is None
        assert deliver_due(ob, [dest]).commitment_requests == 1
        assert ob.counts() == {"pacs": {"sent": 1, "committing": len(objs) - 1}}
    with Outbox(db) as ob:  # opening it again changes nothing
        assert ob.counts() == {"pacs": {"sent": 1, "committing": len(objs) - 1}}


# the outbox table of the version before the counts of 0x0112 reports and aborted requests
PREVIOUS_SCHEMA = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    job TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'sending', 'committing', 'sent', 'dead', 'withdrawn',
                         'rejected')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    last_status INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    commit_requested_at REAL,
    commit_requests INTEGER NOT NULL DEFAULT 0,
    committed_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX outbox_due ON outbox (state, destination, next_attempt_at);
CREATE INDEX outbox_sop ON outbox (sop_instance_uid);
"""


def test_an_outbox_of_the_previous_version_takes_the_new_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbox the previous version made, with rows waiting for a commitment, gets the
    columns that count 0x0112 reports and aborted requests on its first start; its rows are
    then made dead by a PACS that rewrites UIDs like new ones."""
    caplog.set_level(logging.INFO, logger="dicom_node.outbox")
    db = tmp_path / "outbox.sqlite3"
    objs = _objects()
    old, rows = _earlier_outbox(db, objs, PREVIOUS_SCHEMA)
    old.executemany(  # acknowledged by C-STORE, the commitment not yet asked for
        "INSERT INTO outbox (sop_instance_uid, sop_class_uid, series_instance_uid, destination, "
        "job, path, state, attempts, last_status, next_attempt_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 'committing', 1, 0, ?, ?, ?)",
        rows,
    )
    old.commit()
    old.close()

    pacs = CommitmentPACS(report_at_once=True, rewrites_uids=True).start()
    clock = Clock(max(r[-3] for r in rows))
    try:
        with _outbox(tmp_path, clock) as ob:
            assert "columns not_held, commit_aborts added" in caplog.text
            assert ob.counts() == {"pacs": {"committing": len(objs)}}
            assert {(i.not_held, i.commit_aborts) for i in ob.items()} == {(0, 0)}
            assert deliver_due(ob, [pacs.destination()]).commitment_requests == 1
            assert {(i.state, i.not_held) for i in ob.items()} == {("pending", 1)}
            clock.t += 3600
            assert deliver_due(ob, [pacs.destination()]).sent == len(objs)
            assert {(i.state, i.not_held) for i in ob.items()} == {("dead", 2)}
        caplog.clear()
        with Outbox(db) as ob:  # opening it again changes nothing
            assert ob.counts() == {"pacs": {"dead": len(objs)}}
        assert "added" not in caplog.text
    finally:
        pacs.stop()


def test_check_destinations_says_which_take_results_as_configured(
    tmp_path: Path,
    pacs: CommitmentPACS,
    run_node: Callable[..., Node],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dicom_node.cli import main
    from dicom_node.ports import free_port

    node = run_node()  # a peer that stores, but does no storage commitment
    good = pacs.destination()
    config = tmp_path / "site.yaml"
    config.write_text(
        "destinations:\n"
        f"  - {{name: pacs, ae_title: {good.ae_title}, host: 127.0.0.1, port: {good.port},\n"
        "     storage_commitment: true}\n"
        f"  - {{name: archive, ae_title: GLIOFORECAST, host: 127.0.0.1, port: {node.scp.port},\n"
        "     storage_commitment: true}\n"
        f"  - {{name: viewer, ae_title: VIEWER, host: 127.0.0.1, port: {free_port()}}}\n"
    )
    assert main(["--config", str(config), "check-destinations"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok   pacs (COMMITPACS@127.0.0.1:")
    assert out[0].endswith(
        "C-ECHO success; Storage Commitment Push Model accepted; the 4 result SOP classes accepted"
    )
    assert out[1].startswith("FAIL archive (GLIOFORECAST@127.0.0.1:")
    assert "C-ECHO success; Storage Commitment Push Model not accepted" in out[1]
    assert out[2].startswith("FAIL viewer (VIEWER@127.0.0.1:")
    assert "no association with viewer" in out[2]
    assert main(["--config", str(config), "check-destinations", "pacs"]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "check-destinations", "nowhere"]) == 1
    assert "expected destination names of the configuration (pacs, archive, viewer)" in (
        capsys.readouterr().err
    )


def test_check_destinations_names_the_result_classes_a_pacs_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS that takes MR images only answered C-ECHO, and check-destinations said "ok";
    every result sent to it went dead. The classes each destination is sent (its objects, and
    the failure notice's) are proposed and the refused ones named."""
    from dicom_node.cli import main

    mr_only = StoreSCP(sop_classes=(MRImageStorage, "1.2.840.10008.1.1")).start()
    try:
        config = tmp_path / "site.yaml"
        config.write_text(
            "destinations:\n"
            f"  - {{name: pacs, ae_title: TESTPACS, host: 127.0.0.1, port: {mr_only.port},\n"
            "     failure_notice: true}\n"
            f"  - {{name: tps, ae_title: TESTPACS, host: 127.0.0.1, port: {mr_only.port},\n"
            "     objects: [rtstruct]}\n"
        )
        assert main(["--config", str(config), "check-destinations"]) == 1
    finally:
        mr_only.stop()
    pacs, tps = capsys.readouterr().out.splitlines()
    assert pacs.startswith("FAIL pacs") and pacs.endswith(
        "C-ECHO success; results refused: Comprehensive 3D SR Storage, Comprehensive SR "
        "Storage (failure notices), RT Structure Set Storage, Secondary Capture Image Storage, "
        "Segmentation Storage not accepted (set its objects)"
    )
    assert tps.startswith("FAIL tps") and tps.endswith(
        "results refused: RT Structure Set Storage not accepted (set its objects)"
    )


def test_an_operator_asks_again_for_the_commitments_awaited(
    tmp_path: Path, pacs: CommitmentPACS, capsys: pytest.CaptureFixture[str]
) -> None:
    """The node was down while the PACS reported: ``outbox retry --committing`` asks again now
    rather than after the timeout."""
    clock = Clock(time.time())  # the command uses the real clock
    dest = pacs.destination()
    with _outbox(tmp_path, clock) as ob:
        ob.enqueue(_objects(), [dest.name], job="job-1")
        deliver_due(ob, [dest])
        assert len(pacs.requests) == 1
    args = _cli(tmp_path, "retry", "--committing")
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"{len(_objects())} deliveries re-queued"
    clock.t = time.time() + 1  # the command's "now" has come, not the timeout (600 s)
    with _outbox(tmp_path, clock) as ob:
        assert deliver_due(ob, [dest]).commitment_requests == 1
        assert ob.counts() == {dest.name: {"committing": len(_objects())}}
        assert all(i.commit_requests == 1 for i in ob.items())
    assert len(pacs.requests) == 2 and pacs.requests[0][0] != pacs.requests[1][0]
    assert pacs.stored.count(str(_objects()[0].SOPInstanceUID)) == 1, "not sent again"


def test_a_release_held_up_by_a_report_being_recorded_is_aborted_in_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS reporting on the request's own association: the report is handled on the
    association's reactor thread, and pynetdicom's release waits, without a limit, for that
    thread to pause. A report whose recording hung (a database lock held elsewhere) kept the
    delivery thread in the release for as long; now the release is given up and the
    association aborted (the PACS sends the report again later)."""
    from dicom_node import commitment, scu

    monkeypatch.setattr(scu, "RELEASE_WAIT_S", 1.0)
    pacs = CommitmentPACS(report_at_once=True).start()
    recording = threading.Event()
    recorded = threading.Event()

    def hung(report: CommitmentReport) -> None:
        recording.set()
        recorded.wait(30)

    try:
        started = time.monotonic()
        commitment.request(
            pacs.destination(), "2.25.1", [(MRImageStorage, "2.25.2")],
            calling_ae="GLIOFORECAST", on_report=hung, wait_s=2.0,
        )  # fmt: skip
        took = time.monotonic() - started
        assert recording.is_set(), "the PACS's report did not come on the association"
        assert took < 20, took
        assert "the release did not end within 1 s; aborted instead" in caplog.text
    finally:
        recorded.set()
        pacs.stop()
