"""One image series (classic one-file-per-slice or enhanced multi-frame) to a :class:`Volume`.

Public entry point: :func:`load_series`. The caller (the study assembler / role assignment) passes
the files of one series; this module checks that they form one regular 3D grid and returns the
voxels with RescaleSlope/RescaleIntercept applied, ordered along the true slice normal. Anything
else is refused with a :class:`~dicom_node.errors.ConversionError` that says what was expected and
what was found.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_node.convert._dataset import (
    Source,
    get_int,
    get_required_str,
    get_str,
    read_image_dataset,
    source_name,
)
from dicom_node.convert.enhanced import FrameInfo, classic_frame, enhanced_frames, number_of_frames
from dicom_node.convert.geometry import check_stack, orientation_axes, same_orientation
from dicom_node.errors import ConversionError, InputError
from dicom_node.types import Volume

log = logging.getLogger(__name__)

#: refuse instances whose decoded pixels would exceed this many bytes (guards against bad headers)
MAX_PIXEL_BYTES = 2 * 1024**3

_SPACING_TOLERANCE = 1e-3


def _describe_orientations(frames: Sequence[FrameInfo]) -> str:
    groups: list[tuple[tuple[float, ...], int]] = []
    for f in frames:
        for i, (iop, count) in enumerate(groups):
            if same_orientation(iop, f.orientation):
                groups[i] = (iop, count + 1)
                break
        else:
            groups.append((f.orientation, 1))
    return "; ".join(
        f"({', '.join(f'{v:.4f}' for v in iop)}) in {count} frame(s)" for iop, count in groups
    )


def _varying_descriptors(frames: Sequence[FrameInfo]) -> str:
    values: dict[str, set[str]] = defaultdict(set)
    for f in frames:
        for key, value in f.all_descriptors().items():
            values[key].add(value)
    varying = [
        f"{key} ({', '.join(sorted(v)[:6])}{', ...' if len(v) > 6 else ''})"
        for key, v in values.items()
        if len(v) > 1 and key != "InStackPositionNumber"
    ]
    if not varying:
        return ""
    return "; the frames differ in " + ", ".join(varying)


_NATIVE = {
    "1.2.840.10008.1.2": "<",  # implicit VR little endian
    "1.2.840.10008.1.2.1": "<",  # explicit VR little endian
    "1.2.840.10008.1.2.2": ">",  # explicit VR big endian (retired)
}


def _native_pixels(
    ds: Dataset, ts: object, rows: int, cols: int, n_frames: int, bits: int, name: str
) -> npt.NDArray[np.generic] | None:
    """Fast path for uncompressed integer PixelData: a view of the stored bytes (a copy when
    fewer bits are stored than allocated).

    Returns None (use pydicom's decoders) for anything but plain 8/16/32-bit integer pixels in
    a native transfer syntax. As pydicom's decoders do, only the BitsStored bits ending at
    HighBit are kept (scanners leave overlay or other bits above them) and a signed value is
    sign-extended from its top stored bit.
    """
    order = _NATIVE.get(str(ts)) if ts is not None else None
    if order is None or "PixelData" not in ds or bits not in (8, 16, 32):
        return None
    try:
        raw = ds["PixelData"].value
    except Exception as exc:
        raise ConversionError(f"{name}: PixelData cannot be read ({exc})") from exc
    if not isinstance(raw, bytes | bytearray):
        return None
    signed = get_int(ds, "PixelRepresentation", name, 0) == 1
    dtype = np.dtype(f"{order}{'i' if signed else 'u'}{bits // 8}")
    count = rows * cols * n_frames
    if len(raw) < count * dtype.itemsize:
        raise ConversionError(
            f"{name}: PixelData holds {len(raw)} bytes, expected {count * dtype.itemsize} for "
            f"{n_frames} frame(s) of {rows}x{cols} at {bits} bits"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    stored = get_int(ds, "BitsStored", name, bits) or bits
    high = get_int(ds, "HighBit", name)
    high = stored - 1 if high is None else high  # (type 1, but left out by some writers)
    if not 0 < stored <= bits or not stored - 1 <= high < bits:
        raise ConversionError(
            f"{name}: expected 0 < BitsStored <= BitsAllocated and BitsStored - 1 <= HighBit < "
            f"BitsAllocated, found BitsStored {stored}, HighBit {high}, BitsAllocated {bits}"
        )
    if stored < bits:
        work = np.int64 if bits == 32 else np.int32
        words: npt.NDArray[np.signedinteger[Any]] = arr.view(
            np.dtype(f"{order}u{bits // 8}")
        ).astype(work)
        value = (words >> (high + 1 - stored)) & ((1 << stored) - 1)
        if signed:  # two's complement in ``stored`` bits
            value[value >= 1 << (stored - 1)] -= 1 << stored
        arr = value.astype(dtype.newbyteorder("="))
    return arr if n_frames == 1 else arr.reshape((n_frames, rows, cols))


def decode_pixels(ds: Dataset, name: str, n_frames: int) -> npt.NDArray[np.generic]:
    """Decoded pixels of an instance as a (frames, rows, columns) array in native byte order."""
    rows = get_int(ds, "Rows", name)
    cols = get_int(ds, "Columns", name)
    bits = get_int(ds, "BitsAllocated", name)
    samples = get_int(ds, "SamplesPerPixel", name, 1)
    if not rows or not cols or rows < 1 or cols < 1:
        raise ConversionError(f"{name}: Rows and Columns must be positive, found {rows}x{cols}")
    if samples != 1:
        raise ConversionError(
            f"{name}: SamplesPerPixel must be 1 (greyscale), found {samples} "
            f"({get_str(ds, 'PhotometricInterpretation', name)})"
        )
    if bits not in (8, 16, 32, 64):
        raise ConversionError(f"{name}: BitsAllocated must be 8, 16, 32 or 64, found {bits}")
    nbytes = rows * cols * n_frames * bits // 8
    if nbytes > MAX_PIXEL_BYTES:
        raise ConversionError(
            f"{name}: {n_frames} frame(s) of {rows}x{cols} at {bits} bits would need "
            f"{nbytes / 1024**3:.1f} GiB; refusing more than {MAX_PIXEL_BYTES / 1024**3:.0f} GiB"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ConversionError(f"{name}: no pixel data; expected an image instance")
    try:
        ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in ds.file_meta else None
    except Exception:
        ts = None
    arr = _native_pixels(ds, ts, rows, cols, n_frames, bits, name)
    try:
        if arr is None:
            arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders (pydicom, pylibjpeg, openjpeg, pyjpegls) raise many types
        ts_name = getattr(ts, "name", str(ts))
        raise ConversionError(
            f"{name}: pixel data cannot be decoded (transfer syntax {ts_name}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    expected = (n_frames, rows, cols) if n_frames > 1 else (rows, cols)
    if arr.ndim == 1 and arr.size == rows * cols:
        arr = arr.reshape((rows, cols))
    if arr.shape != expected:
        raise ConversionError(
            f"{name}: decoded pixel array has shape {arr.shape}, expected {expected}"
        )
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr.reshape((n_frames, rows, cols))


def load_series(sources: Sequence[Source], *, min_slices: int = 1) -> Volume:
    """Convert the instances of one image series into a :class:`Volume`.

    ``sources`` are file paths, pydicom datasets or binary file objects, in any order: classic
    single-frame images (one slice each) or enhanced multi-frame instances. The frames are ordered
    along the slice normal (``row x col`` of ImageOrientationPatient); the returned volume's
    direction columns are (row, column, normal) and its array is indexed ``[k, j, i]``.

    Voxels carry RescaleSlope/RescaleIntercept (per frame for enhanced instances): when every
    frame has slope 1 and intercept 0 the stored integer type is kept, otherwise float32. A
    MONOCHROME1 series (lowest value shown white) is turned over within its range, so that a
    higher value is a brighter voxel in every volume.
    ``source_instance_uids`` has one SOP Instance UID per slice in k order (a multi-frame instance
    repeats its UID for each of its frames), and ``source_frame_numbers`` the frame of each.

    Raises :class:`ConversionError` when the files are unreadable, belong to several series or
    frames of reference, or do not form one regular grid (mixed orientations, duplicate positions,
    sheared / gantry-tilted stacks, non-uniform spacing or missing slices, fewer than
    ``min_slices`` slices).
    """
    if len(sources) == 0:
        raise ConversionError("no instances given; expected the files of one image series")
    datasets: list[Dataset] = []
    names: list[str] = []
    for index, src in enumerate(sources):
        name = source_name(src, index)
        datasets.append(read_image_dataset(src, name))
        names.append(name)

    series_uids: Counter[str] = Counter()
    frame_refs: Counter[str] = Counter()
    sop_classes: Counter[str] = Counter()
    frames: list[FrameInfo] = []
    frame_counts: list[int] = []
    seen_sops: dict[str, int] = {}
    shapes: Counter[tuple[int, int]] = Counter()
    photometric: Counter[str] = Counter()
    for index, (ds, name) in enumerate(zip(datasets, names, strict=True)):
        sop_uid = get_required_str(ds, "SOPInstanceUID", name)
        if sop_uid in seen_sops:
            raise ConversionError(
                f"{name}: SOP Instance UID {sop_uid} also in {names[seen_sops[sop_uid]]}; "
                "expected each instance once"
            )
        seen_sops[sop_uid] = index
        series_uids[get_required_str(ds, "SeriesInstanceUID", name)] += 1
        frame_refs[get_str(ds, "FrameOfReferenceUID", name, "") or ""] += 1
        sop_classes[get_str(ds, "SOPClassUID", name, "") or ""] += 1
        rows, cols = get_int(ds, "Rows", name), get_int(ds, "Columns", name)
        if rows is None or cols is None:
            raise ConversionError(f"{name}: Rows/Columns missing; expected an image instance")
        shapes[(rows, cols)] += 1
        photometric[(get_str(ds, "PhotometricInterpretation", name, "") or "").strip()] += 1
        n_frames = number_of_frames(ds, name)
        frame_counts.append(n_frames)
        has_groups = "PerFrameFunctionalGroupsSequence" in ds
        if n_frames > 1 or has_groups:
            frames.extend(enhanced_frames(ds, index, name, sop_uid, n_frames))
        else:
            frames.append(classic_frame(ds, index, name, sop_uid))

    if len(series_uids) > 1:
        listing = ", ".join(f"{uid} ({n} instance(s))" for uid, n in series_uids.most_common())
        raise ConversionError(
            f"instances of {len(series_uids)} series given; expected one series, found {listing}"
        )
    if len(frame_refs) > 1:
        listing = ", ".join(f"{uid or '<none>'} ({n})" for uid, n in frame_refs.most_common())
        raise ConversionError(
            f"mixed frames of reference in one series: expected one FrameOfReferenceUID, found "
            f"{listing}"
        )
    if len(sop_classes) > 1:
        listing = ", ".join(f"{uid or '<none>'} ({n})" for uid, n in sop_classes.most_common())
        raise ConversionError(f"mixed SOP classes in one series: {listing}")
    if len(photometric) > 1 or not set(photometric) <= {"MONOCHROME1", "MONOCHROME2", ""}:
        listing = ", ".join(f"{p or '<none>'} ({n})" for p, n in photometric.most_common())
        raise ConversionError(
            "expected one greyscale PhotometricInterpretation for the whole series (MONOCHROME2, "
            f"or MONOCHROME1), found {listing}"
        )
    if len(shapes) > 1:
        listing = ", ".join(f"{r}x{c} ({n})" for (r, c), n in shapes.most_common())
        raise ConversionError(
            f"mixed image sizes in one series: expected one Rows x Columns, found {listing}"
        )

    reference = frames[0]
    if not all(same_orientation(f.orientation, reference.orientation) for f in frames):
        raise ConversionError(
            "inconsistent orientation within the series: expected one ImageOrientationPatient, "
            f"found {_describe_orientations(frames)} (several stacks or a localizer mixed in?)"
        )
    orientation_axes(reference.orientation)  # validates unit / orthogonal vectors
    spacings = {f.pixel_spacing for f in frames}
    if any(
        abs(s[0] - reference.pixel_spacing[0]) > _SPACING_TOLERANCE
        or abs(s[1] - reference.pixel_spacing[1]) > _SPACING_TOLERANCE
        for s in spacings
    ):
        raise ConversionError(
            f"mixed pixel spacings in one series: expected one PixelSpacing, found "
            f"{sorted(spacings)}"
        )

    fallback = reference.spacing_between_slices or reference.slice_thickness
    try:
        geometry = check_stack(
            [f.position for f in frames], reference.orientation, fallback_spacing=fallback
        )
    except ConversionError as exc:
        raise ConversionError(f"{exc}{_varying_descriptors(frames)}") from exc
    if len(frames) < min_slices:
        raise ConversionError(
            f"series has {len(frames)} slice(s); expected at least {min_slices} for a volume"
        )

    # decode the pixels of each instance once, in the order of the slices
    rows, cols = next(iter(shapes))
    ordered = [frames[i] for i in geometry.order]
    identity = all(f.slope == 1.0 and f.intercept == 0.0 for f in ordered)
    decoded: dict[int, npt.NDArray[np.generic]] = {}
    out: npt.NDArray[np.generic] | None = None
    for k, frame in enumerate(ordered):
        if frame.source not in decoded:
            decoded[frame.source] = decode_pixels(
                datasets[frame.source], names[frame.source], frame_counts[frame.source]
            )
        pixels = decoded[frame.source][frame.frame or 0]
        if out is None:
            dtype = pixels.dtype if identity else np.dtype(np.float32)
            out = np.empty((len(ordered), rows, cols), dtype=dtype)
        if identity:
            if pixels.dtype != out.dtype:
                raise ConversionError(
                    f"{names[frame.source]}: pixel type {pixels.dtype} differs from the rest of "
                    f"the series ({out.dtype})"
                )
            out[k] = pixels
        else:
            out[k] = pixels.astype(np.float32) * np.float32(frame.slope) + np.float32(
                frame.intercept
            )
        if frame_counts[frame.source] == 1:
            decoded.pop(frame.source)  # a single-frame instance is used once: free it now
    assert out is not None
    if "MONOCHROME1" in photometric:
        # the lowest value is shown white: turned over within the series' range, so that a
        # higher value means a brighter voxel, as in every MONOCHROME2 series the model knows
        low, high = out.min(), out.max()
        out = (np.asarray(high, dtype=np.float64) + low - out).astype(out.dtype)
    row_spacing, col_spacing = reference.pixel_spacing
    volume = Volume(
        array=out,
        spacing=(float(col_spacing), float(row_spacing), float(geometry.slice_spacing)),
        origin=geometry.origin,
        direction=geometry.direction,
        frame_of_reference_uid=next(iter(frame_refs)) or None,
        source_instance_uids=tuple(f.sop_instance_uid for f in ordered),
        series_instance_uid=next(iter(series_uids)),
        source_frame_numbers=(
            tuple(0 if f.frame is None else f.frame + 1 for f in ordered)
            if any(f.frame is not None for f in ordered)
            else ()
        ),
        slice_thickness=reference.slice_thickness or None,
    )
    log.info(
        "converted series: %d slice(s) of %dx%d, spacing %s mm, %s",
        len(ordered),
        rows,
        cols,
        tuple(round(s, 4) for s in volume.spacing),
        out.dtype,
    )
    return volume


def refuse_blank(volume: Volume, name: str, where: object) -> None:
    """Refuse an image of one value throughout (a blank series: a failed export, a
    placeholder), which would be normalised to nothing and predicted from all the same."""
    a = np.asarray(volume.array)
    if a.size and a.min() == a.max():
        raise InputError(
            f"{where}: expected an image with contrast, found a blank {name} (every voxel "
            f"{a.flat[0]:g})"
        )
