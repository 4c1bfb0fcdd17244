"""Subject anatomy: the MNI152 2009 template and tissue maps, posed and deformed per subject.

The template (ICBM 2009a nonlinear symmetric, T1 and GM/WM probability maps at 1 mm) ships
inside nilearn (``nilearn.datasets.MNI152_FILE_PATH`` and friends), so nothing is downloaded.
The template is brain-extracted: cerebrospinal fluid is what lies inside the brain mask and is
neither grey nor white matter. A skull and a scalp are added around the brain as shells of fixed
thickness so that the images look like head scans (cortical bone is dark on every contrast,
scalp fat is bright on T1).

Each subject gets a random similarity-plus-shear pose (head position in the scanner) and a smooth
random elastic deformation (control points every ~40 mm, cubic interpolation), sampled onto the
*simulation grid*: axial, isotropic ``spacing`` millimetres, LPS patient coordinates with the
identity direction (columns run to the patient's left, rows to posterior, slices to superior).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.errors import InputError
from dicom_node.types import Volume

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# Field of view of the simulation grid (mm): square in-plane, as head protocols use.
FOV_INPLANE_MM = 224.0
FOV_SLICES_MM = 176.0
# MNI (RAS) point placed at the scanner isocentre before the subject's random pose.
MNI_CENTRE_RAS = np.array([0.0, -17.0, 10.0])
SKULL_INNER_MM = 2.0  # subarachnoid CSF between brain surface and bone (outside the template)
SKULL_THICKNESS_MM = 6.0  # ~6-7 mm mean calvarial thickness in adults
SCALP_THICKNESS_MM = 5.0


@dataclass(frozen=True)
class Template:
    """Template maps on their 1 mm grid (RAS affine), values in [0, 1]."""

    t1: FloatArray
    gm: FloatArray
    wm: FloatArray
    csf: FloatArray
    affine_ras: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Anatomy:
    """Tissue fractions of one subject on the simulation grid ([k, j, i], sum <= 1)."""

    grid: Volume  # geometry only (the array is the brain mask, bool)
    wm: FloatArray
    gm: FloatArray
    csf: FloatArray
    bone: FloatArray
    fat: FloatArray

    @property
    def brain(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.grid.array, dtype=bool)


def template_folder() -> Path:
    """nilearn's data folder, found without importing nilearn (its import takes seconds)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the synthetic cohort needs nilearn (it ships the MNI152 template)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the template shipped with nilearn (cached per process)."""
    import nibabel as nib

    data = template_folder()
    paths = {
        "t1": data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "gm": data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "wm": data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    }
    maps: dict[str, FloatArray] = {}
    affine = None
    for name, path in paths.items():
        try:
            img: Any = nib.load(path)
        except (OSError, FileNotFoundError) as exc:
            raise InputError(f"template {name} expected at {path}, not readable: {exc}") from exc
        maps[name] = (np.asarray(img.dataobj, dtype=np.float32) / 255.0).astype(np.float32)
        if affine is None:
            affine = np.asarray(img.affine, dtype=np.float64)
    assert affine is not None
    brain = maps["t1"] > 0  # the template is brain-extracted; ventricles are non-zero
    csf = np.clip(brain.astype(np.float32) - maps["gm"] - maps["wm"], 0.0, 1.0)
    logger.debug("loaded MNI152 template %s", maps["t1"].shape)
    return Template(maps["t1"], maps["gm"], maps["wm"], csf.astype(np.float32), affine)


def simulation_grid(spacing: float) -> Volume:
    """The axial isotropic grid (LPS, identity direction) centred on the isocentre."""
    if not 0.5 <= spacing <= 8.0:
        raise InputError(f"spacing must be between 0.5 and 8 mm, found {spacing}")
    n = round(FOV_INPLANE_MM / spacing)
    nz = round(FOV_SLICES_MM / spacing)
    origin = (
        -(n - 1) * spacing / 2.0,
        -(n - 1) * spacing / 2.0,
        -(nz - 1) * spacing / 2.0,
    )
    return Volume(
        array=np.zeros((nz, n, n), dtype=bool),
        spacing=(spacing, spacing, spacing),
        origin=origin,
        direction=np.eye(3),
    )


def _rotation(rx: float, ry: float, rz: float) -> npt.NDArray[np.float64]:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


