"""An independent implementation of how Stable Diffusion UIs (ComfyUI / AUTOMATIC1111) apply a
LyCORIS / kohya single file: written from the file format alone, without the library's code."""

from __future__ import annotations

import torch
from torch import Tensor


def _tucker(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    # core (i, j, *k), out_factor (i, out), in_factor (j, in)
    return torch.einsum("ij...,jr,ip->pr...", core, in_factor, out_factor)


def _cayley_blocks(blocks: Tensor, alpha: Tensor | None, out: int) -> list[Tensor]:
    """One rotation per block, ``(I + Q)(I − Q)⁻¹`` with Q = B − Bᵀ, Q scaled to Frobenius norm alpha · out
    over all blocks together when above it (the files' alpha is the constraint; 0 or absent: no cap)."""
    flat = blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1])
    skews = [block - block.t() for block in flat]
    cap = 0.0 if alpha is None else alpha.item() * out
    total = torch.sqrt(sum((q * q).sum() for q in skews)) + 1e-8
    if cap > 0 and total > cap:
        skews = [q * (cap / total) for q in skews]
    eye = torch.eye(flat.shape[-1], dtype=flat.dtype)
    return [(eye + q) @ torch.linalg.inv(eye - q) for q in skews]


def _butterfly_permutation(out: int, half: int) -> Tensor:
    """P with (P y)[p] = y[row]: within each run of 2·half rows, position 2j + h takes row h·half + j."""
    perm = torch.zeros(out, out, dtype=torch.float64)
    for start in range(0, out, 2 * half):
        for j in range(half):
            for h in range(2):
                perm[start + 2 * j + h, start + h * half + j] = 1.0
    return perm


