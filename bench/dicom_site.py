"""Reading a training site's data: DICOM (as the node stores it) against NIfTI, per patient.

Generates a synthetic cohort in both formats (or uses ``--cohort``), then times, for the same
patients:

- indexing the DICOM headers of the whole folder (``inference.dicom_cohort.index_dicom``) and
  matching the table to studies (``read_cohort(source="dicom")``);
- reading each patient's inputs and truth (``patient_inputs`` + ``load_truth``: MR series,
  RTSTRUCT rasterised, RTDOSE resampled, readers' Segmentations) against the same from NIfTI;
- one patient's model-space training sample from each (``training_sample``, the demo preset),
  and checks the two samples are equal (dose within its 16-bit storage).

This is what ``glioforecast federate check-data`` and the first epoch of training spend reading
a site. With ``--follow-up-moved`` the DICOM follow-ups are on frames of reference of their own
(``glioforecast synth --follow-up-moved``), so reading them includes their rigid registration
onto the pre-treatment study, and the comparison says how far the registered follow-up lands
from the NIfTI one. With ``--rt-planning-frame`` the RTSTRUCT and RTDOSE are on a planning
frame with the Spatial Registration (in the MR study, or in a planning study of their own), so
reading them includes placing them on the MR. Results go to ``docs/BENCHMARKS.md`` (section
"DICOM site reading, <spacing> mm[, follow-ups moved][, RT on the planning frame (...)]").

    python -m bench.dicom_site --patients 8 --spacing 2 [--follow-up-moved]
        [--rt-planning-frame mr-study|planning-study] [--cohort DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from bench.cli import exit_with
from bench.report import update_section
from dicom_node.convert.geometry import grid_corners
from dicom_node.convert.spatial_registration import SPATIAL_REGISTRATION_SOP_CLASS
from inference.data import CohortPatient, PatientTruth, load_truth, patient_inputs

T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _read_patient(patient: CohortPatient) -> PatientTruth:
    return load_truth(patient, patient_inputs(patient))


def run(cohort: Path) -> tuple[str, dict[str, float]]:
    from inference.data import read_cohort, training_sample
    from inference.dicom_cohort import index_dicom
    from inference.model_config import preset

    (index, t_index) = _timed(lambda: index_dicom(cohort))
    n_files = sum(len(s.files) for studies in index.values() for st in studies for s in st.series)
    dicom, t_match = _timed(lambda: read_cohort(cohort, source="dicom"))
    nifti = read_cohort(cohort, source="nifti")
    per: dict[str, list[float]] = {"dicom": [], "nifti": []}
    corner_error = 0.0  # how far the follow-up grid read from DICOM lies from the NIfTI one
    for d, n in zip(dicom, nifti, strict=True):
        truths = {}
        for name, patient in (("dicom", d), ("nifti", n)):
            truths[name], dt = _timed(partial(_read_patient, patient))
            per[name].append(dt)
        gap = grid_corners(truths["dicom"].post_t1c) - grid_corners(truths["nifti"].post_t1c)
        corner_error = max(corner_error, float(np.max(np.linalg.norm(gap, axis=1))))
    cfg = preset("demo")
    contrasts, classes = cfg.contrasts, cfg.survival_classes
    samples = {}
    sample_time = {}
    for name, patient in (("dicom", dicom[0]), ("nifti", nifti[0])):
        samples[name], sample_time[name] = _timed(
            partial(training_sample, patient, cfg.preprocessing, contrasts, True, classes)
        )
    a, b = samples["dicom"], samples["nifti"]
    equal = all(
        np.array_equal(getattr(a, k), getattr(b, k)) for k in ("post_t1c", "post_mask", "pre_mask")
    ) and np.array_equal(a.study.t1c, b.study.t1c)
    dose_diff = float(np.max(np.abs(np.asarray(a.study.dose) - np.asarray(b.study.dose))))
    correlation = float(np.corrcoef(a.post_t1c.ravel(), b.post_t1c.ravel())[0, 1])
    mask_a, mask_b = a.post_mask > 0.5, b.post_mask > 0.5
    both = int(mask_a.sum() + mask_b.sum())
    dice = 2 * int((mask_a & mask_b).sum()) / both if both else 1.0
    figures = {
        "patients": float(len(dicom)),
        "files": float(n_files),
        "index_s": t_index,
        "match_s": t_match,
        "dicom_median_s": statistics.median(per["dicom"]),
        "nifti_median_s": statistics.median(per["nifti"]),
        "dicom_total_s": sum(per["dicom"]),
        "nifti_total_s": sum(per["nifti"]),
        "corner_error_mm": corner_error,
    }
    n_reg = sum(
        len(s.files)
        for studies in index.values()
        for st in studies
        for s in st.series
        if s.summary.sop_class_uid == SPATIAL_REGISTRATION_SOP_CLASS
    )
    t1c = patient_inputs(nifti[0]).t1c
    grid = "x".join(str(n) for n in t1c.shape[::-1])
    spacing = "x".join(f"{s:g}" for s in t1c.spacing)
    body = "\n".join(
        [
            f"{len(dicom)} synthetic patients, acquisition grid {grid} at {spacing} mm (patient "
            f"1), {n_files} DICOM files ({n_files / len(dicom):.0f} per patient: 8 MR series, "
            f"RTSTRUCT, RTDOSE, {'REG, ' if n_reg else ''}two readers' SEGs). One process, torch "
            "threads as set by the environment.",
            "",
            "| step | DICOM | NIfTI |",
            "| --- | --- | --- |",
            f"| index the folder's headers (`index_dicom`) | {t_index:.2f} s "
            f"({1000 * t_index / n_files:.2f} ms per file) | n/a |",
            f"| match the table to studies (`read_cohort`, includes a second index) | "
            f"{t_match:.2f} s | n/a |",
            f"| a patient's inputs and truth (`patient_inputs` + `load_truth`), median | "
            f"{figures['dicom_median_s']:.2f} s | {figures['nifti_median_s']:.2f} s |",
            f"| the same, all {len(dicom)} patients | {figures['dicom_total_s']:.1f} s | "
            f"{figures['nifti_total_s']:.1f} s |",
            f"| one training sample on the demo grid (`training_sample`) | "
            f"{sample_time['dicom']:.2f} s | {sample_time['nifti']:.2f} s |",
            "",
            f"The two training samples are {'equal' if equal else 'NOT equal'} (T1-Gd, "
            f"follow-up T1-Gd, both masks); the dose differs by at most {dose_diff:.1e} Gy (the "
            "RT Dose file's 16-bit counts).",
        ]
    )
    if corner_error > 1e-3:  # follow-ups on frames of their own, registered back
        body = body.replace("NOT equal", "not equal, by the registration")
        body += (
            f" The follow-ups were registered back onto the pre-treatment studies: the corners "
            f"of their grids land at most {corner_error:.2f} mm from the NIfTI (registered) "
            f"ones over the {len(dicom)} patients; on the demo grid, patient 1's follow-up "
            f"T1-Gd correlates {correlation:.4f} with the NIfTI one and its enhancing mask "
            f"overlaps it with Dice {dice:.3f} ({int(mask_b.sum())} voxels)."
        )
    return body, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--spacing", type=float, default=2.0, help="acquisition spacing, mm")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--cohort", type=Path, default=None, help="an existing cohort folder")
    parser.add_argument(
        "--follow-up-moved",
        action="store_true",
        help="generate DICOM follow-ups on frames of reference of their own (registered back)",
    )
    parser.add_argument(
        "--rt-planning-frame",
        choices=("mr-study", "planning-study"),
        default="",
        help="generate RTSTRUCT and RTDOSE on a planning frame with the Spatial Registration, in "
        "the MR study or in a planning study of their own (placed back on the MR when read)",
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = args.cohort
        if cohort is None:
            from inference.synthetic.cohort import generate_cohort

            cohort = Path(tmp) / "cohort"
            generate_cohort(
                cohort, patients=args.patients, sites=2, seed=args.seed,
                spacing_mm=args.spacing, jobs=max(1, min(2, os.cpu_count() or 1)),
                follow_up_moved=args.follow_up_moved, rt_planning_frame=args.rt_planning_frame,
            )  # fmt: skip
        body, _ = run(cohort)
    print(body)
    if not args.no_write:
        command = "python -m bench.dicom_site " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        name = "DICOM site reading" + ("" if args.cohort else f", {args.spacing:g} mm")
        name += ", follow-ups moved" if args.follow_up_moved else ""
        if args.rt_planning_frame:
            name += f", RT on the planning frame ({args.rt_planning_frame})"
        update_section(name, body, command.strip())
    return 0


if __name__ == "__main__":
    exit_with(main)
