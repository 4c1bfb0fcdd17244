"""Move a diffusion model's weight average part of the way towards its last weights.

``train diffusion --ema-decay D`` writes the exponential moving average of the UNet's weights
into the model directory and keeps the last weights of the run in its checkpoint
(``checkpoints/diffusion/weights.safetensors``, beside ``average.safetensors``). The two can
behave very differently (the demo model's samples draw too little tumour from the average and
too much from the last weights), and the decay cannot be changed after the run. This writes a
new model directory whose diffusion UNet is ``(1 - alpha) * average + alpha * last``: the
stage-1 networks, the configuration and the training record are the source's; the name and
version are given; ``train_state.json`` records the source, alpha and the SHA-256 of both
weight files.

    python -m inference.train.interpolate MODEL_DIR --alpha 0.5 --out OUT \\
        --name glioforecast-demo --version 0.11.0

The checkpoint must belong to the directory: its ``average.safetensors`` must hold exactly the
directory's diffusion weights, or the command refuses (the checkpoint of another run, or one
that trained on after the directory was written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dicom_node.errors import GlioforecastError, InferenceError
from inference.model_dir import (
    KIND_LDM,
    load_model_dir,
    load_state_checked,
    load_weights_file,
    model_kind,
    save_model_dir,
    sha256_file,
)
from inference.train.loops import AVERAGE_FILE, TRAIN_STATE, read_train_state

CHECKPOINT = Path("checkpoints") / "diffusion"
LAST_FILE = "weights.safetensors"


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def interpolate_towards_last(
    model_dir: str | Path,
    alpha: float,
    out: str | Path,
    *,
    name: str,
    version: str,
) -> Path:
    """Write ``out``: ``model_dir`` with its diffusion UNet ``(1 - alpha) * average + alpha *
    last`` (see the module docstring). Returns ``out``."""
    src = Path(model_dir)
    dst = Path(out)
    if not 0.0 <= alpha <= 1.0:
        raise InferenceError(f"alpha: expected a number in [0, 1], found {alpha}")
    if model_kind(src) != KIND_LDM:
        raise InferenceError(
            f"{src}: expected a latent diffusion model directory, found kind {model_kind(src)!r}"
        )
    if dst.resolve() == src.resolve():
        raise InferenceError(f"--out {dst}: expected a new directory, found the source itself")
    if dst.exists() and any(dst.iterdir()):
        raise InferenceError(f"--out {dst}: expected a new or empty directory, found files")
    ckpt = src / CHECKPOINT
    missing = [f for f in (AVERAGE_FILE, LAST_FILE) if not (ckpt / f).is_file()]
    if missing:
        raise InferenceError(
            f"{ckpt}: expected the run's last weights and weight average ({LAST_FILE}, "
            f"{AVERAGE_FILE}), missing {missing} (trained without --ema-decay, or the "
            f"checkpoints were removed)"
        )
    loaded = load_model_dir(src)
    unet = loaded.model.unet
    average = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    if not _same_tensors(load_weights_file(ckpt / AVERAGE_FILE), average):
        raise InferenceError(
            f"{ckpt / AVERAGE_FILE}: expected the weight average that {src}/diffusion.safetensors "
            f"holds, found other weights (the checkpoint is not the one this directory was "
            f"written from)"
        )
    last = load_weights_file(ckpt / LAST_FILE)
    load_state_checked(unet, last, str(ckpt / LAST_FILE))  # names and shapes, all problems
    blended = {
        k: torch.lerp(average[k].float(), last[k].float(), alpha).to(average[k].dtype)
        if average[k].is_floating_point()
        else average[k]
        for k in average
    }
    unet.load_state_dict(blended, strict=True)
    loaded.model.config = loaded.model.config.replace(name=name, version=version)
    card = (
        f"# {name} {version}\n\n"
        f"The diffusion UNet of `{src}` moved from its weight average towards the run's last "
        f"weights: (1 - {alpha:g}) x average + {alpha:g} x last "
        f"(`python -m inference.train.interpolate`). Stage 1, configuration and training record "
        f"are the source's. Synthetic prediction, research use only; not for clinical use.\n"
    )
    save_model_dir(loaded.model, dst, card=card)
    state: dict[str, Any] = read_train_state(src)
    stage = dict(state.get("stages", {}).get("diffusion", {}))
    stage["interpolation"] = {
        "source": str(src),
        "alpha": alpha,
        "average_sha256": sha256_file(ckpt / AVERAGE_FILE),
        "last_sha256": sha256_file(ckpt / LAST_FILE),
    }
    state.setdefault("stages", {})["diffusion"] = stage
    (dst / TRAIN_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m inference.train.interpolate",
        description="Write a model directory whose diffusion UNet lies between the source's "
        "weight average and its run's last weights. Research use only.",
    )
    p.add_argument("model_dir", type=Path, help="model directory written by train diffusion")
    p.add_argument("--alpha", type=float, required=True, help="0: the average, 1: the last weights")
    p.add_argument("--out", type=Path, required=True, help="new model directory")
    p.add_argument("--name", required=True, help="model name written to model.yaml")
    p.add_argument("--version", required=True, help="model version written to model.yaml")
    args = p.parse_args(argv)
    try:
        out = interpolate_towards_last(
            args.model_dir, args.alpha, args.out, name=args.name, version=args.version
        )
    except GlioforecastError as exc:
        print(f"interpolate: {exc}", file=sys.stderr)
        return 2
    print(f"written: {out} (alpha {args.alpha:g} towards the last weights of {args.model_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
