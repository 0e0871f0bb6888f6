"""Training LoRA, LoKr, LoHa and GLoRA through ``W + ΔW`` without the full-size weight gradient (ops.bypass_merged:
``merged_low_rank_linear``, ``merged_kron_linear``, ``merged_khatri_rao_linear``, ``merged_glora_linear``).

The combined path takes it for one such adapter on a linear-like layer when everything is in one dtype and
autocast is off; the cost model picks it over the bypass when it needs fewer multiply-adds (LoRA: when
``tokens · (in + out) > 2 · in · out``).  Its gradients equal finite differences, the bypass's, and an
explicit float64 formula.
"""

from __future__ import annotations

import pytest
import torch
from test_bypass_memory import _saved_by
from torch import nn

import beyondlora as bl
from beyondlora.ops.bypass_glora import merged_glora_linear
from beyondlora.ops.bypass_khatri_rao import merged_khatri_rao_linear
from beyondlora.ops.bypass_kron import merged_kron_linear
from beyondlora.ops.bypass_lowrank import merged_low_rank_linear
from helpers.layer_cases import DEVICE, layers_of

IN, OUT, RANK = 48, 40, 4
MANY = 64  # rows: 64 · (48 + 40) = 5632 > 2 · 48 · 40 = 3840, so the merged step is cheaper
FEW = 16


