"""The node predicting with a trained model directory (tiny, one epoch) instead of the baseline."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from dicom_node.jobs import DONE
from dicom_node.service import Node
from tests.conftest import tool, wait_for
from tests.dicom_node.conftest import make_settings, settled_job


def test_node_runs_the_configured_model(tiny_cohort, tiny_ldm_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cohort, _ = tiny_cohort
    (pre, *_) = sorted(cohort.glob("*/dicom/pre"))
    settings = make_settings(tmp_path / "data", model={"directory": tiny_ldm_dir, "device": "cpu"})
    node = Node(settings)
    node.start()
    loop = threading.Thread(target=node.run_forever, daemon=True)
    loop.start()
    try:
        sent = subprocess.run(
            [tool("storescu"), "-aec", "GLIOFORECAST", "127.0.0.1", str(node.scp.port),
             *map(str, sorted(pre.rglob("*.dcm")))],
            capture_output=True, text=True,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        job = wait_for(
            lambda: settled_job(node),
            timeout=240,
            what="the job",
        )
        assert job.state == DONE, job.reason
        assert "by glioforecast-tiny" in job.reason  # the model, not the baseline
    finally:
        node.request_stop()
        loop.join(timeout=30)
        node.stop()


def test_a_missing_model_directory_is_a_config_error(tmp_path: Path) -> None:
    from dicom_node.cli import main

    config = tmp_path / "site.yaml"
    config.write_text(f"model: {{directory: {tmp_path / 'nowhere'}}}\n")
    assert main(["check-config", str(config)]) == 2
