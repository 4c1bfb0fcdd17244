"""Derived MR series: source geometry, predicted intensities, marked derived and synthetic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.errors import ExportError
from sr_writer.labels import BANNER_TEXT
from sr_writer.outputs import OutputOptions, build_outputs
from sr_writer.references import slice_geometry
from tests.sr_writer.synthetic_job import default_case, default_outputs, job_inputs, make_case
from tests.sr_writer.test_dciodvfy_outputs import dciodvfy_errors


def test_derived_mr_has_the_source_geometry_and_the_prediction() -> None:
    case = default_case()
    mr = default_outputs().derived_mr
    assert len(mr) == case.t1c.shape[0]
    expected = np.rint(np.asarray(case.prediction.mean.array)).astype(np.int16)
    for k, ds in enumerate(mr):
        g = slice_geometry(case.t1c, k)
        assert ds.FrameOfReferenceUID == case.t1c.frame_of_reference_uid
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], g.image_position)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], g.image_orientation)
        assert np.allclose([float(v) for v in ds.PixelSpacing], g.pixel_spacing)
        assert (
            ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            == (case.t1c_series.sop_instance_uids[k])
        )
        assert np.array_equal(ds.pixel_array, expected[k])
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert BANNER_TEXT in ds.ImageComments
        assert "not an acquisition" in ds.DerivationDescription


def test_build_outputs_refuses_another_frame_of_reference() -> None:
    case = default_case()
    p = case.prediction
    moved = dataclasses.replace(p.tumour_mask, frame_of_reference_uid="1.2.3.4")
    with pytest.raises(ExportError, match=r"expected .*1482\.1\.9, found 1\.2\.3\.4"):
        build_outputs(dataclasses.replace(p, tumour_mask=moved), job_inputs(case))


def test_build_outputs_without_optional_series() -> None:
    case = default_case()
    out = build_outputs(case.prediction, job_inputs(case))
    assert out.derived_mr == () and len(out.uncertainty_sc) == case.t1c.shape[0]
    assert len(out.all()) == 2 * case.t1c.shape[0] + 3


def test_banner_overlay_on_wide_images(dciodvfy: str, tmp_path: Path) -> None:
    case = make_case((3, 256, 256), spacing=(0.9, 0.9, 3.0))
    out = build_outputs(case.prediction, job_inputs(case), OutputOptions(derived_mr=True))
    path = tmp_path / "mr.dcm"
    out.derived_mr[1].save_as(path, enforce_file_format=True)
    back = dcmread(path)
    overlay = back.overlay_array(0x6000)
    assert overlay.shape == (256, 256)
    rows = np.nonzero(overlay.any(axis=1))[0]
    assert overlay.sum() > 300 and rows.max() < 20, "banner text expected across the top"
    assert back[0x6000, 0x1500].value == "SYNTHETIC"
    # the pixels themselves stay the prediction
    expected = np.rint(np.asarray(case.prediction.mean.array[1])).astype(np.int16)
    assert np.array_equal(back.pixel_array, expected)
    errors, _ = dciodvfy_errors(dciodvfy, path)
    assert errors == []
    # too narrow for legible text: no overlay rather than an unreadable one
    assert 0x60003000 not in default_outputs().derived_mr[0]


@pytest.mark.parametrize("factor", [60.0, 0.001])
def test_a_source_beyond_16_bits_or_of_fractions_keeps_its_values(
    factor: float, dciodvfy: str, tmp_path: Path
) -> None:
    """A T1-Gd of 0..65535 failed the whole job ("must fit signed 16 bits": no SC, SEG or SR
    either), and one rescaled to fractions was written with the values 0 and 1. Both are
    stored through RescaleSlope / RescaleIntercept, the values kept to a step of the range
    over 65534."""
    case = make_case()
    scaled = np.asarray(case.prediction.mean.array, dtype=np.float32) * np.float32(factor)
    prediction = dataclasses.replace(case.prediction, mean=case.prediction.mean.with_array(scaled))
    out = build_outputs(prediction, job_inputs(case), OutputOptions(derived_mr=True))
    step = float(scaled.max() - scaled.min()) / 65534
    for k, ds in enumerate(out.derived_mr):
        real = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(real - scaled[k]).max() <= step
    path = tmp_path / "mr.dcm"
    out.derived_mr[0].save_as(path, enforce_file_format=True)
    errors, text = dciodvfy_errors(dciodvfy, path)
    assert not errors, text
