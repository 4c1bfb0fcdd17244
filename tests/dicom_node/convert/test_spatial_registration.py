"""A structure set and a dose drawn on the planning CT's frame of reference are placed on the
MR's by the planning system's Spatial Registration (REG); without one, or with one the node must
not apply, the job is refused with what was expected and what was found."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.convert.rtdose import dose_on_grid
from dicom_node.convert.rtstruct import load_rtstruct_mask
from dicom_node.convert.spatial_registration import (
    DEFORMABLE_REGISTRATION_SOP_CLASS,
    frame_transform,
    read_spatial_registration,
)
from dicom_node.errors import ConversionError
from dicom_node.pipeline import assemble_inputs
from dicom_node.types import Volume
from inference.synthetic.cohort import generate_patient
from inference.synthetic.planning_frame import (
    PlanningFrame,
    registration_dataset,
    rotation_about,
    to_planning_frame,
)

from .synth import rtdose, rtstruct

ROI = r"(?i)^\s*gtv"
SEED, INDEX = 5, 0


def _files(pre: Path) -> dict[str, list[Path]]:
    by_role = {"rtstruct": "RTSTRUCT", "rtdose": "RTDOSE"}
    files = {role: sorted((pre / folder).glob("*.dcm")) for role, folder in by_role.items()}
    (t1c,) = [d for d in pre.iterdir() if d.name.endswith("_t1c")]
    files["t1c"] = sorted(t1c.glob("*.dcm"))
    return files


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic patient's pre-treatment study as written (RT objects on the MR's frame) and
    a copy with its RTSTRUCT and RTDOSE moved onto a planning frame, with the REG."""
    out = tmp_path_factory.mktemp("planning")
    generate_patient(INDEX, SEED, out, spacing_mm=4.0, formats=("dicom",))
    (pre,) = out.glob("*/dicom/pre")
    planned = out / "planned"
    shutil.copytree(pre, planned)
    to_planning_frame(planned, SEED, INDEX)
    return pre, planned


def test_planning_frame_structure_set_and_dose_land_where_they_were(
    studies: tuple[Path, Path], dciodvfy: str
) -> None:
    pre, planned = studies
    rs = pydicom.dcmread(planned / "RTSTRUCT" / "rtstruct.dcm")
    t1c = pydicom.dcmread(_files(pre)["t1c"][0], stop_before_pixels=True)
    assert rs.StructureSetROISequence[0].ReferencedFrameOfReferenceUID != t1c.FrameOfReferenceUID
    direct = assemble_inputs(_files(pre), ROI, pytest.fail)
    placed = assemble_inputs(_files(planned), ROI, pytest.fail, [planned / "REG" / "reg.dcm"])
    # the contours, moved to the planning frame and back, fill the same voxels
    assert placed.tumour_mask.array.sum() == direct.tumour_mask.array.sum() > 50
    assert np.array_equal(placed.tumour_mask.array, direct.tumour_mask.array)
    # the dose grid is placed, not resampled twice: the same values to the stored precision
    assert placed.dose is not None and direct.dose is not None
    assert float(np.max(np.abs(placed.dose.array - direct.dose.array))) < 0.01
    assert float(direct.dose.array.max()) > 50
    # without the registration: refused, saying what to send
    with pytest.raises(ConversionError) as err:
        assemble_inputs(_files(planned), ROI, pytest.fail)
    assert "expected the same frame of reference or a Spatial Registration" in str(err.value)
    assert rs.StructureSetROISequence[0].ReferencedFrameOfReferenceUID in str(err.value)
    # the REG is a valid Spatial Registration object (dicom3tools)
    checked = subprocess.run(
        [dciodvfy, str(planned / "REG" / "reg.dcm")], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in checked.stderr.splitlines() if line.startswith("Error")]
    assert "SpatialRegistration" in checked.stderr and not errors, checked.stderr


def _sphere_contours(
    centre: npt.NDArray[np.float64], radius: float, step: float
) -> list[npt.NDArray[np.float64]]:
    """Axial circles of a sphere every ``step`` mm, as a planning system contours on CT."""
    out = []
    for z in np.arange(-radius + step / 2, radius, step):
        r = np.sqrt(radius**2 - z**2)
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        out.append(centre + np.c_[r * np.cos(t), r * np.sin(t), np.full_like(t, z)])
    return out


