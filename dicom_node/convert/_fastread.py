"""A lean reader for the headers of classic image files (the bulk of a series).

pydicom builds every element of a file, private sequences included, which costs about a
millisecond per MR slice: most of the time of a series conversion. This reader walks the
top-level elements of a Part 10 file in little-endian transfer syntax, keeps only the attributes
the converter needs (as raw elements, converted lazily by pydicom as usual) and skips everything
else by its length, nested sequences included.

It handles only what it can handle for certain: anything unexpected (big endian, deflate, a
length that runs past the end, enhanced functional groups, a Modality LUT...) returns None and
the caller reads the file with pydicom, whose errors and behaviour then apply.
"""

from __future__ import annotations

import logging
import struct

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

log = logging.getLogger(__name__)

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")

#: attributes of a classic image the converter reads (everything else is skipped)
WANTED = frozenset(
    int(t)
    for t in (
        0x00080008,  # ImageType
        0x00080016,  # SOPClassUID
        0x00080018,  # SOPInstanceUID
        0x00080060,  # Modality
        0x00180050,  # SliceThickness
        0x00180081,  # EchoTime
        0x00180082,  # InversionTime
        0x00180086,  # EchoNumbers
        0x00180088,  # SpacingBetweenSlices
        0x00189087,  # DiffusionBValue
        0x0020000E,  # SeriesInstanceUID
        0x00200012,  # AcquisitionNumber
        0x00200032,  # ImagePositionPatient
        0x00200037,  # ImageOrientationPatient
        0x00200052,  # FrameOfReferenceUID
        0x00200100,  # TemporalPositionIdentifier
        0x00280002,  # SamplesPerPixel
        0x00280004,  # PhotometricInterpretation
        0x00280008,  # NumberOfFrames
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280030,  # PixelSpacing
        0x00280100,  # BitsAllocated
        0x00280101,  # BitsStored
        0x00280102,  # HighBit
        0x00280103,  # PixelRepresentation
        0x00281052,  # RescaleIntercept
        0x00281053,  # RescaleSlope
        0x00281054,  # RescaleType
        0x7FE00010,  # PixelData
    )
)
#: attributes whose presence needs the full reader (functional groups, LUTs...)
NEEDS_PYDICOM = frozenset((0x00283000, 0x52009229, 0x52009230, 0x7FE00008, 0x7FE00009, 0x00280009))
_LONG_VRS = frozenset(
    (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV")
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Unsupported(Exception):
    """The lean reader stops; pydicom reads the file instead."""


_U16 = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16L = struct.Struct("<H")


def _element_header(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise _Unsupported("truncated element header")
    group, elem = _U16.unpack_from(data, pos)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Unsupported("truncated element header")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if not vr.isalpha():
        raise _Unsupported("not an explicit VR")
    return tag, vr, _U16L.unpack_from(data, pos + 6)[0], pos + 8


def _skip_undefined(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``."""
    if depth > 16:
        raise _Unsupported("sequences nested too deep")
    while True:
        tag, _, length, start = _element_header(data, pos, True)
        if tag == _SEQ_END:
            return start
        if tag != _ITEM:
            raise _Unsupported("expected a sequence item")
        if length != _UNDEFINED:
            pos = start + length
            continue
        pos = start
        while True:  # elements of an undefined-length item, up to the item delimiter
            tag, vr, length, start = _element_header(data, pos, implicit)
            if tag == _ITEM_END:
                pos = start
                break
            if length == _UNDEFINED:
                if vr == b"UN":
                    raise _Unsupported("undefined-length UN")
                pos = _skip_undefined(data, start, implicit, depth + 1)
            else:
                pos = start + length
            if pos > len(data):
                raise _Unsupported("element runs past the end")


def read_classic_header(data: bytes) -> Dataset | None:
    """The wanted attributes of a classic image file, or None when pydicom must read it."""
    try:
        return _read(data)
    except (_Unsupported, struct.error, IndexError, UnicodeDecodeError) as exc:
        log.debug("lean reader falls back to pydicom: %s", exc)
        return None


def _read(data: bytes) -> Dataset | None:
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos = 132
    meta = FileMetaDataset()
    transfer_syntax = None
    while pos + 8 <= len(data):
        group = _U16L.unpack_from(data, pos)[0]
        if group != 0x0002:
            break
        tag, vr, length, start = _element_header(data, pos, False)
        if length == _UNDEFINED or start + length > len(data):
            return None
        if tag == 0x00020010:
            transfer_syntax = data[start : start + length].decode("ascii").strip("\0 ")
            meta.TransferSyntaxUID = UID(transfer_syntax)
        pos = start + length
    if transfer_syntax is None or transfer_syntax in (_BIG_ENDIAN, *_DEFLATED):
        return None
    implicit = transfer_syntax == _IMPLICIT_LE
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    end = len(data)
    while pos < end:
        tag, vr, length, start = _element_header(data, pos, implicit)
        if tag in NEEDS_PYDICOM:
            return None
        if tag == 0x7FE00010:
            if length == _UNDEFINED:
                # encapsulated (compressed) frames: keep the items, pydicom's decoders read them
                if implicit:
                    return None
                stop = _skip_undefined(data, start, implicit, 0)
                elements[BaseTag(tag)] = RawDataElement(
                    BaseTag(tag), "OB", _UNDEFINED, data[start : stop - 8], start,
                    implicit, True, True, False,
                )  # fmt: skip
                break
            if start + length > end:
                return None
            elements[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), "OW" if vr is None else vr.decode(), length,
                data[start : start + length], start, implicit, True, True, False,
            )  # fmt: skip
            break
        if length == _UNDEFINED:
            if vr == b"UN" or (vr is not None and vr != b"SQ" and not implicit):
                return None
            pos = _skip_undefined(data, start, implicit, 0)
            continue
        if start + length > end:
            return None
        if tag in WANTED:
            elements[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), None if vr is None else vr.decode(), length,
                data[start : start + length], start, implicit, True, True, False,
            )  # fmt: skip
        pos = start + length
    ds = Dataset(elements)
    ds.file_meta = meta
    ds.set_original_encoding(implicit, True, None)
    return ds
