"""How long a node takes to stop, and what it costs while idle.

    python -m bench.lifecycle [--repeat R] [--idle-seconds S] [--no-write]

- stop: a node in this process (DICOM receiver, health endpoint and STOW-RS receiver on, no
  destination) is started, left 0.3 s, and timed through :meth:`Node.stop`, R times;
- idle CPU: ``glioforecast serve`` (the embedded default, a fresh data folder) is left 6 s to
  start, then its CPU time (user + system, from /proc) is read over S seconds with no client.

Writes the ``lifecycle`` section of docs/BENCHMARKS.md (not with ``--no-write``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import count, exit_with, seconds
from bench.report import update_section
from dicom_node.ports import free_port
from dicom_node.service import Node
from dicom_node.settings import WebClient, load_settings

REPO = Path(__file__).resolve().parents[1]


def _stop_seconds(root: Path) -> float:
    root.mkdir(parents=True)
    (root / "token").write_text("bench")
    s = load_settings(None)
    s = dataclasses.replace(
        s,
        node=dataclasses.replace(s.node, port=0),
        health=dataclasses.replace(s.health, port=0),
        storage=dataclasses.replace(s.storage, data_dir=root / "data"),
        stow=dataclasses.replace(s.stow, enabled=True, port=0,
                                 clients=(WebClient("BENCH", token_file=root / "token"),)),
    )  # fmt: skip
    node = Node(s)
    node.start()
    time.sleep(0.3)
    started = time.perf_counter()
    node.stop()
    return time.perf_counter() - started


def _idle_cpu_percent(root: Path, seconds: float) -> float:
    serve = [str(Path(sys.executable).parent / "glioforecast"), "serve", "--port",
             str(free_port()), "--data-dir", str(root / "idle")]  # fmt: skip
    proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(6)

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        time.sleep(seconds)
        return 100 * (cpu() - before) / seconds
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=count, default=5)
    ap.add_argument("--idle-seconds", type=seconds, default=20.0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        stops = [_stop_seconds(Path(tmp) / f"node{n}") for n in range(args.repeat)]
        idle = _idle_cpu_percent(Path(tmp), args.idle_seconds)
    body = (
        f"Node.stop() of a running node with the DICOM receiver, the health endpoint and the "
        f"STOW-RS receiver on, {args.repeat} times: median {statistics.median(stops):.3f} s "
        f"(min {min(stops):.3f}, max {max(stops):.3f}). Each listening server's loop is woken "
        "by shutting its listening socket down (`dicom_node.health.stop_serving`); before, it "
        "waited for socketserver's 0.5 s poll, each.\n\n"
        f"Idle CPU of `glioforecast serve` (embedded default, no client), over "
        f"{args.idle_seconds:g} s after a 6 s start: {idle:.2f} % of one core (user + system "
        "time from /proc). CPU only.\n"
    )
    command = "python -m bench.lifecycle " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.no_write:
        update_section("lifecycle", body, command.strip())
    print(body)
    return 0


if __name__ == "__main__":
    exit_with(main)
