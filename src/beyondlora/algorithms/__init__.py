"""One module per algorithm, each holding everything about it (see :mod:`.base`).

Every module of this package is imported here, so an algorithm registers itself in :data:`ALGORITHMS`
by being a file in this folder; nothing else lists the algorithms.
"""

import importlib
import pkgutil

from .base import REGISTRY, Adapter
from .common import AdapterOptions

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .boft import BOFT  # noqa: E402  (the classes people import by name)
from .full import Full, Norm  # noqa: E402
from .glora import GLoRA  # noqa: E402
from .ia3 import IA3  # noqa: E402
from .loha import LoHa  # noqa: E402
from .lokr import LoKr  # noqa: E402
from .lora import DyLoRA, LoRA  # noqa: E402
from .oft import OFT  # noqa: E402

#: every algorithm's adapter class by name
ALGORITHMS: dict[str, type[Adapter]] = REGISTRY


def difference_class(kind: str) -> type[Adapter]:
    """The algorithm that stores a layer of ``kind``'s change as it is, ``W' = W + ΔW`` (and ``b + Δb``): exact
    for any change, and applied as such by every consumer."""
    return next(c for c in ALGORITHMS.values() if c.stores_difference and kind in c.supported_kinds)


__all__ = [
    "ALGORITHMS",
    "Adapter",
    "difference_class",
    "AdapterOptions",
    "BOFT",
    "DyLoRA",
    "Full",
    "GLoRA",
    "IA3",
    "LoHa",
    "LoKr",
    "LoRA",
    "Norm",
    "OFT",
]
