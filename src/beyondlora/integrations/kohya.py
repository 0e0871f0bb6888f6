"""The kohya sd-scripts network module: ``train_network.py --network_module beyondlora.kohya``.

sd-scripts imports the module and calls :func:`create_network` (or :func:`create_network_from_weights`),
then the network's ``apply_to``, ``load_weights``, ``prepare_optimizer_params``, ``prepare_grad_etc``,
``on_epoch_start``, ``set_multiplier``, ``apply_max_norm_regularization``, ``save_weights``, ``merge_to``…
:class:`KohyaNetwork` implements them over beyondlora's adapters: every algorithm, canonical file names
(SD 1.x/2.x, SDXL with sd-scripts' own or diffusers' UNet), and files UIs apply exactly.

The adapters live inside the UNet / text-encoder layers (as :class:`~beyondlora.host.layers.AdapterLayer`) and
are registered in the network too, so the network's parameters are exactly the trainable ones.  sd-scripts
casts and freezes the base models after ``apply_to``; ``prepare_grad_etc`` / ``on_epoch_start`` restore the
adapters' own dtype and trainability (the same parameter objects the optimizer holds).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms import Adapter
from ..config import SingleFileConfig
from ..errors import FormatError
from ..formats.atomic import atomic_path
from ..formats.lycoris_codecs import describe, import_adapter
from ..formats.names import pipeline_part_names
from ..formats.single_file import (
    adapter_file_tensors,
    group_by_module,
    read_single_file,
    refuse_saved_modules,
    report_caveats,
    write_single_file,
)
from ..formats.tensors import check_finite, read_pickled_tensors
from ..host.inject import PlannedAdapter, plan_adapters
from ..host.layers import AdapterLayer
from ..ops.geometry import LayerGeometry, layer_kind
from .diffusers import merge_planned, plan_tensors
from .kohya_args import NetworkArgs, adapter_config, load_preset, select_modules
from .parts import controller, remember, unwrap_empty
from .scalar import ScalarMixin, add_scalar, bake_scalar

ADAPTER_NAME = "kohya"
#: bias deltas: scaled as a whole by max-norm regularization, not as a factor of ΔW


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> KohyaNetwork:
    """sd-scripts' entry point: a network of adapters for ``unet`` and ``text_encoder`` (one, a list, or None).

    ``kwargs`` are the ``--network_args`` (strings); see :class:`~.kohya_args.NetworkArgs`."""
    raw = {"dim": network_dim, "alpha": network_alpha, **kwargs}
    if raw.get("dropout") is None and neuron_dropout is not None:
        raw["dropout"] = neuron_dropout
    args = NetworkArgs.parse(raw)
    network = KohyaNetwork(text_encoder, unet, multiplier)
    network.build(args, load_preset(args.preset))
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | Path | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[KohyaNetwork, dict[str, torch.Tensor]]:
    """A network shaped by a saved file (any algorithm, ours or another trainer's): ``(network, weights)``."""
    NetworkArgs.parse(kwargs)  # an unknown or ill-typed argument is an error even here
    recorded: dict[str, Any] = {}
    if weights_sd is None:
        weights_sd, recorded = _read(file)
    network = KohyaNetwork(text_encoder, unet, multiplier)
    grouped = _grouped(weights_sd, file)
    plans = plan_tensors(network.parts, grouped, recorded, file or "weights")
    for role, plan in plans.items():
        network.add_planned(role, plan.planned)
    network.set_multiplier(multiplier)
    if for_inference:
        network.for_inference = True
        network.eval().requires_grad_(False)
    return network, weights_sd


def _read(file: str | Path | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if file is None:
        raise ValueError("give a weights file or weights_sd")
    if str(file).endswith(".safetensors"):
        grouped, recorded = read_single_file(file)
        refuse_saved_modules(grouped, file, "a kohya network")
        return {f"{m}.{n}": t for m, params in grouped.items() for n, t in params.items()}, recorded
    return read_pickled_tensors(file), {}


def _grouped(tensors: dict[str, torch.Tensor], source: Any) -> dict[str, dict[str, torch.Tensor]]:
    for key, tensor in tensors.items():
        check_finite(source or "weights", key, tensor)
    return group_by_module(tensors)


def _parts(text_encoder: Any, unet: nn.Module) -> dict[str, nn.Module]:
    encoders = [] if text_encoder is None else list(text_encoder) if isinstance(text_encoder, list) else [text_encoder]
    if len(encoders) > 2:
        raise ValueError(f"at most two text encoders are supported, got {len(encoders)}")
    parts = {"unet": unet}
    parts.update(zip(("text_encoder", "text_encoder_2"), encoders, strict=False))
    return parts


class KohyaNetwork(nn.Module):
    """The object sd-scripts trains: beyondlora adapters on a UNet and up to two text encoders."""

    def __init__(self, text_encoder: Any, unet: nn.Module, multiplier: float = 1.0) -> None:
        super().__init__()
        self.parts = _parts(text_encoder, unet)  # a plain dict: the base models are not our submodules
        self.naming = pipeline_part_names(self.parts)
        self.multiplier = float(multiplier)
        self.adapters = nn.ModuleDict()
        self.args = NetworkArgs()
        self.planned: dict[str, list[PlannedAdapter]] = defaultdict(list)
        self.roles: dict[str, str] = {}  # adapter key → part
        self.plans: dict[str, PlannedAdapter] = {}  # adapter key → its plan
        self.for_inference = False
        self.hosts: dict[str, AdapterLayer] = {}  # adapter key → its layer, once applied
        self.applied = False
        self.loraplus = (None, None, None)  # (both, unet, text encoder) ratios
        self._dtype: torch.dtype | None = None

    # --- building -----------------------------------------------------------------------------------
    def build(self, args: NetworkArgs, preset: dict[str, Any]) -> None:
        """Plan the adapters ``args`` and ``preset`` select on every part (nothing is attached yet)."""
        self.args = args
        self.set_loraplus_lr_ratio(
            args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio
        )
        for role, model in self.parts.items():
            groups: dict[tuple, list[str]] = defaultdict(list)
            module_args: dict[tuple, NetworkArgs] = {}
            for selection in select_modules(model, role != "unet", args, preset):
                module = model.get_submodule(selection.name)
                kind = layer_kind(module)
                conv = kind == "conv" and any(k != 1 for k in module.kernel_size)
                key = (repr(selection.args), conv, kind in ("layer_norm", "group_norm"))
                groups[key].append(selection.name)
                module_args[key] = selection.args
            planned = []
            for key, names in groups.items():
                config = adapter_config(module_args[key], names, conv=key[1], norm=key[2])
                group = plan_adapters(model, config)
                if module_args[key].use_scalar and not key[2]:
                    for plan in group:
                        add_scalar(plan.adapter)
                planned.extend(group)
            self.add_planned(role, planned)
        if not len(self.adapters):
            warnings.warn(
                f"the network adapts no layer: preset {args.preset!r} targets none of the model's modules "
                f"(or network_dim and conv_dim are 0)",
                stacklevel=3,
            )
        self.set_multiplier(self.multiplier)

    def add_planned(self, role: str, planned: list[PlannedAdapter]) -> None:
        for plan in planned:
            key = self.naming[role].key(plan.name)
            self.adapters[key] = plan.adapter
            self.roles[key] = role
            self.plans[key] = plan
            self.planned[role].append(plan)
        if self._dtype is None and len(self.adapters):
            self._dtype = next(self.adapters.parameters()).dtype

    # --- what sd-scripts calls ------------------------------------------------------------------------
    def apply_to(
        self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Attach the adapters to the UNet (``apply_unet``) and text encoders (``apply_text_encoder``)."""
        if self.applied:
            raise RuntimeError("the network is already applied")
        for role, part in self.parts.items():
            wanted = apply_unet if role == "unet" else apply_text_encoder
            planned = self.planned.get(role, [])
            if not wanted:
                for plan in planned:
                    key = self.naming[role].key(plan.name)
                    del self.adapters[key], self.plans[key], self.roles[key]
                continue
            if not planned:
                continue
            wrapper = controller(part)
            config = SingleFileConfig(source="kohya sd-scripts", inference_mode=self.for_inference)
            wrapper.add_adapter(ADAPTER_NAME, config, _planned=planned)
            wrapper.set_adapter([*wrapper.active_adapters, ADAPTER_NAME])
            remember(part, wrapper)
            for plan in planned:
                self.hosts[self.naming[role].key(plan.name)] = part.get_submodule(plan.name)
        self.applied = True
        self.train(self.training)

    def unapply(self) -> None:
        """Remove the adapters from the models again (the layers become plain)."""
        for part in self.parts.values():
            wrapper = controller(part)
            if ADAPTER_NAME in wrapper.peft_config:
                wrapper.delete_adapter(ADAPTER_NAME)
                remember(part, wrapper)
            unwrap_empty(part)
        self.hosts.clear()
        self.applied = False

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for adapter in self.adapters.values():
            adapter.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapters run inside the base model's (checkpointed) blocks."""

    def set_loraplus_lr_ratio(self, ratio: float | None, unet_ratio: float | None, text_ratio: float | None) -> None:
        self.loraplus = (ratio, unet_ratio, text_ratio)

    def prepare_optimizer_params(
        self, text_encoder_lr: Any = None, unet_lr: float | None = None, learning_rate: float | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Parameter groups (text encoders, UNet; LoRA+ puts the output-side factors, ``lora_up`` and
        ``*_a``, in a group of their own at ``lr × ratio``) and their descriptions."""
        self.requires_grad_(True)
        both, unet_ratio, text_ratio = self.loraplus
        text_lrs = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr] * 2
        groups, descriptions = [], []
        for role in sorted(self.parts, key=lambda r: r == "unet"):  # text encoders first, as sd-scripts does
            lr = unet_lr if role == "unet" else text_lrs[min(int(role == "text_encoder_2"), len(text_lrs) - 1)]
            lr = learning_rate if lr is None else lr
            ratio = (unet_ratio if role == "unet" else text_ratio) or both
            plain, plus = [], []
            for key, adapter in self.adapters.items():
                if self.roles[key] == role:
                    for name, param in adapter.named_parameters():
                        (plus if ratio and name in adapter.output_factors else plain).append(param)
            label = "unet" if role == "unet" else "textencoder" + ("2" if role == "text_encoder_2" else "")
            for params, suffix, scale in ((plain, "", 1.0), (plus, " plus", ratio)):
                if not params or lr == 0:
                    continue
                groups.append({"params": params} | ({} if lr is None else {"lr": lr * scale}))
                descriptions.append(label + suffix)
        return groups, descriptions

    def prepare_grad_etc(self, *args: Any) -> None:
        self._restore_dtype()
        self.requires_grad_(True)

    def on_epoch_start(self, *args: Any) -> None:
        self._restore_dtype()
        self.train()

    def on_step_start(self, *args: Any) -> None:
        pass

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def train(self, mode: bool = True) -> KohyaNetwork:
        """Train mode for the adapters and the layers hosting them (sd-scripts puts the base model in eval)."""
        super().train(mode)
        for layer in self.hosts.values():
            layer.training = mode
        return self

    def to(self, *args: Any, **kwargs: Any) -> KohyaNetwork:
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None and dtype.is_floating_point:
            self._dtype = dtype
        return super().to(*args, **kwargs)

    def _restore_dtype(self) -> None:
        """Cast adapters back to the network's dtype after a base-model cast changed them (in place: the
        optimizer keeps the same parameter objects)."""
        for adapter in self.adapters.values():
            if self._dtype is not None and next(adapter.parameters()).dtype != self._dtype:
                adapter.to(self._dtype)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: Any = None) -> tuple[int, float, float]:
        """Scale down every adapter whose ‖ΔW‖ exceeds ``max_norm_value``: ``(keys scaled, mean, max norm)``.

        ΔW is multilinear in an adapter's factors, so each of its n factors is scaled by ratio^(1/n)."""
        scaled, norms = 0, []
        for key, adapter in self.adapters.items():
            layer = self.hosts.get(key)
            base = layer.base_weight() if layer is not None else None
            if base is None:
                continue
            delta = adapter.delta_weight(base.to(adapter.param_dtype))
            norm = delta.norm().clamp(min=max_norm_value / 2)
            ratio = (norm.clamp(max=max_norm_value) / norm).item()
            norms.append(delta.norm().item() * ratio)
            if ratio == 1.0:
                continue
            scaled += 1
            bias = adapter.delta_bias(layer.base_bias())  # linear in ΔW's scale: scaled by the ratio itself
            factors = [p for p in adapter.parameters() if p is not adapter.dora_scale]
            count = sum(p is not bias for p in factors)
            for param in factors:
                param.mul_(ratio if param is bias else ratio ** (1.0 / count))
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # --- files ---------------------------------------------------------------------------------------
    def file_tensors(self, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The file's tensors and per-module metadata; modules the UIs would not apply exactly are named in a
        warning (:func:`~beyondlora.formats.single_file.report_caveats`)."""
        tensors, described, caveats = {}, {}, defaultdict(list)
        for key, adapter in self.adapters.items():
            baked = bake_scalar(adapter)
            try:
                exported = adapter_file_tensors(baked, dtype)
            except FormatError as error:
                raise FormatError(f"{key}: {error}") from None
            tensors.update({f"{key}.{name}": tensor.detach().cpu() for name, tensor in exported.items()})
            described[key] = describe(baked)
            for caveat in baked.consumer_caveats():
                caveats[caveat].append(key)
        report_caveats(caveats, strict=False)
        return tensors, described

    def save_weights(self, file: str | Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        """Write the adapters as one file (canonical names, UI-exact); ``metadata`` goes on top of ours."""
        tensors, described = self.file_tensors(dtype)
        if not str(file).endswith(".safetensors"):
            with atomic_path(file) as temporary:
                torch.save(tensors, temporary)
            return
        own = {
            "ss_network_module": "beyondlora.kohya",
            "ss_network_dim": str(self.args.dim),
            "ss_network_alpha": str(self.args.alpha),
            "ss_network_args": json.dumps({k: str(v) for k, v in self._given_args().items()}),
        }
        write_single_file(file, tensors, described, own | {k: str(v) for k, v in (metadata or {}).items()})

    def _given_args(self) -> dict[str, Any]:
        return {name: getattr(self.args, name) for name in sorted(self.args.given) if name not in ("dim", "alpha")}

    def load_weights(self, file: str | Path) -> dict[str, list[str]]:
        """Load a saved file into this network's adapters (same modules and shapes); returns LyCORIS'
        ``{"missing keys": …, "unexpected keys": …}``."""
        weights, recorded = _read(file)
        return self._load_tensors(weights, recorded, file)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Our own state dict, or a single file's tensors (what sd-scripts' image generation passes)."""
        keys = list(state_dict)
        if keys and not any(k.startswith("adapters.") for k in keys) and all("." in k for k in keys):
            info = self._load_tensors(dict(state_dict), {}, "state dict")
            return nn.modules.module._IncompatibleKeys(info.get("missing keys", []), info.get("unexpected keys", []))
        return super().load_state_dict(state_dict, strict, assign)

    @torch.no_grad()
    def _load_tensors(self, tensors: dict[str, torch.Tensor], recorded: dict[str, Any], source: Any) -> dict:
        grouped = _grouped(tensors, source)
        unexpected = sorted(k for k in grouped if k not in self.adapters)
        missing = sorted(k for k in self.adapters if k not in grouped)
        for key, params in grouped.items():
            if key in self.adapters:
                self._copy_into(key, self._import(key, params, recorded.get(key), source))
        info = {}
        if missing:
            info["missing keys"] = missing
        if unexpected:
            info["unexpected keys"] = unexpected
        return info

    def _import(self, key: str, params: dict[str, torch.Tensor], recorded: Any, source: Any) -> Adapter:
        plan = self.plans[key]
        layer = self.hosts.get(key)
        module = plan.module.base_layer if isinstance(plan.module, AdapterLayer) else plan.module
        geometry = LayerGeometry.of(module)
        weight = layer.base_weight() if layer is not None else geometry.canonical_weight(module)
        return import_adapter(params, geometry, weight.detach(), f"{source}: {key}", recorded)

    def _copy_into(self, key: str, loaded: Adapter) -> None:
        own = self.adapters[key]
        mine = {n: p for n, p in own.named_parameters() if n != "scalar"}
        theirs = dict(loaded.named_parameters())
        shapes = {n: tuple(p.shape) for n, p in mine.items()}
        if shapes != {n: tuple(p.shape) for n, p in theirs.items()}:
            found = {n: tuple(p.shape) for n, p in theirs.items()}
            raise FormatError(
                f"{key}: the file's {loaded.algorithm} tensors {found} do not fit this network's {shapes}"
            )
        for name, param in mine.items():
            param.copy_(theirs[name].to(param.dtype))
        if isinstance(own, ScalarMixin):
            own.scalar.fill_(1.0)
        scale = {f: getattr(loaded.options, f) for f in ("r", "alpha", "use_rslora")}
        own.options = dataclasses.replace(own.options, **scale)

    @torch.no_grad()
    def merge_to(
        self, text_encoder: Any, unet: nn.Module, weights_sd: dict, dtype: Any = None, device: Any = None
    ) -> None:
        """Add the adapters of ``weights_sd`` into the models' weights for good, at this network's multiplier."""
        parts = _parts(text_encoder, unet)
        plans = plan_tensors(parts, _grouped(weights_sd, "weights"), {}, "weights")
        for plan in plans.values():
            merge_planned(plan.planned, self.multiplier)

    def pre_calculation(self) -> None:
        """Merge the applied adapters into the weights (faster inference); :meth:`restore_weights` undoes it."""
        for layer in set(self.hosts.values()):
            layer.merge([ADAPTER_NAME])

    def backup_weights(self) -> None:
        """Nothing to back up: merging is recorded and reversible."""

    def restore_weights(self) -> None:
        for layer in set(self.hosts.values()):
            layer.unmerge()
