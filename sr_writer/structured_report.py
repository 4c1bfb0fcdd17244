"""Comprehensive 3D SR with a TID 1500 measurement report of the prediction.

Content (one report per job):

- measurement group "GTV before treatment" (TID 1501): the current tumour volume (from the GTV of
  the source RTSTRUCT);
- measurement group "Predicted tumour" (TID 1411), referencing segment 1 of the output SEG: the
  predicted volume as mean, standard deviation, minimum and maximum over the samples; the relative
  change of the mean against the current volume; the probability of each response category; the
  predicted response category and the survival scenario used for guidance as qualitative
  evaluations; the algorithm identification (model name, version, parameters);
- observer context: the node as a device observer;
- evidence: the source series (T1-Gd, RTSTRUCT, other inputs) and the output series of the job.

The document is COMPLETE and UNVERIFIED: no person has checked it. Concepts that have no standard
code (relative change, response probability, survival scenario) use the private coding scheme
``99GLIOFC``, declared in the CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import ExportError
from dicom_node.types import RESPONSE_CATEGORIES, PatientStudy, Prediction, SeriesRef, Volume

from .labels import (
    CONTENT_QUALIFICATION,
    SERIES_NUMBERS,
    Equipment,
    JobIdentity,
    finish_output,
    series_description,
)
from .references import reference_stubs, source_instances

logger = logging.getLogger(__name__)

LOCAL_SCHEME = "99GLIOFC"

MILLILITER = Code("ml", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
MR_BRAIN = Code("24590-2", "LN", "MR Brain")

RELATIVE_CHANGE = Code("GLF001", LOCAL_SCHEME, "Relative volume change from pre-treatment")
RESPONSE_CATEGORY = Code("GLF002", LOCAL_SCHEME, "Predicted response category")
SURVIVAL_SCENARIO = Code("GLF003", LOCAL_SCHEME, "Survival scenario used for guidance")
UNCONDITIONAL = Code("GLF004", LOCAL_SCHEME, "Unconditional (no survival guidance)")
MARGINAL = Code("GLF005", LOCAL_SCHEME, "Samples across survival classes (class unknown)")

# Response categories (NCI Thesaurus).
RESPONSE_CODES: dict[str, Code] = {
    "complete_response": Code("C4870", "NCIt", "Complete Response"),
    "partial_response": Code("C18058", "NCIt", "Partial Response"),
    "stable_disease": Code("C18213", "NCIt", "Stable Disease"),
    "progressive_disease": Code("C35571", "NCIt", "Progressive Disease"),
}
PROBABILITY_CODES: dict[str, Code] = {
    c: Code(f"GLF1{i}", LOCAL_SCHEME, f"Probability of {RESPONSE_CODES[c].meaning}")
    for i, c in enumerate(RESPONSE_CATEGORIES)
}

CURRENT_TRACKING = "GTV before treatment"
PREDICTED_TRACKING = "Predicted tumour"


@dataclass(frozen=True)
class SrFigures:
    """The numbers written into the report (what a reader must find again)."""

    current_volume_ml: float
    segment_volume_ml: float
    predicted_mean_ml: float
    predicted_sd_ml: float
    predicted_min_ml: float
    predicted_max_ml: float
    relative_change_percent: float | None
    response_category: str
    response_probability_percent: dict[str, float]
    survival_scenario: str
    n_samples: int


def figures_of(prediction: Prediction) -> SrFigures:
    vols = np.asarray(prediction.sample_volumes_ml, dtype=np.float64)
    if vols.size == 0:
        raise ExportError("the prediction has no sample volumes: expected >= 1, found 0")
    if not np.all(np.isfinite(vols)) or np.any(vols < 0):
        raise ExportError(f"sample volumes must be finite and >= 0 ml, found {vols.tolist()}")
    unknown = set(prediction.response_probabilities) - set(RESPONSE_CATEGORIES)
    if unknown:
        raise ExportError(
            f"unknown response categories {sorted(unknown)}; expected {list(RESPONSE_CATEGORIES)}"
        )
    current = float(prediction.current_volume_ml)
    mean = float(vols.mean())
    change = (mean - current) / current * 100.0 if current > 0 else None
    return SrFigures(
        current_volume_ml=current,
        segment_volume_ml=prediction.outlined_volume_ml,
        predicted_mean_ml=mean,
        predicted_sd_ml=float(vols.std(ddof=1)) if vols.size > 1 else 0.0,
        predicted_min_ml=float(vols.min()),
        predicted_max_ml=float(vols.max()),
        relative_change_percent=change,
        response_category=prediction.response_category,
        response_probability_percent={
            c: float(prediction.response_probabilities.get(c, 0.0)) * 100.0
            for c in RESPONSE_CATEGORIES
        },
        survival_scenario=_scenario_text(prediction),
        n_samples=int(vols.size),
    )


def _scenario_text(prediction: Prediction) -> str:
    """``marginal`` with the number of samples of each class (``marginal short:1
    intermediate:2 long:1``), else the class or ``unconditional``."""
    scenario = prediction.survival_scenario
    if scenario != "marginal":
        return scenario
    classes = prediction.sample_classes
    counts = " ".join(f"{c}:{classes.count(c)}" for c in dict.fromkeys(classes) if c is not None)
    return f"{scenario} {counts}"


def _survival_code(prediction: Prediction) -> Code:
    scenario = prediction.survival_scenario
    if scenario == "unconditional":
        return UNCONDITIONAL
    if scenario == "marginal":
        return MARGINAL
    return Code(f"GLF-S-{scenario}"[:16], LOCAL_SCHEME, f"Survival class {scenario}")


def build_structured_report(
    *,
    prediction: Prediction,
    source_t1c: Volume,
    source_series: SeriesRef,
    patient: PatientStudy,
    job: JobIdentity,
    equipment: Equipment,
    seg: Dataset,
    outputs: Sequence[Dataset] = (),
    other_sources: Sequence[SeriesRef] = (),
    when: datetime.datetime | None = None,
    study_version: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of one job.

    ``seg`` is the job's Segmentation (the predicted tumour is its segment 1); ``outputs`` the other
    output objects to list as evidence; ``other_sources`` the other input series (RTSTRUCT with the
    GTV, other contrasts); ``study_version`` goes into the series description
    (:func:`series_description`).
    """
    fig = figures_of(prediction)
    ts = when or datetime.datetime.now().replace(microsecond=0)
    algorithm = hd.sr.AlgorithmIdentification(
        name=prediction.model_name,
        version=prediction.model_version,
        parameters=[f"samples={fig.n_samples}", f"survival scenario={fig.survival_scenario}"],
        manufacturer=equipment.manufacturer,
    )
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=job.uid("device", equipment.manufacturer, equipment.model_label),
                name=equipment.manufacturer,
                manufacturer_name=equipment.manufacturer,
                model_name=equipment.model_label,
            ),
        )
    )
    current = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=job.uid("tracking", "current"), identifier=CURRENT_TRACKING
        ),
        time_point_context=hd.sr.TimePointContext(time_point="pre-treatment"),
        finding_type=codes.SCT.Neoplasm,
        measurements=[
            hd.sr.Measurement(name=codes.SCT.Volume, value=fig.current_volume_ml, unit=MILLILITER)
        ],
    )

    def volume(value: float, derivation: Code) -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=value,
            unit=MILLILITER,
            derivation=derivation,
        )

    # the group's ROI is the SEG's segment: its own volume comes first, with no derivation; the
    # samples' volumes follow as derived statistics. They differ: the segment is where the mean
    # of the samples' tumour probabilities reaches the threshold, so samples that disagree on
    # where the tumour is give a smaller segment (or none) than their mean volume
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=fig.segment_volume_ml, unit=MILLILITER),
        volume(fig.predicted_mean_ml, codes.SCT.Mean),
        volume(fig.predicted_sd_ml, codes.SCT.StandardDeviation),
        volume(fig.predicted_min_ml, codes.SCT.Minimum),
        volume(fig.predicted_max_ml, codes.SCT.Maximum),
    ]
    if fig.relative_change_percent is not None:
        measurements.append(
            hd.sr.Measurement(
                name=RELATIVE_CHANGE,
                value=fig.relative_change_percent,
                unit=PERCENT,
            )
        )
    for c in RESPONSE_CATEGORIES:
        measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY_CODES[c],
                value=fig.response_probability_percent[c],
                unit=PERCENT,
            )
        )
    predicted = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=job.uid("tracking", "predicted"), identifier=PREDICTED_TRACKING
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series.series_instance_uid),
        ),
        time_point_context=hd.sr.TimePointContext(time_point="predicted first post-treatment MRI"),
        finding_type=codes.SCT.Neoplasm,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=RESPONSE_CATEGORY, value=RESPONSE_CODES[fig.response_category]
            ),
            hd.sr.QualitativeEvaluation(name=SURVIVAL_SCENARIO, value=_survival_code(prediction)),
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=MR_BRAIN,
        imaging_measurements=[current, predicted],
    )
    source_slices = source_instances(source_t1c, source_series, patient)
    evidence: list[Dataset] = [*source_slices, seg, *outputs]
    for ref in other_sources:
        evidence.extend(reference_stubs(patient.study_instance_uid, ref))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=job.series_uid("sr"),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=job.instance_uid("sr"),
        instance_number=1,
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=equipment.institution_name,
        contributing_equipment=[equipment.contributing_equipment(ts)],
        series_description=series_description("SR", study_version),
        content_qualification=CONTENT_QUALIFICATION,
        manufacturer_model_name=equipment.model_name,
        software_versions=list(equipment.software_versions),
        specific_character_set="ISO_IR 192",
        content_date=ts.date(),
        content_time=ts.time(),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="glioforecast local concepts",
                responsible_organization="glioforecast",
            )
        ],
    )
    _copy_patient(sr, patient, ts)
    logger.info(
        "built SR (job %s): current %.2f ml, predicted %.2f +- %.2f ml, %s",
        job.key[:12],
        fig.current_volume_ml,
        fig.predicted_mean_ml,
        fig.predicted_sd_ml,
        fig.response_category,
    )
    return sr


