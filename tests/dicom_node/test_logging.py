"""What the node's logs carry: never a value of a data set that the DICOM libraries quote in
their warnings (a malformed birth date), one line per message whatever a data set's text holds,
tracebacks in the JSON format too. The logging set-up of ``serve`` in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

_SCRIPT = """
import io, logging, sys
from dicom_node.service import configure_logging
from dicom_node.settings import LoggingSettings
configure_logging(LoggingSettings(format=sys.argv[1]))
from pydicom.dataset import Dataset
ds = Dataset()
ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = '1941-01-01', 'zzyzx-sex', '12:51:00'
ds.save_as(io.BytesIO(), implicit_vr=False, little_endian=True)
log = logging.getLogger('dicom_node.assembler')
log.warning('series %s matched t1c', 'T1 +Gd\\n2026-12-07 14:40:00,000 INFO dicom_node.scp forged')
try:
    1 / 0
except ZeroDivisionError:
    log.exception('a step failed')
"""


@pytest.mark.parametrize("form", ["text", "json"])
def test_the_logs_carry_no_value_the_dicom_libraries_quote(form: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, form], capture_output=True, text=True, cwd=REPO,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stderr
    for value in ("1941-01-01", "zzyzx-sex", "12:51:00"):
        assert value not in out, out  # pydicom's warnings quoted them, each twice
    assert "UserWarning" not in out  # nor printed raw beside the log
    if form == "text":
        lines = out.splitlines()
        assert not any(line.startswith("2026-12-07 14:40:00") for line in lines), out
        assert any(line.endswith("matched t1c") and "\\n2026-12-07" in line for line in lines)
        assert "ZeroDivisionError" in out
    else:
        entries = [json.loads(line) for line in out.splitlines()]
        assert {e["logger"] for e in entries} == {"pydicom", "dicom_node.assembler"}
        (failed,) = [e for e in entries if e["message"] == "a step failed"]
        assert "ZeroDivisionError: division by zero" in failed["exception"]


def test_a_job_process_names_its_job_and_highdicom_keeps_to_warnings() -> None:
    """A job process's lines carry its job number (they said "[job -]"), and highdicom's line
    per module copied into each result object (16 a job, their values masked) stays out at
    INFO, as pynetdicom's does."""
    script = (
        "import logging\n"
        "from dicom_node.service import configure_logging\n"
        "from dicom_node.settings import LoggingSettings\n"
        "configure_logging(LoggingSettings(), job=7)\n"
        "logging.getLogger('sr_writer.outputs').info('built the SR')\n"
        "logging.getLogger('dicom_node.worker').info('other', extra={'job': 3})\n"
        "logging.getLogger('highdicom.base').info('copy attributes of module')\n"
        "logging.getLogger('highdicom.base').warning('a highdicom warning')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert any(line.endswith("sr_writer.outputs [job 7] built the SR") for line in lines), lines
    assert any(line.endswith("[job 3] other") for line in lines), lines
    assert not any("copy attributes" in line for line in lines), lines
    assert any("a highdicom warning" in line for line in lines), lines
