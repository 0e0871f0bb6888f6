"""LoKr's bypass on linear-like layers as fused Triton kernels: ``result + alpha · (W1 ⊗ W2) x`` computed per
token tile as ``W1 (X w2_inᵀ) w2_outᵀ`` (x reshaped row-major to X (c × d)), never building W1 ⊗ W2 and never
writing an intermediate of the activations' size to global memory (only the output, ∂x, and the factors'
partial gradient sums).

Shapes: result (N, a·b), x (N, c·d), W1 (a, c), W2 = w2_out (b, r) · w2_in (r, d), or a full W2 (b, d).
A tile holds BN tokens as BN·c rows of X (one per input group) and BN·a rows of the output; W1 mixes the
groups of each token with one ``tl.dot`` on the tile laid out group-major (:func:`_mix`).

- :func:`_kron_apply_kernel` — the forward, and ∂x alone: ``(W1 ⊗ W2)ᵀ = W1ᵀ ⊗ W2ᵀ`` is the same kernel on
  transposed factors (strides, no copies).
- :func:`_kron_grads_kernel` — the backward: ∂x and the partial sums of the factors' gradients, one slice per
  program (a fixed split of the token tiles, summed afterwards in a fixed order: deterministic).

Products accumulate in float32; their operands are in the compute dtype (the eager path's, see
:func:`.bypass_common.compute_dtype`).  Imported only when :func:`.triton_support.use_fused` says the kernels
run (it imports Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bypass_common import autocasting, cast, compute_dtype, grad_like, input_to_save
from .triton_support import dot_precision, on_device_of, pow2, rows_of, split_count
from .triton_tiles import accumulate_block, dot, load_block, store_block

#: rows (tokens × groups) per forward tile, and column block widths
TILE_ROWS = 64
#: decomposed W2's backward tiles: rows × max(rank, BLOCK_K) at most this many, larger than the forward's
#: tiles since each tile adds its partial sums into the program's slice in global memory (fewer tiles, less
#: traffic); as large as registers allow without spilling for sm_90 (full W2's backward, which holds more
#: rows × BLOCK_K blocks, keeps the forward's rows)
GRAD_TILE = 4096
BLOCK_K = 32
BLOCK_B = 32
#: the largest padded group count (a, c) and rank the kernels hold in registers
MAX_GROUPS = 64
MAX_RANK = 64
#: warps per backward program: with 4, ptxas spilled registers for sm_90 at the larger shapes even with the
#: forward's tiles; with 8 and the backward's tiles, none spilled up to the limits above (Triton 3.9's cubins,
#: cuobjdump -res-usage)
GRAD_WARPS = 8


@triton.jit
def _rows(n0, n_rows, k0, width, groups, stride, BN: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr):
    """Offsets and mask of a (BN·GP, BK) tile of an (N, groups·width) matrix seen as rows (N·groups, width):
    tile row m is token n0 + m // GP, group m % GP; columns k0 … k0 + BK of each group."""
    m = tl.arange(0, BN * GP)
    token = n0 + m // GP
    group = m % GP
    k = k0 + tl.arange(0, BK)
    offs = token[:, None].to(tl.int64) * stride + (group * width)[:, None] + k[None, :]
    mask = (token < n_rows)[:, None] & (group < groups)[:, None] & (k < width)[None, :]
    return offs, mask


