"""Which RT Dose instances make the course's total dose.

A planning system may export, beside the plan's total dose, the dose of each beam, of one
fraction group or of a single session, the statistical uncertainty of the dose, or the sum of
several plans, all as RT Dose objects, routed together. Only the dose of the whole course is an
input of the model (60 Gy, not the 2 Gy of one session). This module reads the headers of a
study's RT Dose instances (and its RT Plans, when sent) and says which to use, by the RT Dose
module's Dose Summation Type (DICOM PS3.3, C.8.8.3):

- never used: Dose Type ERROR (an uncertainty grid), the summation types of one session or
  of a record (FRACTION_SESSION, BEAM_SESSION, BRACHY_SESSION, CONTROL_POINT, RECORD),
  brachytherapy doses, an RT Dose without a dose grid (DVHs or points only) and one whose
  header cannot be read; when PHYSICAL doses are there, EFFECTIVE (RBE-weighted) ones are left
  out rather than summed with them;
- MULTI_PLAN (the sum of several plans) first, then PLAN (every fraction group of one plan): the
  latest of that kind is used (by ContentDate and ContentTime; among equals, the first given:
  callers give the series in their order of preference). PLAN doses of several plans and no
  MULTI_PLAN sum are refused: a boost plan and an alternative plan look the same;
- otherwise the doses of one plan's fraction groups (FRACTION) or beams (BEAM) are summed, one
  per group or beam; when the RT Plan they reference was sent, every group, or every beam of
  its fraction groups that delivers dose (not a SETUP field, meterset not 0), must be there.

A missing Dose Summation Type (a type 1 attribute; some exports leave it out) is taken as PLAN,
and said so. :func:`choose_course_dose` raises :class:`ConversionError` saying what it found
and what to send when RT Dose instances were sent but no course dose can be made from them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.errors import ConversionError

log = logging.getLogger(__name__)

#: summation types of one session, a control point or a record: not the course's dose
NOT_A_COURSE = {
    "FRACTION_SESSION": "the dose of one session",
    "BEAM_SESSION": "the dose of one session of beams",
    "BRACHY_SESSION": "the dose of one brachytherapy session",
    "CONTROL_POINT": "the dose of control points of one beam",
    "RECORD": "the dose of a treatment record",
    "BRACHY": "a brachytherapy dose",
}
#: summation types whose doses add up to a plan's dose: what each part is
PARTS = {"FRACTION": "fraction group", "BEAM": "beam"}
#: the summation types a course dose is made of ("": missing, taken as PLAN)
USABLE = {"", "PLAN", "MULTI_PLAN", *PARTS}


@dataclass(frozen=True)
class DoseHeader:
    """What the choice needs of one RT Dose instance."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    dose_type: str
    summation: str  # "" when the attribute is missing
    plan_uid: str  # the referenced RT Plan's SOP Instance UID, "" when none
    parts: tuple[int, ...]  # fraction group numbers (FRACTION) or beam numbers (BEAM)
    when: str  # content / creation date and time, for "the latest"
    has_grid: bool = True  # False for an RT Dose that holds only DVHs or points

    @property
    def label(self) -> str:
        kind = self.summation or "no DoseSummationType"
        return f"{self.path.name} ({kind}, {self.dose_type or 'no DoseType'})"


