"""ModelPredictor: source grid -> model grid -> prediction -> back onto the exact source grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.errors import InferenceError
from dicom_node.types import RESPONSE_CATEGORIES, StudyInputs, Volume
from inference.baseline import NoChangeBaseline
from inference.metrics import dice
from inference.model_config import tiny_config
from inference.model_dir import save_model_dir
from inference.model_predictor import ModelPredictor
from inference.networks import build_model
from inference.predict import ModelPrediction

FOR_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"


def rotation(ax: float, az: float) -> np.ndarray:
    ca, sa, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def oblique_study(flair: bool = True, dose: bool = True, slices: int = 26) -> StudyInputs:
    """A head-like ellipsoid with an enhancing ball on an oblique, anisotropic grid (LPS)."""
    shape = (slices, 44, 40)  # k, j, i
    spacing = (2.9, 2.7, 4.6)  # di, dj, dk
    direction = rotation(0.35, 0.5)
    centre_index = np.array([(40 - 1) / 2, (44 - 1) / 2, (slices - 1) / 2])
    origin = -direction @ (np.asarray(spacing) * centre_index)  # head centred on (0, 0, 0)
    k, j, i = np.indices(shape, dtype=float)
    ijk = np.stack([i, j, k], axis=-1) * np.asarray(spacing)
    world = ijk @ direction.T + origin
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    head = (x / 50) ** 2 + (y / 55) ** 2 + (z / 45) ** 2 <= 1
    tumour = (x - 12) ** 2 + (y + 8) ** 2 + (z - 6) ** 2 <= 18**2
    rng = np.random.default_rng(0)
    t1c = np.where(head, 400.0, 10.0) + np.where(tumour, 500.0, 0.0) + rng.normal(0, 5, shape)
    t1c = t1c.astype(np.float32)

    def vol(a: np.ndarray) -> Volume:
        return Volume(
            array=a,
            spacing=spacing,
            origin=(float(origin[0]), float(origin[1]), float(origin[2])),
            direction=direction,
            frame_of_reference_uid=FOR_UID,
            source_instance_uids=tuple(f"1.2.3.{n}" for n in range(shape[0])),
            series_instance_uid=SERIES_UID,
        )

    dist = np.sqrt((x - 12) ** 2 + (y + 8) ** 2 + (z - 6) ** 2)
    return StudyInputs(
        t1c=vol(t1c),
        tumour_mask=vol(tumour),
        flair=vol(np.where(head, 300.0, 5.0).astype(np.float32)) if flair else None,
        dose=vol(np.where(dist < 30, 60.0, 10.0).astype(np.float32)) if dose else None,
    )


@pytest.fixture(scope="module")
def fresh_ldm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model directory (no train_state.json): geometry does not need training."""
    return save_model_dir(build_model(tiny_config(), seed=0), tmp_path_factory.mktemp("fresh"))


def same_grid(a: Volume, b: Volume) -> None:
    assert a.shape == b.shape
    assert a.spacing == b.spacing
    assert a.origin == b.origin
    np.testing.assert_array_equal(a.direction, b.direction)
    assert a.frame_of_reference_uid == b.frame_of_reference_uid
    assert a.source_instance_uids == b.source_instance_uids
    assert a.series_instance_uid == b.series_instance_uid


