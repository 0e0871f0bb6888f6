"""SD3 and Flux: a transformer trained by flow matching (rectified flow) and sampled through its pipeline.

A sample at time σ ∈ (0, 1) is ``x_σ = (1 − σ) x₀ + σ ε``; the model predicts the velocity ``ε − x₀`` and
the loss is its mean squared error.  σ is drawn logit-normal (σ = sigmoid(n), n ~ N(0, 1), the SD3 paper's
choice), then shifted as the model's scheduler config says: a fixed ``shift`` s, σ' = s·σ / (1 + (s − 1)·σ)
(SD3), or with ``use_dynamic_shifting`` by μ interpolated linearly in the image's token count L between
(``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``), σ' = e^μ / (e^μ + 1/σ − 1)
(Flux).  The transformer's timestep is 1000·σ' (SD3) or σ' (Flux, which scales it itself).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .objective import Objective, TextConditioning

#: the distilled guidance a Flux-dev-style transformer (``guidance_embeds``) trains at (no CFG during training)
TRAINING_GUIDANCE = 1.0


def shifted_sigmas(sigmas: torch.Tensor, scheduler_config: Any, tokens: int) -> torch.Tensor:
    """σ' of ``sigmas`` (any shape) for an image of ``tokens`` transformer tokens, as the module docstring
    says; the identity for a scheduler with shift 1 and no dynamic shifting."""
    config = dict(scheduler_config)
    if config.get("use_dynamic_shifting"):
        low, high = config["base_image_seq_len"], config["max_image_seq_len"]
        slope = (config["max_shift"] - config["base_shift"]) / (high - low)
        mu = config["base_shift"] + slope * (tokens - low)
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    shift = config.get("shift", 1.0)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's token layout: (N, C, h, w) → (N, h/2 · w/2, 4C), each token a 2×2 patch, channel-major."""
    n, c, h, w = latents.shape
    patches = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` × ``width``."""
    n, _, channels = tokens.shape
    patches = tokens.reshape(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's position ids of the packed tokens (h/2 · w/2, 3): (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device, dtype)


class FlowMatching(Objective):
    """Rectified-flow training of an SD3 (``flux=False``) or Flux (``flux=True``) transformer;
    ``guidance_embeds``: a Flux-dev-style transformer that takes the distilled guidance as an input;
    ``max_text_tokens``: T5's sequence length."""

    denoiser = "transformer"

    def __init__(self, scheduler_config: Any, flux: bool, guidance_embeds: bool, max_text_tokens: int) -> None:
        self.scheduler_config, self.flux, self.guidance_embeds = scheduler_config, flux, guidance_embeds
        self.max_text_tokens = max_text_tokens

    def draw_time(self, generator: torch.Generator) -> torch.Tensor:
        return torch.sigmoid(torch.randn((), generator=generator))

    def tokens(self, height: int, width: int) -> int:
        """Transformer tokens of latents of ``height`` × ``width`` (2×2 patches in both models)."""
        return (height // 2) * (width // 2)

    def losses(
        self, model: Any, latents: torch.Tensor, noise: torch.Tensor, times: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        states, pooled = text
        height, width = latents.shape[-2:]
        sigmas = shifted_sigmas(times.float(), self.scheduler_config, self.tokens(height, width))
        sigma = sigmas.reshape(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        if self.flux:
            guidance = None
            if self.guidance_embeds:
                guidance = torch.full((len(latents),), TRAINING_GUIDANCE, device=latents.device)
            output = model(
                hidden_states=pack_latents(noisy),
                timestep=sigmas.to(latents.device),
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=states,
                txt_ids=torch.zeros(states.shape[1], 3, device=latents.device, dtype=states.dtype),
                img_ids=image_ids(height, width, latents.device, states.dtype),
            ).sample
            output = unpack_latents(output, height, width)
        else:
            output = model(
                hidden_states=noisy,
                timestep=1000 * sigmas.to(latents.device),
                encoder_hidden_states=states,
                pooled_projections=pooled,
            ).sample
        target = noise - latents
        return F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def embed(self, base: Any, text_encoders: list[Any], prompts: list[str]) -> TextConditioning:
        """The pipeline's own prompt encoding (CLIP-L/G pooled and penultimate states with T5's for SD3;
        CLIP-L pooled and T5's states for Flux), where the text encoders are, moved to the transformer's
        device."""
        device = next(base.pipe.text_encoder.parameters()).device
        target = next(base.denoiser.parameters()).device
        if self.flux:
            states, pooled, _ = base.pipe.encode_prompt(
                prompts, None, device=device, max_sequence_length=self.max_text_tokens
            )
            return states.to(target), pooled.to(target)
        states, _, pooled, _ = base.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_tokens,
        )
        return states.to(target), pooled.to(target)

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
        pipe = base.pipe
        with torch.no_grad():
            states, pooled = self.embed(base, text_encoders, prompts)
            extra: dict[str, Any] = {}
            if not self.flux:  # classifier-free guidance against the empty prompt
                negative, negative_pooled = self.embed(base, text_encoders, [""])
                extra["negative_prompt_embeds"] = negative.expand(len(prompts), -1, -1)
                extra["negative_pooled_prompt_embeds"] = negative_pooled.expand(len(prompts), -1)
            was_training = base.denoiser.training
            base.denoiser.eval()
            latents = pipe(
                prompt_embeds=states,
                pooled_prompt_embeds=pooled,
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                output_type="latent",
                **extra,
            ).images
            base.denoiser.train(was_training)
        if self.flux:
            side = resolution // base.scale_factor
            latents = unpack_latents(latents, side, side)
        return latents.float()
