"""Closed-form linear maps from sufficient statistics: per layer (ridge) or one map shared by all layers.

Shared map, per-layer intercepts: minimise Σ_j ‖X_j W + b_j − Y_j‖² + α‖W‖², so with each layer's
statistics centred on its own means, W = (Σ_j S_xx,j + α I)⁻¹ Σ_j S_xy,j and b_j = ȳ_j − x̄_j W.
α is chosen from a grid relative to the mean per-feature scatter by k-fold CV over calibration
passages, the held-out error computed exactly from the folds' statistics.
"""

from __future__ import annotations

import numpy as np

from kvpipe.linalg.ridge import LinearMap, RidgeStats, choose_alpha, fit_ridge, pooled, squared_error


def _centred(stats: RidgeStats) -> tuple[np.ndarray, np.ndarray]:
    mx, my = stats.sx / stats.n, stats.sy / stats.n
    return stats.sxx - stats.n * np.outer(mx, mx), stats.sxy - stats.n * np.outer(mx, my)


def scatter(stats: RidgeStats) -> float:
    """Σ‖y − ȳ‖² of the rows summarised by stats (the denominator of a relative error)."""
    return float(stats.syy - stats.sy @ stats.sy / stats.n)


def fit_shared(layers: list[RidgeStats], alpha: float) -> list[LinearMap]:
    """One W for every layer, each layer's intercept from its own means."""
    parts = [_centred(s) for s in layers]
    sxx, sxy = sum(p[0] for p in parts), sum(p[1] for p in parts)
    W = np.linalg.solve(sxx + alpha * np.eye(len(sxx)), sxy)
    return [LinearMap(W, s.sy / s.n - (s.sx / s.n) @ W, alpha) for s in layers]


def _shared_scale(layers: list[RidgeStats]) -> float:
    return max(sum(float(np.trace(_centred(s)[0])) for s in layers) / layers[0].p, 1e-12)


def choose_shared_alpha(folds: list[list[RidgeStats]], grid: np.ndarray) -> float:
    """α (absolute) of the grid with least held-out error; folds[f][j] = fold f's statistics of layer j."""
    errors = np.zeros(len(grid))
    for k, held in enumerate(folds):
        rest = [pooled([folds[f][j] for f in range(len(folds)) if f != k]) for j in range(len(held))]
        scale = _shared_scale(rest)
        for g, rel in enumerate(grid):
            maps = fit_shared(rest, rel * scale)
            errors[g] += sum(squared_error(m, h) for m, h in zip(maps, held, strict=True))
    everything = [pooled([folds[f][j] for f in range(len(folds))]) for j in range(len(folds[0]))]
    return float(grid[int(np.argmin(errors))] * _shared_scale(everything))


def ridge_cv_error(folds: list[RidgeStats], alpha: float) -> tuple[float, float]:
    """Held-out (Σ SSE, Σ scatter) of k-fold CV at a fixed α (each fold predicted from the others)."""
    sse = sst = 0.0
    for k, held in enumerate(folds):
        rest = pooled([f for j, f in enumerate(folds) if j != k])
        sse += squared_error(fit_ridge(rest, alpha), held)
        sst += scatter(held)
    return sse, sst


def fit_per_layer(folds: list[RidgeStats], grid: np.ndarray) -> LinearMap:
    """Ridge on all the folds, α by CV over them."""
    return fit_ridge(pooled(folds), choose_alpha(folds, grid))
