"""Run every benchmark, then write the one table of their results (bench/results/TABLE.md and README.md).

    python bench/run_all.py --squad /path/to/dev-v2.0.json [--kvpress-python .venv-bench/bin/python]
    python bench/run_all.py --table-only          # rebuild the table from the recorded bench/results/*.json

Each benchmark writes its own bench/results/*.json (see bench/README.md); the table reads only
those files, so every number in it, and in the README block between the `bench-table` markers,
comes from a recorded run. Every comparison is a ratio measured within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchkit import RECORDS as RESULTS
from benchkit import REPO, TARGETS, Target
from benchkit import f1_text as _f1

BEGIN, END = "<!-- bench-table: written by bench/run_all.py -->", "<!-- /bench-table -->"


def steps(squad: str, kvpress_python: str) -> list[list[str]]:
    """The benchmark commands, in order (each writes its bench/results/*.json)."""
    py = sys.executable
    return [[py, "bench/extract_bench.py"], [py, "bench/structure_bench.py"], [py, "bench/parquet_bench.py"],
            [py, "bench/stage_memory_bench.py", "--stages", "selection", "--n", "12"],
            [py, "bench/stage_memory_bench.py", "--stages", "projection", "--n", "36"],
            [py, "bench/distill_memory_bench.py"], [py, "bench/decode_bench.py"],
            [py, "bench/attention_bench.py"], [py, "bench/threads_bench.py"], [py, "bench/planted_answer.py"],
            [py, "bench/selection_bench.py", "--squad", squad],
            [py, "bench/selection_bench.py", "--overlay", "bench/overlays/selection_long.yaml", "--name", "long", "--n", "6"],
            [py, "bench/selection_bench.py", "--squad", squad, "--overlay", "bench/overlays/selection_squad200.yaml", "--name",
             "squad200", "--n", "200"],
            [py, "bench/projection_bench.py", "--squad", squad],
            [kvpress_python, "bench/kvpress_bench.py", "--squad", squad],
            [kvpress_python, "bench/kvpress_bench.py", "--overlay", "bench/overlays/selection_long.yaml", "--name", "long",
             "--n", "6", "--grid", "three", "--own-grids", "none"],
            [kvpress_python, "bench/scoutpress_bench.py", "--squad", squad, "--n", "12"],
            [kvpress_python, "bench/scoutpress_bench.py", "--overlay", "bench/overlays/selection_long.yaml", "--name", "long",
             "--n", "3"],
            [py, "bench/size_gap_bench.py"],
            [py, "bench/size_gap_bench.py", "--dataset", "multihop_bridge"],
            [py, "bench/pipeline_record.py", "synthetic"]]


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ttft_rows(record: str) -> list[tuple[str, str, str, str, str]]:
    """End-to-end TTFT of an injected cache over main_full's (the scout's own prefill and the transfer included), per
    link speed: judged against the target only for a cache that carries content (kvpipe.estimands)."""
    import pandas as pd

    from kvpipe.projection.aggregate import VARIANT

    path = RESULTS / record / "ttft_aggregates.parquet"
    if not path.exists() or "regime" not in pd.read_parquet(path).columns:
        return []
    ttft, agg = pd.read_parquet(path), pd.read_parquet(RESULTS / record / "aggregates.parquet")
    keys = list(VARIANT)
    injected = ttft[ttft["condition"].isin(("projected_kv", "chain"))].merge(agg[[*keys, "carries_content"]], on=keys)
    facts = json.loads((RESULTS / record / "facts.json").read_text())
    target = Target(facts["projection"].get("ttft", {}).get("target", TARGETS["ttft_ratio_injected"].bound))
    out = []
    for regime, g in injected[injected["regime"].str.startswith("e2e_")].groupby("regime"):
        link = regime.removeprefix("e2e_").removesuffix("mbps")
        content = g[g["carries_content"]]
        what = f"end-to-end TTFT, injected cache / main_full, {link} Mbit/s link (SQuAD v2)"
        if content.empty:
            low, high = f"{g['ttft_ratio'].min():.2f}", f"{g['ttft_ratio'].max():.2f}"
            out.append((f"{what}; no injected cache carries content", low if low == high else f"{low}–{high}",
                        target.text(), "no verdict", f"{record}/ttft_aggregates.parquet"))
        else:
            best = content.sort_values("ttft_ratio_high").iloc[0]
            out.append((f"{what}; best cache that carries content", f"{best['ttft_ratio']:.3f}", target.text(),
                        target.verdict(best["ttft_ratio_high"]), f"{record}/ttft_aggregates.parquet"))
    return out


DATASETS = {"squad_v2": "SQuAD v2", "long": "long synthetic"}   # how the table names a record's dataset


def _kvpress_rows(kvp: dict, record: str) -> list[tuple[str, str, str, str, str]]:
    """kvpipe against kvpress per grid: the same work first (kept positions, answers, then time, with each side's split
    into prefill and answering where recorded), then kvpipe's own protocols, labelled with what differs (no verdict:
    not the same work)."""
    out, dataset = [], DATASETS.get(kvp.get("dataset", "squad_v2"), kvp.get("dataset"))
    for name, grid in kvp["grids"].items():
        where = (f"{grid['conditions_per_prefill']} retentions per prefill, {kvp['model']}, {grid['questions']} {dataset} "
                 "questions")
        ours, theirs = grid["kvpipe"]["kvpress"], grid["kvpress"]
        kept, same = grid["kept_positions"]["identical_fraction"], ours["same_answer_fraction"]
        enough = grid["questions"] >= 20   # the n for judging identical work
        target = TARGETS["kvpress_speedup" if name == "three" else "kvpress_speedup_9"]
        kept_t, same_t = TARGETS["kvpress_kept_identical"], TARGETS["kvpress_same_answers"]
        out.append((f"kept positions identical to kvpress's, share of (question, retention, layer, KV head); {where}",
                    f"{kept:.3f}", f"{kept_t.text()} (20 questions)", kept_t.verdict(kept) if enough else "no verdict",
                    record))
        out.append((f"answers identical to kvpress's, share of conditions; {where}", f"{same:.3f}",
                    f"{same_t.text()} (20 questions)", same_t.verdict(same) if enough else "no verdict", record))
        same_work = enough and kept_t.met(kept) and same_t.met(same)
        verdict = target.verdict(ours["speedup_over_kvpress"]) if same_work else "no verdict"
        load = "–".join(f"{x:g}" for x in grid.get("load_average", []))
        out.append((f"kvpress time / kvpipe time per answered condition, SnapKV, the same work (kvpress's protocol); {where}"
                    + (f"; 1-minute load {load} on 2 cores" if load else ""),
                    f"{ours['speedup_over_kvpress']:.2f}×", target.text("×"), verdict, record))
        if "prefill_seconds_per_condition" in ours:
            out.append((f"seconds per answered condition, prefill / answering, kvpipe vs kvpress (bench/README); {where}",
                        f"{ours['prefill_seconds_per_condition']:.2f} / {ours['answer_seconds_per_condition']:.2f} vs "
                        f"{theirs['prefill_seconds_per_condition']:.2f} / {theirs['answer_seconds_per_condition']:.2f}",
                        "—", "", record))
        out.append((f"decoded tokens per condition (stop token included), kvpipe / kvpress; {where}",
                    f"{ours['decoded_tokens_per_condition']:.1f} / {theirs['decoded_tokens_per_condition']:.1f}", "—", "",
                    record))
        out.append((f"answerable F1, kvpipe / kvpress ({grid['answerable_questions']} answerable); {where}",
                    f"{_f1(ours['answerable_f1'])} / {_f1(theirs['answerable_f1'])}", "—", "", record))
        for protocol, row in grid["kvpipe"].items():
            if protocol != "kvpress":
                out.append((f"kvpress time / kvpipe time per answered condition, kvpipe's SnapKV {protocol}: not the same work "
                            f"(bench/README); {where}; answerable F1 {_f1(row['answerable_f1'])}, same answers "
                            f"{row['same_answer_fraction']:.3f}",
                            f"{row['speedup_over_kvpress']:.2f}×", "—", "no verdict", record))
    return out


def _scoutpress_rows(sp: dict, record: str) -> list[tuple[str, str, str, str, str]]:
    """The main's time to first token through kvpress with ScoutPress over that with its own SnapKVPress, per scout method."""
    own, out = sp["presses"]["snapkv"], []
    tokens = f", median {sp['prompt_tokens_median']} tokens" if sp.get("prompt_tokens_median") else ""
    dataset = DATASETS.get(sp["dataset"], sp["dataset"])
    for kind in ("scout_snapkv", "scout_q2c"):
        row = sp["presses"][kind]
        out.append((f"main's time to first token through kvpress, ScoutPress ({kind}; scout {sp['scout']}, its share "
                    f"{row['scout_share_of_ttft']:.2f}) / own SnapKVPress ({own['ttft_s']:.1f} s), {sp['main']}, retention "
                    f"{sp['retention']:g}, {sp['questions']} {dataset} questions{tokens}; answerable F1 "
                    f"({sp['answerable_questions']} answerable) "
                    f"{_f1(row['answerable_f1'])} vs {_f1(own['answerable_f1'])}", f"{row['ttft_s'] / own['ttft_s']:.2f}", "—",
                    "", record))
    return out


def rows() -> list[tuple[str, str, str, str, str]]:
    """(benchmark, measured, target, verdict, source) per line of the table."""
    out, rss = [], TARGETS["rss_ratio_4x_over_1x"]
    if ext := _load("extract"):
        for model, m in ext["models"].items():
            ratio, target = m["ratio_extraction_over_bare"], TARGETS["extraction_over_bare"]
            out.append((f"extraction / bare forward, {model}", f"{ratio:.3f}", target.text(), target.verdict(ratio),
                        "extract.json"))
    if sel := _load("selection"):
        # own and transferred selections per method (random ones are shared: own only), per retention below 1
        pruned = sum(1 if m == "random" else 2 for m in sel["methods"]) * sum(r < 1 for r in sel["grid"])
        for model, m in sel["per_model"].items():
            ratio = m["pruned_batch_s"] / pruned / m["prefill_s"]
            out.append((f"selection: one pruned condition / context prefill, {model} ({pruned} per batch)",
                        f"{ratio:.3f}", "—", "", "selection.json"))
    if long := _load("selection_long"):
        tokens, share = long["prompt_tokens_median"]["main"], long["scout_prefill_and_scoring_over_main_prefill"]
        where = f"long synthetic set, {long['n_samples']} prompts, median {tokens} tokens"
        for model, m in long["per_model"].items():
            out.append((f"selection, context prefill (s), {model}; {where}", f"{m['prefill_s']:.1f}", "—", "",
                        "selection_long.json"))
        out.append((f"selection: scout's prefill + scoring / main's context prefill (what scout selection adds before "
                    f"the main starts; median, {share['min']:.3f}–{share['max']:.3f}); {where}", f"{share['median']:.3f}",
                    "—", "", "selection_long.json"))
    for name in ("kvpress", "kvpress_long"):
        if kvp := _load(name):
            out += _kvpress_rows(kvp, f"{name}.json")
    for name in ("scoutpress", "scoutpress_long"):
        if sp := _load(name):
            out += _scoutpress_rows(sp, f"{name}.json")
    if dec := _load("decode"):
        three = dec["rows"]["3"]
        out.append((f"CPU decoding step of 3 conditions, stock linear layers / kvpipe's few-row path, {dec['model']}",
                    f"{three['ratio_stock_over_kvpipe']:.2f}×", "—", "", "decode.json"))
    if att := _load("attention"):
        for length, run in att["lengths"].items():
            same = "same tokens" if run["same_tokens"] else "TOKENS DIFFER"
            out.append((f"CPU decoding step of 3 pruned rows (kept {' / '.join(map(str, run['kept']))} of {length} "
                        f"entries, masked), transformers' sdpa / kvpipe_sdpa, {att['model']}; {same}",
                        f"{run['ratio_stock_over_kvpipe']:.2f}×", "—", "", "attention.json"))
    if pq := _load("parquet"):
        for run in pq["runs"]:
            if run["compression"] == "zstd":
                out.append((f"KV shard write / read (zstd, width {run['width']}, hash-checked read)",
                            f"{run['write_mb_s']:.0f} / {run['read_mb_s']:.0f} MB/s", "—", "", "parquet.json"))
    if thr := _load("threads"):
        ratio, target = thr["ratio_snakemake_over_direct"], TARGETS["snakemake_over_direct"]
        out.append(("extraction job under Snakemake / run directly", f"{ratio:.3f}", target.text(), target.verdict(ratio),
                    "threads.json"))
    if st := _load("structure"):
        for what, ratio in (("extraction", st["extract_rss_ratio_4x_over_1x"]), ("structure", st["rss_ratio_4x_over_1x"])):
            out.append((f"peak RSS 4× / 1× samples: {what}", f"{ratio:.3f}", rss.text(), rss.verdict(ratio),
                        "structure.json"))
    if proj := _load("projection"):
        mem = proj["memory"]
        out.append(("peak RSS 4× / 1× samples: projector fitting", f"{mem['rss_ratio_4x_over_1x']:.3f}", rss.text(),
                    rss.verdict(mem["rss_ratio_4x_over_1x"]), "projection.json"))
        fit_s, target = proj["squad_v2"]["fit_total_s"], TARGETS["projection_fit_total_s"]
        out.append(("fitting every projector, 50 SQuAD v2 samples (s)", f"{fit_s:.0f}", target.text(), target.verdict(fit_s),
                    "projection.json"))
    if dm := _load("distill_memory"):
        n, ratio = dm["runs"]["1x"]["train_samples"], dm["rss_ratio_4x_over_1x"]
        out.append((f"peak RSS 4× / 1× samples: distill fit ({4 * n} / {n} prompts, 4 / 1 per step)", f"{ratio:.3f}",
                    rss.text(), rss.verdict(ratio), "distill_memory.json"))
    out += _ttft_rows("projection_squad_v2")
    if mem := _load("stage_memory"):
        for stage in ("selection", "projection"):
            ratio, n = mem[stage]["rss_ratio_4x_over_1x"], mem[stage]["n"]
            out.append((f"peak RSS 4× / 1× samples: {stage} stage ({4 * n} / {n} samples)", f"{ratio:.3f}", rss.text(),
                        rss.verdict(ratio), "stage_memory.json"))
    if run := _load("pipeline_synthetic/run"):
        out.append((f"default config end to end (s; `snakemake --cores {run['cores']}` from the GGUF files: "
                    f"models, KV, {', '.join(run['stages'])})", f"{run['wall_s']:.0f}", "—", "",
                    "pipeline_synthetic/run.json"))
    return out


def table() -> str:
    lines = ["| benchmark | measured | target | | record (bench/results/) |", "|---|---|---|---|---|"]
    lines += [f"| {b} | {m} | {t} | {v} | `{s}` |" for b, m, t, v, s in rows()]
    return "\n".join(lines) + "\n"


def write_table(readme: Path = REPO / "README.md") -> None:
    """bench/results/TABLE.md and the README block between the markers."""
    text = table()
    (RESULTS / "TABLE.md").write_text(text)
    body = readme.read_text()
    head, rest = body.split(BEGIN)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", help="official SQuAD v2 JSON (needed unless --table-only)")
    ap.add_argument("--kvpress-python", default=sys.executable, help="a Python with kvpress (pip install '.[bench]')")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        if not args.squad:
            ap.error("--squad is required to run the benchmarks")
        for cmd in steps(args.squad, args.kvpress_python):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
    write_table()
    print((RESULTS / "TABLE.md").read_text())


if __name__ == "__main__":
    main()
