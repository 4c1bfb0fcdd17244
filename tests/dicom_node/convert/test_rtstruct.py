"""RTSTRUCT to mask: analytic shapes, rules (holes, several contours, coplanarity, frame of
reference, ROI choice) and the real TCIA structure set against a 4x-supersampled reference."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.convert.geometry import world_to_index
from dicom_node.convert.rtstruct import (
    DEFAULT_ROI_PATTERN,
    choose_structure_set,
    list_rois,
    load_placed_rtstruct_mask,
    load_rtstruct_mask,
    rasterise_polygons,
    select_roi,
)
from dicom_node.convert.series import load_series
from dicom_node.convert.spatial_registration import FrameRegistration, read_spatial_registration
from dicom_node.errors import ConversionError
from dicom_node.types import Volume
from inference.synthetic.planning_frame import PlanningFrame, registration_dataset, rotation_about
from tests.dicom_node.convert import synth
from tests.dicom_node.convert.reference import dice, point_in_polygons, supersampled_reference


def circle(cx: float, cy: float, r: float, n: int = 720) -> npt.NDArray[np.float64]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cx + r * np.cos(t), cy + r * np.sin(t)]


def _grid(shape: tuple[int, int, int] = (5, 200, 220), *, frame_uid: str = "1.2.3.4") -> Volume:
    """An oblique grid with anisotropic spacing and a non-trivial origin."""
    angle = math.radians(17)
    row = np.array([math.cos(angle), math.sin(angle), 0.0])
    col = np.array(
        [-math.sin(angle) * math.cos(0.2), math.cos(angle) * math.cos(0.2), -math.sin(0.2)]
    )
    col -= row * (row @ col)
    col /= np.linalg.norm(col)
    return Volume(
        array=np.zeros(shape, dtype=np.int16),
        spacing=(0.7, 0.9, 3.0),
        origin=(-40.0, 12.5, 101.0),
        direction=np.stack([row, col, np.cross(row, col)], axis=1),
        frame_of_reference_uid=frame_uid,
    )


def _to_world(grid: Volume, k: float, ij: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    pts = np.c_[ij, np.full(len(ij), k), np.ones(len(ij))]
    return (grid.affine @ pts.T).T[:, :3]


def test_disc_area_within_one_percent() -> None:
    mask = rasterise_polygons([(0, circle(100.3, 90.7, 40.25))], (1, 200, 200))
    assert mask.sum() == pytest.approx(math.pi * 40.25**2, rel=0.01)


def test_disc_with_hole_has_the_annulus_area() -> None:
    outer, inner = circle(100.3, 90.7, 40.25), circle(97.9, 93.1, 18.6)
    mask = rasterise_polygons([(0, outer), (0, inner[::-1])], (1, 200, 200))
    expected = math.pi * (40.25**2 - 18.6**2)
    assert mask.sum() == pytest.approx(expected, rel=0.01)
    assert not mask[0, 93, 98]  # centre of the hole
    assert mask[0, 90, 100 + 30]  # in the ring


def test_several_contours_on_one_slice_and_hole_inside_an_island() -> None:
    a, b = circle(50, 50, 20), circle(150, 60, 25)
    hole = circle(150, 60, 10)
    mask = rasterise_polygons([(2, a), (2, b), (2, hole)], (4, 120, 200))
    expected = math.pi * (20**2 + 25**2 - 10**2)
    assert mask[2].sum() == pytest.approx(expected, rel=0.01)
    assert mask[[0, 1, 3]].sum() == 0
    assert mask[2, 50, 50] and mask[2, 60, 130] and not mask[2, 60, 150]


def test_sub_voxel_vertices_follow_the_voxel_centre_rule() -> None:
    # a square from 2.5 to 5.5 covers centres 3, 4, 5; from 2.6 to 5.4 covers 3, 4, 5 too;
    # from 3.1 to 4.9 covers only 4
    for lo, hi, covered in ((2.5, 5.5, [3, 4, 5]), (2.6, 5.4, [3, 4, 5]), (3.1, 4.9, [4])):
        sq = np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]])
        mask = rasterise_polygons([(0, sq)], (1, 10, 10))
        rows, cols = np.nonzero(mask[0])
        assert sorted(set(rows)) == covered and sorted(set(cols)) == covered


def test_random_polygons_match_point_in_polygon_at_voxel_centres() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(3, 30))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(3, 25, n)
        poly = np.c_[30 + rad * np.cos(ang), 28 + rad * np.sin(ang)] + rng.uniform(
            -0.5, 0.5, (n, 2)
        )
        polys = [poly, circle(30, 28, rng.uniform(1, 5), 13)]
        ours = rasterise_polygons([(0, p) for p in polys], (1, 60, 64))[0]
        jj, ii = np.mgrid[0:60, 0:64]
        centres = np.c_[ii.ravel(), jj.ravel()].astype(float)
        # the circle is a hole when the polygon holds it whole, else a piece of the ROI
        if point_in_polygons(polys[1], polys[:1]).all():
            ref = point_in_polygons(centres, polys)
        else:
            ref = point_in_polygons(centres, polys[:1]) | point_in_polygons(centres, polys[1:])
        # ties (a centre exactly on an edge) are the only possible difference
        assert (ours.ravel() != ref).sum() <= 2


def test_a_contour_given_twice_counts_once_and_overlapping_pieces_unite() -> None:
    """An export that writes a contour twice erased its slice (XOR of the two copies); two
    pieces of one ROI that overlap without one holding the other lost their overlap. A contour
    inside another is still a hole, and an island inside the hole is filled."""
    disc = circle(30, 30, 12)
    once = rasterise_polygons([(0, disc)], (1, 64, 64))
    twice = rasterise_polygons([(0, disc), (0, disc[::-1]), (0, np.roll(disc, 7, axis=0))],
                               (1, 64, 64))  # fmt: skip
    assert once.sum() > 400 and np.array_equal(twice, once)
    a, b = circle(25, 30, 10), circle(35, 30, 10)  # overlapping side by side
    both = rasterise_polygons([(0, a), (0, b)], (1, 64, 64))[0]
    union = (
        rasterise_polygons([(0, a)], (1, 64, 64))[0] | rasterise_polygons([(0, b)], (1, 64, 64))[0]
    )
    assert np.array_equal(both, union) and both[30, 30]  # the overlap is in
    rings = [(0, circle(30, 30, 20)), (0, circle(30, 30, 12)), (0, circle(30, 30, 5))]
    nested = rasterise_polygons(rings, (1, 64, 64))[0]
    assert nested[30, 30] and not nested[30, 30 + 8] and nested[30, 30 + 16]


def test_polygon_partly_outside_the_grid_is_clipped() -> None:
    mask = rasterise_polygons([(0, circle(0, 0, 10))], (1, 20, 20))
    inside = [(j, i) for j in range(20) for i in range(20) if i * i + j * j < 100]
    assert mask.sum() == pytest.approx(len(inside), abs=3)


def test_structure_set_on_an_oblique_grid() -> None:
    grid = _grid()
    outer, inner = circle(110.2, 95.3, 50.5), circle(105.0, 99.0, 20.0)
    contours = [
        _to_world(grid, 1, outer),
        _to_world(grid, 1, inner),
        _to_world(grid, 2, outer),
        _to_world(grid, 3, circle(60, 60, 12)),
        _to_world(grid, 3, circle(150, 140, 15)),
    ]
    ds = synth.rtstruct("1.2.3.4", {"GTV": contours, "Brain": [_to_world(grid, 0, outer)]})
    mask = load_rtstruct_mask(ds, grid)
    assert mask.array.dtype == bool and mask.shape == grid.shape
    assert mask.array[1].sum() == pytest.approx(math.pi * (50.5**2 - 20**2), rel=0.01)
    assert mask.array[2].sum() == pytest.approx(math.pi * 50.5**2, rel=0.01)
    assert mask.array[3].sum() == pytest.approx(math.pi * (12**2 + 15**2), rel=0.02)
    assert mask.array[[0, 4]].sum() == 0
    assert mask.frame_of_reference_uid == "1.2.3.4"


def test_other_frame_of_reference_is_refused_naming_both_uids() -> None:
    grid = _grid(frame_uid="1.2.3.4")
    ds = synth.rtstruct("9.8.7", {"GTV": [_to_world(grid, 1, circle(50, 50, 10))]})
    with pytest.raises(
        ConversionError, match=r"frame of reference 9\.8\.7 but the image is on 1\.2\.3\.4"
    ):
        load_rtstruct_mask(ds, grid)


def test_an_roi_without_its_frame_takes_the_one_the_set_lists() -> None:
    """ReferencedFrameOfReferenceUID left out of the ROI (some exports do): the structure set's
    Referenced Frame of Reference Sequence says which frame it is on (it was looked for at the
    top level, where the IOD has none, and the study refused as on frame <none>)."""
    grid = _grid(frame_uid="1.2.3.4")
    ds = synth.rtstruct("1.2.3.4", {"GTV": [_to_world(grid, 1, circle(50, 50, 10))]})
    del ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    if "FrameOfReferenceUID" in ds:
        del ds.FrameOfReferenceUID
    assert load_rtstruct_mask(ds, grid).array.sum() > 200


def test_contour_oblique_to_the_slices_is_refused() -> None:
    grid = _grid()
    pts = _to_world(grid, 1, circle(50, 50, 10))
    pts[:180] += grid.direction[:, 2] * 2.0  # a quarter of the points 2 mm off the slice
    ds = synth.rtstruct(grid.frame_of_reference_uid or "", {"GTV": [pts]})
    with pytest.raises(ConversionError, match=r"contour 1 is not coplanar with the image slices"):
        load_rtstruct_mask(ds, grid)


def test_contour_between_slices_is_refused() -> None:
    grid = _grid()
    ds = synth.rtstruct(
        grid.frame_of_reference_uid or "", {"GTV": [_to_world(grid, 1.5, circle(50, 50, 10))]}
    )
    with pytest.raises(ConversionError, match=r"lies between image slices at k = 1\.500"):
        load_rtstruct_mask(ds, grid)


def test_an_image_that_does_not_hold_the_whole_gtv_is_refused() -> None:
    """A T1-Gd cut short (or a slab) below the tumour's top: the contours above it were dropped
    with a log line, and a part of the tumour was taken for the whole (3 ml of 59)."""
    grid = _grid()  # 5 slices, 3 mm apart
    contours = [_to_world(grid, k, circle(100, 90, 30)) for k in range(1, 8)]
    ds = synth.rtstruct(grid.frame_of_reference_uid or "", {"GTV": contours})
    with pytest.raises(
        ConversionError,
        match=r"ROI 'GTV': 3 of its 7 contours lie outside the image's slab \(5 slices, [-\d.]+ to "
        r"[-\d.]+ mm along the slice normal\), at [-\d.]+ to [-\d.]+ mm; expected an image holding "
        r"the whole ROI",
    ):
        load_rtstruct_mask(ds, grid)


def test_a_gtv_on_its_own_planes_beyond_the_image_is_refused() -> None:
    """The same when the contours are drawn on another series' planes (3 mm apart on a grid of
    2 mm slices): they were rasterised on their own planes and cut by the resampling."""
    frame = "1.2.826.0.1.3680043.2.1125.45"
    grid = Volume(
        array=np.zeros((10, 64, 64), dtype=np.int16), spacing=(1.5, 1.5, 2.0),
        origin=(-50.0, -48.0, -10.0), direction=np.eye(3), frame_of_reference_uid=frame,
    )  # fmt: skip
    t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    circles = [np.c_[15 * np.cos(t), 15 * np.sin(t), np.full_like(t, z)] for z in (-6.5, -3.5,
               -0.5, 2.5, 5.5, 8.5, 11.5, 14.5)]  # fmt: skip
    said = r"ROI 'GTV': \d+% of it lies outside the image \(10 slices of 64 x 64\); expected an"
    with pytest.raises(ConversionError, match=said):
        load_rtstruct_mask(synth.rtstruct(frame, {"GTV": circles}), grid)
    inside = [c for c in circles if -8 < c[0, 2] < 7]  # within the image: taken
    assert load_rtstruct_mask(synth.rtstruct(frame, {"GTV": inside}), grid).array.sum() > 0


@pytest.mark.parametrize(
    ("direction", "step", "centre_z"),
    [
        # a sagittal 3D T1-Gd, the GTV drawn on the axial FLAIR of the same session (5 mm)
        (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T, 5.0, 2.5),
        # an axial T1-Gd of 2 mm slices, the GTV drawn on an axial series of 3 mm slices
        (np.eye(3), 3.0, 2.5),
        # ... and of 4 mm slices that fall on every other slice of the T1-Gd
        (np.eye(3), 4.0, 2.0),
    ],
)
def test_a_gtv_drawn_on_another_series_of_the_frame(
    direction: npt.NDArray[np.float64], step: float, centre_z: float
) -> None:
    """Contours on another series' planes (same frame of reference, not the T1-Gd's slices)
    are rasterised on their own planes and resampled: the sphere they outline comes back."""
    frame = "1.2.826.0.1.3680043.2.1125.44"
    grid = Volume(
        array=np.zeros((64, 64, 64), dtype=np.int16), spacing=(1.5, 1.5, 2.0),
        origin=(-50.0, -48.0, -46.0), direction=direction, frame_of_reference_uid=frame,
    )  # fmt: skip
    centre, radius = np.array([3.0, -4.0, centre_z]), 20.0
    circles = []
    for z in np.arange(-radius + step / 2, radius, step):
        r = np.sqrt(radius**2 - z**2)
        t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        circles.append(centre + np.c_[r * np.cos(t), r * np.sin(t), np.full_like(t, z)])
    mask = load_rtstruct_mask(synth.rtstruct(frame, {"GTV": circles}), grid).array
    k, j, i = np.indices(grid.shape)
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    world = (grid.affine @ ijk1)[:3].T.reshape(*grid.shape, 3)
    truth = np.linalg.norm(world - centre, axis=-1) < radius
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice


def test_the_structure_set_with_the_gtv_approved_and_latest_is_chosen(tmp_path: Path) -> None:
    """A planning system sends the plan's structure set with an organs-at-risk set, a rejected
    draft and an earlier version: the approved, latest set with a GTV is read."""
    grid = _grid()
    gtv = [_to_world(grid, 1, circle(50, 50, 10))]

    def saved(name: str, rois: dict, status: str, when: str) -> Path:  # type: ignore[type-arg]
        ds = synth.rtstruct(grid.frame_of_reference_uid or "", rois)
        ds.ApprovalStatus, ds.StructureSetDate, ds.StructureSetTime = status, when[:8], when[8:]
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    paths = [
        saved("oar", {"Brainstem": gtv}, "APPROVED", "20261105090000"),
        saved("draft", {"GTV": gtv}, "REJECTED", "20261104090000"),
        saved("plan", {"GTV": gtv, "PTV": gtv}, "APPROVED", "20261103090000"),
        saved("first", {"GTV": gtv}, "APPROVED", "20261102090000"),
        saved("unapproved", {"GTV": gtv}, "UNAPPROVED", "20261106090000"),
    ]
    choice = choose_structure_set(paths, DEFAULT_ROI_PATTERN)
    assert choice.path.name == "plan.dcm"
    assert choice.note.startswith("RT structure set: plan.dcm (APPROVED, ROIs GTV, PTV) is used")
    assert "first.dcm (APPROVED, ROIs GTV): not the latest" in choice.note
    assert "unapproved.dcm (UNAPPROVED, ROIs GTV): not approved" in choice.note
    assert "draft.dcm (REJECTED, ROIs GTV): rejected" in choice.note
    assert "oar.dcm (APPROVED, ROIs Brainstem): no contoured ROI matches" in choice.note
    assert choose_structure_set(paths[2:3], DEFAULT_ROI_PATTERN).note == ""
    with pytest.raises(ConversionError, match=r"expected one with a contoured ROI .* found 2"):
        choose_structure_set(paths[:1] * 2, DEFAULT_ROI_PATTERN)
    with pytest.raises(ConversionError, match="ApprovalStatus REJECTED"):
        choose_structure_set(paths[1:2], DEFAULT_ROI_PATTERN)


def test_an_empty_template_gtv_or_a_missing_date_does_not_win(tmp_path: Path) -> None:
    """An organs-at-risk set made from a template keeps an empty "GTV"; a set without a date
    counts as the earliest; two sets of the same date and time keep the order given."""
    grid = _grid()
    gtv = [_to_world(grid, 1, circle(50, 50, 10))]

    def saved(name: str, rois: dict, date: str, time: str) -> Path:  # type: ignore[type-arg]
        ds = synth.rtstruct(grid.frame_of_reference_uid or "", rois)
        ds.StructureSetDate, ds.StructureSetTime = date, time
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    plan = saved("plan", {"GTV": gtv}, "20261103", "090000")
    template = saved("template", {"GTV": [], "Brainstem": gtv}, "20261105", "090000")
    undated = saved("undated", {"GTV": gtv}, "", "213000")
    twin = saved("twin", {"GTV": gtv}, "20261103", "090000")
    choice = choose_structure_set([template, undated, plan, twin], DEFAULT_ROI_PATTERN)
    assert choice.path == plan
    assert "template.dcm (no ApprovalStatus, ROIs GTV, Brainstem): no contoured ROI" in choice.note
    assert "undated.dcm (no ApprovalStatus, ROIs GTV): not the latest" in choice.note
    assert "twin.dcm (no ApprovalStatus, ROIs GTV): the same date and time, given later" in (
        choice.note
    )


def test_roi_choice_by_pattern_lists_available_names() -> None:
    grid = _grid()
    c = [_to_world(grid, 1, circle(50, 50, 10))]
    ds = synth.rtstruct(grid.frame_of_reference_uid or "", {"Brain": c, "Skull": c})
    with pytest.raises(ConversionError, match=r"no ROI name matches .*available: 'Brain', 'Skull'"):
        load_rtstruct_mask(ds, grid)
    assert load_rtstruct_mask(ds, grid, r"^Skull$").array.sum() > 0
    ds2 = synth.rtstruct(grid.frame_of_reference_uid or "", {"GTV_1": c, "gtv-2": c, "PTV": c})
    with pytest.raises(ConversionError, match=r"ambiguous: it matches 'GTV_1', 'gtv-2'"):
        load_rtstruct_mask(ds2, grid)
    both = load_rtstruct_mask(ds2, grid, combine=True)
    assert both.array.sum() == load_rtstruct_mask(ds2, grid, "^GTV_1$").array.sum()
    with pytest.raises(ConversionError, match="invalid ROI name pattern"):
        load_rtstruct_mask(ds2, grid, "(")


def test_of_several_gtv_like_names_the_one_typed_gtv_is_used() -> None:
    """A planning system's "GTV" beside its "GTV+2cm" expansion (typed CTV): the ROI typed GTV
    is the tumour; two ROIs typed GTV (multifocal, or GTV1 / GTV2 of two definitions) stay
    ambiguous, and the message gives each one's type."""
    grid = _grid()
    small = [_to_world(grid, k, circle(50, 50, 6)) for k in range(1, 4)]
    large = [_to_world(grid, k, circle(50, 50, 12)) for k in range(1, 4)]
    ds = synth.rtstruct(
        grid.frame_of_reference_uid or "",
        {"GTV+2cm": large, "GTV": small},
        interpreted_types={"GTV+2cm": "CTV", "GTV": "GTV"},
    )
    chosen = load_rtstruct_mask(ds, grid)
    assert chosen.array.sum() == load_rtstruct_mask(ds, grid, "^GTV$").array.sum()
    assert chosen.array.sum() < load_rtstruct_mask(ds, grid, "2cm").array.sum()
    two = synth.rtstruct(
        grid.frame_of_reference_uid or "",
        {"GTV1": large, "GTV2": small},
        interpreted_types={"GTV1": "GTV", "GTV2": "GTV"},
    )
    with pytest.raises(ConversionError, match=r"it matches 'GTV1' \(GTV\), 'GTV2' \(GTV\)"):
        load_rtstruct_mask(two, grid)
    # with combine (roles.roi_union), a multifocal tumour's GTVs are united, not an expansion
    apart = [_to_world(grid, k, circle(20, 20, 6)) for k in range(1, 4)]
    multifocal = synth.rtstruct(
        grid.frame_of_reference_uid or "",
        {"GTV_1": small, "GTV_2": apart, "GTV_1+2cm": large},
        interpreted_types={"GTV_1": "GTV", "GTV_2": "GTV", "GTV_1+2cm": "CTV"},
    )
    union = load_rtstruct_mask(multifocal, grid, combine=True).array
    one, other = (load_rtstruct_mask(multifocal, grid, f"^{n}$").array for n in ("GTV_1", "GTV_2"))
    assert np.array_equal(union, one | other)
    # one typed GTV beside its expansion: still that one
    assert np.array_equal(load_rtstruct_mask(ds, grid, combine=True).array, chosen.array)


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("GTV", True),
        (" gtv_boost", True),
        ("Gross Tumour", True),
        ("tumor bed", True),
        ("CTV", False),
        ("PTV_GTV", False),
        ("Brainstem", False),
    ],
)
def test_default_pattern_is_gtv_like(name: str, matches: bool) -> None:
    from dicom_node.convert.rtstruct import RoiInfo

    rois = [RoiInfo(1, name, None, 1)]
    if matches:
        assert select_roi(rois, DEFAULT_ROI_PATTERN)[0].name == name
    else:
        with pytest.raises(ConversionError):
            select_roi(rois, DEFAULT_ROI_PATTERN)


