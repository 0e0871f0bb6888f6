"""The layer types and algorithm options the core matrix runs over."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import beyondlora as bl
from beyondlora.algorithms import ALGORITHMS

#: where the matrix tests run: ``cpu`` unless ``BEYONDLORA_TEST_DEVICE`` names another (``cuda`` on a GPU machine:
#: ``BEYONDLORA_TEST_DEVICE=cuda pytest tests/algorithms/test_core_matrix.py tests/host/test_autocast_compile.py …``)
DEVICE = torch.device(os.environ.get("BEYONDLORA_TEST_DEVICE", "cpu"))


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    module = Conv1D(20, 12)
    nn.init.normal_(module.weight, std=0.3)
    nn.init.normal_(module.bias, std=0.3)
    return module


LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(12, 20), lambda g: torch.randn(3, 5, 12, generator=g)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), lambda g: torch.randn(2, 6, 9, generator=g)),
    "conv2d": (
        lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, padding_mode="reflect"),
        lambda g: torch.randn(2, 4, 7, 6, generator=g),
    ),
    "conv2d_circular_stride": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, padding_mode="circular", bias=False),
        lambda g: torch.randn(2, 4, 6, 5, generator=g),
    ),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), lambda g: torch.randn(2, 4, 5, 5, generator=g)),
    "conv2d_1x1": (lambda: nn.Conv2d(8, 12, 1), lambda g: torch.randn(2, 8, 4, 4, generator=g)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (3, 1, 3), padding="same"), lambda g: torch.randn(1, 2, 4, 3, 5, generator=g)),
    "embedding": (lambda: nn.Embedding(30, 16), lambda g: torch.randint(0, 30, (3, 7), generator=g)),
    "hf_conv1d": (_hf_conv1d, lambda g: torch.randn(3, 4, 12, generator=g)),
    "layer_norm": (lambda: nn.LayerNorm(16), lambda g: torch.randn(3, 5, 16, generator=g)),
    "group_norm": (lambda: nn.GroupNorm(2, 8), lambda g: torch.randn(2, 8, 3, 3, generator=g)),
}
DENSE = [
    "linear",
    "conv1d",
    "conv2d",
    "conv2d_circular_stride",
    "conv2d_grouped",
    "conv2d_1x1",
    "conv3d",
    "embedding",
    "hf_conv1d",
]
NORMS = ["layer_norm", "group_norm"]


@dataclass(frozen=True)
class Case:
    algorithm: str
    layer: str
    options: dict[str, Any] = field(default_factory=dict)
    multiplier: float = 1.0

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        mult = f",t={self.multiplier}" if self.multiplier != 1.0 else ""
        return f"{self.algorithm}-{self.layer}[{opts}{mult}]"

    def config(self, **overrides: Any) -> bl.AdapterConfig:
        cls = ALGORITHMS[self.algorithm].config_class
        return cls(target_modules=["layer"], **{**self.options, **overrides})


_RANKED = {
    "lora": [
        {},
        {"alpha": 3.0},
        {"use_rslora": True, "alpha": 6.0},
        {"use_effective_conv2d": True, "alpha": 2.0},
        {"use_dora": True},
    ],
    "loha": [{}, {"alpha": 5.0}, {"use_effective_conv2d": True}, {"use_dora": True, "alpha": 2.0}],
    "lokr": [
        {"r": 2, "alpha": 3.0},
        {"r": 1, "decompose_factor": 2},
        {"r": 2, "decompose_factor": 4, "decompose_both": True},
        {"r": 16, "alpha": 4.0},
        {"r": 1, "use_effective_conv2d": True, "decompose_factor": 2},
        {"r": 2, "unbalanced_factorization": True},
        {"r": 2, "use_dora": True, "alpha": 1.0},
    ],
    "dylora": [{"r": 4, "block_size": 2, "alpha": 2.0}],
}


def all_cases() -> list[Case]:
    cases = []
    for algorithm, option_sets in _RANKED.items():
        for layer in DENSE:
            for options in option_sets:
                if options.get("use_dora") and layer == "embedding":
                    continue
                options = {"r": 4, **options} if "r" not in options else options
                cases.append(Case(algorithm, layer, options))
    for layer in DENSE:
        if layer == "embedding":
            continue
        cases.append(Case("ia3", layer, {}))  # PEFT's meaning: (W x + b) ⊙ (1 + v)
        cases.append(Case("ia3", layer, {"scale_bias": False}))  # LyCORIS files' meaning: W x ⊙ (1 + v) + b
        cases.append(Case("ia3", layer, {"feedforward_modules": ["layer"]}))
        cases.append(Case("full", layer, {}))
    cases.append(Case("full", "embedding", {}))
    for layer in NORMS:
        cases.append(Case("norm", layer, {}))
    # a multiplier ≠ 1 on a representative set
    for algorithm, options in (
        ("lora", {"r": 4, "use_dora": True}),
        ("loha", {"r": 4}),
        ("lokr", {"r": 2}),
        ("ia3", {}),
        ("ia3", {"scale_bias": False}),
        ("full", {}),
    ):
        for layer in ("linear", "conv2d"):
            cases.append(Case(algorithm, layer, options, multiplier=0.7))
    cases.append(Case("norm", "layer_norm", {}, multiplier=-0.5))
    cases += _rotation_and_glora_cases()
    return cases


#: BOFT's rank per layer: the block size must be even and split the outputs into a power of two of blocks
#: OFT's rank per layer: LyCORIS' factorization of 4 outputs with r = 4 gives blocks of 1, which never rotate
_OFT_RANK = {"conv3d": 2}
_BOFT_RANK = {"linear": 10, "hf_conv1d": 10, "conv2d_circular_stride": 6, "conv2d_1x1": 6, "conv3d": 2}


def _rotation_and_glora_cases() -> list[Case]:
    cases = []
    for layer in DENSE:
        for options in ({}, {"constraint": 0.05}, {"rescaled": True}):
            cases.append(Case("oft", layer, {"r": _OFT_RANK.get(layer, 4), **options}))
            cases.append(Case("boft", layer, {"r": _BOFT_RANK.get(layer, 4), **options}))
        for options in ({}, {"alpha": 3.0}, {"use_rslora": True, "alpha": 6.0}, {"use_effective_conv2d": True}):
            cases.append(Case("glora", layer, {"r": 2, **options}))
    for layer in ("conv1d", "embedding"):
        cases.append(Case("boft", layer, {"r": 4, "boft_m": 1}))
    for layer in ("linear", "conv2d"):
        cases.append(Case("oft", layer, {"r": 4, "rescaled": True, "constraint": 0.05}, multiplier=0.7))
        cases.append(Case("boft", layer, {"r": _BOFT_RANK.get(layer, 4), "rescaled": True}, multiplier=0.7))
        cases.append(Case("glora", layer, {"r": 2, "alpha": 3.0}, multiplier=0.7))
    return cases


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def build(case: Case, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Holder, torch.Tensor]:
    """A seeded holder of the case's layer (random weights, random norm affine) and an input, on :data:`DEVICE`."""
    torch.manual_seed(seed)
    make_layer, make_input = LAYERS[case.layer]
    layer = make_layer()
    if isinstance(layer, (nn.LayerNorm, nn.GroupNorm)):
        with torch.no_grad():
            layer.weight.normal_(1.0, 0.3)
            layer.bias.normal_(0.0, 0.3)
    model = Holder(layer).to(DEVICE, dtype)
    x = make_input(torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    return model, (x.to(dtype) if x.is_floating_point() else x)


def randomize(model: nn.Module, std: float = 0.3) -> None:
    """Give every adapter parameter a random value (so ΔW ≠ 0), keeping DoRA magnitudes near the norm."""
    for module in model.modules():
        if isinstance(module, bl.AdapterLayer):
            for adapter in module.adapters.values():
                with torch.no_grad():
                    for name, param in adapter.named_parameters():
                        if name in ("dora_scale", "rescale"):  # magnitudes: near their init
                            param.mul_(1 + 0.2 * torch.randn_like(param))
                        else:
                            param.normal_(0.0, std)


def layers_of(model: nn.Module) -> list[bl.AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, bl.AdapterLayer)]


def set_mode(model: nn.Module, mode: str) -> None:
    for layer in layers_of(model):
        layer.forward_mode = mode
