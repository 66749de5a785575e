"""Answering the test samples under every condition, with bytes and time to first token.

Per sample: the scout prefills its context once, answers the question once (capturing its
question queries) and selects context tokens by Q2C at each retention; its context KV, rounded to
float16, is the payload. The main prefills its own context once (main_full and the conditions that
keep its own keys or values), every planned cache is built and all rows are answered in batches.
Time to first token is then measured row by row: from having the payload, build the row's cache
(projection, SVD factors multiplied out, assembly) and feed the question up to the first answer
token; rows that need the main's own prefill add its measured time.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.data.qa_metrics import score_prediction
from kvpipe.errors import KvpipeError
from kvpipe.inference.conditions import Condition
from kvpipe.inference.session import Session
from kvpipe.inference.sources import GivenTensors, OwnPrefill
from kvpipe.kv.checks import check_window
from kvpipe.models.load import LoadedModel
from kvpipe.projection.conditions import Plan, SampleInputs, plan_all
from kvpipe.projection.inject import ScoutPayload
from kvpipe.selection.methods import METHODS, ScoringInputs, top_n
from kvpipe.selection.overlap import context_budget


class Answerer:
    """Both models, the fitted projectors and the settings; answers one test sample at a time."""

    def __init__(self, scout: LoadedModel, main: LoadedModel, common: dict[str, Any], cfg: dict[str, Any],
                 prompt: dict[str, Any], pair: str) -> None:
        self.scout, self.main, self.common, self.cfg, self.prompt, self.pair = scout, main, common, cfg, prompt, pair
        self.retentions = sorted({r for r in [*cfg["retention"], *cfg["chain"]["retention"]] if r < 1})

    def prompt_tokens(self, row: Any) -> PromptTokens:
        """The prompt both models read; they must tokenise it identically and fit their context windows."""
        tokens = build_prompt(self.main.tokenizer, self.prompt, row.context, row.question)
        scout = build_prompt(self.scout.tokenizer, self.prompt, row.context, row.question)
        if not np.array_equal(tokens.input_ids, scout.input_ids):
            raise KvpipeError(f"pair {self.pair}: scout and main tokenise sample {row.id} differently; projection "
                              "needs a shared tokenizer")
        for lm in (self.scout, self.main):
            check_window(lm, len(tokens), row.id, self.cfg["max_new_tokens"])
        return tokens

    def scout_side(self, tokens: PromptTokens, sample_idx: int) -> tuple[ScoutPayload, dict[float, np.ndarray]]:
        """The scout's payload and its Q2C selection at each retention below 1."""
        session = Session(self.scout, tokens, 1)
        session.answer([Condition("scout full", role="scout")], 1, capture_row=0)
        q2c = METHODS["q2c"]()
        scores = q2c.reduce_heads(q2c.head_scores(ScoringInputs.from_session(session, sample_idx))).sum(axis=0)
        n = tokens.context_end - tokens.context_start
        budget = {r: context_budget(r, n, tokens.context_start, self.cfg["budget"]) for r in self.retentions}
        return ScoutPayload.from_context(self.scout, session.own), {r: top_n(scores, k) for r, k in budget.items()}

    def ttft(self, session: Session, inputs: SampleInputs, plan: Plan, prefill_s: float) -> float:
        """Seconds from the payload to the first answer token for one row (plus the own prefill it needs)."""
        inputs.clear()
        started = time.perf_counter()
        cache = OwnPrefill.name
        if plan.build is not None:
            session.add(GivenTensors(plan.build()), "ttft")
            cache = "ttft"
        session.answer([Condition("ttft", plan.selection, cache=cache)], 1)
        seconds = time.perf_counter() - started + (prefill_s if plan.own_prefill else 0.0)
        session.contexts.pop("ttft", None)
        return seconds

    def answer(self, session: Session, plans: list[Plan]) -> list[Any]:
        """Every planned row, its cache built once, answered in batches of `batch_size`."""
        conditions = []
        for plan in plans:
            cache = OwnPrefill.name
            if plan.build is not None:
                cache = plan.variant.label
                session.add(GivenTensors(plan.build()), cache)
            conditions.append(Condition(plan.variant.label, plan.selection, cache=cache))
        size = self.cfg["batch_size"]
        answers = []
        for start in range(0, len(conditions), size):
            answers += session.answer(conditions[start:start + size], self.cfg["max_new_tokens"])
        return answers

    def warm_up(self, row: Any) -> None:
        """Run both models once on a prompt, so that no row's timing pays for one-off initialisation."""
        tokens = self.prompt_tokens(row)
        self.scout_side(tokens, row.sample_idx)
        Session(self.main, tokens, 1).answer([Condition("warm-up")], 1)

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
        plans = plan_all(inputs, self.cfg["conditions"])
        t2 = time.perf_counter()
        answers = self.answer(session, plans)
        t3 = time.perf_counter()
        session.contexts = {OwnPrefill.name: session.own}   # free the answered caches
        ttfts = [{"sample_idx": row.sample_idx} | asdict(p.variant) | {"ttft_s": self.ttft(session, inputs, p, prefill_s)}
                 for p in plans] if ttft else []
        base = {"sample_idx": row.sample_idx, "sample_id": row.id, "passage": row.passage,
                "is_impossible": bool(row.is_impossible)}
        records = []
        for plan, answer in zip(plans, answers, strict=True):
            prediction, em, f1 = score_prediction(answer.text, list(row.answers))
            records.append(base | asdict(plan.variant) | {
                "prediction": prediction, "exact": em, "f1": f1, "bytes": plan.bytes,
                "n_context": tokens.context_end - tokens.context_start, "n_tokens": answer.kept})
        timing = {"sample_idx": row.sample_idx, "scout_prefill_s": t1 - t0, "main_prefill_s": prefill_s,
                  "answer_s": t3 - t2, "rows": len(plans), "ttft_total_s": time.perf_counter() - t3}
        return records, ttfts, timing
