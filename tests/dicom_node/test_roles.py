"""Series roles from the embedded default rules, on names real scanners use."""

from __future__ import annotations

import dataclasses

import pytest

from dicom_node.jobs import SeriesSummary
from dicom_node.roles import assign_roles, ranked_candidates
from dicom_node.settings import load_settings

MR = "1.2.840.10008.5.1.4.1.1.4"
ENH_MR = "1.2.840.10008.5.1.4.1.1.4.1"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE = "1.2.840.10008.5.1.4.1.1.481.2"


def series(
    desc: str, number: int = 1, cls: str = MR, contrast: bool = False, **kw
) -> SeriesSummary:  # type: ignore[no-untyped-def]
    return SeriesSummary(
        series_instance_uid=f"1.2.{number}.{abs(hash(desc)) % 10**6}",
        sop_class_uid=cls,
        modality="MR",
        series_number=number,
        series_description=desc,
        protocol_name=kw.get("protocol", ""),
        sequence_name=kw.get("sequence", ""),
        contrast_agent=contrast,
        frame_of_reference_uid="1.2.3",
        instance_count=10,
        last_received_at=float(number),
        image_type=kw.get("image_type", "ORIGINAL\\PRIMARY\\M\\ND"),
    )


ROLES = load_settings(None).roles


@pytest.mark.parametrize(
    ("description", "contrast", "role"),
    [
        ("t1_mprage_sag_p2_iso_post_Gd", False, "t1c"),  # Siemens
        ("AX T1 POST GD", False, "t1c"),  # GE
        ("T1W_3D_TFE +C", False, "t1c"),  # Philips
        ("3D T1 FSPGR", True, "t1c"),  # contrast agent tag set, no hint in the name
        ("t2_tse_dark-fluid_tra", False, "flair"),
        ("t2_space_dark-fluid_sag_p2_iso", False, "flair"),  # Siemens 3D FLAIR
        ("AX T1 FLAIR", False, "t1"),  # GE T1-weighted FLAIR: not the T2 FLAIR input
        ("AX T1 FLAIR +C", False, "t1c"),
        ("t1_tirm_tra_dark-fluid", False, "t1"),  # Siemens T1 TIRM
        ("AX T2 FLAIR", False, "flair"),
        ("t2_tse_tra", False, "t2"),
        ("T2*_GRE", False, ""),
        ("t1_mprage_sag_p2_iso", False, "t1"),
        ("DWI b1000", False, ""),
        ("localizer", False, ""),
        ("Sag BRAVO +C", False, "t1c"),  # GE 3D T1 without "T1" in its name
        ("MPRAGE_POST", False, "t1c"),
        ("AX FSPGR 3D", True, "t1c"),
        ("3DT1", False, "t1"),
        ("AXT1+C", False, "t1c"),  # no space before T1
        ("SAGT1 POST", False, "t1c"),
        ("eT1W_SE_Gd", False, "t1c"),
        ("T1CE", False, "t1c"),
        ("KM T1 tra", False, "t1c"),
        ("REST1 w SMS PF7-8", False, ""),  # a resting-state fMRI: "t1" inside a word
        ("ep2d_bold_rest1", False, ""),
        # contrast words between underscores (Siemens, Philips): they gave the t1 role
        ("t1_se_tra_KM_fs", False, "t1c"),
        ("T1_KM_tra", False, "t1c"),
        ("T1_SE_TRA_CE", False, "t1c"),
        ("T1 POSTCONTRAST", False, "t1c"),
        ("sT1W_3D_TFE_gado", False, "t1c"),
        ("T1 na contrast", False, "t1c"),  # Dutch: after contrast
        ("Sag 3D T1 FSPGR C+", False, "t1c"),
        ("T1 + C", False, "t1c"),
        ("T1 WITH CONTRAST", False, "t1c"),
        ("AX T1 FLAIR PRE", False, "t1"),
        # before or without contrast, whatever else the name says: they were taken for the
        # T1-Gd (and "posterior" read as "post")
        ("T1 pre contrast", False, "t1"),
        ("AX T1 PRE GAD", False, "t1"),
        ("T1 WO CONTRAST", False, "t1"),
        ("T1 w/o contrast", False, "t1"),
        ("T1 without contrast", False, "t1"),
        ("T1 ohne KM", False, "t1"),
        ("T1 sin contraste", False, "t1"),
        ("T1 zonder contrast", False, "t1"),
        ("T1_pre_Gd", False, "t1"),
        ("T1 non-contrast", False, "t1"),
        ("Ax T1 posterior fossa", False, "t1"),
        ("T1 MPRAGE without contrast", True, ""),  # an agent, and a name saying none: neither
        # T2*-weighted, susceptibility-weighted and phase images are no T2: they won over the
        # T2 TSE by their higher series numbers
        ("t2_swi_tra", False, ""),
        ("t2_fl2d_tra_hemo", False, ""),
        ("T2W_FFE", False, ""),
        ("Ax T2 GRE", False, ""),
        ("Ax T2 Star", False, ""),
    ],
)
def test_default_rules_on_scanner_names(description: str, contrast: bool, role: str) -> None:
    s = series(description, contrast=contrast)
    assert assign_roles([s], ROLES).role_of(s.series_instance_uid) == role


