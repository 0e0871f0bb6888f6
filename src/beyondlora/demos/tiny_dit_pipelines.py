"""Tiny Stable Diffusion 3 and Flux pipelines built offline from configs, with seeded random weights.

Both have their real model's module names (hence its adapter file names) at a few hundred thousand
parameters: :func:`tiny_sd3_pipeline` an ``SD3Transformer2DModel`` of SD 3.5 Medium's layout (joint blocks,
the first with SD 3.5's second attention ``attn2``, RMS q/k norms, the last block ``context_pre_only``),
two CLIP text encoders with projections (CLIP-L, CLIP-G) and a T5 encoder; :func:`tiny_flux_pipeline` a
``FluxTransformer2DModel`` (double blocks ``transformer_blocks``, single blocks ``single_transformer_blocks``,
guidance embedding as FLUX.1-dev), CLIP-L and T5.  Tokenizers are made in memory (a character-level CLIP
tokenizer, a word-level T5 tokenizer); nothing touches the network.
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny_pipelines import _CHARACTERS, _cast, clip_text_config, randomize_weights, tiny_tokenizer

#: width of the tiny transformers (heads × head size) and of their T5 encoder
_HEADS, _HEAD_DIM, _T5_DIM = 2, 8, 64


def tiny_t5_tokenizer(model_max_length: int = 16) -> Any:
    """A ``T5TokenizerFast`` over a character vocabulary (with T5's ``<pad>``, ``</s>``, ``<unk>``)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(char, -2.0) for char in _CHARACTERS] + [("▁" + char, -2.5) for char in _CHARACTERS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(tokenizer: Any) -> Any:
    """A two-layer ``T5EncoderModel`` (gated GELU, as T5 v1.1 / T5-XXL) sized to ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=2 * _T5_DIM,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        shift_factor=0.0,  # the pipelines shift latents by it (SD 3 and Flux VAEs have one)
    )


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusion3Pipeline`` with SD 3.5 Medium's module names (three joint blocks, the first with
    ``attn2``), CLIP-L, CLIP-G and T5, tiny and random."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizers = [tiny_tokenizer(), tiny_tokenizer()]
    clip_l = CLIPTextModelWithProjection(clip_text_config(tokenizers[0], hidden=32, layers=2, projection_dim=32))
    clip_g = CLIPTextModelWithProjection(clip_text_config(tokenizers[1], hidden=32, layers=2, projection_dim=32))
    tokenizer_3 = tiny_t5_tokenizer()
    t5 = tiny_t5_encoder(tokenizer_3)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_T5_DIM,  # CLIP-L ⊕ CLIP-G hidden states (64) padded to T5's width
        caption_projection_dim=_HEADS * _HEAD_DIM,
        pooled_projection_dim=64,  # CLIP-L ⊕ CLIP-G projections
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _vae(latent_channels=4)
    randomize_weights(transformer, clip_l, clip_g, t5, vae, seed=seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizers[0],
        text_encoder_2=clip_g,
        tokenizer_2=tokenizers[1],
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return _cast(pipe, dtype)


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``FluxPipeline`` with FLUX.1-dev's module names (two double and two single blocks, guidance
    embedding), CLIP-L and T5, tiny and random."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    clip_l = CLIPTextModel(clip_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    tokenizer_2 = tiny_t5_tokenizer()
    t5 = tiny_t5_encoder(tokenizer_2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2×2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=32,  # CLIP-L's pooled output
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to the head size
    )
    vae = _vae(latent_channels=4)
    randomize_weights(transformer, clip_l, t5, vae, seed=seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return _cast(pipe, dtype)
