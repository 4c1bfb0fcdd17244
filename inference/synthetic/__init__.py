"""Synthetic glioblastoma cohort with a known post-treatment truth (``glioforecast synth``)."""
