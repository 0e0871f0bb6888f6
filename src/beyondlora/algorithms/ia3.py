"""(IA)³: learned per-channel scaling, ``W' = W ⊙ (1 + v)``.

``v`` (LyCORIS ``weight``) scales output channels (rows of W) or, with ``on_input`` (PEFT's
``feedforward_modules``), input channels (columns).  Two meanings exist for the bias of an output-scaled
layer, and ``scale_bias`` picks one:

- ``scale_bias=True`` (PEFT's (IA)³, :class:`IA3Config`'s default): ``y = (W x + b) ⊙ (1 + v)``, so
  ``ΔW = W ⊙ v`` and ``Δb = b ⊙ v``;
- ``scale_bias=False`` (what a LyCORIS (IA)³ file means, and LyCORIS' merge): ``y = W x ⊙ (1 + v) + b``.

Input-side scaling, ``W (x ⊙ (1 + v)) + b``, leaves the bias alone in both, and without a bias they agree.
The bypass is done by the layer, which folds ``1 + v`` into the base layer's input or output instead of a
second matmul (:meth:`IA3.channel_scaling` says whether the bias is scaled with it).

Files: single-file ``weight`` ((1, C, 1, …) on convs) and ``on_input``, with ``scale_bias`` in our metadata
(a file without it means ``False``); PEFT folders ``ia3_l`` holding ``1 + v`` ((C, 1) on the output side,
(1, C) on the input side), which mean ``scale_bias=True``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import FormatError
from ..ops.geometry import LayerGeometry
from .base import Adapter
from .codec import peft_refusal, reshaped, shape_of
from .common import AdapterOptions, check_init
from .config_base import AdapterConfig, exact_pattern, name_matches


@dataclass(kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)³.  ``feedforward_modules`` (a subset of the targets, same forms) scale their input channels.

    ``scale_bias``: output-scaled layers compute ``(W x + b) ⊙ (1 + v)``, as PEFT's (IA)³ (the default here);
    ``False``: ``W x ⊙ (1 + v) + b``, what LyCORIS' (IA)³ files mean (the default of the front ends that write
    them: ``beyondlora train``, kohya's network).
    """

    peft_type: ClassVar[str] = "IA3"
    algorithm: ClassVar[str] = "ia3"
    learning_rate: ClassVar[float] = 5e-3
    lycoris_defaults: ClassVar[dict[str, Any]] = {"scale_bias": False}
    feedforward_modules: list[str] | str | None = None
    scale_bias: bool = True
    init_ia3_weights: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.init_ia3_weights is not None:
            self.init_weights, self.init_ia3_weights = self.init_ia3_weights, None
        super().__post_init__()

    def options_for(self, module_name: str) -> AdapterOptions:
        on_input = self.feedforward_modules is not None and name_matches(module_name, self.feedforward_modules)
        return dataclasses.replace(super().options_for(module_name), on_input=on_input, scale_bias=self.scale_bias)


