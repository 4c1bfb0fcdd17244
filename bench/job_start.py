"""How long a job process takes to start: a fresh interpreter per job (``spawn``, what the
worker did before) against a fork of the fork server that imported the job's modules once
(:func:`dicom_node.worker.job_context`).

    python -m bench.job_start [--repeat R] [--no-write]

Each start runs a child that imports what a job imports (already there in a fork of the fork
server) and answers on a pipe; timed from ``Process.start()`` to the answer, R times per way
after one start not counted (the fork server's own start, the file cache). No model directory
(the "no change" baseline's modules; a model adds torch). Writes the ``job-start`` section of
docs/BENCHMARKS.md (not with ``--no-write``).
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import shlex
import statistics
import sys
import time
from multiprocessing.connection import Connection

from bench.cli import count, exit_with
from bench.report import update_section
from dicom_node.settings import load_settings
from dicom_node.worker import JOB_MODULES, job_context


def _child(conn: Connection) -> None:
    for name in JOB_MODULES:  # what a job process needs before it can work
        importlib.import_module(name)
    conn.send(time.perf_counter())
    conn.close()


def _starts(ctx: multiprocessing.context.BaseContext, repeat: int) -> list[float]:
    seconds = []
    for n in range(repeat + 1):
        receiver, sender = ctx.Pipe(duplex=False)
        started = time.perf_counter()
        child = ctx.Process(target=_child, args=(sender,))  # type: ignore[attr-defined]
        child.start()
        sender.close()
        receiver.recv()
        took = time.perf_counter() - started
        child.join(30)
        receiver.close()
        if n:  # the first start warms the cache (and starts the fork server)
            seconds.append(took)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=count, default=10)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    spawn = _starts(multiprocessing.get_context("spawn"), args.repeat)
    forked = _starts(job_context(load_settings(None)), args.repeat)

    def line(name: str, values: list[float]) -> str:
        return (f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | "
                f"{max(values):.3f} |")  # fmt: skip

    body = (
        f"Start of a job process until it holds the job's modules and answers, {args.repeat} "
        "times each (no model directory; CPU only):\n\n"
        "| how | median s | min s | max s |\n| --- | --- | --- | --- |\n"
        + line("fresh interpreter per job (spawn, before)", spawn)
        + "\n"
        + line("fork of the preloaded fork server (now)", forked)
        + "\n\n"
        f"Saved per job: {statistics.median(spawn) - statistics.median(forked):.2f} s.\n"
    )
    command = "python -m bench.job_start " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.no_write:
        update_section("job-start", body, command.strip())
    print(body)
    return 0


if __name__ == "__main__":
    exit_with(main)
