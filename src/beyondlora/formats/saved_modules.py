"""Whole modules saved beside an adapter (PEFT's ``modules_to_save``, e.g. a trained classifier head).

A PEFT folder stores them under ``base_model.model.<module path>.<tensor>``; a single file under
``beyondlora_saved.<module path>.<tensor>``, a module key no UI maps to a layer (ComfyUI and AUTOMATIC1111
report it as a key they did not load and apply the adapter), with the module list in the
``beyondlora_modules_to_save`` metadata entry.  Reading them back checks every tensor against the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import FormatError
from ..host.inject import save_wrappers
from ..host.modules_to_save import ModulesToSaveWrapper
from ..host.targeting import find_modules_to_save

#: the single-file module key that holds saved modules, and the metadata entry listing them
SAVED_KEY = "beyondlora_saved"
SAVED_METADATA = "beyondlora_modules_to_save"


def saved_tensors(model: nn.Module, adapter_name: str, key_for: Callable[[str, str], str]) -> dict[str, torch.Tensor]:
    """The state of every module saved whole for ``adapter_name``, each tensor under ``key_for(module, tensor)``."""
    tensors = {}
    for path, wrapper in save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                tensors[key_for(path, name)] = tensor
    return tensors


def saved_module_names(model: nn.Module, adapter_name: str) -> list[str]:
    """The modules saved whole for ``adapter_name``, by path."""
    return [path for path, wrapper in save_wrappers(model) if adapter_name in wrapper.modules_to_save]


def read_saved_states(
    model: nn.Module,
    entries: list[str] | None,
    tensors: dict[str, torch.Tensor],
    key_for: Callable[[str, str], str],
    source: Path | str,
) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """``({module path: state}, keys used)`` for the modules ``entries`` names in ``model``: every tensor of
    each module's state must be in ``tensors`` under ``key_for(module, tensor)`` with the module's shape."""
    states, used = {}, set()
    for name in find_modules_to_save(model, entries):
        module = model.get_submodule(name)
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        state = {}
        for key, expected in original.state_dict().items():
            full = key_for(name, key)
            if full not in tensors:
                raise FormatError(f"{source}: missing tensor {full!r} (expected shape {tuple(expected.shape)})")
            if tensors[full].shape != expected.shape:
                found = tuple(tensors[full].shape)
                raise FormatError(f"{source}: tensor {full!r} has shape {found}, expected {tuple(expected.shape)}")
            state[key] = tensors[full]
            used.add(full)
        states[name] = state
    return states, used


def single_file_key(module: str, tensor: str) -> str:
    return f"{SAVED_KEY}.{module}.{tensor}"


def single_file_saved_states(
    model: nn.Module, saved: dict[str, torch.Tensor], metadata: dict[str, str], source: Path | str
) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """``(entries, states)`` of a single file's saved modules (``saved``: its ``beyondlora_saved`` tensors,
    names after the module key); every saved tensor must belong to a listed module."""
    if not saved:
        return [], {}
    if SAVED_METADATA not in metadata:
        raise FormatError(f"{source}: has {SAVED_KEY} tensors but no {SAVED_METADATA} entry naming their modules")
    entries = json.loads(metadata[SAVED_METADATA])
    full = {f"{SAVED_KEY}.{name}": tensor for name, tensor in saved.items()}
    states, used = read_saved_states(model, entries, full, single_file_key, source)
    unused = sorted(set(full) - used)
    if unused:
        raise FormatError(f"{source}: saved tensor(s) {unused[:4]} belong to no module listed in {SAVED_METADATA}")
    return entries, states
