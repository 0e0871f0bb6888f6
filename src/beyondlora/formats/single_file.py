"""The single-file format (LyCORIS / kohya layout) that Stable Diffusion UIs load.

A flat safetensors dict: module ``a.b.c`` of the model is stored as ``<prefix>_a_b_c.<tensor>``.  Our
files also carry, in the safetensors metadata, the library version, the per-module hyper-parameters, module
path and layer geometry (``beyondlora_modules``, one JSON string; see :mod:`.layer_records`) and kohya's
training keys (``ss_network_*``).  Readers of the format (kohya, ComfyUI, LyCORIS) ignore metadata keys
they do not know.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .._version import __version__
from ..algorithms import ALGORITHMS, Adapter, difference_class
from ..algorithms.common import Extraction
from ..errors import FormatError
from ..host.inject import PlannedAdapter, adapter_layers
from ..host.layers import AdapterLayer
from ..host.targeting import iter_candidate_modules
from ..ops.geometry import LayerGeometry
from .lycoris_codecs import cast_for_file, describe, export_tensors, import_adapter
from .saved_modules import (
    SAVED_KEY,
    SAVED_METADATA,
    saved_module_names,
    saved_tensors,
    single_file_key,
    single_file_saved_states,
)
from .tensors import check_finite, read_tensors, write_tensors

DEFAULT_PREFIX = "lycoris"
MODULES_METADATA = "beyondlora_modules"


def is_single_file(path: str | Path) -> bool:
    return str(path).endswith(".safetensors")


def module_key(prefix: str, module_name: str) -> str:
    """``lycoris`` + ``blocks.0.attn`` → ``lycoris_blocks_0_attn``."""
    return f"{prefix}_{module_name.replace('.', '_')}" if prefix else module_name.replace(".", "_")


def single_file_tensors(
    model: nn.Module,
    adapter_name: str,
    prefix: str = DEFAULT_PREFIX,
    dtype: torch.dtype | None = None,
    key_for: Callable[[str], str] | None = None,
    strict: bool = False,
    as_difference: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Every tensor of adapter ``adapter_name`` under its single-file key, and per-module metadata (with the
    module's path and layer: :func:`~.lycoris_codecs.describe`).

    ``key_for`` maps a module name to its full module key (prefix included) instead of
    ``<prefix>_<name with underscores>``, e.g. for Stable Diffusion's canonical names.  Modules the UIs do not
    apply exactly (:meth:`~beyondlora.algorithms.base.Adapter.consumer_caveats`) are named in a warning, or
    with ``strict`` refused; with ``as_difference`` they, and modules whose own form cannot hold them (DoRA,
    OFT at a multiplier ≠ 1), are written as their exact change instead (:func:`difference_form`).
    """
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    caveats: dict[str, list[str]] = defaultdict(list)
    for name, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        key = key_for(name) if key_for is not None else module_key(prefix, name)
        adapter = layer.adapters[adapter_name]
        if as_difference and adapter.consumer_caveats():
            adapter = difference_form(layer, adapter_name)
        try:
            exported = adapter_file_tensors(adapter, dtype)
        except FormatError as error:
            if not as_difference:
                raise FormatError(f"module {name!r}: {error} (as_difference=True writes its exact change)") from None
            adapter = difference_form(layer, adapter_name)
            exported = adapter_file_tensors(adapter, dtype)
        tensors.update({f"{key}.{tensor_name}": tensor for tensor_name, tensor in exported.items()})
        described[key] = describe(adapter, name)
        for caveat in adapter.consumer_caveats():
            caveats[caveat].append(name)
    if not tensors:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    report_caveats(caveats, strict, "as_difference=True writes such modules as their exact change")
    return tensors, described