def test_siemens_sequence_names_do_not_hide_a_t2() -> None:
    # Siemens sequence names start with '*': not to be mistaken for T2*
    t2 = series("t2_tse_tra_p2", protocol="t2_tse_tra_p2", sequence="*tse2d1_15")
    t2star = series("t2_fl2d_tra_hemo", 2, protocol="T2*", sequence="*fl2d1")
    outcome = assign_roles([t2, t2star], ROLES)
    assert outcome.role_of(t2.series_instance_uid) == "t2"
    assert outcome.role_of(t2star.series_instance_uid) == ""


def test_rt_objects_by_sop_class() -> None:
    rt = series("anything", 2, RTSTRUCT)
    dose = series("anything", 3, RTDOSE)
    outcome = assign_roles([rt, dose], ROLES)
    assert outcome.role_of(rt.series_instance_uid) == "rtstruct"
    assert outcome.role_of(dose.series_instance_uid) == "rtdose"


def test_enhanced_mr_counts() -> None:
    s = series("AX T1 POST GD", cls=ENH_MR)
    assert assign_roles([s], ROLES).role_of(s.series_instance_uid) == "t1c"


def test_missing_required_role_names_what_was_received() -> None:
    outcome = assign_roles([series("AX T2 FLAIR", 3), series("RT", 9, RTSTRUCT)], ROLES)
    assert not outcome.ok
    (problem,) = outcome.problems
    assert problem.startswith("missing required role t1c")
    assert "series 3 'AX T2 FLAIR'" in problem


def test_ambiguous_role_keeps_the_latest_and_says_so() -> None:
    first, repeat = series("AX T1 POST GD", 5), series("AX T1 POST GD repeat", 9)
    outcome = assign_roles([first, repeat, series("RT", 20, RTSTRUCT)], ROLES)
    assert outcome.ok
    assert outcome.role_of(repeat.series_instance_uid) == "t1c"
    assert outcome.role_of(first.series_instance_uid) == ""
    note = {d.series_instance_uid: d.note for d in outcome.decisions}[first.series_instance_uid]
    assert "series 9 (the latest) is used" in note


def test_ambiguous_role_can_be_refused() -> None:
    strict = dataclasses.replace(ROLES, on_ambiguous="fail")
    outcome = assign_roles(
        [series("AX T1 POST GD", 5), series("T1 +C", 9), series("RT", 20, RTSTRUCT)], strict
    )
    assert not outcome.ok
    assert "ambiguous role t1c: expected one matching series, found 2" in outcome.problems[0]


def test_the_nodes_own_outputs_sent_back_are_never_inputs() -> None:
    """A PACS that forwards the whole study back sends the predicted RTSTRUCT (series 9005) and
    derived MR (9006) too; the planning RTSTRUCT and the scanner's T1-Gd keep their roles."""
    from sr_writer.labels import SERIES_NUMBERS, series_description

    t1c, planning = series("AX T1 POST GD", 5), series("RT plan", 20, RTSTRUCT)
    ours = [
        series(series_description("RTSTRUCT"), SERIES_NUMBERS["rtstruct"], RTSTRUCT),
        series(series_description("derived MR"), SERIES_NUMBERS["derived-mr"], contrast=True,
               protocol="AX T1 POST GD"),
    ]  # fmt: skip
    outcome = assign_roles([t1c, planning, *ours], ROLES)
    assert outcome.ok
    assert outcome.role_of(t1c.series_instance_uid) == "t1c"
    assert outcome.role_of(planning.series_instance_uid) == "rtstruct"
    notes = {d.series_instance_uid: d.note for d in outcome.decisions}
    for s in ours:
        assert outcome.role_of(s.series_instance_uid) == ""
        assert notes[s.series_instance_uid] == "a glioforecast output sent back: never an input"


def _notes(outcome) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {d.series_instance_uid: d.note for d in outcome.decisions}