def _copy_patient(sr: Dataset, patient: PatientStudy, when: datetime.datetime) -> None:
    """Make sure the study-level attributes match the source study exactly (highdicom copies
    them from the first evidence item, which is a stand-in rebuilt from ``patient``)."""
    if sr.StudyInstanceUID != patient.study_instance_uid:
        raise ExportError(
            f"SR study UID mismatch: expected {patient.study_instance_uid}, "
            f"found {sr.StudyInstanceUID}"
        )
    finish_output(sr, patient, when)


def read_summary(ds: Dataset) -> dict[str, object]:
    """The numbers of a report built by :func:`build_structured_report`, read back with highdicom.

    Returns ``current_ml``, ``segment_ml`` (the volume of the referenced segment, the
    predicted tumour as outlined), ``predicted_mean_ml``, ``predicted_sd_ml``, ``change_percent``,
    ``category`` (the code meaning), ``probabilities`` (category meaning -> percent) and
    ``scenario`` (the meaning of the survival scenario the samples were drawn under).
    """
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ExportError("expected a TID 1500 measurement report, found another template")
    (current,) = report.get_image_measurement_groups()
    (cur_volume,) = current.get_measurements()
    (predicted,) = report.get_volumetric_roi_measurement_groups()
    measurements = predicted.get_measurements()
    volumes = {
        (m.derivation.meaning if m.derivation else None): float(m.value)
        for m in measurements
        if m.name.meaning == "Volume"
    }
    by_name = {m.name.meaning: float(m.value) for m in measurements}
    prefix = "Probability of "
    qualitative = {q.name.meaning: q.value for q in predicted.get_qualitative_evaluations()}
    category = qualitative.get("Predicted response category")
    scenario = qualitative.get(SURVIVAL_SCENARIO.meaning)
    return {
        "current_ml": float(cur_volume.value),
        "segment_ml": volumes.get(None),
        "predicted_mean_ml": volumes.get("Mean"),
        "predicted_sd_ml": volumes.get("Standard Deviation"),
        "change_percent": by_name.get("Relative volume change from pre-treatment"),
        "category": getattr(category, "meaning", None),
        "probabilities": {
            name[len(prefix) :]: value for name, value in by_name.items() if name.startswith(prefix)
        },
        "scenario": getattr(scenario, "meaning", None),
    }
