"""Regularised CCA of a scout layer and a main layer (SVCCA-style), fitted and scored out of core.

Fitted on calibration tokens from the sufficient statistics the stage accumulates anyway
(kvpipe.linalg.ridge.RidgeStats of (scout, main) rows and of (main, main) rows, whose XᵀX is
the main's YᵀY):

  1. SVD reduction: each side's covariance C = (XᵀX − n x̄ᵀx̄) / (n − 1) is eigendecomposed and
     the centred rows are projected on its top `components` eigenvectors P (the top right
     singular vectors of the centred rows), at most the side's width, with variances Λ;
  2. regularised CCA of the reduced rows: Λ̂ = Λ + r · mean(Λ) I on each side (r the relative
     ridge), K = Λ̂x^{-½} Pxᵀ Cxy Py Λ̂y^{-½} = U S Vᵀ; canonical directions A = Px Λ̂x^{-½} U and
     B = Py Λ̂y^{-½} V, first `top` columns (those of the largest calibration correlations S).

Scored on test tokens with the calibration means and directions: u = (x − x̄) A, v = (y − ȳ) B,
and each canonical pair (u_i, v_i) is correlated on test; the score is the mean of the `top`
test correlations. Their sums (Σu, Σv, Σu², Σv², Σuv) add up over passages, so a passage
bootstrap replicate is the same function of resampling-weighted sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpipe.linalg.ridge import RidgeStats


@dataclass(frozen=True)
class CanonicalMap:
    """Calibration means and canonical directions: u = (x − mx) A, v = (y − my) B."""

    mx: np.ndarray
    my: np.ndarray
    A: np.ndarray
    B: np.ndarray

    def project(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical variates [rows, top] of paired rows."""
        return (np.asarray(X, np.float64) - self.mx) @ self.A, (np.asarray(Y, np.float64) - self.my) @ self.B


def cca_sizes(p: int, q: int, components: int, top: int) -> tuple[int, int, int]:
    """SVD components kept for a p-wide and a q-wide side, and the canonical pairs scored."""
    kx, ky = min(components, p), min(components, q)
    return kx, ky, min(top, kx, ky)


def _reduce(n: int, s: np.ndarray, ss: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, top-k covariance eigenvectors [p, k] and their eigenvalues, from Σx and XᵀX of n rows."""
    mean = s / n
    lam, vecs = np.linalg.eigh((ss - n * np.outer(mean, mean)) / (n - 1))
    order = np.argsort(lam)[::-1][:k]
    return mean, vecs[:, order], np.clip(lam[order], 0.0, None)


def _whitening(lam: np.ndarray, regularisation: float) -> np.ndarray:
    """(Λ + r · mean(Λ))^{-½} of reduced variances Λ."""
    return 1.0 / np.sqrt(lam + regularisation * max(float(lam.mean()), np.finfo(float).tiny))


def fit_cca(xy: RidgeStats, yy: RidgeStats, components: int, regularisation: float, top: int) -> CanonicalMap:
    """Regularised CCA from the statistics of (x, y) rows and of (y, y) rows of the same calibration tokens."""
    n = xy.n
    if n < 2 or yy.n != n:
        raise ValueError(f"CCA needs at least 2 calibration rows on both sides, got {n} and {yy.n}")
    kx, ky, k = cca_sizes(xy.p, yy.p, components, top)
    mx, Px, lx = _reduce(n, xy.sx, xy.sxx, kx)
    my, Py, ly = _reduce(n, yy.sx, yy.sxx, ky)
    wx, wy = _whitening(lx, regularisation), _whitening(ly, regularisation)
    cxy = (xy.sxy - n * np.outer(mx, my)) / (n - 1)
    U, _, Vt = np.linalg.svd(wx[:, None] * (Px.T @ cxy @ Py) * wy[None, :])
    return CanonicalMap(mx, my, Px @ (wx[:, None] * U[:, :k]), Py @ (wy[:, None] * Vt[:k].T))


def unit_sums(cmap: CanonicalMap, X: np.ndarray, Y: np.ndarray, units: np.ndarray, n_units: int) -> np.ndarray:
    """[n_units, top, 5]: per unit (row i belongs to units[i]) Σu, Σv, Σu², Σv², Σuv of each canonical pair."""
    U, V = cmap.project(X, Y)
    out = np.zeros((n_units, U.shape[1], 5))
    np.add.at(out, units, np.stack([U, V, U * U, V * V, U * V], axis=-1))
    return out


def held_out_correlations(sums: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """Correlation of each canonical pair from summed unit_sums [..., top, 5] over n rows (n broadcasts to [...])."""
    su, sv, suu, svv, suv = (sums[..., i] for i in range(5))
    n = np.asarray(n, np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (suv - su * sv / n) / np.sqrt((suu - su * su / n) * (svv - sv * sv / n))


def mean_correlation(sums: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """The CCA score: mean test correlation of the top canonical pairs, from summed unit_sums [..., top, 5]."""
    return held_out_correlations(sums, n).mean(axis=-1)
