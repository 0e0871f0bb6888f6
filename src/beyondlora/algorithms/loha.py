"""LoHa: ``ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b)``.

Parameters (LyCORIS names and shapes): ``hada_w1_a``/``hada_w2_a`` (out, r), ``hada_w1_b``/``hada_w2_b``
(r, in·∏k).  Tucker form (``use_effective_conv2d`` on a k×k conv): cores ``hada_t1``/``hada_t2``
(r, r, *k), ``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in), each product rebuilt as
``Σ_ij t[i, j] w_a[i] ⊗ w_b[j]``.

The bypass uses ``(A1 B1) ⊙ (A2 B2) = (A1 •r A2)(B1 •c B2)`` (row- and column-wise Khatri-Rao
products), i.e. a LoRA of rank r², so ΔW is never built in the forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FormatError
from ..ops.bypass_common import autocasting
from ..ops.bypass_khatri_rao import khatri_rao_conv, khatri_rao_conv_hidden, khatri_rao_linear, merged_khatri_rao_linear
from ..ops.geometry import LayerGeometry
from ..ops.products import column_khatri_rao, hadamard_delta, row_khatri_rao, tucker_rebuild
from .base import Adapter
from .codec import (
    consumer_alpha,
    file_alpha,
    peft_lycoris_fields,
    peft_lycoris_refusal,
    reshaped,
    shape_of,
    with_folder_alpha,
)
from .common import AdapterOptions, check_init, fold_scale, kaiming_
from .config_base import RankConfig
from .row_codec import block_diagonal, check_rows, present, rank_alpha, row_ranges, scale_of, shared, stacked


@dataclass(kw_only=True)
class LoHaConfig(RankConfig):
    """LoHa.  ``use_effective_conv2d``: Tucker cores for k×k convs."""

    peft_type: ClassVar[str] = "LOHA"
    algorithm: ClassVar[str] = "loha"
    learning_rate: ClassVar[float] = 5e-4
    use_effective_conv2d: bool = False

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), use_effective_conv2d=self.use_effective_conv2d)


class LoHa(Adapter):
    """Hadamard-product adapter; Linear, Conv (any N-d), Embedding and transformers Conv1D."""

    algorithm = "loha"
    config_class = LoHaConfig
    file_keys = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
    folder_type = "LOHA"
    folder_keys = file_keys
    algo_names = ("loha",)
    output_factors = frozenset({"hada_w1_a", "hada_w2_a"})
    supports_scalar = True

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        r, g = options.r, geometry
        self.tucker = bool(options.use_effective_conv2d and g.is_conv and any(k != 1 for k in g.kernel))
        if self.tucker:
            a_shape, b_shape = (r, g.out_dim), (r, g.in_dim)
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *g.kernel))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *g.kernel))
        else:
            a_shape, b_shape = (g.out_dim, r), (r, g.in_dim * g.kernel_numel)
            self.hada_t1 = self.hada_t2 = None
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """True: ``w2_b = 0``, the rest Kaiming; "lycoris": ``w2_a = 0``, b ~ N(0, 1), a and cores ~ N(0, 0.1²)."""
        with torch.no_grad():
            if self.options.init_weights == "lycoris":
                for p in (self.hada_w1_b, self.hada_w2_b):
                    nn.init.normal_(p, std=1.0)
                for p in (self.hada_w1_a, self.hada_t1, self.hada_t2):
                    if p is not None:
                        nn.init.normal_(p, std=0.1)
                self.hada_w2_a.zero_()
                return
            for p in self.parameters():
                if p is not self.dora_scale:
                    kaiming_(p)
            if self.options.init_weights is True:
                self.hada_w2_b.zero_()

    def draw(self) -> tuple[Tensor, Tensor] | None:
        first = self.rank_mask(self.rank)
        return None if first is None else (first, self.rank_mask(self.rank))

    def _out_factors(self, draw: Any) -> tuple[Tensor, Tensor]:
        """``w1_a``, ``w2_a`` with rank dropout applied on their rank axis."""
        a1, a2 = self.hada_w1_a, self.hada_w2_a
        if draw is not None:
            axis_shape = (-1, 1) if self.tucker else (1, -1)
            a1, a2 = a1 * draw[0].reshape(axis_shape), a2 * draw[1].reshape(axis_shape)
        return a1, a2

    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """``s · (w1_a w1_b) ⊙ (w2_a w2_b)`` reshaped to (out, in, *k) (``s · factor`` folded into w1_a)."""
        a1, a2 = self._out_factors(draw)
        a1 = a1 * (self.scale * factor)
        if self.tucker:
            return tucker_rebuild(self.hada_t1, a1, self.hada_w1_b) * tucker_rebuild(self.hada_t2, a2, self.hada_w2_b)
        return hadamard_delta(a1, self.hada_w1_b, a2, self.hada_w2_b).reshape(self.geometry.weight_shape)

    def add_delta(self, weight: Tensor, base_weight: Tensor, draw: Any = None, multiplier: float = 1.0) -> Tensor:
        """Without autograd: ``W + t · s · (w1_a w1_b) ⊙ (w2_a w2_b)`` as one ``addcmul`` (no separate ΔW).  With
        it (and for Tucker, and under autocast) the default, whose Hadamard product keeps only the factors for
        backward (autograd of ``addcmul`` would keep both weight-sized products)."""
        if torch.is_grad_enabled() or self.tucker or autocasting(weight.device.type):
            return super().add_delta(weight, base_weight, draw, multiplier)
        a1, a2 = self._out_factors(draw)
        factors = (a1 * (self.scale * multiplier), self.hada_w1_b.flatten(1), a2, self.hada_w2_b.flatten(1))
        return hadamard_delta(*factors, base=weight.flatten(1)).view(weight.shape)

    def add_bypass(
        self, result: Tensor, x: Tensor, draw: Any = None, multiplier: float = 1.0, lean: bool = False
    ) -> Tensor | None:
        """``result + t · s · ΔW x`` as a rank-r² product (see :mod:`beyondlora.ops.bypass_khatri_rao`) saving x
        and the factors; on convolutions also the rank-r² hidden unless ``lean`` (on linear-like layers the
        hidden is always recomputed in backward: one GEMM, measured no slower than keeping it)."""
        g = self.geometry
        if g.kind == "embedding" or (g.kind == "conv" and g.groups != 1):
            return None
        a1, a2 = self._out_factors(draw)
        a1, alpha = fold_scale(a1, self.scale, multiplier)  # a trainable scale goes into w1_a
        b1, b2 = self.hada_w1_b, self.hada_w2_b
        if g.kind != "conv":
            return khatri_rao_linear(result, x, a1, b1, a2, b2, alpha)
        hidden = partial(khatri_rao_conv_hidden, g)
        if self.tucker:
            factors = (b1, b2, self.hada_t1, self.hada_t2)
            return khatri_rao_conv(result, x, hidden, a1.t(), a2.t(), factors, alpha, lean)
        return khatri_rao_conv(result, x, hidden, a1, a2, (b1, b2), alpha, lean, geometry=g)

    def has_merged_step(self) -> bool:
        return self.geometry.kind in ("linear", "hf_conv1d") and self.dora_scale is None

    def merged_step(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, draw: Any = None, multiplier: float = 1.0
    ) -> Tensor | None:
        """:func:`beyondlora.ops.bypass_khatri_rao.merged_khatri_rao_linear` with ``alpha = t · s`` (a trainable
        scale goes into w1_a)."""
        if not self.has_merged_step():
            return None
        a1, a2 = self._out_factors(draw)
        a1, alpha = fold_scale(a1, self.scale, multiplier)
        return merged_khatri_rao_linear(x, weight, bias, a1, self.hada_w1_b, a2, self.hada_w2_b, alpha)

    def bypass_parts(self, x: Tensor, draw: Any = None) -> tuple[Tensor, Tensor, float]:
        """A rank-r² LoRA: ``up = w1_a •r w2_a`` (out, r²), ``down = w1_b •c w2_b`` (r², in)."""
        a1, a2 = self._out_factors(draw)
        down = column_khatri_rao(self.hada_w1_b, self.hada_w2_b)
        hidden = F.embedding(x, down.t()) if self.geometry.kind == "embedding" else F.linear(x, down)
        return hidden, row_khatri_rao(a1, a2), self.scale

    def conv_bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        g = self.geometry
        if g.groups != 1:
            return None
        a1, a2 = self._out_factors(draw)
        if self.tucker:
            up = row_khatri_rao(a1.t(), a2.t())
            down = column_khatri_rao(self.hada_w1_b, self.hada_w2_b)
            core = torch.einsum("ij...,kl...->ikjl...", self.hada_t1, self.hada_t2).flatten(2, 3).flatten(0, 1)
            hidden = g.conv(g.pointwise(g.pad_input(x), down), core, padded=True)
        else:
            up = row_khatri_rao(a1, a2)
            down = column_khatri_rao(self.hada_w1_b, self.hada_w2_b)
            hidden = g.conv(x, down.reshape(-1, g.in_dim, *g.kernel))
        return g.pointwise(hidden, up * self.scale)

    def bypass_flops(self, tokens: int) -> float:
        g = self.geometry
        if g.kind == "conv" and g.groups != 1:
            return super().bypass_flops(tokens)
        r2 = self.rank * self.rank
        if self.tucker:
            return float(tokens * r2 * (g.in_dim + r2 * g.kernel_numel + g.out_dim))
        return float(tokens * r2 * (g.in_dim * g.kernel_numel + g.out_dim))

    def rebuild_flops(self) -> float:
        return (2 * self.rank + 1) * super().rebuild_flops()

    # --- files (single-file and PEFT tensors are our parameters, by name) ------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        out = {name: p for name, p in self.named_parameters() if name.startswith("hada_")}
        return {**out, "alpha": consumer_alpha(self.scale, self.multiplier, self.rank, self.param_dtype)}

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tucker form (``hada_t1``) has a (r, out), b (r, in); else a (out, r), b (r, in·∏k)."""
        g, r = geometry, shape_of(params, "hada_w1_b", where)[0]
        tucker = "hada_t1" in params
        a_shape = (r, g.out_dim) if tucker else (g.out_dim, r)
        b_shape = (r, g.in_dim) if tucker else (r, g.in_dim * g.kernel_numel)
        state = {}
        for n in ("1", "2"):
            state[f"hada_w{n}_a"] = reshaped(params, f"hada_w{n}_a", a_shape, where)
            state[f"hada_w{n}_b"] = reshaped(params, f"hada_w{n}_b", b_shape, where)
            if tucker:
                state[f"hada_t{n}"] = reshaped(params, f"hada_t{n}", (r, r, *g.kernel), where)
        return state, dict(r=r, alpha=file_alpha(params, r), use_effective_conv2d=tucker)

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        a, b = shape_of(params, "hada_w1_a", where), shape_of(params, "hada_w1_b", where)
        if "hada_t1" in params:
            return (a[1], b[1], *shape_of(params, "hada_t1", where)[2:]), False
        return (a[0], b[1]), False

    @classmethod
    def split_file_rows(cls, params: dict[str, Tensor], sizes: Sequence[int], where: str) -> list[dict[str, Tensor]]:
        """ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b): rows of a Hadamard product are the Hadamard product of the rows,
        so part i is (w1_a[rows_i], w1_b, w2_a[rows_i], w2_b) with the same alpha, exactly."""
        _refuse_tucker(params, where)
        check_rows(params["hada_w1_a"].shape[0], sizes, "hada_w1_a", where)
        out = []
        for a, b in row_ranges(sizes):
            out.append({**params, "hada_w1_a": params["hada_w1_a"][a:b], "hada_w2_a": params["hada_w2_a"][a:b]})
        return out

    @classmethod
    def join_file_rows(
        cls, parts: Sequence[dict[str, Tensor] | None], sizes: Sequence[int], where: str
    ) -> dict[str, Tensor]:
        """Parts sharing w1_b, w2_b and alpha stack their a factors (rank r).  Otherwise rank R = Σ r_i:
        W1a = blockdiag(s_i · w1_a_i), W1b = [w1_b_1; …], W2a = blockdiag(w2_a_i), W2b = [w2_b_1; …], alpha = R;
        rows i of (W1a W1b) ⊙ (W2a W2b) are s_i · (w1_a_i w1_b_i) ⊙ (w2_a_i w2_b_i) exactly."""
        found = present(parts, where)
        for p in found:
            _refuse_tucker(p, where)
        if shared(parts, ("hada_w1_b", "hada_w2_b", "alpha")):
            return {**found[0], "hada_w1_a": stacked(found, "hada_w1_a"), "hada_w2_a": stacked(found, "hada_w2_a")}
        like = found[0]["hada_w1_a"]
        w1_a = [None if p is None else p["hada_w1_a"] * scale_of(p, p["hada_w1_b"].shape[0]) for p in parts]
        w2_a = [None if p is None else p["hada_w2_a"] for p in parts]
        w1_b = stacked(found, "hada_w1_b")
        return {
            "hada_w1_a": block_diagonal(w1_a, sizes, like),
            "hada_w1_b": w1_b,
            "hada_w2_a": block_diagonal(w2_a, sizes, like),
            "hada_w2_b": stacked(found, "hada_w2_b"),
            "alpha": rank_alpha(w1_b.shape[0]),
        }

    def file_folds_kernel(self) -> bool:
        return not self.tucker

    def folder_refusal(self) -> str | None:
        return peft_lycoris_refusal(self)

    def folder_tensors(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.named_parameters() if name.startswith("hada_")}

    @classmethod
    def folder_config(cls, adapters: dict[str, Adapter], fields: dict[str, Any]) -> dict[str, Any]:
        return peft_lycoris_fields(adapters, fields)

    @classmethod
    def from_folder(
        cls, params: dict[str, Tensor], options: AdapterOptions, geometry: LayerGeometry | None
    ) -> dict[str, Tensor]:
        return with_folder_alpha(params, options)

    def scalar_factor(self) -> nn.Parameter:
        return self.hada_w1_a


def _refuse_tucker(params: dict[str, Tensor], where: str) -> None:
    if "hada_t1" in params:
        raise FormatError(f"{where}: a Tucker LoHa (hada_t1) is a convolution's; fused layers are linear")
