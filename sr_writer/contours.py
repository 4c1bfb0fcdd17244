"""Planar contours of a binary mask, in patient coordinates (for RTSTRUCT and friends).

Each axial slice (fixed ``k``) of the mask is traced with marching squares at the 0.5 level, so
vertices lie on voxel edges between an inside and an outside voxel centre (sub-voxel accurate, the
polygon encloses exactly the voxel centres of the mask). Holes come out as separate closed
contours; readers that apply the even-odd (XOR) rule, as the DICOM standard recommends for
``CLOSED_PLANAR`` contours on one slice, recover the hole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicom_node.errors import ExportError
from dicom_node.types import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceContour:
    """One closed polygon on slice ``k``: ``points`` is (N, 3) LPS millimetres, not repeated."""

    k: int
    points: npt.NDArray[np.float64]


def _trace_slice(plane: npt.NDArray[np.bool_], tolerance: float) -> list[npt.NDArray[np.float64]]:
    """Closed polygons of one 2D boolean plane, as (N, 2) arrays of (row, column) indices."""
    from skimage import measure  # imported lazily: it is slow to import

    padded = np.pad(plane.astype(np.float32), 1)
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        # find_contours closes a polygon by repeating its first vertex; DICOM does not.
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if tolerance > 0:
            contour = _drop_collinear(contour, tolerance)
        if len(contour) < 3:
            continue
        polygons.append(contour - 1.0)  # undo the padding
    return polygons


def _drop_collinear(poly: npt.NDArray[np.float64], tolerance: float) -> npt.NDArray[np.float64]:
    """Remove vertices lying on the segment between their neighbours (closed polygon)."""
    if len(poly) < 4:
        return poly
    prev = np.roll(poly, 1, axis=0)
    nxt = np.roll(poly, -1, axis=0)
    a, b = poly - prev, nxt - prev
    cross = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    length = np.maximum(np.hypot(b[:, 0], b[:, 1]), 1e-12)
    # distance of the vertex from the line through its neighbours, and it lies between them
    between = np.einsum("ij,ij->i", a, b) > 0
    keep = ~((cross / length <= tolerance) & between)
    return poly[keep] if keep.sum() >= 3 else poly


def mask_contours(mask: Volume, tolerance: float = 0.01) -> list[SliceContour]:
    """Trace every slice of a boolean mask; vertices are returned in patient coordinates.

    ``tolerance`` (voxels) drops vertices that lie on a straight line within that distance
    (0.01 keeps the shape exact and removes the collinear vertices of straight voxel edges).
    """
    array = np.asarray(mask.array)
    if array.dtype != np.bool_:
        values = np.unique(array)
        if not np.all(np.isin(values, (0, 1))):
            raise ExportError(
                f"a contour mask must be boolean (0/1), found values {values[:6].tolist()}"
            )
        array = array.astype(bool)
    affine = mask.affine
    out: list[SliceContour] = []
    for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1)):
        for poly in _trace_slice(array[k], tolerance):
            rows, cols = poly[:, 0], poly[:, 1]
            ijk1 = np.stack([cols, rows, np.full_like(rows, float(k)), np.ones_like(rows)])
            xyz = (affine @ ijk1)[:3].T
            out.append(SliceContour(k=int(k), points=xyz))
    logger.debug("traced %d contours on %d slices", len(out), len({c.k for c in out}))
    return out
