"""The TID 1500 report, read back with highdicom/pydicom and with dcmtk's dsrdump."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.errors import ExportError
from sr_writer.outputs import OutputOptions, build_outputs
from sr_writer.structured_report import (
    CURRENT_TRACKING,
    RESPONSE_CODES,
    SrFigures,
    figures_of,
)
from tests.conftest import tool
from tests.sr_writer.synthetic_job import default_case, default_outputs, job_inputs


def _sr_dataset() -> Dataset:
    buf = io.BytesIO()
    default_outputs().sr.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def _expected() -> SrFigures:
    return figures_of(default_case().prediction)


#: how close a number read back is to the figure: volumes are written to 0.01 ml, percentages
#: to 0.1 %
ML = {"abs": 0.005 + 1e-9}
PCT = {"abs": 0.05 + 1e-9}


def test_figures_follow_the_prediction() -> None:
    p = default_case().prediction
    fig = _expected()
    vols = sorted(p.sample_volumes_ml)
    assert fig.predicted_mean_ml == pytest.approx(sum(vols) / len(vols))
    assert fig.predicted_min_ml == vols[0] and fig.predicted_max_ml == vols[-1]
    assert fig.relative_change_percent == pytest.approx(
        (fig.predicted_mean_ml - p.current_volume_ml) / p.current_volume_ml * 100
    )
    assert fig.response_category == "partial_response"
    assert fig.response_probability_percent["partial_response"] == pytest.approx(75.0)
    # the outlined tumour: the mask's voxels times the source grid's voxel volume
    mask = p.tumour_mask
    voxels = int(np.count_nonzero(mask.array))
    assert voxels > 0
    assert fig.segment_volume_ml == pytest.approx(voxels * 0.9 * 0.8 * 2.5 / 1000.0)


def test_figures_refuse_a_prediction_without_samples() -> None:
    import dataclasses

    p = dataclasses.replace(default_case().prediction, sample_volumes_ml=())
    with pytest.raises(ExportError, match="expected >= 1, found 0"):
        figures_of(p)


def test_sr_read_back_with_highdicom() -> None:
    ds = _sr_dataset()
    fig = _expected()
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    [current] = report.get_image_measurement_groups()
    assert current.tracking_identifier == CURRENT_TRACKING
    assert current.finding_type is not None and current.finding_type.meaning == "Enhancing Lesion"
    [cur_volume] = current.get_measurements()
    assert cur_volume.name.meaning == "Volume" and cur_volume.unit.value == "ml"
    assert cur_volume.value == pytest.approx(fig.current_volume_ml, **ML)

    [predicted] = report.get_volumetric_roi_measurement_groups()
    assert predicted.tracking_identifier == "Predicted tumour"
    volumes = {
        (m.derivation.meaning if m.derivation else None): m.value
        for m in predicted.get_measurements()
        if m.name.meaning == "Volume"
    }
    assert volumes[None] == pytest.approx(fig.segment_volume_ml, **ML)  # the segment's own
    assert volumes["Mean"] == pytest.approx(fig.predicted_mean_ml, **ML)
    assert volumes["Standard Deviation"] == pytest.approx(fig.predicted_sd_ml, **ML)
    assert volumes["Minimum"] == pytest.approx(fig.predicted_min_ml, **ML)
    assert volumes["Maximum"] == pytest.approx(fig.predicted_max_ml, **ML)
    by_name = {m.name.meaning: m for m in predicted.get_measurements()}
    change = by_name["Change of mean volume from model pre-treatment volume"]
    assert change.unit.value == "%"
    assert change.value == pytest.approx(fig.relative_change_percent, **PCT)
    assert by_name["Probability of Partial Response"].value == pytest.approx(75.0)
    assert by_name["Probability of Stable Disease"].value == pytest.approx(25.0)

    qual: dict[str, Any] = {
        q.name.meaning: q.value for q in predicted.get_qualitative_evaluations()
    }
    assert qual["Predicted response category"].value == RESPONSE_CODES["partial_response"].value
    assert qual["Survival scenario used for guidance"].meaning == "Survival class long"

    texts = _texts(predicted[0])
    assert texts["Algorithm Name"] == ["glioforecast-ldm-demo"]
    assert texts["Algorithm Version"] == ["0.1.0"]
    assert "samples=4" in texts["Algorithm Parameters"]

    seg = default_outputs().seg
    ref = predicted.referenced_segment
    assert ref is not None
    assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == 1


@pytest.mark.parametrize(
    ("survival_class", "sample_classes", "meaning", "parameter"),
    [
        (
            None,
            ("short", "intermediate", "intermediate", "long"),
            "Samples across survival classes (class unknown)",
            "survival scenario=marginal short:1 intermediate:2 long:1",
        ),
        (
            None,
            (None,) * 4,
            "Unconditional (no survival guidance)",
            "survival scenario=unconditional",
        ),
        (None, (), "Unconditional (no survival guidance)", "survival scenario=unconditional"),
    ],
)
def test_sr_states_how_the_samples_were_guided(
    survival_class: str | None,
    sample_classes: tuple[str | None, ...],
    meaning: str,
    parameter: str,
) -> None:
    """A reader must see whether the samples came from one class, none, or all of them."""
    import dataclasses

    case = default_case()
    prediction = dataclasses.replace(
        case.prediction, survival_class=survival_class, sample_classes=sample_classes
    )
    sr = build_outputs(prediction, job_inputs(case), OutputOptions(node_version="0.1.0")).sr
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    report = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(buf.getvalue()))).content
    [predicted] = report.get_volumetric_roi_measurement_groups()
    qual = {q.name.meaning: q.value for q in predicted.get_qualitative_evaluations()}
    assert qual["Survival scenario used for guidance"].meaning == meaning
    assert parameter in _texts(predicted[0])["Algorithm Parameters"]


def _texts(item: Dataset) -> dict[str, list[str]]:
    """TEXT content items below ``item``, by concept name."""
    found: dict[str, list[str]] = {}
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            name = child.ConceptNameCodeSequence[0].CodeMeaning
            found.setdefault(name, []).append(child.TextValue)
        for k, v in _texts(child).items():
            found.setdefault(k, []).extend(v)
    return found


def test_sr_references_source_and_output_series() -> None:
    ds = _sr_dataset()
    out = default_outputs()
    case = default_case()
    referenced: dict[str, set[str]] = {}
    for study in ds.CurrentRequestedProcedureEvidenceSequence:
        assert study.StudyInstanceUID == case.patient.study_instance_uid
        for series in study.ReferencedSeriesSequence:
            referenced[series.SeriesInstanceUID] = {
                i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence
            }
    assert referenced[case.t1c_series.series_instance_uid] == set(case.t1c_series.sop_instance_uids)
    assert case.rtstruct_series.series_instance_uid in referenced
    for obj in (*out.sc, *out.uncertainty_sc, out.seg, out.rtstruct, *out.derived_mr):
        assert obj.SOPInstanceUID in referenced[obj.SeriesInstanceUID]


def test_sr_lists_a_series_of_the_planning_study_under_that_study() -> None:
    """A structure set linked from the planning study is listed as evidence under its own
    study, where a viewer following the evidence finds it (it was listed under the MR study)."""
    case = default_case()
    planning_study = "1.2.826.0.1.3680043.10.1482.2.1"
    linked = dataclasses.replace(case.rtstruct_series, study_instance_uid=planning_study)
    inputs = dataclasses.replace(job_inputs(case), other_series=(linked,))
    sr = build_outputs(case.prediction, inputs, OutputOptions(node_version="0.1.0")).sr
    where: dict[str, str] = {}
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.ReferencedSeriesSequence:
                where[series.SeriesInstanceUID] = study.StudyInstanceUID
    assert where[linked.series_instance_uid] == planning_study
    assert where[case.t1c_series.series_instance_uid] == case.patient.study_instance_uid


_NUM = re.compile(r'<contains NUM:\(,,"(?P<name>[^"]+)"\)="(?P<value>[^"]+)" \((?P<unit>[^,]+),')
_DERIV = re.compile(r'<has concept mod CODE:\(,,"Derivation"\)=\([^,]+,[^,]+,"(?P<d>[^"]+)"\)>')
_CODE = re.compile(
    r'<contains CODE:\(,,"(?P<name>[^"]+)"\)=\((?P<value>[^,]+),[^,]+,"(?P<m>[^"]+)"\)>'
)


def parse_dsrdump(text: str) -> tuple[list[tuple[str, float, str, str | None]], dict[str, str]]:
    """NUM items as (name, value, unit, derivation) in document order, CODE items by name."""
    nums: list[tuple[str, float, str, str | None]] = []
    codes: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if m := _NUM.match(s):
            nums.append((m["name"], float(m["value"]), m["unit"], None))
        elif (m := _DERIV.match(s)) and nums:
            name, value, unit, _ = nums[-1]
            nums[-1] = (name, value, unit, m["d"])
        elif m := _CODE.match(s):
            codes[m["name"]] = m["m"]
    return nums, codes


def test_sr_read_back_with_dsrdump(tmp_path: Path) -> None:
    dsrdump = tool("dsrdump")
    path = tmp_path / "sr.dcm"
    default_outputs().sr.save_as(path, enforce_file_format=True)
    proc = subprocess.run([dsrdump, "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Comprehensive 3D SR" in text
    assert re.search(r"Verification Flag\s*:\s*UNVERIFIED", text)
    assert "Lefèvre^Zoë" in text
    nums, codes = parse_dsrdump(text)
    fig = _expected()
    volumes = {d: v for name, v, unit, d in nums if name == "Volume" and unit == "ml" and d}
    # two volumes without a derivation, in the order written: the model's pre-treatment
    # volume, then the segment's
    underived = [v for name, v, unit, d in nums if name == "Volume" and unit == "ml" and not d]
    # dsrdump prints the decimal string as stored: to 0.01 ml
    assert underived == [
        pytest.approx(fig.current_volume_ml, **ML),
        pytest.approx(fig.segment_volume_ml, **ML),
    ]
    assert volumes["Mean"] == pytest.approx(fig.predicted_mean_ml, **ML)
    assert volumes["Standard Deviation"] == pytest.approx(fig.predicted_sd_ml, **ML)
    assert volumes["Minimum"] == pytest.approx(fig.predicted_min_ml, **ML)
    assert volumes["Maximum"] == pytest.approx(fig.predicted_max_ml, **ML)
    other = {name: v for name, v, unit, _ in nums if unit == "%"}
    assert other["Change of mean volume from model pre-treatment volume"] == pytest.approx(
        fig.relative_change_percent, **PCT
    )
    for category, pct in fig.response_probability_percent.items():
        label = f"Probability of {RESPONSE_CODES[category].meaning}"
        assert other[label] == pytest.approx(pct, **PCT)
    assert codes["Predicted response category"] == "Partial Response"
    assert codes["Survival scenario used for guidance"] == "Survival class long"


def test_read_summary_gives_back_the_numbers_written() -> None:
    from sr_writer.structured_report import read_summary

    fig = _expected()
    numbers = read_summary(_sr_dataset())
    assert numbers["current_ml"] == pytest.approx(fig.current_volume_ml, **ML)
    assert numbers["current_label"] == CURRENT_TRACKING
    assert numbers["gtv_ml"] is None  # not given
    assert numbers["segment_ml"] == pytest.approx(fig.segment_volume_ml, **ML)
    assert numbers["predicted_mean_ml"] == pytest.approx(fig.predicted_mean_ml, **ML)
    assert numbers["predicted_sd_ml"] == pytest.approx(fig.predicted_sd_ml, **ML)
    assert numbers["change_percent"] == pytest.approx(fig.relative_change_percent, **PCT)
    assert numbers["category"] == "Partial Response"
    assert numbers["probabilities"] == {
        "Complete Response": 0.0,
        "Partial Response": pytest.approx(75.0),
        "Stable Disease": pytest.approx(25.0),
        "Progressive Disease": 0.0,
    }
    assert numbers["scenario"] == "Survival class long"
