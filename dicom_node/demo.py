"""``glioforecast demo``: a synthetic study through the node to a local PACS and back.

1. make one synthetic glioblastoma patient (MR series + RTSTRUCT + RTDOSE, DICOM);
2. start a local PACS and store the source study in it, as a hospital PACS would already hold
   it: Orthanc (Debian's package) when installed, otherwise an embedded storage SCP
   (:class:`~dicom_node.local_pacs.EmbeddedPacs`); ``--pacs`` forces one;
3. start ``glioforecast serve`` on the embedded default plus one destination, the PACS, with
   storage commitment (a separate process, as in production);
4. send the study to the node with a real DICOM client (dcmtk ``storescu`` when installed, else
   ours) and wait: the quiet period (30 s in the embedded default), the job, the delivery and
   the PACS's storage commitment report;
5. check the results in the PACS (same study, new series), print the Structured Report's numbers
   and the job, and write a PNG montage (pre-treatment, prediction with outline, uncertainty).

Everything is written under ``--out`` (default ``./demo-output``), replaced at each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import yaml
from pydicom.dataset import Dataset

from dicom_node.errors import GlioforecastError
from dicom_node.jobs import DONE, FAILED, JobStore
from dicom_node.local_pacs import (
    EmbeddedPacs,
    LocalPacs,
    OrthancServer,
    StoredSeries,
    find_orthanc,
    orthanc_candidates,
)
from dicom_node.outbox import Outbox
from dicom_node.outbox_cli import outbox_path
from dicom_node.ports import free_port
from dicom_node.scu import Destination
from dicom_node.sender import collect_files, echo, send_files
from dicom_node.settings import load_settings
from inference.bundled import model_option

STORESCU = "/usr/bin/storescu"  # dcmtk's, not the pynetdicom script of the same name
PACS_CHOICES = ("auto", "orthanc", "embedded")


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_study(out: Path, seed: int, spacing_mm: float = 2.0) -> tuple[Path, dict[str, Any]]:
    """One synthetic patient in DICOM: its pre-treatment study folder and its truth row."""
    from inference.synthetic.cohort import generate_patient

    record = generate_patient(0, seed, out, spacing_mm=spacing_mm, formats=("dicom",))
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


# The node's databases are read in this process (SQLite WAL: readers do not block the node);
# one `glioforecast jobs list` process per poll cost more CPU than the job on 2 cores.


def _job(data_dir: Path) -> Any:
    db = data_dir / "jobs.sqlite3"
    if not db.is_file():
        return None
    store = JobStore(db)
    try:
        jobs = store.list_jobs(limit=1)
    finally:
        store.close()
    return jobs[0] if jobs and jobs[0].state in (DONE, FAILED) else None


def _delivered(data_dir: Path) -> bool:
    path = outbox_path(data_dir)
    if not path.is_file():
        return False
    with Outbox(path) as outbox:
        states = {state for counts in outbox.counts().values() for state in counts}
    return states == {"sent"}


def choose_pacs(mode: str) -> str:
    """``orthanc`` or ``embedded`` for ``--pacs MODE``; a clear error when Orthanc is forced
    but missing."""
    if mode not in PACS_CHOICES:
        raise GlioforecastError(
            f"--pacs: expected one of {', '.join(PACS_CHOICES)}, found {mode!r}"
        )
    if mode == "embedded":
        return "embedded"
    if find_orthanc() is not None:
        return "orthanc"
    if mode == "auto":
        return "embedded"
    raise GlioforecastError(
        "--pacs orthanc: expected the Orthanc binary at "
        f"{' or '.join(orthanc_candidates())}, found none. Install Debian's orthanc package "
        "(scripts/bootstrap.sh does it as root), point $GLIOFORECAST_ORTHANC at the binary, or "
        "run with --pacs embedded (or auto) to use the embedded storage SCP"
    )


def _series(pacs: LocalPacs, study_uid: str, suffix: str) -> StoredSeries:
    for s in pacs.study_series(study_uid):
        if s.description.endswith(suffix):
            return s
    found = sorted(s.description for s in pacs.study_series(study_uid))
    raise GlioforecastError(
        f"expected a series whose description ends with {suffix!r} in the PACS, found {found}"
    )


def montage_slice(
    prediction: Sequence[npt.NDArray[np.uint8]], source_uids: Sequence[str], gtv: dict[str, float]
) -> tuple[int, str]:
    """The index of the slice to show: where the predicted tumour's outline (pure red on the
    T1-Gd SC) is longest or, when the prediction leaves no tumour on any slice, the slice whose
    source image carries the largest GTV contour (``gtv``: source SOP Instance UID -> contour
    area in mm^2), so that a prediction of "no tumour left" is shown where the tumour is now and
    not on an empty slice at the edge of the head; the middle slice when neither is known.
    Returns the index and which rule chose it: ``outline``, ``gtv`` or ``middle``."""

    def red(px: npt.NDArray[np.uint8]) -> int:
        return int(np.sum((px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)))

    outline = [red(px) for px in prediction]
    if max(outline, default=0) > 0:
        return int(np.argmax(outline)), "outline"
    areas = [gtv.get(uid, 0.0) for uid in source_uids]
    if max(areas, default=0.0) > 0:
        return int(np.argmax(areas)), "gtv"
    return len(prediction) // 2, "middle"


def gtv_contour_areas(headers: Iterable[Dataset], roi_name: str = "GTV") -> dict[str, float]:
    """Area (mm^2) of each planar contour of the ROI ``roi_name`` in the RT structure sets among
    ``headers``, by the SOP Instance UID of the image it references (contours without one are
    left out)."""
    areas: dict[str, float] = {}
    for ds in headers:
        if ds.get("Modality") != "RTSTRUCT":
            continue
        numbers = {
            int(r.ROINumber) for r in ds.get("StructureSetROISequence", []) if r.ROIName == roi_name
        }
        for roi in ds.get("ROIContourSequence", []):
            if int(roi.ReferencedROINumber) not in numbers:
                continue
            for c in roi.get("ContourSequence", []):
                refs = c.get("ContourImageSequence", [])
                if not refs:
                    continue
                xyz = np.asarray(c.ContourData, dtype=np.float64).reshape(-1, 3)
                x, y = xyz[:, 0], xyz[:, 1]  # axial contours
                area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
                uid = str(refs[0].ReferencedSOPInstanceUID)
                areas[uid] = areas.get(uid, 0.0) + area
    return areas


def montage(pacs: LocalPacs, study_uid: str, sources: list[Path], path: Path) -> str:
    """Pre-treatment | prediction with outline | uncertainty, at the slice of
    :func:`montage_slice`; returns which slice it is, in words."""
    from PIL import Image
    from pydicom import dcmread

    def images(suffix: str) -> list[Any]:
        return [pacs.read(i) for i in _series(pacs, study_uid, suffix).instances]

    prediction = sorted(images("- T1-Gd SC"), key=lambda d: int(d.InstanceNumber))
    uncertainty = {int(d.InstanceNumber): d for d in images("- UNCERTAINTY SC")}
    headers = {p: dcmread(p, stop_before_pixels=True) for p in sources}
    index, rule = montage_slice(
        [d.pixel_array for d in prediction],
        [str(d.SourceImageSequence[0].ReferencedSOPInstanceUID) for d in prediction],
        gtv_contour_areas(headers.values()),
    )
    best = prediction[index]
    source_uid = best.SourceImageSequence[0].ReferencedSOPInstanceUID
    by_uid = {str(ds.SOPInstanceUID): p for p, ds in headers.items()}
    pre = dcmread(by_uid[source_uid]).pixel_array.astype(np.float32)
    lo, hi = np.percentile(pre, (0.5, 99.5))
    pre8 = np.clip((pre - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    pred = Image.fromarray(best.pixel_array)
    panels = [Image.fromarray(pre8).convert("RGB").resize(pred.size), pred]
    unc = uncertainty.get(int(best.InstanceNumber))
    if unc is not None:
        panels.append(Image.fromarray(unc.pixel_array))  # its legend strip makes it taller
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    canvas.save(path)
    why = {
        "outline": "the predicted outline is longest there",
        "gtv": "the largest GTV contour (no tumour predicted on any slice)",
        "middle": "the middle slice (no outline and no GTV contour to go by)",
    }[rule]
    return f"{index + 1} of {len(prediction)}, {why}"


#: the file that marks a folder as a demo's output (the next demo may remove it)
DEMO_MARK = ".glioforecast-demo"
#: what a demo writes in its folder (a folder of only these, from a demo before the mark, is
#: one too)
DEMO_ENTRIES = frozenset({DEMO_MARK, "montage.png", "node", "node.log", "node.yaml", "pacs",
                          "synthetic"})  # fmt: skip


def clear_output(out: Path) -> None:
    """Remove the output of an earlier demo at ``out``; refuse anything else there (``--out
    .`` removed the checkout, ``--out ~`` the home folder)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise GlioforecastError(f"demo: --out {out}: expected a folder for the demo's output, "
                                "found a file")  # fmt: skip
    entries = {entry.name for entry in out.iterdir()}
    if entries and not (DEMO_MARK in entries or entries <= DEMO_ENTRIES):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise GlioforecastError(
            f"demo: --out {out}: expected an empty folder or an earlier demo's output (which it "
            f"replaces), found other files ({shown}); nothing was removed"
        )
    shutil.rmtree(out)