@dataclass(frozen=True)
class DoseChoice:
    """The instances whose doses add up to the course's dose, and what was done."""

    used: tuple[DoseHeader, ...]
    note: str  # what was used and why, "" for the plain case (one PLAN dose, nothing else)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(d.path for d in self.used)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip().upper()


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def read_dose_header(path: Path) -> DoseHeader:
    """The header of an RT Dose instance as the choice reads it."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        summation = _text(ds, "DoseSummationType")
        plan_uid, parts = "", []
        plans = ds.get("ReferencedRTPlanSequence") or []
        if plans:
            plan_uid = str(plans[0].get("ReferencedSOPInstanceUID", "") or "")
            for group in plans[0].get("ReferencedFractionGroupSequence") or []:
                if summation == "FRACTION":
                    parts.append(_int(group.get("ReferencedFractionGroupNumber")))
                for beam in group.get("ReferencedBeamSequence") or []:
                    if summation == "BEAM":
                        parts.append(_int(beam.get("ReferencedBeamNumber")))
        when = "".join(_text(ds, k) for k in ("ContentDate", "ContentTime")) or "".join(
            _text(ds, k) for k in ("InstanceCreationDate", "InstanceCreationTime")
        )
        return DoseHeader(
            path=path,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            dose_type=_text(ds, "DoseType"),
            summation=summation,
            plan_uid=plan_uid,
            parts=tuple(sorted({p for p in parts if p is not None})),
            when=when,
            has_grid="Rows" in ds and "Columns" in ds,
        )
    except ConversionError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged files
        raise ConversionError(
            f"{path.name}: RT Dose header cannot be read: {type(exc).__name__}: {exc}"
        ) from exc


def plan_parts(paths: Sequence[Path]) -> dict[str, dict[str, tuple[int, ...]]]:
    """For each RT Plan sent (by SOP Instance UID): its fraction group numbers and beam numbers
    (``{"FRACTION": (...), "BEAM": (...)}``). Unreadable plans are skipped with a warning."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            setup = {
                _int(b.get("BeamNumber"))
                for key in ("BeamSequence", "IonBeamSequence")
                for b in ds.get(key) or []
                if _text(b, "TreatmentDeliveryType") == "SETUP"
            }
            groups, beams = set(), set()
            for group in ds.get("FractionGroupSequence") or []:
                groups.add(_int(group.get("FractionGroupNumber")))
                for beam in group.get("ReferencedBeamSequence") or []:
                    number = _int(beam.get("ReferencedBeamNumber"))
                    # setup fields and beams of zero meterset deliver no dose: none expected
                    if number not in setup and not _zero(beam.get("BeamMeterset")):
                        beams.add(number)
            out[str(ds.SOPInstanceUID)] = {
                "FRACTION": tuple(sorted(g for g in groups if g is not None)),
                "BEAM": tuple(sorted(b for b in beams if b is not None)),
            }
        except Exception as exc:  # a plan is only a check; the dose choice goes on without it
            log.warning("RT Plan %s cannot be read (%s): not used to check the doses", path, exc)
    return out


def _zero(meterset: object) -> bool:
    """True for a BeamMeterset that is a number <= 0 (absent or unreadable: False)."""
    try:
        return float(str(meterset)) <= 0 if meterset is not None else False
    except ValueError:
        return False


def _latest(doses: Sequence[DoseHeader]) -> DoseHeader:
    """The latest by content date and time; among equals, the first given (callers give the
    series in their order of preference)."""
    return max(enumerate(doses), key=lambda item: (item[1].when, -item[0]))[1]


def choose_course_dose(paths: Sequence[Path], plans: Sequence[Path] = ()) -> DoseChoice:
    """The RT Dose instances of ``paths`` that make the course's dose (see the module
    docstring); ``plans``: the study's RT Plan files, to check that no part is missing."""
    if not paths:
        raise ConversionError("RT Dose: expected at least one RT Dose instance, found none")
    left_out: list[str] = []
    headers: list[DoseHeader] = []
    for p in paths:
        try:
            headers.append(read_dose_header(Path(p)))
        except ConversionError as exc:
            left_out.append(str(exc))
    usable: list[DoseHeader] = []
    for h in headers:
        if not h.has_grid:
            left_out.append(f"{h.label}: no dose grid (DVHs or points only)")
        elif h.dose_type == "ERROR":
            left_out.append(f"{h.label}: a dose uncertainty, not a dose")
        elif h.summation in NOT_A_COURSE:
            left_out.append(f"{h.label}: {NOT_A_COURSE[h.summation]}, not the course's")
        elif h.summation not in USABLE:
            left_out.append(f"{h.label}: not a DoseSummationType this node knows")
        else:
            usable.append(h)
    if not usable:
        raise ConversionError(
            "RT Dose: expected the dose of the whole course (DoseSummationType PLAN, "
            "MULTI_PLAN, or the FRACTION / BEAM doses of one plan), found none: "
            + "; ".join(left_out)
            + ". Send the plan's dose, or leave the RT Dose out"
        )
    if any(h.dose_type == "PHYSICAL" for h in usable):  # not summed with EFFECTIVE (RBE) doses
        left_out += [
            f"{h.label}: a PHYSICAL dose is used" for h in usable if h.dose_type != "PHYSICAL"
        ]
        usable = [h for h in usable if h.dose_type == "PHYSICAL"]
    choice = _choose(usable, plan_parts(plans), left_out)
    if len(paths) == 1 and choice.used[0].summation == "PLAN":
        return DoseChoice(choice.used, "")
    return choice


