"""A layer's geometry as a compact JSON record in our single files' metadata, and the stand-in layer it rebuilds.

Single-file keys flatten module paths (``lycoris_blocks_0_attn``) and the tensors fix only part of a layer's
shape, so reading a file into a PEFT folder needs the base model.  Our files record, per module, its path and
its layer (:func:`layer_record`): kind, canonical weight shape ``(out, in, *kernel)``, whether it has a bias,
and a convolution's stride, padding, dilation, groups and ``padding_mode`` where they differ from the
defaults.  :func:`standin_layer` rebuilds a layer of that type and geometry whose weights take no memory, so
the library's readers resolve and check the file against it exactly as against the base model's own layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FormatError
from ..ops.geometry import LayerGeometry

#: convolution settings recorded only where they differ from these defaults (per spatial dimension)
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1}


def layer_record(geometry: LayerGeometry) -> dict[str, Any]:
    """The JSON record of a layer: ``{"kind", "shape", "bias"}`` plus a convolution's non-default settings
    (``groups``, ``padding_mode``, ``stride``/``padding``/``dilation`` as lists) or a norm's ``eps``
    (a LayerNorm also its ``norm_shape``, a GroupNorm its ``groups``)."""
    g = geometry
    record: dict[str, Any] = {"kind": g.kind, "shape": list(g.weight_shape), "bias": g.has_bias}
    if g.kind == "conv":
        for name, default in _CONV_DEFAULTS.items():
            value = getattr(g, name)
            if value != (default,) * len(g.kernel):
                record[name] = value if isinstance(value, str) else list(value)
        if g.groups != 1:
            record["groups"] = g.groups
        if g.padding_mode != "zeros":
            record["padding_mode"] = g.padding_mode
    elif g.is_norm:
        record["eps"] = g.eps
        if g.kind == "layer_norm":
            record["norm_shape"] = list(g.norm_shape)
        else:
            record["groups"] = g.groups
    return record


def standin_layer(record: dict[str, Any], where: str) -> nn.Module:
    """A layer of the recorded type and geometry (:func:`layer_record`) whose weight and bias are zero-stride
    views (no memory); a malformed record raises naming ``where``."""
    try:
        layer = _build(record)
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: unreadable layer record {record!r} ({error})") from None
    if LayerGeometry.of(layer).weight_shape != tuple(record["shape"]):
        raise FormatError(f"{where}: layer record {record!r} does not describe a layer of that shape")
    zero = torch.zeros(())
    layer.weight = nn.Parameter(zero.expand(layer.weight.shape), requires_grad=False)
    if getattr(layer, "bias", None) is not None:
        # transformers' Conv1D always makes a bias: drop it where the recorded layer had none
        layer.bias = nn.Parameter(zero.expand(layer.bias.shape), requires_grad=False) if record["bias"] else None
    return layer


def _build(record: dict[str, Any]) -> nn.Module:
    kind, shape, bias = record["kind"], [int(s) for s in record["shape"]], bool(record["bias"])
    with torch.device("meta"):
        if kind == "linear":
            return nn.Linear(shape[1], shape[0], bias=bias)
        if kind == "embedding":
            return nn.Embedding(shape[1], shape[0])
        if kind == "hf_conv1d":
            from transformers.pytorch_utils import Conv1D

            return Conv1D(shape[0], shape[1])
        if kind == "conv":
            n = len(shape) - 2
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
            settings = {name: record.get(name, [default] * n) for name, default in _CONV_DEFAULTS.items()}
            settings = {k: v if isinstance(v, str) else tuple(v) for k, v in settings.items()}  # padding "same"
            groups = int(record.get("groups", 1))
            return conv(
                shape[1] * groups,
                shape[0],
                tuple(shape[2:]),
                groups=groups,
                bias=bias,
                padding_mode=record.get("padding_mode", "zeros"),
                **settings,
            )
        if kind == "layer_norm":
            return nn.LayerNorm(tuple(record["norm_shape"]), eps=float(record["eps"]), bias=bias)
        if kind == "group_norm":
            return nn.GroupNorm(int(record["groups"]), shape[0], eps=float(record["eps"]))
    raise ValueError(f"unknown layer kind {kind!r}")
