"""Secondary Capture series: slice order, window, outline, banner, no patient data burned in."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from highdicom.sc import SCImage
from scipy import ndimage

from dicom_node.errors import ExportError
from sr_writer.labels import BANNER_TEXT, Equipment
from sr_writer.outputs import JobOutputs, OutputOptions, build_outputs
from sr_writer.secondary_capture import (
    BANNER_BG_RGB,
    BANNER_TEXT_RGB,
    OUTLINE_RGB,
    UNCERTAINTY_OUTLINE_RGB,
    Window,
    banner_height,
    build_secondary_capture,
    window_like,
)
from tests.sr_writer.synthetic_job import (
    JobCase,
    default_case,
    default_outputs,
    job_inputs,
    make_case,
)


def _build(case: JobCase, window: Window | None = None) -> list[SCImage]:
    eq = Equipment(
        model_name=case.prediction.model_name,
        model_version=case.prediction.model_version,
        node_version="0.1.0",
    )
    return build_secondary_capture(
        prediction=case.prediction,
        source_t1c=case.t1c,
        source_series=case.t1c_series,
        patient=case.patient,
        job=case.job,
        equipment=eq,
        window=window,
    )


def _is(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == np.asarray(rgb, dtype=np.uint8), axis=-1)


def test_one_image_per_slice_in_source_order() -> None:
    case = default_case()
    sc = default_outputs().sc
    assert len(sc) == case.t1c.shape[0]
    assert [int(d.InstanceNumber) for d in sc] == list(range(1, len(sc) + 1))
    refs = [d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in sc]
    assert refs == list(case.t1c_series.sop_instance_uids)
    assert len({d.SOPInstanceUID for d in sc}) == len(sc)
    assert {d.SeriesInstanceUID for d in sc} == {sc[0].SeriesInstanceUID}
    d = sc[0]
    assert d.ConversionType == "SYN" and d.PhotometricInterpretation == "RGB"
    assert d.BurnedInAnnotation == "NO"
    assert tuple(d.PatientOrientation) == ("L", "P")


def test_outline_on_the_predicted_tumour_only() -> None:
    case = default_case()
    sc = default_outputs().sc
    mask = np.asarray(case.prediction.tumour_mask.array, dtype=bool)
    _, nj, ni = mask.shape
    for k, ds in enumerate(sc):
        px = ds.pixel_array
        image = px[banner_height(px.shape[1]) :]
        fr, fc = image.shape[0] // nj, image.shape[1] // ni
        assert image.shape[:2] == (nj * fr, ni * fc)
        red = _is(image, OUTLINE_RGB)
        if not mask[k].any():
            assert not red.any(), f"slice {k}: outline drawn where no tumour is predicted"
            continue
        big = np.kron(mask[k], np.ones((fr, fc), dtype=bool)).astype(bool)
        assert red.sum() > 4 * fc, f"slice {k}: outline missing"
        assert not (red & ~big).any(), f"slice {k}: outline outside the predicted tumour"
        interior = ndimage.binary_erosion(big, iterations=3)
        assert not (red & interior).any(), f"slice {k}: outline fills the tumour"


def test_banner_is_on_every_image() -> None:
    for ds in default_outputs().sc:
        px = ds.pixel_array
        band = px[: banner_height(px.shape[1])]
        bg = _is(band, BANNER_BG_RGB).mean()
        text = _is(band, BANNER_TEXT_RGB).sum()
        assert bg > 0.6, f"banner background covers only {bg:.0%}"
        assert text > 200, f"only {text} banner text pixels"
        assert not _is(px[banner_height(px.shape[1]) :], BANNER_BG_RGB).all(axis=1).any()
    assert BANNER_TEXT in default_outputs().sc[0].ImageComments


@pytest.mark.parametrize("spacing", [(0.9, 0.8, 2.5), (0.5, 0.65, 3.0), (1.2, 0.45, 3.0)])
def test_oblong_pixels_show_an_unstretched_banner(spacing: tuple[float, float, float]) -> None:
    """A source with oblong pixels (a rectangular field of view) gets images with pixels close
    to square, and a banner as tall, in millimetres, as on square pixels: a viewer draws both
    with the pixel spacing, and the text is not stretched. The image spans the source's field
    of view exactly."""
    case = make_case(spacing=spacing)
    _, nj, ni = case.t1c.shape
    for ds in _build(case)[:2]:
        row_mm, column_mm = map(float, ds.PixelSpacing)
        assert 0.95 < row_mm / column_mm < 1.05, (row_mm, column_mm)
        cols = ds.Columns
        square = banner_height(cols)  # rows of the banner on square pixels
        rows = ds.Rows - nj * round(spacing[1] / row_mm)
        assert abs(rows * row_mm - square * column_mm) <= row_mm, (rows, square)
        assert _is(ds.pixel_array[:rows], BANNER_TEXT_RGB).sum() > 200  # the text is there
        assert _is(ds.pixel_array[:rows], BANNER_BG_RGB).mean() > 0.6
        # the image below the banner spans the source's field of view
        assert abs((ds.Rows - rows) * row_mm - nj * spacing[1]) < 1e-3
        assert abs(cols * column_mm - ni * spacing[0]) < 1e-3


def test_window_like_the_source() -> None:
    case = default_case()
    w = window_like(case.t1c)
    ds = default_outputs().sc[8]
    px = ds.pixel_array
    fr = (px.shape[0] - banner_height(px.shape[1])) // case.t1c.shape[1]
    fc = px.shape[1] // case.t1c.shape[2]
    image = px[banner_height(px.shape[1]) :: fr, ::fc, 0]
    mean = np.asarray(case.prediction.mean.array[8], dtype=float)
    mask = np.asarray(case.prediction.tumour_mask.array[8], dtype=bool)
    expected = w.apply(mean)
    # outline pixels are red in channel 0 too; compare away from the outline
    keep = ~ndimage.binary_dilation(mask, iterations=1)
    assert np.array_equal(image[keep], expected[keep])
    # a narrower window saturates the brain: the rendering follows the window
    narrow = _build(case, window=Window(center=100.0, width=50.0))
    brain = narrow[8].pixel_array[banner_height(px.shape[1]) :: fr, ::fc, 1]
    assert (brain[keep & (mean > 300)] == 255).all()


def test_no_patient_data_burned_in() -> None:
    """Pixels do not depend on who the patient is."""
    a = make_case(patient_name="Lefèvre^Zoë")
    b = dataclasses.replace(
        a,
        patient=dataclasses.replace(
            a.patient, patient_name="Other^Person", patient_id="X9", patient_birth_date="20000101"
        ),
    )
    pa = _build(a)[8].pixel_array
    pb = _build(b)[8].pixel_array
    assert np.array_equal(pa, pb)


def test_uncertainty_series() -> None:
    out = default_outputs()
    unc = out.uncertainty_sc
    assert len(unc) == len(out.sc)
    assert unc[0].SeriesInstanceUID != out.sc[0].SeriesInstanceUID
    assert "UNCERTAINTY" in unc[0].SeriesDescription
    px = unc[8].pixel_array[banner_height(unc[8].Columns) :]
    assert _is(px, UNCERTAINTY_OUTLINE_RGB).any()
    # heat map: not grey
    assert (px[..., 0] != px[..., 2]).mean() > 0.05


def _tilted(degrees: float) -> np.ndarray:
    """Axial slices tilted about the left-right axis (an AC-PC aligned brain scan)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@functools.cache
