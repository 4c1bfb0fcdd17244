"""Training loops of the three trainable stages: the KL autoencoder (stage 1), the diffusion UNet
(stage 2) and the UNet regression baseline, with progress bars, checkpoints, resume and seeds.

Each loop reads cohort folders (:mod:`inference.data`), holds out whole sites for a validation
loss, runs epochs of the one-step functions (:mod:`inference.train.steps`,
:mod:`inference.unet_baseline`) and writes a model directory. Reproducibility: the initial
weights come from ``seed``, the patient order of epoch ``e`` from ``[seed, e]``, every other
random draw (latent sampling, timesteps, noise, condition dropout) from one ``torch.Generator``
seeded with ``seed`` whose state is checkpointed, so an interrupted run resumed with
``resume=True`` ends with the same weights as an uninterrupted one (same device). A resumed run
trains with its own learning rate: one that differs from the checkpoint's takes over from the
next epoch, and ``train_state.json`` lists each rate with its first epoch (``learning_rates``).
A resume is checked against the checkpoint (stage, configuration, seed, batch, patients) before
any weight is read, naming what differs.

Checkpoints, after every epoch, in ``OUT/checkpoints/<stage>/``: ``weights.safetensors`` (the
network being trained), ``average.safetensors`` (the diffusion UNet's weight average, when
``training.ema_decay`` keeps one: the model directory gets it), ``trainer.pt`` (optimizer
state and generator state: plain tensors and numbers, read back with
``torch.load(weights_only=True)``) and ``state.json`` (epoch, losses, configuration, patients;
written last, so its presence marks a complete checkpoint). Each save is written into
``<stage>.saving/`` beside it and then put in its place, so a training killed while it saves
resumes from that save or the one before (:class:`Checkpoint`).

``OUT/train_state.json`` records the finished stages (epochs, losses, data, seed, device, time);
a directory whose diffusion stage was never trained is refused by the predictor.

AMP: bf16 autocast on CUDA only (``autocast="auto"``); on CPU everything runs in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dicom_node.errors import InferenceError
from inference.data import (
    CohortDataset,
    CohortPatient,
    CohortSplit,
    read_cohort,
    split_cohort,
)
from inference.model_config import PREDICTION_TYPES, ModelConfig, config_to_dict
from inference.model_dir import (
    component_state,
    load_model_dir,
    load_state_checked,
    read_model_yaml,
    save_model_dir,
)
from inference.networks import LatentDiffusionModel, build_model, build_scheduler, build_unet
from inference.sampler import make_generator
from inference.train.steps import (
    AutoencoderBatch,
    DiffusionBatch,
    WeightAverage,
    autoencoder_losses,
    autoencoder_step,
    diffusion_loss,
    diffusion_step,
    latent_scale_from,
)
from inference.unet_baseline import (
    BaselineBatch,
    UNetBaselineConfig,
    baseline_losses,
    baseline_step,
    build_baseline_unet,
    save_baseline_dir,
)

log = logging.getLogger(__name__)

STAGES = ("autoencoder", "diffusion", "baseline")
TRAIN_STATE = "train_state.json"
CHECKPOINTS = "checkpoints"
AVERAGE_FILE = "average.safetensors"
_STAGE_STREAM = {"autoencoder": 1, "diffusion": 2, "baseline": 3}
_SAMPLING_BALANCED = "balanced by response category"


@dataclass(frozen=True)
class TrainOptions:
    """How to train (not what: that is the model configuration).

    ``epochs`` is the total number of epochs (a resumed run continues up to it).
    ``held_out_sites`` names validation sites; otherwise ``n_held_out_sites`` are drawn with
    ``seed`` (0: no validation). ``autocast``: ``auto`` (bf16 on CUDA, none on CPU), ``bf16`` or
    ``none``. ``init_from``: a model directory whose weights of the stage start the run
    (fine-tuning, e.g. of the bundled model on a site's data, or a change of patch size);
    its architecture must match. Diffusion only, each replacing the model's own setting:
    ``ema_decay``, the decay of the weight average the model directory keeps (0: none);
    ``prediction_type``, what the UNet learns to predict (``epsilon`` or ``v_prediction``);
    ``tumour_loss_weight``, the extra weight of the loss on the tumour (0: none);
    ``p_drop_class``, the probability of training a sample under the null class (what the
    model learns to predict when no survival class is given); ``balance_response``, draw each
    epoch's items with replacement so that every response category of the training patients
    is drawn equally often (see :func:`response_weights`). ``jobs``: processes that prepare
    the patients (resampling to the model grid) before the first step. ``max_minutes``: stop
    after the epoch past which another would end later than this many minutes from the start
    of the run (preparation included); the model directory gets the weights of the epochs
    done, and ``resume`` continues towards ``epochs``.
    """

    epochs: int = 10
    batch_size: int = 2
    learning_rate: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    autocast: str = "auto"
    held_out_sites: tuple[str, ...] | None = None
    n_held_out_sites: int = 1
    held_out_seeds: tuple[int, ...] = ()
    progress: bool = True
    grad_clip: float | None = 1.0
    init_from: Path | None = None
    ema_decay: float | None = None
    prediction_type: str | None = None
    tumour_loss_weight: float | None = None
    p_drop_class: float | None = None
    balance_response: bool = False
    jobs: int = 1
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs: expected >= 1, found {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size: expected >= 1, found {self.batch_size}")
        if self.jobs < 1:
            problems.append(f"jobs: expected >= 1, found {self.jobs}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            problems.append(f"max_minutes: expected > 0, found {self.max_minutes}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate: expected > 0, found {self.learning_rate}")
        if self.autocast not in ("auto", "bf16", "none"):
            problems.append(f"autocast: expected auto, bf16 or none, found {self.autocast!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            problems.append(
                f"ema_decay: expected 0 (off) or a decay in (0, 1), found {self.ema_decay}"
            )
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            problems.append(
                f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, "
                f"found {self.prediction_type!r}"
            )
        if self.tumour_loss_weight is not None and not self.tumour_loss_weight >= 0:
            problems.append(
                f"tumour_loss_weight: expected >= 0 (0: off), found {self.tumour_loss_weight}"
            )
        if self.p_drop_class is not None and not 0.0 <= self.p_drop_class <= 1.0:
            problems.append(
                f"p_drop_class: expected a probability in [0, 1], found {self.p_drop_class}"
            )
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"device: expected cpu or cuda, found {self.device!r}")
        if problems:
            raise InferenceError("training options:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class TrainReport:
    """What a training run did."""

    stage: str
    out_dir: Path
    epochs: int
    start_epoch: int
    train_losses: list[float]
    val_losses: list[float | None]
    seconds: float
    train_patients: list[str]
    held_out_patients: list[str]
    held_out_sites: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError("device: cuda was asked for, but torch finds no CUDA device here")
    return device


def epoch_order(
    n: int, seed: int, epoch: int, stage: str, weights: Sequence[float] | None = None
) -> list[int]:
    """The item order of one epoch (depends on the seed, the epoch and the stage only): a
    permutation, or with ``weights`` (one per item) ``n`` draws with replacement in proportion
    to them."""
    rng = np.random.default_rng([int(seed), int(epoch), _STAGE_STREAM[stage]])
    if weights is None:
        return [int(i) for i in rng.permutation(n)]
    p = np.asarray(weights, dtype=np.float64)
    return [int(i) for i in rng.choice(n, size=n, replace=True, p=p / p.sum())]


def response_weights(patients: Sequence[CohortPatient]) -> list[float]:
    """One sampling weight per patient, the inverse of the number of training patients in its
    response category: each category present is drawn equally often in expectation."""
    counts = Counter(p.response_category for p in patients)
    return [1.0 / counts[p.response_category] for p in patients]


def batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _t(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _cat(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.cat([_t(a, device) for a in arrays])


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def read_train_state(model_dir: str | Path) -> dict[str, Any]:
    """``train_state.json`` of a model directory (empty when absent)."""
    path = Path(model_dir) / TRAIN_STATE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InferenceError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _record_stage(out: Path, stage: str, info: dict[str, Any], base: dict[str, Any]) -> None:
    state = dict(base)
    stages = dict(state.get("stages", {}))
    stages[stage] = info
    state["stages"] = stages
    _atomic_json(out / TRAIN_STATE, state)


#: the key, in each file of a checkpoint, of the token of the save that wrote it
SAVE_TOKEN = "glioforecast_save"
#: the folders beside a checkpoint while it is saved: the new save, the one it replaces
_SAVING, _PREVIOUS = ".saving", ".previous"


class Checkpoint:
    """The checkpoint of one stage in ``OUT/checkpoints/<stage>/``."""

    def __init__(self, out_dir: Path, stage: str) -> None:
        self.dir = out_dir / CHECKPOINTS / stage
        self.stage = stage

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def exists(self) -> bool:
        self._recover()
        return self.state_file.is_file()

    def state(self) -> dict[str, Any]:
        """The checkpoint's state.json; InferenceError when it cannot be read."""
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InferenceError(
                f"checkpoint {self.state_file}: expected the training state as JSON, found an "
                f"unreadable file ({exc}): start again without --resume, or into another --out"
            ) from None
        if not isinstance(state, dict):
            raise InferenceError(
                f"checkpoint {self.state_file}: expected a JSON object, found "
                f"{type(state).__name__}: start again without --resume"
            )
        return state

    def save(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        state: dict[str, Any],
        average: WeightAverage | None = None,
    ) -> None:
        from safetensors.torch import save_file

        self._recover()
        # the save is written whole into a folder beside the checkpoint (state.json last),
        # then put in its place; the previous save is removed only after that: a kill at any
        # moment leaves one complete save, the new or the previous (_recover). A kill used to
        # leave files of two saves, and the epochs behind them could not be resumed.
        staging, previous = self._sibling(_SAVING), self._sibling(_PREVIOUS)
        shutil.rmtree(staging, ignore_errors=True)  # a save a kill cut short
        staging.mkdir(parents=True)
        # every file of one save carries the same token (load() refuses files of two saves)
        token = f"{time.time_ns()}"
        files = {"weights.safetensors": module}
        if average is not None:
            files[AVERAGE_FILE] = average.module
        for name, source in files.items():
            weights = {k: v.detach().to("cpu").contiguous() for k, v in source.state_dict().items()}
            save_file(weights, str(staging / name), metadata={SAVE_TOKEN: token})
        trainer = {
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            SAVE_TOKEN: token,
        }
        torch.save(trainer, staging / "trainer.pt")
        _atomic_json(staging / self.state_file.name, {**state, SAVE_TOKEN: token})
        shutil.rmtree(previous, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(previous)
        staging.rename(self.dir)
        shutil.rmtree(previous, ignore_errors=True)

    def _sibling(self, suffix: str) -> Path:
        return self.dir.with_name(self.dir.name + suffix)

    def _recover(self) -> None:
        """Put back the complete save a kill between the two renames of :meth:`save` left
        beside the checkpoint: the new one when it was complete, else the previous one."""
        if self.state_file.is_file():
            return
        for suffix in (_SAVING, _PREVIOUS):
            found = self._sibling(suffix)
            if (found / self.state_file.name).is_file():
                if self.dir.exists():
                    shutil.rmtree(self.dir)
                found.rename(self.dir)
                log.warning(
                    "checkpoint %s: the training was stopped while it saved; the complete "
                    "save beside it (%s) is put back", self.dir, found.name,
                )  # fmt: skip
                return

    def _check_one_save(self, state: dict[str, Any], names: Sequence[str], trainer: Any) -> None:
        """Refuse files of two saves (a kill while saving): their weights are not those of
        the state. A checkpoint written before the token was kept has none to compare."""
        from safetensors import safe_open

        token = state.get(SAVE_TOKEN)
        if token is None:
            return
        found = {}
        for name in names:
            with safe_open(str(self.dir / name), framework="pt") as fh:
                found[name] = (fh.metadata() or {}).get(SAVE_TOKEN)
        found["trainer.pt"] = trainer.get(SAVE_TOKEN) if isinstance(trainer, dict) else None
        other = sorted(name for name, value in found.items() if value != token)
        if other:
            raise InferenceError(
                f"checkpoint {self.dir}: {', '.join(other)} and state.json are from two saves "
                "(the training was stopped while it saved): it cannot be resumed; start again "
                "without --resume, or into another --out"
            )

    def load(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        average: WeightAverage | None = None,
    ) -> dict[str, Any]:
        from inference.model_dir import load_weights_file

        state = self.state()
        load_state_checked(
            module, load_weights_file(self.dir / "weights.safetensors"), str(self.dir)
        )
        if average is not None:
            if not (self.dir / AVERAGE_FILE).is_file():
                raise InferenceError(
                    f"{self.dir}: expected {AVERAGE_FILE} (the weight average this run keeps), "
                    "found none"
                )
            load_state_checked(
                average.module, load_weights_file(self.dir / AVERAGE_FILE), str(self.dir)
            )
            average.updates = int(state.get("average_updates", 0))
        try:
            trainer = torch.load(self.dir / "trainer.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InferenceError(
                f"{self.dir / 'trainer.pt'}: expected optimizer and generator state readable with "
                f"torch.load(weights_only=True), found an unreadable file ({exc})"
            ) from None
        names = ["weights.safetensors", *([AVERAGE_FILE] if average is not None else [])]
        self._check_one_save(state, names, trainer)
        optimizer.load_state_dict(trainer["optimizer"])
        generator.set_state(trainer["generator"].to(torch.uint8).cpu())
        return {k: v for k, v in state.items() if k != SAVE_TOKEN}


def _check_resume(
    state: dict[str, Any],
    expected: dict[str, Any],
    where: Path,
    defaults: dict[str, Any],
    epochs: int,
) -> None:
    """Refuse a checkpoint of another run, or one past ``epochs`` (the total this run trains
    to). ``defaults``: the configuration class's defaults, which a key missing from an older
    checkpoint's configuration takes (as in ``model.yaml``)."""
    if isinstance(state.get("config"), dict):
        state = {**state, "config": _with_defaults(state["config"], defaults)}
    refuse_other_run(where, state, expected, "start a new output directory instead")
    done = state.get("epoch")
    if isinstance(done, int) and done > epochs:
        raise InferenceError(
            f"cannot resume from {where}: expected --epochs of at least {done} (the epochs the "
            f"checkpoint has done), found {epochs}; --epochs is the total a resumed run trains "
            "to, not the epochs it adds"
        )


def refuse_other_run(
    where: Path, found: Mapping[str, Any], expected: Mapping[str, Any], advice: str
) -> None:
    """Refuse to resume from the checkpoint at ``where`` when what it ``found`` (its run's
    settings) differs from what this run ``expected``, naming each difference."""
    differ = [k for k, v in expected.items() if found.get(k) != v]
    if differ:
        details = "; ".join(_difference(k, found.get(k), expected[k]) for k in differ)
        raise InferenceError(
            f"cannot resume from {where}: expected the same {', '.join(differ)} ({details}); "
            f"{advice}"
        )


def _with_defaults(found: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(found)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def _config_defaults(cfg: Any) -> dict[str, Any]:
    """The defaults of ``cfg``'s configuration class, as plain data."""
    return config_to_dict(type(cfg)())


def _difference(key: str, found: Any, expected: Any) -> str:
    """``key: checkpoint has X, this run Y``, down to the keys that differ in a mapping (the
    configuration: ``config.version: checkpoint has "0.5.0", this run "0.6.0"``)."""
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = [k for k in {**found, **expected} if found.get(k) != expected.get(k)]
        return "; ".join(_difference(f"{key}.{k}", found.get(k), expected.get(k)) for k in keys)
    return f"{key}: checkpoint has {_short(found)}, this run {_short(expected)}"


def _check_resume_before_preparing(
    ckpt: Checkpoint, identity: dict[str, Any], options: TrainOptions, defaults: dict[str, Any]
) -> None:
    """Refuse a resume that cannot succeed before the data are prepared (both latent stages
    prepare every patient before their first step: about 6 minutes for 1000 on 2 idle CPU
    cores, more on busy ones)."""
    if options.resume and ckpt.exists():
        _check_resume(ckpt.state(), identity, ckpt.dir, defaults, options.epochs)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _identity(
    stage: str, config: dict[str, Any], split: CohortSplit, options: TrainOptions
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: stage, configuration, seed, batch, data."""
    return {
        "stage": stage,
        "config": config,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "train_patients": [p.patient_id for p in split.train],
        "init_from": str(options.init_from) if options.init_from is not None else None,
        # absent from checkpoints written before the option existed, which sampled uniformly
        "sampling": _SAMPLING_BALANCED if options.balance_response else None,
    }


def _init_from(module: torch.nn.Module, options: TrainOptions, component: str) -> None:
    """Start ``module`` from ``options.init_from``'s weights of ``component`` (if given)."""
    if options.init_from is None:
        return
    directory = Path(options.init_from)
    _, weights = read_model_yaml(directory)
    load_state_checked(
        module,
        component_state(directory, weights, component),
        f"--init-from {directory} ({component})",
    )
    log.info("%s starts from the weights of %s", component, directory)


def _resume(
    ckpt: Checkpoint,
    identity: dict[str, Any],
    options: TrainOptions,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    what: str,
    defaults: dict[str, Any],
    average: WeightAverage | None = None,
) -> tuple[int, list[float], list[float | None], list[list[float]]]:
    """(first epoch, losses, validation losses, learning rates): from the checkpoint when
    resuming, else fresh. The identity is checked before any weight is read, so a checkpoint of
    another configuration is refused naming the settings that differ.

    The learning rate is this run's (``options.learning_rate``), also when resuming: it
    replaces the one the checkpoint's optimizer state holds. The learning rates are
    ``[first epoch, rate]`` pairs, one per rate the run has used, in order."""
    if not (options.resume and ckpt.exists()):
        return 0, [], [], [[0, options.learning_rate]]
    _check_resume(ckpt.state(), identity, ckpt.dir, defaults, options.epochs)
    state = ckpt.load(module, optimizer, generator, average)
    log.info("resuming the %s at epoch %d from %s", what, state["epoch"], ckpt.dir)
    used = float(optimizer.param_groups[0]["lr"])
    rates = [list(r) for r in state.get("learning_rates") or [[0, used]]]
    if used != options.learning_rate:
        log.warning(
            "%s: resuming with learning rate %g (the checkpoint's epochs used %g): epochs %d "
            "onwards use %g",
            what, options.learning_rate, used, state["epoch"] + 1, options.learning_rate,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = options.learning_rate
        rates.append([state["epoch"], options.learning_rate])
    return state["epoch"], state["losses"], state["val_losses"], rates


def _rates_record(rates: list[list[float]]) -> dict[str, Any]:
    """What ``train_state.json`` adds when a resumed run changed the learning rate: each rate
    with the first epoch (counted from 0) it was used for."""
    if len(rates) < 2:
        return {}
    return {"learning_rates": [{"from_epoch": int(e), "learning_rate": lr} for e, lr in rates]}


def _saver(
    ckpt: Checkpoint,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    identity: dict[str, Any],
    average: WeightAverage | None = None,
    rates: list[list[float]] | None = None,
) -> Callable[[int, list[float], list[float | None]], None]:
    """The end-of-epoch checkpoint writer of one stage."""

    def save(epoch: int, losses: list[float], val_losses: list[float | None]) -> None:
        state = {**identity, "epoch": epoch, "losses": losses, "val_losses": val_losses}
        if rates is not None:
            state["learning_rates"] = rates
        if average is not None:
            state["average_updates"] = average.updates
        ckpt.save(module, optimizer, generator, state, average)

    return save


def _release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``). Preparing a
    patient allocates and frees volumes of a few hundred kB; once glibc has raised its mmap
    threshold they come from the heap, which fragments and keeps them. Measured on 60 patients
    of the demo grid (2026-11-22): without it, stage 2's encoding pass grew by 27 MB per patient
    (past 12 GB for a 1000-patient cohort), with it by 2.6 MB, at the same speed. Returns whether
    it could run (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _check_out_dir(out: Path, stage: str, ckpt: Checkpoint, options: TrainOptions,
                   stage1: Path | None = None) -> None:  # fmt: skip
    """Refuse to write over a model directory that this run does not continue: one of the other
    kind (a UNet baseline under a latent stage, or the reverse), or a finished model of the
    same kind whose checkpoint of this stage is not being resumed. The diffusion stage may
    complete the directory holding its own stage 1 (``--stage1`` left out, or the same folder),
    the flow ``train autoencoder --out DIR`` then ``train diffusion --out DIR``; the autoencoder
    may not come back to it after that (:func:`_check_no_diffusion_stage`)."""
    from inference.model_dir import KIND_LDM, KIND_UNET_BASELINE, MODEL_YAML, model_kind

    if not (out / MODEL_YAML).is_file():
        return
    try:
        kind = model_kind(out)
    except InferenceError as exc:
        raise InferenceError(
            f"{out}: expected an empty directory or a model directory this {stage} run "
            f"continues, found a model.yaml that cannot be read ({exc}); choose another --out"
        ) from None
    expected = KIND_UNET_BASELINE if stage == "baseline" else KIND_LDM
    stages = sorted(read_train_state(out).get("stages", {}))
    holds = f"a {kind} model (model.yaml; train_state.json lists the stages {stages})"
    if kind != expected:
        raise InferenceError(
            f"{out}: expected an empty directory or a {expected} model directory for the "
            f"{stage} stage, found {holds}; training the {stage} here would overwrite it: "
            "choose another --out"
        )
    continuing = options.resume and ckpt.exists()
    own_stage1 = stage1 is not None and stage1.resolve() == out.resolve()
    if not (continuing or own_stage1):
        raise InferenceError(
            f"{out}: expected an empty directory, a {stage} checkpoint to --resume or (diffusion) "
            f"the stage-1 directory itself, found {holds} and no {stage} checkpoint to resume; "
            "training here would overwrite it: choose another --out"
        )


def _check_no_diffusion_stage(out: Path) -> None:
    """Refuse to train the autoencoder in a directory whose diffusion stage was trained or is
    being trained (its record in ``train_state.json``, or its checkpoint): the diffusion UNet
    was trained on the latents of the autoencoder there, which another autoencoder run would
    change, and the model directory it writes would hold an untrained UNet in its place."""
    found = []
    recorded = read_train_state(out).get("stages", {}).get("diffusion")
    if recorded is not None:
        epochs = recorded.get("epochs") if isinstance(recorded, dict) else None
        found.append(f"a trained diffusion stage ({TRAIN_STATE} records {epochs} epoch(s))")
    diffusion_ckpt = Checkpoint(out, "diffusion")
    if diffusion_ckpt.exists():
        found.append(f"a diffusion checkpoint ({diffusion_ckpt.dir})")
    if found:
        raise InferenceError(
            f"{out}: expected no diffusion stage in the directory of an autoencoder run, found "
            f"{' and '.join(found)}; training the autoencoder again would change the latents "
            "the diffusion UNet was trained on and replace that UNet with an untrained one: "
            f"train the autoencoder into another --out, with --init-from {out} to start from "
            "this model's weights (--epochs then counts the new run's epochs), and the "
            "diffusion stage after it there"
        )


@contextlib.contextmanager
def _interruption_told(out: Path, stage: str, options: TrainOptions) -> Iterator[None]:
    """Tell, in one warning, where a run interrupted by Ctrl-C leaves its training (the
    KeyboardInterrupt goes on: the command exits 130)."""
    try:
        yield
    except KeyboardInterrupt:
        log.warning("%s", _interruption(Checkpoint(out, stage), options))
        raise


def _interruption(ckpt: Checkpoint, options: TrainOptions) -> str:
    """What an interrupted run leaves: the checkpoint of the last completed epoch (saved after
    each) and how to continue from it, or that there is none."""
    stage = ckpt.stage
    if not ckpt.exists():
        return (
            f"{stage} training interrupted before its first epoch was completed: there is no "
            "checkpoint, so nothing to resume; the same command starts it again"
        )
    try:
        epoch = f"epoch {ckpt.state()['epoch']} of {options.epochs}"
    except (InferenceError, KeyError):  # named as it is; the resume says what is wrong
        epoch = "an unreadable state.json"
    return (
        f"{stage} training interrupted: the checkpoint of the last completed epoch ({epoch}) "
        f"is in {ckpt.dir}; the same command with --resume continues from it"
    )


def _prepare_run(
    out: Path, stage: str, options: TrainOptions, stage1: Path | None = None
) -> tuple[Checkpoint, torch.device, torch.Generator]:
    device = resolve_device(options.device)
    if stage == "autoencoder":  # before the advice to --resume the autoencoder's checkpoint
        _check_no_diffusion_stage(out)
    ckpt = Checkpoint(out, stage)
    if ckpt.exists() and not options.resume:
        raise InferenceError(
            f"{ckpt.dir} holds a checkpoint of a previous {stage} run: pass --resume to continue "
            "it, or choose another output directory"
        )
    _check_out_dir(out, stage, ckpt, options, stage1)
    if options.resume and not ckpt.exists():
        log.warning("resume asked for, but %s holds no checkpoint: starting afresh", ckpt.dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = make_generator(options.seed, "cpu")
    return ckpt, device, generator


def _split(
    data: Sequence[Path], options: TrainOptions, survival_classes: Sequence[str]
) -> CohortSplit:
    """The training and held-out patients; the tables' survival classes must be the model's."""
    patients = read_cohort(list(data), survival_classes=survival_classes)
    sites = {p.site for p in patients}
    n_held = options.n_held_out_sites if len(sites) > 1 else 0
    if options.held_out_sites is None and n_held != options.n_held_out_sites:
        log.warning("one site only: no site held out, no validation loss")
    return split_cohort(
        patients,
        held_out_sites=options.held_out_sites,
        n_held_out_sites=n_held,
        held_out_seeds=options.held_out_seeds,
        seed=options.seed,
    )


def _run_epochs(
    *,
    stage: str,
    options: TrainOptions,
    n_items: int,
    start_epoch: int,
    step: Callable[[list[int]], float],
    validate: Callable[[], float | None],
    save: Callable[[int, list[float], list[float | None]], None],
    losses: list[float],
    val_losses: list[float | None],
    started: float | None = None,
    weights: Sequence[float] | None = None,
) -> None:
    """Epochs from ``start_epoch`` to ``options.epochs``, or fewer under
    ``options.max_minutes`` counted from ``started`` (``time.monotonic``; default: now)."""
    started = time.monotonic() if started is None else started
    longest = 0.0
    for epoch in range(start_epoch, options.epochs):
        epoch_start = time.monotonic()
        order = epoch_order(n_items, options.seed, epoch, stage, weights)
        chunks = list(batches(order, options.batch_size))
        total = 0.0
        # closed also when interrupted, so that _interruption_told's warning gets its own line
        with tqdm(
            chunks,
            desc=f"{stage} {epoch + 1}/{options.epochs}",
            unit="batch",
            disable=not options.progress,
            leave=False,
        ) as bar:
            for chunk in bar:
                loss = step(chunk)
                total += loss * len(chunk)
                bar.set_postfix(loss=f"{loss:.4f}")
        losses.append(total / max(n_items, 1))
        val_losses.append(validate())
        log.info(
            "%s epoch %d/%d: train loss %.5f, validation loss %s",
            stage,
            epoch + 1,
            options.epochs,
            losses[-1],
            "n/a" if val_losses[-1] is None else f"{val_losses[-1]:.5f}",
        )
        save(epoch + 1, losses, val_losses)
        longest = max(longest, time.monotonic() - epoch_start)
        if options.max_minutes is not None and epoch + 1 < options.epochs:
            elapsed = time.monotonic() - started
            if elapsed + longest > options.max_minutes * 60:
                log.warning(
                    "%s: stopping after epoch %d of %d: another would end past --max-minutes "
                    "%g (%.0f s so far, %.0f s per epoch); --resume continues",
                    stage,
                    epoch + 1,
                    options.epochs,
                    options.max_minutes,
                    elapsed,
                    longest,
                )
                return


def _stage_info(
    stage: str,
    options: TrainOptions,
    data: Sequence[Path],
    split: CohortSplit,
    losses: list[float],
    val_losses: list[float | None],
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "epochs": len(losses),  # fewer than planned when --max-minutes stopped the run
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "seed": options.seed,
        "device": options.device,
        "data": [str(Path(d)) for d in data],
        "train_patients": len(split.train),
        "held_out_patients": len(split.held_out),
        "held_out_sites": list(split.held_out_sites),
        "train_losses": losses,
        "val_losses": val_losses,
        "seconds_this_run": round(seconds, 2),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_init_record(options, stage),
        **extra,
    }


def _diffusion_only(options: TrainOptions, stage: str) -> None:
    given = {
        "--ema-decay": options.ema_decay,
        "--prediction-type": options.prediction_type,
        "--tumour-loss-weight": options.tumour_loss_weight,
        "--p-drop-class": options.p_drop_class,
        "--balance-response": options.balance_response or None,
    }
    for flag, value in given.items():
        if value is not None:
            raise InferenceError(
                f"{stage}: {flag} applies to the diffusion stage only, found it given ({value})"
            )


def _stage2_config(cfg: ModelConfig, options: TrainOptions) -> ModelConfig:
    """The model configuration with the stage-2 settings the options replace, without class
    shares (those of this run's patients are written at its end; a resumed run's stage-1
    directory may be its own output, which has them)."""
    cfg = cfg.replace(survival_class_prior=())
    training = {
        key: value
        for key, value in (
            ("ema_decay", options.ema_decay),
            ("tumour_loss_weight", options.tumour_loss_weight),
            ("p_drop_class", options.p_drop_class),
        )
        if value is not None
    }
    if training:
        cfg = cfg.with_training(**training)
    if options.prediction_type is not None:
        cfg = dataclasses.replace(
            cfg,
            scheduler=dataclasses.replace(cfg.scheduler, prediction_type=options.prediction_type),
        )
    return cfg


def _init_record(options: TrainOptions, stage: str) -> dict[str, Any]:
    """Where a fine-tuned stage started: the directory and that stage's own record there."""
    if options.init_from is None:
        return {}
    earlier = read_train_state(options.init_from).get("stages", {}).get(stage)
    return {"init_from": str(options.init_from), "init_from_record": earlier}


# ------------------------------------------------------------------------------------------
# stage 1: the autoencoder


@dataclass(frozen=True)
class _AEItem:
    patient: int
    which: str  # t1c, flair, post


def _ae_items(ds: CohortDataset, jobs: int = 1) -> list[_AEItem]:
    items: list[_AEItem] = []
    for i, s in enumerate(ds.prepared(jobs)):
        items.append(_AEItem(i, "t1c"))
        if s.study.flair is not None:
            items.append(_AEItem(i, "flair"))
        items.append(_AEItem(i, "post"))
    return items


def _patch_box(
    mask: np.ndarray, patch: Sequence[int], generator: torch.Generator
) -> tuple[slice, ...]:
    """A random ``patch``-sized box in the crop, centred on a tumour voxel half of the time
    (when there is one); every draw comes from ``generator``."""
    shape = mask.shape

    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=generator))

    voxels = np.argwhere(mask)
    if len(voxels) and draw(2):
        centre = voxels[draw(len(voxels))]
        starts = [int(c) - p // 2 for c, p in zip(centre, patch, strict=True)]
    else:
        starts = [draw(n - p + 1) for n, p in zip(shape, patch, strict=True)]
    return tuple(
        slice(min(max(a, 0), n - p), min(max(a, 0), n - p) + p)
        for a, n, p in zip(starts, shape, patch, strict=True)
    )


def _ae_batch(
    ds: CohortDataset,
    items: Sequence[_AEItem],
    device: torch.device,
    patch: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> AutoencoderBatch:
    """Images, masks and mask weights of ``items``; random ``patch``-sized boxes (drawn from
    ``generator``) instead of the whole crop when ``patch`` is given."""
    images, masks, weights = [], [], []
    for it in items:
        s = ds[it.patient]
        if it.which == "t1c":
            images.append(s.study.t1c)
            masks.append(s.pre_mask)
            weights.append(1.0)
        elif it.which == "flair":
            assert s.study.flair is not None
            images.append(s.study.flair)
            masks.append(np.zeros_like(s.pre_mask))
            weights.append(0.0)
        else:
            images.append(s.post_t1c)
            masks.append(s.post_mask)
            weights.append(1.0)
    if patch:
        if generator is None:
            raise InferenceError("autoencoder patches need a random generator")
        boxes = [_patch_box(m, patch, generator) for m in masks]
        images = [im[b] for im, b in zip(images, boxes, strict=True)]
        masks = [m[b] for m, b in zip(masks, boxes, strict=True)]
    return AutoencoderBatch(
        image=_cat(images, device),
        mask=_cat(masks, device),
        mask_weight=torch.tensor(weights, device=device),
    )


def train_autoencoder(
    data: Sequence[str | Path],
    out_dir: str | Path,
    cfg: ModelConfig,
    options: TrainOptions,
) -> TrainReport:
    """Train stage 1 on the cohort(s) ``data``; write a model directory to ``out_dir`` whose
    ``latent_scale`` is set from the training latents (its diffusion UNet is untrained)."""
    with _interruption_told(Path(out_dir), "autoencoder", options):
        return _train_autoencoder(data, out_dir, cfg, options)


def _train_autoencoder(
    data: Sequence[str | Path],
    out_dir: str | Path,
    cfg: ModelConfig,
    options: TrainOptions,
) -> TrainReport:
    _diffusion_only(options, "autoencoder")
    started = time.monotonic()
    out = Path(out_dir)
    paths = [Path(d) for d in data]
    ckpt, device, generator = _prepare_run(out, "autoencoder", options)
    split = _split(paths, options, cfg.survival_classes)
    base_cfg = cfg.replace(latent_scale=1.0)
    model = build_model(base_cfg, seed=options.seed)
    ae = model.autoencoder
    _init_from(ae, options, "autoencoder")
    ae.to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=options.learning_rate)
    pre = base_cfg.preprocessing
    train_ds = CohortDataset(split.train, pre, cfg.contrasts, cfg.use_dose, cfg.survival_classes)
    val_ds = CohortDataset(split.held_out, pre, cfg.contrasts, cfg.use_dose, cfg.survival_classes)
    identity = _identity("autoencoder", config_to_dict(base_cfg), split, options)
    _check_resume_before_preparing(ckpt, identity, options, _config_defaults(cfg))
    items = _ae_items(train_ds, options.jobs)  # prepares (and caches) every patient
    val_items = _ae_items(val_ds, options.jobs)
    start_epoch, losses, val_losses, rates = _resume(
        ckpt, identity, options, ae, opt, generator, "autoencoder", _config_defaults(cfg)
    )

    def step(chunk: list[int]) -> float:
        batch = _ae_batch(
            train_ds, [items[i] for i in chunk], device, cfg.training.autoencoder_patch, generator
        )
        return autoencoder_step(
            ae,
            opt,
            batch,
            generator,
            kl_weight=cfg.training.kl_weight,
            mask_loss_weight=cfg.training.mask_loss_weight,
            autocast=options.autocast,
            grad_clip=options.grad_clip,
        ).loss

    @torch.no_grad()
    def validate() -> float | None:
        if not val_items:
            return None
        ae.eval()
        g = make_generator(options.seed + 1)
        total = 0.0
        for chunk in batches(range(len(val_items)), options.batch_size):
            batch = _ae_batch(val_ds, [val_items[i] for i in chunk], device)
            loss, _ = autoencoder_losses(
                ae,
                batch,
                g,
                kl_weight=cfg.training.kl_weight,
                mask_loss_weight=cfg.training.mask_loss_weight,
            )
            total += float(loss) * len(chunk)
        return total / len(val_items)

    save = _saver(ckpt, ae, opt, generator, identity, rates=rates)

    _run_epochs(
        stage="autoencoder",
        options=options,
        n_items=len(items),
        start_epoch=start_epoch,
        step=step,
        validate=validate,
        save=save,
        losses=losses,
        val_losses=val_losses,
        started=started,
    )
    # latent scale from the training images' latent means
    ae.eval()
    mus: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in batches(range(len(items)), options.batch_size):
            batch = _ae_batch(train_ds, [items[i] for i in chunk], device)
            mus.append(ae.encode(batch.image)[0].float().cpu())
    scale = latent_scale_from(mus)
    final_cfg = base_cfg.replace(latent_scale=scale)
    model = LatentDiffusionModel(final_cfg, ae.cpu(), model.unet)
    save_model_dir(model, out, overwrite=True)
    seconds = time.monotonic() - started
    _record_stage(
        out,
        "autoencoder",
        _stage_info(
            "autoencoder",
            options,
            paths,
            split,
            losses,
            val_losses,
            seconds,
            latent_scale=scale,
            **_rates_record(rates),
        ),
        {},
    )
    log.info("autoencoder trained: latent scale %.4f, model directory %s", scale, out)
    return TrainReport(
        stage="autoencoder",
        out_dir=out,
        epochs=len(losses),  # fewer than options.epochs when --max-minutes stopped it
        start_epoch=start_epoch,
        train_losses=losses,
        val_losses=val_losses,
        seconds=seconds,
        train_patients=[p.patient_id for p in split.train],
        held_out_patients=[p.patient_id for p in split.held_out],
        held_out_sites=list(split.held_out_sites),
        extra={"latent_scale": scale},
    )


# ------------------------------------------------------------------------------------------
# stage 2: the diffusion UNet


@dataclass(frozen=True)
class _Latents:
    target: torch.Tensor  # (1, L, ...) post-treatment latent in the diffusion space
    t1c: torch.Tensor
    flair: torch.Tensor | None
    mask: torch.Tensor  # (1, 1, k, j, i)
    dose: torch.Tensor | None  # (1, 1, k, j, i) divided by dose_scale_gy
    label: int


@torch.no_grad()
def _encode_all(model: LatentDiffusionModel, ds: CohortDataset, jobs: int = 1) -> list[_Latents]:
    cfg = model.config
    device = model.device
    out: list[_Latents] = []
    for i, s in enumerate(ds.prepared(jobs)):
        if i:
            _release_free_memory()
        flair = s.study.flair
        dose = s.study.dose
        t1c = model.encode(_t(s.study.t1c, device))
        post = model.encode(_t(s.post_t1c, device))
        out.append(
            _Latents(
                target=model.to_diffusion_space(post, t1c).cpu(),
                t1c=t1c.cpu(),
                flair=None if flair is None else model.encode(_t(flair, device)).cpu(),
                mask=_t(s.study.mask, torch.device("cpu")),
                dose=None
                if dose is None
                else _t(dose, torch.device("cpu")) / cfg.preprocessing.dose_scale_gy,
                label=s.class_index,
            )
        )
    return out


def _target_spread(latents: Sequence[_Latents], cfg: ModelConfig) -> float | None:
    """Standard deviation of the diffusion targets, logged and recorded: the noise schedule
    assumes about 1 (``latent_scale``, or ``diffusion.residual_scale`` for a residual target)."""
    if not latents:
        return None  # recorded as null: train_state.json stays strict JSON
    std = float(torch.cat([x.target.flatten() for x in latents]).std())
    log.info("diffusion targets (%s): standard deviation %.3f", cfg.diffusion.target, std)
    if not 0.5 <= std <= 2.0:
        residual = cfg.diffusion.target == "residual"
        name = "diffusion.residual_scale" if residual else "latent_scale"
        value = cfg.diffusion.residual_scale if residual else cfg.latent_scale
        log.warning(
            "diffusion targets have a standard deviation of %.3f, expected about 1: "
            "%s = %g would give 1",
            std,
            name,
            value / std,
        )
    return std


def _diffusion_batch(items: Sequence[_Latents], device: torch.device) -> DiffusionBatch:
    def stack(
        get: Callable[[_Latents], torch.Tensor | None], like: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        values = [get(x) for x in items]
        present = torch.tensor([v is not None for v in values], dtype=torch.bool)
        if not present.any():
            return None, present
        filled = [
            v if v is not None else torch.zeros_like(like)
            for v, x in zip(values, items, strict=True)
        ]
        return torch.cat(filled).to(device), present

    first = items[0]
    flair, flair_ok = stack(lambda x: x.flair, first.t1c)
    dose, dose_ok = stack(lambda x: x.dose, first.mask)
    available = {}
    if flair is not None:
        available["flair"] = flair_ok.to(device)
    if dose is not None:
        available["dose"] = dose_ok.to(device)
    return DiffusionBatch(
        target=torch.cat([x.target for x in items]).to(device),
        latents={"t1c": torch.cat([x.t1c for x in items]).to(device), "flair": flair},
        mask=torch.cat([x.mask for x in items]).to(device),
        class_labels=torch.tensor([x.label for x in items], dtype=torch.long, device=device),
        dose=dose,
        available=available or None,
    )


def class_shares(patients: Sequence[CohortPatient], classes: Sequence[str]) -> tuple[float, ...]:
    """The share of each survival class among ``patients`` (those without one of ``classes``
    left out), rounded to 4 decimals; empty when none has one."""
    counts = [sum(p.survival_class == c for p in patients) for c in classes]
    total = sum(counts)
    return tuple(round(n / total, 4) for n in counts) if total else ()


def train_diffusion(
    data: Sequence[str | Path],
    out_dir: str | Path,
    options: TrainOptions,
    stage1_dir: str | Path | None = None,
) -> TrainReport:
    """Train stage 2 on the latents of the stage-1 model directory ``stage1_dir`` (default:
    ``out_dir`` itself); write the complete model directory to ``out_dir``."""
    with _interruption_told(Path(out_dir), "diffusion", options):
        return _train_diffusion(data, out_dir, options, stage1_dir)


def _train_diffusion(
    data: Sequence[str | Path],
    out_dir: str | Path,
    options: TrainOptions,
    stage1_dir: str | Path | None,
) -> TrainReport:
    started = time.monotonic()
    out = Path(out_dir)
    stage1 = Path(stage1_dir) if stage1_dir is not None else out
    paths = [Path(d) for d in data]
    ckpt, device, generator = _prepare_run(out, "diffusion", options, stage1)
    stage1_state = read_train_state(stage1)
    if "autoencoder" not in stage1_state.get("stages", {}):
        log.warning(
            "%s has no record of a trained autoencoder (train_state.json): training the "
            "diffusion UNet on its autoencoder anyway",
            stage1,
        )
    model = load_model_dir(stage1, device).model
    model.config = cfg = _stage2_config(model.config, options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model.unet = build_unet(cfg)
    _init_from(model.unet, options, "diffusion")
    model.unet.to(device)
    model.autoencoder.eval()
    for p in model.autoencoder.parameters():
        p.requires_grad_(False)
    split = _split(paths, options, cfg.survival_classes)
    identity = _identity("diffusion", config_to_dict(cfg), split, options)
    _check_resume_before_preparing(ckpt, identity, options, _config_defaults(cfg))
    pre = cfg.preprocessing
    # stage 2 needs the latents only: each patient is prepared once, encoded and let go (a
    # cached dataset would hold about 17 MB per patient at the demo crop until the end)
    train_ds, val_ds = (
        CohortDataset(part, pre, cfg.contrasts, cfg.use_dose, cfg.survival_classes, cache=False)
        for part in (split.train, split.held_out)
    )
    train_lat = _encode_all(model, train_ds, options.jobs)
    val_lat = _encode_all(model, val_ds, options.jobs)
    target_std = _target_spread(train_lat, cfg)
    opt = torch.optim.Adam(model.unet.parameters(), lr=options.learning_rate)
    scheduler = build_scheduler(cfg)
    decay = cfg.training.ema_decay
    average = WeightAverage(model.unet, decay) if decay > 0 else None
    start_epoch, losses, val_losses, rates = _resume(
        ckpt,
        identity,
        options,
        model.unet,
        opt,
        generator,
        "diffusion UNet",
        _config_defaults(cfg),
        average,
    )
    trained = model.unet  # the network the optimiser updates

    def step(chunk: list[int]) -> float:
        batch = _diffusion_batch([train_lat[i] for i in chunk], device)
        loss = diffusion_step(
            model,
            opt,
            batch,
            generator,
            scheduler=scheduler,
            autocast=options.autocast,
            grad_clip=options.grad_clip,
        ).loss
        if average is not None:
            average.update(trained)
        return loss

    @torch.no_grad()
    def validate() -> float | None:
        """The validation loss of the weights the model directory gets (the average, if kept)."""
        if not val_lat:
            return None
        model.unet = average.module if average is not None else trained
        model.unet.eval()
        g = make_generator(options.seed + 1)
        total = 0.0
        try:
            for chunk in batches(range(len(val_lat)), options.batch_size):
                batch = _diffusion_batch([val_lat[i] for i in chunk], device)
                loss, _ = diffusion_loss(
                    model, batch, g, scheduler=scheduler, p_drop_contrast=0.0, p_drop_dose=0.0,
                    p_drop_class=0.0,
                )  # fmt: skip
                total += float(loss) * len(chunk)
        finally:
            model.unet = trained
        return total / len(val_lat)

    save = _saver(ckpt, trained, opt, generator, identity, average, rates)
    weights = response_weights(split.train) if options.balance_response else None
    if weights is not None:
        counts = Counter(p.response_category for p in split.train)
        log.info(
            "each epoch draws %d patients with replacement, the response categories equally "
            "often (training patients: %s)",
            len(train_lat),
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        )

    _run_epochs(
        stage="diffusion",
        options=options,
        n_items=len(train_lat),
        start_epoch=start_epoch,
        step=step,
        validate=validate,
        save=save,
        losses=losses,
        val_losses=val_losses,
        started=started,
        weights=weights,
    )
    if average is not None:
        model.unet = average.module
        log.info("model directory gets the weight average (decay %g)", decay)
    # after the run's identity was fixed: the shares follow from the training patients in it
    model.config = model.config.replace(
        survival_class_prior=class_shares(split.train, cfg.survival_classes)
    )
    model.to("cpu")
    save_model_dir(model, out, overwrite=True)
    seconds = time.monotonic() - started
    base = stage1_state if stage1.resolve() != out.resolve() else read_train_state(out)
    _record_stage(
        out,
        "diffusion",
        _stage_info(
            "diffusion",
            options,
            paths,
            split,
            losses,
            val_losses,
            seconds,
            stage1=str(stage1),
            target_std=target_std,
            sampling=identity["sampling"] or "uniform",
            **_rates_record(rates),
        ),
        base,
    )
    log.info("diffusion UNet trained: model directory %s", out)
    return TrainReport(
        stage="diffusion",
        out_dir=out,
        epochs=len(losses),  # fewer than options.epochs when --max-minutes stopped it
        start_epoch=start_epoch,
        train_losses=losses,
        val_losses=val_losses,
        seconds=seconds,
        train_patients=[p.patient_id for p in split.train],
        held_out_patients=[p.patient_id for p in split.held_out],
        held_out_sites=list(split.held_out_sites),
    )


# ------------------------------------------------------------------------------------------
# the UNet regression baseline


def _baseline_batch(
    ds: CohortDataset, indices: Sequence[int], device: torch.device
) -> BaselineBatch:
    samples = [ds[i] for i in indices]
    flairs = [s.study.flair for s in samples]
    doses = [s.study.dose for s in samples]
    available: dict[str, torch.Tensor] = {}

    def stack(values: Sequence[np.ndarray | None], name: str) -> torch.Tensor | None:
        present = [v is not None for v in values]
        if not any(present):
            return None
        available[name] = torch.tensor(present, dtype=torch.bool, device=device)
        like = samples[0].study.t1c
        return _cat([v if v is not None else np.zeros_like(like) for v in values], device)

    flair = stack(flairs, "flair")
    dose = stack(doses, "dose")
    return BaselineBatch(
        t1c=_cat([s.study.t1c for s in samples], device),
        mask=_cat([s.study.mask for s in samples], device),
        post_t1c=_cat([s.post_t1c for s in samples], device),
        post_mask=_cat([s.post_mask for s in samples], device),
        pre_mask=_cat([s.pre_mask for s in samples], device),
        flair=flair,
        dose=dose,
        available=available or None,
    )


def train_baseline(
    data: Sequence[str | Path],
    out_dir: str | Path,
    cfg: UNetBaselineConfig,
    options: TrainOptions,
) -> TrainReport:
    """Train the UNet regression baseline; write its model directory (``kind: unet-baseline``)."""
    with _interruption_told(Path(out_dir), "baseline", options):
        return _train_baseline(data, out_dir, cfg, options)


def _train_baseline(
    data: Sequence[str | Path],
    out_dir: str | Path,
    cfg: UNetBaselineConfig,
    options: TrainOptions,
) -> TrainReport:
    if options.init_from is not None:
        raise InferenceError(
            "baseline: --init-from applies to the latent diffusion stages (autoencoder, "
            f"diffusion), found it given for the UNet baseline ({options.init_from})"
        )
    _diffusion_only(options, "baseline")
    started = time.monotonic()
    out = Path(out_dir)
    paths = [Path(d) for d in data]
    ckpt, device, generator = _prepare_run(out, "baseline", options)
    split = _split(paths, options, cfg.survival_classes)
    unet = build_baseline_unet(cfg, seed=options.seed).to(device)
    opt = torch.optim.Adam(unet.parameters(), lr=options.learning_rate)
    pre = cfg.preprocessing
    train_ds = CohortDataset(split.train, pre, cfg.contrasts, cfg.use_dose, cfg.survival_classes)
    val_ds = CohortDataset(split.held_out, pre, cfg.contrasts, cfg.use_dose, cfg.survival_classes)
    identity = _identity("baseline", config_to_dict(cfg), split, options)
    _check_resume_before_preparing(ckpt, identity, options, _config_defaults(cfg))
    if options.jobs > 1:  # otherwise each patient is prepared at its first batch
        for ds in (train_ds, val_ds):
            for _ in ds.prepared(options.jobs):
                pass
    start_epoch, losses, val_losses, rates = _resume(
        ckpt, identity, options, unet, opt, generator, "UNet baseline", _config_defaults(cfg)
    )

    def step(chunk: list[int]) -> float:
        batch = _baseline_batch(train_ds, chunk, device)
        return baseline_step(
            unet, cfg, opt, batch, generator, autocast=options.autocast,
            grad_clip=options.grad_clip,
        ).loss  # fmt: skip

    @torch.no_grad()
    def validate() -> float | None:
        if len(val_ds) == 0:
            return None
        unet.eval()
        total = 0.0
        for chunk in batches(range(len(val_ds)), options.batch_size):
            loss, _ = baseline_losses(
                unet, cfg, _baseline_batch(val_ds, chunk, device), None, dropout=False
            )
            total += float(loss) * len(chunk)
        return total / len(val_ds)

    save = _saver(ckpt, unet, opt, generator, identity, rates=rates)

    _run_epochs(
        stage="baseline",
        options=options,
        n_items=len(train_ds),
        start_epoch=start_epoch,
        step=step,
        validate=validate,
        save=save,
        losses=losses,
        val_losses=val_losses,
        started=started,
    )
    save_baseline_dir(unet.cpu(), cfg, out, overwrite=True)
    seconds = time.monotonic() - started
    _record_stage(
        out,
        "baseline",
        _stage_info(
            "baseline", options, paths, split, losses, val_losses, seconds, **_rates_record(rates)
        ),
        {},
    )
    return TrainReport(
        stage="baseline",
        out_dir=out,
        epochs=len(losses),  # fewer than options.epochs when --max-minutes stopped it
        start_epoch=start_epoch,
        train_losses=losses,
        val_losses=val_losses,
        seconds=seconds,
        train_patients=[p.patient_id for p in split.train],
        held_out_patients=[p.patient_id for p in split.held_out],
        held_out_sites=list(split.held_out_sites),
    )


def options_with(options: TrainOptions, **changes: Any) -> TrainOptions:
    return dataclasses.replace(options, **changes)
