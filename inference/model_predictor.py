"""The node's predictor backed by a model directory (latent diffusion model or UNet baseline).

:class:`ModelPredictor` implements the node's predictor protocol
(``predict(inputs: StudyInputs, samples=4) -> Prediction``, see ``dicom_node.pipeline``):

1. the study is put on the model grid (:func:`inference.data.prepare_study`: grid planned on the
   T1-Gd, resampling, intensity normalisation inside the head);
2. the model predicts on that grid (:func:`inference.predict.predict_arrays` for the diffusion
   model: N samples -> mean, standard deviation, tumour mask, volumes, response probabilities;
   one deterministic forward pass for the UNet baseline: no spread, one volume);
3. the results are mapped back onto the exact source T1-Gd grid (shape, spacing, origin,
   direction, frame of reference, source UIDs) with ``from_model_space``: the mean with the
   T1-Gd's intensity scaling undone, the standard deviation in the same units, the tumour mask
   from the mean tumour probability (thresholded after linear resampling). Outside the model's
   field of view (the model grid's crop) nothing is predicted: the mean keeps the pre-treatment
   image, the standard deviation is 0 and the mask empty; the prediction's ``field_of_view``
   says where that is, so that the outputs can show it as not predicted.

Volumes are in millilitres on the model grid (each sample's mask exists there only). The current
volume of the response rule is, by default, the one the model's own mask "reader" finds on the
pre-treatment T1-Gd (``current_from="model"``), so that predicted and current volumes are
measured the same way; ``current_from="mask"`` uses the GTV instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from dicom_node.convert.preprocess import from_model_space, to_model_space
from dicom_node.errors import InferenceError
from dicom_node.types import RESPONSE_CATEGORIES, Prediction, StudyInputs, Volume
from inference.data import PreparedStudy, normalise, prepare_study
from inference.model_dir import KIND_LDM, load_model_dir, model_kind
from inference.networks import IMAGE_CHANNEL, MASK_CHANNEL
from inference.predict import (
    ModelPrediction,
    predict_arrays,
    response_category,
    response_probabilities,
    tumour_volume_ml,
)
from inference.sampler import decode_latents
from inference.train.loops import read_train_state
from inference.unet_baseline import (
    IMAGE_OUT,
    POST_MASK_OUT,
    PRE_MASK_OUT,
    LoadedBaseline,
    baseline_forward,
    load_baseline_dir,
)

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


class ModelPredictor:
    """Predictions from a model directory, on the source grid of each study.

    ``samples`` (default: the model's ``inference.num_samples``), ``guidance_scale`` and
    ``num_inference_steps`` override the model's defaults; ``seed`` makes every prediction
    reproducible (the same study gives the same outputs, so a retried job re-sends the same
    objects). ``current_from``: see the module docstring. ``device``: ``cpu`` or ``cuda``.
    ``autocast``, ``channels_last`` and ``compile_mode``: how the diffusion UNet runs
    (:class:`inference.sampler.SamplingOptions`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        samples: int | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        *,
        seed: int = 0,
        current_from: Literal["mask", "model"] = "model",
        autocast: str = "auto",
        channels_last: bool = False,
        compile_mode: str = "none",
        allow_untrained: bool = False,
        unknown_class: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InferenceError("device: cuda was asked for, but torch finds no CUDA device")
        if current_from not in ("mask", "model"):
            raise InferenceError(f"current_from: expected mask or model, found {current_from!r}")
        if samples is not None and samples < 1:
            raise InferenceError(f"samples: expected >= 1, found {samples}")
        self.kind = model_kind(self.model_dir)
        stages = read_train_state(self.model_dir).get("stages", {})
        needed = "diffusion" if self.kind == KIND_LDM else "baseline"
        if stages and needed not in stages and not allow_untrained:
            raise InferenceError(
                f"{self.model_dir}: expected a trained {needed} stage (train_state.json lists "
                f"{sorted(stages)}); train it with 'glioforecast train {needed}'"
            )
        self.device = dev
        self.samples = samples
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.current_from: Literal["mask", "model"] = current_from
        self.autocast = autocast
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        self.unknown_class = unknown_class
        self._baseline: LoadedBaseline | None = None
        if self.kind == KIND_LDM:
            self._ldm = load_model_dir(self.model_dir, dev)
            cfg = self._ldm.config
            self.name, self.version = cfg.name, cfg.version
            self._pre, self._contrasts, self._use_dose = (
                cfg.preprocessing,
                cfg.contrasts,
                cfg.use_dose,
            )
            self.mask_threshold = cfg.inference.mask_threshold
            self.survival_classes = cfg.survival_classes
        else:
            self._baseline = load_baseline_dir(self.model_dir, dev)
            bcfg = self._baseline.config
            self.name, self.version = bcfg.name, bcfg.version
            self._pre, self._contrasts, self._use_dose = (
                bcfg.preprocessing,
                bcfg.contrasts,
                bcfg.use_dose,
            )
            self.mask_threshold = bcfg.mask_threshold
            self.survival_classes = bcfg.survival_classes
        log.info("predictor %s %s (%s) on %s", self.name, self.version, self.kind, dev)

    # -------------------------------------------------------------------------------------
    def prepare(self, inputs: StudyInputs) -> PreparedStudy:
        """The study on this model's grid."""
        return prepare_study(inputs, self._pre, self._contrasts, self._use_dose)

    def predict(self, inputs: StudyInputs, samples: int | None = None) -> Prediction:
        """Predict the post-treatment scan of one study (see the module docstring).

        A CUDA out-of-memory error moves this predictor to the CPU (its networks and every
        later study of this process) and predicts the study again there, with the same seed.
        """
        prepared = self.prepare(inputs)
        try:
            return self._predict_on_device(inputs, prepared, samples)
        except torch.OutOfMemoryError as exc:
            if self.device.type != "cuda":
                raise
            log.warning(
                "out of GPU memory on %s (%s): predicting this study on the CPU instead",
                self.device,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            self.to_cpu()
            return self._predict_on_device(inputs, prepared, samples)

    @torch.no_grad()
    def reconstruct(self, inputs: StudyInputs, image: Volume | None = None) -> Prediction:
        """Stage 1 alone (latent diffusion models): ``image`` (default: the study's T1-Gd; any
        volume on the T1-Gd's grid, e.g. the true post-treatment scan of a synthetic patient),
        normalised with its own scaling on the study's model grid, encoded and decoded by the
        autoencoder: a one-sample prediction in the T1-Gd's intensity units, its mask from the
        decoder's mask channel. With the true post-treatment scan it is the best a stage-2
        sample can decode to; with the T1-Gd, "no change" as the decoder renders it. The
        current volume is the mask channel's on the decoded T1-Gd (``current_from="model"``)."""
        if self.kind != KIND_LDM:
            raise InferenceError(
                f"{self.model_dir}: reconstruction needs a latent diffusion model, "
                f"found {self.kind}"
            )
        model, cfg = self._ldm.model, self._ldm.config
        prepared = self.prepare(inputs)

        def through(array: FloatArray) -> tuple[FloatArray, FloatArray]:
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
            out = decode_latents(model, model.encode(x.to(self.device))).cpu()[0]
            return _f32(out[IMAGE_CHANNEL].numpy()), _f32(torch.sigmoid(out[MASK_CHANNEL]).numpy())

        pre_image, pre_p = through(prepared.t1c)
        self._check_finite({"reconstruction": pre_image, "tumour probability": pre_p})
        if image is None:
            out_image, out_p = pre_image, pre_p
        else:
            if image.shape != inputs.t1c.shape:
                raise InferenceError(
                    f"reconstruction: expected an image on the T1-Gd grid {inputs.t1c.shape}, "
                    f"found {image.shape}"
                )
            grid = to_model_space(image, prepared.grid)
            on_grid, _ = normalise(grid, cfg.preprocessing.intensity)
            out_image, out_p = through(on_grid)
            self._check_finite({"reconstruction": out_image, "tumour probability": out_p})
        thr, spacing = cfg.inference.mask_threshold, cfg.preprocessing.spacing_mm
        volume = tumour_volume_ml(out_p >= thr, spacing)
        current = (
            tumour_volume_ml(pre_p >= thr, spacing)
            if self.current_from == "model"
            else tumour_volume_ml(prepared.mask, spacing)
        )
        zero = np.zeros_like(out_image)
        mean, std, mask, fov = self._restore(inputs, prepared, out_image, zero, out_p)
        return Prediction(
            mean=mean,
            std=std,
            tumour_mask=mask,
            sample_volumes_ml=(volume,),
            current_volume_ml=current,
            response_probabilities=response_probabilities(current, (volume,), cfg.response),
            survival_class=None,
            model_name=cfg.name,
            model_version=cfg.version,
            mean_volume_category=response_category(current, volume, cfg.response),
            field_of_view=fov,
            current_from=self.current_from,
        )

    def to_cpu(self) -> None:
        """Move the networks to the CPU and free what they held on the GPU."""
        if self._baseline is not None:
            self._baseline.unet.to("cpu")
        else:
            self._ldm.model.to("cpu")
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _predict_on_device(
        self, inputs: StudyInputs, prepared: PreparedStudy, samples: int | None
    ) -> Prediction:
        if self._baseline is not None:
            return self._predict_baseline(inputs, prepared, samples)
        n = samples if samples is not None else self.samples
        result = predict_arrays(
            self._ldm.model,
            prepared.prediction_inputs(),
            inputs.survival_class,
            num_samples=n,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            seed=self.seed,
            autocast=self.autocast,
            channels_last=self.channels_last,
            compile_mode=self.compile_mode,
            current_from=self.current_from,
            unknown_class=self.unknown_class,
        )
        self._check_finite(
            {
                "mean image": result.mean,
                "standard deviation": result.std,
                "tumour probability": result.tumour_probability,
                "sample volumes": np.asarray(result.sample_volumes_ml, dtype=np.float64),
            }
        )
        return self.to_source(inputs, prepared, result)

    def _check_finite(self, outputs: dict[str, npt.NDArray[np.generic]]) -> None:
        """Refuse a prediction with NaN or infinite values (a diverged model, whose empty mask
        would otherwise read as a complete response with no spread)."""
        bad = []
        for name, array in outputs.items():
            values = np.asarray(array, dtype=np.float64)
            n = int(values.size - np.isfinite(values).sum())
            if n:
                bad.append(f"{name}: {n} of {values.size} values")
        if bad:
            raise InferenceError(
                f"model {self.model_dir} ({self.name} {self.version}): expected finite "
                f"predictions, found NaN or infinite values ({'; '.join(bad)}): the model's "
                "weights give no usable output (diverged training?); nothing is reported"
            )

    def to_source(
        self, inputs: StudyInputs, prepared: PreparedStudy, result: ModelPrediction
    ) -> Prediction:
        """A model-grid prediction mapped back onto the source T1-Gd grid."""
        mean, std, mask, fov = self._restore(
            inputs, prepared, result.mean, result.std, result.tumour_probability
        )
        return Prediction(
            mean=mean,
            std=std,
            tumour_mask=mask,
            sample_volumes_ml=tuple(float(v) for v in result.sample_volumes_ml),
            current_volume_ml=float(result.current_volume_ml),
            response_probabilities={
                c: float(result.response_probabilities[c]) for c in RESPONSE_CATEGORIES
            },
            survival_class=result.survival_class,
            model_name=result.model_name,
            model_version=result.model_version,
            mean_volume_category=result.mean_volume_category,
            sample_classes=result.sample_classes,
            field_of_view=fov,
            current_from=self.current_from,
        )

    def _restore(
        self,
        inputs: StudyInputs,
        prepared: PreparedStudy,
        mean: FloatArray,
        std: FloatArray,
        probability: FloatArray,
    ) -> tuple[Volume, Volume, Volume, Volume]:
        """Mean, standard deviation and mask on the source grid, and the field of view (the
        source voxels wholly inside the model grid: the only ones predicted)."""
        grid, source, scaling = prepared.grid, inputs.t1c, prepared.t1c_scaling
        inside = (
            _f32(from_model_space(np.ones(grid.shape, np.float32), grid, source).array) >= 0.999
        )
        mean_src = from_model_space(scaling.invert(mean), grid, source).array
        kept = np.asarray(source.array, dtype=np.float32)
        mean_out = np.where(inside, mean_src, kept).astype(np.float32)
        std_src = from_model_space(np.asarray(std * scaling.scale, np.float32), grid, source)
        std_out = np.where(inside, _f32(std_src.array), 0.0).astype(np.float32)
        prob_src = _f32(from_model_space(np.asarray(probability, np.float32), grid, source).array)
        mask_out = (prob_src >= self.mask_threshold) & inside
        return (
            source.with_array(mean_out),
            source.with_array(std_out),
            source.with_array(np.asarray(mask_out, dtype=bool)),
            source.with_array(np.asarray(inside, dtype=bool)),
        )

    @torch.no_grad()
    def _predict_baseline(
        self, inputs: StudyInputs, prepared: PreparedStudy, samples: int | None
    ) -> Prediction:
        assert self._baseline is not None
        cfg = self._baseline.config
        dev = self.device

        def t(a: npt.NDArray[np.generic] | None) -> torch.Tensor | None:
            if a is None:
                return None
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(dev)

        x_t1c, x_mask = t(prepared.t1c), t(prepared.mask)
        assert x_t1c is not None and x_mask is not None
        out = baseline_forward(
            self._baseline.unet, cfg, x_t1c, x_mask, t(prepared.flair), t(prepared.dose)
        )[0].cpu()
        image = out[IMAGE_OUT].numpy().astype(np.float32)
        post_p = torch.sigmoid(out[POST_MASK_OUT]).numpy().astype(np.float32)
        pre_p = torch.sigmoid(out[PRE_MASK_OUT]).numpy().astype(np.float32)
        self._check_finite(
            {"image": image, "tumour probability": post_p, "pre-treatment probability": pre_p}
        )
        spacing = cfg.preprocessing.spacing_mm
        volume = tumour_volume_ml(post_p >= cfg.mask_threshold, spacing)
        if self.current_from == "model":
            current = tumour_volume_ml(pre_p >= cfg.mask_threshold, spacing)
        else:
            current = tumour_volume_ml(prepared.mask, spacing)
        n = samples if samples is not None else (self.samples or 1)
        volumes = tuple(volume for _ in range(max(1, n)))
        mean, std, mask, fov = self._restore(inputs, prepared, image, np.zeros_like(image), post_p)
        return Prediction(
            mean=mean,
            std=std,
            tumour_mask=mask,
            sample_volumes_ml=volumes,
            current_volume_ml=current,
            response_probabilities=response_probabilities(current, volumes, cfg.response),
            survival_class=None,  # the baseline takes no guidance class
            model_name=cfg.name,
            model_version=cfg.version,
            mean_volume_category=response_category(current, volume, cfg.response),
            field_of_view=fov,
            current_from=self.current_from,
        )


def _f32(array: npt.NDArray[np.generic]) -> FloatArray:
    return np.asarray(array, dtype=np.float32)
