"""LyCORIS' ``use_scalar`` for any low-rank adapter: ΔW times a trainable scalar that starts at 0.

With it every factor can start random while the adapter still starts as the identity.  Files carry no
scalar: :func:`bake_scalar` folds it into one factor (ΔW is linear in each factor), so consumers need
nothing new.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..algorithms import Adapter


class ScalarMixin:
    """Mixin for ``use_scalar``: ΔW (and Δb) times a trainable scalar that starts at 0, so every factor
    can start random while the adapter starts as the identity."""

    scalar: nn.Parameter

    def scale_at(self, rank: int) -> torch.Tensor:
        """alpha / rank times the trainable scalar: :attr:`scale`, which every path (bypass, rebuild, merge,
        export) reads, and DyLoRA's block scales come from it."""
        return super().scale_at(rank) * self.scalar


_SCALED_CLASSES: dict[type, type] = {}


def add_scalar(adapter: Adapter) -> None:
    cls = type(adapter)
    scaled = _SCALED_CLASSES.setdefault(cls, type(f"Scaled{cls.__name__}", (ScalarMixin, cls), {}))
    adapter.__class__ = scaled
    weight = next(adapter.parameters())
    adapter.scalar = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device))


def bake_scalar(adapter: Adapter) -> Adapter:
    """The adapter with its ``use_scalar`` scalar folded into one factor (a copy), else itself."""
    if not isinstance(adapter, ScalarMixin):
        return adapter
    baked = copy.deepcopy(adapter)
    with torch.no_grad():
        baked.scalar_factor().mul_(baked.scalar)
    del baked.scalar
    baked.__class__ = type(adapter).__bases__[1]  # (ScalarMixin, the algorithm class)
    return baked
