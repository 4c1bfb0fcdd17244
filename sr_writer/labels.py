"""Labelling shared by every output object, and the deterministic UIDs of a job's outputs.

Every object the node sends back says that it is a synthetic prediction for research use only:

- ``SeriesDescription`` starts with ``SYNTHETIC PREDICTION`` and says ``RESEARCH USE ONLY``
  (and, for the results of a study's job version 2 and up, ends in `` v<version>``);
- ``ContentQualification`` is ``RESEARCH``;
- ``ContributingEquipmentSequence`` names the node (manufacturer, software version) and the model
  (name and version) that produced the content.

UIDs are derived from the job (source study and patient, the input instance UIDs and the model
identity), so that building the outputs of the same job twice (a retry, a restart) gives the
same series and instance UIDs and PACS receives the same objects again instead of duplicates. A
different model version, a different set of inputs (a late instance reopened the study), or a
corrected patient gives new UIDs.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import pydicom.datadict
import pydicom.multival
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy

SERIES_PREFIX = "SYNTHETIC PREDICTION"
RESEARCH_NOTE = "RESEARCH USE ONLY"
BANNER_TEXT = f"{SERIES_PREFIX} - {RESEARCH_NOTE}"
CONTENT_QUALIFICATION = "RESEARCH"
DEFAULT_MANUFACTURER = "glioforecast"

# DICOM LO (Long String) holds at most 64 characters.
_LO_MAX = 64
#: the most characters a value of each text VR holds (PS3.5 6.2), for :func:`fit`
_VR_MAX = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UT": 2**32 - 2}
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Namespace of the name-based (version 5) UUIDs behind the output UIDs. Fixed forever: changing it
# would change every output UID and make PACS store re-sent results as new objects.
_UID_NAMESPACE = uuid.UUID("6f2b8c1e-4a57-5d0b-9c3e-2f6a1b7d8e90")

# CID 7005 "Contributing Equipment Purposes of Reference".
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

# Series numbers of the outputs, high enough to sort after the acquired series in a viewer.
SERIES_NUMBERS: dict[str, int] = {
    "sc": 9001,
    "sc-uncertainty": 9002,
    "sr": 9003,
    "seg": 9004,
    "rtstruct": 9005,
    "derived-mr": 9006,
    "rtstruct-planning": 9007,
}

OUTPUT_KINDS: tuple[str, ...] = tuple(SERIES_NUMBERS)


def series_description(what: str, study_version: int = 1) -> str:
    """``SYNTHETIC PREDICTION - RESEARCH USE ONLY - <what>``, checked against the LO limit.

    ``study_version`` is the job version of the study whose results the series holds (1, then 2,
    3... each time a late instance reopens the study). From version 2 on the description ends in
    `` v<version>``: a PACS that ignores the rejection note of the earlier results shows both,
    with the same series numbers and otherwise the same descriptions, and the suffix says which
    is newer. Version 1 has no suffix, as before versions were shown.
    """
    if study_version < 1:
        raise ExportError(f"expected a study version of 1 or more, found {study_version}")
    text = f"{BANNER_TEXT} - {what}" if what else BANNER_TEXT
    if study_version > 1:
        text += f" v{study_version}"
    if len(text) > _LO_MAX:
        raise ExportError(
            f"series description must be at most {_LO_MAX} characters, found {len(text)}: "
            f"{text!r} (shorten {what!r})"
        )
    return text


def is_labelled_description(text: str) -> bool:
    """Whether a SeriesDescription follows the labelling rule."""
    return text.startswith(SERIES_PREFIX) and RESEARCH_NOTE in text


def check_uid(uid: str) -> str:
    """Return ``uid`` when it is a valid DICOM UID (<= 64 characters, digits and dots)."""
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise ExportError(
            f"expected a DICOM UID (<= 64 characters, digits and dots), found {uid!r}"
        )
    return uid


def name_uid(*parts: str | int) -> str:
    """A UID derived from ``parts``: ``2.25.<name-based UUID as an integer>``.

    The ``2.25`` root is the standard's arc for UUID-derived UIDs (PS3.5 B.2); a version 5
    UUID is derived from a name, here ``parts`` joined with ``/``: the same parts, the same UID.
    """
    name = "/".join(str(p) for p in parts)
    return check_uid(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


#: transfer syntaxes whose pixels lost information: JPEG Baseline and Extended, JPEG-LS
#: near-lossless, the video syntaxes (MPEG-2, MPEG-4, HEVC)
LOSSY_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81"}
    | {f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)}
)
#: JPEG 2000 and HTJ2K (any): lossy unless the instance says it is not (LossyImageCompression 00)
MAYBE_LOSSY_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"})
#: the Lossy Image Compression Method (0028,2114) of each lossy syntax, for an instance that
#: does not name it
_SYNTAX_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


@dataclass(frozen=True)
class LossyHistory:
    """That images derived from the sources carry a lossy compression (PS3.3 C.7.6.1.1.5:
    once LossyImageCompression is 01 it is never reset): the compression steps, method and
    ratio, when the lossy sources agree on them (empty when they do not, or do not say)."""

    methods: tuple[str, ...] = ()
    ratios: tuple[str, ...] = ()


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return tuple(str(v).strip() for v in items)


def lossy_history(sources: Iterable[Dataset]) -> LossyHistory | None:
    """The lossy compression the source images went through (None when none did): an image
    that says so (LossyImageCompression 01), or one received in a lossy transfer syntax."""
    steps: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    for ds in sources:
        flag = str(ds.get("LossyImageCompression", "") or "").strip()
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        by_syntax = syntax in LOSSY_SYNTAXES or (syntax in MAYBE_LOSSY_SYNTAXES and flag != "00")
        if flag != "01" and not by_syntax:
            continue
        methods = _values(ds, "LossyImageCompressionMethod")
        if not methods and syntax in _SYNTAX_METHOD:
            methods = (_SYNTAX_METHOD[syntax],)
        steps.add((methods, _values(ds, "LossyImageCompressionRatio")))
    if not steps:
        return None
    if len(steps) == 1:
        methods, ratios = next(iter(steps))
        return LossyHistory(methods, ratios)
    return LossyHistory()


def mark_lossy(ds: Dataset, history: LossyHistory | None) -> None:
    """Say on the image ``ds`` (derived from the sources) whether they were lossy compressed."""
    if history is None:
        ds.LossyImageCompression = "00"
        return
    ds.LossyImageCompression = "01"
    for keyword, values in (
        ("LossyImageCompressionMethod", history.methods),
        ("LossyImageCompressionRatio", history.ratios),
    ):
        if values:
            setattr(ds, keyword, list(values) if len(values) > 1 else values[0])
        elif keyword in ds:
            delattr(ds, keyword)


@dataclass(frozen=True)
class JobIdentity:
    """What identifies the outputs of one job: patient, inputs and model, nothing else.

    ``input_instance_uids`` are the SOP Instance UIDs of every input instance the prediction used
    (T1-Gd, other contrasts, RTSTRUCT, RTDOSE); their order does not matter. ``patient_id`` and
    ``issuer_of_patient_id`` are the patient's as the inputs name it: a study sent again under a
    corrected patient (same instance UIDs) gets new results, which a PACS files under that
    patient (with the same UIDs the outbox took them for those already delivered, and sent
    nothing).
    """

    study_instance_uid: str
    input_instance_uids: tuple[str, ...]
    model_name: str
    model_version: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""

    def __post_init__(self) -> None:
        check_uid(self.study_instance_uid)
        if not self.input_instance_uids:
            raise ExportError("a job needs at least one input instance UID, found none")
        for u in self.input_instance_uids:
            check_uid(u)
        if not self.model_name or not self.model_version:
            raise ExportError(
                f"model name and version must be non-empty, found name={self.model_name!r} "
                f"version={self.model_version!r}"
            )

    @property
    def key(self) -> str:
        """A hex digest of the job identity (safe to log: it carries no patient data)."""
        h = hashlib.sha256()
        for part in (
            "glioforecast-job-v2",
            self.study_instance_uid,
            *sorted(set(self.input_instance_uids)),
            self.model_name,
            self.model_version,
            self.patient_id,
            self.issuer_of_patient_id,
        ):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def uid(self, *parts: str | int) -> str:
        """A UID for ``parts`` within this job (:func:`name_uid` of the job key and ``parts``)."""
        return name_uid(self.key, *parts)

    def series_uid(self, kind: str) -> str:
        _check_kind(kind)
        return self.uid("series", kind)

    def instance_uid(self, kind: str, index: int = 0) -> str:
        _check_kind(kind)
        return self.uid("instance", kind, index)


def _check_kind(kind: str) -> None:
    if kind not in SERIES_NUMBERS:
        raise ExportError(f"unknown output kind {kind!r}; expected one of {sorted(SERIES_NUMBERS)}")


@dataclass(frozen=True)
class Equipment:
    """The node that builds the outputs, and the model whose prediction they carry."""

    model_name: str
    model_version: str
    node_version: str
    manufacturer: str = DEFAULT_MANUFACTURER
    institution_name: str | None = None
    station_name: str | None = None
    device_serial_number: str = "0"

    @property
    def software_versions(self) -> tuple[str, str]:
        return (f"glioforecast {self.node_version}", f"{self.model_name} {self.model_version}")

    @property
    def model_label(self) -> str:
        return f"{self.model_name} {self.model_version}"

    def contributing_equipment(
        self, when: datetime.datetime | None = None
    ) -> hd.ContributingEquipment:
        """One ``ContributingEquipmentSequence`` item naming node, model and version, each
        value fitted to its attribute's VR (:func:`fit`)."""
        return hd.ContributingEquipment(
            manufacturer=fit("Manufacturer", self.manufacturer),
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=fit("ManufacturerModelName", self.model_name),
            software_versions=[fit("SoftwareVersions", v) for v in self.software_versions],
            institution_name=_fit_optional("InstitutionName", self.institution_name),
            station_name=_fit_optional("StationName", self.station_name),
            contribution_datetime=(when or now()).strftime("%Y%m%d%H%M%S"),
            contribution_description=fit(
                "ContributionDescription",
                f"synthetic prediction by {self.model_label}, research use only",
            ),
        )


