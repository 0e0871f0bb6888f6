"""The fused Triton kernels of LoKr's and LoHa's linear bypass (ops/triton_kron.py, ops/triton_khatri_rao.py):
the output and every gradient (x, each factor, the base output) equal the eager path's and a float64
reference built from ΔW (torch.kron, the Hadamard product of the two low-rank products), in float32 to
1e-5 of the largest entry, in float16 to 5e-3 and in bfloat16 (tensors, or float32 under autocast) to 3e-2;
shapes that are no multiple of any block size, W2 full and decomposed; and the dispatch picks the eager path
on CPU tensors unless forced, and when the shapes exceed the kernels' limits.

On the CPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before the kernel
modules are imported.  Triton reads it when a kernel is decorated (and again when a launch first imports its
helpers), not when triton itself is imported; the kernels call only Triton's builtins (ops/triton_tiles.py
says why), so it works although torch's inductor may have imported triton already (checked in a fresh
process below).  It stays set for the rest of the process, where nothing else compiles Triton kernels on the
CPU (inductor compiles C++ there).  Were the kernel modules imported before without it, they are reloaded.
Since the interpreter accepts programs Triton's compiler rejects, the kernels are also compiled for sm_90 (no
GPU needed).  With ``BEYONDLORA_TEST_DEVICE=cuda`` the kernels compile for and run on the GPU instead, and
the eager path they are compared with runs there too.

The interpreter's float32 → bfloat16 conversion truncates where a GPU rounds to nearest, so the fused path's
bfloat16 errors here are about twice the eager path's (both within the tolerance).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import beyondlora as bl
from helpers.layer_cases import DEVICE, set_mode

if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from beyondlora.ops import triton_khatri_rao, triton_kron, triton_tiles  # noqa: E402
from beyondlora.ops.bypass_khatri_rao import khatri_rao_linear  # noqa: E402
from beyondlora.ops.bypass_kron import kron_linear  # noqa: E402

if DEVICE.type == "cpu" and type(triton_kron._kron_apply_kernel).__name__ != "InterpretedFunction":
    for module in (triton_tiles, triton_kron, triton_khatri_rao):
        importlib.reload(module)

ALPHA = 0.7
#: (a, b, c, d, r, tokens): a small case, and one whose every side misses the block sizes (r > 16 pads to 32);
#: both span several tiles forward and backward, shared by the two programs the CPU gets
KRON_SHAPES = [(3, 5, 2, 7, 3, 40), (5, 37, 3, 35, 17, 100)]
#: (out, in, r1, r2, tokens): the second spans three backward tiles of 128 tokens, so that one of the two
#: programs the CPU gets sums two of them
KHATRI_RAO_SHAPES = [(13, 37, 3, 3, 45), (41, 70, 2, 5, 300)]
PRECISIONS = {
    "fp32": (torch.float32, False, 1e-5),
    "bf16": (torch.bfloat16, False, 3e-2),
    "fp16": (torch.float16, False, 5e-3),
    "autocast_bf16": (torch.float32, True, 3e-2),
}


def _rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_()


def _run(fn, inputs: list[torch.Tensor], grad: torch.Tensor, setting: str, autocast: bool) -> list[torch.Tensor]:
    """Output and the gradients of every input, with ``BEYONDLORA_FUSED=setting``."""
    for t in inputs:
        t.grad = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BEYONDLORA_FUSED", setting)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(*inputs)
        out.backward(grad.to(out.dtype))
    return [out.detach(), *[t.grad for t in inputs]]


def _reference(delta_fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """``result + x ΔWᵀ`` in float64 with ΔW from ``delta_fn(*factors)``, and its gradients."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    result, x, *factors = leaves
    out = result + x @ delta_fn(*factors).t()
    out.backward(grad.double())
    return [out.detach(), *[t.grad for t in leaves]]


def _assert_close(found: list[torch.Tensor], expected: list[torch.Tensor], tol: float, what: str) -> None:
    names = ["output", "∂result", "∂x", *[f"∂factor{i}" for i in range(len(found) - 3)]]
    for name, f, e in zip(names, found, expected, strict=True):
        err = (f.double() - e.double()).abs().max().item() / e.double().abs().max().item()
        assert err <= tol, f"{what}: {name} off by {err:.2e} of its largest entry (tolerance {tol:.0e})"


