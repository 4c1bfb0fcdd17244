"""What a site sends: the ClientApp's replies to query, train and evaluate messages hold the
weights of the trained network and a few named numbers, nothing else (no image, mask, patient
ID, table value or path)."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
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
from flwr.supercore.task_identity import TaskIdentity

from inference.data import read_cohort
from inference.federated.app import SiteFailure, client_app, initial_state
from inference.federated.config import RunConfig
from inference.federated.local import CARD_KEYS, encode_model_config, model_config_for
from inference.federated.simulation import LocalGrid

from .conftest import SITES

TRAIN_KEYS = {"train-loss", "train-loss-first-epoch", "num-examples"}
EVAL_KEYS = {"eval-loss", "num-examples", *CARD_KEYS, "latent-count", "latent-sum", "latent-sumsq"}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # what Flower's runtime sets in a ClientApp process before it handles a message
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _message(kind: str, run: RunConfig, state: dict[str, torch.Tensor], **extra: Any) -> Message:
    node = int(extra.pop("node", 7))
    model_kind, cfg = model_config_for(run)
    config = ConfigRecord(
        {
            "model-config": encode_model_config(model_kind, cfg), "stage": run.stage,
            "server-round": 1, "local-epochs": 1, "learning-rate": 1e-2, "batch-size": 1,
            "seed": 0, **extra,
        }
    )  # fmt: skip
    content = RecordDict({"arrays": ArrayRecord(state), "config": config})
    return Message(content=content, dst_node_id=node, message_type=kind)


def _context(cohort: Path, site: str) -> Context:
    node: dict[str, bool | float | int | str] = {
        "data-path": str(cohort),
        "site-name": site,
        "threads": 1,
    }
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _strings(reply: Message) -> list[str]:
    """Every string anywhere in the reply's records."""
    out: list[str] = []
    for record in reply.content.values():
        out += list(record.keys())
        if isinstance(record, ConfigRecord):
            out += [str(v) for v in record.values()]
    return out


def _forbidden(cohort: Path) -> list[str]:
    patients = read_cohort(cohort)
    return [str(cohort), *[p.patient_id for p in patients], *[str(p.folder) for p in patients]]


def test_train_reply_holds_weights_and_named_numbers_only(fed_cohort: Path) -> None:
    run = RunConfig(stage="baseline", preset="tiny")
    kind, cfg = model_config_for(run)
    state, _ = initial_state(run, kind, cfg)
    reply = client_app(_message(MessageType.TRAIN, run, state), _context(fed_cohort, SITES[0]))
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    sent = arrays.to_torch_state_dict()
    assert {k: tuple(v.shape) for k, v in sent.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    assert any(not torch.equal(sent[k], state[k]) for k in state), "expected trained weights"
    assert set(metrics.keys()) == TRAIN_KEYS
    assert metrics["num-examples"] == 1
    leaked = [s for s in _strings(reply) for f in _forbidden(fed_cohort) if f in s]
    assert leaked == []


def test_evaluate_reply_holds_metrics_only(fed_cohort: Path) -> None:
    run = RunConfig(stage="baseline", preset="tiny")
    kind, cfg = model_config_for(run)
    state, _ = initial_state(run, kind, cfg)
    msg = _message(MessageType.EVALUATE, run, state, **{"card-metrics": True})
    reply = client_app(msg, _context(fed_cohort, SITES[1]))
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"metrics"}
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    assert set(metrics.keys()) <= EVAL_KEYS
    assert {"eval-loss", "dice", "psnr_global"} <= set(metrics.keys())
    # the serialised reply carries no patient identifier or path
    blob = pickle.dumps({k: dict(v) for k, v in reply.content.items()})
    assert all(f.encode() not in blob for f in _forbidden(fed_cohort))


def test_query_reply_is_the_site_name_and_a_count(fed_cohort: Path) -> None:
    msg = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    reply = client_app(msg, _context(fed_cohort, SITES[2]))
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"info", "metrics"}
    assert dict(reply.content["info"]) == {"site": SITES[2]}
    assert dict(reply.content["metrics"]) == {"patients": 1}


