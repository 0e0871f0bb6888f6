"""Between an adapter and its tensors in a LyCORIS / kohya single file, for any algorithm.

Each algorithm says how its modules look (:meth:`~beyondlora.algorithms.base.Adapter.file_tensors`,
:meth:`~beyondlora.algorithms.base.Adapter.read_file`); this module finds a module's algorithm from its
tensor names, adds DoRA's magnitude and our metadata, and builds the adapter.  The exporter writes the
adapter *at its current multiplier* so that the consumers' formula gives exactly our ΔW; the importer
inverts it (multiplier 1, same ΔW).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from ..algorithms import ALGORITHMS, Adapter, AdapterOptions
from ..algorithms.common import adapter_dtype
from ..algorithms.dora import file_magnitude, read_magnitude
from ..errors import FormatError
from ..ops.geometry import LayerGeometry
from .layer_records import layer_record

#: options that do not change ΔW; kept in our metadata so a reload restores how the adapter trains
TRAINING_OPTIONS = ("rank_dropout", "rank_dropout_scale", "module_dropout", "block_size", "dropout", "decompose_factor")
#: tensor names any module may carry besides its algorithm's own
SHARED_TENSORS = frozenset({"alpha", "dora_scale"})


def file_families() -> list[type[Adapter]]:
    """The algorithms with a single-file form of their own (DyLoRA reads and writes as LoRA)."""
    return [cls for name, cls in ALGORITHMS.items() if cls.file_family == name]


def single_file_tensor_names() -> frozenset[str]:
    """Every tensor name a module of a single file may carry."""
    return SHARED_TENSORS.union(*(cls.file_keys for cls in file_families()))


def cast_for_file(tensors: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """``tensors`` (single-file names, with or without their module key) with their floating tensors cast to
    the save ``dtype``, except ``alpha``, which carries the baked scale exactly (flags and integer buffers
    keep their dtype)."""

    def cast(key: str, tensor: Tensor) -> Tensor:
        exact = dtype is None or not tensor.is_floating_point() or key.rpartition(".")[2] == "alpha"
        return tensor if exact else tensor.to(dtype)

    return {k: cast(k, v) for k, v in tensors.items()}


def export_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The adapter's single-file tensors (names without the module prefix), consumer-exact."""
    out = adapter.file_tensors()
    if adapter.dora_scale is not None:
        out["dora_scale"] = file_magnitude(adapter.dora_scale, adapter.multiplier)
    return {k: v.detach() for k, v in out.items()}


def describe(adapter: Adapter, module: str | None = None) -> dict[str, Any]:
    """What our metadata records for one module: the algorithm and the options that shape training, and with
    ``module`` (its path in the model) that path and the layer's record (:func:`~.layer_records.layer_record`),
    all that converting the file into a PEFT folder needs besides the tensors."""
    info: dict[str, Any] = {"algorithm": adapter.algorithm, "r": adapter.options.r, "alpha": adapter.options.alpha}
    info.update(use_rslora=adapter.options.use_rslora, multiplier=adapter.multiplier)
    info.update({name: getattr(adapter.options, name) for name in TRAINING_OPTIONS})
    info.update(adapter.metadata_options())
    if module is not None:
        info.update(module=module, layer=layer_record(adapter.geometry))
    return info


def detect_algorithm(params: dict[str, Tensor], where: str) -> type[Adapter]:
    """The algorithm of one module's tensors: of those that claim them (:meth:`~.Adapter.claims`), the one
    whose tensor names it shares most (ties: registry order)."""
    names = set(params) - SHARED_TENSORS
    candidates = [(len(names & cls.file_keys), cls) for cls in file_families() if cls.claims(params)]
    best = max(candidates, key=lambda pair: pair[0])
    if best[0] == 0:
        raise FormatError(f"{where}: no known adapter in keys {sorted(params)}")
    return best[1]


def import_adapter(
    params: dict[str, Tensor],
    geometry: LayerGeometry,
    base_weight: Tensor,
    where: str,
    recorded: dict[str, Any] | None = None,
    rank_hint: tuple[int, float] | None = None,
) -> Adapter:
    """Build the adapter a module's single-file tensors describe (multiplier 1, the consumer's ΔW), on the
    base weight's device, in the adapter dtype for it.

    ``recorded`` is our metadata for the module when we wrote the file: it restores the algorithm (a
    training variant such as DyLoRA), the training options and the options no tensor carries
    (:attr:`~.Adapter.recorded_options`); everything else that shapes ΔW is read from the tensors.
    ``rank_hint`` = (r, alpha) gives an adapter whose tensors carry no rank (a LoKr with both factors full)
    the scale alpha / r (PEFT's rule) instead of the consumers' 1.
    """
    cls = detect_algorithm(params, where)
    unknown = sorted(set(params) - cls.file_keys - SHARED_TENSORS)
    if unknown:
        raise FormatError(f"{where}: tensor(s) {unknown} are not part of a {cls.algorithm} adapter")
    if "alpha" in params and params["alpha"].numel() != 1:
        raise FormatError(f"{where}: alpha has shape {tuple(params['alpha'].shape)}, expected () (one number)")
    if recorded and rank_hint is None and "r" in recorded:  # we wrote it: keep our r, with the consumers' scale
        rank_hint = (recorded["r"], float(recorded["r"]))
    try:
        state, options = cls.read_file(params, geometry, where, rank_hint)
    except KeyError as missing:
        raise FormatError(f"{where}: missing tensor {missing}") from None
    if "dora_scale" in params:
        state["dora_scale"], on_output = read_magnitude(params["dora_scale"], geometry, where)
        options.update(use_dora=True, dora_on_output=on_output)
    if recorded:
        variant = ALGORITHMS.get(recorded.get("algorithm", ""))
        if variant is not None and variant.file_family == cls.algorithm:
            cls = variant
        options.update({k: recorded[k] for k in (*TRAINING_OPTIONS, *cls.recorded_options) if k in recorded})
    known = {f.name for f in fields(AdapterOptions)}
    try:
        adapter = cls(geometry, AdapterOptions(**{k: v for k, v in options.items() if k in known}), base_weight)
    except (TypeError, ValueError) as error:
        raise FormatError(f"{where}: {error}") from None
    adapter.to(device=base_weight.device, dtype=adapter_dtype(base_weight))
    own = dict(adapter.named_parameters())
    for key, tensor in state.items():
        if key not in own or tuple(own[key].shape) != tuple(tensor.shape):
            expected = tuple(own[key].shape) if key in own else "no such parameter"
            raise FormatError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise FormatError(f"{where}: missing tensor(s) {missing}")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return adapter