def _kron_case(shape: tuple[int, ...], full: bool, dtype: torch.dtype):
    a, b, c, d, r, n = shape
    factors = [_rand(a, c, dtype=dtype)] + ([_rand(b, d, dtype=dtype)] if full else [])
    if not full:
        factors += [_rand(r, d, dtype=dtype, scale=r**-0.5), _rand(b, r, dtype=dtype)]
    inputs = [_rand(n, a * b, dtype=dtype), _rand(n, c * d, dtype=dtype), *factors]

    def fn(result, x, w1, *w2):
        w2_in, w2_out = (None, w2[0]) if full else w2
        return kron_linear(result, x, w1, w2_in, w2_out, ALPHA)

    def delta(w1, *w2):
        return ALPHA * torch.kron(w1, w2[0] if full else w2[1] @ w2[0])

    return fn, delta, inputs, torch.randn(n, a * b, dtype=torch.float64, device=DEVICE)


def _khatri_rao_case(shape: tuple[int, ...], dtype: torch.dtype):
    out, width, r1, r2, n = shape
    factors = [_rand(out, r1, dtype=dtype), _rand(r1, width, dtype=dtype, scale=0.3)]
    factors += [_rand(out, r2, dtype=dtype), _rand(r2, width, dtype=dtype, scale=0.3)]
    inputs = [_rand(n, out, dtype=dtype), _rand(n, width, dtype=dtype), *factors]

    def fn(result, x, a1, b1, a2, b2):
        return khatri_rao_linear(result, x, a1, b1, a2, b2, ALPHA)

    def delta(a1, b1, a2, b2):
        return ALPHA * (a1 @ b1) * (a2 @ b2)

    return fn, delta, inputs, torch.randn(n, out, dtype=torch.float64, device=DEVICE)


def _check(case, precision: str) -> None:
    fn, delta, inputs, grad = case
    _, autocast, tol = PRECISIONS[precision]
    fused = _run(fn, inputs, grad, "force", autocast)
    eager = _run(fn, inputs, grad, "0", autocast)
    reference = _reference(delta, inputs, grad)
    for f, e in zip(fused, eager, strict=True):  # same dtypes as the eager path, output and every gradient
        assert f.dtype == e.dtype and f.shape == e.shape
    _assert_close(fused, reference, tol, "fused against float64")
    _assert_close(eager, reference, tol, "eager against float64")
    _assert_close(fused, [e.double() for e in eager], tol, "fused against eager")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("full", [False, True], ids=["w2_decomposed", "w2_full"])