def test_roi_smaller_than_a_voxel_is_refused() -> None:
    grid = _grid()
    tiny = _to_world(grid, 1, circle(50.5, 50.5, 0.3))  # between four voxel centres
    ds = synth.rtstruct(grid.frame_of_reference_uid or "", {"GTV": [tiny]})
    with pytest.raises(ConversionError, match="covers no voxel centre"):
        load_rtstruct_mask(ds, grid)


def test_points_only_roi_is_refused() -> None:
    grid = _grid()
    ds = synth.rtstruct(
        grid.frame_of_reference_uid or "",
        {"GTV": [_to_world(grid, 1, np.array([[5.0, 5.0]]))]},
        geometric_type="POINT",
    )
    with pytest.raises(ConversionError, match="no CLOSED_PLANAR contour"):
        load_rtstruct_mask(ds, grid)


def test_not_a_structure_set_is_refused() -> None:
    ds = synth.mr_slices(synth.volume_pixels((1, 4, 4)))[0]
    with pytest.raises(ConversionError, match="expected an RT Structure Set"):
        list_rois(ds)


# --- the real TCIA structure set -------------------------------------------------------------


@pytest.fixture(scope="module", params=["MR_T1", "MR_T2"])
def tcia(real_data: Path, request: pytest.FixtureRequest) -> tuple[Volume, Path]:
    folder = real_data / "tcia_sts001_mr_rtstruct" / request.param
    return load_series(sorted((folder / "image").glob("*.dcm"))), folder / "mask" / "1-1.dcm"


