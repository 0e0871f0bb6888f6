"""The memory-lean bypass (ops/bypass_*.py): exact gradients, and no more bytes saved for backward than LoRA.

- every autograd function's gradients equal finite differences in float64 (``torch.autograd.gradcheck``);
- through the layer, the bypass gives the same output and the same gradients (input and every factor) as
  the rebuild ("combined") path, with ``backward_memory`` "auto" and "lean", in training mode (rank dropout)
  and under bfloat16 autocast;
- with ``backward_memory="lean"`` a training forward saves no more bytes than a LoRA of the same rank on the
  same layer (storages counted once, parameters excluded), for linear and conv2d layers; with the default
  ``"auto"`` LoHa does so on linear layers too;
- ``torch.compile`` gives the same training step.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

import beyondlora as bl
from beyondlora.algorithms.base import AdapterOptions
from beyondlora.algorithms.loha import LoHa
from beyondlora.algorithms.lokr import LoKr
from beyondlora.ops import bypass_lowrank
from beyondlora.ops.bypass_khatri_rao import khatri_rao_conv, khatri_rao_conv_hidden, khatri_rao_linear
from beyondlora.ops.bypass_kron import kron_conv, kron_conv_hidden, kron_linear
from beyondlora.ops.bypass_lowrank import low_rank_linear
from beyondlora.ops.geometry import LayerGeometry
from helpers.layer_cases import all_cases, build, layers_of, randomize, set_mode

torch.manual_seed(0)


def _leaf(*shape: int, scale: float = 0.5) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


# --- the functions against finite differences ------------------------------------------------------
@pytest.mark.parametrize("recompute", [True, False], ids=["lean", "keep"])
@pytest.mark.parametrize("full_w2", [False, True], ids=["w2_decomposed", "w2_full"])
def test_kron_linear_gradcheck(full_w2: bool, recompute: bool) -> None:
    a, b, c, d, r = 2, 3, 3, 2, 2
    result, x, w1 = _leaf(2, 3, a * b), _leaf(2, 3, c * d), _leaf(a, c)
    w2_in, w2_out = (None, _leaf(b, d)) if full_w2 else (_leaf(r, d), _leaf(b, r))
    inputs = [t for t in (result, x, w1, w2_in, w2_out) if t is not None]

    def fn(*args):
        it = iter(args)
        res, xx, ww1 = next(it), next(it), next(it)
        win = None if full_w2 else next(it)
        return kron_linear(res, xx, ww1, win, next(it), 0.7, recompute)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.fixture(params=["oriented", "autograd"])
def low_rank_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both routes of ``low_rank_linear`` on a CPU: its own autograd node (any size) or autograd's (none)."""
    monkeypatch.setattr(bypass_lowrank, "ORIENTED_MIN_WORK", 0 if request.param == "oriented" else math.inf)
    return request.param


