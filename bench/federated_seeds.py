"""Federated minus the single-site average, per run, over several ``bench.federated`` runs.

Reads the ``report.json`` of each run folder (typically one cohort with different
``--train-seed``) and prints the table of ``docs/FEDERATED.md``: for each metric the difference
in each run, the runs where federated is better, and the mean difference over the runs with
whether it favours federated; the same for pooled training, the most a federation can match.

    python -m bench.federated_seeds "seed 0=/work/fedbench-prox" "seed 1=/work/fedbench-prox-t1" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.cli import exit_with
from bench.federated import AVERAGE, POOLED, ROWS, favours
from dicom_node.errors import InputError


def load_run(label_and_dir: str) -> tuple[str, dict[str, Any]]:
    """``LABEL=DIR`` (or a bare DIR, labelled by its name) -> (label, the run's table)."""
    label, sep, folder = label_and_dir.partition("=")
    path = Path(folder if sep else label)
    report = path / "report.json"
    if not report.is_file():
        raise InputError(f"{path}: expected a bench.federated run folder with report.json")
    table: dict[str, Any] = json.loads(report.read_text())["table"]
    if AVERAGE not in table or not any(k.startswith("federated") for k in table):
        raise InputError(f"{report}: expected a federated and a {AVERAGE!r} row")
    return (label if sep else path.name), table


def differences(table: dict[str, Any], row: str) -> dict[str, float]:
    """``row`` minus the single-site average, per metric key."""
    name = row if row in table else next(k for k in table if k.startswith(row))
    return {key: float(table[name][key]) - float(table[AVERAGE][key]) for _, key, _, _ in ROWS}


def summary(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    fed = [differences(t, "federated") for _, t in runs]
    pooled = [differences(t, POOLED) for _, t in runs if POOLED in t]
    out: dict[str, Any] = {"runs": [label for label, _ in runs], "metrics": {}}
    for title, key, _, better in ROWS:
        values = [d[key] for d in fed]
        mean = sum(values) / len(values)
        out["metrics"][title] = {
            "differences": values,
            "runs_better": sum(favours(v, better) for v in values),
            "mean": mean,
            "mean_favours_federated": favours(mean, better),
            "pooled_mean_favours": (
                favours(sum(d[key] for d in pooled) / len(pooled), better) if pooled else None
            ),
        }
    out["better_per_run"] = [
        sum(favours(d[key], better) for _, key, _, better in ROWS) for d in fed
    ]
    out["mean_favours"] = sum(m["mean_favours_federated"] for m in out["metrics"].values())
    out["pooled_mean_favours"] = (
        sum(bool(m["pooled_mean_favours"]) for m in out["metrics"].values()) if pooled else None
    )
    return out


def markdown(s: dict[str, Any]) -> str:
    n, k = len(s["runs"]), len(ROWS)
    lines = [
        "| metric | " + " | ".join(s["runs"]) + " | runs where federated is better | mean |",
        "| --- |" + " --- |" * (n + 2),
    ]
    for title, m in s["metrics"].items():
        cells = " | ".join(f"{v:+.3f}" for v in m["differences"])
        lines.append(f"| {title} | {cells} | {m['runs_better']} of {n} | {m['mean']:+.3f} |")
    per_run = " | ".join(f"{w} of {k}" for w in s["better_per_run"])
    lines.append(
        f"| metrics where federated is better | {per_run} | | {s['mean_favours']} of {k} |"
    )
    lines += ["", f"The mean over the runs favours federated on {s['mean_favours']} of {k} metrics"]
    if s["pooled_mean_favours"] is not None:
        lines[-1] += f"; pooled training on {s['pooled_mean_favours']} of {k}"
    lines[-1] += "."
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("runs", nargs="+", help="LABEL=DIR of a bench.federated run, or DIR")
    args = parser.parse_args(argv)
    print(markdown(summary([load_run(r) for r in args.runs])), end="")
    return 0


if __name__ == "__main__":
    exit_with(main)
