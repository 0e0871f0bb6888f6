"""Shared builders for the tool tests (planted state dicts, tiny diffusers folders); the tests of the
checkpoint reader and the streaming safetensors writer they rely on are tests/tools/test_model_files.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


class Planted(nn.Module):
    """Linear (bias), k×k conv (bias), 1×1 conv, LayerNorm, a nested linear and an embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(48, 64)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1, bias=False)
        self.norm = nn.LayerNorm(64)
        self.block = nn.ModuleDict({"proj": nn.Linear(64, 40, bias=False)})
        self.token_embedding = nn.Embedding(50, 24)


def planted_model(seed: int = 0) -> Planted:
    torch.manual_seed(seed)
    model = Planted()
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.1)
        model.norm.bias.normal_(0.0, 0.1)
    return model


def state_of(model: nn.Module) -> dict[str, Tensor]:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["step_count"] = torch.tensor([3, 1, 4], dtype=torch.int64)  # a non-module, non-float tensor
    return state


def save_state(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def low_rank(out: int, inner: int, rank: int, generator: torch.Generator, scale: float = 0.5) -> Tensor:
    return scale * torch.randn(out, rank, generator=generator) @ torch.randn(rank, inner, generator=generator)


def files_in(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def tiny_unet(seed: int = 0) -> nn.Module:
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=16,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(config).eval()


def save_pipeline(unet: nn.Module, text_encoder: nn.Module, folder: Path) -> Path:
    """A diffusers-style pipeline folder: unet/, text_encoder/, a tokenizer file and model_index.json."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder
