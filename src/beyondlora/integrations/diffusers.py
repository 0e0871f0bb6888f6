"""Loading adapters into diffusers pipelines (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux).

:func:`load_adapter` applies any single file (LoRA, LoHa, LoKr, (IA)³, DyLoRA, full and norm diffs, mixed
in one file; from us, LyCORIS, kohya or another trainer) or PEFT folder to a pipeline's UNet or transformer
and text encoder(s), live (strength changeable, removable, stackable) or merged into the weights; it takes
a plain torch module as well.  Fused layers of SD3 / Flux files (``qkv``, ``linear1``) are split onto
diffusers' layers exactly (:mod:`beyondlora.formats.fused`).  :func:`save_adapter`
(:mod:`.saving`) writes the adapters on a pipeline's parts as one file with canonical names (see
:mod:`beyondlora.formats.names`).

Everything is planned (read, matched, checked, built) before anything is attached, so an error leaves
the pipeline exactly as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_NAME, AdapterConfig, SingleFileConfig
from ..errors import FormatError
from ..formats.folder import plan_from_folder
from ..formats.fused import expand_fused
from ..formats.names import route_keys
from ..formats.single_file import (
    group_by_module,
    match_module_keys,
    plan_modules,
    read_metadata,
    read_single_file,
    refuse_saved_modules,
)
from ..host.inject import PlannedAdapter, adapter_layers
from ..host.layers import AdapterLayer
from ..tools.diffusers_layout import is_diffusers_layout, to_single_file
from .parts import adapter_names, controller, find_parts, inner_model, list_adapters, naming_for, remember, unwrap_empty
from .saving import save_adapter as save_adapter

#: how many unmatched keys a warning or error names before summarising
_LISTED = 12


@dataclass
class PartPlan:
    """What loading an adapter will attach to one part."""

    planned: list[PlannedAdapter]
    config: AdapterConfig
    save_states: dict[str, dict[str, torch.Tensor]]


class UnmatchedKeysWarning(UserWarning):
    """Some keys of an adapter file name no module of the model they were loaded into."""


def _report_unmatched(path: Path, unmatched: list[str], strict: bool, what: str) -> None:
    if not unmatched:
        return
    listed = ", ".join(sorted(unmatched)[:_LISTED]) + (
        f" … ({len(unmatched)} in all)" if len(unmatched) > _LISTED else ""
    )
    message = f"{path}: {len(unmatched)} module key(s) match no module of {what}: {listed}"
    if strict:
        raise FormatError(message)
    warnings.warn(message, UnmatchedKeysWarning, stacklevel=3)


def plan_adapter(
    parts: dict[str, nn.Module], path: str | Path, strict: bool = False, prefix: str | None = None
) -> dict[str, PartPlan]:
    """Read the adapter at ``path`` and build its adapters for each part, attaching nothing.

    Unmatched single-file keys are reported by name (a warning, or an error with ``strict``); a file of
    which nothing matches is always an error."""
    path = Path(path)
    if path.is_dir():
        return _plan_folder(parts, path)
    grouped, recorded = _read_file(path)
    return plan_tensors(parts, grouped, recorded, path, strict, prefix)


def _read_file(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """A single file grouped by module key; diffusers' own LoRA layout (``unet.<path>.lora_A.weight``,
    what ``pipe.save_lora_weights`` writes) is converted to single-file keys first."""
    grouped, recorded = read_single_file(path)
    refuse_saved_modules(grouped, path, "a pipeline")
    tensors = {f"{module}.{name}": t for module, params in grouped.items() for name, t in params.items()}
    if not is_diffusers_layout(list(tensors)):
        return grouped, recorded
    return group_by_module(to_single_file(tensors, read_metadata(path), path)), {}


def plan_tensors(
    parts: dict[str, nn.Module],
    grouped: dict[str, dict[str, torch.Tensor]],
    recorded: dict[str, Any],
    path: str | Path,
    strict: bool = False,
    prefix: str | None = None,
) -> dict[str, PartPlan]:
    """:func:`plan_adapter` for single-file tensors already read and grouped by module key."""
    path = Path(path)
    models = {role: inner_model(part) for role, part in parts.items()}
    if set(models) == {""}:  # a plain module: any prefix, or only ``prefix``
        keys = [k for k in grouped if prefix is None or k.startswith(prefix + "_")]
        names, unmatched = match_module_keys(models[""], keys, path)
        unmatched += [k for k in grouped if k not in keys]
        routed = {"": names}
    else:
        naming = naming_for(parts, prefix)
        grouped, routed_fused, origin = expand_fused(grouped, naming, models, path)
        routed, unmatched = route_keys([k for k in grouped if k not in origin], naming)
        for role, names in routed_fused.items():
            routed[role].update(names)
        recorded = {**recorded, **{new: recorded[old] for new, old in origin.items() if old in recorded}}
    what = " or ".join(f"the {role or type(m).__name__}" for role, m in models.items())
    if not any(routed.values()):
        _report_unmatched(path, unmatched, True, what)
    _report_unmatched(path, unmatched, strict, what)
    plans = {}
    for role, names in routed.items():
        if names:
            planned = plan_modules(models[role], grouped, names, path, recorded)
            plans[role] = PartPlan(planned, SingleFileConfig(source=str(path), inference_mode=True), {})
    return plans


def _plan_folder(parts: dict[str, nn.Module], path: Path) -> dict[str, PartPlan]:
    """A PEFT folder for one part, or a folder with one PEFT subfolder per part (``unet/``, ``text_encoder/``)."""
    if not (path / CONFIG_NAME).is_file():
        subfolders = {role: path / role for role in parts if (path / role / CONFIG_NAME).is_file()}
        if not subfolders:
            raise FormatError(f"{path} holds neither {CONFIG_NAME} nor a subfolder per part ({', '.join(parts)})")
        plans = {}
        for role, folder in subfolders.items():
            config, planned, states = plan_from_folder(inner_model(parts[role]), folder)
            config.inference_mode = True
            plans[role] = PartPlan(planned, config, states)
        return plans
    fits, errors = {}, []
    for role, part in parts.items():
        try:
            config, planned, states = plan_from_folder(inner_model(part), path)
        except (ValueError, TypeError) as error:
            errors.append(f"{role or type(part).__name__}: {error}")
            continue
        if planned or states:
            config.inference_mode = True
            fits[role] = PartPlan(planned, config, states)
    if len(fits) != 1:
        found = "none" if not fits else ", ".join(fits)
        raise FormatError(f"{path}: the PEFT folder must fit exactly one part; fits {found}. " + "; ".join(errors))
    return fits


def load_adapter(
    target: Any,
    path: str | Path,
    multiplier: float = 1.0,
    merge: bool = False,
    adapter_name: str = "default",
    strict: bool = False,
    prefix: str | None = None,
) -> LoadedAdapter:
    """Apply the adapter at ``path`` to a diffusers pipeline's UNet or transformer and text encoder(s), or to a
    module.

    Args:
        target: a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` /
            ``FluxPipeline`` (or anything with ``unet`` / ``transformer`` / ``text_encoder`` / ``text_encoder_2`` /
            ``text_encoder_3`` attributes), or a torch module.
        path: a single ``.safetensors`` file (any algorithm, mixed; or diffusers' LoRA layout) or a PEFT
            folder (or one with a PEFT subfolder per part).
        multiplier: the adapter's strength.
        merge: add it into the weights for good instead of keeping it live.
        adapter_name: the name of the live adapter (several adapters stack, each with its strength).
        strict: raise on keys that match no module instead of warning.
        prefix: for a single module, the file prefix to read (e.g. ``"lora_te2"``).

    Returns a :class:`LoadedAdapter` handle (change the strength, remove, merge).  On any error nothing
    has changed.
    """
    parts = find_parts(target)
    plans = plan_adapter(parts, path, strict=strict, prefix=prefix)
    if merge:
        for role, plan in plans.items():
            merge_planned(plan.planned, multiplier)
            model = inner_model(parts[role])
            for name, state in plan.save_states.items():
                module = model.get_submodule(name)
                getattr(module, "original_module", module).load_state_dict(state)
        return LoadedAdapter(target, adapter_name, merged=True)
    taken = [role or "module" for role in plans if adapter_name in adapter_names(inner_model(parts[role]))]
    if taken:
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded in {', '.join(taken)}")
    attached = []
    try:
        for role, plan in plans.items():
            part = parts[role]
            modes = {p.name: p.module.training for p in plan.planned}
            wrapper = controller(part)
            attached.append(part)  # before attaching: a failure halfway is rolled back too
            wrapper.add_adapter(adapter_name, plan.config, _planned=plan.planned, _save_states=plan.save_states)
            model = inner_model(part)
            for name, mode in modes.items():
                model.get_submodule(name).train(mode)
            wrapper.set_adapter([*wrapper.active_adapters, adapter_name])
            wrapper.set_multiplier(multiplier, adapter_name)
            remember(part, wrapper)
    except Exception:
        for part in attached:
            _remove(part, adapter_name)
        raise
    return LoadedAdapter(target, adapter_name)


@torch.no_grad()
def merge_planned(planned: list[PlannedAdapter], multiplier: float) -> None:
    """Add planned (never attached) adapters into their base layers' weights, at ``multiplier``."""
    for plan in planned:
        base = plan.module.base_layer if isinstance(plan.module, AdapterLayer) else plan.module
        host = AdapterLayer(base)  # a temporary host: the model's module tree is not touched
        host.add_adapter("merge", plan.adapter)
        plan.adapter.multiplier = float(multiplier)
        host.merge(["merge"], keep_record=False)


def _remove(part: nn.Module, adapter_name: str) -> None:
    wrapper = controller(part)
    if adapter_name in wrapper.peft_config:
        wrapper.delete_adapter(adapter_name)
    unwrap_empty(inner_model(part))
    remember(part, wrapper)


def _parts_with(target: Any, adapter_name: str) -> dict[str, nn.Module]:
    parts = {r: p for r, p in find_parts(target).items() if adapter_name in adapter_names(inner_model(p))}
    if not parts:
        raise ValueError(f"no adapter named {adapter_name!r} is loaded; have {list_adapters(target)}")
    return parts


def set_multiplier(target: Any, multiplier: float, adapter_name: str = "default") -> None:
    """Change a live adapter's strength in every part it is in."""
    for part in _parts_with(target, adapter_name).values():
        controller(part).set_multiplier(multiplier, adapter_name)


def set_adapters(target: Any, adapter_names_: list[str] | str) -> None:
    """Make exactly these adapters active (stacked) in every part; the others stay loaded but off."""
    names = [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    missing = [n for n in names if n not in list_adapters(target)]
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; have {list_adapters(target)}")
    for part in find_parts(target).values():
        wrapper = controller(part)
        wrapper.set_adapter([n for n in names if n in wrapper.peft_config] or [])
        remember(part, wrapper)


def unload_adapter(target: Any, adapter_name: str | None = None) -> None:
    """Remove a live adapter (default: every one) from every part; the layers become plain again."""
    names = list_adapters(target) if adapter_name is None else [adapter_name]
    for name in names:
        for part in _parts_with(target, name).values():
            _remove(part, name)


@torch.no_grad()
def merge_adapter(target: Any, adapter_name: str = "default") -> None:
    """Merge a live adapter into the weights at its current strength and drop it (for good)."""
    for part in _parts_with(target, adapter_name).values():
        model = inner_model(part)
        for name, layer in adapter_layers(model):
            if adapter_name in layer.adapters:
                if layer.merged:
                    raise ValueError(f"layer {name!r} has merged adapters {list(layer.merged)}; unmerge them first")
                layer.merge([adapter_name], keep_record=False)
        _remove(part, adapter_name)


@dataclass
class LoadedAdapter:
    """Handle returned by :func:`load_adapter`."""

    target: Any
    adapter_name: str
    merged: bool = False

    def _live(self) -> None:
        if self.merged:
            raise ValueError(f"adapter {self.adapter_name!r} was merged into the weights; it cannot be changed")

    def set_multiplier(self, multiplier: float) -> None:
        self._live()
        set_multiplier(self.target, multiplier, self.adapter_name)

    def remove(self) -> None:
        self._live()
        unload_adapter(self.target, self.adapter_name)

    def merge(self) -> None:
        self._live()
        merge_adapter(self.target, self.adapter_name)
        self.merged = True
