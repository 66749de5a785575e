"""The markdown summary of the projection stage: the research notes' four questions, their figures beside ours.

Reads only the stage's tables and facts.json, with the aggregates of kvpipe.projection.aggregate;
imports no compute code.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kvpipe.projection.aggregate import BASELINE, Paired, label, on_front, variant_of
from kvpipe.reporting import Interval, fmt_ci, verdict_vs_zero

NOTES = {"keys_cosine": 0.9997, "values_cosine": 0.222}   # the notes (Qwen2.5 3B -> 7B, linear map, test tokens)
TTFT_TARGET = 0.3   # the notes' target: the main's time to first token with an injected cache ≤ 0.3 × with its prefill


def _ci(row: pd.Series, name: str, **kw: Any) -> str:
    """A column with its interval, '—' when it is undefined (e.g. no unanswerable question)."""
    return "—" if math.isnan(row[name]) else fmt_ci(row[name], row[f"{name}_low"], row[f"{name}_high"], **kw)


def _num(x: float, spec: str = ".2g") -> str:
    return "—" if math.isnan(x) else format(x, spec)


def _versus(v: Interval, baseline: str) -> str:
    """A paired delta with its interval and, in words, where it stands against its baseline."""
    if math.isnan(v[0]):
        return "—"
    word = "indistinguishable from" if v[1] <= 0 <= v[2] else ("above" if v[1] > 0 else "below")
    return f"{fmt_ci(*v, signed=True)} {verdict_vs_zero(v)}: {word} {baseline}"


def _delta(row: pd.Series) -> Interval:
    return row["delta_f1"], row["delta_f1_low"], row["delta_f1_high"]


def _rows(agg: pd.DataFrame, condition: str) -> pd.DataFrame:
    return agg[agg["condition"] == condition]


def _by_projector(agg: pd.DataFrame, condition: str) -> dict[tuple[str, str], pd.Series]:
    """The condition's rows by (projector, objective), pre-RoPE key maps only."""
    return {(r["projector"], r["objective"]): r for _, r in _rows(agg, condition).iterrows() if r["key_map"] != "post_rope"}


def _detectable(agg: pd.DataFrame) -> list[str]:
    """The smallest ΔF1 the headline interval (projected_kv's first projector) could tell from 0 at this n."""
    family = agg[agg["p_value"].notna()]
    if family.empty:
        return []
    head = family[family["condition"] == "projected_kv"]
    head = (head if len(head) else family).iloc[0]
    return [f"At this n the smallest ΔF1 distinguishable from 0 is about ±{head['detectable']:.3f} F1 (z × the passage-"
            f"bootstrap standard error of ΔF1 of {label(head)} vs main_full; {family['detectable'].min():.3f}–"
            f"{family['detectable'].max():.3f} over all variants); smaller true effects read as indistinguishable.", ""]


def _header(agg: pd.DataFrame, answers: pd.DataFrame, facts: dict[str, Any], dataset: str) -> list[str]:
    cfg, layer_map = facts["projection"], facts.get("layer_map", {})
    lines = [f"# Projection: {facts['scout']} (scout) → {facts['main']} (main), pair {facts['pair']}, {dataset}", "",
             f"{answers['sample_idx'].nunique()} test samples on {answers['passage'].nunique()} passages; the projectors "
             f"were fitted on {facts.get('n_calibration_samples', '?')} calibration samples from other passages. "
             f"Intervals: {int(round(100 * cfg['ci']))} % bootstrap over test passages ({cfg['bootstrap']} resamples; "
             "questions on one passage share its context), paired by sample for every delta. A delta whose interval "
             "includes 0 is reported as indistinguishable from its baseline.", ""]
    if layer_map:
        lines += [f"Layer map `{layer_map['name']}`: the scout layer of each main layer 0, 1, …: "
                  f"{', '.join(map(str, layer_map['scout_layer_of_main']))}.", ""]
    lines += _detectable(agg)
    projectors = facts.get("projectors", {})
    if projectors:
        lines += ["| projector | parameters | bytes | calibration error | validation error |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {p['params']:,} | {p['bytes']:,} | {p['calibration_error']:.3f} | "
                  f"{p['validation_error']:.3f} |" for name, p in projectors.items()]
    return lines


