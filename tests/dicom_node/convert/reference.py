"""Independent references for the conversion tests: dcm2niix, SimpleITK/GDCM, point-in-polygon."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from dicom_node.types import Volume


def sitk_to_volume(image: sitk.Image) -> Volume:
    """A SimpleITK image (LPS) as a Volume, array [k, j, i]."""
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
        direction=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
    )


def dcm2niix_volume(files: Sequence[Path], workdir: Path, *extra: str) -> Volume:
    """Convert ``files`` (one series) with Debian's dcm2niix, read the NIfTI back (LPS)."""
    from tests.conftest import tool

    exe = tool("dcm2niix")
    src = workdir / "in"
    out = workdir / "out"
    src.mkdir(parents=True)
    out.mkdir(parents=True)
    for n, f in enumerate(files):
        shutil.copy(f, src / f"{n:04d}.dcm")
    proc = subprocess.run(
        [exe, "-z", "n", "-b", "n", "-f", "ref", *extra, "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    niftis = [out / "ref.nii"] if (out / "ref.nii").exists() else sorted(out.glob("*.nii"))
    assert proc.returncode == 0 and len(niftis) == 1, (proc.stdout, proc.stderr, niftis)
    return sitk_to_volume(sitk.ReadImage(str(niftis[0])))


def gdcm_series_volume(files: Sequence[Path]) -> Volume:
    """Read a series with SimpleITK's GDCM-based series reader (sorted along the normal)."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(Path(files[0]).parent))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return sitk_to_volume(reader.Execute())


def align_to(ours: Volume, ref: Volume, tol_mm: float = 1e-2) -> npt.NDArray[np.generic]:
    """Our array re-indexed onto ``ref``'s voxel order, after checking the grids coincide.

    The index map ``inv(A_ref) @ A_ours`` must be a signed permutation with an integer
    translation (same voxel centres, possibly other axis order/direction); anything else fails.
    """
    m = np.linalg.inv(ref.affine) @ ours.affine
    perm = np.round(m[:3, :3])
    # the grids must coincide at every corner to within tol_mm
    corners = np.array(
        [
            [x, y, z, 1]
            for x in (0, ours.shape[2] - 1)
            for y in (0, ours.shape[1] - 1)
            for z in (0, ours.shape[0] - 1)
        ],
        dtype=float,
    ).T
    ref_idx = m @ corners
    assert np.max(np.abs(ref_idx[:3] - np.round(ref_idx[:3]))) * max(ref.spacing) < tol_mm, m
    assert np.all(np.abs(np.abs(perm).sum(axis=0) - 1) < 1e-9), m
    assert np.max(np.abs(m[:3, :3] - perm)) < 1e-3, m
    a_ijk = np.asarray(ours.array).transpose(2, 1, 0)
    src_axis = [int(np.nonzero(perm[r])[0][0]) for r in range(3)]
    out = a_ijk.transpose(src_axis)
    for r in range(3):
        if perm[r, src_axis[r]] < 0:
            out = np.flip(out, axis=r)
    ref_shape_ijk = tuple(reversed(ref.shape))
    assert out.shape == ref_shape_ijk, (out.shape, ref_shape_ijk)
    return np.asarray(out.transpose(2, 1, 0))


def point_in_polygons(
    points: npt.NDArray[np.float64], polygons: Sequence[npt.NDArray[np.float64]]
) -> npt.NDArray[np.bool_]:
    """Even-odd point-in-polygon test (crossing number, W. R. Franklin's PNPOLY form)."""
    inside = np.zeros(len(points), dtype=bool)
    px, py = points[:, 0], points[:, 1]
    for poly in polygons:
        xs, ys = poly[:, 0], poly[:, 1]
        n = len(poly)
        for a in range(n):
            b = a - 1
            xi, yi, xj, yj = xs[a], ys[a], xs[b], ys[b]
            if yi == yj:
                continue
            cond = ((yi > py) != (yj > py)) & (px < (xj - xi) * (py - yi) / (yj - yi) + xi)
            inside ^= cond
    return inside


def supersampled_reference(
    polygons_by_slice: dict[int, list[npt.NDArray[np.float64]]],
    shape: tuple[int, int, int],
    factor: int = 4,
) -> npt.NDArray[np.bool_]:
    """Mask from the covered area fraction (>= 0.5) of ``factor`` x ``factor`` sub-samples.

    The fine grid is filled by OpenCV's polygon filler (even-odd over all polygons of a slice,
    vertices at 1/256 fine-pixel precision): an implementation independent of ours.
    """
    import cv2

    _, nj, ni = shape
    mask = np.zeros(shape, dtype=bool)
    shift = 8
    for k, polys in polygons_by_slice.items():
        if not 0 <= k < shape[0]:
            continue
        canvas = np.zeros((nj * factor, ni * factor), dtype=np.uint8)
        # fine pixel u has its centre at coarse coordinate (u + 0.5) / factor - 0.5
        pts = [
            np.round((np.asarray(p) * factor + (factor - 1) / 2) * 2**shift).astype(np.int32)
            for p in polys
        ]
        cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=shift)
        covered = canvas.reshape(nj, factor, ni, factor).mean(axis=(1, 3))
        mask[k] = covered >= 0.5
    return mask


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