def test_low_rank_linear_takes_its_own_node_from_the_work_threshold() -> None:
    down, up = torch.randn(8, 48, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    few_tokens = (bypass_lowrank.ORIENTED_MIN_WORK - 1) // (8 * (48 + 32))  # the most under the threshold
    for tokens, oriented in ((few_tokens, False), (few_tokens + 1, True)):
        out = low_rank_linear(torch.zeros(tokens, 32), torch.randn(tokens, 48), down, up)
        assert (type(out.grad_fn).__name__ == "LowRankLinearBackward") == oriented
    with torch.no_grad():  # inference: no node at all
        out = low_rank_linear(torch.zeros(few_tokens + 1, 32), torch.randn(few_tokens + 1, 48), down, up)
    assert out.grad_fn is None


def test_low_rank_linear_keeps_a_16_bit_input_not_its_wider_cast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 x with float32 factors runs the products in float32: autograd would keep that cast (twice x's
    bytes), so the node that keeps x itself runs even below the work threshold."""
    monkeypatch.setattr(bypass_lowrank, "ORIENTED_MIN_WORK", math.inf)
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    down, up = torch.randn(8, 48, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    result = torch.randn(64, 32, dtype=torch.bfloat16)
    out = low_rank_linear(result, x, down, up)
    assert type(out.grad_fn).__name__ == "LowRankLinearBackward"
    assert _saved_by(partial(low_rank_linear, alpha=1.0), (result, x, down, up), (down, up)) == 64 * 48 * 2 + 8 * 64 * 4


def test_low_rank_linear_gradcheck(low_rank_route: str) -> None:
    out, n, r = 4, 5, 2
    inputs = (_leaf(2, 3, out), _leaf(2, 3, n), _leaf(r, n), _leaf(out, r))
    assert torch.autograd.gradcheck(lambda *t: low_rank_linear(*t, alpha=0.7), inputs)


def test_low_rank_linear_saves_what_plain_autograd_saves_and_matches_it_under_autocast(low_rank_route: str) -> None:
    """x and the rank-r hidden, as autograd of ``result + alpha · (x downᵀ) upᵀ`` keeps; same values and
    gradients in float32 and under bfloat16 autocast."""
    x = torch.randn(2, 64, 48, requires_grad=True)
    down, up = torch.randn(8, 48, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    result = torch.randn(2, 64, 32, requires_grad=True)

    def plain(res, xx, dd, uu):
        return res + 0.5 * (xx @ dd.t()) @ uu.t()

    for autocast in (False, True):
        outputs = []
        for fn in (plain, lambda *t: low_rank_linear(*t, alpha=0.5)):
            leaves = [t.detach().clone().requires_grad_() for t in (result, x, down, up)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn(*leaves)
            out.float().square().sum().backward()
            outputs.append([out.float(), *(t.grad for t in leaves)])
        limit = 2e-2 if autocast else 1e-5  # bfloat16, or float32 summation order
        for got, want in zip(outputs[1], outputs[0], strict=True):
            torch.testing.assert_close(got, want, rtol=limit, atol=limit * want.abs().max().item())
    sizes = [
        _saved_by(fn, (result, x, down, up), (down, up)) for fn in (plain, lambda *t: low_rank_linear(*t, alpha=0.5))
    ]
    assert sizes[1] <= sizes[0] == x.numel() * 4 + 2 * 64 * 8 * 4


def _saved_by(fn, inputs: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]) -> int:
    """Bytes ``fn(*inputs)`` saves for backward, one count per storage, ``params`` excluded."""
    resident = {t.untyped_storage().data_ptr() for t in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in resident:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(saved.values())


def test_khatri_rao_linear_gradcheck() -> None:
    out, n, r = 4, 5, 2
    inputs = (_leaf(3, out), _leaf(3, n), _leaf(out, r), _leaf(r, n), _leaf(out, r), _leaf(r, n))
    assert torch.autograd.gradcheck(lambda *t: khatri_rao_linear(*t, alpha=1.3), inputs)


CONVS = {
    "reflect_dilated": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
    "circular_stride": lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, padding_mode="circular"),
    "zeros": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "conv1d_same": lambda: nn.Conv1d(4, 6, 3, padding="same"),
    "conv1d_same_even_kernel": lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="replicate"),
    "conv1d_same_even_kernel_zeros": lambda: nn.Conv1d(4, 6, 2, padding="same"),
}


def _conv_input(name: str) -> torch.Tensor:
    return _leaf(2, 4, 5) if name.startswith("conv1d") else _leaf(2, 4, 5, 4)


@pytest.mark.parametrize("recompute", [True, False], ids=["lean", "keep"])
@pytest.mark.parametrize("mode", ["low_rank", "tucker", "full"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_kron_conv_gradcheck(conv: str, mode: str, recompute: bool) -> None:
    module = CONVS[conv]().double()
    g = LayerGeometry.of(module)
    (a, b), (c, d), r = (2, 3), (2, 2), 2
    x = _conv_input(conv)
    result = _leaf(*module(x).shape)
    w1 = _leaf(a, c)
    if mode == "full":
        w2_out, factors = None, (_leaf(b, d, *g.kernel),)
    elif mode == "tucker":
        w2_out, factors = _leaf(b, r), (_leaf(r, d), _leaf(r, r, *g.kernel))
    else:
        w2_out, factors = _leaf(b, r), (_leaf(r, d * g.kernel_numel),)
    hidden = partial(kron_conv_hidden, g, c, d, mode)
    inputs = [t for t in (result, x, w1, w2_out, *factors) if t is not None]

    def fn(*args):
        res, xx, ww1, *rest = args
        wout = None if w2_out is None else rest.pop(0)
        return kron_conv(res, xx, hidden, ww1, wout, tuple(rest), 0.6, recompute)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("recompute", [True, False], ids=["lean", "keep"])
@pytest.mark.parametrize("tucker", [False, True], ids=["plain", "tucker"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_khatri_rao_conv_gradcheck(conv: str, tucker: bool, recompute: bool) -> None:
    module = CONVS[conv]().double()
    g = LayerGeometry.of(module)
    r = 2
    x = _conv_input(conv)
    result = _leaf(*module(x).shape)
    a1, a2 = _leaf(g.out_dim, r), _leaf(g.out_dim, r)
    if tucker:
        factors = (_leaf(r, g.in_dim), _leaf(r, g.in_dim), _leaf(r, r, *g.kernel), _leaf(r, r, *g.kernel))
    else:
        factors = (_leaf(r, g.in_dim * g.kernel_numel), _leaf(r, g.in_dim * g.kernel_numel))
    hidden = partial(khatri_rao_conv_hidden, g)

    def fn(res, xx, aa1, aa2, *rest):  # given the geometry, "keep" runs KhatriRaoConvKeep (not Tucker)
        return khatri_rao_conv(res, xx, hidden, aa1, aa2, tuple(rest), 0.8, recompute, geometry=g)

    assert torch.autograd.gradcheck(fn, (result, x, a1, a2, *factors))


# --- through the layer: bypass == combined, input and factor gradients --------------------------------------
LAYER_CASES = [
    c
    for c in all_cases()
    if c.algorithm in ("lokr", "loha", "ia3") and c.layer not in ("embedding",) and not c.options.get("use_dora")
]


def _grads(peft, x, weights):
    x = x.detach().requires_grad_()
    out = peft(x)
    (out * weights).sum().backward()
    params = [p.grad.clone() for p in peft.parameters() if p.requires_grad]
    for p in peft.parameters():
        p.grad = None
    return out.detach(), [x.grad, *params]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_bypass_gradients_equal_combined(case) -> None:
    """Input and every factor, with both memory settings, and in training mode with rank dropout."""
    for options in ({}, {"rank_dropout": 0.5} if case.algorithm != "ia3" else {}):
        model, x = build(case, torch.float64)
        peft = bl.get_peft_model(model, case.config(**options))
        peft.set_multiplier(case.multiplier)
        randomize(peft)
        peft.train()
        weights = torch.linspace(-1, 1, peft(x).numel(), dtype=torch.float64).reshape(peft(x).shape)
        results = {}
        for mode, memory in (("combined", "auto"), ("bypass", "auto"), ("bypass", "lean")):
            set_mode(peft, mode)
            for layer in layers_of(peft):
                layer.backward_memory = memory
            torch.manual_seed(3)  # the same rank-dropout draw for every path
            results[(mode, memory)] = _grads(peft, x, weights)
        expected_out, expected = results[("combined", "auto")]
        for key in (("bypass", "auto"), ("bypass", "lean")):
            out, grads = results[key]
            torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10, msg=f"{key} output")
            for i, (got, want) in enumerate(zip(grads, expected, strict=True)):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"{key} gradient {i}")


AUTOCAST_LAYERS = {
    "linear": (lambda: nn.Linear(24, 32), (2, 5, 24)),
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
}
AUTOCAST_CONFIGS = {
    "lokr": lambda: bl.LoKrConfig(r=2, target_modules=["layer"], init_weights=False),
    "lokr_full_w2": lambda: bl.LoKrConfig(r=16, target_modules=["layer"], init_weights=False),
    "loha": lambda: bl.LoHaConfig(r=3, target_modules=["layer"], init_weights=False),
    "loha_tucker": lambda: bl.LoHaConfig(r=3, target_modules=["layer"], init_weights=False, use_effective_conv2d=True),
}


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("config", list(AUTOCAST_CONFIGS))
@pytest.mark.parametrize("layer", list(AUTOCAST_LAYERS))
def test_autocast_bfloat16_training(layer: str, config: str) -> None:
    make, shape = AUTOCAST_LAYERS[layer]
    torch.manual_seed(0)
    peft = bl.get_peft_model(_Holder(make()), AUTOCAST_CONFIGS[config]()).train()
    randomize(peft, std=0.2)
    x = torch.randn(*shape)
    grads = {}
    for mode, memory in (("combined", "auto"), ("bypass", "auto"), ("bypass", "lean")):
        set_mode(peft, mode)
        for lay in layers_of(peft):
            lay.backward_memory = memory
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, g = _grads(peft, x, 1.0)
        assert out.dtype == torch.bfloat16, mode
        assert all(t.dtype == torch.float32 for t in g), mode
        grads[(mode, memory)] = [out.float(), *g]
    for key in (("bypass", "auto"), ("bypass", "lean")):
        for got, want in zip(grads[key], grads[("combined", "auto")], strict=True):
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * scale, msg=str(key))


# --- saved bytes ------------------------------------------------------------------------------------------------
def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves in one training forward: one count per storage, parameters excluded."""
    model.train()
    return _saved_by(model, (x,), tuple(model.parameters()))


MEMORY_LAYERS = {
    "linear": (lambda: nn.Linear(96, 128), (4, 64, 96)),
    "conv2d": (lambda: nn.Conv2d(32, 48, 3, padding=1), (2, 32, 16, 16)),
    "conv2d_reflect_stride": (
        lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1, padding_mode="reflect"),
        (2, 32, 16, 16),
    ),
}
MEMORY_CONFIGS = {
    "lokr": dict(cls=bl.LoKrConfig),
    "lokr_factor4_both": dict(cls=bl.LoKrConfig, decompose_factor=4, decompose_both=True),
    "lokr_full_w2": dict(cls=bl.LoKrConfig, r=16),
    "lokr_tucker": dict(cls=bl.LoKrConfig, use_effective_conv2d=True),
    "loha": dict(cls=bl.LoHaConfig),
    "loha_tucker": dict(cls=bl.LoHaConfig, use_effective_conv2d=True),
    "ia3_input": dict(cls=bl.IA3Config, feedforward_modules=["layer"]),
}


