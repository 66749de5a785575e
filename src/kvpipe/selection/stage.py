"""The selection-transfer stage: who keeps which context tokens, and what it costs in QA F1.

Per pair and sample, each model's context is prefilled once (kvpipe.inference.session.Session).
The full-KV answer comes first; its question pass yields the Q2C scores. Then, for every
method and retention below 1, one batch answers all pruned conditions of that model:

    own           the model's own selection
    transfer      the partner's selection (main <- scout: forward; scout <- main: reverse)
    random        the seeded random selection (the same positions for both models when they share a tokenizer)
    own_per_head  with selection.per_head: the model's own per-(layer, KV head) selections

and each model's floor `no_context` (every context token evicted: template and question only, the
question at its original positions; what the model knows without reading), answered in the same
batch; one `always_abstain` row per sample records what the constant abstention reply scores
(kvpipe.estimands). Every answer keeps its raw reply beside the scored prediction, with the
`abstained` and `empty` flags.

At retention 1 every condition keeps the whole context and equals the full-KV answer.
A retention r keeps k context tokens of each model by `selection.budget`
(kvpipe.scoring.select); answers record both the share of context tokens kept and
the share of the pre-question KV (template prefix + context) kept. Models that tokenise a sample
differently exchange selections through the characters their tokens cover (kvpipe.alignment): a
partner's selection becomes exactly k of the receiving model's tokens, those its kept characters
cover by at least `alignment.min_cover`, filled or cut by the partner's scores. Overlaps (in the
main's tokens, and across tokenizers also in characters) carry the method's exact random
expectation given the positions it always keeps (kvpipe.selection.overlap).
With `selection.max_samples`, only whole passages of the sample table answer, in sample order
(kvpipe.splits.whole_passages), so that the structure stage may use more samples than this one.
Writes per-sample answers and scout/main overlaps (each row with its sample's passage, the
bootstrap unit), timings and the run's facts; kvpipe.selection.report turns them into the notes'
tables with paired passage-bootstrap CIs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm import tqdm

from kvpipe.alignment import Alignment, align
from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.data.qa_metrics import UNANSWERABLE, score_reply
from kvpipe.errors import KvpipeError
from kvpipe.estimands import ALWAYS_ABSTAIN, NO_CONTEXT
from kvpipe.inference.decode import Answer
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.io import read_json, write_json, write_parquet
from kvpipe.kv.checks import check_window
from kvpipe.models.load import CARD, load_model
from kvpipe.scoring.methods import ScoringInputs, SelectionMethod, build_methods
from kvpipe.scoring.select import capture_window, context_budget, select
from kvpipe.selection.overlap import character_overlap, overlap_row
from kvpipe.settings import SelectionSettings, from_section
from kvpipe.splits import whole_passages

__all__ = ["overlap_row", "run_pair", "run_selection", "selected_samples"]
ROLES = ("scout", "main")
OTHER = {"scout": "main", "main": "scout"}
Scores = dict[str, ScoringInputs]                            # role -> its inputs, holding every method's scores
Selections = dict[str, dict[str, dict[float, np.ndarray]]]   # role -> method -> retention -> [k]
Budgets = dict[str, dict[float, int]]                         # role -> retention -> k


def sources(method: str) -> tuple[str, ...]:
    """Where a model's selection can come from; random selections are shared, so only 'own'."""
    return ("own",) if method == "random" else ("own", "transfer")


def _scores(session: Session, methods: list[SelectionMethod], sample_idx: int, budgets: list[int]) -> ScoringInputs:
    """The session's scoring inputs holding every method's scores without a budget and at each budget."""
    inputs = ScoringInputs.from_session(session, sample_idx)
    for m in methods:
        for k in [None, *budgets]:
            inputs.scores(m, k)
    return inputs


