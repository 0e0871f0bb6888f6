"""The convolution bypass shared by LoKr and LoHa: an input side (a convolution with the adapter's input
factors, recomputed in backward or kept) followed by a pointwise output side (the adapter's output factors).

``result + alpha · out(hidden_fn(x))``: ``hidden_fn(x, *in_factors)`` maps the layer input x (B, in, *S) to a
rank-sized hidden (LoKr: (B·c, r, *S'), LoHa: (B, r², *S')); an :class:`OutputSide` maps the hidden with two
output factors to the layer's output channels and gives the gradients of that map.  The adapters' own
output sides are in :mod:`.bypass_kron` and :mod:`.bypass_khatri_rao`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .bypass_common import cast, compute_dtype, grad_like, input_to_save, recompute


class OutputSide(NamedTuple):
    """An adapter's pointwise output side with two output factors ``o1``, ``o2`` (``o2`` may be None).

    ``add(result, hidden, o1, o2, alpha, dtype)`` returns ``result + alpha · out(hidden)`` (result
    (B, out, *S')); ``grads(grad, hidden, o1, o2, alpha, (need_hidden, need_o1, need_o2))`` returns the
    gradients of hidden, o1 and o2 (``None`` where not needed) in hidden's dtype.
    """

    add: Callable[[Tensor, Tensor, Tensor, Tensor | None, float, torch.dtype], Tensor]
    grads: Callable[
        [Tensor, Tensor, Tensor, Tensor | None, float, tuple[bool, bool, bool]],
        tuple[Tensor | None, Tensor | None, Tensor | None],
    ]


class ConvBypass(torch.autograd.Function):
    """``result + alpha · out(hidden_fn(x, *in_factors))`` saving x and the factors only: backward recomputes
    the input-side hidden (one convolution more in backward, no activation-sized tensor kept but x)."""

    @staticmethod
    def forward(ctx, result, x, alpha, hidden_fn, side, o1, o2, *in_factors):
        dtype = compute_dtype(x, o1)
        x_saved = input_to_save(x, dtype)
        hidden = hidden_fn(cast(x_saved, dtype), *[cast(f, dtype) for f in in_factors])
        out = side.add(result, hidden, cast(o1, dtype), cast(o2, dtype), alpha, dtype)
        ctx.save_for_backward(x_saved, o1, o2, *in_factors)
        ctx.meta = (dtype, alpha, hidden_fn, side, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, o1, o2, *in_factors = ctx.saved_tensors
        dtype, alpha, hidden_fn, side, x_dtype, result_dtype = ctx.meta
        need_result, need_x, _, _, _, need_o1, need_o2, *need_in = ctx.needs_input_grad
        in_c = [cast(f, dtype) for f in in_factors]
        hidden, grads_of = recompute(hidden_fn, [cast(x_saved, dtype), *in_c], [need_x, *need_in])
        need_hidden = need_x or any(need_in)
        grad_hidden, grad_o1, grad_o2 = side.grads(
            grad, hidden, cast(o1, dtype), cast(o2, dtype), alpha, (need_hidden, need_o1, need_o2)
        )
        del hidden
        grad_x, *grad_in = grads_of(grad_hidden) if need_hidden else [None] * (1 + len(in_factors))
        return (
            cast(grad, result_dtype) if need_result else None,
            cast(grad_x, x_dtype),
            None,
            None,
            None,
            grad_like(grad_o1, o1),
            grad_like(grad_o2, o2),
            *[grad_like(gi, f) for gi, f in zip(grad_in, in_factors, strict=True)],
        )


class MixBypass(torch.autograd.Function):
    """``result + alpha · out(hidden)`` for a given input-side hidden: saves the hidden (in the compute dtype)
    and the two output factors, never the output side's intermediates."""

    @staticmethod
    def forward(ctx, result, hidden, alpha, side, o1, o2):
        dtype = compute_dtype(hidden, o1)
        hidden_saved = cast(hidden, dtype)
        out = side.add(result, hidden_saved, cast(o1, dtype), cast(o2, dtype), alpha, dtype)
        ctx.save_for_backward(hidden_saved, o1, o2)
        ctx.meta = (dtype, alpha, side, hidden.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, o1, o2 = ctx.saved_tensors
        dtype, alpha, side, hidden_dtype, result_dtype = ctx.meta
        need_result, need_hidden, _, _, need_o1, need_o2 = ctx.needs_input_grad
        grad_hidden, grad_o1, grad_o2 = side.grads(
            grad, hidden, cast(o1, dtype), cast(o2, dtype), alpha, (need_hidden, need_o1, need_o2)
        )
        return (
            cast(grad, result_dtype) if need_result else None,
            cast(grad_hidden, hidden_dtype),
            None,
            None,
            grad_like(grad_o1, o1),
            grad_like(grad_o2, o2),
        )


def conv_bypass(
    result: Tensor,
    x: Tensor,
    hidden_fn: Callable[..., Tensor],
    side: OutputSide,
    o1: Tensor,
    o2: Tensor | None,
    in_factors: tuple[Tensor, ...],
    alpha: float = 1.0,
    recompute: bool = True,
) -> Tensor:
    """``result + alpha · out(hidden_fn(x, *in_factors))`` with ``out`` the output side ``side`` with factors
    o1, o2; x (B, in, *S), result (B, out, *S').

    ``recompute=True`` (:class:`ConvBypass`) keeps x and the factors only; ``recompute=False``
    (:class:`MixBypass`) keeps the hidden as well (autograd keeps what ``hidden_fn`` needs), so backward
    runs one convolution less.
    """
    if recompute:
        return ConvBypass.apply(result, x, alpha, hidden_fn, side, o1, o2, *in_factors)
    return MixBypass.apply(result, hidden_fn(x.to(compute_dtype(x, o1)), *in_factors), alpha, side, o1, o2)
