r"""``beyondlora inspect``: what an adapter file holds.

Per module: algorithm, canonical weight shape (out, in, \*k), rank and alpha as a consumer reads them
(scale = alpha / rank; a LoKr with both factors full has no rank and scale 1), parameter count and the
Frobenius norm of its weight delta ‖ΔW‖_F (the adapter's own ``delta_weight``), plus the bias delta's
norm where there is one.  Totals: modules, parameters, ‖ΔW‖ over all modules = √(Σ ‖ΔW_i‖²), modules per
algorithm; and the file's metadata (or a PEFT folder's config).

Without a base model the layer shapes come from the tensors themselves, and (IA)³ and DoRA, whose delta
depends on the base weight, report no norm.  With ``base``, each module's ΔW is what merging adds
(DoRA and (IA)³ included) and ‖ΔW‖ / ‖W‖ is reported as well.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..algorithms import Adapter
from ..host.layers import AdapterLayer
from .adapter_files import load_adapter
from .model_files import Checkpoint, TensorReader, canonical


def _notes(adapter: Adapter) -> list[str]:
    notes = adapter.summary_notes()
    if adapter.dora_scale is not None:
        notes.append("dora" + ("" if adapter.options.dora_on_output else " (input axis)"))
    return notes


def inspect(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """A JSON-ready description of the adapter at ``path`` (see the module docstring)."""
    checkpoint = Checkpoint(base) if base is not None else None
    loaded = load_adapter(path, checkpoint)
    modules = []
    reader = TensorReader()
    with reader, torch.no_grad():
        for name in sorted(loaded.adapters):
            adapter = loaded.adapters[name]
            entry: dict[str, Any] = {
                "module": name,
                "algorithm": adapter.algorithm,
                "shape": list(adapter.geometry.weight_shape),
                "rank": adapter.consumer_rank(),
                "alpha": adapter.alpha if adapter.consumer_rank() is not None else None,
                "scale": adapter.scale if adapter.consumer_rank() is not None else 1.0,
                "params": sum(p.numel() for p in adapter.parameters()),
                "notes": _notes(adapter),
                "delta_norm": None,
                "bias_delta_norm": None,
            }
            if checkpoint is None and adapter.file_folds_kernel():
                entry["notes"].append("a conv kernel is folded into in (the tensors do not say it; pass --base)")
            if checkpoint is not None:
                module = checkpoint.modules[name]
                weight = canonical(reader.get(module.weight), module.geometry).to(adapter.param_dtype)
                layer = AdapterLayer(loaded.layers[name]).eval()
                layer.add_adapter("inspected", adapter)
                bias = None if module.bias is None else reader.get(module.bias).to(adapter.param_dtype)
                delta, delta_bias = layer.effective_delta("inspected", weight, multiplier=1.0, base_bias=bias)
                entry["relative_delta_norm"] = float(delta.norm()) / max(float(weight.norm()), 1e-30)
            elif adapter.depends_on_base:
                delta, delta_bias = None, None
                entry["notes"].append("ΔW depends on the base weight: pass --base for its norm")
            else:
                standin = torch.zeros((), dtype=adapter.param_dtype).expand(adapter.geometry.weight_shape)
                delta, delta_bias = adapter.delta_weight(standin), adapter.delta_bias()
            if delta is not None:
                entry["delta_norm"] = float(delta.double().norm())
            if delta_bias is not None:
                entry["bias_delta_norm"] = float(delta_bias.double().norm())
            modules.append(entry)
    norms = [m["delta_norm"] for m in modules if m["delta_norm"] is not None]
    saved = {name: sum(t.numel() for t in state.values()) for name, state in loaded.save_states.items()}
    totals = {
        "modules": len(modules),
        "params": sum(m["params"] for m in modules) + sum(saved.values()),
        "delta_norm": float(sum(n * n for n in norms) ** 0.5) if norms else None,
        "algorithms": dict(sorted(Counter(m["algorithm"] for m in modules).items())),
        "modules_to_save": saved,
    }
    metadata = dict(loaded.metadata)
    return {
        "file": str(path),
        "format": loaded.kind,
        "base": str(base) if base else None,
        "modules": modules,
        "totals": totals,
        "metadata": metadata,
    }


def format_inspection(info: dict[str, Any], width_limit: int = 160) -> str:
    """The text ``beyondlora inspect`` prints."""
    lines = [f"{info['file']} ({info['format'].replace('_', ' ')})"]
    width = max((len(m["module"]) for m in info["modules"]), default=10)
    for m in info["modules"]:
        rank = "-" if m["rank"] is None else str(m["rank"])
        alpha = "-" if m["alpha"] is None else f"{m['alpha']:g}"
        norm = "n/a" if m["delta_norm"] is None else f"{m['delta_norm']:.4e}"
        shape = "×".join(map(str, m["shape"]))
        line = (
            f"{m['module']:<{width}}  {m['algorithm']:<6} {shape:<16} r={rank:<5} alpha={alpha:<8} "
            f"{m['params']:>11,d} params  ‖ΔW‖ {norm}"
        )
        if m.get("relative_delta_norm") is not None:
            line += f"  ‖ΔW‖/‖W‖ {m['relative_delta_norm']:.3e}"
        if m["bias_delta_norm"] is not None:
            line += f"  ‖Δb‖ {m['bias_delta_norm']:.4e}"
        if m["notes"]:
            line += "  [" + "; ".join(m["notes"]) + "]"
        lines.append(line)
    totals = info["totals"]
    algorithms = ", ".join(f"{k} {v}" for k, v in totals["algorithms"].items())
    norm = "n/a" if totals["delta_norm"] is None else f"{totals['delta_norm']:.4e}"
    lines.append(f"total: {totals['modules']} module(s) ({algorithms}), {totals['params']:,d} parameters, ‖ΔW‖ {norm}")
    for name, count in totals["modules_to_save"].items():
        lines.append(f"saved whole (modules_to_save): {name}, {count:,d} parameters")
    if info["metadata"]:
        lines.append("metadata:")
        for key, value in sorted(info["metadata"].items()):
            text = value if len(value) <= width_limit else value[: width_limit - 1] + "…"
            lines.append(f"  {key}: {text}")
    return "\n".join(lines)


def to_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True)
