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

import copy

import pytest
import torch
from torch import nn

import beyondlora as bl
from beyondlora.host.cost_model import ACCELERATOR_BALANCE, rank_work_price
from beyondlora.ops.geometry import LayerGeometry
from helpers.layer_cases import DEVICE, layers_of


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
    assert layer._path(x, ["default"]) == "bypass"
    assert layer._path(x.to("meta"), ["default"]) != "bypass"  # priced ×128 at r = 4: 42 M against 1.19 M
    assert layer._path(x, ["default"]) == "bypass"  # the CPU's choice is still its own


def test_a_large_rank_keeps_the_bypass_on_an_accelerator() -> None:
    """r = 256 on a 512-wide linear, 64 rows: the bypass does 64 · 256 · 1024 = 16.8 M multiply-adds priced ×2,
    W + ΔW's rebuild and weight gradient 512 · 512 · 256 + 64 · 512 · 512 = 83.9 M (r = 8: 0.5 M ×64 against
    18.9 M, the combined path)."""
    for rank, bypass in ((256, True), (8, False)):
        torch.manual_seed(0)
        config = bl.LoraConfig(r=rank, target_modules=["0"], dropout=0.1)  # input dropout: no merged step
        (layer,) = layers_of(bl.get_peft_model(nn.Sequential(nn.Linear(512, 512)), config))
        assert layer._bypass_cheaper(list(layer.adapters.values()), "cuda", 64, grad=True, merged_step=False) is bypass


def test_lean_memory_never_trains_through_the_full_size_combined_weight() -> None:
    _, layer = _conv_lora()
    x = torch.randn(2, 16, 16, 16, device="meta")
    layer.backward_memory = "lean"
    assert layer._path(x, ["default"]) == "bypass"
    with torch.no_grad():  # nothing is kept for backward: the cheaper path
        assert layer._path(x, ["default"]) != "bypass"
    layer.backward_memory = "auto"
    assert layer._path(x, ["default"]) != "bypass"


def test_lean_memory_still_takes_the_merged_step() -> None:
    """The merged step keeps x only, so "lean" allows it (LoRA r=4 on 48 → 40, 64 rows)."""
    torch.manual_seed(0)
    model = bl.get_peft_model(
        nn.Sequential(nn.Linear(48, 40)), bl.LoraConfig(r=4, target_modules=["0"], backward_memory="lean")
    )
    model.train()
    (layer,) = layers_of(model)
    assert layer._path(torch.randn(64, 48), ["default"]) == "merged"


def test_the_remembered_choice_follows_what_the_merged_step_needs() -> None:
    """The merged step needs a frozen W and b: unfreezing b after a first forward changes the choice ("lean"
    then keeps the bypass rather than autograd's full-size W + ΔW)."""
    torch.manual_seed(0)
    model = bl.get_peft_model(
        nn.Sequential(nn.Linear(48, 40)), bl.LoraConfig(r=4, target_modules=["0"], backward_memory="lean")
    )
    model.train()
    (layer,) = layers_of(model)
    x = torch.randn(64, 48)
    assert layer._path(x, ["default"]) == "merged"
    layer.base_layer.bias.requires_grad_(True)
    assert layer._path(x, ["default"]) == "bypass"
    layer.base_layer.bias.requires_grad_(False)
    model.double()  # the merged step wants x, W and the factors in one dtype
    assert layer._path(x, ["default"]) == "bypass"
    assert layer._path(x.double(), ["default"]) == "merged"


