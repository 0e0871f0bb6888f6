"""LoRA / LoCon: ``ΔW = s · up · [mid] · down``.

Parameters (LyCORIS names and shapes): ``lora_down`` (r, in, *k) — or (r, in, 1, …) with the Tucker
core ``lora_mid`` (r, r, *k) when ``use_effective_conv2d`` on a k×k conv — and ``lora_up`` (out, r).

Files: single-file tensors ``lora_down.weight``, ``lora_up.weight`` ((out, r, 1, …) on convs), optional
``lora_mid.weight``, ``alpha``; PEFT folders ``lora_A.weight``/``lora_B.weight`` (``lora_embedding_A``/``_B``
on embeddings) and ``lora_magnitude_vector`` for DoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FormatError
from ..ops.bypass_common import autocasting
from ..ops.bypass_lowrank import low_rank_linear, merged_low_rank_linear
from ..ops.decompositions import low_rank_factors, tucker2
from ..ops.geometry import LayerGeometry
from ..ops.products import low_rank_delta, tucker_rebuild
from .base import Adapter
from .codec import consumer_alpha, file_alpha, peft_refusal, reshaped, shape_of, with_folder_alpha
from .common import AdapterOptions, Extraction, check_init, fold_scale, kaiming_
from .config_base import RankConfig
from .row_codec import block_diagonal, check_rows, present, rank_alpha, row_ranges, scale_of, shared, stacked

#: the rank ``extract`` gives a LoRA when the user names none
EXTRACT_RANK = 32
#: PEFT's LoRA tensor names → the single-file names
_FROM_FOLDER = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_embedding_A": "lora_down.weight",
    "lora_embedding_B": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
}


@dataclass(kw_only=True)
class LoraConfig(RankConfig):
    """LoRA / LoCon.  ``use_effective_conv2d``: Tucker core for k×k convs; ``dropout`` (alias
    ``lora_dropout``): dropout on the adapter's input."""

    peft_type: ClassVar[str] = "LORA"
    algorithm: ClassVar[str] = "lora"
    learning_rate: ClassVar[float] = 1e-4
    use_effective_conv2d: bool = False
    dropout: float = 0.0
    lora_dropout: float | None = field(default=None, repr=False)
    init_lora_weights: bool | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.lora_dropout is not None:
            self.dropout, self.lora_dropout = self.lora_dropout, None
        if self.init_lora_weights is not None:
            self.init_weights, self.init_lora_weights = self.init_lora_weights, None
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(
            super().options_for(module_name), use_effective_conv2d=self.use_effective_conv2d, dropout=self.dropout
        )


@dataclass(kw_only=True)
class DyLoraConfig(RankConfig):
    """DyLoRA: LoRA of rank ``r`` trained ``block_size`` ranks at a time."""

    peft_type: ClassVar[str] = "DYLORA"
    algorithm: ClassVar[str] = "dylora"
    learning_rate: ClassVar[float] = 1e-4
    block_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size <= 0 or self.r % self.block_size:
            raise ValueError(f"r ({self.r}) must be a positive multiple of block_size ({self.block_size})")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), block_size=self.block_size)


