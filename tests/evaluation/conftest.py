"""Tiny randomly initialised CLIP and DINOv2 folders (written with ``save_pretrained``, nothing downloaded) and a
random demo adapter file, shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import beyondlora as bl
from beyondlora.demos.tiny_pipelines import tiny_tokenizer
from beyondlora.training.models import load_base_model


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(model_max_length=24)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 24,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # a preprocessor file of its own: read for the input size and normalisation
    CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dino_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(1)
    config = Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2
    )
    Dinov2Model(config).save_pretrained(folder)  # no preprocessor file: the model's size and ImageNet's statistics
    return folder


@pytest.fixture(scope="session")
def random_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoKr file for the demo with random (non-identity) factors: it changes the images."""
    base = load_base_model("demo", torch.device("cpu"))
    torch.manual_seed(0)
    bl.get_peft_model(base.unet, bl.LoKrConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_weights=False))
    path = tmp_path_factory.mktemp("adapters") / "random.safetensors"
    bl.save_adapter(base.pipe, path)
    return path
