"""Batched greedy answering from pruned caches, without leakage and without double counting.

The question part (question + closing template) is fed after the pruning, at its *original*
RoPE positions (right after the context), so it never attends to evicted tokens; with
`rerotate` it follows on from the kept entries instead. Every row shares the question ids
and positions, so the batch is exact. Decoding is greedy and a row stops at any end-of-turn
id: those of the model's generation config, the tokenizer's eos and the token the chat template
closes a reply with (Gemma's <end_of_turn>, which the Gemma 3 GGUF's generation config lacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
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


REPLY = "kvpipe-reply"


def reply_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The added token the chat template closes an assistant reply with (<|im_end|>, <end_of_turn>, <|eot_id|>);
    None if the reply is followed by no added token or the template cannot render one."""
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError:
        return None
    if REPLY not in text:
        return None
    ids = tokenizer(text[text.rindex(REPLY) + len(REPLY):].lstrip(), add_special_tokens=False)["input_ids"]
    return ids[0] if ids and ids[0] in tokenizer.added_tokens_decoder else None


def stop_ids(lm: LoadedModel) -> list[int]:
    """Every end-of-turn id: the generation config's eos_token_id (int or list), the tokenizer's eos and
    the chat template's reply end."""
    configured = lm.model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in [*ids, lm.tokenizer.eos_token_id, reply_end_id(lm.tokenizer)] if i is not None})


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
    """Greedy tokens per row, each up to and including its first stop id.

    A row that has stopped leaves the batch (cache, mask and positions keep the rows still
    decoding), so every step computes only those.
    """
    rows, nq = len(batch.kept), positions.shape[1]
    generated: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows, device=lm.device)   # the row of each batch entry
    mask = torch.cat([batch.mask, batch.mask.new_ones(rows, nq)], dim=1)
    last = positions[:, -1:]
    for step in range(max_new_tokens):
        check_finite(out.logits, "the logits", lm)
        nxt = out.logits[:, -1].argmax(-1)
        for entry, row in enumerate(active.tolist()):
            generated[row].append(int(nxt[entry]))
        going = ~torch.isin(nxt, stops)
        if not bool(going.any()) or step == max_new_tokens - 1:
            break
        if not bool(going.all()):
            keep = going.nonzero()[:, 0]
            batch.cache.batch_select_indices(keep)
            active, nxt, mask, last = active[keep], nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        out = lm.model(input_ids=nxt[:, None], past_key_values=batch.cache, use_cache=True, attention_mask=mask,
                       position_ids=last + step + 1,
                       cache_position=torch.tensor([batch.length + nq + step], device=lm.device))
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
    answers = []
    for raw, n in zip(generated, batch.kept, strict=True):
        toks = [t for t in raw if t not in stops]
        # its cache held the kept entries, the question part and every generated token but the last (never fed)
        answers.append(Answer(toks, lm.tokenizer.decode(toks, skip_special_tokens=True).strip(), n,
                              n + nq + len(raw) - 1))
    return answers, capture
