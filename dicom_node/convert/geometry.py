"""Geometry of image stacks: orientation, slice ordering, spacing and shear checks, resampling.

All coordinates are DICOM patient coordinates (LPS, millimetres). A stack is a list of 2D frames,
each with an ``ImagePositionPatient`` (centre of its first pixel) and a shared
``ImageOrientationPatient`` (row direction, column direction). Slices are ordered along the slice
normal ``row x col``, so that the resulting :class:`~dicom_node.types.Volume` has a right-handed
direction matrix ``[row, col, normal]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.errors import ConversionError
from dicom_node.types import Volume

log = logging.getLogger(__name__)

#: largest tolerated deviation of |row|, |col| from 1 and of row.col from 0
ORIENTATION_TOLERANCE = 1e-3
#: two orientations are "the same" when their direction cosines differ by less than this
SAME_ORIENTATION_TOLERANCE = 1e-3
#: two slices are at the same position when closer than this along the normal (mm)
DUPLICATE_TOLERANCE_MM = 1e-3


def _fmt(v: Sequence[float] | npt.NDArray[np.float64], digits: int = 4) -> str:
    return "(" + ", ".join(f"{float(x):.{digits}g}" for x in v) + ")"


def orientation_axes(
    iop: Sequence[float],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row direction, column direction and slice normal (unit vectors) from ImageOrientationPatient.

    Raises :class:`ConversionError` when the six values are not two (nearly) orthonormal vectors.
    """
    values = np.asarray(iop, dtype=float)
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise ConversionError(
            f"ImageOrientationPatient must be 6 finite numbers, found {list(iop)!r}"
        )
    row, col = values[:3], values[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    dot = float(row @ col)
    if abs(nr - 1) > ORIENTATION_TOLERANCE or abs(nc - 1) > ORIENTATION_TOLERANCE:
        raise ConversionError(
            "ImageOrientationPatient must hold two unit vectors, found lengths "
            f"{nr:.6f} and {nc:.6f} in {_fmt(values)}"
        )
    if abs(dot) > ORIENTATION_TOLERANCE:
        raise ConversionError(
            "ImageOrientationPatient row and column directions must be orthogonal, found a dot "
            f"product of {dot:.6f} in {_fmt(values)}"
        )
    row = row / nr
    col = col - (row @ col) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal


@dataclass(frozen=True)
class StackGeometry:
    """Result of :func:`check_stack`: the order of the frames and the grid they form."""

    order: tuple[int, ...]
    """Frame indices sorted along the slice normal (k = 0 first)."""
    origin: tuple[float, float, float]
    slice_spacing: float
    direction: npt.NDArray[np.float64]


def check_stack(
    positions: Sequence[Sequence[float]],
    iop: Sequence[float],
    *,
    fallback_spacing: float | None = None,
    spacing_rel_tolerance: float = 0.01,
    spacing_abs_tolerance_mm: float = 0.02,
    shear_tolerance_mm: float = 0.05,
) -> StackGeometry:
    """Order frames along the slice normal and check that they form a regular grid.

    ``positions`` are the ImagePositionPatient of each frame, ``iop`` the orientation shared by
    all frames. Problems found (duplicate positions, sheared stack / gantry tilt, non-uniform
    spacing or missing slices) are gathered and raised together in one :class:`ConversionError`.
    ``fallback_spacing`` is the slice spacing used for a single-frame stack.
    """
    row, col, normal = orientation_axes(iop)
    pos = np.asarray(positions, dtype=float)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) == 0:
        raise ConversionError(f"expected one 3D ImagePositionPatient per frame, found {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise ConversionError("ImagePositionPatient holds non-finite values")
    direction = np.stack([row, col, normal], axis=1)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    along_sorted = along[order]
    pos_sorted = pos[order]
    n = len(pos)
    if n == 1:
        spacing = fallback_spacing if fallback_spacing and fallback_spacing > 0 else 1.0
        return StackGeometry(
            order=(int(order[0]),),
            origin=(float(pos[0, 0]), float(pos[0, 1]), float(pos[0, 2])),
            slice_spacing=float(spacing),
            direction=direction,
        )

    problems: list[str] = []
    steps = np.diff(along_sorted)
    dup = np.nonzero(steps < DUPLICATE_TOLERANCE_MM)[0]
    if len(dup):
        where = ", ".join(f"{along_sorted[d]:.3f}" for d in dup[:5])
        more = f" (and {len(dup) - 5} more)" if len(dup) > 5 else ""
        problems.append(
            f"{len(dup)} duplicate slice position(s) along the normal {_fmt(normal)} at "
            f"{where} mm{more}: expected one frame per position (several echoes, time points, "
            "acquisitions or image types mixed in one series?)"
        )
    else:
        # shear: the in-plane offset of each slice relative to the first must be zero
        rel = pos_sorted - pos_sorted[0]
        in_plane = np.stack([rel @ row, rel @ col], axis=1)
        worst = int(np.argmax(np.linalg.norm(in_plane, axis=1)))
        drift = float(np.linalg.norm(in_plane[worst]))
        if drift > shear_tolerance_mm:
            total = pos_sorted[-1] - pos_sorted[0]
            angle = float(
                np.degrees(np.arccos(min(1.0, abs(total @ normal) / np.linalg.norm(total))))
            )
            problems.append(
                "sheared stack (gantry tilt?): slice positions advance along "
                f"{_fmt(total / np.linalg.norm(total))} but the slice normal is {_fmt(normal)} "
                f"(angle {angle:.2f} degrees, in-plane drift {drift:.3f} mm over "
                f"{worst} slices); expected positions along the normal"
            )
        median = float(np.median(steps))
        tol = max(spacing_abs_tolerance_mm, spacing_rel_tolerance * median)
        bad = np.nonzero(np.abs(steps - median) > tol)[0]
        if len(bad):
            details = "; ".join(
                f"{steps[b]:.3f} mm between slices at {along_sorted[b]:.3f} and "
                f"{along_sorted[b + 1]:.3f} mm"
                + (
                    f" (about {round(steps[b] / median) - 1} slice(s) missing)"
                    if steps[b] > median and round(steps[b] / median) >= 2
                    else ""
                )
                for b in bad[:5]
            )
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            problems.append(
                f"non-uniform slice spacing: expected steps of {median:.3f} mm along the normal "
                f"(tolerance {tol:.3f} mm), found {details}{more}"
            )
    if problems:
        raise ConversionError("; ".join(problems))
    spacing = float((along_sorted[-1] - along_sorted[0]) / (n - 1))
    first = pos_sorted[0]
    return StackGeometry(
        order=tuple(int(i) for i in order),
        origin=(float(first[0]), float(first[1]), float(first[2])),
        slice_spacing=spacing,
        direction=direction,
    )


def same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(
        np.max(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))
        < SAME_ORIENTATION_TOLERANCE
    )