class LoRA(Adapter):
    """Low-rank adapter; Linear, Conv (any N-d), Embedding and transformers Conv1D."""

    algorithm = "lora"
    config_class = LoraConfig
    file_keys = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})
    folder_type = "LORA"
    folder_keys = frozenset(_FROM_FOLDER)
    resizable = True
    extract_name = "locon"
    algo_names = ("lora", "locon")
    output_factors = frozenset({"lora_up"})
    supports_scalar = True

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        r, g = options.r, geometry
        self.tucker = bool(options.use_effective_conv2d and g.is_conv and any(k != 1 for k in g.kernel))
        ones = (1,) * len(g.kernel)
        down_shape = (r, g.in_dim, *ones) if self.tucker else (r, g.in_dim, *g.kernel)
        self.lora_down = nn.Parameter(torch.empty(down_shape))
        self.lora_mid = nn.Parameter(torch.empty(r, r, *g.kernel)) if self.tucker else None
        self.lora_up = nn.Parameter(torch.empty(g.out_dim, r))
        self.input_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity init zeroes ``up`` (True and "lycoris" agree); ``init_weights=False`` randomizes all."""
        with torch.no_grad():
            kaiming_(self.lora_down)
            if self.lora_mid is not None:
                kaiming_(self.lora_mid)
            if self.options.init_weights is False:
                kaiming_(self.lora_up)
            else:
                self.lora_up.zero_()

    def factors(self, draw: Any = None) -> tuple[Tensor, Tensor | None, Tensor, float]:
        """``(up, mid, down, scale)`` for this forward; rank dropout masks the columns of ``up``."""
        mask = draw
        up = self.lora_up if mask is None else self.lora_up * mask
        return up, self.lora_mid, self.lora_down, self.scale

    def draw(self) -> Tensor | None:
        return self.rank_mask(self.rank)

    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """``s · up @ down`` reshaped to (out, in, *k); Tucker: ``s · Σ mid[i,j] up[:, i] down[j]``."""
        up, mid, down, scale = self.factors(draw)
        up = up * (scale * factor)
        if mid is not None:
            return tucker_rebuild(mid, up.t(), down.flatten(1))
        return low_rank_delta(up, down.flatten(1)).reshape(self.geometry.weight_shape)

    def add_delta(self, weight: Tensor, base_weight: Tensor, draw: Any = None, multiplier: float = 1.0) -> Tensor:
        """``W + t · s · up @ down`` as one ``addmm`` (one pass over W, no separate ΔW); Tucker, under autocast
        (which would round W to 16 bits before the sum) and factors in another dtype than W (``addmm`` does not
        promote) as the default."""
        up, mid, down, scale = self.factors(draw)
        if mid is not None or autocasting(weight.device.type) or up.dtype != weight.dtype:
            return super().add_delta(weight, base_weight, draw, multiplier)
        up, alpha = fold_scale(up, scale, multiplier)
        return low_rank_delta(up, down.flatten(1), alpha, base=weight.flatten(1)).view(weight.shape)

    def add_bypass(
        self, result: Tensor, x: Tensor, draw: Any = None, multiplier: float = 1.0, lean: bool = False
    ) -> Tensor | None:
        """Linear-like layers: ``result + t · s · up (down x)`` by :func:`beyondlora.ops.bypass_lowrank.low_rank_linear`
        (its products in the orientation CPU BLAS runs fastest), saving x and the rank-r hidden."""
        if self.geometry.kind not in ("linear", "hf_conv1d"):
            return None
        up, _, down, scale = self.factors(draw)
        up, alpha = fold_scale(up, scale, multiplier)
        return low_rank_linear(result, self.input_dropout(x), down, up, alpha)

    def has_merged_step(self) -> bool:
        """Linear-like layers without input dropout (it exists on the bypass only) or DoRA.  (On a 320-channel
        3×3 convolution the same scheme measured slower than the bypass: see benchmarks/README.md.)"""
        g = self.geometry
        return g.kind in ("linear", "hf_conv1d") and self.options.dropout == 0 and self.dora_scale is None

    def merged_step(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, draw: Any = None, multiplier: float = 1.0
    ) -> Tensor | None:
        """:func:`beyondlora.ops.bypass_lowrank.merged_low_rank_linear` with ``alpha = t · s``."""
        if not self.has_merged_step():
            return None
        up, _, down, scale = self.factors(draw)
        up, alpha = fold_scale(up, scale, multiplier)
        return merged_low_rank_linear(x, weight, bias, down, up, alpha)

    def bypass_parts(self, x: Tensor, draw: Any = None) -> tuple[Tensor, Tensor, float]:
        up, _, down, scale = self.factors(draw)
        x = self.input_dropout(x)
        hidden = F.embedding(x, down.t()) if self.geometry.kind == "embedding" else F.linear(x, down)
        return hidden, up, scale

    def conv_bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        up, mid, down, scale = self.factors(draw)
        g = self.geometry
        if g.groups != 1:
            return None
        x = self.input_dropout(x)
        if mid is None:
            hidden = g.conv(x, down)
        else:
            hidden = g.conv(g.pointwise(g.pad_input(x), down.flatten(1)), mid, padded=True)
        return g.pointwise(hidden, up * scale)

    def bypass_flops(self, tokens: int) -> float:
        g = self.geometry
        if g.kind == "conv" and g.groups != 1:
            return super().bypass_flops(tokens)
        core = self.rank * self.rank * g.kernel_numel if self.tucker else 0
        down = self.rank * g.in_dim * (1 if self.tucker else g.kernel_numel)
        return float(tokens * (down + core + self.rank * g.out_dim))

    def rebuild_flops(self) -> float:
        return float(self.rank * self.lora_down[0].numel() * self.geometry.out_dim)

    def needs_bypass(self) -> bool:
        """Input dropout only exists on the bypass path."""
        return self.training and self.options.dropout > 0

    # --- files ---------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        g = self.geometry
        out = {
            "lora_down.weight": self.lora_down,
            "lora_up.weight": self.lora_up.reshape(g.out_dim, self.rank, *((1,) * len(g.kernel))),
            "alpha": consumer_alpha(self.scale, self.multiplier, self.rank, self.param_dtype),
        }
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid
        return out

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        g, r = geometry, shape_of(params, "lora_down.weight", where)[0]
        tucker = "lora_mid.weight" in params
        ones = (1,) * len(g.kernel)
        state = {
            "lora_down": reshaped(params, "lora_down.weight", (r, g.in_dim, *(ones if tucker else g.kernel)), where),
            "lora_up": reshaped(params, "lora_up.weight", (g.out_dim, r), where),
        }
        if tucker:
            state["lora_mid"] = reshaped(params, "lora_mid.weight", (r, r, *g.kernel), where)
        return state, dict(r=r, alpha=file_alpha(params, r), use_effective_conv2d=tucker)

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        down, up = shape_of(params, "lora_down.weight", where), shape_of(params, "lora_up.weight", where)
        kernel = shape_of(params, "lora_mid.weight", where)[2:] if "lora_mid.weight" in params else down[2:]
        return (up[0], down[1], *kernel), False

    @classmethod
    def split_file_rows(cls, params: dict[str, Tensor], sizes: Sequence[int], where: str) -> list[dict[str, Tensor]]:
        """ΔW = s · up · down with up (Σ sizes, r): part i is the LoRA (up[rows_i], down), its rows of ΔW exactly
        (the parts share the down).  Rank components whose up column is zero on a part's rows are dropped
        from it, with alpha scaled by r_i / r to keep s: a block-diagonal up (kohya's split-qkv files, ours
        joined) gives each part its own rank back."""
        if "lora_mid.weight" in params:
            raise FormatError(f"{where}: a Tucker LoRA (lora_mid) is a convolution's; fused layers are linear")
        up, down = params["lora_up.weight"], params["lora_down.weight"]
        up = up.reshape(up.shape[0], -1)
        check_rows(up.shape[0], sizes, "lora_up.weight", where)
        rank = up.shape[1]
        alpha = params["alpha"].double() if "alpha" in params else torch.tensor(float(rank), dtype=torch.float64)
        parts = []
        for a, b in row_ranges(sizes):
            used = up[a:b].ne(0).any(dim=0)
            if used.all() or not used.any():
                parts.append({**params, "lora_up.weight": up[a:b]})
                continue
            kept = int(used.sum())
            scaled = (alpha * kept / rank).to(params["alpha"].dtype if "alpha" in params else torch.float32)
            parts.append({"lora_down.weight": down[used], "lora_up.weight": up[a:b, used], "alpha": scaled})
        return parts

    @classmethod
    def join_file_rows(
        cls, parts: Sequence[dict[str, Tensor] | None], sizes: Sequence[int], where: str
    ) -> dict[str, Tensor]:
        """Parts sharing their down and alpha stack their ups (rank r).  Otherwise the fused module is the
        rank-R LoRA (R = Σ r_i) with down = [down_1; down_2; …] (R, in) and block-diagonal
        up = blockdiag(s_i · up_i) (Σ sizes, R), alpha = R: its rows i are s_i · up_i · down_i exactly."""
        found = present(parts, where)
        if any("lora_mid.weight" in p for p in found):
            raise FormatError(f"{where}: a Tucker LoRA (lora_mid) is a convolution's; fused layers are linear")
        ups = [None if p is None else p["lora_up.weight"].reshape(p["lora_up.weight"].shape[0], -1) for p in parts]
        if shared(parts, ("lora_down.weight", "alpha")):
            return {**found[0], "lora_up.weight": torch.cat(ups, dim=0)}
        scaled = [None if p is None else up * scale_of(p, up.shape[1]) for p, up in zip(parts, ups, strict=True)]
        down = stacked(found, "lora_down.weight")
        up = block_diagonal(scaled, sizes, like=found[0]["lora_up.weight"])
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": rank_alpha(down.shape[0])}

    # --- PEFT folders ----------------------------------------------------------------------------------
    def folder_refusal(self) -> str | None:
        g = self.geometry
        if (reason := peft_refusal(self)) is not None:
            return reason
        if g.kind == "conv" and g.groups != 1:
            return "PEFT's LoRA does not support grouped convolutions"
        if g.kind == "conv" and any(d != 1 for d in g.dilation):
            return "PEFT's LoRA ignores the convolution's dilation"
        if self.tucker:
            return "PEFT has no Tucker form for lora on this layer"
        if self.dora_scale is not None and (not self.options.dora_on_output or self.multiplier != 1.0):
            return "PEFT supports DoRA only for LoRA, on the output axis, at multiplier 1"
        return None

    def folder_tensors(self) -> dict[str, Tensor]:
        g = self.geometry
        ones = (1,) * len(g.kernel)
        if g.kind == "embedding":
            out = {"lora_embedding_A": self.lora_down, "lora_embedding_B": self.lora_up}
        else:
            out = {"lora_A.weight": self.lora_down, "lora_B.weight": self.lora_up.reshape(g.out_dim, -1, *ones)}
        if self.dora_scale is not None:
            magnitude = self.dora_scale.flatten()
            out["lora_magnitude_vector"] = magnitude.reshape(1, -1, *ones) if g.kind == "conv" else magnitude
        return out

    @classmethod
    def folder_config(cls, adapters: dict[str, Adapter], fields: dict[str, Any]) -> dict[str, Any]:
        """PEFT's LoRA fields (it has no module_dropout: that only shapes training)."""
        first = next(iter(adapters.values()))
        fields = dict(fields)
        return {
            "lora_alpha": fields.pop("alpha"),
            **fields,
            "lora_dropout": first.options.dropout,
            "use_rslora": False,
            "use_dora": any(a.dora_scale is not None for a in adapters.values()),
            "init_lora_weights": True,
            "fan_in_fan_out": any(a.geometry.kind == "hf_conv1d" for a in adapters.values()),
            "bias": "none",
        }

    @classmethod
    def from_folder(
        cls, params: dict[str, Tensor], options: AdapterOptions, geometry: LayerGeometry | None
    ) -> dict[str, Tensor]:
        out = {_FROM_FOLDER.get(k, k): v for k, v in params.items()}
        if "dora_scale" in out:
            out["dora_scale"] = out["dora_scale"].reshape(-1, 1)
        return with_folder_alpha(out, options)

    # --- tools -----------------------------------------------------------------------------------------
    @classmethod
    def extracted(
        cls,
        geometry: LayerGeometry,
        delta: Tensor,
        delta_bias: Tensor | None,
        how: Extraction,
        base_weight: Tensor | None = None,
    ) -> Adapter | None:
        """ΔW (out, in·K) ≈ up · down by the tool's rank rule (without one: rank :data:`EXTRACT_RANK`); with
        ``how.tucker`` a k×k conv gets a Tucker-2 core (HOSVD, :func:`~beyondlora.ops.decompositions.tucker2`)
        of that rank instead."""
        g = geometry
        flat = delta.reshape(g.out_dim, -1)
        if how.factorize is not None:
            up, down = how.factorize(flat)
        else:
            up, down = low_rank_factors(flat, EXTRACT_RANK, how.exact_svd)
        rank = up.shape[1]
        if rank * (flat.shape[0] + flat.shape[1]) >= flat.numel():
            return None
        if how.tucker and g.kind == "conv" and g.kernel_numel > 1:
            rank = min(rank, g.out_dim, g.in_dim)
            core, u_out, u_in = tucker2(delta, rank)
            values = {"lora_up": u_out, "lora_down": u_in.T, "lora_mid": core}
            return cls.with_values(g, AdapterOptions(r=rank, alpha=rank, use_effective_conv2d=True), values)
        return cls.with_values(g, AdapterOptions(r=rank, alpha=rank), {"lora_up": up, "lora_down": down})

    def scalar_factor(self) -> nn.Parameter:
        return self.lora_up

    def lora_factors(self) -> tuple[Tensor, Tensor, float] | None:
        return None if self.tucker else (self.lora_up, self.lora_down.flatten(1), self.scale)


