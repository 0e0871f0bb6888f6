"""The evaluation's metrics, as pure functions of feature tensors (float64 inside, Python floats out).

Feature sets are (N, D) tensors, one row per image; "normalised" rows are divided by their L2 norm.  The
formulas follow the LyCORIS paper's evaluation framework (arXiv 2309.14859) and the papers each metric
comes from: Vendi (Friedman & Dieng 2023), Fréchet distance (Heusel et al. 2017), KID (Bińkowski et al.
2018), Gram-matrix style loss (Gatys et al. 2016).
"""

from __future__ import annotations

import torch


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Rows of ``features`` (N, D) divided by their L2 norm, in float64; an all-zero row stays zero."""
    rows = features.double()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine over all pairs: (1 / (N·M)) Σᵢ Σⱼ ⟨ĝᵢ, r̂ⱼ⟩ for ``generated`` (N, D) and ``reference``
    (M, D), with hats the normalised rows."""
    return float((normalise(generated) @ normalise(reference).T).mean())


def centroid_distance(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Squared distance of the centroids of the normalised features: ‖mean ĝ − mean r̂‖²."""
    gap = normalise(generated).mean(dim=0) - normalise(reference).mean(dim=0)
    return float(gap @ gap)


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score of ``features`` (N, D): exp(−Σ λ log λ) over the eigenvalues λ of K / N, where
    K = X̂ X̂ᵀ is the cosine-similarity kernel (ones on its diagonal, so the λ sum to 1).  N identical rows
    give 1, N orthogonal rows give N: the effective number of distinct images."""
    rows = normalise(features)
    eigenvalues = torch.linalg.eigvalsh(rows @ rows.T / rows.shape[0]).clamp_min(0)
    positive = eigenvalues[eigenvalues > 1e-12]  # 0 · log 0 = 0
    return float(torch.exp(-(positive * positive.log()).sum()))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric positive semi-definite square root (negative round-off eigenvalues clipped to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to (N, D) and (M, D) features (unnormalised, as FID does):
    ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), sample covariances with N − 1 (resp. M − 1).  The
    symmetric form of the cross term equals Tr((Σ₁Σ₂)^½) and needs only symmetric eigendecompositions."""
    if first.shape[0] < 2 or second.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least two images per set")
    a, b = first.double(), second.double()
    mean_gap = a.mean(dim=0) - b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float(mean_gap @ mean_gap + cov_a.trace() + cov_b.trace() - 2 * cross)


def kernel_inception_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """KID: the unbiased estimate of the squared MMD between (N, D) and (M, D) features with the cubic
    polynomial kernel k(x, y) = (xᵀy / D + 1)³:
    Σ_{i≠j} k(xᵢ, xⱼ) / (N(N−1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (M(M−1)) − 2 Σᵢⱼ k(xᵢ, yⱼ) / (NM)."""
    if first.shape[0] < 2 or second.shape[0] < 2:
        raise ValueError("KID needs at least two images per set")
    x, y = first.double(), second.double()
    dim = x.shape[1]
    k_xx, k_yy, k_xy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    n, m = x.shape[0], y.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def paired_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean cosine of matching rows: (1/N) Σᵢ ⟨âᵢ, b̂ᵢ⟩ for two (N, D) sets (image i of one against image i of
    the other: same prompt, same seed).  1 when the sets are equal."""
    if first.shape != second.shape:
        raise ValueError(f"paired features differ in shape: {tuple(first.shape)} and {tuple(second.shape)}")
    return float((normalise(first) * normalise(second)).sum(dim=1).mean())


def gram_matrices(tokens: torch.Tensor) -> torch.Tensor:
    """Gram matrices G = Fᵀ F / T of spatial features ``tokens`` (N, T, D): (N, D, D), channel
    co-occurrence averaged over the T positions (what a style is, content aside)."""
    rows = tokens.double()
    return rows.transpose(1, 2) @ rows / rows.shape[1]


def style_loss(first: torch.Tensor, second: torch.Tensor) -> float:
    """Gram-matrix style loss of paired spatial features (N, T, D): (1/N) Σᵢ ‖G(aᵢ) − G(bᵢ)‖²_F / D²."""
    if first.shape != second.shape:
        raise ValueError(f"paired features differ in shape: {tuple(first.shape)} and {tuple(second.shape)}")
    gap = gram_matrices(first) - gram_matrices(second)
    return float((gap**2).sum(dim=(1, 2)).mean() / first.shape[-1] ** 2)


def text_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Mean CLIP score: (1/N) Σᵢ ⟨îᵢ, t̂ᵢ⟩ for images (N, D) and the embeddings (N, D) of their own prompts."""
    return paired_cosine(image_features, text_features)


def quality_score(image_features: torch.Tensor, good: torch.Tensor, bad: torch.Tensor, scale: float = 100.0) -> float:
    """Mean probability that an image fits the prompt ``good`` rather than ``bad`` (CLIP-IQA's antonym test):
    softmax over (s·⟨î, ĝ⟩, s·⟨î, b̂⟩) with s = ``scale`` (CLIP's logit scale); (N, D) images, (D,) texts."""
    texts = normalise(torch.stack([good, bad]))
    logits = scale * normalise(image_features) @ texts.T
    return float(torch.softmax(logits, dim=1)[:, 0].mean())
