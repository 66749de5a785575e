"""Does the main model of a pair know more than its scout on a task? Full-KV F1 of both, paired, with CIs.

Samples the configured dataset exactly as the pipeline does (same seed and length rule, only a
larger n: the pipeline's samples are a prefix of these), answers every sample with each model's
full cache, and reports both mean F1s and the paired difference main − scout with bootstrap
intervals over resampled passages (kvpipe.stats.PassageBootstrap). Per-sample answers are kept by
sample id and written after each model, so a stopped run resumes and a larger --n only answers the
new samples. On a multi-hop set it also counts the answers that are the one-hop shortcut (the
named person's own attribute, the generator's `shortcut` column).
Writes bench/results/size_gap_{dataset}.json.

    python bench/size_gap_bench.py [--config config/cross_family.yaml] [--dataset multihop]
                                   [--pair qwen-0.5b-1.5b] [--n 120]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from benchkit import RECORDS, write_record

from kvpipe import layout
from kvpipe.config import load_config
from kvpipe.data.prompt import build_prompt
from kvpipe.data.qa_metrics import score_prediction
from kvpipe.data.sampling import length_tokenizer, load_dataset, sample
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.load import load_model
from kvpipe.stats import PassageBootstrap as Bootstrap


def _answer(model_dir: Path, samples: pd.DataFrame, prompt: dict, max_new_tokens: int, dtype: str,
            done: dict) -> dict:
    """Each sample's answer from the model's full cache (id -> F1, prediction), adding to those already done."""
    todo = samples[~samples["id"].isin(done)]
    if todo.empty:
        return done
    lm = load_model(model_dir, "cpu", dtype)
    start = time.perf_counter()
    for row in todo.itertuples(index=False):
        tokens = build_prompt(lm.tokenizer, prompt, row.context, row.question)
        (answer,) = Session(lm, tokens, 1).answer([AnswerRequest("full")], max_new_tokens)
        done[row.id] = {"f1": round(score_prediction(answer.text, list(row.answers))[2], 4), "prediction": answer.text}
    print(f"{model_dir.name}: {(time.perf_counter() - start) / len(todo):.1f} s per sample", flush=True)
    return done


def _shortcut_rate(samples: pd.DataFrame, done: dict) -> float:
    """Share of the samples with a shortcut whose answer is that one-hop shortcut (SQuAD F1 1 against it)."""
    hits = [score_prediction(done[row.id]["prediction"], [{"text": row.shortcut, "answer_start": 0}])[2] == 1.0
            for row in samples[samples["shortcut"].notna()].itertuples(index=False)]
    return round(sum(hits) / len(hits), 3)


def _interval(v: tuple[float, float, float]) -> list[float]:
    return [round(x, 3) for x in v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("config/cross_family.yaml"))
    ap.add_argument("--dataset", default="multihop")
    ap.add_argument("--pair", default="qwen-0.5b-1.5b")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--results", type=Path, default=layout.RESULTS)
    ap.add_argument("--out", type=Path, help="default: bench/results/size_gap_{dataset}.json")
    args = ap.parse_args()
    args.out = args.out or RECORDS / f"size_gap_{args.dataset}.json"
    config = load_config(["config.yaml", args.config])
    pair, sampling, sel = config["pairs"][args.pair], config["sampling"] | {"n": args.n}, config["selection"]
    tokenizer = length_tokenizer(layout.model_dir(sampling["tokenizer"], args.results))
    samples = sample(load_dataset(args.dataset, config["datasets"][args.dataset]), [tokenizer], config["prompt"],
                     sampling, args.dataset)
    setup = {"config": str(args.config), "dataset": args.dataset, "pair": args.pair,
             "max_new_tokens": sel["max_new_tokens"], "dtype": config["extraction"]["dtype"], "seed": sel["seed"],
             "bootstrap": sel["bootstrap"], "ci": sel["ci"]}
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if record.get("setup") != setup:
        record = {"setup": setup, "models": {}}
    record["n_samples"], record["n_passages"] = len(samples), int(samples["passage"].nunique())
    for role in ("scout", "main"):
        slug = pair[role]
        record["models"][slug] = _answer(layout.model_dir(slug, args.results), samples, config["prompt"],
                                         sel["max_new_tokens"], setup["dtype"], record["models"].get(slug, {}))
        write_record(args.out, record, indent=1)
    f1 = {role: pd.Series([record["models"][pair[role]][i]["f1"] for i in samples["id"]], index=samples["sample_idx"])
          for role in ("scout", "main")}
    boot = Bootstrap(samples.set_index("sample_idx")["passage"], sel["bootstrap"], sel["ci"], sel["seed"])
    diff, p, _ = boot.test(f1["main"], f1["scout"])
    record["summary"] = {"f1_scout": _interval(boot.mean(f1["scout"])), "f1_main": _interval(boot.mean(f1["main"])),
                         "f1_main_minus_scout": _interval(diff), "p_value": round(p, 4),
                         "main_better": diff[1] > 0}
    if "shortcut" in samples and samples["shortcut"].notna().any():   # a bridge set has no shortcut to take
        record["summary"]["shortcut_rate"] = {pair[role]: _shortcut_rate(samples, record["models"][pair[role]])
                                              for role in ("scout", "main")}
    write_record(args.out, record, indent=1)
    print(json.dumps(record["summary"]))


if __name__ == "__main__":
    main()
