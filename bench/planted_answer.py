"""Does a pruned cache that drops the planted answer span lose the answer? (real models)

On the synthetic dataset every answer occurs once in its passage. For each sample and each
model of the default pair, three conditions are answered from the same prefilled context:
the full cache, the cache without the answer span's tokens, and the cache without a span of
the same length elsewhere in the context (control). Writes bench/results/planted_answer.json.

    python bench/planted_answer.py [--n 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from benchkit import RECORDS, write_record

from kvpipe import layout
from kvpipe.config import load_config, run_models
from kvpipe.data.prompt import CONTEXT, build_prompt
from kvpipe.data.qa_metrics import score_prediction
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--results", type=Path, default=layout.RESULTS)
    ap.add_argument("--out", type=Path, default=RECORDS / "planted_answer.json")
    args = ap.parse_args()
    config = load_config(["config.yaml"])
    samples = pd.read_parquet(layout.samples_file("synthetic", args.results)).head(args.n)
    rng = np.random.default_rng(0)
    record: dict = {"dataset": "synthetic", "n_samples": len(samples), "models": {}}
    for slug in run_models(config):
        lm = load_model(layout.model_dir(slug, args.results), "cpu", config["extraction"]["dtype"])
        f1 = {"full": [], "answer_dropped": [], "control_dropped": []}
        for row in samples.itertuples(index=False):
            ans = row.answers[0]
            tokens = build_prompt(lm.tokenizer, config["prompt"], row.context, row.question)
            ctx = np.arange(tokens.context_end - tokens.context_start)
            starts = tokens.char_start[tokens.context_start:tokens.context_end]
            ends = tokens.char_end[tokens.context_start:tokens.context_end]
            span = ctx[(starts < ans["answer_start"] + len(ans["text"])) & (ends > ans["answer_start"])]
            assert (tokens.segment[tokens.context_start + span] == CONTEXT).all()
            free = np.setdiff1d(ctx[: len(ctx) - len(span)], np.arange(span[0] - len(span), span[-1] + 1))
            control = np.arange(len(span)) + rng.choice(free)
            session = Session(lm, tokens)
            conditions = [AnswerRequest(name, sel) for name, sel in zip(f1, (None, np.setdiff1d(ctx, span),
                                                                           np.setdiff1d(ctx, control)))]
            answers = session.answer(conditions, config["selection"]["max_new_tokens"])
            for name, a in zip(f1, answers):
                f1[name].append(score_prediction(a.text, list(row.answers))[2])
        record["models"][slug] = {k: round(float(np.mean(v)), 3) for k, v in f1.items()}
        print(slug, record["models"][slug], flush=True)
        del lm, session
    write_record(args.out, record)


if __name__ == "__main__":
    main()
