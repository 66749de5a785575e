"""Every headline number of the selection-transfer stage with its paired bootstrap interval.

Every interval and p-value resamples *passages*, not questions: questions on one passage share
their context (and so their selections and much of their answers), so each bootstrap draw takes
whole passages with all their questions (kvpipe.stats.cluster_bootstrap_counts); resampling
questions would treat them as independent and make intervals too narrow.

The family of selection deltas (forward, reverse, own − random, own − full KV; every method and
retention below 1, both models) gets two-sided bootstrap p-values (normal reference, bootstrap
standard error) and Holm's correction over the
whole family (kvpipe.stats.holm): columns `p_value` and `p_holm`, NaN outside it.
Each forward delta also gets `detectable_forward`: z × its bootstrap standard error, the smallest
|delta| its interval could tell from 0 at this n. Tables named `<table>_has_answer` and
`<table>_no_answer` repeat the transfer and overlap tables on answerable / unanswerable samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import norm

from kvpipe.errors import KvpipeError
from kvpipe.reporting import Interval
from kvpipe.stats import bootstrap_pvalue, cluster_bootstrap_counts, holm, percentile_ci

FAMILY = ("delta_forward", "delta_reverse", "delta_own_vs_random", "delta_own_vs_full")
SUBSETS = (("has_answer", False), ("no_answer", True))   # (table suffix, is_impossible)
CHARACTER_OVERLAP = ("char_overlap", "char_overlap_random")   # overlap columns of a pair whose tokenizers differ


class Bootstrap:
    """Means and paired differences of per-sample values with percentile intervals over resampled passages."""

    def __init__(self, passages: pd.Series, reps: int, level: float, seed: int) -> None:
        """passages: the passage id of each sample, indexed by sample_idx."""
        self.passages = passages.sort_index()
        self.samples = self.passages.index.to_numpy()
        self.counts = cluster_bootstrap_counts(self.passages.to_numpy(), reps, seed)
        self.reps, self.level, self.seed = reps, level, seed

    def subset(self, samples: ArrayLike) -> Bootstrap:
        """The same bootstrap restricted to some samples (their passages resampled)."""
        return Bootstrap(self.passages.loc[samples], self.reps, self.level, self.seed)

    def replicates(self, values: pd.Series) -> tuple[float, np.ndarray]:
        """The mean over samples (values indexed by sample_idx) and its bootstrap replicates."""
        v = values.reindex(self.samples).to_numpy(dtype=float)
        return float(v.mean()), self.counts @ v / self.counts.sum(1)

    def mean(self, values: pd.Series) -> Interval:
        """Mean over samples with its interval."""
        value, reps = self.replicates(values)
        lo, hi = percentile_ci(reps, self.level)
        return value, float(lo), float(hi)

    def delta(self, a: pd.Series, b: pd.Series) -> Interval:
        """Mean of a - b, paired by sample."""
        return self.mean(a.reindex(self.samples) - b.reindex(self.samples))

    def test(self, a: pd.Series, b: pd.Series) -> tuple[Interval, float, float]:
        """Mean of a - b with its interval, two-sided bootstrap p-value and bootstrap standard error."""
        value, reps = self.replicates(a.reindex(self.samples) - b.reindex(self.samples))
        return self.delta(a, b), float(bootstrap_pvalue(reps, value)), float(reps.std(ddof=1))


class _Table:
    """Rows of the tidy aggregates table."""

    def __init__(self, z: float) -> None:
        self.rows: list[dict[str, Any]] = []
        self.z = z

    def add(self, table: str, role: str, method: str, retention: float, quantity: str, v: Interval,
            p: float = math.nan) -> None:
        self.rows.append({"table": table, "role": role, "method": method, "retention": retention, "quantity": quantity,
                          "value": v[0], "ci_low": v[1], "ci_high": v[2], "p_value": p})

    def delta(self, table: str, role: str, method: str, r: float, quantity: str, boot: Bootstrap, a: pd.Series,
              b: pd.Series) -> None:
        """A delta row; family deltas below retention 1 carry their p-value, forward ones their detectable size."""
        v, p, se = boot.test(a, b)
        in_family = table == "transfer" and quantity in FAMILY and r < 1
        self.add(table, role, method, r, quantity, v, p if in_family else math.nan)
        if quantity == "delta_forward":
            self.add(table, role, method, r, "detectable_forward", (self.z * se, math.nan, math.nan))


def _full_kv(out: _Table, answers: pd.DataFrame, boot: Bootstrap) -> None:
    """Each model's full-KV F1 and exact match, and the main's F1 minus the scout's (paired by sample)."""
    f1 = {}
    for role in ("scout", "main"):
        full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")
        f1[role] = full["f1"]
        out.add("full_kv", role, "full", 1.0, "f1", boot.mean(full["f1"]))
        out.add("full_kv", role, "full", 1.0, "exact", boot.mean(full["exact"]))
        for label, mask in (("f1_has_answer", ~full["is_impossible"]), ("f1_no_answer", full["is_impossible"])):
            if mask.any() and not mask.all():
                out.add("full_kv", role, "full", 1.0, label, boot.subset(full.index[mask]).mean(full.loc[mask, "f1"]))
    out.add("full_kv", "pair", "full", 1.0, "f1_main_minus_scout", boot.delta(f1["main"], f1["scout"]))


