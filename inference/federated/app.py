"""The Flower apps: ``client_app`` (runs at each hospital, next to its data) and ``server_app``
(runs at the coordinator). Message API of Flower >= 1.21.

Messages
--------
coordinator -> site:
    ``query``     "who are you?" (answered with the site name and its patient count); with
                  ``site-keys``, ``config`` holds a challenge the site signs (``proof``)
    ``train``     ``arrays`` (global weights), ``config`` (what to do, the architecture as
                  JSON) and, for the diffusion stage, ``autoencoder`` (the frozen global
                  stage-1 weights)
    ``evaluate``  the same, to evaluate the global weights on the site's patients
site -> coordinator:
    ``train``     ``arrays`` (the updated weights) and ``metrics`` (losses, num-examples)
    ``evaluate``  ``metrics`` only (losses, the model card's metric means, latent moments)
    ``query``     ``info`` (site name, and the proof when asked) and ``metrics`` (patient count)

Nothing else leaves a site: no image, mask, table row, patient ID or path
(``tests/inference/federated/test_client_messages.py`` checks every record of every reply).
A handler that fails raises :class:`SiteFailure`, naming only the site, the step and the class
of the error: Flower sends the text of a ClientApp's exception to the coordinator (stored in
the SuperLink's database), and a site's errors name its data paths and patient IDs, so the full
error is logged at the site only (the SuperNode's log).

Rounds
------
The aggregation is Flower's (``FedAvg`` / ``FedProx``: weighted by ``num-examples``); the
round loop is ours so that a site that disappears mid-round does not stall the federation:
once ``min-sites`` replies are in, the coordinator waits at most ``straggler-timeout`` seconds
for the others (never longer than ``round-timeout`` in all), then aggregates what it has and
logs the sites that dropped out. (The SuperLink itself declares a silent SuperNode unavailable
only after two missed 30 s heartbeats; such error replies are logged the same way.)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from dicom_node.errors import InferenceError
from inference.federated.config import NodeConfig, RunConfig, parse_node_config, parse_run_config
from inference.federated.local import (
    LocalTask,
    SiteWork,
    decode_model_config,
    encode_model_config,
    model_config_for,
    site_label,
    site_patients,
)
from inference.federated.site_identity import (
    check_keys_dir,
    new_challenge,
    sign_site,
    verify_site,
)

log = logging.getLogger(__name__)

QUERY = MessageType.QUERY
FEDERATION_JSON = "federation.json"
_POLL_S = 0.5
_QUERY_GRACE_S = 20.0  # once the sites wanted are in, how long the other nodes may take to answer

# ------------------------------------------------------------------------------------------
# ClientApp

_WORK_CACHE: dict[tuple[Any, ...], SiteWork] = {}


def _node(context: Context, run: RunConfig | None = None) -> NodeConfig:
    if run is None and "partition-id" in context.node_config:
        run = parse_run_config(context.run_config)
    return parse_node_config(context.node_config, run)


def _task(config: ConfigRecord) -> LocalTask:
    return LocalTask(
        stage=str(config["stage"]),
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        local_epochs=int(config["local-epochs"]),  # type: ignore[arg-type]
        learning_rate=float(config["learning-rate"]),  # type: ignore[arg-type]
        batch_size=int(config["batch-size"]),  # type: ignore[arg-type]
        seed=int(config["seed"]),  # type: ignore[arg-type]
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        card_metrics=bool(config.get("card-metrics", False)),
        eval_samples=int(config.get("eval-samples", 1)),  # type: ignore[arg-type]
        eval_steps=int(config.get("eval-steps", 0)),  # type: ignore[arg-type]
        latent_stats=bool(config.get("latent-stats", False)),
    )


def _work(msg: Message, node: NodeConfig) -> tuple[SiteWork, LocalTask]:
    config = msg.content["config"]
    assert isinstance(config, ConfigRecord)
    task = _task(config)
    text = str(config["model-config"])
    kind, cfg = decode_model_config(text)
    ae_state = None
    ae_key = ""
    if "autoencoder" in msg.content:
        record = msg.content["autoencoder"]
        assert isinstance(record, ArrayRecord)
        ae_state = record.to_torch_state_dict()
        ae_key = record.object_id
    key = (node, text, task.stage, ae_key)
    work = _WORK_CACHE.get(key)
    if work is None:
        _WORK_CACHE.clear()
        work = SiteWork(node, kind, cfg, task.stage, ae_state)
        _WORK_CACHE[key] = work
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    work.load(arrays.to_torch_state_dict())
    return work, task


class SiteFailure(InferenceError):
    """What the coordinator learns of a site's failed step: the site, the step and the class of
    the error. The error's own text stays at the site (it names data paths and patient IDs)."""