def _wrapped(layer: str, config: dict, memory: str = "lean") -> tuple[nn.Module, torch.Tensor]:
    make, shape = MEMORY_LAYERS[layer]
    torch.manual_seed(0)
    options = {k: v for k, v in config.items() if k != "cls"}
    if config["cls"] is not bl.IA3Config:
        options = {"r": 8, **options}
    peft = bl.get_peft_model(_Holder(make()), config["cls"](target_modules=["layer"], init_weights=False, **options))
    for lay in layers_of(peft):
        lay.forward_mode = "bypass"
        lay.backward_memory = memory
    return peft, torch.randn(*shape, requires_grad=True)


@pytest.mark.parametrize("config", list(MEMORY_CONFIGS))
@pytest.mark.parametrize("layer", list(MEMORY_LAYERS))
def test_lean_saves_no_more_than_lora(layer: str, config: str) -> None:
    rank = MEMORY_CONFIGS[config].get("r", 8)
    lora, x = _wrapped(layer, {"cls": bl.LoraConfig, "r": rank})
    budget = saved_bytes(lora, x)
    peft, x = _wrapped(layer, MEMORY_CONFIGS[config])
    saved = saved_bytes(peft, x)
    assert saved <= budget, f"{config} on {layer}: {saved} bytes saved, LoRA r={rank} saves {budget}"
    # and it saves the layer input itself, not a copy of it
    assert saved >= x.numel() * x.element_size()


