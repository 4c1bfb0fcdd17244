"""How far can the response category be predicted from what is known before treatment?

The model card's first check asks the model to beat "no change" on response-category balanced
accuracy. "No change" predicts stable disease for everyone: 0.25 over the four categories. This
script asks what a plain classifier reaches on the same synthetic patients when it is given,
per patient, a few numbers from the cohort table instead of images, at four levels of knowledge:

- ``GTV and dose``: the GTV volume and the PTV's D95 and D50 (what the node receives as RTSTRUCT
  and RTDOSE, measured exactly);
- ``pre-treatment volumes and dose``: also the enhancing, necrotic and oedema volumes, what a
  perfect segmentation of the pre-treatment T1-Gd and FLAIR would measure;
- ``+ clinical``: also age, KPS, MGMT status and extent of resection (not inputs of the node);
- ``+ growth and treatment parameters``: also the simulator's hidden draws (proliferation
  rate, diffusivity, radiosensitivity, temozolomide effect, follow-up date), which no image
  shows.

With ``--target survival_class`` the same classifiers predict the survival class (short,
intermediate, long) instead, chance being 1/3: the node does not know a patient's class and
draws its samples under the training cohort's class shares (``inference.unknown_class:
marginal``); a class predicted from the inputs could only do better if the inputs told it.

Each level is fitted on the training cohort tables (``--train``) with two classifiers
(scikit-learn: a logistic regression with classes weighted to balance, and gradient boosting)
and scored on the validation cohorts (``--validation``, all patients) and each test cohort
(``--test``, the patients of ``--test-sites``). It reads ``cohort.csv`` only; nothing is
trained on a test patient. The figures are references, not models of the project: the
classifiers see exact volumes, which the node would have to measure from the images.

    python -m bench.response_reference --train DIR [--train DIR ...] [--validation DIR ...]
        [--test DIR ...] [--test-sites SITE-LAK,SITE-NOR2] [--target survival_class]
        [--out docs/evaluation/FILE.md]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.cli import exit_with
from bench.report import machine_description
from dicom_node.errors import InputError
from dicom_node.types import RESPONSE_CATEGORIES
from inference.metrics import category_metrics
from inference.synthetic.outcome import SURVIVAL_CLASSES

Row = dict[str, str]
#: what the classifiers predict, and its classes
TARGETS: dict[str, tuple[str, ...]] = {
    "response_category": tuple(RESPONSE_CATEGORIES),
    "survival_class": SURVIVAL_CLASSES,
}


def _log(row: Row, key: str) -> float:
    return float(np.log1p(float(row[key])))


def _gtv_dose(row: Row) -> list[float]:
    return [_log(row, "gtv_ml"), float(row["ptv_d95_gy"]), float(row["ptv_d50_gy"])]


def _volumes(row: Row) -> list[float]:
    return [
        *_gtv_dose(row),
        _log(row, "pre_enhancing_ml"),
        _log(row, "pre_necrotic_ml"),
        _log(row, "pre_oedema_ml"),
        _log(row, "pre_oedema_ml") - _log(row, "pre_enhancing_ml"),
    ]


def _clinical(row: Row) -> list[float]:
    return [
        *_volumes(row),
        float(row["age"]),
        float(row["kps"]),
        float(row["mgmt"] == "methylated"),
        float(row["extent_of_resection"] == "GTR"),
        float(row["extent_of_resection"] == "STR"),
    ]


def _hidden(row: Row) -> list[float]:
    return [
        *_clinical(row),
        float(np.log(float(row["rho_per_day"]))),
        float(np.log(float(row["d_white_mm2_per_day"]))),
        float(row["alpha_per_gy"]),
        float(row["tmz_kill_per_day"]),
        float(row["follow_up_days_after_rt"]),
    ]


FEATURE_SETS: dict[str, Callable[[Row], list[float]]] = {
    "GTV and dose": _gtv_dose,
    "pre-treatment volumes and dose": _volumes,
    "+ clinical": _clinical,
    "+ growth and treatment parameters": _hidden,
}


def _classifiers() -> dict[str, Callable[[], Any]]:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic regression, balanced": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced")
        ),
        "gradient boosting": lambda: GradientBoostingClassifier(random_state=0),
    }


COLUMNS = (
    "gtv_ml", "ptv_d95_gy", "ptv_d50_gy", "pre_enhancing_ml", "pre_necrotic_ml", "pre_oedema_ml",
    "age", "kps", "mgmt", "extent_of_resection", "rho_per_day", "d_white_mm2_per_day",
    "alpha_per_gy", "tmz_kill_per_day", "follow_up_days_after_rt",
)  # fmt: skip


def read_table(
    folder: str | Path, sites: Sequence[str] = (), target: str = "response_category"
) -> list[Row]:
    path = Path(folder) / "cohort.csv"
    if not path.is_file():
        raise InputError(f"{folder}: expected a cohort folder with cohort.csv, found none")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    needed = {target, "site", *COLUMNS}
    missing = sorted(needed - set(rows[0] if rows else {}))
    if missing:
        raise InputError(f"{path}: expected the columns {missing}, found a table without them")
    kept = [r for r in rows if not sites or r["site"] in sites]
    if not kept:
        found = sorted({r["site"] for r in rows})
        raise InputError(f"{path}: expected patients of {list(sites)}, found sites {found}")
    return kept


def balanced_accuracy(
    truth: Sequence[str], pred: Sequence[str], classes: Sequence[str] = RESPONSE_CATEGORIES
) -> float:
    """As the model card scores it (:func:`inference.metrics.category_metrics`)."""
    one_hot = [{c: float(c == p) for c in classes} for p in pred]
    return category_metrics(truth, pred, one_hot, classes).balanced_accuracy


def _matrix(rows: Sequence[Row], features: Callable[[Row], list[float]]) -> npt.NDArray[Any]:
    return np.array([features(r) for r in rows], dtype=float)


def reference(
    train: Sequence[Row], sets: dict[str, Sequence[Row]], target: str = "response_category"
) -> list[dict[str, Any]]:
    """One row per (feature set, classifier): balanced accuracy on each evaluation set."""
    labels = [r[target] for r in train]
    out = []
    for fname, features in FEATURE_SETS.items():
        x = _matrix(train, features)
        for cname, make in _classifiers().items():
            model = make().fit(x, labels)
            scores = {
                name: balanced_accuracy(
                    [r[target] for r in rows],
                    list(model.predict(_matrix(rows, features))),
                    TARGETS[target],
                )
                for name, rows in sets.items()
            }
            out.append({"features": fname, "classifier": cname, "balanced_accuracy": scores})
    return out


def markdown(
    rows: list[dict[str, Any]], train: Sequence[Row], sets: dict[str, Sequence[Row]],
    tests: Sequence[str], command: str, target: str = "response_category",
) -> str:  # fmt: skip
    classes = TARGETS[target]
    chance = 1.0 / len(classes)
    shares = {c: sum(r[target] == c for r in train) / len(train) for c in classes}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title, baseline = (
        ("Response category", f'"no change" scores {chance:.2f}')
        if target == "response_category"
        else ("Survival class", f"chance is {chance:.2f}")
    )
    lines = [
        f"# {title}: what a classifier reaches from pre-treatment numbers",
        "",
        f"Measured {now} on {machine_description()}; command `{command}`.",
        "",
        f"Trained on {len(train)} patients (classes: "
        + ", ".join(f"{c} {shares[c]:.3f}" for c in classes)
        + "); scored on "
        + ", ".join(f"{name} ({len(r)} patients)" for name, r in sets.items())
        + f". Balanced accuracy; {baseline}. What each feature set holds "
        "and why these are references, not models: `bench/response_reference.py`.",
        "",
    ]
    head = ["features", "classifier", *sets]
    if tests:
        head += ["mean over the test cohorts", f"test cohorts above {chance:.2f}"]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for row in rows:
        ba = row["balanced_accuracy"]
        cells = [row["features"], row["classifier"], *(f"{ba[n]:.3f}" for n in sets)]
        if tests:
            values = [ba[n] for n in tests]
            cells += [f"{np.mean(values):.3f}",
                      f"{sum(v > chance for v in values)} of {len(values)}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="append", required=True, help="training cohort folder")
    ap.add_argument("--validation", action="append", default=[], help="validation cohort folder")
    ap.add_argument("--test", action="append", default=[], help="test cohort folder")
    ap.add_argument("--test-sites", default="SITE-LAK,SITE-NOR2", help="the test patients' sites")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default="response_category",
        help="what the classifiers predict (default: the response category)",
    )
    args = ap.parse_args(argv)
    target = args.target
    try:
        train = [r for folder in args.train for r in read_table(folder, target=target)]
        sets: dict[str, Sequence[Row]] = {}
        if args.validation:
            sets["validation"] = [r for f in args.validation for r in read_table(f, target=target)]
        sites = [s for s in args.test_sites.split(",") if s]
        tests = [Path(f).name for f in args.test]
        for name, folder in zip(tests, args.test, strict=True):
            sets[name] = read_table(folder, sites, target)
    except InputError as exc:
        sys.stderr.write(f"response_reference: {exc}\n")
        return 2
    command = shlex.join(["python", "-m", "bench.response_reference", *(argv or sys.argv[1:])])
    text = markdown(reference(train, sets, target), train, sets, tests, command, target)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    exit_with(main)
