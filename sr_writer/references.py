"""Geometry and references of the source series, rebuilt from the typed stage objects.

Stages hand ``sr_writer`` a :class:`~dicom_node.types.Volume` (the T1-Gd grid), a
:class:`~dicom_node.types.SeriesRef` and a :class:`~dicom_node.types.PatientStudy`, never the
received datasets. highdicom's builders want source datasets (to copy patient and study, check the
frame of reference and reference the source images); this module rebuilds header-only stand-ins
of the source slices (no pixel data) that carry exactly what those builders read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, SeriesRef, Volume

from .labels import for_highdicom, set_patient_study


@dataclass(frozen=True)
class SliceGeometry:
    """Position of slice ``k`` of a :class:`Volume`, as the DICOM plane attributes."""

    image_position: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) = (dj, di)
    slice_thickness: float


def slice_geometry(grid: Volume, k: int) -> SliceGeometry:
    d = np.asarray(grid.direction, dtype=float)
    origin = np.asarray(grid.origin, dtype=float)
    pos = origin + d[:, 2] * grid.spacing[2] * k
    row = d[:, 0]
    col = d[:, 1]
    return SliceGeometry(
        image_position=(_r(pos[0]), _r(pos[1]), _r(pos[2])),
        image_orientation=(
            _r(row[0], 8),
            _r(row[1], 8),
            _r(row[2], 8),
            _r(col[0], 8),
            _r(col[1], 8),
            _r(col[2], 8),
        ),
        pixel_spacing=(_r(grid.spacing[1]), _r(grid.spacing[0])),
        slice_thickness=_r(grid.slice_thickness or grid.spacing[2]),
    )


def _r(x: float, digits: int = 6) -> float:
    """Round so that the decimal string fits a DS (16 characters)."""
    v = round(float(x), digits)
    return 0.0 if v == 0 else v


def slice_instance_uids(grid: Volume, series: SeriesRef) -> tuple[str, ...]:
    """SOP Instance UID of the source slice behind each ``k`` of ``grid``.

    ``grid.source_instance_uids`` (set by conversion, one per slice in ``k`` order) wins; a series
    whose instance list has one entry per slice is the fallback.
    """
    nk = grid.shape[0]
    if len(grid.source_instance_uids) == nk:
        return tuple(grid.source_instance_uids)
    if len(series.sop_instance_uids) == nk:
        return tuple(series.sop_instance_uids)
    raise ExportError(
        f"cannot map the {nk} slices of the source grid to source instances: expected {nk} "
        f"instance UIDs, found {len(grid.source_instance_uids)} on the volume and "
        f"{len(series.sop_instance_uids)} in series {series.series_instance_uid}"
    )


def slice_frame_numbers(grid: Volume) -> tuple[int, ...]:
    """The frame number of each ``k`` in its multi-frame source instance (0: a single-frame
    instance, as every slice of a classic series)."""
    frames = tuple(grid.source_frame_numbers)
    return frames if len(frames) == grid.shape[0] else (0,) * grid.shape[0]


def source_instances(grid: Volume, series: SeriesRef, patient: PatientStudy) -> list[Dataset]:
    """Header-only stand-ins of the instances the slices of ``grid`` come from, one per
    instance in the order of the slices (a series of single-frame instances: one per slice;
    an Enhanced MR: one, or one per instance when its frames are spread over several): what
    an SR names as its evidence."""
    uids = list(dict.fromkeys(slice_instance_uids(grid, series)))
    if len(uids) == grid.shape[0] and not any(slice_frame_numbers(grid)):
        return source_slice_datasets(grid, series, patient)
    return [_stand_in(grid, series, patient, uid) for uid in uids]


def multiframe_source(grid: Volume, series: SeriesRef, patient: PatientStudy) -> Dataset | None:
    """A header-only stand-in of the multi-frame instance (an Enhanced MR) whose frames are
    the slices of ``grid``, for highdicom to reference its frames from (None for a series of
    single-frame instances, and for slices that are frames of several instances or not every
    frame of one: :func:`frame_references` then names each slice's frame)."""
    frames = slice_frame_numbers(grid)
    if not any(frames) or not multiframe_source_fits(grid, series):
        return None
    uids = set(slice_instance_uids(grid, series))
    ds = _stand_in(grid, series, patient, next(iter(uids)))  # its planes in functional groups
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    first = slice_geometry(grid, 0)
    measures = Dataset()
    measures.PixelSpacing = list(first.pixel_spacing)
    measures.SliceThickness = first.slice_thickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(first.image_orientation)
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame: list[Dataset] = [Dataset() for _ in frames]
    for k, frame in enumerate(frames):
        position = Dataset()
        position.ImagePositionPatient = list(slice_geometry(grid, k).image_position)
        per_frame[frame - 1].PlanePositionSequence = [position]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


def patient_orientation(grid: Volume) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) letters, e.g. ``('L', 'P')``."""
    d = np.asarray(grid.direction, dtype=float)
    return (_orientation_letters(d[:, 0]), _orientation_letters(d[:, 1]))


def _orientation_letters(v: npt.NDArray[np.float64]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # LPS: +x left, +y posterior, +z head
    order = np.argsort(-np.abs(v))
    out = ""
    for axis in order:
        if abs(v[axis]) < 0.25:  # ignore small obliquity components
            continue
        out += letters[axis][0] if v[axis] > 0 else letters[axis][1]
    return out or "L"


def _stand_in(grid: Volume, series: SeriesRef, patient: PatientStudy, uid: str) -> Dataset:
    """A header-only stand-in of source instance ``uid`` (no plane, no pixel data): what
    highdicom copies the patient, study, series and image attributes from."""
    if not grid.frame_of_reference_uid:
        raise ExportError(
            "the source grid has no FrameOfReferenceUID; outputs on the pre-treatment frame of "
            "reference need it (expected a UID on Volume.frame_of_reference_uid, found None)"
        )
    _, nj, ni = grid.shape
    ds = Dataset()
    set_patient_study(ds, for_highdicom(patient))  # what highdicom copies
    ds.SOPClassUID = series.sop_class_uid or MRImageStorage
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.Modality = series.modality or "MR"
    ds.FrameOfReferenceUID = grid.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Rows = nj
    ds.Columns = ni
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def frame_references(grid: Volume, series: SeriesRef) -> list[tuple[str, int]] | None:
    """(SOP Instance UID, frame number) of each slice ``k`` when the slices are frames of
    multi-frame instances that :func:`multiframe_source` cannot stand in for as one (an Enhanced
    MR T1-Gd split over several instances, or a part of one's frames); None otherwise."""
    frames = slice_frame_numbers(grid)
    if not any(frames) or multiframe_source_fits(grid, series):
        return None
    return list(zip(slice_instance_uids(grid, series), frames, strict=True))


def multiframe_source_fits(grid: Volume, series: SeriesRef) -> bool:
    """Whether the slices are every frame of one multi-frame instance."""
    frames = slice_frame_numbers(grid)
    return len(set(slice_instance_uids(grid, series))) == 1 and sorted(frames) == list(
        range(1, len(frames) + 1)
    )


def source_slice_datasets(grid: Volume, series: SeriesRef, patient: PatientStudy) -> list[Dataset]:
    """Header-only stand-ins of the source slices, in ``k`` order (no pixel data)."""
    out: list[Dataset] = []
    for k, uid in enumerate(slice_instance_uids(grid, series)):
        g = slice_geometry(grid, k)
        ds = _stand_in(grid, series, patient, uid)
        ds.ImagePositionPatient = list(g.image_position)
        ds.ImageOrientationPatient = list(g.image_orientation)
        ds.PixelSpacing = list(g.pixel_spacing)
        ds.SliceThickness = g.slice_thickness
        ds.InstanceNumber = k + 1
        out.append(ds)
    return out


def reference_stubs(
    study_instance_uid: str, series: SeriesRef, uids: Sequence[str] | None = None
) -> list[Dataset]:
    """Minimal datasets (study, series, SOP class and instance UIDs) to list as SR evidence:
    in ``study_instance_uid``, or the series' own study where it names one (a structure set
    linked from the planning study is listed under that study, where a viewer finds it)."""
    out: list[Dataset] = []
    for uid in uids if uids is not None else series.sop_instance_uids:
        ds = Dataset()
        ds.StudyInstanceUID = series.study_instance_uid or study_instance_uid
        ds.SeriesInstanceUID = series.series_instance_uid
        ds.SOPClassUID = series.sop_class_uid
        ds.SOPInstanceUID = uid
        out.append(ds)
    return out
