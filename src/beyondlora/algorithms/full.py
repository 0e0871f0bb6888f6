"""Full: an unconstrained weight (and bias) difference, ``W' = W + diff``, ``b' = b + diff_b``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.geometry import LayerGeometry
from .base import Adapter, AdapterOptions, check_init


def _differences(
    shape: tuple[int, ...], geometry: LayerGeometry, options: AdapterOptions
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A weight difference of ``shape`` and, when the base has a bias, a bias difference (out,):
    zeros (identity), or N(0, 0.02²) with ``init_weights=False``."""
    weight = nn.Parameter(torch.zeros(shape))
    bias = nn.Parameter(torch.zeros(geometry.out_dim)) if geometry.has_bias else None
    if options.init_weights is False:
        with torch.no_grad():
            for param in (weight, bias):
                if param is not None:
                    nn.init.normal_(param, std=0.02)
    return weight, bias


class Full(Adapter):
    """Weight difference on Linear, Conv, Embedding and transformers Conv1D; ``diff_b`` when the base has a bias."""

    algorithm = "full"
    has_rank = False

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        self.diff, self.diff_b = _differences(geometry.weight_shape, geometry, options)

    def delta_weight(self, base_weight: Tensor, draw: object = None, factor: float = 1.0) -> Tensor:
        return self.diff if factor == 1.0 else self.diff * factor

    def delta_bias(self) -> Tensor | None:
        return self.diff_b


class Norm(Adapter):
    """Norm tuning on LayerNorm / GroupNorm: ``γ' = γ + w_norm``, ``β' = β + b_norm``."""

    algorithm = "norm"
    supported_kinds = frozenset({"layer_norm", "group_norm"})
    has_rank = False

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        self.w_norm, self.b_norm = _differences((geometry.out_dim,), geometry, options)

    def delta_weight(self, base_weight: Tensor, draw: object = None, factor: float = 1.0) -> Tensor:
        return self.w_norm * factor

    def delta_bias(self) -> Tensor | None:
        return self.b_norm

    def bypass(self, x: Tensor, draw: object = None) -> Tensor:
        """``normalize(x) ⊙ w_norm`` (the layer adds the bias delta)."""
        return self.geometry.normalized(x) * self.geometry.per_channel(self.w_norm, x.dim())

    def bypass_flops(self, tokens: int) -> float:
        return float(tokens * self.geometry.out_dim * 4)
