"""Figures and the markdown summary (structure/summary.py) of the structural analysis, from metrics.parquet and
facts.json only.

The workflow imports FIGURES when it builds the DAG, so matplotlib is imported only inside
the drawing functions (kvpipe.reporting.pyplot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kvpipe.io import read_json, write_text
from kvpipe.reporting import pyplot, save_figure
from kvpipe.structure.summary import KIND_LABELS, summary_markdown


def _layer_view(table: pd.DataFrame, metric: str, baseline: str = "none") -> pd.DataFrame:
    sel = table[(table["metric"] == metric) & (table["baseline"] == baseline) & (table["head"] == -1)
                & table["kind"].isin(KIND_LABELS)]
    return sel.sort_values(["kind", "scout_layer"])


def _transfer_heatmap(table: pd.DataFrame, title: str) -> Any:
    plt = pyplot()
    kinds = list(KIND_LABELS)
    rows = [("cosine", "viridis", (0, 1)), ("rel_error", "magma_r", (0, 1.5)), ("r2", "viridis", (0, 1)),
            ("r2_per_dim", "viridis", (0, 1)), ("cca", "viridis", (0, 1))]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 10.5), constrained_layout=True)
    for ax, (metric, cmap, lims) in zip(axes, rows):
        view = _layer_view(table, metric)
        grid = view.pivot(index="kind", columns="scout_layer", values="value").reindex(kinds)
        im = ax.imshow(grid.to_numpy(), aspect="auto", cmap=cmap, vmin=lims[0], vmax=lims[1])
        ax.set_yticks(range(len(kinds)), [KIND_LABELS[k] for k in kinds])
        main_of = view.drop_duplicates("scout_layer").set_index("scout_layer")["main_layer"]
        ax.set_xticks(range(grid.shape[1]), [f"{s}\n{main_of[s]}" for s in grid.columns], fontsize=6)
        ax.set_title(f"{'regularised CCA' if metric == 'cca' else 'ridge scout→main'}, test tokens: {metric}")
        fig.colorbar(im, ax=ax)
    axes[-1].set_xlabel("scout layer / main layer (aligned by relative depth)")
    fig.suptitle(title)
    return fig


def _cka_matrices(table: pd.DataFrame, title: str) -> Any:
    plt = pyplot()
    kinds = list(KIND_LABELS)
    fig, axes = plt.subplots(len(kinds), 2, figsize=(9, 3.6 * len(kinds)), constrained_layout=True)
    for r, kind in enumerate(kinds):
        for c, metric in enumerate(("cka", "cka_debiased")):
            sel = table[(table["metric"] == metric) & (table["kind"] == kind)]
            grid = sel.pivot(index="scout_layer", columns="main_layer", values="value")
            # debiased CKA can be negative: a symmetric diverging scale, nothing clipped at 0
            im = axes[r, c].imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
            axes[r, c].set_title(f"{KIND_LABELS[kind]}: {'debiased' if c else 'biased'} CKA")
            axes[r, c].set_xlabel("main layer")
            axes[r, c].set_ylabel("scout layer")
            fig.colorbar(im, ax=axes[r, c])
    fig.suptitle(title)
    return fig


def _cosine_r2_baseline(table: pd.DataFrame, title: str) -> Any:
    plt = pyplot()
    kinds = list(KIND_LABELS)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), sharey=True, constrained_layout=True)
    for ax, kind in zip(axes, kinds):
        for metric, baseline, label, style in [("cosine", "none", "cosine, ridge map", "-"),
                                               ("cosine", "mean", "cosine, mean predictor", "--"),
                                               ("r2", "none", "centred R², ridge map", "-"),
                                               ("r2_per_dim", "none", "per-dimension R², ridge map", "-."),
                                               ("r2", "shuffled", "centred R², shuffled pairs", ":"),
                                               ("r2", "position", "centred R², position only", "--"),
                                               ("cca", "none", "CCA, mean of top canonical corr.", "-"),
                                               ("cca", "shuffled", "CCA, shuffled-pairing null", ":")]:
            v = _layer_view(table, metric, baseline)
            v = v[v["kind"] == kind]
            line = ax.plot(v["scout_layer"], v["value"], style, label=label)[0]
            ax.fill_between(v["scout_layer"], v["ci_low"], v["ci_high"], color=line.get_color(), alpha=0.2)
        ax.set_title(KIND_LABELS[kind])
        ax.set_xlabel("scout layer")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


_DRAW = {"transfer_heatmap": _transfer_heatmap, "cka_matrices": _cka_matrices, "cosine_r2_baseline": _cosine_r2_baseline}
FIGURES = tuple(_DRAW)


def write_report(metrics: Path, facts: Path, dataset: str, out_dir: Path) -> None:
    """Read a pair's metrics.parquet and facts.json; write out_dir/summary.md and out_dir/figures/{FIGURES}.png/.pdf."""
    table, run_facts = pd.read_parquet(metrics), read_json(Path(facts))
    out_dir = Path(out_dir)
    title = f"{run_facts['scout']} → {run_facts['main']} ({dataset})"
    for name, draw in _DRAW.items():
        save_figure(draw(table, title), out_dir / "figures", name)
    write_text(out_dir / "summary.md", summary_markdown(table, run_facts, dataset, FIGURES))
