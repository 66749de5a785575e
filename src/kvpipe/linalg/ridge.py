"""An out-of-core ridge map scout -> main, fitted and scored from sufficient statistics.

Statistics are accumulated shard by shard (Σx, Σy, XᵀX, XᵀY, Σ‖y‖², n):

    W = (Sxx + α I)⁻¹ Sxy,  b = ȳ - x̄ W,   Sxx = XᵀX - n x̄ᵀx̄,  Sxy = XᵀY - n x̄ᵀȳ

α is chosen by k-fold cross-validation over calibration *passages* (never questions or tokens),
using the exact held-out squared error computed from the folds' statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


def _feature_scale(stats: RidgeStats) -> float:
    """Mean per-feature scatter Σ(x - x̄)² (n × variance) of the rows summarised by stats: the α grid's unit."""
    mx = stats.sx / stats.n
    return max(float(np.trace(stats.sxx - stats.n * np.outer(mx, mx))) / stats.p, 1e-12)


def choose_alpha(folds: list[RidgeStats], grid: np.ndarray) -> float:
    """The α of grid (relative to the mean feature scatter) with least k-fold held-out error.

    Each held-out fold is scored with α scaled by the training folds' scatter only (the held-out
    rows never set the scale); the returned α is scaled by that of all folds, the rows the final
    map is fitted on.
    """
    errors = np.zeros(len(grid))
    for k, held in enumerate(folds):
        rest = pooled([f for j, f in enumerate(folds) if j != k])
        scale = _feature_scale(rest)
        errors += [squared_error(fit_ridge(rest, rel * scale), held) for rel in grid]
    return float(grid[int(np.argmin(errors))] * _feature_scale(pooled(folds)))


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


def dim_scores(Y_hat: np.ndarray, Y: np.ndarray, y_ref: np.ndarray) -> np.ndarray:
    """[q, 2]: per output dimension Σ squared error and Σ (y - y_ref)² over rows (additive over samples)."""
    return np.stack([np.sum((Y_hat - Y) ** 2, axis=0), np.sum((Y - y_ref) ** 2, axis=0)], axis=-1)


def r2_per_dim(scores: np.ndarray, groups: list[slice]) -> np.ndarray:
    """Per column group, the uniform mean over its dimensions of each dimension's centred R².

    scores: summed dim_scores [..., q, 2]; returns [..., groups]. Pooled R² weights dimensions by
    their variance, so a few high-variance channels can dominate it; this mean weights them alike.
    Dimensions with no variance about the reference are left out.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1 - scores[..., 0] / np.where(scores[..., 1] > 0, scores[..., 1], np.nan)
    return np.stack([_nanmean(r2[..., cols]) for cols in groups], axis=-1)


def _nanmean(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, x, 0).sum(-1) / ok.sum(-1)
