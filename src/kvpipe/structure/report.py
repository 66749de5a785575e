"""Figures and the markdown summary of the structural analysis, from metrics.parquet and facts.json only.

The workflow imports FIGURES when it builds the DAG, so matplotlib is imported only inside
the drawing functions (kvpipe.reporting.pyplot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kvpipe.io import read_json, write_text
from kvpipe.reporting import fmt_ci, pyplot, save_figure

FIGURES = ("transfer_heatmap", "cka_matrices", "cosine_r2_baseline")
KIND_LABELS = {"key": "keys (post-RoPE)", "key_pre_rope": "keys (pre-RoPE)", "value": "values"}

# The notes' claims (Qwen2.5-3B -> 7B), with the test each must pass here.
CLAIMS = {
    "keys_cosine": 0.9997, "keys_rel_error": 0.048, "values_cosine": 0.222, "values_rel_error": 1.076,
    "last_layer_cka": 0.995, "projection_error": 0.015,
}


def _layer_view(table: pd.DataFrame, metric: str, baseline: str = "none") -> pd.DataFrame:
    sel = table[(table["metric"] == metric) & (table["baseline"] == baseline) & (table["head"] == -1)
                & table["kind"].isin(KIND_LABELS)]
    return sel.sort_values(["kind", "scout_layer"])


def _transfer_heatmap(table: pd.DataFrame, out_dir: Path, title: str) -> None:
    plt = pyplot()
    kinds = list(KIND_LABELS)
    fig, axes = plt.subplots(3, 1, figsize=(10, 6.5), constrained_layout=True)
    for ax, (metric, cmap, lims) in zip(axes, [("cosine", "viridis", (0, 1)), ("rel_error", "magma_r", (0, 1.5)),
                                               ("r2", "viridis", (0, 1))]):
        view = _layer_view(table, metric)
        grid = view.pivot(index="kind", columns="scout_layer", values="value").reindex(kinds)
        im = ax.imshow(grid.to_numpy(), aspect="auto", cmap=cmap, vmin=lims[0], vmax=lims[1])
        ax.set_yticks(range(len(kinds)), [KIND_LABELS[k] for k in kinds])
        main_of = view.drop_duplicates("scout_layer").set_index("scout_layer")["main_layer"]
        ax.set_xticks(range(grid.shape[1]), [f"{s}\n{main_of[s]}" for s in grid.columns], fontsize=6)
        ax.set_title(f"ridge scout→main, test tokens: {metric}")
        fig.colorbar(im, ax=ax)
    axes[-1].set_xlabel("scout layer / main layer (aligned by relative depth)")
    fig.suptitle(title)
    save_figure(fig, out_dir, FIGURES[0])
    plt.close(fig)


def _cka_matrices(table: pd.DataFrame, out_dir: Path, title: str) -> None:
    plt = pyplot()
    kinds = list(KIND_LABELS)
    fig, axes = plt.subplots(len(kinds), 2, figsize=(9, 3.6 * len(kinds)), constrained_layout=True)
    for r, kind in enumerate(kinds):
        for c, metric in enumerate(("cka", "cka_debiased")):
            sel = table[(table["metric"] == metric) & (table["kind"] == kind)]
            grid = sel.pivot(index="scout_layer", columns="main_layer", values="value")
            im = axes[r, c].imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
            axes[r, c].set_title(f"{KIND_LABELS[kind]}: {'debiased' if c else 'biased'} CKA")
            axes[r, c].set_xlabel("main layer")
            axes[r, c].set_ylabel("scout layer")
            fig.colorbar(im, ax=axes[r, c])
    fig.suptitle(title)
    save_figure(fig, out_dir, FIGURES[1])
    plt.close(fig)


def _cosine_r2_baseline(table: pd.DataFrame, out_dir: Path, title: str) -> None:
    plt = pyplot()
    kinds = list(KIND_LABELS)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), sharey=True, constrained_layout=True)
    for ax, kind in zip(axes, kinds):
        for metric, baseline, label, style in [("cosine", "none", "cosine, ridge map", "-"),
                                               ("cosine", "mean", "cosine, mean predictor", "--"),
                                               ("r2", "none", "centred R², ridge map", "-"),
                                               ("r2", "shuffled", "centred R², shuffled pairs", ":")]:
            v = _layer_view(table, metric, baseline)
            v = v[v["kind"] == kind]
            line = ax.plot(v["scout_layer"], v["value"], style, label=label)[0]
            ax.fill_between(v["scout_layer"], v["ci_low"], v["ci_high"], color=line.get_color(), alpha=0.2)
        ax.set_title(KIND_LABELS[kind])
        ax.set_xlabel("scout layer")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, out_dir, FIGURES[2])
    plt.close(fig)


def _get(table: pd.DataFrame, **where: Any) -> pd.Series:
    sel = table
    for col, val in where.items():
        sel = sel[sel[col] == val]
    if len(sel) != 1:
        raise ValueError(f"expected one row for {where}, found {len(sel)}")
    return sel.iloc[0]


def _fmt(row: pd.Series, pct: bool = False) -> str:
    return fmt_ci(row["value"], row["ci_low"], row["ci_high"], percent=pct)


def _header(facts: dict[str, Any], dataset: str) -> list[str]:
    s_last, m_last = facts["aligned_layers"][-1]
    return [
        f"# Structural analysis: {facts['scout']} → {facts['main']} on {dataset}",
        "",
        f"{facts['n_calibration_samples']} calibration and {facts['n_test_samples']} test samples from "
        f"{facts['n_calibration_passages']} and {facts['n_test_passages']} of {facts['n_passages']} passages (split by "
        f"passage: questions on one passage share its context), {facts['n_test_tokens']} test tokens of segments "
        f"{', '.join(facts['segments'])}; CKA on {facts['cka_tokens']} sampled tokens. Intervals: "
        f"{int(round(100 * facts['ci']))} % bootstrap over test samples ({facts['bootstrap']} resamples); CKA: "
        f"delete-half jackknife. Headline layer: scout {s_last} → main {m_last} (the last aligned pair). Centred R² = "
        "1 − SSE / SSE of the calibration-mean predictor: 0 for that predictor, 1 for a perfect map.",
        "",
        "| claim (notes, Qwen2.5 3B→7B) | measured here | baselines | verdict |",
        "|---|---|---|---|",
    ]


def _transfer_claims(table: pd.DataFrame, last: dict[str, int]) -> list[str]:
    def fig(kind: str, metric: str, baseline: str = "none") -> pd.Series:
        return _get(table, kind=kind, metric=metric, baseline=baseline, **last)

    lines = []
    for kind, cos_claim, err_claim in (("key", "keys_cosine", "keys_rel_error"), ("value", "values_cosine", "values_rel_error")):
        cos, mean_cos, gain = fig(kind, "cosine"), fig(kind, "cosine", "mean"), fig(kind, "cosine_gain_over_mean", "mean")
        r2, shuf = fig(kind, "r2"), fig(kind, "r2", "shuffled")
        err, mean_err = fig(kind, "rel_error"), fig(kind, "rel_error", "mean")
        name = "keys" if kind == "key" else "values"
        if kind == "key":
            verdict = ("holds: keys are predicted far beyond their mean (R² ≥ 0.9)" if r2["ci_low"] >= 0.9 else
                       f"does not hold once the mean is accounted for: centred R² {_fmt(r2)} (< 0.9); "
                       f"the mean predictor alone reaches cosine {mean_cos['value']:.3f}")
        else:
            key_r2 = fig("key", "r2")
            verdict = (f"direction holds: values R² {r2['value']:.3f} < keys R² {key_r2['value']:.3f}"
                       if r2["value"] < key_r2["value"] else
                       f"does not hold: values R² {r2['value']:.3f} ≥ keys R² {key_r2['value']:.3f}")
        lines.append(f"| {name} cosine {CLAIMS[cos_claim]} | cosine {_fmt(cos)}; centred R² {_fmt(r2)} | "
                     f"mean predictor cosine {_fmt(mean_cos)} (gain over it {_fmt(gain)}); shuffled-pairs R² {_fmt(shuf)} | "
                     f"{verdict} |")
        lines.append(f"| {name} relative error {100 * CLAIMS[err_claim]:.1f} % | {_fmt(err, True)} | "
                     f"mean predictor {_fmt(mean_err, True)} | "
                     f"{'holds (≤ 10 %)' if err['ci_high'] <= 0.10 else 'does not hold (> 10 %)'} "
                     f"for {name}; {'better' if err['value'] < mean_err['value'] else 'no better'} than the mean |")
    return lines


def _cka_and_projection_claims(table: pd.DataFrame, last: dict[str, int]) -> list[str]:
    lines = []
    for kind in ("key", "value"):
        b = _get(table, kind=kind, metric="cka", baseline="none", **last)
        d = _get(table, kind=kind, metric="cka_debiased", baseline="none", **last)
        lines.append(f"| last-layer CKA {CLAIMS['last_layer_cka']} ({'keys' if kind == 'key' else 'values'}) | "
                     f"debiased {_fmt(d)} | biased {_fmt(b)} (inflated when tokens ≪ dims) | "
                     f"{'holds (debiased ≥ 0.95)' if d['value'] >= 0.95 else 'does not hold (debiased < 0.95)'} |")
    errs = [_get(table, kind=k, metric="rel_error", baseline="none", **last) for k in ("key", "value")]
    ok = all(e["value"] <= 0.05 for e in errs)
    lines.append(f"| linear projection error {100 * CLAIMS['projection_error']:.1f} % (last layer KV) | keys "
                 f"{_fmt(errs[0], True)}, values {_fmt(errs[1], True)} | see mean predictor above | "
                 f"{'holds (≤ 5 % for both)' if ok else 'does not hold (> 5 % for keys or values)'} |")
    return lines


def _rope_section(table: pd.DataFrame, aligned: list[list[int]]) -> list[str]:
    lines = ["", "## Does RoPE make the key space shared?", "",
             "If it did, post-RoPE keys would transfer better than pre-RoPE keys and better than values at every "
             "depth. Paired bootstrap of the R² difference, per aligned layer (significant = interval excludes 0):", "",
             "| scout → main | R² keys − keys pre-RoPE | R² keys − values |", "|---|---|---|"]
    counts = {"key_pre_rope": 0, "value": 0}
    for s, m in aligned:
        cells = []
        for other in ("key_pre_rope", "value"):
            d = _get(table, kind=f"key-vs-{other}", metric="r2_difference", scout_layer=s, main_layer=m)
            better = d["ci_low"] > 0
            counts[other] += better
            cells.append(f"{_fmt(d)} {'✓' if better else ('✗' if d['ci_high'] < 0 else '≈')}")
        lines.append(f"| {s} → {m} | {cells[0]} | {cells[1]} |")
    n = len(aligned)
    everywhere = counts["key_pre_rope"] == n and counts["value"] == n
    return lines + ["", f"Post-RoPE keys transfer significantly better than pre-RoPE keys at {counts['key_pre_rope']} of "
                    f"{n} depths and better than values at {counts['value']} of {n}. The RoPE explanation "
                    f"{'holds at every depth' if everywhere else 'does not hold at every depth'}."]


def summary_markdown(table: pd.DataFrame, facts: dict[str, Any], dataset: str) -> str:
    """Markdown that sets the notes' claims beside the measured figures and their baselines."""
    s_last, m_last = facts["aligned_layers"][-1]
    last = {"scout_layer": s_last, "main_layer": m_last, "head": -1}
    lines = (_header(facts, dataset) + _transfer_claims(table, last) + _cka_and_projection_claims(table, last)
             + _rope_section(table, facts["aligned_layers"]))
    lines += ["", f"Figures: {', '.join(f'`figures/{name}`' for name in FIGURES)} (PNG and PDF).", ""]
    return "\n".join(lines)


def write_report(metrics: Path, facts: Path, dataset: str, out_dir: Path) -> None:
    """Read a pair's metrics.parquet and facts.json; write out_dir/summary.md and out_dir/figures/{FIGURES}.png/.pdf."""
    table, run_facts = pd.read_parquet(metrics), read_json(Path(facts))
    out_dir = Path(out_dir)
    title = f"{run_facts['scout']} → {run_facts['main']} ({dataset})"
    for draw in (_transfer_heatmap, _cka_matrices, _cosine_r2_baseline):
        draw(table, out_dir / "figures", title)
    write_text(out_dir / "summary.md", summary_markdown(table, run_facts, dataset))
