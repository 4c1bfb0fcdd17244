"""A three-site synthetic cohort (one patient per site, 4 mm, NIfTI only) for the federated
tests; each test's site reads it through a site-name filter, like a hospital's own folder."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="federated training needs flwr (the test extra installs it)")

FED_SEED = 5151
SITES = ("SITE-NOR", "SITE-ELO", "SITE-OST")


@pytest.fixture(scope="session")
def fed_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.synthetic.cohort import generate_cohort

    out = tmp_path_factory.mktemp("fed-cohort")
    records = generate_cohort(
        out, patients=3, sites=3, seed=FED_SEED, spacing_mm=4.0, formats=("nifti",), jobs=1
    )
    assert sorted({r.values["site"] for r in records}) == sorted(SITES)
    return out
