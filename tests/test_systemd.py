"""The systemd unit is valid and hardened as the design asks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import REPO, tool

UNIT = REPO / "systemd" / "glioforecast.service"


def _directives() -> dict[str, str]:
    """Each directive's value; one given several times (``ExecReload``) joined by newlines."""
    out: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out[m.group(1)] = "\n".join(filter(None, [out.get(m.group(1)), m.group(2)]))
    return out


def test_unit_is_hardened() -> None:
    d = _directives()
    assert d["User"] == "glioforecast"
    assert d["Restart"] == "on-failure"
    assert d["Type"] == "notify" and d["WatchdogSec"]
    assert d["NoNewPrivileges"] == "yes"
    assert d["ProtectSystem"] == "strict"
    assert d["ReadWritePaths"] == "/var/lib/glioforecast"  # the spool: the only writable path
    assert d["PrivateTmp"] == "yes"
    assert d["ExecStart"].endswith("glioforecast serve")
    assert "check-config" in d["ExecStartPre"]
    # a reload checks the file, then signals the node (which applies it: test_reload.py)
    check, signal = d["ExecReload"].splitlines()
    assert "check-config ${GLIOFORECAST_CONFIG}" in check
    assert signal == "/bin/kill -HUP $MAINPID"


def test_unit_verifies_and_scores_ok(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    venv_bin = Path(__import__("sys").executable).parent
    unit = tmp_path / "glioforecast.service"
    unit.write_text(UNIT.read_text().replace("/opt/glioforecast/bin", str(venv_bin)))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= 4.0  # systemd rates <= 4.0 as "OK" or better
