"""ScoutPress against kvpress's own SnapKV: the main's time to first token through kvpress, and answerable F1.

    .venv-bench/bin/python bench/scoutpress_bench.py --squad PATH [--n 5] [--main DIR] [--scout DIR]
    # the long synthetic set (>= 4,000 tokens per prompt):
    .venv-bench/bin/python bench/scoutpress_bench.py --overlay bench/overlays/selection_long.yaml --name long --n 3

The main (Qwen2.5-Coder-1.5B) answers SQuAD v2 questions through kvpress's "kv-press-text-generation"
pipeline at one retention, under three presses: its own `SnapKVPress` (window 64, kernel 5), and
`kvpipe.kvpress.ScoutPress` with the scout (Qwen2.5-Coder-0.5B) scoring by SnapKV (kvpress
protocol, query-agnostic) or by Q2C (query-aware). Same token sequences as bench/kvpress_bench.py,
greedy, `--max-new-tokens`, kvpipe's stop ids as the eos, after a warm-up. Per press: the time
to first token (pipeline start to the end of the question pass that yields the first token), the
scout's share of it, answerable F1 and the decoded answers. Each press is warmed up on the first prompt
cut to its first WARM_UP context tokens. Writes bench/results/scoutpress.json (--name NAME:
scoutpress_NAME.json; an overlay naming another dataset in run.datasets samples that one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchkit import bench_config, bench_samples, record_path

PRESSES = ("snapkv", "scout_snapkv", "scout_q2c")
WARM_UP = 256   # context tokens of the warm-up call


def run(
    main_dir: Path, scout_dir: Path, samples: Path, retention: float, max_new_tokens: int, threads: int, prompt: dict
) -> dict:
    """Per press and question: time to first token, scout seconds, answer."""
    import torch
    from kvpress import SnapKVPress
    from transformers import pipeline

    from kvpipe.data.prompt import build_prompt
    from kvpipe.inference.decode import stop_ids
    from kvpipe.kvpress import ScoutPress
    from kvpipe.models.load import load_model

    torch.set_num_threads(threads)
    main, scout = load_model(main_dir, "cpu", "float32"), load_model(scout_dir, "cpu", "float32")
    rows = pd.read_parquet(samples)
    prompts = [build_prompt(main.tokenizer, prompt, r.context, r.question) for r in rows.itertuples()]
    main.model.generation_config.eos_token_id = stop_ids(main)
    pipe = pipeline("kv-press-text-generation", model=main.model, tokenizer=main.tokenizer, device="cpu")
    first: list[float] = []
    main.model.register_forward_hook(lambda *_: first.append(time.perf_counter()))

    def press(kind: str, question: str):
        if kind == "snapkv":
            return SnapKVPress(compression_ratio=1 - retention, window_size=64, kernel_size=5)
        method = kind.removeprefix("scout_")
        return ScoutPress(
            scout=scout,
            method=method,
            compression_ratio=1 - retention,
            tokenizer=main.tokenizer,
            question=question if method == "q2c" else None,
        )

    def one(kind: str, i: int, context: int | None = None) -> dict:
        """One pipeline call; context: cut the context to its first tokens (the warm-up)."""
        tokens, p = prompts[i], press(kind, rows.question.iloc[i])
        scout_s = [0.0]
        if kind != "snapkv":
            scores = p.scout_scores

            def timed(ids):
                t = time.perf_counter()
                out = scores(ids)
                scout_s[0] += time.perf_counter() - t
                return out

            p.scout_scores = timed
        ids = torch.as_tensor(tokens.input_ids)[None]
        end = tokens.context_end if context is None else min(tokens.context_end, tokens.context_start + context)
        first.clear()
        started = time.perf_counter()
        (answer,) = pipe.forward(
            {"context_ids": ids[:, :end], "questions_ids": [ids[:, tokens.context_end :]]},
            press=p,
            max_new_tokens=max_new_tokens,
        )
        return {"ttft": first[0] - started, "scout": scout_s[0], "answer": answer.strip()}

    out = {}
    for kind in PRESSES:
        one(kind, 0, WARM_UP)  # warm-up
        out[kind] = [one(kind, i) for i in range(len(rows))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", type=Path, default=Path("data/squad_v2/dev-v2.0.json"), help="official SQuAD v2 JSON")
    ap.add_argument("--overlay", type=Path, action="append", default=[], help="config overlay(s) merged last")
    ap.add_argument("--name", default="", help="a variant's name: the record is bench/results/scoutpress_NAME.json")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--main", type=Path, default=Path("results/models/qwen2.5-coder-1.5b"))
    ap.add_argument("--scout", type=Path, default=Path("results/models/qwen2.5-coder-0.5b"))
    ap.add_argument("--retention", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/scoutpress[_NAME].json")
    args = ap.parse_args()
    from importlib.metadata import version

    from kvpipe.data.qa_metrics import score_reply

    out = args.out or record_path("scoutpress", args.name)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.parquet"
        config, dataset, spec, _ = bench_config(args.overlay, args.squad)
        bench_samples(config, dataset, spec, args.main, args.n, samples)
        rows = pd.read_parquet(samples)
        result = run(args.main, args.scout, samples, args.retention, args.max_new_tokens, args.threads, config["prompt"])
    answerable = [bool(len(a)) for a in rows["answers"]]
    presses = {}
    for kind, runs in result.items():
        f1 = [score_reply(r["answer"], list(row.answers)).f1 for r, row, ok in zip(runs, rows.itertuples(), answerable) if ok]
        ttft = float(np.mean([r["ttft"] for r in runs]))
        presses[kind] = {
            "ttft_s": round(ttft, 3),
            "scout_share_of_ttft": round(float(np.mean([r["scout"] for r in runs])) / ttft, 3),
            "answerable_f1": round(float(np.mean(f1)), 4) if f1 else None,
            "answers": [r["answer"] for r in runs],
        }
    record = {
        "main": args.main.name,
        "scout": args.scout.name,
        "dataset": dataset,
        "prompt_tokens_median": int(rows["prompt_tokens"].median()),
        "questions": len(rows),
        "answerable_questions": int(sum(answerable)),
        "retention": args.retention,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "machine": f"{platform.machine()}, CPU",
        "kvpress": version("kvpress"),
        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
        "presses": presses,
    }
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: {x: y for x, y in v.items() if x != "answers"} for k, v in presses.items()}))


if __name__ == "__main__":
    main()
