"""An in-process simulation of a federation without Ray: :class:`LocalGrid` is a Flower
``Grid`` whose "sites" are ClientApp calls in this process, one message after another.

The ServerApp logic (:func:`inference.federated.app.run_federation`: site selection, Flower's
FedAvg/FedProx configure/aggregate, drop-out handling, the model directory) and the ClientApp
handlers are exactly those of a deployment; only the transport is missing (no SuperLink, no
serialisation over the network, no process per message). It is what ``glioforecast federate
simulate --engine local`` and ``python -m bench.federated`` run; ``--engine ray`` uses Flower's
own simulation runtime instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

_RUN_ID = 1
_SERVER_NODE_ID = 0


class LocalGrid(Grid):
    """A Grid whose nodes are ``client_app`` with one node config each, run in this process
    when a message is pushed; a handler's exception becomes an error reply, as in Flower."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        TaskIdentity.run_id = _RUN_ID
        TaskIdentity.node_id = _SERVER_NODE_ID
        TaskIdentity.task_id = _RUN_ID
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(
                run_id=_RUN_ID,
                node_id=i + 1,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, cfg in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ctx = self.contexts[msg.metadata.dst_node_id]
            TaskIdentity.node_id = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, ctx)
            except Exception as exc:  # a site's failure is an error reply, not a crash
                log.warning("site node %d failed: %s", msg.metadata.dst_node_id, exc)
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            finally:
                TaskIdentity.node_id = _SERVER_NODE_ID
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def simulate_local(
    run: Any, sites: Mapping[str, Sequence[str | Path]], threads: int = 0, device: str = "cpu"
) -> Path:
    """Run the federation ``run`` (a :class:`~inference.federated.config.RunConfig`) over
    ``sites`` (site name -> cohort folders) in this process, every site training on
    ``device``; the global model directory."""
    from inference.federated.app import make_client_app, run_federation

    nodes = [
        {"data-path": ",".join(str(Path(d).resolve()) for d in data), "site-name": name,
         "threads": threads, "device": device}
        for name, data in sites.items()
    ]  # fmt: skip
    grid = LocalGrid(make_client_app(run), nodes, run.as_flower_config())
    return run_federation(grid, run)
