"""DICOM SEG of the predicted tumour: read back with highdicom, same mask, same geometry."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from pydicom import dcmread

from sr_writer.references import slice_geometry
from tests.sr_writer.synthetic_job import default_case, default_outputs


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