def test_input_dropout_with_adapters_the_bypass_cannot_compute_is_an_error() -> None:
    """Input dropout exists on the bypass only; (IA)³ on both sides of one layer has no exact bypass."""
    torch.manual_seed(0)
    model = bl.get_peft_model(nn.Sequential(nn.Linear(6, 5)), bl.LoraConfig(r=2, target_modules=["0"], dropout=0.1))
    model.add_adapter("inputs", bl.IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    model.add_adapter("outputs", bl.IA3Config(target_modules=["0"]))
    model.set_adapter(["default", "inputs", "outputs"])
    model.train()
    with pytest.raises(ValueError, match="input dropout trains on the bypass only"):
        model(torch.randn(3, 6))
    model.eval()  # no dropout in eval: the combined path computes the three exactly
    model(torch.randn(3, 6))


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


#: base layer, input shape, whether the bias-free op runs (else the base layer's own call)
BASES = {
    "linear": (lambda: nn.Linear(5, 6), (3, 4, 5), True),
    "hf_conv1d": (_hf_conv1d, (3, 4, 5), True),
    "conv2d_reflect": (lambda: nn.Conv2d(5, 6, 3, padding=1, padding_mode="reflect"), (2, 5, 4, 4), True),
    "conv1d_grouped_circular": (
        lambda: nn.Conv1d(4, 6, 3, padding="same", groups=2, padding_mode="circular"), (2, 4, 7), True),
    "conv3d_strided_replicate": (
        lambda: nn.Conv3d(3, 4, 2, stride=2, padding=1, padding_mode="replicate"), (2, 3, 4, 5, 3), True),
    "conv2d_channels_last": (lambda: nn.Conv2d(5, 6, 3, padding=1).to(memory_format=torch.channels_last),
                             (2, 5, 4, 4), True),
    "subclassed": (lambda: _Subclassed(5, 6), (3, 4, 5), False),
}  # fmt: skip


def _ia3_model(make, scale_bias: tuple[bool, bool] = (False, False)) -> tuple[nn.Module, bl.AdapterLayer]:
    """Two output-side (IA)³ adapters on one base layer, multipliers 0.6 and −1.3, random vectors, float64;
    ``scale_bias`` of each."""
    torch.manual_seed(0)
    first, second = (bl.IA3Config(target_modules=["0"], scale_bias=s) for s in scale_bias)
    model = bl.get_peft_model(nn.Sequential(make()).to(DEVICE, torch.float64), first)
    model.add_adapter("second", second)
    model.set_adapter(["default", "second"])
    model.set_multiplier(0.6, "default")
    model.set_multiplier(-1.3, "second")
    model.train()
    (layer,) = layers_of(model)
    layer.forward_mode = "bypass"  # (a GPU's cost model may rebuild W ⊙ (1 + Σ t·v) instead)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.weight.normal_()
    return model, layer


def _reference(base: nn.Module, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The base layer's own forward with its output channels' weights scaled by ``1 + v``, its bias by ``1 + w``."""
    scaled = copy.deepcopy(base)
    out_axis = 1 if type(base).__name__ == "Conv1D" else 0  # HF Conv1D stores W as (in, out)
    shape = [1] * base.weight.dim()
    shape[out_axis] = -1
    del scaled.weight, scaled.bias
    scaled.weight = base.weight.detach() * (1 + v).reshape(shape)
    scaled.bias = base.bias.detach() * (1 + w)
    return scaled(x)


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    ramp = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * ramp).sum().backward()
    return out.detach()


#: each adapter's ``scale_bias``: LyCORIS' meaning (the bias kept), PEFT's (scaled with the output), one of each
SCALE_BIAS = {"kept": (False, False), "scaled": (True, True), "mixed": (True, False)}


@pytest.mark.parametrize("bias", list(SCALE_BIAS))
@pytest.mark.parametrize("kind", list(BASES))
def test_output_side_ia3_with_a_bias_equals_the_formula(kind: str, bias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass over the output; the bias-free op runs where a kept bias would otherwise need a correction."""
    make, shape, bias_free_call = BASES[kind]
    scale_bias = SCALE_BIAS[bias]
    model, layer = _ia3_model(make, scale_bias)
    ops = []
    apply = LayerGeometry.apply
    monkeypatch.setattr(LayerGeometry, "apply", lambda *args: ops.append(1) or apply(*args))
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = _step(model, x)
    assert len(ops) == (1 if bias_free_call and not all(scale_bias) else 0)

    xx = x.detach().clone().requires_grad_()
    vs = [a.weight.detach().clone().requires_grad_() for a in layer.adapters.values()]
    terms = (0.6 * vs[0], -1.3 * vs[1])
    w = sum((term for term, scaled in zip(terms, scale_bias, strict=True) if scaled), torch.zeros_like(vs[0]))
    expected = _step(lambda inp: _reference(layer.base_layer, inp, terms[0] + terms[1], w), xx)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xx.grad, rtol=1e-12, atol=1e-12)
    for adapter, v in zip(layer.adapters.values(), vs, strict=True):
        torch.testing.assert_close(adapter.weight.grad, v.grad, rtol=1e-10, atol=1e-12)


def _instance_forward(module: nn.Module, calls: list) -> None:
    forward = module.forward  # replaced on the instance, as accelerate's hooks do

    def wrapped(*args):
        calls.append(1)
        return forward(*args)

    module.forward = wrapped


HOOKS = {
    "forward_pre_hook": lambda m, calls: m.register_forward_pre_hook(lambda *_: calls.append(1)),
    "full_backward_hook": lambda m, calls: m.register_full_backward_hook(lambda *_: calls.append(1)),
    "global_forward_hook": lambda m, calls: torch.nn.modules.module.register_module_forward_hook(
        lambda mod, *_: calls.append(1) if mod is m else None
    ),
    "instance_forward": _instance_forward,
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_hooked_base_layer_is_called(hook: str) -> None:
    """Hooks on the base layer (the old ``weight_norm`` sets the weight in one; accelerate replaces the
    instance's forward) keep the base layer's own call."""
    model, layer = _ia3_model(lambda: nn.Linear(5, 6))
    calls: list = []
    handle = HOOKS[hook](layer.base_layer, calls)
    try:
        _step(model, torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True))
    finally:
        if handle is not None:
            handle.remove()
    assert calls == [1]
