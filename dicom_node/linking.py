"""RT objects from another study of the same patient.

A planning system keeps the structure set, the dose and its registration of the MR in the
planning CT's study, not in the MR study: routed to the node they arrive as two studies. When a
study has a T1-Gd but no structure set, the assembler looks for the patient's other studies
(same patient key) received within ``assembly.link_rt_days`` that hold an RT Structure Set, and
uses the newest one whose structure set is on the T1-Gd's frame of reference or on a frame a
Spatial Registration of that study (or of the MR study) relates to it: its RTSTRUCT, RTDOSE and
REG series join the MR study's job. The frame check is what ties the two studies to one
patient and one plan (frames of reference are unique), beyond the patient key. When the RT
study arrives after the MR study, the MR studies it links to are reopened and assembled again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.convert.spatial_registration import (
    SPATIAL_REGISTRATION_SOP_CLASS,
    read_spatial_registration,
)
from dicom_node.errors import GlioforecastError
from dicom_node.jobs import JobStore, SeriesSummary
from dicom_node.roles import ranked_candidates
from dicom_node.settings import RoleSettings

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
RT_CLASSES = (RTSTRUCT_SOP_CLASS, RTDOSE_SOP_CLASS, SPATIAL_REGISTRATION_SOP_CLASS)
RT_ROLES = ("rtstruct", "rtdose")  # the roles RT objects take
MR_CLASSES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1")


def _structure_frames(path: Path) -> set[str]:
    ds = dcmread(path, stop_before_pixels=True)
    frames = {
        str(item.get("FrameOfReferenceUID", ""))
        for item in ds.get("ReferencedFrameOfReferenceSequence", [])
    }
    frames |= {
        str(item.get("ReferencedFrameOfReferenceUID", ""))
        for item in ds.get("StructureSetROISequence", [])
    }
    return frames - {""}


def _registered_groups(paths: Sequence[Path]) -> list[set[str]]:
    groups = []
    for path in paths:
        try:
            reg = read_spatial_registration(path)
        except GlioforecastError as exc:
            log.warning("linking: registration %s not used: %s", path.name, exc)
            continue
        groups.append({reg.frame_of_reference_uid, *reg.matrices})
    return groups


def frames_related(
    image_frames: set[str], structure_sets: Sequence[Path], registrations: Sequence[Path]
) -> bool:
    """True when one of ``structure_sets`` is on one of ``image_frames``, or on a frame that
    one of ``registrations`` relates to one of them."""
    try:
        frames: set[str] = set()
        for path in structure_sets:
            frames |= _structure_frames(path)
    except (OSError, ValueError, InvalidDicomError) as exc:
        log.warning("linking: a structure set cannot be read: %s", exc)
        return False
    if frames & image_frames:
        return True
    return any(g & frames and g & image_frames for g in _registered_groups(registrations))


class Linker:
    """Decides which RT series of the patient's other studies a study's job uses."""

    def __init__(self, store: JobStore, spool_root: Path) -> None:
        self.store = store
        self.spool_root = spool_root

    def _paths(self, series: Sequence[SeriesSummary], sop_class: str) -> list[Path]:
        return [
            self.spool_root / rel
            for s in series
            if s.sop_class_uid == sop_class
            for rel in self.store.series_paths(s.series_instance_uid)
        ]

    def related(
        self, image_frames: set[str], rt: Sequence[SeriesSummary], own: Sequence[SeriesSummary]
    ) -> bool:
        """True when a structure set of ``rt`` is on one of ``image_frames`` or on a frame that
        a registration of ``rt`` or ``own`` relates to one of them."""
        return frames_related(
            image_frames,
            self._paths(rt, RTSTRUCT_SOP_CLASS),
            self._paths([*rt, *own], SPATIAL_REGISTRATION_SOP_CLASS),
        )

    def rt_series_for(
        self, study_uid: str, image_frames: set[str], own: Sequence[SeriesSummary], since: float
    ) -> tuple[str, list[SeriesSummary]] | None:
        """(the other study, its RT series) to use for ``study_uid``, or None."""
        for other in self.store.patient_studies(study_uid, since, (RTSTRUCT_SOP_CLASS,)):
            rt = [s for s in self.store.series_of_study(other) if s.sop_class_uid in RT_CLASSES]
            if self.related(image_frames, rt, own):
                return other, rt
        return None

    def mr_studies_for(
        self,
        study_uid: str,
        rt: Sequence[SeriesSummary],
        since: float,
        roles: RoleSettings,
    ) -> list[str]:
        """The patient's MR studies that the RT series ``rt`` of ``study_uid`` relate to: on
        the frame of one of their series that could be their T1-Gd by ``roles``
        (:func:`ranked_candidates`), the frame :meth:`rt_series_for` then links on (a structure
        set on another series' frame reopened the study, which then failed for want of it)."""
        out = []
        for other in self.store.patient_studies(study_uid, since, MR_CLASSES):
            series = self.store.series_of_study(other)
            if any(s.sop_class_uid == RTSTRUCT_SOP_CLASS for s in series):
                continue  # it has a structure set of its own
            images = [s for s in series if s.sop_class_uid in MR_CLASSES]
            frames = {
                s.frame_of_reference_uid for s in ranked_candidates(images, roles).get("t1c", [])
            }
            if self.related(frames - {""}, rt, series):
                out.append(other)
        return out