def test_real_rtstruct_lists_its_rois(tcia: tuple[Volume, Path]) -> None:
    _, path = tcia
    assert [r.name for r in list_rois(path)] == ["GTV_Mass", "GTV_Edema"]
    assert all(r.contour_count > 10 for r in list_rois(path))


@pytest.mark.parametrize("roi", ["GTV_Mass", "GTV_Edema"])
def test_real_rtstruct_dice_against_4x_supersampled_reference(
    tcia: tuple[Volume, Path], roi: str
) -> None:
    import pydicom

    volume, path = tcia
    ours = load_rtstruct_mask(path, volume, f"^{roi}$").array
    ds = pydicom.dcmread(path)
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == roi)
    contours = next(
        rc.ContourSequence for rc in ds.ROIContourSequence if rc.ReferencedROINumber == number
    )
    to_index = world_to_index(volume)
    by_slice: dict[int, list[npt.NDArray[np.float64]]] = {}
    for c in contours:
        pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)
        ijk = (to_index @ np.c_[pts, np.ones(len(pts))].T).T
        by_slice.setdefault(round(float(ijk[:, 2].mean())), []).append(ijk[:, :2])
    reference = supersampled_reference(by_slice, volume.shape, factor=4)
    assert reference.sum() > 10_000
    assert dice(np.asarray(ours, dtype=bool), reference) >= 0.99


