"""Configuration of a federated run (the ServerApp's run config) and of a site (a SuperNode's
node config), parsed from Flower's flat key/value records with every problem reported at once.

Run config (``[tool.flwr.app.config]`` of the generated app, overridable with
``glioforecast federate run --run-config 'key=value ...'``)::

    stage              baseline | autoencoder | diffusion
    strategy           fedavg | fedprox
    proximal-mu        FedProx's mu (ignored by FedAvg)
    num-server-rounds  rounds
    local-epochs       epochs each site trains per round
    learning-rate      Adam learning rate of the local training
    batch-size         local batch size
    seed               initial weights and local shuffling
    preset             architecture: tiny | demo | fine (baseline: tiny | demo)
    model-yaml         a YAML file on the coordinator whose mapping overrides the preset's fields
    stage1-dir         (diffusion) the model directory of a trained autoencoder
    out                the model directory the coordinator writes
    overwrite          replace a model directory already at out (federate run|simulate
                       --overwrite); without it such a directory is refused before any round
    sites              comma-separated site names to train on ("" = every connected site)
    min-sites          fewest sites whose replies make a round (at most the number of sites
                       named in sites, when they are named)
    wait-for-sites     seconds to wait for the selected sites to connect (federate run|simulate
                       --wait-for-sites)
    round-timeout      seconds a round may take at most
    straggler-timeout  once min-sites replies are in, seconds to wait for the rest
    evaluate-every     evaluate the global model at the sites every k rounds (and after the last)
    card-metrics       also compute the model card's image/tumour metrics per site each round
    eval-samples       samples per study for those metrics
    eval-steps         DDIM steps for those metrics (diffusion stage; 0 = the model's own)
    server-eval-data   cohort folder on the coordinator for a central evaluation ("" = none)
    simulation-data    (simulation only) cohort folder that virtual sites read
    site-keys          folder on the coordinator of <site name>.pub public keys: each site must
                       prove its name by signing a challenge with the matching private key
                       ("" = names are taken as reported; see site_identity.py)

Node config (``glioforecast federate supernode --data DIR --site NAME``)::

    data-path   the site's cohort folder(s), comma-separated
    site-name   the site's name; only its patients are used when the folder holds several sites
    device      cpu | cuda
    threads     torch CPU threads (0 = torch's default)
    site-key    the site's private key (`federate node-key`), to prove its name to a coordinator
                with site-keys (`federate supernode --auth-key` sets it to that key)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dicom_node.errors import ConfigError

STAGES = ("baseline", "autoencoder", "diffusion")
STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class RunConfig:
    stage: str = "baseline"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    num_server_rounds: int = 3
    local_epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 2
    seed: int = 0
    preset: str = "tiny"
    model_yaml: str = ""
    stage1_dir: str = ""
    out: str = "federated-model"
    overwrite: bool = False
    resume: bool = False
    sites: str = ""
    min_sites: int = 1
    wait_for_sites: float = 120.0
    round_timeout: float = 3600.0
    straggler_timeout: float = 600.0
    evaluate_every: int = 1
    card_metrics: bool = True
    eval_samples: int = 1
    eval_steps: int = 0
    server_eval_data: str = ""
    simulation_data: str = ""
    site_keys: str = ""

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.stage not in STAGES:
            p.append(f"stage: expected one of {list(STAGES)}, found {self.stage!r}")
        if self.strategy not in STRATEGIES:
            p.append(f"strategy: expected one of {list(STRATEGIES)}, found {self.strategy!r}")
        for key in (
            "num_server_rounds", "local_epochs", "batch_size", "min_sites", "eval_samples",
            "evaluate_every",
        ):  # fmt: skip
            if getattr(self, key) < 1:
                p.append(f"{_kebab(key)}: expected >= 1, found {getattr(self, key)}")
        # NaN passes every comparison below unnoticed (a FedProx mu of nan trained as FedAvg
        # and wrote NaN, which is not JSON, into train_state.json) and inf is no setting
        finite = {
            key: getattr(self, key)
            for key in ("proximal_mu", "learning_rate", "wait_for_sites", "round_timeout",
                        "straggler_timeout")
        }  # fmt: skip
        for key, value in finite.items():
            if not math.isfinite(value):
                p.append(f"{_kebab(key)}: expected a finite number, found {value}")
        if math.isfinite(self.learning_rate) and not self.learning_rate > 0:
            p.append(f"learning-rate: expected > 0, found {self.learning_rate}")
        if self.proximal_mu < 0:
            p.append(f"proximal-mu: expected >= 0, found {self.proximal_mu}")
        for key in ("wait_for_sites", "round_timeout", "straggler_timeout"):
            if math.isfinite(getattr(self, key)) and not getattr(self, key) > 0:
                p.append(f"{_kebab(key)}: expected > 0 seconds, found {getattr(self, key)}")
        names = self.site_list
        repeated = sorted({s for s in names if names.count(s) > 1})
        if repeated:
            p.append(
                f"sites: expected distinct site names, found {repeated} more than once in "
                f"{self.sites!r}"
            )
        distinct = list(dict.fromkeys(names))
        if names and self.min_sites > len(distinct):
            p.append(
                f"min-sites: expected at most the {len(distinct)} site(s) named in sites "
                f"{distinct}, found {self.min_sites} (no round could ever be made)"
            )
        if self.eval_steps < 0:
            p.append(f"eval-steps: expected >= 0, found {self.eval_steps}")
        if self.stage == "diffusion" and not self.stage1_dir:
            p.append("stage1-dir: the diffusion stage needs a trained autoencoder directory")
        if not self.out:
            p.append("out: expected a model directory path, found an empty string")
        if p:
            raise ConfigError("federated run config", p)

    @property
    def site_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.sites.split(",") if s.strip())

    def as_flower_config(self) -> dict[str, Any]:
        """The run config as Flower's flat ``[tool.flwr.app.config]`` table."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class NodeConfig:
    data_path: tuple[str, ...]
    site_name: str = ""
    device: str = "cpu"
    threads: int = 0
    site_key: str = ""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, default: Any, value: Any, problems: list[str]) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"{_kebab(name)}: expected true or false, found {value!r}")
        return default
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{_kebab(name)}: expected an integer, found {value!r}")
            return default
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{_kebab(name)}: expected a number, found {value!r}")
            return default
        return float(value)
    if not isinstance(value, str):
        problems.append(f"{_kebab(name)}: expected a string, found {value!r}")
        return default
    return value


