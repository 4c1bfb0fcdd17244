"""``python -m bench.response_reference``: balanced accuracy of plain classifiers fitted on cohort
tables, as the model card's reference for the response-category check."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from bench.response_reference import COLUMNS, main
from dicom_node.types import RESPONSE_CATEGORIES
from inference.synthetic.outcome import SURVIVAL_CLASSES


def _table(folder: Path, n: int, seed: int, sites: tuple[str, ...]) -> Path:
    """A cohort table whose category is set by the GTV volume alone (four bands)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        band = i % 4
        row = {c: f"{rng.uniform(0.5, 1.5):.3f}" for c in COLUMNS}
        row.update(mgmt=rng.choice(["methylated", "unmethylated"]), extent_of_resection="STR")
        row["gtv_ml"] = f"{10 ** (band + rng.uniform(0.1, 0.9)):.3f}"
        row["response_category"] = RESPONSE_CATEGORIES[band]
        # the survival class follows the oedema, which the GTV does not tell
        third = rng.randrange(3)
        row["pre_oedema_ml"] = f"{10 ** (third + rng.uniform(0.1, 0.9)):.3f}"
        row["survival_class"] = SURVIVAL_CLASSES[third]
        row["site"] = sites[i % len(sites)]
        rows.append(row)
    with (folder / "cohort.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_a_category_the_gtv_decides_is_found_from_the_gtv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _table(tmp_path / "train", 200, 1, ("SITE-A",))
    test = _table(tmp_path / "test", 80, 2, ("SITE-LAK", "SITE-B"))
    out = tmp_path / "report.md"
    assert main(["--train", str(train), "--validation", str(train), "--test", str(test),
                 "--out", str(out)]) == 0  # fmt: skip
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "Trained on 200 patients" in text and "test (40 patients)" in text
    table = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    rows = {
        (r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in table if "---" not in r[0]
    }
    assert len(rows) == 1 + 8  # the header and 4 feature sets x 2 classifiers
    # the GTV bands are separable: each classifier finds them from the GTV and dose alone
    for classifier in ("logistic regression, balanced", "gradient boosting"):
        validation, test_ba, mean, above = rows[("GTV and dose", classifier)]
        assert float(test_ba) > 0.9 and float(validation) > 0.9
        assert mean == test_ba and above == "1 of 1"


def test_a_table_without_the_columns_or_sites_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _table(tmp_path / "train", 40, 1, ("SITE-A",))
    assert main(["--train", str(train), "--test", str(train)]) == 2
    assert "expected patients of ['SITE-LAK', 'SITE-NOR2'], found sites ['SITE-A']" in (
        capsys.readouterr().err
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cohort.csv").write_text("patient_id,site\nGF1,SITE-A\n")
    assert main(["--train", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "expected the columns" in err and "response_category" in err


def test_the_survival_class_is_found_from_what_decides_it_and_not_from_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _table(tmp_path / "train", 300, 1, ("SITE-A",))
    test = _table(tmp_path / "test", 120, 2, ("SITE-LAK",))
    assert main(["--train", str(train), "--test", str(test), "--target", "survival_class"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Survival class: what a classifier reaches")
    assert "chance is 0.33" in text and "test cohorts above 0.33" in text
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[3])
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line and "features" not in line
    }
    for classifier in ("logistic regression, balanced", "gradient boosting"):
        assert rows[("pre-treatment volumes and dose", classifier)] > 0.9
        assert rows[("GTV and dose", classifier)] < 0.6  # about chance: the GTV does not tell
