"""Fused Triton kernels against the eager bypass: LoKr and LoHa training steps on one linear layer (issue #22).

Each case is an adapted ``nn.Linear(width, width)`` on its bypass (``forward_mode="bypass"``), trained on
``tokens`` rows of input (forward and backward, input gradient included) under autocast; ``BEYONDLORA_FUSED``
switches the kernels on and off between variants, timed round-robin (warm-up rounds first, then the median
of the timed ones, wall clock after synchronizing the GPU).  Before timing, the fused step's output and
gradients are compared with the eager step's.  The report gives each variant's step time, its overhead
over the frozen base layer's step, the fused speed-up over eager, and each variant's peak memory above the
inputs.

Needs a CUDA device and Triton; elsewhere it says so and exits without timing anything::

    .venv/bin/python benchmarks/bench_fused.py                      # SDXL/Flux-like widths, 4k and 16k tokens
    .venv/bin/python benchmarks/bench_fused.py --widths 1280 --tokens 4096 --reps 10
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import beyondlora as bl

#: (name, config) per algorithm at its usual ranks: LoKr with W2 decomposed (rank 8 and 16) and full, LoHa
CASES: dict[str, Callable[[], object]] = {
    "lokr r8": lambda: bl.LoKrConfig(r=8, target_modules=["0"], init_weights=False, forward_mode="bypass"),
    "lokr r16": lambda: bl.LoKrConfig(r=16, target_modules=["0"], init_weights=False, forward_mode="bypass"),
    "lokr full W2": lambda: bl.LoKrConfig(r=10_000, target_modules=["0"], init_weights=False, forward_mode="bypass"),
    "loha r8": lambda: bl.LoHaConfig(r=8, target_modules=["0"], init_weights=False, forward_mode="bypass"),
    "loha r16": lambda: bl.LoHaConfig(r=16, target_modules=["0"], init_weights=False, forward_mode="bypass"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """One training step's output and gradients (input and trainable parameters)."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad, *[p.grad for p in model.parameters() if p.requires_grad]]


def _with_fused(setting: str, fn: Callable[[], object]) -> object:
    previous = os.environ.get("BEYONDLORA_FUSED")
    os.environ["BEYONDLORA_FUSED"] = setting
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["BEYONDLORA_FUSED"]
        else:
            os.environ["BEYONDLORA_FUSED"] = previous


def _timed(fn: Callable[[], object]) -> tuple[float, int]:
    """Wall-clock seconds of ``fn`` after synchronizing, and the peak memory it allocated above the start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - start_bytes


def bench_case(name: str, width: int, tokens: int, args: argparse.Namespace) -> str:
    """One markdown row: step times (ms) of the base, eager and fused, overheads, speed-up, peak memory."""
    torch.manual_seed(0)
    dtype = DTYPES[args.autocast]
    base = nn.Sequential(nn.Linear(width, width)).cuda()
    model = bl.get_peft_model(copy.deepcopy(base), CASES[name]())
    x = torch.randn(tokens, width, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, width, device="cuda", dtype=dtype)
    fused = _with_fused("1", lambda: _step(model, x, grad, dtype))
    eager = _with_fused("0", lambda: _step(model, x, grad, dtype))
    worst = max(((f - e).abs().max() / e.abs().max()).item() for f, e in zip(fused, eager, strict=True))
    variants = {
        "base": lambda: _step(base, x, grad, dtype),
        "eager": lambda: _with_fused("0", lambda: _step(model, x, grad, dtype)),
        "fused": lambda: _with_fused("1", lambda: _step(model, x, grad, dtype)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, int] = dict.fromkeys(variants, 0)
    order, shuffle = list(variants), random.Random(0).shuffle
    for round_ in range(args.warmup + args.reps):
        shuffle(order)  # a fresh order every round: drift hits every variant alike
        for key in order:
            seconds, peak = _timed(variants[key])
            peaks[key] = max(peaks[key], peak)
            if round_ >= args.warmup:
                times[key].append(seconds)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    over = {k: 100 * (ms[k] / ms["base"] - 1) for k in ("eager", "fused")}
    mib = {k: v / 2**20 for k, v in peaks.items()}
    return (
        f"| {name} | {width} | {tokens} | {ms['base']:.3f} | {ms['eager']:.3f} (+{over['eager']:.0f} %) | "
        f"{ms['fused']:.3f} (+{over['fused']:.0f} %) | ×{ms['eager'] / ms['fused']:.2f} | "
        f"{mib['eager']:.0f} / {mib['fused']:.0f} | {worst:.1e} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="1280,3072", help="layer widths (in = out), comma-separated")
    parser.add_argument("--tokens", default="4096,16384", help="rows of input per step, comma-separated")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--autocast", choices=tuple(DTYPES), default="bf16", help="autocast dtype (default bf16)")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the fused kernels run on CUDA tensors only, nothing timed")
        return 0
    try:
        import triton  # noqa: F401  (the kernels' dependency; the eager path needs none)
    except ImportError:
        print("Triton is not installed: the fused kernels cannot run, nothing timed")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, autocast {args.autocast}\n")
    print("| case | width | tokens | base ms | eager ms (overhead) | fused ms (overhead) | fused speed-up "
          "| peak MiB eager / fused | max rel. diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for name in args.cases.split(","):
                print(bench_case(name, width, tokens, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
