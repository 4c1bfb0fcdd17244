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
with a heat colour map, the same outline and the same banner, and a legend strip under the
image: the colour bar with its end values (the standard deviation in the source T1-Gd's
intensity units), which the DerivationDescription and ImageComments also state.

Where the model predicted nothing (outside its field of view, ``Prediction.field_of_view``: the
crop of the head it sees) both series show no value: a dark blue hatch (colours found in neither
the grey scale nor the heat map) with a bright blue line along its border, and a strip under the
image that says so on every slice it touches.

Each image takes its InstanceNumber from the source slice it shows (:func:`instance_numbers`):
the SC carries no position, so a viewer pairs it with the source by number alone.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping
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
# outside the model's field of view: blue hatch on dark blue, a brighter blue border line (blue
# above red and green: no grey of the T1-Gd SC, no colour of the heat map)
HATCH_BG_RGB: tuple[int, int, int] = (16, 16, 40)
HATCH_RGB: tuple[int, int, int] = (60, 60, 130)
FOV_EDGE_RGB: tuple[int, int, int] = (110, 110, 255)
HATCH_PERIOD = 8  # pixels between hatch lines (of the enlarged image), 2 pixels wide
#: the note on the slices where the model predicted nothing somewhere
OUTSIDE_FOV_NOTE = "outside the model's field of view: not predicted"
LEGEND_BG_RGB: tuple[int, int, int] = (48, 48, 48)
#: BodyPartExamined of the images (the node predicts brain MRI only): an unpaired body part,
#: so they carry no Laterality
BODY_PART = "BRAIN"
#: how the uncertainty SC's scale is named in its legend and descriptions
UNCERTAINTY_UNITS = "T1-Gd units"

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
    return draw_strip(width, text, aspect)


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _inked_box(text: str, font: Font) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels ``text`` inks when drawn at (0, 0) without
    anti-aliasing (wider than ``textbbox`` says: glyphs hinted to whole pixels)."""
    box = ImageDraw.Draw(Image.new("1", (1, 1))).textbbox((0, 0), text, font)
    left, top, right, bottom = (math.ceil(v) for v in box)
    pad = 4 + (bottom - top)
    img = Image.new("1", (right - left + 4 * pad, bottom - top + 2 * pad), 0)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    draw.text((pad, pad), text, fill=1, font=font)
    ink = np.asarray(img, dtype=bool)
    if not ink.any():
        return (0, 0, 0, 0)
    cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
    return (
        int(cols[0]) - pad,
        int(rows[0]) - pad,
        int(cols[-1]) + 1 - pad,
        int(rows[-1]) + 1 - pad,
    )


def _fitting_font(
    draw: ImageDraw.ImageDraw, texts: list[str], room: int, height: int, inked: bool = False
) -> Font:
    """The largest default font (60% of ``height`` down to 6 pixels) in which ``texts`` side by
    side take at most ``room`` pixels (``inked``: as drawn, else as ``textbbox`` says)."""
    size = max(8, int(height * 0.6))
    while True:
        font = ImageFont.load_default(size=size)
        boxes = [_inked_box(t, font) if inked else draw.textbbox((0, 0), t, font) for t in texts]
        used = sum(right - left for left, _, right, _ in boxes)
        if used <= room or size <= 6:
            return font
        size -= 1


def _squeezed(img: Image.Image, width: int, aspect: float) -> npt.NDArray[np.uint8]:
    """A strip drawn for square pixels, resized (nearest neighbour: its colours stay exact) to
    the rows it takes on pixels ``aspect`` times as tall as wide."""
    rows = banner_height(width, aspect)
    if rows != img.height:
        img = img.resize((width, rows), Image.Resampling.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def draw_strip(
    width: int,
    text: str,
    aspect: float = 1.0,
    background: tuple[int, int, int] = BANNER_BG_RGB,
    *,
    foreground: tuple[int, int, int] = BANNER_TEXT_RGB,
    swatch: bool = False,
) -> npt.NDArray[np.uint8]:
    """A strip as tall as the banner with ``text`` centred (the banner, or a note under the
    image); ``swatch``: a square of the out-of-field-of-view hatch before the text."""
    height = banner_height(width)
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: crisp text in exactly ``foreground``
    side = height - 8 if swatch else 0
    x0 = side + 8 if swatch else 0
    room = width - x0
    if text:
        # the banner is placed as it always was; the notes by the pixels their text inks
        font = _fitting_font(draw, [text], int(room * 0.92), height, inked=swatch)
        measure = _inked_box if swatch else lambda t, f: draw.textbbox((0, 0), t, font=f)
        left, top, right, bottom = measure(text, font)
        x = x0 + (room - (right - left)) // 2 - left
        y = (height - (bottom - top)) // 2 - top
        draw.text((x, y), text, fill=foreground, font=font)
    out = np.array(img, dtype=np.uint8)
    if swatch:
        square = np.ones((side, side), dtype=bool)
        out[4 : 4 + side, 4 : 4 + side] = _hatched(square, np.zeros_like(square))
    return _squeezed(Image.fromarray(out), width, aspect)


def _value_text(value: float) -> str:
    """A value as the uncertainty legend writes it (4 significant digits, no exponent up to
    99999)."""
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def draw_legend(width: int, top: float, aspect: float = 1.0) -> npt.NDArray[np.uint8]:
    """The uncertainty SC's legend strip: ``SD 0``, the heat colour bar, then ``top`` and the
    units (the standard deviation that is drawn white)."""
    height = banner_height(width)
    img = Image.new("RGB", (width, height), LEGEND_BG_RGB)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    left_text = "SD 0"
    right_text = f"{_value_text(top)} {UNCERTAINTY_UNITS}"
    bar_min = max(16, width // 4)
    font = _fitting_font(draw, [left_text, right_text], width - bar_min - 24, height, True)
    lb, rb = _inked_box(left_text, font), _inked_box(right_text, font)
    y_left = (height - (lb[3] - lb[1])) // 2 - lb[1]
    y_right = (height - (rb[3] - rb[1])) // 2 - rb[1]
    draw.text((6 - lb[0], y_left), left_text, fill=BANNER_TEXT_RGB, font=font)
    right_x = width - 6 - (rb[2] - rb[0])
    draw.text((right_x - rb[0], y_right), right_text, fill=BANNER_TEXT_RGB, font=font)
    out = np.array(img, dtype=np.uint8)
    x0, x1 = 6 + (lb[2] - lb[0]) + 6, right_x - 6
    if x1 - x0 >= 4:
        ramp = np.rint(np.linspace(0, 255, x1 - x0)).astype(np.uint8)
        y0, y1 = height // 4, height - height // 4
        out[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = BANNER_TEXT_RGB  # a thin white frame
        out[y0:y1, x0:x1] = _heat(ramp)[None, :, :]
    return _squeezed(Image.fromarray(out), width, aspect)


def _hatched(
    outside: npt.NDArray[np.bool_], inside: npt.NDArray[np.bool_], edge_px: int = 2
) -> npt.NDArray[np.uint8]:
    """RGB of the pixels ``outside`` the field of view (rows x cols x 3, others black): the
    hatch, and the border line where they touch ``inside``."""
    rows, cols = np.indices(outside.shape)
    out = np.zeros((*outside.shape, 3), dtype=np.uint8)
    out[outside] = HATCH_BG_RGB
    out[outside & ((rows + cols) % HATCH_PERIOD < 2)] = HATCH_RGB
    if inside.any():
        near = ndimage.binary_dilation(inside, iterations=edge_px)
        out[outside & near] = FOV_EDGE_RGB
    return out


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
    outside: npt.NDArray[np.bool_] | None = None,
    footer: tuple[npt.NDArray[np.uint8], ...] = (),
) -> npt.NDArray[np.uint8]:
    """Enlarge one slice, hatch what is ``outside`` the field of view, draw the outline, put
    the banner on top and the ``footer`` strips below. Returns rows x cols x 3."""
    rgb = np.repeat(gray_or_rgb[:, :, None], 3, axis=2) if gray_or_rgb.ndim == 2 else gray_or_rgb

    def enlarge(a: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        return np.repeat(np.repeat(a, factor.rows, axis=0), factor.columns, axis=1)

    big = np.asarray(enlarge(rgb), dtype=np.uint8)
    if outside is not None and outside.any():
        big_out = np.asarray(enlarge(outside.astype(bool)), dtype=bool)
        big[big_out] = _hatched(big_out, ~big_out, options.outline_px)[big_out]
    edge = _outline(np.asarray(enlarge(mask.astype(bool)), dtype=bool), options.outline_px)
    big[edge] = outline_rgb
    banner = draw_banner(big.shape[1], options.banner_text, factor.aspect)
    return np.ascontiguousarray(np.concatenate([banner, big, *footer], axis=0))


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


def instance_numbers(
    grid: Volume, series: SeriesRef, source_numbers: Mapping[str, int] | None = None
) -> tuple[int, ...]:
    """The InstanceNumber of the image made of each slice ``k`` of ``grid``: that of the source
    slice it shows, so that image ``n`` shows the slice of source instance ``n`` whatever way
    the source is numbered (head to foot, foot to head, mirrored rows), for a viewer that pairs
    the two series by number (an SC has no position to pair them by).

    ``source_numbers`` maps the source's SOP Instance UIDs to their InstanceNumber. When every
    slice has its own (a series of single-frame instances, numbered, no number twice) those
    are used; otherwise (no numbers, repeated ones, the frames of an Enhanced MR) the slices
    are numbered from 1 in the source's order: by instance number (unnumbered ones last), then
    frame number, then the grid's slice order."""
    uids = slice_instance_uids(grid, series)
    frames = slice_frame_numbers(grid)
    found = [(source_numbers or {}).get(uid) for uid in uids]
    own = [int(n) for n in found if n is not None and int(n) > 0]
    if len(own) == len(uids) and len(set(own)) == len(own) and not any(frames):
        return tuple(own)

    def order(k: int) -> tuple[bool, int, int, int]:
        n = found[k]
        return (n is None, 0 if n is None else int(n), frames[k], k)

    ranks = [0] * len(uids)
    for rank, k in enumerate(sorted(range(len(uids)), key=order)):
        ranks[k] = rank + 1
    return tuple(ranks)