def test_identity_round_trip_onto_an_oblique_anisotropic_grid(fresh_ldm_dir: Path) -> None:
    """A model that predicted "no change" on its grid gives back the source image, the GTV and
    the standard deviation in source units, on the exact source grid."""
    predictor = ModelPredictor(fresh_ldm_dir)
    inputs = oblique_study()
    prepared = predictor.prepare(inputs)
    assert prepared.grid.shape == tiny_config().preprocessing.crop_shape
    n = 2
    fake = ModelPrediction(
        samples=np.stack([prepared.t1c] * n),
        sample_mask_probabilities=np.stack([prepared.mask.astype(np.float32)] * n),
        mean=prepared.t1c,
        std=np.full(prepared.t1c.shape, 0.1, np.float32),
        tumour_probability=prepared.mask.astype(np.float32),
        tumour_mask=prepared.mask,
        sample_volumes_ml=(30.0, 34.0),
        current_volume_ml=32.0,
        response_probabilities=dict.fromkeys(RESPONSE_CATEGORIES, 0.25),
        survival_class=None,
        guidance_scale=3.0,
        seed=0,
        model_name="fake",
        model_version="1",
    )
    out = predictor.to_source(inputs, prepared, fake)
    for v in (out.mean, out.std, out.tumour_mask):
        same_grid(v, inputs.t1c)
    assert out.tumour_mask.array.dtype == bool
    # the mask lands on the GTV (8 mm model voxels against a 36 mm ball)
    assert dice(out.tumour_mask.array, inputs.tumour_mask.array) > 0.6
    # intensities back in source units: inside the tumour ~900, in the head ~400
    src = inputs.t1c.array
    tumour, mean = inputs.tumour_mask.array, out.mean.array
    assert np.median(mean[tumour]) == pytest.approx(np.median(src[tumour]), rel=0.15)
    core_head = (src > 200) & (src < 600)
    assert np.median(mean[core_head]) == pytest.approx(400.0, rel=0.1)
    scale = prepared.t1c_scaling.scale
    assert np.median(out.std.array[core_head]) == pytest.approx(0.1 * scale, rel=1e-3)
    assert out.sample_volumes_ml == (30.0, 34.0)
    assert out.response_probabilities == dict.fromkeys(RESPONSE_CATEGORIES, 0.25)


def test_full_prediction_on_the_source_grid(fresh_ldm_dir: Path) -> None:
    predictor = ModelPredictor(fresh_ldm_dir, samples=3, num_inference_steps=2)
    inputs = oblique_study()
    pred = predictor.predict(inputs)
    for v in (pred.mean, pred.std, pred.tumour_mask):
        same_grid(v, inputs.t1c)
    assert pred.tumour_mask.array.dtype == bool
    assert pred.mean.array.dtype == np.float32
    assert np.all(pred.std.array >= 0) and np.isfinite(pred.mean.array).all()
    assert len(pred.sample_volumes_ml) == 3
    assert set(pred.response_probabilities) == set(RESPONSE_CATEGORIES)
    assert sum(pred.response_probabilities.values()) == pytest.approx(1.0)
    assert pred.model_name == "glioforecast-tiny"
    # same seed, same study: same prediction (a retried job re-sends the same objects)
    again = predictor.predict(inputs)
    np.testing.assert_array_equal(again.mean.array, pred.mean.array)
    assert predictor.predict(inputs, samples=1).sample_volumes_ml[:1] == pred.sample_volumes_ml[:1]


def test_missing_flair_and_dose_and_guidance(fresh_ldm_dir: Path) -> None:
    predictor = ModelPredictor(fresh_ldm_dir, samples=2, num_inference_steps=2)
    bare = oblique_study(flair=False, dose=False)
    pred = predictor.predict(bare)
    assert pred.mean.shape == bare.t1c.shape
    guided = predictor.predict(dataclasses.replace(bare, survival_class="short"))
    assert guided.survival_class == "short"
    with pytest.raises(InferenceError, match="unknown survival class"):
        predictor.predict(dataclasses.replace(bare, survival_class="forever"))


