"""The adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (Hugging Face PEFT's layout).

Keys are ``base_model.model.<module path>.<tensor>``; adapters other than ``default`` live in a subfolder
of their name.  LoRA (and DyLoRA, as the LoRA it equals), LoHa, LoKr and (IA)³ are written exactly as PEFT
writes them, so PEFT loads them to the same outputs; Full and Norm, which PEFT lacks, use our tensor names
under ``peft_type`` FULL / NORM (PEFT refuses those types loudly).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms import Adapter
from ..config import CONFIG_NAME, AdapterConfig, RankConfig, config_class, read_config_json
from ..host.inject import PlannedAdapter, adapter_layers, save_wrappers
from ..host.layers import AdapterLayer
from ..host.modules_to_save import ModulesToSaveWrapper
from ..host.targeting import find_modules_to_save, find_targets, matching_entries
from ..ops.geometry import LayerGeometry
from .errors import FormatError
from .lycoris_codecs import export_tensors, import_adapter
from .peft_codecs import (
    PEFT_TYPES,
    check_peft_semantics,
    export_peft_tensors,
    lokr_factor_for_peft,
    to_lycoris_names,
)
from .tensors import check_finite, read_pickled_tensors, read_tensors, write_tensors

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: PEFT config fields that carry no meaning for the computation
_ADAPTER_TENSOR = re.compile(
    r"(lora_[AB]\.weight|lora_embedding_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+|ia3_l|diff|diff_b|w_norm|b_norm|dora_scale)$"
)
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


def _exact(names: list[str]) -> str:
    """A regex matching exactly these module names (PEFT full-matches a string ``target_modules``)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and exact-name patterns for the modules that differ from it."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {f"^{re.escape(n)}$": v for n, v in sorted(values.items()) if v != common}


