"""Fixtures the integration tests share with tests/dicom_node."""

from tests.dicom_node.conftest import run_node  # noqa: F401  (a running node in-process)
