"""``glioforecast demo``: the whole round trip with the embedded PACS, and the PACS choice.

The round trip is the demo itself (a real ``glioforecast serve`` process, a real C-STORE client,
the embedded pynetdicom Storage SCP as the PACS) with a 4 mm synthetic patient and a 1 s quiet
period, so that it fits in about a minute on 2 cores. "Orthanc is missing" is made real by
pointing ``$GLIOFORECAST_ORTHANC`` at a path where nothing is.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from dicom_node import cli, demo
from dicom_node.errors import GlioforecastError
from dicom_node.local_pacs import ENV_ORTHANC, EmbeddedPacs
from dicom_node.outbox import Outbox
from inference.bundled import demo_model_dir
from inference.model_dir import read_model_yaml
from sr_writer.structured_report import read_summary

OUTPUT_SUFFIXES = {"T1-Gd SC", "UNCERTAINTY SC", "SEG", "RTSTRUCT", "SR"}


def _printed(stdout: str, label: str) -> str:
    match = re.search(rf"^    {re.escape(label)}\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"the demo printed no {label!r} line:\n{stdout}"
    return match.group(1).strip()


@pytest.mark.slow
def test_demo_round_trip_with_the_embedded_pacs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--pacs auto`` on a machine without Orthanc: the embedded SCP is the PACS."""
    missing = tmp_path / "no-such-orthanc"
    monkeypatch.setenv(ENV_ORTHANC, str(missing))
    out = tmp_path / "demo"
    assert demo.run(out, seed=3, pacs_mode="auto", quiet_period_s=1, spacing_mm=4.0) == 0
    stdout = capsys.readouterr().out
    assert "local PACS: embedded storage SCP LOCALPACS on 127.0.0.1:" in stdout
    assert "predictor: " in stdout and "inference/models/demo" in stdout
    assert f"(no Orthanc at {missing})" in stdout
    # every result was committed by the PACS before the demo said so
    assert "results stored and committed by the PACS (storage commitment)" in stdout
    with Outbox(out / "node" / "outbox.sqlite3") as outbox:
        items = outbox.items()
    assert items and all(i.state == "sent" and i.committed_at is not None for i in items)

    # what arrived, read from the PACS' storage folder by a fresh PACS on it
    source = sorted((out / "synthetic").glob("*/dicom/pre/**/*.dcm"))
    study_uid = str(dcmread(source[0], stop_before_pixels=True).StudyInstanceUID)
    pacs = EmbeddedPacs(out / "pacs").start()
    try:
        assert pacs.studies() == [study_uid]
        series = pacs.study_series(study_uid)
        results = [s for s in series if s.description.startswith("SYNTHETIC PREDICTION")]
        assert {s.description.rsplit(" - ", 1)[1] for s in results} == OUTPUT_SUFFIXES
        sources = [s for s in series if s not in results]
        assert sum(len(s.instances) for s in sources) == len(source)
        (t1c,) = [s for s in sources if s.description.endswith("post_Gd")]
        (sc,) = [s for s in results if s.description.endswith("T1-Gd SC")]
        assert len(sc.instances) == len(t1c.instances)
        (sr_series,) = [s for s in results if s.modality == "SR"]
        sr = dcmread(pacs.path(sr_series.instances[0]))
        numbers = read_summary(sr)
        first = pacs.read(sc.instances[0])
        # the node predicted with the bundled demo model, and the outputs say so
        bundled = read_model_yaml(demo_model_dir())[0]
        assert f"{bundled.name} {bundled.version}" in list(first.SoftwareVersions)
        panel = (int(first.Columns), int(first.Rows))
        (unc_series,) = [s for s in results if s.description.endswith("UNCERTAINTY SC")]
        unc_rows = int(pacs.read(unc_series.instances[0]).Rows)  # its legend makes it taller
    finally:
        pacs.stop()

    # the numbers the demo printed are the SR's
    # the volume the change is computed from is the model's own reading, said as such; the GTV
    # of the structure set is reported apart, and is the synthetic truth's (the SR called the
    # model's reading, 26.8 ml, "GTV before treatment" where the GTV was 44.1 ml)
    assert _printed(stdout, "before treatment") == (
        f"{numbers['current_ml']:.1f} ml (Enhancing tumour pre-treatment (model))"
    )
    assert isinstance(numbers["gtv_ml"], float)
    assert _printed(stdout, "GTV (structure set)") == f"{numbers['gtv_ml']:.1f} ml"
    truth_gtv = float(_printed(stdout, "synthetic truth").split()[1])
    assert numbers["gtv_ml"] == pytest.approx(truth_gtv, rel=0.05)
    assert _printed(stdout, "predicted volume") == (
        f"{numbers['predicted_mean_ml']:.1f} ml (sd {numbers['predicted_sd_ml']:.1f})"
    )
    assert _printed(stdout, "outlined (SEG, RTSTRUCT)") == (
        f"{numbers['segment_ml']:.1f} ml (where the samples agree)"
    )
    assert _printed(stdout, "change") == f"{numbers['change_percent']:+.0f} %"
    assert _printed(stdout, "predicted response") == numbers["category"]
    shares = numbers["probabilities"]
    assert isinstance(shares, dict) and len(shares) == 4  # one per response category
    assert _printed(stdout, "over the samples") == ", ".join(
        f"{name} {value:.0f} %" for name, value in shares.items()
    )
    # no survival class is known: the samples' scenario is the bundled model's own
    assert (
        _printed(stdout, "survival scenario")
        == numbers["scenario"]
        == (
            "Samples across survival classes (class unknown)"
            if bundled.inference.unknown_class == "marginal"
            else "Unconditional (no survival guidance)"
        )
    )
    for suffix in OUTPUT_SUFFIXES:
        assert re.search(rf"^    \w+\s+\d+  SYNTHETIC PREDICTION.* - {suffix}$", stdout, re.M)

    with Image.open(out / "montage.png") as picture:  # pre-treatment | prediction | uncertainty
        assert picture.size == (3 * panel[0], max(panel[1], unc_rows))  # none squeezed
    # the montage is on the tumour: its slice carries the predicted outline or, when the model
    # predicts no tumour left, the current GTV (it once showed the first slice, above the head)
    assert "montage slice: " in stdout
    assert re.search(
        r"montage slice: \d+ of \d+, (the predicted outline|the largest GTV contour)", stdout
    )


