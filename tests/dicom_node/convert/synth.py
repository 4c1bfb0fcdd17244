"""Small in-memory DICOM objects with exactly known geometry, for the conversion tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _meta(ds: Dataset, sop_class: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def _fmt(values: Sequence[float] | npt.NDArray[np.float64]) -> list[str]:
    return [f"{v:.10g}" for v in values]


def mr_slices(
    pixels: npt.NDArray[np.integer],
    *,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    iop: Sequence[float] = AXIAL,
    spacing: tuple[float, float] = (0.8, 0.9),
    slice_step: float = 2.5,
    step_vector: Sequence[float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    frame_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """Classic MR slices of ``pixels`` [k, rows, cols] (uint16 or int16).

    Slice k sits at ``origin + k * step`` where step is ``slice_step`` along the slice normal,
    or ``step_vector`` when given (for sheared stacks). ``spacing`` is PixelSpacing
    (row spacing, column spacing).
    """
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    step = np.asarray(step_vector, float) if step_vector is not None else slice_step * normal
    frame_uid = frame_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    out = []
    for k in range(pixels.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "MR"
        ds.PatientName = "Test^Convert"
        ds.PatientID = "CONV1"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _fmt(np.asarray(origin, float) + k * step)
        ds.ImageOrientationPatient = _fmt(iop)
        ds.PixelSpacing = _fmt(spacing)
        ds.SliceThickness = f"{abs(slice_step):.6g}"
        ds.EchoTime = "10"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        if slope is not None:
            ds.RescaleSlope = f"{slope:.10g}"
        if intercept is not None:
            ds.RescaleIntercept = f"{intercept:.10g}"
        ds.PixelData = (
            np.ascontiguousarray(pixels[k]).astype(pixels.dtype.newbyteorder("<")).tobytes()
        )
        out.append(_meta(ds, MRImageStorage))
    return out


def enhanced_mr(
    pixels: npt.NDArray[np.integer],
    *,
    origin: Sequence[float] = (5.0, -7.0, 11.0),
    iop: Sequence[float] = AXIAL,
    spacing: tuple[float, float] = (1.0, 1.1),
    slice_step: float = 3.0,
    frame_order: Sequence[int] | None = None,
    slopes: Sequence[float] | None = None,
    frame_uid: str | None = None,
) -> Dataset:
    """An enhanced MR instance with the frames of ``pixels`` stored in ``frame_order``."""
    n = pixels.shape[0]
    order = list(frame_order) if frame_order is not None else list(range(n))
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.Modality = "MR"
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = _fmt(iop)
    shared.PlaneOrientationSequence = DicomSequence([ori])
    meas = Dataset()
    meas.PixelSpacing = _fmt(spacing)
    meas.SliceThickness = f"{slice_step:.6g}"
    shared.PixelMeasuresSequence = DicomSequence([meas])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for stored, k in enumerate(order):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = _fmt(np.asarray(origin, float) + k * slice_step * normal)
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        item.FrameContentSequence = DicomSequence([content])
        if slopes is not None:
            pvt = Dataset()
            pvt.RescaleSlope = f"{slopes[stored]:.10g}"
            pvt.RescaleIntercept = "0"
            pvt.RescaleType = "US"
            item.PixelValueTransformationSequence = DicomSequence([pvt])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(pixels[order]).astype("<u2").tobytes()
    return _meta(ds, EnhancedMRImageStorage)


def rtstruct(
    frame_uid: str,
    rois: dict[str, Sequence[npt.NDArray[np.float64]]],
    *,
    geometric_type: str = "CLOSED_PLANAR",
    interpreted_types: dict[str, str] | None = None,
) -> Dataset:
    """A structure set: ROI name -> list of contours, each an (n, 3) array of LPS points (mm);
    ``interpreted_types``: ROI name -> RTROIInterpretedType (RT ROI Observations)."""
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel = "TEST"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame_uid
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref])
    ss_items, contour_items = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = frame_uid
        item.ROIName = name
        item.ROIGenerationAlgorithm = "MANUAL"
        ss_items.append(item)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [255, 0, 0]
        seq = []
        for pts in contours:
            c = Dataset()
            c.ContourGeometricType = geometric_type
            c.NumberOfContourPoints = len(pts)
            c.ContourData = _fmt(np.asarray(pts, float).ravel())
            seq.append(c)
        roi_contour.ContourSequence = DicomSequence(seq)
        contour_items.append(roi_contour)
    ds.StructureSetROISequence = DicomSequence(ss_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    if interpreted_types:
        observations = []
        for number, name in enumerate(rois, start=1):
            if name in interpreted_types:
                obs = Dataset()
                obs.ObservationNumber = obs.ReferencedROINumber = number
                obs.RTROIInterpretedType = interpreted_types[name]
                obs.ROIInterpreter = ""
                observations.append(obs)
        ds.RTROIObservationsSequence = DicomSequence(observations)
    return _meta(ds, RTStructureSetStorage)


def rtdose(
    dose_gy: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
    *,
    shape: tuple[int, int, int],
    origin: Sequence[float],
    spacing: tuple[float, float, float],
    frame_uid: str,
    absolute_offsets: bool = False,
    reverse: bool = False,
    scaling: float = 1e-4,
) -> Dataset:
    """An axial RT Dose whose voxel values sample ``dose_gy`` at their LPS centres.

    ``spacing`` is (di, dj, dk); ``reverse`` stores frames with decreasing z (negative offsets).
    """
    nk, nj, ni = shape
    di, dj, dk = spacing
    step = -dk if reverse else dk
    offsets = np.arange(nk) * step
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    pts = np.stack(
        [origin[0] + i * di, origin[1] + j * dj, origin[2] + offsets[k]], axis=-1
    ).reshape(-1, 3)
    values = dose_gy(pts).reshape(shape)
    stored = np.round(values / scaling).astype(np.uint32)
    ds = Dataset()
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "RTDOSE"
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = f"{scaling:.10g}"
    ds.ImagePositionPatient = _fmt(origin)
    ds.ImageOrientationPatient = _fmt(AXIAL)
    ds.PixelSpacing = _fmt((dj, di))
    ds.NumberOfFrames = nk
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = _fmt(
        np.asarray(offsets + (origin[2] if absolute_offsets else 0.0), dtype=np.float64)
    )
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = nj, ni
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u4").tobytes()
    return _meta(ds, RTDoseStorage)


def volume_pixels(shape: tuple[int, int, int], seed: int = 0) -> npt.NDArray[np.uint16]:
    """Distinct, reproducible voxel values: each slice identifiable by its content."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape, dtype=np.uint16)
