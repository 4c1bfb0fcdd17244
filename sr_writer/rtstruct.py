"""RT Structure Set writer: boolean masks on an MR grid -> an RTSTRUCT dataset (pydicom).

highdicom has no RTSTRUCT builder, so this module writes the IOD directly (PS3.3 A.19): Patient,
General Study, RT Series, General Equipment, Frame of Reference (current editions), Structure Set,
ROI Contour, RT ROI Observations and SOP Common modules. Contours are traced slice by slice with
marching squares at 0.5
(:mod:`sr_writer.contours`), so vertices are sub-voxel; each contour references the MR instance of
the slice it lies on (``reference_grid.source_instance_uids`` lists them in slice order); holes
are separate contours, which readers combine with the even-odd rule.

Used both by the synthetic cohort (GTV/CTV/PTV of a phantom) and by the node's outputs (the
predicted tumour on the pre-treatment frame of reference and, placed by :func:`mask_on_planes`
on the planning CT's slices, on the planning frame, where no image is referenced).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from dicom_node.convert.geometry import moved, plane_axes, resample
from dicom_node.errors import ConversionError, ExportError
from dicom_node.types import PatientStudy, PlaneLattice, SeriesRef, Volume
from sr_writer.contours import mask_contours
from sr_writer.labels import set_patient_study
from sr_writer.references import slice_frame_numbers

logger = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
# Referenced SOP Class of the study in RT Referenced Study Sequence, as written by planning
# systems (Detached Study Management SOP Class).
STUDY_REFERENCE_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.1"

# Defined terms of RT ROI Interpreted Type (PS3.3 C.8.8.8.1), plus "" (the attribute is type 2).
INTERPRETED_TYPES = frozenset(
    {
        "",
        "EXTERNAL",
        "PTV",
        "CTV",
        "GTV",
        "TREATED_VOLUME",
        "IRRAD_VOLUME",
        "OAR",
        "BOLUS",
        "AVOIDANCE",
        "ORGAN",
        "MARKER",
        "REGISTRATION",
        "ISOCENTER",
        "CONTRAST_AGENT",
        "CAVITY",
        "BRACHY_CHANNEL",
        "BRACHY_ACCESSORY",
        "BRACHY_SRC_APP",
        "BRACHY_CHNL_SHLD",
        "SUPPORT",
        "FIXATION",
        "DOSE_REGION",
        "CONTROL",
        "DOSE_MEASUREMENT",
    }
)
GENERATION_ALGORITHMS = frozenset({"AUTOMATIC", "SEMIAUTOMATIC", "MANUAL", ""})

_LO_MAX = 64
_SH_MAX = 16
#: the most voxels of a grid on another frame's planes (:func:`mask_on_planes`); its pixels are
#: made coarser beyond
_PLANE_GRID_VOXELS = 64_000_000


@dataclass(frozen=True)
class RoiMask:
    """One region of interest: a boolean mask on the reference grid, its name, colour and type."""

    name: str
    mask: Volume
    color: tuple[int, int, int]
    interpreted_type: str


def _default_software_versions() -> str:
    try:
        from dicom_node import __version__
    except ImportError:  # pragma: no cover - the package always defines it
        return "unknown"
    return str(__version__)


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters, exact to the micrometre."""
    text = f"{value:.3f}"
    if text in ("-0.000",):
        text = "0.000"
    if len(text) > 16:
        raise ExportError(f"coordinate {value} does not fit a DICOM decimal string (16 chars)")
    return text


def _check_grid(roi: RoiMask, grid: Volume) -> None:
    if roi.mask.shape != grid.shape:
        raise ExportError(
            f"ROI {roi.name!r}: mask shape {roi.mask.shape} differs from the reference grid "
            f"shape {grid.shape}"
        )
    same = (
        np.allclose(roi.mask.spacing, grid.spacing, atol=1e-4)
        and np.allclose(roi.mask.origin, grid.origin, atol=1e-3)
        and np.allclose(roi.mask.direction, grid.direction, atol=1e-5)
    )
    if not same:
        raise ExportError(
            f"ROI {roi.name!r}: mask geometry (spacing {roi.mask.spacing}, origin "
            f"{roi.mask.origin}) differs from the reference grid (spacing {grid.spacing}, "
            f"origin {grid.origin})"
        )