@pytest.mark.parametrize("config", ["loha", "loha_tucker", "lokr_full_w2", "ia3_input"])
def test_default_on_linears_saves_no_more_than_lora(config: str) -> None:
    """``backward_memory="auto"`` (the default) on a linear layer: LoHa recomputes its rank-r² hidden, a full
    LoKr W2 has no input side to keep, so neither keeps more than LoRA (LoKr's decomposed W2 keeps ``X w2_bᵀ``,
    whose recomputation measured a few points slower: see benchmarks/README.md)."""
    rank = MEMORY_CONFIGS[config].get("r", 8)
    lora, x = _wrapped("linear", {"cls": bl.LoraConfig, "r": rank}, memory="auto")
    budget = saved_bytes(lora, x)
    peft, x = _wrapped("linear", MEMORY_CONFIGS[config], memory="auto")
    saved = saved_bytes(peft, x)
    assert saved <= budget, f"{config}: {saved} bytes saved, LoRA r={rank} saves {budget}"


@pytest.mark.parametrize("layer", ["conv2d", "conv2d_reflect_stride"])
def test_loha_conv_keeps_only_its_hidden_beyond_lean(layer: str) -> None:
    """``auto`` on a LoHa convolution keeps the rank-r² hidden, never the Khatri-Rao product ``b1 •c b2``."""
    saved = {}
    for memory in ("lean", "auto"):
        peft, x = _wrapped(layer, MEMORY_CONFIGS["loha"], memory=memory)
        saved[memory] = saved_bytes(peft, x)
        rank = layers_of(peft)[0].adapters["default"].rank
        hidden = peft(x).numel() // layers_of(peft)[0].geometry.out_dim * rank * rank * x.element_size()
    assert saved["auto"] - saved["lean"] == hidden, saved


