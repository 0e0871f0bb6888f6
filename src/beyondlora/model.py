"""The model wrapper: PEFT's ``PeftModel`` API over :class:`~beyondlora.host.layers.AdapterLayer`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, SingleFileConfig
from .formats.folder import plan_from_folder, save_folder
from .formats.single_file import DEFAULT_PREFIX, is_single_file, plan_from_single_file, save_single_file
from .host.inject import (
    PlannedAdapter,
    adapter_layers,
    attach,
    attach_modules_to_save,
    plan_adapters,
    replace_submodule,
    save_wrappers,
)
from .host.targeting import find_modules_to_save


class PeftModel(nn.Module):
    """A model with adapters injected into its layers.

    Attribute access falls through to the wrapped model, and ``forward`` calls it, so the wrapper can
    stand in for the model (a text encoder, a UNet, a classifier).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: AdapterConfig,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        for param in model.parameters():  # only once injection succeeded: a failure changes nothing
            param.requires_grad_(False)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    # --- adapters --------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: AdapterConfig,
        low_cpu_mem_usage: bool = False,
        _planned: list[PlannedAdapter] | None = None,
        _save_states: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Inject a new (inactive) adapter; on any error the model is left exactly as it was."""
        if not isinstance(peft_config, AdapterConfig):
            raise TypeError(f"peft_config must be an AdapterConfig, got {type(peft_config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        planned = _planned
        if planned is None:
            planned = plan_adapters(self.base_model, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        find_modules_to_save(self.base_model, peft_config.modules_to_save)  # validates before anything changes
        attach(self.base_model, planned, adapter_name, peft_config.forward_mode, peft_config.backward_memory)
        attach_modules_to_save(self.base_model, peft_config.modules_to_save, adapter_name)
        for name, state in (_save_states or {}).items():
            self.base_model.get_submodule(name).modules_to_save[adapter_name].load_state_dict(state)
        self.peft_config[adapter_name] = peft_config
        self._refresh()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter (or several, summed) active; only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; have {list(self.peft_config)}")
        self.active_adapters = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {list(self.peft_config)}")
        for _, layer in adapter_layers(self.base_model):
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for _, wrapper in save_wrappers(self.base_model):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name] or list(self.peft_config)[:1]
        self._refresh()

    def _refresh(self) -> None:
        """Push the active set to every layer and set ``requires_grad`` accordingly."""
        for _, layer in adapter_layers(self.base_model):
            layer.set_active(self.active_adapters)
            for name, adapter in layer.adapters.items():
                trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
                for param in adapter.parameters():
                    param.requires_grad_(trainable)
        for _, wrapper in save_wrappers(self.base_model):
            wrapper.set_active(self.active_adapters)
            for name, module in wrapper.modules_to_save.items():
                trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
                for param in module.parameters():
                    param.requires_grad_(trainable)

    def set_multiplier(self, multiplier: float, adapter_name: str | None = None) -> None:
        """Set the strength of an adapter (default: every active one); takes effect on the next forward."""
        names = self.active_adapters if adapter_name is None else [adapter_name]
        for _, layer in adapter_layers(self.base_model):
            for name in names:
                if name in layer.adapters:
                    if name in layer.merged:
                        raise ValueError(f"adapter {name!r} is merged; unmerge before changing its multiplier")
                    layer.adapters[name].multiplier = float(multiplier)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes its base output (merged adapters are unmerged first)."""
        hosts = [m for _, m in adapter_layers(self.base_model)] + [m for _, m in save_wrappers(self.base_model)]
        for host in hosts:
            host.disabled = True
        try:
            yield
        finally:
            for host in hosts:
                host.disabled = False

    # --- merging -------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters (default: active) into the base weights; reversible with :meth:`unmerge_adapter`."""
        for _, layer in adapter_layers(self.base_model):
            layer.merge([n for n in adapter_names if n in layer.adapters] if adapter_names else None)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self.base_model):
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the adapters (default: active) and return the model with plain torch modules again."""
        layers = adapter_layers(self.base_model)
        if progressbar:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="merging")
        for name, layer in layers:
            layer.merge([n for n in adapter_names if n in layer.adapters] if adapter_names else None, keep_record=False)
            replace_submodule(self.base_model, name, layer.base_layer)
        for name, wrapper in save_wrappers(self.base_model):
            active = wrapper.active_adapter
            kept = wrapper.modules_to_save[active] if active else wrapper.original_module
            replace_submodule(self.base_model, name, kept)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original model."""
        for name, layer in adapter_layers(self.base_model):
            layer.unmerge()
            replace_submodule(self.base_model, name, layer.base_layer)
        for name, wrapper in save_wrappers(self.base_model):
            replace_submodule(self.base_model, name, wrapper.original_module)
        return self.base_model

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # --- parameter counts ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (adapters included in ``all``)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # --- files -----------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        dtype: torch.dtype | None = None,
        strict: bool = False,
        as_difference: bool = False,
    ) -> None:
        """Save adapters: a path ending in ``.safetensors`` writes one single file (LyCORIS / kohya layout,
        what Stable Diffusion UIs load; one adapter, ``prefix`` before every module key, tensors cast to
        ``dtype``; modules the UIs would not apply exactly are named in a warning, or with ``strict`` refused,
        or with ``as_difference`` written as their exact change ``diff``, which every consumer applies);
        any other path is a folder with one PEFT-layout subfolder per adapter."""
        names = selected_adapters or (
            self.active_adapters if is_single_file(save_directory) else list(self.peft_config)
        )
        if is_single_file(save_directory):
            if len(names) != 1:
                raise ValueError(f"a single file holds one adapter; choose one of {names} with selected_adapters")
            save_single_file(
                self.base_model, save_directory, names[0], prefix, dtype, strict=strict, as_difference=as_difference
            )
            return
        for name in names:
            save_folder(self.base_model, save_directory, self.peft_config[name], name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved at ``model_id`` (a PEFT-layout folder or a single
        ``.safetensors`` file from us, LyCORIS or kohya); a bad file leaves ``model`` untouched."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.base_model = model
        wrapper.peft_config = {}
        wrapper.active_adapters = []
        wrapper.load_adapter(model_id, adapter_name, is_trainable, low_cpu_mem_usage)
        for param in model.parameters():
            param.requires_grad_(False)
        wrapper.set_adapter(adapter_name)
        return wrapper if is_trainable else wrapper.eval()

    def load_adapter(
        self, model_id: str | Path, adapter_name: str, is_trainable: bool = False, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add the adapter saved at ``model_id`` (folder or single file) under ``adapter_name``.

        ``low_cpu_mem_usage`` is accepted for PEFT compatibility; loading builds every adapter straight
        from the file's tensors, so there is no random initialization to skip.
        """
        if is_single_file(model_id):
            planned, save_states = plan_from_single_file(self.base_model, model_id)
            config = SingleFileConfig(
                source=str(model_id), inference_mode=not is_trainable, modules_to_save=list(save_states) or None
            )
            self.add_adapter(adapter_name, config, _planned=planned, _save_states=save_states)
        else:
            config, planned, save_states = plan_from_folder(self.base_model, model_id)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config, _planned=planned, _save_states=save_states)
        if not is_trainable:
            self.eval()


def get_peft_model(
    model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> PeftModel:
    """Freeze ``model`` and inject the adapter described by ``peft_config``."""
    return PeftModel(model, peft_config, adapter_name, low_cpu_mem_usage)


def _typed_model(config_type: type[AdapterConfig]) -> type[PeftModel]:
    class TypedModel(PeftModel):
        def __init__(
            self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default", **kwargs: Any
        ) -> None:
            if not isinstance(config, config_type):
                raise TypeError(f"{type(self).__name__} needs a {config_type.__name__}, got {type(config).__name__}")
            super().__init__(model, config, adapter_name, **kwargs)

    return TypedModel


class LoraModel(_typed_model(LoraConfig)):
    """``LoraModel(model, LoraConfig(...), "default")``: PEFT's tuner-model spelling."""


class LoHaModel(_typed_model(LoHaConfig)):
    """``LoHaModel(model, LoHaConfig(...), "default")``."""


class LoKrModel(_typed_model(LoKrConfig)):
    """``LoKrModel(model, LoKrConfig(...), "default")``."""


class IA3Model(_typed_model(IA3Config)):
    """``IA3Model(model, IA3Config(...), "default")``."""
