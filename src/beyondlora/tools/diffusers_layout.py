"""diffusers' LoRA layout: one safetensors file with keys ``<part>.<module path>.lora_A.weight`` and
``.lora_B.weight`` (what ``pipe.save_lora_weights`` writes and ``load_lora_weights`` / ``load_lora_adapter``
read; parts ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``).

diffusers computes ΔW = (lora_alpha / r) · B · A (rs-LoRA: lora_alpha / √r), with lora_alpha from the
file's ``lora_adapter_metadata`` (``<part>.lora_alpha``, ``<part>.alpha_pattern``, ``<part>.use_rslora``) and,
without metadata, lora_alpha = r per module (scale 1).  Reading turns the file into single-file tensors with
the single-file alpha that gives the same ΔW (alpha · √r for rs-LoRA).  Writing takes plain LoRA only (no
Tucker core, DoRA or embedding), bakes our scale into ``lora_B`` and writes no alpha, so diffusers' rule
gives exactly our ΔW.
"""

from __future__ import annotations

import json
import math
import re

import torch
from torch import Tensor

from ..algorithms import Adapter
from ..algorithms.config_base import pattern_value
from ..errors import FormatError
from ..formats.single_file import module_key
from .model_files import Checkpoint, Component, module_name

#: diffusers part → single-file prefix
PARTS = {
    "unet": "lora_unet",
    "transformer": "lora_transformer",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
}
KEY = re.compile(r"(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.(.+)\.lora_([AB])\.weight")
METADATA_KEY = "lora_adapter_metadata"


def is_diffusers_layout(keys: list[str]) -> bool:
    return bool(keys) and all(KEY.fullmatch(key) for key in keys)


def to_single_file(tensors: dict[str, Tensor], metadata: dict[str, str], where: object) -> dict[str, Tensor]:
    """The single-file tensors (LyCORIS / kohya keys, consumer-exact alpha) of a diffusers-layout file."""
    try:
        config = json.loads(metadata.get(METADATA_KEY) or "{}")
    except json.JSONDecodeError as error:
        raise FormatError(f"{where}: {METADATA_KEY} is not valid JSON: {error}") from None
    grouped: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        part, path, side = KEY.fullmatch(key).groups()
        grouped.setdefault((part, path), {})[side] = tensor
    parts = {part for part, _ in grouped}
    out: dict[str, Tensor] = {}
    for (part, path), pair in grouped.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FormatError(f"{where}: {part}.{path} has no {missing}.weight")
        prefix = "lora_te1" if part == "text_encoder" and "text_encoder_2" in parts else PARTS[part]
        key = module_key(prefix, module_name(Component("", prefix, "", False), path))
        rank = pair["A"].shape[0]
        default = config.get(f"{part}.lora_alpha", rank)
        alpha = float(pattern_value(config.get(f"{part}.alpha_pattern") or {}, path, default))
        if config.get(f"{part}.use_rslora"):
            alpha *= math.sqrt(rank)  # diffusers scales by alpha / √r, a single file by alpha / r
        out[f"{key}.lora_down.weight"] = pair["A"]
        out[f"{key}.lora_up.weight"] = pair["B"]
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def from_adapters(checkpoint: Checkpoint, adapters: dict[str, Adapter]) -> dict[str, Tensor]:
    """diffusers-layout tensors for adapters read against ``checkpoint`` (a diffusers folder)."""
    out: dict[str, Tensor] = {}
    for name, adapter in sorted(adapters.items()):
        module = checkpoint.modules[name]
        part = module.component.diffusers_name
        if part not in PARTS:
            raise FormatError(f"module {name!r}: {checkpoint.path} is no diffusers folder part ({', '.join(PARTS)})")
        path = module.weight.key[len(module.component.key_prefix) : -len(".weight")]
        out.update(lora_layout_tensors(adapter, f"{part}.{path}", name))
    return out


def lora_layout_tensors(adapter: Adapter, key: str, name: str) -> dict[str, Tensor]:
    """One adapter's diffusers-layout tensors ``<key>.lora_A.weight`` = down (r, in, *k) and
    ``<key>.lora_B.weight`` = s · t · up (out, r, 1…): diffusers' rule without metadata (scale 1) then gives
    our ΔW at multiplier t.  Raises naming module ``name`` for anything but a plain LoRA on a linear or conv."""
    g = adapter.geometry
    factors = adapter.lora_factors()
    if factors is None or adapter.dora_scale is not None:
        notes = ["dora"] if adapter.dora_scale is not None else adapter.summary_notes()
        kind = adapter.algorithm + (f" ({', '.join(notes)})" if notes else "")
        raise FormatError(
            f"module {name!r}: diffusers' LoRA layout holds plain LoRA only, not {kind}; write a single file instead"
        )
    if g.kind not in ("linear", "conv"):
        raise FormatError(f"module {name!r}: diffusers' LoRA layout has no {g.kind} LoRA")
    up, down, scale = factors
    with torch.no_grad():
        ones = (1,) * len(g.kernel)
        return {
            f"{key}.lora_A.weight": down.detach().reshape(-1, g.in_dim, *g.kernel).clone(),
            f"{key}.lora_B.weight": (up * (scale * adapter.multiplier)).reshape(g.out_dim, -1, *ones),
        }