def _choose(
    usable: list[DoseHeader], plans: dict[str, dict[str, tuple[int, ...]]], left_out: list[str]
) -> DoseChoice:
    def done(used: Sequence[DoseHeader], what: str) -> DoseChoice:
        rest = [f"{h.label}: {why}" for h, why in skipped] + left_out
        names = ", ".join(h.path.name for h in used)
        note = f"RT Dose: {what} ({names})" + (f"; not used: {'; '.join(rest)}" if rest else "")
        return DoseChoice(tuple(used), note)

    skipped: list[tuple[DoseHeader, str]] = []
    for kind in ("MULTI_PLAN", "PLAN"):
        doses = [h for h in usable if (h.summation or "PLAN") == kind]
        if not doses:
            continue
        if kind == "PLAN" and len({h.plan_uid for h in doses}) > 1:
            listed = "; ".join(f"{h.label} of plan {h.plan_uid or '<none>'}" for h in doses)
            raise ConversionError(
                f"RT Dose: expected the dose of one plan or a plan sum (MULTI_PLAN), found the "
                f"doses of {len({h.plan_uid for h in doses})} plans: {listed}. Send the planning "
                "system's plan sum, or only the dose of the plan treated"
            )
        chosen = _latest(doses)
        skipped += [(h, f"an earlier {kind} dose") for h in doses if h is not chosen]
        skipped += [(h, f"a {kind} dose is used") for h in usable if h not in doses]
        missing = " (DoseSummationType missing: taken as PLAN)" if not chosen.summation else ""
        what = "the plan sum (MULTI_PLAN)" if kind == "MULTI_PLAN" else "the plan's dose"
        return done([chosen], f"{what}{missing} is used")
    for kind, part in PARTS.items():
        doses = [h for h in usable if h.summation == kind]
        if not doses:
            continue
        plan_uids = {h.plan_uid for h in doses}
        if len(plan_uids) > 1:
            raise ConversionError(
                f"RT Dose: expected the {part} doses of one plan, found doses of "
                f"{len(plan_uids)} plans ({', '.join(sorted(u or '<none>' for u in plan_uids))}); "
                "send the plan's dose"
            )
        by_part: dict[tuple[int, ...], list[DoseHeader]] = {}
        for h in doses:
            by_part.setdefault(h.parts, []).append(h)
        used = [_latest(group) for group in by_part.values()]
        skipped += [(h, f"an earlier dose of the same {part}") for h in doses if h not in used]
        covered = [p for h in used for p in h.parts]
        if len(covered) != len(set(covered)) or not all(h.parts for h in used):
            raise ConversionError(
                f"RT Dose: expected {part} doses that each name their own {part}s (Referenced"
                f"RTPlanSequence), found {', '.join(f'{h.label}: {h.parts}' for h in used)}; "
                "send the plan's dose"
            )
        (plan_uid,) = plan_uids
        expected = plans.get(plan_uid, {}).get(kind)
        if expected:
            absent = sorted(set(expected) - set(covered))
            if absent:
                raise ConversionError(
                    f"RT Dose: expected the doses of every {part} of plan {plan_uid} "
                    f"({', '.join(map(str, expected))}), found {', '.join(map(str, covered))}: "
                    f"{part} {', '.join(map(str, absent))} missing; send the plan's dose or "
                    f"every {part}'s"
                )
            checked = f"every {part} of the RT Plan"
        else:
            checked = (
                f"RT Plan {plan_uid or '<none named>'} was not sent or could not be read, so "
                f"not checked that no other {part} exists"
            )
        skipped += [(h, f"{kind} doses are summed") for h in usable if h not in doses]
        return done(used, f"the doses of {len(used)} {part}(s) are summed ({checked})")
    raise AssertionError(f"unreachable: summation types {USABLE} are all handled")
