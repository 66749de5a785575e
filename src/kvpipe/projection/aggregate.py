"""Per-variant F1 and bytes (aggregate) and time to first token (ttft_aggregate) of the projection stage,
with passage-bootstrap intervals.

Every variant (condition, projector, objective, key_map, retention, rank) answers the same test
questions, so deltas are paired by sample. Questions on one passage share its context, so every
bootstrap resamples passages (kvpipe.stats.cluster_bootstrap_counts): a replicate is a mean over
samples weighted by their passage's draw count. ΔF1 against main_full gets a two-sided bootstrap
p-value, Holm-adjusted over all other variants (one family, kvpipe.stats.holm), and `detectable`,
z × its bootstrap standard error: the smallest |ΔF1| its interval could tell from 0 at this n.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from kvpipe.errors import KvpipeError
from kvpipe.reporting import Interval
from kvpipe.stats import bootstrap_pvalue, cluster_bootstrap_counts, cluster_codes, holm, percentile_ci

VARIANT = ("condition", "projector", "objective", "key_map", "retention", "rank")
CONDITIONS = ("main_full", "projected_kv", "projected_k_own_v", "own_k_projected_v", "mean_kv", "scout_selection",
              "chain")
DIAGNOSTICS = ("projected_k_own_v", "own_k_projected_v")   # need the main's own prefill: not a way to send a context
PROJECTORS = ("ridge", "shared", "mlp")
BASELINE = ("main_full", "none", "none", "none", 1.0, -1)
SUBSETS = (("has_answer", False), ("no_answer", True))   # (column suffix, is_impossible)


def _ci(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """percentile_ci, quiet about columns without replicates (a subset or a time a variant never has)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return percentile_ci(reps, level)


def _order(variant: tuple) -> tuple:
    """Conditions and projectors in their documented order, pre-RoPE key maps first, then retention (high first), rank."""
    condition, projector, objective, key_map, retention, rank = variant
    index = {name: i for i, name in enumerate((*CONDITIONS, *PROJECTORS))}
    return (index.get(condition, len(index)), index.get(projector, len(index)), objective, key_map == "post_rope",
            -retention, rank if rank >= 0 else math.inf)


