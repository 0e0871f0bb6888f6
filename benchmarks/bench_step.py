"""Training-step, inference and merge benchmark: beyondlora vs PEFT vs LyCORIS, side by side.

One run, one thread (``torch.set_num_threads(1)``, denormals flushed), measures for LoRA, LoKr, LoHa and
(IA)³ (r=8, alpha=8, an adapter on every linear / conv, every adapter factor non-zero and *identical* in all
libraries) on two workloads:

- ``linears``: two transformer-like blocks of 768-wide linears (q, k, v, o 768→768, fc1 768→3072,
  fc2 3072→768) on 1×1024×768 tokens;
- ``convs``: a UNet-style pair of 320-channel 3×3 convs (padding 1) on a 1×320×32×32 input;

per (library, algorithm):

- the median training-step time (forward + backward of ``output.sum()``, optimizer excluded) and its
  overhead over the frozen base model's step (all base parameters frozen, the input requires grad, so the
  backward runs through every layer — the same for every variant);
- the bytes saved for backward in one forward (``torch.autograd.graph.saved_tensors_hooks``, one count per
  storage, parameters and buffers of the model not counted: they are resident anyway);
- the median no-grad inference forward and its overhead, unmerged, and for beyondlora also after
  ``merge_and_unload``;

and, unless ``--no-unet``, the time to wrap an SD-1.5-sized ``diffusers.UNet2DConditionModel()`` with LoKr
on all its 282 Linear/Conv2d layers and to merge and unload it again, per library.

All variants of a workload are built first and then timed round-robin (shuffled order each round), so drift
from other processes on the machine hits every variant alike.  Each repetition records this thread's CPU
time (``time.thread_time``, the primary measure: on a shared machine it leaves out the time other processes
held the core) and the wall-clock time; overheads come with the standard error of the ratio of medians.
Before timing, every variant's output is checked against beyondlora's on a bias-free copy of the base model
(so all libraries' adapters compute the same function, not just similar-sized ones).

Run:  python benchmarks/bench_step.py [--quick] [--no-unet] [--output results.md]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import functools
import gc
import logging
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

import peft  # noqa: E402
from floor import floor_ratio  # noqa: E402
from lycoris import create_lycoris  # noqa: E402
from lycoris.logging import logger as _lycoris_logger  # noqa: E402

import beyondlora as bl  # noqa: E402

_lycoris_logger.setLevel(logging.ERROR)

ALGOS = ("lora", "lokr", "loha", "ia3", "oft", "boft", "glora")
#: the default run (under 10 minutes); ``--algos oft,boft,glora`` times the rotations and GLoRA in a second run
DEFAULT_ALGOS = ("lora", "lokr", "loha", "ia3")
#: PEFT's tuners of these names compute another function (they rotate the layer's input): timed for their cost,
#: given their own random values, and left out of the same-function check
OTHER_FUNCTION_IN_PEFT = frozenset({"oft", "boft"})
#: LyCORIS' names where they differ from ours
LYCORIS_ALGO = {"oft": "diag-oft"}
LIBS = ("beyondlora", "peft", "lycoris", "lycoris-bypass")
DEFAULT_LIBS = ("beyondlora", "peft", "lycoris-bypass")  # LyCORIS' default (rebuild) mode: --libs …,lycoris
RANK, ALPHA = 8, 8
#: BOFT's largest block: 8 cannot split 320 channels into a power of two of even blocks; 10 gives blocks of 10 on
#: the convs (32 blocks, 6 stages) and of 6 on the linears (128 / 512 blocks, 8 / 10 stages)
BOFT_RANK = 10
#: beyondlora training-step overhead targets, %; the rotations and GLoRA are judged against their peers only
TARGETS = {"lora": 5.0, "ia3": 5.0, "lokr": 10.0, "loha": 20.0}
#: issue #22: the training step within this factor of the case's multiply-add floor (floor.py)
FLOOR_TARGET = 1.3


# --------------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Transformer-like block of linears: a gated q/k/v/o mixer (no softmax) and an MLP, both residual."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))
        return x + self.fc2(F.gelu(self.fc1(x)))


class LinearStack(nn.Module):
    def __init__(self, width: int, hidden: int, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ConvPair(nn.Module):
    """The two 3×3 convs of a UNet resnet block (norms left out: they are not adapted)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


@dataclass
class Workload:
    name: str
    description: str
    make_base: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    check_shape: tuple[int, ...]  # small input for the cross-library equality check
    targets: list[str]


