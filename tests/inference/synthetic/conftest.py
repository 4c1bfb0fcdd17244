"""A small synthetic cohort shared by the tests of this folder (4 mm grid, 2 patients, 2 sites)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.synthetic.cohort import PatientRecord, generate_cohort

SEED = 20240521
SPACING = 4.0


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PatientRecord]]:
    out = tmp_path_factory.mktemp("cohort")
    records = generate_cohort(out, patients=2, sites=2, seed=SEED, spacing_mm=SPACING, jobs=1)
    return out, records
