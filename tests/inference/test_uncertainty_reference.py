"""bench.uncertainty_reference: the generator re-simulated, then its treatment drawn again."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from bench.uncertainty_reference import LEVELS, main, simulate_patient
from dicom_node.errors import InputError
from inference.synthetic.cohort import PatientRecord

Cohort = tuple[Path, list[PatientRecord]]


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "cohort.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_truth_is_re_simulated_and_the_draws_vary(tiny_cohort: Cohort) -> None:
    rows = _rows(tiny_cohort[0])
    first = [simulate_patient(r, draws=3) for r in rows]
    for row, p in zip(rows, first, strict=True):
        assert p.truth_ml == pytest.approx(float(row["post_enhancing_ml"]), abs=1e-3)
        assert set(p.draws_ml) == set(LEVELS)
        assert all(len(v) == 3 and min(v) >= 0 for v in p.draws_ml.values())
    # the treatment draws differ from one another somewhere in the cohort
    assert any(p.spread(LEVELS[0]) > 0 for p in first)
    # and the same command gives the same draws
    again = simulate_patient(rows[0], draws=3)
    assert again.draws_ml == first[0].draws_ml


def test_a_table_from_another_generator_is_refused(tiny_cohort: Cohort) -> None:
    row = dict(_rows(tiny_cohort[0])[0])
    row["post_enhancing_ml"] = str(float(row["post_enhancing_ml"]) + 5.0)
    with pytest.raises(InputError, match=r"re-simulated .* ml, the table has .* ml"):
        simulate_patient(row, draws=2)


def test_report_with_a_model_evaluation_beside_it(tiny_cohort: Cohort, tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("cohort.csv", "sites.csv"):
        shutil.copy(tiny_cohort[0] / name, cohort / name)
    rows = _rows(cohort)
    per_patient = [
        {
            "patient_id": r["patient_id"],
            "spread": 0.1 * (i + 1),
            "sample_volumes_ml": [1.0, 1.0 + i],
            "metrics": {"abs_volume_error_ml": float(i), "mae_tumour": 0.5 * (i + 1)},
        }
        for i, r in enumerate(rows)
    ]
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"methods": {"m": {"per_patient": per_patient}}}))
    out = tmp_path / "reference.md"
    argv = ["--cohort", str(cohort), "--draws", "2", "--subset", "3", "--out", str(out)]
    assert main([*argv, "--evaluation", str(evaluation), "--method", "m"]) == 0
    text = out.read_text()
    assert "reference, treatment unknown" in text and "reference, MGMT and resection known" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["patients"] == len(rows) and saved["draws"] == 2
    # subsets as large as the cohort are the cohort itself: no subset figures, said so
    row = saved["rows"]["reference, treatment unknown"]
    assert math.isnan(row["subset_share_above_threshold"]) and row["subset_size"] == 3
    assert "n/a (no smaller subsets)" in text
    # the model rows are its own numbers: spreads and errors in the same order give 1
    assert saved["rows"]["m, volumes"]["spearman"]["value"] == pytest.approx(1.0)
    assert saved["rows"]["m, the card's check"]["spearman"]["value"] == pytest.approx(1.0)

    # --sites keeps that site's patients (the model rows too); an unknown site is refused
    site = rows[0]["site"]
    assert main([*argv, "--sites", site, "--evaluation", str(evaluation), "--method", "m"]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sites"] == [site]
    assert saved["patients"] == sum(r["site"] == site for r in rows)
    with pytest.raises(SystemExit):
        main([*argv, "--sites", "SITE-NOWHERE"])

    # an evaluation from before the per-sample volumes were recorded is refused, saying so
    for p in per_patient:
        del p["sample_volumes_ml"]
    evaluation.write_text(json.dumps({"methods": {"m": {"per_patient": per_patient}}}))
    with pytest.raises(InputError, match="sample_volumes_ml"):
        main([*argv, "--evaluation", str(evaluation), "--method", "m"])
    with pytest.raises(InputError, match=r"--method: expected one of \['m'\]"):
        main([*argv, "--evaluation", str(evaluation), "--method", "other"])
