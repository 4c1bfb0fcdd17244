"""A federated run stopped part-way goes on from its last completed round with ``--resume``:
the coordinator killed (SIGKILL of a real ``federate simulate`` process) and a run stopped
because too few sites were left. A fresh run refuses the checkpoint of an interrupted one, and
a resume refuses a checkpoint of other settings, naming what differs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from safetensors.torch import load_file

from dicom_node.errors import InferenceError
from inference.federated.checkpoint import checkpoint_dir
from inference.federated.config import RunConfig
from tests.inference.federated.conftest import SITES

if TYPE_CHECKING:
    from flwr.app import Message


def _simulate(cohort: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dicom_node.cli", "federate", "simulate", "--data", str(cohort),
        "--out", str(out), "--threads", "1", "--no-card-metrics", "--min-sites", "3", *extra,
    ]  # fmt: skip


def _state(out: Path) -> dict | None:
    path = out / "checkpoints" / "federated-baseline" / "state.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_a_killed_coordinator_resumes_to_the_weights_of_an_uninterrupted_run(
    fed_cohort: Path, tmp_path: Path
) -> None:
    rounds = ["--rounds", "4"]
    ref = tmp_path / "uninterrupted"
    done = subprocess.run(_simulate(fed_cohort, ref, *rounds), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (ref / "checkpoints").exists()  # a finished run leaves no checkpoint

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _simulate(fed_cohort, out, *rounds), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        while (state := _state(out)) is None or state["round"] < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no round-1 checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = _state(out)
    assert state is not None and 1 <= state["round"] < 4, state  # killed, not finished
    assert not (out / "model.yaml").exists()

    # a new run over it is refused, naming the checkpoint and the two ways on
    again = subprocess.run(_simulate(fed_cohort, out, *rounds), capture_output=True, text=True)
    assert again.returncode == 2
    assert f"found its checkpoint (after round {state['round']} of 4" in again.stderr
    assert "pass --resume to go on with it, or --overwrite to start again" in again.stderr

    resumed = subprocess.run(
        _simulate(fed_cohort, out, *rounds, "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {state['round']} of 4" in resumed.stderr
    a, b = load_file(ref / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a), "resumed weights differ"
    federation = json.loads((out / "federation.json").read_text())
    assert [r["round"] for r in federation["rounds"]] == [1, 2, 3, 4]
    assert federation["resumed_after_rounds"] == [state["round"]]
    reference = json.loads((ref / "federation.json").read_text())
    assert [r["global_train"] for r in federation["rounds"]] == [
        r["global_train"] for r in reference["rounds"]
    ]
    assert not (out / "checkpoints").exists()


def test_a_run_stopped_by_too_few_sites_resumes_and_a_resume_checks_its_settings(
    fed_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main
    from inference.federated.app import make_client_app, run_federation
    from inference.federated.simulation import LocalGrid

    class LeavingGrid(LocalGrid):
        """Node 3's SuperNode stops after round 2's training."""

        trained = 0

        def get_node_ids(self) -> Iterable[int]:
            return [n for n in self.contexts if self.trained < 3 or n != 3]

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            messages = list(messages)
            self.trained += any(m.metadata.message_type == "train" for m in messages)
            return super().push_messages(messages)

    out = tmp_path / "fed"
    run = RunConfig(out=str(out), sites=",".join(SITES), min_sites=3, num_server_rounds=3,
                    card_metrics=False)  # fmt: skip
    nodes = [{"data-path": str(fed_cohort), "site-name": s, "threads": 1} for s in SITES]
    with pytest.raises(InferenceError, match=r"expected replies from at least 3 site\(s\)"):
        run_federation(LeavingGrid(make_client_app(run), nodes, run.as_flower_config()), run)
    state = _state(out)
    assert state is not None and state["round"] == 2
    assert (checkpoint_dir(run) / state["weights"]).is_file()

    common = ["federate", "simulate", "--data", str(fed_cohort), "--out", str(out),
              "--sites", ",".join(SITES), "--min-sites", "3", "--no-card-metrics",
              "--threads", "1"]  # fmt: skip
    # another learning rate is another run: refused before any site is asked, naming it
    assert main([*common, "--rounds", "3", "--resume", "--learning-rate", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err
    assert "learning_rate: checkpoint has 0.001, this run 0.01" in err
    # fewer rounds than it has done
    assert main([*common, "--rounds", "1", "--resume"]) == 2
    assert "expected --rounds of at least 2 (the rounds the checkpoint has done), found 1" in (
        capsys.readouterr().err
    )
    # the rounds may be raised: the sites are back, the run goes on from round 3
    assert main([*common, "--rounds", "4", "--resume"]) == 0
    federation = json.loads((out / "federation.json").read_text())
    assert [r["round"] for r in federation["rounds"]] == [1, 2, 3, 4]
    assert [r["sites_trained"] for r in federation["rounds"]] == [sorted(SITES)] * 4
    assert federation["resumed_after_rounds"] == [2]
    info = json.loads((out / "train_state.json").read_text())["stages"]["baseline"]
    assert info["resumed_after_rounds"] == [2] and info["epochs"] == 4
    assert not checkpoint_dir(run).exists()
    # nothing is left to resume
    capsys.readouterr()
    assert main([*common, "--rounds", "4", "--resume", "--overwrite"]) == 2
    assert "expected the checkpoint of an interrupted federated baseline run" in (
        capsys.readouterr().err
    )