@triton.jit
def _load_rows(ptr, n0, n_rows, k0, width, groups, stride, BN: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr):
    """The :func:`_rows` tile, zero outside the matrix."""
    offs, mask = _rows(n0, n_rows, k0, width, groups, stride, BN, GP, BK)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _store_rows(
    ptr, value, n0, n_rows, k0, width, groups, stride, BN: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr
):
    """Stores ``value`` into the :func:`_rows` tile, in the matrix's dtype."""
    offs, mask = _rows(n0, n_rows, k0, width, groups, stride, BN, GP, BK)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix(w, t, BN: tl.constexpr, P_IN: tl.constexpr, P_OUT: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
    """Per token ``w t_n``: w (P_OUT, P_IN), t (BN·P_IN, K) token-major → (BN·P_OUT, K) in float32."""
    t_groups = tl.reshape(tl.permute(tl.reshape(t, (BN, P_IN, K)), (1, 0, 2)), (P_IN, BN * K))
    mixed = dot(w, t_groups, PREC)
    return tl.reshape(tl.permute(tl.reshape(mixed, (P_OUT, BN, K)), (1, 0, 2)), (BN * P_OUT, K))


@triton.jit
def _group_outer(u, v, BN: tl.constexpr, PU: tl.constexpr, PV: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
    """``Σ_n u_n v_nᵀ`` for u (BN·PU, K), v (BN·PV, K) token-major → (PU, PV) in float32."""
    u_groups = tl.reshape(tl.permute(tl.reshape(u, (BN, PU, K)), (1, 0, 2)), (PU, BN * K))
    v_groups = tl.reshape(tl.permute(tl.reshape(v, (BN, PV, K)), (1, 0, 2)), (PV, BN * K))
    return dot(u_groups, tl.trans(v_groups), PREC)


@triton.jit
def _kron_apply_kernel(
    x_ptr, res_ptr, out_ptr, w1_ptr, win_ptr, wout_ptr,
    n_rows, A, C, B, D, R, s_x, s_res, s_out, s_w1_0, s_w1_1, s_in_0, s_in_1, s_out_0, s_out_1, alpha,
    HAS_RES: tl.constexpr, FULL: tl.constexpr, BN: tl.constexpr, AP: tl.constexpr, CP: tl.constexpr,
    RP: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = res + alpha · (W1 ⊗ W2) x for one tile of BN tokens.  W1 (A, C); decomposed: win (R, D),
    wout (B, R); FULL: wout is W2 (B, D).  x (N, C·D) rows, out and res (N, A·B) rows."""
    n0 = tl.program_id(0) * BN
    dt = x_ptr.dtype.element_ty
    w1 = load_block(w1_ptr, 0, A, s_w1_0, 0, C, s_w1_1, AP, CP)
    h = tl.full((BN * AP, RP), 0, dt)
    if not FULL:
        t = tl.full((BN * CP, RP), 0, tl.float32)  # X w2_inᵀ, one row per (token, group)
        for k0 in range(0, D, BK):
            xt = _load_rows(x_ptr, n0, n_rows, k0, D, C, s_x, BN, CP, BK)
            t += dot(xt, load_block(win_ptr, k0, D, s_in_1, 0, R, s_in_0, BK, RP), PREC)  # w2_inᵀ block
        h = _mix(w1, t.to(dt), BN, CP, AP, RP, PREC).to(dt)  # W1 t: (BN·AP, RP)
    for b0 in range(0, B, BB):
        if FULL:
            acc = tl.full((BN * AP, BB), 0, tl.float32)
            for k0 in range(0, D, BK):
                xt = _load_rows(x_ptr, n0, n_rows, k0, D, C, s_x, BN, CP, BK)
                hk = _mix(w1, xt, BN, CP, AP, BK, PREC).to(dt)  # (W1 X)[:, k0:k0+BK]
                acc += dot(hk, load_block(wout_ptr, k0, D, s_out_1, b0, B, s_out_0, BK, BB), PREC)  # W2ᵀ block
        else:
            acc = dot(h, load_block(wout_ptr, 0, R, s_out_1, b0, B, s_out_0, RP, BB), PREC)  # w2_outᵀ block
        acc = alpha * acc
        if HAS_RES:
            acc += _load_rows(res_ptr, n0, n_rows, b0, B, A, s_res, BN, AP, BB).to(tl.float32)
        _store_rows(out_ptr, acc, n0, n_rows, b0, B, A, s_out, BN, AP, BB)


@triton.jit
def _kron_grads_kernel(
    x_ptr, g_ptr, dx_ptr, w1_ptr, win_ptr, wout_ptr, pw1_ptr, pin_ptr, pout_ptr,
    n_rows, A, C, B, D, R, s_x, s_g, s_dx, s_w1_0, s_w1_1, s_in_0, s_in_1, s_out_0, s_out_1, alpha,
    NEED_X: tl.constexpr, FULL: tl.constexpr, BN: tl.constexpr, AP: tl.constexpr, CP: tl.constexpr,
    RP: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward of :func:`_kron_apply_kernel` for the output gradient g (N, A·B): ∂x (when NEED_X, into dx)
    and this program's partial sums over its token tiles of ∂W1 (pw1: (S, A, C)), of ``gᵀ(W1 t)`` (pout:
    (S, B, R); FULL: ``gᵀ(W1 X)`` (S, B, D)) and of ∂w2_in (pin: (S, R, D), decomposed only); the caller
    scales pout by alpha.  ∂W1 = Σ_n ∂H_n T_nᵀ with ∂H = alpha · G w2_out, ∂T = W1ᵀ ∂H, ∂x = ∂T w2_in."""
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    dt = x_ptr.dtype.element_ty
    w1 = load_block(w1_ptr, 0, A, s_w1_0, 0, C, s_w1_1, AP, CP)
    w1_t = load_block(w1_ptr, 0, C, s_w1_1, 0, A, s_w1_0, CP, AP)
    grad_w1 = tl.full((AP, CP), 0, tl.float32)
    for tile in range(split, (n_rows + BN - 1) // BN, n_splits):
        n0 = tile * BN
        if FULL:
            for k0 in range(0, D, BK):
                xt = _load_rows(x_ptr, n0, n_rows, k0, D, C, s_x, BN, CP, BK)
                h = _mix(w1, xt, BN, CP, AP, BK, PREC).to(dt)  # (W1 X)[:, k0:k0+BK]
                dh = tl.full((BN * AP, BK), 0, tl.float32)
                for b0 in range(0, B, BB):
                    gt = _load_rows(g_ptr, n0, n_rows, b0, B, A, s_g, BN, AP, BB)
                    dh += dot(gt, load_block(wout_ptr, b0, B, s_out_0, k0, D, s_out_1, BB, BK), PREC)
                    accumulate_block(pout_ptr + split * B * D, b0, B, D, k0, D, 1, dot(tl.trans(gt), h, PREC), BB, BK)
                dh = (alpha * dh).to(dt)
                grad_w1 += _group_outer(dh, xt, BN, AP, CP, BK, PREC)
                if NEED_X:
                    dx = _mix(w1_t, dh, BN, AP, CP, BK, PREC)
                    _store_rows(dx_ptr, dx, n0, n_rows, k0, D, C, s_dx, BN, CP, BK)
        else:
            t = tl.full((BN * CP, RP), 0, tl.float32)
            for k0 in range(0, D, BK):
                xt = _load_rows(x_ptr, n0, n_rows, k0, D, C, s_x, BN, CP, BK)
                t += dot(xt, load_block(win_ptr, k0, D, s_in_1, 0, R, s_in_0, BK, RP), PREC)
            t_d = t.to(dt)
            h = _mix(w1, t_d, BN, CP, AP, RP, PREC).to(dt)
            dh = tl.full((BN * AP, RP), 0, tl.float32)
            for b0 in range(0, B, BB):
                gt = _load_rows(g_ptr, n0, n_rows, b0, B, A, s_g, BN, AP, BB)
                dh += dot(gt, load_block(wout_ptr, b0, B, s_out_0, 0, R, s_out_1, BB, RP), PREC)
                accumulate_block(pout_ptr + split * B * R, b0, B, R, 0, R, 1, dot(tl.trans(gt), h, PREC), BB, RP)
            dh_d = (alpha * dh).to(dt)
            grad_w1 += _group_outer(dh_d, t_d, BN, AP, CP, RP, PREC)
            d_t = _mix(w1_t, dh_d, BN, AP, CP, RP, PREC).to(dt)  # ∂T = W1ᵀ ∂H: (BN·CP, RP)
            for k0 in range(0, D, BK):
                xt = _load_rows(x_ptr, n0, n_rows, k0, D, C, s_x, BN, CP, BK)
                accumulate_block(pin_ptr + split * R * D, 0, R, D, k0, D, 1, dot(tl.trans(d_t), xt, PREC), RP, BK)
                if NEED_X:
                    dx = dot(d_t, load_block(win_ptr, 0, R, s_in_0, k0, D, s_in_1, RP, BK), PREC)
                    _store_rows(dx_ptr, dx, n0, n_rows, k0, D, C, s_dx, BN, CP, BK)
    store_block(pw1_ptr + split * A * C, 0, A, C, 0, C, 1, grad_w1, AP, CP)


def kron_supported(w1: Tensor, w2_in: Tensor | None, x: Tensor) -> bool:
    """Whether the kernels take these shapes: a linear-like input whose width is c·d, W1's sides and the
    rank no more than :data:`MAX_GROUPS` / :data:`MAX_RANK` (they live in registers)."""
    a, c = w1.shape
    rank_ok = w2_in is None or w2_in.shape[0] <= MAX_RANK
    return x.shape[-1] % c == 0 and max(a, c) <= MAX_GROUPS and rank_ok


def _blocks(a: int, c: int, r: int, grads: bool = False) -> dict[str, int]:
    """Block sizes: BN tokens per tile (:data:`TILE_ROWS` rows of the larger side, or :data:`GRAD_TILE` for
    decomposed W2's backward), the padded sides and rank (r = 0: full W2)."""
    ap, cp, rp = pow2(a), pow2(c), pow2(r)
    rows = GRAD_TILE // max(rp, BLOCK_K) if grads and r else TILE_ROWS
    return {"BN": max(1, rows // max(ap, cp)), "AP": ap, "CP": cp, "RP": rp, "BK": BLOCK_K, "BB": BLOCK_B}


def _strides(w1: Tensor, w2_in: Tensor | None, w2_out: Tensor) -> tuple[int, ...]:
    win = w2_in if w2_in is not None else w2_out  # unused in FULL mode
    return (*w1.stride(), *win.stride(), *w2_out.stride())


def kron_apply(
    x: Tensor,
    result: Tensor | None,
    w1: Tensor,
    w2_in: Tensor | None,
    w2_out: Tensor,
    alpha: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``result + alpha · (W1 ⊗ W2) x`` (without ``result`` when None) as rows (N, a·b) in ``out_dtype``; x
    (N, c·d) rows and the factors in one dtype.  Transposed factors give ``(W1ᵀ ⊗ W2ᵀ) g``, i.e. ∂x."""
    (a, c), b = w1.shape, w2_out.shape[0]
    d, r = x.shape[1] // c, (w2_out.shape[1] if w2_in is not None else 0)
    out = torch.empty((x.shape[0], a * b), dtype=out_dtype, device=x.device)
    blocks = _blocks(a, c, r)
    res = result if result is not None else out
    grid = (triton.cdiv(x.shape[0], blocks["BN"]),)
    with on_device_of(x):
        _kron_apply_kernel[grid](
            x, res, out, w1, w2_in if w2_in is not None else w2_out, w2_out,
            x.shape[0], a, c, b, d, r, x.stride(0), res.stride(0), out.stride(0), *_strides(w1, w2_in, w2_out), alpha,
            HAS_RES=result is not None, FULL=w2_in is None, PREC=dot_precision(x.dtype), **blocks,
        )  # fmt: skip
    return out


def kron_grads(
    g: Tensor,
    x: Tensor,
    w1: Tensor,
    w2_in: Tensor | None,
    w2_out: Tensor,
    alpha: float,
    dx_dtype: torch.dtype,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor]:
    """``(∂x, ∂W1, ∂w2_in, ∂w2_out)`` (full W2: ∂w2_in None, ∂w2_out = ∂W2) for the output gradient g
    (N, a·b) rows, x (N, c·d) rows; factor gradients in float32, ∂x in ``dx_dtype`` (None unless need_x)."""
    (a, c), b = w1.shape, w2_out.shape[0]
    d, r = x.shape[1] // c, (w2_out.shape[1] if w2_in is not None else 0)
    blocks = _blocks(a, c, r, grads=True)
    splits = split_count(triton.cdiv(x.shape[0], blocks["BN"]), a * c + (b * d if w2_in is None else r * (b + d)), x)
    f32 = {"dtype": torch.float32, "device": x.device}
    p_w1 = torch.empty((splits, a, c), **f32)  # every program stores its whole slice
    p_out = torch.zeros((splits, b, d if w2_in is None else r), **f32)
    p_in = torch.zeros((splits, r, d), **f32) if w2_in is not None else p_out
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device) if need_x else x
    with on_device_of(x):
        _kron_grads_kernel[(splits,)](
            x, g, dx, w1, w2_in if w2_in is not None else w2_out, w2_out, p_w1, p_in, p_out,
            x.shape[0], a, c, b, d, r, x.stride(0), g.stride(0), dx.stride(0), *_strides(w1, w2_in, w2_out), alpha,
            NEED_X=need_x, FULL=w2_in is None, PREC=dot_precision(x.dtype), num_warps=GRAD_WARPS, **blocks,
        )  # fmt: skip
    grad_in = p_in.sum(0) if w2_in is not None else None
    return (dx if need_x else None), p_w1.sum(0), grad_in, p_out.sum(0).mul_(alpha)


class FusedKronLinear(torch.autograd.Function):
    """:class:`.bypass_kron.KronLinear` through the kernels: ``result + alpha · (W1 ⊗ W2) x``, same arguments
    (``recompute`` has no effect: only x and the factors are kept, nothing is recomputed but inside the
    kernel tiles), same dtypes in and out."""

    @staticmethod
    def forward(ctx, result, x, w1, w2_in, w2_out, alpha, recompute):
        dtype = compute_dtype(x, w1)
        x_saved = input_to_save(x, dtype)
        rows = rows_of(cast(x_saved, dtype), x.shape[-1])
        factors = [cast(t, dtype) for t in (w1, w2_in, w2_out)]
        out_dtype = dtype if autocasting(result.device.type) else result.dtype
        b = w2_out.shape[0]
        res = rows_of(result, w1.shape[0] * b)
        out = kron_apply(rows, res, *factors, alpha, out_dtype)
        ctx.save_for_backward(x_saved, w1, w2_in, w2_out)
        ctx.meta = (dtype, alpha, x.shape, x.dtype, result.dtype)
        return out.reshape(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x_saved, w1, w2_in, w2_out = ctx.saved_tensors
        dtype, alpha, x_shape, x_dtype, result_dtype = ctx.meta
        need_result, need_x, need_w1, need_w2_in, need_w2_out, _, _ = ctx.needs_input_grad
        w1c, w2_inc, w2_outc = (cast(t, dtype) for t in (w1, w2_in, w2_out))
        g = rows_of(cast(grad, dtype), w1.shape[0] * w2_out.shape[0])
        grad_x = grad_w1 = grad_w2_in = grad_w2_out = None
        if need_w1 or need_w2_in or need_w2_out:
            rows = rows_of(cast(x_saved, dtype), x_shape[-1])
            grad_x, grad_w1, grad_w2_in, grad_w2_out = kron_grads(g, rows, w1c, w2_inc, w2_outc, alpha, x_dtype, need_x)
        elif need_x:  # (W1 ⊗ W2)ᵀ = W1ᵀ ⊗ W2ᵀ, with W2ᵀ = w2_inᵀ w2_outᵀ
            w2_t = (None, w2_outc.t()) if w2_inc is None else (w2_outc.t(), w2_inc.t())
            grad_x = kron_apply(g, None, w1c.t(), *w2_t, alpha, x_dtype)
        return (
            cast(grad, result_dtype) if need_result else None,
            None if grad_x is None else grad_x.reshape(x_shape),
            grad_like(grad_w1, w1) if need_w1 else None,
            grad_like(grad_w2_in, w2_in) if need_w2_in else None,
            grad_like(grad_w2_out, w2_out) if need_w2_out else None,
            None,
            None,
        )