def node_contribution(
    node_version: str, when: datetime.datetime, description: str
) -> hd.ContributingEquipment:
    """The node alone as contributing equipment: what it sends that no model made (a failure
    notice, a rejection note)."""
    return hd.ContributingEquipment(
        manufacturer=DEFAULT_MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name="glioforecast node",
        software_versions=[fit("SoftwareVersions", f"glioforecast {node_version}")],
        contribution_datetime=when.strftime("%Y%m%d%H%M%S"),
        contribution_description=fit("ContributionDescription", description),
    )


def fit(keyword: str, text: str) -> str:
    """``text`` within the length limit of the VR of the attribute ``keyword`` (from pydicom's
    data dictionary: 64 characters for an LO such as ManufacturerModelName, 16 for the SH
    StationName, 1024 for the ST ContributionDescription), cut with a final ``~`` when longer."""
    limit = _VR_MAX.get(pydicom.datadict.dictionary_VR(keyword))
    if limit is None:
        raise ExportError(f"{keyword}: expected an attribute of a text VR, found none known")
    return text if len(text) <= limit else text[: limit - 1] + "~"


def _fit_optional(keyword: str, text: str | None) -> str | None:
    return fit(keyword, text) if text else text


def now() -> datetime.datetime:
    """The current local time, to the second (content and contribution date/time)."""
    return datetime.datetime.now().replace(microsecond=0)


