"""Optional derived MR series of the prediction, with the source geometry.

Classic MR Image Storage instances, one per source slice, on the source frame of reference with
the source positions, orientation and spacing, so that a viewer can scroll it linked to the real
T1-Gd and reformat it (MPR). The pixels are the predicted post-treatment T1-Gd (mean of the
samples) on the source intensity scale, untouched: no banner is burned in, because a reformat
would smear it. A graphics overlay (Overlay Plane, group 6000) carries the banner text
instead, which viewers draw on top of the image and leave out of reformats and measurements
(images narrower than 192 pixels get none: the text would not be legible). The series is also
marked as derived and synthetic wherever a viewer or a person looks: ImageType
``DERIVED\\SECONDARY``, SeriesDescription ``SYNTHETIC PREDICTION - RESEARCH USE ONLY - ...``,
ImageComments and DerivationDescription, ContentQualification ``RESEARCH``,
ContributingEquipmentSequence, and a SourceImageSequence pointing at the real slice.

Outside the model's field of view (``Prediction.field_of_view``) nothing was predicted: those
pixels hold no intensity but the PixelPaddingValue (-32768, below every stored value), which
viewers leave out or show black, never the pre-treatment image; the graphics overlay hatches
them (with the banner, where there is one: group 6000 is the only one checkers such as
dciodvfy know) and ImageComments says so on the slices concerned. Each image takes the
InstanceNumber of the source slice it is on
(:func:`~sr_writer.secondary_capture.instance_numbers`).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, Prediction, SeriesRef, Volume

from .labels import (
    BANNER_TEXT,
    SERIES_NUMBERS,
    Equipment,
    JobIdentity,
    apply_labels,
    series_description,
    set_patient_study,
)
from .references import slice_frame_numbers, slice_geometry, slice_instance_uids
from .secondary_capture import (
    BODY_PART,
    HATCH_PERIOD,
    Window,
    _source_item,
    instance_numbers,
    window_like,
)

logger = logging.getLogger(__name__)

MIN_OVERLAY_COLUMNS = 192
#: the stored value of the pixels outside the model's field of view (PixelPaddingValue)
PADDING_VALUE = -32768
NOT_PREDICTED_NOTE = "outside the model's field of view: not predicted"
HATCHED_OVERLAY = "Synthetic prediction; hatched: not predicted (outside the model)"


def banner_overlay(rows: int, columns: int, text: str) -> npt.NDArray[np.uint8] | None:
    """A rows x columns bitmap (0/1) with ``text`` across the top, or None if it cannot fit."""
    if columns < MIN_OVERLAY_COLUMNS or rows < 16:
        return None
    img = Image.new("1", (columns, rows), 0)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    size = max(8, columns // 24)
    while size >= 8:
        font = ImageFont.load_default(size=size)
        left, top, right, _ = draw.textbbox((0, 0), text, font=font)
        if right - left <= int(columns * 0.95):
            draw.text(((columns - (right - left)) // 2 - left, 2 - top), text, fill=1, font=font)
            return np.asarray(img, dtype=np.uint8)
        size -= 1
    return None


def not_predicted_overlay(outside: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """A bitmap (0/1) of one slice hatching the pixels ``outside`` the field of view, with a
    line along their border and, where the image is wide enough, the note at the bottom."""
    rows, cols = np.indices(outside.shape)
    hatch = outside & ((rows + cols) % HATCH_PERIOD == 0)
    inside = ~outside
    border = outside & ndimage.binary_dilation(inside) if inside.any() else hatch
    bitmap = (hatch | border).astype(np.uint8)
    nj, ni = outside.shape
    if ni >= MIN_OVERLAY_COLUMNS and nj >= 32:
        text = Image.new("1", (ni, nj), 0)
        draw = ImageDraw.Draw(text)
        draw.fontmode = "1"
        font = ImageFont.load_default(size=max(8, ni // 32))
        left, top, right, bottom = draw.textbbox((0, 0), NOT_PREDICTED_NOTE, font=font)
        if right - left <= ni - 8:
            x, y = (ni - (right - left)) // 2 - left, nj - (bottom - top) - 4 - top
            draw.text((x, y), NOT_PREDICTED_NOTE, fill=1, font=font)
            # the text on a clear box, so that it stands out of the hatch
            bitmap[max(0, y + top - 2) : y + bottom + 2, max(0, x + left - 2) : x + right + 2] = 0
            bitmap |= np.asarray(text, dtype=np.uint8)
    return bitmap


def _add_overlay(
    ds: Dataset, bitmap: npt.NDArray[np.uint8], description: str = "Synthetic prediction banner"
) -> None:
    """Overlay Plane module in group 6000 (PS3.3 C.9.2): a graphics overlay from ``bitmap``."""
    rows, columns = bitmap.shape
    tag = 0x6000 << 16
    ds.add_new(tag | 0x0010, "US", rows)  # Overlay Rows
    ds.add_new(tag | 0x0011, "US", columns)  # Overlay Columns
    ds.add_new(tag | 0x0022, "LO", description)  # Overlay Description
    ds.add_new(tag | 0x0040, "CS", "G")  # Overlay Type: graphics
    ds.add_new(tag | 0x0050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(tag | 0x0100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(tag | 0x0102, "US", 0)  # Overlay Bit Position
    ds.add_new(tag | 0x1500, "LO", "SYNTHETIC")  # Overlay Label
    ds.add_new(tag | 0x3000, "OW", pack_bits(bitmap.ravel()))  # Overlay Data


def build_derived_mr(
    *,
    prediction: Prediction,
    source_t1c: Volume,
    source_series: SeriesRef,
    patient: PatientStudy,
    job: JobIdentity,
    equipment: Equipment,
    window: Window | None = None,
    when: datetime.datetime | None = None,
    study_version: int = 1,
    source_instance_numbers: Mapping[str, int] | None = None,
) -> list[Dataset]:
    """The derived MR series of the predicted T1-Gd; ``study_version`` goes into the series
    description (:func:`series_description`); ``source_instance_numbers``: the source slices'
    InstanceNumber by SOP Instance UID, which the images take."""
    if prediction.mean.shape != source_t1c.shape:
        raise ExportError(
            f"the predicted image must be on the source T1-Gd grid: expected shape "
            f"{source_t1c.shape}, found {prediction.mean.shape}"
        )
    if not source_t1c.frame_of_reference_uid:
        raise ExportError("the source T1-Gd grid has no FrameOfReferenceUID (found None)")
    if prediction.field_of_view is not None and prediction.field_of_view.shape != source_t1c.shape:
        raise ExportError(
            f"the field of view must be on the source T1-Gd grid: expected shape "
            f"{source_t1c.shape}, found {prediction.field_of_view.shape}"
        )
    values = np.asarray(prediction.mean.array, dtype=np.float64)
    inside = prediction.predicted_region
    if not np.all(np.isfinite(values[inside])):
        raise ExportError("the predicted image has non-finite voxels")
    # the predicted values alone set the scale (outside the field of view none was predicted)
    lo, hi = (float(values[inside].min()), float(values[inside].max())) if inside.any() else (0, 0)
    # integers of the source's scale, as they are; values beyond signed 16 bits (a source of
    # 0..65535) or of a narrow range (one rescaled to fractions, RescaleSlope 0.001: rounded,
    # they were 0 and 1) stored through RescaleSlope / RescaleIntercept over the 16 bits
    slope, intercept = 1.0, 0.0
    if lo < -32768 or hi > 32767 or hi - lo < 256:
        slope = max(hi - lo, 1e-12) / 65534.0
        intercept = (hi + lo) / 2.0
    scaled = np.where(inside, (values - intercept) / slope, 0.0)
    pixels = np.clip(np.rint(scaled), -32767, 32767).astype(np.int16)
    pixels[~inside] = PADDING_VALUE
    w = window or window_like(source_t1c)
    ts = when or datetime.datetime.now().replace(microsecond=0)
    source_uids = slice_instance_uids(source_t1c, source_series)
    source_frames = slice_frame_numbers(source_t1c)
    series_uid = job.series_uid("derived-mr")
    nk, nj, ni = source_t1c.shape
    overlay = banner_overlay(nj, ni, BANNER_TEXT)
    numbers = instance_numbers(source_t1c, source_series, source_instance_numbers)
    out: list[Dataset] = []
    for k in range(nk):
        g = slice_geometry(source_t1c, k)
        sop_uid = job.instance_uid("derived-mr", k)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        set_patient_study(ds, patient)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = ts.strftime("%Y%m%d")
        ds.InstanceCreationTime = ts.strftime("%H%M%S")
        # General Series
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = SERIES_NUMBERS["derived-mr"]
        ds.SeriesDescription = series_description("derived MR", study_version)
        ds.SeriesDate = ts.strftime("%Y%m%d")
        ds.SeriesTime = ts.strftime("%H%M%S")
        # no Laterality (type 2C): the brain is not a paired structure, as BodyPartExamined says
        ds.BodyPartExamined = BODY_PART
        ds.PatientPosition = ""  # type 2C; the source position is not carried by Volume
        # Frame of Reference
        ds.FrameOfReferenceUID = source_t1c.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = equipment.manufacturer
        ds.ManufacturerModelName = equipment.model_name
        ds.SoftwareVersions = list(equipment.software_versions)
        if equipment.institution_name:
            ds.InstitutionName = equipment.institution_name
        # General Image
        ds.InstanceNumber = numbers[k]
        ds.ContentDate = ts.strftime("%Y%m%d")
        ds.ContentTime = ts.strftime("%H%M%S")
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.DerivationDescription = (
            f"Synthetic post-treatment T1-Gd predicted by {equipment.model_label} "
            f"(mean of {len(prediction.sample_volumes_ml)} samples); not an acquisition"
        )
        ds.ImageComments = f"{BANNER_TEXT}. Model {equipment.model_label}."
        touched = not inside[k].all()
        if touched:
            ds.DerivationDescription += (
                f"; outside the model's field of view not predicted: PixelPaddingValue "
                f"{PADDING_VALUE}, hatched in the overlay"
            )
            ds.ImageComments += (
                " Outside the model's field of view (hatched in the overlay) "
                "nothing was predicted: those pixels are padding, not an intensity."
            )
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.SourceImageSequence = [
            _source_item(source_series.sop_class_uid, source_uids[k], source_frames[k])
        ]
        # Image Plane
        ds.ImagePositionPatient = list(g.image_position)
        ds.ImageOrientationPatient = list(g.image_orientation)
        ds.PixelSpacing = list(g.pixel_spacing)
        ds.SliceThickness = g.slice_thickness
        # MR Image: no acquisition took place; the type 1/2 attributes describe none
        ds.ScanningSequence = "RM"  # research mode
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.EchoTime = None
        ds.RepetitionTime = None
        ds.EchoTrainLength = None
        ds.SequenceName = "SYNTHETIC"
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if not inside.all():  # the series has pixels outside the field of view
            ds.add_new(0x00280120, "SS", PADDING_VALUE)  # PixelPaddingValue
        if slope != 1.0:
            ds.RescaleSlope = f"{slope:.10g}"[:16]
            ds.RescaleIntercept = f"{intercept:.10g}"[:16]
            ds.RescaleType = "US"  # unspecified: the source's arbitrary MR units
        ds.WindowCenter = f"{w.center:.6g}"
        ds.WindowWidth = f"{w.width:.6g}"
        ds.WindowCenterWidthExplanation = "like the source T1-Gd"
        ds.PixelData = pixels[k].tobytes()
        if touched:  # the hatch joins the banner in the one overlay (group 6000)
            hatch = not_predicted_overlay(~inside[k])
            if overlay is not None:
                inked = np.flatnonzero(overlay.any(axis=1))
                hatch[: inked[-1] + 3 if inked.size else 0] = 0  # the banner text stays clear
                hatch |= overlay
            _add_overlay(ds, hatch, description=HATCHED_OVERLAY)
        elif overlay is not None:
            _add_overlay(ds, overlay)
        apply_labels(ds, equipment, ts)
        out.append(ds)
    logger.info("built %d derived MR instances (job %s)", len(out), job.key[:12])
    return out
