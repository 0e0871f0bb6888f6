"""Memory-lean bypass products: custom autograd functions that save the layer input and the (small) factors
for backward and recompute activation-sized intermediates there instead of storing them.

Each function computes ``result + alpha · ΔW x`` (the adapter's output added to the base output in the same
op) for one structured ΔW.  With ``recompute=True`` what autograd keeps alive between forward and backward
is no more than a LoRA of the same rank keeps: the layer input ``x`` (the same storage the caller holds, not
a copy, unless a dtype cast makes a smaller copy) plus parameter-sized tensors; backward recomputes the
input-side half of the adapter's forward (for LoKr about a rank-r LoRA's down projection, for LoHa a rank-r²
one).

- :func:`kron_linear` — LoKr on linear-like layers: ``W1 (X w2_inᵀ) w2_outᵀ`` with x reshaped to X (c × d).
- :func:`kron_conv` — LoKr on convolutions: the input-side convolution runs on the c input groups folded
  into the batch, then W1 mixes the groups and ``w2_out`` maps the rank to W2's output channels.
- :func:`khatri_rao_linear` — LoHa on linear-like layers as a rank-r² LoRA with Khatri-Rao factors.
- :func:`khatri_rao_conv` — LoHa on convolutions (plain and Tucker), same form.

Where recomputing costs a convolution or a rank-r² projection (LoKr on convolutions, LoHa), ``recompute=False``
keeps that one rank-sized input-side result for backward instead (still never the Khatri-Rao products or
``W1 t``): faster, but more bytes than a rank-r LoRA keeps.

Dtypes: the products run in the autocast dtype when autocast is on for the input's device (as autocast would
run them), else in the promoted dtype of input and factors; gradients come back in each input's dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .geometry import LayerGeometry
from .products import column_khatri_rao, row_khatri_rao


def autocasting(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def compute_dtype(x: Tensor, factor: Tensor) -> torch.dtype:
    """The dtype the adapter's products run in: autocast's when it is on, else the promoted dtype."""
    device_type = x.device.type
    if autocasting(device_type):
        try:
            return torch.get_autocast_dtype(device_type)
        except AttributeError:  # torch < 2.4
            return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    return torch.promote_types(x.dtype, factor.dtype)


def _input_to_save(x: Tensor, dtype: torch.dtype) -> Tensor:
    """What to keep of the layer input: the input itself (shared storage), or its cast when that is smaller."""
    if x.dtype != dtype and torch.empty((), dtype=dtype).element_size() < x.element_size():
        return x.to(dtype)
    return x


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _grad_like(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


def _add_output(result: Tensor, delta: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · delta`` in one pass; the output keeps ``result``'s dtype unless autocasting."""
    if result.dtype == dtype:
        return torch.add(result, delta, alpha=alpha)
    if autocasting(result.device.type):
        return torch.add(result.to(dtype), delta, alpha=alpha)
    return torch.add(result, delta.mul_(alpha).to(result.dtype))


