"""The benches' command lines: counts of 0 and a missing CUDA device refused by argparse,
``--no-write``, the project's errors as one line, and the temp folders removed (bench/cli.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bench import chaos, convert_series, e2e, federated, job_start, lifecycle, sampling
from bench.cli import exit_with
from dicom_node.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folders go to ``tmp_path``, so that a test sees what a bench left there."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("bench", "argv"),
    [
        (job_start, ["--repeat", "0"]),
        (convert_series, ["--repeats", "0"]),
        (e2e, ["--runs", "0"]),
        (lifecycle, ["--repeat", "0"]),
        (lifecycle, ["--idle-seconds", "0"]),
        (chaos, ["--kills", "0", "--no-write"]),
    ],
)
def test_a_count_or_duration_of_zero_is_refused_by_argparse(
    bench: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: expected " in err and "found 0" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("bench", [federated, sampling])
def test_cuda_without_a_device_is_refused_before_anything_runs(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--device", "cuda", "--no-write"] if bench is sampling else ["--device", "cuda"]
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, "--out", str(tmp_path / "out")] if bench is federated else argv)
    assert stop.value.code == 2
    assert "--device cuda: expected a CUDA device, torch finds none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_write_leaves_the_docs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []

    def record(name: str, *args: object, **kwargs: object) -> None:
        written.append(name)

    fakes: dict[ModuleType, dict[str, Callable[..., object]]] = {
        job_start: {"_starts": lambda ctx, repeat: [0.5] * repeat},
        lifecycle: {"_stop_seconds": lambda root: 0.01, "_idle_cpu_percent": lambda r, s: 0.1},
    }
    for bench, functions in fakes.items():
        monkeypatch.setattr(bench, "update_section", record)
        for name, fake in functions.items():
            monkeypatch.setattr(bench, name, fake)
    monkeypatch.setattr(job_start, "job_context", lambda settings: None)
    assert job_start.main(["--repeat", "1", "--no-write"]) == 0
    assert lifecycle.main(["--repeat", "1", "--idle-seconds", "1", "--no-write"]) == 0
    assert written == []
    assert job_start.main(["--repeat", "1"]) == 0
    assert lifecycle.main(["--repeat", "1", "--idle-seconds", "1"]) == 0
    assert written == ["job-start", "lifecycle"]


def test_a_project_error_ends_as_one_line_and_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def main() -> int:
        raise InputError("--method: expected one of ['a'], found 'b'")

    with pytest.raises(SystemExit) as stop:
        exit_with(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("error: --method: expected one of ['a'], found 'b'\n")
    assert "Traceback" not in err and err.count("\n") == 1


def test_sigterm_runs_the_cleanup_as_ctrl_c_does(tmp_path: Path) -> None:
    script = tmp_path / "bench_sigterm.py"
    script.write_text(
        textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from bench.cli import exit_with

            def main() -> int:
                try:
                    print("ready", flush=True)
                    time.sleep(60)
                finally:
                    Path({str(tmp_path / "cleaned")!r}).touch()
                return 0

            exit_with(main, stop_on_sigterm=True)
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert (tmp_path / "cleaned").exists()


def test_chaos_removes_its_temp_folder_on_failure_unless_kept(
    temp_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: object, root: Path, argv: object) -> int:
        (root / "node").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(chaos, "_chaos", fail)
    with pytest.raises(KeyboardInterrupt):
        chaos.main(["--kills", "1", "--no-write"])
    assert list(temp_root.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        chaos.main(["--kills", "1", "--no-write", "--keep"])
    (kept,) = temp_root.iterdir()
    assert (kept / "node").is_dir() and f"kept {kept}" in capsys.readouterr().err


def test_chaos_says_why_a_node_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that exited at its start (here a configuration it refuses), or never answered,
    kept chaos polling C-ECHO for ever, its output thrown away."""
    from dicom_node.ports import free_port

    config = tmp_path / "node.yaml"
    config.write_text("node:\n  port: not-a-port\n")
    cmd = [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"]
    log = tmp_path / "node.log"
    port = free_port()
    with pytest.raises(
        RuntimeError, match=f"did not answer C-ECHO on port {port} \\(it exited 2\\)"
    ) as e:
        chaos._start(cmd, port, log)
    assert "node.port" in str(e.value), str(e.value)  # the node's own words, from its log
    monkeypatch.setattr(chaos, "START_TIMEOUT_S", 1.0)
    silent = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    with pytest.raises(RuntimeError, match="within 1 s; its last lines:\n  loading"):
        chaos._start(silent, port, tmp_path / "silent.log")


def test_e2e_removes_its_temp_folder_on_failure(
    temp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(index: int, seed: int, out: Path, **kwargs: object) -> None:
        out.mkdir(parents=True)
        raise RuntimeError("generation failed")

    monkeypatch.setattr(e2e, "generate_patient", fail)
    with pytest.raises(RuntimeError, match="generation failed"):
        e2e.main(["--runs", "1", "--model", "none", "--no-write"])
    assert list(temp_root.iterdir()) == []
