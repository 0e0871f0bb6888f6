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

__all__ = [
    "ALGORITHMS",
    "Adapter",
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
