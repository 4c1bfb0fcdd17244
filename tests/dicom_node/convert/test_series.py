"""Series to Volume on synthetic series whose geometry is known exactly."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from dicom_node.convert.geometry import check_stack, orientation_axes, resample, same_grid
from dicom_node.convert.series import load_series
from dicom_node.errors import ConversionError, InputError
from dicom_node.types import Volume
from tests.dicom_node.convert import synth


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Store an element as raw bytes, as a faulty sender would (pydicom parses it on access)."""
    ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _oblique_iop(a: float = 0.3, b: float = 0.2) -> tuple[float, ...]:
    row = np.array([math.cos(a), math.sin(a), 0.0])
    col = np.array([-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b)])
    return (*row, *col)


def _voxel_world(volume: Volume, i: int, j: int, k: int) -> np.ndarray:
    return (volume.affine @ np.array([i, j, k, 1.0]))[:3]


@pytest.mark.parametrize("iop", [synth.AXIAL, _oblique_iop(), (0, 1, 0, 0, 0, -1)])
@pytest.mark.parametrize("step", [2.5, -3.0])
def test_slices_ordered_along_the_normal_whatever_the_file_order(
    iop: tuple[float, ...], step: float
) -> None:
    pixels = synth.volume_pixels((7, 12, 10))
    slices = synth.mr_slices(pixels, iop=iop, slice_step=step, spacing=(0.8, 0.9))
    shuffled = slices[:]
    random.Random(3).shuffle(shuffled)
    vol = load_series(shuffled)
    expected = pixels if step > 0 else pixels[::-1]
    assert np.array_equal(vol.array, expected)
    assert vol.array.dtype == np.uint16
    assert vol.spacing == pytest.approx((0.9, 0.8, abs(step)))
    row, col, normal = orientation_axes(iop)
    np.testing.assert_allclose(vol.direction, np.stack([row, col, normal], axis=1), atol=1e-9)
    assert np.linalg.det(vol.direction) == pytest.approx(1.0)
    # each slice's first voxel sits at that slice's ImagePositionPatient
    by_uid = {ds.SOPInstanceUID: ds for ds in slices}
    for k, uid in enumerate(vol.source_instance_uids):
        ipp = np.asarray([float(v) for v in by_uid[uid].ImagePositionPatient])
        np.testing.assert_allclose(_voxel_world(vol, 0, 0, k), ipp, atol=1e-6)
    # and a voxel (i, j) is i column spacings along the row direction
    np.testing.assert_allclose(
        _voxel_world(vol, 3, 2, 0) - _voxel_world(vol, 0, 0, 0), 3 * 0.9 * row + 2 * 0.8 * col
    )
    assert vol.series_instance_uid == slices[0].SeriesInstanceUID
    assert vol.frame_of_reference_uid == slices[0].FrameOfReferenceUID


def test_rescale_slope_and_intercept_are_applied() -> None:
    pixels = synth.volume_pixels((3, 5, 6)).astype(np.int16)
    vol = load_series(synth.mr_slices(pixels, slope=0.5, intercept=-100.0))
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(np.asarray(vol.array, dtype=np.float64), pixels * 0.5 - 100.0)


def test_signed_pixels_keep_their_sign() -> None:
    pixels = (synth.volume_pixels((2, 4, 4)).astype(np.int32) - 2000).astype(np.int16)
    vol = load_series(synth.mr_slices(pixels))
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, pixels)


def test_paths_streams_and_datasets_are_accepted(tmp_path: Path) -> None:
    pixels = synth.volume_pixels((3, 4, 5))
    slices = synth.mr_slices(pixels)
    paths = []
    for n, ds in enumerate(slices):
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    streams = [io.BytesIO(p.read_bytes()) for p in paths]
    for sources in (paths, [str(p) for p in paths], streams, slices):
        assert np.array_equal(load_series(sources).array, pixels)


def test_enhanced_multiframe_with_shuffled_frames_and_per_frame_rescale() -> None:
    pixels = synth.volume_pixels((6, 8, 9))
    order = [3, 0, 5, 1, 4, 2]
    slopes = [1.0 + 0.25 * n for n in range(6)]  # stored frame n has slope slopes[n]
    ds = synth.enhanced_mr(pixels, frame_order=order, slopes=slopes, iop=_oblique_iop())
    vol = load_series([ds])
    slope_of_k = {k: slopes[stored] for stored, k in enumerate(order)}
    expected = np.stack([pixels[k] * slope_of_k[k] for k in range(6)]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(vol.array, dtype=np.float64), expected)
    assert vol.spacing == pytest.approx((1.1, 1.0, 3.0))
    assert vol.source_instance_uids == (ds.SOPInstanceUID,) * 6