def peft_config_dict(config: AdapterConfig, adapters: dict[str, Adapter]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for these adapters (one algorithm), expressing them exactly."""
    algorithms = {a.algorithm for a in adapters.values()}
    if len(algorithms) != 1:
        raise FormatError(f"a PEFT folder holds one algorithm; this adapter mixes {sorted(algorithms)}")
    algorithm = algorithms.pop()
    peft_type = PEFT_TYPES[algorithm]
    data: dict[str, Any] = {
        "peft_type": peft_type,
        "target_modules": _exact(list(adapters)),
        "modules_to_save": config.modules_to_save,
        "inference_mode": config.inference_mode,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
    }
    if peft_type == "IA3":
        inputs = [n for n, a in adapters.items() if a.on_input]
        hf_conv1d = any(a.geometry.kind == "hf_conv1d" for a in adapters.values())
        return {**data, "feedforward_modules": _exact(inputs) if inputs else [], "fan_in_fan_out": hf_conv1d}
    r, rank_pattern = _patterns({n: a.rank for n, a in adapters.items()})
    alpha, alpha_pattern = _patterns({n: a.scale * a.multiplier * a.rank for n, a in adapters.items()})
    first = next(iter(adapters.values())).options
    data.update(r=r, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if peft_type == "LORA":  # PEFT's LoRA has no module_dropout: it only shapes training
        hf_conv1d = any(a.geometry.kind == "hf_conv1d" for a in adapters.values())
        dora = any(a.dora_scale is not None for a in adapters.values())
        data.update(lora_alpha=alpha, lora_dropout=first.dropout, use_rslora=False, use_dora=dora)
        return {**data, "init_lora_weights": True, "fan_in_fan_out": hf_conv1d, "bias": "none"}
    data.update(alpha=alpha, rank_dropout=first.rank_dropout, module_dropout=first.module_dropout, init_weights=True)
    data["use_effective_conv2d"] = any(getattr(a, "tucker", False) for a in adapters.values())
    if peft_type == "LOKR":
        decompose_both = any(not a.w1_is_full for a in adapters.values())
        factor = lokr_factor_for_peft(list(adapters.values()), first.decompose_factor, decompose_both)
        data.update(decompose_both=decompose_both, decompose_factor=factor, rank_dropout_scale=first.rank_dropout_scale)
    return data


def save_folder(model: nn.Module, directory: str | Path, config: AdapterConfig, adapter_name: str) -> Path:
    """Write one adapter's folder (atomically per file); returns the folder written."""
    adapters = {n: layer.adapters[adapter_name] for n, layer in adapter_layers(model) if adapter_name in layer.adapters}
    tensors: dict[str, torch.Tensor] = {}
    if all(a.algorithm in PEFT_TYPES for a in adapters.values()):
        try:
            config_data = peft_config_dict(config, adapters)
            for name, adapter in adapters.items():
                try:
                    exported = export_peft_tensors(adapter)
                except FormatError as error:
                    raise FormatError(f"module {name!r}: {error}") from None
                tensors.update({f"{KEY_PREFIX}{name}.{k}": v for k, v in exported.items()})
        except FormatError as error:
            raise FormatError(
                f"cannot write adapter {adapter_name!r} as a PEFT folder: {error}; save to a .safetensors file"
            ) from None
    elif len({a.algorithm for a in adapters.values()}) == 1 and next(iter(adapters.values())).algorithm in (
        "full",
        "norm",
    ):
        algorithm = next(iter(adapters.values())).algorithm
        config_data = {
            "peft_type": algorithm.upper(),
            "target_modules": _exact(list(adapters)),
            "modules_to_save": config.modules_to_save,
            "inference_mode": config.inference_mode,
        }
        for name, adapter in adapters.items():
            tensors.update({f"{KEY_PREFIX}{name}.{k}": v for k, v in export_tensors(adapter).items()})
    else:
        raise FormatError(
            f"adapter {adapter_name!r} mixes algorithms PEFT cannot hold together; save to a .safetensors file"
        )
    for path, wrapper in save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{KEY_PREFIX}{path}.{name}"] = tensor
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
    for name, module in find_targets(model, config):
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        prefix = f"{KEY_PREFIX}{name}."
        params = {
            k[len(prefix) :]: v
            for k, v in tensors.items()
            if k.startswith(prefix) and _ADAPTER_TENSOR.match(k[len(prefix) :])
        }
        used.update(prefix + k for k in params)
        where = f"{source}: module {name!r}"
        if not params:
            raise ValueError(f"{where}: no tensors for this targeted module")
        planned.append(PlannedAdapter(name, module, _import(config, name, base, params, where)))
    save_states = {}
    for name in find_modules_to_save(model, config.modules_to_save):
        module = model.get_submodule(name)
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        state = {}
        for key, expected in original.state_dict().items():
            full = f"{KEY_PREFIX}{name}.{key}"
            if full not in tensors:
                raise ValueError(f"{source}: missing tensor {full!r} (expected shape {tuple(expected.shape)})")
            if tensors[full].shape != expected.shape:
                found = tuple(tensors[full].shape)
                raise ValueError(f"{source}: tensor {full!r} has shape {found}, expected {tuple(expected.shape)}")
            state[key] = tensors[full]
            used.add(full)
        save_states[name] = state
    unused = sorted(set(tensors) - used)
    if unused:
        listed = ", ".join(unused[:8]) + (" …" if len(unused) > 8 else "")
        raise ValueError(f"{source}: {len(unused)} tensor(s) match no adapted module of this model: {listed}")
    return config, planned, save_states


def _import(config: AdapterConfig, name: str, base: nn.Module, params: dict[str, torch.Tensor], where: str) -> Adapter:
    geometry = LayerGeometry.of(base)
    weight = geometry.canonical_weight(base).detach()
    options = config.options_for(name)
    recorded = {k: getattr(options, k) for k in ("rank_dropout", "rank_dropout_scale", "module_dropout", "dropout")}
    if config.algorithm in ("full", "norm"):
        return import_adapter(params, geometry, weight, where, recorded)
    try:
        check_peft_semantics(config.peft_type, geometry, params, options.on_input)
    except FormatError as error:
        raise FormatError(f"{where}: {error}") from None
    alpha = options.alpha * (options.r**0.5 if options.use_rslora else 1.0) if isinstance(config, RankConfig) else 1.0
    renamed = to_lycoris_names(params, config.peft_type, options.on_input, alpha)
    full_kron = (options.r, options.alpha) if config.peft_type == "LOKR" else None  # PEFT keeps alpha / r there
    return import_adapter(renamed, geometry, weight, where, recorded, full_kron=full_kron)
