"""Input-side (IA)³'s memory saving: the base op's saved input ``x ⊙ factor`` recomputed in backward."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor


class _Recompute:
    """What :func:`recomputed_if_saved` saves in place of ``x ⊙ factor``."""

    def __init__(self, x: Tensor, factor: Tensor) -> None:
        self.x, self.factor = x, factor


def recomputed_if_saved(scaled: Tensor, x: Tensor, factor: Tensor) -> contextlib.AbstractContextManager:
    """Input-side (IA)³: if the base op saves its input ``scaled = x ⊙ factor`` for backward (a convolution
    does, even with a frozen weight), keep ``x`` (which the product itself saves anyway) and ``factor`` instead
    and recompute the product in backward, so no second input-sized activation stays alive.

    Every other tensor the base op saves goes to the caller's saved-tensor hooks if there are any
    (checkpointing, offloading, memory accounting), else is saved as usual.  A no-op without grad and while
    compiling.
    """
    if not torch.is_grad_enabled() or _compiling():
        return contextlib.nullcontext()
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    outer = top(False) if top is not None else None

    def pack(t: Tensor) -> Any:
        if t is scaled or (
            t.untyped_storage().data_ptr() == scaled.untyped_storage().data_ptr()
            and t.shape == scaled.shape
            and t.stride() == scaled.stride()
            and t.storage_offset() == scaled.storage_offset()
            and t.dtype == scaled.dtype
        ):
            return _Recompute(x.detach(), factor.detach())
        return _Outer(outer[0](t)) if outer else t

    def unpack(saved: Any) -> Tensor:
        if isinstance(saved, _Recompute):
            return saved.x * saved.factor
        return outer[1](saved.packed) if isinstance(saved, _Outer) else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Outer:
    """A tensor packed by the caller's own saved-tensor hooks."""

    def __init__(self, packed: Any) -> None:
        self.packed = packed


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False
