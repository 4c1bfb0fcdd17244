"""Configuration reload: `systemctl reload glioforecast` (SIGHUP) applies an edited file to the
running node without dropping associations, or applies nothing and says why."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from dicom_node.ports import free_port
from dicom_node.reload import COMMITMENT_OFFERED, plan_reload
from dicom_node.settings import (
    AllowedCaller,
    Destination,
    DestinationTLS,
    DicomWebSettings,
    TLSSettings,
    load_settings,
)
from tests.conftest import REPO, tool, wait_for
from tests.dicom_node.conftest import all_sent, make_settings, storescp_destination
from tests.dicom_node.test_audit import check_schema
from tests.dicom_node.test_scp import echoscu, storescu
from tests.factories import small_study

# ---------------------------------------------------------------------- what may change live


def _with(settings, section: str, **values):  # type: ignore[no-untyped-def]
    return dataclasses.replace(
        settings, **{section: dataclasses.replace(getattr(settings, section), **values)}
    )


def test_a_reload_applies_what_a_running_node_can_take_and_names_what_needs_a_restart() -> None:
    old = load_settings(None)
    assert plan_reload(old, old).changed == ()

    callers = _with(old, "node", allowed_callers=(AllowedCaller("SCANNER2"),))
    plan = plan_reload(old, callers)
    assert plan.changed == ("node.allowed_callers",) and not plan.restart

    pacs = Destination(name="pacs", ae_title="PACS", host="10.0.0.5", port=104)
    both = _with(_with(callers, "worker", job_timeout_s=60.0), "retention", done_days=1.0)
    both = dataclasses.replace(both, destinations=(pacs,))
    plan = plan_reload(old, both)
    assert set(plan.changed) == {
        "node.allowed_callers", "worker.job_timeout_s", "retention.done_days", "destinations.pacs"
    }  # fmt: skip
    assert not plan.restart

    moved = _with(_with(callers, "node", port=104), "health", port=9100)
    plan = plan_reload(old, moved)
    assert plan.restart == ("node.port", "health.port")
    assert "node.allowed_callers" in plan.changed  # reported, but not applied alone

    # the receiver offers the Storage Commitment SOP class only when a destination asks for it
    committing = dataclasses.replace(
        old, destinations=(dataclasses.replace(pacs, storage_commitment=True),)
    )
    plan = plan_reload(dataclasses.replace(old, destinations=(pacs,)), committing)
    assert plan.restart == (COMMITMENT_OFFERED,)
    two = dataclasses.replace(
        committing, destinations=(*committing.destinations, dataclasses.replace(pacs, name="b"))
    )
    assert plan_reload(committing, two).restart == ()


# ------------------------------------------------------------ the real process and SIGHUP


def _config(path: Path, callers: list[str], health_port: int, audit: Path, extra: str = "") -> None:
    lines = "\n".join(f"    - ae_title: {c}" for c in callers)
    path.write_text(
        f"node:\n  allowed_callers:\n{lines}\n{extra}"
        f"health:\n  port: {health_port}\n"
        f"audit:\n  enabled: true\n  file: {audit}\n"
    )


def _metric(health_port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=10).read()
    values = {}
    for line in text.decode().splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            values[key[len(name) :]] = float(value)
    return values


class _Notifications:
    """systemd's side of the notify socket."""

    def __init__(self, address: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(address))
        self.sock.settimeout(30)

    def until(self, prefix: str) -> list[str]:
        """Every message up to the first that starts with ``prefix``, watchdog pets left out."""
        seen = []
        while True:
            message = self.sock.recv(4096).decode()
            if message == "WATCHDOG=1":
                continue
            seen.append(message)
            if message.startswith(prefix):
                return seen


