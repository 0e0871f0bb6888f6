"""Full: an unconstrained weight (and bias) difference, ``W' = W + diff``, ``b' = b + diff_b``; Norm: the
same for LayerNorm / GroupNorm, ``γ' = γ + w_norm``, ``β' = β + b_norm``.

Files: single-file ``diff``/``diff_b`` and ``w_norm``/``b_norm``.  PEFT has neither; their folders use the
same tensor names under ``peft_type`` FULL / NORM (PEFT refuses those types loudly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..ops.geometry import LayerGeometry
from .base import Adapter
from .codec import optional_bias, reshaped, shape_of
from .common import AdapterOptions, Extraction, check_init
from .config_base import AdapterConfig
from .row_codec import check_rows, present, row_ranges


@dataclass(kw_only=True)
class FullConfig(AdapterConfig):
    """Full fine-tuning of the targeted weights, stored as a difference (LyCORIS ``full``)."""

    peft_type: ClassVar[str] = "FULL"
    algorithm: ClassVar[str] = "full"
    learning_rate: ClassVar[float] = 1e-5


@dataclass(kw_only=True)
class NormConfig(AdapterConfig):
    """Tuning of LayerNorm / GroupNorm weights and biases; with no ``target_modules`` every norm layer."""

    peft_type: ClassVar[str] = "NORM"
    algorithm: ClassVar[str] = "norm"
    learning_rate: ClassVar[float] = 1e-4
    targets_by_kind: ClassVar[frozenset[str]] = frozenset({"layer_norm", "group_norm"})


class _Difference(Adapter):
    """A weight difference ``weight_key`` of the layer's weight shape (Full) or (out,) (Norm), and a bias
    difference ``bias_key`` (out,) when the base has a bias; zeros (identity), or N(0, 0.02²) with
    ``init_weights=False``.  Its own names are its file and folder names."""

    has_rank = False
    stores_difference = True
    weight_key: ClassVar[str]
    bias_key: ClassVar[str]

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        weight = nn.Parameter(torch.zeros(self.difference_shape(geometry)))
        bias = nn.Parameter(torch.zeros(geometry.out_dim)) if geometry.has_bias else None
        if options.init_weights is False:
            with torch.no_grad():
                for param in (weight, bias):
                    if param is not None:
                        nn.init.normal_(param, std=0.02)
        setattr(self, self.weight_key, weight)
        setattr(self, self.bias_key, bias)

    @staticmethod
    def difference_shape(geometry: LayerGeometry) -> tuple[int, ...]:
        return geometry.weight_shape

    def delta_weight(self, base_weight: Tensor, draw: object = None, factor: float = 1.0) -> Tensor:
        weight = getattr(self, self.weight_key)
        return weight if factor == 1.0 else weight * factor

    def delta_bias(self, base_bias: Tensor | None = None) -> Tensor | None:
        return getattr(self, self.bias_key)

    # --- files -----------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        t = self.multiplier
        tensors = {key: getattr(self, key) for key in (self.weight_key, self.bias_key)}
        return {k: v if t == 1.0 else v * t for k, v in tensors.items() if v is not None}

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        state = {cls.weight_key: reshaped(params, cls.weight_key, cls.difference_shape(geometry), where)}
        optional_bias(params, cls.bias_key, geometry.out_dim, geometry.has_bias, state, where)
        return state, {}

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        return shape_of(params, cls.weight_key, where), cls.bias_key in params

    @classmethod
    def split_file_rows(cls, params: dict[str, Tensor], sizes: Sequence[int], where: str) -> list[dict[str, Tensor]]:
        """The difference (and its bias difference) split into row blocks: exact."""
        check_rows(params[cls.weight_key].shape[0], sizes, cls.weight_key, where)
        return [{k: v[a:b] for k, v in params.items()} for a, b in row_ranges(sizes)]

    @classmethod
    def join_file_rows(
        cls, parts: Sequence[dict[str, Tensor] | None], sizes: Sequence[int], where: str
    ) -> dict[str, Tensor]:
        """The differences stacked, zeros on the rows of a missing part: exact."""
        found = present(parts, where)
        keys = sorted({k for p in found for k in p})
        like = {k: next(p[k] for p in found if k in p) for k in keys}
        return {
            k: torch.cat(
                [
                    p[k] if p is not None and k in p else like[k].new_zeros(n, *like[k].shape[1:])
                    for p, n in zip(parts, sizes, strict=True)
                ]
            )
            for k in keys
        }

    def folder_tensors(self) -> dict[str, Tensor]:
        return self.file_tensors()

    @classmethod
    def extracted(
        cls,
        geometry: LayerGeometry,
        delta: Tensor,
        delta_bias: Tensor | None,
        how: Extraction,
        base_weight: Tensor | None = None,
    ) -> Adapter | None:
        """The difference itself (exact); a layer with a bias gets its bias difference (zeros when none)."""
        values = {cls.weight_key: delta}
        if geometry.has_bias:
            values[cls.bias_key] = delta_bias if delta_bias is not None else torch.zeros(geometry.out_dim)
        return cls.with_values(geometry, AdapterOptions(), values)


class Full(_Difference):
    """Weight difference on Linear, Conv, Embedding and transformers Conv1D; ``diff_b`` when the base has a bias."""

    algorithm = "full"
    config_class = FullConfig
    weight_key, bias_key = "diff", "diff_b"
    file_keys = frozenset({weight_key, bias_key})
    folder_type = "FULL"
    folder_keys = file_keys
    algo_names = ("full",)


class Norm(_Difference):
    """Norm tuning on LayerNorm / GroupNorm: ``γ' = γ + w_norm``, ``β' = β + b_norm``."""

    algorithm = "norm"
    config_class = NormConfig
    supported_kinds = frozenset({"layer_norm", "group_norm"})
    weight_key, bias_key = "w_norm", "b_norm"
    file_keys = frozenset({weight_key, bias_key})
    folder_type = "NORM"
    folder_keys = file_keys

    @staticmethod
    def difference_shape(geometry: LayerGeometry) -> tuple[int, ...]:
        return (geometry.out_dim,)

    def bypass(self, x: Tensor, draw: object = None) -> Tensor:
        """``normalize(x) ⊙ w_norm`` (the layer adds the bias delta)."""
        return self.geometry.normalized(x) * self.geometry.per_channel(self.w_norm, x.dim())

    def bypass_flops(self, tokens: int) -> float:
        return float(tokens * self.geometry.out_dim * 4)