def plane_axes(normal: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
    """Two unit axes ``u``, ``v`` of the plane of the unit ``normal`` (``u`` from the x axis
    unless the normal is nearly along it), with ``u x v = normal``: the in-plane axes of a grid
    whose slices are planes of that normal."""
    u = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = u - (u @ normal) * normal
    u /= np.linalg.norm(u)
    return u, np.cross(normal, u)


def world_to_index(volume: Volume) -> npt.NDArray[np.float64]:
    """4x4 matrix mapping LPS millimetres to continuous voxel indices (i, j, k, 1)."""
    return np.asarray(np.linalg.inv(volume.affine), dtype=np.float64)


def grid_corners(volume: Volume) -> npt.NDArray[np.float64]:
    """The 8 corner voxel centres of ``volume``'s grid in LPS millimetres, shape (8, 3)."""
    k, j, i = volume.shape
    idx = np.array([[a, b, c, 1.0] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)])
    return np.asarray((volume.affine @ idx.T)[:3].T, dtype=np.float64)


def grid_centre(volume: Volume) -> npt.NDArray[np.float64]:
    """The centre of ``volume``'s grid (midway between its corner voxels) in LPS mm."""
    half = (np.array(volume.shape[::-1], dtype=float) - 1.0) / 2.0
    return np.asarray((volume.affine @ np.array([*half, 1.0]))[:3], dtype=np.float64)


def moved(volume: Volume, matrix: npt.ArrayLike, frame_of_reference_uid: str | None) -> Volume:
    """``volume`` re-expressed in another frame of reference: the same voxels, its grid mapped
    by ``matrix`` (4x4, points of the volume's frame to points of the new frame; a rotation,
    optionally with a uniform scale). Nothing is resampled."""
    m = np.asarray(matrix, dtype=float)
    axes = m[:3, :3] @ (np.asarray(volume.direction, dtype=float) @ np.diag(volume.spacing))
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    gram = direction.T @ direction
    if np.max(np.abs(gram - np.eye(3))) > ORIENTATION_TOLERANCE or np.linalg.det(direction) < 0:
        raise ConversionError(
            "expected a rigid transform (a rotation, optionally scaled) between the frames of "
            "reference, found one that shears or mirrors the grid "
            f"(axes {_fmt(direction.T.ravel())})"
        )
    origin = m[:3, :3] @ np.asarray(volume.origin, dtype=float) + m[:3, 3]
    return replace(
        volume,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=direction,
        frame_of_reference_uid=frame_of_reference_uid,
    )


