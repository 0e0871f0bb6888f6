"""Progress bars for the tools: tqdm when installed (the ``progress`` extra), else none."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, unit: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a progress bar on stderr (only when it is a terminal and tqdm is installed)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        yield from items
        return
    yield from tqdm(items, desc=description, unit=unit, total=total, disable=None, leave=False)
