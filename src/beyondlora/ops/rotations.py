"""Block rotations for OFT and BOFT: the Cayley map with LyCORIS' norm constraint, block-diagonal and
butterfly rotations of a tensor's last axis, and the nearest rotation of a block (for extraction).

Every rotation here acts on the *last* axis of a tensor ``y`` (…, C): that is a layer's output channels in
activations, and the rows of a weight ``W`` (C, rest) once transposed, so the bypass (rotate ``W x``) and the
rebuild (rotate W's rows) share one code path.  No (C × C) matrix is ever built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: LyCORIS' guard in the constraint's norm, ‖Q‖ + ε
NORM_EPS = 1e-8


def cayley(blocks: Tensor, cap: float) -> Tensor:
    """Rotations ``R = (I + Q)(I − Q)⁻¹`` with ``Q = B − Bᵀ`` for blocks B (…, b, b).

    With ``cap > 0`` and ``‖Q‖_F + ε > cap`` (‖·‖ over *all* blocks together) Q is first scaled by
    ``cap / (‖Q‖_F + ε)`` (LyCORIS' constraint).  The scale is a clamp rather than a branch, so it never
    reads the norm back to the host.  Q is skew-symmetric, so I − Q is always invertible and R orthogonal.
    """
    q = blocks - blocks.transpose(-1, -2)
    if cap > 0:
        q = q * torch.clamp(cap / (q.norm() + NORM_EPS), max=1.0)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    # X (I − Q) = I + Q, solved rather than inverted
    return torch.linalg.solve(eye - q, eye + q, left=False)


def rotate_blocks(y: Tensor, rotations: Tensor, transposed: bool) -> Tensor:
    """``blockdiag(R₁, …, Rₙ) y`` along y's last axis (…, n·b) for rotations (n, b, b); with ``transposed``
    ``blockdiag(R₁ᵀ, …, Rₙᵀ) y`` (OFT's orientation).  One batched matmul over the n blocks."""
    n, b, _ = rotations.shape
    grid = y.reshape(*y.shape[:-1], n, b)
    # row vector times matrix: grid @ R gives Rᵀ y per block, grid @ Rᵀ gives R y
    out = torch.einsum("...kj,kji->...ki", grid, rotations if transposed else rotations.transpose(-1, -2))
    return out.reshape(y.shape)


def rotate_butterfly(y: Tensor, rotations: Tensor) -> Tensor:
    """``Sₘ ⋯ S₁ y`` along y's last axis (…, C) for butterfly rotations (m, n, b, b), n·b = C.

    Stage i (k = 2ⁱ·b/2) permutes the axis by ``order = arange(C).reshape(-1, 2, k).transpose(1, 2).flatten()``,
    applies ``blockdiag(R_i1, …, R_in)`` (not transposed) and permutes back.  No permutation is ever done:
    in y's own order a run of 2k channels is (h, g, l) of sizes (2, 2ⁱ, b/2), channel h·k + g·b/2 + l sits at
    position 2l + h of block g, so each stage is one einsum over y viewed as (…, runs, 2, 2ⁱ, b/2) with the
    stage's blocks viewed as (runs, 2ⁱ, b/2, 2, b/2, 2).
    """
    stages, _, b, _ = rotations.shape
    channels, lead, half = y.shape[-1], y.shape[:-1], b // 2
    for i in range(stages):
        groups = 2**i
        runs = channels // (2 * groups * half)
        grid = y.reshape(*lead, runs, 2, groups, half)
        blocks = rotations[i].reshape(runs, groups, half, 2, half, 2)
        y = torch.einsum("...rhgl,rgmnlh->...rngm", grid, blocks).reshape(*lead, channels)
    return y


def rotate_rows(weight: Tensor, rotate: Callable[[Tensor], Tensor]) -> Tensor:
    """``rotate`` (a function of a tensor's last axis) applied to the rows of ``weight`` (C, *rest)."""
    flat = weight.reshape(weight.shape[0], -1).t()
    return rotate(flat).t().reshape(weight.shape)


def nearest_rotation(matrices: Tensor) -> Tensor:
    """The proper rotation (det +1) nearest each matrix (…, b, b) in Frobenius norm: orthogonal Procrustes,
    ``U diag(1, …, 1, det(U Vᵀ)) Vᵀ`` from the SVD ``U Σ Vᵀ``."""
    u, _, vh = torch.linalg.svd(matrices)
    sign = torch.sign(torch.linalg.det(u @ vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1)
    return u @ vh


def inverse_cayley(rotations: Tensor) -> Tensor:
    """Blocks B with ``cayley(B, 0) = R`` for rotations R (…, b, b): ``Q = (R − I)(R + I)⁻¹`` and ``B = Q / 2``
    (B − Bᵀ = Q as Q is skew).  R + I must be invertible: no eigenvalue −1 (a half turn), which the Cayley
    map cannot reach."""
    eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype, device=rotations.device)
    q = torch.linalg.solve(rotations + eye, rotations - eye, left=False)
    return (q - q.transpose(-1, -2)) / 4
