"""RTSTRUCT writer: validity (dciodvfy), geometry, holes, and an independent rasterisation."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, SeriesRef, Volume
from sr_writer.contours import mask_contours
from sr_writer.rtstruct import RoiMask, build_rtstruct

MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"

Case = tuple[Volume, PatientStudy, SeriesRef, list[RoiMask]]


def _grid(
    shape: tuple[int, int, int] = (12, 40, 40),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
) -> Volume:
    return Volume(
        array=np.zeros(shape, dtype=np.uint16),
        spacing=spacing,
        origin=(-30.0, -25.5, 12.0),
        direction=np.eye(3),
        frame_of_reference_uid=generate_uid(),
        source_instance_uids=tuple(generate_uid() for _ in range(shape[0])),
        series_instance_uid=generate_uid(),
    )


def _patient() -> PatientStudy:
    return PatientStudy(
        study_instance_uid=generate_uid(),
        patient_name="Lefèvre^Zoë",
        patient_id="GF-0001",
        patient_birth_date="19610412",
        patient_sex="F",
        study_date="20240105",
        study_time="101500",
        study_id="1",
        accession_number="A1",
        extra={"StudyDescription": "Neuro^Tumeur"},
    )


def _shell(
    grid: Volume, centre_mm: tuple[float, float, float], r_out: float, r_in: float
) -> np.ndarray:
    k, j, i = np.indices(grid.shape)
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    xyz = ijk @ grid.affine.T
    d = np.linalg.norm(xyz[..., :3] - np.asarray(centre_mm), axis=-1)
    return (d <= r_out) & (d > r_in)


def _write_series(grid: Volume, patient: PatientStudy, folder: Path) -> SeriesRef:
    """A minimal valid MR series on ``grid`` (the reference of the structure set)."""
    folder.mkdir(parents=True, exist_ok=True)
    assert grid.series_instance_uid is not None
    for k, uid in enumerate(grid.source_instance_uids):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(MR_CLASS)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID, ds.SOPInstanceUID = MR_CLASS, uid
        ds.PatientName, ds.PatientID = patient.patient_name, patient.patient_id
        ds.StudyInstanceUID = patient.study_instance_uid
        ds.SeriesInstanceUID = grid.series_instance_uid
        ds.FrameOfReferenceUID = grid.frame_of_reference_uid
        ds.Modality, ds.InstanceNumber = "MR", k + 1
        position = grid.affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position[:3]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [grid.spacing[1], grid.spacing[0]]
        ds.SliceThickness = grid.spacing[2]
        ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.asarray(grid.array[k], dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return SeriesRef(
        series_instance_uid=grid.series_instance_uid,
        sop_class_uid=MR_CLASS,
        sop_instance_uids=grid.source_instance_uids,
        modality="MR",
    )


def _even_odd_raster(ds: Dataset, roi_number: int, grid: Volume) -> np.ndarray:
    """Voxel centres inside an odd number of the ROI's contours on their slice."""
    inv = np.linalg.inv(grid.affine)
    uid_to_k = {u: k for k, u in enumerate(grid.source_instance_uids)}
    out = np.zeros(grid.shape, dtype=bool)
    jj, ii = np.indices(grid.shape[1:])
    centres = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(float)
    roi = next(r for r in ds.ROIContourSequence if r.ReferencedROINumber == roi_number)
    for contour in roi.ContourSequence:
        k = uid_to_k[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        ijk = (inv @ np.c_[pts, np.ones(len(pts))].T)[:3].T
        assert np.allclose(ijk[:, 2], k, atol=1e-3), "contour does not lie on its slice"
        inside = MplPath(ijk[:, :2]).contains_points(centres).reshape(grid.shape[1:])
        out[k] ^= inside
    return out


def _build(grid: Volume, rois: list[RoiMask], ref: SeriesRef, patient: PatientStudy) -> Dataset:
    return build_rtstruct(
        rois=rois,
        reference_grid=grid,
        reference_series=ref,
        patient=patient,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_description="RT structures - tést",
        series_number=50,
        structure_set_label="PLAN1",
        content_datetime=datetime.datetime(2024, 1, 5, 12, 0, 0),
    )


@pytest.fixture()
def case(tmp_path: Path) -> Case:
    grid = _grid()
    patient = _patient()
    ref = _write_series(grid, patient, tmp_path / "mr")
    gtv = _shell(grid, (0.0, 4.0, 30.0), 12.0, 5.0)  # a hollow sphere: holes on middle slices
    ptv = _shell(grid, (0.0, 4.0, 30.0), 20.0, -1.0)
    rois = [
        RoiMask("GTV", grid.with_array(gtv), (255, 0, 0), "GTV"),
        RoiMask("PTV", grid.with_array(ptv), (0, 0, 255), "PTV"),
    ]
    return grid, patient, ref, rois


def test_contours_reproduce_mask_exactly_with_even_odd_rule(case: Case) -> None:
    grid, patient, ref, rois = case
    ds = _build(grid, rois, ref, patient)
    for number, roi in enumerate(rois, start=1):
        raster = _even_odd_raster(ds, number, grid)
        assert np.array_equal(raster, roi.mask.array), roi.name
    gtv_slices = [
        c.ContourImageSequence[0].ReferencedSOPInstanceUID
        for c in ds.ROIContourSequence[0].ContourSequence
    ]
    # the hollow sphere has two contours (outer + hole) on its central slices
    assert max(gtv_slices.count(u) for u in set(gtv_slices)) == 2


def test_vertices_are_sub_voxel() -> None:
    grid = _grid((3, 8, 8), (1.0, 1.0, 1.0))
    mask = np.zeros(grid.shape, dtype=bool)
    mask[1, 4, 3] = True
    (contour,) = mask_contours(grid.with_array(mask))
    ijk = (np.linalg.inv(grid.affine) @ np.c_[contour.points, np.ones(4)].T)[:3].T
    # a single voxel gives a diamond through the 4 mid-edge points around its centre (i=3, j=4)
    expected = {(2.5, 4.0), (3.5, 4.0), (3.0, 3.5), (3.0, 4.5)}
    assert {(round(a, 3), round(b, 3)) for a, b in ijk[:, :2]} == expected
    assert contour.k == 1


def test_header_and_references(case: Case) -> None:
    grid, patient, ref, rois = case
    ds = _build(grid, rois, ref, patient)
    assert ds.Modality == "RTSTRUCT"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Lefèvre^Zoë"
    assert ds.StudyDescription == "Neuro^Tumeur"
    for_item = ds.ReferencedFrameOfReferenceSequence[0]
    assert for_item.FrameOfReferenceUID == grid.frame_of_reference_uid
    series = for_item.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == list(
        grid.source_instance_uids
    )
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["GTV", "PTV"]
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["GTV", "PTV"]
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 0]


