"""The selection-transfer stage: who keeps which context tokens, and what it costs in QA F1.

Per pair and sample, each model's context is prefilled once (kvpipe.inference.session.Session).
The full-KV answer comes first; its question pass yields the Q2C scores. Then, for every
method and retention below 1, one batch answers all pruned conditions of that model:

    own           the model's own selection
    transfer      the partner's selection (main <- scout: forward; scout <- main: reverse)
    random        the seeded random selection (the same positions for both models)
    own_per_head  with selection.per_head: the model's own per-(layer, KV head) selections

At retention 1 every condition keeps the whole context and equals the full-KV answer.
Writes per-sample answers, scout/main overlaps, timings and the run's facts;
kvpipe.selection.report turns them into the notes' tables with paired bootstrap CIs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm import tqdm

from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.data.qa_metrics import score_prediction
from kvpipe.errors import KvpipeError
from kvpipe.inference.conditions import Condition
from kvpipe.inference.decode import Answer
from kvpipe.inference.session import Session
from kvpipe.io import read_json, write_json, write_parquet
from kvpipe.kv.checks import check_window
from kvpipe.models.load import CARD, load_model
from kvpipe.selection.methods import ScoringInputs, SelectionMethod, SnapKV, build_methods, top_k

ROLES = ("scout", "main")
Scores = dict[str, tuple[np.ndarray, np.ndarray]]   # method -> (shared [n_context], per head [layers, kv_heads, n_context])
Selections = dict[str, dict[str, dict[float, np.ndarray]]]   # role -> method -> retention -> [k]


def sources(method: str) -> tuple[str, ...]:
    """Where a model's selection can come from; random selections are shared, so only 'own'."""
    return ("own",) if method == "random" else ("own", "transfer")


def overlap_row(a: np.ndarray, b: np.ndarray, n: int) -> dict[str, float]:
    """Overlap of two equal-size selections of n candidates, with the random-selection expectation."""
    k, inter = len(a), len(np.intersect1d(a, b))
    expected = k * k / n
    return {"overlap": inter / k, "jaccard": inter / (2 * k - inter), "overlap_random": expected / k,
            "jaccard_random": expected / (2 * k - expected)}


def _scores(session: Session, methods: list[SelectionMethod], sample_idx: int) -> Scores:
    inputs = ScoringInputs.from_session(session, sample_idx)
    out = {}
    for m in methods:
        heads = m.head_scores(inputs)
        out[m.name] = (m.reduce_heads(heads).sum(axis=0), heads)
    return out


