"""SD 1.x/2.x/SDXL: a UNet trained to predict the noise ε (or v) under the model's DDPM schedule, sampled with
DDIM (:mod:`.sampling`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .objective import Objective, TextConditioning
from .sampling import embed_text, sample_latents, time_ids


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1)
    for v-prediction, with SNR = ᾱ / (1 − ᾱ)."""
    alphas = alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


class NoisePrediction(Objective):
    """``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε`` at a uniform integer t; the UNet predicts ε (or v = √ᾱ ε − √(1 − ᾱ) x₀);
    the loss is the mean squared error, optionally min-SNR-γ weighted.  SDXL's pooled text and size
    conditioning go in ``added_cond_kwargs``."""

    denoiser = "unet"

    def __init__(self, scheduler: Any, scale_factor: int) -> None:
        self.scheduler, self.scale_factor = scheduler, scale_factor
        self.min_snr_gamma: float | None = None

    def set_noise_options(self, prediction_type: str | None, min_snr_gamma: float | None) -> None:
        if prediction_type is not None:
            self.scheduler.register_to_config(prediction_type=prediction_type)
        self.min_snr_gamma = min_snr_gamma

    def draw_time(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (), generator=generator)

    def losses(
        self, model: Any, latents: torch.Tensor, noise: torch.Tensor, times: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        scheduler, (states, pooled) = self.scheduler, text
        noisy = scheduler.add_noise(latents, noise, times)
        prediction = scheduler.config.prediction_type
        target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, times)
        extra = {}
        if pooled is not None:
            height, width = (side * self.scale_factor for side in latents.shape[-2:])
            extra["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": time_ids(height, width, len(latents), latents.device),
            }
        output = model(noisy, times, encoder_hidden_states=states, **extra).sample
        losses = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            alphas = scheduler.alphas_cumprod.to(latents.device)
            losses = losses * min_snr_weights(alphas, times, self.min_snr_gamma, prediction)
        return losses

    def embed(self, base: Any, text_encoders: list[Any], prompts: list[str]) -> TextConditioning:
        return embed_text(text_encoders, base.tokenizers, prompts)

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
        with torch.no_grad():
            cond, pooled = embed_text(text_encoders, base.tokenizers, prompts)
            uncond, pooled_uncond = embed_text(text_encoders, base.tokenizers, [""])
        side = resolution // self.scale_factor
        return sample_latents(
            base.unet,
            dict(self.scheduler.config),
            cond,
            uncond,
            (base.unet.config.in_channels, side, side),
            seeds,
            steps,
            guidance,
            pooled=None if pooled is None else (pooled, pooled_uncond),
            pixel_size=(resolution, resolution),
        )
