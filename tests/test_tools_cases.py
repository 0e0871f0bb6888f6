"""Shared builders for the tool tests (planted state dicts, tiny diffusers folders), and the tests of the
checkpoint reader and the streaming safetensors writer they rely on."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from beyondlora.tools.model_files import Checkpoint, StreamingWriter, TensorReader, read_header


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


# --------------------------------------------------------------------------------------------------------
def test_checkpoint_modules_and_geometry(tmp_path) -> None:
    path = save_state(state_of(planted_model()), tmp_path / "model.safetensors")
    checkpoint = Checkpoint(path)
    assert checkpoint.prefix == "lycoris"
    assert set(checkpoint.modules) == {"lin", "conv", "pw", "norm", "block.proj", "token_embedding"}
    kinds = {name: m.geometry.kind for name, m in checkpoint.modules.items()}
    assert kinds == {
        "lin": "linear",
        "conv": "conv",
        "pw": "conv",
        "norm": "layer_norm",
        "block.proj": "linear",
        "token_embedding": "embedding",
    }
    assert checkpoint.modules["token_embedding"].geometry.weight_shape == (24, 50)  # canonical = transpose
    assert checkpoint.modules["lin"].bias is not None and checkpoint.modules["pw"].bias is None
    with TensorReader() as reader:
        assert torch.equal(reader.get(checkpoint.modules["conv"].weight), load_file(path)["conv.weight"])


def test_checkpoint_pipeline_and_sd_single_file_names(tmp_path) -> None:
    folder = save_pipeline(tiny_unet(), tiny_text_encoder(), tmp_path / "pipe")
    checkpoint = Checkpoint(folder)
    assert checkpoint.prefix == "lora" and checkpoint.roots == ["te", "unet"]
    names = set(checkpoint.modules)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    # transformers 5 saves CLIP without the text_model level; the module names put it back
    assert "te.text_model.encoder.layers.0.self_attn.q_proj" in names
    sd = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 4, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(6, 4),
        "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3),
    }
    sd_checkpoint = Checkpoint(save_state(sd, tmp_path / "sd.safetensors"))
    assert set(sd_checkpoint.modules) == {
        "unet.input_blocks.1.1.proj_in",
        "te.text_model.encoder.layers.0.mlp.fc1",
    }  # the VAE is no module here: the tools copy it


def test_streaming_writer_reads_back_with_safetensors(tmp_path) -> None:
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.randn(7, dtype=torch.float64),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = StreamingWriter(tmp_path / "out.safetensors", layout, {"note": "streamed"})
    for key, value in tensors.items():
        writer.write(key, value)
    writer.close()
    back = load_file(tmp_path / "out.safetensors")
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata() == {"note": "streamed"}
    infos, metadata = read_header(tmp_path / "out.safetensors")  # and our own reader reads it back too
    assert list(infos) == list(tensors) and metadata == {"note": "streamed"}
    with TensorReader() as reader:
        for key, value in tensors.items():
            assert torch.equal(reader.get(infos[key]), value) and reader.get(infos[key]).dtype == value.dtype
