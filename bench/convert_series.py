"""Benchmark: MR series -> Volume (``load_series``) against dcm2niix on the same series.

Run: ``.venv/bin/python -m bench.convert_series [--repeats N] [--no-write]``

Both tools read the same files with a warm page cache; each is run ``N`` times, alternating, and
the median wall time is reported (minimum in brackets). ``load_series`` runs in this process (the
node is a long-running service); dcm2niix is a subprocess writing an uncompressed NIfTI to a
temporary folder (``-z n -b n``), which is its normal use. Target: ours <= 1.5x dcm2niix.
Multi-fragment JPEG series are timed against SimpleITK/GDCM, as this dcm2niix build cannot
decode them.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.cli import count, exit_with
from bench.report import tool_version, update_section
from dicom_node.convert.series import load_series

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

SERIES = {
    # name: (folder under the real-data folder, reference tool)
    "TCIA T1 SE, 40 x 512 x 512, implicit VR LE": (
        "tcia_sts001_mr_rtstruct/MR_T1/image",
        "dcm2niix",
    ),
    "TCIA T2 FS, 40 x 384 x 384, implicit VR LE": (
        "tcia_sts001_mr_rtstruct/MR_T2/image",
        "dcm2niix",
    ),
    "Siemens 3D T1, 96 x 128 x 128, JPEG lossless multi-fragment": (
        "dcmqa_frag_t1_jpegll_j2k/5001_jpeg_lossless",
        "gdcm",
    ),
    "Siemens 3D T1, 96 x 128 x 128, JPEG 2000 lossless multi-fragment": (
        "dcmqa_frag_t1_jpegll_j2k/6001_j2k_lossless",
        "gdcm",
    ),
}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _dcm2niix(folder: Path) -> Callable[[], object]:
    def run() -> None:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                ["/usr/bin/dcm2niix", "-z", "n", "-b", "n", "-f", "bench", "-o", out, str(folder)],
                check=True,
                capture_output=True,
            )
            if not list(Path(out).glob("*.nii")):
                raise RuntimeError(f"dcm2niix wrote nothing for {folder}")

    return run


def _gdcm(files: list[Path]) -> Callable[[], object]:
    import SimpleITK as sitk

    def run() -> None:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        reader.Execute()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=count, default=7)
    parser.add_argument("--no-write", action="store_true", help="print, do not update the docs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not REAL.is_dir():
        print(f"real data folder {REAL} is absent", file=sys.stderr)
        return 2
    rows = []
    for name, (rel, ref_kind) in SERIES.items():
        folder = REAL / rel
        files = sorted(folder.glob("*.dcm"))
        ours = lambda files=files: load_series(files)  # noqa: E731
        ref = _dcm2niix(folder) if ref_kind == "dcm2niix" else _gdcm(files)
        ours()  # warm-up: page cache, imports, decoder plugins
        ref()
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(_time(ours))
            t_ref.append(_time(ref))
        m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
        ratio = m_ours / m_ref
        ref_name = "dcm2niix" if ref_kind == "dcm2niix" else "SimpleITK/GDCM"
        verdict = (
            ("meets" if ratio <= 1.5 else "misses") + " <= 1.5x"
            if ref_kind == "dcm2niix"
            else ("information only")
        )
        rows.append(
            f"| {name} | {len(files)} | {m_ours * 1000:.0f} ({min(t_ours) * 1000:.0f}) | "
            f"{ref_name}: {m_ref * 1000:.0f} ({min(t_ref) * 1000:.0f}) | {ratio:.2f}x | {verdict} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "CPU only. `load_series` (pydicom 3 + pylibjpeg/openjpeg plugins, in-process) against "
            f"`{tool_version(['/usr/bin/dcm2niix', '-v'])}` (subprocess, uncompressed NIfTI to a "
            "temporary folder) on the same files, warm page cache; median of "
            f"{args.repeats} alternating runs, minimum in brackets. Target: <= 1.5x dcm2niix. "
            "The machine's 2 cores are shared with other work, so single runs vary by tens of %.",
            "",
            "| series | files | ours, ms | reference, ms | ours / reference | target |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    if not args.no_write:
        update_section(
            "MR series to volume",
            body,
            f".venv/bin/python -m bench.convert_series --repeats {args.repeats}",
        )
    return 0


if __name__ == "__main__":
    exit_with(main)
