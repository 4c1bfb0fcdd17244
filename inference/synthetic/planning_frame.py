"""A synthetic patient's structure set and dose on a planning frame of reference, with the
Spatial Registration a planning system would export.

In a hospital the GTV is contoured and the dose computed on the planning CT, whose frame of
reference is not the MR's; the planning system registers the MR to the CT and exports that
registration as a Spatial Registration object (REG), usually all in the planning CT's study.
:func:`to_planning_frame` rewrites a synthetic patient's pre-treatment RTSTRUCT and RTDOSE
(written on the MR's frame) onto a planning frame of their own: every contour point and the dose
grid are moved by a known rigid transform (no voxel is resampled), and ``REG/reg.dcm`` is written
beside them, relating the MR's frame to the planning frame; in the MR study or in a planning
study of their own. The planning CT itself is not written (the node does not need it:
the structure set is rasterised on its own contour planes). The structure set's references to
MR slices are removed, as they would name CT slices.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.convert.spatial_registration import SPATIAL_REGISTRATION_SOP_CLASS
from dicom_node.errors import ExportError
from inference.synthetic import dicom_export as dx
from sr_writer.rtstruct import move_to_frame

#: the planning transform's own random stream (the patient's other draws do not change)
PLANNING_STREAM = 1_000_011
#: where the RT objects go: not moved, in the MR study, or in a planning study of their own
PLANNING_CHOICES = ("", "mr-study", "planning-study")
_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "SpecificCharacterSet",
)  # fmt: skip


@dataclass(frozen=True)
class PlanningFrame:
    """``p_planning = rotation @ p_mr + translation`` (LPS mm)."""

    rotation: npt.NDArray[np.float64]
    translation: npt.NDArray[np.float64]
    frame_of_reference_uid: str

    @property
    def matrix(self) -> npt.NDArray[np.float64]:
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.rotation, self.translation
        return m


def rotation_about(axis: npt.ArrayLike, degrees: float) -> npt.NDArray[np.float64]:
    """The rotation by ``degrees`` about ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    return np.asarray(np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k), dtype=np.float64)


def random_rotation(
    rng: np.random.Generator, low_deg: float, high_deg: float
) -> npt.NDArray[np.float64]:
    """A rotation about a random axis by ``low_deg`` to ``high_deg`` degrees (two draws of
    ``rng``: the axis, then the angle)."""
    axis = rng.normal(size=3)
    return rotation_about(axis, float(rng.uniform(low_deg, high_deg)))


