"""LoKr: ``ΔW = s · W1 ⊗ W2`` with out = a·b and in = c·d.

``W1`` (a, c) is the full ``lokr_w1`` or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c) (``decompose_both``
and r < max(a, c)/2).  ``W2`` (b, d, *k) is the full ``lokr_w2`` when r ≥ max(b, d)/2; otherwise
``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·∏k), or in Tucker form (``use_effective_conv2d`` on a k×k
conv) ``lokr_t2`` (r, r, *k) with ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d).  The factor pairs come
from :func:`~beyondlora.ops.factorization.factorization` of out and in (LyCORIS semantics).

The bypass never builds ΔW: with x reshaped row-major to X (c × d), ``(W1 ⊗ W2) x = W1 X W2ᵀ``.
When W2 is decomposed it runs ``w2_b`` first, then ``W1``, then ``w2_a``, which costs about what a LoRA
of rank r costs.  Convolutions run ``W2`` as a conv on the c input groups folded into the batch.
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
from ..ops.bypass_kron import kron_conv, kron_conv_hidden, kron_linear, merged_kron_linear
from ..ops.decompositions import nearest_kronecker
from ..ops.factorization import factorization, peft_factorization
from ..ops.geometry import LayerGeometry
from ..ops.products import kron_delta, tucker_rebuild
from .base import Adapter
from .codec import (
    consumer_alpha,
    file_alpha,
    peft_lycoris_fields,
    peft_lycoris_refusal,
    shape_of,
    with_folder_alpha,
)
from .common import AdapterOptions, Extraction, check_init, fold_scale, kaiming_
from .config_base import RankConfig
from .row_codec import check_rows, present, row_ranges, shared, stacked

#: a Conv1d Kronecker product with a full 3-D W2: PEFT lays it out differently from LyCORIS
_PEFT_CONV1D_LAYOUT = "PEFT lays out a Conv1d Kronecker product with a full W2 differently from LyCORIS"


@dataclass(kw_only=True)
class LoKrConfig(RankConfig):
    """LoKr.

    Attributes:
        decompose_factor: the cap on the smaller Kronecker factor (−1: as balanced as possible).
        decompose_both: also decompose W1 into a rank-r product when r < max(W1 dims)/2.
        unbalanced_factorization: swap the output factors (W1 gets the larger one).
        use_effective_conv2d: Tucker core ``lokr_t2`` for k×k convs.
    """

    peft_type: ClassVar[str] = "LOKR"
    algorithm: ClassVar[str] = "lokr"
    learning_rate: ClassVar[float] = 1e-3
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    unbalanced_factorization: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or a positive integer, got {self.decompose_factor}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(
            super().options_for(module_name),
            use_effective_conv2d=self.use_effective_conv2d,
            decompose_both=self.decompose_both,
            decompose_factor=self.decompose_factor,
            unbalanced_factorization=self.unbalanced_factorization,
        )


@dataclass(frozen=True)
class LoKrLayout:
    """The shapes of a LoKr adapter: out = a·b, in = c·d, and which of W1 (a, c), W2 (b, d, *k) is a product."""

    out_factors: tuple[int, int]
    in_factors: tuple[int, int]
    w1_decomposed: bool
    w2_decomposed: bool

    @classmethod
    def choose(cls, geometry: LayerGeometry, options: AdapterOptions) -> LoKrLayout:
        """LyCORIS' rules: factors from ``decompose_factor``; W1 decomposed only with ``decompose_both`` and
        r < max(a, c)/2; W2 decomposed when r < max(b, d)/2."""
        a, b = factorization(geometry.out_dim, options.decompose_factor)
        c, d = factorization(geometry.in_dim, options.decompose_factor)
        if options.unbalanced_factorization:
            a, b = b, a
        r = options.r
        return cls((a, b), (c, d), options.decompose_both and r < max(a, c) / 2, r < max(b, d) / 2)

    def check(self, geometry: LayerGeometry, r: int) -> None:
        (a, b), (c, d) = self.out_factors, self.in_factors
        if a * b != geometry.out_dim or c * d != geometry.in_dim:
            raise ValueError(
                f"LoKr factors {a}×{b}, {c}×{d} do not multiply to the layer's {geometry.out_dim}×{geometry.in_dim}"
            )


class LoKr(Adapter):
    """Kronecker-product adapter; Linear, Conv (any N-d), Embedding and transformers Conv1D."""

    algorithm = "lokr"
    config_class = LoKrConfig
    file_keys = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
    folder_type = "LOKR"
    folder_keys = file_keys
    extract_name = "lokr"
    algo_names = ("lokr",)
    output_factors = frozenset({"lokr_w1_a", "lokr_w2_a"})
    supports_scalar = True

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        if options.decompose_factor == 0 or options.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or positive, got {options.decompose_factor}")
        r, g = options.r, geometry
        layout = options.lokr_layout or LoKrLayout.choose(g, options)
        layout.check(g, r)
        (a, b), (c, d) = self.out_factors, self.in_factors = layout.out_factors, layout.in_factors
        self.tucker = bool(options.use_effective_conv2d and g.is_conv and any(k != 1 for k in g.kernel))
        if layout.w1_decomposed:
            self.lokr_w1 = None
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
            self.lokr_w1_a = self.lokr_w1_b = None
        self.lokr_t2 = None
        if not layout.w2_decomposed:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *g.kernel))
            self.lokr_w2_a = self.lokr_w2_b = None
        else:
            self.lokr_w2 = None
            if self.tucker:
                self.lokr_t2 = nn.Parameter(torch.empty(r, r, *g.kernel))
                self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
                self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
            else:
                self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
                self.lokr_w2_b = nn.Parameter(torch.empty(r, d * g.kernel_numel))
        self.reset_parameters()

    @property
    def w1_is_full(self) -> bool:
        return self.lokr_w1 is not None

    @property
    def w2_is_full(self) -> bool:
        return self.lokr_w2 is not None

    def reset_parameters(self) -> None:
        """True: W1's first factor is zero (PEFT); "lycoris": W2's last factor is zero; False: all random."""
        with torch.no_grad():
            for p in self.parameters():
                if p is not self.dora_scale:
                    kaiming_(p)
            if self.options.init_weights is True:
                (self.lokr_w1 if self.w1_is_full else self.lokr_w1_a).zero_()
            elif self.options.init_weights == "lycoris":
                (self.lokr_w2 if self.w2_is_full else self.lokr_w2_b).zero_()

    def draw(self) -> tuple[Tensor | None, Tensor] | None:
        """Masks on W1's inner rank (if decomposed) and W2's inner rank (rows of a full W2)."""
        size2 = self.out_factors[1] if self.w2_is_full else self.rank
        second = self.rank_mask(size2)
        if second is None:
            return None
        return (None if self.w1_is_full else self.rank_mask(self.rank)), second

    def w1(self, draw: Any = None) -> Tensor:
        """W1 (a, c)."""
        if self.w1_is_full:
            return self.lokr_w1
        a = self.lokr_w1_a if draw is None or draw[0] is None else self.lokr_w1_a * draw[0]
        return a @ self.lokr_w1_b

    def _w2_out(self, draw: Any) -> Tensor:
        """W2's output-side factor with rank dropout applied: (b, r) or Tucker (r, b)."""
        if draw is None:
            return self.lokr_w2_a
        return self.lokr_w2_a * (draw[1].reshape(-1, 1) if self.tucker else draw[1])

    def w2(self, draw: Any = None) -> Tensor:
        """W2 (b, d, *k)."""
        g = self.geometry
        if self.w2_is_full:
            w2 = self.lokr_w2
            return w2 if draw is None else w2 * draw[1].reshape(-1, *([1] * (w2.dim() - 1)))
        if self.tucker:
            return tucker_rebuild(self.lokr_t2, self._w2_out(draw), self.lokr_w2_b)
        return (self._w2_out(draw) @ self.lokr_w2_b).reshape(self.out_factors[1], self.in_factors[1], *g.kernel)

    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """``s · W1 ⊗ W2`` of shape (out, in, *k) (``s · factor`` folded into the small W1)."""
        return kron_delta(self.w1(draw) * (self.scale * factor), self.w2(draw))

    def bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        if self.geometry.kind == "embedding":
            return self._embedding_bypass(x, draw)
        return super().bypass(x, draw)

    def add_bypass(
        self, result: Tensor, x: Tensor, draw: Any = None, multiplier: float = 1.0, lean: bool = False
    ) -> Tensor | None:
        """``result + t · s · (W1 ⊗ W2) x`` (see :mod:`beyondlora.ops.bypass_kron`), saving x, the factors and
        W2's input side ``t`` (N, c, r) (with ``lean`` not t: it is recomputed in backward)."""
        g = self.geometry
        if g.kind == "embedding" or (g.kind == "conv" and g.groups != 1):
            return None
        w1, alpha = fold_scale(self.w1(draw), self.scale, multiplier)  # a trainable scale goes into the small W1
        if g.kind != "conv":
            if self.w2_is_full:
                return kron_linear(result, x, w1, None, self.w2(draw), alpha)
            return kron_linear(result, x, w1, self.lokr_w2_b, self._w2_out(draw), alpha, lean)
        (_, _), (c, d) = self.out_factors, self.in_factors
        if self.w2_is_full:
            hidden = partial(kron_conv_hidden, g, c, d, "full")
            return kron_conv(result, x, hidden, w1, None, (self.w2(draw),), alpha, lean)
        if self.tucker:
            hidden = partial(kron_conv_hidden, g, c, d, "tucker")
            return kron_conv(result, x, hidden, w1, self._w2_out(draw).t(), (self.lokr_w2_b, self.lokr_t2), alpha, lean)
        hidden = partial(kron_conv_hidden, g, c, d, "low_rank")
        return kron_conv(result, x, hidden, w1, self._w2_out(draw), (self.lokr_w2_b,), alpha, lean)

    def has_merged_step(self) -> bool:
        return self.geometry.kind in ("linear", "hf_conv1d") and self.dora_scale is None

    def merged_step(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, draw: Any = None, multiplier: float = 1.0
    ) -> Tensor | None:
        """:func:`beyondlora.ops.bypass_kron.merged_kron_linear` with ``alpha = t · s`` (a trainable scale goes
        into W1)."""
        if not self.has_merged_step():
            return None
        w1, alpha = fold_scale(self.w1(draw), self.scale, multiplier)
        if self.w2_is_full:
            return merged_kron_linear(x, weight, bias, w1, None, self.w2(draw), alpha)
        return merged_kron_linear(x, weight, bias, w1, self.lokr_w2_b, self._w2_out(draw), alpha)

    def bypass_parts(self, x: Tensor, draw: Any = None) -> tuple[Tensor, Tensor, float] | None:
        """``W1 X W2ᵀ`` with X (…, c, d): W2's input side first, then W1, leaving (…, a, R) @ upᵀ."""
        if self.geometry.kind == "embedding":
            return None
        c, d = self.in_factors
        grid = x.reshape(*x.shape[:-1], c, d)
        if self.w2_is_full:
            return torch.matmul(self.w1(draw), grid), self.w2(draw), self.scale
        hidden = torch.matmul(self.w1(draw), torch.matmul(grid, self.lokr_w2_b.t()))
        return hidden, self._w2_out(draw), self.scale

    def _embedding_bypass(self, x: Tensor, draw: Any) -> Tensor:
        """Column ``p·d + q`` of W1 ⊗ W2 is ``W1[:, p] ⊗ W2[:, q]``: gather both and take the outer product."""
        d = self.in_factors[1]
        w1, w2 = self.w1(draw), self.w2(draw)
        first, second = F.embedding(x // d, w1.t()), F.embedding(x % d, w2.t())
        return (first.unsqueeze(-1) * second.unsqueeze(-2)).flatten(-2) * self.scale

    def conv_bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        """Fold the c input groups into the batch, convolve with W2, then mix the groups with W1."""
        g = self.geometry
        if g.groups != 1:
            return None
        (a, b), (c, d) = self.out_factors, self.in_factors
        batch = x.shape[0]
        grouped = x.reshape(batch * c, d, *x.shape[2:])
        if self.w2_is_full:
            hidden = g.conv(grouped, self.w2(draw))
        elif self.tucker:
            hidden = g.conv(g.pointwise(g.pad_input(grouped), self.lokr_w2_b), self.lokr_t2, padded=True)
        else:
            hidden = g.conv(grouped, self.lokr_w2_b.reshape(-1, d, *g.kernel))
        hidden = hidden.reshape(batch, c, *hidden.shape[1:])
        mixed = torch.einsum("ac,nc...->na...", self.w1(draw) * self.scale, hidden)
        if not self.w2_is_full:
            up = self._w2_out(draw)
            mixed = torch.einsum("br,nar...->nab...", up.t() if self.tucker else up, mixed)
        return mixed.reshape(batch, a * b, *mixed.shape[3:])

    def bypass_flops(self, tokens: int) -> float:
        g = self.geometry
        if g.kind == "conv" and g.groups != 1:
            return super().bypass_flops(tokens)
        (a, b), (c, d) = self.out_factors, self.in_factors
        k = g.kernel_numel
        if self.w2_is_full:
            return float(tokens * min(c * d * b * k + a * c * b, a * c * d + a * d * b * k))
        core = self.rank * self.rank * k if self.tucker else 0
        return float(
            tokens * (c * d * self.rank * (1 if self.tucker else k) + c * core + a * c * self.rank + a * b * self.rank)
        )

    def rebuild_flops(self) -> float:
        return 2.0 * super().rebuild_flops()

    # --- files (single-file and PEFT tensors are our parameters, by name) ------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        """A Tucker W2 is written rebuilt as a full ``lokr_w2`` (b, d, *k), small, which every consumer applies
        (ComfyUI fails on ``lokr_t2``: see shared/FACTS.md); with both factors full in the file the consumers
        use scale 1 whatever alpha says, so our scale goes into W1."""
        out = {name: p for name, p in self.named_parameters() if name.startswith("lokr_")}
        if self.tucker:
            out = {k: v for k, v in out.items() if not k.startswith(("lokr_t2", "lokr_w2"))}
            out["lokr_w2"] = self.w2()
        if self.w1_is_full and "lokr_w2" in out:
            out["lokr_w1"] = self.lokr_w1 * (self.scale * self.multiplier)
            out["alpha"] = torch.tensor(float(self.rank))
        else:
            out["alpha"] = consumer_alpha(self.scale, self.multiplier, self.rank, self.param_dtype)
        return out

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Layout, rank and alpha from the shapes (the consumers' rule for the scale: with both factors full
        scale 1, or ``rank_hint``'s alpha / r); the parameters are the tensors themselves."""
        g = geometry
        w1_decomposed, w2_decomposed = "lokr_w1" not in params, "lokr_w2" not in params
        if w1_decomposed:
            a, c = shape_of(params, "lokr_w1_a", where)[0], shape_of(params, "lokr_w1_b", where)[1]
        else:
            w1_shape = shape_of(params, "lokr_w1", where)
            if len(w1_shape) != 2:
                raise FormatError(f"{where}: lokr_w1 has shape {w1_shape}, expected a matrix (a, c)")
            a, c = w1_shape
        if g.out_dim % a or g.in_dim % c:
            raise FormatError(f"{where}: lokr_w1 of {a}×{c} does not divide the layer's {g.out_dim}×{g.in_dim}")
        ranks = [
            shape_of(params, f"lokr_w{n}_b", where)[0]
            for n, split in (("1", w1_decomposed), ("2", w2_decomposed))
            if split
        ]
        if len(set(ranks)) > 1:
            raise FormatError(f"{where}: LoKr factors of different ranks {ranks} are not supported")
        layout = LoKrLayout((a, g.out_dim // a), (c, g.in_dim // c), w1_decomposed, w2_decomposed)
        options: dict[str, Any] = dict(lokr_layout=layout, use_effective_conv2d="lokr_t2" in params)
        if ranks:
            options.update(r=ranks[0], alpha=file_alpha(params, ranks[0]))
        else:
            r, alpha = rank_hint or (1, 1.0)
            options.update(r=r, alpha=alpha)
        return {k: v for k, v in params.items() if k.startswith("lokr_")}, options

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        if "lokr_w1" in params:
            a, c = shape_of(params, "lokr_w1", where)[:2]
        else:
            a, c = shape_of(params, "lokr_w1_a", where)[0], shape_of(params, "lokr_w1_b", where)[1]
        if "lokr_w2" in params:
            b, d, *kernel = shape_of(params, "lokr_w2", where)
        elif "lokr_t2" in params:
            b, d = shape_of(params, "lokr_w2_a", where)[1], shape_of(params, "lokr_w2_b", where)[1]
            kernel = list(shape_of(params, "lokr_t2", where)[2:])
        else:
            b, d, kernel = shape_of(params, "lokr_w2_a", where)[0], shape_of(params, "lokr_w2_b", where)[1], []
        return (a * b, c * d, *kernel), False

    @classmethod
    def split_file_rows(cls, params: dict[str, Tensor], sizes: Sequence[int], where: str) -> list[dict[str, Tensor]]:
        """ΔW = s · W1 ⊗ W2 with W1 (a, c), W2 (b, d): row j of W1 makes rows [j·b, (j+1)·b) of ΔW, so a split
        on multiples of b is exact, part i being W1[rows_i / b] ⊗ W2 (w1, or w1_a of a decomposed W1) with the
        same W2 and alpha.  A split inside W2's row block has no Kronecker form: refused."""
        w1 = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
        a = params[w1].shape[0]
        out = cls.file_weight_shape(params, where)[0][0]
        check_rows(out, sizes, w1, where)
        b = out // a
        inside = [start for start, _ in row_ranges(sizes)[1:] if start % b]
        if inside:
            raise FormatError(
                f"{where}: LoKr's ΔW = W1 ⊗ W2 repeats W2's {b} rows for each of W1's {a}; the split into "
                f"{list(sizes)} rows cuts inside those blocks at row {inside[0]}, so the parts are no Kronecker "
                "products (exact only where every size is a multiple of W2's rows)"
            )
        return [{**params, w1: params[w1][start // b : end // b]} for start, end in row_ranges(sizes)]

    @classmethod
    def join_file_rows(
        cls, parts: Sequence[dict[str, Tensor] | None], sizes: Sequence[int], where: str
    ) -> dict[str, Tensor]:
        """[W1_1 ⊗ W2; W1_2 ⊗ W2; …] = [W1_1; W1_2; …] ⊗ W2: exact when every part is there and they share W2
        (every W2 tensor), W1's form and alpha; otherwise refused (a Kronecker product has one W2)."""
        found = present(parts, where)
        w1 = "lokr_w1" if "lokr_w1" in found[0] else "lokr_w1_a"
        if len(found) < len(parts):
            why = f"{len(parts) - len(found)} of the {len(parts)} layers have no LoKr"
        elif any(w1 not in p for p in found) or not shared(parts, sorted({k for p in found for k in p} - {w1})):
            why = "the layers' W2 factors (or W1 forms, alphas) differ"
        else:
            return {**found[0], w1: stacked(found, w1)}
        raise FormatError(
            f"{where}: a fused LoKr is one W1 ⊗ W2, which holds stacked layers only when they share W2; {why}"
        )

    def file_folds_kernel(self) -> bool:
        return not self.w2_is_full and not self.tucker

    # --- PEFT folders ----------------------------------------------------------------------------------
    def folder_refusal(self) -> str | None:
        g = self.geometry
        if g.kind == "conv" and len(g.kernel) == 1 and self.w2_is_full:
            return _PEFT_CONV1D_LAYOUT
        return peft_lycoris_refusal(self)

    def folder_tensors(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.named_parameters() if name.startswith("lokr_")}

    @classmethod
    def folder_config(cls, adapters: dict[str, Adapter], fields: dict[str, Any]) -> dict[str, Any]:
        """Plus a ``decompose_factor`` under which PEFT's factorization gives every adapter our shapes."""
        first = next(iter(adapters.values())).options
        decompose_both = any(not a.w1_is_full for a in adapters.values())
        dims = sorted({d for a in adapters.values() for d in (*a.out_factors, *a.in_factors)})
        factor = next(
            (
                f
                for f in [first.decompose_factor, -1, *dims]
                if all(_peft_layout(a, f, decompose_both) for a in adapters.values())
            ),
            None,
        )
        if factor is None:
            raise FormatError("no decompose_factor makes PEFT's factorization reproduce these LoKr shapes")
        fields = peft_lycoris_fields(adapters, fields)
        return {
            **fields,
            "decompose_both": decompose_both,
            "decompose_factor": factor,
            "rank_dropout_scale": first.rank_dropout_scale,
        }

    @classmethod
    def from_folder(
        cls, params: dict[str, Tensor], options: AdapterOptions, geometry: LayerGeometry | None
    ) -> dict[str, Tensor]:
        if geometry is not None and "lokr_w2" in params and geometry.kind == "conv" and len(geometry.kernel) == 1:
            raise FormatError(_PEFT_CONV1D_LAYOUT)
        return with_folder_alpha(params, options)

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
        """ΔW ≈ W1 ⊗ W2, the nearest Kronecker product for ``factorization(dim, how.factor)``
        (:func:`~beyondlora.ops.decompositions.nearest_kronecker`); W2 is then truncated by the tool's rank
        rule where that stores fewer parameters, else kept full (scale 1: alpha = r = 1)."""
        g = geometry
        out_factors, in_factors = factorization(g.out_dim, how.factor), factorization(g.in_dim, how.factor)
        w1, w2 = nearest_kronecker(delta, out_factors, in_factors, how.exact_svd)
        flat = w2.reshape(out_factors[1], -1)
        if how.factorize is not None:
            up, down = how.factorize(flat)
            rank = up.shape[1]
            if rank * (flat.shape[0] + flat.shape[1]) < flat.numel():
                layout = LoKrLayout(out_factors, in_factors, False, True)
                options = AdapterOptions(r=rank, alpha=rank, decompose_factor=how.factor, lokr_layout=layout)
                return cls.with_values(g, options, {"lokr_w1": w1, "lokr_w2_a": up, "lokr_w2_b": down})
        layout = LoKrLayout(out_factors, in_factors, False, False)
        options = AdapterOptions(r=1, alpha=1.0, decompose_factor=how.factor, lokr_layout=layout)
        return cls.with_values(g, options, {"lokr_w1": w1, "lokr_w2": w2})

    def unused_options(self) -> dict[str, str]:
        if self.options.lokr_layout is not None or not self.w2_is_full:
            return {}  # a layout read from a file, or a decomposed W2: the rank acts
        return {
            "r": f"rank {self.rank} has no effect on LoKr layers whose W2 is kept full (LyCORIS' rule: rank ≥ "
            "max(W2 dims)/2); set a lower rank, or a small positive decompose_factor (--factor, e.g. 4), which "
            "makes W1 smaller and W2 larger"
        }

    def consumer_rank(self) -> int | None:
        """None with both factors full: consumers then use scale 1."""
        return None if self.w1_is_full and self.w2_is_full else self.rank

    def summary_notes(self) -> list[str]:
        return [*super().summary_notes(), f"factors {self.out_factors}×{self.in_factors}"]

    @classmethod
    def kohya_args(cls, described: dict[str, Any]) -> dict[str, str]:
        return {"factor": str(described["decompose_factor"])}

    def scalar_factor(self) -> nn.Parameter:
        return self.lokr_w1 if self.w1_is_full else self.lokr_w1_a


def _peft_layout(adapter: LoKr, factor: int, decompose_both: bool) -> bool:
    """Whether PEFT, with this factor, builds W1 (a, c) and W2 (b, d) split or full exactly as ours."""
    g, r = adapter.geometry, adapter.rank
    out_l, out_k = peft_factorization(g.out_dim, factor)
    in_m, in_n = peft_factorization(g.in_dim, factor)
    if (out_l, out_k) != adapter.out_factors or (in_m, in_n) != adapter.in_factors:
        return False
    w1_full = not (decompose_both and r < max(out_l, in_m) / 2)
    w2_full = r >= max(out_k, in_n) / 2
    return w1_full == adapter.w1_is_full and w2_full == adapter.w2_is_full