def test_a_set_whose_gtv_cannot_be_placed_gives_way(tmp_path: Path) -> None:
    """The planning system's latest set is on the planning CT's frame and came without its
    registration; the radiologist's set on the MR can be placed and is read instead."""
    grid = _grid()
    gtv = [_to_world(grid, 1, circle(50, 50, 10))]
    mr_frame = grid.frame_of_reference_uid or ""
    ct_frame = "1.2.826.0.1.3680043.10.1234.99"

    def saved(name: str, frame: str, when: str) -> Path:
        ds = synth.rtstruct(frame, {"GTV": gtv})
        ds.ApprovalStatus, ds.StructureSetDate, ds.StructureSetTime = "APPROVED", when[:8], when[8:]
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    on_ct = saved("plan_ct", ct_frame, "20261105090000")
    on_mr = saved("mr_contours", mr_frame, "20261101090000")

    def placeable(frame: str) -> str | None:
        return None if frame == mr_frame else f"frame {frame} is not related to the T1-Gd's"

    choice = choose_structure_set([on_ct, on_mr], DEFAULT_ROI_PATTERN, placeable)
    assert choice.path == on_mr
    assert f"plan_ct.dcm (APPROVED, ROIs GTV): frame {ct_frame} is not related" in choice.note
    # without the frame check (or with the registration: every frame placeable) the latest wins
    assert choose_structure_set([on_ct, on_mr], DEFAULT_ROI_PATTERN).path == on_ct
    assert choose_structure_set([on_ct, on_mr], DEFAULT_ROI_PATTERN, lambda f: None).path == on_ct
    # when no set can be placed, the latest is read, and reading it says why it fails
    elsewhere = saved("plan_ct_v1", ct_frame, "20261104090000")
    choice = choose_structure_set([elsewhere, on_ct], DEFAULT_ROI_PATTERN, placeable)
    assert choice.path == on_ct and "not the latest" in choice.note


