"""LoHa's bypass on linear-like layers as fused Triton kernels: ``result + alpha · ((a1 b1) ⊙ (a2 b2)) x`` as
the rank-r1·r2 product ``(a1 •r a2) ((b1 •c b2) x)``, with both Khatri-Rao factors built block by block inside
the kernel from the four factors (never as (r², in) or (out, r²) matrices in global memory) and the rank-r²
hidden kept in registers.

Shapes: result (N, out), x (N, in), a1 (out, r1), a2 (out, r2), b1 (r1, in), b2 (r2, in).  Rank index
``j = k·R2P + l`` pairs row k of b1 with row l of b2 (padded to powers of two, the padding zero).

- :func:`_khatri_rao_apply_kernel` — the forward for a tile of BN tokens (all output columns).
- :func:`_khatri_rao_grads_kernel` — the backward: ∂x, and per program (a fixed split of the token tiles)
  partial sums of the four factors' gradients, split from the Khatri-Rao products' gradients inside the
  tile (summed afterwards in a fixed order: deterministic).

Products accumulate in float32 with operands in the compute dtype (:func:`.bypass_common.compute_dtype`).
Imported only when :func:`.triton_support.use_fused` says the kernels run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bypass_common import autocasting, cast, compute_dtype, grad_like, input_to_save
from .triton_support import dot_precision, on_device_of, pow2, rows_of, split_count
from .triton_tiles import accumulate_block, add_over, dot, load_block, store_block

#: tokens per forward tile, and column block widths
BLOCK_N = 32
BLOCK_K = 32
BLOCK_O = 32
#: the largest padded rank product r1·r2 the kernels hold in registers
MAX_RANK2 = 256
#: warps per backward program: with 4, ptxas spilled registers for sm_90 at the larger shapes even with the
#: forward's tiles; with 8 and the backward's tiles, none spilled up to the limits above (Triton 3.9's cubins,
#: cuobjdump -res-usage)
GRAD_WARPS = 8


@triton.jit
def _factor(ptr, s_0, s_1, n_rank, rank_pad: tl.constexpr, c0, n_c, CB: tl.constexpr):
    """Columns c0 … c0 + CB of a (rank, n) factor as a (rank_pad, CB) block in float32, zero outside."""
    return load_block(ptr, 0, n_rank, s_0, c0, n_c, s_1, rank_pad, CB).to(tl.float32)


@triton.jit
def _khatri_rao(f1, f2, R1P: tl.constexpr, R2P: tl.constexpr, CB: tl.constexpr):
    """Column-wise Khatri-Rao block ``f1 •c f2``: (R1P, CB), (R2P, CB) → (R1P·R2P, CB), row k·R2P + l."""
    return tl.reshape(f1[:, None, :] * f2[None, :, :], (R1P * R2P, CB))


@triton.jit
def _split(grad, f1, f2, R1P: tl.constexpr, R2P: tl.constexpr, CB: tl.constexpr):
    """Gradients of f1 (R1P, CB) and f2 (R2P, CB) from the gradient (R1P·R2P, CB) of ``f1 •c f2``."""
    g3 = tl.reshape(grad, (R1P, R2P, CB))
    return add_over(g3 * f2[None, :, :], 1), add_over(g3 * f1[:, None, :], 0)


@triton.jit
def _hidden(x_ptr, b1_ptr, b2_ptr, n0, n_rows, IN, r1, r2, s_x, s_b1_0, s_b1_1, s_b2_0, s_b2_1,
            BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """``x (b1 •c b2)ᵀ`` for BN tokens: (BN, R1P·R2P) in float32."""
    dt = x_ptr.dtype.element_ty
    h = tl.full((BN, R1P * R2P), 0, tl.float32)
    for k0 in range(0, IN, BK):
        xt = load_block(x_ptr, n0, n_rows, s_x, k0, IN, 1, BN, BK)
        down = _khatri_rao(_factor(b1_ptr, s_b1_0, s_b1_1, r1, R1P, k0, IN, BK),
                           _factor(b2_ptr, s_b2_0, s_b2_1, r2, R2P, k0, IN, BK), R1P, R2P, BK)  # fmt: skip
        h += dot(xt, tl.trans(down.to(dt)), PREC)
    return h


@triton.jit
def _khatri_rao_apply_kernel(
    x_ptr, res_ptr, out_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
    n_rows, IN, OUT, r1, r2, s_x, s_res, s_out, s_a1_0, s_a1_1, s_b1_0, s_b1_1, s_a2_0, s_a2_1, s_b2_0, s_b2_1,
    alpha,
    HAS_RES: tl.constexpr, BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, BK: tl.constexpr,
    BO: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = res + alpha · (a1 •r a2)((b1 •c b2) x) for one tile of BN tokens, every output column; the a
    factors are read as (rank, out) through their strides (transposed views)."""
    n0 = tl.program_id(0) * BN
    dt = x_ptr.dtype.element_ty
    h = _hidden(x_ptr, b1_ptr, b2_ptr, n0, n_rows, IN, r1, r2, s_x, s_b1_0, s_b1_1, s_b2_0, s_b2_1,
                BN, R1P, R2P, BK, PREC).to(dt)  # fmt: skip
    for o0 in range(0, OUT, BO):
        up = _khatri_rao(_factor(a1_ptr, s_a1_1, s_a1_0, r1, R1P, o0, OUT, BO),
                         _factor(a2_ptr, s_a2_1, s_a2_0, r2, R2P, o0, OUT, BO), R1P, R2P, BO)  # fmt: skip
        acc = alpha * dot(h, up.to(dt), PREC)
        if HAS_RES:
            acc += load_block(res_ptr, n0, n_rows, s_res, o0, OUT, 1, BN, BO).to(tl.float32)
        store_block(out_ptr, n0, n_rows, s_out, o0, OUT, 1, acc, BN, BO)


