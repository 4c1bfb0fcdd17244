"""The health and metrics endpoint of a running node, read over real HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request

from dicom_node.health import prometheus
from tests import factories
from tests.conftest import tool, wait_for
from tests.dicom_node.test_cli import run_cli
from tests.dicom_node.test_scp import storescu


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics:\n{text}")


def test_health_and_metrics(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    study = factories.small_study(tmp_path / "in")
    files = [p for paths in study.values() for p in paths]
    node = run_node()
    assert node.health is not None
    port = node.health.port
    code, body = get(port, "/health")
    assert code == 200
    summary = json.loads(body)
    assert summary["status"] == "ok"
    assert summary["components"] == {
        "receiver": True,
        "worker": True,
        "sender": True,
        "storage": True,
    }
    storescu(node.scp.port, *files)
    # the node's first job starts the job processes' fork server: 15 s on a loaded machine
    wait_for(lambda: node.store.counts()["failed"] == 1, timeout=120, what="the job to fail")
    code, text = get(port, "/metrics")
    assert code == 200
    assert "# TYPE glioforecast_instances_received_total counter" in text
    assert metric(text, "glioforecast_instances_received_total") == len(files)
    assert 'glioforecast_jobs{state="failed"} 1' in text  # that RTSTRUCT has no contour
    assert metric(text, "glioforecast_queue_depth") == 0
    assert 'glioforecast_component_up{component="worker"} 1' in text
    for identifier in ("Lef", "GF-TEST-001", "19610402"):
        assert identifier not in text
    assert get(port, "/nothing")[0] == 404
    # a scrape job's params add a query string; monitors and load balancers check with HEAD
    code, again = get(port, "/metrics?module=glioforecast")
    assert code == 200 and metric(again, "glioforecast_instances_received_total") == len(files)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/health", "/metrics"):
        conn.request("HEAD", path)
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read() == b"", path
        assert int(answer.getheader("Content-Length") or 0) > 0
    conn.request("GET", "/health")  # the same connection: a GET after a HEAD has its body
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.close()
    # a part that stops makes /health answer 503
    node.worker.stop()
    code, body = get(port, "/health")
    assert code == 503
    assert json.loads(body)["components"]["worker"] is False


def test_serve_reports_a_port_in_use(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the health endpoint on a free port: the default one may be taken on this machine
    config = tmp_path / "site.yaml"
    config.write_text("health: {port: 0}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--config", str(config), "serve", "--data-dir", str(tmp_path / "data"),
                         "--port", str(port), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert f"DICOM receiver: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_metrics_pass_promtool_and_keep_every_digit(run_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What Prometheus' own linter says of /metrics, and numbers a scraper can use: a counter
    past a million or a Unix timestamp printed to 6 digits would be wrong by thousands."""
    promtool = tool("promtool")
    study = factories.small_study(tmp_path / "in")
    node = run_node()
    assert node.health is not None
    storescu(node.scp.port, *study["t1c"])
    # the node's first job starts the job processes' fork server: 15 s on a loaded machine
    wait_for(lambda: node.store.counts()["failed"] == 1, timeout=120, what="the job to fail")
    code, text = get(node.health.port, "/metrics")
    assert code == 200
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "# TYPE glioforecast_job_duration_seconds summary" in text
    started = metric(text, "glioforecast_config_last_reload_success_timestamp_seconds")
    assert abs(started - node.last_reload[1]) < 0.01
    assert prometheus([("x_total", "h", {}, 123456789.0), ("y", "h", {}, 0.1)]) == (
        "# HELP x_total h\n# TYPE x_total counter\nx_total 123456789\n"
        "# HELP y h\n# TYPE y gauge\ny 0.1\n"
    )


def test_the_health_endpoint_holds_few_silent_connections_and_not_for_long(  # type: ignore[no-untyped-def]
    run_node, monkeypatch
) -> None:
    """A connection to the health port that sends no request is closed after
    health.REQUEST_TIMEOUT_S (it held a thread for ever), and the node's connection limits hold
    there too: a scrape still gets its answer."""
    from dicom_node import health
    from tests.dicom_node.test_hostile import _closed_at_once, _connect_from

    monkeypatch.setattr(health, "REQUEST_TIMEOUT_S", 1.0)
    node = run_node(node={"max_connections_per_host": 2})
    port = node.health.port
    silent = [_connect_from("127.0.0.2", port) for _ in range(3)]
    try:
        assert _closed_at_once(silent[2], within_s=0.5)  # over the limit for its address
        assert not _closed_at_once(silent[0], within_s=0.3)
        assert get(port, "/health")[0] == 200
        assert all(_closed_at_once(s, within_s=5) for s in silent[:2])  # the request timeout
    finally:
        for sock in silent:
            sock.close()
    text = get(port, "/metrics")[1]
    assert (
        'glioforecast_connections_refused_total{listener="health",'
        'reason="max_connections_per_host"} 1'
    ) in text