def sitk_image(volume: Volume, array: npt.ArrayLike | None = None) -> Any:
    """A SimpleITK image of ``array`` (default: ``volume.array``) on ``volume``'s grid."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(volume.array if array is None else array))
    img.SetSpacing(tuple(float(s) for s in volume.spacing))
    img.SetOrigin(tuple(float(o) for o in volume.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
    return img


def same_grid(a: Volume, b: Volume, tol_mm: float = 1e-3) -> bool:
    """True when two volumes have the same shape and the same voxel-to-world mapping."""
    if a.shape != b.shape:
        return False
    corners = np.array([[0, 0, 0, 1], [*reversed(a.shape), 1]], dtype=float).T
    return bool(np.max(np.abs(a.affine @ corners - b.affine @ corners)) < tol_mm)


def resample(
    source: Volume,
    reference: Volume,
    *,
    order: int = 1,
    fill: float = 0.0,
    output_dtype: npt.DTypeLike = np.float32,
) -> npt.NDArray[Any]:
    """Values of ``source`` at the voxel centres of ``reference`` (array indexed [k, j, i]).

    ``order`` 0 is nearest neighbour, 1 trilinear. ``source`` is extended by ``fill`` beyond
    its edges (linearly, values fade to ``fill`` within one voxel beyond the outer centres).
    """
    # index_src = inv(A_src) @ A_ref @ index_ref, expressed in [k, j, i] order for ndimage
    m = np.linalg.inv(source.affine) @ reference.affine
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    m_kji = perm @ m @ perm
    # snap round-off (1e-12 voxel) so that identical or integer-shifted grids copy voxels exactly
    snapped = np.round(m_kji)
    m_kji = np.where(np.abs(m_kji - snapped) < 1e-9, snapped, m_kji)
    data = np.asarray(source.array)
    copied = _voxel_copy(data, m_kji, reference.array.shape, fill, np.dtype(output_dtype))
    if copied is not None:
        return copied
    if data.dtype == bool:
        data = data.astype(np.float32)
    out = ndimage.affine_transform(
        data,
        m_kji[:3, :3],
        offset=m_kji[:3, 3],
        output_shape=reference.array.shape,
        order=order,
        mode="grid-constant",
        cval=fill,
        output=np.dtype(output_dtype) if np.dtype(output_dtype) != np.bool_ else np.float32,
        prefilter=False,
    )
    if np.dtype(output_dtype) == np.bool_:
        return np.asarray(out >= 0.5)
    return np.asarray(out)


def _voxel_copy(
    data: npt.NDArray[Any],
    m_kji: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    fill: float,
    dtype: np.dtype[Any],
) -> npt.NDArray[Any] | None:
    """When every reference voxel centre is a source voxel centre (the index map is a signed
    permutation with integer offsets: the same spacing, axes flipped, swapped or shifted), the
    values by slicing, as nearest-neighbour and trilinear interpolation both give them there
    (a boolean output is, as in :func:`resample`, the value >= 0.5); ``None`` otherwise. A
    readers' Segmentation stored in the opposite slice order is such a grid: a flip."""
    a, offset = m_kji[:3, :3], m_kji[:3, 3]
    if not (np.all(np.isin(a, (-1.0, 0.0, 1.0))) and np.all(offset == np.round(offset))):
        return None
    if not (np.all(np.abs(a).sum(axis=0) == 1) and np.all(np.abs(a).sum(axis=1) == 1)):
        return None
    axes = [int(np.flatnonzero(a[:, c])[0]) for c in range(3)]  # source axis of output axis c
    src_slices, out_slices = [], []
    for c, r in enumerate(axes):
        step, start = int(a[r, c]), int(offset[r])  # source index = step * output index + start
        # output indices whose source index lies in [0, n_src)
        lo, hi = (
            (-start, data.shape[r] - start) if step == 1 else (start - data.shape[r] + 1, start + 1)
        )
        lo, hi = max(lo, 0), min(hi, shape[c])
        if lo >= hi:
            return np.full(shape, fill >= 0.5 if dtype == np.bool_ else fill, dtype=dtype)
        first, last = step * lo + start, step * (hi - 1) + start
        src_slices.append(
            slice(first, last + 1) if step == 1 else slice(first, last - 1 if last else None, -1)
        )
        out_slices.append(slice(lo, hi))
    values = np.transpose(data, axes)[tuple(src_slices)]
    if dtype == np.bool_ and values.dtype != np.bool_:
        values = values >= 0.5
    out = np.full(shape, fill >= 0.5 if dtype == np.bool_ else fill, dtype=dtype)
    out[tuple(out_slices)] = values
    return out
