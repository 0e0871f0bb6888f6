r"""``beyondlora resize``: shrink the ranks of a LoRA / LoCon / DyLoRA single file by SVD.

For each LoRA module, ΔW (the adapter's own ``delta_weight``: alpha / r · up · [mid] · down, reshaped to
(out, in·K)) has rank ≤ r, so its SVD U Σ Vᵀ is computed exactly (randomized with r + 8 samples when
that is cheaper).  The new rank r' is ``rank`` (``--rank``) or what ``method`` keeps of σ
(:func:`~beyondlora.ops.decompositions.select_rank`: sv_ratio, sv_fro, sv_cumulative), capped by ``rank`` when
both are given and by r.  The module is rewritten as the best rank-r' approximation (Eckart–Young)

    up = U_r' Σ_r'^½,  down = Σ_r'^½ V_r'ᵀ,  alpha = r'   (so alpha / r' = 1)

with relative error √(Σ_{i>r'} σᵢ²) / ‖ΔW‖_F, reported per module (computed from both adapters'
``delta_weight``).  A Tucker (``lora_mid``) module becomes a plain LoCon of rank r'; a DoRA magnitude is
kept.  Modules of other algorithms are copied unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..algorithms import LoRA
from ..algorithms.common import AdapterOptions
from ..formats.lycoris_codecs import cast_for_file, describe
from ..formats.saved_modules import SAVED_KEY
from ..formats.single_file import MODULES_METADATA, adapter_file_tensors, group_by_module, read_metadata
from ..formats.tensors import write_tensors
from ..ops.decompositions import check_mode, select_rank, split, svd
from .adapter_files import adapter_kind, load_adapter, renamed_metadata, single_file_tensors
from .diffusers_layout import METADATA_KEY
from .outputs import check_output
from .progress import progress

METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class ResizeLayer:
    key: str
    algorithm: str
    old_rank: int | None
    new_rank: int | None
    error: float | None


@dataclass
class ResizeReport:
    output: str
    layers: list[ResizeLayer] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def resize(
    source: str | Path,
    output: str | Path,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    dtype: torch.dtype | None = None,
    echo: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> ResizeReport:
    """Write ``source`` with every LoRA module cut to the chosen rank into ``output`` (a single file)."""
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    check_output(output, [(source, "the adapter")], overwrite)
    if rank is None and method is None:
        raise ValueError("give --rank N, or --dynamic-method with --dynamic-param")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be ≥ 1, got {rank}")
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"--dynamic-method must be one of {', '.join(METHODS)}, got {method!r}")
        check_mode(method, param)
    if adapter_kind(source) != "single_file":
        raise ValueError(f"{source}: resize reads a .safetensors single file (convert a PEFT folder first)")
    if output.suffix != ".safetensors":
        raise ValueError(f"{output}: the resized adapter is a .safetensors file")
    loaded = load_adapter(source)
    if not any(adapter.resizable for adapter in loaded.adapters.values()):
        found = sorted({adapter.algorithm for adapter in loaded.adapters.values()})
        raise ValueError(
            f"{source} has nothing to resize: resize cuts LoRA / LoCon / DyLoRA ranks, and its modules are "
            f"{', '.join(found)}; nothing was written"
        )
    single, _, _ = single_file_tensors(source)  # diffusers' LoRA layout comes back as a single file
    grouped = group_by_module(single)
    saved = grouped.pop(SAVED_KEY, {})  # whole modules saved beside the adapter: copied unchanged
    metadata = renamed_metadata({k: v for k, v in read_metadata(source).items() if k != METADATA_KEY})
    recorded = json.loads(metadata.get(MODULES_METADATA, "{}"))
    report = ResizeReport(str(output))
    tensors: dict[str, Tensor] = {f"{SAVED_KEY}.{n}": t for n, t in cast_for_file(saved, dtype).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for key in progress(sorted(grouped), "resizing", "module"):
            adapter = loaded.adapters[key]
            if not adapter.resizable:
                report.layers.append(ResizeLayer(key, adapter.algorithm, None, None, None))
                tensors.update({f"{key}.{n}": t for n, t in cast_for_file(grouped[key], dtype).items()})
                continue
            new, layer = _resize_module(key, adapter, rank, method, param)
            report.layers.append(layer)
            save_dtype = dtype or max(grouped[key].values(), key=torch.numel).dtype  # the factors', not alpha's
            tensors.update({f"{key}.{n}": t for n, t in adapter_file_tensors(new, save_dtype).items()})
            recorded[key] = describe(new)
    header = dict(metadata)
    header[MODULES_METADATA] = json.dumps(recorded)
    ranks = {r.new_rank for r in report.layers if r.new_rank is not None}
    if ranks:
        header["ss_network_dim"] = header["ss_network_alpha"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    header["beyondlora_resize"] = json.dumps({"source": str(source), "rank": rank, "method": method, "param": param})
    write_tensors(output, tensors, header)
    report.seconds = time.perf_counter() - start
    if echo is not None:
        echo(format_report(report))
    return report


def _resize_module(
    key: str, adapter: LoRA, rank: int | None, method: str | None, param: float | None
) -> tuple[LoRA, ResizeLayer]:
    g = adapter.geometry
    standin = torch.zeros((), dtype=adapter.param_dtype).expand(g.weight_shape)
    with torch.no_grad():
        delta = adapter.delta_weight(standin).double()
        flat = delta.reshape(g.out_dim, -1)
        old = adapter.rank
        u, s, vh = svd(flat, min(old, min(flat.shape)))
        new_rank = select_rank(s, method, param) if method is not None else min(rank, s.numel())
        if rank is not None:
            new_rank = min(new_rank, rank)
        up, down = split(u, s, vh, new_rank)
        options = AdapterOptions(
            r=new_rank,
            alpha=float(new_rank),
            use_dora=adapter.dora_scale is not None,
            dora_on_output=adapter.options.dora_on_output,
        )
        values = {"lora_up": up, "lora_down": down}
        if adapter.dora_scale is not None:
            values["dora_scale"] = adapter.dora_scale
        new = LoRA.with_values(g, options, values).to(adapter.param_dtype)
        norm = float(delta.norm())
        error = float((new.delta_weight(standin).double() - delta).norm()) / norm if norm > 0 else 0.0
    return new, ResizeLayer(key, adapter.algorithm, old, new_rank, error)


def format_report(report: ResizeReport) -> str:
    width = max((len(r.key) for r in report.layers), default=10)
    lines = []
    for r in report.layers:
        if r.new_rank is None:
            lines.append(f"{r.key:<{width}}  {r.algorithm}: kept as is")
        else:
            lines.append(f"{r.key:<{width}}  rank {r.old_rank:>4} → {r.new_rank:<4} relative error {r.error:.2e}")
    resized = [r for r in report.layers if r.new_rank is not None]
    worst = max((r.error for r in resized), default=0.0)
    lines.append(
        f"resized {len(resized)} module(s), worst relative error {worst:.2e}; wrote {report.output} "
        f"in {report.seconds:.1f} s"
    )
    return "\n".join(lines)
