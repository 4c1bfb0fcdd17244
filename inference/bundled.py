"""The demo model shipped inside the package (``inference/models/demo``).

It was trained on the synthetic cohort only (see ``docs/MODEL_CARD.md`` for the command, the data,
the hardware and its metrics) and is what ``glioforecast demo`` runs. Research use only.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.errors import InferenceError

#: the bundled latent diffusion model directory (model.yaml, safetensors weights, model card)
DEMO_MODEL = Path(__file__).resolve().parent / "models" / "demo"


def demo_model_dir() -> Path:
    """The bundled demo model directory; a clear error when the installation lacks it."""
    if not (DEMO_MODEL / "model.yaml").is_file():
        raise InferenceError(
            f"the bundled demo model is missing: expected {DEMO_MODEL / 'model.yaml'} "
            "(reinstall glioforecast, or pass a model directory)"
        )
    return DEMO_MODEL


def model_option(text: str) -> Path | None:
    """A ``--model`` option of the demo and the benchmarks: ``bundled`` (the demo model),
    ``none`` (the no-change baseline: ``None``) or a model directory."""
    if text == "none":
        return None
    if text == "bundled":
        return demo_model_dir()
    path = Path(text)
    if not (path / "model.yaml").is_file():
        raise InferenceError(
            f"--model: expected bundled, none or a model directory with a model.yaml, "
            f"found {text!r}"
        )
    return path.resolve()
