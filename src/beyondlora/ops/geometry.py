"""How a base layer applies a weight: the one place that knows each layer type's conventions.

Every adapter works on a *canonical* weight of shape ``(out, in, *kernel)`` (for a grouped conv,
``in`` is the per-group input width).  The geometry maps that canonical weight to and from the base
module's own storage (transformers ``Conv1D`` and ``nn.Embedding`` store the transpose) and applies a
weight exactly as the base module would (stride, padding, dilation, groups, ``padding_mode``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kind = Literal["linear", "conv", "embedding", "hf_conv1d", "layer_norm", "group_norm"]

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as (in, out)), detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def layer_kind(module: nn.Module) -> Kind | None:
    """The geometry kind of a module, or ``None`` when no adapter can host it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.GroupNorm):
        return "group_norm"
    return None


@dataclass(frozen=True)
class LayerGeometry:
    """Shape and application rule of one base layer.

    ``out_dim``/``in_dim``/``kernel`` describe the canonical weight ``(out_dim, in_dim, *kernel)``;
    norms have the canonical weight ``(out_dim,)`` with ``in_dim = 1``.
    """

    kind: Kind
    out_dim: int
    in_dim: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()
    norm_shape: tuple[int, ...] = ()
    eps: float = 1e-5
    has_bias: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> LayerGeometry:
        """Read the geometry of ``module``; raises ``TypeError`` naming the type when unsupported."""
        geometry = cls._read(module)
        return replace(geometry, has_bias=getattr(module, "bias", None) is not None)

    @classmethod
    def _read(cls, module: nn.Module) -> LayerGeometry:
        kind = layer_kind(module)
        if kind == "linear":
            return cls("linear", module.out_features, module.in_features)
        if kind == "hf_conv1d":
            in_dim, out_dim = module.weight.shape
            return cls("hf_conv1d", out_dim, in_dim)
        if kind == "embedding":
            return cls("embedding", module.embedding_dim, module.num_embeddings)
        if kind == "conv":
            if module.transposed:
                raise TypeError(f"transposed convolutions are not supported ({type(module).__name__})")
            return cls(
                "conv",
                module.out_channels,
                module.in_channels // module.groups,
                tuple(module.kernel_size),
                tuple(module.stride),
                module.padding if isinstance(module.padding, str) else tuple(module.padding),
                tuple(module.dilation),
                module.groups,
                module.padding_mode,
                tuple(module._reversed_padding_repeated_twice),
            )
        if kind == "layer_norm":
            if module.weight is None:
                raise TypeError("LayerNorm without elementwise_affine has no weight to adapt")
            return cls(
                "layer_norm", module.weight.numel(), 1, norm_shape=tuple(module.normalized_shape), eps=module.eps
            )
        if kind == "group_norm":
            if module.weight is None:
                raise TypeError("GroupNorm without affine has no weight to adapt")
            return cls("group_norm", module.num_channels, 1, groups=module.num_groups, eps=module.eps)
        raise TypeError(f"unsupported layer type {type(module).__module__}.{type(module).__name__}")

    # --- shapes -------------------------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def is_norm(self) -> bool:
        return self.kind in ("layer_norm", "group_norm")

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Canonical weight shape: ``(out, in, *kernel)``, or ``(out,)`` for norms."""
        if self.is_norm:
            return (self.out_dim,)
        return (self.out_dim, self.in_dim, *self.kernel)

    @property
    def channel_axis(self) -> int:
        """Axis of the output (and input) channels in activations."""
        return 1 if self.kind in ("conv", "group_norm") else -1

    def per_channel(self, vector: Tensor, ndim: int) -> Tensor:
        """Reshape a per-output-channel vector (C,) to broadcast against this layer's ``ndim``-d output."""
        if self.kind == "layer_norm":
            return vector.reshape(self.norm_shape)
        if self.channel_axis == -1:
            return vector
        return vector.reshape(-1, *([1] * (ndim - 2)))

    # --- canonical <-> storage -------------------------------------------------------------
    def canonical_weight(self, module: nn.Module) -> Tensor:
        """The base weight as a canonical ``(out, in, *kernel)`` view (no copy)."""
        if self.kind in ("hf_conv1d", "embedding"):
            return module.weight.t()
        return module.weight

    def add_to_module(
        self, module: nn.Module, delta_weight: Tensor, delta_bias: Tensor | None, sign: float = 1.0
    ) -> None:
        """In place: ``weight += sign * delta_weight`` (and the bias), in the module's storage layout."""
        with torch.no_grad():
            target = self.canonical_weight(module)
            target.add_(delta_weight.to(target.dtype), alpha=sign)
            if delta_bias is not None:
                if getattr(module, "bias", None) is None:
                    raise ValueError(f"cannot merge a bias delta into {type(module).__name__} that has no bias")
                module.bias.add_(delta_bias.to(module.bias.dtype), alpha=sign)

    # --- application --------------------------------------------------------------------------
    def pad_input(self, x: Tensor) -> Tensor:
        """Explicit padding for non-zero ``padding_mode``; convs then run with ``padding=0``."""
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, self.reversed_padding, mode=self.padding_mode)

    def conv(self, x: Tensor, weight: Tensor, groups: int = 1, padded: bool = False) -> Tensor:
        """Convolve ``x`` with ``weight`` using the base layer's stride, padding and dilation.

        ``padded`` says ``x`` already went through :meth:`pad_input`.
        """
        conv = _CONV_FUNCTIONS[len(self.kernel)]
        if self.padding_mode != "zeros":
            if not padded:
                x = self.pad_input(x)
            return conv(x, weight, None, self.stride, 0, self.dilation, groups)
        return conv(x, weight, None, self.stride, self.padding, self.dilation, groups)

    def pointwise(self, x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
        """Channel mixing ``y[:, o] = Σ_i weight[o, i] x[:, i]`` (a 1×…×1 convolution), weight (out, in); with
        ``groups`` each group of ``out / groups`` outputs reads its own group of ``in`` input channels."""
        conv = _CONV_FUNCTIONS[len(self.kernel)]
        return conv(x, weight.reshape(*weight.shape, *([1] * len(self.kernel))), groups=groups)

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Run the base layer's operation with a canonical ``weight`` (and ``bias``) on ``x``."""
        if self.kind in ("linear", "hf_conv1d"):
            return F.linear(x, weight, bias)
        if self.kind == "conv":
            out = self.conv(x, weight, self.groups)  # the bias in the op's own dtype, as conv's bias argument is
            return out if bias is None else out + bias.reshape(-1, *([1] * len(self.kernel))).to(out.dtype)
        if self.kind == "embedding":
            out = F.embedding(x, weight.t())
            return out if bias is None else out + bias
        if self.kind == "layer_norm":
            return F.layer_norm(
                x, self.norm_shape, weight.reshape(self.norm_shape), _shaped(bias, self.norm_shape), self.eps
            )
        return F.group_norm(x, self.groups, weight, bias, self.eps)

    def normalized(self, x: Tensor) -> Tensor:
        """Norm layers only: ``x`` normalized without the affine part."""
        if self.kind == "layer_norm":
            return F.layer_norm(x, self.norm_shape, None, None, self.eps)
        return F.group_norm(x, self.groups, None, None, self.eps)

    def tokens(self, x: Tensor) -> int:
        """Roughly how many positions the weight is applied at (for the cost model only)."""
        if self.kind == "conv":
            return x.shape[0] * math.prod(x.shape[2:]) // math.prod(self.stride)
        if self.kind == "embedding":
            return x.numel()
        return x.numel() // max(x.shape[-1], 1)


def _shaped(t: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
    return None if t is None else t.reshape(shape)


def weight_geometry(shape: tuple[int, ...], has_bias: bool = False, embedding: bool = False) -> LayerGeometry:
    """The geometry of a bare weight tensor as a state dict stores it (no module at hand).

    1-D ``(n,)``: a norm's scale (``layer_norm`` over ``(n,)``); 2-D ``(out, in)``: linear, or with
    ``embedding`` an ``nn.Embedding`` table ``(num, dim)`` whose canonical weight is its transpose
    ``(dim, num)``; 3/4/5-D ``(out, in, *kernel)``: a convolution with stride 1, padding 0, dilation 1 and
    one group (the only layout a state dict cannot tell apart from others; ΔW is the same for all of them).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return LayerGeometry("layer_norm", shape[0], 1, norm_shape=shape, has_bias=has_bias)
    if len(shape) == 2:
        if embedding:
            return LayerGeometry("embedding", shape[1], shape[0], has_bias=has_bias)
        return LayerGeometry("linear", shape[0], shape[1], has_bias=has_bias)
    if len(shape) in (3, 4, 5):
        n = len(shape) - 2
        return LayerGeometry(
            "conv",
            shape[0],
            shape[1],
            shape[2:],
            stride=(1,) * n,
            padding=(0,) * n,
            dilation=(1,) * n,
            reversed_padding=(0,) * (2 * n),
            has_bias=has_bias,
        )
    raise TypeError(f"no layer stores a weight of shape {shape}")


#: Module types whose call is exactly their geometry's ``apply(x, W, b)`` (exact types: a subclass may change
#: ``forward`` or ``_conv_forward``)
_PLAIN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")  # fmt: skip


def is_plain_call(module: nn.Module) -> bool:
    """Whether calling ``module`` is a plain linear or convolution, so that :meth:`LayerGeometry.apply` on its
    weight computes exactly what the call does and skips nothing: a stock type, its ``forward`` not replaced
    on the instance (accelerate's hooks do that), and no hooks of its own or global ones (a forward pre-hook
    may set the weight, as the old ``weight_norm`` does)."""
    kind = type(module)
    stock = kind in _PLAIN_TYPES or (kind.__name__ == "Conv1D" and kind.__module__ == "transformers.pytorch_utils")
    if not stock or "forward" in module.__dict__:
        return False
    own = (module._forward_pre_hooks, module._forward_hooks, module._backward_hooks, module._backward_pre_hooks)
    hooks = torch.nn.modules.module
    return not any(own) and not any(getattr(hooks, name, None) for name in _GLOBAL_HOOKS)
