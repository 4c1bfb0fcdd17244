"""Builders of the output DICOM objects (Secondary Capture, SR, SEG, RTSTRUCT). No networking.

The top-level entry point is :func:`build_outputs` (in :mod:`sr_writer.outputs`), re-exported
here lazily so that importing one builder (``sr_writer.rtstruct``) does not import all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .outputs import JobInputs, JobOutputs, OutputOptions, build_outputs

__all__ = ["JobInputs", "JobOutputs", "OutputOptions", "build_outputs"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'sr_writer' has no attribute {name!r}")
