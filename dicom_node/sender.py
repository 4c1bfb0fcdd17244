"""C-ECHO and C-STORE of files to a peer (the ``echo`` and ``send`` commands)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.errors import InputError, SendError
from dicom_node.scu import hold_reactor

log = logging.getLogger(__name__)

_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_MAX_CONTEXTS = 128


def collect_files(paths: Sequence[Path]) -> list[Path]:
    """Every regular file under ``paths`` (folders are walked recursively), sorted."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"expected a DICOM file or folder, found nothing at {p}")
    return files


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class: str
    transfer_syntax: str


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _scan(files: Sequence[Path], report: SendReport) -> list[_Item]:
    items = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            items.append(_Item(path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped.append((path, f"not a DICOM Part 10 file ({exc})"))
    return items


def _make_ae(calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def echo(host: str, port: int, called_ae: str, calling_ae: str) -> int:
    """C-ECHO a peer; returns the status (0 = success) or raises :class:`SendError`."""
    ae = _make_ae(calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise SendError(
            f"{called_ae} at {host}:{port}: association not established "
            f"({'rejected' if assoc.is_rejected else 'no answer or aborted'})"
        )
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise SendError(f"{called_ae} at {host}:{port}: no C-ECHO response")
    return int(status.Status)


def send_files(
    files: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    progress: Callable[[int], None] | None = None,
) -> SendReport:
    """C-STORE ``files`` over as few associations as their presentation contexts allow."""
    report = SendReport()
    items = _scan(files, report)
    # group by the contexts they need, at most 128 contexts per association
    batches: list[tuple[set[tuple[str, str]], list[_Item]]] = []
    for item in items:
        needed = {(item.sop_class, item.transfer_syntax)}
        if item.transfer_syntax in _UNCOMPRESSED:
            needed = {(item.sop_class, ts) for ts in _UNCOMPRESSED}
        for contexts, members in batches:
            if len(contexts | needed) <= _MAX_CONTEXTS:
                contexts |= needed
                members.append(item)
                break
        else:
            batches.append((set(needed), [item]))
    for contexts, members in batches:
        ae = _make_ae(calling_ae)
        for sop_class, ts in sorted(contexts):
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "no answer or aborted"
            raise SendError(f"{called_ae} at {host}:{port}: association not established ({reason})")
        try:
            for item in members:
                try:
                    ds = dcmread(item.path)
                    hold_reactor(assoc)
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError, OSError) as exc:
                    report.failed.append((item.path, str(exc)))
                else:
                    code = int(status.Status) if "Status" in status else -1
                    if code in (0x0000, 0xB000, 0xB007, 0xB006):
                        report.sent += 1
                    else:
                        comment = str(status.get("ErrorComment", ""))
                        report.failed.append(
                            (item.path, f"status 0x{code & 0xFFFF:04X} {comment}".strip())
                        )
                if progress is not None:
                    progress(1)
                if not assoc.is_established:
                    raise SendError(f"{called_ae} at {host}:{port}: association lost")
        finally:
            if assoc.is_established:
                assoc.release()
    return report
