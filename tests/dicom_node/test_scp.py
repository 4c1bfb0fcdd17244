"""The receiver against real dcmtk clients on an ephemeral localhost port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from dicom_node.scp import caller_refusal
from dicom_node.settings import AllowedCaller
from tests import factories
from tests.audit_repository import security_alerts
from tests.conftest import receiver_tls, tool, wait_for


def storescu(port: int, *paths: Path, aet: str = "SCANNER1", extra: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [tool("storescu"), "-v", "-aet", aet, "-aec", "GLIOFORECAST", *extra,
         "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True, text=True, timeout=120, env={"TCP_NODELAY": "1"},
    )  # fmt: skip


def echoscu(port: int, aet: str = "SCANNER1", aec: str = "GLIOFORECAST", extra=()):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [tool("echoscu"), "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_echo_from_this_machine_is_accepted(run_node):  # type: ignore[no-untyped-def]
    node = run_node()
    result = echoscu(node.scp.port)
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_refused(run_node):  # type: ignore[no-untyped-def]
    node = run_node(node={"allowed_callers": (AllowedCaller("SCANNER1"),)})
    assert echoscu(node.scp.port, aet="SCANNER1").returncode == 0
    refused = echoscu(node.scp.port, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout


def test_caller_bound_to_another_host_is_refused(run_node):  # type: ignore[no-untyped-def]
    node = run_node(node={"allowed_callers": (AllowedCaller("SCANNER1", ("10.20.0.0/16",)),)})
    refused = echoscu(node.scp.port, aet="SCANNER1")
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout


def test_wrong_called_ae_is_refused(run_node):  # type: ignore[no-untyped-def]
    node = run_node()
    refused = echoscu(node.scp.port, aec="ANY-SCP")
    assert "Called AE Title Not Recognized" in refused.stderr + refused.stdout


def test_study_is_stored_durably_and_becomes_a_job(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    files = [p for paths in study.values() for p in paths]
    node = run_node()
    result = storescu(node.scp.port, *files)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == len(files)
    stored = sorted(node.spool.root.rglob("*.dcm"))
    assert len(stored) == len(files)
    # the spool holds the very same instances, with their patient data intact
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in files}
    for path in stored:
        ds = pydicom.dcmread(path)
        assert ds.PatientName == "Lefèvre^Zoë"
        assert ds.get("PixelData") == sent[ds.SOPInstanceUID].get("PixelData")
    assert not node.spool.partial_files()
    jobs = wait_for(lambda: node.store.list_jobs(), what="a job")
    assert len(jobs) == 1 and jobs[0].version == 1
    roles = {s.series.series_description: s.role for s in node.store.job_series(jobs[0].id)}
    assert roles == {"AX T1 POST GD": "t1c", "AX T2 FLAIR": "flair", "RT structures": "rtstruct"}


def test_duplicate_instance_is_stored_once(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    node = run_node()
    for _ in range(2):
        result = storescu(node.scp.port, *study["t1c"])
        assert result.stderr.count("Received Store Response (Success)") == len(study["t1c"])
    assert len(list(node.spool.root.rglob("*.dcm"))) == len(study["t1c"])
    assert node.store.counts()["instances"] == len(study["t1c"])


def test_low_disk_answers_out_of_resources(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    # a minimum free space larger than any disk: every write would go below it
    node = run_node(storage={"min_free_mb": 2**40})
    result = storescu(node.scp.port, study["t1c"][0])
    # dcmtk names status 0xA700 "Refused: OutOfResources"
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr
    assert not list(node.spool.root.rglob("*.dcm"))
    # nothing is lost: the sender keeps the instance and retries once space is back
    assert node.store.counts()["instances"] == 0


def test_corrupt_dataset_is_refused_and_service_keeps_serving(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    truncated = tmp_path / "truncated.dcm"
    ds = pydicom.dcmread(study["t1c"][0])
    ds.PixelData = ds.PixelData[:100]  # 16x16x16 bit needs 512 bytes
    ds.save_as(truncated)
    no_study = tmp_path / "no_study.dcm"
    ds = pydicom.dcmread(study["t1c"][1])
    del ds.StudyInstanceUID
    ds.save_as(no_study)
    node = run_node()
    result = storescu(node.scp.port, truncated, no_study, study["t1c"][2], extra=("--no-halt",))
    # dcmtk names status 0xC210 "CannotUnderstand"
    assert result.stderr.count("Received Store Response (Error: CannotUnderstand)") == 2
    assert result.stderr.count("Received Store Response (Success)") == 1
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1
    assert echoscu(node.scp.port).returncode == 0


def test_tls_association_with_client_certificate(run_node, pki):  # type: ignore[no-untyped-def]
    d = pki
    tls = receiver_tls(pki)
    node = run_node(node={"tls": tls})
    ok = echoscu(node.scp.port, extra=("+tls", str(d / "client.key"), str(d / "client.pem"),
                                       "+cf", str(d / "ca.pem")))  # fmt: skip
    assert ok.returncode == 0, ok.stderr + ok.stdout
    # without a client certificate the handshake fails
    anonymous = echoscu(node.scp.port, extra=("+tla", "+cf", str(d / "ca.pem")))
    assert anonymous.returncode != 0
    # plain TCP to a TLS port is not a DICOM association either
    assert echoscu(node.scp.port).returncode != 0


def test_callers_bound_to_their_client_certificates(run_node, pki, tmp_path, caplog):  # type: ignore[no-untyped-def]
    """An allowed caller bound to certificate names associates only with a certificate that
    carries one: its AE title alone (anyone can send any) is not enough."""
    import dataclasses
    import logging
    import xml.etree.ElementTree as ET

    caplog.set_level(logging.INFO, logger="dicom_node.scp")
    d = pki
    audit_file = tmp_path / "audit.log"
    callers = (
        AllowedCaller("SCANNER1", certificate_names=("glioforecast",)),
        AllowedCaller("MR1", hosts=("127.0.0.1",), certificate_names=("MR1.Radiology.example",)),
        AllowedCaller("WORKSTATION"),
        # a certificate with alternative names is not matched on its common name
        AllowedCaller("CT1", certificate_names=("scanner",)),
        # one without them is
        AllowedCaller("CT2", certificate_names=("CT2.radiology.example",)),
    )
    node = run_node(
        node={
            # certificates are asked for, not required: WORKSTATION has none
            "tls": dataclasses.replace(receiver_tls(pki), require_client_certificate=False),
            "allowed_callers": callers,
            "refuse_unknown_callers": True,
        },
        audit={"enabled": True, "file": audit_file},
    )
    ca = ("+cf", str(d / "ca.pem"))
    client = ("+tls", str(d / "client.key"), str(d / "client.pem"), *ca)
    scanner = ("+tls", str(d / "scanner.key"), str(d / "scanner.pem"), *ca)
    anonymous = ("+tla", *ca)
    legacy = ("+tls", str(d / "legacy.key"), str(d / "legacy.pem"), *ca)
    for aet, extra, accepted in (
        ("SCANNER1", client, True),
        ("SCANNER1", scanner, False),  # another device's certificate
        ("SCANNER1", anonymous, False),  # none
        ("MR1", scanner, True),  # names compare without case
        ("MR1", client, False),
        ("WORKSTATION", anonymous, True),  # no binding: no certificate asked of it
        ("CT1", scanner, False),  # its common name is scanner, but it has alternative names
        ("CT2", legacy, True),
    ):
        result = echoscu(node.scp.port, aet=aet, extra=extra)
        assert (result.returncode == 0) is accepted, (aet, extra, result.stderr + result.stdout)
    said = (
        "calling AE title 'SCANNER1' at 127.0.0.1: node.allowed_callers expects a client "
        "certificate named glioforecast, found a certificate named mr1.radiology.example",
        "calling AE title 'SCANNER1' at 127.0.0.1: node.allowed_callers expects a client "
        "certificate named glioforecast, found no client certificate",
        "calling AE title 'MR1' at 127.0.0.1: node.allowed_callers expects a client "
        "certificate named MR1.Radiology.example, found a certificate named glioforecast",
        "calling AE title 'CT1' at 127.0.0.1: node.allowed_callers expects a client "
        "certificate named scanner, found a certificate named mr1.radiology.example",
    )
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"association refused: {reason}" in logged for reason in said), logged
    assert "association from MR1 at 127.0.0.1 accepted (client certificate " in logged

    wait_for(lambda: all(any(reason in a for a in security_alerts(audit_file)) for reason in said),
             what="a security alert for each refused certificate")  # fmt: skip

    # what a bound caller sends is audited with the names of the certificate it proved
    study = factories.small_study(tmp_path / "in")
    sent = storescu(node.scp.port, study["t1c"][0], aet="MR1", extra=scanner)
    assert sent.returncode == 0, sent.stderr + sent.stdout

    def sources() -> list[dict[str, str]]:
        lines = audit_file.read_text("utf-8").splitlines()
        return [
            p.attrib
            for m in map(ET.fromstring, lines)
            if m.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
            for p in m.iter("ActiveParticipant")
            if p.get("UserIsRequestor") == "true"
        ]

    wait_for(sources, what="the transfer's audit message")
    (source,) = sources()
    assert (source["UserID"], source["UserName"]) == ("MR1", "mr1.radiology.example")


def test_a_certificate_binding_holds_where_unknown_callers_are_let_in() -> None:
    """With refuse_unknown_callers off an unknown AE title comes in, but not a known one
    without its certificate (else anyone could send as it)."""
    callers = (AllowedCaller("SCANNER1", certificate_names=("glioforecast",)), AllowedCaller("*"))
    assert caller_refusal(callers, "ANYONE", "10.0.0.9", None, refuse_unknown=False) is None
    assert caller_refusal(callers, "SCANNER1", "10.0.0.9", frozenset({"glioforecast"})) is None
    refused = caller_refusal(callers[:1], "SCANNER1", "10.0.0.9", None, refuse_unknown=False)
    assert refused is not None and "found no client certificate" in refused
    # with the catch-all rule SCANNER1 is let in by it, as any unknown caller would be
    assert caller_refusal(callers, "SCANNER1", "10.0.0.9", None, refuse_unknown=False) is None
    assert caller_refusal((), "ANYONE", "10.0.0.9", None) == (
        "calling AE title 'ANYONE' at 10.0.0.9 is not in node.allowed_callers"
    )


def test_tls_failures_say_why_and_a_silent_client_holds_nobody_up(  # type: ignore[no-untyped-def]
    run_node, pki, tmp_path, caplog
):
    import socket
    import time

    d = pki
    audit_file = tmp_path / "audit.log"
    node = run_node(
        node={"tls": receiver_tls(pki), "acse_timeout_s": 30.0},
        audit={"enabled": True, "file": audit_file},
    )
    client = ("+tls", str(d / "client.key"), str(d / "client.pem"), "+cf", str(d / "ca.pem"))
    # a client that connects and says nothing (a port scan, a load balancer's TCP check) does
    # not hold up the associations behind it: the handshake runs in the connection's thread
    with socket.create_connection(("127.0.0.1", node.scp.port)):
        start = time.monotonic()
        ok = echoscu(node.scp.port, extra=client)
        assert ok.returncode == 0, ok.stderr + ok.stdout
        assert time.monotonic() - start < 15  # not the 30 s handshake timeout
    assert echoscu(node.scp.port, extra=("+tla", "+cf", str(d / "ca.pem"))).returncode != 0
    assert echoscu(node.scp.port).returncode != 0  # no TLS at all
    said = {
        "the client presented no certificate (node.tls.require_client_certificate is on)",
        "not TLS: a client without TLS on the node's TLS port?",
        "the client closed the connection during the handshake",  # the silent one
    }

    wait_for(
        lambda: all(
            any(f"TLS handshake failed: {r}" in a for a in security_alerts(audit_file))
            for r in said
        ),
        what="a security alert for each failed handshake",
    )
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(reason in logged for reason in said), logged


def test_garbage_and_idle_connections_do_not_hurt_the_service(run_node):  # type: ignore[no-untyped-def]
    import socket
    import time

    node = run_node(node={"acse_timeout_s": 0.5})
    port = node.scp.port
    # bytes that are no DICOM PDU at all
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    # a connection that never sends an association request is closed after the ACSE timeout
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
        assert closed and time.monotonic() - start < 8
    assert echoscu(port).returncode == 0


def test_an_htj2k_series_is_received_and_converted_like_the_uncompressed_one(  # type: ignore[no-untyped-def]
    run_node, tmp_path
):
    """A sender (a PACS that stores High-Throughput JPEG 2000) that proposes only HTJ2K
    Lossless: the node accepts the context, keeps the files as sent, and the series converts
    to the same voxels as its uncompressed original."""
    import shutil

    import numpy as np
    import pytest
    from pydicom.uid import HTJ2KLossless
    from pynetdicom import AE

    from dicom_node.convert.series import load_series

    if shutil.which("ojph_compress") is None:
        pytest.skip("OpenJPH's ojph_compress is not installed (Debian: openjph-tools)")
    study = factories.small_study(tmp_path / "in")
    (tmp_path / "htj2k").mkdir()
    sent = [factories.htj2k_copy(p, tmp_path / "htj2k" / p.name) for p in study["t1c"]]
    node = run_node()
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", HTJ2KLossless)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    (context,) = assoc.accepted_contexts
    assert context.transfer_syntax == [HTJ2KLossless]
    try:
        for path in sent:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        assoc.release()
    stored = sorted(node.spool.root.rglob("*.dcm"))
    assert len(stored) == len(sent)
    assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in stored} == {HTJ2KLossless}
    assert np.array_equal(load_series(stored).array, load_series(study["t1c"]).array)


def test_unsupported_sop_class_is_refused_at_negotiation(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    us = tmp_path / "us.dcm"
    ds = pydicom.dcmread(study["t1c"][0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US
    ds.save_as(us)
    node = run_node()
    result = storescu(node.scp.port, us, study["t1c"][0], extra=("--no-halt",))
    assert "No presentation context for: (US)" in result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 1
    assert node.store.counts()["instances"] == 1


def test_association_limit_rejects_the_extra_caller(run_node, caplog):  # type: ignore[no-untyped-def]
    """node.max_associations counts associations, not connections: connections that say
    nothing (anyone who can reach the port can open them, before any AE title is checked) do
    not lock the senders out until node.acse_timeout_s closes them."""
    import logging
    import socket

    from pynetdicom import AE

    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    node = run_node(node={"max_associations": 1})
    silent = [socket.create_connection(("127.0.0.1", node.scp.port)) for _ in range(5)]
    try:
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context("1.2.840.10008.1.1")
        first = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
        try:
            assert first.is_established
            second = echoscu(node.scp.port)
            assert second.returncode != 0
            assert "Local Limit Exceeded" in second.stderr + second.stdout
            assert "Rejected Transient" in second.stderr + second.stdout
        finally:
            first.release()
        assert wait_for(lambda: echoscu(node.scp.port).returncode == 0, what="a free slot")
    finally:
        for sock in silent:
            sock.close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "association from SCANNER1 at 127.0.0.1 refused (rejected-transient, local limit " in said
    )
    assert "1 associations open, node.max_associations is 1" in said


def test_a_full_job_queue_defers_new_instances(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """At ``worker.max_queued_jobs`` studies waiting, instances are answered 0xA700 (the sender
    keeps them and retries); once the queue drains they are stored again."""
    study = factories.small_study(tmp_path / "in")
    node = run_node(worker={"max_queued_jobs": 1})
    node.worker.stop(timeout=30)  # nothing takes jobs off the queue
    waiting = node.store.create_job("1.2.826.0.1.3680043.8.498.99", [], "queued", "")
    result = storescu(node.scp.port, study["t1c"][0])
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr
    assert node.store.counts()["instances"] == 0 and not list(node.spool.root.rglob("*.dcm"))
    node.store.set_state(waiting, "done")
    stored = wait_for(
        lambda: (
            "Received Store Response (Success)" in storescu(node.scp.port, study["t1c"][0]).stderr
        ),
        what="the instance to be accepted once the queue has room",
    )
    assert stored and node.store.counts()["instances"] == 1


JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def test_the_senders_lossless_syntax_is_taken_before_the_nodes_own_order(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """dcmtk storescu +C proposes a JPEG Lossless file's own syntax and the uncompressed ones
    in one presentation context. pynetdicom chose by the node's order (Explicit VR Little
    Endian first), so the sender had to decompress, and storescu, which cannot, failed to send
    the file. The node takes the sender's lossless syntaxes in the sender's order: the file is
    stored as it was sent."""
    original = factories.small_study(tmp_path / "in")["t1c"][0]
    compressed = tmp_path / "jpeg-lossless.dcm"
    subprocess.run([tool("dcmcjpeg"), "+e1", str(original), str(compressed)], check=True)
    node = run_node()
    result = storescu(node.scp.port, compressed, extra=("-xs", "+C"))
    assert result.returncode == 0, result.stderr
    (stored,) = node.spool.root.rglob("*.dcm")
    ds = pydicom.dcmread(stored)
    assert ds.file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    assert (ds.pixel_array == pydicom.dcmread(original).pixel_array).all()


def test_a_lossy_syntax_is_taken_only_when_no_lossless_one_is_proposed() -> None:
    from dicom_node.scp import preferred_transfer_syntaxes

    baseline, j2k, rle = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
    ordered = preferred_transfer_syntaxes([[baseline, EXPLICIT_LE, j2k]])
    assert ordered[:3] == [EXPLICIT_LE, j2k, baseline]
    assert preferred_transfer_syntaxes([[rle, "1.2.3.4"]])[0] == rle  # an unknown one is skipped
    assert preferred_transfer_syntaxes([[baseline]])[0] == baseline


def test_each_presentation_context_gets_its_own_lossless_syntax(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """dcmsend proposes one context per encoding of its files (JPEG-LS, JPEG Lossless, RLE),
    each with the uncompressed syntaxes after its own: every context but the first got
    Explicit VR Little Endian, and dcmsend decompressed those files. Each context now gets its
    first lossless syntax; one that puts an uncompressed syntax first still gets that."""
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    jpeg_ls, rle, implicit = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2"
    node = run_node()

    def accepted(*contexts: list[str]) -> list[str]:
        ae = AE(ae_title="SENDER")
        for syntaxes in contexts:
            ae.add_requested_context(MRImageStorage, syntaxes)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
        try:
            assert assoc.is_established
            return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
        finally:
            assoc.release()

    dcmsend = [[first, EXPLICIT_LE, implicit] for first in (jpeg_ls, JPEG_LOSSLESS_SV1, rle)]
    assert accepted(*dcmsend) == [jpeg_ls, JPEG_LOSSLESS_SV1, rle]
    assert accepted([implicit, jpeg_ls]) == [implicit]


def test_what_negotiation_refused_is_logged_when_it_matters(run_node, tmp_path, caplog):  # type: ignore[no-untyped-def]
    """A scanner whose Encapsulated PDF reports go nowhere: the node said nothing (the
    sender aborts when it finds no context for its file). A class the node takes, proposed in
    no transfer syntax it takes, is said at once; a class it does not take is said when the
    association stores nothing (storescu proposes 128 classes and sends one)."""
    import logging

    from pynetdicom import AE

    caplog.set_level(logging.WARNING, logger="dicom_node.refusals")
    pdf = tmp_path / "report.dcm"
    ds = pydicom.dcmread(factories.small_study(tmp_path / "in")["t1c"][0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.save_as(pdf)
    node = run_node()
    assert storescu(node.scp.port, pdf, extra=("-R",)).returncode != 0
    mr = factories.small_study(tmp_path / "mr")["t1c"][0]
    assert storescu(node.scp.port, mr).returncode == 0  # 100 classes refused, one stored
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.4.110"])
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="GLIOFORECAST")
    assoc.abort()
    said = wait_for(
        lambda: (s := [r.getMessage() for r in caplog.records if r.name == "dicom_node.refusals"])
        and len(s) == 2 and s, what="two lines",
    )  # fmt: skip
    assert said == [
        "association from SCANNER1 at 127.0.0.1 stored nothing; of what it proposed, the node "
        "refused 1 SOP class it does not take: Encapsulated PDF Storage",
        "association from MODALITY at 127.0.0.1: presentation contexts refused, no transfer "
        "syntax the node takes (docs/CONFORMANCE.md): MR Image Storage in JPEG XL Lossless",
    ], said


def test_an_instance_re_sent_with_other_content_keeps_the_first_and_says_so(  # type: ignore[no-untyped-def]
    run_node, tmp_path, caplog
):
    """The same SOP Instance UID sent again with other pixels: answered Success and the copy
    held is kept, as for any duplicate, but not silently any more. An identical re-send (a
    scanner sending the study again), or one in another transfer syntax, stays quiet."""
    import logging

    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    original = factories.small_study(tmp_path / "in")["t1c"][0]
    ds = pydicom.dcmread(original)
    ds.PixelData = bytes(len(ds.PixelData))
    edited = tmp_path / "edited.dcm"
    ds.save_as(edited)
    node = run_node()
    # the same again, the same in another transfer syntax (not compared), then other pixels
    for path, extra in ((original, ()), (original, ()), (original, ("-xi",)), (edited, ())):
        assert storescu(node.scp.port, path, extra=extra).returncode == 0
    (stored,) = node.spool.root.rglob("*.dcm")
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(original).PixelData
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(
        f"instance {ds.SOPInstanceUID} of study {ds.StudyInstanceUID} re-sent by SCANNER1 with "
        "other content under the same SOP Instance UID: the copy held is kept"
    ), said


def test_a_spool_that_refuses_writes_defers_instances_and_shows_on_health(  # type: ignore[no-untyped-def]
    run_node, tmp_path, caplog
):
    """The spool's folder refusing writes (here its staging folder replaced by a file, as a
    failed mount or a wrong permission would do): each instance was answered 0x0110 with a
    traceback in the log, which many senders do not retry, and /health said all was well. It
    is answered 0xA700, logged once, and /health says the storage is down until an instance
    is stored again."""
    import json
    import logging
    import shutil
    import urllib.request

    files = factories.small_study(tmp_path / "in")["t1c"]
    node = run_node()
    incoming = node.spool.root / ".incoming"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.write_text("not a folder")

    def health() -> dict:  # type: ignore[type-arg]
        url = f"http://127.0.0.1:{node.health.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as rsp:
                return json.loads(rsp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as err:
            return json.loads(err.read())  # type: ignore[no-any-return]

    caplog.set_level(logging.INFO, logger="dicom_node.scp")
    result = storescu(node.scp.port, *files[:3])
    said = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in said, said
    state = health()
    assert state["status"] == "degraded" and state["components"]["storage"] is False
    logged = [r.getMessage() for r in caplog.records]
    assert len([m for m in logged if "deferred (0xA700)" in m]) == 1, logged
    incoming.unlink()
    assert storescu(node.scp.port, *files).returncode == 0
    assert health()["components"]["storage"] is True
    assert any(r.getMessage().startswith("instances are stored again") for r in caplog.records)


def test_an_instance_resent_under_another_study_leaves_no_second_file(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """A PACS splits a study and sends an instance again under the new Study Instance UID,
    same SOP Instance UID and patient: the copy held is kept, as documented; the second file,
    which no row named, stayed in the spool for ever (out of reach of assembly and retention,
    "recovered" at each start)."""
    original = factories.small_study(tmp_path / "in")["t1c"][0]
    moved = tmp_path / "moved.dcm"
    ds = pydicom.dcmread(original)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(moved)
    node = run_node()
    assert storescu(node.scp.port, original).returncode == 0
    result = storescu(node.scp.port, moved)
    assert "Received Store Response (Success)" in result.stderr, result.stderr
    (held,) = node.spool.root.rglob("*.dcm")
    assert pydicom.dcmread(held).StudyInstanceUID == pydicom.dcmread(original).StudyInstanceUID
    assert node.store.counts()["instances"] == 1