def test_sighup_applies_the_edited_file_keeps_open_associations_and_refuses_a_bad_edit(
    tmp_path: Path,
) -> None:
    config, audit, log = tmp_path / "node.yaml", tmp_path / "audit.log", tmp_path / "node.log"
    port, health = free_port(), free_port()
    _config(config, ["SCANNER1"], health, audit)
    systemd = _Notifications(tmp_path / "notify.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve",
         "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip

    def reload(expected: str) -> None:
        server.send_signal(signal.SIGHUP)
        messages = systemd.until("READY=1")
        assert messages[0].startswith("RELOADING=1\nMONOTONIC_USEC="), messages
        assert messages[-1].endswith(f"configuration reload {expected}"), messages

    try:
        systemd.until("READY=1")
        assert echoscu(port, aet="SCANNER1").returncode == 0
        assert echoscu(port, aet="SCANNER2").returncode != 0
        # a scanner's association, open while the site edits the file
        study = small_study(tmp_path / "in")
        ae = AE(ae_title="SCANNER1")
        ds = dcmread(study["t1c"][0])
        ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="GLIOFORECAST")
        assert assoc.is_established

        # SCANNER2 replaces SCANNER1
        _config(config, ["SCANNER2"], health, audit)
        reload("applied")
        assert echoscu(port, aet="SCANNER2").returncode == 0
        assert echoscu(port, aet="SCANNER1").returncode != 0  # a new association is refused
        status = assoc.send_c_store(ds)  # the one already open goes on
        assert status.Status == 0x0000
        assoc.release()
        sent = storescu(port, *study["t1c"][1:], aet="SCANNER2")
        assert sent.returncode == 0, sent.stderr

        # a typo: the file is refused whole, SCANNER3 is not let in, the node goes on as it was
        _config(config, ["SCANNER3"], health, audit, extra="  max_asociations: 5\n")
        reload("refused")
        assert echoscu(port, aet="SCANNER3").returncode != 0
        assert echoscu(port, aet="SCANNER2").returncode == 0

        # a new AE title takes a restart: nothing is applied, the node still answers to its own
        # (node.port would too; here serve --port overrides the file's, as at a restart)
        _config(config, ["SCANNER3"], health, audit, extra="  ae_title: NEWNAME\n")
        reload("refused")
        assert echoscu(port, aet="SCANNER3").returncode != 0
        assert echoscu(port, aet="SCANNER2").returncode == 0

        _config(config, ["SCANNER2"], health, audit)
        reload("unchanged")
        reloads = _metric(health, "glioforecast_config_reloads_total")
        assert reloads == {
            '{result="applied"}': 1, '{result="unchanged"}': 1, '{result="refused"}': 2
        }  # fmt: skip
        assert _metric(health, "glioforecast_config_last_reload_successful") == {"": 1}
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        systemd.sock.close()
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert f"configuration reloaded from {config}: node.allowed_callers applied" in text
    assert "node.max_asociations: unknown key" in text  # the file, the key, the problem
    assert "node.ae_title changed, which a running node cannot take" in text
    assert text.count("nothing was applied") == 2
    # the audit trail: who may call changed (Security Configuration), and the refusals
    messages = audit.read_text().splitlines()
    security = [m for m in messages if 'csd-code="110129"' in m]
    software = [m for m in messages if 'csd-code="110131"' in m]
    assert len(security) == 2 and len(software) == 1
    for message in (*security, *software):
        check_schema(ET.fromstring(message))
    applied, restart = security
    assert 'EventOutcomeIndicator="0"' in applied and "node.allowed_callers applied" in applied
    assert config.resolve().as_uri() in applied
    assert 'EventOutcomeIndicator="4"' in restart and "node.ae_title changed" in restart
    # a file that does not validate (what it would have changed is unknown): its multi-line
    # reason stays on the message's one line of the file, and reads back whole
    assert 'EventOutcomeIndicator="4"' in software[0]
    reason = ET.fromstring(software[0]).findtext("EventIdentification/EventOutcomeDescription")
    assert f"{config}:\n  - node.max_asociations: unknown key" in str(reason)


# -------------------------------------------------------------- the running node's parts


