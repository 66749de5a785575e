"""CKA of every scout layer x main layer on a seeded token subsample kept across shards."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpipe.kv.store import KINDS
from kvpipe.stats import cluster_halves, critical_value
from kvpipe.structure.cka import center_gram, cka_from_grams

JACKKNIFE_HALVES = 50   # delete-half jackknife draws (random halves of the passages) per CKA interval


class TokenSubsample:
    """Seeded bottom-k token subsample kept across shards, with rows for every layer and kind."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.samples = np.empty(0, dtype=np.int64)
        self.rows: dict[tuple[str, int, str], np.ndarray] = {}

    def offer(self, sample_idx: np.ndarray, mats: dict[tuple[str, int, str], np.ndarray]) -> None:
        """Consider one shard's tokens (sample id per row, rows per (role, layer, kind))."""
        u = self.rng.random(len(sample_idx))
        keys = np.concatenate([self.keys, u])
        best = np.argsort(keys, kind="stable")[: self.size]
        self.keys, self.samples = keys[best], np.concatenate([self.samples, sample_idx])[best]
        for key, new in mats.items():
            old = self.rows.get(key, np.empty((0, new.shape[1])))
            self.rows[key] = np.concatenate([old, new])[best]


def _jackknife_interval(value: float, K: np.ndarray, L: np.ndarray, halves: list[np.ndarray], debiased: bool,
                        level: float) -> tuple[float, float]:
    """Normal interval from the sd of CKA over random halves of the sampled samples, clipped to [-1, 1]."""
    reps = [cka_from_grams(center_gram(K[np.ix_(h, h)], debiased), center_gram(L[np.ix_(h, h)], debiased))
            for h in halves]
    sd = float(np.nanstd(reps))
    z = critical_value(level)
    return max(value - z * sd, -1.0), min(value + z * sd, 1.0)


def cka_records(sub: TokenSubsample, scout_layers: list[int], main_layers: list[int], aligned: set[tuple[int, int]],
                level: float, seed: int, passages: np.ndarray) -> list[dict[str, Any]]:
    """CKA (biased, debiased) for every scout x main layer, with jackknife CIs on aligned pairs.

    The interval is a delete-half jackknife over *passages* (passages[i] is the passage of sample
    i; questions on one passage share their context rows): CKA on 50 random halves of the sampled
    passages, sd of those values as the standard error (for d = n/2 the jackknife variance factor
    (n - d) / d is 1), normal interval clipped to [-1, 1].
    """
    out = []
    clusters = np.asarray(passages)[sub.samples]
    units = np.unique(clusters)
    halves = [np.flatnonzero(h) for h in cluster_halves(clusters, JACKKNIFE_HALVES, seed)]
    for kind in KINDS:
        raw = {("main", m): sub.rows[("main", m, kind)] @ sub.rows[("main", m, kind)].T for m in main_layers}
        raw.update({("scout", s): sub.rows[("scout", s, kind)] @ sub.rows[("scout", s, kind)].T for s in scout_layers})
        for debiased in (False, True):
            metric = "cka_debiased" if debiased else "cka"
            main_grams = {m: center_gram(raw[("main", m)], debiased) for m in main_layers}
            for s in scout_layers:
                K = center_gram(raw[("scout", s)], debiased)
                for m in main_layers:
                    value = cka_from_grams(K, main_grams[m])
                    lo = hi = np.nan
                    if (s, m) in aligned and len(units) >= 4:
                        lo, hi = _jackknife_interval(value, raw[("scout", s)], raw[("main", m)], halves, debiased, level)
                    out.append({"kind": kind, "scout_layer": s, "main_layer": m, "head": -1, "metric": metric,
                                "value": value, "ci_low": lo, "ci_high": hi, "baseline": "none"})
    return out