def _check_roi(roi: RoiMask) -> None:
    if not roi.name or len(roi.name) > _LO_MAX:
        raise ExportError(f"ROI name must be 1 to {_LO_MAX} characters, found {roi.name!r}")
    if roi.interpreted_type not in INTERPRETED_TYPES:
        raise ExportError(
            f"ROI {roi.name!r}: interpreted type must be one of "
            f"{sorted(t for t in INTERPRETED_TYPES if t)}, found {roi.interpreted_type!r}"
        )
    if len(roi.color) != 3 or not all(0 <= int(c) <= 255 for c in roi.color):
        raise ExportError(f"ROI {roi.name!r}: colour must be 3 values in 0..255, found {roi.color}")


def build_rtstruct(
    *,
    rois: Sequence[RoiMask],
    reference_grid: Volume,
    reference_series: SeriesRef | None,
    patient: PatientStudy,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_description: str,
    series_number: int,
    structure_set_label: str,
    manufacturer: str = "glioforecast",
    software_versions: str = "",
    content_datetime: datetime.datetime | None = None,
    manufacturer_model_name: str = "glioforecast",
    roi_generation_algorithm: str = "AUTOMATIC",
    instance_number: int = 1,
    contour_tolerance: float = 0.01,
) -> Dataset:
    """Build an RT Structure Set of ``rois`` on the frame of reference of ``reference_grid``.

    With ``reference_series``, each contour references the image of the slice it lies on (the
    grid's ``source_instance_uids``) and the structure set lists that series' instances. Without
    it (``None``: a grid whose slices are those of images the node does not have, such as the
    planning CT's) no image is referenced: these attributes are type 3.

    Raises :class:`ExportError` when a mask is not on the reference grid, the grid has no frame
    of reference or, with a reference series, no instance UID per slice, or a label does not fit
    its DICOM type.
    """
    if not rois:
        raise ExportError("an RT structure set needs at least one ROI, found none")
    for_uid = reference_grid.frame_of_reference_uid
    if not for_uid:
        raise ExportError("the reference grid has no frame of reference UID")
    slice_uids = reference_grid.source_instance_uids
    slice_frames = slice_frame_numbers(reference_grid)
    if reference_series is not None and len(slice_uids) != reference_grid.shape[0]:
        raise ExportError(
            f"the reference grid needs one source instance UID per slice: expected "
            f"{reference_grid.shape[0]}, found {len(slice_uids)}"
        )
    if reference_series is not None and not reference_series.sop_instance_uids:
        raise ExportError("the reference series lists no instance")
    if len(structure_set_label) > _SH_MAX:
        raise ExportError(
            f"structure set label must be at most {_SH_MAX} characters, found "
            f"{structure_set_label!r}"
        )
    if len(series_description) > _LO_MAX:
        raise ExportError(
            f"series description must be at most {_LO_MAX} characters, found "
            f"{len(series_description)}"
        )
    if roi_generation_algorithm not in GENERATION_ALGORITHMS:
        raise ExportError(
            f"ROI generation algorithm must be one of {sorted(GENERATION_ALGORITHMS)}, found "
            f"{roi_generation_algorithm!r}"
        )
    names = [r.name for r in rois]
    if len(set(names)) != len(names):
        raise ExportError(f"ROI names must be unique, found {names}")
    for roi in rois:
        _check_roi(roi)
        _check_grid(roi, reference_grid)

    when = content_datetime or datetime.datetime.now(datetime.UTC)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(RTSTRUCT_SOP_CLASS_UID)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "GLIOFORECAST"

    set_patient_study(ds, patient)
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.InstanceNumber = instance_number
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = manufacturer_model_name
    ds.SoftwareVersions = software_versions or _default_software_versions()

    # Frame of Reference module (mandatory in the RT Structure Set IOD since 2021b).
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""

    ds.StructureSetLabel = structure_set_label
    ds.StructureSetDate = date
    ds.StructureSetTime = time

    for_item = Dataset()
    for_item.FrameOfReferenceUID = for_uid
    if reference_series is not None:
        for_item.RTReferencedStudySequence = DicomSequence(
            [_study_reference(reference_series, patient.study_instance_uid)]
        )
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([for_item])

    roi_seq, contour_seq, obs_seq = DicomSequence(), DicomSequence(), DicomSequence()
    for number, roi in enumerate(rois, start=1):
        roi_item = Dataset()
        roi_item.ROINumber = number
        roi_item.ReferencedFrameOfReferenceUID = for_uid
        roi_item.ROIName = roi.name
        roi_item.ROIGenerationAlgorithm = roi_generation_algorithm
        roi_seq.append(roi_item)

        contours = DicomSequence()
        for index, contour in enumerate(mask_contours(roi.mask, contour_tolerance), start=1):
            item = Dataset()
            item.ContourNumber = index
            if reference_series is not None:
                image = _image_reference(
                    reference_series, slice_uids[contour.k], slice_frames[contour.k], roi.name
                )
                item.ContourImageSequence = DicomSequence([image])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(contour.points)
            item.ContourData = [_ds(v) for v in contour.points.reshape(-1)]
            contours.append(item)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = [int(c) for c in roi.color]
        if contours:
            roi_contour.ContourSequence = contours
        else:
            # Contour Sequence is type 3, but present it needs one item or more (PS3.3
            # C.8.8.6): an empty ROI has none at all
            logger.warning("ROI %r is empty: it is written without contours", roi.name)
        roi_contour.ReferencedROINumber = number
        contour_seq.append(roi_contour)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = roi.name[:_SH_MAX]
        obs.RTROIInterpretedType = roi.interpreted_type
        obs.ROIInterpreter = ""
        obs_seq.append(obs)

    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    logger.debug(
        "built RTSTRUCT %s with %d ROIs, %d contours",
        sop_instance_uid,
        len(rois),
        sum(len(c.get("ContourSequence", [])) for c in contour_seq),
    )
    return ds


