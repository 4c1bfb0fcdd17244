"""Storage commitment with a real PACS: Orthanc (Debian package) commits to keeping the results,
and reports an object it lost, which the node sends again."""

from __future__ import annotations

import dataclasses
import logging
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicom_node.local_pacs import OrthancTLS
from dicom_node.outbox import deliver_due
from dicom_node.scu import Destination, StoreResult, store_batch
from dicom_node.service import Node
from dicom_node.settings import Destination as DestinationSettings
from dicom_node.settings import DestinationTLS
from tests.conftest import receiver_tls, wait_for
from tests.dicom_node.conftest import make_settings
from tests.integration.orthanc import OrthancServer, orthanc_binary
from tests.sr_writer.synthetic_job import PATIENT_NAME, default_outputs

pytestmark = pytest.mark.slow


def _node_and_orthanc(
    tmp_path: Path, pki: Path | None = None, calling_ae_title: str = "GLIOFORECAST"
) -> tuple[Node, OrthancServer, Destination]:
    """A node whose destination is an Orthanc doing storage commitment, and that Orthanc (not
    started). With ``pki``, both take DICOM over TLS only, from peers with a certificate of
    its CA. The node sends as ``calling_ae_title``."""
    orthanc_binary()
    orthanc_tls = node_tls = None
    destination_tls = DestinationTLS()
    if pki is not None:
        orthanc_tls = OrthancTLS(
            pki / "server.pem", pki / "server.key", pki / "ca.pem", client_certificate_required=True
        )
        node_tls = receiver_tls(pki)
        destination_tls = DestinationTLS(
            enabled=True,
            ca_certificates=pki / "ca.pem",
            certificate=pki / "client.pem",
            private_key=pki / "client.key",
        )
    orthanc = OrthancServer(tmp_path / "orthanc", tls=orthanc_tls)
    settings = make_settings(
        tmp_path / "data",
        sending={"retry_initial_s": 0.0, "calling_ae_title": calling_ae_title},
    )
    if node_tls is not None:
        settings = dataclasses.replace(
            settings, node=dataclasses.replace(settings.node, tls=node_tls)
        )
    pacs = DestinationSettings(
        name="pacs",
        ae_title=orthanc.ae_title,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        storage_commitment=True,
        tls=destination_tls,
    )
    node = Node(dataclasses.replace(settings, destinations=(pacs,)))
    return node, orthanc, Destination.from_settings(pacs)


def _start(node: Node, orthanc: OrthancServer, tls: ssl.SSLContext | None = None) -> None:
    """The node's receiver, then Orthanc knowing it (over TLS when ``tls`` is given) by the AE
    title it sends as (Orthanc reports storage commitment to the AE title that asked)."""
    node.scp.start()
    orthanc.modalities["glioforecast"] = Destination(
        "glioforecast", node.settings.sending.calling_ae_title, "127.0.0.1", node.scp.port,
        tls=tls,
    )  # fmt: skip
    orthanc.start()


def _stop(node: Node, orthanc: OrthancServer) -> None:
    """The node's sender and receiver, then Orthanc, stopped; the node's databases closed."""
    node.sender.stop()
    node.scp.stop()
    orthanc.stop()
    node.outbox.close()
    node.store.close()


def _deliver(node: Node, dest: Destination, objects: Sequence[Dataset], job: str) -> None:
    """The node's sender started, ``objects`` queued for ``dest``, and every one of them sent
    and committed by the PACS's report."""
    node.sender.start()
    node.outbox.enqueue(objects, [dest.name], job=job)
    node.sender.wake()
    wait_for(
        lambda: node.outbox.counts() == {dest.name: {"sent": len(objects)}},
        timeout=60,
        what=f"every commitment (reported to {node.settings.sending.calling_ae_title})",
    )


