"""ComfyUI finds every module of our Flux files: its key map rebuilt here from ComfyUI's documented rules
(BFL checkpoint paths behind ``lora_unet_``; diffusers paths behind ``transformer.``, ``lycoris_`` and
``lora_transformer_``, each q/k/v a row slice of the fused ``qkv`` / ``linear1`` weight; CLIP-L's six linears
per layer behind ``lora_te1_text_model_encoder_layers_``; T5 behind ``lora_te3_`` and, for Flux, ``lora_te2_``),
written apart from the library's own table."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import beyondlora as bl
from beyondlora.integrations.diffusers import save_adapter
from helpers.dit_helpers import make_dit

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


def comfyui_key_map(pipe) -> dict[str, tuple[int, int]]:
    """File module key → the shape of the weight (or weight slice) ComfyUI patches with it."""
    config = pipe.transformer.config
    h = config.num_attention_heads * config.attention_head_dim
    depth, single = config.num_layers, config.num_single_layers
    bfl = bfl_weights(depth, single, h, config.in_channels, config.joint_attention_dim, config.pooled_projection_dim)
    keys = {"lora_unet_" + path.replace(".", "_"): shape for path, shape in bfl.items()}
    for module, (path, rows) in diffusers_to_bfl(depth, single, h).items():
        shape = bfl[path] if rows is None else (rows[1], bfl[path][1])
        flat = module.replace(".", "_")
        keys.update({f"transformer.{module}": shape, f"lycoris_{flat}": shape, f"lora_transformer_{flat}": shape})
    clip = pipe.text_encoder.config
    for layer in range(clip.num_hidden_layers):
        for name, flat in CLIP_LINEARS.items():
            weight = pipe.text_encoder.get_submodule(f"encoder.layers.{layer}.{name}").weight
            keys[f"lora_te1_text_model_encoder_layers_{layer}_{flat}"] = tuple(weight.shape)
    for name, weight in pipe.text_encoder_2.state_dict().items():  # the T5 checkpoint's own keys
        if name.endswith(".weight") and weight.dim() == 2:
            for te in ("lora_te2", "lora_te3"):
                keys[f"{te}_{name[: -len('.weight')].replace('.', '_')}"] = tuple(weight.shape)
    return keys


def _lora_everywhere(pipe) -> None:
    torch.manual_seed(0)
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        config = bl.LoraConfig(r=2, target_modules="all-linear", init_weights=False)
        setattr(pipe, part, bl.get_peft_model(getattr(pipe, part), config).eval())


def test_comfyui_finds_every_module_of_our_flux_files(tmp_path) -> None:
    pipe = make_dit("flux")
    key_map = comfyui_key_map(pipe)
    _lora_everywhere(pipe)
    for names in ("kohya", "lycoris"):
        save_adapter(pipe, tmp_path / f"{names}.safetensors", names=names)
        tensors = load_file(str(tmp_path / f"{names}.safetensors"))
        modules = {key.partition(".")[0] for key in tensors}
        assert modules <= set(key_map), sorted(modules - set(key_map))[:5]
        for module in modules:  # ΔW = up · down has the shape of what ComfyUI patches
            up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
            assert (up.shape[0], down.shape[1]) == key_map[module], module
        if names == "kohya":  # every BFL transformer weight is written, fused ones included
            assert {m for m in modules if m.startswith("lora_unet_")} == {
                k for k in key_map if k.startswith("lora_unet_")
            }
