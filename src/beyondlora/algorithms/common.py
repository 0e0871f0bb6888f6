"""What every algorithm shares besides the :class:`~.base.Adapter` contract: its options, the request
``extract`` makes, and the init, dtype and scale-folding rules."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AdapterOptions:
    """Hyper-parameters of one adapter on one layer (configs resolve patterns into these)."""

    r: int = 8
    alpha: float = 8.0
    use_rslora: bool = False
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False
    module_dropout: float = 0.0
    init_weights: bool | str = True
    use_dora: bool = False
    dora_on_output: bool = True
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    unbalanced_factorization: bool = False
    block_size: int = 4
    on_input: bool = False
    #: (IA)³ on the output side: also scale the layer's bias, ``(W x + b) ⊙ (1 + v)`` (PEFT's (IA)³); ``False``,
    #: the meaning of a LyCORIS (IA)³ file: ``W x ⊙ (1 + v) + b``
    scale_bias: bool = False
    #: OFT/BOFT: Q over all blocks is scaled down to Frobenius norm ``constraint · out`` when above it (0: never)
    constraint: float = 0.0
    #: OFT/BOFT: a trainable per-output magnitude multiplying the rotated weight
    rescaled: bool = False
    #: OFT: an exact block size (0: from ``r`` as LyCORIS' ``factorization``)
    oft_block_size: int = 0
    #: BOFT: how many butterfly stages (−1: all that the block count allows)
    boft_m: int = -1
    dropout: float = 0.0
    #: explicit LoKr shapes (a ``LoKrLayout``) for adapters read from files; ``None`` = LyCORIS' rules
    lokr_layout: Any = None


@dataclass(frozen=True)
class Extraction:
    """How ``beyondlora extract`` asks an algorithm to approximate a weight difference.

    Attributes:
        factorize: the tool's rank rule, a matrix (m, n) → balanced factors (up (m, r), down (r, n)); ``None``
            where the user gave none (each algorithm then has its default: LoRA a fixed rank, LoKr a full W2).
        tucker: give k×k convolutions a Tucker core where the algorithm has one.
        factor: LoKr's ``decompose_factor``.
        exact_svd: full rather than randomized SVDs.
    """

    factorize: Callable[[Tensor], tuple[Tensor, Tensor]] | None
    tucker: bool = False
    factor: int = -1
    exact_svd: bool = False


def adapter_dtype(base_weight: Tensor) -> torch.dtype:
    """Adapters keep float32 (or float64) even on a half-precision base, as PEFT does."""
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype


def fold_scale(factor: Tensor, scale: float | Tensor, multiplier: float) -> tuple[Tensor, float]:
    """``(factor, t · s)`` for a numeric scale s; ``(factor · s, t)`` for a trainable one (kohya's use_scalar),
    so that the scalar handed to a product's ``alpha`` is always a number.  ``factor`` is the adapter's
    smallest factor on the output side (LoRA ``up``, LoKr ``W1``, LoHa ``w1_a``)."""
    if isinstance(scale, Tensor):
        return factor * scale, multiplier
    return factor, multiplier * scale


def kaiming_(tensor: Tensor) -> Tensor:
    """The default init of ``nn.Linear`` weights (fan-in over every dimension but the first)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def check_init(options: AdapterOptions, algorithm: str) -> None:
    if options.init_weights not in (True, False, "lycoris"):
        raise ValueError(f"init_weights for {algorithm} must be True, False or 'lycoris', got {options.init_weights!r}")
