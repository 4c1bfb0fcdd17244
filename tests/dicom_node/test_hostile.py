"""Hostile and malformed input against a running node, and many senders at once.

Over 300 malformed instances (garbage bytes, truncations, missing or oversized UIDs, impossible
image sizes, mismatched instance UIDs), unknown callers, studies with missing roles or a
structure set on another frame of reference, 8 concurrent senders, and floods of connections that
say nothing: the service stays up, every refusal carries a status or a reason, and every instance
answered with success is on disk.
"""

from __future__ import annotations

import copy
import random
import re
import select
import subprocess
import threading
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.jobs import DONE, FAILED, SUPERSEDED, Job
from dicom_node.scu import hold_reactor
from dicom_node.settings import AllowedCaller
from tests import factories
from tests.audit_repository import security_alerts
from tests.conftest import tool, wait_for
from tests.dicom_node.test_scp import echoscu, storescu
from tests.dicom_node.test_stow import TOKEN, _stow

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SEED = 20261121


def _dataset_bytes(ds: Dataset) -> bytes:
    """The dataset encoded as on the wire (explicit VR little endian, no file meta)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _mutants(template: Dataset, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(kind, SOP Instance UID in the request, encoded dataset) for every hostile variant."""
    out: list[tuple[str, str, bytes]] = []
    good = _dataset_bytes(template)
    uid = str(template.SOPInstanceUID)
    for i in range(120):  # random garbage of random length
        out.append(("garbage", f"1.2.826.0.1.77.{i}", rng.randbytes(rng.randint(0, 4096))))
    for _ in range(100):  # the real dataset cut anywhere
        out.append(("truncated", uid, good[: rng.randint(0, len(good) - 1)]))
    for _ in range(40):  # random bytes flipped in the header part
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(0, 600)] = rng.randrange(256)
        out.append(("flipped", uid, bytes(data)))
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds = copy.deepcopy(template)
        delattr(ds, keyword)
        out.append((f"no {keyword}", uid, _dataset_bytes(ds)))
        ds = copy.deepcopy(template)
        setattr(ds, keyword, "1." + "2" * 70)
        out.append((f"long {keyword}", uid, _dataset_bytes(ds)))
        for not_a_uid in ("1.2.3.abc.4", "../../../tmp/evil"):  # the outputs would carry them
            ds = copy.deepcopy(template)
            setattr(ds, keyword, not_a_uid)
            out.append((f"{keyword} {not_a_uid}", uid, _dataset_bytes(ds)))
    for rows, cols in ((65535, 65535), (0, 0), (1, 70000 % 65536)):
        ds = copy.deepcopy(template)
        ds.Rows, ds.Columns = rows, cols
        out.append((f"size {rows}x{cols}", uid, _dataset_bytes(ds)))
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    out.append(("uid differs from request", uid, _dataset_bytes(ds)))
    for other in (CT, "1.2.840.10008.5.1.4.1.1.481.5"):  # a class accepted, one not
        ds = copy.deepcopy(template)
        ds.SOPClassUID = other
        out.append(("class differs from request", uid, _dataset_bytes(ds)))
    for i in range(40):  # valid instances, to be accepted among the hostile ones
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = f"1.2.826.0.1.78.{i + 1}"
        out.append(("valid", str(ds.SOPInstanceUID), _dataset_bytes(ds)))
    rng.shuffle(out)
    return out


