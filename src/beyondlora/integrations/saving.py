"""Saving the adapters on a pipeline's parts (or a module) as one file, with the names consumers read.

Single files name each module ``<prefix>_<path>`` (see :mod:`beyondlora.formats.names`); an SD3 / Flux
transformer is written with kohya's checkpoint paths (fused layers joined: :mod:`beyondlora.formats.fused`)
or SimpleTuner's ``lycoris_`` + diffusers paths; ``names="diffusers"`` writes diffusers' own LoRA layout
(``transformer.<path>.lora_A.weight``) that ``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..formats.dit_names import is_t5_encoder
from ..formats.fused import join_fused
from ..formats.lycoris_codecs import describe
from ..formats.names import PartNames
from ..formats.single_file import (
    DEFAULT_PREFIX,
    group_by_module,
    module_key,
    report_caveats,
    single_file_tensors,
    write_single_file,
)
from ..host.inject import adapter_layers
from ..tools.diffusers_layout import lora_layout_tensors
from .parts import find_parts, inner_model, list_adapters, naming_for

#: how ``save_adapter`` names modules: single-file styles of :data:`~beyondlora.formats.names.NAME_STYLES`,
#: or diffusers' LoRA layout
SAVE_NAMES = ("kohya", "lycoris", "diffusers")
#: the stand-in module key of a module written inside a fused one (no real key has a ``-``)
_FUSED_MEMBER = "beyondlora-fused-member-"


def save_adapter(
    target: Any,
    path: str | Path,
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    prefix: str | None = None,
    strict: bool = False,
    names: str = "kohya",
    as_difference: bool = False,
) -> None:
    """Write the adapter on a pipeline's parts (or a module) as one single file with canonical names.

    Keys are ``lora_unet_…`` (SDXL: SGM paths; SD3 / Flux transformers: the original checkpoints' paths,
    ``lora_unet_double_blocks_0_img_attn_qkv``, with fused layers joined exactly or refused), and
    ``lora_te_text_model_…`` (SDXL: ``lora_te1_`` / ``lora_te2_``; SD3 / Flux: ``lora_te1_`` CLIP-L,
    ``lora_te2_`` CLIP-G, ``lora_te3_`` T5).  ``names="lycoris"`` writes an SD3 / Flux transformer as
    ``lycoris_<diffusers path>`` (SimpleTuner; any algorithm, no fused layers); ``names="diffusers"`` writes
    diffusers' LoRA layout ``<part>.<module path>.lora_A.weight`` (plain LoRA only, no T5).
    ``adapter_name`` may be left out when the parts hold one adapter.  For a plain module (no UNet,
    transformer or CLIP text model) ``prefix`` is written before its paths (default ``lycoris``).  Modules the
    UIs would not apply exactly are named in a warning, or with ``strict`` refused, or with ``as_difference``
    written as their exact change ``diff`` (which every consumer applies; they reload as Full modules).
    """
    if names not in SAVE_NAMES:
        raise ValueError(f"names must be one of {SAVE_NAMES}, got {names!r}")
    parts = find_parts(target)
    present = list_adapters(target)
    if adapter_name is None:
        if len(present) != 1:
            raise ValueError(f"choose the adapter to save with adapter_name; have {present}")
        adapter_name = present[0]
    elif adapter_name not in present:
        raise ValueError(f"no adapter named {adapter_name!r}; have {present}")
    style = "lycoris" if names == "lycoris" else "kohya"
    naming = naming_for(parts, prefix, style) if set(parts) != {""} else {}
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for role, part in parts.items():
        model = inner_model(part)
        layers = [(n, layer) for n, layer in adapter_layers(model) if adapter_name in layer.adapters]
        if not layers:
            continue
        if names == "diffusers":
            part_tensors, part_described = _diffusers_layout(role, model, layers, adapter_name)
        else:
            norms = [n for n, layer in layers if role.startswith("text_encoder") and layer.geometry.is_norm]
            if norms:  # ComfyUI's CLIP key map names the six linears of each layer only
                report_caveats({"ComfyUI skips text-encoder norm keys (its CLIP key map has no norms)": norms}, strict)
            part_tensors, part_described = _single_file(
                model, role, naming.get(role), adapter_name, dtype, prefix, (strict, as_difference), path
            )
        tensors.update(part_tensors)
        described.update(part_described)
    if not tensors:
        raise ValueError(f"adapter {adapter_name!r} has no layer tensors to save")
    write_single_file(path, tensors, described, metadata)


def _single_file(
    model: torch.nn.Module,
    role: str,
    names: PartNames | None,
    adapter_name: str,
    dtype: torch.dtype | None,
    prefix: str | None,
    inexact: tuple[bool, bool],
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """One part's single-file tensors and metadata, fused layers joined; ``inexact``: (strict, as_difference)
    of :func:`~beyondlora.formats.single_file.single_file_tensors`."""
    members: dict[str, str] = {}
    fused_modules = (
        {s.module for segments in names.fused.values() for s in segments} if names and names.write_fused else set()
    )

    def key_for(name: str) -> str:
        if names is None:
            return module_key(prefix or DEFAULT_PREFIX, name)
        if name in fused_modules:
            members[f"{_FUSED_MEMBER}{len(members)}"] = name
            return f"{_FUSED_MEMBER}{len(members) - 1}"
        return names.key(name)

    try:
        strict, as_difference = inexact
        tensors, described = single_file_tensors(
            model, adapter_name, dtype=dtype, key_for=key_for, strict=strict, as_difference=as_difference
        )
    except KeyError as error:
        raise FormatError(f"cannot name a module of the {role or 'model'} in a single file: {error}") from None
    if not members:
        return tensors, described
    grouped = group_by_module(tensors)
    per_module = {members[key]: grouped.pop(key) for key in members}
    records = {members[key]: described.pop(key) for key in members}
    for key, (params, held) in join_fused(per_module, names, model, str(path)).items():
        grouped[key], described[key] = params, records[held[0]]
    return {f"{key}.{name}": t for key, params in grouped.items() for name, t in params.items()}, described


def _diffusers_layout(
    role: str, model: torch.nn.Module, layers: list, adapter_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """diffusers' LoRA layout for one part (its SD3 / Flux pipelines load no T5 LoRA: refused)."""
    if not role:
        raise FormatError(
            "diffusers' LoRA layout names pipeline parts (unet, transformer, …); save a module as a single file"
        )
    if is_t5_encoder(model):
        raise FormatError(
            f"the {role} (T5) has adapters, which diffusers' SD3 / Flux LoRA loaders do not load; "
            "save with names='kohya' or 'lycoris' (lora_te3_ keys)"
        )
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        adapter = layer.adapters[adapter_name]
        tensors.update(lora_layout_tensors(adapter, f"{role}.{name}", name))
        described[f"{role}.{name}"] = describe(adapter)
    return tensors, described
