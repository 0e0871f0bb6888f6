"""AdapterLayer: one base module hosting any number of named adapters.

``forward(x) = base(x) + Σ_active multiplier · ΔW x`` (DoRA and (IA)³ as their own formulas), computed by
one of two exact paths, chosen per call by a cost model (``forward_mode`` overrides it):

- **bypass**: the base layer runs unchanged and each adapter adds its low-rank output; ΔW is never built
  (DoRA builds it only for its norm).  (IA)³ is folded into the base call's input or output.
- **combined**: the base operation runs once with ``W + Σ ΔW`` (and ``b + Σ Δb``); this is exactly what
  merging computes, and it wins when the layer is small next to the number of tokens, and on GPUs, whose
  full-size products run many times faster than the bypass's rank-sized ones (:mod:`.cost_model`).  In
  training a single LoRA, LoKr or LoHa on a frozen float32/64 linear-like layer takes it as the **merged
  step**: the factors' gradients through their rank-sized route, never the full-size gradient of W + ΔW.

What the bypass saves for backward (``backward_memory``): LoRA keeps the layer input and its rank-r hidden.
LoKr and LoHa keep the layer input, their factors and, with ``"auto"``, one rank-sized input-side result
where recomputing it measurably costs time: on convolutions (LoKr: the grouped ``x ⊛ w2_b``, c·r channels;
LoHa: the rank-r² hidden; recomputing costs 5–19 points of step time) and for LoKr on linear-like layers
(``X w2_bᵀ``, c·r values per position; +4 ± 2 points).  LoHa on linear-like layers recomputes its rank-r²
hidden in any mode (one GEMM, measured no slower), so it keeps no more than a rank-r LoRA there by default.
``"lean"`` recomputes everything, so that no adapter keeps more than a rank-r LoRA on the same layer, and
the cost model never trains through the combined path's full-size ``W + ΔW`` (autograd would keep it).
Khatri-Rao products, ``W1 t`` and other intermediates are never kept.  Input-side (IA)³ never keeps
``x ⊙ (1 + v)`` next to ``x``.

Merging adds the same deltas to the base weights in place; unmerging subtracts them again.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..algorithms.base import Adapter
from ..algorithms.common import fold_scale
from ..ops.bypass_common import autocasting, cast
from ..ops.geometry import LayerGeometry, is_plain_call
from ..ops.recompute import rebuilt_if_saved, recomputed_if_saved
from .cost_model import rank_work_price

ForwardMode = Literal["auto", "bypass", "combined"]
BackwardMemory = Literal["auto", "lean"]


@dataclass
class _Merged:
    """What merging one adapter added: its multiplier, and the delta itself when it cannot be recomputed."""

    multiplier: float
    delta_weight: Tensor | None = None
    delta_bias: Tensor | None = None


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` (kept as a submodule of that name) and hosts adapters in ``adapters``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.geometry = LayerGeometry.of(base_layer)
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.forward_mode: ForwardMode = "auto"
        self.backward_memory: BackwardMemory = "auto"
        self.merged: dict[str, _Merged] = {}
        # the path taken, per everything it depends on (shapes and settings only; see _path): working it
        # out costs about as much as a small layer's forward
        self._path_choices: dict[tuple, str] = {}

    def __getattr__(self, name: str) -> Any:
        """Attributes of the base layer (``weight``, ``in_features``, …) read through, so code that inspects
        the module it expects (diffusers reads ``linear_1.in_features``) keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # --- adapter management -------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Host ``adapter`` under ``name`` (inactive until :meth:`set_active` names it)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter.train(self.training)
        self._path_choices.clear()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
        del self.adapters[name]
        self._path_choices.clear()
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # --- deltas -----------------------------------------------------------------------------------
    def base_weight(self) -> Tensor:
        """The canonical base weight with every merged adapter taken out again."""
        weight = self.geometry.canonical_weight(self.base_layer)
        if not self.merged:
            return weight
        weight = weight.detach().clone()
        for name in reversed(list(self.merged)):
            weight -= self._merged_delta(name)[0].to(weight.dtype)
        return weight

    def base_bias(self) -> Tensor | None:
        """The base bias with every merged adapter taken out again (``None`` without a bias)."""
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or not self.merged:
            return bias
        bias = bias.detach().clone()
        for name in reversed(list(self.merged)):
            delta = self._merged_delta(name)[1]
            if delta is not None:
                bias -= delta.to(bias.dtype)
        return bias

    def _merged_delta(self, name: str) -> tuple[Tensor, Tensor | None]:
        """The delta merging ``name`` added: stored when it depended on W or b, else recomputed (W, b unused)."""
        record = self.merged[name]
        if record.delta_weight is not None:
            return record.delta_weight, record.delta_bias
        unused = self.geometry.canonical_weight(self.base_layer)
        return self.effective_delta(name, unused, None, record.multiplier, getattr(self.base_layer, "bias", None))

    def effective_delta(
        self,
        name: str,
        base_weight: Tensor,
        draw: Any = None,
        multiplier: float | None = None,
        base_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """What adapter ``name`` adds to the weight and bias (:meth:`~.Adapter.effective_delta`); ``base_bias``
        is the base bias, for an adapter that scales it (callers with a stand-in layer pass the real one)."""
        adapter: Adapter = self.adapters[name]
        bias = None if base_bias is None else cast(base_bias, adapter.param_dtype)
        return adapter.effective_delta(cast(base_weight, adapter.param_dtype), draw, multiplier, bias)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged]
        if self.training:
            names = [n for n in names if not _module_dropped(self.adapters[n])]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        draws = {n: self.adapters[n].draw() if self.training else None for n in names}
        path = self._path(x, names)
        if path == "bypass":
            return self._bypass_forward(x, names, draws, args, kwargs)
        if path == "merged":
            return self._merged_forward(x, names[0], draws[names[0]])
        return self._combined_forward(x, names, draws)

    def _path(self, x: Tensor, names: list[str]) -> Literal["bypass", "merged", "combined"]:
        """Which path this call takes: the bypass, the combined path's merged step (:meth:`_trains_merged`), or
        the combined path through autograd.  Remembered per everything the choice reads, since working it out
        costs about as much as a small layer's forward."""
        adapters = [self.adapters[n] for n in names]
        if any(a.needs_bypass() for a in adapters):
            if not self._bypass_possible(adapters):
                raise ValueError(
                    f"adapters {names} on this {type(self.base_layer).__name__}: input dropout trains on the "
                    "bypass only, which cannot compute this set exactly ((IA)³ on both sides or next to a merged "
                    "adapter, DoRA with dora_on_output=False); set dropout=0 or train these adapters apart"
                )
            return "bypass"
        grad = torch.is_grad_enabled()
        if self.forward_mode == "combined":
            return "merged" if grad and self._trains_merged(adapters, x) else "combined"
        tokens, device = self.geometry.tokens(x), x.device.type
        base = self.base_layer
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        # what _trains_merged reads that can change between calls: W's and b's requires_grad, the dtypes
        key = (tuple(names), bool(self.merged), self.forward_mode, self.backward_memory, tokens, grad, device, x.dtype,
               autocasting(device), _grad_state(weight), _grad_state(bias), adapters[0].param_dtype)  # fmt: skip
        path = self._path_choices.get(key)
        if path is None:
            merged_step = grad and self._trains_merged(adapters, x)
            if self._bypass_possible(adapters) and (
                self.forward_mode == "bypass" or self._bypass_cheaper(adapters, device, tokens, grad, merged_step)
            ):
                path = "bypass"
            else:
                path = "merged" if merged_step else "combined"
            if len(self._path_choices) >= 64:  # many input sizes (bucketed resolutions): keep it small
                self._path_choices.clear()
            self._path_choices[key] = path
        return path

    def _bypass_cheaper(self, adapters: list[Adapter], device: str, tokens: int, grad: bool, merged_step: bool) -> bool:
        """The cost model: the bypass's multiply-adds, priced for the device, against rebuilding ΔW and
        running W + ΔW (in training also W + ΔW's full-size gradient, unless the merged step avoids it)."""
        bypass = sum(rank_work_price(device, a.rank if a.has_rank else 1) * a.bypass_flops(tokens) for a in adapters)
        combined = sum(a.rebuild_flops() for a in adapters)
        if grad and merged_step:
            # bypass: B forward + 2·B backward; merged: ΔW built twice + the rank route's 2·B
            return bypass <= 2 * combined
        if grad:
            if self.backward_memory == "lean":
                return True  # autograd would keep W + ΔW for backward: more than a rank-r LoRA keeps
            # the combined weight needs its own gradient: one more full-size matmul in backward
            combined += tokens * self.geometry.out_dim * self.geometry.in_dim * self.geometry.kernel_numel
        return bypass <= combined

    def _bypass_possible(self, adapters: list[Adapter]) -> bool:
        """Whether the bypass path is exact for this set of adapters.

        Adapters that read the base layer's own output ``W x`` (:attr:`~.Adapter.reads_base_output`) need
        nothing merged into W and a base call on the layer's own input (no input-side channel scaling).
        """
        scales_input, _ = _scalings_by_side(adapters)
        reads_base = any(a.reads_base_output for a in adapters)
        if (reads_base or scales_input) and self.merged:
            return False
        if scales_input and reads_base:
            return False
        return all(a.has_exact_bypass() for a in adapters)

    def _bypass_forward(self, x: Tensor, names: list[str], draws: dict[str, Any], args: tuple, kwargs: dict) -> Tensor:
        g = self.geometry
        adapters = {n: self.adapters[n] for n in names}
        scales_input, scales_output = _scalings_by_side(list(adapters.values()))
        plain_out = None  # W·x without the bias, computed once if needed
        shifted = self._input_shifts(x, adapters, draws, bool(scales_input or scales_output))
        if shifted:  # W (x + Σ t·s·A x) + b in the base call itself; each adapter's B x is added below
            base_in = x + cast(
                _weighted_sum([(adapters[n].multiplier, a_x) for n, (a_x, _) in shifted.items()]), x.dtype
            )
            # a convolution keeps its input for backward; "lean" rebuilds x + A x from x there (two rank-r
            # products, about 6 % of a 320-channel 3×3 conv's step) instead of keeping an input-sized tensor
            lean = self.backward_memory == "lean"
            with (
                rebuilt_if_saved(base_in, self._shifted_input(x.detach(), adapters, shifted, draws))
                if lean
                else nullcontext()
            ):
                result = base_out = self.base_layer(base_in, *args, **kwargs)
        elif scales_input:  # then no output-side scaling (see _bypass_possible)
            factor = cast(1 + g.per_channel(_scale_sum(scales_input), x.dim()), x.dtype)
            base_in = x * factor
            with recomputed_if_saved(base_in, x, factor):
                result = base_out = self.base_layer(base_in, *args, **kwargs)
        elif (
            any(not a.channel_scaling()[2] for a in scales_output)
            and not (args or kwargs)
            and self._bias_free_call_exact(x)
        ):
            # the base op without its bias: then a bias that a scaling leaves unchanged needs no correction
            # pass, forward or backward
            plain_out = g.apply(x, g.canonical_weight(self.base_layer))
            result = self._scale_output(plain_out, scales_output, has_bias=False)
        else:
            base_out = self.base_layer(x, *args, **kwargs)
            result = self._scale_output(base_out, scales_output)
        if len(adapters) == 1 and not (shifted or scales_input or scales_output):
            transformed = self._transformed_output(base_out, *next(iter(adapters.items())), draws)
            if transformed is not None:
                return transformed
        for name, adapter in adapters.items():
            t = adapter.multiplier
            if adapter.channel_scaling() is not None:
                continue  # folded into the base call's input or output above
            if name in shifted:
                b_x = shifted[name][1]
                result = result + cast(b_x if t == 1 else t * b_x, result.dtype)
                continue
            if not adapter.decomposed:
                added = adapter.add_bypass(result, x, draws[name], t, lean=self.backward_memory == "lean")
                if added is not None:
                    result = added
                    bias = adapter.delta_bias()
                    if bias is not None:
                        result = result + (t * g.per_channel(bias, x.dim())).to(result.dtype)
                    continue
            x_in = x if g.kind == "embedding" else cast(x, adapter.param_dtype)
            if not adapter.decomposed and g.kind != "conv":
                fused = self._add_low_rank(result, adapter, x_in, draws[name])
                if fused is not None:
                    result = fused
                    continue
            if adapter.bypass_uses_base:
                plain_out = self._without_bias(base_out) if plain_out is None else plain_out
                delta_out = adapter.base_bypass(x_in, self._base_operation(x_in, plain_out), draws[name])
            else:
                delta_out = adapter.bypass(x_in, draws[name])
            if adapter.decomposed:
                plain_out = self._without_bias(base_out) if plain_out is None else plain_out
                weight = self.base_weight().to(adapter.param_dtype)
                delta_out = adapter.decomposed_output(plain_out, delta_out, weight, draws[name])
            result = result + cast(delta_out if t == 1 else t * delta_out, result.dtype)
            bias = adapter.delta_bias()
            if bias is not None:
                result = result + (t * g.per_channel(bias, x.dim())).to(result.dtype)
        return result

    def _transformed_output(
        self, base_out: Tensor, name: str, adapter: Adapter, draws: dict[str, Any]
    ) -> Tensor | None:
        """``base_out + t · (W' x + b − base_out)`` by the adapter's :meth:`~.Adapter.transform_output`, or ``None``."""
        if adapter.decomposed or adapter.delta_bias() is not None:
            return None
        transformed = adapter.transform_output(base_out, getattr(self.base_layer, "bias", None), draws[name])
        if transformed is None:
            return None
        transformed = cast(transformed, base_out.dtype)
        t = adapter.multiplier
        return transformed if t == 1 else base_out + t * (transformed - base_out)

    def _input_shifts(
        self, x: Tensor, adapters: dict[str, Adapter], draws: dict[str, Any], scaled: bool
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``name → (s·A x, s·B x)`` for the adapters whose ``A x`` the base call takes on its input
        (:meth:`~.Adapter.input_shift`); empty when a channel scaling or an adapter that reads ``W x`` of the
        plain input shares the call (they then take :meth:`~.Adapter.base_bypass`)."""
        shifting = [n for n, a in adapters.items() if a.shifts_input and not a.decomposed]
        if not shifting or scaled or any(a.reads_base_output for n, a in adapters.items() if n not in shifting):
            return {}
        shifts = {}
        for name in shifting:
            adapter = adapters[name]
            pair = adapter.input_shift(cast(x, adapter.param_dtype), draws[name])
            if pair is None:
                return {}
            shifts[name] = pair
        return shifts

    @staticmethod
    def _shifted_input(
        x: Tensor, adapters: dict[str, Adapter], shifted: dict[str, Any], draws: dict[str, Any]
    ) -> Callable[[], Tensor]:
        """``x + Σ t · s · A x`` recomputed without autograd (what the base call took, for its backward)."""

        @torch.no_grad()
        def rebuild() -> Tensor:
            shifts = [
                (adapters[n].multiplier, adapters[n].input_shift(cast(x, adapters[n].param_dtype), draws[n], False)[0])
                for n in shifted
            ]
            return x + cast(_weighted_sum(shifts), x.dtype)

        return rebuild

    def _base_operation(self, x: Tensor, plain_out: Tensor) -> Callable[[Tensor], Tensor]:
        """``z ↦ W z`` (the base operation without its bias, in z's dtype; an embedding's indices give the
        weight's dtype) for :meth:`~.Adapter.base_bypass`; for ``z`` = ``x`` it returns ``plain_out`` = W x,
        already computed."""

        def apply_base(z: Tensor) -> Tensor:
            weight = self.geometry.canonical_weight(self.base_layer)
            dtype = z.dtype if z.is_floating_point() else weight.dtype
            if z is x:
                return cast(plain_out, dtype)
            return self.geometry.apply(z, cast(weight, dtype))

        return apply_base

    def _scale_output(self, out: Tensor, scalings: list[Adapter], has_bias: bool = True) -> Tensor:
        """Output-side channel scaling ((IA)³) in one pass, ``v = Σ t · v_i`` over all of them, ``u`` the same sum
        over those that leave the bias unchanged (:meth:`~.Adapter.channel_scaling`) and ``w = v − u``:
        ``(W x + b) ⊙ (1 + v) − u ⊙ b`` from the base layer's output, ``W x ⊙ (1 + v) + b ⊙ (1 + w)`` from
        ``W x`` (``has_bias=False``)."""
        if not scalings:
            return out
        g = self.geometry
        v = cast(g.per_channel(_scale_sum(scalings), out.dim()), out.dtype)
        bias = getattr(self.base_layer, "bias", None)
        kept = [a for a in scalings if not a.channel_scaling()[2]]
        if bias is None or (has_bias and not kept):
            return out * (1 + v)
        bias = cast(g.per_channel(bias, out.dim()), out.dtype)
        if has_bias:
            return torch.addcmul(-(cast(g.per_channel(_scale_sum(kept), out.dim()), out.dtype) * bias), out, 1 + v)
        scaled = [a for a in scalings if a.channel_scaling()[2]]
        if scaled:
            bias = bias * (1 + cast(g.per_channel(_scale_sum(scaled), out.dim()), out.dtype))
        return torch.addcmul(bias, out, 1 + v)

    @staticmethod
    def _add_low_rank(result: Tensor, adapter: Adapter, x: Tensor, draw: Any) -> Tensor | None:
        """``result + t · s · hidden @ upᵀ`` as one fused ``addmm`` (no separate scale or add pass).

        ``None`` when the adapter has no such factorization here or the dtypes differ (then the caller
        adds the adapter's output itself).
        """
        parts = adapter.bypass_parts(x, draw)
        if parts is None:
            return None
        hidden, up, scale = parts
        if hidden.dtype != result.dtype and not autocasting(result.device.type):
            return None
        up, alpha = fold_scale(up, scale, adapter.multiplier)
        flat = torch.addmm(result.reshape(-1, up.shape[0]), hidden.reshape(-1, up.shape[1]), up.t(), alpha=alpha)
        return flat.reshape(result.shape)

    def _bias_free_call_exact(self, x: Tensor) -> bool:
        """Whether ``W x`` then ``+ b`` gives what the base layer gives: a plain linear or convolution with a
        bias, in float32 or float64 (16 bits would round ``W x`` once more than the base layer's own op)."""
        base = self.base_layer
        wide = x.dtype in (torch.float32, torch.float64) and not autocasting(x.device.type)
        return wide and getattr(base, "bias", None) is not None and is_plain_call(base)

    def _without_bias(self, out: Tensor) -> Tensor:
        bias = getattr(self.base_layer, "bias", None)
        return out if bias is None else out - self.geometry.per_channel(bias, out.dim())

    def _trains_merged(self, adapters: list[Adapter], x: Tensor) -> bool:
        """Whether the combined path trains through ``W + ΔW`` by the adapter's :meth:`~.Adapter.merged_step`
        (factor gradients through its rank-sized route) rather than autograd's full-size gradient of
        ``W + ΔW``: one adapter that has one, everything in one dtype, and no autocast (``W + ΔW`` rounded to
        a 16-bit autocast dtype would lose most of a small ΔW)."""
        if len(adapters) != 1 or autocasting(x.device.type):
            return False
        adapter = adapters[0]
        if not adapter.has_merged_step() or adapter.delta_bias() is not None:
            return False
        weight, bias = self.geometry.canonical_weight(self.base_layer), getattr(self.base_layer, "bias", None)
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)  # W and b get no gradient
        return frozen and weight.dtype == x.dtype == adapter.param_dtype

    def _merged_forward(self, x: Tensor, name: str, draw: Any) -> Tensor:
        """The combined path in training by the adapter's :meth:`~.Adapter.merged_step` (see :meth:`_trains_merged`)."""
        adapter, base = self.adapters[name], self.base_layer
        weight = self.geometry.canonical_weight(base)
        return adapter.merged_step(x, weight, getattr(base, "bias", None), draw, adapter.multiplier)

    def _combined_forward(self, x: Tensor, names: list[str], draws: dict[str, Any]) -> Tensor:
        g = self.geometry
        base_weight, base_bias = self.base_weight(), self.base_bias()
        dtype = self.adapters[names[0]].param_dtype
        weight = cast(g.canonical_weight(self.base_layer), dtype)
        bias = cast(getattr(self.base_layer, "bias", None), dtype)
        for name in names:
            adapter = self.adapters[name]
            weight = adapter.add_effective_delta(weight, cast(base_weight, adapter.param_dtype), draws[name])
            delta_bias = adapter.effective_delta_bias(base_bias=cast(base_bias, adapter.param_dtype))
            if delta_bias is not None:
                bias = delta_bias if bias is None else bias + delta_bias
        x_in = x if g.kind == "embedding" else cast(x, dtype)
        out = g.apply(x_in, weight, bias)
        if not x.is_floating_point() or autocasting(x.device.type):
            return out  # under autocast the op's own dtype is what the base layer would give too
        return cast(out, x.dtype)

    # --- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, keep_record: bool = True) -> None:
        """Add the named (default: active) adapters to the base weights in place.

        ``keep_record=False`` skips remembering what was added, so :meth:`unmerge` is impossible
        (used by ``merge_and_unload``, which drops the adapters anyway).
        """
        for name in names if names is not None else list(self.active_adapters):
            if name in self.merged:
                continue
            adapter: Adapter = self.adapters[name]
            delta, delta_bias = self.effective_delta(name, self.base_weight(), base_bias=self.base_bias())
            self.geometry.add_to_module(self.base_layer, delta, delta_bias)
            if keep_record:
                keep = adapter.depends_on_base
                self.merged[name] = _Merged(adapter.multiplier, delta if keep else None, delta_bias if keep else None)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter, last merged first, restoring the base weights."""
        while self.merged:
            name = list(self.merged)[-1]
            delta, delta_bias = self._merged_delta(name)
            self.geometry.add_to_module(self.base_layer, delta, delta_bias, sign=-1.0)
            del self.merged[name]

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={list(self.merged)}"


def _scale_sum(scalings: list[Adapter]) -> Tensor:
    """``Σ t · v_i`` over channel-scaling adapters (:func:`_weighted_sum`)."""
    return _weighted_sum([(a.multiplier, a.channel_scaling()[0]) for a in scalings])


def _weighted_sum(terms: list[tuple[float, Tensor]]) -> Tensor:
    """``Σ t · v`` with no op for a weight of 1 and none to start the sum (each op is a pass over the tensor)."""
    total = None
    for t, value in terms:
        term = value if t == 1 else t * value
        total = term if total is None else total + term
    return total


def _scalings_by_side(adapters: list[Adapter]) -> tuple[list[Adapter], list[Adapter]]:
    """The channel-scaling adapters on the base layer's input channels, and those on its output channels."""
    sides = [(a, a.channel_scaling()) for a in adapters]
    return [a for a, s in sides if s is not None and s[1]], [a for a, s in sides if s is not None and not s[1]]


def _grad_state(t: Tensor | None) -> tuple[bool, torch.dtype] | None:
    return None if t is None else (t.requires_grad, t.dtype)


def _module_dropped(adapter: Adapter) -> bool:
    p = adapter.options.module_dropout
    return p > 0 and bool(torch.rand(()) < p)
