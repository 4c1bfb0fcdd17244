"""``glioforecast demo``: a synthetic study through the node, as a site would see it.

1. make one synthetic glioblastoma patient (MR series + RTSTRUCT + RTDOSE, DICOM);
2. start ``glioforecast serve`` on the embedded default (a separate process, as in production);
3. send the study with a real DICOM client (dcmtk ``storescu`` when installed, else ours);
4. wait for the study to become a job (the embedded default's 30 s quiet period);
5. show the job, its series and their roles; stop the node with SIGTERM.

Everything is written under ``--out`` (default ``./demo-output``), replaced at each run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dicom_node.errors import GlioforecastError
from dicom_node.sender import collect_files, echo, send_files
from dicom_node.settings import load_settings

STORESCU = "/usr/bin/storescu"  # dcmtk's, not the pynetdicom script of the same name


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_study(out: Path, seed: int) -> Path:
    """One synthetic patient in DICOM; returns the folder holding its pre-treatment study."""
    from inference.synthetic.cohort import generate_patient

    generate_patient(0, seed, out, spacing_mm=2.0, formats=("dicom",))
    (pre,) = out.glob("*/dicom/pre")
    return pre


def _wait_listening(port: int, ae_title: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GlioforecastError(f"the node exited at start-up; its log:\n{log.read_text()}")
        try:
            if echo("127.0.0.1", port, ae_title, "DEMO") == 0:
                return
        except GlioforecastError:
            time.sleep(0.2)
    raise GlioforecastError(f"the node did not answer C-ECHO on port {port} within 60 s")


def _send(study: Path, port: int, ae_title: str) -> None:
    files = collect_files([study])
    if Path(STORESCU).exists():
        _say(f"sending {len(files)} instances with dcmtk storescu")
        result = subprocess.run(
            [STORESCU, "-aet", "DEMO_SCANNER", "-aec", ae_title, "127.0.0.1", str(port),
             *map(str, files)],
            capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        if result.returncode != 0:
            raise GlioforecastError(f"storescu failed:\n{result.stderr}")
    else:
        _say(f"sending {len(files)} instances with glioforecast send (dcmtk not installed)")
        report = send_files(files, "127.0.0.1", port, ae_title, "DEMO_SCANNER")
        if report.failed:
            raise GlioforecastError(f"send failed: {report.failed[:3]}")


def run(out: Path, seed: int) -> int:
    settings = load_settings(None)  # the embedded default, always
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data_dir = out / "node"
    port = settings.node.port if _port_free(settings.node.port) else _free_port()
    ae = settings.node.ae_title

    _say("making one synthetic glioblastoma patient (DICOM)")
    study = make_study(out / "synthetic", seed)

    log = out / "node.log"
    cmd = [sys.executable, "-m", "dicom_node.cli", "serve", "--data-dir", str(data_dir),
           "--port", str(port)]  # fmt: skip
    _say(f"starting the node on the embedded default: {ae} on 127.0.0.1:{port} (log: {log})")
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, ae, proc, log)
        _send(study, port, ae)
        quiet = settings.assembly.quiet_period_s
        _say(f"study received; waiting for the {quiet:g} s quiet period before it becomes a job")
        job = _wait_for_job(data_dir, timeout=quiet + 60)
        _say(f"job {job['id']} created:")
        shown = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "jobs", "show", str(job["id"]),
             "--data-dir", str(data_dir)],
            capture_output=True, text=True,
        )  # fmt: skip
        print(shown.stdout, end="", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    _say(f"node stopped (exit {proc.returncode}); everything is under {out}")
    return 0 if job["state"] in ("queued", "done") else 1


def _wait_for_job(data_dir: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "jobs", "list", "--json",
             "--data-dir", str(data_dir)],
            capture_output=True, text=True,
        )  # fmt: skip
        jobs = json.loads(listed.stdout) if listed.returncode == 0 else []
        if jobs:
            return dict(jobs[0])
        time.sleep(1)
    raise GlioforecastError(f"no job appeared within {timeout:g} s; see the node log")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="send a synthetic study through the node on the embedded default"
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="work folder")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic patient")
    p.set_defaults(func=lambda args: run(args.out, args.seed))
