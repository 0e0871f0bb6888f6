"""Memory savings by recomputation: a tensor an op saves for backward is rebuilt in backward instead of kept
(input-side (IA)³: the base op's input ``x ⊙ factor``; GLoRA: the base op's input ``A x``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class _Recompute:
    """What :func:`rebuilt_if_saved` saves in place of the tensor it rebuilds."""

    def __init__(self, rebuild: Callable[[], Tensor]) -> None:
        self.rebuild = rebuild


def recomputed_if_saved(scaled: Tensor, x: Tensor, factor: Tensor) -> contextlib.AbstractContextManager:
    """Input-side (IA)³: if the base op saves its input ``scaled = x ⊙ factor`` for backward (a convolution
    does, even with a frozen weight), keep ``x`` (which the product itself saves anyway) and ``factor`` instead
    and recompute the product in backward, so no second input-sized activation stays alive
    (:func:`rebuilt_if_saved`)."""
    x, factor = x.detach(), factor.detach()
    return rebuilt_if_saved(scaled, lambda: x * factor)


def rebuilt_if_saved(target: Tensor, rebuild: Callable[[], Tensor]) -> contextlib.AbstractContextManager:
    """If an op run in this context saves ``target`` for backward, keep ``rebuild`` (a function of detached
    tensors kept anyway, giving ``target``'s values) instead and call it in backward.

    Every other tensor the op saves goes to the caller's saved-tensor hooks if there are any (checkpointing,
    offloading, memory accounting), else is saved as usual.  A no-op without grad and while compiling.
    """
    if not torch.is_grad_enabled() or _compiling():
        return contextlib.nullcontext()
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    outer = top(False) if top is not None else None

    def pack(t: Tensor) -> Any:
        if t is target or (
            t.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
            and t.shape == target.shape
            and t.stride() == target.stride()
            and t.storage_offset() == target.storage_offset()
            and t.dtype == target.dtype
        ):
            return _Recompute(rebuild)
        return _Outer(outer[0](t)) if outer else t

    def unpack(saved: Any) -> Tensor:
        if isinstance(saved, _Recompute):
            return saved.rebuild()
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
