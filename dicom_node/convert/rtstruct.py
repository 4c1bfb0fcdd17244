"""RT Structure Set to a binary mask on an image grid, with our own sub-voxel rasteriser.

Public entry points:

- :func:`list_rois` - the ROIs of a structure set (number, name, frame of reference, contours);
- :func:`load_rtstruct_mask` - the mask of the ROI whose name matches a pattern, on the grid of a
  :class:`~dicom_node.types.Volume` (normally the T1-Gd series);
- :func:`rasterise_polygons` - the rasteriser itself, on polygons given in voxel coordinates.

Rasterisation rule: a voxel belongs to the ROI when its centre lies inside the contours of its
slice under the even-odd rule. Vertices keep their sub-voxel positions (no rounding), several
contours on one slice are combined, and a contour inside another one is a hole (XOR), which is
how planning systems export holes. On the image's frame of reference every contour must lie in
the plane of an image slice; a contour that is oblique to the slices or lies between them is
refused. A structure set on another frame (the planning CT's) is rasterised on its own contour
planes and placed on the image by the study's Spatial Registration (:func:`contour_grid`,
:mod:`dicom_node.convert.spatial_registration`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_node.convert._dataset import (
    Source,
    get_ds_array,
    get_int,
    get_items,
    get_str,
    get_value,
    read_dataset,
    source_name,
)
from dicom_node.convert.geometry import (
    grid_centre,
    grid_corners,
    moved,
    plane_axes,
    resample,
    world_to_index,
)
from dicom_node.convert.spatial_registration import (
    FrameRegistration,
    frame_transform,
    rotation_deg,
)
from dicom_node.errors import ConversionError
from dicom_node.types import FrameMapping, PlaneLattice, Volume

log = logging.getLogger(__name__)

#: GTV-like ROI names: "GTV", "GTV_1", "gross tumour", "Tumor"...
DEFAULT_ROI_PATTERN = r"(?i)^\s*(gtv|gross|tumou?r)"

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass(frozen=True)
class RoiInfo:
    """One ROI of a structure set."""

    number: int
    name: str
    frame_of_reference_uid: str | None
    contour_count: int
    interpreted_type: str = ""  # RTROIInterpretedType (GTV, CTV, PTV, ORGAN...), "" when none


@dataclass(frozen=True)
class Contour:
    """One contour of an ROI: its geometric type and its points (n, 3) in LPS mm."""

    geometric_type: str
    points: npt.NDArray[np.float64]  # (n, 3) LPS mm


def _read(source: Source | Dataset, index: int = 0) -> tuple[Dataset, str]:
    name = source_name(source, index)
    ds = read_dataset(source, name)
    sop_class = get_str(ds, "SOPClassUID", name)
    modality = get_str(ds, "Modality", name)
    if sop_class != RTSTRUCT_SOP_CLASS and modality != "RTSTRUCT":
        raise ConversionError(
            f"{name}: expected an RT Structure Set ({RTSTRUCT_SOP_CLASS}), found SOP class "
            f"{sop_class} / modality {modality}"
        )
    return ds, _structure_set_name(ds, name)


def _structure_set_name(ds: Dataset, file_name: str) -> str:
    """How a structure set is named in reasons and logs: by its label and series, which a
    person can find in the PACS (the spool's file name is its SOP Instance UID)."""
    # a value that cannot be read names nothing, and does not refuse the structure set: found
    # by the byte-level fuzz test (a label whose VR bytes were garbled raised pydicom's
    # NotImplementedError here, which no caller took for a conversion error)
    label, number = (_readable(ds, k, file_name) for k in ("StructureSetLabel", "SeriesNumber"))
    named = f"RT structure set {label!r}" if label else "RT structure set"
    return f"{named} (series {number})" if number else f"{named} ({file_name})"


def _readable(ds: Dataset, keyword: str, name: str) -> str:
    """``keyword``'s value as text, '' when absent or unreadable."""
    try:
        return str(get_value(ds, keyword, name) or "").strip()
    except ConversionError:
        return ""


def _rois(ds: Dataset, name: str) -> dict[int, RoiInfo]:
    counts: dict[int, int] = {}
    for item in get_items(ds, "ROIContourSequence", name):
        number = get_int(item, "ReferencedROINumber", name)
        if number is not None:
            counts[number] = len(get_items(item, "ContourSequence", name))
    types: dict[int, str] = {}
    try:  # only a hint for choosing among GTV-like names: a damaged sequence is no reason to stop
        for item in get_items(ds, "RTROIObservationsSequence", name):
            number = get_int(item, "ReferencedROINumber", name)
            if number is not None:
                types[number] = (get_str(item, "RTROIInterpretedType", name, "") or "").upper()
    except ConversionError as exc:
        log.warning("%s: RT ROI Observations not read (%s): ROI types unknown", name, exc)
        types = {}
    rois: dict[int, RoiInfo] = {}
    for item in get_items(ds, "StructureSetROISequence", name):
        number = get_int(item, "ROINumber", name)
        if number is None:
            raise ConversionError(f"{name}: a StructureSetROISequence item has no ROINumber")
        rois[number] = RoiInfo(
            number=number,
            name=get_str(item, "ROIName", name, "") or "",
            frame_of_reference_uid=get_str(item, "ReferencedFrameOfReferenceUID", name),
            contour_count=counts.get(number, 0),
            interpreted_type=types.get(number, ""),
        )
    return rois


@dataclass(frozen=True)
class StructureSetChoice:
    """The structure set of a study that holds the GTV, and why it was chosen among others
    (``note`` is "" when there was only one)."""

    path: Path
    note: str


def choose_structure_set(
    paths: Sequence[Path],
    roi_pattern: str,
    placeable: Callable[[str], str | None] | None = None,
) -> StructureSetChoice:
    """Of a study's RT structure sets (``paths``, in the order of preference of their series),
    the one to read the GTV from: one with a contoured ROI whose name matches ``roi_pattern``,
    not REJECTED, APPROVED before UNAPPROVED (ApprovalStatus), then the latest
    (StructureSetDate, then StructureSetTime; a missing date counts as earliest; among equals,
    the first given). A structure set of organs at risk only (or with an empty "GTV" of a
    template), an earlier version or a rejected draft sent with the plan's is passed over, and
    the note says so (it is "" when there was nothing to choose from); when none qualifies,
    :class:`ConversionError` lists each one with why. A single structure set is used unless it
    is REJECTED: reading it gives the precise error when it holds no usable GTV.

    ``placeable`` tells, for a frame of reference UID, why a GTV drawn on it cannot be placed on
    the T1-Gd (``None`` when it can: the T1-Gd's frame, or one a Spatial Registration relates to
    it). With it, sets whose GTV can be placed come first: a later set on the planning CT's
    frame, sent without its registration, does not hide one drawn on the MR. When no set can be
    placed, the choice is made among them all, and reading it gives the precise error."""
    if not paths:
        raise ConversionError("RT structure set: expected at least one, found none")
    if len(paths) == 1:  # nothing to choose: reading it says what is wrong with it, if anything
        ds, name = _read(Path(paths[0]))
        if (get_str(ds, "ApprovalStatus", name, "") or "").upper() == "REJECTED":
            raise ConversionError(
                f"RT structure set {name}: ApprovalStatus REJECTED; expected a structure set "
                "the planning system has not rejected"
            )
        return StructureSetChoice(Path(paths[0]), "")
    regex = re.compile(roi_pattern)
    usable: list[tuple[tuple[int, str, str], str, Path]] = []  # ((approved, date, time), ...)
    elsewhere: list[tuple[tuple[int, str, str], str, Path]] = []  # usable, cannot be placed
    why_elsewhere: list[str] = []
    passed: list[str] = []
    for path in map(Path, paths):
        try:
            ds, name = _read(path)
            rois = list(_rois(ds, name).values())
        except ConversionError as exc:
            passed.append(f"{path.name}: {exc}")
            continue
        status = (get_str(ds, "ApprovalStatus", name, "") or "").upper()
        names = ", ".join(r.name for r in rois) or "none"
        label = f"{path.name} ({status or 'no ApprovalStatus'}, ROIs {names})"
        if not any(regex.search(r.name) and r.contour_count for r in rois):
            passed.append(f"{label}: no contoured ROI matches {roi_pattern!r}")
        elif status == "REJECTED":
            passed.append(f"{label}: rejected")
        else:
            date = get_str(ds, "StructureSetDate", name, "") or ""
            time = get_str(ds, "StructureSetTime", name, "") or ""
            key = (int(status == "APPROVED"), date, time)
            frames = sorted(
                {
                    r.frame_of_reference_uid for r in rois
                    if r.frame_of_reference_uid and regex.search(r.name) and r.contour_count
                }
            )  # fmt: skip
            why_not = [w for w in map(placeable, frames) if w] if placeable else []
            if frames and len(why_not) == len(frames):
                elsewhere.append((key, label, path))
                why_elsewhere.append(f"{label}: {'; '.join(why_not)}")
            else:
                usable.append((key, label, path))
    if usable:
        passed.extend(why_elsewhere)
    else:  # none can be placed: choose among them; reading the one chosen says why it fails
        usable = elsewhere
    if not usable:
        raise ConversionError(
            f"RT structure set: expected one with a contoured ROI matching {roi_pattern!r}, not "
            f"rejected, found {len(paths)} without: " + "; ".join(passed)
        )
    best = max(range(len(usable)), key=lambda n: usable[n][0])  # the first of equals
    key, label, path = usable[best]

    def why(other: tuple[int, str, str]) -> str:
        if other[0] < key[0]:
            return "not approved"
        return "the same date and time, given later" if other == key else "not the latest"

    others = [
        f"{o_label}: {why(o_key)}" for n, (o_key, o_label, _) in enumerate(usable) if n != best
    ]
    if not others and not passed:
        return StructureSetChoice(path, "")
    return StructureSetChoice(
        path, f"RT structure set: {label} is used; not used: " + "; ".join(others + passed)
    )


def list_rois(source: Source) -> list[RoiInfo]:
    """The ROIs of a structure set, in the order of StructureSetROISequence."""
    ds, name = _read(source)
    return list(_rois(ds, name).values())


def roi_contours(ds: Dataset, name: str, roi_number: int) -> list[Contour]:
    """The contours of ROI ``roi_number`` in a structure set dataset (``name`` for messages)."""
    for item in get_items(ds, "ROIContourSequence", name):
        if get_int(item, "ReferencedROINumber", name) != roi_number:
            continue
        contours = []
        for n, c in enumerate(get_items(item, "ContourSequence", name)):
            where = f"{name} ROI {roi_number} contour {n + 1}"
            data = get_ds_array(c, "ContourData", where)
            if data is None or len(data) % 3 or len(data) == 0:
                raise ConversionError(
                    f"{where}: ContourData must hold x, y, z triplets, found "
                    f"{0 if data is None else len(data)} values"
                )
            declared = get_int(c, "NumberOfContourPoints", where)
            if declared is not None and declared != len(data) // 3:
                log.warning(
                    "%s: NumberOfContourPoints is %d but ContourData has %d points; using the data",
                    where,
                    declared,
                    len(data) // 3,
                )
            contours.append(
                Contour(
                    geometric_type=(get_str(c, "ContourGeometricType", where, "") or "").upper(),
                    points=data.reshape(-1, 3),
                )
            )
        return contours
    return []


def select_roi(rois: Sequence[RoiInfo], pattern: str, *, combine: bool = False) -> list[RoiInfo]:
    """ROIs whose name matches ``pattern`` (``re.search``), or ConversionError.

    Of several matches, the one the planning system typed as the GTV (RTROIInterpretedType GTV)
    is used when it is the only one so typed (a "GTV" beside its "GTV+2cm" expansion typed CTV
    or CONTROL); otherwise several matches are an error unless ``combine`` is true: their union
    is then used, of those typed GTV when some are (a multifocal tumour's GTV_1 and GTV_2 beside
    an expansion of them), of all of them otherwise.
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConversionError(f"invalid ROI name pattern {pattern!r}: {exc}") from exc
    available = ", ".join(repr(r.name) for r in rois) or "none"
    matches = [r for r in rois if regex.search(r.name)]
    if not matches:
        raise ConversionError(
            f"no ROI name matches the pattern {pattern!r}; ROIs available: {available}"
        )
    typed = [r for r in matches if r.interpreted_type == "GTV"]
    if len(matches) > 1 and combine:
        chosen = typed or matches
        log.info(
            "ROI name pattern %r matches %s; the union of %s is the tumour", pattern,
            ", ".join(repr(r.name) for r in matches), ", ".join(repr(r.name) for r in chosen),
        )  # fmt: skip
        return chosen
    if len(matches) > 1 and len(typed) == 1:
        log.info(
            "ROI name pattern %r matches %s; %r, the only one typed GTV, is used",
            pattern, ", ".join(repr(r.name) for r in matches), typed[0].name,
        )  # fmt: skip
        return typed
    if len(matches) > 1:
        names = ", ".join(
            f"{r.name!r}" + (f" ({r.interpreted_type})" if r.interpreted_type else "")
            for r in matches
        )
        raise ConversionError(
            f"the ROI name pattern {pattern!r} is ambiguous: it matches {names}; expected "
            f"exactly one ROI, or one of them typed GTV (ROIs available: {available}); for a "
            "multifocal tumour whose GTVs are all to be read, set roles.roi_union: true"
        )
    return matches


def _inside_polygon(points: npt.NDArray[np.float64], polygon: npt.NDArray[np.float64]) -> Any:
    """Which of ``points`` (m, 2) lie inside ``polygon`` (n, 2), by the even-odd rule."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    spans = (y0 <= y) != (y1 <= y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (np.count_nonzero(spans & (x < at), axis=1) % 2).astype(bool)


def _layers(
    polygons: Sequence[tuple[int, npt.NDArray[np.float64]]], nk: int
) -> list[tuple[int, list[tuple[int, npt.NDArray[np.float64]]]]]:
    """The polygons of each slice as layers to combine in order: ``(depth, polygons)``, at
    most one polygon of a slice per layer. A polygon's depth is the number of the slice's other
    polygons it lies inside (all its vertices): 0 for an outline, 1 for a hole in it, 2 for an
    island in the hole... Exact copies of a polygon (an export that writes a contour twice)
    count once."""
    by_slice: dict[int, list[npt.NDArray[np.float64]]] = {}
    seen: set[tuple[int, bytes]] = set()
    for k, xy in polygons:
        xy = np.asarray(xy, dtype=float)
        if not 0 <= k < nk or len(xy) < 3:
            continue
        key = (k, np.round(xy, 4)[np.lexsort(np.round(xy, 4).T[::-1])].tobytes())
        if key in seen:
            continue
        seen.add(key)
        by_slice.setdefault(k, []).append(xy)
    layers: dict[tuple[int, int], list[tuple[int, npt.NDArray[np.float64]]]] = {}
    for k, group in by_slice.items():
        depths = [
            sum(bool(_inside_polygon(p, q).all()) for q in group if q is not p) for p in group
        ]
        ordinal: dict[int, int] = {}
        for polygon, depth in zip(group, depths, strict=True):
            n = ordinal[depth] = ordinal.get(depth, -1) + 1
            layers.setdefault((depth, n), []).append((k, polygon))
    return [(depth, layers[(depth, n)]) for depth, n in sorted(layers)]


def rasterise_polygons(
    polygons: Sequence[tuple[int, npt.NDArray[np.float64]]], shape: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """Fill polygons on a [k, j, i] grid, sampling at voxel centres.

    ``polygons`` are ``(k, xy)`` pairs: ``k`` the slice index, ``xy`` an (n, 2) array of
    continuous (i, j) voxel coordinates (column, row) of the closed polygon's vertices. On one
    slice a polygon inside another is a hole in it (and one inside the hole an island);
    polygons side by side, or overlapping without one holding the other, are united; a polygon
    given twice counts once (:func:`_layers`). Each polygon is filled by the even-odd rule
    (:func:`_even_odd`), so one that crosses itself (a keyhole) keeps its own holes.
    """
    nk = shape[0]
    mask = np.zeros(shape, dtype=bool)
    for depth, layer in _layers(polygons, nk):
        filled = _even_odd(layer, shape)
        if depth % 2 == 0:
            mask |= filled
        else:
            mask &= ~filled
    return mask


def _even_odd(
    polygons: Sequence[tuple[int, npt.NDArray[np.float64]]], shape: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """Fill polygons on a [k, j, i] grid with the even-odd rule, sampling at voxel centres,
    all the polygons of one slice combined with XOR. A voxel centre ``(i, j)`` is inside when a
    ray from ``i = -inf`` along its row crosses the polygon edges an odd number of times; edges
    are taken half-open in ``j`` so a vertex is counted once.
    """
    nk, nj, ni = shape
    mask = np.zeros(shape, dtype=bool)
    if not polygons:
        return mask
    slices = sorted({k for k, _ in polygons if 0 <= k < nk})
    if not slices:
        return mask
    slot = {k: s for s, k in enumerate(slices)}
    x0s, y0s, x1s, y1s, ks = [], [], [], [], []
    for k, xy in polygons:
        if k not in slot or len(xy) < 3:
            continue
        xy = np.asarray(xy, dtype=float)
        nxt = np.roll(xy, -1, axis=0)
        x0s.append(xy[:, 0])
        y0s.append(xy[:, 1])
        x1s.append(nxt[:, 0])
        y1s.append(nxt[:, 1])
        ks.append(np.full(len(xy), slot[k], dtype=np.int64))
    if not ks:
        return mask
    x0, y0 = np.concatenate(x0s), np.concatenate(y0s)
    x1, y1 = np.concatenate(x1s), np.concatenate(y1s)
    kk = np.concatenate(ks)
    # work inside the bounding box of the polygons (clipped to the grid)
    xmin, xmax = float(min(x0.min(), x1.min())), float(max(x0.max(), x1.max()))
    ymin, ymax = float(min(y0.min(), y1.min())), float(max(y0.max(), y1.max()))
    i0, i1 = int(np.clip(np.ceil(xmin), 0, ni)), int(np.clip(np.floor(xmax) + 1, 0, ni))
    j0, j1 = int(np.clip(np.ceil(ymin), 0, nj)), int(np.clip(np.floor(ymax) + 1, 0, nj))
    bw, bh = i1 - i0, j1 - j0
    if bw <= 0 or bh <= 0:
        return mask
    keep = y0 != y1  # horizontal edges never cross a row ray
    x0, y0, x1, y1, kk = x0[keep] - i0, y0[keep] - j0, x1[keep] - i0, y1[keep] - j0, kk[keep]
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows j with ylo <= j < yhi, clipped to the box
    jlo = np.clip(np.ceil(ylo), 0, bh).astype(np.int64)
    jhi = np.clip(np.ceil(yhi), 0, bh).astype(np.int64)  # exclusive
    counts = np.maximum(jhi - jlo, 0)
    total = int(counts.sum())
    if total == 0:
        return mask
    edge = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    j = jlo[edge] + (np.arange(total) - starts[edge])
    t = (j - y0[edge]) / (y1[edge] - y0[edge])
    x = x0[edge] + t * (x1[edge] - x0[edge])
    # a crossing at x toggles every voxel centre i >= x
    col = np.clip(np.ceil(x), 0, bw).astype(np.int64)
    flat = (kk[edge] * bh + j) * (bw + 1) + col
    toggles = np.bincount(flat, minlength=len(slices) * bh * (bw + 1)).astype(np.uint8)
    toggles = toggles.reshape(len(slices), bh, bw + 1)[:, :, :bw]
    # parity of the crossings left of each centre (uint8 wrap-around keeps the parity)
    inside = (np.cumsum(toggles, axis=2, dtype=np.uint8) & 1).astype(bool)
    mask[slices, j0:j1, i0:i1] = inside
    return mask


class OutsideImage(ConversionError):
    """An ROI that the image does not hold whole."""


#: the share of an ROI's voxels (drawn on planes of its own) that may fall outside the image's
#: grid: its edge, rounding
OUTSIDE_SHARE = 0.01


def _check_inside(drawn: Volume, reference: Volume, label: str) -> None:
    """Refuse an ROI rasterised on its own grid (``drawn``, placed on ``reference``'s frame)
    when more than :data:`OUTSIDE_SHARE` of its voxels lie outside ``reference``'s grid."""
    k, j, i = np.nonzero(np.asarray(drawn.array, dtype=bool))
    if len(k) == 0:
        return
    world = drawn.affine @ np.stack([i, j, k, np.ones(len(k))]).astype(np.float64)
    ijk = (world_to_index(reference) @ world)[:3]
    size = np.array(reference.shape[::-1], dtype=float)[:, None]
    out = np.any((ijk < -0.5) | (ijk > size - 0.5), axis=0)
    if np.count_nonzero(out) > OUTSIDE_SHARE * len(k):
        raise OutsideImage(
            f"{label}: {np.count_nonzero(out) / len(k):.0%} of it lies outside the image "
            f"({reference.shape[0]} slices of {reference.shape[1]} x {reference.shape[2]}); "
            "expected an image holding the whole ROI (a series cut short, a slab, or a small "
            "field of view?), else a part of it would be taken for the whole"
        )


def contours_to_polygons(
    contours: Sequence[npt.NDArray[np.float64]],
    reference: Volume,
    *,
    coplanar_tolerance: float = 0.1,
    label: str = "ROI",
) -> list[tuple[int, npt.NDArray[np.float64]]]:
    """Map closed contours (LPS mm) to ``(k, ij)`` polygons on ``reference``'s grid.

    ``coplanar_tolerance`` is the largest tolerated distance, in slices, between a contour point
    and the nearest image slice. A contour oblique to the slices or lying between two slices is
    an error; so are contours outside the slab of the image (more than half a slice beyond its
    first or last slice): an image that does not hold the whole ROI (a series cut short, a
    slab) would give a part of the tumour as the whole.
    """
    to_index = world_to_index(reference)
    nk = reference.shape[0]
    polygons: list[tuple[int, npt.NDArray[np.float64]]] = []
    outside: list[float] = []  # the positions of the contours outside, along the slice normal
    for n, pts in enumerate(contours):
        homogeneous = np.c_[pts, np.ones(len(pts))]
        ijk = (to_index @ homogeneous.T).T[:, :3]
        kmin, kmax = float(ijk[:, 2].min()), float(ijk[:, 2].max())
        if kmax - kmin > 2 * coplanar_tolerance:
            raise ConversionError(
                f"{label} contour {n + 1} is not coplanar with the image slices: its points span "
                f"slice positions k = {kmin:.3f} to {kmax:.3f} (slice spacing "
                f"{reference.spacing[2]:.3f} mm); expected every point on one slice "
                "(structure set drawn on another series or an oblique reconstruction?)"
            )
        kmean = float(ijk[:, 2].mean())
        k = round(kmean)
        if abs(kmean - k) > coplanar_tolerance:
            raise ConversionError(
                f"{label} contour {n + 1} lies between image slices at k = {kmean:.3f} "
                f"({abs(kmean - k) * reference.spacing[2]:.3f} mm from slice {k}); expected "
                "contours on the image slices (structure set drawn on another series?)"
            )
        if not 0 <= k < nk:
            outside.append(float(np.asarray(reference.direction)[:, 2] @ pts.mean(axis=0)))
            continue
        polygons.append((k, ijk[:, :2]))
    if outside:
        normal = np.asarray(reference.direction, dtype=float)[:, 2]
        ends = [float(normal @ (reference.affine @ [0.0, 0.0, k, 1.0])[:3]) for k in (0, nk - 1)]
        raise OutsideImage(
            f"{label}: {len(outside)} of its {len(contours)} contours lie outside the image's "
            f"slab ({nk} slices, {min(ends):.1f} to {max(ends):.1f} mm along the slice normal), "
            f"at {min(outside):.1f} to {max(outside):.1f} mm; expected an image holding the whole "
            "ROI (a series cut short, or a slab?), else a part of it would be taken for the whole"
        )
    return polygons


def contour_grid(
    contours: Sequence[npt.NDArray[np.float64]], frame_uid: str, pixel_mm: float, label: str
) -> Volume:
    """An empty grid, in the contours' own frame, whose slices are the contours' planes: the
    planes must be parallel and on a regular lattice (the slices of the series they were drawn
    on, e.g. the planning CT, which the node need not have). In-plane pixels of ``pixel_mm``,
    one empty slice beyond each end, so the ROI ends halfway between slices as on its series."""
    normals = []
    for pts in contours:
        centred = pts - pts.mean(axis=0)
        if len(pts) >= 3:
            normals.append(np.linalg.svd(centred, full_matrices=False)[2][2])
    if not normals:
        raise ConversionError(f"{label}: expected closed contours of 3 or more points, found none")
    n = normals[0] if normals[0][np.argmax(np.abs(normals[0]))] > 0 else -normals[0]
    tilted = [i + 1 for i, m in enumerate(normals) if abs(float(n @ m)) < 0.9999]
    if tilted:
        raise ConversionError(
            f"{label}: expected contours in parallel planes (the slices of one series), found "
            f"contour(s) {tilted[:5]} tilted against contour 1"
        )
    # the common normal of all the contours (each about its own centre), finer than one's
    centred = np.concatenate([pts - pts.mean(axis=0) for pts in contours if len(pts) >= 3])
    common = np.linalg.svd(centred, full_matrices=False)[2][2]
    n = common if float(common @ n) > 0 else -common
    positions = np.array([float(n @ pts.mean(axis=0)) for pts in contours])
    levels = np.unique(np.round(positions, 2))
    steps = np.diff(levels)
    step = float(steps[steps > 0.05].min()) if np.any(steps > 0.05) else pixel_mm * 2
    lattice = (positions - levels[0]) / step
    off = np.abs(lattice - np.round(lattice))
    if np.max(off) > 0.1:
        bad = sorted({round(float(p), 2) for p, o in zip(positions, off, strict=True) if o > 0.1})
        raise ConversionError(
            f"{label}: expected contour planes on a regular lattice ({step:.2f} mm apart, the "
            f"slices they were drawn on), found planes at {bad[:5]} mm off it"
        )
    index = np.round(lattice)
    if np.ptp(index) > 0:  # the first plane and the step fitted to every plane, not rounded
        step, first = (float(c) for c in np.polyfit(index, positions, 1))
        levels = np.array([first])  # index 0 is the first plane's
        lattice = (positions - levels[0]) / step
    u, v = plane_axes(n)
    points = np.concatenate(list(contours))
    lo = np.array([(points @ u).min(), (points @ v).min()]) - 2 * pixel_mm
    hi = np.array([(points @ u).max(), (points @ v).max()]) + 2 * pixel_mm
    ni, nj = (np.ceil((hi - lo) / pixel_mm) + 1).astype(int)
    nk = round(float(np.max(lattice))) + 3
    origin = lo[0] * u + lo[1] * v + (levels[0] - step) * n
    if ni * nj * nk > 64_000_000:
        raise ConversionError(
            f"{label}: the contours span {ni} x {nj} x {nk} voxels of {pixel_mm:.2f} mm; "
            "expected a tumour outline (at most 64 million voxels)"
        )
    return Volume(
        array=np.zeros((nk, nj, ni), dtype=bool),
        spacing=(pixel_mm, pixel_mm, step),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=np.stack([u, v, n], axis=1),
        frame_of_reference_uid=frame_uid,
    )


def _index_box(source: Volume, reference: Volume) -> tuple[int, int, int, int, int, int] | None:
    """The voxels of ``reference`` that ``source``'s grid can reach (k0, k1, j0, j1, i0, i1),
    one voxel of margin; None when it is outside."""
    corners = np.c_[grid_corners(source), np.ones(8)]
    ijk = (world_to_index(reference) @ corners.T)[:3]
    lo = np.floor(ijk.min(axis=1)).astype(int) - 1
    hi = np.ceil(ijk.max(axis=1)).astype(int) + 2
    shape = np.array(reference.shape[::-1])
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        return None
    return int(lo[2]), int(hi[2]), int(lo[1]), int(hi[1]), int(lo[0]), int(hi[0])


def _sub_grid(
    reference: Volume, start: tuple[int, int, int], shape: tuple[int, int, int]
) -> Volume:
    """The part of ``reference``'s grid from voxel ``start`` (k, j, i) of ``shape``."""
    k, j, i = start
    origin = (reference.affine @ np.array([i, j, k, 1.0]))[:3]
    return Volume(
        array=np.zeros(shape, dtype=bool),
        spacing=reference.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=reference.direction,
        frame_of_reference_uid=reference.frame_of_reference_uid,
    )


def load_rtstruct_mask(
    source: Source,
    reference: Volume,
    roi_pattern: str = DEFAULT_ROI_PATTERN,
    *,
    combine: bool = False,
    coplanar_tolerance: float = 0.1,
    registrations: Sequence[FrameRegistration] = (),
) -> Volume:
    """Mask (bool) of the ROI whose name matches ``roi_pattern`` on ``reference``'s grid (see
    :func:`load_placed_rtstruct_mask`)."""
    mask, _ = load_placed_rtstruct_mask(
        source, reference, roi_pattern, combine=combine,
        coplanar_tolerance=coplanar_tolerance, registrations=registrations,
    )  # fmt: skip
    return mask


def _on_own_planes(
    closed: Sequence[npt.NDArray[np.float64]],
    frame_uid: str,
    reference: Volume,
    label: str,
    off_slices: ConversionError,
) -> tuple[Volume, int]:
    """The contours of an ROI on the image's frame that are not on its slices, rasterised on
    their own planes (:func:`contour_grid`): those of another series of the frame, such as a GTV
    drawn on the axial FLAIR beside a sagittal 3D T1-Gd. Contours on fewer than two planes
    (a 2D outline), or not in parallel planes on a regular lattice, are refused with
    ``off_slices``, the error of the image's own slices."""
    try:
        grid = contour_grid(closed, frame_uid, min(reference.spacing) / 2, label)
        polygons = contours_to_polygons(closed, grid, label=label)
    except ConversionError as exc:
        raise ConversionError(f"{off_slices}; nor on planes of their own: {exc}") from None
    planes = {k for k, _ in polygons}
    if len(planes) < 2:
        raise ConversionError(f"{off_slices}; nor on two planes or more of their own") from None
    drawn = grid.with_array(rasterise_polygons(polygons, grid.shape))
    _check_inside(drawn, reference, label)
    return drawn, len(polygons)


def _set_frame(ds: Dataset, name: str) -> str | None:
    """The frame of reference of a structure set whose ROI does not name its own (type 1, left
    out by some exports): the one its Referenced Frame of Reference Sequence lists when it lists
    one, else a top-level FrameOfReferenceUID (not part of the IOD, but some writers add it)."""
    listed = {
        get_str(item, "FrameOfReferenceUID", name)
        for item in get_items(ds, "ReferencedFrameOfReferenceSequence", name)
    } - {None, ""}
    if len(listed) == 1:
        return next(iter(listed))
    return get_str(ds, "FrameOfReferenceUID", name)


def load_placed_rtstruct_mask(
    source: Source,
    reference: Volume,
    roi_pattern: str = DEFAULT_ROI_PATTERN,
    *,
    combine: bool = False,
    coplanar_tolerance: float = 0.1,
    registrations: Sequence[FrameRegistration] = (),
) -> tuple[Volume, FrameMapping | None]:
    """Mask (bool) of the ROI whose name matches ``roi_pattern`` on ``reference``'s grid, and
    the frame it was drawn on when that is another one (one frame; its mapping from the
    reference's frame), else None.

    An ROI on the reference volume's frame of reference is rasterised on its grid when its
    contours lie on its slices, else on its own contour planes (another series of that frame,
    see :func:`_on_own_planes`) and resampled like an ROI of another frame. An ROI on another
    frame (the planning CT's) needs one of
    ``registrations`` to relate the two frames: it is rasterised on its own slices
    (:func:`contour_grid`), that grid is placed on the reference frame by the registration's
    matrix and resampled (a voxel is in when at least half of it is). Otherwise a
    :class:`ConversionError` names both UIDs. Contours other than CLOSED_PLANAR (points, open
    polylines) are ignored with a warning. See :func:`rasterise_polygons` for the rule.
    """
    ds, name = _read(source)
    rois = _rois(ds, name)
    chosen = select_roi(list(rois.values()), roi_pattern, combine=combine)
    mr_for = reference.frame_of_reference_uid
    per_roi: list[list[tuple[int, npt.NDArray[np.float64]]]] = []
    # ROIs rasterised on their own contour planes (another frame's, or another series' of the
    # image's frame), placed on mr_for
    foreign: list[Volume] = []
    foreign_contours = 0
    drawn_on: dict[str, npt.NDArray[np.float64]] = {}  # their frames: frame -> mr_for
    lattices: dict[str, list[PlaneLattice | None]] = {}  # the planes of each ROI on each frame
    for roi in chosen:
        roi_for = roi.frame_of_reference_uid or _set_frame(ds, name)
        if not mr_for or not roi_for or (roi_for != mr_for and not registrations):
            raise ConversionError(
                f"{name}: ROI {roi.name!r} is on frame of reference {roi_for or '<none>'} but the "
                f"image is on {mr_for or '<none>'}; expected the same frame of reference or a "
                "Spatial Registration relating the two (structure set drawn on the planning CT: "
                "send the registration the planning system made with the study)"
            )
        contours = roi_contours(ds, name, roi.number)
        closed = [c.points for c in contours if c.geometric_type == "CLOSED_PLANAR"]
        others = len(contours) - len(closed)
        if others:
            log.warning(
                "%s: ROI %r has %d non-closed contour(s) (POINT / OPEN_*) that were ignored",
                name,
                roi.name,
                others,
            )
        if not closed:
            raise ConversionError(
                f"{name}: ROI {roi.name!r} has no CLOSED_PLANAR contour; expected a delineated "
                f"volume, found {len(contours)} contour(s) of other types"
            )
        label = f"{name}: ROI {roi.name!r}"
        if roi_for != mr_for:
            matrix, reg = frame_transform(registrations, roi_for, mr_for, label)
            grid = contour_grid(closed, roi_for, min(reference.spacing) / 2, label)
            polygons = contours_to_polygons(closed, grid, label=label)
            drawn = moved(grid.with_array(rasterise_polygons(polygons, grid.shape)), matrix, mr_for)
            _check_inside(drawn, reference, label)
            foreign.append(drawn)
            foreign_contours += len(polygons)
            drawn_on[roi_for] = matrix
            on_planes = len({k for k, _ in polygons}) >= 2  # one plane: its step is not known
            lattices.setdefault(roi_for, []).append(_lattice(grid) if on_planes else None)
            log.info(
                "%s: on frame %s, placed on the T1-Gd's by Spatial Registration %s (rotation "
                "%.1f degrees, shift %.1f mm at the ROI)", label, roi_for,
                reg.sop_instance_uid if reg else "", rotation_deg(matrix),
                float(np.linalg.norm((matrix @ [*grid_centre(grid), 1.0])[:3] - grid_centre(grid))),
            )  # fmt: skip
            continue
        try:
            on_slices = contours_to_polygons(
                closed, reference, coplanar_tolerance=coplanar_tolerance, label=label
            )
        except OutsideImage:
            raise
        except ConversionError as off_slices:
            drawn, count = _on_own_planes(closed, roi_for, reference, label, off_slices)
            foreign.append(drawn)
            foreign_contours += count
            log.info(
                "%s: %d contour(s) on planes that are not the image's slices (drawn on another "
                "series of its frame of reference): rasterised on their own planes, resampled",
                label, count,
            )  # fmt: skip
            continue
        ks = np.unique([k for k, _ in on_slices])
        gap = int(np.diff(ks).min()) if len(ks) >= 2 else 1
        if gap >= 2:  # drawn on a series of thicker slices: filled between its planes
            try:
                drawn, count = _on_own_planes(
                    closed, roi_for, reference, label, ConversionError(f"{label}: coarse")
                )
            except ConversionError as exc:
                log.warning(
                    "%s: contours on image slices %d apart at the closest, not filled between "
                    "them (%s)", label, gap, exc,
                )  # fmt: skip
                per_roi.append(on_slices)
                continue
            foreign.append(drawn)
            foreign_contours += count
            log.info(
                "%s: contours on image slices %d apart at the closest (drawn on a series of "
                "thicker slices): rasterised on their own planes, resampled", label, gap,
            )  # fmt: skip
            continue
        per_roi.append(on_slices)
    polygons = [p for roi_polygons in per_roi for p in roi_polygons]
    if not polygons and not foreign:
        names = ", ".join(repr(r.name) for r in chosen)
        raise ConversionError(
            f"{name}: ROI {names} has no contour inside the image slab of the reference series "
            f"({reference.shape[0]} slices); expected the structure set of this series"
        )
    # several ROIs are united, each rasterised on its own so they do not cut holes in each other
    mask = np.zeros(reference.shape, dtype=bool)
    for roi_polygons in per_roi:
        mask |= rasterise_polygons(roi_polygons, reference.shape)
    for drawn in foreign:  # a voxel is in when at least half of it is, by trilinear weights
        box = _index_box(drawn, reference)
        if box is not None:
            k0, k1, j0, j1, i0, i1 = box
            part = _sub_grid(reference, (k0, j0, i0), (k1 - k0, j1 - j0, i1 - i0))
            mask[k0:k1, j0:j1, i0:i1] |= resample(drawn, part, order=1, output_dtype=np.bool_)
    if not mask.any():
        raise ConversionError(
            f"{name}: ROI {', '.join(repr(r.name) for r in chosen)} covers no voxel centre of the "
            f"image grid ({len(polygons) + foreign_contours} contour(s) smaller than a voxel or "
            "outside the field of view); expected a delineated volume"
        )
    log.info(
        "rasterised ROI %s: %d contour(s), %d voxel(s)",
        ", ".join(r.name for r in chosen),
        len(polygons) + foreign_contours,
        int(mask.sum()),
    )
    placed = None
    if len(drawn_on) == 1:
        ((frame, matrix),) = drawn_on.items()
        placed = FrameMapping(
            frame,
            np.asarray(np.linalg.inv(matrix), dtype=np.float64),
            planes=_common_lattice(lattices[frame], name),
        )
    return reference.with_array(mask), placed


def _lattice(grid: Volume) -> PlaneLattice:
    """The planes of the slices of a grid made by :func:`contour_grid`."""
    normal = np.asarray(grid.direction, dtype=float)[:, 2]
    step = float(grid.spacing[2])
    return PlaneLattice(
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        position=float(normal @ np.asarray(grid.origin, dtype=float)) + step,  # its 1st contour
        step=step,
    )


def _common_lattice(lattices: Sequence[PlaneLattice | None], name: str) -> PlaneLattice | None:
    """The planes of the ROIs of one frame (several with ``combine``): the finest lattice when
    the others' planes lie on it (a GTV drawn on every other CT slice beside one drawn on each),
    else None (then unknown), with a warning."""
    known = [lat for lat in lattices if lat is not None]
    if not known or len(known) < len(lattices):
        return None
    finest = min(known, key=lambda lat: lat.step)
    n = np.asarray(finest.normal)
    for other in known:
        cos = float(n @ np.asarray(other.normal))
        ratio = other.step / finest.step
        shift = (np.sign(cos) * other.position - finest.position) / finest.step
        if (
            abs(cos) < 0.9999
            or abs(ratio - round(ratio)) * finest.step > 0.01
            or abs(shift - round(shift)) * finest.step > 0.01
        ):
            log.warning(
                "%s: the ROIs' contours are on different planes (%.2f and %.2f mm apart); the "
                "predicted tumour on their frame is not contoured on them", name, finest.step,
                other.step,
            )  # fmt: skip
            return None
    return finest
