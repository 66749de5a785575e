"""Answer a question from a pruned KV cache, without leakage and without double counting.

Protocol per (model, sample):
  1. prefill the prompt up to the end of the context, once; the cache holds template +
     context. Query states of the last context tokens are captured for SnapKV-style scores.
  2. per condition, take that cache, keep the template and the selected context positions,
     then feed the question part (question + closing template) at its *original* RoPE
     positions and decode greedily. The question never attends to evicted tokens because
     it is fed after the pruning.
Conditions run as one batch: row r's cache holds its kept entries left-aligned and padded
to the longest row; the padding is masked out. Every row shares the question's positions,
so the batch is exact. Optionally the kept keys are re-rotated to contiguous positions
(`rerotate`), in which case the question and answer follow on from them.
The question queries of a full-cache row are captured for Q2C scores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from kvpipe.data.prompt import QUESTION, PromptTokens
from kvpipe.kv.checks import cache_layer, check_cache, check_finite
from kvpipe.models.load import LoadedModel
from kvpipe.models.rope import apply_rope, invert_rope, rope_tables


@dataclass
class Answer:
    """Greedy continuation of one condition."""

    token_ids: list[int]
    text: str
    kept: int             # cache entries before the question (template + kept context)
    cache_length: int     # cache length after decoding


@contextmanager
def capture_queries(lm: LoadedModel, last: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's q_proj output ([batch, n, Hq*d]; only the last `last` tokens if given)."""
    store: list[torch.Tensor] = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda m, i, o: store.append((o[:, -last:] if last else o).detach()))
        for layer in lm.model.model.layers]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def rope_queries(lm: LoadedModel, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[n, Hq*d] q_proj output -> [Hq, n, d] with RoPE at the given positions."""
    d = lm.card["head_dim"]
    q = raw.float().reshape(raw.shape[0], -1, d).transpose(0, 1)
    cos, sin = rope_tables(lm.model, positions)
    return apply_rope(q, cos, sin)


class Session:
    """One prefilled context of one model; answers any number of selections from it."""

    def __init__(self, lm: LoadedModel, tokens: PromptTokens, window: int = 64) -> None:
        self.lm, self.tokens = lm, tokens
        ids = torch.as_tensor(tokens.input_ids[: tokens.context_end], device=lm.device)[None]
        w = min(window, tokens.context_end - tokens.context_start)
        with torch.inference_mode(), capture_queries(lm, last=w) as raw:
            out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        check_cache(self.cache, lm)
        self.window_index = torch.arange(tokens.context_end - w, tokens.context_end, device=lm.device)
        self.window_queries = [rope_queries(lm, r[0], self.window_index) for r in raw]
        self.question_ids = torch.as_tensor(tokens.input_ids[tokens.context_end:], device=lm.device)
        self.question_rows = np.flatnonzero(tokens.segment[tokens.context_end:] == QUESTION)
        # set by answer(..., capture_row=r): the question's queries and that row's keys, per layer
        self.question_queries: list[torch.Tensor] = []
        self.question_keys: list[torch.Tensor] = []
        self.question_index = torch.empty(0, dtype=torch.long, device=lm.device)
        self.prune_seconds = 0.0   # time spent copying and pruning caches, summed over answer() calls

    @property
    def context(self) -> slice:
        return slice(self.tokens.context_start, self.tokens.context_end)

    def _kept_index(self, selection: np.ndarray, layer: int, heads: int) -> torch.Tensor:
        """Cache indices [heads, n] one row keeps at a layer: the template, then its context selection."""
        sel = selection if selection.ndim == 1 else selection[layer]
        context = torch.as_tensor(self.tokens.context_start + np.sort(sel, axis=-1), device=self.lm.device)
        context = context.expand(heads, -1) if context.ndim == 1 else context
        prefix = torch.arange(self.tokens.context_start, device=self.lm.device).expand(heads, -1)
        return torch.cat([prefix, context], dim=1)

    def _batched_cache(self, selections: list[np.ndarray], rerotate: bool) -> tuple[DynamicCache, torch.Tensor, list[int]]:
        """Pruned caches left-aligned in one batch, the key mask, and each row's kept length."""
        kept = [self.tokens.context_start + sel.shape[-1] for sel in selections]
        length = max(kept)
        mask = torch.zeros(len(selections), length, dtype=torch.long, device=self.lm.device)
        for r, n in enumerate(kept):
            mask[r, :n] = 1
        tables = rope_tables(self.lm.model, torch.arange(self.tokens.context_end, device=self.lm.device)) if rerotate else None
        layers = []
        for layer in range(len(self.cache.layers)):
            keys, values = cache_layer(self.cache, layer)
            heads, d = keys.shape[1], keys.shape[3]
            kb = keys.new_zeros((len(selections), heads, length, d))
            vb = values.new_zeros((len(selections), heads, length, values.shape[3]))
            for r, sel in enumerate(selections):
                idx = self._kept_index(sel, layer, heads)                      # [heads, n]
                k = torch.gather(keys[0], 1, idx[..., None].expand(-1, -1, d))
                if rerotate:  # move kept keys to positions 0..n-1
                    cos, sin = tables
                    n = idx.shape[1]
                    k = apply_rope(invert_rope(k.float(), cos[idx], sin[idx]), cos[:n], sin[:n]).to(k.dtype)
                kb[r, :, : idx.shape[1]] = k
                vb[r, :, : idx.shape[1]] = torch.gather(values[0], 1, idx[..., None].expand(-1, -1, values.shape[3]))
            layers.append((kb, vb))
        return DynamicCache(ddp_cache_data=layers), mask, kept

    def answer(self, selections: list[np.ndarray], max_new_tokens: int, rerotate: bool = False,
               capture_row: int | None = None) -> list[Answer]:
        """Answer from caches keeping the template plus each selection of context-relative indices.

        A selection is [k] (shared by all layers and heads) or [layers, kv_heads, k] (per head).
        With capture_row, the question queries of that row are kept for Q2C scoring (the row
        must keep the whole context).
        """
        started = time.perf_counter()
        cache, mask, kept = self._batched_cache(selections, rerotate)
        self.prune_seconds += time.perf_counter() - started
        length = max(kept)
        batch, nq = len(selections), len(self.question_ids)
        start = torch.full((batch, 1), self.tokens.context_end, device=self.lm.device)
        if rerotate:
            start = torch.as_tensor([[n] for n in kept], device=self.lm.device)
        ids = self.question_ids[None].expand(batch, -1)
        positions = start + torch.arange(nq, device=self.lm.device)[None]
        eos = self.lm.tokenizer.eos_token_id
        done = torch.zeros(batch, dtype=torch.bool, device=self.lm.device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        with torch.inference_mode():
            with capture_queries(self.lm) as raw:
                out = self.lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                                    attention_mask=torch.cat([mask, mask.new_ones(batch, nq)], dim=1),
                                    position_ids=positions, cache_position=torch.arange(length, length + nq,
                                                                                         device=self.lm.device))
            if capture_row is not None:
                qpos = positions[capture_row]
                self.question_queries = [rope_queries(self.lm, r[capture_row][self.question_rows],
                                                      qpos[self.question_rows]) for r in raw]
                self.question_index = torch.as_tensor(length + self.question_rows, device=self.lm.device)
                self.question_keys = [cache_layer(cache, l)[0][capture_row] for l in range(len(cache.layers))]
            fed = 0
            for step in range(max_new_tokens):
                check_finite(out.logits, "the logits", self.lm)
                nxt = out.logits[:, -1].argmax(-1)
                for r in range(batch):
                    if not done[r]:
                        generated[r].append(int(nxt[r]))
                done |= nxt == eos
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                total = length + nq + fed
                out = self.lm.model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True,
                                    attention_mask=torch.cat([mask, mask.new_ones(batch, nq + fed + 1)], dim=1),
                                    position_ids=positions[:, -1:] + fed + 1,
                                    cache_position=torch.tensor([total], device=self.lm.device))
                fed += 1
        cache_length = cache.get_seq_length()
        answers = []
        for r, n in enumerate(kept):
            toks = [t for t in generated[r] if t != eos]
            answers.append(Answer(toks, self.lm.tokenizer.decode(toks, skip_special_tokens=True).strip(), n,
                                  cache_length - (length - n)))
        return answers