def _leaf(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias: bool) -> None:
    x, down, up = _leaf(2, 3, IN // 8), _leaf(2, IN // 8), _leaf(OUT // 8, 2)
    weight = torch.randn(OUT // 8, IN // 8, dtype=torch.float64)
    b = torch.randn(OUT // 8, dtype=torch.float64) if bias else None
    step = lambda xx, dd, uu: merged_low_rank_linear(xx, weight, b, dd, uu, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(step, (x, down, up))


@pytest.mark.parametrize("full_w2", [False, True], ids=["w2_decomposed", "w2_full"])
def test_kron_gradcheck(full_w2: bool) -> None:
    a, b, c, d, r = 2, 3, 3, 2, 2
    x, w1 = _leaf(2, 3, c * d), _leaf(a, c)
    w2_in, w2_out = (None, _leaf(b, d)) if full_w2 else (_leaf(r, d), _leaf(b, r))
    weight, bias = torch.randn(a * b, c * d, dtype=torch.float64), torch.randn(a * b, dtype=torch.float64)
    leaves = [t for t in (x, w1, w2_in, w2_out) if t is not None]

    def step(*args):
        xx, ww1, *rest = args
        win = None if full_w2 else rest.pop(0)
        return merged_kron_linear(xx, weight, bias, ww1, win, rest[0], 0.6)

    assert torch.autograd.gradcheck(step, leaves)


def test_khatri_rao_gradcheck() -> None:
    out, n, r = 4, 5, 2
    x, a1, b1, a2, b2 = _leaf(2, 3, n), _leaf(out, r), _leaf(r, n), _leaf(out, r), _leaf(r, n)
    weight, bias = torch.randn(out, n, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    step = lambda *t: merged_khatri_rao_linear(t[0], weight, bias, *t[1:], 1.3)  # noqa: E731
    assert torch.autograd.gradcheck(step, (x, a1, b1, a2, b2))


def test_glora_gradcheck() -> None:
    out, n, r = 4, 5, 2
    x, a1, a2, b1, b2 = _leaf(2, 3, n), _leaf(n, r), _leaf(r, n), _leaf(out, r), _leaf(r, n)
    weight, bias = torch.randn(out, n, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    step = lambda *t: merged_glora_linear(t[0], weight, bias, *t[1:], 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(step, (x, a1, a2, b1, b2))


def _model(config: bl.AdapterConfig, layer: str = "linear", dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    if layer == "hf_conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT, IN)
        nn.init.normal_(base.weight, std=0.2)
    else:
        base = nn.Linear(IN, OUT)
    return bl.get_peft_model(nn.Sequential(base).to(DEVICE, dtype), config)


def _step(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output, ∂x and the adapter's gradients of a training step on a fixed non-uniform loss."""
    torch.manual_seed(seed)  # the same rank-dropout draw on every call
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]


CONFIGS = {
    "lora": bl.LoraConfig(r=RANK, alpha=3.0, target_modules=["0"], init_weights=False),
    "rank_dropout": bl.LoraConfig(r=RANK, target_modules=["0"], init_weights=False, rank_dropout=0.5),
    "dylora": bl.DyLoraConfig(r=RANK, block_size=2, target_modules=["0"], init_weights=False),
    "lokr": bl.LoKrConfig(r=2, decompose_factor=4, target_modules=["0"], init_weights=False, rank_dropout=0.5),
    "lokr_full_w2": bl.LoKrConfig(r=16, target_modules=["0"], init_weights=False),
    "loha": bl.LoHaConfig(r=RANK, target_modules=["0"], init_weights=False, rank_dropout=0.5),
    "glora": bl.GLoRAConfig(r=RANK, alpha=3.0, target_modules=["0"], init_weights=False, rank_dropout=0.5),
}


@pytest.mark.parametrize("layer", ["linear", "hf_conv1d"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_auto_trains_merged_with_the_bypass_gradients(config: str, layer: str) -> None:
    model = _model(CONFIGS[config], layer)
    model.set_multiplier(0.7)
    model.train()
    (host,) = layers_of(model)
    x = torch.randn(2, MANY // 2, IN, dtype=torch.float64, device=DEVICE)
    assert host._path(x, ["default"]) == "merged"
    if config.startswith("lora") and DEVICE.type == "cpu":  # the threshold: 16 · 88 < 2 · 48 · 40 < 64 · 88
        assert host._path(x[:, : FEW // 2], ["default"]) == "bypass"  # (a GPU prices the bypass's work higher)
    adapter, calls = host.adapters["default"], []
    original = adapter.merged_step

    def counting(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    adapter.merged_step = counting
    merged = _step(model, x)
    del adapter.merged_step
    assert calls == [True]
    host.forward_mode = "bypass"
    bypass = _step(model, x)
    torch.testing.assert_close(merged[0], bypass[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(merged[1], bypass[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradients_equal_an_explicit_formula() -> None:
    """``y = x (W + t·s·up down)ᵀ + b``: autograd through that expression, written out here, in float64."""
    model = _model(CONFIGS["lora"])
    model.set_multiplier(0.7)
    model.train()
    (host,) = layers_of(model)
    adapter = host.adapters["default"]
    x = torch.randn(MANY, IN, dtype=torch.float64, device=DEVICE)
    out, grads = _step(model, x)
    leaves = [t.detach().clone().requires_grad_() for t in (x, adapter.lora_down, adapter.lora_up)]
    xx, down, up = leaves
    base = host.base_layer
    expected = xx @ (base.weight + 0.7 * (3.0 / RANK) * up @ down).t() + base.bias
    ramp = torch.linspace(-1, 1, expected.numel(), dtype=expected.dtype, device=DEVICE)
    (expected * ramp.reshape(expected.shape)).sum().backward()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12)


def test_saves_no_more_than_the_bypass() -> None:
    model = _model(CONFIGS["lora"], dtype=torch.float32)
    model.train()
    (host,) = layers_of(model)
    x = torch.randn(MANY, IN, device=DEVICE)
    params = tuple(model.parameters())
    merged = _saved_by(model, (x,), params)
    host.forward_mode = "bypass"
    bypass = _saved_by(model, (x,), params)
    assert x.numel() * x.element_size() <= merged <= bypass


def test_not_under_autocast_nor_on_a_16_bit_base() -> None:
    """``W + ΔW`` rounded to 16 bits would lose most of a small ΔW: the bypass trains there instead (or, where
    it is cheaper, autograd through ``W + ΔW`` in float32, cast by autocast like the base weight)."""
    model = _model(CONFIGS["lora"], dtype=torch.float32)
    model.train()
    (host,) = layers_of(model)
    adapters = list(host.adapters.values())
    x = torch.randn(MANY, IN, device=DEVICE)
    assert host._path(x, ["default"]) == "merged" and host._trains_merged(adapters, x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert not host._trains_merged(adapters, x)
        # a CPU keeps the bypass; a GPU prices it 128× at r = 4 and runs W + ΔW through autograd
        assert host._path(x, ["default"]) == ("bypass" if DEVICE.type == "cpu" else "combined")
    half = _model(CONFIGS["lora"], dtype=torch.bfloat16)
    (host,) = layers_of(half)
    assert not host._trains_merged(list(host.adapters.values()), x.to(torch.bfloat16))


def test_a_trainable_base_bias_keeps_its_gradient() -> None:
    """The merged step gives W and b no gradient: with b unfrozen the combined path's autograd runs instead."""
    model = _model(CONFIGS["lora"])
    model.train()
    (host,) = layers_of(model)
    x = torch.randn(MANY, IN, dtype=torch.float64, device=DEVICE)
    host.base_layer.bias.requires_grad_(True)
    assert not host._trains_merged(list(host.adapters.values()), x)
    host.forward_mode = "combined"
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(host.base_layer.bias.grad, 2 * out.detach().sum(0))
