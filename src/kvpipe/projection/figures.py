"""The projection-stage figures, drawn from the aggregates and the projector metrics (matplotlib imported on use).

Every draw function takes (agg, metrics, title) and returns the figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvpipe.estimands import MEAN_KV, NO_CONTEXT
from kvpipe.projection.aggregate import BASELINE, CONDITION_ORDER, label, on_front
from kvpipe.reporting import fmt_ci, pyplot

KIND_LABELS = {"key": "keys (pre-RoPE)", "key_post": "keys (post-RoPE, mapped directly)", "value": "values"}
# (marker, size) of each condition in CONDITION_ORDER (the reference and the floors first, larger); others: ("o", 6)
MARKERS = (("*", 14), ("P", 11), ("X", 11), ("x", 9), ("o", 7), ("<", 7), (">", 7), ("D", 6), ("s", 9))
HIGHLIGHT = (BASELINE[0], NO_CONTEXT, MEAN_KV)
F1 = "f1_answerable"   # the estimand every figure plots (kvpipe.estimands)


def _colour(condition: str) -> str:
    """One colour of matplotlib's default cycle per condition."""
    return f"C{CONDITION_ORDER.index(condition)}" if condition in CONDITION_ORDER else "grey"


def _marker(condition: str) -> tuple[str, int]:
    """The condition's (marker, size) by its place in CONDITION_ORDER."""
    at = CONDITION_ORDER.index(condition) if condition in CONDITION_ORDER else len(MARKERS)
    return MARKERS[at] if at < len(MARKERS) else ("o", 6)


def _errors(rows: pd.DataFrame, name: str) -> np.ndarray:
    """[2, n] distances from the value to its interval bounds, for errorbar."""
    return np.vstack([rows[name] - rows[f"{name}_low"], rows[f"{name}_high"] - rows[name]])


def f1_vs_bytes(agg: pd.DataFrame, metrics: pd.DataFrame, title: str) -> Any:
    """Mean answerable F1 against mean bytes sent per sample, one marker per variant, with the Pareto front."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    for condition, g in agg.groupby("condition", sort=False):
        marker, size = _marker(condition)
        ax.errorbar(g["bytes"], g[F1], yerr=_errors(g, F1), fmt=marker, ms=size, color=_colour(condition),
                    mec="black" if condition in HIGHLIGHT else None, mfc="none" if condition == "chain" else None,
                    capsize=2, label=condition)
    front = agg[on_front(agg)].sort_values("bytes")
    ax.step([*front["bytes"], agg["bytes"].max()], [*front[F1], front[F1].iloc[-1]], where="post", color="black",
            lw=1, label="Pareto front (max answerable F1 at ≤ bytes)")
    for _, row in agg[on_front(agg) | agg["condition"].isin(HIGHLIGHT)].iterrows():
        ax.annotate(label(row), (row["bytes"], row[F1]), xytext=(4, 4), textcoords="offset points", fontsize=6)
    positive = agg.loc[agg["bytes"] > 0, "bytes"]
    # linear below a decade under the smallest payload: mean_kv sends nothing, 0 has no logarithm
    ax.set_xscale("symlog", linthresh=10 ** np.floor(np.log10(positive.min())) / 10 if len(positive) else 1.0)
    ax.set_xlabel("bytes sent per sample (mean; symmetric log scale, 0 = nothing sent)")
    ax.set_ylabel("answerable F1 of the main model")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    return fig


def f1_by_condition(agg: pd.DataFrame, metrics: pd.DataFrame, title: str) -> Any:
    """Answerable F1 of every variant with its interval; main_full as the reference line, the floors dashed."""
    plt = pyplot()
    rows = agg.iloc[::-1]   # the first variant on top
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * len(rows)), constrained_layout=True)
    filled = rows["survives"] | rows["p_holm"].isna()   # main_full, the reference, is not tested
    for (condition, fill), g in rows.assign(y=y, fill=filled).groupby(["condition", "fill"], sort=False):
        ax.errorbar(g[F1], g["y"], xerr=_errors(g, F1), fmt="o", color=_colour(condition), capsize=2,
                    mfc=_colour(condition) if fill else "white")
    for condition, style, what in (("main_full", "-", "reference"), ("no_context", "--", "floor"),
                                   ("mean_kv", ":", "floor")):
        ref = agg[agg["condition"] == condition]
        if len(ref):
            ax.axvline(ref[F1].iloc[0], color="black", ls=style, lw=1, label=f"{condition} ({what})")
            ax.axvspan(ref[f"{F1}_low"].iloc[0], ref[f"{F1}_high"].iloc[0], color="black", alpha=0.07)
    ax.set_yticks(y, [label(r) for _, r in rows.iterrows()], fontsize=7)
    ax.set_xlabel("answerable F1 (filled: ΔF1 vs main_full survives Holm; open: it does not)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    return fig


def _f1_of(agg: pd.DataFrame, projector: str, objective: str, kind: str) -> str:
    """The answerable F1 of one projector (projected_kv, post-RoPE keys in the key_post panel), for the legend."""
    row = agg[(agg["condition"] == "projected_kv") & (agg["projector"] == projector) & (agg["objective"] == objective)
              & ((agg["key_map"] == "post_rope") == (kind == "key_post"))]
    return "not run" if row.empty else fmt_ci(*row[[F1, f"{F1}_low", f"{F1}_high"]].iloc[0])


def r2_by_layer(agg: pd.DataFrame, metrics: pd.DataFrame, title: str) -> Any:
    """Test R² per main layer for keys and values, one line per projector, its projected_kv F1 in the legend."""
    plt = pyplot()
    r2 = metrics[(metrics["metric"] == "r2") & (metrics["projector"] != "mean")]
    kinds = [k for k in KIND_LABELS if k in set(r2["kind"])] or ["key"]
    colour = {fit: f"C{i}" for i, fit in enumerate(sorted(set(zip(r2["projector"], r2["objective"]))))}
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), sharey=True, squeeze=False,
                             constrained_layout=True)
    for ax, kind in zip(axes[0], kinds):
        for (projector, objective), g in r2[r2["kind"] == kind].groupby(["projector", "objective"]):
            g = g.sort_values("main_layer")
            c = colour[(projector, objective)]
            ax.plot(g["main_layer"], g["value"], "o-", ms=3, color=c,
                    label=f"{projector}/{objective}: answerable F1 {_f1_of(agg, projector, objective, kind)}")
            ax.fill_between(g["main_layer"], g["ci_low"], g["ci_high"], color=c, alpha=0.15)
        ax.axhline(0, color="grey", ls=":", lw=1, label="calibration mean (R² = 0)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_title(KIND_LABELS[kind])
        ax.set_xlabel("main layer")
        ax.legend(fontsize=6, title="projector: projected_kv answerable F1", title_fontsize=6)
    low = min(r2["ci_low"].min(), 0.0) if len(r2) else 0.0
    axes[0, 0].set_ylim(max(low, -1.0) - 0.05, 1.05)   # clipped at −1: a useless layer would flatten the rest
    axes[0, 0].set_ylabel("test R² (centred on the calibration mean)")
    fig.suptitle(title)
    return fig
