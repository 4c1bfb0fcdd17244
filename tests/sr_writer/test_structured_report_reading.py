"""The TID 1500 report as a radiologist reads it: rendered by dcmtk (dsrdump, dsr2html), it says
what each number is, gives numbers to a reader's precision and says in its body that it is a
synthetic prediction for research use only."""

from __future__ import annotations

import dataclasses
import functools
import html
import re
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from sr_writer.labels import Equipment
from sr_writer.outputs import OutputOptions, build_outputs, job_identity
from sr_writer.structured_report import build_structured_report, figures_of, read_summary
from tests.conftest import tool
from tests.sr_writer.synthetic_job import default_case, default_outputs, job_inputs
from tests.sr_writer.test_dciodvfy_outputs import dciodvfy_errors

#: the GTV of the source structure set, as the demo study's (the model reads 26.8 ml there)
GTV_ML = 44.1234
#: the groups' tracking identifiers, as the reader sees them (at most 40 characters: dsr2html
#: shows longer text in an annex, away from the number)
CURRENT_TRACKING = "Enhancing tumour pre-treatment (model)"
CURRENT_GTV_TRACKING = "GTV before treatment"
GTV_TRACKING = "GTV of the source structure set"


def _report(**kwargs: object) -> Dataset:
    """The default case's report, built directly with ``kwargs`` (``gtv_volume_ml``,
    ``current_from``)."""
    case = default_case()
    inputs = job_inputs(case)
    out = default_outputs()
    sr = build_structured_report(
        prediction=case.prediction,
        source_t1c=inputs.t1c,
        source_series=inputs.t1c_series,
        patient=inputs.patient,
        job=job_identity(case.prediction, inputs),
        equipment=Equipment(
            model_name=case.prediction.model_name,
            model_version=case.prediction.model_version,
            node_version="0.1.0",
        ),
        seg=out.seg,
        other_sources=inputs.other_series,
        **kwargs,  # type: ignore[arg-type]
    )
    return sr


