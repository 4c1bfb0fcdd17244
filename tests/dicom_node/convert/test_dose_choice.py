"""Which RT Dose instances make the course's dose: the planning system's exports as they come
(plan, plan sum, beams, fraction groups, one session, uncertainty), with and without the plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RTPlanStorage, generate_uid

from dicom_node.convert.dose_choice import choose_course_dose
from dicom_node.errors import ConversionError
from tests.dicom_node.convert import synth

FRAME = "1.2.826.0.1.3680043.2.1125.43"
PLAN_A, PLAN_B = "1.2.826.0.1.3680043.2.1125.43.1", "1.2.826.0.1.3680043.2.1125.43.2"


def dose_file(
    folder: Path,
    name: str,
    summation: str | None = "PLAN",
    *,
    dose_type: str = "PHYSICAL",
    plan: str | None = PLAN_A,
    beams: tuple[int, ...] = (),
    group: int = 1,
    when: str = "20261101120000",
) -> Path:
    ds = synth.rtdose(
        lambda pts: np.full(len(pts), 2.0),
        shape=(2, 3, 3),
        origin=(0.0, 0.0, 0.0),
        spacing=(2.0, 2.0, 2.0),
        frame_uid=FRAME,
    )
    ds.DoseType = dose_type
    if summation is None:
        del ds.DoseSummationType
    else:
        ds.DoseSummationType = summation
    ds.ContentDate, ds.ContentTime = when[:8], when[8:]
    if plan is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RTPlanStorage
        ref.ReferencedSOPInstanceUID = plan
        fg = Dataset()
        fg.ReferencedFractionGroupNumber = group
        if beams:
            fg.ReferencedBeamSequence = DicomSequence()
            for number in beams:
                item = Dataset()
                item.ReferencedBeamNumber = number
                fg.ReferencedBeamSequence.append(item)
        ref.ReferencedFractionGroupSequence = DicomSequence([fg])
        ds.ReferencedRTPlanSequence = DicomSequence([ref])
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def plan_file(
    folder: Path, uid: str, beams: dict[int, tuple[str, float | str]], ion: bool = False
) -> Path:
    """An RT Plan header: one fraction group, the beams by number (delivery type, meterset);
    ``ion``: an RT Ion Plan (IonBeamSequence)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTPlanStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTPlanStorage, uid, "RTPLAN"
    ds.SeriesInstanceUID = generate_uid()
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = 30
    group.ReferencedBeamSequence = DicomSequence()
    listed = DicomSequence()
    for number, (delivery, meterset) in beams.items():
        beam = Dataset()
        beam.BeamNumber, beam.TreatmentDeliveryType = number, delivery
        listed.append(beam)
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        if isinstance(meterset, float):
            ref.BeamMeterset = meterset
        elif meterset:  # a value that is not a number, as a damaged plan may hold
            text = meterset.encode()
            ref[0x300A0086] = RawDataElement(Tag(0x300A0086), "DS", len(text), text, 0, True, True)
        group.ReferencedBeamSequence.append(ref)
    setattr(ds, "IonBeamSequence" if ion else "BeamSequence", listed)
    ds.FractionGroupSequence = DicomSequence([group])
    path = folder / f"plan-{uid[-1]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def names(paths: tuple[Path, ...]) -> list[str]:
    return [p.stem for p in paths]


def test_one_plan_dose_is_used_and_needs_no_note(tmp_path: Path) -> None:
    choice = choose_course_dose([dose_file(tmp_path, "plan")])
    assert names(choice.paths) == ["plan"] and choice.note == ""


