"""The embedded local PACS: a real pynetdicom Storage SCP on an ephemeral localhost port."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

from dicom_node.errors import GlioforecastError, SendError
from dicom_node.local_pacs import EmbeddedPacs, StoredSeries
from dicom_node.scu import store_batch
from dicom_node.sender import echo
from sr_writer.structured_report import read_summary
from tests.factories import small_study
from tests.sr_writer.synthetic_job import default_case, default_outputs, source_mr_datasets


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[EmbeddedPacs]:
    server = EmbeddedPacs(tmp_path / "pacs").start()
    yield server
    server.stop()


def _by_uid(series: list[StoredSeries]) -> dict[str, StoredSeries]:
    return {s.series_instance_uid: s for s in series}


def test_echo_answers_only_its_own_ae_title(pacs: EmbeddedPacs) -> None:
    assert echo("127.0.0.1", pacs.dicom_port, pacs.ae_title, "DEMO") == 0
    with pytest.raises(SendError, match="rejected"):
        echo("127.0.0.1", pacs.dicom_port, "SOMEONE_ELSE", "DEMO")


def test_source_study_and_every_output_class_arrive_and_read_back(
    pacs: EmbeddedPacs, tmp_path: Path
) -> None:
    case = default_case()
    sources = store_batch(source_mr_datasets(case), pacs.destination())
    assert all(r.delivered for r in sources), [r.error for r in sources if not r.delivered]
    out = default_outputs()
    results = store_batch(out.all(), pacs.destination())
    assert all(r.delivered for r in results), [r.error for r in results if not r.delivered]

    study = case.patient.study_instance_uid
    assert pacs.studies() == [study]
    series = _by_uid(pacs.study_series(study))
    expected = out.series_counts()
    assert set(series) == {case.t1c_series.series_instance_uid, *expected}
    assert len(series[case.t1c_series.series_instance_uid].instances) == len(sources)
    for uid, count in expected.items():
        assert len(series[uid].instances) == count, series[uid]
    assert pacs.count_instances() == len(sources) + len(out.all())
    modalities = {s.modality for s in series.values()}
    assert {"MR", "OT", "SR", "SEG", "RTSTRUCT"} <= modalities, modalities

    # each instance is a Part 10 file in the storage folder, nothing partial left behind
    files = sorted((tmp_path / "pacs" / "storage").rglob("*.dcm"))
    assert len(files) == pacs.count_instances()
    assert not list((tmp_path / "pacs" / "storage").rglob(".*.part"))
    (sr_series,) = [s for s in series.values() if s.modality == "SR"]
    sr = pacs.read(sr_series.instances[0])
    assert sr.SOPInstanceUID == out.sr.SOPInstanceUID
    assert read_summary(sr) == read_summary(out.sr)
    on_disk = dcmread(pacs.path(sr_series.instances[0]))
    assert on_disk.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    # a second PACS on the same folder (a restart) knows what the first one stored
    pacs.stop()
    again = EmbeddedPacs(tmp_path / "pacs").start()
    try:
        restarted = _by_uid(again.study_series(study))
        assert {u: set(s.instances) for u, s in restarted.items()} == {
            u: set(s.instances) for u, s in series.items()
        }
        assert {u: s.description for u, s in restarted.items()} == {
            u: s.description for u, s in series.items()
        }
        assert again.count_instances() == len(files)
    finally:
        again.stop()


def test_success_means_the_file_is_on_disk_and_bad_instances_are_refused(
    pacs: EmbeddedPacs, tmp_path: Path
) -> None:
    good = dcmread(small_study(tmp_path / "study", slices=1)["t1c"][0])
    truncated = dcmread(small_study(tmp_path / "other", slices=1)["t1c"][0])
    truncated.PixelData = truncated.PixelData[:100]
    ae = AE(ae_title="DEMO")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(good)
        # the success status is only sent once the file is written: it is there now
        assert status.Status == 0x0000
        stored = dcmread(pacs.path(str(good.SOPInstanceUID)))
        assert stored.PixelData == good.PixelData
        refused = assoc.send_c_store(truncated)
        assert refused.Status == 0xC210
        assert "Pixel Data is truncated" in str(refused.ErrorComment)
        no_uid = dcmread(small_study(tmp_path / "third", slices=1)["t1c"][0])
        del no_uid.StudyInstanceUID
        assert assoc.send_c_store(no_uid).Status == 0xC210
    finally:
        assoc.release()
    assert pacs.count_instances() == 1
    assert pacs.studies() == [str(good.StudyInstanceUID)]
    with pytest.raises(GlioforecastError, match=re.escape("expected study 1.2.3.4, found")):
        pacs.study_series("1.2.3.4")


@pytest.mark.slow
def test_orthanc_answers_the_same_queries_as_the_embedded_pacs(
    pacs: EmbeddedPacs, tmp_path: Path
) -> None:
    """The demo reads both kinds through one API: same series, counts, tags and SR."""
    from tests.integration.orthanc import OrthancServer, orthanc_binary

    orthanc_binary()
    orthanc = OrthancServer(tmp_path / "orthanc").start()
    try:
        case = default_case()
        objects = [*source_mr_datasets(case), *default_outputs().all()]
        for server in (pacs, orthanc):
            results = store_batch(objects, server.destination())
            assert all(r.delivered for r in results), [r.error for r in results if r.error]
        study = case.patient.study_instance_uid
        assert orthanc.studies() == pacs.studies() == [study]
        assert orthanc.count_instances() == pacs.count_instances() == len(objects)

        def summary(server: EmbeddedPacs | OrthancServer) -> dict[str, tuple[object, ...]]:
            return {
                s.series_instance_uid: (
                    s.modality,
                    s.series_number,
                    s.description,
                    len(s.instances),
                    sorted(str(server.read(i).SOPInstanceUID) for i in s.instances),
                )
                for s in server.study_series(study)
            }

        assert summary(orthanc) == summary(pacs)
        for server in (pacs, orthanc):
            (sr_series,) = [s for s in server.study_series(study) if s.modality == "SR"]
            assert read_summary(server.read(sr_series.instances[0])) == read_summary(
                default_outputs().sr
            )
    finally:
        orthanc.stop()