class Single(nn.Module):
    """One layer on its own (the per-layer diagnostic workloads)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def workloads(quick: bool) -> list[Workload]:
    """``linears`` and ``convs`` run by default; the single-layer ones are for diagnosis (``--workloads``)."""
    width, hidden, tokens = (192, 768, 128) if quick else (768, 3072, 1024)
    channels, side = (64, 16) if quick else (320, 32)
    tokens_in = (1, tokens, width)
    singles = [
        ("q", f"one Linear {width}→{width} on 1×{tokens}×{width}", lambda: nn.Linear(width, width),
         tokens_in, (1, 16, width)),
        ("fc1", f"one Linear {width}→{hidden} on 1×{tokens}×{width}", lambda: nn.Linear(width, hidden),
         tokens_in, (1, 16, width)),
        ("fc2", f"one Linear {hidden}→{width} on 1×{tokens}×{hidden}", lambda: nn.Linear(hidden, width),
         (1, tokens, hidden), (1, 16, hidden)),
        ("conv", f"one Conv2d({channels}, {channels}, 3, padding=1) on 1×{channels}×{side}×{side}",
         lambda: nn.Conv2d(channels, channels, 3, padding=1), (1, channels, side, side), (1, channels, 6, 6)),
    ]  # fmt: skip
    return [
        Workload(
            "linears",
            f"2 blocks × (q,k,v,o {width}→{width}, fc1 {width}→{hidden}, fc2 {hidden}→{width}) on 1×{tokens}×{width}",
            lambda: LinearStack(width, hidden),
            (1, tokens, width),
            (1, 16, width),
            ["q", "k", "v", "o", "fc1", "fc2"],
        ),
        Workload(
            "convs",
            f"2 × Conv2d({channels}, {channels}, 3, padding=1) on 1×{channels}×{side}×{side}",
            lambda: ConvPair(channels),
            (1, channels, side, side),
            (1, channels, 6, 6),
            ["conv1", "conv2"],
        ),
    ] + [
        Workload(name, desc, lambda make=make: Single(make()), shape, check, ["layer"])
        for name, desc, make, shape, check in singles
    ]


# --------------------------------------------------------------------------------------------------
# building the variants
# --------------------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Per-repetition seconds: this thread's CPU time (the primary measure) and wall-clock time.

    On a shared machine the wall clock also counts the time other processes held the core; the thread's
    CPU time does not, so it is far less noisy (cache and memory-bandwidth sharing still show in both).
    """

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


@dataclass
class Variant:
    lib: str  # "base", one of LIBS, or "beyondlora-merged" / "beyondlora[bypass]" / "beyondlora[combined]"
    algo: str | None
    model: nn.Module
    trainable: list[nn.Parameter]
    net: Any = None  # the LycorisNetwork
    train: Timings = field(default_factory=lambda: Timings())
    infer: Timings = field(default_factory=lambda: Timings())
    saved_bytes: int = 0
    paths: str = ""  # beyondlora only: which path the layers took (training / inference)

    @property
    def key(self) -> tuple[str, str | None]:
        return self.lib, self.algo


_PRESET_DIR = tempfile.mkdtemp(prefix="bench_lycoris_")
_PRESET = os.path.join(_PRESET_DIR, "linear_conv.toml")
with open(_PRESET, "w") as _f:  # adapt every Linear / Conv2d (the "full" preset names UNet block classes)
    _f.write('target_module = ["Linear", "Conv2d"]\ntarget_name = []\n')


def _bl_config(algo: str, targets: list[str], mode: str = "auto") -> bl.AdapterConfig:
    common = {"target_modules": targets, "init_weights": False, "forward_mode": mode}
    if algo == "lora":
        return bl.LoraConfig(r=RANK, alpha=ALPHA, **common)
    if algo == "lokr":
        return bl.LoKrConfig(r=RANK, alpha=ALPHA, decompose_factor=-1, **common)
    if algo == "loha":
        return bl.LoHaConfig(r=RANK, alpha=ALPHA, **common)
    if algo == "oft":
        return bl.OFTConfig(r=RANK, **common)
    if algo == "boft":
        return bl.BOFTConfig(r=BOFT_RANK, **common)
    if algo == "glora":
        return bl.GLoRAConfig(r=RANK, alpha=ALPHA, **common)
    return bl.IA3Config(**common)


