"""How well does a calibrated prediction's uncertainty track its error on a synthetic cohort?

The model card's uncertainty check asks for a Spearman correlation above 0.3 between each
patient's spread and error. On the synthetic cohort part of the outcome is drawn after the
pre-treatment scan: the MGMT status and the extent of resection (not inputs of the node), the
radiosensitivity, the temozolomide effect, the follow-up date and pseudo-progression. This script
asks the generator itself: for each patient of a cohort folder it re-simulates everything up to
the radiotherapy plan exactly as the cohort was made (checked against the table's follow-up
enhancing volume), then draws the treatment again ``--draws`` times with fresh random streams.
The draws are the true distribution of the follow-up enhancing volume given the pre-treatment
state, so they define a reference predictor, calibrated by construction, that knows the growth
parameters (which no image shows exactly) and still cannot know the draws:

- spread: the standard deviation of the drawn volumes (ml);
- error: |true volume - mean of the drawn volumes| (ml);

at three levels of knowledge: ``treatment unknown`` (MGMT, resection and the treatment parameters
drawn again), ``MGMT and resection known`` (only the treatment parameters drawn again) and
``treatment and growth rate unknown`` (also the proliferation rate, drawn from its prior; the rest
of the growth parameters and the tumour as grown are kept). An image-only predictor sits between
the first and the last: the scan shows the tumour's shape, which depends on the growth rate only
through its ratio to the diffusivity.
The Spearman correlation of spread and error is reported over all patients with a bootstrap
interval, per site, and over random subsets of the test cohort size (the share of subsets where
it exceeds 0.3). With ``--evaluation`` the same statistic of a model's own evaluation (the
standard deviation of its samples' volumes against its absolute volume error, and the card's
voxel statistic) on the same patients is reported beside it.

    python -m bench.uncertainty_reference --cohort DIR [--draws 16] [--subset 32] [--sites A,B]
        [--evaluation REPORT.json --method NAME] [--out docs/evaluation/FILE.md]

It measures volumes, not the card's image statistic (tumour-region voxel spread against tumour
MAE); see the report's text for what that means.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.cli import exit_with
from bench.report import machine_description
from dicom_node.errors import InputError

ORACLE_STREAM = 1_000_033
THRESHOLD = 0.3
LEVELS = ("treatment unknown", "MGMT and resection known", "treatment and growth rate unknown")


@dataclass(frozen=True)
class PatientDraws:
    patient_id: str
    site: str
    truth_ml: float
    draws_ml: dict[str, list[float]]  # per level

    def spread(self, level: str) -> float:
        return float(np.std(self.draws_ml[level]))

    def error(self, level: str) -> float:
        return abs(self.truth_ml - float(np.mean(self.draws_ml[level])))


def parse_patient_id(pid: str) -> tuple[int, int]:
    """``GFsssss-iiii`` -> (cohort seed, patient index), as ``cohort.patient_id`` writes it."""
    try:
        head, tail = pid.removeprefix("GF").split("-")
        return int(head), int(tail) - 1
    except ValueError:
        raise InputError(f"patient_id: expected GF<seed>-<number>, found {pid!r}") from None


def simulate_patient(row: dict[str, str], draws: int) -> PatientDraws:
    from inference.synthetic import outcome, treatment, tumour
    from inference.synthetic.cohort import patient_rng, seen_enhancing_ml, simulate_pre_treatment

    seed, index = parse_patient_id(row["patient_id"])
    spacing = float(row["spacing_mm"])
    rng = patient_rng(seed, index)
    bio = simulate_pre_treatment(rng, spacing)
    cov = bio.covariates

    def treatment_of(c: outcome.Covariates, r: np.random.Generator) -> treatment.TreatmentParams:
        return treatment.TreatmentParams.random(r, c.mgmt_methylated, c.extent_of_resection)

    def follow_up_ml(
        p: treatment.TreatmentParams,
        r: np.random.Generator,
        growth: tumour.GrowthParams | None = None,
    ) -> float:
        post = treatment.treat(bio.anatomy, bio.pre, bio.solver, growth or bio.growth, p,
                               bio.plan.dose, spacing, r)  # fmt: skip
        return seen_enhancing_ml(post, spacing)

    truth = follow_up_ml(treatment_of(cov, rng), rng)
    expected = float(row["post_enhancing_ml"])
    if abs(truth - expected) > 1e-3 + 1e-6 * expected:
        raise InputError(
            f"{row['patient_id']}: re-simulated follow-up enhancing volume {truth:.3f} ml, the "
            f"table has {expected:.3f} ml: the cohort was made by another version of the generator"
        )
    out: dict[str, list[float]] = {level: [] for level in LEVELS}
    for k in range(draws):
        r = np.random.default_rng(np.random.SeedSequence([seed, index, ORACLE_STREAM, k]))
        # MGMT and resection drawn again (a fresh patient's covariates), then the treatment
        p = treatment_of(outcome.Covariates.random(r), r)
        out[LEVELS[0]].append(follow_up_ml(p, r))
        p = treatment_of(cov, r)
        out[LEVELS[1]].append(follow_up_ml(p, r))
        p = treatment_of(outcome.Covariates.random(r), r)
        growth = replace(bio.growth, rho=tumour.GrowthParams.random(r).rho)
        out[LEVELS[2]].append(follow_up_ml(p, r, growth))
    return PatientDraws(row["patient_id"], row["site"], truth, out)


def spearman_summary(
    spread: np.ndarray, error: np.ndarray, sites: np.ndarray, subset: int, seed: int = 0
) -> dict[str, Any]:
    from inference import metrics as M

    n = len(spread)
    est = M.bootstrap_ci(lambda i: M.spearman(spread[i], error[i]), n, seed=seed).as_dict()
    per_site = {
        str(s): M.spearman(spread[sites == s], error[sites == s]) for s in sorted(set(sites))
    }
    # subsets only mean something when smaller than the cohort (else every one is all of it)
    rng = np.random.default_rng(seed)
    size = min(subset, n)
    values = [
        M.spearman(spread[idx], error[idx])
        for idx in (rng.choice(n, size, replace=False) for _ in range(1000 if size < n else 0))
    ]
    finite = [v for v in values if math.isfinite(v)]
    return {
        "spearman": est,
        "per_site": per_site,
        "within_site_mean": _finite_mean(per_site.values()),
        "subset_size": size,
        "subset_share_above_threshold": (
            float(np.mean([v > THRESHOLD for v in finite])) if finite else math.nan
        ),
        "subset_median": float(np.median(finite)) if finite else math.nan,
    }


def _finite_mean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def model_statistics(report: dict[str, Any], method: str, ids: list[str]) -> dict[str, Any]:
    """The model's volume and voxel statistics on the patients of ``ids`` (in that order)."""
    if method not in report["methods"]:
        raise InputError(f"--method: expected one of {sorted(report['methods'])}, found {method!r}")
    rows = {p["patient_id"]: p for p in report["methods"][method]["per_patient"]}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise InputError(f"--evaluation: {len(missing)} patients missing, e.g. {missing[0]}")
    chosen = [rows[i] for i in ids]
    if any(len(p.get("sample_volumes_ml", ())) < 2 for p in chosen):
        raise InputError(
            "--evaluation: expected per-patient sample_volumes_ml with 2 or more samples "
            "(evaluations from before they were recorded have none): evaluate again"
        )
    return {
        "volume_spread": np.array([np.std(p["sample_volumes_ml"]) for p in chosen]),
        "volume_error": np.array([p["metrics"]["abs_volume_error_ml"] for p in chosen]),
        "voxel_spread": np.array([p["spread"] for p in chosen]),
        "voxel_error": np.array([p["metrics"]["mae_tumour"] for p in chosen]),
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _fmt_est(e: dict[str, Any]) -> str:
    return f"{_fmt(e['value'])} [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Uncertainty against error: a calibrated reference (synthetic, research use only)",
        "",
        f"- measured {result['date']} on {result['machine']}; CPU; {result['seconds']:.0f} s",
        f"- command: `{result['command']}`",
        f"- cohort: {result['cohort']} ({result['patients']} patients, sites "
        f"{', '.join(result['sites'])}); {result['draws']} draws of the treatment per patient",
        "",
        "Each row: Spearman correlation between a patient's spread and error, over all patients "
        "(95 % bootstrap interval), the mean of the per-site correlations, and over 1000 random "
        f"subsets of {result['subset_size']} patients the median and the share above "
        f"{THRESHOLD}.",
        "",
        "| predictor | spread | error | Spearman, all | within-site mean | subsets: median "
        f"| subsets above {THRESHOLD} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["rows"].items():
        share = row["subset_share_above_threshold"]
        lines.append(
            f"| {name} | {row['spread']} | {row['error']} | {_fmt_est(row['spearman'])} | "
            f"{_fmt(row['within_site_mean'])} | {_fmt(row['subset_median'])} | "
            + ("n/a (no smaller subsets)" if math.isnan(share) else f"{share:.0%}")
            + " |"
        )
    truth = np.array(result["truth_ml"])
    lines += [
        "",
        f"True follow-up enhancing volume: median {np.median(truth):.1f} ml, mean "
        f"{truth.mean():.1f} ml. Median spread of the draws: "
        + ", ".join(f"{np.median(result['spread_ml'][lv]):.1f} ml ({lv})" for lv in LEVELS)
        + ".",
        "",
        "The reference rows use the generator's own distribution of the follow-up volume given "
        "what is fixed before the treatment: they are what a predictor that has learnt that "
        "distribution exactly gets on these patients. The first two know the growth parameters, "
        "which a model can only infer from the images; the third draws the proliferation rate "
        "from its prior as well, as a predictor that cannot read it from the images would. It is "
        "a reference, not a bound: a biased predictor's spread can correlate with its error "
        "through the bias. The card's check is on images (voxel spread in the tumour region "
        "against tumour MAE); these rows ask the same question in volumes, where the generator "
        "can answer it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cohort", type=Path, required=True, help="cohort folder (cohort.csv)")
    parser.add_argument("--draws", type=int, default=16, help="treatment draws per patient")
    parser.add_argument("--sites", help="only these sites, comma-separated")
    parser.add_argument("--subset", type=int, default=32, help="test cohort size for subsets")
    parser.add_argument("--evaluation", type=Path, help="an evaluation report (JSON)")
    parser.add_argument("--method", help="the method of --evaluation to compare")
    parser.add_argument("--out", type=Path, help="write the report here (.md, and .json beside)")
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error(f"--draws: expected 2 or more, found {args.draws}")
    if (args.evaluation is None) != (args.method is None):
        parser.error("--evaluation and --method go together")
    table = args.cohort / "cohort.csv"
    if not table.is_file():
        parser.error(
            f"--cohort: expected a cohort folder with cohort.csv, found none in {args.cohort}"
        )
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if args.sites:
        wanted = [s.strip() for s in args.sites.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {r["site"] for r in rows})
        if unknown:
            parser.error(f"--sites: {unknown} not in the cohort's sites")
        rows = [r for r in rows if r["site"] in wanted]
    # the model's rows are checked before the simulation, so a wrong report fails at once
    stats = (
        model_statistics(
            json.loads(args.evaluation.read_text()), args.method, [r["patient_id"] for r in rows]
        )
        if args.evaluation
        else None
    )

    from tqdm import tqdm

    started = datetime.datetime.now(datetime.UTC)
    patients = [simulate_patient(r, args.draws) for r in tqdm(rows, unit="patient")]
    sites = np.array([p.site for p in patients])
    result_rows: dict[str, Any] = {}
    for level in LEVELS:
        spread = np.array([p.spread(level) for p in patients])
        error = np.array([p.error(level) for p in patients])
        result_rows[f"reference, {level}"] = {
            "spread": "SD of the drawn volumes",
            "error": "abs. volume error",
            **spearman_summary(spread, error, sites, args.subset),
        }
    if stats is not None:
        result_rows[f"{args.method}, volumes"] = {
            "spread": "SD of the samples' volumes",
            "error": "abs. volume error",
            **spearman_summary(stats["volume_spread"], stats["volume_error"], sites, args.subset),
        }
        result_rows[f"{args.method}, the card's check"] = {
            "spread": "voxel SD, tumour region",
            "error": "tumour MAE",
            **spearman_summary(stats["voxel_spread"], stats["voxel_error"], sites, args.subset),
        }
    result = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "command": "python -m bench.uncertainty_reference " + shlex.join(argv or sys.argv[1:]),
        "seconds": (datetime.datetime.now(datetime.UTC) - started).total_seconds(),
        "cohort": str(args.cohort),
        "patients": len(patients),
        "sites": sorted(set(sites.tolist())),
        "draws": args.draws,
        "subset_size": min(args.subset, len(patients)),
        "rows": result_rows,
        "truth_ml": [p.truth_ml for p in patients],
        "spread_ml": {level: [p.spread(level) for p in patients] for level in LEVELS},
        "per_patient": [
            {
                "patient_id": p.patient_id,
                "site": p.site,
                "truth_ml": p.truth_ml,
                "draws_ml": p.draws_ml,
            }
            for p in patients
        ],
    }
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
