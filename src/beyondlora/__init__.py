"""beyondlora: parameter-efficient fine-tuning beyond plain LoRA.

LoRA/LoCon, LoHa, LoKr, (IA)³, DyLoRA, Diag-OFT, BOFT, GLoRA, Full and Norm tuning, with DoRA, on any PyTorch
model, behind PEFT's API.
"""

from ._version import __version__
from .config import (
    AdapterConfig,
    BOFTConfig,
    DyLoraConfig,
    FullConfig,
    GLoRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    NormConfig,
    OFTConfig,
)
from .demos.tiny_dit_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline
from .demos.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from .host.layers import AdapterLayer
from .integrations.diffusers import (
    list_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapters,
    unload_adapter,
)
from .integrations.diffusers import set_multiplier as set_adapter_multiplier
from .model import IA3Model, LoHaModel, LoKrModel, LoraModel, PeftModel, get_peft_model
from .tools.convert import convert_adapter

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "BOFTConfig",
    "DyLoraConfig",
    "FullConfig",
    "GLoRAConfig",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoraConfig",
    "LoraModel",
    "NormConfig",
    "OFTConfig",
    "PeftModel",
    "get_peft_model",
    "convert_adapter",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "set_adapter_multiplier",
    "set_adapters",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "unload_adapter",
    "__version__",
]
