"""DICOM SEG of the predicted tumour: read back with highdicom, same mask, same geometry."""

from __future__ import annotations

import dataclasses
import io

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from inference.synthetic.planning_frame import rotation_about
from sr_writer.outputs import OutputOptions, build_outputs
from sr_writer.references import slice_geometry
from tests.sr_writer.synthetic_job import default_case, default_outputs, job_inputs, make_case


def test_seg_reads_back_as_the_predicted_mask() -> None:
    case = default_case()
    buf = io.BytesIO()
    default_outputs().seg.save_as(buf, enforce_file_format=True)
    seg = hd.seg.Segmentation.from_dataset(dcmread(io.BytesIO(buf.getvalue())))
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == case.t1c.frame_of_reference_uid
    assert seg.ContentQualification == "RESEARCH"
    desc = seg.get_segment_description(1)
    assert desc.segment_label == "Predicted tumour"
    assert desc.segmented_property_type.value == "108369006"
    uids = list(case.t1c_series.sop_instance_uids)
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]
    expected = np.asarray(case.prediction.tumour_mask.array, dtype=bool)
    assert arr.shape == expected.shape
    assert np.array_equal(arr.astype(bool), expected)
    # each frame lies where its source slice lies
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uids.index(src)
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, slice_geometry(case.t1c, k).image_position, atol=1e-4)


def test_an_enhanced_mr_t1gd_gets_every_output_referencing_its_frames() -> None:
    """An Enhanced MR T1-Gd is one instance whose frames are the slices: the SEG failed
    ("Only one source image should be provided in case images are multi-frame images"), and
    the job with it. The SEG's frames follow the source's, each referencing its frame; the
    SC and RTSTRUCT name the frame of each slice."""
    case = make_case(enhanced=True)
    out = build_outputs(case.prediction, job_inputs(case), OutputOptions(node_version="0.1.0"))
    nk = case.t1c.shape[0]
    mask = np.asarray(case.prediction.tumour_mask.array).astype(bool)
    (uid,) = case.t1c_series.sop_instance_uids
    seg = out.seg
    assert seg.NumberOfFrames == nk
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        frame = int(source.ReferencedFrameNumber)
        assert source.ReferencedSOPInstanceUID == uid
        k = nk - frame  # frame 1 is the last slice
        assert np.array_equal(seg.pixel_array[index].astype(bool), mask[k]), index
    frames = [int(sc.SourceImageSequence[0].ReferencedFrameNumber) for sc in out.sc]
    assert frames == list(range(nk, 0, -1))
    contour_frames = {
        int(c.ContourImageSequence[0].ReferencedFrameNumber)
        for roi in out.rtstruct.ROIContourSequence
        for c in roi.ContourSequence
    }
    assert contour_frames and contour_frames <= {nk - k for k in range(nk) if mask[k].any()}
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in out.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert uid in evidence


def test_a_t1gd_split_over_several_enhanced_mr_instances_gets_every_output() -> None:
    """An Enhanced MR T1-Gd whose frames are spread over two instances (slices taken in turn):
    the job failed to build its outputs ("expected the T1-Gd slices to be the frames of one
    multi-frame instance"). Each SEG frame, SC image and RTSTRUCT contour now names the
    instance and frame of its slice; the SR's evidence names both instances."""
    case = make_case(enhanced=True, instances=2)
    options = OutputOptions(node_version="0.1.0", derived_mr=True)
    out = build_outputs(case.prediction, job_inputs(case), options)
    nk = case.t1c.shape[0]
    expected = [(f"{case.t1c_series.series_instance_uid}.{k % 2 + 1}", k // 2 + 1)
                for k in range(nk)]  # fmt: skip
    mask = np.asarray(case.prediction.tumour_mask.array).astype(bool)
    seg = out.seg
    assert seg.NumberOfFrames == nk
    named = []
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPClassUID == case.t1c_series.sop_class_uid
        k = expected.index((source.ReferencedSOPInstanceUID, int(source.ReferencedFrameNumber)))
        assert np.array_equal(seg.pixel_array[index].astype(bool), mask[k]), index
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, slice_geometry(case.t1c, k).image_position, atol=1e-4)
        named.append(k)
    assert sorted(named) == list(range(nk))
    (series,) = seg.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == list(
        case.t1c_series.sop_instance_uids
    )

    def sources(images: list[Dataset]) -> list[tuple[str, int]]:
        return [
            (d.SourceImageSequence[0].ReferencedSOPInstanceUID,
             int(d.SourceImageSequence[0].ReferencedFrameNumber))
            for d in images
        ]  # fmt: skip

    assert sources(out.sc) == expected
    assert sources(out.derived_mr) == expected
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in out.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert set(case.t1c_series.sop_instance_uids) <= evidence
    # the SEG reads back as the mask, slice by slice, through highdicom
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    again = hd.seg.Segmentation.from_dataset(dcmread(io.BytesIO(buf.getvalue())))
    assert again.number_of_segments == 1


def test_the_outputs_give_the_source_slice_thickness_not_the_spacing() -> None:
    """A T1-Gd of 1 mm thick slices 2.5 mm apart: the SEG, the SC and the RTSTRUCT's planes say
    1 mm thick, as the source does (they said 2.5 mm, the spacing)."""
    case = make_case()
    thin = dataclasses.replace(case.t1c, slice_thickness=1.0)
    prediction = dataclasses.replace(
        case.prediction,
        mean=thin.with_array(case.prediction.mean.array),
        std=thin.with_array(case.prediction.std.array),
        tumour_mask=thin.with_array(case.prediction.tumour_mask.array),
    )
    case = dataclasses.replace(case, t1c=thin, prediction=prediction)
    out = build_outputs(case.prediction, job_inputs(case), OutputOptions(node_version="0.1.0"))
    measures = out.seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 1.0
    assert float(measures.SpacingBetweenSlices) == 2.5
    assert slice_geometry(case.t1c, 0).slice_thickness == 1.0


def _decimal_strings(ds: Dataset) -> list[tuple[str, str]]:
    """(keyword, value as written) of every DS value in ``ds``, nested ones included."""
    found: list[tuple[str, str]] = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found.extend(_decimal_strings(item))
        elif element.VR == "DS" and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            found.extend((element.keyword, str(v)) for v in values)
    return found


def test_oblique_slice_spacing_is_written_as_the_source_has_it() -> None:
    """An oblique T1-Gd of slices 3.3 mm (then 2 mm) apart: the SEG says 3.3 (2.0), not the
    3.30000000706337 (1.9999999949628) that highdicom derives from the rounded slice positions;
    no decimal string of the SEG or the RTSTRUCT carries such noise (more than 8 decimals)."""
    turned = rotation_about([1.0, 0.4, 0.7], 17.0)
    for spacing, written in ((3.3, "3.3"), (2.0, "2.0")):
        case = make_case(spacing=(0.9, 0.8, spacing), direction=turned)
        out = build_outputs(case.prediction, job_inputs(case), OutputOptions(node_version="0.1.0"))
        measures = out.seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert str(measures.SpacingBetweenSlices) == written
        for obj in (out.seg, out.rtstruct):
            noisy = [(k, v) for k, v in _decimal_strings(obj) if len(v.partition(".")[2]) > 8]
            assert noisy == [], noisy
