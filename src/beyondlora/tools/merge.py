r"""``beyondlora merge``: bake adapters into a model's weights, written in the model's own format.

For each adapted module with base weight W (canonical, float32 or float64) and adapters k = 1…n of
multiplier t_k, the merged weight is

    W' = W + Σ_k Δ_k,   Δ_k = t_k · ΔW_k          (DoRA: Δ_k = t_k · (m_k · (W + ΔW_k) / ‖W + ΔW_k‖ − W))
    b' = b + Σ_k t_k · Δb_k                       (Full ``diff_b``, Norm ``b_norm``)

with every Δ_k computed on the *unmerged* W, as the library's forward sums its active adapters.  ΔW_k is
the consumer's ΔW = alpha / rank · rebuild (read by the library's file readers, so LyCORIS, kohya and
PEFT files agree) and Δ_k comes from :meth:`AdapterLayer.effective_delta` — the same function the
library merges with.  A PEFT folder's ``modules_to_save`` replace their module's tensors.

The output has the base's layout: a single file for a single file, a folder (every other file copied)
for a folder; every tensor keeps its dtype unless ``dtype`` is given (floating tensors only).  Tensors
are read, merged and written one at a time; the output appears under its name only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..algorithms import Adapter
from ..formats.atomic import atomic_path
from ..host.layers import AdapterLayer
from .adapter_files import LoadedAdapter, load_adapter
from .model_files import Checkpoint, Module, StreamingWriter, TensorInfo, TensorReader, canonical
from .outputs import check_output
from .progress import progress


@dataclass
class ModuleReport:
    name: str
    adapters: int
    delta_norm: float
    relative: float


@dataclass
class MergeReport:
    output: str
    modules: list[ModuleReport] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    tensors: int = 0
    left_out: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _multipliers(values: list[float] | None, count: int) -> list[float]:
    if not values:
        return [1.0] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise ValueError(f"give one --multiplier, or one per adapter ({count}), not {len(values)}")
    return list(values)


def merge(
    base_path: str | Path,
    adapter_paths: list[str | Path],
    output: str | Path,
    multipliers: list[float] | None = None,
    dtype: torch.dtype | None = None,
    echo: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Write ``base`` with every adapter merged into ``output`` (see the module docstring)."""
    start = time.perf_counter()
    if not adapter_paths:
        raise ValueError("merge needs at least one adapter")
    check_output(output, [(base_path, "the base model"), *((a, "an adapter") for a in adapter_paths)], overwrite)
    factors = _multipliers(multipliers, len(adapter_paths))
    checkpoint = Checkpoint(base_path)
    output = Path(output)
    _check_output(checkpoint, output)
    loaded = [load_adapter(path, checkpoint) for path in adapter_paths]
    plan: dict[str, list[tuple[Adapter, float]]] = {}
    layers = {}
    for adapter_file, t in zip(loaded, factors, strict=True):
        for name, adapter in adapter_file.adapters.items():
            plan.setdefault(name, []).append((adapter, t))
            layers[name] = adapter_file.layers[name]
    replacements = _replacements(checkpoint, loaded, factors)
    report = MergeReport(str(output))
    with TensorReader() as reader, _output_root(checkpoint, output) as root:
        totals: dict[Path, int] = {}
        keys = [(f, key) for f in checkpoint.files for key in f.tensors]
        files_done = {f.path: 0 for f in checkpoint.files}
        writers: dict[Path, StreamingWriter] = {}
        cache: dict[str, dict[str, Tensor]] = {}
        for model_file, key in progress(keys, "merging", "tensor"):
            info = model_file.tensors[key]
            writer = writers.get(model_file.path)
            if writer is None:
                writer = writers[model_file.path] = _open_writer(root, checkpoint, model_file, dtype, loaded, factors)
            module = checkpoint.module_of(model_file, key)
            if (model_file.path, key) in replacements:
                tensor = replacements[(model_file.path, key)]
            elif module is not None and module.name in plan:
                if module.name not in cache:
                    cache[module.name] = _merged(module, plan[module.name], layers[module.name], reader, report)
                tensor = cache[module.name].pop(key.rpartition(".")[2])
                if not cache[module.name]:
                    del cache[module.name]
            else:
                tensor = reader.get(info)
            out = tensor.to(_out_dtype(info, dtype))
            if out.is_floating_point() and not torch.isfinite(out).all():
                raise ValueError(f"{key}: the merged tensor overflows {out.dtype} (non-finite values)")
            writer.write(key, out)
            report.tensors += 1
            files_done[model_file.path] += 1
            if files_done[model_file.path] == len(model_file.tensors):
                writer.close()
                totals[model_file.relative] = writer.total_bytes
        report.left_out = _copy_others(checkpoint, root, totals)
    report.replaced = sorted({key for _, key in replacements})
    report.seconds = time.perf_counter() - start
    if echo is not None:
        echo(format_report(report))
    return report


def _check_output(checkpoint: Checkpoint, output: Path) -> None:
    if checkpoint.is_folder:
        if output.exists():
            raise ValueError(f"{output} exists: the merged model folder must be a new path")
    else:
        if output.suffix != ".safetensors":
            raise ValueError(f"{output}: a single-file base is merged into a .safetensors file")
        if output.is_dir():
            raise ValueError(f"{output} is a folder: give a .safetensors file path")


