"""A study is not made a job while the association bringing it is still open and sending: a
sender that pauses mid-study for longer than the quiet period (a PACS fetching the rest from
its archive, a loaded machine) got a job of half the study, failed for the missing series,
then a second one. A real node on a localhost port, a pynetdicom sender."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, RTStructureSetStorage

from dicom_node import assembler
from dicom_node.assembler import Assembler
from dicom_node.jobs import FAILED, JobStore
from dicom_node.spool import Spool
from tests import factories
from tests.conftest import wait_for
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_jobs import _receive


@contextmanager
def _association(port: int) -> Iterator[Any]:
    ae = AE(ae_title="SLOWPACS")
    for sop_class in (MRImageStorage, RTStructureSetStorage):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="GLIOFORECAST")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def _send(assoc: Any, paths: list[Path]) -> None:
    for path in paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000


def test_a_sender_pausing_mid_study_gets_one_job(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    study = factories.small_study(tmp_path / "in")
    node = run_node()  # quiet period 0.3 s
    with _association(node.scp.port) as assoc:
        _send(assoc, study["t1c"])
        time.sleep(1.5)  # five quiet periods: the T1-Gd alone would have made a job
        assert node.store.list_jobs() == []
        _send(assoc, study["flair"] + study["rtstruct"])
    (job,) = wait_for(lambda: node.store.list_jobs(), timeout=30, what="the job")
    assert job.version == 1
    assert job.instance_count == sum(map(len, study.values()))
    # the operator is told why no job came yet, once, and how the association ended
    waits = [
        r.getMessage() for r in caplog.records if "waits for the association" in r.getMessage()
    ]
    assert len(waits) == 1 and job.study_instance_uid in waits[0], waits
    ended = wait_for(
        lambda: [r.getMessage() for r in caplog.records if "(127.0.0.1) ended" in r.getMessage()],
        what="the association's end in the log",
    )
    assert ended == [
        f"association from SLOWPACS (127.0.0.1) ended: {job.instance_count} instance(s) stored, "
        "of 1 study(ies) with new instances"
    ]


def test_duplicates_on_an_open_association_do_not_hold_a_study(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router re-sending what the node holds on its open association held the study as long
    as it went on: only new instances that could change it hold it."""
    monkeypatch.setattr(assembler, "ARRIVING_HOLD_S", 1.0)
    study = factories.small_study(tmp_path / "in")
    node = run_node()
    with _association(node.scp.port) as assoc:
        _send(assoc, [p for paths in study.values() for p in paths])
        started = time.monotonic()
        while not node.store.list_jobs():
            assert time.monotonic() - started < 30, "no job while duplicates kept coming"
            _send(assoc, study["t1c"][:1])  # the same instance again
            time.sleep(0.6)  # more than the quiet period (0.3 s), which a duplicate restarts
        (job,) = node.store.list_jobs()
        assert job.instance_count == sum(map(len, study.values()))


def test_an_association_kept_open_holds_a_study_for_a_while_only(  # type: ignore[no-untyped-def]
    run_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that keeps its association open (a router) does not hold a study for ever."""
    monkeypatch.setattr(assembler, "ARRIVING_HOLD_S", 1.0)
    study = factories.small_study(tmp_path / "in")
    node = run_node()
    with _association(node.scp.port) as assoc:
        _send(assoc, study["t1c"])
        (job,) = wait_for(lambda: node.store.list_jobs(), timeout=30, what="the job")
        assert job.state == FAILED and "rtstruct" in job.reason


def test_a_study_held_again_later_is_said_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held, made a job, then reopened by a late series and held again: the second wait was
    not said (the study stayed in the set of those said once the node had nothing due)."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    settings = make_settings(tmp_path / "data", assembly={"quiet_period_s": 30})
    study = factories.small_study(tmp_path / "in")
    spool, store = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite3")
    uid = str(pydicom.dcmread(study["t1c"][0], stop_before_pixels=True).StudyInstanceUID)
    sending: dict[str, float] = {}
    assembly = Assembler(store, settings, arriving=lambda within: dict(sending))
    t0 = 1_000_000.0
    _receive(spool, store, study["t1c"] + study["rtstruct"], t0)
    sending[uid] = 40.0
    assert assembly.run_once(now=t0 + 40) == []  # quiet, but its association still sends
    sending.clear()
    assert len(assembly.run_once(now=t0 + 41)) == 1  # it ended
    assert assembly.run_once(now=t0 + 100) == []  # nothing due
    _receive(spool, store, study["flair"], t0 + 200)  # a late series, on an association
    sending[uid] = 40.0
    assert assembly.run_once(now=t0 + 240) == []
    said = [r.getMessage() for r in caplog.records if "waits for the association" in r.getMessage()]
    assert len(said) == 2 and all(uid in s for s in said), said
