"""Safe reading and atomic writing of safetensors files, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, empty or corrupt file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (contiguous, detached copies)."""
    ready = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(ready, str(temporary), metadata=metadata)


def check_finite(path: str | Path, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: tensor {key!r} contains NaN or infinite values")
