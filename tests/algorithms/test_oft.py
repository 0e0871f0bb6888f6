"""Diag-OFT and BOFT against the installed LyCORIS (``DiagOFTModule``, ``ButterflyOFTModule``) both ways through
single files, the multiplier's meaning, the bias, and every refusal (DoRA, impossible sizes, strength ≠ 1
files, PEFT folders, bad file shapes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft as hf_peft
import pytest
import torch
import torch.nn.functional as F
from lycoris import create_lycoris_from_weights
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import beyondlora as bl
from beyondlora.algorithms.config_base import build_config
from beyondlora.errors import FormatError
from beyondlora.host.layers import AdapterLayer
from helpers.reference import reference_delta

LAYERS = {"linear": lambda: nn.Linear(64, 128), "conv2d": lambda: nn.Conv2d(32, 64, 3, padding=1)}
THEIRS = {"oft": DiagOFTModule, "boft": ButterflyOFTModule}
CONFIGS = {"oft": bl.OFTConfig, "boft": bl.BOFTConfig}
OPTIONS = [{}, {"constraint": 1e-3}, {"rescaled": True}, {"constraint": 1e-3, "rescaled": True}]
CASES = [(a, layer, o) for a in THEIRS for layer in LAYERS for o in OPTIONS]
IDS = [f"{a}-{layer}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}" for a, layer, o in CASES]
RTOL, ATOL = 1e-5, 1e-6


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _holder(layer: str) -> Holder:
    torch.manual_seed(0)
    holder = Holder(LAYERS[layer]()).eval()
    with torch.no_grad():
        holder.layer.bias.normal_()  # a bias worth rotating, if anything did
    return holder


def _input(layer: str) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((3, 5, 64) if layer == "linear" else (2, 32, 6, 6), generator=generator)


def _randomize(params: dict[str, nn.Parameter]) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("rescale"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("oft_blocks"):
                param.normal_(0.0, 0.1)


def _lycoris_module(algo: str, holder: Holder, options: dict) -> nn.Module:
    module = THEIRS[algo]("lycoris_layer", holder.layer, 1.0, lora_dim=4, **options)
    _randomize(dict(module.named_parameters()))
    return module


def _ours(peft: bl.PeftModel) -> tuple[Tensor, Tensor]:
    """``(ΔW, W)`` of the adapter on ``layer``, in its weight's shape."""
    layer: AdapterLayer = peft.base_model.layer
    weight = layer.base_layer.weight.detach()
    with torch.no_grad():
        delta = layer.adapters["default"].delta_weight(layer.geometry.canonical_weight(layer.base_layer).detach())
    return delta.reshape(weight.shape), weight


