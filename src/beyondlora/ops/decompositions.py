r"""Low-rank, Tucker and Kronecker approximations of a weight difference: the math behind extract and resize.

**SVD.** For ΔW (m × n) = U Σ Vᵀ with σ₁ ≥ σ₂ ≥ …, the best rank-r approximation in the Frobenius and
spectral norms is U_r Σ_r V_rᵀ (Eckart–Young), with ‖ΔW − ΔW_r‖_F = √(Σ_{i>r} σᵢ²).  It is stored
balanced, ``up = U_r Σ_r^½`` (m × r) and ``down = Σ_r^½ V_rᵀ`` (r × n), so both factors have the same
scale (what a half-precision file wants).  When only the top r triplets are needed and r ≪ min(m, n), a
randomized SVD (Halko, Martinsson & Tropp 2011; q = r + 8 samples, 4 power iterations) gives them at
O(mnr) cost; it is exact (up to rounding) when rank(ΔW) ≤ q.

**Rank selection** on σ (clamped to [1, len σ]):

- ``fixed`` N: r = N;
- ``threshold`` X: r = #{σᵢ > X};
- ``ratio`` / ``sv_ratio`` X: r = #{σᵢ > σ₁ / X};
- ``quantile`` / ``sv_cumulative`` X: the smallest r with Σ_{i≤r} σᵢ ≥ X · Σ σᵢ;
- ``sv_fro`` X: the smallest r with √(Σ_{i≤r} σᵢ² / Σ σᵢ²) ≥ X (the kept share of ‖ΔW‖_F).

**Tucker-2 (HOSVD)** of a conv ΔW (out, in, \*k): U_o are the top-r left singular vectors of the mode-0
unfolding (out, in·K), U_i those of the mode-1 unfolding (in, out·K), and the core is
``core[i, j, κ] = Σ_{p,q} U_o[p, i] ΔW[p, q, κ] U_i[q, j]``; ΔW ≈ core ×₀ U_o ×₁ U_i, exact when both
multilinear ranks are ≤ r.

**Nearest Kronecker product** (Van Loan & Pitsianis 1993).  With out = a·b, in = c·d, the rearrangement
``R[i·c + p, (j·d + q)·K + κ] = ΔW[i·b + j, p·d + q, κ]`` (shape (a·c, b·d·K)) has the same entries as ΔW
and maps ``W1 ⊗ W2`` (W1 (a, c), W2 (b, d, \*k)) to the rank-one ``vec(W1) vec(W2)ᵀ``.  So
min ‖ΔW − W1 ⊗ W2‖_F = min ‖R − vec(W1) vec(W2)ᵀ‖_F, solved by R's top singular triplet:
vec(W1) = √σ₁ u₁, vec(W2) = √σ₁ v₁, with error √(Σ_{i>1} σᵢ(R)²).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("fixed", "threshold", "ratio", "quantile", "sv_ratio", "sv_cumulative", "sv_fro")


def svd(matrix: Tensor, rank: int | None = None, exact: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, Vh)``; with ``rank`` given, the top ``rank`` triplets (randomized when cheaper)."""
    small = min(matrix.shape)
    if rank is not None and not exact and 4 * (rank + 8) <= small:
        u, s, v = torch.svd_lowrank(matrix, q=rank + 8, niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is not None:
        return u[:, :rank], s[:rank], vh[:rank]
    return u, s, vh


def check_mode(mode: str, param: float | None) -> None:
    """Raise ``ValueError`` for an unknown mode or a parameter outside its range."""
    if mode not in MODES:
        raise ValueError(f"unknown rank-selection mode {mode!r}; choose one of {', '.join(MODES)}")
    if param is None:
        raise ValueError(f"rank-selection mode {mode!r} needs a parameter")
    if mode == "fixed" and (param < 1 or param != int(param)):
        raise ValueError(f"a fixed rank must be a positive integer, got {param}")
    if mode in ("ratio", "sv_ratio") and param < 1:
        raise ValueError(f"{mode} keeps σ > σ_max / X: X must be ≥ 1, got {param}")
    if mode in ("quantile", "sv_cumulative", "sv_fro") and not 0 < param <= 1:
        raise ValueError(f"{mode} is a share of the spectrum in (0, 1], got {param}")
    if mode == "threshold" and param < 0:
        raise ValueError(f"threshold must be ≥ 0, got {param}")


def select_rank(singular_values: Tensor, mode: str, param: float) -> int:
    """The rank the mode keeps for these singular values (descending), clamped to [1, len]."""
    s = singular_values.detach().double().cpu()
    n = s.numel()
    if n == 0 or s[0] <= 0:
        return 1
    if mode == "fixed":
        rank = int(param)
    elif mode == "threshold":
        rank = int((s > param).sum())
    elif mode in ("ratio", "sv_ratio"):
        rank = int((s > s[0] / param).sum())
    elif mode in ("quantile", "sv_cumulative"):
        share = torch.cumsum(s, 0) / s.sum()
        rank = int((share < param - 1e-12).sum()) + 1
    elif mode == "sv_fro":
        share = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
        rank = int((share < param - 1e-12).sum()) + 1
    else:
        raise ValueError(f"unknown rank-selection mode {mode!r}")
    return max(1, min(rank, n))


def split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors ``(U_r Σ_r^½, Σ_r^½ V_rᵀ)`` of the rank-``rank`` truncation."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def low_rank_factors(matrix: Tensor, rank: int, exact: bool = False) -> tuple[Tensor, Tensor]:
    """Balanced ``(up (m, r), down (r, n))`` of ``matrix``'s best rank-r approximation, r ≤ min(m, n)."""
    rank = min(rank, min(matrix.shape))
    u, s, vh = svd(matrix, rank, exact)
    return split(u, s, vh, rank)


def tucker2(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """HOSVD ``(core (r, r, *k), U_o (out, r), U_i (in, r))`` of a conv ΔW (out, in, *k), r ≤ min(out, in)."""
    out_dim, in_dim = delta.shape[:2]
    u_out = torch.linalg.svd(delta.reshape(out_dim, -1), full_matrices=False)[0][:, :rank]
    u_in = torch.linalg.svd(delta.transpose(0, 1).reshape(in_dim, -1), full_matrices=False)[0][:, :rank]
    core = torch.einsum("pq...,pi,qj->ij...", delta, u_out, u_in)
    return core, u_out, u_in


def kronecker_rearrange(delta: Tensor, out_factors: tuple[int, int], in_factors: tuple[int, int]) -> Tensor:
    """The Van Loan–Pitsianis rearrangement R (a·c, b·d·K) of ΔW (a·b, c·d, *k) (see the module docstring)."""
    (a, b), (c, d) = out_factors, in_factors
    kernel = math.prod(delta.shape[2:])
    return delta.reshape(a, b, c, d, kernel).permute(0, 2, 1, 3, 4).reshape(a * c, b * d * kernel)


def nearest_kronecker(
    delta: Tensor, out_factors: tuple[int, int], in_factors: tuple[int, int], exact: bool = False
) -> tuple[Tensor, Tensor]:
    """``(W1 (a, c), W2 (b, d, *k))`` minimizing ‖ΔW − W1 ⊗ W2‖_F."""
    (a, b), (c, d) = out_factors, in_factors
    u, s, vh = svd(kronecker_rearrange(delta, out_factors, in_factors), rank=1, exact=exact)
    root = s[0].sqrt()
    return (u[:, 0] * root).reshape(a, c), (vh[0] * root).reshape(b, d, *delta.shape[2:])
