"""``glioforecast demo``: a synthetic study through the node to a local PACS and back.

1. make one synthetic glioblastoma patient (MR series + RTSTRUCT + RTDOSE, DICOM);
2. start a local PACS (Orthanc, from Debian's package) and store the source study in it, as a
   hospital PACS would already hold it;
3. start ``glioforecast serve`` on the embedded default plus one destination, the PACS (a
   separate process, as in production);
4. send the study to the node with a real DICOM client (dcmtk ``storescu`` when installed, else
   ours) and wait: the embedded default's 30 s quiet period, the job, the delivery;
5. check the results in the PACS (same study, new series), print the Structured Report's numbers
   and the job, and write a PNG montage (pre-treatment, prediction with outline, uncertainty).

Everything is written under ``--out`` (default ``./demo-output``), replaced at each run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dicom_node.errors import GlioforecastError
from dicom_node.local_pacs import OrthancServer, find_orthanc, free_port
from dicom_node.sender import collect_files, echo, send_files
from dicom_node.settings import load_settings

STORESCU = "/usr/bin/storescu"  # dcmtk's, not the pynetdicom script of the same name


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_study(out: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """One synthetic patient in DICOM: its pre-treatment study folder and its truth row."""
    from inference.synthetic.cohort import generate_patient

    record = generate_patient(0, seed, out, spacing_mm=2.0, formats=("dicom",))
    (pre,) = out.glob("*/dicom/pre")
    return pre, dict(record.values)


def _wait(condition: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise GlioforecastError(f"timed out after {timeout:g} s waiting for {what}")


def _send(files: list[Path], port: int, called: str) -> None:
    if Path(STORESCU).exists():
        result = subprocess.run(
            [STORESCU, "-aet", "DEMO_SCANNER", "-aec", called, "127.0.0.1", str(port),
             *map(str, files)],
            capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        if result.returncode != 0:
            raise GlioforecastError(f"storescu to {called} failed:\n{result.stderr[-2000:]}")
    else:
        report = send_files(files, "127.0.0.1", port, called, "DEMO_SCANNER")
        if report.failed:
            raise GlioforecastError(f"send to {called} failed: {report.failed[:3]}")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True
    )


def _listening(port: int, ae: str) -> bool:
    try:
        return echo("127.0.0.1", port, ae, "DEMO") == 0
    except GlioforecastError:
        return False


def _job(data_dir: Path) -> dict[str, Any] | None:
    listed = _cli("jobs", "list", "--json", "--data-dir", str(data_dir))
    jobs = json.loads(listed.stdout) if listed.returncode == 0 else []
    return dict(jobs[0]) if jobs and jobs[0]["state"] in ("done", "failed") else None


def _delivered(data_dir: Path) -> bool:
    listed = _cli("outbox", "list", "--json", "--data-dir", str(data_dir))
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    return bool(rows) and all(r["state"] == "sent" for r in rows)


def montage(pacs: OrthancServer, study_uid: str, sources: list[Path], path: Path) -> None:
    """Pre-treatment | prediction with outline | uncertainty, at the largest outline's slice."""
    from PIL import Image
    from pydicom import dcmread

    series = pacs.series_of_study(study_uid)

    def images(suffix: str) -> list[Any]:
        for s in series.values():
            if str(s["MainDicomTags"].get("SeriesDescription", "")).endswith(suffix):
                ids = s["Instances"]
                return [dcmread(io.BytesIO(pacs.raw(f"/instances/{i}/file"))) for i in ids]
        raise GlioforecastError(f"no series ending with {suffix!r} in the PACS")

    prediction = sorted(images("- T1-Gd SC"), key=lambda d: int(d.InstanceNumber))
    uncertainty = {int(d.InstanceNumber): d for d in images("- UNCERTAINTY SC")}

    def red(d: Any) -> int:  # pixels of the predicted tumour outline
        px = d.pixel_array
        return int(np.sum((px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)))

    best = max(prediction, key=red)  # the slice where the outline is longest
    source_uid = best.SourceImageSequence[0].ReferencedSOPInstanceUID
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sources}
    pre = dcmread(by_uid[source_uid]).pixel_array.astype(np.float32)
    lo, hi = np.percentile(pre, (0.5, 99.5))
    pre8 = np.clip((pre - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    pred = Image.fromarray(best.pixel_array)
    panels = [Image.fromarray(pre8).convert("RGB").resize(pred.size), pred]
    unc = uncertainty.get(int(best.InstanceNumber))
    if unc is not None:
        panels.append(Image.fromarray(unc.pixel_array).resize(pred.size))
    canvas = Image.new("RGB", (sum(p.width for p in panels), pred.height))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    canvas.save(path)


def run(out: Path, seed: int) -> int:
    settings = load_settings(None)  # the embedded default
    ae = settings.node.ae_title
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.monotonic()

    _say("making one synthetic glioblastoma patient (DICOM, 2 mm simulation grid)")
    study, truth = make_study(out / "synthetic", seed)
    files = collect_files([study])

    if find_orthanc() is None:
        raise GlioforecastError(
            "the demo needs a local PACS: install Debian's orthanc (scripts/bootstrap.sh does it "
            "as root)"
        )
    pacs = OrthancServer(out / "pacs").start()
    _say(f"local PACS: Orthanc {pacs.ae_title} on DICOM port {pacs.dicom_port}, {pacs.url}")
    node: subprocess.Popen[bytes] | None = None
    try:
        _send(files, pacs.dicom_port, pacs.ae_title)
        _say(f"source study stored in the PACS ({len(files)} instances)")

        data_dir = out / "node"
        config = out / "node.yaml"  # laid over the embedded default: destination, free ports
        config.write_text(yaml.safe_dump({"destinations": [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
             "port": pacs.dicom_port}], "health": {"port": free_port()}}))  # fmt: skip
        port = free_port()
        log = out / "node.log"
        _say(f"starting the node: {ae} on 127.0.0.1:{port}, results to the PACS (log: {log})")
        with log.open("wb") as fh:
            node = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve",
                 "--data-dir", str(data_dir), "--port", str(port)],
                stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait(lambda: _listening(port, ae), 60, "the node to answer C-ECHO", 0.2)
        sent_at = time.monotonic()
        _send(files, port, ae)
        quiet = settings.assembly.quiet_period_s
        _say(f"study sent to the node; it waits for a {quiet:g} s quiet period, then predicts")
        job = _wait(lambda: _job(data_dir), quiet + 300, "the job")
        if job["state"] != "done":
            raise GlioforecastError(f"job {job['id']} failed: {job['reason']}")
        _wait(lambda: _delivered(data_dir), 300, "the results to reach the PACS")
        _say(f"results acknowledged by the PACS {time.monotonic() - sent_at:.0f} s after sending")
        print(_cli("jobs", "show", str(job["id"]), "--data-dir", str(data_dir)).stdout, end="")

        from pydicom import dcmread

        from sr_writer.structured_report import read_summary

        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        series = pacs.series_of_study(study_uid)
        _say("the study in the PACS now holds:")
        for s in sorted(series.values(), key=lambda s: int(s["MainDicomTags"]["SeriesNumber"])):
            tags = s["MainDicomTags"]
            print(f"    {tags.get('Modality', ''):<9} {len(s['Instances']):>4}  "
                  f"{tags.get('SeriesDescription', '')}")  # fmt: skip
        (sr_series,) = [s for s in series.values() if s["MainDicomTags"].get("Modality") == "SR"]
        sr = dcmread(io.BytesIO(pacs.raw(f"/instances/{sr_series['Instances'][0]}/file")))
        numbers = read_summary(sr)
        _say("Structured Report, read back from the PACS:")
        print(f"    tumour volume now        {numbers['current_ml']:.1f} ml")
        print(f"    predicted volume         {numbers['predicted_mean_ml']:.1f} ml "
              f"(sd {numbers['predicted_sd_ml']:.1f})")  # fmt: skip
        print(f"    change                   {numbers['change_percent']:+.0f} %")
        print(f"    predicted response       {numbers['category']}")
        print(f"    synthetic truth          GTV {truth['gtv_ml']:.1f} ml, follow-up enhancing "
              f"{truth['post_enhancing_ml']:.1f} ml, {truth['response_category']}")  # fmt: skip
        picture = out / "montage.png"
        montage(pacs, study_uid, files, picture)
        _say(f"montage (pre-treatment | prediction | uncertainty): {picture}")
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=120)
        pacs.stop()
    _say(f"done in {time.monotonic() - started:.0f} s; everything is under {out}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="a synthetic study through the node to a local PACS (Orthanc) and back"
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="work folder")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic patient")
    p.set_defaults(func=lambda args: run(args.out, args.seed))
