"""One module per algorithm; :data:`ALGORITHMS` maps each name to its adapter class."""

from .base import Adapter, AdapterOptions
from .full import Full, Norm
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import DyLoRA, LoRA

ALGORITHMS: dict[str, type[Adapter]] = {cls.algorithm: cls for cls in (LoRA, LoHa, LoKr, IA3, DyLoRA, Full, Norm)}

__all__ = ["ALGORITHMS", "Adapter", "AdapterOptions", "DyLoRA", "Full", "IA3", "LoHa", "LoKr", "LoRA", "Norm"]
