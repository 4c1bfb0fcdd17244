"""TLS certificates for a federation: one certificate authority (CA) and the SuperLink's server
certificate, made with ``cryptography`` (no OpenSSL command needed).

The coordinator runs ``glioforecast federate certs --out certs --host superlink.example.org``
once and keeps ``ca.key`` private; it hands ``ca.crt`` (public) to every hospital, whose SuperNode
verifies the SuperLink with it (``--root-certificates ca.crt``). The SuperLink serves
``superlink.crt`` / ``superlink.key`` (``--ssl-certfile``, ``--ssl-keyfile``,
``--ssl-ca-certfile``).

SuperNode authentication (optional, recommended): each site makes a key pair with
``glioforecast federate node-key`` (:func:`make_node_key`); the coordinator registers the public
keys and starts the SuperLink with ``--supernode-auth``, after which only registered SuperNodes
can join, whoever else holds ``ca.crt``.

Files written to ``OUT`` by ``certs``::

    ca.crt          CA certificate (public: give it to the sites and to whoever runs `flwr run`)
    ca.key          CA private key (keep on the coordinator, mode 0600)
    superlink.crt   server certificate for the SuperLink, SAN = the host names and IP addresses
    superlink.key   its private key (mode 0600)
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import ConfigError

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"


@dataclass(frozen=True)
class CertificateSet:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def certificate_set(directory: str | Path) -> CertificateSet:
    d = Path(directory)
    return CertificateSet(d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)


def make_certificates(
    out_dir: str | Path,
    hosts: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    *,
    days: int = 365,
    overwrite: bool = False,
    organisation: str = "glioforecast federation",
) -> CertificateSet:
    """Write a CA and a SuperLink certificate valid for ``hosts`` and ``ips`` (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    files = certificate_set(out)
    existing = [p.name for p in vars(files).values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            "federate certs",
            [
                f"{out}: expected no certificates there, found {existing} (pass --overwrite to "
                "replace them; every site then needs the new ca.crt)"
            ],
        )
    if days < 1:
        raise ConfigError(
            "federate certs", [f"certificate validity: expected >= 1 day, found {days}"]
        )
    if not hosts and not ips:
        raise ConfigError(
            "federate certs", ["certificate names: expected at least one host name or IP address"]
        )
    addresses = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            raise ConfigError(
                "federate certs", [f"--ip: expected an IPv4 or IPv6 address, found {ip!r}"]
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    common = hosts[0] if hosts else str(addresses[0])
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    san += [x509.IPAddress(a) for a in addresses]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, common),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    key_format = serialization.PrivateFormat.PKCS8
    no_pw = serialization.NoEncryption()
    _write(files.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write(files.ca_key, ca_key.private_bytes(pem, key_format, no_pw), private=True)
    _write(files.server_cert, server_cert.public_bytes(pem), private=False)
    _write(files.server_key, server_key.private_bytes(pem, key_format, no_pw), private=True)
    log.info(
        "wrote a CA and a SuperLink certificate for %s to %s (valid %d days)",
        ", ".join([*hosts, *ips]),
        out,
        days,
    )
    return files


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` through a temp file; private files are created mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path


def make_node_key(out_dir: str | Path, name: str, *, overwrite: bool = False) -> NodeKey:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, what Flower reads):
    ``<name>.key`` stays at the site (mode 0600, ``--auth-key`` of ``federate supernode``);
    ``<name>.pub`` goes to the coordinator, who registers it (``federate register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise ConfigError("federate node-key", [f"--name: expected a file name, found {name!r}"])
    out = Path(out_dir)
    files = NodeKey(out / f"{name}.key", out / f"{name}.pub")
    existing = [p.name for p in vars(files).values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            "federate node-key",
            [
                f"{out}: expected no key named {name} there, found {existing} (pass --overwrite "
                "to replace it; the coordinator must then register the new public key)"
            ],
        )
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(files.private_key, private, private=True)
    _write(files.public_key, public + f" glioforecast-{name}\n".encode(), private=False)
    log.info("wrote the SuperNode key pair %s to %s", name, out)
    return files


def check_certificates(directory: str | Path, *, server: bool) -> CertificateSet:
    """The certificate files of ``directory``; raises when a needed one is missing."""
    files = certificate_set(directory)
    needed = [files.ca_cert] + ([files.server_cert, files.server_key] if server else [])
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        found = (
            sorted(p.name for p in Path(directory).iterdir()) if Path(directory).is_dir() else []
        )
        raise ConfigError(
            "federate certs",
            [
                f"{directory}: expected {missing} (make them with `glioforecast federate certs`), "
                f"found {found or 'nothing'}"
            ],
        )
    return files
