"""Model-space preprocessing and its inverse: grid planning, round trips, normalisation."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from dicom_node.convert.geometry import same_grid
from dicom_node.convert.preprocess import (
    foreground_mask_array,
    from_model_space,
    normalise_intensity,
    orientation_matrix,
    plan_model_grid,
    to_model_space,
)
from dicom_node.errors import ConversionError
from dicom_node.types import Volume


def _head(
    shape: tuple[int, int, int] = (40, 56, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    direction: npt.NDArray[np.float64] | None = None,
    origin: tuple[float, float, float] = (-23.0, -30.0, -15.0),
) -> Volume:
    """An ellipsoid 'head' with a smooth intensity ramp, background 0."""
    d = np.eye(3) if direction is None else direction
    vol = Volume(
        array=np.zeros(shape, dtype=np.float32),
        spacing=spacing,
        origin=origin,
        direction=d,
        frame_of_reference_uid="1.2.3",
        source_instance_uids=tuple(f"1.2.3.{k}" for k in range(shape[0])),
        series_instance_uid="1.2.3.9",
    )
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    world = (vol.affine @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3]
    centre = vol.affine @ np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2, 1])
    rel = world.T - centre[:3]
    inside = (rel[:, 0] / 18) ** 2 + (rel[:, 1] / 22) ** 2 + (rel[:, 2] / 14) ** 2 <= 1
    values = np.where(inside, 500 + 5 * rel[:, 0] + 3 * rel[:, 1] - 2 * rel[:, 2], 0)
    return vol.with_array(values.reshape(shape).astype(np.float32))


def test_orientation_codes() -> None:
    np.testing.assert_array_equal(orientation_matrix("LPS"), np.eye(3))
    np.testing.assert_array_equal(orientation_matrix("RAS"), np.diag([-1.0, -1.0, 1.0]))
    with pytest.raises(ConversionError, match="same axis twice"):
        orientation_matrix("RLS")
    with pytest.raises(ConversionError, match="3 letters"):
        orientation_matrix("XYZ")


def test_round_trip_is_exact_when_the_model_grid_is_the_source_grid_reoriented() -> None:
    """LPS source at the model spacing: RAS model space is a pure flip, so the round trip is
    voxel-exact and the output lands on the exact source grid."""
    src = _head()
    grid = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), orientation="RAS")
    assert grid.shape == src.shape
    model = to_model_space(src, grid)
    np.testing.assert_array_equal(model, src.array[:, ::-1, ::-1])
    back = from_model_space(model, grid, src)
    assert same_grid(back, src)
    assert back.source_instance_uids == src.source_instance_uids
    assert back.frame_of_reference_uid == "1.2.3" and back.series_instance_uid == "1.2.3.9"
    np.testing.assert_array_equal(back.array, src.array)


@pytest.mark.parametrize("shape", [(32, 64, 40), (31, 63, 41)])
def test_round_trip_with_crop_pad_and_normalisation_is_exact_on_the_head(
    shape: tuple[int, int, int],
) -> None:
    src = _head()
    grid = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=shape)
    offset = np.linalg.inv(src.affine) @ np.array([*grid.origin, 1.0])
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-9)  # same lattice
    model = to_model_space(src, grid)
    fg = foreground_mask_array(model)
    norm, scaling = normalise_intensity(model, fg)
    assert abs(float(norm[fg].mean())) < 1e-4 and float(norm[fg].std()) == pytest.approx(1, 1e-4)
    back = from_model_space(scaling.invert(norm), grid, src)
    assert same_grid(back, src)
    head = np.asarray(src.array, dtype=np.float64) > 0
    # the model grid covers the head (36 x 44 x 28 mm) and shares the source's 1 mm lattice, so
    # every head voxel comes back (up to float32 round-off of the normalisation)
    back_f, src_f = np.asarray(back.array, np.float64), np.asarray(src.array, np.float64)
    np.testing.assert_allclose(back_f[head], src_f[head], rtol=1e-5, atol=1e-3)
    assert set(np.unique(model)) <= set(np.unique(src.array))  # voxels copied, not blended


def test_round_trip_through_an_oblique_anisotropic_source() -> None:
    a = math.radians(20)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    src = _head(shape=(20, 60, 50), spacing=(0.9, 0.8, 2.5), direction=rot)
    grid = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=(64, 64, 64))
    model = to_model_space(src, grid)
    back = from_model_space(model, grid, src)
    assert same_grid(back, src)
    interior = foreground_mask_array(src.array)
    from scipy import ndimage

    interior = ndimage.binary_erosion(interior, iterations=2)
    # the intensity is linear inside the head: trilinear resampling there and back is exact up
    # to the head boundary; allow for the float32 arithmetic
    err = np.abs(back.array[interior] - src.array[interior])
    assert float(np.median(err)) < 0.05
    assert float(np.percentile(err, 99)) < 1.0


def test_mask_round_trip_keeps_its_shape() -> None:
    src = _head(spacing=(0.8, 0.8, 1.6), shape=(24, 70, 60))
    mask = src.with_array(np.asarray(src.array, dtype=np.float64) > 0)
    grid = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=(48, 80, 64))
    model_mask = to_model_space(mask, grid, order=1) >= 0.5
    back = from_model_space(model_mask.astype(np.float32), grid, src, as_mask=True)
    a, b = np.asarray(back.array, dtype=bool), np.asarray(mask.array, dtype=bool)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert back.array.dtype == bool and dice > 0.97


def test_the_same_image_stored_reversed_gets_the_same_model_grid() -> None:
    """The model grid is snapped to the source lattice; a centre half a voxel off it was
    rounded in voxel indices (half to even), so the same image stored with an axis reversed
    got a grid one voxel apart, and another prediction (4.2 against 0.8 ml outlined)."""
    for shape in ((40, 56, 48), (40, 57, 49)):
        src = _head(shape=shape)
        flipped_direction = np.diag([-1.0, 1.0, 1.0])
        far = src.affine @ np.array([shape[2] - 1, 0, 0, 1.0])
        reversed_x = Volume(
            array=src.array[:, :, ::-1].copy(), spacing=src.spacing,
            origin=(float(far[0]), src.origin[1], src.origin[2]), direction=flipped_direction,
        )  # fmt: skip
        for crop in (None, (32, 40, 35)):
            a = plan_model_grid(src, shape=crop, orientation="RAS")
            b = plan_model_grid(reversed_x, shape=crop, orientation="RAS")
            assert (a.shape, a.origin) == (b.shape, b.origin), (shape, crop)
            np.testing.assert_array_equal(to_model_space(src, a), to_model_space(reversed_x, b))


def test_crop_centres_the_head() -> None:
    src = _head(shape=(40, 56, 48), origin=(50.0, 60.0, 70.0))
    grid = plan_model_grid(src, spacing=(2.0, 2.0, 2.0), shape=(20, 24, 24), orientation="LPS")
    model = to_model_space(src, grid)
    fg = np.argwhere(model > 0)
    centre = (fg.min(axis=0) + fg.max(axis=0)) / 2
    np.testing.assert_allclose(centre, (np.array(grid.shape) - 1) / 2, atol=1.0)


def test_invalid_requests() -> None:
    src = _head()
    with pytest.raises(ConversionError, match="spacing must be 3 positive"):
        plan_model_grid(src, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ConversionError, match="shape must be 3 positive"):
        plan_model_grid(src, shape=(0, 4, 4))
    grid = plan_model_grid(src)
    with pytest.raises(ConversionError, match="model output shape"):
        from_model_space(np.zeros((2, 2, 2), np.float32), grid, src)
    with pytest.raises(ConversionError, match="zscore or percentile"):
        normalise_intensity(src.array, method="minmax")


def test_percentile_normalisation_is_invertible() -> None:
    src = _head()
    values = np.asarray(src.array, dtype=np.float64)
    norm, scaling = normalise_intensity(values, values > 0, method="percentile")
    np.testing.assert_allclose(
        np.asarray(scaling.invert(norm), dtype=np.float64), values, atol=1e-3
    )


def test_the_model_window_moves_to_hold_the_whole_tumour() -> None:
    """A field of view with the neck puts the head's centre low: the window centred on it left
    40 % of a high tumour out, and its prediction showed the pre-treatment image there. The
    window moves as little as needed to hold the tumour; one larger than the window is
    refused."""
    src = _head(shape=(40, 56, 48))
    gtv = np.zeros(src.shape, dtype=bool)
    gtv[30:38, 25:31, 20:28] = True  # high in the head (k up)
    centred = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=(20, 40, 40), orientation="LPS")
    held = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=(20, 40, 40), orientation="LPS",
                           target=gtv)  # fmt: skip
    mask = src.with_array(gtv.astype(np.float32))
    assert to_model_space(mask, centred).sum() < gtv.sum()  # centred on the head: cut
    assert to_model_space(mask, held).sum() == pytest.approx(gtv.sum())  # the whole tumour
    assert abs(held.origin[2] - centred.origin[2]) <= 10.0  # moved, not re-centred
    # a tumour inside the centred window leaves it where it was
    inner = np.zeros(src.shape, dtype=bool)
    inner[18:22, 25:31, 20:28] = True
    same = plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=(20, 40, 40), orientation="LPS",
                           target=inner)  # fmt: skip
    assert same.origin == centred.origin
    with pytest.raises(ConversionError, match="more than the model's field of view"):
        plan_model_grid(src, spacing=(1.0, 1.0, 1.0), shape=(10, 40, 40), orientation="LPS",
                        target=gtv | inner)  # fmt: skip


def test_a_few_corrupt_voxels_do_not_move_the_head_or_the_scale() -> None:
    """Five voxels of 1e6 in an image of 0..600: Otsu's threshold rose above the head (the
    grid went where the outliers were, 0 % of the tumour inside) and the z-score's spread grew
    a hundredfold. Left out of both, the head and the scale are those of the clean image."""
    src = _head()
    clean = np.asarray(src.array, dtype=np.float32)
    spoilt = clean.copy()
    spoilt[0, 0, :5] = 1e6
    np.testing.assert_array_equal(
        foreground_mask_array(spoilt)[1:], foreground_mask_array(clean)[1:]
    )
    mask = foreground_mask_array(clean)
    _, clean_scaling = normalise_intensity(clean, mask)
    _, spoilt_scaling = normalise_intensity(spoilt, mask | (spoilt > 1e5))
    assert spoilt_scaling.scale == pytest.approx(clean_scaling.scale, rel=1e-3)
    assert spoilt_scaling.centre == pytest.approx(clean_scaling.centre, rel=1e-3)
    # an image without such outliers is normalised exactly as before (the bundled model's input)
    plain, _ = normalise_intensity(clean, mask)
    region = clean[mask]
    expected = (clean - float(region.mean())) / float(region.std())
    np.testing.assert_array_equal(plain, expected.astype(np.float32))
