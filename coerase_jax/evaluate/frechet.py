"""The Fréchet distance between two Gaussians fitted to image features (FID with Inception features).

    d² = |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)

tr((Σ₁Σ₂)^½) is computed as tr((Σ₁^½ Σ₂ Σ₁^½)^½) — the same eigenvalues, but a symmetric PSD matrix,
so both square roots come from ``eigh`` (no complex parts to discard, unlike ``sqrtm(Σ₁Σ₂)``).
"""

from __future__ import annotations

import numpy as np

from coerase_jax.errors import UserError


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, N ≥ 2, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UserError(f"Fréchet statistics need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"Fréchet distance of mismatched statistics: {mu1.shape} vs {mu2.shape}")
    root1 = _psd_sqrt(sigma1)
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0.0, None)))
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross
    return float(max(distance, 0.0))  # (identical sets can come out a round-off below zero)


def frechet_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The distance between two feature sets (FID when the features are Inception pool features)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