def test_a_node_that_refuses_to_start_is_reported_with_its_log(tmp_path: Path) -> None:
    """The demo's node exits at once (here: a model whose weights were cut short): the demo
    says so with the end of the node's log, rather than waiting a minute for a C-ECHO."""
    import shutil

    from inference.bundled import demo_model_dir

    broken = tmp_path / "broken-model"
    shutil.copytree(demo_model_dir(), broken)
    weights = broken / "autoencoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GlioforecastError) as info:
        demo.run(tmp_path / "demo", seed=3, pacs_mode="embedded", spacing_mm=4.0,
                 model=str(broken))  # fmt: skip
    said = str(info.value)
    # said as the node exited (a C-ECHO wait that ran out would say it timed out)
    assert "the node exited with status 2 before answering C-ECHO" in said
    assert f"found {broken}, which does not: " in said and "autoencoder.safetensors" in said


def test_forced_orthanc_that_is_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-orthanc"
    monkeypatch.setenv(ENV_ORTHANC, str(missing))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--pacs", "orthanc", "--out", str(out)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"--pacs orthanc: expected the Orthanc binary at {missing}, found none" in err
    assert "--pacs embedded" in err
    assert not out.exists(), "nothing is made before the PACS is known"


def test_auto_takes_orthanc_when_found_and_the_embedded_scp_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ORTHANC, str(tmp_path / "no-such-orthanc"))
    assert demo.choose_pacs("auto") == "embedded"
    assert demo.choose_pacs("embedded") == "embedded"
    binary = tmp_path / "Orthanc"
    binary.write_text("")  # found is all that auto asks; starting it is OrthancServer's job
    monkeypatch.setenv(ENV_ORTHANC, str(binary))
    assert demo.choose_pacs("auto") == "orthanc"
    assert demo.choose_pacs("orthanc") == "orthanc"
    assert demo.choose_pacs("embedded") == "embedded"
    with pytest.raises(GlioforecastError, match="expected one of auto, orthanc, embedded"):
        demo.choose_pacs("dcm4chee")