def test_an_acquired_series_comes_before_the_scanners_reformats() -> None:
    """A Siemens 3D T1-Gd and the axial and coronal MPRs the scanner made of it (higher series
    numbers): the acquisition is used, the reformats are tried after it, latest first."""
    mprage = series("t1_mprage_sag_p2_iso_+C", 10)
    tra = series("t1_mprage_sag_p2_iso_+C_MPR_tra", 11, image_type="DERIVED\\PRIMARY\\MPR\\ND")
    cor = series("t1_mprage_sag_p2_iso_+C_MPR_cor", 12, image_type="DERIVED\\PRIMARY\\MPR\\ND")
    outcome = assign_roles([mprage, tra, cor, series("RT", 20, RTSTRUCT)], ROLES)
    assert outcome.ok
    assert outcome.role_of(mprage.series_instance_uid) == "t1c"
    assert _notes(outcome)[cor.series_instance_uid] == (
        "also matches t1c; series 10 (acquired, not derived) is used, this one if that cannot "
        "be converted"
    )
    ranked = ranked_candidates([cor, tra, mprage], ROLES)["t1c"]
    assert [s.series_number for s in ranked] == [10, 12, 11]


def test_a_series_without_image_type_counts_as_acquired() -> None:
    old = series("AX T1 POST GD", 5, image_type="")
    mpr = series("AX T1 POST GD MPR", 6, image_type="DERIVED\\SECONDARY\\REFORMATTED")
    assert assign_roles([old, mpr], ROLES).role_of(old.series_instance_uid) == "t1c"


@pytest.mark.parametrize(
    "image_type",
    [
        "DERIVED\\PRIMARY\\MIP_TRA",  # Siemens MIP
        "DERIVED\\PRIMARY\\PROJECTION IMAGE",  # Philips MIP (a defined term of value 3)
        "DERIVED\\PRIMARY\\M\\ND\\SUB",  # Siemens subtraction
        "DERIVED\\PRIMARY\\T1 MAP",  # a map named like a T1
        "DERIVED,ORIGINAL\\PRIMARY\\M\\ND",  # one MIP image among the originals
    ],
)
def test_projections_subtractions_and_maps_get_no_role(image_type: str) -> None:
    mip = series(
        "T1 +C MIP", 30, image_type=image_type.replace("DERIVED,", "DERIVED\\PRIMARY\\MIP,")
    )
    t1c = series("AX T1 POST GD", 5)
    outcome = assign_roles([t1c, mip, series("RT", 20, RTSTRUCT)], ROLES)
    assert outcome.ok
    assert outcome.role_of(t1c.series_instance_uid) == "t1c"
    assert outcome.role_of(mip.series_instance_uid) == ""
    assert _notes(outcome)[mip.series_instance_uid].startswith(
        "matches t1c but not used: ImageType "
    )
    assert mip not in ranked_candidates([t1c, mip], ROLES)["t1c"]


def test_a_study_with_only_a_subtraction_says_why_it_has_no_t1c() -> None:
    sub = series("T1 +C SUB", 31, image_type="DERIVED\\PRIMARY\\M\\ND\\SUB")
    outcome = assign_roles([sub, series("RT", 20, RTSTRUCT)], ROLES)
    (problem,) = outcome.problems
    assert problem.startswith("missing required role t1c: no series matched")
    assert problem.endswith(
        "left out for their ImageType (roles.exclude_image_types): series 31 'T1 +C SUB' "
        "(MR Image Storage, 10 instances), ImageType SUB"
    )
    # a site that wants them anyway empties the list
    anything = dataclasses.replace(ROLES, exclude_image_types=())
    assert assign_roles([sub], anything).role_of(sub.series_instance_uid) == "t1c"


def test_a_t2_flair_is_not_taken_for_a_t1_flair_by_its_protocol_name() -> None:
    s = series("AX T2 FLAIR", protocol="BRAIN T1 T2 FLAIR")
    assert assign_roles([s], ROLES).role_of(s.series_instance_uid) == "flair"


def test_a_siemens_mprage_is_known_by_its_sequence_name() -> None:
    s = series("sag_iso_1mm", sequence="*tfl3d1_16ns")
    assert assign_roles([s], ROLES).role_of(s.series_instance_uid) == "t1"


def _roles(study: list[SeriesSummary]) -> dict[str, str]:
    outcome = assign_roles(study, ROLES)
    return {s.series_description: outcome.role_of(s.series_instance_uid) for s in study}


def test_an_exam_protocol_name_in_every_series_does_not_decide_the_roles() -> None:
    # GE writes the exam's protocol in each series' ProtocolName: its "+C" is no contrast of
    # the pre-contrast T1, and its "T1" does not make the T2 FLAIR a T1 FLAIR
    exam = "BRAIN TUMOR T1 W/WO +C"
    study = [
        series("Ax T1 SE", 2, protocol=exam),
        series("Ax T2 FLAIR", 3, protocol=exam),
        series("Ax T2 FSE", 4, protocol=exam),
        series("Ax T1 SE", 7, protocol=exam, contrast=True),
    ]
    outcome = assign_roles(study, ROLES)
    assert [outcome.role_of(s.series_instance_uid) for s in study] == ["t1", "flair", "t2", "t1c"]

    # without a post-contrast series the study has no T1-Gd: before, the pre-contrast T1 was
    # taken for one, and the model was run on it
    pre_only = study[:3]
    outcome = assign_roles(pre_only, ROLES)
    assert [outcome.role_of(s.series_instance_uid) for s in pre_only] == ["t1", "flair", "t2"]
    assert any("missing required role t1c" in p for p in outcome.problems)


