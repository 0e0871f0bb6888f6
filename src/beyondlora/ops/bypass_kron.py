"""LoKr's memory-lean bypass: ``result + alpha · (W1 ⊗ W2) x`` without building W1 ⊗ W2.

- :func:`kron_linear` — linear-like layers: ``W1 (X w2_inᵀ) w2_outᵀ`` with x reshaped row-major to X (c × d).
- :func:`kron_conv` — convolutions: the input-side convolution runs on the c input groups folded into the
  batch (:class:`.bypass_conv.ConvBypass`), then W1 mixes the groups and ``w2_out`` maps the rank to W2's
  output channels (:data:`KRON_OUTPUT`).

Both keep x and the factors for backward and, with ``recompute=False``, the input side ``t = X w2_inᵀ``
(c·r values per position) too; ``W1 t`` is never kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .bypass_common import add_output, addmm_output, cast, compute_dtype, grad_like, input_to_save
from .bypass_conv import OutputSide, conv_bypass
from .bypass_merged import merged_linear
from .geometry import LayerGeometry
from .products import kron_delta
from .triton_support import use_fused


def _kron_input_side(x: Tensor, w2_in: Tensor | None, c: int, d: int) -> tuple[Tensor, Tensor]:
    """``grid`` (N·c, d), the rows of X, and ``tT`` (N·r, c): ``t = X w2_inᵀ`` (N, c, r) with its last two
    axes swapped so that W1 acts on it as one matrix product (without ``w2_in``, t = X and r = d)."""
    grid = x.reshape(-1, d)
    t = grid if w2_in is None else grid @ w2_in.t()  # (N·c, r)
    r = t.shape[1]
    return grid, t.reshape(-1, c, r).transpose(1, 2).reshape(-1, c)


def _kron_mix_rows(t_t: Tensor, w1: Tensor, r: int) -> Tensor:
    """``h = W1 t`` as rows (N·a, r) lined up with the output rows (N·a, b)."""
    a = w1.shape[0]
    return (t_t @ w1.t()).reshape(-1, r, a).transpose(1, 2).reshape(-1, r)


class KronLinear(torch.autograd.Function):
    """``result + alpha · (W1 ⊗ W2) x`` with ``W2 = w2_out w2_in`` (or ``w2_out`` itself when ``w2_in`` is None).

    Shapes: result (…, a·b), x (…, c·d), w1 (a, c), w2_in (r, d), w2_out (b, r) (full W2: (b, d)).
    Saves x and the factors; backward recomputes ``t = X w2_inᵀ`` (unless ``recompute`` is False: then t
    (N, c, r) is saved too) and ``W1 t``.
    """

    @staticmethod
    def forward(ctx, result, x, w1, w2_in, w2_out, alpha, recompute):
        dtype = compute_dtype(x, w1)
        c = w1.shape[1]
        d = x.shape[-1] // c
        x_saved = input_to_save(x, dtype)
        w1c, w2_inc, w2_outc = cast(w1, dtype), cast(w2_in, dtype), cast(w2_out, dtype)
        _, t_t = _kron_input_side(cast(x_saved, dtype), w2_inc, c, d)
        r = w2_outc.shape[1]
        out = addmm_output(result, _kron_mix_rows(t_t, w1c, r), w2_outc, alpha, dtype)
        keep = None if recompute or w2_in is None else t_t
        ctx.save_for_backward(x_saved, w1, w2_in, w2_out, keep)
        ctx.meta = (dtype, alpha, x.shape, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, w1, w2_in, w2_out, t_t = ctx.saved_tensors
        dtype, alpha, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, need_w1, need_w2_in, need_w2_out, _, _ = ctx.needs_input_grad
        grad_x, grad_w1, grad_w2_in, grad_w2_out = kron_linear_grads(
            cast(grad.reshape(-1, w2_out.shape[0]), dtype),
            cast(x_saved, dtype),
            t_t,
            (cast(w1, dtype), cast(w2_in, dtype), cast(w2_out, dtype)),
            alpha,
            x_shape,
            (need_x, need_w1, need_w2_in, need_w2_out),
        )
        return (
            cast(grad, result_dtype) if need_result else None,
            cast(grad_x, x_dtype),
            grad_like(grad_w1, w1),
            grad_like(grad_w2_in, w2_in),
            grad_like(grad_w2_out, w2_out),
            None,
            None,
        )


def kron_linear_grads(
    g: Tensor,
    x: Tensor,
    t_t: Tensor | None,
    factors: tuple[Tensor, Tensor | None, Tensor],
    alpha: float,
    x_shape: torch.Size,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂W1, ∂w2_in, ∂w2_out)`` of :class:`KronLinear` for the output gradient g as rows (N·a, b), each
    ``None`` unless ``needs`` (x, W1, w2_in, w2_out) asks; x, the factors (W1, w2_in, w2_out) and g in one
    dtype; ``t_t`` the kept input side or ``None`` (recomputed)."""
    w1, w2_in, w2_out = factors
    need_x, need_w1, need_w2_in, need_w2_out = needs
    (a, c), r = w1.shape, w2_out.shape[1]
    d = x_shape[-1] // c
    if t_t is None:
        grid, t_t = _kron_input_side(x, w2_in, c, d)  # (N·c, d), (N·r, c)
    else:
        grid = x.reshape(-1, d)
    grad_w1 = grad_w2_in = grad_w2_out = grad_x = None
    if need_w2_out:
        # (hᵀ g)ᵀ, not gᵀ h: CPU BLAS runs the r-row orientation several times faster
        grad_w2_out = (_kron_mix_rows(t_t, w1, r).t() @ g).mul_(alpha).t().contiguous()
    gh_t = (g @ (w2_out * alpha)).reshape(-1, a, r).transpose(1, 2).reshape(-1, a)  # (N·r, a)
    if need_w1:
        grad_w1 = gh_t.t() @ t_t
    del t_t
    if need_x or need_w2_in:
        gt = (gh_t @ w1).reshape(-1, r, c).transpose(1, 2).reshape(-1, r)  # (N·c, r)
        if w2_in is None:
            grad_x = gt.reshape(x_shape) if need_x else None
        else:
            if need_w2_in:
                grad_w2_in = gt.t() @ grid
            if need_x:  # written into a fresh tensor, not a view: autograd adds the base's ∂x to it in place
                grad_x = torch.empty(x_shape, dtype=gt.dtype, device=gt.device)
                torch.mm(gt, w2_in, out=grad_x.view(-1, d))
    return grad_x, grad_w1, grad_w2_in, grad_w2_out


