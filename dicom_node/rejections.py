"""Rejection notes the node receives (IHE Imaging Object Change Management).

A modality or PACS that implements IOCM takes back instances it sent with a Key Object Selection
Document whose title is a rejection reason (CID 7011), listing the instances: a series sent
under the wrong patient ("Incorrect Modality Worklist Entry"), images unfit for use ("Rejected
for Quality Reasons", "Rejected for Patient Safety Reasons"). A prediction made from them must
not stand. The receiver records the rejected instances (:meth:`JobStore.record_rejection`): no
job uses them from then on, including those that arrive after the note, and each study that
held or used one is run again; its new results replace the earlier ones at the destinations
(:mod:`dicom_node.outbox`, "Replacing earlier results").

"Data Retention Policy Expired" (113039) is not acted on: a PACS that deletes a study by its
retention policy says nothing about the images' fitness, and the node's results stand. The
node's own rejection notes (labelled series, :mod:`sr_writer.rejection`) routed back list its
results, not its inputs, and are not acted on either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_node.audit import AuditTrail, NoAuditTrail, StudyRecord
from dicom_node.errors import InputError
from dicom_node.jobs import JobStore
from sr_writer.labels import is_labelled_description

log = logging.getLogger(__name__)

#: CID 7011 titles the node acts on: code value (scheme DCM) -> meaning
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
}
RETENTION_EXPIRED = "113039"  # Data Retention Policy Expired: not acted on


@dataclass(frozen=True)
class RejectionNote:
    """An IOCM rejection note: its SOP Instance UID, its title and the instances it rejects."""

    note_uid: str
    reason: str
    sop_instance_uids: tuple[str, ...]
    sop_classes: dict[str, int]  # the rejected instances by SOP class (for the audit trail)


def rejection_note(ds: Dataset) -> RejectionNote | None:
    """The rejection ``ds`` makes, or None when it is no rejection note the node acts on (any
    other Key Object Selection, such as a radiologist's key images, or a retention expiry).
    Raises :class:`InputError` for a rejection note that lists no instance."""
    if str(ds.get("SOPClassUID", "")) != KeyObjectSelectionDocumentStorage:
        return None
    titles = ds.get("ConceptNameCodeSequence") or []
    if not titles:
        return None
    title = titles[0]
    code, scheme = str(title.get("CodeValue", "")), str(title.get("CodingSchemeDesignator", ""))
    if scheme != "DCM" or code not in REJECTION_TITLES:
        return None
    listed = {
        str(item.ReferencedSOPInstanceUID): str(item.get("ReferencedSOPClassUID", "") or "")
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []
        for series in study.get("ReferencedSeriesSequence") or []
        for item in series.get("ReferencedSOPSequence") or []
        if item.get("ReferencedSOPInstanceUID")
    }
    uids = tuple(listed)
    if not uids:
        raise InputError(
            f"rejection note {ds.SOPInstanceUID} ({REJECTION_TITLES[code]}) lists no instance: "
            "expected Referenced SOP Instance UIDs in its Current Requested Procedure Evidence "
            "Sequence, found none"
        )
    classes: dict[str, int] = {}
    for sop_class in listed.values():
        classes[sop_class] = classes.get(sop_class, 0) + 1
    return RejectionNote(str(ds.SOPInstanceUID), REJECTION_TITLES[code], uids, classes)


def apply_rejection(
    store: JobStore,
    ds: Dataset,
    series_description: str,
    source: str,
    *,
    host: str = "",
    audit: AuditTrail | NoAuditTrail | None = None,
) -> None:
    """A Key Object Selection stored (by the receiver, or found in the spool by ``reconcile``):
    when it is a rejection note the node acts on, record it in ``store`` and in the ``audit``
    trail (``source``: the sender's AE title, at ``host``). Never raises: the note is stored
    whatever happens, and the log says why it was not applied."""
    if is_labelled_description(series_description):
        return  # the node's own note, routed back: it rejects results, not inputs
    try:
        note = rejection_note(ds)
        if note is None:
            return
        studies = store.record_rejection(
            note.note_uid, note.reason, note.sop_instance_uids, time.time()
        )
    except InputError as exc:
        log.warning("rejection note from %s not applied: %s", source, exc)
        return
    except Exception:  # the note stays in the spool for a look
        log.exception("rejection note %s from %s not applied", ds.get("SOPInstanceUID"), source)
        return
    what = (
        f"rejection note {note.note_uid} ({note.reason}): {len(note.sop_instance_uids)} "
        f"instance(s) no longer used; {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} "
        "run again"
    )
    log.warning("%s, from %s", what, source)
    if audit is not None and audit.enabled:
        study = StudyRecord.from_dataset(ds)
        for sop_class, count in note.sop_classes.items():
            study.add(sop_class, count)
        audit.rejected(source, host, study, what)