class PairRun:
    """A pair's two models and the selection settings; runs one sample at a time in small steps."""

    def __init__(self, models: dict[str, Path], pair: str, cfg: dict[str, Any], prompt: dict[str, Any],
                 device: str, dtype: str) -> None:
        self.lms = {role: load_model(models[role], device, dtype) for role in ROLES}
        self.pair, self.cfg, self.prompt = pair, cfg, prompt
        self.methods = build_methods(cfg)
        self.window = max([m.window for m in self.methods if isinstance(m, SnapKV)], default=1)
        self.retentions = sorted(cfg["retention"])
        self.pruned = [r for r in self.retentions if r < 1]

    def prompts(self, row: Any) -> dict[str, PromptTokens]:
        """Both models' prompts for a sample; they must tokenise it identically and fit their windows."""
        tokens = {role: build_prompt(self.lms[role].tokenizer, self.prompt, row.context, row.question) for role in ROLES}
        if not np.array_equal(tokens["scout"].input_ids, tokens["main"].input_ids):
            raise KvpipeError(f"pair {self.pair}: scout and main tokenise sample {row.id} differently; selection "
                              "transfer needs a shared tokenizer (token alignment is not implemented)")
        for role in ROLES:
            check_window(self.lms[role], len(tokens[role]), row.id, self.cfg["max_new_tokens"])
        return tokens

    def prefill(self, role: str, tokens: PromptTokens, sample_idx: int) -> tuple[Session, Answer, Scores, dict[str, float]]:
        """A model's session, its full-KV answer (capturing the question) and every method's scores, timed."""
        t0 = time.perf_counter()
        session = Session(self.lms[role], tokens, self.window)
        t1 = time.perf_counter()
        (full,) = session.answer([Condition(f"{role} full", role=role)], self.cfg["max_new_tokens"], self.cfg["rerotate"],
                                 capture_row=0)
        t2 = time.perf_counter()
        scores = _scores(session, self.methods, sample_idx)
        return session, full, scores, {"prefill_s": t1 - t0, "full_answer_s": t2 - t1, "scoring_s": time.perf_counter() - t2}

    def full_conditions(self, role: str) -> list[Condition]:
        """The full-KV answer, and at retention 1 (when in the grid) every method's condition, which equals it."""
        conditions = [Condition(f"{role} full", role=role)]
        if 1.0 in self.retentions:
            conditions += [Condition(f"{role} {m.name} 1 {source}", role=role, method=m.name, retention=1.0, source=source)
                           for m in self.methods for source in sources(m.name)]
        return conditions

    def selections(self, scores: dict[str, Scores]) -> Selections:
        """Each model's shared top-k selection per method and retention below 1."""
        return {role: {m.name: {r: top_k(scores[role][m.name][0], r) for r in self.pruned} for m in self.methods}
                for role in ROLES}

    def overlaps(self, scores: dict[str, Scores], selections: Selections, n_ctx: int) -> list[dict[str, Any]]:
        """Scout/main overlap of the selections and the Spearman correlation of the (finite) scores."""
        rows = []
        for m in self.methods:
            a, b = scores["scout"][m.name][0], scores["main"][m.name][0]
            finite = np.isfinite(a) & np.isfinite(b)
            rho = float(spearmanr(a[finite], b[finite]).statistic)
            rows += [{"method": m.name, "retention": r, "spearman": rho,
                      **overlap_row(selections["scout"][m.name][r], selections["main"][m.name][r], n_ctx)}
                     for r in self.pruned]
        return rows

    def pruned_conditions(self, role: str, selections: Selections, scores: Scores) -> list[Condition]:
        """A model's pruned conditions: own, transfer (and random) selections, plus own per-head ones if asked."""
        other = "main" if role == "scout" else "scout"
        conditions = [Condition(f"{role} {m.name} {r:g} {source}", selections[role if source == "own" else other][m.name][r],
                                role=role, method=m.name, retention=r, source=source)
                      for m in self.methods for r in self.pruned for source in sources(m.name)]
        if self.cfg["per_head"]:
            conditions += [Condition(f"{role} {m.name} {r:g} own_per_head", top_k(scores[m.name][1], r), role=role,
                                     method=m.name, retention=r, source="own_per_head")
                           for m in self.methods if m.name != "random" for r in self.pruned]
        return conditions

    def answer_pruned(self, session: Session, conditions: list[Condition], clock: dict[str, float]) -> list[Answer]:
        """All pruned conditions of one model as one batch, timed into clock."""
        t0 = time.perf_counter()
        results = session.answer(conditions, self.cfg["max_new_tokens"], self.cfg["rerotate"])
        clock.update(pruned_answers_s=time.perf_counter() - t0, pruned_conditions=len(conditions),
                     prune_copy_s=session.prune_seconds)
        return results

    def record(self, row: Any, condition: Condition, answer: Answer, n_ctx: int) -> dict[str, Any]:
        """One answers-table row: the condition, its scored prediction and its cache sizes."""
        prediction, em, f1 = score_prediction(answer.text, list(row.answers))
        return {"role": condition.role, "model": self.lms[condition.role].slug, "method": condition.method,
                "retention": condition.retention, "source": condition.source, "prediction": prediction, "exact": em,
                "f1": f1, "n_context": n_ctx, "n_kept_context": condition.n_kept(n_ctx), "cache_length": answer.cache_length}

    def sample(self, row: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Answers, overlaps and timings rows of one sample."""
        tokens = self.prompts(row)
        n_ctx = tokens["main"].context_end - tokens["main"].context_start   # the same for both: same tokens
        base = {"sample_idx": row.sample_idx, "sample_id": row.id, "is_impossible": bool(row.is_impossible)}
        sessions, scores, clock, answers = {}, {}, {}, []
        for role in ROLES:
            sessions[role], full, scores[role], clock[role] = self.prefill(role, tokens[role], row.sample_idx)
            answers += [self.record(row, c, full, n_ctx) for c in self.full_conditions(role)]
        selections = self.selections(scores)
        for role in ROLES:
            conditions = self.pruned_conditions(role, selections, scores[role])
            if conditions:
                results = self.answer_pruned(sessions[role], conditions, clock[role])
                answers += [self.record(row, c, a, n_ctx) for c, a in zip(conditions, results, strict=True)]
        timings = [{"role": role, "model": self.lms[role].slug, "prompt_tokens": len(tokens[role]), **clock[role]}
                   for role in ROLES]
        return ([base | a for a in answers], [base | o for o in self.overlaps(scores, selections, n_ctx)],
                [base | t for t in timings])


def run_pair(models: dict[str, Path], samples: pd.DataFrame, pair: str, cfg: dict[str, Any], prompt: dict[str, Any],
             device: str = "auto", dtype: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Answers, overlaps and timings of every condition of a pair on every sample (progress bar on stderr)."""
    run = PairRun(models, pair, cfg, prompt, device, dtype)
    answers, overlaps, timings = [], [], []
    for row in tqdm(samples.itertuples(index=False), total=len(samples), desc=f"selection {pair}", unit="sample"):
        a, o, t = run.sample(row)
        answers += a
        overlaps += o
        timings += t
    return pd.DataFrame(answers), pd.DataFrame(overlaps), pd.DataFrame(timings)


def run_selection(scout_dir: Path, main_dir: Path, samples: Path, pair: str, cfg: dict[str, Any], prompt: dict[str, Any],
                  device: str, dtype: str, out_dir: Path) -> None:
    """Run a pair; write answers, overlap and timings Parquet and facts.json under out_dir."""
    table = pd.read_parquet(samples)
    models = {"scout": Path(scout_dir), "main": Path(main_dir)}
    answers, overlaps, timings = run_pair(models, table, pair, cfg, prompt, device, dtype)
    out_dir = Path(out_dir)
    for name, frame in (("answers", answers), ("overlap", overlaps), ("timings", timings)):
        write_parquet(frame, out_dir / f"{name}.parquet")
    write_json(out_dir / "facts.json", {"pair": pair, "n_samples": len(table), "selection": cfg,
                                        **{role: read_json(models[role] / CARD)["slug"] for role in ROLES}})
