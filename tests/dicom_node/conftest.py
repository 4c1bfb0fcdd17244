"""Fixtures that run a real node in-process on an ephemeral localhost port."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.ports import free_port
from dicom_node.service import Node
from dicom_node.settings import Destination, Settings, load_settings
from tests.conftest import start_listener, tool


def make_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """The embedded default with an ephemeral port, ``data_dir`` and section overrides."""
    s = load_settings(None)
    s = dataclasses.replace(
        s,
        node=dataclasses.replace(s.node, port=0),
        health=dataclasses.replace(s.health, port=0),
        storage=dataclasses.replace(s.storage, data_dir=data_dir),
        assembly=dataclasses.replace(s.assembly, quiet_period_s=0.3, poll_interval_s=0.05),
    )
    for name, values in sections.items():
        s = dataclasses.replace(s, **{name: dataclasses.replace(getattr(s, name), **values)})
    return s


@pytest.fixture
def run_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start a node (SCP + assembly loop) with overrides; stopped at the end of the test."""
    started: list[tuple[Node, threading.Thread]] = []

    def start(
        settings: Settings | None = None,
        load: Callable[[], Settings] | None = None,
        **sections: dict[str, Any],
    ) -> Node:
        """``load``: what a configuration reload reads (:meth:`Node.reload`)."""
        node = Node(settings or make_settings(tmp_path / "data", **sections), load)
        node.start()
        thread = threading.Thread(target=node.run_forever, daemon=True)
        thread.start()
        started.append((node, thread))
        return node

    yield start
    for node, thread in started:
        node.request_stop()
        thread.join(timeout=10)
        node.stop()


def finished_job(node: Node, study_uid: str, version: int):  # type: ignore[no-untyped-def]
    """Version ``version`` of the study's job once it is done or failed, else None."""
    from dicom_node.jobs import DONE, FAILED

    return next(
        (
            j
            for j in node.store.list_jobs()
            if j.study_instance_uid == study_uid
            and j.version == version
            and j.state in (DONE, FAILED)
        ),
        None,
    )


def settled_job(node: Node):  # type: ignore[no-untyped-def]
    """The newest job, once it is done or failed and no study waits for assembly (call it after
    the sender finished): a study that a stall of the sender split (the quiet period of
    :func:`make_settings` is 0.3 s) is judged by the job that has all of it."""
    import math

    from dicom_node.jobs import DONE, FAILED

    if node.store.due_studies(math.inf, 0.0):
        return None
    jobs = node.store.list_jobs()
    return jobs[0] if jobs and jobs[0].state in (DONE, FAILED) else None


def all_sent(node: Node, destination: str, timeout: float = 60) -> int:
    """How many results ``destination`` got, once every delivery to it is sent."""
    from tests.conftest import wait_for

    counts = wait_for(
        lambda: (c := node.outbox.counts().get(destination, {})) and set(c) == {"sent"} and c,
        timeout=timeout, what=f"every result at {destination}",
    )  # fmt: skip
    return int(counts["sent"])


def storescp_destination(folder: Path, name: str, ae_title: str, **settings: Any):  # type: ignore[no-untyped-def]
    """dcmtk storescp writing into ``folder``, and its destination entry."""
    folder.mkdir()
    port = free_port()
    proc = start_listener(
        [tool("storescp"), "-aet", ae_title, "-od", str(folder), str(port)], port,
        env={"TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    entry = Destination(name=name, ae_title=ae_title, host="127.0.0.1", port=port, **settings)
    return proc, entry
