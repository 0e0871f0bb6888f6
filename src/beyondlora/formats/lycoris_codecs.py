"""Per-algorithm mapping between an adapter and its tensors in a LyCORIS / kohya single file.

What a consumer (ComfyUI, AUTOMATIC1111, LyCORIS) computes from a module's tensors:
``ΔW = (alpha / rank) · rebuild(tensors)``, where rank is the first dimension of ``lora_down`` /
``hada_w1_b`` and, for LoKr, the inner rank of the decomposed factor (scale 1 when both LoKr factors are
full); (IA)³, Full and Norm carry no scale.  The exporter writes the adapter *at its current multiplier*
so that this formula gives exactly our ΔW; the importer inverts it (multiplier 1, same ΔW).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from ..algorithms import ALGORITHMS, Adapter, AdapterOptions
from ..algorithms.base import adapter_dtype
from ..algorithms.lokr import LoKrLayout
from ..ops.geometry import LayerGeometry
from .errors import FormatError

#: options that do not change ΔW; kept in our metadata so a reload restores how the adapter trains
TRAINING_OPTIONS = ("rank_dropout", "rank_dropout_scale", "module_dropout", "block_size", "dropout", "decompose_factor")


#: the tensor names each algorithm's module may carry in a single file (besides ``alpha`` and ``dora_scale``)
FILE_TENSORS: dict[str, set[str]] = {
    "lora": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "ia3": {"weight", "on_input"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
}


def _scale_alpha(adapter: Adapter, rank: int) -> Tensor:
    """The alpha that makes ``alpha / rank`` equal our effective scale (scale × multiplier).

    Stored in float32 at least (never in a half-precision save dtype): it carries the baked scale.
    """
    dtype = torch.float64 if adapter.param_dtype == torch.float64 else torch.float32
    return torch.tensor(float(adapter.scale * adapter.multiplier * rank), dtype=dtype)


def export_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The adapter's single-file tensors (names without the module prefix), consumer-exact."""
    t = adapter.multiplier
    algo = adapter.algorithm
    g = adapter.geometry
    out: dict[str, Tensor]
    if algo in ("lora", "dylora"):
        kernel_ones = (1,) * len(g.kernel)
        out = {
            "lora_down.weight": adapter.lora_down,
            "lora_up.weight": adapter.lora_up.reshape(g.out_dim, adapter.rank, *kernel_ones),
            "alpha": _scale_alpha(adapter, adapter.rank),
        }
        if adapter.lora_mid is not None:
            out["lora_mid.weight"] = adapter.lora_mid
    elif algo == "loha":
        out = {name: p for name, p in adapter.named_parameters() if name.startswith("hada_")}
        out["alpha"] = _scale_alpha(adapter, adapter.rank)
    elif algo == "lokr":
        out = {name: p for name, p in adapter.named_parameters() if name.startswith("lokr_")}
        if adapter.w1_is_full and adapter.w2_is_full:
            # consumers use scale 1 here whatever alpha says: bake our scale into W1
            out["lokr_w1"] = adapter.lokr_w1 * (adapter.scale * t)
            out["alpha"] = torch.tensor(float(adapter.rank))
        else:
            out["alpha"] = _scale_alpha(adapter, adapter.rank)
    elif algo == "ia3":
        shape = (1, -1, *([1] * len(g.kernel))) if g.is_conv else (-1,)
        out = {"weight": (adapter.weight * t).reshape(shape), "on_input": torch.tensor(int(adapter.on_input))}
    elif algo == "full":
        out = {"diff": adapter.diff * t}
        if adapter.diff_b is not None:
            out["diff_b"] = adapter.diff_b * t
    elif algo == "norm":
        out = {"w_norm": adapter.w_norm * t}
        if adapter.b_norm is not None:
            out["b_norm"] = adapter.b_norm * t
    else:  # pragma: no cover - every registered algorithm is handled above
        raise FormatError(f"no single-file layout for {algo}")
    if adapter.dora_scale is not None:
        if t != 1.0:
            raise FormatError(
                "a DoRA adapter with multiplier ≠ 1 cannot be written exactly: consumers apply the strength to "
                "the decomposed weight, which no parameter change reproduces; set the multiplier to 1 first"
            )
        out["dora_scale"] = adapter.dora_scale
    return {k: v.detach() for k, v in out.items()}


