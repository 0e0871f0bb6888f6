"""The canonical-name table: diffusers module paths ⇄ kohya / SGM single-file keys, checked against the
original Stable Diffusion checkpoint layout (pairs written out by hand)."""

from __future__ import annotations

import pytest
from torch import nn

from beyondlora.formats.names import part_names, pipeline_part_names, route_keys
from helpers.sd_helpers import make_pipeline

# SGM (original checkpoint) path → diffusers path, for SD 1.x's block layout
SD1_PAIRS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.2.0.in_layers.0": "down_blocks.0.resnets.1.norm1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0.emb_layers.1": "down_blocks.1.resnets.0.time_emb_proj",
    "input_blocks.7.0.skip_connection": "down_blocks.2.resnets.0.conv_shortcut",
    "input_blocks.8.1.transformer_blocks.0.attn2.to_out.0": (
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0"
    ),
    "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
    "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
    "middle_block.0.in_layers.2": "mid_block.resnets.0.conv1",
    "middle_block.1.transformer_blocks.0.attn2.to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block.2.out_layers.0": "mid_block.resnets.1.norm2",
    "output_blocks.0.0.in_layers.2": "up_blocks.0.resnets.0.conv1",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.0.skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj": (
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    ),
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# and for SDXL's (levels without attention first, two transformer blocks in the last level, label_emb)
SDXL_PAIRS = {
    "input_blocks.0.0": "conv_in",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks.8.1.transformer_blocks.1.ff.net.2": "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2",
    "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
    "output_blocks.0.1.transformer_blocks.1.attn2.to_v": "up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_v",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.6.0.skip_connection": "up_blocks.2.resnets.0.conv_shortcut",
    "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
    "out.2": "conv_out",
}


def _flat(path: str) -> str:
    return path.replace(".", "_")


def test_sd1_unet_writes_diffusers_paths_and_reads_sgm_paths_too() -> None:
    names = part_names(make_pipeline("sd").unet, "unet")
    for sgm, diffusers in SD1_PAIRS.items():
        assert names.key(diffusers) == f"lora_unet_{_flat(diffusers)}"
        assert names.module_for_key(f"lora_unet_{_flat(sgm)}") == diffusers
        assert names.module_for_key(f"lora_unet_{_flat(diffusers)}") == diffusers
        assert names.module_for_path(sgm) == diffusers
    assert names.peft_key("down_blocks.0.attentions.0.proj_in") == "unet.down_blocks.0.attentions.0.proj_in"


def test_sdxl_unet_writes_sgm_paths_and_reads_diffusers_paths_too() -> None:
    names = part_names(make_pipeline("sdxl").unet, "unet")
    for sgm, diffusers in SDXL_PAIRS.items():
        assert names.key(diffusers) == f"lora_unet_{_flat(sgm)}"
        assert names.module_for_key(f"lora_unet_{_flat(sgm)}") == diffusers
        assert names.module_for_key(f"lora_unet_{_flat(diffusers)}") == diffusers
    with pytest.raises(KeyError, match="down_blocks.0.resnets.0.nonlinearity"):
        names.key("down_blocks.0.resnets.0.nonlinearity")  # SiLU has no place in the checkpoint


def test_text_encoders_keep_text_model_and_read_lycoris_transformers5_keys() -> None:
    pipe = make_pipeline("sdxl")
    assert not hasattr(pipe.text_encoder, "text_model")  # transformers 5 flattened CLIPTextModel
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    naming = pipeline_part_names(parts)
    te1, te2 = naming["text_encoder"], naming["text_encoder_2"]
    assert te1.key("encoder.layers.1.mlp.fc1") == "lora_te1_text_model_encoder_layers_1_mlp_fc1"
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj"
    assert te2.key(q_proj) == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    assert te2.key("text_projection") == "lora_te2_text_projection"
    # LyCORIS with transformers 5 writes the text encoder without text_model; SD 1.x files use lora_te_
    assert te1.module_for_key("lora_te_encoder_layers_1_mlp_fc1") == "encoder.layers.1.mlp.fc1"
    assert te1.module_for_key("lora_te_text_model_encoder_layers_1_mlp_fc1") == "encoder.layers.1.mlp.fc1"
    sd = part_names(make_pipeline("sd").text_encoder, "text_encoder")
    assert sd.key("encoder.layers.0.self_attn.out_proj") == "lora_te_text_model_encoder_layers_0_self_attn_out_proj"


def test_keys_are_routed_to_their_part_by_prefix() -> None:
    pipe = make_pipeline("sdxl")
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    keys = [
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_te1_text_model_encoder_layers_0_mlp_fc2",
        "lora_te2_text_model_encoder_layers_0_mlp_fc2",
        "lora_te2_text_model_encoder_layers_7_mlp_fc2",
        "lora_vae_encoder_conv_in",
    ]
    routed, unmatched = route_keys(keys, pipeline_part_names(parts))
    assert routed["unet"] == {keys[0]: "down_blocks.1.attentions.0.proj_in"}
    assert routed["text_encoder"] == {keys[1]: "encoder.layers.0.mlp.fc2"}
    assert routed["text_encoder_2"] == {keys[2]: "text_model.encoder.layers.0.mlp.fc2"}
    assert unmatched == keys[3:]


def test_sgm_unets_and_plain_modules_use_their_own_paths() -> None:
    class SgmUNet(nn.Module):  # the module tree of sd-scripts' SDXL UNet
        def __init__(self) -> None:
            super().__init__()
            self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(4, 8, 3)])])
            self.middle_block = nn.ModuleList([nn.Linear(8, 8)])
            self.output_blocks = nn.ModuleList([nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])])

    names = part_names(SgmUNet(), "unet")
    assert names.key("input_blocks.0.0") == "lora_unet_input_blocks_0_0"
    assert names.module_for_key("lora_unet_output_blocks_0_1") == "output_blocks.0.1"
    plain = part_names(nn.Sequential(nn.Linear(2, 2)), prefix="lycoris")
    assert plain.key("0") == "lycoris_0"