def oblique_outputs() -> JobOutputs:
    case = make_case(direction=_tilted(20.0))
    return build_outputs(case.prediction, job_inputs(case), OutputOptions(node_version="0.1.0"))


def test_an_oblique_study_gets_every_output_with_its_orientation() -> None:
    """Tilted 20 degrees, the columns run posterior and up: PatientOrientation "PH" (several
    letters, as DICOM allows; the node once failed the job on it)."""
    out = oblique_outputs()
    assert list(out.sc[0].PatientOrientation) == ["L", "PH"]
    assert list(out.uncertainty_sc[0].PatientOrientation) == ["L", "PH"]
    assert out.seg.NumberOfFrames == len(out.sc)
    assert out.rtstruct.ROIContourSequence[0].ContourSequence
    # beyond 45 degrees the main direction is the other one
    steep = make_case(direction=_tilted(60.0))
    assert list(_build(steep)[0].PatientOrientation) == ["L", "HP"]


def test_refuses_prediction_on_another_grid() -> None:
    case = default_case()
    small = case.prediction.mean.with_array(np.zeros(case.t1c.shape, dtype=np.float32))
    other = dataclasses.replace(
        case.t1c, array=np.zeros((4, 8, 8), dtype=np.float32), source_instance_uids=()
    )
    with pytest.raises(ExportError, match="expected shape"):
        build_secondary_capture(
            prediction=dataclasses.replace(case.prediction, mean=small),
            source_t1c=other,
            source_series=case.t1c_series,
            patient=case.patient,
            job=case.job,
            equipment=Equipment("m", "1", "0"),
        )


def test_a_series_rescaled_to_fractions_is_windowed_over_its_range() -> None:
    """A T1-Gd stored with RescaleSlope 0.001 (values 0..1.3): the standard's integer VOI
    formula, with its minimum width of 1, whitened half the picture. The window follows the
    values' range, as for the same image at slope 1."""
    case = default_case()
    values = np.asarray(case.t1c.array, dtype=np.float64)
    small = case.t1c.with_array((values / 1000.0).astype(np.float32))
    as_stored = window_like(case.t1c).apply(values)
    as_fractions = window_like(small).apply(values / 1000.0)
    assert np.abs(as_fractions.astype(int) - as_stored.astype(int)).max() <= 2
