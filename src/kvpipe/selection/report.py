"""Report of the selection-transfer stage, from its tables alone: aggregates, figures, summary and timing.

Reads answers and overlap Parquet and facts.json (written by kvpipe.selection.stage) for the
run-invariant outputs, and its timing file (timings.parquet) for timing.md; the numbers come from
kvpipe.selection.aggregate, the figures from kvpipe.selection.figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvpipe.config import section_defaults
from kvpipe.estimands import ALWAYS_ABSTAIN, ANSWERABLE_F1, NO_CONTEXT, sample_line, with_failure_flags
from kvpipe.io import read_json, write_parquet, write_text
from kvpipe.reporting import Interval, fmt_ci, save_figure
from kvpipe.selection import figures
from kvpipe.selection.aggregate import aggregate
from kvpipe.settings import SelectionSettings, recorded

_DRAW = {"f1_vs_retention": figures.f1_vs_retention, "overlap": figures.overlap}
FIGURES = tuple(_DRAW)
NOTES = {  # the notes' figures (Qwen2.5 3B -> 7B, SQuAD v2, 50 samples)
    ("overlap", "q2c", 0.5): 0.863, ("overlap", "q2c", 0.75): 0.915,
    ("overlap", "snapkv", 0.5): 0.895, ("overlap", "snapkv", 0.75): 0.949,
    ("forward", "q2c", 0.5): -0.046, ("forward", "q2c", 0.75): -0.008, ("reverse", "q2c", 0.5): 0.049,
}


class _Lookup:
    """One aggregates cell by (table, role, method, retention, quantity), formatted."""

    def __init__(self, agg: pd.DataFrame) -> None:
        self.agg = agg

    def row(self, table: str, role: str, method: str, r: float, quantity: str) -> pd.Series | None:
        a = self.agg
        sel = a[(a["table"] == table) & (a["role"] == role) & (a["method"] == method) & np.isclose(a["retention"], r)
                & (a["quantity"] == quantity)]
        return None if sel.empty else sel.iloc[0]

    def __call__(self, table: str, role: str, method: str, r: float, quantity: str) -> Interval | None:
        row = self.row(table, role, method, r, quantity)
        return None if row is None else tuple(row[["value", "ci_low", "ci_high"]])

    def cell(self, *key: Any, signed: bool = False, verdict: bool = False, percent: bool = False) -> str:
        """A value with its interval; verdict: followed by the delta's worded verdict (kvpipe.estimands)."""
        row = self.row(*key)
        if row is None:
            return "—"
        text = fmt_ci(row["value"], row["ci_low"], row["ci_high"], signed=signed, percent=percent)
        return text + (f" {row['verdict']}" if verdict and row.get("verdict") else "")


def _note(key: tuple[str, str, float], signed: bool = False) -> str:
    note = NOTES.get(key)
    return "—" if note is None else (f"{note:+.3f}" if signed else f"{note:.3f}")


