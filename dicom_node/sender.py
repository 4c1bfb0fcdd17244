"""C-ECHO and C-STORE of files to a peer (the ``echo`` and ``send`` commands)."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    KeyObjectSelectionDocumentStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import Association
from pynetdicom.presentation import build_context

from dicom_node.commitment import PUSH_MODEL
from dicom_node.errors import InputError, SendError
from dicom_node.retrieve import FIND, GET, MOVE
from dicom_node.scu import VERIFICATION, Destination, associate, store_batch
from dicom_node.scu import release as release_association

log = logging.getLogger(__name__)


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


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str = "",
) -> int:
    """C-ECHO a peer (over TLS with ``tls``, a client context, the peer's certificate checked
    for ``server_name``, default the host); returns the status (0 = success) or raises
    :class:`SendError`."""
    peer = Destination(called_ae, called_ae, host, port, tls=tls, server_name=server_name)
    assoc = associate(
        peer,
        [build_context(VERIFICATION)],
        calling_ae=calling_ae,
        acse_timeout_s=60,
        dimse_timeout_s=60,
        network_timeout_s=60,
    )
    code = _c_echo(assoc)
    if code is None:
        raise SendError(f"{peer}: no C-ECHO response")
    return code


def _c_echo(assoc: Association, release: bool = True) -> int | None:
    """The status of one C-ECHO on ``assoc`` (None: no response), the association released
    unless ``release`` is false."""
    try:
        status = assoc.send_c_echo()
    finally:
        if release:
            release_association(assoc)
    return int(status.Status) if "Status" in status else None


def _probe_find(assoc: Association, calling_ae: str) -> tuple[bool, str]:
    """A Study Root C-FIND that matches nothing (a study UID made now), so that a PACS that
    negotiates queries but does not answer ours (Orthanc aborts the association when it does
    not know our AE title as a modality) is found before a study needs it. Whether it was
    answered, and what was found."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = generate_uid()
    final: Dataset | None = None
    started = time.monotonic()
    for status, _ in assoc.send_c_find(query, FIND):
        if status and "Status" in status and int(status.Status) not in (0xFF00, 0xFF01):
            final = status
    took = time.monotonic() - started
    if final is None:
        timeout = assoc.dimse_timeout
        if timeout is None or took < 0.9 * timeout:  # not our wait running out: the PACS's
            return False, (
                "Study Root C-FIND not answered: expected a response to a query matching "
                f"nothing, found the association aborted by the PACS after {took:.1f} s (it "
                f"may not allow queries from AE {calling_ae}: check that it knows the node's AE "
                "title, address and port)"
            )
        return False, (
            f"Study Root C-FIND not answered: expected a response within {timeout:g} s, found none"
        )
    code = int(final.Status)
    if code != 0x0000:
        return False, f"Study Root C-FIND answered with status 0x{code:04X}, expected 0x0000"
    return True, "Study Root C-FIND answered (a query matching nothing)"


#: the SOP class of each kind of result a destination may take (``objects``; the derived MR is
#: not sent by the node)
RESULT_CLASSES = {
    "sc": (SecondaryCaptureImageStorage, "Secondary Capture Image Storage"),
    "uncertainty_sc": (SecondaryCaptureImageStorage, "Secondary Capture Image Storage"),
    "seg": (SegmentationStorage, "Segmentation Storage"),
    "rtstruct": (RTStructureSetStorage, "RT Structure Set Storage"),
    "rtstruct_planning": (RTStructureSetStorage, "RT Structure Set Storage"),
    "sr": (Comprehensive3DSRStorage, "Comprehensive 3D SR Storage"),
}


def result_classes(objects: Sequence[str], failure_notice: bool) -> dict[str, str]:
    """The SOP classes (UID: name) of what a destination with these ``objects`` (empty: all
    of them) and ``failure_notice`` setting is sent."""
    kinds = objects or tuple(RESULT_CLASSES)
    out: dict[str, str] = dict(RESULT_CLASSES[k] for k in kinds if k in RESULT_CLASSES)
    if failure_notice and {"sc", "sr"} & set(kinds):  # the notice's SC and its text as an SR
        out[SecondaryCaptureImageStorage] = "Secondary Capture Image Storage"
        out[ComprehensiveSRStorage] = "Comprehensive SR Storage (failure notices)"
    return out


