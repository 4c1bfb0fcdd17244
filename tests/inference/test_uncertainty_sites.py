"""``python -m bench.uncertainty_sites``: the per-site uncertainty rows of evaluation reports."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.uncertainty_sites import main
from dicom_node.types import RESPONSE_CATEGORIES
from inference.evaluate import METRIC_KEYS, PatientResult


def _patient(pid: str, site: str, category: str, truth: float, predicted: float) -> PatientResult:
    metrics = dict.fromkeys(METRIC_KEYS, 0.0)
    metrics["mae_tumour"] = abs(truth - predicted) / 10
    return PatientResult(
        patient_id=pid, site=site, truth_category=category, survival_class="long",
        predicted_category="partial_response",
        probabilities={c: float(c == "partial_response") for c in RESPONSE_CATEGORIES},
        truth_volume_ml=truth, predicted_volume_ml=predicted, current_volume_ml=20.0,
        metrics=metrics, spread=predicted / 20, seconds=0.1, sample_volumes_ml=(1.0, 2.0),
    )  # fmt: skip


def _report(path: Path, patients: list[PatientResult], kind: str = "latent-diffusion") -> Path:
    entry = {"kind": kind, "per_patient": [asdict(p) for p in patients]}
    path.write_text(json.dumps({"methods": {"demo 1.0 (x)": entry, "no-change": {
        "kind": "no-change", "per_patient": []}}}))  # fmt: skip
    return path


def test_sites_of_each_report_and_the_case_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # validation: the spread ranks the errors (small true tumours, the model draws them)
    val = [
        _patient(f"GF00002-000{i}", "SITE-A", "partial_response", t, p)
        for i, (t, p) in enumerate(((1.0, 1.0), (3.0, 2.0), (8.0, 5.0)), start=1)
    ]
    # fresh: tumours that stay, which the model does not draw: larger truth, smaller spread
    stays = (("stable_disease", 30.0, 1.0), ("stable_disease", 10.0, 2.0))
    rows = (*stays, ("complete_response", 0.0, 3.0))
    fresh = [
        _patient(f"GF00010-000{i}", "SITE-B", c, t, p) for i, (c, t, p) in enumerate(rows, start=1)
    ]
    a = _report(tmp_path / "a.json", val)
    b = _report(tmp_path / "b.json", fresh)
    out = tmp_path / "doc" / "sites.md"
    assert main([f"validation={a}", f"fresh={b}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text()
    assert "| validation | SITE-A/2 | 3 | 100% | 4.0 / 2.7 | +1.00 | +1.00 | +1.00 |" in text
    assert "| fresh | SITE-B/10 | 3 | 33% | 13.3 / 2.0 | -1.00 | +1.00 | -1.00 |" in text
    assert "| validation | 1 | +1.00 | n/a | 1 |" in text
    assert "| fresh | 1 | -1.00 | n/a | 0 |" in text
    assert "share of responding tumours +1.00, with the mean true volume -1.00" in text
    assert "with the predicted volume in 2 of 2 sites" in text
    assert "demo 1.0 (x)" in text and "Measured" in text


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-label-here"]) == 2
    assert "expected LABEL=PATH" in capsys.readouterr().err
    unet = _report(tmp_path / "u.json", [], kind="unet-baseline")
    assert main([f"x={unet}"]) == 2
    assert "expected one latent diffusion model, found none" in capsys.readouterr().err
    assert main([f"x={tmp_path / 'missing.json'}"]) == 2
    assert "expected a readable metrics.json" in capsys.readouterr().err
