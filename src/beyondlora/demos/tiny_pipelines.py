"""Tiny Stable Diffusion pipelines built offline from configs, with seeded random weights.

:func:`tiny_sd_pipeline` has SD 1.x's architecture (the UNet's block layout, hence its module names, is
SD 1.5's: four levels of ``CrossAttnDownBlock2D`` ×3 + ``DownBlock2D``, two layers per block; a 4-level VAE
with scale factor 8; a CLIP text encoder; a DDPM scheduler with SD's scaled-linear betas) at a few
hundred thousand parameters.  :func:`tiny_sdxl_pipeline` has SDXL's (three UNet levels, the first without
attention, several transformer blocks per attention, ``text_time`` added conditioning, two text encoders,
the second with a projection).  Both build in about a second and never touch the network; the tokenizer
is made in memory from a character vocabulary.  Tests, the demo and the benchmarks use them.
"""

from __future__ import annotations

import string
from typing import Any

import torch

#: the character-level vocabulary of the in-memory tokenizer (each character alone and word-final)
_CHARACTERS = string.ascii_lowercase + string.digits + ".,!?'-"


def tiny_tokenizer(model_max_length: int = 16) -> Any:
    """A ``CLIPTokenizer`` built in memory: characters, their word-final forms, a few merges."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in _CHARACTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges = [("t", "h</w>"), ("t", "h"), ("e", "r</w>"), ("a", "n"), ("i", "n")]
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def clip_text_config(tokenizer: Any, hidden: int, layers: int, projection_dim: int) -> Any:
    """A ``CLIPTextConfig`` of ``layers`` layers of width ``hidden`` (MLP 2×hidden, 2 heads) sized to
    ``tokenizer``'s vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def sd_train_scheduler() -> Any:
    """Stable Diffusion's training noise schedule: DDPM, 1000 steps, scaled-linear β from 0.00085 to 0.012."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )


def randomize_weights(*modules: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded random values of a sensible scale (zero-initialized output layers too),
    so that adapters on any layer change the outputs measurably."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
                elif param.dim() == 1:  # norm scales
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def _cast(pipe: Any, dtype: torch.dtype) -> Any:
    """The pipeline's models in eval mode (as ``from_pretrained`` leaves them) and in ``dtype``."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
            if dtype != torch.float32:
                torch.nn.Module.to(module, dtype=dtype)
    return pipe


def tiny_sd_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusionPipeline`` with SD 1.x's architecture and module names, tiny and random."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = _vae()
    randomize_weights(unet, text_encoder, vae, seed=seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_train_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _cast(pipe, dtype)


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusionXLPipeline`` with SDXL's architecture (UNet layout, two text encoders), tiny."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, hidden=32, layers=2, projection_dim=16))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 16, 32),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=8,
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=16 + 6 * time_dim,
    )
    vae = _vae()
    randomize_weights(unet, text_encoder, text_encoder_2, vae, seed=seed)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sd_train_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _cast(pipe, dtype)
