"""`federate run` against a stand-in for Flower's `flwr` (a script that records its calls):
Ctrl-C and SIGTERM stop the run at the SuperLink (or say how to), a second run with the same
--out is refused while the first writes it, and a run whose log stream failed names the
checkpoint that --resume goes on from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from inference.federated.config import RunConfig

from .conftest import RUN_ID, fake_flwr_calls


def _wrapper(fake: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """`glioforecast federate run ARGS` in a session of its own (as from a terminal), its
    `flwr` the stand-in."""
    script = textwrap.dedent(f"""
        import sys
        from inference.federated import deploy
        deploy.flower_bin = lambda name: {str(fake)!r} if name == "flwr" else name
        from dicom_node.cli import main
        sys.exit(main(["federate", "run", *{args!r}]))
    """)
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[3], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _interrupt(
    fake: Path, tmp_path: Path, sig: int, env: dict[str, str], when: str = "following"
) -> tuple[int, str, Path]:
    """Start `federate run`, wait until it follows the run's log (``when="submitting"``: until
    it submits the run), send ``sig`` to its whole process group (what Ctrl-C in a terminal
    does); its return code, stderr and --out."""
    out = tmp_path / "model"
    args = ["--superlink", "fl:9092", "--insecure", "--out", str(out), "--rounds", "3"]
    event = fake.parent / ("calls.jsonl.following" if when == "following" else "calls.jsonl")
    proc = _wrapper(fake, args, env)
    try:
        deadline = time.monotonic() + 120
        while not event.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"federate run was never {when}"
            time.sleep(0.1)
        assert (out / "federated-run.json").is_file()  # --out is marked as in use
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err, out


def _stop_asked(fake: Path) -> bool:
    return ["stop", RUN_ID, "glioforecast"] in [c[:3] for c in fake_flwr_calls(fake)]


def test_ctrl_c_stops_the_run_at_the_superlink(fake_flwr: Path, tmp_path: Path) -> None:
    """Ctrl-C used to end only `flwr run --stream`'s log stream ("Exiting logstream"): the run
    went on at the SuperLink and wrote a complete model to --out minutes later."""
    rc, err, out = _interrupt(fake_flwr, tmp_path, signal.SIGINT, dict(os.environ))
    assert _stop_asked(fake_flwr), (fake_flwr_calls(fake_flwr), err)
    assert rc == 130, err
    assert (
        f"glioforecast federate run: interrupted (SIGINT): run {RUN_ID} stopped at the SuperLink"
        in err
    )
    assert "it had completed no round (no checkpoint)" in err
    # the mark on --out is gone with the run, and so is the folder it made for it
    assert not out.exists()


def test_a_signal_while_the_run_is_submitted_stops_it_once_it_has_an_id(
    fake_flwr: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "FAKE_SUBMIT_S": "3"}
    rc, err, _ = _interrupt(fake_flwr, tmp_path, signal.SIGTERM, env, when="submitting")
    assert rc == 143, err
    assert "SIGTERM: the run is stopped once the SuperLink has accepted it" in err
    assert [c[0] for c in fake_flwr_calls(fake_flwr)] == ["run", "stop"]  # never followed
    assert f"interrupted (SIGTERM): run {RUN_ID} stopped at the SuperLink" in err


def test_a_run_that_had_ended_is_not_reported_as_going_on(fake_flwr: Path, tmp_path: Path) -> None:
    """The signal came as the run ended: Flower's `flwr stop` answers "Run is already
    finished", and the run's result is reported as without a signal."""
    env = {**os.environ, "FAKE_STOP_FINISHED": "1"}
    rc, err, out = _interrupt(fake_flwr, tmp_path, signal.SIGINT, env)
    assert _stop_asked(fake_flwr)
    assert "goes on" not in err and "stopping run" not in err
    assert rc == 2 and f"expected the global model directory {out} with a federation.json" in err
    assert not out.exists()


