"""Answer requests: which model answers from which context KV, keeping which context tokens (one batch row)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpipe.inference.cache_sources import OwnPrefill


@dataclass(frozen=True, eq=False)
class AnswerRequest:
    """One answer to compute: a row of a batch, and the fields its table row needs.

    `selection` holds context-relative indices: [k] shared by every layer and KV head,
    [layers, kv_heads, k] per head, or None for the whole context. `cache` names the
    context KV the row starts from (a key of Session.contexts; by default the model's own prefill).
    With `keep_template` False the selection indexes the whole prefix [0, context_end) instead and
    the template is kept only where selected (kvpress's budget: SnapKV's `kvpress` protocol).
    """

    label: str
    selection: np.ndarray | None = None
    cache: str = OwnPrefill.name
    role: str = ""
    method: str = "full"
    retention: float = 1.0
    source: str = "none"    # where the selection comes from: own, transfer, own_per_head, or none (whole context)
    keep_template: bool = True

    def indices(self, n_context: int) -> np.ndarray:
        """The selection, with the whole context spelled out as [n_context]."""
        return np.arange(n_context) if self.selection is None else self.selection

    def n_kept(self, n_context: int) -> int:
        """How many context tokens the row keeps (per layer and head)."""
        return n_context if self.selection is None else self.selection.shape[-1]
