"""All output objects of one job, built together so that they reference each other.

Order of construction: Secondary Capture (prediction, then optional uncertainty), SEG, RTSTRUCT,
optional derived MR, and last the SR, which references segment 1 of the SEG and lists every other
output and every input series as evidence. UIDs come from :class:`~sr_writer.labels.JobIdentity`,
so building the same job again gives the same objects.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import ExportError
from dicom_node.types import (
    OUTPUT_KINDS,
    FrameMapping,
    PatientStudy,
    Prediction,
    SeriesRef,
    Volume,
)

from .derived_mr import build_derived_mr
from .labels import (
    SERIES_NUMBERS,
    Equipment,
    JobIdentity,
    LossyHistory,
    apply_labels,
    mark_lossy,
    series_description,
)
from .rtstruct import RoiMask, build_rtstruct, mask_on_planes, move_to_frame
from .secondary_capture import Window, build_secondary_capture
from .segmentation import build_segmentation
from .structured_report import build_structured_report

logger = logging.getLogger(__name__)

PREDICTED_ROI_NAME = "PRED_TUMOUR"
PREDICTED_ROI_COLOR = (255, 0, 0)
#: what the RTSTRUCTs' StructureSetDescription says of an empty predicted tumour: the samples
#: draw tumour (the SR's mean volume) but the outlined volume, where they agree, is nothing
NOTHING_OUTLINED = "no voxel outlined: the samples agree on no tumour"


@dataclass(frozen=True)
class JobInputs:
    """The source study as the pipeline knows it.

    ``t1c`` is the source T1-Gd grid (the prediction lies on it), ``t1c_series`` its series;
    ``other_series`` are the other inputs the prediction used (the RTSTRUCT with the GTV, other
    contrasts, the RTDOSE). ``window`` is the source's display window when it had one;
    ``lossy`` what lossy compression the source images went through.
    ``planning_frame``: the frame the GTV was drawn on when it is not the T1-Gd's (the planning
    CT's); the predicted tumour is then also written as an RTSTRUCT on that frame.
    ``study_version``: the job version of the study (1, then one more each time a late instance
    reopened it); the series descriptions of versions 2 and up say it (``... - SEG v2``).
    ``t1c_instance_numbers``: the source T1-Gd's InstanceNumber by SOP Instance UID, which the
    images derived slice by slice take (a viewer pairs a Secondary Capture with the source by
    it); ``gtv_volume_ml``: the volume of the GTV the structure set outlines, which the SR
    reports beside the model's own pre-treatment measurement.
    """

    patient: PatientStudy
    t1c: Volume
    t1c_series: SeriesRef
    other_series: tuple[SeriesRef, ...] = ()
    window: Window | None = None
    planning_frame: FrameMapping | None = None
    #: the lossy compression the source images went through (None: none), which the images
    #: derived from them carry on
    lossy: LossyHistory | None = None
    study_version: int = 1
    t1c_instance_numbers: Mapping[str, int] = field(default_factory=dict)
    gtv_volume_ml: float | None = None

    @property
    def input_instance_uids(self) -> tuple[str, ...]:
        uids = list(self.t1c_series.sop_instance_uids)
        for s in self.other_series:
            uids.extend(s.sop_instance_uids)
        return tuple(uids)


@dataclass(frozen=True)
class OutputOptions:
    node_version: str = "0"
    uncertainty_sc: bool = True
    derived_mr: bool = False
    institution_name: str | None = None
    station_name: str | None = None


@dataclass(frozen=True)
class JobOutputs:
    job: JobIdentity
    sc: tuple[Dataset, ...]
    uncertainty_sc: tuple[Dataset, ...]
    seg: Dataset
    rtstruct: Dataset
    sr: Dataset
    derived_mr: tuple[Dataset, ...] = field(default=())
    rtstruct_planning: Dataset | None = None

    def by_kind(self) -> dict[str, list[Dataset]]:
        """The objects of each kind of :data:`~sr_writer.labels.OUTPUT_KINDS` (a kind not made
        for this job has an empty list)."""
        planning = [self.rtstruct_planning] if self.rtstruct_planning is not None else []
        return {
            "sc": list(self.sc),
            "uncertainty_sc": list(self.uncertainty_sc),
            "derived_mr": list(self.derived_mr),
            "seg": [self.seg],
            "rtstruct": [self.rtstruct],
            "rtstruct_planning": planning,
            "sr": [self.sr],
        }

    def all(self) -> list[Dataset]:
        """Every object, images first and the SR last (the order they are sent in)."""
        kinds = self.by_kind()
        return [ds for kind in OUTPUT_KINDS for ds in kinds[kind]]

    def series_counts(self) -> dict[str, int]:
        """Number of instances per output series UID."""
        counts: dict[str, int] = {}
        for ds in self.all():
            counts[ds.SeriesInstanceUID] = counts.get(ds.SeriesInstanceUID, 0) + 1
        return counts


def job_identity(prediction: Prediction, inputs: JobInputs) -> JobIdentity:
    return JobIdentity(
        study_instance_uid=inputs.patient.study_instance_uid,
        input_instance_uids=inputs.input_instance_uids,
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        patient_id=inputs.patient.patient_id,
        issuer_of_patient_id=inputs.patient.issuer_of_patient_id,
    )


def build_outputs(
    prediction: Prediction,
    inputs: JobInputs,
    options: OutputOptions | None = None,
    *,
    when: datetime.datetime | None = None,
) -> JobOutputs:
    """Build every output object of one job. Raises :class:`ExportError` with the reason."""
    opts = options or OutputOptions()
    if inputs.t1c.frame_of_reference_uid != prediction.tumour_mask.frame_of_reference_uid:
        raise ExportError(
            f"the prediction must be on the source T1-Gd frame of reference: expected "
            f"{inputs.t1c.frame_of_reference_uid}, found "
            f"{prediction.tumour_mask.frame_of_reference_uid}"
        )
    ts = when or datetime.datetime.now().replace(microsecond=0)
    job = job_identity(prediction, inputs)
    equipment = Equipment(
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        node_version=opts.node_version,
        institution_name=opts.institution_name,
        station_name=opts.station_name,
    )
    common = {
        "prediction": prediction,
        "source_t1c": inputs.t1c,
        "source_series": inputs.t1c_series,
        "patient": inputs.patient,
        "job": job,
        "equipment": equipment,
        "when": ts,
        "study_version": inputs.study_version,
    }
    numbers = {"source_instance_numbers": inputs.t1c_instance_numbers}
    sc = build_secondary_capture(**common, **numbers, window=inputs.window)  # type: ignore[arg-type]
    unc: list[Dataset] = []
    if opts.uncertainty_sc:
        unc = list(build_secondary_capture(**common, **numbers, uncertainty=True))  # type: ignore[arg-type]
    seg = build_segmentation(**common)  # type: ignore[arg-type]
    rt = build_prediction_rtstruct(
        prediction=prediction, inputs=inputs, job=job, equipment=equipment, when=ts
    )
    rt_planning = None
    if inputs.planning_frame is not None:
        rt_planning = build_prediction_rtstruct(
            prediction=prediction, inputs=inputs, job=job, equipment=equipment, when=ts,
            frame=inputs.planning_frame,
        )  # fmt: skip
    mr: list[Dataset] = []
    if opts.derived_mr:
        mr = build_derived_mr(**common, **numbers, window=inputs.window)  # type: ignore[arg-type]
    sr = build_structured_report(
        **common,  # type: ignore[arg-type]
        seg=seg,
        outputs=[*sc, *unc, *mr, rt, *([rt_planning] if rt_planning is not None else [])],
        other_sources=inputs.other_series,
        gtv_volume_ml=inputs.gtv_volume_ml,
    )
    for image in [*sc, *unc, *mr, seg]:  # pixels derived from the source images
        mark_lossy(image, inputs.lossy)
    out = JobOutputs(
        job=job,
        sc=tuple(sc),
        uncertainty_sc=tuple(unc),
        seg=seg,
        rtstruct=rt,
        sr=sr,
        derived_mr=tuple(mr),
        rtstruct_planning=rt_planning,
    )
    check_same_study(out.all(), inputs.patient.study_instance_uid)
    logger.info(
        "built %d output objects in %d series (job %s)",
        len(out.all()),
        len(out.series_counts()),
        job.key[:12],
    )
    return out


def build_prediction_rtstruct(
    *,
    prediction: Prediction,
    inputs: JobInputs,
    job: JobIdentity,
    equipment: Equipment,
    when: datetime.datetime | None = None,
    frame: FrameMapping | None = None,
) -> Dataset:
    """RTSTRUCT of the predicted tumour on the pre-treatment frame of reference or, with
    ``frame``, on that frame (the planning CT's, for a planning system to import onto the plan;
    its own series). On that frame the mask is placed by the frame's matrix and contoured on the
    planes the GTV's structure set was drawn on (``frame.planes``: the planning CT's slices,
    :func:`~sr_writer.rtstruct.mask_on_planes`), with no image reference (the node does not have
    the CT); when those planes are not known, the MR-frame contours are mapped by the matrix
    (:func:`~sr_writer.rtstruct.move_to_frame`: each on a plane tilted against the CT's). Its
    series description carries ``inputs.study_version``
    (:func:`~sr_writer.labels.series_description`); when the prediction outlines no voxel, its
    StructureSetDescription says so (:data:`NOTHING_OUTLINED`).

    Written by the shared :func:`sr_writer.rtstruct.build_rtstruct`; the labelling attributes
    (ContentQualification, ContributingEquipmentSequence) are added here.
    """
    kind = "rtstruct" if frame is None else "rtstruct-planning"
    # "... - RTSTRUCT PLAN FRAME" is 62 characters, the longest description: a version suffix
    # would pass the 64 of an LO, so the later versions name it "RTSTRUCT PLAN"
    what = "RTSTRUCT"
    if frame is not None:
        what = "RTSTRUCT PLAN FRAME" if inputs.study_version == 1 else "RTSTRUCT PLAN"
    ts = when or datetime.datetime.now().replace(microsecond=0)
    mask = prediction.tumour_mask
    grid = inputs.t1c
    if mask.shape != grid.shape:
        raise ExportError(
            f"the predicted tumour mask must be on the source T1-Gd grid: expected shape "
            f"{grid.shape}, found {mask.shape}"
        )
    if tuple(grid.source_instance_uids) != tuple(mask.source_instance_uids):
        mask = grid.with_array(mask.array)
    reference: SeriesRef | None = inputs.t1c_series
    on_planes = frame is not None and frame.planes is not None
    if frame is not None and frame.planes is not None:
        mask = mask_on_planes(mask, frame.matrix, frame.planes, frame.frame_of_reference_uid)
        grid, reference = mask, None
    ds = build_rtstruct(
        rois=[
            RoiMask(
                name=PREDICTED_ROI_NAME,
                mask=mask,
                color=PREDICTED_ROI_COLOR,
                interpreted_type="",
            )
        ],
        reference_grid=grid,
        reference_series=reference,
        patient=inputs.patient,
        series_instance_uid=job.series_uid(kind),
        sop_instance_uid=job.instance_uid(kind),
        series_description=series_description(what, inputs.study_version),
        series_number=SERIES_NUMBERS[kind],
        structure_set_label="PREDICTION",
        manufacturer=equipment.manufacturer,
        software_versions="\\".join(equipment.software_versions),
        content_datetime=ts,
        manufacturer_model_name=equipment.model_name,
        roi_generation_algorithm="AUTOMATIC",
    )
    description = "Predicted post-treatment tumour; synthetic, research use only"
    if not np.any(prediction.tumour_mask.array):
        description += f"; {NOTHING_OUTLINED}"
    if frame is not None and not on_planes:
        move_to_frame(ds, frame.matrix, frame.frame_of_reference_uid)
    if frame is not None:
        description += "; on the planning frame of reference"
    ds.StructureSetDescription = description
    apply_labels(ds, equipment, ts)
    return ds


def check_same_study(datasets: Sequence[Dataset], study_instance_uid: str) -> None:
    for ds in datasets:
        if ds.StudyInstanceUID != study_instance_uid:
            raise ExportError(
                f"output {ds.SOPInstanceUID} is in study {ds.StudyInstanceUID}, expected "
                f"{study_instance_uid}"
            )
