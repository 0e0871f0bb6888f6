"""Per-algorithm mapping between an adapter and Hugging Face PEFT's tensors and config.

PEFT's semantics differ from ours in places; the writer either expresses our adapter exactly (bake the
multiplier and rs-LoRA into ``alpha_pattern``, pick a ``decompose_factor`` whose PEFT factorization gives
our LoKr shapes) or refuses with the reason.  Reading translates PEFT's names to LyCORIS's and reuses the
single-file importer, which infers every shape from the tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..algorithms import Adapter
from ..ops.factorization import factorization
from ..ops.geometry import LayerGeometry
from .errors import FormatError

PEFT_TYPES = {"lora": "LORA", "dylora": "LORA", "loha": "LOHA", "lokr": "LOKR", "ia3": "IA3"}


def peft_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """PEFT's ``factorization``: an exact divisor ``factor`` is returned as ``(factor, dimension // factor)``
    unordered; otherwise the same walk as LyCORIS."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


def peft_effective_alpha(adapter: Adapter) -> float:
    """The alpha PEFT needs (it scales by alpha / r) to reproduce our scale × multiplier."""
    return adapter.scale * adapter.multiplier * adapter.rank


def check_expressible(adapter: Adapter) -> None:
    """Raise :class:`FormatError` when PEFT would compute something else for this adapter."""
    g, algo = adapter.geometry, adapter.algorithm
    if g.kind == "conv" and g.padding_mode != "zeros":
        raise FormatError(f"PEFT ignores padding_mode={g.padding_mode!r} on convolutions")
    if g.kind == "conv" and g.groups != 1 and algo in ("lora", "dylora"):
        raise FormatError("PEFT's LoRA does not support grouped convolutions")
    if g.kind == "conv" and any(d != 1 for d in g.dilation) and algo in ("lora", "dylora"):
        raise FormatError("PEFT's LoRA ignores the convolution's dilation")
    if algo in ("loha", "lokr") and (g.kind in ("embedding", "hf_conv1d") or len(g.kernel) == 3):
        raise FormatError(f"PEFT's {algo} does not support a {g.kind} layer of this kind")
    if getattr(adapter, "tucker", False) and (algo == "lora" or len(g.kernel) != 2):
        raise FormatError(f"PEFT has no Tucker form for {algo} on this layer")
    if adapter.dora_scale is not None:
        if algo != "lora" or not adapter.options.dora_on_output or adapter.multiplier != 1.0:
            raise FormatError("PEFT supports DoRA only for LoRA, on the output axis, at multiplier 1")
    if algo == "lokr" and g.kind == "conv" and len(g.kernel) == 1 and adapter.w2_is_full:
        raise FormatError("PEFT lays out a Conv1d Kronecker product with a full W2 differently")
    if algo == "ia3" and not adapter.on_input and g.has_bias and bool(adapter.weight.detach().any()):
        raise FormatError("PEFT's (IA)³ also scales the bias of output-scaled layers; ours leaves it unchanged")


def check_peft_semantics(peft_type: str, geometry: LayerGeometry, params: dict[str, Tensor], on_input: bool) -> None:
    """Refuse PEFT tensors whose PEFT meaning our adapters cannot reproduce exactly."""
    if peft_type == "IA3" and not on_input and geometry.has_bias and not torch.all(params["ia3_l"] == 1):
        raise FormatError("PEFT's (IA)³ scales this layer's bias too; ours leaves biases unchanged")
    if peft_type == "LOKR" and "lokr_w2" in params and geometry.kind == "conv" and len(geometry.kernel) == 1:
        raise FormatError("PEFT lays out a Conv1d Kronecker product with a full W2 differently from LyCORIS")


def export_peft_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's names (without the ``base_model.model.<path>.`` prefix)."""
    check_expressible(adapter)
    g, algo = adapter.geometry, adapter.algorithm
    if algo in ("lora", "dylora"):
        if g.kind == "embedding":
            out = {"lora_embedding_A": adapter.lora_down, "lora_embedding_B": adapter.lora_up}
        else:
            ones = (1,) * len(g.kernel)
            out = {"lora_A.weight": adapter.lora_down, "lora_B.weight": adapter.lora_up.reshape(g.out_dim, -1, *ones)}
        if adapter.dora_scale is not None:
            magnitude = adapter.dora_scale.flatten()
            out["lora_magnitude_vector"] = magnitude.reshape(1, -1, *ones) if g.kind == "conv" else magnitude
        return {k: v.detach() for k, v in out.items()}
    if algo in ("loha", "lokr"):
        return {k: v.detach() for k, v in adapter.named_parameters() if k.startswith(("hada_", "lokr_"))}
    if algo == "ia3":
        ones = (1,) * len(g.kernel)
        scale = 1 + adapter.multiplier * adapter.weight.detach()
        if g.kind == "conv":
            return {"ia3_l": scale.reshape(1, -1, *ones)}
        return {"ia3_l": scale.reshape(1, -1) if adapter.on_input else scale.reshape(-1, 1)}
    raise FormatError(f"PEFT has no {algo} adapter")


def lokr_factor_for_peft(adapters: list[Adapter], preferred: int, decompose_both: bool) -> int:
    """A ``decompose_factor`` under which PEFT builds every LoKr adapter with our exact shapes."""
    dims = sorted({d for a in adapters for d in (*a.out_factors, *a.in_factors)})
    for factor in [preferred, -1, *dims]:
        if all(_peft_layout_matches(a, factor, decompose_both) for a in adapters):
            return factor
    raise FormatError("no decompose_factor makes PEFT's factorization reproduce these LoKr shapes")


def _peft_layout_matches(adapter: Adapter, factor: int, decompose_both: bool) -> bool:
    """Whether PEFT, with this factor, builds W1 (a, c) and W2 (b, d) split or full exactly as ours."""
    g, r = adapter.geometry, adapter.rank
    out_l, out_k = peft_factorization(g.out_dim, factor)
    in_m, in_n = peft_factorization(g.in_dim, factor)
    if (out_l, out_k) != adapter.out_factors or (in_m, in_n) != adapter.in_factors:
        return False
    w1_full = not (decompose_both and r < max(out_l, in_m) / 2)
    w2_full = r >= max(out_k, in_n) / 2
    return w1_full == adapter.w1_is_full and w2_full == adapter.w2_is_full


def to_lycoris_names(params: dict[str, Tensor], peft_type: str, on_input: bool, alpha: float) -> dict[str, Tensor]:
    """PEFT tensor names → the single-file names :func:`import_adapter` reads (plus ``alpha``)."""
    renamed = {
        "lora_A.weight": "lora_down.weight",
        "lora_B.weight": "lora_up.weight",
        "lora_embedding_A": "lora_down.weight",
        "lora_embedding_B": "lora_up.weight",
        "lora_magnitude_vector": "dora_scale",
    }
    out = {renamed.get(k, k): v for k, v in params.items()}
    if peft_type == "IA3":
        out = {"weight": out.pop("ia3_l").flatten() - 1, "on_input": torch.tensor(int(on_input))}
    elif "dora_scale" in out:
        out["dora_scale"] = out["dora_scale"].reshape(-1, 1)
    if peft_type != "IA3":
        out["alpha"] = torch.tensor(float(alpha), dtype=torch.float64)
    return out
