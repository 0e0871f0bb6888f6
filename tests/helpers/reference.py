"""Independent float64 reference formulas for every algorithm's ΔW, written without the library's ops.

Each function reads an adapter's parameters by their LyCORIS names and rebuilds ΔW with its own
arithmetic (explicit blocks, loops or einsum strings of its own), so a bug in the library's math
cannot hide in the reference.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


def _p(adapter: nn.Module, name: str) -> Tensor | None:
    value = getattr(adapter, name, None)
    return None if value is None else value.detach().double()


def reference_scale(adapter) -> float:
    if not adapter.has_rank:
        return 1.0
    r = adapter.options.r
    return adapter.options.alpha / (math.sqrt(r) if adapter.options.use_rslora else r)


def block_kron(small: Tensor, large: Tensor) -> Tensor:
    """Kronecker product assembled block by block: block (i, p) is ``small[i, p] * large``."""
    a, c = small.shape
    b, d = large.shape[:2]
    out = torch.zeros(a * b, c * d, *large.shape[2:], dtype=large.dtype, device=large.device)
    for i in range(a):
        for p in range(c):
            out[i * b : (i + 1) * b, p * d : (p + 1) * d] = small[i, p] * large
    return out


def cayley_rotations(blocks: Tensor, cap: float) -> Tensor:
    """LyCORIS' OFT rotations: Q = B − Bᵀ per block, scaled to Frobenius norm ``cap`` over all blocks together
    when ‖Q‖ + 1e-8 exceeds it (``cap`` 0: never), then R = (I + Q)(I − Q)⁻¹."""
    q = blocks - blocks.transpose(-1, -2)
    if cap > 0:
        norm = q.norm() + 1e-8
        if norm > cap:
            q = q * cap / norm
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rotated(adapter, base_weight: Tensor, rotation: Tensor) -> Tensor:
    """``rescale ⊙ (M W) − W`` for an (out × out) ``rotation`` M acting on W's rows."""
    w = base_weight.double()
    out = w.shape[0]
    rotated = (rotation @ w.reshape(out, -1)).reshape(w.shape)
    rescale = _p(adapter, "rescale")
    if rescale is not None:
        rotated = rescale.reshape(out, *([1] * (w.dim() - 1))) * rotated
    return rotated - w


def oft_rotation(adapter) -> Tensor:
    """Diag-OFT's (out × out) operator: blockdiag(R₁ᵀ, …, Rₙᵀ)."""
    cap = adapter.constraint * adapter.geometry.out_dim
    return torch.block_diag(*[r.t() for r in cayley_rotations(_p(adapter, "oft_blocks"), cap)])


