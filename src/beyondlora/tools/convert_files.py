"""``beyondlora convert``: an adapter between a single file and a PEFT folder (the format follows the
destination: a ``.safetensors`` path is a single file, anything else a folder).

Single-file keys flatten module paths (``lora_unet_down_blocks_0_…``), so only the base model can tell
which underscores were dots: a conversion that involves a PEFT folder needs ``base``, except from a single
file we wrote, whose metadata records every module's path and layer
(:func:`~beyondlora.tools.adapter_files.recorded_model`).  The adapter is read against a skeleton of the
base's (or the recorded) modules and written by :func:`~beyondlora.tools.convert.convert_adapter`, which
writes each format exactly for its consumers or refuses with the reason.  Both skeletons give the same
folder, except that a recorded layer also shows what a state dict cannot (a convolution's ``padding_mode``,
transformers' ``Conv1D``), so a folder PEFT would misread is refused there.  A single file converts to a
single file without a base (a dtype change; the keys, ``alpha`` and metadata are kept).

diffusers' LoRA layout (:mod:`~beyondlora.tools.diffusers_layout`) is read wherever a single file is, and
converts to a single file without a base (its keys carry the module paths); writing it needs the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..formats.lycoris_codecs import cast_for_file
from ..formats.single_file import MODULES_METADATA, is_single_file, read_metadata
from ..formats.tensors import check_finite, write_tensors
from .adapter_files import (
    adapter_kind,
    load_adapter,
    readable_file,
    recorded_model,
    renamed_metadata,
    single_file_tensors,
)
from .convert import convert_adapter
from .diffusers_layout import METADATA_KEY, from_adapters
from .model_files import Checkpoint, skeleton
from .outputs import check_output


def convert_file(
    source: str | Path,
    destination: str | Path,
    base: str | Path | None = None,
    dtype: torch.dtype | None = None,
    prefix: str | None = None,
    layout: str = "auto",
    overwrite: bool = False,
) -> str:
    """Convert the adapter at ``source`` into ``destination``; returns a one-line summary.

    ``layout="diffusers"`` writes a ``.safetensors`` destination in diffusers' LoRA layout (needs ``base``,
    a diffusers folder); a diffusers-layout source is recognized by its keys.
    """
    source, destination = Path(source), Path(destination)
    source_kind = adapter_kind(source)
    to_file = is_single_file(destination)
    if layout not in ("auto", "diffusers"):
        raise ValueError(f"--layout must be auto or diffusers, got {layout!r}")
    check_output(destination, [(source, "the source"), *([(base, "the base model")] if base else [])], overwrite)
    if not to_file and destination.suffix and not destination.is_dir():
        raise ValueError(f"{destination}: a single-file adapter ends in .safetensors and a PEFT folder has no suffix")
    if not to_file and (layout == "diffusers" or (destination.exists() and not destination.is_dir())):
        raise ValueError(f"{destination}: a diffusers-layout or single-file adapter is a .safetensors file")
    if base is None and source_kind == "single_file" and not to_file:
        recorded = recorded_model(source)
        if recorded is None:
            raise ValueError(
                "this conversion needs the base model (--base MODEL): single-file keys do not say which "
                f"underscores of a module path were dots, and {source} does not record its modules' paths and "
                "layers in its metadata (files beyondlora writes do)"
            )
        convert_adapter(recorded, source, destination, dtype=dtype)
        count = len(json.loads(read_metadata(source)[MODULES_METADATA]))
        return f"converted {count} module(s) to the PEFT folder {destination} (module paths and layers from {source})"
    if base is None:
        if source_kind != "single_file" or not to_file or layout == "diffusers":
            raise ValueError(
                "this conversion needs the base model (--base MODEL): single-file keys do not say which "
                "underscores of a module path were dots"
            )
        if prefix is not None:
            raise ValueError("--prefix needs the base model (--base MODEL) to find the module names")
        tensors, kind, _ = single_file_tensors(source)
        for key, tensor in tensors.items():
            check_finite(source, key, tensor)
        metadata = renamed_metadata({k: v for k, v in read_metadata(source).items() if k != METADATA_KEY})
        write_tensors(destination, cast_for_file(tensors, dtype), metadata)
        what = "diffusers-layout LoRA as a single file" if kind == "diffusers" else "tensors"
        return f"wrote {len(tensors)} {what} to {destination}"
    checkpoint = Checkpoint(base)
    loaded = load_adapter(source, checkpoint)  # checks that the adapter fits the base, names every module
    if layout == "diffusers":
        if loaded.save_states:
            raise ValueError(
                f"{source} also holds whole modules ({', '.join(loaded.save_states)}; modules_to_save) that "
                "diffusers' LoRA layout cannot hold: convert to a single file or a PEFT folder instead"
            )
        tensors = from_adapters(checkpoint, loaded.adapters)
        write_tensors(destination, cast_for_file(tensors, dtype), {"format": "pt"})
        return f"converted {len(loaded.adapters)} module(s) to diffusers' LoRA layout in {destination}"
    model, model_prefix = skeleton(list(checkpoint.modules.values())), checkpoint.prefix
    if len(checkpoint.roots) > 1 and (source_kind == "peft_folder" or not to_file):
        roots = sorted({name.split(".", 1)[0] for name in loaded.adapters})
        if len(roots) != 1:
            raise ValueError(
                f"{source} adapts several components of {checkpoint.path} ({', '.join(roots)}); a PEFT folder "
                "holds one model: convert against one component folder (e.g. MODEL/unet)"
            )
        root = roots[0]
        modules = [m for m in checkpoint.modules.values() if m.component.root == root]
        model, model_prefix = skeleton(modules, strip=root), modules[0].component.prefix
    with readable_file(source, source_kind) as (readable, kind):
        convert_adapter(model, readable, destination, prefix=prefix or model_prefix, dtype=dtype)
    kind = "single file" if to_file else "PEFT folder"
    return f"converted {len(loaded.adapters)} module(s) to the {kind} {destination}"
