"""Which modules of a model get an adapter.

Name forms (``target_modules``, ``exclude_modules``, ``modules_to_save``, ``feedforward_modules``):
a list of exact names or dotted suffixes, a regex string matched against the whole name, or
``"all-linear"``.  Everything here only reads the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from ..algorithms.config_base import AdapterConfig, RankConfig, name_matches
from ..ops.geometry import layer_kind
from .layers import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper

DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    """The layer number in ``name`` after one of ``patterns`` (``encoder.layer.3.attn`` → 3)."""
    candidates = [patterns] if isinstance(patterns, str) else (patterns or DEFAULT_LAYERS_PATTERNS)
    for pattern in candidates:
        match = re.match(rf"(?:.*\.)?{pattern}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def iter_candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the internals of modules that already host adapters."""
    hosts: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(h + ".") for h in hosts):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            hosts.append(name)
        yield name, module


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _output_layer_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    return {n for n, m in model.named_modules() if output is not None and m is output}


def _is_targeted(name: str, module: nn.Module, config: AdapterConfig, output_layers: set[str]) -> bool:
    targets = config.target_modules
    if targets is None:
        return layer_kind(_base(module)) in config.targets_by_kind
    if targets == "all-linear":
        return layer_kind(_base(module)) in ("linear", "hf_conv1d") and name not in output_layers
    return name_matches(name, targets)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module ``config`` adapts; raises ``ValueError`` when nothing matches.

    Targeted modules of a type the algorithm cannot host raise ``TypeError`` naming module and type.
    """
    if config.target_modules is None and not config.targets_by_kind:
        raise ValueError(f"{type(config).__name__} needs target_modules (a list of names, a regex or 'all-linear')")
    output_layers = _output_layer_names(model)
    save = config.modules_to_save or []
    found = []
    for name, module in iter_candidate_modules(model):
        if not _is_targeted(name, module, config, output_layers):
            continue
        if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
            continue
        if save and name_matches(name, save):
            continue
        if (
            config.layers_to_transform is not None
            and layer_index(name, config.layers_pattern) not in config.layers_to_transform
        ):
            continue
        found.append((name, module))
    if not found:
        sample = ", ".join(n for n, _ in list(iter_candidate_modules(model))[:12])
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__} "
            f"(with exclude_modules / layers_to_transform applied); some module names: {sample}"
        )
    _check_patterns(config, [n for n, _ in found])
    return found


def _check_patterns(config: AdapterConfig, names: list[str]) -> None:
    if not isinstance(config, RankConfig):
        return
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name):
            if not any(re.fullmatch(rf"(?:.*\.)?(?:{key})", n) for n in names):
                raise ValueError(f"{field_name} key {key!r} matches none of the adapted modules")


def matching_entries(model: nn.Module, names: list[str]) -> list[str]:
    """The entries of a ``modules_to_save`` list that name at least one module of ``model``."""
    candidates = [n for n, _ in iter_candidate_modules(model)]
    return [entry for entry in names if any(name_matches(n, [entry]) for n in candidates)]


def find_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Module names matched by ``modules_to_save``; each entry must match something."""
    if not names:
        return []
    candidates = [n for n, _ in iter_candidate_modules(model)]
    found = [n for n in candidates if name_matches(n, names)]
    for entry in names:
        if not any(name_matches(n, [entry]) for n in candidates):
            raise ValueError(f"modules_to_save entry {entry!r} matches no module")
    return found
