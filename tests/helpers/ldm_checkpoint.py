"""Write a diffusers Stable Diffusion pipeline as an original-layout (LDM / SGM) single-file checkpoint.

The inverse of what diffusers' ``from_single_file`` reads, written independently of diffusers' converter:
UNet module paths come from the library's SGM tables (:func:`~beyondlora.formats.names.sgm_block_table`),
the VAE and the text encoders from the small tables below.  Every parameter must find its place, so a
module left out fails loudly instead of loading as random weights.

- UNet: ``model.diffusion_model.<SGM path>``.
- VAE: ``first_stage_model.`` with LDM's names (``encoder.down.{i}.block.{j}``, ``mid.block_1``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` as 1×1 convs, ``decoder.up.{levels − 1 − i}``, ``nin_shortcut``…).
- SD 1.x text encoder: ``cond_stage_model.transformer.text_model.…`` (Hugging Face CLIP names).
- SDXL: ``conditioner.embedders.0.transformer.text_model.…`` (CLIP ViT-L, Hugging Face names) and
  ``conditioner.embedders.1.model.…`` (OpenCLIP ViT-bigG names: ``transformer.resblocks.{i}`` with a fused
  ``attn.in_proj_weight``, ``positional_embedding``, ``ln_final``, ``text_projection`` as ``x @ P``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from beyondlora.formats.names import diffusers_to_sgm, sgm_block_table

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

#: inside a diffusers VAE resnet → inside an LDM ``ResnetBlock``
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
#: inside a diffusers VAE attention → inside an LDM ``AttnBlock`` (1×1 convs there)
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
#: inside a CLIP encoder layer: Hugging Face → OpenCLIP (q/k/v are fused separately)
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.`` with SGM paths."""
    table = sgm_block_table(unet)
    out = {}
    for key, tensor in unet.state_dict().items():
        module, param = _split(key)
        target = diffusers_to_sgm(module, table)
        assert target is not None, f"no SGM path for UNet module {module}"
        out[f"{UNET_PREFIX}{target}.{param}"] = tensor
    return out


def _vae_module(module: str, levels: int) -> str:
    """The LDM path of diffusers VAE module ``module``."""
    if module in _VAE_TOP:
        return _VAE_TOP[module]
    side, _, rest = module.partition(".")
    if rest in _VAE_TOP:
        return f"{side}.{_VAE_TOP[rest]}"
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest):
        kind, level, j, inner = match.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        return f"{side}.{kind}.{level}.block.{j}.{_VAE_RESNET[inner]}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
        return f"{side}.down.{match.group(1)}.downsample.conv"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
        return f"{side}.up.{levels - 1 - int(match.group(1))}.upsample.conv"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest):
        return f"{side}.mid.block_{int(match.group(1)) + 1}.{_VAE_RESNET[match.group(2)]}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[match.group(1)]}"
    raise AssertionError(f"no LDM path for VAE module {module}")


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's weights under ``first_stage_model.`` with LDM names (attention projections as 1×1 convs)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        module, param = _split(key)
        target = _vae_module(module, levels)
        if ".mid.attn_1." in target and param == "weight" and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[f"{VAE_PREFIX}{target}.{param}"] = tensor
    return out


def _hf_clip_keys(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights named as in Hugging Face checkpoints (with the ``text_model.`` level that
    transformers 5's ``CLIPTextModel`` no longer has)."""
    state = model.state_dict()
    if hasattr(model, "text_model"):
        return dict(state)
    return {f"text_model.{key}": tensor for key, tensor in state.items()}


def clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder under ``prefix`` with Hugging Face names (``…text_model.encoder.layers…``)."""
    return {prefix + key: tensor for key, tensor in _hf_clip_keys(text_encoder).items()}


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` under ``prefix`` with OpenCLIP names."""
    state = _hf_clip_keys(text_encoder)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = tensor
        elif match := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, inner, param = match.groups()
            base = f"transformer.resblocks.{layer}"
            if inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}.attn.in_proj_{param}", {})[inner[-6]] = tensor
            else:
                out[f"{base}.{_OPEN_CLIP_LAYER[inner]}.{param}"] = tensor
        else:
            raise AssertionError(f"no OpenCLIP name for {key}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + key: tensor for key, tensor in out.items()}


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, text encoder(s)) as one original-layout state dict."""
    out = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(clip_to_ldm(pipe.text_encoder, SDXL_TEXT_PREFIX))
        out.update(open_clip_to_ldm(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    else:
        out.update(clip_to_ldm(pipe.text_encoder, SD_TEXT_PREFIX))
    return out


def save_ldm_checkpoint(pipe: Any, path: str | Path) -> Path:
    """Write ``pipe`` as a single ``.safetensors`` checkpoint in the original layout; returns the path."""
    tensors = {key: tensor.detach().contiguous().clone() for key, tensor in pipeline_to_ldm(pipe).items()}
    save_file(tensors, str(path))
    return Path(path)
