"""ComfyUI finds every module of our Flux and SD3 files: its key map rebuilt here from ComfyUI's documented
rules (the checkpoint's paths, BFL's or Stability's MMDiT, behind ``lora_unet_``; diffusers paths behind
``transformer.``, ``lycoris_`` and ``lora_transformer_``, each q/k/v a row slice of the fused ``qkv`` /
``linear1`` weight; CLIP-L's (CLIP-G's) six linears per layer behind ``lora_te1_`` (``lora_te2_``)
``text_model_encoder_layers_``; T5 behind ``lora_te3_`` and, for Flux, ``lora_te2_``), written apart from the
library's own table."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import beyondlora as bl
from beyondlora.integrations.diffusers import save_adapter
from helpers.dit_helpers import TEXT_ENCODERS, make_dit

CLIP_LINEARS = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def bfl_weights(depth: int, single: int, h: int, in_ch: int, ctx: int, vec: int) -> dict[str, tuple[int, int]]:
    """The Flux checkpoint's linear weights (BFL's paths) and their shapes, MLP ratio 4, with guidance."""
    mlp = 4 * h
    shapes = {
        "img_in": (h, in_ch),
        "txt_in": (h, ctx),
        "final_layer.linear": (in_ch, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    for name, first in (("time_in", 256), ("vector_in", vec), ("guidance_in", 256)):
        shapes[f"{name}.in_layer"], shapes[f"{name}.out_layer"] = (h, first), (h, h)
    for i in range(depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            shapes.update({f"{p}_mod.lin": (6 * h, h), f"{p}_attn.qkv": (3 * h, h), f"{p}_attn.proj": (h, h)})
            shapes.update({f"{p}_mlp.0": (mlp, h), f"{p}_mlp.2": (h, mlp)})
    for i in range(single):
        p = f"single_blocks.{i}"
        shapes.update(
            {f"{p}.linear1": (3 * h + mlp, h), f"{p}.linear2": (h, h + mlp), f"{p}.modulation.lin": (3 * h, h)}
        )
    return shapes


def diffusers_to_bfl(depth: int, single: int, h: int) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """diffusers module → (BFL weight, (row offset, rows) inside it or None for all of it)."""
    out: dict[str, tuple[str, tuple[int, int] | None]] = {
        "x_embedder": ("img_in", None),
        "context_embedder": ("txt_in", None),
        "proj_out": ("final_layer.linear", None),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", None),  # ComfyUI swaps the halves itself
    }
    for ours, theirs in (("timestep", "time_in"), ("text", "vector_in"), ("guidance", "guidance_in")):
        out[f"time_text_embed.{ours}_embedder.linear_1"] = (f"{theirs}.in_layer", None)
        out[f"time_text_embed.{ours}_embedder.linear_2"] = (f"{theirs}.out_layer", None)
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            out[f"{d}.attn.{img}"] = (f"{b}.img_attn.qkv", (j * h, h))
            out[f"{d}.attn.{txt}"] = (f"{b}.txt_attn.qkv", (j * h, h))
        out.update(
            {f"{d}.attn.to_out.0": (f"{b}.img_attn.proj", None), f"{d}.attn.to_add_out": (f"{b}.txt_attn.proj", None)}
        )
        for ff, stream in (("ff", "img"), ("ff_context", "txt")):
            out[f"{d}.{ff}.net.0.proj"] = (f"{b}.{stream}_mlp.0", None)
            out[f"{d}.{ff}.net.2"] = (f"{b}.{stream}_mlp.2", None)
        out[f"{d}.norm1.linear"] = (f"{b}.img_mod.lin", None)
        out[f"{d}.norm1_context.linear"] = (f"{b}.txt_mod.lin", None)
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            out[f"{d}.{name}"] = (f"{b}.linear1", (j * h, h))
        out[f"{d}.proj_mlp"] = (f"{b}.linear1", (3 * h, 4 * h))
        out[f"{d}.proj_out"] = (f"{b}.linear2", None)
        out[f"{d}.norm.linear"] = (f"{b}.modulation.lin", None)
    return out


def mmdit_weights(config, pre_only: int) -> dict[str, tuple[int, ...]]:
    """SD3's checkpoint weights (Stability's MMDiT paths) and shapes; block ``pre_only`` is the last, whose
    context block keeps only q, k, v and a (shift, scale) modulation; dual-attention blocks add ``attn2``."""
    h, p = config.num_attention_heads * config.attention_head_dim, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj": (h, config.in_channels, p, p),
        "context_embedder": (h, config.joint_attention_dim),
        "t_embedder.mlp.0": (h, 256),
        "t_embedder.mlp.2": (h, h),
        "y_embedder.mlp.0": (h, config.pooled_projection_dim),
        "y_embedder.mlp.2": (h, h),
        "final_layer.linear": (p * p * config.out_channels, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    for i in range(config.num_layers):
        dual = i in config.dual_attention_layers
        for stream in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{stream}"
            shapes[f"{b}.attn.qkv"] = (3 * h, h)
            if stream == "context_block" and i == pre_only:
                shapes[f"{b}.adaLN_modulation.1"] = (2 * h, h)
                continue
            shapes[f"{b}.adaLN_modulation.1"] = ((9 if dual and stream == "x_block" else 6) * h, h)
            shapes.update({f"{b}.attn.proj": (h, h), f"{b}.mlp.fc1": (4 * h, h), f"{b}.mlp.fc2": (h, 4 * h)})
        if dual:
            shapes.update(
                {f"joint_blocks.{i}.x_block.attn2.qkv": (3 * h, h), f"joint_blocks.{i}.x_block.attn2.proj": (h, h)}
            )
    return shapes


def sd3_diffusers_map(config) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """diffusers SD3 module → (MMDiT weight, row slice or None)."""
    h = config.num_attention_heads * config.attention_head_dim
    out: dict[str, tuple[str, tuple[int, int] | None]] = {
        "pos_embed.proj": ("x_embedder.proj", None),
        "context_embedder": ("context_embedder", None),
        "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", None),
        "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", None),
        "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", None),
        "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", None),
        "proj_out": ("final_layer.linear", None),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", None),
    }
    for i in range(config.num_layers):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        for j, (q, add) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            out[f"{d}.attn.{q}"] = (f"{x}.attn.qkv", (j * h, h))
            out[f"{d}.attn.{add}"] = (f"{c}.attn.qkv", (j * h, h))
            out[f"{d}.attn2.{q}"] = (f"{x}.attn2.qkv", (j * h, h))
        out.update({f"{d}.attn.to_out.0": (f"{x}.attn.proj", None), f"{d}.attn.to_add_out": (f"{c}.attn.proj", None)})
        out.update(
            {f"{d}.attn2.to_out.0": (f"{x}.attn2.proj", None), f"{d}.norm1.linear": (f"{x}.adaLN_modulation.1", None)}
        )
        out[f"{d}.norm1_context.linear"] = (f"{c}.adaLN_modulation.1", None)
        for ff, block in (("ff", x), ("ff_context", c)):
            out[f"{d}.{ff}.net.0.proj"] = (f"{block}.mlp.fc1", None)
            out[f"{d}.{ff}.net.2"] = (f"{block}.mlp.fc2", None)
    return out


def comfyui_key_map(pipe, kind: str) -> dict[str, tuple[int, ...]]:
    """File module key → the shape of the weight (or weight slice) ComfyUI patches with it."""
    config = pipe.transformer.config
    if kind == "flux":
        h = config.num_attention_heads * config.attention_head_dim
        depth, single = config.num_layers, config.num_single_layers
        native = bfl_weights(
            depth, single, h, config.in_channels, config.joint_attention_dim, config.pooled_projection_dim
        )
        aliases = diffusers_to_bfl(depth, single, h)
    else:
        native, aliases = mmdit_weights(config, pre_only=config.num_layers - 1), sd3_diffusers_map(config)
    keys = {"lora_unet_" + path.replace(".", "_"): shape for path, shape in native.items()}
    for module, (path, rows) in aliases.items():
        if path not in native:  # a module this model does not have (attn2 outside dual-attention blocks)
            continue
        shape = native[path] if rows is None else (rows[1], *native[path][1:])
        flat = module.replace(".", "_")
        keys.update({f"transformer.{module}": shape, f"lycoris_{flat}": shape, f"lora_transformer_{flat}": shape})
    clips = [("text_encoder", "lora_te1")] + ([("text_encoder_2", "lora_te2")] if kind == "sd3" else [])
    for role, te in clips:
        encoder = getattr(pipe, role)
        for layer in range(encoder.config.num_hidden_layers):
            for name, flat in CLIP_LINEARS.items():
                inner = getattr(encoder, "text_model", encoder)  # transformers 5's CLIPTextModel has no text_model
                weight = inner.get_submodule(f"encoder.layers.{layer}.{name}")
                keys[f"{te}_text_model_encoder_layers_{layer}_{flat}"] = tuple(weight.weight.shape)
        if hasattr(encoder, "text_projection"):  # CLIP-L's / CLIP-G's projection (OneTrainer's SD3 keys)
            keys[f"{te}_text_projection"] = tuple(encoder.text_projection.weight.shape)
    t5 = pipe.text_encoder_2 if kind == "flux" else pipe.text_encoder_3
    for name, weight in t5.state_dict().items():  # the T5 checkpoint's own keys
        if name.endswith(".weight") and weight.dim() == 2:
            for te in ("lora_te2", "lora_te3") if kind == "flux" else ("lora_te3",):
                keys[f"{te}_{name[: -len('.weight')].replace('.', '_')}"] = tuple(weight.shape)
    return keys


def _lora_everywhere(pipe, kind: str) -> None:
    torch.manual_seed(0)
    for part in ("transformer", *TEXT_ENCODERS[kind]):
        model = getattr(pipe, part)
        layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        config = bl.LoraConfig(r=2, target_modules=layers, init_weights=False)
        setattr(pipe, part, bl.get_peft_model(model, config).eval())


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_comfyui_finds_every_module_of_our_files(kind: str, tmp_path) -> None:
    pipe = make_dit(kind)
    key_map = comfyui_key_map(pipe, kind)
    _lora_everywhere(pipe, kind)
    for names in ("kohya", "lycoris"):
        save_adapter(pipe, tmp_path / f"{names}.safetensors", names=names)
        tensors = load_file(str(tmp_path / f"{names}.safetensors"))
        modules = {key.partition(".")[0] for key in tensors}
        assert modules <= set(key_map), sorted(modules - set(key_map))[:5]
        for module in modules:  # ΔW = up · down has the shape of what ComfyUI patches
            up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
            assert (up.shape[0], *down.shape[1:]) == key_map[module], module
        if names == "kohya":  # every checkpoint weight of the transformer is written, fused ones included
            assert {m for m in modules if m.startswith("lora_unet_")} == {
                k for k in key_map if k.startswith("lora_unet_")
            }
