"""DICOM Segmentation of the predicted tumour, on the pre-treatment T1-Gd frame of reference.

A BINARY segmentation with one segment, "Predicted tumour", whose frames follow the source
slices (empty frames are kept, so that a planning system finds one frame per source slice).
"""

from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

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
from .references import multiframe_source, slice_frame_numbers, source_slice_datasets

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
) -> hd.seg.Segmentation:
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
    if multiframe is not None:
        sources = [multiframe]
        frames = slice_frame_numbers(source_t1c)
        by_frame = np.zeros_like(mask)
        for k, frame in enumerate(frames):
            by_frame[frame - 1] = mask[k]
        mask = by_frame
    else:
        sources = source_slice_datasets(source_t1c, source_series, patient)
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
        series_description=series_description("SEG"),
        content_qualification=CONTENT_QUALIFICATION,
        specific_character_set="ISO_IR 192",
        content_date=ts.date(),
        content_time=ts.time(),
    )
    finish_output(seg, patient, ts)
    logger.info(
        "built SEG (job %s): %d frames, %d voxels in the predicted tumour",
        job.key[:12],
        int(seg.NumberOfFrames),
        int(mask.sum()),
    )
    return seg
