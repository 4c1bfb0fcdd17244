"""Binding a SuperNode's key to the site name it reports.

SuperNode authentication (``--supernode-auth``) lets only registered keys join, but a site's
name comes from its own node config: a registered SuperNode could report another hospital's
name, and its weights and metrics would be booked to that hospital. With ``site-keys`` in the
run config the coordinator checks each name: its ``query`` carries a fresh random challenge,
the site signs ``(site name, node id, challenge)`` with the private key of its node config's
``site-key`` (``glioforecast federate supernode --auth-key`` sets it to the SuperNode's own
authentication key), and the coordinator verifies the signature with ``<site-keys>/<site>.pub``.
A node whose proof is missing or does not verify is left out of the run, with the reason logged.

The signature covers the node id, so a proof is good for one node, and the challenge, so it is
good for one query. Keys are EC (what ``federate node-key`` makes and Flower reads), ECDSA with
SHA-384.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from dicom_node.errors import ConfigError

PROOF_CONTEXT = b"glioforecast federated site proof v1"
_HEX = re.compile(r"[0-9a-f]+")


def new_challenge() -> str:
    return secrets.token_hex(32)


def proof_message(site: str, node_id: int, challenge: str) -> bytes:
    return b"\n".join(
        [PROOF_CONTEXT, site.encode(), str(int(node_id)).encode(), challenge.encode()]
    )


def _private_key(path: Path) -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = path.read_bytes()
    try:
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if data.lstrip().startswith(b"-----BEGIN OPENSSH")
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            "federated node config",
            [f"site-key: expected an unencrypted OpenSSH or PEM private key, found {path} ({exc})"],
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            "federated node config",
            [
                "site-key: expected an EC private key (federate node-key), found "
                f"{type(key).__name__}"
            ],
        )
    return key


def sign_site(key_path: str | Path, site: str, node_id: int, challenge: str) -> str:
    """The site's proof (hex) for ``challenge``, signed with the private key at ``key_path``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(key_path)
    if not path.is_file():
        raise ConfigError(
            "federated node config",
            [f"site-key: expected the site's private key file, found no {path}"],
        )
    key = _private_key(path)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(proof_message(site, node_id, challenge), ec.ECDSA(hashes.SHA384())).hex()


def public_key_path(keys_dir: str | Path, site: str) -> Path:
    return Path(keys_dir) / f"{site}.pub"


def check_keys_dir(keys_dir: str | Path) -> list[str]:
    """The site names with a public key in ``keys_dir``; raises when there is none."""
    d = Path(keys_dir)
    names = sorted(p.name[: -len(".pub")] for p in d.glob("*.pub")) if d.is_dir() else []
    if not names:
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else "no such folder"
        raise ConfigError(
            "federated run config",
            [
                f"site-keys: expected a folder of <site name>.pub public keys (the sites' "
                f"`federate node-key` files), found {found or 'an empty folder'} at {d}"
            ],
        )
    return names


def verify_site(
    keys_dir: str | Path, site: str, node_id: int, challenge: str, proof: object
) -> str | None:
    """``None`` when ``proof`` is ``site``'s signature of ``challenge`` for ``node_id``;
    otherwise why not (what was expected and what was found)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if "/" in site or site.startswith(".") or not site:
        return f"expected a site name usable as a key file name, found {site!r}"
    path = public_key_path(keys_dir, site)
    if not path.is_file():
        return f"expected a public key {path} for site {site}, found none"
    if not isinstance(proof, str) or not proof:
        return (
            f"expected a signature of the challenge with {site}'s key (node config site-key), "
            "found none"
        )
    if len(proof) % 2 or not _HEX.fullmatch(proof):
        return f"expected a hexadecimal signature, found {proof[:40]!r}"
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        return f"expected an OpenSSH public key in {path}, found an unreadable file ({exc})"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return f"expected an EC public key in {path}, found {type(key).__name__}"
    try:
        key.verify(
            bytes.fromhex(proof),
            proof_message(site, node_id, challenge),
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        return f"expected a signature made with the private key of {path}, found another"
    return None
