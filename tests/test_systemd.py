"""The systemd unit is valid and hardened as the design asks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    # a reload signals the node, which checks the file and applies it or says why not
    # (test_reload.py); checking it here first kept a refused edit from the node's metric
    assert d["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # a configuration error is not restarted for ever
    assert d["RestartPreventExitStatus"] == "2"
    assert int(d["StartLimitBurst"]) <= 10 and int(d["StartLimitIntervalSec"]) >= 60
    # SIGKILL comes after the node's own longest stop (service.py: 240 s)
    assert int(d["TimeoutStopSec"]) > 240
    # the documentation the units name is installed with the node (setup.cfg data_files)
    for unit in ("glioforecast.service", "glioforecast-backup.service"):
        (doc,) = re.findall(r"^Documentation=file:///opt/glioforecast/(\S+)$",
                            (REPO / "systemd" / unit).read_text(), re.M)  # fmt: skip
        assert doc.startswith("share/glioforecast/docs/"), doc
        assert f"    docs/{Path(doc).name}" in (REPO / "setup.cfg").read_text(), doc


VENV_BIN = Path(sys.executable).parent


def _installed(tmp_path: Path, *names: str) -> list[Path]:
    """The units as installed, pointing at this virtual environment."""
    units = []
    for name in names:
        unit = tmp_path / name
        text = (REPO / "systemd" / name).read_text()
        unit.write_text(text.replace("/opt/glioforecast/bin", str(VENV_BIN)))
        units.append(unit)
    return units


@pytest.mark.parametrize(
    "names",
    [("glioforecast.service",), ("glioforecast-backup.service", "glioforecast-backup.timer")],
)
def test_units_verify_and_score_ok(tmp_path: Path, names: tuple[str, ...]) -> None:
    analyze = tool("systemd-analyze")
    units = _installed(tmp_path, *names)
    verify = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(units[0])], capture_output=True, text=True
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= 4.0  # systemd rates <= 4.0 as "OK" or better


def _as_systemd_passes_it(line: str) -> list[str]:
    """An Exec line's arguments as systemd hands them over (systemd.service, "Command lines"):
    split with quotes, ``%%`` a percent sign, ``$$`` a dollar sign, C escapes (``\\``)."""
    words = shlex.split(line.split("=", 1)[1], posix=False)
    out = []
    for word in words:
        if word[0] == word[-1] == "'":
            word = word[1:-1]
        out.append(word.replace("%%", "%").replace("$$", "$").replace("\\\\", "\\"))
    return out


def test_the_nightly_backup_copies_the_data_folder_and_keeps_a_week(tmp_path: Path) -> None:
    """The backup unit's two commands, run as systemd would run them (no systemd here): a new
    dated copy, and the node's own copies older than BACKUP_KEEP_DAYS removed; nothing else."""
    from dicom_node.service import Node
    from tests.dicom_node.conftest import make_settings

    settings = make_settings(tmp_path / "data")
    Node(settings).stop()  # a data folder as a node leaves it
    (unit,) = _installed(tmp_path, "glioforecast-backup.service")
    lines = unit.read_text().splitlines()
    backups = tmp_path / "backups"
    old, recent, foreign = backups / "20260101T023000Z", backups / "recent", backups / "site"
    for folder in (old, recent, foreign):
        folder.mkdir(parents=True)
    for folder in (old, recent):
        (folder / "glioforecast-backup.json").write_text("{}")
    long_ago = time.time() - 30 * 86400
    for folder in (old, foreign):
        os.utime(folder, (long_ago, long_ago))
    config = tmp_path / "node.yaml"
    config.write_text(f"storage: {{data_dir: {settings.storage.data_dir}}}\n")
    env = {**os.environ, "BACKUP_DIR": str(backups), "BACKUP_KEEP_DAYS": "7",
           "GLIOFORECAST_CONFIG": str(config)}  # fmt: skip
    for directive in ("ExecStart=", "ExecStartPost="):
        (line,) = [line for line in lines if line.startswith(directive)]
        run = subprocess.run(
            _as_systemd_passes_it(line), env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stdout + run.stderr
    made = [p for p in backups.iterdir() if p not in (old, recent, foreign)]
    assert len(made) == 1 and re.fullmatch(r"\d{8}T\d{6}Z", made[0].name), made
    assert (made[0] / "jobs.sqlite3").is_file() and (made[0] / "secret.key").is_file()
    assert not old.exists()  # a week-old copy of the node's: removed
    assert recent.exists() and foreign.exists()  # a recent one, and what is not the node's
