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


def read_pickled_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a PyTorch pickle (older PEFT's ``adapter_model.bin``), never unpickling arbitrary objects."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path} cannot be read safely as tensors: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors")
    return state


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (contiguous, detached copies)."""
    ready = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(ready, str(temporary), metadata=metadata)


def check_finite(path: str | Path, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: tensor {key!r} contains NaN or infinite values")