def test_an_exam_protocol_carried_by_most_series_does_not_decide_the_roles() -> None:
    """A perfusion map or a screen save made on the console carries another ProtocolName (or
    none): the exam's "+C" then leaked back into every series, and the pre-contrast T1 became
    a T1-Gd candidate (and the fallback when the T1-Gd could not be converted)."""
    exam = "BRAIN TUMOR W/WO +C"
    study = [
        series("Ax T1 SE", 2, protocol=exam),
        series("Ax T2 FLAIR", 3, protocol=exam),
        series("Sag 3D T1 BRAVO", 9, protocol=exam, contrast=True),
        series("rCBV", 20, protocol=""),
    ]
    assert _roles(study) == {"Ax T1 SE": "t1", "Ax T2 FLAIR": "flair", "Sag 3D T1 BRAVO": "t1c",
                             "rCBV": ""}  # fmt: skip
    assert [s.series_description for s in ranked_candidates(study, ROLES)["t1c"]] == [
        "Sag 3D T1 BRAVO"
    ]


def test_a_t1gd_with_its_agent_comes_before_one_without() -> None:
    """Two T1-Gd candidates, only one of whose images name a contrast agent: that one is
    used, whatever the series numbers (the ranking went by number alone)."""
    study = [series("T1 MPRAGE +C", 9, contrast=True), series("AX T1 POST", 12)]
    assert [s.series_number for s in ranked_candidates(study, ROLES)["t1c"]] == [9, 12]


@pytest.mark.parametrize(("agent", "named"), [("NONE", False), ("No", False), ("n/a", False),
                                              ("Gadovist", True), ("", False)])  # fmt: skip
def test_a_placeholder_contrast_agent_names_none(agent: str, named: bool) -> None:
    """Consoles that write 'NONE' in ContrastBolusAgent for a pre-contrast series made it the
    T1-Gd."""
    from pydicom.dataset import Dataset

    from dicom_node.instance import _names_agent

    ds = Dataset()
    ds.ContrastBolusAgent = agent
    assert _names_agent(ds) is named


def test_a_protocol_name_of_the_series_own_still_counts() -> None:
    # Siemens and Philips name each series' protocol: a hint there still gives the role
    study = [
        series("Series 5", 5, protocol="t1_mprage_tra_post_Gd"),
        series("Series 3", 3, protocol="t2_tirm_tra_dark-fluid"),
    ]
    assert _roles(study) == {"Series 5": "t1c", "Series 3": "flair"}
    # a protocol shared by all series is still read where a series has no description
    shared = "T1 MPRAGE POST GD"
    bare = [series("", 1, protocol=shared), series("", 2, protocol=shared)]
    outcome = assign_roles(bare, ROLES)
    assert "t1c" in {outcome.role_of(s.series_instance_uid) for s in bare}


def test_a_later_rt_study_reopens_only_an_mr_study_whose_t1gd_it_fits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The RT study arrives after the MR study. A structure set on the FLAIR's frame of
    reference (another session), not the T1-Gd's, reopened the MR study, which then could not
    link it and failed again "missing required role rtstruct", while the RT study's job said
    its objects were used there. Only a structure set on a T1-Gd candidate's frame reopens."""
    import time

    from pydicom.uid import generate_uid

    from dicom_node.jobs import JobStore
    from dicom_node.linking import Linker
    from dicom_node.spool import Spool
    from tests import factories
    from tests.dicom_node.test_jobs import _receive

    study_uid, t1c_frame, flair_frame = generate_uid(), generate_uid(), generate_uid()
    mr = [
        *factories.mr_series(tmp_path / "t1c", "AX T1 POST GD", study_uid=study_uid,
                             frame_uid=t1c_frame, series_number=5, contrast=True),
        *factories.mr_series(tmp_path / "flair", "AX T2 FLAIR", study_uid=study_uid,
                             frame_uid=flair_frame, series_number=3),
    ]  # fmt: skip
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    now = time.time()
    _receive(spool, store, mr, now)
    linker = Linker(store, spool.root)
    for frame, reopened in ((flair_frame, []), (t1c_frame, [study_uid])):
        rt_study = generate_uid()
        rs = factories.rtstruct(tmp_path / f"rt-{frame}", study_uid=rt_study, frame_uid=frame)
        _receive(spool, store, [rs], now + 60)
        rt = store.series_of_study(rt_study)
        assert linker.mr_studies_for(rt_study, rt, now - 86400, ROLES) == reopened
