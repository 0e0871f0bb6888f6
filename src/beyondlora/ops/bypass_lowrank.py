"""LoRA's bypass on linear-like layers: ``result + alpha · up (down x)`` in one autograd node.

Autograd of the plain expression runs two of its four rank-r products in the orientation CPU BLAS handles
worst: a tall (N × out) by skinny (out × r) product, and the (out × N) by (N × r) weight gradient; measured
on one thread for N = 1024, 768 → 768, r = 8 they take 4–8× the time of the same products computed as
r-row results.  Here the hidden is kept transposed, ``hᵀ = down xᵀ`` (r, N), and every product has its
r-sized operand on the left:

    forward:   hᵀ = down xᵀ                  out = result + alpha · (hᵀ)ᵀ upᵀ
    backward:  ĝᵀ = alpha · upᵀ gᵀ  (r, N)   ∂down = ĝᵀ x   ∂x = (ĝᵀ)ᵀ down   ∂up = alpha · (hᵀ g)ᵀ

Saved for backward: x (the caller's storage) and hᵀ, as autograd would save for the plain expression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bypass_common import addmm_output, cast, compute_dtype, grad_like, input_to_save
from .bypass_merged import merged_linear
from .products import low_rank_delta


def low_rank_forward(
    result: Tensor, rows: Tensor, down: Tensor, up: Tensor, alpha: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(result + alpha · (hᵀ)ᵀ upᵀ, hᵀ)`` with ``hᵀ = down rowsᵀ``: rows (N, in) and down (R, in), up (out, R)
    already in ``dtype``; result (…, out) with N rows."""
    hidden_t = F.linear(down, rows)  # (R, N) = down rowsᵀ
    return addmm_output(result, hidden_t.t(), up, alpha, dtype), hidden_t