def uncertainty_scale(prediction: Prediction) -> float:
    """The standard deviation the uncertainty SC draws white (and above): the 99.5th
    percentile of the study's standard deviation inside the model's field of view."""
    std = np.asarray(prediction.std.array, dtype=np.float64)[prediction.predicted_region]
    return float(np.percentile(std, 99.5)) if std.size else 0.0


def uncertainty_legend(top: float) -> str:
    """What the uncertainty SC's colours mean, as its DerivationDescription and ImageComments
    state it."""
    if top <= 0:
        return (
            f"Uncertainty colour scale: black = standard deviation 0 ({UNCERTAINTY_UNITS}, the "
            "source T1-Gd's intensity units); the samples do not differ anywhere"
        )
    return (
        f"Uncertainty colour scale: standard deviation across samples in {UNCERTAINTY_UNITS} "
        f"(the source T1-Gd's intensity units), black = 0, white = {_value_text(top)} "
        f"({top:.6g}, the 99.5th percentile of this study's) or more, black-red-yellow-white"
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
    source_instance_numbers: Mapping[str, int] | None = None,
) -> list[hd.sc.SCImage]:
    """The SC series of the predicted images (or, with ``uncertainty``, of the uncertainty map);
    ``study_version`` goes into the series description (:func:`series_description`);
    ``source_instance_numbers``: the source slices' InstanceNumber by SOP Instance UID, which
    the images take (:func:`instance_numbers`)."""
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
    numbers = instance_numbers(source_t1c, source_series, source_instance_numbers)
    if prediction.field_of_view is not None:
        _check_grid("prediction.field_of_view", prediction.field_of_view, source_t1c)
    outside = ~prediction.predicted_region
    width = ni * factor.columns
    footer: tuple[npt.NDArray[np.uint8], ...] = ()
    legend = ""
    if uncertainty:
        std = np.asarray(prediction.std.array, dtype=np.float64)
        # 0 .. 99.5th percentile of the standard deviation -> black .. white of the heat map
        top = uncertainty_scale(prediction)
        scaled = np.clip(std / max(top, 1e-12), 0, 1) * 255.0
        slices_u8 = np.rint(scaled).astype(np.uint8)
        outline = UNCERTAINTY_OUTLINE_RGB
        footer = (draw_legend(width, max(top, 0.0), factor.aspect),)
        legend = uncertainty_legend(top)
    else:
        w = window or window_like(source_t1c)
        slices_u8 = w.apply(np.asarray(prediction.mean.array, dtype=np.float64))
        outline = OUTLINE_RGB
    mask = np.asarray(prediction.tumour_mask.array).astype(bool)
    # a strip under every image of a series with a region not predicted (the same size for
    # all): the note on the slices that region touches, blank on the others
    partial = bool(outside.any())
    if partial:
        note = draw_strip(width, OUTSIDE_FOV_NOTE, factor.aspect, HATCH_BG_RGB, swatch=True)
        blank = draw_strip(width, "", factor.aspect, HATCH_BG_RGB)

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
        touched = bool(outside[k].any())
        strips = (*footer, note if touched else blank) if partial else footer
        pixels = render_slice(plane, mask[k], factor, opts, outline, outside[k], strips)
        g = slice_geometry(source_t1c, k)
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=SERIES_NUMBERS[kind],
            sop_instance_uid=job.instance_uid(kind, k),
            instance_number=numbers[k],
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
        # no Laterality (type 2C): the brain is not a paired structure, as BodyPartExamined
        # says (an empty Laterality would say "unknown"; an absent one, without the body part,
        # leaves a checker to assume a paired one)
        sc.BodyPartExamined = BODY_PART
        sc.BurnedInAnnotation = "NO"  # the banner identifies nobody
        sc.RecognizableVisualFeatures = "NO"
        comments = [f"{BANNER_TEXT}. Model {equipment.model_label}."]
        described = [
            f"Synthetic post-treatment {'uncertainty map' if uncertainty else 'T1-Gd'} "
            f"predicted by {equipment.model_label}",
            "tumour outline drawn",
        ]
        if legend:
            comments.append(f"{legend}.")
            described.append(legend)
        if touched:
            comments.append(
                "Hatched dark blue, bordered in blue: outside the model's field of view, "
                "not predicted (no value shown)."
            )
            described.append("hatched: outside the model's field of view, not predicted")
        sc.ImageComments = " ".join(comments)
        sc.DerivationDescription = "; ".join([*described, enlarged])[:1024]
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
