"""Does the model's spread rank its errors within a site, and what does that depend on?

The model card's uncertainty check (Spearman correlation of each patient's spread with its
tumour MAE above 0.3) is scored on 16-patient sites. This reads the ``metrics.json`` of several
``glioforecast evaluate`` runs, each under a label (for example the validation cohorts, which
chose the model, against fresh cohorts), takes one latent diffusion model's per-patient rows,
and reports per site of each cohort (``inference.evaluate.uncertainty_by_site``):

- the within-site Spearman correlation of spread and error, and its mean and spread per label;
- whether the spread follows the predicted volume or the true volume;
- across all sites, how the within-site correlation goes with the share of responding tumours
  and with the mean true volume (the case mix).

    python -m bench.uncertainty_sites "validation=eval/val/metrics.json" \\
        "fresh=eval/seed10/metrics.json" ... [--method NAME] [--out FILE.md]

A site of one cohort is one row; a report that scored the same patients as another must not be
given twice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.cli import exit_with
from bench.report import machine_description
from dicom_node.errors import InputError
from inference import metrics as M
from inference.evaluate import PatientResult, uncertainty_by_site
from inference.model_dir import KIND_LDM


def _method(report: dict[str, Any], path: Path, name: str | None) -> tuple[str, dict[str, Any]]:
    methods = report.get("methods")
    if not isinstance(methods, dict):
        raise InputError(f"{path}: expected a glioforecast evaluate metrics.json, found no methods")
    if name is not None:
        found = [k for k in methods if name in k]
    else:
        found = [k for k, m in methods.items() if m.get("kind") == KIND_LDM]
    if len(found) != 1:
        wanted = f"one method named like {name!r}" if name else "one latent diffusion model"
        raise InputError(f"{path}: expected {wanted}, found {found or 'none'} in {list(methods)}")
    return found[0], methods[found[0]]


def site_rows(path: Path, method: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The chosen method's name and its per-site uncertainty rows from one metrics.json."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: expected a readable metrics.json ({exc})") from None
    name, entry = _method(report, path, method)
    results = [
        PatientResult(**{**p, "sample_volumes_ml": tuple(p.get("sample_volumes_ml", ()))})
        for p in entry["per_patient"]
    ]
    return name, uncertainty_by_site(results)


def _f(v: float | None, fmt: str = "+.2f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def report(groups: Sequence[tuple[str, Path]], method: str | None, command: str) -> str:
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for label, path in groups:
        name, site_list = site_rows(path, method)
        names.append(f"{label}: {name} ({path})")
        rows += [{"label": label, **r} for r in site_list]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# The spread against the error, site by site",
        "",
        f"Measured {now} on {machine_description()}; command `{command}`.",
        "",
        "Reports read:",
        "",
        *[f"- {n}" for n in names],
        "",
        "Per site of one cohort: Spearman correlation of the tumour-region spread with the "
        "tumour MAE (the card's statistic), with the predicted and with the true volume.",
        "",
        "| reports | site/cohort | patients | responding | mean true / predicted volume (ml) | "
        "spread vs error | spread vs predicted volume | spread vs true volume |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['site']} | {r['patients']} | {r['responding_share']:.0%} | "
            f"{r['mean_truth_volume_ml']:.1f} / {r['mean_predicted_volume_ml']:.1f} | "
            f"{_f(r['spread_error_spearman'])} | {_f(r['spread_predicted_volume_spearman'])} | "
            f"{_f(r['spread_truth_volume_spearman'])} |"
        )
    lines += [
        "",
        "| reports | sites | mean within-site Spearman | SD between sites | sites above 0.3 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        rho = np.array([r["spread_error_spearman"] for r in rows if r["label"] == label], float)
        rho = rho[np.isfinite(rho)]
        sd = _f(float(np.std(rho, ddof=1)), ".2f") if rho.size > 1 else "n/a"
        lines.append(
            f"| {label} | {rho.size} | {_f(float(np.mean(rho)) if rho.size else math.nan)} | "
            f"{sd} | {int((rho > 0.3).sum())} |"
        )
    rho = np.array([r["spread_error_spearman"] for r in rows], dtype=float)
    share = np.array([r["responding_share"] for r in rows], dtype=float)
    true_ml = np.array([r["mean_truth_volume_ml"] for r in rows], dtype=float)
    follows_pred = np.array([r["spread_predicted_volume_spearman"] for r in rows], dtype=float)
    follows_true = np.array([r["spread_truth_volume_spearman"] for r in rows], dtype=float)
    lines += [
        "",
        f"Across all {len(rows)} sites: Spearman correlation of the within-site statistic with "
        f"the share of responding tumours {_f(M.spearman(share, rho))}, with the mean true volume "
        f"{_f(M.spearman(true_ml, rho))}. The spread rises with the predicted volume in "
        f"{int((follows_pred > 0).sum())} of {len(rows)} sites (median "
        f"{_f(float(np.nanmedian(follows_pred)))}) and with the true volume in "
        f"{int((follows_true > 0).sum())} (median {_f(float(np.nanmedian(follows_true)))}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.uncertainty_sites",
        description="Per-site uncertainty statistics of a model across evaluation reports.",
    )
    p.add_argument("reports", nargs="+", help="LABEL=PATH/metrics.json (several per label)")
    p.add_argument("--method", default=None, help="method name (substring); default: the LDM")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    groups = []
    for item in args.reports:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            print(f"uncertainty_sites: expected LABEL=PATH, found {item!r}", file=sys.stderr)
            return 2
        groups.append((label, Path(path)))
    command = "python -m bench.uncertainty_sites " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    try:
        text = report(groups, args.method, command)
    except InputError as exc:
        print(f"uncertainty_sites: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    exit_with(main)