Handler = Callable[[Message, Context], Message]


def _site_of(context: Context, run: RunConfig | None) -> str:
    """The site's name for an error reply: its configured site-name (sent with every query
    reply anyway), else the node id; never read from the data, which may be what failed."""
    try:
        name = _node(context, run).site_name
    except Exception:  # the node config itself may be what failed
        name = ""
    return name or f"of node {context.node_id}"


def _sanitised(step: str, run: RunConfig | None) -> Callable[[Handler], Handler]:
    """Wrap a ClientApp handler: a failure is logged here in full (the SuperNode's log) and
    re-raised as a :class:`SiteFailure` holding no path, patient ID or message text, since
    Flower puts ``str(exception)`` into the error reply the coordinator receives and stores."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def guarded(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as exc:
                site = _site_of(context, run)
                log.error("site %s: %s failed: %s", site, step, exc, exc_info=exc)
                raise SiteFailure(
                    f"site {site}: {step} failed ({type(exc).__name__}); details in the "
                    "SuperNode's log"
                ) from None

        return guarded

    return wrap


def make_client_app(run: RunConfig | None = None) -> ClientApp:
    """The site's ClientApp; ``run`` stands in for the run config in a simulation."""
    app = ClientApp()

    @app.query()
    @_sanitised("answering the query", run)
    def client_query(msg: Message, context: Context) -> Message:
        node = _node(context, run)
        patients = site_patients(node)
        site = site_label(node, patients)
        info: dict[str, str] = {"site": site}
        config = msg.content.config_records.get("config")
        challenge = str(config.get("challenge", "")) if config is not None else ""
        if challenge and node.site_key:
            info["proof"] = sign_site(node.site_key, site, context.node_id, challenge)
        elif challenge:
            log.warning(
                "site %s: the coordinator asks for proof of the site name and this node has no "
                "site-key (federate supernode --auth-key): it will be left out", site,
            )  # fmt: skip
        log.info("site %s: %d patients, ready", site, len(patients))
        content = RecordDict(
            {
                "info": ConfigRecord(dict(info)),
                "metrics": MetricRecord({"patients": len(patients)}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.train()
    @_sanitised("training", run)
    def client_train(msg: Message, context: Context) -> Message:
        work, task = _work(msg, _node(context, run))
        log.info(
            "site %s: round %d, training the %s for %d epoch(s) on %d patients",
            work.site, task.server_round, task.stage, task.local_epochs, len(work.patients),
        )  # fmt: skip
        metrics = work.train(task)
        log.info(
            "site %s: round %d trained, loss %.5f",
            work.site,
            task.server_round,
            metrics["train-loss"],
        )
        content = RecordDict(
            {"arrays": ArrayRecord(work.state()), "metrics": _metric_record(metrics)}
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @_sanitised("evaluation", run)
    def client_evaluate(msg: Message, context: Context) -> Message:
        work, task = _work(msg, _node(context, run))
        metrics = work.evaluate(task)
        log.info("site %s: round %d evaluated: %s", work.site, task.server_round, _fmt(metrics))
        return Message(content=RecordDict({"metrics": _metric_record(metrics)}), reply_to=msg)

    return app


def _metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    values: dict[str, int | float | list[int] | list[float]] = dict(metrics.items())
    return MetricRecord(values)


def _fmt(metrics: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


# ------------------------------------------------------------------------------------------
# ServerApp


def make_server_app(run: RunConfig | None = None) -> ServerApp:
    """The coordinator's ServerApp; ``run`` replaces the run config (simulation)."""
    app = ServerApp()

    @app.main()
    def server_main(grid: Grid, context: Context) -> None:
        show_progress()
        run_federation(grid, run if run is not None else parse_run_config(context.run_config))

    return app


def show_progress() -> None:
    """The coordinator's log lines (sites, rounds, metrics, resume) on standard error."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass
class RoundRecord:
    round: int
    seconds: float
    sites_trained: list[str]
    sites_dropped: list[str]
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    global_train: dict[str, float] = field(default_factory=dict)
    global_evaluate: dict[str, float] = field(default_factory=dict)
    central_evaluate: dict[str, float] = field(default_factory=dict)


def _select_sites(grid: Grid, run: RunConfig) -> dict[int, str]:
    """node id -> site name of the sites to train on (waits up to ``wait-for-sites``). A node
    is left out when another node already reported its site name or, with ``site-keys``, when
    it does not prove the name (:mod:`inference.federated.site_identity`)."""
    wanted = set(run.site_list)
    if run.site_keys:
        keyed = check_keys_dir(run.site_keys)
        log.info("federation: site names are checked against the keys of %s", keyed)
    deadline = time.monotonic() + run.wait_for_sites
    names: dict[int, str] = {}
    refused: dict[int, str] = {}
    failed: dict[int, str] = {}  # node -> why it could not answer (e.g. no patients there)
    asked: set[int] = set()
    challenges: dict[int, str] = {}
    pending: dict[str, int] = {}
    enough_at = 0.0
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            msgs = []
            for n in new:
                content = RecordDict()
                if run.site_keys:
                    challenges[n] = new_challenge()
                    content["config"] = ConfigRecord({"challenge": challenges[n]})
                msgs.append(
                    Message(content=content, message_type=QUERY, dst_node_id=n, group_id="query")
                )
            pending.update(zip(grid.push_messages(msgs), new, strict=True))
            asked.update(new)
        for reply in grid.pull_messages(list(pending)) if pending else []:
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                failed[node] = str(reply.error.reason)
                log.warning("node %d did not answer the query: %s", node, reply.error.reason)
                continue
            info = reply.content["info"]
            assert isinstance(info, ConfigRecord)
            site = str(info["site"])
            why = _refusal(run, names, node, site, challenges.get(node, ""), info.get("proof"))
            if why is not None:
                refused[node] = f"{site}: {why}"
                log.warning("node %d reports site %s: left out of the run, %s", node, site, why)
                continue
            names[node] = site
            proven = " (name proven with its key)" if run.site_keys else ""
            log.info("site %s connected (node %d)%s", site, node, proven)
        have = set(names.values())
        if (wanted and wanted <= have) or (not wanted and len(names) >= run.min_sites):
            # enough sites: the queries still out get a short grace, so that every node that
            # connected is logged (one left out, an impostor, is worth a line)
            enough_at = enough_at or time.monotonic()
            if not pending or time.monotonic() - enough_at >= _QUERY_GRACE_S:
                break
        elif time.monotonic() > deadline:
            missing = sorted(wanted - have) if wanted else []
            expected = sorted(wanted) if wanted else f">= {run.min_sites} site(s)"
            raise InferenceError(
                f"federation: expected {expected} "
                f"to connect within {run.wait_for_sites:.0f} s, found {sorted(have)}"
                + (f" (missing {missing})" if missing else "")
                + (f"; left out: {sorted(refused.values())}" if refused else "")
                + "".join(f"; node {n} failed: {why}" for n, why in sorted(failed.items()))
            )
        time.sleep(_POLL_S)
    for node in pending.values():
        log.warning("node %d did not answer the query in time: left out of the run", node)
    selected = {n: s for n, s in names.items() if not wanted or s in wanted}
    log.info("federation: training on sites %s", sorted(selected.values()))
    return selected


def _refusal(
    run: RunConfig, names: Mapping[int, str], node: int, site: str, challenge: str, proof: Any
) -> str | None:
    """Why a node reporting ``site`` may not join (``None``: it may)."""
    if run.site_keys:
        why = verify_site(run.site_keys, site, node, challenge, proof)
        if why is not None:
            return why
    other = next((n for n, s in names.items() if s == site), None)
    if other is not None:
        return f"expected one node per site, found node {other} connected as {site} already"
    return None


def _collect(
    grid: Grid, messages: list[Message], sites: Mapping[int, str], run: RunConfig, what: str
) -> tuple[list[Message], list[str]]:
    """Push ``messages``, pull replies until all are in, or ``min-sites`` are in and
    ``straggler-timeout`` has passed, or ``round-timeout`` has passed. (replies, dropped sites)

    A dropped site is any selected site without a reply: one that failed or did not reply in
    time, and one that was sent nothing because Flower no longer lists its node (a SuperNode
    that stopped is not sampled by the strategy, so no message of the round is ever pending
    for it)."""
    sent = {m.metadata.dst_node_id for m in messages}
    for n, site in sorted(sites.items(), key=lambda item: item[1]):
        if n not in sent:
            log.warning("%s: site %s was sent nothing: its node %d is no longer connected",
                        what, site, n)  # fmt: skip
    ids = list(grid.push_messages(messages))
    pending = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
    replies: list[Message] = []
    start = time.monotonic()
    enough_at: float | None = None
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                log.warning(
                    "%s: site %s failed: %s", what, sites.get(node, node), reply.error.reason
                )
            else:
                replies.append(reply)
        now = time.monotonic()
        if enough_at is None and len(replies) >= run.min_sites:
            enough_at = now
        if not pending:
            break
        if enough_at is not None and now - enough_at >= run.straggler_timeout:
            break
        if now - start >= run.round_timeout:
            break
        time.sleep(_POLL_S)
    # the strategy sums the sites' weights in the order of the replies: in the sites' order,
    # a run gives the same global weights whichever site answers first
    replies.sort(key=lambda r: sites.get(r.metadata.src_node_id, str(r.metadata.src_node_id)))
    replied = {sites.get(r.metadata.src_node_id, str(r.metadata.src_node_id)) for r in replies}
    dropped = sorted(set(sites.values()) - replied)
    for n in pending.values():
        log.warning(
            "%s: site %s did not reply within %.0f s: dropped from this round, the round goes "
            "on with %d site(s)", what, sites.get(n, n), time.monotonic() - start, len(replies),
        )  # fmt: skip
    if len(replies) < run.min_sites:
        raise InferenceError(
            f"{what}: expected replies from at least {run.min_sites} site(s) (min-sites), found "
            f"{len(replies)}; dropped {dropped}"
        )
    return replies, dropped


def _metrics(reply: Message) -> dict[str, float]:
    record = next(iter(reply.content.metric_records.values()))
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def initial_state(
    run: RunConfig, kind: str, cfg: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(initial weights of the trained network, frozen autoencoder weights or None)."""
    from inference.networks import build_model, build_unet
    from inference.unet_baseline import build_baseline_unet

    if run.stage == "baseline":
        return build_baseline_unet(cfg, seed=run.seed).state_dict(), None
    if run.stage == "autoencoder":
        return build_model(
            cfg.replace(latent_scale=1.0), seed=run.seed
        ).autoencoder.state_dict(), None
    from inference.model_dir import load_model_dir

    stage1 = load_model_dir(run.stage1_dir).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        unet = build_unet(cfg)
    return unet.state_dict(), stage1.autoencoder.state_dict()


def run_federation(grid: Grid, run: RunConfig) -> Path:
    """The whole federated run: select sites, run the rounds, write the model directory."""
    from inference.federated import checkpoint

    started = time.monotonic()
    # the `federate run|simulate` that submitted this run marked out as in use by it
    check_out_dir(run, holder=True)
    kind, cfg = model_config_for(run)
    cfg_json = encode_model_config(kind, cfg)
    state, ae_state = initial_state(run, kind, cfg)
    identity = checkpoint.run_identity(run, cfg_json, ae_state)
    # a resume is checked against its checkpoint before the wait for the sites
    resumed = checkpoint.load(run, identity) if run.resume else None
    if run.overwrite and not run.resume:
        checkpoint.remove(run)
    sites = _select_sites(grid, run)
    history: list[RoundRecord] = []
    selected = set(sites.values())
    before = 0.0
    resumed_after: list[int] = []
    latent_scale: float | None = None
    first = 1
    if resumed is not None:
        state = resumed.weights
        history = [RoundRecord(**r) for r in resumed.rounds]
        before, latent_scale = resumed.seconds, resumed.latent_scale
        resumed_after = [*resumed.resumed_after, resumed.round]
        first = resumed.round + 1
        earlier = set(resumed.sites_selected)
        log.info(
            "federation: resuming after round %d of %d (checkpoint %s)%s", resumed.round,
            run.num_server_rounds, checkpoint.checkpoint_dir(run),
            "" if earlier == selected else
            f"; the interrupted run trained on {sorted(earlier)}, this one on {sorted(selected)}",
        )  # fmt: skip
        selected |= earlier
    arrays = ArrayRecord(state)
    ae_record = ArrayRecord(ae_state) if ae_state is not None else None
    common: dict[str, Any] = {"min_train_nodes": 1, "min_evaluate_nodes": 1,
                              "min_available_nodes": 1}  # fmt: skip
    strategy: FedAvg = (
        FedProx(proximal_mu=run.proximal_mu, **common)
        if run.strategy == "fedprox"
        else FedAvg(**common)
    )
    for rnd in range(first, run.num_server_rounds + 1):
        t0 = time.monotonic()
        config = ConfigRecord(
            {
                "model-config": cfg_json, "stage": run.stage, "server-round": rnd,
                "local-epochs": run.local_epochs, "learning-rate": run.learning_rate,
                "batch-size": run.batch_size, "seed": run.seed,
                "card-metrics": run.card_metrics, "eval-samples": run.eval_samples,
                "eval-steps": run.eval_steps,
                "latent-stats": run.stage == "autoencoder" and rnd == run.num_server_rounds,
            }
        )  # fmt: skip
        train_msgs = _for_sites(
            strategy.configure_train(rnd, arrays, config, grid), sites, ae_record
        )
        # the sites actually sent work: Flower samples the nodes connected now
        log.info("round %d/%d: training on %s", rnd, run.num_server_rounds,
                 sorted(sites[m.metadata.dst_node_id] for m in train_msgs))  # fmt: skip
        replies, dropped = _collect(grid, train_msgs, sites, run, f"round {rnd} training")
        new_arrays, agg_train = strategy.aggregate_train(rnd, replies)
        if new_arrays is None:
            raise InferenceError(f"round {rnd}: expected aggregated weights, found none")
        arrays = new_arrays
        record = RoundRecord(
            round=rnd, seconds=0.0,
            sites_trained=sorted(sites[r.metadata.src_node_id] for r in replies),
            sites_dropped=sorted(dropped),
            train={sites[r.metadata.src_node_id]: _metrics(r) for r in replies},
            global_train=dict(agg_train or {}),  # type: ignore[arg-type]
        )  # fmt: skip
        if rnd % run.evaluate_every == 0 or rnd == run.num_server_rounds:
            eval_msgs = _for_sites(
                strategy.configure_evaluate(rnd, arrays, config, grid), sites, ae_record
            )
            eval_replies, eval_dropped = _collect(
                grid, eval_msgs, sites, run, f"round {rnd} evaluation"
            )
            agg_eval = strategy.aggregate_evaluate(rnd, eval_replies)
            record.evaluate = {sites[r.metadata.src_node_id]: _metrics(r) for r in eval_replies}
            record.global_evaluate = {k: float(v) for k, v in (agg_eval or {}).items()}  # type: ignore[arg-type]
            record.sites_dropped = sorted(set(record.sites_dropped) | set(eval_dropped))
        if run.stage == "autoencoder" and rnd == run.num_server_rounds:
            latent_scale = _latent_scale(list(record.evaluate.values()))
        if run.server_eval_data:
            record.central_evaluate = central_evaluation(run, kind, cfg, arrays, ae_state, rnd)
        record.seconds = round(time.monotonic() - t0, 2)
        history.append(record)
        for site, m in sorted(record.evaluate.items()):
            log.info("round %d: site %s: %s", rnd, site, _fmt(m))
        log.info("round %d: global (weighted over sites): %s", rnd, _fmt(record.global_evaluate))
        if record.central_evaluate:
            log.info("round %d: central evaluation: %s", rnd, _fmt(record.central_evaluate))
        if record.sites_dropped:
            log.warning("round %d completed without %s", rnd, record.sites_dropped)
        checkpoint.save(
            run, identity, rnd, arrays.to_torch_state_dict(), [asdict(r) for r in history],
            sorted(selected), before + time.monotonic() - started, resumed_after, latent_scale,
        )  # fmt: skip
    # the sites whose training made the model: a site selected but dropped in every round
    # (its SuperNode stopped before round 1's training) contributed nothing
    trained = sorted({s for r in history for s in r.sites_trained})
    out = save_global_model(run, kind, cfg, arrays.to_torch_state_dict(), latent_scale, history,
                            trained, time.monotonic() - started, selected=sorted(selected),
                            resumed_after=resumed_after, seconds_before=before)  # fmt: skip
    checkpoint.remove(run)
    release_abandoned_out_dir(run)
    log.info("federation finished: global model directory %s", out)
    return out


def _for_sites(
    messages: Any, sites: Mapping[int, str], ae_record: ArrayRecord | None
) -> list[Message]:
    out = []
    for m in messages:
        if m.metadata.dst_node_id not in sites:
            continue
        if ae_record is not None:
            m.content["autoencoder"] = ae_record
        out.append(m)
    return out


def _latent_scale(site_metrics: list[dict[str, float]]) -> float:
    n = sum(m.get("latent-count", 0.0) for m in site_metrics)
    s1 = sum(m.get("latent-sum", 0.0) for m in site_metrics)
    s2 = sum(m.get("latent-sumsq", 0.0) for m in site_metrics)
    if n < 2:
        raise InferenceError(f"latent scale: expected latent moments from the sites, found n={n}")
    var = (s2 - s1 * s1 / n) / (n - 1)
    if not var > 0 or not math.isfinite(var):
        raise InferenceError(f"latent scale: expected latents with a positive spread, found {var}")
    return 1.0 / math.sqrt(var)


def central_evaluation(
    run: RunConfig, kind: str, cfg: Any, arrays: ArrayRecord, ae_state: Any, rnd: int
) -> dict[str, float]:
    """The global weights on the coordinator's own cohort folder (``server-eval-data``)."""
    node = NodeConfig(data_path=(run.server_eval_data,))
    work = SiteWork(node, kind, cfg, run.stage, ae_state)
    work.load(arrays.to_torch_state_dict())
    task = LocalTask(
        stage=run.stage, server_round=rnd, local_epochs=run.local_epochs,
        learning_rate=run.learning_rate, batch_size=run.batch_size, seed=run.seed,
        card_metrics=run.card_metrics, eval_samples=run.eval_samples, eval_steps=run.eval_steps,
    )  # fmt: skip
    return work.evaluate(task)


def save_global_model(
    run: RunConfig,
    kind: str,
    cfg: Any,
    state: dict[str, torch.Tensor],
    latent_scale: float | None,
    history: list[RoundRecord],
    sites: list[str],
    seconds: float,
    selected: list[str] | None = None,
    resumed_after: list[int] | None = None,
    seconds_before: float = 0.0,
) -> Path:
    """Write the global model as an ordinary model directory (``serve`` / ``evaluate`` load it
    like a centrally trained one) with ``train_state.json`` and ``federation.json``. ``sites``
    are the sites that trained (in at least one round), ``selected`` those chosen at the start.
    A model directory already at ``out`` was refused before the first round
    (:func:`check_out_dir`) unless ``overwrite``: what it holds of another model is removed.
    ``resumed_after``: the rounds after which an interrupted run was resumed, and
    ``seconds_before`` the seconds its earlier runs took."""
    from inference.model_dir import load_model_dir, load_state_checked, save_model_dir
    from inference.networks import LatentDiffusionModel, build_model
    from inference.train.loops import _atomic_json, _record_stage, read_train_state
    from inference.unet_baseline import build_baseline_unet, save_baseline_dir

    out = Path(run.out)
    base: dict[str, Any] = {}
    _clear_replaced_model(run)
    if run.stage == "baseline":
        unet = build_baseline_unet(cfg)
        load_state_checked(unet, state, "global baseline weights")
        save_baseline_dir(unet, cfg, out, overwrite=True)
    elif run.stage == "autoencoder":
        assert latent_scale is not None
        model = build_model(cfg.replace(latent_scale=1.0))
        load_state_checked(model.autoencoder, state, "global autoencoder weights")
        final = LatentDiffusionModel(
            cfg.replace(latent_scale=latent_scale), model.autoencoder, model.unet
        )
        save_model_dir(final, out, overwrite=True)
    else:
        model = load_model_dir(run.stage1_dir).model
        load_state_checked(model.unet, state, "global diffusion weights")
        # the rounds keep no weight average (the server's average of the sites stands in its
        # place): model.yaml must not claim one
        model.config = model.config.with_training(ema_decay=0.0)
        save_model_dir(model, out, overwrite=True)
        base = read_train_state(run.stage1_dir)
    info = {
        "federated": True,
        "strategy": run.strategy,
        "proximal_mu": run.proximal_mu if run.strategy == "fedprox" else None,
        "rounds": run.num_server_rounds,
        "local_epochs": run.local_epochs,
        "epochs": run.num_server_rounds * run.local_epochs,
        "batch_size": run.batch_size,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "sites": sites,
        "train_losses": [r.global_train.get("train-loss") for r in history],
        "val_losses": [r.global_evaluate.get("eval-loss") for r in history],
        "seconds_this_run": round(seconds, 2),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if resumed_after:
        info["resumed_after_rounds"] = resumed_after
        info["seconds_all_runs"] = round(seconds_before + seconds, 2)
    if latent_scale is not None:
        info["latent_scale"] = latent_scale
    if run.stage == "diffusion":
        info["stage1"] = run.stage1_dir
    _record_stage(out, run.stage, info, base)
    _atomic_json(
        out / FEDERATION_JSON,
        {
            "run_config": run.as_flower_config(),
            "sites": sites,
            "sites_selected": sorted(selected if selected is not None else sites),
            "resumed_after_rounds": resumed_after or [],
            "rounds": [asdict(r) for r in history],
        },
    )
    return out


def _continues_stage1(run: RunConfig) -> bool:
    """The diffusion stage completing its own stage-1 directory (``--stage1-dir`` = ``--out``),
    the flow centralised training allows too."""
    return run.stage == "diffusion" and Path(run.stage1_dir).resolve() == Path(run.out).resolve()


def check_out_dir(run: RunConfig, *, holder: bool = False) -> None:
    """Refuse, before any round, to write over a model directory at ``out`` (centralised
    training's rule, :func:`inference.train.loops._check_out_dir`, plus an explicit
    ``overwrite``), to start a run over the checkpoint of an interrupted one without
    ``resume`` or ``overwrite``, and ``resume`` without a checkpoint. The federated model used
    to be written over whatever was there, leaving e.g. a UNet baseline's model.yaml beside
    another model's autoencoder and diffusion weights. Unless ``holder`` (the run that marked
    ``out``, :func:`claim_out_dir`, checking it again), also refuse an ``out`` that another run
    is writing: a second run used to be accepted until the first wrote its round-1
    checkpoint, and both then wrote one directory."""
    from inference.federated import checkpoint
    from inference.model_dir import MODEL_YAML, model_kind
    from inference.train.loops import read_train_state

    out = Path(run.out)
    if not holder:
        held = run_in_progress(run)
        if held is not None:
            marker = out / RUN_MARKER
            raise InferenceError(
                f"{out}: expected no other federated run writing there, found one in progress "
                f"({held}; marked by {marker}): wait for it to end or stop it, or choose another "
                f"--out; if no run is going on any more, remove {marker}"
            )
    interrupted = checkpoint.describe(run)
    if run.resume and interrupted is None:
        raise checkpoint.none_to_resume(run)
    if interrupted is not None and not run.resume and not run.overwrite:
        raise InferenceError(
            f"{out}: expected no interrupted federated {run.stage} run there, found its "
            f"checkpoint ({interrupted}): pass --resume to go on with it, or --overwrite to "
            "start again"
        )
    if run.overwrite or not (out / MODEL_YAML).is_file() or _continues_stage1(run):
        return
    try:
        found = f"a {model_kind(out)} model (model.yaml"
    except InferenceError as exc:
        found = f"a model.yaml that cannot be read ({exc}"
    try:
        stages = sorted(read_train_state(out).get("stages", {}))
        found += f"; train_state.json lists the stages {stages})"
    except InferenceError:
        found += ")"
    raise InferenceError(
        f"{out}: expected an empty directory for the federated {run.stage} model, found {found}; "
        "the run would overwrite it: choose another --out, or pass --overwrite to replace it"
    )


#: in ``out`` while a `federate run|simulate` writes there: who (pid, host, command, since
#: when, Flower's run ID), removed when the command ends
RUN_MARKER = "federated-run.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_in_progress(run: RunConfig) -> str | None:
    """Who is writing ``run``'s ``out`` ("``federate run`` pid P on H since T, Flower run
    R"), ``None`` when no run is. A marker left on this host by a process that is gone (a
    killed command) is removed, with a warning; one left by a `federate run` that could not
    stop its run holds until that run ends (its ServerApp removes it) or it is removed."""
    path = Path(run.out) / RUN_MARKER
    data = _read_marker(path)
    if data is None:
        return None
    pid, host = data.get("pid"), data.get("host")
    command = f"`glioforecast federate {data.get('command', '?')}`"
    who = f"{command} pid {pid} on {host} since {data.get('started', '?')}"
    if data.get("continues"):
        return (
            f"Flower run {data.get('run_id')}, which its {command} (pid {pid} on {host}) could "
            f"not stop: it goes on at the SuperLink (`flwr stop {data.get('run_id')}` stops it)"
        )
    if data.get("run_id"):
        who += f", Flower run {data['run_id']}"
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        log.warning("%s: removing the mark of a run that ended without removing it (%s)",
                    path, who)  # fmt: skip
        path.unlink(missing_ok=True)
        return None
    return who


def claim_out_dir(run: RunConfig, command: str) -> bool:
    """Mark ``run``'s ``out`` as in use by this process (:data:`RUN_MARKER`, created
    atomically: of two commands started together one gets it and the other is refused as
    :func:`check_out_dir` refuses). ``False`` when ``out`` cannot be written here (a warning:
    a second run with it is then not refused)."""
    out = Path(run.out)
    marker = out / RUN_MARKER
    created = not out.exists()
    data = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "created_out": created,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_MARKER}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        try:
            os.link(tmp, marker)  # fails when the marker exists: no other run can slip in
        finally:
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        check_out_dir(run)  # a marker of a process gone is removed there; then try again
        return claim_out_dir(run, command)
    except OSError as exc:
        log.warning("%s: cannot mark it as in use by this run (%s): a second run with this "
                    "--out is not refused", out, exc)  # fmt: skip
        return False
    return True


def update_out_dir_claim(run: RunConfig, **fields: Any) -> None:
    """Add ``fields`` (the run ID, ``continues``) to this process's mark on ``out``."""
    marker = Path(run.out) / RUN_MARKER
    data = _read_marker(marker)
    if not data or data.get("pid") != os.getpid() or data.get("host") != socket.gethostname():
        return
    tmp = marker.with_name(f".{RUN_MARKER}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({**data, **fields}, indent=2), encoding="utf-8")
        tmp.replace(marker)
    except OSError as exc:
        log.warning("%s: cannot update it (%s)", marker, exc)


def release_out_dir(run: RunConfig) -> None:
    """Remove this process's mark on ``out`` (not one saying that its run goes on), and
    ``out`` itself when the claim created it and nothing was written there."""
    out = Path(run.out)
    marker = out / RUN_MARKER
    data = _read_marker(marker)
    if not data or data.get("pid") != os.getpid() or data.get("host") != socket.gethostname():
        return
    if data.get("continues"):
        return
    marker.unlink(missing_ok=True)
    if data.get("created_out"):
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty


def release_abandoned_out_dir(run: RunConfig) -> None:
    """The run finished: remove a mark on ``out`` that says it went on after its `federate
    run` could not stop it."""
    marker = Path(run.out) / RUN_MARKER
    data = _read_marker(marker)
    if data and data.get("continues"):
        marker.unlink(missing_ok=True)


def _clear_replaced_model(run: RunConfig) -> None:
    """With ``overwrite``, remove what the model directory at ``out`` holds of the model being
    replaced and the new one does not write: the other kind's weights (a UNet baseline's
    ``unet.safetensors`` beside a latent diffusion model's, or the reverse) and a model card,
    which describes the replaced model."""
    from inference.model_dir import DEFAULT_WEIGHT_FILES, MODEL_CARD, MODEL_YAML
    from inference.unet_baseline import WEIGHTS_FILE

    out = Path(run.out)
    if not run.overwrite or not (out / MODEL_YAML).is_file() or _continues_stage1(run):
        return
    other = list(DEFAULT_WEIGHT_FILES.values()) if run.stage == "baseline" else [WEIGHTS_FILE]
    for name in [*other, MODEL_CARD]:
        path = out / name
        if path.is_file():
            log.warning("--overwrite: removing %s of the model replaced at %s", name, out)
            path.unlink()


def read_federation(model_dir: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (Path(model_dir) / FEDERATION_JSON).read_text(encoding="utf-8")
    )
    return data


client_app = make_client_app()
server_app = make_server_app()