@dataclass(frozen=True)
class Pose:
    """Subject-to-scanner similarity transform and the elastic field amplitude."""

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    elastic_mm: float

    @staticmethod
    def random(rng: np.random.Generator) -> Pose:
        return Pose(
            rotation_deg=tuple(float(v) for v in rng.normal(0.0, [4.0, 3.0, 3.0])),  # type: ignore[arg-type]
            # the MNI152 brain is larger than an average adult brain (about 1.2x the volume);
            # 0.93 per axis brings the intracranial volume to ~1.45 L, +/-4 % per axis between
            # subjects
            scale=tuple(float(v) for v in rng.normal(0.93, 0.035, 3).clip(0.84, 1.02)),  # type: ignore[arg-type]
            translation_mm=tuple(float(v) for v in rng.normal(0.0, [3.0, 4.0, 4.0])),  # type: ignore[arg-type]
            elastic_mm=float(rng.uniform(2.0, 4.0)),
        )


def _elastic_field(
    rng: np.random.Generator, shape: tuple[int, int, int], amplitude_mm: float, spacing: float
) -> npt.NDArray[np.float32]:
    """Smooth random displacement (3, k, j, i) in mm: control points every ~40 mm."""
    coarse = tuple(max(3, round(n * spacing / 40.0)) for n in shape)
    field = rng.normal(0.0, amplitude_mm, (3, *coarse)).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse, strict=True)]
    # linear up-sampling of the control-point field: continuous and fast (cubic costs ~2 s)
    return np.stack([ndimage.zoom(f, zoom, order=1, mode="nearest") for f in field]).astype(
        np.float32
    )


def make_anatomy(rng: np.random.Generator, spacing: float, pose: Pose | None = None) -> Anatomy:
    """Sample the template into one subject's head on the simulation grid."""
    template = load_template()
    grid = simulation_grid(spacing)
    pose = pose or Pose.random(rng)
    shape = grid.shape
    k, j, i = np.indices(shape, dtype=np.float32)
    lps = np.stack(
        [grid.origin[0] + i * spacing, grid.origin[1] + j * spacing, grid.origin[2] + k * spacing]
    )
    lps += _elastic_field(rng, shape, pose.elastic_mm, spacing)[[2, 1, 0]]
    # scanner LPS -> subject frame (undo translation, rotation, scale) -> MNI RAS
    rot = _rotation(*np.deg2rad(pose.rotation_deg))
    inv = np.diag(1.0 / np.asarray(pose.scale)) @ rot.T
    pts = lps.reshape(3, -1) - np.asarray(pose.translation_mm)[:, None]
    subj = inv @ pts
    ras = np.stack([-subj[0], -subj[1], subj[2]]) + MNI_CENTRE_RAS[:, None]
    vox = np.linalg.inv(template.affine_ras) @ np.vstack([ras, np.ones((1, ras.shape[1]))])
    coords = vox[:3].astype(np.float32)

    def sample(arr: FloatArray) -> FloatArray:
        out = ndimage.map_coordinates(arr, coords, order=1, mode="constant", cval=0.0)
        return out.reshape(shape).astype(np.float32)

    # template arrays are [x, y, z] (RAS voxel order)
    gm, wm, csf = sample(template.gm), sample(template.wm), sample(template.csf)
    total = gm + wm + csf
    over = total > 1.0
    for arr in (gm, wm, csf):
        arr[over] /= total[over]
    brain = (gm + wm + csf) > 0.5
    # skull and scalp: shells at fixed distances outside the brain surface
    dist = ndimage.distance_transform_edt(~brain, sampling=spacing).astype(np.float32)
    inner, outer = SKULL_INNER_MM, SKULL_INNER_MM + SKULL_THICKNESS_MM
    outside = 1.0 - np.clip(gm + wm + csf, 0.0, 1.0)
    shell_csf = np.clip((inner + spacing / 2 - dist) / spacing, 0, 1) * outside
    bone = _band(dist, inner, outer, spacing) * outside
    fat = _band(dist, outer, outer + SCALP_THICKNESS_MM, spacing) * outside
    csf = np.clip(csf + shell_csf * (dist > 0), 0.0, 1.0)
    return Anatomy(
        grid=grid.with_array(brain),
        wm=wm,
        gm=gm,
        csf=csf.astype(np.float32),
        bone=bone.astype(np.float32),
        fat=fat.astype(np.float32),
    )


def _band(dist: FloatArray, lo: float, hi: float, spacing: float) -> FloatArray:
    """Soft indicator of lo < dist <= hi with a one-voxel ramp at both ends."""
    rise = np.clip((dist - lo) / spacing + 0.5, 0.0, 1.0)
    fall = np.clip((hi - dist) / spacing + 0.5, 0.0, 1.0)
    return (rise * fall).astype(np.float32)