def test_enhanced_without_rescale_keeps_integers() -> None:
    pixels = synth.volume_pixels((4, 5, 5))
    vol = load_series([synth.enhanced_mr(pixels, frame_order=[2, 3, 0, 1])])
    assert vol.array.dtype == np.uint16 and np.array_equal(vol.array, pixels)


def test_single_slice_uses_slice_thickness_and_min_slices_is_enforced() -> None:
    slices = synth.mr_slices(synth.volume_pixels((1, 4, 4)), slice_step=4.0)
    assert load_series(slices).spacing[2] == pytest.approx(4.0)
    with pytest.raises(ConversionError, match=r"series has 1 slice\(s\); expected at least 3"):
        load_series(slices, min_slices=3)


@pytest.mark.parametrize("signed", [False, True])
def test_only_the_stored_bits_make_the_value(signed: bool, tmp_path: Path) -> None:
    """12 bits stored in 16: the bits above (an old scanner's overlay bits) are not part of
    the value, and a signed value is sign-extended from bit 11, as pydicom decodes it. They
    were kept: 61440..62717 where the image holds 0..1277, and 0..4095 for -500..777."""
    true = synth.volume_pixels((3, 6, 5)).astype(np.int32) % 1278 - (500 if signed else 0)
    words = (true & 0x0FFF) | (0 if signed else 0xF000)  # signed: the top bits left zero
    slices = synth.mr_slices(words.astype(np.uint16))
    paths = []
    for k, ds in enumerate(slices):
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    vol = load_series(paths)
    assert np.array_equal(np.asarray(vol.array, dtype=np.int32), true)
    assert vol.array.dtype == (np.int16 if signed else np.uint16)
    import pydicom

    assert np.array_equal(pydicom.dcmread(paths[0]).pixel_array, true[0])  # as pydicom has it


def test_bits_stored_beyond_bits_allocated_are_refused() -> None:
    slices = synth.mr_slices(synth.volume_pixels((3, 4, 4)))
    for ds in slices:
        ds.BitsStored, ds.HighBit = 17, 16
    with pytest.raises(ConversionError, match=r"found BitsStored 17, HighBit 16, BitsAllocated 16"):
        load_series(slices)


@pytest.mark.parametrize("enhanced", [False, True])
def test_a_monochrome1_series_is_turned_over(enhanced: bool) -> None:
    """MONOCHROME1 shows its lowest value white: read as MONOCHROME2 the brain came out dark
    and the background bright. Turned over within the series' range, brighter is higher again;
    a series mixing the two is refused."""
    image = synth.volume_pixels((4, 6, 5)).astype(np.int32) % 1000 + 20
    stored = (4095 - image).astype(np.uint16)
    sources = [synth.enhanced_mr(stored)] if enhanced else synth.mr_slices(stored)
    for ds in sources:
        ds.PhotometricInterpretation = "MONOCHROME1"
    vol = load_series(sources)
    offset = np.asarray(vol.array, dtype=np.int64) - image
    assert (offset == offset.flat[0]).all()  # the image, up to a constant
    assert int(vol.array.min()) == int(stored.min())  # and within the stored range
    if not enhanced:
        sources[1].PhotometricInterpretation = "MONOCHROME2"
        with pytest.raises(ConversionError, match=r"found MONOCHROME1 \(3\), MONOCHROME2 \(1\)"):
            load_series(sources)


def test_the_slice_thickness_is_kept_apart_from_the_spacing() -> None:
    """1 mm thick slices every 1.5 mm (a gap): the volume's spacing is 1.5 mm, its slice
    thickness 1 mm, as the result objects must say."""
    slices = synth.mr_slices(synth.volume_pixels((4, 4, 4)), slice_step=1.5)
    for ds in slices:
        ds.SliceThickness = "1"
    vol = load_series(slices)
    assert vol.spacing[2] == pytest.approx(1.5)
    assert vol.slice_thickness == pytest.approx(1.0)
    assert vol.with_array(np.zeros(vol.shape)).slice_thickness == pytest.approx(1.0)


