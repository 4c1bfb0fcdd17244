"""The glioforecast command: serve on the embedded default, send, echo, jobs, help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import build_parser, main
from dicom_node.ports import free_port
from dicom_node.settings import AllowedCaller
from tests import factories
from tests.conftest import REPO, tool, wait_for

GLIOFORECAST = [sys.executable, "-m", "dicom_node.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GLIOFORECAST, *args], capture_output=True, text=True, timeout=120, cwd=cwd or REPO
    )


def _subcommands() -> list[list[str]]:
    out = [[]]
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            out.append([name])
            for inner in sub._subparsers._group_actions if sub._subparsers else []:
                out += [[name, n] for n in inner.choices]
    return out


@pytest.mark.parametrize("words", _subcommands(), ids=lambda w: " ".join(w) or "top")
def test_help_everywhere(words: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        main([*words, "--help"])
    assert info.value.code == 0
    assert "usage: glioforecast" in capsys.readouterr().out


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    from dicom_node import __version__

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"glioforecast {__version__}"


def test_send_echo_and_jobs(run_node, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    node = run_node()
    port = str(node.scp.port)
    assert main(["echo", "127.0.0.1", port, "-aec", "GLIOFORECAST"]) == 0
    assert "status 0x0000" in capsys.readouterr().out
    assert main(["send", "127.0.0.1", port, "-aec", "GLIOFORECAST", str(tmp_path / "in")]) == 0
    captured = capsys.readouterr()
    assert "sent 9, failed 0, skipped 0" in captured.out
    assert "C-STORE" in captured.err  # the progress bar
    wait_for(lambda: node.store.list_jobs(), what="a job")
    data = ["--data-dir", str(node.settings.storage.data_dir)]
    assert main(["jobs", "list", "--json", *data]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert job["version"] == 1 and job["instance_count"] == 9
    assert main(["jobs", "show", str(job["id"]), *data]) == 0
    text = capsys.readouterr().out
    assert "t1c" in text and "AX T1 POST GD" in text and "flair" in text
    assert len(study["t1c"]) == 4
    # the transport study's RT structure set has no contour: the job fails and says why
    failed = wait_for(
        lambda: node.store.get_job(job["id"]).state == "failed", timeout=120, what="failure"
    )  # the node's first job starts the job processes' fork server: slow on a loaded machine
    assert failed
    assert main(["jobs", "show", str(job["id"]), *data]) == 0
    assert "ROI 'GTV' has no CLOSED_PLANAR contour" in capsys.readouterr().out


def test_send_to_a_node_that_refuses_us(run_node, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    factories.small_study(tmp_path / "in")
    node = run_node(node={"allowed_callers": (AllowedCaller("SCANNER1"),)})
    code = main(["send", "127.0.0.1", str(node.scp.port), "-aec", "GLIOFORECAST", "-q",
                 str(tmp_path / "in")])  # fmt: skip
    assert code == 1
    assert "association rejected" in capsys.readouterr().err


def test_send_skips_files_that_are_not_dicom(run_node, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    node = run_node()
    main(["send", "127.0.0.1", str(node.scp.port), "-aec", "GLIOFORECAST", "-q",
          str(tmp_path / "in")])  # fmt: skip
    captured = capsys.readouterr()
    assert f"sent {sum(map(len, study.values()))}, failed 0, skipped 1" in captured.out
    assert "notes.txt: not a DICOM Part 10 file" in captured.err


def test_jobs_without_a_database_says_where_it_looked(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["jobs", "list", "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "no job database at" in capsys.readouterr().err


def _serve(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """``glioforecast serve`` as a process; its log goes to ``tmp_path/serve.log``."""
    return subprocess.Popen(
        [*GLIOFORECAST, *extra, "serve", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        cwd=tmp_path, stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _listening(port: int) -> bool:
    result = subprocess.run(
        [tool("echoscu"), "-aec", "GLIOFORECAST", "127.0.0.1", str(port)], capture_output=True
    )
    return result.returncode == 0


def test_serve_on_embedded_default_receives_the_real_tcia_study(real_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The real MR + RTSTRUCT study sent by storescu; jobs show lists series and roles.

    The embedded default waits its 30 s quiet period before it makes the job.
    """
    series = real_data / "tcia_sts001_mr_rtstruct" / "MR_T1"
    port = free_port()
    server = _serve(tmp_path, port)
    try:
        wait_for(lambda: _listening(port), timeout=60, what="the node to listen")
        sent = subprocess.run(
            [tool("storescu"), "+sd", "+r", "-aec", "GLIOFORECAST", "127.0.0.1", str(port),
             str(series)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        data = ["--data-dir", str(tmp_path / "data")]

        def job() -> dict | None:  # type: ignore[type-arg]
            out = run_cli("jobs", "list", "--json", *data, cwd=tmp_path)
            jobs = json.loads(out.stdout) if out.returncode == 0 else []
            return jobs[0] if jobs else None

        listed = wait_for(job, timeout=90, interval=1, what="the job after the quiet period")
        shown = run_cli("jobs", "show", str(listed["id"]), *data, cwd=tmp_path)
        assert shown.returncode == 0
        assert "AXIAL SE T1 - RESEARCH" in shown.stdout and "RTstruct_T1" in shown.stdout
        detail = json.loads(run_cli("jobs", "show", str(listed["id"]), "--json", *data).stdout)
        roles = {
            s["series_description"]: (s["role"], s["instance_count"]) for s in detail["series"]
        }
        assert roles == {"AXIAL SE T1 - RESEARCH": ("t1", 40), "RTstruct_T1": ("rtstruct", 1)}
        # a thigh T1 without contrast is not a glioblastoma work-up: the job says why it stops
        assert detail["state"] == "failed"
        assert detail["reason"].startswith("missing required role t1c")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    out = (tmp_path / "serve.log").read_text()
    assert server.returncode == 0
    assert "signal SIGTERM received: stopping" in out


def test_logs_carry_no_patient_identifiers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    config = tmp_path / "debug.yaml"
    config.write_text("logging: {level: DEBUG}\nassembly: {quiet_period_s: 0.2}\n")
    port = free_port()
    server = _serve(tmp_path, port, "--config", str(config))
    try:
        wait_for(lambda: _listening(port), timeout=60, what="the node to listen")
        files = [str(p) for paths in study.values() for p in paths]
        sent = subprocess.run(
            [tool("storescu"), "-aec", "GLIOFORECAST", "127.0.0.1", str(port), *files],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        data = ["--data-dir", str(tmp_path / "data")]
        wait_for(lambda: json.loads(run_cli("jobs", "list", "--json", *data).stdout), timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    out = (tmp_path / "serve.log").read_text()
    assert "job 1 created" in out
    for identifier in ("Lefèvre", "Lef", "Zoë", "GF-TEST-001", "19610402"):
        assert identifier not in out


def test_serve_refuses_a_bad_config_at_start_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 104\n  tls: {enabled: true, certificate: /nonexistent.pem}\n")
    result = run_cli("--config", str(bad), "serve", cwd=tmp_path)
    assert result.returncode == 2
    assert f"invalid configuration in {bad}" in result.stderr
    expected = "node.tls.certificate: expected an existing file, found /nonexistent.pem"
    assert expected in result.stderr
    assert "node.tls.private_key: expected a file path when TLS is enabled" in result.stderr


def test_json_logs_are_one_object_per_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "json.yaml"
    config.write_text("logging: {format: json}\n")
    port = free_port()
    server = _serve(tmp_path, port, "--config", str(config))
    try:
        wait_for(lambda: _listening(port), timeout=60, what="the node to listen")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    lines = (tmp_path / "serve.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("listening as GLIOFORECAST" in r["message"] for r in records)
    assert all({"time", "level", "logger", "job", "message"} <= r.keys() for r in records)


def test_a_second_node_on_the_same_data_folder_is_refused_and_the_first_goes_on(
    tmp_path: Path,
) -> None:
    """Two nodes on one data folder would run each other's jobs, and the second's start-up
    would remove the files the first is writing: the second stops before touching anything."""
    config = tmp_path / "node.yaml"
    config.write_text("health: {enabled: false}\n")
    first_port, second_port = free_port(), free_port()
    first = _serve(tmp_path, first_port, "--config", str(config))
    try:
        wait_for(lambda: _listening(first_port), timeout=60, what="the first node to listen")
        from dicom_node.spool import INCOMING

        partial = tmp_path / "data" / "spool" / INCOMING / ".in-flight.part"  # a write under way
        partial.parent.mkdir(exist_ok=True)
        partial.write_bytes(b"half an instance")
        second = run_cli("--config", str(config), "serve", "--data-dir", str(tmp_path / "data"),
                         "--port", str(second_port), cwd=tmp_path)  # fmt: skip
        assert second.returncode == 1
        assert (
            f"the data folder {tmp_path / 'data'} is in use by another glioforecast serve "
            f"(pid {first.pid})"
        ) in second.stderr
        assert partial.exists()  # its start-up did not clean the first node's spool
        assert _listening(first_port)
        # a node that dies (SIGKILL) leaves no lock behind: the next one starts
        first.kill()
        first.wait(timeout=30)
        first = _serve(tmp_path, second_port, "--config", str(config))
        wait_for(lambda: _listening(second_port), timeout=60, what="the next node to listen")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_what_site_it_gets_wrong_is_said_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Mistakes a person installing the node makes, each answered with what was expected
    and what was found, and the exit code of its kind (2: usage or configuration, 1: the
    rest), never a traceback."""
    monkeypatch.delenv("GLIOFORECAST_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)

    def said(*argv: str) -> tuple[int, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err

    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("node:\n  ae_title: GLI\xd6\n".encode("latin-1"))
    assert said("check-config", str(binary)) == (2, (
        f"glioforecast: invalid configuration in {binary}:\n  - line 2: expected UTF-8 text, "
        "found the byte 0xD6 (byte 21): a binary file, or text saved in another encoding?\n"
    ))  # fmt: skip
    same = tmp_path / "same.yaml"
    same.write_text("node: {port: 23112}\nhealth: {port: 23112}\n")
    code, text = said("--config", str(same), "check-config")  # the file from --config
    assert code == 2 and "health.port: expected a port of its own, found 23112, which " \
        "node.port uses too" in text, text  # fmt: skip
    code, text = said("jobs", "show", "99999999999999999999999")
    assert code == 2 and "argument job_id: expected an id from 1 to" in text, text
    code, text = said("echo", "127.0.0.1", "70000")
    assert code == 2 and "argument port: expected a port from 1 to 65535, found 70000" in text
    code, text = said("outbox", "retry", "12")
    assert code == 2 and text.startswith("usage: glioforecast outbox retry"), text
    code, text = said("jobs", "list")
    assert code == 1 and "no --config and no $GLIOFORECAST_CONFIG: the embedded default's" in text
    comments = tmp_path / "comments.yaml"
    comments.write_text("# to be filled in\n")
    code, text = said("check-config", str(comments))
    assert code == 0 and "(the file sets nothing: every value is the embedded default's)" in text
    code, text = said("check-config")  # no file, no --config: the embedded default
    assert code == 0 and "data in glioforecast-data (from where it runs: here " \
        f"{tmp_path.resolve() / 'glioforecast-data'})" in text, text  # fmt: skip
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not an image")
    code, text = said("send", "127.0.0.1", "11112", str(notes), "--quiet")
    assert code == 1 and "force=True" not in text, text
    assert f"nothing sent: expected DICOM Part 10 files in {notes}, found 1 file(s), none of " \
        "them one" in text, text  # fmt: skip

    afile = tmp_path / "afile"
    afile.write_text("")
    result = run_cli("serve", "--data-dir", str(afile / "data"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"the data folder {afile / 'data'} cannot be used: expected a folder, found the " \
        f"file {afile} in its path" in result.stderr, result.stderr  # fmt: skip
