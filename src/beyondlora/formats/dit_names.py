"""Module names of the MMDiT transformers (Stable Diffusion 3 / 3.5, Flux.1) in adapter files.

kohya sd-scripts, ComfyUI and the UIs name a transformer's modules by the original checkpoints' paths
(BFL's Flux: ``double_blocks.N.img_attn.qkv``; Stability's SD3: ``joint_blocks.N.x_block.attn.qkv``) behind
``lora_unet_``.  Those checkpoints fuse layers that diffusers keeps apart: one ``qkv`` linear for diffusers'
``to_q``, ``to_k``, ``to_v``; Flux's single-block ``linear1`` for q, k, v and the MLP's input ``proj_mlp``;
and the final (and SD3's last context) adaLN modulation puts (shift, scale) where diffusers'
``AdaLayerNormContinuous`` has (scale, shift).  So an entry here maps one file path to *segments*: the
diffusers modules, or halves of one, whose output rows it stacks, in the file's row order.

Other trainers name the same modules by diffusers' paths: ``lora_transformer_…`` (OneTrainer, and what
diffusers' own LoRA layout becomes here), ``lycoris_…`` (SimpleTuner's LyCORIS files).  All three are read;
kohya's are written unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

#: a diffusers module (``"attn.to_q"``), or (module, k, n): its k-th of n equal row chunks
SegmentSpec = str | tuple[str, int, int]


@dataclass(frozen=True)
class Segment:
    """Rows of one diffusers module inside a fused file module: all of them, or chunk ``k`` of ``n``."""

    module: str
    chunk: tuple[int, int] | None = None

    @classmethod
    def of(cls, spec: SegmentSpec, prefix: str = "") -> Segment:
        if isinstance(spec, str):
            return cls(prefix + spec)
        module, k, n = spec
        return cls(prefix + module, (k, n))


#: adaLN modulations whose (shift, scale) halves diffusers stores as (scale, shift)
_SWAPPED = (1, 2), (0, 2)


def _swapped(module: str) -> tuple[SegmentSpec, ...]:
    return tuple((module, k, n) for k, n in _SWAPPED)


_FLUX_DOUBLE: dict[str, tuple[SegmentSpec, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_FLUX_SINGLE: dict[str, tuple[SegmentSpec, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_FLUX_TOP: dict[str, tuple[SegmentSpec, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": _swapped("norm_out.linear"),
}
_SD3_JOINT: dict[str, tuple[SegmentSpec, ...]] = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD 3.5's dual-attention blocks
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
#: the last joint block (``context_pre_only``): its context modulation is an ``AdaLayerNormContinuous``
_SD3_PRE_ONLY: dict[str, tuple[SegmentSpec, ...]] = {
    **_SD3_JOINT,
    "context_block.adaLN_modulation.1": _swapped("norm1_context.linear"),
}
_SD3_TOP: dict[str, tuple[SegmentSpec, ...]] = {
    "x_embedder.proj": ("pos_embed.proj",),
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": _swapped("norm_out.linear"),
}


def is_flux_transformer(model: nn.Module) -> bool:
    return type(model).__name__ == "FluxTransformer2DModel"


def is_sd3_transformer(model: nn.Module) -> bool:
    return type(model).__name__ == "SD3Transformer2DModel"


def is_dit(model: nn.Module) -> bool:
    """A transformer whose file names come from :func:`dit_table`."""
    return is_flux_transformer(model) or is_sd3_transformer(model)


def is_t5_encoder(model: nn.Module) -> bool:
    return type(model).__name__.startswith("T5Encoder")


def _tables(model: nn.Module) -> list[tuple[str, str, Mapping[str, tuple[SegmentSpec, ...]]]]:
    """``(diffusers prefix, checkpoint prefix, inner table)`` for the model's top level and each block."""
    if is_flux_transformer(model):
        rows = [("", "", _FLUX_TOP)]
        rows += [
            (f"transformer_blocks.{i}.", f"double_blocks.{i}.", _FLUX_DOUBLE)
            for i in range(len(model.transformer_blocks))
        ]
        count = len(model.single_transformer_blocks)
        return rows + [(f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", _FLUX_SINGLE) for i in range(count)]
    rows = [("", "", _SD3_TOP)]
    for i, block in enumerate(model.transformer_blocks):
        inner = _SD3_PRE_ONLY if getattr(block, "context_pre_only", False) else _SD3_JOINT
        rows.append((f"transformer_blocks.{i}.", f"joint_blocks.{i}.", inner))
    return rows


def dit_table(model: nn.Module, modules: set[str]) -> dict[str, tuple[Segment, ...]]:
    """Checkpoint path → the segments of diffusers modules it stacks (file row order), for the entries of
    ``model``'s family whose modules are all among ``modules`` (the model's own module names)."""
    table: dict[str, tuple[Segment, ...]] = {}
    for ours, theirs, inner in _tables(model):
        for path, specs in inner.items():
            segments = tuple(Segment.of(spec, ours) for spec in specs)
            if all(s.module in modules for s in segments):
                table[theirs + path] = segments
    return table


def text_encoder_prefixes(role: str, model: nn.Module, roles: set[str]) -> tuple[str, tuple[str, ...]]:
    """(prefix written, prefixes read) of an SD3 / Flux pipeline's text encoder, as kohya writes them: CLIP-L
    ``lora_te1``, CLIP-G ``lora_te2``, T5 ``lora_te3`` (Flux's T5, the pipeline's ``text_encoder_2``, also
    read as ``lora_te2``, as OneTrainer writes it and ComfyUI reads it)."""
    if is_t5_encoder(model):
        flux_t5 = role == "text_encoder_2" and "text_encoder_3" not in roles
        return "lora_te3", ("lora_te3", "lora_te2") if flux_t5 else ("lora_te3",)
    if role == "text_encoder":
        return "lora_te1", ("lora_te1", "lora_te")
    return "lora_te2", ("lora_te2",)
