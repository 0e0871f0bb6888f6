"""What a model family is trained to predict and how it samples: the trainer's one model-specific part.

:class:`~.noise_prediction.NoisePrediction` (SD 1.x/2.x/SDXL: a UNet predicting the noise or v under a
DDPM schedule) and :class:`~.flow_matching.FlowMatching` (SD3 and Flux: a transformer predicting the
velocity ε − x₀ of a rectified flow) implement it.  The trainer draws the noise and each sample's
generator; the objective draws the time, forms the model's input, runs it and returns per-sample losses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .settings import TrainConfigError

#: (hidden states (N, L, D), pooled text embedding (N, P) or None)
TextConditioning = tuple[torch.Tensor, torch.Tensor | None]


class Objective(ABC):
    """One model family's training target and sampler.  ``denoiser`` is the pipeline attribute that is
    adapted and trained (``"unet"`` or ``"transformer"``)."""

    denoiser: str

    def set_noise_options(self, prediction_type: str | None, min_snr_gamma: float | None) -> None:
        """``--prediction-type`` and ``--min-snr-gamma``, which only a DDPM noise schedule has."""
        if prediction_type is not None or min_snr_gamma is not None:
            raise TrainConfigError(
                f"--prediction-type and --min-snr-gamma concern DDPM noise schedules; this model trains by "
                f"{type(self).__name__}"
            )

    @abstractmethod
    def draw_time(self, generator: torch.Generator) -> torch.Tensor:
        """One sample's training time (a 0-d tensor), drawn from ``generator``."""

    @abstractmethod
    def losses(
        self, model: Any, latents: torch.Tensor, noise: torch.Tensor, times: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        """Per-sample losses (N,) of ``model`` (the adapted denoiser) on clean ``latents`` (N, C, h, w) noised
        with ``noise`` at ``times`` (N,), conditioned on ``text``."""

    @abstractmethod
    def embed(self, base: Any, text_encoders: list[Any], prompts: list[str]) -> TextConditioning:
        """The conditioning of ``prompts`` through ``text_encoders`` (with gradients where they have them)."""

    @abstractmethod
    def sample(
        self,
        base: Any,
        text_encoders: list[Any],
        prompts: list[str],
        seeds: list[int],
        resolution: int,
        steps: int,
        guidance: float,
    ) -> torch.Tensor:
        """Latents (len(prompts), C, h, w) of one image per (prompt, seed) pair, each from its own seed."""