def _transfer(out: _Table, answers: pd.DataFrame, boot: Bootstrap, table: str = "transfer") -> None:
    f1 = answers.set_index(["role", "method", "retention", "source", "sample_idx"])["f1"].sort_index()
    conditions = set(f1.index.droplevel("sample_idx"))
    methods = [m for m in answers["method"].unique() if m not in ("full", "random")]
    for r in sorted(answers.loc[answers["method"] != "full", "retention"].unique()):
        for role, other, direction in (("main", "scout", "forward"), ("scout", "main", "reverse")):
            random = f1.loc[(role, "random", r, "own")] if "random" in answers["method"].values else None
            full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")["f1"]
            if random is not None:
                out.add(table, role, "random", r, "f1", boot.mean(random))
            for m in methods:
                own, moved = f1.loc[(role, m, r, "own")], f1.loc[(role, m, r, "transfer")]
                out.add(table, role, m, r, "f1_own", boot.mean(own))
                if (role, m, r, "own_per_head") in conditions:
                    per_head = f1.loc[(role, m, r, "own_per_head")]
                    out.add(table, role, m, r, "f1_own_per_head", boot.mean(per_head))
                    out.add(table, role, m, r, "delta_per_head_vs_shared", boot.delta(per_head, own))
                out.add(table, role, m, r, f"f1_from_{other}", boot.mean(moved))
                out.delta(table, role, m, r, f"delta_{direction}", boot, moved, own)
                out.delta(table, role, m, r, "delta_own_vs_full", boot, own, full)
                if random is not None:
                    out.delta(table, role, m, r, "delta_own_vs_random", boot, own, random)


def _overlap(out: _Table, overlaps: pd.DataFrame, boot: Bootstrap, table: str = "overlap") -> None:
    """Token-space overlap quantities and, for a pair whose tokenizers differ, the character-space ones."""
    characters = "char_overlap" in overlaps.columns
    for (m, r), group in overlaps.groupby(["method", "retention"]):
        g = group.set_index("sample_idx")
        for quantity in ("overlap", "jaccard", "spearman", "overlap_random", "jaccard_random",
                         *(CHARACTER_OVERLAP if characters else ())):
            out.add(table, "pair", m, r, quantity, boot.mean(g[quantity]))
        out.add(table, "pair", m, r, "overlap_minus_random", boot.delta(g["overlap"], g["overlap_random"]))
        if characters:
            out.add(table, "pair", m, r, "char_overlap_minus_random", boot.delta(*(g[q] for q in CHARACTER_OVERLAP)))


def _by_answerability(out: _Table, answers: pd.DataFrame, overlaps: pd.DataFrame, boot: Bootstrap) -> None:
    """The transfer and overlap tables again on answerable and on unanswerable samples (when both occur)."""
    impossible = answers.groupby("sample_idx")["is_impossible"].first()
    if impossible.all() or not impossible.any():
        return
    for suffix, flag in SUBSETS:
        ids = impossible.index[impossible == flag].to_numpy()
        sub = boot.subset(ids)
        _transfer(out, answers[answers["sample_idx"].isin(ids)], sub, f"transfer_{suffix}")
        _overlap(out, overlaps[overlaps["sample_idx"].isin(ids)], sub, f"overlap_{suffix}")


def passages_of(answers: pd.DataFrame) -> pd.Series:
    """The passage of each answered sample, indexed by sample_idx."""
    if "passage" not in answers.columns:
        raise KvpipeError("answers table: no 'passage' column; rerun the selection stage")
    return answers.groupby("sample_idx")["passage"].first()


def aggregate(answers: pd.DataFrame, overlaps: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    """Tidy table (table, role, method, retention, quantity, value, ci_low, ci_high, p_value, p_holm)."""
    boot = Bootstrap(passages_of(answers), cfg["bootstrap"], cfg["ci"], cfg["seed"])
    out = _Table(float(norm.ppf(0.5 + cfg["ci"] / 2)))
    _full_kv(out, answers, boot)
    _transfer(out, answers, boot)
    _overlap(out, overlaps, boot)
    _by_answerability(out, answers, overlaps, boot)
    agg = pd.DataFrame(out.rows, columns=["table", "role", "method", "retention", "quantity", "value", "ci_low",
                                          "ci_high", "p_value"])
    agg["p_holm"] = holm(agg["p_value"].to_numpy(dtype=float))
    return agg
