"""Series roles (t1c, flair, t2, t1, rtstruct, rtdose, rtplan) from configurable rules.

Each series gets the role of the first rule that matches it. A series whose ImageType has a
value of ``roles.exclude_image_types`` (a MIP, a subtraction, a parametric map: not the acquired
volume, whatever its name says) gets none, and the job says why. When several series match the
same role, ``on_ambiguous: latest`` ranks them (:func:`ranked_candidates`): acquired series
(ImageType ORIGINAL) before derived ones (a scanner's MPR reformat of the same acquisition),
then the highest SeriesNumber (a repeated sequence is usually repeated because the first was
spoiled); the first is used, and the job says so. The others stay candidates: when the first
cannot be converted (a 4D dynamic series named like a T1-Gd, a broken stack), the pipeline tries
the next (:func:`dicom_node.pipeline.assemble_inputs`). ``fail`` refuses the study. A missing
required role makes the job fail with a reason that lists what was received.

The node's own outputs (series whose description carries the "SYNTHETIC PREDICTION - RESEARCH
USE ONLY" banner: predicted RTSTRUCT, SEG, derived MR) never get a role, even when a PACS routes
them back with the study: a prediction is never an input.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from pydicom.uid import UID
from pynetdicom import sop_class

from dicom_node.jobs import RoleDecision, SeriesSummary
from dicom_node.settings import RoleRule, RoleSettings
from sr_writer.labels import is_labelled_description

#: the image roles: when the series used for one cannot be converted, the next that matches is
#: tried (:func:`ranked_candidates`)
IMAGE_ROLES = ("t1c", "flair", "t2", "t1")


@lru_cache(maxsize=256)
def sop_class_uid(name_or_uid: str) -> str:
    """A SOP class UID from a keyword such as ``MRImageStorage`` (or the UID itself)."""
    value = getattr(sop_class, name_or_uid, None)
    return str(value) if isinstance(value, UID) else name_or_uid


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def exam_protocol_name(series: Sequence[SeriesSummary]) -> str:
    """The ProtocolName that every MR series of the study carries, when there are two or more
    (``''`` otherwise): the exam's protocol, as GE scanners write it in each series ("BRAIN
    W/WO +C"), not the series' own. Its words cannot tell one series from another, and matched
    with each series' text they would make a pre-contrast T1 look like a T1-Gd, or a T2 FLAIR like
    a T1 FLAIR, so :func:`matching_text` leaves it out."""
    names = Counter(
        s.protocol_name.strip()
        for s in series
        if s.modality == "MR" and not is_labelled_description(s.series_description)
    )
    if not names:
        return ""
    name, carried = names.most_common(1)[0]
    # carried by more than half of the MR series (not all: a perfusion map or a screen save
    # made on the console carries another, or none), and by two at least
    if not name or carried < 2 or carried * 2 <= sum(names.values()):
        return ""
    return name


def matching_text(series: SeriesSummary, exam_protocol: str = "") -> str:
    """The text the rules match: SeriesDescription, ProtocolName and SequenceName, without the
    exam's protocol name (:func:`exam_protocol_name`) when the series has a description of its
    own."""
    if (
        exam_protocol
        and series.protocol_name.strip() == exam_protocol
        and series.series_description.strip()
    ):
        parts = (series.series_description, series.sequence_name)
        return " | ".join(t for t in parts if t)
    return series.text


def rule_matches(rule: RoleRule, series: SeriesSummary, text: str | None = None) -> bool:
    """Whether ``rule`` gives its role to ``series``, matching ``text`` (default: the series'
    whole text)."""
    if series.sop_class_uid not in {sop_class_uid(s) for s in rule.sop_classes}:
        return False
    text = series.text if text is None else text
    if rule.pattern is not None and not _regex(rule.pattern).search(text):
        return False
    if rule.exclude is not None and _regex(rule.exclude).search(text):
        return False
    if rule.contrast == "present" and not series.contrast_agent:
        return False
    return not (rule.contrast == "absent" and series.contrast_agent)


def excluded_image_type(series: SeriesSummary, settings: RoleSettings) -> str | None:
    """The ImageType value that keeps ``series`` from every role, or None."""
    for value in sorted(series.image_type_values):
        for term in settings.exclude_image_types:
            if value == term or value.startswith(term + "_"):
                return value
    return None


def preference(series: SeriesSummary, role: str = "") -> tuple[bool, bool, int, float]:
    """Sort key of the series matching one role, best last: acquired before derived; for the
    T1-Gd, one whose images name a contrast agent (ContrastBolusAgent) before one whose do not;
    then the highest SeriesNumber, then the latest received."""
    number = -1 if series.series_number is None else series.series_number
    agent = role == "t1c" and series.contrast_agent
    return (not series.derived, agent, number, series.last_received_at)


def describe(series: SeriesSummary) -> str:
    number = "?" if series.series_number is None else str(series.series_number)
    name = UID(series.sop_class_uid).name
    label = series.text or "no description"
    return f"series {number} '{label}' ({name}, {series.instance_count} instances)"


@dataclass(frozen=True)
class RoleOutcome:
    decisions: tuple[RoleDecision, ...]
    problems: tuple[str, ...]
    missing: tuple[str, ...] = ()  # the required roles no series matched

    @property
    def ok(self) -> bool:
        return not self.problems

    def role_of(self, series_uid: str) -> str:
        for d in self.decisions:
            if d.series_instance_uid == series_uid:
                return d.role
        return ""


def assign_roles(series: Sequence[SeriesSummary], settings: RoleSettings) -> RoleOutcome:
    """Assign a role to each series and check the study has its required roles."""
    notes: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}  # role -> the series left out for their ImageType
    candidates = _candidates(series, settings, notes, excluded)
    chosen: dict[str, str] = {}  # series uid -> role
    problems: list[str] = []
    for role, matched in candidates.items():
        if len(matched) == 1:
            chosen[matched[0].series_instance_uid] = role
            continue
        ordered = matched[::-1]  # best last
        names = "; ".join(describe(s) for s in ordered)
        if settings.on_ambiguous == "fail":
            problems.append(
                f"ambiguous role {role}: expected one matching series, found {len(matched)} "
                f"({names}); tighten roles.rules or set roles.on_ambiguous: latest"
            )
            for s in matched:
                notes[s.series_instance_uid] = f"matches {role}, ambiguous"
            continue
        keep = ordered[-1]
        chosen[keep.series_instance_uid] = role
        why = "the latest" if keep.derived == ordered[-2].derived else "acquired, not derived"
        then = ", this one if that cannot be converted" if role in IMAGE_ROLES else ""
        for s in ordered[:-1]:
            notes[s.series_instance_uid] = (
                f"also matches {role}; series {keep.series_number} ({why}) is used{then}"
            )
    missing: list[str] = []
    for role in settings.required:
        if role in candidates:
            continue
        missing.append(role)
        received = "; ".join(describe(s) for s in series) or "nothing"
        left_out = ""
        if role in excluded:
            left_out = "; left out for their ImageType (roles.exclude_image_types): " + "; ".join(
                excluded[role]
            )
        problems.append(
            f"missing required role {role}: no series matched; received {received}{left_out}"
        )
    decisions = tuple(
        RoleDecision(
            s.series_instance_uid,
            chosen.get(s.series_instance_uid, ""),
            notes.get(s.series_instance_uid, ""),
        )
        for s in series
    )
    return RoleOutcome(decisions, tuple(problems), tuple(missing))


def _candidates(
    series: Sequence[SeriesSummary],
    settings: RoleSettings,
    notes: dict[str, str],
    excluded: dict[str, list[str]],
) -> dict[str, list[SeriesSummary]]:
    """The series matching each role, best first; ``notes`` and ``excluded`` get why a series
    was left out."""
    candidates: dict[str, list[SeriesSummary]] = {}
    exam_protocol = exam_protocol_name(series)
    for s in series:
        if is_labelled_description(s.series_description):
            notes[s.series_instance_uid] = "a glioforecast output sent back: never an input"
            continue
        text = matching_text(s, exam_protocol)
        role = next((r.role for r in settings.rules if rule_matches(r, s, text)), None)
        if role is None:
            continue
        value = excluded_image_type(s, settings)
        if value is not None:
            notes[s.series_instance_uid] = (
                f"matches {role} but not used: ImageType {value} (roles.exclude_image_types)"
            )
            excluded.setdefault(role, []).append(f"{describe(s)}, ImageType {value}")
            continue
        candidates.setdefault(role, []).append(s)
    return {
        role: sorted(matched, key=functools.partial(_preferred, role), reverse=True)
        for role, matched in candidates.items()
    }


def _preferred(role: str, series: SeriesSummary) -> tuple[bool, bool, int, float]:
    return preference(series, role)


def ranked_candidates(
    series: Sequence[SeriesSummary], settings: RoleSettings
) -> dict[str, list[SeriesSummary]]:
    """The series that match each role, the one :func:`assign_roles` uses first, then the
    others in the order to try them when it cannot be converted."""
    return _candidates(series, settings, {}, {})
