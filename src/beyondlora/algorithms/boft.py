"""BOFT (LyCORIS' ``ButterflyOFTModule``): a product of butterfly-structured block rotations of W's rows.

``(b, n) = power2factorization(out, r)`` (LyCORIS: the largest even block size b ≤ r whose block count
n = out / b is a power of two); ``m = popcount(n − 1) + 1`` stages (or ``boft_m`` in 1..that); blocks
B (m, n, b, b) with the Cayley rotations and constraint of :mod:`.oft` taken over all stages jointly.
Stage i (k = 2ⁱ·b/2) permutes the rows by ``order = arange(out).reshape(-1, 2, k).transpose(1, 2).flatten()``,
applies ``blockdiag(R_i1, …, R_in)`` (not transposed, unlike OFT) and permutes back:

    W' = rescale ⊙ (Sₘ ⋯ S₁ W),     ΔW = W' − W

Multiplier t: the layer adds ``t · (W' − W)`` (ComfyUI's and AUTOMATIC1111's strength).  LyCORIS blends each
stage, ``t·R + (1 − t)·I``, which differs from this for BOFT at t ≠ 1; files hold strength 1 only.
Stage i mixes rows within aligned runs of 2ⁱ·b, so the output-rotating bypass is exact on a grouped conv
only when each group holds whole runs of the last stage.  Single files as OFT's, with 4-D ``oft_blocks``;
PEFT folders are refused (:data:`.oft.PEFT_ROTATES_INPUT`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..errors import FormatError
from ..ops.geometry import LayerGeometry
from ..ops.rotations import rotate_butterfly
from .common import AdapterOptions
from .oft import BLOCK_PASS, RotationAdapter, RotationConfig

#: a butterfly stage after the first views the activations with 2-wide strided axes, whose layout copies cost
#: about four contiguous block passes (measured on a CPU: ≈ 90 ms a stage, forward and backward, at 4096 positions
#: × 768 channels, against ≈ 20 ms for the first)
STRIDED_PASS = 4 * BLOCK_PASS


@dataclass(kw_only=True)
class BOFTConfig(RotationConfig):
    """BOFT.  ``boft_m``: how many butterfly stages (−1: all that the block count allows)."""

    peft_type: ClassVar[str] = "BOFT"
    algorithm: ClassVar[str] = "boft"
    boft_m: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.boft_m == 0 or self.boft_m < -1:
            raise ValueError(f"boft_m must be -1 or positive, got {self.boft_m}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), boft_m=self.boft_m)


def butterfly_factors(out: int, r: int) -> tuple[int, int]:
    """``(b, n)``: the largest even b ≤ r dividing ``out`` into n = out / b blocks, n a power of two
    (LyCORIS' ``power2factorization``); a clear error when there is none."""
    found = None
    for b in range(2, min(r, out) + 1, 2):
        n, rest = divmod(out, b)
        if rest == 0 and n & (n - 1) == 0:
            found = (b, n)
    if found is None:
        raise ValueError(
            f"BOFT cannot split {out} outputs with r={r}: it needs an even block size b ≤ r with {out} / b a power "
            "of two"
        )
    return found


def max_stages(blocks: int) -> int:
    """LyCORIS' stage count for n blocks: popcount(n − 1) + 1."""
    return bin(blocks - 1).count("1") + 1


class BOFT(RotationAdapter):
    """Butterfly OFT on Linear, Conv (any N-d), Embedding and transformers Conv1D."""

    algorithm = "boft"
    config_class = BOFTConfig
    folder_type = "BOFT"
    algo_names = ("boft",)
    blocks_ndim = 4

    def block_shape(self) -> tuple[int, ...]:
        b, n = butterfly_factors(self.geometry.out_dim, self.options.r)
        stages = max_stages(n)
        if self.options.boft_m != -1:
            if not 1 <= self.options.boft_m <= stages:
                raise ValueError(f"boft_m must be in 1..{stages} for {n} blocks of {b}, got {self.options.boft_m}")
            stages = self.options.boft_m
        return (stages, n, b, b)

    def rotate(self, y: Tensor, rotations: Tensor) -> Tensor:
        return rotate_butterfly(y, rotations)

    def stage_passes(self) -> list[float]:
        return [BLOCK_PASS] + [STRIDED_PASS] * (self.oft_blocks.shape[0] - 1)

    def span(self) -> int:
        return 2 ** (self.oft_blocks.shape[0] - 1) * self.block_size

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The block size is r (it is even and out / b a power of two, or the file is refused), the stage
        count ``boft_m``."""
        blocks = cls.read_blocks(params, geometry, where)
        m, n, b, _ = blocks.shape
        if b % 2 or n & (n - 1) or not 1 <= m <= max_stages(n):
            raise FormatError(
                f"{where}: oft_blocks has shape {tuple(blocks.shape)}: BOFT needs an even block size, a power of "
                f"two of blocks and 1..{max_stages(n)} stages"
            )
        state, options = cls.read_rest(params, geometry, where, blocks)
        return state, {**options, "boft_m": m}

    def summary_notes(self) -> list[str]:
        m, n, b, _ = self.oft_blocks.shape
        return [f"{m} stages of {n} blocks × {b}", *super().summary_notes()]