class Paired:
    """Per-sample values of every variant ([samples, variants] per column) and passage-bootstrap means of them."""

    def __init__(self, answers: pd.DataFrame, cfg: Mapping[str, Any],
                 columns: Sequence[str] = ("f1", "exact", "bytes")) -> None:
        per_sample = answers.groupby("sample_idx")[["passage", "is_impossible"]].first()
        self.impossible = per_sample["is_impossible"].to_numpy(dtype=bool)
        self.passage, _ = cluster_codes(per_sample["passage"].to_numpy())
        self.counts = cluster_bootstrap_counts(per_sample["passage"].to_numpy(), cfg["bootstrap"], cfg["seed"])
        self.level = cfg["ci"]
        self.wide = {col: answers.pivot(index="sample_idx", columns=list(VARIANT), values=col).reindex(per_sample.index)
                     for col in columns}
        self.variants: list[tuple] = sorted(self.wide[columns[0]].columns, key=_order)

    def matrix(self, col: str, variants: Sequence[tuple] | None = None) -> np.ndarray:
        """[samples, variants] values of one answers column (NaN where a variant has no answer)."""
        return self.wide[col][list(variants or self.variants)].to_numpy(dtype=float)

    def means(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means over samples of each column of x [samples, k], NaNs skipped, and their replicates [B, k]."""
        ok = ~np.isnan(x)
        v = np.where(ok, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return v.sum(0) / ok.sum(0), (self.counts @ v) / (self.counts @ ok)

    def interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per column of x: mean, ci_low, ci_high."""
        point, reps = self.means(x)
        return (point, *_ci(reps, self.level))

    def delta(self, a: tuple, b: tuple, col: str = "f1") -> tuple[Interval, float]:
        """Mean of a − b paired by sample, with its interval and two-sided bootstrap p-value."""
        x = self.matrix(col, [a])[:, 0] - self.matrix(col, [b])[:, 0]
        point, reps = self.means(x[:, None])
        lo, hi = _ci(reps, self.level)
        return (float(point[0]), float(lo[0]), float(hi[0])), float(bootstrap_pvalue(reps, point)[0])


def variant_of(row: Mapping[str, Any]) -> tuple:
    """The variant key (VARIANT columns) of an aggregates row."""
    return tuple(row[c] for c in VARIANT)


def label(row: Mapping[str, Any]) -> str:
    """Short name of a variant, e.g. 'chain ridge/attention r=0.50 rank 8'."""
    parts = [row["condition"]]
    if row["projector"] != "none":
        parts.append(row["projector"] + (f"/{row['objective']}" if row["objective"] != "none" else ""))
    if row["key_map"] == "post_rope":
        parts.append("post-RoPE keys")
    if row["retention"] < 1:
        parts.append(f"r={row['retention']:.2f}")
    if row["rank"] >= 0:
        parts.append(f"rank {row['rank']}")
    return " ".join(parts)


def pareto_front(cost: Sequence[float], value: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point beats: none has cost ≤ and value ≥ with one strictly (first of exact ties)."""
    cost, value = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    mask = np.zeros(len(cost), dtype=bool)
    best = -math.inf
    for i in np.lexsort((-value, cost)):   # by cost, then highest value first
        if value[i] > best:
            mask[i], best = True, value[i]
    return mask


def on_front(agg: pd.DataFrame) -> np.ndarray:
    """Mask of the aggregates rows on the F1–bytes Pareto front; the diagnostics (DIAGNOSTICS) take no part."""
    deployable = ~agg["condition"].isin(DIAGNOSTICS).to_numpy()
    return deployable & pareto_front(np.where(deployable, agg["bytes"], np.inf), agg["f1"])


def _ttft_ratio(p: Paired, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ratio of mean TTFT to main_full's over the samples where both were measured, with its paired interval."""
    t = p.matrix("ttft_s")
    t0 = np.broadcast_to(t[:, [base]], t.shape)
    both = ~np.isnan(t) & ~np.isnan(t0)
    (num, num_reps), (den, den_reps) = (p.means(np.where(both, x, np.nan)) for x in (t, t0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den, *_ci(num_reps / den_reps, p.level))


def _delta_columns(out: pd.DataFrame, p: Paired, base: int) -> None:
    """ΔF1 vs main_full with interval, p-value, Holm p over every other variant, survival and detectable size."""
    f1 = p.matrix("f1")
    d = f1 - f1[:, [base]]
    point, reps = p.means(d)
    out["delta_f1"], out["delta_f1_low"], out["delta_f1_high"] = point, *_ci(reps, p.level)
    in_family = np.arange(len(out)) != base
    out["p_value"] = np.where(in_family, bootstrap_pvalue(reps, point), np.nan)
    out["p_holm"] = holm(out["p_value"].to_numpy())
    out["survives"] = out["p_holm"] < 1 - p.level
    z = NormalDist().inv_cdf(0.5 + p.level / 2)
    out["detectable"] = np.where(in_family, z * np.nanstd(reps, axis=0, ddof=1), np.nan)


def aggregate(answers: pd.DataFrame, cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One row per variant: F1, exact, HasAns/NoAns F1, ΔF1 vs main_full (Holm) and bytes, with intervals.

    cfg is the stage's config section (bootstrap, ci, seed). Interval columns are `<name>_low` / `<name>_high`.
    """
    p = Paired(answers, cfg)
    if BASELINE not in p.variants:
        raise KvpipeError(f"answers: no {BASELINE[0]} rows (the baseline of every delta)")
    base = p.variants.index(BASELINE)
    out = pd.DataFrame(p.variants, columns=list(VARIANT))
    f1 = p.matrix("f1")
    out["n"] = (~np.isnan(f1)).sum(0)
    out["n_passages"] = [len(np.unique(p.passage[~np.isnan(f1[:, j])])) for j in range(f1.shape[1])]
    columns = [("f1", f1), ("exact", p.matrix("exact"))]
    columns += [(f"f1_{suffix}", np.where((p.impossible == flag)[:, None], f1, np.nan)) for suffix, flag in SUBSETS]
    for name, x in columns:
        out[name], out[f"{name}_low"], out[f"{name}_high"] = p.interval(x)
    _delta_columns(out, p, base)
    out["bytes"] = p.means(p.matrix("bytes"))[0]
    out["bytes_ratio"] = out["bytes"] / out["bytes"].iloc[base]
    return out


def ttft_aggregate(answers: pd.DataFrame, ttft: pd.DataFrame, cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One row per variant with a measured time: mean TTFT and its ratio to main_full's, with a paired interval."""
    timed = answers[["sample_idx", "passage", "is_impossible", *VARIANT]].merge(ttft, on=["sample_idx", *VARIANT])
    if timed.empty:
        return pd.DataFrame(columns=[*VARIANT, "n", "ttft_s", "ttft_ratio", "ttft_ratio_low", "ttft_ratio_high"])
    p = Paired(timed, cfg, ("ttft_s",))
    if BASELINE not in p.variants:
        raise KvpipeError(f"ttft: no {BASELINE[0]} rows (the baseline of every ratio)")
    out = pd.DataFrame(p.variants, columns=list(VARIANT))
    t = p.matrix("ttft_s")
    out["n"] = (~np.isnan(t)).sum(0)
    out["ttft_s"] = p.means(t)[0]
    out["ttft_ratio"], out["ttft_ratio_low"], out["ttft_ratio_high"] = _ttft_ratio(p, p.variants.index(BASELINE))
    return out
