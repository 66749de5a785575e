"""Cache sources: where a model's context KV comes from (its own prefill, or given tensors).

A context KV covers the prompt up to the end of the context (template prefix + context),
one entry per token, with post-RoPE keys at stated RoPE positions. Answering prunes it to
the template plus a context selection (kvpipe.inference.prune) and feeds the question after it
(kvpipe.inference.decode).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache

from kvpipe.data.prompt import PromptTokens
from kvpipe.errors import KvpipeError
from kvpipe.inference.capture import capture_queries, rope_queries
from kvpipe.kv.checks import cache_layer, check_cache
from kvpipe.models.load import LoadedModel
from kvpipe.registry import Registered


@dataclass(frozen=True)
class ContextKV:
    """A model's KV for prompt tokens [0, context_end), with what SnapKV scoring needs if captured."""

    keys: list[torch.Tensor]                        # per layer [kv_heads, n, head_dim], post-RoPE
    values: list[torch.Tensor]                      # per layer [kv_heads, n, head_dim]
    positions: torch.Tensor                         # [n] RoPE positions of the keys
    window_queries: list[torch.Tensor] | None = None   # per layer [Hq, w, d], RoPE applied: last w prefix tokens
    window_index: torch.Tensor | None = None        # [w] their cache indices

    def __len__(self) -> int:
        return len(self.positions)


CACHE_SOURCES: dict[str, type[CacheSource]] = {}
WINDOW = 64   # query rows at the end of the context the own prefill captures by default (SnapKV's observation window)


class CacheSource(Registered, ABC):
    """Gives a model its context KV for a prompt; subclasses register themselves by `name`."""

    registry = CACHE_SOURCES

    @abstractmethod
    def context_kv(self, lm: LoadedModel, tokens: PromptTokens) -> ContextKV:
        """The KV of tokens [0, tokens.context_end) for model lm."""


@dataclass(frozen=True)
class OwnPrefill(CacheSource):
    """The model prefills the prompt up to the end of the context, capturing the queries of its last `window` tokens.

    A config-less DynamicCache keeps every token in every layer: a model's default cache keeps only
    the last sliding_window - 1 tokens of sliding-window layers (Gemma 3). Attention is the same.
    """

    window: int = WINDOW
    name: ClassVar[str] = "own_prefill"

    def context_kv(self, lm: LoadedModel, tokens: PromptTokens) -> ContextKV:
        ids = torch.as_tensor(tokens.input_ids[: tokens.context_end], device=lm.device)[None]
        w = min(self.window, tokens.context_end)   # the last prefix tokens (into the template if the context is short)
        with torch.inference_mode(), capture_queries(lm, last=w) as raw:
            cache = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, past_key_values=DynamicCache()).past_key_values
        check_cache(cache, lm)
        layers = [cache_layer(cache, layer) for layer in range(len(cache.layers))]
        index = torch.arange(tokens.context_end - w, tokens.context_end, device=lm.device)
        return ContextKV([k[0] for k, _ in layers], [v[0] for _, v in layers],
                         torch.arange(tokens.context_end, device=lm.device),
                         [rope_queries(lm, r[0], index, layer) for layer, r in enumerate(raw)], index)


@dataclass(frozen=True, eq=False)
class GivenTensors(CacheSource):
    """Provided keys and values (e.g. projected from another model), checked against the model and prompt."""

    kv: ContextKV
    name: ClassVar[str] = "given"

    def context_kv(self, lm: LoadedModel, tokens: PromptTokens) -> ContextKV:
        kv = self.kv
        layers, heads, d = lm.card["num_layers"], lm.card["num_kv_heads"], lm.card["head_dim"]
        _expect(lm, "layers of keys", len(kv.keys), layers)
        _expect(lm, "layers of values", len(kv.values), layers)
        shape = (heads, tokens.context_end, d)
        for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
            _expect(lm, f"keys of layer {layer} [kv_heads, tokens, head_dim]", tuple(k.shape), shape)
            _expect(lm, f"values of layer {layer} [kv_heads, tokens, head_dim]", tuple(v.shape), shape)
        _expect(lm, "positions [tokens]", tuple(kv.positions.shape), (tokens.context_end,))
        if kv.window_queries is not None:
            _expect(lm, "layers of window queries", len(kv.window_queries), layers)
            w = len(kv.window_index) if kv.window_index is not None else None
            for layer, q in enumerate(kv.window_queries):
                _expect(lm, f"window queries of layer {layer} [heads, window, head_dim]", tuple(q.shape),
                        (lm.model.config.num_attention_heads, w, d))

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(lm.device, lm.dtype)

        return ContextKV([move(k) for k in kv.keys], [move(v) for v in kv.values], kv.positions.to(lm.device),
                         kv.window_queries, kv.window_index)

def _expect(lm: LoadedModel, what: str, got: object, want: object) -> None:
    if got != want:
        raise KvpipeError(f"given KV for model {lm.slug}: {what} is {got}, expected {want}")
