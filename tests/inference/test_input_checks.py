"""What reading a study or a cohort refuses: NaN and infinite voxels (SimpleITK reads them as 0
from NIfTI), a blank T1-Gd or FLAIR, truth images off the T1-Gd grid, a cohort table that is not
UTF-8; and the table's line numbers in errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_node.errors import InputError
from dicom_node.types import Volume
from inference.data import (
    load_truth,
    patient_inputs,
    prepare_study,
    read_cohort,
    read_volume,
    study_inputs_from_nifti,
    write_volume,
)
from inference.model_config import tiny_config
from inference.synthetic.cohort import PatientRecord

Cohort = tuple[Path, list[PatientRecord]]


def _nifti_copy(tiny_cohort: Cohort, to: Path) -> Path:
    """A copy of the first patient's nifti/ folder."""
    patient = read_cohort(tiny_cohort[0])[0]
    shutil.copytree(patient.folder, to)
    return to


def _cohort_copy(tiny_cohort: Cohort, to: Path, table: bytes) -> Path:
    """The tiny cohort's patients (linked) under another ``cohort.csv``."""
    to.mkdir()
    for record in tiny_cohort[1]:
        (to / record.patient_id).symlink_to(tiny_cohort[0] / record.patient_id)
    (to / "cohort.csv").write_bytes(table)
    return to


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4"])
def test_nifti_voxels_that_are_not_finite_are_refused_and_counted(
    tmp_path: Path, name: str, dtype: str
) -> None:
    """SimpleITK (2.5) read NaN and infinite NIfTI voxels as 0: training and prediction went on
    with them zeroed. Counted across chunks of the stream (the volume is over 1 MiB)."""
    a = np.full((40, 80, 80), 100.0, dtype=dtype)
    a[0, 0, :3] = np.nan
    a[-1, -1, -2:] = [np.inf, -np.inf]
    img = nib.Nifti1Image(a, np.eye(4))
    if dtype == ">f4":
        img = nib.Nifti1Image(a, np.eye(4), img.header.as_byteswapped(">"))
    nib.save(img, tmp_path / name)
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / name)
    assert str(err.value) == (
        f"image {tmp_path / name}: expected finite voxel values, found 5 NaN/Inf voxels "
        "(3 NaN, 2 infinite); fix or mask them where the image was made"
    )
    a[np.isnan(a) | np.isinf(a)] = 0
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / name)
    assert read_volume(tmp_path / name).array.shape == (80, 80, 40)


def test_voxels_that_are_not_finite_are_refused_in_other_formats(tmp_path: Path) -> None:
    vol = Volume(
        array=np.ones((4, 5, 6), np.float32), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
    )  # fmt: skip
    vol.array[1, 2, 3] = np.nan
    write_volume(vol, tmp_path / "v.mha")
    with pytest.raises(InputError, match=r"found 1 NaN/Inf voxels \(1 NaN, 0 infinite\)"):
        read_volume(tmp_path / "v.mha")


