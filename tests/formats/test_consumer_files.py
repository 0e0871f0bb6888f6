"""Files the real consumers apply exactly, or a save that says which consumer will not: our single files run
through ComfyUI's and AUTOMATIC1111's documented conventions (tests/helpers/ui_formula.py, written from the
facts measured with their loader code) against our own ΔW."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import beyondlora as bl
from beyondlora.errors import FormatError
from beyondlora.formats.single_file import group_by_module
from beyondlora.host.layers import AdapterLayer
from helpers.ui_formula import a1111_delta, comfyui_delta, ui_delta

TARGETS = ["conv", "lin"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.lin = nn.Linear(64, 48)


def _saved(config, tmp_path: Path, **save) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = bl.get_peft_model(Net(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dora_scale" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))
    path = tmp_path / "adapter.safetensors"
    model.save_pretrained(path, **save)
    return model, group_by_module(load_file(path))


def _ours(model: nn.Module, name: str) -> torch.Tensor:
    layer: AdapterLayer = model.base_model.get_submodule(name)
    weight = layer.geometry.canonical_weight(layer.base_layer).detach().double()
    layer.adapters["default"].double()
    bias = layer.base_layer.bias.detach().double()
    return layer.effective_delta("default", weight, base_bias=bias)[0]


EXACT_EVERYWHERE = {
    "lora": bl.LoraConfig(r=4, alpha=2, target_modules=TARGETS, init_weights=False),
    "lora-tucker": bl.LoraConfig(r=4, alpha=2, use_effective_conv2d=True, target_modules=TARGETS, init_weights=False),
    "loha": bl.LoHaConfig(r=4, alpha=2, target_modules=TARGETS, init_weights=False),
    "loha-tucker": bl.LoHaConfig(r=4, alpha=2, use_effective_conv2d=True, target_modules=TARGETS, init_weights=False),
    "lokr": bl.LoKrConfig(r=2, alpha=1, target_modules=TARGETS, init_weights=False),
    "lokr-tucker": bl.LoKrConfig(r=2, alpha=1, use_effective_conv2d=True, target_modules=TARGETS, init_weights=False),
    "full": bl.FullConfig(target_modules=TARGETS, init_weights=False),
    "oft": bl.OFTConfig(r=4, target_modules=TARGETS, init_weights=False),
    "boft-rescaled": bl.BOFTConfig(r=8, rescaled=True, target_modules=TARGETS, init_weights=False),
    "dora-input-axis": bl.LoraConfig(
        r=4, alpha=2, use_dora=True, dora_on_output=False, target_modules=TARGETS, init_weights=False
    ),
}


@pytest.mark.parametrize("case", sorted(EXACT_EVERYWHERE))
def test_comfyui_and_a1111_apply_our_file_exactly(case: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no caveat to report
        model, grouped = _saved(EXACT_EVERYWHERE[case], tmp_path)
    assert not any("lokr_t2" in params for params in grouped.values())  # ComfyUI cannot apply lokr_t2
    for name in TARGETS:
        params = grouped[f"lycoris_{name}"]
        weight = model.base_model.get_submodule(name).base_layer.weight.detach().double()
        ours = _ours(model, name)
        for consumer in (ui_delta, comfyui_delta, a1111_delta):
            delta, _ = consumer(params, weight.clone())
            torch.testing.assert_close(delta.reshape(ours.shape), ours, rtol=1e-5, atol=1e-6, msg=consumer.__name__)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (bl.LoraConfig(r=4, use_dora=True, target_modules=TARGETS, init_weights=False), "output-axis DoRA"),
        (bl.IA3Config(target_modules=TARGETS, init_weights=False, scale_bias=False), "ComfyUI has no (IA)³ adapter"),
        (bl.IA3Config(target_modules=TARGETS, init_weights=False), "LyCORIS leaves the bias unchanged"),
        (bl.OFTConfig(r=4, constraint=1e-3, target_modules=TARGETS, init_weights=False), "caps the rotation"),
        (bl.BOFTConfig(r=8, constraint=1e-3, target_modules=TARGETS, init_weights=False), "caps the rotation"),
    ],
)
def test_files_the_uis_apply_otherwise_warn_or_refuse(config, fragment: str, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"will not apply this file exactly: 2 module\(s\)") as caught:
        model, grouped = _saved(config, tmp_path)
    assert fragment in str(caught[0].message) and "as_difference=True" in str(caught[0].message)
    conv = model.base_model.conv.base_layer.weight.detach().double()
    ours = _ours(model, "conv")
    what_they_do = [comfyui_delta(grouped["lycoris_conv"], conv.clone())[0]]
    if "dora_scale" in grouped["lycoris_conv"]:
        what_they_do.append(a1111_delta(grouped["lycoris_conv"], conv.clone())[0])
    for delta in what_they_do:  # the caveat is real: the UI's ΔW is not ours
        assert (delta.reshape(ours.shape) - ours).norm() > 1e-3 * ours.norm()
    with pytest.raises(FormatError, match="strict=True"):
        _saved(config, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "adapter.safetensors").exists()


def test_text_encoder_norms_warn_for_comfyui(tmp_path: Path) -> None:
    pipe = bl.tiny_sd_pipeline()
    bl.get_peft_model(pipe.text_encoder, bl.NormConfig())
    with pytest.warns(UserWarning, match="ComfyUI skips text-encoder norm keys"):
        bl.save_adapter(pipe, tmp_path / "norms.safetensors")
    with pytest.raises(FormatError, match="text-encoder norm"):
        bl.save_adapter(pipe, tmp_path / "strict.safetensors", strict=True)
    assert not (tmp_path / "strict.safetensors").exists()


AS_DIFFERENCE = {
    "dora-output-axis": (bl.LoraConfig(r=4, use_dora=True, target_modules=TARGETS, init_weights=False), 1.0),
    "ia3": (bl.IA3Config(target_modules=TARGETS, init_weights=False), 1.0),
    "oft-constraint": (bl.OFTConfig(r=4, constraint=1e-3, target_modules=TARGETS, init_weights=False), 1.0),
    "dora-at-0.7": (bl.LoraConfig(r=4, use_dora=True, target_modules=TARGETS, init_weights=False), 0.7),
    "boft-at-0.7": (bl.BOFTConfig(r=8, rescaled=True, target_modules=TARGETS, init_weights=False), 0.7),
}


@pytest.mark.parametrize("case", sorted(AS_DIFFERENCE))
def test_as_difference_writes_what_every_ui_applies_exactly(case: str, tmp_path: Path) -> None:
    """Modules the UIs would apply otherwise, or whose own form cannot hold the multiplier, are written as
    their change t · (W' − W): every consumer's ΔW is then ours, and the file reloads to the same outputs."""
    config, multiplier = AS_DIFFERENCE[case]
    torch.manual_seed(0)
    model = bl.get_peft_model(Net(), config)
    model.set_multiplier(multiplier)
    if multiplier != 1.0:  # the module's own form refuses, and says what would hold it
        with pytest.raises(FormatError, match="as_difference=True"):
            model.save_pretrained(tmp_path / "own.safetensors")
    path = tmp_path / "adapter.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left for the UIs to get wrong
        model.save_pretrained(path, as_difference=True)
    grouped = group_by_module(load_file(path))
    for name in TARGETS:
        assert set(grouped[f"lycoris_{name}"]) == {"diff", "diff_b"}
        weight = model.base_model.get_submodule(name).base_layer.weight.detach().double()
        layer: AdapterLayer = model.base_model.get_submodule(name)
        ours = layer.effective_delta("default", layer.base_weight(), base_bias=layer.base_bias())[0].detach().double()
        for consumer in (ui_delta, comfyui_delta, a1111_delta):
            delta, _ = consumer(grouped[f"lycoris_{name}"], weight.clone())
            torch.testing.assert_close(delta.reshape(ours.shape), ours, rtol=1e-5, atol=1e-6, msg=consumer.__name__)
    x = {"conv": torch.randn(2, 64, 8, 8), "lin": torch.randn(3, 64)}
    torch.manual_seed(0)
    reloaded = bl.PeftModel.from_pretrained(Net(), path)
    for name in TARGETS:
        live = model.base_model.get_submodule(name)(x[name])
        torch.testing.assert_close(reloaded.base_model.get_submodule(name)(x[name]), live, rtol=1e-5, atol=1e-5)