def apply_labels(ds: Dataset, equipment: Equipment, when: datetime.datetime | None = None) -> None:
    """Set ContentQualification and ContributingEquipmentSequence on a built dataset.

    highdicom objects accept ``contributing_equipment`` at construction; this helper covers the
    objects written with pydicom (RTSTRUCT, derived MR) and checks the description rule.
    """
    ds.ContentQualification = CONTENT_QUALIFICATION
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = [equipment.contributing_equipment(when)]
    description = str(ds.get("SeriesDescription", ""))
    if not is_labelled_description(description):
        raise ExportError(
            f"SeriesDescription must start with {SERIES_PREFIX!r} and contain {RESEARCH_NOTE!r}, "
            f"found {description!r}"
        )


def set_patient_study(ds: Dataset, patient: PatientStudy) -> None:
    """Copy the Patient and General Study attributes of the source study onto ``ds``, as
    received (the PACS matches the outputs to the patient and study by them).

    Outputs are always written in UTF-8 (``ISO_IR 192``): the names arrive as decoded Python
    strings whatever character set the source declared, and UTF-8 holds all of them.
    """
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.patient_birth_date
    ds.PatientSex = patient.patient_sex
    ds.StudyInstanceUID = patient.study_instance_uid
    ds.StudyDate = patient.study_date
    ds.StudyTime = patient.study_time
    ds.StudyID = patient.study_id
    ds.AccessionNumber = patient.accession_number
    ds.ReferringPhysicianName = patient.referring_physician_name
    # type 3: only when the source has them (the issuer is half of the patient's identity)
    for keyword, value in (
        ("IssuerOfPatientID", patient.issuer_of_patient_id),
        ("StudyDescription", patient.study_description),
        *patient.extra.items(),
    ):
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise ExportError(f"PatientStudy.extra key {keyword!r} is not a DICOM keyword")
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            del ds[keyword]