def _question_a(agg: pd.DataFrame, paired: Paired) -> list[str]:
    null = _rows(agg, "mean_kv")
    lines = ["## (a) Does a learned projection let the main model answer?", "",
             "Notes: planned, not measured. The main model answers from the scout's projected keys and values "
             "(no prefill of its own); main_full is its own full prefill, mean_kv the null (every position given the "
             "calibration-mean key and value: no information from this context).", "",
             "| projector | F1 | ΔF1 vs main_full | Holm p | ΔF1 vs mean_kv (null) |", "|---|---|---|---|---|"]
    for _, r in _rows(agg, "projected_kv").iterrows():
        vs_null = _versus(paired.delta(variant_of(r), variant_of(null.iloc[0]))[0], "mean_kv") if len(null) else "—"
        lines.append(f"| {label(r)} | {_ci(r, 'f1')} | {_versus(_delta(r), 'main_full')} | {r['p_holm']:.2g} | "
                     f"{vs_null} |")
    return lines


def _layer_means(metrics: pd.DataFrame, kind: str, metric: str) -> pd.Series:
    sel = metrics[(metrics["kind"] == kind) & (metrics["metric"] == metric)]
    return sel.groupby(["projector", "objective"])["value"].agg(
        lambda v: f"{v.mean():.3f} ({v.min():.3f}–{v.max():.3f})")


def _question_b(agg: pd.DataFrame, metrics: pd.DataFrame, paired: Paired) -> list[str]:
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
    lines += ["", "Functionally: projected keys with the main's own values against the main's own keys with "
              "projected values (diagnostics: each half still needs the main's own prefill).", "",
              "| projector | F1 keys projected | F1 values projected | Δ (keys − values projected) |", "|---|---|---|---|"]
    values = _by_projector(agg, "own_k_projected_v")
    for _, r in _rows(agg, "projected_k_own_v").iterrows():
        v = values.get((r["projector"], r["objective"]))
        if v is not None:
            d = paired.delta(variant_of(r), variant_of(v))[0]
            lines.append(f"| {r['projector']}/{r['objective']} | {_ci(r, 'f1')} | {_ci(v, 'f1')} | "
                         f"{_versus(d, 'value-only transfer')} |")
    return lines


def _question_c(agg: pd.DataFrame, paired: Paired) -> list[str]:
    chain = _rows(agg, "chain")
    if chain.empty:
        return []
    lines = ["", "## (c) What does the chain cost in F1 per byte saved?", "",
             "The chain sends the scout's selected tokens' KV as rank-limited SVD factors plus the positions; "
             "ΔF1 and bytes saved are against projected_kv of the same projector (full scout KV in fp16).", "",
             "| projector | retention | rank | F1 | ΔF1 vs projected_kv | bytes | bytes saved | F1 lost per MB saved | "
             "bytes / text |", "|---|---|---|---|---|---|---|---|---|"]
    full = _by_projector(agg, "projected_kv")
    for _, r in chain.iterrows():
        ref = full.get((r["projector"], r["objective"]))
        if ref is None:
            continue
        d = paired.delta(variant_of(r), variant_of(ref))[0]
        saved = ref["bytes"] - r["bytes"]
        cost = f"{-d[0] / (saved / 1e6):.3g}" if saved > 0 else "—"
        lines.append(f"| {r['projector']}/{r['objective']} | {r['retention']:.2f} | "
                     f"{'full' if r['rank'] < 0 else r['rank']} | {_ci(r, 'f1')} | {_versus(d, 'projected_kv')} | "
                     f"{r['bytes']:,.0f} | {saved:,.0f} ({saved / ref['bytes']:.0%}) | {cost} | {r['bytes_ratio']:.3g} |")
    return lines


def _question_d() -> list[str]:
    return ["", "## (d) How much of the main model's prefill time does injection save?", "",
            "Answered in timing.md beside this file, with the projectors' fit times: measured times differ between "
            "runs, every number in this file does not.", ""]