# --- refusals ---------------------------------------------------------------------------


def test_missing_slice_is_reported_with_positions() -> None:
    slices = synth.mr_slices(synth.volume_pixels((6, 4, 4)), origin=(0, 0, 10), slice_step=2.0)
    del slices[3]  # the slice at z = 16
    with pytest.raises(
        ConversionError,
        match=r"expected steps of 2\.000 mm.*found 4\.000 mm between slices at 14\.000 and "
        r"18\.000 mm \(about 1 slice\(s\) missing\)",
    ):
        load_series(slices)


def test_small_spacing_jitter_is_tolerated() -> None:
    slices = synth.mr_slices(synth.volume_pixels((5, 4, 4)), origin=(0, 0, 0), slice_step=2.0)
    slices[2].ImagePositionPatient = ["0", "0", "4.01"]
    assert load_series(slices).spacing[2] == pytest.approx(2.0)


def test_duplicate_positions_name_what_differs() -> None:
    a = synth.mr_slices(synth.volume_pixels((3, 4, 4)), origin=(0, 0, 0))
    b = synth.mr_slices(synth.volume_pixels((3, 4, 4), 1), origin=(0, 0, 0))
    for ds in b:
        ds.SeriesInstanceUID = a[0].SeriesInstanceUID
        ds.FrameOfReferenceUID = a[0].FrameOfReferenceUID
        ds.EchoTime = "90"
    with pytest.raises(ConversionError, match=r"3 duplicate slice position.*EchoTime \(10, 90\)"):
        load_series(a + b)


def test_gantry_tilt_is_refused_with_the_angle() -> None:
    tilt = math.radians(12)
    iop = (1, 0, 0, 0, math.cos(tilt), -math.sin(tilt))
    slices = synth.mr_slices(synth.volume_pixels((5, 4, 4)), iop=iop, step_vector=(0, 0, 2.0))
    with pytest.raises(ConversionError, match=r"sheared stack \(gantry tilt\?\).*angle 12\.00"):
        load_series(slices)


def test_mixed_orientations_series_frames_of_reference_and_sizes() -> None:
    a = synth.mr_slices(synth.volume_pixels((3, 4, 4)))
    b = synth.mr_slices(synth.volume_pixels((3, 4, 4)), iop=(0, 1, 0, 0, 0, -1))
    with pytest.raises(ConversionError, match=r"instances of 2 series given"):
        load_series(a + b)
    for ds in b:
        ds.SeriesInstanceUID = a[0].SeriesInstanceUID
    with pytest.raises(ConversionError, match=r"mixed frames of reference"):
        load_series(a + b)
    for ds in b:
        ds.FrameOfReferenceUID = a[0].FrameOfReferenceUID
    with pytest.raises(ConversionError, match=r"inconsistent orientation.*in 3 frame\(s\)"):
        load_series(a + b)
    c = synth.mr_slices(synth.volume_pixels((1, 5, 4)), origin=(0, 0, 99))
    c[0].SeriesInstanceUID = a[0].SeriesInstanceUID
    c[0].FrameOfReferenceUID = a[0].FrameOfReferenceUID
    with pytest.raises(ConversionError, match=r"mixed image sizes.*4x4 \(3\), 5x4 \(1\)"):
        load_series(a + c)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ds: delattr(ds, "ImagePositionPatient"), r"ImagePositionPatient missing"),
        (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), r"orthogonal"),
        (lambda ds: setattr(ds, "ImageOrientationPatient", [2, 0, 0, 0, 1, 0]), r"unit vectors"),
        (lambda ds: setattr(ds, "PixelSpacing", [0, 1]), r"PixelSpacing must be positive"),
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[:10]), r"PixelData holds 10 bytes"),
        (lambda ds: setattr(ds, "SamplesPerPixel", 3), r"SamplesPerPixel must be 1"),
        (lambda ds: setattr(ds, "RescaleSlope", "0"), r"RescaleSlope must be non-zero"),
        (lambda ds: _raw(ds, 0x00281052, "DS", b"abc "), r"RescaleIntercept must be numeric"),
        (lambda ds: _raw(ds, 0x00200032, "DS", b"1\\2"), r"ImagePositionPatient must have 3"),
        (lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "MOSAIC"]), r"mosaic"),
        (lambda ds: delattr(ds, "SOPInstanceUID"), r"SOPInstanceUID is required"),
    ],
)
def test_bad_headers_are_refused(mutate: object, message: str) -> None:
    slices = synth.mr_slices(synth.volume_pixels((3, 4, 4)))
    for ds in slices:
        mutate(ds)  # type: ignore[operator]
    with pytest.raises(ConversionError, match=message):
        load_series(slices)


