"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .settings import TrainConfig


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """The learning rate's factor at each optimizer step: linear warm-up over ``--warmup-steps`` from
    1/(w + 1), then constant, cosine (½(1 + cos πp)) or linear (1 − p) in the progress p after warm-up."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if config.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``--optimizer`` over ``params``: AdamW, bitsandbytes' 8-bit AdamW or Prodigy."""
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
