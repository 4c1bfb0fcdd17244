"""Builders of the output DICOM objects (Secondary Capture, SR, SEG, RTSTRUCT). No networking."""
