"""The receiver's fast path: event-driven reactors, direct Part 10 header, idle CPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.transport import RequestHandler

from dicom_node import fastpath
from dicom_node.scp import VERIFICATION, part10_header
from tests import factories
from tests.conftest import wait_for
from tests.dicom_node.test_scp import echoscu, storescu

INSTALLED_VERIFIED = fastpath.supported()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd, even, odd
        ("1.2.840.10008.5.1.4.1.1.481.3", "1.2.34", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.113619.2.55.3", "1.2.840.10008.1.2.4.90"),
    ],
)
def test_part10_header_matches_pynetdicom(sop_class: str, sop_instance: str, syntax: str) -> None:
    meta = create_file_meta(
        sop_class_uid=pydicom.uid.UID(sop_class),
        sop_instance_uid=pydicom.uid.UID(sop_instance),
        transfer_syntax=pydicom.uid.UID(syntax),
    )
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    assert part10_header(sop_class, sop_instance, syntax) == expected


def test_part10_header_refuses_an_empty_uid_as_pynetdicom_does() -> None:
    with pytest.raises(ValueError, match="SOP Instance"):
        part10_header("1.2.840.10008.5.1.4.1.1.4", "", "1.2.840.10008.1.2")


MR = "1.2.840.10008.5.1.4.1.1.4"


def _rsp(status: int, comment: str | None = None, sop_class: str | None = MR) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234567"
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


@pytest.mark.parametrize(
    "rsp",
    [
        _rsp(0x0000),
        _rsp(0xC210, "Pixel Data is truncated"),  # odd length: padded
        _rsp(0xA700, "node out of disk space; retry later!"),
        _rsp(0x0110, "x" * 64),
        _rsp(0x0000, sop_class=None),
    ],
)
def test_c_store_response_encoded_as_pynetdicom_does(rsp: C_STORE) -> None:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 16382)
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1
    assert pdv == b"\x03" + fastpath.encode_c_store_rsp(rsp)


def test_unusual_c_store_responses_are_left_to_pynetdicom() -> None:
    offending = _rsp(0xC210, "bad")
    offending.OffendingElement = [0x00100010]
    assert fastpath.encode_c_store_rsp(offending) is None
    assert fastpath.encode_c_store_rsp(_rsp(0xC210, "Zoë")) is None
    request = C_STORE()
    request.MessageID = 1
    assert fastpath.encode_c_store_rsp(request) is None


def test_only_verified_versions_get_the_event_driven_reactors() -> None:
    assert fastpath.supported("3.0.4")
    assert not fastpath.supported("3.0.5") and not fastpath.supported("2.1.1")
    assert fastpath.request_handler_class("3.1.0") is RequestHandler
    assert fastpath.request_handler_class("3.0.4") is fastpath.EventDrivenRequestHandler


@pytest.mark.skipif(not INSTALLED_VERIFIED, reason="installed pynetdicom is not a verified one")
def test_associations_use_the_event_driven_classes_with_the_ae_timeouts(run_node) -> None:  # type: ignore[no-untyped-def]
    node = run_node(node={"acse_timeout_s": 7.0, "network_timeout_s": 11.0})
    seen: list[Any] = []
    node.scp.server.bind(evt.EVT_C_ECHO, lambda event: seen.append(event.assoc) or 0x0000)
    assert echoscu(node.scp.port).returncode == 0
    (assoc,) = seen
    assert isinstance(assoc, fastpath.EventDrivenAssociation)
    assert isinstance(assoc.dul, fastpath.EventDrivenDUL)
    assert isinstance(assoc.dul.socket, fastpath.FastSocket)
    assert isinstance(assoc.dimse, fastpath.FastDIMSE)
    # pynetdicom's logging handlers, bound by every Association, are dropped as on the server
    assert assoc.get_handlers(evt.EVT_DIMSE_RECV) == []
    assert assoc.get_handlers(evt.EVT_PDU_RECV) == []
    # the timers live in the DUL that replaced the library's
    assert assoc.dul.artim_timer.timeout == 7.0
    assert assoc.dul._idle_timer.timeout == 11.0


def test_stock_reactors_still_receive_when_the_version_is_not_verified(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    node = run_node()
    seen: list[Any] = []
    node.scp.server.bind(evt.EVT_C_ECHO, lambda event: seen.append(type(event.assoc)) or 0x0000)
    study = factories.small_study(tmp_path / "in")
    files = [p for paths in study.values() for p in paths]
    result = storescu(node.scp.port, *files)
    assert result.stderr.count("Received Store Response (Success)") == len(files)
    assert echoscu(node.scp.port).returncode == 0
    assert seen == [pynetdicom.association.Association]
    assert len(list(node.spool.root.rglob("*.dcm"))) == len(files)


def test_pynetdicom_requestor_reads_the_direct_responses(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    good = pydicom.dcmread(study["t1c"][0])
    bad = pydicom.dcmread(study["t1c"][1])
    bad.PixelData = bad.PixelData[:100]
    node = run_node()
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(good.SOPClassUID, good.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    try:
        assert assoc.is_established
        ok = assoc.send_c_store(good)
        refused = assoc.send_c_store(bad)
    finally:
        assoc.release()
    assert ok.Status == 0x0000
    assert refused.Status == 0xC210
    assert refused.ErrorComment.startswith("Pixel Data is truncated")


def test_idle_association_is_aborted_after_the_network_timeout(run_node) -> None:  # type: ignore[no-untyped-def]
    node = run_node(node={"network_timeout_s": 0.5})
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=10, what="the abort")
    wait_for(lambda: not node.scp.server.active_associations, timeout=10, what="acceptor gone")


def test_refused_instance_leaves_no_staged_file(run_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    ds = pydicom.dcmread(study["t1c"][0])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(tmp_path / "truncated.dcm")
    node = run_node()
    result = storescu(node.scp.port, tmp_path / "truncated.dcm")
    assert "CannotUnderstand" in result.stderr
    assert not node.spool.partial_files()
    assert not list(node.spool.root.rglob("*.dcm"))


def test_protocol_logging_handlers_dropped_at_warning(run_node) -> None:  # type: ignore[no-untyped-def]
    node = run_node()
    assert node.scp.server.get_handlers(evt.EVT_DIMSE_RECV) == []
    assert node.scp.server.get_handlers(evt.EVT_PDU_SENT) == []


@pytest.mark.skipif(not INSTALLED_VERIFIED, reason="installed pynetdicom is not a verified one")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_open_idle_association_does_not_spin(run_node) -> None:  # type: ignore[no-untyped-def]
    """An established association with no traffic wakes the receiver a few times a second."""
    node = run_node()
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    try:
        assert assoc.is_established
        wait_for(lambda: node.scp.server.active_associations, what="the acceptor")
        # both sides of the association live in this process: the requestor's own reactors
        # are pynetdicom's (1 ms polling), so measure the acceptor's threads only
        acceptor = node.scp.server.active_associations[0]
        threads = {acceptor.ident, acceptor.dul.ident}
        before = _thread_cpu(threads)
        time.sleep(1.0)  # the quantity measured is CPU over a stretch of idle time
        used = _thread_cpu(threads) - before
        assert used < 0.02, f"idle acceptor used {used:.3f} s CPU in 1 s"
        assert assoc.send_c_echo().Status == 0x0000  # and it still answers at once
    finally:
        assoc.release()


@pytest.mark.skipif(not INSTALLED_VERIFIED, reason="installed pynetdicom is not a verified one")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_connections_that_say_nothing_cost_little_and_end_when_closed(run_node) -> None:  # type: ignore[no-untyped-def]
    """Silent connections (a port scanner, a load balancer's TCP check) wait for their
    A-ASSOCIATE-RQ without polling (each cost 1.6 % of a core at pynetdicom's 1 ms), and once
    the peer closes, their threads end at once rather than at node.acse_timeout_s."""
    import socket

    node = run_node(node={"acse_timeout_s": 60})
    silent = [socket.create_connection(("127.0.0.1", node.scp.port)) for _ in range(10)]
    try:
        wait_for(lambda: len(node.scp.server.active_associations) == 10, what="ten acceptors")
        acceptors = node.scp.server.active_associations
        threads = {a.ident for a in acceptors} | {a.dul.ident for a in acceptors}
        before = _thread_cpu(threads)
        time.sleep(2.0)  # the quantity measured is CPU over a stretch of idle time
        used = _thread_cpu(threads) - before
        assert used < 0.05, f"ten silent connections used {used:.3f} s CPU in 2 s"
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: not node.scp.server.active_associations, timeout=5, what="the threads' end")
    assert echoscu(node.scp.port).returncode == 0


def _thread_cpu(idents: set[int | None]) -> float:
    """CPU seconds of the given threads, from /proc (Linux)."""
    total = 0.0
    tick = float(os.sysconf("SC_CLK_TCK"))
    native = {t.ident: t.native_id for t in threading.enumerate()}
    for ident in idents:
        tid = native.get(ident)
        if tid is None:
            continue
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
