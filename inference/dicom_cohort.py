"""Studies and cohort patients from DICOM files, as the node stores them.

One folder of DICOM files in any layout (the node's spool ``<study>/<series>/<sop>.dcm``, a PACS
export, ``glioforecast synth --format dicom``) is indexed by its headers: patient, study, series.
A pre-treatment study is read exactly as the node reads a routed study: series roles from the
node's rules (the embedded default, or the file in ``$GLIOFORECAST_CONFIG``), the T1-Gd as the
reference grid, the tumour from the RT structure set, the other contrasts and the RT dose
resampled onto it (:func:`study_inputs_from_series`, also behind ``glioforecast predict``).

A *DICOM site folder* for training and evaluation holds the outcome table ``cohort.csv`` (the
columns :func:`inference.data.read_cohort` reads: ``patient_id``, ``site``, ``survival_class``,
``response_category``) and the DICOM files anywhere beneath it (a link to the node's spool
works). Each patient of the table, matched by PatientID, needs

- the pre-treatment study: its MR series and RT structure set (RT dose optional), plus a DICOM
  Segmentation by a reader with an *enhancing tumour* segment (the joint mask channel learns it);
- a follow-up study, later than it, with a T1-Gd series and a reader's Segmentation with an
  *enhancing lesion* segment (tumour and treatment-related enhancement, as a reader outlines it)
  and, optionally, a *necrosis* segment (with the GTV, the evaluation's tumour region); or, as a
  radiotherapy department contours a recurrence, an RT structure set with ROIs so named (an
  ROI without contours is an empty outline). A structure set whose ROIs name an enhancing
  lesion and none the node's GTV pattern is such an outline, never a plan.

Segments and ROIs are found by their label (:data:`ENHANCING_SEGMENT`, :data:`NECROSIS_SEGMENT`);
of several reader Segmentations in a study the latest is used (a Segmentation before a
structure set), and the node's own outputs sent back with a study (labelled series: predicted
SEG and RTSTRUCT) are never read as a reader's.
A follow-up on the pre-treatment frame of reference (registered to it already) is read as it
is; one on a frame of reference of its own, as a follow-up session gives it, is registered
rigidly onto the pre-treatment T1-Gd and placed in its frame (:mod:`inference.registration`),
or refused, with the figures, when the registration is not plausible: its images are compared
voxel by voxel with the prediction. When a patient has several
candidate studies, the optional columns ``pre_study_uid`` and ``post_study_uid`` choose.
Problems are collected for every patient and reported together; nothing is skipped silently.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dicom_node.convert.geometry import resample
from dicom_node.convert.spatial_registration import SPATIAL_REGISTRATION_SOP_CLASS
from dicom_node.errors import GlioforecastError, InputError
from dicom_node.jobs import SeriesSummary
from dicom_node.settings import Settings, load_settings
from dicom_node.types import StudyInputs, Volume
from inference.registration import register_rigid

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: segment labels read as the enhancing tumour (pre-treatment) or lesion (follow-up)
ENHANCING_SEGMENT = re.compile(r"(?i)^(?!.*non[- ]?enhanc).*enhanc")
#: segment labels read as necrosis / non-enhancing core
NECROSIS_SEGMENT = re.compile(r"(?i)necro|non[- ]?enhanc")


# ------------------------------------------------------------------------------------------
# header index


@dataclass(frozen=True)
class DicomSeries:
    summary: SeriesSummary
    files: tuple[Path, ...]

    @property
    def uid(self) -> str:
        return self.summary.series_instance_uid


@dataclass(frozen=True)
class DicomStudy:
    study_instance_uid: str
    patient_id: str
    when: str  # StudyDate + StudyTime (YYYYMMDDHHMMSS), for ordering
    series: tuple[DicomSeries, ...]

    def of_class(self, sop_class_uid: str) -> list[DicomSeries]:
        return [s for s in self.series if s.summary.sop_class_uid == sop_class_uid]

    def reader_segmentation(self) -> Path | None:
        """The Segmentation a reader made in this study: the latest (highest series number) of
        those that are not glioforecast's own predictions sent back with the study."""
        return self._latest_reader(self.of_class(SEGMENTATION_STORAGE), "Segmentations")

    def follow_up_outline(self) -> Path | None:
        """The reader's outline of a follow-up study: its Segmentation, else the latest RT
        structure set with an ROI named like the enhancing lesion (:data:`ENHANCING_SEGMENT`),
        as a radiotherapy department contours a recurrence."""
        seg = self.reader_segmentation()
        if seg is not None:
            return seg

        def outline(path: Path) -> bool:
            return any(ENHANCING_SEGMENT.search(n) for n in roi_names(path))

        outlines = [
            replace(s, files=tuple(f for f in s.files if outline(f)))
            for s in self.of_class(RTSTRUCT_STORAGE)
            if any(map(outline, s.files))
        ]
        return self._latest_reader(outlines, "RT structure sets with an enhancing ROI")

    def _latest_reader(self, series: Sequence[DicomSeries], what: str) -> Path | None:
        """The first file of the latest of ``series`` that is not one of glioforecast's own
        outputs sent back with the study (the caller keeps only the files it can read)."""
        from sr_writer.labels import is_labelled_description

        readers = [s for s in series if not is_labelled_description(s.summary.series_description)]
        if not readers:
            return None
        if len(readers) > 1:
            log.info(
                "%s: %d reader %s, the latest (series %s) is used",
                self.describe(),
                len(readers),
                what,
                readers[-1].summary.series_number,
            )
        return readers[-1].files[0]

    @property
    def images(self) -> list[DicomSeries]:
        """The series other than Segmentations (what series roles are assigned to)."""
        return [s for s in self.series if s.summary.sop_class_uid != SEGMENTATION_STORAGE]

    def describe(self) -> str:
        date = f"{self.when[:4]}-{self.when[4:6]}-{self.when[6:8]}" if self.when else "no date"
        return f"study {self.study_instance_uid} ({date}, {len(self.series)} series)"


