"""Adapter configurations: PEFT's field names, validated on construction, JSON round trip.

Each algorithm's config lives with it in ``algorithms/<name>.py``; this module is where users find them.
``lora_alpha`` (and ``lora_dropout``, ``init_lora_weights``, ``init_ia3_weights``) are accepted as
aliases so PEFT-style code runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .algorithms.boft import BOFTConfig
from .algorithms.config_base import (
    CONFIG_NAME,
    AdapterConfig,
    RankConfig,
    config_class,
    config_classes,
    read_config_json,
)
from .algorithms.full import FullConfig, NormConfig
from .algorithms.glora import GLoRAConfig
from .algorithms.ia3 import IA3Config
from .algorithms.loha import LoHaConfig
from .algorithms.lokr import LoKrConfig
from .algorithms.lora import DyLoraConfig, LoraConfig
from .algorithms.oft import OFTConfig


@dataclass(kw_only=True)
class SingleFileConfig(AdapterConfig):
    """An adapter read from a single file: its modules (possibly of several algorithms) come from the file."""

    peft_type: ClassVar[str] = "SINGLE_FILE"
    algorithm: ClassVar[str] = "mixed"
    source: str = ""


__all__ = [
    "CONFIG_NAME",
    "AdapterConfig",
    "BOFTConfig",
    "DyLoraConfig",
    "FullConfig",
    "GLoRAConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "NormConfig",
    "OFTConfig",
    "RankConfig",
    "SingleFileConfig",
    "config_class",
    "config_classes",
    "read_config_json",
]