@pytest.mark.parametrize("over_tls", [False, True], ids=["plain", "tls"])
def test_results_count_as_delivered_once_orthanc_committed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pki: Path, over_tls: bool
) -> None:
    """Stored, then committed by Orthanc's report; with TLS, the results go to Orthanc and its
    report comes to the node over DICOM TLS, each side checking the other's certificate."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    node, orthanc, dest = _node_and_orthanc(tmp_path, pki if over_tls else None)
    out = default_outputs()
    n = len(out.all())
    try:
        _start(node, orthanc, dest.tls)
        _deliver(node, dest, out.all(), "job-commit")
        # the files go once the rows say sent (the report's thread deletes them after)
        wait_for(
            lambda: not any(node.outbox.objects_dir.iterdir()), timeout=30, what="the files to go"
        )
        items = node.outbox.items()
        assert all(i.committed_at is not None and i.commit_requests == 1 for i in items)
        assert all(i.committed_at >= i.sent_at for i in items if i.sent_at)  # type: ignore[operator]
        assert node.outbox.undelivered("job-commit") == 0
        assert orthanc.count_instances() == n
    finally:
        _stop(node, orthanc)
    reports = [r.getMessage() for r in caplog.records if "commitment report from" in r.getMessage()]
    assert reports and all(orthanc.ae_title in m for m in reports), reports
    assert sum(int(re.search(r"(\d+) committed", m).group(1)) for m in reports) == n  # type: ignore[union-attr]
    assert not any(PATIENT_NAME in r.getMessage() for r in caplog.records)


def test_an_object_orthanc_lost_is_sent_again_and_then_committed(tmp_path: Path) -> None:
    node, orthanc, dest = _node_and_orthanc(tmp_path)
    out = default_outputs()
    objects = out.all()
    lost = str(out.sr.SOPInstanceUID)

    def store_then_lose(
        datasets: Sequence[Dataset], peer: Destination, on_result: Any = None
    ) -> list[StoreResult]:
        """C-STORE to Orthanc, then the archive loses one object (deleted through its REST
        API) before the node asks for the commitment."""
        results = store_batch(datasets, peer, on_result=on_result)
        for instance in orthanc.post(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": lost}}
        ):
            orthanc.delete(f"/instances/{instance}")
        return results

    try:
        _start(node, orthanc)
        ob = node.outbox
        ob.enqueue(objects, [dest.name], job="job-lost")
        first = deliver_due(ob, [dest], store=store_then_lose)
        assert first.sent == len(objects) and first.commitment_requests == 1
        wait_for(
            lambda: ob.counts()[dest.name].get("committing", 0) == 0,
            timeout=30,
            what="Orthanc's report",
        )
        by_uid = {i.sop_instance_uid: i for i in ob.items()}
        assert ob.counts() == {dest.name: {"sent": len(objects) - 1, "pending": 1}}
        assert by_uid[lost].state == "pending" and by_uid[lost].last_status == 0x0112
        assert "did not commit" in (by_uid[lost].last_error or "")
        assert "0x0112 (no such object instance)" in (by_uid[lost].last_error or "")
        assert ob.undelivered("job-lost") == 1
        wait_for(
            lambda: [p.name for p in ob.objects_dir.iterdir()] == [f"{lost}.dcm"],
            timeout=30,
            what="only the lost object's file to be kept",
        )

        again = deliver_due(ob, [dest])
        assert again.sent == 1 and again.commitment_requests == 1
        wait_for(
            lambda: ob.counts() == {dest.name: {"sent": len(objects)}},
            timeout=30,
            what="the resend",
        )
        wait_for(
            lambda: not any(ob.objects_dir.iterdir()),
            timeout=30,
            what="the files to go",
        )
        resent = next(i for i in ob.items() if i.sop_instance_uid == lost)
        # stored, reported lost, stored again; asked twice
        assert resent.attempts == 3 and resent.commit_requests == 2
        assert orthanc.count_instances() == len(objects)
    finally:
        _stop(node, orthanc)


def test_orthanc_reports_to_the_ae_title_the_node_sends_as(tmp_path: Path) -> None:
    """With ``sending.calling_ae_title`` other than the receiver's AE title, Orthanc (which
    knows the node by the AE title that asked) reports to that AE title: the receiver refused
    it ("called AE title 'GLIOFC_SCU', expected 'GLIOFORECAST'"), and every delivery went dead
    for want of a report."""
    node, orthanc, dest = _node_and_orthanc(tmp_path, calling_ae_title="GLIOFC_SCU")
    out = default_outputs()
    try:
        _start(node, orthanc)
        _deliver(node, dest, out.all(), "job-ae")
        assert all(i.committed_at is not None for i in node.outbox.items())
        assert node.scp.associations_refused["called_ae_title"] == 0
    finally:
        _stop(node, orthanc)
