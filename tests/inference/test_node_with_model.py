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


def test_a_model_that_does_not_load_is_refused_before_it_meets_a_study(  # type: ignore[no-untyped-def]
    tiny_ldm_dir, tmp_path: Path, capsys
) -> None:
    """A model directory whose weights were cut short (a copy interrupted): check-config says
    so, naming the file; serve does not start with it; a reload to it is refused and the node
    keeps the model it had (every study's job would fail otherwise); the intact model with
    other settings is applied."""
    import dataclasses
    import shutil
    import sys

    from dicom_node.cli import main
    from dicom_node.ports import free_port
    from dicom_node.settings import ModelSettings

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_ldm_dir, broken)
    weights = broken / "diffusion.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = tmp_path / "site.yaml"
    config.write_text(
        f"node: {{port: {free_port()}}}\nhealth: {{enabled: false}}\n"
        f"storage: {{data_dir: {tmp_path / 'd'}}}\n"
        f"model: {{directory: {broken}, device: cpu}}\n"
    )
    assert main(["check-config", str(config)]) == 2
    said = capsys.readouterr().err
    assert f"found {broken}, which does not: " in said and "diffusion.safetensors" in said, said

    served = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert served.returncode == 2, served.stderr[-3000:]
    assert f"found {broken}, which does not: " in served.stderr

    settings = make_settings(tmp_path / "data", model={"directory": tiny_ldm_dir, "device": "cpu"})
    models = iter([ModelSettings(directory=broken, device="cpu"),
                   ModelSettings(directory=tiny_ldm_dir, device="cpu", samples=2)])  # fmt: skip
    node = Node(settings, lambda: dataclasses.replace(settings, model=next(models)))
    node.start()
    try:
        assert node.reload() == "refused"
        assert node.settings.model.directory == tiny_ldm_dir
        assert node.reload() == "applied"
        assert node.settings.model.samples == 2
    finally:
        node.stop()
