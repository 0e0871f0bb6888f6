"""The adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<parameter>`` without the adapter name; adapters other than
``default`` live in a subfolder of their name (PEFT's layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..inject import PlannedAdapter, adapter_layers, save_wrappers
from ..modules_to_save import ModulesToSaveWrapper
from .tensors import check_finite, read_tensors, write_tensors

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def adapter_directory(directory: str | Path, adapter_name: str) -> Path:
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``adapter_name`` in ``model`` under its folder key."""
    state = {}
    for path, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            for name, param in layer.adapters[adapter_name].named_parameters():
                state[f"{KEY_PREFIX}{path}.{name}"] = param
    for path, wrapper in save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                state[f"{KEY_PREFIX}{path}.{name}"] = tensor
    return state


def save_folder(model: nn.Module, directory: str | Path, config: AdapterConfig, adapter_name: str) -> Path:
    """Write one adapter's folder; returns the folder written."""
    if config.algorithm == "mixed":
        raise ValueError(
            f"adapter {adapter_name!r} was read from a single file ({getattr(config, 'source', '')}) and has no "
            "folder config; save it to a .safetensors path"
        )
    target = adapter_directory(directory, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    write_tensors(target / WEIGHTS_NAME, adapter_state(model, adapter_name), metadata={"format": "pt"})
    config.save(target)
    return target


def read_folder(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], Path]:
    """The config and tensors of an adapter folder, and the weights file's path (for error messages)."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"adapter path not found: {directory}")
    config = AdapterConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    return config, read_tensors(weights), weights


def load_planned(
    planned: list[PlannedAdapter], save_modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], source: Path
) -> None:
    """Copy ``tensors`` into the planned (not yet attached) adapters, checking everything first.

    ``save_modules`` maps each ``modules_to_save`` name to the module whose copy will be trained.
    Raises, naming the file, key and shapes, on a missing key, a shape mismatch, NaN/inf, or a key
    that matches no module.  Nothing is modified unless every check passes.
    """
    assignments: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    used: set[str] = set()
    for plan in planned:
        own = dict(plan.adapter.named_parameters())
        assignments.append((plan.adapter, _take(own, f"{KEY_PREFIX}{plan.name}.", tensors, source, used)))
    for name, module in save_modules.items():
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        _take(original.state_dict(), f"{KEY_PREFIX}{name}.", tensors, source, used)
    unused = sorted(set(tensors) - used)
    if unused:
        listed = ", ".join(unused[:8]) + (" …" if len(unused) > 8 else "")
        raise ValueError(f"{source}: {len(unused)} tensor(s) match no adapted module of this model: {listed}")
    for adapter, state in assignments:
        adapter.load_state_dict(state, strict=False, assign=any(p.is_meta for p in adapter.parameters()))


def _take(
    own: dict[str, torch.Tensor], prefix: str, tensors: dict[str, torch.Tensor], source: Path, used: set[str]
) -> dict[str, torch.Tensor]:
    state = {}
    for name, param in own.items():
        key = prefix + name
        if key not in tensors:
            raise ValueError(f"{source}: missing tensor {key!r} (expected shape {tuple(param.shape)})")
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        check_finite(source, key, tensor)
        state[name] = tensor.to(dtype=param.dtype, device=param.device if not param.is_meta else "cpu")
        used.add(key)
    return state