def _store_raw(  # type: ignore[no-untyped-def]
    assoc, context_id: int, sop_uid: str, data: bytes, msg_id: int, sop_class: str = MR
) -> int | None:
    """C-STORE whatever bytes we like as the dataset (a real client would encode a dataset)."""
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.DataSet = BytesIO(data)
    hold_reactor(assoc)
    assoc.dimse.send_msg(req, context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    return None if rsp is None else int(rsp.Status)


def test_hundreds_of_malformed_instances(run_node, tmp_path: Path) -> None:
    study = factories.small_study(tmp_path / "in")
    template = pydicom.dcmread(study["t1c"][0])
    mutants = _mutants(template, random.Random(SEED))
    assert len(mutants) >= 300
    node = run_node(node={"allowed_callers": (AllowedCaller("SCANNER1"),)})
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(MR, EXPLICIT)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    (context,) = assoc.accepted_contexts
    answers: dict[str, list[int | None]] = {}
    accepted: set[str] = set()
    for n, (kind, sop_uid, data) in enumerate(mutants, start=1):
        if not assoc.is_established:  # a sender may lose its association: it reconnects
            assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
            (context,) = assoc.accepted_contexts
        status = _store_raw(assoc, context.context_id, sop_uid, data, n)
        answers.setdefault(kind, []).append(status)
        if status == 0x0000:
            accepted.add(sop_uid)
    assoc.release()
    # every valid instance is accepted, no broken one is, and each got an answer; a flipped
    # byte may land in a text value and leave a valid instance, which is then accepted
    assert answers["valid"] == [0x0000] * 40
    # (a byte flipped in the SOP Class UID may make it another valid UID)
    assert set(answers.pop("flipped")) <= {0x0000, 0xC210, 0xA900}
    # a data set of another SOP class than its request's: "does not match SOP class"
    assert answers.pop("class differs from request") == [0xA900] * 2
    for kind, statuses in answers.items():
        if kind != "valid":
            assert all(s == 0xC210 for s in statuses), (kind, statuses)
    # nothing accepted is lost, nothing refused was stored
    stored = {pydicom.dcmread(p).SOPInstanceUID for p in node.spool.root.rglob("*.dcm")}
    assert stored == accepted
    # unknown callers are refused, and the service still answers its known sender
    for i in range(20):
        refused = echoscu(node.scp.port, aet=f"ROGUE{i}")
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    assert echoscu(node.scp.port).returncode == 0


def test_a_class_other_than_its_contexts_is_refused(run_node, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """pynetdicom serves a C-STORE by the SOP class its request names, whatever the
    presentation context it comes on: a CT image (or a class the node never accepted) sent on
    the MR context is refused 0x0122, naming both classes, and nothing is stored."""
    study = factories.small_study(tmp_path / "in")
    template = pydicom.dcmread(study["t1c"][0])
    node = run_node()
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(MR, EXPLICIT)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    (context,) = assoc.accepted_contexts
    statuses = []
    for n, other in enumerate((CT, "1.2.840.10008.5.1.4.1.1.7"), start=1):
        ds = copy.deepcopy(template)
        ds.SOPClassUID = other
        ds.SOPInstanceUID = f"1.2.826.0.1.79.{n}"
        statuses.append(_store_raw(
            assoc, context.context_id, str(ds.SOPInstanceUID), _dataset_bytes(ds), n, other
        ))  # fmt: skip
    # the same connection still stores what it should
    statuses.append(_store_raw(
        assoc, context.context_id, str(template.SOPInstanceUID), _dataset_bytes(template), 3
    ))  # fmt: skip
    assoc.release()
    assert statuses == [0x0122, 0x0122, 0x0000]
    assert (
        "SOP class 1.2.840.10008.5.1.4.1.1.2 (CT Image Storage) on presentation context 1, "
        "accepted for 1.2.840.10008.5.1.4.1.1.4 (MR Image Storage)" in caplog.text
    )
    stored = {pydicom.dcmread(p).SOPInstanceUID for p in node.spool.root.rglob("*.dcm")}
    assert stored == {template.SOPInstanceUID}


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_pdu_header_announcing_a_gigabyte_costs_no_memory(run_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """Six bytes from anyone who can connect, before any AE title is checked: a PDU header
    announcing 1 GiB. pynetdicom would read whatever length a header announces; the node reads
    no PDU other than P-DATA-TF longer than 1 MiB, sets nothing aside for the bytes that have
    not come, and closes such a connection at once."""
    import logging
    import socket
    import struct

    caplog.set_level(logging.WARNING, logger="dicom_node.fastpath")
    node = run_node()
    before = _rss_bytes()
    peers = []
    for _ in range(3):
        peer = socket.create_connection(("127.0.0.1", node.scp.port), timeout=20)
        peer.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))  # an A-ASSOCIATE-RQ of 1 GiB
        peers.append(peer)
    for peer in peers:
        assert peer.recv(64) == b""  # closed by the node, nothing answered
        peer.close()
    assert _rss_bytes() - before < 256 * 2**20
    said = [r.getMessage() for r in caplog.records]
    refusal = (
        "connection from 127.0.0.1 closed: its A-ASSOCIATE-RQ PDU announces 1073741824 bytes, "
        "expected at most 1048576 for that PDU type"
    )
    assert said.count(refusal) == 3, said
    assert echoscu(node.scp.port).returncode == 0


def test_a_p_data_pdu_longer_than_the_node_takes_ends_the_association(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, caplog
) -> None:
    """A sender that ignores the maximum PDU length the node announced (256 KiB) and sends a
    2 MiB instance in one P-DATA-TF PDU loses its association; nothing of it is stored. The
    same instance in PDUs of the announced length is stored."""
    import logging

    caplog.set_level(logging.WARNING, logger="dicom_node.fastpath")
    study = factories.small_study(tmp_path / "in")
    big = pydicom.dcmread(study["t1c"][0])
    big.PixelData = bytes(2 * 2**20)
    big.Rows, big.Columns = 1024, 1024
    node = run_node()
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(MR, EXPLICIT)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established and assoc.acceptor.maximum_length == 262144
    # send as if the node had announced no limit
    from pynetdicom.pdu_primitives import MaximumLengthNotification

    for item in assoc.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification):
            item.maximum_length_received = 0
    status = assoc.send_c_store(big)
    assert not status  # no answer: the node closed the connection
    wait_for(lambda: not assoc.is_established, what="the association ended")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "its P-DATA-TF PDU announces 2" in said and "expected at most 1048576" in said
    assert not list(node.spool.root.rglob("*.dcm"))
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.send_c_store(big).Status == 0x0000
    assoc.release()
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1