def _no_lean_path(*args, **kwargs):
    return None


@pytest.mark.parametrize("config", [c for c in MEMORY_CONFIGS if c != "ia3_input"])
@pytest.mark.parametrize("layer", list(MEMORY_LAYERS))
def test_auto_saves_less_than_storing_every_intermediate(layer: str, config: str) -> None:
    """``auto`` keeps one input-side result, never the Khatri-Rao products or ``W1 t``: fewer bytes than the
    plain autograd bypass (every intermediate stored), and ``lean`` no more than ``auto``."""
    saved = {}
    for memory in ("lean", "auto", "stored"):
        peft, x = _wrapped(layer, MEMORY_CONFIGS[config], memory="auto" if memory == "stored" else memory)
        if memory == "stored":
            for lay in layers_of(peft):
                lay.adapters["default"].add_bypass = _no_lean_path
        saved[memory] = saved_bytes(peft, x)
    assert saved["lean"] <= saved["auto"] <= saved["stored"], saved
    if not config.endswith("full_w2"):  # a full W2 has no rank-sized input side to keep
        assert saved["auto"] < saved["stored"], saved


def test_input_side_ia3_under_checkpointing() -> None:
    """The recomputed input-side (IA)³ product hands every other saved tensor to the caller's hooks
    (non-reentrant checkpointing) and the gradients stay exact."""
    peft, x = _wrapped("conv2d", MEMORY_CONFIGS["ia3_input"])
    randomize(peft, std=0.2)
    expected_out, expected = _grads(peft, x, 1.0)

    class Checkpointed(nn.Module):
        def forward(self, inp):
            return torch.utils.checkpoint.checkpoint(peft, inp, use_reentrant=False)

    out, grads = _grads(_Both(Checkpointed(), peft), x, 1.0)
    torch.testing.assert_close(out, expected_out)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


class _Both(nn.Module):
    """Runs ``run`` but exposes ``owner``'s parameters (for :func:`_grads`)."""

    def __init__(self, run: nn.Module, owner: nn.Module) -> None:
        super().__init__()
        self.run, self.owner = run, owner

    def forward(self, x):
        return self.run(x)


