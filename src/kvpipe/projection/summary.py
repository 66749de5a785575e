"""The markdown summary of the projection stage: verdicts on answerable F1 beside the floors, then the research
notes' four questions, their figures beside ours.

Reads only the stage's tables and facts.json, with the aggregates of kvpipe.projection.aggregate and the
vocabulary of kvpipe.estimands; imports no compute code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvpipe.estimands import ABSTAIN_UNANSWERABLE, ANSWERABLE_F1, sample_line
from kvpipe.projection.aggregate import (
    BASELINE,
    DIAGNOSTICS,
    FLOOR_VARIANTS,
    INJECTED,
    Paired,
    label,
    on_front,
    variant_of,
)
from kvpipe.reporting import Interval, fmt_ci
from kvpipe.settings import ProjectionSettings, recorded

NOTES = {"keys_cosine": 0.9997, "values_cosine": 0.222}   # the notes (Qwen2.5 3B -> 7B, linear map, test tokens)


def _ci(row: pd.Series, name: str, **kw: Any) -> str:
    """A column with its interval, '—' when it is undefined (e.g. no unanswerable question)."""
    return "—" if name not in row or math.isnan(row[name]) else fmt_ci(row[name], row[f"{name}_low"],
                                                                       row[f"{name}_high"], **kw)


def _num(x: float, spec: str = ".2g") -> str:
    return "—" if math.isnan(x) else format(x, spec)


def _verdict(row: pd.Series, baseline: str) -> str:
    """A row's worded answerable-F1 verdict against main_full or a floor, with its delta."""
    key = "delta_f1" if baseline == BASELINE[0] else f"delta_f1_vs_{baseline}"
    word = row.get("verdict" if baseline == BASELINE[0] else f"verdict_vs_{baseline}", "")
    if not word or key not in row or math.isnan(row[key]):
        return "—"
    return f"{word} ({_ci(row, key, signed=True)})"


def _rows(agg: pd.DataFrame, condition: str) -> pd.DataFrame:
    return agg[agg["condition"] == condition]


def _by_projector(agg: pd.DataFrame, condition: str) -> dict[tuple[str, str], pd.Series]:
    """The condition's rows by (projector, objective), pre-RoPE key maps only."""
    return {(r["projector"], r["objective"]): r for _, r in _rows(agg, condition).iterrows() if r["key_map"] != "post_rope"}


def _versus(paired: Paired, a: pd.Series, b: pd.Series, margin: float, baseline: str) -> str:
    """The worded answerable-F1 comparison of two rows."""
    return paired.compare(variant_of(a), variant_of(b), margin).words(baseline)


def _header(agg: pd.DataFrame, answers: pd.DataFrame, facts: dict[str, Any], settings: ProjectionSettings, dataset: str,
            margin: float) -> list[str]:
    layer_map = facts.get("layer_map", {})
    per_sample = answers.groupby("sample_idx")["is_impossible"].first()
    n_passages = answers["passage"].nunique()
    lines = [f"# Projection: {facts['scout']} (scout) → {facts['main']} (main), pair {facts['pair']}, {dataset}", "",
             f"Test set: {sample_line(len(per_sample), int((~per_sample).sum()), n_passages)}; the projectors were "
             f"fitted on {facts.get('n_calibration_samples', '?')} calibration samples from other passages. "
             f"**Estimand of every verdict: {ANSWERABLE_F1}** (an empty or abstaining reply scores 1 on an "
             f"unanswerable question, so the all-question F1 can be won by a cache that carries nothing; it is shown, "
             f"never judged). {ABSTAIN_UNANSWERABLE.capitalize()} and wrong abstentions or empty replies on answerable "
             "ones are reported apart. Floors: `no_context` (every context token evicted: what the main knows "
             "without reading), `mean_kv` (the calibration mean at every context position) and `always_abstain`. A "
             "condition *carries content* only when its answerable F1 is better than both `no_context` and `mean_kv`. "
             f"Intervals: {int(round(100 * settings.ci))} % bootstrap over test passages ({settings.bootstrap} resamples), "
             "paired by sample. Verdicts: *better* / *worse* when the interval excludes 0; *equivalent* only by two "
             f"one-sided tests (the {int(round(100 * (2 * settings.ci - 1)))} % interval inside ±{margin:g}, "
             "`verdicts.equivalence_margin`); else *undecided at this n*; *at the floor* against main_full where main_full "
             "itself is not better than `no_context` (no cache can then be judged against it).", ""]
    if facts.get("n_template_tokens"):
        lines += [f"The chat template before the context ({facts['n_template_tokens']} tokens) is the same for every "
                  "question: the main prefills it once per deployment and every given cache keeps those rows of its "
                  "own, so no condition sends it (bytes count context rows only).", ""]
    if layer_map:
        lines += [f"Layer map `{layer_map['name']}`: the scout layer of each main layer 0, 1, …: "
                  f"{', '.join(map(str, layer_map['scout_layer_of_main']))}.", ""]
    family = agg[agg["p_value"].notna()]
    if len(family):
        lines += [f"At this n the smallest answerable-ΔF1 distinguishable from 0 is about ±{family['detectable'].min():.3f}"
                  f"–{family['detectable'].max():.3f} F1 over the variants (z × the passage-bootstrap standard error "
                  "of each ΔF1 against main_full).", ""]
    return lines