def boft_rotation(adapter) -> Tensor:
    """BOFT's (out × out) operator: M = Sₘ ⋯ S₁, stage i = Pᵢᵀ blockdiag(R_i1, …) Pᵢ with Pᵢ the permutation
    that interleaves the two halves of every run of 2ᵏ·b/2 rows (k = i), so stage i mixes rows 2ⁱ·b/2 apart."""
    rotations = cayley_rotations(_p(adapter, "oft_blocks"), adapter.constraint * adapter.geometry.out_dim)
    stages, _, b, _ = rotations.shape
    out = adapter.geometry.out_dim
    operator = torch.eye(out, dtype=torch.float64, device=rotations.device)
    for i in range(stages):
        k = 2**i * (b // 2)
        order = torch.arange(out).reshape(-1, 2, k).transpose(1, 2).flatten()
        perm = torch.eye(out, dtype=torch.float64, device=rotations.device)[order]
        operator = perm.t() @ torch.block_diag(*rotations[i]) @ perm @ operator
    return operator


def reference_delta(adapter, base_weight: Tensor) -> Tensor:
    """ΔW (times the scale, without the multiplier) in canonical (out, in, *k) shape, float64."""
    shape = adapter.geometry.weight_shape
    s = reference_scale(adapter)
    algo = adapter.algorithm
    if algo in ("lora", "dylora"):
        up, down, mid = _p(adapter, "lora_up"), _p(adapter, "lora_down"), _p(adapter, "lora_mid")
        if mid is not None:
            return s * torch.einsum("or,rt...,ti->oi...", up, mid, down.reshape(down.shape[0], -1))
        return s * (up @ down.reshape(down.shape[0], -1)).reshape(shape)
    if algo == "loha":
        if adapter.tucker:
            halves = []
            for n in ("1", "2"):
                t, a, b = _p(adapter, f"hada_t{n}"), _p(adapter, f"hada_w{n}_a"), _p(adapter, f"hada_w{n}_b")
                halves.append(torch.einsum("xy...,xo,yi->oi...", t, a, b))
            return s * halves[0] * halves[1]
        first = _p(adapter, "hada_w1_a") @ _p(adapter, "hada_w1_b")
        second = _p(adapter, "hada_w2_a") @ _p(adapter, "hada_w2_b")
        return s * (first * second).reshape(shape)
    if algo == "lokr":
        w1 = _p(adapter, "lokr_w1")
        if w1 is None:
            w1 = _p(adapter, "lokr_w1_a") @ _p(adapter, "lokr_w1_b")
        w2 = _p(adapter, "lokr_w2")
        b, d = shape[0] // w1.shape[0], shape[1] // w1.shape[1]
        if w2 is None:
            if _p(adapter, "lokr_t2") is not None:
                w2 = torch.einsum(
                    "xy...,xo,yi->oi...", _p(adapter, "lokr_t2"), _p(adapter, "lokr_w2_a"), _p(adapter, "lokr_w2_b")
                )
            else:
                w2 = (_p(adapter, "lokr_w2_a") @ _p(adapter, "lokr_w2_b")).reshape(b, d, *shape[2:])
        return s * block_kron(w1, w2)
    if algo == "ia3":
        v = _p(adapter, "weight")
        w = base_weight.double()
        if adapter.on_input:  # output row o of group g reads that group's slice of the input channels
            per_group, groups = w.shape[1], adapter.geometry.groups
            rows = [v[(o * groups // w.shape[0]) * per_group :][:per_group] for o in range(w.shape[0])]
            return w * torch.stack(rows).reshape(*w.shape[:2], *([1] * (w.dim() - 2)))
        return w * v.reshape(-1, *([1] * (w.dim() - 1)))
    if algo == "oft":
        return _rotated(adapter, base_weight, oft_rotation(adapter))
    if algo == "boft":
        return _rotated(adapter, base_weight, boft_rotation(adapter))
    if algo == "glora":
        w = base_weight.double()
        a = _p(adapter, "a1").reshape(w.shape[1], -1) @ _p(adapter, "a2").reshape(-1, w.shape[1])
        w_a = torch.einsum("oi...,ij->oj...", w, a)
        b1, b2, bm = _p(adapter, "b1"), _p(adapter, "b2"), _p(adapter, "bm")
        if bm is not None:
            b = torch.einsum("or,rt...,ti->oi...", b1.reshape(shape[0], -1), bm, b2.reshape(bm.shape[1], -1))
        else:
            b = (b1.reshape(shape[0], -1) @ b2.reshape(b2.shape[0], -1)).reshape(shape)
        return s * (w_a + b)
    if algo == "full":
        return _p(adapter, "diff")
    if algo == "norm":
        return _p(adapter, "w_norm")
    raise AssertionError(algo)


def reference_bias_delta(adapter, base_bias: Tensor | None) -> Tensor | None:
    """Δb (without the multiplier), float64: Full's and Norm's own tensor, or for (IA)³ scaling the output with
    ``scale_bias`` (PEFT's meaning, (W x + b) ⊙ (1 + v)) the base bias times v."""
    if adapter.algorithm == "ia3":
        if base_bias is None or adapter.options.on_input or not adapter.options.scale_bias:
            return None
        return base_bias.double() * _p(adapter, "weight")
    name = {"full": "diff_b", "norm": "b_norm"}.get(adapter.algorithm)
    return None if name is None else _p(adapter, name)


def reference_effective_delta(adapter, base_weight: Tensor) -> Tensor:
    """What the adapter adds to W at its multiplier t: t·ΔW, or DoRA's t·(m (W+ΔW)/‖W+ΔW‖ − W)."""
    t = adapter.multiplier
    delta = reference_delta(adapter, base_weight)
    if adapter.dora_scale is None:
        return t * delta
    w = base_weight.double()
    merged = w + delta
    m = adapter.dora_scale.detach().double()
    if adapter.options.dora_on_output:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(m.shape)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(m.shape)
    norm = norm + torch.finfo(torch.float64).eps
    return t * (m * merged / norm - w)


def reference_module(base: nn.Module, adapters: list) -> nn.Module:
    """A float64 copy of ``base`` whose weights hold W + Σ effective ΔW: its own forward is the reference."""
    module = copy.deepcopy(base).double()
    transposed = type(base).__name__ in ("Conv1D", "Embedding")
    with torch.no_grad():
        weight = module.weight.t() if transposed else module.weight
        original = weight.clone()
        original_bias = None if getattr(module, "bias", None) is None else module.bias.clone()
        for adapter in adapters:
            weight += reference_effective_delta(adapter, original).reshape(weight.shape)
            bias_delta = reference_bias_delta(adapter, original_bias)
            if bias_delta is not None:
                module.bias += adapter.multiplier * bias_delta
    return module
