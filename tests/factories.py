"""Small DICOM studies for transport tests (the synthetic cohort makes the realistic ones)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RTStructureSetStorage,
    generate_uid,
)


def _base(sop_class: str, study_uid: str, series_uid: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Lefèvre^Zoë"
    ds.PatientID = "GF-TEST-001"
    ds.PatientBirthDate = "19610402"
    ds.PatientSex = "F"
    ds.StudyDate = "20261101"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    return ds


def mr_series(
    folder: Path,
    description: str,
    *,
    study_uid: str,
    frame_uid: str,
    slices: int = 4,
    size: int = 16,
    series_number: int = 1,
    contrast: bool = False,
) -> list[Path]:
    """Write an axial MR series (one file per slice); returns the paths."""
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(series_number)
    for k in range(slices):
        ds = _base(MRImageStorage, study_uid, series_uid, "MR")
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        if contrast:
            ds.ContrastBolusAgent = "Gadobutrol"
        ds.ImagePositionPatient = [-16.0, -16.0, 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [2.0, 2.0]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"{description.replace(' ', '_')}_{k + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rtstruct(folder: Path, *, study_uid: str, frame_uid: str, roi: str = "GTV") -> Path:
    """An RT Structure Set header with one ROI (enough for transport and role tests)."""
    ds = _base(RTStructureSetStorage, study_uid, generate_uid(), "RTSTRUCT")
    ds.SeriesDescription = "RT structures"
    ds.SeriesNumber = 99
    ds.StructureSetLabel = "PLAN"
    ds.StructureSetDate = "20261101"
    ds.StructureSetTime = "120000"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame_uid
    ds.ReferencedFrameOfReferenceSequence = [ref]
    roi_ds = Dataset()
    roi_ds.ROINumber = 1
    roi_ds.ReferencedFrameOfReferenceUID = frame_uid
    roi_ds.ROIName = roi
    roi_ds.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi_ds]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def small_study(folder: Path, *, slices: int = 4, size: int = 16) -> dict[str, list[Path]]:
    """T1-Gd + FLAIR + RTSTRUCT of one patient; returns paths by intended role."""
    study_uid, frame_uid = generate_uid(), generate_uid()
    return {
        "t1c": mr_series(
            folder / "t1c",
            "AX T1 POST GD",
            study_uid=study_uid,
            frame_uid=frame_uid,
            slices=slices,
            size=size,
            series_number=5,
            contrast=True,
        ),
        "flair": mr_series(
            folder / "flair",
            "AX T2 FLAIR",
            study_uid=study_uid,
            frame_uid=frame_uid,
            slices=slices,
            size=size,
            series_number=3,
        ),
        "rtstruct": [rtstruct(folder / "rt", study_uid=study_uid, frame_uid=frame_uid)],
    }


def copy_series(
    files: Sequence[Path],
    out: Path,
    description: str,
    number: int,
    image_type: Sequence[str],
    repeats: int = 1,
) -> list[Path]:
    """The series of ``files`` again as another series of the same study (new UIDs): as a
    scanner's 4D dynamic series (``repeats`` time points at each position), MIP or MPR would
    arrive with it."""
    out.mkdir(parents=True)
    series_uid, written = generate_uid(), []
    for t in range(repeats):
        for k, path in enumerate(files):
            ds = dcmread(path)
            uid = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, number
            ds.SeriesDescription = ds.ProtocolName = description
            ds.ImageType = list(image_type)
            ds.InstanceNumber = t * len(files) + k + 1
            if repeats > 1:
                ds.TemporalPositionIdentifier, ds.AcquisitionNumber = t + 1, t + 1
            written.append(out / f"{number}_{t}_{k:03d}.dcm")
            ds.save_as(written[-1], enforce_file_format=True)
    return written


def htj2k_copy(source: Path, target: Path) -> Path:
    """``source`` (one uncompressed grayscale frame) with its Pixel Data compressed losslessly
    to High-Throughput JPEG 2000 (HTJ2K Lossless Only) by OpenJPH's ``ojph_compress``."""
    import subprocess
    import tempfile

    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = dcmread(source)
    pixels = ds.pixel_array
    with tempfile.TemporaryDirectory() as work:
        pgm, codestream = Path(work) / "frame.pgm", Path(work) / "frame.j2c"
        header = f"P5\n{ds.Columns} {ds.Rows}\n{2**ds.BitsStored - 1}\n".encode()
        pgm.write_bytes(header + pixels.astype(">u2").tobytes())
        subprocess.run(
            ["ojph_compress", "-i", str(pgm), "-o", str(codestream), "-reversible", "true"],
            check=True, capture_output=True,
        )  # fmt: skip
        ds.PixelData = encapsulate([codestream.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(target, enforce_file_format=True)
    return target