def _baselines(get: _Lookup, facts: dict[str, Any]) -> list[str]:
    lines = ["## Full-KV answers beside the floors", "",
             "Answerable F1 is the estimand; `no_context` evicts every context token (template and "
             "question only: what the model knows without reading), `always_abstain` is the constant abstention reply. "
             "The all-question F1 is shown, never judged.", "",
             "| model | answerable F1 | no_context answerable F1 | full − no_context | abstains on unanswerable | "
             "abstains on answerable | empty replies on answerable | all-question F1 | exact match |",
             "|---|---|---|---|---|---|---|---|---|"]
    for role in ("scout", "main"):
        cells = [get.cell("full_kv", role, "full", 1.0, "f1_answerable"),
                 get.cell("full_kv", role, NO_CONTEXT, 0.0, "f1_answerable"),
                 get.cell("full_kv", role, "full", 1.0, "delta_full_vs_no_context", signed=True, verdict=True),
                 *(get.cell("full_kv", role, "full", 1.0, q, percent=True)
                   for q in ("abstain_unanswerable", "abstain_answerable", "empty_answerable")),
                 get.cell("full_kv", role, "full", 1.0, "f1"), get.cell("full_kv", role, "full", 1.0, "exact")]
        lines.append(f"| {facts[role]} ({role}) | " + " | ".join(cells) + " |")
    if get("full_kv", "none", ALWAYS_ABSTAIN, 0.0, "f1") is not None:
        lines.append("| always_abstain (no model) | " + get.cell("full_kv", "none", ALWAYS_ABSTAIN, 0.0, "f1_answerable")
                     + " | — | — | " + get.cell("full_kv", "none", ALWAYS_ABSTAIN, 0.0, "abstain_unanswerable",
                                                 percent=True) + " | — | — | "
                     + get.cell("full_kv", "none", ALWAYS_ABSTAIN, 0.0, "f1") + " | — |")
    if get("full_kv", "scout", NO_CONTEXT, 0.0, "f1") is None:
        lines += ["", "This record predates the `no_context` floor: it was not answered."]
    gap = get.cell("full_kv", "pair", "full", 1.0, "f1_main_minus_scout", signed=True, verdict=True)
    if gap != "—":
        lines += ["", f"Main minus scout, answerable F1 paired by sample: {gap}."]
    return lines


def _overlaps(get: _Lookup) -> list[str]:
    lines = ["## Selection overlap between scout and main", "",
             "Random selections are seeded per sample and shared by both models, so they are left out here; "
             "the random expectation column is the exact expected overlap of two independent random selections of "
             "the same size that both keep the method's forced positions (SnapKV's kept window), per sample.", "",
             "| method | retention | overlap \\|A∩B\\|/k | notes | random expectation | overlap − random | Jaccard | "
             "Spearman ρ of scores |",
             "|---|---|---|---|---|---|---|---|"]
    ov = get.agg[(get.agg["table"] == "overlap") & (get.agg["method"] != "random")]  # random: the same positions by design
    for (m, r), _ in ov.groupby(["method", "retention"]):
        key = ("overlap", "pair", m, r)
        lines.append(f"| {m} | {r:.2f} | {get.cell(*key, 'overlap')} | {_note(('overlap', m, r))} | "
                     f"{get(*key, 'overlap_random')[0]:.3f} | {get.cell(*key, 'overlap_minus_random', signed=True)} | "
                     f"{get.cell(*key, 'jaccard')} | {get.cell(*key, 'spearman')} |")
    return lines


def _character_overlaps(get: _Lookup, settings: SelectionSettings) -> list[str]:
    """For a pair whose tokenizers differ: how selections cross tokenizers, and the overlap in characters."""
    ov = get.agg[(get.agg["table"] == "overlap") & (get.agg["method"] != "random")
                 & (get.agg["quantity"] == "char_overlap")]
    if ov.empty:
        return []
    lines = ["", "## Selection overlap in characters (the tokenizers differ)", "",
             "The models tokenise the samples differently, so a selection crosses by the characters it keeps: a main "
             f"token is kept when the scout's kept tokens cover at least {settings.alignment.min_cover:g} of its "
             "characters (`alignment.min_cover`), then the main's budget is met exactly by the scout's scores mapped to "
             "main tokens (the max over the scout tokens covering each), and likewise from main to scout. The overlap "
             "above is counted in main tokens. Here: the share of the main's kept context characters that the scout's "
             "own selection keeps too, beside its exact expectation for a random scout selection of the same size "
             "that keeps the method's forced positions (the main's selection held fixed).", "",
             "| method | retention | character overlap | random expectation | overlap − random |", "|---|---|---|---|---|"]
    for (m, r), _ in ov.groupby(["method", "retention"]):
        key = ("overlap", "pair", m, r)
        lines.append(f"| {m} | {r:.2f} | {get.cell(*key, 'char_overlap')} | {get(*key, 'char_overlap_random')[0]:.3f} | "
                     f"{get.cell(*key, 'char_overlap_minus_random', signed=True)} |")
    return lines


