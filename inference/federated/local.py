"""What a site does with the global weights: train them for a few local epochs on its own
patients, or evaluate them there. Only weights and numbers come out of here.

The networks, batches, loss and step functions, epoch order and epoch loop are those of
centralised training (:mod:`inference.train.loops`, :mod:`inference.train.steps`,
:mod:`inference.unet_baseline`); what federated training adds is only

- starting from the received global weights (a fresh Adam state each round, as in FedAvg);
- epochs numbered across rounds (round ``r`` trains epochs ``(r-1)*E .. r*E-1``), so each round
  sees a new patient order drawn from the seed like a centralised run;
- FedProx's proximal term ``mu/2 ||w - w_global||^2``, added as its gradient ``mu (w - w_global)``
  just before each optimiser step (after gradient clipping);
- per-site evaluation: the stage's loss (without condition dropout) on the site's patients and,
  with ``card_metrics``, the model card's metrics (:mod:`inference.evaluate`) of the global model.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.errors import ConfigError, GlioforecastError, InferenceError
from dicom_node.yamlload import load_yaml
from inference.data import (
    DEFAULT_SURVIVAL_CLASSES,
    CohortDataset,
    CohortPatient,
    load_truth,
    patient_inputs,
    read_cohort,
)
from inference.federated.config import NodeConfig, RunConfig
from inference.metrics import finite_mean
from inference.model_config import ModelConfig, config_from_dict, config_to_dict, preset
from inference.model_dir import KIND_LDM, KIND_UNET_BASELINE
from inference.networks import LatentDiffusionModel, build_model, build_scheduler
from inference.sampler import make_generator
from inference.train.loops import (
    TrainOptions,
    _ae_batch,
    _ae_items,
    _baseline_batch,
    _diffusion_batch,
    _encode_all,
    _run_epochs,
    batches,
    resolve_device,
)
from inference.train.steps import (
    autoencoder_losses,
    autoencoder_step,
    diffusion_loss,
    diffusion_step,
)
from inference.unet_baseline import (
    UNetBaselineConfig,
    baseline_losses,
    baseline_preset,
    baseline_step,
    build_baseline_unet,
)

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
#: model-card metrics a site reports each round (means over its patients)
CARD_KEYS = ("psnr_global", "ssim_global", "mae_global", "psnr_tumour", "ssim_tumour",
             "mae_tumour", "dice", "abs_volume_error_ml")  # fmt: skip


# ------------------------------------------------------------------------------------------
# the architecture, sent by the coordinator as JSON


def model_config_for(run: RunConfig) -> tuple[str, UNetBaselineConfig | ModelConfig]:
    """(kind, configuration) of the network a run trains: the preset, with the fields of
    ``model-yaml`` (a mapping) replacing the preset's."""

    overrides: dict[str, Any] = {}
    if run.model_yaml:
        path = Path(run.model_yaml)
        if not path.is_file():
            raise ConfigError(
                "federated site", [f"model-yaml: expected a YAML file, found nothing at {path}"]
            )
        data = load_yaml(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ConfigError(
                "federated site", [f"{path}: expected a mapping, found {type(data).__name__}"]
            )
        overrides = {k: v for k, v in data.items() if k not in ("format", "format_version",
                                                                "kind", "weights")}  # fmt: skip
    if run.stage == "baseline":
        base = config_to_dict(baseline_preset(run.preset))
        return KIND_UNET_BASELINE, baseline_config_from_dict(_merge(base, overrides))
    if run.stage == "diffusion":
        from inference.model_dir import read_model_yaml

        cfg, _ = read_model_yaml(run.stage1_dir)
        return KIND_LDM, cfg
    base = config_to_dict(preset(run.preset))
    return KIND_LDM, config_from_dict(_merge(base, overrides), source="model-yaml")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def baseline_config_from_dict(data: Mapping[str, Any]) -> UNetBaselineConfig:
    from inference.model_config import parse_dataclass_fields

    problems: list[str] = []
    kwargs = parse_dataclass_fields(UNetBaselineConfig, data, "", problems)
    if problems:
        raise InferenceError("baseline configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return UNetBaselineConfig(**kwargs)


def encode_model_config(kind: str, cfg: UNetBaselineConfig | ModelConfig) -> str:
    return json.dumps({"kind": kind, "config": config_to_dict(cfg)})


def decode_model_config(text: str) -> tuple[str, UNetBaselineConfig | ModelConfig]:
    try:
        data = json.loads(text)
        kind, cfg = data["kind"], data["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InferenceError(
            f"model-config: expected JSON with kind and config, found {text[:80]!r} ({exc})"
        ) from None
    if kind == KIND_UNET_BASELINE:
        return kind, baseline_config_from_dict(cfg)
    if kind == KIND_LDM:
        return kind, config_from_dict(cfg, source="model-config from the coordinator")
    raise InferenceError(
        f"model-config: expected kind {KIND_LDM} or {KIND_UNET_BASELINE}, found {kind!r}"
    )


# ------------------------------------------------------------------------------------------
# site data


def site_patients(
    node: NodeConfig, survival_classes: Sequence[str] | None = None
) -> list[CohortPatient]:
    """The site's patients: every patient of its folder(s), or those of ``site_name``. The
    table's response categories are checked, and its survival classes against
    ``survival_classes`` (the model's) when given."""
    patients = read_cohort(list(node.data_path), survival_classes=survival_classes)
    if node.site_name:
        sites = sorted({p.site for p in patients})
        patients = [p for p in patients if p.site == node.site_name]
        if not patients:
            raise ConfigError(
                "federated site",
                [
                    f"site-name: expected patients of {node.site_name!r} in "
                    f"{list(node.data_path)}, found only sites {sites}"
                ],
            )
    return sorted(patients, key=lambda p: p.patient_id)


def check_site_data(
    node: NodeConfig,
    progress: Callable[[CohortPatient], None] | None = None,
    survival_classes: Sequence[str] = DEFAULT_SURVIVAL_CLASSES,
) -> tuple[list[CohortPatient], list[str]]:
    """Read each of the site's patients as training and evaluation will (inputs and truth):
    the patients and, per unreadable patient, what is wrong. Problems with the table itself
    (an outcome value outside the response categories or ``survival_classes``, or a patient
    whose files cannot be found) raise at once, listing every patient concerned."""
    patients = site_patients(node, survival_classes)
    problems = []
    for p in patients:
        if progress is not None:
            progress(p)
        try:
            load_truth(p, patient_inputs(p))
        except GlioforecastError as exc:
            text = str(exc)
            problems.append(text if p.patient_id in text else f"patient {p.patient_id}: {text}")
    return patients, problems


def site_label(node: NodeConfig, patients: Sequence[CohortPatient]) -> str:
    if node.site_name:
        return node.site_name
    sites = sorted({p.site for p in patients})
    return sites[0] if len(sites) == 1 else "+".join(sites)


# ------------------------------------------------------------------------------------------
# training and evaluation


@dataclass(frozen=True)
class LocalTask:
    """What the coordinator asks for in one message (from its ConfigRecord)."""

    stage: str
    server_round: int
    local_epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    proximal_mu: float = 0.0
    card_metrics: bool = False
    eval_samples: int = 1
    eval_steps: int = 0
    latent_stats: bool = False


def _proximal_hook(
    params: Sequence[torch.nn.Parameter], mu: float
) -> Callable[[torch.optim.Optimizer, Any, Any], None]:
    anchors = [p.detach().clone() for p in params]

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, w0 in zip(params, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - w0, alpha=mu)

    return hook


class SiteWork:
    """The site's patients and the network of one stage, ready to train or evaluate."""

    def __init__(
        self,
        node: NodeConfig,
        kind: str,
        cfg: UNetBaselineConfig | ModelConfig,
        stage: str,
        autoencoder_state: State | None = None,
    ) -> None:
        if node.threads:
            torch.set_num_threads(node.threads)
        self.node = node
        self.kind = kind
        self.cfg = cfg
        self.stage = stage
        self.device = resolve_device(node.device)
        self.patients = site_patients(node, cfg.survival_classes)
        self.site = site_label(node, self.patients)
        # the diffusion stage trains on latents only: each patient is prepared once, encoded
        # and let go, as in centralised training (inference.train.loops.train_diffusion)
        self.dataset = CohortDataset(
            self.patients,
            cfg.preprocessing,
            cfg.contrasts,
            cfg.use_dose,
            cfg.survival_classes,
            cache=stage != "diffusion",
        )
        self.model: LatentDiffusionModel | None = None
        self.module: torch.nn.Module
        if stage == "baseline":
            assert isinstance(cfg, UNetBaselineConfig)
            self.module = build_baseline_unet(cfg).to(self.device)
        else:
            assert isinstance(cfg, ModelConfig)
            model_cfg = cfg if stage == "diffusion" else cfg.replace(latent_scale=1.0)
            self.model = build_model(model_cfg).to(self.device)
            if stage == "autoencoder":
                self.module = self.model.autoencoder
            else:
                if autoencoder_state is None:
                    raise InferenceError(
                        "diffusion stage: expected the global autoencoder weights in the "
                        "message (record 'autoencoder'), found none"
                    )
                from inference.model_dir import load_state_checked

                load_state_checked(self.model.autoencoder, autoencoder_state, "autoencoder")
                self.model.autoencoder.eval()
                for p in self.model.autoencoder.parameters():
                    p.requires_grad_(False)
                self.module = self.model.unet
        self._ae_items = _ae_items(self.dataset) if stage == "autoencoder" else []
        self._latents = (
            _encode_all(self.model, self.dataset)
            if stage == "diffusion" and self.model is not None
            else []
        )

    @property
    def n_examples(self) -> int:
        if self.stage == "autoencoder":
            return len(self._ae_items)
        return len(self.dataset)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        from inference.model_dir import load_state_checked

        load_state_checked(self.module, dict(state), f"global {self.stage} weights")

    def state(self) -> State:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.module.state_dict().items()}

    # --------------------------------------------------------------------------------------

    def train(self, task: LocalTask) -> dict[str, float]:
        """Train the loaded weights for ``task.local_epochs``; the mean training loss of each
        epoch and the number of examples."""
        options = TrainOptions(
            epochs=task.server_round * task.local_epochs,
            batch_size=task.batch_size,
            learning_rate=task.learning_rate,
            seed=task.seed,
            device=self.node.device,
            progress=False,
        )
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=task.learning_rate)
        if task.proximal_mu > 0:
            opt.register_step_pre_hook(_proximal_hook(params, task.proximal_mu))
        site_stream = zlib.crc32(self.site.encode())
        generator = make_generator(
            int(np.random.default_rng([task.seed, task.server_round, site_stream]).integers(2**62))
        )
        step = self._step_fn(opt, generator, options)
        losses: list[float] = []
        _run_epochs(
            stage=self.stage,
            options=options,
            n_items=self.n_examples,
            start_epoch=(task.server_round - 1) * task.local_epochs,
            step=step,
            validate=lambda: None,
            save=lambda *_: None,
            losses=losses,
            val_losses=[],
        )
        return {
            "train-loss": float(losses[-1]) if losses else math.nan,
            "train-loss-first-epoch": float(losses[0]) if losses else math.nan,
            "num-examples": self.n_examples,
        }

    def _step_fn(
        self, opt: torch.optim.Optimizer, generator: torch.Generator, options: TrainOptions
    ) -> Callable[[list[int]], float]:
        device = self.device
        if self.stage == "baseline":
            cfg = self.cfg
            assert isinstance(cfg, UNetBaselineConfig)

            def step_baseline(chunk: list[int]) -> float:
                batch = _baseline_batch(self.dataset, chunk, device)
                return baseline_step(
                    self.module, cfg, opt, batch, generator,  # type: ignore[arg-type]
                    autocast=options.autocast, grad_clip=options.grad_clip,
                ).loss  # fmt: skip

            return step_baseline
        model = self.model
        assert model is not None
        if self.stage == "autoencoder":
            tr = model.config.training

            def step_ae(chunk: list[int]) -> float:
                # random patches when the configuration asks for them, as centralised training
                batch = _ae_batch(
                    self.dataset, [self._ae_items[i] for i in chunk], device,
                    tr.autoencoder_patch, generator,
                )  # fmt: skip
                return autoencoder_step(
                    model.autoencoder, opt, batch, generator, kl_weight=tr.kl_weight,
                    mask_loss_weight=tr.mask_loss_weight, autocast=options.autocast,
                    grad_clip=options.grad_clip,
                ).loss  # fmt: skip

            return step_ae
        scheduler = build_scheduler(model.config)

        def step_diffusion(chunk: list[int]) -> float:
            batch = _diffusion_batch([self._latents[i] for i in chunk], device)
            return diffusion_step(
                model, opt, batch, generator, scheduler=scheduler, autocast=options.autocast,
                grad_clip=options.grad_clip,
            ).loss  # fmt: skip

        return step_diffusion

    # --------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, task: LocalTask) -> dict[str, float]:
        """The loaded (global) weights on the site's patients: the stage's loss without
        condition dropout, the model card's metrics when asked, latent moments for the
        autoencoder's latent scale when asked."""
        self.module.eval()
        g = make_generator(task.seed + 1)
        total, n = 0.0, 0
        out: dict[str, float] = {}
        if self.stage == "baseline":
            cfg = self.cfg
            assert isinstance(cfg, UNetBaselineConfig)
            for chunk in batches(range(len(self.dataset)), task.batch_size):
                b_batch = _baseline_batch(self.dataset, chunk, self.device)
                loss, _ = baseline_losses(self.module, cfg, b_batch, None, dropout=False)  # type: ignore[arg-type]
                total, n = total + float(loss) * len(chunk), n + len(chunk)
        elif self.stage == "autoencoder":
            assert self.model is not None
            tr = self.model.config.training
            s1 = s2 = 0.0
            count = 0
            for chunk in batches(range(len(self._ae_items)), task.batch_size):
                a_batch = _ae_batch(self.dataset, [self._ae_items[i] for i in chunk], self.device)
                loss, _ = autoencoder_losses(
                    self.model.autoencoder, a_batch, g, kl_weight=tr.kl_weight,
                    mask_loss_weight=tr.mask_loss_weight,
                )  # fmt: skip
                total, n = total + float(loss) * len(chunk), n + len(chunk)
                if task.latent_stats:
                    mu = self.model.autoencoder.encode(a_batch.image)[0].double().cpu()
                    s1, s2, count = (
                        s1 + float(mu.sum()),
                        s2 + float((mu**2).sum()),
                        count + mu.numel(),
                    )
            if task.latent_stats:
                out.update({"latent-count": float(count), "latent-sum": s1, "latent-sumsq": s2})
        else:
            assert self.model is not None
            scheduler = build_scheduler(self.model.config)
            for chunk in batches(range(len(self._latents)), task.batch_size):
                d_batch = _diffusion_batch([self._latents[i] for i in chunk], self.device)
                loss, _ = diffusion_loss(
                    self.model, d_batch, g, scheduler=scheduler, p_drop_contrast=0.0,
                    p_drop_dose=0.0, p_drop_class=0.0,
                )  # fmt: skip
                total, n = total + float(loss) * len(chunk), n + len(chunk)
        out["eval-loss"] = total / max(n, 1)
        out["num-examples"] = float(n)
        if task.card_metrics and self.stage in ("baseline", "diffusion"):
            out.update(self.card_metrics(task))
        return out

    def card_metrics(self, task: LocalTask) -> dict[str, float]:
        """The model card's metrics (:mod:`inference.evaluate`) of the loaded weights on the
        site's patients, through a temporary model directory and the node's predictor."""
        from inference.evaluate import evaluate_predictor, load_patients
        from inference.model_predictor import ModelPredictor

        with tempfile.TemporaryDirectory(prefix="gf-fed-eval-") as tmp:
            self.save_model_dir(Path(tmp))
            predictor = ModelPredictor(
                tmp,
                device=self.node.device,
                seed=task.seed,
                num_inference_steps=task.eval_steps or None,
                allow_untrained=True,
            )
            results = evaluate_predictor(
                predictor, load_patients(self.patients), samples=task.eval_samples
            )
        # the mean of the finite values, as the evaluation's (an infinite PSNR, a perfect
        # prediction, is left out there too rather than making the site's mean infinite)
        return {k: finite_mean([r.metrics[k] for r in results]) for k in CARD_KEYS}

    def save_model_dir(self, out: Path) -> None:
        """The loaded weights as a model directory (for the predictor)."""
        if self.stage == "baseline":
            from inference.unet_baseline import save_baseline_dir

            assert isinstance(self.cfg, UNetBaselineConfig)
            save_baseline_dir(self.module, self.cfg, out, overwrite=True)  # type: ignore[arg-type]
        else:
            from inference.model_dir import save_model_dir

            assert self.model is not None
            save_model_dir(self.model, out, overwrite=True)
