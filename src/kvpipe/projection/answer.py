"""Answering the test samples under every condition, with bytes and time to first token.

Per sample: the scout prefills its context once, answers the question once (capturing its
question queries) and selects context tokens at each retention by `chain.method` (Q2C by default;
kvpipe.scoring); its context KV, rounded to
float16, is the payload. The main prefills its own context once (main_full and the conditions that
keep its own keys or values), every planned cache is built and all rows are answered in batches;
a constant reply (always_abstain) is recorded without a model. Time to first token is then measured
row by row, in parts that the report adds up per regime (kvpipe.projection.aggregate.ttft_regimes):
`scout_s` (the scout's prefill, question pass and selection, for rows that wait for the scout),
`own_prefill_s` (the main's own context prefill, for rows that need it), `build_s` (projection, SVD
factors multiplied out, cache assembly), the row's `bytes` (sent over a configured link) and
`question_s` (the question pass up to the first answer token).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from kvpipe.config import section_defaults
from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.data.qa_metrics import score_reply
from kvpipe.errors import KvpipeError
from kvpipe.inference.cache_sources import GivenTensors, OwnPrefill
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.kv.checks import check_window
from kvpipe.models.load import LoadedModel
from kvpipe.projection.conditions import Plan, SampleInputs
from kvpipe.projection.inject import ScoutPayload
from kvpipe.projection.registry import plan_all
from kvpipe.scoring.methods import METHODS, ScoringInputs
from kvpipe.scoring.select import capture_window, select
from kvpipe.settings import ProjectionSettings


class Answerer:
    """Both models, the fitted projectors and the settings; answers one test sample at a time."""

    def __init__(self, scout: LoadedModel, main: LoadedModel, common: dict[str, Any], cfg: ProjectionSettings,
                 prompt: dict[str, Any], pair: str) -> None:
        self.scout, self.main, self.common, self.cfg, self.prompt, self.pair = scout, main, common, cfg, prompt, pair
        self.retentions = sorted({r for r in [*cfg.retention, *cfg.chain.retention] if r < 1})
        self.method = METHODS[cfg.chain.method].from_config(section_defaults("selection") | {"seed": cfg.seed})

    def prompt_tokens(self, row: Any) -> PromptTokens:
        """The prompt both models read; they must tokenise it identically and fit their context windows."""
        tokens = build_prompt(self.main.tokenizer, self.prompt, row.context, row.question)
        scout = build_prompt(self.scout.tokenizer, self.prompt, row.context, row.question)
        if not np.array_equal(tokens.input_ids, scout.input_ids):
            raise KvpipeError(f"pair {self.pair}: scout and main tokenise sample {row.id} differently; projection "
                              "needs a shared tokenizer")
        for lm in (self.scout, self.main):
            check_window(lm, len(tokens), row.id, self.cfg.max_new_tokens)
        return tokens

    def scout_side(self, tokens: PromptTokens, sample_idx: int) -> tuple[ScoutPayload, dict[float, np.ndarray]]:
        """The scout's payload and its selection (`chain.method`) at each retention below 1."""
        session = Session(self.scout, tokens, capture_window([self.method]))
        session.answer([AnswerRequest("scout full", role="scout")], 1, capture_row=0)
        inputs = ScoringInputs.from_session(session, sample_idx)
        return ScoutPayload.from_context(self.scout, session.own), {r: select(self.method, inputs, r, self.cfg.budget)
                                                                    for r in self.retentions}

    def ttft(self, session: Session, inputs: SampleInputs, plan: Plan, scout_s: float,
             prefill_s: float) -> dict[str, float]:
        """The measured parts of one row's time to first token (kvpipe.projection.aggregate adds them up)."""
        inputs.clear()
        started = time.perf_counter()
        cache = OwnPrefill.name
        if plan.build is not None:
            session.add(GivenTensors(plan.build()), "ttft")
            cache = "ttft"
        built = time.perf_counter()
        session.answer([AnswerRequest("ttft", plan.selection, cache=cache)], 1)
        question_s = time.perf_counter() - built
        session.contexts.pop("ttft", None)
        return {"scout_s": scout_s if plan.uses_scout else 0.0, "own_prefill_s": prefill_s if plan.own_prefill else 0.0,
                "build_s": built - started, "question_s": question_s, "bytes": plan.bytes}

    def answer(self, session: Session, plans: list[Plan]) -> list[str]:
        """The reply of every planned row: constant ones as they are, the others from their caches (each built once),
        answered in batches of `batch_size`."""
        conditions = []
        for plan in plans:
            if plan.reply is not None:
                continue
            cache = OwnPrefill.name
            if plan.build is not None:
                cache = plan.variant.label
                session.add(GivenTensors(plan.build()), cache)
            conditions.append(AnswerRequest(plan.variant.label, plan.selection, cache=cache))
        size = self.cfg.batch_size
        generated = []
        for start in range(0, len(conditions), size):
            generated += [a.text for a in session.answer(conditions[start:start + size], self.cfg.max_new_tokens)]
        replies = iter(generated)
        return [plan.reply if plan.reply is not None else next(replies) for plan in plans]

    def warm_up(self, row: Any) -> None:
        """Run both models once on a prompt, so that no row's timing pays for one-off initialisation."""
        tokens = self.prompt_tokens(row)
        self.scout_side(tokens, row.sample_idx)
        Session(self.main, tokens, 1).answer([AnswerRequest("warm-up")], 1)

    def sample(self, row: Any, ttft: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Answers-table rows, TTFT rows (ttft: measure each row's; else none) and the timings row of one test sample."""
        tokens = self.prompt_tokens(row)
        t0 = time.perf_counter()
        payload, selections = self.scout_side(tokens, row.sample_idx)
        t1 = time.perf_counter()
        session = Session(self.main, tokens, 1)
        prefill_s = time.perf_counter() - t1
        inputs = SampleInputs(tokens, row.context, payload, session.own, self.common["projectors"],
                              self.common["layer_map"], self.main, self.common["means"], selections, self.cfg,
                              extras=self.common.get("extras", {}))
        plans = plan_all(inputs, self.cfg.conditions)
        t2 = time.perf_counter()
        replies = self.answer(session, plans)
        t3 = time.perf_counter()
        session.contexts = {OwnPrefill.name: session.own}   # free the answered caches
        ttfts = [{"sample_idx": row.sample_idx} | asdict(p.variant) | self.ttft(session, inputs, p, t1 - t0, prefill_s)
                 for p in plans if p.reply is None] if ttft else []
        base = {"sample_idx": row.sample_idx, "sample_id": row.id, "passage": row.passage,
                "is_impossible": bool(row.is_impossible)}
        n_context = tokens.context_end - tokens.context_start
        records = []
        for plan, reply in zip(plans, replies, strict=True):
            kept = n_context if plan.selection is None else len(plan.selection)
            records.append(base | asdict(plan.variant) | score_reply(reply, list(row.answers)).columns() | {
                "bytes": plan.bytes, "n_context": n_context,
                "n_tokens": 0 if plan.reply is not None else tokens.context_start + kept})
        timing = {"sample_idx": row.sample_idx, "scout_prefill_s": t1 - t0, "main_prefill_s": prefill_s,
                  "answer_s": t3 - t2, "rows": len(plans), "ttft_total_s": time.perf_counter() - t3}
        return records, ttfts, timing
