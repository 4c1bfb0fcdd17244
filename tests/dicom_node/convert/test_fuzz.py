"""Fuzzing the converters with mutated files and headers (hypothesis, derandomized).

Only the project's own errors (:class:`GlioforecastError`) may come out, and every example must
finish quickly. 3 x 1,000 examples; the run takes about 30 s on 2 shared cores.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicom_node.convert.rtdose import dose_on_grid
from dicom_node.convert.rtstruct import list_rois, load_rtstruct_mask
from dicom_node.convert.series import load_series
from dicom_node.errors import GlioforecastError
from dicom_node.types import Volume
from tests.dicom_node.convert import synth

# pydicom warns about every invalid value it meets, which is the point here; a hang fails the
# test through pytest-timeout well before the suite's default limit
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(180)]

FUZZ = settings(
    max_examples=1000,
    derandomize=True,
    deadline=5000,  # ms per example: a hang or a pathological slowdown fails the test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
FRAME = "1.2.826.0.1.3680043.2.1125.7"


BINARY_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "OW", "OF", "OD", "OL", "UN", "SQ"}


@contextmanager
def _lenient_writing() -> Iterator[None]:
    """Let pydicom write invalid values as they are (what a faulty sender would send)."""
    previous = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = previous


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@cache
def _grid() -> Volume:
    return load_series(
        synth.mr_slices(synth.volume_pixels((4, 16, 16)), slice_step=2.0, frame_uid=FRAME)
    )


@cache
def _seeds() -> dict[str, list[bytes]]:
    grid = _grid()
    ring = np.c_[np.cos(np.linspace(0, 6.2, 24)), np.sin(np.linspace(0, 6.2, 24))] * 5 + 8
    contour = (grid.affine @ np.c_[ring, np.full(24, 1.0), np.ones(24)].T).T[:, :3]
    hole = (grid.affine @ np.c_[(ring - 8) * 0.4 + 8, np.full(24, 1.0), np.ones(24)].T).T[:, :3]
    return {
        "classic": [
            _bytes(ds)
            for ds in synth.mr_slices(synth.volume_pixels((3, 8, 8)), slope=2.0, intercept=1.0)
        ],
        "enhanced": [
            _bytes(synth.enhanced_mr(synth.volume_pixels((4, 8, 8)), frame_order=[1, 3, 0, 2]))
        ],
        "rtstruct": [_bytes(synth.rtstruct(FRAME, {"GTV": [contour, hole]}))],
        "rtdose": [
            _bytes(
                synth.rtdose(
                    lambda p: p[:, 0] * 0 + 2.0,
                    shape=(3, 6, 6),
                    origin=(-12.0, -22.0, 28.0),
                    spacing=(3.0, 3.0, 3.0),
                    frame_uid=FRAME,
                )
            )
        ],
    }


CONVERTERS: dict[str, Callable[[list[io.BytesIO]], object]] = {
    "classic": lambda files: load_series(files),
    "enhanced": lambda files: load_series(files),
    "rtstruct": lambda files: (list_rois(files[0]), load_rtstruct_mask(files[0], _grid())),
    "rtdose": lambda files: dose_on_grid(files[0], _grid()),
}


OUTCOMES: Counter[str] = Counter()


def _run(kind: str, blobs: list[bytes]) -> None:
    """Convert; our own error is a fine answer, anything else propagates and fails the test."""
    try:
        CONVERTERS[kind]([io.BytesIO(b) for b in blobs])
    except GlioforecastError:
        OUTCOMES[f"{kind} refused"] += 1
    else:
        OUTCOMES[f"{kind} converted"] += 1


byte_edit = st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
    st.floats(0, 1, allow_nan=False),
    st.integers(0, 255),
    st.integers(1, 64),
)


@FUZZ
@given(
    kind=st.sampled_from(sorted(CONVERTERS)),
    which=st.integers(0, 10),
    edits=st.lists(byte_edit, min_size=1, max_size=6),
)
def test_byte_level_mutations(
    kind: str, which: int, edits: list[tuple[str, float, int, int]]
) -> None:
    blobs = list(_seeds()[kind])
    target = which % len(blobs)
    data = bytearray(blobs[target])
    for op, where, value, length in edits:
        # bias towards the header (most of a small file's bytes are pixels)
        pos = int((where**3) * (len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[pos] ^= 1 << (value % 8)
        elif op == "set" and data:
            data[pos] = value
        elif op == "cut":
            data = data[: max(pos, 0)]
        elif op == "insert":
            data[pos:pos] = bytes([value]) * length
        elif op == "delete":
            del data[pos : pos + length]
    blobs[target] = bytes(data)
    _run(kind, blobs)


def _elements(ds: Dataset) -> list[tuple[Dataset, int]]:
    """(dataset, tag) of every element, nested sequences included."""
    found: list[tuple[Dataset, int]] = []
    for elem in ds:
        found.append((ds, int(elem.tag)))
        if elem.VR == "SQ":
            for item in elem.value:
                found.extend(_elements(item))
    return found


text_values = st.one_of(
    st.text(alphabet="0123456789.-+eE\\ nainfNAIF", max_size=40),
    st.text(max_size=20),
    st.sampled_from(
        ["", "\\", "nan", "inf", "-0", "1e309", "65536", "-1", "0", "1\\0\\0\\0\\0\\0"]
    ),
)
raw_values = st.binary(max_size=48)


@FUZZ
@given(
    kind=st.sampled_from(sorted(CONVERTERS)),
    which=st.integers(0, 10),
    picks=st.lists(
        st.tuples(st.integers(0, 10_000), st.one_of(text_values, raw_values, st.none())),
        min_size=1,
        max_size=4,
    ),
)
def test_header_value_mutations(
    kind: str, which: int, picks: list[tuple[int, str | bytes | None]]
) -> None:
    """Replace element values (any depth) by odd text, raw bytes (as UN) or delete them."""
    blobs = list(_seeds()[kind])
    target = which % len(blobs)
    ds = pydicom.dcmread(io.BytesIO(blobs[target]))
    for index, value in picks:
        elements = _elements(ds)
        parent, tag = elements[index % len(elements)]
        if tag == 0x7FE00010 and value is not None:
            continue  # pixel data replaced by a short value is covered by the byte-level test
        try:
            if value is None:
                del parent[tag]
            else:
                vr = dictionary_VR(tag) if tag >> 16 & 1 == 0 else "UN"
                if isinstance(value, bytes) and vr not in BINARY_VRS:
                    value = value.decode("latin-1")
                if isinstance(value, str) and vr in BINARY_VRS:
                    value = value.encode("utf-8")
                parent[tag] = DataElement(tag, vr, value)
        except Exception:
            continue  # pydicom cannot build this element, so no sender could send it either
    try:
        with _lenient_writing():
            blob = _bytes(ds)
    except Exception:
        return  # pydicom cannot even write this dataset: nothing reaches the node
    blobs[target] = blob
    _run(kind, blobs)


@FUZZ
@given(
    kind=st.sampled_from(["classic", "enhanced"]),
    rows=st.integers(0, 70_000),
    cols=st.integers(0, 70_000),
    frames=st.sampled_from(["1", "0", "-3", "4", "1000000", "x"]),
    bits=st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]),
)
def test_image_size_mutations(kind: str, rows: int, cols: int, frames: str, bits: int) -> None:
    """Image size attributes that disagree with the pixel data: refused, never huge allocations."""
    blobs = list(_seeds()[kind])
    ds = pydicom.dcmread(io.BytesIO(blobs[0]))
    try:
        with _lenient_writing():
            ds.Rows = rows % 65536
            ds.Columns = cols % 65536
            ds.BitsAllocated = bits
            ds["NumberOfFrames"] = DataElement(0x00280008, "IS", frames)
            blobs[0] = _bytes(ds)
    except Exception:
        return  # pydicom cannot write this: no sender could send it
    _run(kind, blobs)


def test_seeds_convert() -> None:
    """The unmutated seeds are valid: the fuzz tests start from working inputs."""
    for kind, blobs in _seeds().items():
        CONVERTERS[kind]([io.BytesIO(b) for b in blobs])


def test_fuzzing_reached_both_outcomes() -> None:
    """Runs after the fuzz tests (file order): they must have both refused and converted inputs,
    otherwise the mutations are too weak (or too destructive) to test anything."""
    if not OUTCOMES:
        pytest.skip("run together with the fuzz tests")
    for kind in CONVERTERS:
        assert OUTCOMES[f"{kind} refused"] > 0, OUTCOMES
        assert OUTCOMES[f"{kind} converted"] > 0, OUTCOMES