@triton.jit
def _khatri_rao_grads_kernel(
    x_ptr, g_ptr, dx_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, pa1_ptr, pb1_ptr, pa2_ptr, pb2_ptr,
    n_rows, IN, OUT, r1, r2, s_x, s_g, s_dx, s_a1_0, s_a1_1, s_b1_0, s_b1_1, s_a2_0, s_a2_1, s_b2_0, s_b2_1,
    alpha,
    NEED_X: tl.constexpr, BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, BK: tl.constexpr,
    BO: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward of :func:`_khatri_rao_apply_kernel` for g (N, OUT): ∂x = alpha · (g up) down (when NEED_X)
    and this program's partial sums of ∂a1ᵀ, ∂a2ᵀ (pa1: (S, r1, OUT), pa2: (S, r2, OUT)) from
    ∂up = gᵀ h and of ∂b1, ∂b2 (pb1: (S, r1, IN), pb2: (S, r2, IN)) from ∂down = (g up)ᵀ x; the caller
    scales them by alpha."""
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    dt = x_ptr.dtype.element_ty
    for tile in range(split, (n_rows + BN - 1) // BN, n_splits):
        n0 = tile * BN
        h = _hidden(x_ptr, b1_ptr, b2_ptr, n0, n_rows, IN, r1, r2, s_x, s_b1_0, s_b1_1, s_b2_0, s_b2_1,
                    BN, R1P, R2P, BK, PREC).to(dt)  # fmt: skip
        dh = tl.full((BN, R1P * R2P), 0, tl.float32)  # g (a1 •r a2)
        for o0 in range(0, OUT, BO):
            gt = load_block(g_ptr, n0, n_rows, s_g, o0, OUT, 1, BN, BO)
            f1 = _factor(a1_ptr, s_a1_1, s_a1_0, r1, R1P, o0, OUT, BO)
            f2 = _factor(a2_ptr, s_a2_1, s_a2_0, r2, R2P, o0, OUT, BO)
            dh += dot(gt, tl.trans(_khatri_rao(f1, f2, R1P, R2P, BO).to(dt)), PREC)
            d1, d2 = _split(dot(tl.trans(h), gt, PREC), f1, f2, R1P, R2P, BO)
            accumulate_block(pa1_ptr + split * r1 * OUT, 0, r1, OUT, o0, OUT, 1, d1, R1P, BO)
            accumulate_block(pa2_ptr + split * r2 * OUT, 0, r2, OUT, o0, OUT, 1, d2, R2P, BO)
        dh_d = dh.to(dt)
        for k0 in range(0, IN, BK):
            xt = load_block(x_ptr, n0, n_rows, s_x, k0, IN, 1, BN, BK)
            f1 = _factor(b1_ptr, s_b1_0, s_b1_1, r1, R1P, k0, IN, BK)
            f2 = _factor(b2_ptr, s_b2_0, s_b2_1, r2, R2P, k0, IN, BK)
            if NEED_X:
                dx = alpha * dot(dh_d, _khatri_rao(f1, f2, R1P, R2P, BK).to(dt), PREC)
                store_block(dx_ptr, n0, n_rows, s_dx, k0, IN, 1, dx, BN, BK)
            d1, d2 = _split(dot(tl.trans(dh_d), xt, PREC), f1, f2, R1P, R2P, BK)
            accumulate_block(pb1_ptr + split * r1 * IN, 0, r1, IN, k0, IN, 1, d1, R1P, BK)
            accumulate_block(pb2_ptr + split * r2 * IN, 0, r2, IN, k0, IN, 1, d2, R2P, BK)


def khatri_rao_supported(a1: Tensor, a2: Tensor) -> bool:
    """Whether the kernels take these ranks: r1·r2, each padded to a power of two, at most :data:`MAX_RANK2`
    (the rank-r² hidden of a token tile lives in registers)."""
    r1p, r2p = _rank_blocks(a1.shape[1], a2.shape[1])
    return r1p * r2p <= MAX_RANK2


def grad_tokens(r1p: int, r2p: int) -> int:
    """Tokens per backward tile: more than forward, since each tile adds its partial sums into the program's
    slice in global memory (fewer tiles, less traffic); as many as registers hold without spilling for sm_90
    (128 up to a padded rank product of 64, measured with cuobjdump on Triton 3.9's cubins)."""
    return 128 if r1p * r2p <= 64 else 64


def _rank_blocks(r1: int, r2: int) -> tuple[int, int]:
    """Padded ranks (R1P, R2P) with R1P·R2P ≥ 16, the least size of a ``tl.dot`` side."""
    r1p = pow2(r1, 1)
    return r1p, pow2(r2, max(1, 16 // r1p))


def _launch_args(factors: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[int, ...]:
    a1, b1, a2, b2 = factors
    return (b1.shape[1], a1.shape[0], a1.shape[1], a2.shape[1])


def _factor_strides(factors: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[int, ...]:
    return tuple(s for f in factors for s in f.stride())


def khatri_rao_apply(
    x: Tensor, result: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor], alpha: float, out_dtype: torch.dtype
) -> Tensor:
    """``result + alpha · (a1 •r a2)((b1 •c b2) x)`` as rows (N, out) in ``out_dtype``; x (N, in) rows, result
    (N, out) rows, factors (a1, b1, a2, b2) in x's dtype."""
    a1, _, a2, _ = factors
    r1p, r2p = _rank_blocks(a1.shape[1], a2.shape[1])
    out = torch.empty((x.shape[0], a1.shape[0]), dtype=out_dtype, device=x.device)
    with on_device_of(x):
        _khatri_rao_apply_kernel[(triton.cdiv(x.shape[0], BLOCK_N),)](
            x, result, out, *factors, x.shape[0], *_launch_args(factors),
            x.stride(0), result.stride(0), out.stride(0), *_factor_strides(factors), alpha,
            HAS_RES=True, BN=BLOCK_N, R1P=r1p, R2P=r2p, BK=BLOCK_K, BO=BLOCK_O, PREC=dot_precision(x.dtype),
        )  # fmt: skip
    return out


def khatri_rao_grads(
    g: Tensor,
    x: Tensor,
    factors: tuple[Tensor, Tensor, Tensor, Tensor],
    alpha: float,
    dx_dtype: torch.dtype,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """``(∂x, ∂a1, ∂b1, ∂a2, ∂b2)`` for the output gradient g (N, out) rows, x (N, in) rows; the factors'
    gradients in float32, ∂x in ``dx_dtype`` (None unless need_x)."""
    a1, b1, a2, b2 = factors
    (n_out, r1), (r2, n_in) = a1.shape, b2.shape
    r1p, r2p = _rank_blocks(r1, r2)
    tokens = grad_tokens(r1p, r2p)
    splits = split_count(triton.cdiv(x.shape[0], tokens), (r1 + r2) * (n_out + n_in), x)
    f32 = {"dtype": torch.float32, "device": x.device}
    partials = [torch.zeros((splits, r, n), **f32) for r, n in ((r1, n_out), (r1, n_in), (r2, n_out), (r2, n_in))]
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device) if need_x else x
    with on_device_of(x):
        _khatri_rao_grads_kernel[(splits,)](
            x, g, dx, *factors, *partials, x.shape[0], *_launch_args(factors),
            x.stride(0), g.stride(0), dx.stride(0), *_factor_strides(factors), alpha,
            NEED_X=need_x, BN=tokens, R1P=r1p, R2P=r2p, BK=BLOCK_K, BO=BLOCK_O, PREC=dot_precision(x.dtype),
            num_warps=GRAD_WARPS,
        )  # fmt: skip
    grad_a1, grad_b1, grad_a2, grad_b2 = (p.sum(0).mul_(alpha) for p in partials)
    return (dx if need_x else None), grad_a1.t(), grad_b1, grad_a2.t(), grad_b2


class FusedKhatriRaoLinear(torch.autograd.Function):
    """:class:`.bypass_khatri_rao.KhatriRaoLinear` through the kernels: ``result + alpha · ((a1 b1) ⊙ (a2 b2)) x``,
    same arguments, same dtypes in and out; saves x and the four factors only."""

    @staticmethod
    def forward(ctx, result, x, a1, b1, a2, b2, alpha):
        dtype = compute_dtype(x, a1)
        x_saved = input_to_save(x, dtype)
        factors = tuple(cast(t, dtype) for t in (a1, b1, a2, b2))
        out_dtype = dtype if autocasting(result.device.type) else result.dtype
        rows = rows_of(cast(x_saved, dtype), x.shape[-1])
        out = khatri_rao_apply(rows, rows_of(result, a1.shape[0]), factors, alpha, out_dtype)
        ctx.save_for_backward(x_saved, a1, b1, a2, b2)
        ctx.meta = (dtype, alpha, x.shape, x.dtype, result.dtype)
        return out.reshape(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x_saved, *params = ctx.saved_tensors
        dtype, alpha, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, *need_factors, _ = ctx.needs_input_grad
        grad_x, *grads = None, None, None, None, None
        if need_x or any(need_factors):
            factors = tuple(cast(t, dtype) for t in params)
            g = rows_of(cast(grad, dtype), params[0].shape[0])
            rows = rows_of(cast(x_saved, dtype), x_shape[-1])
            grad_x, *grads = khatri_rao_grads(g, rows, factors, alpha, x_dtype, need_x)
        return (
            cast(grad, result_dtype) if need_result else None,
            None if grad_x is None else grad_x.reshape(x_shape),
            *[grad_like(gi, p) if n else None for gi, p, n in zip(grads, params, need_factors, strict=True)],
            None,
        )
