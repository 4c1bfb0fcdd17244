"""``glioforecast synth``: generate a synthetic cohort (the node's CLI wires :func:`register`).

Also runnable on its own: ``python -m inference.synthetic.cli --patients 2 --out DIR``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dicom_node.errors import GlioforecastError
from inference.synthetic.cohort import FORMATS, PatientRecord, generate_cohort

logger = logging.getLogger(__name__)


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    if items == ("none",):
        return ()
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(FORMATS)} (or 'none'), found {text!r}"
        )
    return items


def _cutoffs(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two comma-separated numbers of months such as 12,24, found {text!r}"
        ) from None
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 < low < high, found {text!r}")
    return lo, hi


def _whole_number(text: str, minimum: int, expected: str) -> int:
    """``text`` as a whole number >= ``minimum``, or the argparse error naming what was found."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, with a message naming what was found."""
    return _whole_number(text, 1, "a positive integer")


def seed_int(text: str) -> int:
    """argparse type: a whole number >= 0 (numpy's generators take no negative seed)."""
    return _whole_number(text, 0, "a whole number >= 0")


#: cohort seeds ``synth`` accepts: the patient IDs ``GFsssss-nnnn`` carry five digits of it
MAX_COHORT_SEED = 99_999
#: the coarsest grid whose tumours keep an enhancing rim and a PTV margin of a voxel or more
COARSEST_USEFUL_MM = 6.0


def cohort_seed_int(text: str) -> int:
    """argparse type: a cohort seed, 0 to 99999. The patient IDs hold the seed in five digits
    (``GF00077-0001``), so seed 100077 would write other patients under the IDs of seed 77
    (a false training-overlap warning, a train refusing "appears twice", --held-out-seeds
    unable to tell them apart); a larger seed is refused rather than wrapped."""
    value = seed_int(text)
    if value > MAX_COHORT_SEED:
        raise argparse.ArgumentTypeError(
            f"expected a cohort seed from 0 to {MAX_COHORT_SEED} (the patient IDs GFsssss-nnnn "
            f"hold five digits of it: {value} would reuse the IDs of seed "
            f"{value % (MAX_COHORT_SEED + 1)}), found {text!r}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=positive_int, required=True, help="number of patients")
    parser.add_argument("--sites", type=positive_int, default=1, help="number of sites")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--seed",
        type=cohort_seed_int,
        default=0,
        help="cohort seed, 0 to 99999 (same seed, same files; patient IDs GFsssss-nnnn hold it)",
    )
    parser.add_argument(
        "--spacing", type=float, default=2.0, help="simulation grid spacing in mm (default 2)"
    )
    parser.add_argument(
        "--format",
        dest="formats",
        type=_formats,
        default=FORMATS,
        help="nifti,dicom (default both); 'none' writes only cohort.csv",
    )
    parser.add_argument("--jobs", type=positive_int, default=1, help="worker processes")
    parser.add_argument(
        "--survival-cutoffs",
        type=_cutoffs,
        default=(12.0, 24.0),
        help="months separating short/intermediate/long survival (default 12,24)",
    )
    parser.add_argument(
        "--no-mass-effect", action="store_true", help="do not push tissue away from the tumour"
    )
    parser.add_argument(
        "--outcome-draws",
        type=positive_int,
        default=1,
        help="outcomes per patient (default 1): 2 or more add outcome twins, the same patient "
        "up to the radiotherapy plan with MGMT, resection and treatment drawn again (NIfTI only)",
    )
    parser.add_argument(
        "--follow-up-moved",
        action="store_true",
        help="write each DICOM follow-up study as a real one is acquired: on a frame of "
        "reference of its own, the head rotated by 3-10 degrees and shifted by up to 10 mm "
        "(training and evaluation register it back; NIfTI files stay registered)",
    )
    parser.add_argument(
        "--rt-planning-frame",
        nargs="?",
        const="mr-study",
        default="",
        choices=("mr-study", "planning-study"),
        help="write each DICOM RTSTRUCT and RTDOSE as a planning system exports them from the "
        "planning CT: on a frame of reference of their own (rotated 2-10 degrees, shifted up to "
        "40 mm), with the Spatial Registration (REG) relating the MR to it; in the MR study "
        "(mr-study, the default) or in a planning study of their own (planning-study)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the cohort described by ``args``; returns the exit code."""

    def bar(it: Iterable[list[PatientRecord]], total: int) -> Iterable[list[PatientRecord]]:
        if args.no_progress:
            return it
        from tqdm import tqdm

        return tqdm(it, total=total, unit="patient", desc="synth", file=sys.stderr)

    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # a cohort written over another leaves the other's files: a series of one cohort took
        # the other's slices of the same UIDs at another spacing, and patients it did not make
        sys.stderr.write(
            f"error: --out {out}: expected a new or empty folder, found "
            f"{'a file' if not out.is_dir() else 'one holding files'}\n"
        )
        return 2
    asked = {
        "--follow-up-moved": args.follow_up_moved,
        "--rt-planning-frame": args.rt_planning_frame,
    }
    dicom_only = [flag for flag, on in asked.items() if on]
    if dicom_only and "dicom" not in args.formats:
        # they shape the DICOM studies only: asked for without them, they did nothing, silently
        sys.stderr.write(
            f"error: {' and '.join(dicom_only)}: expected --format with dicom (they shape the "
            f"DICOM studies), found --format {','.join(args.formats) or 'none'}\n"
        )
        return 2
    if args.spacing > COARSEST_USEFUL_MM:
        sys.stderr.write(
            f"warning: --spacing {args.spacing:g} mm is coarser than the tumour's structure "
            f"(necrotic rim 3-6 mm, PTV margin 3 mm): most tumours come out all necrosis and the "
            f"response categories mean little; use {COARSEST_USEFUL_MM:g} mm or finer for "
            "anything but tests\n"
        )
    if args.sites > args.patients:
        sys.stderr.write(
            f"warning: --sites {args.sites} with --patients {args.patients}: "
            f"{args.sites - args.patients} site(s) will have no patient (patients go to the "
            "sites in turn)\n"
        )
    started = time.perf_counter()
    try:
        records = generate_cohort(
            out_dir=args.out,
            patients=args.patients,
            sites=args.sites,
            seed=args.seed,
            spacing_mm=args.spacing,
            formats=args.formats,
            jobs=args.jobs,
            survival_cutoffs=args.survival_cutoffs,
            progress=bar,
            mass_effect=not args.no_mass_effect,
            outcome_draws=args.outcome_draws,
            follow_up_moved=args.follow_up_moved,
            rt_planning_frame=args.rt_planning_frame,
        )
    except KeyboardInterrupt:
        sys.stderr.write(
            f"interrupted: {out} holds an incomplete cohort (the patients written so far, no "
            "cohort.csv): remove it and run the command again\n"
        )
        return 130
    except (GlioforecastError, OSError) as exc:  # OSError: a full disk, a folder not writable
        sys.stderr.write(f"error: {exc}\n")
        return 2
    logger.info(
        "%d patients written to %s in %.1f s", len(records), args.out, time.perf_counter() - started
    )
    return 0


def register(subparsers: Any) -> None:
    """Add the ``synth`` subcommand to an argparse sub-parser collection."""
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic glioblastoma cohort with known post-treatment truth",
        description=(
            "Generate synthetic glioblastoma patients (MNI152 anatomy, Fisher-Kolmogorov growth, "
            "60 Gy/30 fx chemo-radiation, follow-up at 8-12 weeks) as NIfTI and DICOM, with "
            "cohort.csv. Research use only."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glioforecast")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["synth", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
