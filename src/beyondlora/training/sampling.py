"""Sampling for previews and the before/after grid: DDIM with classifier-free guidance, seeded per image."""

from __future__ import annotations

from typing import Any

import torch


def _tokens(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (N, L, D) for ``prompts`` (padded to the tokenizer's max)."""
    return text_encoder(_tokens(tokenizer, prompts, next(text_encoder.parameters()).device))[0]


def embed_text(text_encoders: list[Any], tokenizers: list[Any], prompts: list[str]) -> tuple[torch.Tensor, Any]:
    """(hidden states, pooled) for ``prompts``, with gradients where the encoders have them: one encoder's
    last hidden states (SD 1.x/2.x; pooled None), or SDXL's two penultimate hidden states side by side and
    the second encoder's projected pooled output."""
    if len(text_encoders) == 1:
        return text_encoders[0](_tokens(tokenizers[0], prompts, next(text_encoders[0].parameters()).device))[0], None
    states, pooled = [], None
    for text_encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        ids = _tokens(tokenizer, prompts, next(text_encoder.parameters()).device)
        output = text_encoder(ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]
    return torch.cat(states, dim=-1), pooled


def time_ids(height: int, width: int, count: int, device: torch.device) -> torch.Tensor:
    """SDXL's size conditioning: (original size, crop top-left, target size) = ((h, w), (0, 0), (h, w))."""
    return torch.tensor([[height, width, 0, 0, height, width]] * count, dtype=torch.float32, device=device)


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
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
    pixel_size: tuple[int, int] | None = None,
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
    extra: dict[str, Any] = {}
    if pooled is not None and pixel_size is not None:
        texts = torch.cat([pooled[1].expand(cond.shape[0], -1), pooled[0]]).to(param.device, param.dtype)
        extra["added_cond_kwargs"] = {
            "text_embeds": texts,
            "time_ids": time_ids(*pixel_size, texts.shape[0], param.device).to(param.dtype),
        }
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(param.dtype)
        out = unet(model_in, t, encoder_hidden_states=both, **extra).sample.float()
        out_uncond, out_cond = out.chunk(2)
        latents = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, latents).prev_sample
    unet.train(was_training)
    return latents


def default_guidance(base: Any) -> float:
    """The classifier-free guidance scale samples use unless told: 1.5 for the demo's tiny model, else 7.5."""
    return 1.5 if base.is_demo else 7.5


def generate(
    base: Any,
    text_encoders: list[Any],
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    steps: int,
    guidance: float | None = None,
) -> torch.Tensor:
    """One image per (seed, prompt) from the base model ``base`` (a :class:`~.models.BaseModel`) through
    ``text_encoders`` (its own, or adapted ones): (len(seeds) · len(prompts), 3, H, W) in [0, 1], seed-major."""
    latents = base.objective.sample(
        base,
        text_encoders,
        prompts * len(seeds),
        [s for s in seeds for _ in prompts],
        resolution,
        steps,
        default_guidance(base) if guidance is None else guidance,
    )
    return base.decode(latents).cpu()
