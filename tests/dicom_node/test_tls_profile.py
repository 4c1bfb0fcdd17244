"""The node's TLS profile (BCP 195): every TLS 1.2 suite it offers or accepts has forward
secrecy and authenticated encryption; a peer offering only CBC suites gets no connection, in
either direction."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.audit import _client_context
from dicom_node.scu import client_ssl_context
from dicom_node.service import Node
from dicom_node.settings import AuditSettings
from tests.conftest import receiver_tls

#: a TLS 1.2 suite Python's default context keeps and the profile drops
CBC = "ECDHE-RSA-AES128-SHA256"


def _tls12_client(pki: Path, ciphers: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def test_every_context_offers_only_aead_suites_with_forward_secrecy(pki: Path) -> None:
    from dicom_node.scp import server_ssl_context

    contexts = {
        "receiver": server_ssl_context(
            str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"), True
        ),
        "sender": client_ssl_context(pki / "ca.pem", None, None),
        "audit": _client_context(AuditSettings(enabled=True, ca_certificates=pki / "ca.pem")),
    }
    for name, ctx in contexts.items():
        suites = ctx.get_ciphers()
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2, name
        assert suites and all(s["aead"] for s in suites), (name, [s["name"] for s in suites])
        tls12 = [s for s in suites if s["protocol"] == "TLSv1.2"]
        assert tls12 and all(s["kea"] == "kx-ecdhe" for s in tls12), (name, tls12)


def test_the_receiver_refuses_a_client_with_only_cbc_suites(
    run_node: Callable[..., Node], pki: Path
) -> None:
    node = run_node(node={"tls": receiver_tls(pki)})
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as raw:
        ctx = _tls12_client(pki, "ECDHE-RSA-AES128-GCM-SHA256")
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"
            assert tls.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"
    with (
        socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"),
    ):
        _tls12_client(pki, CBC).wrap_socket(raw, server_hostname="localhost")


def test_the_sender_refuses_a_peer_with_only_cbc_suites(pki: Path) -> None:
    """A PACS whose TLS 1.2 offers only CBC suites is not connected to."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    server.set_ciphers(CBC)
    server.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, pytest.raises(ssl.SSLError):
            server.wrap_socket(conn, server_side=True)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            client_ssl_context(pki / "ca.pem", None, None).wrap_socket(
                raw, server_hostname="localhost"
            )
    finally:
        thread.join(10)
        listener.close()
