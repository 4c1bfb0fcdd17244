"""DICOM Spatial Registration objects (REG): how to bring a structure set or a dose drawn on
another frame of reference (the planning CT's) onto the MR's.

A planning system contours the GTV and computes the dose on the planning CT; the MR it used is
registered to that CT, and the registration is exported as a Spatial Registration object
(PS3.3 C.20.2). Its Frame of Reference UID is the registered frame (RCS_A, normally the CT's);
each item of its Registration Sequence names another frame (RCS_B) and the Frame of Reference
Transformation Matrix that maps a point of RCS_B into RCS_A. Several matrices in one item's
Matrix Sequence are applied in the order listed.

Public entry points:

- :func:`read_spatial_registration` - the frames and matrices of one REG instance;
- :func:`frame_transform` - the matrix mapping points of one frame into another, found in the
  study's registrations (``A -> B`` = inverse of ``B -> REG`` times ``A -> REG``).

Only rigid registrations (RIGID, RIGID_SCALE, or AFFINE matrices that are a rotation with a
uniform scale) are used; a Deformable Spatial Registration is refused: a deformation would need
its vector field, and a planning system's rigid registration is the one its plan used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dicom_node.convert._dataset import (
    Source,
    get_floats,
    get_items,
    get_str,
    read_dataset,
    source_name,
)
from dicom_node.errors import ConversionError

log = logging.getLogger(__name__)

SPATIAL_REGISTRATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"
DEFORMABLE_REGISTRATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.3"
MATRIX_TYPES = ("RIGID", "RIGID_SCALE", "AFFINE")
#: largest tolerated deviation from a rotation (times a uniform scale) and from (0, 0, 0, 1)
MATRIX_TOLERANCE = 1e-3
#: two registrations of the same pair of frames must agree within these
AGREE_ROTATION_DEG = 0.1
AGREE_SHIFT_MM = 0.5


@dataclass(frozen=True)
class FrameRegistration:
    """One REG instance: ``matrices[uid]`` maps points of frame ``uid`` into
    ``frame_of_reference_uid`` (the registered frame)."""

    sop_instance_uid: str
    frame_of_reference_uid: str
    matrices: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    name: str = ""

    def to_registered(self, uid: str) -> npt.NDArray[np.float64] | None:
        if uid == self.frame_of_reference_uid:
            return np.eye(4)
        return self.matrices.get(uid)


def rotation_deg(matrix: npt.NDArray[np.float64]) -> float:
    """The rotation angle of a rigid (or uniformly scaled) 4x4 matrix, degrees."""
    r = matrix[:3, :3] / np.cbrt(np.linalg.det(matrix[:3, :3]))
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def _check_matrix(values: list[float], kind: str, where: str) -> npt.NDArray[np.float64]:
    m = np.asarray(values, dtype=float).reshape(4, 4)  # row-major, PS3.3 C.20.2.1.1
    if np.max(np.abs(m[3] - [0.0, 0.0, 0.0, 1.0])) > MATRIX_TOLERANCE:
        raise ConversionError(
            f"{where}: expected a homogeneous matrix ending in the row 0 0 0 1, found "
            f"{m[3].tolist()}"
        )
    if kind not in MATRIX_TYPES:
        raise ConversionError(
            f"{where}: expected a matrix type among {list(MATRIX_TYPES)}, found {kind!r}"
        )
    r = m[:3, :3]
    det = float(np.linalg.det(r))
    scale = np.cbrt(det) if det > 0 else 0.0
    if scale <= 0 or np.max(np.abs(r.T @ r / scale**2 - np.eye(3))) > MATRIX_TOLERANCE:
        raise ConversionError(
            f"{where}: expected a rigid registration (a rotation, optionally with a uniform "
            f"scale), found a {kind} matrix that shears, scales unevenly or mirrors "
            f"({np.round(r, 4).tolist()}); such a registration is not applied"
        )
    if kind == "RIGID" and abs(scale - 1.0) > MATRIX_TOLERANCE:
        raise ConversionError(
            f"{where}: matrix type RIGID but the matrix scales by {scale:.4f}; expected a "
            "rotation and a translation"
        )
    return m


def read_spatial_registration(source: Source, index: int = 0) -> FrameRegistration:
    """The registered frame and, per other frame, the matrix into it, of one REG instance."""
    name = source_name(source, index)
    ds = read_dataset(source, name, stop_before_pixels=True)
    sop_class = get_str(ds, "SOPClassUID", name)
    if sop_class == DEFORMABLE_REGISTRATION_SOP_CLASS:
        raise ConversionError(
            f"{name}: a Deformable Spatial Registration; expected a rigid Spatial Registration "
            f"({SPATIAL_REGISTRATION_SOP_CLASS}), the one the planning system applied to the MR"
        )
    if sop_class != SPATIAL_REGISTRATION_SOP_CLASS:
        raise ConversionError(
            f"{name}: expected a Spatial Registration ({SPATIAL_REGISTRATION_SOP_CLASS}), found "
            f"SOP class {sop_class}"
        )
    registered = get_str(ds, "FrameOfReferenceUID", name)
    if not registered:
        raise ConversionError(f"{name}: FrameOfReferenceUID is required but missing or empty")
    matrices: dict[str, npt.NDArray[np.float64]] = {}
    for n, item in enumerate(get_items(ds, "RegistrationSequence", name), start=1):
        where = f"{name}: registration item {n}"
        uid = get_str(item, "FrameOfReferenceUID", where)
        if not uid:
            log.warning("%s names no frame of reference (images only): not used", where)
            continue
        combined = np.eye(4)
        found = 0
        for mreg in get_items(item, "MatrixRegistrationSequence", where):
            for k, matrix in enumerate(get_items(mreg, "MatrixSequence", where), start=1):
                values = get_floats(matrix, "FrameOfReferenceTransformationMatrix", where, 16)
                if values is None:
                    raise ConversionError(
                        f"{where}, matrix {k}: FrameOfReferenceTransformationMatrix is required "
                        "but missing or empty"
                    )
                kind = get_str(matrix, "FrameOfReferenceTransformationMatrixType", where, "")
                combined = _check_matrix(values, kind or "", f"{where}, matrix {k}") @ combined
                found += 1
        if not found:
            raise ConversionError(f"{where}: expected a Matrix Registration Sequence, found none")
        if uid == registered:
            if np.max(np.abs(combined - np.eye(4))) > MATRIX_TOLERANCE:
                raise ConversionError(
                    f"{where}: maps the registered frame {uid} onto itself by a matrix that is "
                    "not the identity; expected the identity"
                )
            continue
        matrices[uid] = combined
    if not matrices:
        raise ConversionError(
            f"{name}: expected a registration of another frame of reference onto {registered}, "
            "found none"
        )
    return FrameRegistration(
        sop_instance_uid=get_str(ds, "SOPInstanceUID", name, "") or "",
        frame_of_reference_uid=registered,
        matrices=matrices,
        name=name,
    )


def frame_transform(
    registrations: Sequence[FrameRegistration], source: str, target: str, what: str
) -> tuple[npt.NDArray[np.float64], FrameRegistration | None]:
    """The 4x4 matrix mapping points of frame ``source`` into frame ``target`` and the
    registration it came from (``None`` when the frames are the same). ``what`` names the object
    on ``source`` for the messages. Raises when no registration relates the two frames, or
    when two do and disagree."""
    if source == target:
        return np.eye(4), None
    found: list[tuple[npt.NDArray[np.float64], FrameRegistration]] = []
    for reg in registrations:
        to_a, from_b = reg.to_registered(source), reg.to_registered(target)
        if to_a is not None and from_b is not None:
            found.append((np.linalg.inv(from_b) @ to_a, reg))
    if not found:
        related = sorted(
            {f"{r.frame_of_reference_uid} <- {uid}" for r in registrations for uid in r.matrices}
        )
        raise ConversionError(
            f"{what} is on frame of reference {source} but the T1-Gd is on {target}; expected "
            "the same frame of reference or a Spatial Registration relating the two (send the "
            "registration the planning system made with the study), found "
            + (f"registrations of {related}" if related else "no Spatial Registration")
        )
    first, reg = found[0]
    for other, other_reg in found[1:]:
        diff = np.linalg.inv(first) @ other
        shift = float(np.linalg.norm(diff[:3, 3]))
        if rotation_deg(diff) > AGREE_ROTATION_DEG or shift > AGREE_SHIFT_MM:
            raise ConversionError(
                f"{what}: the Spatial Registrations {reg.sop_instance_uid} and "
                f"{other_reg.sop_instance_uid} both relate frame {source} to {target} and differ "
                f"by {rotation_deg(diff):.2f} degrees and {shift:.2f} mm; expected one "
                "registration, or registrations that agree"
            )
    return first, reg


def load_registrations(sources: Sequence[Source]) -> list[FrameRegistration]:
    return [read_spatial_registration(s, n) for n, s in enumerate(sources)]
