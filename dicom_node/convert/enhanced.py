"""Frame descriptions of classic single-frame and enhanced multi-frame images.

Both kinds of instance are reduced to a list of :class:`FrameInfo`, one per 2D frame, carrying its
position, orientation, pixel spacing and rescale; :mod:`dicom_node.convert.series` then treats
classic and enhanced series with the same geometry code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from dicom_node.convert._dataset import (
    first_item,
    get_float,
    get_floats,
    get_int,
    get_items,
    get_str,
)
from dicom_node.errors import ConversionError

log = logging.getLogger(__name__)


#: attributes of a classic image that tell apart images at the same position
CLASSIC_DESCRIPTORS = (
    "EchoTime",
    "EchoNumbers",
    "InversionTime",
    "AcquisitionNumber",
    "TemporalPositionIdentifier",
    "DiffusionBValue",
    "ImageType",
)


@dataclass(frozen=True)
class FrameInfo:
    """One 2D frame: where it is and how to turn stored values into real values."""

    source: int
    """Index of the instance (in the list given to the converter)."""
    frame: int | None
    """0-based frame number inside a multi-frame instance; None for a single-frame instance."""
    sop_instance_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    """(row spacing, column spacing) as in PixelSpacing: between rows, between columns."""
    slope: float = 1.0
    intercept: float = 0.0
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    descriptors: dict[str, str] = field(default_factory=dict)
    """Attributes that tell frames at the same position apart (echo, time point, image type...)."""
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    """The classic instance, read again by :meth:`all_descriptors` only when a message needs it."""

    def all_descriptors(self) -> dict[str, str]:
        """``descriptors`` plus, for a classic instance, the attributes that vary per image."""
        if self.dataset is None:
            return dict(self.descriptors)
        found = dict(self.descriptors)
        for kw in CLASSIC_DESCRIPTORS:
            try:
                value = get_str(self.dataset, kw, "")
            except ConversionError:
                value = "<unparsable>"
            if value is not None:
                found[kw] = value
        return found


def _plane(
    ds: Dataset, name: str
) -> tuple[list[float] | None, list[float] | None, list[float] | None]:
    return (
        get_floats(ds, "ImagePositionPatient", name, 3),
        get_floats(ds, "ImageOrientationPatient", name, 6),
        get_floats(ds, "PixelSpacing", name, 2),
    )


def _slope(value: float | None, name: str) -> float:
    if value is None:
        return 1.0
    if value == 0.0:
        raise ConversionError(
            f"{name}: RescaleSlope must be non-zero, found 0 (every voxel would be the intercept)"
        )
    return value


def _check_spacing(spacing: list[float], name: str) -> tuple[float, float]:
    if spacing[0] <= 0 or spacing[1] <= 0:
        raise ConversionError(f"{name}: PixelSpacing must be positive, found {spacing!r}")
    return (spacing[0], spacing[1])


def classic_frame(ds: Dataset, source: int, name: str, sop_uid: str) -> FrameInfo:
    """The single frame of a classic image instance (MR Image Storage, CT Image Storage...)."""
    ipp, iop, ps = _plane(ds, name)
    missing = [
        kw
        for kw, v in (
            ("ImagePositionPatient", ipp),
            ("ImageOrientationPatient", iop),
            ("PixelSpacing", ps),
        )
        if v is None
    ]
    if missing or ipp is None or iop is None or ps is None:
        raise ConversionError(
            f"{name}: {', '.join(missing)} missing; expected an image with patient geometry "
            "(Image Plane module), found none"
        )
    image_type = (get_str(ds, "ImageType", name, "") or "").upper().split("\\")
    if "MOSAIC" in image_type:
        raise ConversionError(
            f"{name}: Siemens mosaic image (ImageType {'/'.join(image_type)}): its tiles are "
            "separate slices whose positions are not in the standard attributes; expected one "
            "slice per image (anatomical MR), found a mosaic (EPI / fMRI / diffusion)"
        )
    if get_items(ds, "ModalityLUTSequence", name):
        raise ConversionError(
            f"{name}: a Modality LUT Sequence is present; only RescaleSlope/RescaleIntercept "
            "modality transforms are supported"
        )
    return FrameInfo(
        source=source,
        frame=None,
        sop_instance_uid=sop_uid,
        position=(ipp[0], ipp[1], ipp[2]),
        orientation=(iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
        pixel_spacing=_check_spacing(ps, name),
        slope=_slope(get_float(ds, "RescaleSlope", name, 1.0), name),
        intercept=get_float(ds, "RescaleIntercept", name, 0.0) or 0.0,
        slice_thickness=get_float(ds, "SliceThickness", name),
        spacing_between_slices=get_float(ds, "SpacingBetweenSlices", name),
        dataset=ds,
    )


def _group_item(
    per_frame: Dataset | None, shared: Dataset | None, keyword: str, name: str
) -> Dataset | None:
    item = first_item(per_frame, keyword, name)
    if item is None:
        item = first_item(shared, keyword, name)
    return item


def enhanced_frames(
    ds: Dataset, source: int, name: str, sop_uid: str, n_frames: int
) -> list[FrameInfo]:
    """One FrameInfo per frame of an enhanced (functional-group) multi-frame instance."""
    shared = first_item(ds, "SharedFunctionalGroupsSequence", name)
    per_frame = get_items(ds, "PerFrameFunctionalGroupsSequence", name)
    if not per_frame:
        raise ConversionError(
            f"{name}: multi-frame instance with {n_frames} frames has no "
            "PerFrameFunctionalGroupsSequence; expected per-frame plane positions, found none"
        )
    if len(per_frame) != n_frames:
        raise ConversionError(
            f"{name}: NumberOfFrames is {n_frames} but PerFrameFunctionalGroupsSequence has "
            f"{len(per_frame)} items"
        )
    frames: list[FrameInfo] = []
    for index, item in enumerate(per_frame):
        where = f"{name} frame {index + 1}"
        pos_item = _group_item(item, shared, "PlanePositionSequence", where)
        ori_item = _group_item(item, shared, "PlaneOrientationSequence", where)
        meas_item = _group_item(item, shared, "PixelMeasuresSequence", where)
        ipp = get_floats(pos_item, "ImagePositionPatient", where, 3) if pos_item else None
        iop = get_floats(ori_item, "ImageOrientationPatient", where, 6) if ori_item else None
        ps = get_floats(meas_item, "PixelSpacing", where, 2) if meas_item else None
        if ipp is None or iop is None or ps is None:
            missing = [
                label
                for label, v in (
                    ("PlanePositionSequence/ImagePositionPatient", ipp),
                    ("PlaneOrientationSequence/ImageOrientationPatient", iop),
                    ("PixelMeasuresSequence/PixelSpacing", ps),
                )
                if v is None
            ]
            raise ConversionError(
                f"{where}: {', '.join(missing)} missing from the per-frame and shared functional "
                "groups; expected the geometry of every frame"
            )
        if _group_item(item, shared, "PixelValueTransformationSequence", where) is None and (
            first_item(item, "RealWorldValueMappingSequence", where) is not None
        ):
            log.debug("%s: no PixelValueTransformationSequence; stored values used as is", where)
        pvt = _group_item(item, shared, "PixelValueTransformationSequence", where)
        slope = get_float(pvt, "RescaleSlope", where, 1.0) if pvt else 1.0
        intercept = get_float(pvt, "RescaleIntercept", where, 0.0) if pvt else 0.0
        descriptors: dict[str, str] = {}
        content = first_item(item, "FrameContentSequence", where)
        if content is not None:
            for kw in ("StackID", "TemporalPositionIndex", "InStackPositionNumber"):
                v = get_str(content, kw, where)
                if v is not None and kw != "InStackPositionNumber":
                    descriptors[kw] = v
        echo = _group_item(item, shared, "MREchoSequence", where)
        if echo is not None:
            v = get_str(echo, "EffectiveEchoTime", where)
            if v is not None:
                descriptors["EffectiveEchoTime"] = v
        ftype = _group_item(item, shared, "MRImageFrameTypeSequence", where)
        if ftype is not None:
            v = get_str(ftype, "FrameType", where)
            if v is not None:
                descriptors["FrameType"] = v
        diff = _group_item(item, shared, "MRDiffusionSequence", where)
        if diff is not None:
            v = get_str(diff, "DiffusionBValue", where)
            if v is not None:
                descriptors["DiffusionBValue"] = v
        frames.append(
            FrameInfo(
                source=source,
                frame=index,
                sop_instance_uid=sop_uid,
                position=(ipp[0], ipp[1], ipp[2]),
                orientation=(iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
                pixel_spacing=_check_spacing(ps, where),
                slope=_slope(slope, where),
                intercept=0.0 if intercept is None else intercept,
                slice_thickness=get_float(meas_item, "SliceThickness", where)
                if meas_item
                else None,
                spacing_between_slices=(
                    get_float(meas_item, "SpacingBetweenSlices", where) if meas_item else None
                )
                or get_float(ds, "SpacingBetweenSlices", where),
                descriptors=descriptors,
            )
        )
    return frames


def number_of_frames(ds: Dataset, name: str) -> int:
    n = get_int(ds, "NumberOfFrames", name, 1)
    if n is None or n < 1:
        raise ConversionError(f"{name}: NumberOfFrames must be >= 1, found {n}")
    return n