def describe(adapter: Adapter) -> dict[str, Any]:
    """What our metadata records for one module: the algorithm and the options that shape training."""
    info: dict[str, Any] = {"algorithm": adapter.algorithm, "r": adapter.options.r, "alpha": adapter.options.alpha}
    info.update(use_rslora=adapter.options.use_rslora, multiplier=adapter.multiplier)
    info.update({name: getattr(adapter.options, name) for name in TRAINING_OPTIONS})
    return info


def detect_algorithm(params: dict[str, Tensor], where: str) -> str:
    """The algorithm of one module's tensors, from its key names."""
    if "lora_down.weight" in params:
        return "lora"
    if "hada_w1_a" in params:
        return "loha"
    if "lokr_w1" in params or "lokr_w1_a" in params:
        return "lokr"
    if "diff" in params:
        return "full"
    if "w_norm" in params:
        return "norm"
    if "weight" in params:
        return "ia3"
    raise FormatError(f"{where}: no known adapter in keys {sorted(params)}")


def _reshaped(params: dict[str, Tensor], key: str, shape: tuple[int, ...], where: str) -> Tensor:
    if key not in params:
        raise FormatError(f"{where}: missing tensor {key!r} (expected shape {shape})")
    tensor = params[key]
    if tensor.numel() != torch.Size(shape).numel():
        raise FormatError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.reshape(shape)


def _alpha(params: dict[str, Tensor], rank: int) -> float:
    alpha = params.get("alpha")
    return float(rank) if alpha is None else float(alpha.double().item())


def import_adapter(
    params: dict[str, Tensor],
    geometry: LayerGeometry,
    base_weight: Tensor,
    where: str,
    recorded: dict[str, Any] | None = None,
    full_kron: tuple[int, float] | None = None,
) -> Adapter:
    """Build the adapter a module's single-file tensors describe (multiplier 1, the consumer's ΔW), on the
    base weight's device, in the adapter dtype for it.

    ``recorded`` is our metadata for the module when we wrote the file: it restores the algorithm
    (DyLoRA) and the training options; everything that shapes ΔW is read from the tensors.
    ``full_kron`` = (r, alpha) gives a LoKr with both factors full the scale alpha / r (PEFT's rule)
    instead of the UIs' 1.
    """
    algorithm = detect_algorithm(params, where)
    unknown = sorted(set(params) - FILE_TENSORS[algorithm] - {"alpha", "dora_scale"})
    if unknown:
        raise FormatError(f"{where}: tensor(s) {unknown} are not part of a {algorithm} adapter")
    try:
        state, options = _read_state(algorithm, params, geometry, where)
    except KeyError as missing:
        raise FormatError(f"{where}: missing tensor {missing}") from None
    if recorded:
        if recorded.get("algorithm") == "dylora" and algorithm == "lora":
            algorithm = "dylora"
        if "r" in recorded and full_kron is None:  # both LoKr factors full: keep our r, with scale 1
            full_kron = (recorded["r"], float(recorded["r"]))
        options.update({k: recorded[k] for k in TRAINING_OPTIONS if k in recorded})
    layout = options.get("lokr_layout")
    if full_kron is not None and layout is not None and not (layout.w1_decomposed or layout.w2_decomposed):
        options.update(r=full_kron[0], alpha=full_kron[1])
    known = {f.name for f in fields(AdapterOptions)}
    try:
        adapter = ALGORITHMS[algorithm](
            geometry, AdapterOptions(**{k: v for k, v in options.items() if k in known}), base_weight
        )
    except (TypeError, ValueError) as error:
        raise FormatError(f"{where}: {error}") from None
    adapter.to(device=base_weight.device, dtype=adapter_dtype(base_weight))
    own = dict(adapter.named_parameters())
    for key, tensor in state.items():
        if key not in own or tuple(own[key].shape) != tuple(tensor.shape):
            expected = tuple(own[key].shape) if key in own else "no such parameter"
            raise FormatError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise FormatError(f"{where}: missing tensor(s) {missing}")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return adapter


