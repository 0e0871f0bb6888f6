"""The cost model's device pricing and memory setting, and output-side (IA)³ run from the bias-free base op.

- On an accelerator the bypass's work at rank r is priced ``ACCELERATOR_BALANCE / r`` full-size multiply-adds,
  so rebuilding ``W + ΔW`` wins there on layers where the CPU keeps the bypass, unless the rank is large.
  The choice is remembered per device type (a ``meta`` input stands for a non-CPU device here).
- ``backward_memory="lean"`` never trains through the combined path's full-size ``W + ΔW`` (autograd would
  keep it for backward), in inference it still may.
- Output-side (IA)³ on a plain linear or convolution with a bias runs the base op without its bias and adds
  the bias after scaling; its output and gradients equal ``(W ⊙ (1 + t·v)) x + b`` written out in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondlora as bl
from beyondlora.cost_model import ACCELERATOR_BALANCE, rank_work_price
from layer_cases import DEVICE, layers_of


def _conv_lora() -> tuple[nn.Module, bl.AdapterLayer]:
    torch.manual_seed(0)
    model = bl.get_peft_model(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)), bl.LoraConfig(r=4, target_modules=["0"]))
    model.train()
    return model, layers_of(model)[0]


def test_prices() -> None:
    assert rank_work_price("cpu") == rank_work_price("cpu", 8) == 1.0
    assert rank_work_price("cuda", 8) == rank_work_price("xpu", 8) == ACCELERATOR_BALANCE / 8 == 64.0
    assert rank_work_price("cuda") == ACCELERATOR_BALANCE  # elementwise work ((IA)³)
    assert rank_work_price("cuda", 4096) == 1.0


def test_an_accelerator_rebuilds_where_the_cpu_keeps_the_bypass() -> None:
    """LoRA r=4 on a 16-channel 3×3 conv, 512 positions, training: the bypass does 512 · 4 · (144 + 16) =
    0.33 M multiply-adds, W + ΔW's forward and weight gradient 16 · 144 · 4 + 512 · 16 · 144 = 1.19 M."""
    _, layer = _conv_lora()
    x = torch.randn(2, 16, 16, 16)
    assert layer._use_bypass(x, ["default"])
    assert not layer._use_bypass(x.to("meta"), ["default"])  # priced ×128 at r = 4: 42 M against 1.19 M
    assert layer._use_bypass(x, ["default"])  # the CPU's choice is still its own


def test_a_large_rank_keeps_the_bypass_on_an_accelerator() -> None:
    """r = 256 on a 512-wide linear, 64 rows: the bypass does 64 · 256 · 1024 = 16.8 M multiply-adds priced ×2,
    W + ΔW's rebuild and weight gradient 512 · 512 · 256 + 64 · 512 · 512 = 83.9 M (r = 8: 0.5 M ×64 against
    18.9 M, the combined path)."""
    for rank, bypass in ((256, True), (8, False)):
        torch.manual_seed(0)
        config = bl.LoraConfig(r=rank, target_modules=["0"], dropout=0.1)  # input dropout: no merged step
        (layer,) = layers_of(bl.get_peft_model(nn.Sequential(nn.Linear(512, 512)), config))
        x = torch.empty(64, 512, device="meta")
        assert layer._bypass_cheaper(list(layer.adapters.values()), x, 64, grad=True) is bypass


def test_lean_memory_never_trains_through_the_full_size_combined_weight() -> None:
    _, layer = _conv_lora()
    x = torch.randn(2, 16, 16, 16, device="meta")
    layer.backward_memory = "lean"
    assert layer._use_bypass(x, ["default"])
    with torch.no_grad():  # nothing is kept for backward: the cheaper path
        assert not layer._use_bypass(x, ["default"])
    layer.backward_memory = "auto"
    assert not layer._use_bypass(x, ["default"])


def test_lean_memory_still_takes_the_merged_step() -> None:
    """The merged step keeps x only, so "lean" allows it (LoRA r=4 on 48 → 40, 64 rows)."""
    torch.manual_seed(0)
    model = bl.get_peft_model(
        nn.Sequential(nn.Linear(48, 40)), bl.LoraConfig(r=4, target_modules=["0"], backward_memory="lean")
    )
    model.train()
    (layer,) = layers_of(model)
    assert not layer._use_bypass(torch.randn(64, 48), ["default"])


class _Subclassed(nn.Linear):
    """A linear whose forward is its own (as in quantized or patched layers): its base call must run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(6, 5)
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias)
    return layer


BASES = {
    "linear": (lambda: nn.Linear(5, 6), (3, 4, 5), True),
    "hf_conv1d": (_hf_conv1d, (3, 4, 5), True),
    "conv2d": (lambda: nn.Conv2d(5, 6, 3, padding=1, padding_mode="reflect"), (2, 5, 4, 4), True),
    "subclassed": (lambda: _Subclassed(5, 6), (3, 4, 5), False),
}


def _reference(base: nn.Module, kind: str, x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """``(W ⊙ (1 + t v)) x + b``: the output rows of W scaled, the bias not."""
    if kind == "hf_conv1d":
        return x @ (base.weight * (1 + t * v)[None, :]) + base.bias
    if kind == "conv2d":
        weight = base.weight * (1 + t * v)[:, None, None, None]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        return nn.functional.conv2d(padded, weight, base.bias)
    return x @ (base.weight * (1 + t * v)[:, None]).t() + base.bias


def test_a_hooked_base_layer_is_called() -> None:
    """A hook on the base layer (the old ``weight_norm`` sets the weight in one) keeps the base layer's call."""
    torch.manual_seed(0)
    model = bl.get_peft_model(nn.Sequential(nn.Linear(5, 6)), bl.IA3Config(target_modules=["0"]))
    (layer,) = layers_of(model)
    layer.forward_mode = "bypass"
    calls = []
    layer.base_layer.register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.randn(3, 5))
    assert calls == [1]


@pytest.mark.parametrize("kind", list(BASES))
def test_output_side_ia3_with_a_bias_equals_the_formula(kind: str) -> None:
    make, shape, bias_free_call = BASES[kind]
    torch.manual_seed(0)
    model = bl.get_peft_model(nn.Sequential(make()).to(DEVICE, torch.float64), bl.IA3Config(target_modules=["0"]))
    model.set_multiplier(0.7)
    model.train()
    (layer,) = layers_of(model)
    layer.forward_mode = "bypass"  # (a GPU's cost model may rebuild W ⊙ (1 + t·v) instead)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.weight.normal_()
    base_calls, forward = [], layer.base_layer.forward

    def counted(*args):  # an instance attribute: the module's call runs it, its class stays as it was
        base_calls.append(1)
        return forward(*args)

    layer.base_layer.forward = counted
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = model(x)
    ramp = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=DEVICE).reshape(out.shape)
    (out * ramp).sum().backward()
    assert len(base_calls) == (0 if bias_free_call else 1)

    xx = x.detach().clone().requires_grad_()
    v = adapter.weight.detach().clone().requires_grad_()
    expected = _reference(layer.base_layer, kind, xx, v, 0.7)
    (expected * ramp).sum().backward()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xx.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.weight.grad, v.grad, rtol=1e-10, atol=1e-12)
