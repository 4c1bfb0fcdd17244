"""RT Dose (a multi-frame dose grid) to a dose volume in Gy on an image grid.

Public entry points: :func:`load_rtdose` (the dose on its own grid) and :func:`dose_on_grid`
(the dose resampled onto the grid of an image volume with trilinear interpolation, zero outside
the dose grid). The dose must be on the image's frame of reference, or on one a Spatial
Registration relates to it (:mod:`dicom_node.convert.spatial_registration`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dicom_node.convert._dataset import (
    Source,
    get_float,
    get_floats,
    get_int,
    get_str,
    read_dataset,
    source_name,
)
from dicom_node.convert.geometry import grid_corners, moved, orientation_axes, resample
from dicom_node.convert.series import decode_pixels
from dicom_node.convert.spatial_registration import (
    FrameRegistration,
    frame_transform,
    rotation_deg,
)
from dicom_node.errors import ConversionError
from dicom_node.types import Volume

log = logging.getLogger(__name__)

RTDOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"


def load_rtdose(source: Source) -> Volume:
    """The dose of an RT Dose instance on its own grid, in Gy (float32).

    Voxels are stored values times DoseGridScaling. Frame z positions come from
    GridFrameOffsetVector: relative to ImagePositionPatient along the slice normal (the standard
    form, first offset 0) or, as some older planning systems write it, absolute patient z
    (first offset equal to the z of ImagePositionPatient, axial grids only).
    """
    name = source_name(source, 0)
    ds = read_dataset(source, name)
    sop_class = get_str(ds, "SOPClassUID", name)
    if sop_class != RTDOSE_SOP_CLASS and get_str(ds, "Modality", name) != "RTDOSE":
        raise ConversionError(
            f"{name}: expected an RT Dose ({RTDOSE_SOP_CLASS}), found {sop_class}"
        )
    units = (get_str(ds, "DoseUnits", name, "") or "").upper()
    if units and units != "GY":
        raise ConversionError(f"{name}: DoseUnits must be GY, found {units!r} (relative dose?)")
    scaling = get_float(ds, "DoseGridScaling", name)
    if scaling is None or scaling <= 0:
        raise ConversionError(f"{name}: DoseGridScaling must be a positive number, found {scaling}")
    ipp = get_floats(ds, "ImagePositionPatient", name, 3)
    iop = get_floats(ds, "ImageOrientationPatient", name, 6)
    ps = get_floats(ds, "PixelSpacing", name, 2)
    if ipp is None or iop is None or ps is None:
        raise ConversionError(
            f"{name}: ImagePositionPatient, ImageOrientationPatient and PixelSpacing are required "
            "for a dose grid"
        )
    if ps[0] <= 0 or ps[1] <= 0:
        raise ConversionError(f"{name}: PixelSpacing must be positive, found {ps}")
    row, col, normal = orientation_axes(iop)
    n_frames = get_int(ds, "NumberOfFrames", name, 1) or 1
    if n_frames < 2:
        raise ConversionError(
            f"{name}: expected a 3D dose grid (NumberOfFrames 2 or more), found {n_frames} "
            "frame: a single dose plane, which says nothing of the dose above and below it"
        )
    offsets = get_floats(ds, "GridFrameOffsetVector", name, None)
    if offsets is None:
        raise ConversionError(
            f"{name}: GridFrameOffsetVector is required for a dose with {n_frames} frames"
        )
    if len(offsets) != n_frames:
        raise ConversionError(
            f"{name}: GridFrameOffsetVector has {len(offsets)} values, expected NumberOfFrames "
            f"= {n_frames}"
        )
    off = np.asarray(offsets, dtype=float)
    if off[0] != 0.0:
        axial = abs(abs(float(normal[2])) - 1.0) < 1e-6
        if axial and abs(off[0] - ipp[2]) < 1e-3:
            log.info("%s: GridFrameOffsetVector holds absolute z positions", name)
            off = (off - ipp[2]) * float(np.sign(normal[2]))
        else:
            log.info("%s: GridFrameOffsetVector starts at %.3f (relative)", name, off[0])
    steps = np.diff(off)
    if np.any(np.abs(steps) < 1e-6):
        raise ConversionError(f"{name}: GridFrameOffsetVector repeats a position: {offsets}")
    if np.max(np.abs(steps - steps[0])) > max(1e-3, 1e-3 * abs(steps[0])):
        raise ConversionError(
            f"{name}: GridFrameOffsetVector is not uniform: expected equal steps, found "
            f"{np.round(steps, 4).tolist()}"
        )
    array = decode_pixels(ds, name, n_frames).astype(np.float32) * np.float32(scaling)
    step = float(steps[0])
    first = np.asarray(ipp, dtype=float) + off[0] * normal
    if step < 0:  # frames stored against the normal: flip to keep a right-handed grid
        array = array[::-1]
        first = first + (n_frames - 1) * step * normal
        step = -step
    direction = np.stack([row, col, normal], axis=1)
    return Volume(
        array=np.ascontiguousarray(array),
        spacing=(float(ps[1]), float(ps[0]), step),
        origin=(float(first[0]), float(first[1]), float(first[2])),
        direction=direction,
        frame_of_reference_uid=get_str(ds, "FrameOfReferenceUID", name),
        source_instance_uids=(get_str(ds, "SOPInstanceUID", name, "") or "",),
        series_instance_uid=get_str(ds, "SeriesInstanceUID", name),
    )


#: the share of the target's voxels a dose grid may leave out (its edge, rounding); a plan's
#: dose grid holds its whole target, so a grid that leaves more out is a partial dose (a grid
#: cut short, the dose of part of the plan) whose zeros would be read as unirradiated tumour
UNCOVERED_SHARE = 0.01


def _check_covers(dose: Volume, target: Volume, label: str) -> None:
    """Refuse ``dose`` (on ``target``'s frame) when its grid leaves more than
    :data:`UNCOVERED_SHARE` of ``target`` (a mask) outside."""
    wanted = np.asarray(target.array, dtype=bool)
    total = int(wanted.sum())
    if total == 0:
        return
    ones = dose.with_array(np.ones(dose.shape, dtype=np.uint8))
    inside = resample(ones, target, order=0, fill=0.0, output_dtype=np.uint8).astype(bool)
    missed = total - int(np.count_nonzero(inside & wanted))
    if missed > UNCOVERED_SHARE * total:
        corners = grid_corners(dose)
        ks = np.nonzero(wanted.any(axis=(1, 2)))[0]
        ends = [target.affine @ np.array([0.0, 0.0, float(k), 1.0]) for k in (ks[0], ks[-1])]
        raise ConversionError(
            f"{label}: the dose grid leaves {missed} of the GTV's {total} voxels "
            f"({missed / total:.0%}) outside it (grid z {corners[:, 2].min():.1f} to "
            f"{corners[:, 2].max():.1f} mm, GTV slices z {min(e[2] for e in ends):.1f} to "
            f"{max(e[2] for e in ends):.1f} mm); expected a dose grid holding the whole target "
            "(a grid cut short, or the dose of part of the plan?)"
        )


def dose_on_grid(
    source: Source | Volume,
    reference: Volume,
    registrations: Sequence[FrameRegistration] = (),
    target: Volume | None = None,
) -> Volume:
    """The dose (Gy, float32) resampled onto ``reference``'s grid, trilinear, 0 outside.

    A dose on another frame of reference (the planning CT's) is placed on the reference's by
    the one of ``registrations`` that relates the two frames; without one,
    :class:`ConversionError` names both UIDs. With ``target`` (the GTV, a mask on
    ``reference``'s grid) a dose grid that leaves part of it out is refused.
    """
    dose = source if isinstance(source, Volume) else load_rtdose(source)
    ref_for, dose_for = reference.frame_of_reference_uid, dose.frame_of_reference_uid
    if not ref_for or not dose_for or (dose_for != ref_for and not registrations):
        raise ConversionError(
            f"RT Dose is on frame of reference {dose_for or '<none>'} but the image is on "
            f"{ref_for or '<none>'}; expected the same frame of reference or a Spatial "
            "Registration relating the two (send the registration the planning system made "
            "with the study)"
        )
    if dose_for != ref_for:
        matrix, reg = frame_transform(registrations, dose_for, ref_for, "RT Dose")
        dose = moved(dose, matrix, ref_for)
        log.info(
            "RT Dose on frame %s placed on the image's by Spatial Registration %s (rotation "
            "%.1f degrees)", dose_for, reg.sop_instance_uid if reg else "", rotation_deg(matrix),
        )  # fmt: skip
    if target is not None:
        _check_covers(dose, target, f"RT Dose {dose.source_instance_uids[0]}".rstrip())
    values = resample(dose, reference, order=1, fill=0.0, output_dtype=np.float32)
    covered = float(np.mean(values > 0)) if values.size else 0.0
    log.info("dose resampled onto the image grid: max %.2f Gy", float(values.max(initial=0.0)))
    if covered == 0.0:
        log.warning("the dose grid does not overlap the image (or the dose is zero)")
    return reference.with_array(values)