def run(
    out: Path,
    seed: int,
    pacs_mode: str = "auto",
    quiet_period_s: float | None = None,
    spacing_mm: float = 2.0,
    model: str = "bundled",
) -> int:
    """The demo; ``quiet_period_s`` overrides the embedded default's, ``spacing_mm`` is the
    simulation grid of the synthetic patient; ``model`` is ``bundled`` (the demo model shipped
    in the package), ``none`` (the "no change" baseline) or a model directory."""
    kind = choose_pacs(pacs_mode)  # before anything is made: a forced PACS may be missing
    model_dir = model_option(model)
    settings = load_settings(None)  # the embedded default
    ae = settings.node.ae_title
    quiet = settings.assembly.quiet_period_s if quiet_period_s is None else quiet_period_s
    clear_output(out)
    out.mkdir(parents=True)
    (out / DEMO_MARK).write_text("made by glioforecast demo: removed by the next demo\n")
    started = time.monotonic()

    _say(f"making one synthetic glioblastoma patient (DICOM, {spacing_mm:g} mm simulation grid)")
    study, truth = make_study(out / "synthetic", seed, spacing_mm)
    files = collect_files([study])

    pacs: LocalPacs
    if kind == "orthanc":
        pacs = OrthancServer(out / "pacs").start()
        why = f"found {find_orthanc()}"
    else:
        pacs = EmbeddedPacs(out / "pacs").start()
        why = (
            "forced by --pacs embedded"
            if pacs_mode == "embedded"
            else f"no Orthanc at {' or '.join(orthanc_candidates())}"
        )
    _say(f"local PACS: {pacs.kind} {pacs.describe()} ({why})")
    node: subprocess.Popen[bytes] | None = None
    try:
        _send(files, pacs.dicom_port, pacs.ae_title)
        _say(f"source study stored in the PACS ({len(files)} instances)")

        data_dir = out / "node"
        config = out / "node.yaml"  # laid over the embedded default: destination, free ports
        # the PACS commits to keeping the results (storage commitment): it reports to the node
        port = free_port()
        pacs.add_modality("glioforecast", Destination("glioforecast", ae, "127.0.0.1", port))
        layer: dict[str, Any] = {
            "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                              "port": pacs.dicom_port, "storage_commitment": True}],
            "health": {"port": free_port()},
        }  # fmt: skip
        if quiet_period_s is not None:
            layer["assembly"] = {"quiet_period_s": quiet_period_s}
        if model_dir is not None:
            layer["model"] = {"directory": str(model_dir)}
        _say(f"predictor: {model_dir or 'the no-change baseline'}")
        config.write_text(yaml.safe_dump(layer))
        log = out / "node.log"
        _say(f"starting the node: {ae} on 127.0.0.1:{port}, results to the PACS (log: {log})")
        with log.open("wb") as fh:
            node = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve",
                 "--data-dir", str(data_dir), "--port", str(port)],
                stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def answering() -> bool:
            if node.poll() is not None:  # a refused start (a model that does not load...)
                said = log.read_text(errors="replace").strip().splitlines()[-20:]
                raise GlioforecastError(
                    f"the node exited with status {node.returncode} before answering C-ECHO; "
                    f"its log ({log}) ends:\n" + "\n".join(said)
                )
            return _listening(port, ae)

        _wait(answering, 60, "the node to answer C-ECHO", 0.2)
        sent_at = time.monotonic()
        _send(files, port, ae)
        _say(f"study sent to the node; it waits for a {quiet:g} s quiet period, then predicts")
        job = _wait(lambda: _job(data_dir), quiet + 300, "the job")
        if job.state != DONE:
            raise GlioforecastError(f"job {job.id} failed: {job.reason}")
        _wait(lambda: _delivered(data_dir), 300, "the PACS to commit to keeping the results")
        _say(
            f"results stored and committed by the PACS (storage commitment) "
            f"{time.monotonic() - sent_at:.0f} s after sending"
        )
        print(_cli("jobs", "show", str(job.id), "--data-dir", str(data_dir)).stdout, end="")

        from pydicom import dcmread

        from sr_writer.structured_report import read_summary

        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        series = pacs.study_series(study_uid)
        _say("the study in the PACS now holds:")
        for s in sorted(series, key=lambda s: (s.series_number is None, s.series_number or 0)):
            print(f"    {s.modality:<9} {len(s.instances):>4}  {s.description}")
        (sr_series,) = [s for s in series if s.modality == "SR"]
        numbers = read_summary(pacs.read(sr_series.instances[0]))
        _say("Structured Report, read back from the PACS:")
        if numbers["gtv_ml"] is not None:
            print(f"    GTV (structure set)      {numbers['gtv_ml']:.1f} ml")
        print(f"    before treatment         {numbers['current_ml']:.1f} ml "
              f"({numbers['current_label']})")  # fmt: skip
        print(f"    predicted volume         {numbers['predicted_mean_ml']:.1f} ml "
              f"(sd {numbers['predicted_sd_ml']:.1f})")  # fmt: skip
        print(f"    outlined (SEG, RTSTRUCT) {numbers['segment_ml']:.1f} ml "
              "(where the samples agree)")  # fmt: skip
        print(f"    change                   {numbers['change_percent']:+.0f} %")
        print(f"    predicted response       {numbers['category']}")
        shares = cast(dict[str, float], numbers["probabilities"])
        print("    over the samples         "
              + ", ".join(f"{name} {value:.0f} %" for name, value in shares.items()))  # fmt: skip
        print(f"    survival scenario        {numbers['scenario']}")
        print(f"    synthetic truth          GTV {truth['gtv_ml']:.1f} ml, follow-up enhancing "
              f"{truth['post_enhancing_ml']:.1f} ml, {truth['response_category']}")  # fmt: skip
        picture = out / "montage.png"
        where = montage(pacs, study_uid, files, picture)
        _say(f"montage (pre-treatment | prediction | uncertainty): {picture}")
        _say(f"montage slice: {where}")
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=120)
        pacs.stop()
    _say(f"done in {time.monotonic() - started:.0f} s; everything is under {out}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="a synthetic study through the node to a local PACS and back"
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="work folder")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic patient")
    p.add_argument(
        "--pacs",
        choices=PACS_CHOICES,
        default="auto",
        help="local PACS: Orthanc, the embedded storage SCP, or auto (Orthanc when installed, "
        "else embedded; default)",
    )
    p.add_argument(
        "--quiet-period",
        type=_seconds,
        metavar="S",
        help="the node's quiet period in seconds (default: the embedded default's, 30)",
    )
    p.add_argument(
        "--model",
        default="bundled",
        metavar="DIR|bundled|none",
        help="the node's model: the demo model shipped in the package (default), a model "
        "directory, or none for the no-change baseline",
    )
    p.set_defaults(
        func=lambda args: run(
            args.out, args.seed, args.pacs, quiet_period_s=args.quiet_period, model=args.model
        )
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, found {text!r}")
    return value