def test_demo_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["demo"])
    assert (args.pacs, args.quiet_period, args.model) == ("auto", None, "bundled")
    args = cli.build_parser().parse_args(["demo", "--pacs", "embedded", "--quiet-period", "2.5"])
    assert (args.pacs, args.quiet_period) == ("embedded", 2.5)
    for bad in (["--pacs", "dcm4chee"], ["--quiet-period", "-1"], ["--quiet-period", "nan"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["demo", *bad])
    err = capsys.readouterr().err
    assert "expected a number of seconds >= 0, found 'nan'" in err


def test_montage_slice_prefers_the_outline_then_the_gtv() -> None:
    blank = np.zeros((8, 8, 3), dtype=np.uint8)
    outlined = blank.copy()
    outlined[2, 2:6] = (255, 0, 0)
    longer = blank.copy()
    longer[3, 1:8] = (255, 0, 0)
    grey = np.full((8, 8, 3), 120, dtype=np.uint8)  # no outline colour
    uids = ["a", "b", "c", "d"]
    gtv = {"a": 50.0, "b": 400.0, "c": 10.0}
    assert demo.montage_slice([blank, outlined, longer, grey], uids, gtv) == (2, "outline")
    # no tumour predicted on any slice: where the GTV is largest
    assert demo.montage_slice([blank, grey, blank, grey], uids, gtv) == (1, "gtv")
    # neither: the middle slice
    assert demo.montage_slice([blank, grey, blank, grey], uids, {}) == (2, "middle")


def test_gtv_contour_areas_add_up_to_the_gtv(tmp_path: Path) -> None:
    from inference.synthetic.cohort import dicom_study_dir, generate_patient

    record = generate_patient(0, 5, tmp_path, spacing_mm=4.0, formats=("dicom",))
    study = dicom_study_dir(tmp_path, record.patient_id)
    headers = [dcmread(f, stop_before_pixels=True) for f in sorted(study.rglob("*.dcm"))]
    areas = demo.gtv_contour_areas(headers)
    t1c = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
           for f in sorted((study).glob("003_t1c/*.dcm"))}  # fmt: skip
    assert areas and set(areas) <= set(t1c)
    thickness = float(dcmread(next(iter(t1c.values())), stop_before_pixels=True).SliceThickness)
    volume_ml = sum(areas.values()) * thickness / 1000.0
    # polygons through voxel centres against voxel counts: within a fifth on a 4 mm grid
    assert volume_ml == pytest.approx(float(record.values["gtv_ml"]), rel=0.2)
    assert demo.gtv_contour_areas(headers, roi_name="NO SUCH ROI") == {}


def test_the_demo_replaces_only_an_earlier_demos_output(tmp_path: Path) -> None:
    """`demo --out DIR` removed whatever DIR held: `--out .` the checkout, `--out ~` the home
    folder. It replaces an earlier demo's output (marked, or of a demo's files only) and refuses
    anything else, removing nothing."""
    from dicom_node.demo import DEMO_MARK, clear_output
    from dicom_node.errors import GlioforecastError

    precious = tmp_path / "home"
    (precious / "thesis").mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(GlioforecastError, match=r"found other files \(notes\.txt, thesis\); "
                       r"nothing was removed"):  # fmt: skip
        clear_output(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(GlioforecastError, match="expected a folder"):
        clear_output(afile)
    marked = tmp_path / "marked"
    (marked / "pacs" / "storage").mkdir(parents=True)
    (marked / DEMO_MARK).write_text("")
    (marked / "something-a-demo-wrote-later").write_text("")
    clear_output(marked)
    assert not marked.exists()
    legacy = tmp_path / "demo-output"  # an earlier version's output: no mark, a demo's files
    (legacy / "node").mkdir(parents=True)
    (legacy / "montage.png").write_bytes(b"")
    clear_output(legacy)
    assert not legacy.exists()
    clear_output(tmp_path / "absent")  # nothing there: nothing to do
