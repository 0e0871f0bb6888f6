"""Every metric against a separate numpy transcription of its formula on fixed features, plus the known values:
Vendi of identical rows 1 and of orthonormal rows n, FD of a set with itself 0, KID near 0 for one distribution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from beyondlora.evaluation import metrics

RNG = np.random.default_rng(7)
A = RNG.normal(size=(6, 5))
B = RNG.normal(size=(4, 5)) + 0.5


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float()


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_image_similarity_is_the_mean_cosine_over_all_pairs() -> None:
    cosines = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.product(A, B)]
    assert metrics.image_similarity(_t(A), _t(B)) == pytest.approx(np.mean(cosines), abs=1e-6)


def test_centroid_distance_is_the_squared_gap_of_normalised_means() -> None:
    gap = _unit(A).mean(axis=0) - _unit(B).mean(axis=0)
    assert metrics.centroid_distance(_t(A), _t(B)) == pytest.approx(float(np.sum(gap**2)), abs=1e-6)


def test_vendi_score() -> None:
    # through the feature covariance: XᵀX/n has the same non-zero eigenvalues as XXᵀ/n
    unit = _unit(A)
    eigenvalues = np.linalg.eigvalsh(unit.T @ unit / len(unit))
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    assert metrics.vendi_score(_t(A)) == pytest.approx(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))), rel=1e-5)
    assert metrics.vendi_score(torch.ones(5, 3) * 2.5) == pytest.approx(1.0, abs=1e-9)
    orthonormal, _ = np.linalg.qr(RNG.normal(size=(8, 8)))
    assert metrics.vendi_score(_t(orthonormal[:5])) == pytest.approx(5.0, rel=1e-5)


def _numpy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # Tr((Σx Σy)^½) = Σ √λ over the eigenvalues of the (non-symmetric) product
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvals(cov_x @ cov_y).real, 0, None)))
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cov_x) + np.trace(cov_y) - 2 * cross)


def test_frechet_distance() -> None:
    x, y = RNG.normal(size=(40, 4)), RNG.normal(size=(30, 4)) * 1.5 + 1
    assert metrics.frechet_distance(_t(x), _t(y)) == pytest.approx(_numpy_frechet(x, y), rel=1e-4)
    assert metrics.frechet_distance(_t(x), _t(x)) == pytest.approx(0.0, abs=1e-5)
    # fewer images than dimensions: a singular covariance still gives a finite, matching value
    assert metrics.frechet_distance(_t(A), _t(B)) == pytest.approx(_numpy_frechet(A, B), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        metrics.frechet_distance(_t(A[:1]), _t(B))


def _numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (np.dot(a, b) / d + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_kid() -> None:
    assert metrics.kernel_inception_distance(_t(A), _t(B)) == pytest.approx(_numpy_kid(A, B), rel=1e-5)
    # unbiased: two samples of one distribution score near 0, far below two distributions
    first, second = RNG.normal(size=(300, 8)), RNG.normal(size=(300, 8))
    same = metrics.kernel_inception_distance(_t(first), _t(second))
    apart = metrics.kernel_inception_distance(_t(first), _t(second + 1.0))
    assert abs(same) < 0.02 * apart
    # a set against itself: only the diagonal terms the unbiased sums leave out, O(1/n)
    assert abs(metrics.kernel_inception_distance(_t(first), _t(first))) < 0.02 * apart


def test_paired_cosine_style_loss_and_text_similarity() -> None:
    other = A + RNG.normal(size=A.shape) * 0.3
    expected = np.mean([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(A, other, strict=True)])
    assert metrics.paired_cosine(_t(A), _t(other)) == pytest.approx(expected, abs=1e-6)
    assert metrics.text_similarity(_t(A), _t(other)) == pytest.approx(expected, abs=1e-6)
    assert metrics.paired_cosine(_t(A), _t(A)) == pytest.approx(1.0, abs=1e-9)
    tokens_a, tokens_b = RNG.normal(size=(3, 10, 4)), RNG.normal(size=(3, 10, 4))
    losses = []
    for a, b in zip(tokens_a, tokens_b, strict=True):
        gram_a = np.einsum("tc,td->cd", a, a) / 10
        gram_b = np.einsum("tc,td->cd", b, b) / 10
        losses.append(np.sum((gram_a - gram_b) ** 2) / 16)
    assert metrics.style_loss(_t(tokens_a), _t(tokens_b)) == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics.style_loss(_t(tokens_a), _t(tokens_a)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.paired_cosine(_t(A), _t(B))


def test_quality_is_the_softmax_probability_of_the_good_prompt() -> None:
    good, bad = RNG.normal(size=5), RNG.normal(size=5)
    expected = []
    for image in A:
        logits = 100 * np.array([np.dot(_unit(image[None])[0], _unit(t[None])[0]) for t in (good, bad)])
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        expected.append(probabilities[0])
    assert metrics.quality_score(_t(A), _t(good), _t(bad)) == pytest.approx(np.mean(expected), abs=1e-5)
