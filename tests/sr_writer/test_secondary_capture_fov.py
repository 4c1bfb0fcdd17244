"""What a reader sees in the SC, uncertainty SC and derived MR series: where the model predicted
nothing (outside its field of view) no value is shown, marked and said so; the uncertainty
scale is stated; each image carries the number of the source slice it shows; no empty
Laterality; dciodvfy finds no error."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.overlays import get_overlay_array

from dicom_node.types import Prediction, StudyInputs, Volume
from inference.baseline import NoChangeBaseline
from inference.model_config import tiny_config
from inference.model_dir import save_model_dir
from inference.model_predictor import ModelPredictor
from inference.networks import build_model
from sr_writer.derived_mr import build_derived_mr
from sr_writer.labels import Equipment
from sr_writer.outputs import JobOutputs, OutputOptions, build_outputs
from sr_writer.secondary_capture import (
    BANNER_TEXT_RGB,
    FOV_EDGE_RGB,
    HATCH_BG_RGB,
    HATCH_RGB,
    OUTLINE_RGB,
    banner_height,
    build_secondary_capture,
    window_like,
)
from tests.sr_writer.synthetic_job import (
    JobCase,
    job_inputs,
    make_case,
    source_mr_datasets,
    write_all,
)
from tests.sr_writer.test_dciodvfy_outputs import dciodvfy_errors

NOT_PREDICTED = (HATCH_BG_RGB, HATCH_RGB, FOV_EDGE_RGB)


@functools.cache
def _big_case() -> JobCase:
    """A head of 168 x 168 x 200 mm: more than the tiny model's 128 mm grid holds."""
    return make_case(shape=(40, 48, 48), spacing=(3.5, 3.5, 5.0))


@functools.cache
def _predicted(tmp: str) -> tuple[Prediction, JobOutputs]:
    """The tiny model's prediction of :func:`_big_case` (through ModelPredictor, onto the
    source grid) and every output object built from it, the derived MR included."""
    case = _big_case()
    model_dir = save_model_dir(build_model(tiny_config(), seed=0), Path(tmp))
    inputs = StudyInputs(t1c=case.t1c, tumour_mask=case.t1c.with_array(case.gtv))
    pred = ModelPredictor(model_dir, num_inference_steps=2).predict(inputs, samples=2)
    options = OutputOptions(node_version="0.1.0", derived_mr=True)
    return pred, build_outputs(pred, job_inputs(case), options)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Prediction, JobOutputs]:
    return _predicted(str(tmp_path_factory.mktemp("tiny-model")))


def _image(ds: Dataset, nj: int, ni: int) -> tuple[np.ndarray, int, int]:
    """The image part of an SC (below the banner, above any strip) and its enlargement."""
    px = ds.pixel_array
    top = banner_height(px.shape[1])
    fc = px.shape[1] // ni
    fr = fc  # square source pixels: enlarged alike
    return px[top : top + nj * fr], fr, fc


def _is(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == np.asarray(rgb, dtype=np.uint8), axis=-1)


def _not_predicted(pixels: np.ndarray) -> np.ndarray:
    return (
        _is(pixels, NOT_PREDICTED[0])
        | _is(pixels, NOT_PREDICTED[1])
        | _is(pixels, NOT_PREDICTED[2])
    )


def test_the_model_predicts_a_field_of_view_smaller_than_the_head(
    predicted: tuple[Prediction, JobOutputs],
) -> None:
    pred, _ = predicted
    assert pred.field_of_view is not None
    fov = np.asarray(pred.field_of_view.array, dtype=bool)
    assert fov.shape == _big_case().t1c.shape
    per_slice = fov.reshape(fov.shape[0], -1)
    assert not per_slice.any(axis=1).all(), "expected slices wholly outside"
    assert (per_slice.any(axis=1) & ~per_slice.all(axis=1)).any(), "expected cropped slices"


def test_sc_shows_no_source_image_outside_the_field_of_view(
    predicted: tuple[Prediction, JobOutputs],
) -> None:
    """Outside: the hatch, never the (windowed) pre-treatment image, and the note under the
    image on every slice concerned. Inside: the predicted image as it always was drawn."""
    pred, out = predicted
    case = _big_case()
    _, nj, ni = case.t1c.shape
    fov = pred.predicted_region
    assert not fov.all(), "the model predicts everywhere: nothing to check"
    window = window_like(case.t1c)
    source = window.apply(np.asarray(case.t1c.array, dtype=np.float64))
    mean = window.apply(np.asarray(pred.mean.array, dtype=np.float64))
    mask = np.asarray(pred.tumour_mask.array, dtype=bool)
    assert not mask[~fov].any()
    for k, ds in enumerate(out.sc):
        image, fr, fc = _image(ds, nj, ni)
        outside = np.kron(~fov[k], np.ones((fr, fc))).astype(bool)
        # outside: every pixel is the hatch, none is a grey of the source
        assert _not_predicted(image[outside]).all(), k
        grey = image[..., 0] == image[..., 2]
        assert not (grey & outside).any(), k
        below = ds.pixel_array[banner_height(ds.Columns) + nj * fr :]
        if (~fov[k]).any():
            assert not np.array_equal(image[::fr, ::fc, 0][~fov[k]], source[k][~fov[k]])
            assert "outside the model's field of view" in ds.ImageComments
            assert "outside the model's field of view" in ds.DerivationDescription
            assert _is(below, BANNER_TEXT_RGB).sum() > 100, f"slice {k}: no note"
        else:
            assert "field of view" not in ds.ImageComments
            assert not _is(below, BANNER_TEXT_RGB).any()
        # inside: the windowed prediction, untouched but for the tumour outline
        inside = np.kron(fov[k], np.ones((fr, fc))).astype(bool)
        expected = np.kron(mean[k], np.ones((fr, fc), dtype=np.uint8))
        red = _is(image, OUTLINE_RGB)
        assert not (red & ~np.kron(mask[k], np.ones((fr, fc))).astype(bool)).any()
        keep = inside & ~red
        assert np.array_equal(image[..., 0][keep], expected[keep]), k
        assert np.array_equal(image[..., 2][keep], expected[keep]), k


