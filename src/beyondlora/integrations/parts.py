"""The model parts of a pipeline (or a single module), their file naming, and adapter bookkeeping on them.

Adapters are injected *in place* into a pipeline's parts (``pipe.unet`` stays a ``UNet2DConditionModel``,
some of its layers become :class:`~beyondlora.host.layers.AdapterLayer`), so diffusers keeps working unchanged.
The layers themselves are the source of truth for which adapters exist and which are active; a weak
per-part registry only remembers each adapter's config.  A part may also be a :class:`PeftModel` the user
put there (``pipe.unet = bl.get_peft_model(pipe.unet, config)``): it is then used as it is.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from ..config import AdapterConfig, SingleFileConfig
from ..formats.dit_names import is_dit
from ..formats.names import PartNames, is_clip_text_model, is_diffusers_unet, is_sgm_unet, part_names
from ..formats.names import pipeline_part_names as _pipeline_part_names
from ..host.inject import adapter_layers, replace_submodule, save_wrappers
from ..model import PeftModel

#: the pipeline attributes that can host adapters, in file order
PART_ROLES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

_CONFIGS: weakref.WeakKeyDictionary[nn.Module, dict[str, AdapterConfig]] = weakref.WeakKeyDictionary()


def find_parts(target: Any) -> dict[str, nn.Module]:
    """``{role: part}`` for a diffusers pipeline (its UNet or transformer and text encoders) or
    ``{role: module}`` for a plain torch module (role ``unet`` / ``transformer`` / ``text_encoder`` when
    recognised, else ``""``)."""
    if isinstance(target, nn.Module):
        return {module_role(inner_model(target)): target}
    parts = {role: getattr(target, role, None) for role in PART_ROLES}
    parts = {role: part for role, part in parts.items() if isinstance(part, nn.Module)}
    if not parts:
        raise TypeError(
            f"{type(target).__name__} is neither a torch module nor a pipeline with a unet, transformer or text encoder"
        )
    return parts


def module_role(model: nn.Module) -> str:
    if is_diffusers_unet(model) or is_sgm_unet(model):
        return "unet"
    if is_dit(model):
        return "transformer"
    if is_clip_text_model(model):
        return "text_encoder"
    return ""


def inner_model(part: nn.Module) -> nn.Module:
    """The model that holds the layers: a :class:`PeftModel`'s base model, else the part itself."""
    return part.base_model if isinstance(part, PeftModel) else part


def naming_for(parts: dict[str, nn.Module], prefix: str | None = None, style: str = "kohya") -> dict[str, PartNames]:
    """File naming for every part (``prefix`` overrides a single module's prefix; ``style`` picks how an SD3 /
    Flux transformer is written, see :data:`~beyondlora.formats.names.NAME_STYLES`)."""
    models = {role: inner_model(part) for role, part in parts.items()}
    if len(models) == 1 and prefix is not None:
        role, model = next(iter(models.items()))
        return {role: part_names(model, role, prefix, style)}
    return _pipeline_part_names(models, style)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name hosted in ``model``, in first-seen order."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    for _, wrapper in save_wrappers(model):
        names.update(dict.fromkeys(wrapper.modules_to_save))
    return list(names)


def list_adapters(target: Any) -> list[str]:
    """Names of the live adapters in a pipeline's parts (or a module)."""
    names: dict[str, None] = {}
    for part in find_parts(target).values():
        names.update(dict.fromkeys(adapter_names(inner_model(part))))
    return list(names)


def active_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.active_adapters))
    return list(names)


def controller(part: nn.Module) -> PeftModel:
    """A :class:`PeftModel` that manages the adapters in ``part`` without taking its place.

    For a part that is already a PeftModel, the part itself.  Otherwise a transient wrapper whose configs
    come from the registry (adapters found in the layers without one get a read-only config)."""
    if isinstance(part, PeftModel):
        return part
    wrapper = PeftModel.__new__(PeftModel)
    nn.Module.__init__(wrapper)
    wrapper.base_model = part
    known = _CONFIGS.get(part, {})
    present = adapter_names(part)
    wrapper.peft_config = {n: known.get(n) or SingleFileConfig(inference_mode=True) for n in present}
    wrapper.active_adapters = active_names(part)
    return wrapper


def remember(part: nn.Module, wrapper: PeftModel) -> None:
    """Keep the configs of a transient controller for the next one."""
    if wrapper is not part:
        _CONFIGS[part] = dict(wrapper.peft_config)


def unwrap_empty(model: nn.Module) -> None:
    """Put plain modules back where adapter hosts no longer host anything (a removal leaves none behind)."""
    for name, layer in adapter_layers(model):
        if not layer.adapters and not layer.merged:
            replace_submodule(model, name, layer.base_layer)
    for name, wrapper in save_wrappers(model):
        if not wrapper.modules_to_save:
            replace_submodule(model, name, wrapper.original_module)
