r"""``beyondlora extract``: the difference between a fine-tuned model and its base, as an adapter file.

For every module (see :mod:`~beyondlora.tools.model_files`) the difference ΔW = W_tuned − W_base is
computed in float32 (float64 for float64 models), one layer at a time.  A layer with
max|ΔW| ≤ ``min_diff`` · max|W_base| did not change and is skipped.  The others become, each algorithm
approximating the difference itself (its ``extracted``, with the tool's rank rule):

- **locon**: ΔW reshaped to (out, in·K) ≈ up · down by truncated SVD (:mod:`~beyondlora.ops.decompositions`),
  rank chosen per layer by ``mode`` (linear layers and 1×1 convs use ``linear_dim`` / ``linear_param``,
  k×k convs ``conv_dim`` / ``conv_param``); with ``tucker`` a k×k conv gets a Tucker-2 core
  (``lora_mid``).  When r·(out + in·K) ≥ out·in·K the low-rank form saves nothing and the layer is
  stored as a full ``diff`` instead.
- **lokr**: ΔW ≈ W1 ⊗ W2, the nearest Kronecker product with out = a·b, in = c·d from
  ``factorization(dim, factor)``; W2 stays full (``fixed`` without a dim), or is itself truncated by
  SVD to the rank the mode picks, when that saves parameters.
- **full** mode (either algo): ``diff`` (and ``diff_b``) for weights, ``w_norm`` / ``b_norm`` for 1-D
  norm scales; exact.

Files are written with alpha = rank (scale 1), so LyCORIS, kohya, ComfyUI / AUTOMATIC1111 and
beyondlora all rebuild ΔW as the product of the stored factors.  The reported error of each layer is
‖ΔW − ΔŴ‖_F / ‖ΔW‖_F with ΔŴ from the adapter's own ``delta_weight`` (before casting to the save dtype).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from .._version import __version__
from ..algorithms import ALGORITHMS, Adapter, difference_class
from ..algorithms.common import Extraction
from ..formats.lycoris_codecs import describe
from ..formats.single_file import MODULES_METADATA, adapter_file_tensors, kohya_metadata, module_key
from ..formats.tensors import write_tensors
from ..ops.decompositions import check_mode, low_rank_factors, select_rank, split, svd
from ..ops.geometry import LayerGeometry
from .model_files import Checkpoint, Module, TensorReader, canonical
from .outputs import check_output
from .progress import progress

MODES = ("fixed", "threshold", "ratio", "quantile", "full")


def extract_names() -> list[str]:
    """The ``--algo`` names: every algorithm that can approximate a difference."""
    return sorted({cls.extract_name for cls in ALGORITHMS.values() if cls.extract_name is not None})


def _extractor(name: str, geometry: LayerGeometry) -> type[Adapter] | None:
    """The algorithm ``--algo name`` means on a layer of this kind, or ``None``."""
    found = [c for c in ALGORITHMS.values() if c.extract_name == name and geometry.kind in c.supported_kinds]
    return found[0] if found else None


@dataclass(frozen=True)
class ExtractOptions:
    algo: str = "locon"
    mode: str = "fixed"
    linear_dim: int | None = None  # without a dim each algorithm has its default (locon: rank 32; lokr: full W2)
    conv_dim: int | None = None
    linear_param: float | None = None
    conv_param: float | None = None  # defaults to linear_param
    tucker: bool = False
    factor: int = -1
    min_diff: float = 1e-6
    device: str = "cpu"
    dtype: torch.dtype | None = None  # save dtype; default: the base model's
    exact_svd: bool = False

    def check(self) -> None:
        if self.algo not in extract_names():
            raise ValueError(f"--algo must be one of {', '.join(extract_names())}, got {self.algo!r}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode in ("threshold", "ratio", "quantile"):
            check_mode(self.mode, self.linear_param)
            check_mode(self.mode, self.conv_param if self.conv_param is not None else self.linear_param)
        for name in ("linear_dim", "conv_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"--factor must be -1 or positive, got {self.factor}")
        if self.min_diff < 0:
            raise ValueError(f"--min-diff must be ≥ 0, got {self.min_diff}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    status: str  # "extracted", "unchanged", "skipped"
    algorithm: str | None = None
    rank: int | None = None
    params: int = 0
    error: float | None = None
    note: str = ""


@dataclass
class ExtractReport:
    output: str
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_same_layout(base: Checkpoint, tuned: Checkpoint) -> None:
    """Raise ``ValueError`` naming the first difference in files, keys or shapes."""
    if base.is_folder != tuned.is_folder:
        raise ValueError(f"{base.path} and {tuned.path} are not the same kind of checkpoint (folder vs file)")
    if base.is_folder:
        base_files = {f.relative: f for f in base.files}
        tuned_files = {f.relative: f for f in tuned.files}
        for missing, there, here in (
            (set(base_files) - set(tuned_files), tuned, base),
            (set(tuned_files) - set(base_files), base, tuned),
        ):
            if missing:
                raise ValueError(f"{there.path} lacks {sorted(map(str, missing))[0]} (present in {here.path})")
        pairs = [(base_files[r], tuned_files[r]) for r in base_files]
    else:
        pairs = [(base.files[0], tuned.files[0])]
    for mine, theirs in pairs:
        for left, right in ((mine, theirs), (theirs, mine)):
            missing = [k for k in left.tensors if k not in right.tensors]
            if missing:
                listed = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
                raise ValueError(f"{right.path} lacks {len(missing)} key(s) of {left.path}: {listed}")
        for key, info in mine.tensors.items():
            other = theirs.tensors[key].shape
            if info.shape != other:
                raise ValueError(f"{key}: shape {info.shape} in {mine.path} but {other} in {theirs.path}")


def extract(
    base_path: str | Path,
    tuned_path: str | Path,
    output: str | Path,
    options: ExtractOptions | None = None,
    echo: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> ExtractReport:
    """Write the adapter ``tuned − base`` to ``output`` (a ``.safetensors`` single file)."""
    options = options or ExtractOptions()
    options.check()
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"{output}: the extracted adapter is a single .safetensors file")
    check_output(output, [(base_path, "the base model"), (tuned_path, "the tuned model")], overwrite)
    start = time.perf_counter()
    base, tuned = Checkpoint(base_path), Checkpoint(tuned_path)
    check_same_layout(base, tuned)
    modules = [m for m in base.modules.values() if m.component.extract]
    report = ExtractReport(str(output))
    tensors: dict[str, Tensor] = {}
    described = {}
    device = torch.device(options.device)
    save_dtypes = set()
    with TensorReader() as reader, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # randomized SVD: the same file for the same inputs
        for module in progress(modules, "extracting", "layer"):
            tuned_module = tuned.modules[module.name]
            layer, adapter = _extract_layer(module, tuned_module, reader, options, device)
            report.layers.append(layer)
            if adapter is None:
                continue
            key = module_key(base.prefix, module.name)
            dtype = options.dtype or (module.weight.dtype if module.weight.dtype.is_floating_point else None)
            save_dtypes.add(dtype)
            for name, tensor in adapter_file_tensors(adapter.cpu(), dtype).items():
                tensors[f"{key}.{name}"] = tensor
            root = module.component.root  # the path within its model: what a PEFT folder of that model names
            described[key] = describe(adapter, module.name[len(root) + 1 :] if root else module.name)
    if not tensors:
        raise ValueError(f"{tuned.path} does not differ from {base.path} in any extractable layer: nothing to extract")
    header = {"format": "pt", MODULES_METADATA: json.dumps(described), **kohya_metadata(described)}
    ranks = {d["r"] for d in described.values()}
    header["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    header["ss_network_alpha"] = header["ss_network_dim"]
    settings = {k: v for k, v in asdict(options).items() if k not in ("dtype",)}
    header["beyondlora_extract"] = json.dumps({**settings, "base": str(base.path), "tuned": str(tuned.path)})
    header["beyondlora_version"] = __version__
    write_tensors(output, tensors, header)
    report.seconds = time.perf_counter() - start
    if echo is not None:
        echo(format_report(report))
    return report


def _max_abs(tensor: Tensor) -> float:
    """max |x| without an |x| temporary (a model-sized pass allocates nothing)."""
    if not tensor.numel():
        return 0.0
    low, high = tensor.aminmax()
    return max(-float(low), float(high))


def _changed(delta: Tensor | None, reference: Tensor | None, min_diff: float) -> bool:
    if delta is None:
        return False
    scale = _max_abs(reference) if reference is not None else 0.0
    return _max_abs(delta) > min_diff * max(scale, torch.finfo(delta.dtype).tiny)


def _extract_layer(
    module: Module, tuned: Module, reader: TensorReader, options: ExtractOptions, device: torch.device
) -> tuple[LayerReport, Adapter | None]:
    g = module.geometry
    report = LayerReport(module.name, g.weight_shape, "unchanged")
    base_weight, tuned_weight = reader.get(module.weight), reader.get(tuned.weight)
    base_bias = None if module.bias is None else reader.get(module.bias)
    tuned_bias = None if module.bias is None else reader.get(tuned.bias)
    if torch.equal(base_weight, tuned_weight) and (base_bias is None or torch.equal(base_bias, tuned_bias)):
        return report, None  # bitwise equal: no need to look closer
    work = torch.float64 if torch.float64 in (base_weight.dtype, tuned_weight.dtype) else torch.float32
    base = canonical(base_weight, g).to(device, work)
    delta = canonical(tuned_weight, g).to(device, work) - base
    del tuned_weight
    bias_delta = None
    if base_bias is not None:
        base_bias = base_bias.to(device, work)
        bias_delta = tuned_bias.to(device, work) - base_bias
    weight_changed = _changed(delta, base, options.min_diff)
    bias_changed = _changed(bias_delta, base_bias, options.min_diff)
    if not (weight_changed or bias_changed):
        return report, None
    if options.mode == "full":
        adapter = difference_class(g.kind).extracted(g, delta, bias_delta, Extraction(None))
    elif g.is_norm or g.kind == "embedding" or not weight_changed:
        report.status = "skipped"
        what = "norm scale" if g.is_norm else "embedding" if g.kind == "embedding" else "bias only"
        report.note = f"{what} changed: only --mode full extracts it"
        return report, None
    else:
        dim, param = _dim_and_param(module, options)
        rule = (
            None
            if options.mode == "fixed" and dim is None
            else partial(_low_rank, dim=dim, param=param, options=options)
        )
        how = Extraction(
            rule,
            tucker=options.tucker,
            factor=options.factor,
            exact_svd=options.exact_svd,
        )
        adapter = _extractor(options.algo, g).extracted(g, delta, bias_delta, how, base_weight=base)
        if adapter is None:  # the low-rank form would not be smaller
            adapter = difference_class(g.kind).extracted(g, delta, None, how)
    adapter.to(device)
    with torch.no_grad():
        rebuilt = adapter.delta_weight(base.to(adapter.param_dtype))  # may be a parameter itself (Full)
        norm = float(delta.norm())
        report.error = float(torch.dist(rebuilt, delta.to(rebuilt.dtype))) / norm if norm > 0 else 0.0
    report.status = "extracted"
    report.algorithm = adapter.algorithm
    report.params = sum(p.numel() for p in adapter.parameters())
    report.rank = adapter.consumer_rank()
    if bias_changed and options.mode != "full":
        report.note = "bias changed too (only --mode full extracts biases)"
    return report, adapter


def _dim_and_param(module: Module, options: ExtractOptions) -> tuple[int | None, float | None]:
    g = module.geometry
    if g.kind == "conv" and g.kernel_numel > 1:
        param = options.conv_param if options.conv_param is not None else options.linear_param
        return options.conv_dim, param
    return options.linear_dim, options.linear_param


def _low_rank(matrix: Tensor, dim: int | None, param: float | None, options: ExtractOptions) -> tuple[Tensor, Tensor]:
    """Balanced factors of the rank the mode picks for ``matrix``."""
    if options.mode == "fixed":
        return low_rank_factors(matrix, dim, options.exact_svd)
    u, s, vh = svd(matrix)
    return split(u, s, vh, select_rank(s, options.mode, param))


def format_report(report: ExtractReport) -> str:
    """The per-layer summary the command prints."""
    lines = []
    extracted = [r for r in report.layers if r.status == "extracted"]
    width = max((len(r.name) for r in report.layers), default=10)
    for r in report.layers:
        if r.status == "extracted":
            rank = "full" if r.rank is None else f"r={r.rank}"
            lines.append(
                f"{r.name:<{width}}  {r.algorithm:<5} {rank:<7} {r.params:>11,d} params  "
                f"error {r.error:.2e}" + (f"  ({r.note})" if r.note else "")
            )
        elif r.status == "skipped":
            lines.append(f"{r.name:<{width}}  skipped: {r.note}")
    unchanged = sum(r.status == "unchanged" for r in report.layers)
    params = sum(r.params for r in extracted)
    worst = max((r.error for r in extracted), default=0.0)
    lines.append(
        f"extracted {len(extracted)} layer(s), {params:,d} parameters, worst relative error {worst:.2e}; "
        f"{unchanged} unchanged layer(s) skipped; wrote {report.output} in {report.seconds:.1f} s"
    )
    return "\n".join(lines)
