"""``glioforecast train | evaluate | predict``: the model commands (the node's CLI wires
:func:`register`).

- ``train autoencoder|diffusion|baseline --data DIR --out MODEL_DIR``: train a stage on synthetic
  cohort folders (progress bars, checkpoints after every epoch, ``--resume``, ``--seed``);
- ``evaluate --model MODEL_DIR --data DIR``: "no change" and each model on the same patients,
  ``metrics.json`` + ``metrics.md`` with bootstrap intervals;
- ``predict INPUT --model MODEL_DIR --out DIR``: offline prediction of one study, INPUT a folder
  of NIfTI files in the synthetic layout or a DICOM study folder (series roles assigned by the
  node's configured rules, ``dicom_node.roles.assign_roles``); writes ``mean.nii.gz``,
  ``std.nii.gz``, ``tumour_mask.nii.gz`` and ``summary.json``.

Heavy modules (torch, MONAI) are imported when a command runs, not when it is registered.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.errors import GlioforecastError, InputError
from dicom_node.types import StudyInputs
from inference.bundled import model_option
from inference.model_config import COMPILE_MODES, PREDICTION_TYPES
from inference.synthetic.cli import positive_int

log = logging.getLogger(__name__)

EXIT_FAILED = 2
PRESETS = ("tiny", "demo", "fine")
#: what predict writes to --out (Prediction attribute -> file); summary.json, written last,
#: marks a prediction's folder
PREDICTION_FILES = {
    "mean": "mean.nii.gz",
    "std": "std.nii.gz",
    "tumour_mask": "tumour_mask.nii.gz",
    "summary": "summary.json",
}


def _sites(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated site names, found {text!r}")
    return items


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, found {text!r}"
        ) from None


def _patch(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected three positive sizes K,J,I or 'none', found {text!r}"
        )
    return sizes


def _fail(command: str, exc: Exception) -> int:
    # on stderr once (a log line as well printed it twice: logging is not set up for commands)
    sys.stderr.write(f"glioforecast {command}: {exc}\n")
    return EXIT_FAILED


# ------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from inference.train.loops import (
        TrainOptions,
        train_autoencoder,
        train_baseline,
        train_diffusion,
    )

    try:
        options = TrainOptions(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            device=args.device,
            resume=args.resume,
            autocast=args.autocast,
            held_out_sites=args.held_out_sites,
            n_held_out_sites=args.n_held_out_sites,
            held_out_seeds=args.held_out_seeds,
            progress=not args.no_progress,
            init_from=args.init_from,
            jobs=args.jobs,
            max_minutes=args.max_minutes,
            ema_decay=args.ema_decay,
            prediction_type=args.prediction_type,
            tumour_loss_weight=args.tumour_loss_weight,
            p_drop_class=args.p_drop_class,
            balance_response=args.balance_response,
        )
        if args.stage == "autoencoder":
            from inference.model_config import preset

            cfg = preset(args.preset)
            if args.autoencoder_patch is not None:
                cfg = cfg.with_training(autoencoder_patch=args.autoencoder_patch)
            report = train_autoencoder(args.data, args.out, cfg, options)
        elif args.stage == "diffusion":
            report = train_diffusion(args.data, args.out, options, stage1_dir=args.stage1)
        else:
            from inference.unet_baseline import baseline_preset

            report = train_baseline(args.data, args.out, baseline_preset(args.preset), options)
    except GlioforecastError as exc:
        return _fail("train", exc)
    val = report.val_losses[-1] if report.val_losses else None
    print(
        f"{report.stage}: {len(report.train_losses)} epoch(s) in total, "
        f"{report.epochs - report.start_epoch} this run, {report.seconds:.1f} s; "
        f"last train loss {report.train_losses[-1]:.5f}"
        + (f", validation loss {val:.5f}" if val is not None else ", no validation patients")
        + f"; held-out sites {report.held_out_sites or 'none'}; model directory {report.out_dir}"
    )
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train the autoencoder, the diffusion UNet or the UNet baseline",
        description="Train one stage on synthetic cohort folders (glioforecast synth). Run "
        "'autoencoder' then 'diffusion' into the same --out for a latent diffusion model; "
        "'baseline' trains the UNet regression baseline. Research use only.",
    )
    p.add_argument("stage", choices=("autoencoder", "diffusion", "baseline"))
    p.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="cohort folder: cohort.csv with NIfTI files or DICOM studies (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--preset", choices=PRESETS, default="demo", help="model size (default demo)")
    p.add_argument("--epochs", type=positive_int, default=10, help="total epochs (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="Adam learning rate (default 1e-4); with --resume it replaces the checkpoint's from "
        "the next epoch on (train_state.json records each rate used)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--autocast",
        choices=("auto", "bf16", "none"),
        default="auto",
        help="auto: bf16 on CUDA, none on CPU",
    )
    p.add_argument(
        "--held-out-sites", type=_sites, default=None, help="validation sites, comma-separated"
    )
    p.add_argument(
        "--n-held-out-sites",
        type=int,
        default=1,
        help="sites drawn with --seed for validation when --held-out-sites is not given",
    )
    p.add_argument(
        "--held-out-seeds",
        type=_seeds,
        default=(),
        help="cohort seeds whose patients are held out (mod 100000, as in the patient IDs)",
    )
    p.add_argument(
        "--stage1", type=Path, default=None, help="diffusion: stage-1 model directory (--out)"
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="autoencoder, diffusion: start from this model directory's weights (fine-tuning)",
    )
    p.add_argument(
        "--autoencoder-patch",
        type=_patch,
        default=None,
        help="autoencoder: train on random patches K,J,I, or 'none' for whole crops "
        "(default: the preset's)",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="diffusion: keep an exponential moving average of the UNet's weights with this "
        "decay and save it (0: the last weights; default: the model's training.ema_decay)",
    )
    p.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="diffusion: what the UNet learns to predict, the noise or the velocity "
        "(default: the model's scheduler.prediction_type)",
    )
    p.add_argument(
        "--tumour-loss-weight",
        type=float,
        default=None,
        help="diffusion: weight the loss by 1 + W on the latent voxels that touch the tumour "
        "mask (0: off; default: the model's training.tumour_loss_weight)",
    )
    p.add_argument(
        "--p-drop-class",
        type=float,
        default=None,
        help="diffusion: probability of training a sample under the null class, which is what "
        "the model predicts when no survival class is given (default: the model's "
        "training.p_drop_class)",
    )
    p.add_argument(
        "--balance-response",
        action="store_true",
        help="diffusion: draw each epoch's patients with replacement so that every response "
        "category of the training cohort is drawn equally often (default: each patient once "
        "per epoch)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="processes that prepare the patients (resampling to the model grid) before the "
        "first step (default 1: the autoencoder and diffusion stages prepare them one by one "
        "before it, the baseline at each patient's first batch)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after the epoch past which another would end later than this many minutes "
        "from the start (preparation included); --resume continues towards --epochs",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------------------------------
# evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from inference.evaluate import markdown_report, report_folder, run_evaluation, write_report

    try:
        models = [model_option(str(m)) for m in args.model or []]
        if None in models:
            raise InputError(
                "--model none: expected bundled or a model directory ('no change' is always "
                "evaluated, unless --skip-no-change)"
            )
        # before any patient: a report that cannot be written, or replaces one, is lost
        report_folder(args.out, args.overwrite)
        report = run_evaluation(
            [m for m in models if m is not None],
            args.data,
            samples=args.samples,
            include_no_change=not args.skip_no_change,
            survival_class=args.survival_class,
            guidance=args.guidance,
            device=args.device,
            seed=args.seed,
            n_resamples=args.bootstrap,
            progress=not args.no_progress,
            patients_limit=args.limit,
            sites=args.sites,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            stage1_bounds=args.stage1_bounds,
            compile_mode=args.compile,
            unknown_class=args.unknown_class,
        )
        js, md = write_report(report, args.out)
    except GlioforecastError as exc:
        return _fail("evaluate", exc)
    print(markdown_report(json.loads(js.read_text(encoding="utf-8"))))
    print(f"written: {js}, {md}")
    return 0


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure models against 'no change' on held-out synthetic patients",
        description="Evaluate the 'no change' baseline and each --model (UNet baseline or latent "
        "diffusion model directory) with the same code; writes metrics.json and metrics.md.",
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        help="model directory, or 'bundled' (the demo model shipped in the package); repeatable",
    )
    p.add_argument(
        "--data", type=Path, action="append", required=True,
        help="cohort folder: cohort.csv with NIfTI files or DICOM studies (repeatable)",
    )  # fmt: skip
    p.add_argument("--samples", type=positive_int, default=4, help="samples per study")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        help="report folder (one that holds a report only with --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the metrics.json and metrics.md that --out holds",
    )
    p.add_argument(
        "--survival-class",
        choices=("none", "truth"),
        default="none",
        help="guidance class: none (unguided, the node's default) or the patient's own",
    )
    p.add_argument(
        "--guidance", action="store_true", help="also compare short vs long survival guidance"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--limit", type=positive_int, default=None, help="first N patients only")
    p.add_argument("--sites", type=_sites, default=None, help="only these sites, comma-separated")
    p.add_argument("--skip-no-change", action="store_true", help="leave out 'no change'")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (the model's)")
    _add_unknown_class(p)
    p.add_argument(
        "--stage1-bounds",
        action="store_true",
        help="also score each latent model's autoencoder on the true post-treatment scan (what "
        "stage 2 can at best decode to) and on the pre-treatment scan",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="GPU: compile each diffusion UNet once, on channels-last weights (reduce-overhead: "
        "CUDA graphs; see bench/gpu_sampling.py); the first patient pays the compilation",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)


# ------------------------------------------------------------------------------------------
# predict


def _nifti_layout() -> str:
    """The NIfTI files a study folder needs, as messages name them."""
    from inference.data import INPUT_FILES

    optional = [f for r, f in INPUT_FILES.items() if r not in ("t1c", "gtv")]
    return (
        f"{INPUT_FILES['t1c']} and {INPUT_FILES['gtv']} (optional: {', '.join(optional)}; "
        "each may be uncompressed, .nii)"
    )


def _not_a_nifti_study(path: Path) -> InputError | None:
    """Why ``path`` (or its ``nifti/`` folder), which holds NIfTI files but no T1-Gd by its
    layout name, is not a NIfTI study; None when neither holds a NIfTI file (a DICOM study)."""
    from inference.data import NIFTI_DIR

    for folder in (path, path / NIFTI_DIR):
        names = sorted(f.name for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        if not any(n.endswith((".nii", ".nii.gz")) for n in names):
            continue
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "")
        return InputError(f"NIfTI study {folder}: expected {_nifti_layout()}, found {shown}")
    return None


def load_study(path: Path, config: Path | None = None) -> tuple[StudyInputs, str, dict[str, Any]]:
    """NIfTI (synthetic layout) or DICOM study folder -> inputs, the format, and what the
    summary says of the roles: ``roles`` (role -> file name or series description), for DICOM
    also ``role_series`` (role -> series number, UID, description) and ``role_notes`` (how the
    series were chosen, as the node's job records it)."""
    from inference.data import INPUT_FILES, nifti_file, nifti_study_folder, study_inputs_from_nifti
    from inference.dicom_cohort import study_inputs_from_dicom

    if not path.is_dir():
        raise InputError(f"INPUT {path}: expected a folder (NIfTI files or a DICOM study)")
    folder = nifti_study_folder(path)
    if folder is not None:
        inputs = study_inputs_from_nifti(folder)
        roles = {  # the files read, by their names in the folder
            r: found.name
            for r, f in INPUT_FILES.items()
            if (found := nifti_file(folder, f)) is not None
        }
        return inputs, "nifti", {"roles": roles}
    if not any(f.is_file() for f in path.rglob("*")):
        raise InputError(
            f"INPUT {path}: the folder is empty (no file at any depth); expected NIfTI files, "
            f"{_nifti_layout()}, or a DICOM study (MR series, an RT structure set, optional RT "
            "dose)"
        )
    problem = _not_a_nifti_study(path)
    if problem is not None:
        raise problem
    inputs, used = study_inputs_from_dicom(path, config)
    summary = {
        "roles": used.described,
        "role_series": used.as_json(),
        "role_notes": list(used.notes),
    }
    return inputs, "dicom", summary


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse a prediction into a folder that holds files, unless ``overwrite``: the files of a
    previous prediction (its ``summary.json``) would be replaced, and the user's own files of the
    same names too."""
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names or overwrite:
        return
    if (out / PREDICTION_FILES["summary"]).is_file():
        raise InputError(
            f"--out {out}: expected an empty or new folder, found a previous prediction "
            f"({PREDICTION_FILES['summary']}); give --overwrite to replace it"
        )
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    raise InputError(
        f"--out {out}: expected an empty or new folder, found {shown}; give --overwrite to "
        f"write {', '.join(PREDICTION_FILES.values())} into it anyway (files of those names "
        "are replaced)"
    )


#: predict's options that only a latent diffusion model's sampler uses, with what they set
_SAMPLING_OPTIONS = {
    "survival_class": "survival class",
    "guidance_scale": "guidance scale",
    "steps": "number of sampling steps",
    "unknown_class": "choice of classes for the unknown survival class",
}


def _sampling_refused(args: argparse.Namespace, model: str) -> InputError | None:
    """The error for the sampling options given (see :data:`_SAMPLING_OPTIONS`) to ``model``,
    which takes none of them; None when none was given."""
    given = [key for key in _SAMPLING_OPTIONS if getattr(args, key) is not None]
    if not given:
        return None
    options = ", ".join(
        f"--{key.replace('_', '-')} {v:g}" if isinstance(v := getattr(args, key), float)
        else f"--{key.replace('_', '-')} {v}"
        for key in given
    )  # fmt: skip
    return InputError(
        f"{options}: {model} takes {', '.join(f'no {_SAMPLING_OPTIONS[k]}' for k in given)}; "
        "expected a latent diffusion model (--model bundled or its directory) with "
        + ("them" if len(given) > 1 else "it")
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from inference.data import write_volume

    started = time.monotonic()
    out: Path = args.out
    if out.exists() and not out.is_dir():
        return _fail("predict", GlioforecastError(f"--out {out}: expected a folder, found a file"))
    try:
        inputs, fmt, roles = load_study(args.input, getattr(args, "config", None))
        for note in roles.get("role_notes", []):  # the choices the node's job would record
            sys.stderr.write(f"glioforecast predict: {args.input}: {note}\n")
        if args.survival_class:
            from dataclasses import replace

            inputs = replace(inputs, survival_class=args.survival_class)
        predictor: Any
        model_dir = None if args.model is None else model_option(args.model)
        if model_dir is None:
            from inference.baseline import NoChangeBaseline

            # a baseline took these options, wrote some in the summary, and ignored them
            refused = _sampling_refused(args, "the 'no change' baseline")
            if refused:
                raise refused
            if args.model is None:
                log.warning("no --model given: using the 'no change' baseline")
            predictor = NoChangeBaseline()
        else:
            from inference.model_dir import KIND_LDM
            from inference.model_predictor import ModelPredictor

            predictor = ModelPredictor(
                model_dir,
                device=args.device,
                guidance_scale=args.guidance_scale,
                num_inference_steps=args.steps,
                seed=args.seed,
                unknown_class=args.unknown_class,
            )
            refused = _sampling_refused(
                args,
                f"the {predictor.kind} model {predictor.name} {predictor.version} ({model_dir})",
            )
            if refused and predictor.kind != KIND_LDM:
                raise refused
        check_out_folder(out, args.overwrite)
        prediction = predictor.predict(inputs, samples=args.samples)
    except GlioforecastError as exc:
        return _fail("predict", exc)
    summary: dict[str, Any] = {
        "notice": "synthetic prediction - research use only, not for clinical use",
        "input": str(args.input),
        "input_format": fmt,
        **roles,
        "model_name": prediction.model_name,
        "model_version": prediction.model_version,
        "model_dir": None if model_dir is None else str(model_dir),
        "samples": len(prediction.sample_volumes_ml),
        "seed": args.seed,
        "survival_class": prediction.survival_class,
        "survival_scenario": prediction.survival_scenario,
        "sample_classes": list(prediction.sample_classes),
        "current_volume_ml": prediction.current_volume_ml,
        "predicted_volume_ml": prediction.predicted_volume_ml,
        # what tumour_mask.nii.gz outlines (where the samples agree), as the node's SR says
        "outlined_volume_ml": prediction.outlined_volume_ml,
        "sample_volumes_ml": list(prediction.sample_volumes_ml),
        "response_probabilities": prediction.response_probabilities,
        "response_category": prediction.response_category,
        "grid": {
            "shape_kji": list(prediction.mean.shape),
            "spacing_mm": list(prediction.mean.spacing),
            "frame_of_reference_uid": prediction.mean.frame_of_reference_uid,
        },
        "seconds": round(time.monotonic() - started, 2),
    }
    try:  # each file whole or not at all (a full disk left them cut short, and said success)
        out.mkdir(parents=True, exist_ok=True)
        written = {
            key: write_volume(getattr(prediction, key), out / name)
            for key, name in PREDICTION_FILES.items()
            if key != "summary"
        }
        summary["files"] = {k: str(v.name) for k, v in written.items()}
        tmp = out / f".{PREDICTION_FILES['summary']}.tmp"
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, out / PREDICTION_FILES["summary"])
    except OSError as exc:
        return _fail("predict", GlioforecastError(f"the prediction was not written: {exc}"))
    print(
        f"{prediction.model_name} {prediction.model_version}: tumour "
        f"{prediction.current_volume_ml:.1f} ml -> {prediction.predicted_volume_ml:.1f} ml, "
        f"{prediction.response_category}; written to {args.out} (synthetic prediction, "
        "research use only)"
    )
    return 0


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="predict one study offline (NIfTI folder or DICOM study folder)",
        description="Offline prediction, no network: INPUT is a folder of NIfTI files in the "
        "synthetic layout (pre_t1c.nii.gz, gtv.nii.gz, optional pre_flair/dose) or a DICOM "
        "study folder (MR series, RTSTRUCT, optional RTDOSE; roles from the configured rules). "
        "Writes mean/std/tumour_mask NIfTI and summary.json. Research use only.",
    )
    p.add_argument("input", type=Path, help="NIfTI folder or DICOM study folder")
    p.add_argument(
        "--model",
        default=None,
        help="model directory, 'bundled' (the demo model shipped in the package) or 'none' "
        "(default: 'no change')",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: new or empty (a previous prediction's, or one with other files, "
        "only with --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a --out that holds files: a previous prediction's are replaced, as are "
        "other files named mean.nii.gz, std.nii.gz, tumour_mask.nii.gz or summary.json",
    )
    p.add_argument("--samples", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (the model's)")
    p.add_argument("--survival-class", default=None, help="guidance class (default: none)")
    _add_unknown_class(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.set_defaults(func=cmd_predict)


def _add_unknown_class(p: argparse.ArgumentParser) -> None:
    from inference.model_config import UNKNOWN_CLASS_MODES

    p.add_argument(
        "--unknown-class",
        choices=UNKNOWN_CLASS_MODES,
        default=None,
        help="without a survival class: every sample under the null class, or the samples "
        "spread over the classes by the training cohort's shares (default: the model's "
        "inference.unknown_class)",
    )


def register(subparsers: Any) -> None:
    """Add ``train``, ``evaluate`` and ``predict`` to an argparse sub-parser collection."""
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_predict(subparsers)
    from inference.federated.cli import register as register_federate

    register_federate(subparsers)  # glioforecast federate (inference/federated/cli.py)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m inference.cli train ...``)."""
    parser = argparse.ArgumentParser(prog="glioforecast")
    parser.add_argument("--config", type=Path, default=None, help="node configuration (roles)")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
