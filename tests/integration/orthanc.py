"""Orthanc for the integration tests: the package's local PACS, skipped when not installed."""

from __future__ import annotations

import pytest

from dicom_node.local_pacs import OrthancServer, find_orthanc, free_port

__all__ = ["OrthancServer", "free_port", "orthanc_binary"]


def orthanc_binary() -> str:
    binary = find_orthanc()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    return binary
