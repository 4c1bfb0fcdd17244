"""bench/gpu_sampling.py on the CPU with the tiny networks: the table it writes, the MONAI
reference loop it times against, and a preset moved to another grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gpu_sampling


def test_the_section_compares_our_loop_with_monai_and_times_a_study(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    argv = ["--preset", "tiny", "--device", "cpu", "--variants", "fp32,monai-fp32,bf16-cl"]
    argv += ["--runs", "2", "--warmup", "1", "--study", "--report", str(report)]
    assert gpu_sampling.main(argv) == 0
    text = report.read_text()
    assert "## gpu sampling, glioforecast-tiny, random weights, 8 mm, cpu" in text
    assert "16x16x16 crop at 8 mm, latent 2x4x4x4" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "| reference |" in rows["ours, float32"]
    assert "| 1.00x | n/a |" in rows["MONAI DiffusionInferer, float32"]
    # channels-last on the CPU computes the same samples (no autocast there)
    error = float(rows["ours, bf16, channels-last"].rstrip(" |").rsplit("| ", 1)[1])
    assert error < 1e-5
    assert "(target >= 2x: " in text
    assert "| ours, float32, whole study |" in text and "Target <= 10 s per study" in text


def test_a_preset_on_another_grid_keeps_its_field_of_view(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--preset", "tiny", "--spacing", "4", "--device", "cpu", "--variants", "fp32"]
    assert gpu_sampling.main([*argv, "--runs", "1", "--warmup", "1", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "32x32x32 crop at 4 mm, latent 2x8x8x8" in out
    assert "no MONAI loop in this run: no verdict on the target" in out
    with pytest.raises(SystemExit):
        gpu_sampling.main(["--preset", "tiny", "--device", "cpu", "--variants", "bf16"])
    assert "expected fp32 and any of" in capsys.readouterr().err
