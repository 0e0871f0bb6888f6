"""The multiply-add floor of a training step with adapters: the frozen base's step plus the adapter's
unavoidable rank-sized work.

Multiply-adds are counted, not modelled: ``torch.utils.flop_counter.FlopCounterMode`` records every matrix
product and convolution (forward and backward) of one training step.  The frozen base's step does its
layers' forward and the input's gradient, 2F.  With adapters, each of beyondlora's exact paths (the bypass,
and the combined weight W + ΔW with its merged step where the algorithm has one) is counted, forced on every
layer in turn; the adapter's unavoidable work is the least extra count over the base.  Elementwise work
((IA)³'s scales, OFT's rescale) is not a multiply-add of a product and counts nothing.

The floor's time is the measured frozen step scaled by (base count + least extra) / base count: the
adapter's unavoidable work done at the base's own rate of multiply-adds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from beyondlora.host.inject import adapter_layers


def step_multiply_adds(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of matrix products and convolutions in one training step, forward and backward, of
    ``model`` on ``x`` (which is given a gradient, as the benchmark's steps do)."""
    x = x.detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(x).float().square().mean().backward()
    return counter.get_total_flops() / 2


def floor_ratio(adapted: nn.Module, base: nn.Module, x: torch.Tensor) -> float:
    """(base count + least extra count) / base count, for a beyondlora model ``adapted`` of the frozen
    ``base`` (:func:`step_multiply_adds`; the extra is the least over the forced paths "bypass" and
    "combined")."""
    base_count = step_multiply_adds(base, x)
    extras = []
    for mode in ("bypass", "combined"):
        model = copy.deepcopy(adapted).train()
        for _, layer in adapter_layers(model):
            layer.forward_mode = mode
        try:
            extras.append(step_multiply_adds(model, x) - base_count)
        except ValueError:  # a path that cannot compute this adapter exactly (e.g. dropout off the bypass)
            continue
    return (base_count + min(extras)) / base_count
