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

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.bypass_kron import kron_conv, kron_linear, merged_kron_linear
from ..ops.factorization import factorization
from ..ops.geometry import LayerGeometry
from ..ops.products import kron, tucker_rebuild
from .base import Adapter, AdapterOptions, check_init, fold_scale, kaiming_


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
        return kron(self.w1(draw) * (self.scale * factor), self.w2(draw))

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
            hidden = partial(_kron_conv_hidden, g, c, d, "full")
            return kron_conv(result, x, hidden, w1, None, (self.w2(draw),), alpha, lean)
        if self.tucker:
            hidden = partial(_kron_conv_hidden, g, c, d, "tucker")
            return kron_conv(result, x, hidden, w1, self._w2_out(draw).t(), (self.lokr_w2_b, self.lokr_t2), alpha, lean)
        hidden = partial(_kron_conv_hidden, g, c, d, "low_rank")
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


def _kron_conv_hidden(
    g: LayerGeometry, c: int, d: int, mode: str, x: Tensor, first: Tensor, core: Tensor | None = None
) -> Tensor:
    """W2's input side on a convolution: x (B, c·d, *S) with the c input groups folded into the batch,
    convolved to (B·c, R, *S') by the full W2 (R = b, ``mode="full"``), ``w2_b`` (R = r, ``"low_rank"``) or
    ``w2_b`` then the Tucker core (``"tucker"``).  Bound with :func:`functools.partial` up to ``x``: a plain
    function and a partial are what ``torch.compile`` traces on every supported torch."""
    grouped = x.reshape(x.shape[0] * c, d, *x.shape[2:])
    if mode == "full":
        return g.conv(grouped, first)
    if mode == "tucker":
        return g.conv(g.pointwise(g.pad_input(grouped), first), core, padded=True)
    return g.conv(grouped, first.reshape(-1, d, *g.kernel))
