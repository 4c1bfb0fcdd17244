"""The predicted tumour on the planning CT's frame (RTSTRUCT PLAN FRAME, series 9007), as a
planner imports it: every contour on a plane of the structure set the GTV came in (the planning
CT's slices, which Eclipse-class systems require), enclosing the predicted tumour where the
registration puts it.

The studies are made as a planning system exports them: the GTV contoured on CT slices
(parallel planes 2.5 mm apart, off the origin) of the planning frame, the MR related to it by a
Spatial Registration rotating by several degrees; the node reads the GTV (which finds the CT's
planes) and writes the prediction back onto that frame. Each check below is done with this
file's own numpy, on the written dataset.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.convert.rtstruct import load_placed_rtstruct_mask
from dicom_node.convert.spatial_registration import read_spatial_registration
from dicom_node.pipeline import assemble_inputs
from dicom_node.types import FrameMapping, PlaneLattice, SeriesRef
from inference.synthetic.cohort import generate_patient
from inference.synthetic.planning_frame import (
    PlanningFrame,
    registration_dataset,
    rotation_about,
    to_planning_frame,
)
from sr_writer.labels import Equipment
from sr_writer.outputs import (
    NOTHING_OUTLINED,
    JobInputs,
    OutputOptions,
    build_outputs,
    build_prediction_rtstruct,
)
from tests.dicom_node.convert.synth import rtstruct
from tests.sr_writer.synthetic_job import FOR_UID, JobCase, job_inputs, make_case

CT_STEP = 2.5  # mm between the planning CT's slices
CT_FIRST = 0.7  # one CT slice's position along the CT's slice normal (mm)
NEAR_PLANE_MM = 0.01  # how far a contour point may lie from its CT plane


def _tilted(degrees: float) -> npt.NDArray[np.float64]:
    """An oblique MR: rows and columns turned about two axes."""
    return rotation_about([0.3, 1.0, 0.2], degrees)


@dataclasses.dataclass(frozen=True)
class PlanStudy:
    case: JobCase  # the MR study and the prediction on it
    to_plan: npt.NDArray[np.float64]  # 4x4, MR frame -> planning frame
    ct_normal: npt.NDArray[np.float64]  # the planning CT's slice normal
    frame: FrameMapping  # what the node read from the GTV
    gtv_planes: npt.NDArray[np.float64]  # the GTV's contour positions along ct_normal


def _ellipsoid(
    points: npt.NDArray[np.float64], centre: npt.NDArray[np.float64], radii: tuple[float, ...]
) -> npt.NDArray[np.bool_]:
    return np.asarray(np.sum(((points - centre) / np.asarray(radii)) ** 2, axis=-1) <= 1.0)


def _voxel_centres(case: JobCase) -> npt.NDArray[np.float64]:
    k, j, i = np.indices(case.t1c.shape)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return np.asarray((ijk1 @ case.t1c.affine.T)[..., :3])


def _plan_study(
    mr_direction: npt.NDArray[np.float64],
    rotation: npt.NDArray[np.float64],
    ct_tilt: npt.NDArray[np.float64] | None = None,
    *,
    empty: bool = False,
) -> PlanStudy:
    """An MR of ``mr_direction`` (30 slices 2 mm apart, 0.9 mm pixels), a planning frame
    ``rotation`` away (and shifted), a GTV drawn on the CT's slices (axial, or turned by
    ``ct_tilt``: a gantry tilt) and read by the node, and a predicted tumour on the MR grid:
    an ellipsoid with a hole (empty with ``empty``)."""
    ct_for = generate_uid()
    case = make_case((30, 64, 64), spacing=(0.9, 0.9, 2.0), direction=mr_direction)
    to_plan = np.eye(4)
    to_plan[:3, :3], to_plan[:3, 3] = rotation, (12.0, -25.0, 31.0)
    centres = _voxel_centres(case)
    middle = centres[15, 32, 32]
    # the GTV on the CT's planes: ellipses 14 x 11 mm across, 12 mm high
    ct_axes = np.eye(3) if ct_tilt is None else ct_tilt
    ex, ey, n = ct_axes[:, 0], ct_axes[:, 1], ct_axes[:, 2]
    centre_ct = rotation @ middle + to_plan[:3, 3]
    contours = []
    for m in range(-100, 100):
        level = CT_FIRST + m * CT_STEP
        dz = level - n @ centre_ct
        f = 1 - (dz / 12.0) ** 2
        if f <= 0.05:
            continue
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        on_plane = centre_ct + dz * n
        contours.append(
            on_plane
            + np.outer(14 * np.sqrt(f) * np.cos(t), ex)
            + np.outer(11 * np.sqrt(f) * np.sin(t), ey)
        )
    structure = rtstruct(ct_for, {"GTV": contours})
    reg = registration_dataset(
        Dataset(),
        FOR_UID,
        PlanningFrame(rotation, to_plan[:3, 3], ct_for),
        generate_uid(),
        generate_uid(),
        datetime.datetime(2026, 1, 1, 12, 0, 0),
    )
    _, frame = load_placed_rtstruct_mask(
        structure, case.t1c, r"(?i)^gtv", registrations=[read_spatial_registration(reg)]
    )
    assert frame is not None and frame.frame_of_reference_uid == ct_for
    # the predicted tumour: an ellipsoid near the GTV, turned, with a hole in it
    turned = (centres - middle - 2.0) @ rotation_about([0, 0, 1], 25.0)
    mask = _ellipsoid(turned, np.zeros(3), (11.0, 9.0, 8.0))
    mask &= ~_ellipsoid(turned, np.zeros(3), (4.0, 3.0, 3.5))
    if empty:
        mask[:] = False
    prediction = dataclasses.replace(
        case.prediction, tumour_mask=case.prediction.tumour_mask.with_array(mask)
    )
    case = dataclasses.replace(case, prediction=prediction)
    gtv_planes = np.array([float(n @ c.mean(axis=0)) for c in contours])
    return PlanStudy(case, to_plan, n, frame, gtv_planes)


def _plan_rtstruct(study: PlanStudy, frame: FrameMapping | None = None) -> Dataset:
    """The RTSTRUCT on the planning frame (``frame``, default the one the node read)."""
    frame = frame or study.frame
    inputs = dataclasses.replace(job_inputs(study.case), planning_frame=frame)
    return build_prediction_rtstruct(
        prediction=study.case.prediction,
        inputs=inputs,
        job=study.case.job,
        equipment=_equipment(study.case),
        frame=frame,
    )


def _equipment(case: JobCase) -> Equipment:
    return Equipment(
        model_name=case.prediction.model_name,
        model_version=case.prediction.model_version,
        node_version="0.1.0",
    )


def _contours(ds: Dataset) -> list[npt.NDArray[np.float64]]:
    return [
        np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
        for roi in ds.ROIContourSequence
        for c in roi.get("ContourSequence", [])
    ]


def _even_odd(
    points: npt.NDArray[np.float64], polygons: list[npt.NDArray[np.float64]]
) -> npt.NDArray[np.bool_]:
    """Which 2D ``points`` (m, 2) are inside ``polygons`` (each (n, 2)) taken together by the
    even-odd rule (a ray along +x crosses their edges an odd number of times)."""
    inside = np.zeros(len(points), dtype=bool)
    x, y = points[:, :1], points[:, 1:]
    for poly in polygons:
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        spans = (y0 <= y) != (y1 <= y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= (np.count_nonzero(spans & (x < at), axis=1) % 2).astype(bool)
    return inside


def _placed_truth(study: PlanStudy, points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """The predicted mask at ``points`` of the planning frame: the MR voxel each one falls
    in, by the inverse of the registration (outside the MR grid: not in)."""
    back = np.linalg.inv(study.to_plan)
    mr = points @ back[:3, :3].T + back[:3, 3]
    t1c = study.case.t1c
    ijk = np.c_[mr, np.ones(len(mr))] @ np.linalg.inv(t1c.affine).T
    idx = np.rint(ijk[:, :3]).astype(int)
    nk, nj, ni = t1c.shape
    ok = np.all((idx >= 0) & (idx < [ni, nj, nk]), axis=1)
    out = np.zeros(len(points), dtype=bool)
    mask = np.asarray(study.case.prediction.tumour_mask.array, dtype=bool)
    out[ok] = mask[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
    return out


CASES = {
    "axial MR, 10 degrees": (np.eye(3), rotation_about([1.0, 0.5, 0.33], 10.0), None),
    "oblique MR, 10 degrees": (_tilted(20.0), rotation_about([1.0, 0.5, 0.33], 10.0), None),
    "axial MR, 6 degrees, CT gantry tilted": (
        np.eye(3),
        rotation_about([0.2, -1.0, 0.4], 6.0),
        rotation_about([1.0, 0.0, 0.0], 15.0),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_frame_contours_lie_on_the_planning_ct_slices(name: str) -> None:
    mr_direction, rotation, ct_tilt = CASES[name]
    study = _plan_study(mr_direction, rotation, ct_tilt)
    # what the node read: the GTV's planes
    lattice = study.frame.planes
    assert lattice is not None
    assert abs(float(np.asarray(lattice.normal) @ study.ct_normal)) > 1 - 1e-9
    ds = _plan_rtstruct(study)
    contours = _contours(ds)
    assert len(contours) >= 8
    n = study.ct_normal
    levels = []
    for pts in contours:
        along = pts @ n
        # flat: every point on one plane
        assert np.ptp(along) <= NEAR_PLANE_MM, np.ptp(along)
        # that plane is one of the CT's: on the lattice of the GTV's planes
        m = (along.mean() - CT_FIRST) / CT_STEP
        assert abs(m - round(m)) * CT_STEP <= NEAR_PLANE_MM, along.mean()
        levels.append(round(m))
    # the predicted tumour is 16 mm high at most: 6 or 7 CT planes cut it
    assert 5 <= len(set(levels)) <= 8, sorted(set(levels))
    # the GTV's own planes are on that lattice too (the test's lattice is the input's)
    off = (study.gtv_planes - CT_FIRST) / CT_STEP
    assert np.max(np.abs(off - np.round(off))) * CT_STEP < 1e-3

    # the region the contours enclose, filled by the even-odd rule on each plane, is the
    # predicted tumour placed on the planning frame (sampled every 0.25 mm on every plane it
    # may reach, including those without contours)
    ex = np.cross(n, [0.0, 1.0, 0.0] if abs(n[1]) < 0.9 else [1.0, 0.0, 0.0])
    ex /= np.linalg.norm(ex)
    ey = np.cross(n, ex)
    back_mask = np.asarray(study.case.prediction.tumour_mask.array, dtype=bool)
    voxels = _voxel_centres(study.case)[back_mask]
    on_plan = voxels @ study.to_plan[:3, :3].T + study.to_plan[:3, 3]
    centre = on_plan.mean(axis=0)
    half = np.max(np.linalg.norm(on_plan - centre, axis=1)) + 3.0
    a = np.arange(-half, half, 0.25)
    aa, bb = (g.ravel() for g in np.meshgrid(a, a))
    lo = int(np.floor((float((on_plan @ n).min()) - CT_FIRST) / CT_STEP)) - 1
    hi = int(np.ceil((float((on_plan @ n).max()) - CT_FIRST) / CT_STEP)) + 1
    drawn_all, truth_all = [], []
    by_level: dict[int, list[npt.NDArray[np.float64]]] = {}
    for pts, m in zip(contours, levels, strict=True):
        by_level.setdefault(m, []).append(pts)
    assert set(by_level) <= set(range(lo, hi + 1))
    for m in range(lo, hi + 1):
        level = CT_FIRST + m * CT_STEP
        base = centre + (level - centre @ n) * n
        points = base + np.outer(aa, ex) + np.outer(bb, ey)
        polygons = [np.c_[(p - base) @ ex, (p - base) @ ey] for p in by_level.get(m, [])]
        drawn_all.append(_even_odd(np.c_[aa, bb], polygons))
        truth_all.append(_placed_truth(study, points))
    drawn, truth = np.concatenate(drawn_all), np.concatenate(truth_all)
    dice = 2 * np.count_nonzero(drawn & truth) / (drawn.sum() + truth.sum())
    # trilinear placing (the node) against nearest-voxel lookup (here) differ only along
    # the boundary of a 22 x 18 x 16 mm ellipsoid sampled by 0.9 x 0.9 x 2 mm voxels
    assert dice >= 0.95, dice
    # the hole is a contour of its own, inside the outline on its plane
    assert any(len(p) >= 2 for p in by_level.values())


def test_plan_frame_rtstruct_keeps_its_identity_and_drops_image_references() -> None:
    study = _plan_study(np.eye(3), rotation_about([1.0, 0.5, 0.33], 10.0))
    ds = _plan_rtstruct(study)
    job = study.case.job
    assert ds.SeriesInstanceUID == job.series_uid("rtstruct-planning")
    assert ds.SOPInstanceUID == job.instance_uid("rtstruct-planning")
    assert int(ds.SeriesNumber) == 9007
    assert ds.SeriesDescription.endswith("RTSTRUCT PLAN FRAME")
    assert ds.StructureSetLabel == "PREDICTION"
    assert ds.StructureSetDescription == (
        "Predicted post-treatment tumour; synthetic, research use only; on the planning frame "
        "of reference"
    )
    uid = study.frame.frame_of_reference_uid
    assert ds.FrameOfReferenceUID == uid
    assert [str(r.FrameOfReferenceUID) for r in ds.ReferencedFrameOfReferenceSequence] == [uid]
    assert "RTReferencedStudySequence" not in ds.ReferencedFrameOfReferenceSequence[0]
    assert ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == uid
    assert ds.StructureSetROISequence[0].ROIName == "PRED_TUMOUR"
    for roi in ds.ROIContourSequence:
        for c in roi.ContourSequence:
            assert "ContourImageSequence" not in c
            assert c.ContourGeometricType == "CLOSED_PLANAR"
    assert ds.ContentQualification == "RESEARCH"


def test_without_the_planes_the_contours_are_mapped_as_before() -> None:
    """A frame whose planes are not known (a GTV on a single plane): each MR contour moved by
    the matrix, on the MR's slices carried over."""
    study = _plan_study(np.eye(3), rotation_about([1.0, 0.5, 0.33], 10.0))
    ds = _plan_rtstruct(study, dataclasses.replace(study.frame, planes=None))
    on_mr = build_prediction_rtstruct(
        prediction=study.case.prediction, inputs=job_inputs(study.case), job=study.case.job,
        equipment=_equipment(study.case),
    )  # fmt: skip
    moved = [p @ study.to_plan[:3, :3].T + study.to_plan[:3, 3] for p in _contours(on_mr)]
    assert len(moved) == len(_contours(ds))
    for a, b in zip(moved, _contours(ds), strict=True):
        assert np.allclose(a, b, atol=1e-3)


