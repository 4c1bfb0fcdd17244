"""Speed of our DDIM sampler against a plain float32 MONAI inferer loop (GPU), and of a whole study.

The same UNet, the same conditioning, N samples (default 4) with classifier-free guidance (a
survival class at scale 3: a conditional and a null-class pass per step, as one batch of 2N),
the model's DDIM steps, timed as whole sampling loops:

- ``monai-fp32``: MONAI's ``DiffusionInferer.sample`` (``mode="concat"``, ``cfg=3``) in float32,
  the UNet given the class labels of both halves; the reference of the target (it blanks the
  image conditioning in its null half, which changes no arithmetic);
- ``fp32``: our loop (``inference.sampler.sample_latents``) in float32;
- ``bf16``, ``fp16``: our loop under autocast;
- ``bf16-cl``: bf16 with the UNet and its inputs in ``channels_last_3d`` memory order;
- ``bf16-graphs``, ``bf16-cl-graphs``: the same compiled with ``torch.compile(mode=
  "reduce-overhead")``, which replays CUDA graphs (compile time is reported, not counted).

Each variant runs on its own copy of the weights, ``--warmup`` loops first (not counted), then
``--runs`` timed loops (CUDA synchronised; median, min, max). ``rel. error`` is
``|x - x_fp32| / |x_fp32|`` of the final latents against our float32 loop from the same noise.

``--study`` also times ``ModelPredictor.predict`` on one synthetic study at the model's spacing
(inputs to the model grid, encoding, sampling, decoding, back to the source grid) with our
float32 loop and with the fastest variant.

    python -m bench.gpu_sampling [--model DIR | --preset fine] [--device cuda] [--study]

Without ``--model`` the networks of ``--preset`` are built with seeded random weights (timing
does not depend on the values; MONAI's zero-initialised convolutions are filled with noise so
that the outputs, and the errors, are not trivially zero). Writes the section
``gpu sampling, <model>[, random weights], <spacing>, <device>`` of docs/BENCHMARKS.md
(``--report PATH`` for another file).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cli import count, exit_with, refuse_missing_cuda
from bench.report import DOCS, update_section
from bench.timing import timed
from inference.model_config import ModelConfig
from inference.model_predictor import ModelPredictor
from inference.networks import LatentDiffusionModel, build_scheduler
from inference.sampler import SamplingOptions, make_generator, sample_latents

# name -> (label, sampler options, or None for MONAI's inferer)
VARIANTS: dict[str, tuple[str, dict[str, object] | None]] = {
    "monai-fp32": ("MONAI DiffusionInferer, float32", None),
    "fp32": ("ours, float32", {"autocast": "none"}),
    "bf16": ("ours, bf16 autocast", {"autocast": "bf16"}),
    "fp16": ("ours, fp16 autocast", {"autocast": "fp16"}),
    "bf16-cl": ("ours, bf16, channels-last", {"autocast": "bf16", "channels_last": True}),
    "bf16-graphs": (
        "ours, bf16, compiled (CUDA graphs)",
        {"autocast": "bf16", "compile": "reduce-overhead"},
    ),
    "bf16-cl-graphs": (
        "ours, bf16, channels-last, compiled (CUDA graphs)",
        {"autocast": "bf16", "channels_last": True, "compile": "reduce-overhead"},
    ),
}


@dataclasses.dataclass
class Row:
    name: str
    label: str
    first_s: float
    times: list[float]
    error: float | None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="model directory (default: --preset, random)")
    parser.add_argument("--preset", default="fine", help="preset without --model (default fine)")
    parser.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="with --preset: this grid spacing in mm, the crop scaled to keep the field of view "
        "(e.g. 1 for the fine networks at 1 mm)",
    )
    parser.add_argument("--samples", type=count, default=4)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--runs", type=count, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--study", action="store_true", help="also time whole studies")
    parser.add_argument("--report", type=Path, default=DOCS, help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "fp32" not in names:
        parser.error(f"--variants: expected fp32 and any of {', '.join(VARIANTS)}, found {names}")
    refuse_missing_cuda(parser, args.device)

    if args.spacing is not None and args.model is not None:
        parser.error("--spacing: only with --preset (a model directory has its own grid)")
    base, source = _model(args.model, args.preset, args.device, args.spacing)
    cfg = base.config
    n, w = args.samples, args.guidance_scale
    g = torch.Generator().manual_seed(7)
    cond = torch.randn(1, base.layout.num_channels, *base.layout.latent_shape, generator=g)
    cond = cond.expand(n, *cond.shape[1:]).contiguous().to(args.device)
    labels = torch.full((n,), 1, dtype=torch.long, device=args.device)
    steps = cfg.scheduler.num_inference_steps

    rows: list[Row] = []
    failed: dict[str, str] = {}
    reference: torch.Tensor | None = None
    for name in ["fp32", *[v for v in names if v != "fp32"]]:
        label, changes = VARIANTS[name]
        model = copy.deepcopy(base)
        if changes is None:
            run = _monai_loop(model, cond, labels, w, steps)
        else:
            options = SamplingOptions.from_config(cfg, guidance_scale=w, **changes)
            run = functools.partial(_our_loop, model, cond, labels, options)
        try:
            first, times, out = _time(run, args.warmup, args.runs, args.device)
        except Exception as exc:  # a variant this torch cannot run: reported, the rest go on
            if name == "fp32":
                raise
            traceback.print_exc()
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        if name == "fp32":
            reference = out
        error = None
        if changes is not None and reference is not None:
            error = float((out - reference).norm() / reference.norm())
        rows.append(Row(name, label, first, times, error))
        print(f"{name}: median {rows[-1].median * 1e3:.1f} ms, first {first:.2f} s", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()

    by_name = {r.name: r for r in rows}
    plain = by_name.get("monai-fp32", by_name["fp32"])
    fastest = min((r for r in rows if r.name != "monai-fp32"), key=lambda r: r.median)
    study = _study_rows(args, base, fastest) if args.study else []
    body = _body(args, cfg, source, rows, plain, fastest, study, failed)
    print(body)
    if not args.no_write:
        weights = "" if args.model is not None else ", random weights"
        grid = f"{cfg.preprocessing.spacing_mm[0]:g} mm"
        section = f"gpu sampling, {cfg.name}{weights}, {grid}, {args.device}"
        update_section(
            section, body, "python -m bench.gpu_sampling " + " ".join(argv or sys.argv[1:]),
            path=args.report,
        )  # fmt: skip
    return 0


def _model(
    model_dir: Path | None, preset: str, device: str, spacing: float | None = None
) -> tuple[LatentDiffusionModel, str]:
    from inference.model_config import preset as preset_config
    from inference.model_dir import load_model_dir
    from inference.networks import build_model

    if model_dir is not None:
        return load_model_dir(model_dir, device).model.eval(), f"`{model_dir.name}`"
    cfg = preset_config(preset)
    if spacing is not None:
        pre = cfg.preprocessing
        k, j, i = (
            round(n * s / spacing) for n, s in zip(pre.crop_shape, pre.spacing_mm, strict=True)
        )
        crop = (k, j, i)
        cfg = cfg.replace(
            preprocessing=dataclasses.replace(pre, spacing_mm=(spacing,) * 3, crop_shape=crop)
        )
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():  # MONAI's zero-initialised convolutions
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(device).eval(), f"preset `{preset}`, seeded random weights"


def _our_loop(
    model: LatentDiffusionModel,
    cond: torch.Tensor,
    labels: torch.Tensor,
    options: SamplingOptions,
) -> torch.Tensor:
    return sample_latents(model, cond, labels, make_generator(0, cond.device), options)


def _monai_loop(
    model: LatentDiffusionModel, cond: torch.Tensor, labels: torch.Tensor, w: float, steps: int
) -> Callable[[], torch.Tensor]:
    from monai.inferers import DiffusionInferer

    scheduler = build_scheduler(model.config)
    scheduler.set_timesteps(steps)
    inferer = DiffusionInferer(scheduler)
    null = torch.full_like(labels, model.config.null_class)
    # MONAI's null half comes first
    unet = functools.partial(model.unet, class_labels=torch.cat([null, labels]))
    shape = (cond.shape[0], model.config.autoencoder.latent_channels, *cond.shape[2:])

    @torch.no_grad()
    def run() -> torch.Tensor:
        g = make_generator(0, cond.device)
        noise = torch.randn(shape, generator=g, device=cond.device)
        out = inferer.sample(
            input_noise=noise,
            diffusion_model=unet,  # type: ignore[arg-type]
            scheduler=scheduler,
            conditioning=cond,
            mode="concat",
            verbose=False,
            cfg=w,
        )
        assert isinstance(out, torch.Tensor)
        return out

    return run


def _time(
    run: Callable[[], torch.Tensor], warmup: int, runs: int, device: str
) -> tuple[float, list[float], torch.Tensor]:
    """Seconds of the first call (compilation included), of ``runs`` calls after ``warmup``,
    and the last output."""

    first, out = timed(run, device)
    for _ in range(max(warmup - 1, 0)):
        timed(run, device)
    times = []
    for _ in range(runs):
        t, out = timed(run, device)
        times.append(t)
    return first, times, out.detach().float().clone()


def _study_rows(
    args: argparse.Namespace, base: LatentDiffusionModel, fastest: Row
) -> list[tuple[str, Row]]:
    """Whole-study times of ``base`` (written as a model directory when it came from a preset),
    our float32 loop and the fastest variant."""
    from inference.data import study_inputs_from_nifti
    from inference.model_dir import save_model_dir
    from inference.synthetic.cohort import generate_patient

    out = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = args.model or save_model_dir(base, Path(tmp) / "model")
        spacing = base.config.preprocessing.spacing_mm[0]
        record = generate_patient(0, 11, Path(tmp), spacing_mm=spacing, formats=("nifti",))
        inputs = study_inputs_from_nifti(Path(tmp) / record.patient_id, "intermediate")
        for name in dict.fromkeys(["fp32", fastest.name]):
            changes = dict(VARIANTS[name][1] or {})
            predictor = ModelPredictor(
                model_dir,
                args.device,
                samples=args.samples,
                guidance_scale=args.guidance_scale,
                autocast=str(changes.get("autocast", "auto")),
                channels_last=bool(changes.get("channels_last", False)),
                compile_mode=str(changes.get("compile", "none")),
                allow_untrained=True,
            )

            def predict(p: ModelPredictor = predictor) -> torch.Tensor:
                return torch.as_tensor(p.predict(inputs).mean.array)

            try:
                first, times, _ = _time(
                    predict,
                    args.warmup,
                    max(args.runs // 2, 3),
                    args.device,
                )
            except Exception:  # reported; the other row stands
                traceback.print_exc()
                continue
            out.append((f"{VARIANTS[name][0]}, whole study", Row(name, "", first, times, None)))
    return out


def _body(
    args: argparse.Namespace,
    cfg: ModelConfig,
    source: str,
    rows: list[Row],
    plain: Row,
    fastest: Row,
    study: list[tuple[str, Row]],
    failed: dict[str, str],
) -> str:
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    latent = "x".join(str(s) for s in cfg.latent_shape)
    crop = "x".join(str(s) for s in cfg.preprocessing.crop_shape)
    lines = [
        f"Model `{cfg.name}` {cfg.version} ({source}): {crop} crop at "
        f"{cfg.preprocessing.spacing_mm[0]:g} mm, latent {cfg.autoencoder.latent_channels}x"
        f"{latent}, UNet channels {list(cfg.diffusion.channels)}; {args.samples} samples with "
        f"CFG (class `intermediate`, scale {args.guidance_scale:g}: one batch of "
        f"{2 * args.samples} per step), {cfg.scheduler.num_inference_steps} DDIM steps; {where}, "
        f"torch {torch.__version__}. One sampling loop; median of {args.runs} after "
        f"{args.warmup} warm-up loops; 'first' is the first loop (compilation included).",
        "",
        "| variant | median ms | min ms | max ms | first s | vs MONAI fp32 | rel. error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        err = "reference" if r.name == "fp32" else ("n/a" if r.error is None else f"{r.error:.1e}")
        lines.append(
            f"| {r.label} | {r.median * 1e3:.1f} | {min(r.times) * 1e3:.1f} | "
            f"{max(r.times) * 1e3:.1f} | {r.first_s:.2f} | {plain.median / r.median:.2f}x | {err} |"
        )
    for name, error in failed.items():
        lines.append(f"| {VARIANTS[name][0]} | failed: {error[:160]} | | | | | |")
    speedup = plain.median / fastest.median
    verdict = (
        f"target >= 2x: {'meets' if speedup >= 2 else 'misses'}"
        if plain.name == "monai-fp32"
        else "no MONAI loop in this run: no verdict on the target"
    )
    lines += ["", f"Fastest: {fastest.label}, {speedup:.2f}x the {plain.label} loop ({verdict})."]
    if study:
        lines += [
            "",
            f"Whole study (`ModelPredictor.predict`, one synthetic study at "
            f"{cfg.preprocessing.spacing_mm[0]:g} mm, `generate_patient(0, 11)`), "
            f"median of {len(study[0][1].times)}:",
            "",
            "| prediction | median s | min s | max s | first s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, r in study:
            lines.append(
                f"| {label} | {r.median:.2f} | {min(r.times):.2f} | {max(r.times):.2f} | "
                f"{r.first_s:.2f} |"
            )
        worst = max(r.median for _, r in study)
        lines += ["", f"Target <= 10 s per study: {'meets' if worst <= 10 else 'misses'}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    exit_with(main)
