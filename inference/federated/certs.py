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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
SERVER_COMMON_NAME = "glioforecast SuperLink"


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
    """Write a CA and a SuperLink certificate valid for ``hosts`` and ``ips`` (EC P-256). A
    host given as an IP address is an IP name of the certificate (a TLS client checks an
    address against those only); a URL, a port or an empty name is refused."""
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
    names: list[str] = []
    addresses = []
    problems = []
    for host in hosts:
        try:
            addresses.append(ipaddress.ip_address(host.strip("[]")))
            continue
        except ValueError:
            pass
        why = _host_problem(host)
        if why is not None:
            problems.append(f"--host: expected a host name (e.g. superlink.example.org), found "
                            f"{host!r} ({why})")  # fmt: skip
        else:
            names.append(host.lower())
    if problems:
        raise ConfigError("federate certs", problems)
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
    addresses = list(dict.fromkeys(addresses))
    server_key = ec.generate_private_key(ec.SECP256R1())
    # clients check the names of the SAN, never the CN: a short fixed one (a CN holds at most
    # 64 characters, which a long host name used to exceed with a traceback)
    common = SERVER_COMMON_NAME
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(names)]
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
        ", ".join([*dict.fromkeys(names), *map(str, addresses)]),
        out,
        days,
    )
    return files


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _host_problem(host: str) -> str | None:
    """Why ``host`` is not a DNS name a certificate can hold (``None``: it is one)."""
    if not host.strip():
        return "an empty name"
    if "://" in host or "/" in host:
        return "a URL: give the host name alone"
    if ":" in host:
        return "a port or an IPv6 address in another form: give the host name alone"
    if len(host) > 253:
        return f"{len(host)} characters, a DNS name has at most 253"
    bad = [label for label in host.rstrip(".").split(".") if not _LABEL.match(label)]
    if bad:
        return (f"labels {bad}: each label is 1 to 63 letters, digits or hyphens, with no "
                "hyphen at either end")  # fmt: skip
    return None


