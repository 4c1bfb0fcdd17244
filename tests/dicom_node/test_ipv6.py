"""IPv6: a node listening on ``::`` takes IPv4 and IPv6 senders on each of its listeners (the
DICOM receiver, the STOW-RS receiver, the health endpoint), names an IPv4 sender by its IPv4
address, applies node.allowed_callers to IPv6 addresses and networks, and sends results to a
destination at an IPv6 address. dcmtk 3.6.7 (Debian) has no IPv6, so the IPv6 clients here are
pynetdicom's and Python's."""

from __future__ import annotations

import errno
import http.client
import logging
import socket
from pathlib import Path

import pytest
from pynetdicom import AE

from dicom_node.listener import cannot_listen, peer_host
from dicom_node.ports import host_port
from dicom_node.scu import store_batch
from dicom_node.settings import AllowedCaller
from tests import factories
from tests.dicom_node.test_cli import run_cli
from tests.dicom_node.test_scp import echoscu, storescu
from tests.dicom_node.test_scu import StoreSCP, _objects
from tests.dicom_node.test_stow import _stow, post

VERIFICATION = "1.2.840.10008.1.1"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")


def _echo_v6(port: int, calling: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("::1", port, ae_title="GLIOFORECAST")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def test_addresses_are_named_as_the_node_shows_them() -> None:
    assert peer_host("::ffff:10.1.2.3") == "10.1.2.3"  # an IPv4 client of a dual-stack socket
    assert peer_host("fd00::5") == "fd00::5"
    assert peer_host("fe80::1%eth0") == "fe80::1%eth0"
    assert host_port("::1", 11112) == "[::1]:11112"
    assert host_port("10.1.2.3", 104) == "10.1.2.3:104"


@needs_ipv6
def test_a_node_on_every_address_takes_ipv4_and_ipv6_senders(run_node, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="dicom_node")
    callers = (
        AllowedCaller("SCANNER1", hosts=("127.0.0.1",)),
        AllowedCaller("MR6", hosts=("::1/128",)),
    )
    node = run_node(
        node={"bind_address": "::", "allowed_callers": callers, "refuse_unknown_callers": True},
        health={"bind_address": "::"},
        stow=_stow(tmp_path, bind_address="::"),
    )
    # a scanner on IPv4 (dcmtk) stores a study, and is named by its IPv4 address
    study = factories.small_study(tmp_path / "in")
    files = [p for paths in study.values() for p in paths]
    result = storescu(node.scp.port, *files)
    assert result.returncode == 0, result.stderr
    assert len(list(node.spool.root.rglob("*.dcm"))) == len(files)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "association from SCANNER1 at 127.0.0.1 accepted" in said
    assert "::ffff:" not in said
    # a caller bound to an IPv6 address gets in from it, and not from IPv4
    assert _echo_v6(node.scp.port, "MR6")
    assert echoscu(node.scp.port, aet="MR6").returncode != 0
    assert not _echo_v6(node.scp.port, "SCANNER1")
    # the health endpoint and the STOW-RS receiver answer on both
    for host in ("::1", "127.0.0.1"):
        conn = http.client.HTTPConnection(host, node.health.port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    code, _, _ = post(node.stow.port, [b"not DICOM"], host="::1")
    assert code == 409  # answered (the part refused), not a connection error


@needs_ipv6
def test_results_go_to_a_destination_at_an_ipv6_address() -> None:
    pacs = StoreSCP(host="::1").start()
    try:
        destination = pacs.destination()
        assert f"@[::1]:{pacs.port}" in str(destination)
        objects = _objects()
        results = store_batch(objects, destination)
        assert all(r.delivered for r in results)
        assert len(pacs.received) == len(objects)
    finally:
        pacs.stop()


def test_an_address_the_machine_does_not_have_is_named_with_the_setting(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1) is no address of this machine: serve says which setting to
    change, not that the port is taken."""
    config = tmp_path / "site.yaml"
    config.write_text("node: {bind_address: 192.0.2.1}\nhealth: {port: 0}\n")
    result = run_cli("--config", str(config), "serve", "--data-dir", str(tmp_path / "data"),
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "DICOM receiver: cannot listen on 192.0.2.1:11112" in result.stderr
    assert "expected an address of this machine in node.bind_address" in result.stderr
    busy = OSError(errno.EADDRINUSE, "Address already in use")
    assert cannot_listen("health endpoint", "::", 11113, busy, "health", True) == (
        "health endpoint: cannot listen on [::]:11113 ([Errno 98] Address already in use); "
        "expected a free port: stop the other listener, or set health.port, or "
        "health.enabled: false"
    )
