"""When the fused Triton kernels (:mod:`.triton_kron`, :mod:`.triton_khatri_rao`) run instead of the eager bypass.

The environment variable ``BEYONDLORA_FUSED`` decides, read on every call:

- ``1``, ``on`` or ``auto``: fused when every tensor is on a CUDA device and Triton imports;
- unset, ``0``, ``off`` or ``false``: never (the eager path of :mod:`.bypass_kron` / :mod:`.bypass_khatri_rao`).
  Off by default until the kernels have run and been timed on a GPU: so far they are checked in Triton's
  interpreter and compiled for sm_80/sm_90 only;
- ``force``: also on CPU tensors.  Only for tests: there Triton must run its interpreter
  (``TRITON_INTERPRET=1`` set before the kernels' module is first imported).

Each kernel module adds its own shape limits (:func:`.triton_kron.kron_supported`,
:func:`.triton_khatri_rao.khatri_rao_supported`).  Triton is imported lazily, so importing beyondlora never
needs it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

from .bypass_common import compute_dtype

#: dtypes the kernels compute in (the eager path's compute dtype: autocast's, else the promoted one)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: tl.dot needs every dimension of a product at least this large on a GPU: smaller ones are padded
MIN_DOT = 16


def fused_setting() -> str:
    """``"off"``, ``"on"`` or ``"force"`` from ``BEYONDLORA_FUSED`` (see the module docstring)."""
    value = os.environ.get("BEYONDLORA_FUSED", "off").strip().lower()
    if value in ("1", "on", "auto", "true", "yes"):
        return "on"
    return "force" if value == "force" else "off"


@functools.cache
def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_fused(x: Tensor, factor: Tensor, *others: Tensor | None) -> bool:
    """Whether the fused kernels should run for the layer input ``x`` and the factors (``factor`` the one
    that sets the compute dtype with x, see :func:`.bypass_common.compute_dtype`): not inside torch.compile's
    tracing, not turned off, every tensor on a CUDA device (any device with ``force``), a supported compute
    dtype, and Triton installed.  The cheap tests first: this runs on every adapted layer's forward."""
    if _compiling():
        return False
    setting = fused_setting()
    if setting == "off":
        return False
    if setting != "force" and not (x.is_cuda and factor.is_cuda and all(t.is_cuda for t in others if t is not None)):
        return False
    return compute_dtype(x, factor) in FUSED_DTYPES and triton_importable()


def _compiling() -> bool:
    """Whether torch.compile is tracing: it traces the eager path (the kernels are opaque to it)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def pow2(n: int, least: int = MIN_DOT) -> int:
    """The smallest power of two ≥ max(n, least): Triton's block sizes are powers of two."""
    return max(least, 1 << max(0, n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """How the kernels' products treat operands of ``dtype`` (:func:`.triton_tiles.dot`): float32 ones in
    TF32 only where torch's own float32 matrix products use it (``torch.backends.cuda.matmul.allow_tf32``), so
    that the eager and fused paths agree; bfloat16 ones widened to float32 under Triton's interpreter (its
    bfloat16 product is wrong in Triton 3.9: garbage for exact inputs), which is exact for them and
    accumulates in float32 as a GPU does."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def split_count(tiles: int, slice_values: int, x: Tensor) -> int:
    """How many programs share the token tiles of x (N, in) in a backward kernel.  Each owns one slice of
    ``slice_values`` float32 partial sums of the factors' gradients (summed afterwards in a fixed order:
    deterministic, no atomics): two per streaming multiprocessor, never more than there are tiles, and no
    more than keeps all slices within one byte per value of x (a quarter of a float32 copy of it), so that
    backward's transient memory stays a fraction of the activations' however wide the factors are."""
    if x.is_cuda:
        per_device = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        per_device = 2
    return max(1, min(tiles, per_device, x.numel() // (4 * slice_values)))


def rows_of(t: Tensor, width: int) -> Tensor:
    """``t`` as rows (N, width) with unit column stride (a copy only when its layout needs one)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s CUDA device the current one while a kernel launches (Triton launches on the current
    device, which need not be the tensors' one, e.g. a model split across GPUs); nothing for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
