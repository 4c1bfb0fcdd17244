"""Orthanc for the integration tests: the package's local PACS, skipped when not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.local_pacs import DICOMWEB_PLUGIN, OrthancServer, find_orthanc

__all__ = ["OrthancServer", "dicomweb_plugin", "orthanc_binary"]


def orthanc_binary() -> str:
    binary = find_orthanc()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    return binary


def dicomweb_plugin() -> str:
    """Orthanc's DICOMweb plugin (with Orthanc itself), or skip the test."""
    orthanc_binary()
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return DICOMWEB_PLUGIN
