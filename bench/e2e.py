"""End-to-end latency and peak memory: a synthetic study through the node to Orthanc.

    python -m bench.e2e [--spacing MM] [--runs N] [--quiet-period S] [--model DIR|bundled|none]
                        [--storage-commitment] [--no-write]

Each run: a fresh node (``glioforecast serve``) with a local Orthanc as its destination,
dcmtk ``storescu`` sends one synthetic pre-treatment study, and the clock runs from the moment
the last instance is acknowledged by the node to the moment every result is acknowledged by the
PACS (the outbox says ``sent`` for all). With ``--storage-commitment`` the destination has
``storage_commitment: true`` (Orthanc knows the node as a modality) and the clock also gives the
moment Orthanc's report committed every result. The quiet period is part of that time by design; the
table gives it separately. Peak memory is the largest resident set (VmHWM) of the node process
and of each job process, sampled from /proc while they run. Writes the ``end-to-end`` section
of docs/BENCHMARKS.md (not with ``--no-write``). The temp folder (study, node data, Orthanc) is
removed at the end, on failure and on Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from pydicom import dcmread

from bench.cli import count, exit_with
from bench.report import update_section
from dicom_node.local_pacs import OrthancServer
from dicom_node.outbox import Outbox
from dicom_node.outbox_cli import outbox_path
from dicom_node.ports import free_port
from dicom_node.scu import Destination
from inference.bundled import model_option
from inference.model_dir import read_model_yaml
from inference.synthetic.cohort import generate_patient

REPO = Path(__file__).resolve().parents[1]
STORESCU = "/usr/bin/storescu"


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid``: its children, theirs... (parents read from /proc/*/stat). The
    job processes are the node's grandchildren: the fork server between them."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # field 4 (ppid) follows the command name, which is in parentheses
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, below = [], [pid]
    while below:
        children = [p for p, parent in parents.items() if parent in below]
        found += children
        below = children
    return found


class MemoryWatch:
    """Samples the peak RSS of a process and of those below it (the job processes, and the
    fork server that starts them, whose own peak is far below a job's) until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.node_kib = 0
        self.job_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.node_kib = max(self.node_kib, _hwm_kib(self.pid))
            for child in _descendants(self.pid):
                self.job_kib = max(self.job_kib, _hwm_kib(child))
            time.sleep(0.05)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_run(
    study: Path, work: Path, quiet_s: float, model_dir: Path | None, commitment: bool = False
) -> dict[str, float]:
    files = sorted(str(p) for p in study.rglob("*.dcm"))
    port = free_port()
    pacs = OrthancServer(work / "pacs")
    if commitment:
        pacs.add_modality("glioforecast", Destination("glioforecast", "GLIOFORECAST", "127.0.0.1",
                                                      port))  # fmt: skip
    pacs.start()
    data = work / "node"
    config = work / "node.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"port": port},
        "storage": {"data_dir": str(data)},
        "assembly": {"quiet_period_s": quiet_s},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.dicom_port, "storage_commitment": commitment}],
        "health": {"enabled": False},
        "logging": {"level": "WARNING"},
        "model": {"directory": None if model_dir is None else str(model_dir)},
    }))  # fmt: skip
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {**os.environ, "TCP_NODELAY": "1"}
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(
            ["/usr/bin/echoscu", "-aec", "GLIOFORECAST", "127.0.0.1", str(port)],
            capture_output=True,
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the node did not start")
            time.sleep(0.1)
        with MemoryWatch(node.pid) as memory:
            subprocess.run(
                [STORESCU, "-aec", "GLIOFORECAST", "127.0.0.1", str(port), *files],
                check=True, capture_output=True, env=env,
            )  # fmt: skip
            received = time.monotonic()
            acknowledged = None
            while True:
                path = outbox_path(data)
                if path.exists():
                    with Outbox(path) as outbox:
                        states = outbox.counts().get("pacs", {})
                    if acknowledged is None and states and set(states) <= {"sent", "committing"}:
                        acknowledged = time.monotonic()
                    if states and set(states) == {"sent"}:
                        break
                if time.monotonic() - received > quiet_s + 900:
                    raise RuntimeError("results not delivered within the quiet period + 900 s")
                time.sleep(0.05)
            done = time.monotonic()
        return {
            "instances": len(files),
            "results": float(sum(states.values())),
            "latency_s": (acknowledged or done) - received,
            "committed_s": done - received,
            "node_peak_mib": memory.node_kib / 1024,
            "job_peak_mib": memory.job_kib / 1024,
        }
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
        pacs.stop()


#: the peak memory target of the design: at most 4 GB RSS on CPU for a 256x256x180 study
MEMORY_TARGET_VOXELS = 256 * 256 * 180
MEMORY_TARGET_BYTES = 4 * 10**9
#: the share of the target's voxels from which a run is judged against it (the synthetic
#: study at 0.875 mm has 256x256x176 voxels: its slices are at least 1 mm)
MEMORY_JUDGED_SHARE = 0.95


def largest_mr_series(study: Path) -> tuple[int, int, int]:
    """Rows, columns and instances of the study's largest MR series."""
    sizes: dict[str, list[int]] = {}
    for path in study.rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        if ds.Modality == "MR":
            entry = sizes.setdefault(str(ds.SeriesInstanceUID), [int(ds.Rows), int(ds.Columns), 0])
            entry[2] += 1
    return max((tuple(v) for v in sizes.values()), key=lambda v: v[0] * v[1] * v[2])  # type: ignore[return-value]


def memory_verdict(rows: int, columns: int, slices: int, runs: list[dict[str, float]]) -> str:
    """The peak memory target, judged when the study is at least 256x256x180."""
    voxels = rows * columns * slices
    share = voxels / MEMORY_TARGET_VOXELS
    peak = max(r["node_peak_mib"] + r["job_peak_mib"] for r in runs) * 2**20
    size = (
        f"the largest MR series is {rows}x{columns}x{slices} ({voxels / 1e6:.1f} M voxels, "
        f"{100 * share:.1f} % of the target's)"
    )
    if share < MEMORY_JUDGED_SHARE:
        return (
            f"Peak memory target (<= 4 GB RSS for a 256x256x180 study): not judged here, {size}.\n"
        )
    return (
        f"Peak memory target (<= 4 GB RSS for a 256x256x180 study; {size}): the node and job "
        f"process peaks together are {peak / 1e9:.2f} GB, {100 * peak / MEMORY_TARGET_BYTES:.0f} "
        f"% of 4 GB: {'meets' if peak <= MEMORY_TARGET_BYTES else 'misses'}"
        + (" (on a study slightly smaller than the target's)" if share < 1 else "")
        + ".\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--spacing", type=float, default=2.0, help="synthetic grid spacing, mm")
    parser.add_argument("--runs", type=count, default=3)
    parser.add_argument("--quiet-period", type=float, default=30.0)
    parser.add_argument(
        "--model",
        default="bundled",
        help="the node's model: bundled (default), none (no-change baseline) or a directory",
    )
    parser.add_argument(
        "--storage-commitment",
        action="store_true",
        help="the destination does storage commitment: also time Orthanc's commitment",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    model_dir = model_option(args.model)
    predictor = (
        'the "no change" baseline'
        if model_dir is None
        else f"{read_model_yaml(model_dir)[0].name} (`{model_dir.name}`)"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        generate_patient(0, 11, root / "synthetic", spacing_mm=args.spacing, formats=("dicom",))
        (study,) = (root / "synthetic").glob("*/dicom/pre")
        rows, columns, slices = largest_mr_series(study)
        for i in range(args.runs):
            result = one_run(
                study, root / f"run{i}", args.quiet_period, model_dir, args.storage_commitment
            )
            print(json.dumps(result), file=sys.stderr)
            runs.append(result)
    lat = [r["latency_s"] for r in runs]
    med = statistics.median(lat)
    committed = [r["committed_s"] for r in runs]
    commitment_row = (
        f"| last instance acknowledged -> all {runs[0]['results']:.0f} results committed by "
        f"the PACS (its storage commitment report), s | {statistics.median(committed):.1f} | "
        f"{min(committed):.1f} | {max(committed):.1f} |\n"
        if args.storage_commitment
        else ""
    )
    body = (
        f"One synthetic patient (`generate_patient(0, 11, spacing_mm={args.spacing:g})`, "
        f"{runs[0]['instances']:.0f} instances: 4 MR series, RTSTRUCT, RTDOSE) sent by dcmtk "
        f"`storescu` to `glioforecast serve`, whose destination is a local Orthanc"
        f"{' with storage commitment' if args.storage_commitment else ''}; "
        f"{args.runs} runs, CPU only, predictor: {predictor}.\n\n"
        "| what | median | min | max |\n| --- | --- | --- | --- |\n"
        f"| last instance acknowledged -> all {runs[0]['results']:.0f} results acknowledged "
        f"by the PACS, s | {med:.1f} | {min(lat):.1f} | {max(lat):.1f} |\n"
        + commitment_row
        + f"| of which the quiet period, s | {args.quiet_period:g} | | |\n"
        f"| node process peak RSS, MiB | "
        f"{statistics.median(r['node_peak_mib'] for r in runs):.0f} | "
        f"{min(r['node_peak_mib'] for r in runs):.0f} | "
        f"{max(r['node_peak_mib'] for r in runs):.0f} |\n"
        f"| job process peak RSS, MiB | "
        f"{statistics.median(r['job_peak_mib'] for r in runs):.0f} | "
        f"{min(r['job_peak_mib'] for r in runs):.0f} | "
        f"{max(r['job_peak_mib'] for r in runs):.0f} |\n"
        f"\nTarget: quiet period + 90 s on CPU: "
        f"{'meets' if med - args.quiet_period <= 90 else 'misses'} "
        f"({med - args.quiet_period:.1f} s beyond the quiet period)."
        "\n" + memory_verdict(rows, columns, slices, runs)
    )
    print(body)
    if not args.no_write:
        update_section(
            f"end-to-end, {args.spacing:g} mm"
            + (", storage commitment" if args.storage_commitment else ""),
            body,
            "python -m bench.e2e " + " ".join(argv or sys.argv[1:]),
        )
    return 0


if __name__ == "__main__":
    exit_with(main, stop_on_sigterm=True)
