"""Shared fixtures of the model-layer tests: a tiny synthetic cohort (3 patients, 2 sites, 4 mm,
NIfTI and DICOM) and tiny models trained on it for one epoch (seconds on a CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from inference.synthetic.cohort import PatientRecord, generate_cohort

COHORT_SEED = 4242
TINY_OPTIONS = {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "progress": False}

torch.set_num_threads(2)
logging.getLogger("dicom_node.convert.preprocess").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PatientRecord]]:
    out = tmp_path_factory.mktemp("tiny-cohort")
    records = generate_cohort(out, patients=3, sites=2, seed=COHORT_SEED, spacing_mm=4.0, jobs=1)
    return out, records


@pytest.fixture(scope="session")
def tiny_ldm_dir(
    tiny_cohort: tuple[Path, list[PatientRecord]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny latent diffusion model directory: autoencoder then diffusion, one epoch each."""
    from inference.model_config import tiny_config
    from inference.train.loops import TrainOptions, train_autoencoder, train_diffusion

    out = tmp_path_factory.mktemp("tiny-ldm")
    options = TrainOptions(**TINY_OPTIONS)  # type: ignore[arg-type]
    train_autoencoder([tiny_cohort[0]], out, tiny_config(), options)
    train_diffusion([tiny_cohort[0]], out, options)
    return out


@pytest.fixture(scope="session")
def tiny_baseline_dir(
    tiny_cohort: tuple[Path, list[PatientRecord]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from inference.train.loops import TrainOptions, train_baseline
    from inference.unet_baseline import tiny_baseline_config

    out = tmp_path_factory.mktemp("tiny-unet")
    train_baseline([tiny_cohort[0]], out, tiny_baseline_config(), TrainOptions(**TINY_OPTIONS))  # type: ignore[arg-type]
    return out
