"""Nothing a single file cannot hold is dropped: modules trained whole (``modules_to_save``) travel in the file
and come back on load, readers that cannot restore them refuse, and tensors of the wrong shape for their
role are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.errors import FormatError
from beyondlora.tools.inspect import inspect


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _trained(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = bl.get_peft_model(_base(), bl.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))  # adapter factors and the saved head both move
    path = tmp_path / "adapter.safetensors"
    model.save_pretrained(path)
    return model, path


def test_modules_to_save_travel_in_a_single_file(tmp_path: Path) -> None:
    model, path = _trained(tmp_path)
    x = torch.randn(5, 8)
    expected = model(x).detach()
    assert not torch.allclose(expected, _base()(x), atol=1e-3)  # the trained head matters
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["beyondlora_modules_to_save"]) == ["2"]
        assert {"beyondlora_saved.2.weight", "beyondlora_saved.2.bias"} <= set(handle.keys())
    reloaded = bl.PeftModel.from_pretrained(_base(), path)
    torch.testing.assert_close(reloaded(x), expected)
    assert reloaded.peft_config["default"].modules_to_save == ["2"]
    head = model.base_model[2].modules_to_save["default"]
    saved = inspect(path)["totals"]["modules_to_save"]
    assert saved == {"2": head.weight.numel() + head.bias.numel()}


def test_a_saved_module_that_does_not_fit_is_named(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    tensors = load_file(path)
    tensors["beyondlora_saved.2.weight"] = torch.zeros(4, 15)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata)
    base = _base()
    with pytest.raises(FormatError, match=r"beyondlora_saved\.2\.weight.* shape \(4, 15\), expected \(4, 16\)"):
        bl.PeftModel.from_pretrained(base, tmp_path / "bad.safetensors")
    assert isinstance(base[0], nn.Linear) and isinstance(base[2], nn.Linear)  # untouched


def test_a_pipeline_refuses_a_file_with_saved_modules(tmp_path: Path) -> None:
    pipe = bl.tiny_sd_pipeline()
    unet = bl.get_peft_model(pipe.unet, bl.LoraConfig(r=2, target_modules=["to_q"]))
    file = tmp_path / "unet.safetensors"
    unet.save_pretrained(file, prefix="lora_unet")
    tensors = load_file(file)
    tensors["beyondlora_saved.conv_out.weight"] = torch.zeros(1)
    save_file(tensors, str(file), {"beyondlora_modules_to_save": '["conv_out"]'})
    with pytest.raises(FormatError, match="modules_to_save"):
        bl.load_adapter(bl.tiny_sd_pipeline(), file)


@pytest.mark.parametrize(
    "key, bad, message",
    [
        ("lycoris_0.alpha", torch.ones(3, 3, 3), r"alpha has shape \(3, 3, 3\), expected \(\)"),
        ("lycoris_0.dora_scale", torch.ones(5, 1), r"dora_scale has shape \(5, 1\), expected 16 .* or 8"),
    ],
)
def test_a_tensor_of_the_wrong_shape_for_its_role_is_named(tmp_path: Path, key: str, bad, message: str) -> None:
    model = bl.get_peft_model(_base(), bl.LoraConfig(r=2, target_modules=["0"]))
    path = tmp_path / "adapter.safetensors"
    model.save_pretrained(path)
    tensors = load_file(path)
    tensors[key] = bad
    save_file(tensors, str(path))
    base = _base()
    with pytest.raises(FormatError, match=message) as error:
        bl.PeftModel.from_pretrained(base, path)
    assert str(path) in str(error.value) and "lycoris_0" in str(error.value)
    assert isinstance(base[0], nn.Linear)


def test_ia3_on_input_must_be_one_flag(tmp_path: Path) -> None:
    model = bl.get_peft_model(_base(), bl.IA3Config(target_modules=["0"]))
    path = tmp_path / "ia3.safetensors"
    model.save_pretrained(path)
    tensors = load_file(path)
    tensors["lycoris_0.on_input"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"on_input has shape \(2,\), expected \(\)"):
        bl.PeftModel.from_pretrained(_base(), path)


def test_tools_keep_or_refuse_saved_modules(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    assert main(["resize", str(path), str(tmp_path / "small.safetensors"), "--rank", "1"]) == 0
    x = torch.randn(3, 8)
    small = bl.PeftModel.from_pretrained(_base(), tmp_path / "small.safetensors")
    full = bl.PeftModel.from_pretrained(_base(), path)
    head, small_head = full.base_model[2].modules_to_save["default"], small.base_model[2].modules_to_save["default"]
    torch.testing.assert_close(small_head.weight, head.weight)  # the saved head travels through resize
    assert small(x).shape == full(x).shape