def _kron_merged(weight: Tensor, factors: tuple[Tensor, Tensor | None, Tensor], alpha: float) -> Tensor:
    """``W + alpha · W1 ⊗ W2`` with W2 = w2_out w2_in (alpha folded into the small W1)."""
    w1, w2_in, w2_out = factors
    return kron_delta(w1, w2_out if w2_in is None else w2_out @ w2_in, alpha, base=weight)


def _kron_factor_grads(
    g: Tensor, x: Tensor, factors: tuple[Tensor, Tensor | None, Tensor], alpha: float, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    rows = g.reshape(-1, factors[2].shape[0])  # (N·a, b)
    return kron_linear_grads(rows, x, None, factors, alpha, x.shape, (False, *needs))[1:]


def merged_kron_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    w1: Tensor,
    w2_in: Tensor | None,
    w2_out: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    """``x (W + alpha · W1 ⊗ W2)ᵀ + b`` trained without W's gradient (:mod:`.bypass_merged`): the factors'
    gradients by :func:`kron_linear_grads`.  Shapes as in :class:`KronLinear`, weight (a·b, c·d)."""
    return merged_linear(x, weight, bias, alpha, _kron_merged, _kron_factor_grads, (w1, w2_in, w2_out))


def kron_linear(
    result: Tensor,
    x: Tensor,
    w1: Tensor,
    w2_in: Tensor | None,
    w2_out: Tensor,
    alpha: float = 1.0,
    recompute: bool = True,
) -> Tensor:
    """``result + alpha · (W1 ⊗ W2) x`` for linear-like layers (shapes as in :class:`KronLinear`), saving only
    ``x`` and the factors (``recompute=False``: and ``t = X w2_inᵀ``, which backward then does not recompute).

    With ``BEYONDLORA_FUSED=1``, on CUDA tensors with Triton installed, this runs the fused kernels of
    :mod:`.triton_kron` (same result, saving x and the factors only) where their shape limits allow (see
    :mod:`.triton_support`)."""
    if use_fused(x, w1, result, w2_in, w2_out):
        from .triton_kron import FusedKronLinear, kron_supported

        if kron_supported(w1, w2_in, x):
            return FusedKronLinear.apply(result, x, w1, w2_in, w2_out, alpha, recompute)
    return KronLinear.apply(result, x, w1, w2_in, w2_out, alpha, recompute)


def _kron_mix(result: Tensor, t: Tensor, w1: Tensor, w2_out: Tensor | None, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · w2_out (W1 t)`` with t (B·c, r, *S') the input side, result (B, a·b, *S')."""
    a, c = w1.shape
    m = torch.matmul(w1, t.reshape(t.shape[0] // c, c, -1))  # (B, a, r·P)
    m = m.reshape(-1, a, t.shape[1], math.prod(t.shape[2:]))  # (B, a, r, P)
    delta = m if w2_out is None else torch.matmul(w2_out, m)  # (B, a, b, P)
    return add_output(result, delta.reshape(result.shape), alpha, dtype)


def _kron_mix_backward(
    grad: Tensor, t: Tensor, w1: Tensor, w2_out: Tensor | None, alpha: float, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of t, W1 and w2_out for :func:`_kron_mix` (all in t's dtype)."""
    need_t, need_w1, need_w2_out = needs
    a, c = w1.shape
    batch, r = t.shape[0] // c, t.shape[1]
    tc = t.reshape(batch, c, -1)  # (B, c, r·P)
    g = grad.to(t.dtype)
    grad_w2_out = None
    if w2_out is None:
        gm = g.reshape(batch, a, -1) * alpha  # (B, a, r·P)
    else:
        g4 = g.reshape(batch, a, w2_out.shape[0], -1)  # (B, a, b, P)
        if need_w2_out:
            m = torch.matmul(w1, tc).reshape(batch, a, r, -1)  # (B, a, r, P)
            grad_w2_out = torch.tensordot(g4, m, dims=([0, 1, 3], [0, 1, 3])).mul_(alpha)
            del m
        gm = torch.matmul(w2_out.t() * alpha, g4).reshape(batch, a, -1)  # (B, a, r·P)
    grad_w1 = torch.tensordot(gm, tc, dims=([0, 2], [0, 2])) if need_w1 else None
    grad_t = torch.matmul(w1.t(), gm).reshape(t.shape) if need_t else None
    return grad_t, grad_w1, grad_w2_out


KRON_OUTPUT = OutputSide(_kron_mix, _kron_mix_backward)
"""LoKr's output side on convolutions: o1 = W1 (a, c) mixes the c input groups, o2 = w2_out (b, r) (None for a
full W2: then r = b) maps the rank to W2's output channels."""


def kron_conv(
    result: Tensor,
    x: Tensor,
    hidden_fn: Callable[..., Tensor],
    w1: Tensor,
    w2_out: Tensor | None,
    in_factors: tuple[Tensor, ...],
    alpha: float = 1.0,
    recompute: bool = True,
) -> Tensor:
    """``result + alpha · (W1 ⊗ W2) ⊛ x`` for convolutions: ``hidden_fn(x, *in_factors)`` maps x (B, c·d, *S) to
    t (B·c, r, *S') (W2's input side, a convolution on the c input groups folded into the batch), then
    ``w2_out (W1 t)`` gives (B, a·b, *S').

    ``recompute=False`` keeps t for backward instead of recomputing it (one convolution less in backward,
    t's bytes more); ``W1 t`` is never kept.
    """
    return conv_bypass(result, x, hidden_fn, KRON_OUTPUT, w1, w2_out, in_factors, alpha, recompute)


def kron_conv_hidden(
    g: LayerGeometry, c: int, d: int, mode: str, x: Tensor, first: Tensor, core: Tensor | None = None
) -> Tensor:
    """W2's input side on a convolution: x (B, c·d, *S) with the c input groups folded into the batch,
    convolved to (B·c, R, *S') by the full W2 (R = b, ``mode="full"``), ``w2_b`` (R = r, ``"low_rank"``) or
    ``w2_b`` then the Tucker core (``"tucker"``).  Bound with :func:`functools.partial` up to ``x``: a plain
    function and a partial are what ``torch.compile`` traces on every supported torch."""
    grouped = x.reshape(x.shape[0] * c, d, *x.shape[2:])
    if mode == "full":
        return g.conv(grouped, first)
    if mode == "tucker":
        return g.conv(g.pointwise(g.pad_input(grouped), first), core, padded=True)
    return g.conv(grouped, first.reshape(-1, d, *g.kernel))
