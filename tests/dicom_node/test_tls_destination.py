"""Results sent over DICOM TLS: to the node's own receiver with TLS on (a real TLS SCP that asks
for a client certificate), and what an operator reads when the certificates do not fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicom_node.outbox import Outbox, RetryPolicy, deliver_due
from dicom_node.scu import Destination
from dicom_node.service import Node
from dicom_node.settings import Destination as DestinationSettings
from dicom_node.settings import DestinationTLS
from tests.conftest import receiver_tls
from tests.dicom_node.test_outbox import Clock, _objects


@pytest.fixture
def tls_receiver(run_node: Callable[..., Node], pki: Path) -> Node:
    """A node whose receiver takes TLS only, from callers with a certificate of the test CA."""
    return run_node(node={"tls": receiver_tls(pki)})


def _destination(node: Node, **tls: Any) -> Destination:
    entry = DestinationSettings(
        name="pacs",
        ae_title=node.settings.node.ae_title,
        host="127.0.0.1",
        port=node.scp.port,
        tls=DestinationTLS(enabled=True, **tls),
    )
    return Destination.from_settings(entry)


def _deliver(tmp_path: Path, dest: Destination) -> Outbox:
    ob = Outbox(tmp_path / "outbox.sqlite3", policy=RetryPolicy(), clock=Clock())
    ob.enqueue(_objects(), [dest.name], job="job-tls")
    deliver_due(ob, [dest])
    return ob


def test_results_go_over_tls_with_a_client_certificate(
    tls_receiver: Node, pki: Path, tmp_path: Path
) -> None:
    dest = _destination(
        tls_receiver,
        ca_certificates=pki / "ca.pem",
        certificate=pki / "client.pem",
        private_key=pki / "client.key",
    )
    assert str(dest).endswith(", TLS)")
    with _deliver(tmp_path, dest) as ob:
        assert ob.counts() == {"pacs": {"sent": len(_objects())}}
    assert tls_receiver.store.counts()["instances"] == len(_objects())


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        (  # the PACS's certificate is signed by a CA the node was not given
            {"ca_certificates": "other-ca.pem", "certificate": "client.pem",
             "private_key": "client.key"},
            "TLS handshake failed: the peer's certificate is not trusted for '127.0.0.1': "
            "self-signed certificate in certificate chain",
        ),
        (  # the name the node checks is not the PACS's
            {"ca_certificates": "ca.pem", "certificate": "client.pem",
             "private_key": "client.key", "server_name": "pacs.example.org"},
            "TLS handshake failed: the peer's certificate is not trusted for "
            "'pacs.example.org': Hostname mismatch",
        ),
        (  # the PACS wants a client certificate, the node has none
            {"ca_certificates": "ca.pem"},
            "TLS handshake failed: the peer requires a client certificate",
        ),
    ],
)  # fmt: skip
def test_a_tls_failure_says_why(
    tls_receiver: Node, pki: Path, tmp_path: Path, tls: dict[str, str], expected: str
) -> None:
    files = {k: (v if k == "server_name" else pki / v) for k, v in tls.items()}
    dest = _destination(tls_receiver, **files)
    with _deliver(tmp_path, dest) as ob:
        items = ob.items()
        assert {i.state for i in items} == {"pending"}
        error = items[0].last_error or ""
        assert expected in error, error
        assert "peer down" not in error
    assert tls_receiver.store.counts()["instances"] == 0


def test_destination_tls_files_are_checked_with_the_configuration(tmp_path: Path) -> None:
    from dicom_node.errors import ConfigError, GlioforecastError
    from dicom_node.settings import load_settings

    site = tmp_path / "site.yaml"
    site.write_text(
        "destinations:\n"
        "  - {name: pacs, ae_title: PACS, host: 10.0.0.5, port: 2762,\n"
        f"     tls: {{enabled: true, ca_certificates: {tmp_path}/none.pem,\n"
        f"           certificate: {tmp_path}/site.yaml}}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(site)
    problems = "\n".join(info.value.problems)
    assert f"destinations[0].tls.ca_certificates: expected an existing file, found {tmp_path}" in (
        problems
    )
    assert "destinations[0].tls: expected both certificate and private_key" in problems
    # files that are there but are no certificates: the node says so when it starts
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    entry = DestinationSettings(
        name="pacs", ae_title="PACS", host="h", port=104,
        tls=DestinationTLS(enabled=True, ca_certificates=garbage),
    )  # fmt: skip
    with pytest.raises(GlioforecastError, match=r"destination pacs: cannot load its TLS files"):
        Destination.from_settings(entry)
    # a destination without TLS needs none of it
    ok = dataclasses.replace(load_settings(None))
    assert all(not d.tls.enabled for d in ok.destinations)


def test_check_destinations_over_tls(
    tls_receiver: Node, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a site runs after configuring TLS: the right files pass, a wrong CA says why."""
    from dicom_node.cli import main

    def config(ca: str) -> Path:
        path = tmp_path / f"site-{ca}.yaml"
        path.write_text(
            "destinations:\n"
            f"  - {{name: pacs, ae_title: GLIOFORECAST, host: 127.0.0.1, "
            f"port: {tls_receiver.scp.port},\n"
            f"     tls: {{enabled: true, ca_certificates: {pki / ca},\n"
            f"           certificate: {pki / 'client.pem'}, private_key: {pki / 'client.key'}}}}}\n"
        )
        return path

    assert main(["--config", str(config("ca.pem")), "check-destinations"]) == 0
    assert capsys.readouterr().out.startswith("ok   pacs (GLIOFORECAST@127.0.0.1:")
    assert main(["--config", str(config("other-ca.pem")), "check-destinations"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL pacs (") and "the peer's certificate is not trusted" in out


def test_echo_and_send_over_tls_from_the_command_line(
    tls_receiver: Node, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What site IT runs to try a TLS peer by hand: the same files as a destination's tls."""
    from dicom_node.cli import main

    peer = ["127.0.0.1", str(tls_receiver.scp.port), "-aec", "GLIOFORECAST"]
    client = ["--certificate", str(pki / "client.pem"), "--private-key", str(pki / "client.key")]
    trusted = ["--ca-certificates", str(pki / "ca.pem"), *client]
    assert main(["echo", *peer, *trusted]) == 0
    assert f"C-ECHO GLIOFORECAST@127.0.0.1:{tls_receiver.scp.port} over TLS: status 0x0000" in (
        capsys.readouterr().out
    )
    folder = tmp_path / "study"
    folder.mkdir()
    for n, ds in enumerate(_objects()[:3]):
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    assert main(["send", "-q", *peer, *trusted, str(folder)]) == 0
    assert "sent 3, failed 0, skipped 0" in capsys.readouterr().out
    assert tls_receiver.store.counts()["instances"] == 3

    # without TLS, the wrong CA, half a client certificate: refused, and said why
    assert main(["echo", *peer]) == 1
    wrong = ["--ca-certificates", str(pki / "other-ca.pem"), *client]
    assert main(["echo", *peer, *wrong]) == 1
    assert "the peer's certificate is not trusted for '127.0.0.1'" in capsys.readouterr().err
    assert main(["echo", *peer, "--tls", "--certificate", str(pki / "client.pem")]) == 1
    assert "expected --certificate and --private-key together" in capsys.readouterr().err
