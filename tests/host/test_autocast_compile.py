"""Mixed precision and torch.compile: both paths follow the base layer's dtype, stay correct, and compile
without graph breaks, forward and backward.

Runs on :data:`helpers.layer_cases.DEVICE` (``BEYONDLORA_TEST_DEVICE=cuda`` on a GPU machine: autocast on CUDA, and
every compile through inductor; on the CPU the compile matrix uses ``aot_eager``, which traces the same
forward/backward graphs without the C++ build, and one case goes through inductor).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondlora as bl
from helpers.layer_cases import DEVICE, set_mode

TARGETS = ["0", "2"]
CONFIGS = {
    "lokr": bl.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
    "loha": bl.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
    "lora": bl.LoraConfig(r=4, target_modules=TARGETS, init_weights=False),
    "dora": bl.LoraConfig(r=4, use_dora=True, target_modules=TARGETS, init_weights=False),
    "ia3": bl.IA3Config(target_modules=TARGETS, init_weights=False),
    "ia3_input": bl.IA3Config(target_modules=TARGETS, feedforward_modules=TARGETS, init_weights=False),
    "oft": bl.OFTConfig(r=4, constraint=0.05, rescaled=True, target_modules=TARGETS, init_weights=False),
    "boft": bl.BOFTConfig(r=4, rescaled=True, target_modules=TARGETS, init_weights=False),
}
BASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), (4, 16)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 8, 3)), (2, 8, 6, 6)),
}
COMPILE_BACKEND = "aot_eager" if DEVICE.type == "cpu" else "inductor"


def _model(algorithm: str, base: str = "linear") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make, shape = BASES[base]
    model = bl.get_peft_model(make().to(DEVICE), CONFIGS[algorithm])
    return model, torch.randn(*shape, device=DEVICE)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and adapter gradients of one training step on a fixed, non-uniform loss."""
    model.zero_grad()
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    return out.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("algorithm", CONFIGS)
def test_autocast(algorithm: str, base: str, dtype: torch.dtype) -> None:
    """Under autocast both paths compute in ``dtype`` and agree with float32 to its precision; the adapter
    parameters and their gradients stay float32."""
    model, x = _model(algorithm, base)
    model.train()
    reference, reference_grads = _step(model, x)
    for mode in ("bypass", "combined"):
        set_mode(model, mode)
        with torch.autocast(DEVICE.type, dtype=dtype):
            out, grads = _step(model, x)
        assert out.dtype == dtype, mode
        torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2, msg=mode)
        for grad, expected in zip(grads, reference_grads, strict=True):
            assert grad.dtype == torch.float32
            scale = expected.abs().max().item()
            torch.testing.assert_close(grad, expected, rtol=5e-2, atol=5e-2 * scale, msg=mode)


@pytest.mark.parametrize("mode", ["bypass", "combined"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("algorithm", CONFIGS)
def test_compiled_training_step(algorithm: str, base: str, mode: str) -> None:
    """``torch.compile(fullgraph=True)`` traces forward and backward with no graph break (it raises on one)
    and computes what the eager model computes."""
    torch._dynamo.reset()
    model, x = _model(algorithm, base)
    model.train()
    set_mode(model, mode)
    expected, expected_grads = _step(model, x)
    expected_grads = [g.clone() for g in expected_grads]
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    out, grads = _step(compiled, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5)


def test_inductor_compiles_a_training_step() -> None:
    """The real compiler, generated kernels included, on the most involved bypass (LoKr on a convolution)."""
    torch._dynamo.reset()
    model, x = _model("lokr", "conv2d")
    model.train()
    expected, expected_grads = _step(model, x)
    expected_grads = [g.clone() for g in expected_grads]
    out, grads = _step(torch.compile(model, backend="inductor", fullgraph=True), x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5)


def test_compiled_inference() -> None:
    model, x = _model("lokr")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x))
