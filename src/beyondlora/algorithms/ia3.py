"""(IA)³: learned per-channel scaling, ``W' = W ⊙ (1 + v)``.

``v`` (LyCORIS ``weight``) scales output channels (rows of W) or, with ``on_input`` (PEFT's
``feedforward_modules``), input channels (columns).  The bias is never scaled.  Its bypass is done by the
layer, which folds ``1 + v`` into the base layer's input or output instead of a second matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.geometry import LayerGeometry
from .base import Adapter, AdapterOptions, check_init


class IA3(Adapter):
    """(IA)³ on Linear, Conv (any N-d) and transformers Conv1D."""

    algorithm = "ia3"
    supported_kinds = frozenset({"linear", "conv", "hf_conv1d"})
    depends_on_base = True
    has_rank = False

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        if options.on_input and geometry.groups != 1:
            raise ValueError("(IA)³ on the input channels of a grouped convolution is not supported")
        self.on_input = options.on_input
        self.weight = nn.Parameter(torch.zeros(geometry.in_dim if options.on_input else geometry.out_dim))
        if options.init_weights is False:
            with torch.no_grad():
                nn.init.normal_(self.weight, std=0.1)

    def delta_weight(self, base_weight: Tensor, draw: object = None, factor: float = 1.0) -> Tensor:
        """``W ⊙ (factor · v)`` along the output axis (or the input axis with ``on_input``)."""
        v = self.weight * factor
        if self.on_input:
            return base_weight * v.reshape(1, -1, *([1] * (base_weight.dim() - 2)))
        return base_weight * v.reshape(-1, *([1] * (base_weight.dim() - 1)))

    def channel_scale(self) -> Tensor:
        return self.weight

    def bypass_flops(self, tokens: int) -> float:
        return float(tokens * self.weight.numel())

    def rebuild_flops(self) -> float:
        """``W ⊙ v`` and ``W + ΔW``: two memory-bound passes over the weight, for one over the output."""
        return 2.0 * super().rebuild_flops()