def difference_form(layer: AdapterLayer, adapter_name: str) -> Adapter:
    """Adapter ``adapter_name`` of ``layer`` as the change it makes at its multiplier t, stored as it is
    (:func:`~beyondlora.algorithms.difference_class`: ``diff`` = t · (W' − W) of W's shape, ``diff_b`` (out,)):
    exact, and applied as such by every consumer, at the cost of its structure (it reloads as that form)."""
    delta, delta_bias = layer.effective_delta(adapter_name, layer.base_weight(), base_bias=layer.base_bias())
    g = layer.geometry
    bias = None if delta_bias is None else delta_bias.detach()
    return difference_class(g.kind).extracted(g, delta.detach(), bias, Extraction(None))


def report_caveats(caveats: dict[str, list[str]], strict: bool, remedy: str | None = None) -> None:
    """Warn (``strict``: raise) that the UIs will not apply some modules of the file as we do, and what to
    do instead where something can."""
    if not caveats:
        return
    parts = [
        f"{len(names)} module(s) ({names[0]}{', …' if len(names) > 1 else ''}): {text}"
        for text, names in caveats.items()
    ]
    message = "the Stable Diffusion UIs will not apply this file exactly: " + "; ".join(parts)
    if remedy:
        message += f" ({remedy})"
    if strict:
        raise FormatError(message + " (strict=True)")
    warnings.warn(message, UserWarning, stacklevel=4)


def adapter_file_tensors(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One adapter's single-file tensors (names without the module key), cast to ``dtype`` except the
    scalars that carry exact values (:func:`~.lycoris_codecs.cast_for_file`)."""
    return cast_for_file(export_tensors(adapter), dtype)


def kohya_metadata(described: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``ss_network_*`` keys as kohya sd-scripts writes them, from the first module's settings."""
    first = next(iter(described.values()))
    algorithms = sorted({d["algorithm"] for d in described.values()})
    args = {
        "algo": algorithms[0] if len(algorithms) == 1 else "mixed",
        **ALGORITHMS[first["algorithm"]].kohya_args(first),
    }
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(first["r"]),
        "ss_network_alpha": str(first["alpha"]),
        "ss_network_args": json.dumps(args),
    }


def save_single_file(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    prefix: str = DEFAULT_PREFIX,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    strict: bool = False,
    as_difference: bool = False,
) -> None:
    """Write adapter ``adapter_name`` of ``model`` as one safetensors file (atomically), with the modules saved
    whole for it (``modules_to_save``) under :data:`~.saved_modules.SAVED_KEY`; ``strict`` refuses modules the
    UIs would not apply exactly (else a warning names them), ``as_difference`` writes their exact change
    (:func:`single_file_tensors`)."""
    tensors, described = single_file_tensors(
        model, adapter_name, prefix, dtype, strict=strict, as_difference=as_difference
    )
    saved = saved_tensors(model, adapter_name, single_file_key)
    metadata = dict(metadata or {})
    if saved:
        tensors.update(saved)
        metadata[SAVED_METADATA] = json.dumps(saved_module_names(model, adapter_name))
    write_single_file(path, tensors, described, metadata)


