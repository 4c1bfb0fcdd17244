"""Prediction time of one study: a model directory, N samples, on CPU or GPU.

Times what the node's job does after conversion: ``ModelPredictor.predict`` on one synthetic
study (the inputs on the model grid, DDIM sampling of N samples, decoding, the mean / standard
deviation / mask back on the source grid), twice: as the node runs it (no survival class: the
model's ``inference.unknown_class`` at its own guidance scale) and with classifier-free guidance
(a survival class at a scale other than 1, so that every step is a conditional and a null-class
pass: the model's scale, or 3 when the model's is 1). The first prediction of each warms caches
and is not counted.

    python -m bench.sampling [--model DIR] [--samples 4] [--runs 5] [--threads 2] [--device cpu]

``--model`` defaults to the bundled demo model. Writes the section ``sampling, <model name>,
<device>`` of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.cli import count, exit_with, refuse_missing_cuda
from bench.report import update_section
from bench.timing import timed

if TYPE_CHECKING:
    from dicom_node.types import StudyInputs
    from inference.model_predictor import ModelPredictor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="model directory (default: the bundled one)")
    parser.add_argument("--samples", type=count, default=4)
    parser.add_argument("--runs", type=count, default=5)
    parser.add_argument("--threads", type=count, default=2, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--spacing", type=float, default=2.0, help="synthetic study grid, mm")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    refuse_missing_cuda(parser, args.device)

    from inference.bundled import demo_model_dir
    from inference.data import study_inputs_from_nifti
    from inference.model_dir import read_model_yaml
    from inference.model_predictor import ModelPredictor
    from inference.synthetic.cohort import generate_patient

    torch.set_num_threads(args.threads)
    model_dir = args.model or demo_model_dir()
    cfg = read_model_yaml(model_dir)[0]
    own = cfg.inference.guidance_scale
    cfg_scale = own if own != 1.0 else 3.0
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        record = generate_patient(0, 11, Path(tmp), spacing_mm=args.spacing, formats=("nifti",))
        folder = Path(tmp) / record.patient_id
        cases = [
            (
                f"as the node runs it: no survival class ({cfg.inference.unknown_class}, "
                f"guidance scale {own:g})",
                ModelPredictor(model_dir, args.device, samples=args.samples),
                study_inputs_from_nifti(folder),
            ),
            (
                f"with CFG: class `intermediate` at guidance scale {cfg_scale:g} (a conditional "
                "and a null-class pass per step)",
                ModelPredictor(model_dir, args.device, samples=args.samples,
                               guidance_scale=cfg_scale),
                study_inputs_from_nifti(folder, "intermediate"),
            ),
        ]  # fmt: skip
    shape = "x".join(str(n) for n in cases[0][2].t1c.array.shape[::-1])
    rows = []
    for label, predictor, inputs in cases:
        times = _times(predictor, inputs, args.runs, args.device)
        rows.append((label, statistics.median(times), min(times), max(times)))
    where = (
        f"CPU, {args.threads} torch threads"
        if args.device == "cpu"
        else torch.cuda.get_device_name(0)
    )
    target = 60.0 if args.device == "cpu" else 10.0
    verdict = "meets" if max(r[1] for r in rows) <= target else "misses"
    body = (
        f"Model `{cfg.name}` {cfg.version} (`{model_dir.name}`), one synthetic study "
        f"(`generate_patient(0, 11)`, T1-Gd {shape} at {args.spacing:g} mm, FLAIR, GTV, dose), "
        f"{args.samples} samples, {cfg.scheduler.num_inference_steps} DDIM steps, {where}; "
        f"{args.runs} runs of each after one warm-up; one prediction takes the model grid in "
        "and gives the source grid out.\n\n"
        "| prediction | median s | min s | max s |\n| --- | --- | --- | --- |\n"
        + "".join(f"| {label} | {med:.2f} | {lo:.2f} | {hi:.2f} |\n" for label, med, lo, hi in rows)
        + f"\nTarget {target:g} s per study with 4 samples with CFG: {verdict}.\n"
    )
    print(body)
    if not args.no_write:
        section = f"sampling, {cfg.name}, {args.device}"
        update_section(section, body, "python -m bench.sampling " + " ".join(argv or sys.argv[1:]))
    return 0


def _times(predictor: ModelPredictor, inputs: StudyInputs, runs: int, device: str) -> list[float]:
    """Seconds of ``runs`` predictions after one that warms caches."""
    times: list[float] = []
    for i in range(runs + 1):
        elapsed, _ = timed(lambda: predictor.predict(inputs), device)
        print(f"run {i}: {elapsed:.2f} s", file=sys.stderr)
        if i:
            times.append(elapsed)
    return times


if __name__ == "__main__":
    exit_with(main)
