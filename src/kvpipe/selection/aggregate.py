"""Every headline number of the selection-transfer stage with its paired bootstrap interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvpipe.reporting import Interval
from kvpipe.stats import bootstrap_counts, percentile_ci


class Bootstrap:
    """Means and paired differences of per-sample values with percentile intervals."""

    def __init__(self, samples: np.ndarray, reps: int, level: float, seed: int) -> None:
        self.samples = np.sort(samples)
        self.counts = bootstrap_counts(len(self.samples), reps, seed)
        self.level = level

    def mean(self, values: pd.Series) -> Interval:
        """Mean over samples (values indexed by sample_idx) with its interval."""
        v = values.reindex(self.samples).to_numpy(dtype=float)
        reps = self.counts @ v / self.counts.sum(1)
        lo, hi = percentile_ci(reps, self.level)
        return float(v.mean()), float(lo), float(hi)

    def delta(self, a: pd.Series, b: pd.Series) -> Interval:
        """Mean of a - b, paired by sample."""
        return self.mean(a.reindex(self.samples) - b.reindex(self.samples))


class _Table:
    """Rows of the tidy aggregates table."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, table: str, role: str, method: str, retention: float, quantity: str, v: Interval) -> None:
        self.rows.append({"table": table, "role": role, "method": method, "retention": retention, "quantity": quantity,
                          "value": v[0], "ci_low": v[1], "ci_high": v[2]})


def _full_kv(out: _Table, answers: pd.DataFrame, boot: Bootstrap, cfg: dict[str, Any]) -> None:
    for role in ("scout", "main"):
        full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")
        out.add("full_kv", role, "full", 1.0, "f1", boot.mean(full["f1"]))
        out.add("full_kv", role, "full", 1.0, "exact", boot.mean(full["exact"]))
        for label, mask in (("f1_has_answer", ~full["is_impossible"]), ("f1_no_answer", full["is_impossible"])):
            if mask.any() and not mask.all():
                sub = Bootstrap(full.index[mask].to_numpy(), cfg["bootstrap"], cfg["ci"], cfg["seed"])
                out.add("full_kv", role, "full", 1.0, label, sub.mean(full.loc[mask, "f1"]))


def _transfer(out: _Table, answers: pd.DataFrame, boot: Bootstrap) -> None:
    f1 = answers.set_index(["role", "method", "retention", "source", "sample_idx"])["f1"].sort_index()
    conditions = set(f1.index.droplevel("sample_idx"))
    methods = [m for m in answers["method"].unique() if m not in ("full", "random")]
    for r in sorted(answers.loc[answers["method"] != "full", "retention"].unique()):
        for role, other, direction in (("main", "scout", "forward"), ("scout", "main", "reverse")):
            random = f1.loc[(role, "random", r, "own")] if "random" in answers["method"].values else None
            full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")["f1"]
            if random is not None:
                out.add("transfer", role, "random", r, "f1", boot.mean(random))
            for m in methods:
                own, moved = f1.loc[(role, m, r, "own")], f1.loc[(role, m, r, "transfer")]
                out.add("transfer", role, m, r, "f1_own", boot.mean(own))
                if (role, m, r, "own_per_head") in conditions:
                    per_head = f1.loc[(role, m, r, "own_per_head")]
                    out.add("transfer", role, m, r, "f1_own_per_head", boot.mean(per_head))
                    out.add("transfer", role, m, r, "delta_per_head_vs_shared", boot.delta(per_head, own))
                out.add("transfer", role, m, r, f"f1_from_{other}", boot.mean(moved))
                out.add("transfer", role, m, r, f"delta_{direction}", boot.delta(moved, own))
                out.add("transfer", role, m, r, "delta_own_vs_full", boot.delta(own, full))
                if random is not None:
                    out.add("transfer", role, m, r, "delta_own_vs_random", boot.delta(own, random))


def _overlap(out: _Table, overlaps: pd.DataFrame, boot: Bootstrap) -> None:
    for (m, r), group in overlaps.groupby(["method", "retention"]):
        g = group.set_index("sample_idx")
        for quantity in ("overlap", "jaccard", "spearman", "overlap_random", "jaccard_random"):
            out.add("overlap", "pair", m, r, quantity, boot.mean(g[quantity]))
        out.add("overlap", "pair", m, r, "overlap_minus_random", boot.delta(g["overlap"], g["overlap_random"]))


def aggregate(answers: pd.DataFrame, overlaps: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    """Tidy table (table, role, method, retention, quantity, value, ci_low, ci_high) of every headline figure."""
    boot = Bootstrap(answers["sample_idx"].unique(), cfg["bootstrap"], cfg["ci"], cfg["seed"])
    out = _Table()
    _full_kv(out, answers, boot, cfg)
    _transfer(out, answers, boot)
    _overlap(out, overlaps, boot)
    return pd.DataFrame(out.rows)