def write_single_file(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    described: dict[str, dict[str, Any]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors from :func:`single_file_tensors` with our header (version, per-module hyper-parameters,
    kohya's ``ss_network_*`` keys), then ``metadata`` on top, atomically."""
    header = {
        "format": "pt",
        "beyondlora_version": __version__,
        MODULES_METADATA: json.dumps(described, separators=(",", ":")),
    }
    header.update(kohya_metadata(described))
    header.update(metadata or {})
    write_tensors(path, tensors, header)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<module key>": {"<tensor name>": tensor}}`` (split at the first dot)."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        module, _, name = key.partition(".")
        grouped[module][name] = tensor
    return dict(grouped)


def resolve_module_keys(model: nn.Module, keys: list[str], source: Path) -> dict[str, str]:
    """Map each file module key to the model's module name, finding the prefix the file uses.

    A key matches module ``a.b`` when it is ``<prefix>_a_b`` (or ``a_b``); the longest module name wins.
    Raises, listing them, when keys match no module or a key is ambiguous.
    """
    resolved, unmatched = match_module_keys(model, keys, source)
    if unmatched:
        listed = ", ".join(sorted(unmatched)[:8]) + (" …" if len(unmatched) > 8 else "")
        raise FormatError(
            f"{source}: {len(unmatched)} module key(s) match no module of {type(model).__name__}: {listed}"
        )
    return resolved


def match_module_keys(model: nn.Module, keys: list[str], source: Path | str) -> tuple[dict[str, str], list[str]]:
    """:func:`resolve_module_keys` without raising for unmatched keys: ``(resolved, unmatched)``.

    An ambiguous key still raises."""
    by_flat: dict[str, list[str]] = defaultdict(list)
    for name, _ in iter_candidate_modules(model):
        by_flat[name.replace(".", "_")].append(name)
    resolved: dict[str, str] = {}
    unmatched = []
    for key in keys:
        candidates = [key] + [key[i + 1 :] for i, char in enumerate(key) if char == "_"]
        match = next((c for c in candidates if c in by_flat), None)
        if match is None:
            unmatched.append(key)
            continue
        if len(by_flat[match]) > 1:
            raise FormatError(f"{source}: key {key!r} matches several modules: {by_flat[match]}")
        resolved[key] = by_flat[match][0]
    return resolved, unmatched


def read_single_file(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """A single file's tensors grouped by module key (each checked finite), and our per-module metadata."""
    path = Path(path)
    tensors = read_tensors(path)
    if not tensors:
        raise FormatError(f"{path} holds no tensors")
    for key, tensor in tensors.items():
        check_finite(path, key, tensor)
    recorded = json.loads(read_metadata(path).get(MODULES_METADATA, "{}"))
    return group_by_module(tensors), recorded


def plan_modules(
    model: nn.Module,
    grouped: dict[str, dict[str, torch.Tensor]],
    names: dict[str, str],
    source: Path | str,
    recorded: dict[str, Any] | None = None,
) -> list[PlannedAdapter]:
    """Build (without attaching) the adapter of every module key in ``names`` (key → module name of
    ``model``) from its tensors in ``grouped``."""
    recorded = recorded or {}
    planned = []
    for key, name in names.items():
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        try:
            geometry = LayerGeometry.of(base)
        except TypeError as error:
            raise FormatError(f"{source}: module {name!r} for key {key!r}: {error}") from None
        weight = geometry.canonical_weight(base).detach()
        where = f"{source}: {key} (module {name!r})"
        adapter = import_adapter(grouped[key], geometry, weight, where, recorded.get(key))
        planned.append(PlannedAdapter(name, module, adapter))
    return planned


def plan_from_single_file(
    model: nn.Module, path: str | Path
) -> tuple[list[PlannedAdapter], dict[str, dict[str, torch.Tensor]]]:
    """Build (without attaching) every adapter a single file describes, fully checked and loaded, and read the
    modules it saves whole: ``(planned adapters, {module path: state})``."""
    path = Path(path)
    grouped, recorded = read_single_file(path)
    saved = grouped.pop(SAVED_KEY, {})
    _, states = single_file_saved_states(model, saved, read_metadata(path), path)
    names = resolve_module_keys(model, list(grouped), path)
    return plan_modules(model, grouped, {key: names[key] for key in grouped}, path, recorded), states


def refuse_saved_modules(grouped: dict[str, dict[str, torch.Tensor]], path: Path | str, reader: str) -> None:
    """Raise when a single file carries whole modules (``modules_to_save``) that ``reader`` cannot restore:
    dropping them would silently change the model."""
    if SAVED_KEY in grouped:
        raise FormatError(
            f"{path} also holds whole modules (modules_to_save) that {reader} cannot restore; load it with "
            "PeftModel.from_pretrained on the model it was trained on"
        )