def _timing_tables(ttft: pd.DataFrame, timings: pd.DataFrame, timing: dict[str, Any]) -> list[str]:
    measured = ttft[ttft["condition"] != BASELINE[0]]
    lines = [f"Target (notes): time to first token ≤ {TTFT_TARGET}× main_full's. Ratio of mean TTFTs over the samples "
             "where both were measured, with a paired interval; 'meets' needs the whole interval below the target.", ""]
    if len(timings):
        med = timings[["scout_prefill_s", "main_prefill_s"]].median()
        lines += [f"Median per sample: scout prefill {med['scout_prefill_s']:.3f} s, main prefill "
                  f"{med['main_prefill_s']:.3f} s.", ""]
    if measured.empty:
        lines += ["No TTFT was measured for an injected cache."]
    else:
        lines += ["| variant | n | TTFT (s) | ratio to main_full | target |", "|---|---|---|---|---|"]
        for _, r in measured.iterrows():
            verdict = ("meets" if r["ttft_ratio_high"] <= TTFT_TARGET else "misses"
                       if r["ttft_ratio_low"] > TTFT_TARGET else f"undecided (interval spans {TTFT_TARGET})")
            lines.append(f"| {label(r)} | {r['n']} | {r['ttft_s']:.3f} | {_ci(r, 'ttft_ratio')} | {verdict} |")
    lines += ["", "## Fitting", "", "| projector | fit time (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timing["fit_s"].items()]
    lines += ["", "Stage phases (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in timing["phases"].items())]
    return lines


def _all_variants(agg: pd.DataFrame, alpha: float) -> list[str]:
    family, kept = agg[agg["p_value"].notna()], agg[agg["survives"]]
    lines = ["", "## Every variant", "",
             f"ΔF1 vs main_full for the {len(family)} other variants form one family: two-sided p-values from the "
             f"passage-bootstrap standard error, Holm-corrected (family-wise error rate {alpha:.2g}). "
             f"Deltas that survive: {', '.join(label(r) for _, r in kept.iterrows()) or 'none'}. "
             "On the F1–bytes Pareto front (diagnostic hybrids left out): "
             f"{', '.join(label(r) for _, r in agg[on_front(agg)].iterrows())}.", "",
             "| variant | n | F1 | exact | HasAns F1 | NoAns F1 | ΔF1 vs main_full | Holm p | bytes | × text |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        lines.append(f"| {label(r)} | {r['n']} | {_ci(r, 'f1')} | {r['exact']:.3f} | {_ci(r, 'f1_has_answer')} | "
                     f"{_ci(r, 'f1_no_answer')} | {_ci(r, 'delta_f1', signed=True)} | {_num(r['p_holm'])} | "
                     f"{r['bytes']:,.0f} | {_num(r['bytes_ratio'], '.3g')} |")
    return lines


def summary_markdown(agg: pd.DataFrame, answers: pd.DataFrame, metrics: pd.DataFrame, facts: dict[str, Any],
                     dataset: str) -> str:
    """The notes' four questions answered from the stage's tables, the notes' figures beside ours, with verdicts
    (the fourth, on time, in timing_markdown)."""
    paired = Paired(answers, facts["projection"])
    lines = _header(agg, answers, facts, dataset) + [""] + _question_a(agg, paired) + [""]
    lines += _question_b(agg, metrics, paired) + _question_c(agg, paired) + _question_d()
    lines += _all_variants(agg, 1 - facts["projection"]["ci"])
    return "\n".join(lines + [""])


def timing_markdown(ttft: pd.DataFrame, timings: pd.DataFrame, timing: dict[str, Any], facts: dict[str, Any],
                    dataset: str) -> str:
    """The notes' fourth question (time to first token with an injected cache) and the fit times, from the timing files."""
    lines = [f"# Projection timing: {facts['scout']} (scout) → {facts['main']} (main), pair {facts['pair']}, {dataset}",
             "", "## (d) How much of the main model's prefill time does injection save?", ""]
    return "\n".join(lines + _timing_tables(ttft, timings, timing) + [""])
