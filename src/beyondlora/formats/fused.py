"""Single-file modules of fused layers (SD3 / Flux checkpoints' ``qkv``, ``linear1``, swapped adaLN
halves) ⇄ the diffusers modules they stack.

Reading splits a fused module's tensors into one set per segment (the module algorithm's
:meth:`~beyondlora.algorithms.base.Adapter.split_file_rows`) and joins the segments of one module back (a
swapped modulation: its two halves in the module's order); writing joins the modules' tensors in the
file's row order (:meth:`~beyondlora.algorithms.base.Adapter.join_file_rows`), splitting a module first
where only part of it is a segment.  Both are exact or raise, naming the key and the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..errors import FormatError, FusedLayerError
from ..host.layers import AdapterLayer
from ..ops.geometry import LayerGeometry
from .dit_names import Segment
from .lycoris_codecs import detect_algorithm
from .names import PartNames

Params = dict[str, Tensor]


def module_rows(model: nn.Module, name: str) -> int:
    """Output rows of module ``name`` of ``model`` (through an adapter host)."""
    module = model.get_submodule(name)
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    return LayerGeometry.of(base).out_dim


def segment_sizes(model: nn.Module, segments: Sequence[Segment]) -> list[int]:
    """The rows each segment takes in the fused module."""
    sizes = []
    for segment in segments:
        rows = module_rows(model, segment.module)
        sizes.append(rows if segment.chunk is None else rows // segment.chunk[1])
    return sizes


def split_rows(params: Params, sizes: Sequence[int], where: str) -> list[Params]:
    """One module's single-file tensors split into row blocks of ``sizes`` by its algorithm."""
    if "dora_scale" in params:
        raise FormatError(f"{where}: DoRA modules of fused layers are not split (its norm spans the fused rows)")
    return detect_algorithm(params, where).split_file_rows(params, sizes, where)


def join_rows(parts: Sequence[Params | None], sizes: Sequence[int], where: str) -> Params:
    """Row blocks' single-file tensors (``None``: no change on those rows) joined into one module by their
    algorithm; the blocks must share one."""
    found = [p for p in parts if p is not None]
    if any("dora_scale" in p for p in found):
        raise FormatError(f"{where}: DoRA modules cannot be joined into a fused layer (its norm spans the fused rows)")
    algorithms = {detect_algorithm(p, where) for p in found}
    if len(algorithms) > 1:
        names = sorted(cls.algorithm for cls in algorithms)
        raise FormatError(f"{where}: the layers it fuses hold different algorithms {names}; one module holds one")
    return algorithms.pop().join_file_rows(parts, sizes, where)


def expand_fused(
    grouped: Mapping[str, Params], naming: Mapping[str, PartNames], models: Mapping[str, nn.Module], source: object
) -> tuple[dict[str, Params], dict[str, dict[str, str]], dict[str, str]]:
    """Replace every fused module key of ``grouped`` by one entry per diffusers module it covers.

    Returns ``(grouped, {role: {new key: module name}}, {new key: fused key})``; new keys read
    ``<fused key>[<module name>]`` so errors still name the file's key.
    """
    out = dict(grouped)
    routed: dict[str, dict[str, str]] = {role: {} for role in naming}
    origin: dict[str, str] = {}
    for key, params in grouped.items():
        for role, names in naming.items():
            path = names.fused_for_key(key)
            if path is None:
                continue
            segments = names.fused[path]
            where = f"{source}: {key}"
            pieces = split_rows(params, segment_sizes(models[role], segments), where)
            by_module: dict[str, list[tuple[int, Params]]] = defaultdict(list)
            for segment, piece in zip(segments, pieces, strict=True):
                by_module[segment.module].append((segment.chunk[0] if segment.chunk else 0, piece))
            del out[key]
            for module, items in by_module.items():
                items.sort(key=lambda item: item[0])
                rows = module_rows(models[role], module)
                joined = (
                    items[0][1]
                    if len(items) == 1
                    else join_rows([p for _, p in items], [rows // len(items)] * len(items), where)
                )
                new_key = f"{key}[{module}]"
                out[new_key], routed[role][new_key], origin[new_key] = joined, module, key
            break
    return out, routed, origin


def join_fused(
    tensors: Mapping[str, Params], names: PartNames, model: nn.Module, source: str
) -> dict[str, tuple[Params, list[str]]]:
    """The single-file modules of the fused paths of ``names`` from per-module tensors (module name → its
    tensors): ``{key: (tensors, the modules it holds)}``.  A fused path none of whose modules has tensors is
    left out; one that cannot be written exactly raises naming its key."""
    out: dict[str, tuple[Params, list[str]]] = {}
    for path, segments in names.fused.items():
        held = [s.module for s in segments if s.module in tensors]
        if not held:
            continue
        key = names.fused_key(path)
        where = f"{source}: {key}"
        sizes = segment_sizes(model, segments)
        try:
            pieces: list[Params | None] = []
            for segment, size in zip(segments, sizes, strict=True):
                params = tensors.get(segment.module)
                if params is not None and segment.chunk is not None:
                    k, n = segment.chunk
                    params = split_rows(params, [size] * n, where)[k]
                pieces.append(params)
            out[key] = (join_rows(pieces, sizes, where), held)
        except FormatError as error:  # what one module of the fused key cannot hold
            raise FusedLayerError(str(error)) from None
    return out
