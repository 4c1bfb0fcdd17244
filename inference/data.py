"""Training and evaluation data from cohort folders (NIfTI or DICOM), and the model-space
preparation of one study shared by training and prediction.

A cohort folder holds ``cohort.csv`` (one row per patient: site, survival class, response
category...) and, per patient, either ``<patient_id>/nifti/`` with ``pre_t1c``, ``pre_flair``,
``gtv``, ``dose``, ``post_t1c``, ``pre_labels`` and ``post_labels`` (``.nii.gz``), as
``glioforecast synth`` writes it (``inference.synthetic.cohort``), or DICOM studies anywhere
beneath the folder, as the node stores them (:mod:`inference.dicom_cohort`: the readers'
Segmentations stand for the label maps).

What the model is given and asked for:

- inputs (as the node receives them): the pre-treatment T1-Gd, the FLAIR when present, the GTV
  (the RT structure set's tumour), the RT dose in Gy;
- targets: the post-treatment T1-Gd, and the post-treatment enhancing mask as a reader would
  outline it (labels 3 enhancing tumour and 5 treatment-related enhancement, the volume behind
  the cohort's ``response_category``); the pre-treatment enhancing mask (label 3) trains the
  joint mask channel on pre-treatment images;
- the survival class (``cohort.csv``), the guidance label.

:func:`prepare_study` puts a :class:`~dicom_node.types.StudyInputs` on the model grid with the
converters of ``dicom_node.convert.preprocess`` (``plan_model_grid`` on the T1-Gd,
``to_model_space``, ``normalise_intensity`` inside the head); the prediction path
(``inference.model_predictor``) uses the same function, so training and prediction see the same
arrays. Targets are normalised with their own scaling (each scan is stored with its own gain).

:func:`split_cohort` holds out whole sites (and, optionally, whole cohort seeds) for validation,
deterministically from a seed.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import logging
import multiprocessing
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch.utils.data

from dicom_node.convert.geometry import sitk_image
from dicom_node.convert.preprocess import (
    IntensityScaling,
    ModelGrid,
    foreground_mask_array,
    normalise_intensity,
    plan_model_grid,
    to_model_space,
)
from dicom_node.errors import InputError
from dicom_node.types import RESPONSE_CATEGORIES, StudyInputs, Volume
from inference.model_config import PreprocessingConfig
from inference.predict import PredictionInputs

if TYPE_CHECKING:
    from inference.dicom_cohort import DicomCase

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

COHORT_TABLE = "cohort.csv"
NIFTI_DIR = "nifti"
#: NIfTI file of each input role in a patient's ``nifti/`` folder
INPUT_FILES = {
    "t1c": "pre_t1c.nii.gz",
    "flair": "pre_flair.nii.gz",
    "t2": "pre_t2.nii.gz",
    "t1": "pre_t1.nii.gz",
    "gtv": "gtv.nii.gz",
    "dose": "dose.nii.gz",
}
POST_T1C_FILE = "post_t1c.nii.gz"
PRE_LABELS_FILE = "pre_labels.nii.gz"
POST_LABELS_FILE = "post_labels.nii.gz"
#: label values of the enhancing tumour before treatment
PRE_ENHANCING_LABELS = (3,)
#: label values a reader outlines as enhancing after treatment (tumour + pseudo-progression)
POST_ENHANCING_LABELS = (3, 5)
#: post-treatment labels that, with the GTV, make the evaluation's tumour region
TUMOUR_REGION_LABELS = (1, 3, 5)
_ID_SEED = re.compile(r"^GF(\d{5})-\d+(?:-D\d+)?$")  # -Dk: an outcome twin


def cohort_seed_of(patient_id: str) -> int | None:
    """The generator seed of a synthetic patient's cohort (mod 100000), from its ID
    ``GFsssss-nnnn`` (``-Dk`` for an outcome twin); None for any other ID."""
    m = _ID_SEED.match(patient_id)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------
# NIfTI <-> Volume


def _nifti_shortfall(path: Path) -> str:
    """Why the NIfTI file at ``path`` is cut short ('' when whole, or not a NIfTI-1 file):
    SimpleITK reads a gzip stream that ends early, or a file shorter than its header says,
    with no error, and the missing voxels as zeros."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                header = fh.read(348)
                size = len(header) + sum(
                    len(chunk) for chunk in iter(lambda: fh.read(1 << 20), b"")
                )
        else:
            with path.open("rb") as fh:
                header = fh.read(348)
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as exc:
        return f"its gzip stream is cut short or damaged ({exc})"
    if len(header) < 348:
        return ""  # not a NIfTI-1 header: SimpleITK says what it is
    for order in ("<", ">"):
        if struct.unpack(f"{order}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{order}8h", header[40:56])
            bitpix = struct.unpack(f"{order}h", header[72:74])[0]
            offset = struct.unpack(f"{order}f", header[108:112])[0]
            break
    else:
        return ""
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return ""
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]]))
    expected = int(offset) + voxels * bitpix // 8
    if size < expected:
        return f"it holds {size} bytes, its header says {expected}: the file is cut short"
    return ""


