"""Every output object type passes dciodvfy (dicom3tools) with no error."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.sr_writer.synthetic_job import default_outputs


def _objects() -> dict[str, Dataset]:
    out = default_outputs()
    return {
        "secondary capture": out.sc[len(out.sc) // 2],
        "uncertainty secondary capture": out.uncertainty_sc[0],
        "segmentation": out.seg,
        "rtstruct": out.rtstruct,
        "structured report": out.sr,
        "derived mr": out.derived_mr[-1],
    }


def dciodvfy_errors(dciodvfy: str, path: Path) -> tuple[list[str], str]:
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


@pytest.mark.parametrize("kind", list(_objects()))
def test_output_object_passes_dciodvfy(kind: str, dciodvfy: str, tmp_path: Path) -> None:
    ds = _objects()[kind]
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, text = dciodvfy_errors(dciodvfy, path)
    # dciodvfy names the IOD it checked on its first line: make sure it recognised the object
    assert text.strip(), f"dciodvfy printed nothing for the {kind}"
    assert errors == [], f"dciodvfy errors for the {kind}:\n" + "\n".join(errors)


def test_dciodvfy_detects_a_broken_object(dciodvfy: str, tmp_path: Path) -> None:
    """The check above can fail: remove a type 1 attribute and dciodvfy reports an error."""
    ds = copy.deepcopy(_objects()["segmentation"])
    del ds.SegmentSequence
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy_errors(dciodvfy, path)
    assert any("SegmentSequence" in e for e in errors), errors