def test_fedprox_keeps_the_update_near_the_global_weights(fed_cohort: Path) -> None:
    run = RunConfig(stage="baseline", preset="tiny")
    kind, cfg = model_config_for(run)
    state, _ = initial_state(run, kind, cfg)

    def distance(mu: float) -> float:
        msg = _message(MessageType.TRAIN, run, state, **{"proximal-mu": mu, "local-epochs": 3})
        reply = client_app(msg, _context(fed_cohort, SITES[0]))
        sent = reply.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
        return float(sum((sent[k] - state[k]).float().pow(2).sum() for k in state) ** 0.5)

    assert distance(50.0) < 0.8 * distance(0.0)


def _flower_error_reason(exc: BaseException) -> str:
    """The error reply's text as Flower's SuperNode makes it from a ClientApp's exception
    (``flwr/supernode/runtime/run_clientapp.py``): what the coordinator receives and the
    SuperLink stores in its database."""
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def test_a_site_without_its_patients_says_what_it_found_in_its_own_log_only(
    fed_cohort: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunConfig(stage="baseline", preset="tiny")
    kind, cfg = model_config_for(run)
    state, _ = initial_state(run, kind, cfg)
    # in a deployment, Flower turns the handler's exception into an error reply
    with caplog.at_level(logging.ERROR), pytest.raises(SiteFailure) as err:
        client_app(_message(MessageType.TRAIN, run, state), _context(fed_cohort, "SITE-XYZ"))
    assert str(err.value) == (
        "site SITE-XYZ: training failed (ConfigError); details in the SuperNode's log"
    )
    assert str(fed_cohort) not in _flower_error_reason(err.value)
    # the site's own log has the whole error: what it expected and what it found where
    assert "expected patients of 'SITE-XYZ'" in caplog.text and "SITE-NOR" in caplog.text
    assert str(fed_cohort) in caplog.text


def test_a_site_with_broken_data_sends_no_path_or_patient_id(
    fed_cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A site's failure used to reach the coordinator (and the SuperLink's database) as the
    exception's text: "site SITE-OST failed: <class 'dicom_node.errors.InputError'>:<'image
    /data/site-OST/GF00000-0006/nifti/post_t1c.nii.gz: expected a file, found none'>"."""
    broken = tmp_path / "site-OST-broken"
    shutil.copytree(fed_cohort, broken)
    (patient,) = [p for p in read_cohort(broken) if p.site == SITES[2]]
    (patient.folder / "post_t1c.nii.gz").unlink()
    run = RunConfig(stage="baseline", preset="tiny")
    kind, cfg = model_config_for(run)
    state, _ = initial_state(run, kind, cfg)
    messages = {
        "training": _message(MessageType.TRAIN, run, state),
        "evaluation": _message(MessageType.EVALUATE, run, state),
    }
    forbidden = [str(broken), patient.patient_id, "post_t1c"]
    for step, msg in messages.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR), pytest.raises(SiteFailure) as err:
            client_app(msg, _context(broken, SITES[2]))
        reason = _flower_error_reason(err.value)
        assert [f for f in forbidden if f in reason] == [], reason
        assert f"site {SITES[2]}: {step} failed (InputError); details in the SuperNode's log" in (
            reason
        )
        # the reply carries no cause either (its traceback is the SuperNode's log's only)
        assert err.value.__cause__ is None and err.value.__suppress_context__
        assert patient.patient_id in caplog.text and "post_t1c" in caplog.text
    # and the same through the in-process grid, whose error replies mirror Flower's
    grid = LocalGrid(client_app, [{"data-path": str(broken), "site-name": SITES[2]}])
    (msg_id,) = grid.push_messages([_message(MessageType.TRAIN, run, state, node=1)])
    (reply,) = grid.pull_messages([msg_id])
    assert reply.has_error()
    reason = str(reply.error.reason)
    assert [f for f in forbidden if f in reason] == [], reason
