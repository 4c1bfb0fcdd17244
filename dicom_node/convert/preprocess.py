"""Model-space preprocessing and its inverse.

The model sees every study on the same kind of grid: a fixed shape at a fixed spacing, axes in a
canonical orientation (RAS by default: i towards the patient's right, j anterior, k superior),
centred on the head, with normalised intensities. The model's outputs are mapped back onto the
exact source grid (shape, spacing, origin, direction, UIDs of the source series), so that output
objects line up with the images they were computed from.

Typical use::

    grid = plan_model_grid(t1c, spacing=(1.0, 1.0, 1.0), shape=(160, 192, 160))
    x = to_model_space(t1c, grid)                      # float32 [k, j, i]
    x, scaling = normalise_intensity(x, foreground_mask_array(x))
    ...                                                # model
    y = from_model_space(scaling.invert(pred), grid, t1c)   # Volume on t1c's grid
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.convert.geometry import resample
from dicom_node.errors import ConversionError
from dicom_node.types import Volume

log = logging.getLogger(__name__)

_AXES = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}


def orientation_matrix(code: str) -> npt.NDArray[np.float64]:
    """Direction matrix (columns i, j, k in LPS) of a three-letter orientation code like RAS."""
    code = code.upper()
    if len(code) != 3 or any(c not in _AXES for c in code):
        raise ConversionError(f"orientation code must be 3 letters of LRPAIS, found {code!r}")
    matrix = np.array([_AXES[c] for c in code]).T
    if abs(abs(np.linalg.det(matrix)) - 1) > 1e-9:
        raise ConversionError(f"orientation code {code!r} names the same axis twice")
    return matrix


@dataclass(frozen=True)
class ModelGrid:
    """The grid the model works on: shape [k, j, i], spacing (di, dj, dk), origin, direction."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: npt.NDArray[np.float64]

    def volume(self, array: npt.NDArray[np.generic]) -> Volume:
        if array.shape != self.shape:
            raise ValueError(f"expected shape {self.shape}, found {array.shape}")
        return Volume(
            array=array, spacing=self.spacing, origin=self.origin, direction=self.direction
        )

    def template(self) -> Volume:
        return self.volume(np.zeros(self.shape, dtype=np.uint8))