@pytest.mark.parametrize("shape", KRON_SHAPES, ids=["small", "ragged"])
def test_kron_fused_equals_eager(shape: tuple[int, ...], full: bool, precision: str) -> None:
    _check(_kron_case(shape, full, PRECISIONS[precision][0]), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", KHATRI_RAO_SHAPES, ids=["small", "ragged"])
def test_khatri_rao_fused_equals_eager(shape: tuple[int, ...], precision: str) -> None:
    _check(_khatri_rao_case(shape, PRECISIONS[precision][0]), precision)


@pytest.mark.parametrize("full", [False, True], ids=["w2_decomposed", "w2_full"])
def test_kron_grad_of_x_alone(full: bool) -> None:
    """With frozen factors backward runs the forward kernel on the transposed factors (W1ᵀ ⊗ W2ᵀ) g."""
    fn, delta, inputs, grad = _kron_case(KRON_SHAPES[1], full, torch.float32)
    for factor in inputs[2:]:
        factor.requires_grad_(False)
    factors = inputs[2:]
    fused = _run(lambda result, x: fn(result, x, *factors), inputs[:2], grad, "force", False)
    reference = _reference(lambda: delta(*factors).double(), inputs[:2], grad)
    _assert_close(fused, reference, 1e-5, "∂x alone")


def _grad_fn_name(setting: str, fn, inputs: list[torch.Tensor]) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BEYONDLORA_FUSED", setting)
        return type(fn(*inputs).grad_fn).__name__


@pytest.mark.parametrize("setting", ["force", "1", "0"])
def test_dispatch(setting: str) -> None:
    """CPU tensors take the eager path unless forced; CUDA ones the kernels unless turned off; shapes past the
    kernels' limits (a rank over 64, r1·r2 over 256) always the eager path."""
    fused = setting == "force" or (setting == "1" and DEVICE.type == "cuda")
    fn, _, inputs, _ = _kron_case(KRON_SHAPES[0], False, torch.float32)
    assert _grad_fn_name(setting, fn, inputs) == ("FusedKronLinearBackward" if fused else "KronLinearBackward")
    fn, _, inputs, _ = _khatri_rao_case(KHATRI_RAO_SHAPES[0], torch.float32)
    expected = "FusedKhatriRaoLinearBackward" if fused else "KhatriRaoLinearBackward"
    assert _grad_fn_name(setting, fn, inputs) == expected
    fn, _, inputs, _ = _kron_case((2, 3, 2, 70, 65, 4), False, torch.float32)
    assert _grad_fn_name(setting, fn, inputs) == "KronLinearBackward"
    fn, _, inputs, _ = _khatri_rao_case((8, 8, 17, 16, 4), torch.float32)
    assert _grad_fn_name(setting, fn, inputs) == "KhatriRaoLinearBackward"
    fn, _, inputs, _ = _kron_case(KRON_SHAPES[0], False, torch.float64)  # float64: no dtype the kernels take
    assert _grad_fn_name(setting, fn, inputs) == "KronLinearBackward"


CONFIGS = {
    "lokr": bl.LoKrConfig(r=2, target_modules=["0"], init_weights=False),
    "loha": bl.LoHaConfig(r=3, target_modules=["0"], init_weights=False),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_through_the_layer(config) -> None:
    """An adapted linear layer on its bypass (a 3-D input) trains the same with the kernels as without."""
    torch.manual_seed(0)
    model = bl.get_peft_model(nn.Sequential(nn.Linear(24, 30)).to(DEVICE), config)
    set_mode(model, "bypass")
    model.train()
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 5, 30, device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    found = {}
    for setting in ("force", "0"):
        model.zero_grad()
        x.grad = None
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("BEYONDLORA_FUSED", setting)
            out = model(x)
        out.backward(grad)
        found[setting] = [out.detach(), x.grad, *[p.grad for p in params]]
    for f, e in zip(found["force"], found["0"], strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_compile_traces_the_eager_path() -> None:
    """torch.compile traces the eager functions (the kernels are opaque to it) without a graph break, even when
    the kernels are forced."""
    fn, _, inputs, grad = _kron_case(KRON_SHAPES[0], False, torch.float32)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    found = _run(compiled, inputs, grad, "force", False)
    expected = _run(fn, inputs, grad, "0", False)
    for f, e in zip(found, expected, strict=True):
        torch.testing.assert_close(f, e)


def _assert_fused_is_eager(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> None:
    found = _run(fn, inputs, grad, "force", False)
    expected = _run(fn, inputs, grad, "0", False)
    for f, e in zip(found, expected, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def _batch_major(t: torch.Tensor) -> torch.Tensor:
    """(2·S, W) rows as a (S, 2, W) view: a transposed batch whose rows are not contiguous."""
    return t.detach().reshape(2, -1, t.shape[-1]).transpose(0, 1).requires_grad_(t.requires_grad)


def test_strided_and_single_token_inputs() -> None:
    """Inputs and base outputs whose rows are not contiguous (a transposed 3-D batch), and a single token."""
    fn, _, inputs, grad = _kron_case((3, 5, 2, 7, 3, 12), False, torch.float32)
    strided = [_batch_major(t) for t in inputs[:2]] + inputs[2:]
    assert not strided[1].is_contiguous()
    _assert_fused_is_eager(fn, strided, _batch_major(grad))
    fn, _, inputs, grad = _kron_case((3, 5, 2, 7, 3, 1), True, torch.float32)
    _assert_fused_is_eager(fn, inputs, grad)
    fn, _, inputs, grad = _khatri_rao_case((9, 20, 2, 3, 12), torch.float32)
    _assert_fused_is_eager(fn, [_batch_major(t) for t in inputs[:2]] + inputs[2:], _batch_major(grad))
    fn, _, inputs, grad = _khatri_rao_case((9, 20, 2, 3, 1), torch.float32)
    _assert_fused_is_eager(fn, inputs, grad)


def test_kernels_compile_for_a_gpu() -> None:
    """Every kernel compiles to an sm_90 cubin at the largest shapes the dispatch sends it (Triton's compiler
    and ptxas, no GPU needed; tests/ops/triton_compile.py): the interpreter above accepts programs the
    compiler rejects.  A subprocess, since the kernels here were decorated for the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    script = Path(__file__).with_name("triton_compile.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("bytes shared") == 6, run.stdout


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_saves_only_the_input_and_the_factors(algorithm: str) -> None:
    """For backward the fused path keeps the layer input and the factors themselves (no copies, nothing
    activation-sized of its own), as the eager path's lean mode does."""
    fn, _, inputs, _ = (
        _kron_case(KRON_SHAPES[1], False, torch.float32)
        if algorithm == "lokr"
        else _khatri_rao_case(KHATRI_RAO_SHAPES[0], torch.float32)
    )
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with pytest.MonkeyPatch.context() as patch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        patch.setenv("BEYONDLORA_FUSED", "force")
        out = fn(*inputs)
    assert type(out.grad_fn).__name__.startswith("Fused")
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in inputs[1:])


def test_interpreter_setting_works_after_torch_imported_triton() -> None:
    """TRITON_INTERPRET set after torch's inductor has imported triton still gives interpreted kernels that run
    forward and backward on CPU tensors (what this module relies on when triton was imported before it)."""
    code = (
        "import os, sys, torch, torch._inductor\n"
        "assert 'triton' in sys.modules\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "os.environ['BEYONDLORA_FUSED'] = 'force'\n"
        "from beyondlora.ops import triton_kron\n"
        "from beyondlora.ops.bypass_kron import kron_linear\n"
        "from beyondlora.ops.bypass_khatri_rao import khatri_rao_linear\n"
        "assert type(triton_kron._kron_apply_kernel).__name__ == 'InterpretedFunction'\n"
        "def leaf(*shape): return torch.randn(*shape, requires_grad=True)\n"
        "for w2_in, w2_out in ((None, leaf(4, 3)), (leaf(2, 3), leaf(4, 2))):\n"
        "    x, w1 = leaf(5, 6), leaf(2, 2)\n"
        "    out = kron_linear(torch.zeros(5, 8), x, w1, w2_in, w2_out)\n"
        "    assert type(out.grad_fn).__name__ == 'FusedKronLinearBackward'\n"
        "    out.sum().backward()\n"
        "    w2 = w2_out if w2_in is None else w2_out @ w2_in\n"
        "    torch.testing.assert_close(out, x @ torch.kron(w1, w2).t())\n"
        "a1, b1, a2, b2, x = leaf(7, 2), leaf(2, 9), leaf(7, 3), leaf(3, 9), leaf(5, 9)\n"
        "out = khatri_rao_linear(torch.zeros(5, 7), x, a1, b1, a2, b2)\n"
        "assert type(out.grad_fn).__name__ == 'FusedKhatriRaoLinearBackward'\n"
        "out.sum().backward()\n"
        "torch.testing.assert_close(out, x @ ((a1 @ b1) * (a2 @ b2)).t())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_sides_of_one() -> None:
    """Every side 1 where it can be (W1 1×1, d = 1, rank 1; LoHa 1 → 1 at ranks 1): padded blocks, still exact."""
    for full in (False, True):
        _check(_kron_case((1, 3, 1, 1, 1, 5), full, torch.float32), "fp32")
    _check(_khatri_rao_case((1, 1, 1, 1, 3), torch.float32), "fp32")


def test_the_kernels_are_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until they have run on a GPU the default is the eager path; BEYONDLORA_FUSED=1 turns them on."""
    from beyondlora.ops.triton_support import fused_setting

    monkeypatch.delenv("BEYONDLORA_FUSED", raising=False)
    assert fused_setting() == "off"
    for value, expected in (("1", "on"), ("on", "on"), ("0", "off"), ("off", "off"), ("force", "force")):
        monkeypatch.setenv("BEYONDLORA_FUSED", value)
        assert fused_setting() == expected
