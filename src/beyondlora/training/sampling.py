"""Sampling for previews and the before/after grid: DDIM with classifier-free guidance, seeded per image."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (N, L, D) for ``prompts`` (padded to the tokenizer's max)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0]


@torch.no_grad()
def sample_latents(
    unet: Any,
    scheduler_config: dict[str, Any],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latent_shape: tuple[int, int, int],
    seeds: list[int],
    steps: int = 25,
    guidance: float = 3.0,
) -> torch.Tensor:
    """Denoise one latent per seed (``cond`` has one row per seed) with DDIM and classifier-free guidance."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    param = next(unet.parameters())
    latents = torch.stack(
        [torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    ).to(param.device)
    latents = latents * scheduler.init_noise_sigma
    uncond = uncond.expand(cond.shape[0], -1, -1)
    both = torch.cat([uncond, cond]).to(param.device, param.dtype)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(param.dtype)
        out = unet(model_in, t, encoder_hidden_states=both).sample.float()
        out_uncond, out_cond = out.chunk(2)
        latents = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, latents).prev_sample
    unet.train(was_training)
    return latents
