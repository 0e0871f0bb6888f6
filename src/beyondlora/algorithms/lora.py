"""LoRA / LoCon: ``ΔW = s · up · [mid] · down``.

Parameters (LyCORIS names and shapes): ``lora_down`` (r, in, *k) — or (r, in, 1, …) with the Tucker
core ``lora_mid`` (r, r, *k) when ``use_effective_conv2d`` on a k×k conv — and ``lora_up`` (out, r).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.bypass_common import autocasting
from ..ops.bypass_lowrank import low_rank_linear, low_rank_merged, merged_low_rank_linear
from ..ops.geometry import LayerGeometry
from ..ops.products import tucker_rebuild
from .base import Adapter, AdapterOptions, check_init, fold_scale, kaiming_


class LoRA(Adapter):
    """Low-rank adapter; Linear, Conv (any N-d), Embedding and transformers Conv1D."""

    algorithm = "lora"

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        r, g = options.r, geometry
        self.tucker = bool(options.use_effective_conv2d and g.is_conv and any(k != 1 for k in g.kernel))
        ones = (1,) * len(g.kernel)
        down_shape = (r, g.in_dim, *ones) if self.tucker else (r, g.in_dim, *g.kernel)
        self.lora_down = nn.Parameter(torch.empty(down_shape))
        self.lora_mid = nn.Parameter(torch.empty(r, r, *g.kernel)) if self.tucker else None
        self.lora_up = nn.Parameter(torch.empty(g.out_dim, r))
        self.input_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity init zeroes ``up`` (True and "lycoris" agree); ``init_weights=False`` randomizes all."""
        with torch.no_grad():
            kaiming_(self.lora_down)
            if self.lora_mid is not None:
                kaiming_(self.lora_mid)
            if self.options.init_weights is False:
                kaiming_(self.lora_up)
            else:
                self.lora_up.zero_()

    def factors(self, draw: Any = None) -> tuple[Tensor, Tensor | None, Tensor, float]:
        """``(up, mid, down, scale)`` for this forward; rank dropout masks the columns of ``up``."""
        mask = draw
        up = self.lora_up if mask is None else self.lora_up * mask
        return up, self.lora_mid, self.lora_down, self.scale

    def draw(self) -> Tensor | None:
        return self.rank_mask(self.rank)

    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """``s · up @ down`` reshaped to (out, in, *k); Tucker: ``s · Σ mid[i,j] up[:, i] down[j]``."""
        up, mid, down, scale = self.factors(draw)
        up = up * (scale * factor)
        if mid is not None:
            return tucker_rebuild(mid, up.t(), down.flatten(1))
        return (up @ down.flatten(1)).reshape(self.geometry.weight_shape)

    def add_delta(self, weight: Tensor, base_weight: Tensor, draw: Any = None, multiplier: float = 1.0) -> Tensor:
        """``W + t · s · up @ down`` as one ``addmm`` (one pass over W, no separate ΔW); Tucker, under autocast
        (which would round W to 16 bits before the sum) and factors in another dtype than W (``addmm`` does not
        promote) as the default."""
        up, mid, down, scale = self.factors(draw)
        if mid is not None or autocasting(weight.device.type) or up.dtype != weight.dtype:
            return super().add_delta(weight, base_weight, draw, multiplier)
        up, alpha = fold_scale(up, scale, multiplier)
        return low_rank_merged(weight.flatten(1), (down.flatten(1), up), alpha).view(weight.shape)

    def add_bypass(
        self, result: Tensor, x: Tensor, draw: Any = None, multiplier: float = 1.0, lean: bool = False
    ) -> Tensor | None:
        """Linear-like layers: ``result + t · s · up (down x)`` by :func:`beyondlora.ops.bypass_lowrank.low_rank_linear`
        (its products in the orientation CPU BLAS runs fastest), saving x and the rank-r hidden."""
        if self.geometry.kind not in ("linear", "hf_conv1d"):
            return None
        up, _, down, scale = self.factors(draw)
        up, alpha = fold_scale(up, scale, multiplier)
        return low_rank_linear(result, self.input_dropout(x), down, up, alpha)

    def has_merged_step(self) -> bool:
        """Linear-like layers without input dropout (it exists on the bypass only) or DoRA.  (On a 320-channel
        3×3 convolution the same scheme measured slower than the bypass: see benchmarks/README.md.)"""
        g = self.geometry
        return g.kind in ("linear", "hf_conv1d") and self.options.dropout == 0 and self.dora_scale is None

    def merged_step(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, draw: Any = None, multiplier: float = 1.0
    ) -> Tensor | None:
        """:func:`beyondlora.ops.bypass_lowrank.merged_low_rank_linear` with ``alpha = t · s``."""
        if not self.has_merged_step():
            return None
        up, _, down, scale = self.factors(draw)
        up, alpha = fold_scale(up, scale, multiplier)
        return merged_low_rank_linear(x, weight, bias, down, up, alpha)

    def bypass_parts(self, x: Tensor, draw: Any = None) -> tuple[Tensor, Tensor, float]:
        up, _, down, scale = self.factors(draw)
        x = self.input_dropout(x)
        hidden = F.embedding(x, down.t()) if self.geometry.kind == "embedding" else F.linear(x, down)
        return hidden, up, scale

    def conv_bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        up, mid, down, scale = self.factors(draw)
        g = self.geometry
        if g.groups != 1:
            return None
        x = self.input_dropout(x)
        if mid is None:
            hidden = g.conv(x, down)
        else:
            hidden = g.conv(g.pointwise(g.pad_input(x), down.flatten(1)), mid, padded=True)
        return g.pointwise(hidden, up * scale)

    def bypass_flops(self, tokens: int) -> float:
        g = self.geometry
        if g.kind == "conv" and g.groups != 1:
            return super().bypass_flops(tokens)
        core = self.rank * self.rank * g.kernel_numel if self.tucker else 0
        down = self.rank * g.in_dim * (1 if self.tucker else g.kernel_numel)
        return float(tokens * (down + core + self.rank * g.out_dim))

    def rebuild_flops(self) -> float:
        return float(self.rank * self.lora_down[0].numel() * self.geometry.out_dim)

    def needs_bypass(self) -> bool:
        """Input dropout only exists on the bypass path."""
        return self.training and self.options.dropout > 0


