"""Bootstrap helpers shared by the analysis stages: resampling of whole units (samples or passages).

Questions on one passage share their context rows, so the analysis stages resample passages:
per-sample additive statistics are summed within a passage (cluster_codes) and the passages are
resampled (bootstrap_counts over them); jackknife halves are drawn over passages likewise.
PassageBootstrap is the one paired passage bootstrap of per-sample values every stage's report uses;
critical_value the one z.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import ndtr, ndtri  # the normal CDF and its inverse (scipy.stats.norm's own; a lighter import)


def bootstrap_counts(n: int, reps: int, seed: int) -> np.ndarray:
    """[reps, n] multinomial resampling counts of n units, seeded."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)


def cluster_codes(clusters: ArrayLike) -> tuple[np.ndarray, int]:
    """Per member, the index 0..k-1 of its cluster (sorted cluster ids); and k."""
    ids, codes = np.unique(np.asarray(clusters), return_inverse=True)
    return codes.reshape(-1), len(ids)


def cluster_bootstrap_counts(clusters: ArrayLike, reps: int, seed: int) -> np.ndarray:
    """[reps, members] counts that resample whole clusters: each member carries its cluster's draw count."""
    codes, k = cluster_codes(clusters)
    return bootstrap_counts(k, reps, seed)[:, codes]


def cluster_halves(clusters: ArrayLike, reps: int, seed: int) -> list[np.ndarray]:
    """reps member masks, each selecting the members of a random half of the clusters."""
    codes, k = cluster_codes(clusters)
    rng = np.random.default_rng(seed)
    return [np.isin(codes, rng.choice(k, k // 2, replace=False)) for _ in range(reps)]


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis of bootstrap replicates (NaNs ignored)."""
    tail = (1 - level) / 2 * 100
    return np.nanpercentile(replicates, tail, axis=0), np.nanpercentile(replicates, 100 - tail, axis=0)


def critical_value(level: float) -> float:
    """z of a two-sided interval at `level` (1.96 at 0.95): the one critical value every stage uses."""
    if not 0 < level < 1:
        raise ValueError(f"a confidence level lies in (0, 1), got {level}")
    return float(ndtri(0.5 + level / 2))


def bootstrap_pvalue(replicates: ArrayLike, estimate: ArrayLike) -> np.ndarray:
    """Two-sided p-value of "the true value is 0": p = 2 Φ(−|estimate| / se), se the replicates' sd (first axis).

    A normal reference on the bootstrap standard error, not a count of replicates beyond 0: counting
    cannot give p below 2 / (B + 1), too coarse for Holm over a family of dozens of tests. It agrees
    with the smallest detectable difference reported beside it (z × the same se).
    """
    se = np.nanstd(np.asarray(replicates, dtype=np.float64), axis=0, ddof=1)
    est = np.abs(np.asarray(estimate, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * ndtr(-est / se)
    return np.where(se > 0, p, np.where(est == 0, 1.0, 0.0))


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values of one family, in input order (controls the family-wise error rate).

    With the m p-values sorted, p_(i) becomes max_{j ≤ i} min(1, (m − j + 1) p_(j)), valid under any
    dependence. NaN entries stay NaN and are not counted in the family.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


class PassageBootstrap:
    """Means over samples with percentile intervals, resampling passages: a replicate draws whole passages with
    replacement and weighs every sample by its passage's draw count. Values of several conditions on the same samples
    share the draws, so their differences are paired by sample."""

    def __init__(self, passages: pd.Series, reps: int, level: float, seed: int) -> None:
        """passages: the passage id of each sample, indexed by sample_idx."""
        self.passages = passages.sort_index()
        self.samples = self.passages.index.to_numpy()
        self.counts = cluster_bootstrap_counts(self.passages.to_numpy(), reps, seed)
        self.reps, self.level, self.seed = reps, level, seed

    def subset(self, samples: ArrayLike) -> PassageBootstrap:
        """The same bootstrap over some samples only (their passages drawn afresh, same seed)."""
        return PassageBootstrap(self.passages.loc[samples], self.reps, self.level, self.seed)

    def means(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means over samples of each column of x [samples, k], NaNs skipped, and their replicates [reps, k]."""
        ok = ~np.isnan(x)
        v = np.where(ok, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return v.sum(0) / ok.sum(0), (self.counts @ v) / (self.counts @ ok)

    def ci(self, replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """percentile_ci at the bootstrap's level, quiet about columns without replicates."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return percentile_ci(replicates, self.level)

    def interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per column of x [samples, k]: mean, ci_low, ci_high."""
        point, reps = self.means(x)
        return (point, *self.ci(reps))

    def replicates(self, values: pd.Series) -> tuple[float, np.ndarray]:
        """The mean of per-sample values (indexed by sample_idx; NaN or absent samples skipped) and its replicates."""
        point, reps = self.means(values.reindex(self.samples).to_numpy(dtype=float)[:, None])
        return float(point[0]), reps[:, 0]

    def mean(self, values: pd.Series) -> tuple[float, float, float]:
        """Mean of per-sample values with its interval."""
        point, reps = self.replicates(values)
        low, high = self.ci(reps[:, None])
        return point, float(low[0]), float(high[0])

    def delta(self, a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
        """Mean of a − b, paired by sample, with its interval."""
        return self.mean(a.reindex(self.samples) - b.reindex(self.samples))
