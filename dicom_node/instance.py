"""What the node records about one received instance, read from its header only."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicom_node.errors import InputError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_CHARACTERS = re.compile(r"[0-9.]+")

# Transfer syntaxes whose Pixel Data is stored natively (not encapsulated).
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and bool(_UID_RE.match(value))


#: what some consoles write in ContrastBolusAgent when no agent was given
NO_AGENT = frozenset({"", "NONE", "NO", "N", "NIL", "NULL", "N/A", "NA", "-", "0", "FALSE",
                      "WITHOUT", "NO CONTRAST"})  # fmt: skip


def _names_agent(ds: Dataset) -> bool:
    """Whether the image names a contrast agent: ContrastBolusAgent (not a placeholder such
    as 'NONE', :data:`NO_AGENT`), or a Contrast/Bolus Agent Sequence with an item."""
    agent = _text(ds, "ContrastBolusAgent").strip().upper()
    return agent not in NO_AGENT or bool(ds.get("ContrastBolusAgentSequence"))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):  # multi-valued (e.g. ImageType)
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _required_uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if not value:
        raise InputError(f"{keyword} is missing: expected a UID, found no value")
    if len(value) > 64:
        raise InputError(f"{keyword} is too long: expected at most 64 characters, found {value!r}")
    if not _UID_CHARACTERS.fullmatch(value):
        # the outputs carry the study's and the series' UIDs on to the PACS: no letters or
        # paths. Sloppy numbers (a leading zero, an empty component) are taken: some devices
        # make them, and nothing downstream breaks on them
        raise InputError(f"{keyword} is not a UID: expected digits and dots, found {value!r}")
    return value


def patient_key(ds: Dataset, secret: bytes) -> str:
    """A keyed hash of the patient identity, safe to log and store (not reversible).

    A plain hash of a patient ID could be reversed by trying every ID, so the hash is keyed with
    the installation's secret.
    """
    ident = f"{_text(ds, 'PatientID')}\x00{_text(ds, 'IssuerOfPatientID')}"
    return hmac.new(secret, ident.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class InstanceInfo:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    protocol_name: str
    sequence_name: str
    contrast_agent: bool
    frame_of_reference_uid: str
    transfer_syntax_uid: str
    patient_key: str
    # ImageType values joined by backslashes, upper case ("" when absent): the series roles
    # rank acquired images before derived ones and leave out projections and subtractions
    image_type: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str, secret: bytes) -> InstanceInfo:
        """Read the attributes the node needs; raise :class:`InputError` when unusable."""
        try:
            series_number: int | None = None
            raw_number = ds.get("SeriesNumber")
            if raw_number not in (None, ""):
                try:
                    series_number = int(raw_number)
                except (TypeError, ValueError):
                    series_number = None
            sequence = _text(ds, "SequenceName") or _text(ds, "PulseSequenceName")
            return cls(
                sop_instance_uid=_required_uid(ds, "SOPInstanceUID"),
                sop_class_uid=_required_uid(ds, "SOPClassUID"),
                study_instance_uid=_required_uid(ds, "StudyInstanceUID"),
                series_instance_uid=_required_uid(ds, "SeriesInstanceUID"),
                modality=_text(ds, "Modality"),
                series_number=series_number,
                series_description=_text(ds, "SeriesDescription"),
                protocol_name=_text(ds, "ProtocolName"),
                sequence_name=sequence,
                contrast_agent=_names_agent(ds),
                frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
                transfer_syntax_uid=transfer_syntax_uid,
                patient_key=patient_key(ds, secret),
                image_type=_text(ds, "ImageType").upper(),
            )
        except InputError:
            raise
        except Exception as exc:  # pydicom raises many types on malformed values
            raise InputError(f"header cannot be decoded: {type(exc).__name__}: {exc}") from exc


# Storage SOP classes whose instances are images: Pixel Data is required (type 1).
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose (the dose grid)
}


def check_pixel_data(ds: Dataset, transfer_syntax_uid: str) -> None:
    """Refuse an image without Pixel Data, or with native Pixel Data shorter than it says."""
    if "PixelData" not in ds:
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in IMAGE_SOP_CLASSES and "FloatPixelData" not in ds:
            raise InputError(
                f"Pixel Data is missing: expected it in a {UID(sop_class).name} instance "
                "(a truncated object?)"
            )
        return
    try:
        value: Any = ds["PixelData"].value
        if transfer_syntax_uid not in _NATIVE_SYNTAXES:
            if not isinstance(value, bytes | bytearray) or value[:4] != b"\xfe\xff\x00\xe0":
                raise InputError(
                    f"encapsulated Pixel Data expected for transfer syntax "
                    f"{UID(transfer_syntax_uid).name}, found no item tag"
                )
            return
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"image attributes cannot be decoded: {type(exc).__name__}: {exc}"
        ) from exc
    if min(rows, cols, samples, frames, bits) < 1:
        raise InputError(
            f"image size is empty: expected at least one row, column, sample, frame and bit, "
            f"found {frames} frame(s) of {rows}x{cols}x{samples} at {bits} bits"
        )
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if len(value) < expected:
        raise InputError(
            f"Pixel Data is truncated: expected {expected} bytes for {frames} frame(s) of "
            f"{rows}x{cols}x{samples} at {bits} bits, found {len(value)}"
        )


def installation_secret(data_dir: Path) -> bytes:
    """The installation's random key for :func:`patient_key`, created on first use (mode 0600)."""
    path = data_dir / "secret.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)  # another process may have won the race: use its key
    tmp.unlink()
    return bytes.fromhex(path.read_text().strip())