def test_a_label_that_cannot_be_read_names_nothing_and_refuses_nothing() -> None:
    """A structure set whose label has garbled VR bytes (found by the byte-level fuzz test):
    naming it raised pydicom's NotImplementedError, which callers did not take for a
    conversion error. The structure set is read and named by its series."""
    import io

    grid = _grid(frame_uid="1.2.3.4")
    ds = synth.rtstruct("9.8.7", {"GTV": [_to_world(grid, 1, circle(50, 50, 10))]})
    ds.StructureSetLabel, ds.SeriesNumber = "PLAN", 7
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    label = b"\x06\x30\x02\x00SH"  # (3006,0002) StructureSetLabel, explicit VR little endian
    assert data.count(label) == 1
    damaged = io.BytesIO(data.replace(label, b"\x06\x30\x02\x00RH"))
    assert [r.name for r in list_rois(damaged)] == ["GTV"]
    with pytest.raises(ConversionError, match=r"^RT structure set \(series 7\): .*9\.8\.7"):
        load_rtstruct_mask(damaged, grid)  # (on another frame: a refusal that names it)


def _on_ct_planes(
    centre: npt.NDArray[np.float64],
    radius: float,
    axes: npt.NDArray[np.float64],
    first: float,
    step: float,
    every: int = 1,
) -> list[npt.NDArray[np.float64]]:
    """A sphere contoured on CT slices (normal ``axes[:, 2]``, at ``first + m * step``, every
    ``every``-th one), points written to the micrometre as planning systems do."""
    n = axes[:, 2]
    out = []
    for m in range(-200, 200, every):
        dz = first + m * step - n @ centre
        if abs(dz) >= radius:
            continue
        r = np.sqrt(radius**2 - dz**2)
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        pts = (
            centre
            + dz * n
            + np.outer(r * np.cos(t), axes[:, 0])
            + np.outer(r * np.sin(t), axes[:, 1])
        )
        out.append(np.round(pts, 3))
    return out