def test_uncertainty_and_session_doses_are_never_the_course_dose(tmp_path: Path) -> None:
    paths = [
        dose_file(tmp_path, "error", dose_type="ERROR"),
        dose_file(tmp_path, "session", "FRACTION_SESSION"),
        dose_file(tmp_path, "plan"),
        dose_file(tmp_path, "record", "RECORD"),
    ]
    choice = choose_course_dose(paths)
    assert names(choice.paths) == ["plan"]
    assert choice.note.startswith("RT Dose: the plan's dose is used (plan.dcm); not used: ")
    assert "error.dcm (PLAN, ERROR): a dose uncertainty, not a dose" in choice.note
    assert "session.dcm (FRACTION_SESSION, PHYSICAL): the dose of one session" in choice.note
    assert "record.dcm (RECORD, PHYSICAL): the dose of a treatment record" in choice.note


def test_the_plan_sum_comes_before_the_plans_it_sums(tmp_path: Path) -> None:
    paths = [
        dose_file(tmp_path, "main", plan=PLAN_A),
        dose_file(tmp_path, "boost", plan=PLAN_B),
        dose_file(tmp_path, "sum", "MULTI_PLAN", plan=None),
    ]
    choice = choose_course_dose(paths)
    assert names(choice.paths) == ["sum"]
    assert "main.dcm (PLAN, PHYSICAL): a MULTI_PLAN dose is used" in choice.note


def test_doses_of_two_plans_without_their_sum_are_refused(tmp_path: Path) -> None:
    paths = [dose_file(tmp_path, "main", plan=PLAN_A), dose_file(tmp_path, "boost", plan=PLAN_B)]
    with pytest.raises(ConversionError, match="found the doses of 2 plans") as info:
        choose_course_dose(paths)
    assert "Send the planning system's plan sum" in str(info.value)
    assert PLAN_A in str(info.value) and PLAN_B in str(info.value)


def test_of_two_exports_of_one_plan_the_latest_is_used(tmp_path: Path) -> None:
    paths = [
        dose_file(tmp_path, "later", when="20261102090000"),
        dose_file(tmp_path, "first", when="20261101090000"),
    ]
    choice = choose_course_dose(paths)
    assert names(choice.paths) == ["later"]
    assert "first.dcm (PLAN, PHYSICAL): an earlier PLAN dose" in choice.note


def test_beam_doses_are_summed_when_the_plan_has_no_other_beam(tmp_path: Path) -> None:
    plan = plan_file(
        tmp_path, PLAN_A, {1: ("TREATMENT", 120.0), 2: ("TREATMENT", 95.5), 9: ("SETUP", 0.0)}
    )
    beams = [dose_file(tmp_path, f"beam{n}", "BEAM", beams=(n,)) for n in (1, 2)]
    choice = choose_course_dose(beams, [plan])
    assert names(choice.paths) == ["beam1", "beam2"]
    assert choice.note.startswith(
        "RT Dose: the doses of 2 beam(s) are summed (every beam of the RT Plan)"
    )
    # without the plan the sum is made too, and the note says what could not be checked
    unchecked = choose_course_dose(beams)
    assert names(unchecked.paths) == ["beam1", "beam2"]
    assert (
        f"RT Plan {PLAN_A} was not sent or could not be read, so not checked that no other "
        "beam exists"
    ) in unchecked.note


def test_a_missing_beam_dose_is_refused_naming_it(tmp_path: Path) -> None:
    plan = plan_file(tmp_path, PLAN_A, {n: ("TREATMENT", 100.0) for n in (1, 2, 3)})
    beams = [dose_file(tmp_path, f"beam{n}", "BEAM", beams=(n,)) for n in (1, 3)]
    with pytest.raises(ConversionError, match="beam 2 missing"):
        choose_course_dose(beams, [plan])


def test_the_same_beam_twice_keeps_the_latest_and_unnamed_beams_are_refused(
    tmp_path: Path,
) -> None:
    again = [
        dose_file(tmp_path, "beam1-old", "BEAM", beams=(1,), when="20261101080000"),
        dose_file(tmp_path, "beam1-new", "BEAM", beams=(1,), when="20261101100000"),
    ]
    choice = choose_course_dose(again)
    assert names(choice.paths) == ["beam1-new"]
    assert "beam1-old.dcm (BEAM, PHYSICAL): an earlier dose of the same beam" in choice.note
    unnamed = [dose_file(tmp_path, f"b{n}", "BEAM", plan=None) for n in (1, 2)]
    with pytest.raises(ConversionError, match="expected beam doses that each name their own"):
        choose_course_dose(unnamed)


