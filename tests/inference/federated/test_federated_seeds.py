"""bench.federated_seeds: the per-seed table of docs/FEDERATED.md from the runs' report.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.federated import ROWS
from bench.federated_seeds import load_run, main, summary
from dicom_node.errors import InputError

KEYS = [key for _, key, _, _ in ROWS]
HIGH = {key for _, key, _, better in ROWS if better == "high"}


def _run(folder: Path, fed: float, pooled: float) -> Path:
    """A run whose federated (pooled) row is the single-site average moved by ``fed``
    (``pooled``) in the better direction of every metric (negative: the worse one)."""
    average = dict.fromkeys(KEYS, 1.0)

    def moved(step: float) -> dict[str, float]:
        return {k: v + (step if k in HIGH else -step) for k, v in average.items()}

    table = {
        "no change": average,
        "federated (FedProx, mu 0.1, 3 sites)": moved(fed),
        "pooled (3 sites' data)": moved(pooled),
        "single-site average": average,
    }
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"table": table}))
    return folder


def test_differences_counts_and_means(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run(tmp_path / "a", fed=0.2, pooled=0.1)
    b = _run(tmp_path / "b", fed=-0.1, pooled=0.1)
    s = summary([load_run(f"seed 0={a}"), load_run(str(b))])
    assert s["runs"] == ["seed 0", "b"]
    assert s["better_per_run"] == [len(ROWS), 0]
    # the mean (+0.05 in the better direction) favours federated on every metric
    assert s["mean_favours"] == len(ROWS) and s["pooled_mean_favours"] == len(ROWS)
    psnr = s["metrics"]["PSNR global (dB)"]
    assert psnr["differences"] == pytest.approx([0.2, -0.1]) and psnr["runs_better"] == 1
    mae = s["metrics"]["MAE global (z)"]  # lower is better: the difference is negative
    assert mae["differences"] == pytest.approx([-0.2, 0.1]) and mae["mean"] == pytest.approx(-0.05)
    assert main([f"seed 0={a}", str(b)]) == 0
    out = capsys.readouterr().out
    assert "| PSNR global (dB) | +0.200 | -0.100 | 1 of 2 | +0.050 |" in out
    assert "favours federated on 8 of 8 metrics; pooled training on 8 of 8" in out


def test_a_folder_without_a_report_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"report\.json"):
        load_run(f"x={tmp_path}")
