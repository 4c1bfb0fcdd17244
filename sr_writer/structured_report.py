"""Comprehensive 3D SR with a TID 1500 measurement report of the prediction.

Content (one report per job):

- measurement group "Enhancing tumour before treatment, measured by the model" (TID 1501;
  finding type NCIt "Enhancing Lesion", method 99GLIOFC GLF006, the model's algorithm
  identification): the pre-treatment volume the relative change and the response category are
  computed from. By default the model measures it itself on the pre-treatment T1-Gd, the same
  way as the predicted volume (``current_from="model"`` of ``inference.model_predictor``):
  roughly the enhancing tumour, not the GTV. When the current volume is the GTV's
  (``current_from="mask"``), the group is "GTV before treatment" (method GLF007) instead;
- measurement group "GTV of the source structure set" (TID 1501, method GLF007), when the GTV's
  volume is known and is not already the current volume: the GTV as contoured, for comparison;
- measurement group "Predicted tumour" (TID 1411), referencing segment 1 of the output SEG: the
  volume outlined (the segment, where the samples agree: method GLF009), then the predicted
  volume as mean, standard deviation, minimum and maximum over the samples; the relative
  change of the mean against the pre-treatment volume of the first group; the probability of
  each response category; the predicted response category and the survival scenario used for
  guidance as qualitative evaluations; the algorithm identification (model name, version,
  parameters);
- qualitative evaluations of the report (TID 1500 rows 12 and 14): the statement that the
  report is a synthetic prediction for research use only, not for clinical use, as text a
  reader sees in the rendered report;
- observer context: the node as a device observer;
- evidence: the source series (T1-Gd, RTSTRUCT, other inputs) and the output series of the job.

Numbers are written as decimal strings to a reader's precision: volumes to 0.01 ml
(:data:`VOLUME_DECIMALS`), percentages to 0.1 % (:data:`PERCENT_DECIMALS`); no Floating Point
Value with more digits goes beside them.

The document is COMPLETE and UNVERIFIED: no person has checked it. Concepts that have no standard
code (relative change, response probability, survival scenario, how a volume was measured) use
the private coding scheme ``99GLIOFC``, declared in the CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import ContainerContentItem, RelationshipTypeValues, TextContentItem
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DSfloat

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

#: the relative change when the pre-treatment volume is the GTV's (``current_from="mask"``)
RELATIVE_CHANGE = Code("GLF001", LOCAL_SCHEME, "Relative volume change from pre-treatment")
RESPONSE_CATEGORY = Code("GLF002", LOCAL_SCHEME, "Predicted response category")
SURVIVAL_SCENARIO = Code("GLF003", LOCAL_SCHEME, "Survival scenario used for guidance")
UNCONDITIONAL = Code("GLF004", LOCAL_SCHEME, "Unconditional (no survival guidance)")
MARGINAL = Code("GLF005", LOCAL_SCHEME, "Samples across survival classes (class unknown)")
#: measurement methods: how each volume was measured
MODEL_READING = Code("GLF006", LOCAL_SCHEME, "Measured by the model on the pre-treatment T1-Gd")
GTV_CONTOURED = Code("GLF007", LOCAL_SCHEME, "GTV as contoured in the source RT structure set")
#: the relative change when the pre-treatment volume is the model's (``current_from="model"``)
RELATIVE_CHANGE_FROM_MODEL = Code(
    "GLF008", LOCAL_SCHEME, "Change of mean volume from model pre-treatment volume"
)
OUTLINED = Code("GLF009", LOCAL_SCHEME, "Outlined where the samples agree (the segment)")
INTENDED_USE = Code("GLF020", LOCAL_SCHEME, "Intended use")
#: TID 1500 row 12: the report's own qualitative evaluations
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
ENHANCING_LESION = Code("C113842", "NCIt", "Enhancing Lesion")

#: what the report says, in its body, of what it is
RESEARCH_STATEMENT = (
    "Synthetic prediction, research use only, not for clinical use: every volume, change and "
    "category in this report was computed by the model {model}; no person has checked them."
)

#: the precision of the numbers written: volumes to 0.01 ml, percentages to 0.1 %
VOLUME_DECIMALS = 2
PERCENT_DECIMALS = 1

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

#: the pre-treatment group, as the model measures it (default) or as the GTV's
CURRENT_TRACKING = "Enhancing tumour pre-treatment (model)"
CURRENT_GTV_TRACKING = "GTV before treatment"
GTV_TRACKING = "GTV of the source structure set"
PREDICTED_TRACKING = "Predicted tumour"

CurrentFrom = Literal["model", "mask"]


def current_source(prediction: Prediction) -> CurrentFrom:
    """What ``prediction.current_volume_ml`` is: the prediction's ``current_from`` when it says,
    else ``"model"`` (``inference.model_predictor`` measures it itself by default)."""
    return prediction.current_from or "model"


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


def _decimal(value: float, decimals: int) -> str:
    """``value`` as a decimal string with ``decimals`` digits after the point (``-0.0`` as
    ``0.0``); a value too large for the 16 characters of a DS to that precision keeps as many
    significant digits as fit."""
    text = f"{value:.{decimals}f}"
    if float(text) == 0.0:
        text = f"{0.0:.{decimals}f}"
    if len(text) > 16:
        text = str(DSfloat(value, auto_format=True))
    return text


def _measurement(
    name: Code, value: float, unit: Code, decimals: int, **kwargs: object
) -> hd.sr.Measurement:
    """A TID 300 measurement whose Numeric Value is ``value`` to ``decimals`` digits, and
    nothing more precise beside it (highdicom adds the full float as Floating Point Value,
    which PS3.3 C.18.1 requires only when the decimal string cannot hold the value)."""
    text = _decimal(value, decimals)
    measurement = hd.sr.Measurement(name=name, value=float(text), unit=unit, **kwargs)  # type: ignore[arg-type]
    measured = measurement[0].MeasuredValueSequence[0]
    measured.NumericValue = text
    if "FloatingPointValue" in measured:
        del measured.FloatingPointValue
    return measurement


def _volume(value: float, **kwargs: object) -> hd.sr.Measurement:
    return _measurement(codes.SCT.Volume, value, MILLILITER, VOLUME_DECIMALS, **kwargs)


def _percent(name: Code, value: float) -> hd.sr.Measurement:
    return _measurement(name, value, PERCENT, PERCENT_DECIMALS)


def _research_statement(model_label: str) -> ContainerContentItem:
    """TID 1500 row 12 (Qualitative Evaluations) with one TEXT item (row 14): what the report
    is, where a reader of the rendered report sees it."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = DicomSequence(
        [
            TextContentItem(
                name=INTENDED_USE,
                value=RESEARCH_STATEMENT.format(model=model_label),
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


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
    current_from: CurrentFrom | None = None,
    gtv_volume_ml: float | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of one job.

    ``seg`` is the job's Segmentation (the predicted tumour is its segment 1); ``outputs`` the other
    output objects to list as evidence; ``other_sources`` the other input series (RTSTRUCT with the
    GTV, other contrasts); ``study_version`` goes into the series description
    (:func:`series_description`). ``current_from``: what ``prediction.current_volume_ml`` is,
    the model's own measurement on the pre-treatment T1-Gd (``"model"``, the node's default,
    roughly the enhancing tumour) or the GTV's volume (``"mask"``); the pre-treatment group is
    labelled accordingly (None: :func:`current_source`). ``gtv_volume_ml``: the volume of the
    GTV of the source structure set, when known; when the current volume is the model's it is
    reported in a group of its own.
    """
    if current_from is None:
        current_from = current_source(prediction)
    if current_from not in ("model", "mask"):
        raise ExportError(f"current_from: expected 'model' or 'mask', found {current_from!r}")
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
    pre_treatment = hd.sr.TimePointContext(time_point="pre-treatment")
    by_model = current_from == "model"
    current = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=job.uid("tracking", "current"),
            identifier=CURRENT_TRACKING if by_model else CURRENT_GTV_TRACKING,
        ),
        time_point_context=pre_treatment,
        finding_type=ENHANCING_LESION if by_model else codes.SCT.Neoplasm,
        method=MODEL_READING if by_model else GTV_CONTOURED,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=prediction.model_name, version=prediction.model_version
        )
        if by_model
        else None,
        measurements=[_volume(fig.current_volume_ml)],
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    if by_model and gtv_volume_ml is not None:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=job.uid("tracking", "gtv"), identifier=GTV_TRACKING
                ),
                time_point_context=pre_treatment,
                finding_type=codes.SCT.Neoplasm,
                method=GTV_CONTOURED,
                measurements=[_volume(gtv_volume_ml)],
            )
        )
    groups.append(current)

    # the group's ROI is the SEG's segment: its own volume comes first, its method saying what
    # it is; the samples' volumes follow as derived statistics. They differ: the segment is
    # where the mean of the samples' tumour probabilities reaches the threshold, so samples
    # that disagree on where the tumour is give a smaller segment (or none) than their mean
    measurements = [
        _volume(fig.segment_volume_ml, method=OUTLINED),
        _volume(fig.predicted_mean_ml, derivation=codes.SCT.Mean),
        _volume(fig.predicted_sd_ml, derivation=codes.SCT.StandardDeviation),
        _volume(fig.predicted_min_ml, derivation=codes.SCT.Minimum),
        _volume(fig.predicted_max_ml, derivation=codes.SCT.Maximum),
    ]
    if fig.relative_change_percent is not None:
        measurements.append(
            _percent(
                RELATIVE_CHANGE_FROM_MODEL if by_model else RELATIVE_CHANGE,
                fig.relative_change_percent,
            )
        )
    for c in RESPONSE_CATEGORIES:
        measurements.append(_percent(PROBABILITY_CODES[c], fig.response_probability_percent[c]))
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
    groups.append(predicted)
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=MR_BRAIN,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_research_statement(equipment.model_label))
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

    Returns ``current_ml`` (the pre-treatment volume the change is computed from),
    ``current_label`` (what it is: the tracking identifier of its group), ``gtv_ml`` (the GTV of
    the source structure set when the report gives it apart, else None), ``segment_ml`` (the
    volume of the referenced segment, the predicted tumour as outlined), ``predicted_mean_ml``,
    ``predicted_sd_ml``, ``change_percent``, ``category`` (the code meaning), ``probabilities``
    (category meaning -> percent) and ``scenario`` (the meaning of the survival scenario the
    samples were drawn under).
    """
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ExportError("expected a TID 1500 measurement report, found another template")
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    gtv = groups.pop(GTV_TRACKING, None)
    ((current_label, current),) = groups.items()
    (cur_volume,) = current.get_measurements()
    (predicted,) = report.get_volumetric_roi_measurement_groups()
    measurements = predicted.get_measurements()
    volumes = {
        (m.derivation.meaning if m.derivation else None): float(m.value)
        for m in measurements
        if m.name.meaning == "Volume"
    }
    by_name = {m.name.meaning: float(m.value) for m in measurements}
    changes = {RELATIVE_CHANGE.value, RELATIVE_CHANGE_FROM_MODEL.value}
    change = [float(m.value) for m in measurements if m.name.value in changes]
    prefix = "Probability of "
    qualitative = {q.name.meaning: q.value for q in predicted.get_qualitative_evaluations()}
    category = qualitative.get("Predicted response category")
    scenario = qualitative.get(SURVIVAL_SCENARIO.meaning)
    return {
        "current_ml": float(cur_volume.value),
        "current_label": current_label,
        "gtv_ml": float(gtv.get_measurements()[0].value) if gtv is not None else None,
        "segment_ml": volumes.get(None),
        "predicted_mean_ml": volumes.get("Mean"),
        "predicted_sd_ml": volumes.get("Standard Deviation"),
        "change_percent": change[0] if change else None,
        "category": getattr(category, "meaning", None),
        "probabilities": {
            name[len(prefix) :]: value for name, value in by_name.items() if name.startswith(prefix)
        },
        "scenario": getattr(scenario, "meaning", None),
    }
