"""The labelling attributes are cut at their own VR's limit, never at another's."""

from __future__ import annotations

import datetime

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from dicom_node.errors import ExportError
from sr_writer.labels import Equipment, node_contribution
from sr_writer.notice import build_failure_notice
from tests.sr_writer.synthetic_job import default_case, default_notice, default_outputs

WHEN = datetime.datetime(2026, 3, 1, 12, 0, 0)


def _ours(ds: Dataset) -> Dataset:
    """The node's item of the ContributingEquipmentSequence (highdicom adds its own)."""
    (item,) = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "glioforecast"]
    return item


def test_every_output_names_the_model_and_research_use_in_full() -> None:
    """ContributionDescription is an ST (1024 characters): the research-use statement was cut
    at the 64 characters of an LO ("..., research use ~")."""
    case = default_case()
    label = f"{case.prediction.model_name} {case.prediction.model_version}"
    expected = f"synthetic prediction by {label}, research use only"
    assert len(expected) > 64  # what the LO limit cut
    for ds in default_outputs().all():
        assert _ours(ds).ContributionDescription == expected, ds.Modality


def test_long_values_are_cut_at_the_limit_of_their_own_vr() -> None:
    long_model = "m" * 100
    equipment = Equipment(
        model_name=long_model,
        model_version="1.0",
        node_version="0.1.0",
        institution_name="Hôpital universitaire de la Région",
        station_name="GLIOFORECAST-NODE-RADIOLOGY-3",
    )
    item = equipment.contributing_equipment(WHEN)
    assert dictionary_VR("ManufacturerModelName") == "LO"
    assert len(item.ManufacturerModelName) == 64 and item.ManufacturerModelName.endswith("~")
    assert dictionary_VR("StationName") == "SH"
    assert item.StationName == "GLIOFORECAST-NO~"  # 16 characters, an SH's most
    assert all(len(v) <= 64 for v in item.SoftwareVersions)
    assert item.InstitutionName == "Hôpital universitaire de la Région"
    # the description keeps the whole model name: an ST holds 1024 characters
    assert item.ContributionDescription == (
        f"synthetic prediction by {long_model} 1.0, research use only"
    )
    from sr_writer.labels import fit

    assert fit("ContributionDescription", "x" * 2000) == "x" * 1023 + "~"


def test_notice_and_rejection_descriptions_are_whole() -> None:
    sc, sr = build_failure_notice(default_notice(), default_case().patient, "0.1.0")
    for ds in (sc, sr):
        assert _ours(ds).ContributionDescription == "failure notice: no prediction was made"
    text = "rejection of results that no longer apply, " * 3
    assert node_contribution("0.1.0", WHEN, text).ContributionDescription == text


def test_fit_refuses_an_attribute_without_a_text_vr() -> None:
    from sr_writer.labels import fit

    with pytest.raises(ExportError, match="ContributionDateTime"):
        fit("ContributionDateTime", "20260301")