def _transfers(get: _Lookup) -> list[str]:
    lines = ["## Cross-model transfer: answerable F1", "",
             "Δ with its verdict: *better* / *worse* when the interval excludes 0, *equivalent* only by TOST within the "
             "margin (a transfer that costs little), else *undecided* at this n; *at the floor* for every Δ of a model whose "
             "own full KV is not better than its no_context floor (it does not read the context, so no selection of it "
             "can be judged). The notes' Δ are all-question F1.", "",
             "| method | retention | main own | main with scout's | Δ forward | notes Δ | scout own | scout with main's | "
             "Δ reverse | notes Δ | random (main / scout) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    tr = get.agg[(get.agg["table"] == "transfer") & (get.agg["method"] != "random")]
    for (m, r), _ in tr.groupby(["method", "retention"]):
        rm, rs = get("transfer", "main", "random", r, "f1"), get("transfer", "scout", "random", r, "f1")
        lines.append(
            f"| {m} | {r:.2f} | {get.cell('transfer', 'main', m, r, 'f1_own')} | "
            f"{get.cell('transfer', 'main', m, r, 'f1_from_scout')} | "
            f"{get.cell('transfer', 'main', m, r, 'delta_forward', signed=True, verdict=True)} | "
            f"{_note(('forward', m, r), True)} | {get.cell('transfer', 'scout', m, r, 'f1_own')} | "
            f"{get.cell('transfer', 'scout', m, r, 'f1_from_main')} | "
            f"{get.cell('transfer', 'scout', m, r, 'delta_reverse', signed=True, verdict=True)} | "
            f"{_note(('reverse', m, r), True)} | {'—' if rm is None else f'{rm[0]:.3f} / {rs[0]:.3f}'} |")
    lines += ["", "## Against the random baseline and full KV", "",
              "| model | method | retention | own − random | own − full KV | per-head − shared |", "|---|---|---|---|---|---|"]
    for (role, m, r), _ in tr[tr["retention"] < 1].groupby(["role", "method", "retention"]):
        lines.append(f"| {role} | {m} | {r:.2f} | " + " | ".join(
            get.cell("transfer", role, m, r, q, signed=True, verdict=True)
            for q in ("delta_own_vs_random", "delta_own_vs_full", "delta_per_head_vs_shared")) + " |")
    return lines


def _detectable(get: _Lookup, settings: SelectionSettings) -> str:
    """The smallest forward delta the headline interval could tell from 0 at this n."""
    rows = get.agg[(get.agg["table"] == "transfer") & (get.agg["quantity"] == "detectable_forward")]
    if rows.empty:
        return ""
    method = next(m for m in settings.methods if m in set(rows["method"]))   # the first configured method
    head = rows[rows["method"] == method].sort_values("retention").iloc[0]
    return (f"At this n the smallest forward delta distinguishable from 0 is about ±{head['value']:.3f} F1 "
            f"(z × the bootstrap standard error of the headline forward delta, {head['method']} at retention "
            f"{head['retention']:.2f}; {rows['value'].min():.3f}–{rows['value'].max():.3f} over all forward deltas); "
            "smaller true effects read as ≈ 0. ")


def _retention(answers: pd.DataFrame, settings: SelectionSettings) -> list[str]:
    pruned = answers[(answers["retention"] < 1) & (answers["source"] == "own")]
    if pruned.empty:
        return []
    lines = ["## Retention kept", "", f"Budget: `selection.budget: {settings.budget}`. Means (min–max) over samples of the "
             "share of context tokens kept and of the pre-question KV (template prefix + context) kept.", "",
             "| retention | context tokens kept | pre-question KV kept |", "|---|---|---|"]
    for r, g in pruned.groupby("retention"):
        cells = [f"{g[c].mean():.3f} ({g[c].min():.3f}–{g[c].max():.3f})" for c in ("retention_context", "retention_prompt")]
        lines.append(f"| {r:.2f} | " + " | ".join(cells) + " |")
    return lines + [""]


def _multiplicity(agg: pd.DataFrame, settings: SelectionSettings) -> list[str]:
    family = agg[agg["p_holm"].notna()]
    alpha = 1 - settings.ci
    lines = ["", "## Multiple comparisons", "",
             f"The {len(family)} selection deltas above (forward, reverse, own − random, own − full KV; every method, "
             f"retention below 1 and model) form one family: two-sided p-values from each delta's bootstrap standard error "
             f"(normal reference), corrected with Holm's "
             f"step-down method (family-wise error rate {alpha:g}). Deltas that survive:", ""]
    kept = family[family["p_holm"] < alpha]
    if kept.empty:
        return lines + ["none."]
    lines += ["| model | method | retention | delta | value | p | Holm p |", "|---|---|---|---|---|---|---|"]
    return lines + [f"| {x.role} | {x.method} | {x.retention:.2f} | {x.quantity} | "
                    f"{fmt_ci(x.value, x.ci_low, x.ci_high, signed=True)} | {x.p_value:.2g} | {x.p_holm:.2g} |"
                    for x in kept.itertuples()]


def _answerability(get: _Lookup) -> list[str]:
    lines = ["", "## Every question (all-question F1, no verdict) and abstention", "",
             "| method | retention | main own, all F1 | Δ forward, all | scout own, all F1 | Δ reverse, all | main own: "
             "abstains on unanswerable | on answerable | main with scout's: abstains on unanswerable |",
             "|---|---|---|---|---|---|---|---|---|"]
    tr = get.agg[(get.agg["table"] == "transfer_all") & (get.agg["method"] != "random") & (get.agg["retention"] < 1)]
    for (m, r), _ in tr.groupby(["method", "retention"]):
        lines.append(f"| {m} | {r:.2f} | {get.cell('transfer_all', 'main', m, r, 'f1_own')} | "
                     f"{get.cell('transfer_all', 'main', m, r, 'delta_forward', signed=True)} | "
                     f"{get.cell('transfer_all', 'scout', m, r, 'f1_own')} | "
                     f"{get.cell('transfer_all', 'scout', m, r, 'delta_reverse', signed=True)} | "
                     f"{get.cell('abstention', 'main', m, r, 'abstain_unanswerable', percent=True)} | "
                     f"{get.cell('abstention', 'main', m, r, 'abstain_answerable', percent=True)} | "
                     f"{get.cell('abstention', 'main', m, r, 'abstain_unanswerable_transfer', percent=True)} |")
    return lines if len(tr) else []


def timing_markdown(timings: pd.DataFrame, facts: dict[str, Any], dataset: str) -> str:
    """Median seconds per sample of each model's steps, from the stage's timing file."""
    lines = [f"# Selection timing: {facts['scout']} (scout) ↔ {facts['main']} (main), pair {facts['pair']}, {dataset}",
             "", "Median per sample, seconds (measured times differ between runs; the stage's other outputs do not).",
             ""]
    if not len(timings):
        return "\n".join(lines + ["No sample was answered.", ""])
    t = timings.groupby("role")[["prefill_s", "full_answer_s", "scoring_s", "pruned_answers_s"]].median()
    lines += ["| model | context prefill | full-KV answer | scoring | pruned conditions (one batch) |", "|---|---|---|---|---|"]
    lines += [f"| {role} | {t.loc[role, 'prefill_s']:.2f} | {t.loc[role, 'full_answer_s']:.2f} | "
              f"{t.loc[role, 'scoring_s']:.3f} | {t.loc[role, 'pruned_answers_s']:.2f} |" for role in t.index]
    return "\n".join(lines + [""])


def _sample_line(answers: pd.DataFrame, facts: dict[str, Any]) -> str:
    """The n used, its passages, and whether it is all of the sampled n or a subset of it."""
    n, cap = answers["sample_idx"].nunique(), facts["selection"]["max_samples"]
    used = f"{n} samples from {answers['passage'].nunique()} passages"
    if n < facts["n_sampled"]:
        return (f"{used}: a subset of the {facts['n_sampled']} sampled (`selection.max_samples: {cap}`; whole passages "
                "in sample order)")
    return f"{used} (all {facts['n_sampled']} sampled)"


def summary_markdown(agg: pd.DataFrame, answers: pd.DataFrame, facts: dict[str, Any], dataset: str,
                     margin: float) -> str:
    """The notes' three tables regenerated from data on answerable F1, beside the floors, with the notes' figures."""
    settings, get = recorded(SelectionSettings, "selection", facts["selection"]), _Lookup(agg)
    level = int(round(100 * settings.ci))
    per_sample = answers.groupby("sample_idx")["is_impossible"].first().astype(bool)
    n = sample_line(len(per_sample), int((~per_sample).sum()), answers["passage"].nunique())
    lines = [f"# Selection transfer: {facts['scout']} (scout) ↔ {facts['main']} (main), pair {facts['pair']}, {dataset}",
             "", f"{_sample_line(answers, facts)}: {n}; greedy decoding, at most {settings.max_new_tokens} new tokens. "
             f"**Estimand of every F1 verdict: {ANSWERABLE_F1}**; abstention is reported apart. Intervals: {level} % "
             f"bootstrap over passages (the questions on one passage are resampled together; {settings.bootstrap} "
             "resamples), paired for every delta. Verdicts: *better* / *worse* when the interval excludes 0, "
             f"*equivalent* only by two one-sided tests within ±{margin:g} (`verdicts.equivalence_margin`), else "
             "*undecided*; *at the floor* where a model's own full KV does not beat its no_context floor. "
             + _detectable(get, settings), ""]
    lines += _baselines(get, facts) + [""] + _retention(answers, settings) + _overlaps(get) + _character_overlaps(get, settings)
    lines += [""] + _transfers(get)
    lines += _multiplicity(agg, settings) + _answerability(get)
    lines += ["", "Figures: " + ", ".join(f"`figures/{name}`" for name in FIGURES) + " (PNG and PDF). Per-sample "
              "answers: `answers.parquet`; overlaps: `overlap.parquet`; every figure above: `aggregates.parquet`; "
              "time per step: `timing.md`.", ""]
    return "\n".join(lines)


def write_report(answers: Path, overlap: Path, facts: Path, timing: dict[str, Path], dataset: str, out_dir: Path,
                 verdicts: Mapping[str, Any] | None = None) -> None:
    """aggregates.parquet, summary.md and figures/{FIGURES}.png|pdf under out_dir, from the stage's tables;
    timing.md from its timing file (timing: STAGE.timing name -> path). verdicts: the config's `verdicts` section
    (default: the schema's)."""
    frames = {name: pd.read_parquet(path) for name, path in (("answers", answers), ("overlap", overlap))}
    frames["answers"] = with_failure_flags(frames["answers"])
    about = read_json(Path(facts))
    margin = (verdicts or section_defaults("verdicts"))["equivalence_margin"]
    agg = aggregate(frames["answers"], frames["overlap"], recorded(SelectionSettings, "selection", about["selection"]), margin)
    out_dir = Path(out_dir)
    for name, draw in _DRAW.items():
        save_figure(draw(agg, f"pair {about['pair']} on {dataset}"), out_dir / "figures", name)
    write_parquet(agg, out_dir / "aggregates.parquet")
    write_text(out_dir / "summary.md", summary_markdown(agg, frames["answers"], about, dataset, margin))
    write_text(out_dir / "timing.md", timing_markdown(pd.read_parquet(timing["timings.parquet"]), about, dataset))