def _study_with_foreign_frame(folder: Path) -> list[Path]:
    """A T1-Gd series and a structure set drawn on another frame of reference."""
    study = factories.small_study(folder)
    rt = pydicom.dcmread(study["rtstruct"][0])
    rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.826.0.1.999"
    rt.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = "1.2.826.0.1.999"
    rt.save_as(study["rtstruct"][0])
    return study["t1c"] + study["rtstruct"]


def test_bad_studies_fail_with_a_reason_and_many_senders_at_once(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a quiet period long enough that a study sent in one go is never split under this load
    node = run_node(assembly={"quiet_period_s": 2.0})
    storescu = tool("storescu")
    batches: list[list[Path]] = []
    for sender in range(8):
        for s in range(5):
            folder = tmp_path / f"s{sender}" / f"study{s}"
            if s == 0:
                batches.append(_study_with_foreign_frame(folder))
            elif s == 1:
                batches.append(factories.small_study(folder)["flair"])  # no T1-Gd, no RTSTRUCT
            else:
                study = factories.small_study(folder)
                batches.append([p for paths in study.values() for p in paths])
    errors: list[str] = []

    def send(sender: int) -> None:
        for files in batches[sender * 5 : sender * 5 + 5]:
            result = subprocess.run(
                [storescu, "-aet", f"SCANNER{sender}", "-aec", "GLIOFORECAST", "127.0.0.1",
                 str(node.scp.port), *map(str, files)],
                capture_output=True, text=True, env={"TCP_NODELAY": "1"},
            )  # fmt: skip
            if result.returncode != 0:
                errors.append(result.stderr)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    total = sum(len(b) for b in batches)
    assert node.store.counts()["instances"] == total

    def current() -> list[Job]:
        return [j for j in node.store.list_jobs(limit=200) if j.state != SUPERSEDED]

    def finished() -> bool:
        jobs = current()
        return len(jobs) == 40 and all(j.state in (DONE, FAILED) for j in jobs)

    wait_for(finished, timeout=180, what="40 jobs to finish")
    reasons = [j.reason for j in current()]
    assert sum("missing required role t1c" in r for r in reasons) == 8
    foreign = [r for r in reasons if "1.2.826.0.1.999" in r]
    assert len(foreign) == 8 and all("expected the same frame of reference" in r for r in foreign)
    assert all(r for r in reasons)  # every failure says why


def _connect_from(source: str, port: int):  # type: ignore[no-untyped-def]
    """A TCP connection to the node's port from ``source`` (another loopback address), that
    says nothing."""
    import socket

    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_at_once(sock, within_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """Whether the node closes ``sock`` within ``within_s`` without a byte sent either way."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_over_the_limits_are_closed_at_once_and_senders_get_through(  # type: ignore[no-untyped-def]
    run_node, tmp_path, caplog
) -> None:
    """A port scanner (here at 127.0.0.2) that opens connections and says nothing holds at
    most node.max_connections_per_host of them: the rest are closed before a thread starts for
    them, and a scanner at another address still stores. Over node.max_connections in all, a
    sender's connection is closed too, and its retry goes through once connections close. The
    refusals are logged and audited once a minute per address, and counted in the metrics."""
    import logging

    caplog.set_level(logging.WARNING, logger="dicom_node.refusals")
    audit_file = tmp_path / "audit.log"
    node = run_node(
        node={"max_connections": 5, "max_connections_per_host": 3, "max_associations": 2},
        audit={"enabled": True, "file": audit_file},
    )
    port = node.scp.port
    scanner = [_connect_from("127.0.0.2", port) for _ in range(10)]
    others: list = []
    try:
        assert all(_closed_at_once(s) for s in scanner[3:])
        assert not any(_closed_at_once(s, within_s=0.3) for s in scanner[:3])
        study = factories.small_study(tmp_path / "in")
        sent = storescu(port, study["t1c"][0])
        assert "Received Store Response (Success)" in sent.stderr, sent.stderr
        assert wait_for(lambda: node.scp.server.open_connections == 3, what="the store's end")
        others = [_connect_from("127.0.0.3", port) for _ in range(2)]  # five open in all
        assert not any(_closed_at_once(s, within_s=0.3) for s in others)
        assert echoscu(port).returncode != 0
    finally:
        for sock in scanner + others:
            sock.close()
    assert wait_for(lambda: echoscu(port).returncode == 0, what="the echo once they closed")
    said = [r.getMessage() for r in caplog.records if "closed at once" in r.getMessage()]
    from_scanner = [m for m in said if "from 127.0.0.2" in m]
    assert from_scanner == [
        "DICOM receiver: connection from 127.0.0.2 closed at once: 3 connections open from "
        "127.0.0.2, node.max_connections_per_host is 3"
    ], said
    assert any("5 connections open, node.max_connections is 5" in m for m in said), said
    metrics = node.metrics()
    assert (
        'glioforecast_connections_refused_total{listener="dicom",'
        'reason="max_connections_per_host"} 7'
    ) in metrics
    assert 'glioforecast_connections_open{listener="dicom"}' in metrics

    assert wait_for(
        lambda: [a for a in security_alerts(audit_file) if "open from 127.0.0.2" in a],
        what="a security alert for the scanner",
    ) == ["DICOM receiver: connection closed at once: 3 connections open from 127.0.0.2, "
          "node.max_connections_per_host is 3"]  # fmt: skip


def test_the_stow_rs_receiver_holds_as_few_connections(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The limits hold for the STOW-RS port too (an HTTP client that opens connections and
    sends nothing holds a thread each until node.network_timeout_s)."""
    import http.client

    node = run_node(node={"max_connections_per_host": 2}, stow=_stow(tmp_path))
    port = node.stow.port
    idle = [_connect_from("127.0.0.2", port) for _ in range(4)]
    try:
        assert [_closed_at_once(s, within_s=0.3 if n < 2 else 5) for n, s in enumerate(idle)] == [
            False, False, True, True
        ]  # fmt: skip
        web = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        web.request("GET", "/dicom-web/studies")
        assert web.getresponse().status == 405  # answered (a GET is not STOW-RS), not closed
        web.close()
    finally:
        for sock in idle:
            sock.close()
    assert (
        'glioforecast_connections_refused_total{listener="stow",'
        'reason="max_connections_per_host"} 2'
    ) in node.metrics()


def test_a_burst_of_connection_requests_is_not_delayed(run_node) -> None:  # type: ignore[no-untyped-def]
    """A router opens its associations at once: every connection request of a burst of 40 is
    queued by the kernel until the receiver accepts it. With the listen backlog of Python's
    ``socketserver`` (5) the kernel dropped the requests beyond it, and TCP sent each of them
    again a second later."""
    import time

    node = run_node(node={"max_connections_per_host": 40, "max_associations": 40,
                          "max_connections": 40})  # fmt: skip
    socks, slowest = [], 0.0
    try:
        for _ in range(40):
            start = time.perf_counter()
            socks.append(_connect_from("127.0.0.2", node.scp.port))
            slowest = max(slowest, time.perf_counter() - start)
    finally:
        for sock in socks:
            sock.close()
    assert slowest < 0.9, f"a connection request waited {slowest:.1f} s (sent again by TCP)"


def test_a_node_out_of_file_descriptors_recovers_without_leaking(tmp_path: Path) -> None:
    """Connections from five addresses use up the descriptors of a node limited to 60: it
    refuses what it cannot take, and once they close it answers again with the threads and
    descriptors it had. An association whose DUL could not open its wake-up pipe waited for
    its request for ever, holding its thread and its socket."""
    import os
    import resource
    import sys
    import time

    from dicom_node.ports import free_port

    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{port: {port}}}\nhealth: {{enabled: false}}\n"
                      f"storage: {{data_dir: {tmp_path / 'data'}}}\n")  # fmt: skip
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"],
        stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60)),
    )  # fmt: skip

    def held() -> tuple[int, int]:
        status = Path(f"/proc/{node.pid}/status").read_text().splitlines()
        threads = int(next(s for s in status if s.startswith("Threads:")).split()[1])
        return threads, len(os.listdir(f"/proc/{node.pid}/fd"))

    def settled() -> tuple[int, int] | None:
        """What the node holds, once it holds the same half a second later."""
        before = held()
        time.sleep(0.5)
        return before if held() == before else None

    try:
        wait_for(lambda: echoscu(port).returncode == 0, timeout=60, what="the node")
        idle = wait_for(settled, what="the echo's end")
        flood = [_connect_from(f"127.0.0.{2 + n // 16}", port) for n in range(80)]
        try:
            # the node says it ran out (counting its descriptors raced with its accepting)
            wait_for(
                lambda: "Too many open files" in (tmp_path / "node.log").read_text(),
                what="the descriptors used up",
            )
        finally:
            for sock in flood:
                sock.close()
        assert wait_for(lambda: settled() == idle, timeout=15, what="the threads and fds it had")
        assert echoscu(port).returncode == 0
    finally:
        node.terminate()
        node.wait(timeout=60)
        log.close()


