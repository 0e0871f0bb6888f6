"""How a frozen base keeps its weights: float32, bfloat16, float16, or float8 computing in bfloat16.

``fp8`` stores every Linear's and convolution's weight as ``float8_e4m3fn`` (one byte per value: a
Flux-sized transformer of 12 B parameters in 12 GB) behind a parametrization that hands the layer a bfloat16
copy when it runs, ``W = bf16(W₈)``; the copy lives only during that layer's forward (and its backward's
recomputation).  Other parameters (norms, biases, embeddings) are kept in bfloat16.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

#: the storage of each ``--base-precision``
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
#: the dtype each storage computes in (what ``--mixed-precision`` must be)
COMPUTE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}


class Upcast(nn.Module):
    """The parametrization of an fp8-stored weight: ``W ↦ W.to(bfloat16)`` (frozen: no inverse is needed)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(torch.bfloat16)


def store_weights(model: nn.Module, precision: str) -> None:
    """Keep ``model``'s frozen weights in ``precision`` (a key of :data:`STORAGE`), except those its class keeps
    in float32 (``_keep_in_fp32_modules``, e.g. T5's feed-forward output)."""
    if precision == "fp32":
        return
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    half = torch.bfloat16 if precision == "fp8" else STORAGE[precision]
    for name, module in list(model.named_modules()):  # listed first: parametrizations add modules
        if not keep.isdisjoint(name.split(".")):
            continue
        for param_name, param in list(module.named_parameters(recurse=False)):
            if precision == "fp8" and param_name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
                parametrize.register_parametrization(module, "weight", Upcast(), unsafe=True)
                stored = module.parametrizations.weight.original
                stored.data = stored.data.to(torch.float8_e4m3fn)
            else:
                param.data = param.data.to(half)
