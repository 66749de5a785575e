"""Scores -> budget -> top-k: the context positions a selection method keeps at a retention.

Budget: with `budget: context` a retention r keeps k = round(r · n) of the n context tokens; with
`prompt` (as kvpress counts it) r applies to the whole pre-question prompt, template prefix p
included, and since the template is always kept the context keeps k = round(r · (p + n)) − p.
Either way 1 ≤ k ≤ n. The context of a ScoringInputs starts at cache index p, so its slice gives
both n and p.
"""

from __future__ import annotations

import numpy as np

from kvpipe.scoring.methods import ScoringInputs, SelectionMethod, SnapKV, top_n


def context_budget(retention: float, n_context: int, prefix: int = 0, budget: str = "context") -> int:
    """Context tokens kept at a retention, counting the context alone or the prefix plus the context."""
    if budget == "prompt":
        return int(min(n_context, max(1, round(retention * (prefix + n_context)) - prefix)))
    return int(max(1, round(retention * n_context)))


def budget_of(inputs: ScoringInputs, retention: float, budget: str) -> int:
    """k: the context tokens kept at a retention for the inputs' context (its template prefix by `budget`)."""
    return context_budget(retention, inputs.context.stop - inputs.context.start, inputs.context.start, budget)


def select(method: SelectionMethod, inputs: ScoringInputs, retention: float, budget: str,
           per_head: bool = False) -> np.ndarray:
    """The sorted context positions `method` keeps at `retention`: [k] shared by every layer and head, or with
    per_head [layers, kv_heads, k] (each head its own top k). Scores are computed once per method and budget
    (ScoringInputs.scores)."""
    k = budget_of(inputs, retention, budget)
    shared, heads = inputs.scores(method, k)
    return top_n(heads if per_head else shared, k)


def capture_window(methods: list[SelectionMethod]) -> int:
    """Query rows at the end of the context the own prefill must capture for these methods (SnapKV's window)."""
    return max([m.window for m in methods if isinstance(m, SnapKV)], default=1)
