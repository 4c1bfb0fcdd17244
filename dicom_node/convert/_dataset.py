"""Defensive access to pydicom datasets.

pydicom parses element values lazily, so a malformed value can raise almost anything at the
moment it is read. These helpers are the boundary: they return plain Python values or raise
:class:`ConversionError` naming the file, the attribute, what was expected and what was found.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from dicom_node.errors import ConversionError

log = logging.getLogger(__name__)

#: values larger than this are read from the file only when used (keeps header parsing fast)
DEFER_SIZE = 64 * 1024

Source = str | os.PathLike[str] | Dataset | BinaryIO
"""What the converters accept: a file path, an already read dataset, or a binary file object."""


def source_name(source: Source, index: int) -> str:
    if isinstance(source, str | os.PathLike):
        return Path(source).name
    if isinstance(source, Dataset):
        fn = getattr(source, "filename", None)
        return Path(fn).name if isinstance(fn, str) and fn else f"<dataset #{index}>"
    return f"<stream #{index}>"


def read_image_dataset(source: Source, name: str) -> Dataset:
    """Read an image instance, with the lean header reader when the file allows it.

    The lean reader (:mod:`dicom_node.convert._fastread`) keeps only the attributes the series
    converter uses; for anything it does not handle the file is read by pydicom.
    """
    from dicom_node.convert._fastread import read_classic_header

    if isinstance(source, Dataset):
        return source
    try:
        if isinstance(source, str | os.PathLike):
            data = Path(source).read_bytes()
        else:
            source.seek(0)
            data = source.read()
    except FileNotFoundError as exc:
        raise ConversionError(f"{name}: file not found ({exc})") from exc
    except (OSError, ValueError, AttributeError) as exc:
        raise ConversionError(f"{name}: cannot be read ({exc})") from exc
    if not isinstance(data, bytes | bytearray):
        raise ConversionError(f"{name}: expected bytes, read {type(data).__name__}")
    ds = read_classic_header(bytes(data))
    if ds is not None:
        return ds
    return read_dataset(io.BytesIO(data), name)


def read_dataset(source: Source, name: str, *, stop_before_pixels: bool = False) -> Dataset:
    """Read one DICOM Part 10 file (or return the dataset given), else ConversionError."""
    if isinstance(source, Dataset):
        return source
    try:
        fp: Any = os.fspath(source) if isinstance(source, str | os.PathLike) else source
        if isinstance(fp, io.IOBase):
            fp.seek(0)
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, defer_size=DEFER_SIZE)
    except FileNotFoundError as exc:
        raise ConversionError(f"{name}: file not found ({exc})") from exc
    except pydicom.errors.InvalidDicomError as exc:
        raise ConversionError(f"{name}: not a DICOM Part 10 file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise ConversionError(
            f"{name}: unreadable DICOM file ({type(exc).__name__}: {exc})"
        ) from exc


@functools.cache
def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"unknown DICOM keyword {keyword}")
    return BaseTag(tag)


def get_value(ds: Dataset, keyword: str, name: str) -> Any:
    """Value of ``keyword`` or None when absent/empty; ConversionError when it cannot be parsed."""
    tag = _tag(keyword)
    try:
        if tag not in ds:
            return None
        value = ds[tag].value
    except Exception as exc:
        raise ConversionError(
            f"{name}: {keyword} cannot be parsed ({type(exc).__name__}: {exc})"
        ) from exc
    if value is None or value == "" or (isinstance(value, Sequence) and len(value) == 0):
        return None
    return value


def get_str(ds: Dataset, keyword: str, name: str, default: str | None = None) -> str | None:
    value = get_value(ds, keyword, name)
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\0 ")
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def get_required_str(ds: Dataset, keyword: str, name: str) -> str:
    value = get_str(ds, keyword, name)
    if not value:
        raise ConversionError(f"{name}: {keyword} is required but missing or empty")
    return value


def _to_float(v: Any, keyword: str, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConversionError(f"{name}: {keyword} must be numeric, found {v!r}") from exc
    if not math.isfinite(f):
        raise ConversionError(f"{name}: {keyword} must be finite, found {v!r}")
    return f


def get_float(ds: Dataset, keyword: str, name: str, default: float | None = None) -> float | None:
    value = get_value(ds, keyword, name)
    if value is None:
        return default
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != 1:
            raise ConversionError(f"{name}: {keyword} must be one number, found {list(value)!r}")
        value = value[0]
    return _to_float(value, keyword, name)


def get_floats(ds: Dataset, keyword: str, name: str, count: int | None) -> list[float] | None:
    """A multi-valued numeric attribute with ``count`` values (any count if None)."""
    value = get_value(ds, keyword, name)
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        value = [value]
    floats = [_to_float(v, keyword, name) for v in value]
    if count is not None and len(floats) != count:
        raise ConversionError(
            f"{name}: {keyword} must have {count} values, found {len(floats)}: {floats!r}"
        )
    return floats


def get_int(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int | None:
    value = get_value(ds, keyword, name)
    if value is None:
        return default
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != 1:
            raise ConversionError(f"{name}: {keyword} must be one integer, found {value!r}")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConversionError(f"{name}: {keyword} must be an integer, found {value!r}") from exc


def get_items(ds: Dataset, keyword: str, name: str) -> list[Dataset]:
    """Items of a sequence attribute (empty list when absent)."""
    value = get_value(ds, keyword, name)
    if value is None:
        return []
    if not isinstance(value, Sequence) or not all(isinstance(it, Dataset) for it in value):
        raise ConversionError(f"{name}: {keyword} must be a sequence, found {type(value).__name__}")
    return list(value)


def first_item(ds: Dataset | None, keyword: str, name: str) -> Dataset | None:
    if ds is None:
        return None
    items = get_items(ds, keyword, name)
    return items[0] if items else None


def get_ds_array(ds: Dataset, keyword: str, name: str) -> npt.NDArray[np.float64] | None:
    """A long decimal-string attribute (ContourData...) as a float array, parsed by numpy.

    pydicom turns each value into a validated ``DSfloat`` object, which is slow for the tens of
    thousands of values of a structure set; this reads the raw bytes when they are still raw.
    """
    tag = _tag(keyword)
    try:
        elem = ds.get_item(tag) if tag in ds else None
    except Exception as exc:
        raise ConversionError(f"{name}: {keyword} cannot be read ({exc})") from exc
    if elem is None:
        return None
    raw = elem.value
    if isinstance(raw, bytes | bytearray):
        text = bytes(raw).decode("ascii", "replace").strip(" \0")
        if not text:
            return None
        try:
            values = np.array(text.split("\\"), dtype=np.float64)
        except ValueError as exc:
            raise ConversionError(f"{name}: {keyword} must hold numbers ({exc})") from exc
    else:
        floats = get_floats(ds, keyword, name, None)
        if floats is None:
            return None
        values = np.asarray(floats, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ConversionError(f"{name}: {keyword} holds non-finite values")
    return values