def test_passes_dciodvfy(case: Case, tmp_path: Path, dciodvfy: str) -> None:
    grid, patient, ref, rois = case
    ds = _build(grid, rois, ref, patient)
    path = tmp_path / "rs.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, text


def rasterise_with_dcmrtstruct2nii(rtstruct: Path, series_dir: Path) -> dict[str, np.ndarray]:
    """Masks [k, j, i] of every ROI, rasterised by dcmrtstruct2nii (SimpleITK geometry, skimage
    polygon fill, even-odd combination of the contours of a slice)."""
    pytest.importorskip("dcmrtstruct2nii")
    # dcmrtstruct2nii 5 still calls pydicom.read_file, which pydicom 3 renamed dcmread.
    if not hasattr(pydicom, "read_file"):
        pydicom.read_file = pydicom.dcmread  # type: ignore[attr-defined]
    import SimpleITK as sitk
    from dcmrtstruct2nii.adapters.convert.rtstructcontour2mask import DcmPatientCoords2Mask
    from dcmrtstruct2nii.adapters.input.contours.rtstructinputadapter import RtStructInputAdapter
    from dcmrtstruct2nii.adapters.input.image.dcminputadapter import DcmInputAdapter

    image = DcmInputAdapter().ingest(str(series_dir))
    out = {}
    for roi in RtStructInputAdapter().ingest(str(rtstruct)):
        if "sequence" not in roi:
            out[roi["name"]] = np.zeros(sitk.GetArrayFromImage(image).shape, dtype=bool)
            continue
        mask = DcmPatientCoords2Mask().convert(roi["sequence"], image, 0, 1)
        out[roi["name"]] = sitk.GetArrayFromImage(mask).astype(bool)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, np.sum(a) + np.sum(b)))