def _planning_ct_case(
    rois: dict[str, list[npt.NDArray[np.float64]]] | None = None,
) -> tuple[
    Volume, Dataset, list[FrameRegistration], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """An axial MR, a planning frame 8 degrees and 35 mm away, a CT with its gantry tilted by
    12 degrees; returns (MR grid, structure set of ``rois`` or of one GTV, registrations, the
    CT's axes, the GTV's centre on the CT's frame)."""
    mr_for, ct_for = generate_uid(), generate_uid()
    frame = PlanningFrame(rotation_about([1, 2, 0.5], 8.0), np.array([30.0, -20.0, 15.0]), ct_for)
    reg = registration_dataset(
        Dataset(), mr_for, frame, generate_uid(), generate_uid(), datetime.datetime(2026, 1, 1)
    )
    mr = Volume(
        array=np.zeros((48, 64, 64), dtype=np.uint16), spacing=(1.5, 1.5, 2.0),
        origin=(-48.0, -48.0, -48.0), direction=np.eye(3), frame_of_reference_uid=mr_for,
    )  # fmt: skip
    axes = rotation_about([1.0, 0.0, 0.0], 12.0)
    centre = frame.rotation @ np.array([4.0, -6.0, 3.0]) + frame.translation
    rois = rois or {"GTV": _on_ct_planes(centre, 20.0, axes, 0.704, 2.502)}
    return mr, synth.rtstruct(ct_for, rois), [read_spatial_registration(reg)], axes, centre


def test_a_gtv_on_the_planning_ct_gives_the_ct_planes() -> None:
    """The GTV on the planning CT's slices (gantry tilted 12 degrees, slices 2.502 mm apart,
    points to the micrometre), placed on the MR by a registration: the frame it came from
    carries those planes, exact enough to write contours back on them within 0.01 mm across
    the GTV (the step fitted over every plane: the planes' positions rounded to 0.01 mm gave
    2.51 mm, 0.15 mm off at the 16th plane)."""
    mr, structure, regs, axes, _ = _planning_ct_case()
    _, frame = load_placed_rtstruct_mask(structure, mr, registrations=regs)
    assert frame is not None and frame.planes is not None
    planes = frame.planes
    n = np.asarray(planes.normal)
    assert float(n @ axes[:, 2]) > 1 - 1e-8
    assert planes.step == pytest.approx(2.502, abs=2e-4)
    for contour in structure.ROIContourSequence[0].ContourSequence:
        pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        along = pts @ n
        nearest = planes.position + planes.plane_at(float(along.mean())) * planes.step
        assert float(np.max(np.abs(along - nearest))) < 0.005


def test_gtvs_on_one_ct_give_its_finest_planes_and_disagreeing_ones_none() -> None:
    """Two GTVs united (roles.roi_union), one on every CT slice and one on every other: the
    planes are every slice's. One on planes 1 mm off the other's: no planes (the predicted
    tumour is then mapped as before)."""
    _, _, _, axes, centre = _planning_ct_case()
    beside = centre + np.array([0.0, 20.0, 0.0])
    one = _on_ct_planes(centre, 14.0, axes, 0.704, 2.502)
    other = _on_ct_planes(beside, 8.0, axes, 0.704, 2.502, every=2)
    mr, structure, regs, _, _ = _planning_ct_case({"GTV_1": one, "GTV_2": other})
    _, frame = load_placed_rtstruct_mask(structure, mr, "GTV", combine=True, registrations=regs)
    assert frame is not None and frame.planes is not None
    assert frame.planes.step == pytest.approx(2.502, abs=1e-3)
    off = _on_ct_planes(beside, 8.0, axes, 1.704, 2.502)
    mr, structure, regs, _, _ = _planning_ct_case({"GTV_1": one, "GTV_2": off})
    _, frame = load_placed_rtstruct_mask(structure, mr, "GTV", combine=True, registrations=regs)
    assert frame is not None and frame.planes is None
