"""Merging a kohya SD-1.x LoRA (diffusers module paths) into a single-file SD checkpoint (original names)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from beyondlora.cli import main
from helpers.ui_formula import ui_delta

#: checkpoint module (original SD naming) → the diffusers path kohya's SD-1.x files use, written by hand
PAIRS = {
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.4.0.emb_layers.1": "down_blocks.1.resnets.0.time_emb_proj",
    "middle_block.1.transformer_blocks.0.attn2.to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
    "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
}
SHAPES = {
    "input_blocks.1.1.proj_in": (8, 8, 1, 1),
    "input_blocks.4.0.emb_layers.1": (12, 16),
    "middle_block.1.transformer_blocks.0.attn2.to_k": (10, 6),
    "output_blocks.11.1.proj_out": (8, 8),
    "output_blocks.8.2.conv": (6, 6, 3, 3),
}


def test_merge_maps_diffusers_paths_onto_original_names(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    checkpoint = {f"model.diffusion_model.{n}.weight": torch.randn(s, generator=g) for n, s in SHAPES.items()}
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3, generator=g)
    adapter, expected = {}, dict(checkpoint)
    for ldm, diffusers in PAIRS.items():
        shape = SHAPES[ldm]
        key = "lora_unet_" + diffusers.replace(".", "_")
        params = {
            "lora_down.weight": torch.randn(2, *shape[1:], generator=g),
            "lora_up.weight": torch.randn(shape[0], 2, *([1] * (len(shape) - 2)), generator=g),
            "alpha": torch.tensor(1.0),
        }
        adapter.update({f"{key}.{k}": v for k, v in params.items()})
        weight_key = f"model.diffusion_model.{ldm}.weight"
        delta, _ = ui_delta(params, checkpoint[weight_key].double())
        expected[weight_key] = (checkpoint[weight_key].double() + 0.5 * delta).float()
    save_file(checkpoint, str(tmp_path / "sd15.safetensors"))
    save_file(adapter, str(tmp_path / "kohya_lora.safetensors"))
    out = tmp_path / "merged.safetensors"
    code = main(
        ["merge", str(tmp_path / "sd15.safetensors"), str(tmp_path / "kohya_lora.safetensors")]
        + ["--multiplier", "0.5", "--out", str(out)]
    )
    assert code == 0
    merged = load_file(str(out))
    assert merged.keys() == checkpoint.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)
    assert torch.equal(
        merged["first_stage_model.decoder.conv_in.weight"], checkpoint["first_stage_model.decoder.conv_in.weight"]
    )
