"""The DICOMweb receiver (STOW-RS): a real node on localhost ports, real HTTP requests (the
node's own STOW-RS client, and raw requests for what well-behaved clients never send)."""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import sqlite3
import ssl
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

from dicom_node.cli import main
from dicom_node.dicomweb import stow_batch
from dicom_node.errors import ConfigError
from dicom_node.scu import Destination
from dicom_node.settings import Destination as DestinationSettings
from dicom_node.settings import DicomWebSettings, StowSettings, WebClient, load_settings
from dicom_node.stow import Refusal, authenticate, load_clients, split_multipart
from tests import factories
from tests.conftest import receiver_tls, tool, wait_for
from tests.dicom_node.conftest import make_settings

TOKEN = "t0ken-for-the-router"


def _stow(tmp_path: Path, **values: Any) -> dict[str, Any]:
    """``stow`` settings on an ephemeral port with one bearer-token client, ROUTER."""
    token = tmp_path / "router.token"
    token.write_text(TOKEN + "\n")
    clients = (WebClient(name="ROUTER", token_file=token),)
    return {"enabled": True, "port": 0, "clients": clients, **values}


def _part10(path: Path) -> bytes:
    return path.read_bytes()


def post(
    port: int, parts: Iterable[bytes], *, token: str | None = TOKEN,
    path: str = "/dicom-web/studies",
    content_type: str | None = None, part_type: str = "application/dicom", chunked: bool = False,
    headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """POST ``parts`` as a STOW-RS request; (status, headers, body) of the answer."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    ) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
    sent = {
        "Content-Type": content_type
        or f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **({"Authorization": f"Bearer {token}"} if token else {}),
        **(headers or {}),
    }
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=30, context=context)
    try:
        if chunked:
            pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
            conn.request("POST", path, body=iter(pieces), headers=sent, encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers=sent)
        rsp = conn.getresponse()
        return rsp.status, dict(rsp.getheaders()), rsp.read()
    finally:
        conn.close()


def _sequence(answer: bytes, tag: str) -> list[dict[str, Any]]:
    return list(json.loads(answer).get(tag, {}).get("Value", []))


def _failures(answer: bytes) -> dict[str, int]:
    """SOP Instance UID (or '' when the part was not DICOM) -> Failure Reason."""
    return {
        item.get("00081155", {}).get("Value", [""])[0]: item["00081197"]["Value"][0]
        for item in _sequence(answer, "00081198")
    }


def _stored(answer: bytes) -> list[str]:
    return [item["00081155"]["Value"][0] for item in _sequence(answer, "00081199")]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_study_stored_by_stow_rs_becomes_a_job_as_by_c_store(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """The node's own STOW-RS client (what a second node or a router would run) sends the
    study; every instance is on disk and recorded, under the client's name, and the study is
    assembled with the series roles a C-STORE would have given it."""
    study = factories.small_study(tmp_path / "in")
    files = [p for paths in study.values() for p in paths]
    node = run_node(stow=_stow(tmp_path))
    assert node.stow is not None
    url = f"http://127.0.0.1:{node.stow.port}/dicom-web"
    (tmp_path / "token").write_text(TOKEN)
    web = DicomWebSettings(url=url, token_file=tmp_path / "token")
    dest = Destination.from_settings(DestinationSettings(name="node", dicomweb=web))
    results = stow_batch([pydicom.dcmread(p) for p in files], dest)
    assert [r.status for r in results] == [0] * len(files), results
    assert len(list(node.spool.root.rglob("*.dcm"))) == len(files)
    assert not node.spool.partial_files()
    jobs = wait_for(lambda: node.store.list_jobs(), what="a job")
    roles = {s.series.series_description: s.role for s in node.store.job_series(jobs[0].id)}
    assert roles == {"AX T1 POST GD": "t1c", "AX T2 FLAIR": "flair", "RT structures": "rtstruct"}
    with sqlite3.connect(node.settings.storage.database) as db:
        senders = db.execute("SELECT DISTINCT calling_ae FROM instances").fetchall()
    assert senders == [("ROUTER",)]
    stored = pydicom.dcmread(next(node.spool.root.rglob("*.dcm")))
    assert stored.PatientName == "Lefèvre^Zoë"
    metrics = node.metrics()
    assert 'glioforecast_stow_requests_total{code="200"} 1' in metrics
    assert node.summary()["components"]["stow"] is True  # type: ignore[index]


def test_each_part_is_answered_for_itself(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """One request, five parts: a good instance, one again (stored once), bytes that are not
    DICOM, a SOP class the node does not take, and an instance of another study than the URL
    names; the good one is stored and the answer (202) says why each other one was not."""
    study = factories.small_study(tmp_path / "in")
    other = factories.small_study(tmp_path / "other")
    cr = pydicom.dcmread(study["t1c"][1])
    cr.SOPClassUID = cr.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    cr.SOPInstanceUID = cr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cr.save_as(tmp_path / "cr.dcm")
    good, foreign = study["t1c"][0], other["t1c"][0]
    target = str(pydicom.dcmread(good).StudyInstanceUID)
    node = run_node(stow=_stow(tmp_path))
    code, headers, answer = post(
        node.stow.port,
        [good.read_bytes(), good.read_bytes(), b"not DICOM at all",
         (tmp_path / "cr.dcm").read_bytes(), foreign.read_bytes()],
        path=f"/dicom-web/studies/{target}",
    )  # fmt: skip
    assert code == 202, answer
    assert headers["Content-Type"] == "application/dicom+json"
    assert _stored(answer) == [_uid(good), _uid(good)]
    # a media range that takes application/dicom+json (RFC 9110 12.5.1) is answered too (406)
    for accept in ("application/*", "application/dicom+xml;q=0.9, */*;q=0.1"):
        code, _, again = post(node.stow.port, [good.read_bytes()], headers={"Accept": accept})
        assert code == 200, (accept, again)
    assert _failures(answer) == {"": 0xC210, cr.SOPInstanceUID: 0x0122, _uid(foreign): 0xC409}
    assert [p.name for p in node.spool.root.rglob("*.dcm")] == [f"{_uid(good)}.dcm"]
    assert node.store.counts()["instances"] == 1


def test_chunked_requests_and_basic_authentication(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """HTTP Basic, a chunked body (Orthanc's DICOMweb client sends one), an address-bound
    client, and one known by its address alone."""
    study = factories.small_study(tmp_path / "in")
    (tmp_path / "pw").write_text("s3cret\n")
    clients = (
        WebClient(name="ARCHIVE", username="archive", password_file=tmp_path / "pw",
                  hosts=("127.0.0.0/8",)),
        WebClient(name="ELSEWHERE", hosts=("10.1.2.0/24",)),
    )  # fmt: skip
    node = run_node(stow={"enabled": True, "port": 0, "clients": clients})
    basic = "Basic " + base64.b64encode(b"archive:s3cret").decode()
    code, _, answer = post(node.stow.port, [p.read_bytes() for p in study["t1c"]], token=None,
                           chunked=True, headers={"Authorization": basic})  # fmt: skip
    assert code == 200, answer
    assert sorted(_stored(answer)) == sorted(_uid(p) for p in study["t1c"])
    assert node.store.counts()["instances"] == len(study["t1c"])
    wrong = "Basic " + base64.b64encode(b"archive:guess").decode()
    code, headers, answer = post(node.stow.port, [study["flair"][0].read_bytes()], token=None,
                                 headers={"Authorization": wrong})  # fmt: skip
    assert code == 401 and "WWW-Authenticate" in headers, answer
    assert node.store.counts()["instances"] == len(study["t1c"])


def test_who_may_call(tmp_path: Path) -> None:
    """The rules, without a server: tokens, Basic, address bounds, anonymous clients."""
    (tmp_path / "t").write_text("abc\n")
    (tmp_path / "p").write_text("pw")
    clients = load_clients((
        WebClient(name="TOKEN", token_file=tmp_path / "t"),
        WebClient(name="BASIC", username="u", password_file=tmp_path / "p", hosts=("10.0.0.0/8",)),
        WebClient(name="WARD", hosts=("192.168.5.7",)),
    ))  # fmt: skip
    basic = "Basic " + base64.b64encode(b"u:pw").decode()

    def who(header: str, host: str) -> str | int:
        found = authenticate(clients, header, host)
        return found.code if isinstance(found, Refusal) else found.name

    assert who("Bearer abc", "127.0.0.1") == "TOKEN"
    assert who("bearer abc", "::ffff:10.3.4.5") == "TOKEN"
    assert who("Bearer abcd", "127.0.0.1") == 401
    assert who("", "127.0.0.1") == 401
    assert who(basic, "10.3.4.5") == "BASIC"
    assert who(basic, "127.0.0.1") == 401  # BASIC may not call from there
    assert who("Basic !!!", "10.3.4.5") == 401
    assert who("", "192.168.5.7") == "WARD"
    assert who("Bearer wrong", "192.168.5.7") == "WARD"  # the address is what identifies it
    token_only = load_clients((WebClient(name="TOKEN", token_file=tmp_path / "t",
                                         hosts=("10.0.0.0/8",)),))  # fmt: skip
    refused = authenticate(token_only, "Bearer abc", "127.0.0.1")
    assert isinstance(refused, Refusal) and refused.code == 403
    assert "not among the hosts" in str(refused)


def test_refused_requests_store_nothing_and_say_why(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    audit_file = tmp_path / "audit.log"
    node = run_node(stow=_stow(tmp_path, max_request_mb=1),
                    audit={"enabled": True, "file": audit_file})  # fmt: skip
    port = node.stow.port
    one = [study["t1c"][0].read_bytes()]
    cases = {
        "no credentials": (post(port, one, token=None), 401, "found none"),
        "wrong token": (post(port, one, token="guess"), 401, "not those of"),
        "not multipart": (post(port, one, content_type="application/dicom"), 415,
                          "multipart/related"),
        "metadata and bulk data": (
            post(port, one, content_type='multipart/related; type="application/dicom+json"; '
                 "boundary=x"), 415, "application/dicom+json"),
        "no boundary": (post(port, one, content_type='multipart/related; type="application/dicom"'),
                        400, "boundary"),
        "a part of another type": (post(port, one, part_type="application/octet-stream"), 415,
                                   "application/octet-stream"),
        "XML answer only": (post(port, one, headers={"Accept": "application/dicom+xml"}), 406,
                            "application/dicom+json"),
        "JSON refused (q=0)": (post(port, one, headers={"Accept": "application/dicom+json;q=0, "
                               "application/dicom+xml"}), 406, "application/dicom+json"),
        "a search": (None, 405, "expected POST"),
        "another path": (post(port, one, path="/studies"), 404, "/dicom-web/studies"),
        "too large": (post(port, [b"\0" * (1 << 20)]), 413, "max_request_mb"),
    }  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "GET", "/dicom-web/studies?PatientID=1", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    rsp = conn.getresponse()
    cases["a search"] = ((rsp.status, dict(rsp.getheaders()), rsp.read()), 405, "expected POST")
    conn.close()
    for what, ((code, _, text), expected, says) in cases.items():
        assert (code, says in text.decode()) == (expected, True), (what, code, text)
    assert node.store.counts()["instances"] == 0
    assert not list(node.spool.root.rglob("*.dcm"))
    # the refused callers are in the audit trail (Security Alert), with the reason
    wait_for(lambda: audit_file.read_text().count("STOW-RS request refused") == 2,
             what="two security alerts")  # fmt: skip
    assert 'glioforecast_stow_requests_total{code="401"} 2' in node.metrics()


def test_a_body_that_does_not_arrive_whole_stores_nothing(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """A client that announces more than it sends and goes away, one that stops sending (held
    no longer than node.network_timeout_s), and a body without its close delimiter: nothing
    of them is stored, and the receiver goes on serving."""
    study = factories.small_study(tmp_path / "in")
    node = run_node(stow=_stow(tmp_path), node={"network_timeout_s": 1.0})
    port = node.stow.port
    data = study["t1c"][0].read_bytes()
    head = (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data) + 200}\r\n\r\n"
    ).encode()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data
    with socket.create_connection(("127.0.0.1", port)) as gone:
        gone.sendall(head + body)
        gone.shutdown(socket.SHUT_WR)
        assert gone.recv(100).startswith(b"HTTP/1.1 400")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.sendall(head + body[:1000])
        silent.settimeout(10)
        assert silent.recv(100) == b""  # dropped, unanswered
    assert time.monotonic() - started < 5
    assert post(port, [data])[0] == 200  # the receiver serves on
    assert node.store.counts()["instances"] == 1  # from the whole request only
    unclosed = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + study["t1c"][1].read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/dicom-web/studies", body=unclosed, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        "Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    rsp = conn.getresponse()
    assert rsp.status == 400 and b"close delimiter" in rsp.read()
    assert node.store.counts()["instances"] == 1


def test_a_busy_or_full_node_says_when_to_come_back(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """At stow.max_requests requests being stored, or when the spool would fall below its
    free-space floor, the answer is 503 with Retry-After: a client sends the same request
    later, nothing was stored from it."""
    study = factories.small_study(tmp_path / "in")
    node = run_node(stow=_stow(tmp_path, max_requests=1))
    port = node.stow.port
    data = study["t1c"][0].read_bytes()
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall((
            "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        ).encode())  # fmt: skip
        wait_for(lambda: node.stow.in_progress == 1, what="the slow request to be read")
        assert "glioforecast_stow_requests_in_progress 1\n" in node.metrics()
        code, headers, answer = post(port, [data])
        assert code == 503, answer
        assert headers["Retry-After"] == "30" and b"stow.max_requests" in answer
    assert wait_for(lambda: post(port, [data])[0] == 200, what="room again")
    low = run_node(make_settings(tmp_path / "low", storage={"min_free_mb": 2**40},
                                 stow=_stow(tmp_path)))  # fmt: skip
    code, headers, answer = post(low.stow.port, [data])
    assert (code, headers.get("Retry-After")) == (503, "30"), answer
    assert b"disk space" in answer
    assert low.store.counts()["instances"] == 0


def test_a_full_job_queue_answers_each_instance_out_of_resources(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    node = run_node(stow=_stow(tmp_path), worker={"max_queued_jobs": 1})
    node.worker.stop(timeout=30)
    node.store.create_job("1.2.826.0.1.3680043.8.498.99", [], "queued", "")
    code, headers, answer = post(node.stow.port, [p.read_bytes() for p in study["t1c"]])
    assert (code, headers.get("Retry-After")) == (503, "30"), answer
    assert set(_failures(answer).values()) == {0xA700}
    assert node.store.counts()["instances"] == 0


def test_https_with_the_receivers_certificate(run_node, pki, tmp_path):  # type: ignore[no-untyped-def]
    """With node.tls the STOW-RS port speaks https only, with the DICOM receiver's certificate
    and client-certificate rule; a failed handshake is logged and audited."""
    study = factories.small_study(tmp_path / "in")
    audit_file = tmp_path / "audit.log"
    node = run_node(node={"tls": receiver_tls(pki)}, stow=_stow(tmp_path),
                    audit={"enabled": True, "file": audit_file})  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    code, _, answer = post(node.stow.port, [study["t1c"][0].read_bytes()], context=ctx)
    assert code == 200, answer
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        post(node.stow.port, [study["t1c"][1].read_bytes()], context=anonymous)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        post(node.stow.port, [study["t1c"][1].read_bytes()])  # plain http
    assert node.store.counts()["instances"] == 1
    wait_for(lambda: "TLS handshake failed" in audit_file.read_text(), what="a security alert")


def test_clients_known_by_their_client_certificates(run_node, pki, tmp_path):  # type: ignore[no-untyped-def]
    """A client bound to certificate names: identified by its certificate alone, or with its
    token only when it presents its certificate too."""
    import dataclasses

    study = factories.small_study(tmp_path / "in")
    token = tmp_path / "router.token"
    token.write_text(TOKEN)
    clients = (
        WebClient(name="MR1", certificate_names=("mr1.radiology.example",)),
        WebClient(name="ROUTER", token_file=token, certificate_names=("glioforecast",)),
    )
    tls = dataclasses.replace(receiver_tls(pki), require_client_certificate=False)
    audit_file = tmp_path / "audit.log"
    node = run_node(
        node={"tls": tls}, stow={"enabled": True, "port": 0, "clients": clients},
        audit={"enabled": True, "file": audit_file},
    )  # fmt: skip

    def context(name: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if name:
            ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
        return ctx

    files = study["t1c"]
    code, _, answer = post(node.stow.port, [files[0].read_bytes()], token=None,
                           context=context("scanner"))  # fmt: skip
    assert code == 200, answer
    code, _, answer = post(node.stow.port, [files[1].read_bytes()], context=context("client"))
    assert code == 200, answer
    # the router's certificate without its token; its token without its certificate
    code, _, answer = post(node.stow.port, [files[2].read_bytes()], token=None,
                           context=context("client"))  # fmt: skip
    assert code == 401 and b"expected credentials" in answer, answer
    code, _, answer = post(node.stow.port, [files[2].read_bytes()], context=context(None))
    assert code == 403, answer
    assert answer.decode().strip() == (
        "a request from 127.0.0.1: stow.clients expects a client certificate named glioforecast "
        "or mr1.radiology.example, found no client certificate"
    )
    assert node.store.counts()["instances"] == 2
    with sqlite3.connect(node.settings.storage.database) as db:
        senders = db.execute("SELECT sop_instance_uid, calling_ae FROM instances").fetchall()
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[:2]]
    assert sorted(senders) == sorted(zip(uids, ["MR1", "ROUTER"], strict=True))
    # each transfer's audit message names the certificate the client proved itself with
    import xml.etree.ElementTree as ET

    def sources() -> list[tuple[str | None, str | None]]:
        lines = audit_file.read_text("utf-8").splitlines() if audit_file.exists() else []
        return sorted(
            (p.get("UserID"), p.get("UserName"))
            for m in map(ET.fromstring, lines)
            if m.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
            for p in m.iter("ActiveParticipant")
            if p.get("UserIsRequestor") == "true"
        )

    wait_for(lambda: len(sources()) == 2, what="the two transfers' audit messages")
    assert sources() == [
        ("MR1", "mr1.radiology.example"),
        ("ROUTER", "glioforecast"),
    ]


def test_a_reload_takes_a_rotated_token(run_node, tmp_path):  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    settings = make_settings(tmp_path / "data", stow=_stow(tmp_path))
    node = run_node(settings, load=lambda: settings)
    data = study["t1c"][0].read_bytes()
    (tmp_path / "router.token").write_text("the-new-token\n")
    assert post(node.stow.port, [data])[0] == 200  # read at start: the old one still works
    assert node.reload() == "applied"
    assert post(node.stow.port, [data])[0] == 401
    assert post(node.stow.port, [data], token="the-new-token")[0] == 200


def test_settings_name_what_a_receiver_needs(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("x")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stow:\n  enabled: true\n  clients:\n"
        "    - {name: A}\n"
        f"    - {{name: B, token_file: {tmp_path / 't'}, username: u}}\n"
        f"    - {{name: B, token_file: {tmp_path / 'missing'}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    text = str(err.value)
    for says in (
        "stow.clients[0]: expected a token_file, a username and password_file, hosts (a client "
        "identified by its address) or certificate_names (by its TLS client certificate), found "
        "none of them",
        "stow.clients[1]: expected a token_file or a username and password_file, found both",
        "stow.clients[1]: expected username and password_file together, found only username",
        f"stow.clients[2].token_file: expected an existing file, found {tmp_path / 'missing'}",
        "stow.clients: expected unique names, found 'B' twice",
    ):
        assert says in text, text
    for text, says in (
        ("stow: {enabled: true}", "stow.clients: expected at least one client"),
        ("stow: {path: /dicom-web/}", "stow.path: expected a URL path"),
        ("stow: {enabled: true, port: 11112, clients: [{name: A, hosts: [10.0.0.1]}]}",
         "stow.port: expected a port of its own, found 11112, which node.port uses too"),
        ("stow: {enabled: true, clients: [{name: A, certificate_names: [mr1]}]}",
         r"stow.clients\[0\].certificate_names: expected node.tls enabled with ca_certificates "
         r"\(a client certificate is only known once verified against them\), found node.tls off"),
        ("stow: {enabled: true, clients: [{name: A, certificate_names: [' mr1']}]}",
         "stow.clients.0..certificate_names.0.: expected a certificate name of 1 to 255 "
         "characters, found ' mr1'"),
    ):  # fmt: skip
        (tmp_path / "other.yaml").write_text(text + "\n")
        with pytest.raises(ConfigError, match=says):
            load_settings(tmp_path / "other.yaml")
    assert load_settings(None).stow == StowSettings()


def test_multipart_structure() -> None:
    body = (
        b"preamble\r\n--xyz\r\nContent-Type: application/dicom\r\n\r\nAB\r\n"
        b"--xyz\r\n\r\nC\r\n--xyz--"
    )
    parts = split_multipart(body, b"xyz")
    assert [(p.content_type, body[p.start : p.end]) for p in parts] == [
        ("application/dicom", b"AB"), ("", b"C")]  # fmt: skip
    for broken, says in ((b"no boundary here", "found none"),
                         (b"--xyz\r\nContent-Type: a", "blank line"),
                         (b"--xyz\r\n\r\nAB", "close delimiter")):  # fmt: skip
        with pytest.raises(Refusal, match=says):
            split_multipart(broken, b"xyz")


def test_check_config_says_where_the_receiver_listens(tmp_path: Path, pki: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "site.yaml"

    def check(text: str) -> str:
        config.write_text(text)
        assert main(["check-config", str(config)]) == 0
        return str(capsys.readouterr().out)

    out = check(
        "stow:\n  enabled: true\n  bind_address: 0.0.0.0\n  clients:\n"
        "    - {name: ROUTER, hosts: [10.2.0.0/16]}\n    - {name: WARD, hosts: [10.3.0.9]}\n"
    )
    assert "  STOW-RS on http://0.0.0.0:11114/dicom-web/studies for ROUTER, WARD\n" in out
    assert "warning: stow: the STOW-RS receiver listens on 0.0.0.0 without TLS" in out
    assert "  STOW-RS receiver off\n" in check("logging: {level: INFO}\n")
    # with TLS, senders known by their client certificates
    out = check(
        f"node:\n  tls: {{enabled: true, certificate: {pki / 'server.pem'}, private_key: "
        f"{pki / 'server.key'}, ca_certificates: {pki / 'ca.pem'}}}\n"
        "  allowed_callers:\n    - {ae_title: MR1, certificate_names: [mr1.radiology.example]}\n"
        "    - {ae_title: CT1}\n"
        "stow: {enabled: true, clients: [{name: ROUTER, certificate_names: [router]}]}\n"
    )
    assert "2 allowed caller rule(s) (1 bound to client certificates), TLS on" in out
    assert "  STOW-RS on https://127.0.0.1:11114/dicom-web/studies for ROUTER\n" in out


def test_real_files_are_stored_alike_by_stow_rs_and_by_c_store(run_node, real_data, tmp_path):  # type: ignore[no-untyped-def]
    """Every public real file of ../shared (scanners' MR in nine transfer syntaxes, enhanced
    multi-frame, a MIM structure set, broken series, anonymised files whose meta information
    still carries the old SOP Instance UID): the same instances are stored whether they come
    by C-STORE (dcmtk dcmsend) or by STOW-RS, 25 files per request."""
    files = sorted(real_data.rglob("*.dcm"))
    by_dimse = run_node(make_settings(tmp_path / "dimse"))
    by_web = run_node(make_settings(tmp_path / "web", stow=_stow(tmp_path)))
    # dcmsend proposes each file's own transfer syntax (storescu proposes one per option)
    sent = subprocess.run(
        [tool("dcmsend"), "-aet", "SCANNER1", "-aec", "GLIOFORECAST", "--decompress-never",
         "127.0.0.1", str(by_dimse.scp.port), *map(str, files)],
        capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"},
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr[-3000:]
    failures: dict[str, int] = {}
    for start in range(0, len(files), 25):
        code, _, answer = post(
            by_web.stow.port, [p.read_bytes() for p in files[start : start + 25]]
        )
        assert code in (200, 202, 409), answer
        failures |= _failures(answer)

    def stored(node) -> set[str]:  # type: ignore[no-untyped-def]
        return {p.stem for p in node.spool.root.rglob("*.dcm")}

    assert stored(by_web) == stored(by_dimse)
    assert len(stored(by_web)) >= 300, len(stored(by_web))
    assert len(stored(by_web)) + len(failures) == len({_uid(p) for p in files})


def test_a_client_that_asks_before_sending_its_body_is_refused_before_it_sends_it(  # type: ignore[no-untyped-def]
    run_node, tmp_path
):
    """``Expect: 100-continue`` (curl, and Orthanc's libcurl, for large bodies): a request that
    would be refused gets its refusal instead of ``100 Continue``, before any byte of its body;
    one that passes is told to go on, and its body is stored."""
    study = factories.small_study(tmp_path / "in")
    node = run_node(stow=_stow(tmp_path, max_request_mb=1))
    data = study["t1c"][0].read_bytes()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"

    def ask(token: str, length: int) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", node.stow.port), timeout=10)
        conn.sendall((
            "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
            f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n"
        ).encode())  # fmt: skip
        return conn

    for token, length, refused in (("guess", len(body), b"401"), (TOKEN, 5 << 20, b"413")):
        with ask(token, length) as conn:
            assert conn.recv(200).startswith(b"HTTP/1.1 " + refused)
    with ask(TOKEN, len(body)) as conn:
        assert conn.recv(200) == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(body)
        assert conn.recv(200).startswith(b"HTTP/1.1 200")
    assert node.store.counts()["instances"] == 1


def test_the_stow_command_sends_a_folder_and_says_what_failed(run_node, tmp_path, capsys):  # type: ignore[no-untyped-def]
    """``glioforecast stow``: what a site's IT team runs to try the receiver (or a PACS's)."""
    study = factories.small_study(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    node = run_node(stow=_stow(tmp_path))
    url = f"http://127.0.0.1:{node.stow.port}/dicom-web"
    token = tmp_path / "router.token"
    rc = main(["stow", url, str(tmp_path / "in"), "--token-file", str(token), "-q"])
    out, err = capsys.readouterr()
    files = sum(len(v) for v in study.values())
    assert (rc, out) == (0, f"sent {files}, failed 0, skipped 1\n"), err
    assert "skipped" in err and "notes.txt" in err
    assert node.store.counts()["instances"] == files
    (tmp_path / "stale").write_text("last-year\n")
    rc = main(["stow", url, str(study["t1c"][0]), "--token-file", str(tmp_path / "stale"), "-q"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "sent 0, failed 1, skipped 0\n"
    assert "answered HTTP 401" in err, err


def test_mangled_requests_are_answered_and_the_receiver_serves_on(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """300 requests made from a good one by cutting, flipping and repeating its bytes (body
    and headers): each is answered with a status that says what happened (never a 500, never
    silence), what was stored is whole, and a good request is stored afterwards."""
    study = factories.small_study(tmp_path / "in")
    node = run_node(stow=_stow(tmp_path))
    good = [p.read_bytes() for p in study["t1c"][:2]]
    boundary = b"b0undary"
    body = b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
                    + b"\r\n" for p in good) + b"--" + boundary + b"--\r\n"  # fmt: skip
    rng = random.Random(20261207)
    answered: Counter[int] = Counter()
    for n in range(300):
        data = bytearray(body)
        kind = n % 3
        if kind == 0:  # cut somewhere, announcing the cut length
            data = data[: rng.randrange(len(data))]
        elif kind == 1:  # flip bytes, in the multipart structure too
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(min(len(data), 400))] = rng.randrange(256)
        else:  # repeat or drop a slice
            a, b = sorted(rng.randrange(len(data)) for _ in range(2))
            data = data[:a] + data[a:b] * rng.randrange(0, 3) + data[b:]
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
        if n % 10 == 9:
            content_type = content_type[: rng.randrange(len(content_type))]
        conn = http.client.HTTPConnection("127.0.0.1", node.stow.port, timeout=30)
        conn.request("POST", "/dicom-web/studies", body=bytes(data), headers={
            "Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        rsp = conn.getresponse()
        rsp.read()
        conn.close()
        answered[rsp.status] += 1
    assert set(answered) <= {200, 202, 400, 409, 415}, answered
    for path in node.spool.root.rglob("*.dcm"):  # whatever was stored is a whole instance
        assert pydicom.dcmread(path).pixel_array.shape == (16, 16)
    assert post(node.stow.port, [p.read_bytes() for p in study["flair"]])[0] == 200


def test_a_request_still_arriving_when_the_node_stops_is_told_to_come_back(tmp_path):  # type: ignore[no-untyped-def]
    """systemctl stop while a router is still sending a request's body: once the body is in,
    the node (its databases closed by then) answers 503 with Retry-After, not a failure."""
    import threading

    from dicom_node.service import Node

    data = factories.small_study(tmp_path / "in")["t1c"][0].read_bytes()
    node = Node(make_settings(tmp_path / "data", health={"enabled": False}, stow=_stow(tmp_path)))
    node.start()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    head = (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", node.stow.port), timeout=20) as router:
        router.sendall(head + body[:500])
        time.sleep(0.3)
        stopping = threading.Thread(target=node.stop)
        stopping.start()
        stopping.join(timeout=60)
        assert not stopping.is_alive()
        router.sendall(body[500:])
        answer = b""
        while chunk := router.recv(4096):  # to the end: the node closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After" in answer and b"the node is stopping" in answer, answer


def _raw(sock: socket.socket, head: str, body: bytes, expect: bool = False) -> bytes:
    """Send a request on ``sock`` (with ``Expect: 100-continue``, the body only once asked
    for); the answer's status line and headers, and its body when it has a length."""
    sock.sendall((head + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode())
    reader = sock.makefile("rb")
    if expect:
        line = reader.readline()
        if not line.startswith(b"HTTP/1.1 100"):
            return line + reader.read()
        reader.readline()  # the blank line after 100 Continue
    sock.sendall(body)
    answer, length = b"", 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        answer += line
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return answer + b"\r\n" + reader.read(length)


def test_each_request_on_a_kept_alive_connection_is_checked_itself(tmp_path):  # type: ignore[no-untyped-def]
    """A request checked at its Expect: 100-continue left that check on the connection: the
    next request on it was taken with the first one's client, study, length and boundary,
    without credentials (found by a probe with curl). Each request is checked now."""
    first, second = (factories.small_study(tmp_path / n)["t1c"][0].read_bytes() for n in "ab")
    from dicom_node.service import Node

    node = Node(make_settings(tmp_path / "data", health={"enabled": False}, stow=_stow(tmp_path)))
    node.start()
    try:

        def request(data: bytes, boundary: str, path: str, token: str | None) -> tuple[str, bytes]:
            body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                    + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                    f'Content-Type: multipart/related; type="application/dicom"; '
                    f"boundary={boundary}\r\n"
                    + (f"Authorization: Bearer {token}\r\n" if token else ""))  # fmt: skip
            return head, body

        with socket.create_connection(("127.0.0.1", node.stow.port), timeout=20) as sock:
            head, body = request(first, "one", "/dicom-web/studies", TOKEN)
            assert _raw(sock, head, body, expect=True).startswith(b"HTTP/1.1 200")
            head, body = request(second, "two", "/dicom-web/studies/9.9.9", None)
            answer = _raw(sock, head, body)
        assert answer.startswith(b"HTTP/1.1 401"), answer
        assert node.store.counts()["instances"] == 1
    finally:
        node.stop()


def test_a_body_framed_two_ways_is_refused(run_node, tmp_path):  # type: ignore[no-untyped-def]
    """Two Content-Length values, or one with chunked transfer coding, or a signed length:
    a proxy in front may frame the body another way than the node (request smuggling,
    RFC 9112 6.3). Each is refused 400, nothing stored."""
    node = run_node(stow=_stow(tmp_path))
    data = factories.small_study(tmp_path / "in")["t1c"][0].read_bytes()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    common = ("POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
              'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
              f"Authorization: Bearer {TOKEN}\r\n")  # fmt: skip
    for framing, says in (
        (f"Content-Length: {len(body)}\r\nContent-Length: 10\r\n", "expected one Content-Length"),
        (f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n", "found both"),
        (f"Content-Length: +{len(body)}\r\n", "expected a Content-Length in bytes"),
    ):
        with socket.create_connection(("127.0.0.1", node.stow.port), timeout=20) as sock:
            answer = _raw(sock, common + framing, b"")
        assert answer.startswith(b"HTTP/1.1 400") and says.encode() in answer, answer
    assert node.store.counts()["instances"] == 0
    lf_only = body.replace(b"\r\n", b"\n")
    conn = http.client.HTTPConnection("127.0.0.1", node.stow.port, timeout=10)
    conn.request("POST", "/dicom-web/studies", body=lf_only, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        "Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    rsp = conn.getresponse()
    assert rsp.status == 400 and b"lines end in LF alone" in rsp.read()


def test_what_http_server_refuses_itself_is_logged_and_counted(run_node, tmp_path, caplog):  # type: ignore[no-untyped-def]
    """A header line of 70,000 characters (431) or a URL of 100 KB (414): answered by Python's
    http.server as HTML, unlogged and uncounted. They are answered, logged and counted as the
    receiver's own refusals."""
    import logging

    caplog.set_level(logging.WARNING, logger="dicom_node.stow")
    node = run_node(stow=_stow(tmp_path))
    for request, code in (
        ("POST /dicom-web/studies HTTP/1.1\r\nX-Long: " + "a" * 70_000 + "\r\n", 431),
        ("POST /dicom-web/studies/" + "1" * 100_000 + " HTTP/1.1\r\n", 414),
    ):
        with socket.create_connection(("127.0.0.1", node.stow.port), timeout=20) as sock:
            answer = _raw(sock, request, b"")
        assert answer.startswith(f"HTTP/1.1 {code}".encode()), answer[:200]
        assert b"Content-Type: text/plain" in answer and b"http.server's limits" in answer
        assert f'glioforecast_stow_requests_total{{code="{code}"}} 1' in node.metrics()
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "refused (431)" in m or "refused (414)" in m]) == 2, said