def test_a_blank_t1c_or_flair_is_refused_a_blank_dose_is_not(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """A T1-Gd of 500 everywhere was predicted from. A dose map of zeros ("no dose") stays."""
    d = _nifti_copy(tiny_cohort, tmp_path / "nifti")
    for name in ("dose.nii.gz", "pre_labels.nii.gz"):
        vol = read_volume(d / name)
        write_volume(vol.with_array(np.zeros(vol.shape, np.float32)), d / name)
    assert study_inputs_from_nifti(d).dose is not None
    for name, what, value in (("pre_t1c", "T1-Gd", 500), ("pre_flair", "FLAIR", 0)):
        original = (d / f"{name}.nii.gz").read_bytes()
        vol = read_volume(d / f"{name}.nii.gz")
        write_volume(vol.with_array(np.full(vol.shape, value, np.uint16)), d / f"{name}.nii.gz")
        with pytest.raises(InputError) as err:
            study_inputs_from_nifti(d)
        assert str(err.value) == (
            f"{d / name}.nii.gz: expected an image with contrast, found a blank {what} (every "
            f"voxel {value})"
        )
        (d / f"{name}.nii.gz").write_bytes(original)


def test_a_blank_t1c_is_refused_whatever_the_inputs_were_read_from(
    tiny_cohort: Cohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs from DICOM (the node, ``predict`` on a DICOM study, a DICOM cohort) meet the same
    check: in the model-grid preparation, and when a cohort patient's inputs or truth are read."""
    from inference.dicom_cohort import DicomCase

    patient = read_cohort(tiny_cohort[0], source="dicom")[0]
    inputs = patient_inputs(patient)
    blank = inputs.t1c.with_array(np.full(inputs.t1c.shape, 7, np.int16))
    with pytest.raises(InputError, match=r"^study inputs: .* blank T1-Gd \(every voxel 7\)"):
        prepare_study(dataclasses.replace(inputs, t1c=blank), tiny_config().preprocessing)
    flair = dataclasses.replace(inputs, flair=blank)
    with pytest.raises(InputError, match=r"blank FLAIR \(every voxel 7\)"):
        prepare_study(flair, tiny_config().preprocessing)

    read_inputs, read_truth = DicomCase.inputs, DicomCase.truth
    monkeypatch.setattr(
        DicomCase, "inputs", lambda c, s=None: dataclasses.replace(read_inputs(c, s), t1c=blank)
    )
    with pytest.raises(InputError) as err:
        patient_inputs(patient)
    assert str(err.value) == (
        f"patient {patient.patient_id} (DICOM under {patient.folder}): expected an image with "
        "contrast, found a blank T1-Gd (every voxel 7)"
    )
    monkeypatch.setattr(DicomCase, "inputs", read_inputs)

    def blank_post(case: DicomCase, reference: Volume) -> object:
        truth = read_truth(case, reference)
        post = truth.post_t1c.with_array(np.zeros(truth.post_t1c.shape, np.int16))
        return dataclasses.replace(truth, post_t1c=post)

    monkeypatch.setattr(DicomCase, "truth", blank_post)
    with pytest.raises(InputError, match="found a blank post-treatment T1-Gd"):
        load_truth(patient, inputs)


@pytest.mark.parametrize(
    "name", ["post_labels.nii.gz", "post_t1c.nii.gz", "pre_labels.nii.gz", "gtv.nii.gz"]
)
def test_truth_images_off_the_t1c_grid_are_refused(
    tiny_cohort: Cohort, tmp_path: Path, name: str
) -> None:
    """post_labels of another shape crashed with a numpy broadcast error; one shifted 40 mm was
    ORed into the tumour region as if it were on the T1-Gd grid."""
    patient = read_cohort(tiny_cohort[0])[0]
    d = _nifti_copy(tiny_cohort, tmp_path / "nifti")
    moved = dataclasses.replace(patient, folder=d)
    vol = read_volume(d / name)
    t1c = read_volume(d / "pre_t1c.nii.gz")
    shifted = dataclasses.replace(vol, origin=(vol.origin[0] - 40.0, *vol.origin[1:]))
    write_volume(shifted, d / name)
    inputs = None if name == "gtv.nii.gz" else study_inputs_from_nifti(d)
    with pytest.raises(InputError) as err:
        load_truth(moved, inputs)
    grid = "spacing {} mm, origin ({}) mm".format
    spacing = "x".join(f"{s:g}" for s in t1c.spacing)
    origin = ", ".join(f"{o:.1f}" for o in t1c.origin)
    origin_found = ", ".join(f"{o:.1f}" for o in shifted.origin)
    assert str(err.value) == (
        f"{d / name}: expected the grid of pre_t1c.nii.gz (shape {t1c.shape}, "
        f"{grid(spacing, origin)}), found shape {t1c.shape}, {grid(spacing, origin_found)}"
    )
    write_volume(dataclasses.replace(vol, array=np.asarray(vol.array)[:, :, :-2]), d / name)
    with pytest.raises(InputError, match=rf"found shape \({t1c.shape[0]}, {t1c.shape[1]}, "):
        load_truth(moved, inputs)


def test_cohort_table_saved_by_excel_as_utf8_with_bom_is_read(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark: the first column was read as
    '\\ufeffpatient_id', and every row refused as having no patient_id."""
    table = (tiny_cohort[0] / "cohort.csv").read_bytes()
    bom = _cohort_copy(tiny_cohort, tmp_path / "bom", b"\xef\xbb\xbf" + table)
    assert [p.patient_id for p in read_cohort(bom)] == [r.patient_id for r in tiny_cohort[1]]


def test_cohort_table_not_in_utf8_is_refused_naming_where(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """A table saved as Latin-1 / Windows-1252 (Excel's plain "CSV") ended in a
    UnicodeDecodeError traceback."""
    lines = (tiny_cohort[0] / "cohort.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    header, first, rest = lines[0], lines[1], lines[2:]
    site = first.split(",")[1]
    latin = first.replace(site, "Zürich", 1)
    table = (header + latin + "".join(rest)).encode("cp1252")
    folder = _cohort_copy(tiny_cohort, tmp_path / "latin", table)
    with pytest.raises(InputError) as err:
        read_cohort(folder)
    at = next(i for i, b in enumerate(table) if b >= 0x80)
    assert str(err.value) == (
        f"{folder / 'cohort.csv'}: expected UTF-8 text, found byte 0x{table[at]:02x} at byte "
        f"{at} (line 2), "
        "which is not UTF-8 (a table saved as Latin-1 or Windows-1252, as Excel's plain 'CSV' "
        "does); save it as UTF-8 (Excel: 'CSV UTF-8')"
    )


def test_cohort_table_errors_give_the_line_in_the_file(tiny_cohort: Cohort, tmp_path: Path) -> None:
    """Rows were numbered from 2 in the order read: a blank line above a row made the line named
    in an error the one before it."""
    lines = (tiny_cohort[0] / "cohort.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    cells = lines[2].split(",")
    column = lines[0].split(",").index("response_category")
    cells[column] = "PR"
    table = lines[0] + lines[1] + "\n\n" + ",".join(cells) + "".join(lines[3:])
    folder = _cohort_copy(tiny_cohort, tmp_path / "blank", table.encode())
    with pytest.raises(InputError, match=r"cohort\.csv, line 5 \(patient .*found 'PR'"):
        read_cohort(folder)
    cells[column] = ""
    table = lines[0] + "\n" + lines[1] + ",".join(cells) + "".join(lines[3:])
    folder = _cohort_copy(tiny_cohort, tmp_path / "missing", table.encode())
    with pytest.raises(InputError, match=r"cohort\.csv, line 4: expected values for"):
        read_cohort(folder)