def test_plan_frame_rtstruct_passes_dciodvfy(dciodvfy: str, tmp_path: Path) -> None:
    for name, (mr_direction, rotation, ct_tilt) in CASES.items():
        ds = _plan_rtstruct(_plan_study(mr_direction, rotation, ct_tilt))
        path = tmp_path / "plan.dcm"
        ds.save_as(path, enforce_file_format=True)
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        text = proc.stdout + proc.stderr
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert "RTStructureSet" in text and errors == [], f"{name}:\n{text}"
        assert pydicom.dcmread(path).ROIContourSequence[0].ContourSequence


def test_an_empty_prediction_says_why_its_roi_has_no_contour(dciodvfy: str, tmp_path: Path) -> None:
    """The samples drew tumour (the SR's mean volume) but agree on no voxel: both structure
    sets keep the ROI, without contours, and say why."""
    study = _plan_study(_tilted(20.0), rotation_about([1.0, 0.5, 0.33], 10.0), empty=True)
    inputs = dataclasses.replace(job_inputs(study.case), planning_frame=study.frame)
    out = build_outputs(study.case.prediction, inputs, OutputOptions(node_version="0.1.0"))
    assert out.rtstruct_planning is not None
    assert NOTHING_OUTLINED == "no voxel outlined: the samples agree on no tumour"
    for ds in (out.rtstruct, out.rtstruct_planning):
        (roi,) = ds.ROIContourSequence
        assert "ContourSequence" not in roi
        assert ds.StructureSetROISequence[0].ROIName == "PRED_TUMOUR"
        assert NOTHING_OUTLINED in ds.StructureSetDescription
        assert len(ds.StructureSetDescription) <= 1024  # ST
        path = tmp_path / f"{ds.SeriesNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        text = proc.stdout + proc.stderr
        assert not [line for line in text.splitlines() if line.startswith("Error")], text
    assert out.rtstruct_planning.FrameOfReferenceUID == study.frame.frame_of_reference_uid
    assert out.rtstruct_planning.StructureSetDescription.endswith(
        "on the planning frame of reference"
    )
    # a frame without planes too
    bare = dataclasses.replace(inputs, planning_frame=dataclasses.replace(study.frame, planes=None))
    again = build_outputs(study.case.prediction, bare, OutputOptions(node_version="0.1.0"))
    assert again.rtstruct_planning is not None
    assert NOTHING_OUTLINED in again.rtstruct_planning.StructureSetDescription
    # a prediction with tumour does not say it
    full = _plan_study(_tilted(20.0), rotation_about([1.0, 0.5, 0.33], 10.0))
    assert NOTHING_OUTLINED not in _plan_rtstruct(full).StructureSetDescription


