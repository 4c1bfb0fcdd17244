"""Training of the latent diffusion model: optimisation steps (commands and data loading build on
:mod:`inference.train.steps`)."""
