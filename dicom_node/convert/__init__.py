"""Conversion of received DICOM instances into volumes and masks."""
