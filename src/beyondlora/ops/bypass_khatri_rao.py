"""LoHa's memory-lean bypass: ``result + alpha · ((a1 b1) ⊙ (a2 b2)) x`` as the rank-r² product
``(a1 •r a2) ((b1 •c b2) x)`` (row- and column-wise Khatri-Rao products), never building ΔW.

- :func:`khatri_rao_linear` — linear-like layers.
- :func:`khatri_rao_conv` — convolutions (plain and Tucker): the input side is a convolution with
  ``b1 •c b2`` (Tucker cores included), the output side the pointwise ``a1 •r a2`` (:data:`KHATRI_RAO_OUTPUT`).

Both keep x and the four factors for backward (no more than a rank-r LoRA keeps) and, on convolutions with
``recompute=False``, the rank-r² hidden too (recomputing it there costs a convolution); the Khatri-Rao
products themselves are never kept (backward rebuilds them from the factors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .bypass_common import (
    add_output,
    cast,
    compute_dtype,
    conv_grads,
    explicit_padding,
    grad_like,
    input_to_save,
)
from .bypass_conv import OutputSide, conv_bypass
from .bypass_lowrank import low_rank_backward, low_rank_forward
from .bypass_merged import merged_linear
from .geometry import LayerGeometry
from .products import column_khatri_rao, hadamard_delta, row_khatri_rao
from .triton_support import use_fused


def _split_up_grad(grad_up: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of a1 (out, r1), a2 (out, r2) from the gradient of their row-wise Khatri-Rao product."""
    g3 = grad_up.reshape(a1.shape[0], a1.shape[1], a2.shape[1])
    return torch.bmm(g3, a2.unsqueeze(2)).squeeze(2), torch.bmm(a1.unsqueeze(1), g3).squeeze(1)


def _split_down_grad(grad_down: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of b1 (r1, n), b2 (r2, n) from the gradient of their column-wise Khatri-Rao product."""
    g3 = grad_down.reshape(b1.shape[0], b2.shape[0], -1)
    return (g3 * b2.unsqueeze(0)).sum(1), (g3 * b1.unsqueeze(1)).sum(0)


class KhatriRaoLinear(torch.autograd.Function):
    """``result + alpha · ((a1 b1) ⊙ (a2 b2)) x`` as the rank-r² product ``(a1 •r a2) ((b1 •c b2) x)``.

    Shapes: result (…, out), x (…, in), a1, a2 (out, r), b1, b2 (r, in).  Saves x and the four factors only
    (as many bytes as a rank-r LoRA keeps); backward rebuilds the Khatri-Rao factors and the rank-r² hidden
    ``x (b1 •c b2)ᵀ``: one well-shaped GEMM that measured no slower than keeping the hidden (see
    benchmarks/README.md), so there is no mode that keeps it.
    """

    @staticmethod
    def forward(ctx, result, x, a1, b1, a2, b2, alpha):
        dtype = compute_dtype(x, a1)
        x_saved = input_to_save(x, dtype)
        up = row_khatri_rao(cast(a1, dtype), cast(a2, dtype))
        down = column_khatri_rao(cast(b1, dtype), cast(b2, dtype))
        rows = cast(x_saved, dtype).reshape(-1, down.shape[1])
        out, _ = low_rank_forward(result, rows, down, up, alpha, dtype)
        ctx.save_for_backward(x_saved, a1, b1, a2, b2)
        ctx.meta = (dtype, alpha, x.shape, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, a1, b1, a2, b2 = ctx.saved_tensors
        dtype, alpha, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, need_a1, need_b1, need_a2, need_b2, _ = ctx.needs_input_grad
        a1c, b1c, a2c, b2c = (cast(t, dtype) for t in (a1, b1, a2, b2))
        g = cast(grad.reshape(-1, a1.shape[0]), dtype)
        needs = (need_x, need_a1, need_b1, need_a2, need_b2)
        grad_x, *grads = khatri_rao_linear_grads(g, cast(x_saved, dtype), (a1c, b1c, a2c, b2c), alpha, x_shape, needs)
        return (
            cast(grad, result_dtype) if need_result else None,
            cast(grad_x, x_dtype),
            *[grad_like(gi, p) for gi, p in zip(grads, (a1, b1, a2, b2), strict=True)],
            None,
        )


def khatri_rao_linear_grads(
    g: Tensor,
    x: Tensor,
    factors: tuple[Tensor, Tensor, Tensor, Tensor],
    alpha: float,
    x_shape: torch.Size,
    needs: tuple[bool, bool, bool, bool, bool],
) -> list[Tensor | None]:
    """``[∂x, ∂a1, ∂b1, ∂a2, ∂b2]`` of ``alpha · (a1 •r a2)((b1 •c b2) x)`` for the output gradient g as rows
    (N, out), each ``None`` unless ``needs`` (x, a1, b1, a2, b2) asks: the rank-r² route of
    :func:`low_rank_backward`, then the Khatri-Rao products' gradients split back onto the four factors."""
    a1, b1, a2, b2 = factors
    need_x, need_a1, need_b1, need_a2, need_b2 = needs
    up, down = row_khatri_rao(a1, a2), column_khatri_rao(b1, b2)
    rows = x.reshape(-1, down.shape[1])
    low_rank_needs = (need_x, need_b1 or need_b2, need_a1 or need_a2)
    grad_x, grad_down, grad_up = low_rank_backward(g, rows, None, down, up, alpha, x_shape, low_rank_needs)
    grads = [None] * 4
    if grad_up is not None:
        grads[0], grads[2] = _split_up_grad(grad_up, a1, a2)
    if grad_down is not None:
        grads[1], grads[3] = _split_down_grad(grad_down, b1, b2)
    return [grad_x, *grads]


def _hadamard_merged(weight: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor], alpha: float) -> Tensor:
    return hadamard_delta(*factors, alpha, base=weight)


