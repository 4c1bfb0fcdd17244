"""A small synthetic job (source study + prediction) for the output-object tests.

The model does not exist yet: these are hand-made stage objects with known content (an
ellipsoid tumour shrinking after treatment) on a 16 x 32 x 32 grid, plus real MR datasets of the
source T1-Gd so that tests can send the source study to a PACS before the results.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RTStructureSetStorage,
)

from dicom_node.types import PatientStudy, Prediction, SeriesRef, Volume
from sr_writer.labels import JobIdentity
from sr_writer.notice import FailureNotice
from sr_writer.outputs import JobInputs, JobOutputs, OutputOptions, build_outputs
from sr_writer.references import slice_geometry

STUDY_UID = "1.2.826.0.1.3680043.10.1482.1.1"
T1C_SERIES_UID = "1.2.826.0.1.3680043.10.1482.1.2"
RTSTRUCT_SERIES_UID = "1.2.826.0.1.3680043.10.1482.1.3"
RTSTRUCT_UID = "1.2.826.0.1.3680043.10.1482.1.3.1"
FOR_UID = "1.2.826.0.1.3680043.10.1482.1.9"
PATIENT_NAME = "Lefèvre^Zoë"


@dataclass(frozen=True)
class JobCase:
    patient: PatientStudy
    t1c: Volume
    t1c_series: SeriesRef
    rtstruct_series: SeriesRef
    prediction: Prediction
    gtv: np.ndarray

    @property
    def job(self) -> JobIdentity:
        return JobIdentity(
            study_instance_uid=self.patient.study_instance_uid,
            input_instance_uids=(
                *self.t1c_series.sop_instance_uids,
                *self.rtstruct_series.sop_instance_uids,
            ),
            model_name=self.prediction.model_name,
            model_version=self.prediction.model_version,
        )


def _ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    k, j, i = np.indices(shape, dtype=np.float64)
    r = (
        ((k - centre[0]) / radii[0]) ** 2
        + ((j - centre[1]) / radii[1]) ** 2
        + ((i - centre[2]) / radii[2]) ** 2
    )
    return r <= 1.0


def make_case(
    shape: tuple[int, int, int] = (16, 32, 32),
    *,
    patient_name: str = PATIENT_NAME,
    model_version: str = "0.1.0",
    study_uid: str = STUDY_UID,
    seed: int = 7,
    spacing: tuple[float, float, float] = (0.9, 0.8, 2.5),
    direction: np.ndarray | None = None,
    enhanced: bool = False,
    instances: int = 1,
) -> JobCase:
    """A job on a grid of ``shape``; ``enhanced``: the T1-Gd is one Enhanced MR instance
    whose frames are the slices, last slice first (``instances`` of them: the slices split
    between them in turn, each numbering its frames from 1)."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    origin = (-ni * 0.45, -nj * 0.4, -20.0)
    direction = np.eye(3) if direction is None else direction
    slice_uids = tuple(f"{T1C_SERIES_UID}.{k + 1}" for k in range(nk))
    frames: tuple[int, ...] = ()
    if enhanced and instances == 1:
        slice_uids, frames = (f"{T1C_SERIES_UID}.1",) * nk, tuple(range(nk, 0, -1))
    elif enhanced:
        slice_uids = tuple(f"{T1C_SERIES_UID}.{k % instances + 1}" for k in range(nk))
        frames = tuple(k // instances + 1 for k in range(nk))

    brain = _ellipsoid(
        shape, (nk / 2 - 0.5, nj / 2 - 0.5, ni / 2 - 0.5), (nk / 2, nj / 2.2, ni / 2.2)
    )
    gtv = _ellipsoid(shape, (nk / 2, nj / 2 + 2, ni / 2 + 3), (nk / 4, nj / 6, ni / 6))
    pred_mask = _ellipsoid(shape, (nk / 2, nj / 2 + 2, ni / 2 + 3), (nk / 5, nj / 8, ni / 8))
    t1c = np.where(brain, 400.0, 20.0) + rng.normal(0, 10, shape)
    t1c[gtv] = 900.0
    post = np.where(brain, 410.0, 20.0) + rng.normal(0, 10, shape)
    post[pred_mask] = 850.0
    std = np.abs(rng.normal(0, 5, shape)) + np.where(pred_mask, 40.0, 0.0)

    def vol(a: np.ndarray) -> Volume:
        return Volume(
            array=a,
            spacing=spacing,
            origin=origin,
            direction=direction,
            frame_of_reference_uid=FOR_UID,
            source_instance_uids=slice_uids,
            series_instance_uid=T1C_SERIES_UID,
            source_frame_numbers=frames,
        )

    voxel_ml = float(np.prod(spacing)) / 1000.0
    current = float(gtv.sum()) * voxel_ml
    predicted = float(pred_mask.sum()) * voxel_ml
    prediction = Prediction(
        mean=vol(post.astype(np.float32)),
        std=vol(std.astype(np.float32)),
        tumour_mask=vol(pred_mask),
        sample_volumes_ml=(predicted * 0.9, predicted * 1.05, predicted, predicted * 1.1),
        current_volume_ml=current,
        response_probabilities={
            "complete_response": 0.0,
            "partial_response": 0.75,
            "stable_disease": 0.25,
            "progressive_disease": 0.0,
        },
        survival_class="long",
        model_name="glioforecast-ldm-demo",
        model_version=model_version,
    )
    patient = PatientStudy(
        study_instance_uid=study_uid,
        patient_name=patient_name,
        patient_id="GF-0001",
        patient_birth_date="19610214",
        patient_sex="F",
        study_date="20260301",
        study_time="101500",
        study_id="1",
        accession_number="ACC0001",
        referring_physician_name="Dupré^Hélène",
    )
    return JobCase(
        patient=patient,
        t1c=vol(t1c.astype(np.float32)),
        t1c_series=SeriesRef(
            series_instance_uid=T1C_SERIES_UID,
            sop_class_uid=EnhancedMRImageStorage if enhanced else MRImageStorage,
            sop_instance_uids=tuple(dict.fromkeys(slice_uids)),
            modality="MR",
            series_description="T1 MPRAGE +Gd",
            series_number=3,
        ),
        rtstruct_series=SeriesRef(
            series_instance_uid=RTSTRUCT_SERIES_UID,
            sop_class_uid=RTStructureSetStorage,
            sop_instance_uids=(RTSTRUCT_UID,),
            modality="RTSTRUCT",
            series_description="GTV",
            series_number=4,
        ),
        prediction=prediction,
        gtv=gtv,
    )


def source_mr_datasets(case: JobCase) -> list[Dataset]:
    """The source T1-Gd as real MR Image Storage instances (int16), slice k = instance k+1."""
    out: list[Dataset] = []
    arr = np.rint(np.asarray(case.t1c.array)).astype(np.int16)
    nk, nj, ni = case.t1c.shape
    p = case.patient
    for k in range(nk):
        g = slice_geometry(case.t1c, k)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(case.t1c_series.sop_instance_uids[k])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = case.t1c_series.sop_instance_uids[k]
        ds.PatientName = p.patient_name
        ds.PatientID = p.patient_id
        ds.PatientBirthDate = p.patient_birth_date
        ds.PatientSex = p.patient_sex
        ds.StudyInstanceUID = p.study_instance_uid
        ds.StudyDate = p.study_date
        ds.StudyTime = p.study_time
        ds.StudyID = p.study_id
        ds.AccessionNumber = p.accession_number
        ds.ReferringPhysicianName = p.referring_physician_name
        ds.SeriesInstanceUID = case.t1c_series.series_instance_uid
        ds.SeriesNumber = case.t1c_series.series_number
        ds.SeriesDescription = case.t1c_series.series_description
        ds.Modality = "MR"
        ds.Manufacturer = "test"
        ds.FrameOfReferenceUID = case.t1c.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = 3.0
        ds.RepetitionTime = 2000.0
        ds.EchoTrainLength = 1
        ds.ContrastBolusAgent = "Gadobutrol"
        ds.ImagePositionPatient = list(g.image_position)
        ds.ImageOrientationPatient = list(g.image_orientation)
        ds.PixelSpacing = list(g.pixel_spacing)
        ds.SliceThickness = g.slice_thickness
        ds.ContentDate = p.study_date
        ds.ContentTime = p.study_time
        ds.AcquisitionDateTime = datetime.datetime(2026, 3, 1, 10, 15).strftime("%Y%m%d%H%M%S")
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = 500
        ds.WindowWidth = 1000
        ds.PixelData = arr[k].tobytes()
        out.append(ds)
    return out


@functools.cache
def default_case() -> JobCase:
    """The case most tests share (built once per test session)."""
    return make_case()


def job_inputs(case: JobCase) -> JobInputs:
    return JobInputs(
        patient=case.patient,
        t1c=case.t1c,
        t1c_series=case.t1c_series,
        other_series=(case.rtstruct_series,),
    )


@functools.cache
def default_outputs() -> JobOutputs:
    """Every output object of :func:`default_case`, derived MR included (built once)."""
    case = default_case()
    return build_outputs(
        case.prediction, job_inputs(case), OutputOptions(node_version="0.1.0", derived_mr=True)
    )


def write_all(objects: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in objects:
        p = folder / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def default_notice(
    reason: str = "missing required role rtstruct: no series matched",
) -> FailureNotice:
    """A failure notice of :func:`default_case`'s study (its T1-Gd series as evidence)."""
    return FailureNotice(
        job_id=7,
        headline="No RT structure set with the tumour outline (GTV) was received for this study.",
        reason=reason,
        advice="When the GTV has been contoured, send it to the glioforecast node (GLIOFORECAST).",
        node_ae_title="GLIOFORECAST",
        failed_at=datetime.datetime(2026, 12, 6, 14, 30),
        study_series=(default_case().t1c_series,),
    )