def parse_run_config(values: Mapping[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from Flower's run config (kebab-case keys); unknown keys are
    ignored only when Flower's own (none are), so a typo is an error."""
    problems: list[str] = []
    defaults = RunConfig.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    known = {_kebab(n) for n in defaults}
    unknown = sorted(set(values) - known)
    if unknown:
        problems.append(f"unknown keys {unknown}: expected among {sorted(known)}")
    for name, f in defaults.items():
        key = _kebab(name)
        if key in values:
            kwargs[name] = _coerce(name, f.default, values[key], problems)
    if problems:
        raise ConfigError("federated run config", problems)
    return RunConfig(**kwargs)


def parse_node_config(values: Mapping[str, Any], run: RunConfig | None = None) -> NodeConfig:
    """A :class:`NodeConfig` from a SuperNode's node config. In a simulation (virtual nodes
    carry ``partition-id`` and no ``data-path``) partition ``i`` is the ``i``-th of the run's
    ``sites`` (or of the sorted sites of ``simulation-data``) in ``simulation-data``."""
    problems: list[str] = []
    data = values.get("data-path")
    if data is None and "partition-id" in values:
        return _simulation_node(values, run)
    if not isinstance(data, str) or not data.strip():
        problems.append(f"data-path: expected the site's cohort folder, found {data!r}")
        data = ""
    site = values.get("site-name", "")
    if not isinstance(site, str):
        problems.append(f"site-name: expected a string, found {site!r}")
        site = ""
    device = values.get("device", "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        problems.append(f"device: expected cpu or cuda, found {device!r}")
    threads = values.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        problems.append(f"threads: expected an integer >= 0, found {threads!r}")
        threads = 0
    key = values.get("site-key", "")
    if not isinstance(key, str):
        problems.append(f"site-key: expected a private key file path, found {key!r}")
        key = ""
    if problems:
        raise ConfigError("federated node config", problems)
    paths = tuple(p.strip() for p in str(data).split(",") if p.strip())
    return NodeConfig(
        data_path=paths, site_name=site, device=str(device), threads=int(threads), site_key=key
    )


def _simulation_node(values: Mapping[str, Any], run: RunConfig | None) -> NodeConfig:
    from inference.data import read_cohort

    if run is None or not run.simulation_data:
        raise ConfigError(
            "federated node config",
            [
                "simulation: expected the run config key simulation-data (a cohort folder the "
                "virtual sites read), found none"
            ],
        )
    sites = run.site_list or tuple(
        sorted({p.site for p in read_cohort(run.simulation_data, survival_classes=None)})
    )
    index = int(values["partition-id"])
    if not 0 <= index < len(sites):
        raise ConfigError(
            "federated node config",
            [
                f"simulation: virtual node {index} has no site; expected at most {len(sites)} "
                f"virtual nodes for the sites {list(sites)}"
            ],
        )
    return NodeConfig(data_path=(run.simulation_data,), site_name=sites[index])
