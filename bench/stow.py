"""How fast a study comes in by STOW-RS, next to the same study by C-STORE.

    python -m bench.stow [--spacing MM] [--runs N] [--no-write]

One synthetic patient's pre-treatment study (MR series, structure set, dose) is sent to a
fresh node (in this process, a quiet period of an hour so that no job runs, an empty data
folder each run) in three ways, each timed from the first byte sent to the last answer:

- dcmtk ``storescu``, one association (``TCP_NODELAY=1``);
- STOW-RS by the node's own client (:func:`dicom_node.dicomweb.stow_batch`: requests of at
  most 50 instances, a bearer token);
- STOW-RS in one request holding the whole study.

Every instance is durable and recorded before it is answered, whichever way it came. Writes
the ``stow`` section of docs/BENCHMARKS.md (not with ``--no-write``).
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
from collections.abc import Callable
from pathlib import Path

import pydicom

from bench.cli import count, exit_with
from bench.report import tool_version, update_section
from dicom_node.dicomweb import stow_batch
from dicom_node.scu import Destination
from dicom_node.service import Node
from dicom_node.settings import Destination as DestinationSettings
from dicom_node.settings import DicomWebSettings, WebClient, load_settings

TOKEN = "bench-token"


def _node(root: Path) -> tuple[Node, threading.Thread]:
    (root / "token").write_text(TOKEN)
    s = load_settings(None)
    client = WebClient(name="BENCH", token_file=root / "token")
    s = dataclasses.replace(
        s,
        node=dataclasses.replace(s.node, port=0),
        health=dataclasses.replace(s.health, enabled=False),
        storage=dataclasses.replace(s.storage, data_dir=root / "data"),
        assembly=dataclasses.replace(s.assembly, quiet_period_s=3600.0),
        stow=dataclasses.replace(s.stow, enabled=True, port=0, clients=(client,)),
    )
    node = Node(s)
    node.start()
    thread = threading.Thread(target=node.run_forever, daemon=True)
    thread.start()
    return node, thread


def _storescu(node: Node, files: list[Path]) -> None:
    result = subprocess.run(
        ["/usr/bin/storescu", "-aec", "GLIOFORECAST", "127.0.0.1", str(node.scp.port),
         *map(str, files)],
        capture_output=True, text=True, env={"TCP_NODELAY": "1"}, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"storescu failed: {result.stderr[-2000:]}")


def _stow(chunk: int) -> Callable[[Node, list[Path]], None]:
    def send(node: Node, files: list[Path]) -> None:
        assert node.stow is not None
        token = node.settings.stow.clients[0].token_file
        web = DicomWebSettings(url=f"http://127.0.0.1:{node.stow.port}/dicom-web",
                               token_file=token)  # fmt: skip
        dest = Destination.from_settings(DestinationSettings(name="node", dicomweb=web))
        results = stow_batch([pydicom.dcmread(p) for p in files], dest, chunk=chunk)
        failed = [r for r in results if not r.delivered]
        if failed:
            raise SystemExit(f"STOW-RS failed: {failed[0].error}")

    return send


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spacing", type=float, default=2.0, help="synthetic grid, mm")
    ap.add_argument("--runs", type=count, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    from inference.synthetic.cohort import generate_patient

    ways: list[tuple[str, Callable[[Node, list[Path]], None]]] = [
        ("dcmtk storescu, C-STORE, one association", _storescu),
        ("STOW-RS, the node's client, 50 instances per request", _stow(50)),
        ("STOW-RS, the whole study in one request", _stow(10**6)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in ways}
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        root = Path(tmp)
        generate_patient(0, 2026, root / "patient", spacing_mm=args.spacing, formats=("dicom",))
        files = sorted((root / "patient").glob("*/dicom/pre/**/*.dcm"))
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        for run in range(args.runs + 1):  # the first run warms up and is not counted
            for name, send in ways:
                folder = root / f"run-{run}-{len(times[name])}-{ways.index((name, send))}"
                folder.mkdir()
                node, thread = _node(folder)
                try:
                    started = time.perf_counter()
                    send(node, files)
                    elapsed = time.perf_counter() - started
                    stored = node.store.counts()["instances"]
                    if stored != len(files):
                        raise SystemExit(f"{name}: {stored} of {len(files)} instances stored")
                finally:
                    node.request_stop()
                    thread.join(timeout=10)
                    node.stop()
                if run:
                    times[name].append(elapsed)
    rows = [
        "| how | median s | min s | max s | instances/s | MB/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(
            f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | "
            f"{len(files) / median:.0f} | {megabytes / median:.1f} |"
        )
    body = (
        f"One synthetic patient's pre-treatment study at {args.spacing:g} mm ({len(files)} "
        f"instances, {megabytes:.1f} MB: MR series, structure set, dose) sent to a fresh node "
        f"over loopback, {args.runs} runs after one warm-up, each from the first byte sent to "
        "the last answer; every instance is durable (fdatasync, rename, folder fsync) and "
        "recorded before it is answered, whichever way it came. STOW-RS over http (no TLS), "
        "bearer token; the STOW-RS client reads and encodes the files with pydicom in the "
        "node's process, on the same cores, and that time is in its rows. dcmtk: "
        f"{tool_version(['/usr/bin/storescu', '--version'])}. CPU only.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    command = "python -m bench.stow " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.no_write:
        update_section("stow", body, command.strip())
    print(body)
    return 0


if __name__ == "__main__":
    exit_with(main)
