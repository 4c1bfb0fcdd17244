"""How long `glioforecast backup` takes, on a data folder a running node filled itself.

    python -m bench.backup [--patients N] [--spacing MM] [--repeat R] [--no-write]

A node (in this process, no destination, a quiet period of an hour so that no job runs)
receives N synthetic patients by dcmtk ``storescu``; while it runs, its data folder is backed
up R times with and R times without the spool (``--without-spool``), each into a new folder on
the same disk. Writes the ``backup`` section of docs/BENCHMARKS.md (not with ``--no-write``):
instances, MiB, seconds (median, min, max).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cli import count, exit_with
from bench.report import update_section
from dicom_node.backup import backup
from dicom_node.service import Node
from dicom_node.settings import load_settings


def _filled_node(root: Path, patients: int, spacing: float) -> tuple[Node, threading.Thread, int]:
    from inference.synthetic.cohort import generate_patient

    s = load_settings(None)
    s = dataclasses.replace(
        s,
        node=dataclasses.replace(s.node, port=0),
        health=dataclasses.replace(s.health, enabled=False),
        storage=dataclasses.replace(s.storage, data_dir=root / "data"),
        # no job runs while the copies are made: the node only holds what it received
        assembly=dataclasses.replace(s.assembly, quiet_period_s=3600.0),
    )
    node = Node(s)
    node.start()
    thread = threading.Thread(target=node.run_forever, daemon=True)
    thread.start()
    sent = 0
    for index in range(patients):
        out = root / f"patient{index}"
        generate_patient(index, 2026, out, spacing_mm=spacing, formats=("dicom",))
        files = sorted(str(p) for p in out.glob("*/dicom/pre/**/*.dcm"))
        result = subprocess.run(
            ["/usr/bin/storescu", "-aec", "GLIOFORECAST", "127.0.0.1", str(node.scp.port), *files],
            capture_output=True, text=True, env={"TCP_NODELAY": "1"}, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"storescu failed: {result.stderr[-2000:]}")
        sent += len(files)
    return node, thread, sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=count, default=4)
    ap.add_argument("--spacing", type=float, default=2.0, help="synthetic grid, mm")
    ap.add_argument("--repeat", type=count, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        root = Path(tmp)
        node, thread, sent = _filled_node(root, args.patients, args.spacing)
        try:
            for spool in (True, False):
                times, report = [], None
                for n in range(args.repeat):
                    started = time.perf_counter()
                    report = backup(root / "data", root / f"copy-{spool}-{n}", spool=spool)
                    times.append(time.perf_counter() - started)
                assert report is not None
                mib = report.bytes / 2**20
                rows.append(
                    f"| {'with' if spool else 'without'} the spool | {report.spool_files} | "
                    f"{len(report.databases)} | {mib:.1f} | {statistics.median(times):.2f} "
                    f"({min(times):.2f}-{max(times):.2f}) | {mib / statistics.median(times):.0f} |"
                )
        finally:
            node.request_stop()
            thread.join(timeout=30)
            node.stop()
    command = shlex.join(["python", "-m", "bench.backup", *(argv or sys.argv[1:])])
    body = "\n".join(
        [
            f"{args.patients} synthetic patients at {args.spacing:g} mm ({sent} instances) "
            "received by a running node (dcmtk `storescu`; quiet period one hour, so no job "
            f"runs), then `glioforecast backup` of its data folder {args.repeat} times each way "
            "while it runs, into new folders on the same disk; the copy's files are fsynced before "
            "the command returns. CPU only.",
            "",
            "| backup | spool instances | databases | MiB copied | seconds, median (min-max) "
            "| MiB/s |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    if not args.no_write:
        update_section("backup", body, command)
    print(body)
    return 0


if __name__ == "__main__":
    exit_with(main)
