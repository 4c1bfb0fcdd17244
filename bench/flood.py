"""A connection flood: idle TCP connections from one address while a sender at another stores.

What a port scanner, a load balancer's health checks or a router that leaks connections does to
the node. The flood opens ``--connections`` connections to the DICOM port from 127.0.0.2 and
sends nothing on them; meanwhile dcmtk ``storescu`` sends the series from 127.0.0.1 (the
sender the node should go on serving). Measured per receiver: the time to open the flood's
connections (a listen backlog that overflows makes TCP send the connection request again a
second later), the node's threads, file descriptors and CPU with the flood open, the store's time
before and during the flood and whether it succeeded, and the threads a few seconds after the
flood closed.

    python -m bench.flood [--connections N] [--series DIR] [--baseline-rev REV]

``--baseline-rev`` runs ``glioforecast serve`` as it was at an earlier commit too (extracted
with ``git archive``), with the same configuration: a before/after in one run.

Writes the ``connection flood`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cli import exit_with
from bench.ingest import (
    DEFAULT_SERIES,
    ENV,
    REPO,
    STORESCU,
    cpu_s,
    extract_revision,
    node_cmd,
    wait_listening,
)
from bench.report import update_section
from dicom_node.ports import free_port

FLOOD_FROM = "127.0.0.2"


def _threads_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    threads = int(next(line for line in status if line.startswith("Threads:")).split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def _store(port: int, files: list[Path]) -> tuple[float, bool]:
    start = time.perf_counter()
    out = subprocess.run(
        [STORESCU, "-aec", "GLIOFORECAST", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        env=ENV,
        timeout=600,
    )
    return time.perf_counter() - start, out.returncode == 0


def _flood(port: int, n: int) -> tuple[list[socket.socket], float]:
    socks = []
    start = time.perf_counter()
    for _ in range(n):
        sock = socket.socket()
        sock.bind((FLOOD_FROM, 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks, time.perf_counter() - start


@dataclass(frozen=True)
class Result:
    idle_threads: int
    opening_s: float  # opening the flood's connections
    threads: int  # the node's, the flood open
    fds: int
    cpu: float  # cores the node used with the flood open
    before_s: float  # the store before the flood
    during_s: float  # the store during it
    stored: bool  # whether that store succeeded
    threads_after: int  # 5 s after the flood closed

    def row(self, name: str) -> str:
        during = f"{self.during_s:.2f} s, {'stored' if self.stored else 'FAILED'}"
        return (
            f"| {name} | {self.opening_s:.1f} s | {self.threads} ({self.idle_threads} idle) | "
            f"{self.fds} | {100 * self.cpu:.0f} % | {self.before_s:.2f} s | {during} | "
            f"{self.threads_after} |"
        )


def measure(tree: Path, work: Path, files: list[Path], connections: int) -> Result:
    port = free_port()
    proc = subprocess.Popen(
        node_cmd(work, port), cwd=tree, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port)
        idle_threads, _ = _threads_and_fds(proc.pid)
        before, _ = _store(port, files)
        socks, opening = _flood(port, connections)
        try:
            threads, fds = _threads_and_fds(proc.pid)
            cpu = cpu_s(proc.pid)
            time.sleep(5)
            cpu = (cpu_s(proc.pid) - cpu) / 5
            during, stored = _store(port, files)
        finally:
            for sock in socks:
                sock.close()
        time.sleep(5)
        after, _ = _threads_and_fds(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return Result(idle_threads, opening, threads, fds, cpu, before, during, stored, after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES)
    parser.add_argument(
        "--baseline-rev", help="also measure `serve` as it was at this git revision (before)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.series.rglob("*.dcm") if p.is_file())
    if not files:
        print(f"no .dcm files under {args.series}", file=sys.stderr)
        return 2
    trees = [("glioforecast serve (this tree)", REPO)]
    baseline = None
    if args.baseline_rev:
        baseline = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
        trees.append((f"glioforecast serve at {args.baseline_rev} (before)", baseline))
        extract_revision(args.baseline_rev, baseline)
    rows = []
    try:
        for name, tree in trees:
            work = Path(tempfile.mkdtemp(prefix="bench-flood-"))
            try:
                result = measure(tree, work, files, args.connections)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(name, result, flush=True)
            rows.append(result.row(name))
    finally:
        if baseline is not None:
            shutil.rmtree(baseline, ignore_errors=True)
    size = sum(p.stat().st_size for p in files) / 1e6
    body = (
        f"{args.connections} idle TCP connections to the DICOM port from {FLOOD_FROM}, opened "
        f"one after the other, while dcmtk `storescu` sends {len(files)} instances ({size:.0f} "
        "MB, `TCP_NODELAY=1`) from 127.0.0.1; the node runs with its default limits "
        "(`node.max_connections` 100, `node.max_connections_per_host` 20 where the revision has "
        "them).\n\n"
        "| receiver | opening the flood | node threads, flood open | node file descriptors | "
        "node CPU, flood open (5 s, of one core) | store before | store during the flood | "
        "threads 5 s after |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )
    if not args.no_write:
        command = "python -m bench.flood " + " ".join(argv if argv is not None else sys.argv[1:])
        update_section("connection flood", body, command.strip())
    print(body)
    return 0


if __name__ == "__main__":
    exit_with(main)
