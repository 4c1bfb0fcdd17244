"""DICOM Segmentation of the predicted tumour, on the pre-treatment T1-Gd frame of reference.

A BINARY segmentation with one segment, "Predicted tumour", whose frames follow the source
slices (empty frames are kept, so that a planning system finds one frame per source slice).
"""

from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import MRImageStorage

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, Prediction, SeriesRef, Volume

from .labels import (
    CONTENT_QUALIFICATION,
    SERIES_NUMBERS,
    Equipment,
    JobIdentity,
    finish_output,
    series_description,
)
from .references import (
    frame_references,
    multiframe_source,
    slice_frame_numbers,
    source_slice_datasets,
)

logger = logging.getLogger(__name__)

SEGMENT_LABEL = "Predicted tumour"
# CIELab of a saturated red, the colour of the outline on the Secondary Capture.
_RED = hd.color.CIELabColor(53.24, 80.09, 67.20)


def build_segmentation(
    *,
    prediction: Prediction,
    source_t1c: Volume,
    source_series: SeriesRef,
    patient: PatientStudy,
    job: JobIdentity,
    equipment: Equipment,
    when: datetime.datetime | None = None,
    study_version: int = 1,
) -> hd.seg.Segmentation:
    """The SEG of the predicted tumour; ``study_version`` goes into the series description
    (:func:`series_description`)."""
    mask_vol = prediction.tumour_mask
    if mask_vol.shape != source_t1c.shape:
        raise ExportError(
            f"the predicted tumour mask must be on the source T1-Gd grid: expected shape "
            f"{source_t1c.shape}, found {mask_vol.shape}"
        )
    mask = np.asarray(mask_vol.array).astype(bool)
    ts = when or datetime.datetime.now().replace(microsecond=0)
    # an Enhanced MR T1-Gd is one instance: its stand-in, and the mask in its frames' order
    multiframe = multiframe_source(source_t1c, source_series, patient)
    spread = frame_references(source_t1c, source_series)
    if multiframe is not None:
        sources = [multiframe]
        frames = slice_frame_numbers(source_t1c)
        by_frame = np.zeros_like(mask)
        for k, frame in enumerate(frames):
            by_frame[frame - 1] = mask[k]
        mask = by_frame
    else:
        sources = source_slice_datasets(source_t1c, source_series, patient)
    if spread is not None:
        # frames of several multi-frame instances (which highdicom does not take as sources):
        # built from single-frame stand-ins of the slices, whose references then name each
        # slice's instance and frame (_refer_to_frames)
        for k, ds in enumerate(sources):
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = job.uid("seg-source", k)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=prediction.model_name,
        family=codes.DCM.ArtificialIntelligence,
        version=prediction.model_version,
        source=equipment.manufacturer,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=job.uid("tracking", "predicted"),
        tracking_id="Predicted tumour",
        anatomic_regions=[codes.SCT.Brain],
        display_color=_RED,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=job.series_uid("seg"),
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=job.instance_uid("seg"),
        instance_number=1,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=list(equipment.software_versions),  # type: ignore[arg-type]
        device_serial_number=equipment.device_serial_number,
        content_description="Synthetic prediction, research use only",
        content_label="PREDICTION",
        content_creator_name=None,
        omit_empty_frames=False,
        contributing_equipment=[equipment.contributing_equipment(ts)],
        series_description=series_description("SEG", study_version),
        content_qualification=CONTENT_QUALIFICATION,
        specific_character_set="ISO_IR 192",
        content_date=ts.date(),
        content_time=ts.time(),
    )
    _spacing_between_slices(seg, source_t1c)
    if spread is not None:
        _refer_to_frames(seg, {ds.SOPInstanceUID: ref for ds, ref in zip(sources, spread,
                                                                         strict=True)},
                         source_series.sop_class_uid)  # fmt: skip
    finish_output(seg, patient, ts)
    logger.info(
        "built SEG (job %s): %d frames, %d voxels in the predicted tumour",
        job.key[:12],
        int(seg.NumberOfFrames),
        int(mask.sum()),
    )
    return seg


def _spacing_between_slices(seg: hd.seg.Segmentation, grid: Volume) -> None:
    """SpacingBetweenSlices as the source grid has it, to the micrometre (highdicom derives it
    from the frames' positions, with their rounding noise: 2.49999996925833 for 2.5 on an
    oblique grid); left as highdicom wrote it should the two disagree by more than that noise."""
    spacing = round(float(grid.spacing[2]), 6)
    groups = [*seg.get("SharedFunctionalGroupsSequence", []),
              *seg.get("PerFrameFunctionalGroupsSequence", [])]  # fmt: skip
    for group in groups:
        for measures in group.get("PixelMeasuresSequence", []):
            if "SpacingBetweenSlices" not in measures:
                continue
            written = float(measures.SpacingBetweenSlices)
            if abs(written - spacing) < 1e-4:
                measures.SpacingBetweenSlices = spacing
            else:
                measures.SpacingBetweenSlices = round(written, 6)


def _refer_to_frames(
    seg: hd.seg.Segmentation, frames: dict[str, tuple[str, int]], sop_class_uid: str
) -> None:
    """Point the references of a SEG built from stand-ins of the slices (UIDs the keys of
    ``frames``) at the frame each slice is: (SOP Instance UID, frame number) of its multi-frame
    source instance, of class ``sop_class_uid``."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid, frame = frames[str(source.ReferencedSOPInstanceUID)]
                source.ReferencedSOPClassUID = sop_class_uid
                source.ReferencedSOPInstanceUID = uid
                source.ReferencedFrameNumber = frame
    for series in seg.get("ReferencedSeriesSequence", []):
        instances = []
        for uid in dict.fromkeys(uid for uid, _ in frames.values()):
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class_uid
            ref.ReferencedSOPInstanceUID = uid
            instances.append(ref)
        series.ReferencedInstanceSequence = instances
