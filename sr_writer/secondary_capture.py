"""Secondary Capture series of the predicted post-treatment images (what the radiologist scrolls).

One RGB image per slice of the source T1-Gd, in the source's slice order: the predicted
post-treatment T1-Gd, windowed like the source, with the predicted tumour outline drawn in colour
and a banner on top that says ``SYNTHETIC PREDICTION - RESEARCH USE ONLY``. Nothing about the
patient is burned in. Small slices are enlarged by an integer factor per axis (nearest
neighbour, no smoothing) so that the banner text stays readable and the pixels come close to
square; the pixel spacing is divided accordingly. Where they stay oblong the banner is drawn
squeezed by as much, so that a viewer, which draws the image with its pixel spacing, shows
the text upright and unstretched.

An optional second series shows the voxel-wise uncertainty (standard deviation across samples)
with a heat colour map, the same outline and the same banner.
"""

from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from scipy import ndimage

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, Prediction, SeriesRef, Volume

from .labels import (
    BANNER_TEXT,
    CONTENT_QUALIFICATION,
    SERIES_NUMBERS,
    Equipment,
    JobIdentity,
    finish_output,
    highdicom_patient_study,
    series_description,
)
from .references import (
    patient_orientation,
    slice_frame_numbers,
    slice_geometry,
    slice_instance_uids,
)

logger = logging.getLogger(__name__)

OUTLINE_RGB: tuple[int, int, int] = (255, 0, 0)
UNCERTAINTY_OUTLINE_RGB: tuple[int, int, int] = (0, 255, 255)
BANNER_BG_RGB: tuple[int, int, int] = (128, 0, 0)
BANNER_TEXT_RGB: tuple[int, int, int] = (255, 255, 255)

# DCM 121322 "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")


