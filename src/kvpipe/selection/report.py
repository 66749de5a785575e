"""Tables (with paired bootstrap CIs), figures and the summary of the selection-transfer stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvpipe.io import atomic_path
from kvpipe.stats import bootstrap_counts, percentile_ci

FIGURES = ("f1_vs_retention", "overlap")
NOTES = {  # the notes' figures (Qwen2.5 3B -> 7B, SQuAD v2, 50 samples)
    ("overlap", "q2c", 0.5): 0.863, ("overlap", "q2c", 0.75): 0.915,
    ("overlap", "snapkv", 0.5): 0.895, ("overlap", "snapkv", 0.75): 0.949,
    ("forward", "q2c", 0.5): -0.046, ("forward", "q2c", 0.75): -0.008, ("reverse", "q2c", 0.5): 0.049,
}


class Bootstrap:
    """Means and paired differences of per-sample values with percentile intervals."""

    def __init__(self, samples: np.ndarray, reps: int, level: float, seed: int) -> None:
        self.samples = np.sort(samples)
        self.counts = bootstrap_counts(len(self.samples), reps, seed)
        self.level = level

    def mean(self, values: pd.Series) -> tuple[float, float, float]:
        """Mean over samples (values indexed by sample_idx) with its interval."""
        v = values.reindex(self.samples).to_numpy(dtype=float)
        reps = self.counts @ v / self.counts.sum(1)
        lo, hi = percentile_ci(reps, self.level)
        return float(v.mean()), float(lo), float(hi)

    def delta(self, a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
        """Mean of a - b, paired by sample."""
        return self.mean(a.reindex(self.samples) - b.reindex(self.samples))


def _cell(v: tuple[float, float, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def _verdict(v: tuple[float, float, float]) -> str:
    return "≈ 0 (CI includes 0)" if v[1] <= 0 <= v[2] else ("< 0" if v[2] < 0 else "> 0")


def aggregate(answers: pd.DataFrame, overlaps: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    """Tidy table of every headline mean and delta with its bootstrap interval."""
    boot = Bootstrap(answers["sample_idx"].unique(), cfg["bootstrap"], cfg["ci"], cfg["seed"])
    f1 = answers.set_index(["role", "method", "retention", "source", "sample_idx"])["f1"].sort_index()
    conditions = set(f1.index.droplevel("sample_idx"))
    rows = []

    def add(table: str, role: str, method: str, retention: float, quantity: str, v: tuple[float, float, float]) -> None:
        rows.append({"table": table, "role": role, "method": method, "retention": retention, "quantity": quantity,
                     "value": v[0], "ci_low": v[1], "ci_high": v[2]})

    def series(role: str, method: str, r: float, source: str) -> pd.Series:
        return f1.loc[(role, method, r, source)]

    for role in ("scout", "main"):
        full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")
        add("full_kv", role, "full", 1.0, "f1", boot.mean(full["f1"]))
        add("full_kv", role, "full", 1.0, "exact", boot.mean(full["exact"]))
        for label, mask in (("f1_has_answer", ~full["is_impossible"]), ("f1_no_answer", full["is_impossible"])):
            if mask.any() and not mask.all():
                sub = Bootstrap(full.index[mask].to_numpy(), cfg["bootstrap"], cfg["ci"], cfg["seed"])
                add("full_kv", role, "full", 1.0, label, sub.mean(full.loc[mask, "f1"]))
    methods = [m for m in answers["method"].unique() if m not in ("full", "random")]
    for r in sorted(answers.loc[answers["method"] != "full", "retention"].unique()):
        for role, other, direction in (("main", "scout", "forward"), ("scout", "main", "reverse")):
            random = series(role, "random", r, "own") if "random" in answers["method"].values else None
            full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")["f1"]
            if random is not None:
                add("transfer", role, "random", r, "f1", boot.mean(random))
            for m in methods:
                own, moved = series(role, m, r, "own"), series(role, m, r, "transfer")
                add("transfer", role, m, r, "f1_own", boot.mean(own))
                if (role, m, r, "own_per_head") in conditions:
                    per_head = series(role, m, r, "own_per_head")
                    add("transfer", role, m, r, "f1_own_per_head", boot.mean(per_head))
                    add("transfer", role, m, r, "delta_per_head_vs_shared", boot.delta(per_head, own))
                add("transfer", role, m, r, f"f1_from_{other}", boot.mean(moved))
                add("transfer", role, m, r, f"delta_{direction}", boot.delta(moved, own))
                add("transfer", role, m, r, "delta_own_vs_full", boot.delta(own, full))
                if random is not None:
                    add("transfer", role, m, r, "delta_own_vs_random", boot.delta(own, random))
    for (m, r), group in overlaps.groupby(["method", "retention"]):
        g = group.set_index("sample_idx")
        for quantity in ("overlap", "jaccard", "spearman", "overlap_random", "jaccard_random"):
            add("overlap", "pair", m, r, quantity, boot.mean(g[quantity]))
        add("overlap", "pair", m, r, "overlap_minus_random", boot.delta(g["overlap"], g["overlap_random"]))
    return pd.DataFrame(rows)


def write_figures(agg: pd.DataFrame, out_dir: Path, title: str) -> None:
    """F1 versus retention per condition, and overlap per method (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tr = agg[agg["table"] == "transfer"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
    for ax, role, other in ((axes[0], "main", "scout"), (axes[1], "scout", "main")):
        for (method, quantity), g in tr[(tr["role"] == role) & tr["quantity"].isin(["f1_own", f"f1_from_{other}", "f1"])
                                        ].groupby(["method", "quantity"]):
            g = g.sort_values("retention")
            label = "random" if method == "random" else f"{method}, {'own' if quantity == 'f1_own' else 'from ' + other}"
            line = ax.plot(g["retention"], g["value"], "o-" if "own" in quantity else "s--", label=label)[0]
            ax.fill_between(g["retention"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15)
        full = agg[(agg["table"] == "full_kv") & (agg["role"] == role) & (agg["quantity"] == "f1")]
        if len(full):
            ax.axhline(full["value"].iloc[0], color="black", lw=1, label="full KV")
        ax.set_title(f"{role} model")
        ax.set_xlabel("retention (share of context tokens kept)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("SQuAD F1")
    fig.suptitle(title)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"{FIGURES[0]}.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)

    ov = agg[agg["table"] == "overlap"]
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    for method, g in ov[ov["quantity"] == "overlap"].groupby("method"):
        g = g.sort_values("retention")
        line = ax.plot(g["retention"], g["value"], "o-", label=f"{method}: scout ∩ main / k")[0]
        ax.fill_between(g["retention"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15)
    rnd = ov[ov["quantity"] == "overlap_random"].groupby("retention")["value"].mean()
    ax.plot(rnd.index, rnd.values, "k:", label="random expectation")
    ax.set_xlabel("retention")
    ax.set_ylabel("selection overlap")
    ax.legend(fontsize=7)
    ax.set_title(title)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"{FIGURES[1]}.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)


def summary_markdown(agg: pd.DataFrame, answers: pd.DataFrame, timings: pd.DataFrame, cfg: dict[str, Any],
                     pair: str, dataset: str) -> str:
    """The notes' three tables regenerated from data, with the notes' figures beside ours."""
    def get(table: str, role: str, method: str, r: float, quantity: str) -> tuple[float, float, float] | None:
        sel = agg[(agg["table"] == table) & (agg["role"] == role) & (agg["method"] == method)
                  & np.isclose(agg["retention"], r) & (agg["quantity"] == quantity)]
        return None if sel.empty else tuple(sel[["value", "ci_low", "ci_high"]].iloc[0])

    scout, main = (answers.loc[answers["role"] == r, "model"].iloc[0] for r in ("scout", "main"))
    n = answers["sample_idx"].nunique()
    level = int(round(100 * cfg["ci"]))
    lines = [f"# Selection transfer: {scout} (scout) ↔ {main} (main), pair {pair}, {dataset}", "",
             f"{n} samples; greedy decoding, at most {cfg['max_new_tokens']} new tokens; intervals: {level} % "
             f"bootstrap over samples ({cfg['bootstrap']} resamples), paired for every delta. A delta whose interval "
             "includes 0 is reported as not distinguishable from 0.", "",
             "## Full-KV baselines", "", "| model | F1 | exact match | HasAns F1 | NoAns F1 |", "|---|---|---|---|---|"]
    for role, model in (("scout", scout), ("main", main)):
        cells = [get("full_kv", role, "full", 1.0, q) for q in ("f1", "exact", "f1_has_answer", "f1_no_answer")]
        lines.append(f"| {model} ({role}) | " + " | ".join("—" if c is None else _cell(c) for c in cells) + " |")
    lines += ["", "## Selection overlap between scout and main", "",
              "Random selections are seeded per sample and shared by both models, so they are left out here; "
              "the random expectation column is the overlap two independent random selections would have.", "",
              "| method | retention | overlap |A∩B|/k | notes | random expectation | overlap − random | Jaccard | Spearman ρ of scores |",
              "|---|---|---|---|---|---|---|---|"]
    ov = agg[(agg["table"] == "overlap") & (agg["method"] != "random")]  # random: the same positions by design
    for (m, r), _ in ov.groupby(["method", "retention"]):
        note = NOTES.get(("overlap", m, r))
        lines.append(f"| {m} | {r:.2f} | {_cell(get('overlap', 'pair', m, r, 'overlap'))} | "
                     f"{'—' if note is None else f'{note:.3f}'} | {get('overlap', 'pair', m, r, 'overlap_random')[0]:.3f} | "
                     f"{_cell(get('overlap', 'pair', m, r, 'overlap_minus_random'), True)} | "
                     f"{_cell(get('overlap', 'pair', m, r, 'jaccard'))} | {_cell(get('overlap', 'pair', m, r, 'spearman'))} |")
    lines += ["", "## Cross-model transfer F1", "",
              "| method | retention | main own | main with scout's | Δ forward | notes Δ | scout own | scout with main's | "
              "Δ reverse | notes Δ | random (main / scout) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    tr = agg[(agg["table"] == "transfer") & (agg["method"] != "random")]
    for (m, r), _ in tr.groupby(["method", "retention"]):
        fwd, rev = get("transfer", "main", m, r, "delta_forward"), get("transfer", "scout", m, r, "delta_reverse")
        rm, rs = get("transfer", "main", "random", r, "f1"), get("transfer", "scout", "random", r, "f1")
        nf, nr = NOTES.get(("forward", m, r)), NOTES.get(("reverse", m, r))
        lines.append(
            f"| {m} | {r:.2f} | {_cell(get('transfer', 'main', m, r, 'f1_own'))} | "
            f"{_cell(get('transfer', 'main', m, r, 'f1_from_scout'))} | {_cell(fwd, True)} {_verdict(fwd)} | "
            f"{'—' if nf is None else f'{nf:+.3f}'} | {_cell(get('transfer', 'scout', m, r, 'f1_own'))} | "
            f"{_cell(get('transfer', 'scout', m, r, 'f1_from_main'))} | {_cell(rev, True)} {_verdict(rev)} | "
            f"{'—' if nr is None else f'{nr:+.3f}'} | "
            f"{'—' if rm is None else f'{rm[0]:.3f} / {rs[0]:.3f}'} |")
    lines += ["", "## Against the random baseline and full KV", "",
              "| model | method | retention | own − random | own − full KV | per-head − shared |", "|---|---|---|---|---|---|"]
    for (role, m, r), _ in tr[tr["retention"] < 1].groupby(["role", "method", "retention"]):
        cells = [get("transfer", role, m, r, q) for q in ("delta_own_vs_random", "delta_own_vs_full", "delta_per_head_vs_shared")]
        lines.append(f"| {role} | {m} | {r:.2f} | " + " | ".join(
            "—" if c is None else f"{_cell(c, True)} {_verdict(c)}" for c in cells) + " |")
    if len(timings):
        t = timings.groupby("role")[["prefill_s", "full_answer_s", "scoring_s"]].median()
        lines += ["", "## Time (median per sample, seconds)", "", "| model | context prefill | full-KV answer | scoring |",
                  "|---|---|---|---|"]
        lines += [f"| {role} | {t.loc[role, 'prefill_s']:.2f} | {t.loc[role, 'full_answer_s']:.2f} | "
                  f"{t.loc[role, 'scoring_s']:.3f} |" for role in t.index]
    lines += ["", "Figures: `figures/f1_vs_retention`, `figures/overlap` (PNG and PDF). Per-sample answers: "
              "`answers.parquet`; overlaps: `overlap.parquet`; every figure above: `aggregates.parquet`.", ""]
    return "\n".join(lines)


def write_report(answers: pd.DataFrame, overlaps: pd.DataFrame, timings: pd.DataFrame, cfg: dict[str, Any],
                 pair: str, dataset: str, out_dir: Path) -> pd.DataFrame:
    """aggregates.parquet, figures/ and summary.md under out_dir."""
    agg = aggregate(answers, overlaps, cfg)
    write_figures(agg, out_dir / "figures", f"pair {pair} on {dataset}")
    with atomic_path(out_dir / "aggregates.parquet") as tmp:
        agg.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(summary_markdown(agg, answers, timings, cfg, pair, dataset))
    return agg