@pytest.mark.parametrize("algo, layer, options", CASES, ids=IDS)
def test_lycoris_file_gives_lycoris_delta(algo: str, layer: str, options: dict, tmp_path: Path) -> None:
    holder = _holder(layer)
    theirs = _lycoris_module(algo, holder, options)
    expected = theirs.get_diff_weight(1.0)[0].detach()
    assert expected.abs().max() > 1e-3  # not vacuous
    path = tmp_path / "theirs.safetensors"
    save_file({f"lycoris_layer.{k}": v.detach().float().contiguous() for k, v in theirs.state_dict().items()}, path)
    peft = bl.PeftModel.from_pretrained(copy.deepcopy(holder), path)
    assert peft.base_model.layer.adapters["default"].algorithm == algo
    delta, _ = _ours(peft)
    torch.testing.assert_close(delta, expected.reshape(delta.shape), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("algo, layer, options", CASES, ids=IDS)
def test_our_file_gives_our_delta_in_lycoris(algo: str, layer: str, options: dict, tmp_path: Path) -> None:
    holder = _holder(layer)
    peft = bl.get_peft_model(copy.deepcopy(holder), CONFIGS[algo](r=4, target_modules=["layer"], **options))
    _randomize(dict(peft.named_parameters()))
    delta, _ = _ours(peft)
    path = tmp_path / "ours.safetensors"
    peft.save_pretrained(path)
    network, _ = create_lycoris_from_weights(1.0, str(path), copy.deepcopy(holder))
    (theirs,) = network.loras
    assert isinstance(theirs, THEIRS[algo])
    torch.testing.assert_close(
        theirs.get_diff_weight(1.0)[0].detach().reshape(delta.shape), delta, rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("algo, rescaled", [("oft", False), ("boft", False), ("boft", True)])
def test_strength_is_linear_and_lycoris_blends_rotations(algo: str, rescaled: bool) -> None:
    """Ours at strength 0.5 is W + 0.5 · (W' − W) (ComfyUI's meaning); LyCORIS blends each rotation with I,
    which is the same for OFT without rescale only (its ``get_diff_weight(0.5)`` raises for a rescaled OFT
    conv)."""
    holder = _holder("conv2d")
    theirs = _lycoris_module(algo, holder, {"rescaled": rescaled})
    path_state = {k: v.detach() for k, v in theirs.state_dict().items()}
    peft = bl.get_peft_model(copy.deepcopy(holder), CONFIGS[algo](r=4, rescaled=rescaled, target_modules=["layer"]))
    with torch.no_grad():
        for name, param in peft.base_model.layer.adapters["default"].named_parameters():
            param.copy_(path_state[name].reshape(param.shape))
    peft.set_multiplier(0.5)
    x = _input("conv2d")
    base = holder.layer
    full = theirs.get_diff_weight(1.0)[0].detach()
    with torch.no_grad():
        expected = F.conv2d(x, base.weight + 0.5 * full, base.bias, padding=1)
        torch.testing.assert_close(peft(x), expected, rtol=RTOL, atol=ATOL)
    blended = theirs.get_diff_weight(0.5)[0].detach()
    gap = float((blended - 0.5 * full).norm() / full.norm())
    if algo == "oft" and not rescaled:
        assert gap < 1e-6
    else:
        assert gap > 1e-3  # documented: LyCORIS' strength is another function


@pytest.mark.parametrize("algo", ["oft", "boft"])
@pytest.mark.parametrize("mode", ["bypass", "combined"])
def test_bias_is_not_rotated(algo: str, mode: str) -> None:
    holder = _holder("linear")
    peft = bl.get_peft_model(copy.deepcopy(holder), CONFIGS[algo](r=4, target_modules=["layer"], forward_mode=mode))
    _randomize(dict(peft.named_parameters()))
    adapter = peft.base_model.layer.adapters["default"]
    weight, bias = holder.layer.weight.detach(), holder.layer.bias.detach()
    delta = reference_delta(adapter, weight).float()
    x = _input("linear")
    with torch.no_grad():
        torch.testing.assert_close(peft(x), F.linear(x, weight + delta, bias), rtol=RTOL, atol=ATOL)
        # rotating the bias too (LyCORIS' bypass) would move every output by M b − b: measurably different
        bias_shift = reference_delta(adapter, bias.reshape(-1, 1)).float().flatten()
        assert bias_shift.abs().max() > 1e-2
        assert not torch.allclose(peft(x), F.linear(x, weight + delta, bias + bias_shift), atol=1e-3)


# --- refusals ------------------------------------------------------------------------------------------
def test_dora_is_refused() -> None:
    with pytest.raises(ValueError, match="use_dora does not apply to algorithm oft"):
        build_config("oft", target_modules=["layer"], use_dora=True)
    with pytest.raises(TypeError):
        bl.BOFTConfig(use_dora=True)  # type: ignore[call-arg]


def test_dora_scale_in_file_is_refused(tmp_path: Path) -> None:
    holder = _holder("linear")
    path = tmp_path / "dora.safetensors"
    blocks = torch.zeros(32, 4, 4)
    save_file({"lycoris_layer.oft_blocks": blocks, "lycoris_layer.dora_scale": torch.ones(128, 1)}, path)
    with pytest.raises(FormatError, match="lycoris_layer.*no DoRA"):
        bl.PeftModel.from_pretrained(holder, path)


def test_impossible_boft_size_names_layer_and_r() -> None:
    holder = Holder(nn.Linear(8, 12))
    with pytest.raises(ValueError, match=r"12 outputs with r=4"):
        bl.get_peft_model(holder, bl.BOFTConfig(r=4, target_modules=["layer"]))
    assert isinstance(holder.layer, nn.Linear)
    with pytest.raises(ValueError, match=r"boft_m must be in 1\.\.5"):
        bl.get_peft_model(Holder(nn.Linear(8, 64)), bl.BOFTConfig(r=4, boft_m=6, target_modules=["layer"]))


def test_oft_block_size_must_divide_out() -> None:
    with pytest.raises(ValueError, match="oft_block_size 5 does not divide the layer's 128 outputs"):
        bl.get_peft_model(_holder("linear"), bl.OFTConfig(oft_block_size=5, target_modules=["layer"]))
    peft = bl.get_peft_model(_holder("linear"), bl.OFTConfig(oft_block_size=16, target_modules=["layer"]))
    assert tuple(peft.base_model.layer.adapters["default"].oft_blocks.shape) == (8, 16, 16)


def test_multiplier_file_refused_and_nothing_written(tmp_path: Path) -> None:
    peft = bl.get_peft_model(_holder("linear"), bl.BOFTConfig(r=4, target_modules=["layer"]))
    peft.set_multiplier(0.5)
    with pytest.raises(FormatError, match="multiplier ≠ 1 cannot be written exactly"):
        peft.save_pretrained(tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_peft_folders_are_refused_both_ways(algo: str, tmp_path: Path) -> None:
    peft = bl.get_peft_model(_holder("linear"), CONFIGS[algo](r=4, target_modules=["layer"]))
    with pytest.raises(FormatError, match="rotate the layer's input"):
        peft.save_pretrained(tmp_path / "ours")
    theirs_config = (
        hf_peft.OFTConfig(r=0, oft_block_size=8, target_modules=["layer"])
        if algo == "oft"
        else hf_peft.BOFTConfig(boft_block_size=4, target_modules=["layer"])
    )
    with pytest.warns(UserWarning) if algo == "boft" else _nothing():
        theirs = hf_peft.get_peft_model(_holder("linear"), theirs_config)
    theirs.save_pretrained(tmp_path / "theirs")
    holder = _holder("linear")
    with pytest.raises(FormatError, match="rotate the layer's input"):
        bl.PeftModel.from_pretrained(holder, tmp_path / "theirs")
    assert isinstance(holder.layer, nn.Linear)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    "tensors, fragment",
    [
        ({"oft_blocks": torch.zeros(16, 4, 3)}, r"oft_blocks has shape \(16, 4, 3\)"),
        (
            {"oft_blocks": torch.zeros(16, 4, 4)},
            r"oft_blocks has shape \(16, 4, 4\), expected \(n, b, b\) with n·b = 128",
        ),
        ({"oft_blocks": torch.zeros(2, 16, 4, 4)}, r"oft_blocks has shape \(2, 16, 4, 4\), expected \(m, n, b, b\)"),
        ({"oft_blocks": torch.zeros(9, 32, 4, 4)}, r"1\.\.6 stages"),
        ({"oft_blocks": torch.zeros(32, 4, 4), "rescale": torch.ones(64, 1)}, r"rescale has shape \(64, 1\)"),
    ],
)
def test_bad_file_shapes_name_module_key_and_shape(tensors: dict, fragment: str, tmp_path: Path) -> None:
    holder = _holder("linear")
    before = copy.deepcopy(holder.state_dict())
    path = tmp_path / "bad.safetensors"
    save_file({f"lycoris_layer.{k}": v for k, v in tensors.items()}, path)
    with pytest.raises(FormatError, match=f"lycoris_layer.*{fragment}"):
        bl.PeftModel.from_pretrained(holder, path)
    assert isinstance(holder.layer, nn.Linear)
    for key, value in holder.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("algo, name", [("oft", "diag-oft"), ("boft", "boft")])
def test_kohya_metadata_names_the_lycoris_algo_and_its_args(algo: str, name: str, tmp_path: Path) -> None:
    config = CONFIGS[algo](r=4, constraint=0.01, rescaled=True, target_modules=["layer"])
    peft = bl.get_peft_model(_holder("linear"), config)
    path = tmp_path / "a.safetensors"
    peft.save_pretrained(path)
    with safe_open(str(path), "pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert args == {"algo": name, "constraint": "0.01", "rescaled": "true"}


def test_blocks_of_one_are_named_as_an_option_without_effect() -> None:
    """LyCORIS' factorization of 4 outputs with r = 4 gives blocks of 1: Q = B − Bᵀ = 0, no rotation."""
    peft = bl.get_peft_model(Holder(nn.Linear(8, 4)), bl.OFTConfig(r=4, target_modules=["layer"]))
    assert "blocks of 1" in peft.base_model.layer.adapters["default"].unused_options()["r"]
    peft = bl.get_peft_model(Holder(nn.Linear(8, 4)), bl.OFTConfig(r=2, target_modules=["layer"]))
    assert peft.base_model.layer.adapters["default"].unused_options() == {}
