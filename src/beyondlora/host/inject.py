"""Building adapters for a model and attaching them: two phases, so a failure changes nothing."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..algorithms import ALGORITHMS, Adapter
from ..algorithms.common import adapter_dtype
from ..config import AdapterConfig
from ..ops.geometry import LayerGeometry
from .layers import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .targeting import find_modules_to_save, find_targets


@dataclass
class PlannedAdapter:
    """An adapter built for module ``name`` but not yet attached to the model."""

    name: str
    module: nn.Module
    adapter: Adapter


def plan_adapters(model: nn.Module, config: AdapterConfig, low_cpu_mem_usage: bool = False) -> list[PlannedAdapter]:
    """Build one adapter per targeted module without touching ``model``."""
    cls = ALGORITHMS[config.algorithm]
    planned = []
    for name, module in find_targets(model, config):
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        try:
            geometry = LayerGeometry.of(base)
            if geometry.kind not in cls.supported_kinds:
                raise TypeError(f"{config.algorithm} cannot adapt a {geometry.kind} layer")
            weight = geometry.canonical_weight(base)
            device = torch.device("meta") if low_cpu_mem_usage else weight.device
            with device if low_cpu_mem_usage else contextlib.nullcontext():
                adapter = cls(geometry, config.options_for(name), weight.detach().to(device))
            adapter.to(device=device, dtype=adapter_dtype(weight))
        except (TypeError, ValueError) as error:
            raise type(error)(f"module {name!r} ({type(base).__name__}): {error}") from None
        planned.append(PlannedAdapter(name, module, adapter))
    return planned


def attach(
    model: nn.Module,
    planned: list[PlannedAdapter],
    adapter_name: str,
    forward_mode: str = "auto",
    backward_memory: str = "auto",
) -> None:
    """Put the planned adapters into ``model``, wrapping plain modules in :class:`AdapterLayer`; the layers
    take ``forward_mode`` and ``backward_memory`` (see :class:`beyondlora.config.AdapterConfig`)."""
    for plan in planned:
        layer = plan.module
        if not isinstance(layer, AdapterLayer):
            layer = AdapterLayer(plan.module).train(plan.module.training)
            replace_submodule(model, plan.name, layer)
        layer.add_adapter(adapter_name, plan.adapter)
        layer.forward_mode = forward_mode
        layer.backward_memory = backward_memory


def attach_modules_to_save(model: nn.Module, names: list[str] | None, adapter_name: str) -> None:
    for name in find_modules_to_save(model, names):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            replace_submodule(model, name, module)
        module.add(adapter_name)


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule at the dotted path ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def save_wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
