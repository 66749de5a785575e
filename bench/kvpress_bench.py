"""kvpipe against NVIDIA kvpress on identical work: a model answers SQuAD v2 questions from its own SnapKV-pruned cache.

    # kvpress wants pandas < 3: a separate environment
    python -m venv .venv-bench && . .venv-bench/bin/activate && pip install torch==2.13.0 -e '.[bench]'
    python bench/kvpress_bench.py --squad PATH [--n 20] [--model results/models/qwen2.5-coder-0.5b]
    # the long synthetic set (>= 4,000 tokens per prompt), kvpress's protocol only, 3 retentions:
    python bench/kvpress_bench.py --overlay bench/overlays/selection_long.yaml --name long --n 6 --grid three \
        --own-grids none

Both answer the identical token sequences: kvpipe's prompt for each question, split at the end of
the context. The prefix (chat template and context) is prefilled and pruned; the question and the
answer prompt follow at their original positions; greedy decoding, `--max-new-tokens`, stopping at
the same end tokens (kvpipe's stop ids, set as the model's eos for kvpress), `--threads` each.

- kvpress: `SnapKVPress` (window 64, kernel 5) through its "kv-press-text-generation" pipeline, one
  call per retention (context prefill under the press, then its greedy decoding), as its own
  evaluation runs; only the pipeline's string preprocessing is bypassed (its `forward` is called).
- kvpipe, SnapKV's `kvpress` protocol (the same work): one prefill, scores over the whole prefix,
  every retention answered as one batch of per-(layer, KV head) selections of int(r · prefix)
  prefix positions, the template evictable.
- kvpipe's own protocols, each a labelled row that is not the same work (PROTOCOLS).

Each side runs in its own process (kvpress patches transformers' attention when imported) and is
warmed up on the first question first. Recorded per grid: seconds per answered condition and the
ratio, each side's time split into prefill (everything before answering) and answering, decoded
tokens per condition (stop token included), answerable F1, the share of conditions whose answers
are identical, the kept positions' agreement per (layer, KV head) and the conditions whose answers
differ. Writes bench/results/kvpress.json (with --name NAME: kvpress_NAME.json).
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
from benchkit import TARGETS as BENCH_TARGETS
from benchkit import bench_config, bench_samples, in_child, record_path

GRIDS = {"three": [0.25, 0.5, 0.75], "nine": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
TARGETS = {"three": BENCH_TARGETS["kvpress_speedup"].bound, "nine": BENCH_TARGETS["kvpress_speedup_9"].bound}
WINDOW, KERNEL = 64, 5
PROTOCOLS = {
    "kvpress": "the same work: kvpress's protocol (window 64 uncapped, scores over the whole prefix, template evictable, "
    "int(r · prefix) positions per layer and KV head)",
    "query_agnostic": "not the same work: kvpipe's query_agnostic protocol, preset kvpress (template always kept; "
    "round(r · prompt) − template context tokens; window capped at half the budget; edge padding by replication)",
    "query_aware": "not the same work: kvpipe's query_aware protocol, preset kvpress (window: the last 64 question "
    "tokens of a full-context question pass, also decoded; template kept; budget as query_agnostic)",
}


def _setup(model: Path, samples: Path, threads: int, prompt: dict) -> tuple:
    """The model, the sample rows and their prompt tokens (built with the benchmark config's prompt settings)."""
    import torch

    from kvpipe.data.prompt import build_prompt
    from kvpipe.models.load import load_model

    torch.set_num_threads(threads)
    lm = load_model(model, "cpu", "float32")
    rows = pd.read_parquet(samples)
    return lm, rows, [build_prompt(lm.tokenizer, prompt, r.context, r.question) for r in rows.itertuples()]


def _conditions(protocol: str, tokens, inputs, retentions: list[float]) -> list:
    """The pruned conditions of one prompt under a protocol, one per retention."""
    from kvpipe.inference.requests import AnswerRequest
    from kvpipe.scoring.methods import SnapKV, top_n
    from kvpipe.scoring.select import context_budget
    from kvpipe.scoring.snapkv_kvpress import kvpress_budget

    snap = SnapKV.from_config({"snapkv": {"preset": "kvpress", "protocol": protocol}})
    out = []
    for r in retentions:
        if protocol == "kvpress":
            k = kvpress_budget(r, tokens.context_end)
        else:
            k = context_budget(r, tokens.context_end - tokens.context_start, tokens.context_start, "prompt")
        out.append(
            AnswerRequest(
                f"r={r}",
                top_n(snap.head_scores(inputs, k), k),
                method="snapkv",
                retention=r,
                source="own_per_head",
                keep_template=protocol != "kvpress",
            )
        )
    return out


def kvpipe_side(
    model: Path, samples: Path, retentions: list[float], max_new_tokens: int, threads: int, protocols: list[str], prompt: dict
) -> dict:
    """Per protocol and question: seconds for one prefill + scoring + every retention in one batch, of which before
    answering (`prefill_seconds`: the prefill, scoring and selection; for query_aware also the full-context question
    pass and its decoding that give its window); answers; decoded tokens; kept positions."""
    from kvpipe.inference.requests import AnswerRequest
    from kvpipe.inference.session import Session
    from kvpipe.scoring.methods import ScoringInputs

    lm, rows, prompts = _setup(model, samples, threads, prompt)

    def one(i: int, protocol: str) -> dict:
        tokens = prompts[i]
        started = time.perf_counter()
        session = Session(lm, tokens, WINDOW)
        if protocol == "query_aware":  # the question pass whose last queries are the window
            session.answer([AnswerRequest("full")], max_new_tokens, capture_row=0)
        conditions = _conditions(protocol, tokens, ScoringInputs.from_session(session, i), retentions)
        prefilled = time.perf_counter()
        answers = session.answer(conditions, max_new_tokens)
        seconds = time.perf_counter() - started
        nq = len(tokens) - tokens.context_end
        return {
            "seconds": seconds,
            "prefill_seconds": prefilled - started,
            "answers": [a.text for a in answers],
            "decoded": [a.cache_length - a.kept - nq + 1 for a in answers],
            "kept": [c.selection.tolist() for c in conditions] if protocol == "kvpress" else None,
        }

    for protocol in protocols:  # warm-up
        one(0, protocol)
    return {protocol: [one(i, protocol) for i in range(len(rows))] for protocol in protocols}


def kvpress_side(
    model: Path, samples: Path, retentions: list[float], max_new_tokens: int, threads: int, prompt: dict
) -> list:
    """Per question and retention: seconds of one pipeline forward under SnapKVPress, of which before its question
    pass (`prefill_seconds`: the context prefill under the press, compression included); answer; decoded; kept."""
    import torch
    from kvpress import SnapKVPress
    from kvpress.utils import compute_n_kept
    from transformers import pipeline

    from kvpipe.inference.decode import stop_ids

    lm, rows, prompts = _setup(model, samples, threads, prompt)
    lm.model.generation_config.eos_token_id = stop_ids(lm)  # the same end tokens as kvpipe
    pipe = pipeline("kv-press-text-generation", model=lm.model, tokenizer=lm.tokenizer, device="cpu")
    calls: list[float] = []  # start of each forward call of the LM head model: the question pass, then each decoding step
    lm.model.register_forward_pre_hook(lambda *_: calls.append(time.perf_counter()))

    def one(i: int, r: float) -> dict:
        tokens = prompts[i]
        ids = torch.as_tensor(tokens.input_ids)[None]
        press = SnapKVPress(compression_ratio=1 - r, window_size=WINDOW, kernel_size=KERNEL)
        scores: dict[int, torch.Tensor] = {}
        score = press.score

        def recording(module, *args):
            s = score(module, *args)
            scores[module.layer_idx] = s[0].clone()
            return s

        press.score = recording
        inputs = {"context_ids": ids[:, : tokens.context_end], "questions_ids": [ids[:, tokens.context_end :]]}
        calls.clear()
        started = time.perf_counter()
        (answer,) = pipe.forward(inputs, press=press, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - started
        n = compute_n_kept(tokens.context_end, press.compression_ratio)  # ScorerPress.compress's own topk
        kept = [scores[layer].topk(n, dim=-1).indices.sort(dim=-1).values.tolist() for layer in sorted(scores)]
        return {"seconds": seconds, "prefill_seconds": calls[0] - started, "answer": answer.strip(), "decoded": len(calls),
                "kept": kept}

    one(0, retentions[0])  # warm-up
    return [[one(i, r) for r in retentions] for i in range(len(rows))]


def kept_agreement(ours: list, theirs: list) -> tuple[float, np.ndarray]:
    """(share of (question, retention, layer, KV head) whose kept sets are identical, mean |∩| / k per layer and head)."""
    same, share = [], []
    for q_ours, q_theirs in zip(ours, theirs, strict=True):
        for a, b in zip(q_ours, q_theirs, strict=True):
            a, b = np.asarray(a), np.asarray(b)  # [layers, heads, k]
            inter = np.array([[len(np.intersect1d(x, y)) for x, y in zip(la, lb)] for la, lb in zip(a, b)])
            same.append(inter == a.shape[-1])
            share.append(inter / a.shape[-1])
    return float(np.mean(same)), np.mean(share, axis=0)


def _side_row(f1: list[float], seconds: float, prefill: float, decoded: list[int], n_conditions: int) -> dict:
    """A side's figures. prefill: its seconds before answering (kvpipe: the context prefill, scoring and selection, shared
    by every retention; kvpress: each call's prefill under the press, compression included); the rest is answering (the
    question pass and decoding; kvpipe: pruning too)."""
    return {
        "seconds_per_condition": round(seconds / n_conditions, 4),
        "prefill_seconds_per_condition": round(prefill / n_conditions, 4),
        "answer_seconds_per_condition": round((seconds - prefill) / n_conditions, 4),
        "decoded_tokens_per_condition": round(float(np.mean(decoded)), 2),
        "answerable_f1": round(float(np.mean(f1)), 4) if f1 else None,
    }


def compare(
    model: Path, samples: Path, grid: list[float], max_new_tokens: int, threads: int, protocols: list[str], prompt: dict
) -> dict:
    """One grid's record: both sides on the same questions (each in its own process), their figures, the kept
    positions' agreement and the conditions whose answers differ."""
    from kvpipe.data.qa_metrics import score_reply

    rows = pd.read_parquet(samples)
    load = os.getloadavg()[0]
    ours = in_child(kvpipe_side, model, samples, grid, max_new_tokens, threads, protocols, prompt)
    theirs = in_child(kvpress_side, model, samples, grid, max_new_tokens, threads, prompt)
    n_conditions, answerable = len(rows) * len(grid), [bool(len(a)) for a in rows["answers"]]

    def f1(answers: list[list[str]]) -> list[float]:
        return [
            score_reply(text, list(row.answers)).f1
            for row, texts, ok in zip(rows.itertuples(), answers, answerable)
            if ok
            for text in texts
        ]

    press_answers = [[c["answer"] for c in q] for q in theirs]
    press_seconds = sum(c["seconds"] for q in theirs for c in q)
    out = {
        "retentions": grid,
        "conditions_per_prefill": len(grid),
        "questions": len(rows),
        "answerable_questions": int(sum(answerable)),
        "kvpress": _side_row(f1(press_answers), press_seconds, sum(c["prefill_seconds"] for q in theirs for c in q),
                             [c["decoded"] for q in theirs for c in q], n_conditions),
        "kvpipe": {},
    }
    for protocol in protocols:
        what, runs = PROTOCOLS[protocol], ours[protocol]
        seconds = sum(q["seconds"] for q in runs)
        same = [a == b for q, p in zip(runs, press_answers) for a, b in zip(q["answers"], p)]
        out["kvpipe"][protocol] = {
            "what": what,
            **_side_row(f1([q["answers"] for q in runs]), seconds, sum(q["prefill_seconds"] for q in runs),
                        [d for q in runs for d in q["decoded"]], n_conditions),
            "speedup_over_kvpress": round(press_seconds / seconds, 2),
            "same_answer_fraction": round(float(np.mean(same)), 4),
        }
    identical, per_head = kept_agreement([q["kept"] for q in ours["kvpress"]], [[c["kept"] for c in q] for q in theirs])
    out["kept_positions"] = {
        "identical_fraction": round(identical, 4),
        "agreement_min": round(float(per_head.min()), 4),
        "agreement_per_layer_head": per_head.round(4).tolist(),
    }
    out["different_answers"] = [
        {"question": row.question, "retention": r, "kvpipe": ours["kvpress"][i]["answers"][j], "kvpress": press_answers[i][j]}
        for i, row in enumerate(rows.itertuples())
        for j, r in enumerate(grid)
        if ours["kvpress"][i]["answers"][j] != press_answers[i][j]
    ]
    out["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]  # 1-minute load at start and end: 2 cores
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", type=Path, default=Path("data/squad_v2/dev-v2.0.json"), help="official SQuAD v2 JSON")
    ap.add_argument("--overlay", type=Path, action="append", default=[], help="config overlay(s) merged last; one naming "
                    "another dataset in run.datasets races on that one (e.g. bench/overlays/selection_long.yaml)")
    ap.add_argument("--name", default="", help="a variant's name: the record is bench/results/kvpress_NAME.json")
    ap.add_argument("--n", type=int, default=20, help="questions")
    ap.add_argument("--model", type=Path, default=Path("results/models/qwen2.5-coder-0.5b"))
    ap.add_argument("--grid", choices=sorted(GRIDS), action="append", help="retention grids (default: three, nine)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    ap.add_argument(
        "--own-grids",
        choices=[*sorted(GRIDS), "none"],
        action="append",
        help="grids on which kvpipe's own protocols run too (default: every grid; none: no grid)",
    )
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/kvpress[_NAME].json")
    ap.add_argument("--update", action="store_true", help="keep the other grids of the record at --out")
    args = ap.parse_args()
    from importlib.metadata import version

    out = args.out or record_path("kvpress", args.name)
    config, dataset, spec, _ = bench_config(args.overlay, args.squad)
    record = {
        "model": args.model.name,
        "dataset": dataset,
        "machine": f"{platform.machine()}, CPU",
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "kvpress": version("kvpress"),
        "preset": {"window": WINDOW, "kernel": KERNEL, "pooling": "avg"},
        "targets": TARGETS,
        "grids": {},
    }
    if args.update and out.exists():  # keep the other grids of a record made with the same settings
        old = {"dataset": "squad_v2"} | json.loads(out.read_text())   # records before the field were SQuAD v2
        if {k: v for k, v in old.items() if k != "grids"} != {k: v for k, v in record.items() if k != "grids"}:
            raise SystemExit(f"{out}: recorded with other settings; cannot --update it")
        record["grids"] = old["grids"]
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.parquet"
        bench_samples(config, dataset, spec, args.model, args.n, samples)
        for name in args.grid or ["three", "nine"]:
            protocols = list(PROTOCOLS) if name in (args.own_grids or GRIDS) else ["kvpress"]
            record["grids"][name] = compare(
                args.model, samples, GRIDS[name], args.max_new_tokens, args.threads, protocols, config["prompt"]
            )
            print(name, json.dumps({k: v for k, v in record["grids"][name].items() if k != "kept_positions"}), flush=True)
            out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")  # after every grid


if __name__ == "__main__":
    main()
