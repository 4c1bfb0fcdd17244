"""Prediction time of one study: a model directory, N samples with guidance, on CPU or GPU.

Times what the node's job does after conversion: ``ModelPredictor.predict`` on one synthetic
study (the inputs on the model grid, DDIM sampling of N samples with classifier-free guidance,
decoding, the mean / standard deviation / mask back on the source grid). The first prediction
warms caches and is not counted.

    python -m bench.sampling [--model DIR] [--samples 4] [--runs 5] [--threads 2] [--device cpu]

``--model`` defaults to the bundled demo model. Writes the section ``sampling, <model name>,
<device>`` of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import update_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="model directory (default: the bundled one)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--spacing", type=float, default=2.0, help="synthetic study grid, mm")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from inference.bundled import demo_model_dir
    from inference.data import study_inputs_from_nifti
    from inference.model_dir import read_model_yaml
    from inference.model_predictor import ModelPredictor
    from inference.synthetic.cohort import generate_patient

    torch.set_num_threads(args.threads)
    model_dir = args.model or demo_model_dir()
    predictor = ModelPredictor(model_dir, args.device, samples=args.samples)
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        record = generate_patient(0, 11, Path(tmp), spacing_mm=args.spacing, formats=("nifti",))
        # a survival class makes every step a guided pair (conditional + null class): CFG
        inputs = study_inputs_from_nifti(Path(tmp) / record.patient_id, "intermediate")
    shape = "x".join(str(n) for n in inputs.t1c.array.shape[::-1])
    times: list[float] = []
    for i in range(args.runs + 1):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        prediction = predictor.predict(inputs)
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        print(f"run {i}: {elapsed:.2f} s", file=sys.stderr)
        if i:
            times.append(elapsed)
    med = statistics.median(times)
    steps = read_model_yaml(model_dir)[0].scheduler.num_inference_steps
    where = (
        f"CPU, {args.threads} torch threads"
        if args.device == "cpu"
        else torch.cuda.get_device_name(0)
    )
    target = 60.0 if args.device == "cpu" else 10.0
    verdict = "meets" if med <= target else "misses"
    body = (
        f"Model `{predictor.name}` {predictor.version} (`{model_dir.name}`), one synthetic study "
        f"(`generate_patient(0, 11)`, T1-Gd {shape} at {args.spacing:g} mm, FLAIR, GTV, dose), "
        f"{len(prediction.sample_volumes_ml)} samples with classifier-free guidance (class "
        f"`{prediction.survival_class}`: a conditional and a null-class pass per step), "
        f"{steps} DDIM steps, {where}; {args.runs} runs after one warm-up.\n\n"
        "| what | median s | min s | max s |\n| --- | --- | --- | --- |\n"
        f"| one prediction (model grid in, source grid out) | {med:.2f} | {min(times):.2f} | "
        f"{max(times):.2f} |\n\n"
        f"Target {target:g} s per study with 4 samples: {verdict}.\n"
    )
    print(body)
    if not args.no_write:
        section = f"sampling, {predictor.name}, {args.device}"
        update_section(section, body, "python -m bench.sampling " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
