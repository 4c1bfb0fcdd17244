"""Typed, frozen objects that stages hand to each other.

No pydicom datasets cross package boundaries: conversion produces :class:`Volume` objects, the
model consumes and produces them, ``sr_writer`` turns them into DICOM. This module imports only
numpy so that every package may use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

#: the kinds of output objects of one job, in the order they are sent (a destination's
#: ``objects`` setting names some of them): the T1-Gd and uncertainty Secondary Capture series,
#: the optional derived MR series, the SEG, the RTSTRUCT on the T1-Gd's frame, the RTSTRUCT on
#: the planning CT's frame (made when the GTV came on it), the Structured Report
OUTPUT_KINDS = ("sc", "uncertainty_sc", "derived_mr", "seg", "rtstruct", "rtstruct_planning", "sr")


@dataclass(frozen=True)
class Volume:
    """A 3D image or mask on a physical grid (LPS patient coordinates, millimetres).

    ``array`` is indexed ``[k, j, i]`` (slice, row, column), like SimpleITK's ``GetArrayFromImage``.
    ``direction`` is a 3x3 matrix whose *columns* are the unit vectors of the i, j and k axes
    (row direction, column direction, slice normal) in patient space; ``origin`` is the centre of
    voxel (0, 0, 0); ``spacing`` is (di, dj, dk).
    """

    array: npt.NDArray[np.generic]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: npt.NDArray[np.float64]
    frame_of_reference_uid: str | None = None
    source_instance_uids: tuple[str, ...] = ()
    series_instance_uid: str | None = None
    # the frame number (from 1) of each slice in its multi-frame source instance (an Enhanced
    # MR), in k order; empty when the slices are single-frame instances
    source_frame_numbers: tuple[int, ...] = ()
    # the nominal thickness of the source's slices (SliceThickness), which may differ from the
    # spacing between them (gaps, overlap); None when unknown (then the spacing stands for it)
    slice_thickness: float | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D, found shape {self.array.shape}")
        if np.shape(self.direction) != (3, 3):
            raise ValueError(
                f"Volume.direction must be 3x3, found shape {np.shape(self.direction)}"
            )
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"Volume.spacing must be 3 positive numbers, found {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (k, j, i)

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping voxel indices (i, j, k, 1) to LPS millimetres."""
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction, dtype=float) @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def with_array(self, array: npt.NDArray[np.generic]) -> Volume:
        """The same grid carrying other voxels (shape must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"expected shape {self.array.shape}, found {array.shape}")
        return Volume(
            array=array,
            spacing=self.spacing,
            origin=self.origin,
            direction=self.direction,
            frame_of_reference_uid=self.frame_of_reference_uid,
            source_instance_uids=self.source_instance_uids,
            series_instance_uid=self.series_instance_uid,
            source_frame_numbers=self.source_frame_numbers,
            slice_thickness=self.slice_thickness,
        )


@dataclass(frozen=True)
class SeriesRef:
    """Identity of a received series, enough to reference it from output objects."""

    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    # the study it is in, where not the job's study (a structure set, dose or registration
    # linked from the planning study)
    study_instance_uid: str = ""


@dataclass(frozen=True)
class PatientStudy:
    """Patient and study attributes that output objects copy from the source study, as
    received: a value a standard would refuse (PatientSex ``U``, a date with day 00, an
    ACR-NEMA time ``12:51:00``) is still the one the PACS files the patient and study under."""

    study_instance_uid: str
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    issuer_of_patient_id: str = ""
    study_description: str = ""
    specific_character_set: str = "ISO_IR 192"
    extra: dict[str, str] = field(default_factory=dict)


RESPONSE_CATEGORIES: tuple[str, ...] = (
    "complete_response",
    "partial_response",
    "stable_disease",
    "progressive_disease",
)


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for one study, on the source T1-Gd grid.

    ``mean`` is the mean of the samples (the predicted post-treatment T1-Gd), ``std`` the
    voxel-wise standard deviation across samples, ``tumour_mask`` the predicted tumour (boolean),
    ``sample_volumes_ml`` the predicted tumour volume of each sample, ``current_volume_ml`` the
    tumour volume before treatment that the change and the response category are computed from,
    and ``current_from`` what it is: ``"model"`` the model's own measurement on the
    pre-treatment T1-Gd (roughly the enhancing tumour; the node's models by default), ``"mask"``
    the GTV's volume, ``None`` not said. ``response_probabilities`` the fraction of
    samples in each of :data:`RESPONSE_CATEGORIES`, ``survival_class`` the guidance class used
    (``None`` when none was given), ``mean_volume_category`` the category of the mean
    predicted volume (it breaks ties, see :func:`most_frequent_category`), ``sample_classes``
    the guidance class of each sample when known (``None``: the null class; with no class given,
    a model may spread its samples over the classes, see ``inference.predict``).
    ``field_of_view`` (boolean, on the same grid) is where the model predicted: a model that
    sees a crop of the head predicts nothing outside it, where ``mean`` holds the pre-treatment
    image, ``std`` 0 and ``tumour_mask`` nothing; ``None`` means everywhere.
    """

    mean: Volume
    std: Volume
    tumour_mask: Volume
    sample_volumes_ml: tuple[float, ...]
    current_volume_ml: float
    response_probabilities: dict[str, float]
    survival_class: str | None
    model_name: str
    model_version: str
    mean_volume_category: str | None = None
    sample_classes: tuple[str | None, ...] = ()
    field_of_view: Volume | None = None
    current_from: Literal["mask", "model"] | None = None

    @property
    def predicted_region(self) -> npt.NDArray[np.bool_]:
        """Where the model predicted (``field_of_view``, everywhere when it is ``None``)."""
        if self.field_of_view is None:
            return np.ones(self.mean.shape, dtype=bool)
        return np.asarray(self.field_of_view.array, dtype=bool)

    @property
    def survival_scenario(self) -> str:
        """The guidance behind the samples, as reports state it: the class given, ``marginal``
        (no class given, the samples spread over the classes) or ``unconditional``."""
        if self.survival_class is not None:
            return self.survival_class
        if any(c is not None for c in self.sample_classes):
            return "marginal"
        return "unconditional"

    @property
    def predicted_volume_ml(self) -> float:
        return float(np.mean(self.sample_volumes_ml)) if self.sample_volumes_ml else 0.0

    @property
    def outlined_volume_ml(self) -> float:
        """The volume of ``tumour_mask`` (what the SEG and RTSTRUCT outline): smaller than the
        samples' mean volume when the samples disagree on where the tumour is."""
        voxel_ml = float(np.prod(self.tumour_mask.spacing)) / 1000.0
        return float(np.count_nonzero(self.tumour_mask.array)) * voxel_ml

    @property
    def response_category(self) -> str:
        return most_frequent_category(self.response_probabilities, self.mean_volume_category)