def test_plane_lattice_numbers_planes() -> None:
    lattice = PlaneLattice(normal=(0.0, 0.0, 1.0), position=0.7, step=2.5)
    assert lattice.plane_at(0.7) == 0
    assert lattice.plane_at(5.6) == 2
    assert lattice.plane_at(-1.9) == -1


def test_the_synthetic_planning_study_gets_contours_on_its_gtv_planes(tmp_path: Path) -> None:
    """``glioforecast synth --rt-planning-frame`` (patient 0 of seed 7): its GTV lies on the
    MR's slices moved onto the planning frame, planes tilted against that frame's axes (up to
    2.3 mm across a contour along its z). Read through the node's input path, the planes are
    found and the predicted tumour (here the GTV itself, the no-change prediction) comes back
    on them: each contour flat within 0.01 mm, on one of them. (Contours moved one by one
    from the MR, as before, also lie on them here: the GTV's planes are the MR's slices.)"""
    generate_patient(0, 7, tmp_path, spacing_mm=4.0, formats=("dicom",))
    (pre,) = tmp_path.glob("*/dicom/pre")
    to_planning_frame(pre, 7, 0)
    (t1c,) = [d for d in pre.iterdir() if d.name.endswith("_t1c")]
    files = {"t1c": sorted(t1c.glob("*.dcm")), "rtstruct": sorted(pre.glob("RTSTRUCT/*.dcm"))}
    read = assemble_inputs(files, r"(?i)^\s*gtv", pytest.fail, [pre / "REG" / "reg.dcm"])
    assert read.planning_frame is not None and read.planning_frame.planes is not None
    case = make_case()
    series = SeriesRef(
        series_instance_uid=str(read.t1c.series_instance_uid),
        sop_class_uid=MRImageStorage,
        sop_instance_uids=tuple(dict.fromkeys(read.t1c.source_instance_uids)),
    )
    inputs = JobInputs(
        patient=case.patient, t1c=read.t1c, t1c_series=series, planning_frame=read.planning_frame
    )
    prediction = dataclasses.replace(case.prediction, tumour_mask=read.tumour_mask)
    ds = build_prediction_rtstruct(
        prediction=prediction, inputs=inputs, job=case.job, equipment=_equipment(case),
        frame=read.planning_frame,
    )  # fmt: skip
    # the GTV's planes, from its own contours
    gtv = [
        np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
        for c in pydicom.dcmread(files["rtstruct"][0]).ROIContourSequence[0].ContourSequence
    ]
    n = np.linalg.svd(gtv[0] - gtv[0].mean(axis=0))[2][2]
    positions = np.sort([float(c.mean(axis=0) @ n) for c in gtv])
    step = float(np.min(np.diff(np.unique(np.round(positions, 3)))))
    contours = _contours(ds)
    assert len(contours) >= 5
    for pts in contours:
        along = pts @ n
        assert np.ptp(along) <= NEAR_PLANE_MM, np.ptp(along)
        m = (along.mean() - positions[0]) / step
        assert abs(m - round(m)) * step <= NEAR_PLANE_MM, along.mean()
