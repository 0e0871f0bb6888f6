"""The checkpoint reader and the streaming safetensors writer (tools/model_files.py) the tool tests rely on."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from beyondlora.tools.model_files import Checkpoint, StreamingWriter, TensorReader, read_header
from helpers.tool_cases import planted_model, save_pipeline, save_state, state_of, tiny_text_encoder, tiny_unet


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
