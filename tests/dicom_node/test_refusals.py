"""Refusals are logged and audited once a minute per sender and reason, and none is lost: a
scanner with the wrong called AE title resends every image, and one line and one Security
Alert per try would bury the log and flood the audit repository."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from dicom_node.refusals import Refusals
from dicom_node.service import Node
from tests.audit_repository import security_alerts
from tests.conftest import wait_for
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_scp import echoscu


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_refusal_is_reported_at_once_and_the_rest_once_per_window(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="dicom_node.refusals")
    clock, audited = _Clock(), []
    refusals = Refusals(lambda calling, host, reason: audited.append((calling, host, reason)),
                        clock)  # fmt: skip
    for i in range(30):  # a sender retrying every second
        refusals.report("mr1", f"refused MR1 (try {i})", "refused: wrong title", "10.0.0.5", "MR1")
        clock.now += 1
        refusals.flush()
    refusals.report("ct", "refused CT", None, "10.0.0.6")  # another kind: at once, not audited
    assert audited == [("MR1", "10.0.0.5", "refused: wrong title")]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["refused MR1 (try 0)", "refused CT"]

    for _ in range(30):  # it goes on: one report per window, the latest words with the count
        refusals.report("mr1", "refused MR1 (later)", "refused: wrong title", "10.0.0.5", "MR1")
        clock.now += 1
        refusals.flush()
    assert audited[1:] == [("MR1", "10.0.0.5", "refused: wrong title (59 more times in the last "
                                                "60 s)")]  # fmt: skip
    assert caplog.records[-1].getMessage() == "refused MR1 (later) (59 more times in the last 60 s)"

    clock.now += 120  # it stopped: nothing left to say, the kinds are forgotten
    refusals.flush()
    refusals.flush()
    assert len(audited) == 2 and len(caplog.records) == 3
    refusals.report("mr1", "refused MR1 again", "refused: wrong title", "10.0.0.5", "MR1")
    assert audited[-1] == ("MR1", "10.0.0.5", "refused: wrong title")  # a new window, at once


def test_what_is_counted_is_reported_when_the_node_stops_or_the_flush_lags() -> None:
    clock, audited = _Clock(), []
    refusals = Refusals(lambda calling, host, reason: audited.append(reason), clock)
    for _ in range(4):
        refusals.report("k", "refused", "refused", "10.0.0.5")
    clock.now += 61  # no flush ran: the next refusal reports itself and the three before
    refusals.report("k", "refused", "refused", "10.0.0.5")
    refusals.report("k", "refused", "refused", "10.0.0.5")
    refusals.flush(final=True)  # the node stops: the one counted since
    assert audited == ["refused", "refused (and 3 more in the 61 s before)",
                       "refused (1 more time in the last 0 s)"]  # fmt: skip
    refusals.flush(final=True)
    assert len(audited) == 3


def test_the_kinds_remembered_are_bounded() -> None:
    """Past Refusals.most_kept kinds (addresses that each call once), a new kind is reported
    one refusal at a time rather than memory growing with the addresses."""
    clock, audited = _Clock(), []
    refusals = Refusals(lambda calling, host, reason: audited.append(host), clock)
    refusals.most_kept = 10
    for i in range(12):
        refusals.report(("host", i), "refused", "refused", f"10.0.0.{i}")
    refusals.report(("host", 11), "refused", "refused", "10.0.0.11")  # not remembered
    refusals.report(("host", 3), "refused", "refused", "10.0.0.3")  # remembered: counted
    assert audited == [f"10.0.0.{i}" for i in range(12)] + ["10.0.0.11"]
    assert len(refusals._windows) == 10


def test_a_scanner_with_the_wrong_called_ae_title_makes_one_alert_a_minute(  # type: ignore[no-untyped-def]
    tmp_path: Path, caplog
) -> None:
    """Twelve associations from a scanner that calls the node by the wrong AE title: all are
    refused (and counted in the metrics), one log line and one Security Alert at once, the
    other eleven in one line and one alert when its window ends; what is counted when the node
    stops is reported then."""
    caplog.set_level(logging.WARNING, logger="dicom_node.refusals")
    audit_file = tmp_path / "audit.log"
    node = Node(make_settings(tmp_path / "data", audit={"enabled": True, "file": audit_file}))
    node.start()
    loop = threading.Thread(target=node.run_forever, daemon=True)
    loop.start()
    try:
        for _ in range(12):
            assert echoscu(node.scp.port, aec="OLD_NODE").returncode != 0
        said = "association refused: called AE title 'OLD_NODE', expected 'GLIOFORECAST'"
        wait_for(lambda: said in security_alerts(audit_file), what="the first alert")
        assert echoscu(node.scp.port).returncode == 0
        logged = [r.getMessage() for r in caplog.records if "OLD_NODE" in r.getMessage()]
        assert logged == ["association from SCANNER1 (127.0.0.1) refused: called AE title "
                          "'OLD_NODE', expected 'GLIOFORECAST'"]  # fmt: skip
        assert (
            'glioforecast_associations_refused_total{reason="called_ae_title"} 12' in node.metrics()
        )
        node.scp.refusals.every_s = 0.5  # the window ends: the main loop reports the rest
        summary = wait_for(
            lambda: [a for a in security_alerts(audit_file) if "(11 more times" in a],
            what="the alert for the eleven others",
        )
        assert summary[0].startswith(said + " (11 more times in the last ")
        node.scp.refusals.every_s = 60.0
        for _ in range(3):  # another title: one alert at once, two counted
            assert echoscu(node.scp.port, aec="PACS").returncode != 0
    finally:
        node.request_stop()
        loop.join(timeout=10)
        node.stop()
    alerts = [a for a in security_alerts(audit_file) if "'PACS'" in a]
    assert len(alerts) == 2, alerts
    assert re.search(r" \(2 more times in the last \d+ s\)$", alerts[1]), alerts
