"""The Prometheus alerting rules shipped for site IT (`config/prometheus/`): valid for
promtool, firing on the series they are written for (`tests/prometheus/`), and naming only
metrics a running node exports."""

from __future__ import annotations

import dataclasses
import re
import subprocess

from dicom_node.ports import free_port
from tests.conftest import REPO, tool, wait_for
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_health import get
from tests.dicom_node.test_scp import storescu
from tests.factories import small_study

RULES = REPO / "config" / "prometheus" / "glioforecast-alerts.yml"
CASES = REPO / "tests" / "prometheus" / "glioforecast-alerts-test.yml"


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", CASES.name], cwd=CASES.parent, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_metric_the_rules_name_is_exported_by_a_running_node(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.settings import AuditSettings, Destination, StowSettings, WebClient

    down = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port(),
                       failure_notice=True)  # fmt: skip
    (tmp_path / "token").write_text("t")
    stow = StowSettings(
        enabled=True, port=0, clients=(WebClient("R", token_file=tmp_path / "token"),)
    )
    settings = dataclasses.replace(
        make_settings(tmp_path / "data"),
        stow=stow,
        destinations=(down,),
        audit=AuditSettings(enabled=True, file=tmp_path / "audit.log"),
    )
    node = run_node(settings)
    study = small_study(tmp_path / "in")
    assert storescu(node.scp.port, *study["t1c"]).returncode == 0
    wait_for(lambda: node.outbox.counts().get("pacs"), timeout=60, what="a delivery row")
    assert node.health is not None
    code, text = get(node.health.port, "/metrics")
    assert code == 200
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    named = set(re.findall(r"\bglioforecast_[a-z_]+", RULES.read_text()))
    assert named and named <= exported, sorted(named - exported)
