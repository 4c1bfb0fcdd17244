"""Every output object type passes dciodvfy (dicom3tools) with no error."""

from __future__ import annotations

import copy
import dataclasses
import functools
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.types import FrameMapping, PlaneLattice
from inference.synthetic.planning_frame import rotation_about
from sr_writer.notice import build_failure_notice
from sr_writer.outputs import JobOutputs, OutputOptions, build_outputs
from sr_writer.rejection import Rejected, build_rejection_note
from tests.sr_writer.synthetic_job import (
    default_case,
    default_notice,
    default_outputs,
    job_inputs,
    make_case,
)
from tests.sr_writer.test_secondary_capture import oblique_outputs
from tests.sr_writer.test_study_version import results_of_version


@functools.cache
def _on_planning_ct() -> Dataset:
    """The RTSTRUCT on a planning frame 10 degrees away, contoured on its CT's slices (a GTV
    drawn on them gave the planes)."""
    case = default_case()
    to_plan = np.eye(4)
    to_plan[:3, :3] = rotation_about([1.0, 0.5, 0.33], 10.0)
    to_plan[:3, 3] = (12.0, -3.0, 40.0)
    planes = PlaneLattice(normal=(0.0, 0.0, 1.0), position=0.7, step=2.5)
    frame = FrameMapping("1.2.826.0.1.3680043.8.498.7", to_plan, planes=planes)
    inputs = dataclasses.replace(job_inputs(case), planning_frame=frame)
    out = build_outputs(case.prediction, inputs, OutputOptions(node_version="0.1.0"))
    assert out.rtstruct_planning is not None
    return out.rtstruct_planning


@functools.cache
def _enhanced(instances: int = 1) -> JobOutputs:
    case = make_case(enhanced=True, instances=instances)
    return build_outputs(case.prediction, job_inputs(case), OutputOptions(node_version="0.1.0"))


def _objects() -> dict[str, Dataset]:
    out = default_outputs()
    # the results of a study's version 99999: the longest descriptions a version gives (the
    # uncertainty SC's is 64 characters, the most an LO holds)
    later = {int(ds.SeriesNumber): ds for ds in results_of_version(99999)}
    notice_sc, notice_sr = build_failure_notice(default_notice(), default_case().patient, "0.1.0")
    return {
        "secondary capture": out.sc[len(out.sc) // 2],
        "uncertainty secondary capture": out.uncertainty_sc[0],
        "oblique secondary capture": oblique_outputs().sc[0],
        "oblique segmentation": oblique_outputs().seg,
        "segmentation of an enhanced mr": _enhanced().seg,
        "secondary capture of an enhanced mr": _enhanced().sc[0],
        "rtstruct of an enhanced mr": _enhanced().rtstruct,
        "segmentation of an enhanced mr in two instances": _enhanced(2).seg,
        "structured report of an enhanced mr in two instances": _enhanced(2).sr,
        "segmentation": out.seg,
        "rtstruct": out.rtstruct,
        "structured report": out.sr,
        "derived mr": out.derived_mr[-1],
        "failure notice secondary capture": notice_sc,
        "failure notice structured report": notice_sr,
        "uncertainty secondary capture of study version 99999": later[9002],
        "structured report of study version 99999": later[9003],
        "rtstruct on the planning frame of study version 99999": later[9007],
        "rtstruct on the planning ct's slices": _on_planning_ct(),
        "failure notice structured report of study version 99999": later[9011],
        "rejection note": build_rejection_note(
            default_case().patient,
            [
                Rejected(str(d.SOPClassUID), str(d.SOPInstanceUID), str(d.SeriesInstanceUID))
                for d in (out.sc[0], out.seg, out.rtstruct, out.sr, notice_sc)
            ],
            job="2",
            node_ae_title="GLIOFORECAST",
            node_version="0.1.0",
        ),
    }


def dciodvfy_errors(dciodvfy: str, path: Path) -> tuple[list[str], str]:
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


@pytest.mark.parametrize("kind", list(_objects()))
def test_output_object_passes_dciodvfy(kind: str, dciodvfy: str, tmp_path: Path) -> None:
    ds = _objects()[kind]
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, text = dciodvfy_errors(dciodvfy, path)
    # dciodvfy names the IOD it checked on its first line: make sure it recognised the object
    assert text.strip(), f"dciodvfy printed nothing for the {kind}"
    assert errors == [], f"dciodvfy errors for the {kind}:\n" + "\n".join(errors)


def test_dciodvfy_detects_a_broken_object(dciodvfy: str, tmp_path: Path) -> None:
    """The check above can fail: remove a type 1 attribute and dciodvfy reports an error."""
    ds = copy.deepcopy(_objects()["segmentation"])
    del ds.SegmentSequence
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy_errors(dciodvfy, path)
    assert any("SegmentSequence" in e for e in errors), errors


def _no_tumour_left() -> dict[str, Dataset]:
    """The bundled model's most frequent prediction: no tumour left on any slice (2 of 4
    samples draw none), which every object must still carry validly."""
    from dataclasses import replace

    import numpy as np

    from sr_writer.outputs import OutputOptions, build_outputs
    from tests.sr_writer.synthetic_job import job_inputs, make_case

    case = make_case()
    mask = case.prediction.tumour_mask
    prediction = replace(
        case.prediction,
        tumour_mask=mask.with_array(np.zeros_like(mask.array)),
        sample_volumes_ml=(0.0, 0.0, 1.6, 2.4),
        response_probabilities={
            "complete_response": 0.5,
            "partial_response": 0.5,
            "stable_disease": 0.0,
            "progressive_disease": 0.0,
        },
    )
    out = build_outputs(prediction, job_inputs(case), OutputOptions(node_version="0.1.0"))
    return {
        "secondary capture": out.sc[len(out.sc) // 2],
        "oblique secondary capture": oblique_outputs().sc[0],
        "oblique segmentation": oblique_outputs().seg,
        "segmentation of an enhanced mr": _enhanced().seg,
        "secondary capture of an enhanced mr": _enhanced().sc[0],
        "rtstruct of an enhanced mr": _enhanced().rtstruct,
        "segmentation": out.seg,
        "rtstruct": out.rtstruct,
        "structured report": out.sr,
    }


def test_a_prediction_with_no_tumour_left_gives_valid_objects(
    dciodvfy: str, tmp_path: Path
) -> None:
    from sr_writer.structured_report import read_summary

    objects = _no_tumour_left()
    for kind, ds in objects.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, text = dciodvfy_errors(dciodvfy, path)
        assert text.strip() and errors == [], f"dciodvfy errors for the {kind}:\n{text}"
    seg = objects["segmentation"]
    assert len(seg.SegmentSequence) == 1
    assert int(seg.NumberOfFrames) == 16 and not seg.pixel_array.any()  # one empty frame a slice
    (roi,) = objects["rtstruct"].ROIContourSequence
    assert "ContourSequence" not in roi or len(roi.ContourSequence) == 0
    summary = read_summary(objects["structured report"])
    assert summary["predicted_mean_ml"] == pytest.approx(1.0)
    # the samples drew some tumour, but not in one place: the report says the segment it
    # references is empty, beside what the samples drew
    assert summary["segment_ml"] == 0.0
