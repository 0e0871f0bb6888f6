"""The adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (Hugging Face PEFT's layout).

Keys are ``base_model.model.<module path>.<tensor>``; adapters other than ``default`` live in a subfolder
of their name.  Each algorithm gives its ``peft_type``, tensors and config fields (``Adapter.folder_*``):
the ones PEFT has are written exactly as PEFT writes them, so PEFT loads them to the same outputs, or
refused with the reason; the others use their own ``peft_type`` (PEFT refuses those loudly).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms import ALGORITHMS, Adapter
from ..algorithms.config_base import exact_pattern
from ..config import CONFIG_NAME, AdapterConfig, config_class, read_config_json
from ..errors import FormatError
from ..host.inject import PlannedAdapter, adapter_layers
from ..host.layers import AdapterLayer
from ..host.targeting import find_targets, matching_entries
from ..ops.geometry import LayerGeometry
from .lycoris_codecs import import_adapter
from .saved_modules import read_saved_states, saved_tensors
from .tensors import check_finite, read_pickled_tensors, read_tensors, write_tensors

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: PEFT config fields that carry no meaning for the computation
#: (``fan_in_fan_out`` describes storage, which we read from the module type, as PEFT itself corrects it)
_INFORMATIONAL = {
    "peft_version",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "fan_in_fan_out",
}


def adapter_directory(directory: str | Path, adapter_name: str) -> Path:
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def folder_tensor_names() -> frozenset[str]:
    """Every tensor name a module of an adapter folder may carry."""
    return frozenset({"dora_scale"}).union(*(cls.folder_keys for cls in ALGORITHMS.values()))


def adapter_tensor_name(key: str) -> str | None:
    """The adapter tensor name ``key`` ends with (``….lokr_w1`` → ``lokr_w1``), or ``None``."""
    for name in folder_tensor_names():
        if key == name or key.endswith("." + name):
            return name
    return None


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and exact-name patterns for the modules that differ from it."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {f"^{re.escape(n)}$": v for n, v in sorted(values.items()) if v != common}


def folder_config(config: AdapterConfig, adapter_name: str, adapters: dict[str, Adapter]) -> dict[str, Any]:
    """``adapter_config.json`` for these adapters (one ``peft_type``), expressing them exactly or refusing."""
    types = {a.folder_type for a in adapters.values()}
    if len(types) != 1:
        algorithms = sorted({a.algorithm for a in adapters.values()})
        raise FormatError(
            f"adapter {adapter_name!r} mixes algorithms {algorithms} that one PEFT folder cannot hold together; "
            "save to a .safetensors file"
        )
    cls = type(next(iter(adapters.values())))
    fields: dict[str, Any] = {
        "peft_type": types.pop(),
        "target_modules": exact_pattern(list(adapters)),
        "modules_to_save": config.modules_to_save,
        "inference_mode": config.inference_mode,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
    }
    if cls.has_rank:  # PEFT scales by alpha / r: alpha carries our scale × multiplier exactly
        r, rank_pattern = _patterns({n: a.rank for n, a in adapters.items()})
        alpha, alpha_pattern = _patterns({n: a.scale * a.multiplier * a.rank for n, a in adapters.items()})
        fields.update(r=r, rank_pattern=rank_pattern, alpha=alpha, alpha_pattern=alpha_pattern)
    try:
        return cls.folder_config(adapters, fields)
    except FormatError as error:
        raise FormatError(
            f"cannot write adapter {adapter_name!r} as a PEFT folder: {error}; save to a .safetensors file"
        ) from None


def save_folder(model: nn.Module, directory: str | Path, config: AdapterConfig, adapter_name: str) -> Path:
    """Write one adapter's folder (atomically per file); returns the folder written."""
    adapters = {n: layer.adapters[adapter_name] for n, layer in adapter_layers(model) if adapter_name in layer.adapters}
    config_data = folder_config(config, adapter_name, adapters)
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        reason = adapter.folder_refusal()
        if reason is not None:
            raise FormatError(
                f"cannot write adapter {adapter_name!r} as a PEFT folder: module {name!r}: {reason}; "
                "save to a .safetensors file"
            )
        tensors.update({f"{KEY_PREFIX}{name}.{k}": v.detach() for k, v in adapter.folder_tensors().items()})
    tensors.update(saved_tensors(model, adapter_name, _folder_key))
    target = adapter_directory(directory, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    write_tensors(target / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    (target / CONFIG_NAME).write_text(json.dumps(config_data, indent=2, sort_keys=True))
    return target


#: PEFT fields whose default is not falsy, with that default (PEFT writes them into every config)
_PEFT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def _neutral(key: str, value: Any) -> bool:
    """Whether a PEFT field we do not model holds its neutral (default) value."""
    return value in (None, False, "none", {}, [], "", 0) or _PEFT_DEFAULTS.get(key, object()) == value


def read_config(directory: Path) -> AdapterConfig:
    """Our config for a folder's ``adapter_config.json`` (ours or PEFT's).

    PEFT fields we do not model are accepted when they hold their neutral value; any other value is an
    error naming the field, because ignoring it would change the outputs.
    """
    path = directory / CONFIG_NAME
    data = read_config_json(directory)
    cls = config_class(str(data.pop("peft_type", "")))
    foreign = ALGORITHMS[cls.algorithm].foreign_folder
    if foreign is not None:
        raise FormatError(f"{path}: a {cls.peft_type} folder cannot be loaded: {foreign}")
    known = {f for f in cls.__dataclass_fields__}
    kept = {}
    for key, value in data.items():
        if key in known:
            kept[key] = value
        elif key not in _INFORMATIONAL and not _neutral(key, value):
            raise ValueError(f"{path}: field {key}={value!r} is not supported")
    kept.pop("init_weights", None)  # the weights come from the file; how they were initialized is moot
    kept.pop("init_lora_weights", None)
    kept.pop("init_ia3_weights", None)
    try:
        return cls(**kept)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def plan_from_folder(
    model: nn.Module, directory: str | Path
) -> tuple[AdapterConfig, list[PlannedAdapter], dict[str, dict[str, torch.Tensor]]]:
    """Read a folder into (config, planned adapters, modules_to_save states); nothing is attached."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"adapter path not found: {directory}")
    config = read_config(directory)
    if config.modules_to_save:  # PEFT skips entries that match nothing (e.g. "score" for SEQ_CLS)
        config.modules_to_save = matching_entries(model, config.modules_to_save) or None
    source = directory / WEIGHTS_NAME
    legacy = directory / LEGACY_WEIGHTS_NAME
    tensors = read_pickled_tensors(legacy) if legacy.is_file() and not source.exists() else read_tensors(source)
    for key, tensor in tensors.items():
        check_finite(source, key, tensor)
    used: set[str] = set()
    planned = []
    names = folder_tensor_names()
    for name, module in find_targets(model, config):
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        prefix = f"{KEY_PREFIX}{name}."
        params = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix) :] in names}
        used.update(prefix + k for k in params)
        where = f"{source}: module {name!r}"
        if not params:
            raise ValueError(f"{where}: no tensors for this targeted module")
        planned.append(PlannedAdapter(name, module, _import(config, name, base, params, where)))
    save_states, saved_keys = read_saved_states(model, config.modules_to_save, tensors, _folder_key, source)
    used |= saved_keys
    unused = sorted(set(tensors) - used)
    if unused:
        listed = ", ".join(unused[:8]) + (" …" if len(unused) > 8 else "")
        raise ValueError(f"{source}: {len(unused)} tensor(s) match no adapted module of this model: {listed}")
    return config, planned, save_states


def _folder_key(module: str, tensor: str) -> str:
    return f"{KEY_PREFIX}{module}.{tensor}"


def _import(config: AdapterConfig, name: str, base: nn.Module, params: dict[str, torch.Tensor], where: str) -> Adapter:
    geometry = LayerGeometry.of(base)
    weight = geometry.canonical_weight(base).detach()
    options = config.options_for(name)
    cls = ALGORITHMS[config.algorithm]
    kept = ("rank_dropout", "rank_dropout_scale", "module_dropout", "dropout", *cls.recorded_options)
    recorded = {k: getattr(options, k) for k in kept}
    try:
        renamed = cls.from_folder(params, options, geometry)
    except FormatError as error:
        raise FormatError(f"{where}: {error}") from None
    # PEFT keeps alpha / r where the tensors carry no rank (a LoKr with both factors full)
    return import_adapter(renamed, geometry, weight, where, recorded, rank_hint=(options.r, options.alpha))
