"""Every file set in ../shared/data/real: converted like the reference tool, or refused precisely.

References: Debian's dcm2niix (NIfTI read back with SimpleITK, LPS) where it converts the set,
SimpleITK's GDCM series reader for the multi-fragment JPEG sets that this dcm2niix build cannot
decode, and the uncompressed encoding of the same pixels for the transfer-syntax set.
docs/CONFORMANCE.md lists the same cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.convert.series import decode_pixels, load_series
from dicom_node.errors import ConversionError
from tests.dicom_node.convert.reference import (
    align_to,
    dcm2niix_volume,
    gdcm_series_volume,
    sitk_to_volume,
)

CONVERTED = {
    # case: (glob under the real-data folder, extra dcm2niix options)
    "tcia_mr_t1": ("tcia_sts001_mr_rtstruct/MR_T1/image/*.dcm", ()),
    "tcia_mr_t2": ("tcia_sts001_mr_rtstruct/MR_T2/image/*.dcm", ()),
    "jpeg2000_series": ("edge_cases/dicom2nifti/generic_compressed_j2k_001/*.dcm", ()),
    "jpeg_lossless_series": ("edge_cases/dicom2nifti/generic_compressed_jpeg_001/*.dcm", ()),
    "rle_series": ("edge_cases/dicom2nifti/generic_compressed_rle_001/*.dcm", ()),
    "two_slices": ("edge_cases/dicom2nifti/failing_slicecount_001/*.dcm", ()),
    "hyperfine_enhanced": ("edge_cases/dicom2nifti/hyperfine_anatomical_001/*.dcm", ()),
    # -p n: the DICOM RescaleSlope/Intercept, not Philips' private "precise" scaling
    "philips_enhanced": (
        "edge_cases/dicom2nifti/philips_enhanced_anatomical_001/*.dcm",
        ("-p", "n"),
    ),
    "siemens_enhanced": ("edge_cases/dicom2nifti/siemens_multiframe_anatomical_001/*.dcm", ()),
    "siemens_xa10_one_timepoint": ("edge_cases/dcmqa_enhanced_siemens_xa10/6_1.dcm", ()),
    "oblique_1024_uncompressed": ("edge_cases/pydicom_data/MR2_UNCI.dcm", ()),
    "mr_with_overlays": ("edge_cases/pydicom_data/MR-SIEMENS-DICOM-WithOverlays.dcm", ()),
}

REFUSED = {
    # case: (glob, regex the message must match)
    "philips_fieldmap_two_images_per_position": (
        "edge_cases/dcmqa_enhanced_philips/*.dcm",
        r"32 duplicate slice position.*FrameType \(ORIGINAL\\PRIMARY\\T1\\FIELD_MAP, "
        r"ORIGINAL\\PRIMARY\\T1\\M\)",
    ),
    "siemens_xa10_four_timepoints": (
        "edge_cases/dcmqa_enhanced_siemens_xa10/*.dcm",
        r"18 duplicate slice position.*TemporalPositionIndex \(1, 2, 3, 4\)",
    ),
    "gantry_tilt": (
        "edge_cases/dicom2nifti/failing_gantrytilting_001/*.dcm",
        r"sheared stack \(gantry tilt\?\).*angle 14\.00 degrees",
    ),
    "not_a_volume": (
        "edge_cases/dicom2nifti/failing_notavolume_001/*.dcm",
        r"3 duplicate slice position.*at 61\.500, 61\.500, 61\.500 mm.*AcquisitionNumber",
    ),
    "missing_slice": (
        "edge_cases/dicom2nifti/failing_sliceincrement_001/*.dcm",
        r"expected steps of 5\.000 mm.*found 10\.000 mm between slices at 28\.107 and 38\.107 mm "
        r"\(about 1 slice\(s\) missing\)",
    ),
    "missing_slice_and_tilt": (
        "edge_cases/dicom2nifti/failing_sliceincrement_002/*.dcm",
        r"sheared stack.*angle 15\.50 degrees.*non-uniform slice spacing.*1 slice\(s\) missing",
    ),
    "inconsistent_orientation": (
        "edge_cases/dicom2nifti/failing_sliceorientation_001/*.dcm",
        r"inconsistent orientation.*\(0\.0159, 0\.9932, 0\.1150, -0\.0386, 0\.1155, -0\.9926\) "
        r"in 2 frame\(s\); \(0\.9991, -0\.0113, -0\.0401, 0\.0208, 0\.9696, 0\.2439\) in 2",
    ),
    "secondary_capture_without_geometry": (
        "edge_cases/pydicom_data/JPEG-LL.dcm",
        r"ImagePositionPatient, ImageOrientationPatient missing",
    ),
    "siemens_mosaic": ("edge_cases/dcmqa_transfer_syntaxes/1.dcm", r"Siemens mosaic image"),
}
for _enc in ("", "_RLE", "_big_endian", "_jpeg_2k_lossless", "_jpeg_ls_lossless"):
    REFUSED[f"emri_small{_enc}_without_functional_groups"] = (
        f"edge_cases/pydicom_data/emri_small{_enc}.dcm",
        r"10 frames has no PerFrameFunctionalGroupsSequence",
    )


def _files(real_data: Path, pattern: str) -> list[Path]:
    files = sorted(real_data.glob(pattern))
    assert files, f"no files match {pattern}"
    return files


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_converted_like_dcm2niix(real_data: Path, tmp_path: Path, case: str) -> None:
    pattern, extra = CONVERTED[case]
    files = _files(real_data, pattern)
    ours = load_series(files)
    ref = dcm2niix_volume(files, tmp_path, *extra)
    aligned = align_to(ours, ref)  # asserts the same voxel centres (to 0.01 mm)
    np.testing.assert_allclose(
        aligned.astype(np.float64), ref.array.astype(np.float64), rtol=1e-5, atol=1e-3
    )
    # the volume keeps the identity of its source
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ours.series_instance_uid == first.SeriesInstanceUID
    assert ours.frame_of_reference_uid == (first.get("FrameOfReferenceUID") or None)
    assert len(ours.source_instance_uids) == ours.shape[0]
    # the frame of each slice, for the outputs to reference (an enhanced instance's frames)
    if int(first.get("NumberOfFrames") or 1) > 1 and len(files) == 1:
        assert sorted(ours.source_frame_numbers) == list(range(1, ours.shape[0] + 1))
        # each slice at its frame's position
        per_frame = pydicom.dcmread(files[0], stop_before_pixels=True)
        for k in (0, ours.shape[0] - 1):
            item = per_frame.PerFrameFunctionalGroupsSequence[ours.source_frame_numbers[k] - 1]
            position = item.PlanePositionSequence[0].ImagePositionPatient
            voxel = ours.affine @ np.array([0.0, 0.0, k, 1.0])
            np.testing.assert_allclose(voxel[:3], [float(v) for v in position], atol=1e-2)
    else:
        assert not any(ours.source_frame_numbers)


@pytest.mark.parametrize("folder", ["5001_jpeg_lossless", "6001_j2k_lossless"])
def test_multi_fragment_jpeg_like_gdcm(real_data: Path, folder: str) -> None:
    """This dcm2niix build refuses multi-fragment JPEG; SimpleITK (GDCM) is the reference."""
    files = _files(real_data, f"dcmqa_frag_t1_jpegll_j2k/{folder}/*.dcm")
    ours = load_series(files)
    ref = gdcm_series_volume(files)
    assert np.array_equal(align_to(ours, ref), ref.array)
    assert ours.shape == (96, 128, 128)
    assert ours.spacing == pytest.approx((2.0, 2.0, 2.0), abs=1e-3)
    # k follows the slice normal: sagittal slices, normal (-1, 0, 0) here
    np.testing.assert_allclose(ours.direction[:, 2], [-1, 0, 0], atol=1e-6)
    positions = [pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f in files]
    xs = sorted((float(p[0]) for p in positions), reverse=True)
    assert ours.origin[0] == pytest.approx(xs[0], abs=1e-3)


def test_jpeg_lossless_and_j2k_runs_share_one_grid(real_data: Path) -> None:
    """Two runs of the same protocol (different voxels), one encoded per transfer syntax."""
    a = load_series(_files(real_data, "dcmqa_frag_t1_jpegll_j2k/5001_jpeg_lossless/*.dcm"))
    b = load_series(_files(real_data, "dcmqa_frag_t1_jpegll_j2k/6001_j2k_lossless/*.dcm"))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert a.frame_of_reference_uid == b.frame_of_reference_uid


def test_jpeg_ls_series_matches_its_rle_encoding(real_data: Path) -> None:
    """dcm2niix here lacks JPEG-LS; the same images exist in RLE, checked against dcm2niix."""
    jls = load_series(_files(real_data, "edge_cases/dicom2nifti/generic_compressed_jpegls_001/*"))
    rle = load_series(_files(real_data, "edge_cases/dicom2nifti/generic_compressed_rle_001/*"))
    assert np.array_equal(jls.array, rle.array)
    np.testing.assert_allclose(jls.affine, rle.affine)


@pytest.mark.parametrize("number", range(2, 10))
def test_transfer_syntaxes_decode_to_the_uncompressed_pixels(real_data: Path, number: int) -> None:
    folder = real_data / "edge_cases" / "dcmqa_transfer_syntaxes"
    reference = pydicom.dcmread(folder / "1.dcm")
    ds = pydicom.dcmread(folder / f"{number}.dcm")
    assert ds.file_meta.TransferSyntaxUID != reference.file_meta.TransferSyntaxUID
    ours = decode_pixels(ds, f"{number}.dcm", 1)
    expected = np.frombuffer(reference.PixelData, dtype="<u2").reshape(1, 384, 384)
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("name", ["MR2_J2KR.dcm", "MR2_J2KI.dcm"])
def test_oblique_jpeg2000_like_gdcm(real_data: Path, name: str) -> None:
    path = real_data / "edge_cases" / "pydicom_data" / name
    ours = load_series([path])
    ref = sitk_to_volume(sitk.ReadImage(str(path)))
    aligned = align_to(ours, ref)
    np.testing.assert_allclose(
        np.asarray(aligned, dtype=np.float64),
        np.asarray(ref.array, dtype=np.float64),
        rtol=1e-5,
        atol=1e-3,
    )
    # the row direction is oblique (0.569486, 0.822001, 0)
    np.testing.assert_allclose(ours.direction[:, 0], [0.569486, 0.822001, 0.0], atol=1e-5)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_a_specific_message(real_data: Path, case: str) -> None:
    pattern, message = REFUSED[case]
    with pytest.raises(ConversionError, match=message):
        load_series(_files(real_data, pattern))


def test_two_series_given_together_are_refused(real_data: Path) -> None:
    files = _files(real_data, "dcmqa_frag_t1_jpegll_j2k/*/50010*.dcm") + _files(
        real_data, "dcmqa_frag_t1_jpegll_j2k/*/60010*.dcm"
    )
    with pytest.raises(ConversionError, match=r"instances of 2 series given"):
        load_series(files)
