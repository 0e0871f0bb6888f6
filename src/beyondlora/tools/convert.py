"""Converting an adapter between the single-file format and the PEFT folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model import PeftModel


def convert_adapter(
    model: nn.Module,
    source: str | Path,
    destination: str | Path,
    prefix: str = "lycoris",
    dtype: torch.dtype | None = None,
) -> None:
    """Read the adapter at ``source`` for ``model`` and write it to ``destination``.

    The format follows each path: ``*.safetensors`` is a single file (LyCORIS / kohya layout, module keys
    ``<prefix>_<path>``), anything else a PEFT folder.  The base model supplies the module names and
    shapes a conversion needs (single-file keys flatten dots to underscores); it is left exactly as it
    was, ``requires_grad`` flags included.  Raises ``FormatError`` when the destination format cannot
    express the adapter exactly.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapper = PeftModel.from_pretrained(model, source)
    try:
        wrapper.save_pretrained(destination, prefix=prefix, dtype=dtype)
    finally:
        wrapper.unload()
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
