"""What a configuration reload (``systemctl reload glioforecast``, SIGHUP) may change.

The running node re-reads its configuration file on SIGHUP. Most of it applies at once, to the
next association, the next study, the next job and the next delivery: who may call, the
receiver's TLS certificate, key and CAs, the series roles, the destinations, retries, the
retrieve source, the model, retention, logging. What the node has opened or bound at start
cannot change while it runs: its AE title, address and port, whether it takes TLS, association
limits and timeouts, the data folder, the health endpoint, the audit trail, and whether the
receiver offers the Storage Commitment SOP class (some destination asks for storage commitment,
or none does). A reload whose file changes any of those applies nothing, so that the node
always runs one version of the file; it says which keys need ``systemctl restart``.

The files the receiver's TLS and a destination name (certificates, keys, a DICOMweb token or
password) are read again when their contents changed, even if the configuration file did not:
a renewed certificate or a rotated token needs a reload, not a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.settings import Settings

#: keys that apply to a running node; any other change takes a restart (a section added to
#: the settings later is restart-only until it is listed here)
LIVE_KEYS = (
    "node.refuse_unknown_callers",
    "node.max_connections",  # the next connection
    "node.max_connections_per_host",
    "node.allowed_callers",
    # the receiver's TLS files and client check (the next handshake); TLS on or off: a restart
    "node.tls.certificate",
    "node.tls.private_key",
    "node.tls.ca_certificates",
    "node.tls.require_client_certificate",
    # who may store by STOW-RS and its limits; its address, port and path: a restart
    "stow.clients",
    "stow.max_request_mb",
    "stow.max_requests",
    "retention",
    "assembly",
    "roles",
    "destinations",
    "sending",
    "outputs",
    "retrieve",
    "model",
    "worker",
    "logging",
)

#: the derived key that stands for "the receiver offers the Storage Commitment SOP class"
COMMITMENT_OFFERED = "destinations[].storage_commitment (the receiver's Storage Commitment context)"


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings objects (``source`` left
    out); a destination is named by its ``name`` (``destinations.pacs``)."""
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        keys = []
        for f in dataclasses.fields(old):
            if f.metadata.get("internal"):
                continue
            where = f"{prefix}.{f.name}" if prefix else f.name
            a, b = getattr(old, f.name), getattr(new, f.name)
            if f.name == "destinations":
                keys += _changed_destinations(a, b, where)
            elif dataclasses.is_dataclass(a) and not isinstance(a, type):
                keys += changed_keys(a, b, where)
            elif a != b:
                keys.append(where)
        return keys
    return [] if old == new else [prefix]


def _changed_destinations(old: tuple[Any, ...], new: tuple[Any, ...], where: str) -> list[str]:
    before = {d.name: d for d in old}
    after = {d.name: d for d in new}
    keys = [f"{where}.{name}" for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name)]  # fmt: skip
    if not keys and [d.name for d in old] != [d.name for d in new]:
        keys.append(where)  # the same entries in another order
    return keys


def _digest(*paths: Path | None) -> str:
    h = hashlib.sha256()
    for path in paths:
        if path is not None:
            try:
                h.update(Path(path).read_bytes())
            except OSError as exc:  # loading the files reports it
                h.update(f"unreadable: {exc}".encode())
        h.update(b"\0")
    return h.hexdigest()


def secret_files(settings: Settings) -> dict[str, str]:
    """A digest of the files each part names (their contents are not in the settings): the
    receiver's TLS files (``node.tls``), each destination's TLS and DICOMweb secret files
    (``destinations.NAME``) and the STOW-RS clients' tokens and passwords (``stow.clients``)."""
    t = settings.node.tls
    digests = {"node.tls": _digest(t.certificate, t.private_key, t.ca_certificates)}
    for d in settings.destinations:
        digests[f"destinations.{d.name}"] = _digest(
            d.tls.ca_certificates, d.tls.certificate, d.tls.private_key,
            d.dicomweb.token_file, d.dicomweb.password_file,
        )  # fmt: skip
    digests["stow.clients"] = _digest(
        *(f for c in settings.stow.clients for f in (c.token_file, c.password_file))
    )
    return digests


def files_key(key: str) -> str:
    """How a change of the files named at ``key`` (``node.tls``, ``destinations.NAME``) is
    listed among the changed keys."""
    return f"{key} (its files)"


@dataclass(frozen=True)
class ReloadPlan:
    """What a new version of the file changes: ``changed`` keys, of which ``restart`` cannot
    be applied to the running node."""

    changed: tuple[str, ...]
    restart: tuple[str, ...]


def _live(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in LIVE_KEYS)


def plan_reload(
    old: Settings,
    new: Settings,
    old_files: Mapping[str, str] | None = None,
    new_files: Mapping[str, str] | None = None,
) -> ReloadPlan:
    """What applying ``new`` over ``old`` changes; ``old_files`` and ``new_files`` are the
    :func:`secret_files` of each (a part whose files changed is a change, ``KEY (its
    files)``)."""
    changed = changed_keys(old, new)
    restart = [k for k in changed if not _live(k)]
    for key, digest in (new_files or {}).items():  # files are read again by any reload
        named = any(k == key or k.startswith(key + ".") for k in changed)
        if not named and (old_files or {}).get(key, digest) != digest:
            changed.append(files_key(key))
    if any(d.storage_commitment for d in old.destinations) != any(
        d.storage_commitment for d in new.destinations
    ):
        changed.append(COMMITMENT_OFFERED)
        restart.append(COMMITMENT_OFFERED)
    return ReloadPlan(tuple(changed), tuple(restart))
