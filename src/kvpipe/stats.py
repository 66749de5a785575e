"""Bootstrap helpers shared by the analysis stages: resampling is always over samples."""

from __future__ import annotations

import numpy as np


def bootstrap_counts(n: int, reps: int, seed: int) -> np.ndarray:
    """[reps, n] multinomial resampling counts of n units (samples), seeded."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis of bootstrap replicates (NaNs ignored)."""
    tail = (1 - level) / 2 * 100
    return np.nanpercentile(replicates, tail, axis=0), np.nanpercentile(replicates, 100 - tail, axis=0)
