"""Statistics of cross-model KV structure: linear CKA and an out-of-core ridge map.

Linear CKA (Kornblith et al. 2019) compares the token-by-token similarity structure of two
representations X [n, p] and Y [n, q] (rows are tokens):

    CKA = <K̃, L̃>_F / sqrt(<K̃, K̃>_F <L̃, L̃>_F),   K = X Xᵀ, L = Y Yᵀ

Biased: K̃ = H K H with H = I - 11ᵀ/n. With n ≪ p it is high for *any* pair of matrices.
Debiased: K̃ is the U-centred Gram matrix (Székely & Rizzo 2014), which makes <K̃, L̃>
proportional to the unbiased HSIC estimator (Song et al. 2012); independent X and Y then
give CKA ≈ 0 whatever n and p.

Ridge map scout -> main with intercept, fitted from sufficient statistics accumulated
shard by shard (Σx, Σy, XᵀX, XᵀY, Σ‖y‖², n):

    W = (Sxx + α I)⁻¹ Sxy,  b = ȳ - x̄ W,   Sxx = XᵀX - n x̄ᵀx̄,  Sxy = XᵀY - n x̄ᵀȳ

α is chosen by k-fold cross-validation over calibration *samples* (never tokens), using the
exact held-out squared error computed from the folds' statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class RidgeStats:
    """Sufficient statistics of paired rows (x, y) for fitting and scoring a linear map."""

    p: int
    q: int
    n: int = 0
    sx: np.ndarray = field(init=False)
    sy: np.ndarray = field(init=False)
    sxx: np.ndarray = field(init=False)
    sxy: np.ndarray = field(init=False)
    syy: float = 0.0

    def __post_init__(self) -> None:
        self.sx, self.sy = np.zeros(self.p), np.zeros(self.q)
        self.sxx, self.sxy = np.zeros((self.p, self.p)), np.zeros((self.p, self.q))

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Accumulate a block of paired rows."""
        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        self.n += len(X)
        self.sx += X.sum(0)
        self.sy += Y.sum(0)
        self.sxx += X.T @ X
        self.sxy += X.T @ Y
        self.syy += float(np.einsum("ij,ij->", Y, Y))

    def __add__(self, other: RidgeStats) -> RidgeStats:
        out = RidgeStats(self.p, self.q)
        out.n, out.syy = self.n + other.n, self.syy + other.syy
        out.sx, out.sy = self.sx + other.sx, self.sy + other.sy
        out.sxx, out.sxy = self.sxx + other.sxx, self.sxy + other.sxy
        return out


@dataclass(frozen=True)
class LinearMap:
    """y ≈ x W + b."""

    W: np.ndarray
    b: np.ndarray
    alpha: float = 0.0

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float64) @ self.W + self.b


def pooled(parts: list[RidgeStats]) -> RidgeStats:
    """The statistics of all rows summarised by parts (e.g. the calibration folds)."""
    return sum(parts[1:], parts[0])


def fit_ridge(stats: RidgeStats, alpha: float) -> LinearMap:
    """Ridge regression with an unpenalised intercept from sufficient statistics."""
    if stats.n == 0:
        raise ValueError("no calibration rows")
    mx, my = stats.sx / stats.n, stats.sy / stats.n
    sxx = stats.sxx - stats.n * np.outer(mx, mx)
    sxy = stats.sxy - stats.n * np.outer(mx, my)
    W = np.linalg.solve(sxx + alpha * np.eye(stats.p), sxy)
    return LinearMap(W, my - mx @ W, alpha)


def squared_error(m: LinearMap, stats: RidgeStats) -> float:
    """Σ‖x W + b - y‖² over the rows summarised by stats, without the rows."""
    W, b = m.W, m.b
    return float(stats.syy - 2 * np.vdot(W, stats.sxy) - 2 * b @ stats.sy + np.vdot(W, stats.sxx @ W)
                 + 2 * b @ (stats.sx @ W) + stats.n * b @ b)


def choose_alpha(folds: list[RidgeStats], grid: np.ndarray) -> float:
    """The α of grid (relative to the mean feature variance) with least k-fold held-out error."""
    total = pooled(folds)
    mx = total.sx / total.n
    scale = max(float(np.trace(total.sxx - total.n * np.outer(mx, mx))) / total.p, 1e-12)
    errors = []
    for rel in grid:
        err = 0.0
        for k, held in enumerate(folds):
            rest = pooled([f for j, f in enumerate(folds) if j != k])
            err += squared_error(fit_ridge(rest, rel * scale), held)
        errors.append(err)
    return float(grid[int(np.argmin(errors))] * scale)


def mean_map(stats: RidgeStats) -> LinearMap:
    """The mean predictor: always the calibration mean of y."""
    return LinearMap(np.zeros((stats.p, stats.q)), stats.sy / stats.n)


def row_scores(Y_hat: np.ndarray, Y: np.ndarray, y_ref: np.ndarray, groups: list[slice]) -> np.ndarray:
    """Per column group: [Σ squared error, Σ ‖y - y_ref‖², Σ ‖y‖², Σ cosine(ŷ, y)] over rows.

    y_ref is the calibration mean: R² = 1 - SSE / Σ‖y - y_ref‖² is then the skill over the
    mean predictor (exactly 0 for it), and every statistic is additive over samples, so
    bootstrap resamples are sums.
    """
    out = np.empty((len(groups), 4))
    for g, cols in enumerate(groups):
        yh, y = Y_hat[:, cols], Y[:, cols]
        num = np.einsum("ij,ij->i", yh, y)
        den = np.linalg.norm(yh, axis=1) * np.linalg.norm(y, axis=1)
        out[g] = [np.sum((yh - y) ** 2), np.sum((y - y_ref[cols]) ** 2), np.sum(y * y),
                  np.sum(np.divide(num, den, out=np.zeros_like(num), where=den > 0))]
    return out


def metrics_from_scores(scores: np.ndarray, n_rows: np.ndarray) -> dict[str, np.ndarray]:
    """cosine, relative Frobenius error and centred R² from summed row_scores (any leading shape)."""
    sse, sst, syy, cos = (scores[..., i] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"cosine": cos / n_rows, "rel_error": np.sqrt(sse / syy), "r2": 1 - sse / sst}