@contextlib.contextmanager
def _output_root(checkpoint: Checkpoint, output: Path) -> Iterator[Path]:
    """A temporary file (single-file base) or folder, renamed onto ``output`` only on success."""
    if not checkpoint.is_folder:
        with atomic_path(output) as temporary:
            yield temporary
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield temporary
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _open_writer(root: Path, checkpoint: Checkpoint, model_file, dtype, loaded, factors) -> StreamingWriter:
    layout = [(key, _out_dtype(info, dtype), info.shape) for key, info in model_file.tensors.items()]
    metadata = dict(model_file.metadata)
    metadata["beyondlora_merged"] = json.dumps(
        [{"adapter": str(a.path), "multiplier": t} for a, t in zip(loaded, factors, strict=True)]
    )
    target = root / model_file.relative if checkpoint.is_folder else root
    target.parent.mkdir(parents=True, exist_ok=True)
    return StreamingWriter(target, layout, metadata)


def _out_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype


@torch.no_grad()
def _merged(
    module: Module, entries: list[tuple[Adapter, float]], layer_module, reader: TensorReader, report: MergeReport
) -> dict[str, Tensor]:
    """``{"weight": W', "bias": b'}`` for one module (stored layout, working dtype)."""
    g = module.geometry
    stored = reader.get(module.weight)
    work = torch.float64 if stored.dtype == torch.float64 else torch.float32
    weight = canonical(stored, g).to(work)
    bias = None if module.bias is None else reader.get(module.bias).to(work)
    layer = AdapterLayer(layer_module).eval()
    total_weight = torch.zeros_like(weight)
    total_bias = None
    for index, (adapter, t) in enumerate(entries):
        layer.add_adapter(f"merge{index}", adapter)
        delta, delta_bias = layer.effective_delta(f"merge{index}", weight, multiplier=t, base_bias=bias)
        total_weight += delta.to(work)
        if delta_bias is not None:
            total_bias = delta_bias.to(work) if total_bias is None else total_bias + delta_bias.to(work)
    norm = float(total_weight.norm())
    report.modules.append(ModuleReport(module.name, len(entries), norm, norm / max(float(weight.norm()), 1e-30)))
    merged = {"weight": canonical(weight + total_weight, g)}
    if bias is not None:
        merged["bias"] = bias if total_bias is None else bias + total_bias
    return merged


def _replacements(
    checkpoint: Checkpoint, loaded: list[LoadedAdapter], factors: list[float]
) -> dict[tuple[Path, str], Tensor]:
    """Tensors that a PEFT folder's ``modules_to_save`` replace, by (file, key)."""
    out: dict[tuple[Path, str], Tensor] = {}
    for adapter_file, t in zip(loaded, factors, strict=True):
        for name, state in adapter_file.save_states.items():
            if t != 1.0:
                raise ValueError(
                    f"{adapter_file.path}: module {name!r} is saved whole (modules_to_save); "
                    f"it cannot be merged at multiplier {t}"
                )
            for param, tensor in state.items():
                stem, _, kind = f"{name}.{param}".rpartition(".")
                module = checkpoint.modules.get(stem)
                info = None if module is None else module.weight if kind == "weight" else module.bias
                if info is None:
                    raise ValueError(f"{adapter_file.path}: saved tensor {name}.{param} matches no tensor of the model")
                if (info.file, info.key) in out:
                    raise ValueError(f"{info.key}: replaced by two adapters' modules_to_save")
                out[(info.file, info.key)] = tensor
    return out


def _copy_others(checkpoint: Checkpoint, root: Path, totals: dict[Path, int]) -> list[str]:
    """Copy a folder's other files; leave out stale weight variants; fix shard indexes' total size."""
    left_out = []
    written_dirs = {relative.parent for relative in totals}
    for path in checkpoint.other_files():
        relative = path.relative_to(checkpoint.path)
        is_weights = path.name.endswith((".safetensors", ".bin")) and relative.parent in written_dirs
        if is_weights:
            left_out.append(str(relative))
            continue
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            sizes = [size for rel, size in totals.items() if rel.parent == relative.parent]
            index.setdefault("metadata", {})["total_size"] = sum(sizes)
            target.write_text(json.dumps(index, indent=2))
        else:
            shutil.copy2(path, target)
    return left_out


def format_report(report: MergeReport) -> str:
    width = max((len(m.name) for m in report.modules), default=10)
    lines = [
        f"{m.name:<{width}}  {m.adapters} adapter(s)  ‖ΔW‖ {m.delta_norm:.4e}  ‖ΔW‖/‖W‖ {m.relative:.3e}"
        for m in report.modules
    ]
    lines += [f"{key}  replaced (modules_to_save)" for key in report.replaced]
    if report.left_out:
        lines.append(f"left out stale weight variants: {', '.join(report.left_out)}")
    lines.append(
        f"merged {len(report.modules)} module(s), wrote {report.tensors} tensors to {report.output} "
        f"in {report.seconds:.1f} s"
    )
    return "\n".join(lines)
