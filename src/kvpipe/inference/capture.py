"""Query capture: the pre-RoPE queries a forward pass computes, RoPE-rotated for attention scores.

The pre-RoPE query is the q_proj output or, in models that normalise each query head before
RoPE (Gemma 3, Qwen 3: `self_attn.q_norm`), the q_norm output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache

from kvpipe.kv.checks import cache_layer
from kvpipe.models.load import LoadedModel
from kvpipe.models.rope import apply_rope, rope_tables


def _query_hook(attn: torch.nn.Module, store: list[torch.Tensor], last: int | None) -> RemovableHandle:
    """Hook the module whose output is the pre-RoPE query, appending it as [batch, n, Hq*d]."""
    def keep(o: torch.Tensor) -> None:
        o = o.transpose(1, 2).flatten(2) if o.ndim == 4 else o   # q_norm acts on [batch, Hq, n, d]
        store.append((o[:, -last:] if last else o).detach())

    return getattr(attn, "q_norm", attn.q_proj).register_forward_hook(lambda m, i, o: keep(o))


@contextmanager
def capture_queries(lm: LoadedModel, last: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's pre-RoPE queries ([batch, n, Hq*d]; only the last `last` tokens if given)."""
    store: list[torch.Tensor] = []
    hooks = [_query_hook(layer.self_attn, store, last) for layer in lm.model.model.layers]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def rope_queries(lm: LoadedModel, raw: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
    """[n, Hq*d] pre-RoPE queries of `layer` -> [Hq, n, d] with that layer's RoPE at the given positions."""
    d = lm.card["head_dim"]
    q = raw.float().reshape(raw.shape[0], -1, d).transpose(0, 1)
    cos, sin = rope_tables(lm.model, positions, layer)
    return apply_rope(q, cos, sin)


@dataclass(frozen=True)
class QuestionCapture:
    """What Q2C scores need from a full-context question pass: per layer queries and keys."""

    queries: list[torch.Tensor]   # per layer [Hq, nq, d], RoPE applied: the question tokens
    keys: list[torch.Tensor]      # per layer [Hkv, T, d], post-RoPE: the row's cache after the question
    index: torch.Tensor           # [nq] cache indices of the question tokens

    @classmethod
    def from_pass(cls, lm: LoadedModel, raw: list[torch.Tensor], cache: DynamicCache, row: int,
                  positions: torch.Tensor, question_rows: np.ndarray, length: int) -> QuestionCapture:
        """Take row `row` of a batched question pass (raw pre-RoPE queries, cache fed the question part)."""
        queries = [rope_queries(lm, r[row][question_rows], positions[question_rows], layer)
                   for layer, r in enumerate(raw)]
        keys = [cache_layer(cache, layer)[0][row] for layer in range(len(cache.layers))]
        return cls(queries, keys, torch.as_tensor(length + question_rows, device=lm.device))