class DyLoRA(LoRA):
    """DyLoRA: a LoRA of rank ``r`` trained one block of ``block_size`` ranks at a time.

    In training each forward draws a block ``b``; ranks ``[0, (b+1)·block)`` are used with scale
    ``alpha / ((b+1)·block)`` (rs-LoRA: ``alpha / √((b+1)·block)``, times a trainable scalar where there is one)
    and only block ``b`` receives gradients.  In eval the full rank is used (scale ``alpha / r``);
    :meth:`truncated_factors` gives the adapter at any smaller rank.
    """

    algorithm = "dylora"

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        if options.block_size <= 0 or options.r % options.block_size:
            raise ValueError(f"DyLoRA needs r ({options.r}) to be a multiple of block_size ({options.block_size})")
        if options.use_effective_conv2d:
            raise ValueError("DyLoRA has no Tucker form (use_effective_conv2d)")
        super().__init__(geometry, options, base_weight)

    def draw(self) -> int | None:
        if not self.training:
            return None
        return int(torch.randint(self.rank // self.options.block_size, ()).item())

    def factors(self, draw: Any = None) -> tuple[Tensor, Tensor | None, Tensor, float]:
        if draw is None:
            return self.lora_up, None, self.lora_down, self.scale
        block = self.options.block_size
        start, stop = draw * block, (draw + 1) * block
        down = torch.cat([self.lora_down[:start].detach(), self.lora_down[start:stop]])
        up = torch.cat([self.lora_up[:, :start].detach(), self.lora_up[:, start:stop]], dim=1)
        return up, None, down, self.scale_at(stop)

    def truncated_factors(self, rank: int) -> tuple[Tensor, Tensor, float]:
        """``(up[:, :rank], down[:rank], scale_at(rank))`` — the adapter cut to ``rank``."""
        if not 0 < rank <= self.rank:
            raise ValueError(f"rank must be in [1, {self.rank}], got {rank}")
        return self.lora_up[:, :rank], self.lora_down[:rank], self.scale_at(rank)
