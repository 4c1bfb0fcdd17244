"""glioforecast DICOM node: networking, spool, job queue, conversion, service loop and CLI."""

__version__ = "0.1.0"