def _addmm_output(result: Tensor, hidden: Tensor, up: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · hidden @ upᵀ`` with rows lined up (result reshaped to rows of ``up.shape[0]``)."""
    rows = result.reshape(-1, up.shape[0])
    if rows.dtype == dtype:
        return torch.addmm(rows, hidden, up.t(), alpha=alpha).reshape(result.shape)
    if autocasting(result.device.type):
        return torch.addmm(rows.to(dtype), hidden, up.t(), alpha=alpha).reshape(result.shape)
    return torch.add(rows, (hidden @ up.t()).mul_(alpha).to(rows.dtype)).reshape(result.shape)


# --------------------------------------------------------------------------------------------------
# LoKr
# --------------------------------------------------------------------------------------------------
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
        (a, c), b = w1.shape, w2_out.shape[0]
        d = x.shape[-1] // c
        x_saved = _input_to_save(x, dtype)
        w1c, w2_inc, w2_outc = _cast(w1, dtype), _cast(w2_in, dtype), _cast(w2_out, dtype)
        _, t_t = _kron_input_side(x_saved.to(dtype), w2_inc, c, d)
        r = w2_outc.shape[1]
        out = _addmm_output(result, _kron_mix_rows(t_t, w1c, r), w2_outc, alpha, dtype)
        keep = None if recompute or w2_in is None else t_t
        ctx.save_for_backward(x_saved, w1, w2_in, w2_out, keep)
        ctx.meta = (dtype, alpha, a, b, c, d, x.shape, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, w1, w2_in, w2_out, t_t = ctx.saved_tensors
        dtype, alpha, a, b, c, d, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, need_w1, need_w2_in, need_w2_out, _, _ = ctx.needs_input_grad
        w1c, w2_inc, w2_outc = _cast(w1, dtype), _cast(w2_in, dtype), _cast(w2_out, dtype)
        if t_t is None:
            grid, t_t = _kron_input_side(x_saved.to(dtype), w2_inc, c, d)  # (N·c, d), (N·r, c)
        else:
            grid = x_saved.to(dtype).reshape(-1, d)
        g = grad.reshape(-1, b).to(dtype)  # (N·a, b)
        r = w2_outc.shape[1]
        grad_w1 = grad_w2_in = grad_w2_out = grad_x = None
        if need_w2_out:
            grad_w2_out = (g.t() @ _kron_mix_rows(t_t, w1c, r)).mul_(alpha)
        gh_t = (g @ (w2_outc * alpha)).reshape(-1, a, r).transpose(1, 2).reshape(-1, a)  # (N·r, a)
        if need_w1:
            grad_w1 = gh_t.t() @ t_t
        del t_t
        if need_x or need_w2_in:
            gt = (gh_t @ w1c).reshape(-1, r, c).transpose(1, 2).reshape(-1, r)  # (N·c, r)
            if w2_in is None:
                grad_x = gt.reshape(x_shape) if need_x else None
            else:
                if need_w2_in:
                    grad_w2_in = gt.t() @ grid
                if need_x:
                    grad_x = (gt @ w2_inc).reshape(x_shape)
        return (
            grad.to(result_dtype) if need_result else None,
            None if grad_x is None else grad_x.to(x_dtype),
            _grad_like(grad_w1, w1),
            _grad_like(grad_w2_in, w2_in),
            _grad_like(grad_w2_out, w2_out),
            None,
            None,
        )


def kron_linear(
    result: Tensor,
    x: Tensor,
    w1: Tensor,
    w2_in: Tensor | None,
    w2_out: Tensor,
    alpha: float = 1.0,
    recompute: bool = True,
) -> Tensor:
    """``result + alpha · (W1 ⊗ W2) x`` for linear-like layers, saving only ``x`` and the factors
    (``recompute=False``: and ``t = X w2_inᵀ``, which backward then does not recompute)."""
    return KronLinear.apply(result, x, w1, w2_in, w2_out, alpha, recompute)


def _recompute(fn: Callable, inputs: list[Tensor | None], needs: list[bool]) -> tuple[Tensor, Callable]:
    """``fn(*inputs)`` recomputed (detached) and a function mapping its gradient to the inputs' gradients
    (``None`` for those that need none).  Autograd tracks the recomputation only when a gradient is needed."""
    track = any(needs)
    with torch.enable_grad() if track else torch.no_grad():
        leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
        out = fn(*leaves)

    def grads_of(grad: Tensor) -> list[Tensor | None]:
        wanted = [t for t, n in zip(leaves, needs, strict=True) if t is not None and n]
        found = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return [next(found) if t is not None and n else None for t, n in zip(leaves, needs, strict=True)]

    return out.detach(), grads_of


def _kron_mix(result: Tensor, t: Tensor, w1: Tensor, w2_out: Tensor | None, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · w2_out (W1 t)`` with t (B·c, r, *S') the input side, result (B, a·b, *S')."""
    a, c = w1.shape
    m = torch.matmul(w1, t.reshape(t.shape[0] // c, c, -1))  # (B, a, r·P)
    m = m.reshape(-1, a, t.shape[1], math.prod(t.shape[2:]))  # (B, a, r, P)
    delta = m if w2_out is None else torch.matmul(w2_out, m)  # (B, a, b, P)
    return _add_output(result, delta.reshape(result.shape), alpha, dtype)


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


class KronConv(torch.autograd.Function):
    """``result + alpha · (W1 ⊗ W2) ⊛ x`` for convolutions, recomputing the input side in backward.

    ``hidden_fn(x, *in_factors)`` maps x (B, c·d, *S) to t (B·c, r, *S') (W2's input side, a convolution on
    the c input groups folded into the batch); W1 (a, c) mixes the groups and ``w2_out`` (b, r) (None when
    W2 is full: then r = b) maps the rank to W2's output channels.  Saves x and the factors.
    """

    @staticmethod
    def forward(ctx, result, x, alpha, hidden_fn, w1, w2_out, *in_factors):
        dtype = compute_dtype(x, w1)
        x_saved = _input_to_save(x, dtype)
        t = hidden_fn(x_saved.to(dtype), *[_cast(f, dtype) for f in in_factors])
        out = _kron_mix(result, t, _cast(w1, dtype), _cast(w2_out, dtype), alpha, dtype)
        ctx.save_for_backward(x_saved, w1, w2_out, *in_factors)
        ctx.meta = (dtype, alpha, hidden_fn, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, w1, w2_out, *in_factors = ctx.saved_tensors
        dtype, alpha, hidden_fn, x_dtype, result_dtype = ctx.meta
        need_result, need_x, _, _, need_w1, need_w2_out, *need_in = ctx.needs_input_grad
        in_c = [_cast(f, dtype) for f in in_factors]
        t, grads_of = _recompute(hidden_fn, [x_saved.to(dtype), *in_c], [need_x, *need_in])
        need_t = need_x or any(need_in)
        grad_t, grad_w1, grad_w2_out = _kron_mix_backward(
            grad, t, _cast(w1, dtype), _cast(w2_out, dtype), alpha, (need_t, need_w1, need_w2_out)
        )
        del t
        grad_x, *grad_in = grads_of(grad_t) if need_t else [None] * (1 + len(in_factors))
        return (
            grad.to(result_dtype) if need_result else None,
            None if grad_x is None else grad_x.to(x_dtype),
            None,
            None,
            _grad_like(grad_w1, w1),
            _grad_like(grad_w2_out, w2_out),
            *[_grad_like(gi, f) for gi, f in zip(grad_in, in_factors, strict=True)],
        )


class KronMix(torch.autograd.Function):
    """``result + alpha · w2_out (W1 t)`` for a given input side t (B·c, r, *S'): saves t (not ``W1 t``)."""

    @staticmethod
    def forward(ctx, result, t, w1, w2_out, alpha):
        dtype = compute_dtype(t, w1)
        t_saved = t.to(dtype)
        out = _kron_mix(result, t_saved, _cast(w1, dtype), _cast(w2_out, dtype), alpha, dtype)
        ctx.save_for_backward(t_saved, w1, w2_out)
        ctx.meta = (dtype, alpha, t.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        t, w1, w2_out = ctx.saved_tensors
        dtype, alpha, t_dtype, result_dtype = ctx.meta
        need_result, need_t, need_w1, need_w2_out, _ = ctx.needs_input_grad
        grad_t, grad_w1, grad_w2_out = _kron_mix_backward(
            grad, t, _cast(w1, dtype), _cast(w2_out, dtype), alpha, (need_t, need_w1, need_w2_out)
        )
        return (
            grad.to(result_dtype) if need_result else None,
            None if grad_t is None else grad_t.to(t_dtype),
            _grad_like(grad_w1, w1),
            _grad_like(grad_w2_out, w2_out),
            None,
        )


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
    """``result + alpha · (W1 ⊗ W2) ⊛ x``; see :class:`KronConv`.

    ``recompute=False`` keeps the input side t (B·c, r, *S') for backward instead of recomputing it (one
    convolution less in backward, t's bytes more); ``W1 t`` is never kept.
    """
    if recompute:
        return KronConv.apply(result, x, alpha, hidden_fn, w1, w2_out, *in_factors)
    return KronMix.apply(result, hidden_fn(x.to(compute_dtype(x, w1)), *in_factors), w1, w2_out, alpha)


# --------------------------------------------------------------------------------------------------
# LoHa
# --------------------------------------------------------------------------------------------------
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

    Shapes: result (…, out), x (…, in), a1, a2 (out, r), b1, b2 (r, in).  Saves x and the four factors;
    backward rebuilds the Khatri-Rao factors and (``recompute``; else it is saved too) the rank-r² hidden
    ``x (b1 •c b2)ᵀ``.
    """

    @staticmethod
    def forward(ctx, result, x, a1, b1, a2, b2, alpha, recompute):
        dtype = compute_dtype(x, a1)
        x_saved = _input_to_save(x, dtype)
        up = row_khatri_rao(_cast(a1, dtype), _cast(a2, dtype))
        down = column_khatri_rao(_cast(b1, dtype), _cast(b2, dtype))
        hidden = x_saved.to(dtype).reshape(-1, down.shape[1]) @ down.t()
        out = _addmm_output(result, hidden, up, alpha, dtype)
        ctx.save_for_backward(x_saved, a1, b1, a2, b2, None if recompute else hidden)
        ctx.meta = (dtype, alpha, x.shape, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, a1, b1, a2, b2, hidden = ctx.saved_tensors
        dtype, alpha, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, need_a1, need_b1, need_a2, need_b2, _, _ = ctx.needs_input_grad
        a1c, b1c, a2c, b2c = (t.to(dtype) for t in (a1, b1, a2, b2))
        up, down = row_khatri_rao(a1c, a2c), column_khatri_rao(b1c, b2c)
        rows = x_saved.to(dtype).reshape(-1, down.shape[1])
        g = grad.reshape(-1, up.shape[0]).to(dtype)
        grads = [None] * 4
        if need_a1 or need_a2:
            grad_up = g.t() @ (rows @ down.t() if hidden is None else hidden)
            grads[0], grads[2] = _split_up_grad(grad_up.mul_(alpha), a1c, a2c)
        gh = g @ (up * alpha)  # (N, r²)
        grad_x = (gh @ down).reshape(x_shape).to(x_dtype) if need_x else None
        if need_b1 or need_b2:
            grads[1], grads[3] = _split_down_grad(gh.t() @ rows, b1c, b2c)
        return (
            grad.to(result_dtype) if need_result else None,
            grad_x,
            *[_grad_like(gi, p) for gi, p in zip(grads, (a1, b1, a2, b2), strict=True)],
            None,
            None,
        )


def khatri_rao_linear(
    result: Tensor,
    x: Tensor,
    a1: Tensor,
    b1: Tensor,
    a2: Tensor,
    b2: Tensor,
    alpha: float = 1.0,
    recompute: bool = True,
) -> Tensor:
    """``result + alpha · ((a1 b1) ⊙ (a2 b2)) x`` for linear-like layers, saving only ``x`` and the factors
    (``recompute=False``: and the rank-r² hidden, which backward then does not recompute)."""
    return KhatriRaoLinear.apply(result, x, a1, b1, a2, b2, alpha, recompute)


def _khatri_rao_mix(result: Tensor, hidden: Tensor, up: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · up ⊛ hidden`` (a pointwise map), hidden (B, r², *S'), up (out, r²)."""
    delta = torch.matmul(up, hidden.flatten(2)).reshape(result.shape)
    return _add_output(result, delta, alpha, dtype)


def _khatri_rao_mix_backward(
    grad: Tensor, hidden: Tensor, a1: Tensor, a2: Tensor, alpha: float, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of hidden, a1 and a2 for :func:`_khatri_rao_mix` with ``up = a1 •r a2``."""
    need_hidden, need_a = needs
    g = grad.to(hidden.dtype).flatten(2)  # (B, out, P)
    grad_a1 = grad_a2 = grad_hidden = None
    if need_a:
        grad_up = torch.tensordot(g, hidden.flatten(2), dims=([0, 2], [0, 2])).mul_(alpha)
        grad_a1, grad_a2 = _split_up_grad(grad_up, a1, a2)
    if need_hidden:
        grad_hidden = torch.matmul((row_khatri_rao(a1, a2) * alpha).t(), g).reshape(hidden.shape)
    return grad_hidden, grad_a1, grad_a2


class KhatriRaoConv(torch.autograd.Function):
    """``result + alpha · ΔW ⊛ x`` for LoHa on convolutions: ``hidden_fn(x, *in_factors)`` (B, r², *S') is the
    input side (a convolution with the column-wise Khatri-Rao product of the b factors, Tucker cores
    included), ``a1 •r a2`` (out, r²) the output side (``a1``, ``a2`` given as (out, r)).  Saves x and the
    factors; backward recomputes the input-side convolution."""

    @staticmethod
    def forward(ctx, result, x, alpha, hidden_fn, a1, a2, *in_factors):
        dtype = compute_dtype(x, a1)
        x_saved = _input_to_save(x, dtype)
        hidden = hidden_fn(x_saved.to(dtype), *[_cast(f, dtype) for f in in_factors])
        out = _khatri_rao_mix(result, hidden, row_khatri_rao(_cast(a1, dtype), _cast(a2, dtype)), alpha, dtype)
        ctx.save_for_backward(x_saved, a1, a2, *in_factors)
        ctx.meta = (dtype, alpha, hidden_fn, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, a1, a2, *in_factors = ctx.saved_tensors
        dtype, alpha, hidden_fn, x_dtype, result_dtype = ctx.meta
        need_result, need_x, _, _, need_a1, need_a2, *need_in = ctx.needs_input_grad
        in_c = [_cast(f, dtype) for f in in_factors]
        hidden, grads_of = _recompute(hidden_fn, [x_saved.to(dtype), *in_c], [need_x, *need_in])
        need_hidden = need_x or any(need_in)
        grad_hidden, grad_a1, grad_a2 = _khatri_rao_mix_backward(
            grad, hidden, a1.to(dtype), a2.to(dtype), alpha, (need_hidden, need_a1 or need_a2)
        )
        del hidden
        grad_x, *grad_in = grads_of(grad_hidden) if need_hidden else [None] * (1 + len(in_factors))
        return (
            grad.to(result_dtype) if need_result else None,
            None if grad_x is None else grad_x.to(x_dtype),
            None,
            None,
            _grad_like(grad_a1, a1),
            _grad_like(grad_a2, a2),
            *[_grad_like(gi, f) for gi, f in zip(grad_in, in_factors, strict=True)],
        )


class KhatriRaoMix(torch.autograd.Function):
    """``result + alpha · (a1 •r a2) ⊛ hidden`` for a given input side hidden (B, r², *S'): saves hidden and
    a1, a2 (not their Khatri-Rao product)."""

    @staticmethod
    def forward(ctx, result, hidden, a1, a2, alpha):
        dtype = compute_dtype(hidden, a1)
        hidden_saved = hidden.to(dtype)
        out = _khatri_rao_mix(result, hidden_saved, row_khatri_rao(_cast(a1, dtype), _cast(a2, dtype)), alpha, dtype)
        ctx.save_for_backward(hidden_saved, a1, a2)
        ctx.meta = (dtype, alpha, hidden.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, a1, a2 = ctx.saved_tensors
        dtype, alpha, hidden_dtype, result_dtype = ctx.meta
        need_result, need_hidden, need_a1, need_a2, _ = ctx.needs_input_grad
        grad_hidden, grad_a1, grad_a2 = _khatri_rao_mix_backward(
            grad, hidden, a1.to(dtype), a2.to(dtype), alpha, (need_hidden, need_a1 or need_a2)
        )
        return (
            grad.to(result_dtype) if need_result else None,
            None if grad_hidden is None else grad_hidden.to(hidden_dtype),
            _grad_like(grad_a1, a1),
            _grad_like(grad_a2, a2),
            None,
        )


def conv_grads(
    geometry: LayerGeometry, x: Tensor, weight: Tensor, grad: Tensor, need_x: bool, need_weight: bool
) -> tuple[Tensor | None, Tensor | None] | None:
    """Gradients of ``geometry.conv(x, weight)`` (one group) for the output gradient ``grad``, from the saved
    input and weight, without running the convolution again; ``None`` when the padding has no explicit
    symmetric form (``padding="same"`` with an odd total)."""
    n = len(geometry.kernel)
    padding = geometry.padding
    if geometry.padding_mode != "zeros":
        padding = (0,) * n  # explicit padding first (geometry.pad_input), as geometry.conv does
    elif isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * n
        else:
            total = [dil * (k - 1) for dil, k in zip(geometry.dilation, geometry.kernel, strict=True)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    with torch.enable_grad() if need_x and geometry.padding_mode != "zeros" else contextlib.nullcontext():
        leaf = x.detach().requires_grad_(need_x) if geometry.padding_mode != "zeros" else x
        padded = geometry.pad_input(leaf)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad,
        padded.detach(),
        weight,
        None,
        list(geometry.stride),
        list(padding),
        list(geometry.dilation),
        False,
        [0] * n,
        1,
        [need_x, need_weight, False],
    )
    if need_x and geometry.padding_mode != "zeros":
        grad_x = torch.autograd.grad(padded, leaf, grad_x)[0]
    return grad_x, grad_w


class KhatriRaoConvKeep(torch.autograd.Function):
    """LoHa on a (non-Tucker) convolution keeping the rank-r² hidden: ``result + alpha · (a1 •r a2) ⊛ hidden``
    with ``hidden = x ⊛ (b1 •c b2)``.  Saves x, the hidden and the four factors; backward rebuilds the
    Khatri-Rao factors and runs the convolution's backward directly (no forward recomputation)."""

    @staticmethod
    def forward(ctx, result, x, geometry, alpha, a1, b1, a2, b2):
        dtype = compute_dtype(x, a1)
        x_saved = _input_to_save(x, dtype)
        g = geometry
        down = column_khatri_rao(_cast(b1, dtype), _cast(b2, dtype)).reshape(-1, g.in_dim, *g.kernel)
        hidden = g.conv(x_saved.to(dtype), down)
        out = _khatri_rao_mix(result, hidden, row_khatri_rao(_cast(a1, dtype), _cast(a2, dtype)), alpha, dtype)
        ctx.save_for_backward(x_saved, hidden, a1, b1, a2, b2)
        ctx.meta = (dtype, alpha, geometry, x.dtype, result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, hidden, a1, b1, a2, b2 = ctx.saved_tensors
        dtype, alpha, g, x_dtype, result_dtype = ctx.meta
        need_result, need_x, _, _, need_a1, need_b1, need_a2, need_b2 = ctx.needs_input_grad
        a1c, b1c, a2c, b2c = (t.to(dtype) for t in (a1, b1, a2, b2))
        need_b = need_b1 or need_b2
        grad_hidden, grad_a1, grad_a2 = _khatri_rao_mix_backward(
            grad, hidden, a1c, a2c, alpha, (need_x or need_b, need_a1 or need_a2)
        )
        del hidden
        grad_x = grad_b1 = grad_b2 = None
        if need_x or need_b:
            down = column_khatri_rao(b1c, b2c)
            grad_x, grad_down = conv_grads(
                g, x_saved.to(dtype), down.reshape(-1, g.in_dim, *g.kernel), grad_hidden, need_x, need_b
            )
            if need_b:
                grad_b1, grad_b2 = _split_down_grad(grad_down.reshape(down.shape), b1c, b2c)
        return (
            grad.to(result_dtype) if need_result else None,
            None if grad_x is None else grad_x.to(x_dtype),
            None,
            None,
            _grad_like(grad_a1, a1),
            _grad_like(grad_b1, b1),
            _grad_like(grad_a2, a2),
            _grad_like(grad_b2, b2),
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
) -> Tensor:
    """``result + alpha · ΔW ⊛ x`` for LoHa on convolutions; see :class:`KhatriRaoConv`.

    ``recompute=False`` keeps the rank-r² hidden for backward instead of recomputing it
    (:class:`KhatriRaoConvKeep`; in Tucker form autograd keeps what the input side's two convolutions need);
    the Khatri-Rao products are never kept.
    """
    if recompute:
        return KhatriRaoConv.apply(result, x, alpha, hidden_fn, a1, a2, *in_factors)
    geometry = getattr(hidden_fn, "geometry", None)
    if len(in_factors) == 2 and geometry is not None and _explicit_padding(geometry):
        return KhatriRaoConvKeep.apply(result, x, geometry, alpha, a1, in_factors[0], a2, in_factors[1])
    return KhatriRaoMix.apply(result, hidden_fn(x.to(compute_dtype(x, a1)), *in_factors), a1, a2, alpha)


def _explicit_padding(geometry: LayerGeometry) -> bool:
    """Whether :func:`conv_grads` can run this geometry's convolution backward."""
    if geometry.padding_mode != "zeros" or not isinstance(geometry.padding, str) or geometry.padding == "valid":
        return True
    return not any(dil * (k - 1) % 2 for dil, k in zip(geometry.dilation, geometry.kernel, strict=True))