def certificate_names(cert_file: str | Path) -> list[str]:
    """The host names and IP addresses a certificate is valid for (its SAN)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(a) for a in san.get_values_for_type(x509.IPAddress))]  # fmt: skip


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
    """The certificate files of ``directory``; raises when a needed one is missing or, with
    ``server``, when the SuperLink could not serve them: a certificate outside its validity
    dates, a key that is not the certificate's, a ``ca.crt`` that did not issue it. (Flower
    used to start with such files and fail at the first connection with an ssl traceback.)"""
    files = certificate_set(directory)
    needed = [files.ca_cert] + ([files.server_cert, files.server_key] if server else [])
    # a directory (or another non-file) of a needed name is named as such: it used to be
    # listed among the files "found" beside the same name "expected"
    not_files = [p for p in needed if p.exists() and not p.is_file()]
    if not_files:
        raise ConfigError(
            "federate certs",
            [
                f"{p}: expected a certificate or key file (made by `glioforecast federate "
                f"certs`), found {'a directory' if p.is_dir() else 'something that is not a file'}"
                for p in not_files
            ],
        )
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
    if server:
        _check_server_files(files)
    return files


def _load_cert(path: Path) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(
            "federate certs", [f"{path}: expected a PEM certificate, found unreadable data ({exc})"]
        ) from None


def _validity_problem(path: Path, cert: Any) -> str | None:
    now = datetime.datetime.now(datetime.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start or now > end:
        state = "expired" if now > end else "not yet valid"
        return (
            f"{path}: expected a certificate valid now ({now:%Y-%m-%d %H:%M} UTC), found one "
            f"valid from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC ({state}; make new "
            "certificates with `glioforecast federate certs --overwrite`)"
        )
    return None


def check_ca_certificate(path: str | Path) -> None:
    """A site's ``ca.crt``: readable, and valid now (or the SuperNode's TLS handshake fails)."""
    p = Path(path)
    if not p.is_file():
        found = f"a directory {p}" if p.is_dir() else f"no file {p}"
        raise ConfigError("federate certs", [f"--ca-cert: expected the federation's ca.crt, "
                                             f"found {found}"])  # fmt: skip
    why = _validity_problem(p, _load_cert(p))
    if why is not None:
        raise ConfigError("federate certs", [why])


def _check_server_files(files: CertificateSet) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca, server = _load_cert(files.ca_cert), _load_cert(files.server_cert)
    problems = [
        why for why in (_validity_problem(files.ca_cert, ca),
                        _validity_problem(files.server_cert, server)) if why
    ]  # fmt: skip
    try:
        server.verify_directly_issued_by(ca)
    except Exception as exc:  # InvalidSignature, or an issuer name that is not the CA's
        problems.append(
            f"{files.ca_cert}: expected the CA that issued {files.server_cert.name} (issuer "
            f"{server.issuer.rfc4514_string()}), found {ca.subject.rfc4514_string()}, which did "
            f"not sign it ({type(exc).__name__}); give the sites and the SuperLink the ca.crt "
            "made with this certificate"
        )
    try:
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        problems.append(
            f"{files.server_key}: expected an unencrypted PEM private key, found unreadable data "
            f"({exc})"
        )
    else:
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        mine = key.public_key().public_bytes(der, spki)
        if mine != server.public_key().public_bytes(der, spki):
            kind = "EC" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
            problems.append(
                f"{files.server_key}: expected the private key of {files.server_cert.name}, "
                f"found another {kind} key (the certificate and key come from different "
                "`federate certs` runs)"
            )
    if problems:
        raise ConfigError("federate certs", problems)
    log.info("SuperLink certificate valid for %s", ", ".join(certificate_names(files.server_cert)))


def _split_address(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT``) as (host, port); ``None`` when it is not that."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def check_superlink_certificate(address: str, ca_cert: str | Path, timeout: float = 10.0) -> None:
    """Raise when the SuperLink at ``address`` answers with a certificate that ``ca_cert`` does
    not verify for that host name (another federation's ca.crt, a host name the certificate
    does not hold, an expired certificate) or does not speak TLS (a SuperLink started with
    ``--insecure``). Flower's ``flwr`` commands say only "Connection to the SuperLink is
    unavailable" in each case. A SuperLink that cannot be reached is left to Flower to
    report."""
    import socket
    import ssl

    where = _split_address(address)
    if where is None:
        raise ConfigError("federate", [f"--superlink: expected HOST:PORT, found {address!r}"])
    host, port = where
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "federate certs",
            [f"--ca-cert: expected a PEM CA certificate, found {ca_cert} unreadable ({exc})"],
        ) from None
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return  # not reachable (or not yet): Flower's own message and retries apply
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or str(exc)
            failure = "verify"
        except (ssl.SSLError, OSError) as exc:
            reason, failure = str(exc), "tls"
    if failure == "tls":
        raise ConfigError(
            "federate certs",
            [
                f"--superlink {address}: expected a SuperLink serving TLS, found no TLS "
                f"handshake there ({reason}); is the SuperLink started with --insecure, or is "
                "another service on that port?"
            ],
        )
    raise ConfigError(
        "federate certs",
        [
            f"--ca-cert {ca_cert}: expected the CA certificate of the SuperLink at {address}, "
            f"found that it does not verify the certificate the SuperLink presents ({reason}; "
            f"{_presented(host, port, timeout)}); use the federation's ca.crt, made by "
            "`glioforecast federate certs` with the SuperLink's certificate, and a --superlink "
            "host name that certificate holds"
        ],
    )


def _presented(host: str, port: int, timeout: float) -> str:
    """What the certificate at ``host:port`` says of itself (read without verifying it)."""
    import socket
    import ssl

    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return "its certificate could not be read"
    if not der:
        return "it presented no certificate"
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName),
                 *(str(a) for a in san.get_values_for_type(x509.IPAddress))]  # fmt: skip
    except x509.ExtensionNotFound:
        names = []
    end = cert.not_valid_after_utc
    return (
        f"the SuperLink's certificate is issued by {cert.issuer.rfc4514_string()}, valid for "
        f"{', '.join(names) or 'no host name'} until {end:%Y-%m-%d %H:%M} UTC"
    )
