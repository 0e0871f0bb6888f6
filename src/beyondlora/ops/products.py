"""Structured products the adapters are built from, and each algorithm's one ΔW builder.

:func:`low_rank_delta` (LoRA), :func:`kron_delta` (LoKr) and :func:`hadamard_delta` (LoHa) are the only places
their ΔW is formed from factor matrices (a Tucker core is first contracted by :func:`tucker_rebuild`): the
rebuild, the combined path's ``W + ΔW`` and the merged training step all call them (with ``base`` the
latter two fuse the sum into the product's own pass).  All functions are pure: tensors
in, tensors out, no state.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tucker_rebuild(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    """Tucker-2 reconstruction ``W[p, q, *k] = Σ_ij core[i, j, *k] · out_factor[i, p] · in_factor[j, q]``.

    Shapes: core (r_o, r_i, *k), out_factor (r_o, out), in_factor (r_i, in) → (out, in, *k).
    """
    return torch.einsum("ij...,ip,jq->pq...", core, out_factor, in_factor)


def kron(small: Tensor, large: Tensor) -> Tensor:
    """Kronecker product ``ΔW[i·b + j, p·d + q, *k] = small[i, p] · large[j, q, *k]``.

    Shapes: small (a, c), large (b, d, *k) → (a·b, c·d, *k).  The kernel dimensions belong to
    ``large`` only, which is the layout LyCORIS and the Stable Diffusion UIs use.
    """
    extra = large.dim() - small.dim()
    # torch.kron views its inputs: an einsum result (Tucker rebuild) can have strides it cannot view
    return torch.kron(small.reshape(*small.shape, *([1] * extra)), large.contiguous())


def low_rank_delta(up: Tensor, down: Tensor, alpha: float = 1.0, base: Tensor | None = None) -> Tensor:
    """LoRA's ΔW ``alpha · up @ down``, or ``base + alpha · up @ down`` in one ``addmm`` (no separate ΔW).

    Shapes: up (out, r), down (r, n), base (out, n) → (out, n).
    """
    if base is not None:
        return torch.addmm(base, up, down, alpha=alpha)
    return (up if alpha == 1.0 else up * alpha) @ down


def kron_delta(small: Tensor, large: Tensor, alpha: float = 1.0, base: Tensor | None = None) -> Tensor:
    """LoKr's ΔW ``alpha · small ⊗ large`` (:func:`kron`, alpha folded into the small factor), or ``base`` plus
    it, added in place into the fresh product.  Shapes as in :func:`kron`; base (a·b, c·d, *k)."""
    delta = kron(small if alpha == 1.0 else small * alpha, large)
    return delta if base is None else delta.add_(base)


def hadamard_delta(
    a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, alpha: float = 1.0, base: Tensor | None = None
) -> Tensor:
    """LoHa's ΔW ``alpha · (a1 b1) ⊙ (a2 b2)`` with the memory-lean backward of :class:`HadamardProduct`, or
    ``base`` plus it in one ``addcmul`` (two rank-r products, not the rank-r² Khatri-Rao one).

    Shapes: a1, a2 (out, r); b1, b2 (r, n); base (out, n) → (out, n).
    """
    if base is not None:
        return torch.addcmul(base, a1 @ b1, a2 @ b2, value=alpha)
    return HadamardProduct.apply(a1 if alpha == 1.0 else a1 * alpha, b1, a2, b2)


def row_khatri_rao(first: Tensor, second: Tensor) -> Tensor:
    """Face-splitting product: row ``o`` is ``first[o] ⊗ second[o]``; (n, r1), (n, r2) → (n, r1·r2)."""
    return (first.unsqueeze(2) * second.unsqueeze(1)).reshape(first.shape[0], -1)


def column_khatri_rao(first: Tensor, second: Tensor) -> Tensor:
    """Column-wise Khatri-Rao product; (r1, n), (r2, n) → (r1·r2, n) with row ``i·r2 + j = first[i] ⊙ second[j]``."""
    return (first.unsqueeze(1) * second.unsqueeze(0)).reshape(-1, first.shape[1])


class HadamardProduct(torch.autograd.Function):
    """``ΔW = (a1 @ b1) ⊙ (a2 @ b2)`` saving only the four factors for backward.

    Shapes: a1, a2 (out, r); b1, b2 (r, n) → (out, n).  Backward rebuilds each product instead of
    keeping two (out, n) intermediates alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a1, b1, a2, b2 = ctx.saved_tensors
        grad_first = grad * (a2 @ b2)
        grad_a1, grad_b1 = grad_first @ b1.t(), a1.t() @ grad_first
        del grad_first
        grad_second = grad * (a1 @ b1)
        return grad_a1, grad_b1, grad_second @ b2.t(), a2.t() @ grad_second


def input_mixed(weight: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``W · (first @ second)`` on W's input axis without forming the (in × in) product: ``(W first) second``.

    Shapes: weight (out, in, *k), first (in, r), second (r, in) → (out, in, *k); the ``r``-wide intermediate
    ``W first`` (out, r, *k) costs out·in·∏k·r multiply-adds, as does the second product.
    """
    if weight.dim() == 2:
        return (weight @ first) @ second
    moved = weight.movedim(1, -1)  # (out, *k, in): the input axis last, so both products are plain matmuls
    return ((moved @ first) @ second).movedim(-1, 1)