def most_frequent_category(probabilities: Mapping[str, float], tie_break: str | None) -> str:
    """The response category most samples fall in. When several are equally frequent (two
    samples each of four, say), ``tie_break`` (the category of the mean predicted volume, the
    one the reported relative change belongs to) if it is one of them, else the first of them in
    :data:`RESPONSE_CATEGORIES` order."""
    top = max(probabilities.values())
    tied = [c for c in RESPONSE_CATEGORIES if math.isclose(probabilities.get(c, 0.0), top)]
    if tie_break in tied:
        return str(tie_break)
    return tied[0]


@dataclass(frozen=True)
class PlaneLattice:
    """Parallel planes a regular step apart, in one frame of reference (LPS mm): those whose
    points ``p`` have ``normal @ p == position + m * step`` for an integer ``m``. The slices of
    the series a structure set was drawn on (the planning CT's), found from its contours."""

    normal: tuple[float, float, float]  # unit vector
    position: float  # one plane's position along ``normal``
    step: float  # > 0

    def plane_at(self, position: float) -> int:
        """The number ``m`` of the plane nearest to ``position`` along the normal."""
        return round((position - self.position) / self.step)


@dataclass(frozen=True)
class FrameMapping:
    """Another frame of reference the study's data relate to: ``matrix`` (4x4) maps a point of
    the T1-Gd's frame into ``frame_of_reference_uid`` (e.g. the planning CT's). ``planes``: the
    planes the structure set drawn on that frame lies on (the planning CT's slices), when they
    are known; contours written back onto the frame go on them."""

    frame_of_reference_uid: str
    matrix: npt.NDArray[np.float64]
    planes: PlaneLattice | None = None


@dataclass(frozen=True)
class StudyInputs:
    """What a predictor needs from one study, every volume on the source T1-Gd grid.

    ``tumour_mask`` is the GTV from the RT structure set (boolean); ``dose`` is the planned dose
    in Gy when an RT Dose was received; ``flair`` / ``t2`` / ``t1`` are present when received.
    ``planning_frame``: the frame the structure set was drawn on, when it is not the T1-Gd's
    (the planning CT's, related by a Spatial Registration).
    """

    t1c: Volume
    tumour_mask: Volume
    flair: Volume | None = None
    t2: Volume | None = None
    t1: Volume | None = None
    dose: Volume | None = None
    survival_class: str | None = None
    planning_frame: FrameMapping | None = None
