"""The "no change" baseline: the post-treatment image is the pre-treatment image.

It is the reference every model must beat (the design asks the latent diffusion model to beat it
on the tumour metrics) and the predictor the node runs while no trained model is installed. Its
outputs say so: the model name is ``no-change-baseline`` and every object is labelled as a
synthetic prediction, like any other model's.
"""

from __future__ import annotations

import numpy as np

from dicom_node.types import RESPONSE_CATEGORIES, Prediction, StudyInputs
from inference.metrics import voxel_volume_ml
from inference.synthetic.outcome import response_category

NAME = "no-change-baseline"
VERSION = "1.0.0"


class NoChangeBaseline:
    """Predicts that nothing changes: mean = pre-treatment T1-Gd, tumour = GTV, no spread; it
    predicts every voxel (its predictions' ``field_of_view`` is ``None``: everywhere)."""

    name = NAME
    version = VERSION

    def predict(self, inputs: StudyInputs, samples: int = 4) -> Prediction:
        mask = inputs.tumour_mask.array.astype(bool)
        if mask.shape != inputs.t1c.array.shape:
            raise ValueError(
                f"tumour mask must be on the T1-Gd grid: expected shape {inputs.t1c.shape}, "
                f"found {mask.shape}"
            )
        current = float(mask.sum()) * voxel_volume_ml(inputs.t1c.spacing)
        category = response_category(current, current)
        probabilities = {c: (1.0 if c == category else 0.0) for c in RESPONSE_CATEGORIES}
        mean = inputs.t1c.array.astype(np.float32)
        return Prediction(
            mean=inputs.t1c.with_array(mean),
            std=inputs.t1c.with_array(np.zeros_like(mean)),
            tumour_mask=inputs.t1c.with_array(mask),
            sample_volumes_ml=tuple(current for _ in range(samples)),
            current_volume_ml=current,
            response_probabilities=probabilities,
            survival_class=inputs.survival_class,
            model_name=self.name,
            model_version=self.version,
            current_from="mask",  # the GTV, before treatment as after
        )