def test_fraction_group_doses_are_summed(tmp_path: Path) -> None:
    groups = [dose_file(tmp_path, f"group{g}", "FRACTION", group=g) for g in (1, 2)]
    choice = choose_course_dose(groups)
    assert names(choice.paths) == ["group1", "group2"]
    assert "the doses of 2 fraction group(s) are summed" in choice.note


def test_only_a_session_dose_is_refused_with_what_to_send(tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        choose_course_dose(
            [dose_file(tmp_path, "s", "BEAM_SESSION"), dose_file(tmp_path, "u", "PLAN_X")]
        )
    message = str(info.value)
    assert message.startswith("RT Dose: expected the dose of the whole course")
    assert "u.dcm (PLAN_X, PHYSICAL): not a DoseSummationType this node knows" in message
    assert message.endswith("Send the plan's dose, or leave the RT Dose out")


def test_a_dose_without_summation_type_is_taken_as_the_plans(tmp_path: Path) -> None:
    choice = choose_course_dose([dose_file(tmp_path, "old", None)])
    assert names(choice.paths) == ["old"]
    assert "(DoseSummationType missing: taken as PLAN)" in choice.note


def test_plan_checks_read_ion_setup_fields_and_odd_metersets(tmp_path: Path) -> None:
    """A proton plan lists its setup field in IonBeamSequence; a beam without a meterset, or
    with one that is not a number, still delivers dose, and the plan still checks the doses."""
    ion = plan_file(tmp_path, PLAN_A, {1: ("TREATMENT", 80.0), 2: ("SETUP", "")}, ion=True)
    choice = choose_course_dose([dose_file(tmp_path, "beam1", "BEAM", beams=(1,))], [ion])
    assert "every beam of the RT Plan" in choice.note
    odd = plan_file(tmp_path, PLAN_B, {1: ("TREATMENT", "n/a"), 2: ("TREATMENT", "")})
    with pytest.raises(ConversionError, match="beam 2 missing"):
        choose_course_dose([dose_file(tmp_path, "b1", "BEAM", plan=PLAN_B, beams=(1,))], [odd])


def test_exports_of_the_same_time_keep_the_callers_order(tmp_path: Path) -> None:
    """Without content dates the first given wins: the node gives its series best first."""
    paths = [
        dose_file(tmp_path, "series7", when=""),
        dose_file(tmp_path, "series3", when=""),
    ]
    assert names(choose_course_dose(paths).paths) == ["series7"]


def test_unreadable_dvh_only_and_effective_doses_give_way(tmp_path: Path) -> None:
    """A damaged RT Dose, one that holds only DVHs and an RBE-weighted (EFFECTIVE) dose beside
    the PHYSICAL plan dose: the plan dose is used, each other one is named with why."""
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"not DICOM at all")
    dvh = dose_file(tmp_path, "dvh", when="20261109000000")
    ds = pydicom.dcmread(dvh)
    for keyword in ("PixelData", "Rows", "Columns", "NumberOfFrames", "GridFrameOffsetVector"):
        delattr(ds, keyword)
    ds.save_as(dvh, enforce_file_format=True)
    paths = [
        damaged,
        dvh,
        dose_file(tmp_path, "rbe", dose_type="EFFECTIVE", when="20261108000000"),
        dose_file(tmp_path, "plan"),
    ]
    choice = choose_course_dose(paths)
    assert names(choice.paths) == ["plan"]
    assert "damaged.dcm: RT Dose header cannot be read" in choice.note
    assert "dvh.dcm (PLAN, PHYSICAL): no dose grid (DVHs or points only)" in choice.note
    assert "rbe.dcm (PLAN, EFFECTIVE): a PHYSICAL dose is used" in choice.note
