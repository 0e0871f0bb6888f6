"""GLoRA's merged training step on linear-like layers: ``x (W + alpha · ΔW)ᵀ + b`` with
``ΔW = (W a1) a2 + b1 b2 = L R``, ``L = [W a1, b1]`` (out, 2r) and ``R = [a2; b2]`` (2r, in).

The factors' gradients take the rank-sized route of :mod:`.bypass_merged` — never the full-size ``gᵀ x``:

    ∂R = alpha · (g L)ᵀ x          (2r, in):  ∂a2, ∂b2 its two halves
    ∂L = alpha · gᵀ (x Rᵀ)         (out, 2r): ∂b1 its second half, ∂a1 = Wᵀ · (its first half)

with g (N, out) the output gradient and x (N, in) the input rows.  W gets no gradient (it is frozen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .bypass_merged import merged_linear


def glora_halves(weight: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``L R = W a1 a2 + b1 b2``: L = [W a1, b1] (out, 2r), R = [a2; b2] (2r, in).
    Shapes: weight (out, in), a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in)."""
    return torch.cat([weight @ a1, b1], dim=1), torch.cat([a2, b2])


def _merged(weight: Tensor, factors: Sequence[Tensor], alpha: float) -> Tensor:
    left, right = glora_halves(*factors)
    return torch.addmm(weight, left, right, alpha=alpha)


def _factor_grads(
    g: Tensor, x: Tensor, factors: Sequence[Tensor], alpha: float, needs: Sequence[bool]
) -> list[Tensor | None]:
    weight, a1, a2, b1, b2 = factors
    _, need_a1, need_a2, need_b1, need_b2 = needs
    r = a1.shape[1]
    rows = x.reshape(-1, x.shape[-1])
    left, right = glora_halves(weight, a1, a2, b1, b2)
    grad_a1 = grad_a2 = grad_b1 = grad_b2 = None
    if need_a2 or need_b2:
        grad_right = (g @ left).mul_(alpha).t() @ rows  # (2r, in)
        grad_a2, grad_b2 = grad_right[:r], grad_right[r:]
    if need_a1 or need_b1:
        grad_left = g.t() @ (rows @ right.t()).mul_(alpha)  # (out, 2r)
        grad_a1 = weight.t() @ grad_left[:, :r] if need_a1 else None
        grad_b1 = grad_left[:, r:]
    return [None, grad_a1, grad_a2 if need_a2 else None, grad_b1 if need_b1 else None, grad_b2 if need_b2 else None]


def merged_glora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, alpha: float
) -> Tensor:
    """``x (W + alpha · (W a1 a2 + b1 b2))ᵀ + b`` trained without W's gradient (shapes as in
    :func:`glora_halves`; x (…, in)).  W' is built twice (forward, and for ∂x in backward), each
    ``out·in·r`` for ``W a1`` plus ``out·in·2r`` for ``L R``."""
    return merged_linear(x, weight, bias, alpha, _merged, _factor_grads, (weight, a1, a2, b1, b2))