def _dicom_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` (following links, as a linked spool is), hidden ones and the
    spool's partial ``.part`` files left out."""
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and not name.endswith(".part"):
                yield Path(folder) / name


def index_dicom(root: str | Path) -> dict[str, list[DicomStudy]]:
    """Every DICOM file under ``root`` by patient ID, then study (ordered by date), then series.

    Files that are not DICOM are skipped (logged at debug level); DICOM files the node could
    not file (no SOP, study or series UID) are skipped with a warning naming them."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_node.instance import InstanceInfo

    root = Path(root)
    files: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    infos: dict[tuple[str, str, str], list[InstanceInfo]] = defaultdict(list)
    when: dict[tuple[str, str], str] = {}
    for path in _dicom_files(root):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            log.debug("not DICOM, skipped: %s", path)
            continue
        try:
            ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if ds.file_meta else ""
            info = InstanceInfo.from_dataset(ds, ts, b"dicom-index")
        except GlioforecastError as exc:
            log.warning("DICOM file %s skipped: %s", path, exc)
            continue
        patient = str(ds.get("PatientID", "") or "")
        key = (patient, info.study_instance_uid, info.series_instance_uid)
        files[key].append(path)
        infos[key].append(info)
        when.setdefault(
            key[:2], f"{ds.get('StudyDate', '') or ''}{ds.get('StudyTime', '') or ''}"[:14]
        )
    studies: dict[tuple[str, str], list[DicomSeries]] = defaultdict(list)
    for key, members in infos.items():
        first = members[0]
        summary = SeriesSummary(
            series_instance_uid=first.series_instance_uid,
            sop_class_uid=first.sop_class_uid,
            modality=first.modality,
            series_number=first.series_number,
            series_description=first.series_description,
            protocol_name=first.protocol_name,
            sequence_name=first.sequence_name,
            contrast_agent=any(m.contrast_agent for m in members),
            frame_of_reference_uid=first.frame_of_reference_uid,
            instance_count=len(members),
            last_received_at=0.0,
            image_type=",".join(sorted({m.image_type for m in members if m.image_type})),
        )
        studies[key[:2]].append(DicomSeries(summary, tuple(files[key])))
    out: dict[str, list[DicomStudy]] = defaultdict(list)
    for (patient, study_uid), series in studies.items():
        ordered = sorted(series, key=lambda s: (s.summary.series_number or 0, s.uid))
        out[patient].append(
            DicomStudy(study_uid, patient, when[(patient, study_uid)], tuple(ordered))
        )
    for patient_studies in out.values():
        patient_studies.sort(key=lambda s: (s.when, s.study_instance_uid))
    return dict(out)


# ------------------------------------------------------------------------------------------
# one study as the node reads it


@dataclass(frozen=True)
class StudyRoles:
    """The series each role of a study was read from (the RT dose of a course may take several),
    and the notes on how they were chosen: another series matching a role, a series left out, a
    series that could not be converted, the structure set or dose used. The node records these
    in the job; offline they are shown and written beside the prediction."""

    series: Mapping[str, tuple[SeriesSummary, ...]]
    notes: tuple[str, ...] = ()

    @property
    def described(self) -> dict[str, str]:
        """Role -> the description of its series."""
        return {role: "; ".join(s.text for s in used) for role, used in self.series.items()}

    def as_json(self) -> dict[str, list[dict[str, object]]]:
        """Role -> its series' number, UID and description."""
        return {
            role: [
                {
                    "series_number": s.series_number,
                    "series_instance_uid": s.series_instance_uid,
                    "description": s.text,
                }
                for s in used
            ]
            for role, used in self.series.items()
        }


def _roles(
    series: Sequence[DicomSeries], settings: Settings, name: str
) -> tuple[dict[str, DicomSeries], list[str]]:
    """The series of each role, and a note for each series the rules passed over or left out
    (another series matching a role, a series of an excluded ImageType)."""
    from dicom_node.roles import assign_roles, describe

    outcome = assign_roles([s.summary for s in series], settings.roles)
    if not outcome.ok:
        raise InputError(f"{name}: " + "; ".join(outcome.problems))
    by_uid = {s.uid: s for s in series}
    by_role = {d.role: by_uid[d.series_instance_uid] for d in outcome.decisions if d.role}
    notes = [
        f"{describe(by_uid[d.series_instance_uid].summary)}, UID {d.series_instance_uid}: {d.note}"
        for d in outcome.decisions
        if d.note
    ]
    return by_role, notes


def study_inputs_from_series(
    series: Sequence[DicomSeries], settings: Settings, name: str
) -> tuple[StudyInputs, StudyRoles]:
    """The node's inputs from the series of one study (roles from ``settings``); also returns
    the series used for each role and the notes on the choices (each logged)."""
    from dicom_node.convert.dose_choice import choose_course_dose
    from dicom_node.convert.rtstruct import choose_structure_set
    from dicom_node.pipeline import SeriesFiles, assemble_inputs, placeable_on, skipped_text
    from dicom_node.roles import IMAGE_ROLES, describe, ranked_candidates

    by_role, notes = _roles(series, settings, name)
    for note in notes:
        log.info("%s: %s", name, note)
    used: dict[str, tuple[SeriesSummary, ...]] = {r: (s.summary,) for r, s in by_role.items()}
    if "t1c" in by_role:  # what the node refuses, offline too
        from pydicom import dcmread

        from dicom_node.pipeline import not_the_head

        t1c = by_role["t1c"]
        elsewhere = not_the_head(dcmread(t1c.files[0], stop_before_pixels=True), t1c.summary)
        if elsewhere:
            raise InputError(f"{name}: {elsewhere}")
    files = {s.uid: s.files for s in series}
    ranked = ranked_candidates([s.summary for s in series], settings.roles)
    fallbacks = {
        role: [
            SeriesFiles(c.series_instance_uid, describe(c), files[c.series_instance_uid])
            for c in ranked.get(role, [])
            if c.series_instance_uid != by_role[role].uid
        ]
        for role in IMAGE_ROLES
        if role in by_role and settings.roles.on_ambiguous == "latest"
    }

    def fall_back(
        role: str, taken: SeriesFiles, why: str, skipped: Sequence[tuple[SeriesFiles, str]]
    ) -> None:
        chosen = describe(by_role[role].summary)
        note = (
            f"{role}: {chosen} cannot be used ({why}){skipped_text(skipped)}; {taken.label}, "
            f"UID {taken.series_instance_uid}, is used"
        )
        log.warning("%s: %s", name, note)
        notes.append(note)
        used[role] = tuple(s.summary for s in series if s.uid == taken.series_instance_uid)

    role_files = {role: s.files for role, s in by_role.items()}
    registrations = [
        f for s in series if s.summary.sop_class_uid == SPATIAL_REGISTRATION_SOP_CLASS
        for f in s.files
    ]  # fmt: skip
    structures = ranked.get("rtstruct") or [by_role["rtstruct"].summary]
    t1c_frame = by_role["t1c"].summary.frame_of_reference_uid if "t1c" in by_role else ""
    structure = choose_structure_set(
        [f for c in structures for f in files[c.series_instance_uid]],
        settings.roles.roi_pattern,
        placeable_on(t1c_frame, registrations),
    )
    role_files["rtstruct"] = (structure.path,)
    used["rtstruct"] = tuple(s.summary for s in series if structure.path in s.files)
    if structure.note:
        log.info("%s: %s", name, structure.note)
        notes.append(structure.note)
    if "rtdose" in by_role:
        pool = ranked.get("rtdose") or [by_role["rtdose"].summary]
        choice = choose_course_dose(
            [f for c in pool for f in files[c.series_instance_uid]],
            [f for c in ranked.get("rtplan", []) for f in files[c.series_instance_uid]],
        )
        role_files["rtdose"] = choice.paths
        used["rtdose"] = tuple(s.summary for s in series if set(s.files) & set(choice.paths))
        if choice.note:
            log.info("%s: %s", name, choice.note)
            notes.append(choice.note)
    inputs = assemble_inputs(
        role_files,
        settings.roles.roi_pattern,
        lambda message: log.warning("%s: %s", name, message),
        registrations,
        fallbacks=fallbacks,
        on_fallback=fall_back,
        roi_union=settings.roles.roi_union,
    )
    return inputs, StudyRoles(used, tuple(notes))


def study_inputs_from_dicom(
    folder: Path, config: Path | None = None
) -> tuple[StudyInputs, StudyRoles]:
    """A DICOM study folder (any depth) as :class:`StudyInputs`: every series found there,
    roles assigned by the node's rules (``config`` or the embedded default); also returns the
    series used for each role and the notes on the choices."""
    patients = index_dicom(folder)
    studies = [s for patient in patients.values() for s in patient]
    if not studies:
        raise InputError(f"DICOM study {folder}: expected DICOM files, found none")

    def listed(chosen: Sequence[DicomStudy]) -> str:
        return "; ".join(
            f"study {s.study_instance_uid}: series "
            + ", ".join(f"{x.summary.series_number} '{x.summary.series_description}'"
                        for x in s.series)
            for s in chosen
        )  # fmt: skip

    if len(patients) > 1:  # as the node, no prediction from the images of two patients
        raise InputError(
            f"DICOM study {folder}: expected the study of one patient, found {len(patients)} "
            f"patients (their Patient IDs differ): {listed(studies)}"
        )
    imaged = [s for s in studies if any(x.summary.modality == "MR" for x in s.series)]
    if len(imaged) > 1:  # a follow-up beside the pre-treatment study, say
        raise InputError(
            f"DICOM study {folder}: expected the MR images of one study (its RT objects may be "
            f"in another, the planning study), found MR series in {len(imaged)} studies: "
            f"{listed(imaged)}; give a folder with one of them"
        )
    series = [s for study in studies for s in study.series]
    return study_inputs_from_series(series, load_settings(config), f"DICOM study {folder}")


# ------------------------------------------------------------------------------------------
# a reader's Segmentation


def segment_masks(path: Path, reference: Volume, name: str) -> dict[str, Volume]:
    """Each segment of a DICOM Segmentation (label -> bool mask) on ``reference``'s grid.

    The Segmentation must be on the reference's frame of reference; its frames are placed by
    their own positions (any slice subset or order) and resampled nearest-neighbour."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises several types for a malformed SEG
        raise InputError(f"{name}: {path} is not a readable DICOM Segmentation ({exc})") from None
    for_uid = str(getattr(seg, "FrameOfReferenceUID", ""))
    if reference.frame_of_reference_uid and for_uid != reference.frame_of_reference_uid:
        raise InputError(
            f"{name}: Segmentation {path} is on frame of reference {for_uid or 'none'}, expected "
            f"the T1-Gd's {reference.frame_of_reference_uid}"
        )
    out: dict[str, Volume] = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        label = str(item.SegmentLabel)
        try:
            vol = seg.get_volume(segment_numbers=[number], combine_segments=False)
        except (ValueError, RuntimeError) as exc:
            raise InputError(
                f"{name}: segment {number} '{label}' of {path}: expected frames on a regular 3D "
                f"grid, found {exc}"
            ) from None
        arr = np.asarray(vol.array)[..., 0] > 0
        a = np.asarray(vol.affine, dtype=float)
        # highdicom indexes (slice, row, column) with its affine on those axes; a Volume is
        # [k, j, i] with direction columns (i, j, k)
        cols = a[:3, [2, 1, 0]]
        spacing = np.linalg.norm(cols, axis=0)
        source = Volume(
            array=arr,
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            origin=(float(a[0, 3]), float(a[1, 3]), float(a[2, 3])),
            direction=cols / spacing,
        )
        on_ref = resample(source, reference, order=0, output_dtype=np.bool_)
        out[label if label not in out else f"{label} ({number})"] = reference.with_array(on_ref)
    return out


@functools.lru_cache(maxsize=4096)
def roi_names(path: Path) -> tuple[str, ...]:
    """The ROI names of an RT structure set file (none when it cannot be read)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StructureSetROISequence"])
        return tuple(str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence") or [])
    except Exception as exc:  # pydicom raises many types on damaged files
        log.warning("RT structure set %s cannot be read (%s): not used as an outline", path, exc)
        return ()


def outline_masks(path: Path, reference: Volume, name: str) -> dict[str, Volume]:
    """A reader's outline (label -> bool mask on ``reference``'s grid): the segments of a DICOM
    Segmentation, or the ROIs of an RT structure set named like the enhancing lesion or
    necrosis, each rasterised on its own (:func:`dicom_node.convert.rtstruct.load_rtstruct_mask`,
    the structure set on the reference's frame of reference)."""
    if _sop_class(path) != RTSTRUCT_STORAGE:
        return segment_masks(path, reference, name)
    from dicom_node.convert.rtstruct import list_rois, load_rtstruct_mask

    out: dict[str, Volume] = {}
    try:
        rois = list_rois(path)
        for roi in rois:
            if roi.name in out or not (
                ENHANCING_SEGMENT.search(roi.name) or NECROSIS_SEGMENT.search(roi.name)
            ):
                continue
            named = [r for r in rois if r.name == roi.name]
            if not any(r.contour_count for r in named):  # outlined as empty: nothing there
                out[roi.name] = reference.with_array(np.zeros(reference.shape, dtype=bool))
                continue
            pattern = f"^{re.escape(roi.name)}$"
            out[roi.name] = load_rtstruct_mask(path, reference, pattern, combine=True)
    except InputError as exc:  # ConversionError included
        raise InputError(f"{name}: RT structure set {path}: {exc}") from None
    return out


def _sop_class(path: Path) -> str:
    """The SOP Class UID of a file ("" when it cannot be read: the Segmentation reader then
    says why)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # pydicom raises many types on damaged files
        return ""
    return str(ds.get("SOPClassUID", ""))


def find_segment(masks: Mapping[str, Volume], pattern: re.Pattern[str]) -> Volume | None:
    """The union of the segments whose label matches ``pattern`` (None when none does)."""
    hits = [m for label, m in masks.items() if pattern.search(label)]
    if not hits:
        return None
    union = np.logical_or.reduce([np.asarray(m.array, dtype=bool) for m in hits])
    return hits[0].with_array(union)


# ------------------------------------------------------------------------------------------
# a training / evaluation patient


@dataclass(frozen=True)
class DicomTruth:
    post_t1c: Volume
    post_enhancing: Volume
    post_necrosis: Volume | None
    pre_enhancing: Volume


@dataclass(frozen=True)
class DicomCase:
    """The studies of one cohort patient: pre-treatment series (with its reader Segmentation)
    and the follow-up T1-Gd with its reader Segmentation."""

    patient_id: str
    pre: DicomStudy
    post: DicomStudy

    @staticmethod
    def _settings() -> Settings:
        return load_settings(None)  # the node's: $GLIOFORECAST_CONFIG or the embedded default

    def inputs(self, survival_class: str | None = None) -> StudyInputs:
        inputs, _ = study_inputs_from_series(
            self.pre.images, self._settings(), f"patient {self.patient_id}, pre-treatment"
        )
        return replace(inputs, survival_class=survival_class)

    def truth(self, reference: Volume) -> DicomTruth:
        """The follow-up T1-Gd (its own grid) and the reader's masks, the pre-treatment one on
        ``reference`` (the pre-treatment T1-Gd). A follow-up on another frame of reference is
        registered rigidly onto ``reference`` and placed in its frame
        (:func:`inference.registration.register_rigid`), or refused when that fails."""
        from dicom_node.convert.series import load_series

        settings = self._settings()
        name = f"patient {self.patient_id}"
        follow_roles = replace(settings.roles, required=("t1c",))
        by_role, _ = _roles(
            self.post.images, replace(settings, roles=follow_roles), f"{name}, follow-up"
        )
        post = load_series(by_role["t1c"].files)
        post_file, pre_file = self.post.follow_up_outline(), self.pre.reader_segmentation()
        assert post_file is not None and pre_file is not None  # checked by match_case
        post_seg = outline_masks(post_file, post, f"{name}, follow-up")
        if post.frame_of_reference_uid != reference.frame_of_reference_uid:
            motion = register_rigid(reference, post, f"{name}: follow-up T1-Gd")
            post = motion.place(post)
            post_seg = {label: motion.place(mask) for label, mask in post_seg.items()}
        pre_seg = segment_masks(pre_file, reference, f"{name}, pre-treatment")
        enhancing = find_segment(post_seg, ENHANCING_SEGMENT)
        pre_enhancing = find_segment(pre_seg, ENHANCING_SEGMENT)
        rt = _sop_class(post_file) == RTSTRUCT_STORAGE
        post_kind = "RT structure set" if rt else "Segmentation"
        missing = [
            f"{what}: expected a segment labelled like 'Enhancing ...', found {sorted(masks)}"
            for what, masks, mask in (
                (f"follow-up {post_kind}", post_seg, enhancing),
                ("pre-treatment Segmentation", pre_seg, pre_enhancing),
            )
            if mask is None
        ]
        if missing or enhancing is None or pre_enhancing is None:
            raise InputError(f"{name}: " + "; ".join(missing))
        return DicomTruth(
            post_t1c=post,
            post_enhancing=enhancing,
            post_necrosis=find_segment(post_seg, NECROSIS_SEGMENT),
            pre_enhancing=pre_enhancing,
        )


def _pick(
    studies: Sequence[DicomStudy], chosen_uid: str, what: str, test: str
) -> tuple[DicomStudy | None, str | None]:
    """The one study of ``studies`` (already filtered by ``test``), or the one named."""
    if chosen_uid:
        named = [s for s in studies if s.study_instance_uid == chosen_uid]
        if named:
            return named[0], None
        return None, f"{what}: the table names study {chosen_uid}, found no such study with {test}"
    if len(studies) == 1:
        return studies[0], None
    if not studies:
        return None, f"{what}: expected a study with {test}, found none"
    listed = "; ".join(s.describe() for s in studies)
    return None, (
        f"{what}: expected one study with {test}, found {len(studies)} ({listed}); name one in "
        f"the table's {'pre' if what.startswith('pre') else 'post'}_study_uid column"
    )


def _planning_studies(studies: Sequence[DicomStudy], roi_pattern: str) -> list[DicomStudy]:
    """The patient's studies with a planning RT structure set and MR series. A structure set
    that only outlines a follow-up (an ROI named like the enhancing lesion, none matching the
    node's ``roles.roi_pattern``) is not a plan. A structure set kept in a study without MR (the
    planning CT's, as a planning system keeps it) joins the MR study whose frame of reference it
    is on or related to by a Spatial Registration, as the node links them
    (:mod:`dicom_node.linking`)."""
    from dicom_node.linking import MR_CLASSES, RT_CLASSES, frames_related

    gtv = re.compile(roi_pattern)

    def plans(study: DicomStudy) -> list[DicomSeries]:
        def outline_only(s: DicomSeries) -> bool:
            names = [n for f in s.files for n in roi_names(f)]
            return any(map(ENHANCING_SEGMENT.search, names)) and not any(map(gtv.search, names))

        return [s for s in study.of_class(RTSTRUCT_STORAGE) if not outline_only(s)]

    def mr(study: DicomStudy) -> list[DicomSeries]:
        return [s for s in study.series if s.summary.sop_class_uid in MR_CLASSES]

    out = [s for s in studies if plans(s) and mr(s)]
    for rt_study in (s for s in studies if plans(s) and not mr(s)):
        rt = [s for s in rt_study.series if s.summary.sop_class_uid in RT_CLASSES]
        structures = [f for s in plans(rt_study) for f in s.files]
        regs = [f for s in rt_study.of_class(SPATIAL_REGISTRATION_SOP_CLASS) for f in s.files]
        related = [
            study
            for study in studies
            if mr(study)
            and not plans(study)
            and frames_related(
                {s.summary.frame_of_reference_uid for s in mr(study)} - {""}, structures, regs
            )
        ]
        if not related:
            continue
        # the plan follows the pre-treatment MR: the latest related study not after it
        before = [s for s in related if s.when <= rt_study.when]
        study = before[-1] if before else related[0]
        log.info("%s: RT objects of %s joined to it", study.describe(), rt_study.describe())
        out.append(replace(study, series=(*study.series, *rt)))
    return out


def match_case(
    patient_id: str,
    studies: Sequence[DicomStudy],
    row: Mapping[str, str],
) -> tuple[DicomCase | None, list[str]]:
    """The pre-treatment and follow-up studies of one patient, or the problems found."""
    if not studies:
        return None, ["expected DICOM studies with this PatientID, found none"]
    planning = _planning_studies(studies, load_settings(None).roles.roi_pattern)
    pre, problem = _pick(
        planning, row.get("pre_study_uid", ""), "pre-treatment", "an RT structure set"
    )
    if pre is None:
        return None, [str(problem)]
    problems = []
    if pre.reader_segmentation() is None:
        problems.append(
            f"pre-treatment {pre.describe()}: expected a reader's Segmentation (enhancing "
            "tumour), found none"
        )
    later = [
        s
        for s in studies
        if s.when > pre.when and s is not pre and s.follow_up_outline() is not None
    ]
    post, problem = _pick(
        later,
        row.get("post_study_uid", ""),
        "follow-up",
        "a Segmentation (or an RT structure set with an enhancing ROI), later than the "
        f"pre-treatment {pre.describe()}",
    )
    if post is None:
        problems.append(str(problem))
    if problems or post is None:
        return None, problems
    return DicomCase(patient_id, pre, post), []
