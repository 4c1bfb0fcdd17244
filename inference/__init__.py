"""Model side of glioforecast: networks, sampling, training, evaluation, synthetic cohort."""