def _hadamard_factor_grads(
    g: Tensor, x: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor], alpha: float, needs: tuple[bool, ...]
) -> list[Tensor | None]:
    return khatri_rao_linear_grads(g, x, factors, alpha, x.shape, (False, *needs))[1:]


def merged_khatri_rao_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a1: Tensor,
    b1: Tensor,
    a2: Tensor,
    b2: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    """``x (W + alpha · (a1 b1) ⊙ (a2 b2))ᵀ + b`` trained without W's gradient (:mod:`.bypass_merged`): the
    factors' gradients by :func:`khatri_rao_linear_grads`.  Shapes as in :class:`KhatriRaoLinear`."""
    factors = (a1, b1, a2, b2)
    return merged_linear(x, weight, bias, alpha, _hadamard_merged, _hadamard_factor_grads, factors)


def khatri_rao_linear(
    result: Tensor,
    x: Tensor,
    a1: Tensor,
    b1: Tensor,
    a2: Tensor,
    b2: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    """``result + alpha · ((a1 b1) ⊙ (a2 b2)) x`` for linear-like layers (shapes as in :class:`KhatriRaoLinear`),
    saving only ``x`` and the factors.

    With ``BEYONDLORA_FUSED=1``, on CUDA tensors with Triton installed, this runs the fused kernels of
    :mod:`.triton_khatri_rao` (same result and saved tensors) where their rank limit allows (see
    :mod:`.triton_support`)."""
    if use_fused(x, a1, result, b1, a2, b2):
        from .triton_khatri_rao import FusedKhatriRaoLinear, khatri_rao_supported

        if khatri_rao_supported(a1, a2):
            return FusedKhatriRaoLinear.apply(result, x, a1, b1, a2, b2, alpha)
    return KhatriRaoLinear.apply(result, x, a1, b1, a2, b2, alpha)


def _khatri_rao_mix(result: Tensor, hidden: Tensor, a1: Tensor, a2: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · (a1 •r a2) ⊛ hidden`` (a pointwise map), hidden (B, r², *S'), a1, a2 (out, r)."""
    delta = torch.matmul(row_khatri_rao(a1, a2), hidden.flatten(2)).reshape(result.shape)
    return add_output(result, delta, alpha, dtype)


def _khatri_rao_mix_backward(
    grad: Tensor, hidden: Tensor, a1: Tensor, a2: Tensor, alpha: float, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of hidden, a1 and a2 for :func:`_khatri_rao_mix` (a1 and a2 come together)."""
    need_hidden, need_a1, need_a2 = needs
    g = grad.to(hidden.dtype).flatten(2)  # (B, out, P)
    grad_a1 = grad_a2 = grad_hidden = None
    if need_a1 or need_a2:
        grad_up = torch.tensordot(g, hidden.flatten(2), dims=([0, 2], [0, 2])).mul_(alpha)
        grad_a1, grad_a2 = _split_up_grad(grad_up, a1, a2)
    if need_hidden:
        grad_hidden = torch.matmul((row_khatri_rao(a1, a2) * alpha).t(), g).reshape(hidden.shape)
    return grad_hidden, grad_a1, grad_a2


KHATRI_RAO_OUTPUT = OutputSide(_khatri_rao_mix, _khatri_rao_mix_backward)
"""LoHa's output side on convolutions: ``a1 •r a2`` (out, r²) from o1 = a1, o2 = a2 (out, r)."""


class KhatriRaoConvKeep(torch.autograd.Function):
    """LoHa on a (non-Tucker) convolution keeping the rank-r² hidden: ``result + alpha · (a1 •r a2) ⊛ hidden``
    with ``hidden = x ⊛ (b1 •c b2)``.  Saves x, the hidden and the four factors; backward rebuilds the
    Khatri-Rao factors and runs the convolution's backward directly (no forward recomputation, and unlike
    :class:`.bypass_conv.MixBypass` no ``b1 •c b2`` kept as a convolution weight)."""

    @staticmethod
    def forward(ctx, result, x, geometry, alpha, a1, b1, a2, b2):
        dtype = compute_dtype(x, a1)
        x_saved = input_to_save(x, dtype)
        g = geometry
        down = column_khatri_rao(cast(b1, dtype), cast(b2, dtype)).reshape(-1, g.in_dim, *g.kernel)
        hidden = g.conv(cast(x_saved, dtype), down)
        out = _khatri_rao_mix(result, hidden, cast(a1, dtype), cast(a2, dtype), alpha, dtype)
        ctx.save_for_backward(x_saved, hidden, a1, b1, a2, b2)
        ctx.meta = (dtype, alpha, geometry, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, hidden, a1, b1, a2, b2 = ctx.saved_tensors
        dtype, alpha, g, x_dtype, result_dtype = ctx.meta
        need_result, need_x, _, _, need_a1, need_b1, need_a2, need_b2 = ctx.needs_input_grad
        a1c, b1c, a2c, b2c = (cast(t, dtype) for t in (a1, b1, a2, b2))
        need_b = need_b1 or need_b2
        grad_hidden, grad_a1, grad_a2 = _khatri_rao_mix_backward(
            grad, hidden, a1c, a2c, alpha, (need_x or need_b, need_a1, need_a2)
        )
        del hidden
        grad_x = grad_b1 = grad_b2 = None
        if need_x or need_b:
            down = column_khatri_rao(b1c, b2c)
            grad_x, grad_down = conv_grads(
                g, cast(x_saved, dtype), down.reshape(-1, g.in_dim, *g.kernel), grad_hidden, need_x, need_b
            )
            if need_b:
                grad_b1, grad_b2 = _split_down_grad(grad_down.reshape(down.shape), b1c, b2c)
        return (
            cast(grad, result_dtype) if need_result else None,
            cast(grad_x, x_dtype),
            None,
            None,
            grad_like(grad_a1, a1),
            grad_like(grad_b1, b1),
            grad_like(grad_a2, a2),
            grad_like(grad_b2, b2),
        )


def khatri_rao_conv(
    result: Tensor,
    x: Tensor,
    hidden_fn: Callable[..., Tensor],
    a1: Tensor,
    a2: Tensor,
    in_factors: tuple[Tensor, ...],
    alpha: float = 1.0,
    recompute: bool = True,
    geometry: LayerGeometry | None = None,
) -> Tensor:
    """``result + alpha · ΔW ⊛ x`` for LoHa on convolutions: ``hidden_fn(x, *in_factors)`` (B, r², *S') is the
    input side (a convolution with ``b1 •c b2``, Tucker cores included), ``(a1 •r a2)`` (out, r²) the output
    side (a1, a2 given as (out, r)).

    ``recompute=False`` keeps the rank-r² hidden for backward instead of recomputing it; given the layer's
    ``geometry`` (and no Tucker cores) :class:`KhatriRaoConvKeep` runs the convolution's backward directly,
    else autograd keeps what ``hidden_fn`` needs.  The Khatri-Rao products are never kept by the former.
    """
    if not recompute and len(in_factors) == 2 and geometry is not None and explicit_padding(geometry):
        return KhatriRaoConvKeep.apply(result, x, geometry, alpha, a1, in_factors[0], a2, in_factors[1])
    return conv_bypass(result, x, hidden_fn, KHATRI_RAO_OUTPUT, a1, a2, in_factors, alpha, recompute)


def khatri_rao_conv_hidden(
    g: LayerGeometry, x: Tensor, b1: Tensor, b2: Tensor, t1: Tensor | None = None, t2: Tensor | None = None
) -> Tensor:
    """LoHa's input side on a convolution: x convolved with ``b1 •c b2`` (r², in, *k), or in Tucker form
    projected by ``b1 •c b2`` (r², in) and then convolved with the Kronecker product of the cores.  Bound to
    its geometry with :func:`functools.partial` (what ``torch.compile`` traces on every supported torch)."""
    down = column_khatri_rao(b1, b2)
    if t1 is None:
        return g.conv(x, down.reshape(-1, g.in_dim, *g.kernel))
    core = torch.einsum("ij...,kl...->ikjl...", t1, t2).flatten(2, 3).flatten(0, 1)
    return g.conv(g.pointwise(g.pad_input(x), down), core, padded=True)