def _peft_config(algo: str, targets: list[str], width: int) -> peft.PeftConfig:
    """PEFT's config; ``width`` is the workload's smallest input size, which PEFT's input-side rotations split."""
    if algo == "lora":
        return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    if algo == "lokr":
        return peft.LoKrConfig(r=RANK, alpha=ALPHA, decompose_factor=-1, target_modules=targets, init_weights=False)
    if algo == "loha":
        return peft.LoHaConfig(r=RANK, alpha=ALPHA, target_modules=targets, init_weights=False)
    if algo == "oft":
        return peft.OFTConfig(r=0, oft_block_size=RANK, target_modules=targets, init_weights=False)
    if algo == "boft":  # blocks and stages as ours (PEFT without its CUDA extension runs one stage: it warns)
        block = 10 if width % 10 == 0 else 6
        stages = int(math.log2(width // block)) + 1
        return peft.BOFTConfig(
            boft_block_size=block, boft_n_butterfly_factor=min(stages, 6 if block == 10 else 8),
            target_modules=targets, init_weights=False,
        )  # fmt: skip
    if algo == "glora":
        raise ValueError("PEFT's GLoRA is another method (W0 ⊙ A); benchmark GLoRA against LyCORIS only")
    return peft.IA3Config(target_modules=targets, feedforward_modules=[], init_ia3_weights=False)


def _no_lean_bypass(*args: Any, **kwargs: Any) -> None:
    return None


def wrap(lib: str, algo: str | None, model: nn.Module, targets: list[str]) -> Variant:
    """Wrap ``model`` in place (callers pass a copy)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if lib == "base":
        return Variant(lib, algo, model, [])
    if lib.startswith("beyondlora"):
        mode = re.fullmatch(r"beyondlora(?:\[(\w+)\])?", lib).group(1) or "auto"
        forced = mode in ("lean", "stored")
        wrapped = bl.get_peft_model(model, _bl_config(algo, targets, "bypass" if forced else mode))
        for layer in wrapped.modules():
            if isinstance(layer, bl.AdapterLayer) and mode == "lean":  # recompute every input side in backward
                layer.backward_memory = "lean"
            if isinstance(layer, bl.AdapterLayer) and mode == "stored":  # the bypass before the autograd functions
                for adapter in layer.adapters.values():
                    adapter.add_bypass = _no_lean_bypass
        return Variant(lib, algo, wrapped, [p for p in wrapped.parameters() if p.requires_grad])
    if lib == "peft":
        layers = [m for n, m in model.named_modules() if n.rpartition(".")[2] in targets]
        width = min(getattr(m, "in_features", 0) or m.in_channels * math.prod(m.kernel_size) for m in layers)
        wrapped = peft.get_peft_model(model, _peft_config(algo, targets, width))
        return Variant(lib, algo, wrapped, [p for p in wrapped.parameters() if p.requires_grad])
    if lib in ("lycoris", "lycoris-bypass"):
        net = create_lycoris(
            model,
            1.0,
            linear_dim=BOFT_RANK if algo == "boft" else RANK,
            linear_alpha=ALPHA,
            conv_dim=BOFT_RANK if algo == "boft" else RANK,
            conv_alpha=ALPHA,
            algo=LYCORIS_ALGO.get(algo, algo),
            factor=-1,
            preset=_PRESET,
            bypass_mode=lib == "lycoris-bypass",
        )
        net.apply_to()
        net.to(next(model.parameters()).device)  # LyCORIS makes its modules on the CPU
        net.requires_grad_(True)
        return Variant(lib, algo, model, list(net.parameters()), net=net)
    raise ValueError(lib)


def adapter_params(variant: Variant) -> dict[tuple[str, str], nn.Parameter]:
    """(layer name in the base model, LyCORIS parameter name) → parameter, for any library."""
    out: dict[tuple[str, str], nn.Parameter] = {}
    if variant.lib.startswith("beyondlora"):
        for name, module in variant.model.named_modules():
            if isinstance(module, bl.AdapterLayer):
                for pname, p in module.adapters["default"].named_parameters():
                    out[(name.removeprefix("base_model."), pname)] = p
    elif variant.lib == "peft":
        rename = {"lora_A": "lora_down", "lora_B": "lora_up", "ia3_l": "weight"}
        for name, p in variant.model.named_parameters():
            match = re.fullmatch(r"base_model\.model\.(.+)\.(\w+)\.default(?:\.weight)?", name)
            if p.requires_grad and match:
                out[(match.group(1), rename.get(match.group(2), match.group(2)))] = p
    elif variant.net is not None:
        names = {id(m): n for n, m in variant.model.named_modules()}
        for lora in variant.net.loras:
            layer = names[id(lora.org_module[0])]
            for pname, p in lora.named_parameters():
                out[(layer, pname if pname == "weight" else pname.removesuffix(".weight"))] = p
    return out


@torch.no_grad()
def copy_adapters(source: Variant, target: Variant) -> None:
    """Give ``target`` exactly ``source``'s (beyondlora's) adapter values.

    PEFT's (IA)³ vector multiplies W directly (``ia3_l = 1 + v``); beyondlora and LyCORIS store ``v``.
    """
    src, dst = adapter_params(source), adapter_params(target)
    if set(src) != set(dst):
        raise RuntimeError(
            f"{target.lib}/{target.algo}: adapter parameters differ from beyondlora's: "
            f"only beyondlora {sorted(set(src) - set(dst))[:4]}, only {target.lib} {sorted(set(dst) - set(src))[:4]}"
        )
    for key, p in dst.items():
        value = src[key]
        if target.lib == "peft" and key[1] == "weight":  # (IA)³
            value = 1.0 + value
        if value.numel() != p.numel():
            raise RuntimeError(f"{target.lib}/{target.algo} {key}: shape {tuple(p.shape)} vs {tuple(value.shape)}")
        p.copy_(value.reshape(p.shape))


def build_variants(
    wl: Workload, algos: tuple[str, ...], libs: tuple[str, ...], base: nn.Module, extra_modes: bool
) -> list[Variant]:
    variants = [wrap("base", None, copy.deepcopy(base), wl.targets)]
    for algo in algos:
        torch.manual_seed(1 + ALGOS.index(algo))
        extra = ["beyondlora[bypass]", "beyondlora[lean]", "beyondlora[stored]", "beyondlora[combined]"]
        bl_names = ["beyondlora"] + (extra if extra_modes else [])
        reference = None
        for lib in bl_names + [lib for lib in libs if lib != "beyondlora" and not (lib == "peft" and algo == "glora")]:
            variant = wrap(lib, algo, copy.deepcopy(base), wl.targets)
            if reference is None:
                reference = variant
            elif not (lib == "peft" and algo in OTHER_FUNCTION_IN_PEFT):
                copy_adapters(reference, variant)
            variants.append(variant)
        if any(torch.count_nonzero(p) == 0 for p in reference.trainable):
            raise RuntimeError(f"beyondlora/{algo}: an adapter factor is zero")
    return variants


def check_equal(wl: Workload, algos: tuple[str, ...], libs: tuple[str, ...], base: nn.Module) -> list[str]:
    """Every library's adapted output equals beyondlora's on a bias-free copy of the base (float32 noise only).

    Bias-free because PEFT's (IA)³ and LyCORIS' bypass (IA)³ scale the bias too, beyondlora's and LyCORIS'
    rebuild/merge do not.
    """
    base = copy.deepcopy(base)
    with torch.no_grad():
        for m in base.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    x = torch.randn(wl.check_shape, device=next(base.parameters()).device)
    lines = []
    with torch.no_grad(), _full_float32():
        y_base = base(x)
        for algo in algos:
            variants = build_variants(wl, (algo,), libs, base, extra_modes=False)[1:]
            outs = {v.lib: v.model(x) for v in variants if not (v.lib == "peft" and algo in OTHER_FUNCTION_IN_PEFT)}
            delta = (outs["beyondlora"] - y_base).abs().max().item()
            errs = {lib: (y - outs["beyondlora"]).abs().max().item() / delta for lib, y in outs.items()}
            worst = max(errs.values())
            status = "ok" if worst < 1e-3 and delta > 0 else "MISMATCH"
            lines.append(
                f"{wl.name}/{algo}: max|Δ adapter| {delta:.2e}; max rel. difference to beyondlora "
                + ", ".join(f"{lib} {e:.1e}" for lib, e in errs.items() if lib != "beyondlora")
                + f" [{status}]"
                + (" (PEFT's tuner of this name rotates the input: another function, timed for its cost)"
                   if algo in OTHER_FUNCTION_IN_PEFT and "peft" in libs else "")
            )  # fmt: skip
            del variants, outs
    return lines


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """CUDA's TF32 matmuls and convolutions off: their 10-bit mantissa would swamp a small ΔW's difference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def saved_bytes(variant: Variant, x: torch.Tensor, autocast: torch.dtype | None = None) -> int:
    """Bytes of the tensors autograd saves in one training forward (one count per storage, no parameters;
    under autocast its 16-bit copies of the weights count: they live until the step ends)."""
    resident = {p.untyped_storage().data_ptr() for p in variant.model.parameters()}
    resident |= {b.untyped_storage().data_ptr() for b in variant.model.buffers()}
    if variant.net is not None:
        resident |= {p.untyped_storage().data_ptr() for p in variant.net.parameters()}
        resident |= {b.untyped_storage().data_ptr() for b in variant.net.buffers()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    variant.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(x, autocast):
        out = variant.model(x)
    del out
    return sum(storages.values())


def bl_paths(variant: Variant, x: torch.Tensor, grad: bool, autocast: torch.dtype | None) -> str:
    """The paths beyondlora's layers take in one forward: "bypass", "merged" (the combined path's merged training
    step) or "combined", or how many layers take each (diagnostic; reads a private method)."""
    layers = [m for m in variant.model.modules() if isinstance(m, bl.AdapterLayer)]
    paths: list[str] = []

    def hook(layer: nn.Module, args: tuple) -> None:
        paths.append(layer._path(args[0], list(layer.active_adapters)))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        with torch.set_grad_enabled(grad), _autocast(x, autocast):
            variant.model(x.detach().requires_grad_(grad))
    finally:
        for h in handles:
            h.remove()
    counts = collections.Counter(paths)
    if len(counts) == 1:
        return paths[0]
    return " + ".join(f"{n} {path}" for path, n in counts.most_common())


def _autocast(x: torch.Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _clocks(x: torch.Tensor) -> tuple[float, float]:
    """(thread CPU time, wall clock) now; on a GPU after its queued work is done.

    A GPU step's cost is its wall-clock time: the thread's CPU time only counts the kernel launches.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        wall = time.perf_counter()
        return wall, wall
    return time.thread_time(), time.perf_counter()


def _elapsed(x: torch.Tensor, start: tuple[float, float]) -> tuple[float, float]:
    cpu, wall = _clocks(x)
    return cpu - start[0], wall - start[1]


def train_step(variant: Variant, x: torch.Tensor, autocast: torch.dtype | None = None) -> tuple[float, float]:
    start = _clocks(x)
    with _autocast(x, autocast):
        out = variant.model(x)
    out.float().sum().backward()
    elapsed = _elapsed(x, start)
    x.grad = None
    for p in variant.trainable:
        p.grad = None
    return elapsed


def infer_step(variant: Variant, x: torch.Tensor, autocast: torch.dtype | None = None) -> tuple[float, float]:
    with torch.no_grad(), _autocast(x, autocast):
        start = _clocks(x)
        variant.model(x)
        return _elapsed(x, start)


def round_robin(
    variants: list[Variant],
    run: Callable[[Variant, torch.Tensor], tuple[float, float]],
    x: torch.Tensor,
    warmup: int,
    reps: int,
    attr: str,
) -> None:
    """``warmup + reps`` rounds; each round runs every variant once, in a freshly shuffled order."""
    rng = random.Random(0)
    for round_ in range(warmup + reps):
        order = list(variants)
        rng.shuffle(order)
        for variant in order:
            cpu, wall = run(variant, x)
            if round_ >= warmup:
                getattr(variant, attr).cpu.append(cpu)
                getattr(variant, attr).wall.append(wall)
        gc.collect()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return math.nan
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def rel_se(xs: list[float]) -> float:
    """Relative standard error of the median (normal approximation, σ estimated from the IQR)."""
    if len(xs) < 4:
        return math.nan
    return 1.2533 * (iqr(xs) / 1.349) / math.sqrt(len(xs)) / median(xs)


def ratio(a: list[float], b: list[float]) -> tuple[float, float]:
    """``median(a) / median(b)`` and its standard error."""
    r = median(a) / median(b)
    return r, r * math.hypot(rel_se(a), rel_se(b))


# --------------------------------------------------------------------------------------------------
# the UNet: wrap and merge_and_unload
# --------------------------------------------------------------------------------------------------
def unet_bench(
    quick: bool, libs: tuple[str, ...], rounds: int, device: torch.device
) -> tuple[list[str], dict[str, Any]]:
    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    if quick:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
    else:
        unet = UNet2DConditionModel()  # the default config is SD-1.5's UNet (random weights)
    unet.to(device)
    build_s = time.perf_counter() - start
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in layers})
    n_params = sum(p.numel() for p in unet.parameters())
    info = {"build_s": build_s, "params": n_params, "layers": len(layers), "suffixes": suffixes}
    names = ["beyondlora"] + [lib for lib in ("peft", "lycoris") if lib in libs or f"{lib}-bypass" in libs]
    wrap_times: dict[str, Timings] = {lib: Timings() for lib in names}
    merge_times: dict[str, Timings] = {lib: Timings() for lib in names}
    adapted: dict[str, int] = {}
    probe = torch.empty(0, device=device)  # where the clocks synchronize
    # One UNet serves every library and round: merge_and_unload hands back plain torch modules (with changed,
    # still random weights), which the next library wraps.  No 3.5 GB deepcopy, no rebuild.
    for _ in range(rounds):
        for lib in names:
            gc.collect()
            torch.manual_seed(0)
            start = _clocks(probe)
            variant = wrap(lib, "lokr", unet, suffixes)
            cpu, wall = _elapsed(probe, start)
            wrap_times[lib].cpu.append(cpu)
            wrap_times[lib].wall.append(wall)
            adapted[lib] = len({layer for layer, _ in adapter_params(variant)})
            with torch.no_grad():  # LyCORIS starts with one zero factor: make every factor non-zero
                for p in variant.trainable:
                    if torch.count_nonzero(p) == 0:
                        p.normal_(0.0, 0.01)
            start = _clocks(probe)
            if lib == "lycoris":  # LyCORIS' merge_and_unload: merge into the weights, then unhook the forwards
                variant.net.merge_to(1.0)
                variant.net.restore()
                unet = variant.model
            else:
                unet = variant.model.merge_and_unload()
            cpu, wall = _elapsed(probe, start)
            merge_times[lib].cpu.append(cpu)
            merge_times[lib].wall.append(wall)
            leftovers = [
                n
                for n, m in unet.named_modules()
                if isinstance(m, bl.AdapterLayer)
                or type(m).__module__.startswith("peft.")
                or getattr(vars(m).get("forward"), "__self__", m) is not m
            ]
            if leftovers:
                raise RuntimeError(f"{lib}: adapter modules left after merging: {leftovers[:3]}")
            del variant

    def cell(t: Timings) -> str:
        return f"{min(t.cpu):.2f} / {min(t.wall):.2f}"

    rows = [f"| {lib} | {adapted[lib]} | {cell(wrap_times[lib])} | {cell(merge_times[lib])} |" for lib in names]
    return rows, info


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def overhead(a: list[float], base: list[float]) -> tuple[float, float]:
    """``100 · (median(a) / median(base) − 1)`` and its standard error, in %."""
    r, se = ratio(a, base)
    return 100 * (r - 1), 100 * se


def fmt_pct(value: float, se: float | None = None) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:+.1f}%" + ("" if se is None or math.isnan(se) else f" ±{se:.1f}")


def judge(value: float, se: float, limit: float) -> str:
    """``value`` ≤ ``limit``?  Differences inside two standard errors are called out as noise."""
    if value <= limit:
        return "met" if value + 2 * se <= limit or math.isnan(se) else "met (within noise)"
    return "MISSED" if value - 2 * se > limit or math.isnan(se) else "MISSED (within noise)"


def env_lines(device: torch.device, autocast: torch.dtype | None) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    revision = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return [
        f"date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, git {revision}",
        f"cpu: {cpu}, {os.cpu_count()} cores visible; torch.set_num_threads(1), set_flush_denormal(True)",
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"autocast: {autocast or 'off (float32)'}"
        + (f"; LYCORIS_KERNEL_TUNE={os.environ.get('LYCORIS_KERNEL_TUNE', 'on')}" if device.type == "cuda" else ""),
        f"python {platform.python_version()}, torch {torch.__version__}, beyondlora {bl.__version__}, "
        f"peft {ver('peft')}, lycoris-lora {ver('lycoris-lora')}, diffusers {ver('diffusers')}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repetitions")
    parser.add_argument("--no-unet", action="store_true", help="skip the SD-1.5 UNet wrap/merge timing")
    parser.add_argument("--reps", type=int, help="timed training steps per variant (default 15; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed training rounds first (default 3; quick 1)")
    parser.add_argument("--infer-reps", type=int, help="timed inference forwards per variant (default 10; quick 3)")
    parser.add_argument("--unet-rounds", type=int, default=2, help="wrap+merge rounds per library (default 2)")
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="comma-separated subset of " + ",".join(ALGOS))
    parser.add_argument(
        "--libs",
        default=",".join(DEFAULT_LIBS),
        help=f"comma-separated subset of {','.join(LIBS)} (default {','.join(DEFAULT_LIBS)}; "
        "'lycoris' is LyCORIS' default rebuild mode, about 2.3x the base step, off to stay under 10 minutes)",
    )
    parser.add_argument(
        "--workloads",
        default="linears,convs",
        help="comma-separated subset of linears,convs and the single layers q,fc1,fc2,conv (diagnosis)",
    )
    parser.add_argument(
        "--extra-modes",
        action="store_true",
        help="also time beyondlora with forward_mode bypass and combined, 'lean': the bypass with "
        "backward_memory='lean', and 'stored': the bypass as it was before the autograd functions that "
        "recompute intermediates (everything stored for backward)",
    )
    parser.add_argument("--device", default="cpu", help="where the models run: cpu (default) or cuda")
    parser.add_argument(
        "--batch", type=int, default=1, help="batch size of the timed input (default 1; a GPU needs more work)"
    )
    parser.add_argument("--autocast", choices=("bf16", "fp16"), help="run forwards under autocast in this dtype")
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    if device.type == "cuda":  # LyCORIS' autotuner measures kernels for minutes per new shape; its default choice
        os.environ.setdefault("LYCORIS_KERNEL_TUNE", "off")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    reps = args.reps or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    infer_reps = args.infer_reps or (3 if args.quick else 10)
    infer_warmup = 1  # the training rounds have warmed everything up already
    algos = tuple(a for a in args.algos.split(",") if a)
    libs = tuple(dict.fromkeys(["beyondlora", *[lib for lib in args.libs.split(",") if lib]]))
    known = {w.name: w for w in workloads(args.quick)}
    chosen = [w for w in args.workloads.split(",") if w]
    for name, allowed, what in ((algos, ALGOS, "algorithm"), (libs, LIBS, "library"), (chosen, known, "workload")):
        for item in name:
            if item not in allowed:
                parser.error(f"unknown {what} {item!r}")

    t_start = time.perf_counter()
    report: list[str] = []

    def progress(message: str) -> None:  # to stderr: the report on stdout stays clean
        print(f"[{time.perf_counter() - t_start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def emit(line: str = "") -> None:
        report.append(line)
        print(line, flush=True)

    command = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit(f"command: `{command.strip()}`  ")
    for line in env_lines(device, autocast):
        emit(line + "  ")
    emit(
        f"training: {warmup} warm-up + {reps} timed rounds, inference: {infer_warmup} + {infer_reps}; "
        "all variants of a workload timed round-robin in a shuffled order. Times are "
        + ("wall clock after synchronizing the GPU" if device.type == "cuda" else "this thread's CPU time")
        + " (medians; wall-clock overheads alongside), ± is the standard error of the overhead"
    )
    verdicts: list[str] = []
    for wl in (known[name] for name in chosen):
        torch.manual_seed(0)
        base = wl.make_base().to(device)
        progress(f"{wl.name}: checking that every library computes the same function")
        checks = check_equal(wl, algos, libs, base)
        progress(f"{wl.name}: building the variants")
        variants = build_variants(wl, algos, libs, base, args.extra_modes)
        x = torch.randn((args.batch, *wl.input_shape[1:]), device=device, requires_grad=True)
        for v in variants:
            v.saved_bytes = saved_bytes(v, x, autocast)
            if v.lib.startswith("beyondlora"):
                v.paths = f"{bl_paths(v, x, True, autocast)} / {bl_paths(v, x, False, autocast)}"
        for v in variants:
            v.model.train()
        progress(f"{wl.name}: timing {len(variants)} variants' training steps")
        round_robin(variants, functools.partial(train_step, autocast=autocast), x, warmup, reps, "train")
        progress(f"{wl.name}: timing inference")

        merged = []
        for v in variants:
            v.model.eval()
            if v.lib == "beyondlora":
                m = copy.deepcopy(v.model).merge_and_unload().eval()
                merged.append(Variant("beyondlora-merged", v.algo, m, []))
        step = functools.partial(infer_step, autocast=autocast)
        round_robin(variants + merged, step, x.detach(), infer_warmup, infer_reps, "infer")

        base_v = variants[0]
        merged_by_algo = {m.algo: m for m in merged}
        emit()
        emit(f"### {wl.name}: {wl.description}")
        emit()
        for line in checks:
            emit(f"- same function as beyondlora: {line}")
        emit()
        emit(
            "| algorithm | library | train step ms, median (IQR) | train overhead ± s.e. | train overhead, wall "
            "| saved for backward MB | inference ms | inference overhead | merged inference overhead "
            "| beyondlora path (train / infer) |"
        )
        emit("|---|---|---|---|---|---|---|---|---|---|")
        emit(
            f"| — | base (frozen) | {median(base_v.train.cpu) * 1e3:.1f} ({iqr(base_v.train.cpu) * 1e3:.1f}) | — | — "
            f"| {base_v.saved_bytes / 2**20:.2f} | {median(base_v.infer.cpu) * 1e3:.1f} | — | — | |"
        )
        by_key = {v.key: v for v in variants}
        base_ms = median(base_v.train.cpu) * 1e3
        floors = {algo: floor_ratio(by_key[("beyondlora", algo)].model, base_v.model, x) for algo in algos}
        for algo in algos:
            floor_pct = fmt_pct(100 * (floors[algo] - 1))
            emit(f"| {algo} | floor (multiply-adds) | {base_ms * floors[algo]:.1f} | {floor_pct} | | | | | | |")
            for v in [v for v in variants if v.algo == algo]:
                m = merged_by_algo.get(algo) if v.lib == "beyondlora" else None
                merged_cell = fmt_pct(*overhead(m.infer.cpu, base_v.infer.cpu)) if m else ""
                name = f"**{v.lib}**" if v.lib == "beyondlora" else v.lib
                emit(
                    f"| {algo} | {name} | {median(v.train.cpu) * 1e3:.1f} ({iqr(v.train.cpu) * 1e3:.1f}) "
                    f"| {fmt_pct(*overhead(v.train.cpu, base_v.train.cpu))} "
                    f"| {fmt_pct(overhead(v.train.wall, base_v.train.wall)[0])} | {v.saved_bytes / 2**20:.2f} "
                    f"| {median(v.infer.cpu) * 1e3:.1f} | {fmt_pct(*overhead(v.infer.cpu, base_v.infer.cpu))} "
                    f"| {merged_cell} | {v.paths} |"
                )
            ours = by_key[("beyondlora", algo)]
            ovh, se = overhead(ours.train.cpu, base_v.train.cpu)
            to_floor = (1 + ovh / 100) / floors[algo]
            peers = [by_key[(lib, algo)] for lib in libs[1:] if (lib, algo) in by_key]
            best = min(peers, key=lambda v: median(v.train.cpu), default=None)
            against_best = ""
            if best is not None:
                r, r_se = ratio(ours.train.cpu, best.train.cpu)
                against_best = f"; ×{r:.3f} ±{r_se:.3f} the best peer's ({best.lib})"
            verdicts.append(
                f"{wl.name}/{algo}: training step ×{to_floor:.2f} the floor ({fmt_pct(100 * (floors[algo] - 1))} "
                f"over the base), target ≤ ×{FLOOR_TARGET}: {'met' if to_floor <= FLOOR_TARGET else 'MISSED'}"
                + against_best
            )
            if algo in TARGETS:
                verdicts.append(
                    f"{wl.name}/{algo}: training overhead {fmt_pct(ovh, se)}, target ≤ {TARGETS[algo]:.0f}%: "
                    f"{judge(ovh, se, TARGETS[algo])}"
                )
            for other in ("peft", "lycoris-bypass", "lycoris"):
                theirs = by_key.get((other, algo))
                if theirs is None:
                    continue
                words = []
                for what, a, b in (("training step", ours.train.cpu, theirs.train.cpu),
                                   ("inference", ours.infer.cpu, theirs.infer.cpu)):  # fmt: skip
                    r, r_se = ratio(a, b)
                    verdict = judge(100 * (r - 1), 100 * r_se, 0.0)
                    word = {"met": "faster", "met (within noise)": "faster (within noise)",
                            "MISSED": "SLOWER", "MISSED (within noise)": "slower (within noise)"}[verdict]  # fmt: skip
                    noise = "" if math.isnan(r_se) else f" ±{r_se:.3f}"
                    words.append(f"{what} ×{r:.3f}{noise} → {word}")
                verdicts.append(f"{wl.name}/{algo} vs {other}: " + "; ".join(words))
            if algo != "lora" and ("beyondlora", "lora") in by_key:
                lora_bytes = by_key[("beyondlora", "lora")].saved_bytes
                ok = ours.saved_bytes <= lora_bytes
                verdicts.append(
                    f"{wl.name}/{algo}: saved for backward {ours.saved_bytes / 2**20:.2f} MB vs beyondlora LoRA's "
                    f"{lora_bytes / 2**20:.2f} MB: {'met' if ok else 'MISSED'}"
                )
        del variants, merged, by_key, base_v, merged_by_algo, ours
        gc.collect()

    if not args.no_unet:
        emit()
        emit("### SD-1.5-sized UNet (`diffusers.UNet2DConditionModel()`), LoKr r=8 on every Linear/Conv2d")
        progress("UNet: building, wrapping and merging")
        rows, info = unet_bench(args.quick, libs, args.unet_rounds, device)
        emit()
        emit(
            f"{info['params'] / 1e6:.0f}M parameters, {info['layers']} Linear/Conv2d layers "
            f"(built once in {info['build_s']:.1f} s, not counted); targets: {', '.join(info['suffixes'])}. "
            f"Seconds, thread CPU time / wall clock, best of {args.unet_rounds} round(s)."
        )
        emit()
        emit("| library | layers adapted | wrap s | merge_and_unload s |")
        emit("|---|---|---|---|")
        for row in rows:
            emit(row)

    emit()
    emit("### beyondlora: targets and comparisons")
    emit()
    for line in verdicts:
        emit(f"- {line}")
    emit()
    emit(f"total time {time.perf_counter() - t_start:.0f} s")
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