def _saved(ds: Dataset, tmp_path: Path) -> Path:
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dsrdump(path: Path) -> str:
    proc = subprocess.run(
        [tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _dsr2html(path: Path) -> str:
    """The page dsr2html renders with its defaults, as text (tags removed)."""
    out = path.with_suffix(".html")
    proc = subprocess.run(
        [tool("dsr2html"), str(path), str(out)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    text = html.unescape(re.sub(r"<[^>]+>", " ", out.read_text(encoding="utf-8")))
    return re.sub(r"\s+", " ", text)


@functools.cache
def _default_texts(folder: str) -> tuple[str, str]:
    path = _saved(default_outputs().sr, Path(folder))
    return _dsrdump(path), _dsr2html(path)


@pytest.fixture
def default_texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return _default_texts(str(tmp_path_factory.mktemp("default-sr")))


_NUM = re.compile(r'<contains NUM:\(,,"(?P<name>[^"]+)"\)="(?P<value>[^"]+)" \((?P<unit>[^,]+),')


def test_the_pre_treatment_volume_is_labelled_as_the_models_measurement(
    default_texts: tuple[str, str],
) -> None:
    """By default the current volume is the model's reading of the pre-treatment T1-Gd
    (roughly the enhancing tumour), not the GTV: the report says so where it gives it, and
    the relative change names the volume it is relative to."""
    dump, page = default_texts
    fig = figures_of(default_case().prediction)
    for text in (dump, page):
        assert "GTV before treatment" not in text
        assert CURRENT_TRACKING in text
        assert "Enhancing Lesion" in text
        assert "Measured by the model on the pre-treatment T1-Gd" in text
    group = dump[dump.index(CURRENT_TRACKING) : dump.index('"Predicted tumour"')]
    assert f'<contains NUM:(,,"Volume")="{fig.current_volume_ml:.2f}" (ml,' in group
    assert 'TEXT:(,,"Algorithm Name")="glioforecast-ldm-demo"' in group
    assert (
        '<contains NUM:(,,"Change of mean volume from model pre-treatment volume")='
        f'"{fig.relative_change_percent:.1f}" (%,' in dump
    )


def test_the_gtv_of_the_structure_set_is_its_own_measurement(tmp_path: Path) -> None:
    """When the GTV's volume is known it is given apart, labelled as the GTV; the change stays
    relative to the model's pre-treatment volume."""
    sr = _report(gtv_volume_ml=GTV_ML)
    dump = _dsrdump(_saved(sr, tmp_path))
    fig = figures_of(default_case().prediction)
    gtv = dump[dump.index(GTV_TRACKING) : dump.index(CURRENT_TRACKING)]
    assert "GTV as contoured in the source RT structure set" in gtv
    assert '<contains NUM:(,,"Volume")="44.12" (ml,' in gtv
    numbers = read_summary(sr)
    assert numbers["gtv_ml"] == pytest.approx(44.12)
    assert numbers["current_label"] == CURRENT_TRACKING
    assert numbers["current_ml"] == pytest.approx(fig.current_volume_ml, abs=0.0051)
    assert numbers["change_percent"] == pytest.approx(fig.relative_change_percent, abs=0.051)
    errors, text = dciodvfy_errors(tool("dciodvfy"), tmp_path / "sr.dcm")
    assert text.strip() and errors == [], errors


def test_a_current_volume_taken_from_the_gtv_is_labelled_as_the_gtv(tmp_path: Path) -> None:
    sr = _report(current_from="mask", gtv_volume_ml=GTV_ML)
    dump = _dsrdump(_saved(sr, tmp_path))
    assert CURRENT_GTV_TRACKING in dump and CURRENT_TRACKING not in dump
    assert GTV_TRACKING not in dump  # the current volume is the GTV's: not given twice
    assert "Enhancing Lesion" not in dump
    assert '"Relative volume change from pre-treatment"' in dump
    numbers = read_summary(sr)
    assert numbers["current_label"] == CURRENT_GTV_TRACKING and numbers["gtv_ml"] is None


def test_numbers_are_written_to_a_readers_precision(default_texts: tuple[str, str]) -> None:
    """Volumes to 0.01 ml, percentages to 0.1 %; no float with more digits beside them."""
    dump, page = default_texts
    fig = figures_of(default_case().prediction)
    nums = [m.groupdict() for line in dump.splitlines() if (m := _NUM.match(line.strip()))]
    assert len(nums) == 11  # pre-treatment, 5 predicted volumes, change, 4 probabilities
    for num in nums:
        decimals = 2 if num["unit"] == "ml" else 1
        assert re.fullmatch(rf"-?\d+\.\d{{{decimals}}}", num["value"]), num
    values = {n["value"] for n in nums}
    for volume in (fig.predicted_mean_ml, fig.predicted_sd_ml, fig.segment_volume_ml):
        assert f"{volume:.2f}" in values
        assert f"{volume:.2f} ml" in page
    assert f"{fig.relative_change_percent:.1f} %" in page

    def measured(items: list[Dataset]) -> list[Dataset]:
        found = []
        for item in items:
            found.extend(item.get("MeasuredValueSequence", []))
            found.extend(measured(list(item.get("ContentSequence", []))))
        return found

    values_written = measured(list(default_outputs().sr.ContentSequence))
    assert len(values_written) == 11
    assert not any("FloatingPointValue" in v for v in values_written)


def test_decimal_strings_fit_a_ds() -> None:
    from sr_writer.structured_report import _decimal

    assert _decimal(3.68, 2) == "3.68"
    assert _decimal(4.55750106966526, 2) == "4.56"
    assert _decimal(-86.276849642005, 1) == "-86.3"
    assert _decimal(-0.04, 1) == "0.0"  # no negative zero
    huge = _decimal(1.234e20, 1)
    assert len(huge) <= 16 and float(huge) == pytest.approx(1.234e20)


def test_the_outlined_volume_says_what_it_is(default_texts: tuple[str, str]) -> None:
    """The segment's volume is not an unqualified "Volume" beside the samples' mean: its
    measurement method says it is the volume outlined where the samples agree."""
    dump, page = default_texts
    fig = figures_of(default_case().prediction)
    lines = [line.strip() for line in dump.splitlines()]
    at = lines.index(
        f'<contains NUM:(,,"Volume")="{fig.segment_volume_ml:.2f}" (ml,UCUM,"milliliter")>'
    )
    assert lines[at + 1] == (
        '<has concept mod CODE:(,,"Measurement Method")='
        '(GLF009,99GLIOFC,"Outlined where the samples agree (the segment)")>'
    )
    assert "Measurement Method = Outlined where the samples agree (the segment)" in page


def test_the_report_body_says_it_is_a_synthetic_prediction_for_research_use_only(
    default_texts: tuple[str, str],
) -> None:
    dump, page = default_texts
    statement = "Synthetic prediction, research use only, not for clinical use"
    # in the content tree, not only in the header's series description
    assert statement in dump[dump.index("Imaging Measurement Report") :]
    assert statement in page[page.index("Imaging Measurement Report") :]
    assert "computed by the model glioforecast-ldm-demo 0.1.0" in page
    assert '<contains CONTAINER:(,,"Qualitative Evaluations")' in dump


def test_the_no_change_baselines_current_volume_is_labelled_as_the_gtv(tmp_path: Path) -> None:
    """The node's predictor while no model is installed takes the GTV as the tumour before
    treatment: its report, built as the node builds it, says GTV, not the model's reading."""
    case = default_case()
    prediction = dataclasses.replace(case.prediction, current_from="mask")
    sr = build_outputs(prediction, job_inputs(case), OutputOptions(node_version="0.1.0")).sr
    dump = _dsrdump(_saved(sr, tmp_path))
    assert f'"Tracking Identifier")="{CURRENT_GTV_TRACKING}"' in dump
    assert CURRENT_TRACKING not in dump and "Enhancing Lesion" not in dump
    assert "GTV as contoured in the source RT structure set" in dump