def test_trained_models_of_both_kinds(tiny_ldm_dir: Path, tiny_baseline_dir: Path) -> None:
    inputs = oblique_study()
    ldm = ModelPredictor(tiny_ldm_dir, samples=2)
    assert ldm.kind == "latent-diffusion"
    p = ldm.predict(inputs)
    same_grid(p.mean, inputs.t1c)
    unet = ModelPredictor(tiny_baseline_dir)
    assert unet.kind == "unet-baseline"
    q = unet.predict(inputs, samples=4)
    same_grid(q.tumour_mask, inputs.t1c)
    assert not q.std.array.any()  # deterministic: no spread
    assert len(set(q.sample_volumes_ml)) == 1 and len(q.sample_volumes_ml) == 4
    assert q.survival_class is None
    # what the pre-treatment volume is, for the report to name it (it called the models' own
    # reading "GTV before treatment"): the models measure it, the 'no change' baseline takes
    # the GTV, and a predictor told to use the GTV says so
    assert (p.current_from, q.current_from) == ("model", "model")
    assert NoChangeBaseline().predict(inputs).current_from == "mask"
    by_mask = ModelPredictor(tiny_ldm_dir, samples=2, current_from="mask").predict(inputs)
    assert by_mask.current_from == "mask"
    assert by_mask.current_volume_ml == pytest.approx(
        float(inputs.tumour_mask.array.sum()) * float(np.prod(inputs.t1c.spacing)) / 1000, rel=0.2
    )


def test_stage1_reconstruction(tiny_ldm_dir: Path, tiny_baseline_dir: Path) -> None:
    """The autoencoder alone: by default the T1-Gd itself ("no change" as the decoder renders
    it: its volume is the current volume), or another scan of the same grid, normalised with its
    own scaling (a scan stored with another gain decodes the same)."""
    inputs = oblique_study()
    ldm = ModelPredictor(tiny_ldm_dir)
    pre = ldm.reconstruct(inputs)
    same_grid(pre.mean, inputs.t1c)
    assert pre.sample_volumes_ml == (pre.current_volume_ml,)
    assert not pre.std.array.any()
    explicit = ldm.reconstruct(inputs, inputs.t1c)
    np.testing.assert_array_equal(explicit.mean.array, pre.mean.array)
    other = inputs.t1c.array.copy()
    other[inputs.tumour_mask.array] = 100.0  # the enhancing ball gone
    post = ldm.reconstruct(inputs, inputs.t1c.with_array(other))
    brighter = ldm.reconstruct(inputs, inputs.t1c.with_array(3.0 * other))
    assert not np.array_equal(post.mean.array, pre.mean.array)
    np.testing.assert_allclose(brighter.mean.array, post.mean.array, rtol=1e-4, atol=1e-2)
    with pytest.raises(InferenceError, match=r"expected an image on the T1-Gd grid \(26, 44, 40\)"):
        ldm.reconstruct(inputs, dataclasses.replace(inputs.t1c, array=other[:-1]))
    with pytest.raises(InferenceError, match="needs a latent diffusion model, found unet"):
        ModelPredictor(tiny_baseline_dir).reconstruct(inputs)


def test_refusals(tmp_path: Path, tiny_ldm_dir: Path) -> None:
    # a directory whose diffusion stage was never trained
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    for f in tiny_ldm_dir.iterdir():
        if f.is_file():
            (stage1 / f.name).write_bytes(f.read_bytes())
    state = (stage1 / "train_state.json").read_text()
    import json

    data = json.loads(state)
    del data["stages"]["diffusion"]
    (stage1 / "train_state.json").write_text(json.dumps(data))
    with pytest.raises(InferenceError, match="trained diffusion stage"):
        ModelPredictor(stage1)
    assert ModelPredictor(stage1, allow_untrained=True).kind == "latent-diffusion"
    with pytest.raises(InferenceError, match="samples"):
        ModelPredictor(tiny_ldm_dir, samples=0)
    with pytest.raises(InferenceError, match=r"model\.yaml"):
        ModelPredictor(tmp_path)


class _FirstCallOutOfGpuMemory(ModelPredictor):
    """Fault injection, as CI has no GPU: the predictor believes it is on CUDA and its first
    prediction fails the way a full GPU does (``torch.OutOfMemoryError``)."""

    failed = 0

    def _predict_on_device(self, inputs, prepared, samples):  # type: ignore[no-untyped-def]
        if self.device.type == "cuda":
            self.failed += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._predict_on_device(inputs, prepared, samples)


