"""Federated vs single-site vs pooled training on synthetic sites with different scanners.

Three training sites and one held-out site of one synthetic cohort (``glioforecast synth``, four
scanner profiles). Five UNet baselines (``--preset coarse``: a small UNet on a 6 mm grid for a
CPU; ``demo``: the demo UNet baseline on its 4 mm grid, for a GPU), each trained for the same
number of epochs over its data:

- ``federated``: FedAvg (or FedProx, ``--strategy``) over the three sites, ``rounds`` x
  ``local_epochs`` epochs: the deployment's ServerApp and ClientApps run in this process
  (``inference.federated.simulation``: same site selection, Flower strategy, local training and
  evaluation; no network transport, which on this shared 2-core machine costs a process start
  per message);
- ``site-<X>``: each training site alone (centralised training on its folder);
- ``pooled``: the three sites' patients together (what sharing the data would allow).

All five are evaluated on the held-out site with ``inference.evaluate`` (the model card's
metrics). The table goes between the markers of ``docs/FEDERATED.md`` with the machine, the
date and the command; the full report to ``OUT/report.json``.

    python -m bench.federated --out /tmp/gf-fed-bench
    python -m bench.federated --cohort COHORT --preset demo --device cuda --batch-size 4 \\
        --learning-rate 1e-3 --threads 4 --out /tmp/gf-fed-bench-gpu
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.cli import exit_with, refuse_missing_cuda
from bench.report import machine_description

log = logging.getLogger("bench.federated")

DOC = Path(__file__).resolve().parents[1] / "docs" / "FEDERATED.md"
START, END = "<!-- bench:federated:start -->", "<!-- bench:federated:end -->"
AVERAGE = "single-site average"
POOLED = "pooled (3 sites' data)"
ROWS = (
    ("PSNR global (dB)", "psnr_global", 2, "high"),
    ("SSIM global", "ssim_global", 3, "high"),
    ("MAE global (z)", "mae_global", 3, "low"),
    ("PSNR tumour (dB)", "psnr_tumour", 2, "high"),
    ("SSIM tumour", "ssim_tumour", 3, "high"),
    ("MAE tumour (z)", "mae_tumour", 3, "low"),
    ("Tumour Dice", "dice", 3, "high"),
    ("Absolute volume error (ml)", "abs_volume_error_ml", 2, "low"),
)


def favours(diff: float, better: str) -> bool:
    """Whether a difference (model minus reference) is an improvement for a metric where
    ``better`` is ``high`` or ``low``."""
    return diff > 0 if better == "high" else diff < 0


def bench_config(preset: str, residual: bool = True) -> Any:
    """The UNet of every model of the comparison: ``coarse`` or ``demo`` (see the module)."""
    from inference.model_config import PreprocessingConfig
    from inference.unet_baseline import UNetBaselineConfig, demo_baseline_config

    if preset == "demo":
        return demo_baseline_config(
            name="glioforecast-unet-fedbench", version="0.0.0-bench", residual=residual
        )
    return UNetBaselineConfig(
        name="glioforecast-unet-fedbench",
        version="0.0.0-bench",
        features=(8, 8, 16, 16, 32, 8),
        preprocessing=PreprocessingConfig(spacing_mm=(6.0, 6.0, 6.0), crop_shape=(32, 32, 32)),
        residual=residual,
    )


def site_folder(cohort: Path, sites: list[str], dest: Path) -> Path:
    """A cohort folder holding only ``sites``' patients (patient folders linked, table filtered)."""
    dest.mkdir(parents=True, exist_ok=True)
    with (cohort / "cohort.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if r["site"] in sites]
    with (dest / "cohort.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    for r in keep:
        link = dest / r["patient_id"]
        if not link.exists():
            link.symlink_to((cohort / r["patient_id"]).resolve())
    return dest


def site_order(cohort: Path) -> list[str]:
    with (cohort / "sites.csv").open(newline="", encoding="utf-8") as fh:
        return [r["site"] for r in csv.DictReader(fh)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.federated", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/gf-fed-bench"))
    ap.add_argument(
        "--cohort", type=Path, default=None, help="existing 4-site cohort (default: generate)"
    )
    ap.add_argument("--patients", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2026, help="cohort seed (when generating)")
    ap.add_argument(
        "--train-seed", type=int, default=0, help="seed of every model's initialisation and batches"
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    ap.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    ap.add_argument(
        "--absolute",
        action="store_true",
        help="UNets that regress the whole post-treatment image (default: its change from the "
        "pre-treatment T1-Gd, residual: true)",
    )
    ap.add_argument(
        "--preset",
        choices=("coarse", "demo"),
        default="coarse",
        help="the UNet: coarse (6 mm, for a CPU) or demo (4 mm, for a GPU)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where every model trains")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument(
        "--eval-patients",
        type=int,
        default=None,
        help="evaluate the first N held-out patients (default: all of them)",
    )
    ap.add_argument("--write-doc", action="store_true", help=f"write the table into {DOC.name}")
    args = ap.parse_args(argv)
    refuse_missing_cuda(ap, args.device)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("dicom_node.convert.preprocess").setLevel(logging.ERROR)
    import torch
    import yaml

    from inference.evaluate import run_evaluation
    from inference.federated.config import RunConfig
    from inference.federated.simulation import simulate_local
    from inference.model_config import config_to_dict
    from inference.train.loops import TrainOptions, train_baseline

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohort = args.cohort
    if cohort is None:
        from inference.synthetic.cohort import generate_cohort

        cohort = out / "cohort"
        if not (cohort / "cohort.csv").is_file():
            generate_cohort(cohort, patients=args.patients, sites=4, seed=args.seed, spacing_mm=4.0,
                            formats=("nifti",))  # fmt: skip
    cohort = cohort.resolve()
    order = site_order(cohort)
    if len(order) != 4:
        raise SystemExit(f"--cohort: expected 4 sites, found {order}")
    train_sites, held = order[:3], order[3]
    log.info("training sites %s, held-out site %s", train_sites, held)
    folders = {s: site_folder(cohort, [s], out / "sites" / s) for s in train_sites}
    pooled_folder = site_folder(cohort, train_sites, out / "sites" / "pooled")
    cfg = bench_config(args.preset, residual=not args.absolute)
    epochs = args.rounds * args.local_epochs
    options = TrainOptions(epochs=epochs, batch_size=args.batch_size,
                           learning_rate=args.learning_rate, seed=args.train_seed,
                           device=args.device, progress=False, n_held_out_sites=0)  # fmt: skip
    models: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    # federated: the ServerApp and ClientApps of a deployment, in this process (no transport)
    t0 = time.monotonic()
    model_yaml = out / "fedbench-model.yaml"
    fed_cfg = config_to_dict(cfg.replace(name="fedbench-federated"))
    model_yaml.write_text(yaml.safe_dump(fed_cfg, sort_keys=False), encoding="utf-8")
    fed_dir = out / "models" / "federated"
    run = RunConfig(
        stage="baseline", strategy=args.strategy, proximal_mu=args.proximal_mu,
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs, learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.train_seed, preset="tiny", model_yaml=str(model_yaml), out=str(fed_dir),
        sites=",".join(train_sites), min_sites=3, card_metrics=False,
    )  # fmt: skip
    simulate_local(run, {s: [folders[s]] for s in train_sites}, device=args.device)
    strategy = "FedAvg" if args.strategy == "fedavg" else f"FedProx, mu {args.proximal_mu:g}"
    models[f"federated ({strategy}, 3 sites)"] = fed_dir
    seconds["federated"] = time.monotonic() - t0

    for s in train_sites:
        t0 = time.monotonic()
        d = out / "models" / f"site-{s}"
        train_baseline([folders[s]], d, cfg.replace(name=f"fedbench-{s}"), options)
        models[f"{s} alone"] = d
        seconds[f"{s} alone"] = time.monotonic() - t0
    t0 = time.monotonic()
    d = out / "models" / "pooled"
    train_baseline([pooled_folder], d, cfg.replace(name="fedbench-pooled"), options)
    models[POOLED] = d
    seconds["pooled"] = time.monotonic() - t0

    report = run_evaluation(
        list(models.values()), [cohort], samples=1, sites=[held], n_resamples=1000,
        device=args.device, patients_limit=args.eval_patients,
    )  # fmt: skip
    # one method per model directory (distinct names), after "no change"
    labels = dict(zip(list(report["methods"])[1:], models, strict=True))
    table: dict[str, dict[str, float]] = {
        "no change": _means(report["methods"][next(iter(report["methods"]))])
    }
    for method, label in labels.items():
        table[label] = _means(report["methods"][method])
    singles = [k for k in table if k.endswith(" alone")]
    table[AVERAGE] = {
        key: sum(table[s][key] for s in singles) / len(singles) for _, key, _, _ in ROWS
    }
    command = "python -m bench.federated " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    info = {
        "machine": machine_description()
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "cohort": str(cohort),
        "patients_per_site": {
            s: sum(1 for _ in (out / "sites" / s).glob("GF*")) for s in train_sites
        },
        "held_out_site": held,
        "held_out_patients": report["patients"],
        "epochs": epochs,
        "train_seed": args.train_seed,
        "residual": cfg.residual,
        "grid": f"{cfg.preprocessing.spacing_mm[0]:g} mm grid of "
        + "x".join(str(n) for n in cfg.preprocessing.crop_shape)
        + f" voxels (UNet features {', '.join(str(f) for f in cfg.features)})",
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "rounds": args.rounds,
        "strategy": strategy,
        "local_epochs": args.local_epochs,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.monotonic() - started, 1),
        "table": table,
        "intervals": {label: report["methods"][m]["summary"] for m, label in labels.items()},
    }
    (out / "report.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    md = markdown(info, train_sites)
    (out / "report.md").write_text(md, encoding="utf-8")
    print(md)
    if args.write_doc:
        write_doc(md)
    return 0


def _means(entry: dict[str, Any]) -> dict[str, float]:
    s = entry["summary"]
    return {key: float(s[key]["value"]) for _, key, _, _ in ROWS}


def markdown(info: dict[str, Any], train_sites: list[str]) -> str:
    table = info["table"]
    names = list(table)
    counts = ", ".join(str(v) for v in info["patients_per_site"].values())
    lines = [
        f"Measured {info['date']} on {info['machine']}; command `{info['command']}`; "
        f"{info['total_seconds'] / 60:.1f} min in all.",
        "",
        f"Training sites {', '.join(train_sites)} ({counts} patients); held-out site "
        f"{info['held_out_site']} ({info['held_out_patients']} patients, never seen in training). "
        f"{'Residual' if info.get('residual') else 'Absolute'} UNet baseline (the image "
        f"output {'is the change from' if info.get('residual') else 'replaces'} the pre-treatment "
        f"T1-Gd) on a {info.get('grid', '6 mm grid of 32x32x32 voxels')}, "
        f"{info['epochs']} epochs over each model's data "
        f"(federated: {info['rounds']} rounds x {info['local_epochs']} local epochs, "
        f"{info.get('strategy', 'FedAvg')}, training seed {info.get('train_seed', 0)}, "
        f"batch {info.get('batch_size', 2)}, learning rate {info.get('learning_rate', 2e-3):g}, "
        "in-process simulation of the deployment's apps). Means over the held-out patients "
        "(inference/evaluate.py).",
        "",
        "| metric | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for title, key, digits, _ in ROWS:
        lines.append(
            f"| {title} | " + " | ".join(f"{table[n][key]:.{digits}f}" for n in names) + " |"
        )
    fed = next(n for n in names if n.startswith("federated"))
    wins = []
    for title, key, _, better in ROWS:
        wins.append((title, favours(table[fed][key] - table[AVERAGE][key], better)))
    n_win = sum(w for _, w in wins)
    lines += [
        "",
        f"Federated vs the single-site average on the held-out site: better on {n_win} of "
        f"{len(wins)} metrics"
        + (f" (not on: {', '.join(t for t, w in wins if not w)})" if n_win < len(wins) else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_doc(md: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{DOC}: expected the markers {START} and {END}, found none")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + START + "\n" + md + END + tail, encoding="utf-8")


if __name__ == "__main__":
    exit_with(main)
