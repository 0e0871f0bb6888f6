"""Compiles the fused kernels for NVIDIA GPUs without one: Triton's own compiler (and the ptxas it ships) down to
a cubin, at the largest shapes the dispatch sends them, the way a GPU's first launch would.

Triton's interpreter, where tests/ops/test_triton_kernels.py runs the kernels on the CPU, accepts programs
the compiler rejects (a loop-carried value changing shape, a product side under 16), so this catches what
the interpreter cannot.  Run without ``TRITON_INTERPRET`` (the kernels must be decorated as compiled ones)::

    python tests/ops/triton_compile.py            # bfloat16 on sm_90 (H100): what the test runs
    python tests/ops/triton_compile.py --all      # also float32 and float16, and sm_80 (A100)

Prints each kernel's shared memory; exits non-zero on the first kernel that does not compile.
"""

from __future__ import annotations

import argparse
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from beyondlora.ops import triton_khatri_rao, triton_kron

DTYPES = ("bf16", "fp16", "fp32")


def _signature(kernel, dtype: str, constexprs: dict[str, object]) -> dict[str, str]:
    """Pointers ``*_ptr`` in the compute dtype (the partial sums ``p*_ptr`` in float32), ``alpha`` a float,
    every other argument an int32 (sizes and strides)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name.startswith("p") else f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "alpha" else "i32"
    return signature


def cases() -> list[tuple[str, object, dict[str, object], int]]:
    """(name, kernel, constexprs, warps) at the largest supported shapes: W1's sides and W2's rank at the limits,
    the rank product r1·r2 at its limit; products in "ieee" precision (what float32 takes without TF32)."""
    precision = "ieee"
    limits = (triton_kron.MAX_GROUPS, triton_kron.MAX_GROUPS, triton_kron.MAX_RANK)
    kron, kron_grads = triton_kron._blocks(*limits), triton_kron._blocks(*limits, grads=True)
    r1p, r2p = triton_khatri_rao._rank_blocks(16, 16)
    loha = {
        "BN": triton_khatri_rao.BLOCK_N, "R1P": r1p, "R2P": r2p, "BK": triton_khatri_rao.BLOCK_K,
        "BO": triton_khatri_rao.BLOCK_O, "PREC": precision,
    }  # fmt: skip
    found = []
    for full in (False, True):
        mode = "full W2" if full else "decomposed W2"
        blocks = {**kron, "FULL": full, "PREC": precision}
        found.append((f"LoKr forward, {mode}", triton_kron._kron_apply_kernel, {**blocks, "HAS_RES": True}, 4))
        backward = {**kron_grads, "FULL": full, "PREC": precision, "NEED_X": True}
        found.append((f"LoKr backward, {mode}", triton_kron._kron_grads_kernel, backward, triton_kron.GRAD_WARPS))
    found.append(("LoHa forward", triton_khatri_rao._khatri_rao_apply_kernel, {**loha, "HAS_RES": True}, 4))
    backward = {**loha, "NEED_X": True, "BN": triton_khatri_rao.grad_tokens(r1p, r2p)}
    found.append(("LoHa backward", triton_khatri_rao._khatri_rao_grads_kernel, backward, triton_khatri_rao.GRAD_WARPS))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every dtype, and sm_80 as well as sm_90")
    args = parser.parse_args(argv)
    archs = (90, 80) if args.all else (90,)
    dtypes = DTYPES if args.all else ("bf16",)
    for arch in archs:
        for dtype in dtypes:
            for name, kernel, constexprs, warps in cases():
                start = time.perf_counter()
                source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                seconds = time.perf_counter() - start
                print(f"sm_{arch} {dtype} {name}: {compiled.metadata.shared} bytes shared, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