# --- torch.compile --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["auto", "lean"])
@pytest.mark.parametrize("config", ["lokr", "loha", "ia3_input", "glora"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_torch_compile_training_step(layer: str, config: str, memory: str) -> None:
    peft, x = _wrapped(layer, MEMORY_CONFIGS.get(config, dict(cls=bl.GLoRAConfig)), memory=memory)
    reference = copy.deepcopy(peft)
    expected_out, expected = _grads(reference, x, 1.0)
    compiled = torch.compile(peft, backend="aot_eager")
    out, grads = _grads(compiled, x, 1.0)
    torch.testing.assert_close(out, expected_out)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_adapters_without_lean_path_fall_back() -> None:
    """Grouped convolutions and embeddings have no lean path: ``add_bypass`` declines and the layer adds the
    adapter's own bypass output."""
    for module in (nn.Conv2d(4, 8, 3, groups=2), nn.Embedding(10, 6)):
        g = LayerGeometry.of(module)
        weight = g.canonical_weight(module)
        for cls in (LoKr, LoHa):
            adapter = cls(g, AdapterOptions(r=2, init_weights=False), weight)
            x = torch.randint(0, 10, (3,)) if g.kind == "embedding" else torch.randn(1, 4, 5, 5)
            assert adapter.add_bypass(torch.zeros(1), x) is None


@pytest.mark.parametrize("config", ["lokr", "loha", "loha_tucker", "ia3_input"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_bfloat16_base_without_autocast(layer: str, config: str) -> None:
    """A bfloat16 base keeps float32 adapters: the bypass computes in float32, returns bfloat16 like the base,
    and its gradients match the rebuild path's."""
    make, shape = AUTOCAST_LAYERS[layer]
    torch.manual_seed(0)
    cfg = MEMORY_CONFIGS[config]
    options = {k: v for k, v in cfg.items() if k != "cls"}
    if cfg["cls"] is not bl.IA3Config:
        options = {"r": 3, **options}
    peft = bl.get_peft_model(_Holder(make().to(torch.bfloat16)), cfg["cls"](target_modules=["layer"], **options))
    randomize(peft, std=0.2)
    peft.train()
    x = torch.randn(*shape, dtype=torch.bfloat16)
    results = {}
    for mode, memory in (("combined", "auto"), ("bypass", "auto"), ("bypass", "lean")):
        set_mode(peft, mode)
        for lay in layers_of(peft):
            lay.backward_memory = memory
        out, grads = _grads(peft, x, 1.0)
        assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in grads[1:])
        results[(mode, memory)] = [out.float(), *(g.float() for g in grads)]
    for key in (("bypass", "auto"), ("bypass", "lean")):
        for got, want in zip(results[key], results[("combined", "auto")], strict=True):
            torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item(), msg=str(key))


@pytest.mark.parametrize("memory", ["auto", "lean"])
@pytest.mark.parametrize("tucker", [False, True], ids=["plain", "tucker"])
@pytest.mark.parametrize("layer", list(MEMORY_LAYERS))
def test_glora_keeps_no_more_than_two_loras(layer: str, tucker: bool, memory: str) -> None:
    """GLoRA's bypass keeps the layer input and its A and B hiddens, each what a rank-r LoRA keeps beyond the
    input, plus factor-sized tensors (the scaled a1 and b1, the stacked a2 and b2).  The base call's input
    ``x + A x`` is input-sized: a convolution keeps it with ``"auto"`` (as LyCORIS does; rebuilding it costs
    about 6 % of the step) and ``"lean"`` rebuilds it from x in backward."""
    lora, x = _wrapped(layer, {"cls": bl.LoraConfig, "r": 8, "use_effective_conv2d": tucker})
    input_bytes = x.numel() * x.element_size()
    beyond_input = saved_bytes(lora, x) - input_bytes
    peft, x = _wrapped(layer, {"cls": bl.GLoRAConfig, "r": 8, "use_effective_conv2d": tucker}, memory=memory)
    factors = sum(p.numel() * p.element_size() for p in peft.parameters() if p.requires_grad)
    saved = saved_bytes(peft, x)
    shifted_input = input_bytes if memory == "auto" and layer != "linear" else 0
    bound = input_bytes + 2 * beyond_input + factors + shifted_input
    assert input_bytes <= saved <= bound, (saved, input_bytes, beyond_input)
