"""Files of the synthetic cohort: DICOM validity, read-back equality, RTSTRUCT and RTDOSE."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.synthetic.cohort import (
    FORMATS,
    PatientRecord,
    dicom_study_dir,
    generate_cohort,
    read_table,
)
from inference.synthetic.outcome import response_category, survival_class
from inference.synthetic.scanner import CONTRASTS
from tests.inference.synthetic.conftest import SEED, SPACING

Cohort = tuple[Path, list[PatientRecord]]


def _series_dirs(patient_dir: Path, phase: str) -> dict[str, Path]:
    out = {}
    for d in sorted((patient_dir / "dicom" / phase).iterdir()):
        if d.name[:3].isdigit():
            out[d.name.split("_", 1)[1]] = d
    return out


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_every_dicom_object_passes_dciodvfy(small_cohort: Cohort, dciodvfy: str) -> None:
    out, _ = small_cohort
    files = sorted(out.rglob("*.dcm"))
    # 2 patients x (8 MR series + RTSTRUCT + RTDOSE + a reader's SEG per study)
    assert len({f.parent for f in files}) == 24

    def check(path: Path) -> list[str]:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        text = run.stdout + run.stderr
        bad = [line for line in text.splitlines() if line.startswith("Error")]
        if run.returncode not in (0, 1) or "Assertion" in text:
            bad.append(f"dciodvfy exited {run.returncode}: {text[-300:]}")
        return [f"{path.relative_to(out)}: {line}" for line in bad]

    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for result in pool.map(check, files) for p in result]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("phase", ["pre", "post"])
def test_mr_series_read_back_equal_the_nifti(small_cohort: Cohort, phase: str) -> None:
    out, records = small_cohort
    for record in records:
        pdir = out / record.patient_id
        series = _series_dirs(pdir, phase)
        assert sorted(series) == sorted(CONTRASTS)
        for contrast, folder in series.items():
            dcm = _read_series(folder)
            nii = sitk.ReadImage(str(pdir / "nifti" / f"{phase}_{contrast}.nii.gz"))
            a, b = sitk.GetArrayFromImage(dcm), sitk.GetArrayFromImage(nii)
            assert a.shape == b.shape, (contrast, a.shape, b.shape)
            assert np.array_equal(a.astype(np.int32), b.astype(np.int32)), contrast
            assert np.allclose(dcm.GetSpacing(), nii.GetSpacing(), atol=1e-4)
            assert np.allclose(dcm.GetOrigin(), nii.GetOrigin(), atol=1e-3)
            assert np.allclose(dcm.GetDirection(), nii.GetDirection(), atol=1e-6)
            assert a.max() > 100, "images must not be empty"


def test_rtstruct_rasterised_independently_matches_the_gtv(small_cohort: Cohort) -> None:
    from tests.sr_writer.test_rtstruct import rasterise_with_dcmrtstruct2nii

    out, records = small_cohort
    for record in records:
        pdir = out / record.patient_id
        t1c = _series_dirs(pdir, "pre")["t1c"]
        masks = rasterise_with_dcmrtstruct2nii(pdir / "dicom/pre/RTSTRUCT/rtstruct.dcm", t1c)
        assert sorted(masks) == ["CTV", "GTV", "PTV"]
        for name in ("GTV", "CTV", "PTV"):
            truth = sitk.GetArrayFromImage(
                sitk.ReadImage(str(pdir / f"nifti/{name.lower()}.nii.gz"))
            )
            truth = truth.astype(bool)
            assert truth.any(), name
            dice = 2 * np.sum(masks[name] & truth) / (masks[name].sum() + truth.sum())
            assert dice >= 0.9, (record.patient_id, name, dice)


def test_rtstruct_and_rtdose_share_the_mr_frame_of_reference(small_cohort: Cohort) -> None:
    out, records = small_cohort
    for record in records:
        pdir = out / record.patient_id
        mr = pydicom.dcmread(next(_series_dirs(pdir, "pre")["t1c"].glob("*.dcm")))
        rs = pydicom.dcmread(pdir / "dicom/pre/RTSTRUCT/rtstruct.dcm")
        rd = pydicom.dcmread(pdir / "dicom/pre/RTDOSE/rtdose.dcm")
        post = pydicom.dcmread(next(_series_dirs(pdir, "post")["t1c"].glob("*.dcm")))
        for_uid = mr.FrameOfReferenceUID
        assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == for_uid
        assert {r.ReferencedFrameOfReferenceUID for r in rs.StructureSetROISequence} == {for_uid}
        assert rd.FrameOfReferenceUID == for_uid
        assert rs.StudyInstanceUID == rd.StudyInstanceUID == mr.StudyInstanceUID
        assert post.StudyInstanceUID != mr.StudyInstanceUID
        assert post.PatientID == mr.PatientID == record.patient_id
        assert [o.RTROIInterpretedType for o in rs.RTROIObservationsSequence] == [
            "GTV",
            "CTV",
            "PTV",
        ]


def test_rtdose_holds_the_nifti_dose(small_cohort: Cohort) -> None:
    out, records = small_cohort
    for record in records:
        pdir = out / record.patient_id
        rd = pydicom.dcmread(pdir / "dicom/pre/RTDOSE/rtdose.dcm")
        dose = rd.pixel_array * float(rd.DoseGridScaling)
        nii = sitk.ReadImage(str(pdir / "nifti/dose.nii.gz"))
        ref = sitk.GetArrayFromImage(nii)
        assert dose.shape == ref.shape
        assert np.abs(dose - ref).max() < 2e-3  # 16-bit quantisation, ~1 mGy
        assert np.allclose([float(v) for v in rd.ImagePositionPatient], nii.GetOrigin(), atol=1e-3)
        offsets = np.asarray(rd.GridFrameOffsetVector, dtype=float)
        assert np.allclose(np.diff(offsets), nii.GetSpacing()[2])
        ptv = sitk.GetArrayFromImage(sitk.ReadImage(str(pdir / "nifti/ptv.nii.gz"))).astype(bool)
        assert np.percentile(dose[ptv], 5) >= 55.0  # D95 on the acquisition grid


def test_headers_are_realistic_and_unicode(small_cohort: Cohort) -> None:
    out, records = small_cohort
    descriptions = set()
    for record in records:
        pdir = out / record.patient_id
        for contrast, folder in _series_dirs(pdir, "pre").items():
            ds = pydicom.dcmread(next(folder.glob("*.dcm")))
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert ds.Modality == "MR" and ds.Manufacturer and ds.InstitutionName
            assert "SYNTHETIC" in ds.ImageComments
            assert ds.PatientSex in ("M", "F") and len(ds.PatientBirthDate) == 8
            assert ("ContrastBolusAgent" in ds) == (contrast == "t1c")
            descriptions.add(ds.SeriesDescription)
            name = str(ds.PatientName)
            assert "^" in name
    # two sites, two vendors' naming: 8 distinct series descriptions
    assert len(descriptions) == 8
    pre = dicom_study_dir(out, records[0].patient_id)
    assert sorted(p.name for p in pre.iterdir()) == [
        "002_t1", "003_t1c", "004_t2", "005_flair", "RTDOSE", "RTSTRUCT"
    ]  # fmt: skip
    raw = (out / records[0].patient_id / "dicom/pre/RTSTRUCT/rtstruct.dcm").read_bytes()
    assert (
        str(
            pydicom.dcmread(
                out / records[0].patient_id / "dicom/pre/RTSTRUCT/rtstruct.dcm"
            ).PatientName
        ).encode()
        in raw
    )


def test_each_study_has_the_age_and_an_accession_number_of_its_own(small_cohort: Cohort) -> None:
    """PatientAge follows the birth and study dates in both studies (the follow-up carried the
    pre-treatment age), and the accession number holds the whole cohort seed (with its last
    three digits only, cohorts whose seeds differ by 1000 shared accession numbers)."""
    import datetime

    out, records = small_cohort
    accessions = set()
    for record in records:
        for phase in ("pre", "post"):
            folder = _series_dirs(out / record.patient_id, phase)["t1c"]
            ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
            birth = datetime.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
            day = datetime.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
            years = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
            assert ds.PatientAge == f"{years:03d}Y", (record.patient_id, phase)
            assert str(ds.AccessionNumber).startswith(f"A{SEED % 100000:05d}")
            accessions.add(str(ds.AccessionNumber))
    assert len(accessions) == 2 * len(records)


def test_non_ascii_names_occur(small_cohort: Cohort) -> None:
    from inference.synthetic.cohort import FAMILY_NAMES, GIVEN_F, GIVEN_M

    assert sum(not n.isascii() for n in FAMILY_NAMES) >= len(FAMILY_NAMES) // 2
    assert all(any(not n.isascii() for n in names) for names in (GIVEN_F, GIVEN_M))


def test_cohort_table_is_consistent(small_cohort: Cohort) -> None:
    out, records = small_cohort
    rows = read_table(out / "cohort.csv")
    assert [r["patient_id"] for r in rows] == [r.patient_id for r in records]
    assert len({r["site"] for r in rows}) == 2
    for row in rows:
        pre, post = float(row["pre_enhancing_ml"]), float(row["post_enhancing_ml"])
        assert row["response_category"] == response_category(pre, post)
        months = float(row["survival_months"])
        assert row["survival_class"] == survival_class(months)
        assert float(row["ptv_d95_gy"]) >= 57.0
        assert 54.0 <= float(row["dose_max_gy"]) <= 66.0
        assert float(row["gtv_ml"]) == pytest.approx(float(row["pre_core_ml"]))
        assert float(row["ctv_ml"]) > float(row["gtv_ml"])
        assert float(row["ptv_ml"]) > float(row["ctv_ml"])
        assert 56 <= int(row["follow_up_days_after_rt"]) <= 84
        assert row["mgmt"] in ("methylated", "unmethylated")
        assert row["extent_of_resection"] in ("GTR", "STR", "biopsy")


def test_label_maps_hold_the_tumour_compartments(small_cohort: Cohort) -> None:
    out, records = small_cohort
    for record in records:
        pdir = out / record.patient_id
        pre = sitk.GetArrayFromImage(sitk.ReadImage(str(pdir / "nifti/pre_labels.nii.gz")))
        assert {2, 3} <= set(np.unique(pre).tolist()) <= {0, 1, 2, 3}
        gtv = sitk.GetArrayFromImage(sitk.ReadImage(str(pdir / "nifti/gtv.nii.gz"))).astype(bool)
        assert np.array_equal(gtv, np.isin(pre, (1, 3)))
        density = sitk.GetArrayFromImage(sitk.ReadImage(str(pdir / "nifti/density_pre.nii.gz")))
        assert density.min() >= 0.0 and density.max() <= 1.0
        assert density[pre == 3].mean() > density[pre == 2].mean() > 0


def test_deterministic_for_a_seed_and_independent_of_jobs(
    small_cohort: Cohort, tmp_path: Path
) -> None:
    out, _ = small_cohort
    again = tmp_path / "again"
    generate_cohort(again, patients=2, sites=2, seed=SEED, spacing_mm=SPACING, jobs=2)
    assert (again / "cohort.csv").read_bytes() == (out / "cohort.csv").read_bytes()
    first = sorted(p.relative_to(out) for p in out.rglob("*.dcm"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.dcm"))
    for rel in first:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    for rel in sorted(p.relative_to(out) for p in out.rglob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / rel)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(again / rel)))
        assert np.array_equal(a, b), rel

    other = tmp_path / "other"
    generate_cohort(other, patients=1, sites=2, seed=SEED + 1, spacing_mm=SPACING, formats=())
    row_a = read_table(out / "cohort.csv")[0]
    row_b = read_table(other / "cohort.csv")[0]
    assert row_a["pre_core_ml"] != row_b["pre_core_ml"]
    assert FORMATS == ("nifti", "dicom")


def test_fast_slice_writer_writes_what_pydicom_writes(small_cohort: Cohort) -> None:
    """The MR slices are encoded partly by hand: they must equal pydicom's own encoding."""
    import io

    out, records = small_cohort
    for record in records:
        for phase in ("pre", "post"):
            for folder in _series_dirs(out / record.patient_id, phase).values():
                files = sorted(folder.glob("*.dcm"))
                for path in (files[0], files[len(files) // 2], files[-1]):
                    raw = path.read_bytes()
                    buf = io.BytesIO()
                    pydicom.dcmread(io.BytesIO(raw)).save_as(buf, enforce_file_format=True)
                    assert buf.getvalue() == raw, path


@pytest.mark.parametrize("profile_index", range(5))
def test_every_site_profile_writes_valid_mr_headers(
    profile_index: int, tmp_path: Path, dciodvfy: str
) -> None:
    import datetime

    from dicom_node.types import PatientStudy, Volume
    from inference.synthetic import dicom_export as dx
    from inference.synthetic.scanner import BASE_PROFILES

    profile = BASE_PROFILES[profile_index]
    grid = Volume(np.zeros((3, 8, 8), bool), (2.0, 2.0, 5.0), (-8.0, -8.0, 0.0), np.eye(3))
    patient = PatientStudy(
        study_instance_uid=dx.derived_uid("t", profile_index),
        patient_name="Østergaard^Åse",
        patient_id="P1",
        patient_birth_date="19600101",
        patient_sex="F",
        study_date="20240101",
        study_time="080000",
        study_id="1",
        accession_number="A1",
        referring_physician_name="Dvořák^Antonín",
        extra={"StudyDescription": profile.study_description},
    )
    pixels = np.random.default_rng(0).integers(0, 4000, (3, 8, 8)).astype(np.uint16)
    for contrast in CONTRASTS:
        info = dx.SeriesInfo(
            contrast, profile.descriptions[contrast], 2, dx.derived_uid("s", contrast),
            datetime.datetime(2024, 1, 1, 8, 5),
        )  # fmt: skip
        ref = dx.write_mr_series(
            tmp_path / contrast, pixels, grid, patient, profile, info, "1.2.3.4", "064Y"
        )
        assert len(ref.sop_instance_uids) == 3
        run = subprocess.run(
            [dciodvfy, str(tmp_path / contrast / "0002.dcm")], capture_output=True, text=True
        )
        errors = [x for x in (run.stdout + run.stderr).splitlines() if x.startswith("Error")]
        assert not errors, (profile.model, contrast, errors)
        ds = pydicom.dcmread(tmp_path / contrast / "0002.dcm")
        assert ds.SeriesDescription == profile.descriptions[contrast]
        assert ds.Manufacturer == profile.manufacturer
        assert float(ds.MagneticFieldStrength) == profile.field_t
        assert ("InversionTime" in ds) == ("IR" in ds.ScanningSequence)
        assert np.array_equal(ds.pixel_array, pixels[1])