def test_a_destination_added_by_a_reload_gets_the_next_results(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc, pacs = storescp_destination(tmp_path / "pacs", "pacs", "PACS", failure_notice=True)
    try:
        settings = make_settings(tmp_path / "data")
        edited = dataclasses.replace(settings, destinations=(pacs,))
        node = run_node(settings, load=lambda: edited)
        node.request_reload()
        wait_for(lambda: node.reloads["applied"] == 1, what="the reload")
        assert node.notices.destinations == ["pacs"]
        # a study without its structure set: its job fails, and the failure notice goes to
        # the destination the reload added
        study = small_study(tmp_path / "in")
        assert storescu(node.scp.port, *study["t1c"]).returncode == 0
        assert all_sent(node, "pacs") == 2  # the notice's page and SR
        assert len(list((tmp_path / "pacs").iterdir())) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_reload_that_cannot_load_a_destinations_tls_files_changes_nothing(
    run_node, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "not-a-certificate.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    tls = DestinationTLS(enabled=True, ca_certificates=bad)
    pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, tls=tls)
    settings = make_settings(tmp_path / "data")
    edited = _with(
        dataclasses.replace(settings, destinations=(pacs,)),
        "node", allowed_callers=(AllowedCaller("SCANNER2"),),
    )  # fmt: skip
    node = run_node(settings, load=lambda: edited)
    assert node.reload() == "refused"
    assert node.settings is settings and node.scp.settings is settings.node
    assert node.sender.destinations == []
    assert echoscu(node.scp.port, aet="SCANNER1").returncode == 0


def test_a_reload_reads_a_rotated_dicomweb_token_though_the_file_did_not_change(
    run_node, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    token = tmp_path / "token"
    token.write_text("first\n")
    web = DicomWebSettings(url="https://pacs.example.org/dicom-web", token_file=token)
    settings = dataclasses.replace(
        make_settings(tmp_path / "data"), destinations=(Destination(name="cloud", dicomweb=web),)
    )
    node = run_node(settings, load=lambda: settings)
    assert node.sender.destinations[0].authorization == "Bearer first"
    assert node.reload() == "unchanged"
    token.write_text("second\n")  # the site's token rotation
    assert node.reload() == "applied"
    assert node.sender.destinations[0].authorization == "Bearer second"
    assert node.reload() == "unchanged"


@pytest.mark.parametrize("method", ["move", "get"])
def test_a_reload_starts_reconfigures_and_stops_the_retriever(run_node, tmp_path, method) -> None:  # type: ignore[no-untyped-def]
    pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    settings = make_settings(tmp_path / "data")
    asking = _with(dataclasses.replace(settings, destinations=(pacs,)), "retrieve", source="pacs")
    versions = iter(
        [asking, _with(asking, "retrieve", method=method, ask_again_h=1.0),
         dataclasses.replace(asking, retrieve=settings.retrieve)]
    )  # fmt: skip
    node = run_node(settings, load=lambda: next(versions))
    assert node.retriever is None
    assert node.reload() == "applied"
    retriever = node.retriever
    assert retriever is not None and retriever.alive
    assert node.summary()["components"]["retriever"] is True  # type: ignore[index]
    assert node.reload() == "applied"
    assert node.retriever is retriever and retriever.settings.retrieve.ask_again_h == 1.0
    assert (retriever.receiver is node.scp) == (method == "get")
    assert node.reload() == "applied"
    assert node.retriever is None
    wait_for(lambda: not retriever.alive, what="the retriever to stop")


def test_a_renewed_receiver_certificate_is_served_after_a_reload_and_a_bad_one_is_refused(
    run_node, tmp_path, pki
) -> None:  # type: ignore[no-untyped-def]
    """Certificates expire: the site renews the node's in place (same paths) and reloads."""
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki / name, tls_dir / name)
    tls = TLSSettings(
        enabled=True, certificate=tls_dir / "server.pem", private_key=tls_dir / "server.key",
        ca_certificates=tls_dir / "ca.pem",
    )  # fmt: skip
    settings = _with(make_settings(tmp_path / "data"), "node", tls=tls)
    node = run_node(settings, load=lambda: settings)

    def served() -> str:
        return ssl.get_server_certificate(("127.0.0.1", node.scp.port), timeout=10)

    assert _same_certificate(served(), pki / "server.pem")
    # the renewal: a new key and certificate from the same CA, written over the old files
    openssl = tool("openssl")
    subprocess.run(
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "renewed.key", "-out",
         "renewed.csr", "-subj", "/CN=server renewed", "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [openssl, "x509", "-req", "-in", "renewed.csr", "-CA", str(pki / "ca.pem"), "-CAkey",
         str(pki / "ca.key"), "-CAcreateserial", "-CAserial", "renewed.srl", "-out",
         "renewed.pem", "-days", "2", "-copy_extensions", "copy"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    shutil.copy(tmp_path / "renewed.pem", tls_dir / "server.pem")
    shutil.copy(tmp_path / "renewed.key", tls_dir / "server.key")
    assert _same_certificate(served(), pki / "server.pem")  # nothing read before the reload
    assert node.reload() == "applied"
    assert _same_certificate(served(), tmp_path / "renewed.pem")
    # a certificate whose key does not match: refused, the renewed one is still served
    shutil.copy(pki / "server.pem", tls_dir / "server.pem")
    assert node.reload() == "refused"
    assert _same_certificate(served(), tmp_path / "renewed.pem")


def _same_certificate(pem: str, path: Path) -> bool:
    return ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(path.read_text())


def test_a_reload_that_changes_retention_runs_a_pass_at_once(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The disk fills; the site shortens retention and reloads: the files go now, not at the
    end of the old check interval (an hour by default), while the reload said "applied"."""
    from dicom_node.settings import RetentionSettings

    settings = make_settings(
        tmp_path / "data", retention={"failed_days": 30.0, "check_interval_s": 3600.0}
    )
    shorter = dataclasses.replace(
        settings, retention=RetentionSettings(failed_days=1e-5, check_interval_s=3600.0)
    )
    node = run_node(settings, load=lambda: shorter)
    study = small_study(tmp_path / "in")
    assert storescu(node.scp.port, *study["t1c"]).returncode == 0  # no structure set: fails
    wait_for(lambda: node.store.counts()["failed"] == 1, what="the job to fail")
    time.sleep(1.0)  # older than the new failed_days (0.86 s)
    assert list(node.spool.root.rglob("*.dcm"))  # the first pass, at the start, kept them
    node.request_reload()
    wait_for(lambda: node.reloads["applied"] == 1, what="the reload")
    wait_for(lambda: not list(node.spool.root.rglob("*.dcm")), what="the study's files removed")