def check_destination(
    destination: Destination,
    calling_ae: str,
    *,
    retrieve: str = "",
    results: dict[str, str] | None = None,
) -> tuple[bool, str]:
    """Whether ``destination`` can take the node's results as configured, and what was found:
    an association with its settings (TLS included), a C-ECHO, the storage context of each
    SOP class of ``results`` (:func:`result_classes`) accepted, for a destination with
    storage commitment the Storage Commitment Push Model context accepted, for one with
    ``reject_replaced`` the Key Object Selection Document Storage context (its rejection
    notes), and for the ``retrieve.source`` the Study Root C-FIND context and that of
    ``retrieve`` (its ``retrieve.method``: move or get), with a C-FIND that matches nothing
    (:func:`_probe_find`). Nothing is stored, committed or moved."""
    results = results or {}
    contexts = [build_context(VERIFICATION), *(build_context(uid) for uid in results)]
    if destination.storage_commitment:
        contexts.append(build_context(PUSH_MODEL))
    if destination.reject_replaced:
        contexts.append(build_context(KeyObjectSelectionDocumentStorage))
    retrieval, model = {"move": ("C-MOVE", MOVE), "get": ("C-GET", GET)}.get(retrieve, ("", ""))
    if retrieval:
        contexts += [build_context(FIND), build_context(model)]
    try:
        assoc = associate(destination, contexts, calling_ae=calling_ae)
    except SendError as exc:
        return False, str(exc)
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    found: list[str] = []
    ok = True
    if VERIFICATION in accepted:
        try:
            code = _c_echo(assoc, release=False)
        except BaseException:
            assoc.abort()
            raise
        ok = code == 0
        found.append(
            "C-ECHO success"
            if ok
            else f"C-ECHO {'no response' if code is None else f'status 0x{code:04X}'}"
        )
    else:
        found.append("no Verification context (C-ECHO not offered by the peer)")
    answered: tuple[bool, str] | None = None
    try:
        if retrieval and FIND in accepted and assoc.is_established:
            answered = _probe_find(assoc, calling_ae)
    finally:
        release_association(assoc)
    wanted = [
        (destination.storage_commitment, PUSH_MODEL, "Storage Commitment Push Model", "",
         "storage_commitment: true expects it"),
        (destination.reject_replaced, KeyObjectSelectionDocumentStorage,
         "Key Object Selection Document Storage", " (rejection notes)",
         "reject_replaced: true sends its rejection notes as such documents"),
        (bool(retrieval), FIND, "Study Root C-FIND", "", "retrieve.source queries it"),
        (bool(retrieval), model, f"Study Root {retrieval}", "",
         "retrieve.source has it send the RT objects a study lacks"),
    ]  # fmt: skip
    for configured, sop_class, name, what, why in wanted:
        if not configured:
            continue
        if sop_class in accepted:
            found.append(f"{name} accepted{what}")
        else:
            ok = False
            found.append(f"{name} not accepted ({why})")
        if sop_class == FIND and answered is not None:
            ok = ok and answered[0]
            found.append(answered[1])
    refused = sorted({name for uid, name in results.items() if uid not in accepted})
    if refused:  # its results of those classes would go dead at the first attempt
        ok = False
        found.append(f"results refused: {', '.join(refused)} not accepted (set its objects)")
    elif results:
        found.append(f"the {len(results)} result SOP classes accepted")
    return ok, "; ".join(found)


def not_part10(exc: BaseException) -> str:
    """Why a file was skipped, in words (without pydicom's hint to developers)."""
    said = str(exc).replace(" Use force=True to force reading.", "").strip()
    return f"not a DICOM Part 10 file ({said})"


def nothing_sent(given: Sequence[str], found: int) -> str:
    """Why a send that sent nothing and failed nothing is a failure all the same."""
    return (f"nothing sent: expected DICOM Part 10 files in {', '.join(map(str, given))}, found "
            f"{'no file' if not found else f'{found} file(s), none of them one'}")  # fmt: skip


def send_files(
    files: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    progress: Callable[[int], None] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str = "",
) -> SendReport:
    """C-STORE ``files`` over one association (over TLS with ``tls``, as :func:`echo`); files
    are read one at a time as they go."""
    report = SendReport()
    headers: list[Dataset] = []
    for path in files:
        try:
            headers.append(dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped.append((path, not_part10(exc)))
            if progress is not None:
                progress(1)
    if not headers:
        return report
    peer = Destination(called_ae, called_ae, host, port, tls=tls, server_name=server_name)
    results = store_batch(
        headers,
        peer,
        calling_ae=calling_ae,
        load=lambda header: dcmread(header.filename),
        progress=progress,
    )
    for header, result in zip(headers, results, strict=True):
        if result.delivered:
            report.sent += 1
        else:
            report.failed.append((Path(header.filename), result.error or "not delivered"))
    return report
