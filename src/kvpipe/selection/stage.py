"""The selection-transfer stage: who keeps which context tokens, and what it costs in QA F1.

Per pair and sample, each model's context is prefilled once (kvpipe.inference.session.Session).
The full-KV answer comes first; its question pass yields the Q2C scores. Then, for every
method and retention below 1, one batch answers all pruned conditions of that model:

    own           the model's own selection
    transfer      the partner's selection (main <- scout: forward; scout <- main: reverse)
    random        the seeded random selection (the same positions for both models)
    own_per_head  with selection.per_head: the model's own per-(layer, KV head) selections

At retention 1 every condition keeps the whole context and equals the full-KV answer.
Outputs per-sample answers and scores, scout/main overlap, and timings; kvpipe.selection.report
turns them into the notes' tables with paired bootstrap CIs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from kvpipe.data.prompt import build_prompt
from kvpipe.data.qa_metrics import normalize_answer, squad_exact, squad_f1
from kvpipe.errors import KvpipeError
from kvpipe.inference.session import Session
from kvpipe.models.load import load_model
from kvpipe.selection.methods import ScoringInputs, SelectionMethod, SnapKV, build_methods, top_k

ROLES = ("scout", "main")
log = logging.getLogger(__name__)
UNANSWERABLE = "unanswerable"


def score_prediction(text: str, answers: list[dict[str, Any]]) -> tuple[str, float, float]:
    """First line of the generation, 'unanswerable' mapped to the empty answer; EM and F1."""
    prediction = text.strip().splitlines()[0].strip() if text.strip() else ""
    if normalize_answer(prediction) == UNANSWERABLE:
        prediction = ""
    golds = [a["text"] for a in answers]
    return prediction, squad_exact(prediction, golds), squad_f1(prediction, golds)


def sources(method: str) -> tuple[str, ...]:
    """Where a model's selection can come from; random selections are shared, so only 'own'."""
    return ("own",) if method == "random" else ("own", "transfer")


def overlap_row(a: np.ndarray, b: np.ndarray, n: int) -> dict[str, float]:
    """Overlap of two equal-size selections of n candidates, with the random-selection expectation."""
    k, inter = len(a), len(np.intersect1d(a, b))
    expected = k * k / n
    return {"overlap": inter / k, "jaccard": inter / (2 * k - inter), "overlap_random": expected / k,
            "jaccard_random": expected / (2 * k - expected)}


