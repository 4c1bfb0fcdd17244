"""RTSTRUCT of the predicted tumour, read back by independent libraries.

Two readers, neither sharing code with our writer:

- dcmrtstruct2nii (SimpleITK geometry, scikit-image polygon fill), on the default grid with
  non-square pixels (0.9 x 0.8 mm);
- rt-utils (OpenCV ``fillPoly``), on a grid with square pixels: rt-utils builds its
  patient-to-pixel matrix with PixelSpacing's two values swapped (row spacing along the row
  direction), so on non-square pixels it misplaces every contour whatever the writer does; it
  also fills the pixels its rounded polygon edges touch (a half-pixel rim), hence a larger
  tumour in-plane for its Dice to be meaningful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from sr_writer.outputs import build_outputs
from tests.sr_writer.synthetic_job import (
    JobCase,
    default_case,
    default_outputs,
    job_inputs,
    make_case,
    source_mr_datasets,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _write_series(case: JobCase, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for ds in source_mr_datasets(case):
        ds.save_as(folder / f"{ds.InstanceNumber:03d}.dcm", enforce_file_format=True)
    return folder


def test_rtstruct_labels_and_frame_of_reference() -> None:
    case = default_case()
    rt = default_outputs().rtstruct
    assert rt.Modality == "RTSTRUCT"
    assert rt.SeriesDescription.startswith("SYNTHETIC PREDICTION")
    assert rt.ContentQualification == "RESEARCH"
    ref = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == case.t1c.frame_of_reference_uid
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["PRED_TUMOUR"]
    assert rt.ContributingEquipmentSequence[0].ManufacturerModelName == "glioforecast-ldm-demo"


def test_dcmrtstruct2nii_reads_the_predicted_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("dcmrtstruct2nii")
    # dcmrtstruct2nii 5 calls pydicom.read_file, which pydicom 3 renamed dcmread
    monkeypatch.setattr(pydicom, "read_file", pydicom.dcmread, raising=False)
    import SimpleITK as sitk
    from dcmrtstruct2nii.adapters.convert.rtstructcontour2mask import DcmPatientCoords2Mask
    from dcmrtstruct2nii.adapters.input.contours.rtstructinputadapter import RtStructInputAdapter
    from dcmrtstruct2nii.adapters.input.image.dcminputadapter import DcmInputAdapter

    case = default_case()
    series = _write_series(case, tmp_path / "t1c")
    rt_path = tmp_path / "rtstruct.dcm"
    default_outputs().rtstruct.save_as(rt_path, enforce_file_format=True)
    image = DcmInputAdapter().ingest(str(series))
    [roi] = RtStructInputAdapter().ingest(str(rt_path))
    assert roi["name"] == "PRED_TUMOUR"
    got = sitk.GetArrayFromImage(DcmPatientCoords2Mask().convert(roi["sequence"], image, 0, 1))
    expected = np.asarray(case.prediction.tumour_mask.array, dtype=bool)
    assert got.shape == expected.shape
    d = dice(got.astype(bool), expected)
    assert d >= 0.95, f"Dice {d:.4f} between dcmrtstruct2nii's mask and the prediction"


def test_rt_utils_reads_the_predicted_mask(tmp_path: Path) -> None:
    rt_utils = pytest.importorskip("rt_utils")
    case = make_case((8, 96, 96), spacing=(0.8, 0.8, 2.5))
    out = build_outputs(case.prediction, job_inputs(case))
    series = _write_series(case, tmp_path / "t1c")
    rt_path = tmp_path / "rs" / "rtstruct.dcm"  # rt-utils wants it outside the series folder
    rt_path.parent.mkdir()
    out.rtstruct.save_as(rt_path, enforce_file_format=True)

    rt = rt_utils.RTStructBuilder.create_from(
        dicom_series_path=str(series), rt_struct_path=str(rt_path)
    )
    assert rt.get_roi_names() == ["PRED_TUMOUR"]
    got = rt.get_roi_mask_by_name("PRED_TUMOUR")  # rows x columns x slices, rt-utils' order
    order = [str(d.SOPInstanceUID) for d in rt.series_data]
    expected = np.asarray(case.prediction.tumour_mask.array, dtype=bool)
    ours = np.stack(
        [expected[case.t1c_series.sop_instance_uids.index(uid)] for uid in order], axis=-1
    )
    assert got.shape == ours.shape
    assert not (ours & ~got).any(), "rt-utils misses predicted voxels"
    d = dice(got.astype(bool), ours)
    assert d >= 0.95, f"Dice {d:.4f} between rt-utils' mask and the prediction, expected >= 0.95"
