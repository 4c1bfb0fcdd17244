"""DICOM files of a synthetic patient: MR series, RT structure set, RT dose.

Headers look like a scanner's (patient and study modules, equipment, sequence parameters,
contrast bolus, vendor-style series descriptions) and say in ``ImageComments`` that the images
are a synthetic phantom. UIDs are derived from the cohort seed and the patient index, so a run
with the same seed writes the same files. The follow-up study shares the pre-treatment frame of
reference: the phantom's follow-up images are delivered already aligned to the pre-treatment
grid (as if registered), which is what evaluation needs.

The RT dose references an RT plan (``ReferencedRTPlanSequence``, required for
``DoseSummationType`` PLAN) whose UID is derived like the others; the plan object itself is not
written.
"""

from __future__ import annotations

import datetime
import logging
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, SeriesRef, Volume
from inference.synthetic.scanner import SiteProfile, effective_ti, sequence_for
from sr_writer.labels import set_patient_study

logger = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
SYNTHETIC_NOTE = "SYNTHETIC PHANTOM (glioforecast synth) - not a patient - research use only"
GYROMAGNETIC_MHZ_PER_T = 42.577478


def derived_uid(*parts: object) -> str:
    """A UID that depends only on ``parts`` (pydicom root + SHA-512 of the parts)."""
    return str(generate_uid(entropy_srcs=["glioforecast-synth", *(str(p) for p in parts)]))


@dataclass(frozen=True)
class SeriesInfo:
    contrast: str  # t1, t1c, t2, flair
    description: str
    number: int
    series_uid: str
    acquisition_time: datetime.datetime


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "GLIOFORECAST"
    return meta


_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


def _raw_element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element; ``value`` already padded to an even length."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


class _SliceWriter:
    """Writes the slices of a series, encoding the header shared by all of them only once.

    The constant elements are encoded by pydicom in chunks that fall between the per-slice tags;
    a file is the preamble, its file meta information, then the chunks and the per-slice elements
    in tag order (explicit VR little endian, encoded directly). A test checks that the bytes
    equal what ``Dataset.save_as`` writes for the same dataset; pydicom spends ~6 ms per slice
    re-encoding the same header otherwise.
    """

    SOP_INSTANCE_UID = 0x00080018
    INSTANCE_NUMBER = 0x00200013
    POSITION = 0x00200032
    SLICE_LOCATION = 0x00201041
    PIXEL_DATA = 0x7FE00010
    VARYING = (SOP_INSTANCE_UID, INSTANCE_NUMBER, POSITION, SLICE_LOCATION, PIXEL_DATA)

    def __init__(self, base: Dataset, sop_class: str) -> None:
        clash = [Tag(t) for t in self.VARYING if Tag(t) in base]
        if clash:
            raise ExportError(f"constant header must not hold the per-slice tags {clash}")
        self.sop_class = sop_class
        self.charset = base.get("SpecificCharacterSet", "ISO_IR 6")
        self.chunks: list[bytes] = []
        lo: int | None = None
        for hi in [*self.VARYING, None]:
            chunk = Dataset()
            for elem in base.elements():
                if (lo is None or elem.tag > lo) and (hi is None or elem.tag < hi):
                    chunk.add(base[elem.tag])
            self.chunks.append(self._encode(chunk))
            lo = hi

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds, parent_encoding=self.charset)
        return bytes(fp.getvalue())

    def _meta(self, sop_uid: str) -> bytes:
        body = b"".join(
            [
                _raw_element(0x00020001, "OB", b"\x00\x01"),
                _raw_element(0x00020002, "UI", _text(self.sop_class, b"\x00")),
                _raw_element(0x00020003, "UI", _text(sop_uid, b"\x00")),
                _raw_element(0x00020010, "UI", _text(ExplicitVRLittleEndian, b"\x00")),
                _raw_element(0x00020012, "UI", _text(PYDICOM_IMPLEMENTATION_UID, b"\x00")),
                _raw_element(0x00020013, "SH", _text("GLIOFORECAST")),
            ]
        )
        return _raw_element(0x00020000, "UL", struct.pack("<I", len(body))) + body

    def write(
        self,
        path: Path,
        sop_uid: str,
        instance_number: int,
        position: Sequence[str],
        slice_location: str,
        pixels: bytes,
    ) -> None:
        if len(pixels) % 2:
            raise ExportError(f"pixel data must have an even length, found {len(pixels)}")
        varying = [
            _raw_element(self.SOP_INSTANCE_UID, "UI", _text(sop_uid, b"\x00")),
            _raw_element(self.INSTANCE_NUMBER, "IS", _text(str(instance_number))),
            _raw_element(self.POSITION, "DS", _text("\\".join(position))),
            _raw_element(self.SLICE_LOCATION, "DS", _text(slice_location)),
            _raw_element(self.PIXEL_DATA, "OW", pixels),
        ]
        parts = [b"\x00" * 128, b"DICM", self._meta(sop_uid), self.chunks[0]]
        for i, element in enumerate(varying):
            parts.append(element)
            parts.append(self.chunks[i + 1])
        path.write_bytes(b"".join(parts))


