"""Training and evaluation data from cohort folders (NIfTI or DICOM), and the model-space
preparation of one study shared by training and prediction.

A cohort folder holds ``cohort.csv`` (one row per patient: site, survival class, response
category...) and, per patient, either ``<patient_id>/nifti/`` with ``pre_t1c``, ``pre_flair``,
``gtv``, ``dose``, ``post_t1c``, ``pre_labels`` and ``post_labels`` (``.nii.gz``), as
``glioforecast synth`` writes it (``inference.synthetic.cohort``), or DICOM studies anywhere
beneath the folder, as the node stores them (:mod:`inference.dicom_cohort`: the readers'
Segmentations stand for the label maps). ``cohort.csv`` is UTF-8 (with or without the byte-order
mark of Excel's "CSV UTF-8"); every image of a NIfTI patient lies on the grid of its
``pre_t1c``; images with NaN or infinite voxels, and a blank (one-valued) T1-Gd or FLAIR, are
refused.

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
import io
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
from typing import TYPE_CHECKING, NamedTuple

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
from dicom_node.convert.series import refuse_blank
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


#: NIfTI-1 datatype codes of floating-point voxels, with their numpy types
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK = 1 << 20  # bytes read at a time: a multiple of every voxel size


class _NiftiLayout(NamedTuple):
    """Where a NIfTI-1 file's voxels are and what they are."""

    order: str  # byte order, "<" or ">"
    offset: int  # of the first voxel, in bytes
    voxels: int
    datatype: int  # NIfTI datatype code
    bitpix: int

    @property
    def expected_size(self) -> int:
        return self.offset + self.voxels * self.bitpix // 8


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The layout a NIfTI-1 header declares (None: not one, or a dimension count or bit depth
    out of range)."""
    if len(header) < 348:
        return None
    for order in ("<", ">"):
        if struct.unpack(f"{order}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{order}8h", header[40:56])
            datatype, bitpix = struct.unpack(f"{order}2h", header[70:74])
            offset = struct.unpack(f"{order}f", header[108:112])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]]))
    return _NiftiLayout(order, int(offset), voxels, int(datatype), int(bitpix))


@dataclass(frozen=True)
class _NiftiScan:
    """What streaming a NIfTI file found: why it is cut short ('' when whole), and how many of
    its floating-point voxels are NaN or infinite (counted only when asked for)."""

    shortfall: str = ""
    nan: int = 0
    infinite: int = 0


def _scan_nifti(path: Path, *, count_non_finite: bool) -> _NiftiScan:
    """Stream the NIfTI file at ``path`` once. SimpleITK reads a gzip stream that ends early, or
    a file shorter than its header says, with no error and the missing voxels as zeros; and it
    reads NaN and infinite voxels as zeros too. With ``count_non_finite`` the voxels of a float
    image are counted as they stream by (integer images cannot hold them)."""
    gz = path.name.endswith(".gz")
    nan = infinite = 0
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as fh:
            header = fh.read(348)
            layout = _nifti_layout(header)
            dtype = None
            if layout is not None and count_non_finite and layout.datatype in _NIFTI_FLOATS:
                dtype = np.dtype(layout.order + _NIFTI_FLOATS[layout.datatype])
            if dtype is None and not gz:
                size = path.stat().st_size
            elif dtype is None:
                size = len(header) + sum(len(c) for c in iter(lambda: fh.read(_CHUNK), b""))
            else:
                assert layout is not None
                extension = fh.read(max(layout.offset - len(header), 0))
                size = len(header) + len(extension)
                left = layout.voxels * dtype.itemsize  # bytes of voxels still to count
                # each read is a whole chunk until the end of the file: no voxel is split
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    size += len(chunk)
                    whole = min(left, len(chunk) - len(chunk) % dtype.itemsize)
                    values = np.frombuffer(chunk[:whole], dtype=dtype)
                    left -= whole
                    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
                    if bad:
                        n = int(np.count_nonzero(np.isnan(values)))
                        nan, infinite = nan + n, infinite + bad - n
    except (EOFError, OSError, zlib.error) as exc:
        return _NiftiScan(shortfall=f"its gzip stream is cut short or damaged ({exc})")
    if layout is None:
        return _NiftiScan()  # not a NIfTI-1 header: SimpleITK says what it is
    expected = layout.expected_size
    if size < expected:
        return _NiftiScan(
            shortfall=f"it holds {size} bytes, its header says {expected}: the file is cut short"
        )
    return _NiftiScan(nan=nan, infinite=infinite)


def _non_finite_error(path: Path, nan: int, infinite: int) -> InputError:
    return InputError(
        f"image {path}: expected finite voxel values, found {nan + infinite} NaN/Inf voxels "
        f"({nan} NaN, {infinite} infinite); fix or mask them where the image was made"
    )


def read_volume(path: str | Path) -> Volume:
    """A NIfTI (or any SimpleITK-readable) image as a :class:`Volume` in LPS millimetres. A
    NIfTI file cut short (a copy that stopped, a full disk) is refused, and so is an image with
    NaN or infinite voxels: SimpleITK reads both as zeros from NIfTI files."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p}: expected a file, found none")
    nifti = p.name.endswith((".nii", ".nii.gz"))
    if nifti:
        scan = _scan_nifti(p, count_non_finite=True)
        if scan.shortfall:
            raise InputError(f"image {p}: not readable: {scan.shortfall}")
        if scan.nan or scan.infinite:
            raise _non_finite_error(p, scan.nan, scan.infinite)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"image {p}: not readable ({str(exc).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"image {p}: expected a 3D scalar image, found {img.GetDimension()}D with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    array = sitk.GetArrayFromImage(img)
    if not nifti and array.dtype.kind == "f":  # other formats keep NaN and infinity
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            nan = int(np.count_nonzero(np.isnan(array)))
            raise _non_finite_error(p, nan, bad - nan)
    return Volume(
        array=array,
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
        short = (
            _scan_nifti(tmp, count_non_finite=False).shortfall
            if tmp.is_file()
            else "nothing was written"
        )
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


def _grid_text(volume: Volume) -> str:
    """A volume's grid as errors show it."""
    spacing = "x".join(f"{v:g}" for v in volume.spacing)
    origin = ", ".join(f"{v:.1f}" for v in volume.origin)
    return f"shape {volume.shape}, spacing {spacing} mm, origin ({origin}) mm"


def check_on_grid(volume: Volume, path: Path, t1c: Volume) -> None:
    """Refuse ``volume`` (read from ``path``) unless it lies on the grid of the T1-Gd."""
    if volume.shape == t1c.shape and np.allclose(volume.affine, t1c.affine, atol=1e-3):
        return
    turned = not np.allclose(volume.direction, t1c.direction, atol=1e-3)
    raise InputError(
        f"{path}: expected the grid of {INPUT_FILES['t1c']} ({_grid_text(t1c)}), found "
        f"{_grid_text(volume)}{' in another orientation' if turned else ''}"
    )


#: the images that must not be blank (one value throughout) and how errors name them; masks
#: are binary by design and an all-zero dose map is a plausible "no dose": neither is checked
CONTRAST_ROLES = {"t1c": "T1-Gd", "flair": "FLAIR"}


def check_not_blank(inputs: StudyInputs, where: str) -> None:
    """:func:`refuse_blank` on the T1-Gd and FLAIR of ``inputs`` (``where``: the study)."""
    for role, name in CONTRAST_ROLES.items():
        volume = getattr(inputs, role)
        if volume is not None:
            refuse_blank(volume, name, where)


def nifti_file(folder: Path, name: str) -> Path | None:
    """The file of the layout name ``name`` (``x.nii.gz``) in ``folder``, gzip-compressed or
    not (``x.nii``, as dcm2niix writes without ``-z y``); None when there is neither. Both is
    refused: which one is the image would be a guess."""
    gz = folder / name
    plain = folder / name.removesuffix(".gz")
    if gz.is_file() and plain.is_file():
        raise InputError(
            f"NIfTI study {folder}: expected one file for {plain.name[: -len('.nii')]}, found "
            f"both {gz.name} and {plain.name}; remove the one that is not the image"
        )
    return gz if gz.is_file() else plain if plain.is_file() else None


def nifti_study_folder(folder: Path) -> Path | None:
    """The folder of a NIfTI study: ``folder`` itself or its ``nifti/`` folder, whichever holds
    the T1-Gd (:func:`nifti_file`); None when neither does."""
    for d in (folder, folder / NIFTI_DIR):
        if nifti_file(d, INPUT_FILES["t1c"]) is not None:
            return d
    return None


def study_inputs_from_nifti(folder: str | Path, survival_class: str | None = None) -> StudyInputs:
    """The node's inputs from a folder in the synthetic NIfTI layout (``pre_t1c.nii.gz`` and
    ``gtv.nii.gz`` required; ``pre_flair``, ``pre_t2``, ``pre_t1``, ``dose`` optional; each
    may be uncompressed, ``.nii``), every volume on the T1-Gd grid; a blank T1-Gd or FLAIR is
    refused (:func:`refuse_blank`)."""
    d = nifti_study_folder(Path(folder)) or Path(folder)
    files = {role: nifti_file(d, name) for role, name in INPUT_FILES.items()}
    missing = [INPUT_FILES[r] for r in ("t1c", "gtv") if files[r] is None]
    if missing:
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else "no folder"
        raise InputError(f"NIfTI study {d}: expected {missing}, found {found}")
    t1c_path = files["t1c"]
    assert t1c_path is not None
    t1c = read_volume(t1c_path)
    refuse_blank(t1c, CONTRAST_ROLES["t1c"], t1c_path)

    def on_t1c(role: str) -> Volume | None:
        path = files[role]
        if path is None:
            return None
        vol = read_volume(path)
        check_on_grid(vol, path, t1c)
        if role in CONTRAST_ROLES:
            refuse_blank(vol, CONTRAST_ROLES[role], path)
        return vol

    gtv = on_t1c("gtv")
    assert gtv is not None
    values = np.unique(np.asarray(gtv.array))
    if len(values) > 2 or (values[0] != 0 and len(values) == 2):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise InputError(
            f"{files['gtv']}: expected a binary mask (0 and one other value), found "
            f"{len(values)} values ({shown}): a probability or label map; threshold it first"
        )
    if not values.any():
        raise InputError(f"{files['gtv']}: expected the tumour outline (GTV), found an empty mask")
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


def read_table(table: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of a cohort table, each with its line number in the file (where the row ends:
    blank lines and values spanning lines counted). UTF-8, with or without the byte-order mark
    that Excel's "CSV UTF-8" writes; any other encoding is refused, not guessed."""
    raw = table.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{table}: expected UTF-8 text, found byte 0x{raw[exc.start]:02x} at byte "
            f"{exc.start} (line {line}), which is not UTF-8 (a table saved as Latin-1 or "
            "Windows-1252, as Excel's plain 'CSV' does); save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return [(reader.line_num, row) for row in reader]


def label_problems(
    table: Path,
    rows: Sequence[tuple[int, dict[str, str]]],
    survival_classes: Sequence[str] | None,
) -> list[str]:
    """One line per cell of the outcome columns holding a value outside those expected:
    ``response_category`` one of :data:`~dicom_node.types.RESPONSE_CATEGORIES`,
    ``survival_class`` one of ``survival_classes`` (not checked when None). Values are compared
    exactly (``PR``, ``Short`` are refused: they would silently count as no category, or train
    as the unguided class). ``rows``: each with its line number, as :func:`read_table` gives
    them."""
    expected: dict[str, Sequence[str]] = {"response_category": RESPONSE_CATEGORIES}
    if survival_classes is not None:
        expected["survival_class"] = survival_classes
    out = []
    for n, row in rows:
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
        rows = read_table(table)
        required = ("patient_id", "site", "survival_class", "response_category")
        dicom_index = None
        for n, row in rows:
            absent = [k for k in required if not row.get(k)]
            if absent:
                raise InputError(f"{table}, line {n}: expected values for {absent}, found none")
        labels = label_problems(table, rows, survival_classes)
        if labels:
            raise InputError(
                f"cohort table {table}: {len(labels)} outcome value(s) not recognised (use the "
                f"expected names, exactly):{_listed(labels)}"
            )
        for _, row in rows:
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
    kept only when the model reads them. A blank T1-Gd or FLAIR is refused (every prediction
    and training sample passes here, whatever the inputs were read from)."""
    check_not_blank(inputs, "study inputs")
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
    if patient.dicom is None:
        return study_inputs_from_nifti(patient.folder, survival_class)
    inputs = patient.dicom.inputs(survival_class)
    check_not_blank(inputs, f"patient {patient.patient_id} (DICOM under {patient.folder})")
    return inputs


def load_truth(patient: CohortPatient, inputs: StudyInputs | None = None) -> PatientTruth:
    """A patient's truth; every image of a NIfTI patient must lie on the grid of its T1-Gd
    (``inputs.t1c`` when given, else read) and its post-treatment T1-Gd must not be blank."""
    if patient.dicom is not None:
        return _dicom_truth(patient, inputs)
    d = patient.folder
    t1c = inputs.t1c if inputs is not None else read_volume(d / INPUT_FILES["t1c"])

    def on_t1c(name: str) -> Volume:
        vol = read_volume(d / name)
        check_on_grid(vol, d / name, t1c)
        return vol

    post = on_t1c(POST_T1C_FILE)
    refuse_blank(post, "post-treatment T1-Gd", d / POST_T1C_FILE)
    post_labels = on_t1c(POST_LABELS_FILE)
    pre_labels = on_t1c(PRE_LABELS_FILE)
    gtv = inputs.tumour_mask if inputs is not None else on_t1c(INPUT_FILES["gtv"])
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
    where = f"patient {patient.patient_id} (DICOM under {patient.folder})"
    refuse_blank(post, "post-treatment T1-Gd", where)
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
