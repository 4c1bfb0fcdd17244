"""RTDOSE onto the MR grid: scaling, frame offsets (relative, absolute, reversed), trilinear
resampling of a dose that is linear in space (so trilinear interpolation must be exact)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from dicom_node.convert.rtdose import dose_on_grid, load_rtdose
from dicom_node.convert.series import load_series
from dicom_node.errors import ConversionError
from dicom_node.types import Volume
from tests.dicom_node.convert import synth

FRAME = "1.2.826.0.1.3680043.2.1125.42"


def linear_dose(pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 20.0 + 0.2 * pts[:, 0] - 0.1 * pts[:, 1] + 0.3 * pts[:, 2]


def _mr() -> Volume:
    a, b = 0.25, 0.1
    iop = (
        math.cos(a),
        math.sin(a),
        0.0,
        -math.sin(a) * math.cos(b),
        math.cos(a) * math.cos(b),
        math.sin(b),
    )
    return load_series(
        synth.mr_slices(
            synth.volume_pixels((6, 20, 18)),
            origin=(-5, -6, 2),
            iop=iop,
            slice_step=2.0,
            spacing=(1.5, 1.2),
            frame_uid=FRAME,
        )
    )


@pytest.mark.parametrize(("absolute", "reverse"), [(False, False), (True, False), (False, True)])
def test_dose_grid_geometry_and_scaling(absolute: bool, reverse: bool) -> None:
    ds = synth.rtdose(
        linear_dose,
        shape=(12, 30, 32),
        origin=(-30.0, -35.0, -10.0 if not reverse else 40.0),
        spacing=(2.0, 2.5, 3.0),
        frame_uid=FRAME,
        absolute_offsets=absolute,
        reverse=reverse,
    )
    dose = load_rtdose(ds)
    assert dose.shape == (12, 30, 32)
    assert dose.spacing == pytest.approx((2.0, 2.5, 3.0))
    assert np.linalg.det(dose.direction) == pytest.approx(1.0)
    # every voxel's value is the dose function at its centre (to the scaling's resolution)
    k, j, i = np.meshgrid(*(np.arange(n) for n in dose.shape), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    world = np.asarray((dose.affine @ ijk1)[:3].T, dtype=np.float64)
    np.testing.assert_allclose(
        np.asarray(dose.array, dtype=np.float64).ravel(), linear_dose(world), atol=1e-3
    )


def test_dose_on_oblique_mr_grid_is_exact_for_a_linear_field() -> None:
    mr = _mr()
    ds = synth.rtdose(
        linear_dose,
        shape=(12, 30, 32),
        origin=(-30.0, -35.0, -10.0),
        spacing=(2.0, 2.5, 3.0),
        frame_uid=FRAME,
    )
    on_mr = dose_on_grid(ds, mr)
    assert on_mr.shape == mr.shape and on_mr.array.dtype == np.float32
    k, j, i = np.meshgrid(*(np.arange(n) for n in mr.shape), indexing="ij")
    world = np.asarray(
        (mr.affine @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3].T,
        dtype=np.float64,
    )
    np.testing.assert_allclose(
        np.asarray(on_mr.array, dtype=np.float64).ravel(), linear_dose(world), atol=2e-3
    )
    assert on_mr.frame_of_reference_uid == FRAME


def test_dose_outside_the_dose_grid_is_zero() -> None:
    mr = _mr()
    ds = synth.rtdose(
        lambda p: np.full(len(p), 2.0),
        shape=(3, 4, 4),
        origin=(100.0, 100.0, 100.0),
        spacing=(2.0, 2.0, 2.0),
        frame_uid=FRAME,
    )
    assert dose_on_grid(ds, mr).array.max() == 0.0


def test_dose_on_another_frame_of_reference_is_refused() -> None:
    mr = _mr()
    ds = synth.rtdose(
        linear_dose,
        shape=(3, 4, 4),
        origin=(0.0, 0.0, 0.0),
        spacing=(2.0, 2.0, 2.0),
        frame_uid="1.2.3.999",
    )
    with pytest.raises(ConversionError, match=rf"1\.2\.3\.999 but the image is on {FRAME}"):
        dose_on_grid(ds, mr)


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("DoseGridScaling", "0", "DoseGridScaling must be a positive number"),
        ("DoseUnits", "RELATIVE", "DoseUnits must be GY"),
        ("GridFrameOffsetVector", ["0", "3", "7"], "GridFrameOffsetVector is not uniform"),
        ("GridFrameOffsetVector", ["0", "3"], "has 2 values, expected NumberOfFrames = 3"),
        ("GridFrameOffsetVector", ["0", "0", "3"], "repeats a position"),
    ],
)
def test_bad_dose_headers_are_refused(attribute: str, value: object, message: str) -> None:
    ds = synth.rtdose(
        linear_dose,
        shape=(3, 4, 4),
        origin=(0.0, 0.0, 0.0),
        spacing=(2.0, 2.0, 3.0),
        frame_uid=FRAME,
    )
    setattr(ds, attribute, value)
    with pytest.raises(ConversionError, match=message):
        load_rtdose(ds)


def test_not_a_dose_is_refused() -> None:
    with pytest.raises(ConversionError, match="expected an RT Dose"):
        load_rtdose(synth.mr_slices(synth.volume_pixels((1, 4, 4)))[0])


def test_a_single_dose_plane_is_refused() -> None:
    """One frame says nothing of the dose above and below it; it was read as a grid 1 mm thick
    and 94 % of a GTV got under 1 Gy."""
    ds = synth.rtdose(
        linear_dose, shape=(1, 4, 4), origin=(0.0, 0.0, 0.0), spacing=(2.0, 2.0, 3.0),
        frame_uid=FRAME,
    )  # fmt: skip
    with pytest.raises(ConversionError, match=r"expected a 3D dose grid .*found 1 frame"):
        load_rtdose(ds)


def test_a_dose_grid_that_leaves_part_of_the_gtv_out_is_refused() -> None:
    """A grid cut short (or the dose of part of the plan) read as 0 Gy over the rest of the
    tumour: refused when it leaves more than 1 % of the GTV out, and taken when it holds it."""
    mr = _mr()  # 6 slices 2 mm apart
    gtv = np.zeros(mr.shape, dtype=bool)
    gtv[1:5, 6:14, 6:12] = True
    target = mr.with_array(gtv)
    whole = synth.rtdose(
        linear_dose, shape=(12, 30, 32), origin=(-30.0, -35.0, -10.0), spacing=(2.0, 2.5, 3.0),
        frame_uid=FRAME,
    )  # fmt: skip
    assert dose_on_grid(whole, mr, target=target).array.max() > 0
    cut = synth.rtdose(
        linear_dose, shape=(7, 30, 32), origin=(-30.0, -35.0, -10.0), spacing=(2.0, 2.5, 3.0),
        frame_uid=FRAME,
    )  # fmt: skip
    with pytest.raises(
        ConversionError,
        match=r"RT Dose [\d.]+: the dose grid leaves \d+ of the GTV's 192 voxels \((\d|[1-9]\d)%\) "
        r"outside it \(grid z -10\.0 to 8\.0 mm, GTV slices z 4\.0 to 10\.0 mm\); expected a dose "
        r"grid holding the whole target",
    ):
        dose_on_grid(cut, mr, target=target)
    assert dose_on_grid(cut, mr).array.max() > 0  # without a target: as before