def _rotation_delta(p: dict[str, Tensor], weight: Tensor) -> Tensor:
    """OFT (3-D ``oft_blocks``: W' = blockdiag(Rᵀ) W) and BOFT (4-D: stage after stage Pᵀ blockdiag(R) P),
    then ``rescale`` per output row; ΔW = W' − W."""
    blocks, out = p["oft_blocks"], weight.shape[0]
    rotations = _cayley_blocks(blocks, p.get("alpha"), out)
    b = blocks.shape[-1]
    operator = torch.eye(out, dtype=torch.float64)
    if blocks.dim() == 3:
        operator = torch.block_diag(*[r.t() for r in rotations])
    else:
        stages, n = blocks.shape[:2]
        for i in range(stages):
            perm = _butterfly_permutation(out, 2**i * b // 2)
            operator = perm.t() @ torch.block_diag(*rotations[i * n : (i + 1) * n]) @ perm @ operator
    rotated = (operator @ weight.reshape(out, -1)).reshape(weight.shape)
    if "rescale" in p:
        rotated = p["rescale"].reshape(out, *([1] * (weight.dim() - 1))) * rotated
    return rotated - weight


def ui_delta(params: dict[str, Tensor], weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """(ΔW, Δb) a UI adds to ``weight`` (canonical (out, in, *k), float64) at strength 1."""
    p = {k: v.double() for k, v in params.items()}
    alpha = p.get("alpha")
    bias = None
    if "oft_blocks" in p:
        delta = _rotation_delta(p, weight.double())
    elif "lora_down.weight" in p:
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in p:
            delta = torch.einsum("or,rt...,ti->oi...", up.flatten(1), p["lora_mid.weight"], down.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
        delta = delta.reshape(weight.shape) * (alpha.item() / rank if alpha is not None else 1.0)
    elif "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            first = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            second = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            first = p["hada_w1_a"] @ p["hada_w1_b"]
            second = p["hada_w2_a"] @ p["hada_w2_b"]
        delta = (first * second).reshape(weight.shape) * (alpha.item() / rank if alpha is not None else 1.0)
    elif "lokr_w1" in p or "lokr_w1_a" in p:
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            dim = p["lokr_w1_b"].shape[0]
            w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None:
            dim = p["lokr_w2_b"].shape[0]
            if "lokr_t2" in p:
                w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        out_small, in_small = w1.shape
        w2 = w2.reshape(weight.shape[0] // out_small, weight.shape[1] // in_small, *weight.shape[2:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        scale = alpha.item() / dim if alpha is not None and dim is not None else 1.0
        delta = torch.kron(w1, w2.contiguous()) * scale  # torch.kron cannot view einsum strides
    elif "a1.weight" in p:
        # GLoRA: (alpha / r) · (W · a1 a2 + b1 b2), r = a2's first size; a1 a2 mixes W's input channels
        rank = p["a2.weight"].shape[0]
        mix = p["a1.weight"].flatten(1) @ p["a2.weight"].flatten(1)
        mixed = torch.einsum("oi...,ij->oj...", weight.double(), mix)
        b1, b2 = p["b1.weight"].flatten(1), p["b2.weight"].flatten(1)
        if "bm.weight" in p:
            lora = torch.einsum("ij...,ip,jq->pq...", p["bm.weight"], b1.t(), b2)
        else:
            lora = (b1 @ b2).reshape(weight.shape)
        delta = (mixed + lora) * (alpha.item() / rank if alpha is not None else 1.0)
    elif "diff" in p:
        delta = p["diff"].reshape(weight.shape)
        bias = p.get("diff_b")
    elif "w_norm" in p:
        delta = p["w_norm"].reshape(weight.shape)
        bias = p.get("b_norm")
    else:  # (IA)³
        scale = p["weight"].flatten()
        if int(p["on_input"].item()):
            delta = weight * scale.reshape(1, -1, *([1] * (weight.dim() - 2)))
        else:
            delta = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    if "dora_scale" in p:
        merged = weight + delta
        magnitude = p["dora_scale"]
        if magnitude.shape[0] == merged.shape[0]:
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (merged.dim() - 1)))
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, -1, *([1] * (merged.dim() - 2)))
        delta = merged * (magnitude / (norm + torch.finfo(merged.dtype).eps)) - weight
    return delta, bias


# --- each UI's own conventions, as documented facts (shared/FACTS.md, measured with their loader code) ---
def _without_dora(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in params.items() if k != "dora_scale"}


def comfyui_delta(params: dict[str, Tensor], weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """What ComfyUI adds: nothing for (IA)³ keys (it has no such adapter) nor for a LoKr with ``lokr_t2`` (its
    einsum + kron fails on torch 2.13; logged, weight left unchanged) nor for a GLoRA with a Tucker ``bm.weight``
    (it never reads bm: b1·b2 cannot take the kernel's shape; logged, weight left unchanged); output-axis DoRA
    normalised by ‖W‖ per output row instead of ‖W + ΔW‖; OFT and BOFT with ‖Q‖ capped at alpha itself rather
    than alpha · out, and OFT without its ``rescale`` (comfy/weight_adapter/oft.py, boft.py); everything else as
    :func:`ui_delta`."""
    if "on_input" in params or "lokr_t2" in params or "bm.weight" in params:
        return torch.zeros_like(weight, dtype=torch.float64), None
    if "oft_blocks" in params:
        comfy = dict(params)
        if "alpha" in comfy:
            comfy["alpha"] = comfy["alpha"].double() / weight.shape[0]
        if params["oft_blocks"].dim() == 3:
            comfy.pop("rescale", None)
        return ui_delta(comfy, weight)
    magnitude = params.get("dora_scale")
    if magnitude is None or magnitude.shape[0] == 1:  # none, or on the input axis: (1, in, …)
        return ui_delta(params, weight)
    delta, bias = ui_delta(_without_dora(params), weight)
    w = weight.double()
    norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    return (w + delta) * (magnitude.double().reshape(norm.shape) / norm) - w, bias


def a1111_delta(params: dict[str, Tensor], weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """What AUTOMATIC1111 (v1.10) adds for DoRA: it normalises per input channel whatever the magnitude's
    shape, so an output-axis (out, 1, …) magnitude broadcasts against the (1, in, …) norm; nothing for GLoRA
    (its formula b2·b1 + W·a2·a1 is an older layout's and raises on these tensors); everything else as
    :func:`ui_delta`."""
    if "a1.weight" in params:
        return torch.zeros_like(weight, dtype=torch.float64), None
    magnitude = params.get("dora_scale")
    if magnitude is None:
        return ui_delta(params, weight)
    delta, bias = ui_delta(_without_dora(params), weight)
    merged = weight.double() + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    norm = norm.reshape(1, -1, *([1] * (merged.dim() - 2)))
    return merged * (magnitude.double() / norm) - weight.double(), bias
