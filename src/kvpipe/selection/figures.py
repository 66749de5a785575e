"""The selection-transfer figures, drawn from the aggregates table (matplotlib imported on use)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from kvpipe.reporting import pyplot


def f1_vs_retention(agg: pd.DataFrame, title: str) -> Any:
    """Answerable F1 versus retention per condition, one panel per answering model, with the full-KV and no-context
    lines."""
    plt = pyplot()
    tr = agg[agg["table"] == "transfer"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
    for ax, role, other in ((axes[0], "main", "scout"), (axes[1], "scout", "main")):
        for (method, quantity), g in tr[(tr["role"] == role) & tr["quantity"].isin(["f1_own", f"f1_from_{other}", "f1"])
                                        ].groupby(["method", "quantity"]):
            g = g.sort_values("retention")
            label = "random" if method == "random" else f"{method}, {'own' if quantity == 'f1_own' else 'from ' + other}"
            line = ax.plot(g["retention"], g["value"], "o-" if "own" in quantity else "s--", label=label)[0]
            ax.fill_between(g["retention"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15)
        full = agg[(agg["table"] == "full_kv") & (agg["role"] == role) & (agg["method"] == "full")
                   & (agg["quantity"] == "f1_answerable")]
        if len(full):
            ax.axhline(full["value"].iloc[0], color="black", lw=1, label="full KV")
        floor = agg[(agg["table"] == "full_kv") & (agg["role"] == role) & (agg["method"] == "no_context")
                    & (agg["quantity"] == "f1_answerable")]
        if len(floor):
            ax.axhline(floor["value"].iloc[0], color="black", lw=1, ls="--", label="no context (floor)")
        ax.set_title(f"{role} model")
        ax.set_xlabel("retention (share of context tokens kept)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("answerable F1")
    fig.suptitle(title)
    return fig


def overlap(agg: pd.DataFrame, title: str) -> Any:
    """Scout/main selection overlap per method against retention, with each method's random expectation."""
    plt = pyplot()
    ov = agg[(agg["table"] == "overlap") & (agg["method"] != "random")]  # random: the same positions by design
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    for method, g in ov[ov["quantity"] == "overlap"].groupby("method"):
        g = g.sort_values("retention")
        line = ax.plot(g["retention"], g["value"], "o-", label=f"{method}: scout ∩ main / k")[0]
        ax.fill_between(g["retention"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15)
        rnd = ov[(ov["method"] == method) & (ov["quantity"] == "overlap_random")].sort_values("retention")
        ax.plot(rnd["retention"], rnd["value"], ":", color=line.get_color(), label=f"{method}: random expectation")
    ax.set_xlabel("retention")
    ax.set_ylabel("selection overlap")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig
