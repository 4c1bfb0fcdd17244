"""Series roles (t1c, flair, t2, t1, rtstruct, rtdose, rtplan) from configurable rules.

Each series gets the role of the first rule that matches it. When several series match the same
role, ``on_ambiguous: latest`` keeps the one with the highest SeriesNumber (a repeated sequence
is usually repeated because the first was spoiled) and says so; ``fail`` refuses the study. A
missing required role makes the job fail with a reason that lists what was received.

The node's own outputs (series whose description carries the "SYNTHETIC PREDICTION - RESEARCH
USE ONLY" banner: predicted RTSTRUCT, SEG, derived MR) never get a role, even when a PACS routes
them back with the study: a prediction is never an input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from pydicom.uid import UID
from pynetdicom import sop_class

from dicom_node.jobs import RoleDecision, SeriesSummary
from dicom_node.settings import RoleRule, RoleSettings
from sr_writer.labels import is_labelled_description


@lru_cache(maxsize=256)
def sop_class_uid(name_or_uid: str) -> str:
    """A SOP class UID from a keyword such as ``MRImageStorage`` (or the UID itself)."""
    value = getattr(sop_class, name_or_uid, None)
    return str(value) if isinstance(value, UID) else name_or_uid


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def rule_matches(rule: RoleRule, series: SeriesSummary) -> bool:
    if series.sop_class_uid not in {sop_class_uid(s) for s in rule.sop_classes}:
        return False
    text = series.text
    if rule.pattern is not None and not _regex(rule.pattern).search(text):
        return False
    if rule.exclude is not None and _regex(rule.exclude).search(text):
        return False
    if rule.contrast == "present" and not series.contrast_agent:
        return False
    return not (rule.contrast == "absent" and series.contrast_agent)


def describe(series: SeriesSummary) -> str:
    number = "?" if series.series_number is None else str(series.series_number)
    name = UID(series.sop_class_uid).name
    label = series.text or "no description"
    return f"series {number} '{label}' ({name}, {series.instance_count} instances)"


@dataclass(frozen=True)
class RoleOutcome:
    decisions: tuple[RoleDecision, ...]
    problems: tuple[str, ...]

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
    candidates: dict[str, list[SeriesSummary]] = {}
    notes: dict[str, str] = {}
    for s in series:
        if is_labelled_description(s.series_description):
            notes[s.series_instance_uid] = "a glioforecast output sent back: never an input"
            continue
        for rule in settings.rules:
            if rule_matches(rule, s):
                candidates.setdefault(rule.role, []).append(s)
                break
    chosen: dict[str, str] = {}  # series uid -> role
    problems: list[str] = []
    for role, matched in candidates.items():
        if len(matched) == 1:
            chosen[matched[0].series_instance_uid] = role
            continue
        ordered = sorted(
            matched,
            key=lambda s: (-1 if s.series_number is None else s.series_number, s.last_received_at),
        )
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
        for s in ordered[:-1]:
            notes[s.series_instance_uid] = (
                f"also matches {role}; series {keep.series_number} (the latest) is used"
            )
    for role in settings.required:
        if role in candidates:
            continue
        received = "; ".join(describe(s) for s in series) or "nothing"
        problems.append(f"missing required role {role}: no series matched; received {received}")
    decisions = tuple(
        RoleDecision(
            s.series_instance_uid,
            chosen.get(s.series_instance_uid, ""),
            notes.get(s.series_instance_uid, ""),
        )
        for s in series
    )
    return RoleOutcome(decisions, tuple(problems))
