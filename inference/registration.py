"""Rigid registration of a follow-up study onto the pre-treatment study.

A follow-up scan is acquired in another session: the patient lies a little differently, and the
scanner gives the study its own frame of reference. Before the follow-up can serve as the truth
of a prediction made on the pre-treatment grid, its images must be placed in the pre-treatment
frame. :func:`register_rigid` finds the rigid motion (rotation and shift) that best aligns the
follow-up T1-Gd with the pre-treatment T1-Gd (SimpleITK: Mattes mutual information, a
three-level pyramid, gradient descent over an Euler transform started from the images' centres
of mass); :meth:`RigidTransform.place` then re-expresses a follow-up volume (the T1-Gd or a
reader's mask on its grid) in the pre-treatment frame by moving its grid, without resampling
its voxels.

A registration is accepted only when it is plausible: a rotation of at most
:data:`MAX_ROTATION_DEG` (a head turns by a few degrees between sessions, never by tens) and a
correlation of at least :data:`MIN_CORRELATION` between the two T1-Gd inside the pre-treatment
head once aligned (the anatomy outside the tumour does not change much in two months). Anything
else is refused with an :class:`~dicom_node.errors.InputError` that gives both figures: a
follow-up that cannot be aligned automatically must be registered by the site first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from dicom_node.convert.geometry import grid_centre, moved, resample, sitk_image
from dicom_node.errors import InputError
from dicom_node.types import Volume

log = logging.getLogger(__name__)

#: largest rotation accepted between the sessions, in degrees
MAX_ROTATION_DEG = 30.0
#: smallest correlation accepted between the aligned T1-Gd, inside the pre-treatment head
MIN_CORRELATION = 0.6


@dataclass(frozen=True)
class RigidTransform:
    """``p_fixed = rotation @ p_moving + translation`` (LPS millimetres): where a point of the
    moving frame lies in the fixed frame ``frame_of_reference_uid``. ``correlation``: that of a
    registration's aligned images (:func:`register_rigid`), when it comes from one."""

    rotation: npt.NDArray[np.float64]
    translation: npt.NDArray[np.float64]
    frame_of_reference_uid: str | None
    correlation: float | None = None

    @property
    def rotation_deg(self) -> float:
        cos = (float(np.trace(self.rotation)) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    def shift_mm(self, point: npt.ArrayLike) -> float:
        """How far ``point`` of the moving frame moves (mm)."""
        p = np.asarray(point, dtype=float)
        return float(np.linalg.norm(self.rotation @ p + self.translation - p))

    def place(self, volume: Volume) -> Volume:
        """``volume`` (on the moving frame) re-expressed in the fixed frame: the same voxels,
        its grid rotated and shifted."""
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = self.rotation, self.translation
        return moved(volume, matrix, self.frame_of_reference_uid)

    def describe(self, volume: Volume) -> str:
        shift = self.shift_mm(grid_centre(volume))
        text = f"rotation {self.rotation_deg:.1f} deg, shift {shift:.1f} mm at the image centre"
        return text if self.correlation is None else f"{text}, correlation {self.correlation:.3f}"


def _head(volume: Volume) -> npt.NDArray[np.bool_]:
    """Voxels brighter than a tenth of the 99th percentile: the head, not the air around it."""
    a = np.asarray(volume.array, dtype=np.float32)
    return np.asarray(a > 0.1 * float(np.percentile(a, 99)))


def aligned_correlation(fixed: Volume, moving_placed: Volume) -> float:
    """Pearson correlation of ``fixed`` and ``moving_placed`` (already in the fixed frame,
    resampled onto the fixed grid) over the fixed head voxels that the moving image covers."""
    on_fixed = resample(moving_placed, fixed, order=1, fill=np.nan)
    keep = _head(fixed) & np.isfinite(on_fixed)
    if keep.sum() < 100:
        return 0.0
    a = np.asarray(fixed.array, dtype=np.float64)[keep]
    b = np.asarray(on_fixed, dtype=np.float64)[keep]
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def register_rigid(fixed: Volume, moving: Volume, name: str = "follow-up") -> RigidTransform:
    """The rigid motion placing ``moving`` (the follow-up T1-Gd) on ``fixed`` (the
    pre-treatment T1-Gd), checked for plausibility (see the module); ``name`` prefixes the
    error."""
    import SimpleITK as sitk

    f = sitk_image(fixed, np.asarray(fixed.array, dtype=np.float32))
    m = sitk_image(moving, np.asarray(moving.array, dtype=np.float32))
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)  # faster at these sizes, and one order of summation
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.5, 1)  # a fixed seed of the grid's jitter
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    start = sitk.CenteredTransformInitializer(
        f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method.SetInitialTransform(start, inPlace=False)
    try:
        found = method.Execute(f, m)
    except RuntimeError as exc:
        raise InputError(
            f"{name}: rigid registration onto the pre-treatment T1-Gd failed ({exc}); register "
            "the follow-up to the pre-treatment study first"
        ) from None
    # found maps fixed points to moving points: p_moving = A p_fixed + c; invert it
    points = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.array([found.TransformPoint(tuple(float(v) for v in p)) for p in points])
    c = mapped[0]
    a = (mapped[1:] - c).T
    rotation = np.linalg.inv(a)
    # the nearest rotation (removes the round-off of the point mapping), rounded so that the
    # last bits, which vary between runs, do not reach the voxels resampled through it
    u, _, vt = np.linalg.svd(rotation)
    rotation = np.round(u @ vt, 9)
    registration = RigidTransform(
        rotation=rotation,
        translation=np.round(-rotation @ c, 6),
        frame_of_reference_uid=fixed.frame_of_reference_uid,
    )
    correlation = aligned_correlation(fixed, registration.place(moving))
    registration = replace(registration, correlation=correlation)
    problems = []
    if registration.rotation_deg > MAX_ROTATION_DEG:
        problems.append(
            f"a rotation of {registration.rotation_deg:.1f} deg (expected at most "
            f"{MAX_ROTATION_DEG:g})"
        )
    if not correlation >= MIN_CORRELATION:
        problems.append(
            f"a correlation of {correlation:.3f} between the aligned T1-Gd (expected at least "
            f"{MIN_CORRELATION:g})"
        )
    if problems:
        raise InputError(
            f"{name}: on frame of reference {moving.frame_of_reference_uid or 'none'}, not the "
            f"pre-treatment {fixed.frame_of_reference_uid or 'none'}, and the rigid registration "
            f"found {' and '.join(problems)}; register the follow-up to the pre-treatment study "
            "first"
        )
    log.info("%s: registered onto the pre-treatment T1-Gd: %s", name, registration.describe(moving))
    return registration
