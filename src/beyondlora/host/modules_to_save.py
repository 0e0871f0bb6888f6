"""Fully trained copies of whole modules (e.g. a classifier head), one per adapter."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and a trainable copy per adapter in ``modules_to_save``.

    The forward uses the active adapter's copy, or the original when disabled or when the active
    adapter has no copy.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def set_active(self, names: list[str]) -> None:
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)