def test_dcmrtstruct2nii_rasterises_like_the_mask(case: Case, tmp_path: Path) -> None:
    grid, patient, ref, rois = case
    path = tmp_path / "rs.dcm"
    _build(grid, rois, ref, patient).save_as(path, enforce_file_format=True)
    masks = rasterise_with_dcmrtstruct2nii(path, tmp_path / "mr")
    for roi in rois:
        assert _dice(masks[roi.name], roi.mask.array) >= 0.99, roi.name


def test_rt_utils_rasterises_like_the_mask(case: Case, tmp_path: Path) -> None:
    rt_utils = pytest.importorskip("rt_utils")
    grid, patient, ref, rois = case
    # rt-utils assumes square slices with isotropic in-plane spacing (this grid is both) and
    # fills the pixels its rounded polygon edges pass through: it adds a half-voxel rim, so it
    # may add boundary voxels but must not miss any, and its Dice stays high on solid shapes.
    ds = _build(grid, rois, ref, patient)
    path = tmp_path / "rs" / "rs.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    rt = rt_utils.RTStructBuilder.create_from(str(tmp_path / "mr"), str(path))
    for roi in rois:
        other = np.transpose(rt.get_roi_mask_by_name(roi.name), (2, 0, 1))  # -> [k, j, i]
        truth = roi.mask.array
        assert not np.any(truth & ~other), roi.name
        assert _dice(other, truth) >= (0.9 if roi.name == "PTV" else 0.85), roi.name


def test_reread_keeps_unicode_and_contour_counts(case: Case, tmp_path: Path) -> None:
    grid, patient, ref, rois = case
    ds = _build(grid, rois, ref, patient)
    path = tmp_path / "rs.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert str(back.PatientName) == "Lefèvre^Zoë"
    assert back.SeriesDescription == "RT structures - tést"
    for item in back.ROIContourSequence:
        for c in item.ContourSequence:
            assert c.NumberOfContourPoints * 3 == len(c.ContourData)


def test_errors_say_what_is_wrong(case: Case) -> None:
    grid, patient, ref, rois = case
    small = Volume(np.zeros((2, 2, 2), bool), grid.spacing, grid.origin, grid.direction)
    with pytest.raises(ExportError, match="shape"):
        _build(grid, [RoiMask("GTV", small, (1, 2, 3), "GTV")], ref, patient)
    with pytest.raises(ExportError, match="interpreted type"):
        _build(grid, [RoiMask("GTV", rois[0].mask, (1, 2, 3), "TUMOUR")], ref, patient)
    with pytest.raises(ExportError, match="unique"):
        _build(grid, [rois[0], rois[0]], ref, patient)
    shifted = Volume(rois[0].mask.array, grid.spacing, (0.0, 0.0, 0.0), grid.direction)
    with pytest.raises(ExportError, match="geometry"):
        _build(grid, [RoiMask("GTV", shifted, (1, 2, 3), "GTV")], ref, patient)
    no_uids = Volume(grid.array, grid.spacing, grid.origin, grid.direction, "1.2.3")
    with pytest.raises(ExportError, match="one source instance UID per slice"):
        _build(
            no_uids,
            [RoiMask("GTV", no_uids.with_array(rois[0].mask.array), (1, 2, 3), "GTV")],
            ref,
            patient,
        )
    with pytest.raises(ExportError, match="boolean"):
        mask_contours(grid.with_array(np.full(grid.shape, 2, dtype=np.uint8)))
