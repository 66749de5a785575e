"""Batched greedy answering from pruned caches, without leakage and without double counting.

The question part (question + closing template) is fed after the pruning, at its *original*
RoPE positions (right after the context), so it never attends to evicted tokens; with
`rerotate` it follows on from the kept entries instead. Every row shares the question ids
and positions, so the batch is exact. Decoding is greedy and a row stops at any end-of-turn
id: those of the model's generation config plus the tokenizer's eos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvpipe.data.prompt import QUESTION, PromptTokens
from kvpipe.inference.capture import QuestionCapture, capture_queries
from kvpipe.inference.prune import PrunedBatch
from kvpipe.kv.checks import check_finite
from kvpipe.models.load import LoadedModel


@dataclass
class Answer:
    """Greedy continuation of one condition."""

    token_ids: list[int]
    text: str
    kept: int             # cache entries before the question (template + kept context)
    cache_length: int     # cache length after decoding


def stop_ids(lm: LoadedModel) -> list[int]:
    """Every end-of-turn id: the generation config's eos_token_id (int or list) and the tokenizer's eos."""
    configured = lm.model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in [*ids, lm.tokenizer.eos_token_id] if i is not None})


def _question_pass(lm: LoadedModel, tokens: PromptTokens, batch: PrunedBatch, positions: torch.Tensor,
                   capture_row: int | None) -> tuple[CausalLMOutputWithPast, QuestionCapture | None]:
    """Feed the question part to every row; with capture_row, keep that row's question queries and keys."""
    ids = torch.as_tensor(tokens.input_ids[tokens.context_end:], device=lm.device)
    rows, nq = len(batch.kept), len(ids)
    with capture_queries(lm) as raw:
        out = lm.model(input_ids=ids[None].expand(rows, -1), past_key_values=batch.cache, use_cache=True,
                       logits_to_keep=1, attention_mask=torch.cat([batch.mask, batch.mask.new_ones(rows, nq)], dim=1),
                       position_ids=positions,
                       cache_position=torch.arange(batch.length, batch.length + nq, device=lm.device))
    if capture_row is None:
        return out, None
    question_rows = np.flatnonzero(tokens.segment[tokens.context_end:] == QUESTION)
    return out, QuestionCapture.from_pass(lm, raw, batch.cache, capture_row, positions[capture_row], question_rows,
                                          batch.length)


def _greedy(lm: LoadedModel, batch: PrunedBatch, out: CausalLMOutputWithPast, positions: torch.Tensor,
            max_new_tokens: int, stops: torch.Tensor) -> list[list[int]]:
    """Greedy tokens per row, each up to and including its first stop id."""
    rows, nq = len(batch.kept), positions.shape[1]
    done = torch.zeros(rows, dtype=torch.bool, device=lm.device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    fed = 0
    for step in range(max_new_tokens):
        check_finite(out.logits, "the logits", lm)
        nxt = out.logits[:, -1].argmax(-1)
        for r in range(rows):
            if not done[r]:
                generated[r].append(int(nxt[r]))
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = lm.model(input_ids=nxt[:, None], past_key_values=batch.cache, use_cache=True,
                       attention_mask=torch.cat([batch.mask, batch.mask.new_ones(rows, nq + fed + 1)], dim=1),
                       position_ids=positions[:, -1:] + fed + 1,
                       cache_position=torch.tensor([batch.length + nq + fed], device=lm.device))
        fed += 1
    return generated


def decode(lm: LoadedModel, tokens: PromptTokens, batch: PrunedBatch, max_new_tokens: int, rerotate: bool = False,
           capture_row: int | None = None) -> tuple[list[Answer], QuestionCapture | None]:
    """Answer every row of a pruned batch; with capture_row, also that row's question capture."""
    nq = len(tokens) - tokens.context_end
    start = torch.full((len(batch.kept), 1), tokens.context_end, device=lm.device)
    if rerotate:
        start = torch.as_tensor([[n] for n in batch.kept], device=lm.device)
    positions = start + torch.arange(nq, device=lm.device)[None]
    stops = stop_ids(lm)
    with torch.inference_mode():
        out, capture = _question_pass(lm, tokens, batch, positions, capture_row)
        generated = _greedy(lm, batch, out, positions, max_new_tokens, torch.as_tensor(stops, device=lm.device))
    cache_length = batch.cache.get_seq_length()
    answers = []
    for toks, n in zip(generated, batch.kept, strict=True):
        toks = [t for t in toks if t not in stops]
        answers.append(Answer(toks, lm.tokenizer.decode(toks, skip_special_tokens=True).strip(), n,
                              cache_length - (batch.length - n)))
    return answers, capture
