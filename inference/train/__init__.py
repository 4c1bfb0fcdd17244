"""Training: one optimisation step of each stage (:mod:`inference.train.steps`) and the loops
with checkpoints, resume and seeds that the ``glioforecast train`` command runs
(:mod:`inference.train.loops`)."""
