"""DoRA weight decomposition: the merged weight's direction with a learned magnitude.

``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` with the norm taken per output channel (``on_output``; the
magnitude ``m`` then has shape (out, 1, …)) or per input channel (shape (1, in, 1, …)).  A multiplier
``t`` interpolates between the base and the decomposed weight: ``W + t · (W' − W)``, which is what the
Stable Diffusion UIs compute.  The magnitude starts at ``‖W‖`` (ε included), so DoRA starts as the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FormatError
from ..ops.geometry import LayerGeometry


def weight_norm(weight: Tensor, on_output: bool) -> Tensor:
    """Per-channel L2 norm of ``weight`` (out, in, *k), shaped to broadcast against it, plus ε."""
    if on_output:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *([1] * (weight.dim() - 2)))
    return norm + torch.finfo(weight.dtype).eps


def dora_delta(base_weight: Tensor, delta: Tensor, magnitude: Tensor, on_output: bool, multiplier: float) -> Tensor:
    """``t · (m ⊙ (W + ΔW) / ‖W + ΔW‖ − W)``: what DoRA adds to the base weight."""
    merged = base_weight + delta
    return multiplier * (merged * (magnitude / weight_norm(merged, on_output)) - base_weight)


def dora_output(
    plain_out: Tensor, delta_out: Tensor, merged_weight: Tensor, magnitude: Tensor, geometry: LayerGeometry
) -> Tensor:
    """DoRA's bypass on the output axis: ``W' x − W x = (ρ − 1) ⊙ W x + ρ ⊙ ΔW x`` with ``ρ = m / ‖W + ΔW‖``
    per output channel; ``plain_out`` is ``W x`` (no bias), ``delta_out`` ``ΔW x``, ``merged_weight`` W + ΔW."""
    ratio = geometry.per_channel((magnitude / weight_norm(merged_weight, True)).flatten(), plain_out.dim())
    return (ratio - 1) * plain_out + ratio * delta_out


def dora_caveats(on_output: bool) -> list[str]:
    """What the UIs apply for a DoRA module where it is not ours (measured with their loader code)."""
    if not on_output:
        return []
    return [
        "ComfyUI divides output-axis DoRA by ‖W‖ instead of ‖W + ΔW‖ and AUTOMATIC1111 knows only input-axis "
        "DoRA (it broadcasts the (out, 1) magnitude into another ΔW); train with dora_on_output=False for files "
        "they apply exactly"
    ]


def file_magnitude(magnitude: Tensor, multiplier: float) -> Tensor:
    """The ``dora_scale`` a single file carries; at multiplier ≠ 1 no file is exact, so it refuses."""
    if multiplier != 1.0:
        raise FormatError(
            "a DoRA adapter with multiplier ≠ 1 cannot be written exactly: consumers apply the strength to "
            "the decomposed weight, which no parameter change reproduces; set the multiplier to 1 first"
        )
    return magnitude


def read_magnitude(scale: Tensor, geometry: LayerGeometry, where: str) -> tuple[Tensor, bool]:
    """A file's ``dora_scale`` shaped as our magnitude, and whether it is per output channel (else input);
    one of another size raises naming both shapes (``where`` names the module)."""
    g = geometry
    if scale.numel() not in (g.out_dim, g.in_dim):
        expected = f"{g.out_dim} (output axis) or {g.in_dim} (input axis) values"
        raise FormatError(f"{where}: dora_scale has shape {tuple(scale.shape)}, expected {expected}")
    on_output = scale.shape[0] == g.out_dim and scale.numel() == g.out_dim
    if on_output:
        return scale.reshape(g.out_dim, *([1] * len(g.weight_shape[1:]))), True
    return scale.reshape(1, g.in_dim, *((1,) * len(g.kernel))), False
