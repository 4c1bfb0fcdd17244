"""bench.federated end to end on a 4-site cohort of one patient per site: the demo UNet
(what a GPU run uses), one round, the held-out patient scored by every model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.federated import AVERAGE, POOLED, main
from inference.synthetic.cohort import generate_cohort


def test_the_comparison_runs_with_the_demo_unet(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, patients=4, sites=4, seed=77, spacing_mm=4.0, formats=("nifti",))
    out = tmp_path / "run"
    code = main(["--cohort", str(cohort), "--out", str(out), "--preset", "demo",
                 "--rounds", "1", "--local-epochs", "1", "--batch-size", "1",
                 "--learning-rate", "1e-3", "--threads", "2", "--eval-patients", "1",
                 "--strategy", "fedprox", "--proximal-mu", "0.1"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["grid"] == "4 mm grid of 48x48x48 voxels (UNet features 16, 16, 32, 64, 128, 16)"
    assert (report["batch_size"], report["learning_rate"], report["epochs"]) == (1, 1e-3, 1)
    assert report["held_out_site"] == "SITE-TAD" and report["held_out_patients"] == 1
    names = list(report["table"])
    assert names[0] == "no change" and names[1] == "federated (FedProx, mu 0.1, 3 sites)"
    assert {POOLED, AVERAGE} <= set(names) and sum(n.endswith(" alone") for n in names) == 3
    for model in ("federated", "pooled", "site-SITE-NOR"):
        yaml_text = (out / "models" / model / "model.yaml").read_text(encoding="utf-8")
        assert "- 48" in yaml_text and "unet-baseline" in yaml_text
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "on a 4 mm grid of 48x48x48 voxels" in text and "batch 1, learning rate 0.001" in text