def test_uncertainty_sc_marks_the_region_not_predicted_and_states_its_scale(
    predicted: tuple[Prediction, JobOutputs],
) -> None:
    """No black (zero uncertainty) where nothing was predicted; the grey-to-value scale is in
    the legend under the image and in the header: black 0, white the 99.5th percentile of
    the standard deviation inside the field of view, in the source's units."""
    pred, out = predicted
    case = _big_case()
    _, nj, ni = case.t1c.shape
    fov = pred.predicted_region
    std = np.asarray(pred.std.array, dtype=np.float64)
    top = float(np.percentile(std[fov], 99.5))
    assert top > 0
    for k, ds in enumerate(out.uncertainty_sc):
        image, fr, fc = _image(ds, nj, ni)
        outside = np.kron(~fov[k], np.ones((fr, fc))).astype(bool)
        assert _not_predicted(image[outside]).all(), k
        assert not _is(image, (0, 0, 0))[outside].any()
        for text in (ds.DerivationDescription, ds.ImageComments):
            found = re.search(r"black = 0, white = [0-9.]+ \(([0-9.e+-]+)", text)
            assert found, text
            assert float(found.group(1)) == pytest.approx(top, rel=1e-5)
            assert "T1-Gd units" in text and "standard deviation" in text
        # the legend strip: a heat bar from black to white with the white end's value
        legend = ds.pixel_array[banner_height(ds.Columns) + nj * fr :][: banner_height(ds.Columns)]
        row = legend[legend.shape[0] // 2]
        r, g, b = (row[:, c].astype(int) for c in range(3))
        assert _is(row, (0, 0, 0)).any() and _is(row, (255, 255, 255)).any()
        assert ((r == 255) & (g > 200) & (b < 60)).any()  # yellow, on the way to white
        assert _is(legend, BANNER_TEXT_RGB).sum() > 50


def test_derived_mr_holds_padding_outside_the_field_of_view(
    predicted: tuple[Prediction, JobOutputs],
) -> None:
    pred, out = predicted
    fov = pred.predicted_region
    mean = np.asarray(pred.mean.array, dtype=np.float64)
    for k, ds in enumerate(out.derived_mr):
        stored = ds.pixel_array
        assert int(ds.PixelPaddingValue) == -32768
        assert (stored[~fov[k]] == -32768).all()
        assert (stored[fov[k]] > -32768).all()
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        values = stored * slope + intercept
        assert np.allclose(values[fov[k]], mean[k][fov[k]], atol=slope)
        if (~fov[k]).any():
            hatch = get_overlay_array(ds, 0x6000)
            assert hatch[~fov[k]].any() and not hatch[fov[k]].any()
            assert "field of view" in ds.ImageComments
            assert "not predicted" in ds[0x60000022].value
        else:
            assert "field of view" not in ds.ImageComments
            assert 0x60000010 not in ds  # 48 columns: too narrow for the banner


def test_no_empty_laterality(predicted: tuple[Prediction, JobOutputs]) -> None:
    _, out = predicted
    for ds in (*out.sc, *out.uncertainty_sc, *out.derived_mr):
        assert "Laterality" not in ds


def test_dciodvfy_reports_no_error_on_images_outside_the_field_of_view(
    predicted: tuple[Prediction, JobOutputs], dciodvfy: str, tmp_path: Path
) -> None:
    pred, out = predicted
    fov = pred.predicted_region
    cropped = next(k for k in range(fov.shape[0]) if fov[k].any() and not fov[k].all())
    outside = next(k for k in range(fov.shape[0]) if not fov[k].any())
    objects = [
        out.sc[cropped],
        out.sc[outside],
        out.uncertainty_sc[cropped],
        out.derived_mr[cropped],
        out.derived_mr[outside],
    ]
    for path in write_all(objects, tmp_path):
        errors, report = dciodvfy_errors(dciodvfy, path)
        assert not errors, report
        assert "Laterality" not in report, report


def test_a_prediction_of_every_voxel_draws_no_mark() -> None:
    """The no-change baseline predicts everywhere: no hatch, no note strip (the images are
    the size they always were)."""
    case = make_case()
    pred = NoChangeBaseline().predict(
        StudyInputs(t1c=case.t1c, tumour_mask=case.t1c.with_array(case.gtv))
    )
    assert pred.field_of_view is None and pred.predicted_region.all()
    sc = build_outputs(pred, job_inputs(case), OutputOptions(node_version="0.1.0")).sc
    nj = case.t1c.shape[1]
    for ds in sc:
        px = ds.pixel_array
        assert not _not_predicted(px).any()
        assert "field of view" not in ds.ImageComments
        assert px.shape[0] == banner_height(px.shape[1]) + nj * (px.shape[0] // nj)


# --- InstanceNumber: that of the source slice shown ------------------------------------------


def _equipment(case: JobCase) -> Equipment:
    return Equipment(case.prediction.model_name, case.prediction.model_version, "0.1.0")


def _numbered(case: JobCase, numbers: list[int]) -> dict[str, int]:
    """The source T1-Gd as MR instances numbered ``numbers`` (slice k: ``numbers[k]``), as the
    node reads them back: InstanceNumber by SOP Instance UID."""
    datasets = source_mr_datasets(case)
    for ds, n in zip(datasets, numbers, strict=True):
        ds.InstanceNumber = n
    return {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in datasets}


@pytest.mark.parametrize("direction", ["head to foot", "foot to head"])
def test_each_image_takes_the_number_of_the_source_slice_it_shows(direction: str) -> None:
    """Slice k of the grid lies k steps towards the head; a source numbered from the top of
    the head (or from the feet) gives SC, uncertainty SC and derived MR images of the same
    numbers: image n shows the slice of source instance n."""
    case = make_case()
    nk = case.t1c.shape[0]
    numbers = list(range(nk, 0, -1)) if direction == "head to foot" else list(range(1, nk + 1))
    by_uid = _numbered(case, numbers)
    common = {
        "prediction": case.prediction,
        "source_t1c": case.t1c,
        "source_series": case.t1c_series,
        "patient": case.patient,
        "job": case.job,
        "equipment": _equipment(case),
        "source_instance_numbers": by_uid,
    }
    series = {
        "sc": build_secondary_capture(**common),  # type: ignore[arg-type]
        "uncertainty sc": build_secondary_capture(**common, uncertainty=True),  # type: ignore[arg-type]
        "derived mr": build_derived_mr(**common),  # type: ignore[arg-type]
    }
    for name, images in series.items():
        for k, ds in enumerate(images):
            shown = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            assert shown == case.t1c.source_instance_uids[k]
            assert int(ds.InstanceNumber) == by_uid[shown] == numbers[k], name
        first = min(images, key=lambda d: int(d.InstanceNumber))
        top_slice = "slice at the head" if direction == "head to foot" else "slice at the feet"
        expected = case.t1c.source_instance_uids[nk - 1 if direction == "head to foot" else 0]
        assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == expected, top_slice


def test_numbers_the_source_does_not_give_follow_its_order() -> None:
    """No numbers, or one twice: the images are numbered 1.. in the grid's order; an Enhanced
    MR's frames: in frame order (the slices of make_case's Enhanced MR are last slice first)."""
    case = make_case()
    nk = case.t1c.shape[0]

    def numbers(c: JobCase, by_uid: dict[str, int] | None) -> list[int]:
        images = build_secondary_capture(
            prediction=c.prediction,
            source_t1c=c.t1c,
            source_series=c.t1c_series,
            patient=c.patient,
            job=c.job,
            equipment=_equipment(c),
            source_instance_numbers=by_uid,
        )
        return [int(d.InstanceNumber) for d in images]

    assert numbers(case, None) == list(range(1, nk + 1))
    ones = _numbered(case, [1] * nk)
    assert numbers(case, ones) == list(range(1, nk + 1))
    twice = _numbered(case, [*range(nk, 2, -1), 2, 2])  # the last two both numbered 2
    assert numbers(case, twice) == [*range(nk, 2, -1), 1, 2]
    enhanced = make_case(enhanced=True)
    assert numbers(enhanced, {enhanced.t1c_series.sop_instance_uids[0]: 1}) == list(
        range(nk, 0, -1)
    )


def test_the_field_of_view_must_lie_on_the_source_grid() -> None:
    case = make_case()
    small = Volume(
        array=np.ones((2, 2, 2), dtype=bool),
        spacing=case.t1c.spacing,
        origin=case.t1c.origin,
        direction=case.t1c.direction,
    )
    bad = dataclasses.replace(case.prediction, field_of_view=small)
    with pytest.raises(Exception, match="field_of_view"):
        build_secondary_capture(
            prediction=bad,
            source_t1c=case.t1c,
            source_series=case.t1c_series,
            patient=case.patient,
            job=case.job,
            equipment=_equipment(case),
        )


def test_hatch_colours_are_no_value_of_either_map() -> None:
    """Blue above red and green: no grey (r = g = b) and no heat colour (r >= g >= b)."""
    for r, g, b in NOT_PREDICTED:
        assert b > r and b > g
