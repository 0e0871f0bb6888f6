"""What every algorithm's file codec shares: reading a tensor at the shape its role needs, and the alpha a
consumer reads.

A consumer (ComfyUI, AUTOMATIC1111, LyCORIS) computes ``ΔW = (alpha / rank) · rebuild(tensors)`` for the
low-rank algorithms, where rank is read from the tensors' shapes; an exporter that writes
``alpha = scale · multiplier · rank`` makes that formula give exactly our ΔW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import FormatError
from .base import Adapter
from .common import AdapterOptions


def reshaped(params: dict[str, Tensor], key: str, shape: tuple[int, ...], where: str) -> Tensor:
    """``params[key]`` viewed as ``shape``; a missing tensor or one of another size raises naming both."""
    if key not in params:
        raise FormatError(f"{where}: missing tensor {key!r} (expected shape {shape})")
    tensor = params[key]
    if tensor.numel() != torch.Size(shape).numel():
        raise FormatError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.reshape(shape)


def shape_of(params: dict[str, Tensor], key: str, where: str) -> tuple[int, ...]:
    """The shape of ``params[key]``; a missing tensor raises naming it."""
    if key not in params:
        raise FormatError(f"{where}: missing tensor {key!r}")
    return tuple(params[key].shape)


def file_alpha(params: dict[str, Tensor], rank: int) -> float:
    """The module's ``alpha`` (``rank`` when the file has none, as the consumers assume)."""
    alpha = params.get("alpha")
    return float(rank) if alpha is None else float(alpha.double().item())


def consumer_alpha(scale: float, multiplier: float, rank: int, dtype: torch.dtype) -> Tensor:
    """The 0-d alpha that makes ``alpha / rank`` equal ``scale · multiplier``.

    Stored in float32 at least (never in a half-precision save dtype): it carries the baked scale.
    """
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(float(scale * multiplier * rank), dtype=wide)


def optional_bias(
    params: dict[str, Tensor], key: str, out_dim: int, has_bias: bool, state: dict[str, Tensor], where: str
) -> None:
    """Put ``params[key]`` (a bias delta (out,)) into ``state``; zeros when the layer has a bias the file
    does not change; an error when the file changes a bias the layer lacks."""
    if key in params:
        if not has_bias:
            raise FormatError(f"{where}: has {key} but the layer has no bias")
        state[key] = reshaped(params, key, (out_dim,), where)
    elif has_bias:
        state[key] = torch.zeros(out_dim)


# --- PEFT folders ----------------------------------------------------------------------------------------
def with_folder_alpha(params: dict[str, Tensor], options: AdapterOptions) -> dict[str, Tensor]:
    """Folder tensors plus the single-file ``alpha`` giving PEFT's scale: alpha / r, rs-LoRA alpha / √r."""
    alpha = options.alpha * (options.r**0.5 if options.use_rslora else 1.0)
    return {**params, "alpha": torch.tensor(float(alpha), dtype=torch.float64)}


def peft_refusal(adapter: Adapter) -> str | None:
    """What makes any PEFT tuner compute something else for ``adapter``: it ignores ``padding_mode``."""
    g = adapter.geometry
    if g.kind == "conv" and g.padding_mode != "zeros":
        return f"PEFT ignores padding_mode={g.padding_mode!r} on convolutions"
    return None


def peft_lycoris_refusal(adapter: Adapter) -> str | None:
    """Why PEFT's LoHa/LoKr tuners (its "LyCORIS" family) would compute something else for ``adapter``."""
    g = adapter.geometry
    if (reason := peft_refusal(adapter)) is not None:
        return reason
    if g.kind in ("embedding", "hf_conv1d") or len(g.kernel) == 3:
        return f"PEFT's {adapter.algorithm} does not support a {g.kind} layer of this kind"
    if getattr(adapter, "tucker", False) and len(g.kernel) != 2:
        return f"PEFT has no Tucker form for {adapter.algorithm} on this layer"
    if adapter.dora_scale is not None:
        return "PEFT supports DoRA only for LoRA, on the output axis, at multiplier 1"
    return None


def peft_lycoris_fields(adapters: dict[str, Adapter], fields: dict[str, Any]) -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT's LoHa and LoKr share."""
    first = next(iter(adapters.values())).options
    return {
        **fields,
        "rank_dropout": first.rank_dropout,
        "module_dropout": first.module_dropout,
        "init_weights": True,
        "use_effective_conv2d": any(getattr(a, "tucker", False) for a in adapters.values()),
    }