def _associate_rq(calling: str, called: str = "GLIOFORECAST") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, as on the wire."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    context = build_context("1.2.840.10008.1.1")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_an_association_request_sent_a_byte_at_a_time_is_cut_off(run_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """A peer that sends its A-ASSOCIATE-RQ a byte at a time, each within the network timeout,
    held the connection and its two threads for as long as it went on: the request as a whole
    must now come within node.acse_timeout_s. The same request sent at once is accepted, and
    an association that waits longer than that once established is not cut off."""
    import logging
    import socket
    import time

    caplog.set_level(logging.WARNING)
    node = run_node(node={"acse_timeout_s": 1.5, "network_timeout_s": 10.0})
    request = _associate_rq("TRICKLE")
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as whole:
        whole.sendall(request)
        assert whole.recv(1) == b"\x02"  # A-ASSOCIATE-AC

    trickle = socket.create_connection(("127.0.0.1", node.scp.port), timeout=10)
    start, closed_after = time.monotonic(), None
    try:
        for byte in request[:40]:  # 10 s of it at most
            try:
                trickle.sendall(bytes([byte]))
            except OSError:  # reset by the node
                closed_after = time.monotonic() - start
                break
            ready = select.select([trickle], [], [], 0.25)[0]
            if ready and trickle.recv(64) in (b"",):
                closed_after = time.monotonic() - start
                break
    finally:
        trickle.close()
    assert closed_after is not None and closed_after < 4.0, closed_after
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as silent:
        assert _closed_at_once(silent, within_s=4.0)  # and one that sends nothing at all
    said = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"closed: no whole A-ASSOCIATE-RQ within node.acse_timeout_s \(2 s; "
                     r"[1-9]\d* bytes of it had come\)", said), said  # fmt: skip
    assert "connection from 127.0.0.1 closed: nothing came within node.acse_timeout_s (2 s)" \
        in said, said  # fmt: skip

    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    time.sleep(2.0)  # longer than node.acse_timeout_s, within the network timeout
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def _trickle(port: int, data: bytes, every_s: float, for_s: float) -> float | None:
    """Send ``data`` to ``port`` a byte every ``every_s`` for at most ``for_s``: the seconds
    after which the server closed the connection (None: it had not)."""
    import socket
    import time

    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for byte in data:
            if time.monotonic() - start > for_s:
                return None
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # reset by the server
                return time.monotonic() - start
            if select.select([sock], [], [], every_s)[0]:
                try:
                    if sock.recv(4096) == b"":
                        return time.monotonic() - start
                except OSError:
                    return time.monotonic() - start
    return None


def test_http_headers_sent_a_byte_at_a_time_are_cut_off(  # type: ignore[no-untyped-def]
    run_node, tmp_path, caplog, monkeypatch
) -> None:
    """A client that sends its request line and headers a byte at a time, each within the
    connection's timeout, held a thread of the STOW-RS receiver or the health endpoint for as
    long as it went on: they must now come whole within node.acse_timeout_s (STOW-RS) or 10 s
    (health; 1.5 s here) of their first byte. A whole request is still answered, a slow body
    is not cut off by it, and a keep-alive connection may wait between requests."""
    import http.client
    import logging
    import time

    import dicom_node.health

    caplog.set_level(logging.WARNING, logger="dicom_node.refusals")
    monkeypatch.setattr(dicom_node.health, "REQUEST_TIMEOUT_S", 1.5)
    node = run_node(node={"acse_timeout_s": 1.5, "network_timeout_s": 10.0},
                    stow=_stow(tmp_path))  # fmt: skip
    request = (b"POST /dicom-web/studies HTTP/1.1\r\nHost: node\r\n"
               + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n")  # fmt: skip
    stow_closed = _trickle(node.stow.port, request, 0.2, 6.0)
    health_closed = _trickle(node.health.port, b"GET /health HTTP/1.1\r\n" + b"X: " + b"a" * 200,
                             0.2, 6.0)  # fmt: skip
    assert stow_closed is not None and stow_closed < 4.0, stow_closed
    assert health_closed is not None and health_closed < 4.0, health_closed
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "STOW-RS receiver: connection from 127.0.0.1 closed: its request line and headers " \
        "did not come whole within 2 s" in said, said  # fmt: skip
    assert "health endpoint: connection from 127.0.0.1 closed: its request line" in said, said

    # a whole request is answered
    conn = http.client.HTTPConnection("127.0.0.1", node.health.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    # a STOW-RS body sent slowly (2.5 s, past the headers' 1.5 s) is read whole; the same
    # connection, idle for longer than 1.5 s, takes the next request
    study = factories.small_study(tmp_path / "in")
    part = study["t1c"][0].read_bytes()
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(len(body)), "Authorization": f"Bearer {TOKEN}",
    }  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", node.stow.port, timeout=10)
    conn.putrequest("POST", "/dicom-web/studies")
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    for i in range(5):
        conn.send(body[i * len(body) // 5 : (i + 1) * len(body) // 5])
        time.sleep(0.5)
    answer = conn.getresponse()
    assert answer.status == 200 and answer.read()
    time.sleep(2.0)
    conn.request("POST", "/dicom-web/studies", body=body, headers=headers)
    assert conn.getresponse().status == 200
    conn.close()


def test_http_or_tls_on_the_dicom_port_is_named_and_closed_at_once(run_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """A web browser or a load balancer's HTTP check pointed at the DICOM port, or a sender
    with TLS on a port without it: the connection is closed at once, and the log says what
    came (pynetdicom logged an error per six bytes read, without the address), once a minute
    per address and kind."""
    import logging
    import socket

    caplog.set_level(logging.WARNING)
    node = run_node()
    client_hello = bytes.fromhex("160301020001000001fc0303") + bytes(64)
    http = b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n"
    for data in [http, http, http, client_hello, b"\x55" + bytes(40)]:
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as sock:
            sock.sendall(data)
            assert _closed_at_once(sock, within_s=2.0), data
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    expected = "connection from 127.0.0.1 closed: expected an A-ASSOCIATE-RQ, found "
    assert said == [
        expected + "an HTTP request (a web browser, or a load balancer's HTTP check?)",
        expected + "a TLS handshake (the sender uses TLS, the port does not: node.tls)",
        expected + "bytes that are no DICOM PDU (b'U\\x00\\x00\\x00\\x00\\x00')",
    ], said
    node.scp.refusals.flush(final=True)  # the two other HTTP requests, counted
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith(
            expected + "an HTTP request (a web browser, or a load balancer's HTTP check?) "
            "(2 more times in the last "
        )
    )
    assert echoscu(node.scp.port).returncode == 0


def test_a_sender_lost_in_the_middle_of_a_pdu_is_named_in_one_line(run_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """A sender that stalls (a frozen process, a cable pulled) or dies in the middle of a
    PDU: pynetdicom logged errors and a traceback that named neither the sender nor the
    timeout. The node says who, what happened and that what was in transfer is not stored."""
    import logging
    import socket
    import struct
    import time

    caplog.set_level(logging.WARNING)
    node = run_node(node={"network_timeout_s": 2.0})
    partial = struct.pack(">BBL", 0x04, 0, 100) + bytes(10)  # a P-DATA-TF, 10 of its 100 bytes
    for stall in (True, False):
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as sock:
            sock.sendall(_associate_rq("SCANNER9"))
            assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
            time.sleep(0.2)
            sock.sendall(partial)
            if stall:  # the node aborts: an A-ABORT, then the connection closed
                sock.settimeout(6.0)
                while sock.recv(64):
                    pass
    lines = [
        "association from SCANNER9 at 127.0.0.1: nothing came for node.network_timeout_s (2 s): "
        "aborted (anything it was in the middle of sending is not stored)",
        "association from SCANNER9 at 127.0.0.1 aborted: the connection failed (Connection "
        "reset by peer) in the middle of a PDU (10 of 100 bytes); what it was sending is not "
        "stored (a sender sends it again)",
    ]
    said = wait_for(
        lambda: (s := [r.getMessage() for r in caplog.records if "SCANNER9" in r.getMessage()])
        and len(s) == 2 and s, what="two lines",
    )  # fmt: skip
    assert said == lines, said
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom.dul")], [
        r.getMessage() for r in caplog.records]  # fmt: skip


def test_a_stop_does_not_wait_for_connections_that_say_nothing(tmp_path: Path) -> None:
    """systemctl stop with a silent connection, a half association request and an
    association open: pynetdicom's abort waited for the ARTIM timer (30 s) on the first two,
    and raised on them. The stop takes well under a second; the association gets an A-ABORT."""
    import socket
    import time

    from dicom_node.service import Node
    from tests.dicom_node.conftest import make_settings

    node = Node(make_settings(tmp_path / "data", health={"enabled": False}))
    node.start()
    silent = socket.create_connection(("127.0.0.1", node.scp.port))
    half = socket.create_connection(("127.0.0.1", node.scp.port))
    half.sendall(_associate_rq("HALF")[:20])
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    time.sleep(0.3)
    start = time.monotonic()
    node.stop()
    assert time.monotonic() - start < 5.0
    assert wait_for(lambda: assoc.is_aborted, what="the A-ABORT")
    for sock in (silent, half):
        assert _closed_at_once(sock, within_s=2.0)
        sock.close()