def _read_state(
    algorithm: str, params: dict[str, Tensor], g: LayerGeometry, where: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our parameter tensors and the ΔW-shaping options for one module's single-file tensors."""
    ones = (1,) * len(g.kernel)
    state: dict[str, Tensor] = {}
    options: dict[str, Any] = {}
    if algorithm == "lora":
        r = params["lora_down.weight"].shape[0]
        tucker = "lora_mid.weight" in params
        state["lora_down"] = _reshaped(
            params, "lora_down.weight", (r, g.in_dim, *(ones if tucker else g.kernel)), where
        )
        state["lora_up"] = _reshaped(params, "lora_up.weight", (g.out_dim, r), where)
        if tucker:
            state["lora_mid"] = _reshaped(params, "lora_mid.weight", (r, r, *g.kernel), where)
        options.update(r=r, alpha=_alpha(params, r), use_effective_conv2d=tucker)
    elif algorithm == "loha":
        r = params["hada_w1_b"].shape[0]
        tucker = "hada_t1" in params
        a_shape = (r, g.out_dim) if tucker else (g.out_dim, r)
        b_shape = (r, g.in_dim) if tucker else (r, g.in_dim * g.kernel_numel)
        for n in ("1", "2"):
            state[f"hada_w{n}_a"] = _reshaped(params, f"hada_w{n}_a", a_shape, where)
            state[f"hada_w{n}_b"] = _reshaped(params, f"hada_w{n}_b", b_shape, where)
            if tucker:
                state[f"hada_t{n}"] = _reshaped(params, f"hada_t{n}", (r, r, *g.kernel), where)
        options.update(r=r, alpha=_alpha(params, r), use_effective_conv2d=tucker)
    elif algorithm == "lokr":
        options.update(_lokr_options(params, g, where))
        state.update({k: v for k, v in params.items() if k.startswith("lokr_")})
    elif algorithm == "ia3":
        on_input = bool(params["on_input"].item()) if "on_input" in params else False
        state["weight"] = _reshaped(params, "weight", (g.in_dim if on_input else g.out_dim,), where)
        options.update(on_input=on_input)
    elif algorithm == "full":
        state["diff"] = _reshaped(params, "diff", g.weight_shape, where)
        _optional_bias(params, "diff_b", g, state, where)
    elif algorithm == "norm":
        state["w_norm"] = _reshaped(params, "w_norm", (g.out_dim,), where)
        _optional_bias(params, "b_norm", g, state, where)
    if "dora_scale" in params:
        scale = params["dora_scale"]
        on_output = scale.shape[0] == g.out_dim and scale.numel() == g.out_dim
        state["dora_scale"] = scale.reshape(
            (g.out_dim, *([1] * len(g.weight_shape[1:]))) if on_output else (1, g.in_dim, *ones)
        )
        options.update(use_dora=True, dora_on_output=on_output)
    return state, options


def _optional_bias(params: dict[str, Tensor], key: str, g: LayerGeometry, state: dict[str, Tensor], where: str) -> None:
    if key in params:
        if not g.has_bias:
            raise FormatError(f"{where}: has {key} but the layer has no bias")
        state[key] = _reshaped(params, key, (g.out_dim,), where)
    elif g.has_bias:
        state[key] = torch.zeros(g.out_dim)


def _lokr_options(params: dict[str, Tensor], g: LayerGeometry, where: str) -> dict[str, Any]:
    """Layout, rank and alpha of a LoKr module from its shapes (the consumer's rule for the scale)."""
    w1_decomposed = "lokr_w1" not in params
    w2_decomposed = "lokr_w2" not in params
    tucker = "lokr_t2" in params
    if w1_decomposed:
        a, c = params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1]
    else:
        a, c = params["lokr_w1"].shape[:2]
    if g.out_dim % a or g.in_dim % c:
        raise FormatError(f"{where}: lokr_w1 of {a}×{c} does not divide the layer's {g.out_dim}×{g.in_dim}")
    b, d = g.out_dim // a, g.in_dim // c
    ranks = []
    if w1_decomposed:
        ranks.append(params["lokr_w1_b"].shape[0])
    if w2_decomposed:
        ranks.append(params["lokr_w2_b"].shape[0])
    if len(set(ranks)) > 1:
        raise FormatError(f"{where}: LoKr factors of different ranks {ranks} are not supported")
    layout = LoKrLayout((a, b), (c, d), w1_decomposed, w2_decomposed)
    if not ranks:  # both full: consumers use scale 1
        return dict(r=1, alpha=1.0, lokr_layout=layout, use_effective_conv2d=tucker)
    r = ranks[0]
    return dict(r=r, alpha=_alpha(params, r), lokr_layout=layout, use_effective_conv2d=tucker)
