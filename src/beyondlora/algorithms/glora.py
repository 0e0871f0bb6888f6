"""GLoRA (LyCORIS' ``GLoRAModule``): ``ΔW = s · (W · A + B)``, a low-rank mix of the base weight's input
channels plus a LoRA.

Parameters (LyCORIS names): ``a1`` (in, r) and ``a2`` (r, in) give A = a1 · a2 (in × in), acting on the input
axis of the canonical weight W (out, in, *k) — ``(W · A)[o, j, κ] = Σ_i W[o, i, κ] A[i, j]``, i.e. W applied to
``A x`` — and ``b1`` (out, r), ``b2`` (r, in, *k) give B = b1 · b2 as LoRA's ``up · down``; with
``use_effective_conv2d`` on a k×k convolution, ``b2`` is (r, in, 1, …) and a Tucker core ``bm`` (r, r, *k)
gives ``B = Σ_ij bm[i, j] b1[:, i] ⊗ b2[j]``.  s = alpha / r (rs-LoRA alpha / √r).  ``in`` is the per-group
width of a grouped convolution: the same A mixes every group's channels.

ΔW depends on W (:attr:`~.base.Adapter.scales_base`): merging remembers the delta it added.  The bypass computes
``s · (W (a1 (a2 x)) + b1 (b2 x))`` with the base layer's own operation for ``W (·)`` (one more base op on an
input-sized ``A x``, rebuilt in backward rather than kept; the two hiddens are r wide and kept, what a rank-2r
LoRA keeps, with ``backward_memory`` "lean" too); the combined path forms ``(W a1) a2`` (never the in × in A),
and trains linear-like layers by a merged step whose factor gradients take a rank-2r route.

Files: ``a1.weight`` (in, r), ``a2.weight`` (r, in), ``b1.weight`` (out, r) — each with trailing 1s on
convolutions — ``b2.weight`` (r, in, *k), optional ``bm.weight``, and ``alpha`` carrying scale × multiplier as
alpha / r (r read from ``a2``), which LyCORIS and ComfyUI apply exactly.  PEFT's tuner named GLoRA computes
another function (see :data:`PEFT_GLORA`): no folders.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FormatError
from ..ops.bypass_common import autocasting
from ..ops.bypass_glora import glora_halves, merged_glora_linear
from ..ops.decompositions import low_rank_factors, tucker2
from ..ops.geometry import LayerGeometry
from ..ops.products import input_mixed, low_rank_delta, tucker_rebuild
from ..ops.recompute import rebuilt_if_saved
from .base import Adapter
from .codec import consumer_alpha, file_alpha, shape_of
from .common import AdapterOptions, Extraction, check_init, kaiming_
from .config_base import RankConfig

#: the rank ``extract`` gives B when the user names none (as LoRA's)
EXTRACT_RANK = 32
#: why no PEFT folder can hold (or give) this adapter
PEFT_GLORA = (
    "PEFT's GLoRA is another method (W0 ⊙ A elementwise, plus bias terms W0·C, b0 ⊙ D and E), which cannot "
    "express LyCORIS' GLoRA ΔW = s·(W·a1·a2 + b1·b2)"
)


@dataclass(kw_only=True)
class GLoRAConfig(RankConfig):
    """GLoRA (LyCORIS').  ``use_effective_conv2d``: Tucker core for the B half of k×k convs.  It has no DoRA
    form (LyCORIS' GLoRA has none)."""

    peft_type: ClassVar[str] = "GLORA"
    algorithm: ClassVar[str] = "glora"
    learning_rate: ClassVar[float] = 1e-4
    refused_fields: ClassVar[dict[str, str]] = {"use_dora": "GLoRA has no DoRA form (LyCORIS' GLoRA has none)"}
    use_effective_conv2d: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError(f"use_dora: {self.refused_fields['use_dora']}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), use_effective_conv2d=self.use_effective_conv2d)


class GLoRA(Adapter):
    """GLoRA on Linear, Conv (any N-d, grouped too), Embedding and transformers Conv1D."""

    algorithm = "glora"
    config_class = GLoRAConfig
    file_keys = frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"})
    folder_type = "GLORA"
    foreign_folder = PEFT_GLORA
    extract_name = "glora"
    algo_names = ("glora",)
    scales_base = True
    bypass_uses_base = True
    shifts_input = True

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        if options.use_dora:
            raise ValueError(GLoRAConfig.refused_fields["use_dora"])
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        r, g = options.r, geometry
        self.tucker = bool(options.use_effective_conv2d and g.is_conv and any(k != 1 for k in g.kernel))
        ones = (1,) * len(g.kernel)
        self.a1 = nn.Parameter(torch.empty(g.in_dim, r))
        self.a2 = nn.Parameter(torch.empty(r, g.in_dim))
        self.b1 = nn.Parameter(torch.empty(g.out_dim, r))
        self.b2 = nn.Parameter(torch.empty(r, g.in_dim, *(ones if self.tucker else g.kernel)))
        self.bm = nn.Parameter(torch.empty(r, r, *g.kernel)) if self.tucker else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LyCORIS' init: a1, b1 (and bm) Kaiming-uniform, a2 and b2 zero (the identity); ``init_weights=False``
        randomizes a2 and b2 as well."""
        with torch.no_grad():
            for param in (self.a1, self.b1, self.bm):
                if param is not None:
                    kaiming_(param)
            for param in (self.a2, self.b2):
                if self.options.init_weights is False:
                    kaiming_(param)
                else:
                    param.zero_()

    # --- the math --------------------------------------------------------------------------------------
    def draw(self) -> tuple[Tensor, Tensor] | None:
        """Rank dropout as LyCORIS': independent masks on the A and the B hidden, each component kept with
        probability 1 − p (× 1 / (1 − p) with ``rank_dropout_scale``; LyCORIS 4.1.3 keeps it with probability p
        and divides by the mask's mean)."""
        first = self.rank_mask(self.rank)
        return None if first is None else (first, self.rank_mask(self.rank))

    def _masked(self, draw: Any) -> tuple[Tensor, Tensor]:
        """``(a1, b1)`` with this forward's rank masks on their columns."""
        if draw is None:
            return self.a1, self.b1
        return self.a1 * draw[0], self.b1 * draw[1]

    @property
    def _flat(self) -> bool:
        """Whether ΔW is a matrix product in its (out, in) form: every layer without a kernel larger than 1."""
        return self.geometry.kernel_numel == 1

    def _flat_factors(self, base_weight: Tensor, draw: Any, alpha: float) -> tuple[Tensor, Tensor]:
        """``(left (out, 2r), right (2r, in))`` with ``left @ right = alpha · (W a1 a2 + b1 b2)`` on a layer
        without a kernel (:attr:`_flat`): both halves in one rank-2r product."""
        a1, b1 = self._masked(draw)
        weight = base_weight.reshape(self.geometry.out_dim, -1)
        return glora_halves(weight, a1 * alpha, self.a2, b1 * alpha, self.b2.reshape(self.rank, -1))

    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """``s · (W a1 a2 + b1 b2)`` in canonical shape (Tucker: ``B = Σ bm[i, j] b1[:, i] ⊗ b2[j]``), the scale
        folded into the r-wide factors a1 and b1."""
        g, alpha = self.geometry, self.scale * factor
        if self._flat:
            return low_rank_delta(*self._flat_factors(base_weight, draw, alpha)).reshape(g.weight_shape)
        a1, b1 = self._masked(draw)
        mixed = input_mixed(base_weight, a1 * alpha, self.a2)
        if self.bm is not None:
            return mixed + tucker_rebuild(self.bm, (b1 * alpha).t(), self.b2.flatten(1))
        return mixed + low_rank_delta(b1 * alpha, self.b2.flatten(1)).reshape(g.weight_shape)

    def add_delta(self, weight: Tensor, base_weight: Tensor, draw: Any = None, multiplier: float = 1.0) -> Tensor:
        """``W' + t · ΔW`` as one ``addmm`` over the rank-2r product on layers without a kernel; elsewhere, under
        autocast (which would round W' to 16 bits before the sum) and with factors in another dtype than W' as
        the plain sum."""
        alpha = self.scale * multiplier
        if not self._flat or autocasting(weight.device.type) or self.a1.dtype != weight.dtype:
            return super().add_delta(weight, base_weight, draw, multiplier)
        left, right = self._flat_factors(base_weight, draw, alpha)
        return low_rank_delta(left, right, base=weight.reshape(left.shape[0], -1)).view(weight.shape)

    def has_merged_step(self) -> bool:
        """Linear-like layers (:func:`~beyondlora.ops.bypass_glora.merged_glora_linear`)."""
        return self.geometry.kind in ("linear", "hf_conv1d")

    def merged_step(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, draw: Any = None, multiplier: float = 1.0
    ) -> Tensor | None:
        """``x (W + t · ΔW)ᵀ + b`` with the factors' gradients through their rank-2r route; it spares the bypass's
        base op on ``A x`` in forward and backward."""
        if not self.has_merged_step():
            return None
        a1, b1 = self._masked(draw)
        return merged_glora_linear(x, weight, bias, a1, self.a2, b1, self.b2, self.scale * multiplier)

    def input_shift(self, x: Tensor, draw: Any = None, with_rest: bool = True) -> tuple[Tensor, Tensor | None] | None:
        """``(s · a1 (a2 x), s · b1 (b2 x))``: on linear-like layers both hiddens from one (…, 2r) product; on
        convolutions A mixes each position's channels (each group's alike) and B runs as LoCon's convolution
        with the layer's stride and padding (Tucker: pointwise, core, pointwise).  Embeddings have none: A x for
        an index is a dense column, which the base op (a lookup) cannot take."""
        g, r, s = self.geometry, self.rank, self.scale
        a1, b1 = self._masked(draw)
        if g.kind in ("linear", "hf_conv1d"):
            hidden = F.linear(x, torch.cat([self.a2, self.b2]))
            return F.linear(hidden[..., :r], a1 * s), F.linear(hidden[..., r:], b1 * s)
        if g.kind != "conv":
            return None
        groups = g.groups
        mixed = g.pointwise(g.pointwise(x, _per_group(self.a2, groups), groups), _per_group(a1 * s, groups), groups)
        if not with_rest:
            return mixed, None
        if self.bm is None:
            hidden = g.conv(x, _per_group(self.b2, groups), groups)
        else:
            inner = g.pointwise(g.pad_input(x), _per_group(self.b2.flatten(1), groups), groups)
            hidden = g.conv(inner, _per_group(self.bm, groups), groups, padded=True)
        return mixed, g.pointwise(hidden, b1 * s, groups)

    def base_bypass(self, x: Tensor, apply_base: Callable[[Tensor], Tensor], draw: Any = None) -> Tensor | None:
        """``W (s · A x) + s · B x`` (:meth:`input_shift`) with the base op on its own, where the layer cannot
        fold ``A x`` into its base call (another adapter there needs ``W x`` of the plain input)."""
        pair = self.input_shift(x, draw)
        if pair is None:
            return None
        a_x, b_x = pair
        kept = x.detach()
        # a convolution keeps its input for backward even with W frozen: rebuild A x from x there instead
        with rebuilt_if_saved(a_x, torch.no_grad()(lambda: self.input_shift(kept, draw, with_rest=False)[0])):
            return apply_base(a_x) + b_x

    def bypass_flops(self, tokens: int) -> float:
        """The A and B hiddens' products and the sum ``x + A x``, which the layer's own base call takes
        (:meth:`input_shift`); the input positions of a strided convolution are ∏stride times its outputs."""
        g, r = self.geometry, self.rank
        if g.kind == "embedding":
            return math.inf
        if g.kind != "conv":
            return float(tokens * (3 * r * g.in_dim + r * g.out_dim + g.in_dim))
        inputs, width = tokens * math.prod(g.stride), g.in_dim * g.groups
        if self.bm is None:
            b_half = tokens * r * width * g.kernel_numel
        else:
            b_half = inputs * r * width + tokens * g.groups * r * r * g.kernel_numel
        return float(inputs * (2 * r + 1) * width + b_half + tokens * r * g.out_dim)

    def rebuild_flops(self) -> float:
        """``W a1``, its product with a2 and B: three r-wide passes over the weight's size (Tucker: plus the core)."""
        g, r = self.geometry, self.rank
        size = g.out_dim * g.in_dim * g.kernel_numel
        core = r * r * g.in_dim * g.kernel_numel if self.bm is not None else 0
        return float(3 * r * size + core)

    # --- files ---------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        ones = (1,) * len(self.geometry.kernel)
        out = {
            "a1.weight": self.a1.reshape(*self.a1.shape, *ones),
            "a2.weight": self.a2.reshape(*self.a2.shape, *ones),
            "b1.weight": self.b1.reshape(*self.b1.shape, *ones),
            "b2.weight": self.b2,
            "alpha": consumer_alpha(self.scale, self.multiplier, self.rank, self.param_dtype),
        }
        if self.bm is not None:
            out["bm.weight"] = self.bm
        return out

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """r from ``a2.weight``; every tensor's leading sizes checked exactly (a1 and a2 have the same size
        transposed, so a size check alone would take one for the other)."""
        g, r = geometry, shape_of(params, "a2.weight", where)[0]
        tucker = "bm.weight" in params
        ones = (1,) * len(g.kernel)
        state = {
            "a1": _exact(params, "a1.weight", (g.in_dim, r), where),
            "a2": _exact(params, "a2.weight", (r, g.in_dim), where),
            "b1": _exact(params, "b1.weight", (g.out_dim, r), where),
            "b2": _exact(params, "b2.weight", (r, g.in_dim, *(ones if tucker else g.kernel)), where),
        }
        if tucker:
            state["bm"] = _exact(params, "bm.weight", (r, r, *g.kernel), where)
        return state, dict(r=r, alpha=file_alpha(params, r), use_effective_conv2d=tucker)

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        b1, b2 = shape_of(params, "b1.weight", where), shape_of(params, "b2.weight", where)
        kernel = shape_of(params, "bm.weight", where)[2:] if "bm.weight" in params else b2[2:]
        return (b1[0], b2[1], *kernel), False

    def consumer_caveats(self) -> list[str]:
        """ComfyUI applies our files exactly (alpha / r with r from a2, scale and multiplier folded into alpha)
        except the Tucker core; AUTOMATIC1111's GLoRA module multiplies the tensors in an older layout's order."""
        caveats = [
            "AUTOMATIC1111 applies an older GLoRA layout (b2·b1 + W·a2·a1), which raises on these tensors, so it "
            "leaves the module out (ComfyUI applies it exactly)"
        ]
        if self.bm is not None:
            caveats.append(
                "ComfyUI ignores GLoRA's Tucker core bm.weight (b1·b2 cannot take the kernel's shape: it logs an "
                "error and leaves the module out) and LyCORIS 4.1.3 cannot rebuild it; train without "
                "use_effective_conv2d for files the UIs apply"
            )
        return caveats

    # --- PEFT folders ----------------------------------------------------------------------------------
    def folder_refusal(self) -> str | None:
        return PEFT_GLORA

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
        """A = 0 and B ≈ ΔW as LoRA's extraction finds it: the tool's rank rule on ΔW (out, in·K) (without one
        rank :data:`EXTRACT_RANK`), or with ``how.tucker`` on a k×k conv a Tucker-2 core of that rank."""
        g = geometry
        flat = delta.reshape(g.out_dim, -1)
        if how.factorize is not None:
            up, down = how.factorize(flat)
        else:
            up, down = low_rank_factors(flat, EXTRACT_RANK, how.exact_svd)
        rank = up.shape[1]
        if rank * (flat.shape[0] + flat.shape[1] + 2 * g.in_dim) >= flat.numel():
            return None
        tucker = how.tucker and g.kind == "conv" and g.kernel_numel > 1
        if tucker:
            rank = min(rank, g.out_dim, g.in_dim)
            core, u_out, u_in = tucker2(delta, rank)
            values = {"b1": u_out, "b2": u_in.T, "bm": core}
        else:
            values = {"b1": up, "b2": down}
        values.update(a1=torch.zeros(g.in_dim, rank), a2=torch.zeros(rank, g.in_dim))  # A = 0: ΔW = B
        return cls.with_values(g, AdapterOptions(r=rank, alpha=rank, use_effective_conv2d=tucker), values)


def _per_group(weight: Tensor, groups: int) -> Tensor:
    """A weight shared by every group of a grouped convolution, stacked once per group along its outputs."""
    return weight if groups == 1 else weight.repeat(groups, *([1] * (weight.dim() - 1)))


def _exact(params: dict[str, Tensor], key: str, shape: tuple[int, ...], where: str) -> Tensor:
    """``params[key]`` viewed as ``shape``: its first two sizes must be ``shape``'s, the rest hold the same
    number of elements (a conv's trailing 1s, or a kernel); otherwise an error naming module, key and shapes."""
    if key not in params:
        raise FormatError(f"{where}: missing tensor {key!r} (expected shape {shape})")
    tensor = params[key]
    if tuple(tensor.shape[:2]) != shape[:2] or tensor.numel() != math.prod(shape):
        raise FormatError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.reshape(shape)
