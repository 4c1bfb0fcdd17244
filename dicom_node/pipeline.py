"""One job from spool to output objects: convert -> predict -> build the DICOM objects.

Every step raises the project's own errors with a reason; the worker records that reason on the
job. Volumes cross into the predictor and into ``sr_writer`` as typed objects, never as datasets.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node import __version__
from dicom_node.convert.dose_choice import choose_course_dose
from dicom_node.convert.geometry import resample, same_grid
from dicom_node.convert.rtdose import dose_on_grid
from dicom_node.convert.rtstruct import choose_structure_set, load_placed_rtstruct_mask
from dicom_node.convert.series import load_series, refuse_blank
from dicom_node.convert.spatial_registration import (
    SPATIAL_REGISTRATION_SOP_CLASS,
    FrameRegistration,
    frame_transform,
    load_registrations,
)
from dicom_node.errors import ConversionError, InputError
from dicom_node.jobs import JobSeries, JobStore, SeriesSummary
from dicom_node.roles import IMAGE_ROLES, describe, ranked_candidates
from dicom_node.settings import Settings
from dicom_node.types import (
    PatientStudy,
    Prediction,
    SeriesRef,
    StudyInputs,
    Volume,
)
from sr_writer.labels import lossy_history
from sr_writer.outputs import JobInputs, OutputOptions, build_outputs
from sr_writer.secondary_capture import Window

log = logging.getLogger(__name__)

OPTIONAL_CONTRASTS = IMAGE_ROLES[1:]  # flair, t2, t1


@dataclass(frozen=True)
class SeriesFiles:
    """Another series matching a role, to try when the one chosen cannot be converted."""

    series_instance_uid: str
    label: str  # how messages name it, e.g. "series 9 'T1 MPRAGE +C' (MR Image Storage, ...)"
    files: tuple[Path, ...]


#: told which other series a role took, why the one chosen could not be used, and the series
#: tried before it with their reasons
FallbackHook = Callable[[str, SeriesFiles, str, Sequence[tuple[SeriesFiles, str]]], None]


def skipped_text(skipped: Sequence[tuple[SeriesFiles, str]]) -> str:
    """ "; <series> cannot be used either (<why>)" for each series a fallback passed over."""
    return "".join(f"; {other.label} cannot be used either ({why})" for other, why in skipped)


def _first_usable(
    role: str,
    files: Sequence[Path],
    fallbacks: Sequence[SeriesFiles],
    load: Callable[[Sequence[Path]], Volume],
    on_fallback: FallbackHook,
    label: str = "",
) -> Volume:
    """``load(files)``; when that raises an input error, the first of ``fallbacks`` that
    loads (``on_fallback`` is told), else the first error with every other series' error.
    ``label``: how messages name the series of ``files`` (:func:`dicom_node.roles.describe`);
    the error raised then starts with it, so that the job's reason and its failure notice say
    which series could not be used."""
    try:
        return load(files)
    except InputError as first:
        refused: list[tuple[SeriesFiles, str]] = []
        for other in fallbacks:
            try:
                volume = load(other.files)
            except InputError as exc:
                refused.append((other, str(exc)))
                continue
            on_fallback(role, other, str(first), refused)
            return volume
        if not refused and not label:
            raise
        kind = ConversionError if isinstance(first, ConversionError) else InputError
        reason = f"{role} {label}: {first}" if label else str(first)
        if refused:
            reason += f"; the other series matching {role} cannot be used either: " + "; ".join(
                f"{other.label}: {why}" for other, why in refused
            )
        raise kind(reason) from first


def instance_numbers(headers: Sequence[Dataset]) -> dict[str, int]:
    """The InstanceNumber of each instance by SOP Instance UID, where it has a readable one."""
    numbers = {}
    for ds in headers:
        try:
            numbers[str(ds.SOPInstanceUID)] = int(ds.InstanceNumber)
        except (AttributeError, TypeError, ValueError):  # absent, empty or not a number
            continue
    return numbers


def volume_ml(mask: Volume) -> float:
    """The volume of a boolean mask, in millilitres."""
    return float(np.count_nonzero(mask.array)) * math.prod(mask.spacing) / 1000.0


class Predictor(Protocol):
    name: str
    version: str

    def predict(self, inputs: StudyInputs, samples: int = 4) -> Prediction: ...


@dataclass(frozen=True)
class JobResult:
    objects: list[Dataset]
    series: int
    # the objects by kind (dicom_node.types.OUTPUT_KINDS), for the destinations that take some
    by_kind: dict[str, list[Dataset]]
    prediction: Prediction
    seconds: float


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def patient_study(ds: Dataset) -> PatientStudy:
    """Patient and study attributes copied into the outputs (same patient, same study)."""
    return PatientStudy(
        study_instance_uid=str(ds.StudyInstanceUID),
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        study_id=_text(ds, "StudyID"),
        accession_number=_text(ds, "AccessionNumber"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        study_description=_text(ds, "StudyDescription"),
        specific_character_set=_text(ds, "SpecificCharacterSet") or "ISO_IR 192",
    )


#: BodyPartExamined values (PS3.16 CID 4031 and what scanners write) of a series that is not of
#: the head: a model trained on brain MRI would predict and label a "brain" for it. A value not
#: listed (HEAD, BRAIN, a scanner's own word, none) is taken as the head's: the attribute is
#: often wrong or free text, and refusing a brain study for it would be worse
NOT_THE_HEAD = frozenset(
    [
        "ABDOMEN",
        "ABDOMENPELVIS",
        "ANKLE",
        "ARM",
        "BREAST",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CLAVICLE",
        "COCCYX",
        "CSPINE",
        "ELBOW",
        "EXTREMITY",
        "FEMUR",
        "FOOT",
        "FOREARM",
        "HAND",
        "HEART",
        "HIP",
        "HUMERUS",
        "KIDNEY",
        "KNEE",
        "LEG",
        "LIVER",
        "LSPINE",
        "LUNG",
        "PANCREAS",
        "PELVIS",
        "PROSTATE",
        "SHOULDER",
        "SPINE",
        "THIGH",
        "TSPINE",
        "WRIST",
    ]
)


def not_the_head(ds: Dataset, series: SeriesSummary) -> str:
    """Why the T1-Gd is not of the head, by its BodyPartExamined ('' when it may be)."""
    part = _text(ds, "BodyPartExamined").strip().upper()
    if part not in NOT_THE_HEAD:
        return ""
    return (
        f"the T1-Gd series {series.series_number} '{series.series_description}' is of the "
        f"{part.lower()} (BodyPartExamined {part}): expected a brain MRI, which is all the "
        "model was trained on; no prediction is made for another body part"
    )


def window_of(ds: Dataset) -> Window | None:
    """The source's first display window, when it has one."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        c = float(center[0] if isinstance(center, Sequence) else center)
        w = float(width[0] if isinstance(width, Sequence) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return Window(center=c, width=w) if w > 0 else None


def series_ref(js: JobSeries, sop_instance_uids: Sequence[str]) -> SeriesRef:
    return SeriesRef(
        series_instance_uid=js.series.series_instance_uid,
        sop_class_uid=js.series.sop_class_uid,
        sop_instance_uids=tuple(dict.fromkeys(sop_instance_uids)),
        modality=js.series.modality,
        series_description=js.series.series_description,
        series_number=js.series.series_number,
        study_instance_uid=js.series.study_instance_uid,
    )


def on_grid(volume: Volume, reference: Volume, what: str) -> Volume:
    """``volume`` on ``reference``'s grid (resampled when needed; same frame of reference)."""
    if volume.frame_of_reference_uid != reference.frame_of_reference_uid:
        raise ConversionError(
            f"{what} is on frame of reference {volume.frame_of_reference_uid} but the T1-Gd is "
            f"on {reference.frame_of_reference_uid}; expected the same frame of reference"
        )
    if same_grid(volume, reference):
        return volume
    return reference.with_array(resample(volume, reference, order=1, output_dtype=np.float32))


def course_dose_on_grid(
    paths: Sequence[Path],
    t1c: Volume,
    registrations: Sequence[FrameRegistration],
    target: Volume | None = None,
) -> Volume:
    """The sum of the RT Doses of ``paths`` on the T1-Gd's grid (one path: its dose); each
    dose grid must hold the whole ``target`` (the GTV) when given."""
    doses = [dose_on_grid(p, t1c, registrations, target) for p in paths]
    if len(doses) == 1:
        return doses[0]
    return t1c.with_array(np.sum([d.array for d in doses], axis=0, dtype=np.float32))


def _with_contrast(
    role: str, load: Callable[[Sequence[Path]], Volume]
) -> Callable[[Sequence[Path]], Volume]:
    """``load``, refusing a blank image (one value throughout: a failed export, a placeholder
    series) as it refuses one it cannot convert, so that the next series of the role is tried."""

    def loaded(paths: Sequence[Path]) -> Volume:
        volume = load(paths)
        refuse_blank(volume, role, "the series")
        return volume

    return loaded


def _on_grid_of(t1c: Volume, role: str) -> Callable[[Sequence[Path]], Volume]:
    """A loader of a ``role`` series onto the T1-Gd's grid."""
    return lambda paths: on_grid(load_series(paths), t1c, role)


def placeable_on(
    t1c_frame: str, registrations: Sequence[Path]
) -> Callable[[str], str | None] | None:
    """For :func:`choose_structure_set`: why a contour on a frame of reference cannot be placed
    on a T1-Gd on ``t1c_frame`` (None when it can: that frame, or one the Spatial Registrations
    relate to it). None when that cannot be told before conversion (no T1-Gd frame, or a
    registration that cannot be read: conversion says why)."""
    if not t1c_frame:
        return None
    try:
        regs = load_registrations(registrations)
    except ConversionError:
        return None

    def why_not(frame: str) -> str | None:
        try:
            frame_transform(regs, frame, t1c_frame, "its GTV")
        except ConversionError:
            return (
                f"its GTV is on frame of reference {frame}, which is not the T1-Gd's and no "
                "Spatial Registration received relates to it"
            )
        return None

    return why_not


def assemble_inputs(
    files: Mapping[str, Sequence[Path]],
    roi_pattern: str,
    warn: Callable[[str], None],
    registrations: Sequence[Path] = (),
    fallbacks: Mapping[str, Sequence[SeriesFiles]] | None = None,
    on_fallback: FallbackHook | None = None,
    roi_union: bool = False,
    labels: Mapping[str, str] | None = None,
) -> StudyInputs:
    """The model's inputs from a study's files by series role (``t1c`` and ``rtstruct``
    required): the T1-Gd is the grid, the RTSTRUCT ROI matching ``roi_pattern`` the tumour
    mask, the optional contrasts and the RT dose resampled onto it. A structure set or dose on
    another frame of reference (the planning CT's) is placed on the T1-Gd's by the study's
    Spatial Registration objects (``registrations``, read only then). ``files["rtdose"]`` are the
    RT Dose instances that make the course's dose (:func:`dicom_node.convert.dose_choice.
    choose_course_dose`), summed on the T1-Gd's grid. When an image role's series
    cannot be converted, its ``fallbacks`` (the other series matching the role, in the order of
    :func:`dicom_node.roles.ranked_candidates`) are tried, and ``on_fallback`` is told which one
    was used and why (default: ``warn``). An optional contrast that cannot be used does not stop
    the study: ``warn`` is told why. With ``roi_union``, several ROIs matching ``roi_pattern``
    make one tumour mask (their union). ``labels``: how messages name the series of each role
    (:func:`dicom_node.roles.describe`); an image series that cannot be converted is named by
    it in the error (the job's reason, its failure notice). The node's jobs and the training
    data read from DICOM (``inference.dicom_cohort``) both go through here."""
    missing = [role for role in ("t1c", "rtstruct") if role not in files]
    if missing:
        raise InputError(f"expected series with the roles t1c and rtstruct, missing {missing}")
    others = fallbacks or {}

    def told(
        role: str, used: SeriesFiles, why: str, skipped: Sequence[tuple[SeriesFiles, str]]
    ) -> None:
        warn(
            f"{role}: the series chosen cannot be used ({why}){skipped_text(skipped)}; "
            f"{used.label} is used"
        )

    hook = on_fallback or told
    named = labels or {}
    t1c = _first_usable(
        "t1c", files["t1c"], others.get("t1c", ()), _with_contrast("t1c", load_series), hook,
        named.get("t1c", ""),
    )  # fmt: skip
    regs = load_registrations(registrations) if registrations else []
    mask, planning = load_placed_rtstruct_mask(
        files["rtstruct"][0], t1c, roi_pattern, registrations=regs, combine=roi_union
    )
    optional: dict[str, Volume] = {}
    for role in OPTIONAL_CONTRASTS:
        if role not in files:
            continue
        try:
            optional[role] = _first_usable(
                role, files[role], others.get(role, ()),
                _with_contrast(role, _on_grid_of(t1c, role)), hook, named.get(role, ""),
            )  # fmt: skip
        except InputError as exc:  # ConversionError included
            warn(f"{role} not used: {exc}")
    dose = course_dose_on_grid(files["rtdose"], t1c, regs, mask) if "rtdose" in files else None
    return StudyInputs(
        t1c=t1c,
        tumour_mask=mask,
        flair=optional.get("flair"),
        t2=optional.get("t2"),
        t1=optional.get("t1"),
        dose=dose,
        planning_frame=planning,
    )


@dataclass
class _JobView:
    """What one run of the pipeline knows of its job: its series (``chosen``: by role, updated
    as choices are made), their instances (series UID -> (SOP Instance UID, spool path)) and the
    series matching each role, best first (:func:`ranked_candidates`)."""

    job_id: int
    job_series: list[JobSeries]
    chosen: dict[str, JobSeries]
    instances: dict[str, list[tuple[str, str]]]
    candidates: dict[str, list[SeriesSummary]]

    def by_uid(self, series_uid: str) -> JobSeries:
        return next(js for js in self.job_series if js.series.series_instance_uid == series_uid)


def mixed_patients(patients: dict[str, set[str]], view: _JobView) -> str:
    """Why a study whose instances name more than one patient gets no prediction. The series of
    each patient but the one most series name are listed (the patients never: the reason
    reaches the logs)."""

    def number(uid: str) -> tuple[int, str]:
        found = view.by_uid(uid).series.series_number
        return (-1 if found is None else found, uid)

    groups = sorted((sorted(uids, key=number) for uids in patients.values()),
                    key=lambda g: (-len(g), number(g[0])))  # fmt: skip
    rest = len(groups[0])
    named = "; ".join(
        " and ".join(describe(view.by_uid(uid).series) for uid in group)
        + f" name{'s' if len(group) == 1 else ''} another patient than the other {rest} series"
        for group in groups[1:]
    )
    return (
        f"the study's instances name {len(patients)} different patients (their Patient ID or "
        f"Issuer of Patient ID differ): {named}; no prediction is made from the images of more "
        "than one patient. Correct the patient of the misfiled series (at the scanner, the "
        "planning system or the PACS) and send it again: a corrected copy replaces the one the "
        "node holds, and the study is predicted again"
    )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        spool_root: Path,
        predictor: Predictor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool_root = spool_root
        self.predictor = predictor

    def run(self, job_id: int) -> JobResult:
        """Build the output objects of a job; raises the project's errors with a reason."""
        start = time.monotonic()
        job = self.store.get_job(job_id)
        if job is None:
            raise InputError(self.store.no_such_job(job_id))
        job_series = self.store.job_series(job_id)
        view = _JobView(
            job_id,
            job_series,
            {js.role: js for js in job_series if js.role},
            self.store.job_instances(job_id),
            ranked_candidates([js.series for js in job_series], self.settings.roles),
        )
        series, instances = view.chosen, view.instances
        patients = self.store.job_patients(job_id)
        if len(patients) > 1:
            raise InputError(mixed_patients(patients, view))

        def files(role: str) -> list[Path]:
            members = instances.get(series[role].series.series_instance_uid, [])
            return [self.spool_root / rel for _, rel in members]

        def ref(role: str, volume: Volume | None = None) -> SeriesRef:
            if volume is not None:  # slice order, as the outputs reference them
                return series_ref(series[role], volume.source_instance_uids)
            members = instances.get(series[role].series.series_instance_uid, [])
            return series_ref(series[role], [uid for uid, _ in members])

        reg_series = [
            js for js in job_series if js.series.sop_class_uid == SPATIAL_REGISTRATION_SOP_CLASS
        ]
        registrations = [
            self.spool_root / rel
            for js in reg_series
            for _, rel in instances.get(js.series.series_instance_uid, [])
        ]

        def fall_back(
            role: str, used: SeriesFiles, why: str, skipped: Sequence[tuple[SeriesFiles, str]]
        ) -> None:
            before = series[role].series
            series[role] = JobSeries(view.by_uid(used.series_instance_uid).series, role, "")
            not_used = [(before.series_instance_uid, why)]
            not_used += [(other.series_instance_uid, r) for other, r in skipped]
            self.store.update_series(
                job_id,
                [
                    *((uid, "", f"matches {role}, not used: {r}") for uid, r in not_used),
                    (used.series_instance_uid, role, "used: the series chosen first could not "
                     "be converted"),
                ],
                "fallback",
                f"{role}: {describe(before)} cannot be used ({why}){skipped_text(skipped)}; "
                f"{used.label}, the next series that matches {role}, is used instead",
            )  # fmt: skip

        role_files = {role: files(role) for role in series}
        dose_refs: list[SeriesRef] = []
        structure_uid = ""
        if "rtstruct" in series:  # else assemble_inputs says what is missing
            structure_uid, structure = self._structure_set(view, registrations)
            role_files["rtstruct"] = [structure]
        if "rtdose" in series:
            role_files["rtdose"], dose_refs = self._course_dose(view)
        inputs = assemble_inputs(
            role_files,
            self.settings.roles.roi_pattern,
            lambda message: self.store.add_event(job_id, "warning", message, once=True),
            registrations,
            fallbacks=self._fallbacks(view),
            on_fallback=fall_back,
            roi_union=self.settings.roles.roi_union,
            # a series that cannot be converted is named in the job's reason and its notice
            labels={role: describe(js.series) for role, js in series.items()},
        )
        unused = [r for r in OPTIONAL_CONTRASTS if r in series and getattr(inputs, r) is None]
        for role in unused:  # why is in the job's warning
            self.store.update_series(
                job_id,
                [(series.pop(role).series.series_instance_uid, "", f"matches {role}, not used")],
                "",
                "",
            )
        t1c = inputs.t1c
        header = dcmread(files("t1c")[0], stop_before_pixels=True)
        elsewhere = not_the_head(header, series["t1c"].series)
        if elsewhere:
            raise InputError(elsewhere)
        prediction = self.predictor.predict(inputs)
        others = [series_ref(series["rtstruct"], [structure_uid]), *dose_refs]
        others += [ref(role) for role in OPTIONAL_CONTRASTS if role in series]
        # the study's Spatial Registrations were at hand to place the GTV and the dose
        others += [
            series_ref(js, [uid for uid, _ in instances.get(js.series.series_instance_uid, [])])
            for js in reg_series
        ]
        headers = {
            role: [dcmread(path, stop_before_pixels=True) for path in files(role)]
            for role in ("t1c", *OPTIONAL_CONTRASTS)
            if role in series
        }
        job_inputs = JobInputs(
            patient=patient_study(header),
            t1c=t1c,
            t1c_series=ref("t1c", t1c),
            other_series=tuple(others),
            planning_frame=inputs.planning_frame,
            window=window_of(header),
            lossy=lossy_history(ds for role_headers in headers.values() for ds in role_headers),
            study_version=job.version,
            t1c_instance_numbers=instance_numbers(headers["t1c"]),
            gtv_volume_ml=volume_ml(inputs.tumour_mask),
        )
        chosen = self.settings.outputs
        options = OutputOptions(
            node_version=__version__,
            uncertainty_sc=chosen.uncertainty_sc,
            derived_mr=chosen.derived_mr,
            institution_name=chosen.institution_name or None,
        )
        outputs = build_outputs(prediction, job_inputs, options)
        return JobResult(
            objects=outputs.all(),
            series=len(outputs.series_counts()),
            by_kind=outputs.by_kind(),
            prediction=prediction,
            seconds=time.monotonic() - start,
        )

    def _pool(
        self, view: _JobView, role: str
    ) -> tuple[list[SeriesSummary], list[tuple[str, str, Path]]]:
        """Every series of the job matching ``role`` (best first), and their instances as
        (Series Instance UID, SOP Instance UID, path)."""
        chosen = [view.chosen[role].series] if role in view.chosen else []
        pool = list(view.candidates.get(role) or chosen)
        members = [
            (s.series_instance_uid, uid, self.spool_root / rel)
            for s in pool
            for uid, rel in view.instances.get(s.series_instance_uid, [])
        ]
        return pool, members

    def _record_choice(
        self, view: _JobView, role: str, pool: Sequence[SeriesSummary], used: Sequence[str],
        kind: str, note: str,
    ) -> None:  # fmt: skip
        """When a choice was made (``note``), give ``role`` to the series ``used`` (the first
        becomes the role's series for the rest of the run) and take it from the others of
        ``pool``, with an event of ``kind``."""
        view.chosen[role] = view.by_uid(used[0])
        if not note:
            return
        changes = [
            (s.series_instance_uid, role, f"used (see the job's {kind} event)")
            if s.series_instance_uid in used
            else (s.series_instance_uid, "", f"matches {role}, not used (see the {kind} event)")
            for s in pool
        ]
        self.store.update_series(view.job_id, changes, kind, note)

    def _structure_set(self, view: _JobView, registrations: Sequence[Path]) -> tuple[str, Path]:
        """The structure set to read the GTV from, out of every series matching ``rtstruct``
        (:func:`choose_structure_set`), as (SOP Instance UID, path); the job's series roles and
        an ``rtstruct`` event say which when there was a choice."""
        pool, members = self._pool(view, "rtstruct")
        choice = choose_structure_set(
            [p for _, _, p in members],
            self.settings.roles.roi_pattern,
            placeable_on(
                view.chosen["t1c"].series.frame_of_reference_uid if "t1c" in view.chosen else "",
                registrations,
            ),
        )
        used_series, uid, path = next(m for m in members if m[2] == choice.path)
        self._record_choice(view, "rtstruct", pool, [used_series], "rtstruct", choice.note)
        return uid, path

    def _course_dose(self, view: _JobView) -> tuple[list[Path], list[SeriesRef]]:
        """The RT Dose instances that make the course's dose, out of every series matching
        ``rtdose``, checked against every series matching ``rtplan`` (:func:`choose_course_dose`),
        and their references by series; the job's series roles and a ``dose`` event say which
        were used when there was a choice."""
        pool, members = self._pool(view, "rtdose")
        plans = [p for _, _, p in self._pool(view, "rtplan")[1]]
        choice = choose_course_dose([p for _, _, p in members], plans)
        used = list(dict.fromkeys(d.series_instance_uid for d in choice.used))
        self._record_choice(view, "rtdose", pool, used, "dose", choice.note)
        refs = [
            series_ref(
                view.by_uid(uid),
                [d.sop_instance_uid for d in choice.used if d.series_instance_uid == uid],
            )
            for uid in used
        ]
        return list(choice.paths), refs

    def _fallbacks(self, view: _JobView) -> dict[str, list[SeriesFiles]]:
        """For each image role used, the other series of the job matching it, in the order to
        try them (none with ``roles.on_ambiguous: fail``)."""
        if self.settings.roles.on_ambiguous != "latest":
            return {}
        out: dict[str, list[SeriesFiles]] = {}
        for role in IMAGE_ROLES:
            if role not in view.chosen:
                continue
            used = view.chosen[role].series.series_instance_uid
            out[role] = [
                SeriesFiles(
                    s.series_instance_uid,
                    describe(s),
                    tuple(
                        self.spool_root / rel for _, rel in view.instances[s.series_instance_uid]
                    ),
                )
                for s in view.candidates.get(role, [])
                if s.series_instance_uid != used and view.instances.get(s.series_instance_uid)
            ]
        return out
