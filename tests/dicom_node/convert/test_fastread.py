"""The lean header reader agrees with pydicom, and hands over to it whenever it must."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_node.convert._fastread import WANTED, read_classic_header
from dicom_node.convert.series import load_series
from tests.dicom_node.convert import synth


def _same_as_pydicom(data: bytes) -> None:
    lean = read_classic_header(data)
    assert lean is not None
    full = pydicom.dcmread(io.BytesIO(data))
    wanted = {int(elem.tag) for elem in full if int(elem.tag) in WANTED}
    assert {int(elem.tag) for elem in lean} == wanted
    for tag in wanted:
        assert lean[tag].value == full[tag].value, pydicom.datadict.keyword_for_tag(tag)


@pytest.mark.parametrize("series", ["MR_T1", "MR_T2"])
def test_real_implicit_vr_files_match_pydicom(real_data: Path, series: str) -> None:
    for path in sorted((real_data / "tcia_sts001_mr_rtstruct" / series / "image").glob("*"))[:5]:
        _same_as_pydicom(path.read_bytes())


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian])
def test_synthetic_files_match_pydicom(syntax: str | None) -> None:
    for ds in synth.mr_slices(synth.volume_pixels((2, 6, 5)), slope=1.5, intercept=-3.0):
        buf = io.BytesIO()
        if syntax is not None:
            ds.file_meta.TransferSyntaxUID = UID(syntax)
        ds.save_as(buf, enforce_file_format=True)
        _same_as_pydicom(buf.getvalue())


def test_hands_over_to_pydicom(real_data: Path) -> None:
    folder = real_data / "edge_cases"
    # big endian, enhanced functional groups, no preamble
    for rel in (
        "dcmqa_transfer_syntaxes/3.dcm",
        "dicom2nifti/hyperfine_anatomical_001/001.dcm",
    ):
        assert read_classic_header((folder / rel).read_bytes()) is None, rel
    assert read_classic_header(b"\0" * 64) is None
    ds = synth.mr_slices(synth.volume_pixels((1, 4, 4)))[0]
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert read_classic_header(buf.getvalue()) is None
    # and the series still converts through pydicom
    assert np.array_equal(load_series([io.BytesIO(buf.getvalue())]).array, ds.pixel_array[None])


@pytest.mark.parametrize(
    "rel",
    [
        "dcmqa_frag_t1_jpegll_j2k/5001_jpeg_lossless/5001005.dcm",
        "dcmqa_frag_t1_jpegll_j2k/6001_j2k_lossless",
        "edge_cases/dicom2nifti/generic_compressed_jpegls_001/IM-0001-0001-0001.dcm",
        "edge_cases/dicom2nifti/generic_compressed_rle_001/IM-0001-0001-0001.dcm",
    ],
)
def test_compressed_frames_decode_like_pydicom(real_data: Path, rel: str) -> None:
    path = real_data / rel
    if path.is_dir():
        path = sorted(path.glob("*.dcm"))[0]
    data = path.read_bytes()
    lean = read_classic_header(data)
    assert lean is not None
    assert np.array_equal(lean.pixel_array, pydicom.dcmread(io.BytesIO(data)).pixel_array)


def test_truncated_file_hands_over() -> None:
    ds = synth.mr_slices(synth.volume_pixels((1, 4, 4)))[0]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    assert read_classic_header(data) is not None
    for cut in (140, 200, 300, len(data) - 5):  # in the meta group, the header, the pixels
        assert read_classic_header(data[:cut]) is None, cut
