"""What the federate commands check before Flower runs: the SuperLink's --certs, the CA
certificate of `run` and `register` (expired, or not the SuperLink's), numbers that are not
finite and repeated site names in the run config, a certificate path that is a folder; and
what `register` keeps of a site's registration."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from inference.federated.certs import CertificateSet, check_certificates, make_certificates
from inference.federated.config import RunConfig, parse_run_config

from .conftest import expired_copy, fake_flwr_calls


def _main(args: list[str]) -> int:
    from dicom_node.cli import main

    return main(["federate", *args])


def test_superlink_without_certs_or_insecure_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It used to build an --insecure command and crash (TypeError) reading the names of a
    certificate it had not been given."""
    assert _main(["superlink", "--port", "19300", "--print"]) == 2
    out, err = capsys.readouterr()
    said = "glioforecast federate superlink: expected --certs DIR (or --insecure), found neither"
    assert said in err
    assert out == ""
    assert _main(["superlink", "--port", "19300", "--insecure", "--print"]) == 0
    assert "--insecure" in capsys.readouterr().out


def _expired_ca(good: CertificateSet, path: Path) -> Path:
    """``good``'s CA certificate re-signed to have expired in 2020."""
    return expired_copy(good.ca_cert, good.ca_key, path)


@contextlib.contextmanager
def _server(certs: CertificateSet | None) -> Iterator[int]:
    """A TLS server presenting ``certs``' SuperLink certificate (``None``: one that answers in
    plain HTTP, as a SuperLink started with --insecure does) on a free port of 127.0.0.1."""
    context = None
    if certs is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.server_cert, certs.server_key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                if context is None:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    continue
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=10)
        sock.close()