def test_axial_ct_contours_and_dose_on_a_rotated_mr() -> None:
    """CT-axial contours of a sphere, 2.5 mm apart, on an MR grid rotated by 12 degrees and
    shifted: the mask is the sphere where the registration puts it, the dose is sampled there."""
    ct_for, mr_for = generate_uid(), generate_uid()
    frame = PlanningFrame(rotation_about([1, 2, 0.5], 12.0), np.array([30.0, -20.0, 15.0]), ct_for)
    reg_ds = registration_dataset(
        pydicom.Dataset(), mr_for, frame, generate_uid(), generate_uid(), _when()
    )
    regs = [read_spatial_registration(reg_ds)]
    mr = Volume(
        array=np.zeros((48, 64, 64), dtype=np.uint16), spacing=(1.5, 1.5, 2.0),
        origin=(-48.0, -48.0, -48.0), direction=np.eye(3), frame_of_reference_uid=mr_for,
    )  # fmt: skip
    centre_mr = np.array([4.0, -6.0, 3.0])
    centre_ct = frame.rotation @ centre_mr + frame.translation
    structure = rtstruct(ct_for, {"GTV": _sphere_contours(centre_ct, 18.0, 2.5)})
    mask = load_rtstruct_mask(structure, mr, ROI, registrations=regs).array
    k, j, i = np.indices(mr.shape)
    pts = np.stack([i * 1.5 - 48.0, j * 1.5 - 48.0, k * 2.0 - 48.0], axis=-1)
    truth = np.linalg.norm(pts - centre_mr, axis=-1) < 18.0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95, dice
    # a dose that is 2 Gy per mm along the CT's x axis, on a CT-axial grid
    dose = rtdose(
        lambda p: 100.0 + 2.0 * p[:, 0], shape=(40, 60, 60), origin=(-60.0, -60.0, -40.0),
        spacing=(2.5, 2.5, 2.5), frame_uid=ct_for,
    )  # fmt: skip
    sampled = dose_on_grid(dose, mr, regs).array
    expected = 100.0 + 2.0 * (pts @ frame.rotation.T + frame.translation)[..., 0]
    inside = truth  # well inside both grids
    assert float(np.max(np.abs(sampled[inside] - expected[inside]))) < 0.05


def _when():  # type: ignore[no-untyped-def]
    import datetime

    return datetime.datetime(2026, 1, 1, 12, 0, 0)


def _reg(mr_for: str, ct_for: str, matrix: npt.NDArray[np.float64]) -> pydicom.Dataset:
    frame = PlanningFrame(matrix[:3, :3], matrix[:3, 3], ct_for)
    return registration_dataset(
        pydicom.Dataset(), mr_for, frame, generate_uid(), generate_uid(), _when()
    )


def test_registrations_the_node_must_not_apply_are_refused() -> None:
    mr_for, ct_for = generate_uid(), generate_uid()
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = rotation_about([0, 0, 1], 5.0), [10.0, 0.0, 0.0]
    ok = read_spatial_registration(_reg(mr_for, ct_for, rigid))
    matrix, reg = frame_transform([ok], ct_for, mr_for, "GTV")
    assert reg is ok and np.allclose(matrix, np.linalg.inv(rigid))
    assert frame_transform([ok], mr_for, mr_for, "GTV")[1] is None
    # a shear is not a rigid registration
    sheared = rigid.copy()
    sheared[0, 1] += 0.2
    with pytest.raises(ConversionError, match="shears, scales unevenly or mirrors"):
        read_spatial_registration(_reg(mr_for, ct_for, sheared))
    # RIGID that scales
    scaled = rigid.copy()
    scaled[:3, :3] *= 1.1
    with pytest.raises(ConversionError, match=r"matrix type RIGID but the matrix scales by 1\.1"):
        read_spatial_registration(_reg(mr_for, ct_for, scaled))
    # a deformable registration
    deformable = _reg(mr_for, ct_for, rigid)
    deformable.SOPClassUID = DEFORMABLE_REGISTRATION_SOP_CLASS
    with pytest.raises(
        ConversionError, match="a Deformable Spatial Registration; expected a rigid"
    ):
        read_spatial_registration(deformable)
    # the registered frame mapped onto itself by something else than the identity
    self_moved = _reg(mr_for, ct_for, rigid)
    self_moved.RegistrationSequence[0].MatrixRegistrationSequence[0].MatrixSequence[
        0
    ].FrameOfReferenceTransformationMatrix = [format(float(v), ".10g") for v in rigid.ravel()]
    with pytest.raises(ConversionError, match="expected the identity"):
        read_spatial_registration(self_moved)
    # two registrations of the same frames that disagree by more than a voxel's worth
    other = rigid.copy()
    other[:3, 3] = [14.0, 0.0, 0.0]
    second = read_spatial_registration(_reg(mr_for, ct_for, other))
    with pytest.raises(ConversionError, match=r"differ by 0.00 degrees and 4.00 mm"):
        frame_transform([ok, second], ct_for, mr_for, "GTV")
    # a registration of other frames: the message lists what it relates
    elsewhere = generate_uid()
    with pytest.raises(ConversionError) as err:
        frame_transform([ok], elsewhere, mr_for, "GTV")
    assert f"found registrations of ['{ct_for} <- {mr_for}']" in str(err.value)
    assert f"GTV is on frame of reference {elsewhere}" in str(err.value)
