"""The generator's models: anatomy, growth, treatment, scanner physics, outcome."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.errors import InputError
from dicom_node.types import RESPONSE_CATEGORIES, Volume
from inference.synthetic import anatomy, outcome, scanner, treatment, tumour


def _toy_anatomy(
    wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, spacing: float
) -> anatomy.Anatomy:
    zeros = np.zeros_like(wm)
    grid = Volume(
        array=(wm + gm + csf) > 0.5,
        spacing=(spacing,) * 3,
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
    )
    return anatomy.Anatomy(grid, wm, gm, csf, zeros, zeros)


def test_template_ships_with_nilearn_and_gives_a_plausible_head() -> None:
    folder = anatomy.template_folder()
    assert (folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").is_file()
    anat = anatomy.make_anatomy(np.random.default_rng(3), 4.0)
    voxel_ml = 4.0**3 / 1000
    total = anat.wm + anat.gm + anat.csf + anat.bone + anat.fat
    assert total.max() <= 1.0 + 1e-5 and total.min() >= 0.0
    brain_ml = float((anat.wm + anat.gm).sum() * voxel_ml)
    assert 900 < brain_ml < 1600, brain_ml  # adult brain parenchyma ~1.0-1.4 L
    assert anat.wm.sum() < anat.gm.sum()
    assert anat.bone.sum() > 0 and anat.fat.sum() > 0
    assert not np.any(anat.bone[anat.brain] > 0.5)


def test_anatomy_is_deterministic_and_varies_between_subjects() -> None:
    a = anatomy.make_anatomy(np.random.default_rng(1), 6.0)
    b = anatomy.make_anatomy(np.random.default_rng(1), 6.0)
    c = anatomy.make_anatomy(np.random.default_rng(2), 6.0)
    assert np.array_equal(a.wm, b.wm)
    assert not np.array_equal(a.wm, c.wm)


def test_spacing_out_of_range_is_refused() -> None:
    with pytest.raises(InputError, match="spacing"):
        anatomy.simulation_grid(0.1)


def _params(d_white: float = 0.3, rho: float = 0.0) -> tumour.GrowthParams:
    return tumour.GrowthParams(d_white, d_white / 5, rho, 0.05, 4.0, rho_heterogeneity=0.0)


def test_no_flux_into_csf() -> None:
    """A CSF wall splits the brain: cells never cross it, and diffusion conserves the mass."""
    shape = (12, 12, 24)
    wm = np.ones(shape, dtype=np.float32)
    csf = np.zeros(shape, dtype=np.float32)
    wm[:, :, 12:14] = 0.0
    csf[:, :, 12:14] = 1.0
    anat = _toy_anatomy(wm, np.zeros_like(wm), csf, 2.0)
    barrier = (anat.wm + anat.gm) < 0.3
    solver = tumour.Solver.build(anat, _params(), (6, 6, 6), barrier, np.random.default_rng(0))
    u0 = np.zeros(shape, dtype=np.float32)
    u0[5:7, 5:7, 4:8] = 1.0
    u, days = solver.run(solver.to_solver(u0), days=200.0, rho=0.0)
    full = solver.to_full(u, shape)
    assert days == pytest.approx(200.0)
    assert full[:, :, 12:].max() == 0.0
    assert full[:, :, 10:12].min() > 0.005  # it did reach the wall (mass 16 over 1728 voxels)
    assert full.sum() == pytest.approx(u0.sum(), rel=1e-4)  # no loss either


def test_invasion_is_faster_in_white_than_in_grey_matter() -> None:
    shape = (8, 8, 40)
    wm = np.zeros(shape, dtype=np.float32)
    gm = np.zeros(shape, dtype=np.float32)
    wm[:, :, 20:] = 1.0  # white matter on the right, grey on the left
    gm[:, :, :20] = 1.0
    anat = _toy_anatomy(wm, gm, np.zeros_like(wm), 2.0)
    barrier = np.zeros(shape, dtype=bool)
    solver = tumour.Solver.build(
        anat, _params(0.3, 0.02), (4, 4, 20), barrier, np.random.default_rng(0)
    )
    u0 = np.zeros(shape, dtype=np.float32)
    u0[:, :, 19:21] = 0.9
    u, _ = solver.run(solver.to_solver(u0), days=150.0, rho=0.02)
    profile = solver.to_full(u, shape)[4, 4]
    right = int(np.sum(profile[20:] > 0.1))
    left = int(np.sum(profile[:20] > 0.1))
    assert right > left + 2, (left, right)


def test_growth_reaches_the_target_volume_and_has_compartments() -> None:
    rng = np.random.default_rng(11)
    anat = anatomy.make_anatomy(rng, 4.0)
    params = tumour.GrowthParams(0.15, 0.03, 0.03, 0.05, 4.0)
    state, _, days = tumour.grow(anat, rng, params, target_core_ml=25.0)
    core_ml = state.core.sum() * 0.064
    assert 25.0 <= core_ml < 60.0
    assert days > 30
    assert state.necrotic.any() and state.enhancing.any() and state.oedema.any()
    assert not np.any(state.necrotic & state.enhancing)
    assert not np.any(state.oedema & state.core)
    # necrosis is inside: no necrotic voxel touches the outside of the core
    outside = ~state.core
    for axis in range(3):
        for shift in (1, -1):
            assert not np.any(state.necrotic & np.roll(outside, shift, axis=axis))


def test_dose_plan_meets_coverage_and_hotspot_limits() -> None:
    shape = (30, 40, 40)
    k, j, i = np.indices(shape)
    brain = ((k - 15) ** 2 + (j - 20) ** 2 + (i - 20) ** 2) * 16 < 70**2
    wm = brain.astype(np.float32)
    anat = _toy_anatomy(wm, np.zeros_like(wm), np.zeros_like(wm), 4.0)
    gtv = ((k - 15) ** 2 + (j - 20) ** 2 + (i - 24) ** 2) * 16 < 14**2
    rt = treatment.plan(gtv, anat, np.random.default_rng(0))
    assert np.all(rt.ctv[gtv]) and np.all(rt.ptv[rt.ctv])
    m = treatment.dose_metrics(rt.dose, rt.ptv)
    assert m["ptv_d50_gy"] == pytest.approx(60.0, abs=0.05)
    assert m["ptv_d95_gy"] >= 57.0
    assert 60.0 < m["dose_max_gy"] <= 66.0
    far = brain & (((k - 15) ** 2 + (j - 20) ** 2 + (i - 24) ** 2) * 16 > 55**2)
    assert far.any()
    assert rt.dose[far].max() < 0.5 * 60.0  # low-dose bath only, away from the PTV


def test_linear_quadratic_kill() -> None:
    p = treatment.TreatmentParams(0.03, 0.0, 60, "biopsy", 3.0, False)
    assert p.beta == pytest.approx(0.003)
    d = 2.0
    per_fraction = math.exp(-(p.alpha * d + p.beta * d * d))
    assert per_fraction**30 == pytest.approx(math.exp(-30 * (0.06 + 0.012)))


def test_treatment_shrinks_the_tumour_and_methylation_helps() -> None:
    rng = np.random.default_rng(5)
    anat = anatomy.make_anatomy(rng, 4.0)
    growth = tumour.GrowthParams(0.15, 0.03, 0.03, 0.05, 4.0)
    pre, solver, _ = tumour.grow(anat, rng, growth, 30.0)
    rt = treatment.plan(pre.core, anat, rng)
    burdens = {}
    for name, tmz in (("unmethylated", 0.004), ("methylated", 0.016)):
        p = treatment.TreatmentParams(0.035, tmz, 70, "biopsy", 3.0, False)
        post = treatment.treat(anat, pre, solver, growth, p, rt.dose, 4.0, np.random.default_rng(1))
        burdens[name] = float(post.tumour.density.sum())
        assert post.days_after_pre == 28 + 42 + 70
    untreated = treatment.TreatmentParams(0.0, 0.0, 70, "biopsy", 3.0, False)
    post0 = treatment.treat(
        anat, pre, solver, growth, untreated, rt.dose, 4.0, np.random.default_rng(1)
    )
    assert burdens["methylated"] < burdens["unmethylated"] < float(post0.tumour.density.sum())


def test_resection_empties_the_cavity() -> None:
    rng = np.random.default_rng(8)
    anat = anatomy.make_anatomy(rng, 4.0)
    growth = tumour.GrowthParams(0.15, 0.03, 0.03, 0.05, 4.0)
    pre, _, _ = tumour.grow(anat, rng, growth, 30.0)
    u, cavity = treatment.resect(pre, "GTR", 3.0, 4.0)
    assert np.array_equal(cavity, pre.core) and u[cavity].max() == 0.0
    assert u.max() <= 0.45
    u_str, cavity_str = treatment.resect(pre, "STR", 3.0, 4.0)
    assert cavity_str.sum() < pre.core.sum() and u_str.max() > 0.45
    u_b, cavity_b = treatment.resect(pre, "biopsy", 3.0, 4.0)
    assert not cavity_b.any() and np.array_equal(u_b, pre.density)


@pytest.mark.parametrize(
    ("pre", "post", "expected"),
    [
        (10.0, 0.0, "complete_response"),
        (10.0, 0.05, "complete_response"),
        (10.0, 3.5, "partial_response"),
        (10.0, 3.6, "stable_disease"),
        (10.0, 13.9, "stable_disease"),
        (10.0, 14.0, "progressive_disease"),
    ],
)
def test_response_thresholds(pre: float, post: float, expected: str) -> None:
    assert outcome.response_category(pre, post) == expected
    assert expected in RESPONSE_CATEGORIES


def test_survival_depends_on_burden_and_covariates() -> None:
    cov = outcome.Covariates(60, "M", 90, True, "GTR")
    worse = outcome.Covariates(75, "M", 60, False, "biopsy")
    assert outcome.survival_months(cov, 1.0, 0.0) > outcome.survival_months(cov, 40.0, 0.0)
    assert outcome.survival_months(cov, 5.0, 0.0) > outcome.survival_months(worse, 5.0, 0.0)
    assert outcome.survival_class(11.9) == "short"
    assert outcome.survival_class(12.0) == "intermediate"
    assert outcome.survival_class(24.0) == "long"
    assert outcome.survival_class(20.0, (6.0, 18.0)) == "long"
    with pytest.raises(ValueError, match="cut-offs"):
        outcome.survival_class(10.0, (24.0, 12.0))


@pytest.mark.parametrize("profile", scanner.BASE_PROFILES, ids=lambda p: p.model)
def test_contrasts_follow_the_textbook(profile: scanner.SiteProfile) -> None:
    def s(contrast: str, tissue: str) -> float:
        return scanner.compartment_signal(profile, contrast, tissue)

    assert s("t1", "wm") > s("t1", "gm") > s("t1", "csf")
    assert s("t1", "fat") > s("t1", "wm")
    assert s("t2", "csf") > s("t2", "gm") > s("t2", "wm")
    assert s("flair", "csf") < 0.05 * s("flair", "wm")  # CSF nulled
    assert s("flair", "oedema") > 1.4 * s("flair", "wm")
    assert s("t1c", "enhancing") > 1.2 * s("t1", "enhancing")
    assert s("t1c", "enhancing") > s("t1c", "wm") > s("t1c", "necrotic")
    assert s("t1c", "wm") == s("t1", "wm")  # no enhancement behind an intact barrier


def test_rician_background_and_bias_field() -> None:
    profile = scanner.BASE_PROFILES[0]
    rng = np.random.default_rng(0)
    clean = np.zeros((20, 30, 30), dtype=np.float32)
    clean[:, 10:20, 10:20] = 1.0
    mask = clean > 0
    img = scanner.acquire(clean, profile.with_noise(20.0, 0.0), 1.0, mask, rng).astype(float)
    bg, fg = img[~mask], img[mask]
    sigma = fg.std()
    assert bg.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.1)
    field = scanner.bias_field((10, 12, 14), 0.1, np.random.default_rng(1))
    assert np.log(field).std() == pytest.approx(0.1, rel=1e-3)


def test_sites_differ() -> None:
    sites = scanner.site_profiles(6, np.random.default_rng(0))
    assert len({s.site for s in sites}) == 6
    assert len({s.manufacturer for s in sites}) >= 3
    assert {s.field_t for s in sites} == {1.5, 3.0}
    assert len({s.descriptions["t1c"] for s in sites[:5]}) == 5
    with pytest.raises(InputError, match="sites"):
        scanner.site_profiles(0, np.random.default_rng(0))


def test_mass_effect_pushes_tissue_away_from_the_tumour() -> None:
    shape = (40, 40, 40)
    k, j, i = np.indices(shape)
    r = np.sqrt((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2) * 2.0
    core = r <= 12.0
    marker = ((np.abs(r - 20.0) <= 2.0) & (i > 20)).astype(np.float32)  # a shell segment
    brain = np.ones(shape, dtype=bool)
    moved = tumour.mass_effect({"m": marker}, core, brain, 2.0, strength=0.3)["m"]
    before = float((marker * r).sum() / marker.sum())
    after = float((moved * r).sum() / moved.sum())
    assert after > before + 1.0, (before, after)
    same = tumour.mass_effect({"m": marker}, core, brain, 2.0, strength=0.0)["m"]
    assert np.array_equal(same, marker)


def test_inplane_resolution_blurs_only_below_the_native_pixel() -> None:
    profile = scanner.BASE_PROFILES[0]  # 1.0 mm native in-plane
    img = np.zeros((3, 21, 21), dtype=np.float32)
    img[:, 10, 10] = 1.0
    assert scanner.inplane_resolution(img, 2.0, profile) is img
    fine = scanner.inplane_resolution(img, 0.5, profile)
    assert fine[1, 10, 10] < 0.5 and fine.sum() == pytest.approx(img.sum(), rel=1e-4)
    assert np.array_equal(fine[0], fine[1])  # no blur across slices