@dataclass(frozen=True)
class RenderOptions:
    """How slices are drawn. ``min_width`` is the smallest width in pixels of a rendered image."""

    min_width: int = 256
    outline_px: int = 2
    banner_text: str = BANNER_TEXT


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def apply(self, values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
        """DICOM linear VOI LUT (PS3.3 C.11.2.1.2.1) to 0..255; a window narrower than 2 (the
        values of a series rescaled to fractions, RescaleSlope 0.001) maps linearly from its
        low to its high end, where the standard's ``width - 1`` (made for integer values)
        would whiten half the image."""
        c, w = self.center, self.width
        if w >= 2.0:
            scaled = ((values - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
        else:
            scaled = (values - (c - w / 2.0)) / max(w, 1e-12) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def window_like(source: Volume) -> Window:
    """A window for the source T1-Gd: 0.5th to 99.5th percentile of its non-background voxels.

    Used when the source series carried no WindowCenter/WindowWidth (the caller passes those when
    it has them). The prediction is drawn with the source's window so that brightness compares.
    """
    a = np.asarray(source.array, dtype=np.float64)
    fg = a[a > a.min()] if np.any(a > a.min()) else a.ravel()
    lo, hi = np.percentile(fg, [0.5, 99.5])
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ExportError(f"source T1-Gd has non-finite intensities (found {lo}..{hi})")
    width = float(hi - lo)
    if width <= 0:  # a flat image: a window around its one value
        width = max(1e-6 * abs(float(hi)), 1e-6)
    return Window(center=float(lo) + width / 2.0, width=width)


def _heat(values: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Black -> red -> yellow -> white colour map of 0..255 values."""
    v = values.astype(np.float64) / 255.0
    r = np.clip(3.0 * v, 0, 1)
    g = np.clip(3.0 * v - 1.0, 0, 1)
    b = np.clip(3.0 * v - 2.0, 0, 1)
    return np.rint(np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def _outline(mask: npt.NDArray[np.bool_], thickness: int) -> npt.NDArray[np.bool_]:
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return np.asarray(mask & ~inner, dtype=bool)


def draw_banner(width: int, text: str, aspect: float = 1.0) -> npt.NDArray[np.uint8]:
    """The banner for an image ``width`` pixels wide whose pixels are ``aspect`` times as tall
    as they are wide (row spacing over column spacing): drawn for square pixels, then resized
    (nearest neighbour: its two colours stay exact) to :func:`banner_height` rows."""
    height = banner_height(width)
    img = Image.new("RGB", (width, height), BANNER_BG_RGB)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: crisp text in exactly BANNER_TEXT_RGB
    size = max(8, int(height * 0.6))
    font = ImageFont.load_default(size=size)
    while size > 6:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= int(width * 0.92):
            break
        size -= 1
        font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (width - (right - left)) // 2 - left
    y = (height - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=BANNER_TEXT_RGB, font=font)
    rows = banner_height(width, aspect)
    if rows != height:
        img = img.resize((width, rows), Image.Resampling.NEAREST)
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class Enlargement:
    """How a slice is enlarged: ``rows`` and ``columns`` times (integers), and the aspect of
    the pixels then (row spacing over column spacing; 1 for square ones)."""

    rows: int
    columns: int
    aspect: float = 1.0


def render_slice(
    gray_or_rgb: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    factor: Enlargement,
    options: RenderOptions,
    outline_rgb: tuple[int, int, int],
) -> npt.NDArray[np.uint8]:
    """Enlarge one slice, draw the outline, put the banner on top. Returns rows x cols x 3."""
    rgb = np.repeat(gray_or_rgb[:, :, None], 3, axis=2) if gray_or_rgb.ndim == 2 else gray_or_rgb
    big = np.repeat(np.repeat(rgb, factor.rows, axis=0), factor.columns, axis=1)
    big_mask = np.repeat(np.repeat(mask.astype(bool), factor.rows, axis=0), factor.columns, axis=1)
    edge = _outline(big_mask, options.outline_px)
    big[edge] = outline_rgb
    banner = draw_banner(big.shape[1], options.banner_text, factor.aspect)
    return np.ascontiguousarray(np.concatenate([banner, big], axis=0))


def enlargement(grid: Volume, options: RenderOptions) -> Enlargement:
    """At least ``options.min_width`` columns, and the axis of the longer pixel side enlarged
    more, so that the enlarged pixels come as close to square as integers allow."""
    ni = grid.shape[2]
    base = max(1, math.ceil(options.min_width / max(ni, 1)))
    column_mm, row_mm = float(grid.spacing[0]), float(grid.spacing[1])
    if not (column_mm > 0 and row_mm > 0):
        return Enlargement(base, base)
    ratio = row_mm / column_mm
    rows, columns = (
        (max(1, round(base * ratio)), base) if ratio >= 1 else (base, max(1, round(base / ratio)))
    )
    aspect = (row_mm / rows) / (column_mm / columns)
    return Enlargement(rows, columns, 1.0 if abs(aspect - 1.0) < 0.01 else aspect)


def banner_height(width: int, aspect: float = 1.0) -> int:
    """Rows of the banner on top of an image ``width`` pixels wide whose pixels are ``aspect``
    times as tall as they are wide."""
    height = max(28, width // 16)
    return height if aspect == 1.0 else max(1, round(height / aspect))


def _check_grid(name: str, vol: Volume, ref: Volume) -> None:
    if vol.shape != ref.shape:
        raise ExportError(
            f"{name} must be on the source T1-Gd grid: expected shape {ref.shape}, "
            f"found {vol.shape}"
        )


def build_secondary_capture(
    *,
    prediction: Prediction,
    source_t1c: Volume,
    source_series: SeriesRef,
    patient: PatientStudy,
    job: JobIdentity,
    equipment: Equipment,
    window: Window | None = None,
    uncertainty: bool = False,
    options: RenderOptions | None = None,
    when: datetime.datetime | None = None,
    study_version: int = 1,
) -> list[hd.sc.SCImage]:
    """The SC series of the predicted images (or, with ``uncertainty``, of the uncertainty map);
    ``study_version`` goes into the series description (:func:`series_description`)."""
    opts = options or RenderOptions()
    _check_grid("prediction.mean", prediction.mean, source_t1c)
    _check_grid("prediction.std", prediction.std, source_t1c)
    _check_grid("prediction.tumour_mask", prediction.tumour_mask, source_t1c)
    kind = "sc-uncertainty" if uncertainty else "sc"
    what = "UNCERTAINTY SC" if uncertainty else "T1-Gd SC"
    description = series_description(what, study_version)
    source_uids = slice_instance_uids(source_t1c, source_series)
    source_frames = slice_frame_numbers(source_t1c)
    factor = enlargement(source_t1c, opts)
    enlarged = (
        f"enlarged x{factor.rows}"
        if factor.rows == factor.columns
        else f"rows enlarged x{factor.rows}, columns x{factor.columns}"
    )
    _, nj, ni = source_t1c.shape

    if uncertainty:
        std = np.asarray(prediction.std.array, dtype=np.float64)
        # 0 .. 99.5th percentile of the standard deviation -> black .. white of the heat map
        top = float(np.percentile(std, 99.5)) if std.size else 1.0
        scaled = np.clip(std / max(top, 1e-12), 0, 1) * 255.0
        slices_u8 = np.rint(scaled).astype(np.uint8)
        outline = UNCERTAINTY_OUTLINE_RGB
    else:
        w = window or window_like(source_t1c)
        slices_u8 = w.apply(np.asarray(prediction.mean.array, dtype=np.float64))
        outline = OUTLINE_RGB
    mask = np.asarray(prediction.tumour_mask.array).astype(bool)

    series_uid = job.series_uid(kind)
    ts = when or datetime.datetime.now().replace(microsecond=0)
    images: list[hd.sc.SCImage] = []
    # an oblique grid's directions have two or three letters ("PH"); highdicom's SCImage takes
    # one, so the main one goes to it and the whole value is written after
    orientation = patient_orientation(source_t1c)
    for k in range(source_t1c.shape[0]):
        plane = slices_u8[k]
        if uncertainty:
            plane = _heat(plane)
        pixels = render_slice(plane, mask[k], factor, opts, outline)
        g = slice_geometry(source_t1c, k)
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=SERIES_NUMBERS[kind],
            sop_instance_uid=job.instance_uid(kind, k),
            instance_number=k + 1,
            manufacturer=equipment.manufacturer,
            **highdicom_patient_study(patient),
            pixel_spacing=(g.pixel_spacing[0] / factor.rows, g.pixel_spacing[1] / factor.columns),
            patient_orientation=(orientation[0][0], orientation[1][0]),
            contributing_equipment=[equipment.contributing_equipment(ts)],
            series_description=description,
            content_qualification=CONTENT_QUALIFICATION,
            manufacturer_model_name=equipment.model_name,
            software_versions=list(equipment.software_versions),
            specific_character_set="ISO_IR 192",
            content_date=ts.date(),
            content_time=ts.time(),
        )
        sc.PatientOrientation = list(orientation)
        finish_output(sc, patient, ts)
        sc.ConversionType = "SYN"
        sc.Laterality = ""  # type 2C: brain is not a paired structure
        sc.BurnedInAnnotation = "NO"  # the banner identifies nobody
        sc.RecognizableVisualFeatures = "NO"
        sc.ImageComments = f"{BANNER_TEXT}. Model {equipment.model_label}."
        sc.DerivationDescription = (
            f"Synthetic post-treatment {'uncertainty map' if uncertainty else 'T1-Gd'} "
            f"predicted by {equipment.model_label}; tumour outline drawn; {enlarged}"
        )[:1024]
        sc.LossyImageCompression = "00"
        sc.SourceImageSequence = [
            _source_item(source_series.sop_class_uid, source_uids[k], source_frames[k])
        ]
        images.append(sc)
    logger.info(
        "built %d %s instances (job %s, %dx%d -> %dx%d)",
        len(images),
        kind,
        job.key[:12],
        nj,
        ni,
        images[0].Rows if images else 0,
        images[0].Columns if images else 0,
    )
    return images


def _source_item(sop_class_uid: str, sop_instance_uid: str, frame: int = 0) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    if frame:  # a frame of a multi-frame instance (an Enhanced MR)
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(_SOURCE_PURPOSE)]
    return item
