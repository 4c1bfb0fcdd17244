"""The version of the study in the series descriptions of its results.

A late instance reopens a study and the node runs a new job version of it; its results get new
UIDs, and a PACS that ignores the rejection note of the earlier results shows both. The series
numbers stay the same (hanging protocols key on them), so the descriptions of versions 2 and up
end in `` v<version>``; version 1's are what they always were.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import ExportError
from dicom_node.types import FrameMapping
from sr_writer.labels import BANNER_TEXT, is_labelled_description, series_description
from sr_writer.notice import build_failure_notice
from sr_writer.outputs import OutputOptions, build_outputs
from tests.sr_writer.synthetic_job import default_case, default_notice, job_inputs

PLANNING_FRAME_UID = "1.2.826.0.1.3680043.8.498.7"

#: every kind of result series, by series number, with its description in version 1 (as sites
#: hold them: unchanged) and in version 2
DESCRIPTIONS = {
    9001: ("T1-Gd SC", "T1-Gd SC v2"),
    9002: ("UNCERTAINTY SC", "UNCERTAINTY SC v2"),
    9003: ("SR", "SR v2"),
    9004: ("SEG", "SEG v2"),
    9005: ("RTSTRUCT", "RTSTRUCT v2"),
    9006: ("derived MR", "derived MR v2"),
    9007: ("RTSTRUCT PLAN FRAME", "RTSTRUCT PLAN v2"),
    9010: ("NO PREDICTION", "NO PREDICTION v2"),
    9011: ("NO PREDICTION", "NO PREDICTION v2"),
}


@functools.cache
def results_of_version(study_version: int) -> tuple[Dataset, ...]:
    """Every kind of result of the default case's study in ``study_version``: the prediction's
    objects with the optional ones (uncertainty SC, derived MR, the RTSTRUCT on a planning
    frame), and a failure notice."""
    case = default_case()
    shifted = np.eye(4)
    shifted[:3, 3] = (12.0, -3.0, 40.0)
    inputs = dataclasses.replace(
        job_inputs(case),
        planning_frame=FrameMapping(PLANNING_FRAME_UID, shifted),
        study_version=study_version,
    )
    options = OutputOptions(node_version="0.1.0", uncertainty_sc=True, derived_mr=True)
    out = build_outputs(case.prediction, inputs, options)
    notice = dataclasses.replace(default_notice(), study_version=study_version)
    return (*out.all(), *build_failure_notice(notice, case.patient, "0.1.0"))


def _descriptions(objects: tuple[Dataset, ...]) -> dict[int, set[str]]:
    by_number: dict[int, set[str]] = {}
    for ds in objects:
        by_number.setdefault(int(ds.SeriesNumber), set()).add(str(ds.SeriesDescription))
    return by_number


def test_a_later_version_says_its_version_in_every_series_description() -> None:
    first, second = _descriptions(results_of_version(1)), _descriptions(results_of_version(2))
    assert set(first) == set(second) == set(DESCRIPTIONS)  # every kind, the same numbers
    for number, (was, now) in DESCRIPTIONS.items():
        assert first[number] == {f"{BANNER_TEXT} - {was}"}, number
        assert second[number] == {f"{BANNER_TEXT} - {now}"}, number
    for ds in results_of_version(2):
        assert is_labelled_description(ds.SeriesDescription), ds.SeriesDescription
        assert ds.SeriesDescription.endswith(" v2"), ds.SeriesDescription
    for ds in results_of_version(1):
        assert not ds.SeriesDescription.endswith(" v1"), ds.SeriesDescription


def test_the_version_changes_no_uid() -> None:
    """The UIDs come from the job's inputs, patient and model (JobIdentity), not its version."""

    def uids(objects: tuple[Dataset, ...]) -> list[tuple[str, str]]:
        return [(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in objects]

    assert uids(results_of_version(1)) == uids(results_of_version(2))


def test_every_description_fits_a_long_string_up_to_version_99999() -> None:
    """The longest description is the planning-frame RTSTRUCT's (62 characters in version 1);
    in later versions it is named RTSTRUCT PLAN. Every kind stays within the 64 characters of
    an LO up to version 99999, the uncertainty SC's exactly at it."""
    longest = max(results_of_version(1), key=lambda ds: len(ds.SeriesDescription))
    assert longest.SeriesDescription == f"{BANNER_TEXT} - RTSTRUCT PLAN FRAME"
    assert len(longest.SeriesDescription) == 62
    whats = {was for was, _ in DESCRIPTIONS.values()} - {"RTSTRUCT PLAN FRAME"}
    whats.add("RTSTRUCT PLAN")
    for what in whats:
        for version in (2, 9, 10, 99, 100, 999, 1000, 9999, 10000, 99999):
            assert len(series_description(what, version)) <= 64, (what, version)
    assert len(series_description("UNCERTAINTY SC", 99999)) == 64
    with pytest.raises(ExportError, match="at most 64 characters"):
        series_description("UNCERTAINTY SC", 100000)


def test_a_study_version_under_1_is_refused() -> None:
    with pytest.raises(ExportError, match="study version of 1 or more, found 0"):
        series_description("SEG", 0)
