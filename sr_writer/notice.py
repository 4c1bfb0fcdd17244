"""The failure notice: what the node sends a PACS when it could make no prediction for a study.

Without it a radiologist waiting for the prediction series sees nothing and cannot tell a slow
node from a study the node gave up on. A destination with ``failure_notice: true`` receives,
in the study, two objects in series of their own:

- a Secondary Capture image that says, in words, that no prediction was made, why, and what to
  do: it shows in any viewer, as the first image of its series;
- a Comprehensive SR with the same text as content items (the reason in full, where the image
  may have to shorten it), referencing the study's images as evidence.

Both are labelled like every output (``SYNTHETIC PREDICTION - RESEARCH USE ONLY`` in the
series description, ``ContentQualification`` RESEARCH, the node as contributing equipment),
which also keeps the node from taking them as input when a PACS routes them back. Their UIDs
are derived from the study, the job and its reason: the notice of the same failure built again
(a restart, a retry that fails the same way) is the same objects, a different reason gives new
ones.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import ExportError
from dicom_node.types import PatientStudy, SeriesRef

from .labels import (
    CONTENT_QUALIFICATION,
    DEFAULT_MANUFACTURER,
    RESEARCH_NOTE,
    finish_output,
    for_highdicom,
    highdicom_patient_study,
    name_uid,
    node_contribution,
    series_description,
    set_patient_study,
)
from .references import reference_stubs
from .secondary_capture import BODY_PART, draw_banner
from .structured_report import LOCAL_SCHEME

NOTICE_SERIES_NUMBERS = {"sc": 9010, "sr": 9011}
NOTICE_BANNER = f"NO PREDICTION - {RESEARCH_NOTE}"
#: the series description of the notice of a study's first version
NOTICE_DESCRIPTION = series_description("NO PREDICTION")

# the image: white text on a dark background under the banner
WIDTH, HEIGHT = 768, 576
BACKGROUND_RGB = (24, 24, 24)
TEXT_RGB = (255, 255, 255)
HEADLINE_RGB = (255, 210, 80)
TEXT_SIZE = 18
MARGIN = 28

REPORT_TITLE = codes.LN.DiagnosticImagingReport  # CID 7000
NO_PREDICTION_REASON = Code("GLF010", LOCAL_SCHEME, "Reason no prediction was made")
NODE_JOB = Code("GLF011", LOCAL_SCHEME, "Node job")


@dataclass(frozen=True)
class FailureNotice:
    """What a notice says about one failed job (:mod:`dicom_node.notices` fills it in).

    ``headline``: one sentence a reader understands; ``reason``: the job's reason as the node
    recorded it; ``advice``: what to do; ``study_series``: the study's series, referenced by the
    SR as evidence; ``study_version``: the failed job's version of the study, which the series
    descriptions of versions 2 and up say (:func:`~sr_writer.labels.series_description`).
    """

    job_id: int
    headline: str
    reason: str
    advice: str
    node_ae_title: str
    failed_at: datetime.datetime
    study_series: tuple[SeriesRef, ...] = ()
    study_version: int = 1

    @property
    def job_line(self) -> str:
        return (
            f"Job {self.job_id} of the glioforecast node {self.node_ae_title}, "
            f"{self.failed_at:%Y-%m-%d %H:%M}; details: glioforecast jobs show {self.job_id}"
        )


def notice_uid(patient: PatientStudy, notice: FailureNotice, *parts: str) -> str:
    """A UID of the notice of ``notice``'s failure: the study, the job and its reason."""
    digest = hashlib.sha256(notice.reason.encode("utf-8")).hexdigest()[:16]
    return name_uid(
        "glioforecast-notice-v1", patient.study_instance_uid, notice.job_id, digest, *parts
    )


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: int,
) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (words longer than a line are cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width:  # a long UID or path
                cut = max(1, int(len(word) * width / draw.textlength(word, font=font)) - 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def render_notice(notice: FailureNotice) -> npt.NDArray[np.uint8]:
    """The notice as an RGB image (rows, columns, 3): banner, headline, reason, advice, job."""
    banner = draw_banner(WIDTH, NOTICE_BANNER)
    body = Image.new("RGB", (WIDTH, HEIGHT - banner.shape[0]), BACKGROUND_RGB)
    draw = ImageDraw.Draw(body)
    draw.fontmode = "1"  # no anti-aliasing: exact colours, as the banner
    text_font, head_font = _font(TEXT_SIZE), _font(TEXT_SIZE + 6)
    usable = WIDTH - 2 * MARGIN
    step = TEXT_SIZE + 6
    head = _wrap(draw, notice.headline, head_font, usable)
    advice = _wrap(draw, f"What to do: {notice.advice}", text_font, usable)
    job = _wrap(draw, notice.job_line, text_font, usable)
    room = (body.height - 2 * MARGIN - len(head) * (step + 6)) // step - len(advice) - len(job) - 3
    reason = _wrap(draw, f"Reason: {notice.reason}", text_font, usable)
    if len(reason) > room:  # the SR has it in full
        reason = [*reason[: max(1, room - 1)], "(shortened: the full reason is in the SR)"]
    y = MARGIN
    for line in head:
        draw.text((MARGIN, y), line, fill=HEADLINE_RGB, font=head_font)
        y += step + 6
    for block in (reason, advice, job):
        y += step
        for line in block:
            draw.text((MARGIN, y), line, fill=TEXT_RGB, font=text_font)
            y += step
    return np.concatenate([banner, np.asarray(body, dtype=np.uint8)], axis=0)


def build_failure_notice(
    notice: FailureNotice,
    patient: PatientStudy,
    node_version: str,
    when: datetime.datetime | None = None,
) -> list[Dataset]:
    """The notice's Secondary Capture image and Comprehensive SR, in the source study."""
    if not notice.reason.strip():
        raise ExportError("a failure notice needs the job's reason, found an empty one")
    ts = when or datetime.datetime.now().replace(microsecond=0)
    common: dict[str, Any] = {
        "manufacturer": DEFAULT_MANUFACTURER,
        "contributing_equipment": [
            node_contribution(node_version, ts, "failure notice: no prediction was made")
        ],
        "series_description": series_description("NO PREDICTION", notice.study_version),
        "content_qualification": CONTENT_QUALIFICATION,
        "manufacturer_model_name": "glioforecast node",
        "software_versions": [f"glioforecast {node_version}"],
        "specific_character_set": "ISO_IR 192",
        "content_date": ts.date(),
        "content_time": ts.time(),
    }
    sc = hd.sc.SCImage(
        pixel_array=render_notice(notice),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",  # highdicom's choice of two; emptied below
        patient_orientation=("L", "P"),
        series_instance_uid=notice_uid(patient, notice, "series", "sc"),
        series_number=NOTICE_SERIES_NUMBERS["sc"],
        sop_instance_uid=notice_uid(patient, notice, "instance", "sc"),
        instance_number=1,
        **highdicom_patient_study(patient),
        **common,
    )
    sc.add_new("PatientOrientation", "CS", None)  # type 2: a page of text has none
    # the study's body part, unpaired: no Laterality (empty, it drew a warning from dciodvfy)
    sc.BodyPartExamined = BODY_PART
    sc.ConversionType = "WSD"  # drawn by a workstation, not an image of the patient
    sc.BurnedInAnnotation = "NO"  # the text identifies nobody
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = f"No prediction: {notice.headline}"[:10240]
    sc.LossyImageCompression = "00"

    items = [
        hd.sr.TextContentItem(codes.DCM.Finding, notice.headline, "CONTAINS"),
        hd.sr.TextContentItem(NO_PREDICTION_REASON, notice.reason, "CONTAINS"),
        hd.sr.TextContentItem(codes.DCM.Recommendation, notice.advice, "CONTAINS"),
        hd.sr.TextContentItem(NODE_JOB, notice.job_line, "CONTAINS"),
    ]
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = Sequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(patient, notice.study_series),
        content=root,
        series_instance_uid=notice_uid(patient, notice, "series", "sr"),
        series_number=NOTICE_SERIES_NUMBERS["sr"],
        sop_instance_uid=notice_uid(patient, notice, "instance", "sr"),
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="glioforecast local concepts",
                responsible_organization="glioforecast",
            )
        ],
        **common,
    )
    for ds in (sc, sr):  # highdicom copies the patient from the first evidence item; be exact
        finish_output(ds, patient, ts)
    return [sc, sr]


def _evidence(patient: PatientStudy, series: SequenceOf[SeriesRef]) -> list[Dataset]:
    """The study's instances to list as evidence, the first carrying patient and study (what
    highdicom copies)."""
    out: list[Dataset] = []
    for ref in series:
        out.extend(reference_stubs(patient.study_instance_uid, ref))
    if not out:
        raise ExportError("a failure notice references the study's images, found no series")
    set_patient_study(out[0], for_highdicom(patient))
    return out


def read_notice(ds: Dataset) -> dict[str, str]:
    """The text items of a notice SR by concept name (what a test or a script reads back)."""
    return {
        str(item.ConceptNameCodeSequence[0].CodeMeaning): str(item.TextValue)
        for item in ds.ContentSequence
        if item.ValueType == "TEXT"
    }