def test_a_run_that_cannot_be_stopped_says_so_and_how_to_stop_it(
    fake_flwr: Path, tmp_path: Path
) -> None:
    from dicom_node.errors import InferenceError
    from inference.federated.app import check_out_dir, release_abandoned_out_dir

    env = {**os.environ, "FAKE_STOP_FAILS": "1"}
    rc, err, out = _interrupt(fake_flwr, tmp_path, signal.SIGTERM, env)
    assert _stop_asked(fake_flwr)
    assert rc == 143, err
    assert f"interrupted (SIGTERM), but stopping run {RUN_ID} failed (" in err
    assert f"Run {RUN_ID} couldn't be stopped." in err
    assert f"the run goes on at the SuperLink and writes its model to {out}; stop it with: " in err
    command = err.split("stop it with: ", 1)[1].strip()
    home = command.split()[0].removeprefix("FLWR_HOME=")
    assert command == f"FLWR_HOME={home} {fake_flwr} stop {RUN_ID} glioforecast"
    # the connection settings that command reads are kept
    assert (Path(home) / "config.toml").is_file()
    # --out stays marked: the run goes on writing it
    with pytest.raises(InferenceError) as refused:
        check_out_dir(RunConfig(out=str(out)))
    assert (
        f"found one in progress (Flower run {RUN_ID}, which its `glioforecast federate run` (pid "
    ) in str(refused.value)
    assert f"could not stop: it goes on at the SuperLink (`flwr stop {RUN_ID}` stops it)" in (
        str(refused.value)
    )
    # until that run finishes (its ServerApp removes the mark)
    release_abandoned_out_dir(RunConfig(out=str(out)))
    check_out_dir(RunConfig(out=str(out)))
    import shutil

    shutil.rmtree(Path(home).parent, ignore_errors=True)


def test_a_second_run_with_the_same_out_is_refused_while_the_first_writes_it(
    fake_flwr: Path, fed_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A second `federate run` with the same --out used to be accepted until the first wrote
    its round-1 checkpoint: two runs then wrote one model directory."""
    from dicom_node.cli import main
    from inference.federated.app import RUN_MARKER, claim_out_dir, release_out_dir

    out = tmp_path / "model"
    first = RunConfig(out=str(out))
    assert claim_out_dir(first, "run")  # the first run (this process, alive)
    args = ["federate", "run", "--superlink", "fl:9092", "--insecure", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"{out}: expected no other federated run writing there, found one in progress "
        f"(`glioforecast federate run` pid {os.getpid()} on "
    ) in err
    assert f"remove {out / RUN_MARKER}" in err
    assert fake_flwr_calls(fake_flwr) == []  # nothing was submitted
    simulate = ["federate", "simulate", "--data", str(fed_cohort), "--out", str(out)]
    assert main(simulate) == 2
    assert "expected no other federated run writing there" in capsys.readouterr().err
    release_out_dir(first)
    assert not out.exists()
    # the mark of a command that ended without removing it (killed) is not in the way
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    out.mkdir()
    (out / RUN_MARKER).write_text(
        json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "command": "run"})
    )
    import socket

    assert socket.gethostname() == os.uname().nodename
    monkeypatch.setenv("FAKE_LOG_S", "0")  # the run ends at once, writing no model
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "expected no other federated run" not in err
    assert "expected the global model directory" in err
    assert [c[0] for c in fake_flwr_calls(fake_flwr)] == ["run", "log"]
    assert "removing the mark of a run that ended without removing it" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_failed_log_stream_names_the_checkpoint_to_resume_from(
    fake_flwr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The SuperLink gone mid-run: `federate run` used to exit with Flower's message only,
    saying nothing of the checkpoint that --resume goes on from."""
    from dicom_node.cli import main
    from inference.federated import checkpoint

    monkeypatch.setenv("FAKE_LOG_RC", "1")
    out = tmp_path / "model"
    run = RunConfig(out=str(out), num_server_rounds=5)
    checkpoint.save(run, {}, 2, {"w": torch.zeros(2)}, [], ["SITE-NOR"], 1.0, [], None)
    args = ["federate", "run", "--superlink", "fl:9092", "--insecure", "--out", str(out),
            "--rounds", "5", "--resume"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"following run {RUN_ID} failed (exit 1; Flower's message above)" in err
    assert "; its checkpoint (after round 2 of 5, saved at " in err
    assert "lets --resume go on from there" in err
    assert not (out / "federated-run.json").exists()
