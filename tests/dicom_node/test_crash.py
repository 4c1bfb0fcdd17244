"""Crash test: ``glioforecast serve`` is SIGKILLed at random moments while storescu sends.

After the last restart, every instance that storescu saw acknowledged must be on disk,
byte-identical in its dataset, and in exactly one current (not superseded) job.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import yaml

from dicom_node.jobs import SUPERSEDED, JobStore
from dicom_node.ports import free_port
from tests import factories
from tests.conftest import REPO, tool, wait_for

KILLS = 6
SEED = 20261121


def _config(
    tmp_path: Path, quiet_period_s: float, required: list[str] | None = None
) -> tuple[int, Path, Path]:
    """The embedded default on a free port, the data in ``tmp_path``: (port, data folder,
    configuration file)."""
    port, data_dir, config = free_port(), tmp_path / "data", tmp_path / "node.yaml"
    base = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    base["node"]["port"] = port
    base["health"]["port"] = 0
    base["storage"]["data_dir"] = str(data_dir)
    base["assembly"] = {"quiet_period_s": quiet_period_s, "poll_interval_s": 0.1}
    if required is not None:
        base["roles"]["required"] = required
    config.write_text(yaml.safe_dump(base))
    return port, data_dir, config


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )


def _listening(port: int) -> bool:
    result = subprocess.run(
        [tool("echoscu"), "-aec", "GLIOFORECAST", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=30,
    )
    return result.returncode == 0


def _acknowledged(storescu_output: str) -> set[str]:
    """Files storescu saw answered with Success (it logs each file, then its response)."""
    acked, current = set(), None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: ") :].strip()
        elif "Received Store Response (Success)" in line and current:
            acked.add(current)
            current = None
    return acked


def _storescu(port: int, files: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [tool("storescu"), "-v", "-aet", "SCANNER1", "-aec", "GLIOFORECAST", "127.0.0.1",
         str(port), *files],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip


def test_sigkill_during_ingest_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    files: list[str] = []
    for p in range(2):  # two patients, three MR series each: 300 instances
        study_uid, frame_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for n, desc in enumerate(("AX T1 POST GD", "AX T2 FLAIR", "AX T2")):
            files += map(
                str,
                factories.mr_series(
                    tmp_path / "in" / f"p{p}" / desc.replace(" ", "_"),
                    desc,
                    study_uid=study_uid,
                    frame_uid=frame_uid,
                    slices=50,
                    size=64,
                    series_number=n + 1,
                    contrast="GD" in desc,
                ),
            )
    port, data_dir, config = _config(tmp_path, quiet_period_s=0.5, required=["t1c"])
    log = tmp_path / "serve.log"

    acked: set[str] = set()
    remaining = list(files)
    kills = 0
    per_round: list[int] = []  # instances acknowledged so far, after each kill
    while kills < KILLS and remaining:
        server = _serve(config, log)
        wait_for(lambda: _listening(port), timeout=60, what="the node to listen")
        sender = _storescu(port, remaining)
        time.sleep(rng.uniform(0.05, 0.6))  # a random moment during the transfer
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        kills += 1
        out, _ = sender.communicate(timeout=120)
        acked |= _acknowledged(out)
        per_round.append(len(acked))
        remaining = [f for f in files if f not in acked]

    # last restart: the node recovers and the rest of the study arrives
    server = _serve(config, log)
    try:
        wait_for(lambda: _listening(port), timeout=60, what="the node to listen")
        if remaining:
            sender = _storescu(port, remaining)
            out, _ = sender.communicate(timeout=300)
            acked |= _acknowledged(out)
        assert acked == set(files)
        store = JobStore(data_dir / "jobs.sqlite3")

        def settled() -> bool:
            counts = store.counts()
            return counts["instances"] >= len(files) and not store.due_studies(time.time(), 0)

        wait_for(settled, timeout=60, what="all studies assembled")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0

    store = JobStore(data_dir / "jobs.sqlite3")
    db = store._conn
    found_on_disk = 0
    for path in files:
        ds = pydicom.dcmread(path)
        row = db.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,)
        ).fetchone()
        assert row is not None, f"acknowledged instance {path} is not recorded"
        stored = pydicom.dcmread(data_dir / "spool" / row[0])
        assert stored.PixelData == ds.PixelData
        found_on_disk += 1
        jobs = db.execute(
            "SELECT count(*) FROM job_instances ji JOIN jobs j ON j.id = ji.job_id "
            "WHERE ji.sop_instance_uid = ? AND j.state != ?",
            (ds.SOPInstanceUID, SUPERSEDED),
        ).fetchone()[0]
        assert jobs == 1, f"{path} is in {jobs} current jobs"
    assert not list((data_dir / "spool").glob("*/*/.*.part"))
    figures = {
        "kills": kills,
        "instances_sent": len(files),
        "acknowledged_after_each_kill": per_round,
        "acknowledged": len(acked),
        "found_on_disk_and_in_one_job": found_on_disk,
        "jobs": store.counts(),
    }
    print("crash-test figures:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))


def test_sigterm_during_ingest_aborts_the_sender_and_its_study_waits_for_the_rest(
    tmp_path: Path,
) -> None:
    """systemctl stop while a scanner sends: the node aborts the association (the scanner
    sends again) instead of answering 0x0110 (processing failure, which many senders do not
    retry) once its database had closed; after the restart the half study waits a quiet
    period for the rest rather than becoming a job that fails on the gap."""
    study = factories.small_study(tmp_path / "in", slices=60, size=64)
    files = [str(p) for paths in study.values() for p in paths]
    port, data_dir, config = _config(tmp_path, quiet_period_s=3.0)
    log = tmp_path / "serve.log"
    server = _serve(config, log)
    wait_for(lambda: _listening(port), timeout=60, what="the node to listen")
    sender = _storescu(port, files)
    wait_for(lambda: len(list(data_dir.rglob("*.dcm"))) >= 10, what="the first instances")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    out, _ = sender.communicate(timeout=60)
    acked = _acknowledged(out)
    assert 0 < len(acked) < len(files), out[-2000:]
    assert "0x0110" not in out and "0x110" not in out, out[-2000:]
    said = log.read_text()
    assert "not stored (0x0110)" not in said and "association(s) in progress aborted" in said

    time.sleep(3.5)  # the half study is older than the quiet period when the node is back
    server = _serve(config, log)
    try:
        wait_for(lambda: _listening(port), timeout=60, what="the node to listen again")
        rest = _storescu(port, [f for f in files if f not in acked])
        out, _ = rest.communicate(timeout=120)
        assert len(_acknowledged(out)) == len(files) - len(acked), out[-2000:]
        store = JobStore(data_dir / "jobs.sqlite3")
        wait_for(lambda: store.list_jobs() and not store.due_studies(time.time(), 0),
                 timeout=60, what="the study assembled")  # fmt: skip
        (job,) = store.list_jobs()  # one job, with the whole study
        assert job.instance_count == len(files)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
