"""Write the README's findings from the committed records: every sentence built from a record file it names.

    python bench/findings.py            # rewrite the block between the `findings` markers in README.md
    python bench/findings.py --print    # print it

The block is rendered from bench/results/ alone (aggregates Parquet, summaries, JSON records), so every
number in it comes from a recorded run; tests/test_bench_table.py checks that README.md holds exactly what
this renders. Answer quality is answerable F1 with its verdict words (kvpipe.estimands); abstention stands
apart; a record that predates a floor or a field says so instead of a number.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
from benchkit import f1_text

from kvpipe.estimands import above_floor
from kvpipe.projection.aggregate import label

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BEGIN, END = "<!-- findings: written by bench/findings.py -->", "<!-- /findings -->"
STRUCTURE = {"pipeline_synthetic/structure_summary.md": "the default synthetic set",
             "pipeline_squad_v2/structure_summary.md": "SQuAD v2"}
PAIRS = {"pipeline_multihop/pairs_summary.md": "the multi-hop set",
         "pipeline_multihop_bridge/pairs_summary.md": "the bridge multi-hop set"}


def _cite(rel: str) -> str:
    return f"(`bench/results/{rel}`)"


def _ci(v: float, lo: float, hi: float, signed: bool = False, percent: bool = False) -> str:
    if math.isnan(v):
        return "—"
    f = (lambda x: f"{100 * x:.0f} %") if percent else (lambda x: f"{x:+.3f}" if signed else f"{x:.3f}")
    return f(v) if math.isnan(lo) else f"{f(v)} [{f(lo)}, {f(hi)}]"


def _structure(rel: str, what: str) -> list[str]:
    """The claims table of a structure summary: each claim of the notes with its verdict."""
    lines = (RESULTS / rel).read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| claim")][:8]
    out = [f"Structure on {what} {_cite(rel)}:"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) == 4:
            out.append(f"- notes' {cells[0]}: {cells[3]}.")
    out += [f"- {line}" for line in lines if line.startswith("Slope of the values")]
    return out


def _sel(agg: pd.DataFrame, table: str, role: str, method: str, quantity: str, r: float = 1.0) -> pd.Series | None:
    rows = agg[(agg["table"] == table) & (agg["role"] == role) & (agg["method"] == method)
               & ((agg["retention"] - r).abs() < 1e-9) & (agg["quantity"] == quantity)]
    return rows.iloc[0] if len(rows) else None


def _cell(row: pd.Series | None, signed: bool = False, percent: bool = False, verdict: bool = False) -> str:
    if row is None:
        return "not answered in this record"
    text = _ci(row["value"], row["ci_low"], row["ci_high"], signed, percent)
    return text + (f" ({row['verdict']})" if verdict and isinstance(row.get("verdict"), str) and row["verdict"] else "")


def _selection(rel: str, what: str, retentions: tuple[float, ...]) -> list[str]:
    agg = pd.read_parquet(RESULTS / rel / "aggregates.parquet")
    answers = pd.read_parquet(RESULTS / rel / "answers.parquet")
    per = answers.groupby("sample_idx")["is_impossible"].first()
    out = [f"Selection on {what} {_cite(rel + '/summary.md')}: {len(per)} questions ({int((~per).sum())} answerable) "
           f"on {answers['passage'].nunique()} passages."]
    for role in ("scout", "main"):
        model = answers.loc[answers["role"] == role, "model"].iloc[0]
        unanswerable = (f"{_cell(_sel(agg, 'full_kv', role, 'full', 'abstain_unanswerable'), percent=True)} of "
                        f"unanswerable and " if per.any() else "")
        out.append(f"- {model} ({role}), full KV: answerable F1 {_cell(_sel(agg, 'full_kv', role, 'full', 'f1_answerable'))}"
                   f"; abstains on {unanswerable}"
                   f"{_cell(_sel(agg, 'full_kv', role, 'full', 'abstain_answerable'), percent=True)}"
                   f" of answerable questions; no-context floor: "
                   f"{_cell(_sel(agg, 'full_kv', role, 'no_context', 'f1_answerable', 0.0))}.")
    floor = _sel(agg, "full_kv", "main", "full", "delta_full_vs_no_context")
    if not above_floor(None if floor is None else floor["verdict"]):
        out.append("- The main's full KV is not better than its no-context floor here: it does not read these contexts, "
                   "so no transfer of a selection can be judged on this set with these models (every Δ below reads "
                   "'at the floor'); the overlaps stand.")
    for r in retentions:
        fwd, rev = _sel(agg, "transfer", "main", "q2c", "delta_forward", r), _sel(agg, "transfer", "scout", "q2c",
                                                                                  "delta_reverse", r)
        ov = _sel(agg, "overlap", "pair", "q2c", "overlap", r)
        null = _sel(agg, "overlap", "pair", "q2c", "overlap_random", r)
        det = _sel(agg, "transfer", "main", "q2c", "detectable_forward", r)
        out.append(f"- Q2C at {100 * r:.0f} % retention: overlap {_cell(ov)} (chance {null['value']:.2f}); answerable ΔF1 "
                   f"forward {_cell(fwd, signed=True, verdict=True)}, reverse {_cell(rev, signed=True, verdict=True)}"
                   f" (detectable at this n: ±{det['value']:.3f}).")
    return out


def _scout_cost(name: str) -> str:
    d = json.loads((RESULTS / f"{name}.json").read_text())
    share = d["scout_prefill_and_scoring_over_main_prefill"]
    return (f"- What scout selection adds before the main can start (`bench/results/{name}.json`): the scout's "
            f"context prefill and scoring take {share['median']:.2f}× the main's own full-context prefill (median over "
            f"{d['n_samples']} prompts of median {d['prompt_tokens_median']['main']} tokens; "
            f"{share['min']:.2f}–{share['max']:.2f}). A main that prefilled only the kept tokens would save time only "
            f"below a retention of about {max(0.0, 1 - share['median']):.2f} (taking its prefill as linear in the "
            f"tokens, which at this length overstates the cost of the kept share); this stage prefills the main over "
            f"the whole context and masks, so it measures quality, not that saving.")


PHRASE = {"worse": "worse than main_full", "better": "better than main_full", "equivalent": "equivalent to main_full "
          "(TOST)", "undecided": "undecided against main_full",
          "at the floor": "not judged: main_full is at its no-context floor"}


def _answerable(row: pd.Series) -> str:
    return _ci(row["f1_answerable"], row["f1_answerable_low"], row["f1_answerable_high"])


def _abstains(row: pd.Series) -> str:
    value = row["abstain_unanswerable"]
    return "" if math.isnan(value) else f", abstains on {100 * value:.0f} % of unanswerable questions"


def _projection(rel: str, what: str) -> list[str]:
    agg = pd.read_parquet(RESULTS / rel / "aggregates.parquet")
    facts = json.loads((RESULTS / rel / "facts.json").read_text())
    full = agg[agg["condition"] == "main_full"].iloc[0]
    out = [f"Projection on {what} {_cite(rel + '/summary.md')}: {facts['scout']} → {facts['main']}, {int(full['n'])} "
           f"test questions ({int(full['n_answerable'])} answerable) on {int(full['n_passages'])} passages, projectors "
           f"fitted on {facts['n_calibration_samples']} calibration samples from other passages.",
           f"- main_full (its own prefill): answerable F1 {_answerable(full)}{_abstains(full)}."]
    for floor in ("no_context", "mean_kv", "always_abstain"):
        row = agg[agg["condition"] == floor]
        out.append(f"- floor {floor}: " + ("not answered in this record." if row.empty else
                   f"answerable F1 {_answerable(row.iloc[0])}"
                   f", all-question F1 {row.iloc[0]['f1']:.3f}."))
    rows = agg[(agg["condition"] == "projected_kv") & (agg["key_map"] == "pre_rope")]
    for condition in ("projected_k_own_v", "own_k_projected_v"):   # the best key-only and value-only transfer
        half = agg[agg["condition"] == condition]
        rows = pd.concat([rows, half.sort_values("f1_answerable", ascending=False).head(1)])
    for _, r in rows.iterrows():
        carries = "carries content" if r["carries_content"] else "carries no content"
        out.append(f"- {label(r)}: answerable F1 {_answerable(r)}"
                   f" ({PHRASE[r['verdict']]}, detectable ±{r['detectable']:.3f}; {carries}); all-question F1 "
                   f"{r['f1']:.3f}{_abstains(r)}; {r['bytes'] / 1e6:.2f} MB sent per question.")
    ttft_path = RESULTS / rel / "ttft_aggregates.parquet"
    ttft = pd.read_parquet(ttft_path) if ttft_path.exists() else pd.DataFrame()
    if "regime" in ttft.columns:
        e2e = ttft[ttft["regime"].str.startswith("e2e_") & (ttft["condition"] == "projected_kv")]
        if len(e2e):
            lo, hi = e2e["ttft_ratio"].min(), e2e["ttft_ratio"].max()
            out.append(f"- End-to-end time to first token of projected_kv (the scout's own prefill and the transfer "
                       f"included): {lo:.2f}–{hi:.2f}× main_full's over the projectors and link speeds "
                       f"{_cite(rel + '/timing.md')}; judged against the target only where a cache carries content.")
    return out


def _pairs(rel: str, what: str) -> list[str]:
    lines = (RESULTS / rel).read_text().splitlines()
    return [f"Cross-family pairs on {what} {_cite(rel)}:"] + [line for line in lines if line.startswith("- ")]


def _size_gap(name: str) -> str:
    d = json.loads((RESULTS / f"{name}.json").read_text())
    s = d["summary"]
    return (f"Full-KV F1 of the two Qwen models on {d['setup']['dataset']} (answerable-only set, {d['n_samples']} "
            f"questions on {d['n_passages']} passages; `bench/results/{name}.json`): 1.5B {_ci(*s['f1_main'])} vs 0.5B "
            f"{_ci(*s['f1_scout'])}, difference {_ci(*s['f1_main_minus_scout'], signed=True)}.")


def _distill_curve(name: str) -> list[str]:
    """The distill objective's learning curve on the real pair at its step budget, beside the main's own references."""
    d = json.loads((RESULTS / f"{name}.json").read_text())
    dist, ref = d["distill"], d["references"]
    cfg, curve = dist["settings"], dist["learning_curve"]
    start, best = curve[0], min(curve, key=lambda point: point["validation_loss"])
    points = "; ".join(f"step {p['step']}: KL {p['validation_loss']:.3f}, F1 {f1_text(p['answerable_f1'])}" for p in curve)
    stopped = "the budget" if dist["steps"] == cfg["steps"] else f"early stopping (patience {cfg['patience']})"
    return [
        f"The distill objective on the real pair, {d['pair']['scout']} → {d['pair']['main']} at a CPU step budget "
        f"(`bench/results/{name}.json`): the ridge map fitted by reconstruction, then trained through the frozen main "
        f"for {dist['steps']} steps of {cfg['accumulate']} prompts (lr {cfg['lr']:g}; ended by {stopped}) on "
        f"{dist['train_samples']} training prompts of calibration passages, {dist['tokens_seen']['target']} target tokens "
        f"seen; evaluated on {dist['held_out_samples']} validation prompts ({ref['answerable_validation_prompts']} "
        f"answerable), {d['fit_s']:.0f} s on {d['device']} ({d['torch_threads']} threads).",
        f"- Validation KL (the main's next-token distributions, own cache against projected) and answerable F1 of its "
        f"greedy answers from the projected cache, every {cfg['eval_every']} steps: {points}.",
        f"- Best validation KL {best['validation_loss']:.3f} at step {best['step']}, from {start['validation_loss']:.3f} at "
        f"the ridge start" + ("; still falling at the last evaluation, so more steps would likely lower it"
                              if best["step"] == curve[-1]["step"] else "") +
        f" (training loss {curve[-1]['train_loss']:.3f} over the last {cfg['eval_every']} steps). On the same validation "
        f"prompts the main answers with answerable F1 {f1_text(ref['main_full_f1'])} from its own cache and "
        f"{f1_text(ref['no_context_f1'])} with no context; F1 over {ref['answerable_validation_prompts']} answerable "
        "prompts shows a direction, not a verdict (the projection stage's records judge).",
    ]


def _planted() -> str:
    d = json.loads((RESULTS / "planted_answer.json").read_text())
    parts = [f"{m}: {v['full']:.3f} with the whole context, {v['answer_dropped']:.3f} with the answer span evicted, "
             f"{v['control_dropped']:.3f} with a same-length span elsewhere evicted" for m, v in d["models"].items()]
    return (f"Pruned-cache answering behaves ({d['n_samples']} {d['dataset']} samples, `bench/results/planted_answer.json`"
            f"): F1 of {'; '.join(parts)}.")


def render() -> str:
    """The findings block, from the committed records."""
    lines = ["Every figure below is rendered by `bench/findings.py` from the record it names; answer quality is "
             "answerable F1 (kvpipe.estimands), abstention apart.", ""]
    for rel, what in STRUCTURE.items():
        lines += _structure(rel, what) + [""]
    lines += _selection("selection_squad", "SQuAD v2", (0.5, 0.75)) + [""]
    lines += _selection("selection_squad200", "SQuAD v2, answerable questions only (`bench/overlays/selection_squad200.yaml`: "
                        "Q2C and random at 25 % retention)", (0.25,)) + [""]
    lines += _selection("selection_long", "the long synthetic set (`bench/overlays/selection_long.yaml`, prompts "
                        "above 4,000 tokens)", (0.1, 0.25, 0.5)) + [_scout_cost("selection_long"), ""]
    lines += _projection("projection_squad_v2", "SQuAD v2") + [""]
    lines += _projection("projection_squad_v2_answerable", "SQuAD v2, answerable questions only "
                         "(`bench/overlays/projection_answerable.yaml`)") + [""]
    lines += _projection("projection_synthetic", "the synthetic set") + [""]
    lines += _distill_curve("distill_curve_squad_v2") + [""]
    for rel, what in PAIRS.items():
        lines += _pairs(rel, what) + [""]
    lines += [f"- {_size_gap(name)}" for name in ("size_gap_multihop", "size_gap_multihop_bridge")]
    lines += [f"- {_planted()}"]
    return "\n".join(lines) + "\n"


def write(readme: Path = REPO / "README.md") -> None:
    """Replace the block between the markers in README.md."""
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    readme.write_text(head + BEGIN + "\n" + render() + END + rest.split(END, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the block instead of writing README.md")
    args = ap.parse_args()
    if args.print:
        print(render())
    else:
        write()


if __name__ == "__main__":
    main()
