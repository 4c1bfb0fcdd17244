"""The coordinator's checkpoint of a federated run, so that a run stopped part-way (the
coordinator restarted, the run cancelled, too few sites left for a round) goes on from its last
completed round with ``resume`` (``glioforecast federate run|simulate --resume``).

After every round the coordinator writes, in ``OUT/checkpoints/federated-<stage>/``:

- ``global-round-NNNN.safetensors``: the global weights after round NNNN;
- ``state.json``: the round, the file above, what the run must match to be resumed (stage,
  strategy, the architecture, learning rate, batches, seed, the frozen autoencoder), the
  record of every round so far, the sites selected and the seconds spent.

``state.json`` is replaced (atomically) only once the weights it names are on disk, and the
previous round's weights are removed after it: a coordinator killed at any moment leaves a
``state.json`` that names a complete weights file. The checkpoint is removed once the global
model directory is written.

A resumed run is the interrupted one continued: every round's local training draws its
patient order and its noise from (seed, round, site) (:mod:`inference.federated.local`), so
with the same sites it ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dicom_node.errors import InferenceError
from dicom_node.spool import fsync_path
from inference.federated.config import RunConfig

FORMAT = "glioforecast-federated-checkpoint"
FORMAT_VERSION = 1
STATE_JSON = "state.json"


def checkpoint_dir(run: RunConfig) -> Path:
    """Where ``run`` keeps its checkpoint: beside, not among, centralised training's
    ``checkpoints/<stage>/`` (a diffusion stage may train into its stage-1 directory)."""
    from inference.train.loops import CHECKPOINTS

    return Path(run.out) / CHECKPOINTS / f"federated-{run.stage}"


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a state dict's tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(
    run: RunConfig, cfg_json: str, ae_state: Mapping[str, torch.Tensor] | None
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: everything that changes the weights a
    round makes. The rounds, timeouts, the sites' names and the evaluation may change."""
    return {
        "stage": run.stage,
        "strategy": run.strategy,
        "proximal_mu": run.proximal_mu if run.strategy == "fedprox" else None,
        "local_epochs": run.local_epochs,
        "learning_rate": run.learning_rate,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "model_config": json.loads(cfg_json),
        "stage1_weights": weights_digest(ae_state) if ae_state is not None else None,
    }


@dataclass
class Resumed:
    """What a run resumes from: the last completed round, its global weights, the rounds'
    records (as written), the sites selected so far, the seconds spent before, and the
    rounds after which the run was resumed earlier."""

    round: int
    weights: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]]
    sites_selected: list[str]
    seconds: float
    resumed_after: list[int]
    latent_scale: float | None


def describe(run: RunConfig) -> str | None:
    """ "after round R of N, saved at T" for a checkpoint at ``run``'s ``out``; ``None`` when
    there is none."""
    path = checkpoint_dir(run) / STATE_JSON
    if not path.is_file():
        return None
    try:
        state = _read_state(path)
    except InferenceError as exc:
        return f"an unreadable one ({exc})"
    return f"after round {state.get('round')} of {state.get('rounds_planned')}, saved at " + str(
        state.get("saved_at")
    )


def none_to_resume(run: RunConfig) -> InferenceError:
    return InferenceError(
        f"--resume: expected the checkpoint of an interrupted federated {run.stage} run at "
        f"{checkpoint_dir(run)}, found none: start without --resume"
    )


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InferenceError(
            f"federated checkpoint {path}: expected the run's state as JSON, found an "
            f"unreadable file ({exc}); start again with --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InferenceError(
            f"federated checkpoint {path}: expected a JSON object with format {FORMAT!r}, found "
            f"{type(state).__name__ if not isinstance(state, dict) else state.get('format')!r}; "
            "start again with --overwrite"
        )
    if state.get("format_version") != FORMAT_VERSION:
        raise InferenceError(
            f"federated checkpoint {path}: expected format_version {FORMAT_VERSION}, found "
            f"{state.get('format_version')!r} (written by another version of glioforecast); "
            "resume it with that version, or start again with --overwrite"
        )
    return state


def load(run: RunConfig, identity: Mapping[str, Any]) -> Resumed:
    """The checkpoint at ``run``'s ``out``, refused (naming what differs) when it is another
    run's or when ``run`` asks for fewer rounds than it has done."""
    from inference.model_dir import load_weights_file
    from inference.train.loops import refuse_other_run

    where = checkpoint_dir(run)
    path = where / STATE_JSON
    if not path.is_file():
        raise none_to_resume(run)
    state = _read_state(path)
    refuse_other_run(
        where, state.get("identity", {}), identity,
        "resume with the interrupted run's settings, or start again with --overwrite",
    )  # fmt: skip
    done = int(state["round"])
    if run.num_server_rounds < done:
        raise InferenceError(
            f"cannot resume from {where}: expected --rounds of at least {done} (the rounds the "
            f"checkpoint has done), found {run.num_server_rounds}"
        )
    weights_file = where / str(state["weights"])
    weights = load_weights_file(weights_file)
    if weights_digest(weights) != state.get("weights_sha256"):
        raise InferenceError(
            f"federated checkpoint {weights_file}: expected the weights state.json names "
            f"(SHA-256 {state.get('weights_sha256')}), found other bytes; start again with "
            "--overwrite"
        )
    scale = state.get("latent_scale")
    return Resumed(
        round=done,
        weights=weights,
        rounds=list(state.get("rounds", [])),
        sites_selected=list(state.get("sites_selected", [])),
        seconds=float(state.get("seconds", 0.0)),
        resumed_after=[int(r) for r in state.get("resumed_after", [])],
        latent_scale=float(scale) if scale is not None else None,
    )


def save(
    run: RunConfig,
    identity: Mapping[str, Any],
    rnd: int,
    weights: Mapping[str, torch.Tensor],
    rounds: list[dict[str, Any]],
    sites_selected: list[str],
    seconds: float,
    resumed_after: list[int],
    latent_scale: float | None,
) -> None:
    """Write round ``rnd``'s checkpoint (weights first, then ``state.json``, then the earlier
    round's weights are removed)."""
    from safetensors.torch import save_file

    from inference.train.loops import _atomic_json

    where = checkpoint_dir(run)
    where.mkdir(parents=True, exist_ok=True)
    name = f"global-round-{rnd:04d}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    tmp = where / f"{name}.tmp"
    save_file(tensors, str(tmp))
    fsync_path(tmp)
    tmp.replace(where / name)
    _atomic_json(
        where / STATE_JSON,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "round": rnd,
            "rounds_planned": run.num_server_rounds,
            "weights": name,
            "weights_sha256": weights_digest(tensors),
            "identity": dict(identity),
            "rounds": rounds,
            "sites_selected": sites_selected,
            "seconds": round(seconds, 2),
            "resumed_after": resumed_after,
            "latent_scale": latent_scale,
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )
    fsync_path(where)
    for old in where.glob("global-round-*.safetensors*"):
        if old.name != name:
            old.unlink(missing_ok=True)


def remove(run: RunConfig) -> None:
    """Remove ``run``'s checkpoint (the run finished, or ``overwrite`` starts it again)."""
    where = checkpoint_dir(run)
    if where.is_dir():
        shutil.rmtree(where)
        parent = where.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
