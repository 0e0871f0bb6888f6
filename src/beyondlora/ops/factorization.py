"""Splitting a dimension into two factors for Kronecker adapters (LyCORIS ``factorization`` semantics)."""

from __future__ import annotations


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(small, large)`` with ``small * large == dimension``.

    - ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``, ordered small first.
    - otherwise the divisor pair is grown from ``(1, dimension)`` towards √dimension while the smaller
      factor stays ≤ ``factor`` (``factor = -1``: no cap), stopping once the sum would grow.

    Examples: 128 → (8, 16); 128 with factor 4 → (4, 32); 320 with factor 64 → (5, 64); 127 → (1, 127).
    """
    if dimension <= 0:
        raise ValueError(f"cannot factorize dimension {dimension}")
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))  # type: ignore[return-value]
    cap = dimension if factor < 0 else factor
    small, large = 1, dimension
    candidate = 1
    while small < large:
        candidate += 1
        while dimension % candidate:
            candidate += 1
        pair_large = dimension // candidate
        if candidate + pair_large > small + large or candidate > cap:
            break
        small, large = candidate, pair_large
    return (small, large) if small <= large else (large, small)


def peft_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """PEFT's ``factorization``: an exact divisor ``factor`` is returned as ``(factor, dimension // factor)``
    unordered; otherwise the same walk as :func:`factorization`."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)
