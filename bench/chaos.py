"""Reliability under SIGKILL: the node is killed at random moments while it receives, predicts
and sends, then restarted, until every study has its results in the PACS.

    python -m bench.chaos [--kills K] [--seed S] [--keep] [--no-write]

K synthetic studies, K kills. A local Orthanc holds the source studies, as a hospital PACS
would. Each round starts ``glioforecast serve``, sends it every study again with dcmtk
``storescu`` (as a sender retries what failed), and kills the node with SIGKILL after a random
delay (``DELAY_S``), so kills land while it receives, waits for the quiet period, predicts or
sends; after the last kill the node is started once more, sent every study again, and runs
until all jobs are done and every result is acknowledged. The check, in Orthanc: each study
holds exactly one complete result set (five output series with the expected instance counts)
and nothing twice. Writes the ``reliability under SIGKILL`` section of docs/BENCHMARKS.md
(not with ``--no-write``). The temp folder (studies, node data, Orthanc) is removed at the end,
on failure and on Ctrl-C or SIGTERM too, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml

from bench.cli import count, exit_with
from bench.report import update_section
from dicom_node.jobs import DONE, FAILED, SUPERSEDED, JobStore
from dicom_node.local_pacs import OrthancServer
from dicom_node.outbox import Outbox
from dicom_node.outbox_cli import outbox_path
from dicom_node.ports import free_port
from inference.synthetic.cohort import generate_patient

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}
OUTPUT_KINDS = ("T1-Gd SC", "UNCERTAINTY SC", "SEG", "RTSTRUCT", "SR")
#: the range of the random delay, in seconds, from a node's start (listening) to its SIGKILL
DELAY_S = (0.5, 25.0)


def _storescu(port: int, aec: str, files: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["/usr/bin/storescu", "-aec", aec, "127.0.0.1", str(port), *files],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _listening(port: int) -> bool:
    return (
        subprocess.run(
            ["/usr/bin/echoscu", "-aec", "GLIOFORECAST", "127.0.0.1", str(port)],
            capture_output=True,
        ).returncode
        == 0
    )


#: how long a started node has to answer C-ECHO (it loads the model first)
START_TIMEOUT_S = 120.0


def _start(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """``glioforecast serve`` started and answering C-ECHO on ``port``, its output appended to
    ``log``; a RuntimeError with the log's last lines when it exits or stays silent (the bench
    waited forever)."""
    with log.open("ab") as out:
        node = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _listening(port):
        code = node.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                node.kill()
                node.wait(timeout=30)
            said = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"the node did not answer C-ECHO on port {port} "
                + (f"(it exited {code})" if code is not None else f"within {START_TIMEOUT_S:g} s")
                + "; its last lines:\n  "
                + "\n  ".join(said)
            )
        time.sleep(0.1)
    return node


def _phase(data: Path) -> str:
    """What the node was doing when it was killed (from its databases)."""
    db = data / "jobs.sqlite3"
    if not db.exists():
        return "receive"
    store = JobStore(db)
    try:
        counts = store.counts()
    finally:
        store.close()
    if counts["running"]:
        return "inference"
    if counts["queued"] or not (counts["done"] or counts["failed"]):
        return "receive"
    path = outbox_path(data)
    if path.exists():
        with Outbox(path) as outbox:
            states = outbox.counts().get("pacs", {})
        if set(states) - {"sent"}:
            return "send"
    return "idle"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kills", type=count, default=20, help="also the number of studies")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp folder (node data, Orthanc) to inspect"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    try:
        return _chaos(args, root, argv)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _chaos(args: argparse.Namespace, root: Path, argv: list[str] | None) -> int:
    rng = random.Random(args.seed)
    studies: dict[str, list[str]] = {}
    for i in range(args.kills):
        generate_patient(i, args.seed, root / "synthetic", spacing_mm=4.0, formats=("dicom",))
    for pre in sorted((root / "synthetic").glob("*/dicom/pre")):
        files = sorted(str(p) for p in pre.rglob("*.dcm"))
        studies[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = files
    every_file = [f for files in studies.values() for f in files]
    pacs = OrthancServer(root / "pacs").start()
    data = root / "node"
    port = free_port()
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"port": port},
        "storage": {"data_dir": str(data)},
        # long enough that a sender's retry after a restart lands in the same job version
        "assembly": {"quiet_period_s": 8},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.dicom_port}],
        "sending": {"retry_initial_s": 1, "retry_max_s": 5},
        "health": {"enabled": False},
        "logging": {"level": "WARNING"},
    }))  # fmt: skip
    cmd = [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"]
    log = root / "node.log"  # every start's output, for the error when one does not listen
    phases: list[str] = []
    started = time.monotonic()
    try:
        sent = _storescu(pacs.dicom_port, pacs.ae_title, every_file)
        sent.wait(timeout=300)
        source_instances = pacs.count_instances()
        for _ in range(args.kills):
            node = _start(cmd, port, log)
            sender = None
            try:
                sender = _storescu(port, "GLIOFORECAST", every_file)
                time.sleep(rng.uniform(*DELAY_S))
                phases.append(_phase(data))
            finally:  # the kill of the round, or of an interrupted one
                node.send_signal(signal.SIGKILL)
                node.wait(timeout=30)
                if sender is not None:
                    sender.wait(timeout=300)
        node = _start(cmd, port, log)
        try:
            _storescu(port, "GLIOFORECAST", every_file).wait(timeout=300)  # what a sender retries
            deadline = time.monotonic() + 900
            while _phase(data) != "idle" or len(_current_jobs(data)) < len(studies):
                if time.monotonic() > deadline:
                    raise RuntimeError("the node did not finish within 900 s after the last kill")
                time.sleep(1)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=120)
        result_sets, complete, extra = check(pacs, studies, data)
        outputs = pacs.count_instances() - source_instances
    finally:
        pacs.stop()
    counted = {p: phases.count(p) for p in ("receive", "inference", "send", "idle")}
    ok = complete == len(studies) and extra == 0
    body = (
        f"{len(studies)} synthetic studies (4 mm, {len(every_file)} instances), "
        f"{args.kills} SIGKILLs of `glioforecast serve` after random delays of "
        f"{DELAY_S[0]:g}-{DELAY_S[1]:g} s; each start, the one after the last kill too, is sent "
        "every study again with `storescu` (as a sender retries what failed); "
        f"quiet period 8 s; destination a local Orthanc. Seed {args.seed}; CPU only; predictor: "
        'the "no change" baseline.\n\n'
        "| what | value |\n| --- | --- |\n"
        f"| kills while receiving / predicting / sending / idle | {counted['receive']} / "
        f"{counted['inference']} / {counted['send']} / {counted['idle']} |\n"
        f"| studies with exactly one complete result set in the PACS | {complete} of "
        f"{len(studies)} |\n"
        f"| result sets found (all studies) | {result_sets} |\n"
        f"| output instances in the PACS | {outputs} |\n"
        f"| extra or incomplete output series | {extra} |\n"
        f"| wall time | {time.monotonic() - started:.0f} s |\n"
        f"\n{'Passed' if ok else 'FAILED'}: every study ends with exactly one complete result "
        "set.\n"
    )
    print(body)
    if not args.no_write:
        update_section(
            "reliability under SIGKILL",
            body,
            "python -m bench.chaos " + " ".join(argv or sys.argv[1:]),
        )
    return 0 if ok else 1


def _current_jobs(data: Path) -> list[object]:
    store = JobStore(data / "jobs.sqlite3")
    try:
        return [j for j in store.list_jobs(limit=1000) if j.state in (DONE, FAILED)]
    finally:
        store.close()


def check(pacs: OrthancServer, studies: dict[str, list[str]], data: Path) -> tuple[int, int, int]:
    """(result sets found, studies with exactly one complete set, extra or incomplete series)."""
    store = JobStore(data / "jobs.sqlite3")
    try:
        jobs = [j for j in store.list_jobs(limit=1000) if j.state != SUPERSEDED]
        t1c_counts = {
            j.study_instance_uid: next(
                s.series.instance_count for s in store.job_series(j.id) if s.role == "t1c"
            )
            for j in jobs
        }
    finally:
        store.close()
    result_sets = complete = extra = 0
    for study_uid in studies:
        series = pacs.series_of_study(study_uid).values()
        outputs = [
            s for s in series
            if str(s["MainDicomTags"].get("SeriesDescription", "")).startswith("SYNTHETIC")
        ]  # fmt: skip
        # the kind, less the " vN" of a study's later versions
        kinds = [
            re.sub(r" v\d+$", "", str(s["MainDicomTags"]["SeriesDescription"]).rsplit(" - ", 1)[1])
            for s in outputs
        ]
        sets = min(kinds.count(k) for k in OUTPUT_KINDS) if outputs else 0
        result_sets += sets
        expected = {
            "T1-Gd SC": t1c_counts.get(study_uid),
            "UNCERTAINTY SC": t1c_counts.get(study_uid),
            "SEG": 1,
            "RTSTRUCT": 1,
            "SR": 1,
        }
        counts_ok = all(
            len(s["Instances"]) == expected[k] for s, k in zip(outputs, kinds, strict=True)
        )
        if sorted(kinds) == sorted(OUTPUT_KINDS) and counts_ok:
            complete += 1
        else:
            extra += max(0, len(outputs) - len(OUTPUT_KINDS)) + (0 if counts_ok else 1)
    return result_sets, complete, extra


if __name__ == "__main__":
    exit_with(main, stop_on_sigterm=True)