def _verdicts(agg: pd.DataFrame, margin: float) -> list[str]:
    floors = [f for f in FLOOR_VARIANTS if f in set(agg["condition"])]
    lines = ["## Verdicts: answerable F1 against main_full and the floors", "",
             "| variant | answerable F1 | vs main_full | " + " | ".join(f"vs {f}" for f in floors)
             + f" | carries content | {ABSTAIN_UNANSWERABLE} | abstains on answerable | empty replies on answerable "
             "| all-question F1 (no verdict) |", "|---" * (8 + len(floors)) + "|"]
    for _, r in agg.iterrows():
        cells = [label(r), _ci(r, "f1_answerable"), _verdict(r, BASELINE[0]) if r["condition"] != BASELINE[0] else "—",
                 *(_verdict(r, f) for f in floors), "yes" if r["carries_content"] else "no",
                 _ci(r, "abstain_unanswerable"), _ci(r, "abstain_answerable"), _ci(r, "empty_answerable"), _ci(r, "f1")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + _plainly(agg, margin)
    return lines


def _plainly(agg: pd.DataFrame, margin: float) -> list[str]:
    """Whether any cache the main did not compute carries the answer, in one paragraph."""
    injected = agg[agg["condition"].isin(INJECTED)]
    content = injected[injected["carries_content"]]
    if injected.empty:
        return ["No injected cache was answered."]
    if len(FLOOR_VARIANTS) > len(set(agg["condition"]) & set(FLOOR_VARIANTS)):
        return ["The floors `no_context` and `mean_kv` were not both answered: no condition can be said to carry "
                "content."]
    best = injected.sort_values("f1_answerable", ascending=False).iloc[0]
    if content.empty:
        return [f"**No injected cache carries content**: none of the {len(injected)} projected or chained caches "
                f"answers answerable questions better than both floors. The best, {label(best)}, reaches answerable "
                f"F1 {_ci(best, 'f1_answerable')} against main_full's {_ci(_rows(agg, BASELINE[0]).iloc[0], 'f1_answerable')}"
                + ("." if math.isnan(best["abstain_unanswerable"]) else   # a test set without unanswerable questions
                   f"; it abstains on {_ci(best, 'abstain_unanswerable', percent=True)} of unanswerable questions.")]
    names = ", ".join(label(r) for _, r in content.iterrows())
    return [f"Injected caches that carry content: {names}. The best, {label(best)}: answerable F1 "
            f"{_ci(best, 'f1_answerable')}, {_verdict(best, BASELINE[0])} against main_full (margin ±{margin:g})."]


def _question_a(agg: pd.DataFrame) -> list[str]:
    lines = ["## (a) Does a learned projection let the main model answer?", "",
             "Notes: planned, not measured. The main answers from the scout's projected context keys and values (no "
             "prefill of its own context). Answerable F1 per projector, with the verdicts of the table above:", "",
             "| projector | answerable F1 | vs main_full | carries content |", "|---|---|---|---|"]
    for _, r in _rows(agg, "projected_kv").iterrows():
        lines.append(f"| {label(r)} | {_ci(r, 'f1_answerable')} | {_verdict(r, BASELINE[0])} | "
                     f"{'yes' if r['carries_content'] else 'no'} |")
    return lines


def _layer_means(metrics: pd.DataFrame, kind: str, metric: str) -> pd.Series:
    sel = metrics[(metrics["kind"] == kind) & (metrics["metric"] == metric)]
    return sel.groupby(["projector", "objective"])["value"].agg(
        lambda v: f"{v.mean():.3f} ({v.min():.3f}–{v.max():.3f})")


def _question_b(agg: pd.DataFrame, metrics: pd.DataFrame, paired: Paired, margin: float) -> list[str]:
    lines = ["## (b) Does key-only transfer beat value transfer?", "",
             f"Notes: keys {NOTES['keys_cosine']} vs values {NOTES['values_cosine']} cosine (linear map, test tokens). "
             "Here: test cosine and centred R² per projector, mean over main layers (min–max); `mean` is the "
             "calibration-mean predictor, whose cosine shows how much of a raw cosine is a shared mean.", "",
             "| projector | key cosine | value cosine | key R² | value R² |", "|---|---|---|---|---|",
             f"| notes (3B→7B, linear) | {NOTES['keys_cosine']} | {NOTES['values_cosine']} | — | — |"]
    cells = {(kind, m): _layer_means(metrics, kind, m) for kind in ("key", "value") for m in ("cosine", "r2")}
    for p, o in sorted(set().union(*(c.index for c in cells.values()))):
        values = [cells[(k, m)].get((p, o), "—") for m in ("cosine", "r2") for k in ("key", "value")]
        lines.append(f"| {p if o == 'none' else f'{p}/{o}'} | " + " | ".join(values) + " |")
    lines += ["", "Functionally, on answerable questions: projected keys with the main's own values against the main's "
              "own keys with projected values (diagnostics: each half still needs the main's own prefill).", "",
              "| projector | answerable F1, keys projected | answerable F1, values projected | keys − values projected |",
              "|---|---|---|---|"]
    values = _by_projector(agg, "own_k_projected_v")
    for _, r in _rows(agg, "projected_k_own_v").iterrows():
        v = values.get((r["projector"], r["objective"]))
        if v is not None:
            lines.append(f"| {r['projector']}/{r['objective']} | {_ci(r, 'f1_answerable')} | {_ci(v, 'f1_answerable')} | "
                         f"{_versus(paired, r, v, margin, 'value-only transfer')} |")
    return lines


def _question_c(agg: pd.DataFrame, paired: Paired) -> list[str]:
    chain = _rows(agg, "chain")
    if chain.empty:
        return []
    lines = ["", "## (c) What does the chain cost in answerable F1 per byte saved?", "",
             "The chain sends the scout's selected tokens' KV as rank-limited SVD factors plus the positions; "
             "ΔF1 (answerable) and bytes saved are against projected_kv of the same projector (full context KV in fp16).",
             "", "| projector | retention | rank | answerable F1 | ΔF1 vs projected_kv | bytes | bytes saved | "
             "F1 lost per MB saved | bytes / text |", "|---|---|---|---|---|---|---|---|---|"]
    full = _by_projector(agg, "projected_kv")
    for _, r in chain.iterrows():
        ref = full.get((r["projector"], r["objective"]))
        if ref is None:
            continue
        d: Interval = paired.delta(variant_of(r), variant_of(ref))[0]
        saved = ref["bytes"] - r["bytes"]
        cost = f"{-d[0] / (saved / 1e6):.3g}" if saved > 0 else "—"
        lines.append(f"| {r['projector']}/{r['objective']} | {r['retention']:.2f} | "
                     f"{'full' if r['rank'] < 0 else r['rank']} | {_ci(r, 'f1_answerable')} | {fmt_ci(*d, signed=True)} | "
                     f"{r['bytes']:,.0f} | {saved:,.0f} ({saved / ref['bytes']:.0%}) | {cost} | {r['bytes_ratio']:.3g} |")
    return lines


def _question_d() -> list[str]:
    return ["", "## (d) How much time to first token does injection save?", "",
            "Answered in timing.md beside this file, end to end (the scout's own prefill and the transfer included) "
            "and for conditions that carry content only: measured times differ between runs, every number in this "
            "file does not.", ""]


def _all_variants(agg: pd.DataFrame, alpha: float) -> list[str]:
    family, kept = agg[agg["p_value"].notna()], agg[agg["survives"]]
    lines = ["", "## Every variant", "",
             f"Answerable ΔF1 vs main_full for the {len(family)} other variants form one family: two-sided p-values "
             f"from the passage-bootstrap standard error, Holm-corrected (family-wise error rate {alpha:.2g}). "
             f"Deltas that survive: {', '.join(label(r) for _, r in kept.iterrows()) or 'none'}. "
             "On the answerable-F1–bytes Pareto front (diagnostics and the constant reply left out): "
             f"{', '.join(label(r) for _, r in agg[on_front(agg)].iterrows())}.", "",
             "| variant | n (answerable) | answerable F1 | unanswerable F1 | all F1 | exact | answerable ΔF1 vs main_full | "
             "Holm p | bytes | × text |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        lines.append(f"| {label(r)} | {r['n']} ({r['n_answerable']}) | {_ci(r, 'f1_answerable')} | "
                     f"{_ci(r, 'f1_unanswerable')} | {_ci(r, 'f1')} | {r['exact']:.3f} | {_ci(r, 'delta_f1', signed=True)} | "
                     f"{_num(r['p_holm'])} | {r['bytes']:,.0f} | {_num(r['bytes_ratio'], '.3g')} |")
    return lines


def summary_markdown(agg: pd.DataFrame, answers: pd.DataFrame, metrics: pd.DataFrame, facts: dict[str, Any],
                     dataset: str, margin: float) -> str:
    """Verdicts on answerable F1 beside the floors, the notes' questions answered from the stage's tables with the
    notes' figures beside ours (the fourth, on time, in timing_markdown)."""
    settings = recorded(ProjectionSettings, "projection", facts["projection"])
    paired = Paired(answers, settings)
    lines = _header(agg, answers, facts, settings, dataset, margin) + _verdicts(agg, margin) + [""] + _question_a(agg) + [""]
    lines += _question_b(agg, metrics, paired, margin) + _question_c(agg, paired) + _question_d()
    lines += _all_variants(agg, 1 - settings.ci)
    return "\n".join(lines + [""])


def _ttft_verdict(r: pd.Series, target: float) -> str:
    if r["ttft_ratio_high"] <= target:
        return "meets"
    return "misses" if r["ttft_ratio_low"] > target else f"undecided (interval spans {target:g})"


def _regime_title(regime: str) -> str:
    if regime.startswith("e2e_"):
        return f"end to end at {regime.removeprefix('e2e_').removesuffix('mbps')} Mbit/s"
    return {"payload": "from the payload (the scout's side and the transfer left out)",
            "prefilled": "context cache ready ahead of time (question pass only)"}.get(regime, regime)


def _timing_tables(ttft: pd.DataFrame, agg: pd.DataFrame, timings: pd.DataFrame, target: float) -> list[str]:
    content = {variant_of(r) for _, r in agg[agg["carries_content"] & (agg["condition"] != BASELINE[0])].iterrows()}
    injected = {variant_of(r) for _, r in agg[~agg["condition"].isin((*DIAGNOSTICS, BASELINE[0]))].iterrows()}
    lines = [f"Target (notes): time to first token ≤ {target:g}× main_full's, end to end: for an injected cache the "
             "scout's own prefill and selection, the projection and cache assembly, the transfer of its bytes at the "
             "link speed and the question pass; for main_full its own prefill and question pass (its text sent at the "
             "same speed). Only a condition that carries content (summary.md) can meet it; a cache without content is "
             "fast and useless. Ratio of mean TTFTs over the samples where both were measured, paired interval.", ""]
    if len(timings):
        med = timings[["scout_prefill_s", "main_prefill_s"]].median()
        lines += [f"Median per sample: scout side {med['scout_prefill_s']:.3f} s, main prefill "
                  f"{med['main_prefill_s']:.3f} s.", ""]
    if not content:
        lines += ["**No condition carries content, so no TTFT verdict is given**; the times below are what a cache "
                  "without content costs.", ""]
    for regime, g in ttft.groupby("regime", sort=False):
        lines += [f"### {_regime_title(regime)}", "", "| variant | n | TTFT (s) | ratio to main_full | target |",
                  "|---|---|---|---|---|"]
        for _, r in g.iterrows():
            v = variant_of(r)
            verdict = (_ttft_verdict(r, target) if v in content and regime.startswith("e2e_") else
                       "no verdict: carries no content" if v in injected and regime.startswith("e2e_") else "—")
            lines.append(f"| {label(r)} | {r['n']} | {r['ttft_s']:.3f} | {_ci(r, 'ttft_ratio')} | {verdict} |")
        lines.append("")
    return lines


def timing_markdown(ttft: pd.DataFrame, agg: pd.DataFrame, timings: pd.DataFrame, timing: Mapping[str, Any],
                    facts: Mapping[str, Any], dataset: str, target: float) -> str:
    """The notes' fourth question (time to first token, end to end, judged only where a cache carries content) and the
    fit times, from the timing files and the aggregates."""
    lines = [f"# Projection timing: {facts['scout']} (scout) → {facts['main']} (main), pair {facts['pair']}, {dataset}",
             "", "## (d) How much time to first token does injection save?", ""]
    lines += _timing_tables(ttft, agg, timings, target)
    lines += ["## Fitting", "", "| projector | fit time (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timing["fit_s"].items()]
    bytes_once = {name: p["bytes"] for name, p in facts.get("projectors", {}).items()}
    if bytes_once:
        n = facts.get("n_test_samples", 0)
        lines += ["", f"Each projector is sent once per deployment ({', '.join(f'{k} {v:,} B' for k, v in bytes_once.items())}"
                  f"); amortised over the {n} test questions of this run that is {max(bytes_once.values()) / max(n, 1):,.0f} "
                  "B per question at most."]
    lines += ["", "Stage phases (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in timing["phases"].items())]
    return "\n".join(lines + [""])
