"""The rejection note: how the node takes back results that a newer version of a study replaced.

A late instance reopens a study (a structure set contoured after the images were sent, a dose
planned days later, a series resent, a series taken back by a rejection note): the node runs
the study again and sends new results with new UIDs, or none when the new run fails. The
earlier results stay in the PACS, beside the new ones, unless the PACS is told they no longer
apply. IHE's Imaging Object Change Management profile (IOCM) tells it with a Key Object
Selection Document whose title is a rejection reason (CID 7011): a PACS that implements the
profile hides the instances it lists (dcm4chee-arc, for one, does so for "Rejected for Quality
Reasons"); one that does not keeps the note as one more object of the study.

The note is built for one destination: it lists the earlier results that destination
acknowledged, all in the study. Its UIDs come from the study, the job whose results (or
failure) replace the others and the instances listed: built again, it is the same object.
Results are also taken back with nothing in their place, for a reason the note's description
gives (a newer version of the study failed; an administrator took them back).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy

from .labels import (
    CONTENT_QUALIFICATION,
    DEFAULT_MANUFACTURER,
    finish_output,
    for_highdicom,
    name_uid,
    node_contribution,
    series_description,
    set_patient_study,
)

#: CID 7011 "Rejected for Quality Reasons": what an IOCM PACS hides from regular use
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")
REJECTION_SERIES_NUMBER = 9020
REJECTION_DESCRIPTION = series_description("REJECTION NOTE")

# image storage SOP classes among the node's outputs: listed as IMAGE content items, the
# others (SR, RT Structure Set) as COMPOSITE
_IMAGE_CLASSES = {SecondaryCaptureImageStorage, SegmentationStorage, MRImageStorage}


@dataclass(frozen=True)
class Rejected:
    """One instance a PACS holds and should no longer show."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def build_rejection_note(
    patient: PatientStudy,
    rejected: Sequence[Rejected],
    *,
    job: str,
    node_ae_title: str,
    node_version: str,
    reason: str = "",
    when: datetime.datetime | None = None,
) -> Dataset:
    """The Key Object Selection Document that rejects ``rejected`` (earlier results in
    ``patient``'s study) because the results of node job ``job`` replace them, or, with a
    ``reason``, because of it (that job failed on the study as it is now; an administrator took
    them back), nothing in their place."""
    if not rejected:
        raise ExportError("a rejection note lists the instances it rejects, found none")
    kos = KeyObjectSelectionDocumentStorage
    notes = [r.sop_instance_uid for r in rejected if r.sop_class_uid == kos]
    if notes:
        raise ExportError(
            f"a rejection note rejects results, not another note; found note {notes[0]}"
        )
    ts = when or datetime.datetime.now().replace(microsecond=0)
    uids = sorted(r.sop_instance_uid for r in rejected)
    evidence = []
    for r in sorted(rejected, key=lambda r: r.sop_instance_uid):
        ds = Dataset()
        ds.StudyInstanceUID = patient.study_instance_uid
        ds.SeriesInstanceUID = r.series_instance_uid
        ds.SOPClassUID = r.sop_class_uid
        ds.SOPInstanceUID = r.sop_instance_uid
        if r.sop_class_uid in _IMAGE_CLASSES:
            ds.Rows = ds.Columns = 1  # what makes highdicom list it as an IMAGE item
        evidence.append(ds)
    # highdicom copies patient and study from it
    set_patient_study(evidence[0], for_highdicom(patient))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=name_uid("glioforecast-node-device", node_ae_title),
            name=f"glioforecast {node_ae_title}"[:64],
            manufacturer_name=DEFAULT_MANUFACTURER,
            model_name="glioforecast node",
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=evidence,
        observer_device_context=device,
        description=(
            f"{reason} (glioforecast node {node_ae_title}, job {job}): these results no longer "
            "apply. "
            if reason
            else f"Replaced by the results of job {job} of the glioforecast node "
            f"{node_ae_title}, made after the study changed (a late series or structure set, or "
            "a series taken back): these earlier results no longer apply. "
        )
        + "Synthetic prediction, research use only.",
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=name_uid(
            "glioforecast-rejection-v1", patient.study_instance_uid, job, "series"
        ),
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=name_uid(
            "glioforecast-rejection-v1", patient.study_instance_uid, job, *uids
        ),
        instance_number=1,
        manufacturer=DEFAULT_MANUFACTURER,
        contributing_equipment=[
            node_contribution(node_version, ts, "rejection of results that no longer apply")
        ],
        series_description=REJECTION_DESCRIPTION,
        content_date=ts.date(),
        content_time=ts.time(),
    )
    finish_output(note, patient, ts)
    note.ContentQualification = CONTENT_QUALIFICATION
    return note


def rejected_uids(note: Dataset) -> set[str]:
    """The SOP Instance UIDs a rejection note lists (its evidence)."""
    return {
        item.ReferencedSOPInstanceUID
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