def _study_reference(series: SeriesRef, study_instance_uid: str) -> Dataset:
    """The RT Referenced Study Sequence item listing every instance of ``series``."""
    contour_images = DicomSequence()
    for uid in series.sop_instance_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = series.sop_class_uid
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = series.series_instance_uid
    series_item.ContourImageSequence = contour_images
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = STUDY_REFERENCE_SOP_CLASS_UID
    study_item.ReferencedSOPInstanceUID = study_instance_uid
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    return study_item


def _image_reference(series: SeriesRef, slice_uid: str, frame: int, roi_name: str) -> Dataset:
    """The Contour Image Sequence item of a contour on the slice of instance ``slice_uid``
    (``frame``: its frame number in a multi-frame instance, 0 for a single-frame one)."""
    if slice_uid not in series.sop_instance_uids:
        raise ExportError(
            f"ROI {roi_name!r}: slice instance {slice_uid} is not in the reference series "
            f"{series.series_instance_uid}"
        )
    image = Dataset()
    image.ReferencedSOPClassUID = series.sop_class_uid
    image.ReferencedSOPInstanceUID = slice_uid
    if frame:  # a frame of a multi-frame instance (Enhanced MR)
        image.ReferencedFrameNumber = frame
    return image


def mask_on_planes(
    mask: Volume,
    matrix: npt.ArrayLike,
    planes: PlaneLattice,
    frame_of_reference_uid: str,
    pixel_mm: float | None = None,
) -> Volume:
    """``mask`` (boolean) placed on another frame of reference, on a grid whose slices are
    ``planes`` (the planning CT's slices, on which a structure set of that frame is drawn).

    ``matrix`` (4x4) maps a point of the mask's frame to the other frame (a rotation and a
    shift). The grid's slices are the planes of the lattice that the mask reaches, one more
    beyond each end; its in-plane pixels are ``pixel_mm`` square (default half the mask's
    smallest spacing, as the reader rasterises such a structure set). A voxel of the grid is in
    when at least half of it is, by trilinear weights on the mask (as the reader places a
    structure set of another frame on the image). An empty mask gives a grid of one empty voxel
    on the plane nearest to the mask grid's centre. The in-plane axes are the lattice normal's
    (the planning CT's own pixel axes are not known): contours traced on the grid lie on the
    planes whatever they are."""
    m = np.asarray(matrix, dtype=float)
    n = np.asarray(planes.normal, dtype=float)
    n = n / np.linalg.norm(n)
    u, v = plane_axes(n)
    axes = np.stack([u, v, n], axis=1)
    step = float(planes.step)
    pixel = float(pixel_mm if pixel_mm is not None else min(mask.spacing) / 2)
    array = np.asarray(mask.array).astype(bool)
    found = np.array(np.nonzero(array))
    if found.size == 0:  # nothing to place: one empty voxel, on the plane at the grid's centre
        middle = (np.array(array.shape[::-1], dtype=float) - 1) / 2
        centre = (m @ mask.affine @ np.array([*middle, 1.0]))[:3]
        level = planes.position + planes.plane_at(float(n @ centre)) * step
        origin = centre + (level - float(n @ centre)) * n
        return Volume(
            array=np.zeros((1, 1, 1), dtype=bool),
            spacing=(pixel, pixel, step),
            origin=(float(origin[0]), float(origin[1]), float(origin[2])),
            direction=axes,
            frame_of_reference_uid=frame_of_reference_uid,
        )
    # the mask's box with one empty voxel around it (resampled, it gives the same values)
    start = np.maximum(found.min(axis=1) - 1, 0)
    stop = np.minimum(found.max(axis=1) + 2, array.shape)
    box = array[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    corner = mask.affine @ np.array([start[2], start[1], start[0], 1.0])
    part = replace(mask, array=box, origin=(float(corner[0]), float(corner[1]), float(corner[2])))
    try:
        placed = moved(part, m, frame_of_reference_uid)
    except ConversionError as exc:
        raise ExportError(
            f"the mask cannot be placed on frame {frame_of_reference_uid}: {exc}"
        ) from None
    # the corners of the mask's voxels (half a voxel beyond its outer centres: as far as the
    # trilinear weights reach half), on the new frame
    lo_kji = found.min(axis=1) - start - 0.5
    hi_kji = found.max(axis=1) - start + 0.5
    corners = np.array(
        [[i, j, k, 1.0] for i in (lo_kji[2], hi_kji[2]) for j in (lo_kji[1], hi_kji[1])
         for k in (lo_kji[0], hi_kji[0])]
    )  # fmt: skip
    world = (placed.affine @ corners.T)[:3].T
    along = world @ n
    first = planes.plane_at(float(along.min())) - 1
    last = planes.plane_at(float(along.max())) + 1
    lo = np.array([(world @ u).min(), (world @ v).min()]) - 2 * pixel
    hi = np.array([(world @ u).max(), (world @ v).max()]) + 2 * pixel
    nk = last - first + 1
    while True:
        ni, nj = (np.ceil((hi - lo) / pixel) + 1).astype(int)
        if ni * nj * nk <= _PLANE_GRID_VOXELS:
            break
        pixel *= 1.5
    origin = lo[0] * u + lo[1] * v + (planes.position + first * step) * n
    grid = Volume(
        array=np.zeros((nk, int(nj), int(ni)), dtype=bool),
        spacing=(pixel, pixel, step),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=axes,
        frame_of_reference_uid=frame_of_reference_uid,
    )
    inside = resample(placed, grid, order=1, output_dtype=np.bool_)
    logger.debug(
        "placed %d mask voxels on %d planes of frame %s (%d voxels in, %.2f mm pixels)",
        found.shape[1], nk, frame_of_reference_uid, int(inside.sum()), pixel,
    )  # fmt: skip
    return grid.with_array(inside)


def move_to_frame(ds: Dataset, matrix: npt.ArrayLike, frame_of_reference_uid: str) -> None:
    """Re-express a structure set on another frame of reference, in place: every contour point
    ``p`` becomes ``matrix @ p`` (4x4), the frame UIDs become ``frame_of_reference_uid``, and
    the references to the image slices of the old frame are removed (Type 3: the images of the
    new frame, e.g. a planning CT, are not known here)."""
    m = np.asarray(matrix, dtype=float)
    old = {str(ref.FrameOfReferenceUID) for ref in ds.ReferencedFrameOfReferenceSequence}
    if "FrameOfReferenceUID" in ds:  # the top-level one too: a reader may trust it alone
        ds.FrameOfReferenceUID = frame_of_reference_uid
    for ref in ds.ReferencedFrameOfReferenceSequence:
        ref.FrameOfReferenceUID = frame_of_reference_uid
        if "RTReferencedStudySequence" in ref:
            del ref.RTReferencedStudySequence
    for roi in ds.StructureSetROISequence:
        if str(roi.ReferencedFrameOfReferenceUID) in old:
            roi.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    for roi in ds.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            moved = pts @ m[:3, :3].T + m[:3, 3]
            contour.ContourData = [format(float(v), ".6f") for v in moved.ravel()]
            if "ContourImageSequence" in contour:
                del contour.ContourImageSequence