class PairRun:
    """A pair's two models and the selection settings; runs one sample at a time in small steps."""

    def __init__(self, models: dict[str, Path], pair: str, cfg: Mapping[str, Any], prompt: dict[str, Any],
                 device: str, dtype: str) -> None:
        """cfg: the validated selection section (and `alignment`: min_cover for a pair whose tokenizers differ),
        read once into SelectionSettings; each method builds itself from it (kvpipe.scoring.methods)."""
        self.lms = {role: load_model(models[role], device, dtype) for role in ROLES}
        self.pair, self.cfg, self.prompt = pair, from_section(SelectionSettings, cfg), prompt
        self.methods = build_methods(cfg)
        self.window = capture_window(self.methods)
        self.retentions = sorted(self.cfg.retention)
        self.pruned = [r for r in self.retentions if r < 1]

    def prompts(self, row: Any) -> dict[str, PromptTokens]:
        """Both models' prompts for a sample, each checked against its model's window."""
        tokens = {role: build_prompt(self.lms[role].tokenizer, self.prompt, row.context, row.question) for role in ROLES}
        for role in ROLES:
            check_window(self.lms[role], len(tokens[role]), row.id, self.cfg.max_new_tokens)
        return tokens

    @staticmethod
    def alignments(tokens: dict[str, PromptTokens]) -> dict[str, Alignment]:
        """Per model, its context tokens aligned with the partner's (partner -> model): the identity where both
        prompts are the same tokens, else by the characters they cover."""
        scout, main = tokens["scout"], tokens["main"]
        if scout.same_tokens(main):
            same = Alignment.identity(main.context_end - main.context_start)
            return {"scout": same, "main": same}
        return {"main": align(scout.context_spans, main.context_spans),
                "scout": align(main.context_spans, scout.context_spans)}

    def budgets(self, tokens: PromptTokens) -> dict[float, int]:
        """Context tokens kept at each retention below 1, by `selection.budget`."""
        n_ctx = tokens.context_end - tokens.context_start
        return {r: context_budget(r, n_ctx, tokens.context_start, self.cfg.budget) for r in self.pruned}

    def prefill(self, role: str, tokens: PromptTokens, sample_idx: int) -> tuple[Session, Answer, ScoringInputs,
                                                                                dict[str, float]]:
        """A model's session, its full-KV answer (capturing the question) and every method's scores, timed."""
        t0 = time.perf_counter()
        session = Session(self.lms[role], tokens, self.window)
        t1 = time.perf_counter()
        (full,) = session.answer([AnswerRequest(f"{role} full", role=role)], self.cfg.max_new_tokens, self.cfg.rerotate,
                                 capture_row=0)
        t2 = time.perf_counter()
        scores = _scores(session, self.methods, sample_idx, sorted(set(self.budgets(tokens).values())))
        return session, full, scores, {"prefill_s": t1 - t0, "full_answer_s": t2 - t1, "scoring_s": time.perf_counter() - t2}

    def full_conditions(self, role: str) -> list[AnswerRequest]:
        """The full-KV answer, and at retention 1 (when in the grid) every method's condition, which equals it."""
        conditions = [AnswerRequest(f"{role} full", role=role)]
        if 1.0 in self.retentions:
            conditions += [AnswerRequest(f"{role} {m.name} 1 {source}", role=role, method=m.name, retention=1.0, source=source)
                           for m in self.methods for source in sources(m.name)]
        return conditions

    def selections(self, scores: Scores, budgets: Budgets) -> Selections:
        """Each model's shared top-k selection per method and retention below 1."""
        return {role: {m.name: {r: select(m, scores[role], r, self.cfg.budget) for r in budgets[role]}
                       for m in self.methods} for role in ROLES}

    def mapped(self, alignment: Alignment, selection: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        """A partner's selection as k of a model's context tokens. The identity alignment passes it through; only
        a pair whose tokens differ reads `alignment.min_cover`."""
        if alignment.is_identity:
            return selection
        if self.cfg.alignment is None:
            raise KvpipeError(f"pair {self.pair}: its tokenizers differ, and no alignment.min_cover was given")
        return alignment.transfer(selection, scores, k, self.cfg.alignment.min_cover)

    def transfers(self, scores: Scores, selections: Selections, budgets: Budgets,
                  alignments: dict[str, Alignment]) -> Selections:
        """Each model's selections from its partner: the partner's own, mapped to the model's tokens and budget."""
        return {role: {m.name: {r: self.mapped(alignments[role], selections[OTHER[role]][m.name][r],
                                               scores[OTHER[role]].scores(m, budgets[OTHER[role]][r])[0], k)
                                for r, k in budgets[role].items()} for m in self.methods} for role in ROLES}

    def overlaps(self, scores: Scores, selections: Selections, transfers: Selections, budgets: Budgets,
                 tokens: dict[str, PromptTokens], alignment: Alignment) -> list[dict[str, Any]]:
        """Overlap of the scout's selection with the main's, in the main's tokens (null: the method's forced positions
        plus chance) and, across tokenizers, in characters; and the Spearman correlation of the finite budget-free
        scores, the scout's mapped to the main's tokens (`alignment`: scout -> main)."""
        n = {role: tokens[role].context_end - tokens[role].context_start for role in ROLES}
        rows = []
        for m in self.methods:
            a, b = alignment.max_scores(scores["scout"].scores(m)[0]), scores["main"].scores(m)[0]
            finite = np.isfinite(a) & np.isfinite(b)
            rho = float(spearmanr(a[finite], b[finite]).statistic)
            for r, k in budgets["main"].items():
                row = {"method": m.name, "retention": r, "spearman": rho,
                       **overlap_row(transfers["main"][m.name][r], selections["main"][m.name][r], n["main"],
                                     len(m.forced_positions(n["main"], k)))}
                if not alignment.is_identity:
                    row |= character_overlap(tokens["scout"].context_spans, selections["scout"][m.name][r],
                                             m.forced_positions(n["scout"], budgets["scout"][r]),
                                             tokens["main"].context_spans, selections["main"][m.name][r])
                rows.append(row)
        return rows

    def pruned_conditions(self, role: str, selections: Selections, transfers: Selections,
                          inputs: ScoringInputs) -> list[AnswerRequest]:
        """A model's pruned conditions: own, transfer (and random) selections, plus own per-head ones if asked."""
        chosen = {"own": selections[role], "transfer": transfers[role]}
        conditions = [AnswerRequest(f"{role} {m.name} {r:g} {source}", chosen[source][m.name][r],
                                role=role, method=m.name, retention=r, source=source)
                      for m in self.methods for r in self.pruned for source in sources(m.name)]
        conditions.append(AnswerRequest(f"{role} {NO_CONTEXT}", np.zeros(0, dtype=np.int64), role=role, method=NO_CONTEXT,
                                    retention=0.0))
        if self.cfg.per_head:
            conditions += [AnswerRequest(f"{role} {m.name} {r:g} own_per_head", select(m, inputs, r, self.cfg.budget, True),
                                     role=role, method=m.name, retention=r, source="own_per_head")
                           for m in self.methods if m.name != "random" for r in self.pruned]
        return conditions

    def answer_pruned(self, session: Session, conditions: list[AnswerRequest], clock: dict[str, float]) -> list[Answer]:
        """All pruned conditions of one model as one batch, timed into clock."""
        t0 = time.perf_counter()
        results = session.answer(conditions, self.cfg.max_new_tokens, self.cfg.rerotate)
        clock.update(pruned_answers_s=time.perf_counter() - t0, pruned_conditions=len(conditions),
                     prune_copy_s=session.prune_seconds)
        return results

    def record(self, row: Any, condition: AnswerRequest, answer: Answer, tokens: PromptTokens) -> dict[str, Any]:
        """One answers-table row: the condition, its reply and scored prediction, its cache sizes and realised retention."""
        prefix, n_ctx = tokens.context_start, tokens.context_end - tokens.context_start
        kept = condition.n_kept(n_ctx)
        return {"role": condition.role, "model": self.lms[condition.role].slug, "method": condition.method,
                "retention": condition.retention, "source": condition.source,
                **score_reply(answer.text, list(row.answers)).columns(), "n_context": n_ctx, "n_kept_context": kept,
                "n_template": prefix, "retention_context": kept / n_ctx,
                "retention_prompt": (prefix + kept) / (prefix + n_ctx), "cache_length": answer.cache_length}

    @staticmethod
    def abstain_record(row: Any) -> dict[str, Any]:
        """The constant abstention reply's row (no model: role and model 'none')."""
        return {"role": "none", "model": "none", "method": ALWAYS_ABSTAIN, "retention": 0.0, "source": "none",
                **score_reply(UNANSWERABLE, list(row.answers)).columns(), "n_context": 0, "n_kept_context": 0,
                "n_template": 0, "retention_context": 0.0, "retention_prompt": 0.0, "cache_length": 0}

    def sample(self, row: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Answers, overlaps and timings rows of one sample."""
        tokens = self.prompts(row)
        alignments = self.alignments(tokens)
        budgets = {role: self.budgets(tokens[role]) for role in ROLES}
        base = {"sample_idx": row.sample_idx, "sample_id": row.id, "passage": row.passage,
                "is_impossible": bool(row.is_impossible)}
        sessions, scores, clock, answers = {}, {}, {}, []
        for role in ROLES:
            sessions[role], full, scores[role], clock[role] = self.prefill(role, tokens[role], row.sample_idx)
            answers += [self.record(row, c, full, tokens[role]) for c in self.full_conditions(role)]
        selections = self.selections(scores, budgets)
        transfers = self.transfers(scores, selections, budgets, alignments)
        for role in ROLES:
            conditions = self.pruned_conditions(role, selections, transfers, scores[role])
            results = self.answer_pruned(sessions[role], conditions, clock[role])
            answers += [self.record(row, c, a, tokens[role]) for c, a in zip(conditions, results, strict=True)]
        answers.append(self.abstain_record(row))
        timings = [{"role": role, "model": self.lms[role].slug, "prompt_tokens": len(tokens[role]), **clock[role]}
                   for role in ROLES]
        overlaps = self.overlaps(scores, selections, transfers, budgets, tokens, alignments["main"])
        return [base | a for a in answers], [base | o for o in overlaps], [base | t for t in timings]


def _check_passages(samples: pd.DataFrame) -> None:
    if "passage" not in samples.columns:
        raise KvpipeError("sample table: no 'passage' column; rerun the sampling stage")


def selected_samples(samples: pd.DataFrame, max_samples: int | None) -> pd.DataFrame:
    """The samples that answer, in sample order: whole passages, at most max_samples (None: all)."""
    _check_passages(samples)
    ordered = samples.sort_values("sample_idx", ignore_index=True)
    return ordered.iloc[whole_passages(ordered["passage"], max_samples)]


def run_pair(models: dict[str, Path], samples: pd.DataFrame, pair: str, cfg: dict[str, Any], prompt: dict[str, Any],
             device: str = "auto", dtype: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Answers, overlaps and timings of every condition of a pair on every given sample (progress bar on stderr)."""
    _check_passages(samples)
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
    """Run a pair on the selected samples; write answers, overlap and timings Parquet and facts.json under out_dir."""
    table = pd.read_parquet(samples)
    used = selected_samples(table, cfg["max_samples"])
    models = {"scout": Path(scout_dir), "main": Path(main_dir)}
    answers, overlaps, timings = run_pair(models, used, pair, cfg, prompt, device, dtype)
    out_dir = Path(out_dir)
    for name, frame in (("answers", answers), ("overlap", overlaps), ("timings", timings)):
        write_parquet(frame, out_dir / f"{name}.parquet")
    write_json(out_dir / "facts.json", {"pair": pair, "n_samples": len(used), "n_sampled": len(table), "selection": cfg,
                                        **{role: read_json(models[role] / CARD)["slug"] for role in ROLES}})