def low_rank_backward(
    g: Tensor,
    rows: Tensor,
    hidden_t: Tensor | None,
    down: Tensor,
    up: Tensor,
    alpha: float,
    x_shape: torch.Size,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂down, ∂up)`` of :func:`low_rank_forward` for the output gradient g (N, out), each ``None``
    unless ``needs`` (x, down, up) asks for it; ``hidden_t`` ``None`` is recomputed.  ∂x has ``x_shape``."""
    need_x, need_down, need_up = needs
    grad_x = grad_down = grad_up = None
    if need_up:
        hidden_t = F.linear(down, rows) if hidden_t is None else hidden_t
        grad_up = (hidden_t @ g).mul_(alpha).t().contiguous()  # (out, R)
    if need_down or need_x:
        grad_hidden_t = F.linear(up.t() * alpha, g)  # (R, N) = alpha upᵀ gᵀ
        if need_down:
            grad_down = grad_hidden_t @ rows  # (R, in)
        if need_x:
            # matmul's folded result is no view, so autograd can add the base layer's ∂x to it in place
            grad_x = torch.matmul(grad_hidden_t.t().reshape(*x_shape[:-1], -1), down)
    return grad_x, grad_down, grad_up


class LowRankLinear(torch.autograd.Function):
    """``result + alpha · x downᵀ upᵀ``.  Shapes: result (…, out), x (…, in), down (r, in), up (out, r)."""

    @staticmethod
    def forward(ctx, result, x, down, up, alpha):
        dtype = compute_dtype(x, down)
        x_saved = input_to_save(x, dtype)
        rows = cast(x_saved, dtype).reshape(-1, x.shape[-1])  # (N, in)
        out, hidden_t = low_rank_forward(result, rows, cast(down, dtype), cast(up, dtype), alpha, dtype)
        ctx.save_for_backward(x_saved, down, up, hidden_t)
        ctx.meta = (dtype, alpha, x.shape, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, down, up, hidden_t = ctx.saved_tensors
        dtype, alpha, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, need_down, need_up, _ = ctx.needs_input_grad
        rows = cast(x_saved, dtype).reshape(-1, x_shape[-1])
        g = cast(grad.reshape(-1, up.shape[0]), dtype)  # (N, out)
        grad_x, grad_down, grad_up = low_rank_backward(
            g, rows, hidden_t, cast(down, dtype), cast(up, dtype), alpha, x_shape, (need_x, need_down, need_up)
        )
        return (
            cast(grad, result_dtype) if need_result else None,
            cast(grad_x, x_dtype),
            grad_like(grad_down, down),
            grad_like(grad_up, up),
            None,
        )


def _low_rank_merged(weight: Tensor, factors: tuple[Tensor, Tensor], alpha: float) -> Tensor:
    down, up = factors
    return low_rank_delta(up, down, alpha, base=weight)


def _low_rank_factor_grads(
    g: Tensor, x: Tensor, factors: tuple[Tensor, Tensor], alpha: float, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    down, up = factors
    rows = x.reshape(-1, x.shape[-1])
    return low_rank_backward(g, rows, None, down, up, alpha, x.shape, (False, *needs))[1:]


def merged_low_rank_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, alpha: float = 1.0
) -> Tensor:
    """``x (W + alpha · up down)ᵀ + b`` trained without W's gradient (:mod:`.bypass_merged`): W' by one addmm,
    the factors' gradients through the rank-r route of :func:`low_rank_backward`.  Shapes: x (…, in), weight
    (out, in), down (r, in), up (out, r).  Against the bypass (:class:`LowRankLinear`) it trades two rebuilds
    of W' (2·r·in·out multiply-adds) for one rank-r product less over the activations and no separate output
    add or ∂x accumulation: cheaper when ``tokens · (in + out) > 2 · in · out``."""
    return merged_linear(x, weight, bias, alpha, _low_rank_merged, _low_rank_factor_grads, (down, up))


#: Multiply-adds of the forward products ``tokens · r · (in + out)`` from which :class:`LowRankLinear`'s product
#: order pays for its Python forward and backward (≈ 40 µs a call) on a CPU: measured on one thread, autograd of
#: the plain products was faster by 40–130 µs a layer below about 1 M (768 wide, ≤ 64 tokens), and slower by
#: 10–50 % of the adapter's time from about 2 M (768 wide, 256 tokens; 2048 wide, 128 tokens).
ORIENTED_MIN_WORK = 2_000_000


def low_rank_linear(result: Tensor, x: Tensor, down: Tensor, up: Tensor, alpha: float = 1.0) -> Tensor:
    """``result + alpha · up (down x)`` for linear-like layers (shapes as in :class:`LowRankLinear`).

    In training :class:`LowRankLinear` runs on a CPU where the products are large enough for its product order
    to pay (:data:`ORIENTED_MIN_WORK`), and wherever the products run in a wider dtype than x (it keeps x, not
    the cast); elsewhere (small products, and devices whose BLAS takes every orientation alike) autograd runs
    ``result + alpha · (x downᵀ) upᵀ``, which saves the same tensors (x or its smaller cast, and the hidden) and
    spends less Python per call.  Inference runs the products without any autograd node."""
    dtype = compute_dtype(x, down)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (result, x, down, up))):
        rows = cast(x, dtype).reshape(-1, x.shape[-1])
        return low_rank_forward(result, rows, cast(down, dtype), cast(up, dtype), alpha, dtype)[0]
    work = x.numel() // max(x.shape[-1], 1) * down.shape[0] * (down.shape[1] + up.shape[0])
    oriented_pays = x.device.type == "cpu" and work >= ORIENTED_MIN_WORK
    # autograd keeps x as the product reads it: a wider cast (a 16-bit x, float32 factors) would be kept too
    keeps_x_or_less = x.dtype == dtype or dtype.itemsize < x.element_size()
    if oriented_pays or not keeps_x_or_less:
        return LowRankLinear.apply(result, x, down, up, alpha)
    hidden = F.linear(cast(x, dtype).reshape(-1, x.shape[-1]), cast(down, dtype))  # (N, R): autograd's best order
    return addmm_output(result, hidden, cast(up, dtype), alpha, dtype)
