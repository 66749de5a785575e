"""Per-variant answer quality, abstention and bytes (aggregate) and time to first token (ttft_aggregate) of the
projection stage, with passage-bootstrap intervals and the verdict vocabulary of kvpipe.estimands.

Every variant (condition, projector, objective, key_map, retention, rank, bottom_layers, hidden_layer) answers the same test
questions, so deltas are paired by sample. Questions on one passage share its context, so every
bootstrap resamples passages (kvpipe.stats.PassageBootstrap): a replicate is a mean over
samples weighted by their passage's draw count. The estimand of every verdict is answerable F1
(`f1_answerable`): ΔF1 against main_full gets a two-sided bootstrap p-value, Holm-adjusted over all
other variants, `detectable` (z × its bootstrap standard error) and a worded verdict (better, worse,
equivalent by TOST within `verdicts.equivalence_margin`, or undecided); against the floors
no_context and mean_kv likewise, and `carries_content` is true only above both. Where main_full itself is not
better than no_context, every verdict against it reads "at the floor" (kvpipe.estimands.AT_FLOOR). Abstention on
unanswerable questions and the wrong abstentions and empty replies on answerable ones are reported
apart; the all-question F1 stays in the table and is the basis of nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kvpipe.config import section_defaults
from kvpipe.errors import KvpipeError
from kvpipe.estimands import (
    AT_FLOOR,
    MEAN_KV,
    NO_CONTEXT,
    SUBSETS,
    Comparison,
    above_floor,
    carries_content,
    compare,
    with_failure_flags,
)
from kvpipe.reporting import Interval
from kvpipe.settings import ProjectionSettings
from kvpipe.stats import PassageBootstrap, bootstrap_pvalue, cluster_codes, critical_value, holm

VARIANT = ("condition", "projector", "objective", "key_map", "retention", "rank", "bottom_layers", "hidden_layer")
# The documented order of conditions and projectors: the default config's (the schema's defaults, whose enums equal
# the registries), the others after them.
CONDITION_ORDER = tuple(section_defaults("projection")["conditions"])
PROJECTOR_ORDER = tuple(section_defaults("projection")["projectors"])
DIAGNOSTICS = ("projected_k_own_v", "own_k_projected_v")   # need the main's own prefill: not a way to send a context
BASELINE = ("main_full", "none", "none", "none", 1.0, -1, -1, -1)
FLOOR_VARIANTS = {name: (name, *BASELINE[1:]) for name in (NO_CONTEXT, MEAN_KV)}
INJECTED = ("projected_kv", "chain")   # conditions whose context cache the main never computes


def _order(variant: tuple) -> tuple:
    """Conditions and projectors in their documented order, pre-RoPE key maps first, then retention (high first), rank,
    then the hybrid layers B and L."""
    condition, projector, objective, key_map, retention, *layers = variant
    index = {name: i for i, name in enumerate((*CONDITION_ORDER, *PROJECTOR_ORDER))}
    return (index.get(condition, len(index)), index.get(projector, len(index)), objective, key_map == "post_rope",
            -retention, *(n if n >= 0 else math.inf for n in layers))


class Paired:
    """Per-sample values of every variant ([samples, variants] per column) and their passage bootstrap (`boot`)."""

    def __init__(self, answers: pd.DataFrame, settings: ProjectionSettings,
                 columns: Sequence[str] = ("f1", "exact", "bytes", "abstained", "empty")) -> None:
        per_sample = answers.groupby("sample_idx")[["passage", "is_impossible"]].first()
        self.impossible = per_sample["is_impossible"].to_numpy(dtype=bool)
        self.passage, _ = cluster_codes(per_sample["passage"].to_numpy())
        self.boot = PassageBootstrap(per_sample["passage"], settings.bootstrap, settings.ci, settings.seed)
        self.level = settings.ci
        self.wide = {col: answers.pivot(index="sample_idx", columns=list(VARIANT), values=col).reindex(per_sample.index)
                     for col in columns}
        self.variants: list[tuple] = sorted(self.wide[columns[0]].columns, key=_order)

    def matrix(self, col: str, variants: Sequence[tuple] | None = None, subset: bool | None = None) -> np.ndarray:
        """[samples, variants] values of one answers column (NaN where a variant has no answer); subset: only the
        unanswerable (True) or answerable (False) questions keep their values."""
        x = self.wide[col][list(variants or self.variants)].to_numpy(dtype=float)
        return x if subset is None else np.where((self.impossible == subset)[:, None], x, np.nan)

    def replicates(self, a: tuple, b: tuple, col: str = "f1", subset: bool | None = False) -> tuple[float, np.ndarray]:
        """Mean of a − b paired by sample (answerable questions by default) and its bootstrap replicates."""
        x = self.matrix(col, [a], subset)[:, 0] - self.matrix(col, [b], subset)[:, 0]
        point, reps = self.boot.means(x[:, None])
        return float(point[0]), reps[:, 0]

    def delta(self, a: tuple, b: tuple, col: str = "f1", subset: bool | None = False) -> tuple[Interval, float]:
        """Mean of a − b paired by sample with its interval and two-sided bootstrap p-value."""
        point, reps = self.replicates(a, b, col, subset)
        lo, hi = self.boot.ci(reps[:, None])
        return (point, float(lo[0]), float(hi[0])), float(bootstrap_pvalue(reps, point))

    def compare(self, a: tuple, b: tuple, margin: float) -> Comparison:
        """The worded answerable-F1 comparison of a against b."""
        return compare(*self.replicates(a, b), self.level, margin)


def variant_of(row: Mapping[str, Any]) -> tuple:
    """The variant key (VARIANT columns) of an aggregates row."""
    return tuple(row[c] for c in VARIANT)


def label(row: Mapping[str, Any]) -> str:
    """Short name of a variant, e.g. 'chain ridge/attention r=0.50 rank 8', 'own_bottom_projected_top ridge/distill B=7'."""
    parts = [row["condition"]]
    if row["projector"] != "none":
        parts.append(row["projector"] + (f"/{row['objective']}" if row["objective"] != "none" else ""))
    if row["key_map"] == "post_rope":
        parts.append("post-RoPE keys")
    if row["retention"] < 1:
        parts.append(f"r={row['retention']:.2f}")
    for column, name in (("rank", "rank "), ("bottom_layers", "B="), ("hidden_layer", "L=")):
        if row[column] >= 0:
            parts.append(f"{name}{row[column]}")
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


def on_front(agg: pd.DataFrame, cost: str = "bytes") -> np.ndarray:
    """Mask of the aggregates rows on the answerable-F1 Pareto front against `cost`; the diagnostics (DIAGNOSTICS) and
    the constant reply take no part."""
    deployable = (~agg["condition"].isin((*DIAGNOSTICS, "always_abstain")) & agg[cost].notna()).to_numpy()
    return deployable & pareto_front(np.where(deployable, agg[cost], np.inf), agg["f1_answerable"].fillna(-1))


def _main_full_columns(out: pd.DataFrame, p: Paired, base: int, margin: float) -> None:
    """Answerable ΔF1 vs main_full with interval, p-value, Holm p over every other variant, detectable size, verdict."""
    f1 = p.matrix("f1", subset=False)
    point, reps = p.boot.means(f1 - f1[:, [base]])
    in_family = np.arange(len(out)) != base
    rows = [compare(point[j], reps[:, j], p.level, margin) for j in range(len(out))]
    out["delta_f1"], out["delta_f1_low"], out["delta_f1_high"] = point, *p.boot.ci(reps)
    out["p_value"] = np.where(in_family, bootstrap_pvalue(reps, point), np.nan)
    out["p_holm"] = holm(out["p_value"].to_numpy())
    out["survives"] = out["p_holm"] < 1 - p.level
    out["detectable"] = np.where(in_family, critical_value(p.level) * np.nanstd(reps, axis=0, ddof=1), np.nan)
    out["tost_low"], out["tost_high"] = [c.tost_low for c in rows], [c.tost_high for c in rows]
    out["verdict"] = np.where(in_family, [c.verdict for c in rows], "")


def _floor_columns(out: pd.DataFrame, p: Paired, margin: float) -> None:
    """Answerable ΔF1 against each floor that was answered, its verdict, and whether a variant carries content."""
    floors = {name: v for name, v in FLOOR_VARIANTS.items() if v in p.variants}
    versus: list[list[Comparison]] = [[] for _ in p.variants]
    for name, floor in floors.items():
        rows = [p.compare(v, floor, margin) for v in p.variants]
        out[f"delta_f1_vs_{name}"] = [c.delta for c in rows]
        out[f"delta_f1_vs_{name}_low"], out[f"delta_f1_vs_{name}_high"] = [c.low for c in rows], [c.high for c in rows]
        out[f"verdict_vs_{name}"] = [c.verdict if v != floor else "" for c, v in zip(rows, p.variants, strict=True)]
        for j, c in enumerate(rows):
            versus[j].append(c)
    out["carries_content"] = [len(floors) == len(FLOOR_VARIANTS) and carries_content(c) for c in versus]


def aggregate(answers: pd.DataFrame, settings: ProjectionSettings, margin: float) -> pd.DataFrame:
    """One row per variant: answerable F1 (the estimand), abstention, all-question F1, ΔF1 vs main_full and the
    floors with verdicts, and bytes, with intervals (`<name>_low` / `<name>_high`).

    settings: the stage's (bootstrap, ci, seed); margin the equivalence margin of the TOST.
    """
    p = Paired(with_failure_flags(answers), settings)
    if BASELINE not in p.variants:
        raise KvpipeError(f"answers: no {BASELINE[0]} rows (the baseline of every delta)")
    base = p.variants.index(BASELINE)
    out = pd.DataFrame(p.variants, columns=list(VARIANT))
    f1 = p.matrix("f1")
    out["n"] = (~np.isnan(f1)).sum(0)
    out["n_answerable"] = (~np.isnan(p.matrix("f1", subset=False))).sum(0)
    out["n_passages"] = [len(np.unique(p.passage[~np.isnan(f1[:, j])])) for j in range(f1.shape[1])]
    columns = [(f"f1_{suffix}", p.matrix("f1", subset=flag)) for suffix, flag in SUBSETS]
    columns += [("f1", f1), ("exact", p.matrix("exact"))]
    columns += [(f"abstain_{suffix}", p.matrix("abstained", subset=flag)) for suffix, flag in SUBSETS]
    columns += [(f"empty_{suffix}", p.matrix("empty", subset=flag)) for suffix, flag in SUBSETS]
    for name, x in columns:
        out[name], out[f"{name}_low"], out[f"{name}_high"] = p.boot.interval(x)
    _main_full_columns(out, p, base, margin)
    _floor_columns(out, p, margin)
    if f"verdict_vs_{NO_CONTEXT}" in out and not above_floor(out[f"verdict_vs_{NO_CONTEXT}"].iloc[base]):
        out["verdict"] = np.where(out["verdict"] != "", AT_FLOOR, "")   # main_full does not read its context
    out["bytes"] = p.boot.means(p.matrix("bytes"))[0]
    out["bytes_ratio"] = out["bytes"] / out["bytes"].iloc[base]
    return out


def ttft_regimes(ttft: pd.DataFrame, link_mbps: Sequence[float]) -> pd.DataFrame:
    """Each timed row's time to first token in every regime, from its measured parts.

    `ttft_prefilled_s`: the context cache is ready ahead of time (question pass only); `ttft_payload_s`: from
    having the payload (main's own prefill where the row needs it, cache build, question pass);
    `ttft_e2e_{M}mbps_s`: what a deployment waits for — the scout's side where the row needs it, the main's own
    prefill where it needs it, the bytes sent at M megabits per second, the cache build and the question pass.
    A record that predates the parts has only `ttft_s` (the payload regime).
    """
    out = ttft.copy()
    if "question_s" not in out.columns:
        return out.rename(columns={"ttft_s": "ttft_payload_s"})
    out["ttft_prefilled_s"] = out["question_s"]
    out["ttft_payload_s"] = out["own_prefill_s"] + out["build_s"] + out["question_s"]
    for mbps in link_mbps:
        out[f"ttft_e2e_{mbps:g}mbps_s"] = out["scout_s"] + out["ttft_payload_s"] + out["bytes"] * 8 / (mbps * 1e6)
    return out


def ttft_columns(frame: pd.DataFrame) -> list[str]:
    """The TTFT regime columns of a ttft_regimes table, end-to-end ones first."""
    cols = [c for c in frame.columns if c.startswith("ttft_") and c.endswith("_s")]
    return sorted(cols, key=lambda c: (not c.startswith("ttft_e2e"), c != "ttft_payload_s", c))


def ttft_aggregate(answers: pd.DataFrame, ttft: pd.DataFrame, settings: ProjectionSettings) -> pd.DataFrame:
    """One row per variant with a measured time: mean TTFT in each regime and its ratio to main_full's in the same
    regime, with a paired passage-bootstrap interval (the regimes of `settings.ttft.link_mbps`)."""
    regimes = ttft_regimes(ttft, settings.ttft.link_mbps)
    cols = ttft_columns(regimes)
    timed = answers[["sample_idx", "passage", "is_impossible", *VARIANT]].merge(regimes, on=["sample_idx", *VARIANT])
    if timed.empty:
        return pd.DataFrame(columns=[*VARIANT, "n", "regime", "ttft_s", "ttft_ratio", "ttft_ratio_low",
                                     "ttft_ratio_high"])
    p = Paired(timed, settings, cols)
    if BASELINE not in p.variants:
        raise KvpipeError(f"ttft: no {BASELINE[0]} rows (the baseline of every ratio)")
    base, frames = p.variants.index(BASELINE), []
    for col in cols:
        t = p.matrix(col)
        both = ~np.isnan(t) & ~np.isnan(t[:, [base]])
        (num, num_reps), (den, den_reps) = (p.boot.means(np.where(both, x, np.nan)) for x in (t, np.broadcast_to(t[:, [base]],
                                                                                                            t.shape)))
        out = pd.DataFrame(p.variants, columns=list(VARIANT))
        out["regime"] = col.removeprefix("ttft_").removesuffix("_s")
        out["n"] = (~np.isnan(t)).sum(0)
        out["ttft_s"] = p.boot.means(t)[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ttft_ratio"], out["ttft_ratio_low"], out["ttft_ratio_high"] = (num / den, *p.boot.ci(num_reps / den_reps))
        frames.append(out)
    return pd.concat(frames, ignore_index=True)