def _scores(session: Session, methods: list[SelectionMethod], sample_idx: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method: (shared scores [n_context], per-head scores [layers, kv_heads, n_context])."""
    inputs = ScoringInputs(session.context, sample_idx, session.window_queries, session.window_index,
                           session.question_queries, session.question_index, session.question_keys)
    out = {}
    for m in methods:
        heads = m.head_scores(inputs)
        out[m.name] = (m.reduce_heads(heads).sum(axis=0), heads)
    return out


def run_pair(models: dict[str, Path], samples: pd.DataFrame, pair: str, cfg: dict[str, Any], prompt: dict[str, Any],
             device: str = "auto", dtype: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Answers, overlaps and timings of every condition of a pair on every sample."""
    lms = {role: load_model(models[role], device, dtype) for role in ROLES}
    methods = build_methods(cfg)
    window = max([m.window for m in methods if isinstance(m, SnapKV)], default=1)
    retentions = sorted(cfg["retention"])
    answers, overlaps, timings = [], [], []
    for row in samples.itertuples(index=False):
        tokens = {role: build_prompt(lms[role].tokenizer, prompt, row.context, row.question) for role in ROLES}
        if not np.array_equal(tokens["scout"].input_ids, tokens["main"].input_ids):
            raise KvpipeError(f"pair {pair}: scout and main tokenise sample {row.id} differently; selection transfer "
                              "needs a shared tokenizer (token alignment is not implemented)")
        n_ctx = tokens["main"].context_end - tokens["main"].context_start   # the same for both: same tokens
        base = {"sample_idx": row.sample_idx, "sample_id": row.id, "is_impossible": bool(row.is_impossible)}

        def record(role: str, method: str, retention: float, source: str, answer: Any, n_kept: int) -> None:
            prediction, em, f1 = score_prediction(answer.text, list(row.answers))
            answers.append(base | {"role": role, "model": lms[role].slug, "method": method, "retention": retention,
                                   "source": source, "prediction": prediction, "exact": em, "f1": f1,
                                   "n_context": n_ctx, "n_kept_context": n_kept, "cache_length": answer.cache_length})

        sessions, scores, clock = {}, {}, {}
        for role in ROLES:
            t0 = time.perf_counter()
            sessions[role] = s = Session(lms[role], tokens[role], window)
            t1 = time.perf_counter()
            (full,) = s.answer([np.arange(n_ctx)], cfg["max_new_tokens"], cfg["rerotate"], capture_row=0)
            t2 = time.perf_counter()
            scores[role] = _scores(s, methods, row.sample_idx)
            clock[role] = {"prefill_s": t1 - t0, "full_answer_s": t2 - t1, "scoring_s": time.perf_counter() - t2}
            record(role, "full", 1.0, "none", full, n_ctx)
            # at retention 1 every selection keeps the whole context: the conditions are the full-KV answer
            for method in [m.name for m in methods] if 1.0 in retentions else []:
                for source in sources(method):
                    record(role, method, 1.0, source, full, n_ctx)
        selections = {role: {m.name: {r: top_k(scores[role][m.name][0], r) for r in retentions if r < 1}
                             for m in methods} for role in ROLES}
        for m in methods:
            a, b = scores["scout"][m.name][0], scores["main"][m.name][0]
            finite = np.isfinite(a) & np.isfinite(b)
            rho = spearmanr(a[finite], b[finite]).statistic
            for r in retentions:
                if r < 1:
                    overlaps.append(base | {"method": m.name, "retention": r, "spearman": float(rho),
                                            **overlap_row(selections["scout"][m.name][r], selections["main"][m.name][r],
                                                          n_ctx)})
        for role in ROLES:
            other = "main" if role == "scout" else "scout"
            conditions = [(m.name, r, source, selections[role if source == "own" else other][m.name][r])
                          for m in methods for r in retentions if r < 1
                          for source in sources(m.name)]
            if cfg["per_head"]:
                conditions += [(m.name, r, "own_per_head", top_k(scores[role][m.name][1], r))
                               for m in methods if m.name != "random" for r in retentions if r < 1]
            if not conditions:
                continue
            t0 = time.perf_counter()
            results = sessions[role].answer([c[3] for c in conditions], cfg["max_new_tokens"], cfg["rerotate"])
            clock[role]["pruned_answers_s"] = time.perf_counter() - t0
            clock[role]["pruned_conditions"] = len(conditions)
            clock[role]["prune_copy_s"] = sessions[role].prune_seconds
            for (method, r, source, sel), res in zip(conditions, results, strict=True):
                record(role, method, r, source, res, sel.shape[-1])
        for role in ROLES:
            timings.append(base | {"role": role, "model": lms[role].slug, "prompt_tokens": len(tokens[role]),
                                   **clock[role]})
        log.info("sample %d/%d (%s): %s", len(timings) // 2, len(samples), row.id,
                 ", ".join(f"{r} {sum(v for k, v in clock[r].items() if k.endswith('_s')):.1f}s" for r in ROLES))
    return pd.DataFrame(answers), pd.DataFrame(overlaps), pd.DataFrame(timings)


def run_selection(scout_dir: Path, main_dir: Path, samples_path: Path, pair: str, dataset: str, cfg: dict[str, Any],
                  prompt: dict[str, Any], device: str, dtype: str, out_dir: Path) -> None:
    """Run a pair and write answers/overlap/timings Parquet, the tables, figures and summary."""
    from kvpipe.io import atomic_path
    from kvpipe.selection.report import write_report

    samples = pd.read_parquet(samples_path)
    answers, overlaps, timings = run_pair({"scout": Path(scout_dir), "main": Path(main_dir)}, samples, pair, cfg,
                                          prompt, device, dtype)
    out_dir = Path(out_dir)
    write_report(answers, overlaps, timings, cfg, pair, dataset, out_dir)
    for name, frame in (("overlap", overlaps), ("timings", timings), ("answers", answers)):
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
