"""Conversion of received DICOM instances into volumes and masks.

- :func:`load_series` - one image series (classic or enhanced MR) to a ``Volume``;
- :func:`load_rtstruct_mask` / :func:`list_rois` - an RTSTRUCT ROI to a mask on an image grid;
- :func:`load_rtdose` / :func:`dose_on_grid` - an RT Dose in Gy, on its grid or an image grid;
- :mod:`dicom_node.convert.preprocess` - model-space resampling, normalisation and the inverse.

Every refusal is a :class:`~dicom_node.errors.ConversionError` saying what was expected and what
was found. See docs/CONFORMANCE.md ("Input conversion").
"""

from dicom_node.convert.preprocess import (
    IntensityScaling,
    ModelGrid,
    from_model_space,
    normalise_intensity,
    plan_model_grid,
    to_model_space,
)
from dicom_node.convert.rtdose import dose_on_grid, load_rtdose
from dicom_node.convert.rtstruct import (
    DEFAULT_ROI_PATTERN,
    RoiInfo,
    list_rois,
    load_rtstruct_mask,
)
from dicom_node.convert.series import load_series

__all__ = [
    "DEFAULT_ROI_PATTERN",
    "IntensityScaling",
    "ModelGrid",
    "RoiInfo",
    "dose_on_grid",
    "from_model_space",
    "list_rois",
    "load_rtdose",
    "load_rtstruct_mask",
    "load_series",
    "normalise_intensity",
    "plan_model_grid",
    "to_model_space",
]
