"""Tile addressing and products shared by the Triton kernels (:mod:`.triton_kron`, :mod:`.triton_khatri_rao`);
imports Triton, so only those modules import it.  Loads and stores go through these helpers so that no
offset variable in a kernel's loops changes shape (compiled Triton rejects loop-carried values that do).

The kernels call no function of Triton's own library that is itself ``@triton.jit`` (``tl.zeros``,
``tl.cdiv``, ``tl.sum``), only its builtins: when triton was imported before ``TRITON_INTERPRET=1`` was set
(torch's inductor imports it), those stay compiled-mode functions that the interpreter refuses to call.
``tl.full(shape, 0, dtype)`` stands in for ``tl.zeros``, :func:`add_over` for ``tl.sum``, and the kernels
divide by hand."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block(r0, n_r, s_r, c0, n_c, s_c, RB: tl.constexpr, CB: tl.constexpr):
    """Offsets and mask of rows r0 … r0 + RB, columns c0 … c0 + CB of an (n_r, n_c) matrix with strides
    (s_r, s_c) (a transposed view is the same matrix with its strides swapped)."""
    r = r0 + tl.arange(0, RB)
    c = c0 + tl.arange(0, CB)
    return r[:, None].to(tl.int64) * s_r + c[None, :] * s_c, (r < n_r)[:, None] & (c < n_c)[None, :]


@triton.jit
def load_block(ptr, r0, n_r, s_r, c0, n_c, s_c, RB: tl.constexpr, CB: tl.constexpr):
    """The (RB, CB) block at (r0, c0) of :func:`block`'s matrix, zero outside it."""
    offs, mask = block(r0, n_r, s_r, c0, n_c, s_c, RB, CB)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_block(ptr, r0, n_r, s_r, c0, n_c, s_c, value, RB: tl.constexpr, CB: tl.constexpr):
    """Stores ``value`` into the (RB, CB) block at (r0, c0), in the matrix's dtype."""
    offs, mask = block(r0, n_r, s_r, c0, n_c, s_c, RB, CB)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def accumulate_block(ptr, r0, n_r, s_r, c0, n_c, s_c, value, RB: tl.constexpr, CB: tl.constexpr):
    """``block += value`` on a slice only this program writes (one split's partial sums: no atomics)."""
    offs, mask = block(r0, n_r, s_r, c0, n_c, s_c, RB, CB)
    tl.store(ptr + offs, tl.load(ptr + offs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """``a @ b`` accumulated in float32; ``PREC`` is :func:`.triton_support.dot_precision`'s answer ("ieee",
    "tf32", or "upcast": the operands are widened to float32 first, exact for bfloat16 ones, where Triton's
    interpreter multiplies bfloat16 blocks wrongly)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def add_over(x, axis: tl.constexpr):
    """``x`` summed over ``axis`` (``tl.sum`` through this module's own combine function)."""
    return tl.reduce(x, axis, _add)
