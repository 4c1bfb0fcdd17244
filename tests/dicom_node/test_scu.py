"""C-STORE SCU against a real pynetdicom storage SCP on an ephemeral localhost port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.errors import SendError
from dicom_node.ports import free_port
from dicom_node.scu import Destination, presentation_contexts, store_batch
from tests.sr_writer.synthetic_job import default_outputs

ALL_CLASSES = (
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    RTStructureSetStorage,
    Comprehensive3DSRStorage,
    MRImageStorage,
)


@dataclass
class StoreSCP:
    """A storage SCP that records what it receives and can answer chosen failure statuses."""

    ae_title: str = "TESTPACS"
    host: str = "127.0.0.1"
    sop_classes: Sequence[str] = ALL_CLASSES
    fail_with: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    delay_s: float = 0.0  # how long it takes over each C-STORE (a slow PACS)
    received: list[str] = field(default_factory=list)
    associations: int = 0
    server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def destination(self, name: str = "pacs") -> Destination:
        return Destination(name=name, ae_title=self.ae_title, host=self.host, port=self.port)

    def start(self, port: int = 0) -> StoreSCP:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        for sop in self.sop_classes:
            ae.add_supported_context(sop)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self.server = ae.start_server((self.host, port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def _on_store(self, event: evt.Event) -> int:
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        status = self.fail_with.get(uid)
        if status is not None:
            return status
        event.dataset  # decode: a broken dataset fails here  # noqa: B018
        time.sleep(self.delay_s)
        with self._lock:
            self.received.append(uid)
        return 0x0000


@pytest.fixture
def scp() -> Iterator[StoreSCP]:
    s = StoreSCP().start()
    yield s
    s.stop()


def _objects() -> list[Dataset]:
    out = default_outputs()
    return [*out.sc[:3], out.seg, out.rtstruct, out.sr, out.derived_mr[0]]


def test_contexts_come_from_the_objects() -> None:
    cxs = presentation_contexts(_objects())
    assert {cx.abstract_syntax for cx in cxs} == set(ALL_CLASSES)
    for cx in cxs:
        assert "1.2.840.10008.1.2.1" in cx.transfer_syntax
        assert "1.2.840.10008.1.2" in cx.transfer_syntax


def test_one_association_sends_the_batch(scp: StoreSCP) -> None:
    objs = _objects()
    results = store_batch(objs, scp.destination())
    assert [r.sop_instance_uid for r in results] == [str(d.SOPInstanceUID) for d in objs]
    assert all(r.delivered and r.status == 0 for r in results)
    assert sorted(scp.received) == sorted(str(d.SOPInstanceUID) for d in objs)
    assert scp.associations == 1


def test_failure_status_is_reported_per_object(scp: StoreSCP) -> None:
    objs = _objects()
    scp.fail_with = {str(objs[1].SOPInstanceUID): 0xA700, str(objs[3].SOPInstanceUID): 0x0122}
    results = store_batch(objs, scp.destination())
    by_uid = {r.sop_instance_uid: r for r in results}
    busy = by_uid[str(objs[1].SOPInstanceUID)]
    assert not busy.delivered and busy.status == 0xA700 and not busy.permanent
    assert "0xA700" in (busy.error or "") and "pacs" in (busy.error or "")
    unsupported = by_uid[str(objs[3].SOPInstanceUID)]
    assert not unsupported.delivered and unsupported.permanent
    assert sum(r.delivered for r in results) == len(objs) - 2


def test_unaccepted_sop_class_is_permanent() -> None:
    scp = StoreSCP(sop_classes=(SecondaryCaptureImageStorage,)).start()
    try:
        out = default_outputs()
        results = store_batch([out.sc[0], out.seg], scp.destination())
    finally:
        scp.stop()
    assert results[0].delivered
    assert not results[1].delivered and results[1].permanent
    assert "no presentation context" in (results[1].error or "")


def test_peer_down_raises_send_error_naming_the_destination() -> None:
    dest = Destination("archive", "NOBODY", "127.0.0.1", free_port())
    with pytest.raises(SendError, match=r"archive \(NOBODY@127\.0\.0\.1:\d+\)"):
        store_batch(_objects()[:1], dest, acse_timeout_s=5, network_timeout_s=5)


def test_wrong_called_ae_is_rejected(scp: StoreSCP) -> None:
    dest = Destination("pacs", "WRONG", "127.0.0.1", scp.port)
    with pytest.raises(SendError, match="rejected"):
        store_batch(_objects()[:1], dest)
    assert scp.received == []


def test_a_release_the_reactor_cannot_answer_ends_in_an_abort(scp: StoreSCP) -> None:
    """pynetdicom's release() waits without a limit for the association's reactor to pause. A
    reactor that ends instead (a peer's abort or the network timeout coming at that moment)
    never does: a delivery thread waited for ever in a storage commitment request's release.
    The reactor is made to end that way here, as the race leaves it: gone, not paused, the
    association still established."""
    from pynetdicom.presentation import build_context

    from dicom_node.scu import associate, release

    assoc = associate(
        scp.destination(), [build_context(MRImageStorage)], calling_ae="GLIOFORECAST",
        acse_timeout_s=2,
    )  # fmt: skip
    assoc._kill = True  # the reactor leaves its loop without pausing
    assoc._reactor_checkpoint.set()
    assoc.join(10)
    assert not assoc.is_alive() and assoc.is_established and not assoc._is_paused
    started = time.monotonic()
    release(assoc, wait_s=1)
    assert time.monotonic() - started < 10
    assert not assoc.is_established and assoc.is_aborted