def test_run_and_register_check_the_ca_certificate_first(
    fake_flwr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """An expired ca.crt, or another federation's, used to get only Flower's "Connection to the
    SuperLink is unavailable" from `federate run` and `federate register`."""
    monkeypatch.setenv("FAKE_LOG_S", "0")
    good = make_certificates(tmp_path / "good", hosts=["localhost"], ips=["127.0.0.1"])
    other = make_certificates(tmp_path / "other")
    expired = _expired_ca(good, tmp_path / "expired-ca.crt")
    pub = tmp_path / "keys" / "HOSPITAL-A.pub"
    pub.parent.mkdir()
    pub.write_text("ecdsa-sha2-nistp384 AAAA glioforecast-HOSPITAL-A\n")

    def commands(superlink: str, ca: Path) -> dict[str, list[str]]:
        common = ["--superlink", superlink, "--ca-cert", str(ca)]
        return {
            "run": ["run", *common, "--out", str(tmp_path / "m")],
            "register": ["register", *common, "--public-key", str(pub)],
        }

    for name, args in commands("localhost:9", expired).items():
        assert _main(args) == 2, name
        err = capsys.readouterr().err
        assert f"glioforecast federate {name}: " in err
        assert f"{expired}: expected a certificate valid now (" in err
        assert "found one valid from 2020-01-01 00:00 to 2020-01-31 00:00 UTC (expired;" in err
    with _server(good) as port:
        for name, args in commands(f"localhost:{port}", other.ca_cert).items():
            assert _main(args) == 2, name
            err = capsys.readouterr().err
            assert (
                f"--ca-cert {other.ca_cert}: expected the CA certificate of the SuperLink at "
                f"localhost:{port}, found that it does not verify the certificate the SuperLink "
                "presents (" in err
            ), err
            assert "valid for localhost, 127.0.0.1 until " in err
    # a host name the SuperLink's certificate does not hold
    named = make_certificates(tmp_path / "named", hosts=["fl.example.org"], ips=[])
    with _server(named) as port:
        assert _main(commands(f"localhost:{port}", named.ca_cert)["run"]) == 2
        err = capsys.readouterr().err
        assert "does not verify the certificate the SuperLink presents (" in err
        assert "valid for fl.example.org until " in err
    assert fake_flwr_calls(fake_flwr) == []  # Flower was never asked
    with _server(None) as port:
        assert _main(commands(f"localhost:{port}", good.ca_cert)["run"]) == 2
        err = capsys.readouterr().err
        assert f"--superlink localhost:{port}: expected a SuperLink serving TLS, found no TLS " in (
            err
        )
        assert "is the SuperLink started with --insecure" in err
    # the federation's own ca.crt: Flower is asked
    with _server(good) as port:
        assert _main([*commands(f"localhost:{port}", good.ca_cert)["register"],
                      "--flwr-home", str(tmp_path / "home")]) == 0  # fmt: skip
    assert [c[:2] for c in fake_flwr_calls(fake_flwr)] == [["supernode", "register"]]


def test_register_records_the_node_id_of_each_site(
    fake_flwr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flwr supernode list` shows node IDs only, and register kept its connection settings in
    a temporary folder: the coordinator could not tell which node was which site, nor run
    `flwr supernode list` as the walk-through said."""
    from inference.federated.cli import SITES_FILE

    pub = tmp_path / "keys" / "HOSPITAL-A.pub"
    pub.parent.mkdir()
    pub.write_text("ecdsa-sha2-nistp384 AAAA glioforecast-HOSPITAL-A\n")
    home = tmp_path / "admin"
    args = ["register", "--superlink", "fl:9092", "--insecure", "--public-key", str(pub)]
    assert _main([*args, "--flwr-home", str(home)]) == 0
    out = capsys.readouterr().out
    assert f"site HOSPITAL-A: SuperNode key {pub} registered, node ID 777" in out
    assert fake_flwr_calls(fake_flwr) == [
        ["supernode", "register", str(pub), "glioforecast", "--name", "HOSPITAL-A", "--format",
         "json"],
    ]  # fmt: skip
    sites = json.loads((home / SITES_FILE).read_text())
    assert sites["HOSPITAL-A"]["node-id"] == "777"
    assert sites["HOSPITAL-A"]["public-key"] == str(pub)
    assert (home / "config.toml").is_file()  # `FLWR_HOME=admin flwr supernode list` reads it
    # --site names it otherwise; without --flwr-home nothing is kept, and the output says so
    assert _main([*args, "--site", "HOSPITAL-X"]) == 0
    out = capsys.readouterr().out
    assert "site HOSPITAL-X: SuperNode key" in out
    assert "without --flwr-home the connection settings are not kept" in out
    assert fake_flwr_calls(fake_flwr)[-1][4:6] == ["--name", "HOSPITAL-X"]


def test_run_config_refuses_numbers_that_are_not_finite_and_repeated_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FedProx with mu nan trained as FedAvg (`proximal_mu > 0` is false) and wrote NaN, which
    is not JSON, into train_state.json; a learning rate inf was taken; sites A,A with
    min-sites 2 was taken, and no round could ever have two sites."""
    cases = {
        (("strategy", "fedprox"), ("proximal_mu", math.nan)): "proximal-mu: expected a finite "
        "number, found nan",
        (("learning_rate", math.inf),): "learning-rate: expected a finite number, found inf",
        (("round_timeout", -math.inf),): "round-timeout: expected a finite number, found -inf",
        (("sites", "A,A"), ("min_sites", 2)): "sites: expected distinct site names, found ['A'] "
        "more than once in 'A,A'",
    }
    for values, message in cases.items():
        with pytest.raises(ConfigError) as err:
            RunConfig(**dict(values))
        assert message in str(err.value)
    with pytest.raises(ConfigError) as err:
        RunConfig(sites="A,A,B", min_sites=3)
    assert "min-sites: expected at most the 2 site(s) named in sites ['A', 'B'], found 3" in str(
        err.value
    )
    # from the command line and from --run-config (TOML has nan and inf)
    common = ["run", "--superlink", "fl:9092", "--insecure", "--out", str(tmp_path / "m"),
              "--print", "--flwr-home", str(tmp_path / "home")]  # fmt: skip
    assert _main([*common, "--strategy", "fedprox", "--proximal-mu", "nan"]) == 2
    assert "proximal-mu: expected a finite number, found nan" in capsys.readouterr().err
    assert _main([*common, "--sites", "A,A", "--min-sites", "2"]) == 2
    assert "sites: expected distinct site names" in capsys.readouterr().err
    assert _main([*common, "--run-config", "learning-rate=inf"]) == 2
    assert "learning-rate: expected a finite number, found inf" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="wait-for-sites: expected a finite number, found nan"):
        parse_run_config({"wait-for-sites": math.nan})


def test_a_certificate_path_that_is_a_folder_is_named_as_one(tmp_path: Path) -> None:
    """It used to say "expected ['superlink.crt'] ..., found [... 'superlink.crt' ...]"."""
    files = make_certificates(tmp_path / "c")
    files.server_cert.unlink()
    files.server_cert.mkdir()
    with pytest.raises(ConfigError) as err:
        check_certificates(tmp_path / "c", server=True)
    text = str(err.value)
    assert f"{files.server_cert}: expected a certificate or key file (made by " in text
    assert "found a directory" in text
    assert "expected ['superlink.crt']" not in text
