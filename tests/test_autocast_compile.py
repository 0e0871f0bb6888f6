"""Mixed precision and torch.compile: both paths follow the base layer's dtype and stay correct."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondlora as bl
from layer_cases import set_mode

CONFIGS = [
    bl.LoKrConfig(r=4, target_modules=["0", "2"], init_weights=False),
    bl.LoHaConfig(r=4, target_modules=["0", "2"], init_weights=False),
    bl.LoraConfig(r=4, use_dora=True, target_modules=["0", "2"], init_weights=False),
    bl.IA3Config(target_modules=["0", "2"], init_weights=False),
]


def _model(config):
    torch.manual_seed(0)
    return bl.get_peft_model(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), config).eval()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_autocast_bfloat16(config) -> None:
    model = _model(config)
    x = torch.randn(4, 16)
    reference = model(x)
    for mode in ("bypass", "combined"):
        set_mode(model, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16, mode
        torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)


def test_torch_compile() -> None:
    model = _model(CONFIGS[0])
    x = torch.randn(4, 16)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x))