def planning_frame(seed: int, index: int) -> PlanningFrame:
    """Patient ``index``'s planning frame: a rotation of 2 to 10 degrees about a random axis and
    a shift of up to 40 mm along each axis (the CT's origin is the CT's own), from the stream
    ``[seed, index, PLANNING_STREAM]``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, PLANNING_STREAM]))
    return PlanningFrame(
        rotation=random_rotation(rng, 2.0, 10.0),
        translation=rng.uniform(-40.0, 40.0, size=3),
        frame_of_reference_uid=dx.derived_uid(seed, index, "frame-of-reference", "planning"),
    )


def _ds(values: npt.ArrayLike) -> list[str]:
    return [format(float(v), ".6f") for v in np.ravel(values)]


def _move_rtdose(ds: Dataset, frame: PlanningFrame) -> None:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
    ds.ImageOrientationPatient = _ds((frame.rotation @ iop.T).T)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    ds.ImagePositionPatient = _ds(frame.rotation @ ipp + frame.translation)
    ds.FrameOfReferenceUID = frame.frame_of_reference_uid


def _matrix_item(for_uid: str, matrix: npt.NDArray[np.float64]) -> Dataset:
    m = Dataset()
    m.FrameOfReferenceTransformationMatrix = [format(float(v), ".10g") for v in matrix.ravel()]
    m.FrameOfReferenceTransformationMatrixType = "RIGID"
    mreg = Dataset()
    mreg.RegistrationTypeCodeSequence = DicomSequence([])
    mreg.MatrixSequence = DicomSequence([m])
    item = Dataset()
    item.FrameOfReferenceUID = for_uid
    item.MatrixRegistrationSequence = DicomSequence([mreg])
    return item


def registration_dataset(
    template: Dataset,
    mr_frame_uid: str,
    frame: PlanningFrame,
    series_uid: str,
    sop_uid: str,
    when: datetime.datetime,
) -> Dataset:
    """A Spatial Registration of the MR's frame onto the planning frame, in the study of
    ``template`` (a dataset of that study)."""
    ds = Dataset()
    ds.file_meta = dx._file_meta(SPATIAL_REGISTRATION_SOP_CLASS, sop_uid)
    for keyword in _PATIENT_STUDY:
        if keyword in template:
            setattr(ds, keyword, template[keyword].value)
    ds.SOPClassUID = SPATIAL_REGISTRATION_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    ds.Modality = "REG"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 140
    ds.SeriesDescription = "REG MR to planning CT"
    ds.Laterality = ""  # type 2C: the brain is not a paired structure
    ds.FrameOfReferenceUID = frame.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "glioforecast"
    ds.ManufacturerModelName = "synthetic planning"
    ds.SoftwareVersions = "glioforecast synth"
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.ContentLabel = "MR_TO_CT"
    ds.ContentDescription = "rigid registration of the MR to the planning CT (synthetic)"
    ds.ContentCreatorName = ""
    ds.RegistrationSequence = DicomSequence(
        [
            _matrix_item(frame.frame_of_reference_uid, np.eye(4)),
            _matrix_item(mr_frame_uid, frame.matrix),
        ]
    )
    return ds


def to_planning_frame(
    pre_dir: Path, seed: int, index: int, planning_dir: Path | None = None
) -> PlanningFrame:
    """Move the RTSTRUCT and RTDOSE of a synthetic pre-treatment study folder onto patient
    ``index``'s planning frame and write ``REG/reg.dcm`` (see the module). With
    ``planning_dir`` the three go there, in a planning study of their own (the planning CT's
    study, as a planning system keeps them): another Study Instance UID, ID and date."""
    rs_path, dose_path = pre_dir / "RTSTRUCT" / "rtstruct.dcm", pre_dir / "RTDOSE" / "rtdose.dcm"
    if not rs_path.is_file():
        raise ExportError(f"{pre_dir}: expected a synthetic study with RTSTRUCT, found none")
    frame = planning_frame(seed, index)
    rs = pydicom.dcmread(rs_path)
    mr_for = str(rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    move_to_frame(rs, frame.matrix, frame.frame_of_reference_uid)
    dose = pydicom.dcmread(dose_path) if dose_path.is_file() else None
    if dose is not None:
        _move_rtdose(dose, frame)
    stamp = f"{rs.get('StructureSetDate', '')}{str(rs.get('StructureSetTime', ''))[:6]}"
    when = (
        datetime.datetime.strptime(stamp, "%Y%m%d%H%M%S")
        if len(stamp) == 14
        else datetime.datetime(2000, 1, 1)
    )
    reg = registration_dataset(
        rs, mr_for, frame,
        series_uid=dx.derived_uid(seed, index, "registration", "series"),
        sop_uid=dx.derived_uid(seed, index, "registration", "instance"),
        when=when,
    )  # fmt: skip
    objects = {"RTSTRUCT": ("rtstruct.dcm", rs), "REG": ("reg.dcm", reg)}
    if dose is not None:
        objects["RTDOSE"] = ("rtdose.dcm", dose)
    out = pre_dir
    if planning_dir is not None:
        out = planning_dir
        study = dx.derived_uid(seed, index, "planning", "study")
        for _, ds in objects.values():
            ds.StudyInstanceUID = study
            ds.StudyID = "3"
            ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
            ds.AccessionNumber = f"{ds.get('AccessionNumber', '')}P"[-16:]
            ds.StudyDescription = "RT planning"
        for folder in objects:
            for path in (pre_dir / folder).glob("*.dcm"):
                path.unlink()
            if (pre_dir / folder).is_dir():
                (pre_dir / folder).rmdir()
    for folder, (name, ds) in objects.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        ds.save_as(out / folder / name, enforce_file_format=True)
    return frame
