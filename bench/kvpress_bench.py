"""kvpipe against NVIDIA kvpress on the same work: a model answers SQuAD v2 questions from its own SnapKV-pruned cache.

    # kvpress wants pandas < 3: a separate environment
    python -m venv .venv-bench && . .venv-bench/bin/activate && pip install torch==2.13.0 -e '.[bench]'
    python bench/kvpress_bench.py --squad PATH [--n 20] [--model results/models/qwen2.5-coder-0.5b]

Both answer the identical token sequences: kvpipe's prompt for each question, split at the end of
the context. The prefix (chat template and context) is prefilled and pruned; the question and the
answer prompt follow at their original positions; greedy decoding, `--max-new-tokens`, stopping at
the model's end tokens. Selection: SnapKV with kvpress's preset (window 64, kernel 5, average
pooling, query groups averaged), per (layer, KV head), the window kept; the budget counts the whole
prefix as kvpress does (kvpipe's `budget: prompt`).

- kvpress: `SnapKVPress` through its "kv-press-text-generation" pipeline, one call per retention
  (context prefill under the press, then its greedy decoding), as its own evaluation runs; only the
  pipeline's string preprocessing is bypassed (its `forward` is called), so both see the same tokens.
- kvpipe: one prefill, SnapKV scores, and every retention answered as one batch (a Session with the
  per-head selections: the selection stage's `own_per_head` conditions).

Each side runs in its own process (kvpress patches transformers' attention when imported) and is
warmed up on the first question first. Recorded: wall time per answered condition of each and
their ratio, F1 of each with the answers' agreement, and the agreement of the kept context
positions per (layer, KV head): |kvpress ∩ kvpipe| / |kvpipe| (kvpress may also drop template
tokens; kvpipe keeps them). Writes bench/results/kvpress.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchkit import in_child

GRIDS = {"three": [0.25, 0.5, 0.75], "nine": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
PRESET = {"window": 64, "kernel": 5}


def _prompts(model: Path, samples: Path) -> tuple[pd.DataFrame, list]:
    from kvpipe.config import load_config
    from kvpipe.data.prompt import build_prompt
    from kvpipe.models.load import load_model

    config = load_config(["config.yaml"])
    lm = load_model(model, "cpu", "float32")
    rows = pd.read_parquet(samples)
    return rows, [build_prompt(lm.tokenizer, config["prompt"], r.context, r.question) for r in rows.itertuples()]


def kvpipe_side(model: Path, samples: Path, retentions: list[float], max_new_tokens: int) -> dict:
    """Per question: seconds for one prefill + scoring + every retention answered in one batch; answers; selections."""
    from kvpipe.inference.requests import AnswerRequest
    from kvpipe.inference.session import Session
    from kvpipe.models.load import load_model
    from kvpipe.scoring.methods import ScoringInputs, SnapKV, top_n
    from kvpipe.scoring.select import context_budget

    lm = load_model(model, "cpu", "float32")
    rows, prompts = _prompts(model, samples)
    snap = SnapKV.from_config({"snapkv": {"preset": "kvpress"}})

    def one(i: int) -> tuple[float, list[str], dict[float, np.ndarray]]:
        tokens = prompts[i]
        n = tokens.context_end - tokens.context_start
        started = time.perf_counter()
        session = Session(lm, tokens, snap.window)
        inputs = ScoringInputs.from_session(session, i)
        selections = {}
        for r in retentions:
            k = context_budget(r, n, tokens.context_start, "prompt")
            selections[r] = top_n(snap.head_scores(inputs, k), k)
        conditions = [AnswerRequest(f"r={r}", selections[r], method="snapkv", retention=r, source="own_per_head")
                      for r in retentions]
        answers = session.answer(conditions, max_new_tokens)
        return time.perf_counter() - started, [a.text for a in answers], selections

    one(0)   # warm-up
    out = [one(i) for i in range(len(rows))]
    return {"seconds": [o[0] for o in out], "answers": [o[1] for o in out],
            "selections": [{r: s.tolist() for r, s in o[2].items()} for o in out]}


def kvpress_side(model: Path, samples: Path, retentions: list[float], max_new_tokens: int) -> dict:
    """Per question and retention: seconds of one pipeline forward under SnapKVPress; answers; kept positions."""
    import torch
    from kvpress import SnapKVPress
    from kvpress.utils import compute_n_kept
    from transformers import pipeline

    from kvpipe.models.load import load_model

    lm = load_model(model, "cpu", "float32")
    pipe = pipeline("kv-press-text-generation", model=lm.model, tokenizer=lm.tokenizer, device="cpu")
    rows, prompts = _prompts(model, samples)

    def one(i: int, r: float) -> tuple[float, str, list]:
        tokens = prompts[i]
        ids = torch.as_tensor(tokens.input_ids)[None]
        press = SnapKVPress(compression_ratio=1 - r, window_size=PRESET["window"], kernel_size=PRESET["kernel"])
        scores: dict[int, torch.Tensor] = {}
        score = press.score

        def recording(module, *args, **kwargs):
            s = score(module, *args, **kwargs)
            scores[module.layer_idx] = s[0].detach().float()
            return s

        press.score = recording
        inputs = {"context_ids": ids[:, :tokens.context_end], "questions_ids": [ids[:, tokens.context_end:]]}
        started = time.perf_counter()
        (answer,) = pipe.forward(inputs, press=press, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - started
        n_kept = compute_n_kept(tokens.context_end, 1 - r)
        kept = [scores[layer].topk(n_kept, dim=-1).indices.sort(dim=-1).values.tolist() for layer in sorted(scores)]
        return seconds, answer.strip(), kept

    one(0, retentions[0])   # warm-up
    out = [[one(i, r) for r in retentions] for i in range(len(rows))]
    return {"seconds": [[o[0] for o in q] for q in out], "answers": [[o[1] for o in q] for q in out],
            "kept": [[o[2] for o in q] for q in out]}


def agreement(pipe_sel: list, press_kept: list, context_start: int) -> float:
    """Mean over (layer, KV head) of |kvpress ∩ kvpipe| / |kvpipe| in context positions."""
    values = [len(set(np.asarray(p) + context_start) & set(q)) / len(p)
              for layer_p, layer_q in zip(pipe_sel, press_kept, strict=True)
              for p, q in zip(layer_p, layer_q, strict=True)]
    return float(np.mean(values))


def compare(model: Path, samples: Path, grid: list[float], max_new_tokens: int) -> dict:
    from kvpipe.data.qa_metrics import score_prediction

    rows, prompts = _prompts(model, samples)
    ours = in_child(kvpipe_side, model, samples, grid, max_new_tokens)
    theirs = in_child(kvpress_side, model, samples, grid, max_new_tokens)
    f1 = {"kvpipe": [], "kvpress": []}
    agree, same_answer = [], []
    for i, row in enumerate(rows.itertuples()):
        for j, r in enumerate(grid):
            a, b = ours["answers"][i][j], theirs["answers"][i][j]
            f1["kvpipe"].append(score_prediction(a, list(row.answers))[2])
            f1["kvpress"].append(score_prediction(b, list(row.answers))[2])
            same_answer.append(a == b)
            agree.append(agreement(ours["selections"][i][r], theirs["kept"][i][j], prompts[i].context_start))
    per_condition = {"kvpipe": float(np.sum(ours["seconds"])) / (len(rows) * len(grid)),
                     "kvpress": float(np.sum(theirs["seconds"])) / (len(rows) * len(grid))}
    return {"retentions": grid, "conditions_per_prefill": len(grid), "questions": len(rows),
            "seconds_per_condition": {k: round(v, 4) for k, v in per_condition.items()},
            "speedup_kvpipe_over_kvpress": round(per_condition["kvpress"] / per_condition["kvpipe"], 2),
            "f1": {k: round(float(np.mean(v)), 4) for k, v in f1.items()},
            "same_answer_fraction": round(float(np.mean(same_answer)), 4),
            "kept_position_agreement": round(float(np.mean(agree)), 4),
            "prompt_tokens_mean": round(float(np.mean([len(p) for p in prompts])), 1),
            "examples": [{"question": row.question, "gold": list(row.answers), "retentions": grid,
                          "kvpipe": ours["answers"][i], "kvpress": theirs["answers"][i]}
                         for i, row in enumerate(rows.head(3).itertuples())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", type=Path, required=True, help="official SQuAD v2 JSON")
    ap.add_argument("--n", type=int, default=20, help="questions")
    ap.add_argument("--model", type=Path, default=Path("results/models/qwen2.5-coder-0.5b"))
    ap.add_argument("--grid", choices=sorted(GRIDS), action="append", help="retention grids (default: three, nine)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("bench/results/kvpress.json"))
    args = ap.parse_args()
    from importlib.metadata import version

    from kvpipe.config import load_config
    from kvpipe.data.sampling import sample_to_file

    config = load_config(["config.yaml", "config/squad_v2.yaml"])
    record = {"model": args.model.name, "machine": f"{platform.machine()}, CPU", "max_new_tokens": args.max_new_tokens,
              "kvpress": version("kvpress"), "preset": PRESET | {"pooling": "avg"}, "grids": {}}
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.parquet"
        sample_to_file("squad_v2", config["datasets"]["squad_v2"] | {"path": str(args.squad)}, args.model,
                       config["prompt"], config["sampling"] | {"n": args.n}, samples)
        for name in args.grid or ["three", "nine"]:
            record["grids"][name] = compare(args.model, samples, GRIDS[name], args.max_new_tokens)
            print(name, json.dumps(record["grids"][name]), flush=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
