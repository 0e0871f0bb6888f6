"""What the algorithms share to split a fused layer's single-file tensors along its output rows, and to join
the tensors of stacked layers into one fused module.

Fused layers stack the outputs of several layers (Flux's ``img_attn.qkv`` = ``to_q``, ``to_k``, ``to_v``;
``linear1`` = q, k, v and the MLP's input): the fused weight is ``[W_1; W_2; …]`` with ``W_i`` of
``sizes[i]`` rows, so a fused module's ΔW splits into the same row blocks.  Each algorithm says in its own
room (:meth:`~.base.Adapter.split_file_rows`, :meth:`~.base.Adapter.join_file_rows`) when its file form of
a row block is exact; this module has the bookkeeping they share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import FormatError


def row_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, end)]`` of consecutive row blocks of ``sizes``."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def check_rows(rows: int, sizes: Sequence[int], tensor: str, where: str) -> None:
    """Raise unless the fused module's ``rows`` (read from ``tensor``) are exactly Σ ``sizes``."""
    if rows != sum(sizes):
        raise FormatError(f"{where}: {tensor} has {rows} output rows, the fused layer {sum(sizes)} ({list(sizes)})")


def scale_of(params: dict[str, Tensor], rank: int) -> float:
    """The consumers' scale ``alpha / rank`` of one module (alpha defaults to the rank)."""
    alpha = params.get("alpha")
    return 1.0 if alpha is None else float(alpha.double().item()) / rank


def shared(parts: Sequence[dict[str, Tensor] | None], names: Sequence[str]) -> bool:
    """Whether every part is present and holds the same tensors (values and shapes) under ``names``."""
    if any(p is None for p in parts):
        return False
    first = parts[0]
    return all(
        (name in p) == (name in first) and (name not in p or _equal(p[name], first[name]))
        for p in parts
        for name in names
    )


def _equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def stacked(parts: Sequence[dict[str, Tensor]], name: str) -> Tensor:
    """The parts' ``name`` tensors stacked along the rows (dim 0)."""
    return torch.cat([p[name] for p in parts], dim=0)


def block_diagonal(blocks: Sequence[Tensor | None], sizes: Sequence[int], like: Tensor) -> Tensor:
    """``blockdiag(blocks)``, ``None`` blocks standing for ``sizes[i]`` zero rows and no columns (in ``like``'s
    dtype and device)."""
    filled = [b if b is not None else like.new_zeros(size, 0) for b, size in zip(blocks, sizes, strict=True)]
    return torch.block_diag(*filled)


def rank_alpha(rank: int) -> Tensor:
    """The 0-d ``alpha`` giving a module of ``rank`` the consumers' scale 1 (kept in float32, as every alpha)."""
    return torch.tensor(float(rank), dtype=torch.float32)


def present(parts: Sequence[dict[str, Tensor] | None], where: str) -> list[dict[str, Tensor]]:
    """The parts that are there; raises when none is."""
    found = [p for p in parts if p is not None]
    if not found:
        raise FormatError(f"{where}: nothing to join")
    return found
