"""Linear CKA (Kornblith et al. 2019), biased and debiased.

CKA compares the token-by-token similarity structure of two representations X [n, p] and
Y [n, q] (rows are tokens):

    CKA = <K̃, L̃>_F / sqrt(<K̃, K̃>_F <L̃, L̃>_F),   K = X Xᵀ, L = Y Yᵀ

Biased: K̃ = H K H with H = I - 11ᵀ/n. With n ≪ p it is high for *any* pair of matrices.
Debiased: K̃ is the U-centred Gram matrix (Székely & Rizzo 2014), which makes <K̃, L̃>
proportional to the unbiased HSIC estimator (Song et al. 2012); independent X and Y then
give CKA ≈ 0 whatever n and p.
"""

from __future__ import annotations

import numpy as np


def center_gram(K: np.ndarray, debiased: bool = False) -> np.ndarray:
    """Double-centre (biased) or U-centre (debiased) a Gram matrix; returns a new float64 array."""
    K = np.array(K, dtype=np.float64)
    n = K.shape[0]
    if not debiased:
        mean_rows = K.mean(axis=0, keepdims=True)
        return K - mean_rows - mean_rows.T + K.mean()
    if n < 4:
        raise ValueError("debiased CKA needs at least 4 observations")
    np.fill_diagonal(K, 0.0)
    col = K.sum(axis=0, keepdims=True) / (n - 2)
    K = K - col - col.T + K.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(K, 0.0)
    return K


def centered_gram(X: np.ndarray, debiased: bool = False) -> np.ndarray:
    """Gram matrix X Xᵀ, double-centred (biased) or U-centred (debiased), in float64."""
    X = np.asarray(X, dtype=np.float64)
    return center_gram(X @ X.T, debiased)


def cka_from_grams(K: np.ndarray, L: np.ndarray) -> float:
    """CKA from two centred Gram matrices of the same kind (both biased or both debiased)."""
    kl = float(np.vdot(K, L))
    kk, ll = float(np.vdot(K, K)), float(np.vdot(L, L))
    if kk <= 0 or ll <= 0:
        return float("nan")
    return kl / np.sqrt(kk * ll)


def linear_cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA of two representations of the same rows (raw, uncentred inputs)."""
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must be 2-D with the same number of rows, got {X.shape} and {Y.shape}")
    return cka_from_grams(centered_gram(X, debiased), centered_gram(Y, debiased))