def read_volume(path: str | Path) -> Volume:
    """A NIfTI (or any SimpleITK-readable) image as a :class:`Volume` in LPS millimetres. A
    NIfTI file cut short (a copy that stopped, a full disk) is refused: SimpleITK reads the
    missing voxels as zeros."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p}: expected a file, found none")
    if p.name.endswith((".nii", ".nii.gz")):
        short = _nifti_shortfall(p)
        if short:
            raise InputError(f"image {p}: not readable: {short}")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"image {p}: not readable ({str(exc).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"image {p}: expected a 3D scalar image, found {img.GetDimension()}D with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return Volume(
        array=sitk.GetArrayFromImage(img),
        spacing=tuple(float(s) for s in img.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in img.GetOrigin()),  # type: ignore[arg-type]
        direction=np.asarray(img.GetDirection(), dtype=float).reshape(3, 3),
    )


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write a :class:`Volume` as NIfTI (gzip when the name ends in ``.gz``); booleans as uint8.

    Written to a temporary name, checked whole (SimpleITK does not raise when the disk is
    full: it prints an error and leaves a file cut short), then renamed: ``path`` is the
    whole new image or what it was before. Raises OSError when it could not be written."""
    import SimpleITK as sitk

    array = np.asarray(volume.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = sitk_image(volume, array)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{''.join(out.suffixes)}")
    try:
        try:
            sitk.WriteImage(img, str(tmp), str(out).endswith(".gz"))
        except RuntimeError as exc:
            raise OSError(f"cannot write {out}: {str(exc).strip().splitlines()[-1]}") from None
        short = _nifti_shortfall(tmp) if tmp.is_file() else "nothing was written"
        if short:
            raise OSError(f"cannot write {out}: {short} (is the disk full?)")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def labels_mask(labels: Volume, values: Sequence[int]) -> Volume:
    """Boolean mask of the voxels whose label is one of ``values``."""
    return labels.with_array(np.isin(np.asarray(labels.array), np.asarray(values)))


def study_inputs_from_nifti(folder: str | Path, survival_class: str | None = None) -> StudyInputs:
    """The node's inputs from a folder in the synthetic NIfTI layout (``pre_t1c.nii.gz`` and
    ``gtv.nii.gz`` required; ``pre_flair``, ``pre_t2``, ``pre_t1``, ``dose`` optional), every
    volume on the T1-Gd grid."""
    d = Path(folder)
    if (d / NIFTI_DIR).is_dir() and not (d / INPUT_FILES["t1c"]).is_file():
        d = d / NIFTI_DIR
    missing = [INPUT_FILES[r] for r in ("t1c", "gtv") if not (d / INPUT_FILES[r]).is_file()]
    if missing:
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else "no folder"
        raise InputError(f"NIfTI study {d}: expected {missing}, found {found}")
    t1c = read_volume(d / INPUT_FILES["t1c"])

    def on_t1c(role: str) -> Volume | None:
        path = d / INPUT_FILES[role]
        if not path.is_file():
            return None
        vol = read_volume(path)
        if vol.shape != t1c.shape or not np.allclose(vol.affine, t1c.affine, atol=1e-3):
            raise InputError(
                f"{path}: expected the grid of {INPUT_FILES['t1c']} (shape {t1c.shape}), "
                f"found shape {vol.shape} with another geometry"
            )
        return vol

    gtv = on_t1c("gtv")
    assert gtv is not None
    values = np.unique(np.asarray(gtv.array))
    if len(values) > 2 or (values[0] != 0 and len(values) == 2):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise InputError(
            f"{d / INPUT_FILES['gtv']}: expected a binary mask (0 and one other value), found "
            f"{len(values)} values ({shown}): a probability or label map; threshold it first"
        )
    if not values.any():
        raise InputError(
            f"{d / INPUT_FILES['gtv']}: expected the tumour outline (GTV), found an empty mask"
        )
    dose = on_t1c("dose")
    return StudyInputs(
        t1c=t1c,
        tumour_mask=gtv.with_array(np.asarray(gtv.array) > 0),
        flair=on_t1c("flair"),
        t2=on_t1c("t2"),
        t1=on_t1c("t1"),
        dose=None if dose is None else dose.with_array(np.asarray(dose.array, np.float32)),
        survival_class=survival_class,
    )


# ------------------------------------------------------------------------------------------
# cohort table and split


@dataclass(frozen=True)
class CohortPatient:
    """One patient of a cohort folder."""

    patient_id: str
    site: str
    survival_class: str
    response_category: str
    folder: Path  # the patient's nifti/ folder, or the folder holding its DICOM studies
    values: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    dicom: DicomCase | None = field(default=None, compare=False, repr=False)

    @property
    def cohort_seed(self) -> int | None:
        """The generator seed of the cohort (mod 100000), from the patient ID ``GFsssss-nnnn``."""
        return cohort_seed_of(self.patient_id)


SOURCES = ("auto", "nifti", "dicom")
#: the survival classes of the presets (``ModelConfig.survival_classes``), which a cohort table
#: is checked against unless a model's own are given
DEFAULT_SURVIVAL_CLASSES: tuple[str, ...] = ("short", "intermediate", "long")


def _listed(problems: Sequence[str], most: int = 20) -> str:
    """``problems`` one per indented line after a line break, the first ``most`` of them."""
    more = f"\n  ... and {len(problems) - most} more" if len(problems) > most else ""
    return "\n  " + "\n  ".join(problems[:most]) + more


def label_problems(
    table: Path, rows: Sequence[dict[str, str]], survival_classes: Sequence[str] | None
) -> list[str]:
    """One line per cell of the outcome columns holding a value outside those expected:
    ``response_category`` one of :data:`~dicom_node.types.RESPONSE_CATEGORIES`,
    ``survival_class`` one of ``survival_classes`` (not checked when None). Values are compared
    exactly (``PR``, ``Short`` are refused: they would silently count as no category, or train
    as the unguided class)."""
    expected: dict[str, Sequence[str]] = {"response_category": RESPONSE_CATEGORIES}
    if survival_classes is not None:
        expected["survival_class"] = survival_classes
    out = []
    for n, row in enumerate(rows, start=2):
        for column, allowed in expected.items():
            value = row.get(column)
            if value and value not in allowed:
                out.append(
                    f"{table}, line {n} (patient {row.get('patient_id')}), column {column}: "
                    f"expected one of {list(allowed)}, found {value!r}"
                )
    return out


def read_cohort(
    data: str | Path | Sequence[str | Path],
    *,
    source: str = "auto",
    survival_classes: Sequence[str] | None = DEFAULT_SURVIVAL_CLASSES,
) -> list[CohortPatient]:
    """The patients of one or more cohort folders, in table order.

    A folder holds ``cohort.csv`` and, per patient, NIfTI files (``<folder>/nifti/``, what
    ``glioforecast synth`` writes) or DICOM studies anywhere beneath it (a DICOM site folder,
    :mod:`inference.dicom_cohort`; series roles from the node's settings, the file named by
    ``$GLIOFORECAST_CONFIG`` or the embedded default). ``source`` ``auto`` takes NIfTI where a
    patient has it and DICOM otherwise; ``nifti`` or ``dicom`` insists on one. Every patient's
    problem is reported in one error. The table's ``response_category`` must be one of
    :data:`~dicom_node.types.RESPONSE_CATEGORIES` and its ``survival_class`` one of
    ``survival_classes`` (a model's own; None: any), every cell that is not named in one error
    (:func:`label_problems`)."""
    from inference.dicom_cohort import index_dicom, match_case

    if source not in SOURCES:
        raise InputError(f"cohort source: expected one of {SOURCES}, found {source!r}")
    folders = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    if not folders:
        raise InputError("cohort: expected at least one data folder, found none")
    out: list[CohortPatient] = []
    problems: list[str] = []
    seen: set[str] = set()
    for folder in folders:
        table = folder / COHORT_TABLE
        if not table.is_file():
            raise InputError(
                f"cohort folder {folder}: expected {COHORT_TABLE} (from glioforecast synth, or "
                f"a site's outcome table), found {'no folder' if not folder.is_dir() else 'none'}"
            )
        with table.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        required = ("patient_id", "site", "survival_class", "response_category")
        dicom_index = None
        for n, row in enumerate(rows, start=2):
            absent = [k for k in required if not row.get(k)]
            if absent:
                raise InputError(f"{table}, line {n}: expected values for {absent}, found none")
        labels = label_problems(table, rows, survival_classes)
        if labels:
            raise InputError(
                f"cohort table {table}: {len(labels)} outcome value(s) not recognised (use the "
                f"expected names, exactly):{_listed(labels)}"
            )
        for row in rows:
            pid = row["patient_id"]
            if pid in seen:
                raise InputError(f"cohort: patient {pid} appears twice (in {table})")
            seen.add(pid)
            nifti = folder / row.get("folder", pid) / NIFTI_DIR
            case = None
            if source == "nifti" or (source == "auto" and (nifti / INPUT_FILES["t1c"]).is_file()):
                if not (nifti / INPUT_FILES["t1c"]).is_file():
                    problems.append(f"patient {pid}: expected NIfTI files in {nifti}, found none")
                    continue
            else:
                if dicom_index is None:
                    dicom_index = index_dicom(folder)
                if source == "auto" and pid not in dicom_index:
                    problems.append(
                        f"patient {pid}: expected NIfTI files in {nifti} or DICOM studies with "
                        f"this PatientID under {folder}, found neither"
                    )
                    continue
                case, found = match_case(pid, dicom_index.get(pid, []), row)
                if case is None:
                    problems.extend(f"patient {pid}: {p}" for p in found)
                    continue
                study_files = [f for study in (case.pre, case.post) for s in study.series
                               for f in s.files]  # fmt: skip
                nifti = Path(os.path.commonpath(study_files))
            out.append(
                CohortPatient(
                    patient_id=pid,
                    site=row["site"],
                    survival_class=row["survival_class"],
                    response_category=row["response_category"],
                    folder=nifti,
                    values=dict(row),
                    dicom=case,
                )
            )
    if problems:
        raise InputError(
            f"cohort {[str(f) for f in folders]}: {len(problems)} patient(s) of the table cannot "
            f"be read (source {source}; fix them or remove their rows):{_listed(problems)}"
        )
    if not out:
        raise InputError(f"cohort: expected patients in {[str(f) for f in folders]}, found none")
    return out


@dataclass(frozen=True)
class CohortSplit:
    """Training patients and held-out patients (whole sites / cohort seeds)."""

    train: tuple[CohortPatient, ...]
    held_out: tuple[CohortPatient, ...]
    held_out_sites: tuple[str, ...]
    held_out_seeds: tuple[int, ...] = ()


def split_cohort(
    patients: Sequence[CohortPatient],
    *,
    held_out_sites: Sequence[str] | None = None,
    n_held_out_sites: int = 1,
    held_out_seeds: Sequence[int] = (),
    seed: int = 0,
) -> CohortSplit:
    """Hold out whole sites (and whole cohort seeds): named in ``held_out_sites``, or
    ``n_held_out_sites`` drawn with ``seed`` from the sorted site names. Deterministic: the same
    patients, sites and seed give the same split, whatever the order of ``patients``."""
    sites = sorted({p.site for p in patients})
    if held_out_sites is not None:
        unknown = sorted(set(held_out_sites) - set(sites))
        if unknown:
            raise InputError(f"held-out sites: expected among {sites}, found unknown {unknown}")
        chosen = tuple(sorted(set(held_out_sites)))
    else:
        if n_held_out_sites < 0 or (n_held_out_sites > 0 and n_held_out_sites >= len(sites)):
            raise InputError(
                f"held-out sites: expected fewer than the {len(sites)} site(s) {sites} so that "
                f"some are left for training, found {n_held_out_sites}"
            )
        rng = np.random.default_rng([int(seed), 5])
        picks = rng.choice(len(sites), size=n_held_out_sites, replace=False)
        chosen = tuple(sorted(sites[int(i)] for i in picks))
    seeds = tuple(sorted(set(int(s) for s in held_out_seeds)))
    ordered = sorted(patients, key=lambda p: p.patient_id)
    held = tuple(p for p in ordered if p.site in chosen or p.cohort_seed in seeds)
    train = tuple(p for p in ordered if p not in held)
    if not train:
        raise InputError(
            f"split: every patient is held out (sites {list(chosen)}, seeds {list(seeds)}); "
            "expected some left for training"
        )
    log.info(
        "split: %d training, %d held-out patients (sites %s, seeds %s)",
        len(train),
        len(held),
        list(chosen),
        list(seeds),
    )
    return CohortSplit(train=train, held_out=held, held_out_sites=chosen, held_out_seeds=seeds)


# ------------------------------------------------------------------------------------------
# model space


def normalise(
    array: npt.NDArray[np.generic], method: str = "zscore"
) -> tuple[FloatArray, IntensityScaling]:
    """Intensity normalisation inside the head (foreground of the image itself)."""
    a = np.asarray(array, dtype=np.float32)
    return normalise_intensity(a, foreground_mask_array(a), method=method)


def mask_to_model(volume: Volume, grid: ModelGrid) -> BoolArray:
    """A binary mask on the model grid (linear interpolation thresholded at 0.5, the rule of
    ``from_model_space(as_mask=True)`` in the other direction)."""
    src = volume.with_array(np.asarray(volume.array).astype(np.float32))
    return to_model_space(src, grid, order=1) >= 0.5


@dataclass(frozen=True)
class PreparedStudy:
    """A study on the model grid: normalised T1-Gd (and FLAIR), GTV, dose in Gy."""

    grid: ModelGrid
    t1c: FloatArray
    t1c_scaling: IntensityScaling
    mask: BoolArray
    flair: FloatArray | None = None
    dose: FloatArray | None = None

    def prediction_inputs(self) -> PredictionInputs:
        return PredictionInputs(t1c=self.t1c, mask=self.mask, flair=self.flair, dose=self.dose)


def plan_grid(t1c: Volume, pre: PreprocessingConfig, target: Volume | None = None) -> ModelGrid:
    """The model grid of ``pre`` on the T1-Gd, holding the whole ``target`` (the GTV)."""
    return plan_model_grid(
        t1c, spacing=pre.spacing_mm, shape=pre.crop_shape, orientation=pre.orientation,
        target=None if target is None else np.asarray(target.array, dtype=bool),
    )  # fmt: skip


def prepare_study(
    inputs: StudyInputs,
    pre: PreprocessingConfig,
    contrasts: Sequence[str] = ("t1c", "flair"),
    use_dose: bool = True,
) -> PreparedStudy:
    """``inputs`` on the model grid of ``pre`` (grid planned on the T1-Gd); FLAIR and dose are
    kept only when the model reads them."""
    if inputs.tumour_mask.shape != inputs.t1c.shape:
        raise InputError(
            f"tumour mask: expected the T1-Gd grid shape {inputs.t1c.shape}, "
            f"found {inputs.tumour_mask.shape}"
        )
    grid = plan_grid(inputs.t1c, pre, inputs.tumour_mask)
    t1c, scaling = normalise(to_model_space(inputs.t1c, grid), pre.intensity)
    flair = None
    if "flair" in contrasts and inputs.flair is not None:
        flair, _ = normalise(to_model_space(inputs.flair, grid), pre.intensity)
    dose = None
    if use_dose and inputs.dose is not None:
        dose = to_model_space(inputs.dose, grid)
    return PreparedStudy(
        grid=grid,
        t1c=t1c,
        t1c_scaling=scaling,
        mask=mask_to_model(inputs.tumour_mask, grid),
        flair=flair,
        dose=dose,
    )


# ------------------------------------------------------------------------------------------
# training samples


@dataclass(frozen=True)
class PatientTruth:
    """A patient's post-treatment truth on its source grid."""

    post_t1c: Volume
    post_enhancing: Volume  # bool
    pre_enhancing: Volume  # bool
    tumour_region: Volume  # bool: GTV | post labels 1, 3, 5 (before any dilation)


def patient_inputs(patient: CohortPatient, survival_class: str | None = None) -> StudyInputs:
    """A cohort patient's pre-treatment inputs, from its NIfTI files or DICOM studies
    (``survival_class`` is what the inputs say is known; evaluation gives none)."""
    if patient.dicom is not None:
        return patient.dicom.inputs(survival_class)
    return study_inputs_from_nifti(patient.folder, survival_class)


def load_truth(patient: CohortPatient, inputs: StudyInputs | None = None) -> PatientTruth:
    if patient.dicom is not None:
        return _dicom_truth(patient, inputs)
    d = patient.folder
    post = read_volume(d / POST_T1C_FILE)
    post_labels = read_volume(d / POST_LABELS_FILE)
    pre_labels = read_volume(d / PRE_LABELS_FILE)
    gtv = inputs.tumour_mask if inputs is not None else read_volume(d / INPUT_FILES["gtv"])
    region = np.isin(post_labels.array, TUMOUR_REGION_LABELS) | (np.asarray(gtv.array) > 0)
    return PatientTruth(
        post_t1c=post,
        post_enhancing=labels_mask(post_labels, POST_ENHANCING_LABELS),
        pre_enhancing=labels_mask(pre_labels, PRE_ENHANCING_LABELS),
        tumour_region=post_labels.with_array(region),
    )


def _dicom_truth(patient: CohortPatient, inputs: StudyInputs | None) -> PatientTruth:
    """The truth of a DICOM patient: the follow-up T1-Gd and the readers' Segmentations; the
    tumour region is the GTV with the follow-up's enhancing lesion and necrosis."""
    from dicom_node.pipeline import on_grid

    assert patient.dicom is not None
    if inputs is None:
        inputs = patient_inputs(patient)
    truth = patient.dicom.truth(inputs.t1c)
    post = truth.post_t1c
    gtv = on_grid(inputs.tumour_mask, post, "GTV")
    region = np.asarray(gtv.array) >= 0.5
    region |= np.asarray(truth.post_enhancing.array, dtype=bool)
    if truth.post_necrosis is not None:
        region |= np.asarray(truth.post_necrosis.array, dtype=bool)
    return PatientTruth(
        post_t1c=post,
        post_enhancing=truth.post_enhancing,
        pre_enhancing=truth.pre_enhancing,
        tumour_region=post.with_array(region),
    )


@dataclass(frozen=True)
class TrainingSample:
    """One patient on the model grid, inputs and targets."""

    patient_id: str
    site: str
    study: PreparedStudy
    post_t1c: FloatArray  # normalised with its own scaling
    post_mask: BoolArray  # post-treatment enhancing (labels 3, 5)
    pre_mask: BoolArray  # pre-treatment enhancing (label 3)
    survival_class: str
    class_index: int  # index in the model's survival classes; the null class when unknown


def class_index(survival_class: str, classes: Sequence[str]) -> int:
    """Index of ``survival_class`` in ``classes``; ``len(classes)`` (null class) if absent."""
    return list(classes).index(survival_class) if survival_class in classes else len(classes)


def training_sample(
    patient: CohortPatient,
    pre: PreprocessingConfig,
    contrasts: Sequence[str],
    use_dose: bool,
    survival_classes: Sequence[str],
) -> TrainingSample:
    inputs = patient_inputs(patient, patient.survival_class)
    study = prepare_study(inputs, pre, contrasts, use_dose)
    truth = load_truth(patient, inputs)
    post, _ = normalise(to_model_space(truth.post_t1c, study.grid), pre.intensity)
    return TrainingSample(
        patient_id=patient.patient_id,
        site=patient.site,
        study=study,
        post_t1c=post,
        post_mask=mask_to_model(truth.post_enhancing, study.grid),
        pre_mask=mask_to_model(truth.pre_enhancing, study.grid),
        survival_class=patient.survival_class,
        class_index=class_index(patient.survival_class, survival_classes),
    )


class CohortDataset(torch.utils.data.Dataset[TrainingSample]):
    """Patients of a cohort on a model grid; each item a :class:`TrainingSample`.

    Preparation (resampling, normalisation) runs once per patient and is kept in memory when
    ``cache`` (about 7 float32 volumes of the crop per patient: 17 MB at the demo crop).
    """

    def __init__(
        self,
        patients: Iterable[CohortPatient],
        preprocessing: PreprocessingConfig,
        contrasts: Sequence[str] = ("t1c", "flair"),
        use_dose: bool = True,
        survival_classes: Sequence[str] = ("short", "intermediate", "long"),
        *,
        cache: bool = True,
    ) -> None:
        self.patients = tuple(patients)
        self.preprocessing = preprocessing
        self.contrasts = tuple(contrasts)
        self.use_dose = use_dose
        self.survival_classes = tuple(survival_classes)
        self.cache = cache
        self._cache: dict[int, TrainingSample] = {}

    def __len__(self) -> int:
        return len(self.patients)

    def prepared(self, jobs: int = 1) -> Iterator[TrainingSample]:
        """Every patient's sample, in order. With ``jobs`` > 1 the patients not in the cache
        are prepared by that many processes (``spawn``: safe beside CUDA), ahead of the
        caller, and kept when ``cache``. The samples are the same whatever ``jobs``."""
        missing = [i for i in range(len(self)) if i not in self._cache]
        if jobs <= 1 or len(missing) <= 1:
            yield from (self[i] for i in range(len(self)))
            return
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(min(jobs, len(missing)), mp_context=context)
        try:
            fresh = pool.map(
                training_sample,
                [self.patients[i] for i in missing],
                itertools.repeat(self.preprocessing),
                itertools.repeat(self.contrasts),
                itertools.repeat(self.use_dose),
                itertools.repeat(self.survival_classes),
            )  # results come in the order of ``missing``
            for i in range(len(self)):
                if i in self._cache:
                    yield self._cache[i]
                    continue
                sample = next(fresh)
                if self.cache:
                    self._cache[i] = sample
                yield sample
        finally:  # a caller that stops early leaves no patients being prepared
            pool.shutdown(wait=True, cancel_futures=True)

    def __getitem__(self, index: int) -> TrainingSample:
        if index in self._cache:
            return self._cache[index]
        if not 0 <= index < len(self.patients):
            raise IndexError(f"patient index {index} out of range 0..{len(self.patients) - 1}")
        sample = training_sample(
            self.patients[index],
            self.preprocessing,
            self.contrasts,
            self.use_dose,
            self.survival_classes,
        )
        if self.cache:
            self._cache[index] = sample
        return sample
