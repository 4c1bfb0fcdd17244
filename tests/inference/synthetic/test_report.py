"""Cohort statistics and the document block they fill."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.synthetic import report
from inference.synthetic.cohort import PatientRecord, write_table
from inference.synthetic.outcome import response_category, survival_class


def _rows(n: int, seed: int = 0, bad_dose: bool = False) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        burden = float(rng.lognormal(3.0, 1.0))
        months = float(np.exp(np.log(15.0) - 0.3 * np.log(burden / 20.0) + rng.normal(0, 0.2)))
        pre = float(rng.uniform(8, 40))
        post = [0.0, pre * 0.2, pre, pre * 2.0][i % 4]
        rows.append(
            {
                "site": f"SITE-{i % 2}",
                "pre_core_ml": str(rng.uniform(6, 90)),
                "survival_months": str(months),
                "burden_post_ml": str(burden),
                "ptv_d95_gy": "56.0" if bad_dose and i == 0 else "58.3",
                "dose_max_gy": "62.0",
                "response_category": response_category(pre, post),
                "response_category_tumour_only": response_category(pre, post),
                "pseudo_progression": "0",
                "mgmt": "methylated" if i % 2 else "unmethylated",
                "survival_class": survival_class(months),
                "extent_of_resection": "GTR",
                "age": "60",
            }
        )
    return rows


def test_statistics_and_acceptance() -> None:
    s = report.cohort_statistics(_rows(80))
    assert s["patients"] == 80
    assert all(v == 0.25 for v in s["response_shares"].values())
    assert s["spearman_survival_burden"][0] < -0.5
    assert all(ok for _, _, ok in report.acceptance(s))
    failing = report.acceptance(report.cohort_statistics(_rows(80, bad_dose=True)))
    assert [name for name, _, ok in failing if not ok] == ["PTV D95 >= 57 Gy"]


def test_stats_command_fills_the_document_block(tmp_path: Path) -> None:
    cohort = tmp_path / "c"
    cohort.mkdir()
    write_table(cohort / "cohort.csv", [PatientRecord(dict(r)) for r in _rows(40)])
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    code = report.main(
        ["stats", "--cohort", str(cohort), "--doc", str(doc), "--figure", str(tmp_path / "f.png"),
         "--command", "synth --seed 1"]
    )  # fmt: skip
    text = doc.read_text()
    assert code == 0
    assert "old" not in text and "before" in text and "after" in text
    assert "`synth --seed 1`" in text and "| median survival between 12 and 18 months |" in text
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_montage_shows_one_patient_per_site(
    small_cohort: tuple[Path, list[PatientRecord]], tmp_path: Path
) -> None:
    out, records = small_cohort
    png = tmp_path / "m.png"
    ids = report.montage(out, png)
    assert ids == [r.patient_id for r in records]  # two patients, two sites
    assert png.stat().st_size > 10_000