class IA3(Adapter):
    """(IA)³ on Linear, Conv (any N-d) and transformers Conv1D."""

    algorithm = "ia3"
    config_class = IA3Config
    file_keys = frozenset({"weight", "on_input"})
    folder_type = "IA3"
    folder_keys = frozenset({"ia3_l"})
    algo_names = ("ia3",)
    supported_kinds = frozenset({"linear", "conv", "hf_conv1d"})
    scales_base = True
    has_rank = False
    recorded_options = ("scale_bias",)

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        self.on_input = options.on_input
        self.scale_bias = options.scale_bias
        self.weight = nn.Parameter(torch.zeros(_channels(geometry, options.on_input)))
        if options.init_weights is False:
            with torch.no_grad():
                nn.init.normal_(self.weight, std=0.1)

    def delta_weight(self, base_weight: Tensor, draw: object = None, factor: float = 1.0) -> Tensor:
        """``W ⊙ (factor · v)`` along the output axis, or with ``on_input`` the input axis: v has one entry per
        input channel of the layer (C_in = in · groups), and output channel o of group g reads entries
        g·in … (g + 1)·in − 1 (W is (out, in, *k) with in the per-group width)."""
        v = self.weight * factor
        ones = [1] * (base_weight.dim() - 2)
        if not self.on_input:
            return base_weight * v.reshape(-1, 1, *ones)
        groups = self.geometry.groups
        if groups == 1:
            return base_weight * v.reshape(1, -1, *ones)
        out, per_group = base_weight.shape[:2]
        rows = v.reshape(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)
        return base_weight * rows.reshape(out, per_group, *ones)

    @property
    def scales_layer_bias(self) -> bool:
        """Whether this adapter changes its layer's bias: ``scale_bias`` on the output side of a biased layer."""
        return self.scale_bias and not self.on_input and self.geometry.has_bias

    def delta_bias(self, base_bias: Tensor | None = None) -> Tensor | None:
        """``Δb = b ⊙ v`` (out,) where :attr:`scales_layer_bias`, else ``None``."""
        if not self.scales_layer_bias:
            return None
        if base_bias is None:
            raise ValueError("(IA)³ with scale_bias=True scales its layer's bias: its bias delta needs that bias")
        return base_bias.to(self.weight.dtype) * self.weight

    def channel_scaling(self) -> tuple[Tensor, bool, bool]:
        return self.weight, self.on_input, self.scale_bias and not self.on_input

    def bypass_flops(self, tokens: int) -> float:
        return float(tokens * self.weight.numel())

    def rebuild_flops(self) -> float:
        """``W ⊙ v`` and ``W + ΔW``: two memory-bound passes over the weight, for one over the output."""
        return 2.0 * super().rebuild_flops()

    def consumer_caveats(self) -> list[str]:
        if self.on_input and self.geometry.groups != 1:
            return [
                "input-side (IA)³ on a grouped convolution holds one entry per input channel of the layer, which "
                "LyCORIS multiplies into the per-group weight (it fails), ComfyUI skips (IA)³ and AUTOMATIC1111 "
                "applies another formula; only beyondlora applies these modules exactly"
            ]
        if self.scales_layer_bias:
            return [
                "(IA)³ with scale_bias=True (PEFT's semantics) scales the layer's bias too, (W x + b) ⊙ (1 + v), "
                "which a LyCORIS (IA)³ file cannot say: our metadata records it, but LyCORIS leaves the bias "
                "unchanged, ComfyUI skips (IA)³ and AUTOMATIC1111 applies another formula; only beyondlora applies "
                "these modules exactly (save a PEFT folder, or train with IA3Config(scale_bias=False))"
            ]
        return [
            "ComfyUI has no (IA)³ adapter (it skips these keys) and AUTOMATIC1111 applies another formula than "
            "W ⊙ (1 + v) (and raises on k×k convolutions); only beyondlora and LyCORIS apply (IA)³ files exactly"
        ]

    def metadata_options(self) -> dict[str, Any]:
        return {"scale_bias": self.scale_bias}

    def summary_notes(self) -> list[str]:
        return ["on input"] if self.on_input else ["scales bias"] if self.scales_layer_bias else []

    # --- files -----------------------------------------------------------------------------------------
    def _channel_shape(self) -> tuple[int, ...]:
        return (1, -1, *([1] * len(self.geometry.kernel))) if self.geometry.is_conv else (-1,)

    def file_tensors(self) -> dict[str, Tensor]:
        weight = (self.weight * self.multiplier).reshape(self._channel_shape())
        return {"weight": weight, "on_input": torch.tensor(int(self.on_input))}

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        on_input = _on_input(params, where)
        weight = reshaped(params, "weight", (_channels(geometry, on_input),), where)
        return {"weight": weight}, dict(on_input=on_input)

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        """Only the scaled axis is known; the other gets size 1."""
        weight_shape = shape_of(params, "weight", where)
        on_input = _on_input(params, where)
        ones, size = (1,) * max(len(weight_shape) - 2, 0), math.prod(weight_shape)
        return ((1, size) if on_input else (size, 1)) + ones, False

    # --- PEFT folders ----------------------------------------------------------------------------------
    def folder_refusal(self) -> str | None:
        if (reason := peft_refusal(self)) is not None:
            return reason
        if self.geometry.kind == "conv" and len(self.geometry.kernel) == 1:
            return "PEFT's (IA)³ has no form for torch's Conv1d"
        if not self.scale_bias and not self.on_input and self.geometry.has_bias and bool(self.weight.detach().any()):
            return (
                "PEFT's (IA)³ also scales the bias of output-scaled layers, (W x + b) ⊙ (1 + v); this adapter "
                "leaves it unchanged (scale_bias=False, LyCORIS' semantics)"
            )
        return None

    def folder_tensors(self) -> dict[str, Tensor]:
        scale = 1 + self.multiplier * self.weight.detach()
        if self.geometry.kind == "conv":
            return {"ia3_l": scale.reshape(self._channel_shape())}
        return {"ia3_l": scale.reshape(1, -1) if self.on_input else scale.reshape(-1, 1)}

    @classmethod
    def folder_config(cls, adapters: dict[str, Adapter], fields: dict[str, Any]) -> dict[str, Any]:
        inputs = [n for n, a in adapters.items() if a.on_input]
        hf_conv1d = any(a.geometry.kind == "hf_conv1d" for a in adapters.values())
        return {**fields, "feedforward_modules": exact_pattern(inputs) if inputs else [], "fan_in_fan_out": hf_conv1d}

    @classmethod
    def from_folder(
        cls, params: dict[str, Tensor], options: AdapterOptions, geometry: LayerGeometry | None
    ) -> dict[str, Tensor]:
        """``ia3_l`` is ``1 + v``; the folder's config gives ``scale_bias`` (PEFT's meaning unless it says so)."""
        if "ia3_l" not in params:
            raise FormatError("missing tensor 'ia3_l'")
        return {"weight": params["ia3_l"].flatten() - 1, "on_input": torch.tensor(int(options.on_input))}


def _channels(geometry: LayerGeometry, on_input: bool) -> int:
    """How many entries v has: the layer's input channels (all groups) or its output channels."""
    return geometry.in_dim * geometry.groups if on_input else geometry.out_dim


def _on_input(params: dict[str, Tensor], where: str) -> bool:
    """A module's ``on_input`` flag (absent: output side); anything but one number raises naming its shape."""
    flag = params.get("on_input")
    if flag is None:
        return False
    if flag.numel() != 1:
        raise FormatError(f"{where}: on_input has shape {tuple(flag.shape)}, expected () (0 or 1)")
    return bool(flag.item())