def _equipment(ds: Dataset, profile: SiteProfile) -> None:
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.ManufacturerModelName = profile.model
    ds.StationName = f"{profile.site.replace('SITE-', '')}MR1"
    ds.DeviceSerialNumber = str(zlib.crc32(profile.site.encode()) % 90000 + 10000)
    ds.SoftwareVersions = profile.software


def _ds_list(values: npt.ArrayLike, fmt: str = ".6f") -> list[str]:
    return [format(float(v), fmt).rstrip("0").rstrip(".") or "0" for v in np.ravel(values)]


def write_mr_series(
    folder: Path,
    pixels: npt.NDArray[np.uint16],
    grid: Volume,
    patient: PatientStudy,
    profile: SiteProfile,
    info: SeriesInfo,
    frame_of_reference_uid: str,
    patient_age: str,
) -> SeriesRef:
    """One classic single-frame MR series (one file per slice); returns its reference."""
    if pixels.shape != grid.shape:
        raise ExportError(f"MR pixels shape {pixels.shape} differs from grid {grid.shape}")
    if pixels.dtype != np.uint16:
        raise ExportError(f"MR pixels must be uint16, found {pixels.dtype}")
    folder.mkdir(parents=True, exist_ok=True)
    seq = sequence_for(profile, info.contrast)
    when = info.acquisition_time
    base = Dataset()
    set_patient_study(base, patient)
    base.PatientAge = patient_age
    base.Modality = "MR"
    base.SeriesInstanceUID = info.series_uid
    base.SeriesNumber = info.number
    base.SeriesDescription = info.description
    base.ProtocolName = info.description
    base.SeriesDate = when.strftime("%Y%m%d")
    base.SeriesTime = when.strftime("%H%M%S")
    base.BodyPartExamined = "BRAIN"
    base.PatientPosition = "HFS"
    base.OperatorsName = ""
    base.FrameOfReferenceUID = frame_of_reference_uid
    base.PositionReferenceIndicator = ""
    _equipment(base, profile)
    base.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    base.AcquisitionNumber = 1
    base.AcquisitionDate = when.strftime("%Y%m%d")
    base.AcquisitionTime = when.strftime("%H%M%S")
    base.ContentDate = when.strftime("%Y%m%d")
    base.ContentTime = when.strftime("%H%M%S")
    base.InstanceCreationDate = when.strftime("%Y%m%d")
    base.InstanceCreationTime = when.strftime("%H%M%S")
    base.ImageComments = SYNTHETIC_NOTE
    base.BurnedInAnnotation = "NO"
    di, dj, dk = grid.spacing
    direction = np.asarray(grid.direction, dtype=float)
    base.ImageOrientationPatient = _ds_list(np.concatenate([direction[:, 0], direction[:, 1]]))
    base.PixelSpacing = _ds_list([dj, di])
    base.SliceThickness = _ds_list([dk])[0]
    base.SpacingBetweenSlices = _ds_list([dk])[0]
    base.SOPClassUID = MR_IMAGE_STORAGE
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = grid.shape[1], grid.shape[2]
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 12, 11
    base.PixelRepresentation = 0
    # MR Image module
    base.ScanningSequence = seq.scanning_sequence.split("\\")
    base.SequenceVariant = seq.sequence_variant.split("\\")
    base.ScanOptions = seq.scan_options
    base.MRAcquisitionType = seq.acquisition
    base.SequenceName = seq.sequence_name
    base.RepetitionTime = _ds_list([seq.tr])[0]
    base.EchoTime = _ds_list([seq.te])[0]
    if "IR" in seq.scanning_sequence:
        base.InversionTime = _ds_list([effective_ti(profile, info.contrast)], ".1f")[0]
    base.EchoTrainLength = seq.echo_train
    base.NumberOfAverages = "1"
    base.ImagingFrequency = _ds_list([GYROMAGNETIC_MHZ_PER_T * profile.field_t], ".5f")[0]
    base.ImagedNucleus = "1H"
    base.MagneticFieldStrength = _ds_list([profile.field_t], ".1f")[0]
    base.FlipAngle = _ds_list([seq.flip])[0]
    base.PixelBandwidth = "200"
    base.ReceiveCoilName = "Head_32" if profile.field_t >= 2 else "HNS Head"
    base.TransmitCoilName = "Body"
    if info.contrast == "t1c":
        base.ContrastBolusAgent = profile.agent
        base.ContrastBolusRoute = "IV"
        base.ContrastBolusVolume = "7.5"
        base.ContrastBolusIngredient = "GADOLINIUM"
    brain = pixels[pixels > 0]
    hi = float(np.percentile(brain, 99.5)) if brain.size else 1.0
    base.WindowCenter = _ds_list([round(hi / 2)])[0]
    base.WindowWidth = _ds_list([max(1, round(hi))])[0]

    uids: list[str] = []
    affine = grid.affine
    writer = _SliceWriter(base, MR_IMAGE_STORAGE)
    for k in range(grid.shape[0]):
        uid = derived_uid(info.series_uid, "slice", k)
        pos = affine @ np.array([0.0, 0.0, float(k), 1.0])
        writer.write(
            folder / f"{k + 1:04d}.dcm",
            uid,
            k + 1,
            _ds_list(pos[:3]),
            _ds_list([float(np.dot(pos[:3], direction[:, 2]))])[0],
            np.ascontiguousarray(pixels[k], dtype="<u2").tobytes(),
        )
        uids.append(uid)
    return SeriesRef(
        series_instance_uid=info.series_uid,
        sop_class_uid=MR_IMAGE_STORAGE,
        sop_instance_uids=tuple(uids),
        modality="MR",
        series_description=info.description,
        series_number=info.number,
    )