def without_extremes(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The finite ``values`` (flattened, in their own type) but those far outside the bulk:
    beyond ten times the 0.1st to 99.9th percentile range from it (a handful of corrupt voxels
    at 1e6 in an image of 0..1300). An image without such outliers keeps every value."""
    v = np.asarray(values).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return v
    lo, hi = np.percentile(v.astype(np.float64), [0.1, 99.9])
    span = max(float(hi - lo), 1e-12)
    keep = (v >= lo - 10 * span) & (v <= hi + 10 * span)
    return v if keep.all() else v[keep]


def otsu_threshold(values: npt.NDArray[np.generic], bins: int = 256) -> float:
    """Otsu's threshold of a set of values (extreme outliers left out: :func:`without_extremes`;
    they made the histogram's bins so wide that the head fell below the threshold)."""
    v = np.asarray(without_extremes(values), dtype=np.float64)
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_mask_array(array: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """Head/brain foreground: above Otsu's threshold, largest component, holes filled."""
    a = np.asarray(array, dtype=np.float32)
    if a.size == 0:
        return np.zeros(a.shape, dtype=bool)
    mask = a > otsu_threshold(a)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    filled: npt.NDArray[np.bool_] = ndimage.binary_fill_holes(mask)
    return filled


def plan_model_grid(
    volume: Volume,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] | None = None,
    *,
    orientation: str = "RAS",
    foreground: npt.NDArray[np.bool_] | None = None,
    target: npt.NDArray[np.bool_] | None = None,
) -> ModelGrid:
    """A model grid in the canonical ``orientation`` at ``spacing`` (di, dj, dk) mm.

    With ``shape`` ([k, j, i]) the grid is that size, centred on the centre of the foreground
    bounding box (``foreground`` on ``volume``'s grid, by default :func:`foreground_mask_array`),
    so the head is cropped or padded to fit. Without it the grid covers the whole source volume.
    ``target`` (the GTV, on ``volume``'s grid) must lie inside the grid: when the head's centre
    would leave part of it out (a field of view with the neck), the grid moves as little as
    needed to hold it; a target larger than the grid is refused.
    """
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ConversionError(f"model spacing must be 3 positive numbers, found {spacing}")
    direction = orientation_matrix(orientation)
    nk, nj, ni = volume.shape
    if foreground is None:
        foreground = foreground_mask_array(np.asarray(volume.array))
    if foreground.shape != volume.shape:
        raise ConversionError(
            f"foreground mask shape {foreground.shape} differs from the volume's {volume.shape}"
        )
    if foreground.any():
        idx = np.nonzero(foreground)
        lo = np.array([idx[2].min(), idx[1].min(), idx[0].min()], dtype=float)  # i, j, k
        hi = np.array([idx[2].max(), idx[1].max(), idx[0].max()], dtype=float)
    else:
        lo, hi = np.zeros(3), np.array([ni - 1, nj - 1, nk - 1], dtype=float)
    if shape is None:
        lo, hi = np.zeros(3), np.array([ni - 1, nj - 1, nk - 1], dtype=float)
    # the 8 corners of the box (voxel index space) in model axes (mm)
    corners_ijk = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    world = (volume.affine @ np.c_[corners_ijk, np.ones(8)].T)[:3].T
    in_model = world @ direction  # coordinates along the model axes
    cmin, cmax = in_model.min(axis=0), in_model.max(axis=0)
    spacing_arr = np.asarray(sp)
    if shape is None:
        size_ijk = np.floor((cmax - cmin) / spacing_arr + 1e-6).astype(int) + 1
        start = cmin
    else:
        if len(shape) != 3 or min(shape) < 1:
            raise ConversionError(f"model shape must be 3 positive integers, found {shape}")
        size_ijk = np.array([shape[2], shape[1], shape[0]], dtype=int)
        centre = (cmin + cmax) / 2
        start = centre - (size_ijk - 1) / 2 * spacing_arr
        if target is not None and target.any():
            start = _holding(start, (size_ijk - 1) * spacing_arr, volume, target, direction)
        extent = cmax - cmin
        if np.any(extent > (size_ijk - 1) * spacing_arr + 1e-6):
            log.warning(
                "head extent %s mm exceeds the model field of view %s mm: cropped",
                np.round(extent, 1).tolist(),
                np.round((size_ijk - 1) * spacing_arr, 1).tolist(),
            )
    origin = direction @ start
    # when the model axes are the source axes up to order and sign, at the same spacing, put the
    # model voxels on the source lattice: resampling then copies voxels exactly
    relation = np.asarray(volume.direction, dtype=float).T @ direction
    if np.allclose(np.abs(relation), np.round(np.abs(relation)), atol=1e-6):
        perm = np.abs(np.round(relation)).astype(int)
        src_spacing = np.asarray(volume.spacing) @ perm  # source spacing along each model axis
        if np.allclose(src_spacing, spacing_arr, rtol=1e-6):
            # the nearest lattice point along the model axes, a tie going to the lower model
            # coordinate: in voxel indices (round half to even) the tie went either way with
            # the order the source stores its voxels in, and the same image stored reversed
            # got a grid one voxel apart, and another prediction
            lattice = direction.T @ np.asarray(volume.origin, dtype=float)
            steps = np.floor((direction.T @ origin - lattice) / spacing_arr + 0.5)
            origin = direction @ (lattice + steps * spacing_arr)
    return ModelGrid(
        shape=(int(size_ijk[2]), int(size_ijk[1]), int(size_ijk[0])),
        spacing=(sp[0], sp[1], sp[2]),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=direction,
    )


def to_model_space(
    volume: Volume, grid: ModelGrid, *, order: int = 1, fill: float = 0.0
) -> npt.NDArray[np.float32]:
    """``volume`` resampled onto the model grid (float32 [k, j, i]); masks: use ``order=0``."""
    out = resample(volume, grid.template(), order=order, fill=fill, output_dtype=np.float32)
    return np.asarray(out, dtype=np.float32)


def from_model_space(
    array: npt.NDArray[np.generic],
    grid: ModelGrid,
    source: Volume,
    *,
    order: int = 1,
    fill: float = 0.0,
    as_mask: bool = False,
) -> Volume:
    """A model-space array mapped back onto ``source``'s exact grid (same shape, UIDs...).

    ``as_mask`` resamples a label/probability map linearly and thresholds it at 0.5, which keeps
    boundaries smoother than nearest neighbour.
    """
    if array.shape != grid.shape:
        raise ConversionError(
            f"model output shape {array.shape} differs from the grid {grid.shape}"
        )
    model_volume = grid.volume(np.asarray(array, dtype=np.float32))
    values = resample(model_volume, source, order=order, fill=fill, output_dtype=np.float32)
    if as_mask:
        return source.with_array(values >= 0.5)
    return source.with_array(values)


@dataclass(frozen=True)
class IntensityScaling:
    """``normalised = (value - centre) / scale``; :meth:`invert` undoes it."""

    centre: float
    scale: float

    def apply(self, array: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        return ((np.asarray(array, dtype=np.float32) - self.centre) / self.scale).astype(np.float32)

    def invert(self, array: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        return (np.asarray(array, dtype=np.float32) * self.scale + self.centre).astype(np.float32)


def _holding(
    start: npt.NDArray[np.float64],
    span: npt.NDArray[np.float64],
    volume: Volume,
    target: npt.NDArray[np.bool_],
    direction: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """``start`` (the grid's first voxel centre, along the model axes) moved as little as
    needed for a grid spanning ``span`` mm to hold the voxels of ``target``."""
    k, j, i = np.nonzero(target)
    centres = np.stack([i, j, k, np.ones(len(i))]).astype(np.float64)  # the target's voxels
    world = (volume.affine @ centres)[:3].T @ direction  # along the model axes
    tmin, tmax = world.min(axis=0), world.max(axis=0)
    if np.any(tmax - tmin > span + 1e-6):
        raise ConversionError(
            f"the tumour outline spans {np.round(tmax - tmin, 1).tolist()} mm, more than the "
            f"model's field of view {np.round(span, 1).tolist()} mm; expected a GTV the model's "
            "crop can hold"
        )
    moved = np.clip(start, tmax - span, tmin)
    if not np.allclose(moved, start):
        log.warning(
            "the model's field of view, centred on the head, would leave part of the tumour "
            "outline out: moved %s mm to hold it (a field of view with the neck?)",
            np.round(moved - start, 1).tolist(),
        )
    return np.asarray(moved, dtype=np.float64)


def normalise_intensity(
    array: npt.NDArray[np.generic],
    mask: npt.NDArray[np.bool_] | None = None,
    *,
    method: str = "zscore",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[npt.NDArray[np.float32], IntensityScaling]:
    """Normalise intensities inside ``mask`` (default: all voxels).

    ``zscore``: mean 0, standard deviation 1 inside the mask. ``percentile``: the given
    percentiles inside the mask map to 0 and 1 (values outside are not clipped, so the mapping
    stays invertible).
    """
    a = np.asarray(array, dtype=np.float32)
    region = a[mask] if mask is not None and mask.any() else a.ravel()
    if region.size == 0:
        raise ConversionError("cannot normalise an empty image")
    stats = without_extremes(region)  # a few corrupt voxels must not set the scale
    if method == "zscore":
        centre, scale = float(stats.mean()), float(stats.std())
    elif method == "percentile":
        lo, hi = np.percentile(stats, percentiles)
        centre, scale = float(lo), float(hi - lo)
    else:
        raise ConversionError(f"normalisation method must be zscore or percentile, found {method}")
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    scaling = IntensityScaling(centre=centre, scale=scale)
    return scaling.apply(a), scaling
