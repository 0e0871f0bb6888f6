"""Our single files record every module's path and layer, so converting one into a PEFT folder needs no base."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.errors import FormatError
from beyondlora.formats.layer_records import layer_record, standin_layer
from beyondlora.ops.geometry import LayerGeometry
from helpers.layer_cases import LAYERS


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_layer_record_rebuilds_the_same_geometry(kind: str) -> None:
    """Through JSON: kind, shape, bias, stride, padding (also "same"), dilation, groups, padding_mode, norm eps."""
    geometry = LayerGeometry.of(LAYERS[kind][0]())
    record = json.loads(json.dumps(layer_record(geometry)))
    layer = standin_layer(record, "here")
    assert LayerGeometry.of(layer) == geometry
    assert layer.weight.untyped_storage().nbytes() <= 8  # a zero-stride view: no memory


def test_a_malformed_record_names_where() -> None:
    with pytest.raises(FormatError, match="adapter.safetensors: lycoris_x"):
        standin_layer({"kind": "conv", "shape": [4, 2]}, "adapter.safetensors: lycoris_x")


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return model


def test_our_gpt2_ia3_file_becomes_a_peft_folder_without_the_base(tmp_path) -> None:
    """transformers' Conv1D layers with biases, (IA)³ with PEFT's meaning: file → folder from the file alone,
    and PEFT itself computes our outputs from that folder."""
    base = _gpt2()
    config = bl.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["mlp.c_proj"])
    ours = bl.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.normal_(std=0.1)
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(input_ids=tokens).logits
    source = tmp_path / "ia3.safetensors"
    with pytest.warns(UserWarning, match="scale_bias=True"):
        ours.save_pretrained(source)
    with safe_open(str(source), "pt") as handle:
        record = json.loads(handle.metadata()["beyondlora_modules"])["lycoris_transformer_h_0_attn_c_attn"]
    assert record["module"] == "transformer.h.0.attn.c_attn" and record["layer"]["kind"] == "hf_conv1d"
    assert main(["convert", str(source), str(tmp_path / "folder")]) == 0
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "folder").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_recorded_padding_mode_is_refused_for_a_folder(tmp_path, capsys) -> None:
    """The record keeps what a state dict cannot say (padding_mode), so the folder PEFT would misread is refused."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    wrapped = bl.get_peft_model(model, bl.LoraConfig(r=2, target_modules=["0"], init_weights=False))
    source = tmp_path / "reflect.safetensors"
    wrapped.save_pretrained(source)
    assert main(["convert", str(source), str(tmp_path / "folder")]) == 2
    assert "padding_mode='reflect'" in capsys.readouterr().err
    assert not (tmp_path / "folder" / "adapter_model.safetensors").exists()