def write_rtdose(
    path: Path,
    dose_gy: npt.NDArray[np.floating],
    grid: Volume,
    patient: PatientStudy,
    profile: SiteProfile,
    series_uid: str,
    sop_uid: str,
    plan_uid: str,
    frame_of_reference_uid: str,
    when: datetime.datetime,
    series_number: int = 200,
) -> None:
    """A grid-based RT Dose (multi-frame, 16-bit, DoseGridScaling) on ``grid``."""
    if dose_gy.shape != grid.shape:
        raise ExportError(f"dose shape {dose_gy.shape} differs from grid {grid.shape}")
    if not np.allclose(grid.direction, np.eye(3)):
        raise ExportError("the RT dose writer expects an axial grid (identity direction)")
    ds = Dataset()
    ds.file_meta = _file_meta(RT_DOSE_STORAGE, sop_uid)
    set_patient_study(ds, patient)
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "RTDOSE 60Gy/30fx PLAN"
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "glioforecast"
    ds.ManufacturerModelName = "synthetic planning"
    ds.InstitutionName = profile.institution
    ds.SoftwareVersions = "glioforecast synth"
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.ImageComments = SYNTHETIC_NOTE
    ds.ImagePositionPatient = _ds_list(grid.origin)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    di, dj, dk = grid.spacing
    ds.PixelSpacing = _ds_list([dj, di])
    ds.SliceThickness = _ds_list([dk])[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    # 16-bit dose (scaling ~1 mGy per count); dicom3tools cannot parse 32-bit OW pixel data
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = grid.shape[0]
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = _ds_list(np.arange(grid.shape[0]) * dk)
    dose64 = np.clip(np.asarray(dose_gy, dtype=np.float64), 0.0, None)
    scaling = float(f"{max(float(dose64.max()), 1e-3) / 65000.0:.6e}")
    counts = np.clip(np.rint(dose64 / scaling), 0, 65535)
    ds.DoseGridScaling = f"{scaling:.6e}"
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.TissueHeterogeneityCorrection = "IMAGE"
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
    plan_ref.ReferencedSOPInstanceUID = plan_uid
    ds.ReferencedRTPlanSequence = DicomSequence([plan_ref])
    ds.PixelData = counts.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass(frozen=True)
class ReaderSegment:
    """One segment of a reader's outline: its label and the phantom labels it covers."""

    label: str
    values: tuple[int, ...]
    necrosis: bool = False


#: what a reader outlines on each study (phantom labels: 1 necrotic core, 3 enhancing tumour,
#: 5 treatment-related enhancement, which a reader cannot tell from tumour on one scan)
READER_SEGMENTS = {
    "pre": (ReaderSegment("Enhancing tumour", (3,)), ReaderSegment("Necrotic core", (1,), True)),
    "post": (
        ReaderSegment("Enhancing lesion", (3, 5)),
        ReaderSegment("Necrotic core", (1,), True),
    ),
}


def write_reader_segmentation(
    path: Path,
    labels: npt.NDArray[np.integer],
    segments: Sequence[ReaderSegment],
    grid: Volume,
    source: SeriesRef,
    patient: PatientStudy,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    description: str,
    when: datetime.datetime,
) -> None:
    """A BINARY DICOM Segmentation of ``labels`` (on ``grid``, the T1-Gd series ``source``),
    one segment per :class:`ReaderSegment`, as a reader's manual outline."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from sr_writer.references import source_slice_datasets

    if labels.shape != grid.shape:
        raise ExportError(f"label map shape {labels.shape} differs from grid {grid.shape}")
    pixels = np.stack([np.isin(labels, s.values) for s in segments], axis=-1).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=s.label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Necrosis if s.necrosis else codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            anatomic_regions=[codes.SCT.Brain],
        )
        for n, s in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=source_slice_datasets(grid, source, patient),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="glioforecast",
        manufacturer_model_name="synthetic reader",
        software_versions="glioforecast synth",
        device_serial_number="0",
        content_description="SYNTHETIC PHANTOM reader outline",
        content_label="READER",
        content_creator_name="Synthetic^Reader",
        omit_empty_frames=False,
        series_description=description,
        content_date=when.date(),
        content_time=when.time(),
    )
    # what highdicom takes from the clock or draws at random, fixed so a seed rewrites the file
    seg["InstanceCreationDate"].value = when.strftime("%Y%m%d")
    seg["InstanceCreationTime"].value = when.strftime("%H%M%S")
    dimension_uid = derived_uid(sop_uid, "dimension-organization")
    for element in seg.iterall():
        if element.tag == Tag("DimensionOrganizationUID"):
            element.value = dimension_uid
        elif element.tag == Tag("ContributionDateTime"):
            element.value = when.strftime("%Y%m%d%H%M%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
