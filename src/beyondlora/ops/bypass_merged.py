"""Training through ``W + ΔW`` without W's full-size gradient: the merged step every factorized adapter shares.

    forward:   out = x W'ᵀ + b          W' = W + alpha · ΔW(factors)   (one rebuild, one GEMM)
    backward:  ∂x = g W' (W' rebuilt)   the factors' gradients through the adapter's rank-sized route

Autograd of the plain expression would form ∂W' = gᵀ x, a full-size product, and only then the factors'
gradients; here each adapter supplies how to build W' and how to get its factors' gradients from g and x
directly (:mod:`.bypass_lowrank`, :mod:`.bypass_kron`, :mod:`.bypass_khatri_rao`).  Saves x (the caller's
storage) and the factors; W and b get no gradient; x, W and the factors share one dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``merged(weight, factors, alpha)`` → W' (out, in)
MergedWeight = Callable[[Tensor, Sequence[Tensor | None], float], Tensor]
#: ``factor_grads(g, x, factors, alpha, needs)`` → one gradient (or None) per factor; g (N, out) the output
#: gradient as rows, ``needs`` one flag per factor
FactorGrads = Callable[[Tensor, Tensor, Sequence[Tensor | None], float, Sequence[bool]], Sequence[Tensor | None]]


class MergedLinear(torch.autograd.Function):
    """``x (W + alpha · ΔW)ᵀ + b`` with W' built by ``merged`` and the factors' gradients by ``factor_grads``.
    Shapes: x (…, in), weight (out, in), bias (out,) or None, factors as the adapter has them."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, merged, factor_grads, *factors):
        ctx.save_for_backward(x, weight, *factors)
        ctx.meta = (alpha, merged, factor_grads)
        return F.linear(x, merged(weight, factors, alpha), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *factors = ctx.saved_tensors
        alpha, merged, factor_grads = ctx.meta
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ merged(weight, factors, alpha)).reshape(x.shape)
        grads = factor_grads(g, x, factors, alpha, ctx.needs_input_grad[6:])
        return grad_x, None, None, None, None, None, *grads


def merged_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    alpha: float,
    merged: MergedWeight,
    factor_grads: FactorGrads,
    factors: Sequence[Tensor | None],
) -> Tensor:
    """:class:`MergedLinear` applied to ``factors``."""
    return MergedLinear.apply(x, weight, bias, alpha, merged, factor_grads, *factors)