_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def _date(value: str) -> bool:
    try:
        return bool(_DA.fullmatch(value)) and bool(datetime.datetime.strptime(value, "%Y%m%d"))
    except ValueError:
        return False


def _time(value: str) -> bool:
    if not _TM.fullmatch(value):
        return False
    hh, mm, ss = int(value[:2]), int(value[2:4] or 0), int(value[4:6] or 0)
    return hh < 24 and mm < 60 and ss < 61  # a leap second is a valid TM


def for_highdicom(patient: PatientStudy) -> PatientStudy:
    """``patient`` with the values highdicom refuses left empty (a sex other than M, F or O, a
    date or time it cannot parse), for the stand-ins highdicom copies the patient and study
    from: :func:`finish_output` then writes the values as received on the object built."""
    return dataclasses.replace(
        patient,
        patient_sex=patient.patient_sex if patient.patient_sex in ("M", "F", "O") else "",
        patient_birth_date=patient.patient_birth_date if _date(patient.patient_birth_date) else "",
        study_date=patient.study_date if _date(patient.study_date) else "",
        study_time=patient.study_time if _time(patient.study_time) else "",
    )


def finish_output(ds: Dataset, patient: PatientStudy, when: datetime.datetime) -> None:
    """What every object built with highdicom gets once built: the source's patient and study
    as received (:func:`set_patient_study`), and the series' date and time, by which a reader
    tells the versions of a study's results apart in the PACS (same numbers, same names)."""
    set_patient_study(ds, patient)
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")


def highdicom_patient_study(patient: PatientStudy) -> dict[str, Any]:
    """The Patient and General Study arguments of highdicom's constructors (``SCImage``...)
    for the source study: those highdicom takes whatever their value. It refuses values that
    real studies carry (PatientSex ``U``, a birth date with day 00, an ACR-NEMA study time),
    so the others are left out here, and :func:`set_patient_study` copies every attribute
    onto the object built."""
    return {
        "study_instance_uid": patient.study_instance_uid,
        "patient_id": patient.patient_id,
        "patient_name": patient.patient_name,
        "accession_number": patient.accession_number,
        "study_id": patient.study_id,
        "referring_physician_name": patient.referring_physician_name,
    }


def sorted_unique(uids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(uids)))
