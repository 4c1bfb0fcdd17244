"""Derived MR series: source geometry, predicted intensities, marked derived and synthetic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dicom_node.errors import ExportError
from sr_writer.labels import BANNER_TEXT
from sr_writer.outputs import build_outputs
from sr_writer.references import slice_geometry
from tests.sr_writer.synthetic_job import default_case, default_outputs, job_inputs


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