class DyLoRA(LoRA):
    """DyLoRA: a LoRA of rank ``r`` trained one block of ``block_size`` ranks at a time.

    In training each forward draws a block ``b``; ranks ``[0, (b+1)·block)`` are used with scale
    ``alpha / ((b+1)·block)`` (rs-LoRA: ``alpha / √((b+1)·block)``, times a trainable scalar where there is one)
    and only block ``b`` receives gradients.  In eval the full rank is used (scale ``alpha / r``);
    :meth:`truncated_factors` gives the adapter at any smaller rank.
    """

    algorithm = "dylora"
    config_class = DyLoraConfig
    file_family = "lora"
    algo_names = ("dylora",)
    extract_name = None  # extraction writes LoRA

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        if options.block_size <= 0 or options.r % options.block_size:
            raise ValueError(f"DyLoRA needs r ({options.r}) to be a multiple of block_size ({options.block_size})")
        if options.use_effective_conv2d:
            raise ValueError("DyLoRA has no Tucker form (use_effective_conv2d)")
        super().__init__(geometry, options, base_weight)

    def draw(self) -> int | None:
        if not self.training:
            return None
        return int(torch.randint(self.rank // self.options.block_size, ()).item())

    def factors(self, draw: Any = None) -> tuple[Tensor, Tensor | None, Tensor, float]:
        if draw is None:
            return self.lora_up, None, self.lora_down, self.scale
        block = self.options.block_size
        start, stop = draw * block, (draw + 1) * block
        down = torch.cat([self.lora_down[:start].detach(), self.lora_down[start:stop]])
        up = torch.cat([self.lora_up[:, :start].detach(), self.lora_up[:, start:stop]], dim=1)
        return up, None, down, self.scale_at(stop)

    def truncated_factors(self, rank: int) -> tuple[Tensor, Tensor, float]:
        """``(up[:, :rank], down[:rank], scale_at(rank))`` — the adapter cut to ``rank``."""
        if not 0 < rank <= self.rank:
            raise ValueError(f"rank must be in [1, {self.rank}], got {rank}")
        return self.lora_up[:, :rank], self.lora_down[:rank], self.scale_at(rank)