def test_unreadable_inputs(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ConversionError, match=r"junk\.dcm: not a DICOM Part 10 file"):
        load_series([junk])
    with pytest.raises(ConversionError, match=r"file not found"):
        load_series([tmp_path / "absent.dcm"])
    with pytest.raises(ConversionError, match=r"no instances given"):
        load_series([])
    ds = synth.mr_slices(synth.volume_pixels((1, 4, 4)))[0]
    with pytest.raises(ConversionError, match=r"also in"):
        load_series([ds, ds])
    assert issubclass(ConversionError, InputError)


def test_check_stack_single_frame_and_bad_positions() -> None:
    g = check_stack([(1.0, 2.0, 3.0)], synth.AXIAL, fallback_spacing=5.0)
    assert g.slice_spacing == 5.0 and g.origin == (1.0, 2.0, 3.0)
    with pytest.raises(ConversionError, match="non-finite"):
        check_stack([(0.0, 0.0, float("nan")), (0.0, 0.0, 1.0)], synth.AXIAL)


def test_resample_identity_and_shift() -> None:
    pixels = synth.volume_pixels((4, 6, 5)).astype(np.float32)
    vol = load_series(synth.mr_slices(pixels.astype(np.uint16), iop=_oblique_iop()))
    assert same_grid(vol, vol)
    np.testing.assert_allclose(resample(vol, vol, order=1), pixels, atol=1e-3)
    # a grid shifted by one voxel along i reads the next column
    shifted = Volume(
        array=np.zeros((4, 6, 4), np.float32),
        spacing=vol.spacing,
        origin=tuple(_voxel_world(vol, 1, 0, 0)),
        direction=vol.direction,
    )
    np.testing.assert_allclose(resample(vol, shifted, order=0), pixels[:, :, 1:], atol=1e-3)
    assert isinstance(vol.array, np.ndarray) and not isinstance(vol, Dataset)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_onto_flipped_swapped_or_shifted_grids_copies_voxels(order: int) -> None:
    """Grids whose voxel centres are the source's (axes flipped, swapped, shifted by whole
    voxels, partly outside) are filled by copying (a fast path): every value equals the source
    voxel at the same place in patient space, and places outside the source get ``fill``."""
    rng = np.random.default_rng(3)
    src = Volume(
        array=rng.random((5, 6, 7)).astype(np.float32),
        spacing=(1.0, 2.0, 3.0),
        origin=(10.0, -4.0, 7.0),
        direction=np.eye(3),
    )
    flip_k = np.diag([1.0, 1.0, -1.0])
    swap_ij = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    grids = [
        # the slice axis reversed (a Segmentation stored top slice first)
        Volume(np.zeros((5, 6, 7)), (1.0, 2.0, 3.0), (10.0, -4.0, 7.0 + 4 * 3.0), flip_k),
        # rows and columns swapped, shifted two columns out of the source
        Volume(np.zeros((5, 7, 6)), (2.0, 1.0, 3.0), (6.0, -4.0, 7.0), swap_ij),
        # shifted by whole voxels, partly outside
        Volume(np.zeros((4, 4, 4)), (1.0, 2.0, 3.0), (13.0, 0.0, 1.0), np.eye(3)),
    ]
    for ref in grids:
        got = resample(src, ref, order=order, fill=-1.0)
        to_src = np.linalg.inv(src.affine) @ ref.affine
        expected = np.full(ref.array.shape, -1.0, np.float32)
        for k, j, i in np.ndindex(*ref.array.shape):
            si, sj, sk = np.rint(to_src @ np.array([i, j, k, 1.0]))[:3].astype(int)
            if 0 <= sk < 5 and 0 <= sj < 6 and 0 <= si < 7:
                expected[k, j, i] = src.array[sk, sj, si]
        np.testing.assert_array_equal(got, expected)
        assert (got == -1.0).any() or ref is grids[0]
    mask = src.with_array(src.array > 0.5)
    flipped = resample(mask, grids[0], order=0, output_dtype=np.bool_)
    assert flipped.dtype == np.bool_
    np.testing.assert_array_equal(flipped, mask.array[::-1])