def test_gpu_out_of_memory_predicts_on_the_cpu(
    fresh_ldm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = oblique_study()
    expected = ModelPredictor(fresh_ldm_dir, samples=2, num_inference_steps=2).predict(inputs)
    predictor = _FirstCallOutOfGpuMemory(fresh_ldm_dir, samples=2, num_inference_steps=2)
    predictor.device = torch.device("cuda")
    with caplog.at_level("WARNING"):
        pred = predictor.predict(inputs)
    assert predictor.failed == 1 and predictor.device.type == "cpu"
    assert "out of GPU memory" in caplog.text and "on the CPU instead" in caplog.text
    np.testing.assert_array_equal(pred.mean.array, expected.mean.array)  # same seed, same result
    # on the CPU an out-of-memory error is not retried
    predictor.device = torch.device("cpu")
    predictor.failed = 0

    def fail(*args: object) -> None:
        raise torch.OutOfMemoryError("out of memory")

    predictor._predict_on_device = fail  # type: ignore[method-assign,assignment]
    with pytest.raises(torch.OutOfMemoryError):
        predictor.predict(inputs)


def _overflowing(module: torch.nn.Module) -> None:
    """Finite weights so large that the network's outputs overflow to inf / NaN (what a
    diverged training leaves behind: the weights load, the predictions are not numbers)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim > 1:
                p.mul_(1e12).add_(1e10)


def test_non_finite_predictions_are_refused(tmp_path: Path) -> None:
    """A model whose outputs are NaN used to report an empty mask: a "complete response" with
    no spread, exit 0. Now the prediction is refused, naming the outputs that are not finite."""
    from inference.unet_baseline import build_baseline_unet, save_baseline_dir, tiny_baseline_config

    inputs = oblique_study()
    model = build_model(tiny_config(), seed=0)
    _overflowing(model.unet)
    ldm = save_model_dir(model, tmp_path / "ldm")
    with pytest.raises(InferenceError, match=r"expected finite predictions.*mean image: \d+ of"):
        ModelPredictor(ldm, samples=1, num_inference_steps=2).predict(inputs)
    cfg = tiny_baseline_config()
    unet = build_baseline_unet(cfg, seed=0)
    _overflowing(unet)
    base = save_baseline_dir(unet, cfg, tmp_path / "unet")
    with pytest.raises(InferenceError, match=r"expected finite predictions.*image: \d+ of"):
        ModelPredictor(base).predict(inputs)


def test_the_field_of_view_is_where_the_model_predicted(
    fresh_ldm_dir: Path, tiny_baseline_dir: Path
) -> None:
    """A study longer than the model grid (40 slices of 4.6 mm against 128 mm): the prediction
    says where the model predicted (its field of view, on the source grid). Outside it the
    mean is the pre-treatment image (what mean.nii.gz holds there), the standard deviation 0,
    the mask empty; the outputs draw it as not predicted."""
    inputs = oblique_study(slices=40)
    predictor = ModelPredictor(fresh_ldm_dir, samples=2, num_inference_steps=2)
    ldm = predictor.predict(inputs)
    for pred in (ldm, ModelPredictor(tiny_baseline_dir).predict(inputs)):
        assert pred.field_of_view is not None
        same_grid(pred.field_of_view, inputs.t1c)
        fov = pred.field_of_view.array
        assert fov.dtype == bool
        np.testing.assert_array_equal(pred.predicted_region, fov)
        per_slice = fov.reshape(fov.shape[0], -1).any(axis=1)
        assert per_slice.any() and not per_slice.all()  # slices beyond the grid
        np.testing.assert_array_equal(pred.mean.array[~fov], inputs.t1c.array[~fov])
        assert not pred.std.array[~fov].any()
        assert not pred.tumour_mask.array[~fov].any()
    # the reconstruction (stage 1 alone) is on the same model grid
    rec = predictor.reconstruct(inputs)
    assert rec.field_of_view is not None and ldm.field_of_view is not None
    np.testing.assert_array_equal(rec.field_of_view.array, ldm.field_of_view.array)
    # the no-change baseline predicts every voxel
    assert NoChangeBaseline().predict(inputs).field_of_view is None
